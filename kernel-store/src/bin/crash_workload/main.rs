//! The crash-test workload (DESIGN §10.5), one binary in two roles:
//!
//! - `crash-workload parent --kills N [--seed S] [--mode sync|sync-turns|group|buffered] [shape] [--dir D] [--keep]`
//!   runs the workload once without crashes, then again while SIGKILLing it N times at random
//!   instants, and compares. Its last line is
//!   `crash-test: N kills, L lost, D duplicated, state matches: yes|no`; it exits non-zero on any
//!   loss, duplication or mismatch.
//! - `crash-workload child --dir D --mode M [shape]` runs the workload on the store in `D`
//!   (the parent's child processes).
//!
//! Shape: `--vats V --rounds R --chains C --hops H` (defaults 4 vats, 8 chains of 10 hops; rounds
//! grow with the kill count).
#![forbid(unsafe_code)]

mod parent;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use workload::Shape;

fn value<T: std::str::FromStr>(args: &[String], flag: &str) -> Result<Option<T>, String> {
    match args.iter().position(|a| a == flag) {
        None => Ok(None),
        Some(i) => {
            let v = args.get(i + 1).ok_or_else(|| format!("{flag} needs a value"))?;
            v.parse().map(Some).map_err(|_| format!("bad value {v:?} for {flag}"))
        }
    }
}

fn shape(args: &[String], default_rounds: u64) -> Result<Shape, String> {
    Ok(Shape {
        vats: value(args, "--vats")?.unwrap_or(4),
        rounds: value(args, "--rounds")?.unwrap_or(default_rounds),
        chains: value(args, "--chains")?.unwrap_or(8),
        hops: value(args, "--hops")?.unwrap_or(10),
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("child") => (|| {
            let dir: PathBuf = value(&args, "--dir")?.ok_or("child needs --dir")?;
            let mode: String = value(&args, "--mode")?.unwrap_or_else(|| "sync".into());
            workload::child(&dir, &mode, shape(&args, 20)?).map(|()| true)
        })(),
        Some("parent") => (|| {
            let kills: u64 = value(&args, "--kills")?.unwrap_or(30);
            let mode: String = value(&args, "--mode")?.unwrap_or_else(|| "sync".into());
            // Enough work that the kills land before it is done: a killed child keeps little of
            // what it did under group commit, but on a busy machine it does a lot per kill.
            // Sync in turns is about as fast as group commit.
            let rounds = if mode == "sync" { (kills / 10).max(20) } else { (kills / 2).max(20) };
            let plan = parent::Plan {
                kills,
                seed: value(&args, "--seed")?.unwrap_or(1),
                mode,
                shape: shape(&args, rounds)?,
                dir: value(&args, "--dir")?,
                keep: args.iter().any(|a| a == "--keep"),
            };
            workload::durability(&plan.mode)?;
            parent::run(&plan)
        })(),
        _ => {
            Err("usage: crash-workload parent --kills N [--seed S] [--mode sync|sync-turns|group|buffered] | child --dir D --mode M".into())
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("crash-workload: {e}");
            ExitCode::from(2)
        }
    }
}
