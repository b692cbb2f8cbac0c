//! Phase 1: the private join (PROTOCOL.md, "Phase 1").
//!
//! The matcher M opens with a [`JoinOffer`]; the holder H answers with a
//! [`JoinAccept`] once its cardinality charge is recorded. Then both stream:
//! M sends its key `K_M` and its tokens `A_j = kp * H2G(y_j)` in a random
//! order; H sends its rows `C ∪ R` in a random order as it computes them, and,
//! once it holds **all** of `{kb * A_j}`, adds the dummy tokens, shuffles the
//! whole set with one permutation and sends it as `E`. M computes
//! `T_i = kp * row_i` and marks `e_i = [T_i ∈ E]`.
//!
//! **Blocks (matcher-side GROUP BY).** The matcher may send its tokens in
//! `G` blocks, one per value of its grouping attribute, each padded with
//! random points to a noisy size (so the holder learns only noisy block
//! sizes). The holder treats each block as its own join: `D_max` dummy rows
//! and `D_max` dummy tokens per block, `D_b` of them matching, each block's
//! tokens shuffled over the whole block and sent in block order. The matcher
//! learns, for each matched row, the block (its own attribute) it matched
//! in, and a DP-noised count per block. With one block this is the plain join.
//!
//! **Key slots (multi-key matching).** A holder made with
//! [`HolderJoin::with_key_slots`] sends each customer as a row of `K`
//! points (its keys, padding for those it lacks, in a random order per
//! row), and a matcher made with [`MatcherJoin::with_key_slots`] labels a
//! row with the lowest block any of its slots matched in. The matcher then
//! sees each row's match pattern ([`match_patterns`]); the holder adds
//! `D_max` dummy rows per pattern, `D_p` of them matching in exactly the
//! pattern's blocks. With `K = 1` this is the single-key join, unchanged.
//!
//! Each party is a state machine: bytes in ([`HolderStreaming::handle`],
//! [`MatcherStreaming::handle`]), messages out (`poll_transmit`), no I/O, no
//! clock. The steps that must happen in order are separate types.

use std::collections::HashSet;
use std::sync::Arc;

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_crypto::h2g::HashToGroup;
use cleanroom_crypto::keys::SecretScalar;
use cleanroom_crypto::point::{
    self, POINT_LEN, PointBytes, check_token_encoding, decode_mul_compress, decode_point, hash_mul_compress,
    split_points,
};
use cleanroom_crypto::rng::{SessionRng, shuffle};
use cleanroom_wire::{
    JoinAccept, JoinOffer, MAX_COLLABORATION_ID_LEN, MAX_POINTS_PER_CHUNK, MatcherKey, Message, Nonce, PointChunk,
    SessionId,
};
use curve25519_dalek::scalar::Scalar;
use rand_core::{CryptoRng, RngCore};
use rayon::prelude::*;
use ring::digest::{Context, SHA256};
use subtle::{ConditionallySelectable, ConstantTimeLess};
use zeroize::Zeroize;
use zeroize::Zeroizing;

use crate::ProtocolError;
use crate::session::decode_for;

/// The largest set either side may bring (row indices are `u32`).
pub const MAX_SET_SIZE: u64 = 1 << 31;
/// Points per chunk unless configured otherwise.
pub const DEFAULT_CHUNK_POINTS: usize = 16_384;

/// Public parameters of a join, which both nodes must agree on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinParams {
    /// The collaboration (also the hash-to-group domain).
    pub collaboration_id: String,
    /// Hash of the identifier normalisation rules.
    pub rules_hash: [u8; 32],
    /// Digest of what the join serves (data version, matcher-side filter).
    pub context: [u8; 32],
    /// Points per chunk this node sends (1 to 65536).
    pub chunk_points: usize,
}

impl JoinParams {
    fn check(&self) -> Result<HashToGroup, ProtocolError> {
        if self.chunk_points == 0 || self.chunk_points > MAX_POINTS_PER_CHUNK {
            return Err(ProtocolError::LocalInput {
                reason: "chunk size must be between 1 and 65536 points",
            });
        }
        if self.collaboration_id.is_empty() || self.collaboration_id.len() > MAX_COLLABORATION_ID_LEN {
            return Err(ProtocolError::LocalInput {
                reason: "collaboration id must be 1 to 128 bytes",
            });
        }
        HashToGroup::for_collaboration(&self.collaboration_id).map_err(|_| ProtocolError::LocalInput {
            reason: "collaboration id too long for a hash-to-group tag",
        })
    }
}

/// Inclusive bounds on the peer's set size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetSizeLimits {
    /// Smallest accepted.
    pub min: u64,
    /// Largest accepted.
    pub max: u64,
}

impl SetSizeLimits {
    fn check(&self, size: u64) -> Result<(), ProtocolError> {
        if size < self.min || size > self.max || size > MAX_SET_SIZE {
            return Err(ProtocolError::PeerSetSize {
                size,
                min: self.min,
                max: self.max.min(MAX_SET_SIZE),
            });
        }
        Ok(())
    }
}

/// What the holder enforces.
#[derive(Clone, Debug)]
pub struct HolderPolicy {
    /// Accepted matcher set sizes.
    pub peer_set: SetSizeLimits,
    /// The cardinality noise (`ε_c`, `δ_c`, and from them `μ` and `D_max`).
    pub cardinality: ShiftedTruncatedLaplace,
}

/// What the matcher enforces.
#[derive(Clone, Debug)]
pub struct MatcherPolicy {
    /// Accepted holder set sizes.
    pub peer_set: SetSizeLimits,
    /// The most dummy rows (per block) the matcher will process.
    pub max_dummy_rows: u64,
    /// Noise for block sizes: each block (also a single one, so the holder
    /// does not learn the exact size of the matcher's filtered input) is
    /// padded with `P_b` random points. Required for more than one block.
    pub block_padding: Option<ShiftedTruncatedLaplace>,
}

/// A 256-bit seed the matcher's padding draws come from (see
/// [`MatcherJoin::with_padding_seed`]). Redacted in `Debug`, zeroized on drop.
pub struct PaddingSeed(Zeroizing<[u8; 32]>);

impl PaddingSeed {
    /// Wraps a seed.
    pub fn new(seed: Zeroizing<[u8; 32]>) -> Self {
        Self(seed)
    }
}

impl core::fmt::Debug for PaddingSeed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PaddingSeed(<redacted>)")
    }
}

/// The most blocks (matcher groups) one join may have.
pub const MAX_BLOCKS: usize = 4096;

/// The most key slots (key kinds) of a multi-key join.
pub const MAX_KEY_SLOTS: usize = 8;

/// The match patterns of a join with `blocks` blocks and `key_slots` key
/// slots per holder row: the blocks a matched row's slots can fall in, as
/// a non-empty multiset of at most `key_slots` blocks, written in
/// non-decreasing order; by size, then in lexicographic order. With one
/// key slot the patterns are the blocks, `[b]` for each `b` in order.
///
/// The holder adds `D_max` dummy rows per pattern (`D_p` of them matching
/// dummy tokens in exactly the pattern's blocks), so that the count of
/// rows per pattern, which the matcher sees, is noised.
///
/// # Errors
/// [`ProtocolError::LocalInput`] for no block, more than [`MAX_BLOCKS`]
/// blocks, key slots outside 1 to [`MAX_KEY_SLOTS`], or more than
/// [`MAX_BLOCKS`] pattern slots (patterns times key slots).
pub fn match_patterns(blocks: usize, key_slots: usize) -> Result<Vec<Vec<u32>>, ProtocolError> {
    if blocks == 0 || blocks > MAX_BLOCKS || key_slots == 0 || key_slots > MAX_KEY_SLOTS {
        return Err(ProtocolError::LocalInput {
            reason: "a join has 1 to 4096 blocks and 1 to 8 key slots",
        });
    }
    // C(blocks + z - 1, z) multisets of size z, counted before any is made.
    let (mut total, mut of_size) = (0u64, 1u64);
    for z in 1..=key_slots as u64 {
        of_size = of_size.saturating_mul(blocks as u64 + z - 1) / z;
        total = total.saturating_add(of_size);
    }
    // At most as many pattern slots (patterns times key slots) as a
    // single-key join may have blocks, so a peer's choice of blocks costs
    // the holder no more dummy rows and tokens than it can today.
    if total.saturating_mul(key_slots as u64) > MAX_BLOCKS as u64 {
        return Err(ProtocolError::LocalInput {
            reason: "too many match patterns (blocks and key slots) for one join",
        });
    }
    let mut out = Vec::with_capacity(total as usize);
    for z in 1..=key_slots {
        let mut p = vec![0u32; z];
        loop {
            out.push(p.clone());
            // The next non-decreasing tuple: raise the last position that
            // can rise, and set every later one to it.
            let Some(i) = p.iter().rposition(|&b| (b as usize) + 1 < blocks) else {
                break;
            };
            let next = p.get(i).copied().unwrap_or(0) + 1;
            for x in p.iter_mut().skip(i) {
                *x = next;
            }
        }
    }
    Ok(out)
}

/// The first byte of a cached join's encoding ([`HolderJoined::encode`],
/// [`MatcherJoined::encode`]); a cached join with another is not used.
pub const JOIN_CACHE_VERSION: u8 = 1;

/// A node's own normalised identifiers, checked once when made: at most
/// 2^31 and no two equal. Joins over them take a reference-counted copy
/// and do not check again (a bank's whole set is joined many times).
#[derive(Clone)]
pub struct OwnIds(Arc<Vec<Vec<u8>>>);

impl OwnIds {
    /// Checks `ids`.
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for more than 2^31 identifiers or a
    /// duplicate.
    pub fn new(ids: Vec<Vec<u8>>) -> Result<Self, ProtocolError> {
        check_own_ids(&ids)?;
        Ok(Self(Arc::new(ids)))
    }

    /// A copy of the identifiers.
    pub fn to_vec(&self) -> Vec<Vec<u8>> {
        self.0.as_ref().clone()
    }
}

impl core::ops::Deref for OwnIds {
    type Target = [Vec<u8>];
    fn deref(&self) -> &[Vec<u8>] {
        &self.0
    }
}

impl core::fmt::Debug for OwnIds {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "OwnIds({} identifiers)", self.0.len())
    }
}

fn check_own_ids(ids: &[Vec<u8>]) -> Result<(), ProtocolError> {
    check_own_slices(ids.iter().map(Vec::as_slice))
}

/// At most 2^31 identifiers, no two equal (this node's own data).
fn check_own_slices<'a>(ids: impl ExactSizeIterator<Item = &'a [u8]>) -> Result<(), ProtocolError> {
    if ids.len() as u64 > MAX_SET_SIZE {
        return Err(ProtocolError::LocalInput {
            reason: "more identifiers than a join supports (2^31)",
        });
    }
    let mut seen = HashSet::with_capacity(ids.len());
    for id in ids {
        if !seen.insert(id) {
            return Err(ProtocolError::LocalInput {
                reason: "duplicate identifiers (aggregate rows per identifier first)",
            });
        }
    }
    Ok(())
}

fn join_session_id(offer: &JoinOffer, holder_nonce: &Nonce, n: u64, d_max: u64, key_slots: usize) -> SessionId {
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"cleanroom-v1-join-session");
    ctx.update(&offer.nonce);
    ctx.update(holder_nonce);
    ctx.update(&(offer.collaboration_id.len() as u32).to_le_bytes());
    ctx.update(offer.collaboration_id.as_bytes());
    ctx.update(&offer.rules_hash);
    ctx.update(&offer.matcher_set_size.to_le_bytes());
    ctx.update(&(offer.blocks.len() as u64).to_le_bytes());
    for b in &offer.blocks {
        ctx.update(&b.to_le_bytes());
    }
    ctx.update(&offer.context);
    ctx.update(&n.to_le_bytes());
    ctx.update(&d_max.to_le_bytes());
    // A multi-key join's session also names its key slots (a single-key
    // join's id is what it always was).
    if key_slots > 1 {
        ctx.update(b"key-slots");
        ctx.update(&(key_slots as u64).to_le_bytes());
    }
    let d = ctx.finish();
    let mut sid = [0u8; 16];
    sid.copy_from_slice(d.as_ref().get(..16).unwrap_or(&[0u8; 16]));
    cleanroom_wire::SessionId(sid)
}

/// The rules' hash as the offer carries it: a multi-key join's also names
/// its key slots, so a holder whose `K` differs refuses the offer before it
/// charges anything (one key slot: the rules' hash itself).
fn offer_rules_hash(rules_hash: &[u8; 32], key_slots: usize) -> [u8; 32] {
    if key_slots <= 1 {
        return *rules_hash;
    }
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"cleanroom-v1-key-slots");
    ctx.update(rules_hash);
    ctx.update(&(key_slots as u64).to_le_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref().get(..32).unwrap_or(&[0u8; 32]));
    out
}

fn flatten(points: &[PointBytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(points.len() * POINT_LEN);
    for p in points {
        out.extend_from_slice(p);
    }
    out
}

/// Room to reserve for a peer-announced count: never more than a million
/// elements up front, so an announced size alone cannot exhaust memory (the
/// vectors grow only as validated data arrives).
fn capacity_hint(announced: u64) -> usize {
    announced.min(1 << 20) as usize
}

/// Marks a row of the holder's shuffled order that is a dummy: indices
/// `>= n` are dummies.
fn is_dummy(entry: u32, n: u64) -> bool {
    u64::from(entry) >= n
}

/// Block `b`'s range in a stream where block `k` has `sizes[k]` elements.
fn block_of(position: u64, sizes: &[u64]) -> Option<usize> {
    let mut end = 0u64;
    for (b, n) in sizes.iter().enumerate() {
        end = end.saturating_add(*n);
        if position < end {
            return Some(b);
        }
    }
    None
}

// ---------------------------------------------------------------- holder

// The joins' `Debug` shows sizes only: never identifiers, padding inputs
// or which positions are padding.
impl core::fmt::Debug for HolderJoin {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HolderJoin")
            .field("identifiers", &self.ids.len())
            .finish_non_exhaustive()
    }
}

impl core::fmt::Debug for MatcherJoin {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MatcherJoin")
            .field("blocks", &self.blocks.len())
            .field("identifiers", &self.blocks.iter().map(Vec::len).sum::<usize>())
            .finish_non_exhaustive()
    }
}

impl core::fmt::Debug for MatcherOffered {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MatcherOffered")
            .field("offered_blocks", &self.offer.blocks)
            .finish_non_exhaustive()
    }
}

/// The holder before any offer.
pub struct HolderJoin {
    params: JoinParams,
    policy: HolderPolicy,
    h2g: HashToGroup,
    ids: OwnIds,
    slots: Option<KeySlots>,
}

/// A multi-key holder's customers: `K` key slots per row, and customer
/// `c`'s keys at `ids[offsets[c]..offsets[c + 1]]` (0 to `K` of them).
#[derive(Clone)]
struct KeySlots {
    k: usize,
    offsets: Arc<Vec<u32>>,
}

/// A multi-key holder's streaming state: its customers' keys and the
/// session stream (drawn at the offer) of its padding inputs and of each
/// row's slot order.
struct MultiKeyRows {
    slots: KeySlots,
    rng: SessionRng,
}

impl KeySlots {
    fn customers(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    /// Customer `c`'s keys' range in the flattened keys.
    fn range(&self, c: usize) -> core::ops::Range<usize> {
        let at = |i: usize| self.offsets.get(i).map_or(0, |o| *o as usize);
        at(c)..at(c + 1)
    }
}

impl HolderJoin {
    /// A holder with its normalised, distinct identifiers (one per customer,
    /// in the order its aggregate values will use).
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for bad parameters or duplicate identifiers.
    pub fn new(params: JoinParams, policy: HolderPolicy, ids: Vec<Vec<u8>>) -> Result<Self, ProtocolError> {
        Self::with_ids(params, policy, OwnIds::new(ids)?)
    }

    /// A holder with identifiers checked before ([`OwnIds`]).
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for bad parameters.
    pub fn with_ids(params: JoinParams, policy: HolderPolicy, ids: OwnIds) -> Result<Self, ProtocolError> {
        let h2g = params.check()?;
        Ok(Self {
            params,
            policy,
            h2g,
            ids,
            slots: None,
        })
    }

    /// A multi-key holder: `customers[c]` holds customer `c`'s normalised
    /// keys (at most `key_slots`, of distinct kinds; none if it has no
    /// usable key), in the order its aggregate values will use. Each row
    /// it sends has `key_slots` points: the customer's keys and, for each
    /// key it lacks, a random point computed the same way, in a fresh
    /// random order per row (docs/protocol.md, "Multi-key matching").
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for bad parameters, key slots outside
    /// 1 to [`MAX_KEY_SLOTS`], a customer with more keys than slots, or a
    /// key that two customers (or one customer twice) hold: the caller
    /// drops a key its customers share before the join.
    pub fn with_key_slots(
        params: JoinParams,
        policy: HolderPolicy,
        customers: Vec<Vec<Vec<u8>>>,
        key_slots: usize,
    ) -> Result<Self, ProtocolError> {
        let too_many = || ProtocolError::LocalInput {
            reason: "more identifiers than a join supports (2^31)",
        };
        if customers.len() as u64 > MAX_SET_SIZE {
            return Err(too_many());
        }
        let mut offsets = Vec::with_capacity(customers.len() + 1);
        offsets.push(0u32);
        let mut keys = Vec::with_capacity(customers.iter().map(Vec::len).sum());
        for c in customers {
            keys.extend(c);
            offsets.push(u32::try_from(keys.len()).map_err(|_| too_many())?);
        }
        Self::with_key_offsets(params, policy, OwnIds::new(keys)?, Arc::new(offsets), key_slots)
    }

    /// As [`HolderJoin::with_key_slots`], with the keys checked before
    /// ([`OwnIds`], so no key is held twice) and customer `c`'s keys at
    /// `ids[offsets[c]..offsets[c + 1]]` (a node's loaded data keeps them
    /// so, shared with every join it runs).
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for bad parameters, key slots outside
    /// 1 to [`MAX_KEY_SLOTS`], offsets that do not start at 0, go down or
    /// end elsewhere than at the last key, or a customer with more keys
    /// than slots.
    pub fn with_key_offsets(
        params: JoinParams,
        policy: HolderPolicy,
        ids: OwnIds,
        offsets: Arc<Vec<u32>>,
        key_slots: usize,
    ) -> Result<Self, ProtocolError> {
        if key_slots == 0 || key_slots > MAX_KEY_SLOTS {
            return Err(ProtocolError::LocalInput {
                reason: "a join has 1 to 8 key slots",
            });
        }
        if offsets.len().saturating_sub(1) as u64 > MAX_SET_SIZE {
            return Err(ProtocolError::LocalInput {
                reason: "more identifiers than a join supports (2^31)",
            });
        }
        let ends_right = offsets.first() == Some(&0) && offsets.last().map(|o| *o as usize) == Some(ids.len());
        if !ends_right || offsets.windows(2).any(|w| matches!(w, [a, b] if b < a)) {
            return Err(ProtocolError::LocalInput {
                reason: "customer key offsets out of order",
            });
        }
        if offsets
            .windows(2)
            .any(|w| matches!(w, [a, b] if (b - a) as usize > key_slots))
        {
            return Err(ProtocolError::LocalInput {
                reason: "a customer has more keys than the join has key slots",
            });
        }
        let mut holder = Self::with_ids(params, policy, ids)?;
        holder.slots = Some(KeySlots { k: key_slots, offsets });
        Ok(holder)
    }

    /// Reads the matcher's offer, checks it against this node's parameters
    /// and policy, and draws the session's secrets and the dummy counts
    /// `D_b`. Nothing is sent yet: the cardinality charge must be recorded first.
    ///
    /// # Errors
    /// A peer fault for a bad or unacceptable offer.
    pub fn on_offer<R: RngCore + CryptoRng>(
        self,
        frame: &[u8],
        rng: &mut R,
    ) -> Result<HolderPendingCharge, ProtocolError> {
        let offer = match Message::decode(frame)? {
            Message::JoinOffer(o) => o,
            other => {
                return Err(ProtocolError::UnexpectedMessage {
                    got: other.kind(),
                    state: "waiting for a join offer",
                });
            }
        };
        if offer.collaboration_id != self.params.collaboration_id {
            return Err(ProtocolError::ParameterMismatch {
                what: "collaboration id",
            });
        }
        let k = self.slots.as_ref().map_or(1, |s| s.k);
        if offer.rules_hash != offer_rules_hash(&self.params.rules_hash, k) {
            return Err(ProtocolError::ParameterMismatch {
                what: if k == 1 {
                    "identifier normalisation rules"
                } else {
                    "identifier normalisation rules or key slots"
                },
            });
        }
        if offer.context != self.params.context {
            return Err(ProtocolError::ParameterMismatch { what: "join context" });
        }
        self.policy.peer_set.check(offer.matcher_set_size)?;
        let sum = offer.blocks.iter().try_fold(0u64, |a, b| a.checked_add(*b));
        if offer.blocks.is_empty() || offer.blocks.len() > MAX_BLOCKS || sum != Some(offer.matcher_set_size) {
            return Err(ProtocolError::ParameterMismatch { what: "block sizes" });
        }
        // The matcher picks the blocks: too many match patterns for them
        // is its fault.
        let patterns = match_patterns(offer.blocks.len(), k)
            .map_err(|_| ProtocolError::ParameterMismatch { what: "block sizes" })?;
        let n = self.slots.as_ref().map_or(self.ids.len(), KeySlots::customers) as u64;
        let d_max = self.policy.cardinality.d_max();
        // `D_max` dummy rows per pattern (per block with one key slot).
        let dummies = (patterns.len() as u64).saturating_mul(d_max);
        if n.saturating_add(dummies).saturating_mul(k as u64) > u64::from(u32::MAX) {
            return Err(ProtocolError::LocalInput {
                reason: "too many rows for one join",
            });
        }
        let d: Vec<u64> = (0..patterns.len())
            .map(|_| self.policy.cardinality.sample(rng))
            .collect::<Result<_, _>>()?;
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let session = join_session_id(&offer, &nonce, n, d_max, k);
        let kb = SecretScalar::random(rng);
        // A key per slot of a pattern in each dummy row (one per dummy row
        // with one key slot): `t·G` in the row, `t·K_M` among the tokens.
        let dummy_slots = patterns.iter().map(|p| p.len() as u64 * d_max).sum::<u64>();
        let dummy_keys: Vec<SecretScalar> = (0..dummy_slots).map(|_| SecretScalar::random(rng)).collect();
        // A fresh scalar beside every dummy key, whatever the `D_p`: the
        // non-matching dummy tokens are `r·K_M`, computed in the same batch
        // as the matching ones (see `maybe_build_tokens`), so no work here
        // or there depends on `D`.
        let fresh_keys: Vec<SecretScalar> = (0..dummy_slots).map(|_| SecretScalar::random(rng)).collect();
        let total = n + dummies;
        let mut order: Vec<u32> = (0..total as u32).collect();
        shuffle(&mut order, rng);
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let shuffle_rng = SessionRng::from_seed(seed);
        seed.zeroize();
        // Each dummy row's `K` points: its pattern's slots' `t·G`, then a
        // random point for each other slot (the row's slots are shuffled
        // when it is sent). A multi-key holder also draws, from a stream of
        // its own, the padding inputs of its customers' missing keys and
        // the order of each row's slots.
        let mut dummy_rows: Vec<PointBytes> = Vec::with_capacity((dummies as usize).saturating_mul(k));
        let mut keys = dummy_keys.iter();
        for p in &patterns {
            for _ in 0..d_max {
                for _ in 0..p.len() {
                    dummy_rows.extend(keys.next().map(|t| t.public().compress().to_bytes()));
                }
                for _ in p.len()..k {
                    dummy_rows.push(SecretScalar::random(rng).public().compress().to_bytes());
                }
            }
        }
        let multi_key = self.slots.map(|slots| {
            rng.fill_bytes(&mut seed);
            let rng = SessionRng::from_seed(seed);
            seed.zeroize();
            MultiKeyRows { slots, rng }
        });

        let accept = JoinAccept {
            session,
            nonce,
            holder_set_size: n,
            dummy_rows: d_max,
        };
        Ok(HolderPendingCharge {
            streaming: HolderStreaming {
                session,
                chunk_points: self.params.chunk_points,
                h2g: self.h2g,
                ids: self.ids,
                multi_key,
                patterns,
                n,
                m: offer.matcher_set_size,
                blocks: offer.blocks.clone(),
                d,
                d_max,
                kb,
                dummy_keys,
                dummy_rows,
                fresh_keys,
                order,
                rows_sent: 0,
                rows_seq: 0,
                key_m: None,
                a_seq: 0,
                received: 0,
                // Reserve at most about a million points in all, however
                // many blocks the peer announces.
                blinded: offer
                    .blocks
                    .iter()
                    .map(|b| Vec::with_capacity(capacity_hint(*b) / offer.blocks.len().max(1)))
                    .collect(),
                shuffle_rng,
                tokens: None,
                tokens_sent: 0,
                tokens_seq: 0,
            },
            accept,
        })
    }
}

/// The holder after reading an acceptable offer: it must record the
/// cardinality charge durably before anything leaves the node.
#[derive(Debug)]
pub struct HolderPendingCharge {
    streaming: HolderStreaming,
    accept: JoinAccept,
}

impl HolderPendingCharge {
    /// The session this join will run under.
    pub fn session(&self) -> SessionId {
        self.streaming.session
    }

    /// The matcher's announced set size `m` (padding included).
    pub fn matcher_set_size(&self) -> u64 {
        self.streaming.m
    }

    /// Call once the charge of `ε_c` is durable: returns the streaming holder
    /// and its [`JoinAccept`], the first message that may leave the node.
    pub fn charge_recorded(self) -> (HolderStreaming, Message) {
        (self.streaming, Message::JoinAccept(self.accept))
    }
}

/// The holder while rows and tokens flow.
pub struct HolderStreaming {
    session: SessionId,
    chunk_points: usize,
    h2g: HashToGroup,
    ids: OwnIds,
    /// A multi-key holder's customers and the stream its padding inputs
    /// and slot orders come from.
    multi_key: Option<MultiKeyRows>,
    patterns: Vec<Vec<u32>>,
    n: u64,
    m: u64,
    blocks: Vec<u64>,
    d: Vec<u64>,
    d_max: u64,
    kb: SecretScalar,
    dummy_keys: Vec<SecretScalar>,
    dummy_rows: Vec<PointBytes>,
    fresh_keys: Vec<SecretScalar>,
    order: Vec<u32>,
    rows_sent: usize,
    rows_seq: u32,
    key_m: Option<curve25519_dalek::ristretto::RistrettoPoint>,
    a_seq: u32,
    received: u64,
    blinded: Vec<Vec<PointBytes>>,
    shuffle_rng: SessionRng,
    tokens: Option<Vec<PointBytes>>,
    tokens_sent: usize,
    tokens_seq: u32,
}

impl core::fmt::Debug for HolderStreaming {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HolderStreaming")
            .field("n", &self.n)
            .field("m", &self.m)
            .field("blocks", &self.blocks.len())
            .field("d_max", &self.d_max)
            .field("rows_sent", &self.rows_sent)
            .field("tokens_received", &self.received)
            .field("tokens_sent", &self.tokens_sent)
            .finish_non_exhaustive()
    }
}

impl HolderStreaming {
    /// The session id.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The next message to send, if one is ready: row chunks first, then, once
    /// every matcher token has arrived, the tokens `E`, block by block.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        if self.rows_sent < self.order.len() {
            return Some(self.next_rows_chunk());
        }
        let tokens = self.tokens.as_ref()?;
        if self.tokens_sent < tokens.len() {
            let end = (self.tokens_sent + self.chunk_points).min(tokens.len());
            let points = flatten(tokens.get(self.tokens_sent..end).unwrap_or(&[]));
            self.tokens_sent = end;
            let seq = self.tokens_seq;
            self.tokens_seq += 1;
            return Some(Message::HolderTokens(PointChunk {
                session: self.session,
                seq,
                points,
            }));
        }
        None
    }

    fn next_rows_chunk(&mut self) -> Message {
        if let Some(mut multi_key) = self.multi_key.take() {
            let chunk = self.next_multi_key_rows_chunk(&mut multi_key);
            self.multi_key = Some(multi_key);
            return chunk;
        }
        let end = (self.rows_sent + self.chunk_points).min(self.order.len());
        let entries = self.order.get(self.rows_sent..end).unwrap_or(&[]);
        let customers: Vec<&[u8]> = entries
            .iter()
            .filter(|e| !is_dummy(**e, self.n))
            .filter_map(|e| self.ids.get(*e as usize).map(Vec::as_slice))
            .collect();
        let computed = hash_mul_compress(&self.h2g, &customers, &self.kb);
        let mut computed = computed.into_iter();
        let mut points = Vec::with_capacity(entries.len() * POINT_LEN);
        for e in entries {
            let p = if is_dummy(*e, self.n) {
                self.dummy_rows.get((u64::from(*e) - self.n) as usize).copied()
            } else {
                computed.next()
            };
            points.extend_from_slice(&p.unwrap_or([0u8; 32]));
        }
        self.rows_message(end, points)
    }

    /// The chunk of rows up to `end` (not included), made of `points`.
    fn rows_message(&mut self, end: usize, points: Vec<u8>) -> Message {
        self.rows_sent = end;
        let seq = self.rows_seq;
        self.rows_seq += 1;
        Message::HolderRows(PointChunk {
            session: self.session,
            seq,
            points,
        })
    }

    /// A chunk of a multi-key join's rows: as many whole rows of `K`
    /// points as fit in a chunk. Every slot of a customer's row, its keys
    /// and the padding for the keys it lacks alike, is `kb·H2G(input)` in
    /// one batch, so a chunk's work follows its length only; each row's
    /// slots are then put in a fresh random order.
    fn next_multi_key_rows_chunk(&mut self, multi_key: &mut MultiKeyRows) -> Message {
        let MultiKeyRows { slots, rng: slot_rng } = multi_key;
        let k = slots.k;
        let rows = (self.chunk_points / k).max(1);
        let end = (self.rows_sent + rows).min(self.order.len());
        let entries = self.order.get(self.rows_sent..end).unwrap_or(&[]);
        let customers: Vec<core::ops::Range<usize>> = entries
            .iter()
            .filter(|e| !is_dummy(**e, self.n))
            .map(|e| slots.range(*e as usize))
            .collect();
        // `K` padding inputs per customer whatever it lacks, so that the
        // draws too follow the chunk's length only.
        let pads: Vec<Zeroizing<Vec<u8>>> = (0..customers.len() * k).map(|_| pad_input(slot_rng)).collect();
        let mut inputs: Vec<&[u8]> = Vec::with_capacity(customers.len() * k);
        for (r, row_pads) in customers.iter().zip(pads.chunks(k)) {
            inputs.extend(self.ids.get(r.clone()).unwrap_or(&[]).iter().map(Vec::as_slice));
            inputs.extend(row_pads.iter().skip(r.len()).map(|p| p.as_slice()));
        }
        let computed = hash_mul_compress(&self.h2g, &inputs, &self.kb);
        drop(inputs);
        drop(pads);
        let mut computed = computed.chunks_exact(k);
        let mut points = Vec::with_capacity(entries.len() * k * POINT_LEN);
        let mut row: Vec<PointBytes> = Vec::with_capacity(k);
        for e in entries {
            row.clear();
            let slots_of_row = if is_dummy(*e, self.n) {
                let at = ((u64::from(*e) - self.n) as usize).saturating_mul(k);
                self.dummy_rows.get(at..at.saturating_add(k))
            } else {
                computed.next()
            };
            row.extend_from_slice(slots_of_row.unwrap_or(&[]));
            row.resize(k, [0u8; 32]);
            shuffle(&mut row, slot_rng);
            for p in &row {
                points.extend_from_slice(p);
            }
        }
        self.rows_message(end, points)
    }

    /// Reads one frame from the matcher.
    ///
    /// # Errors
    /// A peer fault for anything but the next expected message, well formed.
    pub fn handle(&mut self, frame: &[u8]) -> Result<(), ProtocolError> {
        match decode_for(frame, &self.session)? {
            Message::MatcherKey(k) => {
                if self.key_m.is_some() {
                    return Err(ProtocolError::UnexpectedMessage {
                        got: "MatcherKey",
                        state: "the matcher's key was already received",
                    });
                }
                self.key_m = Some(decode_point(&k.key)?);
                self.maybe_build_tokens()
            }
            Message::MatcherTokens(chunk) => {
                if self.key_m.is_none() {
                    return Err(ProtocolError::UnexpectedMessage {
                        got: "MatcherTokens",
                        state: "waiting for the matcher's key",
                    });
                }
                if chunk.seq != self.a_seq {
                    return Err(ProtocolError::OutOfOrder {
                        stream: "matcher tokens",
                        expected: self.a_seq,
                        got: chunk.seq,
                    });
                }
                let got = self.received + chunk.count() as u64;
                if got > self.m || self.tokens.is_some() {
                    return Err(ProtocolError::Count {
                        stream: "matcher tokens",
                        expected: self.m,
                        got,
                    });
                }
                let points = split_points(&chunk.points)?;
                let out = decode_mul_compress(&points, &self.kb)?;
                for p in out {
                    let b = block_of(self.received, &self.blocks).ok_or(ProtocolError::Count {
                        stream: "matcher tokens",
                        expected: self.m,
                        got,
                    })?;
                    if let Some(block) = self.blinded.get_mut(b) {
                        block.push(p);
                    }
                    self.received += 1;
                }
                self.a_seq += 1;
                self.maybe_build_tokens()
            }
            other => Err(ProtocolError::UnexpectedMessage {
                got: other.kind(),
                state: "streaming the join (holder)",
            }),
        }
    }

    /// Once the key and all `m` tokens are in: per block,
    /// `E_b = {kb * A_j} ∪ {Q_{b,d}}`, the whole set checked for duplicates,
    /// each block shuffled with one permutation over the whole block (never
    /// per chunk, never in arrival order), blocks in order.
    fn maybe_build_tokens(&mut self) -> Result<(), ProtocolError> {
        let Some(key_m) = self.key_m else {
            return Ok(());
        };
        if self.tokens.is_some() || self.received < self.m {
            return Ok(());
        }
        let slots: u64 = self.patterns.iter().map(|p| p.len() as u64).sum();
        let mut all = Vec::with_capacity(capacity_hint(self.m + self.d_max * slots));
        // The dummy tokens of every block in one batch: for each pattern
        // `p`, each of its `D_max` dummy rows `d` and each slot of `p`,
        // `t·K_M` (matches that slot of dummy row `d`) for `d < D_p`, `r·K_M`
        // (a random point that matches nothing) otherwise, picked in
        // constant time, and put in the slot's block. The same
        // multiplications, and as many tokens per block, whatever the `D_p`.
        let mut keys = self.dummy_keys.iter().zip(&self.fresh_keys);
        let mut scalars: Zeroizing<Vec<Scalar>> = Zeroizing::new(Vec::with_capacity(self.dummy_keys.len()));
        let mut slot_blocks = Vec::with_capacity(self.dummy_keys.len());
        for (p, dp) in self.patterns.iter().zip(&self.d) {
            for row in 0..self.d_max {
                let matching = row.ct_lt(dp);
                for (b, (t, r)) in p.iter().zip(keys.by_ref()) {
                    scalars.push(Scalar::conditional_select(r.expose(), t.expose(), matching));
                    slot_blocks.push(*b as usize);
                }
            }
        }
        let dummy_tokens = point::muls_compress(&scalars, &key_m);
        drop(scalars);
        let mut per_block: Vec<Vec<PointBytes>> = vec![Vec::new(); self.blinded.len()];
        for (t, b) in dummy_tokens.iter().zip(&slot_blocks) {
            if let Some(block) = per_block.get_mut(*b) {
                block.push(*t);
            }
        }
        for (blinded, dummies) in std::mem::take(&mut self.blinded).into_iter().zip(per_block) {
            let mut block = blinded;
            block.extend(dummies);
            shuffle(&mut block, &mut self.shuffle_rng);
            all.extend(block);
        }
        if point::has_duplicate(&all) {
            return Err(ProtocolError::Crypto(cleanroom_crypto::CryptoError::DuplicatePoint));
        }
        self.tokens = Some(all);
        Ok(())
    }

    /// True once every row and every token has been handed out.
    pub fn is_done(&self) -> bool {
        self.rows_sent == self.order.len() && self.tokens.as_ref().is_some_and(|t| self.tokens_sent == t.len())
    }

    /// The join's result for the holder: its row order.
    ///
    /// # Errors
    /// [`ProtocolError::Incomplete`] before [`Self::is_done`].
    pub fn finish(self) -> Result<HolderJoined, ProtocolError> {
        if !self.is_done() {
            return Err(ProtocolError::Incomplete {
                what: "rows or tokens not all exchanged",
            });
        }
        Ok(HolderJoined {
            session: self.session,
            n: self.n,
            d: self.d,
            d_max: self.d_max,
            order: self.order,
        })
    }
}

/// What the holder keeps from a join: which row is which customer (or a dummy).
#[derive(Clone)]
pub struct HolderJoined {
    session: SessionId,
    n: u64,
    d: Vec<u64>,
    d_max: u64,
    order: Vec<u32>,
}

impl core::fmt::Debug for HolderJoined {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HolderJoined")
            .field("n", &self.n)
            .field("blocks", &self.d.len())
            .field("d_max", &self.d_max)
            .finish_non_exhaustive()
    }
}

impl HolderJoined {
    /// The join session.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Number of rows (`n + P * D_max` for `P` match patterns: `G` blocks
    /// with one key slot).
    pub fn rows(&self) -> usize {
        self.order.len()
    }

    /// The holder's set size `n`.
    pub fn customers(&self) -> u64 {
        self.n
    }

    /// Rebuilds a cached join from its parts (as stored by the node).
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] when the parts are inconsistent.
    pub fn from_parts(
        session: SessionId,
        n: u64,
        d: Vec<u64>,
        d_max: u64,
        order: Vec<u32>,
    ) -> Result<Self, ProtocolError> {
        let total = n + d_max * d.len() as u64;
        if order.len() as u64 != total || d.iter().any(|x| *x > d_max) || order.iter().any(|e| u64::from(*e) >= total) {
            return Err(ProtocolError::LocalInput {
                reason: "stored holder join is inconsistent",
            });
        }
        Ok(Self {
            session,
            n,
            d,
            d_max,
            order,
        })
    }

    /// The join as the holder caches it (the session is stored beside it):
    /// `[JOIN_CACHE_VERSION][n][D_max][blocks][D_b per block][row order]`,
    /// the counts as `u64` and the order as `u32`, little endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(25 + self.d.len() * 8 + self.order.len() * 4);
        out.push(JOIN_CACHE_VERSION);
        for x in [self.n, self.d_max, self.d.len() as u64].iter().chain(&self.d) {
            out.extend_from_slice(&x.to_le_bytes());
        }
        for o in &self.order {
            out.extend_from_slice(&o.to_le_bytes());
        }
        out
    }

    /// Strict inverse of [`HolderJoined::encode`].
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for another version, a payload shorter
    /// or longer than its counts say, more than [`MAX_BLOCKS`] blocks, or
    /// parts that do not fit together.
    pub fn decode(session: SessionId, bytes: &[u8]) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::LocalInput {
            reason: "stored holder join does not decode",
        };
        let (&version, rest) = bytes.split_first().ok_or_else(bad)?;
        if version != JOIN_CACHE_VERSION {
            return Err(bad());
        }
        let word = |k: usize| -> Option<u64> {
            let b = rest.get(k.checked_mul(8)?..k.checked_mul(8)?.checked_add(8)?)?;
            Some(u64::from_le_bytes(<[u8; 8]>::try_from(b).ok()?))
        };
        let (n, d_max, blocks) = (
            word(0).ok_or_else(bad)?,
            word(1).ok_or_else(bad)?,
            word(2).ok_or_else(bad)?,
        );
        let blocks = usize::try_from(blocks)
            .ok()
            .filter(|b| *b <= MAX_BLOCKS)
            .ok_or_else(bad)?;
        let rows = d_max
            .checked_mul(blocks as u64)
            .and_then(|x| x.checked_add(n))
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(bad)?;
        let expected = rows
            .checked_mul(4)
            .and_then(|x| x.checked_add(24 + 8 * blocks))
            .ok_or_else(bad)?;
        if rest.len() != expected {
            return Err(bad());
        }
        let d: Vec<u64> = (3..3 + blocks).map(word).collect::<Option<_>>().ok_or_else(bad)?;
        let order: Vec<u32> = rest
            .get(24 + 8 * blocks..)
            .ok_or_else(bad)?
            .chunks_exact(4)
            .filter_map(|c| <[u8; 4]>::try_from(c).ok().map(u32::from_le_bytes))
            .collect();
        Self::from_parts(session, n, d, d_max, order)
    }

    /// The parts to store: `(session, n, D_b per block, D_max, row order)`.
    pub fn parts(&self) -> (SessionId, u64, &[u64], u64, &[u32]) {
        (self.session, self.n, &self.d, self.d_max, &self.order)
    }

    /// `D`: how many dummy rows were made to match, all blocks together.
    /// Holder-local: it never leaves the node (the matcher sees only noisy counts).
    pub fn matching_dummies(&self) -> u64 {
        self.d.iter().sum()
    }

    /// `D_b` per block (holder-local); in a multi-key join, `D_p` per
    /// match pattern, in [`match_patterns`]'s order.
    pub fn matching_dummies_per_block(&self) -> &[u64] {
        &self.d
    }

    /// `D_max`, public (per block; per match pattern in a multi-key join).
    pub fn dummy_rows(&self) -> u64 {
        self.d_max
    }

    /// The customer behind row `i` (its index in the holder's identifier
    /// list), or `None` for a dummy row or an index out of range.
    pub fn customer_of_row(&self, i: usize) -> Option<usize> {
        self.order
            .get(i)
            .filter(|e| !is_dummy(**e, self.n))
            .map(|e| *e as usize)
    }
}

// ---------------------------------------------------------------- matcher

/// The matcher before it opens a join.
pub struct MatcherJoin {
    params: JoinParams,
    policy: MatcherPolicy,
    h2g: HashToGroup,
    blocks: Vec<Vec<Vec<u8>>>,
    padding_seed: Option<PaddingSeed>,
    patterns: Patterns,
}

/// What the matcher needs of the match patterns ([`match_patterns`]): the
/// key slots `K`, how many patterns there are, and for each block how many
/// slots of all patterns fall in it (the holder's dummy tokens per dummy
/// row index). With one key slot: `G` patterns, one slot per block.
#[derive(Clone, Debug)]
struct Patterns {
    k: usize,
    count: u64,
    slots_per_block: Vec<u64>,
}

impl Patterns {
    fn new(blocks: usize, k: usize) -> Result<Self, ProtocolError> {
        let patterns = match_patterns(blocks, k)?;
        let mut slots_per_block = vec![0u64; blocks];
        for b in patterns.iter().flatten() {
            if let Some(s) = slots_per_block.get_mut(*b as usize) {
                *s += 1;
            }
        }
        Ok(Self {
            k,
            count: patterns.len() as u64,
            slots_per_block,
        })
    }
}

/// One token the matcher sends: one of its identifiers, or padding (the
/// index of its random input).
#[derive(Clone, Copy, Debug)]
enum Entry {
    Id(usize, usize),
    Pad(usize),
}

/// What a padding token is hashed from: a label no normalised identifier
/// starts with, then 32 random bytes; so `kp·H2G(input)` is a random point
/// computed exactly like a real token.
const PAD_LABEL: &[u8] = b"\xffcleanroom-v1-pad:";

fn pad_input<R: RngCore + CryptoRng>(rng: &mut R) -> Zeroizing<Vec<u8>> {
    let mut random = [0u8; 32];
    rng.fill_bytes(&mut random);
    let mut input = Zeroizing::new(Vec::with_capacity(PAD_LABEL.len() + random.len()));
    input.extend_from_slice(PAD_LABEL);
    input.extend_from_slice(&random);
    random.zeroize();
    input
}

impl MatcherJoin {
    /// A matcher with its normalised, distinct identifiers (one block).
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for bad parameters or duplicate identifiers.
    pub fn new(params: JoinParams, policy: MatcherPolicy, ids: Vec<Vec<u8>>) -> Result<Self, ProtocolError> {
        Self::grouped(params, policy, vec![ids])
    }

    /// A matcher whose identifiers are split into blocks, one per value of
    /// its grouping attribute (in the order of the plan's matcher groups).
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for bad parameters, no block, too many
    /// blocks, a duplicate identifier anywhere, or several blocks without a
    /// block-padding policy.
    pub fn grouped(
        params: JoinParams,
        policy: MatcherPolicy,
        blocks: Vec<Vec<Vec<u8>>>,
    ) -> Result<Self, ProtocolError> {
        let all: Vec<&[u8]> = blocks.iter().flatten().map(Vec::as_slice).collect();
        check_own_slices(all.into_iter())?;
        Self::unchecked(params, policy, blocks)
    }

    /// A matcher over `blocks`, whose identifiers are known to be distinct.
    fn unchecked(params: JoinParams, policy: MatcherPolicy, blocks: Vec<Vec<Vec<u8>>>) -> Result<Self, ProtocolError> {
        let h2g = params.check()?;
        if blocks.is_empty() || blocks.len() > MAX_BLOCKS {
            return Err(ProtocolError::LocalInput {
                reason: "a join has 1 to 4096 blocks",
            });
        }
        if blocks.len() > 1 && policy.block_padding.is_none() {
            return Err(ProtocolError::LocalInput {
                reason: "several blocks need a block-padding policy",
            });
        }
        let patterns = Patterns::new(blocks.len(), 1)?;
        Ok(Self {
            params,
            policy,
            h2g,
            blocks,
            padding_seed: None,
            patterns,
        })
    }

    /// A multi-key matcher: each block holds the keys of its users (of all
    /// kinds, each key once: a key several users hold is kept for the first
    /// of them), and the holder's rows have `key_slots` points each. A row
    /// matches in the lowest block any of its slots matched in; the
    /// matcher learns each row's pattern, which dummy rows cover
    /// (docs/protocol.md, "Multi-key matching").
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for key slots outside 1 to
    /// [`MAX_KEY_SLOTS`] or more patterns than a join supports.
    pub fn with_key_slots(mut self, key_slots: usize) -> Result<Self, ProtocolError> {
        self.patterns = Patterns::new(self.blocks.len(), key_slots)?;
        Ok(self)
    }

    /// As [`MatcherJoin::grouped`], with block `b` made of the identifiers
    /// `ids[k]` for `k` in `blocks[b]`: since `ids` were checked when made,
    /// only the indices are (in range, none twice), not the identifiers.
    ///
    /// # Errors
    /// As [`MatcherJoin::grouped`]; an index out of range or repeated is
    /// [`ProtocolError::LocalInput`].
    pub fn grouped_from(
        params: JoinParams,
        policy: MatcherPolicy,
        ids: &OwnIds,
        blocks: &[Vec<usize>],
    ) -> Result<Self, ProtocolError> {
        let mut used = vec![false; ids.len()];
        for k in blocks.iter().flatten() {
            match used.get_mut(*k) {
                Some(u) if !*u => *u = true,
                _ => {
                    return Err(ProtocolError::LocalInput {
                        reason: "a block index out of range or repeated",
                    });
                }
            }
        }
        let blocks = blocks
            .iter()
            .map(|b| b.iter().filter_map(|k| ids.get(*k).cloned()).collect())
            .collect();
        Self::unchecked(params, policy, blocks)
    }

    /// Draws the padding `P_b` from `seed` (expanded with ChaCha20) instead
    /// of the session's generator. A node that derives the seed from a key
    /// of its own and the join's input (filter, grouping, data version)
    /// pads every re-join of unchanged data with the same `P_b`, so the
    /// holder cannot average fresh draws over re-joins.
    #[must_use]
    pub fn with_padding_seed(mut self, seed: PaddingSeed) -> Self {
        self.padding_seed = Some(seed);
        self
    }

    /// Opens the join: draws `kp`, a nonce and the padding of each block,
    /// shuffles each block, and returns the [`JoinOffer`].
    ///
    /// # Errors
    /// [`ProtocolError::Crypto`] if the padding noise cannot be drawn.
    pub fn offer<R: RngCore + CryptoRng>(self, rng: &mut R) -> Result<(MatcherOffered, Message), ProtocolError> {
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let mut seeded = self.padding_seed.as_ref().map(|s| SessionRng::from_seed(*s.0));
        let mut entries: Vec<Entry> = Vec::new();
        let mut sizes = Vec::with_capacity(self.blocks.len());
        let mut pads = Vec::new();
        for (b, ids) in self.blocks.iter().enumerate() {
            let pad = match (&self.policy.block_padding, seeded.as_mut()) {
                (Some(p), Some(seeded)) => p.sample(seeded)?,
                (Some(p), None) => p.sample(rng)?,
                (None, _) => 0,
            };
            let mut block: Vec<Entry> = (0..ids.len()).map(|k| Entry::Id(b, k)).collect();
            block.extend((0..pad).map(|k| Entry::Pad(pads.len() + k as usize)));
            shuffle(&mut block, rng);
            sizes.push(block.len() as u64);
            entries.extend(block);
            for _ in 0..pad {
                pads.push(pad_input(rng));
            }
        }
        let m: u64 = sizes.iter().sum();
        let offer = JoinOffer {
            nonce,
            collaboration_id: self.params.collaboration_id.clone(),
            rules_hash: offer_rules_hash(&self.params.rules_hash, self.patterns.k),
            matcher_set_size: m,
            context: self.params.context,
            blocks: sizes,
        };
        let kp = SecretScalar::random(rng);
        Ok((
            MatcherOffered {
                offer: offer.clone(),
                patterns: self.patterns,
                chunk_points: self.params.chunk_points,
                policy: self.policy,
                h2g: self.h2g,
                ids: self.blocks,
                entries,
                pads,
                kp,
            },
            Message::JoinOffer(offer),
        ))
    }
}

/// The matcher waiting for the holder's accept.
pub struct MatcherOffered {
    offer: JoinOffer,
    patterns: Patterns,
    chunk_points: usize,
    policy: MatcherPolicy,
    h2g: HashToGroup,
    ids: Vec<Vec<Vec<u8>>>,
    entries: Vec<Entry>,
    pads: Vec<Zeroizing<Vec<u8>>>,
    kp: SecretScalar,
}

impl MatcherOffered {
    /// Reads the holder's accept, checks the session id and the announced sizes.
    ///
    /// # Errors
    /// A peer fault for a bad accept or sizes outside the policy.
    pub fn on_accept(self, frame: &[u8]) -> Result<MatcherStreaming, ProtocolError> {
        let accept = match Message::decode(frame)? {
            Message::JoinAccept(a) => a,
            Message::Abort(a) => return Err(ProtocolError::PeerAborted { code: a.code }),
            other => {
                return Err(ProtocolError::UnexpectedMessage {
                    got: other.kind(),
                    state: "waiting for the holder's accept",
                });
            }
        };
        let k = self.patterns.k;
        let session = join_session_id(&self.offer, &accept.nonce, accept.holder_set_size, accept.dummy_rows, k);
        if session != accept.session {
            return Err(ProtocolError::WrongSession);
        }
        self.policy.peer_set.check(accept.holder_set_size)?;
        if accept.dummy_rows > self.policy.max_dummy_rows {
            return Err(ProtocolError::DummyRows {
                got: accept.dummy_rows,
                max: self.policy.max_dummy_rows,
            });
        }
        // `D_max` dummy rows per pattern, and per block `D_max` dummy
        // tokens for each slot of a pattern in it (with one key slot: `G`
        // patterns, `D_max` dummy tokens per block).
        let too_many = ProtocolError::DummyRows {
            got: accept.dummy_rows,
            max: self.policy.max_dummy_rows,
        };
        let rows = accept
            .dummy_rows
            .checked_mul(self.patterns.count)
            .and_then(|d| d.checked_add(accept.holder_set_size))
            .filter(|r| r.checked_mul(k as u64).is_some_and(|p| p <= u64::from(u32::MAX)))
            .ok_or(too_many)?;
        let token_blocks: Vec<u64> = self
            .offer
            .blocks
            .iter()
            .zip(&self.patterns.slots_per_block)
            .map(|(b, s)| b.saturating_add(accept.dummy_rows.saturating_mul(*s)))
            .collect();
        let tokens: u64 = token_blocks.iter().fold(0u64, |a, b| a.saturating_add(*b));
        Ok(MatcherStreaming {
            session,
            chunk_points: self.chunk_points,
            h2g: self.h2g,
            ids: self.ids,
            entries: self.entries,
            pads: self.pads,
            kp: self.kp,
            key_sent: false,
            sent: 0,
            a_seq: 0,
            expected_rows: rows,
            key_slots: k,
            row_seq: 0,
            row_tokens: Vec::with_capacity(capacity_hint(rows.saturating_mul(k as u64))),
            token_blocks,
            expected_tokens: tokens,
            token_seq: 0,
            received_tokens: 0,
            tokens: std::collections::HashMap::with_capacity(capacity_hint(tokens)),
        })
    }
}

/// The matcher while rows and tokens flow.
pub struct MatcherStreaming {
    session: SessionId,
    chunk_points: usize,
    h2g: HashToGroup,
    ids: Vec<Vec<Vec<u8>>>,
    entries: Vec<Entry>,
    pads: Vec<Zeroizing<Vec<u8>>>,
    kp: SecretScalar,
    key_sent: bool,
    sent: usize,
    a_seq: u32,
    expected_rows: u64,
    key_slots: usize,
    row_seq: u32,
    /// `K` tokens per row received so far (row after row).
    row_tokens: Vec<PointBytes>,
    token_blocks: Vec<u64>,
    expected_tokens: u64,
    token_seq: u32,
    received_tokens: u64,
    tokens: std::collections::HashMap<PointBytes, u32>,
}

impl core::fmt::Debug for MatcherStreaming {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MatcherStreaming")
            .field("sent", &self.sent)
            .field("rows_received", &self.row_tokens.len())
            .field("expected_rows", &self.expected_rows)
            .field("tokens_received", &self.received_tokens)
            .field("expected_tokens", &self.expected_tokens)
            .finish_non_exhaustive()
    }
}

impl MatcherStreaming {
    /// The session id.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The next message to send: the key `K_M`, then token chunks (block by
    /// block, each block in its shuffled order, padding included).
    pub fn poll_transmit(&mut self) -> Option<Message> {
        if !self.key_sent {
            self.key_sent = true;
            return Some(Message::MatcherKey(MatcherKey {
                session: self.session,
                key: self.kp.public().compress().to_bytes(),
            }));
        }
        if self.sent < self.entries.len() {
            let end = (self.sent + self.chunk_points).min(self.entries.len());
            let chunk = self.entries.get(self.sent..end).unwrap_or(&[]);
            // Identifiers and padding alike: `kp·H2G(input)`, in one batch,
            // so a chunk's time follows its length only.
            let inputs: Vec<&[u8]> = chunk
                .iter()
                .map(|e| match e {
                    Entry::Id(b, k) => self.ids.get(*b).and_then(|ids| ids.get(*k)).map(Vec::as_slice),
                    Entry::Pad(k) => self.pads.get(*k).map(|p| p.as_slice()),
                })
                .map(|x| x.unwrap_or(&[]))
                .collect();
            let computed = hash_mul_compress(&self.h2g, &inputs, &self.kp);
            let mut points = Vec::with_capacity(chunk.len() * POINT_LEN);
            for p in &computed {
                points.extend_from_slice(p);
            }
            self.sent = end;
            let seq = self.a_seq;
            self.a_seq += 1;
            return Some(Message::MatcherTokens(PointChunk {
                session: self.session,
                seq,
                points,
            }));
        }
        None
    }

    /// Reads one frame from the holder.
    ///
    /// # Errors
    /// A peer fault for anything but the next expected chunk, well formed.
    pub fn handle(&mut self, frame: &[u8]) -> Result<(), ProtocolError> {
        match decode_for(frame, &self.session)? {
            Message::HolderRows(chunk) => {
                if chunk.seq != self.row_seq {
                    return Err(ProtocolError::OutOfOrder {
                        stream: "holder rows",
                        expected: self.row_seq,
                        got: chunk.seq,
                    });
                }
                let k = self.key_slots.max(1);
                let got = (self.row_tokens.len() / k) as u64 + (chunk.count() / k) as u64;
                if got > self.expected_rows || !chunk.count().is_multiple_of(k) {
                    return Err(ProtocolError::Count {
                        stream: "holder rows",
                        expected: self.expected_rows,
                        got,
                    });
                }
                let points = split_points(&chunk.points)?;
                let t = decode_mul_compress(&points, &self.kp)?;
                self.row_tokens.extend_from_slice(&t);
                self.row_seq += 1;
                Ok(())
            }
            Message::HolderTokens(chunk) => {
                if chunk.seq != self.token_seq {
                    return Err(ProtocolError::OutOfOrder {
                        stream: "holder tokens",
                        expected: self.token_seq,
                        got: chunk.seq,
                    });
                }
                let got = self.received_tokens + chunk.count() as u64;
                if got > self.expected_tokens {
                    return Err(ProtocolError::Count {
                        stream: "holder tokens",
                        expected: self.expected_tokens,
                        got,
                    });
                }
                let points = split_points(&chunk.points)?;
                for p in &points {
                    check_token_encoding(p)?;
                    let b = block_of(self.received_tokens, &self.token_blocks).ok_or(ProtocolError::Count {
                        stream: "holder tokens",
                        expected: self.expected_tokens,
                        got,
                    })?;
                    if self.tokens.insert(*p, b as u32).is_some() {
                        return Err(ProtocolError::Crypto(cleanroom_crypto::CryptoError::DuplicatePoint));
                    }
                    self.received_tokens += 1;
                }
                self.token_seq += 1;
                Ok(())
            }
            other => Err(ProtocolError::UnexpectedMessage {
                got: other.kind(),
                state: "streaming the join (matcher)",
            }),
        }
    }

    /// True once everything has been sent and received.
    pub fn is_done(&self) -> bool {
        self.key_sent
            && self.sent == self.entries.len()
            && self.row_tokens.len() as u64 == self.expected_rows.saturating_mul(self.key_slots as u64)
            && self.received_tokens == self.expected_tokens
    }

    /// The join's result for the matcher: for each of the holder's rows, the
    /// block it matched in, if any.
    ///
    /// # Errors
    /// [`ProtocolError::Incomplete`] before [`Self::is_done`];
    /// a duplicate-point error if the holder sent the same row twice.
    pub fn finish(self) -> Result<MatcherJoined, ProtocolError> {
        if !self.is_done() {
            return Err(ProtocolError::Incomplete {
                what: "rows or tokens not all exchanged",
            });
        }
        if point::has_duplicate(&self.row_tokens) {
            return Err(ProtocolError::Crypto(cleanroom_crypto::CryptoError::DuplicatePoint));
        }
        // A row's label: the lowest block any of its slots matched in.
        let labels: Vec<u32> = self
            .row_tokens
            .par_chunks(self.key_slots.max(1))
            .map(|row| {
                row.iter()
                    .filter_map(|t| self.tokens.get(t).copied())
                    .min()
                    .unwrap_or(UNMATCHED)
            })
            .collect();
        Ok(MatcherJoined::from_labels(
            self.session,
            labels,
            self.token_blocks.len(),
        ))
    }
}

/// The label of a row that matched in no block.
pub const UNMATCHED: u32 = u32::MAX;

/// What the matcher keeps from a join: per holder row, the block it matched
/// in (`e_i` and its group label).
#[derive(Clone)]
pub struct MatcherJoined {
    session: SessionId,
    labels: Vec<u32>,
    matched: Vec<bool>,
    block_counts: Vec<u64>,
}

impl core::fmt::Debug for MatcherJoined {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MatcherJoined")
            .field("rows", &self.labels.len())
            .field("matched_count", &self.matched_count())
            .finish_non_exhaustive()
    }
}

impl MatcherJoined {
    fn from_labels(session: SessionId, labels: Vec<u32>, blocks: usize) -> Self {
        let mut block_counts = vec![0u64; blocks];
        for l in &labels {
            if let Some(c) = block_counts.get_mut(*l as usize) {
                *c += 1;
            }
        }
        let matched = labels.iter().map(|l| *l != UNMATCHED).collect();
        Self {
            session,
            labels,
            matched,
            block_counts,
        }
    }

    /// Rebuilds a cached join from its parts (as stored by the node).
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for a label outside the blocks.
    pub fn from_parts(session: SessionId, labels: Vec<u32>, blocks: usize) -> Result<Self, ProtocolError> {
        if blocks == 0 || labels.iter().any(|l| *l != UNMATCHED && *l as usize >= blocks) {
            return Err(ProtocolError::LocalInput {
                reason: "stored matcher join is inconsistent",
            });
        }
        Ok(Self::from_labels(session, labels, blocks))
    }

    /// The join as the matcher caches it (the session is stored beside
    /// it): `[JOIN_CACHE_VERSION][blocks: u32][rows: u64][label per holder
    /// row: u32]`, little endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(13 + self.labels.len() * 4);
        out.push(JOIN_CACHE_VERSION);
        out.extend_from_slice(&(self.blocks() as u32).to_le_bytes());
        out.extend_from_slice(&(self.labels.len() as u64).to_le_bytes());
        for l in &self.labels {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out
    }

    /// Strict inverse of [`MatcherJoined::encode`].
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for another version, a length other
    /// than its row count says, no blocks or more than [`MAX_BLOCKS`], or a
    /// label outside the blocks.
    pub fn decode(session: SessionId, bytes: &[u8]) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::LocalInput {
            reason: "stored matcher join does not decode",
        };
        let (&version, rest) = bytes.split_first().ok_or_else(bad)?;
        if version != JOIN_CACHE_VERSION {
            return Err(bad());
        }
        let blocks = rest
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .and_then(|b| usize::try_from(b).ok())
            .filter(|b| (1..=MAX_BLOCKS).contains(b))
            .ok_or_else(bad)?;
        let rows = rest
            .get(4..12)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(bad)?;
        let labels = rest.get(12..).ok_or_else(bad)?;
        if Some(labels.len()) != rows.checked_mul(4) {
            return Err(bad());
        }
        let labels = labels
            .chunks_exact(4)
            .filter_map(|c| <[u8; 4]>::try_from(c).ok().map(u32::from_le_bytes))
            .collect();
        Self::from_parts(session, labels, blocks)
    }

    /// The join session.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// `e`: one bit per holder row.
    pub fn matched(&self) -> &[bool] {
        &self.matched
    }

    /// Per holder row, the block it matched in, or [`UNMATCHED`].
    pub fn labels(&self) -> &[u32] {
        &self.labels
    }

    /// The choice bits of one matcher group: `e_i AND label_i == g`.
    pub fn choices_for_block(&self, block: u32) -> Vec<bool> {
        self.labels.iter().map(|l| *l == block).collect()
    }

    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.block_counts.len()
    }

    /// `|X ∩ Y_b| + D_b` per block: all the matcher learns about the overlap.
    pub fn block_counts(&self) -> &[u64] {
        &self.block_counts
    }

    /// `|X ∩ Y| + D`, all blocks together.
    pub fn matched_count(&self) -> u64 {
        self.block_counts.iter().sum()
    }

    /// Number of rows (`n + P * D_max`, as [`HolderJoined::rows`]).
    pub fn rows(&self) -> usize {
        self.labels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> JoinParams {
        JoinParams {
            collaboration_id: "slots".into(),
            rules_hash: [1; 32],
            context: [2; 32],
            chunk_points: 64,
        }
    }

    fn limits() -> SetSizeLimits {
        SetSizeLimits {
            min: 0,
            max: MAX_SET_SIZE,
        }
    }

    /// Runs a join to the end and returns the matcher before `finish`.
    fn joined(holder: HolderJoin, matcher: MatcherJoin) -> MatcherStreaming {
        let mut rng_h = SessionRng::from_seed([3; 32]);
        let mut rng_m = SessionRng::from_seed([4; 32]);
        let (offered, offer) = matcher.offer(&mut rng_m).unwrap();
        let pending = holder.on_offer(&offer.encode().unwrap(), &mut rng_h).unwrap();
        let (mut h, accept) = pending.charge_recorded();
        let mut m = offered.on_accept(&accept.encode().unwrap()).unwrap();
        while !(h.is_done() && m.is_done()) {
            let mut moved = false;
            while let Some(msg) = m.poll_transmit() {
                h.handle(&msg.encode().unwrap()).unwrap();
                moved = true;
            }
            while let Some(msg) = h.poll_transmit() {
                m.handle(&msg.encode().unwrap()).unwrap();
                moved = true;
            }
            assert!(moved, "the join stalled");
        }
        m
    }

    /// The blocks are the matcher's choice: an offer whose blocks would make
    /// more match patterns than a join allows is its fault, refused before
    /// anything is charged or computed; and a holder whose key slots differ
    /// from the offer's refuses it the same way.
    #[test]
    fn an_offer_with_too_many_patterns_or_other_key_slots_is_refused() {
        let holder = || {
            HolderJoin::with_key_slots(
                params(),
                HolderPolicy {
                    peer_set: limits(),
                    cardinality: ShiftedTruncatedLaplace::new(1, 1, 1_000_000).unwrap(),
                },
                vec![vec![b"email:a".to_vec(), b"phone:a".to_vec()]],
                2,
            )
            .unwrap()
        };
        let offer = |blocks: usize, key_slots: usize| {
            Message::JoinOffer(JoinOffer {
                nonce: [5; 32],
                collaboration_id: params().collaboration_id,
                rules_hash: offer_rules_hash(&params().rules_hash, key_slots),
                matcher_set_size: blocks as u64,
                context: params().context,
                blocks: vec![1; blocks],
            })
            .encode()
            .unwrap()
        };
        let mut rng = SessionRng::from_seed([6; 32]);
        // 63 blocks and two key slots: 2,079 patterns, 4,158 pattern slots.
        let err = holder().on_offer(&offer(63, 2), &mut rng).unwrap_err();
        assert!(
            matches!(err, ProtocolError::ParameterMismatch { what: "block sizes" }),
            "{err:?}"
        );
        assert!(holder().on_offer(&offer(62, 2), &mut rng).is_ok());
        for k in [1, 3] {
            let err = holder().on_offer(&offer(2, k), &mut rng).unwrap_err();
            assert!(matches!(err, ProtocolError::ParameterMismatch { .. }), "{err:?}");
        }
    }

    /// The matcher sees which slot of a row matched, never which kind of
    /// key it was: each customer's e-mail is its first key and only the
    /// e-mails match, yet the matched slot is the first in about half of
    /// the rows (a holder that kept the kinds' order would put it first in
    /// all of them).
    #[test]
    fn a_matched_slot_does_not_tell_its_kind() {
        let n = 400;
        let customers: Vec<Vec<Vec<u8>>> = (0..n)
            .map(|i| vec![format!("email:{i}").into_bytes(), format!("phone:{i}").into_bytes()])
            .collect();
        let emails: Vec<Vec<u8>> = (0..n).map(|i| format!("email:{i}").into_bytes()).collect();
        let holder = HolderJoin::with_key_slots(
            params(),
            HolderPolicy {
                peer_set: limits(),
                cardinality: ShiftedTruncatedLaplace::new(1, 1, 1_000_000).unwrap(),
            },
            customers,
            2,
        )
        .unwrap();
        let matcher = MatcherJoin::new(
            params(),
            MatcherPolicy {
                peer_set: limits(),
                max_dummy_rows: 1000,
                block_padding: None,
            },
            emails,
        )
        .unwrap()
        .with_key_slots(2)
        .unwrap();
        let m = joined(holder, matcher);
        let mut first = 0;
        let mut matched = 0;
        for row in m.row_tokens.chunks(2) {
            let hits: Vec<bool> = row.iter().map(|t| m.tokens.contains_key(t)).collect();
            if hits.iter().any(|h| *h) {
                matched += 1;
                if hits[0] {
                    first += 1;
                }
            }
        }
        // All 400 customers match (plus the matching dummies).
        assert!(matched >= n, "{matched} rows matched");
        // Binomial(matched, 1/2): outside 35%..65% with probability < 1e-8.
        assert!(
            first * 100 > matched * 35 && first * 100 < matched * 65,
            "{first} of {matched} matched in the first slot"
        );
    }
}
