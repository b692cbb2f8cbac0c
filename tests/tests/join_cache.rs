//! The join cache's encodings (`HolderJoined::encode`/`decode`,
//! `MatcherJoined::encode`/`decode`): a real grouped join survives the
//! round trip part for part, and the decoders are strict: another version,
//! every strict prefix, a trailing byte, the layout from before the version
//! byte, and parts that do not fit together are all refused.

mod common;

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_protocol::join::{HolderJoined, JOIN_CACHE_VERSION, MatcherJoin, MatcherJoined, MatcherPolicy};
use cleanroom_sim::driver::run_join;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn joined() -> (HolderJoined, MatcherJoined) {
    let mut holder_ids = common::ids("s", 0..40);
    holder_ids.extend(common::ids("h", 0..25));
    let blocks = vec![
        common::ids("s", 0..15),
        common::ids("s", 15..30),
        common::ids("m", 0..9),
    ];
    let h = common::holder(holder_ids, 16);
    let m = MatcherJoin::grouped(
        common::params(16),
        MatcherPolicy {
            peer_set: common::limits(),
            max_dummy_rows: 1000,
            block_padding: Some(ShiftedTruncatedLaplace::new(1, 1, 1000).unwrap()),
        },
        blocks,
    )
    .unwrap();
    let mut rng_h = ChaCha20Rng::seed_from_u64(31);
    let mut rng_m = ChaCha20Rng::seed_from_u64(32);
    let (hj, mj, _) = run_join(h, m, &mut rng_h, &mut rng_m, |_| {}).unwrap();
    (hj, mj)
}

#[test]
fn a_cached_join_decodes_to_the_same_parts() {
    let (hj, mj) = joined();
    let bytes = hj.encode();
    assert_eq!(bytes[0], JOIN_CACHE_VERSION);
    let back = HolderJoined::decode(hj.session(), &bytes).unwrap();
    assert_eq!(back.parts(), hj.parts());
    let (_, n, d, d_max, order) = hj.parts();
    // The layout, written out: version, n, D_max, blocks, D_b each, order.
    let mut by_hand = vec![JOIN_CACHE_VERSION];
    for x in [n, d_max, d.len() as u64].iter().chain(d) {
        by_hand.extend_from_slice(&x.to_le_bytes());
    }
    for o in order {
        by_hand.extend_from_slice(&o.to_le_bytes());
    }
    assert_eq!(bytes, by_hand);

    let bytes = mj.encode();
    let mut by_hand = vec![JOIN_CACHE_VERSION];
    by_hand.extend_from_slice(&(mj.blocks() as u32).to_le_bytes());
    by_hand.extend_from_slice(&(mj.labels().len() as u64).to_le_bytes());
    for l in mj.labels() {
        by_hand.extend_from_slice(&l.to_le_bytes());
    }
    assert_eq!(bytes, by_hand);
    let back = MatcherJoined::decode(mj.session(), &bytes).unwrap();
    assert_eq!(back.labels(), mj.labels());
    assert_eq!(back.blocks(), mj.blocks());
    assert_eq!(back.block_counts(), mj.block_counts());
    assert_eq!(back.matched(), mj.matched());
}

#[test]
fn a_cached_join_that_does_not_fit_is_refused() {
    let (hj, mj) = joined();
    let s = hj.session();
    for (what, bytes) in [("holder", hj.encode()), ("matcher", mj.encode())] {
        let decode = |b: &[u8]| match what {
            "holder" => HolderJoined::decode(s, b).is_ok(),
            _ => MatcherJoined::decode(s, b).is_ok(),
        };
        assert!(decode(&bytes), "{what}");
        for cut in 0..bytes.len() {
            assert!(!decode(&bytes[..cut]), "{what}: prefix of {cut} bytes");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(!decode(&long), "{what}: a trailing byte");
        let mut other = bytes.clone();
        other[0] = JOIN_CACHE_VERSION + 1;
        assert!(!decode(&other), "{what}: another version");
        // The layout before the version byte.
        assert!(!decode(&bytes[1..]), "{what}: unversioned");
    }
    // Holder: a row order entry past the rows, and D_b over D_max.
    let mut bytes = hj.encode();
    let last = bytes.len() - 4;
    bytes[last..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(HolderJoined::decode(s, &bytes).is_err());
    let (_, _, d, d_max, _) = hj.parts();
    assert!(!d.is_empty());
    let mut bytes = hj.encode();
    bytes[25..33].copy_from_slice(&(d_max + 1).to_le_bytes());
    assert!(HolderJoined::decode(s, &bytes).is_err());
    // A block count that would need more rows than there are bytes.
    let mut bytes = hj.encode();
    bytes[17..25].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(HolderJoined::decode(s, &bytes).is_err());
    // Matcher: a label outside the blocks, zero blocks, and a row count
    // that is not the labels'.
    let mut bytes = mj.encode();
    let blocks = mj.blocks() as u32;
    bytes[13..17].copy_from_slice(&blocks.to_le_bytes());
    assert!(MatcherJoined::decode(s, &bytes).is_err());
    let mut bytes = mj.encode();
    bytes[5..13].copy_from_slice(&(mj.labels().len() as u64 - 1).to_le_bytes());
    assert!(MatcherJoined::decode(s, &bytes).is_err());
    let mut bytes = mj.encode();
    bytes[1..5].copy_from_slice(&0u32.to_le_bytes());
    assert!(MatcherJoined::decode(s, &bytes).is_err());
}
