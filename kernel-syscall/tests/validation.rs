//! Validation: every illegal syscall aborts the crank (nothing the delivery did survives),
//! terminates the vat with the reason visible to the host, and rejects the failed message's
//! result; the verdict is sticky.

mod common;

use common::*;
use kernel_core::{CapData, CrankOutcome, EndpointId, EndpointStatus, Kernel, MemStore, Settlement, SyscallError, VRef};
use kernel_syscall::{RawData, RawSyscall, Syscall, VatData, MAX_KEY_LEN, MAX_VALUE_LEN};
use std::cell::RefCell;
use std::rc::Rc;

/// What one syscall returned, kept for the test to look at.
type Got = Rc<RefCell<Option<Result<Option<String>, SyscallError>>>>;

type Bad = Box<dyn Fn(&mut Syscall<'_, '_>, VRef) -> Result<Option<String>, SyscallError>>;

/// Alice, in her first delivery (the host's `start`, carrying Bob's root), writes her vatstore,
/// sends to Bob, then makes the syscall `bad` (given Bob's vref). It must be illegal with a
/// reason containing `needle`; then nothing of the delivery survives.
fn assert_illegal(needle: &str, bad: Bad) {
    let mut k = kernel();
    let (bob, bob_seen) = add_idle_vat(&mut k, "bob");
    let got: Got = Rc::default();
    let got2 = Rc::clone(&got);
    let (alice, _) = add_vat(&mut k, "alice", move |sys, inc| {
        let bob = inc.args().as_reference().expect("bob");
        sys.vatstore_set("before", b"1")?;
        sys.send(bob, "hello", &VatData::plain("[]"), Some(v("p+1")))?;
        let r = bad(sys, bob);
        *got2.borrow_mut() = Some(r);
        Ok(())
    });
    let result = introduce(&mut k, alice, "start", bob);
    let report = step(&mut k);
    match &*got.borrow() {
        Some(Err(SyscallError::Illegal(reason))) => assert!(reason.contains(needle), "reason {reason:?} should mention {needle:?}"),
        other => panic!("expected an illegal syscall mentioning {needle:?}, got {other:?}"),
    }
    assert_aborted_illegal(&k, &report, alice, needle, Some(result));
    assert_eq!(report.flushed, 0, "the crank's outputs were dropped");
    assert!(vatstore(&k, alice).is_empty(), "Alice's vatstore write was rolled back");
    assert!(k.clist(alice).expect("clist").is_empty(), "a terminated vat's c-list is dropped");
    assert!(run(&mut k).is_empty(), "nothing was queued");
    assert!(bob_seen.borrow().is_empty(), "Bob never heard of the aborted send");
    assert_eq!(status(&k, bob), EndpointStatus::Live, "only the offending vat is terminated");
}

fn raw_send(target: &str, slots: &[&str], result: Option<&str>) -> RawSyscall {
    RawSyscall::Send {
        target: target.to_owned(),
        method: "m".to_owned(),
        args: RawData { body: "[]".to_owned(), slots: slots.iter().map(|s| (*s).to_owned()).collect() },
        result: result.map(str::to_owned),
    }
}

#[test]
fn an_unknown_import_as_send_target_is_illegal() {
    assert_illegal("o-7 is not in the c-list", Box::new(|sys, _| sys.send(v("o-7"), "m", &VatData::plain("[]"), None).map(|()| None)));
}

#[test]
fn an_unknown_import_in_send_args_is_illegal() {
    assert_illegal(
        "o-2 is not in the c-list",
        // Alice holds o-1 (Bob's root) and p-1 (her result), nothing more.
        Box::new(|sys, bob| {
            sys.send(bob, "m", &VatData { body: b"[]".to_vec(), slots: vec![VRef::ROOT, bob, v("o-2")] }, None).map(|()| None)
        }),
    );
}

#[test]
fn an_unknown_imported_promise_is_illegal_to_subscribe_resolve_or_send_to() {
    // Alice holds p-1 (her result); p-2 onwards were never given to her.
    assert_illegal("p-2 is not in the c-list", Box::new(|sys, _| sys.subscribe(v("p-2")).map(|()| None)));
    assert_illegal("p-3 is not in the c-list", Box::new(|sys, _| sys.resolve(&[(v("p-3"), false, VatData::plain("1"))]).map(|()| None)));
    assert_illegal("p-4 is not in the c-list", Box::new(|sys, _| sys.send(v("p-4"), "m", &VatData::plain("[]"), None).map(|()| None)));
    assert_illegal(
        "p-5 is not in the c-list",
        Box::new(|sys, bob| sys.send(bob, "m", &VatData::plain("[]"), Some(v("p-5"))).map(|()| None)),
    );
}

#[test]
fn an_import_at_the_largest_index_is_still_unknown() {
    assert_illegal("is not in the c-list", Box::new(|sys, _| sys.execute(&raw_send("o-18446744073709551615", &[], None))));
}

#[test]
fn a_malformed_vref_through_execute_is_illegal() {
    let bad =
        ["", "o", "o+", "o-", "x+1", "O+1", "o*1", "o+01", "o+-1", "o+1 ", " o+1", "o+1.5", "p-1a", "o+18446744073709551616", "ko1", "o+Ⅳ"];
    for text in bad {
        // As the target, as a slot, as a result, as a subscribe target, in a resolve and in exit info.
        assert_illegal("malformed vref", Box::new(move |sys, _| sys.execute(&raw_send(text, &[], None))));
        assert_illegal("malformed vref", Box::new(move |sys, _| sys.execute(&raw_send("o+0", &["o+0", text], None))));
        assert_illegal("malformed vref", Box::new(move |sys, _| sys.execute(&raw_send("o+0", &[], Some(text)))));
        assert_illegal("malformed vref", Box::new(move |sys, _| sys.execute(&RawSyscall::Subscribe { promise: text.to_owned() })));
        assert_illegal(
            "malformed vref",
            Box::new(move |sys, _| sys.execute(&RawSyscall::Resolve { resolutions: vec![(text.to_owned(), false, RawData::default())] })),
        );
        assert_illegal(
            "malformed vref",
            Box::new(move |sys, _| {
                let data = RawData { body: "{\"$slot\":0}".to_owned(), slots: vec![text.to_owned()] };
                sys.execute(&RawSyscall::Resolve { resolutions: vec![("p+9".to_owned(), false, data)] })
            }),
        );
        assert_illegal(
            "malformed vref",
            Box::new(move |sys, _| {
                sys.execute(&RawSyscall::Exit { failure: false, info: RawData { body: "x".to_owned(), slots: vec![text.to_owned()] } })
            }),
        );
    }
}

#[test]
fn well_formed_vrefs_through_execute_are_legal() {
    let mut k = kernel();
    let got: Log = Rc::default();
    let got2 = Rc::clone(&got);
    let (alice, _) = add_vat(&mut k, "alice", move |sys, _| {
        let mut g = got2.borrow_mut();
        g.push(sys.execute(&raw_send("o+0", &["o+18446744073709551615", "p+7"], Some("p+8"))));
        g.push(sys.execute(&RawSyscall::Subscribe { promise: "p+8".to_owned() }));
        g.push(sys.execute(&RawSyscall::Resolve { resolutions: vec![("p+7".to_owned(), false, RawData::default())] }));
        g.push(sys.execute(&RawSyscall::VatstoreSet { key: "k".to_owned(), value: "v".to_owned() }));
        g.push(sys.execute(&RawSyscall::VatstoreGet { key: "k".to_owned() }));
        g.push(sys.execute(&RawSyscall::VatstoreNextKey { after: String::new() }));
        g.push(sys.execute(&RawSyscall::VatstoreDelete { key: "k".to_owned() }));
        Ok(())
    });
    call(&mut k, alice, "start", CapData::plain("[]"));
    assert_eq!(step(&mut k).outcome, CrankOutcome::Committed);
    assert_eq!(*got.borrow(), vec![Ok(None), Ok(None), Ok(None), Ok(None), Ok(Some("v".to_owned())), Ok(Some("k".to_owned())), Ok(None)]);
}

#[test]
fn resolving_a_promise_another_vat_decides_is_illegal() {
    // Bob gives Alice his p+1 (which he decides); Alice tries to resolve it.
    let mut k = kernel();
    let (alice, alice_seen) = add_vat(&mut k, "alice", |sys, inc| {
        if let Incoming::Message { method, args, .. } = inc {
            if method == "take" {
                let p = args.slots[0];
                sys.resolve(&[(p, false, VatData::plain("stolen"))])?;
            }
        }
        Ok(())
    });
    let (bob, _) = add_vat(&mut k, "bob", |sys, inc| {
        let alice = inc.args().as_reference().expect("alice");
        sys.send(alice, "take", &VatData::reference(v("p+1")), None)?;
        Ok(())
    });
    introduce(&mut k, bob, "start", alice);
    assert_eq!(step(&mut k).outcome, CrankOutcome::Committed);
    let report = step(&mut k);
    assert_eq!(alice_seen.borrow()[0].args().slots, vec![v("p-1")]);
    assert_aborted_illegal(&k, &report, alice, "is not the decider", None);
    let kp = kref_of(&k, bob, v("p+1")).and_then(kernel_core::KRef::as_promise).expect("Bob's promise");
    assert_eq!(k.settlement(kp).expect("settlement"), None, "Bob's promise is still his to resolve");
    assert_eq!(status(&k, bob), EndpointStatus::Live);
}

#[test]
fn resolving_the_same_promise_twice_in_one_call_is_illegal() {
    assert_illegal(
        "resolved twice in one syscall",
        Box::new(|sys, _| sys.resolve(&[(v("p+2"), false, VatData::plain("1")), (v("p+2"), true, VatData::plain("2"))]).map(|()| None)),
    );
}

#[test]
fn resolving_the_same_promise_in_two_syscalls_is_illegal() {
    // The resolver forgets the promise it resolved: naming it again is a stale vref.
    assert_illegal(
        "is stale",
        Box::new(|sys, _| {
            sys.resolve(&[(v("p+2"), false, VatData::plain("1"))])?;
            sys.resolve(&[(v("p+2"), false, VatData::plain("2"))]).map(|()| None)
        }),
    );
}

#[test]
fn resolving_a_result_again_in_a_later_delivery_is_illegal() {
    let mut k = kernel();
    let held: Rc<RefCell<Option<VRef>>> = Rc::default();
    let held2 = Rc::clone(&held);
    let (bob, _) = add_vat(&mut k, "bob", move |sys, inc| {
        if let Incoming::Message { method, result, .. } = inc {
            match method.as_str() {
                "ask" => {
                    let r = result.expect("result");
                    *held2.borrow_mut() = Some(r);
                    sys.resolve(&[(r, false, VatData::plain("first"))])?;
                }
                _ => {
                    let r = held2.borrow().expect("held");
                    sys.resolve(&[(r, false, VatData::plain("second"))])?;
                }
            }
        }
        Ok(())
    });
    let first = call(&mut k, bob, "ask", CapData::plain("[]"));
    assert_eq!(step(&mut k).outcome, CrankOutcome::Committed);
    assert_eq!(settled(&k, first), Settlement::Fulfilled(CapData::plain("first")));
    let again = call(&mut k, bob, "again", CapData::plain("[]"));
    let report = step(&mut k);
    // Bob forgot the promise when he resolved it: his old vref for it is no longer his.
    assert_aborted_illegal(&k, &report, bob, "is not in the c-list", Some(again));
    assert_eq!(settled(&k, first), Settlement::Fulfilled(CapData::plain("first")), "the first settlement stands");
}

#[test]
fn an_empty_vatstore_key_is_illegal() {
    assert_illegal("vatstore key of 0 bytes", Box::new(|sys, _| sys.vatstore_set("", b"x").map(|()| None)));
    assert_illegal("vatstore key of 0 bytes", Box::new(|sys, _| sys.vatstore_get("").map(|_| None)));
    assert_illegal("vatstore key of 0 bytes", Box::new(|sys, _| sys.vatstore_delete("").map(|()| None)));
    assert_illegal(
        "vatstore key of 0 bytes",
        Box::new(|sys, _| sys.execute(&RawSyscall::VatstoreSet { key: String::new(), value: "x".into() })),
    );
}

#[test]
fn a_vatstore_key_longer_than_max_key_len_is_illegal() {
    let long = "k".repeat(MAX_KEY_LEN + 1);
    let needle = format!("vatstore key of {} bytes", MAX_KEY_LEN + 1);
    let l = long.clone();
    assert_illegal(&needle, Box::new(move |sys, _| sys.vatstore_set(&l, b"x").map(|()| None)));
    let l = long.clone();
    assert_illegal(&needle, Box::new(move |sys, _| sys.vatstore_get(&l).map(|_| None)));
    let l = long.clone();
    assert_illegal(&needle, Box::new(move |sys, _| sys.vatstore_delete(&l).map(|()| None)));
    let l = long.clone();
    assert_illegal(&needle, Box::new(move |sys, _| sys.vatstore_next_key(&l).map(|_| None)));
    // Multi-byte characters count in bytes.
    let wide = "é".repeat(MAX_KEY_LEN / 2 + 1);
    assert_illegal("vatstore key of", Box::new(move |sys, _| sys.execute(&RawSyscall::VatstoreGet { key: wide.clone() })));
}

#[test]
fn a_vatstore_key_of_exactly_max_key_len_is_legal() {
    let mut k = kernel();
    let key = "k".repeat(MAX_KEY_LEN);
    let key2 = key.clone();
    let (alice, _) = add_vat(&mut k, "alice", move |sys, _| {
        sys.vatstore_set(&key2, b"v")?;
        assert_eq!(sys.vatstore_next_key(&key2[..1])?, Some(key2.clone()));
        Ok(())
    });
    call(&mut k, alice, "start", CapData::plain("[]"));
    assert_eq!(step(&mut k).outcome, CrankOutcome::Committed);
    assert_eq!(vatstore(&k, alice), vec![(key, "v".to_owned())]);
}

#[test]
fn a_vatstore_value_larger_than_max_value_len_is_illegal() {
    let big = vec![b'x'; MAX_VALUE_LEN + 1];
    assert_illegal("exceeds", Box::new(move |sys, _| sys.vatstore_set("k", &big).map(|()| None)));
}

#[test]
fn an_unknown_syscall_kind_is_illegal() {
    assert_illegal("unknown syscall kind", Box::new(|sys, _| sys.execute(&RawSyscall::Other { kind: "dropImports".to_owned() })));
    assert_illegal("unknown syscall kind", Box::new(|sys, _| sys.execute(&RawSyscall::Other { kind: String::new() })));
}

#[test]
fn an_object_used_as_a_result_is_illegal() {
    assert_illegal(
        "result o+1 is not a promise",
        Box::new(|sys, bob| sys.send(bob, "m", &VatData::plain("[]"), Some(v("o+1"))).map(|()| None)),
    );
    // An object the vat really holds is no better.
    assert_illegal(
        "result o-1 is not a promise",
        Box::new(|sys, bob| sys.execute(&raw_send(&bob.to_string(), &[], Some(&bob.to_string())))),
    );
}

#[test]
fn an_object_used_as_a_subscribe_target_is_illegal() {
    assert_illegal("subscribed o+0 is not a promise", Box::new(|sys, _| sys.subscribe(VRef::ROOT).map(|()| None)));
    assert_illegal("subscribed o-1 is not a promise", Box::new(|sys, bob| sys.subscribe(bob).map(|()| None)));
}

#[test]
fn an_object_used_as_a_resolve_target_is_illegal() {
    assert_illegal(
        "resolved o+0 is not a promise",
        Box::new(|sys, _| sys.resolve(&[(VRef::ROOT, false, VatData::plain("1"))]).map(|()| None)),
    );
}

// ---- the sticky verdict ----

/// What Alice saw from each syscall after her illegal one.
type Log = Rc<RefCell<Vec<Result<Option<String>, SyscallError>>>>;

/// Alice makes an illegal syscall, ignores the error, and carries on: vatstore writes, a send,
/// resolving her result, a subscribe, a legal-looking execute, a malformed one, an exit.
fn stubborn_alice(k: &mut Kernel<MemStore>, illegal: RawSyscall) -> (EndpointId, Log) {
    let log: Log = Rc::default();
    let log2 = Rc::clone(&log);
    let (alice, _) = add_vat(k, "alice", move |sys, inc| {
        let bob = inc.args().as_reference().expect("bob");
        sys.vatstore_set("before", b"1")?;
        let first = sys.execute(&illegal);
        assert!(matches!(first, Err(SyscallError::Illegal(_))), "setup: {illegal:?} should be illegal, got {first:?}");
        assert!(sys.is_finished());
        let mut l = log2.borrow_mut();
        l.push(sys.vatstore_set("after", b"2").map(|()| None));
        l.push(sys.vatstore_get("before").map(|_| None));
        l.push(sys.send(bob, "hello", &VatData::plain("[]"), None).map(|()| None));
        l.push(sys.resolve(&[(inc.result().expect("result"), false, VatData::plain("fine"))]).map(|()| None));
        l.push(sys.subscribe(v("p+5")).map(|()| None));
        l.push(sys.execute(&RawSyscall::VatstoreSet { key: "again".into(), value: "3".into() }));
        l.push(sys.execute(&raw_send("o+0", &[], None)));
        l.push(sys.execute(&RawSyscall::Other { kind: "oops".into() }));
        l.push(sys.execute(&raw_send("garbage", &[], None)));
        l.push(sys.vatstore_set("", b"bad key").map(|()| None));
        l.push(sys.exit(false, &VatData::plain("bye")).map(|()| None));
        Ok(()) // and it claims success
    });
    (alice, log)
}

#[test]
fn a_vat_that_ignores_an_illegal_syscall_keeps_nothing_of_its_delivery() {
    for illegal in [raw_send("o-42", &[], None), RawSyscall::Other { kind: "teleport".into() }, raw_send("not a vref", &[], None)] {
        let mut k = kernel();
        let (bob, bob_seen) = add_idle_vat(&mut k, "bob");
        let (alice, log) = stubborn_alice(&mut k, illegal.clone());
        let result = introduce(&mut k, alice, "start", bob);
        let report = step(&mut k);
        assert!(matches!(report.outcome, CrankOutcome::Aborted { endpoint, .. } if endpoint == alice), "{illegal:?}: {report:?}");
        assert_aborted_illegal(&k, &report, alice, "", Some(result));
        for (i, r) in log.borrow().iter().enumerate() {
            assert_eq!(*r, Err(SyscallError::Terminated), "{illegal:?}: syscall #{i} after the illegal one must not be honoured");
        }
        assert_eq!(report.flushed, 0);
        assert!(vatstore(&k, alice).is_empty(), "{illegal:?}: no vatstore write survives");
        assert!(run(&mut k).is_empty(), "{illegal:?}: no send survives");
        assert!(bob_seen.borrow().is_empty());
        match settled(&k, result) {
            Settlement::Rejected(d) => assert!(String::from_utf8_lossy(&d.body).contains("illegal syscall")),
            s => panic!("{illegal:?}: Alice's resolve of her result must not survive: {s:?}"),
        }
    }
}

#[test]
fn after_exit_no_syscall_is_honoured_and_nothing_can_turn_the_exit_into_an_abort() {
    let mut k = kernel();
    let log: Log = Rc::default();
    let log2 = Rc::clone(&log);
    let (alice, _) = add_vat(&mut k, "alice", move |sys, _| {
        sys.vatstore_set("before", b"1")?;
        sys.exit(false, &VatData::plain("done"))?;
        let mut l = log2.borrow_mut();
        l.push(sys.vatstore_set("after", b"2").map(|()| None));
        l.push(sys.execute(&RawSyscall::Other { kind: "oops".into() }));
        l.push(sys.execute(&raw_send("garbage", &[], None)));
        l.push(sys.execute(&raw_send("o-9", &[], None)));
        l.push(sys.vatstore_get("").map(|_| None));
        Ok(())
    });
    let result = call(&mut k, alice, "start", CapData::plain("[]"));
    let report = step(&mut k);
    assert_eq!(report.outcome, CrankOutcome::Exited { endpoint: alice, failure: false });
    for (i, r) in log.borrow().iter().enumerate() {
        assert_eq!(*r, Err(SyscallError::Terminated), "syscall #{i} after exit");
    }
    assert_eq!(vatstore(&k, alice), vec![("before".to_owned(), "1".to_owned())], "writes before exit commit, later ones do not");
    assert!(matches!(status(&k, alice), EndpointStatus::Terminated { reason } if reason == "exited"));
    assert!(settled(&k, result).is_rejected(), "the unresolved result of an exiting vat is rejected");
}
