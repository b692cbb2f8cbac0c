#![forbid(unsafe_code)]
//! Both nodes in one process, for people rather than for production:
//!
//! - [`demo`]: `cleanroom demo` and the [`demo::Fixture`] the tests build
//!   nodes from (a throwaway CA, synthetic data, configurations, the
//!   plaintext truth);
//! - [`bench`]: `cleanroom bench`, the join against its curve-operation
//!   bound, the plot;
//! - [`memory`]: live heap per node thread, for the bench;
//! - [`relay`]: an in-process UDP relay that emulates a network path;
//! - [`pg`]: a throwaway PostgreSQL server for `demo --source postgres`
//!   and the tests.
//!
//! The node library (`cleanroom-node`) links none of this: no plotting, no
//! allocator hooks, no synthetic data writer beyond what its tests need.

pub mod bench;
pub mod demo;
pub mod memory;
pub mod pg;
pub mod relay;

/// What can fail in the lab: a node (its setup included), or the analyst's
/// client.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A node, its configuration, data or state.
    #[error(transparent)]
    Node(#[from] cleanroom_node::NodeError),
    /// The analyst's client.
    #[error(transparent)]
    Client(#[from] cleanroom_client::ClientError),
    /// The bench could not run as asked (a node process that exited, ...).
    #[error("bench: {0}")]
    Bench(String),
    /// The throwaway PostgreSQL server of `demo --source postgres` (and the
    /// tests) could not be started or used.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// The bench's plot could not be drawn or written.
    #[error("writing the plot {path}: {what}")]
    Plot {
        /// The file.
        path: String,
        /// What went wrong.
        what: String,
    },
}
