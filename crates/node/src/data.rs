//! Loading a node's input (a CSV file, a Parquet file or a PostgreSQL
//! query: `crate::source`): streamed, with a progress bar on a terminal,
//! every bad row counted by reason with its line or row number (never its
//! content), and a clear failure when the share of bad rows passes the
//! configured limit. Also writes the synthetic data of `gen-data`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use cleanroom_crypto::normalize::{IdKind, NormalizationRules};
use cleanroom_query::parse_date;

use crate::NodeError;
use crate::config::{CollaborationConfig, DataConfig};
use crate::source::{Cell, Numbering, SourceEnd, Want, read_rows, typed_cents};

/// One bank transaction, parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Txn {
    /// Category index in the declared domain.
    pub category: u16,
    /// Amount in cents.
    pub cents: i64,
    /// Days since 1970-01-01.
    pub day: i32,
}

/// The holder's data: one entry per distinct normalised identifier, or,
/// with several keys, per customer.
#[derive(Clone)]
pub struct HolderData {
    /// Normalised identifiers (one per customer), or, with several keys,
    /// every customer's keys one after the other.
    pub ids: cleanroom_protocol::join::OwnIds,
    /// With several keys: customer `c`'s keys are
    /// `ids[key_offsets[c]..key_offsets[c + 1]]` (0 to `K` of them).
    pub key_offsets: Option<std::sync::Arc<Vec<u32>>>,
    /// Each customer's transactions.
    pub txns: Vec<Vec<Txn>>,
    /// Digest of the input (file bytes and normalisation rules).
    pub version: [u8; 32],
    /// What loading found.
    pub report: LoadReport,
}

impl std::fmt::Debug for HolderData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HolderData {{ customers: {} }}", self.txns.len())
    }
}

impl HolderData {
    /// Customers (with one key, its identifiers).
    pub fn customers(&self) -> usize {
        self.txns.len()
    }
}

/// The matcher's data: one entry per distinct normalised identifier (with
/// several keys, per distinct key, each with its user's attributes).
pub struct MatcherData {
    /// Normalised identifiers (keys).
    pub ids: cleanroom_protocol::join::OwnIds,
    /// Each identifier's user's segment index.
    pub segments: Vec<u16>,
    /// Each identifier's user's country index (empty when the config names no country column).
    pub countries: Vec<u16>,
    /// With several keys, each key's user (numbered in load order); empty
    /// with one key, where each identifier is a user.
    pub users: Vec<u32>,
    /// Digest of the input.
    pub version: [u8; 32],
    /// What loading found.
    pub report: LoadReport,
}

impl std::fmt::Debug for MatcherData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MatcherData {{ identifiers: {} }}", self.ids.len())
    }
}

impl MatcherData {
    /// The users the identifiers at `indices` belong to, each counted once
    /// (with one key, the identifiers themselves).
    pub fn users_of(&self, indices: impl Iterator<Item = usize>) -> usize {
        if self.users.is_empty() {
            return indices.count();
        }
        let mut users: Vec<u32> = indices.filter_map(|k| self.users.get(k).copied()).collect();
        users.sort_unstable();
        users.dedup();
        users.len()
    }
}

/// Rows read, loaded and refused, by reason.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LoadReport {
    /// Data rows read (header excluded).
    pub rows: u64,
    /// Rows used.
    pub loaded: u64,
    /// Rows whose identifier was already seen (merged, not dropped silently).
    pub duplicate_identifiers: u64,
    /// Values outside a declared domain, mapped to `other`.
    pub mapped_to_other: u64,
    /// With several keys: keys left out of a row that is kept, by reason
    /// (one that does not normalise; a bank customer's second, different
    /// value of a kind), with the first line or row numbers.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dropped_keys: BTreeMap<String, (u64, Vec<u64>)>,
    /// With several keys, the bank: distinct keys two or more of its
    /// customers hold, dropped from all of them, by kind
    /// (docs/protocol.md, "Multi-key matching").
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub shared_keys: BTreeMap<String, u64>,
    /// Bad rows by reason: count and the first line (CSV) or row numbers.
    pub bad: BTreeMap<String, (u64, Vec<u64>)>,
    /// Whether `bad` holds line numbers (CSV) or row numbers.
    pub numbering: Numbering,
}

/// One more `reason` at `line`: its count, and the first five lines.
fn count_at(counts: &mut BTreeMap<String, (u64, Vec<u64>)>, reason: String, line: u64) {
    let e = counts.entry(reason).or_insert((0, Vec::new()));
    e.0 += 1;
    if e.1.len() < 5 {
        e.1.push(line);
    }
}

/// `reason: N{unit} (lines a, b, c...)` for each reason.
fn describe_counts(counts: &BTreeMap<String, (u64, Vec<u64>)>, numbering: Numbering, unit: &str) -> Vec<String> {
    counts
        .iter()
        .map(|(r, (n, lines))| {
            let l: Vec<String> = lines.iter().map(u64::to_string).collect();
            let more = if *n as usize > lines.len() { ", ..." } else { "" };
            format!("{r}: {n}{unit} ({} {}{more})", numbering.word(), l.join(", "))
        })
        .collect()
}

impl LoadReport {
    fn bad_row(&mut self, reason: &str, line: u64) {
        count_at(&mut self.bad, reason.to_string(), line);
    }

    fn dropped_key(&mut self, reason: String, line: u64) {
        count_at(&mut self.dropped_keys, reason, line);
    }

    /// Keys dropped from kept rows and shared keys dropped, in one line
    /// (empty when none).
    pub fn describe_keys(&self) -> String {
        let mut parts = describe_counts(&self.dropped_keys, self.numbering, "");
        for (kind, n) in &self.shared_keys {
            parts.push(format!(
                "{kind} keys two or more customers share, dropped from all of them: {n}"
            ));
        }
        parts.join("; ")
    }

    /// Total bad rows.
    pub fn bad_rows(&self) -> u64 {
        self.bad.values().map(|(n, _)| n).sum()
    }

    /// One line per reason: `reason: N rows (lines a, b, c...)`.
    pub fn describe(&self) -> String {
        describe_counts(&self.bad, self.numbering, " rows").join("; ")
    }

    fn check(&self, source: &str, max_share: f64) -> Result<(), NodeError> {
        let bad = self.bad_rows();
        #[allow(clippy::cast_precision_loss)]
        let share = if self.rows == 0 {
            0.0
        } else {
            bad as f64 / self.rows as f64
        };
        if share > max_share {
            return Err(NodeError::Data {
                path: source.to_string(),
                what: format!(
                    "{bad} of {} rows are bad ({:.2}%), over the limit of {:.2}%: {}",
                    self.rows,
                    share * 100.0,
                    max_share * 100.0,
                    self.describe()
                ),
            });
        }
        if self.loaded == 0 {
            return Err(NodeError::Data {
                path: source.to_string(),
                what: if self.rows == 0 {
                    "no rows: the source is empty".into()
                } else {
                    format!("none of its {} rows can be used: {}", self.rows, self.describe())
                },
            });
        }
        Ok(())
    }
}

pub use cleanroom_query::parse_cents;

fn id_kind(cfg: &DataConfig) -> IdKind {
    cfg.key_columns().first().map_or(IdKind::Email, |(_, k)| *k)
}

/// The input's version: what the source hashed, then the normalisation
/// rules.
fn finish_version(end: SourceEnd, rules: &NormalizationRules, cfg: &DataConfig) -> [u8; 32] {
    let mut ctx = end.digest;
    ctx.update(&rules.hash());
    // With several keys, which columns are which kinds (a single-key
    // input's version is unchanged).
    if cfg.multi_key() {
        ctx.update(b"keys");
        for (column, kind) in cfg.key_columns() {
            for part in [kind.name().as_bytes(), column.as_bytes()] {
                ctx.update(&(part.len() as u64).to_le_bytes());
                ctx.update(part);
            }
        }
        let customer = cfg.customer_column.as_deref().unwrap_or("");
        ctx.update(&(customer.len() as u64).to_le_bytes());
        ctx.update(customer.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A text cell's text; `None` (counted as `"{what} is null"`) for a null.
fn text<'a>(cell: Option<&'a Cell>, what: &str, report: &mut LoadReport, at: u64) -> Option<&'a str> {
    match cell {
        Some(Cell::Text(s)) => Some(s),
        Some(Cell::Null) | None => {
            report.bad_row(&format!("{what} is null"), at);
            None
        }
        Some(_) => {
            report.bad_row(&format!("{what} is not text"), at);
            None
        }
    }
}

/// The start of every row's checks: a row that parsed, with an identifier
/// that is text and normalises; counted as bad otherwise.
fn identified<'a>(
    cells: Option<&'a [Cell]>,
    rules: &NormalizationRules,
    kind: IdKind,
    report: &mut LoadReport,
    at: u64,
) -> Option<(&'a [Cell], Vec<u8>)> {
    report.rows += 1;
    let Some(cells) = cells else {
        report.bad_row("unreadable row (quoting or column count)", at);
        return None;
    };
    let raw = text(cells.first(), "identifier", report, at)?;
    let Ok(id) = rules.normalize(kind, raw) else {
        report.bad_row("identifier does not normalise", at);
        return None;
    };
    Some((cells, id))
}

/// A text cell's index in its declared domain (`other` for a value
/// outside it, when the domain has one); counted as bad otherwise.
fn in_domain(cell: Option<&Cell>, what: &str, domain: &[String], report: &mut LoadReport, at: u64) -> Option<u16> {
    let value = text(cell, what, report, at)?;
    let index = domain_index(domain, value, report);
    if index.is_none() {
        report.bad_row(&format!("{what} outside the declared list (and no \"other\")"), at);
    }
    index
}

/// The end of a load: the report's numbering, the version, and the
/// bad-row limit.
fn finish_load(
    cfg: &DataConfig,
    mut report: LoadReport,
    end: SourceEnd,
    rules: &NormalizationRules,
) -> Result<(LoadReport, [u8; 32]), NodeError> {
    report.numbering = end.numbering;
    let version = finish_version(end, rules, cfg);
    report.check(&crate::source::label(cfg), cfg.max_bad_row_share)?;
    Ok((report, version))
}

/// An amount in cents: text as in CSV (at most 2 places), a typed
/// decimal with its trailing zeros dropped.
fn amount(cell: Option<&Cell>, report: &mut LoadReport, at: u64) -> Option<i64> {
    let cents = match cell {
        Some(Cell::Text(s)) => parse_cents(s),
        Some(Cell::Decimal(Some(s))) => typed_cents(s),
        Some(Cell::Null) | None => {
            report.bad_row("amount is null", at);
            return None;
        }
        Some(Cell::Decimal(None) | Cell::Day(_)) => None,
    };
    if cents.is_none() {
        report.bad_row("amount is not a decimal with at most 2 places", at);
    }
    cents
}

/// Days since 1970-01-01: text as in CSV (`YYYY-MM-DD`), a typed date
/// within the years 0000 to 9999.
fn date(cell: Option<&Cell>, report: &mut LoadReport, at: u64) -> Option<i32> {
    match cell {
        Some(Cell::Text(s)) => match parse_date(s.trim()) {
            Ok(d) => Some(d),
            Err(_) => {
                report.bad_row("date is not YYYY-MM-DD", at);
                None
            }
        },
        Some(Cell::Day(Some(d))) if (FIRST_DAY..=LAST_DAY).contains(d) => Some(*d),
        Some(Cell::Day(_)) => {
            report.bad_row("date outside the years 0000 to 9999", at);
            None
        }
        Some(Cell::Null) | None => {
            report.bad_row("date is null", at);
            None
        }
        Some(Cell::Decimal(_)) => {
            report.bad_row("date is not YYYY-MM-DD", at);
            None
        }
    }
}

/// A transaction from a bank row's category, amount and date (cells 1, 2
/// and 3); `None` (counted) when one is bad.
fn txn_of(cells: &[Cell], collab: &CollaborationConfig, report: &mut LoadReport, at: u64) -> Option<Txn> {
    let category = in_domain(cells.get(1), "category", &collab.categories, report, at)?;
    let cents = amount(cells.get(2), report, at)?;
    let day = date(cells.get(3), report, at)?;
    Some(Txn { category, cents, day })
}

/// A platform user's segment and, when the config names a country column,
/// country (`None`: no such column); `None` (counted) when one is bad.
fn user_attributes(
    segment: Option<&Cell>,
    country: Option<Option<&Cell>>,
    collab: &CollaborationConfig,
    report: &mut LoadReport,
    at: u64,
) -> Option<(u16, Option<u16>)> {
    let segment = in_domain(segment, "segment", &collab.segments, report, at)?;
    let country = match country {
        Some(cell) => Some(in_domain(cell, "country", &collab.countries, report, at)?),
        None => None,
    };
    Some((segment, country))
}

/// 0000-01-01 and 9999-12-31, in days since 1970-01-01: what `YYYY-MM-DD` can write.
pub(crate) const FIRST_DAY: i32 = -719_528;
pub(crate) const LAST_DAY: i32 = 2_932_896;

fn domain_index(domain: &[String], value: &str, report: &mut LoadReport) -> Option<u16> {
    let v = value.trim();
    if let Some(i) = domain.iter().position(|d| d == v) {
        return u16::try_from(i).ok();
    }
    let other = domain.iter().position(|d| d == "other")?;
    report.mapped_to_other += 1;
    u16::try_from(other).ok()
}

/// Loads the bank's transactions, one customer per distinct identifier.
///
/// # Errors
/// [`NodeError::Data`] for an unreadable file, a missing column, or too many bad rows.
pub fn load_holder(cfg: &DataConfig, collab: &CollaborationConfig) -> Result<HolderData, NodeError> {
    if cfg.multi_key() {
        return load_holder_multi(cfg, collab);
    }
    let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut ids = Vec::new();
    let mut txns: Vec<Vec<Txn>> = Vec::new();
    let (report, version) = stream_holder(cfg, collab, |id, txn| {
        let k = match index.get(&id) {
            Some(k) => *k,
            None => {
                index.insert(id.clone(), ids.len());
                ids.push(id);
                txns.push(Vec::new());
                ids.len() - 1
            }
        };
        if let Some(list) = txns.get_mut(k) {
            list.push(txn);
        }
        Ok(())
    })?;
    Ok(HolderData {
        key_offsets: None,
        // Distinct by construction (the index above); checked once here
        // so that no join checks again.
        ids: cleanroom_protocol::join::OwnIds::new(ids)?,
        txns,
        version,
        report,
    })
}

/// Streams the bank's file once: each good row's normalised identifier and
/// transaction go to `keep`, in file order; bad rows are counted. The
/// report and the input's version; refused when too many rows are bad.
///
/// # Errors
/// [`NodeError::Data`] for an unreadable file, a missing column, or too
/// many bad rows; `keep`'s error.
pub fn stream_holder(
    cfg: &DataConfig,
    collab: &CollaborationConfig,
    mut keep: impl FnMut(Vec<u8>, Txn) -> Result<(), NodeError>,
) -> Result<(LoadReport, [u8; 32]), NodeError> {
    let rules = NormalizationRules::v1(&collab.default_country_code);
    let col = |c: &Option<String>| c.clone().unwrap_or_default();
    let (cat_col, amt_col, date_col) = (
        col(&cfg.category_column),
        col(&cfg.amount_column),
        col(&cfg.date_column),
    );
    let id_col = cfg.key_columns().into_iter().next().map(|(c, _)| c).unwrap_or_default();
    let columns = [
        (id_col.as_str(), Want::Text),
        (cat_col.as_str(), Want::Text),
        (amt_col.as_str(), Want::Amount),
        (date_col.as_str(), Want::Date),
    ];
    let kind = id_kind(cfg);
    let mut report = LoadReport::default();
    let end = read_rows(cfg, &columns, |at, cells| {
        let Some((cells, id)) = identified(cells, &rules, kind, &mut report, at) else {
            return Ok(());
        };
        let Some(txn) = txn_of(cells, collab, &mut report, at) else {
            return Ok(());
        };
        keep(id, txn)?;
        report.loaded += 1;
        Ok(())
    })?;
    finish_load(cfg, report, end, &rules)
}

/// Loads the platform's users, one per distinct identifier (the first
/// row of a repeated identifier wins; repeats are counted).
///
/// # Errors
/// [`NodeError::Data`] for an unreadable file, a missing column, or too many bad rows.
pub fn load_matcher(cfg: &DataConfig, collab: &CollaborationConfig) -> Result<MatcherData, NodeError> {
    if cfg.multi_key() {
        return load_matcher_multi(cfg, collab);
    }
    let mut seen: HashMap<Vec<u8>, ()> = HashMap::new();
    let mut ids = Vec::new();
    let mut segments = Vec::new();
    let mut countries = Vec::new();
    let (report, version) = stream_matcher(cfg, collab, |id, segment, country| {
        if seen.insert(id.clone(), ()).is_some() {
            return Ok(false);
        }
        ids.push(id);
        segments.push(segment);
        if let Some(c) = country {
            countries.push(c);
        }
        Ok(true)
    })?;
    Ok(MatcherData {
        ids: cleanroom_protocol::join::OwnIds::new(ids)?,
        segments,
        countries,
        users: Vec::new(),
        version,
        report,
    })
}

/// Streams the platform's file once: each good row's normalised
/// identifier, segment and country (when the config names a country
/// column) go to `keep`, in file order, which says whether it kept the row
/// (false: a repeated identifier, counted as such). The report and the
/// input's version; refused when too many rows are bad.
///
/// # Errors
/// [`NodeError::Data`] for an unreadable file, a missing column, or too
/// many bad rows; `keep`'s error.
pub fn stream_matcher(
    cfg: &DataConfig,
    collab: &CollaborationConfig,
    mut keep: impl FnMut(Vec<u8>, u16, Option<u16>) -> Result<bool, NodeError>,
) -> Result<(LoadReport, [u8; 32]), NodeError> {
    let rules = NormalizationRules::v1(&collab.default_country_code);
    let seg_col = cfg.segment_column.clone().unwrap_or_default();
    let id_col = cfg.key_columns().into_iter().next().map(|(c, _)| c).unwrap_or_default();
    let mut columns = vec![(id_col.as_str(), Want::Text), (seg_col.as_str(), Want::Text)];
    if let Some(c) = &cfg.country_column {
        columns.push((c.as_str(), Want::Text));
    }
    let with_country = cfg.country_column.is_some();
    let kind = id_kind(cfg);
    let mut report = LoadReport::default();
    let end = read_rows(cfg, &columns, |at, cells| {
        let Some((cells, id)) = identified(cells, &rules, kind, &mut report, at) else {
            return Ok(());
        };
        let country_cell = with_country.then(|| cells.get(2));
        let Some((segment, country)) = user_attributes(cells.get(1), country_cell, collab, &mut report, at) else {
            return Ok(());
        };
        if keep(id, segment, country)? {
            report.loaded += 1;
        } else {
            report.duplicate_identifiers += 1;
        }
        Ok(())
    })?;
    finish_load(cfg, report, end, &rules)
}

/// A text or integer cell's text (a customer number); `None` (counted)
/// for a null.
fn label_text(cell: Option<&Cell>, what: &str, report: &mut LoadReport, at: u64) -> Option<String> {
    match cell {
        Some(Cell::Decimal(Some(s))) => Some(s.clone()),
        other => text(other, what, report, at).map(|s| s.trim().to_string()),
    }
}

/// A row's keys of `kinds` from `cells` (null or blank: missing; one that
/// does not normalise or is not text: missing, its reason pushed to
/// `left_out`, which the caller counts if it keeps the row).
fn row_keys(
    cells: &[Cell],
    kinds: &[IdKind],
    rules: &NormalizationRules,
    left_out: &mut Vec<String>,
) -> Vec<Option<Vec<u8>>> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, kind)| match cells.get(i) {
            Some(Cell::Text(raw)) if !raw.trim().is_empty() => match rules.normalize(*kind, raw) {
                Ok(k) => Some(k),
                Err(_) => {
                    left_out.push(format!("{} does not normalise (key left out)", kind.name()));
                    None
                }
            },
            Some(Cell::Text(_) | Cell::Null) | None => None,
            Some(_) => {
                left_out.push(format!("{} is not text (key left out)", kind.name()));
                None
            }
        })
        .collect()
}

/// Loads the bank's transactions with several keys: one customer per
/// distinct value of `customer_column`, its keys the first value of each
/// kind its rows give (a later, different one is left out and counted),
/// then every key two or more customers hold dropped from all of them
/// (counted per kind). Rows need a customer, a category, an amount and a
/// date; a customer without a usable key is kept (it cannot match).
fn load_holder_multi(cfg: &DataConfig, collab: &CollaborationConfig) -> Result<HolderData, NodeError> {
    let rules = NormalizationRules::v1(&collab.default_country_code);
    let key_cols = cfg.key_columns();
    let kinds: Vec<IdKind> = key_cols.iter().map(|(_, k)| *k).collect();
    let col = |c: &Option<String>| c.clone().unwrap_or_default();
    let names = [
        col(&cfg.customer_column),
        col(&cfg.category_column),
        col(&cfg.amount_column),
        col(&cfg.date_column),
    ];
    let mut columns = vec![
        (names[0].as_str(), Want::Label),
        (names[1].as_str(), Want::Text),
        (names[2].as_str(), Want::Amount),
        (names[3].as_str(), Want::Date),
    ];
    columns.extend(key_cols.iter().map(|(c, _)| (c.as_str(), Want::Text)));
    let mut report = LoadReport::default();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut keys: Vec<Vec<Option<Vec<u8>>>> = Vec::new();
    let mut txns: Vec<Vec<Txn>> = Vec::new();
    let end = read_rows(cfg, &columns, |at, cells| {
        report.rows += 1;
        let Some(cells) = cells else {
            report.bad_row("unreadable row (quoting or column count)", at);
            return Ok(());
        };
        let Some(customer) = label_text(cells.first(), "customer", &mut report, at) else {
            return Ok(());
        };
        if customer.is_empty() {
            report.bad_row("customer is empty", at);
            return Ok(());
        }
        let Some(txn) = txn_of(cells, collab, &mut report, at) else {
            return Ok(());
        };
        let mut left_out = Vec::new();
        let row = row_keys(cells.get(4..).unwrap_or(&[]), &kinds, &rules, &mut left_out);
        for reason in left_out {
            report.dropped_key(reason, at);
        }
        let c = match index.get(&customer) {
            Some(c) => *c,
            None => {
                index.insert(customer, keys.len());
                keys.push(vec![None; kinds.len()]);
                txns.push(Vec::new());
                keys.len() - 1
            }
        };
        if let (Some(have), Some(list)) = (keys.get_mut(c), txns.get_mut(c)) {
            for ((slot, new), kind) in have.iter_mut().zip(row).zip(&kinds) {
                match (slot.as_ref(), new) {
                    (None, new) => *slot = new,
                    (Some(old), Some(new)) if *old != new => report.dropped_key(
                        format!(
                            "{} differs from the customer's earlier rows (the first kept)",
                            kind.name()
                        ),
                        at,
                    ),
                    _ => {}
                }
            }
            list.push(txn);
        }
        report.loaded += 1;
        Ok(())
    })?;
    drop(index);
    let (mut report, version) = finish_load(cfg, report, end, &rules)?;
    // A key two or more customers hold is dropped from all of them
    // (counted by kind: slot `i` of every customer holds `kinds[i]`).
    let mut holders: HashMap<&[u8], (u32, usize)> = HashMap::new();
    for row in &keys {
        for (i, k) in row.iter().enumerate() {
            if let Some(k) = k {
                let e = holders.entry(k.as_slice()).or_insert((0, i));
                e.0 = e.0.saturating_add(1);
            }
        }
    }
    let mut shared: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    for (k, (n, i)) in holders {
        if n > 1 {
            shared.insert(k.to_vec());
            if let Some(kind) = kinds.get(i) {
                *report.shared_keys.entry(kind.name().to_string()).or_insert(0) += 1;
            }
        }
    }
    let mut offsets = Vec::with_capacity(keys.len() + 1);
    offsets.push(0u32);
    let mut flat = Vec::new();
    for row in keys {
        flat.extend(row.into_iter().flatten().filter(|k| !shared.contains(k)));
        offsets.push(u32::try_from(flat.len()).map_err(|_| NodeError::Data {
            path: crate::source::label(cfg),
            what: "more keys than a join supports (2^31)".into(),
        })?);
    }
    Ok(HolderData {
        ids: cleanroom_protocol::join::OwnIds::new(flat)?,
        key_offsets: Some(std::sync::Arc::new(offsets)),
        txns,
        version,
        report,
    })
}

/// Loads the platform's users with several keys: each of a user's keys
/// (of the configured kinds) with the user's segment and country; a key
/// an earlier user holds is kept for that user (counted as a duplicate
/// identifier); a user without a usable key is a bad row.
fn load_matcher_multi(cfg: &DataConfig, collab: &CollaborationConfig) -> Result<MatcherData, NodeError> {
    let rules = NormalizationRules::v1(&collab.default_country_code);
    let key_cols = cfg.key_columns();
    let kinds: Vec<IdKind> = key_cols.iter().map(|(_, k)| *k).collect();
    let seg_col = cfg.segment_column.clone().unwrap_or_default();
    let mut columns = vec![(seg_col.as_str(), Want::Text)];
    if let Some(c) = &cfg.country_column {
        columns.push((c.as_str(), Want::Text));
    }
    let first_key = columns.len();
    columns.extend(key_cols.iter().map(|(c, _)| (c.as_str(), Want::Text)));
    let mut report = LoadReport::default();
    let mut seen: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
    let (mut ids, mut segments, mut countries, mut users) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut user = 0u32;
    let end = read_rows(cfg, &columns, |at, cells| {
        report.rows += 1;
        let Some(cells) = cells else {
            report.bad_row("unreadable row (quoting or column count)", at);
            return Ok(());
        };
        let country_cell = cfg.country_column.is_some().then(|| cells.get(1));
        let Some((segment, country)) = user_attributes(cells.first(), country_cell, collab, &mut report, at) else {
            return Ok(());
        };
        // Keys left out are counted for a row that is kept only.
        let mut left_out = Vec::new();
        let row: Vec<Vec<u8>> = row_keys(cells.get(first_key..).unwrap_or(&[]), &kinds, &rules, &mut left_out)
            .into_iter()
            .flatten()
            .collect();
        if row.is_empty() {
            report.bad_row("no key (every key column null, blank or not normalising)", at);
            return Ok(());
        }
        for reason in left_out {
            report.dropped_key(reason, at);
        }
        for k in row {
            if seen.contains(&k) {
                report.duplicate_identifiers += 1;
                continue;
            }
            seen.insert(k.clone());
            ids.push(k);
            users.push(user);
            segments.push(segment);
            if let Some(c) = country {
                countries.push(c);
            }
        }
        user = user.saturating_add(1);
        report.loaded += 1;
        Ok(())
    })?;
    drop(seen);
    let (report, version) = finish_load(cfg, report, end, &rules)?;
    Ok(MatcherData {
        ids: cleanroom_protocol::join::OwnIds::new(ids)?,
        segments,
        countries,
        users,
        version,
        report,
    })
}

/// Writes `bank.csv` and `platform.csv` from synthetic data.
///
/// # Errors
/// [`NodeError::Data`] for a write failure.
pub fn write_synthetic(dir: &Path, data: &cleanroom_sim::synth::SynthData) -> Result<(), NodeError> {
    let err = |p: &Path, e: String| NodeError::Data {
        path: p.display().to_string(),
        what: e,
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, e.to_string()))?;
    let bank = dir.join("bank.csv");
    let mut w = csv::Writer::from_path(&bank).map_err(|e| err(&bank, e.to_string()))?;
    w.write_record(["customer", "email", "phone", "category", "amount", "date"])
        .map_err(|e| err(&bank, e.to_string()))?;
    for t in &data.bank {
        let amount = format!("{}.{:02}", t.amount_cents / 100, t.amount_cents % 100);
        let category = data.categories.get(t.category).map_or("other", String::as_str);
        w.write_record([
            t.customer.to_string().as_str(),
            &t.email,
            &t.phone,
            category,
            &amount,
            &cleanroom_query::format_date(t.day),
        ])
        .map_err(|e| err(&bank, e.to_string()))?;
    }
    w.flush().map_err(|e| err(&bank, e.to_string()))?;
    let platform = dir.join("platform.csv");
    let mut w = csv::Writer::from_path(&platform).map_err(|e| err(&platform, e.to_string()))?;
    w.write_record(["email", "phone", "segment", "country"])
        .map_err(|e| err(&platform, e.to_string()))?;
    for u in &data.platform {
        let seg = cleanroom_sim::synth::SEGMENTS
            .get(u.segment)
            .copied()
            .unwrap_or("other");
        let country = cleanroom_sim::synth::COUNTRIES
            .get(u.country)
            .copied()
            .unwrap_or("other");
        w.write_record([u.email.as_str(), &u.phone, seg, country])
            .map_err(|e| err(&platform, e.to_string()))?;
    }
    w.flush().map_err(|e| err(&platform, e.to_string()))?;
    Ok(())
}

/// Writes `bank.parquet` and `platform.parquet` from synthetic data: the
/// same rows and columns as [`write_synthetic`]'s CSV, typed (the
/// customer number as int64, the amount as DECIMAL(18,2), the date as
/// DATE), `row_group_rows` rows per row group.
///
/// # Errors
/// [`NodeError::Data`] for a write failure.
pub fn write_synthetic_parquet(
    dir: &Path,
    data: &cleanroom_sim::synth::SynthData,
    row_group_rows: usize,
) -> Result<(), NodeError> {
    use crate::source::{ParquetColumn as C, write_parquet};
    std::fs::create_dir_all(dir).map_err(|e| NodeError::Data {
        path: dir.display().to_string(),
        what: e.to_string(),
    })?;
    let b = &data.bank;
    let s = |f: &dyn Fn(&cleanroom_sim::synth::BankTxn) -> String| C::Str(b.iter().map(|t| Some(f(t))).collect());
    write_parquet(
        &dir.join("bank.parquet"),
        "message bank { required int64 customer; required binary email (UTF8); required binary phone (UTF8); \
         required binary category (UTF8); required int64 amount (DECIMAL(18,2)); required int32 date (DATE); }",
        &[
            C::I64(b.iter().map(|t| i64::try_from(t.customer).ok()).collect()),
            s(&|t| t.email.clone()),
            s(&|t| t.phone.clone()),
            s(&|t| {
                data.categories
                    .get(t.category)
                    .map_or("other", String::as_str)
                    .to_string()
            }),
            C::I64(b.iter().map(|t| Some(t.amount_cents)).collect()),
            C::I32(b.iter().map(|t| Some(t.day)).collect()),
        ],
        row_group_rows,
    )?;
    let p = &data.platform;
    let seg = |i: usize| {
        cleanroom_sim::synth::SEGMENTS
            .get(i)
            .copied()
            .unwrap_or("other")
            .to_string()
    };
    let country = |i: usize| {
        cleanroom_sim::synth::COUNTRIES
            .get(i)
            .copied()
            .unwrap_or("other")
            .to_string()
    };
    write_parquet(
        &dir.join("platform.parquet"),
        "message platform { required binary email (UTF8); required binary phone (UTF8); \
         required binary segment (UTF8); required binary country (UTF8); }",
        &[
            C::Str(p.iter().map(|u| Some(u.email.clone())).collect()),
            C::Str(p.iter().map(|u| Some(u.phone.clone())).collect()),
            C::Str(p.iter().map(|u| Some(seg(u.segment))).collect()),
            C::Str(p.iter().map(|u| Some(country(u.country))).collect()),
        ],
        row_group_rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collab() -> CollaborationConfig {
        CollaborationConfig {
            id: "t".into(),
            default_country_code: "44".into(),
            categories: vec!["groceries".into(), "fuel".into(), "other".into()],
            segments: vec!["a".into(), "b".into()],
            countries: vec![],
        }
    }

    fn multi_cfg(path: &Path, share: f64, bank: bool) -> DataConfig {
        let mut c = cfg(path, share);
        c.id_column = None;
        c.id_kind = None;
        // Listed phone first: the kinds are sorted (e-mail, phone).
        c.keys = vec![
            crate::config::KeyColumn {
                kind: "phone".into(),
                column: "phone".into(),
            },
            crate::config::KeyColumn {
                kind: "email".into(),
                column: "email".into(),
            },
        ];
        c.customer_column = bank.then(|| "customer".into());
        c
    }

    /// The bank's multi-key load: customers by their column, each kind's
    /// first value kept (a later different one counted), a key two
    /// customers hold dropped from both (counted by kind), keys that do
    /// not normalise left out (counted), a customer without a usable key
    /// kept, a row without a customer refused; every count and key checked
    /// against what the rows say.
    #[test]
    fn multi_key_bank_load_keeps_customers_and_drops_shared_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bank.csv");
        std::fs::write(
            &path,
            "customer,email,phone,category,amount,date\n\
             1,A@x.com,+44 7700 900001,groceries,1.00,2026-01-01\n\
             1,b@x.com,,groceries,2.00,2026-01-02\n\
             2,,+447700900002,fuel,3.00,2026-01-03\n\
             3,c@x.com,07700 900002,fuel,4.00,2026-01-04\n\
             ,d@x.com,+447700900009,fuel,5.00,2026-01-05\n\
             4,not-an-email,12,fuel,6.00,2026-01-06\n\
             1,a@x.com,+447700900001,fuel,7.00,2026-01-07\n",
        )
        .unwrap();
        let h = load_holder(&multi_cfg(&path, 0.5, true), &collab()).unwrap();
        let rules = NormalizationRules::v1("44");
        let email = |e: &str| rules.normalize(IdKind::Email, e).unwrap();
        let phone = |p: &str| rules.normalize(IdKind::Phone, p).unwrap();
        let offsets = h.key_offsets.as_ref().unwrap();
        let keys: Vec<Vec<Vec<u8>>> = offsets
            .windows(2)
            .map(|w| h.ids[w[0] as usize..w[1] as usize].to_vec())
            .collect();
        assert_eq!(
            keys,
            vec![
                vec![email("a@x.com"), phone("+447700900001")],
                vec![],
                vec![email("c@x.com")],
                vec![],
            ]
        );
        assert_eq!(h.customers(), 4);
        let cents: Vec<Vec<i64>> = h.txns.iter().map(|t| t.iter().map(|x| x.cents).collect()).collect();
        assert_eq!(cents, vec![vec![100, 200, 700], vec![300], vec![400], vec![600]]);
        let r = &h.report;
        assert_eq!((r.rows, r.loaded, r.bad_rows()), (7, 6, 1));
        assert_eq!(r.bad.get("customer is empty").map(|b| b.0), Some(1));
        assert_eq!(r.shared_keys.get("phone"), Some(&1));
        assert_eq!(r.shared_keys.get("email"), None);
        let dropped = |k: &str| r.dropped_keys.get(k).map(|d| (d.0, d.1.clone()));
        assert_eq!(
            dropped("email differs from the customer's earlier rows (the first kept)"),
            Some((1, vec![3]))
        );
        assert_eq!(dropped("email does not normalise (key left out)"), Some((1, vec![7])));
        assert_eq!(dropped("phone does not normalise (key left out)"), Some((1, vec![7])));
        // No key in the report's text.
        assert!(!r.describe_keys().contains("x.com") && !r.describe_keys().contains("7700"));
        // The version follows the key columns.
        let mut other = multi_cfg(&path, 0.5, true);
        other.keys.truncate(1);
        other.keys.push(crate::config::KeyColumn {
            kind: "email".into(),
            column: "customer".into(),
        });
        assert_ne!(load_holder(&other, &collab()).unwrap().version, h.version);
    }

    /// The platform's multi-key load: each key with its user's segment, a
    /// key an earlier user holds kept for it, a user without a usable key
    /// a bad row.
    #[test]
    fn multi_key_platform_load_keeps_each_key_with_its_user() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("platform.csv");
        std::fs::write(
            &path,
            "email,phone,segment\n\
             a@x.com,+447700900001,a\n\
             b@x.com,+447700900001,b\n\
             ,,a\n\
             ,+447700900003,b\n\
             not-an-email,,zzz\n\
             also-not-one,+447700900004,a\n",
        )
        .unwrap();
        let m = load_matcher(&multi_cfg(&path, 0.5, false), &collab()).unwrap();
        let rules = NormalizationRules::v1("44");
        let email = |e: &str| rules.normalize(IdKind::Email, e).unwrap();
        let phone = |p: &str| rules.normalize(IdKind::Phone, p).unwrap();
        assert_eq!(
            m.ids.to_vec(),
            vec![
                email("a@x.com"),
                phone("+447700900001"),
                email("b@x.com"),
                phone("+447700900003"),
                phone("+447700900004")
            ]
        );
        assert_eq!(m.segments, vec![0, 0, 1, 1, 0]);
        // Each key's user, and users counted once however many keys.
        assert_eq!(m.users, vec![0, 0, 1, 2, 3]);
        assert_eq!(m.users_of(0..5), 4);
        assert_eq!(m.users_of([0, 1, 3].into_iter()), 2);
        let r = &m.report;
        assert_eq!((r.rows, r.loaded, r.bad_rows(), r.duplicate_identifiers), (6, 4, 2, 1));
        // A key left out is counted for the row that is kept (line 7), not
        // for the one refused for its segment (line 6).
        assert_eq!(
            r.dropped_keys
                .get("email does not normalise (key left out)")
                .map(|d| (d.0, d.1.clone())),
            Some((1, vec![7]))
        );
    }

    fn cfg(path: &Path, share: f64) -> DataConfig {
        DataConfig {
            path: path.to_path_buf(),
            id_column: Some("email".into()),
            id_kind: Some("email".into()),
            keys: Vec::new(),
            customer_column: None,
            max_bad_row_share: share,
            category_column: Some("category".into()),
            amount_column: Some("amount".into()),
            date_column: Some("date".into()),
            segment_column: Some("segment".into()),
            country_column: None,
            progress: false,
            source: crate::config::SourceKind::Csv,
            postgres: None,
        }
    }

    #[test]
    fn cents() {
        assert_eq!(parse_cents("12"), Some(1200));
        assert_eq!(parse_cents("12.3"), Some(1230));
        assert_eq!(parse_cents("-0.05"), Some(-5));
        for bad in ["", "1.234", "1,00", "abc", "1e3", "."] {
            assert_eq!(parse_cents(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_rows_are_counted_by_reason_with_line_numbers_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bank.csv");
        std::fs::write(
            &p,
            "customer,email,phone,category,amount,date\n\
             1,a@x.com,,groceries,10.00,2026-01-02\n\
             2,SECRET-not-an-email,,fuel,1.00,2026-01-02\n\
             3,b@x.com,,bakery,2.00,2026-01-03\n\
             4,c@x.com,,fuel,12.345,2026-01-03\n\
             5, A@X.com ,,fuel,3.00,2026-01-04\n\
             6,d@x.com,,fuel,3.00,2026-02-30\n",
        )
        .unwrap();
        let err = load_holder(&cfg(&p, 0.1), &collab()).unwrap_err().to_string();
        assert!(err.contains("3 of 6 rows are bad"), "{err}");
        assert!(err.contains("identifier does not normalise: 1 rows (lines 3)"), "{err}");
        assert!(
            err.contains("amount is not a decimal with at most 2 places: 1 rows (lines 5)"),
            "{err}"
        );
        assert!(err.contains("date is not YYYY-MM-DD: 1 rows (lines 7)"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        let ok = load_holder(&cfg(&p, 0.5), &collab()).unwrap();
        // a@x.com twice (rows 1 and 5) is one customer with two transactions;
        // "bakery" went to "other".
        assert_eq!(ok.ids.len(), 2);
        assert_eq!(ok.txns[0].len(), 2);
        assert_eq!(ok.report.mapped_to_other, 1);
        assert_eq!(ok.report.loaded, 3);
    }

    #[test]
    fn missing_columns_and_files_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("platform.csv");
        std::fs::write(&p, "email,segment\na@x.com,a\na@x.com,b\nb@x.com,zzz\n").unwrap();
        let m = load_matcher(&cfg(&p, 0.5), &collab()).unwrap();
        assert_eq!(m.ids.len(), 1);
        assert_eq!(m.report.duplicate_identifiers, 1);
        assert_eq!(m.report.bad_rows(), 1);
        let mut c = cfg(&p, 0.5);
        c.segment_column = Some("seg".into());
        assert!(
            load_matcher(&c, &collab())
                .unwrap_err()
                .to_string()
                .contains("no column named \"seg\"")
        );
        let c = cfg(&dir.path().join("nope.csv"), 0.5);
        assert!(load_matcher(&c, &collab()).is_err());
    }

    mod parquet_source {
        use super::*;
        use crate::config::SourceKind;
        use crate::source::{ParquetColumn as C, write_parquet};
        use cleanroom_sim::synth::{COUNTRIES, SEGMENTS, SynthConfig, generate};

        fn synth_collab(data: &cleanroom_sim::synth::SynthData) -> CollaborationConfig {
            let with_other = |v: Vec<String>| {
                let mut v = v;
                v.push("other".into());
                v
            };
            CollaborationConfig {
                id: "t".into(),
                default_country_code: "44".into(),
                categories: with_other(data.categories.clone()),
                segments: with_other(SEGMENTS.iter().map(|s| s.to_string()).collect()),
                countries: with_other(COUNTRIES.iter().map(|s| s.to_string()).collect()),
            }
        }

        fn parquet_cfg(path: &Path, share: f64) -> DataConfig {
            let mut c = cfg(path, share);
            c.source = SourceKind::Parquet;
            c
        }

        /// The same synthetic rows as CSV and as Parquet (row groups of 7
        /// rows, so many of them) load to the same customers, in the same
        /// order, with the same transactions, and the same report.
        #[test]
        fn parquet_loads_what_the_csv_of_the_same_rows_loads() {
            let dir = tempfile::tempdir().unwrap();
            let data = generate(&SynthConfig {
                holder_customers: 120,
                matcher_users: 150,
                overlap: 0.5,
                categories: 5,
                seed: 3,
            });
            write_synthetic(dir.path(), &data).unwrap();
            write_synthetic_parquet(dir.path(), &data, 7).unwrap();
            let collab = synth_collab(&data);
            let csv_h = load_holder(&cfg(&dir.path().join("bank.csv"), 0.0), &collab).unwrap();
            let pq_h = load_holder(&parquet_cfg(&dir.path().join("bank.parquet"), 0.0), &collab).unwrap();
            assert_eq!(csv_h.ids.len(), 120);
            assert_eq!(csv_h.ids.to_vec(), pq_h.ids.to_vec());
            assert_eq!(csv_h.txns, pq_h.txns);
            assert_eq!(csv_h.report.rows, pq_h.report.rows);
            assert_eq!(csv_h.report.loaded, pq_h.report.loaded);
            assert_eq!(pq_h.report.numbering, Numbering::Rows);
            let m_cfg = |p: &str, kind| {
                let mut c = cfg(&dir.path().join(p), 0.0);
                c.source = kind;
                c.country_column = Some("country".into());
                c
            };
            let csv_m = load_matcher(&m_cfg("platform.csv", SourceKind::Csv), &collab).unwrap();
            let pq_m = load_matcher(&m_cfg("platform.parquet", SourceKind::Parquet), &collab).unwrap();
            assert_eq!(csv_m.ids.len(), 150);
            assert_eq!(csv_m.ids.to_vec(), pq_m.ids.to_vec());
            assert_eq!(csv_m.segments, pq_m.segments);
            assert_eq!(csv_m.countries, pq_m.countries);
            // The version follows the rows read: one changed amount changes it.
            let again = load_holder(&parquet_cfg(&dir.path().join("bank.parquet"), 0.0), &collab).unwrap();
            assert_eq!(again.version, pq_h.version);
            let mut changed = data.clone();
            changed.bank[3].amount_cents += 1;
            let other = tempfile::tempdir().unwrap();
            write_synthetic_parquet(other.path(), &changed, 7).unwrap();
            let v2 = load_holder(&parquet_cfg(&other.path().join("bank.parquet"), 0.0), &collab).unwrap();
            assert_ne!(v2.version, pq_h.version);
        }

        const BANK: &str = "message bank { optional binary email (UTF8); optional binary category (UTF8); \
                            optional int64 amount (DECIMAL(18,3)); optional int32 date (DATE); }";

        /// Nulls, an amount with a third decimal place, a date past 9999:
        /// counted by reason with row numbers, never their content.
        #[test]
        fn bad_parquet_rows_are_counted_by_reason_with_row_numbers_only() {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("bank.parquet");
            let far = crate::data::LAST_DAY + 1;
            write_parquet(
                &p,
                BANK,
                &[
                    C::Str(vec![
                        Some("a@x.com".into()),
                        None,
                        Some("b@x.com".into()),
                        Some("SECRET-not-an-email".into()),
                        Some("c@x.com".into()),
                        Some("d@x.com".into()),
                        Some("a@x.com".into()),
                    ]),
                    C::Str(vec![
                        Some("fuel".into()),
                        Some("fuel".into()),
                        Some("fuel".into()),
                        Some("fuel".into()),
                        None,
                        Some("fuel".into()),
                        Some("bakery".into()),
                    ]),
                    C::I64(vec![
                        Some(12_340),
                        Some(1),
                        Some(12_345),
                        Some(1),
                        Some(1),
                        Some(1_000),
                        Some(-500),
                    ]),
                    C::I32(vec![
                        Some(20_000),
                        Some(0),
                        Some(1),
                        Some(2),
                        Some(3),
                        Some(far),
                        Some(-719_528),
                    ]),
                ],
                3,
            )
            .unwrap();
            let err = load_holder(&parquet_cfg(&p, 0.1), &collab()).unwrap_err().to_string();
            assert!(err.contains("5 of 7 rows are bad"), "{err}");
            assert!(err.contains("identifier is null: 1 rows (rows 2)"), "{err}");
            assert!(
                err.contains("amount is not a decimal with at most 2 places: 1 rows (rows 3)"),
                "{err}"
            );
            assert!(err.contains("identifier does not normalise: 1 rows (rows 4)"), "{err}");
            assert!(err.contains("category is null: 1 rows (rows 5)"), "{err}");
            assert!(
                err.contains("date outside the years 0000 to 9999: 1 rows (rows 6)"),
                "{err}"
            );
            assert!(!err.contains("SECRET") && !err.contains("x.com"), "{err}");
            let ok = load_holder(&parquet_cfg(&p, 0.8), &collab()).unwrap();
            // Rows 1 and 7: one customer, 12.340 -> 1234 cents, -0.500 ->
            // -50, 0000-01-01 kept; "bakery" went to "other".
            assert_eq!(ok.ids.len(), 1);
            assert_eq!(
                ok.txns[0],
                vec![
                    Txn {
                        category: 1,
                        cents: 1234,
                        day: 20_000
                    },
                    Txn {
                        category: 2,
                        cents: -50,
                        day: -719_528
                    }
                ]
            );
        }

        #[test]
        fn parquet_files_of_the_wrong_shape_are_refused_by_name() {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("bank.parquet");
            let one = |v: C| {
                vec![
                    C::Str(vec![Some("a@x.com".into())]),
                    C::Str(vec![Some("fuel".into())]),
                    v,
                    C::I32(vec![Some(1)]),
                ]
            };
            // A floating-point amount is refused before any row is read.
            write_parquet(
                &p,
                "message m { required binary email (UTF8); required binary category (UTF8); required double amount; required int32 date (DATE); }",
                &one(C::F64(vec![Some(1.5)])),
                10,
            )
            .unwrap();
            let err = load_holder(&parquet_cfg(&p, 0.0), &collab()).unwrap_err().to_string();
            assert!(
                err.contains("bank.parquet") && err.contains("\"amount\" is floating point"),
                "{err}"
            );
            // A date stored as a plain integer.
            write_parquet(
                &p,
                "message m { required binary email (UTF8); required binary category (UTF8); required int64 amount; required int32 date; }",
                &[C::Str(vec![Some("a@x.com".into())]), C::Str(vec![Some("fuel".into())]), C::I64(vec![Some(3)]), C::I32(vec![Some(1)])],
                10,
            )
            .unwrap();
            let err = load_holder(&parquet_cfg(&p, 0.0), &collab()).unwrap_err().to_string();
            assert!(
                err.contains("\"date\" is INT32; it must be a DATE or a string"),
                "{err}"
            );
            // An identifier as raw binary, not a string.
            write_parquet(
                &p,
                "message m { required binary email; required binary category (UTF8); required int64 amount; required int32 date (DATE); }",
                &[C::Str(vec![Some("a@x.com".into())]), C::Str(vec![Some("fuel".into())]), C::I64(vec![Some(3)]), C::I32(vec![Some(1)])],
                10,
            )
            .unwrap();
            let err = load_holder(&parquet_cfg(&p, 0.0), &collab()).unwrap_err().to_string();
            assert!(err.contains("\"email\" is BYTE_ARRAY; it must be a string"), "{err}");
            // A missing column.
            write_parquet(
                &p,
                "message m { required binary email (UTF8); required binary category (UTF8); required int64 amount; }",
                &[
                    C::Str(vec![Some("a@x.com".into())]),
                    C::Str(vec![Some("fuel".into())]),
                    C::I64(vec![Some(3)]),
                ],
                10,
            )
            .unwrap();
            let err = load_holder(&parquet_cfg(&p, 0.0), &collab()).unwrap_err().to_string();
            assert!(err.contains("no column named \"date\" in the Parquet schema"), "{err}");
            // An integer amount is whole units; good file for what follows.
            write_parquet(
                &p,
                "message m { required binary email (UTF8); required binary category (UTF8); required int64 amount; required binary date (UTF8); }",
                &[C::Str(vec![Some("a@x.com".into())]), C::Str(vec![Some("fuel".into())]), C::I64(vec![Some(3)]), C::Str(vec![Some("2026-01-02".into())])],
                10,
            )
            .unwrap();
            let ok = load_holder(&parquet_cfg(&p, 0.0), &collab()).unwrap();
            assert_eq!(ok.txns[0][0].cents, 300);
            assert_eq!(ok.txns[0][0].day, cleanroom_query::parse_date("2026-01-02").unwrap());
            // Truncated (its footer gone), and not Parquet at all.
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
            let err = load_holder(&parquet_cfg(&p, 0.0), &collab()).unwrap_err().to_string();
            assert!(
                err.contains("bank.parquet") && err.contains("not a readable Parquet file"),
                "{err}"
            );
            std::fs::write(&p, "email,category,amount,date\na@x.com,fuel,1,2026-01-01\n").unwrap();
            let err = load_holder(&parquet_cfg(&p, 0.0), &collab()).unwrap_err().to_string();
            assert!(err.contains("not a readable Parquet file"), "{err}");
            // A string column with bytes that are not UTF-8: refused, and
            // the message does not repeat them.
            write_parquet(
                &p,
                "message m { required binary email (UTF8); required binary category (UTF8); required int64 amount; required int32 date (DATE); }",
                &[
                    C::Bytes(vec![Some(b"a@x.com".to_vec()), Some(b"SECRET\xff\xfe".to_vec())]),
                    C::Str(vec![Some("fuel".into()), Some("fuel".into())]),
                    C::I64(vec![Some(3), Some(3)]),
                    C::I32(vec![Some(1), Some(1)]),
                ],
                10,
            )
            .unwrap();
            let err = load_holder(&parquet_cfg(&p, 0.0), &collab()).unwrap_err().to_string();
            assert!(
                err.contains("row 2 cannot be read") && err.contains("not UTF-8"),
                "{err}"
            );
            assert!(!err.contains("SECRET") && !err.contains("83, 69, 67"), "{err}");
            // An empty file of the right schema: nothing to load.
            write_parquet(
                &p,
                "message m { required binary email (UTF8); required binary category (UTF8); required int64 amount; required int32 date (DATE); }",
                &[C::Str(vec![]), C::Str(vec![]), C::I64(vec![]), C::I32(vec![])],
                10,
            )
            .unwrap();
            let err = load_holder(&parquet_cfg(&p, 0.0), &collab()).unwrap_err().to_string();
            assert!(err.contains("no rows: the source is empty"), "{err}");
        }
    }
}
