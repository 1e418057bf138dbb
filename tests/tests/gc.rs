//! Garbage collection across vats (DESIGN §6, §10.7): reference counts, the GC deliveries,
//! the GC syscalls, and tables that end holding only pinned roots.

use kernel_core::{CapData, CrankInput, CrankOutcome, EndpointId, KRef, Kernel, MemStore, Settlement, VRef};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};

/// A vat that makes objects, holds references in its vatstore (`held/<vref>`), hands them on,
/// and drops what it no longer holds at `bringOutYourDead`.
struct Holder;

fn arg(args: &VatData, i: usize) -> Result<VRef, VatError> {
    args.slots.get(i).copied().ok_or_else(|| VatError::new(format!("missing reference argument {i}")))
}

impl Behavior for Holder {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        match method {
            "make" => {
                let o = cx.export()?;
                Ok(Answer::Value(VatData::reference(o)))
            }
            "hold" => {
                let r = arg(&args, 0)?;
                cx.set(&format!("held/{r}"), "1")?;
                Ok(Answer::Value(VatData::plain("null")))
            }
            "drop" => {
                let r = arg(&args, 0)?;
                cx.syscall().vatstore_delete(&format!("held/{r}"))?;
                Ok(Answer::Value(VatData::plain("null")))
            }
            "give" => {
                // give(to, thing): send to.hold(thing), without a result.
                let (to, thing) = (arg(&args, 0)?, arg(&args, 1)?);
                cx.send_only(to, "hold", VatData { body: br#"[{"$slot":0}]"#.to_vec(), slots: vec![thing] })?;
                Ok(Answer::Value(VatData::plain("null")))
            }
            "ping" => Ok(Answer::Value(VatData::plain(format!("\"pong from {target}\"")))),
            other => Err(VatError::new(format!("no method {other}"))),
        }
    }

    fn live_imports(&mut self, cx: &mut Cx<'_, '_, '_>, held: &[VRef]) -> Result<Option<Vec<VRef>>, VatError> {
        let mut live = Vec::new();
        for v in held {
            if cx.get(&format!("held/{v}"))?.is_some() {
                live.push(*v);
            }
        }
        Ok(Some(live))
    }

    fn forget(&mut self, cx: &mut Cx<'_, '_, '_>, export: VRef) -> Result<(), VatError> {
        cx.set(&format!("forgotten/{export}"), "1")
    }
}

struct World {
    k: Kernel<MemStore>,
    vats: Vec<EndpointId>,
}

impl World {
    fn new(n: usize) -> Self {
        let mut k = Kernel::open(MemStore::new()).expect("open");
        let vats = (0..n).map(|i| k.add_endpoint(&format!("v{i}"), VatEndpoint::boxed(HelperVat::new(Holder))).expect("add")).collect();
        World { k, vats }
    }

    fn root(&self, i: usize) -> KRef {
        self.k.root(self.vats[i]).expect("root").into()
    }

    /// Call `method` on `target` from the host, run to quiescence, return the settlement and
    /// unpin the result (the host is done with it).
    fn call(&mut self, target: KRef, method: &str, args: CapData) -> Settlement {
        let kp = self.k.queue_message(target, method, args).expect("queue");
        let summary = self.k.run(Some(10_000)).expect("run");
        assert!(summary.quiescent);
        let s = self.k.settlement(kp).expect("settlement").expect("settled");
        // Pin what the answer carries before letting go of the answer itself.
        for r in &s.data().slots {
            self.k.set_pinned(*r, true).expect("pin");
        }
        self.k.set_pinned(kp.into(), false).expect("unpin");
        self.k.run(Some(10_000)).expect("run");
        s
    }

    /// The host holds (pins) or lets go of (unpins) `r`.
    fn hold(&mut self, r: KRef, held: bool) {
        self.k.set_pinned(r, held).expect("pin");
        self.k.run(Some(10_000)).expect("run");
    }

    fn reap_all(&mut self) {
        for ep in self.vats.clone() {
            self.k.reap(ep).expect("reap");
        }
        assert!(self.k.run(Some(10_000)).expect("run").quiescent);
    }

    /// Every object and promise left, and every c-list entry that is not a root.
    fn leftovers(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let objects =
            self.k.objects().expect("objects").into_iter().filter(|(_, r)| !r.pinned).map(|(o, r)| format!("{o} {r:?}")).collect();
        let promises = self.k.promise_records().expect("promises").into_iter().map(|(p, r)| format!("{p} {r:?}")).collect();
        let mut entries = Vec::new();
        for ep in &self.vats {
            for (kref, vref) in self.k.clist(*ep).expect("clist") {
                if vref != VRef::ROOT {
                    entries.push(format!("{ep}: {kref} {vref}"));
                }
            }
        }
        (objects, promises, entries)
    }
}

fn one_ref(r: KRef) -> CapData {
    CapData { body: br#"[{"$slot":0}]"#.to_vec(), slots: vec![r] }
}

fn two_refs(a: KRef, b: KRef) -> CapData {
    CapData { body: br#"[{"$slot":0},{"$slot":1}]"#.to_vec(), slots: vec![a, b] }
}

fn reference(s: Settlement) -> KRef {
    match s {
        Settlement::Fulfilled(d) => d.as_reference().expect("a reference"),
        other => panic!("expected a reference, got {other:?}"),
    }
}

#[test]
fn settled_promises_nobody_refers_to_are_deleted() {
    let mut w = World::new(2);
    let bob = w.root(1);
    for _ in 0..5 {
        w.call(bob, "ping", CapData::plain("[]"));
    }
    let (objects, promises, entries) = w.leftovers();
    assert!(objects.is_empty() && promises.is_empty() && entries.is_empty(), "{objects:?} {promises:?} {entries:?}");
}

#[test]
fn an_import_dropped_at_bring_out_your_dead_makes_the_exporter_drop_and_retire_it() {
    let mut w = World::new(2);
    let (alice, bob) = (w.root(0), w.root(1));
    // The host pins what it holds (`call` pins the references in an answer); once it lets go,
    // only Bob's hold keeps the object.
    let thing = reference(w.call(alice, "make", CapData::plain("[]")));
    w.call(alice, "give", two_refs(bob, thing));
    w.hold(thing, false);
    let ko = thing.as_object().expect("object");
    let rec = w.k.object(ko).expect("read").expect("Bob holds it, so it exists");
    assert_eq!((rec.reachable, rec.recognizable), (1, 1), "Bob's c-list entry is its only reference");

    w.call(bob, "drop", one_ref(thing));
    w.reap_all();
    assert_eq!(w.k.object(ko).expect("read"), None, "the object was retired");
    let forgotten = w.k.vatstore(w.vats[0]).expect("vatstore").iter().any(|(k, _)| k.starts_with(b"forgotten/o+"));
    assert!(forgotten, "Alice was told retireExports");
    let (objects, promises, entries) = w.leftovers();
    assert!(objects.is_empty() && promises.is_empty() && entries.is_empty(), "{objects:?} {promises:?} {entries:?}");
}

#[test]
fn an_object_still_held_by_one_importer_is_not_collected_when_another_drops_it() {
    let mut w = World::new(3);
    let (alice, bob, carol) = (w.root(0), w.root(1), w.root(2));
    let thing = reference(w.call(alice, "make", CapData::plain("[]")));
    w.call(alice, "give", two_refs(bob, thing));
    w.call(alice, "give", two_refs(carol, thing));
    w.hold(thing, false);
    w.call(bob, "drop", one_ref(thing));
    w.reap_all();
    let ko = thing.as_object().expect("object");
    let rec = w.k.object(ko).expect("read").expect("Carol still holds it");
    assert_eq!((rec.reachable, rec.recognizable), (1, 1));
    // Carol can still use it: a message through her reaches Alice's object.
    let answer = w.call(thing, "ping", CapData::plain("[]"));
    assert!(matches!(answer, Settlement::Fulfilled(_)), "{answer:?}");
    w.call(carol, "drop", one_ref(thing));
    w.reap_all();
    assert_eq!(w.k.object(ko).expect("read"), None);
}

#[test]
fn a_terminated_vats_imports_are_released_and_its_exports_abandoned() {
    let mut w = World::new(2);
    let (alice, bob) = (w.root(0), w.root(1));
    let alices = reference(w.call(alice, "make", CapData::plain("[]")));
    let bobs = reference(w.call(bob, "make", CapData::plain("[]")));
    w.call(alice, "give", two_refs(bob, alices));
    w.call(bob, "give", two_refs(alice, bobs));
    w.hold(alices, false);
    w.hold(bobs, false);
    // Bob dies (an unknown method is a vat error): Alice's object loses its only importer.
    let s = w.call(bob, "explode", CapData::plain("[]"));
    assert!(s.is_rejected());
    assert_eq!(w.k.object(alices.as_object().expect("object")).expect("read"), None, "released by Bob's termination");
    // Bob's export is abandoned: messages to it are rejected; Alice still recognises it until
    // she drops it, and then it goes.
    let s = w.call(bobs, "ping", CapData::plain("[]"));
    assert!(s.is_rejected(), "{s:?}");
    w.call(alice, "drop", one_ref(bobs));
    w.reap_all();
    assert_eq!(w.k.object(bobs.as_object().expect("object")).expect("read"), None);
    let (objects, promises, entries) = w.leftovers();
    assert!(objects.is_empty() && promises.is_empty() && entries.is_empty(), "{objects:?} {promises:?} {entries:?}");
}

#[test]
fn gc_deliveries_are_cranks_that_roll_back_with_a_fault() {
    /// A vat that fails whenever it is told to forget an export.
    struct Touchy;
    impl Behavior for Touchy {
        fn call(&mut self, cx: &mut Cx<'_, '_, '_>, t: VRef, m: &str, a: VatData) -> Result<Answer, VatError> {
            Holder.call(cx, t, m, a)
        }
        fn forget(&mut self, cx: &mut Cx<'_, '_, '_>, _: VRef) -> Result<(), VatError> {
            cx.set("tried", "1")?;
            Err(VatError::new("cannot forget"))
        }
    }
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let touchy = k.add_endpoint("touchy", VatEndpoint::boxed(HelperVat::new(Touchy))).expect("add");
    let holder = k.add_endpoint("holder", VatEndpoint::boxed(HelperVat::new(Holder))).expect("add");
    let mut w = World { k, vats: vec![touchy, holder] };
    let (t, h) = (w.root(0), w.root(1));
    let thing = reference(w.call(t, "make", CapData::plain("[]")));
    w.call(t, "give", two_refs(h, thing));
    w.hold(thing, false);
    w.call(h, "drop", one_ref(thing));
    for ep in w.vats.clone() {
        w.k.reap(ep).expect("reap");
    }
    let mut saw_abort = false;
    while let Some(report) = w.k.step().expect("step") {
        if let (CrankInput::Gc { action: "retireExports", .. }, CrankOutcome::Aborted { endpoint, .. }) = (&report.input, &report.outcome) {
            assert_eq!(*endpoint, touchy);
            saw_abort = true;
        }
    }
    assert!(saw_abort, "the retireExports crank aborted");
    assert!(!w.k.vatstore(touchy).expect("vatstore").iter().any(|(k, _)| k == b"tried"), "its vatstore write rolled back");
    assert!(matches!(w.k.endpoint(touchy).expect("read").map(|e| e.status), Some(kernel_core::EndpointStatus::Terminated { .. })));
}

#[test]
fn dropping_what_a_vat_does_not_hold_is_illegal() {
    /// Drops Bob's root, which it was never given, on `bad`.
    struct Forger;
    impl Behavior for Forger {
        fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _: VRef, m: &str, _: VatData) -> Result<Answer, VatError> {
            match m {
                "bad" => cx.syscall().drop_imports(&[VRef::import(1)])?,
                _ => cx.syscall().retire_exports(&[VRef::ROOT])?,
            }
            Ok(Answer::Value(VatData::plain("null")))
        }
    }
    for method in ["bad", "retireRoot"] {
        let mut k = Kernel::open(MemStore::new()).expect("open");
        let f = k.add_endpoint("forger", VatEndpoint::boxed(HelperVat::new(Forger))).expect("add");
        let root = k.root(f).expect("root");
        k.queue_message(root.into(), method, CapData::plain("[]")).expect("queue");
        let report = k.step().expect("step").expect("a crank");
        match report.outcome {
            CrankOutcome::Aborted { fault: kernel_core::Fault::IllegalSyscall(_), .. } => {}
            other => panic!("{method}: expected an illegal syscall, got {other:?}"),
        }
    }
}

#[test]
fn vat_roots_are_never_collected() {
    let mut w = World::new(2);
    let bob = w.root(1);
    w.call(w.root(0), "give", two_refs(bob, bob));
    w.call(bob, "drop", one_ref(bob));
    w.reap_all();
    for i in 0..2 {
        let ko = w.root(i).as_object().expect("root object");
        assert!(w.k.object(ko).expect("read").is_some_and(|r| r.pinned));
    }
    let answer = w.call(bob, "ping", CapData::plain("[]"));
    assert!(matches!(answer, Settlement::Fulfilled(_)));
}
