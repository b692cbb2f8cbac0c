//! Helpers shared by the integration tests.
#![allow(dead_code)]

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_crypto::shares::Share;
use cleanroom_protocol::aggregate::{HolderAggregate, RowValues};
use cleanroom_protocol::join::{
    HolderJoin, HolderPolicy, JoinParams, MAX_SET_SIZE, MatcherJoin, MatcherPolicy, SetSizeLimits,
};

pub const COLLAB: &str = "test-collaboration";

pub fn params(chunk_points: usize) -> JoinParams {
    JoinParams {
        collaboration_id: COLLAB.to_string(),
        rules_hash: [7u8; 32],
        context: [9u8; 32],
        chunk_points,
    }
}

pub fn limits() -> SetSizeLimits {
    SetSizeLimits {
        min: 0,
        max: MAX_SET_SIZE,
    }
}

pub fn holder(ids: Vec<Vec<u8>>, chunk_points: usize) -> HolderJoin {
    HolderJoin::new(
        params(chunk_points),
        HolderPolicy {
            peer_set: limits(),
            // ε = 1, δ = 10^-6: μ = 16, D_max = 32.
            cardinality: ShiftedTruncatedLaplace::new(1, 1, 1_000_000).unwrap(),
        },
        ids,
    )
    .unwrap()
}

pub fn matcher(ids: Vec<Vec<u8>>, chunk_points: usize) -> MatcherJoin {
    MatcherJoin::new(
        params(chunk_points),
        MatcherPolicy {
            peer_set: limits(),
            max_dummy_rows: 1000,
            block_padding: None,
        },
        ids,
    )
    .unwrap()
}

/// Identifiers `prefix-0 .. prefix-(n-1)` as bytes.
pub fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    range
        .map(|i| format!("email:{prefix}-{i}@example.com").into_bytes())
        .collect()
}

/// One aggregate per block of a finished join (query `[5; 16]`, plan
/// `[4; 32]`): the holder's `values` (`width` words per customer) summed
/// over the rows the matcher labelled with each block, reconstructed.
pub fn aggregate_per_block(
    hj: &std::sync::Arc<cleanroom_protocol::join::HolderJoined>,
    mj: &cleanroom_protocol::join::MatcherJoined,
    width: usize,
    values: &[u64],
    rng_h: &mut rand_chacha::ChaCha20Rng,
    rng_m: &mut rand_chacha::ChaCha20Rng,
) -> Vec<Vec<i64>> {
    let qid = cleanroom_wire::QueryId([5u8; 16]);
    (0..mj.blocks() as u32)
        .map(|g| {
            let agg = HolderAggregate::new(
                hj.clone(),
                RowValues::new(width, values.to_vec()).unwrap(),
                qid,
                [4; 32],
                g,
            )
            .unwrap();
            let (hs, ms, _) = cleanroom_sim::driver::run_aggregate(
                agg,
                mj,
                &mj.choices_for_block(g),
                width,
                qid,
                [4; 32],
                g,
                rng_h,
                rng_m,
            )
            .unwrap();
            Share::reconstruct(&hs, &ms).unwrap()
        })
        .collect()
}
