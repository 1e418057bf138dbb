//! The bank example's vats (`kernel-syscall/examples/bank.rs`), copied between the markers below
//! (`examples_run` fails if the copy no longer matches the example), and constructors for them.

use kernel_core::{Endpoint, VRef};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};

// ---- copied from the example ----
/// The bank: `open(balance)` on its root makes an account; `transfer(to, amount)` on an account.
struct Bank;

fn number(d: &VatData) -> Result<i64, VatError> {
    d.text().trim().parse().map_err(|_| VatError::new(format!("not a number: {}", d.text())))
}

impl Behavior for Bank {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        match (target == VRef::ROOT, method) {
            (true, "open") => {
                let account = cx.export()?;
                cx.set(&format!("balance/{account}"), &number(&args)?.to_string())?;
                Ok(Answer::Value(VatData::reference(account)))
            }
            (true, "setAuditor") => {
                let auditor = args.as_reference().ok_or_else(|| VatError::new("setAuditor needs a reference"))?;
                cx.set("auditor", &auditor.to_string())?;
                Ok(Answer::Value(VatData::plain("null")))
            }
            (false, "transfer") => {
                let to = *args.slots.first().ok_or_else(|| VatError::new("transfer needs a destination"))?;
                let amount = number(&VatData::plain(args.body.clone()))?;
                let from_key = format!("balance/{target}");
                let to_key = format!("balance/{to}");
                let from_balance = cx.get(&from_key)?.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0) - amount;
                let to_balance = cx.get(&to_key)?.and_then(|s| s.parse::<i64>().ok()).unwrap_or(0) + amount;
                cx.set(&from_key, &from_balance.to_string())?;
                cx.set(&to_key, &to_balance.to_string())?;
                if let Some(auditor) = cx.get("auditor")? {
                    let auditor: VRef = auditor.parse().map_err(|_| VatError::new("corrupt auditor"))?;
                    cx.send_only(auditor, "record", VatData::plain(format!("{target}->{to}:{amount}")))?;
                }
                if from_balance < 0 {
                    // Everything above vanishes with the crank.
                    return Err(VatError::new(format!("overdraft: {target} would hold {from_balance}")));
                }
                Ok(Answer::Value(VatData::plain(from_balance.to_string())))
            }
            (_, other) => Err(VatError::new(format!("no method {other} on {target}"))),
        }
    }
}

/// The auditor counts and records every transfer it is told of.
struct Auditor;

impl Behavior for Auditor {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        if method != "record" {
            return Err(VatError::new(format!("no method {method}")));
        }
        let n = cx.get_u64("count")? + 1;
        cx.set("count", &n.to_string())?;
        cx.set(&format!("entry/{n}"), &args.text())?;
        Ok(Answer::Value(VatData::plain("null")))
    }
}
// ---- end of copy ----

/// A new bank vat.
pub fn bank() -> Box<dyn Endpoint> {
    VatEndpoint::boxed(HelperVat::new(Bank))
}

/// A new auditor vat.
pub fn auditor() -> Box<dyn Endpoint> {
    VatEndpoint::boxed(HelperVat::new(Auditor))
}
