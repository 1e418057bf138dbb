//! The ping-pong example's vats (`kernel-syscall/examples/ping_pong.rs`), copied between the
//! markers below (`examples_run` fails if the copy no longer matches the example), and
//! constructors for them.

use kernel_core::{Endpoint, VRef};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};

// ---- copied from the example ----
/// Bob answers `ping(n)` with `n`.
struct Bob;

impl Behavior for Bob {
    fn call(&mut self, _cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        match method {
            "ping" => Ok(Answer::Value(args)),
            other => Err(VatError::new(format!("Bob has no method {other}"))),
        }
    }
}

/// Alice starts the rally when the host calls `start(bob)`.
struct Alice {
    rally: u64,
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
// ---- end of copy ----

/// A new Alice, who plays a rally of `rally` pings.
pub fn alice(rally: u64) -> Box<dyn Endpoint> {
    VatEndpoint::boxed(HelperVat::new(Alice { rally }))
}

/// A new Bob.
pub fn bob() -> Box<dyn Endpoint> {
    VatEndpoint::boxed(HelperVat::new(Bob))
}
