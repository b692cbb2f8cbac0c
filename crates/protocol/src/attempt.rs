//! The platform's attempt at one analyst request, sans-IO: every step from
//! its charge to the store of its share, as events in and actions out.
//!
//! Once the platform has charged a query id (or found it charged), one
//! attempt runs ([`crate::queries::PlatformQueries`] sees to one at a
//! time per id). What it does depends on what the ledger holds, on the
//! bank's answers and on the joins each node still has; every such
//! decision is a transition here, and the node only carries out the
//! [`Action`] it is given and reports what happened:
//!
//! ```text
//! charged(nothing stored)          --> Join(CachedOrNew)
//! charged(stored run)              --> AskBank(run)
//! AskBank  --bank_answered(Held)-----> Replay
//!          --bank_answered(Busy)-----> End(Busy)
//!          --bank_answered(NotHeld)--> Join(Only(first join))  if check_rerun allows
//!                                  \-> End(RerunRefused(why))  else
//! Join     --joined(join, groups)---> SendBatch(join, 0)       (Store at once for no groups)
//!          --joined(other join)-----> End(RerunRefused(OtherJoin)) (a rerun only)
//!          --no_join----------------> End(RerunRefused(JoinGone))  (a rerun only)
//!          --cancelled--------------> End(Cancelled)               (the first join only)
//! SendBatch(g) --batch_done(g)------> SendBatch(g + 1) | Store(all batches)
//!              --aborted(UnknownJoin)--> Join(New), once, never for a rerun
//!                                   \-> End(RerunRefused(JoinGone))  for a rerun
//!              --aborted(UnknownQuery)--> End(PeerRefused)
//!              --aborted(other)----------> End(PeerAborted(code))
//! any event out of turn --> End(Unexpected)
//! ```
//!
//! A failure of the shell's own (a lost connection, a read timeout, a
//! crash) ends the attempt without an event: the machine is dropped, and a
//! retry of the same query id starts a new attempt from the ledger. The
//! node drives this machine in `crates/node/src/server/platform.rs`
//! (`Platform::attempt`); `tests/tests/pair.rs` drives the same machine
//! beside the bank's, with crashes, a lossy network and a virtual clock.

use cleanroom_wire::{AbortCode, RunId, SessionId};

use crate::ledger::{self, AfterCheck, BankHolds, Charged, PlatformAfterCharge, RerunRefused};
use crate::queries::run_of;

/// Which join the attempt runs its aggregate over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinChoice {
    /// The join cached for the plan's filter and this data, or a new one.
    CachedOrNew,
    /// Only this cached join (the one the released share came from): a
    /// rerun never opens a new join. If it is gone, say `no_join`.
    Only(SessionId),
    /// A new join: the bank no longer has `dropped` (drop it here too).
    New {
        /// The join the bank no longer has.
        dropped: SessionId,
    },
}

/// The attempt's share, assembled: what the shell noises, stores and
/// releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembled<B> {
    /// The join the batches ran over.
    pub join: SessionId,
    /// Whether this run replaces a stored share (a rerun).
    pub rerun: bool,
    /// The run the batches make (`run_of` their sessions, in group order).
    pub run: RunId,
    /// Each group's batch result, in group order.
    pub batches: Vec<B>,
}

/// How an attempt ends without a share to store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bank is still running or storing its share of the query: the
    /// analyst asks again shortly with the same id.
    Busy,
    /// The query may not run again (see [`RerunRefused`]).
    RerunRefused(RerunRefused),
    /// The bank has not accepted this query (it refused it, or never got
    /// the analyst's request).
    PeerRefused,
    /// The analyst cancelled the query (the bank refused it) before it
    /// joined.
    Cancelled,
    /// The bank aborted a batch for another reason.
    PeerAborted(AbortCode),
    /// An event came out of turn (a duplicate or stray answer).
    Unexpected(&'static str),
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<B> {
    /// Ask the bank whether it holds its share of this run; then
    /// [`PlatformAttempt::bank_answered`].
    AskBank(RunId),
    /// Get a join; then [`PlatformAttempt::joined`] or
    /// [`PlatformAttempt::no_join`] (or [`PlatformAttempt::cancelled`]).
    Join(JoinChoice),
    /// Run the aggregate batch of `group` over `join`; then
    /// [`PlatformAttempt::batch_done`] or [`PlatformAttempt::aborted`].
    SendBatch {
        /// The join the batch names.
        join: SessionId,
        /// The platform group (0-based, in order).
        group: u32,
    },
    /// Noise, store and release the assembled share. The attempt is over.
    Store(Assembled<B>),
    /// Return the stored share. The attempt is over.
    Replay,
    /// The attempt is over without a share.
    End(Outcome),
}

#[derive(Debug)]
enum State<B> {
    /// Charged; nothing decided yet.
    Charged,
    /// Waiting for the bank's answer about its stored share.
    AwaitCheck,
    /// Waiting for a join.
    Joining {
        /// The join of the released share, for a rerun.
        rerun: Option<SessionId>,
        /// Whether a join was already replaced once.
        rejoined: bool,
    },
    /// Running the batches, one group after another.
    Batches {
        join: SessionId,
        groups: u32,
        rerun: Option<SessionId>,
        rejoined: bool,
        done: Vec<(SessionId, B)>,
    },
    /// Over.
    Done,
}

/// One attempt of the platform at one query id (see the module docs).
#[derive(Debug)]
pub struct PlatformAttempt<B> {
    data_version: [u8; 32],
    max_reruns: u32,
    state: State<B>,
}

impl<B> PlatformAttempt<B> {
    /// An attempt on data at `data_version`, under the node's rerun cap;
    /// start it with [`PlatformAttempt::charged`].
    pub fn new(data_version: [u8; 32], max_reruns: u32) -> Self {
        Self {
            data_version,
            max_reruns,
            state: State::Charged,
        }
    }

    /// Whether the attempt waits for the bank (a share check or a batch):
    /// the events only a message from the bank brings.
    pub fn waits_for_bank(&self) -> bool {
        matches!(self.state, State::AwaitCheck | State::Batches { .. })
    }

    /// Whether the attempt is over.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn end(&mut self, outcome: Outcome) -> Action<B> {
        self.state = State::Done;
        Action::End(outcome)
    }

    fn join(&mut self, rerun: Option<SessionId>, rejoined: bool, choice: JoinChoice) -> Action<B> {
        self.state = State::Joining { rerun, rejoined };
        Action::Join(choice)
    }

    /// The charge answered (newly charged, or charged before), with what
    /// the ledger holds of the query.
    pub fn charged(&mut self, q: &Charged) -> Action<B> {
        if !matches!(self.state, State::Charged) {
            return self.end(Outcome::Unexpected("a second charge in one attempt"));
        }
        match ledger::platform_after_charge(q) {
            PlatformAfterCharge::Compute => self.join(None, false, JoinChoice::CachedOrNew),
            PlatformAfterCharge::AskBank(run) => {
                self.state = State::AwaitCheck;
                Action::AskBank(run)
            }
        }
    }

    /// The bank answered the share check; `q` is what the ledger holds of
    /// the query now.
    pub fn bank_answered(&mut self, answer: BankHolds, q: &Charged) -> Action<B> {
        if !matches!(self.state, State::AwaitCheck) {
            return self.end(Outcome::Unexpected("an answer to a share check not asked"));
        }
        match ledger::platform_after_check(q, answer, self.data_version, self.max_reruns) {
            Ok(AfterCheck::Replay) => {
                self.state = State::Done;
                Action::Replay
            }
            Ok(AfterCheck::Busy) => self.end(Outcome::Busy),
            Ok(AfterCheck::Rerun(first)) => self.join(Some(first), false, JoinChoice::Only(first)),
            Err(why) => self.end(Outcome::RerunRefused(why)),
        }
    }

    /// The shell has a join of `groups` platform groups.
    pub fn joined(&mut self, join: SessionId, groups: u32) -> Action<B> {
        let State::Joining { rerun, rejoined } = self.state else {
            return self.end(Outcome::Unexpected("a join not asked for"));
        };
        if rerun.is_some_and(|first| first != join) {
            return self.end(Outcome::RerunRefused(RerunRefused::OtherJoin));
        }
        self.state = State::Batches {
            join,
            groups,
            rerun,
            rejoined,
            done: Vec::new(),
        };
        self.next_batch()
    }

    /// The join a rerun must use is no longer cached.
    pub fn no_join(&mut self) -> Action<B> {
        match self.state {
            State::Joining { rerun: Some(_), .. } => self.end(Outcome::RerunRefused(RerunRefused::JoinGone)),
            _ => self.end(Outcome::Unexpected("no join where any join would do")),
        }
    }

    /// The analyst cancelled the query before its first join. (Once it
    /// joined, the attempt runs to its end: a re-join after the bank lost
    /// the join is not a new start.)
    pub fn cancelled(&mut self) -> Action<B> {
        match self.state {
            State::Joining { rejoined: false, .. } => self.end(Outcome::Cancelled),
            _ => self.end(Outcome::Unexpected("a cancel after the first join")),
        }
    }

    /// The batch of `group` ended with its OT session and result.
    pub fn batch_done(&mut self, group: u32, session: SessionId, result: B) -> Action<B> {
        match &mut self.state {
            State::Batches { done, .. } if usize::try_from(group).is_ok_and(|g| g == done.len()) => {
                done.push((session, result));
                self.next_batch()
            }
            _ => self.end(Outcome::Unexpected("a batch result out of turn")),
        }
    }

    /// The bank aborted the running batch with `code`.
    pub fn aborted(&mut self, code: AbortCode) -> Action<B> {
        let State::Batches {
            join, rerun, rejoined, ..
        } = self.state
        else {
            return self.end(Outcome::Unexpected("an abort with no batch running"));
        };
        match code {
            // The bank no longer has the join (expired, or it restarted):
            // join again once. A rerun must be over the released share's
            // join, so it cannot.
            AbortCode::UnknownJoin if rerun.is_some() => self.end(Outcome::RerunRefused(RerunRefused::JoinGone)),
            AbortCode::UnknownJoin if !rejoined => self.join(None, true, JoinChoice::New { dropped: join }),
            AbortCode::UnknownQuery => self.end(Outcome::PeerRefused),
            other => self.end(Outcome::PeerAborted(other)),
        }
    }

    /// The next batch to send, or the assembled share.
    fn next_batch(&mut self) -> Action<B> {
        let State::Batches {
            join,
            groups,
            rerun,
            done,
            ..
        } = &mut self.state
        else {
            return self.end(Outcome::Unexpected("no batches running"));
        };
        let (join, rerun) = (*join, *rerun);
        let next = u32::try_from(done.len()).ok().filter(|&n| n < *groups);
        if let Some(group) = next {
            return Action::SendBatch { join, group };
        }
        let done = std::mem::take(done);
        self.state = State::Done;
        let run = run_of(done.iter().map(|(s, _)| s));
        Action::Store(Assembled {
            join,
            rerun: rerun.is_some(),
            run,
            batches: done.into_iter().map(|(_, b)| b).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::RunBinding;

    const V1: [u8; 32] = [1; 32];
    const V2: [u8; 32] = [2; 32];
    const J1: SessionId = SessionId([1; 16]);
    const J2: SessionId = SessionId([2; 16]);
    const S1: SessionId = SessionId([11; 16]);
    const S2: SessionId = SessionId([12; 16]);

    fn fresh() -> Charged {
        Charged {
            stored: None,
            binding: None,
            reruns: 0,
        }
    }

    fn stored(reruns: u32) -> Charged {
        Charged {
            stored: Some(RunId([7; 16])),
            binding: Some(RunBinding {
                join: J1,
                data_version: V1,
            }),
            reruns,
        }
    }

    fn attempt() -> PlatformAttempt<u64> {
        PlatformAttempt::new(V1, 2)
    }

    #[test]
    fn a_fresh_query_joins_and_runs_its_batches_in_order() {
        let mut a = attempt();
        assert_eq!(a.charged(&fresh()), Action::Join(JoinChoice::CachedOrNew));
        assert!(!a.waits_for_bank());
        assert_eq!(a.joined(J1, 2), Action::SendBatch { join: J1, group: 0 });
        assert!(a.waits_for_bank());
        assert_eq!(a.batch_done(0, S1, 10), Action::SendBatch { join: J1, group: 1 });
        assert_eq!(
            a.batch_done(1, S2, 20),
            Action::Store(Assembled {
                join: J1,
                rerun: false,
                run: run_of(&[S1, S2]),
                batches: vec![10, 20],
            })
        );
        assert!(a.is_done());
    }

    #[test]
    fn a_join_of_no_groups_stores_an_empty_share() {
        let mut a = attempt();
        a.charged(&fresh());
        assert_eq!(
            a.joined(J1, 0),
            Action::Store(Assembled {
                join: J1,
                rerun: false,
                run: run_of(std::iter::empty()),
                batches: vec![],
            })
        );
    }

    #[test]
    fn a_stored_share_is_returned_only_when_the_bank_holds_its_own() {
        let mut a = attempt();
        assert_eq!(a.charged(&stored(0)), Action::AskBank(RunId([7; 16])));
        assert!(a.waits_for_bank());
        assert_eq!(a.bank_answered(BankHolds::Held, &stored(0)), Action::Replay);
        assert!(a.is_done());

        let mut a = attempt();
        a.charged(&stored(0));
        assert_eq!(a.bank_answered(BankHolds::Busy, &stored(0)), Action::End(Outcome::Busy));
    }

    #[test]
    fn a_rerun_only_over_the_cached_join_of_the_released_share() {
        let mut a = attempt();
        a.charged(&stored(0));
        assert_eq!(
            a.bank_answered(BankHolds::NotHeld, &stored(0)),
            Action::Join(JoinChoice::Only(J1))
        );
        assert_eq!(a.joined(J1, 1), Action::SendBatch { join: J1, group: 0 });
        assert_eq!(
            a.batch_done(0, S1, 3),
            Action::Store(Assembled {
                join: J1,
                rerun: true,
                run: run_of(&[S1]),
                batches: vec![3],
            })
        );

        // The join is gone here.
        let mut a = attempt();
        a.charged(&stored(0));
        a.bank_answered(BankHolds::NotHeld, &stored(0));
        assert_eq!(a.no_join(), Action::End(Outcome::RerunRefused(RerunRefused::JoinGone)));

        // A shell that offers another join is refused.
        let mut a = attempt();
        a.charged(&stored(0));
        a.bank_answered(BankHolds::NotHeld, &stored(0));
        assert_eq!(
            a.joined(J2, 1),
            Action::End(Outcome::RerunRefused(RerunRefused::OtherJoin))
        );

        // The bank lost the join: a rerun does not join again.
        let mut a = attempt();
        a.charged(&stored(0));
        a.bank_answered(BankHolds::NotHeld, &stored(0));
        a.joined(J1, 2);
        assert_eq!(
            a.aborted(AbortCode::UnknownJoin),
            Action::End(Outcome::RerunRefused(RerunRefused::JoinGone))
        );
    }

    #[test]
    fn a_rerun_is_refused_on_other_data_or_over_the_cap() {
        let mut a = PlatformAttempt::<u64>::new(V2, 2);
        a.charged(&stored(0));
        assert_eq!(
            a.bank_answered(BankHolds::NotHeld, &stored(0)),
            Action::End(Outcome::RerunRefused(RerunRefused::DataChanged))
        );
        let mut a = attempt();
        a.charged(&stored(2));
        assert_eq!(
            a.bank_answered(BankHolds::NotHeld, &stored(2)),
            Action::End(Outcome::RerunRefused(RerunRefused::Cap { reruns: 2, max: 2 }))
        );
    }

    #[test]
    fn an_unknown_join_at_the_bank_joins_again_once_and_starts_over() {
        let mut a = attempt();
        a.charged(&fresh());
        a.joined(J1, 2);
        assert_eq!(a.batch_done(0, S1, 1), Action::SendBatch { join: J1, group: 1 });
        assert_eq!(
            a.aborted(AbortCode::UnknownJoin),
            Action::Join(JoinChoice::New { dropped: J1 })
        );
        // The new join's batches start at group 0; the old batch is gone.
        assert_eq!(a.joined(J2, 2), Action::SendBatch { join: J2, group: 0 });
        a.batch_done(0, S2, 5);
        assert_eq!(
            a.batch_done(1, S1, 6),
            Action::Store(Assembled {
                join: J2,
                rerun: false,
                run: run_of(&[S2, S1]),
                batches: vec![5, 6],
            })
        );
        // A second unknown join ends the attempt.
        let mut a = attempt();
        a.charged(&fresh());
        a.joined(J1, 1);
        a.aborted(AbortCode::UnknownJoin);
        a.joined(J2, 1);
        assert_eq!(
            a.aborted(AbortCode::UnknownJoin),
            Action::End(Outcome::PeerAborted(AbortCode::UnknownJoin))
        );
    }

    #[test]
    fn the_banks_refusals_end_the_attempt() {
        for (code, outcome) in [
            (AbortCode::UnknownQuery, Outcome::PeerRefused),
            (AbortCode::Refused, Outcome::PeerAborted(AbortCode::Refused)),
            (AbortCode::BadMessage, Outcome::PeerAborted(AbortCode::BadMessage)),
        ] {
            let mut a = attempt();
            a.charged(&fresh());
            a.joined(J1, 1);
            assert_eq!(a.aborted(code), Action::End(outcome));
            assert!(a.is_done());
        }
        let mut a = attempt();
        a.charged(&fresh());
        assert_eq!(a.cancelled(), Action::End(Outcome::Cancelled));
        // A rerun is cancelled before its join too.
        let mut a = attempt();
        a.charged(&stored(0));
        a.bank_answered(BankHolds::NotHeld, &stored(0));
        assert_eq!(a.cancelled(), Action::End(Outcome::Cancelled));
        // The bank refuses a rerun's batch.
        let mut a = attempt();
        a.charged(&stored(0));
        a.bank_answered(BankHolds::NotHeld, &stored(0));
        a.joined(J1, 1);
        assert_eq!(
            a.aborted(AbortCode::Refused),
            Action::End(Outcome::PeerAborted(AbortCode::Refused))
        );
        // After a re-join, the bank no longer knowing the query is a refusal.
        let mut a = attempt();
        a.charged(&fresh());
        a.joined(J1, 1);
        a.aborted(AbortCode::UnknownJoin);
        assert!(!a.waits_for_bank());
        a.joined(J2, 1);
        assert_eq!(a.aborted(AbortCode::UnknownQuery), Action::End(Outcome::PeerRefused));
    }

    #[test]
    fn a_share_released_before_its_join_was_recorded_is_not_run_again() {
        let unbound = Charged {
            binding: None,
            ..stored(0)
        };
        let mut a = attempt();
        a.charged(&unbound);
        assert_eq!(
            a.bank_answered(BankHolds::NotHeld, &unbound),
            Action::End(Outcome::RerunRefused(RerunRefused::NoBinding))
        );
    }

    #[test]
    fn events_out_of_turn_end_the_attempt() {
        // A duplicate batch answer.
        let mut a = attempt();
        a.charged(&fresh());
        a.joined(J1, 2);
        a.batch_done(0, S1, 1);
        assert!(matches!(a.batch_done(0, S1, 1), Action::End(Outcome::Unexpected(_))));
        // A share-check answer nobody asked for.
        let mut a = attempt();
        a.charged(&fresh());
        assert!(matches!(
            a.bank_answered(BankHolds::Held, &fresh()),
            Action::End(Outcome::Unexpected(_))
        ));
        // Anything after the end.
        assert!(matches!(a.joined(J1, 1), Action::End(Outcome::Unexpected(_))));
        assert!(matches!(a.charged(&fresh()), Action::End(Outcome::Unexpected(_))));
        // A join no rerun asked for cannot be missing.
        let mut a = attempt();
        a.charged(&fresh());
        assert!(matches!(a.no_join(), Action::End(Outcome::Unexpected(_))));
        // A cancel, a missing join or an abort while batches run or a
        // check waits, a cancel after a re-join.
        let batches = || {
            let mut a = attempt();
            a.charged(&fresh());
            a.joined(J1, 2);
            a
        };
        assert!(matches!(batches().cancelled(), Action::End(Outcome::Unexpected(_))));
        assert!(matches!(batches().no_join(), Action::End(Outcome::Unexpected(_))));
        let checking = || {
            let mut a = attempt();
            a.charged(&stored(0));
            a
        };
        assert!(matches!(checking().cancelled(), Action::End(Outcome::Unexpected(_))));
        assert!(matches!(
            checking().aborted(AbortCode::UnknownJoin),
            Action::End(Outcome::Unexpected(_))
        ));
        assert!(matches!(checking().joined(J1, 1), Action::End(Outcome::Unexpected(_))));
        let mut a = batches();
        a.aborted(AbortCode::UnknownJoin);
        assert!(matches!(a.cancelled(), Action::End(Outcome::Unexpected(_))));
        // Anything after a replay or a store.
        let mut a = checking();
        a.bank_answered(BankHolds::Held, &stored(0));
        assert!(matches!(a.batch_done(0, S1, 1), Action::End(Outcome::Unexpected(_))));
        let mut a = attempt();
        a.charged(&fresh());
        a.joined(J1, 1);
        a.batch_done(0, S1, 1);
        assert!(a.is_done());
        assert!(matches!(
            a.aborted(AbortCode::Refused),
            Action::End(Outcome::Unexpected(_))
        ));
    }
}
