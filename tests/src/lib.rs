#![forbid(unsafe_code)]
//! Test-only package: see tests/.

pub mod fuzz;

/// This process's resident set in MiB (Linux `/proc/self/statm`; 0 elsewhere).
pub fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / f64::from(1 << 20)
}
