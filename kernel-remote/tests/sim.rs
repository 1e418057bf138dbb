//! The deterministic simulation in CI: a few hundred seeds (the full 10,000 run is
//! `cargo xtask sim --seeds 10000`), and a seed replays exactly.

use kernel_remote::sim::{run_seed, run_seeds, SimOptions};

#[test]
fn simulated_seeds_keep_every_ken_invariant() {
    let seeds = std::env::var("KEN_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let failing = run_seeds(0, seeds, &SimOptions::default(), false);
    assert_eq!(failing, 0, "see the failing seeds printed above");
}

#[test]
fn a_seed_replays_exactly() {
    let a = run_seed(4242, &SimOptions::default());
    let b = run_seed(4242, &SimOptions::default());
    assert!(a.violations.is_empty(), "{:?}", a.violations);
    assert!(a.crashes > 0 && a.resent > 0, "the seed injected faults: {a:?}");
    assert_eq!((a.steps, a.crashes, a.partitions, a.data_sent, a.resent), (b.steps, b.crashes, b.partitions, b.data_sent, b.resent));
}
