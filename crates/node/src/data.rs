//! Loading a node's CSV input: streamed, with a progress bar on a terminal,
//! every bad row counted by reason with its line number (never its
//! content), and a clear failure when the share of bad rows passes the
//! configured limit. Also writes the synthetic data of `gen-data`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use cleanroom_crypto::normalize::{IdKind, NormalizationRules};
use cleanroom_query::parse_date;
use ring::digest::{Context, SHA256};

use crate::NodeError;
use crate::config::{CollaborationConfig, DataConfig};

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

/// The holder's data: one entry per distinct normalised identifier.
#[derive(Clone)]
pub struct HolderData {
    /// Normalised identifiers.
    pub ids: cleanroom_protocol::join::OwnIds,
    /// Each customer's transactions.
    pub txns: Vec<Vec<Txn>>,
    /// Digest of the input (file bytes and normalisation rules).
    pub version: [u8; 32],
    /// What loading found.
    pub report: LoadReport,
}

impl std::fmt::Debug for HolderData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HolderData {{ customers: {} }}", self.ids.len())
    }
}

/// The matcher's data: one entry per distinct normalised identifier.
pub struct MatcherData {
    /// Normalised identifiers.
    pub ids: cleanroom_protocol::join::OwnIds,
    /// Each user's segment index.
    pub segments: Vec<u16>,
    /// Each user's country index (empty when the config names no country column).
    pub countries: Vec<u16>,
    /// Digest of the input.
    pub version: [u8; 32],
    /// What loading found.
    pub report: LoadReport,
}

impl std::fmt::Debug for MatcherData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MatcherData {{ users: {} }}", self.ids.len())
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
    /// Bad rows by reason: count and the first line numbers.
    pub bad: BTreeMap<String, (u64, Vec<u64>)>,
}

impl LoadReport {
    fn bad_row(&mut self, reason: &str, line: u64) {
        let e = self.bad.entry(reason.to_string()).or_insert((0, Vec::new()));
        e.0 += 1;
        if e.1.len() < 5 {
            e.1.push(line);
        }
    }

    /// Total bad rows.
    pub fn bad_rows(&self) -> u64 {
        self.bad.values().map(|(n, _)| n).sum()
    }

    /// One line per reason: `reason: N rows (lines a, b, c...)`.
    pub fn describe(&self) -> String {
        self.bad
            .iter()
            .map(|(r, (n, lines))| {
                let l: Vec<String> = lines.iter().map(u64::to_string).collect();
                let more = if *n as usize > lines.len() { ", ..." } else { "" };
                format!("{r}: {n} rows (lines {}{more})", l.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn check(&self, path: &Path, max_share: f64) -> Result<(), NodeError> {
        let bad = self.bad_rows();
        #[allow(clippy::cast_precision_loss)]
        let share = if self.rows == 0 {
            0.0
        } else {
            bad as f64 / self.rows as f64
        };
        if share > max_share {
            return Err(NodeError::Data {
                path: path.display().to_string(),
                what: format!(
                    "{bad} of {} rows are bad ({:.2}%), over the limit of {:.2}%: {}",
                    self.rows,
                    share * 100.0,
                    max_share * 100.0,
                    self.describe()
                ),
            });
        }
        Ok(())
    }
}

pub use cleanroom_query::parse_cents;

/// A reader that hashes what passes through it and advances a progress bar.
struct Tee<R> {
    inner: R,
    hash: Context,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(b) = buf.get(..n) {
            self.hash.update(b);
        }
        self.bar.inc(n as u64);
        Ok(n)
    }
}

fn open(cfg: &DataConfig) -> Result<csv::Reader<Tee<BufReader<File>>>, NodeError> {
    let path = &cfg.path;
    let err = |what: String| NodeError::Data {
        path: path.display().to_string(),
        what,
    };
    let file = File::open(path).map_err(|e| err(e.to_string()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = if cfg.progress {
        let b = indicatif::ProgressBar::with_draw_target(Some(len), indicatif::ProgressDrawTarget::stderr());
        if let Ok(style) = indicatif::ProgressStyle::with_template("loading {msg} {bar:40} {bytes}/{total_bytes} {eta}")
        {
            b.set_style(style);
        }
        b.set_message(path.display().to_string());
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let tee = Tee {
        inner: BufReader::with_capacity(1 << 20, file),
        hash: Context::new(&SHA256),
        bar,
    };
    Ok(csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(tee))
}

fn column(headers: &csv::StringRecord, name: &str, path: &Path) -> Result<usize, NodeError> {
    headers
        .iter()
        .position(|h| h.trim() == name)
        .ok_or_else(|| NodeError::Data {
            path: path.display().to_string(),
            what: format!("no column named {name:?} in the header"),
        })
}

fn id_kind(cfg: &DataConfig) -> IdKind {
    if cfg.id_kind == "phone" {
        IdKind::Phone
    } else {
        IdKind::Email
    }
}

fn finish_version<R: Read>(reader: csv::Reader<Tee<R>>, rules: &NormalizationRules) -> [u8; 32] {
    let tee = reader.into_inner();
    tee.bar.finish_and_clear();
    let mut ctx = tee.hash;
    ctx.update(&rules.hash());
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

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
    let mut reader = open(cfg)?;
    let path = cfg.path.clone();
    let headers = reader.headers().map_err(|e| NodeError::Data {
        path: path.display().to_string(),
        what: format!("header: {e}"),
    })?;
    let id_col = column(headers, &cfg.id_column, &path)?;
    let col = |c: &Option<String>| column(headers, c.as_deref().unwrap_or(""), &path);
    let cat_col = col(&cfg.category_column)?;
    let amt_col = col(&cfg.amount_column)?;
    let date_col = col(&cfg.date_column)?;
    let kind = id_kind(cfg);
    let mut report = LoadReport::default();
    let mut record = csv::StringRecord::new();
    let mut line = 1u64;
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(_) => {
                line += 1;
                report.rows += 1;
                report.bad_row("unreadable row (quoting or column count)", line);
                continue;
            }
        }
        line = record.position().map_or(line + 1, |p| p.line());
        report.rows += 1;
        let field = |i: usize| record.get(i).unwrap_or("");
        let Ok(id) = rules.normalize(kind, field(id_col)) else {
            report.bad_row("identifier does not normalise", line);
            continue;
        };
        let Some(category) = domain_index(&collab.categories, field(cat_col), &mut report) else {
            report.bad_row("category outside the declared list (and no \"other\")", line);
            continue;
        };
        let Some(cents) = parse_cents(field(amt_col)) else {
            report.bad_row("amount is not a decimal with at most 2 places", line);
            continue;
        };
        let Ok(day) = parse_date(field(date_col).trim()) else {
            report.bad_row("date is not YYYY-MM-DD", line);
            continue;
        };
        keep(id, Txn { category, cents, day })?;
        report.loaded += 1;
    }
    let version = finish_version(reader, &rules);
    report.check(&path, cfg.max_bad_row_share)?;
    Ok((report, version))
}

/// Loads the platform's users, one per distinct identifier (the first
/// row of a repeated identifier wins; repeats are counted).
///
/// # Errors
/// [`NodeError::Data`] for an unreadable file, a missing column, or too many bad rows.
pub fn load_matcher(cfg: &DataConfig, collab: &CollaborationConfig) -> Result<MatcherData, NodeError> {
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
    let mut reader = open(cfg)?;
    let path = cfg.path.clone();
    let headers = reader.headers().map_err(|e| NodeError::Data {
        path: path.display().to_string(),
        what: format!("header: {e}"),
    })?;
    let id_col = column(headers, &cfg.id_column, &path)?;
    let seg_col = column(headers, cfg.segment_column.as_deref().unwrap_or(""), &path)?;
    let country_col = match &cfg.country_column {
        Some(c) => Some(column(headers, c, &path)?),
        None => None,
    };
    let kind = id_kind(cfg);
    let mut report = LoadReport::default();
    let mut record = csv::StringRecord::new();
    let mut line = 1u64;
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(_) => {
                line += 1;
                report.rows += 1;
                report.bad_row("unreadable row (quoting or column count)", line);
                continue;
            }
        }
        line = record.position().map_or(line + 1, |p| p.line());
        report.rows += 1;
        let field = |i: usize| record.get(i).unwrap_or("");
        let Ok(id) = rules.normalize(kind, field(id_col)) else {
            report.bad_row("identifier does not normalise", line);
            continue;
        };
        let Some(segment) = domain_index(&collab.segments, field(seg_col), &mut report) else {
            report.bad_row("segment outside the declared list (and no \"other\")", line);
            continue;
        };
        let country = match country_col {
            Some(c) => match domain_index(&collab.countries, field(c), &mut report) {
                Some(x) => Some(x),
                None => {
                    report.bad_row("country outside the declared list (and no \"other\")", line);
                    continue;
                }
            },
            None => None,
        };
        if keep(id, segment, country)? {
            report.loaded += 1;
        } else {
            report.duplicate_identifiers += 1;
        }
    }
    let version = finish_version(reader, &rules);
    report.check(&path, cfg.max_bad_row_share)?;
    Ok((report, version))
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

    fn cfg(path: &Path, share: f64) -> DataConfig {
        DataConfig {
            path: path.to_path_buf(),
            id_column: "email".into(),
            id_kind: "email".into(),
            max_bad_row_share: share,
            category_column: Some("category".into()),
            amount_column: Some("amount".into()),
            date_column: Some("date".into()),
            segment_column: Some("segment".into()),
            country_column: None,
            progress: false,
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
}
