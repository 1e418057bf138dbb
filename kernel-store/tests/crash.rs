//! The short crash test CI runs (DESIGN §10.5): the workload killed with SIGKILL at random
//! instants, restarted each time, must end in the reference run's state with no delivery lost
//! or doubled. The full one is `cargo xtask crash-test --kills 1000`.

use std::process::Command;

fn crash_test(mode: &str, kills: u32, seed: u32, rounds: u32) {
    let out = Command::new(env!("CARGO_BIN_EXE_crash-workload"))
        .args(["parent", "--mode", mode, "--kills", &kills.to_string(), "--seed", &seed.to_string(), "--rounds", &rounds.to_string()])
        .output()
        .expect("run the crash workload");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(out.status.success(), "{mode}: {last}\n{stderr}");
    assert!(last.ends_with(", 0 lost, 0 duplicated, state matches: yes"), "{mode}: {last}\n{stderr}");
    let done: u32 = last.strip_prefix("crash-test: ").and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).expect("kill count");
    assert!(done * 2 >= kills, "{mode}: only {done} of {kills} kills landed before the workload finished\n{stderr}");
}

#[test]
fn sync_mode_survives_30_kills() {
    crash_test("sync", 30, 11, 8);
}

#[test]
fn group_mode_keeps_every_crank_reported_durable_across_10_kills() {
    crash_test("group", 10, 12, 20);
}

#[test]
fn sync_mode_in_turns_survives_30_kills() {
    crash_test("sync-turns", 30, 13, 30);
}
