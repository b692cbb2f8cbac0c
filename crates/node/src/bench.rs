//! `cleanroom bench` (first part): both nodes in one process over real QUIC
//! with mutual TLS on loopback; for each size, the join's wall time against
//! the **bound** — the curve operations the join needs, timed on this
//! machine in the same run with the same parallel code — and one query on
//! the cached join, bytes each way and peak memory.

use std::time::{Duration, Instant};

use cleanroom_crypto::h2g::HashToGroup;
use cleanroom_crypto::keys::SecretScalar;
use cleanroom_crypto::point::{decode_mul_compress, hash_mul_compress};
use cleanroom_crypto::rng::session_rng;
use serde::Serialize;

use crate::NodeError;
use crate::client::{Analyst, new_query_id};
use crate::demo::{Fixture, demo_queries};

/// One size's figures.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    /// Bank customers and platform users.
    pub rows: usize,
    /// Which repetition of this size (from 1).
    pub run: usize,
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
    /// Wall time of `overlap` (join included) as the analyst saw it.
    pub overlap_seconds: f64,
    /// Wall time of `spend_by_category` (51 cells) on the cached join.
    pub query_seconds: f64,
    /// UDP bytes platform → bank over the whole run.
    pub platform_to_bank_bytes: u64,
    /// UDP bytes bank → platform over the whole run.
    pub bank_to_platform_bytes: u64,
    /// Peak resident memory of this process so far (both nodes), KiB.
    pub peak_rss_kib: u64,
    /// The platform's phases of the join (`overlap`) and of the
    /// `spend_by_category` aggregate, seconds.
    pub phases: Vec<(String, f64)>,
    /// Emulated round-trip time (ms), if any.
    pub rtt_ms: Option<u64>,
    /// Emulated bandwidth (Mbit/s), if any.
    pub bandwidth_mbit: Option<u64>,
    /// With a bandwidth: the larger direction's bytes during the join
    /// (`overlap`) divided by the bandwidth, seconds.
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
    peer_rows.extend(peer_rows.clone().into_iter().take(dummies));
    let (_, t_matcher_peer) = timed(|| decode_mul_compress(&peer_rows, &kp));
    Ok(vec![
        ("holder: hash-to-group + mul of own ids".into(), t_holder_own),
        ("matcher: hash-to-group + mul of own ids".into(), t_matcher_own),
        ("holder: decompress + mul of matcher tokens".into(), t_holder_peer),
        ("matcher: decompress + mul of holder rows".into(), t_matcher_peer),
    ])
}

/// Runs the benchmark for each size.
///
/// # Errors
/// Any node or query failure.
pub async fn run(
    sizes: &[usize],
    seed: u64,
    path: Option<crate::relay::Path>,
    repeat: usize,
    mut progress: impl FnMut(&str),
) -> Result<Vec<BenchRow>, NodeError> {
    let mut out = Vec::new();
    let runs: Vec<(usize, usize)> = sizes
        .iter()
        .flat_map(|r| (1..=repeat.max(1)).map(move |k| (*r, k)))
        .collect();
    for (rows, run) in runs {
        progress(&format!("{rows} rows: generating data"));
        let dir = tempfile::tempdir().map_err(|e| NodeError::State(e.to_string()))?;
        let fixture = Fixture::create(dir.path(), rows, seed, &["alice"])?;
        progress(&format!("{rows} rows: starting nodes"));
        let bank = fixture.start_bank().await?;
        // With an emulated path, the platform reaches the bank through the relay.
        let relay = match path {
            Some(p) => Some(crate::relay::Relay::start(bank.local_addr()?, p).await?),
            None => None,
        };
        let platform = fixture
            .start_platform(relay.as_ref().map_or(bank.local_addr()?, crate::relay::Relay::addr))
            .await?;
        let analyst = Analyst::new(&fixture.analyst("alice", bank.local_addr()?, platform.local_addr()?)?)?;
        let timeout = Duration::from_secs(3600);
        progress(&format!("{rows} rows: join and overlap"));
        let t = Instant::now();
        let overlap = analyst.query("overlap", &[], new_query_id()?, timeout).await?;
        let overlap_seconds = t.elapsed().as_secs_f64();
        let (join_tx, join_rx) = platform.peer_bytes().await;
        let join_seconds = overlap
            .timings
            .iter()
            .find(|(node, phase, _)| node == "platform" && phase == "join")
            .map_or(overlap_seconds, |(_, _, s)| *s);
        progress(&format!("{rows} rows: spend_by_category on the cached join"));
        let (template, params) = demo_queries().remove(1);
        let t = Instant::now();
        let query = analyst.query(template, &params, new_query_id()?, timeout).await?;
        let query_seconds = t.elapsed().as_secs_f64();
        let phases: Vec<(String, f64)> = overlap
            .timings
            .iter()
            .filter(|(node, phase, _)| node == "platform" && phase.starts_with("join"))
            .chain(
                query
                    .timings
                    .iter()
                    .filter(|(node, phase, _)| node == "platform" && phase.starts_with("aggregate")),
            )
            .map(|(_, phase, s)| (phase.clone(), *s))
            .collect();
        let (tx, rx) = platform.peer_bytes().await;
        platform.shutdown().await;
        bank.shutdown().await;
        progress(&format!("{rows} rows: timing the curve bound"));
        let holder: Vec<Vec<u8>> = bank.holder_ids();
        let matcher: Vec<Vec<u8>> = platform.matcher_ids();
        // The demo configuration's cardinality noise: ε = 0.5, δ = 10^-6.
        let d_max = cleanroom_crypto::dp::ShiftedTruncatedLaplace::new(1, 2, 1_000_000)?.d_max() as usize;
        let parts = tokio::task::spawn_blocking(move || curve_bound(&holder, &matcher, d_max))
            .await
            .map_err(|_| NodeError::Internal("bound task failed"))??;
        let bound_seconds: f64 = parts.iter().map(|(_, s)| s).sum();
        #[allow(clippy::cast_precision_loss)]
        let transfer_bound_seconds = path
            .and_then(|p| p.bits_per_second)
            .map(|bps| join_tx.max(join_rx) as f64 * 8.0 / bps as f64);
        let network_ratio = transfer_bound_seconds.map(|t| join_seconds / t.max(bound_seconds).max(1e-9));
        drop(relay);
        out.push(BenchRow {
            rows,
            run,
            join_seconds,
            bound_seconds,
            ratio: join_seconds / bound_seconds.max(1e-9),
            bound_parts: parts,
            overlap_seconds,
            query_seconds,
            platform_to_bank_bytes: tx,
            bank_to_platform_bytes: rx,
            peak_rss_kib: peak_rss_kib(),
            phases,
            rtt_ms: path.map(|p| p.rtt.as_millis() as u64),
            bandwidth_mbit: path.and_then(|p| p.bits_per_second).map(|b| b / 1_000_000),
            transfer_bound_seconds,
            network_ratio,
        });
    }
    Ok(out)
}
