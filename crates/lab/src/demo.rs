//! `cleanroom demo`: a throwaway CA and certificates, synthetic data, both
//! nodes on 127.0.0.1 with ephemeral ports, and the three templates run by
//! an analyst, with the plaintext truth beside each result (demo only).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cleanroom_crypto::normalize::IdKind;
use cleanroom_query::{Clip, Plan};
use cleanroom_sim::oracle::truth;
use cleanroom_sim::synth::{SEGMENTS, SynthConfig, SynthData, generate};
use serde::Serialize;

use cleanroom_client::config::AnalystConfig;
use cleanroom_client::{Analyst, QueryResult, new_query_id};
use cleanroom_node::NodeError;

use crate::LabError;
use cleanroom_node::config::NodeConfig;
use cleanroom_node::server::Node;

/// The demo's clip bounds (per customer and category).
pub const CLIP: Clip = Clip::new(5, 50_000);

/// One template run in the demo.
#[derive(Debug, Clone, Serialize)]
pub struct DemoQuery {
    /// Template name.
    pub template: String,
    /// Parameters.
    pub params: Vec<(String, String)>,
    /// What the analyst got.
    pub result: QueryResult,
    /// The exact (clipped) value of each cell, computed in the clear from
    /// the synthetic data. Demo only: no real deployment has this.
    pub truth: Vec<f64>,
    /// Wall time of the query as the analyst saw it.
    pub seconds: f64,
}

/// The whole demo's output.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Bank customers.
    pub bank_customers: usize,
    /// Bank transactions.
    pub bank_transactions: usize,
    /// Platform users.
    pub platform_users: usize,
    /// Shared customers (by construction).
    pub shared_customers: usize,
    /// The keys both nodes matched on (`email`, or `email` and `phone`).
    pub keys: Vec<String>,
    /// The queries.
    pub queries: Vec<DemoQuery>,
    /// Seconds per setup step.
    pub setup: Vec<(String, f64)>,
}

fn write(path: &Path, text: &str) -> Result<(), NodeError> {
    std::fs::write(path, text).map_err(|e| NodeError::Config {
        path: path.display().to_string(),
        what: e.to_string(),
    })
}

/// The collaboration section shared by the demo's and the examples' configs.
pub fn collaboration_toml(categories: &[String]) -> String {
    let cats: Vec<String> = categories.iter().map(|c| format!("{c:?}")).collect();
    let segs: Vec<String> = SEGMENTS.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "[collaboration]\nid = \"demo-bank-platform\"\ndefault_country_code = \"44\"\ncategories = [{}, \"other\"]\nsegments = [{}, \"other\"]\ncountries = [\"GB\", \"FR\", \"DE\", \"ES\", \"IT\", \"NL\"]\n",
        cats.join(", "),
        segs.join(", ")
    )
}

/// The `clip.max_customers` a fixture of `rows` bank customers gives its
/// templates: the next power of two, at least 1,024 (an operator sets it at
/// or above the bank's customer count; it sets the share widths).
pub fn max_customers_for(rows: usize) -> u64 {
    (rows as u64).max(1024).next_power_of_two()
}

/// The templates section shared by both nodes of the demo, for a bank of
/// at most `max_customers` customers.
pub fn templates_toml(analyst: &str, max_customers: u64) -> String {
    format!(
        r#"
[[templates]]
name = "overlap"
kind = "overlap"
rho = "0.1"
min_count = 10
analysts = ["{analyst}"]
clip = {{ transactions = {t}, spend_cents = {s}, max_customers = {m} }}
dates = ["2026-01-01", "2026-12-31"]

[[templates]]
name = "spend_by_category"
kind = "spend_by_category"
rho = "1"
min_count = 20
analysts = ["{analyst}"]
clip = {{ transactions = {t}, spend_cents = {s}, max_customers = {m} }}
dates = ["2026-01-01", "2026-12-31"]

[[templates]]
name = "spend_by_category_for_segment"
kind = "spend_by_category_for_segment"
rho = "1"
min_count = 20
analysts = ["{analyst}"]
clip = {{ transactions = {t}, spend_cents = {s}, max_customers = {m} }}
dates = ["2026-01-01", "2026-12-31"]
segments = ["messenger_active", "marketplace_buyer", "creator", "gamer", "casual"]
"#,
        t = CLIP.transactions,
        s = CLIP.spend_cents,
        m = max_customers
    )
}

/// A node config for the demo or the examples.
pub fn node_toml(
    role: &str,
    listen: &str,
    peer: Option<&str>,
    certs: &str,
    data: &str,
    state: &str,
    categories: &[String],
    analyst: &str,
    max_customers: u64,
) -> String {
    let peer = peer.map_or_else(String::new, |p| format!("address = \"{p}\"\n"));
    let schema = if role == "bank" {
        "id_column = \"email\"\nid_kind = \"email\"\ncategory_column = \"category\"\namount_column = \"amount\"\ndate_column = \"date\"\n"
    } else {
        "id_column = \"email\"\nid_kind = \"email\"\nsegment_column = \"segment\"\ncountry_column = \"country\"\n"
    };
    let other = if role == "bank" { "platform" } else { "bank" };
    format!(
        "role = \"{role}\"\nlisten = \"{listen}\"\nstate_dir = \"{state}\"\n\n[identity]\ncert = \"{certs}/{role}.pem\"\nkey = \"{certs}/{role}.key\"\nca = \"{certs}/ca.pem\"\n\n[policy]\nsigned = \"{certs}/{role}.policy\"\npublic_key = \"{certs}/{role}-policy.pub\"\npeer_public_key = \"{certs}/{other}-policy.pub\"\nkey = \"{certs}/{role}-policy.key\"\n\n[peer]\n{peer}\n{collab}\n[data]\npath = \"{data}/{role}.csv\"\n{schema}max_bad_row_share = 0.01\nprogress = false\n\n[limits]\nmin_peer_set = 10\nmax_peer_set = 100000000\nrho_per_analyst = \"20\"\nperiod_days = 30\ncardinality_epsilon = \"0.5\"\ncardinality_delta_inverse = 1000000\ncardinality_epsilon_per_period = \"50\"\nreport_timings = true\n{templates}",
        collab = collaboration_toml(categories),
        templates = templates_toml(analyst, max_customers)
    )
}

/// An analyst config.
pub fn analyst_toml(name: &str, certs: &str, bank: &str, platform: &str) -> String {
    format!(
        "name = \"{name}\"\n\n[identity]\ncert = \"{certs}/analyst-{name}.pem\"\nkey = \"{certs}/analyst-{name}.key\"\nca = \"{certs}/ca.pem\"\n\n[[nodes]]\nrole = \"bank\"\naddress = \"{bank}\"\n\n[[nodes]]\nrole = \"platform\"\naddress = \"{platform}\"\n"
    )
}

/// Signs a node config's templates with its policy key (both operators'
/// step, done here for the demo and the tests).
fn sign_config(path: &Path) -> Result<(), NodeError> {
    cleanroom_node::policy::sign(&NodeConfig::load(path)?, path).map(|_| ())
}

/// A collaboration on disk: certificates, synthetic data and configs, with
/// helpers to start its nodes (the demo, and tests, use it).
#[derive(Debug)]
pub struct Fixture {
    /// Its directory.
    pub dir: PathBuf,
    /// The synthetic data written to `data/`.
    pub data: SynthData,
    /// The bank's config file.
    pub bank_config: PathBuf,
    /// The platform's config file (rewritten by [`Fixture::start_platform`]).
    pub platform_config: PathBuf,
    /// Templates added to both nodes' configs after creation (TOML).
    extra: String,
    /// The templates' `clip.max_customers` ([`max_customers_for`] the rows).
    pub max_customers: u64,
    /// Text replacements made in both nodes' configs (see [`Fixture::edit_configs`]).
    edits: Vec<(String, String)>,
    /// The platform's `[data]` source lines, when not its CSV file (see
    /// [`Fixture::use_parquet`], [`Fixture::use_postgres`]).
    platform_source: Option<String>,
    /// Text replacements made in the platform's config only (see
    /// [`Fixture::use_keys`]).
    platform_edits: Vec<(String, String)>,
}

/// Where the demo's nodes read their rows from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DemoSource {
    /// `data/bank.csv` and `data/platform.csv`.
    #[default]
    Csv,
    /// The same rows as `data/bank.parquet` and `data/platform.parquet`.
    Parquet,
    /// The same rows in tables `bank` and `platform` of a throwaway
    /// PostgreSQL server the demo starts ([`crate::pg::TempPostgres`]).
    Postgres,
}

/// The line of a node config generated by [`node_toml`] that names its CSV file.
fn csv_line(role: &str) -> String {
    format!("path = \"data/{role}.csv\"\n")
}

/// The config text for `path` with each `(from, to)` of `edits` replaced;
/// an error names the first `from` it does not contain.
fn edited(mut text: String, edits: &[(String, String)], path: &Path) -> Result<String, NodeError> {
    for (from, to) in edits {
        if !text.contains(from.as_str()) {
            return Err(NodeError::Config {
                path: path.display().to_string(),
                what: format!("no {from:?} to replace"),
            });
        }
        text = text.replace(from.as_str(), to);
    }
    Ok(text)
}

impl Fixture {
    /// Writes certificates (CA, both nodes, the given analysts), synthetic
    /// data with `rows` customers and users (half shared), and both configs.
    ///
    /// # Errors
    /// Any file or certificate error.
    pub fn create(dir: &Path, rows: usize, seed: u64, analysts: &[&str]) -> Result<Self, NodeError> {
        Self::create_with(dir, rows, seed, analysts, 0.5, 16)
    }

    /// As [`Self::create`], with the share of customers the platform also has
    /// (`overlap`, 0 to 1) and the number of merchant categories in the data.
    ///
    /// # Errors
    /// Any file or certificate error.
    pub fn create_with(
        dir: &Path,
        rows: usize,
        seed: u64,
        analysts: &[&str],
        overlap: f64,
        categories: usize,
    ) -> Result<Self, NodeError> {
        let names: Vec<String> = analysts.iter().map(|a| (*a).to_string()).collect();
        cleanroom_transport::pki::init(&dir.join("certs"), &names, 2)?;
        cleanroom_node::policy::init_keys(&dir.join("certs"))?;
        cleanroom_node::shards::init_key(&dir.join("certs"))?;
        let data = generate(&SynthConfig {
            holder_customers: rows,
            matcher_users: rows,
            overlap,
            categories,
            seed,
        });
        cleanroom_node::data::write_synthetic(&dir.join("data"), &data)?;
        let analyst = analysts.first().copied().unwrap_or("alice");
        let bank_config = dir.join("bank.toml");
        write(
            &bank_config,
            &node_toml(
                "bank",
                "127.0.0.1:0",
                None,
                "certs",
                "data",
                "state/bank",
                &data.categories,
                analyst,
                max_customers_for(rows),
            ),
        )?;
        sign_config(&bank_config)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            data,
            bank_config,
            platform_config: dir.join("platform.toml"),
            extra: String::new(),
            max_customers: max_customers_for(rows),
            edits: Vec::new(),
            platform_source: None,
            platform_edits: Vec::new(),
        })
    }

    /// Both nodes match on e-mail or phone (issue 17): their `[data]` lists
    /// both key columns, the bank's also its customer column. First
    /// `other_emails` (0 to 1) of the platform's users get an e-mail the
    /// bank does not have (`cleanroom_sim::simulate::give_other_emails`),
    /// so only their phone can match them, and the data files are written
    /// again. Call it before [`Self::use_parquet`] or [`Self::use_postgres`].
    ///
    /// # Errors
    /// A file that cannot be written; a config that cannot be signed.
    pub fn use_keys(&mut self, other_emails: f64, seed: u64) -> Result<(), NodeError> {
        cleanroom_sim::simulate::give_other_emails(&mut self.data, other_emails, seed);
        cleanroom_node::data::write_synthetic(&self.dir.join("data"), &self.data)?;
        let one = "id_column = \"email\"\nid_kind = \"email\"\n";
        let keys = "keys = [{ kind = \"email\", column = \"email\" }, { kind = \"phone\", column = \"phone\" }]\n";
        let text = std::fs::read_to_string(&self.bank_config).map_err(|e| NodeError::Config {
            path: self.bank_config.display().to_string(),
            what: e.to_string(),
        })?;
        let bank = format!("customer_column = \"customer\"\n{keys}");
        let text = edited(text, &[(one.to_string(), bank)], &self.bank_config)?;
        write(&self.bank_config, &text)?;
        sign_config(&self.bank_config)?;
        self.platform_edits.push((one.to_string(), keys.to_string()));
        Ok(())
    }

    /// Both nodes read their rows from Parquet files of the same data
    /// (written now, row groups of 65,536 rows).
    ///
    /// # Errors
    /// A file that cannot be written; a config that cannot be signed.
    pub fn use_parquet(&mut self) -> Result<(), NodeError> {
        cleanroom_node::data::write_synthetic_parquet(&self.dir.join("data"), &self.data, 65_536)?;
        self.set_source(|role| format!("source = \"parquet\"\npath = \"data/{role}.parquet\"\n"))
    }

    /// Both nodes read their rows from tables `bank` and `platform` of
    /// `pg`, filled now from the CSV files, as a role `cleanroom_reader`
    /// that may only read them (its password in `certs/postgres.password`).
    ///
    /// # Errors
    /// The server's errors; a config that cannot be written or signed.
    pub fn use_postgres(&mut self, pg: &crate::pg::TempPostgres) -> Result<(), crate::LabError> {
        let password = pg.random_password()?;
        pg.execute(&format!(
            "CREATE TABLE bank (customer bigint, email text, phone text, category text, amount numeric(14,2), date date);\
             CREATE TABLE platform (email text, phone text, segment text, country text);\
             CREATE ROLE cleanroom_reader LOGIN PASSWORD '{password}';\
             GRANT SELECT ON bank, platform TO cleanroom_reader;"
        ))?;
        pg.copy_csv("bank", &self.dir.join("data").join("bank.csv"))?;
        pg.copy_csv("platform", &self.dir.join("data").join("platform.csv"))?;
        let file = self.dir.join("certs").join("postgres.password");
        crate::pg::write_secret(&file, &password)?;
        let port = pg.port;
        Ok(self.set_source(|role| {
            format!(
                "source = \"postgres\"\npostgres = {{ host = \"127.0.0.1\", port = {port}, dbname = \"postgres\", user = \"cleanroom_reader\", password_file = \"certs/postgres.password\", table = \"public.{role}\" }}\n"
            )
        })?)
    }

    /// Replaces each config's CSV `path` line by `lines(role)`: the
    /// bank's now (signed again), the platform's when it is written.
    fn set_source(&mut self, lines: impl Fn(&str) -> String) -> Result<(), NodeError> {
        let text = std::fs::read_to_string(&self.bank_config).map_err(|e| NodeError::Config {
            path: self.bank_config.display().to_string(),
            what: e.to_string(),
        })?;
        let text = edited(text, &[(csv_line("bank"), lines("bank"))], &self.bank_config)?;
        write(&self.bank_config, &text)?;
        sign_config(&self.bank_config)?;
        self.platform_source = Some(lines("platform"));
        Ok(())
    }

    /// The platform's config text with the edits and its source.
    fn platform_text(&self, text: String) -> Result<String, NodeError> {
        let text = edited(text, &self.edits, &self.platform_config)?;
        let text = edited(text, &self.platform_edits, &self.platform_config)?;
        match &self.platform_source {
            None => Ok(text),
            Some(lines) => edited(text, &[(csv_line("platform"), lines.clone())], &self.platform_config),
        }
    }

    /// Adds an SQL template (no parameters) to both nodes' configs, after
    /// checking it against the dialect.
    ///
    /// # Errors
    /// [`NodeError::Refused`] with the dialect's message for a refused query.
    pub fn add_sql_template(&mut self, name: &str, sql: &str, analyst: &str) -> Result<(), NodeError> {
        if sql.contains("'''") {
            return Err(NodeError::refused(
                cleanroom_node::RefusalCode::BadRequest,
                "the query may not contain '''",
            ));
        }
        let domains = NodeConfig::load(&self.bank_config)?.domains();
        cleanroom_query::sql::parse(sql, &domains.schema(), &std::collections::BTreeMap::new())
            .map_err(|e| NodeError::refused(cleanroom_node::RefusalCode::BadRequest, e.0))?;
        let t = format!(
            "\n[[templates]]\nname = \"{name}\"\nsql = '''{sql}'''\nrho = \"1\"\nmin_count = 20\nanalysts = [\"{analyst}\"]\nclip = {{ transactions = {}, spend_cents = {}, max_customers = {} }}\n",
            CLIP.transactions, CLIP.spend_cents, self.max_customers
        );
        self.extra.push_str(&t);
        let text = std::fs::read_to_string(&self.bank_config).map_err(|e| NodeError::Config {
            path: self.bank_config.display().to_string(),
            what: e.to_string(),
        })?;
        write(&self.bank_config, &format!("{text}{t}"))?;
        // The demo plays both operators: it signs the new template set.
        sign_config(&self.bank_config)
    }

    /// Replaces text in both nodes' configs (the bank's now, the
    /// platform's when [`Self::start_platform`] writes it): for tests that
    /// need other limits than the demo's.
    ///
    /// # Errors
    /// [`NodeError::Config`] when a config does not contain a `from`.
    pub fn edit_configs(&mut self, edits: &[(&str, &str)]) -> Result<(), NodeError> {
        let edits: Vec<(String, String)> = edits
            .iter()
            .map(|(f, t)| ((*f).to_string(), (*t).to_string()))
            .collect();
        let text = std::fs::read_to_string(&self.bank_config).map_err(|e| NodeError::Config {
            path: self.bank_config.display().to_string(),
            what: e.to_string(),
        })?;
        let text = edited(text, &edits, &self.bank_config)?;
        write(&self.bank_config, &text)?;
        sign_config(&self.bank_config)?;
        self.edits.extend(edits);
        Ok(())
    }

    /// Starts the bank from its config.
    ///
    /// # Errors
    /// As [`Node::start`].
    pub async fn start_bank(&self) -> Result<Node, NodeError> {
        Node::start(NodeConfig::load(&self.bank_config)?, &self.bank_config).await
    }

    /// Makes the platform a coordinator with a worker listening at each of
    /// `addresses` (its config's `[workers]`, written by
    /// [`Self::start_platform`] or [`Self::write_platform_config`]), and
    /// issues the workers' certificates. Needs `[shards]` (see
    /// [`Self::edit_configs`]).
    ///
    /// # Errors
    /// A certificate that cannot be issued.
    pub fn use_workers(&mut self, addresses: &[std::net::SocketAddr]) -> Result<(), NodeError> {
        let names: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        self.use_workers_at(&names, None)
    }

    /// As [`Self::use_workers`], with the workers' addresses as `host:port`
    /// text (names allowed) and, if given, the address every worker binds
    /// (`[workers] listen`).
    ///
    /// # Errors
    /// A certificate that cannot be issued.
    pub fn use_workers_at(
        &mut self,
        addresses: &[String],
        listen: Option<std::net::SocketAddr>,
    ) -> Result<(), NodeError> {
        let n = u32::try_from(addresses.len()).unwrap_or(u32::MAX);
        cleanroom_transport::pki::issue_workers(&self.dir.join("certs"), n, 2)?;
        let list: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
        let listen = listen.map_or_else(String::new, |l| format!("listen = \"{l}\"\n"));
        self.platform_edits.push((
            "[limits]".into(),
            format!("[workers]\naddresses = [{}]\n{listen}\n[limits]", list.join(", ")),
        ));
        Ok(())
    }

    /// Makes the bank a coordinator listening at `coordinator` with a
    /// worker listening at each of `addresses` (its config's `[workers]`),
    /// and points the platform's workers at them (`[peer] workers`: the
    /// platform needs as many workers, [`Self::use_workers`]); issues the
    /// workers' certificates.
    ///
    /// # Errors
    /// A config that cannot be edited or signed, a certificate that cannot
    /// be issued.
    pub fn use_bank_workers(
        &mut self,
        coordinator: std::net::SocketAddr,
        addresses: &[std::net::SocketAddr],
    ) -> Result<(), NodeError> {
        let n = u32::try_from(addresses.len()).unwrap_or(u32::MAX);
        cleanroom_transport::pki::issue_workers(&self.dir.join("certs"), n, 2)?;
        let list: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
        let list = list.join(", ");
        let text = std::fs::read_to_string(&self.bank_config).map_err(|e| NodeError::Config {
            path: self.bank_config.display().to_string(),
            what: e.to_string(),
        })?;
        let text = edited(
            text,
            &[
                (
                    "[limits]".into(),
                    format!("[workers]\naddresses = [{list}]\n\n[limits]"),
                ),
                ("listen = \"127.0.0.1:0\"".into(), format!("listen = \"{coordinator}\"")),
            ],
            &self.bank_config,
        )?;
        write(&self.bank_config, &text)?;
        sign_config(&self.bank_config)?;
        self.platform_edits
            .push(("[peer]\n".into(), format!("[peer]\nworkers = [{list}]\n")));
        Ok(())
    }

    /// Starts worker `index` of the bank from the bank's config.
    ///
    /// # Errors
    /// As [`Node::start_worker`].
    pub async fn start_bank_worker(&self, index: u32) -> Result<Node, NodeError> {
        Node::start_worker(NodeConfig::load(&self.bank_config)?, &self.bank_config, index).await
    }

    /// Starts worker `index` of the platform from the platform's config
    /// (written first by [`Self::write_platform_config`]).
    ///
    /// # Errors
    /// As [`Node::start_worker`].
    pub async fn start_worker(&self, index: u32) -> Result<Node, NodeError> {
        Node::start_worker(NodeConfig::load(&self.platform_config)?, &self.platform_config, index).await
    }

    /// Writes the platform's config pointing at `bank` and starts it.
    ///
    /// # Errors
    /// As [`Node::start`].
    pub async fn start_platform(&self, bank: std::net::SocketAddr) -> Result<Node, NodeError> {
        self.write_platform_config(bank)?;
        Node::start(NodeConfig::load(&self.platform_config)?, &self.platform_config).await
    }

    /// Writes the platform's config pointing at `bank`, listening on any
    /// free port, signed.
    ///
    /// # Errors
    /// A config that cannot be written or signed.
    pub fn write_platform_config(&self, bank: std::net::SocketAddr) -> Result<(), NodeError> {
        let analyst = "alice";
        let text = node_toml(
            "platform",
            "127.0.0.1:0",
            Some(&bank.to_string()),
            "certs",
            "data",
            "state/platform",
            &self.data.categories,
            analyst,
            self.max_customers,
        ) + &self.extra;
        let text = self.platform_text(text)?;
        write(&self.platform_config, &text)?;
        sign_config(&self.platform_config)
    }

    /// Writes both configs to listen on fixed addresses, the platform's
    /// pointing at the bank, for nodes run as `cleanroom node --config`
    /// processes; both re-signed.
    ///
    /// # Errors
    /// A config that cannot be written or signed.
    pub fn write_process_configs(
        &self,
        bank: std::net::SocketAddr,
        platform: std::net::SocketAddr,
    ) -> Result<(), NodeError> {
        let text = std::fs::read_to_string(&self.bank_config).map_err(|e| NodeError::Config {
            path: self.bank_config.display().to_string(),
            what: e.to_string(),
        })?;
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("listen = ") {
                    format!("listen = \"{bank}\"\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        write(&self.bank_config, &text)?;
        sign_config(&self.bank_config)?;
        let text = node_toml(
            "platform",
            &platform.to_string(),
            Some(&bank.to_string()),
            "certs",
            "data",
            "state/platform",
            &self.data.categories,
            "alice",
            self.max_customers,
        ) + &self.extra;
        let text = self.platform_text(text)?;
        write(&self.platform_config, &text)?;
        sign_config(&self.platform_config)
    }

    /// The plan of one of the bank's templates (for computing the truth).
    ///
    /// # Errors
    /// A config error, or a refusal of the parameters.
    pub fn plan(&self, template: &str, params: &[(String, String)]) -> Result<Plan, NodeError> {
        let cfg = NodeConfig::load(&self.bank_config)?;
        let t = cfg
            .templates(&self.bank_config)?
            .into_iter()
            .find(|t| t.name == template)
            .ok_or_else(|| {
                NodeError::refused(
                    cleanroom_node::RefusalCode::UnknownTemplate,
                    format!("no template {template:?}"),
                )
            })?;
        let analyst = t.analysts.first().cloned().unwrap_or_default();
        t.bind(&analyst, params, &cfg.domains())
            .map_err(|e| NodeError::refused(cleanroom_node::RefusalCode::BadParameters, e.to_string()))
    }

    /// Writes `analyst-<name>.toml` for the two nodes and loads it.
    ///
    /// # Errors
    /// A file error, or the config does not load.
    pub fn analyst(
        &self,
        name: &str,
        bank: std::net::SocketAddr,
        platform: std::net::SocketAddr,
    ) -> Result<AnalystConfig, LabError> {
        let path = self.dir.join(format!("analyst-{name}.toml"));
        write(
            &path,
            &analyst_toml(name, "certs", &bank.to_string(), &platform.to_string()),
        )?;
        Ok(AnalystConfig::load(&path)?)
    }
}

/// The three templates the demo runs, with their parameters.
pub fn demo_queries() -> Vec<(&'static str, Vec<(String, String)>)> {
    let p = |kv: &[(&str, &str)]| -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    vec![
        ("overlap", p(&[])),
        (
            "spend_by_category",
            p(&[("start", "2026-01-01"), ("end", "2026-03-31")]),
        ),
        (
            "spend_by_category_for_segment",
            p(&[
                ("start", "2026-01-01"),
                ("end", "2026-06-30"),
                ("segment", "messenger_active"),
            ]),
        ),
    ]
}

/// Runs the demo in `dir` (a fresh temporary directory if `None`).
///
/// # Errors
/// Any failure along the way, with its message.
pub async fn run(
    rows: usize,
    seed: u64,
    dir: Option<&Path>,
    sql: Option<&str>,
    source: DemoSource,
    two_keys: bool,
) -> Result<DemoReport, LabError> {
    let tmp;
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            tmp = tempfile::tempdir().map_err(|source| NodeError::Io {
                what: "making a temporary directory",
                source,
            })?;
            tmp.path().to_path_buf()
        }
    };
    let mut setup = Vec::new();
    let t = Instant::now();
    let mut fixture = Fixture::create(&dir, rows, seed, &["alice"])?;
    // Matching on e-mail or phone: a fifth of the platform's users get an
    // e-mail the bank does not have, so only their phone matches them.
    if two_keys {
        fixture.use_keys(0.2, seed)?;
    }
    // Kept running until the demo ends.
    let _postgres = match source {
        DemoSource::Csv => None,
        DemoSource::Parquet => {
            fixture.use_parquet()?;
            None
        }
        DemoSource::Postgres => {
            // The server's setup blocks (a synchronous client): off the runtime.
            let (f, pg) = tokio::task::spawn_blocking(move || -> Result<_, LabError> {
                let pg = crate::pg::TempPostgres::start()?;
                fixture.use_postgres(&pg)?;
                Ok((fixture, pg))
            })
            .await
            .map_err(|_| LabError::Postgres("the setup task failed".into()))??;
            fixture = f;
            Some(pg)
        }
    };
    let queries_to_run: Vec<(&str, Vec<(String, String)>)> = match sql {
        Some(q) => {
            fixture.add_sql_template("adhoc", q, "alice")?;
            vec![("adhoc", vec![])]
        }
        None => demo_queries(),
    };
    let what = match source {
        DemoSource::Csv => "certificates and synthetic data (CSV)",
        DemoSource::Parquet => "certificates and synthetic data (CSV, then Parquet)",
        DemoSource::Postgres => "certificates, synthetic data, a PostgreSQL server and its tables",
    };
    setup.push((what.to_string(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let bank = fixture.start_bank().await?;
    let bank_addr = bank.local_addr()?;
    let platform = fixture.start_platform(bank_addr).await?;
    let platform_addr = platform.local_addr()?;
    setup.push(("nodes started (data loaded)".to_string(), t.elapsed().as_secs_f64()));
    let analyst = Analyst::new(&fixture.analyst("alice", bank_addr, platform_addr)?)?;
    let mut queries = Vec::new();
    for (template, params) in queries_to_run {
        let t = Instant::now();
        let result = analyst
            .query(template, &params, new_query_id()?, Duration::from_secs(300))
            .await?;
        let plan = fixture.plan(template, &params)?;
        queries.push(DemoQuery {
            template: template.to_string(),
            truth: if two_keys {
                cleanroom_sim::oracle::truth_multi(&fixture.data, &plan, &[IdKind::Email, IdKind::Phone])
            } else {
                truth(&fixture.data, &plan)
            },
            params,
            result,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    platform.shutdown().await;
    bank.shutdown().await;
    Ok(DemoReport {
        bank_customers: rows,
        bank_transactions: fixture.data.bank.len(),
        platform_users: fixture.data.platform.len(),
        shared_customers: fixture.data.shared_customers,
        keys: if two_keys {
            vec!["email".into(), "phone".into()]
        } else {
            vec!["email".into()]
        },
        queries,
        setup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_edits_replace_or_name_what_is_missing() {
        let edits = [
            ("rho = \"1\"".to_string(), "rho = \"2\"".to_string()),
            ("[limits]\n".to_string(), "[limits]\nx = 1\n".to_string()),
        ];
        let path = Path::new("bank.toml");
        let text = "[limits]\nrho = \"1\"\n".to_string();
        assert_eq!(edited(text, &edits, path).unwrap(), "[limits]\nx = 1\nrho = \"2\"\n");
        let e = edited("[limits]\n".to_string(), &edits, path).unwrap_err();
        assert!(e.to_string().contains("rho = \\\"1\\\""), "{e}");
        assert!(e.to_string().contains("bank.toml"), "{e}");
    }
}
