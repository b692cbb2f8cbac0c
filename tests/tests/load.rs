//! Many analysts at once against a cached join, over real QUIC with mutual
//! TLS: every query is answered or refused with a message, each analyst
//! gets its share of answers, each query id is charged exactly once on each
//! node, and the latencies are reported (`cargo test --locked -p
//! cleanroom-tests --test load -- --nocapture`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cleanroom_client::config::AnalystConfig;
use cleanroom_client::{Analyst, new_query_id};
use cleanroom_client::{ClientError, RefusalCode};
use cleanroom_lab::demo::Fixture;
use cleanroom_node::config::NodeConfig;
use cleanroom_node::pump;
use cleanroom_node::server::Node;
use cleanroom_tests::analyst_of;
use cleanroom_transport::{Identity, TransportSettings, client_endpoint, pki, write_frame};
use cleanroom_wire::{AnalystRequest, AnalystResponse, MAX_MESSAGE_LEN, Message, QueryRequest};

const ANALYSTS: usize = 20;
const QUERIES_EACH: usize = 10;

/// Starts both nodes with every template naming all of `names` (the
/// analyst lists are not part of the signed digests, so no re-signing) and
/// `limits` (TOML lines) added to both nodes' `[limits]`.
async fn start_allowing(fixture: &Fixture, names: &[String], limits: &str) -> (Node, Node) {
    let list = names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
    let allow = |text: String| {
        text.replace("analysts = [\"alice\"]", &format!("analysts = [{list}]"))
            .replace("[limits]\n", &format!("[limits]\n{limits}"))
    };
    let text = std::fs::read_to_string(&fixture.bank_config).unwrap();
    std::fs::write(&fixture.bank_config, allow(text)).unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let first = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    first.shutdown().await;
    let text = std::fs::read_to_string(&fixture.platform_config).unwrap();
    std::fs::write(&fixture.platform_config, allow(text)).unwrap();
    let platform = Node::start(
        NodeConfig::load(&fixture.platform_config).unwrap(),
        &fixture.platform_config,
    )
    .await
    .unwrap();
    (bank, platform)
}

/// A fixture with analyst alice only, both nodes started with `limits`.
async fn alice_alone(limits: &str) -> (tempfile::TempDir, Fixture, Node, Node) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 400, 62, &["alice"]).unwrap();
    let (bank, platform) = start_allowing(&fixture, &["alice".to_string()], limits).await;
    (dir, fixture, bank, platform)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let k = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(k).copied().unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_queries_from_twenty_analysts() {
    let mut names: Vec<String> = vec!["alice".to_string()];
    names.extend((1..ANALYSTS).map(|i| format!("analyst{i:02}")));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 400, 61, &refs).unwrap();
    // Every template names all twenty analysts (the analyst lists are not
    // part of the signed digests).
    let (bank, platform) = start_allowing(&fixture, &names, "").await;
    let analysts: Vec<Arc<Analyst>> = names
        .iter()
        .map(|n| Arc::new(analyst_of(&fixture, n, &bank, &platform)))
        .collect();
    // Warm the join once, so the load is on the cached join.
    analysts[0]
        .query("overlap", &[], new_query_id().unwrap(), Duration::from_secs(120))
        .await
        .unwrap();
    let charged_before = (bank.charge_count().unwrap(), platform.charge_count().unwrap());

    let rss_before = cleanroom_tests::rss_mib();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (a, analyst) in analysts.iter().enumerate() {
        for _ in 0..QUERIES_EACH {
            let analyst = analyst.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                let r = analyst
                    .query("overlap", &[], new_query_id().unwrap(), Duration::from_secs(300))
                    .await;
                (a, t.elapsed().as_secs_f64(), r)
            }));
        }
    }
    let mut answered = vec![0usize; ANALYSTS];
    let mut refused = Vec::new();
    let mut latencies = Vec::new();
    for t in tasks {
        let (a, secs, r) = t.await.unwrap();
        latencies.push(secs);
        match r {
            Ok(result) => {
                assert!(!result.cells.is_empty());
                answered[a] += 1;
            }
            Err(ClientError::Refused(m)) => refused.push(m),
            Err(e) => panic!("analyst {a}: not a clean answer: {e}"),
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let rss_after = cleanroom_tests::rss_mib();
    println!(
        "test process (both nodes and 20 analysts) RSS {rss_before:.0} MiB before the load, {rss_after:.0} MiB after"
    );
    assert!(
        rss_after - rss_before < 256.0,
        "memory grew by {} MiB",
        rss_after - rss_before
    );
    latencies.sort_by(f64::total_cmp);
    println!(
        "{} queries from {ANALYSTS} analysts: {} answered, {} refused, wall {wall:.2} s, latency p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        ANALYSTS * QUERIES_EACH,
        answered.iter().sum::<usize>(),
        refused.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    // Within every limit: all answered, every analyst fully served.
    assert!(refused.is_empty(), "refused: {refused:?}");
    assert!(answered.iter().all(|n| *n == QUERIES_EACH), "per analyst: {answered:?}");
    // Each query id charged once on each node: no charge lost, none doubled.
    let total = (ANALYSTS * QUERIES_EACH) as u64;
    assert_eq!(
        (bank.charge_count().unwrap(), platform.charge_count().unwrap()),
        (charged_before.0 + total, charged_before.1 + total)
    );
    platform.shutdown().await;
    bank.shutdown().await;
}

/// One analyst fires 40 queries at once while another runs 3: the greedy
/// one gets at most `max_queries_in_flight_per_analyst` (16) running per
/// node and the rest refused at once with a message naming the limit (no
/// charge); the other analyst is fully served meanwhile. The greedy
/// analyst then retries its refused ids one by one: each query id ends up
/// charged exactly once on each node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greedy_analyst_is_capped_and_the_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 400, 62, &["alice", "greedy"]).unwrap();
    let (bank, platform) = start_allowing(&fixture, &["alice".to_string(), "greedy".to_string()], "").await;
    let analyst = |n: &str| Arc::new(analyst_of(&fixture, n, &bank, &platform));
    let (alice, greedy) = (analyst("alice"), analyst("greedy"));
    alice
        .query("overlap", &[], new_query_id().unwrap(), Duration::from_secs(120))
        .await
        .unwrap();

    let ids: Vec<cleanroom_wire::QueryId> = (0..40).map(|_| new_query_id().unwrap()).collect();
    let flood: Vec<_> = ids
        .iter()
        .map(|qid| {
            let (g, qid) = (greedy.clone(), *qid);
            tokio::spawn(async move { g.query("overlap", &[], qid, Duration::from_secs(120)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    for _ in 0..3 {
        alice
            .query("overlap", &[], new_query_id().unwrap(), Duration::from_secs(120))
            .await
            .unwrap();
    }
    let alice_secs = t.elapsed().as_secs_f64();
    let mut refused = Vec::new();
    let mut answered = 0;
    for (f, qid) in flood.into_iter().zip(&ids) {
        match f.await.unwrap() {
            Ok(_) => answered += 1,
            Err(ClientError::Refused(m)) => {
                // Refused by the cap on one node, and then dropped by the
                // other (which had accepted it).
                assert!(
                    matches!(m.code, RefusalCode::TooManyQueries | RefusalCode::PeerRefused),
                    "{m:?}"
                );
                refused.push(*qid);
            }
            Err(e) => panic!("not a clean answer: {e}"),
        }
    }
    println!(
        "greedy analyst: 40 at once, {answered} answered, {} refused by the per-analyst cap; the other analyst's 3 queries took {alice_secs:.2} s meanwhile",
        refused.len()
    );
    assert!(!refused.is_empty(), "the cap never applied");
    // Each node applies its cap on its own, so the two may admit different
    // subsets and none of the 40 may get both halves at once; what must
    // hold is that all are served on retry (below), charged once each.
    assert!(alice_secs < 30.0, "the other analyst waited {alice_secs} s");
    for qid in &refused {
        greedy
            .query("overlap", &[], *qid, Duration::from_secs(120))
            .await
            .unwrap();
    }
    // 1 + 3 for alice, 40 for greedy: each id once on each node.
    assert_eq!(
        (bank.charge_count().unwrap(), platform.charge_count().unwrap()),
        (44, 44)
    );
    platform.shutdown().await;
    bank.shutdown().await;
}

/// A client endpoint with `cfg`'s analyst certificate.
fn endpoint_of(cfg: &AnalystConfig) -> quinn::Endpoint {
    let id = Identity::load(&cfg.identity.cert, &cfg.identity.key).unwrap();
    client_endpoint(
        &id,
        &cfg.identity.trust_anchors().unwrap(),
        &TransportSettings::default(),
    )
    .unwrap()
}

/// Sends `overlap` under `qid` to one node only, as `cfg`'s analyst, on its
/// own connection, and closes that connection, unanswered, when told to
/// by `leave` (or when its sender is dropped).
async fn ask_and_leave(
    cfg: &AnalystConfig,
    role: &str,
    node: std::net::SocketAddr,
    qid: cleanroom_wire::QueryId,
    leave: tokio::sync::oneshot::Receiver<()>,
) {
    let ep = endpoint_of(cfg);
    let conn = cleanroom_transport::connect(&ep, node, &pki::node_name(role))
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let request = Message::AnalystRequest(AnalystRequest::Query(QueryRequest {
        query_id: qid,
        template: "overlap".into(),
        params: Vec::new(),
    }));
    write_frame(&mut send, request.encode().unwrap(), MAX_MESSAGE_LEN)
        .await
        .unwrap();
    let _ = send.finish();
    let _ = leave.await;
    conn.close(0u32.into(), b"gone");
    ep.wait_idle().await;
}

/// Whether `conn` answers a budget request (within 10 s) on a stream of
/// its own: the node has admitted it.
async fn served_budget(conn: &quinn::Connection) -> bool {
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return false;
    };
    if pump::write_one(&mut send, &Message::AnalystRequest(AnalystRequest::Budget))
        .await
        .is_err()
    {
        return false;
    }
    let _ = send.finish();
    let answer = pump::read_one(&mut recv, Duration::from_secs(10)).await;
    matches!(
        answer.map(|frame| Message::decode(&frame)),
        Ok(Ok(Message::AnalystResponse(AnalystResponse::Budget(_))))
    )
}

/// Waits up to `limit` for `cond`; whether it held.
async fn until(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Waits up to `limit` for `node` to have `n` queries in flight; returns
/// how long it took, or `None`.
async fn in_flight_reaches(node: &Node, n: u32, limit: Duration) -> Option<f64> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if node.queries_in_flight() == n {
            return Some(t.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// An analyst who goes away while its query waits frees the query's slot
/// at once (it stays charged): on the bank, a query the platform never
/// started (sent to the bank only); on the platform, a query queued behind
/// another one (which holds the platform's turn for up to 30 s, waiting
/// for the bank's answer about a query the bank never received). Without
/// this, the slots stayed taken until the bank's `query_timeout` (120 s)
/// and the platform's 30 s wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyst_who_goes_away_frees_its_slot_at_once() {
    let (_dir, fixture, bank, platform) = alice_alone("").await;
    let cfg = Arc::new(
        fixture
            .analyst("alice", bank.local_addr().unwrap(), platform.local_addr().unwrap())
            .unwrap(),
    );
    let alice = Analyst::new(&cfg).unwrap();
    // The join is cached by a first query.
    alice
        .query("overlap", &[], new_query_id().unwrap(), Duration::from_secs(120))
        .await
        .unwrap();

    // Each analyst leaves only once the test has seen its query where it
    // should be (a fixed delay raced the node's admission and charge under
    // load).
    let ask = |role: &'static str, node: &Node| {
        let (cfg, addr) = (cfg.clone(), node.local_addr().unwrap());
        let (leave, told) = tokio::sync::oneshot::channel();
        let asking = tokio::spawn(async move {
            ask_and_leave(&cfg, role, addr, new_query_id().unwrap(), told).await;
        });
        (asking, leave)
    };
    // Bank: admitted, charged, waiting for the platform; the analyst leaves.
    let (gone, leave) = ask("bank", &bank);
    assert!(in_flight_reaches(&bank, 1, Duration::from_secs(30)).await.is_some());
    leave.send(()).unwrap();
    gone.await.unwrap();
    let bank_secs = in_flight_reaches(&bank, 0, Duration::from_secs(10)).await;
    println!("bank: the abandoned query's slot freed {bank_secs:?} s after its analyst left");
    assert!(bank_secs.is_some_and(|s| s < 2.0), "{bank_secs:?}");

    // Platform: the first holds the platform's turn (for up to 30 s); the
    // second queues behind it and its analyst leaves.
    let (first, first_leaves) = ask("platform", &platform);
    assert!(until(Duration::from_secs(20), || platform.turns() == (true, 0)).await);
    let (queued, leave) = ask("platform", &platform);
    assert!(until(Duration::from_secs(20), || platform.turns() == (true, 1)).await);
    assert_eq!(platform.queries_in_flight(), 2);
    leave.send(()).unwrap();
    queued.await.unwrap();
    let platform_secs = in_flight_reaches(&platform, 1, Duration::from_secs(10)).await;
    println!("platform: the queued query's slot freed {platform_secs:?} s after its analyst left");
    assert!(platform_secs.is_some_and(|s| s < 2.0), "{platform_secs:?}");
    first_leaves.send(()).unwrap();
    first.await.unwrap();

    // Charged: the first query on both; the bank's abandoned one on the
    // bank; the platform's two on the platform (each charged before its
    // turn).
    assert_eq!((bank.charge_count().unwrap(), platform.charge_count().unwrap()), (2, 3));
    platform.shutdown().await;
    bank.shutdown().await;
}

/// One analyst's certificate cannot hold more than
/// `max_connections_per_analyst` connections open to a node (8 here): the
/// next is closed at once with code 5, and once one closes a new one is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyst_cannot_open_more_than_its_connections() {
    let (_dir, fixture, bank, platform) = alice_alone("max_connections_per_analyst = 8\n").await;
    let cfg = fixture
        .analyst("alice", bank.local_addr().unwrap(), platform.local_addr().unwrap())
        .unwrap();
    let ep = endpoint_of(&cfg);
    let bank_name = pki::node_name("bank");
    let mut open = Vec::new();
    for _ in 0..8 {
        let conn = cleanroom_transport::connect(&ep, bank.local_addr().unwrap(), &bank_name)
            .await
            .unwrap();
        // The node counts a connection when its side of the handshake ends,
        // which can come after the client's: wait until this one is served,
        // so the ninth is the one over the cap.
        assert!(served_budget(&conn).await, "an admitted connection was not served");
        open.push(conn);
    }
    let ninth = cleanroom_transport::connect(&ep, bank.local_addr().unwrap(), &bank_name)
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), ninth.closed()).await;
    match closed {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(u64::from(c.error_code), 5);
            println!("ninth connection closed: {}", String::from_utf8_lossy(&c.reason));
        }
        other => panic!("the ninth connection was not closed by the cap: {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        open.iter().all(|c| c.close_reason().is_none()),
        "an admitted connection was closed"
    );
    // The analyst's client (a new connection per request) is refused too...
    let alice = Analyst::new(&cfg).unwrap();
    assert!(alice.budget().await.is_err());
    // ... until one closes.
    // (The node frees the slot when it sees the close: a few attempts cover
    // a slow scheduler.)
    open.pop().unwrap().close(0u32.into(), b"done");
    let mut served = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Ok(budget) = alice.budget().await {
            served = Some(budget.len());
            break;
        }
    }
    assert_eq!(served, Some(2), "no connection was served after one closed");
    platform.shutdown().await;
    bank.shutdown().await;
}

/// An analyst sending requests faster than
/// `max_requests_per_analyst_per_second` (1 here, bursts of 2) is refused
/// with a message for the excess, and served again once it slows down.
/// (At one per second the 30 requests would have to take 17 s for fewer
/// than 10 to be refused, so a loaded machine does not fail the test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyst_over_its_request_rate_is_refused_then_served() {
    let (_dir, fixture, bank, platform) = alice_alone("max_requests_per_analyst_per_second = 1\n").await;
    let alice = analyst_of(&fixture, "alice", &bank, &platform);
    let t = Instant::now();
    let (mut served, mut refused) = (0u32, 0u32);
    for _ in 0..30 {
        match alice.budget().await {
            Ok(_) => served += 1,
            Err(ClientError::Refused(m)) if m.code == RefusalCode::RateLimited => refused += 1,
            Err(e) => panic!("not a rate refusal: {e}"),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!("30 budget requests in {secs:.2} s: {served} served, {refused} refused by the rate limit");
    // Each call asks both nodes: at most the burst plus the refill passes.
    assert!(f64::from(served) <= 2.0 + secs + 1.0, "{served} served in {secs} s");
    assert!(served >= 2 && refused >= 10, "{served} served, {refused} refused");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    alice.budget().await.unwrap();
    platform.shutdown().await;
    bank.shutdown().await;
}

/// Over its request rate, an analyst cannot hold streams open: a stream
/// whose request frame does not come ends after the short over-rate wait
/// (`Timeouts::over_rate_request`, 2 s), not the 30 s request timeout.
/// (Only a query under a held admission is served over the rate, and its
/// frame comes at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_over_the_rate_without_its_request_ends_soon() {
    let (_dir, fixture, bank, platform) = alice_alone("max_requests_per_analyst_per_second = 1\n").await;
    let cfg = fixture
        .analyst("alice", bank.local_addr().unwrap(), platform.local_addr().unwrap())
        .unwrap();
    let ep = endpoint_of(&cfg);
    let conn = cleanroom_transport::connect(&ep, bank.local_addr().unwrap(), &pki::node_name("bank"))
        .await
        .unwrap();
    // Spend the burst (2) and then some.
    for _ in 0..4 {
        let _ = served_budget(&conn).await;
    }
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // Half a length prefix: the node sees the stream, never a whole frame.
    send.write_all(&[8, 0]).await.unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let ended = tokio::time::timeout(Duration::from_secs(20), recv.read(&mut buf)).await;
    let took = t.elapsed();
    println!(
        "a stream over the rate without its request ended after {:.2} s",
        took.as_secs_f64()
    );
    assert!(ended.is_ok(), "the stream was still open after 20 s");
    assert!(took < Duration::from_secs(10), "{took:?}");
    conn.close(0u32.into(), b"done");
    platform.shutdown().await;
    bank.shutdown().await;
}
