//! Translation through the c-list, both ways, and result promises following their decider.

mod common;

use common::*;
use kernel_core::{Allocator, CapData, CrankOutcome, KRef, PromiseState, RefKind, Settlement, SyscallError, VRef};
use kernel_syscall::VatData;
use std::cell::RefCell;
use std::rc::Rc;

type SyscallResult = Result<(), SyscallError>;

/// Alice is told Bob's root by the host, then sends `deliver` to it with `slots` (and `result`),
/// in her first delivery. Returns (kernel, alice, bob, what Bob saw).
fn alice_sends_to_bob(
    slots: &[&str],
    result: Option<&str>,
) -> (kernel_core::Kernel<kernel_core::MemStore>, kernel_core::EndpointId, kernel_core::EndpointId, Seen) {
    let mut k = kernel();
    let slots: Vec<VRef> = slots.iter().map(|s| v(s)).collect();
    let result = result.map(v);
    let (alice, _) = add_vat(&mut k, "alice", move |sys, inc| {
        if let Some(bob) = inc.args().as_reference() {
            sys.send(bob, "deliver", &VatData { body: b"[]".to_vec(), slots: slots.clone() }, result)?;
        }
        Ok(())
    });
    let (bob, bob_seen) = add_idle_vat(&mut k, "bob");
    let bob_root = root(&k, bob);
    call(&mut k, alice, "start", CapData::reference(bob_root));
    let reports = run(&mut k);
    assert!(reports.iter().all(|r| r.outcome == CrankOutcome::Committed), "{reports:?}");
    (k, alice, bob, bob_seen)
}

#[test]
fn first_export_of_an_object_allocates_a_kernel_object_owned_by_the_exporter() {
    let (k, alice, bob, seen) = alice_sends_to_bob(&["o+5"], None);
    let ko = kref_of(&k, alice, v("o+5")).expect("o+5 is in Alice's c-list after its first export");
    let KRef::Object(o) = ko else { panic!("o+5 must map to a kernel object, got {ko}") };
    assert_eq!(k.object(o).expect("object").map(|r| r.owner), Some(alice));
    // Bob imports it as his first imported object.
    assert_eq!(seen.borrow()[0].args().slots, vec![v("o-1")]);
    assert_eq!(kref_of(&k, bob, v("o-1")), Some(ko));
}

#[test]
fn first_export_of_a_promise_allocates_a_kernel_promise_decided_by_the_exporter() {
    let (k, alice, bob, seen) = alice_sends_to_bob(&["p+3"], None);
    let kp = kref_of(&k, alice, v("p+3")).expect("p+3 is in Alice's c-list after its first export");
    let KRef::Promise(p) = kp else { panic!("p+3 must map to a kernel promise, got {kp}") };
    match k.promise(p).expect("promise") {
        Some(PromiseState::Unresolved { decider, .. }) => assert_eq!(decider, Some(alice)),
        other => panic!("expected an unresolved promise decided by Alice, got {other:?}"),
    }
    assert_eq!(seen.borrow()[0].args().slots, vec![v("p-1")]);
    assert_eq!(kref_of(&k, bob, v("p-1")), Some(kp));
}

#[test]
fn a_second_export_of_the_same_vref_reuses_its_kernel_ref() {
    let (k, alice, _, _) = alice_sends_to_bob(&["o+1", "o+1", "p+1", "p+1"], None);
    let objects = k.objects().expect("objects").len();
    let promises = k.promises().expect("promises").len();
    // Two roots, one export; one promise for the host's call and one export.
    assert_eq!((objects, promises), (3, 2));
    let entries = k.clist(alice).expect("clist");
    assert_eq!(entries.iter().filter(|(_, r)| *r == v("o+1")).count(), 1);
    assert_eq!(entries.iter().filter(|(_, r)| *r == v("p+1")).count(), 1);
}

#[test]
fn imports_are_numbered_in_order_per_kind() {
    let (k, _, bob, seen) = alice_sends_to_bob(&["o+3", "p+2", "o+7", "o+9", "p+4"], Some("p+8"));
    let seen = seen.borrow();
    let Incoming::Message { target, args, result, .. } = &seen[0] else { panic!("expected a message") };
    assert_eq!(*target, VRef::ROOT);
    assert_eq!(args.slots, ["o-1", "p-1", "o-2", "o-3", "p-2"].map(v).to_vec());
    assert_eq!(*result, Some(v("p-3")), "the result is imported after the arguments");
    for vref in args.slots.iter().chain(result) {
        assert_eq!(vref.allocator, Allocator::Kernel);
        let kref = kref_of(&k, bob, *vref).expect("in Bob's c-list");
        assert_eq!(kref.as_promise().is_some(), vref.kind == RefKind::Promise, "{vref} <-> {kref} kinds agree");
    }
}

#[test]
fn the_same_kref_always_maps_to_the_same_vref_both_ways() {
    let mut k = kernel();
    // Alice sends her o+1 to Bob three times (twice in one message); Bob sends it back to Alice.
    let (alice, alice_seen) = add_vat(&mut k, "alice", |sys, inc| {
        if let Incoming::Message { method, args, .. } = inc {
            if method == "start" {
                let bob = args.as_reference().expect("bob");
                let twice = VatData { body: b"[]".to_vec(), slots: vec![v("o+1"), v("o+1")] };
                sys.send(bob, "take", &twice, None)?;
                sys.send(bob, "take", &VatData::reference(v("o+1")), None)?;
                sys.send(bob, "giveBack", &VatData::reference(VRef::ROOT), None)?;
            }
        }
        Ok(())
    });
    let stash: Rc<RefCell<Vec<VRef>>> = Rc::default();
    let bob_stash = Rc::clone(&stash);
    let (bob, bob_seen) = add_vat(&mut k, "bob", move |sys, inc| {
        if let Incoming::Message { method, args, .. } = inc {
            match method.as_str() {
                "take" => bob_stash.borrow_mut().extend(args.slots.iter().copied()),
                "giveBack" => {
                    let alice = args.as_reference().expect("alice");
                    let held = bob_stash.borrow().clone();
                    sys.send(alice, "back", &VatData { body: b"[]".to_vec(), slots: held }, None)?;
                }
                _ => {}
            }
        }
        Ok(())
    });
    introduce(&mut k, alice, "start", bob);
    run(&mut k);
    assert_eq!(*stash.borrow(), vec![v("o-1"); 3], "Bob sees one import for one kref");
    let back = alice_seen.borrow().iter().find_map(|i| match i {
        Incoming::Message { method, args, .. } if method == "back" => Some(args.slots.clone()),
        _ => None,
    });
    assert_eq!(back, Some(vec![v("o+1"); 3]), "Alice's own export comes back as her own vref");
    let ko = kref_of(&k, alice, v("o+1")).expect("exported");
    assert_eq!(vref_of(&k, bob, ko), Some(v("o-1")));
    assert_eq!(bob_seen.borrow().len(), 3);
}

#[test]
fn the_receiver_of_a_message_with_a_result_decides_it() {
    let mut k = kernel();
    let (bob, bob_seen) = add_vat(&mut k, "bob", |sys, inc| {
        if let Some(r) = inc.result() {
            sys.resolve(&[(r, false, VatData::plain("42"))])?;
        }
        Ok(())
    });
    let (alice, alice_seen) = add_vat(&mut k, "alice", |sys, inc| {
        if let Incoming::Message { args, .. } = inc {
            let bob = args.as_reference().expect("bob");
            sys.send(bob, "ask", &VatData::plain("[]"), Some(v("p+1")))?;
            sys.subscribe(v("p+1"))?;
        }
        Ok(())
    });
    introduce(&mut k, alice, "start", bob);
    step(&mut k); // Alice sends
    let kp = kref_of(&k, alice, v("p+1")).and_then(KRef::as_promise).expect("p+1 exported");
    assert_eq!(k.promise(kp).expect("promise").and_then(|p| p.decider()), None, "the kernel decides a result in flight");
    // The host pins what it wants to inspect once everyone is done with it.
    k.set_pinned(kp.into(), true).expect("pin");
    let reports = run(&mut k); // Bob's delivery (his resolve is legal: he decides it), Alice's notify
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert!(reports.iter().all(|r| r.outcome == CrankOutcome::Committed), "{reports:?}");
    assert_eq!(bob_seen.borrow()[0].result(), Some(v("p-1")));
    assert_eq!(settled(&k, kp), Settlement::Fulfilled(CapData::plain("42")));
    let notified = alice_seen.borrow().iter().find_map(|i| match i {
        Incoming::Notify(rs) => Some(rs.clone()),
        _ => None,
    });
    let rs = notified.expect("Alice was notified");
    assert_eq!((rs[0].promise, rs[0].rejected, rs[0].data.clone()), (v("p+1"), false, VatData::plain("42")));
    assert_eq!(kref_of(&k, alice, v("p+1")), None, "Alice forgets a promise she was notified of");
}

#[test]
fn the_receiver_decides_the_result_while_it_holds_it() {
    let mut k = kernel();
    let (bob, _) = add_idle_vat(&mut k, "bob");
    let kp = call(&mut k, bob, "ask", CapData::plain("[]"));
    assert_eq!(k.promise(kp).expect("promise").and_then(|p| p.decider()), None);
    step(&mut k);
    assert_eq!(k.promise(kp).expect("promise").and_then(|p| p.decider()), Some(bob));
    assert_eq!(vref_of(&k, bob, KRef::Promise(kp)), Some(v("p-1")));
}

#[test]
fn the_sender_cannot_resolve_a_promise_it_used_as_a_result_in_the_same_delivery() {
    let mut k = kernel();
    let (bob, _) = add_idle_vat(&mut k, "bob");
    let got: Rc<RefCell<Option<SyscallResult>>> = Rc::default();
    let got2 = Rc::clone(&got);
    let (alice, _) = add_vat(&mut k, "alice", move |sys, inc| {
        let bob = inc.args().as_reference().expect("bob");
        sys.send(bob, "ask", &VatData::plain("[]"), Some(v("p+1")))?;
        *got2.borrow_mut() = Some(sys.resolve(&[(v("p+1"), false, VatData::plain("mine"))]));
        Ok(())
    });
    let result = introduce(&mut k, alice, "start", bob);
    let report = step(&mut k);
    assert!(matches!(*got.borrow(), Some(Err(SyscallError::Illegal(_)))), "{:?}", got.borrow());
    assert_aborted_illegal(&k, &report, alice, "is not the decider", Some(result));
    assert!(run(&mut k).is_empty(), "Alice's send to Bob did not survive");
}

#[test]
fn the_sender_cannot_resolve_a_promise_it_used_as_a_result_in_a_later_delivery() {
    let mut k = kernel();
    let (bob, _) = add_idle_vat(&mut k, "bob");
    let (alice, _) = add_vat(&mut k, "alice", move |sys, inc| {
        if let Incoming::Message { method, args, .. } = inc {
            match method.as_str() {
                "start" => sys.send(args.as_reference().expect("bob"), "ask", &VatData::plain("[]"), Some(v("p+1")))?,
                _ => sys.resolve(&[(v("p+1"), false, VatData::plain("mine"))])?,
            }
        }
        Ok(())
    });
    introduce(&mut k, alice, "start", bob);
    run(&mut k);
    let kp = kref_of(&k, alice, v("p+1")).and_then(KRef::as_promise).expect("p+1");
    assert_eq!(k.promise(kp).expect("promise").and_then(|p| p.decider()), Some(bob), "Bob holds it unresolved");
    let again = call(&mut k, alice, "resolveIt", CapData::plain("[]"));
    let report = step(&mut k);
    assert_aborted_illegal(&k, &report, alice, "is not the decider", Some(again));
    assert_eq!(k.settlement(kp).expect("settlement"), None, "Bob's promise is untouched");
    assert_eq!(status(&k, bob), kernel_core::EndpointStatus::Live);
}

#[test]
fn a_promise_cannot_be_the_result_of_two_sends() {
    let mut k = kernel();
    let (bob, _) = add_idle_vat(&mut k, "bob");
    let (alice, _) = add_vat(&mut k, "alice", move |sys, inc| {
        let bob = inc.args().as_reference().expect("bob");
        sys.send(bob, "one", &VatData::plain("[]"), Some(v("p+1")))?;
        sys.send(bob, "two", &VatData::plain("[]"), Some(v("p+1")))?;
        Ok(())
    });
    let result = introduce(&mut k, alice, "start", bob);
    let report = step(&mut k);
    assert_aborted_illegal(&k, &report, alice, "is not an unresolved promise decided by", Some(result));
}

#[test]
fn a_result_that_comes_back_to_its_allocator_is_decided_by_it_again() {
    let mut k = kernel();
    // Alice sends to her own root with result p+1 and watches it: the delivery gives her p+1
    // back to decide, and her resolution reaches her own subscription.
    let (alice, seen) = add_vat(&mut k, "alice", move |sys, inc| {
        if let Incoming::Message { method, result, .. } = inc {
            match method.as_str() {
                "start" => {
                    sys.send(VRef::ROOT, "self", &VatData::plain("[]"), Some(v("p+1")))?;
                    sys.subscribe(v("p+1"))?;
                }
                _ => sys.resolve(&[(result.expect("result"), false, VatData::plain("done"))])?,
            }
        }
        Ok(())
    });
    call(&mut k, alice, "start", CapData::plain("[]"));
    let reports = run(&mut k);
    assert!(reports.iter().all(|r| r.outcome == CrankOutcome::Committed), "{reports:?}");
    assert_eq!(seen.borrow()[1].result(), Some(v("p+1")));
    let Incoming::Notify(resolutions) = &seen.borrow()[2] else { panic!("expected the notify of p+1") };
    assert_eq!((resolutions[0].promise, resolutions[0].rejected, resolutions[0].data.clone()), (v("p+1"), false, VatData::plain("done")));
    // Resolved and notified, p+1 is forgotten; naming it again is a stale ref.
    assert_eq!(kref_of(&k, alice, v("p+1")), None);
}
