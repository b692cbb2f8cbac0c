//! The secret scalar as signed radix-16 digits, computed without branches
//! on its value, zeroized on drop and redacted in Debug.

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Half a scalar, `h = k/2 mod l`, as 64 signed radix-16 digits `d_i` in
/// `[-8, 8]` with `h = sum d_i 16^i`: the form the fixed-window
/// multiplication reads. The points are multiplied by `h`, then doubled
/// for their encoding (`2h = k mod l`).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Digits(pub(crate) [i8; 64]);

impl std::fmt::Debug for Digits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digits(<redacted>)")
    }
}

impl Digits {
    /// The digits of `k/2 mod l` for a scalar `k` given as 32
    /// little-endian bytes, `None` unless `k` is below 2^255 (every
    /// canonical scalar, below the group order `l`, is). The halving and
    /// the recoding are the same arithmetic for every value.
    pub fn new(k: &[u8; 32]) -> Option<Self> {
        if k[31] > 127 {
            return None;
        }
        let bytes = half_mod_l(k);
        // Built in place, so that no copy of the digits is left behind.
        let mut digits = Self([0i8; 64]);
        let d = &mut digits.0;
        for (i, b) in bytes.iter().enumerate() {
            d[2 * i] = (b & 15) as i8;
            d[2 * i + 1] = ((b >> 4) & 15) as i8;
        }
        // Each digit from [0, 16) to [-8, 8): carry 1 into the next when it
        // is 8 or more. The last digit stays in [0, 8].
        for i in 0..63 {
            let carry = (d[i] + 8) >> 4;
            d[i] -= carry << 4;
            d[i + 1] += carry;
        }
        Some(digits)
    }
}

/// The group order `l = 2^252 + 27742317777372353535851937790883648493`,
/// little-endian 64-bit words.
const L: [u64; 4] = [0x5812_631a_5cf5_d3ed, 0x14de_f9de_a2f7_9cd6, 0, 0x1000_0000_0000_0000];

/// `(k + l (k mod 2)) / 2` for `k < 2^255`: a number below 2^255 whose
/// double is `k` modulo `l`, computed without branches.
fn half_mod_l(k: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut w = [0u64; 4];
    for (w, c) in w.iter_mut().zip(k.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        *w = u64::from_le_bytes(a);
    }
    let odd = 0u64.wrapping_sub(w[0] & 1);
    let mut carry = 0u128;
    for (w, l) in w.iter_mut().zip(L) {
        let s = u128::from(*w) + u128::from(l & odd) + carry;
        *w = s as u64;
        carry = s >> 64;
    }
    // k + l < 2^256: no carry out.
    let mut out = Zeroizing::new([0u8; 32]);
    for i in 0..4 {
        let high = if i < 3 { w[i + 1] << 63 } else { 0 };
        let h = (w[i] >> 1) | high;
        out[8 * i..8 * i + 8].copy_from_slice(&h.to_le_bytes());
    }
    w.zeroize();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Back from digits to bytes, carrying in ordinary integers.
    fn bytes_of(d: &Digits) -> [u8; 32] {
        let mut out = [0u8; 32];
        let mut carry = 0i32;
        let mut nibbles = [0u8; 64];
        for (n, &x) in nibbles.iter_mut().zip(d.0.iter()) {
            let v = i32::from(x) + carry;
            let low = v.rem_euclid(16);
            carry = (v - low) / 16;
            *n = low as u8;
        }
        assert_eq!(carry, 0);
        for (i, o) in out.iter_mut().enumerate() {
            *o = nibbles[2 * i] | (nibbles[2 * i + 1] << 4);
        }
        out
    }

    /// `n` pseudo-random 32-byte numbers below 2^255 (xorshift64 from
    /// `seed`).
    fn below_2_255(seed: u64, n: usize) -> Vec<[u8; 32]> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                let mut b = [0u8; 32];
                for c in b.chunks_exact_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    c.copy_from_slice(&x.to_le_bytes());
                }
                b[31] &= 0x7f;
                b
            })
            .collect()
    }

    /// `2h = k mod l`, checked with curve25519-dalek's scalars.
    #[test]
    fn halves_modulo_the_group_order() {
        use curve25519_dalek::scalar::Scalar;
        let two = Scalar::from(2u8);
        let mut cases = vec![[0u8; 32], Scalar::ONE.to_bytes(), (-Scalar::ONE).to_bytes()];
        cases.extend(below_2_255(0x0123_4567_89ab_cdef, 1000));
        for k in cases {
            let h = half_mod_l(&k);
            assert!(h[31] <= 127);
            let doubled = Scalar::from_bytes_mod_order(*h) * two;
            assert_eq!(doubled, Scalar::from_bytes_mod_order(k));
        }
    }

    #[test]
    fn digits_are_signed_radix_16_of_half_the_scalar() {
        let mut cases = vec![[0u8; 32], [0xff; 32], [0x88; 32], [0x77; 32]];
        cases[1][31] = 0x7f;
        cases[2][31] = 0x7f;
        cases.extend(below_2_255(0x1234_5678_9abc_def1, 500));
        for b in cases {
            let d = Digits::new(&b).unwrap();
            assert!(d.0[..63].iter().all(|x| (-8..8).contains(x)));
            assert!((-8..=8).contains(&d.0[63]));
            assert_eq!(bytes_of(&d), *half_mod_l(&b));
        }
        let mut big = [0u8; 32];
        big[31] = 0x80;
        assert!(Digits::new(&big).is_none());
        assert_eq!(format!("{:?}", Digits::new(&[1u8; 32]).unwrap()), "Digits(<redacted>)");
    }
}
