//! Garbage-collection corner cases found while fuzzing and property-testing GC, each pinned by
//! a minimal scenario: GC deliveries must not change c-list flags or entries as a side effect,
//! a dropExports must not reach an exporter that abandoned the export, and a vat may not bring
//! back an import it dropped (it could otherwise resurrect an object the kernel retired).

use kernel_core::{CapData, CrankOutcome, EndpointId, Fault, KRef, Kernel, MemStore, Settlement, VRef};
use kernel_syscall::{Resolution, Syscall, Vat, VatData, VatEndpoint, VatError};
use std::cell::RefCell;
use std::rc::Rc;

type Log = Rc<RefCell<Vec<String>>>;

/// A vat driven by method names: `make` exports a new object (answered as a reference), `hold`
/// keeps its argument, `give(to)` sends `to.hold(held)`, `dropOnly`/`retire` make the GC
/// syscall on its argument, `abandonFirst` abandons `o+1`. It logs every GC delivery, and retires exports it is told to
/// drop if `retire_on_drop`.
struct Scripted {
    name: &'static str,
    log: Log,
    next: u64,
    held: Option<VRef>,
    retire_on_drop: bool,
    /// The first time it is told to retire exports, send them to itself (`o+0.hold(export)`)
    /// during that delivery.
    resend_on_retire: bool,
}

impl Scripted {
    fn boxed(name: &'static str, log: &Log, retire_on_drop: bool) -> Box<dyn kernel_core::Endpoint> {
        VatEndpoint::boxed(Scripted { name, log: Rc::clone(log), next: 1, held: None, retire_on_drop, resend_on_retire: false })
    }
}

impl Vat for Scripted {
    fn deliver(&mut self, _: VRef, method: &str, args: VatData, result: Option<VRef>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let answer = match method {
            "make" => {
                let o = VRef::export(self.next);
                self.next += 1;
                VatData::reference(o)
            }
            "hold" => {
                self.held = args.slots.first().copied();
                VatData::plain("null")
            }
            "give" => {
                let (to, thing) = (args.slots[0], self.held.expect("holds something"));
                sys.send(to, "hold", &VatData { body: b"[{\"$slot\":0}]".to_vec(), slots: vec![thing] }, None)?;
                VatData::plain("null")
            }
            "dropOnly" => {
                sys.drop_imports(&args.slots)?;
                VatData::plain("null")
            }
            "retire" => {
                sys.retire_imports(&args.slots)?;
                VatData::plain("null")
            }
            "abandonFirst" => {
                sys.abandon_exports(&[VRef::export(1)])?;
                VatData::plain("null")
            }
            other => return Err(VatError::new(format!("no method {other}"))),
        };
        if let Some(r) = result {
            sys.resolve(&[(r, false, answer)])?;
        }
        Ok(())
    }

    fn notify(&mut self, _: Vec<Resolution>, _: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        Ok(())
    }

    fn drop_exports(&mut self, exports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.log.borrow_mut().push(format!("{} dropExports {exports:?}", self.name));
        if self.retire_on_drop {
            sys.retire_exports(exports)?;
        }
        Ok(())
    }

    fn retire_exports(&mut self, exports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.log.borrow_mut().push(format!("{} retireExports {exports:?}", self.name));
        if std::mem::take(&mut self.resend_on_retire) {
            for e in exports {
                sys.send(VRef::ROOT, "hold", &VatData { body: b"[{\"$slot\":0}]".to_vec(), slots: vec![*e] }, None)?;
            }
        }
        Ok(())
    }

    fn retire_imports(&mut self, imports: &[VRef], _: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.log.borrow_mut().push(format!("{} retireImports {imports:?}", self.name));
        Ok(())
    }
}

fn args(slots: &[KRef]) -> CapData {
    CapData { body: b"[]".to_vec(), slots: slots.to_vec() }
}

struct World {
    k: Kernel<MemStore>,
    log: Log,
}

impl World {
    fn new(vats: &[(&'static str, bool)]) -> (Self, Vec<EndpointId>) {
        let log: Log = Rc::default();
        let mut k = Kernel::open(MemStore::new()).expect("open");
        let eps = vats.iter().map(|(name, retire)| k.add_endpoint(name, Scripted::boxed(name, &log, *retire)).expect("add")).collect();
        (World { k, log }, eps)
    }

    fn root(&self, ep: EndpointId) -> KRef {
        self.k.root(ep).expect("root").into()
    }

    /// Queue a call and unpin its result at once (nobody reads it).
    fn queue(&mut self, target: KRef, method: &str, slots: &[KRef]) {
        let kp = self.k.queue_message(target, method, args(slots)).expect("queue");
        self.k.set_pinned(kp.into(), false).expect("unpin");
    }

    fn run(&mut self) -> Vec<kernel_core::CrankReport> {
        let mut reports = Vec::new();
        while let Some(r) = self.k.step().expect("step") {
            reports.push(r);
        }
        reports
    }

    /// Exporter `e` makes an object and gives it to `i`; the host keeps no hold on it.
    fn export_to(&mut self, e: EndpointId, i: EndpointId) -> KRef {
        let kp = self.k.queue_message(self.root(e), "make", args(&[])).expect("queue");
        self.run();
        let thing = match self.k.settlement(kp).expect("read") {
            Some(Settlement::Fulfilled(d)) => d.as_reference().expect("a reference"),
            other => panic!("make answered {other:?}"),
        };
        self.k.set_pinned(thing, true).expect("pin");
        self.k.set_pinned(kp.into(), false).expect("unpin");
        self.queue(self.root(i), "hold", &[thing]);
        self.run();
        self.k.set_pinned(thing, false).expect("unpin");
        self.run();
        thing
    }

    fn check(&self) {
        let problems = tests::check_tables(&self.k);
        assert!(problems.is_empty(), "inconsistent tables:\n  {}", problems.join("\n  "));
    }
}

/// An importer drops (without retiring) and, in a later crank, retires: the exporter is told
/// `dropExports` once, then `retireExports` — the dropExports delivery itself must not make the
/// export look undropped again.
#[test]
fn an_exporter_is_told_drop_exports_once() {
    let (mut w, eps) = World::new(&[("exporter", false), ("importer", false)]);
    let (e, i) = (eps[0], eps[1]);
    let thing = w.export_to(e, i);
    w.queue(w.root(i), "dropOnly", &[thing]);
    w.run();
    w.queue(w.root(i), "retire", &[thing]);
    w.run();
    w.check();
    let drops = w.log.borrow().iter().filter(|l| l.starts_with("exporter dropExports")).count();
    assert_eq!(drops, 1, "{:?}", w.log.borrow());
    assert!(w.log.borrow().iter().any(|l| l.starts_with("exporter retireExports")), "{:?}", w.log.borrow());
    assert_eq!(w.k.object(thing.as_object().expect("object")).expect("read"), None);
}

/// The exporter abandons an export after the kernel queued `dropExports` for it: the drop no
/// longer applies, and the exporter never gets an import of its own object.
#[test]
fn drop_exports_does_not_reach_an_exporter_that_abandoned_the_export() {
    let (mut w, eps) = World::new(&[("exporter", false), ("importer", false)]);
    let (e, i) = (eps[0], eps[1]);
    let thing = w.export_to(e, i);
    // The importer's drop queues dropExports behind the exporter's abandon (whose message must
    // not carry the object: that would keep it reachable until the abandon is delivered).
    w.queue(w.root(i), "dropOnly", &[thing]);
    w.queue(w.root(e), "abandonFirst", &[]);
    w.run();
    w.check();
    assert!(!w.log.borrow().iter().any(|l| l.starts_with("exporter dropExports")), "{:?}", w.log.borrow());
    let own_imports: Vec<_> = w.k.clist(e).expect("clist").into_iter().filter(|(k, _)| *k == thing).collect();
    assert!(own_imports.is_empty(), "the exporter's c-list holds its abandoned object: {own_imports:?}");
    // The importer is told to retire it (its exporter gave it up), and then it is gone.
    assert!(w.log.borrow().iter().any(|l| l.starts_with("importer retireImports")), "{:?}", w.log.borrow());
    assert_eq!(w.k.object(thing.as_object().expect("object")).expect("read"), None);
    assert!(w.k.clist(i).expect("clist").iter().all(|(_, v)| *v == VRef::ROOT));
}

/// An importer drops an import, the exporter retires it, and — before the importer's
/// `retireImports` arrives — the importer names the dropped import again. That must be refused
/// (a dropped import is stale): otherwise the send carries a retired object to a third vat,
/// whose c-list then names an object that no longer exists, and the importer's retireImports no
/// longer applies, so neither entry is ever collected.
#[test]
fn a_vat_cannot_name_an_import_it_dropped() {
    let (mut w, eps) = World::new(&[("exporter", true), ("importer", false), ("third", false)]);
    let (e, i, t) = (eps[0], eps[1], eps[2]);
    let thing = w.export_to(e, i);
    w.queue(w.root(i), "dropOnly", &[thing]);
    let first = w.k.step().expect("step").expect("the drop");
    assert_eq!(first.outcome, CrankOutcome::Committed);
    // Queued behind the dropExports (whose crank retires the object and queues retireImports).
    w.queue(w.root(i), "give", &[w.root(t)]);
    let mut reports = vec![w.k.step().expect("step").expect("dropExports")];
    assert!(w.log.borrow().iter().any(|l| l.starts_with("exporter dropExports")), "{:?}", w.log.borrow());
    assert_eq!(w.k.object(thing.as_object().expect("object")).expect("read"), None, "retired");
    // The importer still recognises its dropped import; naming it again is illegal.
    reports.extend(w.run());
    let aborted = reports.iter().find_map(|r| match &r.outcome {
        CrankOutcome::Aborted { endpoint, fault: Fault::IllegalSyscall(why) } if *endpoint == i => Some(why.clone()),
        _ => None,
    });
    assert!(aborted.is_some(), "the importer's send of a dropped import was accepted: {reports:#?}");
    w.check();
    assert!(w.k.clist(t).expect("clist").iter().all(|(_, v)| *v == VRef::ROOT), "{:?}", w.k.clist(t));
    assert_eq!(w.k.object(thing.as_object().expect("object")).expect("read"), None);
}

/// An exporter told `retireExports` sends the export again during that very delivery: the
/// message keeps the object alive, so the kernel must not delete it after the delivery (the
/// message would otherwise carry a deleted object, and its receiver's c-list name it forever).
/// Once that message is delivered the object is unreferenced again and retired for good.
#[test]
fn an_export_sent_again_while_being_retired_survives() {
    let log: Log = Rc::default();
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let e = k
        .add_endpoint(
            "exporter",
            VatEndpoint::boxed(Scripted {
                name: "exporter",
                log: Rc::clone(&log),
                next: 1,
                held: None,
                retire_on_drop: false,
                resend_on_retire: true,
            }),
        )
        .expect("add");
    let i = k.add_endpoint("importer", Scripted::boxed("importer", &log, false)).expect("add");
    let mut w = World { k, log };
    let thing = w.export_to(e, i);
    w.queue(w.root(i), "dropOnly", &[thing]);
    w.queue(w.root(i), "retire", &[thing]);
    let ko = thing.as_object().expect("object");
    let mut alive_after_first_retire = false;
    while let Some(report) = w.k.step().expect("step") {
        w.check();
        let retires = w.log.borrow().iter().filter(|l| l.starts_with("exporter retireExports")).count();
        if retires == 1 && matches!(report.input, kernel_core::CrankInput::Gc { action: "retireExports", .. }) {
            alive_after_first_retire = w.k.object(ko).expect("read").is_some_and(|r| r.owner == e && r.reachable == 1);
        }
    }
    assert!(alive_after_first_retire, "{:?}", w.log.borrow());
    let retires = w.log.borrow().iter().filter(|l| l.starts_with("exporter retireExports")).count();
    assert_eq!(retires, 2, "{:?}", w.log.borrow());
    assert_eq!(w.k.object(ko).expect("read"), None);
}

/// An exporter abandons an export, and an importer hands it back: the exporter now imports it
/// (`o-N`) like anyone else — an abandoned object has no exporter — and that import counts as a
/// reference, so the object lives while the former exporter holds it and goes when it lets go.
#[test]
fn an_abandoned_export_handed_back_is_an_ordinary_import() {
    let (mut w, eps) = World::new(&[("exporter", false), ("importer", false)]);
    let (e, i) = (eps[0], eps[1]);
    let thing = w.export_to(e, i);
    let ko = thing.as_object().expect("object");
    w.queue(w.root(e), "abandonFirst", &[]);
    w.queue(w.root(i), "give", &[w.root(e)]);
    w.run();
    w.check();
    let back = w.k.clist(e).expect("clist").into_iter().find(|(k, _)| *k == thing).map(|(_, v)| v);
    assert!(back.is_some_and(|v| v.allocator == kernel_core::Allocator::Kernel), "the exporter imports it: {back:?}");
    // The importer lets go; the former exporter's import keeps it.
    w.queue(w.root(i), "dropOnly", &[thing]);
    w.queue(w.root(i), "retire", &[thing]);
    w.run();
    w.check();
    let rec = w.k.object(ko).expect("read").expect("the former exporter still holds it");
    assert_eq!((rec.reachable, rec.recognizable), (1, 1));
    // And then it lets go too.
    w.queue(w.root(e), "dropOnly", &[thing]);
    w.queue(w.root(e), "retire", &[thing]);
    w.run();
    w.check();
    assert_eq!(w.k.object(ko).expect("read"), None);
    for ep in [e, i] {
        assert!(w.k.clist(ep).expect("clist").iter().all(|(_, v)| *v == VRef::ROOT), "{:?}", w.k.clist(ep));
    }
}

/// The host pins an object (it holds it), and its exporter abandons it: that is the exporter's
/// right — it cannot know who holds its objects — so the syscall is legal (only a vat's root
/// may not be abandoned). Messages to it are then rejected, and it goes when the host unpins it.
#[test]
fn an_exporter_may_abandon_an_object_the_host_pinned() {
    let (mut w, eps) = World::new(&[("exporter", false)]);
    let e = eps[0];
    let kp = w.k.queue_message(w.root(e), "make", args(&[])).expect("queue");
    w.run();
    let thing = match w.k.settlement(kp).expect("read") {
        Some(Settlement::Fulfilled(d)) => d.as_reference().expect("a reference"),
        other => panic!("make answered {other:?}"),
    };
    w.k.set_pinned(thing, true).expect("pin");
    w.k.set_pinned(kp.into(), false).expect("unpin");
    w.queue(w.root(e), "abandonFirst", &[]);
    let reports = w.run();
    assert!(reports.iter().all(|r| !matches!(r.outcome, CrankOutcome::Aborted { .. })), "{reports:#?}");
    w.check();
    let ping = w.k.queue_message(thing, "ping", args(&[])).expect("queue");
    w.run();
    assert!(matches!(w.k.settlement(ping).expect("read"), Some(Settlement::Rejected(_))));
    w.k.set_pinned(ping.into(), false).expect("unpin");
    w.k.set_pinned(thing, false).expect("unpin");
    w.run();
    w.check();
    assert_eq!(w.k.object(thing.as_object().expect("object")).expect("read"), None);
}

/// The helper layer hands out `o+N` when an object is created (`Cx::export`), so a helper vat
/// may send its objects in any order: the kernel accepts an index below its watermark as new if
/// the vat skipped it (an export gap), once. (It used to terminate the vat: "o+1 is stale".)
#[test]
fn a_helper_vat_may_send_its_objects_in_any_order() {
    use kernel_syscall::{Answer, Behavior, Cx, HelperVat};
    struct TwoThings;
    impl Behavior for TwoThings {
        fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _: VRef, method: &str, _: VatData) -> Result<Answer, VatError> {
            match method {
                "go" => {
                    let (first, second) = (cx.export()?, cx.export()?);
                    cx.send_only(VRef::ROOT, "take", VatData::reference(second))?;
                    cx.send_only(VRef::ROOT, "take", VatData::reference(first))?;
                    Ok(Answer::Value(VatData::plain("null")))
                }
                _ => Ok(Answer::Value(VatData::plain("null"))),
            }
        }
    }
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let v = k.add_endpoint("two", VatEndpoint::boxed(HelperVat::new(TwoThings))).expect("add");
    let root = k.root(v).expect("root");
    k.queue_message(root.into(), "go", args(&[])).expect("queue");
    let report = k.step().expect("step").expect("a crank");
    assert_eq!(report.outcome, CrankOutcome::Committed, "{report:?}");
}

/// Asks itself for an answer with result `p+1` and subscribes to it (`go`; `go_and_drop` also
/// drops `p+1` at once), drops `p+1` (`drop`), answers anything with a result; records the
/// promises it is notified of.
struct Asker(Rc<RefCell<Vec<VRef>>>);

impl Vat for Asker {
    fn deliver(&mut self, _: VRef, method: &str, _: VatData, result: Option<VRef>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let p = VRef::local_promise(1);
        if method.starts_with("go") {
            sys.send(VRef::ROOT, "answer", &VatData::plain("[]"), Some(p))?;
            sys.subscribe(p)?;
        }
        if method.ends_with("drop") {
            sys.drop_imports(&[p])?;
        }
        if let Some(r) = result {
            sys.resolve(&[(r, false, VatData::plain("1"))])?;
        }
        Ok(())
    }
    fn notify(&mut self, resolutions: Vec<Resolution>, _: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.0.borrow_mut().extend(resolutions.iter().map(|r| r.promise));
        Ok(())
    }
}

/// A vat subscribes to a promise and then drops it (`dropImports` of a promise it does not
/// decide is legal and forgets it at once): dropping unsubscribes it, so no notify comes naming
/// the promise under a fresh vref the vat never saw.
#[test]
fn a_vat_that_dropped_a_promise_is_not_notified_of_it() {
    let notified: Rc<RefCell<Vec<VRef>>> = Rc::default();
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let v = k.add_endpoint("asker", VatEndpoint::boxed(Asker(Rc::clone(&notified)))).expect("add");
    let root = k.root(v).expect("root");
    let kp = k.queue_message(root.into(), "go_and_drop", args(&[])).expect("queue");
    k.set_pinned(kp.into(), false).expect("unpin");
    while k.step().expect("step").is_some() {}
    assert!(notified.borrow().is_empty(), "notified of {:?} after dropping it", notified.borrow());
}

/// The same, with the notify already queued when the vat drops the promise: `go` sends to
/// itself with result `p+1` and subscribes; the answer settles it (queueing the notify); then
/// `drop` drops `p+1` before the notify is delivered. The notify is not delivered.
#[test]
fn a_notify_queued_before_the_drop_is_not_delivered() {
    let notified: Rc<RefCell<Vec<VRef>>> = Rc::default();
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let v = k.add_endpoint("asker", VatEndpoint::boxed(Asker(Rc::clone(&notified)))).expect("add");
    let root = k.root(v).expect("root");
    // `go` runs; `drop` is queued behind the answer, which settles p+1 and queues the notify
    // behind `drop`.
    for method in ["go", "drop"] {
        let kp = k.queue_message(root.into(), method, args(&[])).expect("queue");
        k.set_pinned(kp.into(), false).expect("unpin");
        let r = k.step().expect("step").expect("a crank");
        assert_eq!(r.outcome, CrankOutcome::Committed, "{r:?}");
    }
    let rest: Vec<_> = std::iter::from_fn(|| k.step().expect("step")).collect();
    assert!(rest.iter().all(|r| r.outcome == CrankOutcome::Committed), "{rest:#?}");
    assert!(rest.iter().any(|r| r.input.to_string().contains("dropped notify")), "{rest:#?}");
    assert!(notified.borrow().is_empty(), "notified of {:?} after dropping it", notified.borrow());
    let problems = tests::check_tables(&k);
    assert!(problems.is_empty(), "{problems:?}");
    assert!(k.clist(v).expect("clist").iter().all(|(_, v)| *v == VRef::ROOT), "{:?}", k.clist(v));
}

/// Names its own `o+N` / `p+N` in any order (N is the message body): `give(to)` sends
/// `to.hold(o+N)`, `ask(to)` sends `to.hold()` with result `p+N`, `dropPromise` drops `p+N`. It
/// retires what it is told to drop.
struct Giver;

impl Vat for Giver {
    fn deliver(&mut self, _: VRef, method: &str, args: VatData, result: Option<VRef>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let n: u64 =
            std::str::from_utf8(&args.body).ok().and_then(|s| s.parse().ok()).ok_or_else(|| VatError::new("body is not an index"))?;
        match method {
            "give" => {
                sys.send(args.slots[0], "hold", &VatData { body: b"[{\"$slot\":0}]".to_vec(), slots: vec![VRef::export(n)] }, None)?
            }
            "ask" => sys.send(args.slots[0], "hold", &VatData::plain("[]"), Some(VRef::local_promise(n)))?,
            "dropPromise" => sys.drop_imports(&[VRef::local_promise(n)])?,
            other => return Err(VatError::new(format!("no method {other}"))),
        }
        if let Some(r) = result {
            sys.resolve(&[(r, false, VatData::plain("null"))])?;
        }
        Ok(())
    }

    fn notify(&mut self, _: Vec<Resolution>, _: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        Ok(())
    }

    fn drop_exports(&mut self, exports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        Ok(sys.retire_exports(exports)?)
    }
}

/// Runs `method` on the giver with index `n` (the holder's root as the argument) to the end;
/// the outcome of the giver's crank.
fn giver_call(k: &mut Kernel<MemStore>, giver: EndpointId, holder: EndpointId, method: &str, n: u64) -> CrankOutcome {
    let to = k.root(holder).expect("root");
    let kp = k
        .queue_message(k.root(giver).expect("root").into(), method, CapData { body: n.to_string().into_bytes(), slots: vec![to.into()] })
        .expect("queue");
    k.set_pinned(kp.into(), false).expect("unpin");
    let first = k.step().expect("step").expect("a crank").outcome;
    while k.step().expect("step").is_some() {}
    let problems = tests::check_tables(k);
    assert!(problems.is_empty(), "inconsistent tables after {method}({n}):\n  {}", problems.join("\n  "));
    first
}

fn kref_of(k: &Kernel<MemStore>, ep: EndpointId, v: VRef) -> Option<KRef> {
    k.clist(ep).expect("clist").into_iter().find(|(_, x)| *x == v).map(|(kr, _)| kr)
}

fn assert_stale(outcome: &CrankOutcome, what: &str) {
    assert!(
        matches!(outcome, CrankOutcome::Aborted { fault: Fault::IllegalSyscall(r), .. } if r.contains("stale")),
        "{what} should be refused as stale: {outcome:?}"
    );
}

/// Export gaps: a vat names `o+3` before `o+1` and `o+2` (across a restart), and all three are
/// accepted (each skipped index once); `o+1`, accepted out of order and then retired, is stale afterwards
/// like any retired export — the gap never lets a retired ref back in.
#[test]
fn an_export_named_out_of_order_is_new_once_and_stale_after_retirement() {
    let log: Log = Rc::default();
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let g = k.add_endpoint("giver", VatEndpoint::boxed(Giver)).expect("add");
    let h = k.add_endpoint("holder", Scripted::boxed("holder", &log, false)).expect("add");
    assert_eq!(giver_call(&mut k, g, h, "give", 3), CrankOutcome::Committed, "give o+3");
    // The gap below o+3 is kernel state: it survives a restart.
    let mut k = Kernel::open(k.into_store()).expect("reopen");
    assert_eq!(k.add_endpoint("giver", VatEndpoint::boxed(Giver)).expect("re-attach"), g);
    assert_eq!(k.add_endpoint("holder", Scripted::boxed("holder", &log, false)).expect("re-attach"), h);
    for n in [1, 2] {
        assert_eq!(giver_call(&mut k, g, h, "give", n), CrankOutcome::Committed, "give o+{n}");
    }
    let ko1 = kref_of(&k, g, VRef::export(1)).expect("o+1 exported");
    // The holder lets o+1 go; the giver, told dropExports, retires it.
    let kp = k.queue_message(k.root(h).expect("root").into(), "dropOnly", args(&[ko1])).expect("queue");
    k.set_pinned(kp.into(), false).expect("unpin");
    while k.step().expect("step").is_some() {}
    assert_eq!(k.object(ko1.as_object().expect("object")).expect("read"), None, "o+1 retired");
    assert!(log.borrow().iter().any(|l| l.starts_with("holder retireImports")), "{:?}", log.borrow());
    assert_eq!(kref_of(&k, g, VRef::export(1)), None);
    assert_stale(&giver_call(&mut k, g, h, "give", 1), "o+1 after its retirement");
}

/// The same for promises: `p+3` then `p+1` as results are both new; `p+1`, dropped by the giver
/// after it settled, is stale afterwards; `p+2`, still skipped, is new.
#[test]
fn a_promise_named_out_of_order_is_new_once() {
    let log: Log = Rc::default();
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let g = k.add_endpoint("giver", VatEndpoint::boxed(Giver)).expect("add");
    let h = k.add_endpoint("holder", Scripted::boxed("holder", &log, false)).expect("add");
    for n in [3, 1] {
        assert_eq!(giver_call(&mut k, g, h, "ask", n), CrankOutcome::Committed, "ask with result p+{n}");
    }
    assert_eq!(giver_call(&mut k, g, h, "dropPromise", 1), CrankOutcome::Committed, "drop p+1");
    assert_stale(&giver_call(&mut k, g, h, "ask", 1), "p+1 after it was dropped");
    // The giver is terminated now; a fresh one checks that the other skipped index stays new.
    let g2 = k.add_endpoint("giver2", VatEndpoint::boxed(Giver)).expect("add");
    for n in [3, 1, 2] {
        assert_eq!(giver_call(&mut k, g2, h, "ask", n), CrankOutcome::Committed, "ask with result p+{n}");
    }
    assert_eq!(giver_call(&mut k, g2, h, "dropPromise", 2), CrankOutcome::Committed, "drop p+2");
    assert_stale(&giver_call(&mut k, g2, h, "ask", 2), "p+2 after it was dropped");
}
