//! `cargo xtask sim --seeds N [--first S] [--seed S] [--verbose]`: builds kernel-remote's
//! simulation in release mode and runs it. Its last line is `sim: N seeds, V violations`; a
//! failing seed is printed with the command that replays it, and the task fails.

use crate::cargo;

/// Run the simulation with the given arguments (passed through to `ken-sim`).
pub fn sim(args: &[String]) -> Result<(), String> {
    if !args.iter().any(|a| a == "--seeds" || a == "--seed") {
        return Err("usage: cargo xtask sim --seeds N [--first S] | --seed S [--verbose]".into());
    }
    let mut cmd = vec!["run", "--release", "--quiet", "-p", "kernel-remote", "--bin", "ken-sim", "--"];
    cmd.extend(args.iter().map(String::as_str));
    cargo(&cmd).map_err(|_| "simulation found violations: see the `sim:` lines above".to_owned())
}
