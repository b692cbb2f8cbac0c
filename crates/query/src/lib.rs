#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
//! Templates and plans (first cut).
//!
//! A template is an approved query with named parameters and their allowed
//! values, per-customer clip bounds, the ρ charged per run, the minimum
//! noisy count per cell and the analysts allowed. Binding a template to an
//! analyst's parameters gives a [`Plan`]: what the holder computes per
//! customer, what the matcher restricts its input to, the output cells, and
//! the sensitivity that calibrates the noise.
//!
//! This version knows three template kinds (`overlap`, `spend_by_category`,
//! `spend_by_category_for_segment`); the SQL dialect will produce the same
//! [`Plan`] type.

pub mod sql;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

/// Errors binding a template. Messages say what to change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// No template of that name.
    #[error("no template named {0:?}; run `cleanroom templates` to list them")]
    UnknownTemplate(String),
    /// The analyst is not in the template's list.
    #[error("analyst {analyst:?} is not allowed to run template {template:?}")]
    AnalystNotAllowed {
        /// The analyst.
        analyst: String,
        /// The template.
        template: String,
    },
    /// A parameter the template does not take.
    #[error("template {template:?} takes no parameter {param:?} (it takes: {takes})")]
    UnknownParameter {
        /// The template.
        template: String,
        /// The parameter.
        param: String,
        /// What it takes.
        takes: String,
    },
    /// A required parameter is missing.
    #[error("parameter {0:?} is required")]
    MissingParameter(String),
    /// A parameter given twice.
    #[error("parameter {0:?} given more than once")]
    DuplicateParameter(String),
    /// A value of the wrong form or outside the allowed values.
    #[error("parameter {param:?}: {reason}")]
    BadParameter {
        /// The parameter.
        param: String,
        /// Why, with the allowed values.
        reason: String,
    },
    /// A template definition that cannot work.
    #[error("template {template:?}: {reason}")]
    BadTemplate {
        /// The template.
        template: String,
        /// Why.
        reason: String,
    },
}

/// The kinds of template this version runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// The noisy number of shared customers.
    Overlap,
    /// Customers, transactions and spend per merchant category over the
    /// shared customers, for a date range.
    SpendByCategory,
    /// The same, restricted to platform users in one segment.
    SpendByCategoryForSegment,
}

impl TemplateKind {
    /// Its name in configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateKind::Overlap => "overlap",
            TemplateKind::SpendByCategory => "spend_by_category",
            TemplateKind::SpendByCategoryForSegment => "spend_by_category_for_segment",
        }
    }

    /// The parameters it takes.
    pub fn parameters(self) -> &'static [&'static str] {
        match self {
            TemplateKind::Overlap => &[],
            TemplateKind::SpendByCategory => &["start", "end"],
            TemplateKind::SpendByCategoryForSegment => &["start", "end", "segment"],
        }
    }
}

/// Per-customer clip bounds (per category).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clip {
    /// Most transactions one customer adds to one category's count.
    pub transactions: u64,
    /// Most cents one customer adds to one category's spend.
    pub spend_cents: u64,
}

/// A template as configured on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// Its name.
    pub name: String,
    /// What it computes.
    pub kind: TemplateKind,
    /// ρ per run, in millionths.
    pub rho_micro: u64,
    /// Cells whose noisy count is below this are suppressed.
    pub min_count: u64,
    /// Analysts allowed to run it.
    pub analysts: Vec<String>,
    /// Clip bounds.
    pub clip: Clip,
    /// Allowed date window `[first, last]` (days since 1970-01-01).
    pub dates: (i32, i32),
    /// Allowed segments (for the segment template).
    pub segments: Vec<String>,
}

/// The public domains of the collaboration's categorical columns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domains {
    /// Merchant categories (holder).
    pub categories: Vec<String>,
    /// Platform segments (matcher).
    pub segments: Vec<String>,
}

/// What one query computes, on both sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Template name.
    pub template: String,
    /// Kind.
    pub kind: TemplateKind,
    /// Date range `[start, end]`, days since epoch.
    pub dates: (i32, i32),
    /// The matcher's input filter: a segment, if any.
    pub segment: Option<String>,
    /// Categories, in cell order.
    pub categories: Vec<String>,
    /// Clip bounds.
    pub clip: Clip,
    /// The parameters as given, sorted by name.
    pub params: Vec<(String, String)>,
}

/// One output cell's description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellSpec {
    /// Name, e.g. `spend_cents[groceries]`.
    pub name: String,
    /// Integer weight the cell is multiplied by before noise (see [`Plan::weights`]).
    pub weight: u64,
    /// Index of the count cell that decides whether this cell is shown.
    pub count_cell: usize,
}

/// Parses `YYYY-MM-DD` to days since 1970-01-01.
///
/// # Errors
/// A message naming the expected form.
pub fn parse_date(s: &str) -> Result<i32, String> {
    let bad = || format!("{s:?} is not a date of the form YYYY-MM-DD");
    let mut it = s.split('-');
    let (Some(y), Some(m), Some(d), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(bad());
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return Err(bad());
    }
    let y: i64 = y.parse().map_err(|_| bad())?;
    let m: i64 = m.parse().map_err(|_| bad())?;
    let d: i64 = d.parse().map_err(|_| bad())?;
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let dim = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad()),
    };
    if d < 1 || d > dim {
        return Err(bad());
    }
    // Days from civil (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    i32::try_from(era * 146_097 + doe - 719_468).map_err(|_| bad())
}

/// Formats days since 1970-01-01 as `YYYY-MM-DD`.
pub fn format_date(days: i32) -> String {
    let z = i64::from(days) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

/// Parses a decimal ρ such as `0.25` to millionths.
///
/// # Errors
/// A message for anything but a positive decimal with at most six decimals.
pub fn parse_micro(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a positive decimal with at most 6 decimals");
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty()
        || frac.len() > 6
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| bad())?
    };
    let mut f: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| bad())?
    };
    for _ in frac.len()..6 {
        f *= 10;
    }
    let v = int
        .checked_mul(1_000_000)
        .and_then(|i| i.checked_add(f))
        .ok_or_else(bad)?;
    if v == 0 {
        return Err(bad());
    }
    Ok(v)
}

/// Formats millionths as a decimal.
pub fn format_micro(v: u64) -> String {
    let s = format!("{}.{:06}", v / 1_000_000, v % 1_000_000);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl Template {
    /// Checks the template's own consistency.
    ///
    /// # Errors
    /// [`QueryError::BadTemplate`].
    pub fn check(&self, domains: &Domains) -> Result<(), QueryError> {
        let bad = |reason: &str| QueryError::BadTemplate {
            template: self.name.clone(),
            reason: reason.to_string(),
        };
        if self.rho_micro == 0 {
            return Err(bad("rho must be positive"));
        }
        if self.clip.transactions == 0 || self.clip.spend_cents == 0 {
            return Err(bad("clip bounds must be positive"));
        }
        if self.dates.0 > self.dates.1 {
            return Err(bad("the date window ends before it starts"));
        }
        if self.kind == TemplateKind::SpendByCategoryForSegment {
            if self.segments.is_empty() {
                return Err(bad("list the segments analysts may choose"));
            }
            if let Some(s) = self.segments.iter().find(|s| !domains.segments.contains(s)) {
                return Err(bad(&format!("segment {s:?} is not in the declared segment list")));
            }
        }
        if domains.categories.is_empty() {
            return Err(bad("the collaboration declares no categories"));
        }
        Ok(())
    }

    /// Binds the analyst's parameters.
    ///
    /// # Errors
    /// A [`QueryError`] saying which parameter is wrong and what is allowed.
    pub fn bind(&self, analyst: &str, params: &[(String, String)], domains: &Domains) -> Result<Plan, QueryError> {
        if !self.analysts.iter().any(|a| a == analyst) {
            return Err(QueryError::AnalystNotAllowed {
                analyst: analyst.to_string(),
                template: self.name.clone(),
            });
        }
        let takes = self.kind.parameters();
        let mut sorted: Vec<(String, String)> = params.to_vec();
        sorted.sort();
        for w in sorted.windows(2) {
            if let [a, b] = w
                && a.0 == b.0
            {
                return Err(QueryError::DuplicateParameter(a.0.clone()));
            }
        }
        for (k, _) in &sorted {
            if !takes.contains(&k.as_str()) {
                return Err(QueryError::UnknownParameter {
                    template: self.name.clone(),
                    param: k.clone(),
                    takes: if takes.is_empty() {
                        "none".to_string()
                    } else {
                        takes.join(", ")
                    },
                });
            }
        }
        let get = |k: &str| {
            sorted
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| QueryError::MissingParameter(k.to_string()))
        };
        let window = format!("{} to {}", format_date(self.dates.0), format_date(self.dates.1));
        let date = |k: &str| -> Result<i32, QueryError> {
            let d = parse_date(get(k)?).map_err(|reason| QueryError::BadParameter {
                param: k.to_string(),
                reason,
            })?;
            if d < self.dates.0 || d > self.dates.1 {
                return Err(QueryError::BadParameter {
                    param: k.to_string(),
                    reason: format!("must be within the template's window, {window}"),
                });
            }
            Ok(d)
        };
        let (dates, segment) = match self.kind {
            TemplateKind::Overlap => (self.dates, None),
            TemplateKind::SpendByCategory | TemplateKind::SpendByCategoryForSegment => {
                let (s, e) = (date("start")?, date("end")?);
                if s > e {
                    return Err(QueryError::BadParameter {
                        param: "end".to_string(),
                        reason: "must not be before start".to_string(),
                    });
                }
                let segment = if self.kind == TemplateKind::SpendByCategoryForSegment {
                    let seg = get("segment")?;
                    if !self.segments.iter().any(|s| s == seg) {
                        return Err(QueryError::BadParameter {
                            param: "segment".to_string(),
                            reason: format!("must be one of: {}", self.segments.join(", ")),
                        });
                    }
                    Some(seg.to_string())
                } else {
                    None
                };
                ((s, e), segment)
            }
        };
        Ok(Plan {
            template: self.name.clone(),
            kind: self.kind,
            dates,
            segment,
            categories: domains.categories.clone(),
            clip: self.clip,
            params: sorted,
        })
    }
}

impl Plan {
    /// The output cells, in order. Count cells have weight
    /// `clip.spend_cents`, transaction cells `clip.spend_cents /
    /// clip.transactions` (at least 1), spend cells 1: every cell's clip
    /// bound times its weight is about `clip.spend_cents`, so the one noise
    /// scale the L2 calibration gives is shared fairly between counts and
    /// sums (the analyst divides by the weight).
    pub fn cells(&self) -> Vec<CellSpec> {
        match self.kind {
            TemplateKind::Overlap => vec![CellSpec {
                name: "shared_customers".to_string(),
                weight: 1,
                count_cell: 0,
            }],
            _ => {
                let mut out = Vec::with_capacity(3 * self.categories.len());
                let wt = (self.clip.spend_cents / self.clip.transactions).max(1);
                for c in &self.categories {
                    let k = out.len();
                    out.push(CellSpec {
                        name: format!("customers[{c}]"),
                        weight: self.clip.spend_cents,
                        count_cell: k,
                    });
                    out.push(CellSpec {
                        name: format!("transactions[{c}]"),
                        weight: wt,
                        count_cell: k,
                    });
                    out.push(CellSpec {
                        name: format!("spend_cents[{c}]"),
                        weight: 1,
                        count_cell: k,
                    });
                }
                out
            }
        }
    }

    /// Words per row.
    pub fn width(&self) -> usize {
        match self.kind {
            TemplateKind::Overlap => 1,
            _ => 3 * self.categories.len(),
        }
    }

    /// `Δ²`: the squared L2 norm of the largest weighted vector one customer
    /// (or one platform user) can change.
    pub fn delta_squared(&self) -> u128 {
        self.cells()
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let bound = match (self.kind, k % 3) {
                    (TemplateKind::Overlap, _) | (_, 0) => 1,
                    (_, 1) => self.clip.transactions,
                    _ => self.clip.spend_cents,
                };
                let x = u128::from(bound) * u128::from(c.weight);
                x * x
            })
            .sum()
    }

    /// A digest of everything that determines the cells' exact values: both
    /// nodes must compute the same one.
    pub fn digest(&self) -> [u8; 32] {
        let mut ctx = Context::new(&SHA256);
        let mut put = |b: &[u8]| {
            ctx.update(&(b.len() as u64).to_le_bytes());
            ctx.update(b);
        };
        put(b"cleanroom-plan-v1");
        put(self.kind.as_str().as_bytes());
        put(&self.dates.0.to_le_bytes());
        put(&self.dates.1.to_le_bytes());
        put(self.segment.as_deref().unwrap_or("").as_bytes());
        for c in &self.categories {
            put(c.as_bytes());
        }
        put(&self.clip.transactions.to_le_bytes());
        put(&self.clip.spend_cents.to_le_bytes());
        let d = ctx.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// A digest of the matcher's input restriction: joins are cached per filter.
    pub fn join_filter(&self) -> String {
        match &self.segment {
            Some(s) => format!("segment={s}"),
            None => "all".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Domains {
        Domains {
            categories: vec!["a".into(), "b".into()],
            segments: vec!["s1".into(), "s2".into()],
        }
    }

    fn template(kind: TemplateKind) -> Template {
        Template {
            name: "t".into(),
            kind,
            rho_micro: 100_000,
            min_count: 10,
            analysts: vec!["alice".into()],
            clip: Clip {
                transactions: 10,
                spend_cents: 1000,
            },
            dates: (parse_date("2026-01-01").unwrap(), parse_date("2026-12-31").unwrap()),
            segments: vec!["s1".into()],
        }
    }

    fn p(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn dates_round_trip() {
        assert_eq!(parse_date("1970-01-01"), Ok(0));
        assert_eq!(parse_date("2026-01-01"), Ok(20_454));
        assert_eq!(parse_date("2000-02-29"), Ok(11_016));
        for d in [-1000, 0, 11_016, 20_454, 30_000] {
            assert_eq!(parse_date(&format_date(d)), Ok(d));
        }
        for bad in [
            "2026-02-29",
            "2026-13-01",
            "2026-1-01",
            "x",
            "2026-01-01-01",
            "2026-00-10",
        ] {
            assert!(parse_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn micro_parsing() {
        assert_eq!(parse_micro("0.5"), Ok(500_000));
        assert_eq!(parse_micro("2"), Ok(2_000_000));
        assert_eq!(parse_micro(".000001"), Ok(1));
        for bad in ["0", "-1", "0.0000001", "abc", "", ".", "1e3"] {
            assert!(parse_micro(bad).is_err(), "{bad}");
        }
        assert_eq!(format_micro(500_000), "0.5");
        assert_eq!(format_micro(2_000_000), "2");
    }

    #[test]
    fn binding_checks_every_parameter() {
        let d = domains();
        let t = template(TemplateKind::SpendByCategoryForSegment);
        t.check(&d).unwrap();
        let ok = t
            .bind(
                "alice",
                &p(&[("start", "2026-02-01"), ("end", "2026-03-01"), ("segment", "s1")]),
                &d,
            )
            .unwrap();
        assert_eq!(ok.segment.as_deref(), Some("s1"));
        assert_eq!(ok.width(), 6);
        assert!(matches!(
            t.bind("bob", &[], &d),
            Err(QueryError::AnalystNotAllowed { .. })
        ));
        assert_eq!(
            t.bind("alice", &p(&[("start", "2026-02-01"), ("end", "2026-03-01")]), &d),
            Err(QueryError::MissingParameter("segment".into()))
        );
        assert!(matches!(
            t.bind(
                "alice",
                &p(&[("start", "2025-02-01"), ("end", "2026-03-01"), ("segment", "s1")]),
                &d
            ),
            Err(QueryError::BadParameter { .. })
        ));
        assert!(matches!(
            t.bind(
                "alice",
                &p(&[("start", "2026-02-01"), ("end", "2026-03-01"), ("segment", "s2")]),
                &d
            ),
            Err(QueryError::BadParameter { .. })
        ));
        assert!(matches!(
            t.bind(
                "alice",
                &p(&[("start", "2026-02-01"), ("end", "2026-01-01"), ("segment", "s1")]),
                &d
            ),
            Err(QueryError::BadParameter { .. })
        ));
        assert!(matches!(
            t.bind(
                "alice",
                &p(&[
                    ("start", "2026-02-01"),
                    ("end", "2026-03-01"),
                    ("segment", "s1"),
                    ("x", "1")
                ]),
                &d
            ),
            Err(QueryError::UnknownParameter { .. })
        ));
        assert!(matches!(
            t.bind("alice", &p(&[("start", "2026-02-01"), ("start", "2026-02-02")]), &d),
            Err(QueryError::DuplicateParameter(_))
        ));
    }

    #[test]
    fn sensitivity_and_digest() {
        let d = domains();
        let t = template(TemplateKind::SpendByCategory);
        let plan = t
            .bind("alice", &p(&[("start", "2026-02-01"), ("end", "2026-03-01")]), &d)
            .unwrap();
        // Per category: (1*1000)^2 + (10*100)^2 + (1000*1)^2 = 3e6; two categories.
        assert_eq!(plan.delta_squared(), 6_000_000);
        let plan2 = t
            .bind("alice", &p(&[("start", "2026-02-01"), ("end", "2026-03-02")]), &d)
            .unwrap();
        assert_ne!(plan.digest(), plan2.digest());
        let o = template(TemplateKind::Overlap).bind("alice", &[], &d).unwrap();
        assert_eq!(o.delta_squared(), 1);
        assert_eq!(o.width(), 1);
    }
}
