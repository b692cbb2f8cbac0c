//! Crash safety of the nodes' state, with real processes: both nodes run as
//! `cleanroom node` child processes; 300 charged queries from 20 analysts run
//! at once while the test SIGKILLs the bank, the platform or both at random
//! moments and restarts them. Every query is retried under its own id until
//! it is answered. Then the ledgers and audit logs are checked against what
//! the analysts saw: every answered query charged exactly once on each node,
//! no charge without its query, the shares in the ledgers reconstruct
//! exactly the results the analysts got, each released share has its audit
//! entry, and both audit hash chains verify. The same again, smaller, with
//! both nodes split into 4 shards (issue 16: each query runs 4 shard joins
//! and a batch per shard, so a kill can land between them). The same again
//! with the platform as a coordinator and two `cleanroom worker` processes
//! (issue 16): kills land on the workers too, in the middle of their
//! shards' joins and batches. Last, a
//! corrupted state file and a tampered audit log each stop the node from
//! starting, with a clear message.
//!
//! `cargo test --locked -p cleanroom-cli --test crash -- --nocapture` prints
//! the figures (kills, failed attempts, reruns, wall time).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cleanroom_client::{Analyst, new_query_id, reconstruct};
use cleanroom_lab::demo::{Fixture, node_toml};
use cleanroom_node::config::NodeConfig;
use cleanroom_node::state::State;
use cleanroom_wire::{AnalystResponse, Message, QueryShare};

mod common;
use common::free_port;

/// How big a storm: analysts, query ids each, kills; and the shards both
/// nodes split into (1: none).
#[derive(Clone, Copy)]
struct Storm {
    analysts: usize,
    queries_each: usize,
    kills: usize,
    shards: u32,
    /// The platform's worker processes (0: none).
    workers: u32,
    /// The bank has as many worker processes as the platform.
    bank_workers: bool,
}
/// ρ of the `overlap` template in the demo configs, millionths.
const RHO_MICRO: i64 = 100_000;

struct Proc {
    /// The `cleanroom` subcommand and its arguments but `--config`.
    args: Vec<String>,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// The largest peak RSS (VmHWM, KiB) of its processes so far.
    peak_kib: u64,
}

impl Proc {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(&self.args)
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush or close anything. The process's peak
    /// RSS is read first.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let status = std::fs::read_to_string(format!("/proc/{}/status", c.id())).unwrap_or_default();
            let hwm = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
                .unwrap_or(0);
            self.peak_kib = self.peak_kib.max(hwm);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// splitmix64: the kill schedule's randomness (its seed is printed).
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn set_listen(config: &Path, addr: SocketAddr, allow: &dyn Fn(String) -> String) {
    let text = std::fs::read_to_string(config).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("listen = ") {
            out.push_str(&format!("listen = \"{addr}\"\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(config, allow(out)).unwrap();
}

/// One analyst's view of one query: the cell values it was given.
type Seen = Vec<f64>;

fn values(r: &cleanroom_client::QueryResult) -> Seen {
    r.cells.iter().map(|c| c.value).collect()
}

fn stored_share(bytes: &[u8]) -> QueryShare {
    match Message::decode(bytes) {
        Ok(Message::AnalystResponse(AnalystResponse::Share(s))) => *s,
        other => panic!("a stored share does not decode: {other:?}"),
    }
}

/// A ledger row: analyst, rho (millionths), stored share.
type Charged = (String, i64, Option<Vec<u8>>);

struct Ledger {
    /// query id -> its charge
    charges: BTreeMap<Vec<u8>, Charged>,
    /// (event, result digest) of each audit entry
    audit: Vec<(String, Vec<u8>)>,
}

fn read_ledger(state: &Path) -> Ledger {
    let db = rusqlite::Connection::open(state.join("state.db")).unwrap();
    let mut stmt = db
        .prepare("SELECT query_id, analyst, rho_micro, share FROM charges")
        .unwrap();
    let charges = stmt
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut stmt = db
        .prepare("SELECT event, result_digest FROM audit ORDER BY seq")
        .unwrap();
    let audit = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    Ledger { charges, audit }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_hundreds_of_charged_queries_loses_and_doubles_nothing() {
    storm(Storm {
        analysts: 20,
        queries_each: 15,
        kills: 10,
        shards: 1,
        workers: 0,
        bank_workers: false,
    })
    .await;
}

/// The same with both nodes split into 4 shards: a kill can land between
/// or inside the shard joins of a query, or between its batches; every
/// query is still answered once, charged once, from all its shards (the
/// ledgers' shares reconstruct what the analysts saw), and the bank's
/// cardinality charges match its audit log (checked when its state opens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_sharded_queries_loses_and_doubles_nothing() {
    storm(Storm {
        analysts: 5,
        queries_each: 8,
        kills: 6,
        shards: 4,
        workers: 0,
        bank_workers: false,
    })
    .await;
}

/// The platform as a coordinator and two worker processes (4 shards, two
/// per worker): SIGKILLs of the bank, the coordinator and each worker at
/// random moments, so a worker dies in the middle of its shards' joins or
/// batches. The coordinator notices (its connection to the worker ends
/// within seconds), the attempt fails with a message naming the worker,
/// the analyst retries under the same id once the worker is back, and the
/// ledger and audit checks hold as above: answered once, charged once, the
/// stored shares reconstruct what the analysts saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_platform_workers_loses_and_doubles_nothing() {
    storm(Storm {
        analysts: 5,
        queries_each: 8,
        kills: 8,
        shards: 4,
        workers: 2,
        bank_workers: false,
    })
    .await;
}

/// Both nodes as a coordinator and two worker processes each (bank worker
/// `w` serving platform worker `w`, asking its coordinator to charge each
/// set of shard joins and to claim each batch): SIGKILLs of any of the six
/// processes; the same checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_both_nodes_workers_loses_and_doubles_nothing() {
    storm(Storm {
        analysts: 5,
        queries_each: 8,
        kills: 10,
        shards: 4,
        workers: 2,
        bank_workers: true,
    })
    .await;
}

/// Runs one storm (the tests above) and checks everything after it; prints
/// its figures (with `--nocapture`).
#[allow(clippy::print_stdout)]
async fn storm(storm: Storm) {
    let Storm {
        analysts: n_analysts,
        queries_each,
        kills: n_kills,
        shards,
        workers: n_workers,
        bank_workers: with_bank_workers,
    } = storm;
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("kill schedule seed {seed} (CRASH_SEED={seed} repeats it)");
    let mut rng = seed;

    let mut names: Vec<String> = vec!["alice".to_string()];
    names.extend((1..n_analysts).map(|i| format!("analyst{i:02}")));
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::create(dir.path(), 400, 67, &refs).unwrap();
    let list = names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
    let split = if shards > 1 {
        format!("[shards]\ncount = {shards}\nkey = \"certs/shard.key\"\n\n[limits]")
    } else {
        "[limits]".to_string()
    };
    let allow = move |text: String| {
        text.replace("analysts = [\"alice\"]", &format!("analysts = [{list}]"))
            .replace("[limits]", &split)
    };
    let bank_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let platform_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    // The bank's config as the fixture wrote and signed it; the platform's
    // written here and signed by its operator's key. Listen addresses and
    // analyst lists are not part of the signed template digests.
    set_listen(&fixture.bank_config, bank_addr, &allow);
    std::fs::write(
        &fixture.platform_config,
        node_toml(
            "platform",
            &platform_addr.to_string(),
            Some(&bank_addr.to_string()),
            "certs",
            "data",
            "state/platform",
            &fixture.data.categories,
            "alice",
            fixture.max_customers,
        ),
    )
    .unwrap();
    cleanroom_node::policy::sign(
        &NodeConfig::load(&fixture.platform_config).unwrap(),
        &fixture.platform_config,
    )
    .unwrap();
    set_listen(&fixture.platform_config, platform_addr, &allow);
    if n_workers > 0 {
        cleanroom_transport::pki::issue_workers(&dir.path().join("certs"), n_workers, 2).unwrap();
        let list: Vec<String> = (0..n_workers)
            .map(|_| format!("\"127.0.0.1:{}\"", free_port()))
            .collect();
        let text = std::fs::read_to_string(&fixture.platform_config).unwrap();
        let mut text = text.replace(
            "[limits]",
            &format!("[workers]\naddresses = [{}]\n\n[limits]", list.join(", ")),
        );
        if with_bank_workers {
            let list: Vec<String> = (0..n_workers)
                .map(|_| format!("\"127.0.0.1:{}\"", free_port()))
                .collect();
            let list = list.join(", ");
            text = text.replace("[peer]\n", &format!("[peer]\nworkers = [{list}]\n"));
            let bank = std::fs::read_to_string(&fixture.bank_config).unwrap();
            let bank = bank.replace("[limits]", &format!("[workers]\naddresses = [{list}]\n\n[limits]"));
            std::fs::write(&fixture.bank_config, bank).unwrap();
        }
        std::fs::write(&fixture.platform_config, text).unwrap();
    }
    let mut bank_workers: Vec<Proc> = (0..if with_bank_workers { n_workers } else { 0 })
        .map(|w| Proc {
            args: vec!["worker".into(), "--index".into(), w.to_string()],
            config: fixture.bank_config.clone(),
            log: dir.path().join(format!("bank-worker-{w}.log")),
            child: None,
            peak_kib: 0,
        })
        .collect();
    for w in &mut bank_workers {
        w.start();
    }
    let mut workers: Vec<Proc> = (0..n_workers)
        .map(|w| Proc {
            args: vec!["worker".into(), "--index".into(), w.to_string()],
            config: fixture.platform_config.clone(),
            log: dir.path().join(format!("worker-{w}.log")),
            child: None,
            peak_kib: 0,
        })
        .collect();
    for w in &mut workers {
        w.start();
    }

    let mut bank = Proc {
        args: vec!["node".into()],
        config: fixture.bank_config.clone(),
        log: dir.path().join("bank.log"),
        child: None,
        peak_kib: 0,
    };
    let mut platform = Proc {
        args: vec!["node".into()],
        config: fixture.platform_config.clone(),
        log: dir.path().join("platform.log"),
        child: None,
        peak_kib: 0,
    };
    bank.start();
    platform.start();
    let analysts: Vec<Arc<Analyst>> = names
        .iter()
        .map(|n| Arc::new(Analyst::new(&fixture.analyst(n, bank_addr, platform_addr).unwrap()).unwrap()))
        .collect();
    // Up: both nodes answer an analyst.
    let up = Instant::now();
    while analysts[0].budget().await.is_err() {
        assert!(up.elapsed() < Duration::from_secs(60), "the nodes did not come up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 300 query ids, all in flight at once, each retried under its own id
    // until it is answered.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (a, analyst) in analysts.iter().enumerate() {
        for _ in 0..queries_each {
            let analyst = analyst.clone();
            let qid = new_query_id().unwrap();
            tasks.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(400);
                loop {
                    match analyst.query("overlap", &[], qid, Duration::from_secs(20)).await {
                        Ok(r) => return (a, qid, values(&r), failures),
                        Err(e) => {
                            assert!(
                                Instant::now() < deadline,
                                "query never answered; failures: {failures:?}; last: {e}"
                            );
                            failures.push(e.to_string());
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                    }
                }
            }));
        }
    }

    // Meanwhile: SIGKILL the bank, the platform or both at random moments,
    // and restart them.
    let mut kills = Vec::new();
    for _ in 0..n_kills {
        tokio::time::sleep(Duration::from_millis(300 + next(&mut rng) % 2200)).await;
        let victim = match next(&mut rng) % 5 {
            // With workers, half the kills are of a worker.
            _ if n_workers > 0 && next(&mut rng).is_multiple_of(2) => {
                let w = (next(&mut rng) % u64::from(n_workers)) as usize;
                if !bank_workers.is_empty() && next(&mut rng).is_multiple_of(2) {
                    bank_workers[w].kill();
                    format!("bank worker {w}")
                } else {
                    workers[w].kill();
                    format!("worker {w}")
                }
            }
            0 | 1 => {
                bank.kill();
                "bank".to_string()
            }
            2 | 3 => {
                platform.kill();
                "platform".to_string()
            }
            _ => {
                bank.kill();
                platform.kill();
                "both".to_string()
            }
        };
        kills.push((started.elapsed().as_secs_f64(), victim));
        tokio::time::sleep(Duration::from_millis(100 + next(&mut rng) % 400)).await;
        if bank.child.is_none() {
            bank.start();
        }
        if platform.child.is_none() {
            platform.start();
        }
        for w in workers.iter_mut().chain(bank_workers.iter_mut()) {
            if w.child.is_none() {
                w.start();
            }
        }
    }

    let mut seen: BTreeMap<cleanroom_wire::QueryId, (usize, Seen)> = BTreeMap::new();
    let mut failed_attempts = 0;
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut answered_during_kills = 0;
    let kills_ended = started.elapsed();
    for t in tasks {
        let (a, qid, v, failures) = t.await.unwrap();
        failed_attempts += failures.len();
        for f in &failures {
            // The failure's kind: its words, without addresses and numbers.
            let kind: String = f
                .split_whitespace()
                .filter(|w| !w.chars().any(|c| c.is_ascii_digit()))
                .take(14)
                .collect::<Vec<_>>()
                .join(" ");
            *kinds.entry(kind).or_default() += 1;
        }
        seen.insert(qid, (a, v));
        answered_during_kills += usize::from(failures.is_empty());
    }
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(seen.len(), n_analysts * queries_each);

    // Asked again, every query id returns exactly what its analyst saw
    // (the stored shares), and nothing more is charged.
    for (qid, (a, v)) in &seen {
        // A node restarted last may not have heard from its peer yet (the
        // bank learns the platform's templates when the platform
        // reconnects, within its idle timeout): retried as the analysts do.
        let asked = Instant::now();
        let again = loop {
            match analysts[*a].query("overlap", &[], *qid, Duration::from_secs(30)).await {
                Ok(r) => break r,
                Err(e) if asked.elapsed() < Duration::from_secs(90) => {
                    println!("asked again: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("a retried query id was not answered: {e}"),
            }
        };
        assert!(again.replayed);
        assert_eq!(&values(&again), v, "a retried query id gave another answer");
    }
    bank.kill();
    platform.kill();
    for w in workers.iter_mut().chain(bank_workers.iter_mut()) {
        w.kill();
    }
    // Memory stays bounded through the storm (400 customers and users).
    for (role, p) in [("bank", &bank), ("platform", &platform)]
        .into_iter()
        .chain(workers.iter().map(|w| ("platform worker", w)))
        .chain(bank_workers.iter().map(|w| ("bank worker", w)))
    {
        println!("{role}: peak RSS of its processes {} MiB", p.peak_kib / 1024);
        assert!(p.peak_kib < 512 * 1024, "{role} used {} KiB", p.peak_kib);
    }

    let state = |role: &str| dir.path().join("state").join(role);
    let mut report = Vec::new();
    let mut shares: BTreeMap<Vec<u8>, Vec<QueryShare>> = BTreeMap::new();
    for role in ["bank", "platform"] {
        // Opening checks the file's integrity and the audit hash chain.
        let st = State::open(&state(role)).unwrap_or_else(|e| panic!("{role}: {e}"));
        let entries = st.verify_audit().unwrap();
        let ledger = read_ledger(&state(role));
        drop(st);
        let charged: BTreeSet<Vec<u8>> = ledger.charges.keys().cloned().collect();
        let asked: BTreeSet<Vec<u8>> = seen.keys().map(|q| q.0.to_vec()).collect();
        // No charge lost, none without its query (and a query id is a
        // primary key: one charge at most).
        assert_eq!(
            charged, asked,
            "{role}: charged query ids differ from the analysts' query ids"
        );
        for (a, name) in names.iter().enumerate() {
            let spent: i64 = ledger
                .charges
                .values()
                .filter(|(who, _, _)| who == name)
                .map(|(_, rho, _)| rho)
                .sum();
            let queries = seen.values().filter(|(x, _)| *x == a).count() as i64;
            assert_eq!(spent, queries * RHO_MICRO, "{role}: {name} charged {spent}");
        }
        let digests: BTreeSet<Vec<u8>> = ledger.audit.iter().map(|(_, d)| d.clone()).collect();
        for (qid, (_, _, share)) in &ledger.charges {
            let share = share
                .as_ref()
                .unwrap_or_else(|| panic!("{role}: an answered query has no stored share"));
            // The stored share was written with its audit entry.
            let d = ring::digest::digest(&ring::digest::SHA256, share);
            assert!(
                digests.contains(d.as_ref()),
                "{role}: a stored share has no audit entry"
            );
            shares.entry(qid.clone()).or_default().push(stored_share(share));
        }
        let first_runs = ledger.audit.iter().filter(|(e, _)| e == "query").count();
        let reruns = ledger.audit.iter().filter(|(e, _)| e == "query-rerun").count();
        assert_eq!(first_runs, seen.len(), "{role}: one first-run audit entry per query");
        report.push(format!("{role}: {entries} audit entries ({reruns} reruns)"));
    }
    // The ledgers hold exactly what the analysts saw: both stored shares of
    // each query reconstruct its answer.
    for (qid, (_, v)) in &seen {
        let pair = shares.get(qid.0.as_slice()).unwrap();
        let r = reconstruct("overlap", *qid, pair).unwrap();
        assert_eq!(&values(&r), v, "the ledgers' shares do not give what the analyst saw");
    }
    println!(
        "{} queries from {n_analysts} analysts, {} kills ({}), all answered: {} without a failed attempt, {failed_attempts} failed attempts retried; kills over the first {:.1} s, wall {wall:.1} s; {}",
        seen.len(),
        kills.len(),
        kills
            .iter()
            .map(|(t, v)| format!("{v} at {t:.1} s"))
            .collect::<Vec<_>>()
            .join(", "),
        answered_during_kills,
        kills_ended.as_secs_f64(),
        report.join("; ")
    );

    let mut kinds: Vec<(usize, String)> = kinds.into_iter().map(|(k, n)| (n, k)).collect();
    kinds.sort_by(|a, b| b.cmp(a));
    for (n, k) in kinds.iter().take(8) {
        println!("  {n:6} x {k}");
    }

    // A corrupted state file: the node refuses to start, and says why.
    let refused = |what: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(["node", "--config"])
            .arg(&fixture.bank_config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{what}: the node started");
        err
    };
    // An audit entry edited behind the append-only triggers' back.
    {
        let db = rusqlite::Connection::open(state("bank").join("state.db")).unwrap();
        db.execute_batch("DROP TRIGGER audit_append_only_update; UPDATE audit SET analyst = 'mallory' WHERE seq = 3;")
            .unwrap();
    }
    let err = refused("tampered audit log");
    assert!(err.contains("hash chain breaks at entry 3"), "{err}");
    // Bytes overwritten in the file's header.
    let path = state("bank").join("state.db");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().take(100) {
        *b = 0x42;
    }
    std::fs::write(&path, bytes).unwrap();
    let err = refused("corrupted header");
    assert!(
        err.contains("state.db")
            && (err.contains("is not a usable state database") || err.contains("failed its integrity check")),
        "{err}"
    );
}
