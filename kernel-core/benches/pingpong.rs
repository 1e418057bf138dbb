//! In-memory ping-pong: every crank is one delivery, one send with a result promise and one
//! resolve. Printed beside a bare baseline measured in the same run: the same number of
//! MemStore transactions (begin, one write, commit) with no kernel logic.
//!
//! `cargo bench -p kernel-core --bench pingpong [-- --cranks N]`

use kernel_core::store::Txn;
use kernel_core::{CapData, CrankContext, Endpoint, Fault, KRef, Kernel, KernelDelivery, MemStore, Settlement, Store, VRef};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Answers each ping and pings its peer back with a fresh result promise.
struct Player {
    peer: Option<KRef>,
    next_promise: u64,
}

impl Endpoint for Player {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let KernelDelivery::Message { target, message } = d else { return Ok(()) };
        let fail = |e: kernel_core::SyscallError| Fault::VatError(e.to_string());
        if let Some(r) = message.result {
            ctx.resolve(vec![(r, Settlement::Fulfilled(CapData::plain("1")))]).map_err(fail)?;
        }
        let peer = match self.peer {
            Some(p) => p,
            None => *message.args.slots.first().ok_or_else(|| Fault::VatError("no peer".into()))?,
        };
        self.peer = Some(peer);
        self.next_promise += 1;
        let kp = ctx.export(VRef::local_promise(self.next_promise)).map_err(fail)?;
        // Carry our own root along so the peer learns whom to answer.
        ctx.send(peer, "ping".into(), CapData::reference(target.into()), kp.as_promise()).map_err(fail)?;
        // Nobody waits for the answer: let it go, so the tables stay the size of the rally.
        ctx.drop_imports(&[kp]).map_err(fail)?;
        Ok(())
    }
}

/// The rally over `cranks` cranks; with `turn`, in turns of that many cranks each
/// (`Kernel::begin_turn`: one store batch per turn).
fn pingpong(cranks: u64, turn: Option<u64>) -> Result<Duration, kernel_core::KernelError> {
    let mut kernel = Kernel::open(MemStore::new())?;
    let a = kernel.add_endpoint("a", Box::new(Player { peer: None, next_promise: 0 }))?;
    let b = kernel.add_endpoint("b", Box::new(Player { peer: None, next_promise: 0 }))?;
    let (ra, rb) = (kernel.root(a)?, kernel.root(b)?);
    // Tell each player the other's root, then let them rally.
    kernel.queue_message(ra.into(), "ping", CapData::reference(rb.into()))?;
    let start = Instant::now();
    let mut done = 0;
    while done < cranks {
        let n = turn.unwrap_or(cranks).min(cranks - done);
        if turn.is_some() {
            kernel.begin_turn();
        }
        let summary = kernel.run(Some(n))?;
        kernel.end_turn()?;
        assert_eq!((summary.cranks, summary.aborted), (n, 0));
        done += n;
    }
    let elapsed = start.elapsed();
    // Garbage collection keeps the store the size of the rally, not of its history.
    assert!(kernel.store().len() < 100, "store grew to {} keys", kernel.store().len());
    Ok(elapsed)
}

fn baseline(txns: u64) -> Duration {
    let mut store = MemStore::new();
    let value = vec![7u8; 64];
    let start = Instant::now();
    for i in 0..txns {
        let mut t = Txn::begin(&store);
        t.set(format!("q/{:016x}", i % 1024).into_bytes(), value.clone());
        let batch = t.into_batch();
        store.apply(batch).unwrap_or_else(|e| panic!("MemStore cannot fail: {e}"));
    }
    black_box(&store);
    start.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let cranks =
        args.iter().position(|a| a == "--cranks").and_then(|i| args.get(i + 1)).and_then(|n| n.parse().ok()).unwrap_or(1_000_000u64);
    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    // Warm up, then take the best of three of each, interleaved so both see the same machine.
    let _ = pingpong(cranks / 10, None);
    let mut best_kernel = f64::MIN;
    let mut best_turns = f64::MIN;
    let mut best_base = f64::MIN;
    for _ in 0..3 {
        for (turn, best) in [(None, &mut best_kernel), (Some(1_000), &mut best_turns)] {
            match pingpong(cranks, turn) {
                Ok(d) => *best = best.max(rate(cranks, d)),
                Err(e) => {
                    eprintln!("pingpong failed: {e}");
                    std::process::exit(1);
                }
            }
        }
        best_base = best_base.max(rate(cranks, baseline(cranks)));
    }
    println!("kernel-core ping-pong (in memory): {:>12.0} cranks/s", best_kernel);
    println!("  in turns of 1,000 cranks:        {:>12.0} cranks/s ({:.2}x)", best_turns, best_turns / best_kernel);
    println!("baseline MemStore transactions:    {:>12.0} txns/s", best_base);
    println!("ratio kernel/baseline:             {:>12.3}", best_kernel / best_base);
    println!("target >= 1,000,000 cranks/s:      {}", if best_kernel >= 1e6 { "met" } else { "not met" });
}
