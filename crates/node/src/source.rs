//! Where a node's input rows come from: a CSV file, a Parquet file (read
//! row group by row group) or a PostgreSQL query (read through a
//! server-side cursor in a read-only transaction). Each source yields the
//! configured columns of each row as [`Cell`]s; `crate::data` checks them
//! with the same rules whatever the source, so a row's reasons for being
//! bad are the same in every source.
//!
//! The data version is, for a CSV file, SHA-256 of its bytes (as before);
//! for Parquet and PostgreSQL, SHA-256 of the cells read, in order, with
//! the columns' names: what changes the rows read changes the version, so
//! a cached join is never reused on other data.

use std::fs::File;
use std::io::{BufReader, Read};
use std::sync::Arc;
use std::time::Duration;

use ring::digest::{Context, SHA256};
use zeroize::Zeroizing;

use crate::NodeError;
use crate::config::{DataConfig, PgTls, PostgresConfig, SourceKind};

/// What a column must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Text (identifiers, categories, segments, countries).
    Text,
    /// An amount: a decimal with at most 2 places (or an integer, in
    /// whole units).
    Amount,
    /// A date.
    Date,
    /// A label: text or a signed integer (a bank's customer number).
    Label,
}

/// One value of a row, as the source gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cell {
    /// SQL NULL or a Parquet null.
    Null,
    /// Text (from CSV, a string column, or a text column).
    Text(String),
    /// A typed exact decimal (Parquet DECIMAL or integer, PostgreSQL
    /// NUMERIC or integer) written out in full, e.g. `12.340`; `None` when
    /// it does not fit 128 bits.
    Decimal(Option<String>),
    /// A typed date: days since 1970-01-01; `None` when the source's date
    /// has no `YYYY-MM-DD` form (a year past 9999, BC, infinity).
    Day(Option<i32>),
}

/// How rows are numbered in a source's bad-row report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Numbering {
    /// CSV: file line numbers (the header is line 1).
    #[default]
    Lines,
    /// Parquet and PostgreSQL: data rows counted from 1.
    Rows,
}

impl Numbering {
    /// The word for it in a report.
    pub fn word(self) -> &'static str {
        match self {
            Numbering::Lines => "lines",
            Numbering::Rows => "rows",
        }
    }
}

/// What a source says at its end: how its rows were numbered and the hash
/// of what was read (the data version before the normalisation rules).
pub struct SourceEnd {
    /// Row numbering.
    pub numbering: Numbering,
    /// SHA-256 so far (file bytes, or the cells read).
    pub digest: Context,
}

/// How the configured source is named in messages: the file's path, or
/// `postgres://user@host:port/dbname` (never a password).
pub fn label(cfg: &DataConfig) -> String {
    match (cfg.source, &cfg.postgres) {
        (SourceKind::Postgres, Some(pg)) => format!("postgres://{}@{}:{}/{}", pg.user, pg.host, pg.port, pg.dbname),
        (SourceKind::Postgres, None) => "postgres (not configured)".into(),
        _ => cfg.path.display().to_string(),
    }
}

fn data_err(label: &str, what: impl Into<String>) -> NodeError {
    NodeError::Data {
        path: label.to_string(),
        what: what.into(),
    }
}

/// Reads every row of the configured source: `row(n, cells)` for each,
/// with the row's number and its cells in the order of `columns`, or
/// `None` for a CSV row that does not parse (quoting, column count).
///
/// # Errors
/// [`NodeError::Data`] naming the source: it cannot be opened or read, a
/// column is missing or of a type that cannot hold what it must; `row`'s
/// error.
pub fn read_rows(
    cfg: &DataConfig,
    columns: &[(&str, Want)],
    row: impl FnMut(u64, Option<&[Cell]>) -> Result<(), NodeError>,
) -> Result<SourceEnd, NodeError> {
    match cfg.source {
        SourceKind::Csv => read_csv(cfg, columns, row),
        SourceKind::Parquet => read_parquet(cfg, columns, row),
        SourceKind::Postgres => {
            let pg = cfg
                .postgres
                .as_ref()
                .ok_or_else(|| data_err(&label(cfg), "source = \"postgres\" needs [data.postgres]"))?;
            read_postgres(cfg, pg, columns, row)
        }
    }
}

fn bar(cfg: &DataConfig, len: Option<u64>, template: &str) -> indicatif::ProgressBar {
    if !cfg.progress {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        b.set_style(style);
    }
    b.set_message(label(cfg));
    b
}

// ---------------------------------------------------------------- CSV

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

fn read_csv(
    cfg: &DataConfig,
    columns: &[(&str, Want)],
    mut row: impl FnMut(u64, Option<&[Cell]>) -> Result<(), NodeError>,
) -> Result<SourceEnd, NodeError> {
    let path = &cfg.path;
    let name = path.display().to_string();
    let file = File::open(path).map_err(|e| data_err(&name, e.to_string()))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let tee = Tee {
        inner: BufReader::with_capacity(1 << 20, file),
        hash: Context::new(&SHA256),
        bar: bar(cfg, Some(len), "loading {msg} {bar:40} {bytes}/{total_bytes} {eta}"),
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(tee);
    let headers = reader
        .headers()
        .map_err(|e| data_err(&name, format!("header: {e}")))?
        .clone();
    let idx = columns
        .iter()
        .map(|(c, _)| {
            headers
                .iter()
                .position(|h| h.trim() == *c)
                .ok_or_else(|| data_err(&name, format!("no column named {c:?} in the header")))
        })
        .collect::<Result<Vec<usize>, NodeError>>()?;
    let mut record = csv::StringRecord::new();
    let mut cells: Vec<Cell> = Vec::with_capacity(columns.len());
    let mut line = 1u64;
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(_) => {
                line += 1;
                row(line, None)?;
                continue;
            }
        }
        line = record.position().map_or(line + 1, |p| p.line());
        cells.clear();
        cells.extend(idx.iter().map(|i| Cell::Text(record.get(*i).unwrap_or("").to_string())));
        row(line, Some(&cells))?;
    }
    let tee = reader.into_inner();
    tee.bar.finish_and_clear();
    Ok(SourceEnd {
        numbering: Numbering::Lines,
        digest: tee.hash,
    })
}

// ------------------------------------------------- typed sources' digest

/// SHA-256 over the cells read, each tagged and length-prefixed, after the
/// source kind and the columns' names.
struct CellDigest(Context);

impl CellDigest {
    fn new(kind: &[u8], columns: &[(&str, Want)]) -> Self {
        let mut c = Context::new(&SHA256);
        c.update(b"cleanroom-rows-v1\n");
        c.update(kind);
        for (name, _) in columns {
            c.update(&(name.len() as u64).to_le_bytes());
            c.update(name.as_bytes());
        }
        Self(c)
    }

    fn row(&mut self, cells: &[Cell]) {
        for cell in cells {
            match cell {
                Cell::Null => self.0.update(&[0]),
                Cell::Text(s) => self.bytes(1, s.as_bytes()),
                Cell::Decimal(Some(s)) => self.bytes(2, s.as_bytes()),
                Cell::Decimal(None) => self.0.update(&[3]),
                Cell::Day(Some(d)) => self.bytes(4, &d.to_le_bytes()),
                Cell::Day(None) => self.0.update(&[5]),
            }
        }
    }

    fn bytes(&mut self, tag: u8, b: &[u8]) {
        self.0.update(&[tag]);
        self.0.update(&(b.len() as u64).to_le_bytes());
        self.0.update(b);
    }
}

/// `unscaled / 10^scale` written out exactly (`-1234`, 2 -> `-12.34`);
/// `None` for a scale past 76 places either way (no amount has them).
fn decimal_text(unscaled: i128, scale: i32) -> Option<String> {
    if !(-76..=76).contains(&scale) {
        return None;
    }
    let digits = unscaled.unsigned_abs().to_string();
    let sign = if unscaled < 0 { "-" } else { "" };
    let places = usize::try_from(scale.unsigned_abs()).ok()?;
    if scale <= 0 {
        // A negative scale multiplies: 12 with scale -2 is 1200.
        if unscaled == 0 {
            return Some("0".into());
        }
        return Some(format!("{sign}{digits}{}", "0".repeat(places)));
    }
    let padded = if digits.len() <= places {
        format!("{}{digits}", "0".repeat(places + 1 - digits.len()))
    } else {
        digits
    };
    let (int, frac) = padded.split_at(padded.len() - places);
    Some(format!("{sign}{int}.{frac}"))
}

// ------------------------------------------------------------- Parquet

fn read_parquet(
    cfg: &DataConfig,
    columns: &[(&str, Want)],
    mut row: impl FnMut(u64, Option<&[Cell]>) -> Result<(), NodeError>,
) -> Result<SourceEnd, NodeError> {
    use parquet::basic::{ConvertedType, LogicalType, Repetition, Type as Physical};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::record::Field;
    use parquet::schema::types::Type;

    let name = cfg.path.display().to_string();
    let file = File::open(&cfg.path).map_err(|e| data_err(&name, e.to_string()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| {
        data_err(
            &name,
            format!("not a readable Parquet file (truncated, or not Parquet): {e}"),
        )
    })?;
    let meta = reader.metadata();
    let total = u64::try_from(meta.file_metadata().num_rows()).unwrap_or(0);
    let root = meta.file_metadata().schema();
    let fields = root.get_fields();
    // Each wanted column: its top-level field, checked for a type that can
    // hold what it must.
    let mut chosen: Vec<usize> = Vec::new();
    let mut map: Vec<usize> = Vec::with_capacity(columns.len());
    for (col, want) in columns {
        let Some(fi) = fields.iter().position(|f| f.name() == *col) else {
            return Err(data_err(
                &name,
                format!("no column named {col:?} in the Parquet schema"),
            ));
        };
        let f = &fields[fi];
        // `repetition()` asserts that there is one: a damaged schema may
        // lack it, so ask first.
        let info = f.get_basic_info();
        if !f.is_primitive() || !info.has_repetition() || info.repetition() == Repetition::REPEATED {
            return Err(data_err(
                &name,
                format!("column {col:?} is nested, repeated or without a repetition; it must be a plain column"),
            ));
        }
        let logical = info.logical_type_ref().cloned();
        let converted = info.converted_type();
        let physical = f.get_physical_type();
        let string = matches!(logical, Some(LogicalType::String | LogicalType::Enum))
            || matches!(converted, ConvertedType::UTF8 | ConvertedType::ENUM);
        let decimal = matches!(logical, Some(LogicalType::Decimal { .. })) || converted == ConvertedType::DECIMAL;
        let date = matches!(logical, Some(LogicalType::Date)) || converted == ConvertedType::DATE;
        let plain_int = matches!(physical, Physical::INT32 | Physical::INT64)
            && (logical.is_none() && converted == ConvertedType::NONE
                || matches!(logical, Some(LogicalType::Integer { is_signed: true, .. }))
                || matches!(
                    converted,
                    ConvertedType::INT_8 | ConvertedType::INT_16 | ConvertedType::INT_32 | ConvertedType::INT_64
                ));
        let described = match (&logical, physical) {
            (Some(l), p) => format!("{l:?} ({p})"),
            (None, p) => format!("{p}"),
        };
        let ok = match want {
            Want::Text => string,
            Want::Amount => {
                if matches!(physical, Physical::FLOAT | Physical::DOUBLE) {
                    return Err(data_err(
                        &name,
                        format!(
                            "column {col:?} is floating point ({described}): amounts must be exact; write them as DECIMAL, integers (whole units) or strings"
                        ),
                    ));
                }
                string || decimal || plain_int
            }
            Want::Date => string || date,
            Want::Label => string || plain_int,
        };
        if !ok {
            let must = match want {
                Want::Text => "a string",
                Want::Amount => "a DECIMAL, a signed integer (whole units) or a string",
                Want::Date => "a DATE or a string (YYYY-MM-DD)",
                Want::Label => "a string or a signed integer",
            };
            return Err(data_err(
                &name,
                format!("column {col:?} is {described}; it must be {must}"),
            ));
        }
        let pi = match chosen.iter().position(|c| *c == fi) {
            Some(p) => p,
            None => {
                chosen.push(fi);
                chosen.len() - 1
            }
        };
        map.push(pi);
    }
    // The projection keeps the file's column order; `order[k]` is the
    // projection index of the k-th column in it.
    let mut in_file_order = chosen.clone();
    in_file_order.sort_unstable();
    let order: Vec<usize> = in_file_order
        .iter()
        .map(|fi| chosen.iter().position(|c| c == fi).unwrap_or(0))
        .collect();
    let projection = Type::group_type_builder(root.name())
        .with_fields(in_file_order.iter().map(|fi| fields[*fi].clone()).collect())
        .build()
        .map_err(|e| data_err(&name, format!("Parquet schema: {e}")))?;
    let iter = reader
        .get_row_iter(Some(projection))
        .map_err(|e| data_err(&name, format!("Parquet: {e}")))?;
    let progress = bar(cfg, Some(total), "loading {msg} {bar:40} {pos}/{len} rows {eta}");
    let mut digest = CellDigest::new(b"parquet\n", columns);
    let mut projected: Vec<Cell> = vec![Cell::Null; chosen.len()];
    let mut cells: Vec<Cell> = Vec::with_capacity(columns.len());
    let mut n = 0u64;
    for r in iter {
        n += 1;
        // The reader's message may quote the row's bytes (a string that is
        // not UTF-8): not repeated.
        let r = r.map_err(|_| {
            data_err(
                &name,
                format!(
                    "row {n} cannot be read: a string column holds bytes that are not UTF-8, or the file is damaged"
                ),
            )
        })?;
        for (k, (_, field)) in r.get_column_iter().enumerate() {
            let cell = match field {
                Field::Null => Cell::Null,
                Field::Str(s) => Cell::Text(s.clone()),
                Field::Decimal(d) => Cell::Decimal(decimal_of(d.data(), d.scale())),
                Field::Byte(v) => Cell::Decimal(Some(v.to_string())),
                Field::Short(v) => Cell::Decimal(Some(v.to_string())),
                Field::Int(v) => Cell::Decimal(Some(v.to_string())),
                Field::Long(v) => Cell::Decimal(Some(v.to_string())),
                Field::Date(d) => Cell::Day(Some(*d)),
                other => {
                    return Err(data_err(
                        &name,
                        format!("row {n}: a value of an unexpected kind ({})", field_kind(other)),
                    ));
                }
            };
            let slot = order.get(k).and_then(|p| projected.get_mut(*p));
            if let Some(s) = slot {
                *s = cell;
            }
        }
        cells.clear();
        cells.extend(map.iter().map(|p| projected.get(*p).cloned().unwrap_or(Cell::Null)));
        digest.row(&cells);
        row(n, Some(&cells))?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(SourceEnd {
        numbering: Numbering::Rows,
        digest: digest.0,
    })
}

fn field_kind(f: &parquet::record::Field) -> &'static str {
    use parquet::record::Field;
    match f {
        Field::Bool(_) => "boolean",
        Field::Float(_) | Field::Double(_) | Field::Float16(_) => "floating point",
        Field::Bytes(_) => "binary",
        Field::UByte(_) | Field::UShort(_) | Field::UInt(_) | Field::ULong(_) => "unsigned integer",
        _ => "timestamp, time, list, map or group",
    }
}

/// A Parquet decimal's big-endian two's-complement unscaled value, written
/// out (`None` past 128 bits).
fn decimal_of(be: &[u8], scale: i32) -> Option<String> {
    if be.is_empty() {
        return Some("0".into());
    }
    let negative = be.first().is_some_and(|b| b & 0x80 != 0);
    let fill = if negative { 0xff } else { 0 };
    // Leading sign bytes beyond 16 must be pure sign extension.
    let extra = be.len().saturating_sub(16);
    let (head, tail) = be.split_at(extra);
    if head.iter().any(|b| *b != fill) {
        return None;
    }
    let mut buf = [fill; 16];
    let start = 16 - tail.len();
    buf.get_mut(start..)?.copy_from_slice(tail);
    let v = i128::from_be_bytes(buf);
    if extra > 0 && (v < 0) != negative {
        return None;
    }
    decimal_text(v, scale)
}

// ----------------------------------------------------------- PostgreSQL

/// Quotes one SQL identifier (`a"b` -> `"a""b"`).
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// `schema.table` (or `table`) quoted part by part.
fn quote_table(t: &str) -> String {
    t.split('.').map(quote_ident).collect::<Vec<_>>().join(".")
}

/// The configured password: from its file (trailing newline removed) or
/// its environment variable; none when neither is named.
fn pg_password(pg: &PostgresConfig, label: &str) -> Result<Option<Zeroizing<String>>, NodeError> {
    if let Some(path) = &pg.password_file {
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| data_err(label, format!("password_file {}: {e}", path.display())))?,
        );
        return Ok(Some(Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string())));
    }
    if let Some(var) = &pg.password_env {
        let v = std::env::var(var).map_err(|_| {
            data_err(
                label,
                format!("password_env: the environment variable {var} is not set"),
            )
        })?;
        return Ok(Some(Zeroizing::new(v)));
    }
    Ok(None)
}

fn pg_tls(pg: &PostgresConfig, label: &str) -> Result<tokio_postgres_rustls::MakeRustlsConnect, NodeError> {
    let ca = pg
        .ca
        .as_deref()
        .ok_or_else(|| data_err(label, "tls = \"verify-full\" needs ca (the database server's CA, PEM)"))?;
    let pem = std::fs::read(ca).map_err(|e| data_err(label, format!("ca {}: {e}", ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut n = 0;
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        let cert: rustls::pki_types::CertificateDer<'static> =
            cert.map_err(|e| data_err(label, format!("ca {}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| data_err(label, format!("ca {}: {e}", ca.display())))?;
        n += 1;
    }
    if n == 0 {
        return Err(data_err(label, format!("ca {}: no certificate in it", ca.display())));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| data_err(label, format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Connects to the configured database (TLS when configured).
///
/// # Errors
/// [`NodeError::Data`] naming the database: unreachable, refused
/// credentials, TLS failure, a password file or variable missing.
pub fn pg_connect(cfg: &DataConfig) -> Result<postgres::Client, NodeError> {
    let label = label(cfg);
    let pg = cfg
        .postgres
        .as_ref()
        .ok_or_else(|| data_err(&label, "source = \"postgres\" needs [data.postgres]"))?;
    let mut c = postgres::Config::new();
    c.host(&pg.host)
        .port(pg.port)
        .dbname(&pg.dbname)
        .user(&pg.user)
        .application_name("cleanroom-node")
        .connect_timeout(Duration::from_secs(pg.connect_timeout_secs));
    let password = pg_password(pg, &label)?;
    if let Some(p) = &password {
        c.password(p.as_bytes());
    }
    let client = match pg.tls {
        PgTls::Disable => {
            c.ssl_mode(postgres::config::SslMode::Disable);
            c.connect(postgres::NoTls)
        }
        PgTls::VerifyFull => {
            c.ssl_mode(postgres::config::SslMode::Require);
            c.connect(pg_tls(pg, &label)?)
        }
    };
    client.map_err(|e| data_err(&label, format!("cannot connect: {}", pg_error(&e))))
}

/// A PostgreSQL error with the server's message when there is one.
fn pg_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(": ");
                s.push_str(&inner.to_string());
                src = inner.source();
            }
            s
        }
    }
}

fn read_postgres(
    cfg: &DataConfig,
    pg: &PostgresConfig,
    columns: &[(&str, Want)],
    mut row: impl FnMut(u64, Option<&[Cell]>) -> Result<(), NodeError>,
) -> Result<SourceEnd, NodeError> {
    use postgres::types::Type;
    let label = label(cfg);
    let inner = match (&pg.query, &pg.table) {
        (Some(q), None) => q.trim().trim_end_matches(';').to_string(),
        (None, Some(t)) => format!("SELECT * FROM {}", quote_table(t)),
        _ => return Err(data_err(&label, "[data.postgres] needs exactly one of query and table")),
    };
    let mut client = pg_connect(cfg)?;
    let db = |what: &str, e: postgres::Error| data_err(&label, format!("{what}: {}", pg_error(&e)));
    // One snapshot for the whole read; the database refuses any write.
    let mut tx = client
        .build_transaction()
        .read_only(true)
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .map_err(|e| db("cannot start a read-only transaction", e))?;
    tx.batch_execute("SET LOCAL DateStyle = 'ISO, YMD'; SET LOCAL IntervalStyle = 'iso_8601'")
        .map_err(|e| db("session settings", e))?;
    let described = tx.prepare(&inner).map_err(|e| db("the query", e))?;
    // Each wanted column: present once, of a type that can hold it.
    let mut select = Vec::with_capacity(columns.len());
    let mut typed = Vec::with_capacity(columns.len());
    for (col, want) in columns {
        let found: Vec<&postgres::Column> = described.columns().iter().filter(|c| c.name() == *col).collect();
        let c = match found.as_slice() {
            [c] => *c,
            [] => return Err(data_err(&label, format!("the query has no column named {col:?}"))),
            _ => {
                return Err(data_err(
                    &label,
                    format!("the query has more than one column named {col:?}"),
                ));
            }
        };
        let t = c.type_();
        let text = [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(t);
        let ints = [Type::INT2, Type::INT4, Type::INT8].contains(t);
        let kind = match want {
            Want::Text if text => PgKind::Text,
            Want::Amount if text => PgKind::Text,
            Want::Amount if *t == Type::NUMERIC || ints => PgKind::Decimal,
            Want::Amount if [Type::FLOAT4, Type::FLOAT8, Type::MONEY].contains(t) => {
                return Err(data_err(
                    &label,
                    format!(
                        "column {col:?} is {t}: amounts must be exact; use numeric or an integer (whole units), or cast in the query"
                    ),
                ));
            }
            Want::Date if text => PgKind::Text,
            Want::Date if *t == Type::DATE => PgKind::Date,
            Want::Label if text => PgKind::Text,
            Want::Label if ints => PgKind::Decimal,
            _ => {
                let must = match want {
                    Want::Text => "text",
                    Want::Amount => "numeric, an integer (whole units) or text",
                    Want::Date => "date or text (YYYY-MM-DD)",
                    Want::Label => "text or an integer",
                };
                return Err(data_err(&label, format!("column {col:?} is {t}; it must be {must}")));
            }
        };
        select.push(format!("({})::text COLLATE \"C\"", quote_ident(col)));
        typed.push(kind);
    }
    // Rows in a fixed order (every column, in byte order), so the version
    // follows the rows, not the server's scan order; the node numbers its
    // identifiers in this order, and a cached join refers to those numbers.
    // The inner query on lines of its own: a trailing `--` comment in it
    // ends at its line.
    let order: Vec<String> = (1..=select.len()).map(|i| i.to_string()).collect();
    let sql = format!(
        "SELECT {} FROM (\n{inner}\n) AS cleanroom_source ORDER BY {}",
        select.join(", "),
        order.join(", ")
    );
    let stmt = tx.prepare(&sql).map_err(|e| db("the query", e))?;
    let portal = tx.bind(&stmt, &[]).map_err(|e| db("the query", e))?;
    let progress = if cfg.progress {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message(format!("loading {label}"));
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut digest = CellDigest::new(b"postgres\n", columns);
    let mut cells: Vec<Cell> = Vec::with_capacity(columns.len());
    let mut n = 0u64;
    loop {
        let batch = tx
            .query_portal(&portal, i32::try_from(pg.fetch_rows).unwrap_or(i32::MAX))
            .map_err(|e| db("reading rows", e))?;
        if batch.is_empty() {
            break;
        }
        for r in &batch {
            n += 1;
            cells.clear();
            for (i, kind) in typed.iter().enumerate() {
                let v: Option<String> = r
                    .try_get(i)
                    .map_err(|e| data_err(&label, format!("row {n}: {}", pg_error(&e))))?;
                cells.push(match (v, kind) {
                    (None, _) => Cell::Null,
                    (Some(s), PgKind::Text) => Cell::Text(s),
                    (Some(s), PgKind::Decimal) => Cell::Decimal(Some(s)),
                    (Some(s), PgKind::Date) => Cell::Day(cleanroom_query::parse_date(&s).ok()),
                });
            }
            digest.row(&cells);
            row(n, Some(&cells))?;
        }
        progress.set_position(n);
    }
    progress.finish_and_clear();
    drop(portal);
    tx.commit().map_err(|e| db("ending the read", e))?;
    Ok(SourceEnd {
        numbering: Numbering::Rows,
        digest: digest.0,
    })
}

impl std::fmt::Debug for SourceEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SourceEnd {{ numbering: {:?} }}", self.numbering)
    }
}

#[derive(Clone, Copy)]
enum PgKind {
    Text,
    Decimal,
    Date,
}

/// One column of a Parquet file to write: its values, `None` for a null
/// (the column must then be `optional` in the schema).
#[derive(Clone, Debug)]
pub enum ParquetColumn {
    /// `binary` (UTF8) values.
    Str(Vec<Option<String>>),
    /// `binary` values as raw bytes (not checked to be UTF-8: for tests of
    /// damaged strings).
    Bytes(Vec<Option<Vec<u8>>>),
    /// `int64` values (also DECIMAL(p, s) stored as int64: the unscaled value).
    I64(Vec<Option<i64>>),
    /// `int32` values (also DATE: days since 1970-01-01).
    I32(Vec<Option<i32>>),
    /// `double` values.
    F64(Vec<Option<f64>>),
}

impl ParquetColumn {
    fn len(&self) -> usize {
        match self {
            ParquetColumn::Str(v) => v.len(),
            ParquetColumn::Bytes(v) => v.len(),
            ParquetColumn::I64(v) => v.len(),
            ParquetColumn::I32(v) => v.len(),
            ParquetColumn::F64(v) => v.len(),
        }
    }
}

/// Writes a Parquet file (Snappy pages) of `columns` under `message_type`
/// (Parquet's schema text, the columns in its order), `row_group_rows`
/// rows per row group: for `gen-data --format parquet`, the demo and the
/// tests.
///
/// # Errors
/// [`NodeError::Data`] naming the file, for a schema that does not parse,
/// columns of unequal lengths or of another type than the schema's, or a
/// write failure.
pub fn write_parquet(
    path: &std::path::Path,
    message_type: &str,
    columns: &[ParquetColumn],
    row_group_rows: usize,
) -> Result<(), NodeError> {
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int32Type, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;

    let name = path.display().to_string();
    let err = |e: &dyn std::fmt::Display| data_err(&name, format!("writing Parquet: {e}"));
    let schema = Arc::new(parquet::schema::parser::parse_message_type(message_type).map_err(|e| err(&e))?);
    let descr = parquet::schema::types::SchemaDescriptor::new(schema.clone());
    if descr.num_columns() != columns.len() {
        return Err(data_err(&name, "writing Parquet: not one column per schema column"));
    }
    let rows = columns.first().map_or(0, ParquetColumn::len);
    if columns.iter().any(|c| c.len() != rows) {
        return Err(data_err(&name, "writing Parquet: columns of unequal lengths"));
    }
    if row_group_rows == 0 {
        return Err(data_err(&name, "writing Parquet: row groups of 0 rows"));
    }
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let file = File::create(path).map_err(|e| err(&e))?;
    let mut w = SerializedFileWriter::new(file, schema, props).map_err(|e| err(&e))?;
    let mut start = 0;
    while start < rows {
        let end = rows.min(start + row_group_rows);
        let mut rg = w.next_row_group().map_err(|e| err(&e))?;
        for (i, col) in columns.iter().enumerate() {
            let d = descr.column(i);
            let Some(mut cw) = rg.next_column().map_err(|e| err(&e))? else {
                return Err(data_err(&name, "writing Parquet: more columns than the schema has"));
            };
            fn levels<T: Clone>(v: &[Option<T>]) -> (Vec<T>, Vec<i16>) {
                let vals = v.iter().filter_map(Clone::clone).collect();
                let defs = v.iter().map(|x| i16::from(x.is_some())).collect();
                (vals, defs)
            }
            let optional = d.max_def_level() > 0;
            macro_rules! put {
                ($ty:ty, $v:expr, $map:expr) => {{
                    let (vals, defs) = levels(&$v[start..end]);
                    let vals: Vec<_> = vals.into_iter().map($map).collect();
                    if !optional && defs.iter().any(|d| *d == 0) {
                        return Err(data_err(&name, "writing Parquet: a null in a required column"));
                    }
                    cw.typed::<$ty>()
                        .write_batch(&vals, optional.then_some(&defs[..]), None)
                        .map_err(|e| err(&e))?;
                }};
            }
            let physical = d.physical_type();
            use parquet::basic::Type as P;
            match (col, physical) {
                (ParquetColumn::Str(v), P::BYTE_ARRAY) => {
                    put!(ByteArrayType, v, |s: String| ByteArray::from(s.into_bytes()))
                }
                (ParquetColumn::Bytes(v), P::BYTE_ARRAY) => put!(ByteArrayType, v, ByteArray::from),
                (ParquetColumn::I64(v), P::INT64) => put!(Int64Type, v, |x| x),
                (ParquetColumn::I32(v), P::INT32) => put!(Int32Type, v, |x| x),
                (ParquetColumn::F64(v), P::DOUBLE) => put!(DoubleType, v, |x| x),
                _ => {
                    return Err(data_err(
                        &name,
                        "writing Parquet: a column's values are not of its schema type",
                    ));
                }
            }
            cw.close().map_err(|e| err(&e))?;
        }
        rg.close().map_err(|e| err(&e))?;
        start = end;
    }
    w.close().map_err(|e| err(&e))?;
    Ok(())
}

/// The cents of a typed decimal's text: trailing zeros of its fraction
/// dropped (`12.340` -> `12.34`), then the CSV rule (at most 2 places).
pub fn typed_cents(s: &str) -> Option<i64> {
    let t = match s.split_once('.') {
        Some((int, frac)) => {
            let frac = frac.trim_end_matches('0');
            if frac.is_empty() {
                int.to_string()
            } else {
                format!("{int}.{frac}")
            }
        }
        None => s.to_string(),
    };
    crate::data::parse_cents(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_out_exactly() {
        let t = |v, s| decimal_text(v, s).unwrap_or_default();
        assert_eq!(t(1234, 2), "12.34");
        assert_eq!(t(-1234, 2), "-12.34");
        assert_eq!(t(5, 3), "0.005");
        assert_eq!(t(-5, 1), "-0.5");
        assert_eq!(t(12, 0), "12");
        assert_eq!(t(12, -2), "1200");
        assert_eq!(t(0, 3), "0.000");
        assert_eq!(decimal_text(1, 77), None);
        assert_eq!(decimal_of(&[0x04, 0xd2], 2).as_deref(), Some("12.34"));
        assert_eq!(decimal_of(&[0xfb, 0x2e], 2).as_deref(), Some("-12.34"));
        // 17 bytes of sign extension fit; a real 17th byte does not.
        let mut neg = vec![0xff; 17];
        neg[16] = 0xfe;
        assert_eq!(decimal_of(&neg, 0).as_deref(), Some("-2"));
        let mut big = vec![0u8; 17];
        big[0] = 1;
        assert_eq!(decimal_of(&big, 0), None);
        assert_eq!(typed_cents("12.340"), Some(1234));
        assert_eq!(typed_cents("12.000"), Some(1200));
        assert_eq!(typed_cents("12.345"), None);
        assert_eq!(typed_cents("-0.50"), Some(-50));
        assert_eq!(typed_cents("7"), Some(700));
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_table("public.bank"), "\"public\".\"bank\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
