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

/// Checks a query's cells against its plaintext truth `t` when the noise
/// is negligible: as many cells at least, every reported σ in (0, 0.2),
/// every value within 0.5 of its truth, and a truth that is not all zeros
/// (something to find).
///
/// # Panics
/// On the first cell that is off, naming `label`.
pub fn assert_cells_exact(r: &cleanroom_client::QueryResult, t: &[f64], label: &str) {
    assert!(!t.is_empty() && r.cells.len() >= t.len(), "{label}");
    for (c, truth) in r.cells.iter().zip(t) {
        assert!(c.sigma > 0.0 && c.sigma < 0.2, "{label} {}: sd {}", c.name, c.sigma);
        assert!(
            (c.value - truth).abs() < 0.5,
            "{label} {}: {} vs {truth}",
            c.name,
            c.value
        );
    }
    assert!(t.iter().any(|x| *x > 0.0), "{label}");
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

/// The cases the semantics must settle, in the data both nodes load:
/// users' phones swapped pairwise (a customer's e-mail and phone then
/// match two users, often in two segments: it counts once, in the lower),
/// customers whose e-mail does not normalise (one key left), and phones
/// two customers share (dropped from both at load): every ninth customer
/// loses its e-mail and every thirteenth (from the second) takes the
/// previous customer's phone.
pub fn conflicting_and_missing_keys(data: &mut cleanroom_sim::synth::SynthData) {
    let swaps = data.platform.len() / 10;
    let (head, tail) = data.platform.split_at_mut(swaps);
    for (a, b) in head.iter_mut().zip(tail.iter_mut()) {
        std::mem::swap(&mut a.phone, &mut b.phone);
    }
    let mut ids: Vec<u64> = data.bank.iter().map(|t| t.customer).collect();
    ids.dedup();
    let position: std::collections::HashMap<u64, usize> = ids.iter().enumerate().map(|(i, c)| (*c, i)).collect();
    let phone_of: std::collections::HashMap<u64, String> =
        data.bank.iter().map(|t| (t.customer, t.phone.clone())).collect();
    for t in &mut data.bank {
        let Some(&pos) = position.get(&t.customer) else {
            continue;
        };
        if pos % 9 == 0 {
            t.email = "no e-mail on file".into();
        }
        if pos % 13 == 1
            && let Some(phone) = pos
                .checked_sub(1)
                .and_then(|p| ids.get(p))
                .and_then(|c| phone_of.get(c))
        {
            t.phone = phone.clone();
        }
    }
}
