//! Fuzz target bodies, shared by the cargo-fuzz targets under `fuzz/` and
//! by the regression test that replays the checked-in corpora on stable
//! (`tests/tests/fuzz_regressions.rs`). Each takes arbitrary bytes and
//! panics only when a property the code promises is broken.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_crypto::shares::Share;
use cleanroom_protocol::aggregate::{HolderAggregate, RowValues};
use cleanroom_protocol::join::{HolderJoin, HolderPolicy, JoinParams, MatcherJoin, MatcherPolicy, SetSizeLimits};
use cleanroom_sim::driver::{Direction, run_aggregate_over, run_join_over, shared};
use cleanroom_wire::Message;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// A fuzz target body.
pub type Target = fn(&[u8]);

/// Set when a hostile wire changed a frame.
type Changed = std::rc::Rc<std::cell::Cell<bool>>;

/// The targets, by name (the fuzz binaries and the corpus folders).
pub const TARGETS: &[(&str, Target)] = &[
    ("wire_decode", wire_decode),
    ("node_config", node_config),
    ("sql", sql),
    ("state_file", state_file),
    ("join_machines", join_machines),
    ("aggregate_machines", aggregate_machines),
    ("node_requests", crate::node_fuzz::node_requests),
];

/// Every frame either fails to decode with a typed error, or decodes to a
/// message that passes validation and encodes back to exactly the same
/// bytes (the encoding is canonical: one message, one frame).
pub fn wire_decode(data: &[u8]) {
    if let Ok(m) = Message::decode(data) {
        let again = m
            .encode()
            .unwrap_or_else(|e| panic!("a decoded message does not encode: {e}"));
        assert_eq!(again, data, "non-canonical frame accepted for {}", m.kind());
    }
}

/// Node and analyst configs: parse, check and derive limits, domains and
/// templates (which parses each template's SQL) without panicking.
pub fn node_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/fuzz/node.toml");
    if let Ok(cfg) = cleanroom_node::config::NodeConfig::parse(text, path) {
        let _ = cfg.limits(path);
        let _ = cfg.domains();
        let _ = cfg.templates(path);
    }
    let _ = cleanroom_client::config::AnalystConfig::parse(text, path);
}

/// SQL against the demo schema: parsed or refused with a message, never a
/// panic; an accepted query binds to a plan whose cells are consistent.
pub fn sql(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let domains = cleanroom_query::Domains {
        categories: ["grocery", "travel", "dining", "other"].map(String::from).to_vec(),
        segments: ["gamer", "student", "other"].map(String::from).to_vec(),
        countries: ["GB", "FR"].map(String::from).to_vec(),
        key_slots: 1,
    };
    let mut params = BTreeMap::new();
    params.insert("segment".to_string(), "gamer".to_string());
    params.insert("since".to_string(), "2026-01-01".to_string());
    let _ = cleanroom_query::sql::parse(text, &domains.schema(), &params);
}

/// A state file of arbitrary bytes: the node opens it or refuses it with a
/// clear error (corruption, a broken audit chain), never a panic.
pub fn state_file(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    if std::fs::write(dir.path().join("state.db"), data).is_ok() {
        let _ = cleanroom_node::state::State::open(dir.path());
    }
}

/// What a hostile wire does to one frame.
#[derive(Arbitrary, Clone, Debug)]
pub(crate) enum Tamper {
    Deliver,
    Drop,
    Duplicate,
    FlipBit { at: u16, bit: u8 },
    Truncate { keep: u16 },
    Extend { bytes: Vec<u8> },
    Replace { bytes: Vec<u8> },
    Replay { earlier: u8 },
}

#[derive(Arbitrary, Debug)]
struct Script {
    seed: u64,
    shared: u8,
    only_holder: u8,
    only_matcher: u8,
    chunk: u8,
    /// Applied to the frames in the order they travel; once exhausted,
    /// frames are delivered as they are.
    tamper: Vec<Tamper>,
}

/// A wire that applies `script` frame by frame; returns whether it changed
/// anything.
pub(crate) fn hostile_wire(tamper: Vec<Tamper>) -> (impl FnMut(Direction, Vec<u8>) -> Vec<Vec<u8>>, Changed) {
    let changed = std::rc::Rc::new(std::cell::Cell::new(false));
    let flag = changed.clone();
    let mut script = tamper.into_iter();
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let wire = move |_: Direction, f: Vec<u8>| -> Vec<Vec<u8>> {
        seen.push(f.clone());
        let out = match script.next() {
            None | Some(Tamper::Deliver) => return vec![f],
            Some(Tamper::Drop) => vec![],
            Some(Tamper::Duplicate) => vec![f.clone(), f],
            Some(Tamper::FlipBit { at, bit }) => {
                let mut g = f;
                let at = usize::from(at) % g.len().max(1);
                if let Some(b) = g.get_mut(at) {
                    *b ^= 1 << (bit % 8);
                }
                vec![g]
            }
            Some(Tamper::Truncate { keep }) => {
                let mut g = f;
                g.truncate(usize::from(keep) % g.len().max(1));
                vec![g]
            }
            Some(Tamper::Extend { bytes }) => {
                let mut g = f;
                g.extend_from_slice(&bytes);
                vec![g]
            }
            Some(Tamper::Replace { bytes }) => vec![bytes],
            Some(Tamper::Replay { earlier }) => {
                let g = seen.get(usize::from(earlier) % seen.len()).cloned().unwrap_or_default();
                vec![g]
            }
        };
        if out.len() != 1 || out.first() != seen.last() {
            flag.set(true);
        }
        out
    };
    (wire, changed)
}

fn ids(prefix: &str, n: u8) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("email:{prefix}-{i}@example.com").into_bytes())
        .collect()
}

/// The fuzz joins' parameters (`chunk_points` from the script, at least
/// `min_chunk`) and both parties' policies (ε = 1, δ = 10^-3: few dummies).
fn fuzz_setup(s: &Script, min_chunk: usize) -> (JoinParams, HolderPolicy, MatcherPolicy) {
    let params = JoinParams {
        collaboration_id: "fuzz".into(),
        rules_hash: [7; 32],
        context: [9; 32],
        chunk_points: usize::from(s.chunk % 32) + min_chunk,
    };
    let limits = SetSizeLimits { min: 0, max: 1 << 20 };
    let holder = HolderPolicy {
        peer_set: limits,
        cardinality: ShiftedTruncatedLaplace::new(1, 1, 1000).expect("parameters"),
    };
    let matcher = MatcherPolicy {
        peer_set: limits,
        max_dummy_rows: 1000,
        block_padding: None,
    };
    (params, holder, matcher)
}

fn parties(s: &Script) -> (HolderJoin, MatcherJoin, Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut h = ids("shared", s.shared % 40);
    h.extend(ids("bank", s.only_holder % 40));
    let mut m = ids("shared", s.shared % 40);
    m.extend(ids("platform", s.only_matcher % 40));
    let (params, holder_policy, matcher_policy) = fuzz_setup(s, 1);
    let holder = HolderJoin::new(params.clone(), holder_policy, h.clone()).expect("holder");
    let matcher = MatcherJoin::new(params, matcher_policy, m.clone()).expect("matcher");
    (holder, matcher, h, m)
}

/// Both join machines talking through a hostile wire. Whatever the wire
/// does, each side ends with a typed error or a result, never a panic or a
/// hang; when the wire changed nothing, the result is exact.
pub fn join_machines(data: &[u8]) {
    let Ok(s) = Script::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let (holder, matcher, h, m) = parties(&s);
    let mut rng_h = ChaCha20Rng::seed_from_u64(s.seed);
    let mut rng_m = ChaCha20Rng::seed_from_u64(s.seed ^ 1);
    let (mut wire, changed) = hostile_wire(s.tamper.clone());
    let out = run_join_over(holder, matcher, &mut rng_h, &mut rng_m, |_| {}, &mut wire);
    if !changed.get() {
        let (hj, mj, _) = out.unwrap_or_else(|e| panic!("an honest join failed: {e}"));
        let mset: HashSet<&Vec<u8>> = m.iter().collect();
        let intersection = h.iter().filter(|x| mset.contains(x)).count() as u64;
        assert_eq!(mj.matched_count(), intersection + hj.matching_dummies());
    }
    // The same script against a multi-key join (rows of two key slots).
    let (holder, matcher, shared_customers) = multi_key_parties(&s);
    let mut rng_h = ChaCha20Rng::seed_from_u64(s.seed ^ 2);
    let mut rng_m = ChaCha20Rng::seed_from_u64(s.seed ^ 3);
    let (mut wire, changed) = hostile_wire(s.tamper);
    let out = run_join_over(holder, matcher, &mut rng_h, &mut rng_m, |_| {}, &mut wire);
    if !changed.get() {
        let (hj, mj, _) = out.unwrap_or_else(|e| panic!("an honest multi-key join failed: {e}"));
        assert_eq!(mj.matched_count(), shared_customers + hj.matching_dummies());
    }
}

/// A multi-key join over the script's sizes: shared customers have an
/// e-mail and a phone, and their platform user holds one of the two (the
/// e-mail for even ones, the phone for odd ones), so each matches once;
/// the bank's own customers have an e-mail, or no key at all; the
/// platform's own users an e-mail. Returns the parties and how many
/// customers match.
fn multi_key_parties(s: &Script) -> (HolderJoin, MatcherJoin, u64) {
    let key = |kind: &str, who: &str, i: u8| format!("{kind}:{who}-{i}").into_bytes();
    let shared = s.shared % 40;
    let mut customers: Vec<Vec<Vec<u8>>> = (0..shared)
        .map(|i| vec![key("email", "shared", i), key("phone", "shared", i)])
        .collect();
    customers.extend((0..s.only_holder % 40).map(|i| {
        if i % 3 == 0 {
            Vec::new()
        } else {
            vec![key("email", "bank", i)]
        }
    }));
    let mut users: Vec<Vec<u8>> = (0..shared)
        .map(|i| {
            if i % 2 == 0 {
                key("email", "shared", i)
            } else {
                key("phone", "shared", i)
            }
        })
        .collect();
    users.extend((0..s.only_matcher % 40).map(|i| key("email", "platform", i)));
    let (params, holder_policy, matcher_policy) = fuzz_setup(s, 2);
    let holder = HolderJoin::with_key_slots(params.clone(), holder_policy, customers, 2).expect("holder");
    let matcher = MatcherJoin::new(params, matcher_policy, users)
        .expect("matcher")
        .with_key_slots(2)
        .expect("key slots");
    (holder, matcher, u64::from(shared))
}

/// The holder's side of a two-cell aggregate (1 and the customer's index
/// per customer) over `hj`, for query `[1; 16]` under plan `[2; 32]`.
fn two_cell_aggregate(hj: cleanroom_protocol::join::HolderJoined, customers: usize) -> HolderAggregate {
    let values: Vec<u64> = (0..customers as u64).flat_map(|k| [1, k]).collect();
    HolderAggregate::new(
        shared(hj),
        RowValues::new(2, values).expect("values"),
        cleanroom_wire::QueryId([1; 16]),
        [2; 32],
        0,
    )
    .expect("aggregate")
}

/// An honest join, then the aggregate machines through a hostile wire: a
/// typed error or a result, never a panic; exact when the wire changed
/// nothing.
pub fn aggregate_machines(data: &[u8]) {
    let Ok(s) = Script::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let (holder, matcher, h, m) = parties(&s);
    let mut rng_h = ChaCha20Rng::seed_from_u64(s.seed);
    let mut rng_m = ChaCha20Rng::seed_from_u64(s.seed ^ 1);
    let Ok((hj, mj, _)) = cleanroom_sim::driver::run_join(holder, matcher, &mut rng_h, &mut rng_m, |_| {}) else {
        panic!("an honest join failed");
    };
    // Two cells per customer: 1 and its index.
    let mset: HashSet<&Vec<u8>> = m.iter().collect();
    let truth = h
        .iter()
        .enumerate()
        .filter(|(_, x)| mset.contains(x))
        .fold(vec![0i64; 2], |mut t, (k, _)| {
            t[0] += 1;
            t[1] += k as i64;
            t
        });
    let agg = two_cell_aggregate(hj, h.len());
    let (mut wire, changed) = hostile_wire(s.tamper);
    let out = run_aggregate_over(
        agg,
        &mj,
        mj.matched(),
        2,
        (cleanroom_wire::QueryId([1; 16]), [2; 32], 0),
        &mut rng_h,
        &mut rng_m,
        &mut wire,
    );
    if !changed.get() {
        let (hs, ms, _) = out.unwrap_or_else(|e| panic!("an honest aggregate failed: {e}"));
        assert_eq!(Share::reconstruct(&hs, &ms), Some(truth));
    }
}

/// Writes a starting corpus for every target under `root/<target>/`:
/// the frames of an honest join and aggregate, the sample configs, the
/// built-in templates' SQL, a state file with charges, shares and joins in
/// its ledger and audit log, and a few scripts for the machine targets.
///
/// # Panics
/// When a file cannot be written (a tool, not a library path).
pub fn write_seed_corpus(root: &Path, repo: &Path) {
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("corpus file");
    };
    // Frames of an honest run, each message type that crosses the wire.
    let s = Script {
        seed: 1,
        shared: 5,
        only_holder: 3,
        only_matcher: 4,
        chunk: 3,
        tamper: Vec::new(),
    };
    let (holder, matcher, h, _) = parties(&s);
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut record = |_: Direction, f: Vec<u8>| {
        frames.push(f.clone());
        vec![f]
    };
    let mut rng_h = ChaCha20Rng::seed_from_u64(1);
    let mut rng_m = ChaCha20Rng::seed_from_u64(2);
    let (hj, mj, _) = run_join_over(holder, matcher, &mut rng_h, &mut rng_m, |_| {}, &mut record).expect("join");
    let agg = two_cell_aggregate(hj, h.len());
    run_aggregate_over(
        agg,
        &mj,
        mj.matched(),
        2,
        (cleanroom_wire::QueryId([1; 16]), [2; 32], 0),
        &mut rng_h,
        &mut rng_m,
        &mut record,
    )
    .expect("aggregate run");
    for (k, f) in frames.iter().enumerate() {
        put("wire_decode", &format!("frame-{k:03}"), f);
    }
    // Node-level messages: retries after a crash, cancels.
    let node_messages = [
        (
            "share-check",
            Message::ShareCheck(cleanroom_wire::ShareCheck {
                query_id: cleanroom_wire::QueryId([1; 16]),
                run: cleanroom_wire::RunId([2; 16]),
            }),
        ),
        (
            "share-held",
            Message::ShareHeld(cleanroom_wire::ShareHeld {
                query_id: cleanroom_wire::QueryId([1; 16]),
                held: false,
                busy: true,
            }),
        ),
        (
            "cancel",
            Message::AnalystRequest(cleanroom_wire::AnalystRequest::Cancel(cleanroom_wire::QueryId([3; 16]))),
        ),
        (
            "cancelled",
            Message::AnalystResponse(cleanroom_wire::AnalystResponse::Cancelled(true)),
        ),
        (
            "admit",
            Message::AnalystRequest(cleanroom_wire::AnalystRequest::Admit(cleanroom_wire::QueryRequest {
                query_id: cleanroom_wire::QueryId([4; 16]),
                template: "spend_by_category".into(),
                params: vec![("start".into(), "2026-01-01".into())],
            })),
        ),
        (
            "admitted",
            Message::AnalystResponse(cleanroom_wire::AnalystResponse::Admitted),
        ),
    ];
    for (name, m) in node_messages {
        if let Ok(f) = m.encode() {
            put("wire_decode", &format!("node-{name}"), &f);
        }
    }
    // Configs.
    for name in ["bank.toml", "platform.toml", "analyst.toml"] {
        if let Ok(text) = std::fs::read(repo.join("examples").join(name)) {
            put("node_config", name, &text);
        }
    }
    // SQL of the built-in templates and a few dialect corners.
    for (k, q) in [
        "SELECT b.category, COUNT(DISTINCT b.customer_id), SUM(b.amount) FROM bank_transactions b JOIN platform_users p ON b.customer_id = p.user_id GROUP BY b.category",
        "SELECT COUNT(*) FROM bank_transactions b JOIN platform_users p ON b.customer_id = p.user_id WHERE p.segment = :segment AND b.date >= :since",
        "SELECT p.segment, AVG(b.amount) FROM bank_transactions b JOIN platform_users p ON b.customer_id = p.user_id WHERE b.category IN ('grocery', 'travel') GROUP BY p.segment",
    ]
    .iter()
    .enumerate()
    {
        put("sql", &format!("query-{k}"), q.as_bytes());
    }
    // A state file with every kind of record.
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let mut st = cleanroom_node::state::State::open(dir.path()).expect("state");
        for k in 0..3u8 {
            let qid = [k; 16];
            st.charge(
                &cleanroom_wire::QueryId(qid),
                "alice",
                "overlap",
                &[k; 32],
                "[]",
                1000,
                1_000_000,
                30,
                100,
            )
            .expect("charge");
            let share = [b's', k];
            st.store_share(
                &cleanroom_wire::QueryId(qid),
                &share,
                &cleanroom_node::state::AuditEntry {
                    event: "query",
                    analyst: "alice",
                    template: "overlap",
                    plan: &[k; 32],
                    params: "",
                    rho_micro: 1000,
                    result_digest: ring::digest::digest(&ring::digest::SHA256, &share).as_ref(),
                },
                &cleanroom_node::state::RunBinding {
                    join: cleanroom_wire::SessionId([9; 16]),
                    data_version: [1; 32],
                },
                false,
                2,
            )
            .expect("store");
        }
        st.charge_cardinality(&cleanroom_wire::SessionId([9; 16]), "join", 500_000, 50_000_000, 30)
            .expect("cardinality");
        st.put_join(
            &cleanroom_wire::SessionId([9; 16]),
            "holder",
            &[1; 32],
            3600,
            b"payload",
        )
        .expect("join");
    }
    if let Ok(bytes) = std::fs::read(dir.path().join("state.db")) {
        put("state_file", "state.db", &bytes);
        put(
            "state_file",
            "state-truncated.db",
            bytes.get(..bytes.len() / 2).unwrap_or(&[]),
        );
    }
    let fresh = tempfile::tempdir().expect("temp dir");
    drop(cleanroom_node::state::State::open(fresh.path()).expect("state"));
    if let Ok(bytes) = std::fs::read(fresh.path().join("state.db")) {
        put("state_file", "state-empty.db", &bytes);
    }
    // Scripts: honest, and one of each tamper.
    let mut u = Vec::new();
    for seed in 0u8..8 {
        u.extend_from_slice(&[seed; 12]);
        put("join_machines", &format!("script-{seed}"), &u);
        put("aggregate_machines", &format!("script-{seed}"), &u);
    }
}
