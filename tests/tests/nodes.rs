//! End-to-end tests over real QUIC on loopback with real certificates: two
//! nodes, an analyst, and peers and clients that should be refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cleanroom_client::{Analyst, new_query_id};
use cleanroom_client::{ClientError, RefusalCode};
use cleanroom_lab::demo::{Fixture, demo_queries};
use cleanroom_node::server::Node;
use cleanroom_sim::oracle::truth;
use cleanroom_tests::analyst_of;
use cleanroom_transport::{Identity, TransportSettings, TrustAnchors, client_endpoint, pki, read_frame, write_frame};
use cleanroom_wire::{AnalystRequest, AnalystResponse, MAX_MESSAGE_LEN, Message, QueryRequest};
use rustls::pki_types::pem::PemObject;

const TIMEOUT: Duration = Duration::from_secs(120);

struct Pair {
    fixture: Fixture,
    bank: Node,
    platform: Node,
    _dir: tempfile::TempDir,
}

impl Pair {
    fn bank_addr(&self) -> SocketAddr {
        self.bank.local_addr().unwrap()
    }
    fn platform_addr(&self) -> SocketAddr {
        self.platform.local_addr().unwrap()
    }
    fn analyst(&self, name: &str) -> Analyst {
        Analyst::new(
            &self
                .fixture
                .analyst(name, self.bank_addr(), self.platform_addr())
                .unwrap(),
        )
        .unwrap()
    }
}

/// Starts the platform (which writes and signs its config), stops it, edits
/// its config (without signing again: the edits here change no template
/// digest) and starts it again.
async fn platform_with(fixture: &Fixture, bank: &Node, edit: impl Fn(String) -> String) -> Node {
    let first = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    first.shutdown().await;
    let text = std::fs::read_to_string(&fixture.platform_config).unwrap();
    std::fs::write(&fixture.platform_config, edit(text)).unwrap();
    Node::start(
        cleanroom_node::config::NodeConfig::load(&fixture.platform_config).unwrap(),
        &fixture.platform_config,
    )
    .await
    .unwrap()
}

async fn pair(rows: usize, seed: u64, analysts: &[&str]) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), rows, seed, analysts).unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    Pair {
        fixture,
        bank,
        platform,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_templates_are_within_their_noise_of_the_truth() {
    for seed in [11, 12, 13] {
        let p = pair(1500, seed, &["alice"]).await;
        let analyst = p.analyst("alice");
        for (template, params) in demo_queries() {
            let r = analyst
                .query(template, &params, new_query_id().unwrap(), TIMEOUT)
                .await
                .unwrap_or_else(|e| panic!("seed {seed} {template}: {e}"));
            let t = truth(&p.fixture.data, &p.fixture.plan(template, &params).unwrap());
            assert_eq!(r.cells.len(), t.len(), "{template}");
            let mut shown = 0;
            for (c, truth) in r.cells.iter().zip(&t) {
                assert!(c.sigma > 0.0);
                // A cell's value is within 6 sigma of the truth, whether shown or not.
                assert!(
                    (c.value - truth).abs() <= 6.0 * c.sigma,
                    "seed {seed} {template} {}: {} vs {truth} (sd {})",
                    c.name,
                    c.value,
                    c.sigma
                );
                if c.suppressed.is_none() {
                    shown += 1;
                    assert!(c.low < c.value && c.value < c.high);
                }
            }
            assert!(shown > 0, "{template}: every cell suppressed");
        }
        p.platform.shutdown().await;
        p.bank.shutdown().await;
    }
}

/// Sends one raw analyst request with the given client identity.
async fn raw_request(
    identity: &Identity,
    ca: &TrustAnchors,
    addr: SocketAddr,
    server_name: &str,
    msg: Message,
) -> Result<Message, String> {
    let ep = client_endpoint(identity, ca, &TransportSettings::default()).map_err(|e| e.to_string())?;
    let conn = cleanroom_transport::connect(&ep, addr, server_name)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, msg.encode().unwrap(), MAX_MESSAGE_LEN)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let f = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv, MAX_MESSAGE_LEN))
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("stream ended")?;
    Message::decode(&f).map_err(|e| e.to_string())
}

/// The collaboration CA in `certs` as a plain rustls root store (for
/// clients built by hand, outside the transport crate).
fn ca_roots(certs: &std::path::Path) -> rustls::RootCertStore {
    let mut r = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(certs.join("ca.pem")).unwrap() {
        r.add(c.unwrap()).unwrap();
    }
    r
}

/// The refusal's text, after checking its code: tests tell refusals apart by
/// code; the text is checked where what it says is the point.
fn refused_with<T>(r: Result<T, ClientError>, code: RefusalCode) -> String {
    match r {
        Ok(_) => panic!("not refused"),
        Err(e) => {
            assert_eq!(e.refusal_code(), Some(code), "{e}");
            e.to_string()
        }
    }
}

fn templates_request() -> Message {
    Message::AnalystRequest(AnalystRequest::Templates)
}

fn budget_request() -> Message {
    Message::AnalystRequest(AnalystRequest::Budget)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_wrong_roles_are_refused() {
    let p = pair(300, 21, &["alice", "bob"]).await;
    let certs = p.fixture.dir.join("certs");
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let alice = Identity::load(&certs.join("analyst-alice.pem"), &certs.join("analyst-alice.key")).unwrap();
    let bank_name = pki::node_name("bank");

    // alice, with her certificate: accepted.
    let ok = raw_request(&alice, &ca, p.bank_addr(), &bank_name, templates_request())
        .await
        .unwrap();
    assert!(matches!(ok, Message::AnalystResponse(AnalystResponse::Templates(ref t)) if t.len() == 3));

    // No client certificate at all.
    {
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(ca_roots(&certs))
            .with_no_client_auth();
        tls.alpn_protocols = vec![cleanroom_transport::ALPN.to_vec()];
        let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
        let outcome = async {
            let conn = ep
                .connect(p.bank_addr(), &bank_name)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            // With TLS 1.3 the refusal may only show on the first stream operation.
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_frame(&mut send, templates_request().encode().unwrap(), MAX_MESSAGE_LEN)
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            read_frame(&mut recv, MAX_MESSAGE_LEN)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("ended".to_string())
        };
        let r = tokio::time::timeout(Duration::from_secs(20), outcome).await.unwrap();
        assert!(r.is_err(), "a client without a certificate was answered");
    }

    // A certificate from another CA (trusting the right CA for the server).
    let other = tempfile::tempdir().unwrap();
    pki::init(other.path(), &["alice".to_string()], 2).unwrap();
    let forged = Identity::load(
        &other.path().join("analyst-alice.pem"),
        &other.path().join("analyst-alice.key"),
    )
    .unwrap();
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        raw_request(&forged, &ca, p.bank_addr(), &bank_name, templates_request()),
    )
    .await
    .unwrap();
    assert!(r.is_err(), "a certificate from another CA was answered");

    // An analyst certificate acting as a peer: the bank treats the connection
    // as an analyst's and refuses protocol messages on it.
    let mut rng = cleanroom_crypto::rng::session_rng().unwrap();
    let fake = cleanroom_protocol::join::MatcherJoin::new(
        cleanroom_protocol::join::JoinParams {
            collaboration_id: "demo-bank-platform".into(),
            rules_hash: cleanroom_crypto::normalize::NormalizationRules::v1("44").hash(),
            context: [0; 32],
            chunk_points: 1024,
        },
        cleanroom_protocol::join::MatcherPolicy {
            peer_set: cleanroom_protocol::join::SetSizeLimits { min: 0, max: 1 << 30 },
            max_dummy_rows: 4096,
            block_padding: None,
        },
        vec![b"email:x@y.com".to_vec()],
    )
    .unwrap();
    let (_, offer) = fake.offer(&mut rng).unwrap();
    let r = raw_request(&alice, &ca, p.bank_addr(), &bank_name, offer)
        .await
        .unwrap();
    assert!(
        matches!(r, Message::AnalystResponse(AnalystResponse::Refused(_))),
        "{r:?}"
    );

    // bob holds a valid certificate of the collaboration but is in no
    // template: the node does not accept his connection.
    let bob = p.analyst("bob");
    let e = bob.templates().await.unwrap_err();
    assert!(matches!(e, ClientError::Node { .. }), "{e}");
    // alice asking for a template that does not exist, or with a bad parameter:
    // refused with a message that says what to change.
    let alice_client = p.analyst("alice");
    let e = refused_with(
        alice_client.query("nope", &[], new_query_id().unwrap(), TIMEOUT).await,
        RefusalCode::UnknownTemplate,
    );
    assert!(e.contains("no template named \"nope\""), "{e}");
    let bad = vec![
        ("start".to_string(), "2025-01-01".to_string()),
        ("end".to_string(), "2026-01-31".to_string()),
    ];
    let e = refused_with(
        alice_client
            .query("spend_by_category", &bad, new_query_id().unwrap(), TIMEOUT)
            .await,
        RefusalCode::BadParameters,
    );
    assert!(e.contains("must be within the template's window"), "{e}");
    assert_eq!(p.bank.charge_count().unwrap(), 0);
    assert_eq!(p.platform.charge_count().unwrap(), 0);
    p.platform.shutdown().await;
    p.bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disallowed_analyst_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 300, 31, &["alice", "carol"]).unwrap();
    // carol may run `overlap` only, on both nodes.
    let cfg = &fixture.bank_config;
    let text = std::fs::read_to_string(cfg).unwrap();
    std::fs::write(
        cfg,
        text.replacen("analysts = [\"alice\"]", "analysts = [\"alice\", \"carol\"]", 1),
    )
    .unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = platform_with(&fixture, &bank, |t| {
        t.replacen("analysts = [\"alice\"]", "analysts = [\"alice\", \"carol\"]", 1)
    })
    .await;
    let carol = analyst_of(&fixture, "carol", &bank, &platform);
    let params = vec![
        ("start".to_string(), "2026-01-01".to_string()),
        ("end".to_string(), "2026-01-31".to_string()),
    ];
    let e = refused_with(
        carol
            .query("spend_by_category", &params, new_query_id().unwrap(), TIMEOUT)
            .await,
        RefusalCode::UnknownTemplate,
    );
    assert!(
        e.contains("analyst \"carol\" is not allowed to run template \"spend_by_category\""),
        "{e}"
    );
    let ok = carol
        .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(ok.cells.len(), 1);
    platform.shutdown().await;
    bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_query_is_charged_once_and_a_retry_costs_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 400, 41, &["alice"]).unwrap();
    // The bank gives up on a query after 3 s.
    let text = std::fs::read_to_string(&fixture.bank_config).unwrap();
    std::fs::write(
        &fixture.bank_config,
        text.replace("[limits]\n", "[limits]\nquery_timeout_secs = 3\n"),
    )
    .unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let certs = fixture.dir.join("certs");
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let alice = Identity::load(&certs.join("analyst-alice.pem"), &certs.join("analyst-alice.key")).unwrap();
    let qid = new_query_id().unwrap();
    // The query reaches only the bank (as if the analyst lost the platform
    // mid-way): the bank charges, waits, and fails the query cleanly.
    let req = Message::AnalystRequest(AnalystRequest::Query(QueryRequest {
        query_id: qid,
        template: "overlap".into(),
        params: vec![],
    }));
    let r = raw_request(&alice, &ca, bank.local_addr().unwrap(), &pki::node_name("bank"), req)
        .await
        .unwrap();
    let Message::AnalystResponse(AnalystResponse::Refused(m)) = r else {
        panic!("{r:?}")
    };
    assert_eq!(m.code, RefusalCode::Failed);
    assert!(m.message.contains("costs no extra budget"), "{m}");
    assert_eq!(bank.charge_count().unwrap(), 1);
    // The retry with the same id runs on both nodes; nothing is charged twice.
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let r = analyst.query("overlap", &[], qid, TIMEOUT).await.unwrap();
    assert_eq!(r.cells.len(), 1);
    assert_eq!(bank.charge_count().unwrap(), 1);
    assert_eq!(platform.charge_count().unwrap(), 1);
    platform.shutdown().await;
    bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_disconnects_mid_join_leaves_the_bank_healthy() {
    let p = pair(600, 51, &["alice"]).await;
    let certs = p.fixture.dir.join("certs");
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let platform_id = Identity::load(&certs.join("platform.pem"), &certs.join("platform.key")).unwrap();
    // A platform that opens a join, sends its key and one chunk, and vanishes.
    {
        let ep = client_endpoint(&platform_id, &ca, &TransportSettings::default()).unwrap();
        let conn = cleanroom_transport::connect(&ep, p.bank_addr(), &pki::node_name("bank"))
            .await
            .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let ids: Vec<Vec<u8>> = (0..2000)
            .map(|i| format!("email:ghost{i}@example.com").into_bytes())
            .collect();
        let m = cleanroom_protocol::join::MatcherJoin::new(
            cleanroom_protocol::join::JoinParams {
                collaboration_id: "demo-bank-platform".into(),
                rules_hash: cleanroom_crypto::normalize::NormalizationRules::v1("44").hash(),
                context: [3; 32],
                chunk_points: 500,
            },
            cleanroom_protocol::join::MatcherPolicy {
                peer_set: cleanroom_protocol::join::SetSizeLimits { min: 0, max: 1 << 30 },
                max_dummy_rows: 4096,
                block_padding: None,
            },
            ids,
        )
        .unwrap();
        let mut rng = cleanroom_crypto::rng::session_rng().unwrap();
        let (offered, offer) = m.offer(&mut rng).unwrap();
        write_frame(&mut send, offer.encode().unwrap(), MAX_MESSAGE_LEN)
            .await
            .unwrap();
        let accept = read_frame(&mut recv, MAX_MESSAGE_LEN).await.unwrap().unwrap();
        let mut streaming = offered.on_accept(&accept).unwrap();
        for _ in 0..2 {
            let m = streaming.poll_transmit().unwrap();
            write_frame(&mut send, m.encode().unwrap(), MAX_MESSAGE_LEN)
                .await
                .unwrap();
        }
        conn.close(0u32.into(), b"gone");
        ep.wait_idle().await;
    }
    // The bank still serves a full query through the real platform.
    let analyst = p.analyst("alice");
    let r = analyst
        .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    let truth = truth(&p.fixture.data, &p.fixture.plan("overlap", &[]).unwrap());
    assert!((r.cells[0].value - truth[0]).abs() <= 6.0 * r.cells[0].sigma);
    p.platform.shutdown().await;
    p.bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_returns_the_same_stored_share() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 500, 61, &["alice"]).unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let (template, params) = demo_queries().remove(1);
    let qid = new_query_id().unwrap();
    let first = analyst.query(template, &params, qid, TIMEOUT).await.unwrap();
    assert!(!first.replayed);
    platform.shutdown().await;
    bank.shutdown().await;
    drop((platform, bank));

    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let again = analyst.query(template, &params, qid, TIMEOUT).await.unwrap();
    assert!(again.replayed);
    let values = |r: &cleanroom_client::QueryResult| r.cells.iter().map(|c| c.value).collect::<Vec<_>>();
    assert_eq!(
        values(&first),
        values(&again),
        "a retried query id must not draw fresh noise"
    );
    assert_eq!(bank.charge_count().unwrap(), 1);
    assert_eq!(platform.charge_count().unwrap(), 1);
    // A new id is a new query: fresh noise, a new charge.
    let other = analyst
        .query(template, &params, new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    assert_ne!(values(&first), values(&other));
    assert_eq!(bank.charge_count().unwrap(), 2);
    platform.shutdown().await;
    bank.shutdown().await;
}

/// Leaves a node's state file as a SIGKILL between its charge and its
/// store of `qid` would have: the charge without its share, and the audit
/// log without the entry written with the share (its last one; the node
/// recreates the trigger at start).
fn lose_share(state_db: &std::path::Path, qid: &cleanroom_wire::QueryId) {
    let db = rusqlite::Connection::open(state_db).unwrap();
    let n = db
        .execute(
            "UPDATE charges SET share = NULL, released_at = NULL WHERE query_id = ?1",
            [qid.0.to_vec()],
        )
        .unwrap();
    assert_eq!(n, 1);
    let last: String = db
        .query_row("SELECT event FROM audit ORDER BY seq DESC LIMIT 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(last, "query");
    db.execute_batch(
        "DROP TRIGGER audit_append_only_delete; DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit);",
    )
    .unwrap();
}

/// One node charged a query and stopped before storing its share (the
/// charge and the share are separate transactions), while the other stored
/// its share: a retry under the same id runs the aggregate again on both,
/// the node that kept the old share replaces it, and the analyst gets the
/// same result as the first time (each node's noise is fixed with its
/// charge), never a sum of shares from two runs; no new charge on either
/// side. Both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_one_node_lost_is_computed_again_by_both_without_a_new_charge() {
    for lost in ["platform", "bank"] {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Fixture::create(dir.path(), 500, 63, &["alice"]).unwrap();
        let bank = fixture.start_bank().await.unwrap();
        let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
        let (template, params) = demo_queries().remove(1);
        let qid = new_query_id().unwrap();
        let first = analyst_of(&fixture, "alice", &bank, &platform)
            .query(template, &params, qid, TIMEOUT)
            .await
            .unwrap();
        platform.shutdown().await;
        bank.shutdown().await;
        drop((platform, bank));
        lose_share(&dir.path().join("state").join(lost).join("state.db"), &qid);

        let bank = fixture.start_bank().await.unwrap();
        let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
        let analyst = analyst_of(&fixture, "alice", &bank, &platform);
        let again = analyst
            .query(template, &params, qid, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{lost} lost its share: {e}"));
        let t = truth(&fixture.data, &fixture.plan(template, &params).unwrap());
        for (c, truth) in again.cells.iter().zip(&t) {
            assert!(
                (c.value - truth).abs() <= 6.0 * c.sigma,
                "{lost} lost its share; {}: {} vs {truth} (sd {})",
                c.name,
                c.value,
                c.sigma
            );
        }
        // The same noise on both nodes (fixed with each charge) over the
        // same join: the very same result, not a fresh draw.
        assert_eq!(
            first.cells.iter().map(|c| c.value).collect::<Vec<_>>(),
            again.cells.iter().map(|c| c.value).collect::<Vec<_>>(),
            "{lost} lost its share: the rerun drew fresh noise"
        );
        assert_eq!((bank.charge_count().unwrap(), platform.charge_count().unwrap()), (1, 1));
        // From now on the pair is consistent: a further retry is a replay
        // of exactly the same result.
        let third = analyst.query(template, &params, qid, TIMEOUT).await.unwrap();
        assert!(third.replayed, "{lost}");
        assert_eq!(
            again.cells.iter().map(|c| c.value).collect::<Vec<_>>(),
            third.cells.iter().map(|c| c.value).collect::<Vec<_>>()
        );
        assert_eq!((bank.charge_count().unwrap(), platform.charge_count().unwrap()), (1, 1));
        platform.shutdown().await;
        bank.shutdown().await;
    }
}

/// The bank's operator changes a template's ρ (its own setting, not part of
/// the signed digest) while a query id is charged but not yet released
/// there: the retry completes with the noise, audit entry and share of the
/// ρ that was charged; a new query id is charged the new ρ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_charged_before_a_change_of_rho_completes_at_the_charged_rho() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 500, 64, &["alice"]).unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let qid = new_query_id().unwrap();
    analyst_of(&fixture, "alice", &bank, &platform)
        .query("overlap", &[], qid, TIMEOUT)
        .await
        .unwrap();
    platform.shutdown().await;
    bank.shutdown().await;
    drop((platform, bank));
    lose_share(&dir.path().join("state").join("bank").join("state.db"), &qid);
    let text = std::fs::read_to_string(&fixture.bank_config).unwrap();
    let changed = text.replace(
        "name = \"overlap\"\nkind = \"overlap\"\nrho = \"0.1\"",
        "name = \"overlap\"\nkind = \"overlap\"\nrho = \"0.2\"",
    );
    assert_ne!(text, changed);
    std::fs::write(&fixture.bank_config, changed).unwrap();

    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let again = analyst.query("overlap", &[], qid, TIMEOUT).await.unwrap();
    let rho_of =
        |r: &cleanroom_client::QueryResult| r.rho.iter().find(|(n, _)| n == "bank").map(|(_, v)| v.clone()).unwrap();
    assert_eq!(rho_of(&again), "0.1");
    let fresh = analyst
        .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(rho_of(&fresh), "0.2");
    // 0.1 + 0.2 on the bank's ledger.
    let budget = analyst.budget().await.unwrap();
    let bank_spent = budget.iter().find(|b| b.node == "bank").unwrap().rho_spent_micro;
    assert_eq!(bank_spent, 300_000);
    platform.shutdown().await;
    bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_budget_is_refused_with_when_it_frees_up() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 300, 71, &["alice"]).unwrap();
    // The platform allows alice rho 0.15 per period: one overlap run (0.1), not two.
    let bank = fixture.start_bank().await.unwrap();
    let platform = platform_with(&fixture, &bank, |t| {
        t.replace("rho_per_analyst = \"20\"", "rho_per_analyst = \"0.15\"")
    })
    .await;
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    analyst
        .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    let e = refused_with(
        analyst.query("overlap", &[], new_query_id().unwrap(), TIMEOUT).await,
        RefusalCode::BudgetExhausted,
    );
    assert!(e.contains("budget exhausted on the platform node"), "{e}");
    assert!(e.contains("0.1 of 0.15 is spent") && e.contains("frees up on"), "{e}");
    let budget = analyst.budget().await.unwrap();
    assert!(
        budget
            .iter()
            .any(|b| b.node == "platform" && b.rho_spent_micro == 100_000 && b.rho_limit_micro == 150_000)
    );
    platform.shutdown().await;
    bank.shutdown().await;
}

/// A platform GROUP BY whose filters leave no group (`p.segment = 'gamer'
/// AND p.segment IN ('casual')`) has no output cell: both nodes refuse it
/// when they bind it, before any charge. (With share widths and no cell,
/// the bank failed after the charge: its noise and widths had no cell for
/// the one batch's share.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_by_filtered_to_nothing_is_refused_before_the_charge() {
    let dir = tempfile::tempdir().unwrap();
    let mut fixture = Fixture::create(dir.path(), 300, 83, &["alice"]).unwrap();
    let sql = "SELECT p.segment, COUNT(DISTINCT b.customer) AS customers FROM bank b JOIN platform p \
               WHERE p.segment = 'gamer' AND p.segment IN ('casual') GROUP BY p.segment";
    fixture.add_sql_template("nothing", sql, "alice").unwrap();
    // No platform user matches: with the platform's minimum input at 0, the
    // refusal can only be the empty plan's.
    fixture
        .edit_configs(&[("[limits]\n", "[limits]\nmin_input_set = 0\n")])
        .unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let qid = new_query_id().unwrap();
    let e = refused_with(
        analyst.query("nothing", &[], qid, TIMEOUT).await,
        RefusalCode::BadParameters,
    );
    assert!(e.contains("no output cell"), "{e}");
    assert!(!bank.is_charged(&qid).unwrap() && !platform.is_charged(&qid).unwrap());
    platform.shutdown().await;
    bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_party_group_by_in_sql_is_within_noise_of_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let mut fixture = Fixture::create(dir.path(), 1200, 81, &["alice"]).unwrap();
    let sql = "SELECT b.category, p.segment, COUNT(DISTINCT b.customer) AS customers, COUNT(*) AS n, \
               SUM(b.amount) AS spend, AVG(b.amount) AS avg_amount FROM bank b JOIN platform p \
               WHERE b.category IN ('groceries', 'restaurants', 'fuel') AND p.segment IN ('messenger_active', 'gamer', 'casual') \
               AND b.amount < 500 GROUP BY b.category, p.segment";
    fixture.add_sql_template("adhoc", sql, "alice").unwrap();
    // A query the dialect refuses never becomes a template.
    let e = fixture
        .add_sql_template("bad", "SELECT p.email FROM bank b JOIN platform p", "alice")
        .unwrap_err();
    assert!(e.to_string().contains("identifier column"), "{e}");
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let r = analyst
        .query("adhoc", &[], new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    let plan = fixture.plan("adhoc", &[]).unwrap();
    assert_eq!(plan.matcher_groups().len(), 3);
    assert_eq!(plan.holder_groups().len(), 3);
    let t = truth(&fixture.data, &plan);
    // 3 x 3 groups x (customers, n, spend, avg.sum, avg.count), then 9 ratios.
    assert_eq!(t.len(), 45);
    assert_eq!(r.cells.len(), 45 + 9);
    for (c, truth) in r.cells.iter().zip(&t) {
        assert!(
            (c.value - truth).abs() <= 6.0 * c.sigma,
            "{}: {} vs {truth} (sd {})",
            c.name,
            c.value,
            c.sigma
        );
    }
    // The groups are really split by the platform's attribute.
    assert!(t.iter().step_by(5).filter(|x| **x > 0.0).count() >= 6);
    platform.shutdown().await;
    bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_runs_only_when_both_operators_signed_its_text() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 300, 91, &["alice"]).unwrap();
    // The bank's operator changes the text of spend_by_category (a wider
    // clip bound) and signs it; the platform's operator has not.
    let text = std::fs::read_to_string(&fixture.bank_config).unwrap();
    let block = "name = \"spend_by_category\"\nkind = \"spend_by_category\"\nrho = \"1\"\nmin_count = 20\nanalysts = [\"alice\"]\nclip = { transactions = 5, spend_cents = 50000, max_customers = 1024 }";
    assert!(text.contains(block));
    let changed = text.replace(block, &block.replace("50000", "90000"));
    assert_ne!(text, changed);
    std::fs::write(&fixture.bank_config, &changed).unwrap();
    let cfg = cleanroom_node::config::NodeConfig::load(&fixture.bank_config).unwrap();
    cleanroom_node::policy::sign(&cfg, &fixture.bank_config).unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let params = vec![
        ("start".to_string(), "2026-01-01".to_string()),
        ("end".to_string(), "2026-01-31".to_string()),
    ];
    let e = refused_with(
        analyst
            .query("spend_by_category", &params, new_query_id().unwrap(), TIMEOUT)
            .await,
        RefusalCode::UnknownTemplate,
    );
    assert!(e.contains("not approved by both operators"), "{e}");
    // overlap (text unchanged, signed by both) still runs, and it is the only
    // template offered besides the segment one.
    analyst
        .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    let listed: Vec<String> = analyst
        .templates()
        .await
        .unwrap()
        .into_iter()
        .map(|(b, _)| b.name)
        .collect();
    assert!(!listed.contains(&"spend_by_category".to_string()), "{listed:?}");
    platform.shutdown().await;
    bank.shutdown().await;

    // A template text changed after signing (tampered config) does not run
    // either: the bank's own signature no longer covers it.
    let tampered = changed.replacen("spend_cents = 50000", "spend_cents = 60000", 1);
    std::fs::write(&fixture.bank_config, tampered).unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let e = refused_with(
        analyst.query("overlap", &[], new_query_id().unwrap(), TIMEOUT).await,
        RefusalCode::UnknownTemplate,
    );
    assert!(e.contains("signed by bank: no"), "{e}");
    assert_eq!(bank.charge_count().unwrap(), 1);
    platform.shutdown().await;
    bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ad_hoc_sql_runs_only_as_an_instance_of_a_signed_template() {
    let p = pair(400, 101, &["alice"]).await;
    let analyst = p.analyst("alice");
    let sql = cleanroom_query::TemplateKind::SpendByCategory
        .sql()
        .replace(":start", "'2026-01-01'")
        .replace(":end", "'2026-02-28'")
        .to_lowercase();
    let (template, r) = analyst.query_sql(&sql, new_query_id().unwrap(), TIMEOUT).await.unwrap();
    assert_eq!(template, "spend_by_category");
    let params = vec![
        ("end".to_string(), "2026-02-28".to_string()),
        ("start".to_string(), "2026-01-01".to_string()),
    ];
    let t = truth(&p.fixture.data, &p.fixture.plan("spend_by_category", &params).unwrap());
    for (c, truth) in r.cells.iter().zip(&t) {
        assert!((c.value - truth).abs() <= 6.0 * c.sigma, "{}", c.name);
    }
    // Not an instance: another grouping.
    let other = sql.replace("group by b.category", "group by b.category, p.country");
    let e = refused_with(
        analyst.query_sql(&other, new_query_id().unwrap(), TIMEOUT).await,
        RefusalCode::UnknownTemplate,
    );
    assert!(e.contains("not an instance of any template"), "{e}");
    // An instance with a value outside the template's window: refused by the nodes.
    let late = sql.replace("2026-02-28", "2027-02-28");
    let e = refused_with(
        analyst.query_sql(&late, new_query_id().unwrap(), TIMEOUT).await,
        RefusalCode::BadParameters,
    );
    assert!(e.contains("must be within the template's window"), "{e}");
    p.platform.shutdown().await;
    p.bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_per_day_refuse_at_exactly_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 300, 111, &["alice"]).unwrap();
    let text = std::fs::read_to_string(&fixture.bank_config).unwrap();
    std::fs::write(
        &fixture.bank_config,
        text.replace("[limits]\n", "[limits]\nruns_per_analyst_per_day = 2\n"),
    )
    .unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    let first = new_query_id().unwrap();
    analyst.query("overlap", &[], first, TIMEOUT).await.unwrap();
    analyst
        .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    let e = refused_with(
        analyst.query("overlap", &[], new_query_id().unwrap(), TIMEOUT).await,
        RefusalCode::RunLimit,
    );
    assert!(
        e.contains("run limit on the bank node: 2 queries per analyst per day") && e.contains("frees up at 00:00 UTC"),
        "{e}"
    );
    // Retrieving an earlier result is not a new run.
    assert!(analyst.query("overlap", &[], first, TIMEOUT).await.unwrap().replayed);
    platform.shutdown().await;
    bank.shutdown().await;
}

/// Every admission check of both nodes comes before either node charges: a
/// query that one node refuses (here its runs per day) is charged at
/// neither, and the two ledgers agree query by query. Before the client
/// asked both nodes to admit the query first, the node that did not refuse
/// charged it, and the analyst's budget there went on a query never
/// answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_either_node_refuses_is_charged_at_neither() {
    for refusing in ["bank", "platform"] {
        let dir = tempfile::tempdir().unwrap();
        let fixture = Fixture::create(dir.path(), 300, 131, &["alice"]).unwrap();
        let one_run = |t: String| t.replace("[limits]\n", "[limits]\nruns_per_analyst_per_day = 1\n");
        if refusing == "bank" {
            let text = std::fs::read_to_string(&fixture.bank_config).unwrap();
            std::fs::write(&fixture.bank_config, one_run(text)).unwrap();
        }
        let bank = fixture.start_bank().await.unwrap();
        let platform = if refusing == "platform" {
            platform_with(&fixture, &bank, one_run).await
        } else {
            fixture.start_platform(bank.local_addr().unwrap()).await.unwrap()
        };
        let analyst = analyst_of(&fixture, "alice", &bank, &platform);
        let first = new_query_id().unwrap();
        analyst.query("overlap", &[], first, TIMEOUT).await.unwrap();
        let mut refused = vec![first];
        for _ in 0..3 {
            let qid = new_query_id().unwrap();
            let e = refused_with(analyst.query("overlap", &[], qid, TIMEOUT).await, RefusalCode::RunLimit);
            // Which node refused is for people: the ledgers below are the test.
            assert!(e.contains(&format!("on the {refusing} node")), "{e}");
            refused.push(qid);
        }
        assert_eq!(bank.charge_count().unwrap(), 1, "{refusing} refused");
        assert_eq!(platform.charge_count().unwrap(), 1, "{refusing} refused");
        for (i, qid) in refused.iter().enumerate() {
            assert_eq!(bank.is_charged(qid).unwrap(), i == 0);
            assert_eq!(platform.is_charged(qid).unwrap(), i == 0);
        }
        // The admissions the other node held were dropped: nothing runs.
        assert_eq!((bank.queries_in_flight(), platform.queries_in_flight()), (0, 0));
        platform.shutdown().await;
        bank.shutdown().await;
    }
}

/// An admission holds one of the analyst's running-query slots: with one
/// slot (`max_queries_in_flight_per_analyst = 1`) a second admission is
/// refused while the first is held; a cancel frees the slot at once, and an
/// admission nobody uses frees it when `admission_hold_secs` pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_holds_a_slot_until_its_query_a_cancel_or_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 300, 141, &["alice"]).unwrap();
    let text = std::fs::read_to_string(&fixture.bank_config).unwrap();
    std::fs::write(
        &fixture.bank_config,
        text.replace(
            "[limits]\n",
            "[limits]\nmax_queries_in_flight_per_analyst = 1\nadmission_hold_secs = 2\n",
        ),
    )
    .unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let certs = fixture.dir.join("certs");
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let alice = Identity::load(&certs.join("analyst-alice.pem"), &certs.join("analyst-alice.key")).unwrap();
    let bank_name = pki::node_name("bank");
    let addr = bank.local_addr().unwrap();
    let admit = |qid: cleanroom_wire::QueryId| {
        Message::AnalystRequest(AnalystRequest::Admit(QueryRequest {
            query_id: qid,
            template: "overlap".into(),
            params: vec![],
        }))
    };
    let (q1, q2) = (new_query_id().unwrap(), new_query_id().unwrap());
    let ask = |m: Message| raw_request(&alice, &ca, addr, &bank_name, m);
    assert!(matches!(
        ask(admit(q1)).await,
        Ok(Message::AnalystResponse(AnalystResponse::Admitted))
    ));
    assert_eq!(bank.queries_in_flight(), 1);
    let r = ask(admit(q2)).await;
    assert!(
        matches!(&r, Ok(Message::AnalystResponse(AnalystResponse::Refused(m))) if m.code == RefusalCode::TooManyQueries),
        "{r:?}"
    );
    // A cancel frees it at once.
    ask(Message::AnalystRequest(AnalystRequest::Cancel(q1))).await.unwrap();
    assert_eq!(bank.queries_in_flight(), 0);
    // An unused admission expires.
    assert!(matches!(
        ask(admit(q2)).await,
        Ok(Message::AnalystResponse(AnalystResponse::Admitted))
    ));
    assert_eq!(bank.queries_in_flight(), 1);
    let t = std::time::Instant::now();
    while bank.queries_in_flight() != 0 {
        assert!(t.elapsed() < Duration::from_secs(10), "the admission did not expire");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(t.elapsed() >= Duration::from_millis(1500), "{:?}", t.elapsed());
    // Nothing was charged; a whole query (admission, then query) still runs.
    assert_eq!(bank.charge_count().unwrap(), 0);
    let analyst = analyst_of(&fixture, "alice", &bank, &platform);
    analyst.query("overlap", &[], q1, TIMEOUT).await.unwrap();
    assert_eq!(bank.charge_count().unwrap(), 1);
    platform.shutdown().await;
    bank.shutdown().await;
}

/// A template's `clip.max_customers` sets its cells' share widths: the
/// bank refuses (before any charge) a query of a template whose bound is
/// below its customer count, saying so without the count, and runs it at
/// exactly its count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_customers_below_the_banks_data_refuses_before_the_charge() {
    for (max, ok) in [(299, false), (300, true)] {
        let dir = tempfile::tempdir().unwrap();
        let mut fixture = Fixture::create(dir.path(), 300, 151, &["alice"]).unwrap();
        let from = format!("max_customers = {}", fixture.max_customers);
        fixture
            .edit_configs(&[(&from, &format!("max_customers = {max}"))])
            .unwrap();
        let bank = fixture.start_bank().await.unwrap();
        assert_eq!(bank.holder_ids().unwrap().len(), 300);
        let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
        let analyst = analyst_of(&fixture, "alice", &bank, &platform);
        let (template, params) = demo_queries().remove(1);
        let qid = new_query_id().unwrap();
        let r = analyst.query(template, &params, qid, TIMEOUT).await;
        if ok {
            let r = r.unwrap();
            let t = truth(&fixture.data, &fixture.plan(template, &params).unwrap());
            for (c, truth) in r.cells.iter().zip(&t) {
                assert!(
                    (c.value - truth).abs() <= 6.0 * c.sigma,
                    "{}: {} vs {truth}",
                    c.name,
                    c.value
                );
            }
        } else {
            let e = refused_with(r, RefusalCode::InputLimit);
            assert!(e.contains("clip.max_customers") && !e.contains("300"), "{e}");
            assert!(!bank.is_charged(&qid).unwrap() && !platform.is_charged(&qid).unwrap());
        }
        platform.shutdown().await;
        bank.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimum_input_refuses_at_exactly_its_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 400, 121, &["alice"]).unwrap();
    let gamers = fixture
        .data
        .platform
        .iter()
        .filter(|u| cleanroom_sim::synth::SEGMENTS[u.segment] == "gamer")
        .count();
    assert!(gamers > 5);
    let bank = fixture.start_bank().await.unwrap();
    let params = vec![
        ("end".to_string(), "2026-06-30".to_string()),
        ("segment".to_string(), "gamer".to_string()),
        ("start".to_string(), "2026-01-01".to_string()),
    ];
    for (min, ok) in [(gamers, true), (gamers + 1, false)] {
        let platform = platform_with(&fixture, &bank, |t| {
            t.replace("[limits]\n", &format!("[limits]\nmin_input_set = {min}\n"))
        })
        .await;
        let analyst = analyst_of(&fixture, "alice", &bank, &platform);
        let r = analyst
            .query(
                "spend_by_category_for_segment",
                &params,
                new_query_id().unwrap(),
                TIMEOUT,
            )
            .await;
        match (ok, r) {
            (true, Ok(_)) => {}
            (false, Err(e)) => {
                let e = e.to_string();
                assert!(
                    e.contains(&format!("than the minimum of {min}")) && !e.contains(&gamers.to_string()),
                    "{e}"
                );
            }
            (ok, r) => panic!("min {min}: expected ok={ok}, got {:?}", r.map(|_| ())),
        }
        platform.shutdown().await;
    }
    bank.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_the_join_against_the_curve_bound() {
    let opts = cleanroom_lab::bench::BenchOptions {
        sizes: vec![400],
        seed: 131,
        overlap: 0.25,
        categories: 4,
        path: None,
        repeat: 1,
        queries: 3,
        shards: 1,
        node_processes: None,
        key_slots: 1,
        workers: Vec::new(),
    };
    let mut steps = Vec::new();
    let rows = cleanroom_lab::bench::run(&opts, |done, total, _| steps.push((done, total)))
        .await
        .unwrap();
    let r = &rows[0];
    assert_eq!(r.rows, 400);
    assert_eq!((r.overlap, r.categories), (0.25, 4));
    // One group per category plus "other", three cells each.
    assert_eq!(r.query_cells, 3 * 5);
    // Three timed queries, their median reported.
    assert_eq!(r.query_runs.len(), 3);
    let mut sorted = r.query_runs.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(r.query_seconds, sorted[1]);
    assert_eq!(steps.last(), Some(&(5, 5)));
    assert!(steps.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(r.bound_parts.len(), 4);
    assert!(r.bound_seconds > 0.0 && r.join_seconds > 0.0);
    assert!((r.ratio - r.join_seconds / r.bound_seconds).abs() < 1e-9);
    // The join carries at least the points: 400 tokens one way, 400 rows and
    // 400 tokens the other; the query at least one masked word per row and cell.
    assert!(r.join.platform_to_bank_bytes > 400 * 32);
    assert!(r.join.bank_to_platform_bytes > 2 * 400 * 32);
    assert!(r.query.bank_to_platform_bytes > 400 * r.query_row_bytes as u64);
    // Its cells are packed at their share widths, not 64 bits each: the
    // bank sends fewer bytes than 64-bit cells of the 400 real rows alone
    // would take (the dummy rows come on top).
    assert!(r.query_row_bytes * 2 < 8 * 15, "{} bytes a row", r.query_row_bytes);
    assert!(r.query.bank_to_platform_bytes < 400 * 8 * 15);
    // The run's totals include both steps (and the policy exchange before them).
    assert!(r.platform_to_bank_bytes >= r.join.platform_to_bank_bytes + r.query.platform_to_bank_bytes);
    assert!(r.bank_to_platform_bytes >= r.join.bank_to_platform_bytes + r.query.bank_to_platform_bytes);
    // The join step is the `overlap` query: offer/accept then the streams,
    // then its aggregate; an aggregate is setup/answer then the OT stream.
    assert_eq!(r.join.round_trips, 4);
    assert_eq!(r.query.round_trips, 2);
    assert!(r.join.cpu_seconds > 0.0 && r.query.cpu_seconds > 0.0);
    assert!(r.peak_rss_kib > 0);
    use cleanroom_client::Phase;
    let names: Vec<(&str, Phase)> = r.phases.iter().map(|p| (p.node.as_str(), p.phase.clone())).collect();
    assert!(
        !names.iter().any(|(_, p)| matches!(p, Phase::Other(_))),
        "a phase this build does not know: {names:?}"
    );
    for want in [
        ("platform", Phase::Join),
        ("platform", Phase::PlatformOwnTokens),
        ("platform", Phase::PlatformMatching),
        ("platform", Phase::Aggregate),
        ("platform", Phase::PlatformOtExtension),
        ("bank", Phase::Join),
        ("bank", Phase::BankOwnRows),
        ("bank", Phase::BankMasking),
    ] {
        assert!(names.contains(&want), "{names:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("bench.svg");
    cleanroom_lab::bench::plot(&rows, &svg).unwrap();
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.contains("curve bound") && text.contains("polyline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_analyst_request_is_refused_from_its_length() {
    let p = pair(200, 141, &["alice"]).await;
    let certs = p.fixture.dir.join("certs");
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let alice = Identity::load(&certs.join("analyst-alice.pem"), &certs.join("analyst-alice.key")).unwrap();
    let ep = client_endpoint(&alice, &ca, &TransportSettings::default()).unwrap();
    let conn = cleanroom_transport::connect(&ep, p.bank_addr(), &pki::node_name("bank"))
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // Announce a 60 MiB request: the node stops reading at the length prefix.
    send.write_all(&(60u32 << 20).to_le_bytes()).await.unwrap();
    let _ = send.write_all(&[0u8; 1024]).await;
    let r = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut recv, MAX_MESSAGE_LEN))
        .await
        .unwrap();
    assert!(!matches!(r, Ok(Some(_))), "the node answered an oversized request");
    // And it still serves alice normally.
    let ok = raw_request(&alice, &ca, p.bank_addr(), &pki::node_name("bank"), templates_request())
        .await
        .unwrap();
    assert!(matches!(ok, Message::AnalystResponse(AnalystResponse::Templates(_))));
    p.platform.shutdown().await;
    p.bank.shutdown().await;
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_revoked_and_early_data_clients_are_refused() {
    let p = pair(300, 23, &["alice", "bob"]).await;
    let certs = p.fixture.dir.join("certs");
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let bank_name = pki::node_name("bank");
    let load =
        |file: &str| Identity::load(&certs.join(format!("{file}.pem")), &certs.join(format!("{file}.key"))).unwrap();
    let now = now_unix();

    // alice's name from the right CA, but expired yesterday, or valid only from tomorrow.
    pki::issue(
        &certs,
        "alice-expired",
        &pki::analyst_name("alice"),
        false,
        now - 10 * 86_400,
        now - 86_400,
    )
    .unwrap();
    pki::issue(
        &certs,
        "alice-future",
        &pki::analyst_name("alice"),
        false,
        now + 86_400,
        now + 10 * 86_400,
    )
    .unwrap();
    // And a fresh one, to show the issuing itself is fine.
    pki::issue(
        &certs,
        "alice-fresh",
        &pki::analyst_name("alice"),
        false,
        now - 60,
        now + 86_400,
    )
    .unwrap();
    for (file, accepted) in [("alice-expired", false), ("alice-future", false), ("alice-fresh", true)] {
        let r = raw_request(&load(file), &ca, p.bank_addr(), &bank_name, templates_request()).await;
        assert_eq!(r.is_ok(), accepted, "{file}: {r:?}");
    }

    // Revocation: alice's second certificate was answered above; it is
    // revoked and the bank restarted with the CA's list: refused, while
    // her first certificate is still answered.
    pki::revoke(&certs, &[certs.join("alice-fresh.pem")], 30).unwrap();
    p.bank.shutdown().await;
    let text = std::fs::read_to_string(&p.fixture.bank_config).unwrap();
    let edited = text.replacen(
        "ca = \"certs/ca.pem\"\n",
        "ca = \"certs/ca.pem\"\ncrl = \"certs/ca.crl.pem\"\n",
        1,
    );
    assert_ne!(text, edited);
    std::fs::write(&p.fixture.bank_config, edited).unwrap();
    let bank = Node::start(
        cleanroom_node::config::NodeConfig::load(&p.fixture.bank_config).unwrap(),
        &p.fixture.bank_config,
    )
    .await
    .unwrap();
    // (The restarted bank listens on a new port the platform does not know,
    // so it has no peer policy: budget requests, which do not wait for one.)
    let addr = bank.local_addr().unwrap();
    let revoked = raw_request(&load("alice-fresh"), &ca, addr, &bank_name, budget_request()).await;
    assert!(
        revoked.as_ref().is_err_and(|e| e != "timeout"),
        "a revoked certificate was answered (or not refused): {revoked:?}"
    );
    let alice = raw_request(&load("analyst-alice"), &ca, addr, &bank_name, budget_request()).await;
    assert!(alice.is_ok(), "{alice:?}");
    // A client that trusts the list refuses a revoked server, too.
    pki::revoke(&certs, &[certs.join("bank.pem")], 30).unwrap();
    let wary = TrustAnchors::load(&certs.join("ca.pem"))
        .unwrap()
        .with_crl(&certs.join("ca.crl.pem"))
        .unwrap();
    let r = raw_request(&load("analyst-alice"), &wary, addr, &bank_name, budget_request()).await;
    assert!(
        r.as_ref().is_err_and(|e| e != "timeout"),
        "a revoked server was trusted (or not refused): {r:?}"
    );

    // 0-RTT: a client willing to send early data and to resume gets no
    // ticket from a node, so its second connection cannot start in 0-RTT.
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(ca_roots(&certs))
        .with_client_auth_cert(
            rustls::pki_types::CertificateDer::pem_file_iter(certs.join("analyst-alice.pem"))
                .unwrap()
                .map(Result::unwrap)
                .collect(),
            rustls::pki_types::PrivateKeyDer::from_pem_file(certs.join("analyst-alice.key")).unwrap(),
        )
        .unwrap();
    tls.alpn_protocols = vec![cleanroom_transport::ALPN.to_vec()];
    tls.enable_early_data = true;
    let qc = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(qc)));
    let first = ep.connect(addr, &bank_name).unwrap().await.unwrap();
    let (mut send, mut recv) = first.open_bi().await.unwrap();
    write_frame(&mut send, templates_request().encode().unwrap(), MAX_MESSAGE_LEN)
        .await
        .unwrap();
    let _ = send.finish();
    assert!(read_frame(&mut recv, MAX_MESSAGE_LEN).await.unwrap().is_some());
    first.close(0u32.into(), b"done");
    let second = ep.connect(addr, &bank_name).unwrap();
    assert!(second.into_0rtt().is_err(), "the node let a client start in 0-RTT");
    bank.shutdown().await;
    p.platform.shutdown().await;
}
