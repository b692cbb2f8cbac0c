//! `cleanroom simulate --shards S` (issue 16, in memory): the identifiers
//! split by the keyed shard function, each shard pair running the
//! unsharded join and aggregate with its own dummies, the shares added up.
//! The result must be the plaintext computation's, and the same as the
//! unsharded run's, for S in {1, 2, 7, 16}.

use cleanroom_sim::simulate::{SimulateConfig, simulate};

fn config(shards: u32) -> SimulateConfig {
    SimulateConfig {
        holder_rows: 3_000,
        matcher_rows: 2_500,
        overlap: 0.5,
        categories: 5,
        seed: 16,
        chunk_points: 512,
        shards,
    }
}

#[test]
fn sharded_runs_equal_the_unsharded_run_and_the_plaintext() {
    let whole = simulate(&config(1)).expect("the unsharded run");
    assert!(whole.exact, "the unsharded run differs from the plaintext");
    assert_eq!(whole.shards.len(), 1);
    for shards in [2u32, 7, 16] {
        let r = simulate(&config(shards)).expect("a sharded run");
        assert!(r.exact, "{shards} shards: differs from the plaintext");
        let protocol: Vec<i64> = r.cells.iter().map(|c| c.protocol).collect();
        let unsharded: Vec<i64> = whole.cells.iter().map(|c| c.protocol).collect();
        assert_eq!(protocol, unsharded, "{shards} shards: differs from the unsharded run");
        assert_eq!(r.intersection, whole.intersection);
        assert_eq!(r.shards.len(), shards as usize);
        // The shards partition both sets and the intersection.
        assert_eq!(r.shards.iter().map(|s| s.holder_rows).sum::<usize>(), r.holder_rows);
        assert_eq!(r.shards.iter().map(|s| s.matcher_rows).sum::<usize>(), r.matcher_rows);
        assert_eq!(r.shards.iter().map(|s| s.intersection).sum::<u64>(), r.intersection);
        // Each shard's matcher sees its intersection plus its own dummies,
        // at most D_max of them.
        let d_max = r.dummy_rows / u64::from(shards);
        for s in &r.shards {
            assert!(
                s.holder_rows > 0 && s.matcher_rows > 0,
                "{shards} shards: an empty shard"
            );
            assert!(s.matched_rows_seen_by_matcher >= s.intersection);
            assert!(s.matched_rows_seen_by_matcher <= s.intersection + d_max);
        }
        assert_eq!(
            r.shards.iter().map(|s| s.matched_rows_seen_by_matcher).sum::<u64>(),
            r.matched_rows_seen_by_matcher
        );
    }
}

#[test]
fn shard_counts_out_of_range_are_refused() {
    for shards in [0u32, 4097] {
        let e = simulate(&config(shards)).expect_err("refused");
        assert!(e.to_string().contains("--shards must be between 1 and 4096"), "{e}");
    }
}
