//! `cleanroom simulate --shards S` (issue 16, in memory): the identifiers
//! split by the keyed shard function, each shard pair running the
//! unsharded join and aggregate with its own dummies, the shares added up.
//! The result must be the plaintext computation's, and the same as the
//! unsharded run's, for S in {1, 2, 7, 16}, ungrouped and grouped by the
//! platform's segment (a block per segment, an aggregate per segment).

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
        group_by_segment: false,
        keys: vec![cleanroom_crypto::normalize::IdKind::Email],
        other_emails: 0.0,
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

/// Grouped by the platform users' segment: a padded block per segment in
/// each shard's join and an aggregate per segment, the shards' shares of
/// each segment added up. Every cell equals the plaintext computation per
/// segment and the unsharded grouped run's, for S in {1, 2, 7, 16}; and
/// the segments' cells add up to the ungrouped run's (the segments
/// partition the platform's users).
#[test]
fn grouped_sharded_runs_equal_the_unsharded_run_and_the_plaintext() {
    let grouped = |shards| SimulateConfig {
        group_by_segment: true,
        ..config(shards)
    };
    let whole = simulate(&grouped(1)).expect("the unsharded grouped run");
    assert!(whole.exact, "the unsharded grouped run differs from the plaintext");
    let ungrouped = simulate(&config(1)).expect("the ungrouped run");
    let width = ungrouped.cells.len();
    assert_eq!(whole.cells.len() % width, 0);
    let segments = whole.cells.len() / width;
    assert!(segments > 1);
    for (k, cell) in ungrouped.cells.iter().enumerate() {
        let sum: i64 = (0..segments).map(|g| whole.cells[g * width + k].protocol).sum();
        assert_eq!(sum, cell.protocol, "{}: segments do not add up", cell.name);
    }
    // Several segments hold shared customers, so the grouping is exercised.
    let nonzero = (0..segments).filter(|g| whole.cells[g * width].plaintext > 0).count();
    assert!(nonzero > 1, "only {nonzero} segment(s) with shared customers");
    for shards in [2u32, 7, 16] {
        let r = simulate(&grouped(shards)).expect("a grouped sharded run");
        assert!(r.exact, "{shards} shards, grouped: differs from the plaintext");
        let got: Vec<(&str, i64)> = r.cells.iter().map(|c| (c.name.as_str(), c.protocol)).collect();
        let want: Vec<(&str, i64)> = whole.cells.iter().map(|c| (c.name.as_str(), c.protocol)).collect();
        assert_eq!(got, want, "{shards} shards, grouped: differs from the unsharded run");
        assert_eq!(r.shards.len(), shards as usize);
        assert_eq!(r.shards.iter().map(|s| s.matcher_rows).sum::<usize>(), r.matcher_rows);
        assert_eq!(r.shards.iter().map(|s| s.intersection).sum::<u64>(), r.intersection);
        // Each shard's matcher sees its intersection plus at most D_max
        // dummies per segment block.
        let d_max = r.dummy_rows / u64::from(shards);
        assert_eq!(r.dummy_rows, whole.dummy_rows * u64::from(shards));
        for s in &r.shards {
            assert!(s.matched_rows_seen_by_matcher >= s.intersection);
            assert!(s.matched_rows_seen_by_matcher <= s.intersection + d_max);
        }
    }
}
