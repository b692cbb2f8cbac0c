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
//!
//! This file has the node's state, its start, the connection loop and the
//! peer policy exchange; the rest is by side: `analyst` (admission, charge,
//! release), `bank` (the platform's streams, registrations, reruns),
//! `platform` (join, aggregate, share check) and `rows` (what each side
//! brings to a query). The rules they follow are sans-IO, in
//! `cleanroom_protocol::queries` and `cleanroom_protocol::ledger`.

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
use cleanroom_protocol::aggregate::{CellBits, HolderAggregate, MatcherAggregate};
use cleanroom_protocol::join::{
    DEFAULT_CHUNK_POINTS, HolderJoin, HolderJoined, HolderPolicy, JoinParams, MatcherJoin, MatcherJoined,
    MatcherPolicy, SetSizeLimits,
};
use cleanroom_protocol::queries::{
    BankQueries, Batch, Claim, Delivery, PlatformQueries, Register, Registration, Start,
};
use cleanroom_query::policy::SignedPolicy;
use cleanroom_query::{CellKind, Domains, HolderRow, Plan, Template, format_date, format_micro};
use cleanroom_transport::{
    Identity, TransportSettings, certificate_is_for, connect, node_endpoint, peer_certificate, pki,
};
use cleanroom_wire::{
    Abort, AbortCode, AnalystRequest, AnalystResponse, BudgetInfo, Message, Phase, PolicyMessage, QueryRequest,
    QueryShare, Refusal, RefusalCode, SessionId, ShareCheck, ShareHeld, TemplateInfo,
};
use rayon::prelude::*;
use ring::digest::{SHA256, digest};
use tokio::sync::{Notify, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};
use zeroize::Zeroizing;

use crate::config::{Limits, NodeConfig, Role};
use crate::data::{HolderData, MatcherData, load_holder, load_matcher};
use crate::noise::DrawnNoise;
use crate::pump::{self, read_one, write_one};
use crate::state::{AuditEntry, Charge, RunBinding, State, StateError, now_secs, period_of};
use crate::{NodeError, PeerError};
use cleanroom_protocol::attempt::{Action, Assembled, JoinChoice, Outcome, PlatformAttempt};
use cleanroom_protocol::ledger::{self, BankAfterCharge, BankHolds, PeerBatch};

mod analyst;
mod bank;
mod bank_worker;
mod platform;
mod rows;
mod worker;

use bank::{Bank, BankSide};
use platform::{Platform, PlatformSide};
pub use rows::{HolderRows, holder_values, matcher_block_indices, matcher_blocks};

/// A node's input data as loaded, before it goes to its side.
enum Loaded {
    Holder(HolderData),
    Matcher(MatcherData),
}

/// What only one role has: one state type per role (`bank::BankSide`,
/// `platform::PlatformSide`), so a bank-only step cannot be reached on the
/// platform or the other way round. Code of one role runs on its handle
/// (`Bank`, `Platform`), which exists only for a node of that role.
enum Side {
    Bank(Arc<BankSide>),
    Platform(Arc<PlatformSide>),
}

/// A node seen as its role: the typed handle its role's code runs on.
enum Sided {
    Bank(Bank),
    Platform(Platform),
}

/// Bank: the node's part of a registered query (the registry is
/// `cleanroom_protocol::queries::BankQueries`): what its batches need, the
/// batches' time on this side, and where its whole share goes.
struct BankShell {
    plan: Plan,
    /// The analyst it runs for (a bank worker binds the plan again).
    analyst: String,
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

/// A charged analyst request: what the steps after its charge need
/// (`Bank::answer_charged`, `Platform::attempt`).
struct ChargedRequest<'a> {
    analyst: &'a str,
    q: &'a QueryRequest,
    plan: Plan,
    /// The template, with the ρ this query id was charged.
    template: Template,
    from: &'a Requester,
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

/// The refusal of a query whose template's `clip.max_customers` is below
/// the bank's customer count (it says that much, not the count).
const TOO_MANY_CUSTOMERS: &str = "the bank's data holds more customers than this template's clip.max_customers, which sets the width of every cell's shares; both operators must raise it";

/// A query's noise, being drawn.
type NoiseTask = tokio::task::JoinHandle<Result<DrawnNoise, NodeError>>;

/// Draws a query's noise on a blocking thread while its protocol runs, so
/// the time to release the share does not depend on it (see `noise`).
/// The noise comes from the query's seed, fixed with its charge, so every
/// run of the query on this node adds the same noise.
fn draw_noise(plan: &Plan, template: &Template, seed: Zeroizing<[u8; 32]>) -> NoiseTask {
    let (delta2, rho) = (plan.delta_squared(), template.rho_micro);
    let limits = plan.noise_limits();
    let cells: Vec<(u64, u64)> = plan.cells().iter().map(|c| (c.weight, limits.get(&c.kind))).collect();
    tokio::task::spawn_blocking(move || DrawnNoise::draw(&seed, delta2, rho, &cells))
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
    /// The query, accepted: its registration, plan, customers' values and
    /// analyst.
    Found(Registration, Box<Plan>, Arc<HolderRows>, String),
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
    bank: Arc<BankSide>,
    qid: QueryId,
    reg: Registration,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let ended = {
            let mut bank = lock(&self.bank.queries);
            bank.stored(&self.qid, self.reg);
            bank.expire(&self.qid, self.reg, Instant::now())
        };
        drop(ended);
        // A rerun batch waiting for this share's store (`serve_aggregate_batch`).
        self.bank.changed.notify_waiters();
    }
}

/// Platform: one attempt of a query id, from its arrival until it ends
/// (see `PlatformQueries`); the next waiting attempt is woken then.
struct Attempt {
    platform: Arc<PlatformSide>,
    qid: QueryId,
    started: bool,
}

impl Attempt {
    fn arrive(platform: &Platform, qid: QueryId, analyst: &str) -> Self {
        lock(&platform.side.queries).arrive(qid, analyst);
        Self {
            platform: platform.side.clone(),
            qid,
            started: false,
        }
    }

    /// Runs once no earlier attempt of the query id runs; `None` if the
    /// analyst went away first.
    async fn start(mut self, from: &Requester) -> Option<Self> {
        let side = self.platform.clone();
        loop {
            let changed = side.changed.notified();
            if lock(&side.queries).start(&self.qid) == Start::Go {
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
            let mut platform = lock(&self.platform.queries);
            if self.started {
                platform.finish(&self.qid);
            } else {
                platform.leave(&self.qid);
            }
        }
        self.platform.changed.notify_waiters();
    }
}

/// Which run of a query's aggregate a share comes from (see
/// `cleanroom_protocol::queries::run_of`).
type Run = RunId;

struct Inner {
    /// This node's role, and the state only that role has.
    side: Side,
    collaboration: String,
    rules: NormalizationRules,
    /// The kinds of the identifiers matched, sorted (one, or with several
    /// keys each a key slot).
    key_kinds: Vec<cleanroom_crypto::normalize::IdKind>,
    limits: Limits,
    templates: Vec<Template>,
    domains: Domains,
    /// The version of this node's input data (`HolderData::version`,
    /// `MatcherData::version`).
    data_version: [u8; 32],
    state: Mutex<State>,
    /// This node's own key (`State::node_key`): keys the churn fingerprints
    /// and the platform's block padding. Never leaves the node.
    node_key: Zeroizing<[u8; 32]>,
    /// The churn fingerprint of each of this node's identifiers, in the
    /// data's order (`state::fingerprints_by_id`), computed once at start.
    fingerprints: Vec<u64>,
    endpoint: quinn::Endpoint,
    /// Tells an admission from a later one under the same key.
    admission_ids: std::sync::atomic::AtomicU64,
    /// The peer's signed policy arrived (see `Bank::wait_peer_policy`).
    peer_policy_known: Notify,
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
    /// This node's phases of the last join it ran (for the bench).
    last_join: Mutex<Vec<(Phase, f64)>>,
    /// Request/response exchanges this node has started with the peer
    /// (offer/accept, setup/answer, and each streamed phase), and how often
    /// its pipelines stalled waiting for the peer after sending.
    exchanges: std::sync::atomic::AtomicU64,
    stalls: std::sync::atomic::AtomicU64,
    /// The collaboration's split into shards, when `[shards] count >= 2`.
    sharding: Option<Sharding>,
    /// A coordinator: its workers (`[workers]`), which run its shards.
    workers: Option<worker::WorkerPool>,
    /// A worker: which one this process is.
    worker: Option<worker::WorkerRole>,
    /// The workers of this node (its `[workers]`), whether this process is
    /// their coordinator or one of them; 0 without workers.
    workers_count: u32,
    /// A bank worker: its way to its coordinator.
    coordinator: Option<bank_worker::CoordinatorLink>,
    /// Set by [`Node::shutdown`].
    stopping: std::sync::atomic::AtomicBool,
}

/// A node's shards (docs/protocol.md, "Shards"): `S`, the shard key's id,
/// and the shards' input at rest (`crate::input`): which of this node's
/// identifiers are in each shard (contiguous ranges of the node's
/// numbering) and their files, read back a shard at a time.
struct Sharding {
    count: u32,
    key_id: [u8; 32],
    store: Arc<crate::input::ShardStore>,
}

impl Sharding {
    /// The shard count as a length.
    fn len(&self) -> usize {
        self.count as usize
    }

    /// Shard `s`'s customers (the bank), on a blocking thread.
    async fn holder(&self, shard: u32) -> Result<Arc<HolderData>, NodeError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.holder(shard))
            .await
            .map_err(|_| NodeError::Internal("shard loading failed"))?
    }

    /// Shard `s`'s users (the platform), on a blocking thread.
    async fn matcher(&self, shard: u32) -> Result<cleanroom_protocol::join::OwnIds, NodeError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.matcher(shard))
            .await
            .map_err(|_| NodeError::Internal("shard loading failed"))?
    }
}

impl Inner {
    fn role(&self) -> Role {
        match self.side {
            Side::Bank(_) => Role::Bank,
            Side::Platform(_) => Role::Platform,
        }
    }
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
        write!(f, "Node {{ role: {} }}", self.inner.role().as_str())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Node {
    /// The join's parameters both roles use (`context` binds its input).
    /// The rules' hash also names the key kinds matched, so nodes that
    /// match on different kinds (one on e-mail, the other on phone; or
    /// several keys against one) refuse each other's offer before any
    /// charge; matching on e-mail alone it is the rules' hash, as it
    /// always was (so those joins' session ids are unchanged).
    fn join_params(&self, context: [u8; 32]) -> JoinParams {
        let rules = self.inner.rules.hash();
        let email_only = self.inner.key_kinds == [cleanroom_crypto::normalize::IdKind::Email];
        let rules_hash = if !email_only {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(b"cleanroom-v1-key-kinds");
            ctx.update(&rules);
            for kind in &self.inner.key_kinds {
                let name = kind.name();
                ctx.update(&(name.len() as u64).to_le_bytes());
                ctx.update(name.as_bytes());
            }
            let mut out = [0u8; 32];
            out.copy_from_slice(ctx.finish().as_ref().get(..32).unwrap_or(&[0u8; 32]));
            out
        } else {
            rules
        };
        JoinParams {
            collaboration_id: self.inner.collaboration.clone(),
            rules_hash,
            context,
            chunk_points: DEFAULT_CHUNK_POINTS,
        }
    }

    /// `K`: the key slots of this collaboration's joins (1 with one key).
    fn key_slots(&self) -> usize {
        usize::try_from(self.inner.domains.key_slots).unwrap_or(1).max(1)
    }

    /// The peer set sizes this node accepts.
    fn peer_set_limits(&self) -> SetSizeLimits {
        SetSizeLimits {
            min: self.inner.limits.peer_set.0,
            max: self.inner.limits.peer_set.1,
        }
    }

    /// The shifted, truncated Laplace of `cardinality_epsilon` (ε in
    /// millionths) and `cardinality_delta`: the bank's dummy rows, the
    /// platform's block padding. With `K > 1` key slots, calibrated to a
    /// histogram whose neighbours differ by `2K` in L1 and `K` in one bin
    /// (docs/protocol.md, "Multi-key matching").
    fn cardinality_noise(&self) -> Result<ShiftedTruncatedLaplace, NodeError> {
        cardinality_noise(&self.inner.limits, self.key_slots() as u64)
    }
}

/// The cardinality noise of `limits` for joins of `key_slots` slots (see
/// `Node::cardinality_noise`).
fn cardinality_noise(limits: &Limits, key_slots: u64) -> Result<ShiftedTruncatedLaplace, NodeError> {
    cardinality_noise_of(
        limits.cardinality_epsilon_micro,
        limits.cardinality_delta_inverse,
        key_slots,
    )
}

/// The shifted, truncated Laplace of `ε_c` (millionths) and `δ_c = 1 /
/// delta_inv` for joins of `key_slots` slots.
fn cardinality_noise_of(eps: u64, delta_inv: u64, key_slots: u64) -> Result<ShiftedTruncatedLaplace, NodeError> {
    Ok(if key_slots > 1 {
        ShiftedTruncatedLaplace::for_histogram(eps, 1_000_000, delta_inv, 2 * key_slots, key_slots)?
    } else {
        ShiftedTruncatedLaplace::new(eps, 1_000_000, delta_inv)?
    })
}

/// The node's input as loaded: the data (on a sharded node without its
/// identifiers, which are in the shard files), its version, each
/// identifier's churn fingerprint, and the shards.
struct Input {
    data: Loaded,
    version: [u8; 32],
    fingerprints: Vec<u64>,
    sharding: Option<Sharding>,
}

/// Loads the node's input data on a blocking thread (split into shard
/// files under `state_dir/shards` when `[shards] count` is 2 or more) and
/// logs what was loaded (counts only).
async fn load_data(cfg: &NodeConfig, config_path: &std::path::Path, node_key: &[u8; 32]) -> Result<Input, NodeError> {
    let data_cfg = cfg.data.clone();
    let collab = cfg.collaboration.clone();
    let role = cfg.role;
    let node_key = Zeroizing::new(*node_key);
    let split = match (cfg.shard_count(), &cfg.shards.key) {
        (count @ 2.., Some(path)) => {
            let (key, key_id) = crate::shards::load_key(path)?;
            Some((count, key, key_id, cfg.memory_budget(config_path)?))
        }
        _ => None,
    };
    let dir = cfg.state_dir.join("shards");
    let input = tokio::task::spawn_blocking(move || -> Result<Input, NodeError> {
        let Some((count, key, key_id, memory_budget)) = split else {
            // A copy of the input from a sharded start is not kept.
            crate::input::remove_shards(&dir)?;
            let data = match role {
                Role::Bank => Loaded::Holder(load_holder(&data_cfg, &collab)?),
                Role::Platform => Loaded::Matcher(load_matcher(&data_cfg, &collab)?),
            };
            let (version, fingerprints) = match &data {
                Loaded::Holder(h) => (h.version, crate::state::fingerprints_by_id(&node_key, &h.ids)),
                Loaded::Matcher(m) => (m.version, crate::state::fingerprints_by_id(&node_key, &m.ids)),
            };
            return Ok(Input {
                data,
                version,
                fingerprints,
                sharding: None,
            });
        };
        let split = crate::input::Split {
            count,
            key: &key,
            key_id,
            memory_budget,
            node_key: &node_key,
        };
        let empty = || cleanroom_protocol::join::OwnIds::new(Vec::new());
        let (data, version, fingerprints, store) = match role {
            Role::Bank => {
                let h = crate::input::split_holder(&data_cfg, &collab, &split, &dir)?;
                let data = HolderData {
                    ids: empty()?,
                    key_offsets: None,
                    txns: Vec::new(),
                    version: h.version,
                    report: h.report,
                };
                (Loaded::Holder(data), h.version, h.fingerprints, h.store)
            }
            Role::Platform => {
                let m = crate::input::split_matcher(&data_cfg, &collab, &split, &dir)?;
                let data = MatcherData {
                    ids: empty()?,
                    segments: m.segments,
                    countries: m.countries,
                    users: Vec::new(),
                    version: m.version,
                    report: m.report,
                };
                (Loaded::Matcher(data), m.version, m.fingerprints, m.store)
            }
        };
        if store.largest_shard_bytes() > store.keep_bytes() {
            warn!(
                largest_shard_mib = store.largest_shard_bytes() >> 20,
                memory_budget_mib = memory_budget >> 20,
                "a shard's input is larger than half the memory budget: it is read from its file each time it is needed; more shards (or a larger budget) would keep it in memory"
            );
        }
        Ok(Input {
            data,
            version,
            fingerprints,
            sharding: Some(Sharding { count, key_id, store }),
        })
    })
    .await
    .map_err(|_| NodeError::Internal("data loading failed"))??;
    let (report, distinct) = match &input.data {
        Loaded::Holder(h) => (&h.report, h.ids.len()),
        Loaded::Matcher(m) => (&m.report, m.ids.len()),
    };
    let distinct = input.sharding.as_ref().map_or(distinct, |sh| sh.store.len());
    info!(
        rows = report.rows,
        loaded = report.loaded,
        distinct_identifiers = distinct,
        bad_rows = report.bad_rows(),
        duplicate_identifiers = report.duplicate_identifiers,
        mapped_to_other = report.mapped_to_other,
        shards = input.sharding.as_ref().map_or(1, |sh| sh.count),
        "data loaded"
    );
    if report.bad_rows() > 0 {
        warn!(reasons = %report.describe(), "bad rows skipped");
    }
    if let Loaded::Holder(h) = &input.data
        && h.key_offsets.is_some()
    {
        info!(customers = h.customers(), "customers with several keys");
    }
    let keys = report.describe_keys();
    if !keys.is_empty() {
        warn!(keys = %keys, "keys left out");
    }
    Ok(input)
}

/// This operator's signed policy (verified against its own public key; a
/// template it does not approve is logged and will not run), its JSON as
/// shown to the peer, and the other operator's public key.
fn load_policies(cfg: &NodeConfig, templates: &[Template]) -> Result<(SignedPolicy, Vec<u8>, String), NodeError> {
    let own_policy = crate::policy::load_verified(&cfg.policy.signed, &cfg.policy.public_key)?;
    for t in templates {
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
    Ok((own_policy, own_policy_json, peer_public_key))
}

impl Node {
    /// Loads the data, opens the state, binds the port and starts serving.
    ///
    /// # Errors
    /// Any configuration, data, state or transport error, with a clear message.
    pub async fn start(cfg: NodeConfig, config_path: &std::path::Path) -> Result<Node, NodeError> {
        Self::start_as(cfg, config_path, None).await
    }

    /// Starts worker `index` of the node `cfg` configures (docs/protocol.md,
    /// "Workers"): it listens on `[workers] addresses[index]` under its own
    /// certificate (`<role>-worker-<index>`), keeps its state (its shard
    /// files, its key) in `state_dir/worker-<index>`, serves only its
    /// coordinator (the node's certificate), and runs the joins and
    /// aggregate batches of its shards with the peer.
    ///
    /// # Errors
    /// As [`Node::start`]; also a config without `[workers]`, an index not
    /// in it, or a certificate not for this worker.
    pub async fn start_worker(
        mut cfg: NodeConfig,
        config_path: &std::path::Path,
        index: u32,
    ) -> Result<Node, NodeError> {
        let count = cfg.worker_count();
        let bad = |what: String| NodeError::Config {
            path: config_path.display().to_string(),
            what,
        };
        if count == 0 {
            return Err(bad("a worker needs [workers] addresses in its node's config".into()));
        }
        if index >= count {
            return Err(bad(format!(
                "worker {index}: [workers] lists {count} addresses (indices 0 to {})",
                count - 1
            )));
        }
        let listen = cfg.worker_listen(index).ok_or_else(|| {
            bad(format!(
                "worker {index}'s address is a name: give [workers] listen, the address the workers bind"
            ))
        })?;
        let (cert, key) = cfg.worker_identity(index);
        // The bank's workers reach their coordinator where it listens.
        cfg.workers.coordinator = Some(cfg.coordinator_address());
        cfg.listen = listen;
        cfg.identity.cert = cert;
        cfg.identity.key = key;
        cfg.state_dir = cfg.worker_state_dir(index);
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| NodeError::Io {
            what: "creating the worker's state directory",
            source,
        })?;
        Self::start_as(cfg, config_path, Some(worker::WorkerRole { index, count })).await
    }

    async fn start_as(
        cfg: NodeConfig,
        config_path: &std::path::Path,
        as_worker: Option<worker::WorkerRole>,
    ) -> Result<Node, NodeError> {
        let limits = cfg.limits(config_path)?;
        let query_timeouts = limits.query_timeouts();
        let templates = cfg.templates(config_path)?;
        let identity = Identity::load(&cfg.identity.cert, &cfg.identity.key)?;
        let ca = cfg.identity.trust_anchors()?;
        let own_name = match as_worker {
            None => pki::node_name(cfg.role.as_str()),
            Some(w) => pki::worker_name(cfg.role.as_str(), w.index),
        };
        if let Some(leaf) = identity.leaf()
            && !certificate_is_for(leaf, &own_name)
        {
            return Err(NodeError::Config {
                path: cfg.identity.cert.display().to_string(),
                what: format!("this certificate is not for {own_name}"),
            });
        }
        // The platform's coordinator dials its workers; the bank's workers
        // dial theirs.
        let workers = match (as_worker, cfg.worker_count(), cfg.role) {
            (None, 1.., Role::Platform) => {
                Some(worker::WorkerPool::new(cfg.workers.addresses.clone(), &identity, &ca)?)
            }
            _ => None,
        };
        let coordinator = match (as_worker, cfg.role) {
            (Some(_), Role::Bank) => Some(bank_worker::CoordinatorLink::new(cfg.coordinator_address())),
            _ => None,
        };
        let (own_policy, own_policy_json, peer_public_key) = load_policies(&cfg, &templates)?;
        let mut state = State::open(&cfg.state_dir)?;
        let node_key = state.node_key()?;
        let Input {
            data,
            version: data_version,
            fingerprints,
            sharding,
        } = load_data(&cfg, config_path, &node_key).await?;
        state.expire_joins(&data_version)?;
        let endpoint = node_endpoint(cfg.listen, &identity, &ca, &TransportSettings::default())?;
        let mut analysts: Vec<String> = templates.iter().flat_map(|t| t.analysts.iter().cloned()).collect();
        analysts.sort();
        analysts.dedup();
        let side = match data {
            Loaded::Holder(h) => Side::Bank(Arc::new(BankSide::new(Arc::new(h), query_timeouts))),
            Loaded::Matcher(m) => {
                let bank_address = cfg.peer.address.ok_or_else(|| NodeError::Config {
                    path: config_path.display().to_string(),
                    what: "the platform node needs [peer] address (it connects to the bank)".into(),
                })?;
                // Platform worker w talks to bank worker w when the bank has workers.
                let bank = match as_worker.and_then(|w| Some((w.index, *cfg.peer.workers.get(w.index as usize)?))) {
                    Some((w, address)) => (address, pki::worker_name("bank", w)),
                    None => (bank_address, pki::node_name("bank")),
                };
                Side::Platform(Arc::new(PlatformSide::new(m, bank)))
            }
        };
        let inner = Arc::new(Inner {
            side,
            collaboration: cfg.collaboration.id.clone(),
            rules: NormalizationRules::v1(&cfg.collaboration.default_country_code),
            key_kinds: cfg.data.key_columns().into_iter().map(|(_, k)| k).collect(),
            limits,
            templates,
            domains: cfg.domains(),
            data_version,
            state: Mutex::new(state),
            node_key,
            fingerprints,
            endpoint,
            admission_ids: std::sync::atomic::AtomicU64::new(0),
            in_flight: Mutex::new(HashMap::new()),
            admissions: Mutex::new(HashMap::new()),
            peer_policy_known: Notify::new(),
            connections: Mutex::new(HashMap::new()),
            request_rate: Mutex::new(HashMap::new()),
            analysts,
            own_policy,
            own_policy_json,
            peer_public_key,
            peer_policy: Mutex::new(None),
            last_join: Mutex::new(Vec::new()),
            exchanges: std::sync::atomic::AtomicU64::new(0),
            stalls: std::sync::atomic::AtomicU64::new(0),
            sharding,
            workers,
            worker: as_worker,
            workers_count: cfg.worker_count(),
            coordinator,
            stopping: std::sync::atomic::AtomicBool::new(false),
        });
        let node = Node { inner };
        let accept = node.clone();
        tokio::spawn(async move { accept.accept_loop().await });
        if let (Sided::Platform(eager), None) = (node.sided(), as_worker) {
            // Connect to the bank early, so both sides have each other's
            // signed templates before the first query; and again whenever
            // the connection ends: a bank that restarted knows this node's
            // templates only once they are shown again, and when the bank
            // has workers nothing else of this node's may reconnect to it.
            // Until the node shuts down: `connect_attempts` tries
            // `connect_retry` apart, then one a minute.
            tokio::spawn(async move {
                let stopping = || eager.inner.stopping.load(std::sync::atomic::Ordering::Relaxed);
                let t = &eager.inner.limits.timeouts;
                let mut failed = 0u32;
                while !stopping() {
                    match eager.peer_connection().await {
                        Ok(conn) => {
                            failed = 0;
                            let reason = conn.closed().await;
                            if !stopping() {
                                info!(reason = %reason, "the connection to the bank ended; connecting again");
                            }
                            // Not faster than this, if it keeps closing at once.
                            tokio::time::sleep(t.connect_retry).await;
                        }
                        Err(e) => {
                            failed = failed.saturating_add(1);
                            if failed == t.connect_attempts {
                                warn!(error = %e, "bank still not reachable; trying once a minute");
                            } else if failed < t.connect_attempts {
                                info!(error = %e, "bank not reachable yet");
                            }
                            let wait = if failed < t.connect_attempts {
                                t.connect_retry
                            } else {
                                Duration::from_secs(60)
                            };
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            });
        }
        match as_worker {
            None => {
                info!(role = cfg.role.as_str(), address = %node.local_addr()?, workers = cfg.worker_count(), "node listening")
            }
            Some(w) => {
                info!(role = cfg.role.as_str(), worker = w.index, address = %node.local_addr()?, "worker listening")
            }
        }
        Ok(node)
    }

    /// The address the node listens on.
    ///
    /// # Errors
    /// An I/O error from the socket.
    pub fn local_addr(&self) -> Result<SocketAddr, NodeError> {
        self.inner.endpoint.local_addr().map_err(|source| NodeError::Io {
            what: "reading the node's local address",
            source,
        })
    }

    /// Stops accepting, closes connections and waits for them to finish.
    pub async fn shutdown(&self) {
        self.inner.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
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
        match &self.inner.side {
            Side::Platform(p) => p.turns.load(),
            Side::Bank(_) => (false, 0),
        }
    }

    /// Bank: streams of the peer node being served (joins, aggregates,
    /// share checks, policies).
    pub fn peer_streams(&self) -> usize {
        match &self.inner.side {
            Side::Bank(b) => b.peer_streams.load(std::sync::atomic::Ordering::Relaxed),
            Side::Platform(_) => 0,
        }
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
        let Side::Platform(p) = &self.inner.side else {
            return (0, 0);
        };
        match p.bank_conn.lock().await.as_ref() {
            Some(c) => {
                let s = c.stats();
                (s.udp_tx.bytes, s.udp_rx.bytes)
            }
            None => (0, 0),
        }
    }

    /// This node's phases of the last join it ran (seconds).
    pub fn last_join_phases(&self) -> Vec<(Phase, f64)> {
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

    /// The bank's normalised identifiers (for benchmarks; empty on the
    /// platform; a sharded node's shard after shard).
    ///
    /// # Errors
    /// A shard file that does not read back.
    pub fn holder_ids(&self) -> Result<Vec<Vec<u8>>, NodeError> {
        match (&self.inner.side, &self.inner.sharding) {
            (Side::Bank(_), Some(sh)) => sh.store.all_ids(),
            (Side::Bank(b), None) => Ok(b.data.ids.to_vec()),
            (Side::Platform(_), _) => Ok(Vec::new()),
        }
    }

    /// The platform's normalised identifiers (for benchmarks; empty on the
    /// bank; a sharded node's shard after shard).
    ///
    /// # Errors
    /// A shard file that does not read back.
    pub fn matcher_ids(&self) -> Result<Vec<Vec<u8>>, NodeError> {
        match (&self.inner.side, &self.inner.sharding) {
            (Side::Platform(_), Some(sh)) => sh.store.all_ids(),
            (Side::Platform(p), None) => Ok(p.data.ids.to_vec()),
            (Side::Bank(_), _) => Ok(Vec::new()),
        }
    }

    /// Shard files this node has read back since it started (0 unsharded).
    pub fn shard_reads(&self) -> u64 {
        self.inner.sharding.as_ref().map_or(0, |sh| sh.store.reads())
    }

    /// The bank's customers (with one key, its identifiers; for
    /// benchmarks); 0 on the platform.
    pub fn holder_customers(&self) -> usize {
        match &self.inner.side {
            Side::Bank(_) => self.customers(),
            Side::Platform(_) => 0,
        }
    }

    /// The bank's customers (with one key, its identifiers), in all
    /// shards; the platform's identifiers.
    fn customers(&self) -> usize {
        match (&self.inner.side, &self.inner.sharding) {
            (Side::Bank(b), None) => b.data.customers(),
            _ => self.identifiers(),
        }
    }

    /// This node's identifiers: customers (the bank) or users (the
    /// platform), in all shards; with several keys, their keys (the churn
    /// limit counts keys added and removed).
    fn identifiers(&self) -> usize {
        if let Some(sh) = &self.inner.sharding {
            return sh.store.len();
        }
        match &self.inner.side {
            Side::Bank(b) => b.data.ids.len(),
            Side::Platform(p) => p.data.ids.len(),
        }
    }

    /// This node as its role.
    fn sided(&self) -> Sided {
        match &self.inner.side {
            Side::Bank(side) => Sided::Bank(Bank {
                node: self.clone(),
                side: side.clone(),
            }),
            Side::Platform(side) => Sided::Platform(Platform {
                node: self.clone(),
                side: side.clone(),
            }),
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
        let names = cleanroom_transport::certificate_names(&cert);
        // A platform worker: the bank (or a bank worker) serves its shard
        // joins and batches.
        let platform_worker = pki::worker_index(&names, "platform")
            .filter(|w| certificate_is_for(&cert, &pki::worker_name("platform", *w)));
        match (self.inner.worker, self.inner.role()) {
            (Some(role), Role::Platform) => return self.serve_coordinator(conn, &cert, role).await,
            (Some(_), Role::Bank) => {
                if let Some(w) = platform_worker {
                    self.serve_peer_connection(conn, &pki::worker_name("platform", w), Some(w))
                        .await;
                } else {
                    info!("connection closed: a bank worker serves only the platform's workers");
                    conn.close(4u32.into(), b"a bank worker serves only the platform's workers");
                }
                return;
            }
            (None, Role::Bank) => {
                // One of this bank's workers.
                if let Some(w) = pki::worker_index(&names, "bank")
                    && w < self.inner.workers_count
                    && certificate_is_for(&cert, &pki::worker_name("bank", w))
                    && let Sided::Bank(bank) = self.sided()
                {
                    bank.serve_bank_worker(conn, w).await;
                    return;
                }
            }
            (None, Role::Platform) => {}
        }
        let peer_name = pki::node_name(self.inner.role().peer().as_str());
        if certificate_is_for(&cert, &peer_name) {
            self.serve_peer_connection(conn, &peer_name, None).await;
            return;
        }
        // A worker of the platform runs its shards' joins and batches.
        if self.inner.role() == Role::Bank
            && let Some(w) = platform_worker
        {
            self.serve_peer_connection(conn, &pki::worker_name("platform", w), Some(w))
                .await;
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
        while let Ok((send, recv)) = conn.accept_bi().await {
            let node = self.clone();
            let analyst = analyst.clone();
            let from = from.clone();
            let span = info_span!("analyst", name = %analyst);
            tokio::spawn(async move { node.serve_analyst_stream(&analyst, &from, send, recv).await }.instrument(span));
        }
    }

    /// A connection with the peer node's certificate: only the bank takes
    /// them (the platform connects out); each stream is served by its first
    /// message (`Bank::serve_peer_stream`).
    async fn serve_peer_connection(&self, conn: quinn::Connection, peer_name: &str, worker: Option<u32>) {
        let Sided::Bank(bank) = self.sided() else {
            conn.close(3u32.into(), b"this node does not accept peer connections");
            return;
        };
        // The platform needs one; a few more cover its restarts until
        // the old ones are reset.
        let Ok(_open) = Counted::take(self, peer_name, |i| &i.connections, MAX_PEER_CONNECTIONS, u32::MAX) else {
            info!(peer = %peer_name, "peer connection closed: {MAX_PEER_CONNECTIONS} already open");
            conn.close(5u32.into(), b"too many connections from the peer node");
            return;
        };
        info!(peer = %peer_name, "peer connected");
        while let Ok((send, recv)) = conn.accept_bi().await {
            let bank = bank.clone();
            tokio::spawn(async move {
                let _serving = Gauge::up(&bank.side.peer_streams);
                if let Err(e) = bank.serve_peer_stream(send, recv, worker).await {
                    warn!(error = %e, "peer session failed");
                }
            });
        }
    }

    /// A worker: connections of its coordinator only (the node's own
    /// certificate), each stream one request.
    async fn serve_coordinator(
        &self,
        conn: quinn::Connection,
        cert: &rustls::pki_types::CertificateDer<'_>,
        role: worker::WorkerRole,
    ) {
        let Sided::Platform(platform) = self.sided() else {
            conn.close(3u32.into(), b"only the platform has workers");
            return;
        };
        if !certificate_is_for(cert, &pki::node_name(self.inner.role().as_str())) {
            info!("connection closed: a worker serves only its coordinator");
            conn.close(4u32.into(), b"a worker serves only its coordinator");
            return;
        }
        info!("coordinator connected");
        while let Ok((send, recv)) = conn.accept_bi().await {
            let platform = platform.clone();
            tokio::spawn(async move {
                if let Err(e) = platform.serve_worker_stream(role, send, recv).await {
                    warn!(error = %e, "a coordinator's stream failed");
                }
            });
        }
    }

    /// One stream of an analyst: its request (within the request timeout,
    /// or the short one over the rate), the rate check, the answer.
    async fn serve_analyst_stream(
        &self,
        analyst: &str,
        from: &Requester,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        // Over the rate, only a query under a held admission is
        // served: its frame must come soon, so that streams over
        // the rate do not stay open for the whole request timeout.
        let t = &self.inner.limits.timeouts;
        let wait = if self.rate_left(analyst) {
            t.analyst_request
        } else {
            t.over_rate_request
        };
        let request = match pump::read_one_limited(&mut recv, wait, pump::MAX_ANALYST_REQUEST).await {
            Ok(frame) => match Message::decode(&frame) {
                Ok(Message::AnalystRequest(req)) => Ok(req),
                Ok(_) => Err(AnalystResponse::Refused(Refusal::new(
                    RefusalCode::BadRequest,
                    "expected an analyst request",
                ))),
                Err(e) => Err(AnalystResponse::Refused(Refusal::new(
                    RefusalCode::BadRequest,
                    format!("malformed request: {e}"),
                ))),
            },
            Err(e) => {
                info!(error = %e, "analyst stream ended");
                return;
            }
        };
        // The query of an admission held here passed the rate
        // check with its `Admit`: it is not refused after the
        // other node may have charged it.
        let admitted = matches!(&request, Ok(AnalystRequest::Query(q)) if self.holds_admission(analyst, &q.query_id));
        let response = if !admitted && !self.within_rate(analyst) {
            AnalystResponse::Refused(Refusal::new(
                RefusalCode::RateLimited,
                format!(
                    "rate limit: more than {} requests per second from this analyst (max_requests_per_analyst_per_second); slow down",
                    self.inner.limits.requests_per_second
                ),
            ))
        } else {
            match request {
                Ok(req) => self.serve_analyst(analyst, req, from).await,
                Err(refusal) => refusal,
            }
        };
        if write_one(&mut send, &Message::AnalystResponse(response)).await.is_ok() {
            let _ = send.finish();
            let _ = send.stopped().await;
        }
    }

    fn peer_policy_from(&self, signed: &[u8]) -> Result<(), NodeError> {
        let p = SignedPolicy::from_json(signed).map_err(|e| PeerError::Policy(e.to_string()))?;
        crate::policy::verify(&p, &self.inner.peer_public_key).map_err(PeerError::Policy)?;
        if p.role != self.inner.role().peer().as_str() || p.collaboration != self.inner.collaboration {
            return Err(PeerError::Policy("it is for another role or collaboration".into()).into());
        }
        info!(templates = p.templates.len(), "peer's signed policy verified");
        *lock(&self.inner.peer_policy) = Some(p);
        self.inner.peer_policy_known.notify_waiters();
        Ok(())
    }

    /// The checks before a charge need the peer's signed policy: the bank
    /// waits for it (`Bank::wait_peer_policy`); the platform reaches the bank
    /// (`Platform::peer_connection`), which shows the bank's.
    async fn peer_policy_or_wait(&self, side: &Sided) -> Result<(), NodeError> {
        match side {
            Sided::Bank(b) => {
                b.wait_peer_policy().await;
                Ok(())
            }
            Sided::Platform(p) => p.peer_connection().await.map(drop),
        }
    }
}

impl Bank {
    /// The platform shows its policy when it connects; a request may
    /// arrive a moment before that, so wait up to `Timeouts::peer_policy`.
    async fn wait_peer_policy(&self) {
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
}

impl Node {
    /// Why a template may not run, if it may not: both operators must have
    /// signed its exact text.
    fn not_runnable(&self, t: &Template) -> Option<String> {
        let own = self.inner.own_policy.approves(t);
        let peer = lock(&self.inner.peer_policy).as_ref().map(|p| p.approves(t));
        let (me, other) = (self.inner.role().as_str(), self.inner.role().peer().as_str());
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
                    self.inner.role().as_str()
                ),
            )
        })
    }
}

async fn abort(send: &mut quinn::SendStream, session: SessionId, code: AbortCode) {
    let _ = write_one(send, &Message::Abort(Abort { session, code })).await;
    let _ = send.finish();
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The dummy rows and block padding of a `K`-slot join are calibrated
    /// to a histogram whose neighbours differ by `2K` in L1 and `K` in one
    /// bin: at `ε_c = 1/2`, `δ_c = 10⁻⁶`, `D_max` is 62 with one key and 260
    /// with two (docs/protocol.md, "Multi-key matching").
    #[test]
    fn cardinality_noise_follows_the_key_slots() {
        let one = cardinality_noise_of(500_000, 1_000_000, 1).unwrap();
        let two = cardinality_noise_of(500_000, 1_000_000, 2).unwrap();
        assert_eq!(
            one,
            ShiftedTruncatedLaplace::new(500_000, 1_000_000, 1_000_000).unwrap()
        );
        assert_eq!(
            two,
            ShiftedTruncatedLaplace::for_histogram(500_000, 1_000_000, 1_000_000, 4, 2).unwrap()
        );
        assert_eq!((one.d_max(), two.d_max()), (62, 260));
    }
}
