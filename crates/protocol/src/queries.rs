//! The query lifecycle between the nodes, sans-IO: which query ids each
//! node is running, and what a message or a timer about one of them does.
//!
//! The cryptographic phases ([`crate::join`], [`crate::aggregate`]) run one
//! session each; around them, the nodes keep a second, smaller protocol per
//! query id. On the bank ([`BankQueries`]) an analyst's request registers
//! the query, the platform's aggregate batches claim it (all over one join),
//! each batch's share is recorded, and the whole share goes to the waiting
//! request; a query dropped, cancelled, timed out or failed is remembered
//! as refused for a while so that the platform's batch for it is told at
//! once. On the platform ([`PlatformQueries`]) one attempt per query id
//! runs at a time (a retry waits for the attempt before it), and a cancel
//! from the analyst (after the bank refused the query) reaches the attempt.
//!
//! Each query id has one explicit state ([`BankQuery`], [`PlatformQuery`]);
//! every transition is a method here, with the time passed in. The node
//! keeps these machines behind a lock, feeds them the events it sees, and
//! carries out what they answer: wake a waiting request, tell a batch to
//! wait until an instant, arm a timer for a registration's deadline. Nothing
//! here sleeps, reads a clock or touches a socket, so every interleaving can
//! be tested in memory (see the tests at the end, and
//! `tests/tests/lifecycle.rs`).
//!
//! A bank query id's transitions (the method that makes each):
//!
//! ```text
//! (none | Refused) --register(analyst)--> Waiting      (replaces Waiting or Running too)
//! (none | Refused) --register(rerun, join)--> Waiting  (join fixed)
//! Waiting --claim(join)--> Running                      (later claims must name the join)
//! Running --batch_done(last share)--> Completing --stored--> (none)
//! Running --batch_done(failed) | expire--> Refused
//! Waiting --analyst_gone | cancel | expire--> Refused
//! Refused --request_arrived | refusal_remembered passes--> (none)
//! ```

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use cleanroom_crypto::shares::Share;
use cleanroom_wire::{QueryId, RunId, SessionId};
use ring::digest::{Context, SHA256};

/// The waits of the query lifecycle, by name (the node's configuration
/// supplies them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryTimeouts {
    /// A registered query not answered within this is dropped.
    pub query: Duration,
    /// A batch for a query whose analyst request has not arrived waits at
    /// most this long (and at most `query`)...
    pub unclaimed_aggregate: Duration,
    /// ...or this long for a query id refused within `refusal_remembered`.
    pub refused_aggregate: Duration,
    /// How long a refused query id is remembered.
    pub refusal_remembered: Duration,
}

/// Which run of a query's aggregate the shares of these OT sessions (one
/// per platform group, in group order) make: both nodes derive it, and two
/// shares add up to the result only when their runs are equal.
pub fn run_of<'a>(sessions: impl IntoIterator<Item = &'a SessionId>) -> RunId {
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"cleanroom-v1-run");
    for s in sessions {
        ctx.update(s.as_ref());
    }
    let d = ctx.finish();
    let mut out = [0u8; 16];
    if let Some(head) = d.as_ref().get(..16) {
        out.copy_from_slice(head);
    }
    RunId(out)
}

/// The join context of shard `shard` of `shards` for a join whose context
/// unsharded would be `base`: `SHA-256("cleanroom-v1-shard-context" || base
/// || S || s)` (little-endian `u32`s). Each shard's join is bound to its
/// place, and the platform's block padding (seeded by the context) is the
/// same for a re-join of the same shard of unchanged data.
pub fn shard_join_context(base: &[u8; 32], shards: u32, shard: u32) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"cleanroom-v1-shard-context");
    ctx.update(base);
    ctx.update(&shards.to_le_bytes());
    ctx.update(&shard.to_le_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The name of a query's join when the collaboration is split into shards:
/// `J* = SHA-256("cleanroom-v1-shard-joins" || J_0 || ... || J_{S-1})`,
/// first 16 bytes. It is what the ledger, the share check and a rerun's
/// binding hold, as the one join's session does unsharded.
pub fn sharded_join_id(joins: &[SessionId]) -> SessionId {
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"cleanroom-v1-shard-joins");
    for j in joins {
        ctx.update(j.as_ref());
    }
    let d = ctx.finish();
    let mut out = [0u8; 16];
    if let Some(head) = d.as_ref().get(..16) {
        out.copy_from_slice(head);
    }
    SessionId(out)
}

/// A node's share of a sharded query's batches (shard-major: batch
/// `k = s * G + g`, so `shards` equal runs of one unsharded share each)
/// summed into one unsharded share, cell by cell mod `2^64`; the cells'
/// own rings are the low bits of that sum (`Share::reduce_bits`). `None`
/// if the words do not split into `shards` equal runs.
pub fn fold_shards(words: &[u64], shards: usize) -> Option<Share> {
    if shards == 0 || !words.len().is_multiple_of(shards) {
        return None;
    }
    let width = words.len() / shards;
    let mut sum = vec![0u64; width];
    for run in words.chunks_exact(width.max(1)) {
        for (a, b) in sum.iter_mut().zip(run) {
            *a = a.wrapping_add(*b);
        }
    }
    Some(Share::from_words(sum))
}

/// One registration of a query id on the bank: tells it from a later one
/// (an analyst's retry replaces an earlier registration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Registration(u64);

/// A registered query on the bank, with the shell's part of it (`T`: what
/// the batches need, and where the whole share goes).
#[derive(Debug)]
pub struct Registered<T> {
    reg: Registration,
    analyst: String,
    /// The join every batch must name: fixed at registration for a rerun
    /// (the join of the released share), else by the first batch.
    join: Option<SessionId>,
    join_fixed: bool,
    /// The platform's groups: one batch (and share) each.
    groups: usize,
    started: Instant,
    shell: T,
}

/// A bank query id's state.
#[derive(Debug)]
pub enum BankQuery<T> {
    /// Accepted here; no batch of the platform has claimed it yet.
    Waiting(Registered<T>),
    /// The platform's batches are running; one share slot per group.
    Running(Registered<T>, Vec<Option<(Share, SessionId)>>),
    /// Every batch is in; the share is being noised and stored.
    Completing(Registration),
    /// Refused, dropped, cancelled, timed out or failed here at this time.
    Refused(Instant),
}

/// What a registration did.
#[derive(Debug, PartialEq, Eq)]
pub enum Register {
    /// Registered; drop it (`BankQueries::expire`) at the deadline.
    New(Registration, Instant),
    /// A rerun for a query already registered: the registration stands.
    Kept,
    /// The query's share is being stored: ask again shortly.
    Busy,
}

/// What an aggregate batch of the platform finds for its query.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim<'a, T> {
    /// The query's registration: run the batch, and record how it ended
    /// under this registration.
    Found(Registration, &'a T),
    /// The query's other batches (or its released share) are over another
    /// join.
    OtherJoin,
    /// Not here (yet): ask again when the registry changes, until then.
    Wait(Instant),
    /// Not accepted here in time.
    Unknown,
}

/// How a batch ended.
#[derive(Debug)]
pub enum Batch {
    /// Its share, and its OT session.
    Share(Share, SessionId),
    /// The bank does not have the join it named: the platform joins again
    /// and retries, so this is not a failure of the query.
    UnknownJoin,
    /// It failed (the operator's log has why).
    Failed(String),
}

/// A query's whole share on the bank.
#[derive(Debug)]
pub struct Assembled {
    /// The groups' shares, concatenated in group order.
    pub share: Share,
    /// The run they make.
    pub run: RunId,
    /// The join they ran over.
    pub join: SessionId,
    /// From registration to the last batch.
    pub elapsed: Duration,
}

/// What a registration ends with, for the request waiting on it.
pub type Delivery = Result<Assembled, String>;

/// The bank's query ids (see the module documentation).
#[derive(Debug)]
pub struct BankQueries<T> {
    queries: HashMap<QueryId, BankQuery<T>>,
    next: u64,
    timeouts: QueryTimeouts,
}

impl<T> BankQueries<T> {
    /// An empty registry.
    pub fn new(timeouts: QueryTimeouts) -> Self {
        Self {
            queries: HashMap::new(),
            next: 0,
            timeouts,
        }
    }

    /// The state of a query id, for tests and logs.
    pub fn state(&self, qid: &QueryId) -> Option<&BankQuery<T>> {
        self.queries.get(qid)
    }

    /// An analyst's request for `qid` arrived: a refusal of it is
    /// forgotten (a batch for it waits its full patience again).
    pub fn request_arrived(&mut self, qid: &QueryId) {
        if matches!(self.queries.get(qid), Some(BankQuery::Refused(_))) {
            self.queries.remove(qid);
        }
    }

    /// Registers `qid`, whose plan has `groups` platform groups (one batch
    /// each, at least one): an analyst's request
    /// (`rerun_over: None`) replaces an earlier registration (whose waiting
    /// request then ends without a share); a rerun for the platform over
    /// the join of the released share keeps a registration that exists.
    pub fn register(
        &mut self,
        qid: QueryId,
        analyst: &str,
        groups: usize,
        rerun_over: Option<SessionId>,
        shell: T,
        now: Instant,
    ) -> Register {
        match (self.queries.get(&qid), rerun_over) {
            (Some(BankQuery::Completing(_)), _) => return Register::Busy,
            (Some(BankQuery::Waiting(_) | BankQuery::Running(..)), Some(_)) => return Register::Kept,
            _ => {}
        }
        let reg = Registration(self.next);
        self.next = self.next.wrapping_add(1);
        self.queries.insert(
            qid,
            BankQuery::Waiting(Registered {
                reg,
                analyst: analyst.to_string(),
                join: rerun_over,
                join_fixed: rerun_over.is_some(),
                groups: groups.max(1),
                started: now,
                shell,
            }),
        );
        Register::New(reg, now + self.timeouts.query)
    }

    /// Whether `qid` is registered (waiting or running).
    pub fn is_registered(&self, qid: &QueryId) -> bool {
        matches!(
            self.queries.get(qid),
            Some(BankQuery::Waiting(_) | BankQuery::Running(..))
        )
    }

    /// Whether an aggregate for `qid` is running or its share is being
    /// stored (the platform's share check must ask again shortly).
    pub fn busy(&self, qid: &QueryId) -> bool {
        matches!(
            self.queries.get(qid),
            Some(BankQuery::Running(..) | BankQuery::Completing(_))
        )
    }

    fn refused_lately(&self, qid: &QueryId, now: Instant) -> bool {
        matches!(self.queries.get(qid), Some(BankQuery::Refused(at))
            if now.saturating_duration_since(*at) < self.timeouts.refusal_remembered)
    }

    /// A batch over `join`, first asked at `asked`, claims `qid`. Every
    /// batch of one registration must name the same join.
    pub fn claim(&mut self, qid: &QueryId, join: SessionId, asked: Instant, now: Instant) -> Claim<'_, T> {
        let patience = if self.refused_lately(qid, now) {
            self.timeouts.refused_aggregate
        } else {
            self.timeouts.query.min(self.timeouts.unclaimed_aggregate)
        };
        match self.queries.get(qid) {
            Some(BankQuery::Waiting(r) | BankQuery::Running(r, _)) if r.join.is_some_and(|j| j != join) => {
                return Claim::OtherJoin;
            }
            Some(BankQuery::Waiting(r)) => {
                let groups = r.groups;
                if let Some(BankQuery::Waiting(r)) = self.queries.remove(qid) {
                    self.queries.insert(*qid, BankQuery::Running(r, vec![None; groups]));
                }
            }
            Some(BankQuery::Running(..)) => {}
            Some(BankQuery::Completing(_) | BankQuery::Refused(_)) | None => {
                return wait_or_unknown(asked + patience, now);
            }
        }
        match self.queries.get_mut(qid) {
            Some(BankQuery::Running(r, _)) => {
                r.join = Some(join);
                Claim::Found(r.reg, &r.shell)
            }
            _ => Claim::Unknown,
        }
    }

    /// The shell's part of a running query, to add a batch's statistics.
    pub fn shell_mut(&mut self, qid: &QueryId) -> Option<&mut T> {
        match self.queries.get_mut(qid) {
            Some(BankQuery::Waiting(r) | BankQuery::Running(r, _)) => Some(&mut r.shell),
            _ => None,
        }
    }

    /// Records how batch `group`, which claimed registration `reg` over
    /// `join`, ended (a batch of an ended registration is ignored). When
    /// the last group's share is in (or a batch failed) the registration
    /// ends: its shell and what to deliver to the waiting request come back.
    pub fn batch_done(
        &mut self,
        qid: &QueryId,
        reg: Registration,
        join: SessionId,
        group: usize,
        batch: Batch,
        now: Instant,
    ) -> Option<(T, Delivery)> {
        let Entry::Occupied(mut slot) = self.queries.entry(*qid) else {
            return None;
        };
        let BankQuery::Running(r, shares) = slot.get_mut() else {
            return None;
        };
        if r.reg != reg {
            return None;
        }
        // Only an UnknownJoin (which forgets the join) lets the join
        // change; a share over another join than the query's is a peer's
        // fault, not a share of this run.
        let batch = match batch {
            Batch::Share(..) if r.join != Some(join) => {
                Batch::Failed("a batch's share over another join than the query's".into())
            }
            b => b,
        };
        match batch {
            Batch::UnknownJoin => {
                // The platform joins again; its batches will name the new
                // join, so the one this batch claimed with is forgotten,
                // unless a batch already ran over it or it is a rerun's.
                if !r.join_fixed && r.join == Some(join) && shares.iter().all(Option::is_none) {
                    r.join = None;
                }
                None
            }
            Batch::Failed(why) => {
                let BankQuery::Running(r, _) = slot.insert(BankQuery::Refused(now)) else {
                    return None;
                };
                Some((r.shell, Err(why)))
            }
            Batch::Share(share, session) => {
                let Some(cell) = shares.get_mut(group) else {
                    let BankQuery::Running(r, _) = slot.insert(BankQuery::Refused(now)) else {
                        return None;
                    };
                    return Some((r.shell, Err("a batch for a group the query does not have".into())));
                };
                *cell = Some((share, session));
                if shares.iter().any(Option::is_none) {
                    return None;
                }
                let reg = r.reg;
                let BankQuery::Running(r, shares) = slot.insert(BankQuery::Completing(reg)) else {
                    return None;
                };
                let Some(join) = r.join else {
                    return Some((r.shell, Err("a share without its join".into())));
                };
                let sessions: Vec<SessionId> = shares.iter().flatten().map(|(_, s)| *s).collect();
                let words: Vec<u64> = shares.iter().flatten().flat_map(|(s, _)| s.words().to_vec()).collect();
                Some((
                    r.shell,
                    Ok(Assembled {
                        share: Share::from_words(words),
                        run: run_of(&sessions),
                        join,
                        elapsed: now.saturating_duration_since(r.started),
                    }),
                ))
            }
        }
    }

    /// The analyst of registration `reg` has gone: a query no batch has
    /// claimed is dropped (and remembered as refused); a running one
    /// finishes, so its share is stored for a retry.
    pub fn analyst_gone(&mut self, qid: &QueryId, reg: Registration, now: Instant) -> Option<T> {
        match self.queries.get(qid) {
            Some(BankQuery::Waiting(r)) if r.reg == reg => self.refuse_entry(qid, now),
            _ => None,
        }
    }

    /// The analyst cancels `qid` (the platform refused it): dropped if no
    /// batch has claimed it. Whether it was.
    pub fn cancel(&mut self, qid: &QueryId, analyst: &str, now: Instant) -> Option<T> {
        match self.queries.get(qid) {
            Some(BankQuery::Waiting(r)) if r.analyst == analyst => self.refuse_entry(qid, now),
            _ => None,
        }
    }

    /// Registration `reg` reached its deadline without its share: dropped.
    pub fn expire(&mut self, qid: &QueryId, reg: Registration, now: Instant) -> Option<T> {
        match self.queries.get(qid) {
            Some(BankQuery::Waiting(r) | BankQuery::Running(r, _)) if r.reg == reg => self.refuse_entry(qid, now),
            _ => None,
        }
    }

    fn refuse_entry(&mut self, qid: &QueryId, now: Instant) -> Option<T> {
        match self.queries.insert(*qid, BankQuery::Refused(now)) {
            Some(BankQuery::Waiting(r) | BankQuery::Running(r, _)) => Some(r.shell),
            _ => None,
        }
    }

    /// The share of registration `reg` is stored (or its storing failed):
    /// the query id is no longer busy here.
    pub fn stored(&mut self, qid: &QueryId, reg: Registration) {
        if matches!(self.queries.get(qid), Some(BankQuery::Completing(r)) if *r == reg) {
            self.queries.remove(qid);
        }
    }

    /// This node refused `qid`: the platform's batch for it is told at
    /// once (within `refused_aggregate`) rather than after its patience. A
    /// registration that exists (a retry's) is left alone. Refusals older
    /// than `refusal_remembered` are forgotten.
    pub fn refused(&mut self, qid: &QueryId, now: Instant) {
        let remembered = self.timeouts.refusal_remembered;
        self.queries
            .retain(|_, q| !matches!(q, BankQuery::Refused(at) if now.saturating_duration_since(*at) >= remembered));
        match self.queries.get(qid) {
            None | Some(BankQuery::Refused(_)) => {
                self.queries.insert(*qid, BankQuery::Refused(now));
            }
            Some(_) => {}
        }
    }
}

fn wait_or_unknown<'a, T>(until: Instant, now: Instant) -> Claim<'a, T> {
    if now < until {
        Claim::Wait(until)
    } else {
        Claim::Unknown
    }
}

/// A platform query id's state: the analyst whose request created it, one
/// attempt running (or none between attempts), retries queued behind it,
/// and whether the analyst cancelled it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformQuery {
    analyst: String,
    running: bool,
    queued: u32,
    cancelled: bool,
}

/// The platform's query ids (see the module documentation).
#[derive(Debug, Default)]
pub struct PlatformQueries {
    queries: HashMap<QueryId, PlatformQuery>,
}

/// Whether an attempt may start.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// It runs now; `PlatformQueries::finish` when it ends.
    Go,
    /// An earlier attempt of the id runs: ask again when one finishes.
    Queued,
}

impl PlatformQueries {
    /// The state of a query id, for tests and logs.
    pub fn state(&self, qid: &QueryId) -> Option<&PlatformQuery> {
        self.queries.get(qid)
    }

    /// An analyst's request for `qid` arrives: it queues.
    pub fn arrive(&mut self, qid: QueryId, analyst: &str) {
        let q = self.queries.entry(qid).or_insert_with(|| PlatformQuery {
            analyst: analyst.to_string(),
            running: false,
            queued: 0,
            cancelled: false,
        });
        q.queued = q.queued.saturating_add(1);
    }

    /// A queued request asks to start.
    pub fn start(&mut self, qid: &QueryId) -> Start {
        match self.queries.get_mut(qid) {
            Some(q) if !q.running && q.queued > 0 => {
                q.running = true;
                q.queued -= 1;
                Start::Go
            }
            _ => Start::Queued,
        }
    }

    /// A queued request leaves (its analyst has gone).
    pub fn leave(&mut self, qid: &QueryId) {
        if let Some(q) = self.queries.get_mut(qid) {
            q.queued = q.queued.saturating_sub(1);
        }
        self.forget_if_idle(qid);
    }

    /// The running attempt ended.
    pub fn finish(&mut self, qid: &QueryId) {
        if let Some(q) = self.queries.get_mut(qid) {
            q.running = false;
        }
        self.forget_if_idle(qid);
    }

    fn forget_if_idle(&mut self, qid: &QueryId) {
        if self.queries.get(qid).is_some_and(|q| !q.running && q.queued == 0) {
            self.queries.remove(qid);
        }
    }

    /// `analyst` cancels `qid` (the bank refused it): the attempt that
    /// runs or is queued stops before it joins. Whether there was one.
    pub fn cancel(&mut self, qid: &QueryId, analyst: &str) -> bool {
        match self.queries.get_mut(qid) {
            Some(q) if q.analyst == analyst => {
                q.cancelled = true;
                true
            }
            _ => false,
        }
    }

    /// Whether `qid` was cancelled (and the cancel is used up).
    pub fn take_cancelled(&mut self, qid: &QueryId) -> bool {
        self.queries
            .get_mut(qid)
            .is_some_and(|q| std::mem::replace(&mut q.cancelled, false))
    }
}
