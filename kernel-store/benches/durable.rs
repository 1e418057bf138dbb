//! Durability benchmarks (in progress).
fn main() {}
