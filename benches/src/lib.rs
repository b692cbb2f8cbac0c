#![forbid(unsafe_code)]
//! Bench-only package: see benches/.
