#![forbid(unsafe_code)]
//! Both parties in one process: synthetic data ([`synth`]), the in-memory
//! driver ([`driver`]) and `cleanroom simulate` ([`simulate`]), which checks
//! the protocol's output against a plaintext computation.

pub mod driver;
pub mod simulate;
pub mod synth;
