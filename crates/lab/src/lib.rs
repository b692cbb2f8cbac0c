#![forbid(unsafe_code)]
//! Both nodes in one process, for people rather than for production:
//!
//! - [`demo`]: `cleanroom demo` and the [`demo::Fixture`] the tests build
//!   nodes from (a throwaway CA, synthetic data, configurations, the
//!   plaintext truth);
//! - [`bench`]: `cleanroom bench`, the join against its curve-operation
//!   bound, the plot;
//! - [`memory`]: live heap per node thread, for the bench;
//! - [`relay`]: an in-process UDP relay that emulates a network path.
//!
//! The node library (`cleanroom-node`) links none of this: no plotting, no
//! allocator hooks, no synthetic data writer beyond what its tests need.

pub mod bench;
pub mod demo;
pub mod memory;
pub mod relay;
