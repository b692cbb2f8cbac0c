//! `cleanroom node --workers N` (issue 16): the platform node runs as its
//! own process and starts its `N` workers as child processes; a query is
//! answered through them; a worker killed (SIGKILL) is started again by the
//! node, and the next query is answered; a `--workers` count that is not
//! the config's is refused with the reason.
//!
//! `cargo test --locked -p cleanroom-cli --test supervised_workers`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cleanroom_client::{Analyst, new_query_id};
use cleanroom_lab::demo::Fixture;

mod common;
use common::{free_port, runtime};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // Its workers first: a SIGKILLed node leaves them running.
        for child in children(self.0.id()) {
            let _ = Command::new("kill").args(["-9", &child.to_string()]).status();
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pids of a process's children, whichever of its threads started
/// them (Linux).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Asks until answered (the workers split their input before they
/// listen; a killed worker is started again after a second).
async fn answered(analyst: &Analyst, within: Duration) -> f64 {
    let t = Instant::now();
    let qid = new_query_id().unwrap();
    loop {
        match analyst.query("overlap", &[], qid, Duration::from_secs(20)).await {
            Ok(r) => return r.cells[0].value,
            Err(e) => {
                assert!(t.elapsed() < within, "not answered within {within:?}: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

#[test]
fn the_node_starts_its_workers_and_starts_a_killed_one_again() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::create(dir.path(), 300, 93, &["alice"]).unwrap();
    f.edit_configs(&[("[limits]", "[shards]\ncount = 4\nkey = \"certs/shard.key\"\n\n[limits]")])
        .unwrap();
    let workers: Vec<std::net::SocketAddr> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    f.use_workers(&workers).unwrap();
    let bank_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let platform_addr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    f.write_process_configs(bank_addr, platform_addr).unwrap();
    let exe = env!("CARGO_BIN_EXE_cleanroom");
    let start = |args: &[&str], config: &std::path::Path| {
        Command::new(exe)
            .args(args)
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    // A count that is not the config's: refused, with the reason.
    let out = Command::new(exe)
        .args(["node", "--workers", "3", "--config"])
        .arg(&f.platform_config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lists 2 worker addresses"), "{err}");

    let _bank = Killed(start(&["node"], &f.bank_config));
    let platform = Killed(start(&["node", "--workers", "2"], &f.platform_config));
    let truth = cleanroom_sim::oracle::truth(&f.data, &f.plan("overlap", &[]).unwrap())[0];
    let cfg = f.analyst("alice", bank_addr, platform_addr).unwrap();
    rt.block_on(async {
        let analyst = Analyst::new(&cfg).unwrap();
        let first = answered(&analyst, Duration::from_secs(120)).await;
        // ρ = 0.1: within 6σ of the count (σ about 1.4 per node's noise).
        assert!((first - truth).abs() < 20.0, "{first} vs {truth}");
        let kids = children(platform.0.id());
        assert_eq!(kids.len(), 2, "the node's worker processes: {kids:?}");
        // SIGKILL one worker: the node starts it again.
        let victim = kids[0];
        assert!(
            Command::new("kill")
                .args(["-9", &victim.to_string()])
                .status()
                .unwrap()
                .success()
        );
        let t = Instant::now();
        loop {
            let now = children(platform.0.id());
            if now.len() == 2 && !now.contains(&victim) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the killed worker was not started again: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let again = answered(&analyst, Duration::from_secs(120)).await;
        assert!((again - truth).abs() < 20.0, "{again} vs {truth}");
    });
}
