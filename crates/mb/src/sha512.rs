//! SHA-512 for eight messages at once, one per 64-bit lane of a 512-bit
//! vector (AVX-512F), for the hash-to-group's `expand_message_xmd` (RFC
//! 9380 section 5.3.1) with 64 output bytes:
//! `b0 = H(Z_pad || msg || I2OSP(64, 2) || I2OSP(0, 1) || DST')`,
//! `b1 = H(b0 || I2OSP(1, 1) || DST')`, output `b1`, with
//! `DST' = DST || I2OSP(len(DST), 1)` and `Z_pad` 128 zero bytes (one
//! SHA-512 block, compressed once per call and shared by every message).
//!
//! Like `ifma.rs`: compiled with the AVX-512 features enabled, no `unsafe`
//! (the intrinsics are safe inside such functions), called only through
//! `lib.rs`'s one entry after the features were detected. SHA-512 has no
//! branches or table lookups on the message's content; the lanes of a batch
//! run the same instructions, a lane whose message has fewer blocks keeps
//! its state through a blend (so a batch's time follows the length of its
//! longest message, as one message's time follows its length in any
//! SHA-512).

use core::arch::x86_64::{
    __m512i, __mmask8, _mm512_add_epi64, _mm512_mask_blend_epi64, _mm512_ror_epi64, _mm512_set1_epi64,
    _mm512_setzero_si512, _mm512_srli_epi64, _mm512_ternarylogic_epi64,
};

use crate::LANES;
use crate::ifma::{from_lanes, lanes};

/// SHA-512's initial hash value (FIPS 180-4 section 5.3.5).
const IV: [u64; 8] = [
    0x6a09_e667_f3bc_c908,
    0xbb67_ae85_84ca_a73b,
    0x3c6e_f372_fe94_f82b,
    0xa54f_f53a_5f1d_36f1,
    0x510e_527f_ade6_82d1,
    0x9b05_688c_2b3e_6c1f,
    0x1f83_d9ab_fb41_bd6b,
    0x5be0_cd19_137e_2179,
];

/// SHA-512's round constants (FIPS 180-4 section 4.2.3).
const K: [u64; 80] = [
    0x428a_2f98_d728_ae22,
    0x7137_4491_23ef_65cd,
    0xb5c0_fbcf_ec4d_3b2f,
    0xe9b5_dba5_8189_dbbc,
    0x3956_c25b_f348_b538,
    0x59f1_11f1_b605_d019,
    0x923f_82a4_af19_4f9b,
    0xab1c_5ed5_da6d_8118,
    0xd807_aa98_a303_0242,
    0x1283_5b01_4570_6fbe,
    0x2431_85be_4ee4_b28c,
    0x550c_7dc3_d5ff_b4e2,
    0x72be_5d74_f27b_896f,
    0x80de_b1fe_3b16_96b1,
    0x9bdc_06a7_25c7_1235,
    0xc19b_f174_cf69_2694,
    0xe49b_69c1_9ef1_4ad2,
    0xefbe_4786_384f_25e3,
    0x0fc1_9dc6_8b8c_d5b5,
    0x240c_a1cc_77ac_9c65,
    0x2de9_2c6f_592b_0275,
    0x4a74_84aa_6ea6_e483,
    0x5cb0_a9dc_bd41_fbd4,
    0x76f9_88da_8311_53b5,
    0x983e_5152_ee66_dfab,
    0xa831_c66d_2db4_3210,
    0xb003_27c8_98fb_213f,
    0xbf59_7fc7_beef_0ee4,
    0xc6e0_0bf3_3da8_8fc2,
    0xd5a7_9147_930a_a725,
    0x06ca_6351_e003_826f,
    0x1429_2967_0a0e_6e70,
    0x27b7_0a85_46d2_2ffc,
    0x2e1b_2138_5c26_c926,
    0x4d2c_6dfc_5ac4_2aed,
    0x5338_0d13_9d95_b3df,
    0x650a_7354_8baf_63de,
    0x766a_0abb_3c77_b2a8,
    0x81c2_c92e_47ed_aee6,
    0x9272_2c85_1482_353b,
    0xa2bf_e8a1_4cf1_0364,
    0xa81a_664b_bc42_3001,
    0xc24b_8b70_d0f8_9791,
    0xc76c_51a3_0654_be30,
    0xd192_e819_d6ef_5218,
    0xd699_0624_5565_a910,
    0xf40e_3585_5771_202a,
    0x106a_a070_32bb_d1b8,
    0x19a4_c116_b8d2_d0c8,
    0x1e37_6c08_5141_ab53,
    0x2748_774c_df8e_eb99,
    0x34b0_bcb5_e19b_48a8,
    0x391c_0cb3_c5c9_5a63,
    0x4ed8_aa4a_e341_8acb,
    0x5b9c_ca4f_7763_e373,
    0x682e_6ff3_d6b2_b8a3,
    0x748f_82ee_5def_b2fc,
    0x78a5_636f_4317_2f60,
    0x84c8_7814_a1f0_ab72,
    0x8cc7_0208_1a64_39ec,
    0x90be_fffa_2363_1e28,
    0xa450_6ceb_de82_bde9,
    0xbef9_a3f7_b2c6_7915,
    0xc671_78f2_e372_532b,
    0xca27_3ece_ea26_619c,
    0xd186_b8c7_21c0_c207,
    0xeada_7dd6_cde0_eb1e,
    0xf57d_4f7f_ee6e_d178,
    0x06f0_67aa_7217_6fba,
    0x0a63_7dc5_a2c8_98a6,
    0x113f_9804_bef9_0dae,
    0x1b71_0b35_131c_471b,
    0x28db_77f5_2304_7d84,
    0x32ca_ab7b_40c7_2493,
    0x3c9e_be0a_15c9_bebc,
    0x431d_67c4_9c10_0d4c,
    0x4cc5_d4be_cb3e_42b6,
    0x597f_299c_fc65_7e2a,
    0x5fcb_6fab_3ad6_faec,
    0x6c44_198c_4a47_5817,
];

/// SHA-512's block length in bytes.
const BLOCK: usize = 128;

/// Eight SHA-512 states, word `i` of every lane in `[i]`.
type State = [__m512i; 8];

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn add(a: __m512i, b: __m512i) -> __m512i {
    _mm512_add_epi64(a, b)
}

#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
#[inline]
fn xor3(a: __m512i, b: __m512i, c: __m512i) -> __m512i {
    _mm512_ternarylogic_epi64::<0x96>(a, b, c)
}

/// One block per lane: `state += compress(state, w)` (FIPS 180-4 6.4.2).
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn compress(state: &State, block: &[__m512i; 16]) -> State {
    let mut w = *block;
    let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut h] = *state;
    for (t, k) in K.iter().enumerate() {
        let wt = if t < 16 {
            w[t]
        } else {
            // The schedule in a ring of 16 words.
            let w15 = w[(t + 1) & 15];
            let w2 = w[(t + 14) & 15];
            let s0 = xor3(
                _mm512_ror_epi64::<1>(w15),
                _mm512_ror_epi64::<8>(w15),
                _mm512_srli_epi64::<7>(w15),
            );
            let s1 = xor3(
                _mm512_ror_epi64::<19>(w2),
                _mm512_ror_epi64::<61>(w2),
                _mm512_srli_epi64::<6>(w2),
            );
            let n = add(add(w[t & 15], s0), add(w[(t + 9) & 15], s1));
            w[t & 15] = n;
            n
        };
        let s1 = xor3(
            _mm512_ror_epi64::<14>(e),
            _mm512_ror_epi64::<18>(e),
            _mm512_ror_epi64::<41>(e),
        );
        // Ch(e, f, g) = (e & f) ^ (!e & g); Maj(a, b, c): the majority.
        let ch = _mm512_ternarylogic_epi64::<0xca>(e, f, g);
        let t1 = add(add(add(h, s1), add(ch, _mm512_set1_epi64(*k as i64))), wt);
        let s0 = xor3(
            _mm512_ror_epi64::<28>(a),
            _mm512_ror_epi64::<34>(a),
            _mm512_ror_epi64::<39>(a),
        );
        let maj = _mm512_ternarylogic_epi64::<0xe8>(a, b, c);
        h = g;
        g = f;
        f = e;
        e = add(d, t1);
        d = c;
        c = b;
        b = a;
        a = add(t1, add(s0, maj));
    }
    let out = [a, b, c, d, e, f, g, h];
    let mut next = *state;
    for (n, o) in next.iter_mut().zip(out) {
        *n = add(*n, o);
    }
    next
}

/// Hashes each lane's padded message (a whole number of blocks, at most
/// one buffer per lane) from `start`: block `j` of every lane that has it,
/// the other lanes keeping their state.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn hash_padded(start: &State, padded: &[Vec<u8>; LANES]) -> State {
    let blocks = padded.iter().map(|p| p.len() / BLOCK).max().unwrap_or(0);
    let mut state = *start;
    for j in 0..blocks {
        let mut active: __mmask8 = 0;
        let mut words = [[0u64; LANES]; 16];
        for (lane, p) in padded.iter().enumerate() {
            let Some(block) = p.get(j * BLOCK..(j + 1) * BLOCK) else {
                continue;
            };
            active |= 1 << lane;
            for (i, c) in block.chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                words[i][lane] = u64::from_be_bytes(b);
            }
        }
        let mut w = [_mm512_setzero_si512(); 16];
        for (v, l) in w.iter_mut().zip(&words) {
            *v = from_lanes(l);
        }
        let next = compress(&state, &w);
        for (s, n) in state.iter_mut().zip(next) {
            *s = _mm512_mask_blend_epi64(active, *s, n);
        }
    }
    state
}

/// `buf = content || 0x80 || 0... || I2OSP(8 * total, 16)`, a whole number
/// of blocks, where `total` counts the bytes hashed before `content` too.
fn pad(buf: &mut Vec<u8>, before: usize) {
    let total = (before + buf.len()) as u128;
    buf.push(0x80);
    // Zeros up to the length field at the end of the last block.
    let end = (buf.len() + 16).div_ceil(BLOCK) * BLOCK;
    buf.resize(end - 16, 0);
    buf.extend_from_slice(&(total * 8).to_be_bytes());
}

/// The 64 bytes of lane `lane` of eight states.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
fn digest_bytes(state: &State) -> [[u8; 64]; LANES] {
    let mut out = [[0u8; 64]; LANES];
    for (i, v) in state.iter().enumerate() {
        for (lane, x) in lanes(*v).iter().enumerate() {
            out[lane][8 * i..8 * i + 8].copy_from_slice(&x.to_be_bytes());
        }
    }
    out
}

/// `expand_message_xmd(msg, dst, 64)` with SHA-512 for each message, into
/// `out` (appended, in order). `dst` is 1 to 255 bytes (checked by the
/// caller).
///
/// The second hash's input `b0 || I2OSP(1, 1) || DST'` (padded) is the same
/// for every message but its first 64 bytes, and those are `b0`'s eight
/// state words as they are (a SHA-512 digest is its state words, big
/// endian): its blocks are built once as words, and `b0` never becomes
/// bytes.
#[target_feature(enable = "avx512f,avx512ifma,avx512dq")]
pub(crate) fn expand64(dst: &[u8], msgs: &[&[u8]], out: &mut Vec<[u8; 64]>) {
    let iv = IV.map(|x| _mm512_set1_epi64(x as i64));
    // Z_pad is one whole block of zeros: compressed once.
    let after_z = compress(&iv, &[_mm512_setzero_si512(); 16]);
    let dst_len = dst.len() as u8;
    // What follows each message in the first hash: I2OSP(64, 2) ||
    // I2OSP(0, 1) || DST'.
    let mut suffix = Vec::with_capacity(dst.len() + 4);
    suffix.extend_from_slice(&[0, 64, 0]);
    suffix.extend_from_slice(dst);
    suffix.push(dst_len);
    // The second hash's padded input with zeros where b0 goes: one to three
    // blocks, as words, the same in every lane.
    let mut second = vec![0u8; 64];
    second.push(1);
    second.extend_from_slice(dst);
    second.push(dst_len);
    pad(&mut second, 0);
    let second: Vec<__m512i> = second
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            _mm512_set1_epi64(u64::from_be_bytes(b) as i64)
        })
        .collect();
    let mut first: [Vec<u8>; LANES] = Default::default();
    for group in msgs.chunks(LANES) {
        for (lane, buf) in first.iter_mut().enumerate() {
            buf.clear();
            if let Some(msg) = group.get(lane) {
                buf.extend_from_slice(msg);
                buf.extend_from_slice(&suffix);
                pad(buf, BLOCK);
            }
        }
        let b0 = hash_padded(&after_z, &first);
        // Lanes past the group's messages hash whatever they hold; their
        // results are not kept.
        let mut state = iv;
        for (j, words) in second.chunks_exact(16).enumerate() {
            let mut block = [_mm512_setzero_si512(); 16];
            block.copy_from_slice(words);
            if j == 0 {
                block[..8].copy_from_slice(&b0);
            }
            state = compress(&state, &block);
        }
        let b1 = digest_bytes(&state);
        out.extend_from_slice(b1.get(..group.len()).unwrap_or(&[]));
    }
}
