//! Deterministic simulation (FoundationDB / TigerBeetle style): three kernels in one process,
//! each on a [`SimStore`] that can crash (losing what is not durable) and reopen, connected by
//! a [`SimNet`] that drops, duplicates, reorders and delays frames and partitions and heals
//! links, everything driven by one seeded [`Rng`] and a virtual clock. [`run_seed`] runs one
//! seed and checks the Ken invariants (DESIGN §10.3–10.5); the same seed replays exactly.
//!
//! [`LoopbackPair`] is the fault-free two-node network for examples and unit tests.

mod harness;
mod loopback;
mod net;
mod rng;
mod store;
mod workload;

pub use harness::{run_seed, run_seeds, SeedReport, SimOptions};
pub use loopback::LoopbackPair;
pub use net::{NetFaults, SimIdentities, SimNet, SimPort, Transmission};
pub use rng::Rng;
pub use store::{SimClock, SimDurability, SimStore};
pub use workload::{App, APP_NAME};
