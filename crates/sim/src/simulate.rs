//! `cleanroom simulate`: both parties in memory, no network, no noise. Runs
//! the join and the aggregate `[customers, spend per category, customers per
//! category]` over the intersection and compares the reconstructed shares
//! with a plaintext computation, which must agree exactly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use cleanroom_crypto::dp::ShiftedTruncatedLaplace;
pub use cleanroom_crypto::normalize::IdKind;
use cleanroom_crypto::normalize::NormalizationRules;
use cleanroom_crypto::rng::session_rng;
use cleanroom_crypto::shard::{MAX_SHARDS, ShardKey};
use cleanroom_crypto::shares::Share;
use cleanroom_protocol::aggregate::{HolderAggregate, RowValues};
use cleanroom_protocol::join::{
    DEFAULT_CHUNK_POINTS, HolderJoin, HolderPolicy, JoinParams, MAX_SET_SIZE, MatcherJoin, MatcherPolicy, SetSizeLimits,
};
use serde::Serialize;
use zeroize::Zeroize;

use crate::driver::{DriverError, run_aggregate, run_join, shared};
use crate::synth::{SEGMENTS, SynthConfig, SynthData, generate};

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
    /// Shards (1: the unsharded protocol).
    pub shards: u32,
    /// Group the cells by the platform users' segment (a grouped join:
    /// one block of the platform's identifiers per segment, each padded,
    /// and one aggregate per segment), instead of one group.
    pub group_by_segment: bool,
    /// The key kinds the join matches on, in the order both sides declare
    /// them: `[Email]` is the single-key join; several make it a
    /// multi-key join (any key matches; unsharded only).
    pub keys: Vec<IdKind>,
    /// Share of the platform's users (0 to 1, picked by the data seed) who
    /// gave the platform another e-mail address than the bank has: they
    /// can only be matched on another key.
    pub other_emails: f64,
}

impl SimulateConfig {
    /// The single-key defaults of `cleanroom simulate` for these sizes.
    pub fn new(holder_rows: usize, matcher_rows: usize) -> Self {
        Self {
            holder_rows,
            matcher_rows,
            overlap: 0.5,
            categories: 16,
            seed: 1,
            chunk_points: DEFAULT_CHUNK_POINTS,
            shards: 1,
            group_by_segment: false,
            keys: vec![IdKind::Email],
            other_emails: 0.0,
        }
    }
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

/// One shard's set sizes: what sharding adds to each side's view (the
/// holder learns `matcher_rows` shard by shard, the matcher `holder_rows`
/// and `matched_rows_seen_by_matcher`), and the plaintext intersection.
#[derive(Clone, Debug, Serialize)]
pub struct ShardSize {
    /// The bank's customers in this shard.
    pub holder_rows: usize,
    /// The platform's users in this shard.
    pub matcher_rows: usize,
    /// Their intersection, computed in the clear.
    pub intersection: u64,
    /// `|X_s ∩ Y_s| + D_s`: what the matcher learned of this shard.
    pub matched_rows_seen_by_matcher: u64,
}

/// The result of `simulate`.
#[derive(Clone, Debug, Serialize)]
pub struct SimulateReport {
    /// The key kinds matched on (`email`, `phone`).
    pub keys: Vec<String>,
    /// Keys two or more of the bank's customers shared, dropped from all of
    /// them before a multi-key join (0 for one key).
    pub shared_keys_dropped: usize,
    /// Bank customers.
    pub holder_rows: usize,
    /// Bank transactions behind them.
    pub holder_transactions: usize,
    /// Platform users.
    pub matcher_rows: usize,
    /// Categories.
    pub categories: usize,
    /// Output cells per row.
    pub width: usize,
    /// `|X ∩ Y|`, computed in the clear (customers matched on any key).
    pub intersection: u64,
    /// `D_max` per block (per match pattern in a multi-key join) times the
    /// blocks (patterns) and the shards: the most dummy rows, public.
    pub dummy_rows: u64,
    /// `|X ∩ Y| + D` summed over the shards: what the matcher learned
    /// (shard by shard in `shards`).
    pub matched_rows_seen_by_matcher: u64,
    /// Whether every cell matched the plaintext computation.
    pub exact: bool,
    /// Every cell.
    pub cells: Vec<Cell>,
    /// Each shard's sizes (one entry when unsharded).
    pub shards: Vec<ShardSize>,
    /// Seconds per phase (summed over the shards).
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

/// The simulation's noise (ε = 1/2, δ = 10^-6) for a multi-key join of
/// `key_slots` slots (docs/protocol.md, "Multi-key matching"), for the
/// dummy counts and the block padding alike: the counts per match pattern
/// move by up to `2K` in all and `K` in one pattern when a customer is
/// added (the keys it shares are dropped from it and from the others, who
/// move too), and a block's size by as much when a user is added.
///
/// # Errors
/// For parameters out of range.
pub fn multi_key_noise(key_slots: u64) -> Result<ShiftedTruncatedLaplace, cleanroom_crypto::CryptoError> {
    let k = key_slots.max(1);
    ShiftedTruncatedLaplace::for_histogram(1, 2, 1_000_000, 2 * k, k)
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

/// One customer's or user's normalised keys.
pub type Keys = Vec<Vec<u8>>;

/// A multi-key run's inputs, from the same data as [`holder_input`] (its
/// customer order) and the platform's users in order: each customer's
/// normalised keys of `kinds` (a key that does not normalise is missing),
/// less any key two or more customers hold; each user's keys, less any an
/// earlier user holds; and how many distinct keys the bank dropped
/// (docs/protocol.md, "Multi-key matching").
pub fn multi_key_inputs(
    data: &SynthData,
    rules: &NormalizationRules,
    kinds: &[IdKind],
) -> (Vec<Keys>, Vec<Keys>, usize) {
    let keys = |email: &str, phone: &str| -> Vec<Vec<u8>> {
        kinds
            .iter()
            .filter_map(|k| {
                let raw = if *k == IdKind::Email { email } else { phone };
                rules.normalize(*k, raw).ok()
            })
            .collect()
    };
    let mut seen: HashSet<u64> = HashSet::new();
    let mut customers: Vec<Vec<Vec<u8>>> = Vec::new();
    for t in &data.bank {
        if seen.insert(t.customer) {
            customers.push(keys(&t.email, &t.phone));
        }
    }
    let mut holders: HashMap<Vec<u8>, usize> = HashMap::new();
    for k in customers.iter().flatten() {
        *holders.entry(k.clone()).or_insert(0) += 1;
    }
    let dropped = holders.values().filter(|n| **n > 1).count();
    for c in &mut customers {
        c.retain(|k| holders.get(k) == Some(&1));
    }
    let mut taken: HashSet<Vec<u8>> = HashSet::new();
    let users = data
        .platform
        .iter()
        .map(|u| {
            let mut k = keys(&u.email, &u.phone);
            k.retain(|x| taken.insert(x.clone()));
            k
        })
        .collect();
    (customers, users, dropped)
}

/// The multi-key plaintext reference: each customer counts in the lowest
/// group (`group_of_user`) of the users holding one of its keys; per group,
/// `(customers, Σ of each cell over them)`.
pub fn plaintext_multi(
    holder: &HolderInput,
    customers: &[Vec<Vec<u8>>],
    users: &[Vec<Vec<u8>>],
    group_of_user: &[usize],
    groups: usize,
) -> Vec<(u64, Vec<i64>)> {
    let mut group_of_key: HashMap<&[u8], usize> = HashMap::new();
    for (keys, g) in users.iter().zip(group_of_user) {
        for k in keys {
            group_of_key.entry(k.as_slice()).or_insert(*g);
        }
    }
    let mut out = vec![(0u64, vec![0i64; holder.width]); groups];
    for (c, keys) in customers.iter().enumerate() {
        let Some(g) = keys
            .iter()
            .filter_map(|k| group_of_key.get(k.as_slice()).copied())
            .min()
        else {
            continue;
        };
        let (Some((count, sums)), Some(values)) = (
            out.get_mut(g),
            holder.values.get(c * holder.width..(c + 1) * holder.width),
        ) else {
            continue;
        };
        *count += 1;
        for (s, v) in sums.iter_mut().zip(values) {
            *s = s.wrapping_add(*v as i64);
        }
    }
    out
}

/// One shard's inputs: the bank's customers and the platform's users whose
/// identifiers fall in it.
pub type ShardInputs = (HolderInput, Vec<Vec<u8>>);

/// The parts of the inputs in each of `shards` shards, by the shard
/// function of `key` on the normalised identifiers.
///
/// # Errors
/// [`SimError::Crypto`] for a shard count out of range.
pub fn split_into_shards(
    holder: &HolderInput,
    matcher: &[Vec<u8>],
    key: &ShardKey,
    shards: u32,
) -> Result<Vec<ShardInputs>, SimError> {
    let mut parts: Vec<ShardInputs> = (0..shards)
        .map(|_| {
            (
                HolderInput {
                    ids: Vec::new(),
                    values: Vec::new(),
                    width: holder.width,
                },
                Vec::new(),
            )
        })
        .collect();
    for (k, id) in holder.ids.iter().enumerate() {
        let s = key.shard_of(id, shards)? as usize;
        let part = &mut parts[s].0;
        part.ids.push(id.clone());
        part.values
            .extend_from_slice(&holder.values[k * holder.width..(k + 1) * holder.width]);
    }
    for id in matcher {
        let s = key.shard_of(id, shards)? as usize;
        parts[s].1.push(id.clone());
    }
    Ok(parts)
}

/// The join context of shard `s` of `shards`: the unsharded run's (all
/// zeros) for one shard, else the nodes' shard context over that base
/// (`cleanroom_protocol::queries::shard_join_context`), so that each shard
/// pair's sessions are bound to their shard.
pub fn shard_context(s: u32, shards: u32) -> [u8; 32] {
    if shards == 1 {
        return [0u8; 32];
    }
    cleanroom_protocol::queries::shard_join_context(&[0u8; 32], shards, s)
}

/// What one shard pair's join and aggregates gave (a share per group).
struct PairRun {
    holder_shares: Vec<Share>,
    matcher_shares: Vec<Share>,
    matched: u64,
    bytes: Bytes,
    messages: Bytes,
}

/// Today's join and aggregate between one pair of (shard) inputs, with
/// their own DP dummies.
#[allow(clippy::too_many_arguments)]
fn run_pair(
    holder: &HolderInput,
    multi_key: Option<(&[Vec<Vec<u8>>], usize)>,
    blocks: &[Vec<Vec<u8>>],
    rules: &NormalizationRules,
    context: [u8; 32],
    chunk_points: usize,
    query_id: cleanroom_wire::QueryId,
    phases: &mut BTreeMap<String, f64>,
    rng_h: &mut cleanroom_crypto::rng::SessionRng,
    rng_m: &mut cleanroom_crypto::rng::SessionRng,
) -> Result<PairRun, SimError> {
    let params = JoinParams {
        collaboration_id: COLLABORATION_ID.to_string(),
        rules_hash: rules.hash(),
        context,
        chunk_points,
    };
    let limits = SetSizeLimits {
        min: 0,
        max: MAX_SET_SIZE,
    };
    let noise = match multi_key {
        None => cardinality()?,
        Some((_, k)) => multi_key_noise(k as u64)?,
    };
    let policy = HolderPolicy {
        peer_set: limits,
        cardinality: noise.clone(),
    };
    let h = match multi_key {
        None => HolderJoin::new(params.clone(), policy, holder.ids.clone())?,
        Some((customers, k)) => HolderJoin::with_key_slots(params.clone(), policy, customers.to_vec(), k)?,
    };
    // One group: today's ungrouped join. Several: a block per group, each
    // padded (the protocol requires it).
    let m = MatcherJoin::grouped(
        params,
        MatcherPolicy {
            peer_set: limits,
            max_dummy_rows: 4096,
            block_padding: if blocks.len() > 1 { Some(noise) } else { None },
        },
        blocks.to_vec(),
    )?;
    let m = match multi_key {
        None => m,
        Some((_, k)) => m.with_key_slots(k)?,
    };
    let mut add = |name: &str, secs: f64| *phases.entry(name.to_string()).or_insert(0.0) += secs;
    let t = Instant::now();
    let (hj, mj, join_traffic) = run_join(h, m, rng_h, rng_m, |_| {})?;
    add("join", t.elapsed().as_secs_f64());
    add("join.holder_compute", join_traffic.holder_time.as_secs_f64());
    add("join.matcher_compute", join_traffic.matcher_time.as_secs_f64());

    let width = holder.width;
    let joined = shared(hj);
    let values = std::sync::Arc::new(RowValues::new(width, holder.values.clone())?);
    let mut run = PairRun {
        holder_shares: Vec::with_capacity(blocks.len()),
        matcher_shares: Vec::with_capacity(blocks.len()),
        matched: mj.matched_count(),
        bytes: Bytes {
            holder_to_matcher: join_traffic.holder_to_matcher_bytes,
            matcher_to_holder: join_traffic.matcher_to_holder_bytes,
        },
        messages: Bytes {
            holder_to_matcher: join_traffic.holder_to_matcher_messages,
            matcher_to_holder: join_traffic.matcher_to_holder_messages,
        },
    };
    // One aggregate per group: the matcher's choices are the rows that
    // matched in that group's block.
    for g in 0..blocks.len() as u32 {
        let agg = HolderAggregate::new(joined.clone(), values.clone(), query_id, [1u8; 32], g)?;
        let choices = if blocks.len() == 1 {
            mj.matched().to_vec()
        } else {
            mj.choices_for_block(g)
        };
        let t = Instant::now();
        let (hs, ms, agg_traffic) = run_aggregate(agg, &mj, &choices, width, query_id, [1u8; 32], g, rng_h, rng_m)?;
        add("aggregate", t.elapsed().as_secs_f64());
        add("aggregate.holder_compute", agg_traffic.holder_time.as_secs_f64());
        add("aggregate.matcher_compute", agg_traffic.matcher_time.as_secs_f64());
        run.holder_shares.push(hs);
        run.matcher_shares.push(ms);
        run.bytes.holder_to_matcher += agg_traffic.holder_to_matcher_bytes;
        run.bytes.matcher_to_holder += agg_traffic.matcher_to_holder_bytes;
        run.messages.holder_to_matcher += agg_traffic.holder_to_matcher_messages;
        run.messages.matcher_to_holder += agg_traffic.matcher_to_holder_messages;
    }
    Ok(run)
}

/// Runs a whole simulation: with `shards > 1`, each identifier goes to the
/// shard its keyed hash picks (a fresh shard key per run), each shard pair
/// runs the join and the aggregate of the unsharded protocol with its own
/// dummies, and each party adds its shard shares (mod 2^64) before the two
/// sums are reconstructed.
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
    if cfg.shards == 0 || cfg.shards > MAX_SHARDS {
        return Err(SimError::Config("--shards must be between 1 and 4096"));
    }
    let kinds: HashSet<IdKind> = cfg.keys.iter().copied().collect();
    if cfg.keys.is_empty() || kinds.len() != cfg.keys.len() {
        return Err(SimError::Config("--keys must name each key kind once"));
    }
    let multi_key = cfg.keys != [IdKind::Email];
    if multi_key && cfg.shards > 1 {
        return Err(SimError::Config(
            "a multi-key join runs unsharded (a customer's keys would fall in different shards)",
        ));
    }
    if !(0.0..=1.0).contains(&cfg.other_emails) {
        return Err(SimError::Config("--other-emails must be between 0 and 1"));
    }
    let mut phases = BTreeMap::new();
    let t = Instant::now();
    let mut data = generate(&SynthConfig {
        holder_customers: cfg.holder_rows,
        matcher_users: cfg.matcher_rows,
        overlap: cfg.overlap,
        categories: cfg.categories,
        seed: cfg.seed,
    });
    if cfg.other_emails > 0.0 {
        give_other_emails(&mut data, cfg.other_emails, cfg.seed);
    }
    phases.insert("generate".to_string(), t.elapsed().as_secs_f64());

    let t = Instant::now();
    let rules = NormalizationRules::v1("44");
    let holder = holder_input(&data, &rules)?;
    // A multi-key run: each customer's keys and each user's (the
    // single-key run's identifiers are the e-mails alone).
    let (multi, matcher, shared_keys_dropped) = if multi_key {
        let (customers, users, dropped) = multi_key_inputs(&data, &rules, &cfg.keys);
        (Some(customers), users, dropped)
    } else {
        let ids = matcher_ids(&data, &rules)?;
        (None, ids.into_iter().map(|id| vec![id]).collect::<Vec<_>>(), 0)
    };
    phases.insert("normalize".to_string(), t.elapsed().as_secs_f64());

    // The platform's identifiers (keys) in blocks: one per segment when
    // grouped (every user has one segment, so the blocks partition them),
    // else one.
    let group_of_user: Vec<usize> = data
        .platform
        .iter()
        .map(|u| if cfg.group_by_segment { u.segment } else { 0 })
        .collect();
    let groups = if cfg.group_by_segment { SEGMENTS.len() } else { 1 };
    let mut blocks: Vec<Vec<Vec<u8>>> = vec![Vec::new(); groups];
    for (keys, g) in matcher.iter().zip(&group_of_user) {
        let Some(block) = blocks.get_mut(*g) else {
            return Err(SimError::Config("a platform user's segment is out of range"));
        };
        block.extend(keys.iter().cloned());
    }
    let group_names: Vec<String> = if cfg.group_by_segment {
        SEGMENTS.iter().map(|s| (*s).to_string()).collect()
    } else {
        vec![String::new()]
    };

    let t = Instant::now();
    let (intersection, truth): (u64, Vec<Vec<i64>>) = match &multi {
        Some(customers) => {
            let per = plaintext_multi(&holder, customers, &matcher, &group_of_user, groups);
            (
                per.iter().map(|(n, _)| n).sum(),
                per.into_iter().map(|(_, s)| s).collect(),
            )
        }
        None => {
            let all: Vec<Vec<u8>> = matcher.iter().flatten().cloned().collect();
            (
                plaintext(&holder, &all).0,
                blocks.iter().map(|b| plaintext(&holder, b).1).collect(),
            )
        }
    };
    phases.insert("plaintext_reference".to_string(), t.elapsed().as_secs_f64());
    let key_slots = cfg.keys.len();
    let patterns = cleanroom_protocol::join::match_patterns(groups, key_slots)?.len() as u64;

    let d_max = if multi_key {
        multi_key_noise(key_slots as u64)?.d_max()
    } else {
        cardinality()?.d_max()
    };
    let mut rng_h = session_rng()?;
    let mut rng_m = session_rng()?;
    let width = holder.width;
    let mut query_id = cleanroom_wire::QueryId([0u8; 16]);
    rand_core::RngCore::fill_bytes(&mut rng_m, &mut query_id.0);

    let t = Instant::now();
    // One shard is the whole input, borrowed as it is.
    let split: Vec<(HolderInput, Vec<Vec<Vec<u8>>>)> = if cfg.shards == 1 {
        Vec::new()
    } else {
        let mut key_bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rng_h, &mut key_bytes);
        let key = ShardKey::new(key_bytes);
        key_bytes.zeroize();
        let holders = split_into_shards(&holder, &[], &key, cfg.shards)?;
        let mut parts: Vec<(HolderInput, Vec<Vec<Vec<u8>>>)> = holders
            .into_iter()
            .map(|(h, _)| (h, vec![Vec::new(); blocks.len()]))
            .collect();
        for (b, block) in blocks.iter().enumerate() {
            for id in block {
                let s = key.shard_of(id, cfg.shards)? as usize;
                if let Some(part) = parts.get_mut(s).and_then(|p| p.1.get_mut(b)) {
                    part.push(id.clone());
                }
            }
        }
        parts
    };
    let parts: Vec<(&HolderInput, &[Vec<Vec<u8>>])> = if cfg.shards == 1 {
        vec![(&holder, blocks.as_slice())]
    } else {
        split.iter().map(|(h, m)| (h, m.as_slice())).collect()
    };
    phases.insert("shard".to_string(), t.elapsed().as_secs_f64());

    let mut holder_sums = vec![Share::zero(width); blocks.len()];
    let mut matcher_sums = vec![Share::zero(width); blocks.len()];
    let mut matched = 0u64;
    let mut bytes = Bytes {
        holder_to_matcher: 0,
        matcher_to_holder: 0,
    };
    let mut messages = bytes.clone();
    let mut shard_sizes = Vec::with_capacity(parts.len());
    for (s, &(h_part, m_blocks)) in parts.iter().enumerate() {
        let run = run_pair(
            h_part,
            multi.as_deref().map(|c| (c, key_slots)),
            m_blocks,
            &rules,
            shard_context(s as u32, cfg.shards),
            cfg.chunk_points,
            query_id,
            &mut phases,
            &mut rng_h,
            &mut rng_m,
        )?;
        // Each party adds its shard's share of each group to its sums.
        for (g, (hs, ms)) in run.holder_shares.iter().zip(&run.matcher_shares).enumerate() {
            let added = match (holder_sums.get_mut(g), matcher_sums.get_mut(g)) {
                (Some(h), Some(m)) => h.add(hs) && m.add(ms),
                _ => false,
            };
            if !added {
                return Err(SimError::Config("share widths differ"));
            }
        }
        let shard_intersection: u64 = m_blocks.iter().map(|b| plaintext(h_part, b).0).sum();
        shard_sizes.push(ShardSize {
            holder_rows: h_part.ids.len(),
            matcher_rows: m_blocks.iter().map(Vec::len).sum(),
            intersection: shard_intersection,
            matched_rows_seen_by_matcher: run.matched,
        });
        matched += run.matched;
        bytes.holder_to_matcher += run.bytes.holder_to_matcher;
        bytes.matcher_to_holder += run.bytes.matcher_to_holder;
        messages.holder_to_matcher += run.messages.holder_to_matcher;
        messages.matcher_to_holder += run.messages.matcher_to_holder;
    }

    let names = cell_names(&data.categories);
    let mut cells: Vec<Cell> = Vec::with_capacity(names.len() * blocks.len());
    let mut exact = true;
    for ((h, m), (group, truth)) in holder_sums
        .iter()
        .zip(&matcher_sums)
        .zip(group_names.iter().zip(&truth))
    {
        let got = Share::reconstruct(h, m).ok_or(SimError::Config("share widths differ"))?;
        exact &= got == *truth;
        for (name, (p, q)) in names.iter().zip(got.iter().zip(truth)) {
            cells.push(Cell {
                name: if group.is_empty() {
                    name.clone()
                } else {
                    format!("{name}{{segment={group}}}")
                },
                protocol: *p,
                plaintext: *q,
            });
        }
    }
    Ok(SimulateReport {
        keys: cfg.keys.iter().map(|k| k.name().to_string()).collect(),
        shared_keys_dropped,
        holder_rows: holder.ids.len(),
        holder_transactions: data.bank.len(),
        matcher_rows: matcher.len(),
        categories: data.categories.len(),
        width,
        intersection,
        dummy_rows: d_max * u64::from(cfg.shards) * patterns,
        matched_rows_seen_by_matcher: matched,
        exact,
        cells,
        shards: shard_sizes,
        phases,
        bytes,
        messages,
    })
}

/// Default points per chunk.
pub const DEFAULT_CHUNK: usize = DEFAULT_CHUNK_POINTS;

/// Gives each platform user, with probability `share` (drawn from the
/// data seed), another e-mail address than the bank has for the person
/// (`other-<row>@platform-only.test`): such a user matches only on another
/// key.
pub fn give_other_emails(data: &mut SynthData, share: f64, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 0x6f74_6865_725f_6d61);
    for (i, u) in data.platform.iter_mut().enumerate() {
        if rng.random_bool(share) {
            u.email = format!("other-{i}@platform-only.test");
        }
    }
}
