//! The `cleanroom simulate` command as a user runs it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn cleanroom(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cleanroom"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn simulate_json_is_exact() {
    let out = cleanroom(&[
        "simulate",
        "--holder-rows",
        "3000",
        "--matcher-rows",
        "2000",
        "--overlap",
        "0.3",
        "--seed",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["holder_rows"], 3000);
    assert_eq!(v["matcher_rows"], 2000);
    assert_eq!(v["intersection"], 900);
    assert_eq!(v["exact"], true);
    let seen = v["matched_rows_seen_by_matcher"].as_u64().unwrap();
    let d_max = v["dummy_rows"].as_u64().unwrap();
    assert!((900..=900 + d_max).contains(&seen));
    assert!(v["phases"]["join"].as_f64().unwrap() > 0.0);
    assert!(v["bytes"]["holder_to_matcher"].as_u64().unwrap() > 32 * 3000);
    assert!(v["bytes"]["matcher_to_holder"].as_u64().unwrap() > 32 * 2000);
    // 1 customers cell, 16 spend cells, 16 customer-count cells.
    assert_eq!(v["cells"].as_array().unwrap().len(), 33);
}

#[test]
fn simulate_table_and_bad_arguments() {
    let out = cleanroom(&[
        "simulate",
        "--holder-rows",
        "200",
        "--matcher-rows",
        "300",
        "--categories",
        "3",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("exact: true"), "{text}");
    let out = cleanroom(&["simulate", "--overlap", "1.5"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overlap must be between 0 and 1"));
}
