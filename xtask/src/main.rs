//! `cargo xtask <task>`: the project's automation, in Rust so a clean clone with the stock
//! toolchain can run it.
//!
//! - `ci`: `cargo fmt --check`, `cargo clippy --workspace --all-targets -- -D warnings`,
//!   `cargo test --workspace`.
//! - `bench`: the benchmarks, printed as ratios against baselines measured in the same run.
//! - `crash-test --kills N [--seed S] [--mode sync|sync-turns|group]`: kill -9 the kernel on fjall N times
//!   and check nothing was lost or doubled (kernel-store's crash workload).
//! - `sim --seeds N [--seed S]`: kernel-remote's deterministic simulation of Ken between three
//!   kernels; prints `sim: N seeds, V violations` and the seed that replays any failure.

mod crash_test;
mod sim;

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("bench") => bench(&args[1..]),
        Some("crash-test") => crash_test::crash_test(&args[1..]),
        Some("sim") => sim::sim(&args[1..]),
        Some("help") | Some("--help") | None => {
            println!(
                "usage: cargo xtask <ci | bench [filter] | crash-test --kills N [--seed S] [--mode sync|sync-turns|group] | sim --seeds N [--seed S]>"
            );
            Ok(())
        }
        Some(other) => Err(format!("unknown task {other:?}; try `cargo xtask help`")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Run `cargo` with `args`, failing if it fails.
fn cargo(args: &[&str]) -> Result<(), String> {
    cargo_env(args, &[])
}

/// Runs cargo with `args`, with `env` set for it and everything it starts.
fn cargo_env(args: &[&str], env: &[(&str, &str)]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    eprintln!("xtask: cargo {}", args.join(" "));
    let status = Command::new(&cargo).args(args).envs(env.iter().copied()).status().map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`cargo {}` failed ({status})", args.join(" ")))
    }
}

fn ci() -> Result<(), String> {
    // CI builds once from a clean clone: incremental caches would only add ~0.7 GB of disk.
    let once = [("CARGO_INCREMENTAL", "0")];
    cargo(&["fmt", "--all", "--check"])?;
    cargo_env(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], &once)?;
    cargo_env(&["test", "--workspace"], &once)?;
    Ok(())
}

fn bench(filter: &[String]) -> Result<(), String> {
    // Each crate keeps its benchmarks in `benches/` (harness = false): each prints its rate
    // beside a baseline measured in the same run, and the ratio.
    let mut args = vec!["bench", "--workspace", "--"];
    args.extend(filter.iter().map(String::as_str));
    cargo(&args)
}
