//! Micro-benchmarks of the primitives the protocol's cost is made of, and of
//! the in-memory join. Run with `cargo bench -p cleanroom-benches`.

use std::hint::black_box;

use cleanroom_crypto::dp::{DiscreteGaussian, ShiftedTruncatedLaplace};
use cleanroom_crypto::h2g::HashToGroup;
use cleanroom_crypto::keys::SecretScalar;
use cleanroom_crypto::ot::{BaseOtSender, IknpReceiver, IknpSender, RowMasks, base_ot_receive, pack_bits};
use cleanroom_crypto::point::{decode_point, hash_mul_compress};
use cleanroom_sim::simulate::{DEFAULT_CHUNK, SimulateConfig, simulate};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use curve25519_dalek::ristretto::RistrettoPoint;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn curve(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let h2g = HashToGroup::for_collaboration("bench").unwrap();
    let k = SecretScalar::random(&mut rng);
    let p = h2g.hash(b"email:someone@example.com");
    let enc = p.compress().to_bytes();
    let mut g = c.benchmark_group("curve");
    g.bench_function("hash_to_group", |b| {
        b.iter(|| h2g.hash(black_box(b"email:someone@example.com")))
    });
    g.bench_function("scalar_mul", |b| b.iter(|| black_box(k.expose()) * black_box(p)));
    g.bench_function("compress", |b| b.iter(|| black_box(p).compress()));
    g.bench_function("decompress_checked", |b| b.iter(|| decode_point(black_box(&enc))));
    let pts: Vec<RistrettoPoint> = (0..1024u32).map(|i| h2g.hash(&i.to_le_bytes())).collect();
    g.throughput(Throughput::Elements(1024));
    g.bench_function("double_and_compress_batch_1024", |b| {
        b.iter(|| RistrettoPoint::double_and_compress_batch(black_box(&pts)))
    });
    let ids: Vec<Vec<u8>> = (0..4096u32)
        .map(|i| format!("email:user{i}@example.com").into_bytes())
        .collect();
    g.throughput(Throughput::Elements(4096));
    g.bench_function("hash_mul_compress_parallel_4096", |b| {
        b.iter(|| hash_mul_compress(&h2g, black_box(&ids), &k))
    });
    g.finish();
}

/// The multi-buffer code (`cleanroom-mb`, eight points per AVX-512 IFMA
/// instruction) against curve25519-dalek one point at a time, on one core,
/// for the same 1024 inputs: per element, bytes in, bytes out.
fn batched(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let k = SecretScalar::random(&mut rng);
    let digits = cleanroom_mb::Digits::new(&k.expose().to_bytes()).unwrap();
    let uniform: Vec<[u8; 64]> = (0..1024)
        .map(|_| {
            let mut u = [0u8; 64];
            rng.fill_bytes(&mut u);
            u
        })
        .collect();
    let points: Vec<[u8; 32]> = uniform
        .iter()
        .map(|u| RistrettoPoint::from_uniform_bytes(u).compress().to_bytes())
        .collect();
    let mut g = c.benchmark_group("batched");
    g.throughput(Throughput::Elements(1024));
    if let Some(ifma) = cleanroom_mb::Ifma::detect() {
        g.bench_function("mb_map_mul_encode_1024", |b| {
            b.iter(|| ifma.hash_mul_encode(black_box(&uniform), &digits))
        });
        g.bench_function("mb_decode_mul_encode_1024", |b| {
            b.iter(|| ifma.decode_mul_encode(black_box(&points), &digits))
        });
    }
    g.bench_function("dalek_map_mul_compress_1024", |b| {
        b.iter(|| {
            black_box(&uniform)
                .iter()
                .map(|u| (k.expose() * RistrettoPoint::from_uniform_bytes(u)).compress())
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("dalek_decode_mul_compress_1024", |b| {
        b.iter(|| {
            black_box(&points)
                .iter()
                .map(|p| decode_point(p).map(|p| (k.expose() * p).compress()))
                .collect::<Vec<_>>()
        })
    });
    g.finish();

    // The same work one operation at a time: the map (RFC 9496's one-way
    // map) and the strict decoding, each with its encoding, then the
    // multiplication alone. The multi-buffer code multiplies by k/2 and
    // doubles while encoding, so its parts keep the doubling (one of the
    // multiplication's 253) and its multiplication is the fused benchmark
    // above minus its part here.
    let ids: Vec<Vec<u8>> = (0..1024u32)
        .map(|i| format!("email:user{i}@example.com").into_bytes())
        .collect();
    let h2g = HashToGroup::for_collaboration("bench").unwrap();
    let decoded: Vec<RistrettoPoint> = points.iter().map(|p| decode_point(p).unwrap()).collect();
    let mut g = c.benchmark_group("per_op");
    g.throughput(Throughput::Elements(1024));
    g.bench_function("expand_message_xmd_sha512_1024", |b| {
        b.iter(|| {
            black_box(&ids)
                .iter()
                .map(|id| h2g.uniform_bytes(id))
                .collect::<Vec<_>>()
        })
    });
    if let Some(ifma) = cleanroom_mb::Ifma::detect() {
        let refs: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        g.bench_function("mb_expand_xmd_sha512_1024", |b| {
            b.iter(|| ifma.expand_xmd_sha512_64(h2g.dst(), black_box(&refs)))
        });
        g.bench_function("mb_map_double_encode_1024", |b| {
            b.iter(|| ifma.map_double_encode(black_box(&uniform)))
        });
        g.bench_function("mb_decode_double_encode_1024", |b| {
            b.iter(|| ifma.decode_double_encode(black_box(&points)))
        });
    }
    g.bench_function("dalek_map_compress_1024", |b| {
        b.iter(|| {
            black_box(&uniform)
                .iter()
                .map(|u| RistrettoPoint::from_uniform_bytes(u).compress())
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("dalek_decode_compress_1024", |b| {
        b.iter(|| {
            black_box(&points)
                .iter()
                .map(|p| decode_point(p).map(|p| p.compress()))
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("dalek_mul_1024", |b| {
        b.iter(|| black_box(&decoded).iter().map(|p| k.expose() * p).collect::<Vec<_>>())
    });
    g.finish();
}

fn ot(c: &mut Criterion) {
    let rows = 1 << 20;
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let delta = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
    let (sender, a) = BaseOtSender::new(&mut rng);
    let (rkeys, bs) = base_ot_receive(&mut rng, b"s", &a, delta).unwrap();
    let skeys = sender.finish(b"s", &bs).unwrap();
    let choices: Vec<bool> = (0..rows).map(|i| i % 3 == 0).collect();
    let receiver = IknpReceiver::new(&skeys, pack_bits(&choices), rows).unwrap();
    let ext = IknpSender::new(delta, &rkeys, rows);
    let mut g = c.benchmark_group("ot");
    g.sample_size(10);
    g.bench_function("base_ot_128", |b| {
        b.iter_batched(
            || BaseOtSender::new(&mut rng),
            |(s, a)| {
                let mut r = ChaCha20Rng::seed_from_u64(3);
                let (_, bs) = base_ot_receive(&mut r, b"s", &a, delta).unwrap();
                s.finish(b"s", &bs).unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function("iknp_1048576_rows", |b| {
        b.iter(|| {
            let mut first = 0;
            while first < rows {
                let len = 8192.min(rows - first);
                let rc = receiver.chunk(first, len).unwrap();
                black_box(ext.chunk(first, len, &rc.message).unwrap());
                first += len;
            }
        })
    });
    g.finish();
    // The aggregate's row masks at 51 cells, a batch of rows at a time as
    // the aggregate runs them (the holder does this twice per row, the
    // matcher once); throughput per row.
    let mut g = c.benchmark_group("ot");
    let batch = RowMasks::batch_rows(51);
    let keys: Vec<u128> = (0..batch as u128).map(|r| delta ^ r).collect();
    let mut masks = RowMasks::new();
    let mut words = Vec::new();
    g.throughput(Throughput::Elements(batch as u64));
    g.bench_function("row_masks_51_words", |b| {
        b.iter(|| {
            masks.expand(black_box(1 << 20), black_box(&keys), 51, &mut words);
            black_box(&words);
        })
    });
    g.finish();
}

/// Phase 2 alone at 2^20 rows and 51 cells (the `spend_by_category` width),
/// over a join rebuilt from parts (half the rows matched), in memory: base
/// OTs, extension, masking and unmasking, no network.
fn aggregate(c: &mut Criterion) {
    use cleanroom_protocol::aggregate::{HolderAggregate, RowValues};
    use cleanroom_protocol::join::{HolderJoined, MatcherJoined, UNMATCHED};
    let rows: u32 = 1 << 20;
    let width = 51;
    let session = [3u8; 16];
    let hj = std::sync::Arc::new(
        HolderJoined::from_parts(
            cleanroom_wire::SessionId(session),
            u64::from(rows),
            vec![0],
            0,
            (0..rows).collect(),
        )
        .unwrap(),
    );
    let labels: Vec<u32> = (0..rows).map(|i| if i % 2 == 0 { 0 } else { UNMATCHED }).collect();
    let mj = MatcherJoined::from_parts(cleanroom_wire::SessionId(session), labels, 1).unwrap();
    let values = std::sync::Arc::new(RowValues::new(width, (0..u64::from(rows) * width as u64).collect()).unwrap());
    let mut g = c.benchmark_group("aggregate");
    g.sample_size(10);
    g.throughput(Throughput::Elements(u64::from(rows)));
    g.bench_function("1048576_rows_51_cells_in_memory", |b| {
        b.iter(|| {
            let mut rh = ChaCha20Rng::seed_from_u64(5);
            let mut rm = ChaCha20Rng::seed_from_u64(6);
            let agg =
                HolderAggregate::new(hj.clone(), values.clone(), cleanroom_wire::QueryId([1; 16]), [2; 32], 0).unwrap();
            black_box(
                cleanroom_sim::driver::run_aggregate(
                    agg,
                    &mj,
                    mj.matched(),
                    width,
                    cleanroom_wire::QueryId([1; 16]),
                    [2; 32],
                    0,
                    &mut rh,
                    &mut rm,
                )
                .unwrap(),
            )
        })
    });
    g.finish();
}

fn samplers(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let gauss = DiscreteGaussian::for_zcdp(1_000_000 * 1_000_000, 1, 10).unwrap();
    let card = ShiftedTruncatedLaplace::new(1, 2, 1_000_000).unwrap();
    let mut g = c.benchmark_group("dp");
    g.bench_function("discrete_gaussian_sigma_2.2e6", |b| {
        b.iter(|| gauss.sample(&mut rng).unwrap())
    });
    g.bench_function("shifted_truncated_laplace", |b| {
        b.iter(|| card.sample(&mut rng).unwrap())
    });
    g.finish();
}

fn join(c: &mut Criterion) {
    let mut g = c.benchmark_group("simulate");
    g.sample_size(10);
    g.bench_function("join_and_aggregate_10k", |b| {
        b.iter(|| {
            simulate(&SimulateConfig {
                chunk_points: DEFAULT_CHUNK,
                ..SimulateConfig::new(10_000, 10_000)
            })
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, curve, batched, ot, aggregate, samplers, join);
criterion_main!(benches);
