//! The shard function: which of `S` shards an identifier belongs to, by a
//! keyed hash of its normalised form, so that shard `s` of one party only
//! ever meets shard `s` of the other (issue 16; `cleanroom simulate
//! --shards S` runs the sharded protocol in memory, the nodes do not shard
//! yet).

use ring::hmac;
use zeroize::Zeroize;

use crate::CryptoError;

/// The most shards a collaboration may be split into.
pub const MAX_SHARDS: u32 = 4096;

/// The domain tag the shard hash is computed under.
const SHARD_TAG: &[u8] = b"cleanroom-v1-shard";

/// The key both parties agree on for a collaboration's shard function
/// (32 bytes), zeroized on drop and redacted in Debug.
pub struct ShardKey(hmac::Key, [u8; 32]);

impl ShardKey {
    /// A shard key from its 32 bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, &bytes), bytes)
    }

    /// The shard of a normalised identifier among `shards`:
    /// `u64_le(HMAC-SHA256(key, "cleanroom-v1-shard" || id)[..8]) mod shards`.
    ///
    /// # Errors
    /// [`CryptoError::Shards`] unless `1 <= shards <= MAX_SHARDS`.
    pub fn shard_of(&self, normalized_id: &[u8], shards: u32) -> Result<u32, CryptoError> {
        if shards == 0 || shards > MAX_SHARDS {
            return Err(CryptoError::Shards { shards });
        }
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(SHARD_TAG);
        ctx.update(normalized_id);
        let tag = ctx.sign();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        // The bias of a 64-bit value mod at most 2^12 is below 2^-52.
        Ok((u64::from_le_bytes(first) % u64::from(shards)) as u32)
    }
}

impl Drop for ShardKey {
    fn drop(&mut self) {
        self.1.zeroize();
    }
}

impl core::fmt::Debug for ShardKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ShardKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// HMAC-SHA256 from its definition (RFC 2104) with the `sha2` crate, an
    /// implementation independent of ring's.
    fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> [u8; 32] {
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for (i, k) in key.iter().enumerate() {
            ipad[i] ^= k;
            opad[i] ^= k;
        }
        let inner = Sha256::new().chain_update(ipad).chain_update(msg).finalize();
        Sha256::new().chain_update(opad).chain_update(inner).finalize().into()
    }

    #[test]
    fn shard_is_the_keyed_hash_mod_s() {
        let key_bytes = [7u8; 32];
        let key = ShardKey::new(key_bytes);
        for i in 0..500u32 {
            let id = format!("email:user{i}@example.com");
            let mut msg = SHARD_TAG.to_vec();
            msg.extend_from_slice(id.as_bytes());
            let tag = hmac_sha256(&key_bytes, &msg);
            let v = u64::from_le_bytes(tag[..8].try_into().unwrap());
            for s in [1u32, 2, 7, 16, 4096] {
                assert_eq!(key.shard_of(id.as_bytes(), s).unwrap(), (v % u64::from(s)) as u32);
            }
        }
        assert_eq!(key.shard_of(b"x", 0), Err(CryptoError::Shards { shards: 0 }));
        assert_eq!(key.shard_of(b"x", 4097), Err(CryptoError::Shards { shards: 4097 }));
        assert_eq!(format!("{key:?}"), "ShardKey(<redacted>)");
    }

    /// Shards are about even: 16,000 identifiers in 16 shards, each within
    /// 6 standard deviations of 1,000.
    #[test]
    fn shards_are_balanced() {
        let key = ShardKey::new([9u8; 32]);
        let mut counts = [0u32; 16];
        for i in 0..16_000u32 {
            let s = key.shard_of(format!("phone:+4479{i:08}").as_bytes(), 16).unwrap();
            counts[s as usize] += 1;
        }
        // sd = sqrt(16000 * 1/16 * 15/16) ~ 30.6
        assert!(counts.iter().all(|c| (817..=1183).contains(c)), "{counts:?}");
    }
}
