//! The multi-key join (issue 17; docs/protocol.md, "Multi-key matching"),
//! both parties in one process, at the protocol level (the nodes do not run
//! it yet): each customer's row has `K` slots, a row matches in the lowest
//! block any of its keys matched in, `D_max` dummy rows per match pattern.
//! Checked against plaintext: each row's label, the matcher's counts per
//! block (real rows plus the dummies of the patterns whose lowest block it
//! is), and the aggregate's sums, on random cases and on the synthetic
//! data against `cleanroom_sim::oracle::truth_multi`.

mod common;

use std::collections::HashMap;

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_crypto::normalize::{IdKind, NormalizationRules};
use cleanroom_protocol::join::{
    HolderJoin, HolderPolicy, MAX_BLOCKS, MatcherJoin, MatcherPolicy, UNMATCHED, match_patterns,
};
use cleanroom_query::{CellKind, Clip, Domains, Template};
use cleanroom_sim::driver::{run_join, shared};
use cleanroom_sim::oracle::truth_multi;
use cleanroom_sim::simulate::multi_key_inputs;
use cleanroom_sim::synth::{COUNTRIES, SEGMENTS, SynthConfig, generate};
use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn holder_policy() -> HolderPolicy {
    HolderPolicy {
        peer_set: common::limits(),
        // ε = 1, δ = 10^-6: D_max = 32 per pattern.
        cardinality: ShiftedTruncatedLaplace::new(1, 1, 1_000_000).unwrap(),
    }
}

fn matcher(blocks: Vec<Vec<Vec<u8>>>, k: usize, chunk: usize) -> MatcherJoin {
    MatcherJoin::grouped(
        common::params(chunk),
        MatcherPolicy {
            peer_set: common::limits(),
            max_dummy_rows: 1000,
            block_padding: Some(ShiftedTruncatedLaplace::new(1, 1, 1000).unwrap()),
        },
        blocks,
    )
    .unwrap()
    .with_key_slots(k)
    .unwrap()
}

fn binomial(n: u64, k: u64) -> u64 {
    (1..=k).fold(1, |acc, i| acc * (n + 1 - i) / i)
}

#[test]
fn match_patterns_are_the_multisets_of_blocks() {
    for g in 1..6usize {
        for k in 1..4usize {
            let p = match_patterns(g, k).unwrap();
            // Non-empty multisets of at most k of g blocks: C(g + k, k) - 1.
            assert_eq!(p.len() as u64, binomial((g + k) as u64, k as u64) - 1, "g={g} k={k}");
            let mut seen = std::collections::HashSet::new();
            for x in &p {
                assert!(!x.is_empty() && x.len() <= k);
                assert!(x.windows(2).all(|w| w[0] <= w[1]), "{x:?} not sorted");
                assert!(x.iter().all(|b| (*b as usize) < g));
                assert!(seen.insert(x.clone()), "{x:?} twice");
            }
            // By size, then lexicographic.
            assert!(p.windows(2).all(|w| (w[0].len(), &w[0]) < (w[1].len(), &w[1])));
        }
        // One key slot: the patterns are the blocks, in order.
        let one: Vec<Vec<u32>> = (0..g as u32).map(|b| vec![b]).collect();
        assert_eq!(match_patterns(g, 1).unwrap(), one);
    }
    assert!(match_patterns(0, 2).is_err());
    assert!(match_patterns(3, 0).is_err());
    assert!(match_patterns(3, 9).is_err());
    assert!(match_patterns(MAX_BLOCKS, 2).is_err(), "too many patterns");
    // At most 4,096 pattern slots: 62 blocks of two slots (2,015
    // patterns), not 63 (2,079).
    assert_eq!(match_patterns(62, 2).unwrap().len(), 2_015);
    assert!(match_patterns(63, 2).is_err());
    assert_eq!(match_patterns(MAX_BLOCKS, 1).unwrap().len(), MAX_BLOCKS);
}

/// Customers with 0 to `k` keys of `k` kinds (`kind<j>:c-<i>`), users that
/// hold some of them (and keys no customer has) in random groups, each key
/// with at most one user; a customer's keys may be held by users of
/// different groups.
#[allow(clippy::type_complexity)]
fn random_case(
    n: usize,
    users: usize,
    groups: usize,
    k: usize,
    rng: &mut ChaCha20Rng,
) -> (Vec<Vec<Vec<u8>>>, Vec<Vec<Vec<u8>>>, HashMap<Vec<u8>, usize>) {
    let key = |j: usize, who: &str, i: usize| format!("kind{j}:{who}-{i}").into_bytes();
    let customers: Vec<Vec<Vec<u8>>> = (0..n)
        .map(|i| {
            (0..k)
                .filter(|_| !rng.next_u32().is_multiple_of(4))
                .map(|j| key(j, "c", i))
                .collect()
        })
        .collect();
    // Each user: one or two keys, of customers (any kind) or its own.
    let mut holder_of: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut blocks = vec![Vec::new(); groups];
    for u in 0..users {
        let g = rng.next_u32() as usize % groups;
        for _ in 0..1 + rng.next_u32() % 2 {
            let kind = rng.next_u32() as usize % k;
            let id = if n > 0 && !rng.next_u32().is_multiple_of(3) {
                key(kind, "c", rng.next_u32() as usize % n)
            } else {
                key(kind, "u", u)
            };
            // The first holder of a key keeps it.
            if let std::collections::hash_map::Entry::Vacant(e) = holder_of.entry(id.clone()) {
                e.insert(g);
                blocks[g].push(id);
            }
        }
    }
    (customers, blocks, holder_of)
}

#[allow(clippy::needless_range_loop)]
fn run_case(n: usize, users: usize, groups: usize, k: usize, width: usize, seed: u64) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (customers, blocks, group_of_key) = random_case(n, users, groups, k, &mut rng);
    let values: Vec<u64> = (0..n * width).map(|_| rng.next_u64() % 1000).collect();
    // Plaintext: each customer's lowest matched group, and per group the
    // sums over its customers.
    let label_of: Vec<Option<usize>> = customers
        .iter()
        .map(|keys| keys.iter().filter_map(|x| group_of_key.get(x).copied()).min())
        .collect();
    let mut truth = vec![vec![0u64; width]; groups];
    let mut inter = vec![0u64; groups];
    for (c, l) in label_of.iter().enumerate() {
        if let Some(g) = l {
            inter[*g] += 1;
            for (t, v) in truth[*g].iter_mut().zip(&values[c * width..(c + 1) * width]) {
                *t = t.wrapping_add(*v);
            }
        }
    }
    let h = HolderJoin::with_key_slots(common::params(29), holder_policy(), customers.clone(), k).unwrap();
    let m = matcher(blocks, k, 31);
    let mut rng_h = ChaCha20Rng::seed_from_u64(seed ^ 1);
    let mut rng_m = ChaCha20Rng::seed_from_u64(seed ^ 2);
    let (hj, mj, _) = run_join(h, m, &mut rng_h, &mut rng_m, |_| {}).unwrap();
    let patterns = match_patterns(groups, k).unwrap();
    assert_eq!(hj.rows(), n + patterns.len() * hj.dummy_rows() as usize);
    assert_eq!(mj.rows(), hj.rows());
    // Every customer's row carries its lowest matched group, or none.
    for (i, label) in mj.labels().iter().enumerate() {
        if let Some(c) = hj.customer_of_row(i) {
            match label_of[c] {
                Some(g) => assert_eq!(*label as usize, g, "row {i}"),
                None => assert_eq!(*label, UNMATCHED, "row {i}"),
            }
        }
    }
    // Per block: its customers plus the matching dummies of the patterns
    // whose lowest block it is.
    let d = hj.matching_dummies_per_block().to_vec();
    assert_eq!(d.len(), patterns.len());
    for g in 0..groups {
        let dummies: u64 = patterns
            .iter()
            .zip(&d)
            .filter(|(p, _)| p[0] as usize == g)
            .map(|(_, x)| *x)
            .sum();
        assert_eq!(mj.block_counts()[g], inter[g] + dummies, "block {g}");
    }
    let got = common::aggregate_per_block(&shared(hj), &mj, width, &values, &mut rng_h, &mut rng_m);
    for (g, got) in got.iter().enumerate() {
        let want: Vec<i64> = truth[g].iter().map(|x| *x as i64).collect();
        assert_eq!(*got, want, "group {g}");
    }
}

#[test]
fn multi_key_join_edge_cases() {
    // No customers; one block; customers that all lack every key.
    run_case(0, 10, 1, 2, 1, 1);
    run_case(40, 60, 1, 2, 2, 2);
    run_case(30, 0, 3, 2, 1, 3);
    // Three key kinds over four blocks.
    run_case(60, 80, 4, 3, 2, 4);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]

    #[test]
    fn multi_key_join_is_exact(
        n in 0usize..120,
        users in 0usize..160,
        groups in 1usize..5,
        k in 1usize..4,
        width in 1usize..4,
        seed in any::<u64>(),
    ) {
        run_case(n, users, groups, k, width, seed);
    }
}

#[test]
fn the_holder_refuses_shared_keys_and_too_many_keys() {
    let shared_key = vec![
        vec![b"kind0:a".to_vec(), b"kind1:x".to_vec()],
        vec![b"kind0:b".to_vec(), b"kind1:x".to_vec()],
    ];
    assert!(HolderJoin::with_key_slots(common::params(16), holder_policy(), shared_key, 2).is_err());
    let too_many = vec![vec![b"kind0:a".to_vec(), b"kind1:a".to_vec(), b"kind2:a".to_vec()]];
    assert!(HolderJoin::with_key_slots(common::params(16), holder_policy(), too_many.clone(), 2).is_err());
    assert!(HolderJoin::with_key_slots(common::params(16), holder_policy(), too_many.clone(), 0).is_err());
    assert!(HolderJoin::with_key_slots(common::params(16), holder_policy(), too_many, 9).is_err());
}

#[test]
fn both_sides_must_agree_on_the_key_slots() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let (customers, blocks, _) = random_case(20, 20, 2, 2, &mut rng);
    for (hk, mk) in [(2, 3), (3, 2), (2, 1), (1, 2)] {
        let keys: Vec<Vec<Vec<u8>>> = customers.iter().map(|c| c.iter().take(hk).cloned().collect()).collect();
        let h = HolderJoin::with_key_slots(common::params(16), holder_policy(), keys, hk).unwrap();
        let m = matcher(blocks.clone(), mk, 16);
        let mut rng_h = ChaCha20Rng::seed_from_u64(1);
        let mut rng_m = ChaCha20Rng::seed_from_u64(2);
        let mut charged = false;
        let out = run_join(h, m, &mut rng_h, &mut rng_m, |_| charged = true);
        // The holder refuses the offer, before it charges anything.
        assert!(
            matches!(
                out,
                Err(cleanroom_sim::driver::DriverError::Holder(
                    cleanroom_protocol::ProtocolError::ParameterMismatch { .. }
                ))
            ),
            "holder {hk} slots, matcher {mk}: {out:?}"
        );
        assert!(!charged, "holder {hk} slots, matcher {mk}: charged");
    }
}

#[test]
fn synthetic_data_against_the_multi_key_reference() {
    let mut data = generate(&SynthConfig {
        holder_customers: 400,
        matcher_users: 400,
        overlap: 0.6,
        categories: 4,
        seed: 17,
    });
    // Conflicting matches (users' phones swapped pairwise, so a customer's
    // e-mail and phone can point at two users in two segments), customers
    // without a usable e-mail, and phones two customers share.
    cleanroom_tests::conflicting_and_missing_keys(&mut data);
    let kinds = [IdKind::Email, IdKind::Phone];
    // The parties' inputs as `cleanroom simulate` prepares them (shared
    // keys dropped, each platform key kept for its first user); the
    // reference below is `truth_multi`, written apart from them.
    let (customers, users, _) = multi_key_inputs(&data, &NormalizationRules::v1("44"), &kinds);
    let mut order: Vec<u64> = data.bank.iter().map(|t| t.customer).collect();
    order.dedup();
    // (The synthetic transactions come grouped by customer.)
    assert_eq!(order.len(), customers.len());
    let domains = Domains {
        categories: data.categories.iter().cloned().chain(["other".to_string()]).collect(),
        segments: SEGMENTS.iter().map(|s| s.to_string()).collect(),
        countries: COUNTRIES.iter().map(|s| s.to_string()).collect(),
        key_slots: 2,
    };
    let t = Template {
        name: "t".into(),
        sql: "SELECT COUNT(DISTINCT b.customer) AS c, COUNT(*) AS n, SUM(b.amount) AS s \
              FROM bank b JOIN platform p GROUP BY p.segment"
            .into(),
        params: vec![],
        rho_micro: 1,
        min_count: 0,
        analysts: vec!["a".into()],
        clip: Clip::new(3, 20_000),
    };
    t.check(&domains).unwrap();
    let plan = t.bind("a", &[], &domains).unwrap();
    let width = plan.width();
    let cells = plan.cells();
    // The bank's values per customer: count, clipped rows, clipped spend.
    let mut per: HashMap<u64, (u64, i64)> = HashMap::new();
    for t in &data.bank {
        let e = per.entry(t.customer).or_insert((0, 0));
        e.0 += 1;
        e.1 += t.amount_cents;
    }
    let values: Vec<u64> = order
        .iter()
        .flat_map(|c| {
            let (rows, sum) = per[c];
            cells.iter().take(width).map(move |cell| match cell.kind {
                CellKind::Customers => 1,
                CellKind::Rows => rows.min(plan.clip.transactions),
                CellKind::Sum => sum.clamp(0, plan.clip.spend_cents as i64) as u64,
            })
        })
        .collect();
    // The platform's keys by segment, each kept for its first user.
    let mut blocks = vec![Vec::new(); plan.matcher_groups().len()];
    for (u, keys) in data.platform.iter().zip(users) {
        blocks[u.segment].extend(keys);
    }
    let h = HolderJoin::with_key_slots(common::params(64), holder_policy(), customers, 2).unwrap();
    let m = matcher(blocks, 2, 64);
    let mut rng_h = ChaCha20Rng::seed_from_u64(3);
    let mut rng_m = ChaCha20Rng::seed_from_u64(4);
    let (hj, mj, _) = run_join(h, m, &mut rng_h, &mut rng_m, |_| {}).unwrap();
    let want = truth_multi(&data, &plan, &kinds);
    // The case is not trivial: the reference differs from e-mail alone.
    assert_ne!(want, truth_multi(&data, &plan, &[IdKind::Email]));
    let got = common::aggregate_per_block(&shared(hj), &mj, width, &values, &mut rng_h, &mut rng_m);
    assert_eq!(got.len(), plan.matcher_groups().len());
    for (g, got) in got.iter().enumerate() {
        let got: Vec<f64> = got.iter().map(|x| *x as f64).collect();
        assert_eq!(got, want[g * width..(g + 1) * width].to_vec(), "segment {g}");
    }
}

#[test]
fn simulate_matches_on_any_key() {
    use cleanroom_sim::simulate::{SimulateConfig, simulate};
    let config = |keys: Vec<IdKind>| SimulateConfig {
        group_by_segment: true,
        keys,
        other_emails: 0.25,
        categories: 4,
        seed: 3,
        chunk_points: 256,
        ..SimulateConfig::new(1_500, 1_200)
    };
    let both = simulate(&config(vec![IdKind::Email, IdKind::Phone])).unwrap();
    assert!(both.exact, "the multi-key run differs from its plaintext");
    let email = simulate(&config(vec![IdKind::Email])).unwrap();
    assert!(email.exact);
    // The users who gave the platform another e-mail match on their phone.
    assert!(
        both.intersection > email.intersection,
        "{} vs {}",
        both.intersection,
        email.intersection
    );
    assert_eq!(both.keys, ["email", "phone"]);
    // Phone alone is a multi-key run with one slot: as exact.
    assert!(simulate(&config(vec![IdKind::Phone])).unwrap().exact);
    // Refused: a key named twice, no key, shards.
    assert!(simulate(&config(vec![IdKind::Email, IdKind::Email])).is_err());
    assert!(simulate(&config(vec![])).is_err());
    let sharded = SimulateConfig {
        shards: 2,
        ..config(vec![IdKind::Email, IdKind::Phone])
    };
    assert!(simulate(&sharded).is_err());
}

/// What the matcher receives does not depend on the dummy counts `D_p`
/// (docs/protocol.md: `D_max` dummy rows per pattern and `D_max` dummy
/// tokens per pattern slot, whatever the `D_p`): two joins of the same
/// inputs whose holders drew different `D_p` send the same number of rows,
/// frames and bytes, while the matcher's counts differ by the dummies.
#[test]
fn sizes_do_not_depend_on_the_dummy_counts() {
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    let (customers, blocks, _) = random_case(80, 90, 3, 2, &mut rng);
    let run = |seed: u64| {
        let h = HolderJoin::with_key_slots(common::params(32), holder_policy(), customers.clone(), 2).unwrap();
        let m = matcher(blocks.clone(), 2, 32);
        let mut rng_h = ChaCha20Rng::seed_from_u64(seed);
        let mut rng_m = ChaCha20Rng::seed_from_u64(99);
        run_join(h, m, &mut rng_h, &mut rng_m, |_| {}).unwrap()
    };
    let (h1, m1, t1) = run(1);
    let mut differed = false;
    for seed in 2..6 {
        let (h2, m2, t2) = run(seed);
        assert_eq!(m2.rows(), m1.rows());
        assert_eq!(t2.holder_to_matcher_bytes, t1.holder_to_matcher_bytes, "seed {seed}");
        assert_eq!(t2.holder_to_matcher_messages, t1.holder_to_matcher_messages);
        assert_eq!(t2.matcher_to_holder_bytes, t1.matcher_to_holder_bytes);
        // Same customers matched; the counts differ by the dummies only.
        assert_eq!(
            m2.matched_count() - h2.matching_dummies(),
            m1.matched_count() - h1.matching_dummies()
        );
        differed |= h2.matching_dummies_per_block() != h1.matching_dummies_per_block();
    }
    assert!(differed, "the holders never drew different dummy counts");
}
