#![forbid(unsafe_code)]
//! The cryptographic building blocks of the clean room, with no I/O:
//!
//! - [`h2g`]: `hash_to_ristretto255` (RFC 9380) with the join's domain separation;
//! - [`point`]: strict decoding of peer points, tokens `k * H2G(x)`, batch compression;
//! - [`keys`]: secret scalars (zeroized, redacted);
//! - [`normalize`]: versioned identifier normalisation;
//! - [`ot`]: Chou–Orlandi base OT and IKNP extension, PRG, correlation-robust hash;
//! - [`shares`]: additive shares mod 2^64;
//! - [`dp`]: exact discrete Laplace and Gaussian samplers;
//! - [`rng`]: the OS generator and per-session streams.

pub mod dp;
pub mod h2g;
pub mod keys;
pub mod normalize;
pub mod ot;
pub mod point;
pub mod rng;
pub mod shard;
pub mod shares;
pub mod signing;

/// Errors of the cryptographic layer. A variant never carries a secret, an
/// identifier or a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// The bytes are not an Ed25519 key in PKCS#8 (an operator's policy key).
    #[error("not an Ed25519 policy key")]
    BadPolicyKey,
    /// An Ed25519 signature does not verify under the public key.
    #[error("the signature does not verify against the expected public key")]
    BadSignature,
    /// A domain separation tag is empty or over 255 bytes.
    #[error("domain separation tag of {len} bytes (1 to 255 allowed)")]
    DomainTag {
        /// Its length.
        len: usize,
    },
    /// An `expand_message_xmd` output length out of range.
    #[error("expand_message_xmd length {len} out of range")]
    ExpandLength {
        /// The requested length.
        len: usize,
    },
    /// A shard count out of range.
    #[error("{shards} shards (1 to 4096 allowed)")]
    Shards {
        /// The count asked for.
        shards: u32,
    },
    /// A point encoding that is not the canonical encoding of any element.
    #[error("point is not a canonical ristretto255 encoding")]
    NonCanonicalPoint,
    /// The identity element where a random-looking point is required.
    #[error("point is the identity element")]
    IdentityPoint,
    /// The same point twice where points must be distinct.
    #[error("duplicate point")]
    DuplicatePoint,
    /// A point buffer whose length is not a multiple of 32.
    #[error("point buffer of {len} bytes is not a multiple of 32")]
    PointBufferLength {
        /// Its length.
        len: usize,
    },
    /// The wrong number of base-OT messages.
    #[error("expected 128 base-OT points, got {got}")]
    BaseOtCount {
        /// How many arrived.
        got: usize,
    },
    /// Choice bits that do not cover the rows.
    #[error("choice bits do not cover the rows")]
    ChoiceLength,
    /// An OT-extension chunk outside the rows or not aligned to 128 rows.
    #[error("OT extension chunk out of bounds or misaligned")]
    ChunkBounds,
    /// An OT-extension message of the wrong length for its chunk.
    #[error("OT extension message of {len} bytes does not fit its chunk")]
    ExtensionLength {
        /// Its length.
        len: usize,
    },
    /// A noise parameter of zero or out of range.
    #[error("noise parameter out of range")]
    NoiseParameter,
    /// A noise draw that does not fit 64 bits.
    #[error("noise draw out of range")]
    NoiseOverflow,
    /// The OS random number generator failed.
    #[error("the operating system's random number generator failed")]
    Randomness,
}
