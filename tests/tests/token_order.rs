//! PROTOCOL.md, "the one thing that must not stream": the holder must
//! return `E` in an order independent of the order in which the matcher sent
//! its tokens, shuffled over the whole set, not per chunk and not in arrival
//! order.
//!
//! The test plays the matcher itself. It sends `A_j = r_j * A_0` for known
//! scalars `r_j`, in order `j = 0, 1, ...`. The honest holder returns
//! `E ⊇ {kb * A_j}`; since `kb * A_j = r_j * (kb * A_0)`, the test can find
//! `kb * A_0` in `E` and then the position of every `kb * A_j`, i.e. the
//! permutation from arrival order to `E` order, without knowing `kb`.

mod common;

use std::collections::HashMap;

use cleanroom_wire::{MatcherKey, Message, PointChunk};
use curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT;
use curve25519_dalek::ristretto::CompressedRistretto;
use curve25519_dalek::scalar::Scalar;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

const M: usize = 600;
const CHUNK: usize = 40;

/// For each of the matcher's tokens in arrival order, its position in `E`.
fn permutation(seed: u64) -> Vec<usize> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let matcher = common::matcher(common::ids("y", 0..M), CHUNK);
    let holder = common::holder(common::ids("x", 0..50), CHUNK);
    let (offered, offer) = matcher.offer(&mut rng).unwrap();
    let (mut h, accept) = holder
        .on_offer(&offer.encode().unwrap(), &mut rng)
        .unwrap()
        .charge_recorded();
    let session = offered.on_accept(&accept.encode().unwrap()).unwrap().session();

    let a0 = Scalar::from(rng.next_u64()) * RISTRETTO_BASEPOINT_POINT;
    let r: Vec<Scalar> = (0..M).map(|_| Scalar::from(rng.next_u64() | 1)).collect();
    let key = Message::MatcherKey(MatcherKey {
        session,
        key: (Scalar::from(12345u64) * RISTRETTO_BASEPOINT_POINT)
            .compress()
            .to_bytes(),
    });
    h.handle(&key.encode().unwrap()).unwrap();
    for (seq, js) in (0..M).collect::<Vec<_>>().chunks(CHUNK).enumerate() {
        let points: Vec<u8> = js.iter().flat_map(|j| (r[*j] * a0).compress().to_bytes()).collect();
        let msg = Message::MatcherTokens(PointChunk {
            session,
            seq: seq as u32,
            points,
        });
        h.handle(&msg.encode().unwrap()).unwrap();
    }
    let mut e: Vec<[u8; 32]> = Vec::new();
    while let Some(msg) = h.poll_transmit() {
        if let Message::HolderTokens(c) = msg {
            e.extend(c.iter().map(|p| <[u8; 32]>::try_from(p).unwrap()));
        }
    }
    assert_eq!(e.len(), M + 32);
    let pos: HashMap<[u8; 32], usize> = e.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    // Find Y = kb * a0: for the X in E that is kb * A_0 = r_0 * Y, the points
    // r_1 * Y and r_2 * Y are in E too (by chance otherwise: probability ~0).
    let r0_inv = r[0].invert();
    let y = e
        .iter()
        .map(|p| r0_inv * CompressedRistretto(*p).decompress().unwrap())
        .find(|y| {
            pos.contains_key(&(r[1] * y).compress().to_bytes()) && pos.contains_key(&(r[2] * y).compress().to_bytes())
        })
        .expect("kb * A_0 is in E");
    r.iter().map(|rj| pos[&(rj * y).compress().to_bytes()]).collect()
}

fn spearman(perm: &[usize]) -> f64 {
    // Positions in E are distinct, so rank correlation is Pearson on ranks.
    let n = perm.len() as f64;
    let mut ranked: Vec<(usize, usize)> = perm.iter().copied().enumerate().collect();
    ranked.sort_by_key(|(_, p)| *p);
    let mut rank = vec![0f64; perm.len()];
    for (k, (j, _)) in ranked.into_iter().enumerate() {
        rank[j] = k as f64;
    }
    let mean = (n - 1.0) / 2.0;
    let cov: f64 = rank
        .iter()
        .enumerate()
        .map(|(j, r)| (j as f64 - mean) * (r - mean))
        .sum();
    let var: f64 = (0..perm.len()).map(|j| (j as f64 - mean).powi(2)).sum();
    cov / var
}

/// Share of tokens that come back in the same chunk number they were sent in.
fn same_chunk(perm: &[usize]) -> f64 {
    let same = perm.iter().enumerate().filter(|(j, p)| j / CHUNK == *p / CHUNK).count();
    same as f64 / perm.len() as f64
}

#[test]
fn returned_token_order_is_independent_of_arrival_order() {
    for seed in [1, 2, 3] {
        let perm = permutation(seed);
        let rho = spearman(&perm);
        let same = same_chunk(&perm);
        // Uniform shuffle: rho ~ N(0, 1/M) (sd 0.04), same-chunk share ~ 1/16.
        assert!(rho.abs() < 0.2, "seed {seed}: rank correlation {rho}");
        assert!(same < 0.2, "seed {seed}: {same} of tokens came back in their own chunk");
        // Different sessions shuffle differently.
        assert_ne!(perm, permutation(seed + 100));
    }
}

#[test]
fn the_statistics_would_catch_arrival_order_and_per_chunk_shuffles() {
    // Arrival order.
    let identity: Vec<usize> = (0..M).collect();
    assert!(spearman(&identity) > 0.99);
    assert!(same_chunk(&identity) > 0.99);
    // Shuffled only within chunks.
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let mut per_chunk = identity.clone();
    for c in per_chunk.chunks_mut(CHUNK) {
        cleanroom_crypto::rng::shuffle(c, &mut rng);
    }
    assert!(spearman(&per_chunk) > 0.9);
    assert!(same_chunk(&per_chunk) > 0.99);
}

/// The grouped join (platform GROUP BY): every token comes back inside its
/// own block's range of `E` (blocks in order, each `|block| + D_max` long),
/// in an order unrelated to the order it was sent in, and the block's
/// `D_max` dummy tokens are shuffled in with the real ones, not appended.
#[test]
fn grouped_tokens_stay_in_their_block_shuffled_with_the_dummies() {
    use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
    use cleanroom_protocol::join::{MatcherJoin, MatcherPolicy};

    let mut rng = ChaCha20Rng::seed_from_u64(77);
    let blocks: Vec<Vec<Vec<u8>>> = (0..3).map(|b| common::ids(&format!("y{b}"), 0..200)).collect();
    let matcher = MatcherJoin::grouped(
        common::params(CHUNK),
        MatcherPolicy {
            peer_set: common::limits(),
            max_dummy_rows: 1000,
            block_padding: Some(ShiftedTruncatedLaplace::new(1, 1, 1_000_000).unwrap()),
        },
        blocks,
    )
    .unwrap();
    let holder = common::holder(common::ids("x", 0..50), CHUNK);
    let (offered, offer) = matcher.offer(&mut rng).unwrap();
    let sizes = match &offer {
        Message::JoinOffer(o) => o.blocks.clone(),
        other => panic!("{other:?}"),
    };
    let m: usize = sizes.iter().sum::<u64>() as usize;
    let (mut h, accept) = holder
        .on_offer(&offer.encode().unwrap(), &mut rng)
        .unwrap()
        .charge_recorded();
    let session = offered.on_accept(&accept.encode().unwrap()).unwrap().session();
    let a0 = Scalar::from(rng.next_u64()) * RISTRETTO_BASEPOINT_POINT;
    let r: Vec<Scalar> = (0..m).map(|_| Scalar::from(rng.next_u64() | 1)).collect();
    let key = Message::MatcherKey(MatcherKey {
        session,
        key: (Scalar::from(54321u64) * RISTRETTO_BASEPOINT_POINT)
            .compress()
            .to_bytes(),
    });
    h.handle(&key.encode().unwrap()).unwrap();
    for (seq, js) in (0..m).collect::<Vec<_>>().chunks(CHUNK).enumerate() {
        let points: Vec<u8> = js.iter().flat_map(|j| (r[*j] * a0).compress().to_bytes()).collect();
        let msg = Message::MatcherTokens(PointChunk {
            session,
            seq: seq as u32,
            points,
        });
        h.handle(&msg.encode().unwrap()).unwrap();
    }
    let mut e: Vec<[u8; 32]> = Vec::new();
    while let Some(msg) = h.poll_transmit() {
        if let Message::HolderTokens(c) = msg {
            e.extend(c.iter().map(|p| <[u8; 32]>::try_from(p).unwrap()));
        }
    }
    let d_max = 32usize;
    assert_eq!(e.len(), m + sizes.len() * d_max);
    let pos: HashMap<[u8; 32], usize> = e.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let r0_inv = r[0].invert();
    let y = e
        .iter()
        .map(|p| r0_inv * CompressedRistretto(*p).decompress().unwrap())
        .find(|y| {
            pos.contains_key(&(r[1] * y).compress().to_bytes()) && pos.contains_key(&(r[2] * y).compress().to_bytes())
        })
        .expect("kb * A_0 is in E");
    let mut is_real = vec![false; e.len()];
    let (mut sent_start, mut e_start) = (0usize, 0usize);
    for (b, size) in sizes.iter().enumerate() {
        let size = *size as usize;
        let range = e_start..e_start + size + d_max;
        let mut within = Vec::with_capacity(size);
        for rj in &r[sent_start..sent_start + size] {
            let p = pos[&(rj * y).compress().to_bytes()];
            assert!(range.contains(&p), "block {b}: a token left its block");
            is_real[p] = true;
            within.push(p - e_start);
        }
        // Within the block: positions unrelated to the order sent.
        let mut order: Vec<usize> = (0..within.len()).collect();
        order.sort_by_key(|k| within[*k]);
        let mut rank = vec![0usize; within.len()];
        for (k, j) in order.into_iter().enumerate() {
            rank[j] = k;
        }
        let rho = spearman(&rank);
        assert!(rho.abs() < 0.25, "block {b}: rank correlation {rho}");
        // The dummies: D_max of them, spread over the block.
        let dummies: Vec<usize> = range.clone().filter(|p| !is_real[*p]).map(|p| p - e_start).collect();
        assert_eq!(dummies.len(), d_max, "block {b}");
        let mean = dummies.iter().sum::<usize>() as f64 / d_max as f64 / (size + d_max) as f64;
        assert!(
            (0.3..0.7).contains(&mean),
            "block {b}: dummies at mean relative position {mean}"
        );
        sent_start += size;
        e_start += size + d_max;
    }
}
