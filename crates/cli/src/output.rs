//! Human-readable and CSV output.

use cleanroom_client::QueryResult;
use cleanroom_lab::demo::DemoReport;
use cleanroom_sim::simulate::SimulateReport;
use cleanroom_wire::{BudgetInfo, TemplateInfo};

pub fn simulate(r: &SimulateReport) {
    out!(
        "holder: {} customers ({} transactions)   matcher: {} users   categories: {}",
        r.holder_rows,
        r.holder_transactions,
        r.matcher_rows,
        r.categories
    );
    if r.keys.len() > 1 {
        out!(
            "keys: {} (a customer matches when any of them does; {} keys shared by several customers dropped)",
            r.keys.join(", "),
            r.shared_keys_dropped
        );
    }
    out!(
        "intersection (plaintext): {}   matched rows seen by the matcher: {} (intersection + D, D at most {})",
        r.intersection,
        r.matched_rows_seen_by_matcher,
        r.dummy_rows
    );
    if r.shards.len() > 1 {
        out!("");
        out!(
            "{:>5}  {:>10}  {:>10}  {:>12}  {:>22}",
            "shard",
            "holder",
            "matcher",
            "intersection",
            "seen by the matcher"
        );
        for (i, s) in r.shards.iter().enumerate() {
            out!(
                "{i:>5}  {:>10}  {:>10}  {:>12}  {:>22}",
                s.holder_rows,
                s.matcher_rows,
                s.intersection,
                s.matched_rows_seen_by_matcher
            );
        }
    }
    out!("");
    let name_w = r.cells.iter().map(|c| c.name.len()).max().unwrap_or(4).max(4);
    out!("{:<name_w$}  {:>16}  {:>16}  ok", "cell", "protocol", "plaintext");
    for c in &r.cells {
        let ok = if c.protocol == c.plaintext { "=" } else { "DIFFERS" };
        out!("{:<name_w$}  {:>16}  {:>16}  {ok}", c.name, c.protocol, c.plaintext);
    }
    out!("");
    out!("phase                         seconds");
    for (name, secs) in &r.phases {
        out!("{name:<28}  {secs:>8.3}");
    }
    out!("");
    out!(
        "bytes holder->matcher: {}   matcher->holder: {}   (frames: {} / {})",
        r.bytes.holder_to_matcher,
        r.bytes.matcher_to_holder,
        r.messages.holder_to_matcher,
        r.messages.matcher_to_holder
    );
    out!("exact: {}", r.exact);
}

/// Money cells (cents) and ratios of money are shown in currency units.
fn fmt_value(unit: &str, v: f64) -> String {
    match unit {
        "cents" | "ratio" => format!("{:.2}", v / 100.0),
        _ => format!("{v:.0}"),
    }
}

fn display_name(name: &str) -> String {
    name.replace("spend_cents", "spend")
}

/// Prints a result; with `truth`, a column of plaintext values beside it.
pub fn result_table(r: &QueryResult, truth: Option<&[f64]>) {
    let name_w = r
        .cells
        .iter()
        .map(|c| display_name(&c.name).len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut header = format!(
        "{:<name_w$}  {:>14}  {:>12}  {:>31}",
        "cell", "value", "noise sd", "95% interval"
    );
    if truth.is_some() {
        header.push_str(&format!("  {:>14}", "truth (demo)"));
    }
    out!("{header}");
    for (i, c) in r.cells.iter().enumerate() {
        let t = truth
            .and_then(|t| t.get(i))
            .map(|t| format!("  {:>14}", fmt_value(&c.unit, *t)))
            .unwrap_or_default();
        match &c.suppressed {
            Some(why) => out!(
                "{:<name_w$}  {:>14}  {:>12}  {:>31}{t}",
                display_name(&c.name),
                "suppressed",
                "",
                why
            ),
            None => {
                let scale = if c.unit == "count" { 1.0 } else { 100.0 };
                out!(
                    "{:<name_w$}  {:>14}  {:>12}  {:>31}{t}",
                    display_name(&c.name),
                    fmt_value(&c.unit, c.value),
                    format!("{:.2}", c.sigma / scale),
                    format!("[{}, {}]", fmt_value(&c.unit, c.low), fmt_value(&c.unit, c.high)),
                );
            }
        }
    }
    out!(
        "query id {}  rho charged: {}  minimum count {}{}",
        r.query_id,
        r.rho
            .iter()
            .map(|(n, r)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join(", "),
        r.min_count,
        if r.replayed {
            "  (stored result of a retried query id)"
        } else {
            ""
        }
    );
}

pub fn result_csv(r: &QueryResult) {
    out!("cell,unit,value,noise_sd,low95,high95,suppressed");
    for c in &r.cells {
        out!(
            "{},{},{},{},{},{},{}",
            c.name,
            c.unit,
            c.value,
            c.sigma,
            c.low,
            c.high,
            c.suppressed.as_deref().map(|s| format!("\"{s}\"")).unwrap_or_default()
        );
    }
}

pub fn templates(list: &[(TemplateInfo, TemplateInfo)]) {
    if list.is_empty() {
        out!("no template is offered to this analyst by both nodes");
    }
    for (bank, platform) in list {
        out!("{}  ({})", bank.name, bank.kind);
        out!(
            "  rho per run: bank {}, platform {}   minimum count: {}",
            bank.rho,
            platform.rho,
            bank.min_count.max(platform.min_count)
        );
        if bank.params.is_empty() {
            out!("  no parameters");
        }
        for (name, allowed) in &bank.params {
            out!("  --param {name}=...   {allowed}");
        }
    }
}

pub fn budget(list: &[BudgetInfo]) {
    for b in list {
        out!(
            "{} node: analyst {} has spent rho {} of {} this {}-day period (ends {})",
            b.node,
            b.analyst,
            cleanroom_query::format_micro(b.rho_spent_micro),
            cleanroom_query::format_micro(b.rho_limit_micro),
            b.period_days,
            cleanroom_query::format_date(i32::try_from(b.period_ends_day).unwrap_or(i32::MAX))
        );
    }
}

pub fn demo(r: &DemoReport) {
    out!(
        "synthetic data: bank {} customers ({} transactions), platform {} users, {} shared",
        r.bank_customers,
        r.bank_transactions,
        r.platform_users,
        r.shared_customers
    );
    if r.keys.len() > 1 {
        out!(
            "matching on {} (a customer matched when any key matches; the truth column is the multi-key plaintext)",
            r.keys.join(" or ")
        );
    }
    for (step, secs) in &r.setup {
        out!("  {step}: {secs:.2} s");
    }
    for q in &r.queries {
        out!("");
        let params: Vec<String> = q.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out!("== {} {}  ({:.2} s)", q.template, params.join(" "), q.seconds);
        result_table(&q.result, Some(&q.truth));
        let phases: Vec<String> = q
            .result
            .timings
            .iter()
            .map(|(n, p, s)| format!("{n} {p} {s:.3} s"))
            .collect();
        out!("phases: {}", phases.join(", "));
    }
}

pub fn bench(rows: &[cleanroom_lab::bench::BenchRow]) {
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    if let Some(k) = rows.iter().map(|r| r.key_slots).find(|k| *k > 1) {
        out!(
            "keys: e-mail or phone, {k} key slots per bank row (the bound counts {k} points per customer and per dummy row)"
        );
    }
    out!(
        "{:>9}  {:>3}  {:>9}  {:>9}  {:>5}  {:>9}  {:>9}  {:>8}  {:>8}  {:>9}  {:>9}  {:>9}  {:>11}  {:>11}  {:>10}",
        "rows",
        "run",
        "join s",
        "bound s",
        "ratio",
        "ref. s",
        "bound/ref",
        "query s",
        "cells",
        "row bytes",
        "join cpu",
        "query cpu",
        "bank heap",
        "plat. heap",
        "RSS MiB"
    );
    for r in rows {
        out!(
            "{:>9}  {:>3}  {:>9.3}  {:>9.3}  {:>5.2}  {:>9.3}  {:>9.2}  {:>8.3}  {:>8}  {:>4}/{:>4}  {:>8.1}s  {:>8.1}s  {:>7.0} MiB  {:>7.0} MiB  {:>10}",
            r.rows,
            r.run,
            r.join_seconds,
            r.bound_seconds,
            r.ratio,
            r.reference_seconds,
            r.bound_over_reference,
            r.query_seconds,
            r.query_cells,
            r.query_row_bytes,
            8 * r.query_cells,
            r.join.cpu_seconds,
            r.query.cpu_seconds,
            mib(r.peak_heap_bank_bytes),
            mib(r.peak_heap_platform_bytes),
            r.peak_rss_kib / 1024
        );
    }
    for r in rows {
        if let Some((bank, platform)) = r.node_peak_rss_kib {
            let workers = if r.workers > 0 {
                format!(
                    " with {} worker process(es) per node (a node's RSS: its coordinator's and its workers' peaks added)",
                    r.workers
                )
            } else {
                String::new()
            };
            out!(
                "{} rows, run {}{workers}: nodes as processes: peak RSS bank {} MiB, platform {} MiB (VmHWM of each process); all listening {:.1} s after their start (loading, and splitting into shard files when sharded); join {:.3} s, query {:.3} s, CPU join {:.1} s, query {:.1} s; heap, bytes and exchanges not counted",
                r.rows,
                r.run,
                bank / 1024,
                platform / 1024,
                r.node_start_seconds.unwrap_or(0.0),
                r.join_seconds,
                r.query_seconds,
                r.join.cpu_seconds,
                r.query.cpu_seconds
            );
        }
    }
    let with_workers: Vec<&cleanroom_lab::bench::BenchRow> = rows.iter().filter(|r| r.workers > 0).collect();
    if let (Some(one), Some(most)) = (
        with_workers.iter().find(|r| r.workers == 1),
        with_workers.iter().max_by_key(|r| r.workers),
    ) && most.workers > 1
        && one.rows == most.rows
    {
        out!(
            "{} rows: {} workers per node against 1, in this run: join {:.2}x, query {:.2}x, CPU join {:.2}x (above 1: slower or costlier)",
            one.rows,
            most.workers,
            most.join_seconds / one.join_seconds.max(1e-9),
            most.query_seconds / one.query_seconds.max(1e-9),
            most.join.cpu_seconds / one.join.cpu_seconds.max(1e-9)
        );
    }
    if let Some(s) = rows.iter().map(|r| r.shards).find(|s| *s > 1) {
        out!(
            "shards = {s}: each join ran as {s} shard joins, one after the other in one process per node, or, with workers, each worker's shards one after the other and the workers at once (the bound counts {s} x D_max dummy rows)"
        );
    }
    out!(
        "bound = curve operations of the join timed in this run (hash-to-group + mul per own id, decompress + mul per peer point, batched compression, all cores); ratio = join / bound"
    );
    out!(
        "ref. = the same curve work one point at a time through curve25519-dalek's single-point API, all cores, in this run; bound/ref = bound / ref."
    );
    if let Some(r) = rows.first() {
        out!("the join's curve work (bound and join): {}", r.curve_engine);
        out!(
            "curve25519-dalek's backend for variable-base scalar multiplication, chosen at run time (as cleanroom_crypto::point::CurveBackend reads it): {}",
            r.curve_backend
        );
    }
    for r in rows.iter().filter(|r| r.query_runs.len() > 1) {
        let runs: Vec<String> = r.query_runs.iter().map(|s| format!("{s:.3}")).collect();
        out!(
            "{} rows, run {}: query s = median of {} runs: {}",
            r.rows,
            r.run,
            r.query_runs.len(),
            runs.join(", ")
        );
    }
    out!(
        "cells = output cells of the spend_by_category query; row bytes = one row's masked cells as the bank sends them, packed at the cells' share widths / at 64 bits a cell"
    );
    out!(
        "cpu = CPU time of both nodes, all threads (the bench's process, or the two node processes); heap = peak live heap of each node's threads (in one process)"
    );
    out!("");
    out!(
        "{:>9}  {:>3}  {:>6}  {:>14}  {:>14}  {:>11}  {:>14}  {:>14}  {:>11}",
        "rows",
        "run",
        "",
        "join P->B",
        "join B->P",
        "round trips",
        "query P->B",
        "query B->P",
        "round trips"
    );
    for r in rows {
        out!(
            "{:>9}  {:>3}  {:>6}  {:>14}  {:>14}  {:>11}  {:>14}  {:>14}  {:>11}",
            r.rows,
            r.run,
            "bytes",
            r.join.platform_to_bank_bytes,
            r.join.bank_to_platform_bytes,
            r.join.round_trips,
            r.query.platform_to_bank_bytes,
            r.query.bank_to_platform_bytes,
            r.query.round_trips
        );
    }
    out!(
        "bytes = UDP payload (QUIC packets, encrypted); round trips = request/response exchanges the platform started"
    );
    for r in rows {
        if let (Some(t), Some(ratio)) = (r.transfer_bound_seconds, r.network_ratio) {
            out!(
                "{} rows over {} ms RTT, {} Mbit/s: transfer bound {:.3} s; join / max(curve bound, transfer bound) = {:.2}",
                r.rows,
                r.rtt_ms.unwrap_or(0),
                r.bandwidth_mbit.unwrap_or(0),
                t,
                ratio
            );
        }
    }
    for r in rows {
        out!("");
        out!("{} rows (run {}), phases:", r.rows, r.run);
        for p in &r.phases {
            out!("  {:<9} {:<58} {:>9.3} s", p.node, p.phase, p.seconds);
        }
    }
}
