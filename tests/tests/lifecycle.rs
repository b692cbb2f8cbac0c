//! The query lifecycle between the nodes (`cleanroom_protocol::queries`)
//! without sockets or clocks: the bank's registry and the platform's
//! attempts, driven by hand on a virtual clock. Each race or crash case
//! fixed in the node over real QUIC has a deterministic test here, and a
//! randomized schedule (proptest) checks the registry's invariants after
//! every step against a model kept by the test.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use cleanroom_crypto::shares::Share;
use cleanroom_protocol::queries::{
    Assembled, BankQueries, BankQuery, Batch, Claim, PlatformQueries, QueryTimeouts, Register, Registration, Start,
    run_of,
};
use cleanroom_wire::{QueryId, SessionId};
use proptest::prelude::*;

const TIMEOUTS: QueryTimeouts = QueryTimeouts {
    query: Duration::from_secs(120),
    unclaimed_aggregate: Duration::from_secs(30),
    refused_aggregate: Duration::from_secs(2),
    refusal_remembered: Duration::from_secs(120),
};

fn q(n: u8) -> QueryId {
    QueryId([n; 16])
}

fn join(n: u8) -> SessionId {
    SessionId([0xa0 ^ n; 16])
}

fn session(n: u8) -> SessionId {
    SessionId([0x50 ^ n; 16])
}

/// The virtual clock: `at(s)` is `s` seconds after the start.
struct Clock(Instant);

impl Clock {
    fn at(&self, secs: u64) -> Instant {
        self.0 + Duration::from_secs(secs)
    }
}

/// Registers and returns the registration (a test's shell is a tag).
fn register(bank: &mut BankQueries<u32>, qid: QueryId, tag: u32, groups: usize, now: Instant) -> Registration {
    match bank.register(qid, "alice", groups, None, tag, now) {
        Register::New(reg, deadline) => {
            assert_eq!(deadline, now + TIMEOUTS.query);
            reg
        }
        other => panic!("registration not made: {other:?}"),
    }
}

fn found(c: Claim<'_, u32>) -> (Registration, u32) {
    match c {
        Claim::Found(reg, tag) => (reg, *tag),
        other => panic!("expected the query, got {other:?}"),
    }
}

fn share(words: &[u64]) -> Batch {
    Batch::Share(
        Share::from_words(words.to_vec()),
        session(words.first().copied().unwrap_or(0) as u8),
    )
}

fn delivered(d: Option<(u32, Result<Assembled, String>)>) -> (u32, Assembled) {
    match d {
        Some((tag, Ok(a))) => (tag, a),
        Some((_, Err(e))) => panic!("delivered an error: {e}"),
        None => panic!("nothing delivered"),
    }
}

#[test]
fn a_batch_before_the_request_waits_for_it_then_finds_it() {
    let clock = Clock(Instant::now());
    let mut bank = BankQueries::new(TIMEOUTS);
    // The platform's batch arrives first: it waits for the unclaimed patience.
    assert_eq!(
        bank.claim(&q(1), join(1), clock.at(0), clock.at(0)),
        Claim::Wait(clock.at(30))
    );
    let reg = register(&mut bank, q(1), 7, 1, clock.at(5));
    assert_eq!(found(bank.claim(&q(1), join(1), clock.at(0), clock.at(5))), (reg, 7));
    // Nobody came: at the patience's end the batch is told the query is unknown.
    assert_eq!(bank.claim(&q(2), join(1), clock.at(0), clock.at(30)), Claim::Unknown);
}

#[test]
fn a_batch_for_a_query_refused_lately_is_told_within_the_short_patience() {
    let clock = Clock(Instant::now());
    let mut bank: BankQueries<u32> = BankQueries::new(TIMEOUTS);
    bank.refused(&q(1), clock.at(0));
    assert_eq!(
        bank.claim(&q(1), join(1), clock.at(1), clock.at(1)),
        Claim::Wait(clock.at(3))
    );
    assert_eq!(bank.claim(&q(1), join(1), clock.at(1), clock.at(3)), Claim::Unknown);
    // A new request for it: the batch waits its whole patience again.
    bank.request_arrived(&q(1));
    assert_eq!(
        bank.claim(&q(1), join(1), clock.at(4), clock.at(4)),
        Claim::Wait(clock.at(34))
    );
    // A refusal is remembered for `refusal_remembered` only.
    bank.refused(&q(2), clock.at(0));
    assert_eq!(
        bank.claim(&q(2), join(1), clock.at(121), clock.at(121)),
        Claim::Wait(clock.at(151))
    );
    bank.refused(&q(3), clock.at(200));
    assert!(
        bank.state(&q(2)).is_none(),
        "an old refusal is forgotten at the next one"
    );
}

#[test]
fn a_refusal_does_not_overwrite_a_retrys_registration() {
    // The bank refused attempt 1 (a timeout) while the analyst's retry had
    // already registered the id again: the retry's registration stands.
    let clock = Clock(Instant::now());
    let mut bank = BankQueries::new(TIMEOUTS);
    let first = register(&mut bank, q(1), 1, 1, clock.at(0));
    let second = register(&mut bank, q(1), 2, 1, clock.at(1));
    assert_ne!(first, second);
    assert!(
        bank.expire(&q(1), first, clock.at(120)).is_none(),
        "the old registration is gone"
    );
    bank.refused(&q(1), clock.at(120));
    assert_eq!(
        found(bank.claim(&q(1), join(1), clock.at(120), clock.at(120))),
        (second, 2)
    );
}

#[test]
fn an_analyst_gone_before_the_first_batch_drops_the_query_and_not_after() {
    // The greedy analyst: it opens queries and leaves. Unclaimed, the query
    // is dropped at once and remembered as refused; claimed, its batches
    // finish so that the share is stored for a retry.
    let clock = Clock(Instant::now());
    let mut bank = BankQueries::new(TIMEOUTS);
    let reg = register(&mut bank, q(1), 1, 1, clock.at(0));
    assert_eq!(bank.analyst_gone(&q(1), reg, clock.at(1)), Some(1));
    assert!(matches!(bank.state(&q(1)), Some(BankQuery::Refused(_))));
    assert_eq!(
        bank.claim(&q(1), join(1), clock.at(1), clock.at(1)),
        Claim::Wait(clock.at(3))
    );

    let reg = register(&mut bank, q(2), 2, 1, clock.at(0));
    let (claimed, _) = found(bank.claim(&q(2), join(1), clock.at(0), clock.at(0)));
    assert_eq!(bank.analyst_gone(&q(2), reg, clock.at(1)), None);
    let (tag, whole) = delivered(bank.batch_done(&q(2), claimed, join(1), 0, share(&[9]), clock.at(2)));
    assert_eq!((tag, whole.share.words().to_vec()), (2, vec![9]));
}

#[test]
fn a_cancel_after_a_one_sided_refusal_drops_only_that_analysts_unclaimed_query() {
    let clock = Clock(Instant::now());
    let mut bank = BankQueries::new(TIMEOUTS);
    register(&mut bank, q(1), 1, 1, clock.at(0));
    assert_eq!(
        bank.cancel(&q(1), "mallory", clock.at(1)),
        None,
        "another analyst's cancel"
    );
    assert_eq!(bank.cancel(&q(1), "alice", clock.at(1)), Some(1));
    assert!(!bank.is_registered(&q(1)));

    register(&mut bank, q(2), 2, 1, clock.at(0));
    found(bank.claim(&q(2), join(1), clock.at(0), clock.at(0)));
    assert_eq!(
        bank.cancel(&q(2), "alice", clock.at(1)),
        None,
        "a running query finishes"
    );

    let mut platform = PlatformQueries::default();
    platform.arrive(q(3), "alice");
    assert!(!platform.cancel(&q(3), "mallory"));
    assert!(platform.cancel(&q(3), "alice"));
    assert_eq!(platform.start(&q(3)), Start::Go);
    assert!(platform.take_cancelled(&q(3)), "the attempt stops before it joins");
    assert!(!platform.take_cancelled(&q(3)), "a cancel is used once");
    platform.finish(&q(3));
    assert!(platform.state(&q(3)).is_none());
    assert!(!platform.cancel(&q(3), "alice"), "nothing runs under the id any more");
}

#[test]
fn every_batch_of_a_query_names_one_join_and_an_unknown_join_is_forgotten_only_before_a_share() {
    let clock = Clock(Instant::now());
    let now = clock.at(0);
    let mut bank = BankQueries::new(TIMEOUTS);
    register(&mut bank, q(1), 1, 2, now);
    let (reg, _) = found(bank.claim(&q(1), join(1), now, now));
    assert_eq!(bank.claim(&q(1), join(2), now, now), Claim::OtherJoin);
    // The bank does not have join 1 (it restarted): the platform joins again.
    assert!(
        bank.batch_done(&q(1), reg, join(1), 0, Batch::UnknownJoin, now)
            .is_none()
    );
    found(bank.claim(&q(1), join(2), now, now));
    assert!(bank.batch_done(&q(1), reg, join(2), 0, share(&[1]), now).is_none());
    // Once a share is in, an UnknownJoin does not free the join.
    assert!(
        bank.batch_done(&q(1), reg, join(2), 1, Batch::UnknownJoin, now)
            .is_none()
    );
    assert_eq!(bank.claim(&q(1), join(3), now, now), Claim::OtherJoin);
    // A share over another join than the query's fails the query.
    match bank.batch_done(&q(1), reg, join(3), 1, share(&[2]), now) {
        Some((1, Err(_))) => {}
        other => panic!("expected a failed query, got {other:?}"),
    }
    assert!(matches!(bank.state(&q(1)), Some(BankQuery::Refused(_))));
}

#[test]
fn a_rerun_runs_only_over_the_join_of_the_released_share_and_keeps_a_registration() {
    let clock = Clock(Instant::now());
    let now = clock.at(0);
    let mut bank = BankQueries::new(TIMEOUTS);
    let Register::New(reg, _) = bank.register(q(1), "alice", 1, Some(join(1)), 1, now) else {
        panic!("rerun not registered");
    };
    assert_eq!(bank.claim(&q(1), join(2), now, now), Claim::OtherJoin);
    // Its join is fixed: an UnknownJoin does not free it.
    found(bank.claim(&q(1), join(1), now, now));
    assert!(
        bank.batch_done(&q(1), reg, join(1), 0, Batch::UnknownJoin, now)
            .is_none()
    );
    assert_eq!(bank.claim(&q(1), join(2), now, now), Claim::OtherJoin);
    // A second rerun request while one is registered keeps it.
    assert_eq!(bank.register(q(1), "alice", 1, Some(join(1)), 2, now), Register::Kept);
    let (tag, whole) = delivered(bank.batch_done(&q(1), reg, join(1), 0, share(&[5]), now));
    assert_eq!((tag, whole.join), (1, join(1)));
}

#[test]
fn a_retry_replaces_the_registration_and_the_old_batches_are_ignored() {
    let clock = Clock(Instant::now());
    let now = clock.at(0);
    let mut bank = BankQueries::new(TIMEOUTS);
    register(&mut bank, q(1), 1, 1, now);
    let (old, _) = found(bank.claim(&q(1), join(1), now, now));
    let new = register(&mut bank, q(1), 2, 1, clock.at(1));
    assert!(bank.batch_done(&q(1), old, join(1), 0, share(&[1]), now).is_none());
    assert!(bank.expire(&q(1), old, clock.at(121)).is_none());
    let (reg, tag) = found(bank.claim(&q(1), join(1), clock.at(2), clock.at(2)));
    assert_eq!((reg, tag), (new, 2));
    let (tag, whole) = delivered(bank.batch_done(&q(1), new, join(1), 0, share(&[3]), clock.at(4)));
    assert_eq!((tag, whole.elapsed), (2, Duration::from_secs(3)));
}

#[test]
fn the_whole_share_is_delivered_once_in_group_order_with_its_run() {
    let clock = Clock(Instant::now());
    let now = clock.at(0);
    let mut bank = BankQueries::new(TIMEOUTS);
    register(&mut bank, q(1), 1, 3, now);
    let (reg, _) = found(bank.claim(&q(1), join(1), now, now));
    // The batches end out of order, one of them twice (a duplicate).
    assert!(bank.batch_done(&q(1), reg, join(1), 2, share(&[30, 31]), now).is_none());
    assert!(bank.batch_done(&q(1), reg, join(1), 0, share(&[10, 11]), now).is_none());
    assert!(bank.batch_done(&q(1), reg, join(1), 0, share(&[10, 11]), now).is_none());
    let (_, whole) = delivered(bank.batch_done(&q(1), reg, join(1), 1, share(&[20, 21]), now));
    assert_eq!(whole.share.words(), &[10, 11, 20, 21, 30, 31]);
    assert_eq!(whole.run, run_of(&[session(10), session(20), session(30)]));
    assert_ne!(whole.run, run_of(&[session(30), session(20), session(10)]));
    assert!(
        bank.batch_done(&q(1), reg, join(1), 1, share(&[20, 21]), now).is_none(),
        "delivered once"
    );
    // A group the query does not have fails it.
    register(&mut bank, q(2), 2, 1, now);
    let (reg, _) = found(bank.claim(&q(2), join(1), now, now));
    assert!(matches!(
        bank.batch_done(&q(2), reg, join(1), 1, share(&[1]), now),
        Some((2, Err(_)))
    ));
}

#[test]
fn a_share_check_is_busy_while_batches_run_or_the_share_is_stored_and_a_retry_is_told_so() {
    // The restarted platform asks whether the bank kept its share: "busy"
    // until the bank's share is stored, so the platform neither reruns
    // over a run the bank is about to store nor gives up.
    let clock = Clock(Instant::now());
    let now = clock.at(0);
    let mut bank = BankQueries::new(TIMEOUTS);
    let reg = register(&mut bank, q(1), 1, 1, now);
    assert!(!bank.busy(&q(1)), "waiting for the platform is not busy");
    found(bank.claim(&q(1), join(1), now, now));
    assert!(bank.busy(&q(1)));
    delivered(bank.batch_done(&q(1), reg, join(1), 0, share(&[1]), now));
    assert!(bank.busy(&q(1)), "storing");
    assert_eq!(bank.register(q(1), "alice", 1, None, 2, now), Register::Busy);
    assert_eq!(bank.register(q(1), "alice", 1, Some(join(1)), 2, now), Register::Busy);
    bank.refused(&q(1), now);
    assert!(bank.busy(&q(1)), "a refusal of the retry does not end the storing");
    bank.stored(&q(1), reg);
    assert!(!bank.busy(&q(1)));
    assert!(bank.state(&q(1)).is_none());
}

#[test]
fn a_registration_past_its_deadline_is_dropped_whether_or_not_batches_run() {
    let clock = Clock(Instant::now());
    let mut bank = BankQueries::new(TIMEOUTS);
    let a = register(&mut bank, q(1), 1, 1, clock.at(0));
    let b = register(&mut bank, q(2), 2, 2, clock.at(0));
    let (claimed, _) = found(bank.claim(&q(2), join(1), clock.at(0), clock.at(0)));
    assert_eq!(bank.expire(&q(1), a, clock.at(120)), Some(1));
    assert_eq!(bank.expire(&q(2), b, clock.at(120)), Some(2));
    // A batch still running when the deadline passed finds nothing to add to.
    assert!(
        bank.batch_done(&q(2), claimed, join(1), 0, share(&[1]), clock.at(121))
            .is_none()
    );
    assert!(matches!(bank.state(&q(2)), Some(BankQuery::Refused(_))));
}

#[test]
fn one_platform_attempt_per_query_id_runs_at_a_time() {
    // The analyst's client gave up and retried while attempt 1 still ran.
    let mut platform = PlatformQueries::default();
    platform.arrive(q(1), "alice");
    assert_eq!(platform.start(&q(1)), Start::Go);
    platform.arrive(q(1), "alice");
    platform.arrive(q(1), "alice");
    assert_eq!(platform.start(&q(1)), Start::Queued);
    // One retry's analyst leaves while queued.
    platform.leave(&q(1));
    platform.finish(&q(1));
    assert_eq!(platform.start(&q(1)), Start::Go);
    assert_eq!(
        platform.start(&q(1)),
        Start::Queued,
        "nobody else is queued, and one runs"
    );
    platform.finish(&q(1));
    assert!(platform.state(&q(1)).is_none(), "an idle id is forgotten");
    // Another id is independent.
    platform.arrive(q(2), "bob");
    assert_eq!(platform.start(&q(2)), Start::Go);
}

// ------------------------------------------------------------ schedules

/// One step of a random schedule on the bank's registry (two query ids,
/// three joins, up to three groups).
#[derive(Clone, Debug)]
enum Step {
    Register {
        qid: u8,
        analyst: u8,
        groups: u8,
        rerun: Option<u8>,
    },
    RequestArrived {
        qid: u8,
    },
    Claim {
        qid: u8,
        join: u8,
        group: u8,
        waited: u8,
    },
    Finish {
        batch: u8,
        outcome: u8,
        word: u64,
    },
    Gone {
        reg: u8,
    },
    Cancel {
        qid: u8,
        analyst: u8,
    },
    Expire {
        reg: u8,
    },
    Stored {
        reg: u8,
    },
    Refused {
        qid: u8,
    },
    Tick {
        secs: u8,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..2u8, 0..2u8, 1..4u8, proptest::option::of(0..3u8)).prop_map(|(qid, analyst, groups, rerun)| {
            Step::Register {
                qid,
                analyst,
                groups,
                rerun,
            }
        }),
        (0..2u8).prop_map(|qid| Step::RequestArrived { qid }),
        (0..2u8, 0..3u8, 0..4u8, 0..40u8).prop_map(|(qid, join, group, waited)| Step::Claim {
            qid,
            join,
            group,
            waited
        }),
        (any::<u8>(), 0..5u8, any::<u64>()).prop_map(|(batch, outcome, word)| Step::Finish { batch, outcome, word }),
        any::<u8>().prop_map(|reg| Step::Gone { reg }),
        (0..2u8, 0..2u8).prop_map(|(qid, analyst)| Step::Cancel { qid, analyst }),
        any::<u8>().prop_map(|reg| Step::Expire { reg }),
        any::<u8>().prop_map(|reg| Step::Stored { reg }),
        (0..2u8).prop_map(|qid| Step::Refused { qid }),
        (0..60u8).prop_map(|secs| Step::Tick { secs }),
    ]
}

/// What the test knows of one registration, kept apart from the registry.
#[derive(Debug)]
struct Reg {
    qid: QueryId,
    reg: Registration,
    analyst: String,
    groups: usize,
    fixed_join: Option<SessionId>,
    /// The join its batches must name (none before the first claim, or
    /// after an UnknownJoin before any share).
    join: Option<SessionId>,
    /// Claimed by a batch.
    claimed: bool,
    ended: bool,
    delivered: bool,
    stored: bool,
    /// Per group, the last share a batch of this registration reported.
    shares: Vec<Option<(Vec<u64>, SessionId)>>,
}

/// A batch that claimed a registration and has not ended.
#[derive(Debug)]
struct Running {
    tag: u32,
    join: SessionId,
    group: usize,
}

fn analyst(n: u8) -> String {
    ["alice", "bob"][usize::from(n % 2)].to_string()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// After every step of a random schedule: a registration is delivered
    /// at most once, only after a batch claimed it, only over one join (a
    /// rerun's own), with each group's share in group order; no batch finds
    /// a registration that ended; a share check is busy exactly while a
    /// claimed registration runs or a delivered one is not stored; a batch
    /// for a query refused within `refusal_remembered` waits at most
    /// `refused_aggregate`, any other at most `unclaimed_aggregate`.
    #[test]
    fn the_registry_keeps_its_invariants_under_any_schedule(steps in proptest::collection::vec(step(), 1..80)) {
        let start = Instant::now();
        let mut now = start;
        let mut bank: BankQueries<u32> = BankQueries::new(TIMEOUTS);
        let mut regs: Vec<Reg> = Vec::new();
        let mut batches: Vec<Running> = Vec::new();
        // When each query id was last refused (or dropped), and whether a
        // request arrived since.
        let mut refused_at: HashMap<QueryId, Instant> = HashMap::new();
        let mut ended_tags: HashSet<u32> = HashSet::new();
        for s in steps {
            match s {
                Step::Register { qid, analyst: a, groups, rerun } => {
                    let qid = q(qid);
                    let tag = regs.len() as u32;
                    let live = regs.iter().position(|r| r.qid == qid && !r.ended);
                    let storing = regs.iter().any(|r| r.qid == qid && r.delivered && !r.stored);
                    match bank.register(qid, &analyst(a), usize::from(groups), rerun.map(join), tag, now) {
                        Register::New(reg, deadline) => {
                            prop_assert!(!storing, "registered while a share was being stored");
                            prop_assert!(rerun.is_none() || live.is_none(), "a rerun replaced a registration");
                            prop_assert_eq!(deadline, now + TIMEOUTS.query);
                            if let Some(i) = live {
                                // An analyst's retry replaces it.
                                regs[i].ended = true;
                                ended_tags.insert(i as u32);
                            }
                            refused_at.remove(&qid);
                            regs.push(Reg {
                                qid, reg, analyst: analyst(a), groups: usize::from(groups),
                                fixed_join: rerun.map(join), join: rerun.map(join), claimed: false, ended: false,
                                delivered: false, stored: false, shares: vec![None; usize::from(groups)],
                            });
                        }
                        Register::Kept => prop_assert!(rerun.is_some() && live.is_some() && !storing),
                        Register::Busy => prop_assert!(storing),
                    }
                }
                Step::RequestArrived { qid } => {
                    bank.request_arrived(&q(qid));
                    refused_at.remove(&q(qid));
                }
                Step::Claim { qid, join: j, group, waited } => {
                    let qid = q(qid);
                    let asked = now.checked_sub(Duration::from_secs(u64::from(waited))).unwrap_or(now);
                    let live = regs.iter().position(|r| r.qid == qid && !r.ended);
                    let refused_lately = refused_at.get(&qid)
                        .is_some_and(|at| now.saturating_duration_since(*at) < TIMEOUTS.refusal_remembered);
                    match bank.claim(&qid, join(j), asked, now) {
                        Claim::Found(reg, tag) => {
                            let tag = *tag;
                            let Some(i) = live else { return Err(TestCaseError::fail("found a query with no live registration")); };
                            prop_assert_eq!(i as u32, tag);
                            prop_assert!(!ended_tags.contains(&tag));
                            prop_assert_eq!(regs[i].reg, reg);
                            prop_assert!(regs[i].join.is_none_or(|o| o == join(j)), "a claim over another join");
                            prop_assert!(regs[i].fixed_join.is_none_or(|f| f == join(j)), "a rerun over another join");
                            regs[i].join = Some(join(j));
                            regs[i].claimed = true;
                            batches.push(Running { tag, join: join(j), group: usize::from(group) });
                        }
                        Claim::OtherJoin => {
                            let Some(i) = live else { return Err(TestCaseError::fail("another join, with no live registration")); };
                            prop_assert!(regs[i].join.is_some_and(|o| o != join(j)));
                        }
                        Claim::Wait(until) => {
                            prop_assert!(live.is_none() || regs.iter().any(|r| r.qid == qid && r.delivered && !r.stored));
                            let patience = if refused_lately { TIMEOUTS.refused_aggregate } else { TIMEOUTS.unclaimed_aggregate };
                            prop_assert!(until <= asked + patience, "waits too long");
                            prop_assert!(until > now);
                        }
                        Claim::Unknown => prop_assert!(live.is_none()),
                    }
                }
                Step::Finish { batch, outcome, word } => {
                    if batches.is_empty() { continue; }
                    let b = batches.remove(usize::from(batch) % batches.len());
                    let r = &regs[b.tag as usize];
                    let (qid, reg) = (r.qid, r.reg);
                    let result = match outcome {
                        0..=2 => Batch::Share(Share::from_words(vec![word, word ^ 1]), SessionId([outcome ^ (word as u8); 16])),
                        3 => Batch::UnknownJoin,
                        _ => Batch::Failed("failed".into()),
                    };
                    // The model's answer: `Some(true)` a share, `Some(false)` a
                    // failure, `None` nothing yet.
                    let r = &mut regs[b.tag as usize];
                    let expect = if r.ended {
                        None
                    } else {
                        match &result {
                            Batch::Share(w, sess) => {
                                if r.join != Some(b.join) || b.group >= r.groups {
                                    Some(false)
                                } else {
                                    if let Some(slot) = r.shares.get_mut(b.group) {
                                        *slot = Some((w.words().to_vec(), *sess));
                                    }
                                    r.shares.iter().all(Option::is_some).then_some(true)
                                }
                            }
                            Batch::UnknownJoin => {
                                if r.fixed_join.is_none() && r.join == Some(b.join) && r.shares.iter().all(Option::is_none) {
                                    r.join = None;
                                }
                                None
                            }
                            Batch::Failed(_) => Some(false),
                        }
                    };
                    let out = bank.batch_done(&qid, reg, b.join, b.group, result, now);
                    let r = &mut regs[b.tag as usize];
                    prop_assert_eq!(out.as_ref().map(|(_, d)| d.is_ok()), expect, "the registry and the model differ");
                    if let Some((tag, delivery)) = out {
                        prop_assert_eq!(tag, b.tag);
                        prop_assert!(!r.delivered, "delivered twice");
                        prop_assert!(r.claimed);
                        r.ended = true;
                        ended_tags.insert(tag);
                        match delivery {
                            Ok(whole) => {
                                r.delivered = true;
                                prop_assert!(r.fixed_join.is_none_or(|f| f == whole.join));
                                prop_assert_eq!(whole.join, b.join);
                                let mut words = Vec::new();
                                let mut sessions = Vec::new();
                                for s in &r.shares {
                                    let Some((w, sess)) = s else { return Err(TestCaseError::fail("delivered with a group missing")); };
                                    words.extend_from_slice(w);
                                    sessions.push(*sess);
                                }
                                prop_assert_eq!(whole.share.words(), words.as_slice());
                                prop_assert_eq!(whole.run, run_of(&sessions));
                            }
                            Err(_) => { refused_at.insert(qid, now); }
                        }
                    }
                }
                Step::Gone { reg } => {
                    if regs.is_empty() { continue; }
                    let i = usize::from(reg) % regs.len();
                    let (qid, reg, claimed, ended) = (regs[i].qid, regs[i].reg, regs[i].claimed, regs[i].ended);
                    let dropped = bank.analyst_gone(&qid, reg, now);
                    prop_assert_eq!(dropped.is_some(), !ended && !claimed);
                    if dropped.is_some() { regs[i].ended = true; ended_tags.insert(i as u32); refused_at.insert(qid, now); }
                }
                Step::Cancel { qid, analyst: a } => {
                    let qid = q(qid);
                    let live = regs.iter().position(|r| r.qid == qid && !r.ended);
                    let dropped = bank.cancel(&qid, &analyst(a), now);
                    let expected = live.filter(|&i| !regs[i].claimed && regs[i].analyst == analyst(a));
                    prop_assert_eq!(dropped, expected.map(|i| i as u32));
                    if let Some(i) = expected { regs[i].ended = true; ended_tags.insert(i as u32); refused_at.insert(qid, now); }
                }
                Step::Expire { reg } => {
                    if regs.is_empty() { continue; }
                    let i = usize::from(reg) % regs.len();
                    let (qid, reg, ended) = (regs[i].qid, regs[i].reg, regs[i].ended);
                    let dropped = bank.expire(&qid, reg, now);
                    prop_assert_eq!(dropped.is_some(), !ended);
                    if dropped.is_some() { regs[i].ended = true; ended_tags.insert(i as u32); refused_at.insert(qid, now); }
                }
                Step::Stored { reg } => {
                    if regs.is_empty() { continue; }
                    let i = usize::from(reg) % regs.len();
                    bank.stored(&regs[i].qid, regs[i].reg);
                    if regs[i].delivered { regs[i].stored = true; }
                }
                Step::Refused { qid } => {
                    let qid = q(qid);
                    bank.refused(&qid, now);
                    let busy = regs.iter().any(|r| r.qid == qid && (!r.ended || (r.delivered && !r.stored)));
                    if !busy { refused_at.insert(qid, now); }
                }
                Step::Tick { secs } => now += Duration::from_secs(u64::from(secs)),
            }
            // Busy exactly while a claimed registration runs or a delivered
            // share is not stored; registered exactly while one is live.
            for n in 0..2 {
                let qid = q(n);
                let running = regs.iter().any(|r| r.qid == qid && !r.ended && r.claimed);
                let storing = regs.iter().any(|r| r.qid == qid && r.delivered && !r.stored);
                prop_assert_eq!(bank.busy(&qid), running || storing);
                prop_assert_eq!(bank.is_registered(&qid), regs.iter().any(|r| r.qid == qid && !r.ended));
            }
        }
    }
}

#[test]
fn groups_of_a_registration_are_at_least_one() {
    // A plan always has one platform group at least; a registration for
    // "no groups" still waits for one batch rather than delivering nothing.
    let clock = Clock(Instant::now());
    let now = clock.at(0);
    let mut bank = BankQueries::new(TIMEOUTS);
    let reg = register(&mut bank, q(1), 1, 0, now);
    found(bank.claim(&q(1), join(1), now, now));
    let (_, whole) = delivered(bank.batch_done(&q(1), reg, join(1), 0, share(&[4]), now));
    assert_eq!(whole.share.words(), &[4]);
}
