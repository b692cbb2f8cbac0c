//! Additive secret shares in Z_{2^64}: each cell is split into two words
//! that add up (wrapping) to its value, read back as a two's-complement i64.

use core::fmt;

use rand_core::RngCore;
use zeroize::{Zeroize, ZeroizeOnDrop};

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

    #[test]
    fn widths_must_match_and_debug_redacts() {
        assert!(Share::reconstruct(&Share::zero(2), &Share::zero(3)).is_none());
        let s = Share::from_words(vec![123_456_789]);
        assert!(!format!("{s:?}").contains("123456789"));
    }
}
