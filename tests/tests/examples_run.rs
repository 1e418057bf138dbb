//! The kernel-syscall examples, run end to end in-process: the examples' own vats (their source
//! files included as modules) in the same scenarios, with the outcomes asserted.

#[path = "examples_run/bank.rs"]
mod bank;
#[path = "examples_run/ping_pong.rs"]
mod ping_pong;

use kernel_core::{CapData, CrankInput, CrankOutcome, EndpointId, EndpointStatus, Fault, KRef, Kernel, MemStore, Settlement};
use std::collections::BTreeMap;

type Store = BTreeMap<String, String>;

fn vatstore(k: &Kernel<MemStore>, ep: EndpointId) -> Store {
    k.vatstore(ep)
        .expect("vatstore")
        .into_iter()
        .map(|(a, b)| (String::from_utf8_lossy(&a).into_owned(), String::from_utf8_lossy(&b).into_owned()))
        .collect()
}

fn status(k: &Kernel<MemStore>, ep: EndpointId) -> EndpointStatus {
    k.endpoint(ep).expect("endpoint").expect("record").status
}

/// Queue `target.method(args)` from the host, run to quiescence, and return the settlement.
fn settle(k: &mut Kernel<MemStore>, target: KRef, method: &str, args: CapData) -> Settlement {
    let kp = k.queue_message(target, method, args).expect("queue");
    let summary = k.run(Some(10_000)).expect("run");
    assert!(summary.quiescent);
    k.settlement(kp).expect("settlement").unwrap_or_else(|| panic!("{method} did not settle"))
}

fn account(s: Settlement) -> KRef {
    match s {
        Settlement::Fulfilled(d) => d.as_reference().expect("open returns an account"),
        Settlement::Rejected(d) => panic!("open rejected: {}", String::from_utf8_lossy(&d.body)),
    }
}

struct BankWorld {
    k: Kernel<MemStore>,
    bank: EndpointId,
    auditor: EndpointId,
    alice: KRef,
    bob: KRef,
}

/// The example's setup: a bank told its auditor, and two accounts (alice 100, bob 10).
fn bank_world() -> BankWorld {
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let bank = k.add_endpoint("bank", bank::bank()).expect("add bank");
    let auditor = k.add_endpoint("auditor", bank::auditor()).expect("add auditor");
    let bank_root: KRef = k.root(bank).expect("root").into();
    let auditor_root: KRef = k.root(auditor).expect("root").into();
    assert!(!settle(&mut k, bank_root, "setAuditor", CapData::reference(auditor_root)).is_rejected());
    let alice = account(settle(&mut k, bank_root, "open", CapData::plain("100")));
    let bob = account(settle(&mut k, bank_root, "open", CapData::plain("10")));
    BankWorld { k, bank, auditor, alice, bob }
}

fn balances(w: &BankWorld) -> Vec<(String, String)> {
    vatstore(&w.k, w.bank).into_iter().filter(|(k, _)| k.starts_with("balance/")).collect()
}

#[test]
fn a_good_transfer_moves_the_money_and_is_audited() {
    let mut w = bank_world();
    let ok = settle(&mut w.k, w.alice, "transfer", CapData { body: b"30".to_vec(), slots: vec![w.bob] });
    assert_eq!(ok, Settlement::Fulfilled(CapData::plain("70")));
    let mut amounts: Vec<String> = balances(&w).into_iter().map(|(_, v)| v).collect();
    amounts.sort();
    assert_eq!(amounts, ["40", "70"]);
    let audit = vatstore(&w.k, w.auditor);
    assert_eq!(audit.get("count").map(String::as_str), Some("1"));
    assert!(audit.get("entry/1").is_some_and(|e| e.ends_with(":30")), "{audit:?}");
}

#[test]
fn an_overdraft_leaves_balances_and_audit_log_untouched_terminates_the_bank_and_rejects_the_caller() {
    let mut w = bank_world();
    settle(&mut w.k, w.alice, "transfer", CapData { body: b"30".to_vec(), slots: vec![w.bob] });
    let bank_before = vatstore(&w.k, w.bank);
    let audit_before = vatstore(&w.k, w.auditor);
    let cranks_before = w.k.cranks();

    let kp = w.k.queue_message(w.alice, "transfer", CapData { body: b"500".to_vec(), slots: vec![w.bob] }).expect("queue");
    let report = w.k.step().expect("step").expect("the transfer is queued");
    match &report.outcome {
        CrankOutcome::Aborted { endpoint, fault: Fault::VatError(why) } => {
            assert_eq!(*endpoint, w.bank);
            assert!(why.contains("overdraft"), "{why}");
        }
        other => panic!("the overdraft should abort the crank, got {other:?}"),
    }
    assert_eq!(report.flushed, 0, "the send to the auditor was dropped with the crank");
    assert_eq!(w.k.queue_len(), 0);
    assert_eq!(w.k.run(None).expect("run").cranks, 0, "nothing was left to run");
    assert_eq!(w.k.cranks().0, cranks_before.0 + 1);

    assert_eq!(vatstore(&w.k, w.bank), bank_before, "balances untouched");
    assert_eq!(vatstore(&w.k, w.auditor), audit_before, "audit log untouched");
    match status(&w.k, w.bank) {
        EndpointStatus::Terminated { reason } => assert!(reason.contains("overdraft"), "{reason}"),
        EndpointStatus::Live => panic!("the bank should be terminated"),
    }
    assert_eq!(status(&w.k, w.auditor), EndpointStatus::Live);
    match w.k.settlement(kp).expect("settlement") {
        Some(Settlement::Rejected(d)) => {
            let body = String::from_utf8_lossy(&d.body);
            assert!(body.contains("delivery failed") && body.contains("overdraft"), "{body}")
        }
        other => panic!("the caller's promise should be rejected, got {other:?}"),
    }
    // The terminated bank answers nothing more.
    let later = settle(&mut w.k, w.bob, "transfer", CapData { body: b"1".to_vec(), slots: vec![w.alice] });
    assert!(later.is_rejected() && String::from_utf8_lossy(&later.data().body).contains("vat terminated"), "{later:?}");
}

/// Run the ping-pong example's scenario with `rally`; returns the pongs Alice recorded, the pings
/// Bob received, the kernel and Alice.
fn ping_pong(rally: u64) -> (Option<String>, usize, Kernel<MemStore>, EndpointId) {
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let alice = k.add_endpoint("alice", ping_pong::alice(rally)).expect("add");
    let bob = k.add_endpoint("bob", ping_pong::bob()).expect("add");
    let (alice_root, bob_root) = (k.root(alice).expect("root"), k.root(bob).expect("root"));
    let started = k.queue_message(alice_root.into(), "start", CapData::reference(bob_root.into())).expect("queue");
    let mut pings = 0;
    while let Some(report) = k.step().expect("step") {
        assert_eq!(report.outcome, CrankOutcome::Committed, "{report:?}");
        if matches!(&report.input, CrankInput::Send { method, delivered_to: Some(ep), .. } if method == "ping" && *ep == bob) {
            pings += 1;
        }
        assert!(report.crank.0 < 100_000, "runaway rally");
    }
    assert_eq!(k.settlement(started).expect("settlement"), Some(Settlement::Fulfilled(CapData::plain("\"started\""))));
    let pongs = vatstore(&k, alice).get("pongs").cloned();
    (pongs, pings, k, alice)
}

#[test]
fn a_ping_pong_rally_of_n_ends_with_n_pongs() {
    for rally in [1, 2, 3, 10, 50] {
        let (pongs, pings, k, alice) = ping_pong(rally);
        assert_eq!(pongs, Some(rally.to_string()), "rally {rally}");
        assert_eq!(pings, rally as usize, "rally {rally}: Bob is pinged once per pong");
        let watches = vatstore(&k, alice).into_keys().filter(|key| key.starts_with("$watch/")).count();
        assert_eq!(watches, 0, "rally {rally}: every watch fired and was forgotten");
        assert!(k.promises().expect("promises").iter().all(|(_, p)| matches!(p, kernel_core::PromiseState::Settled(_))));
    }
}
