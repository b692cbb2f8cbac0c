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
