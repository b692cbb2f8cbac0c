//! Multi-buffer ristretto255 for the private join.
//!
//! The join multiplies many points by *one* secret scalar. This crate does
//! that eight points at a time, one point per 64-bit lane of a 512-bit
//! vector, with the AVX-512 IFMA multiply-add instructions on radix-2^52
//! field elements (`ifma.rs` says why that radix), for the two hot
//! operations of the join, from bytes to bytes:
//!
//! - [`Ifma::hash_mul_encode`]: `encode(k * map(u))` for 64 uniform bytes `u`
//!   (the one-way map of RFC 9496 section 4.3.4: two Elligator maps and an
//!   addition), the hash-to-group's curve part;
//! - [`Ifma::decode_mul_encode`]: `encode(k * decode(b))` for a peer's encoding
//!   `b` (RFC 9496 section 4.3.1, strict), refusing non-canonical or invalid
//!   encodings and the identity.
//!
//! It also hashes eight identifiers at a time for the hash-to-group
//! ([`Ifma::expand_xmd_sha512_64`]: RFC 9380's `expand_message_xmd` with
//! SHA-512 and 64 output bytes, one message per 64-bit lane).
//!
//! Every lane runs the same instructions: the scalar's digits are the same
//! for all eight points, the table lookups are constant-time blends, the
//! square roots are the same exponentiation in every lane. Results are equal
//! to curve25519-dalek's, byte for byte (the tests compare them over random
//! points, scalars and edge cases, plus RFC 9496 vectors).
//!
//! The vector code runs only when the CPU has AVX-512F, AVX-512DQ and
//! AVX-512 IFMA: [`Ifma::detect`] returns the value the functions are
//! called on, or `None`, and then the caller uses curve25519-dalek one
//! point at a time (`cleanroom-crypto` does).

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
mod ifma;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod sha512;

pub use scalar::Digits;

/// Points per vector: one per 64-bit lane of a 512-bit register.
pub const LANES: usize = 8;

/// Length of an encoded ristretto255 element.
pub const POINT_LEN: usize = 32;

/// Why a peer's encoding was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointError {
    /// Not the canonical encoding of a ristretto255 element.
    Invalid,
    /// The identity element (its encoding is all zeros).
    Identity,
}

/// A refused encoding: which one (its index in the input) and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Index of the first refused encoding.
    pub index: usize,
    /// Why it was refused.
    pub error: PointError,
}

/// Proof that this process may run the vector code: the CPU has AVX-512F,
/// AVX-512DQ and AVX-512 IFMA, and `CLEANROOM_CURVE` is not set to `dalek`
/// (which keeps curve25519-dalek's one-point-at-a-time path, for
/// comparison). Only [`Ifma::detect`] makes one.
#[derive(Clone, Copy, Debug)]
pub struct Ifma(Token);

#[cfg(target_arch = "x86_64")]
type Token = ();
/// No value: on other architectures there is never an [`Ifma`].
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy, Debug)]
enum Token {}

impl Ifma {
    /// The vector code, if this process may run it (checked once).
    pub fn detect() -> Option<Self> {
        static DETECTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let ok = *DETECTED.get_or_init(|| {
            let disabled = std::env::var_os("CLEANROOM_CURVE").is_some_and(|v| v == "dalek");
            cpu_has_ifma() && !disabled
        });
        #[cfg(target_arch = "x86_64")]
        if ok {
            return Some(Self(()));
        }
        let _ = ok;
        None
    }

    /// `encode(k * map(u))` for each 64-byte uniform string `u` (RFC 9496's
    /// one-way map, as curve25519-dalek's `RistrettoPoint::from_uniform_bytes`).
    pub fn hash_mul_encode(self, uniform: &[[u8; 64]], k: &Digits) -> Vec<[u8; POINT_LEN]> {
        let mut out = Vec::with_capacity(uniform.len());
        // The map accepts every input: there is nothing to refuse.
        let _: Result<(), Refused> = self.run(Job::Hash(uniform), Some(k), &mut out);
        out
    }

    /// `encode(k * decode(b))` for each encoding `b`; the first refused
    /// encoding (non-canonical, not a point, or the identity) ends the batch.
    ///
    /// # Errors
    /// [`Refused`], with the index of the first refused encoding.
    pub fn decode_mul_encode(self, points: &[[u8; POINT_LEN]], k: &Digits) -> Result<Vec<[u8; POINT_LEN]>, Refused> {
        let mut out = Vec::with_capacity(points.len());
        self.run(Job::Decode(points), Some(k), &mut out)?;
        Ok(out)
    }

    /// `encode(2 * map(u))`: [`Ifma::hash_mul_encode`] without the
    /// multiplication. (The fused code multiplies by `k/2` and doubles
    /// while encoding; this skips the first step only.) For the benchmarks
    /// that time the map and the multiplication apart; the join always
    /// multiplies.
    pub fn map_double_encode(self, uniform: &[[u8; 64]]) -> Vec<[u8; POINT_LEN]> {
        let mut out = Vec::with_capacity(uniform.len());
        let _: Result<(), Refused> = self.run(Job::Hash(uniform), None, &mut out);
        out
    }

    /// `encode(2 * decode(b))`: [`Ifma::decode_mul_encode`] without the
    /// multiplication (as [`Ifma::map_double_encode`]), with the same
    /// checks and refusals.
    ///
    /// # Errors
    /// [`Refused`], with the index of the first refused encoding.
    pub fn decode_double_encode(self, points: &[[u8; POINT_LEN]]) -> Result<Vec<[u8; POINT_LEN]>, Refused> {
        let mut out = Vec::with_capacity(points.len());
        self.run(Job::Decode(points), None, &mut out)?;
        Ok(out)
    }

    /// RFC 9380's `expand_message_xmd(msg, dst, 64)` with SHA-512 for each
    /// message, eight messages per AVX-512 instruction (the hash-to-group's
    /// hash: its 64 bytes are what [`Ifma::hash_mul_encode`] maps); `None`
    /// for a tag that is empty or over 255 bytes.
    pub fn expand_xmd_sha512_64(self, dst: &[u8], msgs: &[&[u8]]) -> Option<Vec<[u8; 64]>> {
        if dst.is_empty() || dst.len() > 255 {
            return None;
        }
        let mut uniform = Vec::with_capacity(msgs.len());
        // Nothing to refuse: every message has an expansion.
        let _: Result<(), Refused> = self.run(
            Job::Expand {
                dst,
                msgs,
                out: &mut uniform,
            },
            None,
            &mut Vec::new(),
        );
        Some(uniform)
    }

    /// The field arithmetic's checks on extreme limbs (`ifma::field_check`):
    /// the names of those that failed.
    #[cfg(test)]
    pub(crate) fn field_check(self) -> Vec<&'static str> {
        let mut failed = Vec::new();
        let _: Result<(), Refused> = self.run(Job::FieldCheck(&mut failed), None, &mut Vec::new());
        failed
    }

    /// The one way into the vector code.
    #[cfg(target_arch = "x86_64")]
    fn run(self, job: Job<'_>, k: Option<&Digits>, out: &mut Vec<[u8; POINT_LEN]>) -> Result<(), Refused> {
        // SAFETY: `ifma::run` is compiled with `avx512f,avx512ifma,avx512dq`
        // enabled; calling it is sound exactly when the CPU has those
        // features. An `Ifma` exists only if `Ifma::detect` found them with
        // `is_x86_feature_detected!`. `ifma.rs` and `sha512.rs` (which
        // `ifma::run` calls for `Job::Expand`) have no unsafe code (the
        // crate denies it).
        #[allow(unsafe_code)]
        unsafe {
            ifma::run(job, k, out)
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn run(self, _job: Job<'_>, _k: Option<&Digits>, _out: &mut Vec<[u8; POINT_LEN]>) -> Result<(), Refused> {
        match self.0 {}
    }
}

/// Whether the CPU has what the vector code needs (AVX-512F, AVX-512DQ,
/// AVX-512 IFMA), whatever `CLEANROOM_CURVE` says.
pub fn cpu_has_ifma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512ifma")
            && std::arch::is_x86_feature_detected!("avx512dq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One batch of work for the vector code.
#[derive(Debug)]
enum Job<'a> {
    /// Uniform 64-byte strings to map, multiply and encode.
    Hash(&'a [[u8; 64]]),
    /// Peer encodings to decode, multiply and encode.
    Decode(&'a [[u8; POINT_LEN]]),
    /// Messages to expand (`expand_message_xmd`, SHA-512, 64 bytes) under
    /// a tag; no scalar.
    Expand {
        /// The domain separation tag, 1 to 255 bytes.
        dst: &'a [u8],
        /// The messages.
        msgs: &'a [&'a [u8]],
        /// Where their expansions go, in order.
        out: &'a mut Vec<[u8; 64]>,
    },
    /// Tests only: the field arithmetic on extreme limbs; the names of the
    /// failed checks go here.
    #[cfg(test)]
    FieldCheck(&'a mut Vec<&'static str>),
}

/// Byte-level checks of a peer's encoding (RFC 9496 section 4.3.1): the
/// field element is below `p` and even; all zeros is the identity. (Not a
/// full check: that needs the square root of decoding.)
///
/// # Errors
/// [`PointError::Identity`] for all zeros, [`PointError::Invalid`] for an
/// odd or non-canonical field element.
pub fn check_encoding(b: &[u8; POINT_LEN]) -> Result<(), PointError> {
    if b.iter().all(|x| *x == 0) {
        return Err(PointError::Identity);
    }
    let odd = b[0] & 1 == 1;
    let top_bit = b[31] & 0x80 != 0;
    let at_least_p = b[31] == 0x7f && b[1..31].iter().all(|x| *x == 0xff) && b[0] >= 0xed;
    if odd || top_bit || at_least_p {
        return Err(PointError::Invalid);
    }
    Ok(())
}

/// The five radix-2^52 limbs of 32 little-endian bytes, bit 255 ignored
/// (the value may be non-canonical, below 2^255): the first four below
/// `2^52`, the top one below `2^47`.
fn limbs_from_bytes(b: &[u8]) -> [u64; 5] {
    let mut w = [0u64; 4];
    for (w, c) in w.iter_mut().zip(b.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        *w = u64::from_le_bytes(a);
    }
    const M52: u64 = (1 << 52) - 1;
    const M47: u64 = (1 << 47) - 1;
    [
        w[0] & M52,
        ((w[0] >> 52) | (w[1] << 12)) & M52,
        ((w[1] >> 40) | (w[2] << 24)) & M52,
        ((w[2] >> 28) | (w[3] << 36)) & M52,
        (w[3] >> 16) & M47,
    ]
}

/// 32 little-endian bytes of canonical radix-2^52 limbs (the first four
/// below `2^52`, the top one below `2^47`, value below `p`).
fn bytes_from_limbs(l: &[u64; 5]) -> [u8; POINT_LEN] {
    let w = [
        l[0] | (l[1] << 52),
        (l[1] >> 12) | (l[2] << 40),
        (l[2] >> 24) | (l[3] << 28),
        (l[3] >> 36) | (l[4] << 16),
    ];
    let mut out = [0u8; POINT_LEN];
    for (o, w) in out.chunks_exact_mut(8).zip(w) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests;
