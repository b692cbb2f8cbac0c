#![forbid(unsafe_code)]
//! Both parties in one process: synthetic data ([`synth`]), the in-memory
//! driver ([`driver`]) and `cleanroom simulate` ([`simulate`]), which checks
//! the protocol's output against a plaintext computation; and the plaintext
//! oracle for whole queries ([`oracle`]), which the node tests check against.

pub mod driver;
pub mod oracle;
pub mod simulate;
pub mod synth;
