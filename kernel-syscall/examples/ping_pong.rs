//! Two vats play ping-pong through result promises: Alice sends `ping(n)` to Bob, watches the
//! result, and pings again when Bob's `pong` arrives, until `n` reaches the rally length.
//!
//! `cargo run -p kernel-syscall --example ping_pong [rally]` prints every crank.

use kernel_core::{CapData, CrankOutcome, Kernel, KernelError, MemStore, VRef};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};

/// Bob answers `ping(n)` with `n`.
pub struct Bob;

impl Behavior for Bob {
    fn call(&mut self, _cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        match method {
            "ping" => Ok(Answer::Value(args)),
            other => Err(VatError::new(format!("Bob has no method {other}"))),
        }
    }
}

/// Alice starts the rally when the host calls `start(bob)`.
pub struct Alice {
    /// How many pings the rally has.
    pub rally: u64,
}

impl Alice {
    fn ping(&mut self, cx: &mut Cx<'_, '_, '_>, n: u64) -> Result<(), VatError> {
        let bob = cx.get("bob")?.ok_or_else(|| VatError::new("no partner"))?;
        let bob: VRef = bob.parse().map_err(|e| VatError::new(format!("{e}")))?;
        let answer = cx.send(bob, "ping", VatData::plain(n.to_string()))?;
        cx.watch(answer, "pong")
    }
}

impl Behavior for Alice {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        match method {
            "start" => {
                let bob = args.as_reference().ok_or_else(|| VatError::new("start needs Bob"))?;
                cx.set("bob", &bob.to_string())?;
                self.ping(cx, 1)?;
                Ok(Answer::Value(VatData::plain("\"started\"")))
            }
            other => Err(VatError::new(format!("Alice has no method {other}"))),
        }
    }

    fn settled(&mut self, cx: &mut Cx<'_, '_, '_>, _watch: &str, outcome: Result<VatData, VatData>) -> Result<(), VatError> {
        let pong = outcome.map_err(|r| VatError::new(format!("ping rejected: {}", r.text())))?;
        let n: u64 = pong.text().parse().map_err(|_| VatError::new("bad pong"))?;
        cx.set("pongs", &n.to_string())?;
        if n < self.rally {
            self.ping(cx, n + 1)?;
        }
        Ok(())
    }
}

fn main() -> Result<(), KernelError> {
    let rally = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let mut kernel = Kernel::open(MemStore::new())?;
    let alice = kernel.add_endpoint("alice", VatEndpoint::boxed(HelperVat::new(Alice { rally })))?;
    let bob = kernel.add_endpoint("bob", VatEndpoint::boxed(HelperVat::new(Bob)))?;
    let (alice_root, bob_root) = (kernel.root(alice)?, kernel.root(bob)?);
    kernel.queue_message(alice_root.into(), "start", CapData::reference(bob_root.into()))?;
    while let Some(report) = kernel.step()? {
        let what = report.input.to_string();
        let outcome = match &report.outcome {
            CrankOutcome::Committed => "committed".to_owned(),
            other => format!("{other:?}"),
        };
        println!("{:>4}  {what:<28} {outcome}, {} queued", report.crank.0, report.flushed);
    }
    let pongs = kernel.vatstore(alice)?.into_iter().find(|(k, _)| k == b"pongs").map(|(_, v)| String::from_utf8_lossy(&v).into_owned());
    println!("rally of {rally} done: Alice saw {} pongs", pongs.unwrap_or_default());
    Ok(())
}
