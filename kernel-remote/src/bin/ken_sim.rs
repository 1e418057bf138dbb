//! `ken-sim --seeds N [--first S] [--seed S] [--verbose]`: the deterministic simulation of Ken
//! between three kernels (what `cargo xtask sim` runs). Prints `sim: N seeds, V violations` and,
//! for each failing seed, the command that replays it. Exits non-zero on any violation.

use kernel_remote::sim::{run_seeds, SimOptions};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds = 100u64;
    let mut first = 0u64;
    let mut verbose = false;
    let mut i = 0;
    while i < args.len() {
        let value = |i: usize| args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match args[i].as_str() {
            "--seeds" => match value(i) {
                Some(n) => seeds = n,
                None => return usage("--seeds needs a number"),
            },
            "--first" => match value(i) {
                Some(n) => first = n,
                None => return usage("--first needs a number"),
            },
            "--seed" => match value(i) {
                Some(s) => {
                    first = s;
                    seeds = 1;
                    verbose = true;
                }
                None => return usage("--seed needs a number"),
            },
            "--verbose" | "-v" => {
                verbose = true;
                i += 1;
                continue;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
        i += 2;
    }
    if run_seeds(first, seeds, &SimOptions::default(), verbose) == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("ken-sim: {problem}\nusage: ken-sim --seeds N [--first S] | --seed S [--verbose]");
    ExitCode::from(2)
}
