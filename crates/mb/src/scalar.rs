//! The secret scalar as signed radix-16 digits, computed without branches
//! on its value, zeroized on drop and redacted in Debug.

use zeroize::{Zeroize, ZeroizeOnDrop};

/// A scalar `k` as 64 signed radix-16 digits `d_i` in `[-8, 8]` with
/// `k = sum d_i 16^i`: the form the fixed-window multiplication reads.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Digits(pub(crate) [i8; 64]);

impl std::fmt::Debug for Digits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Digits(<redacted>)")
    }
}

impl Digits {
    /// The digits of a scalar given as 32 little-endian bytes, `None`
    /// unless it is below 2^255 (every canonical scalar, below the group
    /// order, is). The recoding is the same arithmetic for every value.
    pub fn new(bytes: &[u8; 32]) -> Option<Self> {
        if bytes[31] > 127 {
            return None;
        }
        let mut d = [0i8; 64];
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
        Some(Self(d))
    }
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

    #[test]
    fn digits_are_signed_radix_16_of_the_scalar() {
        let mut cases = vec![[0u8; 32], [0xff; 32], [0x88; 32], [0x77; 32]];
        cases[1][31] = 0x7f;
        cases[2][31] = 0x7f;
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..500 {
            let mut b = [0u8; 32];
            for c in b.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.copy_from_slice(&x.to_le_bytes());
            }
            b[31] &= 0x7f;
            cases.push(b);
        }
        for b in cases {
            let d = Digits::new(&b).unwrap();
            assert!(d.0[..63].iter().all(|x| (-8..8).contains(x)));
            assert!((-8..=8).contains(&d.0[63]));
            assert_eq!(bytes_of(&d), b);
        }
        let mut big = [0u8; 32];
        big[31] = 0x80;
        assert!(Digits::new(&big).is_none());
        assert_eq!(format!("{:?}", Digits::new(&[1u8; 32]).unwrap()), "Digits(<redacted>)");
    }
}
