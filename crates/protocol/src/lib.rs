#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
//! The two parties of the clean-room protocol as sans-IO state machines.
//!
//! - [`join`]: phase 1, the private join with DP dummy rows and tokens;
//! - [`aggregate`]: phase 2, the secret-shared aggregate by OT;
//! - [`queries`]: the query lifecycle around them, per query id and role;
//! - [`ledger`]: what a charged query may do next (replay, rerun, compute);
//! - [`attempt`]: the platform's attempt at one analyst request, from its
//!   charge to its stored share, as events and actions.
//!
//! Bytes and randomness go in, messages come out; nothing here touches a
//! socket, a file or a clock. Drivers (the in-memory one in `cleanroom-sim`,
//! the QUIC one in the node) pump frames between the two sides.

pub mod aggregate;
pub mod attempt;
mod error;
pub mod join;
pub mod ledger;
pub mod queries;
mod session;

pub use error::{ProtocolError, abort_reason};
