//! Both nodes' query lifecycles in one process, in the style of
//! quinn-proto's `Pair`: the bank's and the platform's machines
//! (`cleanroom_protocol::queries` for which query ids run,
//! `cleanroom_protocol::ledger` for what a charged query may do next, and
//! `cleanroom_protocol::attempt` for each platform attempt, the same
//! machine the node's `Platform::attempt` drives),
//! each with an in-memory ledger, joined by a message queue that the
//! schedule can reorder, drop and duplicate, on a virtual clock, with
//! either node crashing (losing everything but its ledger and its joins)
//! at any step.
//!
//! The shell here does what the node's shell does (`crates/node/src/server/`):
//! charge, then ask the machines what next; register, claim, record
//! batches; carry out the platform attempt's actions; store before
//! release. Shares are modelled as numbers with the
//! algebra of the real ones: the bank's share of a batch is the true value
//! over the join plus the OT mask of the batch's session, the platform's is
//! minus the mask; each node adds the noise drawn from its query's seed
//! before it stores. After every step the invariants of the ledger are
//! checked:
//!
//! - no share is released without a durable charge and its stored share;
//! - no query id is charged twice on a node;
//! - noise is never re-drawn: whatever a node stores for a query (a first
//!   run or a rerun) tells a colluding peer, who knows its own un-noised
//!   share of the run, the same value (the same join, the same noise);
//! - every pair of shares the analyst gets with the same run adds up to the
//!   same result;
//!
//! and after the schedule, with faults stopped, every query the analyst
//! asked ends with a pair of shares of one run, unless a rerun was refused
//! under the rules (another join, the cap).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cleanroom_crypto::shares::Share;
use cleanroom_protocol::attempt::{Action, Assembled, JoinChoice, Outcome, PlatformAttempt};
use cleanroom_protocol::ledger::{self, BankAfterCharge, BankHolds, Charged, PeerBatch, RunBinding};
use cleanroom_protocol::queries::{
    BankQueries, Batch, Claim, PlatformQueries, QueryTimeouts, Register, Registration, Start, run_of,
};
use cleanroom_wire::{AbortCode, QueryId, RunId, SessionId};
use proptest::prelude::*;

const TIMEOUTS: QueryTimeouts = QueryTimeouts {
    query: Duration::from_secs(120),
    unclaimed_aggregate: Duration::from_secs(30),
    refused_aggregate: Duration::from_secs(2),
    refusal_remembered: Duration::from_secs(120),
};
const GROUPS: usize = 2;
const MAX_RERUNS: u32 = 2;
const DATA: [u8; 32] = [9; 32];

fn mix(parts: &[&[u8]]) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_le_bytes());
        ctx.update(p);
    }
    let d = ctx.finish();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(b)
}

/// The true value of group `g` over a join (another join has other dummy
/// rows, so another value).
fn truth(join: SessionId, g: usize) -> u64 {
    mix(&[b"truth", &join.0, &(g as u64).to_le_bytes()])
}

/// The OT mask of a batch's session: the bank's share carries `+mask`,
/// the platform's `-mask`.
fn mask(session: SessionId) -> u64 {
    mix(&[b"mask", &session.0])
}

fn noise(seed: u64, g: usize) -> u64 {
    mix(&[b"noise", &seed.to_le_bytes(), &(g as u64).to_le_bytes()])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Side {
    Bank,
    Platform,
}

#[derive(Clone, Debug)]
struct Stored {
    run: RunId,
    binding: RunBinding,
    words: Vec<u64>,
}

#[derive(Clone, Debug)]
struct Entry {
    seed: u64,
    stored: Option<Stored>,
    reruns: u32,
}

/// A node's ledger: what survives a crash (with the joins).
#[derive(Default, Debug)]
struct Ledger {
    entries: HashMap<QueryId, Entry>,
    /// Every charge made (a query charged twice shows here).
    charges: Vec<QueryId>,
}

impl Ledger {
    fn view(&self, qid: &QueryId) -> Option<Charged> {
        self.entries.get(qid).map(|e| Charged {
            stored: e.stored.as_ref().map(|s| s.run),
            binding: e.stored.as_ref().map(|s| s.binding),
            reruns: e.reruns,
        })
    }

    /// The charge: once per query id, with the query's noise seed.
    fn charge(&mut self, qid: QueryId, seeds: &mut u64) -> Charged {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.entries.entry(qid) {
            *seeds += 1;
            slot.insert(Entry {
                seed: *seeds,
                stored: None,
                reruns: 0,
            });
            self.charges.push(qid);
        }
        self.view(&qid).expect("just charged")
    }

    /// As `State::store_share`: a first store, or a rerun's replacing one
    /// under `ledger::check_rerun`.
    fn store(&mut self, qid: QueryId, stored: Stored, replace: bool) -> Result<(), String> {
        let view = self.view(&qid).ok_or("store for a query not charged")?;
        let e = self.entries.get_mut(&qid).ok_or("store for a query not charged")?;
        if replace {
            ledger::check_rerun(&view.rerun_record(), &stored.binding, MAX_RERUNS).map_err(|e| e.to_string())?;
            e.reruns += 1;
        } else if e.stored.is_some() {
            return Err("share stored twice".into());
        }
        e.stored = Some(stored);
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Msg {
    Setup {
        qid: QueryId,
        join: SessionId,
        group: usize,
        attempt: u64,
    },
    Check {
        qid: QueryId,
        run: RunId,
        attempt: u64,
    },
    BatchOk {
        group: usize,
        session: SessionId,
        attempt: u64,
    },
    Aborted {
        code: AbortCode,
        attempt: u64,
    },
    Held {
        answer: BankHolds,
        attempt: u64,
    },
}

impl Msg {
    /// The platform attempt the message belongs to.
    fn attempt(&self) -> u64 {
        match self {
            Msg::Setup { attempt, .. }
            | Msg::Check { attempt, .. }
            | Msg::BatchOk { attempt, .. }
            | Msg::Aborted { attempt, .. }
            | Msg::Held { attempt, .. } => *attempt,
        }
    }

    fn to_bank(&self) -> bool {
        matches!(self, Msg::Setup { .. } | Msg::Check { .. })
    }
}

/// The bank shell's part of a registration.
#[derive(Debug)]
struct BankShell {
    /// The analyst's request waiting on it (`None`: a rerun for the platform).
    request: Option<u64>,
    seed: u64,
    rerun: bool,
}

/// An aggregate batch of the platform waiting at the bank for its query.
#[derive(Debug)]
struct Parked {
    qid: QueryId,
    join: SessionId,
    group: usize,
    attempt: u64,
    asked: Instant,
}

#[derive(Default)]
struct BankNode {
    ledger: Ledger,
    joins: HashSet<SessionId>,
    queries: Option<BankQueries<BankShell>>,
    parked: Vec<Parked>,
    /// Registrations and their deadlines.
    deadlines: Vec<(QueryId, Registration, Instant)>,
    /// Assembled shares waiting to be noised and stored.
    completing: Vec<(QueryId, Registration, BankShell, Vec<u64>, RunId, SessionId)>,
}

impl BankNode {
    fn queries(&mut self) -> &mut BankQueries<BankShell> {
        self.queries.get_or_insert_with(|| BankQueries::new(TIMEOUTS))
    }
}

/// A platform attempt: queued (no machine yet) or running
/// `cleanroom_protocol::attempt`'s machine, with the action it asked for
/// that is a step of its own (a join, a store: a crash may come before it).
#[derive(Debug)]
struct Attempt {
    id: u64,
    qid: QueryId,
    machine: Option<PlatformAttempt<SessionId>>,
    pending: Option<Action<SessionId>>,
    /// Whether it asked for its first join (where a cancel stops it).
    joining: bool,
}

impl Attempt {
    fn queued(&self) -> bool {
        self.machine.is_none()
    }

    /// Waiting for a message from the bank.
    fn waiting(&self) -> bool {
        self.pending.is_none() && self.machine.as_ref().is_some_and(PlatformAttempt::waits_for_bank)
    }
}

#[derive(Default)]
struct PlatformNode {
    ledger: Ledger,
    /// The cached join (the state file keeps it across a restart).
    cached: Option<SessionId>,
    queries: PlatformQueries,
    attempts: Vec<Attempt>,
}

#[derive(Clone, Debug)]
struct Release {
    side: Side,
    qid: QueryId,
    run: RunId,
    words: Vec<u64>,
}

/// What the schedule does next.
#[derive(Clone, Debug)]
enum Step {
    /// The analyst asks a node for query `n` (a first request or a retry).
    Request(Side, u8),
    /// A platform attempt takes its next step that needs no message.
    Attempt(usize),
    /// The bank noises and stores an assembled share.
    BankStore(usize),
    /// A message in the queue (any of them: reordered) arrives.
    Deliver(usize),
    /// A message is lost.
    Drop(usize),
    /// A message arrives twice.
    Duplicate(usize),
    /// The analyst cancels query `n` at the platform (the bank refused it).
    Cancel(u8),
    /// A platform attempt waiting for the bank times out.
    Timeout(usize),
    /// The clock moves on this many seconds (deadlines, patience).
    Advance(u64),
    /// A node stops and restarts: its ledger and joins stay.
    Crash(Side),
    /// The bank's joins expire.
    BankForgetsJoins,
    /// The platform's cached join expires.
    PlatformForgetsJoin,
}

struct Pair {
    now: Instant,
    bank: BankNode,
    platform: PlatformNode,
    queue: Vec<Msg>,
    counter: u64,
    seeds: u64,
    releases: Vec<Release>,
    /// The sessions of each run (the model's knowledge, for the invariants).
    runs: HashMap<RunId, Vec<SessionId>>,
    /// The bank's un-noised share of each batch session.
    bank_unnoised: HashMap<SessionId, u64>,
    /// The session of each batch the bank recorded, by registration and group.
    bank_sessions: HashMap<(QueryId, Registration, usize), SessionId>,
    /// What each node's stores of a query tell a colluding peer.
    learnable: HashMap<(Side, QueryId), HashSet<Vec<u64>>>,
    /// Query ids whose rerun was refused under the rules.
    rerun_refused: HashSet<QueryId>,
    asked: HashSet<QueryId>,
    /// Platform attempts some message of which was duplicated.
    duplicated: HashSet<u64>,
}

fn qid(n: u8) -> QueryId {
    QueryId([n; 16])
}

impl Pair {
    fn new() -> Self {
        Pair {
            now: Instant::now(),
            bank: BankNode::default(),
            platform: PlatformNode::default(),
            queue: Vec::new(),
            counter: 0,
            seeds: 0,
            releases: Vec::new(),
            runs: HashMap::new(),
            bank_unnoised: HashMap::new(),
            bank_sessions: HashMap::new(),
            learnable: HashMap::new(),
            rerun_refused: HashSet::new(),
            asked: HashSet::new(),
            duplicated: HashSet::new(),
        }
    }

    fn fresh_session(&mut self) -> SessionId {
        self.counter += 1;
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&self.counter.to_le_bytes());
        SessionId(s)
    }

    fn step(&mut self, s: &Step) {
        match *s {
            Step::Request(Side::Bank, n) => self.bank_request(qid(n)),
            Step::Request(Side::Platform, n) => self.platform_request(qid(n)),
            Step::Attempt(i) => {
                if !self.platform.attempts.is_empty() {
                    let i = i % self.platform.attempts.len();
                    self.platform_step(i);
                }
            }
            Step::BankStore(i) => {
                if !self.bank.completing.is_empty() {
                    let i = i % self.bank.completing.len();
                    self.bank_store(i);
                }
            }
            Step::Deliver(i) => {
                if !self.queue.is_empty() {
                    let m = self.queue.remove(i % self.queue.len());
                    self.deliver(m);
                }
            }
            Step::Drop(i) => {
                if !self.queue.is_empty() {
                    let n = self.queue.len();
                    self.queue.remove(i % n);
                }
            }
            Step::Duplicate(i) => {
                if let Some(m) = self.queue.get(i % self.queue.len().max(1)).cloned() {
                    self.duplicated.insert(m.attempt());
                    self.queue.push(m);
                }
            }
            Step::Cancel(n) => {
                self.platform.queries.cancel(&qid(n), "alice");
            }
            Step::Timeout(i) => {
                // A read timeout of an attempt waiting for the bank.
                let waiting: Vec<usize> = (0..self.platform.attempts.len())
                    .filter(|&k| self.platform.attempts[k].waiting())
                    .collect();
                if !waiting.is_empty() {
                    let k = waiting[i % waiting.len()];
                    self.platform_end(k);
                }
            }
            Step::Advance(secs) => {
                self.now += Duration::from_secs(secs);
                self.bank_timers();
            }
            Step::Crash(Side::Bank) => {
                self.bank.queries = None;
                self.bank.parked.clear();
                self.bank.deadlines.clear();
                self.bank.completing.clear();
                // Its connections end: streams in flight either way are gone.
                self.queue.clear();
            }
            Step::Crash(Side::Platform) => {
                self.platform.queries = PlatformQueries::default();
                self.platform.attempts.clear();
                self.queue.clear();
            }
            Step::BankForgetsJoins => self.bank.joins.clear(),
            Step::PlatformForgetsJoin => self.platform.cached = None,
        }
        self.bank_claims();
        self.check();
    }

    // ---------------------------------------------------------------- bank

    fn bank_request(&mut self, q: QueryId) {
        self.asked.insert(q);
        self.bank.queries().request_arrived(&q);
        let charged = self.bank.ledger.charge(q, &mut self.seeds);
        match ledger::bank_after_charge(&charged) {
            BankAfterCharge::Replay => self.release(Side::Bank, q),
            BankAfterCharge::Compute => {
                let seed = self.bank.ledger.entries[&q].seed;
                let shell = BankShell {
                    request: Some(0),
                    seed,
                    rerun: false,
                };
                let now = self.now;
                match self.bank.queries().register(q, "alice", GROUPS, None, shell, now) {
                    Register::New(reg, deadline) => self.bank.deadlines.push((q, reg, deadline)),
                    Register::Busy => {}
                    Register::Kept => panic!("an analyst's registration was kept"),
                }
            }
        }
    }

    fn bank_receive(&mut self, m: Msg) {
        match m {
            Msg::Setup {
                qid: q,
                join,
                group,
                attempt,
            } => {
                if !self.bank.queries().is_registered(&q) {
                    let view = self.bank.ledger.view(&q);
                    match ledger::bank_peer_batch(view.as_ref(), join, DATA, MAX_RERUNS) {
                        Err(_) => {
                            self.rerun_refused.insert(q);
                            self.queue.push(Msg::Aborted {
                                code: AbortCode::Refused,
                                attempt,
                            });
                            return;
                        }
                        Ok(PeerBatch::Rerun(binding)) => {
                            let seed = self.bank.ledger.entries[&q].seed;
                            let shell = BankShell {
                                request: None,
                                seed,
                                rerun: true,
                            };
                            let now = self.now;
                            match self
                                .bank
                                .queries()
                                .register(q, "alice", GROUPS, Some(binding.join), shell, now)
                            {
                                Register::New(reg, deadline) => self.bank.deadlines.push((q, reg, deadline)),
                                Register::Kept => {}
                                Register::Busy => {
                                    self.queue.push(Msg::Aborted {
                                        code: AbortCode::Refused,
                                        attempt,
                                    });
                                    return;
                                }
                            }
                        }
                        Ok(PeerBatch::Unregistered) => {}
                    }
                }
                self.bank.parked.push(Parked {
                    qid: q,
                    join,
                    group,
                    attempt,
                    asked: self.now,
                });
            }
            Msg::Check { qid: q, run, attempt } => {
                let busy = self.bank.queries().busy(&q);
                let held = self.bank.ledger.view(&q).and_then(|c| c.stored) == Some(run);
                let answer = match (held, busy) {
                    (true, _) => BankHolds::Held,
                    (false, true) => BankHolds::Busy,
                    (false, false) => BankHolds::NotHeld,
                };
                self.queue.push(Msg::Held { answer, attempt });
            }
            _ => unreachable!("a platform message at the bank"),
        }
    }

    /// Parked batches ask the registry again (the node does so when it
    /// changes and at the instant the registry named).
    fn bank_claims(&mut self) {
        let parked = std::mem::take(&mut self.bank.parked);
        for p in parked {
            let now = self.now;
            let joins_known = self.bank.joins.contains(&p.join);
            let claim = match self.bank.queries().claim(&p.qid, p.join, p.asked, now) {
                Claim::Found(reg, _) => Some(reg),
                Claim::OtherJoin => {
                    self.queue.push(Msg::Aborted {
                        code: AbortCode::Refused,
                        attempt: p.attempt,
                    });
                    None
                }
                Claim::Unknown => {
                    self.queue.push(Msg::Aborted {
                        code: AbortCode::UnknownQuery,
                        attempt: p.attempt,
                    });
                    None
                }
                Claim::Wait(_) => {
                    self.bank.parked.push(p);
                    continue;
                }
            };
            let Some(reg) = claim else { continue };
            let batch = if joins_known {
                let session = self.fresh_session();
                let unnoised = truth(p.join, p.group).wrapping_add(mask(session));
                self.bank_unnoised.insert(session, unnoised);
                self.queue.push(Msg::BatchOk {
                    group: p.group,
                    session,
                    attempt: p.attempt,
                });
                Batch::Share(Share::from_words(vec![unnoised]), session)
            } else {
                self.queue.push(Msg::Aborted {
                    code: AbortCode::UnknownJoin,
                    attempt: p.attempt,
                });
                Batch::UnknownJoin
            };
            if let Batch::Share(_, session) = &batch {
                self.bank_sessions.insert((p.qid, reg, p.group), *session);
            }
            let done = self.bank.queries().batch_done(&p.qid, reg, p.join, p.group, batch, now);
            if let Some((shell, Ok(a))) = done {
                let sessions: Vec<SessionId> = (0..GROUPS)
                    .map(|g| self.bank_sessions.get(&(p.qid, reg, g)).copied().unwrap_or_default())
                    .collect();
                assert_eq!(
                    a.run,
                    run_of(&sessions),
                    "the bank assembled another run than its batches'"
                );
                self.runs.insert(a.run, sessions);
                self.bank
                    .completing
                    .push((p.qid, reg, shell, a.share.words().to_vec(), a.run, a.join));
            }
        }
    }

    fn bank_timers(&mut self) {
        let now = self.now;
        let due: Vec<(QueryId, Registration, Instant)> =
            self.bank.deadlines.iter().copied().filter(|d| d.2 <= now).collect();
        self.bank.deadlines.retain(|d| d.2 > now);
        for (q, reg, _) in due {
            let _ = self.bank.queries().expire(&q, reg, now);
        }
    }

    fn bank_store(&mut self, i: usize) {
        let (q, reg, shell, words, run, join) = self.bank.completing.remove(i);
        let words: Vec<u64> = words
            .iter()
            .enumerate()
            .map(|(g, w)| w.wrapping_add(noise(shell.seed, g)))
            .collect();
        let stored = Stored {
            run,
            binding: RunBinding {
                join,
                data_version: DATA,
            },
            words: words.clone(),
        };
        assert_eq!(
            shell.seed, self.bank.ledger.entries[&q].seed,
            "the bank's noise is not from the charge's seed"
        );
        let ok = self.bank.ledger.store(q, stored, shell.rerun);
        self.bank.queries().stored(&q, reg);
        match ok {
            Ok(()) => {
                self.note_store(Side::Bank, q, run, &words);
                if shell.request.is_some() {
                    self.release(Side::Bank, q);
                }
            }
            Err(e) => {
                if shell.rerun {
                    self.rerun_refused.insert(q);
                } else {
                    panic!("the bank's first store failed: {e}");
                }
            }
        }
    }

    // ------------------------------------------------------------ platform

    fn platform_request(&mut self, q: QueryId) {
        self.asked.insert(q);
        self.platform.queries.arrive(q, "alice");
        self.counter += 1;
        self.platform.attempts.push(Attempt {
            id: self.counter,
            qid: q,
            machine: None,
            pending: None,
            joining: false,
        });
    }

    fn platform_end(&mut self, k: usize) {
        let a = self.platform.attempts.remove(k);
        if a.queued() {
            self.platform.queries.leave(&a.qid);
        } else {
            self.platform.queries.finish(&a.qid);
        }
    }

    /// A step of attempt `k` that needs no message: a queued attempt starts
    /// and charges; a join or a store it asked for is carried out.
    fn platform_step(&mut self, k: usize) {
        let a = &mut self.platform.attempts[k];
        let q = a.qid;
        if a.queued() {
            if self.platform.queries.start(&q) == Start::Queued {
                return;
            }
            let charged = self.platform.ledger.charge(q, &mut self.seeds);
            let mut m = PlatformAttempt::new(DATA, MAX_RERUNS);
            let next = m.charged(&charged);
            self.platform.attempts[k].machine = Some(m);
            return self.platform_act(k, next);
        }
        match a.pending.take() {
            Some(Action::Join(choice)) => {
                let cached = self.platform.cached;
                let first = !std::mem::replace(&mut a.joining, true);
                // As the node: a cancel stops the attempt before its first join.
                if first && self.platform.queries.take_cancelled(&q) {
                    let next = self.machine(k).cancelled();
                    return self.platform_act(k, next);
                }
                let Some(m) = self.platform.attempts[k].machine.as_mut() else {
                    return;
                };
                let next = match choice {
                    JoinChoice::Only(first) if cached == Some(first) => m.joined(first, GROUPS as u32),
                    // The join of the first release is gone.
                    JoinChoice::Only(_) => m.no_join(),
                    JoinChoice::CachedOrNew => match cached {
                        Some(c) => m.joined(c, GROUPS as u32),
                        None => {
                            let j = self.new_join();
                            self.machine(k).joined(j, GROUPS as u32)
                        }
                    },
                    JoinChoice::New { .. } => {
                        let j = self.new_join();
                        self.machine(k).joined(j, GROUPS as u32)
                    }
                };
                self.platform_act(k, next);
            }
            Some(Action::Store(assembled)) => self.platform_store(k, assembled),
            Some(other) => self.platform_act(k, other),
            None => {}
        }
    }

    fn machine(&mut self, k: usize) -> &mut PlatformAttempt<SessionId> {
        self.platform.attempts[k]
            .machine
            .as_mut()
            .expect("a running attempt has its machine")
    }

    /// Carries out what attempt `k`'s machine asked for: messages go out at
    /// once; a join and a store wait for a step of their own.
    fn platform_act(&mut self, k: usize, action: Action<SessionId>) {
        let q = self.platform.attempts[k].qid;
        let id = self.platform.attempts[k].id;
        match action {
            Action::AskBank(run) => self.queue.push(Msg::Check {
                qid: q,
                run,
                attempt: id,
            }),
            Action::SendBatch { join, group } => self.queue.push(Msg::Setup {
                qid: q,
                join,
                group: group as usize,
                attempt: id,
            }),
            pending @ (Action::Join(_) | Action::Store(_)) => self.platform.attempts[k].pending = Some(pending),
            Action::Replay => {
                self.release(Side::Platform, q);
                self.platform_end(k);
            }
            Action::End(outcome) => {
                match outcome {
                    Outcome::RerunRefused(_) => {
                        self.rerun_refused.insert(q);
                    }
                    // Only a message that arrived twice is out of turn.
                    Outcome::Unexpected(what) => assert!(
                        self.duplicated.contains(&id),
                        "attempt {id} ended out of turn ({what}) without a duplicated message"
                    ),
                    _ => {}
                }
                self.platform_end(k);
            }
        }
    }

    fn platform_store(&mut self, k: usize, a: Assembled<SessionId>) {
        let q = self.platform.attempts[k].qid;
        let seed = self.platform.ledger.entries[&q].seed;
        let sessions = a.batches;
        let words: Vec<u64> = sessions
            .iter()
            .enumerate()
            .map(|(g, s)| 0u64.wrapping_sub(mask(*s)).wrapping_add(noise(seed, g)))
            .collect();
        assert_eq!(
            a.run,
            run_of(&sessions),
            "the attempt assembled another run than its batches'"
        );
        self.runs.insert(a.run, sessions);
        let stored = Stored {
            run: a.run,
            binding: RunBinding {
                join: a.join,
                data_version: DATA,
            },
            words: words.clone(),
        };
        match self.platform.ledger.store(q, stored, a.rerun) {
            Ok(()) => {
                self.note_store(Side::Platform, q, a.run, &words);
                self.release(Side::Platform, q);
            }
            Err(e) => {
                assert!(a.rerun, "the platform's first store failed: {e}");
                self.rerun_refused.insert(q);
            }
        }
        self.platform_end(k);
    }

    fn new_join(&mut self) -> SessionId {
        let j = self.fresh_session();
        self.bank.joins.insert(j);
        self.platform.cached = Some(j);
        j
    }

    fn platform_receive(&mut self, m: Msg) {
        let attempt = match &m {
            Msg::BatchOk { attempt, .. } | Msg::Aborted { attempt, .. } | Msg::Held { attempt, .. } => *attempt,
            _ => unreachable!("a bank message at the platform"),
        };
        // A stream of an attempt that ended (or of a node before its
        // restart) is gone.
        let Some(k) = self.platform.attempts.iter().position(|a| a.id == attempt) else {
            return;
        };
        let q = self.platform.attempts[k].qid;
        let view = self.platform.ledger.view(&q);
        let a = &mut self.platform.attempts[k];
        // A stream carries one answer at a time: an answer to an attempt
        // that is not waiting for one is rejected by its decoder.
        let (true, Some(machine)) = (a.pending.is_none(), a.machine.as_mut()) else {
            return self.platform_end(k);
        };
        let next = match m {
            Msg::BatchOk { group, session, .. } => machine.batch_done(group as u32, session, session),
            Msg::Aborted { code, .. } => machine.aborted(code),
            Msg::Held { answer, .. } => match view {
                Some(view) => machine.bank_answered(answer, &view),
                None => panic!("the platform asked the bank about a query it never charged"),
            },
            _ => unreachable!("a bank message at the platform"),
        };
        self.platform_act(k, next);
    }

    fn deliver(&mut self, m: Msg) {
        if m.to_bank() {
            self.bank_receive(m);
        } else {
            self.platform_receive(m);
        }
    }

    // ---------------------------------------------------------- invariants

    /// The analyst gets the node's stored share: it must be there, charged.
    fn release(&mut self, side: Side, q: QueryId) {
        let ledger = match side {
            Side::Bank => &self.bank.ledger,
            Side::Platform => &self.platform.ledger,
        };
        let e = ledger.entries.get(&q).expect("a share released without a charge");
        let s = e.stored.as_ref().expect("a share released before it was stored");
        self.releases.push(Release {
            side,
            qid: q,
            run: s.run,
            words: s.words.clone(),
        });
    }

    /// What a store tells the other node colluding with the analyst: it
    /// knows its own un-noised share of each batch of the run.
    fn note_store(&mut self, side: Side, q: QueryId, run: RunId, words: &[u64]) {
        let sessions = self.runs.get(&run).cloned().unwrap_or_default();
        assert_eq!(sessions.len(), words.len(), "a stored run of unknown sessions");
        let learned: Vec<u64> = words
            .iter()
            .zip(&sessions)
            .map(|(w, s)| match side {
                // The platform knows -mask: the bank's word minus the mask.
                Side::Bank => w.wrapping_sub(mask(*s)),
                // The bank knows truth + mask.
                Side::Platform => w.wrapping_add(self.bank_unnoised.get(s).copied().unwrap_or_default()),
            })
            .collect();
        self.learnable.entry((side, q)).or_default().insert(learned);
    }

    fn check(&self) {
        for (side, l) in [(Side::Bank, &self.bank.ledger), (Side::Platform, &self.platform.ledger)] {
            let distinct: HashSet<_> = l.charges.iter().collect();
            assert_eq!(distinct.len(), l.charges.len(), "{side:?} charged a query twice");
        }
        for ((side, q), seen) in &self.learnable {
            assert!(
                seen.len() <= 1,
                "{side:?} released {} different noisy results of {q:?} to a colluding peer",
                seen.len()
            );
        }
        let mut sums: HashMap<QueryId, HashSet<Vec<u64>>> = HashMap::new();
        for b in self.releases.iter().filter(|r| r.side == Side::Bank) {
            for p in self
                .releases
                .iter()
                .filter(|r| r.side == Side::Platform && r.qid == b.qid && r.run == b.run)
            {
                let sum: Vec<u64> = b.words.iter().zip(&p.words).map(|(x, y)| x.wrapping_add(*y)).collect();
                sums.entry(b.qid).or_default().insert(sum);
            }
        }
        for (q, s) in sums {
            assert_eq!(s.len(), 1, "the analyst added up different results of {q:?}");
        }
    }

    // ------------------------------------------------------------ the heal

    /// Runs without faults until nothing moves: every message delivered in
    /// order, every attempt and store stepped, the clock moved on to the
    /// next wait.
    fn settle(&mut self) {
        for _ in 0..2000 {
            if !self.queue.is_empty() {
                let m = self.queue.remove(0);
                self.deliver(m);
            } else if !self.bank.completing.is_empty() {
                self.bank_store(0);
            } else if let Some(k) = self.platform.attempts.iter().position(|a| a.pending.is_some()) {
                self.platform_step(k);
            } else if let Some(k) =
                (0..self.platform.attempts.len()).find(|&k| self.platform.attempts[k].queued() && self.starts(k))
            {
                self.platform_step(k);
            } else if !self.bank.parked.is_empty() || !self.bank.deadlines.is_empty() {
                self.now += Duration::from_secs(10);
                self.bank_timers();
            } else if let Some(k) = self.platform.attempts.iter().position(Attempt::waiting) {
                // Its answer was lost: the read times out.
                self.platform_end(k);
            } else {
                assert!(self.platform.attempts.is_empty(), "attempts queued behind nothing");
                return;
            }
            self.bank_claims();
            self.check();
        }
        panic!("the pair did not settle");
    }

    /// Whether queued attempt `k` would start (no attempt of its id runs).
    fn starts(&self, k: usize) -> bool {
        let q = self.platform.attempts[k].qid;
        !self.platform.attempts.iter().any(|a| a.qid == q && !a.queued())
    }

    /// The analyst asks each query again (same id) on both nodes until it
    /// holds a pair of shares of one run.
    fn heal(&mut self) {
        self.settle();
        let mut asked: Vec<QueryId> = self.asked.iter().copied().collect();
        asked.sort_by_key(|q| q.0);
        for q in asked {
            let mut paired = false;
            for _ in 0..4 {
                let from = self.releases.len();
                self.bank_request(q);
                self.platform_request(q);
                self.settle();
                let fresh = &self.releases[from..];
                let bank = fresh.iter().find(|r| r.side == Side::Bank && r.qid == q);
                let platform = fresh.iter().find(|r| r.side == Side::Platform && r.qid == q);
                if let (Some(b), Some(p)) = (bank, platform)
                    && b.run == p.run
                {
                    paired = true;
                    break;
                }
                self.now += Duration::from_secs(200);
                self.bank_timers();
                self.settle();
            }
            assert!(
                paired || self.rerun_refused.contains(&q),
                "{q:?} never ended with a pair of shares of one run, and no rerun was refused"
            );
        }
    }
}

fn steps() -> impl Strategy<Value = Step> {
    let side = prop_oneof![Just(Side::Bank), Just(Side::Platform)];
    prop_oneof![
        6 => (side, 0u8..2).prop_map(|(s, n)| Step::Request(s, n)),
        8 => (0usize..8).prop_map(Step::Attempt),
        3 => (0usize..4).prop_map(Step::BankStore),
        12 => (0usize..8).prop_map(Step::Deliver),
        1 => (0usize..8).prop_map(Step::Drop),
        1 => (0usize..8).prop_map(Step::Duplicate),
        1 => (0u8..2).prop_map(Step::Cancel),
        1 => (0usize..8).prop_map(Step::Timeout),
        2 => prop_oneof![Just(1u64), Just(5), Just(40), Just(200)].prop_map(Step::Advance),
        1 => prop_oneof![Just(Side::Bank), Just(Side::Platform)].prop_map(Step::Crash),
        1 => Just(Step::BankForgetsJoins),
        1 => Just(Step::PlatformForgetsJoin),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn the_ledger_invariants_hold_under_any_schedule(schedule in proptest::collection::vec(steps(), 1..120)) {
        let mut pair = Pair::new();
        for s in &schedule {
            pair.step(s);
        }
        pair.heal();
    }
}

/// Runs a schedule by hand and heals.
fn run(schedule: &[Step]) -> Pair {
    let mut pair = Pair::new();
    for s in schedule {
        pair.step(s);
    }
    pair
}

fn deliver_all(pair: &mut Pair) {
    while !pair.queue.is_empty() {
        pair.step(&Step::Deliver(0));
    }
}

/// The plain path: both nodes answer with shares of one run.
#[test]
fn a_query_ends_with_a_pair_of_one_run() {
    let mut pair = run(&[
        Step::Request(Side::Bank, 0),
        Step::Request(Side::Platform, 0),
        Step::Attempt(0),
        Step::Attempt(0),
    ]);
    deliver_all(&mut pair);
    pair.step(&Step::BankStore(0));
    pair.step(&Step::Attempt(0));
    let runs: Vec<(Side, RunId)> = pair.releases.iter().map(|r| (r.side, r.run)).collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[0].1, runs[1].1);
    assert_eq!(pair.bank.ledger.charges.len(), 1);
    assert_eq!(pair.platform.ledger.charges.len(), 1);
}

/// The bank stops after its charge and before it stores: the platform
/// stored and released its share; the retry reruns the aggregate over the
/// same join with the same noise, and the analyst gets a pair.
#[test]
fn a_crash_of_the_bank_between_charge_and_store_reruns_with_the_same_noise() {
    let mut pair = run(&[
        Step::Request(Side::Bank, 0),
        Step::Request(Side::Platform, 0),
        Step::Attempt(0),
        Step::Attempt(0),
    ]);
    deliver_all(&mut pair);
    // Every batch is in at the bank; the platform stores and releases.
    pair.step(&Step::Attempt(0));
    pair.step(&Step::Crash(Side::Bank));
    assert!(pair.bank.ledger.entries[&qid(0)].stored.is_none());
    assert_eq!(pair.releases.len(), 1);
    // The retry: the bank computes again (charged, not stored); the
    // platform finds the bank without its run and reruns over the join.
    pair.step(&Step::Request(Side::Bank, 0));
    pair.step(&Step::Request(Side::Platform, 0));
    pair.settle();
    let last: Vec<&Release> = pair.releases.iter().rev().take(2).collect();
    assert_eq!(last.len(), 2);
    assert_eq!(last[0].run, last[1].run, "the retry ended with one run on both nodes");
    assert_eq!(pair.platform.ledger.entries[&qid(0)].reruns, 1);
    assert_eq!(pair.bank.ledger.charges.len(), 1, "the retry was not charged again");
}

/// The platform's share of the released run is lost with its join: the
/// bank refuses a batch over a new join for the query it stored, so the
/// analyst never learns a second noisy result from another join.
#[test]
fn a_batch_over_another_join_for_a_stored_query_is_refused() {
    let mut pair = run(&[
        Step::Request(Side::Bank, 0),
        Step::Request(Side::Platform, 0),
        Step::Attempt(0),
        Step::Attempt(0),
    ]);
    deliver_all(&mut pair);
    pair.step(&Step::BankStore(0));
    // The platform stops before it stores, and its join expires.
    pair.step(&Step::Crash(Side::Platform));
    pair.step(&Step::PlatformForgetsJoin);
    pair.step(&Step::Request(Side::Platform, 0));
    pair.settle();
    assert!(pair.rerun_refused.contains(&qid(0)));
    assert!(!pair.releases.iter().any(|r| r.side == Side::Platform));
    assert_eq!(pair.learnable[&(Side::Bank, qid(0))].len(), 1);
}

/// The analyst cancels at the platform (the bank refused the query): the
/// attempt stops before its join and nothing reaches the bank; a later
/// retry under the same id runs without a second charge.
#[test]
fn a_cancel_stops_the_platform_attempt_before_its_join() {
    let mut pair = run(&[
        Step::Request(Side::Platform, 0),
        // The platform charges; its attempt asks for a join.
        Step::Attempt(0),
        Step::Cancel(0),
        Step::Attempt(0),
    ]);
    assert!(pair.platform.attempts.is_empty(), "the cancelled attempt ended");
    assert!(pair.queue.is_empty(), "a cancelled attempt sent nothing to the bank");
    assert!(pair.releases.is_empty());
    pair.heal();
    assert_eq!(pair.platform.ledger.charges.len(), 1, "the retry was not charged again");
    let platform: Vec<&Release> = pair.releases.iter().filter(|r| r.side == Side::Platform).collect();
    assert_eq!(platform.len(), 1);
}
