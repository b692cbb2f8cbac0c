//! One analyst runs 500 queries one after another, each in its own
//! `cleanroom query` process, against both nodes with the default limits
//! (64 connections per analyst, 16 queries in flight). Every process closes
//! its connections before it exits, so the nodes free them at once: all 500
//! are answered, and both nodes' ledgers hold exactly the same 500 query ids.
//!
//! Found by an outside test: the client used to exit without waiting for
//! its connections to close, each node kept the dead connections until its
//! idle timeout, and from the 166th query on the connection cap refused
//! queries, some already charged by the other node. (On the code before
//! the fix this test failed at query 329.) Last, a failing query names its
//! query id, to retry with.
//!
//! `cargo test --locked -p cleanroom-cli --test sequential -- --nocapture`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use cleanroom_lab::demo::Fixture;

mod common;
use common::runtime;

const QUERIES: usize = 500;

fn charged(state_db: &Path) -> BTreeSet<Vec<u8>> {
    let db = rusqlite::Connection::open(state_db).unwrap();
    let mut stmt = db.prepare("SELECT query_id FROM charges").unwrap();
    stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn five_hundred_query_processes_one_after_another_are_all_answered() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut fixture = Fixture::create(dir.path(), 300, 91, &["alice"]).unwrap();
    // Only the budget is raised (500 queries at ρ 0.1); the connection and
    // in-flight limits are the defaults.
    fixture
        .edit_configs(&[("rho_per_analyst = \"20\"", "rho_per_analyst = \"100\"")])
        .unwrap();
    let (bank, platform) = rt.block_on(async {
        let bank = fixture.start_bank().await.unwrap();
        let platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
        (bank, platform)
    });
    let config = dir.path().join("analyst-alice.toml");
    fixture
        .analyst("alice", bank.local_addr().unwrap(), platform.local_addr().unwrap())
        .unwrap();
    let t = Instant::now();
    let mut ids = BTreeSet::new();
    for k in 0..QUERIES {
        let out = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
            .args(["query", "--template", "overlap", "--format", "json", "--config"])
            .arg(&config)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "query {k} of {QUERIES} failed after {:.1} s: {}",
            t.elapsed().as_secs_f64(),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let id = result["query_id"].as_str().unwrap().to_string();
        assert!(ids.insert(id), "query {k}: a query id came back twice");
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{QUERIES} query processes one after another: all answered in {secs:.1} s ({:.0} ms each)",
        secs * 1000.0 / QUERIES as f64
    );
    // A failure names the query id to retry with.
    let out = Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(["query", "--template", "no_such_template", "--config"])
        .arg(&config)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let named = err
        .split_whitespace()
        .skip_while(|w| *w != "--query-id")
        .nth(1)
        .unwrap_or_else(|| panic!("the failure does not name its query id: {err}"));
    assert!(
        named.len() == 32 && named.chars().all(|c| c.is_ascii_hexdigit()),
        "{err}"
    );
    assert!(err.contains(&format!("query {named} failed")), "{err}");
    rt.block_on(async {
        platform.shutdown().await;
        bank.shutdown().await;
    });
    let state = dir.path().join("state");
    let bank_ids = charged(&state.join("bank").join("state.db"));
    let platform_ids = charged(&state.join("platform").join("state.db"));
    assert_eq!(bank_ids.len(), QUERIES);
    assert_eq!(bank_ids, platform_ids, "the two ledgers differ");
    let hex: BTreeSet<String> = bank_ids
        .iter()
        .map(|q| q.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    assert_eq!(hex, ids, "the ledgers do not hold the query ids the analyst got");
}
