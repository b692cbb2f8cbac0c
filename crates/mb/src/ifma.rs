//! The AVX-512 IFMA code: eight field elements per [`Fe`], one per 64-bit
//! lane, each as five radix-2^51 limbs (one 512-bit vector per limb).
//!
//! Every function here is compiled with `avx512f,avx512ifma,avx512dq`
//! enabled and contains no `unsafe`: the intrinsics are safe to call inside
//! such functions. Only [`run`] is called from outside, after the features were
//! detected (`lib.rs`).
//!
//! Limb bounds. Every operation returns limbs below `2^51 + 2^8`, so any
//! output is a valid input to [`mul`] and [`sq`], whose 52-bit multipliers
//! (`vpmadd52luq`/`vpmadd52huq`) need limbs below `2^52`:
//! - [`mul`]/[`sq`] carry fully: limbs at most `2^51`;
//! - [`add`]/[`sub`] carry once, in parallel: limbs below `2^51 + 2^8`
//!   (for `sub`, `a + 4p - b` with `4p`'s limbs above every `b`'s).

#![allow(clippy::many_single_char_names)]

use core::arch::x86_64::{
    __m512i, __mmask8, _mm256_extract_epi64, _mm512_add_epi64, _mm512_and_si512, _mm512_castsi512_si256,
    _mm512_cmpeq_epi64_mask, _mm512_extracti64x4_epi64, _mm512_madd52hi_epu64, _mm512_madd52lo_epu64,
    _mm512_mask_blend_epi64, _mm512_or_si512, _mm512_set_epi64, _mm512_set1_epi64, _mm512_setzero_si512,
    _mm512_slli_epi64, _mm512_srli_epi64, _mm512_sub_epi64, _mm512_test_epi64_mask,
};

use subtle::ConstantTimeEq;

use crate::{Digits, Job, LANES, POINT_LEN, PointError, Refused, bytes_from_limbs, check_encoding, limbs_from_bytes};

const M51: u64 = (1 << 51) - 1;

/// `4p` in unreduced radix-2^51 limbs (`4 (2^51 - 19)`, `4 (2^51 - 1)`, ...).
const FOUR_P: [u64; 5] = [
    4 * ((1 << 51) - 19),
    4 * ((1 << 51) - 1),
    4 * ((1 << 51) - 1),
    4 * ((1 << 51) - 1),
    4 * ((1 << 51) - 1),
];

// The curve's constants (RFC 9496 section 4.1, and `d`, `2d` of
// edwards25519), radix-2^51 limbs. Checked by the tests against
// curve25519-dalek's results, and derivable with any big-integer tool.
/// `d = -121665/121666`.
const D: [u64; 5] = [
    929_955_233_495_203,
    466_365_720_129_213,
    1_662_059_464_998_953,
    2_033_849_074_728_123,
    1_442_794_654_840_575,
];
/// `2d`.
const D2: [u64; 5] = [
    1_859_910_466_990_425,
    932_731_440_258_426,
    1_072_319_116_312_658,
    1_815_898_335_770_999,
    633_789_495_995_903,
];
/// `SQRT_M1`, a square root of -1.
const SQRT_M1: [u64; 5] = [
    1_718_705_420_411_056,
    234_908_883_556_509,
    2_233_514_472_574_048,
    2_117_202_627_021_982,
    765_476_049_583_133,
];
/// `INVSQRT_A_MINUS_D = 1/sqrt(a - d)`.
const INVSQRT_A_MINUS_D: [u64; 5] = [
    278_908_739_862_762,
    821_645_201_101_625,
    8_113_234_426_968,
    1_777_959_178_193_151,
    2_118_520_810_568_447,
];
/// `SQRT_AD_MINUS_ONE = sqrt(a*d - 1)`.
const SQRT_AD_MINUS_ONE: [u64; 5] = [
    2_241_493_124_984_347,
    425_987_919_032_274,
    2_207_028_919_301_688,
    1_220_490_630_685_848,
    974_799_131_293_748,
];
/// `ONE_MINUS_D_SQ = 1 - d^2`.
const ONE_MINUS_D_SQ: [u64; 5] = [
    1_136_626_929_484_150,
    1_998_550_399_581_263,
    496_427_632_559_748,
    118_527_312_129_759,
    45_110_755_273_534,
];
/// `D_MINUS_ONE_SQ = (d - 1)^2`.
const D_MINUS_ONE_SQ: [u64; 5] = [
    1_507_062_230_895_904,
    1_572_317_787_530_805,
    683_053_064_812_840,
    317_374_165_784_489,
    1_572_899_562_415_810,
];

/// The encoding of the ristretto255 generator (RFC 9496 A.1): what the
/// unused lanes of a last, partial batch of peer points decode.
const FILLER: [u8; POINT_LEN] = [
    0xe2, 0xf2, 0xae, 0x0a, 0x6a, 0xbc, 0x4e, 0x71, 0xa8, 0x84, 0xa9, 0x61, 0xc5, 0x00, 0x51, 0x5f, 0x58, 0xe3, 0x0b,
    0x6a, 0xa5, 0x82, 0xdd, 0x8d, 0xb6, 0xa6, 0x59, 0x45, 0xe0, 0x8d, 0x2d, 0x76,
];

/// How many vectors of eight points share one inversion when encoded.
const ENCODE_BATCH: usize = 64;

/// Eight field elements.
#[derive(Clone, Copy)]
struct Fe([__m512i; 5]);

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

/// `19 x` (shifts and adds, which LLVM turns into one `vpmullq` with
/// AVX-512DQ).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn mul19(x: __m512i) -> __m512i {
    _mm512_add_epi64(
        _mm512_add_epi64(x, _mm512_slli_epi64::<1>(x)),
        _mm512_slli_epi64::<4>(x),
    )
}

/// One parallel carry: limbs below `2^51 + 19 * (x >> 51)`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn weak(x: [__m512i; 5]) -> Fe {
    let m = splat(M51);
    let c0 = _mm512_srli_epi64::<51>(x[0]);
    let c1 = _mm512_srli_epi64::<51>(x[1]);
    let c2 = _mm512_srli_epi64::<51>(x[2]);
    let c3 = _mm512_srli_epi64::<51>(x[3]);
    let c4 = _mm512_srli_epi64::<51>(x[4]);
    Fe([
        _mm512_add_epi64(_mm512_and_si512(x[0], m), mul19(c4)),
        _mm512_add_epi64(_mm512_and_si512(x[1], m), c0),
        _mm512_add_epi64(_mm512_and_si512(x[2], m), c1),
        _mm512_add_epi64(_mm512_and_si512(x[3], m), c2),
        _mm512_add_epi64(_mm512_and_si512(x[4], m), c3),
    ])
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn add(a: &Fe, b: &Fe) -> Fe {
    weak([
        _mm512_add_epi64(a.0[0], b.0[0]),
        _mm512_add_epi64(a.0[1], b.0[1]),
        _mm512_add_epi64(a.0[2], b.0[2]),
        _mm512_add_epi64(a.0[3], b.0[3]),
        _mm512_add_epi64(a.0[4], b.0[4]),
    ])
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn sub(a: &Fe, b: &Fe) -> Fe {
    let mut x = [_mm512_setzero_si512(); 5];
    for (i, x) in x.iter_mut().enumerate() {
        *x = _mm512_sub_epi64(_mm512_add_epi64(a.0[i], splat(FOUR_P[i])), b.0[i]);
    }
    weak(x)
}

/// `2a - b`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn sub2(a: &Fe, b: &Fe) -> Fe {
    let mut x = [_mm512_setzero_si512(); 5];
    for (i, x) in x.iter_mut().enumerate() {
        // Below 2 (2^51 + 2^8) + 2^53 < 2^54: carries below 2^3.
        let twice = _mm512_add_epi64(a.0[i], a.0[i]);
        *x = _mm512_sub_epi64(_mm512_add_epi64(twice, splat(FOUR_P[i])), b.0[i]);
    }
    weak(x)
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn neg(a: &Fe) -> Fe {
    sub(&zero(), a)
}

/// Reduces the ten column sums `z` of a product (`z_k` below `2^57`) to
/// five limbs of at most `2^51`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn reduce_columns(z: &[__m512i; 10]) -> Fe {
    let mut r = [_mm512_setzero_si512(); 5];
    for (k, r) in r.iter_mut().enumerate() {
        // Below 2^57 + 19 * 2^57 < 2^62.
        *r = _mm512_add_epi64(z[k], mul19(z[k + 5]));
    }
    carry(&mut r);
    Fe(r)
}

/// One carry through the five limbs (each below 2^63), the top carry
/// times 19 into the bottom, and the bottom's carry once more: limbs below
/// `2^51`, except `x[1]`, at most `2^51`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn carry(x: &mut [__m512i; 5]) {
    let m = splat(M51);
    for k in 0..4 {
        let c = _mm512_srli_epi64::<51>(x[k]);
        x[k] = _mm512_and_si512(x[k], m);
        x[k + 1] = _mm512_add_epi64(x[k + 1], c);
    }
    let c = _mm512_srli_epi64::<51>(x[4]);
    x[4] = _mm512_and_si512(x[4], m);
    x[0] = _mm512_add_epi64(x[0], mul19(c));
    let c = _mm512_srli_epi64::<51>(x[0]);
    x[0] = _mm512_and_si512(x[0], m);
    x[1] = _mm512_add_epi64(x[1], c);
}

/// `a * b`. A limb product `a_i b_j` (both below `2^52`) is `lo + 2^52 hi`;
/// at radix 2^51 its high half weighs `2 * 2^(51 (i + j + 1))`, so column
/// `k` is `sum lo(i + j = k) + 2 sum hi(i + j + 1 = k)`, below `2^57`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn mul(a: &Fe, b: &Fe) -> Fe {
    let zero = _mm512_setzero_si512();
    let mut lo = [zero; 10];
    let mut hi = [zero; 10];
    for i in 0..5 {
        for j in 0..5 {
            lo[i + j] = _mm512_madd52lo_epu64(lo[i + j], a.0[i], b.0[j]);
            hi[i + j + 1] = _mm512_madd52hi_epu64(hi[i + j + 1], a.0[i], b.0[j]);
        }
    }
    let mut z = [zero; 10];
    for k in 0..10 {
        z[k] = _mm512_add_epi64(lo[k], _mm512_slli_epi64::<1>(hi[k]));
    }
    reduce_columns(&z)
}

/// `a^2`: the ten cross products once, doubled in the sum. Column `k` is
/// `lo_d + 2 (lo_x + hi_d + 2 hi_x)`, below `2^57` as in [`mul`].
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn sq(a: &Fe) -> Fe {
    let zero = _mm512_setzero_si512();
    let mut lo_d = [zero; 10];
    let mut rest = [zero; 10];
    let mut hi_x = [zero; 10];
    for i in 0..5 {
        lo_d[2 * i] = _mm512_madd52lo_epu64(lo_d[2 * i], a.0[i], a.0[i]);
        rest[2 * i + 1] = _mm512_madd52hi_epu64(rest[2 * i + 1], a.0[i], a.0[i]);
        for j in (i + 1)..5 {
            rest[i + j] = _mm512_madd52lo_epu64(rest[i + j], a.0[i], a.0[j]);
            hi_x[i + j + 1] = _mm512_madd52hi_epu64(hi_x[i + j + 1], a.0[i], a.0[j]);
        }
    }
    let mut z = [zero; 10];
    for k in 0..10 {
        let inner = _mm512_add_epi64(rest[k], _mm512_slli_epi64::<1>(hi_x[k]));
        z[k] = _mm512_add_epi64(lo_d[k], _mm512_slli_epi64::<1>(inner));
    }
    reduce_columns(&z)
}

/// `a^(2^n)`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn sq_n(a: &Fe, n: u32) -> Fe {
    let mut x = sq(a);
    for _ in 1..n {
        x = sq(&x);
    }
    x
}

/// The limbs of the canonical representative (below `p`, limbs below
/// `2^51`).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn canonical(a: &Fe) -> [__m512i; 5] {
    let m = splat(M51);
    let mut x = a.0;
    // Carry fully: limbs below 2^51 but x[1] at most 2^51; value below 2p.
    carry(&mut x);
    // q = floor((x + 19) / 2^255): 1 exactly when x >= p.
    let mut q = _mm512_srli_epi64::<51>(_mm512_add_epi64(x[0], splat(19)));
    for limb in &x[1..] {
        q = _mm512_srli_epi64::<51>(_mm512_add_epi64(*limb, q));
    }
    // x - q p = x + 19 q - q 2^255.
    x[0] = _mm512_add_epi64(x[0], mul19(q));
    for k in 0..4 {
        let c = _mm512_srli_epi64::<51>(x[k]);
        x[k] = _mm512_and_si512(x[k], m);
        x[k + 1] = _mm512_add_epi64(x[k + 1], c);
    }
    x[4] = _mm512_and_si512(x[4], m);
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

/// `(x^(2^250 - 1), x^11)`: the shared start of the two exponentiations.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn pow22501(x: &Fe) -> (Fe, Fe) {
    let t0 = sq(x); // 2
    let t1 = sq_n(&t0, 2); // 8
    let t2 = mul(x, &t1); // 9
    let t3 = mul(&t0, &t2); // 11
    let t4 = sq(&t3); // 22
    let t5 = mul(&t2, &t4); // 2^5 - 1
    let t6 = sq_n(&t5, 5);
    let t7 = mul(&t6, &t5); // 2^10 - 1
    let t8 = sq_n(&t7, 10);
    let t9 = mul(&t8, &t7); // 2^20 - 1
    let t10 = sq_n(&t9, 20);
    let t11 = mul(&t10, &t9); // 2^40 - 1
    let t12 = sq_n(&t11, 10);
    let t13 = mul(&t12, &t7); // 2^50 - 1
    let t14 = sq_n(&t13, 50);
    let t15 = mul(&t14, &t13); // 2^100 - 1
    let t16 = sq_n(&t15, 100);
    let t17 = mul(&t16, &t15); // 2^200 - 1
    let t18 = sq_n(&t17, 50);
    (mul(&t18, &t13), t3) // 2^250 - 1
}

/// `x^((p - 5) / 8) = x^(2^252 - 3)`.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn pow_p58(x: &Fe) -> Fe {
    let (t19, _) = pow22501(x);
    mul(x, &sq_n(&t19, 2))
}

/// `1/x = x^(p - 2) = x^(2^255 - 21)` (and 0 for 0).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn invert(x: &Fe) -> Fe {
    let (t19, t3) = pow22501(x);
    mul(&sq_n(&t19, 5), &t3)
}

/// `SQRT_RATIO_M1(u, v)` of RFC 9496 section 4.2: the lanes where `u/v`
/// is a square, and `|sqrt(u/v)|` there (`|sqrt(i u/v)|` elsewhere).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn sqrt_ratio_m1(u: &Fe, v: &Fe) -> (__mmask8, Fe) {
    let sqrt_m1 = constant(SQRT_M1);
    let v3 = mul(&sq(v), v);
    let v7 = mul(&sq(&v3), v);
    let r = mul(&mul(u, &v3), &pow_p58(&mul(u, &v7)));
    let check = mul(v, &sq(&r));
    let u_neg = neg(u);
    let correct = eq(&check, u);
    let flipped = eq(&check, &u_neg);
    let flipped_i = eq(&check, &mul(&u_neg, &sqrt_m1));
    let r_prime = mul(&sqrt_m1, &r);
    let r = select(flipped | flipped_i, &r, &r_prime);
    (correct | flipped, abs(&r))
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
    let a = mul(&sub(&p.y, &p.x), &q.y_minus_x);
    let b = mul(&add(&p.y, &p.x), &q.y_plus_x);
    let c = mul(&p.t, &q.t2d);
    let d = mul(&p.z, &q.z2);
    let e = sub(&b, &a);
    let f = sub(&d, &c);
    let g = add(&d, &c);
    let h = add(&b, &a);
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
    let a = sq(&p.x);
    let b = sq(&p.y);
    let zz = sq(&p.z);
    let s = add(&a, &b);
    let e = sub(&sq(&add(&p.x, &p.y)), &s);
    let g = sub(&b, &a);
    let f = sub2(&zz, &g);
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

/// RFC 9496 section 4.3.1 on eight field elements `s` that passed the
/// byte checks (canonical, non-negative): the points, and the lanes where
/// `s` is a valid encoding.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn decode(s: &Fe) -> (__mmask8, Point) {
    let one = one();
    let ss = sq(s);
    let u1 = sub(&one, &ss);
    let u2 = add(&one, &ss);
    let u2_sq = sq(&u2);
    let v = sub(&neg(&mul(&constant(D), &sq(&u1))), &u2_sq);
    let (was_square, invsqrt) = sqrt_ratio_m1(&one, &mul(&v, &u2_sq));
    let den_x = mul(&invsqrt, &u2);
    let den_y = mul(&mul(&invsqrt, &den_x), &v);
    let x = abs(&mul(&add(s, s), &den_x));
    let y = mul(&u1, &den_y);
    let t = mul(&x, &y);
    let valid = was_square & !is_negative(&t) & !is_zero(&y);
    (valid, Point { x, y, z: one, t })
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
    let a = sq(&p.x);
    let b = sq(&p.y);
    let zz = sq(&p.z);
    let s = add(&a, &b);
    let e = sub(&sq(&add(&p.x, &p.y)), &s);
    let g = sub(&b, &a);
    let f = sub2(&zz, &g);
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

/// RFC 9496 section 4.3.4's MAP (Elligator) on eight field elements.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn elligator(t: &Fe) -> Point {
    let one = one();
    let minus_one = neg(&one);
    let d = constant(D);
    let r = mul(&constant(SQRT_M1), &sq(t));
    let u = mul(&add(&r, &one), &constant(ONE_MINUS_D_SQ));
    let v = mul(&sub(&minus_one, &mul(&r, &d)), &add(&r, &d));
    let (was_square, s) = sqrt_ratio_m1(&u, &v);
    let s_prime = neg(&abs(&mul(&s, t)));
    let s = select(was_square, &s_prime, &s);
    let c = select(was_square, &r, &minus_one);
    let n = sub(&mul(&mul(&c, &sub(&r, &one)), &constant(D_MINUS_ONE_SQ)), &v);
    let w0 = mul(&add(&s, &s), &v);
    let w1 = mul(&n, &constant(SQRT_AD_MINUS_ONE));
    let s_sq = sq(&s);
    let w2 = sub(&one, &s_sq);
    let w3 = add(&one, &s_sq);
    Point {
        x: mul(&w0, &w3),
        y: mul(&w2, &w1),
        z: mul(&w1, &w3),
        t: mul(&w0, &w2),
    }
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
        Job::Expand { dst, msgs } => {
            // Each 64-byte output as two 32-byte halves (`lib.rs` joins them).
            let mut uniform = Vec::with_capacity(msgs.len());
            crate::sha512::expand64(dst, msgs, &mut uniform);
            for u in &uniform {
                let (lo, hi) = u.split_at(POINT_LEN);
                for half in [lo, hi] {
                    let mut h = [0u8; POINT_LEN];
                    h.copy_from_slice(half);
                    out.push(h);
                }
            }
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
                    let p1 = elligator(&fe_from_bytes(&first));
                    let p2 = elligator(&fe_from_bytes(&second));
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
                for (batch, chunk) in group.chunks(LANES).enumerate() {
                    let mut bytes: [&[u8]; LANES] = [&FILLER[..]; LANES];
                    let mut refused: [Option<PointError>; LANES] = [None; LANES];
                    for (lane, b) in chunk.iter().enumerate() {
                        refused[lane] = check_encoding(b).err();
                        bytes[lane] = &b[..];
                    }
                    let (valid, p) = decode(&fe_from_bytes(&bytes));
                    for (lane, r) in refused.iter().enumerate().take(chunk.len()) {
                        let error = match r {
                            Some(e) => Some(*e),
                            None if valid & (1 << lane) == 0 => Some(PointError::Invalid),
                            None => None,
                        };
                        if let Some(error) = error {
                            return Err(Refused {
                                index: (g * ENCODE_BATCH + batch) * LANES + lane,
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
                encode_batch(&doubled, out, &lens);
            }
            Ok(())
        }
    }
}
