//! The multi-buffer code against curve25519-dalek, byte for byte, and
//! against RFC 9496's test vectors.

use curve25519_dalek::constants::{RISTRETTO_BASEPOINT_POINT, RISTRETTO_BASEPOINT_TABLE};
use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use super::*;

/// Whether the vector code runs here; the tests say so when it does not
/// (they then check only that the functions decline).
fn vector_code() -> Option<Ifma> {
    let v = Ifma::detect();
    if v.is_none() {
        eprintln!("no AVX-512 IFMA on this CPU (or CLEANROOM_CURVE=dalek): the multi-buffer code is not run");
        assert!(!cpu_has_ifma() || std::env::var_os("CLEANROOM_CURVE").is_some());
    }
    v
}

fn random_scalar(rng: &mut ChaCha20Rng) -> Scalar {
    let mut wide = [0u8; 64];
    rng.fill_bytes(&mut wide);
    Scalar::from_bytes_mod_order_wide(&wide)
}

fn digits(k: &Scalar) -> Digits {
    Digits::new(&k.to_bytes()).unwrap()
}

fn dalek_decode_mul(points: &[[u8; 32]], k: &Scalar) -> Vec<[u8; 32]> {
    points
        .iter()
        .map(|b| {
            (k * CompressedRistretto(*b).decompress().unwrap())
                .compress()
                .to_bytes()
        })
        .collect()
}

fn dalek_hash_mul(uniform: &[[u8; 64]], k: &Scalar) -> Vec<[u8; 32]> {
    uniform
        .iter()
        .map(|u| (k * RistrettoPoint::from_uniform_bytes(u)).compress().to_bytes())
        .collect()
}

fn hex32(s: &str) -> [u8; 32] {
    hex::decode(s).unwrap().try_into().unwrap()
}

#[test]
fn decode_mul_encode_equals_dalek() {
    let Some(v) = vector_code() else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    // Every length around the batch size, then a long run.
    for n in (0..=25).chain([1000]) {
        let k = random_scalar(&mut rng);
        let points: Vec<[u8; 32]> = (0..n)
            .map(|_| {
                (RISTRETTO_BASEPOINT_TABLE * &random_scalar(&mut rng))
                    .compress()
                    .to_bytes()
            })
            .collect();
        let got = v.decode_mul_encode(&points, &digits(&k)).unwrap();
        assert_eq!(got, dalek_decode_mul(&points, &k), "n = {n}");
    }
}

#[test]
fn hash_mul_encode_equals_dalek() {
    let Some(v) = vector_code() else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    for n in (0..=25).chain([1000]) {
        let k = random_scalar(&mut rng);
        let uniform: Vec<[u8; 64]> = (0..n)
            .map(|_| {
                let mut u = [0u8; 64];
                rng.fill_bytes(&mut u);
                u
            })
            .collect();
        let got = v.hash_mul_encode(&uniform, &digits(&k));
        assert_eq!(got, dalek_hash_mul(&uniform, &k), "n = {n}");
    }
}

/// Scalars at the edges: zero (every result the identity, all zeros), one,
/// small ones, the largest below the group order, a power of two, and
/// scalars `k` whose half `k/2` (what the window reads) has every digit
/// near an end of its range (nibbles all 8, recoded to -8, -7, -7, ...;
/// nibbles all 7).
#[test]
fn edge_scalars() {
    let Some(v) = vector_code() else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let points: Vec<[u8; 32]> = (0..11)
        .map(|_| {
            (RISTRETTO_BASEPOINT_TABLE * &random_scalar(&mut rng))
                .compress()
                .to_bytes()
        })
        .collect();
    let uniform: Vec<[u8; 64]> = (0..11)
        .map(|_| {
            let mut u = [0u8; 64];
            rng.fill_bytes(&mut u);
            u
        })
        .collect();
    let mut eights = [0x88u8; 32];
    eights[31] = 0x08;
    let mut sevens = [0x77u8; 32];
    sevens[31] = 0x07;
    let mut scalars = vec![
        Scalar::ZERO,
        Scalar::ONE,
        Scalar::from(2u8),
        Scalar::from(8u8),
        Scalar::from(9u8),
        -Scalar::ONE,
        -Scalar::from(8u8),
        Scalar::from_bytes_mod_order(eights),
        Scalar::from_bytes_mod_order(sevens),
        Scalar::from_bytes_mod_order(eights) * Scalar::from(2u8),
        Scalar::from_bytes_mod_order(sevens) * Scalar::from(2u8),
    ];
    let mut two_252 = [0u8; 32];
    two_252[31] = 0x10;
    scalars.push(Scalar::from_bytes_mod_order(two_252));
    for k in &scalars {
        assert_eq!(
            v.decode_mul_encode(&points, &digits(k)).unwrap(),
            dalek_decode_mul(&points, k)
        );
        assert_eq!(v.hash_mul_encode(&uniform, &digits(k)), dalek_hash_mul(&uniform, k));
    }
    let zero = v.decode_mul_encode(&points, &digits(&Scalar::ZERO)).unwrap();
    assert!(zero.iter().all(|e| *e == [0u8; 32]));
}

/// RFC 9496 A.1: the encodings of the first multiples of the generator.
#[test]
fn rfc9496_multiples_of_the_generator() {
    let Some(v) = vector_code() else {
        return;
    };
    let multiples = [
        "e2f2ae0a6abc4e71a884a961c500515f58e30b6aa582dd8db6a65945e08d2d76",
        "6a493210f7499cd17fecb510ae0cea23a110e8d5b901f8acadd3095c73a3b919",
        "94741f5d5d52755ece4f23f044ee27d5d1ea1e2bd196b462166b16152a9d0259",
        "da80862773358b466ffadfe0b3293ab3d9fd53c5ea6c955358f568322daf6a57",
        "e882b131016b52c1d3337080187cf768423efccbb517bb495ab812c4160ff44e",
        "f64746d3c92b13050ed8d80236a7f0007c3b3f962f5ba793d19a601ebb1df403",
        "44f53520926ec81fbd5a387845beb7df85a96a24ece18738bdcfa6a7822a176d",
        "903293d8f2287ebe10e2374dc1a53e0bc887e592699f02d077d5263cdd55601c",
        "02622ace8f7303a31cafc63f8fc48fdc16e1c8c8d234b2f0d6685282a9076031",
        "20706fd788b2720a1ed2a5dad4952b01f413bcf0e7564de8cdc816689e2db95f",
        "bce83f8ba5dd2fa572864c24ba1810f9522bc6004afe95877ac73241cafdab42",
        "e4549ee16b9aa03099ca208c67adafcafa4c3f3e4e5303de6026e3ca8ff84460",
        "aa52e000df2e16f55fb1032fc33bc42742dad6bd5a8fc0be0167436c5948501f",
        "46376b80f409b29dc2b5f6f0c52591990896e5716f41477cd30085ab7f10301e",
        "e0c418f7c8d9c4cdd7395b93ea124f3ad99021bb681dfc3302a9d99a2e53e64e",
    ];
    let enc: Vec<[u8; 32]> = multiples.iter().map(|s| hex32(s)).collect();
    // 1 * (i+1)G is (i+1)G; 2 * (i+1)G is (2i+2)G.
    assert_eq!(v.decode_mul_encode(&enc, &digits(&Scalar::ONE)).unwrap(), enc);
    let doubled = v.decode_mul_encode(&enc[..7], &digits(&Scalar::from(2u8))).unwrap();
    for (i, d) in doubled.iter().enumerate() {
        assert_eq!(*d, enc[2 * i + 1], "2 * {}G", i + 1);
    }
    assert_eq!(enc[0], RISTRETTO_BASEPOINT_POINT.compress().to_bytes());
}

/// RFC 9496 A.2's bad encodings are refused as invalid, the identity as
/// the identity, each at its own index, whatever its lane.
#[test]
fn bad_encodings_refused_at_their_index() {
    let Some(v) = vector_code() else {
        return;
    };
    let bad = [
        // Non-canonical field encodings.
        "00ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
        "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "f3ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        // Negative field elements.
        "0100000000000000000000000000000000000000000000000000000000000000",
        "01ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "ed57ffd8c914fb201471d1c3d245ce3c746fcbe63a3679d51b6a516ebebe0e20",
        "c34c4e1826e5d403b78e246e88aa051c36ccf0aafebffe137d148a2bf9104562",
        "c940e5a4404157cfb1628b108db051a8d439e1a421394ec4ebccb9ec92a8ac78",
        "47cfc5497c53dc8e61c91d17fd626ffb1c49e2bca94eed052281b510b1117a24",
        "f1c6165d33367351b0da8f6e4511010c68174a03b6581212c71c0e1d026c3c72",
        "87260f7a2f12495118360f02c26a470f450dadf34a413d21042b43b9d93e1309",
        // Non-square x^2.
        "26948d35ca62e643e26a83177332e6b6afeb9d08e4268b650f1f5bbd8d81d371",
        "4eac077a713c57b4f4397629a4145982c661f48044dd3f96427d40b147d9742f",
        "de6a7b00deadc788eb6b6c8d20c0ae96c2f2019078fa604fee5b87d6e989ad7b",
        "bcab477be20861e01e4a0e295284146a510150d9817763caf1a6f4b422d67042",
        "2a292df7e32cababbd9de088d1d1abec9fc0440f637ed2fba145094dc14bea08",
        "f4a9e534fc0d216c44b218fa0c42d99635a0127ee2e53c712f70609649fdff22",
        "8268436f8c4126196cf64b3c7ddbda90746a378625f9813dd9b8457077256731",
        "2810e5cbc2cc4d4eece54f61c6f69758e289aa7ab440b3cbeaa21995c2f4232b",
        // Negative xy value.
        "3eb858e78f5a7254d8c9731174a94f76755fd3941c0ac93735c07ba14579630e",
        "a45fdc55c76448c049a1ab33f17023edfb2be3581e9c7aade8a6125215e04220",
        "d483fe813c6ba647ebbfd3ec41adca1c6130c2beeee9d9bf065c8d151c5f396e",
        "8a2e1d30050198c65a54483123960ccc38aef6848e1ec8f5f780e8523769ba32",
        "32888462f8b486c68ad7dd9610be5192bbeaf3b443951ac1a8118419d9fa097b",
        "227142501b9d4355ccba290404bde41575b037693cef1f438c47f8fbf35d1165",
        "5c37cc491da847cfeb9281d407efc41e15144c876e0170b499a96a22ed31e01e",
        "445425117cb8c90edcbc7c1cc0e74f747f2c1efa5630a967c64f287792a48a4b",
        // s = -1, which causes y = 0.
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let k = digits(&random_scalar(&mut rng));
    let good: Vec<[u8; 32]> = (0..19)
        .map(|_| {
            (RISTRETTO_BASEPOINT_TABLE * &random_scalar(&mut rng))
                .compress()
                .to_bytes()
        })
        .collect();
    for (i, b) in bad.iter().enumerate() {
        let b = hex32(b);
        assert!(CompressedRistretto(b).decompress().is_none(), "dalek refuses {i}");
        let at = i % good.len();
        let mut batch = good.clone();
        batch[at] = b;
        assert_eq!(
            v.decode_mul_encode(&batch, &k),
            Err(Refused {
                index: at,
                error: PointError::Invalid
            }),
            "bad encoding {i}"
        );
    }
    let mut batch = good.clone();
    batch[9] = [0u8; 32];
    batch[12] = hex32(bad[0]);
    assert_eq!(
        v.decode_mul_encode(&batch, &k),
        Err(Refused {
            index: 9,
            error: PointError::Identity
        })
    );
}

/// RFC 9496 A.3: the one-way map of 64 bytes (times one).
#[test]
fn rfc9496_one_way_map() {
    let Some(v) = vector_code() else {
        return;
    };
    let input = hex::decode(
        "5d1be09e3d0c82fc538112490e35701979d99e06ca3e2b5b54bffe8b4dc772c14d98b696a1bbfb5ca32c436cc61c16563790306c79eaca7705668b47dffe5bb6",
    )
    .unwrap();
    let u: [u8; 64] = input.try_into().unwrap();
    let got = v.hash_mul_encode(&[u], &digits(&Scalar::ONE));
    assert_eq!(
        got,
        vec![hex32(
            "3066f82a1a747d45120d1740f14358531a8f04bbffe6a819f86dfe50f44a0a46"
        )]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any 64 bytes, any scalar: the same bytes as dalek, and decoding the
    /// result then multiplying by `k'` matches too.
    #[test]
    fn random_inputs_equal_dalek(u in proptest::collection::vec(any::<u8>(), 64..=64), k in proptest::collection::vec(any::<u8>(), 64..=64), k2 in any::<u64>()) {
        if let Some(v) = Ifma::detect() {
            let u: [u8; 64] = u.try_into().unwrap();
            let k = Scalar::from_bytes_mod_order_wide(&k.try_into().unwrap());
            let hashed = v.hash_mul_encode(&[u, u], &digits(&k));
            prop_assert_eq!(&hashed, &dalek_hash_mul(&[u, u], &k));
            let k2 = Scalar::from(k2);
            let decoded = v.decode_mul_encode(&hashed, &digits(&k2)).unwrap();
            prop_assert_eq!(decoded, dalek_decode_mul(&hashed, &k2));
        }
    }
}

/// Inputs whose image is the identity (the map sends 0 to it) mixed with
/// others, in every lane and batch position: the shared inversion treats
/// their zero denominators apart, so the other results are unchanged.
#[test]
fn identity_images_beside_others() {
    use curve25519_dalek::traits::Identity;
    assert_eq!(
        RistrettoPoint::from_uniform_bytes(&[0u8; 64]),
        RistrettoPoint::identity()
    );
    let Some(v) = vector_code() else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let k = random_scalar(&mut rng);
    let uniform: Vec<[u8; 64]> = (0..700)
        .map(|i| {
            let mut u = [0u8; 64];
            if i % 3 != 1 {
                rng.fill_bytes(&mut u);
            }
            u
        })
        .collect();
    let got = v.hash_mul_encode(&uniform, &digits(&k));
    assert_eq!(got, dalek_hash_mul(&uniform, &k));
    assert!(got.iter().skip(1).step_by(3).all(|e| *e == [0u8; 32]));
}

/// The parts without the multiplication: `map_double_encode` is dalek's
/// `(2 * from_uniform_bytes(u)).compress()`, `decode_double_encode` is
/// `(2 * decompress(b)).compress()` and refuses exactly what
/// `decode_mul_encode` refuses, at the same index.
#[test]
fn parts_without_the_multiplication() {
    let Some(v) = vector_code() else {
        return;
    };
    let two = Scalar::from(2u8);
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    for n in (0..=17).chain([300]) {
        let uniform: Vec<[u8; 64]> = (0..n)
            .map(|_| {
                let mut u = [0u8; 64];
                rng.fill_bytes(&mut u);
                u
            })
            .collect();
        assert_eq!(v.map_double_encode(&uniform), dalek_hash_mul(&uniform, &two), "n = {n}");
        let points = dalek_hash_mul(&uniform, &Scalar::ONE);
        assert_eq!(
            v.decode_double_encode(&points).unwrap(),
            dalek_decode_mul(&points, &two),
            "n = {n}"
        );
    }
    let k = digits(&random_scalar(&mut rng));
    let good: Vec<[u8; 32]> = (0..20)
        .map(|_| {
            (RISTRETTO_BASEPOINT_TABLE * &random_scalar(&mut rng))
                .compress()
                .to_bytes()
        })
        .collect();
    let bad = [
        [0u8; 32],
        hex32("0100000000000000000000000000000000000000000000000000000000000000"),
        hex32("26948d35ca62e643e26a83177332e6b6afeb9d08e4268b650f1f5bbd8d81d371"),
        hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    ];
    for (i, b) in bad.iter().enumerate() {
        let mut batch = good.clone();
        batch[5 + 3 * i] = *b;
        let refused = v.decode_double_encode(&batch).unwrap_err();
        assert_eq!(Err(refused), v.decode_mul_encode(&batch, &k), "bad {i}");
        assert_eq!(refused.index, 5 + 3 * i);
    }
}

/// A refused encoding is reported at its own index wherever it falls: in
/// the first or second vector of a pair decoded together, in a last, odd
/// vector, in a later group of vectors encoded with one inversion; and the
/// first of two is the one reported.
#[test]
fn refusals_at_their_index_past_the_first_pair_and_group() {
    let Some(v) = vector_code() else {
        return;
    };
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let scalar = random_scalar(&mut rng);
    let k = digits(&scalar);
    // 1108 points: groups of 512, pairs of 16, and a last, odd vector of 4
    // (the last group's vectors 0 to 9 in pairs, then 10).
    let p = RISTRETTO_BASEPOINT_POINT * random_scalar(&mut rng);
    let good: Vec<[u8; 32]> = (0..1108u64)
        .map(|i| (p + RISTRETTO_BASEPOINT_POINT * Scalar::from(i)).compress().to_bytes())
        .collect();
    let non_square = hex32("26948d35ca62e643e26a83177332e6b6afeb9d08e4268b650f1f5bbd8d81d371");
    for at in [3, 8, 15, 16, 511, 512, 527, 1039, 1096, 1099, 1104, 1107] {
        let mut batch = good.clone();
        batch[at] = non_square;
        let refused = v.decode_mul_encode(&batch, &k).unwrap_err();
        assert_eq!(
            refused,
            Refused {
                index: at,
                error: PointError::Invalid
            },
            "at {at}"
        );
        assert_eq!(v.decode_double_encode(&batch).unwrap_err(), refused);
        if at + 9 < batch.len() {
            batch[at + 9] = [0u8; 32];
            assert_eq!(
                v.decode_mul_encode(&batch, &k).unwrap_err().index,
                at,
                "first of two, at {at}"
            );
        }
    }
    assert_eq!(
        v.decode_mul_encode(&good, &k).unwrap(),
        dalek_decode_mul(&good, &scalar)
    );
}

/// The field arithmetic at its limb bounds (`ifma::field_check`): results
/// known independently for the largest limbs, and random limbs near the
/// bounds equal to their canonical ones through every operation.
#[test]
fn field_arithmetic_at_its_limb_bounds() {
    let Some(v) = vector_code() else {
        return;
    };
    assert_eq!(v.field_check(), Vec::<&str>::new());
}
