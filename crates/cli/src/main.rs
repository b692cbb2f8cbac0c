#![forbid(unsafe_code)]
//! `cleanroom`: the clean room's one binary. Argument parsing and output
//! formatting only; the work is done by the library crates.

/// `println!` that ends the process quietly when stdout is closed (for
/// example when piped into `head`), instead of panicking.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if writeln!(std::io::stdout(), $($t)*).is_err() {
            std::process::exit(0);
        }
    }};
}

mod output;

/// Counts heap per node for `cleanroom bench` (off until the bench turns it
/// on; otherwise an 8-byte header per allocation).
#[global_allocator]
static ALLOCATOR: tracking_allocator::Allocator<std::alloc::System> = tracking_allocator::Allocator::system();

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use cleanroom_client::config::AnalystConfig;
use cleanroom_client::{Analyst, new_query_id, parse_query_id};
use cleanroom_node::config::NodeConfig;
use cleanroom_node::server::Node;
use cleanroom_sim::simulate::{DEFAULT_CHUNK, SimulateConfig, simulate};
use cleanroom_sim::synth::{SynthConfig, generate};

/// `cleanroom demo --source`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Source {
    Csv,
    Parquet,
    Postgres,
}

impl From<Source> for cleanroom_lab::demo::DemoSource {
    fn from(s: Source) -> Self {
        match s {
            Source::Csv => Self::Csv,
            Source::Parquet => Self::Parquet,
            Source::Postgres => Self::Postgres,
        }
    }
}

#[derive(Parser, Debug)]
#[command(name = "cleanroom", version, about = "A secure two-party data clean room")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Everything in one process: a throwaway CA, synthetic data, both nodes
    /// on loopback QUIC with mutual TLS, three templates run by an analyst,
    /// results beside the plaintext truth.
    Demo {
        /// Bank customers and platform users to generate.
        #[arg(long, default_value_t = 20_000)]
        rows: usize,
        /// Seed of the synthetic data.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Keep the demo's files (certificates, data, configs, state) here.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Run this SQL instead of the three templates (the demo adds it as a
        /// template to both nodes' configs, and says so).
        #[arg(long)]
        sql: Option<String>,
        /// Where the nodes read their rows: CSV files, Parquet files of the
        /// same rows, or tables of a throwaway PostgreSQL server the demo
        /// starts (it needs PostgreSQL's initdb and pg_ctl installed).
        #[arg(long, value_enum, default_value_t = Source::Csv)]
        source: Source,
        /// The keys both nodes match on: `email`, or `email,phone` (a
        /// customer matched when either matches; a fifth of the platform's
        /// users then have an e-mail the bank does not know).
        #[arg(long, value_delimiter = ',', default_value = "email")]
        keys: Vec<String>,
    },
    /// Both parties in memory, no network, no noise: run the join and the
    /// aggregate on synthetic data and check them against plaintext, exactly.
    Simulate(SimulateArgs),
    /// Protocol latency by phase against the curve bound: both nodes in one
    /// process over real QUIC with mutual TLS, on loopback or through an
    /// in-process relay that delays and rate-limits packets.
    Bench {
        /// Sizes (bank customers = platform users), comma separated.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
        rows: Vec<usize>,
        /// Seed of the synthetic data.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Share of the bank's customers the platform also has.
        #[arg(long, default_value_t = 0.5)]
        overlap: f64,
        /// Merchant categories in the data; the timed query has one group per
        /// category plus "other", three cells each.
        #[arg(long, default_value_t = 16)]
        width: usize,
        /// Also write the figures as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also draw latency against set size, with the bound, as SVG.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Emulated round-trip time between the nodes (in-process UDP relay).
        #[arg(long)]
        rtt_ms: Option<u64>,
        /// Runs per size (each on fresh nodes and data).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Emulated bandwidth of each direction between the nodes, Mbit/s.
        #[arg(long)]
        bandwidth_mbit: Option<u64>,
        /// Runs of the timed query on each cached join (each a new query);
        /// the table shows their median.
        #[arg(long, default_value_t = 1)]
        queries: usize,
        /// Shards both nodes split their identifiers into (`[shards]
        /// count`): each join runs as that many shard joins.
        #[arg(long, default_value_t = 1)]
        shards: u32,
        /// Run each node as its own `cleanroom node` process (this binary)
        /// instead of both in the bench's process, so that each node's
        /// peak RSS is measured on its own; bytes and exchanges are then
        /// not counted. Not with --rtt-ms or --bandwidth-mbit.
        #[arg(long)]
        node_processes: bool,
        /// The keys both nodes match on: `email`, or `email,phone` (a
        /// customer matched when either matches; the same data, unsharded).
        #[arg(long, value_delimiter = ',', default_value = "email")]
        keys: Vec<String>,
        /// With --node-processes and --shards: each node's worker processes
        /// (`[workers]`; bank worker w serves platform worker w), a run per
        /// count for each size, such as `1,4` (0: each node runs its shards
        /// itself).
        #[arg(long, value_delimiter = ',')]
        workers: Vec<u32>,
    },
    /// Write synthetic `bank.csv` and `platform.csv` (with `--parquet`,
    /// also `bank.parquet` and `platform.parquet` of the same rows).
    GenData {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Bank customers.
        #[arg(long, default_value_t = 20_000)]
        bank_customers: usize,
        /// Platform users.
        #[arg(long, default_value_t = 20_000)]
        platform_users: usize,
        /// Share of bank customers the platform also has.
        #[arg(long, default_value_t = 0.5)]
        overlap: f64,
        /// Seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Also write the same rows as Parquet files (typed columns:
        /// DECIMAL(18,2) amounts, DATE dates; row groups of 65,536 rows).
        #[arg(long)]
        parquet: bool,
    },
    /// Certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Operators' signed approval of templates.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Run a node until SIGINT or SIGTERM.
    Node {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Also start the node's workers as local processes (`cleanroom
        /// worker`, one per `[workers] addresses` entry; their number must
        /// be this), and start again any that exits.
        #[arg(long)]
        workers: Option<u32>,
    },
    /// Run worker `index` of a node (its `[workers]`) until SIGINT or SIGTERM.
    Worker {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// The worker's index in `[workers] addresses`.
        #[arg(long)]
        index: u32,
    },
    /// Run a template on both nodes as an analyst.
    Query {
        /// The analyst's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Template name.
        #[arg(long, required_unless_present = "sql", conflicts_with = "sql")]
        template: Option<String>,
        /// Ad hoc SQL: runs only as an instance of a template both operators signed.
        #[arg(long)]
        sql: Option<String>,
        /// Parameters, `name=value`.
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Query id (32 hex digits) to retrieve a result again; new if absent.
        #[arg(long)]
        query_id: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Seconds to wait for the nodes.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// List the templates both nodes let this analyst run.
    Templates {
        /// The analyst's TOML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show this analyst's remaining budget on each node.
    Budget {
        /// The analyst's TOML config.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Sign the templates of a node's config with its policy key
    /// (`[policy] key`), writing `[policy] signed`.
    Sign {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a signed policy against a public key, and (with --config) which
    /// of a node's templates it approves.
    Verify {
        /// The signed policy file.
        #[arg(long)]
        policy: PathBuf,
        /// The signer's public key file (hex).
        #[arg(long)]
        public_key: PathBuf,
        /// A node config whose templates to check against the policy.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Make a collaboration CA, bank and platform node certificates and
    /// analyst certificates.
    Init {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// An analyst to make a certificate for (repeatable).
        #[arg(long = "analyst")]
        analysts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Also certificates for this many workers of each node
        /// (`<role>-worker-<w>.pem`, `.key`).
        #[arg(long, default_value_t = 0)]
        workers: u32,
    },
    /// Write `ca.crl.pem` in the CA's directory, revoking the given
    /// certificates (the list replaces any earlier one: name every
    /// certificate that stays revoked). Point `identity.crl` at it.
    Revoke {
        /// The directory with `ca.pem` and `ca.key`.
        #[arg(long)]
        dir: PathBuf,
        /// A certificate (PEM file) to revoke (repeatable).
        #[arg(long = "cert", required = true)]
        certs: Vec<PathBuf>,
        /// Days until the list's next update.
        #[arg(long, default_value_t = 30)]
        days: i64,
    },
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    /// Bank customers (distinct identifiers).
    #[arg(long, default_value_t = 10_000)]
    holder_rows: usize,
    /// Platform users.
    #[arg(long, default_value_t = 10_000)]
    matcher_rows: usize,
    /// Share of the bank's customers that the platform also has (0 to 1).
    #[arg(long, default_value_t = 0.5)]
    overlap: f64,
    /// Merchant categories.
    #[arg(long, default_value_t = 16)]
    categories: usize,
    /// Seed of the synthetic data (protocol randomness always comes from the OS).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Points per chunk on the wire.
    #[arg(long, default_value_t = DEFAULT_CHUNK)]
    chunk_points: usize,
    /// Shards (1 to 4096): each identifier goes to the shard a keyed hash
    /// picks, each shard pair runs the join and aggregate with its own
    /// dummies, and the shares are added up.
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Group the cells by the platform users' segment: a grouped join (one
    /// padded block of the platform's identifiers per segment) and one
    /// aggregate per segment, each checked against the plaintext.
    #[arg(long)]
    group_by_segment: bool,
    /// The keys to match on, comma separated (`email`, `phone`): one key is
    /// today's join; several make a multi-key join, in which a customer
    /// matches when any of its keys does (unsharded only).
    #[arg(long, value_delimiter = ',', default_value = "email", value_parser = parse_key_kind)]
    keys: Vec<cleanroom_sim::simulate::IdKind>,
    /// Share of the platform's users (0 to 1, picked by the seed) who gave
    /// the platform another e-mail address than the bank has, so that only
    /// another key can match them.
    #[arg(long, default_value_t = 0.0)]
    other_emails: f64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

fn parse_key_kind(s: &str) -> Result<cleanroom_sim::simulate::IdKind, String> {
    cleanroom_sim::simulate::IdKind::from_name(s.trim()).ok_or_else(|| format!("{s:?}: a key is email or phone"))
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("{s:?}: parameters are name=value"))
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        builder.init();
    } else {
        builder.json().init();
    }
}

/// `--keys`: 1 for `email`, 2 for `email,phone` (in either order).
fn key_slots(keys: &[String]) -> anyhow::Result<usize> {
    let mut sorted = keys.to_vec();
    sorted.sort();
    Ok(match sorted.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["email"] => 1,
        ["email", "phone"] => 2,
        _ => bail!("--keys: give email, or email,phone"),
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(a) => {
            let report = simulate(&SimulateConfig {
                holder_rows: a.holder_rows,
                matcher_rows: a.matcher_rows,
                overlap: a.overlap,
                categories: a.categories,
                seed: a.seed,
                chunk_points: a.chunk_points,
                shards: a.shards,
                group_by_segment: a.group_by_segment,
                keys: a.keys,
                other_emails: a.other_emails,
            })
            .context("simulation failed")?;
            if a.json {
                out!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                output::simulate(&report);
            }
            if !report.exact {
                bail!("the protocol's result differs from the plaintext computation");
            }
        }
        Command::Demo {
            rows,
            seed,
            json,
            dir,
            sql,
            source,
            keys,
        } => {
            init_logging("warn");
            let two_keys = key_slots(&keys)? > 1;
            if sql.is_some() && !json {
                out!(
                    "the demo adds your query as template \"adhoc\" to both nodes' configs and signs it as both operators (in a real collaboration each operator reviews and signs it)"
                );
            }
            let report = runtime()?
                .block_on(cleanroom_lab::demo::run(
                    rows,
                    seed,
                    dir.as_deref(),
                    sql.as_deref(),
                    source.into(),
                    two_keys,
                ))
                .context("demo failed")?;
            if json {
                out!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                output::demo(&report);
            }
        }
        Command::Bench {
            rows,
            seed,
            overlap,
            width,
            json,
            plot,
            rtt_ms,
            bandwidth_mbit,
            repeat,
            queries,
            shards,
            node_processes,
            keys,
            workers,
        } => {
            init_logging("warn");
            if workers.iter().any(|w| *w > 0) && (!node_processes || shards < 2) {
                bail!(
                    "--workers runs each node's workers as processes over its shards: add --node-processes and --shards"
                );
            }
            if workers.iter().any(|w| *w > shards.min(cleanroom_wire::MAX_WORKERS)) {
                bail!("--workers: at most one worker per shard");
            }
            let key_slots = key_slots(&keys)?;
            if key_slots > 1 && shards > 1 {
                bail!("--keys email,phone runs unsharded (a multi-key collaboration has no shards yet)");
            }
            if node_processes && (rtt_ms.is_some() || bandwidth_mbit.is_some()) {
                bail!("--node-processes runs the nodes on loopback: not with --rtt-ms or --bandwidth-mbit");
            }
            let node_processes = if node_processes {
                Some(std::env::current_exe().context("finding this binary to run the nodes")?)
            } else {
                None
            };
            if !(1..=4096).contains(&shards) {
                bail!("--shards must be between 1 and 4096");
            }
            if !(0.0..=1.0).contains(&overlap) {
                bail!("--overlap must be between 0 and 1");
            }
            if !(1..=200).contains(&width) {
                bail!("--width (merchant categories) must be between 1 and 200");
            }
            if !(1..=100).contains(&queries) {
                bail!("--queries must be between 1 and 100");
            }
            if rows.is_empty() || rows.iter().any(|r| *r < 100) {
                bail!("--rows: give sizes of at least 100");
            }
            let path = (rtt_ms.is_some() || bandwidth_mbit.is_some()).then(|| cleanroom_lab::relay::Path {
                rtt: Duration::from_millis(rtt_ms.unwrap_or(0)),
                bits_per_second: bandwidth_mbit.map(|m| m.saturating_mul(1_000_000)),
            });
            let opts = cleanroom_lab::bench::BenchOptions {
                sizes: rows,
                seed,
                overlap,
                categories: width,
                path,
                repeat,
                queries,
                shards,
                node_processes,
                key_slots,
                workers,
            };
            let bar = indicatif::ProgressBar::new(1);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            let report = runtime()?
                .block_on(cleanroom_lab::bench::run(&opts, |done, total, m| {
                    bar.set_length(total);
                    bar.set_position(done);
                    bar.set_message(m.to_string());
                }))
                .context("bench failed")?;
            bar.finish_and_clear();
            output::bench(&report);
            if let Some(path) = plot {
                cleanroom_lab::bench::plot(&report, &path)?;
                out!("wrote {}", path.display());
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                out!("wrote {}", path.display());
            }
        }
        Command::GenData {
            dir,
            bank_customers,
            platform_users,
            overlap,
            seed,
            parquet,
        } => {
            if !(0.0..=1.0).contains(&overlap) {
                bail!("--overlap must be between 0 and 1");
            }
            let data = generate(&SynthConfig {
                holder_customers: bank_customers,
                matcher_users: platform_users,
                overlap,
                categories: 16,
                seed,
            });
            cleanroom_node::data::write_synthetic(&dir, &data)?;
            out!(
                "wrote {} ({} transactions of {} customers) and {} ({} users; {} shared with the bank)",
                dir.join("bank.csv").display(),
                data.bank.len(),
                bank_customers,
                dir.join("platform.csv").display(),
                data.platform.len(),
                data.shared_customers
            );
            if parquet {
                cleanroom_node::data::write_synthetic_parquet(&dir, &data, 65_536)?;
                out!(
                    "wrote {} and {} (the same rows)",
                    dir.join("bank.parquet").display(),
                    dir.join("platform.parquet").display()
                );
            }
        }
        Command::Certs {
            command: CertsCommand::Revoke { dir, certs, days },
        } => {
            let path = cleanroom_transport::pki::revoke(&dir, &certs, days)?;
            out!(
                "wrote {} revoking {} certificate(s); set identity.crl to it on both nodes and restart them",
                path.display(),
                certs.len()
            );
        }
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    analysts,
                    days,
                    workers,
                },
        } => {
            if workers > cleanroom_wire::MAX_WORKERS {
                bail!("--workers: at most {}", cleanroom_wire::MAX_WORKERS);
            }
            let written = cleanroom_transport::pki::init(&dir, &analysts, days)?;
            for f in &written.files {
                out!("wrote {}", f.display());
            }
            for f in cleanroom_transport::pki::issue_workers(&dir, workers, days)? {
                out!("wrote {}", f.display());
            }
            for f in cleanroom_node::policy::init_keys(&dir)? {
                out!("wrote {}", f.display());
            }
            if let Some(f) = cleanroom_node::shards::init_key(&dir)? {
                out!("wrote {}", f.display());
            }
        }
        Command::Policy {
            command: PolicyCommand::Sign { config },
        } => {
            let cfg = NodeConfig::load(&config)?;
            let signed = cleanroom_node::policy::sign(&cfg, &config)?;
            for t in &signed.templates {
                out!("signed {} {}", t.name, t.digest);
            }
            out!("wrote {}", cfg.policy.signed.display());
        }
        Command::Policy {
            command:
                PolicyCommand::Verify {
                    policy,
                    public_key,
                    config,
                },
        } => {
            let signed = cleanroom_node::policy::load_verified(&policy, &public_key)?;
            out!(
                "signature ok: {} policy of collaboration {:?}, {} templates",
                signed.role,
                signed.collaboration,
                signed.templates.len()
            );
            if let Some(config) = config {
                let cfg = NodeConfig::load(&config)?;
                let mut missing = 0;
                for t in cfg.templates(&config)? {
                    let ok = signed.approves(&t);
                    if !ok {
                        missing += 1;
                    }
                    out!("{} {}", if ok { "approved    " } else { "NOT APPROVED" }, t.name);
                }
                if missing > 0 {
                    bail!(
                        "{missing} template(s) of {} are not approved by this policy",
                        config.display()
                    );
                }
            }
        }
        Command::Node { config, workers } => {
            init_logging("info");
            let cfg = NodeConfig::load(&config)?;
            if let Some(n) = workers
                && n != cfg.worker_count()
            {
                bail!(
                    "--workers {n}: {} lists {} worker addresses in [workers]; give that number",
                    config.display(),
                    cfg.worker_count()
                );
            }
            runtime()?.block_on(async move {
                // The workers first: each splits its input before it listens.
                let supervised = match workers {
                    Some(n) => Some(supervise_workers(&config, n)?),
                    None => None,
                };
                let node = Node::start(cfg, &config).await?;
                shutdown_signal().await;
                tracing::info!("shutting down");
                node.shutdown().await;
                // Dropping the supervisor kills the workers.
                drop(supervised);
                Ok::<(), anyhow::Error>(())
            })?;
        }
        Command::Worker { config, index } => {
            init_logging("info");
            let cfg = NodeConfig::load(&config)?;
            runtime()?.block_on(async move {
                let node = Node::start_worker(cfg, &config, index).await?;
                shutdown_signal().await;
                tracing::info!(worker = index, "shutting down");
                node.shutdown().await;
                Ok::<(), anyhow::Error>(())
            })?;
        }
        Command::Query {
            config,
            template,
            sql,
            params,
            query_id,
            format,
            timeout,
        } => {
            let cfg = AnalystConfig::load(&config)?;
            let qid = match query_id {
                Some(s) => parse_query_id(&s).map_err(anyhow::Error::msg)?,
                None => new_query_id()?,
            };
            let qid_hex = qid.to_string();
            let result = runtime()?
                .block_on(async {
                    let analyst = Analyst::new(&cfg)?;
                    let result = match (&template, &sql) {
                        (Some(t), _) => analyst.query(t, &params, qid, Duration::from_secs(timeout)).await,
                        (None, Some(q)) => {
                            if params.is_empty() {
                                analyst
                                    .query_sql(q, qid, Duration::from_secs(timeout))
                                    .await
                                    .map(|(_, r)| r)
                            } else {
                                Err(cleanroom_client::ClientError::Refused(cleanroom_client::Refusal::new(cleanroom_client::RefusalCode::BadRequest, "with --sql, write the values into the query instead of --param")))
                            }
                        }
                        (None, None) => Err(cleanroom_client::ClientError::Refused(cleanroom_client::Refusal::new(cleanroom_client::RefusalCode::BadRequest, "give --template or --sql"))),
                    };
                    // Tell the nodes this process is done with its
                    // connections (they are counted per analyst).
                    analyst.close().await;
                    result
                })
                // Every failure names the query id: a node may have charged
                // it, and a retry under the same id costs nothing more there.
                .with_context(|| {
                    format!("query {qid_hex} failed; to retry it without a new charge, run the same command with --query-id {qid_hex}")
                })?;
            match format {
                Format::Table => output::result_table(&result, None),
                Format::Csv => output::result_csv(&result),
                Format::Json => out!("{}", serde_json::to_string_pretty(&result)?),
            }
        }
        Command::Templates { config } => {
            let cfg = AnalystConfig::load(&config)?;
            let list = runtime()?.block_on(async {
                let analyst = Analyst::new(&cfg)?;
                let list = analyst.templates().await;
                analyst.close().await;
                list
            })?;
            output::templates(&list);
        }
        Command::Budget { config } => {
            let cfg = AnalystConfig::load(&config)?;
            let list = runtime()?.block_on(async {
                let analyst = Analyst::new(&cfg)?;
                let list = analyst.budget().await;
                analyst.close().await;
                list
            })?;
            output::budget(&list);
        }
    }
    Ok(())
}

/// `cleanroom node --workers N`: starts `cleanroom worker --index w` for
/// each `w < N` as a child process and starts again any that exits (after a
/// second); the returned set's tasks kill their workers when dropped.
fn supervise_workers(config: &std::path::Path, n: u32) -> anyhow::Result<tokio::task::JoinSet<()>> {
    let exe = std::env::current_exe()?;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..n {
        let exe = exe.clone();
        let config = config.to_path_buf();
        set.spawn(async move {
            loop {
                let child = tokio::process::Command::new(&exe)
                    .args(["worker", "--index", &w.to_string(), "--config"])
                    .arg(&config)
                    .kill_on_drop(true)
                    .spawn();
                match child {
                    Ok(mut c) => {
                        tracing::info!(worker = w, pid = c.id(), "worker started");
                        match c.wait().await {
                            Ok(status) => tracing::warn!(worker = w, %status, "worker exited; starting it again"),
                            Err(e) => tracing::warn!(worker = w, error = %e, "waiting for a worker failed"),
                        }
                    }
                    Err(e) => tracing::warn!(worker = w, error = %e, "a worker could not be started"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    Ok(set)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
