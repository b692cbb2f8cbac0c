//! Workers (issue 16), over real QUIC on loopback: the platform node is a
//! coordinator and `N` workers (each a `Node::start_worker` in this
//! process, with its own certificate, port, state directory and shard
//! files); worker `w` runs the joins and aggregate batches of the shards
//! `s` with `s mod N = w` with the bank, and the coordinator adds their
//! shares before its noise.
//!
//! Exactness as in `sharded_nodes.rs`: the noise is negligible (σ < 0.2,
//! checked on the reported σ), so every cell must equal the plaintext truth
//! (`cleanroom_sim::oracle::truth`) and the unsharded nodes' cells.

use std::net::SocketAddr;
use std::time::Duration;

use cleanroom_client::new_query_id;
use cleanroom_lab::demo::{Fixture, demo_queries};
use cleanroom_node::server::Node;
use cleanroom_sim::oracle::truth;
use cleanroom_tests::{analyst_of, assert_cells_exact};
use cleanroom_transport::{Identity, TransportSettings, TrustAnchors, client_endpoint, pki, read_frame, write_frame};
use cleanroom_wire::{AbortCode, MAX_MESSAGE_LEN, Message, ShareCheck, WorkerHolds};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A query grouped by the platform's segment (three platform groups) and
/// the bank's category.
const GROUPED_SQL: &str = "SELECT b.category, p.segment, COUNT(DISTINCT b.customer) AS customers, COUNT(*) AS n, \
     SUM(b.amount) AS spend FROM bank b JOIN platform p \
     WHERE b.category IN ('groceries', 'restaurants', 'fuel') AND p.segment IN ('messenger_active', 'gamer', 'casual') \
     GROUP BY b.category, p.segment";

/// Free UDP ports on loopback (bound, then released).
fn free_addresses(n: usize) -> Vec<SocketAddr> {
    let sockets: Vec<std::net::UdpSocket> = (0..n)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    sockets.iter().map(|s| s.local_addr().unwrap()).collect()
}

/// A fixture of `rows` customers and users with the grouped template,
/// negligible noise, `shards` shards (none: unsharded) and `workers`
/// platform workers.
fn fixture(dir: &std::path::Path, rows: usize, seed: u64, shards: Option<u32>, workers: usize) -> Fixture {
    let mut f = Fixture::create(dir, rows, seed, &["alice"]).unwrap();
    f.add_sql_template("grouped", GROUPED_SQL, "alice").unwrap();
    let shard_section = shards.map_or_else(String::new, |s| {
        format!("[shards]\ncount = {s}\nkey = \"certs/shard.key\"\n\n")
    });
    f.edit_configs(&[
        ("rho_per_analyst = \"20\"", "rho_per_analyst = \"10000000000000\""),
        ("rho = \"0.1\"", "rho = \"1000000000000\""),
        ("rho = \"1\"", "rho = \"1000000000000\""),
        ("spend_cents = 50000", "spend_cents = 2000"),
        ("[limits]", &format!("{shard_section}[limits]")),
    ])
    .unwrap();
    if workers > 0 {
        f.use_workers(&free_addresses(workers)).unwrap();
    }
    f
}

/// The platform's workers, then its coordinator.
async fn start_platform(f: &Fixture, bank: &Node, workers: u32) -> (Node, Vec<Node>) {
    f.write_platform_config(bank.local_addr().unwrap()).unwrap();
    let mut ws = Vec::new();
    for w in 0..workers {
        ws.push(f.start_worker(w).await.unwrap());
    }
    let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
    (platform, ws)
}

/// Every demo query and the grouped one through `platform` (with `some`,
/// the grouped one only: the analyst's budget holds nine queries of this
/// negligible noise): each cell checked equal to the plaintext truth; the
/// cells.
async fn exact_cells(f: &Fixture, bank: &Node, platform: &Node, label: &str, some: bool) -> Vec<Vec<f64>> {
    let analyst = analyst_of(f, "alice", bank, platform);
    let mut queries = demo_queries();
    queries.push(("grouped", Vec::new()));
    if some {
        queries = vec![queries.remove(queries.len() - 1)];
    }
    let mut out = Vec::new();
    for (template, params) in queries {
        let r = analyst
            .query(template, &params, new_query_id().unwrap(), TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{label} {template}: {e}"));
        let t = truth(&f.data, &f.plan(template, &params).unwrap());
        assert_cells_exact(&r, &t, &format!("{label} {template}"));
        out.push(r.cells.iter().take(t.len()).map(|c| c.value).collect());
    }
    out
}

/// The bank's cardinality ε spent (millionths), from its state file.
fn cardinality_spent(dir: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(dir.join("state").join("bank").join("state.db")).unwrap();
    db.query_row("SELECT COALESCE(SUM(eps_micro), 0) FROM cardinality", [], |r| r.get(0))
        .unwrap()
}

async fn stop(nodes: impl IntoIterator<Item = Node>) {
    for n in nodes {
        n.shutdown().await;
    }
}

/// The unsharded nodes' cells for every query (each checked exact), and
/// the bank's cardinality spent.
async fn unsharded(rows: usize, seed: u64) -> (Vec<Vec<f64>>, i64) {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), rows, seed, None, 0);
    let bank = f.start_bank().await.unwrap();
    let (platform, _) = start_platform(&f, &bank, 0).await;
    let cells = exact_cells(&f, &bank, &platform, "unsharded", false).await;
    stop([platform, bank]).await;
    (cells, cardinality_spent(dir.path()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_give_the_unsharded_results_exactly() {
    let (rows, seed) = (600, 171);
    let (unsharded, unsharded_spent) = unsharded(rows, seed).await;
    for (s, n) in [(2u32, 1u32), (2, 2), (7, 3), (16, 4)] {
        let label = format!("S = {s}, {n} workers");
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), rows, seed, Some(s), n as usize);
        let bank = f.start_bank().await.unwrap();
        let (platform, workers) = start_platform(&f, &bank, n).await;
        let cells = exact_cells(&f, &bank, &platform, &label, false).await;
        assert_eq!(cells, unsharded, "{label}");
        // Each set of S shard joins is charged once, as unsharded.
        assert_eq!(cardinality_spent(dir.path()), unsharded_spent, "{label}");
        // The workers read their shards; the coordinator never did.
        assert_eq!(platform.shard_reads(), 0, "{label}");
        let reads: Vec<u64> = workers.iter().map(Node::shard_reads).collect();
        let owned: Vec<u64> = (0..n)
            .map(|w| u64::from((0..s).filter(|x| x % n == w).count() as u32))
            .collect();
        assert_eq!(reads, owned, "{label}");
        if s == 7 {
            // The coordinator restarted, the workers still up: its stored
            // set of shard joins names the workers' joins, used again.
            platform.shutdown().await;
            let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
            let again = exact_cells(&f, &bank, &platform, "S = 7, coordinator restarted", true).await;
            let some = vec![unsharded[unsharded.len() - 1].clone()];
            assert_eq!(again, some);
            assert_eq!(cardinality_spent(dir.path()), unsharded_spent, "coordinator restarted");
            // A worker restarted reads its joins back from its state file:
            // no join again.
            let mut workers = workers;
            let w1 = workers.remove(1);
            w1.shutdown().await;
            drop(w1);
            workers.insert(1, f.start_worker(1).await.unwrap());
            let again = exact_cells(&f, &bank, &platform, "S = 7, worker 1 restarted", true).await;
            assert_eq!(again, some);
            assert_eq!(cardinality_spent(dir.path()), unsharded_spent, "worker restarted");
            // A worker whose state is lost has lost its joins: the
            // coordinator finds so before the first batch and joins again
            // (charged again).
            let w1 = workers.remove(1);
            w1.shutdown().await;
            drop(w1);
            std::fs::remove_dir_all(dir.path().join("state").join("platform").join("worker-1")).unwrap();
            workers.insert(1, f.start_worker(1).await.unwrap());
            let again = exact_cells(&f, &bank, &platform, "S = 7, worker 1 lost its state", true).await;
            assert_eq!(again, some);
            let spent = cardinality_spent(dir.path());
            assert_eq!(spent, unsharded_spent + 500_000, "one re-join");
            stop(workers).await;
            stop([platform, bank]).await;
            continue;
        }
        stop(workers).await;
        stop([platform, bank]).await;
    }
}

/// One request on a new stream of a connection made as `cert` (a file name
/// in `certs/`) to `addr` under `name`: the answer, or `None` when the
/// other side closes the connection or the stream.
async fn ask_as(certs: &std::path::Path, cert: &str, addr: SocketAddr, name: &str, m: &Message) -> Option<Message> {
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let id = Identity::load(&certs.join(format!("{cert}.pem")), &certs.join(format!("{cert}.key"))).unwrap();
    let ep = client_endpoint(&id, &ca, &TransportSettings::default()).unwrap();
    let conn = cleanroom_transport::connect(&ep, addr, name).await.ok()?;
    let (mut s, mut r) = conn.open_bi().await.ok()?;
    write_frame(&mut s, m.encode().unwrap(), MAX_MESSAGE_LEN).await.ok()?;
    let _ = s.finish();
    let frame = tokio::time::timeout(Duration::from_secs(20), read_frame(&mut r, MAX_MESSAGE_LEN))
        .await
        .expect("an answer or a close within 20 s");
    match frame {
        Ok(Some(f)) => Some(Message::decode(&f).unwrap()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_on_other_data_and_strangers_are_refused() {
    let (rows, seed) = (400, 172);
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), rows, seed, Some(4), 2);
    let certs = dir.path().join("certs");
    let bank = f.start_bank().await.unwrap();
    f.write_platform_config(bank.local_addr().unwrap()).unwrap();
    // The workers start on other data (the platform's file one user
    // short), the coordinator on the fixture's.
    let csv = dir.path().join("data").join("platform.csv");
    let original = std::fs::read_to_string(&csv).unwrap();
    let mut lines: Vec<&str> = original.lines().collect();
    lines.pop();
    std::fs::write(&csv, lines.join("\n") + "\n").unwrap();
    let mut workers = vec![f.start_worker(0).await.unwrap(), f.start_worker(1).await.unwrap()];
    std::fs::write(&csv, &original).unwrap();
    let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&f, "alice", &bank, &platform);
    let qid = new_query_id().unwrap();
    let (template, params) = demo_queries().remove(0);
    let err = analyst
        .query(template, &params, qid, TIMEOUT)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("its worker ") && err.contains(" failed or could not be reached"),
        "{err}"
    );
    // No join reached the bank.
    assert_eq!(cardinality_spent(dir.path()), 0);
    // The workers restarted on the coordinator's data: the same query id
    // is answered, exactly.
    for w in workers.drain(..) {
        w.shutdown().await;
    }
    let workers = vec![f.start_worker(0).await.unwrap(), f.start_worker(1).await.unwrap()];
    let r = analyst.query(template, &params, qid, TIMEOUT).await.unwrap();
    let t = truth(&f.data, &f.plan(template, &params).unwrap());
    for (c, truth) in r.cells.iter().zip(&t) {
        assert!((c.value - truth).abs() < 0.5, "{}: {} vs {truth}", c.name, c.value);
    }
    assert_eq!(cardinality_spent(dir.path()), 500_000);

    // A worker serves only its coordinator: the coordinator's certificate
    // is answered, an analyst's and the bank's are not.
    let w0 = workers.first().unwrap().local_addr().unwrap();
    let holds = Message::WorkerHolds(WorkerHolds { joins: Vec::new() });
    let name = pki::worker_name("platform", 0);
    assert!(matches!(
        ask_as(&certs, "platform", w0, &name, &holds).await,
        Some(Message::WorkerHolds(_))
    ));
    for stranger in ["analyst-alice", "bank", "platform-worker-1"] {
        assert_eq!(ask_as(&certs, stranger, w0, &name, &holds).await, None, "{stranger}");
    }
    // The bank takes only shard joins and batches from a platform worker:
    // a share check is refused.
    let check = Message::ShareCheck(ShareCheck {
        query_id: qid,
        run: cleanroom_wire::RunId([0; 16]),
    });
    let answer = ask_as(
        &certs,
        "platform-worker-0",
        bank.local_addr().unwrap(),
        &pki::node_name("bank"),
        &check,
    )
    .await;
    assert!(
        matches!(answer, Some(Message::Abort(ref a)) if a.code == AbortCode::Refused),
        "{answer:?}"
    );
    // From the platform itself it is answered.
    let answer = ask_as(
        &certs,
        "platform",
        bank.local_addr().unwrap(),
        &pki::node_name("bank"),
        &check,
    )
    .await;
    assert!(matches!(answer, Some(Message::ShareHeld(_))), "{answer:?}");
    stop(workers).await;
    stop([platform, bank]).await;
}

/// Both nodes with workers: bank worker `w` serves platform worker `w`'s
/// shard joins and batches, asking its coordinator to charge each set and
/// to claim each batch, and hands its batch words to the coordinator,
/// which adds its noise once. Results equal the unsharded nodes'; the bank
/// charges once per set; neither coordinator reads a shard file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_and_platform_workers_give_the_unsharded_results_exactly() {
    let (rows, seed) = (600, 173);
    let (unsharded, unsharded_spent) = unsharded(rows, seed).await;
    for (s, n) in [(2u32, 2u32), (7, 3), (16, 4)] {
        let label = format!("S = {s}, {n} workers on each node");
        let dir = tempfile::tempdir().unwrap();
        let mut f = fixture(dir.path(), rows, seed, Some(s), n as usize);
        let addrs = free_addresses(n as usize + 1);
        f.use_bank_workers(addrs[0], &addrs[1..]).unwrap();
        let bank = f.start_bank().await.unwrap();
        let mut bank_workers = Vec::new();
        for w in 0..n {
            bank_workers.push(f.start_bank_worker(w).await.unwrap());
        }
        let (platform, workers) = start_platform(&f, &bank, n).await;
        let cells = exact_cells(&f, &bank, &platform, &label, false).await;
        assert_eq!(cells, unsharded, "{label}");
        assert_eq!(cardinality_spent(dir.path()), unsharded_spent, "{label}");
        // The workers read their shards (the platform's once per join,
        // the bank's once per join and batch while kept); neither
        // coordinator did.
        assert_eq!((bank.shard_reads(), platform.shard_reads()), (0, 0), "{label}");
        for (w, (b, p)) in bank_workers.iter().zip(&workers).enumerate() {
            let owned = (0..s).filter(|x| x % n == w as u32).count() as u64;
            assert_eq!(
                (b.shard_reads(), p.shard_reads()),
                (owned, owned),
                "{label}, worker {w}"
            );
        }
        if s == 7 {
            // A bank worker restarted reads its joins back from its state
            // file: the cached joins still serve, nothing is charged again.
            let b1 = bank_workers.remove(1);
            b1.shutdown().await;
            drop(b1);
            bank_workers.insert(1, f.start_bank_worker(1).await.unwrap());
            let again = exact_cells(&f, &bank, &platform, "S = 7, bank worker 1 restarted", true).await;
            assert_eq!(again, vec![unsharded[unsharded.len() - 1].clone()]);
            assert_eq!(cardinality_spent(dir.path()), unsharded_spent, "bank worker restarted");
        }
        stop(workers).await;
        stop([platform]).await;
        stop(bank_workers).await;
        stop([bank]).await;
    }
}

/// A worker reached by name (`localhost:port`, resolved when the
/// coordinator dials it) and bound where `[workers] listen` says, as in the
/// Kubernetes manifests: the same exact results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reached_by_name_gives_the_same_results() {
    let (rows, seed) = (300, 174);
    let dir = tempfile::tempdir().unwrap();
    let mut f = fixture(dir.path(), rows, seed, Some(2), 0);
    let port = free_addresses(1)[0].port();
    f.use_workers_at(
        &[format!("localhost:{port}")],
        Some(format!("127.0.0.1:{port}").parse().unwrap()),
    )
    .unwrap();
    let bank = f.start_bank().await.unwrap();
    let (platform, workers) = start_platform(&f, &bank, 1).await;
    exact_cells(&f, &bank, &platform, "a worker by name", true).await;
    assert_eq!(platform.shard_reads(), 0);
    assert_eq!(workers[0].shard_reads(), 2);
    stop(workers).await;
    stop([platform, bank]).await;
}
