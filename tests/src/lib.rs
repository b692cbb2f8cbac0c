#![forbid(unsafe_code)]
//! Test-only package: see tests/.

pub mod fuzz;
