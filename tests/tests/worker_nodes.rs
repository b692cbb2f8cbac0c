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
use cleanroom_tests::analyst_of;

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
/// the first and the last only: the analyst's budget holds nine queries of
/// this negligible noise): each cell checked equal to the plaintext truth;
/// the cells.
async fn exact_cells(f: &Fixture, bank: &Node, platform: &Node, label: &str, some: bool) -> Vec<Vec<f64>> {
    let analyst = analyst_of(f, "alice", bank, platform);
    let mut queries = demo_queries();
    queries.push(("grouped", Vec::new()));
    if some {
        queries = vec![queries.remove(0), queries.remove(queries.len() - 1)];
    }
    let mut out = Vec::new();
    for (template, params) in queries {
        let r = analyst
            .query(template, &params, new_query_id().unwrap(), TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{label} {template}: {e}"));
        let t = truth(&f.data, &f.plan(template, &params).unwrap());
        assert!(!t.is_empty() && r.cells.len() >= t.len(), "{label} {template}");
        for (c, truth) in r.cells.iter().zip(&t) {
            assert!(
                c.sigma > 0.0 && c.sigma < 0.2,
                "{label} {template} {}: sd {}",
                c.name,
                c.sigma
            );
            assert!(
                (c.value - truth).abs() < 0.5,
                "{label} {template} {}: {} vs {truth}",
                c.name,
                c.value
            );
        }
        assert!(t.iter().any(|x| *x > 0.0), "{label} {template}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_give_the_unsharded_results_exactly() {
    let (rows, seed) = (600, 171);
    let (unsharded, unsharded_spent) = {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), rows, seed, None, 0);
        let bank = f.start_bank().await.unwrap();
        let (platform, _) = start_platform(&f, &bank, 0).await;
        let cells = exact_cells(&f, &bank, &platform, "unsharded", false).await;
        stop([platform, bank]).await;
        (cells, cardinality_spent(dir.path()))
    };
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
            let some = vec![unsharded[0].clone(), unsharded[unsharded.len() - 1].clone()];
            assert_eq!(again, some);
            assert_eq!(cardinality_spent(dir.path()), unsharded_spent, "coordinator restarted");
            // A worker restarted has lost its joins: the coordinator hears
            // so at the first batch and joins again (charged again).
            let mut workers = workers;
            let w1 = workers.remove(1);
            w1.shutdown().await;
            drop(w1);
            workers.insert(1, f.start_worker(1).await.unwrap());
            let again = exact_cells(&f, &bank, &platform, "S = 7, worker 1 restarted", true).await;
            assert_eq!(again, some);
            let spent = cardinality_spent(dir.path());
            assert!(spent > unsharded_spent, "a re-join is charged: {spent}");
            stop(workers).await;
            stop([platform, bank]).await;
            continue;
        }
        stop(workers).await;
        stop([platform, bank]).await;
    }
}
