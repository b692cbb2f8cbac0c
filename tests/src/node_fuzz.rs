//! The `node_requests` fuzz target: the nodes' request handling over a
//! real connection. Both nodes run once per process (the demo fixture,
//! loopback QUIC with mutual TLS); each input is a script of actions on
//! fresh connections, by the real analyst's certificate (to either node)
//! and by the platform's certificate (to the bank, as a hostile peer):
//! streams of raw bytes, arbitrary frames, well-formed requests and peer
//! messages with fuzzed fields; queries through the real client; joins and
//! aggregates driven by a real matcher whose frames are tampered with.
//!
//! What must hold, whatever the script:
//! - no thread of either node panics;
//! - a node answers each analyst stream with at most one response, of the
//!   kind its request asks for (the share of the query id asked, the
//!   analyst's own budget) or a refusal; and answers each peer stream only
//!   with messages of the exchange its first message opens;
//! - a query answered through the real client is within 8 σ of the
//!   plaintext truth of its plan in every cell, with the σ that the plan
//!   and the templates' ρ give;
//! - no node charges a query id its analyst did not ask it for (a hostile
//!   peer cannot charge an analyst);
//! - once the script's connections close, both nodes drain (no query in
//!   flight, no platform turn held, no peer stream served) within 45 s and
//!   answer the analyst within 30 s.
//!
//! Query ids are salted per script, so scripts do not see each other's
//! queries; the nodes' caches and joins do carry over between scripts.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use cleanroom_client::Analyst;
use cleanroom_crypto::normalize::NormalizationRules;
use cleanroom_lab::demo::Fixture;
use cleanroom_node::config::NodeConfig;
use cleanroom_node::server::Node;
use cleanroom_protocol::aggregate::{CellBits, MatcherAggregate};
use cleanroom_protocol::join::{JoinParams, MatcherJoin, MatcherJoined, MatcherPolicy, SetSizeLimits};
use cleanroom_query::Plan;
use cleanroom_sim::driver::Direction;
use cleanroom_sim::oracle::truth;
use cleanroom_transport::{Identity, TransportSettings, client_endpoint, pki, read_frame, write_frame};
use cleanroom_wire::{
    Abort, AnalystRequest, AnalystResponse, JoinOffer, MAX_MESSAGE_LEN, MatcherKey, Message, OtSetup, PointChunk,
    PolicyMessage, QueryRequest, ShareCheck,
};

use crate::fuzz::{Tamper, hostile_wire};

/// The name of the nodes' runtime threads (a panic on one is a finding).
const THREADS: &str = "node-fuzz";
/// Set by the panic hook when a node thread panics.
static PANICKED: AtomicBool = AtomicBool::new(false);
/// Scripts run in this process (salts their query ids).
static SCRIPTS: AtomicU64 = AtomicU64::new(0);
/// At most this many actions of a script are run.
const MAX_ACTIONS: usize = 8;
/// Longest an action may take (a node may wait for more of an unfinished
/// stream: the script leaves it instead).
const ACTION_LIMIT: Duration = Duration::from_secs(15);
/// How long a stream is read before it is left (most end at once).
const READ_FOR: Duration = Duration::from_millis(200);
/// The nodes' `query_timeout_secs` here (the demo's is 120): a query sent
/// to one node only ends after it. A query of this fixture (300 rows)
/// takes well under a second.
const QUERY_TIMEOUT_SECS: u64 = 5;

const TEMPLATES: [&str; 4] = [
    "overlap",
    "spend_by_category",
    "spend_by_category_for_segment",
    "no_such_template",
];
const KEYS: [&str; 5] = ["start", "end", "segment", "country", ""];
const VALUES: [&str; 8] = [
    "2026-01-01",
    "2026-03-31",
    "2026-06-30",
    "messenger_active",
    "gamer",
    "2026-13-45",
    "",
    "x'; DROP TABLE charges; --",
];

/// What the scripts run so far reached, for the test that shows the
/// harness gets through to the nodes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Reached {
    /// Responses the nodes sent on analyst streams.
    pub analyst_frames: u64,
    /// Frames the bank sent on hostile peer streams.
    pub peer_frames: u64,
    /// Queries answered through the real client (and checked).
    pub answered: u64,
    /// Joins the bank accepted from the hostile matcher.
    pub joins_accepted: u64,
    /// Aggregates in which the bank answered the hostile matcher's setup.
    pub aggregates_answered: u64,
}

/// The counters behind [`Reached`], one per field.
struct Counts {
    analyst_frames: AtomicU64,
    peer_frames: AtomicU64,
    answered: AtomicU64,
    joins_accepted: AtomicU64,
    aggregates_answered: AtomicU64,
}

static COUNTS: Counts = Counts {
    analyst_frames: AtomicU64::new(0),
    peer_frames: AtomicU64::new(0),
    answered: AtomicU64::new(0),
    joins_accepted: AtomicU64::new(0),
    aggregates_answered: AtomicU64::new(0),
};

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What the scripts run in this process reached.
pub fn reached_so_far() -> Reached {
    Reached {
        analyst_frames: COUNTS.analyst_frames.load(Ordering::Relaxed),
        peer_frames: COUNTS.peer_frames.load(Ordering::Relaxed),
        answered: COUNTS.answered.load(Ordering::Relaxed),
        joins_accepted: COUNTS.joins_accepted.load(Ordering::Relaxed),
        aggregates_answered: COUNTS.aggregates_answered.load(Ordering::Relaxed),
    }
}

/// A script.
#[derive(Arbitrary, Debug)]
struct NodeScript {
    actions: Vec<Action>,
}

#[derive(Arbitrary, Debug)]
enum Action {
    /// One stream with the analyst's certificate.
    Analyst {
        platform: bool,
        frames: Vec<Frame>,
        finish: bool,
    },
    /// One stream to the bank with the platform's certificate.
    Peer { frames: Vec<Frame>, finish: bool },
    /// A query through the real client (both nodes at once).
    Query { qid: u8, query: Query },
    /// A join by a real matcher against the bank, its frames tampered;
    /// kept for aggregates when it completes.
    Join { ids: u16, context: u8, tamper: Vec<Tamper> },
    /// A query sent to the bank alone, then an aggregate for it by a real
    /// matcher over a join of this script, its frames tampered.
    Aggregate {
        join: u8,
        qid: u8,
        query: Query,
        group: u8,
        tamper: Vec<Tamper>,
    },
}

#[derive(Arbitrary, Debug)]
enum Frame {
    /// Written as they are (a length prefix or not).
    Bytes(Vec<u8>),
    /// A frame with this body.
    Framed(Vec<u8>),
    Request(Request),
    Peer(PeerMessage),
}

#[derive(Arbitrary, Debug)]
enum Request {
    Templates,
    Budget,
    Query { qid: u8, query: Query },
    Cancel { qid: u8 },
    Admit { qid: u8, query: Query },
}

#[derive(Arbitrary, Debug)]
struct Query {
    template: u8,
    params: Vec<(u8, u8)>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Point {
    Identity,
    Base,
    NonCanonical,
    Bytes([u8; 32]),
}

#[derive(Arbitrary, Debug)]
enum PeerMessage {
    /// The platform's signed policy, a bit flipped or not.
    Policy {
        flip: Option<(u16, u8)>,
    },
    Offer {
        nonce: u8,
        collaboration: bool,
        rules: bool,
        size: u32,
        context: u8,
        blocks: Vec<u32>,
    },
    /// `join`: one of this script's joins, or a made-up session.
    OtSetup {
        qid: u8,
        session: u8,
        join: Option<u8>,
        rows: Option<u32>,
        width: u8,
        plan: Option<Query>,
        group: u8,
        point: Point,
    },
    ShareCheck {
        qid: u8,
        run: u8,
    },
    Key {
        session: u8,
        point: Point,
    },
    Tokens {
        session: u8,
        seq: u32,
        points: Vec<Point>,
    },
    Abort {
        session: u8,
        code: u16,
    },
}

fn point(p: Point) -> [u8; 32] {
    match p {
        Point::Identity => [0; 32],
        Point::Base => curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT
            .compress()
            .to_bytes(),
        // p + 1 with p = 2^255 - 19: not the canonical encoding of 1.
        Point::NonCanonical => {
            let mut b = [0xff; 32];
            b[0] = 0xee;
            b[31] = 0x7f;
            b
        }
        Point::Bytes(b) => b,
    }
}

/// A length-prefixed frame.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Both nodes, the analyst's and the platform's certificates.
struct Harness {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    fixture: Fixture,
    config: NodeConfig,
    templates: Vec<cleanroom_query::Template>,
    bank: Node,
    platform: Node,
    analyst: Analyst,
    analyst_ep: quinn::Endpoint,
    peer_ep: quinn::Endpoint,
    policy: Vec<u8>,
}

/// Pairs of nodes the corpus replay may use side by side (the fuzzer uses
/// the first): most of a script's time is waiting for the nodes' timeouts.
/// A panic on any lane's node threads fails the replay (the flag is shared,
/// so the failure may be reported with the other lane's script; the panic
/// message above it names the thread).
pub const LANES: usize = 2;

fn harness(lane: usize) -> &'static Harness {
    static HOOK: std::sync::Once = std::sync::Once::new();
    static H: [OnceLock<Harness>; LANES] = [const { OnceLock::new() }; LANES];
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // Node tasks run on the runtimes' threads, curve work on rayon's.
            let name = std::thread::current().name().map(str::to_string);
            if name.as_deref() == Some(THREADS) || rayon::current_thread_index().is_some() {
                PANICKED.store(true, Ordering::SeqCst);
            }
            prev(info);
        }));
    });
    let Some(cell) = H.get(lane) else {
        panic!("lane {lane} of {LANES}");
    };
    cell.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(THREADS)
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let mut fixture = Fixture::create(dir.path(), 300, 71, &["alice"]).unwrap_or_else(|e| panic!("fixture: {e}"));
        // Budgets, runs and rates no script can exhaust (refusals for them
        // are tested elsewhere, and would hide the paths behind them here),
        // and a short query timeout and admission hold so that abandoned
        // queries and admissions end soon.
        let limits = format!(
            "[limits]\nmax_requests_per_analyst_per_second = 1000000\nruns_per_analyst_per_day = 100000000\nquery_timeout_secs = {QUERY_TIMEOUT_SECS}\nadmission_hold_secs = 1\n"
        );
        fixture
            .edit_configs(&[
                ("rho_per_analyst = \"20\"", "rho_per_analyst = \"100000000\""),
                (
                    "cardinality_epsilon_per_period = \"50\"",
                    "cardinality_epsilon_per_period = \"1000000000\"",
                ),
                ("[limits]\n", &limits),
            ])
            .unwrap_or_else(|e| panic!("configs: {e}"));
        let config = NodeConfig::load(&fixture.bank_config).unwrap_or_else(|e| panic!("bank config: {e}"));
        let templates = config
            .templates(&fixture.bank_config)
            .unwrap_or_else(|e| panic!("templates: {e}"));
        let certs = dir.path().join("certs");
        let (bank, platform, analyst, analyst_ep, peer_ep) = rt.block_on(async {
            let bank = fixture.start_bank().await.unwrap_or_else(|e| panic!("bank: {e}"));
            let b = bank.local_addr().unwrap_or_else(|e| panic!("bank: {e}"));
            let platform = fixture.start_platform(b).await.unwrap_or_else(|e| panic!("platform: {e}"));
            let p = platform.local_addr().unwrap_or_else(|e| panic!("platform: {e}"));
            let cfg = fixture.analyst("alice", b, p).unwrap_or_else(|e| panic!("analyst: {e}"));
            let analyst = Analyst::new(&cfg).unwrap_or_else(|e| panic!("analyst: {e}"));
            let ca = cfg.identity.trust_anchors().unwrap_or_else(|e| panic!("ca: {e}"));
            let endpoint = |cert: &std::path::Path, key: &std::path::Path| {
                let id = Identity::load(cert, key).unwrap_or_else(|e| panic!("identity: {e}"));
                client_endpoint(&id, &ca, &TransportSettings::default()).unwrap_or_else(|e| panic!("endpoint: {e}"))
            };
            let analyst_ep = endpoint(&cfg.identity.cert, &cfg.identity.key);
            let peer_ep = endpoint(&certs.join("platform.pem"), &certs.join("platform.key"));
            (bank, platform, analyst, analyst_ep, peer_ep)
        });
        let policy = std::fs::read(certs.join("platform.policy")).unwrap_or_else(|e| panic!("policy: {e}"));
        Harness {
            rt,
            _dir: dir,
            fixture,
            config,
            templates,
            bank,
            platform,
            analyst,
            analyst_ep,
            peer_ep,
            policy,
        }
    })
}

/// The fuzz target body.
pub fn node_requests(data: &[u8]) {
    node_requests_on(0, data);
}

/// The same against the pair of nodes `lane` (below [`LANES`]); each lane's
/// nodes, certificates and state are their own.
pub fn node_requests_on(lane: usize, data: &[u8]) {
    let Ok(script) = NodeScript::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let h = harness(lane);
    h.rt.block_on(h.run(script));
    assert!(
        !PANICKED.swap(false, Ordering::SeqCst),
        "a node thread panicked (see above)"
    );
}

/// One script's connections and what it asked.
struct Play<'h> {
    h: &'h Harness,
    salt: u64,
    to_bank: quinn::Connection,
    to_platform: quinn::Connection,
    peer: quinn::Connection,
    /// Query ids asked of the bank, of the platform.
    asked_bank: HashSet<cleanroom_wire::QueryId>,
    asked_platform: HashSet<cleanroom_wire::QueryId>,
    /// Joins the hostile matcher completed in this script.
    joins: Vec<MatcherJoined>,
}

/// Which node a stream goes to, and as whom.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum To {
    BankAsAnalyst,
    PlatformAsAnalyst,
    BankAsPeer,
}

impl Harness {
    async fn connect(&self, ep: &quinn::Endpoint, to: &Node, name: &str) -> quinn::Connection {
        let addr: SocketAddr = to.local_addr().unwrap_or_else(|e| panic!("address: {e}"));
        cleanroom_transport::connect(ep, addr, &pki::node_name(name))
            .await
            .unwrap_or_else(|e| panic!("connecting to the {name}: {e}"))
    }

    fn query_request(&self, salt: u64, n: u8, q: &Query) -> QueryRequest {
        let pick = |list: &[&str], i: u8| {
            list.get(usize::from(i) % list.len())
                .copied()
                .unwrap_or_default()
                .to_string()
        };
        QueryRequest {
            query_id: query_id(salt, n),
            template: pick(&TEMPLATES, q.template),
            params: q
                .params
                .iter()
                .take(4)
                .map(|(k, v)| (pick(&KEYS, *k), pick(&VALUES, *v)))
                .collect(),
        }
    }

    async fn run(&'static self, script: NodeScript) {
        let salt = SCRIPTS.fetch_add(1, Ordering::Relaxed);
        let mut play = Play {
            h: self,
            salt,
            to_bank: self.connect(&self.analyst_ep, &self.bank, "bank").await,
            to_platform: self.connect(&self.analyst_ep, &self.platform, "platform").await,
            peer: self.connect(&self.peer_ep, &self.bank, "bank").await,
            asked_bank: HashSet::new(),
            asked_platform: HashSet::new(),
            joins: Vec::new(),
        };
        for action in script.actions.into_iter().take(MAX_ACTIONS) {
            // Slow paths are the node's to take; the script moves on.
            let _ = tokio::time::timeout(ACTION_LIMIT, play.act(action)).await;
        }
        for c in [&play.to_bank, &play.to_platform, &play.peer] {
            c.close(0u32.into(), b"script done");
        }
        // Everything the script started ends.
        let t = Instant::now();
        let drained = |h: &Harness| {
            h.bank.queries_in_flight() == 0
                && h.platform.queries_in_flight() == 0
                && h.platform.turns() == (false, 0)
                && h.bank.peer_streams() == 0
        };
        while !drained(self) {
            assert!(
                t.elapsed() < Duration::from_secs(45),
                "45 s after the script: queries in flight bank {} platform {}, platform turns {:?}, bank peer streams {}",
                self.bank.queries_in_flight(),
                self.platform.queries_in_flight(),
                self.platform.turns(),
                self.bank.peer_streams()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Both nodes still answer.
        match tokio::time::timeout(Duration::from_secs(30), self.analyst.templates()).await {
            Ok(Ok(t)) => assert!(!t.is_empty(), "no templates offered after the script"),
            Ok(Err(e)) => panic!("a node refused the analyst's templates request after the script: {e}"),
            Err(_) => panic!("a node did not answer the analyst within 30 s after the script"),
        }
        // No node charged an id its analyst did not ask it for.
        for n in 0..=u8::MAX {
            let id = query_id(salt, n);
            for (node, asked, name) in [
                (&self.bank, &play.asked_bank, "bank"),
                (&self.platform, &play.asked_platform, "platform"),
            ] {
                let charged = node.is_charged(&id).unwrap_or_else(|e| panic!("{name} ledger: {e}"));
                assert!(
                    !charged || asked.contains(&id),
                    "the {name} charged query {n} of this script, which its analyst did not ask it for"
                );
            }
        }
    }

    fn peer_message(&self, p: &PeerMessage, play: &Play<'_>) -> Message {
        let session = |n: u8| [n; 16];
        match p {
            PeerMessage::Policy { flip } => {
                let mut signed = self.policy.clone();
                if let Some((at, bit)) = flip {
                    let n = signed.len().max(1);
                    if let Some(b) = signed.get_mut(usize::from(*at) % n) {
                        *b ^= 1 << (bit % 8);
                    }
                }
                Message::Policy(PolicyMessage { signed })
            }
            PeerMessage::Offer {
                nonce,
                collaboration,
                rules,
                size,
                context,
                blocks,
            } => Message::JoinOffer(JoinOffer {
                nonce: [*nonce; 32],
                collaboration_id: if *collaboration {
                    self.config.collaboration.id.clone()
                } else {
                    "another".into()
                },
                rules_hash: if *rules { self.rules().hash() } else { [1; 32] },
                matcher_set_size: u64::from(*size),
                context: [*context; 32],
                blocks: blocks.iter().take(64).map(|b| u64::from(*b)).collect(),
            }),
            PeerMessage::OtSetup {
                qid,
                session: s,
                join,
                rows,
                width,
                plan,
                group,
                point: p,
            } => {
                let joined = join.and_then(|j| play.joins.get(usize::from(j) % play.joins.len().max(1)));
                let plan = plan
                    .as_ref()
                    .and_then(|q| self.plan(&self.query_request(play.salt, *qid, q)));
                Message::OtSetup(OtSetup {
                    session: cleanroom_wire::SessionId(session(*s)),
                    join_session: joined.map_or(cleanroom_wire::SessionId(session(*s)), MatcherJoined::session),
                    query_id: query_id(play.salt, *qid),
                    nonce: [*s; 32],
                    rows: rows.map_or(joined.map_or(0, |j| j.rows() as u64), u64::from),
                    width: plan.as_ref().map_or(u32::from(*width), |p| p.width() as u32),
                    plan: plan.as_ref().map_or([*s; 32], Plan::digest),
                    group: u32::from(*group),
                    base_point: point(*p),
                })
            }
            PeerMessage::ShareCheck { qid, run } => Message::ShareCheck(ShareCheck {
                query_id: query_id(play.salt, *qid),
                run: cleanroom_wire::RunId([*run; 16]),
            }),
            PeerMessage::Key { session: s, point: p } => Message::MatcherKey(MatcherKey {
                session: cleanroom_wire::SessionId(session(*s)),
                key: point(*p),
            }),
            PeerMessage::Tokens {
                session: s,
                seq,
                points,
            } => Message::MatcherTokens(PointChunk {
                session: cleanroom_wire::SessionId(session(*s)),
                seq: *seq,
                points: points.iter().take(512).flat_map(|p| point(*p)).collect(),
            }),
            // Any of the codes (an unknown one does not encode as a message;
            // raw frames carry those).
            PeerMessage::Abort { session: s, code } => Message::Abort(Abort {
                session: cleanroom_wire::SessionId(session(*s)),
                code: cleanroom_wire::AbortCode::try_from(1 + code % 6)
                    .unwrap_or(cleanroom_wire::AbortCode::BadMessage),
            }),
        }
    }

    fn rules(&self) -> NormalizationRules {
        NormalizationRules::v1(&self.config.collaboration.default_country_code)
    }

    /// The plan both nodes bind `q` to, if they accept it.
    fn plan(&self, q: &QueryRequest) -> Option<Plan> {
        self.fixture.plan(&q.template, &q.params).ok()
    }
}

/// The query id `n` of script `salt`.
fn query_id(salt: u64, n: u8) -> cleanroom_wire::QueryId {
    let mut id = [0xf0; 16];
    id[..8].copy_from_slice(&salt.to_le_bytes());
    id[15] = n;
    cleanroom_wire::QueryId(id)
}

impl Play<'_> {
    async fn act(&mut self, action: Action) {
        match action {
            Action::Analyst {
                platform,
                frames,
                finish,
            } => {
                let to = if platform {
                    To::PlatformAsAnalyst
                } else {
                    To::BankAsAnalyst
                };
                let bytes = self.encode(&frames);
                self.stream(to, &bytes, finish).await;
            }
            Action::Peer { frames, finish } => {
                let bytes = self.encode(&frames);
                self.stream(To::BankAsPeer, &bytes, finish).await;
            }
            Action::Query { qid, query } => self.query(qid, &query).await,
            Action::Join { ids, context, tamper } => {
                if let Some(j) = self.join(ids, context, tamper).await
                    && self.joins.len() < 4
                {
                    self.joins.push(j);
                }
            }
            Action::Aggregate {
                join,
                qid,
                query,
                group,
                tamper,
            } => self.aggregate(join, qid, &query, group, tamper).await,
        }
    }

    fn encode(&self, frames: &[Frame]) -> Vec<u8> {
        let message = |m: Message| framed(&m.encode().unwrap_or_else(|e| panic!("encoding {}: {e}", m.kind())));
        frames
            .iter()
            .take(16)
            .flat_map(|f| match f {
                Frame::Bytes(b) => b.clone(),
                Frame::Framed(body) => framed(body),
                Frame::Request(r) => message(Message::AnalystRequest(match r {
                    Request::Templates => AnalystRequest::Templates,
                    Request::Budget => AnalystRequest::Budget,
                    Request::Query { qid, query } => {
                        AnalystRequest::Query(self.h.query_request(self.salt, *qid, query))
                    }
                    Request::Cancel { qid } => AnalystRequest::Cancel(query_id(self.salt, *qid)),
                    Request::Admit { qid, query } => {
                        AnalystRequest::Admit(self.h.query_request(self.salt, *qid, query))
                    }
                })),
                Frame::Peer(p) => message(self.h.peer_message(p, self)),
            })
            .collect()
    }

    /// Sends `bytes` on a new stream, then reads what comes back for a
    /// while and checks it against what the first frame (the one the node
    /// reads) asks for.
    async fn stream(&mut self, to: To, bytes: &[u8], finish: bool) {
        let len = bytes.first_chunk::<4>().map(|l| u32::from_le_bytes(*l) as usize);
        let max = if to == To::BankAsPeer {
            MAX_MESSAGE_LEN
        } else {
            cleanroom_node::pump::MAX_ANALYST_REQUEST
        };
        let first = len
            .filter(|n| *n <= max)
            .and_then(|n| bytes.get(4..4 + n))
            .and_then(|b| Message::decode(b).ok());
        if let Some(Message::AnalystRequest(AnalystRequest::Query(q))) = &first {
            match to {
                To::BankAsAnalyst => self.asked_bank.insert(q.query_id),
                To::PlatformAsAnalyst => self.asked_platform.insert(q.query_id),
                To::BankAsPeer => false,
            };
        }
        let conn = match to {
            To::BankAsAnalyst => &self.to_bank,
            To::PlatformAsAnalyst => &self.to_platform,
            To::BankAsPeer => &self.peer,
        };
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            return;
        };
        let _ = send.write_all(bytes).await;
        if finish {
            let _ = send.finish();
        }
        let mut answers = 0;
        let until = Instant::now() + READ_FOR;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let Ok(Ok(Some(frame))) = tokio::time::timeout(left, read_frame(&mut recv, MAX_MESSAGE_LEN)).await else {
                break;
            };
            answers += 1;
            let got = Message::decode(&frame);
            let fits = match (to, &first, &got) {
                (To::BankAsPeer, _, Ok(m)) => peer_reply_fits(first.as_ref(), m),
                (_, _, Ok(Message::AnalystResponse(r))) => answers == 1 && analyst_reply_fits(first.as_ref(), r),
                _ => false,
            };
            assert!(fits, "{to:?}: {got:?} in answer to {first:?} (answer {answers})");
            count(if to == To::BankAsPeer {
                &COUNTS.peer_frames
            } else {
                &COUNTS.analyst_frames
            });
        }
    }

    /// A query through the real client; an answer is within 8 σ of the
    /// plaintext truth in every cell, σ as the plan and the template's ρ give it.
    async fn query(&mut self, n: u8, q: &Query) {
        let req = self.h.query_request(self.salt, n, q);
        self.asked_bank.insert(req.query_id);
        self.asked_platform.insert(req.query_id);
        let answer = self
            .h
            .analyst
            .query(&req.template, &req.params, req.query_id, ACTION_LIMIT)
            .await;
        let Ok(result) = answer else {
            return;
        };
        let plan = self
            .h
            .plan(&req)
            .unwrap_or_else(|| panic!("both nodes answered {req:?}, which the plan refuses"));
        let truth = truth(&self.h.fixture.data, &plan);
        let cells = plan.cells();
        assert_eq!(
            result.cells.len(),
            truth.len() + plan.ratios().len(),
            "cells of {}",
            req.template
        );
        // Each node's noise has variance Δ²/(2ρ), with the template's ρ.
        let rho_micro = self
            .h
            .templates
            .iter()
            .find(|t| t.name == req.template)
            .map_or(0, |t| t.rho_micro);
        assert!(rho_micro > 0, "{} answered without a template", req.template);
        #[allow(clippy::cast_precision_loss)]
        let sigma_weighted = (plan.delta_squared() as f64 * 1e6 / rho_micro as f64).sqrt();
        for ((c, t), spec) in result.cells.iter().zip(truth).zip(&cells) {
            #[allow(clippy::cast_precision_loss)]
            let sigma = sigma_weighted / spec.weight.max(1) as f64;
            assert!(
                (c.sigma - sigma).abs() <= 1e-9 * sigma,
                "cell {} of {}: σ {} where the plan gives {sigma}",
                c.name,
                req.template,
                c.sigma
            );
            assert!(
                (c.value - t).abs() <= 8.0 * sigma,
                "cell {} of {}: {} is more than 8 σ ({sigma}) from the truth",
                c.name,
                req.template,
                c.value
            );
        }
        count(&COUNTS.answered);
    }

    /// A real matcher's join against the bank, its frames tampered with by
    /// `tamper` (the offer included); the join if it completed.
    async fn join(&mut self, ids: u16, context: u8, tamper: Vec<Tamper>) -> Option<MatcherJoined> {
        let ids: Vec<Vec<u8>> = (0..ids % 700)
            .map(|i| format!("email:fuzz{i}@example.com").into_bytes())
            .collect();
        let matcher = MatcherJoin::new(
            JoinParams {
                collaboration_id: self.h.config.collaboration.id.clone(),
                rules_hash: self.h.rules().hash(),
                context: [context; 32],
                chunk_points: 128,
            },
            MatcherPolicy {
                peer_set: SetSizeLimits { min: 0, max: 1 << 30 },
                max_dummy_rows: 4096,
                block_padding: None,
            },
            ids,
        )
        .ok()?;
        let mut rng = cleanroom_crypto::rng::session_rng().ok()?;
        let (offered, offer) = matcher.offer(&mut rng).ok()?;
        let (mut send, mut recv) = self.peer.open_bi().await.ok()?;
        let (mut wire, _) = hostile_wire(tamper);
        if !put(&mut send, &mut wire, &offer).await {
            return None;
        }
        let accept = next(&mut recv, "a join").await?;
        let mut m = offered.on_accept(&accept).ok()?;
        count(&COUNTS.joins_accepted);
        loop {
            while let Some(out) = m.poll_transmit() {
                if !put(&mut send, &mut wire, &out).await {
                    return None;
                }
            }
            if m.is_done() {
                return m.finish().ok();
            }
            let f = next(&mut recv, "a join").await?;
            m.handle(&f).ok()?;
        }
    }

    /// A query sent to the bank alone (its stream left open, as the bank
    /// waits for the platform), then an aggregate for it by the hostile
    /// matcher over one of this script's joins, its frames tampered with;
    /// then the bank's answer to the analyst must fit the request.
    async fn aggregate(&mut self, join: u8, n: u8, q: &Query, group: u8, tamper: Vec<Tamper>) {
        let Some(joined) = self.joins.get(usize::from(join) % self.joins.len().max(1)) else {
            return;
        };
        let req = self.h.query_request(self.salt, n, q);
        let Some(plan) = self.h.plan(&req) else {
            return;
        };
        self.asked_bank.insert(req.query_id);
        let Ok((mut ask, mut answer)) = self.to_bank.open_bi().await else {
            return;
        };
        let request = Message::AnalystRequest(AnalystRequest::Query(req.clone()));
        let Ok(body) = request.encode() else {
            return;
        };
        if ask.write_all(&framed(&body)).await.is_err() {
            return;
        }
        let _ = ask.finish();
        let g = u32::from(group) % (joined.blocks() as u32).max(1);
        let choices = joined.choices_for_block(g);
        let Ok(mut rng) = cleanroom_crypto::rng::session_rng() else {
            return;
        };
        let Ok(bits) = CellBits::new(plan.batch_bits()) else {
            return;
        };
        let Ok((waiting, setup)) =
            MatcherAggregate::start_with_bits(joined, &choices, bits, req.query_id, plan.digest(), g, &mut rng)
        else {
            return;
        };
        let (mut wire, _) = hostile_wire(tamper);
        if let Ok((mut send, mut recv)) = self.peer.open_bi().await
            && put(&mut send, &mut wire, &setup).await
            && let Some(choices) = next(&mut recv, "an aggregate").await
        {
            count(&COUNTS.aggregates_answered);
            if let Ok(mut m) = waiting.on_choices(&choices) {
                'run: loop {
                    while let Some(out) = m.poll_transmit() {
                        if !put(&mut send, &mut wire, &out).await {
                            break 'run;
                        }
                    }
                    if m.is_done() {
                        break;
                    }
                    let Some(f) = next(&mut recv, "an aggregate").await else {
                        break;
                    };
                    if m.handle(&f).is_err() {
                        break;
                    }
                }
            }
        }
        // The analyst's answer: the share of this query id, or a refusal.
        let got = tokio::time::timeout(READ_FOR * 10, read_frame(&mut answer, MAX_MESSAGE_LEN)).await;
        if let Ok(Ok(Some(frame))) = got {
            let fits = matches!(Message::decode(&frame), Ok(Message::AnalystResponse(ref r)) if analyst_reply_fits(Some(&request), r));
            assert!(
                fits,
                "the bank answered an aggregate's query with {:?}",
                Message::decode(&frame)
            );
            count(&COUNTS.analyst_frames);
        }
    }
}

/// Whether `r` answers the analyst request `first` (the stream's first frame).
fn analyst_reply_fits(first: Option<&Message>, r: &AnalystResponse) -> bool {
    if matches!(r, AnalystResponse::Refused(_)) {
        return true;
    }
    match first {
        Some(Message::AnalystRequest(AnalystRequest::Templates)) => matches!(r, AnalystResponse::Templates(_)),
        Some(Message::AnalystRequest(AnalystRequest::Budget)) => {
            matches!(r, AnalystResponse::Budget(b) if b.analyst == "alice")
        }
        Some(Message::AnalystRequest(AnalystRequest::Query(q))) => {
            matches!(r, AnalystResponse::Share(s) if s.query_id == q.query_id)
        }
        Some(Message::AnalystRequest(AnalystRequest::Cancel(_))) => matches!(r, AnalystResponse::Cancelled(_)),
        Some(Message::AnalystRequest(AnalystRequest::Admit(_))) => matches!(r, AnalystResponse::Admitted),
        _ => false,
    }
}

/// Whether the bank may send `m` on a peer stream opened with `first`.
fn peer_reply_fits(first: Option<&Message>, m: &Message) -> bool {
    match first {
        Some(Message::Policy(_)) => matches!(m, Message::Policy(_)),
        Some(Message::ShareCheck(c)) => matches!(m, Message::ShareHeld(h) if h.query_id == c.query_id),
        Some(Message::JoinOffer(_)) => matches!(
            m,
            Message::JoinAccept(_) | Message::HolderRows(_) | Message::HolderTokens(_) | Message::Abort(_)
        ),
        Some(Message::OtSetup(_)) => matches!(m, Message::OtChoices(_) | Message::MaskedRows(_) | Message::Abort(_)),
        _ => false,
    }
}

/// Sends `m` through the hostile `wire`; false once the stream is gone.
async fn put(
    send: &mut quinn::SendStream,
    wire: &mut impl FnMut(Direction, Vec<u8>) -> Vec<Vec<u8>>,
    m: &Message,
) -> bool {
    let Ok(f) = m.encode() else {
        return false;
    };
    for g in wire(Direction::MatcherToHolder, f) {
        if write_frame(send, g, MAX_MESSAGE_LEN).await.is_err() {
            return false;
        }
    }
    true
}

/// The bank's next frame on a hostile join or aggregate, if it sends one
/// soon; it must be a message of the holder's side of `what`.
async fn next(recv: &mut quinn::RecvStream, what: &str) -> Option<Vec<u8>> {
    let f = tokio::time::timeout(READ_FOR * 5, read_frame(recv, MAX_MESSAGE_LEN)).await;
    let f = f.ok()?.ok()??;
    let fits = match Message::decode(&f) {
        Ok(Message::JoinAccept(_) | Message::HolderRows(_) | Message::HolderTokens(_)) => what == "a join",
        Ok(Message::OtChoices(_) | Message::MaskedRows(_)) => what == "an aggregate",
        Ok(Message::Abort(_)) => true,
        _ => false,
    };
    assert!(fits, "the bank sent {:?} in {what}", Message::decode(&f));
    Some(f)
}
