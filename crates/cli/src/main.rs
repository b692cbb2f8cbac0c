#![forbid(unsafe_code)]
#![allow(clippy::print_stdout)]
//! `cleanroom`: the clean room's one binary. Argument parsing and output
//! formatting only; the work is done by the library crates.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cleanroom_sim::simulate::{DEFAULT_CHUNK, SimulateConfig, SimulateReport, simulate};

#[derive(Parser, Debug)]
#[command(name = "cleanroom", version, about = "A secure two-party data clean room")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Both parties in memory, no network, no noise: run the private join and
    /// the aggregate on synthetic data and check the result against a
    /// plaintext computation, exactly.
    Simulate(SimulateArgs),
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
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
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
            })
            .context("simulation failed")?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            if !report.exact {
                anyhow::bail!("the protocol's result differs from the plaintext computation");
            }
        }
    }
    Ok(())
}

fn print_report(r: &SimulateReport) {
    println!(
        "holder: {} customers ({} transactions)   matcher: {} users   categories: {}",
        r.holder_rows, r.holder_transactions, r.matcher_rows, r.categories
    );
    println!(
        "intersection (plaintext): {}   matched rows seen by the matcher: {} (intersection + D, D_max = {})",
        r.intersection, r.matched_rows_seen_by_matcher, r.dummy_rows
    );
    println!();
    let name_w = r.cells.iter().map(|c| c.name.len()).max().unwrap_or(4).max(4);
    println!("{:<name_w$}  {:>16}  {:>16}  ok", "cell", "protocol", "plaintext");
    for c in &r.cells {
        let ok = if c.protocol == c.plaintext { "=" } else { "DIFFERS" };
        println!("{:<name_w$}  {:>16}  {:>16}  {ok}", c.name, c.protocol, c.plaintext);
    }
    println!();
    println!("phase                         seconds");
    for (name, secs) in &r.phases {
        println!("{name:<28}  {secs:>8.3}");
    }
    println!();
    println!(
        "bytes holder->matcher: {}   matcher->holder: {}   (frames: {} / {})",
        r.bytes.holder_to_matcher,
        r.bytes.matcher_to_holder,
        r.messages.holder_to_matcher,
        r.messages.matcher_to_holder
    );
    println!("exact: {}", r.exact);
}
