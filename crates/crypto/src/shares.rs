//! Additive secret shares in Z_{2^64}: each cell is split into two words
//! that add up (wrapping) to its value, read back as a two's-complement i64.
//! A cell may also be shared in a smaller ring `Z_{2^b}` (its words then
//! keep their low `b` bits, [`Share::reduce_bits`]; the sum is read back
//! with `cleanroom_wire::signed_in_bits`).

use core::fmt;

use rand_core::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// `x mod 2^bits`, for `bits` from 1 to 64 (64 and above keep `x`).
pub fn low_bits(x: u64, bits: u8) -> u64 {
    if bits >= 64 { x } else { x & ((1u64 << bits) - 1) }
}

/// One party's share of a vector of cells.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Share(Vec<u64>);

impl Share {
    /// A share of `w` zero words.
    pub fn zero(w: usize) -> Self {
        Self(vec![0; w])
    }

    /// Wraps words (from the protocol's accumulators or the wire).
    pub fn from_words(words: Vec<u64>) -> Self {
        Self(words)
    }

    /// Splits cleartext values into two random shares.
    pub fn split<R: RngCore>(values: &[i64], rng: &mut R) -> (Self, Self) {
        let a: Vec<u64> = values.iter().map(|_| rng.next_u64()).collect();
        let b: Vec<u64> = values
            .iter()
            .zip(&a)
            .map(|(v, a)| (*v as u64).wrapping_sub(*a))
            .collect();
        (Self(a), Self(b))
    }

    /// The number of cells.
    pub fn width(&self) -> usize {
        self.0.len()
    }

    /// The words, for sending to the analyst.
    pub fn words(&self) -> &[u64] {
        &self.0
    }

    /// Adds `delta` (e.g. noise) to each cell, wrapping.
    ///
    /// # Panics
    /// Never; extra or missing deltas are ignored beyond the shorter length.
    pub fn add_signed(&mut self, delta: &[i64]) {
        for (w, d) in self.0.iter_mut().zip(delta) {
            *w = w.wrapping_add(*d as u64);
        }
    }

    /// Reduces each cell mod `2^b` for its `b` in `bits` (cells beyond
    /// `bits` are left as they are).
    pub fn reduce_bits(&mut self, bits: &[u8]) {
        for (w, b) in self.0.iter_mut().zip(bits) {
            *w = low_bits(*w, *b);
        }
    }

    /// Adds another share of the same width to this one, cell by cell
    /// (wrapping, in `Z_{2^64}`); `false`, and nothing changed, if the
    /// widths differ.
    #[must_use]
    pub fn add(&mut self, other: &Share) -> bool {
        if self.0.len() != other.0.len() {
            return false;
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a = a.wrapping_add(*b);
        }
        true
    }

    /// Reconstructs the cells from two shares, or `None` if their widths differ.
    pub fn reconstruct(a: &Share, b: &Share) -> Option<Vec<i64>> {
        if a.0.len() != b.0.len() {
            return None;
        }
        Some(a.0.iter().zip(&b.0).map(|(x, y)| x.wrapping_add(*y) as i64).collect())
    }
}

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Share {{ width: {}, words: <redacted> }}", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_wire::signed_in_bits;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    proptest! {
        #[test]
        fn split_and_reconstruct(values in proptest::collection::vec(any::<i64>(), 0..50), seed: u64, noise in proptest::collection::vec(-1000i64..1000, 50)) {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let (a, mut b) = Share::split(&values, &mut rng);
            prop_assert_eq!(Share::reconstruct(&a, &b).unwrap(), values.clone());
            b.add_signed(&noise);
            let want: Vec<i64> = values.iter().zip(&noise).map(|(v, n)| v.wrapping_add(*n)).collect();
            prop_assert_eq!(Share::reconstruct(&a, &b).unwrap(), want);
        }
    }

    proptest! {
        /// Shares reduced mod 2^b add up, mod 2^b, to any value of the
        /// b-bit signed range, whatever the 64-bit shares were.
        #[test]
        fn narrow_shares_read_back_signed(bits in 1u8..=64, v: i64, seed: u64, noise in -1000i64..1000) {
            let (lo, hi) = if bits == 64 {
                (i64::MIN, i64::MAX)
            } else {
                (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
            };
            // v in the signed range, and the noise only when v + noise is too.
            let v = if bits == 64 { v } else { v.rem_euclid(1i64 << bits) + lo };
            let noise = if v.checked_add(noise).is_some_and(|x| (lo..=hi).contains(&x)) { noise } else { 0 };
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let (mut a, mut b) = Share::split(&[v], &mut rng);
            a.add_signed(&[noise]);
            a.reduce_bits(&[bits]);
            b.reduce_bits(&[bits]);
            prop_assert!(bits == 64 || (a.words()[0] >> bits == 0 && b.words()[0] >> bits == 0));
            let got = signed_in_bits(a.words()[0].wrapping_add(b.words()[0]), bits);
            prop_assert_eq!(got, v + noise);
        }
    }

    #[test]
    fn low_bits_examples() {
        assert_eq!(low_bits(0x1234, 8), 0x34);
        assert_eq!(low_bits(u64::MAX, 64), u64::MAX);
        assert_eq!(low_bits(u64::MAX, 1), 1);
    }

    #[test]
    fn widths_must_match_and_debug_redacts() {
        assert!(Share::reconstruct(&Share::zero(2), &Share::zero(3)).is_none());
        let s = Share::from_words(vec![123_456_789]);
        assert!(!format!("{s:?}").contains("123456789"));
    }
}
