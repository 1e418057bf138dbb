//! Two real processes (`ken-node`) on fjall, talking TCP over loopback, each SIGKILLed at
//! random moments and restarted; in the end both apps counted exactly `count` messages from the
//! other, in order, and exactly `count` answers — read back from the stores after the last kill.

mod common;

use common::{final_counters, free_ports, kill_at_random_until_done, Side};

/// a in `mode_a`, b in `mode_b` (see `ken-node`), killed at random instants drawn from `seed`.
fn killed_pair_ends_exact(mode_a: &'static str, mode_b: &'static str, seed: u64) {
    let count: u64 = std::env::var("KEN_TWO_PROCESS_COUNT").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
    let kills: u64 = std::env::var("KEN_TWO_PROCESS_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (la, lb) = free_ports();
    let mut a = Side::new("a", "b", &tmp.path().join("a"), mode_a, la, Some(lb), None);
    let mut b = Side::new("b", "a", &tmp.path().join("b"), mode_b, lb, None, None);
    kill_at_random_until_done(&mut a, &mut b, count, kills, seed, true);
    assert_eq!(final_counters(&a.dir, "b"), (count, count, 0), "a's app");
    assert_eq!(final_counters(&b.dir, "a"), (count, count, 0), "b's app");
}

#[test]
fn two_processes_killed_at_random_end_with_exact_counters() {
    killed_pair_ends_exact("group", "sync", 0x9E37_79B9_7F4A_7C15);
}

/// The same with both nodes in turns: a kill inside a turn loses the turn, never half of it.
#[test]
fn two_processes_in_turns_killed_at_random_end_with_exact_counters() {
    killed_pair_ends_exact("sync-turns", "group-turns", 0x2545_F491_4F6C_DD1D);
}
