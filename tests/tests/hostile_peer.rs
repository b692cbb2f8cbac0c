//! A peer that holds a valid platform certificate and misbehaves, over real
//! QUIC with mutual TLS against a running bank node: bad framing, messages
//! out of order, from another session, identity and non-canonical points,
//! duplicated chunks, set sizes outside the policy, a peer that stalls at
//! each step (slowloris) and one that disconnects at each step of a join.
//! Each hostile session ends with a typed abort or a closed stream within
//! the bank's timeouts; meanwhile and afterwards the bank serves the real
//! platform and analyst, charges only their queries, and never sends the
//! hostile peer anything but protocol frames of its own sessions.
//!
//! `cargo test --locked -p cleanroom-tests --test hostile_peer -- --nocapture`
//! prints how long each hostile session took to end.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cleanroom_client::{Analyst, new_query_id};
use cleanroom_crypto::normalize::NormalizationRules;
use cleanroom_lab::demo::Fixture;
use cleanroom_protocol::join::{JoinParams, MatcherJoin, MatcherPolicy, MatcherStreaming, SetSizeLimits};
use cleanroom_sim::oracle::truth;
use cleanroom_transport::{Identity, TransportSettings, TrustAnchors, client_endpoint, pki, read_frame, write_frame};
use cleanroom_wire::{AbortCode, MAX_MESSAGE_LEN, MatcherKey, Message, OtSetup, PointChunk, SessionId};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The bank's `[timeouts]` in the stall test (defaults 30 s and 60 s): a
/// stalled first frame ends after the first, a stalled join after the
/// second.
const PEER_FRAME_SECS: u64 = 5;
const STREAM_IDLE_SECS: u64 = 10;
/// The same for an aggregate whose query the bank never accepted (default 30 s).
const UNCLAIMED_SECS: u64 = 5;

/// How a hostile session ended, seen from the hostile side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The bank sent an abort with this code.
    Abort(cleanroom_wire::AbortCode),
    /// The bank finished or reset the stream, or closed the connection.
    Closed,
}

struct Peer {
    _ep: quinn::Endpoint,
    conn: quinn::Connection,
}

async fn hostile_peer(certs: &std::path::Path, bank: SocketAddr) -> Peer {
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let id = Identity::load(&certs.join("platform.pem"), &certs.join("platform.key")).unwrap();
    let ep = client_endpoint(&id, &ca, &TransportSettings::default()).unwrap();
    let conn = cleanroom_transport::connect(&ep, bank, &pki::node_name("bank"))
        .await
        .unwrap();
    Peer { _ep: ep, conn }
}

/// Reads what the bank sends on a hostile stream until it aborts or ends
/// the stream; fails if it sends anything but its own join frames, or does
/// not end within `limit`.
async fn ending(recv: &mut quinn::RecvStream, limit: Duration, what: &str) -> (Ending, Duration) {
    let t = Instant::now();
    loop {
        let left = limit.saturating_sub(t.elapsed());
        let f = match tokio::time::timeout(left, read_frame(recv, MAX_MESSAGE_LEN)).await {
            Err(_) => panic!("{what}: the bank did not end the session within {limit:?}"),
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None) | Err(_)) => return (Ending::Closed, t.elapsed()),
        };
        match Message::decode(&f) {
            Ok(Message::Abort(a)) => return (Ending::Abort(a.code), t.elapsed()),
            Ok(Message::JoinAccept(_) | Message::HolderRows(_) | Message::HolderTokens(_)) => {}
            other => panic!("{what}: the bank sent {other:?} to a hostile peer"),
        }
    }
}

fn matcher(ids: usize, context: u8) -> MatcherJoin {
    let ids: Vec<Vec<u8>> = (0..ids)
        .map(|i| format!("email:ghost{i}@example.com").into_bytes())
        .collect();
    MatcherJoin::new(
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
    .unwrap()
}

async fn send(s: &mut quinn::SendStream, m: &Message) {
    write_frame(s, m.encode().unwrap(), MAX_MESSAGE_LEN).await.unwrap();
}

/// Opens a join on a fresh stream: offer sent, accept read. Returns the
/// streams, the matcher's next state and the session.
async fn open_join(
    peer: &Peer,
    ids: usize,
    context: u8,
) -> (quinn::SendStream, quinn::RecvStream, MatcherStreaming, SessionId) {
    let (mut s, mut r) = peer.conn.open_bi().await.unwrap();
    let mut rng = cleanroom_crypto::rng::session_rng().unwrap();
    let (offered, offer) = matcher(ids, context).offer(&mut rng).unwrap();
    send(&mut s, &offer).await;
    let accept = read_frame(&mut r, MAX_MESSAGE_LEN).await.unwrap().unwrap();
    let session = match Message::decode(&accept) {
        Ok(Message::JoinAccept(a)) => a.session,
        other => panic!("expected an accept, got {other:?}"),
    };
    let streaming = offered.on_accept(&accept).unwrap();
    (s, r, streaming, session)
}

/// Both nodes on loopback with the analyst alice, and the `overlap` truth.
struct Running {
    _dir: tempfile::TempDir,
    fixture: Fixture,
    bank: cleanroom_node::server::Node,
    platform: cleanroom_node::server::Node,
    analyst: Analyst,
    truth: f64,
}

async fn running(rows: usize, seed: u64) -> Running {
    running_with(rows, seed, &[]).await
}

/// The same with the configs edited (`Fixture::edit_configs`).
async fn running_with(rows: usize, seed: u64, edits: &[(&str, &str)]) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut fixture = Fixture::create(dir.path(), rows, seed, &["alice"]).unwrap();
    fixture.edit_configs(edits).unwrap();
    let bank = fixture.start_bank().await.unwrap();
    let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let analyst = Analyst::new(
        &fixture
            .analyst("alice", bank.local_addr().unwrap(), platform.local_addr().unwrap())
            .unwrap(),
    )
    .unwrap();
    let truth = truth(&fixture.data, &fixture.plan("overlap", &[]).unwrap())[0];
    Running {
        _dir: dir,
        fixture,
        bank,
        platform,
        analyst,
        truth,
    }
}

/// A real query by the real analyst through the real platform, within noise
/// of the truth; how long it took.
async fn legit(analyst: &Analyst, truth: f64) -> Duration {
    let t = Instant::now();
    let r = analyst
        .query("overlap", &[], new_query_id().unwrap(), TIMEOUT)
        .await
        .unwrap();
    assert!((r.cells[0].value - truth).abs() <= 6.0 * r.cells[0].sigma);
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_is_cut_off_and_the_bank_keeps_serving() {
    let Running {
        _dir,
        fixture,
        bank,
        platform,
        analyst,
        truth,
    } = running_with(
        600,
        53,
        &[(
            "[limits]\n",
            &format!(
                "[timeouts]\npeer_frame_secs = {PEER_FRAME_SECS}\nstream_idle_secs = {STREAM_IDLE_SECS}\nunclaimed_aggregate_secs = {UNCLAIMED_SECS}\n\n[limits]\n"
            ),
        )],
    )
    .await;
    let certs = fixture.dir.join("certs");
    let baseline = legit(&analyst, truth).await;
    let mut queries = 1u64;
    let peer = hostile_peer(&certs, bank.local_addr().unwrap()).await;
    let mut report = Vec::new();
    let bad = AbortCode::BadMessage;

    // Stalls, all at once: after 2 bytes of a length prefix; after half a
    // frame; after an accepted offer; in the middle of the token stream. A
    // real query runs while they hang.
    let stalls = {
        let mut tasks = Vec::new();
        let first = PEER_FRAME_SECS;
        let later = STREAM_IDLE_SECS;
        let (mut s, r) = peer.conn.open_bi().await.unwrap();
        s.write_all(&[1, 0]).await.unwrap();
        tasks.push(("2 bytes of a length prefix, then silence", first, s, r));
        let (mut s, r) = peer.conn.open_bi().await.unwrap();
        let mut rng = cleanroom_crypto::rng::session_rng().unwrap();
        let (_, offer) = matcher(500, 41).offer(&mut rng).unwrap();
        let f = offer.encode().unwrap();
        s.write_all(&(f.len() as u32).to_le_bytes()).await.unwrap();
        s.write_all(&f[..f.len() / 2]).await.unwrap();
        tasks.push(("half an offer frame, then silence", first, s, r));
        let (s, r, _, _) = open_join(&peer, 500, 42).await;
        tasks.push(("an accepted offer, then silence", later, s, r));
        let (mut s, r, mut m, _) = open_join(&peer, 2000, 43).await;
        for _ in 0..3 {
            let f = m.poll_transmit().unwrap();
            send(&mut s, &f).await;
        }
        tasks.push(("the key and two token chunks, then silence", later, s, r));
        tasks
            .into_iter()
            .map(|(what, wait, s, mut r)| {
                tokio::spawn(async move {
                    // The first message is read within `peer_frame_secs`,
                    // each later one within `stream_idle_secs`.
                    let e = ending(&mut r, Duration::from_secs(wait + 15), what).await;
                    drop(s);
                    (what, wait, e)
                })
            })
            .collect::<Vec<_>>()
    };
    let during = legit(&analyst, truth).await;
    queries += 1;
    report.push(format!(
        "a real query while four hostile sessions stall: {:.2} s (alone: {:.2} s)",
        during.as_secs_f64(),
        baseline.as_secs_f64()
    ));

    // Framing and order, each on its own stream.
    let raw = |bytes: Vec<u8>, finish: bool| {
        let conn = peer.conn.clone();
        async move {
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            s.write_all(&bytes).await.unwrap();
            if finish {
                let _ = s.finish();
            }
            ending(&mut r, Duration::from_secs(40), "raw").await
        }
    };
    let frame = |m: Message| {
        let f = m.encode().unwrap();
        let mut out = (f.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&f);
        out
    };
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("a length prefix of 4 GiB", u32::MAX.to_le_bytes().to_vec(), false),
        (
            "a length prefix one byte over the limit",
            ((MAX_MESSAGE_LEN + 1) as u32).to_le_bytes().to_vec(),
            false,
        ),
        (
            "a truncated frame, then the stream finished",
            {
                let mut v = 100u32.to_le_bytes().to_vec();
                v.extend_from_slice(&[7; 50]);
                v
            },
            true,
        ),
        (
            "a frame of random bytes",
            {
                let mut v = 64u32.to_le_bytes().to_vec();
                v.extend((0..64u8).map(|i| i.wrapping_mul(37)));
                v
            },
            false,
        ),
        (
            "a key before any offer",
            frame(Message::MatcherKey(MatcherKey {
                session: cleanroom_wire::SessionId([1; 16]),
                key: [2; 32],
            })),
            false,
        ),
        (
            "tokens before any offer",
            frame(Message::MatcherTokens(PointChunk {
                session: cleanroom_wire::SessionId([1; 16]),
                seq: 0,
                points: vec![0; 64],
            })),
            false,
        ),
        (
            "an analyst request on a peer stream",
            frame(Message::AnalystRequest(cleanroom_wire::AnalystRequest::Budget)),
            false,
        ),
    ];
    for (what, bytes, finish) in cases {
        let (e, took) = raw(bytes, finish).await;
        assert_eq!(e, Ending::Closed, "{what}");
        assert!(took < Duration::from_secs(5), "{what}: {took:?}");
        report.push(format!("{what}: closed after {:.3} s", took.as_secs_f64()));
    }

    // Inside a join: each bad step ends in an abort.
    let identity = vec![0u8; 32];
    let mut non_canonical = vec![0xffu8; 32];
    non_canonical[31] = 0x7f;
    for (what, ctx, points) in [
        ("the identity point among the tokens", 50u8, identity),
        ("a non-canonical encoding among the tokens", 51u8, non_canonical),
    ] {
        let (mut s, mut r, mut m, session) = open_join(&peer, 600, ctx).await;
        let key = m.poll_transmit().unwrap();
        send(&mut s, &key).await;
        let mut pts = match m.poll_transmit().unwrap() {
            Message::MatcherTokens(c) => c.points,
            other => panic!("{other:?}"),
        };
        pts.splice(32..64, points);
        send(
            &mut s,
            &Message::MatcherTokens(PointChunk {
                session,
                seq: 0,
                points: pts,
            }),
        )
        .await;
        let (e, took) = ending(&mut r, Duration::from_secs(30), what).await;
        assert_eq!(e, Ending::Abort(bad), "{what}");
        report.push(format!("{what}: abort {bad:?} after {:.3} s", took.as_secs_f64()));
    }
    {
        let what = "a token chunk sent twice";
        let (mut s, mut r, mut m, _) = open_join(&peer, 600, 52).await;
        let key = m.poll_transmit().unwrap();
        send(&mut s, &key).await;
        let chunk = m.poll_transmit().unwrap();
        send(&mut s, &chunk).await;
        send(&mut s, &chunk).await;
        let (e, took) = ending(&mut r, Duration::from_secs(30), what).await;
        assert_eq!(e, Ending::Abort(bad), "{what}");
        report.push(format!("{what}: abort {bad:?} after {:.3} s", took.as_secs_f64()));
    }
    {
        let what = "a key from another session";
        let (_s1, _r1, mut m1, _) = open_join(&peer, 600, 53).await;
        let (mut s2, mut r2, _, _) = open_join(&peer, 600, 54).await;
        let key_of_first = m1.poll_transmit().unwrap();
        send(&mut s2, &key_of_first).await;
        let (e, took) = ending(&mut r2, Duration::from_secs(30), what).await;
        assert_eq!(e, Ending::Abort(bad), "{what}");
        report.push(format!("{what}: abort {bad:?} after {:.3} s", took.as_secs_f64()));
    }
    {
        let what = "a set size under the bank's minimum";
        let (mut s, mut r) = peer.conn.open_bi().await.unwrap();
        let mut rng = cleanroom_crypto::rng::session_rng().unwrap();
        let (_, offer) = matcher(3, 55).offer(&mut rng).unwrap();
        send(&mut s, &offer).await;
        let (e, took) = ending(&mut r, Duration::from_secs(30), what).await;
        assert!(
            matches!(e, Ending::Abort(c) if c == AbortCode::Parameters || c == AbortCode::Refused),
            "{what}: {e:?}"
        );
        report.push(format!("{what}: {e:?} after {:.3} s", took.as_secs_f64()));
    }
    {
        let what = "an aggregate for a query the bank never accepted";
        let (mut s, mut r) = peer.conn.open_bi().await.unwrap();
        send(
            &mut s,
            &Message::OtSetup(OtSetup {
                session: cleanroom_wire::SessionId([9; 16]),
                join_session: cleanroom_wire::SessionId([8; 16]),
                query_id: cleanroom_wire::QueryId([7; 16]),
                nonce: [6; 32],
                rows: 1000,
                width: 1,
                plan: [5; 32],
                group: 0,
                base_point: (curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT
                    * curve25519_dalek::Scalar::from(3u64))
                .compress()
                .to_bytes(),
            }),
        )
        .await;
        let (e, took) = ending(&mut r, Duration::from_secs(UNCLAIMED_SECS + 15), what).await;
        assert_eq!(e, Ending::Abort(AbortCode::UnknownQuery), "{what}");
        assert!(took >= Duration::from_secs(UNCLAIMED_SECS), "{what}: {took:?}");
        report.push(format!("{what}: abort after {:.3} s", took.as_secs_f64()));
    }

    // Disconnect at each step of a join: after the offer, after the key,
    // after each token chunk; each time a fresh connection, dropped hard.
    let rss_before = cleanroom_tests::rss_mib();
    let steps = 1 + 1 + 8;
    for k in 0..steps {
        let p = hostile_peer(&certs, bank.local_addr().unwrap()).await;
        let (mut s, _r, mut m, _) = open_join(&p, 2000, 60 + k as u8).await;
        for _ in 0..k {
            if let Some(f) = m.poll_transmit() {
                send(&mut s, &f).await;
            }
        }
        p.conn.close(0u32.into(), b"gone");
    }
    let after = legit(&analyst, truth).await;
    queries += 1;
    report.push(format!(
        "{steps} joins abandoned at each step, then a real query: {:.2} s; test process RSS {rss_before:.0} -> {:.0} MiB",
        after.as_secs_f64(),
        cleanroom_tests::rss_mib()
    ));
    assert!(
        cleanroom_tests::rss_mib() - rss_before < 256.0,
        "memory grew with abandoned sessions"
    );

    for t in stalls {
        let (what, wait, (e, took)) = t.await.unwrap();
        assert_eq!(e, Ending::Closed, "{what}");
        // Ended by its timeout (the bank's clock started a little before
        // this side's, while the other stalls were set up).
        assert!(took >= Duration::from_secs(wait) / 2, "{what}: ended after {took:?}");
        report.push(format!("{what}: closed after {:.1} s", took.as_secs_f64()));
    }
    // Only the real queries were charged; the analyst's budget shows the same.
    assert_eq!(bank.charge_count().unwrap(), queries);
    assert_eq!(platform.charge_count().unwrap(), queries);
    let budget = analyst.budget().await.unwrap();
    assert_eq!(budget.len(), 2);
    for b in &budget {
        assert_eq!(b.rho_spent_micro, 100_000 * queries, "{}", b.node);
    }
    // And the bank still answers the real platform.
    legit(&analyst, truth).await;
    for line in &report {
        println!("{line}");
    }
    platform.shutdown().await;
    bank.shutdown().await;
}

/// Strangers (certificates from another CA) open connections as fast as
/// they can from 32 tasks while the real analyst runs queries: every real
/// query is answered, and how much slower it gets is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_does_not_starve_real_queries() {
    let Running {
        _dir,
        fixture,
        bank,
        platform,
        analyst,
        truth,
    } = running(400, 57).await;
    legit(&analyst, truth).await;
    let mut alone = Vec::new();
    for _ in 0..5 {
        alone.push(legit(&analyst, truth).await.as_secs_f64());
    }

    let stranger_dir = tempfile::tempdir().unwrap();
    cleanroom_transport::pki::init(stranger_dir.path(), &["mallory".to_string()], 2).unwrap();
    let stranger = Identity::load(
        &stranger_dir.path().join("analyst-mallory.pem"),
        &stranger_dir.path().join("analyst-mallory.key"),
    )
    .unwrap();
    let ca = TrustAnchors::load(&fixture.dir.join("certs").join("ca.pem")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut flood = Vec::new();
    for target in [bank.local_addr().unwrap(), platform.local_addr().unwrap()] {
        for _ in 0..16 {
            let ep = client_endpoint(&stranger, &ca, &TransportSettings::default()).unwrap();
            let (stop, attempts) = (stop.clone(), attempts.clone());
            let name = pki::node_name(if target == bank.local_addr().unwrap() {
                "bank"
            } else {
                "platform"
            });
            flood.push(tokio::spawn(async move {
                let mut accepted = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(conn) = cleanroom_transport::connect(&ep, target, &name).await {
                        // TLS 1.3: the client may finish before the server
                        // rejects its certificate; a stream shows the truth.
                        if let Ok((mut s, mut r)) = conn.open_bi().await {
                            let _ = s.write_all(&[0, 0, 0, 0]).await;
                            if tokio::time::timeout(Duration::from_secs(5), read_frame(&mut r, 1024))
                                .await
                                .is_ok_and(|x| x.is_ok_and(|f| f.is_some()))
                            {
                                accepted += 1;
                            }
                        }
                    }
                }
                accepted
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let mut during = Vec::new();
    while during.len() < 5 || t.elapsed() < Duration::from_secs(5) {
        during.push(legit(&analyst, truth).await.as_secs_f64());
    }
    let flood_secs = t.elapsed().as_secs_f64() + 0.5;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut accepted = 0;
    for f in flood {
        accepted += f.await.unwrap();
    }
    let n = attempts.load(std::sync::atomic::Ordering::Relaxed);
    alone.sort_by(f64::total_cmp);
    during.sort_by(f64::total_cmp);
    println!(
        "handshake flood: {n} stranger connection attempts in {flood_secs:.1} s ({:.0}/s) from 32 tasks, {accepted} served; real overlap query median {:.3} s alone, {:.3} s during the flood ({} queries, max {:.3} s)",
        n as f64 / flood_secs,
        alone[2],
        during[during.len() / 2],
        during.len(),
        during[during.len() - 1]
    );
    assert_eq!(accepted, 0, "a stranger got an answer");
    assert!(n > 100, "the flood did not flood: {n} attempts");
    assert!(
        during[during.len() - 1] < 30.0,
        "a real query took {} s during the flood",
        during[during.len() - 1]
    );
    platform.shutdown().await;
    bank.shutdown().await;
}

/// A peer that asks for an aggregate of a query the bank has not accepted
/// (the bank waits up to 30 s for the analyst's request) and then goes
/// away: the bank stops waiting at once rather than keep a task per such
/// stream for 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_leaves_while_the_bank_waits_for_the_query_frees_it_at_once() {
    let Running {
        _dir,
        fixture,
        bank,
        platform,
        analyst,
        truth: _,
    } = running(200, 59).await;
    let certs = fixture.dir.join("certs");
    // The platform's start-up stream (its policy) is over before counting:
    // the bank's template listing waits for that policy, and the stream
    // ends a moment after.
    analyst.templates().await.unwrap();
    let settled = Instant::now();
    while bank.peer_streams() != 0 {
        assert!(
            settled.elapsed() < Duration::from_secs(10),
            "the platform's start-up stream did not end"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = 0;
    let peer = hostile_peer(&certs, bank.local_addr().unwrap()).await;
    let mut streams = Vec::new();
    for k in 0..20u8 {
        let (mut s, r) = peer.conn.open_bi().await.unwrap();
        let setup = Message::OtSetup(OtSetup {
            session: cleanroom_wire::SessionId([k; 16]),
            join_session: cleanroom_wire::SessionId([k; 16]),
            query_id: cleanroom_wire::QueryId([0xa0 ^ k; 16]),
            nonce: [k; 32],
            rows: 10,
            width: 1,
            plan: [k; 32],
            group: 0,
            base_point: curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT
                .compress()
                .to_bytes(),
        });
        send(&mut s, &setup).await;
        streams.push((s, r));
    }
    let waiting = Instant::now();
    while bank.peer_streams() < before + 20 {
        assert!(
            waiting.elapsed() < Duration::from_secs(10),
            "the bank did not take the streams"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Still waiting for the queries a second later.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(bank.peer_streams(), before + 20);
    peer.conn.close(0u32.into(), b"gone");
    drop(streams);
    let t = Instant::now();
    while bank.peer_streams() > before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{} peer streams still served {:?} after the peer left",
            bank.peer_streams() - before,
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "20 streams waiting for unknown queries ended {:.3} s after the peer left",
        t.elapsed().as_secs_f64()
    );
    platform.shutdown().await;
    bank.shutdown().await;
}
