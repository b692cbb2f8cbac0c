//! `cleanroom bench --node-processes`: each node runs as its own
//! `cleanroom node` process, so each node's peak RSS is its own (issue 16's
//! memory figures are of node processes). Checked here on a small sharded
//! run: both processes start, the join and the query run, both peak RSS
//! figures are read from the processes (not the bench's), and the bound is
//! measured over the nodes' identifiers.
//!
//! `cargo test --locked -p cleanroom-cli --test bench_processes`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn bench_runs_each_node_as_its_own_process() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args([
            "bench",
            "--rows",
            "1500",
            "--shards",
            "3",
            "--queries",
            "2",
            "--node-processes",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("nodes as processes: peak RSS bank"), "{stdout}");
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let r = &rows.as_array().unwrap()[0];
    assert_eq!(r["rows"], 1500);
    assert_eq!(r["shards"], 3);
    let rss = r["node_peak_rss_kib"].as_array().unwrap();
    for kib in rss {
        // A node process: more than the executable's few MiB, far less
        // than a GiB at this size.
        let kib = kib.as_u64().unwrap();
        assert!((4 * 1024..1024 * 1024).contains(&kib), "{kib} KiB");
    }
    assert!(r["join_seconds"].as_f64().unwrap() > 0.0);
    assert!(r["node_start_seconds"].as_f64().unwrap() > 0.0);
    // The nodes ran sharded: the bench checks each node's log says its
    // data was split into 3 shards, and fails otherwise.
    assert!(stdout.contains("all listening"), "{stdout}");
    assert!(r["bound_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(r["query_runs"].as_array().unwrap().len(), 2);
    // The nodes' CPU is read from their processes.
    assert!(r["join"]["cpu_seconds"].as_f64().unwrap() > 0.0);
    // Not counted with processes.
    assert_eq!(r["join"]["platform_to_bank_bytes"], 0);
}

/// `--workers 1,2`: one run with each node as a coordinator and one
/// `cleanroom worker` process, one with two, in the same bench; the
/// workers' CPU and peak RSS are counted with their node's, and the two
/// runs are compared.
#[test]
fn bench_runs_the_nodes_with_worker_processes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args([
            "bench",
            "--rows",
            "1200",
            "--shards",
            "4",
            "--node-processes",
            "--workers",
            "1,2",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (r, w) in rows.iter().zip([1u64, 2]) {
        assert_eq!(r["workers"], w);
        assert!(r["join_seconds"].as_f64().unwrap() > 0.0);
        assert!(r["join"]["cpu_seconds"].as_f64().unwrap() > 0.0);
        let rss = r["node_peak_rss_kib"].as_array().unwrap();
        // Each node's figure adds its workers' peaks to its coordinator's.
        for kib in rss {
            assert!(kib.as_u64().unwrap() > 8 * 1024, "{rss:?}");
        }
    }
    assert!(stdout.contains("2 workers per node against 1, in this run"), "{stdout}");
    // Refused without processes or shards.
    let out = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["bench", "--rows", "200", "--workers", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node-processes and --shards"));
}
