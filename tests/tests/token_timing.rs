//! The holder's work before it sends `E` must not depend on the dummy count
//! `D` (the cardinality noise): a matcher that brings one target and a few
//! other identifiers could otherwise read `D` from the delay between its
//! last token chunk and the holder's first token chunk, and undo the noise.
//!
//! Over a few hundred in-process joins with a tiny matcher set, the work of
//! the holder's last token step (which builds `E`), measured as the CPU time
//! of the one thread that runs it, is rank-correlated with `D`; the
//! correlation must be near zero. A control adds to the same step the work
//! of `D` more tokens (hash to group, multiply, compress) and shows the test
//! finds the correlation when the work does depend on `D`. That is about
//! twice what a dummy token costs the holder (`muls_compress`: a table
//! multiplication and batched compression); a control of that size alone
//! passed in most runs but not all (r 0.40 to 0.85) on this shared
//! machine, so the test's power is shown for one token per dummy. This measures work, not wall time: a delay that
//! depended on `D` without CPU work (a wait) would not show here. (The test
//! timed wall-clock time until its control, then `D` variable-base
//! multiplications, got twice as fast with curve25519-dalek's AVX-512 IFMA
//! backend and drowned in the scheduler's jitter on this shared machine.)
//!
//! When the control comes out too weak to show that (host noise: it once
//! measured 0.493 in a clean-clone CI run and 0.929 and 0.795 on an idle
//! host just after), the pair is measured again, up to three times; the
//! null correlation is checked on the measurement whose control passed.
//!
//! `cargo test --locked -p cleanroom-tests --test token_timing -- --nocapture`
//! prints both correlations.

mod common;

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_crypto::h2g::HashToGroup;
use cleanroom_protocol::join::{HolderJoin, HolderPolicy};
use cleanroom_wire::Message;
use curve25519_dalek::scalar::Scalar;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const TRIALS: u64 = 300;
/// Runs of each trial's join; the least work is kept.
const REPEATS: usize = 3;

/// Spearman's rank correlation: Pearson on ranks, robust to the heavy tail
/// of timings on a shared machine (a preempted step is one rank, not 10 ms).
fn spearman(x: &[f64], y: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|a, b| v[*a].total_cmp(&v[*b]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            for k in i..=j {
                r[idx[k]] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    pearson(&ranks(x), &ranks(y))
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

/// CPU time of this thread, in seconds. Each trial runs on a rayon pool of
/// one thread (see `correlation`), so this is all the step's work, and a
/// preemption by another process on this shared machine does not count.
fn cpu_now() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Tokens computed in the calibration before each step.
const CALIBRATION: u64 = 100;

/// `n` tokens of made-up identifiers: hash to group, multiply, compress.
fn tokens(n: u64) -> u8 {
    let h2g = HashToGroup::for_collaboration("control").unwrap();
    let mut acc = 0u8;
    for k in 0..n {
        let p = Scalar::from(k + 3) * h2g.hash(&k.to_le_bytes());
        acc ^= p.compress().to_bytes()[0];
    }
    acc
}

/// One join: the CPU time the holder's last token step took (plus that of
/// `extra(D)` tokens, the control), in units of the calibration's time,
/// and `D`.
fn one_join(seed: u64, extra: impl Fn(u64) -> u64) -> (f64, u64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let holder = HolderJoin::new(
        common::params(1024),
        HolderPolicy {
            peer_set: common::limits(),
            // ε = 0.05, δ = 10^-6: D spread about ±28 (at ε = 0.1, ±14,
            // the control's correlation fell to 0.39 in one CI run).
            cardinality: ShiftedTruncatedLaplace::new(1, 20, 1_000_000).unwrap(),
        },
        common::ids("x", 0..200),
    )
    .unwrap();
    // One target the holder has, and a few others.
    let mut ids = common::ids("x", 0..1);
    ids.extend(common::ids("y", 0..9));
    let matcher = common::matcher(ids, 1024);
    let (offered, offer) = matcher.offer(&mut rng).unwrap();
    let (mut h, accept) = holder
        .on_offer(&offer.encode().unwrap(), &mut rng)
        .unwrap()
        .charge_recorded();
    let mut m = offered.on_accept(&accept.encode().unwrap()).unwrap();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    while let Some(msg) = m.poll_transmit() {
        frames.push(msg.encode().unwrap());
    }
    let last = frames.pop().unwrap();
    for f in &frames {
        h.handle(f).unwrap();
    }
    // The holder's rows go out before (they do not depend on `E`).
    let mut rows = Vec::new();
    while let Some(msg) = h.poll_transmit() {
        assert!(matches!(msg, Message::HolderRows(_)));
        rows.push(msg);
    }
    // The machine's speed drifts (the other vCPU's load, the host): the
    // step is measured against the same fixed work timed just before it.
    let t = cpu_now();
    std::hint::black_box(tokens(CALIBRATION));
    let calibration = cpu_now() - t;
    let t = cpu_now();
    h.handle(&last).unwrap();
    let first_token = h.poll_transmit().unwrap();
    let timed = cpu_now() - t;
    assert!(matches!(first_token, Message::HolderTokens(_)));
    while h.poll_transmit().is_some() {}
    let d = h.finish().unwrap().matching_dummies();
    // The control: `extra(D)` more tokens (hash to group, multiply,
    // compress: what computing a token for each dummy row would cost),
    // timed on their own and added to the step (as if they had been inside
    // it).
    let t = cpu_now();
    std::hint::black_box(tokens(extra(d)));
    ((timed + (cpu_now() - t)) / calibration, d)
}

fn correlation(extra: impl Fn(u64) -> u64 + Copy + Send + Sync) -> (f64, f64, f64) {
    // One thread does all of a trial's work, parallel code included.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (mut times, mut ds) = (Vec::new(), Vec::new());
    pool.install(|| {
        // A few joins to warm up the caches.
        for s in 0..5 {
            one_join(10_000 + s, extra);
        }
        for s in 0..TRIALS {
            // The same join (same seed, so the same D) three times, the
            // least work kept: interference from the other core only ever
            // adds to a measurement.
            let (t, d) = (0..REPEATS)
                .map(|_| one_join(s, extra))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap();
            times.push(t);
            ds.push(d as f64);
        }
    });
    let r = spearman(&times, &ds);
    let mean_d = ds.iter().sum::<f64>() / ds.len() as f64;
    let sd_d = (ds.iter().map(|d| (d - mean_d).powi(2)).sum::<f64>() / ds.len() as f64).sqrt();
    times.sort_by(f64::total_cmp);
    (r, sd_d, times[times.len() / 2])
}

/// Most measurements of the pair below: another is made only when the
/// control was too weak to show the test could see a D-dependent step
/// (host noise), never because of the null measurement.
const ATTEMPTS: usize = 3;

#[test]
fn the_time_to_build_e_does_not_follow_the_dummy_count() {
    let mut controls = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let (r, sd_d, median) = correlation(|_| 0);
        println!(
            "attempt {attempt}: last token step vs D over {TRIALS} joins (D sd {sd_d:.1}): r = {r:+.3}, median step {median:.2} x the calibration ({CALIBRATION} tokens)"
        );
        // The control: the same measurement with D more multiplications in it.
        let (r_control, _, median_control) = correlation(|d| d);
        println!(
            "attempt {attempt}: control, with D more tokens (hash to group, multiply, compress) in the step: r = {r_control:+.3}, median step {median_control:.2} x the calibration"
        );
        assert!(sd_d > 5.0, "D hardly varies (sd {sd_d}): the test cannot see anything");
        // (With the multi-buffer curve code and one run per join, the control
        // measured 0.37 to 0.67 on 2026-12-07 and failed the clean-clone CI
        // once at 0.486; with the least of three runs per join: 0.56 to 0.94,
        // null -0.055 to +0.059, and once 0.394 in CI. With ε = 0.05 (twice
        // D's spread): control 0.77, 0.98, 0.95, null -0.05 to -0.07; then
        // 0.493 in one clean-clone CI run, 0.929 and 0.795 on an idle host
        // just after, hence another attempt when the control is weak.)
        if r_control > 0.5 {
            // 300 independent pairs: the correlation's standard error is about 0.058.
            assert!(r.abs() < 0.25, "the time to build E follows D: r = {r}");
            return;
        }
        controls.push(r_control);
    }
    panic!(
        "the control does not show a D-dependent step in {ATTEMPTS} attempts (r = {controls:?}): the measurement is too noisy"
    );
}
