//! `cleanroom demo`: a throwaway CA and certificates, synthetic data, both
//! nodes on 127.0.0.1 with ephemeral ports, and the three templates run by
//! an analyst, with the plaintext truth beside each result (demo only).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cleanroom_crypto::normalize::{IdKind, NormalizationRules};
use cleanroom_query::{Clip, parse_date};
use cleanroom_sim::synth::{SEGMENTS, SynthConfig, SynthData, generate};
use serde::Serialize;

use crate::NodeError;
use crate::client::{Analyst, QueryResult, new_query_id};
use crate::config::{AnalystConfig, NodeConfig};
use crate::server::Node;

/// The demo's clip bounds (per customer and category).
pub const CLIP: Clip = Clip {
    transactions: 5,
    spend_cents: 50_000,
};

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

/// The templates section shared by both nodes of the demo.
pub fn templates_toml(analyst: &str) -> String {
    format!(
        r#"
[[templates]]
name = "overlap"
kind = "overlap"
rho = "0.1"
min_count = 10
analysts = ["{analyst}"]
clip = {{ transactions = {t}, spend_cents = {s} }}
dates = ["2026-01-01", "2026-12-31"]

[[templates]]
name = "spend_by_category"
kind = "spend_by_category"
rho = "1"
min_count = 20
analysts = ["{analyst}"]
clip = {{ transactions = {t}, spend_cents = {s} }}
dates = ["2026-01-01", "2026-12-31"]

[[templates]]
name = "spend_by_category_for_segment"
kind = "spend_by_category_for_segment"
rho = "1"
min_count = 20
analysts = ["{analyst}"]
clip = {{ transactions = {t}, spend_cents = {s} }}
dates = ["2026-01-01", "2026-12-31"]
segments = ["messenger_active", "marketplace_buyer", "creator", "gamer", "casual"]
"#,
        t = CLIP.transactions,
        s = CLIP.spend_cents
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
) -> String {
    let peer = peer.map_or_else(String::new, |p| format!("address = \"{p}\"\n"));
    let schema = if role == "bank" {
        "id_column = \"email\"\nid_kind = \"email\"\ncategory_column = \"category\"\namount_column = \"amount\"\ndate_column = \"date\"\n"
    } else {
        "id_column = \"email\"\nid_kind = \"email\"\nsegment_column = \"segment\"\n"
    };
    format!(
        "role = \"{role}\"\nlisten = \"{listen}\"\nstate_dir = \"{state}\"\n\n[identity]\ncert = \"{certs}/{role}.pem\"\nkey = \"{certs}/{role}.key\"\nca = \"{certs}/ca.pem\"\n\n[peer]\n{peer}\n{collab}\n[data]\npath = \"{data}/{role}.csv\"\n{schema}max_bad_row_share = 0.01\nprogress = false\n\n[limits]\nmin_peer_set = 10\nmax_peer_set = 100000000\nrho_per_analyst = \"20\"\nperiod_days = 30\ncardinality_epsilon = \"0.5\"\ncardinality_delta_inverse = 1000000\ncardinality_epsilon_per_period = \"50\"\n{templates}",
        collab = collaboration_toml(categories),
        templates = templates_toml(analyst)
    )
}

/// An analyst config.
pub fn analyst_toml(name: &str, certs: &str, bank: &str, platform: &str) -> String {
    format!(
        "name = \"{name}\"\n\n[identity]\ncert = \"{certs}/analyst-{name}.pem\"\nkey = \"{certs}/analyst-{name}.key\"\nca = \"{certs}/ca.pem\"\n\n[[nodes]]\nrole = \"bank\"\naddress = \"{bank}\"\n\n[[nodes]]\nrole = \"platform\"\naddress = \"{platform}\"\n"
    )
}

/// The plaintext truth of a template on the synthetic data, with the same
/// normalisation, date range, segment filter and clipping as the nodes.
pub fn truth(data: &SynthData, template: &str, params: &[(String, String)]) -> Vec<f64> {
    let rules = NormalizationRules::v1("44");
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let segment = get("segment");
    let platform: HashSet<Vec<u8>> = data
        .platform
        .iter()
        .filter(|u| segment.is_none_or(|s| SEGMENTS.get(u.segment) == Some(&s)))
        .filter_map(|u| rules.normalize(IdKind::Email, &u.email).ok())
        .collect();
    let mut per_customer: HashMap<Vec<u8>, Vec<(usize, i64, i32)>> = HashMap::new();
    for t in &data.bank {
        if let Ok(id) = rules.normalize(IdKind::Email, &t.email) {
            per_customer
                .entry(id)
                .or_default()
                .push((t.category, t.amount_cents, t.day));
        }
    }
    if template == "overlap" {
        #[allow(clippy::cast_precision_loss)]
        return vec![per_customer.keys().filter(|k| platform.contains(*k)).count() as f64];
    }
    let start = get("start").and_then(|s| parse_date(s).ok()).unwrap_or(i32::MIN);
    let end = get("end").and_then(|s| parse_date(s).ok()).unwrap_or(i32::MAX);
    let c = data.categories.len() + 1; // + "other"
    let mut out = vec![0f64; 3 * c];
    for (id, txns) in &per_customer {
        if !platform.contains(id) {
            continue;
        }
        let mut count = vec![0u64; c];
        let mut sum = vec![0i64; c];
        for (cat, cents, day) in txns {
            if *day >= start && *day <= end {
                count[*cat] += 1;
                sum[*cat] += cents;
            }
        }
        #[allow(clippy::cast_precision_loss)]
        for k in 0..c {
            if count[k] > 0 {
                out[3 * k] += 1.0;
            }
            out[3 * k + 1] += count[k].min(CLIP.transactions) as f64;
            out[3 * k + 2] += sum[k].clamp(0, CLIP.spend_cents as i64) as f64;
        }
    }
    out
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
}

impl Fixture {
    /// Writes certificates (CA, both nodes, the given analysts), synthetic
    /// data with `rows` customers and users (half shared), and both configs.
    ///
    /// # Errors
    /// Any file or certificate error.
    pub fn create(dir: &Path, rows: usize, seed: u64, analysts: &[&str]) -> Result<Self, NodeError> {
        let names: Vec<String> = analysts.iter().map(|a| (*a).to_string()).collect();
        cleanroom_transport::pki::init(&dir.join("certs"), &names, 2)?;
        let data = generate(&SynthConfig {
            holder_customers: rows,
            matcher_users: rows,
            overlap: 0.5,
            categories: 16,
            seed,
        });
        crate::data::write_synthetic(&dir.join("data"), &data)?;
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
            ),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            data,
            bank_config,
            platform_config: dir.join("platform.toml"),
        })
    }

    /// Starts the bank from its config.
    ///
    /// # Errors
    /// As [`Node::start`].
    pub async fn start_bank(&self) -> Result<Node, NodeError> {
        Node::start(NodeConfig::load(&self.bank_config)?, &self.bank_config).await
    }

    /// Writes the platform's config pointing at `bank` and starts it.
    ///
    /// # Errors
    /// As [`Node::start`].
    pub async fn start_platform(&self, bank: std::net::SocketAddr) -> Result<Node, NodeError> {
        let analyst = "alice";
        write(
            &self.platform_config,
            &node_toml(
                "platform",
                "127.0.0.1:0",
                Some(&bank.to_string()),
                "certs",
                "data",
                "state/platform",
                &self.data.categories,
                analyst,
            ),
        )?;
        Node::start(NodeConfig::load(&self.platform_config)?, &self.platform_config).await
    }

    /// Writes `analyst-<name>.toml` for the two nodes and loads it.
    ///
    /// # Errors
    /// A file error.
    pub fn analyst(
        &self,
        name: &str,
        bank: std::net::SocketAddr,
        platform: std::net::SocketAddr,
    ) -> Result<AnalystConfig, NodeError> {
        let path = self.dir.join(format!("analyst-{name}.toml"));
        write(
            &path,
            &analyst_toml(name, "certs", &bank.to_string(), &platform.to_string()),
        )?;
        AnalystConfig::load(&path)
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
pub async fn run(rows: usize, seed: u64, dir: Option<&Path>) -> Result<DemoReport, NodeError> {
    let tmp;
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| NodeError::State(e.to_string()))?;
            tmp.path().to_path_buf()
        }
    };
    let mut setup = Vec::new();
    let t = Instant::now();
    let fixture = Fixture::create(&dir, rows, seed, &["alice"])?;
    setup.push(("certificates and synthetic data".to_string(), t.elapsed().as_secs_f64()));
    let t = Instant::now();
    let bank = fixture.start_bank().await?;
    let bank_addr = bank.local_addr()?;
    let platform = fixture.start_platform(bank_addr).await?;
    let platform_addr = platform.local_addr()?;
    setup.push(("nodes started (data loaded)".to_string(), t.elapsed().as_secs_f64()));
    let analyst = Analyst::new(&fixture.analyst("alice", bank_addr, platform_addr)?)?;
    let mut queries = Vec::new();
    for (template, params) in demo_queries() {
        let t = Instant::now();
        let result = analyst
            .query(template, &params, new_query_id()?, Duration::from_secs(300))
            .await?;
        queries.push(DemoQuery {
            template: template.to_string(),
            truth: truth(&fixture.data, template, &params),
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
        queries,
        setup,
    })
}
