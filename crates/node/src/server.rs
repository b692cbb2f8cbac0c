//! The node: one UDP port, peers and analysts told apart by certificate.
//!
//! - The platform (matcher) drives the protocol: for a query it opens a join
//!   (or reuses a cached one) and an aggregate with the bank.
//! - The bank (holder) answers joins after charging its cardinality budget,
//!   and answers an aggregate only for a query an analyst submitted to it
//!   under the same query id, which it has itself checked and charged.
//! - Each node adds its own discrete Gaussian noise to its share, stores the
//!   noisy share with the charge and an audit entry, and only then sends it
//!   to the analyst. A retried query id gets the stored share back.

use cleanroom_wire::{QueryId, RunId};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_crypto::normalize::NormalizationRules;
use cleanroom_crypto::rng::session_rng;
use cleanroom_crypto::shares::Share;
use cleanroom_protocol::ProtocolError;
use cleanroom_protocol::aggregate::{HolderAggregate, MatcherAggregate};
use cleanroom_protocol::join::{
    DEFAULT_CHUNK_POINTS, HolderJoin, HolderJoined, HolderPolicy, JoinParams, MatcherJoin, MatcherJoined,
    MatcherPolicy, SetSizeLimits,
};
use cleanroom_protocol::queries::{
    BankQueries, Batch, Claim, Delivery, PlatformQueries, Register, Registration, Start, run_of,
};
use cleanroom_query::policy::SignedPolicy;
use cleanroom_query::{CellKind, Domains, HolderRow, Plan, Template, format_date, format_micro};
use cleanroom_transport::{
    Identity, TransportSettings, certificate_is_for, connect, node_endpoint, peer_certificate, pki,
};
use cleanroom_wire::{
    Abort, AbortCode, AnalystRequest, AnalystResponse, BudgetInfo, Message, PolicyMessage, QueryRequest, QueryShare,
    Refusal, RefusalCode, SessionId, ShareCheck, ShareHeld, TemplateInfo,
};
use rayon::prelude::*;
use ring::digest::{SHA256, digest};
use tokio::sync::{Notify, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};
use zeroize::Zeroizing;

use crate::NodeError;
use crate::config::{Limits, NodeConfig, Role};
use crate::data::{HolderData, MatcherData, load_holder, load_matcher};
use crate::noise::DrawnNoise;
use crate::pump::{self, read_one, write_one};
use crate::state::{AuditEntry, Charge, RunBinding, State, now_secs, period_of};
use cleanroom_protocol::ledger::{self, AfterCharge, AfterCheck, BankHolds, PeerBatch};

/// A node's input data.
#[derive(Debug)]
pub enum NodeData {
    /// The bank's customers.
    Holder(Arc<HolderData>),
    /// The platform's users.
    Matcher(MatcherData),
}

impl NodeData {
    fn version(&self) -> [u8; 32] {
        match self {
            NodeData::Holder(h) => h.version,
            NodeData::Matcher(m) => m.version,
        }
    }

    /// Distinct identifiers loaded.
    pub fn len(&self) -> usize {
        match self {
            NodeData::Holder(h) => h.ids.len(),
            NodeData::Matcher(m) => m.ids.len(),
        }
    }

    /// Whether no identifier was loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bank: the node's part of a registered query (the registry is
/// `cleanroom_protocol::queries::BankQueries`): what its batches need, the
/// batches' time on this side, and where its whole share goes.
struct BankShell {
    plan: Plan,
    /// The holder's per-customer vectors for this plan, computed once for
    /// all of the query's batches.
    values: Arc<HolderRows>,
    /// Where the batches' time went on this side, summed.
    stats: pump::PumpStats,
    tx: oneshot::Sender<(Delivery, pump::PumpStats)>,
}

/// A registration on the bank: its id, its deadline, and where its share
/// (or why there is none) arrives.
type Awaiting = (Registration, Instant, oneshot::Receiver<(Delivery, pump::PumpStats)>);

/// Counts per analyst (queries running, connections open).
type PerAnalyst = Mutex<HashMap<String, u32>>;

/// One counted item of an analyst (an admitted query, an open connection),
/// uncounted when dropped.
struct Counted {
    node: Node,
    analyst: String,
    counts: fn(&Inner) -> &PerAnalyst,
}

impl Counted {
    /// Counts one more for `analyst` unless it already has `each`, or all
    /// analysts together have `total`; else `Err((analyst's, all))`.
    fn take(
        node: &Node,
        analyst: &str,
        counts: fn(&Inner) -> &PerAnalyst,
        each: u32,
        total: u32,
    ) -> Result<Self, (u32, u32)> {
        let mut map = lock(counts(&node.inner));
        let all: u32 = map.values().sum();
        let mine = map.get(analyst).copied().unwrap_or(0);
        if mine >= each || all >= total {
            return Err((mine, all));
        }
        *map.entry(analyst.to_string()).or_insert(0) += 1;
        Ok(Self {
            node: node.clone(),
            analyst: analyst.to_string(),
            counts,
        })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut map = lock((self.counts)(&self.node.inner));
        if let Some(n) = map.get_mut(&self.analyst) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.analyst);
            }
        }
    }
}

/// What the checks before a charge produce (see `Node::before_charge`).
struct Ready {
    plan: Plan,
    digest: [u8; 32],
    params_json: String,
}

/// An analyst's admission for one query id (`AnalystRequest::Admit`): this
/// node checked everything it would check before charging, and keeps a
/// running-query slot for the `Query` until `until`.
struct Held {
    slot: Counted,
    until: Instant,
    /// Tells this admission from a later one under the same key.
    id: u64,
}

/// Draws a query's noise on a blocking thread while its protocol runs, so
/// the time to release the share does not depend on it (see `noise`).
/// The noise comes from the query's seed, fixed with its charge, so every
/// run of the query on this node adds the same noise.
fn draw_noise(
    plan: &Plan,
    template: &Template,
    seed: Zeroizing<[u8; 32]>,
) -> tokio::task::JoinHandle<Result<DrawnNoise, NodeError>> {
    let (delta2, rho) = (plan.delta_squared(), template.rho_micro);
    let cells = plan.width() * plan.matcher_groups().len().max(1);
    tokio::task::spawn_blocking(move || DrawnNoise::draw(&seed, delta2, rho, cells))
}

/// The analyst connection a query request came on, to notice that its
/// analyst has gone (closed it, or stopped answering keep-alives, which
/// ends it at the idle timeout). A query still waiting (on the platform for
/// an earlier attempt of its id or for its turn, on the bank for the
/// platform to start it) is then dropped, which frees its admission slot at
/// once instead of at `query_timeout`; it stays charged, and a retry under
/// the same id costs nothing more. Work already started with the other node
/// (a join, an aggregate's batches) is finished, so the join stays cached
/// and a retry can pair with it.
#[derive(Clone, Default)]
struct Requester(Option<quinn::Connection>);

impl Requester {
    /// Resolves when the analyst's connection has closed; never for a
    /// request with no analyst connection (a rerun the platform asked for).
    async fn gone(&self) {
        match &self.0 {
            Some(c) => {
                c.closed().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// What a query dropped because its analyst went away ends with.
fn analyst_gone() -> NodeError {
    NodeError::refused(
        RefusalCode::Failed,
        "the analyst's connection closed while the query waited; it stays charged, and a retry under the same id costs nothing more",
    )
}

/// Failed handshakes, logged at most once per `REFUSAL_LOG_EVERY` (with how
/// many there were since), so a flood of junk packets cannot flood the log.
#[derive(Default)]
struct RefusalLog {
    since_last: std::sync::atomic::AtomicU64,
    last: Mutex<Option<Instant>>,
}

const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

impl RefusalLog {
    fn note(&self, remote: SocketAddr, e: &quinn::ConnectionError) {
        let n = self.since_last.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let mut last = lock(&self.last);
        if last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            debug!(%remote, error = %e, "handshake refused");
            return;
        }
        *last = Some(Instant::now());
        self.since_last.store(0, std::sync::atomic::Ordering::Relaxed);
        info!(%remote, error = %e, refused_since_last_line = n, "handshake refused");
    }
}

/// Connections the peer node may have open here at once.
const MAX_PEER_CONNECTIONS: u32 = 16;

/// Handshakes in flight above which a client must prove its address first.
const RETRY_ABOVE: usize = 64;
/// Handshakes in flight above which new connections are refused.
const MAX_HANDSHAKES: usize = 1024;

/// What an aggregate batch of the platform finds here for its query.
enum Claimed {
    /// The query, accepted: its registration, plan and customers' values.
    Found(Registration, Box<Plan>, Arc<HolderRows>),
    /// The query, whose other batches (or released share) are over another join.
    OtherJoin,
    /// No such query accepted here in time.
    Unknown,
}

/// Bank: a registration of a query, until its share is stored. Dropped
/// before its share arrived (the request ended: a timeout, its analyst
/// gone, an error), the registration is dropped and the query id
/// remembered as refused; after, the query id is no longer busy.
struct Waiter {
    node: Node,
    qid: QueryId,
    reg: Registration,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let ended = {
            let mut bank = lock(&self.node.inner.bank);
            bank.stored(&self.qid, self.reg);
            bank.expire(&self.qid, self.reg, Instant::now())
        };
        drop(ended);
    }
}

/// Platform: one attempt of a query id, from its arrival until it ends
/// (see `PlatformQueries`); the next waiting attempt is woken then.
struct Attempt {
    node: Node,
    qid: QueryId,
    started: bool,
}

impl Attempt {
    fn arrive(node: &Node, qid: QueryId, analyst: &str) -> Self {
        lock(&node.inner.platform).arrive(qid, analyst);
        Self {
            node: node.clone(),
            qid,
            started: false,
        }
    }

    /// Runs once no earlier attempt of the query id runs; `None` if the
    /// analyst went away first.
    async fn start(mut self, from: &Requester) -> Option<Self> {
        let inner = self.node.inner.clone();
        loop {
            let changed = inner.platform_changed.notified();
            if lock(&inner.platform).start(&self.qid) == Start::Go {
                self.started = true;
                return Some(self);
            }
            tokio::select! {
                () = changed => {}
                () = from.gone() => return None,
            }
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        {
            let mut platform = lock(&self.node.inner.platform);
            if self.started {
                platform.finish(&self.qid);
            } else {
                platform.leave(&self.qid);
            }
        }
        self.node.inner.platform_changed.notify_waiters();
    }
}

/// Which run of a query's aggregate a share comes from (see
/// `cleanroom_protocol::queries::run_of`).
type Run = RunId;

struct Inner {
    role: Role,
    collaboration: String,
    rules: NormalizationRules,
    limits: Limits,
    templates: Vec<Template>,
    domains: Domains,
    data: NodeData,
    state: Mutex<State>,
    /// This node's own key (`State::node_key`): keys the churn fingerprints
    /// and the platform's block padding. Never leaves the node.
    node_key: Zeroizing<[u8; 32]>,
    endpoint: quinn::Endpoint,
    peer_address: Option<SocketAddr>,
    peer_conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    holder_joins: Mutex<HashMap<SessionId, Arc<HolderJoined>>>,
    matcher_joins: Mutex<HashMap<String, Arc<MatcherJoined>>>,
    /// Bank: its query ids between the nodes (registered, running,
    /// completing, refused lately), and a wake-up when they change.
    bank: Mutex<BankQueries<BankShell>>,
    bank_changed: Notify,
    /// Platform: one attempt at a time per query id (a retry waits for an
    /// earlier attempt still running here, then finds its stored share),
    /// and the analyst's cancels; a wake-up when an attempt ends.
    platform: Mutex<PlatformQueries>,
    platform_changed: Notify,
    /// Tells an admission from a later one under the same key.
    admission_ids: std::sync::atomic::AtomicU64,
    /// Bank: the platform's signed policy arrived (see `wait_peer_policy`).
    peer_policy_known: Notify,
    /// Bank: a join was stored (see `holder_aggregate`).
    join_stored: Notify,
    /// Queries running per analyst (see [`Node::admit`]).
    in_flight: PerAnalyst,
    /// Admissions held for a `Query` to come, by analyst and query id.
    admissions: Mutex<HashMap<(String, QueryId), Held>>,
    /// Request tokens per analyst and when they were last refilled
    /// (`max_requests_per_analyst_per_second`).
    request_rate: Mutex<HashMap<String, (f64, Instant)>>,
    /// Connections open per analyst (`max_connections_per_analyst`) and
    /// of the peer (`MAX_PEER_CONNECTIONS`), by certificate name.
    connections: PerAnalyst,
    analysts: Vec<String>,
    /// This operator's signed policy, and its JSON as shown to the peer.
    own_policy: SignedPolicy,
    own_policy_json: Vec<u8>,
    /// The other operator's policy public key (hex).
    peer_public_key: String,
    /// The other operator's verified policy, once the peer has shown it.
    peer_policy: Mutex<Option<SignedPolicy>>,
    /// Serialises queries on the matcher (so two queries that need the same
    /// join do not both run it), round robin between analysts.
    turns: crate::turns::Turns,
    /// This node's phases of the last join it ran (for the bench).
    last_join: Mutex<Vec<(String, f64)>>,
    /// Request/response exchanges this node has started with the peer
    /// (offer/accept, setup/answer, and each streamed phase), and how often
    /// its pipelines stalled waiting for the peer after sending.
    exchanges: std::sync::atomic::AtomicU64,
    stalls: std::sync::atomic::AtomicU64,
    /// Bank: peer streams being served.
    peer_streams: std::sync::atomic::AtomicUsize,
}

/// One more of a gauge while alive.
struct Gauge<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Gauge<'a> {
    fn up(g: &'a std::sync::atomic::AtomicUsize) -> Self {
        g.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A running node.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Node {{ role: {} }}", self.inner.role.as_str())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `(ε numerator, denominator)` from millionths.
fn micro_rational(micro: u64) -> (u64, u64) {
    (micro, 1_000_000)
}

impl Node {
    /// Loads the data, opens the state, binds the port and starts serving.
    ///
    /// # Errors
    /// Any configuration, data, state or transport error, with a clear message.
    pub async fn start(cfg: NodeConfig, config_path: &std::path::Path) -> Result<Node, NodeError> {
        let limits = cfg.limits(config_path)?;
        let query_timeouts = limits.query_timeouts();
        let templates = cfg.templates(config_path)?;
        let identity = Identity::load(&cfg.identity.cert, &cfg.identity.key)?;
        let ca = cfg.identity.trust_anchors()?;
        if let Some(leaf) = identity.leaf()
            && !certificate_is_for(leaf, &pki::node_name(cfg.role.as_str()))
        {
            return Err(NodeError::Config {
                path: cfg.identity.cert.display().to_string(),
                what: format!("this certificate is not for {}", pki::node_name(cfg.role.as_str())),
            });
        }
        let data_cfg = cfg.data.clone();
        let collab = cfg.collaboration.clone();
        let role = cfg.role;
        let data = tokio::task::spawn_blocking(move || match role {
            Role::Bank => load_holder(&data_cfg, &collab).map(|h| NodeData::Holder(Arc::new(h))),
            Role::Platform => load_matcher(&data_cfg, &collab).map(NodeData::Matcher),
        })
        .await
        .map_err(|_| NodeError::Internal("data loading failed"))??;
        let report = match &data {
            NodeData::Holder(h) => &h.report,
            NodeData::Matcher(m) => &m.report,
        };
        info!(
            rows = report.rows,
            loaded = report.loaded,
            distinct_identifiers = data.len(),
            bad_rows = report.bad_rows(),
            duplicate_identifiers = report.duplicate_identifiers,
            mapped_to_other = report.mapped_to_other,
            "data loaded"
        );
        if report.bad_rows() > 0 {
            warn!(reasons = %report.describe(), "bad rows skipped");
        }
        let own_policy = crate::policy::load_verified(&cfg.policy.signed, &cfg.policy.public_key)?;
        for t in &templates {
            if !own_policy.approves(t) {
                warn!(template = %t.name, "template not signed by this operator (or changed since): it will not run; run `cleanroom policy sign`");
            }
        }
        let own_policy_json = std::fs::read(&cfg.policy.signed).map_err(|e| NodeError::Config {
            path: cfg.policy.signed.display().to_string(),
            what: e.to_string(),
        })?;
        let peer_public_key = std::fs::read_to_string(&cfg.policy.peer_public_key)
            .map_err(|e| NodeError::Config {
                path: cfg.policy.peer_public_key.display().to_string(),
                what: e.to_string(),
            })?
            .trim()
            .to_string();
        let mut state = State::open(&cfg.state_dir)?;
        state.expire_joins(&data.version())?;
        let node_key = state.node_key()?;
        let endpoint = node_endpoint(cfg.listen, &identity, &ca, &TransportSettings::default())?;
        let mut analysts: Vec<String> = templates.iter().flat_map(|t| t.analysts.iter().cloned()).collect();
        analysts.sort();
        analysts.dedup();
        let inner = Arc::new(Inner {
            role,
            collaboration: cfg.collaboration.id.clone(),
            rules: NormalizationRules::v1(&cfg.collaboration.default_country_code),
            limits,
            templates,
            domains: cfg.domains(),
            data,
            state: Mutex::new(state),
            node_key,
            endpoint,
            peer_address: cfg.peer.address,
            peer_conn: tokio::sync::Mutex::new(None),
            holder_joins: Mutex::new(HashMap::new()),
            matcher_joins: Mutex::new(HashMap::new()),
            bank: Mutex::new(BankQueries::new(query_timeouts)),
            bank_changed: Notify::new(),
            platform: Mutex::new(PlatformQueries::default()),
            platform_changed: Notify::new(),
            admission_ids: std::sync::atomic::AtomicU64::new(0),
            in_flight: Mutex::new(HashMap::new()),
            admissions: Mutex::new(HashMap::new()),
            peer_policy_known: Notify::new(),
            join_stored: Notify::new(),
            connections: Mutex::new(HashMap::new()),
            request_rate: Mutex::new(HashMap::new()),
            analysts,
            own_policy,
            own_policy_json,
            peer_public_key,
            peer_policy: Mutex::new(None),
            turns: crate::turns::Turns::default(),
            last_join: Mutex::new(Vec::new()),
            exchanges: std::sync::atomic::AtomicU64::new(0),
            stalls: std::sync::atomic::AtomicU64::new(0),
            peer_streams: std::sync::atomic::AtomicUsize::new(0),
        });
        let node = Node { inner };
        let accept = node.clone();
        tokio::spawn(async move { accept.accept_loop().await });
        if role == Role::Platform {
            // Connect to the bank early, so both sides have each other's
            // signed templates before the first query.
            let eager = node.clone();
            tokio::spawn(async move {
                let t = &eager.inner.limits.timeouts;
                for _ in 0..t.connect_attempts {
                    match eager.peer_connection().await {
                        Ok(_) => return,
                        Err(e) => info!(error = %e, "bank not reachable yet"),
                    }
                    tokio::time::sleep(t.connect_retry).await;
                }
            });
        }
        info!(role = role.as_str(), address = %node.local_addr()?, "node listening");
        Ok(node)
    }

    /// The address the node listens on.
    ///
    /// # Errors
    /// An I/O error from the socket.
    pub fn local_addr(&self) -> Result<SocketAddr, NodeError> {
        self.inner
            .endpoint
            .local_addr()
            .map_err(|e| NodeError::Peer(format!("local address: {e}")))
    }

    /// Stops accepting, closes connections and waits for them to finish.
    pub async fn shutdown(&self) {
        self.inner.endpoint.close(0u32.into(), b"shutdown");
        tokio::time::timeout(
            self.inner.limits.timeouts.shutdown_drain,
            self.inner.endpoint.wait_idle(),
        )
        .await
        .ok();
    }

    /// Platform: whether a query holds the turn to run its protocol, and
    /// how many wait for one (see `Turns`).
    pub fn turns(&self) -> (bool, usize) {
        self.inner.turns.load()
    }

    /// Bank: streams of the peer node being served (joins, aggregates,
    /// share checks, policies).
    pub fn peer_streams(&self) -> usize {
        self.inner.peer_streams.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether this node's ledger holds a charge for `qid`.
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn is_charged(&self, qid: &QueryId) -> Result<bool, NodeError> {
        Ok(lock(&self.inner.state).charged_query(qid)?.is_some())
    }

    /// Analyst queries admitted and not yet ended here (see `admit`).
    pub fn queries_in_flight(&self) -> u32 {
        lock(&self.inner.in_flight).values().sum()
    }

    /// UDP bytes sent and received on the connection to the peer (the
    /// platform's side; zero on the bank).
    pub async fn peer_bytes(&self) -> (u64, u64) {
        match self.inner.peer_conn.lock().await.as_ref() {
            Some(c) => {
                let s = c.stats();
                (s.udp_tx.bytes, s.udp_rx.bytes)
            }
            None => (0, 0),
        }
    }

    /// This node's phases of the last join it ran (seconds).
    pub fn last_join_phases(&self) -> Vec<(String, f64)> {
        lock(&self.inner.last_join).clone()
    }

    /// Request/response exchanges this node has started with its peer so far
    /// (each costs at least one round trip), and how often its pipelines
    /// stalled waiting for the peer after sending.
    pub fn exchanges(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.inner.exchanges.load(Relaxed), self.inner.stalls.load(Relaxed))
    }

    fn count_exchanges(&self, n: u64, stats: &pump::PumpStats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.inner.exchanges.fetch_add(n, Relaxed);
        self.inner.stalls.fetch_add(stats.stalls, Relaxed);
    }

    /// The bank's normalised identifiers (for benchmarks; empty on the platform).
    pub fn holder_ids(&self) -> Vec<Vec<u8>> {
        match &self.inner.data {
            NodeData::Holder(h) => h.ids.clone(),
            NodeData::Matcher(_) => Vec::new(),
        }
    }

    /// The platform's normalised identifiers (for benchmarks; empty on the bank).
    pub fn matcher_ids(&self) -> Vec<Vec<u8>> {
        match &self.inner.data {
            NodeData::Matcher(m) => m.ids.clone(),
            NodeData::Holder(_) => Vec::new(),
        }
    }

    /// Charges recorded in this node's ledger (for tests and operators).
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn charge_count(&self) -> Result<u64, NodeError> {
        lock(&self.inner.state).charge_count()
    }

    /// Accepts connections. Handshakes cost CPU before the peer is known,
    /// so a flood of them must not starve established sessions: above
    /// [`RETRY_ABOVE`] handshakes in flight a client must first prove its
    /// address (a stateless QUIC retry, one round trip), and above
    /// [`MAX_HANDSHAKES`] new connections are refused outright until some
    /// finish (or time out with the idle timeout).
    async fn accept_loop(self) {
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let refusals = Arc::new(RefusalLog::default());
        while let Some(incoming) = self.inner.endpoint.accept().await {
            let n = in_flight.load(std::sync::atomic::Ordering::Relaxed);
            if n >= MAX_HANDSHAKES {
                incoming.refuse();
                continue;
            }
            if n >= RETRY_ABOVE && !incoming.remote_address_validated() && incoming.may_retry() {
                let _ = incoming.retry();
                continue;
            }
            in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let node = self.clone();
            let in_flight = in_flight.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = incoming.await;
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                match conn {
                    Ok(conn) => node.serve_connection(conn).await,
                    Err(e) => refusals.note(remote, &e),
                }
            });
        }
    }

    async fn serve_connection(self, conn: quinn::Connection) {
        let Some(cert) = peer_certificate(&conn) else {
            conn.close(2u32.into(), b"certificate required");
            return;
        };
        let peer_name = pki::node_name(self.inner.role.peer().as_str());
        if certificate_is_for(&cert, &peer_name) {
            if self.inner.role != Role::Bank {
                conn.close(3u32.into(), b"this node does not accept peer connections");
                return;
            }
            // The platform needs one; a few more cover its restarts until
            // the old ones are reset.
            let Ok(_open) = Counted::take(&self, &peer_name, |i| &i.connections, MAX_PEER_CONNECTIONS, u32::MAX) else {
                info!(peer = %peer_name, "peer connection closed: {MAX_PEER_CONNECTIONS} already open");
                conn.close(5u32.into(), b"too many connections from the peer node");
                return;
            };
            info!(peer = %peer_name, "peer connected");
            while let Ok((send, recv)) = conn.accept_bi().await {
                let node = self.clone();
                tokio::spawn(async move {
                    let _serving = Gauge::up(&node.inner.peer_streams);
                    if let Err(e) = node.serve_peer_stream(send, recv).await {
                        warn!(error = %e, "peer session failed");
                    }
                });
            }
            return;
        }
        let analyst = self
            .inner
            .analysts
            .iter()
            .find(|a| certificate_is_for(&cert, &pki::analyst_name(a)))
            .cloned();
        let Some(analyst) = analyst else {
            info!("connection with an unknown certificate closed");
            conn.close(4u32.into(), b"certificate not accepted by this node");
            return;
        };
        let each = self.inner.limits.connections_per_analyst;
        let Ok(_open) = Counted::take(&self, &analyst, |i| &i.connections, each, u32::MAX) else {
            info!(analyst = %analyst, "connection closed: the analyst has max_connections_per_analyst open");
            conn.close(
                5u32.into(),
                b"too many connections from this analyst (max_connections_per_analyst); close some and retry",
            );
            return;
        };
        let from = Requester(Some(conn.clone()));
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let node = self.clone();
            let analyst = analyst.clone();
            let from = from.clone();
            let span = info_span!("analyst", name = %analyst);
            tokio::spawn(
                async move {
                    // Over the rate, only a query under a held admission is
                    // served: its frame must come soon, so that streams over
                    // the rate do not stay open for the whole request timeout.
                    let t = &node.inner.limits.timeouts;
                    let wait = if node.rate_left(&analyst) {
                        t.analyst_request
                    } else {
                        t.over_rate_request
                    };
                    let request =
                        match pump::read_one_limited(
                            &mut recv,
                            wait,
                            pump::MAX_ANALYST_REQUEST,
                        )
                            .await
                        {
                            Ok(frame) => match Message::decode(&frame) {
                                Ok(Message::AnalystRequest(req)) => Ok(req),
                                Ok(_) => Err(AnalystResponse::Refused(Refusal::new(RefusalCode::BadRequest, "expected an analyst request"))),
                                Err(e) => Err(AnalystResponse::Refused(Refusal::new(RefusalCode::BadRequest, format!("malformed request: {e}")))),
                            },
                            Err(e) => {
                                info!(error = %e, "analyst stream ended");
                                return;
                            }
                        };
                    // The query of an admission held here passed the rate
                    // check with its `Admit`: it is not refused after the
                    // other node may have charged it.
                    let admitted = matches!(&request, Ok(AnalystRequest::Query(q)) if node.holds_admission(&analyst, &q.query_id));
                    let response = if !admitted && !node.within_rate(&analyst) {
                        AnalystResponse::Refused(Refusal::new(
                            RefusalCode::RateLimited,
                            format!(
                                "rate limit: more than {} requests per second from this analyst (max_requests_per_analyst_per_second); slow down",
                                node.inner.limits.requests_per_second
                            ),
                        ))
                    } else {
                        match request {
                            Ok(req) => node.serve_analyst(&analyst, req, &from).await,
                            Err(refusal) => refusal,
                        }
                    };
                    if write_one(&mut send, &Message::AnalystResponse(response)).await.is_ok() {
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                }
                .instrument(span),
            );
        }
    }

    fn peer_policy_from(&self, signed: &[u8]) -> Result<(), NodeError> {
        let p = SignedPolicy::from_json(signed).map_err(|e| NodeError::Peer(format!("peer policy: {e}")))?;
        p.verify(&self.inner.peer_public_key)
            .map_err(|e| NodeError::Peer(format!("the peer's signed policy: {e}")))?;
        if p.role != self.inner.role.peer().as_str() || p.collaboration != self.inner.collaboration {
            return Err(NodeError::Peer(
                "the peer's signed policy is for another role or collaboration".into(),
            ));
        }
        info!(templates = p.templates.len(), "peer's signed policy verified");
        *lock(&self.inner.peer_policy) = Some(p);
        self.inner.peer_policy_known.notify_waiters();
        Ok(())
    }

    /// On the bank: the platform shows its policy when it connects; a
    /// request may arrive a moment before that, so wait up to 5 s.
    async fn wait_peer_policy(&self) {
        if self.inner.role != Role::Bank {
            return;
        }
        let deadline = Instant::now() + self.inner.limits.timeouts.peer_policy;
        loop {
            // Registered before the check, so a policy set in between wakes it.
            let known = self.inner.peer_policy_known.notified();
            if lock(&self.inner.peer_policy).is_some() {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, known).await.is_err() {
                return;
            }
        }
    }

    /// Why a template may not run, if it may not: both operators must have
    /// signed its exact text.
    fn not_runnable(&self, t: &Template) -> Option<String> {
        let own = self.inner.own_policy.approves(t);
        let peer = lock(&self.inner.peer_policy).as_ref().map(|p| p.approves(t));
        let (me, other) = (self.inner.role.as_str(), self.inner.role.peer().as_str());
        match (own, peer) {
            (true, Some(true)) => None,
            (_, None) => Some(format!(
                "the {other} node has not shown its signed templates to the {me} node yet (it does when the nodes connect); retry shortly"
            )),
            (o, Some(p)) => Some(format!(
                "template {:?} is not approved by both operators with this exact text (signed by {me}: {}, by {other}: {}); both operators must sign it",
                t.name,
                if o { "yes" } else { "no" },
                if p { "yes" } else { "no" }
            )),
        }
    }

    fn template(&self, name: &str) -> Result<&Template, NodeError> {
        self.inner.templates.iter().find(|t| t.name == name).ok_or_else(|| {
            NodeError::refused(
                RefusalCode::UnknownTemplate,
                format!(
                    "no template named {name:?} on the {} node; run `cleanroom templates` to list them",
                    self.inner.role.as_str()
                ),
            )
        })
    }

    /// Whether `analyst` may send one more request now: a token bucket of
    /// twice `max_requests_per_analyst_per_second`, refilled at that rate.
    fn within_rate(&self, analyst: &str) -> bool {
        self.rate_token(analyst, true)
    }

    /// Whether `analyst` has a request token now, without taking it.
    fn rate_left(&self, analyst: &str) -> bool {
        self.rate_token(analyst, false)
    }

    fn rate_token(&self, analyst: &str, take: bool) -> bool {
        let rate = f64::from(self.inner.limits.requests_per_second);
        let burst = 2.0 * rate;
        let now = Instant::now();
        let mut buckets = lock(&self.inner.request_rate);
        let (tokens, at) = buckets.entry(analyst.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            if take {
                *tokens -= 1.0;
            }
            true
        } else {
            false
        }
    }

    /// A slot for one more running query of `analyst`, or why not: each
    /// analyst may have `max_queries_in_flight_per_analyst` queries running
    /// here, all together `max_queries_in_flight`. Refused before any charge.
    fn admit(&self, analyst: &str) -> Result<Counted, Refusal> {
        let l = &self.inner.limits;
        Counted::take(self, analyst, |i| &i.in_flight, l.in_flight_per_analyst, l.in_flight).map_err(|(mine, total)| {
            let message = if mine >= l.in_flight_per_analyst {
                format!(
                    "analyst {analyst:?} already has {mine} queries running here (max_queries_in_flight_per_analyst); retry when one has finished"
                )
            } else {
                format!("{total} queries are running here (max_queries_in_flight); retry shortly")
            };
            Refusal::new(RefusalCode::TooManyQueries, message)
        })
    }

    /// Whether `analyst` holds an unexpired admission for `qid` here.
    fn holds_admission(&self, analyst: &str, qid: &QueryId) -> bool {
        lock(&self.inner.admissions)
            .get(&(analyst.to_string(), *qid))
            .is_some_and(|h| h.until > Instant::now())
    }

    /// The running-query slot of `analyst`'s unexpired admission for `qid`,
    /// which ends the admission.
    fn take_admission(&self, analyst: &str, qid: &QueryId) -> Option<Counted> {
        let held = lock(&self.inner.admissions).remove(&(analyst.to_string(), *qid))?;
        (held.until > Instant::now()).then_some(held.slot)
    }

    /// Answers `AnalystRequest::Admit`: every check `Query` makes before its
    /// charge, without charging; if all pass, the admission (with its
    /// running-query slot) is held for `admission_hold`.
    async fn serve_admit(&self, analyst: &str, q: &QueryRequest) -> AnalystResponse {
        // A repeated admission replaces the earlier one (and frees its slot).
        let ended = lock(&self.inner.admissions).remove(&(analyst.to_string(), q.query_id));
        drop(ended);
        let slot = match self.admit(analyst) {
            Ok(slot) => slot,
            Err(why) => return AnalystResponse::Refused(why),
        };
        let checked = async {
            let template = self.template(&q.template)?.clone();
            let ready = self.before_charge(analyst, q, &template).await?;
            self.would_charge(analyst, q, &template, &ready).await
        }
        .await;
        match checked {
            Ok(()) => {
                let until = Instant::now() + self.inner.limits.admission_hold;
                let id = self
                    .inner
                    .admission_ids
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let key = (analyst.to_string(), q.query_id);
                lock(&self.inner.admissions).insert(key.clone(), Held { slot, until, id });
                // Unless its query or a cancel comes first, the admission
                // ends (and frees its slot) when it expires.
                let inner = Arc::downgrade(&self.inner);
                tokio::spawn(async move {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
                    if let Some(inner) = inner.upgrade() {
                        let mut held = lock(&inner.admissions);
                        let expired = match held.get(&key) {
                            Some(h) if h.id == id => held.remove(&key),
                            _ => None,
                        };
                        drop(held);
                        drop(expired);
                    }
                });
                AnalystResponse::Admitted
            }
            Err(NodeError::Refused(m)) => AnalystResponse::Refused(m),
            Err(e) => {
                warn!(error = %e, "admission check failed");
                AnalystResponse::Refused(Refusal::new(
                    RefusalCode::Failed,
                    format!(
                        "the {} node could not check the query: {}",
                        self.inner.role.as_str(),
                        analyst_view(&e)
                    ),
                ))
            }
        }
    }

    async fn serve_analyst(&self, analyst: &str, req: AnalystRequest, from: &Requester) -> AnalystResponse {
        match req {
            AnalystRequest::Templates => {
                if self.inner.role == Role::Platform {
                    let _ = self.peer_connection().await;
                }
                self.wait_peer_policy().await;
                AnalystResponse::Templates(
                    self.inner
                        .templates
                        .iter()
                        .filter(|t| t.analysts.iter().any(|a| a == analyst))
                        .filter(|t| self.not_runnable(t).is_none())
                        .map(template_info)
                        .collect(),
                )
            }
            AnalystRequest::Budget => {
                let spent = lock(&self.inner.state).spent(analyst, self.inner.limits.period_days);
                match spent {
                    Ok(spent) => {
                        let days = i64::from(self.inner.limits.period_days);
                        let period = period_of(now_secs(), self.inner.limits.period_days);
                        AnalystResponse::Budget(BudgetInfo {
                            node: self.inner.role.as_str().to_string(),
                            analyst: analyst.to_string(),
                            rho_limit_micro: self.inner.limits.rho_per_analyst_micro,
                            rho_spent_micro: spent,
                            period_days: self.inner.limits.period_days,
                            period_ends_day: (period + 1) * days,
                        })
                    }
                    Err(e) => AnalystResponse::Refused(Refusal::new(
                        RefusalCode::Failed,
                        format!("the node's ledger failed: {e}"),
                    )),
                }
            }
            AnalystRequest::Cancel(qid) if self.inner.role == Role::Platform => {
                let ended = lock(&self.inner.admissions).remove(&(analyst.to_string(), qid));
                drop(ended);
                let running = lock(&self.inner.platform).cancel(&qid, analyst);
                if running {
                    info!(query = %hex(&qid.0), "query cancelled: the bank refused it");
                }
                AnalystResponse::Cancelled(running)
            }
            AnalystRequest::Cancel(qid) => {
                let ended = lock(&self.inner.admissions).remove(&(analyst.to_string(), qid));
                drop(ended);
                // Its waiter ends ("the peer session ended without a result").
                let dropped = lock(&self.inner.bank).cancel(&qid, analyst, Instant::now());
                let waiting = dropped.is_some();
                drop(dropped);
                if waiting {
                    info!(query = %hex(&qid.0), "query cancelled: the platform refused it");
                }
                AnalystResponse::Cancelled(waiting)
            }
            AnalystRequest::Admit(q) => {
                let span = info_span!("admit", id = %hex(&q.query_id.0), template = %q.template);
                self.serve_admit(analyst, &q).instrument(span).await
            }
            AnalystRequest::Query(q) => {
                let span = info_span!("query", id = %hex(&q.query_id.0), template = %q.template);
                lock(&self.inner.bank).request_arrived(&q.query_id);
                self.inner.bank_changed.notify_waiters();
                let slot = match self.take_admission(analyst, &q.query_id) {
                    Some(held) => Ok(held),
                    None => self.admit(analyst),
                };
                let answer = match slot {
                    Ok(_slot) => self.answer_query(analyst, &q, from).instrument(span).await,
                    Err(why) => AnalystResponse::Refused(why),
                };
                if self.inner.role == Role::Bank && matches!(answer, AnalystResponse::Refused(_)) {
                    self.mark_refused(&q.query_id);
                }
                answer
            }
        }
    }

    async fn answer_query(&self, analyst: &str, q: &QueryRequest, from: &Requester) -> AnalystResponse {
        match self.run_query(analyst, q, from).await {
            Ok(share) => AnalystResponse::Share(Box::new(share)),
            Err(NodeError::Refused(m)) => AnalystResponse::Refused(m),
            Err(e) => {
                // The operator's log has the whole error; the analyst gets
                // its kind only (a peer's error can carry counts).
                warn!(error = %e, "query failed");
                AnalystResponse::Refused(Refusal::new(
                    RefusalCode::Failed,
                    format!(
                        "the {} node could not complete the query: {}. Retrying with the same query id costs no extra budget.",
                        self.inner.role.as_str(),
                        analyst_view(&e)
                    ),
                ))
            }
        }
    }

    async fn run_query(&self, analyst: &str, q: &QueryRequest, from: &Requester) -> Result<QueryShare, NodeError> {
        let template = self.template(&q.template)?.clone();
        if self.inner.role == Role::Bank {
            return self.run_query_serialised(analyst, q, template, from).await;
        }
        // Platform: a retry of a query id still running here (its client
        // gave up waiting) waits for that attempt, then finds its share.
        let Some(_attempt) = Attempt::arrive(self, q.query_id, analyst).start(from).await else {
            info!("query dropped while waiting for an earlier attempt: its analyst has gone");
            return Err(analyst_gone());
        };
        self.run_query_serialised(analyst, q, template, from).await
    }

    async fn run_query_serialised(
        &self,
        analyst: &str,
        q: &QueryRequest,
        template: Template,
        from: &Requester,
    ) -> Result<QueryShare, NodeError> {
        let ready = self.before_charge(analyst, q, &template).await?;
        let charge = self.ledger(analyst, q, &template, &ready, true).await?;
        let plan = ready.plan;
        match &charge {
            refused @ (Charge::OverBudget { .. } | Charge::TooManyRuns { .. }) => {
                return Err(self.charge_refused(refused, &template));
            }
            Charge::New => info!(rho = %format_micro(template.rho_micro), "charged"),
            Charge::Existing(None) => info!("query id already charged; computing its share (no new charge)"),
            Charge::Existing(Some(_)) => {}
        }
        // What the ledger holds of the query decides the next step (the
        // rules are `cleanroom_protocol::ledger`'s, tested in
        // tests/tests/pair.rs with both nodes, crashes and a lossy network).
        let charged = self.charged(&q.query_id)?;
        let next = match self.inner.role {
            Role::Bank => ledger::bank_after_charge(&charged),
            Role::Platform => ledger::platform_after_charge(&charged),
        };
        // A rerun (this node released its share, the bank lost its own) is
        // over the join that share came from, on the same data.
        let rerun_over = match next {
            AfterCharge::Compute => None,
            AfterCharge::Replay => return self.replay(&q.query_id),
            AfterCharge::AskBank(run) => {
                // The platform checks that the bank kept its share of the
                // same run; if the bank stopped before storing it, the two
                // run the aggregate again (see docs/protocol.md, "Retries").
                let answer = self.bank_holds(&q.query_id, &run).await?;
                let l = &self.inner.limits;
                match ledger::platform_after_check(&charged, answer, self.inner.data.version(), l.max_reruns_per_query)
                {
                    Ok(AfterCheck::Replay) => return self.replay(&q.query_id),
                    Ok(AfterCheck::Busy) => {
                        return Err(NodeError::refused(
                            RefusalCode::Busy,
                            "the bank node is still finishing this query id; ask again shortly with the same id",
                        ));
                    }
                    Ok(AfterCheck::Rerun(join)) => {
                        info!(
                            "the bank has no share of this query's run (it stopped before storing it); running the aggregate again over the same join, with the same noise"
                        );
                        Some(join)
                    }
                    Err(why) => {
                        warn!(error = %why, "the bank lost its share of this query's run, and it cannot be run again");
                        return Err(NodeError::refused(RefusalCode::RerunRefused, why.to_string()));
                    }
                }
            }
        };
        // The noise, the audit entry and the share follow the ρ this query id
        // was charged: an operator may have changed the template's ρ since
        // (it is this node's own setting, not part of the signed digest).
        let mut template = template;
        template.rho_micro = lock(&self.inner.state)
            .charged_query(&q.query_id)?
            .map(|c| c.rho_micro)
            .ok_or(NodeError::Internal("a charged query is missing from the ledger"))?;
        let started = Instant::now();
        let seed = lock(&self.inner.state).noise_seed(&q.query_id)?;
        let noise = draw_noise(&plan, &template, seed);
        let mut timings = Vec::new();
        let mut waiter = None;
        let (share, run, join) = match self.inner.role {
            Role::Platform => {
                self.matcher_share(&plan, &q.query_id, &mut timings, analyst, from, rerun_over)
                    .await?
            }
            Role::Bank => {
                let awaiting = self
                    .holder_register(&plan, &q.query_id, analyst, None)?
                    .ok_or(NodeError::Internal("an analyst's registration was kept"))?;
                let (share, run, registered, join) =
                    self.holder_await(&q.query_id, awaiting, &mut timings, from).await?;
                waiter = Some(registered);
                (share, run, join)
            }
        };
        let noise = noise.await.map_err(|_| NodeError::Internal("noise task failed"))??;
        let t = Instant::now();
        let binding = RunBinding {
            join,
            data_version: self.inner.data.version(),
        };
        let out = self.noise_and_store(
            share,
            run,
            &noise,
            &plan,
            &template,
            analyst,
            q,
            timings,
            &binding,
            rerun_over.is_some(),
        )?;
        drop(waiter);
        info!(
            seconds = started.elapsed().as_secs_f64(),
            release_seconds = t.elapsed().as_secs_f64(),
            "share released"
        );
        Ok(out)
    }

    /// The checks a query passes before its charge (the platform reaches
    /// the bank, both policies are known, the template runs here, its
    /// parameters bind, the data has what the plan needs); the plan, its
    /// digest and the parameters to record with the charge.
    async fn before_charge(&self, analyst: &str, q: &QueryRequest, template: &Template) -> Result<Ready, NodeError> {
        if self.inner.role == Role::Platform {
            self.peer_connection().await.map_err(|e| {
                NodeError::refused(
                    RefusalCode::PeerUnreachable,
                    format!("the platform node cannot reach the bank node: {e}"),
                )
            })?;
        }
        self.wait_peer_policy().await;
        if let Some(why) = self.not_runnable(template) {
            return Err(NodeError::refused(RefusalCode::UnknownTemplate, why));
        }
        let plan = template.bind(analyst, &q.params, &self.inner.domains).map_err(|e| {
            let code = match e {
                cleanroom_query::QueryError::UnknownTemplate(_)
                | cleanroom_query::QueryError::AnalystNotAllowed { .. } => RefusalCode::UnknownTemplate,
                _ => RefusalCode::BadParameters,
            };
            NodeError::refused(code, e.to_string())
        })?;
        if let NodeData::Matcher(m) = &self.inner.data
            && m.countries.is_empty()
            && (plan.query.filters.iter().any(|p| p.column().name == "country")
                || plan.query.group_by.iter().any(|c| c.name == "country"))
        {
            return Err(NodeError::refused(
                RefusalCode::BadParameters,
                "the platform node's data has no country column (set data.country_column)",
            ));
        }
        let digest = plan.digest();
        let params_json =
            serde_json::to_string(&q.params).map_err(|_| NodeError::Internal("query parameters do not encode"))?;
        Ok(Ready {
            plan,
            digest,
            params_json,
        })
    }

    /// The ledger's answer for this query, on a blocking thread: with
    /// `write`, the charge itself (durable before anything leaves); without,
    /// what the charge would answer now, writing nothing.
    async fn ledger(
        &self,
        analyst: &str,
        q: &QueryRequest,
        template: &Template,
        ready: &Ready,
        write: bool,
    ) -> Result<Charge, NodeError> {
        let node = self.clone();
        let (qid, who, name) = (q.query_id, analyst.to_string(), template.name.clone());
        let rho = template.rho_micro;
        let (digest, params_json) = (ready.digest, ready.params_json.clone());
        tokio::task::spawn_blocking(move || {
            let l = &node.inner.limits;
            lock(&node.inner.state).charge_or_check(
                &qid,
                &who,
                &name,
                &digest,
                &params_json,
                rho,
                l.rho_per_analyst_micro,
                l.period_days,
                l.runs_per_day,
                write,
            )
        })
        .await
        .map_err(|_| NodeError::Internal("ledger task failed"))?
    }

    /// Whether the ledger would charge this query now (or has charged it
    /// already): `Err(Refused)` over the budget or the day's runs, or for
    /// a query id used for another query. Writes nothing.
    async fn would_charge(
        &self,
        analyst: &str,
        q: &QueryRequest,
        template: &Template,
        ready: &Ready,
    ) -> Result<(), NodeError> {
        match self.ledger(analyst, q, template, ready, false).await? {
            Charge::New | Charge::Existing(_) => Ok(()),
            refused => Err(self.charge_refused(&refused, template)),
        }
    }

    /// The analyst's refusal for a charge over the budget or the day's runs.
    fn charge_refused(&self, charge: &Charge, template: &Template) -> NodeError {
        match charge {
            Charge::OverBudget { spent, limit } => {
                let period = period_of(now_secs(), self.inner.limits.period_days);
                let ends = (period + 1) * i64::from(self.inner.limits.period_days);
                NodeError::refused(
                    RefusalCode::BudgetExhausted,
                    format!(
                        "budget exhausted on the {} node: this template costs rho {}, {} of {} is spent this period; it frees up on {}",
                        self.inner.role.as_str(),
                        format_micro(template.rho_micro),
                        format_micro(*spent),
                        format_micro(*limit),
                        format_date(i32::try_from(ends).unwrap_or(i32::MAX))
                    ),
                )
            }
            Charge::TooManyRuns { limit } => {
                let tomorrow = now_secs().div_euclid(86_400) + 1;
                NodeError::refused(
                    RefusalCode::RunLimit,
                    format!(
                        "run limit on the {} node: {limit} queries per analyst per day; it frees up at 00:00 UTC on {}",
                        self.inner.role.as_str(),
                        format_date(i32::try_from(tomorrow).unwrap_or(i32::MAX))
                    ),
                )
            }
            Charge::New | Charge::Existing(_) => NodeError::Internal("a charge that was not refused"),
        }
    }

    /// Platform: whether the bank holds its share of `run` of this query.
    async fn bank_holds(&self, qid: &QueryId, run: &Run) -> Result<BankHolds, NodeError> {
        let conn = self.peer_connection().await.map_err(|e| {
            NodeError::refused(
                RefusalCode::PeerUnreachable,
                format!("the platform node cannot reach the bank node: {e}"),
            )
        })?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| NodeError::Peer(e.to_string()))?;
        write_one(
            &mut send,
            &Message::ShareCheck(ShareCheck {
                query_id: *qid,
                run: *run,
            }),
        )
        .await?;
        let _ = send.finish();
        let answer = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
        match Message::decode(&answer).map_err(|e| NodeError::Protocol(e.into()))? {
            Message::ShareHeld(h) if h.query_id == *qid => Ok(match (h.held, h.busy) {
                (true, _) => BankHolds::Held,
                (false, true) => BankHolds::Busy,
                (false, false) => BankHolds::NotHeld,
            }),
            other => Err(NodeError::Peer(format!(
                "expected the bank's answer about its stored share, got {}",
                other.kind()
            ))),
        }
    }

    /// What this node's ledger holds of a charged query, as the rules of
    /// `cleanroom_protocol::ledger` read it (the stored share's run decoded).
    fn charged(&self, qid: &QueryId) -> Result<ledger::Charged, NodeError> {
        let q = lock(&self.inner.state)
            .charged_query(qid)?
            .ok_or(NodeError::Internal("a charged query is missing from the ledger"))?;
        let stored = match q.share.as_deref().map(Message::decode) {
            None => None,
            Some(Ok(Message::AnalystResponse(AnalystResponse::Share(s)))) => Some(s.run),
            Some(_) => return Err(NodeError::State("a stored share does not decode".into())),
        };
        Ok(ledger::Charged {
            stored,
            binding: q.binding,
            reruns: q.reruns,
        })
    }

    /// The stored share of a retried query id, marked replayed.
    fn replay(&self, qid: &QueryId) -> Result<QueryShare, NodeError> {
        let stored = lock(&self.inner.state)
            .charged_query(qid)?
            .and_then(|c| c.share)
            .ok_or(NodeError::Internal("a replayed share is missing from the ledger"))?;
        let Ok(Message::AnalystResponse(AnalystResponse::Share(mut s))) = Message::decode(&stored) else {
            return Err(NodeError::State("a stored share does not decode".into()));
        };
        info!("returning the stored share of a retried query id");
        s.replayed = true;
        Ok(*s)
    }

    /// Bank: whether this node stored a share of `run` of the query.
    fn holds_share(&self, qid: &QueryId, run: &Run) -> Result<bool, NodeError> {
        let stored = lock(&self.inner.state).charged_query(qid)?.and_then(|q| q.share);
        Ok(match stored.as_deref().map(Message::decode) {
            Some(Ok(Message::AnalystResponse(AnalystResponse::Share(s)))) => s.run == *run,
            _ => false,
        })
    }

    /// Bank: the platform opened an aggregate for a query id this node has
    /// already answered (stored a share of) but that no analyst request is
    /// waiting on: the platform lost its share of that run in a crash, so
    /// the aggregate runs again and its share replaces the stored one.
    ///
    /// Only over the join the stored share came from, on the same data, with
    /// the same noise (drawn from the seed stored with the charge) and at
    /// most `max_reruns_per_query` times: the new share differs from the
    /// old only by the platform's new mask, so a platform that knows its own
    /// un-noised share of each run learns the same noisy result again and
    /// nothing more. Returns whether a rerun was started; an error says why
    /// it may not run again.
    fn rerun_for_peer(&self, qid: &QueryId, join: SessionId) -> Result<bool, NodeError> {
        let Some(q) = lock(&self.inner.state).charged_query(qid)? else {
            return Ok(false);
        };
        let charged = self.charged(qid)?;
        let l = &self.inner.limits;
        let binding =
            match ledger::bank_peer_batch(Some(&charged), join, self.inner.data.version(), l.max_reruns_per_query) {
                // Charged, not stored: the analyst's request runs it.
                Ok(PeerBatch::Unregistered) => return Ok(false),
                Ok(PeerBatch::Rerun(binding)) => binding,
                Err(why) => return Err(NodeError::refused(RefusalCode::RerunRefused, why.to_string())),
            };
        let mut template = self.template(&q.template)?.clone();
        // As charged (see `run_query_serialised`).
        template.rho_micro = q.rho_micro;
        let params: Vec<(String, String)> = q
            .params
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok())
            .ok_or_else(|| NodeError::State("the ledger has no parameters for this query".into()))?;
        let plan = template
            .bind(&q.analyst, &params, &self.inner.domains)
            .map_err(|e| NodeError::refused(RefusalCode::BadParameters, e.to_string()))?;
        if plan.digest().as_slice() != q.plan.as_slice() {
            return Err(NodeError::refused(
                RefusalCode::RerunRefused,
                "this query's template changed since it ran; it cannot be run again",
            ));
        }
        let seed = lock(&self.inner.state).noise_seed(qid)?;
        let Some(awaiting) = self.holder_register(&plan, qid, &q.analyst, Some(join))? else {
            return Ok(true);
        };
        info!(
            "the platform lost its share of this query's run; running the aggregate again over the same join, with the same noise"
        );
        let node = self.clone();
        let request = QueryRequest {
            query_id: *qid,
            template: q.template.clone(),
            params,
        };
        tokio::spawn(
            async move {
                let noise = draw_noise(&plan, &template, seed);
                let mut timings = Vec::new();
                let done = match node
                    .holder_await(&request.query_id, awaiting, &mut timings, &Requester::default())
                    .await
                {
                    Ok((share, run, _waiter, join)) => match noise.await {
                        Ok(Ok(noise)) => node
                            .noise_and_store(
                                share,
                                run,
                                &noise,
                                &plan,
                                &template,
                                &q.analyst,
                                &request,
                                timings,
                                &RunBinding {
                                    join,
                                    data_version: binding.data_version,
                                },
                                true,
                            )
                            .map(|_| ()),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(NodeError::Internal("noise task failed")),
                    },
                    Err(e) => Err(e),
                };
                match done {
                    Ok(()) => info!("share of the rerun stored"),
                    Err(e) => warn!(error = %e, "rerun of a query failed"),
                }
            }
            .instrument(info_span!("rerun", query = %hex(&qid.0))),
        );
        Ok(true)
    }

    #[allow(clippy::too_many_arguments)]
    fn noise_and_store(
        &self,
        mut share: Share,
        run: Run,
        noise: &DrawnNoise,
        plan: &Plan,
        template: &Template,
        analyst: &str,
        q: &QueryRequest,
        mut timings: Vec<(String, f64)>,
        binding: &RunBinding,
        replace: bool,
    ) -> Result<QueryShare, NodeError> {
        noise.add_to(&mut share)?;
        if !self.inner.limits.report_timings {
            timings.clear();
        }
        let delta2 = plan.delta_squared();
        #[allow(clippy::cast_precision_loss)]
        let sigma = ((delta2 as f64) * 1e6 / (2.0 * template.rho_micro as f64)).sqrt();
        let cells = plan.cells();
        let out = QueryShare {
            node: self.inner.role.as_str().to_string(),
            query_id: q.query_id,
            plan: plan.digest(),
            cells: cells.iter().map(|c| c.name.clone()).collect(),
            weights: cells.iter().map(|c| c.weight).collect(),
            count_cells: cells.iter().map(|c| c.count_cell as u32).collect(),
            units: cells
                .iter()
                .map(|c| if c.kind == CellKind::Sum { "cents" } else { "count" }.to_string())
                .collect(),
            ratios: plan
                .ratios()
                .into_iter()
                .map(|r| (r.name, r.numerator as u32, r.denominator as u32))
                .collect(),
            words: share.words().to_vec(),
            sigma,
            min_count: template.min_count,
            rho: format_micro(template.rho_micro),
            timings,
            replayed: false,
            run,
        };
        let encoded = Message::AnalystResponse(AnalystResponse::Share(Box::new(out.clone())))
            .encode()
            .map_err(|_| NodeError::Internal("share encoding"))?;
        let result_digest = digest(&SHA256, &encoded);
        let params: Vec<String> = plan.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lock(&self.inner.state).store_share(
            &q.query_id,
            &encoded,
            &AuditEntry {
                event: if replace { "query-rerun" } else { "query" },
                analyst,
                template: &template.name,
                plan: &out.plan,
                params: &params.join("&"),
                rho_micro: template.rho_micro,
                result_digest: result_digest.as_ref(),
            },
            binding,
            replace,
            self.inner.limits.max_reruns_per_query,
        )?;
        Ok(out)
    }

    // ------------------------------------------------------------ holder

    /// Bank: makes a query the platform's batches can find by query id: an
    /// analyst's request replaces an earlier registration; a rerun for the
    /// platform (`rerun_over`, the join its batches must run over) keeps
    /// one, and is then `None`.
    fn holder_register(
        &self,
        plan: &Plan,
        qid: &QueryId,
        analyst: &str,
        rerun_over: Option<SessionId>,
    ) -> Result<Option<Awaiting>, NodeError> {
        let NodeData::Holder(data) = &self.inner.data else {
            return Err(NodeError::Internal("holder registration on a matcher"));
        };
        // Each customer's vector is computed as its masked row is produced.
        let values = HolderRows::new(plan, data.clone(), &self.inner.domains.categories);
        let (tx, rx) = oneshot::channel();
        let shell = BankShell {
            plan: plan.clone(),
            values: Arc::new(values),
            stats: pump::PumpStats::default(),
            tx,
        };
        let groups = plan.matcher_groups().len();
        let registered = lock(&self.inner.bank).register(*qid, analyst, groups, rerun_over, shell, Instant::now());
        match registered {
            Register::New(reg, deadline) => {
                self.inner.bank_changed.notify_waiters();
                Ok(Some((reg, deadline, rx)))
            }
            Register::Kept => Ok(None),
            Register::Busy => Err(NodeError::refused(
                RefusalCode::Busy,
                "this node is still storing this query id's share; ask again shortly with the same id",
            )),
        }
    }

    /// Bank: this node refused (or dropped) `qid`, so the platform's
    /// aggregate for it, if the platform accepted it, is told so at once
    /// rather than after a wait (see `claim_query`).
    fn mark_refused(&self, qid: &QueryId) {
        lock(&self.inner.bank).refused(qid, Instant::now());
    }

    /// Bank: waits for the platform's batches of a registered query.
    async fn holder_await(
        &self,
        qid: &QueryId,
        (reg, deadline, mut rx): Awaiting,
        timings: &mut Vec<(String, f64)>,
        from: &Requester,
    ) -> Result<(Share, Run, Waiter, SessionId), NodeError> {
        // Dropped on every way out but a share: the registration ends.
        let waiter = Waiter {
            node: self.clone(),
            qid: *qid,
            reg,
        };
        let deadline = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
        tokio::pin!(deadline);
        let gone = from.gone();
        tokio::pin!(gone);
        let mut gone_seen = false;
        // `None`: timed out.
        let out = loop {
            tokio::select! {
                r = &mut rx => break Some(r),
                () = &mut deadline => break None,
                () = &mut gone, if !gone_seen => {
                    gone_seen = true;
                    // Not started by the platform yet: drop it. Started: the
                    // batches are running, so finish and store the share.
                    let dropped = lock(&self.inner.bank).analyst_gone(qid, reg, Instant::now());
                    if dropped.is_some() {
                        drop(dropped);
                        info!("query dropped while waiting for the platform node: its analyst has gone");
                        return Err(analyst_gone());
                    }
                }
            }
        };
        match out {
            Some(Ok((Ok(whole), stats))) => {
                timings.extend([
                    // From accepting the query to the last batch: includes
                    // any join the platform runs first.
                    ("join and aggregate".to_string(), whole.elapsed.as_secs_f64()),
                    (
                        "aggregate: masking rows (row values + PRG)".to_string(),
                        stats.peer.as_secs_f64(),
                    ),
                    (
                        "aggregate: waiting for the platform or the network".to_string(),
                        (stats.wait_in + stats.wait_out).as_secs_f64(),
                    ),
                ]);
                Ok((whole.share, whole.run, waiter, whole.join))
            }
            Some(Ok((Err(e), _))) => Err(NodeError::Peer(e)),
            Some(Err(_)) => Err(NodeError::Peer("the peer session ended without a result".into())),
            None => Err(NodeError::Peer(format!(
                "the platform node did not run this query within {} s",
                self.inner.limits.query_timeout.as_secs()
            ))),
        }
    }

    async fn serve_peer_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), NodeError> {
        let NodeData::Holder(data) = &self.inner.data else {
            return Err(NodeError::Internal("peer stream on a matcher"));
        };
        let first = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
        match Message::decode(&first).map_err(|e| NodeError::Protocol(e.into()))? {
            Message::Policy(p) => {
                self.peer_policy_from(&p.signed)?;
                write_one(
                    &mut send,
                    &Message::Policy(PolicyMessage {
                        signed: self.inner.own_policy_json.clone(),
                    }),
                )
                .await?;
                let _ = send.finish();
                let _ = send.stopped().await;
                Ok(())
            }
            Message::JoinOffer(offer) => {
                let span = info_span!("join", filter_context = %hex(&offer.context[..8]));
                self.holder_join(data, &first, offer.context, send, recv)
                    .instrument(span)
                    .await
            }
            Message::OtSetup(setup) => {
                let span = info_span!("aggregate", query = %hex(&setup.query_id.0));
                async {
                    let waiting = lock(&self.inner.bank).is_registered(&setup.query_id);
                    if !waiting && let Err(e) = self.rerun_for_peer(&setup.query_id, setup.join_session) {
                        // The operator's log says why; the query stays as it is.
                        warn!(error = %e, "refused to run this query again for the platform");
                        abort(&mut send, setup.session, AbortCode::Refused).await;
                        return Err(e);
                    }
                    // The platform may go away meanwhile: stop waiting then
                    // (a hostile one must not leave tasks waiting here).
                    let pending = tokio::select! {
                        p = self.claim_query(&setup.query_id, setup.join_session) => p,
                        _ = send.stopped() => {
                            return Err(NodeError::Peer("the platform left before the query arrived here".into()));
                        }
                    };
                    let (reg, plan, values) = match pending {
                        Claimed::Found(reg, plan, values) => (reg, *plan, values),
                        Claimed::OtherJoin => {
                            abort(&mut send, setup.session, AbortCode::Refused).await;
                            return Err(NodeError::refused(
                                RefusalCode::RerunRefused,
                                "an aggregate batch over another join than the query's other batches or released share",
                            ));
                        }
                        Claimed::Unknown => {
                            abort(&mut send, setup.session, AbortCode::UnknownQuery).await;
                            return Err(NodeError::refused(
                                RefusalCode::PeerRefused,
                                "aggregate for a query this node has not accepted",
                            ));
                        }
                    };
                    let result = self
                        .holder_aggregate(
                            data,
                            &plan,
                            values,
                            &setup.query_id,
                            setup.join_session,
                            setup.group,
                            &first,
                            send,
                            recv,
                        )
                        .await;
                    let batch = match &result {
                        Ok((share, _, session)) => Batch::Share(share.clone(), *session),
                        // The platform joins again and retries: not a failure
                        // of the query (see `BankQueries::batch_done`).
                        Err(NodeError::UnknownJoin) => Batch::UnknownJoin,
                        Err(e) => Batch::Failed(e.to_string()),
                    };
                    let delivered = {
                        let mut bank = lock(&self.inner.bank);
                        if let Ok((_, stats, _)) = &result
                            && let Some(shell) = bank.shell_mut(&setup.query_id)
                        {
                            shell.stats.add(stats);
                        }
                        bank.batch_done(
                            &setup.query_id,
                            reg,
                            setup.join_session,
                            setup.group as usize,
                            batch,
                            Instant::now(),
                        )
                    };
                    if let Some((BankShell { tx, stats, .. }, delivery)) = delivered {
                        let _ = tx.send((delivery, stats));
                    }
                    result.map(|_| ())
                }
                .instrument(span)
                .await
            }
            Message::ShareCheck(c) => {
                // Busy: an aggregate for it is running or its share is being
                // stored. (A query waiting for the platform is not: the
                // platform's rerun is what it waits for.)
                let busy = lock(&self.inner.bank).busy(&c.query_id);
                let held = self.holds_share(&c.query_id, &c.run)?;
                write_one(
                    &mut send,
                    &Message::ShareHeld(ShareHeld {
                        query_id: c.query_id,
                        held,
                        busy,
                    }),
                )
                .await?;
                let _ = send.finish();
                let _ = send.stopped().await;
                Ok(())
            }
            other => Err(NodeError::Peer(format!(
                "unexpected {} opening a peer stream",
                other.kind()
            ))),
        }
    }

    /// The accepted query an aggregate asks for: the analyst's request may
    /// reach this node after the platform's aggregate, so wait for it
    /// (`unclaimed_aggregate`; `refused_aggregate` for a query id this node
    /// refused within `refusal_remembered`, unless a new request for it
    /// arrives meanwhile): `BankQueries::claim` says how long.
    /// A batch over `join` claims it; every batch of the query must name the
    /// same join (and a rerun's, the join of the released share).
    async fn claim_query(&self, qid: &QueryId, join: SessionId) -> Claimed {
        let asked = Instant::now();
        loop {
            let changed = self.inner.bank_changed.notified();
            let until = match lock(&self.inner.bank).claim(qid, join, asked, Instant::now()) {
                Claim::Found(reg, shell) => {
                    return Claimed::Found(reg, Box::new(shell.plan.clone()), shell.values.clone());
                }
                Claim::OtherJoin => return Claimed::OtherJoin,
                Claim::Unknown => return Claimed::Unknown,
                Claim::Wait(until) => until,
            };
            // Past `until`, the registry answers `Unknown`.
            let _ = tokio::time::timeout_at(tokio::time::Instant::from_std(until), changed).await;
        }
    }

    async fn holder_join(
        &self,
        data: &HolderData,
        first: &[u8],
        context: [u8; 32],
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), NodeError> {
        let l = &self.inner.limits;
        let cardinality = ShiftedTruncatedLaplace::new(
            micro_rational(l.cardinality_epsilon_micro).0,
            micro_rational(l.cardinality_epsilon_micro).1,
            l.cardinality_delta_inverse,
        )?;
        let params = JoinParams {
            collaboration_id: self.inner.collaboration.clone(),
            rules_hash: self.inner.rules.hash(),
            context,
            chunk_points: DEFAULT_CHUNK_POINTS,
        };
        let policy = HolderPolicy {
            peer_set: SetSizeLimits {
                min: l.peer_set.0,
                max: l.peer_set.1,
            },
            cardinality,
        };
        if (data.ids.len() as u64) < l.min_input_set {
            abort(&mut send, cleanroom_wire::SessionId([0; 16]), AbortCode::Refused).await;
            return Err(NodeError::refused(
                RefusalCode::InputLimit,
                format!(
                    "minimum input limit: the bank has {} customers, below the minimum of {}",
                    data.ids.len(),
                    l.min_input_set
                ),
            ));
        }
        let ids: Vec<&[u8]> = data.ids.iter().map(Vec::as_slice).collect();
        let fp = crate::state::fingerprints(&self.inner.node_key, &ids);
        drop(ids);
        let churn = lock(&self.inner.state).check_churn("holder-input", &fp, l.max_churn_ppm);
        if let Err(e) = churn {
            abort(&mut send, cleanroom_wire::SessionId([0; 16]), AbortCode::Refused).await;
            return Err(e);
        }
        let ids = data.ids.clone();
        let first = first.to_vec();
        let pending = tokio::task::spawn_blocking(move || {
            let mut rng = session_rng()?;
            let h = HolderJoin::new(params, policy, ids)?;
            h.on_offer(&first, &mut rng).map_err(NodeError::from)
        })
        .await
        .map_err(|_| NodeError::Internal("join task failed"))?;
        let pending = match pending {
            Ok(p) => p,
            Err(NodeError::Protocol(e)) => {
                abort(&mut send, cleanroom_wire::SessionId([0; 16]), e.abort_code()).await;
                return Err(NodeError::Protocol(e));
            }
            Err(e) => return Err(e),
        };
        let session = pending.session();
        // The cardinality charge is durable before anything leaves the node.
        let charged = {
            let node = self.clone();
            let eps = l.cardinality_epsilon_micro;
            tokio::task::spawn_blocking(move || {
                let l = &node.inner.limits;
                lock(&node.inner.state).charge_cardinality(
                    &session,
                    "join",
                    eps,
                    l.cardinality_budget_micro,
                    l.period_days,
                )
            })
            .await
            .map_err(|_| NodeError::Internal("ledger task failed"))?
        };
        if let Err(e) = charged {
            abort(&mut send, session, AbortCode::Refused).await;
            return Err(e);
        }
        let (streaming, accept) = pending.charge_recorded();
        write_one(&mut send, &accept).await?;
        let t = Instant::now();
        let idle = l.timeouts.stream_idle;
        let (streaming, stats) = pump::run_with_stats(streaming, send, recv, idle).await?;
        let t_finish = Instant::now();
        let joined = Arc::new(streaming.finish()?);
        let finish_secs = t_finish.elapsed().as_secs_f64();
        let session = joined.session();
        let payload = joined.encode();
        lock(&self.inner.state).put_join(&session, "holder", &data.version, l.join_ttl_secs, &payload)?;
        lock(&self.inner.state).record_inputs("holder-input", &fp, l.join_ttl_secs)?;
        lock(&self.inner.holder_joins).insert(session, joined.clone());
        self.inner.join_stored.notify_waiters();
        let secs = t.elapsed().as_secs_f64();
        *lock(&self.inner.last_join) = vec![
            ("join".to_string(), secs),
            (
                "join: own rows (hash to group + exponentiate)".to_string(),
                stats.own.as_secs_f64(),
            ),
            (
                "join: platform tokens (decompress + exponentiate)".to_string(),
                stats.peer.as_secs_f64(),
            ),
            (
                "join: waiting for the platform or the network".to_string(),
                (stats.wait_in + stats.wait_out).as_secs_f64(),
            ),
            ("join: finishing (order, counts)".to_string(), finish_secs),
        ];
        info!(rows = joined.rows(), seconds = secs, "join done");
        Ok(())
    }

    fn holder_join_by_session(
        &self,
        session: &SessionId,
        version: &[u8; 32],
    ) -> Result<Option<Arc<HolderJoined>>, NodeError> {
        if let Some(j) = lock(&self.inner.holder_joins).get(session) {
            return Ok(Some(j.clone()));
        }
        let Some(payload) = lock(&self.inner.state).join_by_session(session, version)? else {
            return Ok(None);
        };
        // A cached join that does not decode (another encoding version, a
        // damaged row) is dropped: the platform then joins again.
        let joined = match HolderJoined::decode(*session, &payload) {
            Ok(j) => Arc::new(j),
            Err(e) => {
                warn!(error = %e, "a cached join does not decode; dropped");
                lock(&self.inner.state).drop_join(session)?;
                return Ok(None);
            }
        };
        lock(&self.inner.holder_joins).insert(*session, joined.clone());
        Ok(Some(joined))
    }

    #[allow(clippy::too_many_arguments)]
    async fn holder_aggregate(
        &self,
        data: &HolderData,
        plan: &Plan,
        values: Arc<HolderRows>,
        qid: &QueryId,
        join_session: SessionId,
        group: u32,
        first: &[u8],
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(Share, pump::PumpStats, SessionId), NodeError> {
        let setup_session = match Message::decode(first) {
            Ok(Message::OtSetup(s)) => s.session,
            _ => cleanroom_wire::SessionId([0; 16]),
        };
        // The platform may open the aggregate the moment it has the join's
        // last token, before this side has stored the join: wait briefly.
        let deadline = Instant::now() + self.inner.limits.timeouts.join_stored;
        let found = loop {
            // Registered before the check, so a join stored in between wakes it.
            let stored = self.inner.join_stored.notified();
            if let Some(j) = self.holder_join_by_session(&join_session, &data.version)? {
                break Some(j);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, stored).await.is_err() {
                break None;
            }
        };
        let Some(joined) = found else {
            abort(&mut send, setup_session, AbortCode::UnknownJoin).await;
            return Err(NodeError::UnknownJoin);
        };
        let (qid, digest, first) = (*qid, plan.digest(), first.to_vec());
        let started = tokio::task::spawn_blocking(move || {
            let mut rng = session_rng()?;
            let agg = HolderAggregate::new(joined, values, qid, digest, group)?;
            agg.on_setup(&first, &mut rng).map_err(NodeError::from)
        })
        .await
        .map_err(|_| NodeError::Internal("aggregate task failed"))?;
        let (running, answer) = match started {
            Ok(x) => x,
            Err(NodeError::Protocol(e)) => {
                abort(&mut send, setup_session, e.abort_code()).await;
                return Err(NodeError::Protocol(e));
            }
            Err(e) => return Err(e),
        };
        write_one(&mut send, &answer).await?;
        let _ = &mut recv;
        let (running, stats) =
            pump::run_with_stats(running, send, recv, self.inner.limits.timeouts.stream_idle).await?;
        let session = running.session();
        Ok((running.finish()?, stats, session))
    }

    // ------------------------------------------------------------ matcher

    async fn peer_connection(&self) -> Result<quinn::Connection, NodeError> {
        let mut guard = self.inner.peer_conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let addr = self.inner.peer_address.ok_or(NodeError::Internal("no peer address"))?;
        let peer_name = pki::node_name(self.inner.role.peer().as_str());
        let conn = connect(&self.inner.endpoint, addr, &peer_name).await?;
        // Show each other the signed templates first.
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| NodeError::Peer(e.to_string()))?;
        let mine = Message::Policy(PolicyMessage {
            signed: self.inner.own_policy_json.clone(),
        });
        write_one(&mut send, &mine).await?;
        let _ = send.finish();
        let frame = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
        match Message::decode(&frame) {
            Ok(Message::Policy(p)) => self.peer_policy_from(&p.signed)?,
            _ => return Err(NodeError::Peer("the bank did not answer with its signed policy".into())),
        }
        *guard = Some(conn.clone());
        Ok(conn)
    }

    fn join_context(&self, filter: &str, version: &[u8; 32]) -> [u8; 32] {
        let mut v = b"cleanroom-join-context-v1\n".to_vec();
        v.extend_from_slice(filter.as_bytes());
        v.push(b'\n');
        v.extend_from_slice(version);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, &v).as_ref());
        out
    }

    /// Platform: the cached join for `filter` on this data version, if any
    /// (in memory, else from the state file).
    fn cached_matcher_join(&self, filter: &str, version: &[u8; 32]) -> Result<Option<Arc<MatcherJoined>>, NodeError> {
        if let Some(j) = lock(&self.inner.matcher_joins).get(filter) {
            return Ok(Some(j.clone()));
        }
        let cached = lock(&self.inner.state).join_for_filter(filter, version)?;
        let Some((session, payload)) = cached else {
            return Ok(None);
        };
        // A cached join that does not decode is dropped, and joined again.
        let j = match MatcherJoined::decode(session, &payload) {
            Ok(j) => Arc::new(j),
            Err(e) => {
                warn!(error = %e, "a cached join does not decode; dropped");
                lock(&self.inner.state).drop_join(&session)?;
                return Ok(None);
            }
        };
        lock(&self.inner.matcher_joins).insert(filter.to_string(), j.clone());
        Ok(Some(j))
    }

    async fn matcher_join(
        &self,
        data: &MatcherData,
        plan: &Plan,
        fresh: bool,
    ) -> Result<(Arc<MatcherJoined>, Option<Vec<(String, f64)>>), NodeError> {
        let filter = plan.join_filter();
        // The minimum input applies to every query, cached join or not
        // (counted without copying identifiers).
        let indices = matcher_block_indices(plan, data, &self.inner.domains);
        let input: usize = indices.iter().map(Vec::len).sum();
        if (input as u64) < self.inner.limits.min_input_set {
            return Err(NodeError::refused(
                RefusalCode::InputLimit,
                format!(
                    "minimum input limit: fewer platform users match this query's platform conditions than the minimum of {}; widen the conditions",
                    self.inner.limits.min_input_set
                ),
            ));
        }
        if !fresh && let Some(j) = self.cached_matcher_join(&filter, &data.version)? {
            return Ok((j, None));
        }
        let t = Instant::now();
        let blocks: Vec<Vec<Vec<u8>>> = indices
            .into_iter()
            .map(|b| b.into_iter().filter_map(|k| data.ids.get(k).cloned()).collect())
            .collect();
        let ids: Vec<&[u8]> = blocks.iter().flatten().map(Vec::as_slice).collect();
        let fp = crate::state::fingerprints(&self.inner.node_key, &ids);
        drop(ids);
        lock(&self.inner.state).check_churn(&filter, &fp, self.inner.limits.max_churn_ppm)?;
        let l = &self.inner.limits;
        let params = JoinParams {
            collaboration_id: self.inner.collaboration.clone(),
            rules_hash: self.inner.rules.hash(),
            context: self.join_context(&filter, &data.version),
            chunk_points: DEFAULT_CHUNK_POINTS,
        };
        let policy = MatcherPolicy {
            peer_set: SetSizeLimits {
                min: l.peer_set.0,
                max: l.peer_set.1,
            },
            max_dummy_rows: l.max_dummy_rows,
            block_padding: Some(ShiftedTruncatedLaplace::new(
                l.cardinality_epsilon_micro,
                1_000_000,
                l.cardinality_delta_inverse,
            )?),
        };
        let conn = self.peer_connection().await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| NodeError::Peer(e.to_string()))?;
        let mut rng = session_rng()?;
        // The padding of each block is a function of this node's key and
        // the join's input (filter, grouping and data version: the join
        // context), so a re-join of unchanged data shows the bank the same
        // padded sizes, never a fresh sample to average.
        let padding = {
            let key = ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                crate::state::derive(&self.inner.node_key, b"cleanroom-v1-block-padding").as_slice(),
            );
            let tag = ring::hmac::sign(&key, &params.context);
            let mut seed = Zeroizing::new([0u8; 32]);
            seed.copy_from_slice(tag.as_ref().get(..32).unwrap_or(&[0u8; 32]));
            cleanroom_protocol::join::PaddingSeed::new(seed)
        };
        let m = MatcherJoin::grouped(params, policy, blocks)?.with_padding_seed(padding);
        let (offered, offer) = m.offer(&mut rng)?;
        write_one(&mut send, &offer).await?;
        let waits = &self.inner.limits.timeouts;
        let accept = read_one(&mut recv, waits.join_accept).await?;
        let streaming = offered.on_accept(&accept)?;
        let (streaming, stats) = pump::run_with_stats(streaming, send, recv, waits.stream_idle).await?;
        // Offer/accept, then the streamed tokens and rows.
        self.count_exchanges(2, &stats);
        let t_match = Instant::now();
        let joined = tokio::task::spawn_blocking(move || streaming.finish())
            .await
            .map_err(|_| NodeError::Internal("join task failed"))??;
        let match_secs = t_match.elapsed().as_secs_f64();
        let joined = Arc::new(joined);
        let payload = joined.encode();
        lock(&self.inner.state).put_join(&joined.session(), &filter, &data.version, l.join_ttl_secs, &payload)?;
        lock(&self.inner.state).record_inputs(&filter, &fp, l.join_ttl_secs)?;
        lock(&self.inner.matcher_joins).insert(filter, joined.clone());
        let secs = t.elapsed().as_secs_f64();
        info!(rows = joined.rows(), seconds = secs, "join done");
        let phases = vec![
            ("join".to_string(), secs),
            (
                "join: own tokens (hash to group + exponentiate)".to_string(),
                stats.own.as_secs_f64(),
            ),
            (
                "join: bank rows and tokens (decompress + exponentiate)".to_string(),
                stats.peer.as_secs_f64(),
            ),
            (
                "join: waiting for the bank or the network".to_string(),
                (stats.wait_in + stats.wait_out).as_secs_f64(),
            ),
            ("join: matching".to_string(), match_secs),
        ];
        lock(&self.inner.last_join).clone_from(&phases);
        Ok((joined, Some(phases)))
    }

    async fn matcher_aggregate(
        &self,
        joined: &MatcherJoined,
        plan: &Plan,
        qid: &QueryId,
    ) -> Result<(Share, Vec<(String, f64)>, Run), NodeError> {
        let conn = self.peer_connection().await?;
        let t = Instant::now();
        let mut total = pump::PumpStats::default();
        let mut words = Vec::with_capacity(plan.width() * joined.blocks());
        let mut sessions = Vec::with_capacity(joined.blocks());
        // One OT batch per matcher group: choices e_i AND label_i == g.
        for g in 0..joined.blocks() as u32 {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| NodeError::Peer(e.to_string()))?;
            let mut rng = session_rng()?;
            let choices = joined.choices_for_block(g);
            let (waiting, setup) =
                MatcherAggregate::start(joined, &choices, plan.width(), *qid, plan.digest(), g, &mut rng)?;
            write_one(&mut send, &setup).await?;
            // Not dropped when the analyst goes: the bank may be about to
            // claim this batch for a retry of the same query id (and it
            // answers within 2 s for an id it refused or dropped).
            let answer = read_one(&mut recv, self.inner.limits.query_timeout).await?;
            let running = waiting.on_choices(&answer)?;
            let idle = self.inner.limits.timeouts.stream_idle;
            let (running, stats) = pump::run_with_stats(running, send, recv, idle).await?;
            // Setup/answer, then the streamed extension and masked rows.
            self.count_exchanges(2, &stats);
            total.add(&stats);
            sessions.push(running.session());
            words.extend_from_slice(running.finish()?.words());
        }
        let phases = vec![
            ("aggregate".to_string(), t.elapsed().as_secs_f64()),
            ("aggregate: OT extension".to_string(), total.own.as_secs_f64()),
            ("aggregate: unmask and sum".to_string(), total.peer.as_secs_f64()),
            (
                "aggregate: waiting for the bank or the network".to_string(),
                (total.wait_in + total.wait_out).as_secs_f64(),
            ),
        ];
        Ok((Share::from_words(words), phases, run_of(&sessions)))
    }

    async fn matcher_share(
        &self,
        plan: &Plan,
        qid: &QueryId,
        timings: &mut Vec<(String, f64)>,
        analyst: &str,
        from: &Requester,
        rerun_over: Option<SessionId>,
    ) -> Result<(Share, Run, SessionId), NodeError> {
        let NodeData::Matcher(data) = &self.inner.data else {
            return Err(NodeError::Internal("matcher query on a holder"));
        };
        let _serial = tokio::select! {
            s = self.inner.turns.take(analyst) => s,
            () = from.gone() => {
                info!("query dropped while waiting for its turn: its analyst has gone");
                return Err(analyst_gone());
            }
        };
        if lock(&self.inner.platform).take_cancelled(qid) {
            return Err(NodeError::refused(
                RefusalCode::PeerRefused,
                "cancelled: the bank node refused this query id (a retry under the same id costs nothing more)",
            ));
        }
        let other_join = || {
            warn!("the query's share was released from a join this node no longer has; it cannot be run again");
            Err(NodeError::refused(
                RefusalCode::RerunRefused,
                "this query's first run was over a join that has expired or was dropped; it cannot be run again",
            ))
        };
        // A rerun uses the cached join of the first release, or none: it
        // never opens a new join (which would charge the bank's ε_c for
        // nothing, since a rerun over it is refused).
        let (joined, join_phases) = match rerun_over {
            Some(first) => match self.cached_matcher_join(&plan.join_filter(), &data.version)? {
                Some(j) if j.session() == first => (j, None),
                _ => return other_join(),
            },
            None => self.matcher_join(data, plan, false).await?,
        };
        timings.extend(join_phases.unwrap_or_default());
        match self.matcher_aggregate(&joined, plan, qid).await {
            Ok((s, phases, run)) => {
                timings.extend(phases);
                Ok((s, run, joined.session()))
            }
            Err(NodeError::Protocol(cleanroom_protocol::ProtocolError::PeerAborted {
                code: AbortCode::UnknownJoin,
            })) => {
                if rerun_over.is_some() {
                    return other_join();
                }
                info!("the bank no longer has this join; joining again");
                lock(&self.inner.matcher_joins).remove(&plan.join_filter());
                lock(&self.inner.state).drop_join(&joined.session())?;
                let (joined, join_phases) = self.matcher_join(data, plan, true).await?;
                timings.extend(join_phases.unwrap_or_default());
                let (s, phases, run) = self.matcher_aggregate(&joined, plan, qid).await?;
                timings.extend(phases);
                Ok((s, run, joined.session()))
            }
            Err(NodeError::Protocol(cleanroom_protocol::ProtocolError::PeerAborted {
                code: AbortCode::UnknownQuery,
            })) => Err(NodeError::refused(
                RefusalCode::PeerRefused,
                "the bank node has not accepted this query (it refused it or never received it); see its answer",
            )),
            Err(e) => Err(e),
        }
    }
}

/// What an analyst is told of a failed query: the kind of failure, never a
/// count or a value from either side.
fn analyst_view(e: &NodeError) -> String {
    match e {
        NodeError::Protocol(ProtocolError::PeerAborted { code }) => {
            format!(
                "the peer node ended the session ({})",
                cleanroom_protocol::abort_reason(*code)
            )
        }
        NodeError::Protocol(pe) if pe.is_peer_fault() => format!(
            "this node ended the session with its peer ({})",
            cleanroom_protocol::abort_reason(pe.abort_code())
        ),
        NodeError::Protocol(_) | NodeError::Internal(_) | NodeError::Crypto(_) => "an internal error".into(),
        NodeError::Peer(_) => "the connection to the peer node failed or timed out".into(),
        NodeError::State(_) => "its state database failed".into(),
        NodeError::UnknownJoin => "the peer node no longer has the join".into(),
        other => other.to_string(),
    }
}

async fn abort(send: &mut quinn::SendStream, session: SessionId, code: AbortCode) {
    let _ = write_one(send, &Message::Abort(Abort { session, code })).await;
    let _ = send.finish();
}

fn template_info(t: &Template) -> TemplateInfo {
    TemplateInfo {
        name: t.name.clone(),
        kind: t.sql.clone(),
        params: t.params.iter().map(|(n, spec)| (n.clone(), spec.describe())).collect(),
        rho: format_micro(t.rho_micro),
        min_count: t.min_count,
    }
}

/// Which of the matcher's users go into which block for a plan: indices of
/// the users that pass the WHERE clause's platform conditions, one list per
/// matcher group (one list when the query does not group by platform columns).
pub fn matcher_block_indices(plan: &Plan, data: &MatcherData, domains: &Domains) -> Vec<Vec<usize>> {
    let groups = plan.matcher_groups().len().max(1);
    let mut blocks: Vec<Vec<usize>> = vec![Vec::new(); groups];
    for k in 0..data.ids.len() {
        let value = |column: &str| match column {
            "segment" => data
                .segments
                .get(k)
                .and_then(|s| domains.segments.get(usize::from(*s)))
                .cloned(),
            "country" => data
                .countries
                .get(k)
                .and_then(|c| domains.countries.get(usize::from(*c)))
                .cloned(),
            _ => None,
        };
        if !plan.matcher_user_passes(&value) {
            continue;
        }
        if let Some(block) = plan.matcher_group_of(&value).and_then(|g| blocks.get_mut(g)) {
            block.push(k);
        }
    }
    blocks
}

/// The matcher's input to the join for a plan: the identifiers of
/// [`matcher_block_indices`], block by block.
pub fn matcher_blocks(plan: &Plan, data: &MatcherData, domains: &Domains) -> Vec<Vec<Vec<u8>>> {
    matcher_block_indices(plan, data, domains)
        .into_iter()
        .map(|b| b.into_iter().filter_map(|k| data.ids.get(k).cloned()).collect())
        .collect()
}

/// The bank's per-customer vectors for a plan (one matcher group's width:
/// holder groups times cells per group), clipped and weighted, computed from
/// each customer's transactions when asked.
pub struct HolderRows {
    data: Arc<HolderData>,
    plan: Plan,
    cells: Vec<cleanroom_query::CellSpec>,
    /// Holder group of each category index (a row's group depends on its
    /// category only).
    group_of: Vec<Option<usize>>,
    categories: Vec<String>,
    groups: usize,
    width: usize,
}

impl std::fmt::Debug for HolderRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HolderRows {{ customers: {}, width: {} }}",
            self.data.ids.len(),
            self.width
        )
    }
}

impl HolderRows {
    /// The vectors of `data`'s customers for `plan`.
    pub fn new(plan: &Plan, data: Arc<HolderData>, categories: &[String]) -> Self {
        let group_of = categories
            .iter()
            .map(|c| {
                plan.holder_group_of(&HolderRow {
                    category: c,
                    cents: 0,
                    day: 0,
                })
            })
            .collect();
        Self {
            data,
            plan: plan.clone(),
            cells: plan.cells(),
            group_of,
            categories: categories.to_vec(),
            groups: plan.holder_groups().len().max(1),
            width: plan.width(),
        }
    }
}

/// Groups a customer's counts are kept on the stack for.
const STACK_GROUPS: usize = 64;

impl cleanroom_protocol::aggregate::RowSource for HolderRows {
    fn width(&self) -> usize {
        self.width
    }

    fn customers(&self) -> usize {
        self.data.ids.len()
    }

    fn fill(&self, customer: usize, out: &mut [u64]) -> bool {
        let Some(txns) = self.data.txns.get(customer) else {
            return false;
        };
        if out.len() != self.width {
            return false;
        }
        let (mut count_stack, mut sum_stack) = ([0u64; STACK_GROUPS], [0i64; STACK_GROUPS]);
        let (mut count_heap, mut sum_heap) = (Vec::new(), Vec::new());
        let (count, sum): (&mut [u64], &mut [i64]) = if self.groups <= STACK_GROUPS {
            (&mut count_stack[..self.groups], &mut sum_stack[..self.groups])
        } else {
            count_heap.resize(self.groups, 0);
            sum_heap.resize(self.groups, 0);
            (&mut count_heap, &mut sum_heap)
        };
        for t in txns {
            let r = HolderRow {
                category: self.categories.get(usize::from(t.category)).map_or("", String::as_str),
                cents: t.cents,
                day: t.day,
            };
            if !self.plan.holder_row_passes(&r) {
                continue;
            }
            if let Some(g) = self.group_of.get(usize::from(t.category)).copied().flatten()
                && let (Some(n), Some(s)) = (count.get_mut(g), sum.get_mut(g))
            {
                *n += 1;
                *s = s.saturating_add(t.cents);
            }
        }
        out.iter_mut().for_each(|x| *x = 0);
        let per = self.width / self.groups;
        let spend_cap = i64::try_from(self.plan.clip.spend_cents).unwrap_or(i64::MAX);
        for (g, (n, s)) in count.iter().zip(sum.iter()).enumerate() {
            if *n == 0 {
                continue;
            }
            for k in 0..per {
                let idx = g * per + k;
                let Some(cell) = self.cells.get(idx) else { continue };
                let v = match cell.kind {
                    CellKind::Customers => 1,
                    CellKind::Rows => (*n).min(self.plan.clip.transactions),
                    CellKind::Sum => (*s).clamp(0, spend_cap) as u64,
                };
                if let Some(x) = out.get_mut(idx) {
                    *x = v.wrapping_mul(cell.weight);
                }
            }
        }
        true
    }
}

/// All of [`HolderRows`] at once, customer after customer (for tests and
/// tools; the node computes them row by row).
pub fn holder_values(plan: &Plan, data: &HolderData, categories: &[String]) -> Vec<u64> {
    use cleanroom_protocol::aggregate::RowSource;
    let rows = HolderRows::new(plan, Arc::new(data.clone()), categories);
    let width = rows.width();
    let mut out = vec![0u64; data.ids.len() * width];
    out.par_chunks_mut(width.max(1)).enumerate().for_each(|(c, row)| {
        rows.fill(c, row);
    });
    out
}
