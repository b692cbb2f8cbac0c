//! The operators' Ed25519 policy keys (ring): generating one, signing a
//! policy's message with it, verifying a signature. What is signed (the
//! template digests) is `cleanroom_query::policy`'s; this module only
//! signs bytes.

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use zeroize::Zeroizing;

use crate::CryptoError;

/// An operator's Ed25519 policy key. Its Debug shows the public key only.
/// (ring keeps the private key inside `Ed25519KeyPair` and offers no way to
/// wipe it, nor the buffer `generate_pkcs8` returns; the copy of the PKCS#8
/// bytes this module hands out is wiped on drop.)
pub struct PolicyKey {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let public: String = self.public_key().iter().map(|b| format!("{b:02x}")).collect();
        write!(f, "PolicyKey {{ public: {public}, private: <redacted> }}")
    }
}

impl PolicyKey {
    /// A fresh key from the OS generator, with its PKCS#8 encoding (to
    /// store; this copy is wiped on drop, ring's own is not).
    ///
    /// # Errors
    /// [`CryptoError::Randomness`] if the OS generator fails.
    pub fn generate() -> Result<(Zeroizing<Vec<u8>>, Self), CryptoError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| CryptoError::Randomness)?;
        let der = Zeroizing::new(pkcs8.as_ref().to_vec());
        let key = Self::from_pkcs8(&der)?;
        Ok((der, key))
    }

    /// The key from its PKCS#8 encoding.
    ///
    /// # Errors
    /// [`CryptoError::BadPolicyKey`].
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, CryptoError> {
        Ed25519KeyPair::from_pkcs8(der)
            .map(|pair| Self { pair })
            .map_err(|_| CryptoError::BadPolicyKey)
    }

    /// The public key (32 bytes).
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        let pk = self.pair.public_key().as_ref();
        if let Some(src) = pk.get(..32) {
            out.copy_from_slice(src);
        }
        out
    }

    /// The Ed25519 signature of `message` (deterministic).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        let sig = self.pair.sign(message);
        if let Some(src) = sig.as_ref().get(..64) {
            out.copy_from_slice(src);
        }
        out
    }
}

/// Checks an Ed25519 signature of `message` under `public_key`.
///
/// # Errors
/// [`CryptoError::BadSignature`] (also for a key or signature of the
/// wrong length).
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> Result<(), CryptoError> {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(message, signature)
        .map_err(|_| CryptoError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8032, section 7.1, TEST 2 (one-byte message).
    #[test]
    fn rfc8032_test_vector_verifies_and_a_flipped_bit_does_not() {
        let unhex = |s: &str| -> Vec<u8> {
            (0..s.len() / 2)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect()
        };
        let public = unhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c");
        let message = unhex("72");
        let mut sig = unhex(
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        );
        verify(&public, &message, &sig).unwrap();
        sig[0] ^= 1;
        assert_eq!(verify(&public, &message, &sig), Err(CryptoError::BadSignature));
    }

    #[test]
    fn a_generated_key_signs_what_its_public_key_verifies() {
        let (der, key) = PolicyKey::generate().unwrap();
        let again = PolicyKey::from_pkcs8(&der).unwrap();
        assert_eq!(key.public_key(), again.public_key());
        let sig = key.sign(b"policy");
        verify(&key.public_key(), b"policy", &sig).unwrap();
        assert!(verify(&key.public_key(), b"policy!", &sig).is_err());
        assert!(!format!("{key:?}").contains(&format!("{:?}", &der[..])));
        assert_eq!(
            PolicyKey::from_pkcs8(b"not a key").err(),
            Some(CryptoError::BadPolicyKey)
        );
    }
}
