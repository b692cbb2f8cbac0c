//! What a node's ledger allows for a charged query, sans-IO: the steps of
//! an analyst's request after its charge, the platform's share check, and
//! the rules for running a query again.
//!
//! Each node charges a query id once, in a durable transaction that also
//! fixes the query's noise seed, and stores its noisy share (with what the
//! share was computed over, a [`RunBinding`]) before releasing it. A retry
//! of the same query id is never charged again: it gets the stored share
//! back, or, when one node stored its share and the other did not (it
//! stopped in between), the two run the aggregate again. A rerun is the
//! one place a query's result could be released twice, so it is allowed
//! only over the join and the data the first share came from, with the
//! same noise, and a bounded number of times ([`check_rerun`]): the new
//! share then differs from the old only by the other node's fresh mask, and
//! a peer that colludes with the analyst and knows its own un-noised share
//! learns the same noisy result again and nothing more.
//!
//! The node reads its ledger (SQLite) and passes what it holds as a
//! [`Charged`]; the functions here answer what to do next. The node
//! carries it out; `tests/tests/pair.rs` drives the same functions for
//! both nodes against in-memory ledgers, with crashes and a lossy network,
//! and checks the ledger invariants after every step.
//!
//! ```text
//! analyst request --charge--> refused (budget, runs, id reused)
//!                 \-> Charged { stored: None }      -> Compute (fresh run)
//!                 \-> Charged { stored: Some(run) } -> bank: Replay
//!                                                   -> platform: AskBank(run)
//! platform AskBank(run) --Held--> Replay
//!                       --Busy--> refused, ask again shortly
//!                       --NotHeld--> check_rerun --> Rerun over the share's join
//! bank, a batch for a query no request registered --> Unregistered (claim waits)
//!                                                 --> check_rerun --> Rerun over its join
//! ```

use cleanroom_wire::{RunId, SessionId};

/// What a query's stored share was computed over: the join session and the
/// node's data version. A rerun must be over the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunBinding {
    /// The join session the aggregate ran over.
    pub join: SessionId,
    /// The node's data version when it ran.
    pub data_version: [u8; 32],
}

/// A charged query as a node's ledger holds it (the share's bytes aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charged {
    /// The run of the stored share; `None` until the share is stored.
    pub stored: Option<RunId>,
    /// What the stored share was computed over (absent before the first
    /// store, and in ledgers from before it was kept).
    pub binding: Option<RunBinding>,
    /// How often the stored share was replaced by a rerun.
    pub reruns: u32,
}

impl Charged {
    /// What the rerun rules read of it.
    pub fn rerun_record(&self) -> RerunRecord {
        RerunRecord {
            released: self.stored.is_some(),
            binding: self.binding,
            reruns: self.reruns,
        }
    }
}

/// What the rerun rules ([`check_rerun`]) read of a charged query (the
/// ledger, which keeps shares as opaque bytes, builds it without decoding
/// them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RerunRecord {
    /// A share of the query was stored (and may have been released).
    pub released: bool,
    /// What the stored share was computed over.
    pub binding: Option<RunBinding>,
    /// How often the stored share was replaced by a rerun.
    pub reruns: u32,
}

/// Why a query may not run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RerunRefused {
    /// Nothing was stored: the analyst's request computes the share.
    #[error("this query has no released share to run again")]
    NoShare,
    /// A share from a ledger that did not record its join, or one stored in
    /// the format before narrow shares (its noise cannot be drawn again).
    #[error(
        "this query's share was released before its join was recorded, or by a node version that drew its noise on weighted 64-bit cells; it cannot be run again"
    )]
    NoBinding,
    /// The node's data changed since the share was computed.
    #[error("this node's data changed since the query's share was released; it cannot be run again")]
    DataChanged,
    /// The rerun would be over another join than the released share's.
    #[error("a rerun must be over the join the query's share was released from; this is another join")]
    OtherJoin,
    /// The join the released share came from is no longer cached (it
    /// expired, or a node dropped it): a rerun may not use another.
    #[error("this query's first run was over a join that has expired or was dropped; it cannot be run again")]
    JoinGone,
    /// The rerun cap is reached.
    #[error("this query was already run again {reruns} times (limits.max_reruns_per_query is {max})")]
    Cap {
        /// Reruns stored so far.
        reruns: u32,
        /// The cap.
        max: u32,
    },
}

/// Whether the stored share of `q` may be replaced by a rerun over
/// `binding`: only over the join and data of the stored share, and fewer
/// than `max_reruns` times. The node asks before it starts a rerun and
/// again in the transaction that stores the rerun's share.
///
/// # Errors
/// Why not.
pub fn check_rerun(q: &RerunRecord, binding: &RunBinding, max_reruns: u32) -> Result<(), RerunRefused> {
    if !q.released {
        return Err(RerunRefused::NoShare);
    }
    let Some(first) = q.binding else {
        return Err(RerunRefused::NoBinding);
    };
    if first.data_version != binding.data_version {
        return Err(RerunRefused::DataChanged);
    }
    if first.join != binding.join {
        return Err(RerunRefused::OtherJoin);
    }
    if q.reruns >= max_reruns {
        return Err(RerunRefused::Cap {
            reruns: q.reruns,
            max: max_reruns,
        });
    }
    Ok(())
}

/// The bank's step once its charge of an analyst's request answered
/// (newly charged, or charged before, as `Charged`). One type per role: the
/// bank never asks itself, the platform never replays without asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BankAfterCharge {
    /// No share is stored: compute it (the platform's batches find the
    /// registration), with the noise of the charge's seed.
    Compute,
    /// Return the stored share, marked replayed.
    Replay,
}

/// The platform's step once its charge answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformAfterCharge {
    /// No share is stored: compute it (over whichever join it runs or has
    /// cached), with the noise of the charge's seed.
    Compute,
    /// A share is stored; ask the bank whether it holds its share of the
    /// same run ([`platform_after_check`] takes the answer).
    AskBank(RunId),
}

/// The bank's step after the charge: a stored share is returned; anything
/// else is computed.
pub fn bank_after_charge(q: &Charged) -> BankAfterCharge {
    match q.stored {
        Some(_) => BankAfterCharge::Replay,
        None => BankAfterCharge::Compute,
    }
}

/// The platform's step after the charge: a stored share is returned only
/// if the bank holds its share of the same run (else the analyst could not
/// add them up).
pub fn platform_after_charge(q: &Charged) -> PlatformAfterCharge {
    match q.stored {
        Some(run) => PlatformAfterCharge::AskBank(run),
        None => PlatformAfterCharge::Compute,
    }
}

/// The bank's answer to the platform's share check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BankHolds {
    /// The bank stored its share of that run.
    Held,
    /// The bank is running or storing an aggregate of the query.
    Busy,
    /// The bank has no share of that run (it stopped before storing it).
    NotHeld,
}

/// The platform's step after the bank answered its share check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCheck {
    /// Both hold shares of the run: return the stored one.
    Replay,
    /// The bank is still at it: refuse, the analyst asks again shortly.
    Busy,
    /// Run the aggregate again over this join (the stored share's), with
    /// the same noise; its share replaces the stored one.
    Rerun(SessionId),
}

/// What the platform does with the bank's answer for the query `q` it
/// stored a share of, its data now at `data_version`.
///
/// # Errors
/// Why the query may not run again (the analyst is refused).
pub fn platform_after_check(
    q: &Charged,
    answer: BankHolds,
    data_version: [u8; 32],
    max_reruns: u32,
) -> Result<AfterCheck, RerunRefused> {
    match answer {
        BankHolds::Held => Ok(AfterCheck::Replay),
        BankHolds::Busy => Ok(AfterCheck::Busy),
        BankHolds::NotHeld => {
            let first = q.binding.ok_or(RerunRefused::NoBinding)?;
            check_rerun(
                &q.rerun_record(),
                &RunBinding {
                    join: first.join,
                    data_version,
                },
                max_reruns,
            )?;
            Ok(AfterCheck::Rerun(first.join))
        }
    }
}

/// What the bank does with an aggregate batch for a query no analyst's
/// request has registered here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerBatch {
    /// Not charged, or charged and not stored: the analyst's request (which
    /// may arrive after the batch) runs it; the batch waits for it.
    Unregistered,
    /// The platform lost its share of the stored run: run the aggregate
    /// again over `binding` (the batch's join), with the same noise.
    Rerun(RunBinding),
}

/// The bank's step for a batch over `join` of a query it holds as `q`
/// (`None`: not charged here), its data now at `data_version`.
///
/// # Errors
/// Why the query may not run again (the batch is refused).
pub fn bank_peer_batch(
    q: Option<&Charged>,
    join: SessionId,
    data_version: [u8; 32],
    max_reruns: u32,
) -> Result<PeerBatch, RerunRefused> {
    match q {
        Some(q) if q.stored.is_some() => {
            let binding = RunBinding { join, data_version };
            check_rerun(&q.rerun_record(), &binding, max_reruns)?;
            Ok(PeerBatch::Rerun(binding))
        }
        _ => Ok(PeerBatch::Unregistered),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: [u8; 32] = [1; 32];
    const V2: [u8; 32] = [2; 32];
    const J1: SessionId = SessionId([1; 16]);
    const J2: SessionId = SessionId([2; 16]);

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

    #[test]
    fn a_rerun_only_over_the_same_join_and_data_and_under_the_cap() {
        let same = RunBinding {
            join: J1,
            data_version: V1,
        };
        assert_eq!(check_rerun(&stored(0).rerun_record(), &same, 2), Ok(()));
        assert_eq!(check_rerun(&stored(1).rerun_record(), &same, 2), Ok(()));
        assert_eq!(
            check_rerun(&stored(2).rerun_record(), &same, 2),
            Err(RerunRefused::Cap { reruns: 2, max: 2 })
        );
        assert_eq!(
            check_rerun(
                &stored(0).rerun_record(),
                &RunBinding {
                    join: J2,
                    data_version: V1
                },
                2
            ),
            Err(RerunRefused::OtherJoin)
        );
        assert_eq!(
            check_rerun(
                &stored(0).rerun_record(),
                &RunBinding {
                    join: J1,
                    data_version: V2
                },
                2
            ),
            Err(RerunRefused::DataChanged)
        );
        let unbound = Charged {
            binding: None,
            ..stored(0)
        };
        assert_eq!(
            check_rerun(&unbound.rerun_record(), &same, 2),
            Err(RerunRefused::NoBinding)
        );
        let fresh = Charged {
            stored: None,
            binding: None,
            reruns: 0,
        };
        assert_eq!(check_rerun(&fresh.rerun_record(), &same, 2), Err(RerunRefused::NoShare));
    }

    #[test]
    fn the_steps_after_a_charge() {
        let fresh = Charged {
            stored: None,
            binding: None,
            reruns: 0,
        };
        assert_eq!(bank_after_charge(&fresh), BankAfterCharge::Compute);
        assert_eq!(platform_after_charge(&fresh), PlatformAfterCharge::Compute);
        assert_eq!(bank_after_charge(&stored(0)), BankAfterCharge::Replay);
        assert_eq!(
            platform_after_charge(&stored(0)),
            PlatformAfterCharge::AskBank(RunId([7; 16]))
        );
        assert_eq!(
            platform_after_check(&stored(0), BankHolds::Held, V2, 2),
            Ok(AfterCheck::Replay)
        );
        assert_eq!(
            platform_after_check(&stored(0), BankHolds::Busy, V1, 2),
            Ok(AfterCheck::Busy)
        );
        assert_eq!(
            platform_after_check(&stored(0), BankHolds::NotHeld, V1, 2),
            Ok(AfterCheck::Rerun(J1))
        );
        assert_eq!(
            platform_after_check(&stored(0), BankHolds::NotHeld, V2, 2),
            Err(RerunRefused::DataChanged)
        );
        assert_eq!(bank_peer_batch(None, J2, V1, 2), Ok(PeerBatch::Unregistered));
        assert_eq!(bank_peer_batch(Some(&fresh), J2, V1, 2), Ok(PeerBatch::Unregistered));
        assert_eq!(
            bank_peer_batch(Some(&stored(0)), J2, V1, 2),
            Err(RerunRefused::OtherJoin)
        );
        assert_eq!(
            bank_peer_batch(Some(&stored(0)), J1, V1, 2),
            Ok(PeerBatch::Rerun(RunBinding {
                join: J1,
                data_version: V1
            }))
        );
    }
}
