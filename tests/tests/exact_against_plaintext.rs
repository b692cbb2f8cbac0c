//! Both parties in one process, checked against a plaintext computation:
//! the join plus aggregate gives exactly the sums over the intersection; the
//! matcher's count is the intersection plus the sampled dummies; dummy rows
//! change no cell.

mod common;

use std::collections::HashSet;

use cleanroom_crypto::shares::Share;
use cleanroom_protocol::aggregate::{HolderAggregate, RowValues};
use cleanroom_sim::driver::{run_aggregate, run_join, shared};
use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Runs the whole protocol on `holder_ids` (with `values`, `width` words per
/// customer) and `matcher_ids`, and checks every property against plaintext.
fn check(holder_ids: Vec<Vec<u8>>, matcher_ids: Vec<Vec<u8>>, values: Vec<u64>, width: usize, seed: u64, chunk: usize) {
    let mut rng_h = ChaCha20Rng::seed_from_u64(seed);
    let mut rng_m = ChaCha20Rng::seed_from_u64(seed ^ 0x5555);

    // Plaintext reference.
    let mset: HashSet<&[u8]> = matcher_ids.iter().map(Vec::as_slice).collect();
    let mut truth = vec![0u64; width];
    let mut intersection = 0u64;
    for (k, id) in holder_ids.iter().enumerate() {
        if mset.contains(id.as_slice()) {
            intersection += 1;
            for (t, v) in truth.iter_mut().zip(&values[k * width..(k + 1) * width]) {
                *t = t.wrapping_add(*v);
            }
        }
    }
    let truth: Vec<i64> = truth.into_iter().map(|x| x as i64).collect();

    let h = common::holder(holder_ids.clone(), chunk);
    let m = common::matcher(matcher_ids.clone(), chunk);
    let mut charged = 0;
    let (hj, mj, _) = run_join(h, m, &mut rng_h, &mut rng_m, |_| charged += 1).unwrap();
    assert_eq!(charged, 1);
    let d = hj.matching_dummies();
    assert!(d <= hj.dummy_rows());
    assert_eq!(hj.rows() as u64, holder_ids.len() as u64 + hj.dummy_rows());
    assert_eq!(mj.rows(), hj.rows());
    // The matcher learns |X ∩ Y| + D, nothing less, nothing more.
    assert_eq!(mj.matched_count(), intersection + d);
    // Row by row: a matched row is a shared customer or one of the D matching dummies.
    let mut matched_dummies = 0;
    let mut matched_customers = HashSet::new();
    for (i, &e) in mj.matched().iter().enumerate() {
        match hj.customer_of_row(i) {
            None if e => matched_dummies += 1,
            Some(c) if e => {
                assert!(
                    mset.contains(holder_ids[c].as_slice()),
                    "row {i} matched a non-shared customer"
                );
                matched_customers.insert(c);
            }
            Some(c) => assert!(
                !mset.contains(holder_ids[c].as_slice()),
                "row {i}: shared customer not matched"
            ),
            None => {}
        }
    }
    assert_eq!(matched_dummies, d);
    assert_eq!(matched_customers.len() as u64, intersection);

    let mut qid = [0u8; 16];
    rng_m.fill_bytes(&mut qid);
    let agg = HolderAggregate::new(
        shared(hj),
        RowValues::new(width, values).unwrap(),
        cleanroom_wire::QueryId(qid),
        [2; 32],
        0,
    )
    .unwrap();
    let (hs, ms, _) = run_aggregate(
        agg,
        &mj,
        mj.matched(),
        width,
        cleanroom_wire::QueryId(qid),
        [2; 32],
        0,
        &mut rng_h,
        &mut rng_m,
    )
    .unwrap();
    // Exact, although D dummies were selected: dummy rows contribute nothing.
    assert_eq!(Share::reconstruct(&hs, &ms).unwrap(), truth);
}

fn random_values(rng: &mut ChaCha20Rng, n: usize, width: usize) -> Vec<u64> {
    (0..n * width)
        .map(|k| match k % 3 {
            0 => 1,
            1 => rng.next_u64() % 1_000_000,
            _ => rng.next_u64(), // full 64-bit words: sums wrap
        })
        .collect()
}

fn case(only_h: usize, only_m: usize, both: usize, width: usize, seed: u64, chunk: usize) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut h = common::ids("shared", 0..both);
    h.extend(common::ids("bank", 0..only_h));
    let mut m = common::ids("shared", 0..both);
    m.extend(common::ids("platform", 0..only_m));
    // Neither side's order reveals anything: shuffle both.
    cleanroom_crypto::rng::shuffle(&mut h, &mut rng);
    cleanroom_crypto::rng::shuffle(&mut m, &mut rng);
    let values = random_values(&mut rng, h.len(), width);
    check(h, m, values, width, seed, chunk);
}

#[test]
fn both_sets_empty() {
    case(0, 0, 0, 3, 1, 64);
}

#[test]
fn holder_empty() {
    case(0, 50, 0, 3, 2, 64);
}

#[test]
fn matcher_empty() {
    case(50, 0, 0, 3, 3, 64);
}

#[test]
fn no_overlap() {
    case(300, 200, 0, 5, 4, 64);
}

#[test]
fn full_overlap() {
    case(0, 0, 400, 5, 5, 64);
}

#[test]
fn holder_row_equal_to_nothing() {
    // One holder customer, whom the matcher does not have.
    case(1, 100, 0, 1, 6, 64);
    // One shared customer and nothing else.
    case(0, 0, 1, 1, 7, 64);
}

#[test]
fn chunk_boundaries() {
    // Sizes around chunk and OT block (128 rows) boundaries.
    for (k, total) in [127usize, 128, 129, 255, 257].into_iter().enumerate() {
        case(total / 3, total / 2, total - total / 3, 4, 100 + k as u64, 32);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20, .. ProptestConfig::default() })]

    #[test]
    fn random_sets_match_plaintext(
        n in 0usize..2000,
        m in 0usize..2000,
        overlap in 0.0f64..=1.0,
        width in 1usize..12,
        chunk in prop::sample::select(vec![16usize, 100, 1024, 16_384]),
        seed: u64,
    ) {
        let both = ((n.min(m) as f64) * overlap) as usize;
        case(n - both, m - both, both, width, seed, chunk);
    }
}
