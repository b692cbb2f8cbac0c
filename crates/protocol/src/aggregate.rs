//! Phase 2: the aggregate by oblivious transfer (PROTOCOL.md, "Phase 2").
//!
//! Over a cached join, the matcher M (OT receiver, choice `s_i`) and the
//! holder H (OT sender, row vectors `v_i` of `w` words) run 128 base OTs and
//! the IKNP extension; for each row H sends `d_i = v_i + m0_i - m1_i` with
//! `m_b = PRG(k_b)`; M sets `y_i = PRG(k_{s_i}) + s_i * d_i`. M's share is
//! `Σ y_i`, H's is `-Σ m0_i`; they add up to `Σ s_i v_i` in Z_{2^64}.
//!
//! Session binding: the [`OtSetup`] names the join session and the query
//! id and carries M's nonce; its id is derived from them. H's [`OtChoices`]
//! carries H's nonce, and every later message carries the id derived from
//! both. The base-OT keys are bound to that final id.

use std::collections::VecDeque;

use cleanroom_crypto::ot::{
    BLOCK_ROWS, BaseOtSender, IknpReceiver, IknpSender, RowMasks, base_ot_receive, extension_message_len, pack_bits,
};
use cleanroom_crypto::point::split_points;
use cleanroom_crypto::shares::{Share, low_bits};
use cleanroom_wire::{MaskedRows, Message, Nonce, OtChoices, OtExtend, OtSetup, SessionId};
use rand_core::{CryptoRng, RngCore};
use rayon::prelude::*;
use ring::digest::{Context, SHA256};
use zeroize::{Zeroize, Zeroizing};

use crate::ProtocolError;
use crate::join::{HolderJoined, MatcherJoined};
use crate::session::decode_for;

/// The most output cells one aggregate may have.
pub const MAX_WIDTH: usize = 4096;

/// Rows per OT chunk for a given width: about 4 MiB of masked words per
/// chunk, a multiple of 128 rows, between 128 and 8192 rows. Both sides
/// compute it from the public width.
pub fn ot_chunk_rows(width: usize) -> usize {
    let target = (4 << 20) / (8 * width.max(1));
    (target / BLOCK_ROWS * BLOCK_ROWS).clamp(BLOCK_ROWS, 8192)
}

fn digest16(parts: &[&[u8]]) -> SessionId {
    let mut ctx = Context::new(&SHA256);
    for p in parts {
        ctx.update(&(p.len() as u32).to_le_bytes());
        ctx.update(p);
    }
    let d = ctx.finish();
    let mut out = [0u8; 16];
    out.copy_from_slice(d.as_ref().get(..16).unwrap_or(&[0u8; 16]));
    cleanroom_wire::SessionId(out)
}

fn setup_session_id(
    join: &SessionId,
    query_id: &cleanroom_wire::QueryId,
    plan: &[u8; 32],
    group: u32,
    nonce: &Nonce,
    rows: u64,
    width: u32,
    bits: &CellBits,
) -> SessionId {
    let binding = bits.binding();
    let (group, rows, width) = (group.to_le_bytes(), rows.to_le_bytes(), width.to_le_bytes());
    let mut parts: Vec<&[u8]> = vec![
        b"cleanroom-v2-aggregate-setup",
        join.as_ref(),
        &query_id.0,
        plan,
        &group,
        nonce,
        &rows,
        &width,
    ];
    if !binding.is_empty() {
        parts.push(b"cell-bits");
        parts.push(&binding);
    }
    digest16(&parts)
}

fn final_session_id(setup: &SessionId, holder_nonce: &Nonce) -> SessionId {
    digest16(&[b"cleanroom-v1-aggregate", setup.as_ref(), holder_nonce])
}

/// Batches of rows a rayon job takes at least, for a chunk of `batches`
/// batches: each job sets up its own scratch (a few hundred KiB, wiped when
/// it ends), so a chunk of many batches is split into a handful of jobs,
/// not one per batch; a chunk of few batches (narrow rows) still gets two
/// jobs per thread.
fn min_batches_per_job(batches: usize) -> usize {
    (batches / (2 * rayon::current_num_threads()).max(1)).clamp(1, 8)
}

fn check_width(width: usize) -> Result<(), ProtocolError> {
    if width == 0 || width > MAX_WIDTH {
        return Err(ProtocolError::LocalInput {
            reason: "output width must be between 1 and 4096 cells",
        });
    }
    Ok(())
}

/// Each output cell's share ring `Z_{2^b}`, `b` from 1 to 64, public to
/// both sides (the nodes take it from the plan alone, `Plan::cell_bits`, so
/// that every cell's noisy sum fits). Reduction mod `2^b` is a ring homomorphism from
/// `Z_{2^64}`: the holder computes as before and sends each masked word
/// `d_i` in its cell's low `b` bits only, the matcher adds them up in
/// `Z_{2^64}`, and both shares are reduced mod `2^b` at the end; they add up
/// to the cell's sum mod `2^b`. With every cell at 64 bits the masked rows
/// are byte for byte what they were before cells had widths.
///
/// On the wire a row is its cells' low bits, cell after cell, least
/// significant bit first, in whole bytes (`row_bytes`); a chunk of rows is
/// padded with zero bytes to a multiple of 8.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellBits {
    bits: Vec<u8>,
}

impl CellBits {
    /// Every one of `width` cells at 64 bits.
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for a bad width.
    pub fn full(width: usize) -> Result<Self, ProtocolError> {
        check_width(width)?;
        Ok(Self { bits: vec![64; width] })
    }

    /// Cells of these bit widths.
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for a bad width or a cell outside 1 to
    /// 64 bits.
    pub fn new(bits: Vec<u8>) -> Result<Self, ProtocolError> {
        check_width(bits.len())?;
        if bits.iter().any(|&b| b == 0 || b > 64) {
            return Err(ProtocolError::LocalInput {
                reason: "a cell's share ring must be 1 to 64 bits wide",
            });
        }
        Ok(Self { bits })
    }

    /// The bits of each cell.
    pub fn bits(&self) -> &[u8] {
        &self.bits
    }

    /// The number of cells.
    pub fn width(&self) -> usize {
        self.bits.len()
    }

    /// Whether every cell is 64 bits wide.
    pub fn is_full(&self) -> bool {
        self.bits.iter().all(|&b| b == 64)
    }

    /// Bytes of one packed row.
    pub fn row_bytes(&self) -> usize {
        self.bits.iter().map(|&b| usize::from(b)).sum::<usize>().div_ceil(8)
    }

    /// Bytes of a chunk of `rows` packed rows (padded to a multiple of 8).
    pub fn chunk_bytes(&self, rows: usize) -> usize {
        rows.saturating_mul(self.row_bytes()).next_multiple_of(8)
    }

    /// Writes the low bits of each of `words` (one per cell) into `out`
    /// (`row_bytes` long), eight bytes at a time.
    fn pack(&self, words: &[u64], out: &mut [u8]) {
        // `have < 64` before each cell is added, so `acc` never overflows.
        let mut acc: u128 = 0;
        let mut have: u32 = 0;
        let mut chunks = out.chunks_mut(8);
        for (&w, &b) in words.iter().zip(&self.bits) {
            acc |= u128::from(low_bits(w, b)) << have;
            have += u32::from(b);
            if have >= 64 {
                if let Some(o) = chunks.next() {
                    for (d, s) in o.iter_mut().zip((acc as u64).to_le_bytes()) {
                        *d = s;
                    }
                }
                acc >>= 64;
                have -= 64;
            }
        }
        // The last `ceil(have / 8)` bytes (the last chunk is that long).
        if have > 0
            && let Some(o) = chunks.next()
        {
            for (d, s) in o.iter_mut().zip((acc as u64).to_le_bytes()) {
                *d = s;
            }
        }
    }

    /// Adds the cells of one packed row (`row_bytes` long) to `acc`,
    /// reading it eight bytes at a time.
    fn unpack_add(&self, row: &[u8], acc: &mut [u64]) {
        // `have < b <= 64` before a load, so `buf` never overflows.
        let mut buf: u128 = 0;
        let mut have: u32 = 0;
        let mut chunks = row.chunks(8);
        for (a, &bits) in acc.iter_mut().zip(&self.bits) {
            let b = u32::from(bits);
            if have < b {
                let word = match chunks.next() {
                    Some(c) => match <[u8; 8]>::try_from(c) {
                        Ok(full) => u64::from_le_bytes(full),
                        Err(_) => {
                            let mut tail = [0u8; 8];
                            for (d, s) in tail.iter_mut().zip(c) {
                                *d = *s;
                            }
                            u64::from_le_bytes(tail)
                        }
                    },
                    None => 0,
                };
                buf |= u128::from(word) << have;
                have += 64;
            }
            *a = a.wrapping_add(low_bits(buf as u64, bits));
            buf >>= b;
            have -= b;
        }
    }

    /// Whether every packed row in `rows` has its unused high bits (in its
    /// last byte) at zero.
    fn rows_canonical(&self, rows: &[u8]) -> bool {
        let used = self.bits.iter().map(|&b| u32::from(b)).sum::<u32>() % 8;
        if used == 0 {
            return true;
        }
        let unused = !((1u8 << used) - 1);
        rows.chunks_exact(self.row_bytes())
            .all(|r| r.last().is_none_or(|&last| last & unused == 0))
    }

    /// Reduces each word mod its cell's `2^b`.
    fn reduce(&self, words: &mut [u64]) {
        for (w, &b) in words.iter_mut().zip(&self.bits) {
            *w = low_bits(*w, b);
        }
    }

    /// What the aggregate's session id binds of the widths: nothing when
    /// every cell is 64 bits wide (the id is then what it was before cells
    /// had widths).
    fn binding(&self) -> Vec<u8> {
        if self.is_full() { Vec::new() } else { self.bits.clone() }
    }
}

/// Where the holder's per-customer vectors come from: computed up front
/// ([`RowValues`]) or row by row as the masked rows are produced (the node
/// computes each customer's vector from its transactions there, so no
/// customers x width table is ever built).
pub trait RowSource: Send + Sync {
    /// Words per customer.
    fn width(&self) -> usize;
    /// Customers covered (the holder's joined identifiers, in order).
    fn customers(&self) -> usize;
    /// Words of scratch [`RowSource::fill`] needs: the caller keeps one
    /// buffer of this length per thread, reuses it row after row and wipes
    /// it when the thread is done (it holds a customer's partial values).
    fn scratch_words(&self) -> usize {
        0
    }
    /// Writes customer `customer`'s vector into `out` (`width` words), with
    /// `scratch` (at least [`RowSource::scratch_words`] long; whatever it
    /// holds is overwritten); false when there is no such customer.
    fn fill(&self, customer: usize, out: &mut [u64], scratch: &mut [u64]) -> bool;
    /// Reads, ahead of [`RowSource::fill`], what it will read for
    /// `customer`, so that the memory of a batch's customers is fetched
    /// together rather than one cache miss after another (a hint: no
    /// effect on any result).
    fn prefetch(&self, _customer: usize) {}
}

impl<T: RowSource + ?Sized> RowSource for std::sync::Arc<T> {
    fn width(&self) -> usize {
        (**self).width()
    }
    fn customers(&self) -> usize {
        (**self).customers()
    }
    fn scratch_words(&self) -> usize {
        (**self).scratch_words()
    }
    fn fill(&self, customer: usize, out: &mut [u64], scratch: &mut [u64]) -> bool {
        (**self).fill(customer, out, scratch)
    }
    fn prefetch(&self, customer: usize) {
        (**self).prefetch(customer);
    }
}

impl RowSource for RowValues {
    fn width(&self) -> usize {
        self.width
    }
    fn customers(&self) -> usize {
        self.words.len() / self.width.max(1)
    }
    fn fill(&self, customer: usize, out: &mut [u64], _scratch: &mut [u64]) -> bool {
        match self.row(customer) {
            Some(v) if v.len() == out.len() => {
                out.copy_from_slice(v);
                true
            }
            _ => false,
        }
    }
}

/// The holder's per-customer contribution vectors, `width` words each, in
/// the order of the identifiers it joined with. Values are two's-complement
/// i64 read as u64.
#[derive(Clone)]
pub struct RowValues {
    width: usize,
    words: Vec<u64>,
}

impl core::fmt::Debug for RowValues {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "RowValues {{ width: {}, rows: {}, .. }}",
            self.width,
            self.words.len() / self.width.max(1)
        )
    }
}

impl Drop for RowValues {
    fn drop(&mut self) {
        self.words.zeroize();
    }
}

impl RowValues {
    /// `customers x width` words, customer after customer.
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for a bad width or length.
    pub fn new(width: usize, words: Vec<u64>) -> Result<Self, ProtocolError> {
        check_width(width)?;
        if !words.len().is_multiple_of(width) {
            return Err(ProtocolError::LocalInput {
                reason: "values are not a whole number of rows",
            });
        }
        Ok(Self { width, words })
    }

    /// The width.
    pub fn width(&self) -> usize {
        self.width
    }

    fn row(&self, customer: usize) -> Option<&[u64]> {
        let start = customer.checked_mul(self.width)?;
        self.words.get(start..start.checked_add(self.width)?)
    }
}

// ---------------------------------------------------------------- holder

/// The holder's side of one aggregate, before the matcher's setup arrives.
pub struct HolderAggregate {
    joined: std::sync::Arc<HolderJoined>,
    values: std::sync::Arc<dyn RowSource>,
    query_id: cleanroom_wire::QueryId,
    plan: [u8; 32],
    group: u32,
    bits: CellBits,
}

impl core::fmt::Debug for HolderAggregate {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HolderAggregate")
            .field("customers", &self.values.customers())
            .field("width", &self.values.width())
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl HolderAggregate {
    /// Prepares an aggregate over `joined` with the plan's values for query
    /// `query_id` under the plan digest `plan`, for matcher group `group`.
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] when the values do not cover the join's customers.
    pub fn new(
        joined: std::sync::Arc<HolderJoined>,
        values: impl RowSource + 'static,
        query_id: cleanroom_wire::QueryId,
        plan: [u8; 32],
        group: u32,
    ) -> Result<Self, ProtocolError> {
        let values: std::sync::Arc<dyn RowSource> = std::sync::Arc::new(values);
        check_width(values.width())?;
        if values.customers() as u64 != joined.customers() {
            return Err(ProtocolError::LocalInput {
                reason: "one value row per joined customer is required",
            });
        }
        let bits = CellBits::full(values.width())?;
        Ok(Self {
            joined,
            values,
            query_id,
            plan,
            group,
            bits,
        })
    }

    /// The same aggregate with each cell's share in `Z_{2^b}` (see
    /// [`CellBits`]); the matcher must start it with the same widths.
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] when the widths do not cover the cells.
    pub fn with_cell_bits(mut self, bits: CellBits) -> Result<Self, ProtocolError> {
        if bits.width() != self.values.width() {
            return Err(ProtocolError::LocalInput {
                reason: "one share width per output cell is required",
            });
        }
        self.bits = bits;
        Ok(self)
    }

    /// Reads the matcher's setup, runs the base-OT receiver side, and returns
    /// the running holder with its [`OtChoices`].
    ///
    /// # Errors
    /// A peer fault for a setup that does not match this join and query.
    pub fn on_setup<R: RngCore + CryptoRng>(
        self,
        frame: &[u8],
        rng: &mut R,
    ) -> Result<(HolderOtRunning, Message), ProtocolError> {
        let setup: OtSetup = match Message::decode(frame)? {
            Message::OtSetup(s) => s,
            Message::Abort(a) => return Err(ProtocolError::PeerAborted { code: a.code }),
            other => {
                return Err(ProtocolError::UnexpectedMessage {
                    got: other.kind(),
                    state: "waiting for an aggregate setup",
                });
            }
        };
        if setup.join_session != self.joined.session() {
            return Err(ProtocolError::WrongSession);
        }
        if setup.query_id != self.query_id {
            return Err(ProtocolError::ParameterMismatch { what: "query id" });
        }
        if setup.plan != self.plan {
            return Err(ProtocolError::ParameterMismatch { what: "query plan" });
        }
        if setup.group != self.group {
            return Err(ProtocolError::ParameterMismatch { what: "matcher group" });
        }
        let rows = self.joined.rows();
        if setup.rows != rows as u64 {
            return Err(ProtocolError::ParameterMismatch { what: "row count" });
        }
        if setup.width as usize != self.values.width() {
            return Err(ProtocolError::ParameterMismatch { what: "output width" });
        }
        let expected = setup_session_id(
            &setup.join_session,
            &setup.query_id,
            &setup.plan,
            setup.group,
            &setup.nonce,
            setup.rows,
            setup.width,
            &self.bits,
        );
        if expected != setup.session {
            return Err(ProtocolError::WrongSession);
        }
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let session = final_session_id(&setup.session, &nonce);
        let mut delta_bytes = [0u8; 16];
        rng.fill_bytes(&mut delta_bytes);
        let mut delta = u128::from_le_bytes(delta_bytes);
        delta_bytes.zeroize();
        let (keys, bs) = base_ot_receive(rng, &session.0, &setup.base_point, delta)?;
        let sender = IknpSender::new(delta, &keys, rows);
        delta.zeroize();
        let mut points = Vec::with_capacity(bs.len() * 32);
        for b in &bs {
            points.extend_from_slice(b);
        }
        let width = self.values.width();
        Ok((
            HolderOtRunning {
                session,
                joined: self.joined,
                values: self.values,
                sender,
                chunk_rows: ot_chunk_rows(width),
                next_seq: 0,
                acc: vec![0u64; width],
                bits: self.bits,
            },
            Message::OtChoices(OtChoices {
                session: setup.session,
                nonce,
                points,
            }),
        ))
    }
}

/// The holder answering the matcher's extension chunks.
pub struct HolderOtRunning {
    session: SessionId,
    joined: std::sync::Arc<HolderJoined>,
    values: std::sync::Arc<dyn RowSource>,
    sender: IknpSender,
    chunk_rows: usize,
    next_seq: u32,
    acc: Vec<u64>,
    bits: CellBits,
}

impl core::fmt::Debug for HolderOtRunning {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HolderOtRunning")
            .field("rows", &self.joined.rows())
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

impl Drop for HolderOtRunning {
    fn drop(&mut self) {
        self.acc.zeroize();
    }
}

impl HolderOtRunning {
    /// The aggregate session id.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Reads one [`OtExtend`] chunk and returns the [`MaskedRows`] answering it.
    ///
    /// # Errors
    /// A peer fault for anything but the next chunk, of the right size.
    pub fn handle(&mut self, frame: &[u8]) -> Result<Message, ProtocolError> {
        let ext = match decode_for(frame, &self.session)? {
            Message::OtExtend(e) => e,
            other => {
                return Err(ProtocolError::UnexpectedMessage {
                    got: other.kind(),
                    state: "answering OT extension chunks",
                });
            }
        };
        if ext.seq != self.next_seq {
            return Err(ProtocolError::OutOfOrder {
                stream: "OT extension",
                expected: self.next_seq,
                got: ext.seq,
            });
        }
        let rows = self.joined.rows();
        let first = (ext.seq as usize).saturating_mul(self.chunk_rows);
        if first >= rows {
            return Err(ProtocolError::Count {
                stream: "OT extension rows",
                expected: rows as u64,
                got: first as u64,
            });
        }
        let len = self.chunk_rows.min(rows - first);
        let pairs = self.sender.chunk(first, len, &ext.columns)?;
        let w = self.values.width();
        let joined = &self.joined;
        let values = &self.values;
        let bits = &self.bits;
        let full = bits.is_full();
        let row_bytes = bits.row_bytes();
        // Each row's d = v + m0 - m1 is written straight into the message,
        // in its cells' widths.
        let mut words = vec![0u8; bits.chunk_bytes(len)];
        let (packed, _padding) = words.split_at_mut(len * row_bytes);
        // Rows go through the mask hash a batch at a time; per-thread
        // scratch, reused batch after batch (each batch overwrites it whole)
        // and zeroized when the thread's share of the chunk is done.
        let batch = RowMasks::batch_rows(w);
        let words_of = |n: usize| Zeroizing::new(vec![0u64; n]);
        // The customer whose values a row reads, and whether they count: a
        // dummy row reads those of a stand-in (a customer picked from the
        // row's index alone) and throws them away, so the work per row,
        // and the time the matcher sees per chunk, does not depend on how
        // many of a chunk's rows are dummies. `None` only when the holder
        // has no customer at all.
        let customers = values.customers();
        let row_customer = |row: usize| match joined.customer_of_row(row) {
            Some(c) => Some((c, true)),
            None => row.checked_rem(customers).map(|c| (c, false)),
        };
        let scratch_words = values.scratch_words();
        let chunk_acc = packed
            .par_chunks_mut(row_bytes * batch)
            .zip(pairs.par_chunks(batch))
            .enumerate()
            .with_min_len(min_batches_per_job(len.div_ceil(batch)))
            .fold(
                || {
                    let keys = Zeroizing::new(Vec::<u128>::with_capacity(batch));
                    (
                        words_of(w),
                        words_of(w),
                        (words_of(w), words_of(scratch_words)),
                        keys,
                        words_of(0),
                        words_of(0),
                        RowMasks::new(),
                    )
                },
                |(mut acc, mut d, (mut v, mut scratch), mut keys, mut m0, mut m1, mut masks), (b, (bytes, pairs))| {
                    let row0 = first + b * batch;
                    // The batch's customers are scattered over the
                    // holder's memory: ask for all of them before the
                    // masks' cipher work, not one miss per row after it.
                    for k in 0..pairs.len() {
                        if let Some((c, _)) = row_customer(row0 + k) {
                            values.prefetch(c);
                        }
                    }
                    keys.clear();
                    keys.extend(pairs.iter().map(|(k0, _)| *k0));
                    masks.expand(row0 as u64, &keys, w, &mut m0);
                    keys.clear();
                    keys.extend(pairs.iter().map(|(_, k1)| *k1));
                    masks.expand(row0 as u64, &keys, w, &mut m1);
                    let rows = bytes
                        .chunks_mut(row_bytes)
                        .zip(m0.chunks_exact(w).zip(m1.chunks_exact(w)));
                    for (k, (bytes, (m0, m1))) in rows.enumerate() {
                        // A dummy row's values are computed too, for its
                        // stand-in customer, and added masked to zero
                        // (`keep` is all ones for a real row whose values
                        // were written, else zero).
                        let keep = match row_customer(row0 + k) {
                            Some((c, real)) => {
                                0u64.wrapping_sub(u64::from(values.fill(c, &mut v, &mut scratch) & real))
                            }
                            None => 0,
                        };
                        // acc += m0; d = v + m0 - m1, one pass over the row.
                        let cells = acc.iter_mut().zip(m0).zip(m1).zip(v.iter());
                        if full {
                            for ((((a, m0), m1), v), out) in cells.zip(bytes.chunks_exact_mut(8)) {
                                *a = a.wrapping_add(*m0);
                                out.copy_from_slice(&m0.wrapping_add(v & keep).wrapping_sub(*m1).to_le_bytes());
                            }
                        } else {
                            for ((((a, m0), m1), v), x) in cells.zip(d.iter_mut()) {
                                *a = a.wrapping_add(*m0);
                                *x = m0.wrapping_add(v & keep).wrapping_sub(*m1);
                            }
                            bits.pack(&d, bytes);
                        }
                    }
                    (acc, d, (v, scratch), keys, m0, m1, masks)
                },
            )
            .map(|(acc, ..)| acc)
            .reduce(
                || words_of(w),
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b.iter()) {
                        *x = x.wrapping_add(*y);
                    }
                    a
                },
            );
        for (a, c) in self.acc.iter_mut().zip(chunk_acc.iter()) {
            *a = a.wrapping_add(*c);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        Ok(Message::MaskedRows(MaskedRows {
            session: self.session,
            seq,
            words,
        }))
    }

    /// True once every row has been answered.
    pub fn is_done(&self) -> bool {
        (self.next_seq as usize).saturating_mul(self.chunk_rows) >= self.joined.rows()
    }

    /// The holder's share, `-Σ m0_i`.
    ///
    /// # Errors
    /// [`ProtocolError::Incomplete`] before [`Self::is_done`].
    pub fn finish(self) -> Result<Share, ProtocolError> {
        if !self.is_done() {
            return Err(ProtocolError::Incomplete {
                what: "OT extension chunks outstanding",
            });
        }
        let mut words: Vec<u64> = self.acc.iter().map(|a| a.wrapping_neg()).collect();
        self.bits.reduce(&mut words);
        Ok(Share::from_words(words))
    }
}

// ---------------------------------------------------------------- matcher

/// The matcher's side of one aggregate, waiting for the holder's base-OT answer.
#[derive(Debug)]
pub struct MatcherAggregate {
    setup_session: SessionId,
    base: BaseOtSender,
    choices: Vec<u128>,
    rows: usize,
    bits: CellBits,
}

impl MatcherAggregate {
    /// Opens an aggregate over `joined` for matcher group `group` with choice
    /// bits `choices` (one per row: `e_i AND label_i == group`; `e_i` itself
    /// for a query without matcher-side groups) and returns the [`OtSetup`].
    ///
    /// # Errors
    /// [`ProtocolError::LocalInput`] for a bad width or choice length.
    pub fn start<R: RngCore + CryptoRng>(
        joined: &MatcherJoined,
        choices: &[bool],
        width: usize,
        query_id: cleanroom_wire::QueryId,
        plan: [u8; 32],
        group: u32,
        rng: &mut R,
    ) -> Result<(Self, Message), ProtocolError> {
        Self::start_with_bits(joined, choices, CellBits::full(width)?, query_id, plan, group, rng)
    }

    /// As [`Self::start`], with each cell's share in `Z_{2^b}` (see
    /// [`CellBits`]); the holder must run it with the same widths.
    ///
    /// # Errors
    /// As [`Self::start`].
    pub fn start_with_bits<R: RngCore + CryptoRng>(
        joined: &MatcherJoined,
        choices: &[bool],
        bits: CellBits,
        query_id: cleanroom_wire::QueryId,
        plan: [u8; 32],
        group: u32,
        rng: &mut R,
    ) -> Result<(Self, Message), ProtocolError> {
        let width = bits.width();
        check_width(width)?;
        if choices.len() != joined.rows() {
            return Err(ProtocolError::LocalInput {
                reason: "one choice bit per joined row is required",
            });
        }
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let rows = joined.rows();
        let setup_session = setup_session_id(
            &joined.session(),
            &query_id,
            &plan,
            group,
            &nonce,
            rows as u64,
            width as u32,
            &bits,
        );
        let (base, base_point) = BaseOtSender::new(rng);
        Ok((
            Self {
                setup_session,
                base,
                choices: pack_bits(choices),
                rows,
                bits,
            },
            Message::OtSetup(OtSetup {
                session: setup_session,
                join_session: joined.session(),
                query_id,
                nonce,
                rows: rows as u64,
                width: width as u32,
                plan,
                group,
                base_point,
            }),
        ))
    }

    /// Reads the holder's [`OtChoices`] and prepares the extension.
    ///
    /// # Errors
    /// A peer fault for a bad answer.
    pub fn on_choices(self, frame: &[u8]) -> Result<MatcherOtRunning, ProtocolError> {
        let choices = match decode_for(frame, &self.setup_session)? {
            Message::OtChoices(c) => c,
            other => {
                return Err(ProtocolError::UnexpectedMessage {
                    got: other.kind(),
                    state: "waiting for the holder's base-OT answer",
                });
            }
        };
        let session = final_session_id(&self.setup_session, &choices.nonce);
        let bs = split_points(&choices.points)?;
        let keys = self.base.finish(&session.0, &bs)?;
        let receiver = IknpReceiver::new(&keys, self.choices, self.rows)?;
        let width = self.bits.width();
        Ok(MatcherOtRunning {
            session,
            receiver,
            width,
            chunk_rows: ot_chunk_rows(width),
            next_first: 0,
            next_seq: 0,
            pending: VecDeque::new(),
            acc: vec![0u64; width],
            bits: self.bits,
        })
    }
}

struct Pending {
    seq: u32,
    first: usize,
    keys: Vec<u128>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.keys.zeroize();
    }
}

/// The matcher sending extension chunks and folding in the masked rows.
pub struct MatcherOtRunning {
    session: SessionId,
    receiver: IknpReceiver,
    width: usize,
    chunk_rows: usize,
    next_first: usize,
    next_seq: u32,
    pending: VecDeque<Pending>,
    acc: Vec<u64>,
    bits: CellBits,
}

impl core::fmt::Debug for MatcherOtRunning {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MatcherOtRunning")
            .field("rows", &self.receiver.rows())
            .field("next_seq", &self.next_seq)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Drop for MatcherOtRunning {
    fn drop(&mut self) {
        self.acc.zeroize();
    }
}

impl MatcherOtRunning {
    /// The aggregate session id.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// The next extension chunk to send, if any rows are left.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        let rows = self.receiver.rows();
        if self.next_first >= rows {
            return None;
        }
        let len = self.chunk_rows.min(rows - self.next_first);
        let chunk = self.receiver.chunk(self.next_first, len).ok()?;
        debug_assert_eq!(chunk.message.len(), extension_message_len(len));
        let seq = self.next_seq;
        self.pending.push_back(Pending {
            seq,
            first: self.next_first,
            keys: chunk.keys,
        });
        self.next_first += len;
        self.next_seq += 1;
        Some(Message::OtExtend(OtExtend {
            session: self.session,
            seq,
            columns: chunk.message,
        }))
    }

    /// Reads the holder's [`MaskedRows`] for the oldest outstanding chunk.
    ///
    /// # Errors
    /// A peer fault for a chunk out of order or of the wrong size.
    pub fn handle(&mut self, frame: &[u8]) -> Result<(), ProtocolError> {
        // Read in place (no copy of the rows); any other message as usual.
        let masked = match Message::decode_masked_rows(frame)? {
            Some(m) if m.session == self.session => m,
            Some(_) => return Err(ProtocolError::WrongSession),
            None => {
                let other = decode_for(frame, &self.session)?;
                return Err(ProtocolError::UnexpectedMessage {
                    got: other.kind(),
                    state: "collecting masked rows",
                });
            }
        };
        let Some(p) = self.pending.front() else {
            return Err(ProtocolError::UnexpectedMessage {
                got: "MaskedRows",
                state: "no OT extension chunk is outstanding",
            });
        };
        if masked.seq != p.seq {
            return Err(ProtocolError::OutOfOrder {
                stream: "masked rows",
                expected: p.seq,
                got: masked.seq,
            });
        }
        let w = self.width;
        let bits = &self.bits;
        let full = bits.is_full();
        let row_bytes = bits.row_bytes();
        let expected = bits.chunk_bytes(p.keys.len());
        if masked.words.len() != expected {
            return Err(ProtocolError::Count {
                stream: "masked row bytes",
                expected: expected as u64,
                got: masked.words.len() as u64,
            });
        }
        let receiver = &self.receiver;
        let first = p.first;
        let Some((packed, padding)) = masked.words.split_at_checked(p.keys.len() * row_bytes) else {
            return Err(ProtocolError::Count {
                stream: "masked row bytes",
                expected: expected as u64,
                got: masked.words.len() as u64,
            });
        };
        // One encoding per chunk: the padding and each row's unused high
        // bits are zero.
        let canonical = full || (padding.iter().all(|&b| b == 0) && bits.rows_canonical(packed));
        if !canonical {
            return Err(ProtocolError::NonCanonical {
                what: "masked rows with bits set beyond their cells",
            });
        }
        let batch = RowMasks::batch_rows(w);
        let chunk_acc = packed
            .par_chunks(row_bytes * batch)
            .zip(p.keys.par_chunks(batch))
            .enumerate()
            .with_min_len(min_batches_per_job(p.keys.len().div_ceil(batch)))
            .fold(
                || {
                    (
                        Zeroizing::new(vec![0u64; w]),
                        Zeroizing::new(Vec::new()),
                        RowMasks::new(),
                    )
                },
                |(mut acc, mut m, mut masks), (b, (d_rows, keys))| {
                    // acc += PRG(k_s) + s * d
                    let row0 = first + b * batch;
                    masks.expand(row0 as u64, keys, w, &mut m);
                    let rows = d_rows.chunks_exact(row_bytes).zip(m.chunks_exact(w));
                    for (k, (d_bytes, m)) in rows.enumerate() {
                        for (a, x) in acc.iter_mut().zip(m) {
                            *a = a.wrapping_add(*x);
                        }
                        if receiver.choice(row0 + k) {
                            if full {
                                for (a, d) in acc.iter_mut().zip(d_bytes.chunks_exact(8)) {
                                    let mut b = [0u8; 8];
                                    b.copy_from_slice(d);
                                    *a = a.wrapping_add(u64::from_le_bytes(b));
                                }
                            } else {
                                bits.unpack_add(d_bytes, &mut acc);
                            }
                        }
                    }
                    (acc, m, masks)
                },
            )
            .map(|(acc, ..)| acc)
            .reduce(
                || Zeroizing::new(vec![0u64; w]),
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b.iter()) {
                        *x = x.wrapping_add(*y);
                    }
                    a
                },
            );
        for (a, c) in self.acc.iter_mut().zip(chunk_acc.iter()) {
            *a = a.wrapping_add(*c);
        }
        self.pending.pop_front();
        Ok(())
    }

    /// True once every chunk has been sent and answered.
    pub fn is_done(&self) -> bool {
        self.next_first >= self.receiver.rows() && self.pending.is_empty()
    }

    /// The matcher's share, `Σ y_i`.
    ///
    /// # Errors
    /// [`ProtocolError::Incomplete`] before [`Self::is_done`].
    pub fn finish(self) -> Result<Share, ProtocolError> {
        if !self.is_done() {
            return Err(ProtocolError::Incomplete {
                what: "masked rows outstanding",
            });
        }
        let mut words = self.acc.clone();
        self.bits.reduce(&mut words);
        Ok(Share::from_words(words))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packing keeps each cell's low bits and nothing else, for every width
    /// from 1 to 64 and mixes of them; 64-bit cells are little-endian words.
    #[test]
    fn packed_rows_keep_each_cells_low_bits() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let width = 1 + (next() % 40) as usize;
            let bits: Vec<u8> = (0..width)
                .map(|c| match (round + c) % 5 {
                    0 => 64,
                    1 => 1,
                    _ => 1 + (next() % 64) as u8,
                })
                .collect();
            let cells = CellBits::new(bits.clone()).unwrap();
            let words: Vec<u64> = (0..width).map(|_| next()).collect();
            let mut row = vec![0u8; cells.row_bytes()];
            cells.pack(&words, &mut row);
            let mut acc = vec![0u64; width];
            cells.unpack_add(&row, &mut acc);
            let mut want = words.clone();
            cells.reduce(&mut want);
            assert_eq!(acc, want, "widths {bits:?}");
        }
        let full = CellBits::full(3).unwrap();
        let words = [1u64, u64::MAX, 0x0102_0304_0506_0708];
        let mut row = vec![0u8; full.row_bytes()];
        full.pack(&words, &mut row);
        let le: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(row, le);
        assert_eq!(full.chunk_bytes(5), 5 * 24);
        let narrow = CellBits::new(vec![3, 2]).unwrap();
        assert_eq!(narrow.row_bytes(), 1);
        // The layout: cells in order, least significant bit first.
        let mut row = [0u8; 1];
        narrow.pack(&[5 | 0xf8, 3], &mut row);
        assert_eq!(row, [0x1d], "5 in bits 0-2, 3 in bits 3-4");
        assert!(narrow.rows_canonical(&[0x1d, 0x1f]));
        assert!(!narrow.rows_canonical(&[0x1d, 0x3d]), "bit 5 is beyond the cells");
        let wide = CellBits::new(vec![9, 7]).unwrap();
        let mut row = [0u8; 2];
        wide.pack(&[0x1ff, 1], &mut row);
        assert_eq!(row, [0xff, 0x03]);
        assert_eq!(narrow.chunk_bytes(5), 8, "a chunk is padded to a multiple of 8 bytes");
        assert!(CellBits::new(vec![0]).is_err());
        assert!(CellBits::new(vec![65]).is_err());
        assert!(CellBits::new(Vec::new()).is_err());
    }
}
