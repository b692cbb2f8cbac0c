//! Oblivious transfer: 128 Chou–Orlandi base OTs over ristretto255, extended
//! with IKNP (semi-honest) to one random OT per row.
//!
//! Conventions: rows are numbered from 0; rows are grouped in blocks of 128;
//! a column (one per base OT) is a sequence of `u128` words, word `b` holding
//! rows `128b .. 128b+127` with row `128b+k` at bit `k` (least significant
//! first). The extension's wire unit is the column slice of one chunk of rows;
//! chunks start at multiples of 128 rows.

use aes::Aes128Enc as Aes128;
use aes::cipher::{Array, BlockCipherEncrypt, KeyInit};
use curve25519_dalek::ristretto::RistrettoPoint;
use rand_core::{CryptoRng, RngCore};
use rayon::prelude::*;
use ring::digest::{Context, SHA256};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::CryptoError;
use crate::keys::SecretScalar;
use crate::point::{PointBytes, decode_point};

/// Number of base OTs: the computational security parameter.
pub const KAPPA: usize = 128;
/// Bytes of extension data the receiver sends per row (one bit per base OT).
pub const EXTENSION_BYTES_PER_ROW: usize = KAPPA / 8;
/// Rows per block of the extension matrix.
pub const BLOCK_ROWS: usize = 128;

type AesBlock = Array<u8, aes::cipher::consts::U16>;

/// AES-128 under the first 16 bytes of SHA-256(`label`): a fixed, public
/// permutation, one per label.
fn cipher_for_label(label: &[u8]) -> Aes128 {
    let d = ring::digest::digest(&SHA256, label);
    let mut key = [0u8; 16];
    key.copy_from_slice(&d.as_ref()[..16]);
    Aes128::new(&Array::from(key))
}

/// The fixed, public AES key of the correlation-robust hash
/// (the first 16 bytes of SHA-256("cleanroom-v1-tccr")).
fn fixed_cipher() -> &'static Aes128 {
    static CIPHER: std::sync::OnceLock<Aes128> = std::sync::OnceLock::new();
    CIPHER.get_or_init(|| cipher_for_label(b"cleanroom-v1-tccr"))
}

/// The tweakable correlation-robust hash of Guo et al. (2020) on a batch:
/// `H(i, x) = π(π(x) ⊕ i) ⊕ π(x)` with fixed-key AES `π`, row index `i` as tweak.
pub fn tccr_hash_batch(first_row: u64, xs: &[u128], out: &mut [u128]) {
    let cipher = fixed_cipher();
    let mut px: Vec<AesBlock> = xs.iter().map(|x| Array::from(x.to_le_bytes())).collect();
    cipher.encrypt_blocks(&mut px);
    let mut second: Vec<AesBlock> = px
        .iter()
        .enumerate()
        .map(|(k, b)| {
            let v = u128::from_le_bytes(b.0) ^ u128::from(first_row + k as u64);
            Array::from(v.to_le_bytes())
        })
        .collect();
    cipher.encrypt_blocks(&mut second);
    for ((o, a), b) in out.iter_mut().zip(&px).zip(&second) {
        *o = u128::from_le_bytes(a.0) ^ u128::from_le_bytes(b.0);
    }
    // `π(x)` gives `x` back through the public permutation, and `x` is a
    // row's `q` or `t` (so its keys): neither buffer outlives the call.
    px.iter_mut().chain(second.iter_mut()).for_each(wipe_block);
}

/// AES-128 in counter mode as a PRG, keyed with a 128-bit seed.
pub struct Prg {
    cipher: Aes128,
}

impl core::fmt::Debug for Prg {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Prg(<redacted>)")
    }
}

impl Prg {
    /// A PRG keyed with `seed`.
    pub fn new(seed: u128) -> Self {
        Self {
            cipher: Aes128::new(&Array::from(seed.to_le_bytes())),
        }
    }

    /// Output blocks `first .. first + out.len()` as `u128` words.
    pub fn blocks(&self, first: u64, out: &mut [u128]) {
        let mut buf: Vec<AesBlock> = (0..out.len() as u64)
            .map(|k| Array::from(u128::from(first + k).to_le_bytes()))
            .collect();
        self.cipher.encrypt_blocks(&mut buf);
        for (o, b) in out.iter_mut().zip(&buf) {
            *o = u128::from_le_bytes(b.0);
        }
    }
}

/// The fixed, public AES key of the row masks' hash
/// (the first 16 bytes of SHA-256("cleanroom-v2-row-mask")): a permutation
/// of its own, apart from the OT extension's.
fn mask_cipher() -> &'static Aes128 {
    static CIPHER: std::sync::OnceLock<Aes128> = std::sync::OnceLock::new();
    CIPHER.get_or_init(|| cipher_for_label(b"cleanroom-v2-row-mask"))
}

/// Most blocks [`RowMasks::expand`] encrypts in one call (64 KiB).
pub const MASK_BATCH_BLOCKS: usize = 4096;

/// The aggregate's row masks: row `i`'s key `k` (one end of its random OT)
/// gives `w` 64-bit words, the halves of the blocks
/// `H((i, j), k) = π(π(k) ⊕ t_ij) ⊕ π(k)` for `j = 0 .. ⌈w/2⌉` (word `2j`
/// is the low half of block `j`, word `2j + 1` the high half), with the
/// tweak `t_ij = i · 2^64 + j` and fixed-key AES-128 `π` (its own key,
/// [`mask_cipher`]). This is the tweakable correlation-robust hash of the
/// OT extension ([`tccr_hash_batch`], Guo et al. 2020) used as a PRG: for a
/// key unknown to the adversary, `π(k)` is unknown and the tweaks are
/// distinct, so the blocks are pseudorandom (random-permutation model).
/// Unlike AES-CTR keyed per row it needs no key schedule per row, so the
/// blocks of many rows go through the cipher in one call.
///
/// Holds the last masks it computed until it is reused or dropped
/// (zeroized then); redacted in Debug.
pub struct RowMasks {
    blocks: Vec<AesBlock>,
    keys: Vec<AesBlock>,
}

impl RowMasks {
    /// Empty buffers (they grow to the first batch's size).
    pub fn new() -> Self {
        Self {
            blocks: Vec::new(),
            keys: Vec::new(),
        }
    }

    /// Rows per call of [`RowMasks::expand`] that keep its buffer within
    /// [`MASK_BATCH_BLOCKS`] for `width` words a row (at least 1).
    pub fn batch_rows(width: usize) -> usize {
        (MASK_BATCH_BLOCKS / width.div_ceil(2).max(1)).max(1)
    }

    /// The masks of rows `first .. first + keys.len()` (`keys[r]` is row
    /// `first + r`'s key), `width` words each, row after row: `out` is set
    /// to them (`keys.len() * width` words; a buffer that must grow is
    /// wiped before it is let go).
    pub fn expand(&mut self, first: u64, keys: &[u128], width: usize, out: &mut Vec<u64>) {
        let per_row = width.div_ceil(2);
        fit(out, keys.len() * width, 0, Zeroize::zeroize);
        fit(&mut self.keys, keys.len(), AesBlock::default(), wipe_block);
        fit(&mut self.blocks, keys.len() * per_row, AesBlock::default(), wipe_block);
        if width == 0 {
            return;
        }
        let cipher = mask_cipher();
        for (b, k) in self.keys.iter_mut().zip(keys) {
            *b = Array::from(k.to_le_bytes());
        }
        cipher.encrypt_blocks(&mut self.keys);
        for ((r, pk), row_blocks) in self.keys.iter().enumerate().zip(self.blocks.chunks_exact_mut(per_row)) {
            let t = u128::from_le_bytes(pk.0) ^ (u128::from(first.wrapping_add(r as u64)) << 64);
            for (j, b) in row_blocks.iter_mut().enumerate() {
                *b = Array::from((t ^ j as u128).to_le_bytes());
            }
        }
        cipher.encrypt_blocks(&mut self.blocks);
        for ((row_out, row_blocks), pk) in out
            .chunks_exact_mut(width)
            .zip(self.blocks.chunks_exact(per_row))
            .zip(self.keys.iter())
        {
            let pk = u128::from_le_bytes(pk.0);
            for (pair, block) in row_out.chunks_mut(2).zip(row_blocks) {
                let v = u128::from_le_bytes(block.0) ^ pk;
                let halves = [v as u64, (v >> 64) as u64];
                for (w, h) in pair.iter_mut().zip(halves) {
                    *w = h;
                }
            }
        }
    }
}

/// Makes `v` `n` elements long (new elements are `fill`), wiping (with `wipe`) every element of
/// its old buffer first if it has to move to a bigger one, so that no copy
/// of a secret is left in freed memory.
fn fit<T: Copy>(v: &mut Vec<T>, n: usize, fill: T, wipe: impl Fn(&mut T)) {
    if v.capacity() < n {
        wipe_all(v, fill, &wipe);
        *v = Vec::with_capacity(n);
    }
    // Same length as last time (the usual case): the caller overwrites it.
    if v.len() != n {
        v.clear();
        v.resize(n, fill);
    }
}

/// Wipes every element of `v`'s buffer, its spare capacity included.
fn wipe_all<T: Copy>(v: &mut Vec<T>, fill: T, wipe: impl Fn(&mut T)) {
    v.resize(v.capacity(), fill);
    v.iter_mut().for_each(wipe);
}

fn wipe_block(b: &mut AesBlock) {
    b.0.zeroize();
}

impl Default for RowMasks {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for RowMasks {
    fn drop(&mut self) {
        wipe_all(&mut self.blocks, AesBlock::default(), wipe_block);
        wipe_all(&mut self.keys, AesBlock::default(), wipe_block);
    }
}

impl core::fmt::Debug for RowMasks {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("RowMasks(<redacted>)")
    }
}

/// Transposes a 128 x 128 bit matrix in place: afterwards bit `j` of word `i`
/// is what bit `i` of word `j` was.
pub fn transpose128(a: &mut [u128; 128]) {
    let mut j = 64usize;
    let mut m: u128 = (1u128 << 64) - 1;
    while j != 0 {
        let mut k = 0usize;
        while k < 128 {
            let t = ((a[k] >> j) ^ a[k + j]) & m;
            a[k] ^= t << j;
            a[k + j] ^= t;
            k = (k + j + 1) & !j;
        }
        j >>= 1;
        m ^= m << j;
    }
}

fn base_key(session: &[u8], j: usize, a: &PointBytes, b: &PointBytes, shared: &RistrettoPoint) -> u128 {
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"cleanroom-v1-base-ot");
    ctx.update(&(session.len() as u32).to_le_bytes());
    ctx.update(session);
    ctx.update(&(j as u32).to_le_bytes());
    ctx.update(a);
    ctx.update(b);
    ctx.update(shared.compress().as_bytes());
    let d = ctx.finish();
    let mut k = [0u8; 16];
    k.copy_from_slice(&d.as_ref()[..16]);
    u128::from_le_bytes(k)
}

/// Chou–Orlandi base-OT sender (the extension's receiver plays it).
#[derive(Debug)]
pub struct BaseOtSender {
    a: SecretScalar,
    a_bytes: PointBytes,
}

impl BaseOtSender {
    /// Draws `a` and returns the sender with its message `A = a * G`.
    pub fn new<R: RngCore + CryptoRng>(rng: &mut R) -> (Self, PointBytes) {
        let a = SecretScalar::random(rng);
        let a_bytes = a.public().compress().to_bytes();
        (Self { a, a_bytes }, a_bytes)
    }

    /// Given the receiver's `B_j`, derives the 128 key pairs `(k0_j, k1_j)`.
    ///
    /// # Errors
    /// A point error for a bad `B_j`, [`CryptoError::BaseOtCount`] for the
    /// wrong number of them.
    pub fn finish(self, session: &[u8], bs: &[PointBytes]) -> Result<BaseOtSenderKeys, CryptoError> {
        if bs.len() != KAPPA {
            return Err(CryptoError::BaseOtCount { got: bs.len() });
        }
        let big_a = self.a.public();
        let mut pairs = Vec::with_capacity(KAPPA);
        for (j, b_bytes) in bs.iter().enumerate() {
            let b = decode_point(b_bytes)?;
            // The DH secrets the pair of keys comes from: wiped after use.
            let s0 = Zeroizing::new(self.a.expose() * b);
            let s1 = Zeroizing::new(self.a.expose() * (b - big_a));
            pairs.push((
                base_key(session, j, &self.a_bytes, b_bytes, &s0),
                base_key(session, j, &self.a_bytes, b_bytes, &s1),
            ));
        }
        Ok(BaseOtSenderKeys { pairs })
    }
}

/// The base-OT sender's 128 key pairs.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct BaseOtSenderKeys {
    pairs: Vec<(u128, u128)>,
}

impl core::fmt::Debug for BaseOtSenderKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("BaseOtSenderKeys(<redacted>)")
    }
}

/// Chou–Orlandi base-OT receiver (the extension's sender plays it): with
/// choice bits `delta`, answers the sender's `A` with `B_j` and keeps `k_{delta_j}`.
///
/// # Errors
/// A point error for a bad `A`.
pub fn base_ot_receive<R: RngCore + CryptoRng>(
    rng: &mut R,
    session: &[u8],
    a_bytes: &PointBytes,
    delta: u128,
) -> Result<(BaseOtReceiverKeys, Vec<PointBytes>), CryptoError> {
    let big_a = decode_point(a_bytes)?;
    let mut keys = Vec::with_capacity(KAPPA);
    let mut bs = Vec::with_capacity(KAPPA);
    for j in 0..KAPPA {
        let b = SecretScalar::random(rng);
        let mut big_b = b.public();
        if (delta >> j) & 1 == 1 {
            big_b += big_a;
        }
        let b_bytes = big_b.compress().to_bytes();
        let shared = Zeroizing::new(b.expose() * big_a);
        keys.push(base_key(session, j, a_bytes, &b_bytes, &shared));
        bs.push(b_bytes);
    }
    Ok((BaseOtReceiverKeys { keys }, bs))
}

/// The base-OT receiver's 128 chosen keys.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct BaseOtReceiverKeys {
    keys: Vec<u128>,
}

impl core::fmt::Debug for BaseOtReceiverKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("BaseOtReceiverKeys(<redacted>)")
    }
}

/// Packs choice bits into 128-row words.
pub fn pack_bits(bits: &[bool]) -> Vec<u128> {
    let mut out = vec![0u128; bits.len().div_ceil(BLOCK_ROWS)];
    for (i, &b) in bits.iter().enumerate() {
        if b {
            out[i / BLOCK_ROWS] |= 1u128 << (i % BLOCK_ROWS);
        }
    }
    out
}

/// The IKNP extension receiver: holds choice bits, learns one key per row.
pub struct IknpReceiver {
    prg0: Vec<Prg>,
    prg1: Vec<Prg>,
    choices: Vec<u128>,
    rows: usize,
}

impl core::fmt::Debug for IknpReceiver {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "IknpReceiver {{ rows: {}, .. }}", self.rows)
    }
}

impl Drop for IknpReceiver {
    fn drop(&mut self) {
        self.choices.zeroize();
    }
}

/// One chunk of the receiver's extension: what it sends, and its row keys.
#[derive(Debug)]
pub struct ReceiverChunk {
    /// The columns `u_j` for the chunk's rows, column after column, 16 bytes
    /// per 128 rows.
    pub message: Vec<u8>,
    /// `k_{r_i} = H(i, t_i)` for each real row of the chunk.
    pub keys: Vec<u128>,
}

impl IknpReceiver {
    /// A receiver for `rows` rows with the given choice bits (packed by
    /// [`pack_bits`]) over the base-OT sender keys.
    ///
    /// # Errors
    /// [`CryptoError::ChoiceLength`] when the packed choices do not cover `rows`.
    pub fn new(base: &BaseOtSenderKeys, choices: Vec<u128>, rows: usize) -> Result<Self, CryptoError> {
        if choices.len() != rows.div_ceil(BLOCK_ROWS) {
            return Err(CryptoError::ChoiceLength);
        }
        Ok(Self {
            prg0: base.pairs.iter().map(|(k0, _)| Prg::new(*k0)).collect(),
            prg1: base.pairs.iter().map(|(_, k1)| Prg::new(*k1)).collect(),
            choices,
            rows,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Extends rows `first .. first + len` (`first` a multiple of 128; `len` a
    /// multiple of 128 unless the chunk ends at the last row).
    ///
    /// # Errors
    /// [`CryptoError::ChunkBounds`] for a chunk outside the rows or misaligned.
    pub fn chunk(&self, first: usize, len: usize) -> Result<ReceiverChunk, CryptoError> {
        check_chunk(first, len, self.rows)?;
        let b0 = first / BLOCK_ROWS;
        let nb = len.div_ceil(BLOCK_ROWS);
        // Columns: t_j and u_j = t_j ^ G(k1_j) ^ r. The t_j determine the
        // row keys: wiped when the chunk is done.
        let cols: Vec<(Zeroizing<Vec<u128>>, Vec<u128>)> = (0..KAPPA)
            .into_par_iter()
            .map(|j| {
                let mut t = Zeroizing::new(vec![0u128; nb]);
                let mut g1 = Zeroizing::new(vec![0u128; nb]);
                self.prg0[j].blocks(b0 as u64, &mut t);
                self.prg1[j].blocks(b0 as u64, &mut g1);
                let u: Vec<u128> = t
                    .iter()
                    .zip(g1.iter())
                    .zip(&self.choices[b0..b0 + nb])
                    .map(|((t, g), r)| t ^ g ^ r)
                    .collect();
                (t, u)
            })
            .collect();
        let mut message = Vec::with_capacity(KAPPA * nb * 16);
        for (_, u) in &cols {
            for w in u {
                message.extend_from_slice(&w.to_le_bytes());
            }
        }
        let mut keys = vec![0u128; len];
        keys.par_chunks_mut(BLOCK_ROWS).enumerate().for_each(|(b, out)| {
            let mut m = [0u128; 128];
            for (j, (t, _)) in cols.iter().enumerate() {
                m[j] = t[b];
            }
            transpose128(&mut m);
            tccr_hash_batch((first + b * BLOCK_ROWS) as u64, &m[..out.len()], out);
            m.zeroize();
        });
        Ok(ReceiverChunk { message, keys })
    }

    /// The choice bit of row `i`.
    pub fn choice(&self, i: usize) -> bool {
        self.choices
            .get(i / BLOCK_ROWS)
            .is_some_and(|w| (w >> (i % BLOCK_ROWS)) & 1 == 1)
    }
}

/// The IKNP extension sender: learns two keys per row, one of which the
/// receiver has.
pub struct IknpSender {
    prg: Vec<Prg>,
    delta: u128,
    rows: usize,
}

impl core::fmt::Debug for IknpSender {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "IknpSender {{ rows: {}, .. }}", self.rows)
    }
}

impl Drop for IknpSender {
    fn drop(&mut self) {
        self.delta.zeroize();
    }
}

fn check_chunk(first: usize, len: usize, rows: usize) -> Result<(), CryptoError> {
    let end = first.checked_add(len).ok_or(CryptoError::ChunkBounds)?;
    if !first.is_multiple_of(BLOCK_ROWS) || end > rows || len == 0 {
        return Err(CryptoError::ChunkBounds);
    }
    if !len.is_multiple_of(BLOCK_ROWS) && end != rows {
        return Err(CryptoError::ChunkBounds);
    }
    Ok(())
}

/// The size in bytes of the receiver's message for a chunk of `len` rows.
pub fn extension_message_len(len: usize) -> usize {
    KAPPA * len.div_ceil(BLOCK_ROWS) * 16
}

impl IknpSender {
    /// A sender for `rows` rows, with base-OT choice bits `delta` and the keys
    /// it received for them.
    pub fn new(delta: u128, base: &BaseOtReceiverKeys, rows: usize) -> Self {
        Self {
            prg: base.keys.iter().map(|k| Prg::new(*k)).collect(),
            delta,
            rows,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Given the receiver's message for rows `first .. first + len`, returns
    /// `(k0_i, k1_i)` for each row.
    ///
    /// # Errors
    /// [`CryptoError::ChunkBounds`] or [`CryptoError::ExtensionLength`].
    pub fn chunk(&self, first: usize, len: usize, message: &[u8]) -> Result<Zeroizing<Vec<(u128, u128)>>, CryptoError> {
        check_chunk(first, len, self.rows)?;
        let nb = len.div_ceil(BLOCK_ROWS);
        if message.len() != extension_message_len(len) {
            return Err(CryptoError::ExtensionLength { len: message.len() });
        }
        let b0 = first / BLOCK_ROWS;
        let cols: Vec<Zeroizing<Vec<u128>>> = message
            .par_chunks_exact(nb * 16)
            .enumerate()
            .map(|(j, ubytes)| {
                let mut q = Zeroizing::new(vec![0u128; nb]);
                self.prg[j].blocks(b0 as u64, &mut q);
                if (self.delta >> j) & 1 == 1 {
                    for (q, u) in q.iter_mut().zip(ubytes.chunks_exact(16)) {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(u);
                        *q ^= u128::from_le_bytes(b);
                    }
                }
                q
            })
            .collect();
        let mut out = Zeroizing::new(vec![(0u128, 0u128); len]);
        out.par_chunks_mut(BLOCK_ROWS).enumerate().for_each(|(b, out)| {
            let mut m = [0u128; 128];
            for (j, q) in cols.iter().enumerate() {
                m[j] = q[b];
            }
            transpose128(&mut m);
            let n = out.len();
            let mut h0 = [0u128; 128];
            let mut h1 = [0u128; 128];
            tccr_hash_batch((first + b * BLOCK_ROWS) as u64, &m[..n], &mut h0[..n]);
            for x in m.iter_mut() {
                *x ^= self.delta;
            }
            tccr_hash_batch((first + b * BLOCK_ROWS) as u64, &m[..n], &mut h1[..n]);
            for (o, (a, c)) in out.iter_mut().zip(h0.iter().zip(&h1)) {
                *o = (*a, *c);
            }
            m.zeroize();
            h0.zeroize();
            h1.zeroize();
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn transpose_matches_naive() {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let mut a = [0u128; 128];
        for w in a.iter_mut() {
            *w = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
        }
        let orig = a;
        transpose128(&mut a);
        for i in 0..128 {
            for j in 0..128 {
                assert_eq!((a[i] >> j) & 1, (orig[j] >> i) & 1, "({i},{j})");
            }
        }
        transpose128(&mut a);
        assert_eq!(a, orig);
    }

    #[test]
    fn base_ot_gives_the_chosen_key_only() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let (sender, a) = BaseOtSender::new(&mut rng);
        let delta = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210u128;
        let (rkeys, bs) = base_ot_receive(&mut rng, b"sid", &a, delta).unwrap();
        let skeys = sender.finish(b"sid", &bs).unwrap();
        for j in 0..KAPPA {
            let (k0, k1) = skeys.pairs[j];
            assert_ne!(k0, k1);
            let want = if (delta >> j) & 1 == 1 { k1 } else { k0 };
            assert_eq!(rkeys.keys[j], want);
        }
        // A different session id gives unrelated keys.
        let (sender, a) = BaseOtSender::new(&mut rng);
        let (rkeys, bs) = base_ot_receive(&mut rng, b"sid-1", &a, delta).unwrap();
        let skeys = sender.finish(b"sid-2", &bs).unwrap();
        assert!((0..KAPPA).all(|j| rkeys.keys[j] != skeys.pairs[j].0 && rkeys.keys[j] != skeys.pairs[j].1));
    }

    #[test]
    fn base_ot_rejects_bad_points() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        assert_eq!(
            base_ot_receive(&mut rng, b"s", &[0u8; 32], 1).unwrap_err(),
            CryptoError::IdentityPoint
        );
        let (sender, _) = BaseOtSender::new(&mut rng);
        assert_eq!(
            sender.finish(b"s", &[[0u8; 32]; 3]).unwrap_err(),
            CryptoError::BaseOtCount { got: 3 }
        );
    }

    fn run_iknp(rows: usize, chunk: usize, seed: u64) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let choices: Vec<bool> = (0..rows).map(|_| rng.next_u32() & 1 == 1).collect();
        let delta = (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64());
        let (bs_sender, a) = BaseOtSender::new(&mut rng);
        let (rkeys, bs) = base_ot_receive(&mut rng, b"s", &a, delta).unwrap();
        let skeys = bs_sender.finish(b"s", &bs).unwrap();
        let receiver = IknpReceiver::new(&skeys, pack_bits(&choices), rows).unwrap();
        let sender = IknpSender::new(delta, &rkeys, rows);
        let mut first = 0;
        while first < rows {
            let len = chunk.min(rows - first);
            let rc = receiver.chunk(first, len).unwrap();
            let pairs = sender.chunk(first, len, &rc.message).unwrap();
            for (k, ((k0, k1), got)) in pairs.iter().zip(&rc.keys).enumerate() {
                let i = first + k;
                assert_ne!(k0, k1, "row {i}");
                let (want, other) = if choices[i] { (k1, k0) } else { (k0, k1) };
                assert_eq!(got, want, "row {i}");
                assert_ne!(got, other, "row {i}");
                assert_eq!(receiver.choice(i), choices[i]);
            }
            first += len;
        }
    }

    #[test]
    fn iknp_random_ot_is_correct_at_awkward_sizes() {
        for (rows, chunk, seed) in [
            (1, 128, 1),
            (127, 128, 2),
            (129, 128, 3),
            (1000, 256, 4),
            (5003, 1024, 5),
            (300, 4096, 6),
        ] {
            run_iknp(rows, chunk, seed);
        }
    }

    #[test]
    fn iknp_checks_chunk_shapes() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let (bs_sender, a) = BaseOtSender::new(&mut rng);
        let (rkeys, bs) = base_ot_receive(&mut rng, b"s", &a, 77).unwrap();
        let skeys = bs_sender.finish(b"s", &bs).unwrap();
        let receiver = IknpReceiver::new(&skeys, pack_bits(&[true; 300]), 300).unwrap();
        let sender = IknpSender::new(77, &rkeys, 300);
        assert_eq!(receiver.chunk(1, 128).unwrap_err(), CryptoError::ChunkBounds);
        assert_eq!(receiver.chunk(0, 100).unwrap_err(), CryptoError::ChunkBounds);
        assert_eq!(receiver.chunk(256, 128).unwrap_err(), CryptoError::ChunkBounds);
        assert_eq!(
            sender.chunk(0, 128, &[0u8; 10]).unwrap_err(),
            CryptoError::ExtensionLength { len: 10 }
        );
        assert_eq!(
            sender.chunk(usize::MAX - 127, 128, &[]).unwrap_err(),
            CryptoError::ChunkBounds
        );
        assert!(IknpReceiver::new(&skeys, vec![0; 1], 300).is_err());
    }

    /// `H((i, j), k) = π(π(k) ⊕ (i·2^64 + j)) ⊕ π(k)` one block at a time,
    /// with `π` keyed from its label through the `sha2` crate.
    fn mask_by_definition(row: u64, key: u128, width: usize) -> Vec<u64> {
        use sha2::Digest;
        let d = sha2::Sha256::digest(b"cleanroom-v2-row-mask");
        let pi = Aes128::new_from_slice(&d[..16]).unwrap();
        let enc = |x: u128| {
            let mut b = Array::from(x.to_le_bytes());
            pi.encrypt_block(&mut b);
            u128::from_le_bytes(b.0)
        };
        let pk = enc(key);
        let mut out = Vec::new();
        for j in 0..width.div_ceil(2) {
            let v = enc(pk ^ ((u128::from(row) << 64) | j as u128)) ^ pk;
            out.push(v as u64);
            out.push((v >> 64) as u64);
        }
        out.truncate(width);
        out
    }

    #[test]
    fn row_masks_match_their_definition() {
        let mut masks = RowMasks::new();
        let mut out = Vec::new();
        // Widths odd and even, batches that grow and shrink the buffers.
        for (width, rows, first) in [
            (51, 7, 0u64),
            (1, 3, 5),
            (2, 1, u64::MAX),
            (131, 40, 1 << 40),
            (51, 2, 9),
        ] {
            let keys: Vec<u128> = (0..rows as u128)
                .map(|r| r * 0x9e37_79b9_7f4a_7c15 + width as u128)
                .collect();
            masks.expand(first, &keys, width, &mut out);
            assert_eq!(out.len(), rows * width);
            for (r, (got, key)) in out.chunks_exact(width).zip(&keys).enumerate() {
                let row = first.wrapping_add(r as u64);
                assert_eq!(
                    got,
                    mask_by_definition(row, *key, width).as_slice(),
                    "width {width} row {r}"
                );
            }
        }
        masks.expand(3, &[], 51, &mut out);
        assert!(out.is_empty());
        masks.expand(3, &[1, 2], 0, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn row_masks_depend_on_row_key_and_position() {
        let mut masks = RowMasks::new();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        masks.expand(0, &[7, 7], 4, &mut a);
        // Same key, next row: different words; same row and key: the same.
        assert_ne!(a[..4], a[4..]);
        masks.expand(1, &[7], 4, &mut b);
        assert_eq!(a[4..], b[..]);
        masks.expand(1, &[8], 4, &mut b);
        assert_ne!(a[4..], b[..]);
        // Nor is any word the key's own halves or zero.
        assert!(a.iter().all(|&w| w != 0 && w != 7));
        assert_eq!(RowMasks::batch_rows(51), MASK_BATCH_BLOCKS / 26);
        assert_eq!(RowMasks::batch_rows(1 << 20), 1);
        assert_eq!(format!("{masks:?}"), "RowMasks(<redacted>)");
    }
}
