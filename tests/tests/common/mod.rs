//! Helpers shared by the integration tests.
#![allow(dead_code)]

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
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
