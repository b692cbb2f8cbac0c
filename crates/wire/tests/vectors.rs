//! The wire format, pinned: every message (and every analyst request and
//! response) as checked-in hex in `tests/vectors.txt`, and `bad_*` frames
//! with the exact error the decoder must give. A change to any encoding
//! fails here, so the format is what this file says, not whatever the
//! serializer happens to emit.
//!
//! A few frames are also assembled byte by byte below, from the layout
//! docs/protocol.md describes (`[version][type][body]`, fixed-width little
//! endian integers, `u32` enum variant indices, `u64` length prefixes), as
//! a check that does not go through the serializer at all.
//!
//! After an intended change of the format (say in the commit whether it
//! needs a new `PROTOCOL_VERSION`: one that old peers or clients would
//! misread does), rewrite the file with
//! `CLEANROOM_WRITE_VECTORS=1 cargo test -p cleanroom-wire --test vectors`
//! and review its diff.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;

use cleanroom_wire::{
    Abort, AbortCode, AnalystRequest, AnalystResponse, BudgetInfo, JoinAccept, JoinOffer, LegacyQueryShare,
    MAX_MESSAGE_LEN, MaskedRows, MatcherKey, Message, OtChoices, OtExtend, OtSetup, PROTOCOL_VERSION, Phase,
    PointChunk, PolicyMessage, QueryId, QueryRequest, QueryShare, Refusal, RefusalCode, RunId, ShareCheck, ShareHeld,
    TemplateInfo,
};

const FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors.txt");

fn query(template: &str, params: usize) -> QueryRequest {
    QueryRequest {
        query_id: QueryId([0x51; 16]),
        template: template.into(),
        params: (0..params).map(|i| (format!("p{i}"), "2026-01-01".into())).collect(),
    }
}

/// One of each message, with every analyst request and response.
fn good() -> Vec<(&'static str, Message)> {
    let s = [0x07; 16];
    vec![
        (
            "join_offer",
            Message::JoinOffer(JoinOffer {
                nonce: [0x01; 32],
                collaboration_id: "bank-x-platform".into(),
                rules_hash: [0x02; 32],
                matcher_set_size: 1000,
                context: [0x03; 32],
                blocks: vec![600, 400],
            }),
        ),
        (
            "join_accept",
            Message::JoinAccept(JoinAccept {
                session: cleanroom_wire::SessionId(s),
                nonce: [0x04; 32],
                holder_set_size: 5,
                dummy_rows: 62,
            }),
        ),
        (
            "matcher_key",
            Message::MatcherKey(MatcherKey {
                session: cleanroom_wire::SessionId(s),
                key: [0x05; 32],
            }),
        ),
        (
            "matcher_tokens",
            Message::MatcherTokens(PointChunk {
                session: cleanroom_wire::SessionId(s),
                seq: 0,
                points: vec![0x09; 64],
            }),
        ),
        (
            "holder_rows",
            Message::HolderRows(PointChunk {
                session: cleanroom_wire::SessionId(s),
                seq: 3,
                points: vec![0x0a; 32],
            }),
        ),
        (
            "holder_tokens",
            Message::HolderTokens(PointChunk {
                session: cleanroom_wire::SessionId(s),
                seq: 1,
                points: vec![0x0b; 32],
            }),
        ),
        (
            "ot_setup",
            Message::OtSetup(OtSetup {
                session: cleanroom_wire::SessionId(s),
                join_session: cleanroom_wire::SessionId([0x08; 16]),
                query_id: QueryId([0x09; 16]),
                nonce: [0x0a; 32],
                rows: 1062,
                width: 33,
                plan: [0x0c; 32],
                group: 2,
                base_point: [0x0b; 32],
            }),
        ),
        (
            "ot_choices",
            Message::OtChoices(OtChoices {
                session: cleanroom_wire::SessionId(s),
                nonce: [0x03; 32],
                points: vec![0x0c; 128 * 32],
            }),
        ),
        (
            "ot_extend",
            Message::OtExtend(OtExtend {
                session: cleanroom_wire::SessionId(s),
                seq: 0,
                columns: vec![0x0d; 128 * 16],
            }),
        ),
        (
            "masked_rows",
            Message::MaskedRows(MaskedRows {
                session: cleanroom_wire::SessionId(s),
                seq: 4,
                words: vec![0x0e; 16],
            }),
        ),
        (
            "abort",
            Message::Abort(Abort {
                session: cleanroom_wire::SessionId(s),
                code: AbortCode::UnknownJoin,
            }),
        ),
        ("request_templates", Message::AnalystRequest(AnalystRequest::Templates)),
        ("request_budget", Message::AnalystRequest(AnalystRequest::Budget)),
        (
            "request_query",
            Message::AnalystRequest(AnalystRequest::Query(query("spend_by_category", 2))),
        ),
        (
            "request_cancel",
            Message::AnalystRequest(AnalystRequest::Cancel(QueryId([0x52; 16]))),
        ),
        (
            "request_admit",
            Message::AnalystRequest(AnalystRequest::Admit(query("overlap", 0))),
        ),
        (
            "response_templates",
            Message::AnalystResponse(AnalystResponse::Templates(vec![TemplateInfo {
                name: "overlap".into(),
                kind: "SELECT COUNT(DISTINCT b.customer) FROM bank b JOIN platform p".into(),
                params: vec![("start".into(), "a date".into())],
                rho: "0.1".into(),
                min_count: 20,
            }])),
        ),
        (
            "response_budget",
            Message::AnalystResponse(AnalystResponse::Budget(BudgetInfo {
                node: "bank".into(),
                analyst: "alice".into(),
                rho_limit_micro: 20_000_000,
                rho_spent_micro: 100_000,
                period_days: 30,
                period_ends_day: 20_610,
            })),
        ),
        (
            "response_share_legacy",
            Message::AnalystResponse(AnalystResponse::LegacyShare(Box::new(LegacyQueryShare {
                node: "platform".into(),
                query_id: QueryId([0x51; 16]),
                plan: [0x0f; 32],
                cells: vec!["customers".into(), "spend".into()],
                weights: vec![1, 3],
                count_cells: vec![0, 0],
                units: vec!["count".into(), "cents".into()],
                ratios: vec![("avg".into(), 1, 0)],
                words: vec![u64::MAX, 7],
                sigma: 2.5,
                min_count: 20,
                rho: "0.1".into(),
                timings: vec![(Phase::Join, 0.25)],
                replayed: false,
                run: RunId([0x10; 16]),
            }))),
        ),
        (
            "response_share",
            Message::AnalystResponse(AnalystResponse::Share(Box::new(QueryShare {
                node: "platform".into(),
                query_id: QueryId([0x51; 16]),
                plan: [0x0f; 32],
                cells: vec!["customers".into(), "spend".into()],
                bits: vec![21, 64],
                weights: vec![1, 1],
                count_cells: vec![0, 0],
                units: vec!["count".into(), "cents".into()],
                ratios: vec![("avg".into(), 1, 0)],
                words: vec![(1 << 21) - 1, 7],
                sigmas: vec![2.5, 0.5],
                min_count: 20,
                rho: "0.1".into(),
                timings: vec![(Phase::Join, 0.25)],
                replayed: false,
                run: RunId([0x10; 16]),
            }))),
        ),
        (
            "response_refused",
            Message::AnalystResponse(AnalystResponse::Refused(Refusal::new(
                RefusalCode::RunLimit,
                "run limit on the bank node",
            ))),
        ),
        (
            "response_cancelled",
            Message::AnalystResponse(AnalystResponse::Cancelled(true)),
        ),
        ("response_admitted", Message::AnalystResponse(AnalystResponse::Admitted)),
        (
            "policy",
            Message::Policy(PolicyMessage {
                signed: b"{\"role\":\"bank\"}".to_vec(),
            }),
        ),
        (
            "share_check",
            Message::ShareCheck(ShareCheck {
                query_id: QueryId([0x51; 16]),
                run: RunId([0x10; 16]),
            }),
        ),
        (
            "share_held",
            Message::ShareHeld(ShareHeld {
                query_id: QueryId([0x51; 16]),
                held: true,
                busy: false,
            }),
        ),
        (
            "shard_join",
            Message::ShardJoin(cleanroom_wire::ShardJoin {
                shards: 16,
                shard: 5,
                shard_key_id: [0x61; 32],
                set: [0x62; 16],
                base_context: [0x63; 32],
            }),
        ),
        (
            "shard_batch",
            Message::ShardBatch(cleanroom_wire::ShardBatch {
                shards: 2,
                shard: 1,
                joins: vec![
                    cleanroom_wire::SessionId([0x64; 16]),
                    cleanroom_wire::SessionId([0x65; 16]),
                ],
            }),
        ),
    ]
}

fn encoded(name: &str) -> Vec<u8> {
    let (_, m) = good()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no sample {name}"));
    m.encode().unwrap()
}

/// The `response_share` sample with these timings.
fn share_with(edit: impl FnOnce(&mut QueryShare)) -> Message {
    let (_, mut m) = good()
        .into_iter()
        .find(|(n, _)| *n == "response_share")
        .unwrap_or_else(|| panic!("no sample response_share"));
    if let Message::AnalystResponse(AnalystResponse::Share(s)) = &mut m {
        edit(s);
    }
    m
}

fn share_with_timings(timings: Vec<(Phase, f64)>) -> Message {
    share_with(|s| s.timings = timings)
}

fn legacy_share_with_timings(timings: Vec<(Phase, f64)>) -> Message {
    let (_, mut m) = good()
        .into_iter()
        .find(|(n, _)| *n == "response_share_legacy")
        .unwrap_or_else(|| panic!("no sample response_share_legacy"));
    if let Message::AnalystResponse(AnalystResponse::LegacyShare(s)) = &mut m {
        s.timings = timings;
    }
    m
}

fn with(mut frame: Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    f(&mut frame);
    frame
}

/// Frames the decoder must refuse, each with its exact error.
fn bad() -> Vec<(&'static str, Vec<u8>)> {
    let abort = encoded("abort");
    let mut over = vec![PROTOCOL_VERSION, 4];
    over.extend_from_slice(&[0x07; 16]);
    over.extend_from_slice(&0u32.to_le_bytes());
    over.extend_from_slice(&u64::MAX.to_le_bytes());
    let encode = |m: Message| m.encode().unwrap();
    vec![
        ("bad_empty", vec![]),
        ("bad_header_only", vec![PROTOCOL_VERSION]),
        ("bad_version", with(abort.clone(), |f| f[0] = 2)),
        ("bad_type", with(abort.clone(), |f| f[1] = 99)),
        ("bad_trailing_byte", with(abort.clone(), |f| f.push(0))),
        ("bad_abort_code", with(abort.clone(), |f| f[18] = 7)),
        ("bad_truncated_abort", with(abort.clone(), |f| f.truncate(f.len() - 1))),
        ("bad_length_over_limit", over),
        ("bad_request_variant", vec![PROTOCOL_VERSION, 20, 99, 0, 0, 0]),
        ("bad_refusal_code", with(encoded("response_refused"), |f| f[6] = 99)),
        ("bad_bool", with(encoded("share_held"), |f| f[18] = 2)),
        // S = 1 is not a split; shard 16 of 16 does not exist.
        ("bad_shard_count", with(encoded("shard_join"), |f| f[2] = 1)),
        ("bad_shard_index", with(encoded("shard_join"), |f| f[6] = 16)),
        // Two shards, one join.
        (
            "bad_shard_joins",
            with(encoded("shard_batch"), |f| {
                f[10] = 1;
                f.truncate(f.len() - 16);
            }),
        ),
        (
            "bad_points_not_whole",
            encode(Message::HolderRows(PointChunk {
                session: cleanroom_wire::SessionId([0; 16]),
                seq: 0,
                points: vec![1; 33],
            })),
        ),
        (
            "bad_points_empty",
            encode(Message::MatcherTokens(PointChunk {
                session: cleanroom_wire::SessionId([0; 16]),
                seq: 0,
                points: vec![],
            })),
        ),
        (
            "bad_ot_choices_127",
            encode(Message::OtChoices(OtChoices {
                session: cleanroom_wire::SessionId([0; 16]),
                nonce: [0; 32],
                points: vec![1; 127 * 32],
            })),
        ),
        (
            "bad_ot_extend_partial",
            encode(Message::OtExtend(OtExtend {
                session: cleanroom_wire::SessionId([0; 16]),
                seq: 0,
                columns: vec![1; 100],
            })),
        ),
        (
            "bad_masked_rows_partial_word",
            encode(Message::MaskedRows(MaskedRows {
                session: cleanroom_wire::SessionId([0; 16]),
                seq: 0,
                words: vec![1; 12],
            })),
        ),
        (
            "bad_join_offer_no_blocks",
            encode(Message::JoinOffer(JoinOffer {
                nonce: [0; 32],
                collaboration_id: "x".into(),
                rules_hash: [0; 32],
                matcher_set_size: 1,
                context: [0; 32],
                blocks: vec![],
            })),
        ),
        (
            "bad_collaboration_id_too_long",
            encode(Message::JoinOffer(JoinOffer {
                nonce: [0; 32],
                collaboration_id: "x".repeat(129),
                rules_hash: [0; 32],
                matcher_set_size: 1,
                context: [0; 32],
                blocks: vec![1],
            })),
        ),
        (
            "bad_query_template_too_long",
            encode(Message::AnalystRequest(AnalystRequest::Query(query(
                &"t".repeat(129),
                0,
            )))),
        ),
        (
            "bad_admit_too_many_params",
            encode(Message::AnalystRequest(AnalystRequest::Admit(query("overlap", 33)))),
        ),
        (
            "bad_share_timing_label_too_long",
            encode(share_with_timings(vec![(Phase::Other("t".repeat(129)), 0.5)])),
        ),
        (
            "bad_share_too_many_timings",
            encode(share_with_timings(vec![(Phase::Join, 0.5); 65])),
        ),
        (
            "bad_legacy_share_too_many_timings",
            encode(legacy_share_with_timings(vec![(Phase::Join, 0.5); 65])),
        ),
        ("bad_share_cell_bits_zero", encode(share_with(|s| s.bits[0] = 0))),
        ("bad_share_cell_bits_over_64", encode(share_with(|s| s.bits[1] = 65))),
        ("bad_share_bits_per_cell", encode(share_with(|s| s.bits.push(8)))),
    ]
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn render() -> String {
    let mut out = String::from(
        "# cleanroom wire vectors: `name hex` for frames that decode, `name hex error` for frames refused with that error.\n",
    );
    for (name, m) in good() {
        let _ = writeln!(out, "{name} {}", hex(&m.encode().unwrap()));
    }
    for (name, frame) in bad() {
        let err = Message::decode(&frame).expect_err(name);
        let _ = writeln!(
            out,
            "{name} {} {err:?}",
            if frame.is_empty() { "-".into() } else { hex(&frame) }
        );
    }
    out
}

#[test]
fn every_message_matches_its_checked_in_vector() {
    if std::env::var_os("CLEANROOM_WRITE_VECTORS").is_some() {
        std::fs::write(FILE, render()).unwrap();
    }
    let text = std::fs::read_to_string(FILE).unwrap();
    let lines: Vec<(&str, &str, Option<&str>)> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let mut parts = l.splitn(3, ' ');
            (parts.next().unwrap(), parts.next().unwrap(), parts.next())
        })
        .collect();
    let good = good();
    let bad = bad();
    assert_eq!(lines.len(), good.len() + bad.len(), "vectors in the file");
    for (name, m) in &good {
        let (_, h, rest) = lines
            .iter()
            .find(|(n, ..)| n == name)
            .unwrap_or_else(|| panic!("no vector {name}"));
        assert!(rest.is_none(), "{name}");
        let frame = unhex(h);
        assert_eq!(hex(&m.encode().unwrap()), *h, "{name}: the encoding changed");
        assert_eq!(&Message::decode(&frame).unwrap(), m, "{name}: the decoding changed");
    }
    for (name, frame) in &bad {
        let (_, h, err) = lines
            .iter()
            .find(|(n, ..)| n == name)
            .unwrap_or_else(|| panic!("no vector {name}"));
        let pinned = if *h == "-" { Vec::new() } else { unhex(h) };
        assert_eq!(&pinned, frame, "{name}: the bad frame changed");
        let got = Message::decode(&pinned).expect_err(name);
        assert_eq!(Some(format!("{got:?}").as_str()), *err, "{name}");
    }
    // Every message type is covered.
    let mut types: Vec<u8> = good.iter().map(|(_, m)| m.encode().unwrap()[1]).collect();
    types.dedup();
    types.sort_unstable();
    types.dedup();
    assert_eq!(types, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26]);
}

/// The layout, byte by byte, without the serializer.
#[test]
fn frames_assembled_by_hand_match_the_encoder() {
    let cat = |parts: &[&[u8]]| parts.concat();
    let s = [0x07u8; 16];
    // Abort: session, code as u16.
    assert_eq!(
        encoded("abort"),
        cat(&[&[PROTOCOL_VERSION, 11], &s, &5u16.to_le_bytes()])
    );
    // ShareHeld: query id, two bools as one byte each.
    assert_eq!(
        encoded("share_held"),
        cat(&[&[PROTOCOL_VERSION, 24], &[0x51; 16], &[1, 0]])
    );
    // ShardJoin: S and s as u32, the key id, the set, the base context.
    assert_eq!(
        encoded("shard_join"),
        cat(&[
            &[PROTOCOL_VERSION, 25],
            &16u32.to_le_bytes(),
            &5u32.to_le_bytes(),
            &[0x61; 32],
            &[0x62; 16],
            &[0x63; 32]
        ])
    );
    // ShardBatch: S and s as u32, the joins as a u64 count and 16 bytes each.
    assert_eq!(
        encoded("shard_batch"),
        cat(&[
            &[PROTOCOL_VERSION, 26],
            &2u32.to_le_bytes(),
            &1u32.to_le_bytes(),
            &2u64.to_le_bytes(),
            &[0x64; 16],
            &[0x65; 16]
        ])
    );
    // AnalystRequest::Cancel is variant 3: a u32 index, then the id.
    assert_eq!(
        encoded("request_cancel"),
        cat(&[&[PROTOCOL_VERSION, 20], &3u32.to_le_bytes(), &[0x52; 16]])
    );
    // AnalystRequest::Admit is variant 4: the id, the template as a u64
    // length and its bytes, the parameters as a u64 count.
    assert_eq!(
        encoded("request_admit"),
        cat(&[
            &[PROTOCOL_VERSION, 20],
            &4u32.to_le_bytes(),
            &[0x51; 16],
            &7u64.to_le_bytes(),
            b"overlap",
            &0u64.to_le_bytes(),
        ])
    );
    // AnalystResponse::Admitted is variant 5, with no body.
    assert_eq!(
        encoded("response_admitted"),
        cat(&[&[PROTOCOL_VERSION, 21], &5u32.to_le_bytes()])
    );
    // AnalystResponse::Refused is variant 3: the code's index, then the words.
    let words = b"run limit on the bank node";
    assert_eq!(
        encoded("response_refused"),
        cat(&[
            &[PROTOCOL_VERSION, 21],
            &3u32.to_le_bytes(),
            &(RefusalCode::RunLimit as u32).to_le_bytes(),
            &(words.len() as u64).to_le_bytes(),
            words,
        ])
    );
    // Point chunks carry one length-prefixed byte string.
    assert_eq!(
        encoded("holder_rows"),
        cat(&[
            &[PROTOCOL_VERSION, 5],
            &s,
            &3u32.to_le_bytes(),
            &32u64.to_le_bytes(),
            &[0x0a; 32]
        ])
    );
    assert!(MAX_MESSAGE_LEN >= encoded("ot_choices").len());
}
