//! Node configuration (TOML; unknown fields are refused). The analyst's is
//! `cleanroom_client::config`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use cleanroom_crypto::normalize::IdKind;
use cleanroom_query::{Clip, Domains, ParamSpec, Template, TemplateKind, parse_cents, parse_date, parse_micro};
use serde::Deserialize;

use crate::NodeError;

pub use cleanroom_transport::{IdentityFiles, Role};

/// The other node.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its address (the platform connects to the bank; the bank needs none).
    pub address: Option<SocketAddr>,
    /// The platform, when the bank has workers: where bank worker `w`
    /// listens (the `w`-th); platform worker `w` talks to bank worker `w`,
    /// so both nodes have the same number of workers.
    #[serde(default)]
    pub workers: Vec<SocketAddr>,
}

/// What both nodes of a collaboration share.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollaborationConfig {
    /// Collaboration id (also the hash-to-group domain).
    pub id: String,
    /// Default country calling code for phone normalisation.
    pub default_country_code: String,
    /// Declared public domain of merchant categories.
    pub categories: Vec<String>,
    /// Declared public domain of platform segments.
    pub segments: Vec<String>,
    /// Declared public domain of countries.
    #[serde(default)]
    pub countries: Vec<String>,
}

/// The node's input file and its schema.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Where the rows are: `csv` (the default), `parquet` or `postgres`.
    #[serde(default)]
    pub source: SourceKind,
    /// The CSV file (with a header row) or the Parquet file.
    #[serde(default)]
    pub path: PathBuf,
    /// Identifier column (one key; or `keys`).
    #[serde(default)]
    pub id_column: Option<String>,
    /// `email` or `phone` (with `id_column`).
    #[serde(default)]
    pub id_kind: Option<String>,
    /// Several identifier columns, a customer matching when any of them
    /// does (docs/protocol.md, "Multi-key matching"): each a kind and its
    /// column, instead of `id_column` and `id_kind`. Both nodes list the
    /// same kinds.
    #[serde(default)]
    pub keys: Vec<KeyColumn>,
    /// The bank's customer column, with several `keys`: a customer's rows
    /// share it (with one key the identifier is the customer).
    pub customer_column: Option<String>,
    /// Largest share of bad rows tolerated (0 to 1).
    #[serde(default = "default_bad_share")]
    pub max_bad_row_share: f64,
    /// Holder: category column.
    pub category_column: Option<String>,
    /// Holder: amount column (decimal, e.g. `12.34`).
    pub amount_column: Option<String>,
    /// Holder: date column (`YYYY-MM-DD`).
    pub date_column: Option<String>,
    /// Matcher: segment column.
    pub segment_column: Option<String>,
    /// Matcher: country column (optional).
    pub country_column: Option<String>,
    /// Show a progress bar while loading (only on a terminal).
    #[serde(default = "yes")]
    pub progress: bool,
    /// `source = "postgres"`: the database and what to read.
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
}

/// One identifier column of a multi-key collaboration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyColumn {
    /// `email` or `phone`.
    pub kind: String,
    /// The column holding it.
    pub column: String,
}

impl DataConfig {
    /// The identifier columns and their kinds: `keys` sorted by kind, or
    /// the one of `id_column` and `id_kind` (whose kind is checked by
    /// [`NodeConfig::check`]; an unknown one reads as e-mail here).
    pub fn key_columns(&self) -> Vec<(String, IdKind)> {
        let kind = |k: &str| IdKind::from_name(k).unwrap_or(IdKind::Email);
        if self.keys.is_empty() {
            return vec![(
                self.id_column.clone().unwrap_or_default(),
                kind(self.id_kind.as_deref().unwrap_or("email")),
            )];
        }
        let mut out: Vec<(String, IdKind)> = self.keys.iter().map(|k| (k.column.clone(), kind(&k.kind))).collect();
        out.sort_by_key(|(_, k)| *k);
        out
    }

    /// Whether a customer is matched on any of several keys.
    pub fn multi_key(&self) -> bool {
        self.keys.len() > 1
    }
}

/// Where a node's rows are.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A CSV file with a header row.
    #[default]
    Csv,
    /// A Parquet file (read row group by row group).
    Parquet,
    /// A PostgreSQL query or table (read through a server-side cursor).
    Postgres,
}

/// TLS to the database.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PgTls {
    /// Plain TCP (a database on the same host or a private network).
    #[default]
    Disable,
    /// TLS, the server's certificate checked against `ca` and its name
    /// against `host`.
    VerifyFull,
}

/// `[data.postgres]`: a read-only SELECT (or a table or view) on a
/// PostgreSQL server. The password is read from a file or an environment
/// variable, never from the config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Server host name or address.
    pub host: String,
    /// Server port.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Database.
    pub dbname: String,
    /// Role to connect as (give it read access only).
    pub user: String,
    /// A file holding the password (its trailing newline is dropped).
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// Refused: a password written in the config.
    #[serde(default)]
    pub password: Option<serde::de::IgnoredAny>,
    /// `disable` or `verify-full`.
    #[serde(default)]
    pub tls: PgTls,
    /// `verify-full`: the CA certificate(s) of the server, PEM.
    pub ca: Option<PathBuf>,
    /// The SELECT to run (one statement; it runs in a read-only transaction).
    pub query: Option<String>,
    /// Or a table or view to read whole (`schema.name` or `name`).
    pub table: Option<String>,
    /// Rows fetched from the cursor at a time.
    #[serde(default = "default_fetch_rows")]
    pub fetch_rows: u32,
    /// Seconds to wait for the connection.
    #[serde(default = "default_pg_connect_timeout")]
    pub connect_timeout_secs: u64,
}

fn default_pg_port() -> u16 {
    5432
}

fn default_fetch_rows() -> u32 {
    10_000
}

fn default_pg_connect_timeout() -> u64 {
    10
}

fn default_bad_share() -> f64 {
    0.01
}

fn yes() -> bool {
    true
}

/// Limits the node enforces.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Smallest peer set size accepted.
    pub min_peer_set: u64,
    /// Largest peer set size accepted.
    pub max_peer_set: u64,
    /// ρ each analyst may spend per period (decimal).
    pub rho_per_analyst: String,
    /// Period length in days.
    pub period_days: u32,
    /// Holder: ε_c charged per join (decimal).
    #[serde(default = "default_eps")]
    pub cardinality_epsilon: String,
    /// Holder: δ_c = 1 / this.
    #[serde(default = "default_delta_inv")]
    pub cardinality_delta_inverse: u64,
    /// Holder: ε_c budget per period (decimal).
    #[serde(default = "default_eps_budget")]
    pub cardinality_epsilon_per_period: String,
    /// Matcher: most dummy rows accepted from the holder.
    #[serde(default = "default_dummies")]
    pub max_dummy_rows: u64,
    /// How long a cached join is reused.
    #[serde(default = "default_ttl")]
    pub join_ttl_hours: u64,
    /// How long one query may take end to end.
    #[serde(default = "default_timeout")]
    pub query_timeout_secs: u64,
    /// Queries each analyst may run per UTC day.
    #[serde(default = "default_runs")]
    pub runs_per_analyst_per_day: u32,
    /// Largest share of this node's identifiers added or removed since the
    /// last join of the same input (decimal, e.g. "0.2").
    #[serde(default = "default_churn")]
    pub max_input_churn: String,
    /// Smallest input this node brings to a join (after filters).
    #[serde(default = "default_min_input")]
    pub min_input_set: u64,
    /// Send this node's per-phase wall times to analysts with each share
    /// (for benchmarks and demos). Off by default: timings follow set sizes
    /// and show whether a join was cached.
    #[serde(default)]
    pub report_timings: bool,
    /// Queries one analyst may have running on this node at once; more are
    /// refused until some finish (so one analyst cannot fill the queue).
    #[serde(default = "default_in_flight_per_analyst")]
    pub max_queries_in_flight_per_analyst: u32,
    /// Queries all analysts together may have running on this node at once.
    #[serde(default = "default_in_flight")]
    pub max_queries_in_flight: u32,
    /// Connections one analyst may have open to this node at once; more are
    /// closed at once (each can carry requests, so this bounds the memory
    /// one analyst's certificate can hold here).
    #[serde(default = "default_connections_per_analyst")]
    pub max_connections_per_analyst: u32,
    /// Requests (of any kind) one analyst may send this node per second, on
    /// average; bursts of twice that. More are refused at once.
    #[serde(default = "default_requests_per_second")]
    pub max_requests_per_analyst_per_second: u32,
    /// How often one query's released share may be replaced by a rerun
    /// after the other node lost its share of the run (a crash between its
    /// aggregate and its store). Each rerun adds the same noise over the
    /// same join (see SECURITY.md); past this the query stays failed.
    #[serde(default = "default_reruns")]
    pub max_reruns_per_query: u32,
    /// How long an admission (`AnalystRequest::Admit`: this node would run
    /// the query) is held for the analyst's `Query` under the same id, in
    /// seconds. While held it counts as a running query.
    #[serde(default = "default_admission_hold")]
    pub admission_hold_secs: u64,
}

fn default_admission_hold() -> u64 {
    10
}

fn default_reruns() -> u32 {
    2
}

fn default_connections_per_analyst() -> u32 {
    64
}
fn default_requests_per_second() -> u32 {
    100
}

fn default_in_flight_per_analyst() -> u32 {
    16
}
fn default_in_flight() -> u32 {
    256
}
fn default_runs() -> u32 {
    1000
}
fn default_churn() -> String {
    "0.5".into()
}
fn default_min_input() -> u64 {
    10
}

fn default_eps() -> String {
    "0.5".into()
}
fn default_delta_inv() -> u64 {
    1_000_000
}
fn default_eps_budget() -> String {
    "20".into()
}
fn default_dummies() -> u64 {
    4096
}
fn default_ttl() -> u64 {
    24
}
fn default_timeout() -> u64 {
    120
}

/// A parameter's allowed values, as written in the config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamConfig {
    /// `date`, `value` or `amount`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Smallest allowed (date or amount).
    pub min: Option<String>,
    /// Largest allowed (date or amount).
    pub max: Option<String>,
    /// Allowed values (`value`).
    #[serde(default)]
    pub values: Vec<String>,
}

/// A template as written in the config: either a built-in `kind` (with
/// `dates` and, for the segment kind, `segments`) or `sql` with `params`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// Name.
    pub name: String,
    /// A built-in kind: `overlap`, `spend_by_category` or `spend_by_category_for_segment`.
    pub kind: Option<TemplateKind>,
    /// Or a query in the SQL dialect, with `:name` placeholders.
    pub sql: Option<String>,
    /// The placeholders' allowed values (with `sql`).
    #[serde(default)]
    pub params: BTreeMap<String, ParamConfig>,
    /// ρ per run (decimal).
    pub rho: String,
    /// Minimum noisy count per cell.
    pub min_count: u64,
    /// Analysts allowed.
    pub analysts: Vec<String>,
    /// Clip bounds per customer and group.
    pub clip: Clip,
    /// Allowed date window `[first, last]` (with `kind`).
    pub dates: Option<[String; 2]>,
    /// Allowed segments (with the segment kind).
    #[serde(default)]
    pub segments: Vec<String>,
}

/// A node's whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `bank` or `platform`.
    pub role: Role,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Directory for the state database.
    pub state_dir: PathBuf,
    /// Certificates.
    pub identity: IdentityFiles,
    /// The other node.
    pub peer: PeerConfig,
    /// The collaboration.
    pub collaboration: CollaborationConfig,
    /// Input data.
    pub data: DataConfig,
    /// Limits.
    pub limits: LimitsConfig,
    /// Signed approval of the templates.
    pub policy: PolicyConfig,
    /// Approved templates.
    #[serde(default)]
    pub templates: Vec<TemplateConfig>,
    /// The node's waits (`[timeouts]`, every entry optional).
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// The collaboration's split into shards (`[shards]`; none: one shard).
    #[serde(default)]
    pub shards: ShardsConfig,
    /// The worker processes that run this node's shards (`[workers]`;
    /// none: the node runs them itself).
    #[serde(default)]
    pub workers: WorkersConfig,
}

/// Where another process of this node is reached: `host:port`, the host
/// an IP address or a name resolved each time it is dialed (a
/// StatefulSet pod's stable DNS name on Kubernetes, which outlives its IP).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct HostPort {
    host: String,
    port: u16,
}

impl TryFrom<String> for HostPort {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if let Ok(a) = text.parse::<SocketAddr>() {
            return Ok(a.into());
        }
        let bad = || format!("{text:?} is not host:port (an IP address or a DNS name, and a port)");
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if host.is_empty() || host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_string(),
            port,
        })
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> Self {
        Self {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl HostPort {
    /// The address, when the host is an IP address.
    pub fn ip(&self) -> Option<SocketAddr> {
        let ip: std::net::IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port))
    }

    /// The address now: the IP, or the name's first IPv4 address (the
    /// node's endpoints are IPv4), else its first.
    ///
    /// # Errors
    /// [`NodeError::Io`] when the name does not resolve.
    pub async fn resolve(&self) -> Result<SocketAddr, NodeError> {
        if let Some(a) = self.ip() {
            return Ok(a);
        }
        let io = |source| NodeError::Io {
            what: "resolving a worker's or coordinator's address",
            source,
        };
        let all: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(io)?
            .collect();
        all.iter()
            .find(|a| a.is_ipv4())
            .or_else(|| all.first())
            .copied()
            .ok_or_else(|| io(std::io::Error::new(std::io::ErrorKind::NotFound, "no address")))
    }
}

/// `[workers]` (docs/protocol.md, "Workers"): a sharded node is a
/// coordinator and `addresses.len()` worker processes; worker `w` runs the
/// joins and aggregate batches of the shards `s` with `s mod N = w` with
/// the peer (the platform's worker `w` with the bank's worker `w` when both
/// have workers). Each is started with `cleanroom worker --config <this
/// file> --index w` (or all of them by `cleanroom node --workers N`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkersConfig {
    /// Where each worker is reached (`host:port`); worker `w` is the
    /// `w`-th, and listens there unless `listen` says otherwise.
    #[serde(default)]
    pub addresses: Vec<HostPort>,
    /// Where every worker binds, when its address is a name (such as
    /// `"0.0.0.0:7410"` in a StatefulSet, whose pods are reached by name).
    pub listen: Option<SocketAddr>,
    /// The directory with each worker's certificate and key
    /// (`<role>-worker-<w>.pem` and `.key`, from `cleanroom certs init
    /// --workers N`); by default the directory of `identity.cert`.
    pub certs: Option<PathBuf>,
    /// The bank: where its workers reach the node itself (its coordinator,
    /// `host:port`); by default `listen`, on 127.0.0.1 when `listen` is on
    /// all addresses.
    pub coordinator: Option<HostPort>,
}

/// `[shards]`: both nodes of a collaboration split their identifiers into
/// `count` shards by a keyed hash under the same 32-byte key, and shard `s`
/// of one node only ever meets shard `s` of the other (docs/protocol.md,
/// "Shards"). Both configs must name the same count and key.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardsConfig {
    /// `S`, 1 (the default: no split) to 4096.
    pub count: Option<u32>,
    /// The shard key file (64 hex digits, written by `cleanroom certs`);
    /// needed when `count` is 2 or more.
    pub key: Option<PathBuf>,
    /// With `count` 2 or more: the memory a node spends on its shards'
    /// input, such as `"1 GiB"` (the default) or `"512 MiB"`; loaded shards
    /// are kept while they fit half of it, the other half is for the work
    /// on the shard at hand (`crate::input`).
    pub memory_budget: Option<String>,
}

/// The default `[shards] memory_budget`: 1 GiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 1 << 30;

/// Parses a memory size: a whole number with an optional unit (`B`, `KiB`,
/// `MiB`, `GiB`; spaces allowed). 0 keeps no shard in memory between uses.
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits_end);
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        _ => {
            return Err(format!(
                "{text:?} is not a size like \"1 GiB\" or \"512 MiB\" (units B, KiB, MiB, GiB)"
            ));
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like \"1 GiB\" or \"512 MiB\""))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    Ok(bytes)
}

/// The node's waits as configured, in seconds; an entry left out keeps
/// its default ([`Timeouts::default`]). Each is between 1 s and one day.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// [`Timeouts::analyst_request`].
    pub analyst_request_secs: Option<u64>,
    /// [`Timeouts::over_rate_request`].
    pub over_rate_request_secs: Option<u64>,
    /// [`Timeouts::peer_frame`].
    pub peer_frame_secs: Option<u64>,
    /// [`Timeouts::join_accept`].
    pub join_accept_secs: Option<u64>,
    /// [`Timeouts::stream_idle`].
    pub stream_idle_secs: Option<u64>,
    /// [`Timeouts::peer_policy`].
    pub peer_policy_secs: Option<u64>,
    /// [`Timeouts::join_stored`].
    pub join_stored_secs: Option<u64>,
    /// [`Timeouts::unclaimed_aggregate`].
    pub unclaimed_aggregate_secs: Option<u64>,
    /// [`Timeouts::refused_aggregate`].
    pub refused_aggregate_secs: Option<u64>,
    /// [`Timeouts::refusal_remembered`].
    pub refusal_remembered_secs: Option<u64>,
    /// [`Timeouts::connect_retry`].
    pub connect_retry_secs: Option<u64>,
    /// [`Timeouts::connect_attempts`] (1 to 10,000).
    pub connect_attempts: Option<u32>,
    /// [`Timeouts::shutdown_drain`].
    pub shutdown_drain_secs: Option<u64>,
}

impl TimeoutsConfig {
    /// The waits, each entry checked and the rest defaulted.
    ///
    /// # Errors
    /// [`NodeError::Config`] naming an entry outside its range.
    pub fn checked(&self, path: &Path) -> Result<Timeouts, NodeError> {
        const MAX_SECS: u64 = 86_400;
        let d = Timeouts::default();
        let wait = |name: &str, v: Option<u64>, default: std::time::Duration| match v {
            None => Ok(default),
            Some(secs) if (1..=MAX_SECS).contains(&secs) => Ok(std::time::Duration::from_secs(secs)),
            Some(secs) => Err(bad(
                path,
                format!("timeouts.{name} is {secs}; it must be between 1 and {MAX_SECS} seconds"),
            )),
        };
        let connect_attempts = match self.connect_attempts {
            None => d.connect_attempts,
            Some(n) if (1..=10_000).contains(&n) => n,
            Some(n) => {
                return Err(bad(
                    path,
                    format!("timeouts.connect_attempts is {n}; it must be between 1 and 10000"),
                ));
            }
        };
        Ok(Timeouts {
            analyst_request: wait("analyst_request_secs", self.analyst_request_secs, d.analyst_request)?,
            over_rate_request: wait(
                "over_rate_request_secs",
                self.over_rate_request_secs,
                d.over_rate_request,
            )?,
            peer_frame: wait("peer_frame_secs", self.peer_frame_secs, d.peer_frame)?,
            join_accept: wait("join_accept_secs", self.join_accept_secs, d.join_accept)?,
            stream_idle: wait("stream_idle_secs", self.stream_idle_secs, d.stream_idle)?,
            peer_policy: wait("peer_policy_secs", self.peer_policy_secs, d.peer_policy)?,
            join_stored: wait("join_stored_secs", self.join_stored_secs, d.join_stored)?,
            unclaimed_aggregate: wait(
                "unclaimed_aggregate_secs",
                self.unclaimed_aggregate_secs,
                d.unclaimed_aggregate,
            )?,
            refused_aggregate: wait(
                "refused_aggregate_secs",
                self.refused_aggregate_secs,
                d.refused_aggregate,
            )?,
            refusal_remembered: wait(
                "refusal_remembered_secs",
                self.refusal_remembered_secs,
                d.refusal_remembered,
            )?,
            connect_retry: wait("connect_retry_secs", self.connect_retry_secs, d.connect_retry)?,
            connect_attempts,
            shutdown_drain: wait("shutdown_drain_secs", self.shutdown_drain_secs, d.shutdown_drain)?,
        })
    }
}

/// Where the node's signed policy and the policy keys are.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// This node's signed policy (written by `cleanroom policy sign`).
    pub signed: PathBuf,
    /// This node's policy public key (hex).
    pub public_key: PathBuf,
    /// The other operator's policy public key (hex).
    pub peer_public_key: PathBuf,
    /// This node's policy private key (hex PKCS#8): needed only by
    /// `cleanroom policy sign`, and better kept off the node.
    pub key: Option<PathBuf>,
}

/// Limits in checked form.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Peer set size bounds.
    pub peer_set: (u64, u64),
    /// ρ per analyst per period, millionths.
    pub rho_per_analyst_micro: u64,
    /// Period length.
    pub period_days: u32,
    /// ε_c per join, millionths.
    pub cardinality_epsilon_micro: u64,
    /// δ_c inverse.
    pub cardinality_delta_inverse: u64,
    /// ε_c budget per period, millionths.
    pub cardinality_budget_micro: u64,
    /// Dummy rows accepted.
    pub max_dummy_rows: u64,
    /// Join cache lifetime in seconds.
    pub join_ttl_secs: u64,
    /// Query timeout.
    pub query_timeout: std::time::Duration,
    /// Runs per analyst per UTC day.
    pub runs_per_day: u32,
    /// Input churn limit, millionths.
    pub max_churn_ppm: u64,
    /// Smallest own input to a join.
    pub min_input_set: u64,
    /// Per-phase timings go to analysts.
    pub report_timings: bool,
    /// Queries running at once per analyst.
    pub in_flight_per_analyst: u32,
    /// Queries running at once in all.
    pub in_flight: u32,
    /// Open connections per analyst.
    pub connections_per_analyst: u32,
    /// Requests per second per analyst (bursts of twice that).
    pub requests_per_second: u32,
    /// Reruns of one query's released share.
    pub max_reruns_per_query: u32,
    /// How long an admission is held for its query.
    pub admission_hold: std::time::Duration,
    /// The node's waits, by name.
    pub timeouts: Timeouts,
}

impl Limits {
    /// The waits of the query lifecycle between the nodes
    /// (`cleanroom_protocol::queries`).
    pub fn query_timeouts(&self) -> cleanroom_protocol::queries::QueryTimeouts {
        cleanroom_protocol::queries::QueryTimeouts {
            query: self.query_timeout,
            unclaimed_aggregate: self.timeouts.unclaimed_aggregate,
            refused_aggregate: self.timeouts.refused_aggregate,
            refusal_remembered: self.timeouts.refusal_remembered,
        }
    }
}

/// Every wait of a node, by name, in one place (the query's own timeout,
/// `query_timeout_secs`, and the admission hold are configured in
/// `[limits]`; these in `[timeouts]`, [`TimeoutsConfig`], with these
/// defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// An analyst's request frame, once the stream is open.
    pub analyst_request: std::time::Duration,
    /// The same, for an analyst over its request rate (only a query under
    /// a held admission is served then).
    pub over_rate_request: std::time::Duration,
    /// The first frame of a peer stream, and a one-frame answer of the
    /// peer (its policy, `ShareHeld`, `OtChoices`).
    pub peer_frame: std::time::Duration,
    /// The bank's `JoinAccept` (it charges the cardinality ε and draws the
    /// dummy rows first).
    pub join_accept: std::time::Duration,
    /// A streamed phase (tokens, OT rows) waiting for the peer's next frame.
    pub stream_idle: std::time::Duration,
    /// Bank: a request may arrive just before the platform has shown its
    /// signed policy on a new connection; it waits this long for it.
    pub peer_policy: std::time::Duration,
    /// Bank: the platform may open an aggregate the moment it has the
    /// join's last token, before the bank has stored the join; and a rerun's
    /// aggregate may arrive while the bank still stores the previous run's
    /// share. Each waits at most this long.
    pub join_stored: std::time::Duration,
    /// Bank: an aggregate for a query whose analyst request has not arrived
    /// waits at most this long (and at most `query_timeout`)...
    pub unclaimed_aggregate: std::time::Duration,
    /// ...or this long if this node refused (or dropped) that query id
    /// within `refusal_remembered`.
    pub refused_aggregate: std::time::Duration,
    /// How long a refused query id is remembered for that.
    pub refusal_remembered: std::time::Duration,
    /// Platform: between attempts to reach the bank at start, and how many.
    pub connect_retry: std::time::Duration,
    /// Attempts to reach the bank at start.
    pub connect_attempts: u32,
    /// At shutdown, how long open connections may take to close.
    pub shutdown_drain: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        use std::time::Duration;
        Self {
            analyst_request: Duration::from_secs(30),
            over_rate_request: Duration::from_secs(2),
            peer_frame: Duration::from_secs(30),
            join_accept: Duration::from_secs(60),
            stream_idle: Duration::from_secs(60),
            peer_policy: Duration::from_secs(5),
            join_stored: Duration::from_secs(5),
            unclaimed_aggregate: Duration::from_secs(30),
            refused_aggregate: Duration::from_secs(2),
            refusal_remembered: Duration::from_secs(120),
            connect_retry: Duration::from_secs(1),
            connect_attempts: 30,
            shutdown_drain: Duration::from_secs(5),
        }
    }
}

fn bad(path: &Path, what: String) -> NodeError {
    NodeError::Config {
        path: path.display().to_string(),
        what,
    }
}

impl NodeConfig {
    /// Reads and checks a config file; relative paths in it are taken
    /// relative to the file's directory.
    ///
    /// # Errors
    /// [`NodeError::Config`] naming the file and the problem.
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|e| bad(path, e.to_string()))?;
        Self::parse(&text, path)
    }

    /// Parses and checks config text as if read from `path` (relative paths
    /// are taken relative to its directory; no file is read).
    ///
    /// # Errors
    /// [`NodeError::Config`] naming `path` and the problem.
    pub fn parse(text: &str, path: &Path) -> Result<Self, NodeError> {
        let mut cfg: NodeConfig = toml::from_str(text).map_err(|e| bad(path, e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(k) = cfg.policy.key.as_mut()
            && k.is_relative()
        {
            *k = base.join(&*k);
        }
        cfg.identity.make_relative_to(base);
        if let Some(k) = cfg.shards.key.as_mut()
            && k.is_relative()
        {
            *k = base.join(&*k);
        }
        if let Some(k) = cfg.workers.certs.as_mut()
            && k.is_relative()
        {
            *k = base.join(&*k);
        }
        if let Some(pg) = cfg.data.postgres.as_mut() {
            for p in [pg.password_file.as_mut(), pg.ca.as_mut()].into_iter().flatten() {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        if cfg.data.path.as_os_str().is_empty() {
            // No file (a database source): left empty, not the config's directory.
        } else if cfg.data.path.is_relative() {
            cfg.data.path = base.join(&cfg.data.path);
        }
        for p in [
            &mut cfg.state_dir,
            &mut cfg.policy.signed,
            &mut cfg.policy.public_key,
            &mut cfg.policy.peer_public_key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.check(path)?;
        Ok(cfg)
    }

    /// Checks cross-field rules.
    ///
    /// # Errors
    /// [`NodeError::Config`].
    pub fn check(&self, path: &Path) -> Result<(), NodeError> {
        if self.role == Role::Platform && self.peer.address.is_none() {
            return Err(bad(
                path,
                "the platform node needs [peer] address (it connects to the bank)".into(),
            ));
        }
        match self.role {
            Role::Bank => {
                for (name, v) in [
                    ("category_column", &self.data.category_column),
                    ("amount_column", &self.data.amount_column),
                    ("date_column", &self.data.date_column),
                ] {
                    if v.is_none() {
                        return Err(bad(path, format!("the bank's [data] needs {name}")));
                    }
                }
            }
            Role::Platform => {
                if self.data.segment_column.is_none() {
                    return Err(bad(path, "the platform's [data] needs segment_column".into()));
                }
            }
        }
        if !(0.0..=1.0).contains(&self.data.max_bad_row_share) {
            return Err(bad(path, "max_bad_row_share must be between 0 and 1".into()));
        }
        self.check_source(path)?;
        self.check_keys(path)?;
        match (self.shards.count.unwrap_or(1), &self.shards.key) {
            (0, _) | (4097.., _) => {
                return Err(bad(path, "shards.count must be between 1 and 4096".into()));
            }
            (2.., None) => {
                return Err(bad(
                    path,
                    "shards.count is 2 or more: [shards] needs key (the shard key file both nodes share)".into(),
                ));
            }
            _ => {}
        }
        self.check_workers(path)?;
        self.memory_budget(path)?;
        self.limits(path)?;
        self.templates(path)?;
        Ok(())
    }

    /// `[workers]`: only with shards, at most one worker per shard; `[peer]
    /// workers` only on a platform with as many workers.
    fn check_workers(&self, path: &Path) -> Result<(), NodeError> {
        let n = self.workers.addresses.len();
        let peer_workers = self.peer.workers.len();
        if peer_workers > 0 && (self.role == Role::Bank || peer_workers != n) {
            return Err(bad(
                path,
                format!(
                    "[peer] workers lists {peer_workers} bank workers: only a platform with as many workers of its own ([workers] addresses, now {n}) can use them, worker w talking to bank worker w"
                ),
            ));
        }
        if n == 0 {
            if self.workers.coordinator.is_some() {
                return Err(bad(path, "[workers] coordinator without [workers] addresses".into()));
            }
            return Ok(());
        }
        if self.role == Role::Platform && self.workers.coordinator.is_some() {
            return Err(bad(
                path,
                "[workers] coordinator is for the bank (the platform's coordinator dials its workers)".into(),
            ));
        }
        let shards = self.shard_count();
        if shards < 2 {
            return Err(bad(
                path,
                "[workers] needs [shards] count of 2 or more: workers run shards".into(),
            ));
        }
        if n > shards as usize || n > cleanroom_wire::MAX_WORKERS as usize {
            return Err(bad(
                path,
                format!(
                    "[workers] lists {n} addresses, more than the {shards} shards (or {}): a worker with no shard would idle",
                    cleanroom_wire::MAX_WORKERS
                ),
            ));
        }
        if self.workers.listen.is_none()
            && let Some(a) = self.workers.addresses.iter().find(|a| a.ip().is_none())
        {
            return Err(bad(
                path,
                format!("[workers] addresses names {a}: give [workers] listen, the address every worker binds"),
            ));
        }
        let mut seen = self.workers.addresses.clone();
        seen.push(self.listen.into());
        seen.sort();
        if seen.windows(2).any(|w| w.first() == w.get(1)) {
            return Err(bad(
                path,
                "[workers] addresses must differ from each other and from listen".into(),
            ));
        }
        Ok(())
    }

    /// The number of worker processes (`[workers] addresses`; 0: none).
    pub fn worker_count(&self) -> u32 {
        u32::try_from(self.workers.addresses.len()).unwrap_or(u32::MAX)
    }

    /// Worker `w`'s certificate and key files.
    pub fn worker_identity(&self, w: u32) -> (PathBuf, PathBuf) {
        let dir = self.workers.certs.clone().unwrap_or_else(|| {
            self.identity
                .cert
                .parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        });
        let file = cleanroom_transport::pki::worker_file(self.role.as_str(), w);
        (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")))
    }

    /// Where the bank's workers reach their coordinator (`[workers]
    /// coordinator`, else `listen`, on 127.0.0.1 when `listen` is on all
    /// addresses).
    pub fn coordinator_address(&self) -> HostPort {
        self.workers.coordinator.clone().unwrap_or_else(|| {
            let mut a = self.listen;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a.into()
        })
    }

    /// Where worker `w` binds: `[workers] listen`, else its address, which
    /// must then be an IP address.
    pub fn worker_listen(&self, w: u32) -> Option<SocketAddr> {
        self.workers
            .listen
            .or_else(|| self.workers.addresses.get(w as usize).and_then(HostPort::ip))
    }

    /// Worker `w`'s own state directory (its shard files and node key),
    /// under the node's.
    pub fn worker_state_dir(&self, w: u32) -> PathBuf {
        self.state_dir.join(format!("worker-{w}"))
    }

    /// The identifier columns: `id_column` and `id_kind`, or `keys` (one
    /// per kind; the bank's `customer_column` with two or more; no
    /// shards with two or more).
    fn check_keys(&self, path: &Path) -> Result<(), NodeError> {
        let d = &self.data;
        let known = |k: &str| IdKind::from_name(k).is_some();
        if d.keys.is_empty() {
            let (Some(_), Some(kind)) = (&d.id_column, &d.id_kind) else {
                return Err(bad(
                    path,
                    "[data] needs id_column and id_kind (or keys, for several identifier columns)".into(),
                ));
            };
            if !known(kind) {
                return Err(bad(path, "id_kind must be \"email\" or \"phone\"".into()));
            }
        } else {
            if d.id_column.is_some() || d.id_kind.is_some() {
                return Err(bad(path, "[data]: keys or id_column and id_kind, not both".into()));
            }
            for (i, k) in d.keys.iter().enumerate() {
                if !known(&k.kind) {
                    return Err(bad(path, "[data] keys: a kind must be \"email\" or \"phone\"".into()));
                }
                if d.keys.iter().take(i).any(|o| o.kind == k.kind) {
                    return Err(bad(path, format!("[data] keys: kind {:?} is listed twice", k.kind)));
                }
            }
        }
        match (self.role, d.multi_key(), &d.customer_column) {
            (Role::Bank, true, None) => {
                return Err(bad(
                    path,
                    "the bank's [data] needs customer_column with several keys (the column its customer's rows share)"
                        .into(),
                ));
            }
            (Role::Bank, false, Some(_)) => {
                return Err(bad(
                    path,
                    "[data] customer_column goes with several keys (with one, the identifier is the customer)".into(),
                ));
            }
            (Role::Platform, _, Some(_)) => {
                return Err(bad(path, "[data] customer_column is the bank's".into()));
            }
            _ => {}
        }
        if d.multi_key() && self.shards.count.unwrap_or(1) > 1 {
            return Err(bad(
                path,
                "[data] keys: a multi-key collaboration runs unsharded for now (shards.count 1): a customer's keys \
                 can fall in different shards and would be counted in each"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The data source's own rules.
    fn check_source(&self, path: &Path) -> Result<(), NodeError> {
        let d = &self.data;
        match d.source {
            SourceKind::Csv | SourceKind::Parquet => {
                if d.path.as_os_str().is_empty() {
                    return Err(bad(path, "[data] needs path (the input file)".into()));
                }
                if d.postgres.is_some() {
                    return Err(bad(path, "[data.postgres] is only for source = \"postgres\"".into()));
                }
            }
            SourceKind::Postgres => {
                let Some(pg) = &d.postgres else {
                    return Err(bad(path, "source = \"postgres\" needs [data.postgres]".into()));
                };
                if pg.password.is_some() {
                    return Err(bad(
                        path,
                        "[data.postgres] password: a password is never written in the config; name a file (password_file) or an environment variable (password_env)".into(),
                    ));
                }
                if pg.password_file.is_some() && pg.password_env.is_some() {
                    return Err(bad(
                        path,
                        "[data.postgres]: password_file or password_env, not both".into(),
                    ));
                }
                if pg.query.is_some() == pg.table.is_some() {
                    return Err(bad(path, "[data.postgres] needs exactly one of query and table".into()));
                }
                if pg.tls == PgTls::VerifyFull && pg.ca.is_none() {
                    return Err(bad(
                        path,
                        "[data.postgres] tls = \"verify-full\" needs ca (the server's CA certificate, PEM)".into(),
                    ));
                }
                if !(1..=1_000_000).contains(&pg.fetch_rows) {
                    return Err(bad(path, "[data.postgres] fetch_rows must be 1 to 1000000".into()));
                }
                if !d.path.as_os_str().is_empty() {
                    return Err(bad(path, "[data] path is for csv and parquet sources".into()));
                }
            }
        }
        Ok(())
    }

    /// `[shards] memory_budget` in bytes ([`DEFAULT_MEMORY_BUDGET`] when left out).
    ///
    /// # Errors
    /// [`NodeError::Config`] for a size that does not parse.
    pub fn memory_budget(&self, path: &Path) -> Result<u64, NodeError> {
        match &self.shards.memory_budget {
            None => Ok(DEFAULT_MEMORY_BUDGET),
            Some(t) => parse_memory(t).map_err(|e| bad(path, format!("shards.memory_budget: {e}"))),
        }
    }

    /// `S`: 1 when the collaboration is not split.
    pub fn shard_count(&self) -> u32 {
        self.shards.count.unwrap_or(1)
    }

    /// The limits, parsed.
    ///
    /// # Errors
    /// [`NodeError::Config`] for an unparsable number or a wait out of range.
    pub fn limits(&self, path: &Path) -> Result<Limits, NodeError> {
        let l = &self.limits;
        let micro = |field: &str, v: &str| parse_micro(v).map_err(|e| bad(path, format!("limits.{field}: {e}")));
        if l.period_days == 0 {
            return Err(bad(path, "limits.period_days must be at least 1".into()));
        }
        if l.min_peer_set > l.max_peer_set {
            return Err(bad(path, "limits.min_peer_set is above max_peer_set".into()));
        }
        if l.cardinality_delta_inverse < 2 {
            return Err(bad(path, "limits.cardinality_delta_inverse must be at least 2".into()));
        }
        Ok(Limits {
            peer_set: (l.min_peer_set, l.max_peer_set),
            rho_per_analyst_micro: micro("rho_per_analyst", &l.rho_per_analyst)?,
            period_days: l.period_days,
            cardinality_epsilon_micro: micro("cardinality_epsilon", &l.cardinality_epsilon)?,
            cardinality_delta_inverse: l.cardinality_delta_inverse,
            cardinality_budget_micro: micro("cardinality_epsilon_per_period", &l.cardinality_epsilon_per_period)?,
            max_dummy_rows: l.max_dummy_rows,
            join_ttl_secs: l.join_ttl_hours.saturating_mul(3600),
            query_timeout: std::time::Duration::from_secs(l.query_timeout_secs.max(1)),
            runs_per_day: l.runs_per_analyst_per_day,
            max_churn_ppm: micro("max_input_churn", &l.max_input_churn)?,
            min_input_set: l.min_input_set,
            report_timings: l.report_timings,
            in_flight_per_analyst: l.max_queries_in_flight_per_analyst.max(1),
            in_flight: l.max_queries_in_flight.max(1),
            connections_per_analyst: l.max_connections_per_analyst.max(1),
            requests_per_second: l.max_requests_per_analyst_per_second.max(1),
            max_reruns_per_query: l.max_reruns_per_query,
            admission_hold: std::time::Duration::from_secs(l.admission_hold_secs.clamp(1, 600)),
            timeouts: self.timeouts.checked(path)?,
        })
    }

    /// The public domains.
    pub fn domains(&self) -> Domains {
        Domains {
            categories: self.collaboration.categories.clone(),
            segments: self.collaboration.segments.clone(),
            countries: self.collaboration.countries.clone(),
            key_slots: u32::try_from(self.data.key_columns().len()).unwrap_or(u32::MAX),
        }
    }

    /// The templates, parsed and checked.
    ///
    /// # Errors
    /// [`NodeError::Config`] naming the template.
    pub fn templates(&self, path: &Path) -> Result<Vec<Template>, NodeError> {
        let domains = self.domains();
        let mut out: Vec<Template> = Vec::new();
        for t in &self.templates {
            if out.iter().any(|o| o.name == t.name) {
                return Err(bad(path, format!("template {:?} is defined twice", t.name)));
            }
            let what = |e: String| bad(path, format!("template {:?}: {e}", t.name));
            let rho_micro = parse_micro(&t.rho).map_err(|e| what(format!("rho: {e}")))?;
            let tpl = match (t.kind, &t.sql) {
                (Some(kind), None) => {
                    let Some([a, b]) = &t.dates else {
                        return Err(what("a built-in kind needs dates = [first, last]".into()));
                    };
                    if !t.params.is_empty() {
                        return Err(what("params go with sql, not with a built-in kind".into()));
                    }
                    Template::builtin(
                        &t.name,
                        kind,
                        (parse_date(a).map_err(what)?, parse_date(b).map_err(what)?),
                        t.segments.clone(),
                        t.clip,
                        rho_micro,
                        t.min_count,
                        t.analysts.clone(),
                    )
                }
                (None, Some(sql)) => {
                    let mut params = Vec::new();
                    for (name, pc) in &t.params {
                        let need = |v: &Option<String>, which: &str| {
                            v.clone()
                                .ok_or_else(|| what(format!("parameter {name}: {which} is required")))
                        };
                        let spec = match pc.kind.as_str() {
                            "date" => ParamSpec::Date {
                                min: parse_date(&need(&pc.min, "min")?).map_err(what)?,
                                max: parse_date(&need(&pc.max, "max")?).map_err(what)?,
                            },
                            "amount" => ParamSpec::Amount {
                                min: parse_cents(&need(&pc.min, "min")?)
                                    .ok_or_else(|| what(format!("parameter {name}: min is not an amount")))?,
                                max: parse_cents(&need(&pc.max, "max")?)
                                    .ok_or_else(|| what(format!("parameter {name}: max is not an amount")))?,
                            },
                            "value" => ParamSpec::OneOf(pc.values.clone()),
                            other => {
                                return Err(what(format!(
                                    "parameter {name}: type {other:?} is not date, value or amount"
                                )));
                            }
                        };
                        params.push((name.clone(), spec));
                    }
                    Template {
                        name: t.name.clone(),
                        sql: sql.clone(),
                        params,
                        rho_micro,
                        min_count: t.min_count,
                        analysts: t.analysts.clone(),
                        clip: t.clip,
                    }
                }
                _ => return Err(what("give either kind (with dates) or sql (with params)".into())),
            };
            tpl.check(&domains).map_err(|e| bad(path, e.to_string()))?;
            out.push(tpl);
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse_memory;

    #[test]
    fn memory_sizes_parse_with_their_units() {
        assert_eq!(parse_memory("1 GiB").unwrap(), 1 << 30);
        assert_eq!(parse_memory("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_memory(" 2048 KiB ").unwrap(), 2 << 20);
        assert_eq!(parse_memory("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_memory("1048576 B").unwrap(), 1 << 20);
        assert_eq!(parse_memory("0").unwrap(), 0);
        for bad in ["", "GiB", "1 GB", "1.5 GiB", "-1 GiB", "1 gib", "99999999999 GiB"] {
            assert!(parse_memory(bad).is_err(), "{bad:?}");
        }
    }
}
