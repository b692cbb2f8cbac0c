//! Secret scalars: random from a CSPRNG, zeroized on drop, redacted in Debug.

use core::fmt;

use curve25519_dalek::ristretto::RistrettoPoint;
use curve25519_dalek::scalar::Scalar;
use rand_core::{CryptoRng, RngCore};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A secret exponent (`kp`, `kb`, a dummy's `t_d`, a base-OT secret).
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretScalar(Scalar);

impl SecretScalar {
    /// A uniformly random non-zero scalar (64 random bytes reduced mod l).
    pub fn random<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        loop {
            let mut wide = [0u8; 64];
            rng.fill_bytes(&mut wide);
            let s = Scalar::from_bytes_mod_order_wide(&wide);
            wide.zeroize();
            if s != Scalar::ZERO {
                return Self(s);
            }
        }
    }

    /// A secret from a given non-zero scalar (published test vectors use
    /// known ones); `None` for zero.
    pub fn from_scalar(s: Scalar) -> Option<Self> {
        (s != Scalar::ZERO).then_some(Self(s))
    }

    /// The scalar itself, for arithmetic.
    pub fn expose(&self) -> &Scalar {
        &self.0
    }

    /// `k * G`.
    pub fn public(&self) -> RistrettoPoint {
        RistrettoPoint::mul_base(&self.0)
    }
}

impl fmt::Debug for SecretScalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretScalar(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn debug_is_redacted_and_keys_differ() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let a = SecretScalar::random(&mut rng);
        let b = SecretScalar::random(&mut rng);
        assert_ne!(a.expose(), b.expose());
        let shown = format!("{a:?}");
        assert!(!shown.contains(&hex::encode(a.expose().to_bytes())));
        assert!(shown.contains("redacted"));
    }
}
