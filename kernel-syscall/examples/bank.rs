//! A bank vat whose accounts are exported objects with balances in its vatstore. A transfer
//! debits, credits and tells the auditor vat — and then, on an overdraft, fails. The failed
//! crank leaves nothing behind: balances are as before, the auditor never hears of it, the
//! bank is terminated and the caller's promise rejected.
//!
//! `cargo run -p kernel-syscall --example bank`

use kernel_core::{CapData, Kernel, KernelError, MemStore, Settlement, VRef};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};

/// The bank: `open(balance)` on its root makes an account; `transfer(to, amount)` on an account.
pub struct Bank;

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
pub struct Auditor;

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

fn show(kernel: &Kernel<MemStore>, title: &str) -> Result<(), KernelError> {
    println!("-- {title}");
    for (ep, rec) in kernel.endpoints()? {
        let entries: Vec<String> = kernel
            .vatstore(ep)?
            .into_iter()
            .filter(|(k, _)| !k.starts_with(b"$"))
            .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(&k), String::from_utf8_lossy(&v)))
            .collect();
        println!("   {ep} {:<8} {:?}  {}", rec.name, rec.status, entries.join(" "));
    }
    Ok(())
}

fn settle(kernel: &mut Kernel<MemStore>, target: kernel_core::KRef, method: &str, args: CapData) -> Result<Settlement, KernelError> {
    let kp = kernel.queue_message(target, method, args)?;
    kernel.run(None)?;
    kernel.settlement(kp)?.ok_or_else(|| KernelError::Refused(format!("{method} did not settle")))
}

fn main() -> Result<(), KernelError> {
    let mut kernel = Kernel::open(MemStore::new())?;
    let bank = kernel.add_endpoint("bank", VatEndpoint::boxed(HelperVat::new(Bank)))?;
    let auditor = kernel.add_endpoint("auditor", VatEndpoint::boxed(HelperVat::new(Auditor)))?;
    let bank_root = kernel.root(bank)?.into();
    let auditor_root = kernel.root(auditor)?.into();
    settle(&mut kernel, bank_root, "setAuditor", CapData::reference(auditor_root))?;
    let account = |s: Settlement| match s {
        Settlement::Fulfilled(d) => d.as_reference().ok_or_else(|| KernelError::Refused("open returned no account".into())),
        Settlement::Rejected(d) => Err(KernelError::Refused(format!("open rejected: {}", String::from_utf8_lossy(&d.body)))),
    };
    let alice = account(settle(&mut kernel, bank_root, "open", CapData::plain("100"))?)?;
    let bob = account(settle(&mut kernel, bank_root, "open", CapData::plain("10"))?)?;

    let ok = settle(&mut kernel, alice, "transfer", CapData { body: b"30".to_vec(), slots: vec![bob] })?;
    println!("transfer 30 alice->bob: {:?}", String::from_utf8_lossy(&ok.data().body));
    show(&kernel, "after a good transfer")?;

    let bad = settle(&mut kernel, alice, "transfer", CapData { body: b"500".to_vec(), slots: vec![bob] })?;
    println!("transfer 500 alice->bob: rejected={} {}", bad.is_rejected(), String::from_utf8_lossy(&bad.data().body));
    show(&kernel, "after the overdraft: balances and audit log untouched, bank terminated")?;
    Ok(())
}
