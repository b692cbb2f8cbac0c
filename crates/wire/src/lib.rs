#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
//! Every message the two nodes exchange, and the codec that reads them.
//!
//! A frame is `[version: u8][type: u8][body]`. The body is bincode 2 (fixed
//! integer encoding, little endian) under a size limit; vectors of points or
//! words travel as one length-prefixed byte string each, so they encode and
//! decode at memory speed. The decoder refuses: an empty or one-byte frame, a
//! version other than [`PROTOCOL_VERSION`], an unknown type byte, a frame over
//! [`MAX_MESSAGE_LEN`], a body that does not decode, trailing bytes after the
//! body, and any field over its bound (see [`Message::validate`]).
//!
//! bincode is an implementation detail of this crate: nothing else names it.

use serde::{Deserialize, Serialize};

/// The protocol version carried by every frame.
pub const PROTOCOL_VERSION: u8 = 1;
/// The largest frame accepted, in bytes.
pub const MAX_MESSAGE_LEN: usize = 64 << 20;
/// The most points one chunk may carry.
pub const MAX_POINTS_PER_CHUNK: usize = 1 << 16;
/// The longest collaboration id, in bytes.
pub const MAX_COLLABORATION_ID_LEN: usize = 128;
/// Most per-phase timings in one share, and the longest label of one (a
/// node reports about ten; a label a newer node adds is `Phase::Other`).
pub const MAX_TIMINGS: usize = 64;
/// See [`MAX_TIMINGS`].
pub const MAX_PHASE_LABEL_LEN: usize = 128;
/// Length of an encoded point.
pub const POINT_LEN: usize = 32;
/// The most shards a collaboration may be split into (as
/// `cleanroom_crypto::shard::MAX_SHARDS`).
pub const MAX_SHARDS: u32 = 4096;

/// Identifies one join or one aggregate session; bound to both nodes'
/// nonces. Encoded as its 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub [u8; 16]);

impl AsRef<[u8]> for SessionId {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// An analyst's query id: chosen by the analyst (random), the same on both
/// nodes; a retry under it is the same query and costs nothing more.
/// Encoded as its 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct QueryId(pub [u8; 16]);

/// Which run of a query's aggregate a share comes from (a digest of its OT
/// sessions, which both nodes derive): two shares add up to the result only
/// when their runs are equal. Encoded as its 16 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub [u8; 16]);

macro_rules! hex_debug {
    ($t:ty, $name:literal) => {
        impl core::fmt::Debug for $t {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                f.write_str(concat!($name, "("))?;
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                f.write_str(")")
            }
        }

        impl core::fmt::Display for $t {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                for b in &self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }
    };
}
hex_debug!(QueryId, "QueryId");
hex_debug!(RunId, "RunId");
hex_debug!(SessionId, "SessionId");
/// A fresh random value contributed by one node to a session id.
pub type Nonce = [u8; 32];
/// An encoded ristretto255 element.
pub type PointBytes = [u8; POINT_LEN];

/// Errors reading a frame. None carries any byte of the frame's content.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Fewer than the two header bytes.
    #[error("frame of {len} bytes is shorter than its header")]
    Truncated {
        /// The frame's length.
        len: usize,
    },
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {got} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The version byte received.
        got: u8,
    },
    /// A type byte that names no message.
    #[error("unknown message type {got}")]
    UnknownType {
        /// The type byte received.
        got: u8,
    },
    /// A frame over the size limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The frame's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A body that does not decode as its type (truncated, or a length
    /// prefix past the limit).
    #[error("malformed {kind} body")]
    Malformed {
        /// The message type.
        kind: &'static str,
    },
    /// Bytes left over after a complete body.
    #[error("{count} trailing bytes after a {kind} body")]
    TrailingBytes {
        /// The message type.
        kind: &'static str,
        /// How many bytes were left.
        count: usize,
    },
    /// A field over its bound or of an impossible length.
    #[error("field {field} of {kind} has length {len}, outside its bounds")]
    FieldLength {
        /// The message type.
        kind: &'static str,
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// The encoder failed (only for a message over the size limit).
    #[error("message could not be encoded")]
    Encode,
}

/// Phase 1, matcher to holder: opens a join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinOffer {
    /// The matcher's contribution to the session id.
    pub nonce: Nonce,
    /// The collaboration both nodes belong to.
    pub collaboration_id: String,
    /// Hash of the matcher's identifier normalisation rules.
    pub rules_hash: [u8; 32],
    /// `m`: the matcher's set size.
    pub matcher_set_size: u64,
    /// What this join serves (data version, matcher filter), as a digest.
    pub context: [u8; 32],
    /// The matcher's tokens come in these blocks (one per matcher group),
    /// padded; they add up to `matcher_set_size`.
    pub blocks: Vec<u64>,
}

/// Phase 1, holder to matcher: accepts a join.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAccept {
    /// The session id both sides derive from the two nonces and the offer.
    pub session: SessionId,
    /// The holder's contribution to the session id.
    pub nonce: Nonce,
    /// `n`: the holder's set size.
    pub holder_set_size: u64,
    /// `D_max`: dummy rows (and dummy tokens) the holder adds.
    pub dummy_rows: u64,
}

/// Phase 1, matcher to holder: the matcher's public key `K_M = kp * G`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatcherKey {
    /// The session.
    pub session: SessionId,
    /// `K_M`.
    pub key: PointBytes,
}

/// A chunk of encoded points (matcher tokens, holder rows or holder tokens).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointChunk {
    /// The session.
    pub session: SessionId,
    /// Position of this chunk in its stream, from 0.
    pub seq: u32,
    /// Concatenated 32-byte encodings.
    #[serde(with = "serde_bytes")]
    pub points: Vec<u8>,
}

impl core::fmt::Debug for PointChunk {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "PointChunk {{ seq: {}, points: {} }}",
            self.seq,
            self.points.len() / POINT_LEN
        )
    }
}

impl PointChunk {
    /// Number of points (the length is validated to be a multiple of 32).
    pub fn count(&self) -> usize {
        self.points.len() / POINT_LEN
    }

    /// The points.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.points.chunks_exact(POINT_LEN)
    }
}

/// Phase 2, matcher to holder: opens an aggregate over a cached join, and
/// carries the base-OT sender's `A`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtSetup {
    /// The aggregate session id (derived from `join_session`, `query_id`, `nonce`).
    pub session: SessionId,
    /// The join this aggregate runs over.
    pub join_session: SessionId,
    /// The query this aggregate answers.
    pub query_id: QueryId,
    /// The matcher's fresh contribution.
    pub nonce: Nonce,
    /// Rows of the join (`n + D_max`), as the matcher has them.
    pub rows: u64,
    /// Output cells per row, as the matcher's plan has them.
    pub width: u32,
    /// Digest of the query plan (what the cells mean): both nodes must agree.
    pub plan: [u8; 32],
    /// The matcher group (join block) this batch is for.
    pub group: u32,
    /// Base OT: `A = a * G`.
    pub base_point: PointBytes,
}

/// Phase 2, holder to matcher: the base-OT receiver's 128 points `B_j`, and
/// the holder's nonce, which completes the aggregate session id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtChoices {
    /// The session id of the [`OtSetup`] it answers.
    pub session: SessionId,
    /// The holder's contribution: every later message of this aggregate
    /// carries the session id derived from the setup's id and this nonce.
    pub nonce: Nonce,
    /// 128 concatenated encodings.
    #[serde(with = "serde_bytes")]
    pub points: Vec<u8>,
}

/// Phase 2, matcher to holder: the IKNP columns for one chunk of rows.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtExtend {
    /// The aggregate session.
    pub session: SessionId,
    /// Chunk number, from 0.
    pub seq: u32,
    /// 128 columns, 16 bytes per 128 rows each.
    #[serde(with = "serde_bytes")]
    pub columns: Vec<u8>,
}

impl core::fmt::Debug for OtExtend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "OtExtend {{ seq: {}, bytes: {} }}", self.seq, self.columns.len())
    }
}

/// Phase 2, holder to matcher: masked row vectors `d_i` for one chunk.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedRows {
    /// The aggregate session.
    pub session: SessionId,
    /// Chunk number, from 0.
    pub seq: u32,
    /// The chunk's rows, each its cells' low bits in whole bytes, padded
    /// to a multiple of 8 bytes (`cleanroom_protocol::aggregate::CellBits`;
    /// with 64-bit cells, `rows x width` little-endian u64 words).
    #[serde(with = "serde_bytes")]
    pub words: Vec<u8>,
}

/// A [`MaskedRows`] read in place: its bytes are the frame's
/// ([`Message::decode_masked_rows`]), not a copy of them.
#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct MaskedRowsRef<'a> {
    /// The aggregate session.
    pub session: SessionId,
    /// Chunk number, from 0.
    pub seq: u32,
    /// The chunk's rows, as in [`MaskedRows::words`].
    #[serde(borrow)]
    pub words: &'a [u8],
}

impl core::fmt::Debug for MaskedRowsRef<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "MaskedRowsRef {{ seq: {}, bytes: {} }}", self.seq, self.words.len())
    }
}

impl core::fmt::Debug for MaskedRows {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "MaskedRows {{ seq: {}, bytes: {} }}", self.seq, self.words.len())
    }
}

/// Either side: the session is over. The code says why, in broad terms only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    /// The session.
    pub session: SessionId,
    /// Why.
    pub code: AbortCode,
}

/// Why a node aborted a session. On the wire, its `u16` value; a frame
/// with any other value does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
#[repr(u16)]
pub enum AbortCode {
    /// The peer sent a message that failed validation.
    BadMessage = 1,
    /// The parameters (collaboration, rules, sizes) are not acceptable.
    Parameters = 2,
    /// A local limit or budget refused the session.
    Refused = 3,
    /// A local failure.
    Internal = 4,
    /// The join named by an aggregate is not (or no longer) cached here.
    UnknownJoin = 5,
    /// The query named by an aggregate was not submitted to this node, or
    /// this node refused it.
    UnknownQuery = 6,
}

impl From<AbortCode> for u16 {
    fn from(c: AbortCode) -> u16 {
        c as u16
    }
}

/// A `u16` that is no [`AbortCode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown abort code {0}")]
pub struct UnknownAbortCode(pub u16);

impl TryFrom<u16> for AbortCode {
    type Error = UnknownAbortCode;

    fn try_from(v: u16) -> Result<Self, UnknownAbortCode> {
        Ok(match v {
            1 => AbortCode::BadMessage,
            2 => AbortCode::Parameters,
            3 => AbortCode::Refused,
            4 => AbortCode::Internal,
            5 => AbortCode::UnknownJoin,
            6 => AbortCode::UnknownQuery,
            other => return Err(UnknownAbortCode(other)),
        })
    }
}

/// An analyst's request to a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AnalystRequest {
    /// List the templates this analyst may run.
    Templates,
    /// Show this analyst's remaining budget.
    Budget,
    /// Run a template.
    Query(QueryRequest),
    /// The other node refused this query id: drop it here if it is still
    /// waiting for the other node (it stays charged; a retry under the
    /// same id costs nothing more).
    Cancel(QueryId),
    /// Would this node run this query now? It makes every admission check
    /// it would make for `Query` (template, parameters, limits on running
    /// queries and on requests, budget, runs per day, reaching the peer)
    /// without charging, and holds the admission for a short while: a
    /// `Query` under the same id from the same analyst then passes those
    /// checks. The client asks both nodes before it sends the query to
    /// either, so a query one node refuses is charged at neither.
    Admit(QueryRequest),
}

/// Run a template with parameters under a query id (the same id on both nodes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryRequest {
    /// Chosen by the analyst; a retry with the same id returns the same shares.
    pub query_id: QueryId,
    /// Template name.
    pub template: String,
    /// `name = value` pairs.
    pub params: Vec<(String, String)>,
}

/// A template, as an analyst sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// Name.
    pub name: String,
    /// The template's SQL text, with `:name` placeholders.
    pub kind: String,
    /// Parameters and their allowed values, as text.
    pub params: Vec<(String, String)>,
    /// ρ charged per run, as a decimal.
    pub rho: String,
    /// Minimum noisy count per cell.
    pub min_count: u64,
}

/// An analyst's budget on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetInfo {
    /// The node's role.
    pub node: String,
    /// The analyst.
    pub analyst: String,
    /// ρ allowed per period, in millionths.
    pub rho_limit_micro: u64,
    /// ρ spent this period, in millionths.
    pub rho_spent_micro: u64,
    /// Period length in days.
    pub period_days: u32,
    /// When the current period ends (days since 1970-01-01).
    pub period_ends_day: i64,
}

/// The value of the low `bits` bits of `x` as a `bits`-bit two's-complement
/// number (sign-extended), for `bits` from 1 to 64: how the sum of two
/// [`QueryShare`] words is read.
pub fn signed_in_bits(x: u64, bits: u8) -> i64 {
    if bits >= 64 || bits == 0 {
        return x as i64;
    }
    let shift = 64 - u32::from(bits);
    ((x << shift) as i64) >> shift
}

/// One node's noisy share of a query's result.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryShare {
    /// The node's role (`bank` or `platform`).
    pub node: String,
    /// The query.
    pub query_id: QueryId,
    /// The plan digest (both nodes' must agree).
    pub plan: [u8; 32],
    /// Cell names, in order.
    pub cells: Vec<String>,
    /// Each cell's share ring `Z_{2^bits}` (1 to 64): this node's word is
    /// its share of the cell mod `2^bits`, and the two nodes' words add up,
    /// mod `2^bits`, to the noisy cell as a `bits`-bit two's-complement
    /// number. The widths follow from the plan alone.
    pub bits: Vec<u8>,
    /// What each cell's sum is divided by to read it (1 for every cell of
    /// a share from this version; a converted [`LegacyQueryShare`] keeps
    /// its weights).
    pub weights: Vec<u64>,
    /// For each cell, the index of the count cell that decides whether it is shown.
    pub count_cells: Vec<u32>,
    /// For each cell, its unit: `count` or `cents`.
    pub units: Vec<String>,
    /// AVG outputs: name, numerator cell, denominator cell.
    pub ratios: Vec<(String, u32, u32)>,
    /// This node's share of each cell, noise included, mod `2^bits`.
    pub words: Vec<u64>,
    /// Standard deviation of this node's noise on each cell, in the cell's
    /// units (for display: the noise itself was sampled exactly).
    pub sigmas: Vec<f64>,
    /// This node's minimum noisy count.
    pub min_count: u64,
    /// ρ charged by this node, as a decimal.
    pub rho: String,
    /// Seconds per phase on this node (join, aggregate...), when the node
    /// reports them (`limits.report_timings`).
    pub timings: Vec<(Phase, f64)>,
    /// Whether this is a stored share returned for a retried query id.
    pub replayed: bool,
    /// The run of the aggregate this share comes from (a digest of its OT
    /// sessions, which both nodes derive). Two shares add up to the result
    /// only when their runs are equal; a query id run again after a crash
    /// has a new run.
    pub run: RunId,
}

impl From<LegacyQueryShare> for QueryShare {
    fn from(s: LegacyQueryShare) -> Self {
        #[allow(clippy::cast_precision_loss)]
        let sigmas = s.weights.iter().map(|w| s.sigma / (*w).max(1) as f64).collect();
        Self {
            node: s.node,
            query_id: s.query_id,
            plan: s.plan,
            bits: vec![64; s.cells.len()],
            cells: s.cells,
            weights: s.weights,
            count_cells: s.count_cells,
            units: s.units,
            ratios: s.ratios,
            words: s.words,
            sigmas,
            min_count: s.min_count,
            rho: s.rho,
            timings: s.timings,
            replayed: s.replayed,
            run: s.run,
        }
    }
}

impl core::fmt::Debug for LegacyQueryShare {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "LegacyQueryShare {{ node: {}, cells: {}, words: <redacted> }}",
            self.node,
            self.cells.len()
        )
    }
}

/// A share as nodes before narrow shares sent and stored it (every cell in
/// `Z_{2^64}`, multiplied by its weight before noise, one σ for all). It
/// still decodes, as [`AnalystResponse::LegacyShare`], so a ledger's stored
/// shares replay, and converts to a [`QueryShare`].
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyQueryShare {
    /// The node's role (`bank` or `platform`).
    pub node: String,
    /// The query.
    pub query_id: QueryId,
    /// The plan digest (both nodes' must agree).
    pub plan: [u8; 32],
    /// Cell names, in order.
    pub cells: Vec<String>,
    /// The weight each cell was multiplied by before noise.
    pub weights: Vec<u64>,
    /// For each cell, the index of the count cell that decides whether it is shown.
    pub count_cells: Vec<u32>,
    /// For each cell, its unit: `count` or `cents`.
    pub units: Vec<String>,
    /// AVG outputs: name, numerator cell, denominator cell.
    pub ratios: Vec<(String, u32, u32)>,
    /// This node's share of each (weighted) cell, noise included.
    pub words: Vec<u64>,
    /// Standard deviation of this node's noise on each weighted cell
    /// (for display: the noise itself was sampled exactly).
    pub sigma: f64,
    /// This node's minimum noisy count.
    pub min_count: u64,
    /// ρ charged by this node, as a decimal.
    pub rho: String,
    /// Seconds per phase on this node (join, aggregate...), when the node
    /// reports them (`limits.report_timings`).
    pub timings: Vec<(Phase, f64)>,
    /// Whether this is a stored share returned for a retried query id.
    pub replayed: bool,
    /// The run of the aggregate this share comes from (a digest of its OT
    /// sessions, which both nodes derive). Two shares add up to the result
    /// only when their runs are equal; a query id run again after a crash
    /// has a new run.
    pub run: RunId,
}

impl core::fmt::Debug for QueryShare {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "QueryShare {{ node: {}, cells: {}, words: <redacted> }}",
            self.node,
            self.cells.len()
        )
    }
}

/// One phase of a node's work on a query, reported with its share when the
/// node's `limits.report_timings` is on. On the wire a phase is its label
/// (the bytes are those of a string), so a phase a newer node reports
/// decodes here as [`Phase::Other`] rather than failing the share.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Phase {
    /// Either node: the whole join.
    Join,
    /// Bank: hashing its own identifiers to the group and exponentiating.
    BankOwnRows,
    /// Bank: decompressing and exponentiating the platform's tokens.
    BankPeerTokens,
    /// Bank: waiting for the platform or the network during the join.
    BankJoinWaiting,
    /// Bank: finishing the join (row order, counts).
    BankJoinFinishing,
    /// Platform: hashing its own identifiers and exponentiating.
    PlatformOwnTokens,
    /// Platform: decompressing and exponentiating the bank's rows and tokens.
    PlatformPeerPoints,
    /// Platform: waiting for the bank or the network during the join.
    PlatformJoinWaiting,
    /// Platform: matching the bank's tokens against its own.
    PlatformMatching,
    /// Bank: from accepting the query to its last batch (any join the
    /// platform runs first included).
    BankJoinAndAggregate,
    /// Bank: the masked rows (row values and the PRG).
    BankMasking,
    /// Bank: waiting for the platform or the network during the aggregate.
    BankAggregateWaiting,
    /// Platform: the whole aggregate.
    Aggregate,
    /// Platform: the OT extension.
    PlatformOtExtension,
    /// Platform: unmasking and summing the rows.
    PlatformUnmask,
    /// Platform: waiting for the bank or the network during the aggregate.
    PlatformAggregateWaiting,
    /// A phase this build does not know, by its label.
    Other(String),
}

impl Phase {
    const KNOWN: [Phase; 16] = [
        Phase::Join,
        Phase::BankOwnRows,
        Phase::BankPeerTokens,
        Phase::BankJoinWaiting,
        Phase::BankJoinFinishing,
        Phase::PlatformOwnTokens,
        Phase::PlatformPeerPoints,
        Phase::PlatformJoinWaiting,
        Phase::PlatformMatching,
        Phase::BankJoinAndAggregate,
        Phase::BankMasking,
        Phase::BankAggregateWaiting,
        Phase::Aggregate,
        Phase::PlatformOtExtension,
        Phase::PlatformUnmask,
        Phase::PlatformAggregateWaiting,
    ];

    /// Its label, for people (and on the wire).
    pub fn label(&self) -> &str {
        match self {
            Phase::Join => "join",
            Phase::BankOwnRows => "join: own rows (hash to group + exponentiate)",
            Phase::BankPeerTokens => "join: platform tokens (decompress + exponentiate)",
            Phase::BankJoinWaiting => "join: waiting for the platform or the network",
            Phase::BankJoinFinishing => "join: finishing (order, counts)",
            Phase::PlatformOwnTokens => "join: own tokens (hash to group + exponentiate)",
            Phase::PlatformPeerPoints => "join: bank rows and tokens (decompress + exponentiate)",
            Phase::PlatformJoinWaiting => "join: waiting for the bank or the network",
            Phase::PlatformMatching => "join: matching",
            Phase::BankJoinAndAggregate => "join and aggregate",
            Phase::BankMasking => "aggregate: masking rows (row values + PRG)",
            Phase::BankAggregateWaiting => "aggregate: waiting for the platform or the network",
            Phase::Aggregate => "aggregate",
            Phase::PlatformOtExtension => "aggregate: OT extension",
            Phase::PlatformUnmask => "aggregate: unmask and sum",
            Phase::PlatformAggregateWaiting => "aggregate: waiting for the bank or the network",
            Phase::Other(label) => label,
        }
    }

    /// Whether it is a phase of the aggregate (not of the join).
    pub fn is_aggregate(&self) -> bool {
        self.label().starts_with("aggregate") || *self == Phase::BankJoinAndAggregate
    }
}

impl From<String> for Phase {
    fn from(label: String) -> Self {
        Phase::KNOWN
            .iter()
            .find(|p| p.label() == label)
            .cloned()
            .unwrap_or(Phase::Other(label))
    }
}

impl From<Phase> for String {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Other(label) => label,
            known => known.label().to_string(),
        }
    }
}

impl core::fmt::Display for Phase {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.label())
    }
}

/// Why a node refused an analyst's request: a stable code, which clients
/// and tests match on, beside the message for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefusalCode {
    /// The request is malformed, not an analyst request, or contradicts
    /// itself.
    BadRequest,
    /// More requests per second than `max_requests_per_analyst_per_second`.
    RateLimited,
    /// The analyst already has `max_queries_in_flight_per_analyst` queries
    /// running (or admitted) on the node, or the node `max_queries_in_flight`.
    TooManyQueries,
    /// No runnable template of that name for this analyst (unknown, not
    /// allowed to the analyst, or not signed by both operators), or an ad
    /// hoc query that is not an instance of one.
    UnknownTemplate,
    /// The parameters do not bind to the template, or the node's data lacks
    /// a column the plan needs.
    BadParameters,
    /// The analyst's ρ for the period, or the bank's ε for join
    /// cardinalities, is spent.
    BudgetExhausted,
    /// The analyst's queries per UTC day are used up.
    RunLimit,
    /// The query id was used for another query or by another analyst.
    QueryIdReused,
    /// A limit on the inputs of a join: the minimum input after filters,
    /// the input churn, the peer's set size.
    InputLimit,
    /// The platform cannot reach the bank.
    PeerUnreachable,
    /// The other node refused this query id or never received it.
    PeerRefused,
    /// The query cannot be run again (a rerun over another join or data,
    /// past `max_reruns_per_query`, or from before its join was kept).
    RerunRefused,
    /// The node is finishing this query id; ask again shortly with it.
    Busy,
    /// The node could not complete the request; a retry under the same
    /// query id costs nothing more.
    Failed,
}

/// A refusal: its code and a message that says what to change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// What kind of refusal.
    pub code: RefusalCode,
    /// For people; never parsed.
    pub message: String,
}

impl Refusal {
    /// A refusal with `code` and `message`.
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl core::fmt::Display for Refusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A node's answer to an analyst.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum AnalystResponse {
    /// The templates the analyst may run.
    Templates(Vec<TemplateInfo>),
    /// The analyst's budget.
    Budget(BudgetInfo),
    /// A noisy share as nodes sent it before narrow shares (stored ones
    /// still decode; [`AnalystResponse::into_share`] converts it).
    LegacyShare(Box<LegacyQueryShare>),
    /// A refusal: its code, and a message that says what to change.
    Refused(Refusal),
    /// Whether a waiting query was dropped.
    Cancelled(bool),
    /// The query would run here now, and its admission is held.
    Admitted,
    /// A noisy share.
    Share(Box<QueryShare>),
}

impl AnalystResponse {
    /// The share this response carries, in either format, or `Err(self)`.
    ///
    /// # Errors
    /// The response itself when it is not a share.
    pub fn into_share(self) -> Result<QueryShare, Self> {
        match self {
            Self::Share(s) => Ok(*s),
            Self::LegacyShare(s) => Ok((*s).into()),
            other => Err(other),
        }
    }
}

/// One frame's content.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Message {
    /// Type 1.
    JoinOffer(JoinOffer),
    /// Type 2.
    JoinAccept(JoinAccept),
    /// Type 3.
    MatcherKey(MatcherKey),
    /// Type 4: `A_j = kp * H2G(y_j)`.
    MatcherTokens(PointChunk),
    /// Type 5: the holder's shuffled rows `C ∪ R`.
    HolderRows(PointChunk),
    /// Type 6: the holder's shuffled tokens `E`.
    HolderTokens(PointChunk),
    /// Type 7.
    OtSetup(OtSetup),
    /// Type 8.
    OtChoices(OtChoices),
    /// Type 9.
    OtExtend(OtExtend),
    /// Type 10.
    MaskedRows(MaskedRows),
    /// Type 11.
    Abort(Abort),
    /// Type 20: analyst to node.
    AnalystRequest(AnalystRequest),
    /// Type 21: node to analyst.
    AnalystResponse(AnalystResponse),
    /// Type 22: node to node, first on a new connection: the operator's
    /// signed template list (JSON, at most 1 MiB).
    Policy(PolicyMessage),
    /// Type 23: platform to bank, on a retried query id.
    ShareCheck(ShareCheck),
    /// Type 24: bank to platform.
    ShareHeld(ShareHeld),
    /// Type 25: platform to bank, before a shard's `JoinOffer`.
    ShardJoin(ShardJoin),
    /// Type 26: platform to bank, before a shard's `OtSetup`.
    ShardBatch(ShardBatch),
    /// Type 30: a node's coordinator to one of its own workers: run one
    /// shard's join with the peer (docs/protocol.md, "Workers").
    WorkerJoin(WorkerJoin),
    /// Type 31: the worker's answer to a [`WorkerJoin`].
    WorkerJoined(WorkerJoined),
    /// Type 32: coordinator to worker: run one aggregate batch over a
    /// shard's join the worker holds.
    WorkerBatch(WorkerBatch),
    /// Type 33: the worker's answer to a [`WorkerBatch`].
    WorkerBatchDone(WorkerBatchDone),
    /// Type 34: a worker could not do what its coordinator asked.
    WorkerFailed(WorkerFailed),
    /// Type 35: coordinator to worker, which joins it holds of `joins`;
    /// the worker answers with the same message listing those it holds.
    WorkerHolds(WorkerHolds),
    /// Type 36: a bank worker to its coordinator: charge the set of shard
    /// joins this shard's join belongs to (durably), before the worker
    /// accepts it.
    WorkerCharge(ShardJoin),
    /// Type 37: a bank worker to its coordinator: claim a query's aggregate
    /// batch of one shard and platform group.
    WorkerClaim(WorkerClaim),
    /// Type 38: the coordinator's answer to a [`WorkerClaim`].
    WorkerClaimed(WorkerClaimed),
    /// Type 39: a bank worker to its coordinator, on its claim's stream: the
    /// batch's outcome.
    WorkerBatchShare(WorkerBatchShare),
    /// Type 40: done (the answer to a charge or a batch's outcome).
    WorkerDone,
}

/// The most workers a node may have (`[workers]`).
pub const MAX_WORKERS: u32 = 256;
/// The longest message a [`WorkerFailed`] carries.
pub const MAX_WORKER_MESSAGE_LEN: usize = 1024;

/// A 32-byte secret carried between a node's own processes: redacted in
/// `Debug`, zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret32(pub [u8; 32]);

impl core::fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Secret32(<redacted>)")
    }
}

impl Drop for Secret32 {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// Share words carried between a node's own processes (a batch's
/// un-noised words): redacted in `Debug`, zeroized on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ShareWords(pub Vec<u64>);

impl core::fmt::Debug for ShareWords {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "ShareWords({} words, <redacted>)", self.0.len())
    }
}

impl Drop for ShareWords {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// The longest time a worker reports, seconds (a week).
pub const MAX_WORKER_SECONDS: f64 = 604_800.0;

/// Coordinator to worker: run shard `header.shard`'s join with the peer
/// (the worker sends `header` first, as the coordinator would), over the
/// shard's users listed per platform group by their index within the
/// shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerJoin {
    /// The coordinator's data version: a worker on other data refuses.
    pub data_version: [u8; 32],
    /// The shard join's header, as the peer will see it.
    pub header: ShardJoin,
    /// The users in the shard, as the coordinator counts them: a worker
    /// whose shard file holds another number refuses.
    pub shard_users: u32,
    /// Each platform group's users, by index within the shard.
    pub blocks: Vec<Vec<u32>>,
    /// The seed of the join's block padding (a function of the
    /// coordinator's node key and the join's context, so a re-join of the
    /// same input pads alike whichever worker runs it).
    pub padding_seed: Secret32,
}

/// Worker to coordinator: the shard's join is done and kept by the worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerJoined {
    /// The join's session.
    pub session: SessionId,
    /// Its platform groups.
    pub groups: u32,
    /// Its rows (the peer's, dummies included).
    pub rows: u64,
    /// Seconds: own tokens, the peer's points, waiting, matching.
    pub seconds: [f64; 4],
}

/// Coordinator to worker: one aggregate batch, the query's `k`-th, for
/// group `group` of the join `join` the worker holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerBatch {
    /// The coordinator's data version.
    pub data_version: [u8; 32],
    /// The shard's join, as [`WorkerJoined`] named it.
    pub join: SessionId,
    /// The query.
    pub query_id: QueryId,
    /// The query plan's digest.
    pub plan_digest: [u8; 32],
    /// The bits of each cell's share in this batch.
    pub bits: Vec<u8>,
    /// The batch's index in the query.
    pub batch: u32,
    /// The platform group.
    pub group: u32,
    /// The shard header the batch starts with.
    pub header: ShardBatch,
}

/// Worker to coordinator: the batch's session and the worker's words.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerBatchDone {
    /// The batch's session.
    pub session: SessionId,
    /// This node's share words of the batch's cells.
    pub words: ShareWords,
    /// Seconds: OT extension, unmasking, waiting.
    pub seconds: [f64; 3],
}

/// Coordinator to worker: which of these shard joins do you hold? The
/// worker answers with those it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerHolds {
    /// The joins, by session (at most [`MAX_SHARDS`]).
    pub joins: Vec<SessionId>,
}

/// A bank worker to its coordinator: the platform asks for query
/// `query_id`'s batch of shard `shard`, platform group `group`, over the
/// shard joins named `join` (`J*`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerClaim {
    /// The query.
    pub query_id: QueryId,
    /// `J*` of the query's shard joins.
    pub join: SessionId,
    /// `S`.
    pub shards: u32,
    /// The batch's shard.
    pub shard: u32,
    /// The batch's platform group.
    pub group: u32,
}

/// The coordinator's answer to a [`WorkerClaim`]: what the worker binds
/// the query's plan from (its own copy of the template, checked against
/// the digest). The batch's outcome follows on the same stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerClaimed {
    /// The template's name.
    pub template: String,
    /// The analyst the query runs for.
    pub analyst: String,
    /// The parameters.
    pub params: Vec<(String, String)>,
    /// The bound plan's digest.
    pub plan_digest: [u8; 32],
}

/// What a bank worker's batch came to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerOutcome {
    /// The batch's share words and its OT session.
    Share {
        /// The OT session.
        session: SessionId,
        /// The worker's share words of the batch's cells.
        words: ShareWords,
    },
    /// The worker does not have the join the batch named.
    UnknownJoin,
    /// It failed, and why (no data).
    Failed(String),
}

/// A bank worker to its coordinator, on the stream of its claim: the
/// batch's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerBatchShare {
    /// What the batch came to.
    pub outcome: WorkerOutcome,
    /// Seconds: masking, waiting.
    pub seconds: [f64; 2],
}

/// Worker to coordinator: the request failed. `abort` is the peer's abort
/// code when the peer aborted (or [`AbortCode::UnknownJoin`] when the
/// worker does not hold the join); `message` says why, without data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerFailed {
    /// The peer's abort, if that is why.
    pub abort: Option<AbortCode>,
    /// What failed.
    pub message: String,
}

/// Platform to bank, first on a stream when the collaboration is split into
/// `shards >= 2` shards: the join offer that follows is for shard `shard`
/// of one query's set of shard joins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardJoin {
    /// `S`, as both nodes' configs name it.
    pub shards: u32,
    /// `s < S`.
    pub shard: u32,
    /// `SHA-256("cleanroom-v1-shard-key-id" || shard key)`: which key split
    /// the identifiers.
    pub shard_key_id: [u8; 32],
    /// A random id the platform draws for one query's `S` shard joins: the
    /// bank charges the cardinality epsilon once per set and refuses a
    /// second join of the same shard of a set.
    pub set: [u8; 16],
    /// The join context before the shard is bound into it: the offer's
    /// context must be `SHA-256("cleanroom-v1-shard-context" || base || S || s)`.
    pub base_context: [u8; 32],
}

/// Platform to bank, first on a stream when the collaboration is sharded:
/// the OT setup that follows is for shard `shard` of the query whose shard
/// joins are `joins` (one per shard, in shard order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardBatch {
    /// `S`.
    pub shards: u32,
    /// The shard this batch's join is for.
    pub shard: u32,
    /// The query's shard joins, `J_0..J_{S-1}`.
    pub joins: Vec<SessionId>,
}

/// Platform to bank, for a query id the platform already holds a share of
/// (a retry): does the bank hold its share of the same run? If not (the
/// bank stopped before storing it), the platform runs the aggregate again
/// and replaces its share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareCheck {
    /// The query.
    pub query_id: QueryId,
    /// The run of the platform's stored share.
    pub run: RunId,
}

/// Bank to platform: the answer to a [`ShareCheck`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareHeld {
    /// The query.
    pub query_id: QueryId,
    /// Whether the bank holds a stored share of that query from that run.
    pub held: bool,
    /// Whether the bank is computing or storing a share of that query right
    /// now (then `held` may change: ask again shortly).
    pub busy: bool,
}

/// A node's signed policy, as shown to the other node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyMessage {
    /// The signed policy, JSON.
    #[serde(with = "serde_bytes")]
    pub signed: Vec<u8>,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_fixed_int_encoding()
        .with_little_endian()
        .with_limit::<MAX_MESSAGE_LEN>()
}

fn decode_body<T: serde::de::DeserializeOwned>(kind: &'static str, body: &[u8]) -> Result<T, WireError> {
    let (value, read) =
        bincode::serde::decode_from_slice::<T, _>(body, config()).map_err(|_| WireError::Malformed { kind })?;
    if read != body.len() {
        return Err(WireError::TrailingBytes {
            kind,
            count: body.len().saturating_sub(read),
        });
    }
    Ok(value)
}

/// A share's timings: at most [`MAX_TIMINGS`], each label at most
/// [`MAX_PHASE_LABEL_LEN`] bytes.
fn check_timings(kind: &'static str, timings: &[(Phase, f64)]) -> Result<(), WireError> {
    if timings.len() > MAX_TIMINGS {
        return Err(WireError::FieldLength {
            kind,
            field: "timings",
            len: timings.len(),
        });
    }
    if let Some((p, _)) = timings.iter().find(|(p, _)| p.label().len() > MAX_PHASE_LABEL_LEN) {
        return Err(WireError::FieldLength {
            kind,
            field: "timing label",
            len: p.label().len(),
        });
    }
    Ok(())
}

/// Reported seconds: finite, from 0 to [`MAX_WORKER_SECONDS`].
fn check_seconds(kind: &'static str, seconds: &[f64]) -> Result<(), WireError> {
    match seconds.iter().position(|s| !(0.0..=MAX_WORKER_SECONDS).contains(s)) {
        Some(i) => Err(WireError::FieldLength {
            kind,
            field: "seconds",
            len: i,
        }),
        None => Ok(()),
    }
}

/// `2 <= shards <= MAX_SHARDS` and `shard < shards`.
fn check_shard(kind: &'static str, shards: u32, shard: u32) -> Result<(), WireError> {
    if !(2..=MAX_SHARDS).contains(&shards) {
        return Err(WireError::FieldLength {
            kind,
            field: "shards",
            len: shards as usize,
        });
    }
    if shard >= shards {
        return Err(WireError::FieldLength {
            kind,
            field: "shard",
            len: shard as usize,
        });
    }
    Ok(())
}

fn check_points(kind: &'static str, field: &'static str, buf: &[u8], min: usize, max: usize) -> Result<(), WireError> {
    let n = buf.len() / POINT_LEN;
    if !buf.len().is_multiple_of(POINT_LEN) || n < min || n > max {
        return Err(WireError::FieldLength {
            kind,
            field,
            len: buf.len(),
        });
    }
    Ok(())
}

impl Message {
    /// The type byte.
    pub fn type_byte(&self) -> u8 {
        match self {
            Message::JoinOffer(_) => 1,
            Message::JoinAccept(_) => 2,
            Message::MatcherKey(_) => 3,
            Message::MatcherTokens(_) => 4,
            Message::HolderRows(_) => 5,
            Message::HolderTokens(_) => 6,
            Message::OtSetup(_) => 7,
            Message::OtChoices(_) => 8,
            Message::OtExtend(_) => 9,
            Message::MaskedRows(_) => 10,
            Message::Abort(_) => 11,
            Message::AnalystRequest(_) => 20,
            Message::AnalystResponse(_) => 21,
            Message::Policy(_) => 22,
            Message::ShareCheck(_) => 23,
            Message::ShareHeld(_) => 24,
            Message::ShardJoin(_) => 25,
            Message::ShardBatch(_) => 26,
            Message::WorkerJoin(_) => 30,
            Message::WorkerJoined(_) => 31,
            Message::WorkerBatch(_) => 32,
            Message::WorkerBatchDone(_) => 33,
            Message::WorkerFailed(_) => 34,
            Message::WorkerHolds(_) => 35,
            Message::WorkerCharge(_) => 36,
            Message::WorkerClaim(_) => 37,
            Message::WorkerClaimed(_) => 38,
            Message::WorkerBatchShare(_) => 39,
            Message::WorkerDone => 40,
        }
    }

    /// A short name for errors and logs.
    pub fn kind(&self) -> &'static str {
        kind_name(self.type_byte())
    }

    /// The session the message belongs to (`None` for the offer that creates one).
    pub fn session(&self) -> Option<&SessionId> {
        match self {
            Message::JoinOffer(_) => None,
            Message::JoinAccept(m) => Some(&m.session),
            Message::MatcherKey(m) => Some(&m.session),
            Message::MatcherTokens(m) | Message::HolderRows(m) | Message::HolderTokens(m) => Some(&m.session),
            Message::OtSetup(m) => Some(&m.session),
            Message::OtChoices(m) => Some(&m.session),
            Message::OtExtend(m) => Some(&m.session),
            Message::MaskedRows(m) => Some(&m.session),
            Message::Abort(m) => Some(&m.session),
            Message::AnalystRequest(_)
            | Message::AnalystResponse(_)
            | Message::Policy(_)
            | Message::ShareCheck(_)
            | Message::ShareHeld(_)
            | Message::ShardJoin(_)
            | Message::ShardBatch(_)
            | Message::WorkerJoin(_)
            | Message::WorkerJoined(_)
            | Message::WorkerBatch(_)
            | Message::WorkerBatchDone(_)
            | Message::WorkerFailed(_)
            | Message::WorkerHolds(_)
            | Message::WorkerCharge(_)
            | Message::WorkerClaim(_)
            | Message::WorkerClaimed(_)
            | Message::WorkerBatchShare(_)
            | Message::WorkerDone => None,
        }
    }

    /// Structural bounds that hold for every message of its type, whatever
    /// the session: string and vector lengths.
    ///
    /// # Errors
    /// [`WireError::FieldLength`] naming the field.
    pub fn validate(&self) -> Result<(), WireError> {
        let kind = self.kind();
        match self {
            Message::JoinOffer(m) => {
                if m.blocks.is_empty() || m.blocks.len() > 4096 {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "blocks",
                        len: m.blocks.len(),
                    });
                }
                let len = m.collaboration_id.len();
                if len == 0 || len > MAX_COLLABORATION_ID_LEN {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "collaboration_id",
                        len,
                    });
                }
            }
            Message::MatcherTokens(m) | Message::HolderRows(m) | Message::HolderTokens(m) => {
                check_points(kind, "points", &m.points, 1, MAX_POINTS_PER_CHUNK)?;
            }
            Message::OtChoices(m) => check_points(kind, "points", &m.points, 128, 128)?,
            Message::OtExtend(m) => {
                // 128 columns of whole 16-byte words.
                if m.columns.is_empty() || !m.columns.len().is_multiple_of(128 * 16) {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "columns",
                        len: m.columns.len(),
                    });
                }
            }
            Message::MaskedRows(m) => {
                if m.words.is_empty() || !m.words.len().is_multiple_of(8) {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "words",
                        len: m.words.len(),
                    });
                }
            }
            Message::AnalystRequest(AnalystRequest::Query(q) | AnalystRequest::Admit(q)) => {
                if q.template.len() > 128 {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "template",
                        len: q.template.len(),
                    });
                }
                if q.params.len() > 32 {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "params",
                        len: q.params.len(),
                    });
                }
                if let Some((k, v)) = q.params.iter().find(|(k, v)| k.len() > 64 || v.len() > 256) {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "param",
                        len: k.len() + v.len(),
                    });
                }
            }
            Message::AnalystResponse(AnalystResponse::Share(share)) => {
                check_timings(kind, &share.timings)?;
                if share.bits.len() != share.cells.len() {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "bits",
                        len: share.bits.len(),
                    });
                }
                if let Some(b) = share.bits.iter().find(|b| **b == 0 || **b > 64) {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "cell bits",
                        len: usize::from(*b),
                    });
                }
            }
            Message::AnalystResponse(AnalystResponse::LegacyShare(share)) => {
                check_timings(kind, &share.timings)?;
            }
            Message::ShardJoin(m) => check_shard(kind, m.shards, m.shard)?,
            Message::ShardBatch(m) => {
                check_shard(kind, m.shards, m.shard)?;
                if m.joins.len() != m.shards as usize {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "joins",
                        len: m.joins.len(),
                    });
                }
            }
            Message::WorkerJoin(m) => {
                check_shard(kind, m.header.shards, m.header.shard)?;
                if m.blocks.is_empty() || m.blocks.len() > 4096 {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "blocks",
                        len: m.blocks.len(),
                    });
                }
                if let Some(i) = m.blocks.iter().flatten().find(|i| **i >= m.shard_users) {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "user index",
                        len: *i as usize,
                    });
                }
            }
            Message::WorkerJoined(m) => {
                check_seconds(kind, &m.seconds)?;
                if m.groups == 0 || m.groups > 4096 {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "groups",
                        len: m.groups as usize,
                    });
                }
            }
            Message::WorkerBatch(m) => {
                check_shard(kind, m.header.shards, m.header.shard)?;
                if m.header.joins.len() != m.header.shards as usize {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "joins",
                        len: m.header.joins.len(),
                    });
                }
                if m.bits.is_empty() || m.bits.len() > 1 << 16 {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "bits",
                        len: m.bits.len(),
                    });
                }
            }
            Message::WorkerBatchDone(m) => {
                check_seconds(kind, &m.seconds)?;
                if m.words.0.len() > 1 << 16 {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "words",
                        len: m.words.0.len(),
                    });
                }
            }
            Message::WorkerCharge(m) => check_shard(kind, m.shards, m.shard)?,
            Message::WorkerClaim(m) => check_shard(kind, m.shards, m.shard)?,
            Message::WorkerClaimed(m) => {
                let long = m.template.len() > 128
                    || m.analyst.len() > 128
                    || m.params.len() > 32
                    || m.params.iter().any(|(k, v)| k.len() > 64 || v.len() > 256);
                if long {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "template, analyst or params",
                        len: m.template.len() + m.analyst.len() + m.params.len(),
                    });
                }
            }
            Message::WorkerBatchShare(m) => match &m.outcome {
                _ if check_seconds(kind, &m.seconds).is_err() => check_seconds(kind, &m.seconds)?,
                WorkerOutcome::Share { words, .. } if words.0.len() > 1 << 16 => {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "words",
                        len: words.0.len(),
                    });
                }
                WorkerOutcome::Failed(why) if why.len() > MAX_WORKER_MESSAGE_LEN => {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "message",
                        len: why.len(),
                    });
                }
                _ => {}
            },
            Message::WorkerDone => {}
            Message::WorkerHolds(m) => {
                if m.joins.len() > MAX_SHARDS as usize {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "joins",
                        len: m.joins.len(),
                    });
                }
            }
            Message::WorkerFailed(m) => {
                if m.message.len() > MAX_WORKER_MESSAGE_LEN {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "message",
                        len: m.message.len(),
                    });
                }
            }
            Message::JoinAccept(_)
            | Message::MatcherKey(_)
            | Message::OtSetup(_)
            | Message::Abort(_)
            | Message::AnalystRequest(_)
            | Message::AnalystResponse(_)
            | Message::ShareCheck(_)
            | Message::ShareHeld(_) => {}
            Message::Policy(p) => {
                if p.signed.len() > 1 << 20 {
                    return Err(WireError::FieldLength {
                        kind,
                        field: "signed",
                        len: p.signed.len(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Encodes the message as one frame.
    ///
    /// # Errors
    /// [`WireError::Encode`] or [`WireError::TooLarge`] for a frame over the limit.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        // The body is written straight after the two header bytes, into a
        // buffer sized for the bulk variants' payload: one allocation and
        // one copy of a chunk's bytes, not two.
        let bulk = match self {
            Message::MatcherTokens(m) | Message::HolderRows(m) | Message::HolderTokens(m) => m.points.len(),
            Message::OtExtend(m) => m.columns.len(),
            Message::MaskedRows(m) => m.words.len(),
            Message::OtChoices(m) => m.points.len(),
            _ => 0,
        };
        let mut out = Vec::with_capacity(bulk.saturating_add(64).min(MAX_MESSAGE_LEN));
        out.extend_from_slice(&[PROTOCOL_VERSION, self.type_byte()]);
        let w = &mut out;
        match self {
            Message::JoinOffer(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::JoinAccept(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::MatcherKey(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::MatcherTokens(m) | Message::HolderRows(m) | Message::HolderTokens(m) => {
                bincode::serde::encode_into_std_write(m, w, config())
            }
            Message::OtSetup(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::OtChoices(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::OtExtend(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::MaskedRows(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::Abort(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::AnalystRequest(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::AnalystResponse(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::Policy(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::ShareCheck(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::ShareHeld(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::ShardJoin(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::ShardBatch(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerJoin(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerJoined(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerBatch(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerBatchDone(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerFailed(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerHolds(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerCharge(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerClaim(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerClaimed(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerBatchShare(m) => bincode::serde::encode_into_std_write(m, w, config()),
            Message::WorkerDone => Ok(0),
        }
        .map_err(|_| WireError::Encode)?;
        if out.len() > MAX_MESSAGE_LEN {
            return Err(WireError::TooLarge {
                len: out.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        Ok(out)
    }

    /// A frame that is a [`MaskedRows`], read in place (the rows are the
    /// largest messages of a query: this saves a copy of each); `None` for
    /// any other message, which [`Message::decode`] reads. The checks are
    /// [`Message::decode`]'s.
    ///
    /// # Errors
    /// A [`WireError`] for a malformed masked-rows frame.
    pub fn decode_masked_rows(frame: &[u8]) -> Result<Option<MaskedRowsRef<'_>>, WireError> {
        if frame.len() > MAX_MESSAGE_LEN {
            return Err(WireError::TooLarge {
                len: frame.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        let body = match frame {
            [PROTOCOL_VERSION, 10, body @ ..] => body,
            _ => return Ok(None),
        };
        let kind = kind_name(10);
        let (value, read) = bincode::serde::borrow_decode_from_slice::<MaskedRowsRef<'_>, _>(body, config())
            .map_err(|_| WireError::Malformed { kind })?;
        if read != body.len() {
            return Err(WireError::TrailingBytes {
                kind,
                count: body.len().saturating_sub(read),
            });
        }
        // `validate`'s rule for MaskedRows.
        if value.words.is_empty() || !value.words.len().is_multiple_of(8) {
            return Err(WireError::FieldLength {
                kind,
                field: "words",
                len: value.words.len(),
            });
        }
        Ok(Some(value))
    }

    /// Decodes and validates one frame.
    ///
    /// # Errors
    /// A [`WireError`] for anything but one well-formed message of this version.
    pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
        if frame.len() > MAX_MESSAGE_LEN {
            return Err(WireError::TooLarge {
                len: frame.len(),
                max: MAX_MESSAGE_LEN,
            });
        }
        let (version, ty, body) = match frame {
            [v, t, body @ ..] => (*v, *t, body),
            _ => return Err(WireError::Truncated { len: frame.len() }),
        };
        if version != PROTOCOL_VERSION {
            return Err(WireError::UnsupportedVersion { got: version });
        }
        let kind = kind_name(ty);
        let msg = match ty {
            1 => Message::JoinOffer(decode_body(kind, body)?),
            2 => Message::JoinAccept(decode_body(kind, body)?),
            3 => Message::MatcherKey(decode_body(kind, body)?),
            4 => Message::MatcherTokens(decode_body(kind, body)?),
            5 => Message::HolderRows(decode_body(kind, body)?),
            6 => Message::HolderTokens(decode_body(kind, body)?),
            7 => Message::OtSetup(decode_body(kind, body)?),
            8 => Message::OtChoices(decode_body(kind, body)?),
            9 => Message::OtExtend(decode_body(kind, body)?),
            10 => Message::MaskedRows(decode_body(kind, body)?),
            11 => Message::Abort(decode_body(kind, body)?),
            20 => Message::AnalystRequest(decode_body(kind, body)?),
            21 => Message::AnalystResponse(decode_body(kind, body)?),
            22 => Message::Policy(decode_body(kind, body)?),
            23 => Message::ShareCheck(decode_body(kind, body)?),
            24 => Message::ShareHeld(decode_body(kind, body)?),
            25 => Message::ShardJoin(decode_body(kind, body)?),
            26 => Message::ShardBatch(decode_body(kind, body)?),
            30 => Message::WorkerJoin(decode_body(kind, body)?),
            31 => Message::WorkerJoined(decode_body(kind, body)?),
            32 => Message::WorkerBatch(decode_body(kind, body)?),
            33 => Message::WorkerBatchDone(decode_body(kind, body)?),
            34 => Message::WorkerFailed(decode_body(kind, body)?),
            35 => Message::WorkerHolds(decode_body(kind, body)?),
            36 => Message::WorkerCharge(decode_body(kind, body)?),
            37 => Message::WorkerClaim(decode_body(kind, body)?),
            38 => Message::WorkerClaimed(decode_body(kind, body)?),
            39 => Message::WorkerBatchShare(decode_body(kind, body)?),
            40 if body.is_empty() => Message::WorkerDone,
            40 => {
                return Err(WireError::TrailingBytes {
                    kind,
                    count: body.len(),
                });
            }
            other => return Err(WireError::UnknownType { got: other }),
        };
        msg.validate()?;
        Ok(msg)
    }
}

fn kind_name(ty: u8) -> &'static str {
    match ty {
        1 => "JoinOffer",
        2 => "JoinAccept",
        3 => "MatcherKey",
        4 => "MatcherTokens",
        5 => "HolderRows",
        6 => "HolderTokens",
        7 => "OtSetup",
        8 => "OtChoices",
        9 => "OtExtend",
        10 => "MaskedRows",
        11 => "Abort",
        20 => "AnalystRequest",
        21 => "AnalystResponse",
        22 => "Policy",
        23 => "ShareCheck",
        24 => "ShareHeld",
        25 => "ShardJoin",
        26 => "ShardBatch",
        30 => "WorkerJoin",
        31 => "WorkerJoined",
        32 => "WorkerBatch",
        33 => "WorkerBatchDone",
        34 => "WorkerFailed",
        35 => "WorkerHolds",
        36 => "WorkerCharge",
        37 => "WorkerClaim",
        38 => "WorkerClaimed",
        39 => "WorkerBatchShare",
        40 => "WorkerDone",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_in_bits_reads_twos_complement() {
        assert_eq!(signed_in_bits(0b111, 3), -1);
        assert_eq!(signed_in_bits(0b011, 3), 3);
        assert_eq!(signed_in_bits(0b100, 3), -4);
        assert_eq!(signed_in_bits(0xff_0000_0005, 8), 5, "bits beyond the ring are ignored");
        assert_eq!(signed_in_bits(u64::MAX, 64), -1);
        assert_eq!(signed_in_bits((1 << 40) - 2, 40), -2);
    }

    /// A phase is its label on the wire: every known phase comes back as
    /// itself, a label this build does not know as `Other`, and a share's
    /// bytes are those of the label string (so stored shares of earlier
    /// builds still decode).
    #[test]
    fn phases_travel_as_their_labels() {
        for p in Phase::KNOWN {
            assert_eq!(Phase::from(String::from(p.clone())), p);
        }
        let mut labels: Vec<&str> = Phase::KNOWN.iter().map(Phase::label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Phase::KNOWN.len(), "two phases share a label");
        assert_eq!(
            Phase::from("join: something new".to_string()),
            Phase::Other("join: something new".into())
        );
        let typed = bincode::serde::encode_to_vec(vec![(Phase::BankMasking, 0.5f64)], config()).unwrap();
        let text = bincode::serde::encode_to_vec(
            vec![("aggregate: masking rows (row values + PRG)".to_string(), 0.5f64)],
            config(),
        )
        .unwrap();
        assert_eq!(typed, text);
    }
    use proptest::prelude::*;

    fn samples() -> Vec<Message> {
        let s = [7u8; 16];
        vec![
            Message::JoinOffer(JoinOffer {
                nonce: [1; 32],
                collaboration_id: "bank-x-platform".into(),
                rules_hash: [2; 32],
                matcher_set_size: 1000,
                context: [3; 32],
                blocks: vec![600, 400],
            }),
            Message::JoinAccept(JoinAccept {
                session: SessionId(s),
                nonce: [4; 32],
                holder_set_size: 5,
                dummy_rows: 62,
            }),
            Message::MatcherKey(MatcherKey {
                session: SessionId(s),
                key: [5; 32],
            }),
            Message::MatcherTokens(PointChunk {
                session: SessionId(s),
                seq: 0,
                points: vec![9; 64],
            }),
            Message::HolderRows(PointChunk {
                session: SessionId(s),
                seq: 3,
                points: vec![9; 32],
            }),
            Message::HolderTokens(PointChunk {
                session: SessionId(s),
                seq: 1,
                points: vec![9; 96],
            }),
            Message::OtSetup(OtSetup {
                session: SessionId(s),
                join_session: SessionId([8; 16]),
                query_id: QueryId([9; 16]),
                nonce: [10; 32],
                rows: 1062,
                width: 33,
                plan: [12; 32],
                group: 0,
                base_point: [11; 32],
            }),
            Message::OtChoices(OtChoices {
                session: SessionId(s),
                nonce: [3; 32],
                points: vec![12; 128 * 32],
            }),
            Message::OtExtend(OtExtend {
                session: SessionId(s),
                seq: 0,
                columns: vec![13; 128 * 16 * 2],
            }),
            Message::MaskedRows(MaskedRows {
                session: SessionId(s),
                seq: 0,
                words: vec![14; 8 * 33],
            }),
            Message::Abort(Abort {
                session: SessionId(s),
                code: AbortCode::BadMessage,
            }),
            Message::ShareCheck(ShareCheck {
                query_id: QueryId([15; 16]),
                run: RunId([16; 16]),
            }),
            Message::ShareHeld(ShareHeld {
                query_id: QueryId([15; 16]),
                held: true,
                busy: false,
            }),
            Message::ShardJoin(ShardJoin {
                shards: 7,
                shard: 6,
                shard_key_id: [17; 32],
                set: [18; 16],
                base_context: [19; 32],
            }),
            Message::ShardBatch(ShardBatch {
                shards: 2,
                shard: 1,
                joins: vec![SessionId([20; 16]), SessionId([21; 16])],
            }),
            Message::WorkerJoin(WorkerJoin {
                data_version: [22; 32],
                header: ShardJoin {
                    shards: 4,
                    shard: 3,
                    shard_key_id: [23; 32],
                    set: [24; 16],
                    base_context: [25; 32],
                },
                shard_users: 10,
                blocks: vec![vec![0, 9], vec![]],
                padding_seed: Secret32([26; 32]),
            }),
            Message::WorkerJoined(WorkerJoined {
                session: SessionId([27; 16]),
                groups: 2,
                rows: 99,
                seconds: [0.5, 0.25, 0.125, 1.0],
            }),
            Message::WorkerBatch(WorkerBatch {
                data_version: [28; 32],
                join: SessionId([29; 16]),
                query_id: QueryId([30; 16]),
                plan_digest: [31; 32],
                bits: vec![64, 40],
                batch: 5,
                group: 1,
                header: ShardBatch {
                    shards: 2,
                    shard: 0,
                    joins: vec![SessionId([29; 16]), SessionId([32; 16])],
                },
            }),
            Message::WorkerBatchDone(WorkerBatchDone {
                session: SessionId([33; 16]),
                words: ShareWords(vec![1, u64::MAX]),
                seconds: [0.1, 0.2, 0.3],
            }),
            Message::WorkerFailed(WorkerFailed {
                abort: Some(AbortCode::UnknownJoin),
                message: "gone".into(),
            }),
            Message::WorkerHolds(WorkerHolds {
                joins: vec![SessionId([34; 16])],
            }),
            Message::WorkerCharge(ShardJoin {
                shards: 3,
                shard: 2,
                shard_key_id: [35; 32],
                set: [36; 16],
                base_context: [37; 32],
            }),
            Message::WorkerClaim(WorkerClaim {
                query_id: QueryId([38; 16]),
                join: SessionId([39; 16]),
                shards: 5,
                shard: 4,
                group: 2,
            }),
            Message::WorkerClaimed(WorkerClaimed {
                template: "overlap".into(),
                analyst: "alice".into(),
                params: vec![("segment".into(), "gamer".into())],
                plan_digest: [40; 32],
            }),
            Message::WorkerBatchShare(WorkerBatchShare {
                outcome: WorkerOutcome::Share {
                    session: SessionId([41; 16]),
                    words: ShareWords(vec![3, 4]),
                },
                seconds: [0.5, 0.5],
            }),
            Message::WorkerBatchShare(WorkerBatchShare {
                outcome: WorkerOutcome::Failed("no".into()),
                seconds: [0.0, 0.0],
            }),
            Message::WorkerDone,
        ]
    }

    #[test]
    fn worker_messages_outside_their_bounds_are_refused() {
        let join = |shard_users, blocks: Vec<Vec<u32>>| {
            Message::WorkerJoin(WorkerJoin {
                data_version: [0; 32],
                header: ShardJoin {
                    shards: 2,
                    shard: 1,
                    shard_key_id: [0; 32],
                    set: [0; 16],
                    base_context: [0; 32],
                },
                shard_users,
                blocks,
                padding_seed: Secret32([0; 32]),
            })
        };
        for (m, field) in [
            (join(3, vec![vec![0, 3]]), "user index"),
            (join(0, vec![vec![0]]), "user index"),
            (join(3, vec![]), "blocks"),
            (
                Message::WorkerFailed(WorkerFailed {
                    abort: None,
                    message: "x".repeat(MAX_WORKER_MESSAGE_LEN + 1),
                }),
                "message",
            ),
            (
                Message::WorkerHolds(WorkerHolds {
                    joins: vec![SessionId([0; 16]); MAX_SHARDS as usize + 1],
                }),
                "joins",
            ),
            (
                Message::WorkerClaimed(WorkerClaimed {
                    template: "t".repeat(129),
                    analyst: String::new(),
                    params: Vec::new(),
                    plan_digest: [0; 32],
                }),
                "template, analyst or params",
            ),
            (
                Message::WorkerJoined(WorkerJoined {
                    session: SessionId([0; 16]),
                    groups: 1,
                    rows: 1,
                    seconds: [0.0, f64::INFINITY, 0.0, 0.0],
                }),
                "seconds",
            ),
            (
                Message::WorkerBatchDone(WorkerBatchDone {
                    session: SessionId([0; 16]),
                    words: ShareWords(vec![1]),
                    seconds: [f64::NAN, 0.0, 0.0],
                }),
                "seconds",
            ),
            (
                Message::WorkerBatchShare(WorkerBatchShare {
                    outcome: WorkerOutcome::UnknownJoin,
                    seconds: [-1.0, 0.0],
                }),
                "seconds",
            ),
            (
                Message::WorkerBatchShare(WorkerBatchShare {
                    outcome: WorkerOutcome::UnknownJoin,
                    seconds: [1e30, 0.0],
                }),
                "seconds",
            ),
        ] {
            let frame = m.encode().unwrap();
            match Message::decode(&frame) {
                Err(WireError::FieldLength { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // A padding seed never shows in Debug.
        let mut secret = join(3, vec![vec![1]]);
        if let Message::WorkerJoin(j) = &mut secret {
            j.padding_seed = Secret32([77; 32]);
        }
        let shown = format!("{secret:?}");
        assert!(
            shown.contains("Secret32(<redacted>)") && !shown.contains("77"),
            "{shown}"
        );
        // Nor do a batch's share words.
        let words = Message::WorkerBatchDone(WorkerBatchDone {
            session: SessionId([0; 16]),
            words: ShareWords(vec![987_654_321]),
            seconds: [0.0; 3],
        });
        let shown = format!("{words:?}");
        assert!(shown.contains("<redacted>") && !shown.contains("987654321"), "{shown}");
    }

    #[test]
    fn round_trip_every_type() {
        for m in samples() {
            let frame = m.encode().unwrap();
            assert_eq!(frame[0], PROTOCOL_VERSION);
            assert_eq!(Message::decode(&frame).unwrap(), m);
        }
    }

    #[test]
    fn shard_headers_outside_their_bounds_are_refused() {
        let join = |shards, shard| {
            Message::ShardJoin(ShardJoin {
                shards,
                shard,
                shard_key_id: [1; 32],
                set: [2; 16],
                base_context: [3; 32],
            })
        };
        let batch = |shards, shard, joins: usize| {
            Message::ShardBatch(ShardBatch {
                shards,
                shard,
                joins: vec![SessionId([4; 16]); joins],
            })
        };
        for (m, field) in [
            (join(1, 0), "shards"),
            (join(0, 0), "shards"),
            (join(MAX_SHARDS + 1, 0), "shards"),
            (join(2, 2), "shard"),
            (join(16, u32::MAX), "shard"),
            (batch(1, 0, 1), "shards"),
            (batch(3, 3, 3), "shard"),
            (batch(3, 1, 2), "joins"),
            (batch(3, 1, 4), "joins"),
        ] {
            // Encoding does not validate; decoding does.
            let frame = m.encode().unwrap();
            match Message::decode(&frame) {
                Err(WireError::FieldLength { field: f, .. }) => assert_eq!(f, field, "{m:?}"),
                other => panic!("{m:?} decoded as {other:?}"),
            }
        }
        for m in [join(2, 1), join(MAX_SHARDS, MAX_SHARDS - 1), batch(16, 15, 16)] {
            assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
        }
    }

    #[test]
    fn strict_decoding() {
        let frame = samples()[3].encode().unwrap();
        assert_eq!(Message::decode(&[]), Err(WireError::Truncated { len: 0 }));
        assert_eq!(Message::decode(&[1]), Err(WireError::Truncated { len: 1 }));
        let mut v = frame.clone();
        v[0] = 2;
        assert_eq!(Message::decode(&v), Err(WireError::UnsupportedVersion { got: 2 }));
        let mut v = frame.clone();
        v[1] = 99;
        assert_eq!(Message::decode(&v), Err(WireError::UnknownType { got: 99 }));
        let mut v = frame.clone();
        v.push(0);
        assert_eq!(
            Message::decode(&v),
            Err(WireError::TrailingBytes {
                kind: "MatcherTokens",
                count: 1
            })
        );
        // Every strict prefix fails cleanly.
        for cut in 0..frame.len() {
            assert!(Message::decode(&frame[..cut]).is_err(), "prefix {cut}");
        }
        // A length prefix claiming more than the limit.
        let mut v = vec![PROTOCOL_VERSION, 4];
        v.extend_from_slice(&[7u8; 16]);
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(Message::decode(&v), Err(WireError::Malformed { kind: "MatcherTokens" }));
        // A point buffer that is not whole points, or empty.
        let bad = Message::HolderRows(PointChunk {
            session: SessionId([0; 16]),
            seq: 0,
            points: vec![1; 33],
        });
        assert!(matches!(
            Message::decode(&bad.encode().unwrap()),
            Err(WireError::FieldLength { .. })
        ));
        let bad = Message::HolderRows(PointChunk {
            session: SessionId([0; 16]),
            seq: 0,
            points: vec![],
        });
        assert!(matches!(
            Message::decode(&bad.encode().unwrap()),
            Err(WireError::FieldLength { .. })
        ));
        let bad = Message::OtChoices(OtChoices {
            session: SessionId([0; 16]),
            nonce: [0; 32],
            points: vec![1; 127 * 32],
        });
        assert!(matches!(
            Message::decode(&bad.encode().unwrap()),
            Err(WireError::FieldLength { .. })
        ));
        let bad = Message::JoinOffer(JoinOffer {
            nonce: [0; 32],
            collaboration_id: "x".repeat(129),
            rules_hash: [0; 32],
            matcher_set_size: 1,
            context: [0; 32],
            blocks: vec![1],
        });
        assert!(matches!(
            Message::decode(&bad.encode().unwrap()),
            Err(WireError::FieldLength { .. })
        ));
        let huge = vec![0u8; MAX_MESSAGE_LEN + 1];
        assert!(matches!(Message::decode(&huge), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn debug_does_not_print_payloads() {
        let m = Message::MatcherTokens(PointChunk {
            session: SessionId([0; 16]),
            seq: 0,
            points: vec![0xab; 64],
        });
        let shown = format!("{m:?}");
        assert!(!shown.contains("171"), "{shown}");
        assert!(shown.contains("points: 2"));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&bytes);
        }

        /// The in-place read of masked rows accepts exactly the frames
        /// `decode` reads as `MaskedRows`, with the same fields, and
        /// leaves every other frame to `decode`.
        #[test]
        fn masked_rows_read_in_place_as_decode_reads_them(
            ty in prop_oneof![Just(10u8), 0u8..27],
            body in proptest::collection::vec(any::<u8>(), 0..96),
            words in proptest::collection::vec(any::<u8>(), 0..64),
            seq in any::<u32>(),
        ) {
            // An arbitrary frame, and a well-formed one with `words`.
            let good = Message::MaskedRows(MaskedRows { session: SessionId([3; 16]), seq, words }).encode().unwrap();
            let mut arbitrary = vec![PROTOCOL_VERSION, ty];
            arbitrary.extend_from_slice(&body);
            // The good frame with a byte more, a byte less, another
            // version, and its length field changed.
            let mut longer = good.clone();
            longer.push(0);
            let shorter = good[..good.len() - 1].to_vec();
            let mut version = good.clone();
            version[0] = PROTOCOL_VERSION.wrapping_add(1);
            let mut length = good.clone();
            let at = 2 + 16 + 4;
            if let Some(b) = length.get_mut(at) {
                *b ^= 8;
            }
            for frame in [good, arbitrary, longer, shorter, version, length] {
                match (Message::decode(&frame), Message::decode_masked_rows(&frame)) {
                    (Ok(Message::MaskedRows(m)), Ok(Some(r))) => {
                        prop_assert_eq!((m.session, m.seq, m.words.as_slice()), (r.session, r.seq, r.words));
                    }
                    (Ok(Message::MaskedRows(_)), other) => prop_assert!(false, "in place: {:?}", other),
                    (_, Ok(Some(r))) => prop_assert!(false, "read in place only: {:?}", r),
                    (Ok(_), Ok(None)) => {}
                    (Err(_), Ok(None)) => prop_assert!(frame.get(..2) != Some(&[PROTOCOL_VERSION, 10][..])),
                    (Err(_), Err(_)) => {}
                    (Ok(m), Err(e)) => prop_assert!(false, "{:?} refused in place: {}", m.kind(), e),
                }
            }
        }

        #[test]
        fn arbitrary_bodies_never_panic(ty in 0u8..42, body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut frame = vec![PROTOCOL_VERSION, ty];
            frame.extend_from_slice(&body);
            if let Ok(m) = Message::decode(&frame) {
                // Whatever decodes re-encodes to the same frame.
                prop_assert_eq!(m.encode().unwrap(), frame);
            }
        }
    }
}
