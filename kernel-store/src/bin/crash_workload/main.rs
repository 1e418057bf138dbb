//! Crash-test workload (in progress).
fn main() {}
