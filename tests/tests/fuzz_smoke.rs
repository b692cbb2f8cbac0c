//! A short fuzz run on stable Rust, in `cargo test` (so in CI, which has
//! no nightly toolchain for cargo-fuzz): each fuzz target body
//! (`cleanroom_tests::fuzz`) gets, for a few seconds, inputs made by
//! mutating and splicing its checked-in corpus (bit flips, interesting
//! values, inserted, deleted, duplicated and truncated ranges). There is no
//! coverage feedback, so this is a smoke run, not a fuzzer: it catches a
//! change that makes a target panic on an input close to the corpus. The
//! seed is fixed (so CI is repeatable) and printed; `FUZZ_SMOKE_SEED=<seed>`
//! picks another, `FUZZ_SMOKE_SEED=random` a new one each run. A failing
//! input is written to `target/fuzz-smoke/<target>-<seed>-<n>` for
//! `cargo +nightly fuzz run <target> <file>` and for `fuzz/regressions/`.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cleanroom_tests::fuzz::{TARGETS, Target};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The seed unless `FUZZ_SMOKE_SEED` says otherwise.
const DEFAULT_SEED: u64 = 0x5eed_c1ea_7200_0001;

/// Time per target (the six run on two threads).
const BUDGET: Duration = Duration::from_secs(4);
/// Largest input made (the biggest corpus file, a state database, is 44 KiB).
const MAX_LEN: usize = 64 * 1024;

fn corpus(name: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
}

const INTERESTING: [u64; 10] = [0, 1, 2, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, 0xffff_ffff, u64::MAX];

/// One mutation of `data` in place (`other`: a second corpus input for splicing).
fn mutate(data: &mut Vec<u8>, other: &[u8], rng: &mut ChaCha20Rng) {
    let len = data.len();
    let at = |rng: &mut ChaCha20Rng, n: usize| if n == 0 { 0 } else { rng.random_range(0..n) };
    match rng.random_range(0..8u8) {
        0 if len > 0 => {
            let i = at(rng, len);
            if let Some(b) = data.get_mut(i) {
                *b ^= 1 << rng.random_range(0..8u32);
            }
        }
        1 if len > 0 => {
            let i = at(rng, len);
            let v = INTERESTING[at(rng, INTERESTING.len())];
            if let Some(b) = data.get_mut(i) {
                *b = v as u8;
            }
        }
        2 if len >= 4 => {
            // A little-endian word (lengths and counts are little-endian).
            let i = at(rng, len - 3);
            let v = INTERESTING[at(rng, INTERESTING.len())] as u32;
            if let Some(w) = data.get_mut(i..i + 4) {
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
        3 => {
            let i = at(rng, len + 1);
            let n = rng.random_range(1..=16usize);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            data.splice(i..i, bytes);
        }
        4 if len > 0 => {
            let i = at(rng, len);
            let n = rng.random_range(1..=(len - i).min(64));
            data.drain(i..i + n);
        }
        5 if len > 0 => {
            let i = at(rng, len);
            let n = rng.random_range(1..=(len - i).min(64));
            let copy = data.get(i..i + n).map(<[u8]>::to_vec).unwrap_or_default();
            let j = at(rng, len + 1);
            data.splice(j..j, copy);
        }
        6 if len > 0 => data.truncate(at(rng, len)),
        _ => {
            // Splice: a prefix of this one, a suffix of the other.
            let i = at(rng, len + 1);
            let j = at(rng, other.len() + 1);
            data.truncate(i);
            data.extend_from_slice(other.get(j..).unwrap_or_default());
        }
    }
    data.truncate(MAX_LEN);
}

/// Runs `target` on mutated corpus inputs for `BUDGET`; returns the number
/// of inputs, or the path of one that made the target panic.
fn smoke(name: &str, target: Target, seed: u64) -> Result<u64, PathBuf> {
    let seeds = corpus(name);
    assert!(!seeds.is_empty(), "fuzz/corpus/{name} is empty");
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < BUDGET {
        // Each input from its own seed, so one can be made again alone.
        let mut rng = ChaCha20Rng::seed_from_u64(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let pick = |rng: &mut ChaCha20Rng| seeds.get(rng.random_range(0..seeds.len())).cloned().unwrap_or_default();
        let mut data = pick(&mut rng);
        let other = pick(&mut rng);
        for _ in 0..rng.random_range(1..=4u8) {
            mutate(&mut data, &other, &mut rng);
        }
        if std::panic::catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-smoke");
            let file = dir.join(format!("{name}-{seed}-{n}"));
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(&file, &data);
            return Err(file);
        }
        n += 1;
    }
    Ok(n)
}

#[test]
fn every_target_survives_mutations_of_its_corpus() {
    // A fixed seed by default, so CI is repeatable (the inputs are the same
    // each run; how many fit in the budget varies); `random` for new ones.
    let seed = match std::env::var("FUZZ_SMOKE_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        Ok(s) => s.parse().unwrap_or(DEFAULT_SEED),
        Err(_) => DEFAULT_SEED,
    };
    println!("fuzz smoke seed {seed} (FUZZ_SMOKE_SEED={seed} repeats it)");
    let results: Vec<(&str, Result<u64, PathBuf>)> = std::thread::scope(|s| {
        let halves: Vec<_> = [0, 1]
            .map(|h| {
                s.spawn(move || {
                    TARGETS
                        .iter()
                        .skip(h)
                        .step_by(2)
                        .map(|(name, target)| (*name, smoke(name, *target, seed)))
                        .collect::<Vec<_>>()
                })
            })
            .into_iter()
            .collect();
        halves.into_iter().flat_map(|h| h.join().unwrap_or_default()).collect()
    });
    assert_eq!(results.len(), TARGETS.len(), "a smoke thread failed");
    for (name, r) in &results {
        match r {
            Ok(n) => println!("{name}: {n} inputs in {} s, no failure", BUDGET.as_secs()),
            Err(file) => panic!("{name} failed on {} (seed {seed})", file.display()),
        }
    }
}

/// The smoke run itself can fail: a target that panics on inputs the
/// mutations easily make is caught, and the input kept.
#[test]
fn a_target_that_panics_is_caught_and_its_input_kept() {
    fn fragile(data: &[u8]) {
        assert!(!data.windows(2).any(|w| w == [0xff, 0xff]), "two 0xff bytes in a row");
    }
    let file = smoke("wire_decode", fragile, 7).expect_err("the fragile target was not caught");
    let kept = std::fs::read(&file).unwrap();
    assert!(kept.windows(2).any(|w| w == [0xff, 0xff]));
    let _ = std::fs::remove_file(file);
}
