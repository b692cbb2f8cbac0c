//! Points on the wire: strict decoding of the peer's points, the commutative
//! token step, and batched compression.

use std::collections::HashSet;

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoBasepointTable, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::Identity;
use rayon::prelude::*;
use zeroize::{Zeroize, Zeroizing};

use crate::CryptoError;
use crate::h2g::HashToGroup;
use crate::keys::SecretScalar;

/// Length of an encoded ristretto255 element.
pub const POINT_LEN: usize = 32;

/// An encoded point, as it travels.
pub type PointBytes = [u8; POINT_LEN];

/// How many points one parallel task handles: large enough that the batch
/// compression amortises its inversion, small enough to spread over cores.
const PAR_CHUNK: usize = 512;

/// Decodes one point received from the peer.
///
/// Ristretto255 decoding (RFC 9496 section 4.3.1) accepts only the canonical
/// encoding of each element; on top of that the identity is refused, since a
/// token equal to the identity would match every other identity token.
///
/// # Errors
/// [`CryptoError::NonCanonicalPoint`] or [`CryptoError::IdentityPoint`].
pub fn decode_point(bytes: &PointBytes) -> Result<RistrettoPoint, CryptoError> {
    let p = CompressedRistretto(*bytes)
        .decompress()
        .ok_or(CryptoError::NonCanonicalPoint)?;
    if p == RistrettoPoint::identity() {
        return Err(CryptoError::IdentityPoint);
    }
    Ok(p)
}

/// A cheap check that bytes could be the canonical encoding of a
/// non-identity element: the field element `s` is below `p = 2^255 - 19`,
/// even ("non-negative" in RFC 9496 terms), and not zero.
///
/// It does not prove the bytes decode (that needs a square root, as costly as
/// a full decompression). It is the right check for tokens that are only
/// ever compared byte for byte with encodings this node computed itself: such
/// encodings are canonical and never the identity, so anything this check
/// lets through that is not a valid point can never match.
///
/// # Errors
/// [`CryptoError::NonCanonicalPoint`] or [`CryptoError::IdentityPoint`].
pub fn check_token_encoding(bytes: &PointBytes) -> Result<(), CryptoError> {
    cleanroom_mb::check_encoding(bytes).map_err(point_error)
}

/// The crypto crate's error for a refused encoding.
fn point_error(e: cleanroom_mb::PointError) -> CryptoError {
    match e {
        cleanroom_mb::PointError::Identity => CryptoError::IdentityPoint,
        cleanroom_mb::PointError::Invalid => CryptoError::NonCanonicalPoint,
    }
}

/// Splits a byte buffer from the peer into encoded points.
///
/// # Errors
/// [`CryptoError::PointBufferLength`] when the length is not a multiple of 32.
pub fn split_points(buf: &[u8]) -> Result<Vec<PointBytes>, CryptoError> {
    if !buf.len().is_multiple_of(POINT_LEN) {
        return Err(CryptoError::PointBufferLength { len: buf.len() });
    }
    let mut out = Vec::with_capacity(buf.len() / POINT_LEN);
    for c in buf.chunks_exact(POINT_LEN) {
        let mut p = [0u8; POINT_LEN];
        p.copy_from_slice(c);
        out.push(p);
    }
    Ok(out)
}

/// `k * P` for each point, compressed, computed in parallel. Uses
/// `double_and_compress_batch` on `(k/2) * P`, which costs a fraction of one
/// compression per point.
pub fn mul_compress(points: &[RistrettoPoint], k: &SecretScalar) -> Vec<PointBytes> {
    let half = half_scalar(k);
    let mut out = vec![[0u8; POINT_LEN]; points.len()];
    out.par_chunks_mut(PAR_CHUNK)
        .zip(points.par_chunks(PAR_CHUNK))
        .for_each(|(out, pts)| {
            let scaled: Vec<RistrettoPoint> = pts.iter().map(|p| *half * p).collect();
            for (o, c) in out.iter_mut().zip(RistrettoPoint::double_and_compress_batch(&scaled)) {
                *o = c.to_bytes();
            }
        });
    out
}

/// Decodes the peer's points and returns `k * P` for each, compressed, in
/// parallel: one decompression and one scalar multiplication per point.
/// Eight points at a time through the multi-buffer code where the CPU has
/// AVX-512 IFMA ([`CurveEngine::selected`]), else curve25519-dalek one point
/// at a time; the results are the same bytes.
///
/// # Errors
/// As [`decode_point`].
pub fn decode_mul_compress(points: &[PointBytes], k: &SecretScalar) -> Result<Vec<PointBytes>, CryptoError> {
    decode_mul_compress_with(CurveEngine::selected(), points, k)
}

/// [`decode_mul_compress`] through the given engine (the multi-buffer
/// engine on a CPU without AVX-512 IFMA falls back to curve25519-dalek).
///
/// # Errors
/// As [`decode_point`].
pub fn decode_mul_compress_with(
    engine: CurveEngine,
    points: &[PointBytes],
    k: &SecretScalar,
) -> Result<Vec<PointBytes>, CryptoError> {
    let mut out = vec![[0u8; POINT_LEN]; points.len()];
    if let Some((ifma, digits)) = multi_buffer(engine, k) {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(points.par_chunks(PAR_CHUNK))
            .try_for_each(|(out, pts)| {
                let enc = ifma.decode_mul_encode(pts, &digits).map_err(|r| point_error(r.error))?;
                out.copy_from_slice(&enc);
                Ok::<(), CryptoError>(())
            })?;
        return Ok(out);
    }
    let half = half_scalar(k);
    out.par_chunks_mut(PAR_CHUNK)
        .zip(points.par_chunks(PAR_CHUNK))
        .try_for_each(|(out, pts)| {
            let mut scaled = Vec::with_capacity(pts.len());
            for p in pts {
                scaled.push(*half * decode_point(p)?);
            }
            for (o, c) in out.iter_mut().zip(RistrettoPoint::double_and_compress_batch(&scaled)) {
                *o = c.to_bytes();
            }
            Ok::<(), CryptoError>(())
        })?;
    Ok(out)
}

/// `k * H2G(x)` for each input, compressed, in parallel: one hash-to-group
/// and one scalar multiplication per identifier, eight at a time where the
/// CPU has AVX-512 IFMA (as [`decode_mul_compress`]).
pub fn hash_mul_compress<T: AsRef<[u8]> + Sync>(h2g: &HashToGroup, inputs: &[T], k: &SecretScalar) -> Vec<PointBytes> {
    hash_mul_compress_with(CurveEngine::selected(), h2g, inputs, k)
}

/// [`hash_mul_compress`] through the given engine (the multi-buffer
/// engine on a CPU without AVX-512 IFMA falls back to curve25519-dalek).
pub fn hash_mul_compress_with<T: AsRef<[u8]> + Sync>(
    engine: CurveEngine,
    h2g: &HashToGroup,
    inputs: &[T],
    k: &SecretScalar,
) -> Vec<PointBytes> {
    let mut out = vec![[0u8; POINT_LEN]; inputs.len()];
    if let Some((ifma, digits)) = multi_buffer(engine, k) {
        out.par_chunks_mut(PAR_CHUNK)
            .zip(inputs.par_chunks(PAR_CHUNK))
            .for_each(|(out, xs)| {
                // The hash's SHA-512 eight messages at a time too (the tag
                // was checked when `h2g` was made, so this never falls back).
                let msgs: Vec<&[u8]> = xs.iter().map(AsRef::as_ref).collect();
                let uniform = ifma
                    .expand_xmd_sha512_64(h2g.dst(), &msgs)
                    .unwrap_or_else(|| xs.iter().map(|x| h2g.uniform_bytes(x.as_ref())).collect());
                out.copy_from_slice(&ifma.hash_mul_encode(&uniform, &digits));
            });
        return out;
    }
    let half = half_scalar(k);
    out.par_chunks_mut(PAR_CHUNK)
        .zip(inputs.par_chunks(PAR_CHUNK))
        .for_each(|(out, xs)| {
            let scaled: Vec<RistrettoPoint> = xs.iter().map(|x| *half * h2g.hash(x.as_ref())).collect();
            for (o, c) in out.iter_mut().zip(RistrettoPoint::double_and_compress_batch(&scaled)) {
                *o = c.to_bytes();
            }
        });
    out
}

/// The multi-buffer code and `k` as it reads it, when `engine` asks for it
/// and this process may run it.
fn multi_buffer(engine: CurveEngine, k: &SecretScalar) -> Option<(cleanroom_mb::Ifma, cleanroom_mb::Digits)> {
    if engine != CurveEngine::MultiBuffer {
        return None;
    }
    let ifma = cleanroom_mb::Ifma::detect()?;
    let bytes = Zeroizing::new(k.expose().to_bytes());
    Some((ifma, cleanroom_mb::Digits::new(&bytes)?))
}

/// Which code does the join's curve work: the multi-buffer code of
/// `cleanroom-mb` (eight points per AVX-512 IFMA instruction, when the CPU
/// has it and `CLEANROOM_CURVE` is not `dalek`), or curve25519-dalek one
/// point at a time. Both give the same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CurveEngine {
    /// `cleanroom-mb`: eight points per instruction.
    MultiBuffer,
    /// curve25519-dalek, one point at a time (with the backend it chose,
    /// [`CurveBackend`]).
    Dalek,
}

impl CurveEngine {
    /// The engine this process uses.
    pub fn selected() -> Self {
        if cleanroom_mb::Ifma::detect().is_some() {
            Self::MultiBuffer
        } else {
            Self::Dalek
        }
    }

    /// Its name, as the bench prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::MultiBuffer => "multi-buffer AVX-512 IFMA, 8 points per instruction (cleanroom-mb)",
            Self::Dalek => "curve25519-dalek, one point at a time",
        }
    }
}

/// `s_i * P` for each scalar, compressed, in parallel: one constant-time
/// multiplication per scalar, with a precomputed table for `P` (built once,
/// whatever the number of scalars). The work depends only on how many
/// scalars there are, never on their values.
pub fn muls_compress(scalars: &[Scalar], p: &RistrettoPoint) -> Vec<PointBytes> {
    let table = RistrettoBasepointTable::create(p);
    let half = Scalar::from(2u8).invert();
    let mut out = vec![[0u8; POINT_LEN]; scalars.len()];
    out.par_chunks_mut(PAR_CHUNK)
        .zip(scalars.par_chunks(PAR_CHUNK))
        .for_each(|(out, ss)| {
            let halves: Vec<RistrettoPoint> = ss
                .iter()
                .map(|s| {
                    let mut h = s * half;
                    let q = &table * &h;
                    h.zeroize();
                    q
                })
                .collect();
            for (o, c) in out.iter_mut().zip(RistrettoPoint::double_and_compress_batch(&halves)) {
                *o = c.to_bytes();
            }
        });
    out
}

/// Compresses points in batches, in parallel.
pub fn compress_batch(points: &[RistrettoPoint]) -> Vec<PointBytes> {
    let half = Scalar::from(2u8).invert();
    let mut out = vec![[0u8; POINT_LEN]; points.len()];
    out.par_chunks_mut(PAR_CHUNK)
        .zip(points.par_chunks(PAR_CHUNK))
        .for_each(|(out, pts)| {
            let halves: Vec<RistrettoPoint> = pts.iter().map(|p| half * p).collect();
            for (o, c) in out.iter_mut().zip(RistrettoPoint::double_and_compress_batch(&halves)) {
                *o = c.to_bytes();
            }
        });
    out
}

/// `k/2`, as secret as `k` itself: zeroized when dropped.
fn half_scalar(k: &SecretScalar) -> Zeroizing<Scalar> {
    Zeroizing::new(k.expose() * Scalar::from(2u8).invert())
}

/// Whether two of `points` are equal (as bytes, hence as points: the
/// encodings are canonical). Sorts each point's first eight bytes with its
/// index (16 bytes a point, not 32, and integer comparisons) and compares
/// whole encodings only where those prefixes are equal, so a peer that
/// makes prefixes collide on purpose costs a comparison per collision, not
/// a wrong answer.
pub fn has_duplicate(points: &[PointBytes]) -> bool {
    if points.len() > u32::MAX as usize {
        // Indices would wrap; no join has that many points (the offer
        // caps rows at 2^32 - 1), so fall back to the plain sort.
        let mut sorted = points.to_vec();
        sorted.par_sort_unstable();
        return sorted.windows(2).any(|w| w.first() == w.get(1));
    }
    let mut keys: Vec<(u64, u32)> = points
        .par_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut head = [0u8; 8];
            head.copy_from_slice(p.get(..8).unwrap_or(&[0u8; 8]));
            (u64::from_be_bytes(head), i as u32)
        })
        .collect();
    keys.par_sort_unstable();
    // Within a run of equal prefixes, any two equal points (the run is
    // short: two random points share 64 bits with probability 2^-64).
    let mut start = 0;
    while start < keys.len() {
        let head = keys.get(start).map(|k| k.0);
        let mut end = start + 1;
        while end < keys.len() && keys.get(end).map(|k| k.0) == head {
            end += 1;
        }
        if end - start > 1 {
            let mut run: Vec<&PointBytes> = keys
                .get(start..end)
                .unwrap_or(&[])
                .iter()
                .filter_map(|(_, i)| points.get(*i as usize))
                .collect();
            run.sort_unstable();
            if run.windows(2).any(|w| w.first() == w.get(1)) {
                return true;
            }
        }
        start = end;
    }
    false
}

/// A set of encoded points that refuses duplicates: since ristretto255
/// encodings are canonical, equal bytes mean equal points and vice versa.
#[derive(Debug, Default)]
pub struct DistinctPoints {
    seen: HashSet<PointBytes>,
}

impl DistinctPoints {
    /// An empty set with room for `n` points.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            seen: HashSet::with_capacity(n),
        }
    }

    /// Adds every point, failing on the first one already present.
    ///
    /// # Errors
    /// [`CryptoError::DuplicatePoint`].
    pub fn insert_all(&mut self, points: &[PointBytes]) -> Result<(), CryptoError> {
        for p in points {
            if !self.seen.insert(*p) {
                return Err(CryptoError::DuplicatePoint);
            }
        }
        Ok(())
    }

    /// Whether the point is in the set.
    pub fn contains(&self, p: &PointBytes) -> bool {
        self.seen.contains(p)
    }

    /// Number of points in the set.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Which of curve25519-dalek's scalar-multiplication backends this process
/// uses: the library picks one at run time among those compiled in (the
/// workspace's `.cargo/config.toml` compiles AVX-512 IFMA beside AVX2 and
/// the serial code on x86-64). This mirrors its choice (its `backend.rs`:
/// AVX-512 IFMA with AVX-512VL if compiled and present, else AVX2 if
/// compiled and present, else serial) so that the bench and the tests can
/// say which one ran. Field arithmetic (decompression, hash-to-group) is
/// the serial 64-bit code whatever the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CurveBackend {
    /// AVX-512 IFMA on 256-bit vectors (AVX-512VL): the four coordinates of
    /// one point side by side, radix-2^51 limbs multiplied by the 52-bit
    /// IFMA instructions, inside one scalar multiplication.
    Avx512Ifma,
    /// 4-way AVX2.
    Avx2,
    /// 64-bit serial code.
    Serial,
}

impl CurveBackend {
    /// The backend curve25519-dalek uses in this process.
    pub fn selected() -> Self {
        #[cfg(all(
            target_arch = "x86_64",
            target_pointer_width = "64",
            not(curve25519_dalek_bits = "32"),
            any(
                curve25519_dalek_backend = "avx512",
                all(
                    target_feature = "avx512ifma",
                    target_feature = "avx512vl",
                    not(any(
                        curve25519_dalek_backend = "serial",
                        curve25519_dalek_backend = "fiat",
                        curve25519_dalek_backend = "simd"
                    ))
                )
            )
        ))]
        if std::arch::is_x86_feature_detected!("avx512ifma") && std::arch::is_x86_feature_detected!("avx512vl") {
            return Self::Avx512Ifma;
        }
        #[cfg(all(
            target_arch = "x86_64",
            target_pointer_width = "64",
            not(curve25519_dalek_bits = "32"),
            not(any(curve25519_dalek_backend = "serial", curve25519_dalek_backend = "fiat"))
        ))]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Self::Avx2;
        }
        Self::Serial
    }

    /// Its name, as the bench prints it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avx512Ifma => "AVX-512 IFMA",
            Self::Avx2 => "AVX2",
            Self::Serial => "serial",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::constants::RISTRETTO_BASEPOINT_POINT;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    #[allow(clippy::too_many_lines)]
    fn strict_decoding() {
        // The identity's encoding is all zeros: valid ristretto, refused here.
        assert_eq!(decode_point(&[0u8; 32]), Err(CryptoError::IdentityPoint));
        // RFC 9496 A.2: some non-canonical or invalid encodings.
        for bad in [
            "00ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
            "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "f3ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "0100000000000000000000000000000000000000000000000000000000000000",
            "26948d35ca62e643e26a83177332e6b6afeb9d08e4268b650f1f5bbd8d81d371",
        ] {
            let b: [u8; 32] = hex::decode(bad).unwrap().try_into().unwrap();
            assert_eq!(decode_point(&b), Err(CryptoError::NonCanonicalPoint), "{bad}");
        }
        let g = RISTRETTO_BASEPOINT_POINT.compress().to_bytes();
        assert_eq!(decode_point(&g), Ok(RISTRETTO_BASEPOINT_POINT));
        assert!(split_points(&[0u8; 33]).is_err());
        assert_eq!(check_token_encoding(&[0u8; 32]), Err(CryptoError::IdentityPoint));
        for bad in [
            "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
            "0100000000000000000000000000000000000000000000000000000000000000",
            "0000000000000000000000000000000000000000000000000000000000000080",
        ] {
            let b: [u8; 32] = hex::decode(bad).unwrap().try_into().unwrap();
            assert_eq!(check_token_encoding(&b), Err(CryptoError::NonCanonicalPoint), "{bad}");
        }
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        for _ in 0..100 {
            let p = SecretScalar::random(&mut rng).public().compress().to_bytes();
            assert_eq!(check_token_encoding(&p), Ok(()));
        }
        assert_eq!(split_points(&[7u8; 64]).unwrap().len(), 2);
    }

    #[test]
    fn batched_paths_agree_with_plain_arithmetic() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let k = SecretScalar::random(&mut rng);
        let h2g = HashToGroup::for_collaboration("test").unwrap();
        let ids: Vec<String> = (0..1300).map(|i| format!("user{i}@example.com")).collect();
        let hashed: Vec<RistrettoPoint> = ids.iter().map(|x| h2g.hash(x.as_bytes())).collect();
        let direct: Vec<PointBytes> = hashed.iter().map(|p| (k.expose() * p).compress().to_bytes()).collect();
        assert_eq!(hash_mul_compress(&h2g, &ids, &k), direct);
        for engine in [CurveEngine::MultiBuffer, CurveEngine::Dalek] {
            assert_eq!(hash_mul_compress_with(engine, &h2g, &ids, &k), direct, "{engine:?}");
        }
        assert_eq!(mul_compress(&hashed, &k), direct);
        let enc: Vec<PointBytes> = hashed.iter().map(|p| p.compress().to_bytes()).collect();
        assert_eq!(compress_batch(&hashed), enc);
        assert_eq!(decode_mul_compress(&enc, &k).unwrap(), direct);
        let mut bad = enc.clone();
        bad[1000] = [0u8; 32];
        let mut invalid = enc.clone();
        invalid[700][0] |= 1;
        for engine in [CurveEngine::MultiBuffer, CurveEngine::Dalek] {
            assert_eq!(
                decode_mul_compress_with(engine, &enc, &k).unwrap(),
                direct,
                "{engine:?}"
            );
            assert_eq!(
                decode_mul_compress_with(engine, &bad, &k),
                Err(CryptoError::IdentityPoint)
            );
            assert_eq!(
                decode_mul_compress_with(engine, &invalid, &k),
                Err(CryptoError::NonCanonicalPoint)
            );
        }
        eprintln!("curve engine: {}", CurveEngine::selected().name());
    }

    /// Variable-base multiplication (through whichever backend dalek chose
    /// at run time) against the precomputed basepoint table (serial code):
    /// `k * (r * B) == (k * r) * B`, and a batch of the same through the
    /// join's paths. (`tests/tests/curve_fallback.rs` runs the join's curve
    /// work on emulated CPUs without AVX-512 and without AVX2.)
    #[test]
    fn variable_base_multiplication_agrees_with_the_basepoint_table() {
        use curve25519_dalek::constants::RISTRETTO_BASEPOINT_TABLE;
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let k = SecretScalar::random(&mut rng);
        let mut points = Vec::new();
        let mut want = Vec::new();
        for _ in 0..200 {
            let r = *SecretScalar::random(&mut rng).expose();
            let p = RISTRETTO_BASEPOINT_TABLE * &r;
            assert_eq!(k.expose() * p, RISTRETTO_BASEPOINT_TABLE * &(k.expose() * r));
            points.push(p);
            want.push((RISTRETTO_BASEPOINT_TABLE * &(k.expose() * r)).compress().to_bytes());
        }
        assert_eq!(mul_compress(&points, &k), want);
        let enc: Vec<PointBytes> = points.iter().map(|p| p.compress().to_bytes()).collect();
        assert_eq!(decode_mul_compress(&enc, &k).unwrap(), want);
        // The identity and small multiples.
        for small in 1u64..20 {
            let p = RISTRETTO_BASEPOINT_POINT * Scalar::from(small);
            assert_eq!(
                k.expose() * p,
                RISTRETTO_BASEPOINT_TABLE * &(k.expose() * Scalar::from(small))
            );
        }
        assert_eq!(k.expose() * RistrettoPoint::identity(), RistrettoPoint::identity());
        eprintln!("curve backend: {}", CurveBackend::selected().name());
    }

    #[test]
    fn duplicates_detected() {
        let mut s = DistinctPoints::default();
        s.insert_all(&[[1u8; 32], [2u8; 32]]).unwrap();
        assert_eq!(s.insert_all(&[[3u8; 32], [1u8; 32]]), Err(CryptoError::DuplicatePoint));
    }

    /// `has_duplicate` against a plain sort of whole encodings, on random
    /// byte strings with duplicates planted at every distance, with runs of
    /// equal 8-byte prefixes and distinct tails (not duplicates), and with
    /// a prefix run that holds one duplicate pair in its middle.
    #[test]
    fn has_duplicate_agrees_with_a_plain_sort() {
        use rand_core::RngCore;
        let reference = |v: &[PointBytes]| {
            let mut s = v.to_vec();
            s.sort_unstable();
            s.windows(2).any(|w| w[0] == w[1])
        };
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let random = |rng: &mut ChaCha20Rng, n: usize| -> Vec<PointBytes> {
            (0..n)
                .map(|_| {
                    let mut p = [0u8; 32];
                    rng.fill_bytes(&mut p);
                    p
                })
                .collect()
        };
        assert!(!has_duplicate(&[]));
        assert!(!has_duplicate(&[[7u8; 32]]));
        assert!(has_duplicate(&[[7u8; 32], [7u8; 32]]));
        for n in [2usize, 3, 17, 1000] {
            let v = random(&mut rng, n);
            assert_eq!(has_duplicate(&v), reference(&v));
            assert!(!has_duplicate(&v), "n = {n}");
            for (i, j) in [(0, n - 1), (n / 2, n / 2 + 1), (n - 2, n - 1)] {
                if i == j || j >= n {
                    continue;
                }
                let mut d = v.clone();
                d[j] = d[i];
                assert!(has_duplicate(&d), "n = {n}, {i} = {j}");
            }
        }
        // Equal prefixes, distinct tails: no duplicate; then one pair.
        let mut v = random(&mut rng, 500);
        for p in v.iter_mut().step_by(3) {
            p[..8].copy_from_slice(b"samehead");
        }
        assert!(!has_duplicate(&v));
        assert_eq!(has_duplicate(&v), reference(&v));
        v[300] = v[150];
        assert!(has_duplicate(&v));
        assert_eq!(has_duplicate(&v), reference(&v));
    }

    /// The multi-buffer SHA-512 expansion equals the RFC 9380 one (this
    /// crate's `expand_message_xmd_sha512`, checked against the RFC's
    /// vectors) for every message length from 0 to 300 bytes and tags
    /// around the lengths where the padding needs another block.
    #[test]
    fn multi_buffer_expansion_equals_expand_message_xmd() {
        let Some(ifma) = cleanroom_mb::Ifma::detect() else {
            eprintln!("no AVX-512 IFMA here: the multi-buffer expansion is not run");
            return;
        };
        let msgs: Vec<Vec<u8>> = (0..=300usize)
            .map(|n| (0..n).map(|i| (i * 7 + n) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = msgs.iter().map(Vec::as_slice).collect();
        for dst_len in [1usize, 38, 45, 46, 47, 100, 110, 111, 112, 255] {
            let dst: Vec<u8> = (0..dst_len).map(|i| b'a' + (i % 26) as u8).collect();
            let got = ifma.expand_xmd_sha512_64(&dst, &refs).unwrap();
            assert_eq!(got.len(), refs.len());
            for (m, g) in refs.iter().zip(&got) {
                let want = crate::h2g::expand_message_xmd_sha512(m, &dst, 64).unwrap();
                assert_eq!(g.as_slice(), want.as_slice(), "dst {dst_len}, msg {}", m.len());
            }
            // Batches of every length up to a few vectors.
            for n in 0..20 {
                assert_eq!(ifma.expand_xmd_sha512_64(&dst, &refs[..n]).unwrap(), got[..n]);
            }
        }
        assert!(ifma.expand_xmd_sha512_64(&[], &refs).is_none());
        assert!(ifma.expand_xmd_sha512_64(&[0u8; 256], &refs).is_none());
    }
}
