//! The join in blocks (matcher-side GROUP BY), both parties in one process:
//! for random sets with random matcher labels, each group's OT batch gives
//! exactly the sums over the customers the matcher has in that group; the
//! matcher's count per block is the block's intersection plus its dummies;
//! padding matches nothing.

mod common;

use std::collections::HashMap;

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_protocol::join::{MatcherJoin, MatcherPolicy};
use cleanroom_sim::driver::{run_join, shared};
use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

#[allow(clippy::needless_range_loop)]
fn run_case(n: usize, m: usize, shared_n: usize, groups: usize, width: usize, seed: u64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut holder_ids = common::ids("s", 0..shared_n);
    holder_ids.extend(common::ids("h", 0..n));
    cleanroom_crypto::rng::shuffle(&mut holder_ids, &mut rng);
    let values: Vec<u64> = (0..holder_ids.len() * width).map(|_| rng.next_u64() % 1000).collect();
    // The matcher: shared users and its own, each with a random group.
    let mut matcher: Vec<(Vec<u8>, usize)> = common::ids("s", 0..shared_n)
        .into_iter()
        .chain(common::ids("m", 0..m))
        .map(|id| (id, (rng.next_u32() as usize) % groups))
        .collect();
    cleanroom_crypto::rng::shuffle(&mut matcher, &mut rng);
    let group_of: HashMap<Vec<u8>, usize> = matcher.iter().cloned().collect();
    let mut blocks = vec![Vec::new(); groups];
    for (id, g) in &matcher {
        blocks[*g].push(id.clone());
    }
    // Plaintext: per group, sums over the holder's customers in that group.
    let mut truth = vec![vec![0u64; width]; groups];
    let mut inter = vec![0u64; groups];
    for (k, id) in holder_ids.iter().enumerate() {
        if let Some(g) = group_of.get(id) {
            inter[*g] += 1;
            for (t, v) in truth[*g].iter_mut().zip(&values[k * width..(k + 1) * width]) {
                *t = t.wrapping_add(*v);
            }
        }
    }
    let h = common::holder(holder_ids.clone(), 37);
    let mj = MatcherJoin::grouped(
        common::params(37),
        MatcherPolicy {
            peer_set: common::limits(),
            max_dummy_rows: 1000,
            block_padding: Some(ShiftedTruncatedLaplace::new(1, 1, 1000).unwrap()),
        },
        blocks,
    )
    .unwrap();
    let mut rng_h = ChaCha20Rng::seed_from_u64(seed ^ 1);
    let mut rng_m = ChaCha20Rng::seed_from_u64(seed ^ 2);
    let (hj, mj, _) = run_join(h, mj, &mut rng_h, &mut rng_m, |_| {}).unwrap();
    assert_eq!(mj.blocks(), groups);
    assert_eq!(hj.rows(), holder_ids.len() + groups * hj.dummy_rows() as usize);
    let d = hj.matching_dummies_per_block().to_vec();
    for g in 0..groups {
        assert_eq!(mj.block_counts()[g], inter[g] + d[g], "block {g}");
    }
    // Every matched customer row carries its own group's label.
    for (i, label) in mj.labels().iter().enumerate() {
        if let Some(c) = hj.customer_of_row(i) {
            match group_of.get(&holder_ids[c]) {
                Some(g) => assert_eq!(*label as usize, *g),
                None => assert_eq!(*label, cleanroom_protocol::join::UNMATCHED),
            }
        }
    }
    let got = common::aggregate_per_block(&shared(hj), &mj, width, &values, &mut rng_h, &mut rng_m);
    assert_eq!(got.len(), groups);
    for (g, got) in got.iter().enumerate() {
        let want: Vec<i64> = truth[g].iter().map(|x| *x as i64).collect();
        assert_eq!(*got, want, "group {g}");
    }
}

#[test]
fn grouped_join_edge_cases() {
    run_case(0, 0, 0, 1, 1, 1);
    run_case(10, 10, 30, 3, 2, 2);
    // A group nobody is in, and a group with everyone.
    run_case(50, 0, 100, 5, 3, 3);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn grouped_join_matches_plaintext(n in 0usize..400, m in 0usize..400, shared_n in 0usize..400, groups in 1usize..6, width in 1usize..5, seed: u64) {
        run_case(n, m, shared_n, groups, width, seed);
    }
}
