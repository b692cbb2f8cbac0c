//! `cleanroom simulate`: both parties in memory, no network, no noise. Runs
//! the join and the aggregate `[customers, spend per category, customers per
//! category]` over the intersection and compares the reconstructed shares
//! with a plaintext computation, which must agree exactly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
use cleanroom_crypto::normalize::{IdKind, NormalizationRules};
use cleanroom_crypto::rng::session_rng;
use cleanroom_crypto::shares::Share;
use cleanroom_protocol::aggregate::{HolderAggregate, RowValues};
use cleanroom_protocol::join::{
    DEFAULT_CHUNK_POINTS, HolderJoin, HolderPolicy, JoinParams, MAX_SET_SIZE, MatcherJoin, MatcherPolicy, SetSizeLimits,
};
use serde::Serialize;

use crate::driver::{DriverError, run_aggregate, run_join, shared};
use crate::synth::{SynthConfig, SynthData, generate};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimulateConfig {
    /// Bank customers.
    pub holder_rows: usize,
    /// Platform users.
    pub matcher_rows: usize,
    /// Share of the bank's customers the platform also has.
    pub overlap: f64,
    /// Merchant categories.
    pub categories: usize,
    /// Data seed.
    pub seed: u64,
    /// Points per chunk.
    pub chunk_points: usize,
}

/// Errors of a simulation run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A generated identifier did not normalise (a generator bug).
    #[error("{side} row {row}: identifier does not normalise: {reason}")]
    Normalize {
        /// Which side.
        side: &'static str,
        /// Row number.
        row: usize,
        /// Why.
        reason: cleanroom_crypto::normalize::NormalizeError,
    },
    /// The protocol failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// Parameters or randomness.
    #[error(transparent)]
    Crypto(#[from] cleanroom_crypto::CryptoError),
    /// Bad configuration.
    #[error("{0}")]
    Config(&'static str),
    /// Local protocol input.
    #[error(transparent)]
    Protocol(#[from] cleanroom_protocol::ProtocolError),
}

/// One output cell, computed both ways.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    /// Cell name.
    pub name: String,
    /// Reconstructed from the two shares.
    pub protocol: i64,
    /// Computed in the clear.
    pub plaintext: i64,
}

/// Bytes each way.
#[derive(Clone, Debug, Serialize)]
pub struct Bytes {
    /// Holder to matcher.
    pub holder_to_matcher: u64,
    /// Matcher to holder.
    pub matcher_to_holder: u64,
}

/// The result of `simulate`.
#[derive(Clone, Debug, Serialize)]
pub struct SimulateReport {
    /// Bank customers (distinct identifiers).
    pub holder_rows: usize,
    /// Bank transactions behind them.
    pub holder_transactions: usize,
    /// Platform users.
    pub matcher_rows: usize,
    /// Categories.
    pub categories: usize,
    /// Output cells per row.
    pub width: usize,
    /// `|X ∩ Y|`, computed in the clear.
    pub intersection: u64,
    /// `D_max`, public.
    pub dummy_rows: u64,
    /// `|X ∩ Y| + D`: what the matcher learned.
    pub matched_rows_seen_by_matcher: u64,
    /// Whether every cell matched the plaintext computation.
    pub exact: bool,
    /// Every cell.
    pub cells: Vec<Cell>,
    /// Seconds per phase.
    pub phases: BTreeMap<String, f64>,
    /// Bytes each way, both phases.
    pub bytes: Bytes,
    /// Frames each way, both phases.
    pub messages: Bytes,
}

/// The simulation's fixed collaboration parameters.
pub const COLLABORATION_ID: &str = "simulate";
/// Cardinality privacy of the simulation: ε = 1/2, δ = 10^-6.
pub fn cardinality() -> Result<ShiftedTruncatedLaplace, cleanroom_crypto::CryptoError> {
    ShiftedTruncatedLaplace::new(1, 2, 1_000_000)
}

/// The holder's per-customer inputs: identifiers and value vectors
/// `[1, spend_c..., [has txn in c]...]`.
pub struct HolderInput {
    /// Normalised identifiers, one per customer.
    pub ids: Vec<Vec<u8>>,
    /// `ids.len() x width` words.
    pub values: Vec<u64>,
    /// Width.
    pub width: usize,
}

impl std::fmt::Debug for HolderInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HolderInput {{ customers: {}, width: {} }}",
            self.ids.len(),
            self.width
        )
    }
}

/// Cell names for `c` categories.
pub fn cell_names(categories: &[String]) -> Vec<String> {
    let mut names = vec!["customers".to_string()];
    names.extend(categories.iter().map(|c| format!("spend_cents[{c}]")));
    names.extend(categories.iter().map(|c| format!("customers[{c}]")));
    names
}

/// Aggregates the bank's transactions per customer.
///
/// # Errors
/// [`SimError::Normalize`] for an identifier that does not normalise.
pub fn holder_input(data: &SynthData, rules: &NormalizationRules) -> Result<HolderInput, SimError> {
    let c = data.categories.len();
    let width = 1 + 2 * c;
    let mut index: HashMap<u64, usize> = HashMap::new();
    let mut ids = Vec::new();
    let mut values: Vec<u64> = Vec::new();
    for (row, t) in data.bank.iter().enumerate() {
        let k = match index.get(&t.customer) {
            Some(k) => *k,
            None => {
                let id = rules
                    .normalize(IdKind::Email, &t.email)
                    .map_err(|reason| SimError::Normalize {
                        side: "bank",
                        row,
                        reason,
                    })?;
                ids.push(id);
                let start = values.len();
                values.resize(start + width, 0);
                values[start] = 1;
                index.insert(t.customer, ids.len() - 1);
                ids.len() - 1
            }
        };
        let base = k * width;
        values[base + 1 + t.category] = values[base + 1 + t.category].wrapping_add(t.amount_cents as u64);
        values[base + 1 + c + t.category] = 1;
    }
    Ok(HolderInput { ids, values, width })
}

/// Normalises the platform's identifiers.
///
/// # Errors
/// [`SimError::Normalize`] for an identifier that does not normalise.
pub fn matcher_ids(data: &SynthData, rules: &NormalizationRules) -> Result<Vec<Vec<u8>>, SimError> {
    data.platform
        .iter()
        .enumerate()
        .map(|(row, u)| {
            rules
                .normalize(IdKind::Email, &u.email)
                .map_err(|reason| SimError::Normalize {
                    side: "platform",
                    row,
                    reason,
                })
        })
        .collect()
}

/// The plaintext reference: `(|X ∩ Y|, Σ over the intersection of each cell)`.
pub fn plaintext(holder: &HolderInput, matcher: &[Vec<u8>]) -> (u64, Vec<i64>) {
    let set: HashSet<&[u8]> = matcher.iter().map(Vec::as_slice).collect();
    let mut sums = vec![0i64; holder.width];
    let mut count = 0;
    for (k, id) in holder.ids.iter().enumerate() {
        if set.contains(id.as_slice()) {
            count += 1;
            for (s, v) in sums
                .iter_mut()
                .zip(&holder.values[k * holder.width..(k + 1) * holder.width])
            {
                *s = s.wrapping_add(*v as i64);
            }
        }
    }
    (count, sums)
}

/// Runs a whole simulation.
///
/// # Errors
/// A [`SimError`].
pub fn simulate(cfg: &SimulateConfig) -> Result<SimulateReport, SimError> {
    if !(0.0..=1.0).contains(&cfg.overlap) {
        return Err(SimError::Config("--overlap must be between 0 and 1"));
    }
    if cfg.categories == 0 || cfg.categories > 2000 {
        return Err(SimError::Config("--categories must be between 1 and 2000"));
    }
    let mut phases = BTreeMap::new();
    let t = Instant::now();
    let data = generate(&SynthConfig {
        holder_customers: cfg.holder_rows,
        matcher_users: cfg.matcher_rows,
        overlap: cfg.overlap,
        categories: cfg.categories,
        seed: cfg.seed,
    });
    phases.insert("generate".to_string(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let rules = NormalizationRules::v1("44");
    let holder = holder_input(&data, &rules)?;
    let matcher = matcher_ids(&data, &rules)?;
    phases.insert("normalize".to_string(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let (intersection, truth) = plaintext(&holder, &matcher);
    phases.insert("plaintext_reference".to_string(), t.elapsed().as_secs_f64());

    let params = JoinParams {
        collaboration_id: COLLABORATION_ID.to_string(),
        rules_hash: rules.hash(),
        context: [0u8; 32],
        chunk_points: cfg.chunk_points,
    };
    let limits = SetSizeLimits {
        min: 0,
        max: MAX_SET_SIZE,
    };
    let card = cardinality()?;
    let d_max = card.d_max();
    let h = HolderJoin::new(
        params.clone(),
        HolderPolicy {
            peer_set: limits,
            cardinality: card,
        },
        holder.ids.clone(),
    )?;
    let m = MatcherJoin::new(
        params,
        MatcherPolicy {
            peer_set: limits,
            max_dummy_rows: 4096,
            block_padding: None,
        },
        matcher.clone(),
    )?;
    let mut rng_h = session_rng()?;
    let mut rng_m = session_rng()?;
    let t = Instant::now();
    let (hj, mj, join_traffic) = run_join(h, m, &mut rng_h, &mut rng_m, |_| {})?;
    phases.insert("join".to_string(), t.elapsed().as_secs_f64());
    phases.insert(
        "join.holder_compute".to_string(),
        join_traffic.holder_time.as_secs_f64(),
    );
    phases.insert(
        "join.matcher_compute".to_string(),
        join_traffic.matcher_time.as_secs_f64(),
    );

    let width = holder.width;
    let mut query_id = cleanroom_wire::QueryId([0u8; 16]);
    rand_core::RngCore::fill_bytes(&mut rng_m, &mut query_id.0);
    let agg = HolderAggregate::new(
        shared(hj),
        RowValues::new(width, holder.values.clone())?,
        query_id,
        [1u8; 32],
        0,
    )?;
    let t = Instant::now();
    let (hs, ms, agg_traffic) = run_aggregate(
        agg,
        &mj,
        mj.matched(),
        width,
        query_id,
        [1u8; 32],
        0,
        &mut rng_h,
        &mut rng_m,
    )?;
    phases.insert("aggregate".to_string(), t.elapsed().as_secs_f64());
    phases.insert(
        "aggregate.holder_compute".to_string(),
        agg_traffic.holder_time.as_secs_f64(),
    );
    phases.insert(
        "aggregate.matcher_compute".to_string(),
        agg_traffic.matcher_time.as_secs_f64(),
    );

    let got = Share::reconstruct(&hs, &ms).ok_or(SimError::Config("share widths differ"))?;
    let names = cell_names(&data.categories);
    let cells: Vec<Cell> = names
        .into_iter()
        .zip(got.iter().zip(&truth))
        .map(|(name, (p, q))| Cell {
            name,
            protocol: *p,
            plaintext: *q,
        })
        .collect();
    let exact = got == truth;
    Ok(SimulateReport {
        holder_rows: holder.ids.len(),
        holder_transactions: data.bank.len(),
        matcher_rows: matcher.len(),
        categories: data.categories.len(),
        width,
        intersection,
        dummy_rows: d_max,
        matched_rows_seen_by_matcher: mj.matched_count(),
        exact,
        cells,
        phases,
        bytes: Bytes {
            holder_to_matcher: join_traffic.holder_to_matcher_bytes + agg_traffic.holder_to_matcher_bytes,
            matcher_to_holder: join_traffic.matcher_to_holder_bytes + agg_traffic.matcher_to_holder_bytes,
        },
        messages: Bytes {
            holder_to_matcher: join_traffic.holder_to_matcher_messages + agg_traffic.holder_to_matcher_messages,
            matcher_to_holder: join_traffic.matcher_to_holder_messages + agg_traffic.matcher_to_holder_messages,
        },
    })
}

/// Default points per chunk.
pub const DEFAULT_CHUNK: usize = DEFAULT_CHUNK_POINTS;
