//! The build compiles curve25519-dalek's AVX-512 IFMA backend beside its
//! AVX2 and serial ones, and the library picks one at run time
//! (`.cargo/config.toml`; `cleanroom_crypto::point::CurveBackend`); on a CPU
//! with AVX-512 IFMA the join's curve work runs on the multi-buffer code of
//! `cleanroom-mb` instead (`CurveEngine`). This checks that the choices
//! change no result: the curve work of a join (the
//! published RFC 9497 evaluations, tokens of seeded identifiers under a
//! seeded key, their decompression and re-multiplication) and a whole
//! `simulate` run checked against plaintext give the same bytes on this CPU
//! and on CPUs emulated by qemu-user without AVX-512 (`-cpu Haswell`: AVX2)
//! and without AVX2 (`-cpu Nehalem`: serial).
//!
//! The emulated runs re-execute this test binary under `qemu-x86_64`
//! (Debian's `qemu-user`; `.ci/run` installs it). Without it the test says
//! so and passes, unless `CLEANROOM_REQUIRE_QEMU` is set (CI sets it).

use std::process::Command;

use cleanroom_crypto::h2g::HashToGroup;
use cleanroom_crypto::keys::SecretScalar;
use cleanroom_crypto::point::{CurveBackend, CurveEngine, decode_mul_compress, hash_mul_compress};
use cleanroom_sim::simulate::{SimulateConfig, simulate};
use curve25519_dalek::scalar::Scalar;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use ring::digest::{Context, SHA256};

/// The curve results this process computes, as one digest, and the engine
/// and backend it used.
fn curve_results() -> (String, CurveEngine, CurveBackend) {
    let mut d = Context::new(&SHA256);
    // RFC 9497 A.1.1 (OPRF, ristretto255-SHA512): the blinded element of
    // input 0x00 under the published blind.
    let h2g = HashToGroup::new(b"HashToGroup-OPRFV1-\x00-ristretto255-SHA512").expect("a valid tag");
    let blind: [u8; 32] = hex_bytes("64d37aed22a27f5191de1c1d69fadb899d8862b58eb4220029e036ec4c1f6706");
    let blind = Scalar::from_canonical_bytes(blind).expect("a canonical scalar");
    let blinded = (blind * h2g.hash(&[0u8])).compress().to_bytes();
    assert_eq!(
        blinded,
        hex_bytes("609a0ae68c15a3cf6903766461307e5c8bb2f95e7e6550e1ffa2dc99e412803c"),
        "RFC 9497 A.1.1, BlindedElement of input 00"
    );
    d.update(&blinded);
    // The same through the join's batched path (the multi-buffer code where
    // the CPU has it), with the blind as the key.
    let blind_key = SecretScalar::from_scalar(blind).expect("a non-zero blind");
    assert_eq!(hash_mul_compress(&h2g, &[[0u8]], &blind_key), vec![blinded]);
    // A join's curve work on seeded identifiers and keys.
    let mut rng = ChaCha20Rng::seed_from_u64(2026);
    let kb = SecretScalar::random(&mut rng);
    let kp = SecretScalar::random(&mut rng);
    let h2g = HashToGroup::for_collaboration("fallback").expect("a valid tag");
    let ids: Vec<String> = (0..3000).map(|i| format!("customer{i}@example.com")).collect();
    let rows = hash_mul_compress(&h2g, &ids, &kb);
    let twice = decode_mul_compress(&rows, &kp).expect("valid points");
    for p in rows.iter().chain(&twice) {
        d.update(p);
    }
    // A whole simulation: the exact sums, and the intersection.
    let report = simulate(&SimulateConfig {
        holder_rows: 600,
        matcher_rows: 500,
        overlap: 0.5,
        categories: 4,
        seed: 9,
        chunk_points: 256,
        shards: 1,
        group_by_segment: false,
        keys: vec![cleanroom_crypto::normalize::IdKind::Email],
        other_emails: 0.0,
    })
    .expect("the simulation runs");
    assert!(report.exact, "the simulation does not match its plaintext computation");
    d.update(&report.intersection.to_le_bytes());
    for c in &report.cells {
        d.update(c.name.as_bytes());
        d.update(&c.protocol.to_le_bytes());
    }
    let digest: String = d.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect();
    (digest, CurveEngine::selected(), CurveBackend::selected())
}

fn hex_bytes(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex");
    }
    out
}

/// What an emulated run prints (and the parent reads): the digest and the
/// backend.
#[test]
#[allow(clippy::print_stdout)]
fn curve_results_on_this_cpu() {
    let (digest, engine, backend) = curve_results();
    println!("CURVE-RESULTS {digest} {engine:?} {}", backend.name());
}

#[test]
fn the_same_results_without_avx512_or_avx2() {
    if !cfg!(all(target_arch = "x86_64", target_pointer_width = "64")) {
        eprintln!("skipped: not a 64-bit x86-64 build (curve25519-dalek has no vector backends here)");
        return;
    }
    let required = std::env::var_os("CLEANROOM_REQUIRE_QEMU").is_some();
    let (here, engine_here, backend_here) = curve_results();
    eprintln!("this CPU: {engine_here:?} {} {here}", backend_here.name());
    // In CI the build must be the repository's (.cargo/config.toml: the
    // AVX-512 IFMA backend compiled in), so that a CPU with IFMA uses it
    // and the comparison below includes it.
    #[cfg(target_arch = "x86_64")]
    if required && std::arch::is_x86_feature_detected!("avx512ifma") && std::arch::is_x86_feature_detected!("avx512vl")
    {
        let compiled_in = cfg!(curve25519_dalek_backend = "avx512");
        assert!(
            compiled_in,
            "this build lacks --cfg curve25519_dalek_backend=\"avx512\" (is RUSTFLAGS set? it replaces .cargo/config.toml's flags)"
        );
        assert_eq!(backend_here, CurveBackend::Avx512Ifma);
        if std::env::var_os("CLEANROOM_CURVE").is_none() {
            assert_eq!(engine_here, CurveEngine::MultiBuffer);
        }
    }
    let qemu_present = Command::new("qemu-x86_64").arg("--version").output().is_ok();
    if !qemu_present {
        assert!(
            !required,
            "CLEANROOM_REQUIRE_QEMU is set but qemu-x86_64 (Debian's qemu-user) is not installed"
        );
        eprintln!("skipped: qemu-x86_64 is not installed (apt-get install qemu-user)");
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    for (cpu, backend) in [("Haswell", CurveBackend::Avx2), ("Nehalem", CurveBackend::Serial)] {
        let out = Command::new("qemu-x86_64")
            .args(["-cpu", cpu])
            .arg(&exe)
            .args([
                "--exact",
                "curve_results_on_this_cpu",
                "--nocapture",
                "--test-threads=1",
            ])
            .output()
            .expect("qemu-x86_64 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "under qemu -cpu {cpu}: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|l| l.split_once("CURVE-RESULTS ").map(|(_, r)| r.trim()))
            .unwrap_or_else(|| panic!("no result line under qemu -cpu {cpu}:\n{stdout}"));
        let (digest, rest) = line.split_once(' ').expect("digest, engine and backend");
        let (engine, name) = rest.split_once(' ').expect("engine and backend");
        eprintln!("qemu -cpu {cpu}: {engine} {name} {digest}");
        assert_eq!(
            engine, "Dalek",
            "no AVX-512 IFMA under qemu -cpu {cpu}: curve25519-dalek does the work"
        );
        assert_eq!(name, backend.name(), "the backend chosen under qemu -cpu {cpu}");
        assert_eq!(
            digest, here,
            "the curve results under qemu -cpu {cpu} differ from this CPU's"
        );
    }
}
