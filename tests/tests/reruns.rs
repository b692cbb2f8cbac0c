//! Reruns of an answered query (after the other node lost its share of the
//! run) release the same noisy result again, never a fresh draw of the
//! noise, only over the join and data of the first release, and at most
//! `max_reruns_per_query` times. Both directions, over real QUIC:
//!
//! - a platform acting as the attacker (it colludes with the analyst, so it
//!   knows its own un-noised share of every run) asks the bank again and
//!   again for an aggregate of an answered query id, and fetches the bank's
//!   new share each time as the analyst;
//! - a bank that keeps losing its share (answers "not held") makes the
//!   platform run the query again on every retry of the analyst.
//!
//! `cargo test --locked -p cleanroom-tests --test reruns -- --nocapture`

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cleanroom_client::new_query_id;
use cleanroom_crypto::normalize::NormalizationRules;
use cleanroom_lab::demo::{Fixture, demo_queries};
use cleanroom_node::pump;
use cleanroom_protocol::aggregate::{CellBits, MatcherAggregate};
use cleanroom_protocol::join::{JoinParams, MatcherJoin, MatcherJoined, MatcherPolicy, SetSizeLimits};
use cleanroom_query::Plan;
use cleanroom_tests::analyst_of;
use cleanroom_transport::{Identity, TransportSettings, TrustAnchors, client_endpoint, pki, read_frame, write_frame};
use cleanroom_wire::{AnalystRequest, AnalystResponse, MAX_MESSAGE_LEN, Message, QueryRequest, QueryShare, SessionId};

const TIMEOUT: Duration = Duration::from_secs(120);
const RERUNS: u32 = 20;

/// Both nodes allow `RERUNS` reruns of a query (the default is 2).
fn fixture(dir: &Path, seed: u64) -> Fixture {
    let mut f = Fixture::create(dir, 500, seed, &["alice"]).unwrap();
    f.edit_configs(&[(
        "report_timings = true\n",
        &format!("report_timings = true\nmax_reruns_per_query = {RERUNS}\n"),
    )])
    .unwrap();
    f
}

/// A QUIC connection with one of the fixture's certificates.
async fn connect(certs: &Path, who: &str, to: SocketAddr, node: &str) -> (quinn::Endpoint, quinn::Connection) {
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let id = Identity::load(&certs.join(format!("{who}.pem")), &certs.join(format!("{who}.key"))).unwrap();
    let ep = client_endpoint(&id, &ca, &TransportSettings::default()).unwrap();
    let conn = cleanroom_transport::connect(&ep, to, &pki::node_name(node))
        .await
        .unwrap();
    (ep, conn)
}

async fn send(s: &mut quinn::SendStream, m: &Message) {
    write_frame(s, m.encode().unwrap(), MAX_MESSAGE_LEN).await.unwrap();
}

/// The analyst's query request to the bank alone; its share.
async fn bank_share(alice: &quinn::Connection, req: &QueryRequest) -> QueryShare {
    let (mut s, mut r) = alice.open_bi().await.unwrap();
    send(&mut s, &Message::AnalystRequest(AnalystRequest::Query(req.clone()))).await;
    let _ = s.finish();
    let f = tokio::time::timeout(TIMEOUT, read_frame(&mut r, MAX_MESSAGE_LEN))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match Message::decode(&f).unwrap() {
        Message::AnalystResponse(AnalystResponse::Share(s)) => *s,
        other => panic!("the bank answered {other:?}"),
    }
}

/// A join of the hostile platform with the bank, over `ids`.
async fn join(peer: &quinn::Connection, ids: Vec<Vec<u8>>, context: u8) -> MatcherJoined {
    let m = MatcherJoin::new(
        JoinParams {
            collaboration_id: "demo-bank-platform".into(),
            rules_hash: NormalizationRules::v1("44").hash(),
            context: [context; 32],
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
    let (mut s, mut r) = peer.open_bi().await.unwrap();
    let mut rng = cleanroom_crypto::rng::session_rng().unwrap();
    let (offered, offer) = m.offer(&mut rng).unwrap();
    send(&mut s, &offer).await;
    let accept = read_frame(&mut r, MAX_MESSAGE_LEN).await.unwrap().unwrap();
    let streaming = offered.on_accept(&accept).unwrap();
    pump::run_with_stats(streaming, s, r, Duration::from_secs(60))
        .await
        .unwrap()
        .0
        .finish()
        .unwrap()
}

/// An aggregate of query `qid` over `joined`, as the platform runs it: its
/// un-noised share and OT session, or the bank's abort code.
async fn aggregate(
    peer: &quinn::Connection,
    joined: &MatcherJoined,
    plan: &Plan,
    qid: cleanroom_wire::QueryId,
) -> Result<(Vec<u64>, SessionId), cleanroom_wire::AbortCode> {
    let (mut s, mut r) = peer.open_bi().await.unwrap();
    let mut rng = cleanroom_crypto::rng::session_rng().unwrap();
    let choices = joined.choices_for_block(0);
    let bits = CellBits::new(plan.batch_bits()).unwrap();
    let (waiting, setup) =
        MatcherAggregate::start_with_bits(joined, &choices, bits, qid, plan.digest(), 0, &mut rng).unwrap();
    send(&mut s, &setup).await;
    let answer = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut r, MAX_MESSAGE_LEN))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    if let Ok(Message::Abort(a)) = Message::decode(&answer) {
        return Err(a.code);
    }
    let running = waiting.on_choices(&answer).unwrap();
    let (running, _) = pump::run_with_stats(running, s, r, Duration::from_secs(60))
        .await
        .unwrap();
    let session = running.session();
    Ok((running.finish().unwrap().words().to_vec(), session))
}

/// What the colluders reconstruct: the platform's un-noised share plus the
/// bank's noisy one, cell by cell.
fn reconstructed(mine: &[u64], bank: &QueryShare) -> Vec<i64> {
    assert_eq!(mine.len(), bank.words.len());
    mine.iter()
        .zip(&bank.words)
        .zip(&bank.bits)
        .map(|((a, b), bits)| cleanroom_wire::signed_in_bits(a.wrapping_add(*b), *bits))
        .collect()
}

fn audit_events(state_db: &Path, event: &str) -> i64 {
    let db = rusqlite::Connection::open(state_db).unwrap();
    db.query_row("SELECT COUNT(*) FROM audit WHERE event = ?1", [event], |r| r.get(0))
        .unwrap()
}

/// The platform colludes with the analyst: after a query is answered it
/// opens an aggregate for the same query id again and again, each time
/// fetching the bank's new share as the analyst. Every rerun gives the
/// same reconstructed cells (the bank's noise is fixed with its charge);
/// the ledger does not move; each rerun has its audit entry; a rerun over
/// another join, and one past the cap, are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_that_reruns_an_answered_query_learns_nothing_new() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture(dir.path(), 71);
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let certs = fixture.dir.join("certs");
    let (_pe, peer) = connect(&certs, "platform", bank.local_addr().unwrap(), "bank").await;
    let (_ae, alice) = connect(&certs, "analyst-alice", bank.local_addr().unwrap(), "bank").await;

    // The attacker's join: 300 of the bank's customers and 100 others.
    let mut ids: Vec<Vec<u8>> = bank.holder_ids().unwrap().into_iter().take(300).collect();
    ids.extend((0..100).map(|i| format!("email:ghost{i}@example.com").into_bytes()));
    let joined = join(&peer, ids.clone(), 90).await;

    let (template, params) = demo_queries().remove(1);
    let plan = fixture.plan(template, &params).unwrap();
    let req = QueryRequest {
        query_id: new_query_id().unwrap(),
        template: template.to_string(),
        params,
    };
    // The first run: the analyst asks the bank, the platform runs it.
    let asked = {
        let (alice, req) = (alice.clone(), req.clone());
        tokio::spawn(async move { bank_share(&alice, &req).await })
    };
    let (mine, _) = aggregate(&peer, &joined, &plan, req.query_id).await.unwrap();
    let first_share = asked.await.unwrap();
    let first = reconstructed(&mine, &first_share);
    let charges = bank.charge_count().unwrap();
    let spent = analyst_of(&fixture, "alice", &bank, &platform).budget().await.unwrap();

    let mut last_run = first_share.run;
    for k in 0..RERUNS {
        let (mine, _) = aggregate(&peer, &joined, &plan, req.query_id)
            .await
            .unwrap_or_else(|code| panic!("rerun {k} refused with code {code:?}"));
        // The bank stores the rerun's share a moment after the last batch.
        let t = Instant::now();
        let share = loop {
            let s = bank_share(&alice, &req).await;
            if s.run != last_run {
                break s;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "rerun {k}: no new share stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        last_run = share.run;
        assert_eq!(
            reconstructed(&mine, &share),
            first,
            "rerun {k}: the colluders' reconstruction changed (fresh noise)"
        );
    }
    assert_eq!(bank.charge_count().unwrap(), charges);
    assert_eq!(
        analyst_of(&fixture, "alice", &bank, &platform).budget().await.unwrap(),
        spent
    );
    let bank_db = dir.path().join("state").join("bank").join("state.db");
    assert_eq!(audit_events(&bank_db, "query-rerun"), i64::from(RERUNS));

    // Over another join (the same identifiers joined again): refused, and
    // the stored share stays.
    let other = join(&peer, ids, 91).await;
    assert_ne!(other.session(), joined.session());
    assert_eq!(
        aggregate(&peer, &other, &plan, req.query_id).await.map(|_| ()),
        Err(cleanroom_wire::AbortCode::Refused),
        "a rerun over another join was not refused"
    );
    // Past the cap: refused.
    assert_eq!(
        aggregate(&peer, &joined, &plan, req.query_id).await.map(|_| ()),
        Err(cleanroom_wire::AbortCode::Refused),
        "a rerun past the cap was not refused"
    );
    assert_eq!(bank_share(&alice, &req).await.run, last_run);
    assert_eq!(audit_events(&bank_db, "query-rerun"), i64::from(RERUNS));
    assert_eq!(bank.charge_count().unwrap(), charges);
    platform.shutdown().await;
    bank.shutdown().await;
}

/// The bank loses its share after every answer (as a bank that crashes
/// before storing, or one that answers "not held", looks to the platform):
/// each retry of the analyst makes the platform run the query again. The
/// analyst gets the same cells every time (the platform's noise is fixed
/// with its charge, and so is the bank's), no new charge is made, and past
/// the cap the platform refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_that_keeps_losing_its_share_gets_the_same_platform_noise() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture(dir.path(), 72);
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let (template, params) = demo_queries().remove(1);
    let qid = new_query_id().unwrap();
    let values = |r: &cleanroom_client::QueryResult| r.cells.iter().map(|c| c.value).collect::<Vec<_>>();
    let first = analyst.query(template, &params, qid, TIMEOUT).await.unwrap();
    let bank_db = dir.path().join("state").join("bank").join("state.db");
    let lose = || {
        let db = rusqlite::Connection::open(&bank_db).unwrap();
        let n = db
            .execute(
                "UPDATE charges SET share = NULL, released_at = NULL WHERE query_id = ?1",
                [qid.0.to_vec()],
            )
            .unwrap();
        assert_eq!(n, 1);
    };
    for k in 0..RERUNS {
        lose();
        let again = analyst
            .query(template, &params, qid, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("retry {k}: {e}"));
        assert!(!again.replayed, "retry {k} was not run again");
        assert_eq!(values(&again), values(&first), "retry {k}: fresh noise");
    }
    assert_eq!((bank.charge_count().unwrap(), platform.charge_count().unwrap()), (1, 1));
    let platform_db = dir.path().join("state").join("platform").join("state.db");
    assert_eq!(audit_events(&platform_db, "query-rerun"), i64::from(RERUNS));
    lose();
    let refused = analyst.query(template, &params, qid, TIMEOUT).await;
    assert!(
        matches!(&refused, Err(e) if e.refusal_code() == Some(cleanroom_node::RefusalCode::RerunRefused) && e.to_string().contains("max_reruns_per_query")),
        "a rerun past the cap: {refused:?}"
    );
    platform.shutdown().await;
    bank.shutdown().await;
}

/// A rerun needs the join its first release came from. When the platform
/// no longer has it (expired, or dropped), the rerun is refused before any
/// new join is opened, so the bank's cardinality budget is not charged for
/// a join nothing would use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerun_without_its_join_is_refused_before_joining_again() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture(dir.path(), 74);
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let (template, params) = demo_queries().remove(1);
    let qid = new_query_id().unwrap();
    analyst_of(&fixture, "alice", &bank, &platform)
        .query(template, &params, qid, TIMEOUT)
        .await
        .unwrap();
    platform.shutdown().await;
    drop(platform);
    let state = dir.path().join("state");
    let db = rusqlite::Connection::open(state.join("platform").join("state.db")).unwrap();
    assert_eq!(db.execute("DELETE FROM joins", []).unwrap(), 1);
    drop(db);
    let db = rusqlite::Connection::open(state.join("bank").join("state.db")).unwrap();
    db.execute(
        "UPDATE charges SET share = NULL, released_at = NULL WHERE query_id = ?1",
        [qid.0.to_vec()],
    )
    .unwrap();
    let joins = || -> i64 {
        db.query_row("SELECT COUNT(*) FROM cardinality", [], |r| r.get(0))
            .unwrap()
    };
    let before = joins();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let refused = analyst_of(&fixture, "alice", &bank, &platform)
        .query(template, &params, qid, TIMEOUT)
        .await;
    assert!(
        matches!(&refused, Err(e) if e.refusal_code() == Some(cleanroom_node::RefusalCode::RerunRefused)),
        "{refused:?}"
    );
    assert_eq!(joins(), before, "a join was opened (and charged) for a refused rerun");
    platform.shutdown().await;
    bank.shutdown().await;
}

/// The bank no longer has the join the platform has cached (it expired
/// there, or the bank's cache was lost): the platform's first batch is
/// aborted with `UnknownJoin`, the platform joins again, and its batches
/// over the new join are accepted; the query is answered within noise of
/// the truth, with one more join charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_that_lost_its_join_is_joined_again_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture(dir.path(), 75);
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let (template, params) = demo_queries().remove(1);
    analyst_of(&fixture, "alice", &bank, &platform)
        .query(template, &params, new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    platform.shutdown().await;
    bank.shutdown().await;
    drop((platform, bank));
    let bank_db = dir.path().join("state").join("bank").join("state.db");
    let db = rusqlite::Connection::open(&bank_db).unwrap();
    assert_eq!(db.execute("DELETE FROM joins", []).unwrap(), 1);
    let joins = || -> i64 {
        db.query_row("SELECT COUNT(*) FROM cardinality", [], |r| r.get(0))
            .unwrap()
    };
    let before = joins();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let r = analyst_of(&fixture, "alice", &bank, &platform)
        .query(template, &params, new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("after the bank lost its join: {e}"));
    let truth = cleanroom_sim::oracle::truth(&fixture.data, &fixture.plan(template, &params).unwrap());
    for (c, t) in r.cells.iter().zip(&truth) {
        assert!((c.value - t).abs() <= 6.0 * c.sigma, "{}: {} vs {t}", c.name, c.value);
    }
    assert_eq!(joins(), before + 1);
    platform.shutdown().await;
    bank.shutdown().await;
}

/// A cached join in another encoding (here the layout from before the
/// version byte, on both nodes) is dropped where it is read, not trusted and
/// not fatal: the next query joins again and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_join_in_another_encoding_is_dropped_and_joined_again() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture(dir.path(), 76);
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let (template, params) = demo_queries().remove(1);
    analyst_of(&fixture, "alice", &bank, &platform)
        .query(template, &params, new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    platform.shutdown().await;
    bank.shutdown().await;
    drop((platform, bank));
    let db = |role: &str| rusqlite::Connection::open(dir.path().join("state").join(role).join("state.db")).unwrap();
    for role in ["bank", "platform"] {
        let n = db(role)
            .execute("UPDATE joins SET payload = substr(payload, 2)", [])
            .unwrap();
        assert!(n >= 1, "{role} has no cached join");
    }
    let joins = || -> i64 {
        db("bank")
            .query_row("SELECT COUNT(*) FROM cardinality", [], |r| r.get(0))
            .unwrap()
    };
    let before = joins();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let r = analyst_of(&fixture, "alice", &bank, &platform)
        .query(template, &params, new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("after the cached joins changed encoding: {e}"));
    let truth = cleanroom_sim::oracle::truth(&fixture.data, &fixture.plan(template, &params).unwrap());
    for (c, t) in r.cells.iter().zip(&truth) {
        assert!((c.value - t).abs() <= 6.0 * c.sigma, "{}: {} vs {t}", c.name, c.value);
    }
    assert_eq!(joins(), before + 1);
    platform.shutdown().await;
    bank.shutdown().await;
}
