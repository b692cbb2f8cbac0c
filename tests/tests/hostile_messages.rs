//! Hostile peer messages fed to the state machines: each must end in a
//! typed error (never a panic, never a wrong answer).

mod common;

use cleanroom_crypto::CryptoError;
use cleanroom_protocol::ProtocolError;
use cleanroom_protocol::aggregate::{HolderAggregate, MatcherAggregate, RowValues};
use cleanroom_protocol::join::{
    HolderJoin, HolderPolicy, HolderStreaming, JoinParams, MatcherJoin, MatcherPolicy, MatcherStreaming, OwnIds,
    SetSizeLimits,
};
use cleanroom_sim::driver::{run_join, shared};
use cleanroom_wire::{
    Abort, JoinOffer, MaskedRows, MatcherKey, Message, OtChoices, OtExtend, OtSetup, PointChunk, SessionId, WireError,
};
use curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT;
use curve25519_dalek::scalar::Scalar;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn point(k: u64) -> [u8; 32] {
    (Scalar::from(k) * RISTRETTO_BASEPOINT_POINT).compress().to_bytes()
}

fn points(ks: &[u64]) -> Vec<u8> {
    ks.iter().flat_map(|k| point(*k)).collect()
}

fn frame(m: Message) -> Vec<u8> {
    m.encode().unwrap()
}

/// Offer and accept done honestly; returns both streaming parties.
fn streaming(n: usize, m: usize, seed: u64) -> (HolderStreaming, MatcherStreaming) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let h = common::holder(common::ids("h", 0..n), 64);
    let mm = common::matcher(common::ids("m", 0..m), 64);
    let (offered, offer) = mm.offer(&mut rng).unwrap();
    let (hs, accept) = h.on_offer(&frame(offer), &mut rng).unwrap().charge_recorded();
    let ms = offered.on_accept(&frame(accept)).unwrap();
    (hs, ms)
}

fn tokens(session: SessionId, seq: u32, pts: Vec<u8>) -> Vec<u8> {
    frame(Message::MatcherTokens(PointChunk {
        session,
        seq,
        points: pts,
    }))
}

fn key(session: SessionId) -> Vec<u8> {
    frame(Message::MatcherKey(MatcherKey {
        session,
        key: point(99),
    }))
}

#[test]
fn holder_refuses_malformed_frames() {
    let (mut h, _) = streaming(10, 10, 1);
    let s = h.session();
    let good = tokens(s, 0, points(&[1, 2]));
    // Truncated at every length.
    for cut in 0..good.len() {
        let e = h.handle(&good[..cut]).unwrap_err();
        assert!(matches!(e, ProtocolError::Wire(_)), "cut {cut}: {e:?}");
    }
    // Unknown type byte.
    let mut f = good.clone();
    f[1] = 200;
    assert_eq!(
        h.handle(&f).unwrap_err(),
        ProtocolError::Wire(WireError::UnknownType { got: 200 })
    );
    // A valid type from the wrong direction.
    let mut f = good.clone();
    f[1] = 5; // HolderRows
    assert!(matches!(
        h.handle(&f).unwrap_err(),
        ProtocolError::UnexpectedMessage { got: "HolderRows", .. }
    ));
    // Wrong version.
    let mut f = good.clone();
    f[0] = 9;
    assert_eq!(
        h.handle(&f).unwrap_err(),
        ProtocolError::Wire(WireError::UnsupportedVersion { got: 9 })
    );
    // An oversized length prefix.
    let mut f = vec![1u8, 4];
    f.extend_from_slice(&s.0);
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&(1u64 << 40).to_le_bytes());
    f.extend_from_slice(&[0u8; 64]);
    assert!(matches!(
        h.handle(&f).unwrap_err(),
        ProtocolError::Wire(WireError::Malformed { .. })
    ));
    // Trailing bytes.
    let mut f = good.clone();
    f.push(0);
    assert!(matches!(
        h.handle(&f).unwrap_err(),
        ProtocolError::Wire(WireError::TrailingBytes { .. })
    ));
    // After all that, the honest messages still go through.
    h.handle(&key(s)).unwrap();
    h.handle(&good).unwrap();
}

#[test]
fn holder_refuses_bad_points() {
    let (mut h, _) = streaming(10, 10, 2);
    let s = h.session();
    // Tokens before the key: out of order.
    assert!(matches!(
        h.handle(&tokens(s, 0, points(&[1]))).unwrap_err(),
        ProtocolError::UnexpectedMessage {
            got: "MatcherTokens",
            ..
        }
    ));
    // The identity as the matcher's key.
    let f = frame(Message::MatcherKey(MatcherKey {
        session: s,
        key: [0u8; 32],
    }));
    assert_eq!(
        h.handle(&f).unwrap_err(),
        ProtocolError::Crypto(CryptoError::IdentityPoint)
    );
    h.handle(&key(s)).unwrap();
    // A second key.
    assert!(matches!(
        h.handle(&key(s)).unwrap_err(),
        ProtocolError::UnexpectedMessage { .. }
    ));
    // A non-canonical encoding (p itself) among good points.
    let mut pts = points(&[1, 2]);
    let mut p = [0xffu8; 32];
    p[0] = 0xed;
    p[31] = 0x7f;
    pts.extend_from_slice(&p);
    assert_eq!(
        h.handle(&tokens(s, 0, pts)).unwrap_err(),
        ProtocolError::Crypto(CryptoError::NonCanonicalPoint)
    );
    // The identity.
    let mut pts = points(&[1]);
    pts.extend_from_slice(&[0u8; 32]);
    assert_eq!(
        h.handle(&tokens(s, 0, pts)).unwrap_err(),
        ProtocolError::Crypto(CryptoError::IdentityPoint)
    );
    // Not a whole number of points.
    let mut pts = points(&[1]);
    pts.push(0);
    assert!(matches!(
        h.handle(&tokens(s, 0, pts)).unwrap_err(),
        ProtocolError::Wire(WireError::FieldLength { .. })
    ));
    // Out of sequence.
    assert_eq!(
        h.handle(&tokens(s, 3, points(&[1]))).unwrap_err(),
        ProtocolError::OutOfOrder {
            stream: "matcher tokens",
            expected: 0,
            got: 3
        }
    );
    // More tokens than announced (m = 10).
    assert!(matches!(
        h.handle(&tokens(s, 0, points(&(1..=11).collect::<Vec<_>>())))
            .unwrap_err(),
        ProtocolError::Count { .. }
    ));
}

#[test]
fn holder_detects_duplicate_tokens() {
    let (mut h, _) = streaming(10, 4, 3);
    let s = h.session();
    h.handle(&key(s)).unwrap();
    h.handle(&tokens(s, 0, points(&[1, 2]))).unwrap();
    // The last chunk repeats a point of the first: caught when the set is complete.
    assert_eq!(
        h.handle(&tokens(s, 1, points(&[3, 1]))).unwrap_err(),
        ProtocolError::Crypto(CryptoError::DuplicatePoint)
    );
}

#[test]
fn messages_from_another_session_are_refused() {
    let (mut h1, mut m1) = streaming(10, 10, 4);
    let (h2, mut m2) = streaming(10, 10, 5);
    assert_ne!(h1.session(), h2.session());
    let k2 = m2.poll_transmit().unwrap();
    assert_eq!(h1.handle(&frame(k2)).unwrap_err(), ProtocolError::WrongSession);
    let mut h2 = h2;
    let rows2 = h2.poll_transmit().unwrap();
    assert_eq!(m1.handle(&frame(rows2)).unwrap_err(), ProtocolError::WrongSession);
    // An abort for this session is reported as such.
    let f = frame(Message::Abort(Abort {
        session: h1.session(),
        code: cleanroom_wire::AbortCode::BadMessage,
    }));
    assert_eq!(
        h1.handle(&f).unwrap_err(),
        ProtocolError::PeerAborted {
            code: cleanroom_wire::AbortCode::BadMessage
        }
    );
}

#[test]
fn offers_outside_the_policy_are_refused() {
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let offer = |rules: [u8; 32], collab: &str, m: u64| {
        frame(Message::JoinOffer(JoinOffer {
            nonce: [1; 32],
            collaboration_id: collab.to_string(),
            rules_hash: rules,
            matcher_set_size: m,
            context: common::params(64).context,
            blocks: vec![m],
        }))
    };
    let h = || common::holder(common::ids("h", 0..5), 64);
    let rules = common::params(64).rules_hash;
    assert_eq!(
        h().on_offer(&offer([0; 32], common::COLLAB, 5), &mut rng).unwrap_err(),
        ProtocolError::ParameterMismatch {
            what: "identifier normalisation rules"
        }
    );
    assert_eq!(
        h().on_offer(&offer(rules, "another", 5), &mut rng).unwrap_err(),
        ProtocolError::ParameterMismatch {
            what: "collaboration id"
        }
    );
    assert!(matches!(
        h().on_offer(&offer(rules, common::COLLAB, u64::MAX), &mut rng)
            .unwrap_err(),
        ProtocolError::PeerSetSize { .. }
    ));
    // A holder with a minimum set size refuses a small matcher.
    let strict = HolderJoin::new(
        common::params(64),
        HolderPolicy {
            peer_set: SetSizeLimits { min: 100, max: 1000 },
            cardinality: cleanroom_crypto::dp::ShiftedTruncatedLaplace::new(1, 1, 1000).unwrap(),
        },
        common::ids("h", 0..5),
    )
    .unwrap();
    assert_eq!(
        strict
            .on_offer(&offer(rules, common::COLLAB, 99), &mut rng)
            .unwrap_err(),
        ProtocolError::PeerSetSize {
            size: 99,
            min: 100,
            max: 1000
        }
    );
    // Something other than an offer first.
    assert!(matches!(
        h().on_offer(&key(cleanroom_wire::SessionId([0; 16])), &mut rng)
            .unwrap_err(),
        ProtocolError::UnexpectedMessage { .. }
    ));
}

#[test]
fn matcher_refuses_bad_accepts() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let run = |policy: MatcherPolicy, tamper: &dyn Fn(&mut cleanroom_wire::JoinAccept)| {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let h = common::holder(common::ids("h", 0..20), 64);
        let m = MatcherJoin::new(common::params(64), policy, common::ids("m", 0..5)).unwrap();
        let (offered, offer) = m.offer(&mut rng).unwrap();
        let (_, accept) = h.on_offer(&frame(offer), &mut rng).unwrap().charge_recorded();
        let Message::JoinAccept(mut a) = accept else {
            unreachable!()
        };
        tamper(&mut a);
        offered.on_accept(&frame(Message::JoinAccept(a)))
    };
    let open = MatcherPolicy {
        peer_set: common::limits(),
        max_dummy_rows: 1000,
        block_padding: None,
    };
    assert!(run(open.clone(), &|_| {}).is_ok());
    assert_eq!(
        run(open.clone(), &|a| a.session.0[0] ^= 1).unwrap_err(),
        ProtocolError::WrongSession
    );
    // Changing the announced sizes changes the session id: refused.
    assert_eq!(
        run(open, &|a| a.holder_set_size += 1).unwrap_err(),
        ProtocolError::WrongSession
    );
    let few_dummies = MatcherPolicy {
        peer_set: common::limits(),
        max_dummy_rows: 8,
        block_padding: None,
    };
    assert_eq!(
        run(few_dummies, &|_| {}).unwrap_err(),
        ProtocolError::DummyRows { got: 32, max: 8 }
    );
    let big_holders = MatcherPolicy {
        peer_set: SetSizeLimits { min: 50, max: 100 },
        max_dummy_rows: 1000,
        block_padding: None,
    };
    assert!(matches!(
        run(big_holders, &|_| {}).unwrap_err(),
        ProtocolError::PeerSetSize { size: 20, .. }
    ));
    let _ = &mut rng;
}

#[test]
fn matcher_refuses_bad_rows_and_tokens() {
    let (mut h, mut m) = streaming(3, 3, 9);
    let s = m.session();
    let rows = |seq: u32, pts: Vec<u8>| {
        frame(Message::HolderRows(PointChunk {
            session: s,
            seq,
            points: pts,
        }))
    };
    let toks = |seq: u32, pts: Vec<u8>| {
        frame(Message::HolderTokens(PointChunk {
            session: s,
            seq,
            points: pts,
        }))
    };
    assert_eq!(
        m.handle(&rows(0, vec![0u8; 32])).unwrap_err(),
        ProtocolError::Crypto(CryptoError::IdentityPoint)
    );
    assert_eq!(
        m.handle(&rows(1, points(&[1]))).unwrap_err(),
        ProtocolError::OutOfOrder {
            stream: "holder rows",
            expected: 0,
            got: 1
        }
    );
    assert_eq!(
        m.handle(&toks(0, vec![0u8; 32])).unwrap_err(),
        ProtocolError::Crypto(CryptoError::IdentityPoint)
    );
    let mut odd = point(5);
    odd[0] |= 1;
    assert_eq!(
        m.handle(&toks(0, odd.to_vec())).unwrap_err(),
        ProtocolError::Crypto(CryptoError::NonCanonicalPoint)
    );
    assert_eq!(
        m.handle(&toks(0, points(&[4, 4]))).unwrap_err(),
        ProtocolError::Crypto(CryptoError::DuplicatePoint)
    );
    // More rows than n + D_max = 3 + 32.
    assert!(matches!(
        m.handle(&rows(0, points(&(1..=36).collect::<Vec<_>>()))).unwrap_err(),
        ProtocolError::Count { .. }
    ));
    // finish before the end.
    let _ = h.poll_transmit();
    assert!(matches!(m.finish().unwrap_err(), ProtocolError::Incomplete { .. }));
}

#[test]
fn matcher_detects_duplicate_rows() {
    // An honest run, except that the holder's row stream repeats a row.
    let (mut h, mut m) = streaming(2, 2, 10);
    let s = m.session();
    while let Some(msg) = m.poll_transmit() {
        h.handle(&frame(msg)).unwrap();
    }
    let mut first_row = None;
    while let Some(msg) = h.poll_transmit() {
        if let Message::HolderRows(mut c) = msg {
            // Replace the last row with the first.
            let first: Vec<u8> = c.points[..32].to_vec();
            first_row.get_or_insert(first.clone());
            let len = c.points.len();
            c.points[len - 32..].copy_from_slice(first_row.as_ref().unwrap());
            m.handle(&frame(Message::HolderRows(c))).unwrap();
        } else {
            m.handle(&frame(msg)).unwrap();
        }
    }
    assert_eq!(m.session(), s);
    assert!(m.is_done());
    assert_eq!(
        m.finish().unwrap_err(),
        ProtocolError::Crypto(CryptoError::DuplicatePoint)
    );
}

#[test]
fn aggregate_refuses_hostile_messages() {
    let mut rng_h = ChaCha20Rng::seed_from_u64(11);
    let mut rng_m = ChaCha20Rng::seed_from_u64(12);
    let h = common::holder(common::ids("x", 0..300), 64);
    let m = common::matcher(common::ids("x", 100..400), 64);
    let (hj, mj, _) = run_join(h, m, &mut rng_h, &mut rng_m, |_| {}).unwrap();
    let hj = shared(hj);
    let qid = [3u8; 16];
    let width = 2;
    let values = || RowValues::new(width, vec![1; 600]).unwrap();

    // Setups that do not fit the join or the query.
    let (_, setup) = MatcherAggregate::start(
        &mj,
        mj.matched(),
        width,
        cleanroom_wire::QueryId(qid),
        [5; 32],
        0,
        &mut rng_m,
    )
    .unwrap();
    let Message::OtSetup(good) = setup else { unreachable!() };
    let try_setup = |f: &dyn Fn(&mut OtSetup)| {
        let mut s = good.clone();
        f(&mut s);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        HolderAggregate::new(hj.clone(), values(), cleanroom_wire::QueryId(qid), [5; 32], 0)
            .unwrap()
            .on_setup(&frame(Message::OtSetup(s)), &mut rng)
            .map(|_| ())
    };
    assert!(try_setup(&|_| {}).is_ok());
    assert_eq!(
        try_setup(&|s| s.join_session.0[0] ^= 1).unwrap_err(),
        ProtocolError::WrongSession
    );
    assert_eq!(
        try_setup(&|s| s.query_id.0[0] ^= 1).unwrap_err(),
        ProtocolError::ParameterMismatch { what: "query id" }
    );
    assert_eq!(
        try_setup(&|s| s.width = 3).unwrap_err(),
        ProtocolError::ParameterMismatch { what: "output width" }
    );
    assert_eq!(
        try_setup(&|s| s.rows += 1).unwrap_err(),
        ProtocolError::ParameterMismatch { what: "row count" }
    );
    assert_eq!(
        try_setup(&|s| s.nonce[0] ^= 1).unwrap_err(),
        ProtocolError::WrongSession
    );
    assert_eq!(
        try_setup(&|s| s.base_point = [0; 32]).unwrap_err(),
        ProtocolError::Crypto(CryptoError::IdentityPoint)
    );
    // The setup id, derived by hand from docs/protocol.md: SHA-256 over
    // length-prefixed parts, first 16 bytes. Its label names the row-mask
    // PRG's version, so a peer still on the AES-CTR masks of protocol
    // revision 1 (label "cleanroom-v1-aggregate-setup") is refused at the
    // setup instead of completing with masks that do not cancel.
    let by_hand = |label: &[u8], s: &OtSetup| {
        let (group, rows, width) = (s.group.to_le_bytes(), s.rows.to_le_bytes(), s.width.to_le_bytes());
        let parts: [&[u8]; 8] = [
            label,
            &s.join_session.0,
            &s.query_id.0,
            &s.plan,
            &group,
            &s.nonce,
            &rows,
            &width,
        ];
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for p in parts {
            ctx.update(&(p.len() as u32).to_le_bytes());
            ctx.update(p);
        }
        SessionId(ctx.finish().as_ref()[..16].try_into().unwrap())
    };
    assert_eq!(by_hand(b"cleanroom-v2-aggregate-setup", &good), good.session);
    assert_eq!(
        try_setup(&|s| s.session = by_hand(b"cleanroom-v1-aggregate-setup", s)).unwrap_err(),
        ProtocolError::WrongSession
    );

    // The matcher refuses bad base-OT answers.
    let (waiting, setup) = MatcherAggregate::start(
        &mj,
        mj.matched(),
        width,
        cleanroom_wire::QueryId(qid),
        [5; 32],
        0,
        &mut rng_m,
    )
    .unwrap();
    let (_, answer) = HolderAggregate::new(hj.clone(), values(), cleanroom_wire::QueryId(qid), [5; 32], 0)
        .unwrap()
        .on_setup(&frame(setup), &mut rng_h)
        .unwrap();
    let Message::OtChoices(mut bad) = answer.clone() else {
        unreachable!()
    };
    bad.points[..32].copy_from_slice(&[0u8; 32]);
    assert_eq!(
        waiting.on_choices(&frame(Message::OtChoices(bad))).unwrap_err(),
        ProtocolError::Crypto(CryptoError::IdentityPoint)
    );

    // A full honest start, then bad extension and masked-row messages.
    let (waiting, setup) = MatcherAggregate::start(
        &mj,
        mj.matched(),
        width,
        cleanroom_wire::QueryId(qid),
        [5; 32],
        0,
        &mut rng_m,
    )
    .unwrap();
    let (mut hr, answer) = HolderAggregate::new(hj.clone(), values(), cleanroom_wire::QueryId(qid), [5; 32], 0)
        .unwrap()
        .on_setup(&frame(setup), &mut rng_h)
        .unwrap();
    let Message::OtChoices(OtChoices {
        session: setup_session, ..
    }) = answer.clone()
    else {
        unreachable!()
    };
    let mut mr = waiting.on_choices(&frame(answer)).unwrap();
    let s = mr.session();
    assert_eq!(hr.session(), s);
    assert_ne!(s, setup_session);
    let Some(Message::OtExtend(ext)) = mr.poll_transmit() else {
        unreachable!()
    };
    // Whole 128-column words, but the wrong size for the chunk.
    let e = hr
        .handle(&frame(Message::OtExtend(OtExtend {
            columns: vec![0; 128 * 16 * 5],
            ..ext.clone()
        })))
        .unwrap_err();
    assert!(
        matches!(e, ProtocolError::Crypto(CryptoError::ExtensionLength { .. })),
        "{e:?}"
    );
    let e = hr
        .handle(&frame(Message::OtExtend(OtExtend { seq: 1, ..ext.clone() })))
        .unwrap_err();
    assert!(matches!(e, ProtocolError::OutOfOrder { .. }), "{e:?}");
    let e = hr
        .handle(&frame(Message::OtExtend(OtExtend {
            session: setup_session,
            ..ext.clone()
        })))
        .unwrap_err();
    assert_eq!(e, ProtocolError::WrongSession);
    let reply = hr.handle(&frame(Message::OtExtend(ext))).unwrap();
    let Message::MaskedRows(masked) = reply else {
        unreachable!()
    };
    let e = mr
        .handle(&frame(Message::MaskedRows(MaskedRows {
            words: vec![0; 8],
            ..masked.clone()
        })))
        .unwrap_err();
    assert!(matches!(e, ProtocolError::Count { .. }), "{e:?}");
    let e = mr
        .handle(&frame(Message::MaskedRows(MaskedRows {
            seq: 7,
            ..masked.clone()
        })))
        .unwrap_err();
    assert!(matches!(e, ProtocolError::OutOfOrder { .. }), "{e:?}");
    mr.handle(&frame(Message::MaskedRows(masked.clone()))).unwrap();
    // A replayed chunk once nothing is outstanding.
    let e = mr.handle(&frame(Message::MaskedRows(masked))).unwrap_err();
    assert!(matches!(e, ProtocolError::UnexpectedMessage { .. }), "{e:?}");
    // An extension chunk past the last row.
    let e = hr.handle(&frame(Message::OtExtend(OtExtend {
        session: s,
        seq: 1,
        columns: vec![0; 128 * 16],
    })));
    assert!(e.is_err());
}

#[test]
fn bad_local_input_is_refused() {
    let dup = vec![b"a".to_vec(), b"a".to_vec()];
    let e = MatcherJoin::new(
        common::params(64),
        MatcherPolicy {
            peer_set: common::limits(),
            max_dummy_rows: 10,
            block_padding: None,
        },
        dup,
    )
    .unwrap_err();
    assert!(!e.is_peer_fault());
    let bad = JoinParams {
        chunk_points: 0,
        ..common::params(64)
    };
    assert!(
        MatcherJoin::new(
            bad,
            MatcherPolicy {
                peer_set: common::limits(),
                max_dummy_rows: 10,
                block_padding: None,
            },
            vec![]
        )
        .is_err()
    );
    assert!(RowValues::new(0, vec![]).is_err());
    assert!(RowValues::new(3, vec![1; 4]).is_err());

    // Identifiers checked once (OwnIds): duplicates refused when made; a
    // matcher over them refuses block indices out of range or repeated.
    let dup = vec![b"a".to_vec(), b"b".to_vec(), b"a".to_vec()];
    assert!(!OwnIds::new(dup).unwrap_err().is_peer_fault());
    let ids = OwnIds::new(common::ids("x", 0..10)).unwrap();
    let policy = || MatcherPolicy {
        peer_set: common::limits(),
        max_dummy_rows: 10,
        block_padding: None,
    };
    for blocks in [vec![vec![0, 1, 1]], vec![vec![0, 10]]] {
        let e = MatcherJoin::grouped_from(common::params(64), policy(), &ids, &blocks).unwrap_err();
        assert!(!e.is_peer_fault(), "{e:?}");
    }
    assert!(MatcherJoin::grouped_from(common::params(64), policy(), &ids, &[vec![3, 1, 4]]).is_ok());
}

/// A join whose matcher is made from checked identifiers and block indices
/// (as the platform node makes it) and one whose matcher gets the same
/// identifiers as vectors match the same holder rows: same intersection,
/// same counts.
#[test]
fn a_matcher_from_indices_joins_as_one_from_identifiers() {
    let all = common::ids("u", 0..400);
    let picked: Vec<usize> = (0..400).filter(|k| k % 3 != 0).collect();
    let ids = OwnIds::new(all.clone()).unwrap();
    let policy = || MatcherPolicy {
        peer_set: common::limits(),
        max_dummy_rows: 64,
        block_padding: None,
    };
    let from_indices =
        MatcherJoin::grouped_from(common::params(64), policy(), &ids, std::slice::from_ref(&picked)).unwrap();
    let from_ids = MatcherJoin::new(
        common::params(64),
        policy(),
        picked.iter().map(|k| all[*k].clone()).collect(),
    )
    .unwrap();
    let mut results = Vec::new();
    for m in [from_indices, from_ids] {
        let h = common::holder(common::ids("u", 200..700), 64);
        let mut rng_h = ChaCha20Rng::seed_from_u64(5);
        let mut rng_m = ChaCha20Rng::seed_from_u64(6);
        let (hj, mj, _) = run_join(h, m, &mut rng_h, &mut rng_m, |_| {}).unwrap();
        // Real matches: matched rows that are one of the holder's customers
        // (the rest are its matching dummies).
        let real = (0..hj.rows())
            .filter(|i| mj.matched()[*i] && hj.customer_of_row(*i).is_some())
            .count();
        results.push((hj.rows(), mj.matched_count(), real));
    }
    // Users 200..400 not divisible by 3 are in both sets.
    let expected = (200..400).filter(|k| k % 3 != 0).count();
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0].2, expected);
}
