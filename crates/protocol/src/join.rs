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
//! Each party is a state machine: bytes in ([`HolderStreaming::handle`],
//! [`MatcherStreaming::handle`]), messages out (`poll_transmit`), no I/O, no
//! clock. The steps that must happen in order are separate types.

use std::collections::HashSet;

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_crypto::h2g::HashToGroup;
use cleanroom_crypto::keys::SecretScalar;
use cleanroom_crypto::point::{
    self, DistinctPoints, POINT_LEN, PointBytes, check_token_encoding, decode_mul_compress, decode_point,
    hash_mul_compress, split_points,
};
use cleanroom_crypto::rng::shuffle;
use cleanroom_wire::{
    JoinAccept, JoinOffer, MAX_COLLABORATION_ID_LEN, MAX_POINTS_PER_CHUNK, MatcherKey, Message, Nonce, PointChunk,
    SessionId,
};
use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};
use rayon::prelude::*;
use ring::digest::{Context, SHA256};
use zeroize::Zeroize;

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
#[derive(Clone, Copy, Debug)]
pub struct MatcherPolicy {
    /// Accepted holder set sizes.
    pub peer_set: SetSizeLimits,
    /// The most dummy rows the matcher will process.
    pub max_dummy_rows: u64,
}

fn check_own_ids(ids: &[Vec<u8>]) -> Result<(), ProtocolError> {
    if ids.len() as u64 > MAX_SET_SIZE {
        return Err(ProtocolError::LocalInput {
            reason: "more identifiers than a join supports (2^31)",
        });
    }
    let mut seen = HashSet::with_capacity(ids.len());
    if !ids.iter().all(|x| seen.insert(x.as_slice())) {
        return Err(ProtocolError::LocalInput {
            reason: "duplicate identifiers (aggregate rows per identifier first)",
        });
    }
    Ok(())
}

fn join_session_id(offer: &JoinOffer, holder_nonce: &Nonce, n: u64, d_max: u64) -> SessionId {
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"cleanroom-v1-join-session");
    ctx.update(&offer.nonce);
    ctx.update(holder_nonce);
    ctx.update(&(offer.collaboration_id.len() as u32).to_le_bytes());
    ctx.update(offer.collaboration_id.as_bytes());
    ctx.update(&offer.rules_hash);
    ctx.update(&offer.matcher_set_size.to_le_bytes());
    ctx.update(&offer.context);
    ctx.update(&n.to_le_bytes());
    ctx.update(&d_max.to_le_bytes());
    let d = ctx.finish();
    let mut sid = [0u8; 16];
    sid.copy_from_slice(d.as_ref().get(..16).unwrap_or(&[0u8; 16]));
    sid
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

// ---------------------------------------------------------------- holder

/// The holder before any offer.
#[derive(Debug)]
pub struct HolderJoin {
    params: JoinParams,
    policy: HolderPolicy,
    h2g: HashToGroup,
    ids: Vec<Vec<u8>>,
}

impl HolderJoin {
    /// A holder with its normalised, distinct identifiers (one per customer,
    /// in the order its aggregate values will use).
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for bad parameters or duplicate identifiers.
    pub fn new(params: JoinParams, policy: HolderPolicy, ids: Vec<Vec<u8>>) -> Result<Self, ProtocolError> {
        let h2g = params.check()?;
        check_own_ids(&ids)?;
        Ok(Self {
            params,
            policy,
            h2g,
            ids,
        })
    }

    /// Reads the matcher's offer, checks it against this node's parameters
    /// and policy, and draws the session's secrets and the dummy count `D`.
    /// Nothing is sent yet: the cardinality charge must be recorded first.
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
        if offer.rules_hash != self.params.rules_hash {
            return Err(ProtocolError::ParameterMismatch {
                what: "identifier normalisation rules",
            });
        }
        if offer.context != self.params.context {
            return Err(ProtocolError::ParameterMismatch { what: "join context" });
        }
        self.policy.peer_set.check(offer.matcher_set_size)?;

        let n = self.ids.len() as u64;
        let d_max = self.policy.cardinality.d_max();
        let d = self.policy.cardinality.sample(rng)?;
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let session = join_session_id(&offer, &nonce, n, d_max);
        let kb = SecretScalar::random(rng);
        let dummy_keys: Vec<SecretScalar> = (0..d_max).map(|_| SecretScalar::random(rng)).collect();
        let dummy_rows: Vec<PointBytes> = dummy_keys.iter().map(|t| t.public().compress().to_bytes()).collect();
        let non_matching: Vec<PointBytes> = (d..d_max)
            .map(|_| SecretScalar::random(rng).public().compress().to_bytes())
            .collect();
        let total = n + d_max;
        let mut order: Vec<u32> = (0..total as u32).collect();
        shuffle(&mut order, rng);
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let shuffle_rng = ChaCha20Rng::from_seed(seed);
        seed.zeroize();

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
                n,
                m: offer.matcher_set_size,
                d,
                d_max,
                kb,
                dummy_keys,
                dummy_rows,
                non_matching,
                order,
                rows_sent: 0,
                rows_seq: 0,
                key_m: None,
                a_seq: 0,
                blinded: Vec::with_capacity(capacity_hint(offer.matcher_set_size)),
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

    /// The matcher's announced set size `m`.
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
    ids: Vec<Vec<u8>>,
    n: u64,
    m: u64,
    d: u64,
    d_max: u64,
    kb: SecretScalar,
    dummy_keys: Vec<SecretScalar>,
    dummy_rows: Vec<PointBytes>,
    non_matching: Vec<PointBytes>,
    order: Vec<u32>,
    rows_sent: usize,
    rows_seq: u32,
    key_m: Option<curve25519_dalek::ristretto::RistrettoPoint>,
    a_seq: u32,
    blinded: Vec<PointBytes>,
    shuffle_rng: ChaCha20Rng,
    tokens: Option<Vec<PointBytes>>,
    tokens_sent: usize,
    tokens_seq: u32,
}

impl core::fmt::Debug for HolderStreaming {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HolderStreaming")
            .field("n", &self.n)
            .field("m", &self.m)
            .field("d_max", &self.d_max)
            .field("rows_sent", &self.rows_sent)
            .field("tokens_received", &self.blinded.len())
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
    /// every matcher token has arrived, the shuffled tokens `E`.
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
        self.rows_sent = end;
        let seq = self.rows_seq;
        self.rows_seq += 1;
        Message::HolderRows(PointChunk {
            session: self.session,
            seq,
            points,
        })
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
                let got = self.blinded.len() as u64 + chunk.count() as u64;
                if got > self.m || self.tokens.is_some() {
                    return Err(ProtocolError::Count {
                        stream: "matcher tokens",
                        expected: self.m,
                        got,
                    });
                }
                let points = split_points(&chunk.points)?;
                let out = decode_mul_compress(&points, &self.kb)?;
                self.blinded.extend_from_slice(&out);
                self.a_seq += 1;
                self.maybe_build_tokens()
            }
            other => Err(ProtocolError::UnexpectedMessage {
                got: other.kind(),
                state: "streaming the join (holder)",
            }),
        }
    }

    /// Once the key and all `m` tokens are in: `E = {kb * A_j} ∪ {Q_d}`,
    /// checked for duplicates, then shuffled with one permutation over the
    /// whole set (never per chunk, never in arrival order).
    fn maybe_build_tokens(&mut self) -> Result<(), ProtocolError> {
        let Some(key_m) = self.key_m else {
            return Ok(());
        };
        if self.tokens.is_some() || (self.blinded.len() as u64) < self.m {
            return Ok(());
        }
        let mut tokens = std::mem::take(&mut self.blinded);
        let matching: Vec<curve25519_dalek::ristretto::RistrettoPoint> = self
            .dummy_keys
            .iter()
            .take(self.d as usize)
            .map(|t| t.expose() * key_m)
            .collect();
        tokens.extend(point::compress_batch(&matching));
        tokens.extend_from_slice(&self.non_matching);
        let mut sorted = tokens.clone();
        sorted.par_sort_unstable();
        if sorted.windows(2).any(|w| w.first() == w.get(1)) {
            return Err(ProtocolError::Crypto(cleanroom_crypto::CryptoError::DuplicatePoint));
        }
        drop(sorted);
        shuffle(&mut tokens, &mut self.shuffle_rng);
        self.tokens = Some(tokens);
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
    d: u64,
    d_max: u64,
    order: Vec<u32>,
}

impl core::fmt::Debug for HolderJoined {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HolderJoined")
            .field("n", &self.n)
            .field("d_max", &self.d_max)
            .finish_non_exhaustive()
    }
}

impl HolderJoined {
    /// The join session.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Number of rows (`n + D_max`).
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
    pub fn from_parts(session: SessionId, n: u64, d: u64, d_max: u64, order: Vec<u32>) -> Result<Self, ProtocolError> {
        if order.len() as u64 != n + d_max || d > d_max || order.iter().any(|e| u64::from(*e) >= n + d_max) {
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

    /// The parts to store: `(session, n, D, D_max, row order)`.
    pub fn parts(&self) -> (SessionId, u64, u64, u64, &[u32]) {
        (self.session, self.n, self.d, self.d_max, &self.order)
    }

    /// `D`: how many of the dummy rows were made to match. Holder-local: it
    /// never leaves the node (the matcher sees only `|X ∩ Y| + D`).
    pub fn matching_dummies(&self) -> u64 {
        self.d
    }

    /// `D_max`, public.
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
#[derive(Debug)]
pub struct MatcherJoin {
    params: JoinParams,
    policy: MatcherPolicy,
    h2g: HashToGroup,
    ids: Vec<Vec<u8>>,
}

impl MatcherJoin {
    /// A matcher with its normalised, distinct identifiers. Their order is
    /// shuffled before anything is computed from them.
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for bad parameters or duplicate identifiers.
    pub fn new(params: JoinParams, policy: MatcherPolicy, ids: Vec<Vec<u8>>) -> Result<Self, ProtocolError> {
        let h2g = params.check()?;
        check_own_ids(&ids)?;
        Ok(Self {
            params,
            policy,
            h2g,
            ids,
        })
    }

    /// Opens the join: draws `kp` and a nonce, shuffles its identifiers, and
    /// returns the [`JoinOffer`].
    pub fn offer<R: RngCore + CryptoRng>(mut self, rng: &mut R) -> (MatcherOffered, Message) {
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        shuffle(&mut self.ids, rng);
        let offer = JoinOffer {
            nonce,
            collaboration_id: self.params.collaboration_id.clone(),
            rules_hash: self.params.rules_hash,
            matcher_set_size: self.ids.len() as u64,
            context: self.params.context,
        };
        let kp = SecretScalar::random(rng);
        (
            MatcherOffered {
                offer: offer.clone(),
                chunk_points: self.params.chunk_points,
                policy: self.policy,
                h2g: self.h2g,
                ids: self.ids,
                kp,
            },
            Message::JoinOffer(offer),
        )
    }
}

/// The matcher waiting for the holder's accept.
#[derive(Debug)]
pub struct MatcherOffered {
    offer: JoinOffer,
    chunk_points: usize,
    policy: MatcherPolicy,
    h2g: HashToGroup,
    ids: Vec<Vec<u8>>,
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
        let session = join_session_id(&self.offer, &accept.nonce, accept.holder_set_size, accept.dummy_rows);
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
        let rows = accept.holder_set_size + accept.dummy_rows;
        let tokens = self.offer.matcher_set_size + accept.dummy_rows;
        Ok(MatcherStreaming {
            session,
            chunk_points: self.chunk_points,
            h2g: self.h2g,
            ids: self.ids,
            kp: self.kp,
            key_sent: false,
            ids_sent: 0,
            a_seq: 0,
            expected_rows: rows,
            row_seq: 0,
            row_tokens: Vec::with_capacity(capacity_hint(rows)),
            expected_tokens: tokens,
            token_seq: 0,
            tokens: DistinctPoints::with_capacity(capacity_hint(tokens)),
        })
    }
}

/// The matcher while rows and tokens flow.
pub struct MatcherStreaming {
    session: SessionId,
    chunk_points: usize,
    h2g: HashToGroup,
    ids: Vec<Vec<u8>>,
    kp: SecretScalar,
    key_sent: bool,
    ids_sent: usize,
    a_seq: u32,
    expected_rows: u64,
    row_seq: u32,
    row_tokens: Vec<PointBytes>,
    expected_tokens: u64,
    token_seq: u32,
    tokens: DistinctPoints,
}

impl core::fmt::Debug for MatcherStreaming {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MatcherStreaming")
            .field("ids_sent", &self.ids_sent)
            .field("rows_received", &self.row_tokens.len())
            .field("expected_rows", &self.expected_rows)
            .field("tokens_received", &self.tokens.len())
            .field("expected_tokens", &self.expected_tokens)
            .finish_non_exhaustive()
    }
}

impl MatcherStreaming {
    /// The session id.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The next message to send: the key `K_M`, then token chunks.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        if !self.key_sent {
            self.key_sent = true;
            return Some(Message::MatcherKey(MatcherKey {
                session: self.session,
                key: self.kp.public().compress().to_bytes(),
            }));
        }
        if self.ids_sent < self.ids.len() {
            let end = (self.ids_sent + self.chunk_points).min(self.ids.len());
            let chunk = self.ids.get(self.ids_sent..end).unwrap_or(&[]);
            let points = flatten(&hash_mul_compress(&self.h2g, chunk, &self.kp));
            self.ids_sent = end;
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
                let got = self.row_tokens.len() as u64 + chunk.count() as u64;
                if got > self.expected_rows {
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
                let got = self.tokens.len() as u64 + chunk.count() as u64;
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
                }
                self.tokens.insert_all(&points)?;
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
            && self.ids_sent == self.ids.len()
            && self.row_tokens.len() as u64 == self.expected_rows
            && self.tokens.len() as u64 == self.expected_tokens
    }

    /// The join's result for the matcher: `e_i` for each of the holder's rows.
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
        let mut sorted = self.row_tokens.clone();
        sorted.par_sort_unstable();
        if sorted.windows(2).any(|w| w.first() == w.get(1)) {
            return Err(ProtocolError::Crypto(cleanroom_crypto::CryptoError::DuplicatePoint));
        }
        drop(sorted);
        let matched: Vec<bool> = self.row_tokens.par_iter().map(|t| self.tokens.contains(t)).collect();
        let matched_count = matched.iter().filter(|b| **b).count() as u64;
        Ok(MatcherJoined {
            session: self.session,
            matched,
            matched_count,
        })
    }
}

/// What the matcher keeps from a join: the bit vector `e`.
#[derive(Clone)]
pub struct MatcherJoined {
    session: SessionId,
    matched: Vec<bool>,
    matched_count: u64,
}

impl core::fmt::Debug for MatcherJoined {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MatcherJoined")
            .field("rows", &self.matched.len())
            .field("matched_count", &self.matched_count)
            .finish_non_exhaustive()
    }
}

impl MatcherJoined {
    /// The join session.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// `e`: one bit per holder row.
    pub fn matched(&self) -> &[bool] {
        &self.matched
    }

    /// Rebuilds a cached join from its parts (as stored by the node).
    pub fn from_parts(session: SessionId, matched: Vec<bool>) -> Self {
        let matched_count = matched.iter().filter(|b| **b).count() as u64;
        Self {
            session,
            matched,
            matched_count,
        }
    }

    /// `|X ∩ Y| + D`: all the matcher learns about the overlap.
    pub fn matched_count(&self) -> u64 {
        self.matched_count
    }

    /// Number of rows (`n + D_max`).
    pub fn rows(&self) -> usize {
        self.matched.len()
    }
}
