//! `cleanroom bench`: both nodes in one process over real QUIC with mutual
//! TLS (on loopback, or through the in-process relay that emulates a path);
//! for each size, the join's wall time against the **bound** — the curve
//! operations the join needs, timed on this machine in the same run with
//! the same parallel code — and one query on the cached join, with each
//! node's phases, CPU time, bytes each way, exchanges with the peer and
//! each node's peak heap.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleanroom_crypto::h2g::HashToGroup;
use cleanroom_crypto::keys::SecretScalar;
use cleanroom_crypto::point::{CurveBackend, CurveEngine, decode_mul_compress, hash_mul_compress};
use cleanroom_crypto::rng::session_rng;
use serde::Serialize;

use crate::demo::{Fixture, demo_queries};
use crate::memory::{self, Tag};
use cleanroom_client::{Analyst, Phase as NodePhase, new_query_id};
use cleanroom_node::NodeError;

use crate::LabError;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Bank customers (= platform users) per run.
    pub sizes: Vec<usize>,
    /// Seed of the synthetic data.
    pub seed: u64,
    /// Share of the bank's customers the platform also has (0 to 1).
    pub overlap: f64,
    /// Merchant categories in the data: `spend_by_category` has one group
    /// per category plus "other", three cells each.
    pub categories: usize,
    /// The emulated path between the nodes, if any.
    pub path: Option<crate::relay::Path>,
    /// Runs per size, each on fresh nodes and data.
    pub repeat: usize,
    /// Times the `spend_by_category` query runs on each run's cached join
    /// (each a new query, so each a full aggregate); the first gives the
    /// traffic and phases, the median of all is `query_seconds`.
    pub queries: usize,
    /// Shards both nodes split their identifiers into (`[shards] count`;
    /// 1: no split).
    pub shards: u32,
    /// Run each node as its own `cleanroom node` process of this binary
    /// (so each node's peak RSS is its own), instead of both in this
    /// process. Traffic and exchanges are then not counted.
    pub node_processes: Option<std::path::PathBuf>,
    /// Key slots: 1 (match on e-mail), or 2 (match on e-mail or phone,
    /// `Fixture::use_keys`, on the same data).
    pub key_slots: usize,
    /// With `node_processes` and shards: each node's worker processes
    /// (both nodes have as many; bank worker `w` serves platform worker
    /// `w`), one run per entry for each size (0: no workers, each node runs
    /// its shards itself), so the counts compare within one bench.
    pub workers: Vec<u32>,
}

/// One phase of one node.
#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    /// `bank` or `platform`.
    pub node: String,
    /// The phase (shown and written as its label: `join`, `aggregate`,
    /// or `join: ...` / `aggregate: ...` for a part).
    pub phase: NodePhase,
    /// Wall time, seconds.
    pub seconds: f64,
}

/// Traffic and exchanges of one step (the join, or the query).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Traffic {
    /// UDP payload bytes platform → bank (QUIC packets, headers and
    /// encryption included).
    pub platform_to_bank_bytes: u64,
    /// UDP payload bytes bank → platform.
    pub bank_to_platform_bytes: u64,
    /// Request/response exchanges the platform started with the bank
    /// (offer/accept, setup/answer, and each streamed phase): each costs at
    /// least one round trip.
    pub round_trips: u64,
    /// Times the platform's pipelines had sent and then had to wait for the
    /// bank before going on.
    pub stalls: u64,
    /// CPU time of the whole process (both nodes, all threads), seconds.
    pub cpu_seconds: f64,
}

/// One size's figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Bank customers and platform users.
    pub rows: usize,
    /// Key slots per bank row (1: e-mail; 2: e-mail or phone).
    pub key_slots: usize,
    /// Shards both nodes split their identifiers into (1: no split).
    pub shards: u32,
    /// Each node's worker processes (0: none).
    pub workers: u32,
    /// Which repetition of this size (from 1).
    pub run: usize,
    /// Share of the bank's customers the platform also has.
    pub overlap: f64,
    /// Merchant categories in the data.
    pub categories: usize,
    /// Cells (words per row) of the `spend_by_category` query.
    pub query_cells: usize,
    /// Bytes of one row's masked cells in that query, packed at the cells'
    /// share widths (`8 · query_cells` at 64 bits a cell).
    pub query_row_bytes: usize,
    /// Join wall time (seconds), as the platform measured it.
    pub join_seconds: f64,
    /// The curve bound (seconds): hash-to-group and scalar multiplication for
    /// each side's own identifiers, decompression and scalar multiplication
    /// for each side's peer points, each over all cores, in this run.
    pub bound_seconds: f64,
    /// `join_seconds / bound_seconds`.
    pub ratio: f64,
    /// The parts of the bound.
    pub bound_parts: Vec<(String, f64)>,
    /// The reference (seconds): the same curve work one point at a time
    /// through curve25519-dalek's single-point API (hash, multiply,
    /// compress each point on its own; decompress, multiply, compress),
    /// over all cores, in this run.
    pub reference_seconds: f64,
    /// `bound_seconds / reference_seconds`: what the join's batched curve
    /// code gains over the single-point API.
    pub bound_over_reference: f64,
    /// The parts of the reference.
    pub reference_parts: Vec<(String, f64)>,
    /// The scalar-multiplication backend curve25519-dalek chose at run
    /// time (`AVX-512 IFMA`, `AVX2` or `serial`).
    pub curve_backend: String,
    /// Which code did the join's curve work (`CurveEngine::name`).
    pub curve_engine: String,
    /// Wall time of `overlap` (join included) as the analyst saw it.
    pub overlap_seconds: f64,
    /// Wall time of `spend_by_category` on the cached join as the analyst
    /// saw it (both nodes' work, noise and the analyst's reconstruction):
    /// the median of `query_runs`.
    pub query_seconds: f64,
    /// The wall time of each run of that query, in order
    /// (`BenchOptions::queries` of them).
    pub query_runs: Vec<f64>,
    /// The join, run by the `overlap` query (whose own aggregate of a few
    /// cells is included): traffic, exchanges, CPU.
    pub join: Traffic,
    /// `spend_by_category` on the cached join: traffic, exchanges, CPU.
    pub query: Traffic,
    /// UDP bytes platform → bank over the whole run.
    pub platform_to_bank_bytes: u64,
    /// UDP bytes bank → platform over the whole run.
    pub bank_to_platform_bytes: u64,
    /// Peak live heap of the bank node's threads, bytes (0 when the binary
    /// does not count allocations, as in tests).
    pub peak_heap_bank_bytes: u64,
    /// Peak live heap of the platform node's threads, bytes.
    pub peak_heap_platform_bytes: u64,
    /// Peak live heap of everything else (the bench's own copy of the
    /// synthetic data, the analyst, rayon workers), bytes.
    pub peak_heap_other_bytes: u64,
    /// Peak resident memory of the whole process so far, KiB.
    pub peak_rss_kib: u64,
    /// With nodes as processes: the bank's and the platform's own peak
    /// resident memory (VmHWM), KiB.
    pub node_peak_rss_kib: Option<(u64, u64)>,
    /// With nodes as processes: seconds from starting both until both
    /// listen (loading, and splitting into shard files when sharded).
    pub node_start_seconds: Option<f64>,
    /// Both nodes' phases of the join and of the query.
    pub phases: Vec<Phase>,
    /// Emulated round-trip time (ms), if any.
    pub rtt_ms: Option<u64>,
    /// Emulated bandwidth (Mbit/s), if any.
    pub bandwidth_mbit: Option<u64>,
    /// With a bandwidth: the larger direction's bytes during the join
    /// divided by the bandwidth, seconds.
    pub transfer_bound_seconds: Option<f64>,
    /// `join_seconds / max(bound_seconds, transfer_bound_seconds)`.
    pub network_ratio: Option<f64>,
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let out = f();
    (out, t.elapsed().as_secs_f64())
}

/// The curve bound for one join of `holder` and `matcher` identifiers (plus
/// `dummies` dummy rows), measured now.
///
/// # Errors
/// When the OS generator fails.
pub fn curve_bound(holder: &[Vec<u8>], matcher: &[Vec<u8>], dummies: usize) -> Result<Vec<(String, f64)>, NodeError> {
    let mut rng = session_rng()?;
    let h2g = HashToGroup::for_collaboration("bench").map_err(NodeError::Crypto)?;
    let kb = SecretScalar::random(&mut rng);
    let kp = SecretScalar::random(&mut rng);
    let (rows, t_holder_own) = timed(|| hash_mul_compress(&h2g, holder, &kb));
    let (tokens, t_matcher_own) = timed(|| hash_mul_compress(&h2g, matcher, &kp));
    let (_, t_holder_peer) = timed(|| decode_mul_compress(&tokens, &kb));
    let mut peer_rows = rows;
    // Dummy rows cost what rows do: as many as asked for, even past the rows.
    let extra: Vec<_> = peer_rows.iter().cycle().take(dummies).copied().collect();
    peer_rows.extend(extra);
    let (_, t_matcher_peer) = timed(|| decode_mul_compress(&peer_rows, &kp));
    Ok(vec![
        ("holder: hash-to-group + mul of own ids".into(), t_holder_own),
        ("matcher: hash-to-group + mul of own ids".into(), t_matcher_own),
        ("holder: decompress + mul of matcher tokens".into(), t_holder_peer),
        ("matcher: decompress + mul of holder rows".into(), t_matcher_peer),
    ])
}

/// The reference for the same join: the same curve work one point at a
/// time through curve25519-dalek's own API (no batched compression, no
/// code of ours between the calls), parallel over points on all cores.
///
/// # Errors
/// When the OS generator fails.
pub fn curve_reference(
    holder: &[Vec<u8>],
    matcher: &[Vec<u8>],
    dummies: usize,
) -> Result<Vec<(String, f64)>, NodeError> {
    use curve25519_dalek::ristretto::CompressedRistretto;
    use rayon::prelude::*;
    let mut rng = session_rng()?;
    let h2g = HashToGroup::for_collaboration("bench").map_err(NodeError::Crypto)?;
    let kb = SecretScalar::random(&mut rng);
    let kp = SecretScalar::random(&mut rng);
    let own = |ids: &[Vec<u8>], k: &SecretScalar| -> Vec<CompressedRistretto> {
        ids.par_iter().map(|x| (k.expose() * h2g.hash(x)).compress()).collect()
    };
    let peer = |points: &[CompressedRistretto], k: &SecretScalar| -> Vec<CompressedRistretto> {
        points
            .par_iter()
            .filter_map(|c| c.decompress().map(|p| (k.expose() * p).compress()))
            .collect()
    };
    let (rows, t_holder_own) = timed(|| own(holder, &kb));
    let (tokens, t_matcher_own) = timed(|| own(matcher, &kp));
    let (n, t_holder_peer) = timed(|| peer(&tokens, &kb));
    let mut peer_rows = rows;
    // Dummy rows cost what rows do: as many as asked for, even past the rows.
    let extra: Vec<_> = peer_rows.iter().cycle().take(dummies).copied().collect();
    peer_rows.extend(extra);
    let (m, t_matcher_peer) = timed(|| peer(&peer_rows, &kp));
    if n.len() != tokens.len() || m.len() != peer_rows.len() {
        return Err(NodeError::Internal("a point of the reference did not decompress"));
    }
    Ok(vec![
        ("holder: hash-to-group + mul of own ids".into(), t_holder_own),
        ("matcher: hash-to-group + mul of own ids".into(), t_matcher_own),
        ("holder: decompress + mul of matcher tokens".into(), t_holder_peer),
        ("matcher: decompress + mul of holder rows".into(), t_matcher_peer),
    ])
}

/// The points of the bank's rows and dummy rows the bound counts: with one
/// key slot its identifiers and `shards` x `D_max` dummy rows of the demo
/// configuration's cardinality noise (ε = 0.5, δ = 10^-6); with `K > 1`,
/// `K` points per customer (its keys, and a padding input for each it
/// lacks, hashed the same way) and `K` per dummy row, `D_max` of the
/// `K`-slot noise per match pattern of the ungrouped join (the timed join
/// is the overlap query's).
fn bank_points(
    mut keys: Vec<Vec<u8>>,
    customers: usize,
    key_slots: usize,
    shards: u32,
) -> Result<(Vec<Vec<u8>>, usize), NodeError> {
    let k = key_slots.max(1);
    if k == 1 {
        let d_max = cleanroom_crypto::dp::ShiftedTruncatedLaplace::new(1, 2, 1_000_000)
            .map_err(NodeError::Crypto)?
            .d_max() as usize;
        return Ok((keys, d_max * shards.max(1) as usize));
    }
    let d_max = cleanroom_sim::simulate::multi_key_noise(k as u64)
        .map_err(NodeError::Crypto)?
        .d_max() as usize;
    let patterns = cleanroom_protocol::join::match_patterns(1, k)
        .map_err(|_| NodeError::Internal("match patterns"))?
        .len();
    let pads = (customers * k).saturating_sub(keys.len());
    // Any distinct inputs cost the same to hash.
    keys.extend((0..pads).map(|i| format!("bench-pad-{i:016}").into_bytes()));
    Ok((keys, patterns * d_max * k))
}

/// The curve bound and the reference for one join of the bank's points and
/// the platform's identifiers (`ids` gives them, and the dummy points, see
/// [`bank_points`]), on a blocking thread.
async fn bound_and_reference(
    ids: impl FnOnce() -> Result<(Vec<Vec<u8>>, Vec<Vec<u8>>, usize), NodeError> + Send + 'static,
) -> Result<(Vec<(String, f64)>, Vec<(String, f64)>), NodeError> {
    tokio::task::spawn_blocking(move || {
        let (holder, matcher, dummies) = ids()?;
        Ok::<_, NodeError>((
            curve_bound(&holder, &matcher, dummies)?,
            curve_reference(&holder, &matcher, dummies)?,
        ))
    })
    .await
    .map_err(|_| NodeError::Internal("bound task failed"))?
}

/// The timed query's cells and the bytes of one row's masked cells.
fn query_shape(fixture: &Fixture, template: &str, params: &[(String, String)]) -> Result<(usize, usize), NodeError> {
    let plan = fixture.plan(template, params)?;
    let row_bytes = plan
        .batch_bits()
        .iter()
        .map(|b| usize::from(*b))
        .sum::<usize>()
        .div_ceil(8);
    Ok((plan.width(), row_bytes))
}

/// Steps reported to the progress callback per run.
pub const STEPS_PER_RUN: u64 = 5;

/// The median (the mean of the middle two for an even count; 0 for none).
fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A node started on its own runtime, whose threads count their heap for
/// the node's tag.
struct Running {
    node: cleanroom_node::server::Node,
    runtime: tokio::runtime::Runtime,
}

impl Running {
    async fn stop(self) {
        self.node.shutdown().await;
        self.runtime.shutdown_background();
    }
}

async fn start_on_own_runtime(
    fixture: &Arc<Fixture>,
    tag: Tag,
    bank: Option<std::net::SocketAddr>,
) -> Result<Running, NodeError> {
    let runtime = memory::node_runtime(tag, 2).map_err(|source| NodeError::Io {
        what: "starting a node's runtime",
        source,
    })?;
    let f = fixture.clone();
    let node = runtime
        .spawn(async move {
            match bank {
                None => f.start_bank().await,
                Some(addr) => f.start_platform(addr).await,
            }
        })
        .await
        .map_err(|_| NodeError::Internal("node start task failed"))??;
    Ok(Running { node, runtime })
}

fn node_phases(node: &str, phases: impl IntoIterator<Item = (NodePhase, f64)>) -> impl Iterator<Item = Phase> {
    phases.into_iter().map(move |(phase, seconds)| Phase {
        node: node.to_string(),
        phase,
        seconds,
    })
}

/// A phase as the analyst's result reports it (node, phase, seconds).
fn reported_phase((node, phase, seconds): &(String, NodePhase, f64)) -> Phase {
    Phase {
        node: node.clone(),
        phase: phase.clone(),
        seconds: *seconds,
    }
}

/// Runs the benchmark for each size; `progress(done, total, message)` is
/// called at each step.
///
/// # Errors
/// Any node or query failure.
pub async fn run(opts: &BenchOptions, mut progress: impl FnMut(u64, u64, &str)) -> Result<Vec<BenchRow>, LabError> {
    memory::enable();
    let mut out = Vec::new();
    let workers = if opts.workers.is_empty() {
        vec![0]
    } else {
        opts.workers.clone()
    };
    let runs: Vec<(usize, usize, u32)> = opts
        .sizes
        .iter()
        .flat_map(|r| (1..=opts.repeat.max(1)).map(move |k| (*r, k)))
        .flat_map(|(r, k)| workers.iter().map(move |w| (r, k, *w)))
        .collect();
    let total = runs.len() as u64 * STEPS_PER_RUN;
    let path = opts.path;
    for (i, (rows, run, workers)) in runs.into_iter().enumerate() {
        let step = i as u64 * STEPS_PER_RUN;
        progress(step, total, &format!("{rows} rows: generating data"));
        let dir = tempfile::tempdir().map_err(|source| NodeError::Io {
            what: "making a temporary directory",
            source,
        })?;
        let mut fixture = Fixture::create_with(dir.path(), rows, opts.seed, &["alice"], opts.overlap, opts.categories)?;
        if opts.shards > 1 {
            let section = format!(
                "[shards]\ncount = {}\nkey = \"certs/shard.key\"\n\n[limits]",
                opts.shards
            );
            fixture.edit_configs(&[("[limits]", section.as_str())])?;
        }
        if opts.key_slots > 1 {
            fixture.use_keys(0.0, opts.seed)?;
        }
        // A join of tens of millions of rows takes minutes: the nodes' own
        // query timeout (120 s by default) would end it.
        fixture.edit_configs(&[("[limits]\n", "[limits]\nquery_timeout_secs = 7200\n")])?;
        if workers > 0 {
            if opts.node_processes.is_none() || opts.shards < 2 {
                return Err(LabError::Bench(
                    "workers run as processes, over shards: use them with node processes and shards".into(),
                ));
            }
            let addrs = (0..workers).map(|_| free_address()).collect::<Result<Vec<_>, _>>()?;
            fixture.use_workers(&addrs)?;
            // The bank's listen address is chosen with the processes'
            // configs; its workers reach it there.
            let bank_addrs = (0..workers).map(|_| free_address()).collect::<Result<Vec<_>, _>>()?;
            fixture.use_bank_workers(free_address()?, &bank_addrs)?;
        }
        if let Some(exe) = &opts.node_processes {
            progress(step + 1, total, &format!("{rows} rows: starting node processes"));
            let row = run_processes(opts, exe, &fixture, rows, run, workers, |k, m| {
                progress(step + k, total, &format!("{rows} rows: {m}"));
            })
            .await?;
            out.push(row);
            progress(step + 5, total, &format!("{rows} rows: done"));
            continue;
        }
        let fixture = Arc::new(fixture);
        progress(step + 1, total, &format!("{rows} rows: starting nodes"));
        memory::reset_peaks();
        let bank = start_on_own_runtime(&fixture, Tag::Bank, None).await?;
        let bank_addr = bank.node.local_addr()?;
        // With an emulated path, the platform reaches the bank through the relay.
        let relay = match path {
            Some(p) => Some(crate::relay::Relay::start(bank_addr, p).await?),
            None => None,
        };
        let platform = start_on_own_runtime(
            &fixture,
            Tag::Platform,
            Some(relay.as_ref().map_or(bank_addr, crate::relay::Relay::addr)),
        )
        .await?;
        let analyst = Analyst::new(&fixture.analyst("alice", bank_addr, platform.node.local_addr()?)?)?;
        let timeout = Duration::from_secs(3600);

        progress(step + 2, total, &format!("{rows} rows: join (the overlap query)"));
        let (tx0, rx0) = platform.node.peer_bytes().await;
        let (ex0, st0) = platform.node.exchanges();
        let cpu0 = memory::process_cpu_seconds();
        let t = Instant::now();
        let overlap = analyst.query("overlap", &[], new_query_id()?, timeout).await?;
        let overlap_seconds = t.elapsed().as_secs_f64();
        let cpu1 = memory::process_cpu_seconds();
        let (tx1, rx1) = platform.node.peer_bytes().await;
        let (ex1, st1) = platform.node.exchanges();
        let join_seconds = overlap
            .timings
            .iter()
            .find(|(node, phase, _)| node == "platform" && *phase == NodePhase::Join)
            .map_or(overlap_seconds, |(_, _, s)| *s);
        let mut phases: Vec<Phase> = node_phases("bank", bank.node.last_join_phases())
            .chain(node_phases("platform", platform.node.last_join_phases()))
            .collect();

        progress(
            step + 3,
            total,
            &format!("{rows} rows: spend_by_category on the cached join"),
        );
        let (template, params) = demo_queries().remove(1);
        let t = Instant::now();
        let query = analyst.query(template, &params, new_query_id()?, timeout).await?;
        let query_seconds = t.elapsed().as_secs_f64();
        let cpu2 = memory::process_cpu_seconds();
        let (tx2, rx2) = platform.node.peer_bytes().await;
        let (ex2, st2) = platform.node.exchanges();
        let mut query_runs = vec![query_seconds];
        for _ in 1..opts.queries.max(1) {
            let t = Instant::now();
            analyst.query(template, &params, new_query_id()?, timeout).await?;
            query_runs.push(t.elapsed().as_secs_f64());
        }
        let query_seconds = median(&query_runs);
        phases.extend(
            query
                .timings
                .iter()
                .filter(|(_, phase, _)| phase.is_aggregate())
                .map(reported_phase),
        );
        let peak_heap_bank_bytes = memory::peak_bytes(Tag::Bank);
        let peak_heap_platform_bytes = memory::peak_bytes(Tag::Platform);
        let peak_heap_other_bytes = memory::peak_bytes(Tag::Shared);
        let holder: Vec<Vec<u8>> = bank.node.holder_ids()?;
        let customers = bank.node.holder_customers();
        let matcher: Vec<Vec<u8>> = platform.node.matcher_ids()?;
        platform.stop().await;
        bank.stop().await;
        drop(relay);

        progress(
            step + 4,
            total,
            &format!("{rows} rows: timing the curve bound and the reference"),
        );
        let (shards, key_slots) = (opts.shards, opts.key_slots);
        let (parts, reference_parts) = bound_and_reference(move || {
            let (holder, dummies) = bank_points(holder, customers, key_slots, shards)?;
            Ok((holder, matcher, dummies))
        })
        .await?;
        let bound_seconds: f64 = parts.iter().map(|(_, s)| s).sum();
        let reference_seconds: f64 = reference_parts.iter().map(|(_, s)| s).sum();
        #[allow(clippy::cast_precision_loss)]
        let transfer_bound_seconds = path
            .and_then(|p| p.bits_per_second)
            .map(|bps| tx1.saturating_sub(tx0).max(rx1.saturating_sub(rx0)) as f64 * 8.0 / bps as f64);
        let network_ratio = transfer_bound_seconds.map(|t| join_seconds / t.max(bound_seconds).max(1e-9));
        let (query_cells, query_row_bytes) = query_shape(&fixture, template, &params)?;
        out.push(BenchRow {
            rows,
            key_slots: opts.key_slots.max(1),
            shards: opts.shards.max(1),
            workers,
            run,
            overlap: opts.overlap,
            categories: opts.categories,
            query_cells,
            query_row_bytes,
            join_seconds,
            bound_seconds,
            ratio: join_seconds / bound_seconds.max(1e-9),
            bound_parts: parts,
            reference_seconds,
            bound_over_reference: bound_seconds / reference_seconds.max(1e-9),
            reference_parts,
            curve_backend: CurveBackend::selected().name().to_string(),
            curve_engine: CurveEngine::selected().name().to_string(),
            overlap_seconds,
            query_seconds,
            query_runs,
            join: Traffic {
                platform_to_bank_bytes: tx1.saturating_sub(tx0),
                bank_to_platform_bytes: rx1.saturating_sub(rx0),
                round_trips: ex1.saturating_sub(ex0),
                stalls: st1.saturating_sub(st0),
                cpu_seconds: cpu1 - cpu0,
            },
            query: Traffic {
                platform_to_bank_bytes: tx2.saturating_sub(tx1),
                bank_to_platform_bytes: rx2.saturating_sub(rx1),
                round_trips: ex2.saturating_sub(ex1),
                stalls: st2.saturating_sub(st1),
                cpu_seconds: cpu2 - cpu1,
            },
            platform_to_bank_bytes: tx2,
            bank_to_platform_bytes: rx2,
            peak_heap_bank_bytes,
            peak_heap_platform_bytes,
            peak_heap_other_bytes,
            peak_rss_kib: peak_rss_kib(),
            node_peak_rss_kib: None,
            node_start_seconds: None,
            phases,
            rtt_ms: path.map(|p| p.rtt.as_millis() as u64),
            bandwidth_mbit: path.and_then(|p| p.bits_per_second).map(|b| b / 1_000_000),
            transfer_bound_seconds,
            network_ratio,
        });
        progress(step + 5, total, &format!("{rows} rows: done"));
    }
    Ok(out)
}

/// A free UDP port on loopback (bound, then released).
fn free_address() -> Result<std::net::SocketAddr, LabError> {
    let io = |source| NodeError::Io {
        what: "finding a free port",
        source,
    };
    let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io)?;
    Ok(s.local_addr().map_err(io)?)
}

/// A node run as its own `cleanroom node --config` process (or one of its
/// workers, `cleanroom worker --index w --config`).
struct NodeProcess {
    child: std::process::Child,
    log: std::path::PathBuf,
    /// What its log says once it listens.
    ready: &'static str,
}

impl NodeProcess {
    fn start(exe: &Path, config: &Path, log: &Path) -> Result<Self, LabError> {
        Self::start_with(exe, &["node".to_string()], config, log, "node listening")
    }

    fn start_worker(exe: &Path, w: u32, config: &Path, log: &Path) -> Result<Self, LabError> {
        let args = ["worker".to_string(), "--index".to_string(), w.to_string()];
        Self::start_with(exe, &args, config, log, "worker listening")
    }

    fn start_with(
        exe: &Path,
        args: &[String],
        config: &Path,
        log: &Path,
        ready: &'static str,
    ) -> Result<Self, LabError> {
        let io = |what, source| NodeError::Io { what, source };
        let err = std::fs::File::create(log).map_err(|e| io("creating a node's log", e))?;
        let child = std::process::Command::new(exe)
            .args(args)
            .arg("--config")
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| io("starting a node process", e))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
            ready,
        })
    }

    /// Waits until the node's log says it listens (it loads its input
    /// first), or fails when it exits.
    async fn listening(&mut self) -> Result<(), LabError> {
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains(self.ready) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(LabError::Bench(format!(
                    "a node process exited ({status}) before listening: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn status_kib(&self, field: &str) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse().ok()))
            })
            .unwrap_or(0)
    }

    /// The shard count the node logged when its data was loaded.
    fn logged_shards(&self) -> Option<u32> {
        let log = std::fs::read_to_string(&self.log).ok()?;
        let line = log.lines().find(|l| l.contains("\"data loaded\""))?;
        let (_, rest) = line.split_once("\"shards\":")?;
        rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    }

    /// User and system CPU time of all its threads so far, seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // After the command name (in parentheses) come fields 3 (state)
        // on; utime and stime are fields 14 and 15 (proc(5)).
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = after.split_whitespace().collect();
        let field = |n: usize| f.get(n - 3).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        let ticks = rustix::param::clock_ticks_per_second().max(1);
        #[allow(clippy::cast_precision_loss)]
        let s = (field(14) + field(15)) as f64 / ticks as f64;
        s
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One run with each node as its own process: the join and query times,
/// both processes' CPU and peak RSS; the bound from the nodes' identifiers
/// read from their input files here afterwards.
async fn run_processes(
    opts: &BenchOptions,
    exe: &Path,
    fixture: &Fixture,
    rows: usize,
    run: usize,
    n_workers: u32,
    mut progress: impl FnMut(u64, &str),
) -> Result<BenchRow, LabError> {
    let (bank_addr, platform_addr) = (free_address()?, free_address()?);
    fixture.write_process_configs(bank_addr, platform_addr)?;
    let t_start = Instant::now();
    let mut bank = NodeProcess::start(exe, &fixture.bank_config, &fixture.dir.join("bank.log"))?;
    let mut bank_workers = (0..n_workers)
        .map(|w| {
            let log = fixture.dir.join(format!("bank-worker-{w}.log"));
            NodeProcess::start_worker(exe, w, &fixture.bank_config, &log)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut workers = (0..n_workers)
        .map(|w| {
            let log = fixture.dir.join(format!("platform-worker-{w}.log"));
            NodeProcess::start_worker(exe, w, &fixture.platform_config, &log)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut platform = NodeProcess::start(exe, &fixture.platform_config, &fixture.dir.join("platform.log"))?;
    bank.listening().await?;
    for w in bank_workers.iter_mut().chain(workers.iter_mut()) {
        w.listening().await?;
    }
    platform.listening().await?;
    let start_seconds = t_start.elapsed().as_secs_f64();
    let shards = opts.shards.max(1);
    for (node, p) in [("bank", &bank), ("platform", &platform)] {
        if p.logged_shards() != Some(shards) {
            return Err(LabError::Bench(format!(
                "the {node} process did not log its data split into {shards} shards"
            )));
        }
    }
    let analyst = Analyst::new(&fixture.analyst("alice", bank_addr, platform_addr)?)?;
    // Listening is not yet introduced: the platform shows the bank its
    // signed templates when it connects, just after its start.
    let ready = Instant::now();
    loop {
        match analyst.templates().await {
            Ok(t) if !t.is_empty() => break,
            _ if ready.elapsed() < Duration::from_secs(120) => tokio::time::sleep(Duration::from_millis(250)).await,
            Ok(_) | Err(_) => {
                return Err(LabError::Bench(
                    "the nodes did not show each other their templates within 120 s of listening".into(),
                ));
            }
        }
    }
    let timeout = Duration::from_secs(3600);
    progress(
        2,
        &format!("join (the overlap query); the nodes took {start_seconds:.1} s to start"),
    );
    let cpu = |b: &NodeProcess, p: &NodeProcess| {
        b.cpu_seconds()
            + p.cpu_seconds()
            + workers
                .iter()
                .chain(bank_workers.iter())
                .map(NodeProcess::cpu_seconds)
                .sum::<f64>()
    };
    let cpu0 = cpu(&bank, &platform);
    let t = Instant::now();
    let overlap = analyst.query("overlap", &[], new_query_id()?, timeout).await?;
    let overlap_seconds = t.elapsed().as_secs_f64();
    let cpu1 = cpu(&bank, &platform);
    let join_seconds = overlap
        .timings
        .iter()
        .find(|(node, phase, _)| node == "platform" && *phase == NodePhase::Join)
        .map_or(overlap_seconds, |(_, _, s)| *s);
    let mut phases: Vec<Phase> = overlap.timings.iter().map(reported_phase).collect();
    progress(3, "spend_by_category on the cached join");
    let (template, params) = demo_queries().remove(1);
    let mut query_runs = Vec::new();
    for k in 0..opts.queries.max(1) {
        let t = Instant::now();
        let q = analyst.query(template, &params, new_query_id()?, timeout).await?;
        query_runs.push(t.elapsed().as_secs_f64());
        if k == 0 {
            phases.extend(
                q.timings
                    .iter()
                    .filter(|(_, phase, _)| phase.is_aggregate())
                    .map(reported_phase),
            );
        }
    }
    let cpu2 = cpu(&bank, &platform);
    // Each node's processes: its coordinator and its workers (the sum of
    // their peaks, an upper bound of their sum's peak).
    let peaks = |c: &NodeProcess, ws: &[NodeProcess]| {
        c.status_kib("VmHWM:") + ws.iter().map(|w| w.status_kib("VmHWM:")).sum::<u64>()
    };
    let rss = (peaks(&bank, &bank_workers), peaks(&platform, &workers));
    drop(analyst);
    drop(platform);
    drop(workers);
    drop(bank_workers);
    drop(bank);

    progress(4, "timing the curve bound and the reference");
    // The nodes' identifiers, loaded here as the unsharded nodes load them.
    let (bank_config, platform_config) = (fixture.bank_config.clone(), fixture.platform_config.clone());
    let (shards, key_slots) = (opts.shards, opts.key_slots);
    let (parts, reference_parts) = bound_and_reference(move || {
        let load = |p: &Path| cleanroom_node::config::NodeConfig::load(p);
        let (b, p) = (load(&bank_config)?, load(&platform_config)?);
        let h = cleanroom_node::data::load_holder(&b.data, &b.collaboration)?;
        let (holder, dummies) = bank_points(h.ids.to_vec(), h.customers(), key_slots, shards)?;
        Ok((
            holder,
            cleanroom_node::data::load_matcher(&p.data, &p.collaboration)?
                .ids
                .to_vec(),
            dummies,
        ))
    })
    .await?;
    let bound_seconds: f64 = parts.iter().map(|(_, s)| s).sum();
    let reference_seconds: f64 = reference_parts.iter().map(|(_, s)| s).sum();
    let (query_cells, query_row_bytes) = query_shape(fixture, template, &params)?;
    let traffic = |cpu_seconds: f64| Traffic {
        cpu_seconds,
        ..Traffic::default()
    };
    Ok(BenchRow {
        rows,
        key_slots: opts.key_slots.max(1),
        shards: opts.shards.max(1),
        workers: n_workers,
        run,
        overlap: opts.overlap,
        categories: opts.categories,
        query_cells,
        query_row_bytes,
        join_seconds,
        bound_seconds,
        ratio: join_seconds / bound_seconds.max(1e-9),
        bound_parts: parts,
        reference_seconds,
        bound_over_reference: bound_seconds / reference_seconds.max(1e-9),
        reference_parts,
        curve_backend: CurveBackend::selected().name().to_string(),
        curve_engine: CurveEngine::selected().name().to_string(),
        overlap_seconds,
        query_seconds: median(&query_runs),
        query_runs,
        join: traffic(cpu1 - cpu0),
        query: traffic(cpu2 - cpu1),
        platform_to_bank_bytes: 0,
        bank_to_platform_bytes: 0,
        peak_heap_bank_bytes: 0,
        peak_heap_platform_bytes: 0,
        peak_heap_other_bytes: 0,
        peak_rss_kib: peak_rss_kib(),
        node_peak_rss_kib: Some(rss),
        node_start_seconds: Some(start_seconds),
        phases,
        rtt_ms: None,
        bandwidth_mbit: None,
        transfer_bound_seconds: None,
        network_ratio: None,
    })
}

/// Writes an SVG plot of latency against set size: the join's wall time,
/// the curve bound beside it, and the query on the cached join, each run a
/// point and a line through the means per size; log-log axes.
///
/// # Errors
/// [`LabError::Plot`] when the file cannot be written.
pub fn plot(rows: &[BenchRow], path: &Path) -> Result<(), LabError> {
    use plotters::prelude::*;
    let err = |what: String| LabError::Plot {
        path: path.display().to_string(),
        what,
    };
    let mut sizes: Vec<usize> = rows.iter().map(|r| r.rows).collect();
    sizes.sort_unstable();
    sizes.dedup();
    #[allow(clippy::cast_precision_loss)]
    let mean_by_size = |f: &dyn Fn(&BenchRow) -> f64| -> Vec<(f64, f64)> {
        sizes
            .iter()
            .map(|n| {
                let v: Vec<f64> = rows.iter().filter(|r| r.rows == *n).map(f).collect();
                (*n as f64, v.iter().sum::<f64>() / v.len().max(1) as f64)
            })
            .collect()
    };
    type Series<'a> = (&'a str, RGBColor, &'a dyn Fn(&BenchRow) -> f64);
    let series: [Series; 3] = [
        ("join (wall)", RGBColor(200, 40, 40), &|r: &BenchRow| r.join_seconds),
        ("curve bound (same run)", RGBColor(40, 80, 200), &|r: &BenchRow| {
            r.bound_seconds
        }),
        (
            "spend_by_category on the cached join",
            RGBColor(30, 140, 60),
            &|r: &BenchRow| r.query_seconds,
        ),
    ];
    #[allow(clippy::cast_precision_loss)]
    let (x_lo, x_hi) = (
        sizes.first().map_or(1.0, |n| *n as f64 / 1.5).max(1.0),
        sizes.last().map_or(10.0, |n| *n as f64 * 1.5),
    );
    let all: Vec<f64> = rows
        .iter()
        .flat_map(|r| [r.join_seconds, r.bound_seconds, r.query_seconds])
        .filter(|v| *v > 0.0)
        .collect();
    let y_lo = all.iter().copied().fold(f64::INFINITY, f64::min).min(1.0) / 2.0;
    let y_hi = all.iter().copied().fold(0.0, f64::max).max(y_lo * 4.0) * 2.0;
    let root = SVGBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let caption = match rows.first().and_then(|r| r.rtt_ms.zip(r.bandwidth_mbit)) {
        Some((rtt, bw)) => format!("cleanroom bench: latency against set size ({rtt} ms RTT, {bw} Mbit/s)"),
        None => "cleanroom bench: latency against set size (loopback)".to_string(),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (y_lo.max(1e-3)..y_hi).log_scale())
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("bank customers = platform users")
        .y_desc("seconds")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (name, color, f) in series {
        chart
            .draw_series(LineSeries::new(mean_by_size(f), color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2)));
        #[allow(clippy::cast_precision_loss)]
        chart
            .draw_series(
                rows.iter()
                    .map(|r| Circle::new((r.rows as f64, f(r)), 4, color.filled())),
            )
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
