//! `cargo xtask crash-test --kills N [--seed S] [--mode sync|sync-turns|group|buffered] [--rounds R ...]`:
//! builds kernel-store's crash workload in release mode and runs it as the parent, which
//! SIGKILLs the workload N times at seeded random instants, restarts it each time, and compares
//! the final state with an uninterrupted run. Its last line is
//! `crash-test: N kills, L lost, D duplicated, state matches: yes|no`; the task fails on any loss,
//! duplication or mismatch.

use crate::cargo;

/// Run the crash test with the given arguments (passed through to the workload's parent).
pub fn crash_test(args: &[String]) -> Result<(), String> {
    if !args.iter().any(|a| a == "--kills") {
        return Err("usage: cargo xtask crash-test --kills N [--seed S] [--mode sync|sync-turns|group|buffered] [--rounds R]".into());
    }
    let mut cmd = vec!["run", "--release", "--quiet", "-p", "kernel-store", "--bin", "crash-workload", "--", "parent"];
    cmd.extend(args.iter().map(String::as_str));
    cargo(&cmd).map_err(|_| "crash test failed: see the `crash-test:` line above".to_owned())
}
