//! A sharded node's input at rest (issue 16, "flat memory on one machine").
//!
//! A node with `[shards] count = S >= 2` streams its CSV once at start
//! ([`crate::data::stream_holder`], [`crate::data::stream_matcher`]: the
//! same checks, report and version as the unsharded load) and appends each
//! good row to a spill file of its shard (the keyed hash of the
//! identifier). Then, a shard at a time, it merges the spill's rows per
//! identifier (first-seen order; the platform keeps a repeated
//! identifier's first row, as unsharded) and writes the shard's file
//! ([`crate::shards`], checksummed, format 2) under `state_dir/shards/`.
//!
//! The node numbers its identifiers shard after shard, so shard `s` is the
//! range `offsets[s]..offsets[s + 1]` of that numbering. What stays in
//! memory for the whole input: the offsets, each identifier's churn
//! fingerprint (8 bytes) and, on the platform, each user's segment and
//! country (4 bytes). A shard's identifiers (and the bank's transactions)
//! are read back from its file when a join or an aggregate batch needs
//! them, and kept while the loaded shards fit half of `memory_budget`
//! (the least recently used is dropped first); the other half is for the
//! work on the shard at hand. A file that is damaged, or not the one this
//! start wrote (another data version, key, count or shard), is refused
//! with a message naming it ([`crate::shards::ShardFileError`]), never
//! used.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cleanroom_crypto::shard::ShardKey;
use cleanroom_protocol::join::OwnIds;

use crate::NodeError;
use crate::config::{CollaborationConfig, DataConfig};
use crate::data::{HolderData, LoadReport, Txn, stream_holder, stream_matcher};
use crate::shards::{ShardFileId, ShardWriter, read_shard};

/// `u64` values per transaction in a bank's shard file.
const TXN_WIDTH: u32 = 2;
/// `u64` values per row in a platform's spill file (segment, country).
const USER_WIDTH: u32 = 2;
/// A spill row of a platform without a country column.
const NO_COUNTRY: u64 = u64::MAX;

/// What the node is split under.
#[derive(Clone, Copy, Debug)]
pub struct Split<'a> {
    /// `S`.
    pub count: u32,
    /// The collaboration's shard key.
    pub key: &'a ShardKey,
    /// Its id (`crate::shards::key_id`).
    pub key_id: [u8; 32],
    /// `[shards] memory_budget`, bytes.
    pub memory_budget: u64,
    /// This node's key for its churn fingerprints (`State::node_key`).
    pub node_key: &'a [u8; 32],
}

/// The bank's input, split and written to shard files.
#[derive(Debug)]
pub struct SplitHolder {
    /// The shards.
    pub store: Arc<ShardStore>,
    /// What loading found.
    pub report: LoadReport,
    /// The input's digest.
    pub version: [u8; 32],
    /// Each customer's churn fingerprint, in the node's numbering.
    pub fingerprints: Vec<u64>,
}

/// The platform's input, split and written to shard files.
#[derive(Debug)]
pub struct SplitMatcher {
    /// The shards.
    pub store: Arc<ShardStore>,
    /// Each user's segment index, in the node's numbering.
    pub segments: Vec<u16>,
    /// Each user's country index (empty without a country column).
    pub countries: Vec<u16>,
    /// What loading found.
    pub report: LoadReport,
    /// The input's digest.
    pub version: [u8; 32],
    /// Each user's churn fingerprint, in the node's numbering.
    pub fingerprints: Vec<u64>,
}

/// A transaction as two `u64`s: the cents' bits, then the category above
/// the day's 32 bits.
fn txn_values(t: &Txn) -> [u64; 2] {
    [t.cents as u64, (u64::from(t.category) << 32) | u64::from(t.day as u32)]
}

fn txn_of(a: u64, b: u64) -> Option<Txn> {
    Some(Txn {
        cents: a as i64,
        category: u16::try_from(b >> 32).ok()?,
        day: (b & 0xffff_ffff) as u32 as i32,
    })
}

fn io(path: &Path, e: std::io::Error) -> NodeError {
    NodeError::Data {
        path: path.display().to_string(),
        what: e.to_string(),
    }
}

/// Deletes the node's shard directory, if any (an unsharded node keeps no
/// copy of its input; a sharded one writes it anew).
///
/// # Errors
/// [`NodeError::Data`] when it cannot be deleted.
pub fn remove_shards(dir: &Path) -> Result<(), NodeError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| io(dir, e))?;
    }
    Ok(())
}

/// Empties (or makes) the node's shard directory, readable by the node's
/// user only.
fn fresh_dir(dir: &Path) -> Result<(), NodeError> {
    remove_shards(dir)?;
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir).map_err(|e| io(dir, e))
}

/// At most this many spill files are open at once: shards share spill
/// files (bucket `s mod B`) beyond it, so a split never needs more file
/// descriptors than a default limit allows, whatever `S` (up to 4096).
const MAX_SPILL_FILES: u32 = 256;

/// One shard's spilled rows: identifiers and each row's values.
type ShardRowsOf<'a> = (Vec<&'a [u8]>, Vec<&'a [u64]>);

/// The spill files of one split: bucket `b` holds the rows of every shard
/// `s` with `s mod B == b`, one record (one item) per CSV row.
struct Spill {
    writers: Vec<ShardWriter>,
    paths: Vec<PathBuf>,
    ids: Vec<ShardFileId>,
    count: u32,
}

impl Spill {
    fn create(dir: &Path, split: &Split<'_>, width: u32) -> Result<Self, NodeError> {
        let buckets = split.count.clamp(1, MAX_SPILL_FILES);
        let mut s = Self {
            writers: Vec::new(),
            paths: Vec::new(),
            ids: Vec::new(),
            count: split.count,
        };
        for bucket in 0..buckets {
            let path = dir.join(format!("spill-{bucket:05}"));
            // Written before the input's version is known: the spill's
            // version field is zero, and it is read back under this id.
            let id = ShardFileId {
                data_version: [0; 32],
                key_id: split.key_id,
                shards: split.count,
                shard: bucket,
                width,
            };
            s.writers.push(ShardWriter::create(&path, &id)?);
            s.paths.push(path);
            s.ids.push(id);
        }
        Ok(s)
    }

    fn push(&mut self, shard: u32, id: &[u8], values: &[u64]) -> Result<(), NodeError> {
        let buckets = self.writers.len().max(1);
        let w = self
            .writers
            .get_mut(shard as usize % buckets)
            .ok_or(NodeError::Internal("a shard index out of range"))?;
        Ok(w.push(id, values)?)
    }

    /// Finishes every spill file; then calls `each(shard, ids, values)`
    /// for every shard, in bucket order, with the shard's rows in file
    /// order (`values`: one item of the spill's width per row; a shard
    /// with no rows gets empty lists), deleting each spill once read.
    fn finish(
        self,
        key: &ShardKey,
        width: usize,
        mut each: impl FnMut(u32, &[&[u8]], &[&[u64]]) -> Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        for w in self.writers {
            w.finish()?;
        }
        let buckets = self.paths.len().max(1);
        for (bucket, (path, id)) in self.paths.iter().zip(&self.ids).enumerate() {
            let rows = read_shard(path, id)?;
            let mut by_shard: std::collections::BTreeMap<u32, ShardRowsOf<'_>> = (bucket..self.count as usize)
                .step_by(buckets)
                .filter_map(|s| u32::try_from(s).ok())
                .map(|s| (s, (Vec::new(), Vec::new())))
                .collect();
            for (r, (uid, n)) in rows.ids.iter().zip(&rows.items).enumerate() {
                let values = rows
                    .values
                    .get(r * width..(r + 1) * width)
                    .filter(|_| *n == 1)
                    .ok_or(NodeError::Internal("a spill record is not one item"))?;
                let shard = key.shard_of(uid, self.count)?;
                let (ids, vals) = by_shard
                    .get_mut(&shard)
                    .ok_or(NodeError::Internal("a spilled row in another shard's bucket"))?;
                ids.push(uid.as_slice());
                vals.push(values);
            }
            for (shard, (ids, vals)) in by_shard {
                each(shard, &ids, &vals)?;
            }
            std::fs::remove_file(path).map_err(|e| io(path, e))?;
        }
        Ok(())
    }
}

/// What a shard's merge keeps in memory for the whole input, in the
/// shard's order; put together shard after shard at the end.
#[derive(Default)]
struct ShardOut {
    len: usize,
    bytes: u64,
    fingerprints: Vec<u64>,
    segments: Vec<u16>,
    countries: Vec<u16>,
}

/// Puts the shards' outputs together in shard order: the offsets, the
/// estimated sizes and the concatenated per-identifier arrays.
fn assemble(outs: Vec<ShardOut>) -> (Vec<usize>, Vec<u64>, ShardOut) {
    let mut offsets = vec![0usize];
    let mut sizes = Vec::with_capacity(outs.len());
    let mut all = ShardOut::default();
    for o in outs {
        offsets.push(offsets.last().copied().unwrap_or(0) + o.len);
        sizes.push(o.bytes);
        all.len += o.len;
        all.fingerprints.extend(o.fingerprints);
        all.segments.extend(o.segments);
        all.countries.extend(o.countries);
    }
    (offsets, sizes, all)
}

/// Streams the bank's file into shard files under `dir` (emptied first).
///
/// # Errors
/// What [`stream_holder`] refuses; [`NodeError::Data`] or
/// [`NodeError::ShardFile`] when a file cannot be written or read back.
pub fn split_holder(
    cfg: &DataConfig,
    collab: &CollaborationConfig,
    split: &Split<'_>,
    dir: &Path,
) -> Result<SplitHolder, NodeError> {
    fresh_dir(dir)?;
    let mut spill = Spill::create(dir, split, TXN_WIDTH)?;
    let (report, version) = stream_holder(cfg, collab, |id, txn| {
        spill.push(split.key.shard_of(&id, split.count)?, &id, &txn_values(&txn))
    })?;
    let mut outs: Vec<ShardOut> = (0..split.count).map(|_| ShardOut::default()).collect();
    spill.finish(split.key, TXN_WIDTH as usize, |shard, rows, values| {
        // Merge the rows per customer, in first-seen order.
        let mut index: HashMap<&[u8], usize> = HashMap::new();
        let mut ids: Vec<&[u8]> = Vec::new();
        let mut txns: Vec<Vec<u64>> = Vec::new();
        for (cid, v) in rows.iter().zip(values) {
            let k = *index.entry(cid).or_insert_with(|| {
                ids.push(cid);
                txns.push(Vec::new());
                ids.len() - 1
            });
            if let Some(list) = txns.get_mut(k) {
                list.extend_from_slice(v);
            }
        }
        let fid = ShardFileId {
            data_version: version,
            key_id: split.key_id,
            shards: split.count,
            shard,
            width: TXN_WIDTH,
        };
        let mut w = ShardWriter::create(&shard_path(dir, shard), &fid)?;
        let mut bytes = 0u64;
        for (cid, t) in ids.iter().zip(&txns) {
            w.push(cid, t)?;
            bytes += holder_bytes(cid.len(), t.len() / TXN_WIDTH as usize);
        }
        w.finish()?;
        let out = outs
            .get_mut(shard as usize)
            .ok_or(NodeError::Internal("a shard beyond the split"))?;
        *out = ShardOut {
            len: ids.len(),
            bytes,
            fingerprints: crate::state::fingerprints_by_id(split.node_key, &ids),
            ..ShardOut::default()
        };
        Ok(())
    })?;
    let (offsets, sizes, all) = assemble(outs);
    let store = ShardStore::new(dir, Kind::Holder, version, split, offsets, sizes);
    Ok(SplitHolder {
        store: Arc::new(store),
        report,
        version,
        fingerprints: all.fingerprints,
    })
}

/// Streams the platform's file into shard files under `dir` (emptied
/// first): identifiers in the files, segments and countries in memory.
///
/// # Errors
/// What [`stream_matcher`] refuses; [`NodeError::Data`] or
/// [`NodeError::ShardFile`] when a file cannot be written or read back.
pub fn split_matcher(
    cfg: &DataConfig,
    collab: &CollaborationConfig,
    split: &Split<'_>,
    dir: &Path,
) -> Result<SplitMatcher, NodeError> {
    fresh_dir(dir)?;
    let mut spill = Spill::create(dir, split, USER_WIDTH)?;
    let has_country = cfg.country_column.is_some();
    // Repeats are counted after the merge below.
    let (mut report, version) = stream_matcher(cfg, collab, |id, segment, country| {
        let c = country.map_or(NO_COUNTRY, u64::from);
        spill.push(split.key.shard_of(&id, split.count)?, &id, &[u64::from(segment), c])?;
        Ok(true)
    })?;
    let mut outs: Vec<ShardOut> = (0..split.count).map(|_| ShardOut::default()).collect();
    let mut repeats = 0u64;
    spill.finish(split.key, USER_WIDTH as usize, |shard, rows, values| {
        let mut seen: HashMap<&[u8], ()> = HashMap::new();
        let mut out = ShardOut::default();
        let mut ids: Vec<&[u8]> = Vec::new();
        for (uid, v) in rows.iter().zip(values) {
            if seen.insert(uid, ()).is_some() {
                repeats += 1;
                continue;
            }
            let [seg, c] = v else {
                return Err(NodeError::Internal("a spill record is not one item"));
            };
            ids.push(uid);
            out.segments
                .push(u16::try_from(*seg).map_err(|_| NodeError::Internal("a spilled segment out of range"))?);
            if has_country {
                out.countries
                    .push(u16::try_from(*c).map_err(|_| NodeError::Internal("a spilled country out of range"))?);
            }
        }
        let fid = ShardFileId {
            data_version: version,
            key_id: split.key_id,
            shards: split.count,
            shard,
            width: 0,
        };
        let mut w = ShardWriter::create(&shard_path(dir, shard), &fid)?;
        for uid in &ids {
            w.push(uid, &[])?;
            out.bytes += matcher_bytes(uid.len());
        }
        w.finish()?;
        out.len = ids.len();
        out.fingerprints = crate::state::fingerprints_by_id(split.node_key, &ids);
        *outs
            .get_mut(shard as usize)
            .ok_or(NodeError::Internal("a shard beyond the split"))? = out;
        Ok(())
    })?;
    report.loaded -= repeats;
    report.duplicate_identifiers += repeats;
    let (offsets, sizes, all) = assemble(outs);
    let store = ShardStore::new(dir, Kind::Matcher, version, split, offsets, sizes);
    Ok(SplitMatcher {
        store: Arc::new(store),
        segments: all.segments,
        countries: all.countries,
        report,
        version,
        fingerprints: all.fingerprints,
    })
}

/// Shard `s`'s file in `dir`.
pub fn shard_path(dir: &Path, shard: u32) -> PathBuf {
    dir.join(format!("shard-{shard:05}.crs"))
}

/// What a loaded customer costs in memory: the identifier and its vector
/// header, the transactions and theirs.
fn holder_bytes(id_len: usize, txns: usize) -> u64 {
    (id_len + 24 + 24 + txns * std::mem::size_of::<Txn>()) as u64
}

/// What a loaded platform user costs in memory.
fn matcher_bytes(id_len: usize) -> u64 {
    (id_len + 24) as u64
}

/// Which side's files a store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Holder,
    Matcher,
}

/// A loaded shard.
#[derive(Clone)]
enum Loaded {
    Holder(Arc<HolderData>),
    Matcher(OwnIds),
}

#[derive(Default)]
struct Cache {
    /// Loaded shards, least recently used first, with their bytes.
    entries: Vec<(u32, Loaded, u64)>,
    bytes: u64,
    /// Shard files read so far.
    reads: u64,
}

/// A sharded node's shards at rest: where each shard's identifiers are in
/// the node's numbering, and its file, read back a shard at a time within
/// the memory budget.
pub struct ShardStore {
    dir: PathBuf,
    kind: Kind,
    version: [u8; 32],
    key_id: [u8; 32],
    count: u32,
    offsets: Vec<usize>,
    /// Each shard's estimated bytes once loaded.
    sizes: Vec<u64>,
    /// Half the memory budget: what loaded shards may hold.
    keep: u64,
    cache: Mutex<Cache>,
}

impl core::fmt::Debug for ShardStore {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "ShardStore {{ shards: {}, identifiers: {}, dir: {} }}",
            self.count,
            self.len(),
            self.dir.display()
        )
    }
}

impl ShardStore {
    fn new(dir: &Path, kind: Kind, version: [u8; 32], split: &Split<'_>, offsets: Vec<usize>, sizes: Vec<u64>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            kind,
            version,
            key_id: split.key_id,
            count: split.count,
            offsets,
            sizes,
            keep: split.memory_budget / 2,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// `S`.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Identifiers in all shards.
    pub fn len(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shard `s`'s identifiers in the node's numbering.
    pub fn range(&self, shard: u32) -> Option<Range<usize>> {
        let s = shard as usize;
        Some(*self.offsets.get(s)?..*self.offsets.get(s + 1)?)
    }

    /// The shard of identifier `k` of the node's numbering.
    pub fn shard_of(&self, k: usize) -> Option<u32> {
        if k >= self.len() {
            return None;
        }
        // offsets[s] <= k < offsets[s + 1]; empty shards are skipped.
        let s = self.offsets.partition_point(|o| *o <= k).checked_sub(1)?;
        u32::try_from(s).ok()
    }

    /// The largest shard's estimated bytes once loaded.
    pub fn largest_shard_bytes(&self) -> u64 {
        self.sizes.iter().copied().max().unwrap_or(0)
    }

    /// What loaded shards may hold (half the memory budget).
    pub fn keep_bytes(&self) -> u64 {
        self.keep
    }

    /// Shard files read back so far (for tests and the bench).
    pub fn reads(&self) -> u64 {
        self.cache.lock().map_or(0, |c| c.reads)
    }

    fn file_id(&self, shard: u32) -> ShardFileId {
        ShardFileId {
            data_version: self.version,
            key_id: self.key_id,
            shards: self.count,
            shard,
            width: match self.kind {
                Kind::Holder => TXN_WIDTH,
                Kind::Matcher => 0,
            },
        }
    }

    /// Shard `s`, from memory or its file (blocking: call it off the
    /// async runtime).
    fn get(&self, shard: u32) -> Result<Loaded, NodeError> {
        let range = self
            .range(shard)
            .ok_or(NodeError::Internal("a shard beyond the split"))?;
        {
            let mut c = self
                .cache
                .lock()
                .map_err(|_| NodeError::Internal("shard cache poisoned"))?;
            if let Some(at) = c.entries.iter().position(|(s, _, _)| *s == shard) {
                let e = c.entries.remove(at);
                let loaded = e.1.clone();
                c.entries.push(e);
                return Ok(loaded);
            }
        }
        let path = shard_path(&self.dir, shard);
        let read = read_shard(&path, &self.file_id(shard))?;
        if read.ids.len() != range.len() {
            return Err(crate::shards::ShardFileError::Damaged {
                path,
                what: "not as many records as the split wrote",
            }
            .into());
        }
        let (loaded, bytes) = match self.kind {
            Kind::Matcher => {
                let bytes = read.ids.iter().map(|i| matcher_bytes(i.len())).sum();
                (Loaded::Matcher(OwnIds::new(read.ids)?), bytes)
            }
            Kind::Holder => {
                let mut txns = Vec::with_capacity(read.ids.len());
                let mut at = 0usize;
                let mut bytes = 0u64;
                let bad = || crate::shards::ShardFileError::Damaged {
                    path: path.clone(),
                    what: "a transaction that does not decode",
                };
                for (cid, n) in read.ids.iter().zip(&read.items) {
                    let width = (*n as usize) * TXN_WIDTH as usize;
                    let values = read.values.get(at..at + width).ok_or_else(bad)?;
                    at += width;
                    let list = values
                        .chunks_exact(2)
                        .map(|p| match p {
                            [a, b] => txn_of(*a, *b),
                            _ => None,
                        })
                        .collect::<Option<Vec<Txn>>>()
                        .ok_or_else(bad)?;
                    bytes += holder_bytes(cid.len(), list.len());
                    txns.push(list);
                }
                let data = HolderData {
                    ids: OwnIds::new(read.ids)?,
                    key_offsets: None,
                    txns,
                    version: self.version,
                    report: LoadReport::default(),
                };
                (Loaded::Holder(Arc::new(data)), bytes)
            }
        };
        let mut c = self
            .cache
            .lock()
            .map_err(|_| NodeError::Internal("shard cache poisoned"))?;
        c.reads += 1;
        // Another task may have loaded it meanwhile: keep one copy.
        if let Some(at) = c.entries.iter().position(|(s, _, _)| *s == shard) {
            let e = c.entries.remove(at);
            c.bytes -= e.2;
        }
        // A shard larger than what may be kept is used and dropped; it
        // does not push out the shards that fit.
        if bytes <= self.keep {
            while !c.entries.is_empty() && c.bytes + bytes > self.keep {
                let (_, _, b) = c.entries.remove(0);
                c.bytes -= b;
            }
            c.entries.push((shard, loaded.clone(), bytes));
            c.bytes += bytes;
        }
        Ok(loaded)
    }

    /// The bank's shard `s`: its customers (numbered `0..n_s` in the
    /// shard's order) and their transactions.
    ///
    /// # Errors
    /// [`NodeError::ShardFile`] for a file that is damaged or not this
    /// split's; [`NodeError::Internal`] on a platform's store.
    pub fn holder(&self, shard: u32) -> Result<Arc<HolderData>, NodeError> {
        match self.get(shard)? {
            Loaded::Holder(h) => Ok(h),
            Loaded::Matcher(_) => Err(NodeError::Internal("a platform's shard read as the bank's")),
        }
    }

    /// The platform's shard `s`: its users' identifiers, numbered `0..n_s`
    /// in the shard's order.
    ///
    /// # Errors
    /// [`NodeError::ShardFile`] for a file that is damaged or not this
    /// split's; [`NodeError::Internal`] on a bank's store.
    pub fn matcher(&self, shard: u32) -> Result<OwnIds, NodeError> {
        match self.get(shard)? {
            Loaded::Matcher(m) => Ok(m),
            Loaded::Holder(_) => Err(NodeError::Internal("a bank's shard read as the platform's")),
        }
    }

    /// Every identifier, shard after shard (for the bench's bound).
    ///
    /// # Errors
    /// As [`ShardStore::holder`] and [`ShardStore::matcher`].
    pub fn all_ids(&self) -> Result<Vec<Vec<u8>>, NodeError> {
        let mut out = Vec::with_capacity(self.len());
        for s in 0..self.count {
            match self.kind {
                Kind::Holder => out.extend(self.holder(s)?.ids.iter().cloned()),
                Kind::Matcher => out.extend(self.matcher(s)?.iter().cloned()),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::data::{load_holder, load_matcher};
    use std::collections::BTreeMap;
    use std::fmt::Write as _;

    const CATEGORIES: [&str; 3] = ["groceries", "fuel", "other"];
    const SEGMENTS: [&str; 2] = ["gamer", "casual"];
    const COUNTRIES: [&str; 2] = ["GB", "other"];

    fn collab() -> CollaborationConfig {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
        CollaborationConfig {
            id: "input-test".into(),
            default_country_code: "44".into(),
            categories: v(&CATEGORIES),
            segments: v(&SEGMENTS),
            countries: v(&COUNTRIES),
        }
    }

    fn data_config(path: PathBuf, country: bool) -> DataConfig {
        DataConfig {
            path,
            id_column: Some("email".into()),
            id_kind: Some("email".into()),
            keys: Vec::new(),
            customer_column: None,
            max_bad_row_share: 0.05,
            category_column: Some("category".into()),
            amount_column: Some("amount".into()),
            date_column: Some("date".into()),
            segment_column: Some("segment".into()),
            country_column: country.then(|| "country".into()),
            progress: false,
            source: crate::config::SourceKind::Csv,
            postgres: None,
        }
    }

    /// A bank file: `n` customers, each with 0..4 transactions spread over
    /// the file (so a customer's rows are interleaved with others'), the
    /// same customer in other letter case, and a few bad rows.
    fn bank_csv(dir: &Path, n: usize) -> PathBuf {
        let mut s = String::from("email,category,amount,date\n");
        for round in 0..4 {
            for i in 0..n {
                if (i * 7 + round) % 5 == 4 {
                    continue;
                }
                let email = if round % 2 == 0 {
                    format!("user{i}@example.com")
                } else {
                    format!("User{i}@Example.com")
                };
                let cat = ["groceries", "fuel", "cinema"][(i + round) % 3];
                writeln!(
                    s,
                    "{email},{cat},{}.{:02},2024-0{}-1{}",
                    i % 300,
                    round * 7,
                    round + 1,
                    i % 9
                )
                .unwrap();
            }
            writeln!(s, "not an email,fuel,1.00,2024-01-01").unwrap();
        }
        let path = dir.join("bank.csv");
        std::fs::write(&path, s).unwrap();
        path
    }

    /// A platform file: `n` users, some twice (the first row wins).
    fn platform_csv(dir: &Path, n: usize) -> PathBuf {
        let mut s = String::from("email,segment,country\n");
        for i in 0..n {
            writeln!(s, "user{i}@example.com,{},{}", SEGMENTS[i % 2], ["GB", "FR"][i % 3 % 2]).unwrap();
            if i % 11 == 0 {
                writeln!(s, "USER{i}@example.com,{},GB", SEGMENTS[(i + 1) % 2]).unwrap();
            }
        }
        writeln!(s, "@,gamer,GB").unwrap();
        let path = dir.join("platform.csv");
        std::fs::write(&path, s).unwrap();
        path
    }

    fn split<'a>(count: u32, key: &'a ShardKey, budget: u64, node_key: &'a [u8; 32]) -> Split<'a> {
        Split {
            count,
            key,
            key_id: crate::shards::key_id(&[3; 32]),
            memory_budget: budget,
            node_key,
        }
    }

    #[test]
    fn the_bank_split_holds_what_the_whole_load_holds() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = data_config(bank_csv(dir.path(), 400), false);
        let whole = load_holder(&cfg, &collab()).unwrap();
        let key = ShardKey::new([3; 32]);
        let node_key = [5u8; 32];
        // 300 shards: more than the spill files open at once (shards then
        // share spill files), and many shards empty.
        for s in [2u32, 7, 300] {
            let out = dir.path().join(format!("shards-{s}"));
            let got = split_holder(&cfg, &collab(), &split(s, &key, 1 << 30, &node_key), &out).unwrap();
            assert_eq!(got.version, whole.version);
            assert_eq!(format!("{:?}", got.report), format!("{:?}", whole.report));
            let store = &got.store;
            assert_eq!(store.len(), whole.ids.len());
            // Each customer's transactions, in file order, per identifier;
            // and each shard in first-seen order, under the keyed hash.
            let want: BTreeMap<Vec<u8>, Vec<Txn>> = whole.ids.iter().cloned().zip(whole.txns.iter().cloned()).collect();
            let first_seen: HashMap<&[u8], usize> =
                whole.ids.iter().enumerate().map(|(k, i)| (i.as_slice(), k)).collect();
            let mut all = BTreeMap::new();
            let mut numbered = Vec::new();
            for shard in 0..s {
                let h = store.holder(shard).unwrap();
                assert_eq!(store.range(shard).unwrap().len(), h.ids.len());
                let order: Vec<usize> = h.ids.iter().map(|i| first_seen[i.as_slice()]).collect();
                assert!(
                    order.windows(2).all(|w| w[0] < w[1]),
                    "shard {shard} keeps first-seen order"
                );
                for (k, (i, t)) in h.ids.iter().zip(&h.txns).enumerate() {
                    assert_eq!(key.shard_of(i, s).unwrap(), shard);
                    assert_eq!(store.shard_of(store.range(shard).unwrap().start + k), Some(shard));
                    all.insert(i.clone(), t.clone());
                    numbered.push(i.clone());
                }
            }
            assert_eq!(all, want, "S = {s}");
            if s == 300 {
                assert!(
                    (0..s).any(|k| store.range(k).unwrap().is_empty()),
                    "some shard is empty"
                );
            }
            assert_eq!(store.shard_of(store.len()), None);
            assert_eq!(got.fingerprints, crate::state::fingerprints_by_id(&node_key, &numbered));
            // Only the shard files are left.
            let mut names: Vec<String> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            let files: Vec<String> = (0..s).map(|k| format!("shard-{k:05}.crs")).collect();
            assert_eq!(names, files);
        }
    }

    #[test]
    fn the_platform_split_holds_what_the_whole_load_holds() {
        let dir = tempfile::tempdir().unwrap();
        let key = ShardKey::new([3; 32]);
        let node_key = [5u8; 32];
        for country in [true, false] {
            let cfg = data_config(platform_csv(dir.path(), 500), country);
            let whole = load_matcher(&cfg, &collab()).unwrap();
            assert!(whole.report.duplicate_identifiers > 0);
            let got = split_matcher(
                &cfg,
                &collab(),
                &split(5, &key, 1 << 30, &node_key),
                &dir.path().join("s"),
            )
            .unwrap();
            assert_eq!(got.version, whole.version);
            assert_eq!(format!("{:?}", got.report), format!("{:?}", whole.report));
            let want: BTreeMap<Vec<u8>, (u16, Option<u16>)> = whole
                .ids
                .iter()
                .enumerate()
                .map(|(k, i)| (i.clone(), (whole.segments[k], whole.countries.get(k).copied())))
                .collect();
            let mut all = BTreeMap::new();
            let mut numbered = Vec::new();
            for shard in 0..5 {
                let ids = got.store.matcher(shard).unwrap();
                let start = got.store.range(shard).unwrap().start;
                for (k, i) in ids.iter().enumerate() {
                    assert_eq!(key.shard_of(i, 5).unwrap(), shard);
                    all.insert(
                        i.clone(),
                        (got.segments[start + k], got.countries.get(start + k).copied()),
                    );
                    numbered.push(i.clone());
                }
            }
            assert_eq!(all, want);
            assert_eq!(got.countries.is_empty(), !country);
            assert_eq!(got.fingerprints, crate::state::fingerprints_by_id(&node_key, &numbered));
        }
    }

    #[test]
    fn shards_stay_loaded_while_they_fit_half_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = data_config(bank_csv(dir.path(), 300), false);
        let key = ShardKey::new([3; 32]);
        let node_key = [5u8; 32];
        let count = 4u32;
        // Room for all: each shard is read once.
        let roomy = split_holder(
            &cfg,
            &collab(),
            &split(count, &key, 1 << 30, &node_key),
            &dir.path().join("a"),
        )
        .unwrap();
        for _ in 0..3 {
            for s in 0..count {
                roomy.store.holder(s).unwrap();
            }
        }
        assert_eq!(roomy.store.reads(), u64::from(count));
        // Room for none: every use reads the file again.
        let none = split_holder(
            &cfg,
            &collab(),
            &split(count, &key, 0, &node_key),
            &dir.path().join("b"),
        )
        .unwrap();
        for _ in 0..3 {
            for s in 0..count {
                none.store.holder(s).unwrap();
            }
        }
        assert_eq!(none.store.reads(), 3 * u64::from(count));
        // Room for about two shards: cycling through four evicts each
        // before its next use; the same shard twice in a row is kept.
        let two = 2 * (roomy.store.largest_shard_bytes() + 1) * 2;
        let some = split_holder(
            &cfg,
            &collab(),
            &split(count, &key, two, &node_key),
            &dir.path().join("c"),
        )
        .unwrap();
        for s in 0..count {
            some.store.holder(s).unwrap();
            some.store.holder(s).unwrap();
        }
        assert_eq!(some.store.reads(), u64::from(count));
        for s in 0..count {
            some.store.holder(s).unwrap();
        }
        assert_eq!(some.store.reads(), 2 * u64::from(count));
        // A shard larger than what may be kept is read, used and dropped,
        // and does not push out the shards that fit: with room for one
        // shard, a larger one in between leaves it loaded.
        let sizes: Vec<u64> = (0..count).map(|s| some.store.sizes[s as usize]).collect();
        let (small, large) = (
            (0..count).min_by_key(|s| sizes[*s as usize]).unwrap(),
            (0..count).max_by_key(|s| sizes[*s as usize]).unwrap(),
        );
        assert!(sizes[small as usize] < sizes[large as usize]);
        let one = split_holder(
            &cfg,
            &collab(),
            &split(count, &key, 2 * sizes[small as usize], &node_key),
            &dir.path().join("d"),
        )
        .unwrap();
        one.store.holder(small).unwrap();
        one.store.holder(large).unwrap();
        one.store.holder(small).unwrap();
        assert_eq!(one.store.reads(), 2, "the small shard stayed");
        one.store.holder(large).unwrap();
        assert_eq!(one.store.reads(), 3, "the large one is never kept");
        // Whatever was kept, the shard read back is the same.
        for s in 0..count {
            assert_eq!(some.store.holder(s).unwrap().txns, none.store.holder(s).unwrap().txns);
        }
    }

    #[test]
    fn a_damaged_or_foreign_shard_file_is_refused_when_used() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = data_config(bank_csv(dir.path(), 200), false);
        let key = ShardKey::new([3; 32]);
        let node_key = [5u8; 32];
        let out = dir.path().join("s");
        let got = split_holder(&cfg, &collab(), &split(3, &key, 0, &node_key), &out).unwrap();
        let path = shard_path(&out, 1);
        let good = std::fs::read(&path).unwrap();
        // One flipped byte in a record.
        let mut bad = good.clone();
        let at = bad.len() / 2;
        bad[at] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = got.store.holder(1).unwrap_err();
        assert!(
            e.to_string().contains("shard-00001.crs") && e.to_string().contains("damaged"),
            "{e}"
        );
        // Another shard's file in its place.
        std::fs::copy(shard_path(&out, 2), &path).unwrap();
        let e = got.store.holder(1).unwrap_err();
        assert!(e.to_string().contains("written for another shard"), "{e}");
        // The file of another data version (the input changed and was
        // split elsewhere).
        let elsewhere = dir.path().join("x");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let cfg2 = data_config(bank_csv(&elsewhere, 201), false);
        let other = split_holder(&cfg2, &collab(), &split(3, &key, 0, &node_key), &dir.path().join("t")).unwrap();
        assert_ne!(other.version, got.version);
        std::fs::copy(shard_path(&dir.path().join("t"), 1), &path).unwrap();
        let e = got.store.holder(1).unwrap_err();
        assert!(e.to_string().contains("written for another data version"), "{e}");
        // Gone.
        std::fs::remove_file(&path).unwrap();
        assert!(got.store.holder(1).is_err());
        // The messages never carry an identifier; the good file reads again.
        assert!(!e.to_string().contains("example.com"));
        std::fs::write(&path, &good).unwrap();
        assert_eq!(
            got.store.holder(1).unwrap().ids.len(),
            got.store.range(1).unwrap().len()
        );
    }
}
