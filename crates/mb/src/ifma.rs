//! The AVX-512 IFMA code: eight field elements per [`Fe`], one per 64-bit
//! lane, each as five radix-2^52 limbs (one 512-bit vector per limb).
//!
//! Every function here is compiled with `avx512f,avx512ifma,avx512dq`
//! enabled and contains no `unsafe`: the intrinsics are safe to call inside
//! such functions. Only [`run`] is called from outside, after the features were
//! detected (`lib.rs`).
//!
//! Why radix 2^52: `vpmadd52luq`/`vpmadd52huq` split a product of two 52-bit
//! limbs at bit 52, so at this radix the high half of `a_i b_j` lands in
//! column `i + j + 1` as it is, with no doubling, and a product is 50
//! multiply-adds into ten columns and one fold (`2^260 = 608 mod p`, itself
//! multiply-adds). Radix 2^51 would leave a spare bit per limb for
//! additions without carries, but doubles every high half and needs a
//! 64-bit multiplication (`vpmullq`) per limb to fold: counted in the
//! compiled code, a product took about 104 vector micro-operations at radix
//! 2^51 (`vpmullq` as three) against 83 here, carry included (the git
//! history of this file has the radix-2^51 version; README "Radix 2^52"
//! has the timings).
//!
//! Limb bounds. The multipliers read 52 bits of each limb, so every input
//! of [`mul`] and [`sq`] must have limbs below `2^52`. Every operation here
//! returns *normalized* limbs: the first four below `2^52`, the top one
//! below `2^48` (value below `2^256`, not necessarily below `p`), which is
//! what [`carry`] makes of any limbs below `2^63`. [`canonical`] reduces
//! below `p` where a result is compared or encoded. A product that only
//! feeds additions and subtractions can skip its carry ([`mul_wide`],
//! [`sq_wide`]: limbs below `2^56`, a [`Wide`]); the sum's carry covers it.

#![allow(clippy::many_single_char_names)]

use core::arch::x86_64::{
    __m512i, __mmask8, _mm256_extract_epi64, _mm512_add_epi64, _mm512_and_si512, _mm512_castsi512_si256,
    _mm512_cmpeq_epi64_mask, _mm512_extracti64x4_epi64, _mm512_madd52hi_epu64, _mm512_madd52lo_epu64,
    _mm512_mask_blend_epi64, _mm512_or_si512, _mm512_set_epi64, _mm512_set1_epi64, _mm512_setzero_si512,
    _mm512_srli_epi64, _mm512_sub_epi64, _mm512_test_epi64_mask,
};

use subtle::ConstantTimeEq;

use crate::{Digits, Job, LANES, POINT_LEN, PointError, Refused, bytes_from_limbs, check_encoding, limbs_from_bytes};

const M52: u64 = (1 << 52) - 1;
const M47: u64 = (1 << 47) - 1;

/// `1024p = 2^5 (2^260 - 608)` as radix-2^52 limbs that are each above
/// any limb of a [`Wide`] (`2^5 (2^52 - 608)`, then `2^5 (2^52 - 1)`):
/// `a + 1024p - b` has no negative limb.
const P1024: [u64; 5] = [
    (1 << 57) - 32 * 608,
    (1 << 57) - 32,
    (1 << 57) - 32,
    (1 << 57) - 32,
    (1 << 57) - 32,
];

// The curve's constants (RFC 9496 section 4.1, and `d`, `2d` of
// edwards25519), canonical radix-2^52 limbs. Checked by the tests against
// curve25519-dalek's results, and derivable with any big-integer tool.
/// `d = -121665/121666`.
const D: [u64; 5] = [
    3_181_755_047_180_451,
    1_359_082_766_907_230,
    2_104_364_726_513_674,
    4_476_355_785_000_855,
    90_174_665_927_535,
];
/// `2d`.
const D2: [u64; 5] = [
    1_859_910_466_990_425,
    2_718_165_533_814_461,
    4_208_729_453_027_348,
    4_449_111_942_631_214,
    39_611_843_499_743,
];
/// `SQRT_M1`, a square root of -1.
const SQRT_M1: [u64; 5] = [
    3_970_505_234_096_304,
    117_454_441_778_254,
    3_936_078_338_671_384,
    3_923_825_025_616_275,
    47_842_253_098_945,
];
/// `INVSQRT_A_MINUS_D = 1/sqrt(a - d)`.
const INVSQRT_A_MINUS_D: [u64; 5] = [
    2_530_708_553_548_010,
    410_822_600_550_812,
    3_942_677_982_555_926,
    4_444_369_547_933_983,
    132_407_550_660_527,
];
/// `SQRT_AD_MINUS_ONE = sqrt(a*d - 1)`.
const SQRT_AD_MINUS_ONE: [u64; 5] = [
    2_241_493_124_984_347,
    212_993_959_516_137,
    551_757_229_825_422,
    1_278_461_235_678_355,
    60_924_945_705_859,
];
/// `ONE_MINUS_D_SQ = 1 - d^2`.
const ONE_MINUS_D_SQ: [u64; 5] = [
    3_388_426_743_169_398,
    999_275_199_790_631,
    4_064_756_582_089_121,
    3_955_465_587_965_403,
    2_819_422_204_595,
];
/// `D_MINUS_ONE_SQ = (d - 1)^2`.
const D_MINUS_ONE_SQ: [u64; 5] = [
    3_758_862_044_581_152,
    786_158_893_765_402,
    733_713_219_624_522,
    602_621_724_144_373,
    98_306_222_650_988,
];

/// The encoding of the ristretto255 generator (RFC 9496 A.1): what the
/// unused lanes of a last, partial batch of peer points decode.
const FILLER: [u8; POINT_LEN] = [
    0xe2, 0xf2, 0xae, 0x0a, 0x6a, 0xbc, 0x4e, 0x71, 0xa8, 0x84, 0xa9, 0x61, 0xc5, 0x00, 0x51, 0x5f, 0x58, 0xe3, 0x0b,
    0x6a, 0xa5, 0x82, 0xdd, 0x8d, 0xb6, 0xa6, 0x59, 0x45, 0xe0, 0x8d, 0x2d, 0x76,
];

/// How many vectors of eight points share one inversion when encoded.
const ENCODE_BATCH: usize = 64;

/// Eight field elements, normalized (module documentation).
#[derive(Clone, Copy)]
struct Fe([__m512i; 5]);

/// Eight field elements with limbs below `2^56`: a product before its
/// carry, or an [`Fe`]. Only additions and subtractions read it.
#[derive(Clone, Copy)]
struct Wide([__m512i; 5]);

impl From<Fe> for Wide {
    fn from(a: Fe) -> Self {
        Self(a.0)
    }
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn splat(x: u64) -> __m512i {
    _mm512_set1_epi64(x as i64)
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn constant(l: [u64; 5]) -> Fe {
    Fe([splat(l[0]), splat(l[1]), splat(l[2]), splat(l[3]), splat(l[4])])
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn zero() -> Fe {
    constant([0; 5])
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn one() -> Fe {
    constant([1, 0, 0, 0, 0])
}

/// The eight lanes of one vector.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
pub(crate) fn lanes(v: __m512i) -> [u64; LANES] {
    let lo = _mm512_castsi512_si256(v);
    let hi = _mm512_extracti64x4_epi64::<1>(v);
    [
        _mm256_extract_epi64::<0>(lo) as u64,
        _mm256_extract_epi64::<1>(lo) as u64,
        _mm256_extract_epi64::<2>(lo) as u64,
        _mm256_extract_epi64::<3>(lo) as u64,
        _mm256_extract_epi64::<0>(hi) as u64,
        _mm256_extract_epi64::<1>(hi) as u64,
        _mm256_extract_epi64::<2>(hi) as u64,
        _mm256_extract_epi64::<3>(hi) as u64,
    ]
}

/// One vector from eight lanes.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
pub(crate) fn from_lanes(l: &[u64; LANES]) -> __m512i {
    _mm512_set_epi64(
        l[7] as i64,
        l[6] as i64,
        l[5] as i64,
        l[4] as i64,
        l[3] as i64,
        l[2] as i64,
        l[1] as i64,
        l[0] as i64,
    )
}

/// Eight field elements from eight 32-byte strings (bit 255 ignored).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn fe_from_bytes(b: &[&[u8]; LANES]) -> Fe {
    let mut limbs = [[0u64; LANES]; 5];
    for (lane, bytes) in b.iter().enumerate() {
        let l = limbs_from_bytes(bytes);
        for (limb, v) in limbs.iter_mut().zip(l) {
            limb[lane] = v;
        }
    }
    Fe([
        from_lanes(&limbs[0]),
        from_lanes(&limbs[1]),
        from_lanes(&limbs[2]),
        from_lanes(&limbs[3]),
        from_lanes(&limbs[4]),
    ])
}

/// The canonical 32-byte encodings of eight field elements.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn fe_to_bytes(a: &Fe) -> [[u8; POINT_LEN]; LANES] {
    let c = canonical(a);
    let l = [lanes(c[0]), lanes(c[1]), lanes(c[2]), lanes(c[3]), lanes(c[4])];
    let mut out = [[0u8; POINT_LEN]; LANES];
    for (lane, o) in out.iter_mut().enumerate() {
        *o = bytes_from_limbs(&[l[0][lane], l[1][lane], l[2][lane], l[3][lane], l[4][lane]]);
    }
    out
}
/// Limbs below `2^63` to normalized limbs (the first four below `2^52`,
/// the top one at most `2^47 - 1 + 2^11`), the same value mod p: first the top
/// limb's bits from 255 up, times 19 (`2^255 = 19 mod p`), into the bottom
/// limb; then one carry up through the limbs.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn carry(r: &mut [__m512i; 5]) {
    let m = splat(M52);
    // Below 2^16, so 19 t is the low half of one 52-bit product.
    let t = _mm512_srli_epi64::<47>(r[4]);
    r[4] = _mm512_and_si512(r[4], splat(M47));
    r[0] = _mm512_madd52lo_epu64(r[0], t, splat(19));
    for k in 0..4 {
        // Each carry at most 2^11: the limbs below 2^63 + 2^21 before it.
        let c = _mm512_srli_epi64::<52>(r[k]);
        r[k] = _mm512_and_si512(r[k], m);
        r[k + 1] = _mm512_add_epi64(r[k + 1], c);
    }
}

/// `a + b` for limbs below `2^56`: limbs below `2^57` before the carry.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn add_wide(a: &Wide, b: &Wide) -> Fe {
    let mut x = [
        _mm512_add_epi64(a.0[0], b.0[0]),
        _mm512_add_epi64(a.0[1], b.0[1]),
        _mm512_add_epi64(a.0[2], b.0[2]),
        _mm512_add_epi64(a.0[3], b.0[3]),
        _mm512_add_epi64(a.0[4], b.0[4]),
    ];
    carry(&mut x);
    Fe(x)
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn add(a: &Fe, b: &Fe) -> Fe {
    add_wide(&Wide::from(*a), &Wide::from(*b))
}

/// `a - b` as `a + 1024p - b` for limbs below `2^56`: limbs below
/// `2^56 + 2^57` before the carry.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn sub_wide(a: &Wide, b: &Wide) -> Fe {
    let mut x = [_mm512_setzero_si512(); 5];
    for (i, x) in x.iter_mut().enumerate() {
        *x = _mm512_sub_epi64(_mm512_add_epi64(a.0[i], splat(P1024[i])), b.0[i]);
    }
    carry(&mut x);
    Fe(x)
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn sub(a: &Fe, b: &Fe) -> Fe {
    sub_wide(&Wide::from(*a), &Wide::from(*b))
}

/// `2a - b`, as `2a + 1024p - b`: limbs below `2^57 + 2^57`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn sub2_wide(a: &Wide, b: &Fe) -> Fe {
    let mut x = [_mm512_setzero_si512(); 5];
    for (i, x) in x.iter_mut().enumerate() {
        let twice = _mm512_add_epi64(a.0[i], a.0[i]);
        *x = _mm512_sub_epi64(_mm512_add_epi64(twice, splat(P1024[i])), b.0[i]);
    }
    carry(&mut x);
    Fe(x)
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn neg(a: &Fe) -> Fe {
    sub(&zero(), a)
}

/// Folds the ten columns `c` of a product (`c_k` below `11 * 2^52`, `c_9`
/// below `2^52`; column `k` weighs `2^(52 k)`) into five.
///
/// `2^260 = 32 * 19 = 608 (mod p)`, so column `j >= 5` moves to column
/// `j - 5` times 608. The multipliers read the low 52 bits `L` of `c_j`:
/// the low half of `608 L` goes to column `j - 5`, its high half (below
/// `2^10`) to column `j - 4`, and so do the bits `H = c_j >> 52` (below
/// 16) times 608. Column 9's high half lands in column 5, which is folded
/// after it. Every column stays below `11 * 2^52 + 2^15 < 2^56`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn fold(c: &mut [__m512i; 10]) -> Wide {
    let k608 = splat(608);
    c[4] = _mm512_madd52lo_epu64(c[4], c[9], k608);
    c[5] = _mm512_madd52hi_epu64(c[5], c[9], k608);
    for j in (5..9).rev() {
        let h = _mm512_srli_epi64::<52>(c[j]);
        c[j - 5] = _mm512_madd52lo_epu64(c[j - 5], c[j], k608);
        c[j - 4] = _mm512_madd52hi_epu64(c[j - 4], c[j], k608);
        c[j - 4] = _mm512_madd52lo_epu64(c[j - 4], h, k608);
    }
    Wide([c[0], c[1], c[2], c[3], c[4]])
}

/// A [`Wide`] normalized.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn normalize(w: &Wide) -> Fe {
    let mut r = w.0;
    carry(&mut r);
    Fe(r)
}

/// `a * b`. A limb product `a_i b_j` (both below `2^52`) is
/// `lo + 2^52 hi`: `lo` in column `i + j`, `hi` in column `i + j + 1`.
/// Column `k` sums at most nine halves: below `9 * 2^52`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn mul_wide(a: &Fe, b: &Fe) -> Wide {
    let mut c = [_mm512_setzero_si512(); 10];
    for i in 0..5 {
        for j in 0..5 {
            c[i + j] = _mm512_madd52lo_epu64(c[i + j], a.0[i], b.0[j]);
            c[i + j + 1] = _mm512_madd52hi_epu64(c[i + j + 1], a.0[i], b.0[j]);
        }
    }
    fold(&mut c)
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn mul(a: &Fe, b: &Fe) -> Fe {
    normalize(&mul_wide(a, b))
}

/// `a^2`: the five squares `d` and the ten cross products `x` once, column
/// `k` being `d_k + 2 x_k` (below `2^52 + 2 * 4 * 2^52`).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn sq_wide(a: &Fe) -> Wide {
    let zero = _mm512_setzero_si512();
    let mut d = [zero; 10];
    let mut x = [zero; 10];
    for i in 0..5 {
        d[2 * i] = _mm512_madd52lo_epu64(d[2 * i], a.0[i], a.0[i]);
        d[2 * i + 1] = _mm512_madd52hi_epu64(d[2 * i + 1], a.0[i], a.0[i]);
        for j in (i + 1)..5 {
            x[i + j] = _mm512_madd52lo_epu64(x[i + j], a.0[i], a.0[j]);
            x[i + j + 1] = _mm512_madd52hi_epu64(x[i + j + 1], a.0[i], a.0[j]);
        }
    }
    // Columns 0 and 9 have no cross product.
    let mut c = d;
    for k in 1..9 {
        c[k] = _mm512_add_epi64(d[k], _mm512_add_epi64(x[k], x[k]));
    }
    fold(&mut c)
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn sq(a: &Fe) -> Fe {
    normalize(&sq_wide(a))
}

/// The limbs of the canonical representative (below `p`; limbs below
/// `2^52`, the top one below `2^47`).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn canonical(a: &Fe) -> [__m512i; 5] {
    let m = splat(M52);
    let mut x = a.0;
    // Normalized, with the top limb at most 2^47 - 1 + 2^11: value below 2p.
    carry(&mut x);
    // q = floor((x + 19) / 2^255): 1 exactly when x >= p.
    let mut q = _mm512_srli_epi64::<52>(_mm512_add_epi64(x[0], splat(19)));
    for limb in &x[1..4] {
        q = _mm512_srli_epi64::<52>(_mm512_add_epi64(*limb, q));
    }
    q = _mm512_srli_epi64::<47>(_mm512_add_epi64(x[4], q));
    // x - q p = x + 19 q - q 2^255.
    x[0] = _mm512_madd52lo_epu64(x[0], q, splat(19));
    for k in 0..4 {
        let c = _mm512_srli_epi64::<52>(x[k]);
        x[k] = _mm512_and_si512(x[k], m);
        x[k + 1] = _mm512_add_epi64(x[k + 1], c);
    }
    x[4] = _mm512_and_si512(x[4], splat(M47));
    x
}

/// Lanes where `a` is zero (mod p).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn is_zero(a: &Fe) -> __mmask8 {
    let c = canonical(a);
    let any = _mm512_or_si512(
        _mm512_or_si512(_mm512_or_si512(c[0], c[1]), _mm512_or_si512(c[2], c[3])),
        c[4],
    );
    _mm512_cmpeq_epi64_mask(any, _mm512_setzero_si512())
}

/// Lanes where `a == b` (mod p).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn eq(a: &Fe, b: &Fe) -> __mmask8 {
    is_zero(&sub(a, b))
}

/// Lanes where `a` is negative in RFC 9496's sense: its canonical
/// representative is odd.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn is_negative(a: &Fe) -> __mmask8 {
    let c = canonical(a);
    _mm512_test_epi64_mask(c[0], splat(1))
}

/// `b` in the lanes of `k`, `a` in the others.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn select(k: __mmask8, a: &Fe, b: &Fe) -> Fe {
    Fe([
        _mm512_mask_blend_epi64(k, a.0[0], b.0[0]),
        _mm512_mask_blend_epi64(k, a.0[1], b.0[1]),
        _mm512_mask_blend_epi64(k, a.0[2], b.0[2]),
        _mm512_mask_blend_epi64(k, a.0[3], b.0[3]),
        _mm512_mask_blend_epi64(k, a.0[4], b.0[4]),
    ])
}

/// `a = b` in the lanes of `k`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn select_assign(a: &mut Fe, k: __mmask8, b: &Fe) {
    for (a, b) in a.0.iter_mut().zip(b.0.iter()) {
        *a = _mm512_mask_blend_epi64(k, *a, *b);
    }
}

/// `-a` in the lanes of `k`, `a` in the others.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn cneg(a: &Fe, k: __mmask8) -> Fe {
    select(k, a, &neg(a))
}

/// `|a|`: the non-negative one of `a` and `-a`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn abs(a: &Fe) -> Fe {
    cneg(a, is_negative(a))
}

/// `a_i b_i` for each `i`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn mul_each<const N: usize>(a: &[Fe; N], b: &[Fe; N]) -> [Fe; N] {
    let mut r = *a;
    for (r, b) in r.iter_mut().zip(b) {
        *r = mul(r, b);
    }
    r
}

/// `a_i^(2^n)` for each `i`, the chains interleaved: a square waits for the
/// one before it, so one chain alone leaves the multipliers idle.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn sq_n_each<const N: usize>(a: &[Fe; N], n: u32) -> [Fe; N] {
    let mut x = *a;
    for _ in 0..n {
        for v in x.iter_mut() {
            *v = sq(v);
        }
    }
    x
}

/// `(x^(2^250 - 1), x^11)` for each `x`: the shared start of the two
/// exponentiations.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn pow22501<const N: usize>(x: &[Fe; N]) -> ([Fe; N], [Fe; N]) {
    let t0 = sq_n_each(x, 1); // 2
    let t1 = sq_n_each(&t0, 2); // 8
    let t2 = mul_each(x, &t1); // 9
    let t3 = mul_each(&t0, &t2); // 11
    let t4 = sq_n_each(&t3, 1); // 22
    let t5 = mul_each(&t2, &t4); // 2^5 - 1
    let t6 = sq_n_each(&t5, 5);
    let t7 = mul_each(&t6, &t5); // 2^10 - 1
    let t8 = sq_n_each(&t7, 10);
    let t9 = mul_each(&t8, &t7); // 2^20 - 1
    let t10 = sq_n_each(&t9, 20);
    let t11 = mul_each(&t10, &t9); // 2^40 - 1
    let t12 = sq_n_each(&t11, 10);
    let t13 = mul_each(&t12, &t7); // 2^50 - 1
    let t14 = sq_n_each(&t13, 50);
    let t15 = mul_each(&t14, &t13); // 2^100 - 1
    let t16 = sq_n_each(&t15, 100);
    let t17 = mul_each(&t16, &t15); // 2^200 - 1
    let t18 = sq_n_each(&t17, 50);
    (mul_each(&t18, &t13), t3) // 2^250 - 1
}

/// `x^((p - 5) / 8) = x^(2^252 - 3)` for each `x`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn pow_p58<const N: usize>(x: &[Fe; N]) -> [Fe; N] {
    let (t19, _) = pow22501(x);
    mul_each(x, &sq_n_each(&t19, 2))
}

/// `1/x = x^(p - 2) = x^(2^255 - 21)` (and 0 for 0).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn invert(x: &Fe) -> Fe {
    let (t19, t3) = pow22501(&[*x]);
    let [r] = mul_each(&sq_n_each(&t19, 5), &t3);
    r
}

/// `SQRT_RATIO_M1(u, v)` of RFC 9496 section 4.2 for each pair: the lanes
/// where `u/v` is a square, and `|sqrt(u/v)|` there (`|sqrt(i u/v)|`
/// elsewhere).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn sqrt_ratio_m1<const N: usize>(u: &[Fe; N], v: &[Fe; N]) -> [(__mmask8, Fe); N] {
    let sqrt_m1 = constant(SQRT_M1);
    let mut uv3 = *u;
    let mut uv7 = *u;
    for ((uv3, uv7), v) in uv3.iter_mut().zip(uv7.iter_mut()).zip(v) {
        let v3 = mul(&sq(v), v);
        let v7 = mul(&sq(&v3), v);
        *uv3 = mul(uv3, &v3);
        *uv7 = mul(uv7, &v7);
    }
    let r = mul_each(&uv3, &pow_p58(&uv7));
    let mut out = [(0, zero()); N];
    for (((out, r), u), v) in out.iter_mut().zip(&r).zip(u).zip(v) {
        let check = mul(v, &sq(r));
        let u_neg = neg(u);
        let correct = eq(&check, u);
        let flipped = eq(&check, &u_neg);
        let flipped_i = eq(&check, &mul(&u_neg, &sqrt_m1));
        let r_prime = mul(&sqrt_m1, r);
        let r = select(flipped | flipped_i, r, &r_prime);
        *out = (correct | flipped, abs(&r));
    }
    out
}

/// Eight points in extended coordinates `(X : Y : Z : T)`, `XY = ZT`.
#[derive(Clone, Copy)]
struct Point {
    x: Fe,
    y: Fe,
    z: Fe,
    t: Fe,
}

/// Eight points as the addition reads them: `(Y + X, Y - X, 2Z, 2dT)`.
#[derive(Clone, Copy)]
struct Cached {
    y_plus_x: Fe,
    y_minus_x: Fe,
    z2: Fe,
    t2d: Fe,
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn identity() -> Point {
    Point {
        x: zero(),
        y: one(),
        z: one(),
        t: zero(),
    }
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn cached_identity() -> Cached {
    Cached {
        y_plus_x: one(),
        y_minus_x: one(),
        z2: constant([2, 0, 0, 0, 0]),
        t2d: zero(),
    }
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn to_cached(p: &Point) -> Cached {
    Cached {
        y_plus_x: add(&p.y, &p.x),
        y_minus_x: sub(&p.y, &p.x),
        z2: add(&p.z, &p.z),
        t2d: mul(&p.t, &constant(D2)),
    }
}

/// `p + q` (add-2008-hwcd-3 for `a = -1`, complete on this curve).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn add_cached(p: &Point, q: &Cached) -> Point {
    let mut r = *p;
    add_assign_cached(&mut r, q);
    r
}

/// `p += q`, as [`add_cached`], in place.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn add_assign_cached(p: &mut Point, q: &Cached) {
    // The four products feed only sums: carried there.
    let a = mul_wide(&sub(&p.y, &p.x), &q.y_minus_x);
    let b = mul_wide(&add(&p.y, &p.x), &q.y_plus_x);
    let c = mul_wide(&p.t, &q.t2d);
    let d = mul_wide(&p.z, &q.z2);
    let e = sub_wide(&b, &a);
    let f = sub_wide(&d, &c);
    let g = add_wide(&d, &c);
    let h = add_wide(&b, &a);
    p.x = mul(&e, &f);
    p.y = mul(&g, &h);
    p.z = mul(&f, &g);
    p.t = mul(&e, &h);
}

/// `p = 2p` (dbl-2008-hwcd for `a = -1`); `T` only when asked for (the
/// next operation is an addition), else left as it was.
///
/// With `S = A + B` and `F' = 2 Z^2 - G` the formulas' `(EF, GH, FG, EH)`
/// (`H = -S`, `F = -F'`) is `-(EF', GS, F'G, ES)`: the same projective
/// point, computed without the negations.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn double_in_place(p: &mut Point, with_t: bool) {
    // The four squares feed only sums: carried there.
    let a = sq_wide(&p.x);
    let b = sq_wide(&p.y);
    let zz = sq_wide(&p.z);
    let s = add_wide(&a, &b);
    let e = sub_wide(&sq_wide(&add(&p.x, &p.y)), &Wide::from(s));
    let g = sub_wide(&b, &a);
    let f = sub2_wide(&zz, &g);
    p.x = mul(&e, &f);
    p.y = mul(&g, &s);
    p.z = mul(&f, &g);
    if with_t {
        p.t = mul(&e, &s);
    }
}

/// `k p` by a fixed window of signed radix-16 digits: the same digits
/// (the same instructions) in every lane, table entries chosen by
/// constant-time blends.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn scalar_mul(p: &Point, k: &Digits) -> Point {
    // table[j] = (j + 1) p
    let first = to_cached(p);
    let mut table = [first; 8];
    let mut multiple = *p;
    for entry in table.iter_mut().skip(1) {
        multiple = add_cached(&multiple, &first);
        *entry = to_cached(&multiple);
    }
    let mut q = identity();
    for i in (0..64).rev() {
        if i != 63 {
            double_in_place(&mut q, false);
            double_in_place(&mut q, false);
            double_in_place(&mut q, false);
            double_in_place(&mut q, true);
        }
        let digit = k.0[i];
        // |digit| and its sign, without branches.
        let sign = ((digit as u8) >> 7) & 1;
        let magnitude = ((digit ^ -(sign as i8)) + (sign as i8)) as u8;
        // The masks first (all through subtle's optimisation barrier), so
        // that no call to it falls among the blends and spills them.
        let mut masks: [__mmask8; 8] = [0; 8];
        for (j, m) in masks.iter_mut().enumerate() {
            *m = 0u8.wrapping_sub(magnitude.ct_eq(&(j as u8 + 1)).unwrap_u8());
        }
        let negative: __mmask8 = 0u8.wrapping_sub(subtle::Choice::from(sign).unwrap_u8());
        let mut chosen = cached_identity();
        for (entry, &m) in table.iter().zip(&masks) {
            select_assign(&mut chosen.y_plus_x, m, &entry.y_plus_x);
            select_assign(&mut chosen.y_minus_x, m, &entry.y_minus_x);
            select_assign(&mut chosen.z2, m, &entry.z2);
            select_assign(&mut chosen.t2d, m, &entry.t2d);
        }
        // -(X, Y, Z, T) = (-X, Y, Z, -T): swap Y+X and Y-X, negate 2dT.
        let m = negative;
        let plus = chosen.y_plus_x;
        select_assign(&mut chosen.y_plus_x, m, &chosen.y_minus_x);
        select_assign(&mut chosen.y_minus_x, m, &plus);
        let negated = neg(&chosen.t2d);
        select_assign(&mut chosen.t2d, m, &negated);
        add_assign_cached(&mut q, &chosen);
    }
    q
}

/// RFC 9496 section 4.3.1 on vectors of eight field elements `s` that
/// passed the byte checks (canonical, non-negative): the points, and the
/// lanes where `s` is a valid encoding.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn decode<const N: usize>(s: &[Fe; N]) -> [(__mmask8, Point); N] {
    let one = one();
    let mut u1 = *s;
    let mut u2 = *s;
    let mut v = *s;
    let mut v_u2_sq = *s;
    for i in 0..N {
        let ss = sq(&s[i]);
        u1[i] = sub(&one, &ss);
        u2[i] = add(&one, &ss);
        let u2_sq = sq(&u2[i]);
        v[i] = sub(&neg(&mul(&constant(D), &sq(&u1[i]))), &u2_sq);
        v_u2_sq[i] = mul(&v[i], &u2_sq);
    }
    let roots = sqrt_ratio_m1(&[one; N], &v_u2_sq);
    let mut out = [(0, identity()); N];
    for (i, (out, (was_square, invsqrt))) in out.iter_mut().zip(roots).enumerate() {
        let den_x = mul(&invsqrt, &u2[i]);
        let den_y = mul(&mul(&invsqrt, &den_x), &v[i]);
        let x = abs(&mul(&add(&s[i], &s[i]), &den_x));
        let y = mul(&u1[i], &den_y);
        let t = mul(&x, &y);
        let valid = was_square & !is_negative(&t) & !is_zero(&y);
        *out = (valid, Point { x, y, z: one, t });
    }
    out
}

/// `Q = 2P` for eight points, and what encoding `Q` needs inverted.
///
/// With dbl-2008-hwcd's `E = 2XY`, `F`, `G = Y^2 - X^2`, `H` of `P`, the
/// encoding's `u1 = Z_Q^2 - Y_Q^2` is `(a - d) (EG)^2` (from the curve
/// equation of `P`) and `u2 = X_Q Y_Q = EFGH`, so the inverse square root
/// of `u1 u2^2` that RFC 9496 section 4.3.2 computes is, up to its sign,
/// `INVSQRT_A_MINUS_D / (E^2 F G^2 H)`: one inversion, which many points
/// share (Montgomery's trick, [`encode_batch`]). The sign does not matter:
/// the encoding uses the root only through `den1 den2` and, last, `|s|`.
/// (The idea is the batched double-and-encode of the ristretto255 design.)
#[derive(Clone, Copy)]
struct Doubled {
    q: Point,
    /// `E^2 F G^2 H`.
    den: Fe,
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn double_for_encoding(p: &Point) -> Doubled {
    // As `double`: F = -f, H = -s, and (Ef, Gs, fG, Es) = -(EF, GH, FG, EH).
    // The four squares feed only sums: carried there.
    let a = sq_wide(&p.x);
    let b = sq_wide(&p.y);
    let zz = sq_wide(&p.z);
    let s = add_wide(&a, &b);
    let e = sub_wide(&sq_wide(&add(&p.x, &p.y)), &Wide::from(s));
    let g = sub_wide(&b, &a);
    let f = sub2_wide(&zz, &g);
    let eg = mul(&e, &g);
    Doubled {
        q: Point {
            x: mul(&e, &f),
            y: mul(&g, &s),
            z: mul(&f, &g),
            t: mul(&e, &s),
        },
        // E^2 F G^2 H = (EG)^2 (-f) (-s).
        den: mul(&sq(&eg), &mul(&f, &s)),
    }
}

/// RFC 9496 section 4.3.2 for eight points `Q`, given `invsqrt`, a square
/// root of `1 / (u1 u2^2)` of either sign (0 where that is 0).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn encode_with(p: &Point, invsqrt: &Fe) -> [[u8; POINT_LEN]; LANES] {
    let sqrt_m1 = constant(SQRT_M1);
    let u1 = mul(&add(&p.z, &p.y), &sub(&p.z, &p.y));
    let u2 = mul(&p.x, &p.y);
    let den1 = mul(invsqrt, &u1);
    let den2 = mul(invsqrt, &u2);
    let z_inv = mul(&mul(&den1, &den2), &p.t);
    let ix = mul(&p.x, &sqrt_m1);
    let iy = mul(&p.y, &sqrt_m1);
    let enchanted = mul(&den1, &constant(INVSQRT_A_MINUS_D));
    let rotate = is_negative(&mul(&p.t, &z_inv));
    let x = select(rotate, &p.x, &iy);
    let y = select(rotate, &p.y, &ix);
    let den_inv = select(rotate, &den2, &enchanted);
    let y = cneg(&y, is_negative(&mul(&x, &z_inv)));
    let s = abs(&mul(&den_inv, &sub(&p.z, &y)));
    fe_to_bytes(&s)
}

/// The encodings of the doubled points, with one inversion for all of
/// them. A lane whose `den` is 0 (the doubled point is the identity) is
/// inverted as 1 in the product and gets 0, so it changes no other lane.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn encode_batch(doubled: &[Doubled], out: &mut Vec<[u8; POINT_LEN]>, lens: &[usize]) {
    let one = one();
    let zero = zero();
    let mut zeros = Vec::with_capacity(doubled.len());
    let mut prefix = Vec::with_capacity(doubled.len());
    let mut acc = one;
    for d in doubled {
        let z = is_zero(&d.den);
        zeros.push(z);
        acc = mul(&acc, &select(z, &d.den, &one));
        prefix.push(acc);
    }
    let mut inv = invert(&acc);
    let mut inverses = vec![zero; doubled.len()];
    for i in (0..doubled.len()).rev() {
        let before = if i == 0 { one } else { prefix[i - 1] };
        inverses[i] = select(zeros[i], &mul(&inv, &before), &zero);
        inv = mul(&inv, &select(zeros[i], &doubled[i].den, &one));
    }
    let c = constant(INVSQRT_A_MINUS_D);
    for ((d, i), len) in doubled.iter().zip(&inverses).zip(lens) {
        let encoded = encode_with(&d.q, &mul(&c, i));
        out.extend_from_slice(&encoded[..*len]);
    }
}

/// RFC 9496 section 4.3.4's MAP (Elligator) on vectors of eight field
/// elements.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn elligator<const N: usize>(t: &[Fe; N]) -> [Point; N] {
    let one = one();
    let minus_one = neg(&one);
    let d = constant(D);
    let mut r = *t;
    let mut u = *t;
    let mut v = *t;
    for i in 0..N {
        r[i] = mul(&constant(SQRT_M1), &sq(&t[i]));
        u[i] = mul(&add(&r[i], &one), &constant(ONE_MINUS_D_SQ));
        v[i] = mul(&sub(&minus_one, &mul(&r[i], &d)), &add(&r[i], &d));
    }
    let roots = sqrt_ratio_m1(&u, &v);
    let mut out = [identity(); N];
    for (i, (out, (was_square, s))) in out.iter_mut().zip(roots).enumerate() {
        let s_prime = neg(&abs(&mul(&s, &t[i])));
        let s = select(was_square, &s_prime, &s);
        let c = select(was_square, &r[i], &minus_one);
        let n = sub(&mul(&mul(&c, &sub(&r[i], &one)), &constant(D_MINUS_ONE_SQ)), &v[i]);
        let w0 = mul(&add(&s, &s), &v[i]);
        let w1 = mul(&n, &constant(SQRT_AD_MINUS_ONE));
        let s_sq = sq(&s);
        let w2 = sub(&one, &s_sq);
        let w3 = add(&one, &s_sq);
        *out = Point {
            x: mul(&w0, &w3),
            y: mul(&w2, &w1),
            z: mul(&w1, &w3),
            t: mul(&w0, &w2),
        };
    }
    out
}

/// Runs a job, eight inputs at a time (the last batch filled up with
/// inputs whose results are dropped), encoding up to [`ENCODE_BATCH`]
/// vectors with one inversion. `k` holds `k/2`: each point is multiplied by
/// it, then doubled for the encoding.
///
/// Callable only on a CPU with AVX-512F, AVX-512DQ and AVX-512 IFMA
/// (`lib.rs` checks).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
pub(crate) fn run(job: Job<'_>, k: Option<&Digits>, out: &mut Vec<[u8; POINT_LEN]>) -> Result<(), Refused> {
    // `None`: the parts without the multiplication by `k/2` (the doubling
    // of the encoding stays), for the per-operation benchmarks.

    let mut doubled = Vec::with_capacity(ENCODE_BATCH);
    let mut lens = Vec::with_capacity(ENCODE_BATCH);
    match job {
        Job::Expand { dst, msgs, out } => {
            crate::sha512::expand64(dst, msgs, out);
            Ok(())
        }
        #[cfg(test)]
        Job::FieldCheck(failed) => {
            field_check(failed);
            Ok(())
        }
        Job::Hash(uniform) => {
            let filler = [0u8; 64];
            for group in uniform.chunks(LANES * ENCODE_BATCH) {
                doubled.clear();
                lens.clear();
                for chunk in group.chunks(LANES) {
                    let mut first: [&[u8]; LANES] = [&filler[..32]; LANES];
                    let mut second: [&[u8]; LANES] = [&filler[32..]; LANES];
                    for (lane, u) in chunk.iter().enumerate() {
                        first[lane] = &u[..32];
                        second[lane] = &u[32..];
                    }
                    // The two maps side by side: their square roots interleave.
                    let [p1, p2] = elligator(&[fe_from_bytes(&first), fe_from_bytes(&second)]);
                    let p = add_cached(&p1, &to_cached(&p2));
                    let p = match k {
                        Some(k) => scalar_mul(&p, k),
                        None => p,
                    };
                    doubled.push(double_for_encoding(&p));
                    lens.push(chunk.len());
                }
                encode_batch(&doubled, out, &lens);
            }
            Ok(())
        }
        Job::Decode(points) => {
            for (g, group) in points.chunks(LANES * ENCODE_BATCH).enumerate() {
                doubled.clear();
                lens.clear();
                // Two vectors at a time, their square roots interleaved; the
                // second of a last, odd one is all filler and dropped.
                for (pair, chunks) in group.chunks(2 * LANES).enumerate() {
                    let (first, second) = chunks.split_at(chunks.len().min(LANES));
                    let mut bytes: [[&[u8]; LANES]; 2] = [[&FILLER[..]; LANES]; 2];
                    let mut refused: [[Option<PointError>; LANES]; 2] = [[None; LANES]; 2];
                    for (v, chunk) in [first, second].into_iter().enumerate() {
                        for (lane, b) in chunk.iter().enumerate() {
                            refused[v][lane] = check_encoding(b).err();
                            bytes[v][lane] = &b[..];
                        }
                    }
                    let decoded = decode(&[fe_from_bytes(&bytes[0]), fe_from_bytes(&bytes[1])]);
                    for (v, chunk) in [first, second].into_iter().enumerate() {
                        if chunk.is_empty() {
                            continue;
                        }
                        let (valid, p) = decoded[v];
                        for (lane, r) in refused[v].iter().enumerate().take(chunk.len()) {
                            let error = match r {
                                Some(e) => Some(*e),
                                None if valid & (1 << lane) == 0 => Some(PointError::Invalid),
                                None => None,
                            };
                            if let Some(error) = error {
                                return Err(Refused {
                                    index: (g * ENCODE_BATCH + 2 * pair + v) * LANES + lane,
                                    error,
                                });
                            }
                        }
                        let p = match k {
                            Some(k) => scalar_mul(&p, k),
                            None => p,
                        };
                        doubled.push(double_for_encoding(&p));
                        lens.push(chunk.len());
                    }
                }
                encode_batch(&doubled, out, &lens);
            }
            Ok(())
        }
    }
}

/// Whether every lane of `a` is normalized: limbs below `2^52`, the top
/// one below `2^48`.
#[cfg(test)]
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn normalized(a: &Fe) -> bool {
    let mut ok = true;
    for (k, v) in a.0.iter().enumerate() {
        let bound: u64 = if k == 4 { 1 << 48 } else { 1 << 52 };
        for l in lanes(*v) {
            ok &= l < bound;
        }
    }
    ok
}

/// Whether `a` and `b` are the same field elements in every lane.
#[cfg(test)]
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn same(a: &Fe, b: &Fe) -> bool {
    fe_to_bytes(a) == fe_to_bytes(b)
}

/// The field arithmetic where its limb bounds are tightest: the largest
/// normalized limbs (`2^52 - 1`, top `2^48 - 1`: `2^256 - 1 = 37 mod p`)
/// give results known independently (37, 37^2 = 1369, `p - 37`, ...);
/// random limbs near those bounds give the same elements as their
/// canonical limbs do, through every operation and through products left
/// uncarried ([`Wide`]) as well as carried ones. A limb past a bound would
/// be read modulo `2^52` by the multipliers and change a result.
#[cfg(test)]
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn field_check(failed: &mut Vec<&'static str>) {
    const TOP: u64 = (1 << 48) - 1;
    let small = |v: u64| [v, 0, 0, 0, 0];
    let max = constant([M52, M52, M52, M52, TOP]);
    let mut p_minus_37 = [0xffu8; POINT_LEN];
    p_minus_37[0] = 0xc8;
    p_minus_37[31] = 0x7f;
    let checks: [(&'static str, bool); 10] = [
        ("max is 37", same(&max, &constant(small(37)))),
        ("max * max", same(&mul(&max, &max), &constant(small(1369)))),
        ("max^2", same(&sq(&max), &constant(small(1369)))),
        ("max + max", same(&add(&max, &max), &constant(small(74)))),
        ("0 - max", fe_to_bytes(&neg(&max)) == [p_minus_37; LANES]),
        (
            "2 max - 0",
            same(&sub2_wide(&Wide::from(max), &zero()), &constant(small(74))),
        ),
        (
            "wide max^2 + max * max",
            same(&add_wide(&sq_wide(&max), &mul_wide(&max, &max)), &constant(small(2738))),
        ),
        (
            "wide max^2 - max * max",
            same(&sub_wide(&sq_wide(&max), &mul_wide(&max, &max)), &zero()),
        ),
        (
            "2 wide max^2 - 1",
            same(&sub2_wide(&sq_wide(&max), &one()), &constant(small(2737))),
        ),
        ("canonical(max)", same(&Fe(canonical(&max)), &constant(small(37)))),
    ];
    for (name, ok) in checks {
        if !ok {
            failed.push(name);
        }
    }
    let results = [
        mul(&max, &max),
        sq(&max),
        add(&max, &max),
        neg(&max),
        add_wide(&sq_wide(&max), &mul_wide(&max, &max)),
        sub2_wide(&sq_wide(&max), &max),
    ];
    for r in &results {
        if !normalized(r) && !failed.contains(&"normalized results") {
            failed.push("normalized results");
        }
    }
    // Random limbs: near the bounds in `a`, anywhere in `b`.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..200 {
        let mut a = [[0u64; LANES]; 5];
        let mut b = [[0u64; LANES]; 5];
        for k in 0..5 {
            let bound = if k == 4 { TOP } else { M52 };
            for lane in 0..LANES {
                // Every fourth round all lanes at the bound exactly.
                a[k][lane] = if round % 4 == 0 { bound } else { bound - (next() >> 44) };
                b[k][lane] = next() & bound;
            }
        }
        let a = Fe([
            from_lanes(&a[0]),
            from_lanes(&a[1]),
            from_lanes(&a[2]),
            from_lanes(&a[3]),
            from_lanes(&a[4]),
        ]);
        let b = Fe([
            from_lanes(&b[0]),
            from_lanes(&b[1]),
            from_lanes(&b[2]),
            from_lanes(&b[3]),
            from_lanes(&b[4]),
        ]);
        let (ca, cb) = (Fe(canonical(&a)), Fe(canonical(&b)));
        // Every result is normalized, so that it can be multiplied again.
        let results = [
            mul(&a, &b),
            sq(&a),
            add(&a, &b),
            sub(&a, &b),
            sub2_wide(&Wide::from(a), &b),
            add_wide(&sq_wide(&a), &mul_wide(&a, &b)),
            sub_wide(&mul_wide(&a, &b), &sq_wide(&a)),
            sub2_wide(&sq_wide(&a), &b),
            neg(&a),
        ];
        for r in &results {
            if !normalized(r) && !failed.contains(&"normalized results") {
                failed.push("normalized results");
            }
        }
        let checks: [(&'static str, bool); 9] = [
            ("a * b", same(&mul(&a, &b), &mul(&ca, &cb))),
            ("a^2", same(&sq(&a), &mul(&ca, &ca))),
            ("a + b", same(&add(&a, &b), &add(&ca, &cb))),
            ("a - b", same(&sub(&a, &b), &sub(&ca, &cb))),
            ("b - a", same(&sub(&b, &a), &sub(&cb, &ca))),
            (
                "2a - b",
                same(&sub2_wide(&Wide::from(a), &b), &sub(&add(&ca, &ca), &cb)),
            ),
            (
                "wide a^2 + a * b",
                same(
                    &add_wide(&sq_wide(&a), &mul_wide(&a, &b)),
                    &add(&sq(&ca), &mul(&ca, &cb)),
                ),
            ),
            (
                "wide a * b - a^2",
                same(
                    &sub_wide(&mul_wide(&a, &b), &sq_wide(&a)),
                    &sub(&mul(&ca, &cb), &sq(&ca)),
                ),
            ),
            (
                "2 wide a^2 - b",
                same(&sub2_wide(&sq_wide(&a), &b), &sub(&add(&sq(&ca), &sq(&ca)), &cb)),
            ),
        ];
        for (name, ok) in checks {
            if !ok && !failed.contains(&name) {
                failed.push(name);
            }
        }
    }
}
