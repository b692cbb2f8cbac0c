#![forbid(unsafe_code)]
//! Test-only package: see tests/.

pub mod fuzz;
pub mod node_fuzz;

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

/// An analyst of `fixture` talking to these two running nodes.
///
/// # Panics
/// If the fixture's analyst config or certificate does not load (a test
/// set-up error).
pub fn analyst_of(
    fixture: &cleanroom_lab::demo::Fixture,
    name: &str,
    bank: &cleanroom_node::server::Node,
    platform: &cleanroom_node::server::Node,
) -> cleanroom_client::Analyst {
    let (b, p) = (bank.local_addr(), platform.local_addr());
    let cfg = match (b, p) {
        (Ok(b), Ok(p)) => fixture.analyst(name, b, p),
        _ => panic!("a node has no address"),
    };
    match cfg.and_then(|c| Ok(cleanroom_client::Analyst::new(&c)?)) {
        Ok(a) => a,
        Err(e) => panic!("analyst {name}: {e}"),
    }
}
