#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
//! Templates and plans.
//!
//! A template is an approved query in the SQL dialect of [`sql`] with named
//! parameters and their allowed values, per-customer clip bounds, the ρ
//! charged per run, the minimum noisy count per cell and the analysts
//! allowed. Binding a template to an analyst's parameters gives a [`Plan`]:
//! what the holder computes per customer, what the matcher restricts its
//! input to and groups it by, the output cells, and the sensitivity that
//! calibrates the noise. Three built-in kinds (`overlap`,
//! `spend_by_category`, `spend_by_category_for_segment`) are shorthands for
//! SQL templates.

pub mod policy;
pub mod sql;

use std::collections::BTreeMap;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use crate::sql::{Cmp, Column, Literal, Measure, Predicate, Side, SqlPlan};

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
    /// The query text is refused by the dialect.
    #[error("{0}")]
    Sql(#[from] sql::SqlError),
    /// The conditions leave no value of a GROUP BY column (of either
    /// side), so the query would have no output cell.
    #[error(
        "template {template:?}: its conditions leave no value of a GROUP BY column, so the query has no output cell; change the conditions"
    )]
    NoCells {
        /// The template.
        template: String,
    },
}

/// The built-in template kinds (shorthands for SQL).
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

    /// The SQL it stands for.
    pub fn sql(self) -> &'static str {
        match self {
            TemplateKind::Overlap => {
                "SELECT COUNT(DISTINCT b.customer) AS shared_customers FROM bank b JOIN platform p"
            }
            TemplateKind::SpendByCategory => {
                "SELECT b.category, COUNT(DISTINCT b.customer) AS customers, COUNT(*) AS transactions, SUM(b.amount) AS spend_cents \
                 FROM bank b JOIN platform p WHERE b.date BETWEEN :start AND :end GROUP BY b.category"
            }
            TemplateKind::SpendByCategoryForSegment => {
                "SELECT b.category, COUNT(DISTINCT b.customer) AS customers, COUNT(*) AS transactions, SUM(b.amount) AS spend_cents \
                 FROM bank b JOIN platform p WHERE b.date BETWEEN :start AND :end AND p.segment = :segment GROUP BY b.category"
            }
        }
    }
}

/// The largest `clip.spend_cents` a template may set: 2^31 cents (about 21
/// million in major units) per customer and group. With at most 2^31
/// customers in a join (the protocol's `MAX_SET_SIZE`), every cell sum then
/// stays below 2^62, so it and its noise fit a signed 64-bit word (the
/// widest share ring, [`Plan::cell_bits`]), and `Δ²` is far from `u128`'s
/// range.
pub const MAX_CLIP_SPEND_CENTS: u64 = 1 << 31;

/// The largest `clip.transactions` a template may set.
pub const MAX_CLIP_TRANSACTIONS: u64 = 1 << 20;

/// The most customers a bank's data may hold for a template that does not
/// set `clip.max_customers`: the protocol's `MAX_SET_SIZE`, 2^31.
pub const MAX_JOIN_CUSTOMERS: u64 = 1 << 31;

fn default_max_customers() -> u64 {
    MAX_JOIN_CUSTOMERS
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_default_max_customers(v: &u64) -> bool {
    *v == MAX_JOIN_CUSTOMERS
}

/// Per-customer clip bounds (per group), and the most customers a join may
/// add up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clip {
    /// Most rows (transactions) one customer adds to one group's COUNT(*).
    pub transactions: u64,
    /// Most cents one customer adds to one group's SUM.
    pub spend_cents: u64,
    /// Most customers the bank's (holder's) data may hold for this template
    /// (default [`MAX_JOIN_CUSTOMERS`]). Every cell's sum is then at most
    /// `max_customers` times its per-customer bound, which sets the width of
    /// its shares ([`Plan::cells`], `CellSpec::bits`): a tighter bound sends
    /// fewer bytes per query. The bank refuses a query of this template when
    /// its data holds more customers.
    #[serde(default = "default_max_customers", skip_serializing_if = "is_default_max_customers")]
    pub max_customers: u64,
}

impl Clip {
    /// Per-customer bounds, with the default `max_customers`.
    pub const fn new(transactions: u64, spend_cents: u64) -> Self {
        Self {
            transactions,
            spend_cents,
            max_customers: MAX_JOIN_CUSTOMERS,
        }
    }
}

/// What values a parameter may take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamSpec {
    /// A date in `[min, max]` (days since 1970-01-01).
    Date {
        /// Earliest.
        min: i32,
        /// Latest.
        max: i32,
    },
    /// One of a list of values.
    OneOf(Vec<String>),
    /// An amount in cents within `[min, max]`.
    Amount {
        /// Smallest.
        min: i64,
        /// Largest.
        max: i64,
    },
}

impl ParamSpec {
    /// The allowed values, as text.
    pub fn describe(&self) -> String {
        match self {
            ParamSpec::Date { min, max } => format!("date, {} to {}", format_date(*min), format_date(*max)),
            ParamSpec::OneOf(v) => format!("one of {}", v.join(", ")),
            ParamSpec::Amount { min, max } => format!("amount, {} to {}", cents_text(*min), cents_text(*max)),
        }
    }

    fn check(&self, name: &str, value: &str) -> Result<(), QueryError> {
        let bad = |reason: String| QueryError::BadParameter {
            param: name.to_string(),
            reason,
        };
        match self {
            ParamSpec::Date { min, max } => {
                let d = parse_date(value).map_err(bad)?;
                if d < *min || d > *max {
                    return Err(bad(format!(
                        "must be within the template's window, {} to {}",
                        format_date(*min),
                        format_date(*max)
                    )));
                }
            }
            ParamSpec::OneOf(values) => {
                if !values.iter().any(|v| v == value) {
                    return Err(bad(format!("must be one of: {}", values.join(", "))));
                }
            }
            ParamSpec::Amount { min, max } => {
                let c = parse_cents(value).ok_or_else(|| bad(format!("{value:?} is not an amount like 12.50")))?;
                if c < *min || c > *max {
                    return Err(bad(format!(
                        "must be between {} and {}",
                        cents_text(*min),
                        cents_text(*max)
                    )));
                }
            }
        }
        Ok(())
    }
}

fn cents_text(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", c.unsigned_abs() / 100, c.unsigned_abs() % 100)
}

/// Parses a decimal amount (`12`, `12.3`, `-12.34`) to cents.
pub fn parse_cents(s: &str) -> Option<i64> {
    let s = s.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || frac.len() > 2 || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut f: i64 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    if frac.len() == 1 {
        f *= 10;
    }
    let v = int.parse::<i64>().ok()?.checked_mul(100)?.checked_add(f)?;
    Some(if neg { -v } else { v })
}

/// A template as configured on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// Its name.
    pub name: String,
    /// The query, with `:name` placeholders.
    pub sql: String,
    /// Each placeholder's allowed values.
    pub params: Vec<(String, ParamSpec)>,
    /// ρ per run, in millionths.
    pub rho_micro: u64,
    /// Cells whose noisy count is below this are suppressed.
    pub min_count: u64,
    /// Analysts allowed to run it.
    pub analysts: Vec<String>,
    /// Clip bounds.
    pub clip: Clip,
}

/// The public domains of the collaboration's categorical columns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domains {
    /// Merchant categories (holder).
    pub categories: Vec<String>,
    /// Platform segments (matcher).
    pub segments: Vec<String>,
    /// Platform countries (matcher).
    #[serde(default)]
    pub countries: Vec<String>,
    /// The join's key slots `K`: 1 when the collaboration matches on one
    /// identifier, the number of key kinds when it matches on any of
    /// several (docs/protocol.md, "Multi-key matching"). `Δ²` grows with
    /// it ([`Plan::delta_squared`]).
    #[serde(default = "one_key_slot")]
    pub key_slots: u32,
}

fn one_key_slot() -> u32 {
    1
}

impl Domains {
    /// The schema of the collaboration's two tables.
    pub fn schema(&self) -> sql::Schema {
        sql::Schema::standard(&self.categories, &self.segments, &self.countries)
    }

    /// The declared values of a categorical column.
    pub fn domain(&self, side: Side, column: &str) -> &[String] {
        match (side, column) {
            (Side::Holder, "category") => &self.categories,
            (Side::Matcher, "segment") => &self.segments,
            (Side::Matcher, "country") => &self.countries,
            _ => &[],
        }
    }
}

/// What a cell measures, per customer and group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellKind {
    /// 1 if the customer has a row in the group (COUNT(DISTINCT customer)).
    Customers,
    /// The customer's rows in the group, clipped (COUNT(*)).
    Rows,
    /// The customer's amounts in the group, clipped to `[0, clip]` (SUM).
    Sum,
}

/// One output cell's description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellSpec {
    /// Name, e.g. `spend_cents[category=groceries]`.
    pub name: String,
    /// What it measures.
    pub kind: CellKind,
    /// The cell's noise scale. `Δ` ([`Plan::delta_squared`]) is the L2 norm
    /// of a customer's largest contribution with each cell multiplied by
    /// its weight (so counts and sums weigh alike), and each node's noise on
    /// the cell, in the cell's own units, is a discrete Gaussian with
    /// `σ = sqrt(Δ²/(2ρ)) / weight`. The cells themselves are not
    /// multiplied (they were before narrow shares: see docs/protocol.md).
    pub weight: u64,
    /// Index of the count cell that decides whether this cell is shown.
    pub count_cell: usize,
    /// The ring of the cell's shares, `Z_{2^bits}` (see [`Plan::cell_bits`]).
    pub bits: u8,
}

/// The ρ below which no template goes (`Template::check`: ρ is a positive
/// number of millionths): the share widths leave room for the noise of a
/// node at this ρ, so they do not depend on either node's own ρ.
pub const MIN_RHO_MICRO: u64 = 1;

/// How many standard deviations (at [`MIN_RHO_MICRO`]) of one node's noise
/// a cell's share width leaves room for. A discrete Gaussian draw lands
/// beyond `16σ` with probability below `2·exp(-128)`; a node that drew one
/// refuses to release it rather than wrap the cell.
pub const NOISE_TAIL_SIGMAS: u64 = 16;

/// One value per [`CellKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PerKind<T> {
    customers: T,
    rows: T,
    sum: T,
}

impl<T: Copy> PerKind<T> {
    fn from_fn(f: impl Fn(CellKind) -> T) -> Self {
        Self {
            customers: f(CellKind::Customers),
            rows: f(CellKind::Rows),
            sum: f(CellKind::Sum),
        }
    }

    /// The value of `kind`.
    pub fn get(&self, kind: &CellKind) -> T {
        match kind {
            CellKind::Customers => self.customers,
            CellKind::Rows => self.rows,
            CellKind::Sum => self.sum,
        }
    }
}

/// The bit length of `x`.
fn bit_len(x: u128) -> u32 {
    128 - x.leading_zeros()
}

/// The least integer whose square is at least `x`.
fn isqrt_ceil(x: u128) -> u128 {
    let r = x.isqrt();
    if r * r == x { r } else { r + 1 }
}

/// An `AVG` output: the ratio of two cells.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ratio {
    /// Name, e.g. `avg_spend[category=fuel]`.
    pub name: String,
    /// The SUM cell.
    pub numerator: usize,
    /// The COUNT(*) cell.
    pub denominator: usize,
}

/// What one query computes, on both sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Template name.
    pub template: String,
    /// The template's SQL text.
    pub sql_text: String,
    /// The checked query, parameters bound.
    pub query: SqlPlan,
    /// The public domains.
    pub domains: Domains,
    /// Clip bounds.
    pub clip: Clip,
    /// The parameters as given, sorted by name.
    pub params: Vec<(String, String)>,
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
    /// A built-in kind with its date window and, for the segment kind, the
    /// segments analysts may choose.
    pub fn builtin(
        name: &str,
        kind: TemplateKind,
        dates: (i32, i32),
        segments: Vec<String>,
        clip: Clip,
        rho_micro: u64,
        min_count: u64,
        analysts: Vec<String>,
    ) -> Self {
        let date = ParamSpec::Date {
            min: dates.0,
            max: dates.1,
        };
        let params = match kind {
            TemplateKind::Overlap => vec![],
            TemplateKind::SpendByCategory => vec![("start".into(), date.clone()), ("end".into(), date)],
            TemplateKind::SpendByCategoryForSegment => vec![
                ("start".into(), date.clone()),
                ("end".into(), date),
                ("segment".into(), ParamSpec::OneOf(segments)),
            ],
        };
        Template {
            name: name.to_string(),
            sql: kind.sql().to_string(),
            params,
            rho_micro,
            min_count,
            analysts,
            clip,
        }
    }

    /// A digest of the template's text and limits (what both operators sign).
    pub fn digest(&self) -> [u8; 32] {
        let mut ctx = Context::new(&SHA256);
        let mut put = |b: &[u8]| {
            ctx.update(&(b.len() as u64).to_le_bytes());
            ctx.update(b);
        };
        put(b"cleanroom-template-v1");
        put(self.name.as_bytes());
        put(self.sql.as_bytes());
        for (n, spec) in &self.params {
            put(n.as_bytes());
            put(spec.describe().as_bytes());
        }
        put(&self.clip.transactions.to_le_bytes());
        put(&self.clip.spend_cents.to_le_bytes());
        // Only when set, so templates without it keep their digests (and
        // their operators' signatures).
        if self.clip.max_customers != MAX_JOIN_CUSTOMERS {
            put(b"max_customers");
            put(&self.clip.max_customers.to_le_bytes());
        }
        let d = ctx.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// Checks the template's own consistency: its SQL parses with every
    /// parameter at an allowed value, each placeholder has a spec and each
    /// spec a placeholder.
    ///
    /// # Errors
    /// [`QueryError::BadTemplate`].
    pub fn check(&self, domains: &Domains) -> Result<(), QueryError> {
        let bad = |reason: String| QueryError::BadTemplate {
            template: self.name.clone(),
            reason,
        };
        if self.rho_micro == 0 {
            return Err(bad("rho must be positive".into()));
        }
        if self.clip.transactions == 0 || self.clip.spend_cents == 0 {
            return Err(bad("clip bounds must be positive".into()));
        }
        if self.clip.max_customers == 0 || self.clip.max_customers > MAX_JOIN_CUSTOMERS {
            return Err(bad(format!(
                "clip.max_customers must be between 1 and {MAX_JOIN_CUSTOMERS}"
            )));
        }
        if self.clip.spend_cents > MAX_CLIP_SPEND_CENTS || self.clip.transactions > MAX_CLIP_TRANSACTIONS {
            return Err(bad(format!(
                "clip bounds are at most spend_cents = {MAX_CLIP_SPEND_CENTS} and transactions = {MAX_CLIP_TRANSACTIONS} (so every cell sum fits the shares' 64-bit words)"
            )));
        }
        let used = sql::placeholders(&self.sql);
        for u in &used {
            if !self.params.iter().any(|(n, _)| n == u) {
                return Err(bad(format!("the query uses :{u} but no parameter {u} is declared")));
            }
        }
        let mut sample = BTreeMap::new();
        for (n, spec) in &self.params {
            if !used.contains(n) {
                return Err(bad(format!(
                    "parameter {n} is declared but the query does not use :{n}"
                )));
            }
            let v = match spec {
                ParamSpec::Date { min, max } => {
                    if min > max {
                        return Err(bad(format!("parameter {n}: the date window ends before it starts")));
                    }
                    format_date(*min)
                }
                ParamSpec::OneOf(values) => match values.first() {
                    Some(v) => v.clone(),
                    None => return Err(bad(format!("parameter {n}: list the values analysts may choose"))),
                },
                ParamSpec::Amount { min, max } => {
                    if min > max {
                        return Err(bad(format!("parameter {n}: the amount range is empty")));
                    }
                    cents_text(*min)
                }
            };
            sample.insert(n.clone(), v);
        }
        sql::parse(&self.sql, &domains.schema(), &sample).map_err(|e| bad(e.0))?;
        if domains.categories.is_empty() {
            return Err(bad("the collaboration declares no categories".into()));
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
            if !self.params.iter().any(|(n, _)| n == k) {
                let takes: Vec<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
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
        let mut bound = BTreeMap::new();
        for (n, spec) in &self.params {
            let v = sorted
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .ok_or_else(|| QueryError::MissingParameter(n.clone()))?;
            spec.check(n, &v)?;
            bound.insert(n.clone(), v);
        }
        let query = sql::parse(&self.sql, &domains.schema(), &bound)?;
        for p in &query.filters {
            if let Predicate::Between(c, Literal::Day(a), Literal::Day(b)) = p
                && a > b
            {
                return Err(QueryError::BadParameter {
                    param: c.name.clone(),
                    reason: "the range ends before it starts (end must not be before start)".into(),
                });
            }
        }
        let plan = Plan {
            template: self.name.clone(),
            sql_text: self.sql.clone(),
            query,
            domains: domains.clone(),
            clip: self.clip,
            params: sorted,
        };
        // Refused here, before any charge: an aggregate needs a cell.
        if plan.width() == 0 || plan.matcher_groups().is_empty() {
            return Err(QueryError::NoCells {
                template: self.name.clone(),
            });
        }
        Ok(plan)
    }
}

fn cartesian(domains: &[&[String]]) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = vec![vec![]];
    for d in domains {
        let mut next = Vec::with_capacity(out.len() * d.len());
        for prefix in &out {
            for v in *d {
                let mut p = prefix.clone();
                p.push(v.clone());
                next.push(p);
            }
        }
        out = next;
    }
    out
}

fn literal_matches(lit: &Literal, value: &str) -> bool {
    matches!(lit, Literal::Text(t) if t == value)
}

fn cmp_holds<T: Ord>(a: &T, cmp: Cmp, b: &T) -> bool {
    match cmp {
        Cmp::Eq => a == b,
        Cmp::Ne => a != b,
        Cmp::Lt => a < b,
        Cmp::Le => a <= b,
        Cmp::Gt => a > b,
        Cmp::Ge => a >= b,
    }
}

/// Whether one holder conjunct holds for a row (a column or literal of
/// another kind makes a comparison false).
fn holder_predicate_holds(p: &Predicate, row: &HolderRow<'_>) -> bool {
    let col = p.column().name.as_str();
    let test = |lit: &Literal, cmp: Cmp| match (col, lit) {
        ("category", Literal::Text(t)) => cmp_holds(&row.category, cmp, &t.as_str()),
        ("amount", Literal::Cents(c)) => cmp_holds(&row.cents, cmp, c),
        ("date", Literal::Day(d)) => cmp_holds(&row.day, cmp, d),
        _ => false,
    };
    match p {
        Predicate::Compare(_, cmp, lit) => test(lit, *cmp),
        Predicate::In(_, lits) => lits.iter().any(|l| test(l, Cmp::Eq)),
        Predicate::Between(_, lo, hi) => test(lo, Cmp::Ge) && test(hi, Cmp::Le),
    }
}

/// A holder row's numeric column.
#[derive(Clone, Copy, Debug)]
enum NumField {
    Cents,
    Day,
}

/// One conjunct on a numeric column; `None` is a literal of another kind
/// (the comparison is false).
#[derive(Clone, Debug)]
enum NumTest {
    Compare(Cmp, Option<i64>),
    In(Vec<i64>),
    Between(Option<i64>, Option<i64>),
}

/// [`Plan::holder_filter`]: the holder conjuncts, with those on the
/// category decided once per category.
#[derive(Clone, Debug)]
pub struct HolderFilter {
    category_ok: Vec<bool>,
    unknown_category_ok: bool,
    never: bool,
    tests: Vec<(NumField, NumTest)>,
}

impl HolderFilter {
    /// Whether a row passes, as [`Plan::holder_row_passes`] would for the
    /// row whose category is `categories[category]` (the empty string when
    /// out of range).
    pub fn passes(&self, category: usize, cents: i64, day: i32) -> bool {
        if self.never
            || !self
                .category_ok
                .get(category)
                .copied()
                .unwrap_or(self.unknown_category_ok)
        {
            return false;
        }
        self.tests.iter().all(|(field, test)| {
            let x = match field {
                NumField::Cents => cents,
                NumField::Day => i64::from(day),
            };
            match test {
                NumTest::Compare(cmp, v) => v.is_some_and(|v| cmp_holds(&x, *cmp, &v)),
                NumTest::In(vs) => vs.contains(&x),
                NumTest::Between(lo, hi) => lo.is_some_and(|lo| x >= lo) && hi.is_some_and(|hi| x <= hi),
            }
        })
    }
}

/// One holder row (transaction) as the plan sees it.
#[derive(Clone, Copy, Debug)]
pub struct HolderRow<'a> {
    /// Category value.
    pub category: &'a str,
    /// Amount in cents.
    pub cents: i64,
    /// Date, days since 1970-01-01.
    pub day: i32,
}

impl Plan {
    /// The holder's GROUP BY columns.
    pub fn holder_group_columns(&self) -> Vec<&Column> {
        self.query.groups(Side::Holder)
    }

    /// The matcher's GROUP BY columns.
    pub fn matcher_group_columns(&self) -> Vec<&Column> {
        self.query.groups(Side::Matcher)
    }

    /// The values a grouped column can take in this query: its declared
    /// domain, narrowed by `=` and `IN` conditions on the same column (a
    /// group the WHERE clause excludes is not computed at all).
    pub fn group_domain(&self, column: &Column) -> Vec<String> {
        let mut values: Vec<String> = self.domains.domain(column.side, &column.name).to_vec();
        for p in &self.query.filters {
            if p.column() != column {
                continue;
            }
            let allowed: Option<Vec<&str>> = match p {
                Predicate::Compare(_, Cmp::Eq, Literal::Text(t)) => Some(vec![t.as_str()]),
                Predicate::In(_, lits) => Some(
                    lits.iter()
                        .filter_map(|l| {
                            if let Literal::Text(t) = l {
                                Some(t.as_str())
                            } else {
                                None
                            }
                        })
                        .collect(),
                ),
                _ => None,
            };
            if let Some(a) = allowed {
                values.retain(|v| a.contains(&v.as_str()));
            }
        }
        values
    }

    /// Every combination of the holder's group values (one empty combination
    /// when it does not group).
    pub fn holder_groups(&self) -> Vec<Vec<String>> {
        let d: Vec<Vec<String>> = self
            .holder_group_columns()
            .iter()
            .map(|c| self.group_domain(c))
            .collect();
        let r: Vec<&[String]> = d.iter().map(Vec::as_slice).collect();
        cartesian(&r)
    }

    /// Every combination of the matcher's group values.
    pub fn matcher_groups(&self) -> Vec<Vec<String>> {
        let d: Vec<Vec<String>> = self
            .matcher_group_columns()
            .iter()
            .map(|c| self.group_domain(c))
            .collect();
        let r: Vec<&[String]> = d.iter().map(Vec::as_slice).collect();
        cartesian(&r)
    }

    fn per_group(&self) -> Vec<(String, CellKind)> {
        let mut cells = Vec::new();
        if !self.query.outputs.iter().any(|o| o.measure == Measure::CountCustomers) {
            cells.push(("customers".to_string(), CellKind::Customers));
        }
        for o in &self.query.outputs {
            match &o.measure {
                Measure::CountCustomers => cells.push((o.name.clone(), CellKind::Customers)),
                Measure::CountRows => cells.push((o.name.clone(), CellKind::Rows)),
                Measure::Sum(_) => cells.push((o.name.clone(), CellKind::Sum)),
                Measure::Avg(_) => {
                    cells.push((format!("{}.sum", o.name), CellKind::Sum));
                    cells.push((format!("{}.count", o.name), CellKind::Rows));
                }
            }
        }
        cells
    }

    /// The noise scale of a cell of this kind (see [`CellSpec::weight`]).
    pub fn weight(&self, kind: CellKind) -> u64 {
        match kind {
            CellKind::Customers => self.clip.spend_cents,
            CellKind::Rows => (self.clip.spend_cents / self.clip.transactions).max(1),
            CellKind::Sum => 1,
        }
    }

    fn bound(&self, kind: CellKind) -> u64 {
        match kind {
            CellKind::Customers => 1,
            CellKind::Rows => self.clip.transactions,
            CellKind::Sum => self.clip.spend_cents,
        }
    }

    fn group_label(&self, m: &[String], h: &[String]) -> String {
        let mut parts: Vec<String> = Vec::new();
        for (c, v) in self.holder_group_columns().iter().zip(h) {
            parts.push(format!("{}={v}", c.name));
        }
        for (c, v) in self.matcher_group_columns().iter().zip(m) {
            parts.push(format!("{}={v}", c.name));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("[{}]", parts.join(", "))
        }
    }

    /// Cells per matcher group: holder groups times cells per group. This is
    /// the width of each OT batch.
    pub fn width(&self) -> usize {
        self.holder_groups().len() * self.per_group().len()
    }

    /// All output cells, matcher group after matcher group, then holder
    /// group after holder group, then the cells of each group.
    pub fn cells(&self) -> Vec<CellSpec> {
        let per = self.per_group();
        let count_at = per.iter().position(|(_, k)| *k == CellKind::Customers).unwrap_or(0);
        let bits = self.kind_bits();
        let holder_groups = self.holder_groups();
        let mut out = Vec::new();
        for m in self.matcher_groups() {
            for h in &holder_groups {
                let base = out.len();
                let label = self.group_label(&m, h);
                for (name, kind) in &per {
                    out.push(CellSpec {
                        name: format!("{name}{label}"),
                        kind: *kind,
                        weight: self.weight(*kind),
                        count_cell: base + count_at,
                        bits: bits.get(kind),
                    });
                }
            }
        }
        out
    }

    /// The AVG outputs, as ratios of cells.
    pub fn ratios(&self) -> Vec<Ratio> {
        let per = self.per_group();
        let mut out = Vec::new();
        let mut base = 0;
        for m in self.matcher_groups() {
            for h in self.holder_groups() {
                let label = self.group_label(&m, &h);
                for o in &self.query.outputs {
                    if let Measure::Avg(_) = o.measure {
                        let num = per.iter().position(|(n, _)| *n == format!("{}.sum", o.name));
                        let den = per.iter().position(|(n, _)| *n == format!("{}.count", o.name));
                        if let (Some(n), Some(d)) = (num, den) {
                            out.push(Ratio {
                                name: format!("{}{label}", o.name),
                                numerator: base + n,
                                denominator: base + d,
                            });
                        }
                    }
                }
                base += per.len();
            }
        }
        out
    }

    /// The share widths of one OT batch's cells ([`Plan::width`] of them, in
    /// [`Plan::cells`]' order; every batch has the same).
    pub fn batch_bits(&self) -> Vec<u8> {
        let per = self.per_group();
        let bits = self.kind_bits();
        let groups = self.holder_groups().len();
        let mut out = Vec::with_capacity(groups * per.len());
        for _ in 0..groups {
            out.extend(per.iter().map(|(_, k)| bits.get(k)));
        }
        out
    }

    /// The most one node's noise on a cell of this kind may be, in the
    /// cell's own units: [`NOISE_TAIL_SIGMAS`] standard deviations of that
    /// node's noise at [`MIN_RHO_MICRO`], `σ² = Δ²·10⁶ / (2·weight²)`. A
    /// node at a larger ρ has less noise, so the same limit holds for it.
    pub fn noise_limit(&self, kind: CellKind) -> u64 {
        self.noise_limit_with(kind, self.delta_squared())
    }

    /// The noise limit of every kind, `Δ²` computed once (for a loop over
    /// the cells).
    pub fn noise_limits(&self) -> PerKind<u64> {
        let d = self.delta_squared();
        PerKind::from_fn(|k| self.noise_limit_with(k, d))
    }

    fn noise_limit_with(&self, kind: CellKind, delta_squared: u128) -> u64 {
        let w = u128::from(self.weight(kind).max(1));
        let tail = u128::from(NOISE_TAIL_SIGMAS);
        // (tail·σ)² = tail² · Δ² · 10⁶ / (2 · ρ_min · w²), rounded up.
        let num = (tail * tail).saturating_mul(delta_squared).saturating_mul(1_000_000);
        let den = 2 * u128::from(MIN_RHO_MICRO) * w * w;
        u64::try_from(isqrt_ceil(num.div_ceil(den))).unwrap_or(u64::MAX)
    }

    /// The share width of every kind, `Δ²` computed once.
    fn kind_bits(&self) -> PerKind<u8> {
        let d = self.delta_squared();
        PerKind::from_fn(|k| self.cell_bits_with(k, self.noise_limit_with(k, d)))
    }

    /// The ring `Z_{2^b}` a cell of this kind is shared in: the smallest `b`
    /// (at most 64) whose signed range holds every value the two noisy
    /// shares can add up to, from `-2L` to `max_customers · bound + 2L`,
    /// with `L` each node's [`Plan::noise_limit`]. Counts need fewer bits
    /// than sums; all depend only on the plan, never on either side's data
    /// or ρ, so both nodes and the analyst know them.
    pub fn cell_bits(&self, kind: CellKind) -> u8 {
        self.cell_bits_with(kind, self.noise_limit(kind))
    }

    fn cell_bits_with(&self, kind: CellKind, noise_limit: u64) -> u8 {
        let top = u128::from(self.clip.max_customers)
            .saturating_mul(u128::from(self.bound(kind)))
            .saturating_add(2 * u128::from(noise_limit));
        // One more bit for the sign.
        u8::try_from((bit_len(top) + 1).min(64)).unwrap_or(64)
    }

    /// `Δ²`: the squared L2 norm of the largest weighted vector one customer
    /// (or one platform user) can change. A customer is in one matcher group
    /// at most, so one batch's width counts. With `K > 1` key slots it is
    /// that times `2K²`: one more customer (or platform user) can also move
    /// up to `K` others from one group's cells to another's, `√2·K·Δ` in
    /// L2 (docs/protocol.md, "Multi-key matching").
    ///
    /// Saturating arithmetic: a result past `u128` (impossible within
    /// [`MAX_CLIP_SPEND_CENTS`], which `Template::check` enforces) comes out
    /// as `u128::MAX`, more noise, never a wrapped small value.
    pub fn delta_squared(&self) -> u128 {
        let one = self.delta_squared_one_key();
        match u128::from(self.domains.key_slots) {
            0 | 1 => one,
            k => one.saturating_mul(2 * k * k),
        }
    }

    /// `Δ²` of a single-key join.
    fn delta_squared_one_key(&self) -> u128 {
        let per = self.per_group();
        let one_group: u128 = per
            .iter()
            .map(|(_, k)| {
                let x = u128::from(self.bound(*k)).saturating_mul(u128::from(self.weight(*k)));
                x.saturating_mul(x)
            })
            .fold(0u128, u128::saturating_add);
        one_group.saturating_mul(self.holder_groups().len() as u128)
    }

    /// Whether a holder row passes the WHERE clause's holder conjuncts.
    pub fn holder_row_passes(&self, row: &HolderRow<'_>) -> bool {
        let mut filters = self.query.filters.iter().filter(|p| p.column().side == Side::Holder);
        filters.all(|p| holder_predicate_holds(p, row))
    }

    /// The WHERE clause's holder conjuncts compiled for rows whose category
    /// is an index into `categories`: what [`Plan::holder_row_passes`]
    /// decides, without a string comparison per row (the node asks it for
    /// every transaction of every joined customer, each query).
    pub fn holder_filter(&self, categories: &[String]) -> HolderFilter {
        let preds: Vec<&Predicate> = self
            .query
            .filters
            .iter()
            .filter(|p| p.column().side == Side::Holder)
            .collect();
        let on_category = |category: &str| {
            let row = HolderRow {
                category,
                cents: 0,
                day: 0,
            };
            preds
                .iter()
                .filter(|p| p.column().name == "category")
                .all(|p| holder_predicate_holds(p, &row))
        };
        let mut never = false;
        let mut tests = Vec::new();
        for p in &preds {
            let field = match p.column().name.as_str() {
                "category" => continue,
                "amount" => NumField::Cents,
                "date" => NumField::Day,
                // holder_predicate_holds is false for every row.
                _ => {
                    never = true;
                    continue;
                }
            };
            let value = |lit: &Literal| match (field, lit) {
                (NumField::Cents, Literal::Cents(c)) => Some(*c),
                (NumField::Day, Literal::Day(d)) => Some(i64::from(*d)),
                _ => None,
            };
            let test = match p {
                Predicate::Compare(_, cmp, lit) => NumTest::Compare(*cmp, value(lit)),
                Predicate::In(_, lits) => NumTest::In(lits.iter().filter_map(value).collect()),
                Predicate::Between(_, lo, hi) => NumTest::Between(value(lo), value(hi)),
            };
            tests.push((field, test));
        }
        HolderFilter {
            category_ok: categories.iter().map(|c| on_category(c)).collect(),
            unknown_category_ok: on_category(""),
            never,
            tests,
        }
    }

    /// The holder group a row falls in (index into [`Plan::holder_groups`]).
    pub fn holder_group_of(&self, row: &HolderRow<'_>) -> Option<usize> {
        let mut idx = 0;
        for c in self.holder_group_columns() {
            let d = self.group_domain(c);
            let v = match c.name.as_str() {
                "category" => row.category,
                _ => return None,
            };
            idx = idx * d.len() + d.iter().position(|x| x == v)?;
        }
        Some(idx)
    }

    /// Whether a matcher user passes the WHERE clause's matcher conjuncts;
    /// `value(column)` gives the user's value of a column.
    pub fn matcher_user_passes(&self, value: &dyn Fn(&str) -> Option<String>) -> bool {
        self.query.filters_on(Side::Matcher).iter().all(|p| {
            let Some(v) = value(&p.column().name) else {
                return false;
            };
            match p {
                Predicate::Compare(_, Cmp::Eq, lit) => literal_matches(lit, &v),
                Predicate::In(_, lits) => lits.iter().any(|l| literal_matches(l, &v)),
                _ => false,
            }
        })
    }

    /// The matcher group a user falls in (index into [`Plan::matcher_groups`]).
    pub fn matcher_group_of(&self, value: &dyn Fn(&str) -> Option<String>) -> Option<usize> {
        let mut idx = 0;
        for c in self.matcher_group_columns() {
            let d = self.group_domain(c);
            let v = value(&c.name)?;
            idx = idx * d.len() + d.iter().position(|x| *x == v)?;
        }
        Some(idx)
    }

    /// What the matcher's join depends on: its filter and its grouping, as text.
    pub fn join_filter(&self) -> String {
        let mut parts: Vec<String> = self
            .query
            .filters_on(Side::Matcher)
            .iter()
            .map(|p| match p {
                Predicate::Compare(c, _, Literal::Text(t)) => format!("{} in ({t})", c.name),
                Predicate::In(c, lits) => {
                    let mut v: Vec<String> = lits
                        .iter()
                        .filter_map(|l| {
                            if let Literal::Text(t) = l {
                                Some(t.clone())
                            } else {
                                None
                            }
                        })
                        .collect();
                    v.sort();
                    v.dedup();
                    format!("{} in ({})", c.name, v.join(","))
                }
                other => format!("{other:?}"),
            })
            .collect();
        parts.sort();
        let groups: Vec<String> = self.matcher_group_columns().iter().map(|c| c.name.clone()).collect();
        format!("where {} group by {}", parts.join(" and "), groups.join(","))
    }

    /// A digest of everything that determines the cells' exact values: both
    /// nodes must compute the same one.
    pub fn digest(&self) -> [u8; 32] {
        let mut ctx = Context::new(&SHA256);
        let mut put = |b: &[u8]| {
            ctx.update(&(b.len() as u64).to_le_bytes());
            ctx.update(b);
        };
        put(b"cleanroom-plan-v2");
        put(self.sql_text.as_bytes());
        for (k, v) in &self.params {
            put(k.as_bytes());
            put(v.as_bytes());
        }
        for d in [
            &self.domains.categories,
            &self.domains.segments,
            &self.domains.countries,
        ] {
            put(&(d.len() as u64).to_le_bytes());
            for c in d {
                put(c.as_bytes());
            }
        }
        put(&self.clip.transactions.to_le_bytes());
        put(&self.clip.spend_cents.to_le_bytes());
        // Only when set, so templates without it keep their digests (and
        // their operators' signatures).
        if self.clip.max_customers != MAX_JOIN_CUSTOMERS {
            put(b"max_customers");
            put(&self.clip.max_customers.to_le_bytes());
        }
        // The key slots set the noise: named when above 1 (single-key
        // plans keep their digests).
        if self.domains.key_slots > 1 {
            put(b"key_slots");
            put(&self.domains.key_slots.to_le_bytes());
        }
        let d = ctx.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Domains {
        Domains {
            categories: vec!["a".into(), "b".into()],
            segments: vec!["s1".into(), "s2".into()],
            countries: vec!["GB".into(), "FR".into()],
            key_slots: 1,
        }
    }

    fn clip() -> Clip {
        Clip::new(10, 1000)
    }

    fn template(kind: TemplateKind) -> Template {
        Template::builtin(
            "t",
            kind,
            (parse_date("2026-01-01").unwrap(), parse_date("2026-12-31").unwrap()),
            vec!["s1".into()],
            clip(),
            100_000,
            10,
            vec!["alice".into()],
        )
    }

    fn p(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Every cell's share width holds every value the two noisy shares can
    /// add up to (from `-2L` to `max_customers · bound + 2L`, `L` at least
    /// 16σ of one node's noise at the smallest ρ, σ computed here in floating
    /// point), and no narrower width would; counts get fewer bits than sums.
    #[test]
    fn share_widths_hold_every_noisy_sum_and_no_fewer_bits_would() {
        for (t, spend, max_customers) in [
            (5, 50_000, 1 << 20),
            (5, 50_000, MAX_JOIN_CUSTOMERS),
            (1, 1, 1),
            (MAX_CLIP_TRANSACTIONS, MAX_CLIP_SPEND_CENTS, MAX_JOIN_CUSTOMERS),
            (3, 20_000, 12_345),
        ] {
            let mut tpl = template(TemplateKind::SpendByCategory);
            tpl.clip = Clip {
                transactions: t,
                spend_cents: spend,
                max_customers,
            };
            tpl.check(&domains()).unwrap();
            let plan = tpl
                .bind(
                    "alice",
                    &p(&[("start", "2026-01-01"), ("end", "2026-06-30")]),
                    &domains(),
                )
                .unwrap();
            let delta = (plan.delta_squared() as f64).sqrt();
            for kind in [CellKind::Customers, CellKind::Rows, CellKind::Sum] {
                let b = plan.cell_bits(kind);
                let limit = plan.noise_limit(kind);
                let sigma = delta * 1000.0 / (2f64.sqrt() * plan.weight(kind) as f64);
                assert!(
                    limit as f64 >= 16.0 * sigma * (1.0 - 1e-9),
                    "{kind:?}: {limit} < 16 × {sigma}"
                );
                assert!((limit as f64) <= 16.0 * sigma + 2.0, "{kind:?}: {limit} > 16 × {sigma}");
                let bound = match kind {
                    CellKind::Customers => 1,
                    CellKind::Rows => t,
                    CellKind::Sum => spend,
                };
                let top = u128::from(max_customers) * u128::from(bound) + 2 * u128::from(limit);
                assert!((1..=64).contains(&b));
                // Even the widest cell fits a signed 64-bit word.
                assert!(top < 1u128 << 63, "{kind:?}: {top} does not fit 64 bits");
                if b < 64 {
                    assert!(top < 1u128 << (b - 1), "{kind:?}: {top} does not fit {b} bits");
                    assert!(top >= 1u128 << (b - 2), "{kind:?}: {top} would fit {} bits", b - 1);
                }
            }
            assert!(plan.cell_bits(CellKind::Customers) <= plan.cell_bits(CellKind::Sum));
            let cells = plan.cells();
            let batch = plan.batch_bits();
            assert_eq!(batch.len(), plan.width());
            assert_eq!(
                cells.iter().map(|c| c.bits).collect::<Vec<_>>(),
                batch,
                "one matcher group"
            );
        }
    }

    /// The demo's `spend_by_category` at a 2^20-customer bound: 22, 24 and
    /// 37 bits for customers, transactions and spend (worked out by hand in
    /// docs/protocol.md), so a row's cells take 83 bits per category against
    /// 192 at 64 bits each: 177 bytes a row instead of 408.
    #[test]
    fn the_demo_query_cells_narrow_to_less_than_half() {
        let mut tpl = template(TemplateKind::SpendByCategory);
        tpl.clip = Clip {
            transactions: 5,
            spend_cents: 50_000,
            max_customers: 1 << 20,
        };
        let mut d = domains();
        d.categories = (0..17).map(|i| format!("c{i}")).collect();
        let plan = tpl
            .bind("alice", &p(&[("start", "2026-01-01"), ("end", "2026-06-30")]), &d)
            .unwrap();
        assert_eq!(plan.width(), 51);
        assert_eq!(&plan.batch_bits()[..3], &[22, 24, 37]);
        let bits: u32 = plan.batch_bits().iter().map(|b| u32::from(*b)).sum();
        assert_eq!(bits, 17 * 83);
        assert!(bits * 2 < 51 * 64);
    }

    /// `max_customers` is signed with the template only when set, so
    /// templates without it keep their digests; it must be 1 to 2^31.
    #[test]
    fn max_customers_is_bound_into_the_digests_when_set() {
        let a = template(TemplateKind::SpendByCategory);
        let mut b = a.clone();
        b.clip.max_customers = 1 << 20;
        assert_ne!(a.digest(), b.digest());
        let params = p(&[("start", "2026-01-01"), ("end", "2026-06-30")]);
        assert_ne!(
            a.bind("alice", &params, &domains()).unwrap().digest(),
            b.bind("alice", &params, &domains()).unwrap().digest()
        );
        let clip: Clip = serde_json::from_str(r#"{"transactions": 5, "spend_cents": 10}"#).unwrap();
        assert_eq!(clip.max_customers, MAX_JOIN_CUSTOMERS);
        assert_eq!(
            serde_json::to_string(&clip).unwrap(),
            r#"{"transactions":5,"spend_cents":10}"#
        );
        for bad in [0, MAX_JOIN_CUSTOMERS + 1] {
            b.clip.max_customers = bad;
            assert!(b.check(&domains()).is_err());
        }
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
        assert_eq!(ok.join_filter(), "where segment in (s1) group by ");
        // customers, transactions, spend per category.
        assert_eq!(ok.width(), 6);
        assert!(matches!(
            t.bind("bob", &[], &d),
            Err(QueryError::AnalystNotAllowed { .. })
        ));
        assert_eq!(
            t.bind("alice", &p(&[("start", "2026-02-01"), ("end", "2026-03-01")]), &d),
            Err(QueryError::MissingParameter("segment".into()))
        );
        for bad in [
            p(&[("start", "2025-02-01"), ("end", "2026-03-01"), ("segment", "s1")]),
            p(&[("start", "2026-02-01"), ("end", "2026-03-01"), ("segment", "s2")]),
            p(&[("start", "2026-02-01"), ("end", "2026-01-01"), ("segment", "s1")]),
        ] {
            assert!(
                matches!(t.bind("alice", &bad, &d), Err(QueryError::BadParameter { .. })),
                "{bad:?}"
            );
        }
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
    fn sensitivity_cells_and_digest() {
        let d = domains();
        let t = template(TemplateKind::SpendByCategory);
        let plan = t
            .bind("alice", &p(&[("start", "2026-02-01"), ("end", "2026-03-01")]), &d)
            .unwrap();
        // Per category: (1*1000)^2 + (10*100)^2 + (1000*1)^2 = 3e6; two categories.
        assert_eq!(plan.delta_squared(), 6_000_000);
        let names: Vec<String> = plan.cells().into_iter().map(|c| c.name).collect();
        assert_eq!(names[0], "customers[category=a]");
        assert_eq!(names[5], "spend_cents[category=b]");
        let plan2 = t
            .bind("alice", &p(&[("start", "2026-02-01"), ("end", "2026-03-02")]), &d)
            .unwrap();
        assert_ne!(plan.digest(), plan2.digest());
        let o = template(TemplateKind::Overlap).bind("alice", &[], &d).unwrap();
        assert_eq!(o.delta_squared(), 1_000_000);
        assert_eq!(o.width(), 1);
    }

    /// With `K` key slots `Δ²` is `2K²` times the single-key one (the
    /// bound of docs/protocol.md, "Multi-key matching"), and the plan's
    /// digest names `K` when it is above 1 (single-key digests unchanged).
    #[test]
    fn key_slots_scale_delta_squared_and_the_digest() {
        let t = template(TemplateKind::SpendByCategory);
        let params = p(&[("start", "2026-02-01"), ("end", "2026-03-01")]);
        let one = t.bind("alice", &params, &domains()).unwrap();
        let explicit_one = t
            .bind(
                "alice",
                &params,
                &Domains {
                    key_slots: 1,
                    ..domains()
                },
            )
            .unwrap();
        assert_eq!(one.digest(), explicit_one.digest());
        // The single-key digest as it was before key slots existed (pinned
        // from c7b6deb's code: both nodes and stored shares compare it).
        let hex: String = one.digest().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "b7dd641a8d3189a66f34204dd82dd4bfe63f6632dd3fd7c1f515b33acfb374ac");
        for k in [2u32, 3] {
            let multi = t
                .bind(
                    "alice",
                    &params,
                    &Domains {
                        key_slots: k,
                        ..domains()
                    },
                )
                .unwrap();
            assert_eq!(multi.delta_squared(), 6_000_000 * 2 * u128::from(k * k));
            assert_ne!(multi.digest(), one.digest());
            // Wider noise, wider shares: never narrower than one key's.
            for (a, b) in multi.cells().iter().zip(one.cells()) {
                assert!(a.bits >= b.bits);
            }
        }
    }

    /// A clip bound past the documented limit is refused when the template
    /// is checked; and `Δ²` never wraps to a small value (which would mean
    /// almost no noise), even for a plan built around the check.
    #[test]
    fn absurd_clip_bounds_are_refused_and_never_wrap() {
        let d = domains();
        let mut t = template(TemplateKind::SpendByCategory);
        t.clip.spend_cents = MAX_CLIP_SPEND_CENTS;
        t.check(&d).unwrap();
        t.clip.spend_cents = MAX_CLIP_SPEND_CENTS + 1;
        assert!(matches!(t.check(&d), Err(QueryError::BadTemplate { .. })));
        t.clip.spend_cents = 1000;
        t.clip.transactions = MAX_CLIP_TRANSACTIONS + 1;
        assert!(matches!(t.check(&d), Err(QueryError::BadTemplate { .. })));
        // At the limit: the exact value, in u128 arithmetic with room.
        let mut t = template(TemplateKind::SpendByCategory);
        t.clip.spend_cents = MAX_CLIP_SPEND_CENTS;
        let params = p(&[("start", "2026-02-01"), ("end", "2026-03-01")]);
        let plan = t.bind("alice", &params, &d).unwrap();
        let x = u128::from(MAX_CLIP_SPEND_CENTS);
        let rows = 10 * (x / 10);
        // customers (1·S)², rows (10·⌊S/10⌋)², spend (S·1)², two categories.
        assert_eq!(plan.delta_squared(), 2 * (x * x + rows * rows + x * x));
        // 2^63 cents: (2^63)² · 3 · 2 is past u128; it saturates.
        t.clip.spend_cents = 1 << 63;
        let plan = t.bind("alice", &params, &d).unwrap();
        assert_eq!(plan.delta_squared(), u128::MAX);
    }

    /// GROUP BY values of either side all filtered away: no output cell,
    /// refused when the query is bound (before any charge).
    #[test]
    fn a_query_with_no_cell_is_refused_when_bound() {
        let d = domains();
        let t = Template {
            name: "x".into(),
            sql: "SELECT b.category, COUNT(*) AS n FROM bank b JOIN platform p WHERE b.category = 'a' AND b.category IN ('b') GROUP BY b.category".into(),
            params: vec![],
            rho_micro: 1,
            min_count: 1,
            analysts: vec!["alice".into()],
            clip: clip(),
        };
        assert_eq!(
            t.bind("alice", &[], &d).unwrap_err(),
            QueryError::NoCells { template: "x".into() }
        );
        let mut fine = t.clone();
        fine.sql = fine.sql.replace("IN ('b')", "IN ('a', 'b')");
        assert_eq!(fine.bind("alice", &[], &d).unwrap().width(), 2);
        let mut platform_side = t.clone();
        platform_side.sql = "SELECT p.segment, COUNT(*) AS n FROM bank b JOIN platform p WHERE p.segment = 's1' AND p.segment IN ('s2') GROUP BY p.segment".into();
        assert_eq!(
            platform_side.bind("alice", &[], &d).unwrap_err(),
            QueryError::NoCells { template: "x".into() }
        );
    }

    /// The compiled holder filter decides every row as the plan's own
    /// predicate evaluation does, around every literal's edges, for
    /// categories in and out of the domain.
    #[test]
    fn holder_filter_agrees_with_holder_row_passes() {
        let d = Domains {
            categories: vec!["a".into(), "b".into(), "c".into()],
            ..domains()
        };
        let wheres = [
            "",
            "WHERE b.date BETWEEN '2026-01-02' AND '2026-01-04'",
            "WHERE b.category IN ('a', 'c') AND b.amount >= 5.00 AND b.date < '2026-01-04'",
            "WHERE b.category <> 'a' AND b.amount BETWEEN 1.00 AND 20.00",
            "WHERE b.amount IN (1.00, 2.50, -3) AND b.date = '2026-01-03'",
            "WHERE b.category = 'b' AND b.amount > -5 AND b.amount <= 2.50 AND b.date >= '2026-01-03'",
            "WHERE b.category > 'a' AND b.amount < 0 AND b.date <> '2026-01-02'",
        ];
        let day0 = parse_date("2026-01-01").unwrap();
        let mut checked = 0;
        for w in wheres {
            let t = Template {
                name: "x".into(),
                sql: format!("SELECT b.category, COUNT(*) AS n FROM bank b JOIN platform p {w} GROUP BY b.category"),
                params: vec![],
                rho_micro: 1,
                min_count: 1,
                analysts: vec!["alice".into()],
                clip: clip(),
            };
            let plan = t.bind("alice", &[], &d).unwrap();
            let filter = plan.holder_filter(&d.categories);
            let mut passed = 0;
            for category in 0..=d.categories.len() {
                let name = d.categories.get(category).map_or("", String::as_str);
                for cents in [
                    -500, -301, -300, -299, -1, 0, 1, 99, 100, 101, 250, 499, 500, 501, 2000, 2001,
                ] {
                    for day in day0..day0 + 6 {
                        let row = HolderRow {
                            category: name,
                            cents,
                            day,
                        };
                        let want = plan.holder_row_passes(&row);
                        assert_eq!(filter.passes(category, cents, day), want, "{w}: {row:?}");
                        passed += usize::from(want);
                        checked += 1;
                    }
                }
            }
            // Each WHERE clause lets some rows through and (but the first)
            // stops others, so both answers are exercised.
            assert!(passed > 0, "{w}");
            assert!(w.is_empty() || passed < 4 * 16 * 6, "{w}");
        }
        assert_eq!(checked, wheres.len() * 4 * 16 * 6);
    }

    #[test]
    fn matcher_groups_and_avg() {
        let d = domains();
        let t = Template {
            name: "x".into(),
            sql: "SELECT b.category, p.country, AVG(b.amount) AS avg_spend FROM bank b JOIN platform p GROUP BY b.category, p.country".into(),
            params: vec![],
            rho_micro: 1,
            min_count: 1,
            analysts: vec!["alice".into()],
            clip: clip(),
        };
        t.check(&d).unwrap();
        let plan = t.bind("alice", &[], &d).unwrap();
        assert_eq!(plan.matcher_groups().len(), 2);
        assert_eq!(plan.holder_groups().len(), 2);
        // customers (added for suppression), avg.sum, avg.count.
        assert_eq!(plan.width(), 6);
        assert_eq!(plan.cells().len(), 12);
        assert_eq!(plan.cells()[3].name, "customers[category=b, country=GB]");
        let r = plan.ratios();
        assert_eq!(r.len(), 4);
        assert_eq!(r[1].name, "avg_spend[category=b, country=GB]");
        assert_eq!((r[1].numerator, r[1].denominator), (4, 5));
        let row = HolderRow {
            category: "b",
            cents: 5,
            day: 0,
        };
        assert_eq!(plan.holder_group_of(&row), Some(1));
        assert_eq!(
            plan.matcher_group_of(&|c| (c == "country").then(|| "FR".to_string())),
            Some(1)
        );
    }

    #[test]
    fn templates_must_be_consistent() {
        let d = domains();
        let mut t = template(TemplateKind::SpendByCategory);
        t.params.pop();
        assert!(t.check(&d).unwrap_err().to_string().contains(":end"));
        let mut t = template(TemplateKind::Overlap);
        t.sql = "SELECT b.email FROM bank b JOIN platform p".into();
        assert!(t.check(&d).unwrap_err().to_string().contains("identifier column"));
    }
}
