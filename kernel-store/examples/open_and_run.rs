//! Open a kernel on a fjall store, run a ping-pong, close it, reopen it and see the state kept.
//!
//! `cargo run -p kernel-store --example open_and_run [DIR]` (a temporary directory by default).

use kernel_core::{CapData, CrankContext, Endpoint, Fault, Kernel, KernelDelivery, Message, Settlement};
use kernel_store::{Durability, FjallStore, StoreOptions};
use std::time::Instant;

/// Answers every message with "pong" and counts what it answered in its vatstore.
struct Ponger;

impl Endpoint for Ponger {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let err = |e: kernel_core::SyscallError| Fault::VatError(e.to_string());
        if let KernelDelivery::Message { message: Message { result: Some(kp), .. }, .. } = d {
            let n = ctx.vatstore_get(b"pongs").map_err(err)?.map_or(0, |v| v.first().copied().unwrap_or(0));
            ctx.vatstore_set(b"pongs", vec![n.wrapping_add(1)]).map_err(err)?;
            ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain("\"pong\"")))]).map_err(err)?;
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let temp = tempfile::tempdir()?;
    let dir = std::env::args().nth(1).map_or_else(|| temp.path().to_path_buf(), Into::into);

    let t = Instant::now();
    let store = FjallStore::open(&dir, StoreOptions::new(Durability::Sync))?;
    println!("opened {} in {:?} at batch {}", dir.display(), t.elapsed(), store.applied());
    let mut kernel = Kernel::open(store)?;
    let vat = kernel.add_endpoint("ponger", Box::new(Ponger))?;
    let root = kernel.root(vat)?;
    let answer = kernel.queue_message(root.into(), "ping", CapData::plain("[]"))?;
    let summary = kernel.run(None)?;
    println!("ran {} crank(s); answer: {:?}; now at {}", summary.cranks, kernel.settlement(answer)?, kernel.cranks());
    let pongs = kernel.vatstore(vat)?;
    drop(kernel); // closes the store and releases its lock

    let t = Instant::now();
    let kernel = Kernel::open(FjallStore::open(&dir, StoreOptions::new(Durability::Sync))?)?;
    println!("reopened in {:?} at {}", t.elapsed(), kernel.cranks());
    assert_eq!(kernel.vatstore(vat)?, pongs, "the vatstore survived the restart");
    Ok(())
}
