//! Shards in the nodes (issue 16), over real QUIC on loopback: both nodes
//! split their identifiers into `S` shards by the shared shard key, every
//! query runs one join per shard and one aggregate batch per shard and
//! platform group, and each node adds its shards' shares before its noise.
//!
//! Exactness: the templates' ρ is made so large that every cell's noise has
//! σ < 0.2 (checked on the reported σ), so a cell is off the un-noised sum
//! by one or more with probability below 1e-10; every cell must then equal
//! the plaintext truth (`cleanroom_sim::oracle::truth`), for S in
//! {1, 2, 7, 16}, grouped by a platform column and not.

use std::time::Duration;

use cleanroom_client::new_query_id;
use cleanroom_lab::demo::{Fixture, demo_queries};
use cleanroom_sim::oracle::truth;
use cleanroom_tests::{analyst_of, assert_cells_exact};

const TIMEOUT: Duration = Duration::from_secs(120);

/// A query grouped by the platform's segment (three platform groups) and
/// the bank's category.
const GROUPED_SQL: &str = "SELECT b.category, p.segment, COUNT(DISTINCT b.customer) AS customers, COUNT(*) AS n, \
     SUM(b.amount) AS spend FROM bank b JOIN platform p \
     WHERE b.category IN ('groceries', 'restaurants', 'fuel') AND p.segment IN ('messenger_active', 'gamer', 'casual') \
     GROUP BY b.category, p.segment";

/// The fixture's text edits: noise made negligible, and the `[shards]`
/// section (`None`: none at all).
fn edits(shards: Option<u32>) -> Vec<(String, String)> {
    let mut e = vec![
        (
            "rho_per_analyst = \"20\"".to_string(),
            "rho_per_analyst = \"10000000000000\"".to_string(),
        ),
        ("rho = \"0.1\"".to_string(), "rho = \"1000000000000\"".to_string()),
        ("rho = \"1\"".to_string(), "rho = \"1000000000000\"".to_string()),
        // A spend cell's noise scales with its clip.
        ("spend_cents = 50000".to_string(), "spend_cents = 2000".to_string()),
    ];
    if let Some(s) = shards {
        let key = if s >= 2 { "key = \"certs/shard.key\"\n" } else { "" };
        e.push((
            "[limits]".to_string(),
            format!("[shards]\ncount = {s}\n{key}\n[limits]"),
        ));
    }
    e
}

/// [`edits`] for `s >= 2` shards with a memory budget of 0: no shard stays
/// in memory, so every join and batch reads its shard's file.
fn edits_keeping_no_shard(s: u32) -> Vec<(String, String)> {
    let mut e = edits(Some(s));
    e.push((
        "key = \"certs/shard.key\"\n".into(),
        "key = \"certs/shard.key\"\nmemory_budget = \"0\"\n".into(),
    ));
    e
}

/// Creates a fixture of `rows` customers and users (seed `seed`) with the
/// grouped template and `edits`.
fn fixture(dir: &std::path::Path, rows: usize, seed: u64, edits: &[(String, String)]) -> Fixture {
    let mut f = Fixture::create(dir, rows, seed, &["alice"]).unwrap();
    f.add_sql_template("grouped", GROUPED_SQL, "alice").unwrap();
    let e: Vec<(&str, &str)> = edits.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    f.edit_configs(&e).unwrap();
    f
}

/// Every demo query and the grouped one: each cell's value, checked equal
/// to the plaintext truth; and the shard files each node read back (bank,
/// platform).
async fn exact_cells_and_reads(f: &Fixture, label: &str) -> (Vec<Vec<f64>>, (u64, u64)) {
    let bank = f.start_bank().await.unwrap();
    let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(f, "alice", &bank, &platform);
    let mut queries = demo_queries();
    queries.push(("grouped", Vec::new()));
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
    let reads = (bank.shard_reads(), platform.shard_reads());
    platform.shutdown().await;
    bank.shutdown().await;
    (out, reads)
}

async fn exact_cells(f: &Fixture, label: &str) -> Vec<Vec<f64>> {
    exact_cells_and_reads(f, label).await.0
}

/// The bank's cardinality ε spent (millionths), from its state file.
fn cardinality_spent(dir: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(dir.join("state").join("bank").join("state.db")).unwrap();
    db.query_row("SELECT COALESCE(SUM(eps_micro), 0) FROM cardinality", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_nodes_give_the_unsharded_results_exactly() {
    let (rows, seed) = (800, 161);
    let (unsharded, unsharded_spent) = {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), rows, seed, &edits(None));
        (exact_cells(&f, "unsharded").await, cardinality_spent(dir.path()))
    };
    // Queries with the same platform conditions share a cached join.
    assert!(unsharded_spent >= 2 * 500_000, "{unsharded_spent}");
    for s in [1u32, 2, 7, 16] {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), rows, seed, &edits(Some(s)));
        let (cells, reads) = exact_cells_and_reads(&f, &format!("S = {s}")).await;
        assert_eq!(cells, unsharded, "S = {s}");
        // Under the default budget each node reads each shard's file once
        // and keeps it (unsharded: none).
        let files = if s >= 2 { u64::from(s) } else { 0 };
        assert_eq!(reads, (files, files), "S = {s}");
        // As many joins as unsharded: each set of S shard joins is charged
        // the cardinality ε once.
        assert_eq!(cardinality_spent(dir.path()), unsharded_spent, "S = {s}");
        if s == 7 {
            // Restarted, both nodes read their stored shard joins back (the
            // platform its set per filter, the bank each shard's by
            // session): the same cells, and no join is charged again.
            let again = exact_cells(&f, "S = 7, restarted").await;
            assert_eq!(again, unsharded, "S = 7, restarted");
            assert_eq!(cardinality_spent(dir.path()), unsharded_spent, "S = 7, restarted");
        }
    }
}

/// Sharded nodes whose input is a Parquet file, then a PostgreSQL table
/// (issue 17's sources stream into the same split): every cell exact
/// against the plaintext truth of the same synthetic data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_nodes_reading_parquet_and_postgres_are_exact() {
    let (rows, seed) = (500, 162);
    let dir = tempfile::tempdir().unwrap();
    let mut f = fixture(dir.path(), rows, seed, &edits(Some(4)));
    f.use_parquet().unwrap();
    exact_cells(&f, "S = 4, Parquet").await;
    if let Err(e) = cleanroom_lab::pg::binaries() {
        assert!(
            std::env::var("CLEANROOM_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "CLEANROOM_REQUIRE_POSTGRES=1: {e}"
        );
        eprintln!("SKIPPED the PostgreSQL half: {e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut f = fixture(dir.path(), rows, seed, &edits(Some(4)));
    // The server's setup is synchronous.
    let pg = tokio::task::block_in_place(|| {
        let pg = cleanroom_lab::pg::TempPostgres::start().unwrap();
        f.use_postgres(&pg).unwrap();
        pg
    });
    exact_cells(&f, "S = 4, PostgreSQL").await;
    tokio::task::block_in_place(|| drop(pg));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_read_from_their_files_each_time_give_the_same_results() {
    // With a memory budget of 0, no shard stays in memory: every shard join
    // and every aggregate batch reads its shard's file again.
    let (rows, seed, s) = (500, 88, 5u32);
    let unsharded = {
        let dir = tempfile::tempdir().unwrap();
        exact_cells(&fixture(dir.path(), rows, seed, &edits(None)), "unsharded").await
    };
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), rows, seed, &edits_keeping_no_shard(s));
    let (cells, (bank_reads, platform_reads)) = exact_cells_and_reads(&f, "budget 0").await;
    assert_eq!(cells, unsharded);
    // The platform reads each shard once per join, the bank once per
    // shard join and once per aggregate batch (at least one per shard and
    // query); each join is one charge of ε = 0.5.
    let joins = u64::try_from(cardinality_spent(dir.path()) / 500_000).unwrap();
    assert!(joins >= 2, "{joins}");
    let s = u64::from(s);
    assert_eq!(platform_reads, joins * s);
    assert!(bank_reads >= joins * s + 5 * s, "{bank_reads}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_file_damaged_under_a_running_node_fails_the_query_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), 300, 12, &edits_keeping_no_shard(3));
    let shard_file = dir
        .path()
        .join("state")
        .join("bank")
        .join("shards")
        .join("shard-00000.crs");
    let (template, params) = demo_queries().remove(0);
    let truth_cells = truth(&f.data, &f.plan(template, &params).unwrap());
    {
        let bank = f.start_bank().await.unwrap();
        let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
        let analyst = analyst_of(&f, "alice", &bank, &platform);
        // Damaged after the node wrote it: refused when the join reads it
        // (shard 0's join is the set's first, so nothing is charged yet).
        let mut bytes = std::fs::read(&shard_file).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        std::fs::write(&shard_file, &bytes).unwrap();
        let spent = cardinality_spent(dir.path());
        let t = std::time::Instant::now();
        let r = analyst.query(template, &params, new_query_id().unwrap(), TIMEOUT).await;
        let e = r.expect_err("a query over a damaged shard file must fail").to_string();
        // At once (the bank aborts the join), not at a timeout, and saying
        // nothing of the data.
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}: {e}", t.elapsed());
        assert!(!e.contains("example"), "{e}");
        // The bank refused before its cardinality charge.
        assert_eq!(cardinality_spent(dir.path()), spent);
        platform.shutdown().await;
        bank.shutdown().await;
    }
    // A restart splits the input again: the same query then runs.
    let bank = f.start_bank().await.unwrap();
    let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&f, "alice", &bank, &platform);
    let r = analyst
        .query(template, &params, new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    for (c, t) in r.cells.iter().zip(&truth_cells) {
        assert!((c.value - t).abs() < 0.5, "{}: {} vs {t}", c.name, c.value);
    }
    platform.shutdown().await;
    bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_file_damaged_after_the_join_fails_the_aggregate_cleanly() {
    // Budget 0: every aggregate batch reads its shard's file again.
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), 300, 14, &edits_keeping_no_shard(3));
    let shard_file = dir
        .path()
        .join("state")
        .join("bank")
        .join("shards")
        .join("shard-00002.crs");
    let (template, params) = demo_queries().remove(0);
    let truth_cells = truth(&f.data, &f.plan(template, &params).unwrap());
    let bank = f.start_bank().await.unwrap();
    let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&f, "alice", &bank, &platform);
    let exact = |r: &cleanroom_client::QueryResult| {
        for (c, t) in r.cells.iter().zip(&truth_cells) {
            assert!((c.value - t).abs() < 0.5, "{}: {} vs {t}", c.name, c.value);
        }
    };
    exact(
        &analyst
            .query(template, &params, new_query_id().unwrap(), TIMEOUT)
            .await
            .unwrap(),
    );
    let spent = cardinality_spent(dir.path());
    let good = std::fs::read(&shard_file).unwrap();
    let mut bad = good.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x04;
    std::fs::write(&shard_file, &bad).unwrap();
    // The same query again runs on the cached join: shard 2's batch fails
    // when it reads the file, and so does the query (no share of fewer
    // shards is released).
    let t = std::time::Instant::now();
    let r = analyst.query(template, &params, new_query_id().unwrap(), TIMEOUT).await;
    assert!(r.is_err(), "a query whose shard file is damaged must fail");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    // No new join, so no new cardinality charge.
    assert_eq!(cardinality_spent(dir.path()), spent);
    // The file put back, the next query is answered by the same nodes.
    std::fs::write(&shard_file, &good).unwrap();
    exact(
        &analyst
            .query(template, &params, new_query_id().unwrap(), TIMEOUT)
            .await
            .unwrap(),
    );
    platform.shutdown().await;
    bank.shutdown().await;
    // The shard directory is the node user's only; a start without shards
    // deletes it (no copy of the input is left behind).
    let shards_dir = shard_file.parent().unwrap().to_path_buf();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&shards_dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
    let mut f = f;
    f.edit_configs(&[("count = 3", "count = 1")]).unwrap();
    let bank = f.start_bank().await.unwrap();
    assert!(!shards_dir.exists());
    bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_split_differently_refuse_to_join() {
    for (bank_edit, platform_edit, what) in [
        (Some(2u32), Some(4u32), "counts differ"),
        (Some(3), None, "the platform does not shard"),
        (None, Some(3), "the bank does not shard"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), 300, 7, &edits(platform_edit));
        // The bank's config, edited apart (and signed again).
        let text = std::fs::read_to_string(&f.bank_config).unwrap();
        let mut bank_text = text.replace("[shards]\ncount = 4\nkey = \"certs/shard.key\"\n\n", "");
        bank_text = bank_text.replace("[shards]\ncount = 3\nkey = \"certs/shard.key\"\n\n", "");
        if let Some(s) = bank_edit {
            bank_text = bank_text.replace(
                "[limits]",
                &format!("[shards]\ncount = {s}\nkey = \"certs/shard.key\"\n\n[limits]"),
            );
        }
        std::fs::write(&f.bank_config, bank_text).unwrap();
        let bank = f.start_bank().await.unwrap();
        let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
        let analyst = analyst_of(&f, "alice", &bank, &platform);
        let e = analyst
            .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
            .await
            .expect_err(what);
        assert!(e.to_string().contains("ended the session"), "{what}: {e}");
        // Nothing was charged for a join that never ran.
        assert_eq!(cardinality_spent(dir.path()), 0, "{what}");
        platform.shutdown().await;
        bank.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_shard_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path(), 300, 8, &edits(Some(2)));
    // The platform's operator has another key.
    let other = dir.path().join("certs").join("other-shard.key");
    std::fs::write(&other, format!("{}\n", "ab".repeat(32))).unwrap();
    let mut f = f;
    f.edit_configs(&[("key = \"certs/shard.key\"", "key = \"certs/other-shard.key\"")])
        .unwrap();
    // ...and the bank keeps its own.
    let text = std::fs::read_to_string(&f.bank_config).unwrap();
    std::fs::write(
        &f.bank_config,
        text.replace("key = \"certs/other-shard.key\"", "key = \"certs/shard.key\""),
    )
    .unwrap();
    let bank = f.start_bank().await.unwrap();
    let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&f, "alice", &bank, &platform);
    let e = analyst
        .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
        .await
        .expect_err("another shard key");
    assert!(e.to_string().contains("ended the session"), "{e}");
    assert_eq!(cardinality_spent(dir.path()), 0);
    platform.shutdown().await;
    bank.shutdown().await;
}

#[test]
fn a_shard_key_file_that_is_not_64_hex_digits_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (text, ok) in [
        ("00".repeat(32), true),
        ("0".repeat(63), false),
        ("zz".repeat(32), false),
        (String::new(), false),
    ] {
        let p = dir.path().join("k");
        std::fs::write(&p, &text).unwrap();
        let r = cleanroom_node::shards::load_key(&p);
        assert_eq!(r.is_ok(), ok, "{text:?}");
        if let Err(e) = r {
            let m = e.to_string();
            assert!(
                m.contains("64 hex digits") && !m.contains(&text) || text.is_empty(),
                "{m}"
            );
        }
    }
    // `cleanroom certs` writes one, once.
    assert!(cleanroom_node::shards::init_key(dir.path()).unwrap().is_some());
    assert!(cleanroom_node::shards::init_key(dir.path()).unwrap().is_none());
    cleanroom_node::shards::load_key(&dir.path().join(cleanroom_node::shards::KEY_FILE)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_sharded_nodes() {
    let run = |shards| cleanroom_lab::bench::BenchOptions {
        sizes: vec![600],
        seed: 17,
        overlap: 0.5,
        categories: 3,
        path: None,
        repeat: 1,
        queries: 1,
        shards,
        node_processes: None,
        key_slots: 1,
        workers: Vec::new(),
    };
    let one = cleanroom_lab::bench::run(&run(1), |_, _, _| {}).await.unwrap();
    let four = cleanroom_lab::bench::run(&run(4), |_, _, _| {}).await.unwrap();
    let (one, four) = (&one[0], &four[0]);
    assert_eq!((one.shards, four.shards), (1, 4));
    // Each shard's join has its own dummy rows, so the bank sends more
    // rows (and tokens) than unsharded: at least D_max more per extra shard.
    let d_max = cleanroom_crypto::dp::ShiftedTruncatedLaplace::new(1, 2, 1_000_000)
        .unwrap()
        .d_max();
    assert!(
        four.join.bank_to_platform_bytes >= one.join.bank_to_platform_bytes + 3 * d_max * 32,
        "{} vs {}",
        four.join.bank_to_platform_bytes,
        one.join.bank_to_platform_bytes
    );
    // Both nodes report their join's phases.
    for node in ["bank", "platform"] {
        assert!(
            four.phases
                .iter()
                .any(|p| p.node == node && p.phase.label() == "join" && p.seconds > 0.0),
            "{node}"
        );
    }
}

mod hostile {
    //! A peer with the platform's certificate sends the bank shard headers
    //! that do not fit its split: each is refused with an abort before the
    //! bank charges or sends anything of its own, a second join of a shard
    //! of a set is refused after the first, and the real platform's queries
    //! still run.

    use super::*;
    use cleanroom_crypto::normalize::NormalizationRules;
    use cleanroom_protocol::join::{JoinParams, MatcherJoin, MatcherPolicy, SetSizeLimits};
    use cleanroom_protocol::queries::shard_join_context;
    use cleanroom_transport::{
        Identity, TransportSettings, TrustAnchors, client_endpoint, pki, read_frame, write_frame,
    };
    use cleanroom_wire::{AbortCode, MAX_MESSAGE_LEN, Message, OtSetup, QueryId, SessionId, ShardBatch, ShardJoin};

    /// A join offer of 40 made-up users under `context`.
    fn offer(context: [u8; 32]) -> Message {
        offered(context).1
    }

    /// The same, with the matcher's state after it.
    fn offered(context: [u8; 32]) -> (cleanroom_protocol::join::MatcherOffered, Message) {
        let ids: Vec<Vec<u8>> = (0..40)
            .map(|i| format!("email:ghost{i}@example.com").into_bytes())
            .collect();
        let m = MatcherJoin::new(
            JoinParams {
                collaboration_id: "demo-bank-platform".into(),
                rules_hash: NormalizationRules::v1("44").hash(),
                context,
                chunk_points: 250,
            },
            MatcherPolicy {
                peer_set: SetSizeLimits { min: 0, max: 1 << 30 },
                max_dummy_rows: 4096,
                block_padding: None,
            },
            ids,
        )
        .unwrap();
        let mut rng = cleanroom_crypto::rng::session_rng().unwrap();
        m.offer(&mut rng).unwrap()
    }

    fn setup(join: SessionId) -> Message {
        setup_for(join, QueryId([0x32; 16]), 0)
    }

    fn setup_for(join: SessionId, query_id: QueryId, group: u32) -> Message {
        Message::OtSetup(OtSetup {
            session: SessionId([0x31; 16]),
            join_session: join,
            query_id,
            nonce: [0x33; 32],
            rows: 100,
            width: 1,
            plan: [0x34; 32],
            group,
            base_point: [0; 32],
        })
    }

    /// Sends `frames` on a new stream; the bank's first answer.
    async fn answer(conn: &quinn::Connection, frames: &[Message]) -> Option<Message> {
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        for m in frames {
            // The bank may refuse on a first frame and stop the stream
            // before the next is written: its answer is what counts.
            if write_frame(&mut s, m.encode().unwrap(), MAX_MESSAGE_LEN).await.is_err() {
                break;
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut r, MAX_MESSAGE_LEN)).await {
            Ok(Ok(Some(f))) => Some(Message::decode(&f).unwrap()),
            Ok(_) => None,
            Err(_) => panic!("the bank did not answer within 30 s"),
        }
    }

    fn refused(m: Option<Message>, code: AbortCode, what: &str) {
        match m {
            Some(Message::Abort(a)) => assert_eq!(a.code, code, "{what}"),
            other => panic!("{what}: expected an abort, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn headers_that_do_not_fit_the_split_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), 300, 9, &edits(Some(2)));
        let bank = f.start_bank().await.unwrap();
        let certs = dir.path().join("certs");
        let (_, key_id) = cleanroom_node::shards::load_key(&certs.join("shard.key")).unwrap();
        let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
        let id = Identity::load(&certs.join("platform.pem"), &certs.join("platform.key")).unwrap();
        let ep = client_endpoint(&id, &ca, &TransportSettings::default()).unwrap();
        let conn = cleanroom_transport::connect(&ep, bank.local_addr().unwrap(), &pki::node_name("bank"))
            .await
            .unwrap();
        let base = [7u8; 32];
        let header = |shards, shard, key: [u8; 32], set: [u8; 16]| {
            Message::ShardJoin(ShardJoin {
                shards,
                shard,
                shard_key_id: key,
                set,
                base_context: base,
            })
        };
        let good_offer = |s| offer(shard_join_context(&base, 2, s));
        let set = [1u8; 16];
        refused(
            answer(&conn, &[offer([0; 32])]).await,
            AbortCode::Refused,
            "a plain offer to a sharded bank",
        );
        refused(
            answer(
                &conn,
                &[header(3, 0, key_id, set), offer(shard_join_context(&base, 3, 0))],
            )
            .await,
            AbortCode::Refused,
            "another shard count",
        );
        refused(
            answer(&conn, &[header(2, 0, [9; 32], set), good_offer(0)]).await,
            AbortCode::Refused,
            "another shard key",
        );
        refused(
            answer(&conn, &[header(2, 0, key_id, set), good_offer(1)]).await,
            AbortCode::Refused,
            "the context of another shard",
        );
        refused(
            answer(&conn, &[header(2, 0, key_id, set), setup(SessionId([0; 16]))]).await,
            AbortCode::BadMessage,
            "no offer after the header",
        );
        assert_eq!(cardinality_spent(dir.path()), 0);
        // A fitting shard join is accepted and charged...
        match answer(&conn, &[header(2, 1, key_id, set), good_offer(1)]).await {
            Some(Message::JoinAccept(_)) => {}
            other => panic!("expected an accept, got {other:?}"),
        }
        assert_eq!(cardinality_spent(dir.path()), 500_000);
        // ...the other shard of the set is not charged again...
        match answer(&conn, &[header(2, 0, key_id, set), good_offer(0)]).await {
            Some(Message::JoinAccept(_)) => {}
            other => panic!("expected an accept, got {other:?}"),
        }
        assert_eq!(cardinality_spent(dir.path()), 500_000);
        // ...and a second look at a shard of the set is refused.
        refused(
            answer(&conn, &[header(2, 1, key_id, set), good_offer(1)]).await,
            AbortCode::Refused,
            "a second join of a shard of a set",
        );
        assert_eq!(cardinality_spent(dir.path()), 500_000);
        // Batches: a plain setup, and a header whose list does not hold
        // the setup's join at its shard.
        let (a, b) = (SessionId([0x41; 16]), SessionId([0x42; 16]));
        refused(
            answer(&conn, &[setup(a)]).await,
            AbortCode::Refused,
            "a plain setup to a sharded bank",
        );
        let batch = |shard, joins: Vec<SessionId>| {
            Message::ShardBatch(ShardBatch {
                shards: 2,
                shard,
                joins,
            })
        };
        refused(
            answer(&conn, &[batch(1, vec![a, b]), setup(a)]).await,
            AbortCode::Refused,
            "a setup whose join is another shard's in its list",
        );
        refused(
            answer(
                &conn,
                &[
                    batch(0, vec![a, b]),
                    Message::ShardBatch(ShardBatch {
                        shards: 2,
                        shard: 0,
                        joins: vec![a, b],
                    }),
                ],
            )
            .await,
            AbortCode::BadMessage,
            "no setup after the header",
        );
        // The real platform still runs its queries.
        let platform = f.start_platform(bank.local_addr().unwrap()).await.unwrap();
        let analyst = analyst_of(&f, "alice", &bank, &platform);
        let r = analyst
            .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
            .await
            .unwrap();
        let t = truth(&f.data, &f.plan("overlap", &[]).unwrap());
        assert!((r.cells[0].value - t[0]).abs() < 0.5);
        platform.shutdown().await;
        bank.shutdown().await;
    }

    /// Runs a whole join of shard `shard` of 2 with the bank (the bank
    /// stores it); its session.
    async fn whole_shard_join(conn: &quinn::Connection, key_id: [u8; 32], base: [u8; 32], shard: u32) -> SessionId {
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        let header = Message::ShardJoin(ShardJoin {
            shards: 2,
            shard,
            shard_key_id: key_id,
            set: [0x77; 16],
            base_context: base,
        });
        let (offered, offer) = offered(shard_join_context(&base, 2, shard));
        for m in [header, offer] {
            write_frame(&mut s, m.encode().unwrap(), MAX_MESSAGE_LEN).await.unwrap();
        }
        let accept = read_frame(&mut r, MAX_MESSAGE_LEN).await.unwrap().unwrap();
        let mut streaming = offered.on_accept(&accept).unwrap();
        let session = streaming.session();
        loop {
            while let Some(m) = streaming.poll_transmit() {
                write_frame(&mut s, m.encode().unwrap(), MAX_MESSAGE_LEN).await.unwrap();
            }
            if streaming.is_done() {
                break;
            }
            let f = read_frame(&mut r, MAX_MESSAGE_LEN).await.unwrap().unwrap();
            streaming.handle(&f).unwrap();
        }
        session
    }

    /// An analyst's `overlap` query sent to the bank alone: it registers
    /// there and waits for the platform's batches; its answer.
    fn query_at_bank(
        dir: &std::path::Path,
        bank: std::net::SocketAddr,
        qid: QueryId,
    ) -> tokio::task::JoinHandle<Message> {
        let certs = dir.join("certs");
        tokio::spawn(async move {
            let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
            let id = Identity::load(&certs.join("analyst-alice.pem"), &certs.join("analyst-alice.key")).unwrap();
            let ep = client_endpoint(&id, &ca, &TransportSettings::default()).unwrap();
            let conn = cleanroom_transport::connect(&ep, bank, &pki::node_name("bank"))
                .await
                .unwrap();
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            let q = Message::AnalystRequest(cleanroom_wire::AnalystRequest::Query(cleanroom_wire::QueryRequest {
                query_id: qid,
                template: "overlap".into(),
                params: Vec::new(),
            }));
            write_frame(&mut s, q.encode().unwrap(), MAX_MESSAGE_LEN).await.unwrap();
            let _ = s.finish();
            let f = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut r, MAX_MESSAGE_LEN))
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            Message::decode(&f).unwrap()
        })
    }

    /// Batches of a query the bank accepted: one for a group the plan does
    /// not have (it would alias the next shard's batch), and one whose join
    /// is a stored join of another shard (its customers would be summed
    /// under the wrong shard); each is refused, and so is the query.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_out_of_their_shard_or_group_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = fixture(dir.path(), 300, 10, &edits(Some(2)));
        let bank = f.start_bank().await.unwrap();
        let addr = bank.local_addr().unwrap();
        // The real platform shows the bank its signed templates (and runs
        // a query), then stops.
        let platform = f.start_platform(addr).await.unwrap();
        let analyst = analyst_of(&f, "alice", &bank, &platform);
        analyst
            .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
            .await
            .unwrap();
        platform.shutdown().await;
        let certs = dir.path().join("certs");
        let (_, key_id) = cleanroom_node::shards::load_key(&certs.join("shard.key")).unwrap();
        let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
        let id = Identity::load(&certs.join("platform.pem"), &certs.join("platform.key")).unwrap();
        let ep = client_endpoint(&id, &ca, &TransportSettings::default()).unwrap();
        let conn = cleanroom_transport::connect(&ep, addr, &pki::node_name("bank"))
            .await
            .unwrap();
        let base = [8u8; 32];
        let j1 = whole_shard_join(&conn, key_id, base, 1).await;
        let other = SessionId([0x55; 16]);
        let batch = |shard, joins: Vec<SessionId>| {
            Message::ShardBatch(ShardBatch {
                shards: 2,
                shard,
                joins,
            })
        };
        // "overlap" has one platform group: group 1 does not exist.
        let qid = QueryId([0x71; 16]);
        let waiting = query_at_bank(dir.path(), addr, qid);
        refused(
            answer(&conn, &[batch(0, vec![other, j1]), setup_for(other, qid, 1)]).await,
            AbortCode::Refused,
            "a group the plan does not have",
        );
        match waiting.await.unwrap() {
            Message::AnalystResponse(cleanroom_wire::AnalystResponse::Refused(_)) => {}
            other => panic!("the query was not refused: {other:?}"),
        }
        // Shard 1's stored join, named as shard 0's.
        let qid = QueryId([0x72; 16]);
        let waiting = query_at_bank(dir.path(), addr, qid);
        refused(
            answer(&conn, &[batch(0, vec![j1, other]), setup_for(j1, qid, 0)]).await,
            AbortCode::Refused,
            "another shard's join",
        );
        match waiting.await.unwrap() {
            Message::AnalystResponse(cleanroom_wire::AnalystResponse::Refused(_)) => {}
            other => panic!("the query was not refused: {other:?}"),
        }
        bank.shutdown().await;
    }
}
