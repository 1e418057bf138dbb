//! Focused tests of routing (DESIGN §2), promise forwarding and resolution (§5), and the crank's
//! commit/abort discipline (§3, §4): each test asserts what its name says.
//!
//! The endpoints here work at the kref level (closures over `CrankContext`); where the kernel
//! relies on an endpoint's c-list (terminations reject the promises found there), they import
//! their result promises as the `kernel-syscall` layer does.

mod common;

use common::FailingStore;
use kernel_core::{
    CapData, CrankContext, CrankInput, CrankOutcome, Endpoint, EndpointId, EndpointStatus, Fault, KObjectId, KPromiseId, KRef, Kernel,
    KernelDelivery, MemStore, Message, PromiseState, RunQueueItem, Settlement, Store, StoreError, SyscallError, VRef, WriteBatch,
};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

type Handler = Box<dyn FnMut(KernelDelivery, &mut CrankContext<'_>) -> Result<(), Fault>>;

/// An endpoint whose behaviour is a closure.
struct FnVat(Handler);

impl Endpoint for FnVat {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        (self.0)(d, ctx)
    }
}

fn vat(f: impl FnMut(KernelDelivery, &mut CrankContext<'_>) -> Result<(), Fault> + 'static) -> Box<dyn Endpoint> {
    Box::new(FnVat(Box::new(f)))
}

type Log = Rc<RefCell<Vec<KernelDelivery>>>;

/// An endpoint that records its deliveries, imports its result promises (so it decides them
/// the way a translated vat does) and does nothing else.
fn recorder() -> (Box<dyn Endpoint>, Log) {
    let log: Log = Rc::default();
    let seen = log.clone();
    let ep = vat(move |d, ctx| {
        if let KernelDelivery::Message { message: Message { result: Some(kp), .. }, .. } = &d {
            ctx.import(KRef::Promise(*kp)).map_err(fault)?;
        }
        seen.borrow_mut().push(d);
        Ok(())
    });
    (ep, log)
}

fn fault(e: SyscallError) -> Fault {
    Fault::VatError(e.to_string())
}

fn plain(body: &str) -> CapData {
    CapData::plain(body)
}

fn refs(slots: &[KRef]) -> CapData {
    CapData { body: b"refs".to_vec(), slots: slots.to_vec() }
}

fn new_kernel() -> Kernel<MemStore> {
    Kernel::open(MemStore::new()).expect("open")
}

fn add(k: &mut Kernel<impl Store>, name: &str, ep: Box<dyn Endpoint>) -> (EndpointId, KObjectId) {
    let id = k.add_endpoint(name, ep).expect("add endpoint");
    (id, k.root(id).expect("root"))
}

fn step<S: Store>(k: &mut Kernel<S>) -> kernel_core::CrankReport {
    k.step().expect("step").expect("an item was queued")
}

fn settlement<S: Store>(k: &Kernel<S>, kp: KPromiseId) -> Option<Settlement> {
    k.settlement(kp).expect("settlement")
}

/// The text of a kernel error value (`{"$error":"..."}`), or of plain data.
fn text(s: &Settlement) -> String {
    String::from_utf8_lossy(&s.data().body).into_owned()
}

fn rejected_with<S: Store>(k: &Kernel<S>, kp: KPromiseId, needle: &str) -> bool {
    matches!(settlement(k, kp), Some(s @ Settlement::Rejected(_)) if text(&s).contains(needle))
}

fn methods(log: &Log) -> Vec<String> {
    log.borrow()
        .iter()
        .filter_map(|d| match d {
            KernelDelivery::Message { message, .. } => Some(message.method.clone()),
            KernelDelivery::Notify { .. } => None,
        })
        .collect()
}

fn result_of(d: &KernelDelivery) -> KPromiseId {
    match d {
        KernelDelivery::Message { message: Message { result: Some(kp), .. }, .. } => *kp,
        other => panic!("expected a message with a result, got {other:?}"),
    }
}

/// A vat that, for a message whose args carry `[kp, value]`, resolves `kp` as told by the method:
/// `fulfil-ref` to the reference `value`, `fulfil-data` to plain data, `reject` with `nope`;
/// `hold` keeps its result unresolved (importing it so it decides it).
fn resolver() -> (Box<dyn Endpoint>, Log) {
    let log: Log = Rc::default();
    let seen = log.clone();
    let ep = vat(move |d, ctx| {
        seen.borrow_mut().push(d.clone());
        let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
        if let Some(kp) = message.result {
            ctx.import(KRef::Promise(kp)).map_err(fault)?;
        }
        let slots = &message.args.slots;
        let target = || slots.first().and_then(|r| r.as_promise()).expect("a promise to resolve");
        let settlement = match message.method.as_str() {
            "fulfil-ref" => Settlement::Fulfilled(CapData::reference(slots[1])),
            "fulfil-data" => Settlement::Fulfilled(plain("42")),
            "reject" => Settlement::Rejected(plain("nope")),
            _ => return Ok(()),
        };
        ctx.resolve(vec![(target(), settlement)]).map_err(fault)
    });
    (ep, log)
}

/// Queue `hold` to the resolver and run it: a fresh promise the resolver decides.
fn held_promise<S: Store>(k: &mut Kernel<S>, resolver_root: KObjectId) -> KPromiseId {
    let kp = k.queue_message(resolver_root.into(), "hold", plain("")).expect("queue");
    step(k);
    kp
}

// ---- routing (DESIGN §2) ----

#[test]
fn a_send_to_an_object_is_delivered_to_its_live_owner_who_then_decides_the_result() {
    let mut k = new_kernel();
    let (a, a_root) = add(&mut k, "a", recorder().0);
    let (b_ep, b_log) = recorder();
    let (b, b_root) = add(&mut k, "b", b_ep);
    let kp = k.queue_message(b_root.into(), "hello", refs(&[a_root.into()])).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.input, CrankInput::Send { target: b_root.into(), method: "hello".into(), delivered_to: Some(b) });
    assert_eq!(report.outcome, CrankOutcome::Committed);
    assert_eq!(
        b_log.borrow().as_slice(),
        [KernelDelivery::Message {
            target: b_root,
            message: Message { method: "hello".into(), args: refs(&[a_root.into()]), result: Some(kp) }
        }]
    );
    assert_eq!(k.promise(kp).expect("promise").and_then(|p| p.decider()), Some(b));
    assert_ne!(a, b);
}

#[test]
fn a_send_to_an_object_whose_owner_is_terminated_rejects_the_result_with_vat_terminated() {
    let mut k = new_kernel();
    let calls = Rc::new(Cell::new(0));
    let counted = calls.clone();
    let (a, a_root) = add(
        &mut k,
        "a",
        vat(move |_, _| {
            counted.set(counted.get() + 1);
            Err(Fault::VatError("broken".into()))
        }),
    );
    k.queue_message(a_root.into(), "first", plain("")).expect("queue");
    assert!(matches!(step(&mut k).outcome, CrankOutcome::Aborted { endpoint, .. } if endpoint == a));
    let kp = k.queue_message(a_root.into(), "second", plain("")).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.input, CrankInput::Send { target: a_root.into(), method: "second".into(), delivered_to: None });
    assert!(rejected_with(&k, kp, "vat terminated"), "{:?}", settlement(&k, kp));
    assert_eq!(calls.get(), 1, "nothing is delivered to a terminated vat");
}

#[test]
fn a_send_to_an_unresolved_promise_is_queued_on_it() {
    let mut k = new_kernel();
    let (r, r_root) = add(&mut k, "r", resolver().0);
    let kp = held_promise(&mut k, r_root);
    let later = k.queue_message(kp.into(), "later", plain("x")).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.input, CrankInput::Send { target: kp.into(), method: "later".into(), delivered_to: None });
    assert_eq!(
        k.promise(kp).expect("promise"),
        Some(PromiseState::Unresolved {
            decider: Some(r),
            subscribers: vec![],
            queue: vec![Message { method: "later".into(), args: plain("x"), result: Some(later) }],
        })
    );
    assert_eq!(settlement(&k, later), None);
    assert!(k.run_queue().expect("queue").is_empty());
}

#[test]
fn a_send_to_a_promise_fulfilled_to_an_object_is_retargeted_and_delivered() {
    let mut k = new_kernel();
    let (_, r_root) = add(&mut k, "r", resolver().0);
    let (b_ep, b_log) = recorder();
    let (b, b_root) = add(&mut k, "b", b_ep);
    let kp = held_promise(&mut k, r_root);
    k.queue_message(r_root.into(), "fulfil-ref", refs(&[kp.into(), b_root.into()])).expect("queue");
    step(&mut k);
    let ping = k.queue_message(kp.into(), "ping", plain("")).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.input, CrankInput::Send { target: kp.into(), method: "ping".into(), delivered_to: Some(b) });
    assert_eq!(
        b_log.borrow().as_slice(),
        [KernelDelivery::Message { target: b_root, message: Message { method: "ping".into(), args: plain(""), result: Some(ping) } }]
    );
}

#[test]
fn a_send_to_a_promise_fulfilled_to_data_rejects_its_result() {
    let mut k = new_kernel();
    let (_, r_root) = add(&mut k, "r", resolver().0);
    let kp = held_promise(&mut k, r_root);
    k.queue_message(r_root.into(), "fulfil-data", refs(&[kp.into()])).expect("queue");
    step(&mut k);
    let ping = k.queue_message(kp.into(), "ping", plain("")).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.input, CrankInput::Send { target: kp.into(), method: "ping".into(), delivered_to: None });
    assert!(rejected_with(&k, ping, "not an object"), "{:?}", settlement(&k, ping));
}

#[test]
fn a_send_to_a_rejected_promise_rejects_its_result_with_the_same_reason() {
    let mut k = new_kernel();
    let (_, r_root) = add(&mut k, "r", resolver().0);
    let kp = held_promise(&mut k, r_root);
    k.queue_message(r_root.into(), "reject", refs(&[kp.into()])).expect("queue");
    step(&mut k);
    let ping = k.queue_message(kp.into(), "ping", plain("")).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.input, CrankInput::Send { target: kp.into(), method: "ping".into(), delivered_to: None });
    assert_eq!(settlement(&k, ping), Some(Settlement::Rejected(plain("nope"))));
}

// ---- promises (DESIGN §5) ----

/// A vat that subscribes to the promise its message's args carry, and records notifies. Like
/// every endpoint that translates a notify, it imports what the settlements' data names (a
/// promise one forwards to is then held, and its own notify is delivered).
fn subscriber() -> (Box<dyn Endpoint>, Log) {
    let log: Log = Rc::default();
    let seen = log.clone();
    let ep = vat(move |d, ctx| {
        match &d {
            KernelDelivery::Message { message, .. } => {
                for kp in message.args.slots.iter().filter_map(|r| r.as_promise()) {
                    ctx.import(kp.into()).map_err(fault)?;
                    ctx.subscribe(kp).map_err(fault)?;
                }
            }
            KernelDelivery::Notify { resolutions } => {
                for (_, settlement) in resolutions {
                    for r in &settlement.data().slots {
                        ctx.import(*r).map_err(fault)?;
                    }
                }
            }
        }
        seen.borrow_mut().push(d);
        Ok(())
    });
    (ep, log)
}

#[test]
fn resolving_a_promise_to_another_promise_moves_its_queued_messages_and_subscribers() {
    let mut k = new_kernel();
    let (r, r_root) = add(&mut k, "r", resolver().0);
    let (s_ep, s_log) = subscriber();
    let (s, s_root) = add(&mut k, "s", s_ep);
    let kp_a = held_promise(&mut k, r_root);
    let kp_b = held_promise(&mut k, r_root);
    k.queue_message(s_root.into(), "watch", refs(&[kp_a.into()])).expect("queue");
    step(&mut k);
    let queued = k.queue_message(kp_a.into(), "queued", plain("")).expect("queue");
    step(&mut k);

    k.queue_message(r_root.into(), "fulfil-ref", refs(&[kp_a.into(), kp_b.into()])).expect("queue");
    step(&mut k);
    assert_eq!(settlement(&k, kp_a), Some(Settlement::Fulfilled(CapData::reference(kp_b.into()))));
    let moved = Message { method: "queued".into(), args: plain(""), result: Some(queued) };
    assert_eq!(
        k.run_queue().expect("queue"),
        [RunQueueItem::Notify { endpoint: s, promise: kp_a }, RunQueueItem::Send { target: kp_b.into(), message: moved.clone() }],
        "subscribers are told, queued messages are re-sent to the new promise"
    );
    k.run(None).expect("run");
    assert_eq!(
        k.promise(kp_b).expect("promise"),
        Some(PromiseState::Unresolved { decider: Some(r), subscribers: vec![s], queue: vec![moved] }),
        "the message waits on kpB and the subscriber follows"
    );

    let notifies_before = s_log.borrow().len();
    k.queue_message(r_root.into(), "fulfil-data", refs(&[kp_b.into()])).expect("queue");
    k.run(None).expect("run");
    let log = s_log.borrow();
    assert!(
        log[notifies_before..].iter().any(|d| matches!(d, KernelDelivery::Notify { resolutions } if resolutions[0].0 == kp_b)),
        "the subscriber of kpA is notified when kpB settles: {log:?}"
    );
    assert!(rejected_with(&k, queued, "not an object"), "the moved message followed kpB's settlement");
}

#[test]
fn messages_queued_on_a_promise_are_delivered_in_order_when_it_resolves_to_an_object() {
    let mut k = new_kernel();
    let (_, r_root) = add(&mut k, "r", resolver().0);
    let (b_ep, b_log) = recorder();
    let (b, b_root) = add(&mut k, "b", b_ep);
    let kp = held_promise(&mut k, r_root);
    let first = k.queue_message(kp.into(), "first", plain("")).expect("queue");
    let second = k.queue_message(kp.into(), "second", plain("")).expect("queue");
    k.run(None).expect("run");
    assert!(b_log.borrow().is_empty());
    k.queue_message(r_root.into(), "fulfil-ref", refs(&[kp.into(), b_root.into()])).expect("queue");
    k.run(None).expect("run");
    assert_eq!(methods(&b_log), ["first", "second"]);
    let results: Vec<KPromiseId> = b_log.borrow().iter().map(result_of).collect();
    assert_eq!(results, [first, second], "each keeps its result promise");
    assert_eq!(k.promise(first).expect("promise").and_then(|p| p.decider()), Some(b));
}

// ---- termination (DESIGN §4 abort) ----

#[test]
fn terminating_a_vat_rejects_its_decided_promises_drops_its_clist_and_rejects_messages_to_its_objects() {
    let mut k = new_kernel();
    let exported: Rc<Cell<Option<KRef>>> = Rc::default();
    let export_slot = exported.clone();
    let (a, a_root) = add(
        &mut k,
        "a",
        vat(move |d, ctx| {
            let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
            if let Some(kp) = message.result {
                ctx.import(kp.into()).map_err(fault)?;
            }
            match message.method.as_str() {
                "export" => {
                    export_slot.set(Some(ctx.export(VRef::export(1)).map_err(fault)?));
                    Ok(())
                }
                "die" => Err(Fault::VatError("dying".into())),
                _ => Ok(()),
            }
        }),
    );
    let decided = k.queue_message(a_root.into(), "export", plain("")).expect("queue");
    step(&mut k);
    let obj = exported.get().expect("a exported an object");
    // The host learnt `obj` out of band, so it must pin it to keep it past the termination.
    k.set_pinned(obj, true).expect("pin");
    assert_eq!(k.clist(a).expect("clist").len(), 3, "root, the export and the decided promise");

    let died = k.queue_message(a_root.into(), "die", plain("")).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.outcome, CrankOutcome::Aborted { endpoint: a, fault: Fault::VatError("dying".into()) });
    assert!(matches!(k.endpoint(a).expect("endpoint").map(|e| e.status), Some(EndpointStatus::Terminated { .. })));
    assert!(rejected_with(&k, decided, "vat terminated"), "{:?}", settlement(&k, decided));
    assert!(rejected_with(&k, died, "delivery failed"), "{:?}", settlement(&k, died));
    assert!(k.clist(a).expect("clist").is_empty());

    let to_export = k.queue_message(obj, "hello", plain("")).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.input, CrankInput::Send { target: obj, method: "hello".into(), delivered_to: None });
    assert!(rejected_with(&k, to_export, "vat terminated"), "{:?}", settlement(&k, to_export));
}

#[test]
fn terminating_an_endpoint_rejects_a_result_it_decides_but_never_imported() {
    // DESIGN §4: "reject every promise it decides". An endpoint that never translates its
    // result promise (kernel-syscall always does) leaves it decided by a dead endpoint.
    let mut k = new_kernel();
    let (a, root) = add(
        &mut k,
        "a",
        vat(|d, _| match d {
            KernelDelivery::Message { message, .. } if message.method == "die" => Err(Fault::VatError("dying".into())),
            _ => Ok(()),
        }),
    );
    let kept = k.queue_message(root.into(), "keep", plain("")).expect("queue");
    step(&mut k);
    assert_eq!(k.promise(kept).expect("promise").and_then(|p| p.decider()), Some(a));
    k.queue_message(root.into(), "die", plain("")).expect("queue");
    step(&mut k);
    assert!(rejected_with(&k, kept, "vat terminated"), "{:?}", k.promise(kept).expect("promise"));
}

// ---- deferred host callbacks and commit events (DESIGN §4 commit) ----

/// A store shared with the test, so a callback can look at what is committed.
#[derive(Clone, Default)]
struct SharedStore(Rc<RefCell<MemStore>>);

impl Store for SharedStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.borrow().get(key)
    }
    fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.0.borrow().next(prefix, after)
    }
    fn apply(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        self.0.borrow_mut().apply(batch)
    }
}

/// A vat that fulfils its result with "yes", then fails if the method is `bad`.
fn answerer() -> Box<dyn Endpoint> {
    vat(|d, ctx| {
        let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
        let kp = message.result.expect("a result");
        ctx.resolve(vec![(kp, Settlement::Fulfilled(plain("yes")))]).map_err(fault)?;
        if message.method == "bad" {
            return Err(Fault::VatError("changed my mind".into()));
        }
        Ok(())
    })
}

type Seen = Rc<RefCell<Vec<(Settlement, Option<Settlement>)>>>;

/// Watch `kp`, recording the settlement passed and the one committed in the store at that moment.
fn watch_committed(k: &mut Kernel<SharedStore>, kp: KPromiseId) -> Seen {
    let seen: Seen = Rc::default();
    let (log, store) = (seen.clone(), k.store().clone());
    k.watch(kp, move |kp, s| {
        let committed = Kernel::open(store.0.borrow().clone()).expect("open a copy").settlement(kp).expect("settlement");
        log.borrow_mut().push((s.clone(), committed));
    })
    .expect("watch");
    seen
}

#[test]
fn host_watchers_do_not_run_for_an_aborted_crank_and_run_after_the_commit() {
    let mut k = Kernel::open(SharedStore::default()).expect("open");
    let (_, root) = add(&mut k, "a", answerer());
    let bad = k.queue_message(root.into(), "bad", plain("")).expect("queue");
    let seen = watch_committed(&mut k, bad);
    assert!(seen.borrow().is_empty(), "not run before its promise settles");
    let report = step(&mut k);
    assert!(matches!(report.outcome, CrankOutcome::Aborted { .. }));
    let seen = seen.borrow();
    assert_eq!(seen.len(), 1, "run once: {seen:?}");
    let (passed, committed) = &seen[0];
    assert!(passed.is_rejected() && text(passed).contains("delivery failed"), "the aborted fulfilment never shows: {passed:?}");
    assert_eq!(committed.as_ref(), Some(passed), "the settlement was committed before the callback ran");

    let mut k = Kernel::open(SharedStore::default()).expect("open");
    let (_, root) = add(&mut k, "a", answerer());
    let good = k.queue_message(root.into(), "good", plain("")).expect("queue");
    let seen = watch_committed(&mut k, good);
    step(&mut k);
    assert_eq!(seen.borrow().as_slice(), [(Settlement::Fulfilled(plain("yes")), Some(Settlement::Fulfilled(plain("yes"))))]);
}

#[test]
fn commit_observers_are_called_once_per_committed_crank() {
    let mut k = new_kernel();
    let events = Rc::new(RefCell::new(Vec::new()));
    let log = events.clone();
    k.add_commit_observer(move |e| log.borrow_mut().push(e.crank.0));
    let (_, r_root) = add(&mut k, "r", resolver().0);
    let (_, bad_root) = add(&mut k, "bad", vat(|_, _| Err(Fault::VatError("no".into()))));
    let kp = k.queue_message(r_root.into(), "hold", plain("")).expect("queue"); // delivered
    k.queue_message(kp.into(), "wait", plain("")).expect("queue"); // queued on a promise: no delivery
    k.queue_message(bad_root.into(), "x", plain("")).expect("queue"); // aborted
    k.queue_message(bad_root.into(), "y", plain("")).expect("queue"); // to a terminated vat
    let mut reports = Vec::new();
    while let Some(r) = k.step().expect("step") {
        reports.push(r.commit.crank.0);
        assert_eq!(r.commit.crank, r.crank);
    }
    assert_eq!(*events.borrow(), [1, 2, 3, 4]);
    assert_eq!(reports, [1, 2, 3, 4]);
    assert_eq!(k.step().expect("step"), None);
    assert_eq!(events.borrow().len(), 4, "an empty queue commits nothing");
}

// ---- the sticky verdict and exit (DESIGN §3) ----

#[test]
fn an_illegal_syscall_is_sticky_even_if_the_vat_catches_the_error_and_its_later_sends_vanish() {
    let mut k = new_kernel();
    let (b_ep, b_log) = recorder();
    let (_, b_root) = add(&mut k, "b", b_ep);
    let errors = Rc::new(RefCell::new(Vec::new()));
    let seen = errors.clone();
    let (a, a_root) = add(
        &mut k,
        "a",
        vat(move |d, ctx| {
            let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
            let target = message.args.slots[0];
            let mut e = seen.borrow_mut();
            e.push(ctx.export(VRef::import(99)).err()); // forged: caught and ignored
            e.push(ctx.send(target, "leak".into(), plain(""), None).err());
            e.push(ctx.vatstore_set(b"k", b"v".to_vec()).err());
            Ok(())
        }),
    );
    let kp = k.queue_message(a_root.into(), "go", refs(&[b_root.into()])).expect("queue");
    let report = step(&mut k);
    assert!(matches!(report.outcome, CrankOutcome::Aborted { endpoint, fault: Fault::IllegalSyscall(_) } if endpoint == a));
    let errors = errors.borrow();
    assert!(matches!(errors[0], Some(SyscallError::Illegal(_))));
    assert_eq!(errors[1..], [Some(SyscallError::Terminated), Some(SyscallError::Terminated)]);
    assert!(matches!(k.endpoint(a).expect("endpoint").map(|e| e.status), Some(EndpointStatus::Terminated { .. })));
    assert!(rejected_with(&k, kp, "illegal syscall"));
    k.run(None).expect("run");
    assert!(b_log.borrow().is_empty(), "the send made after the illegal syscall never arrives");
    assert!(k.vatstore(a).expect("vatstore").is_empty());
}

/// A vat that sends `before` to the object in its args, exits, then tries to send `after`, and
/// finally ends the delivery as `end` says.
fn exiting_vat(end: &'static str, refused: Rc<RefCell<Option<SyscallError>>>) -> Box<dyn Endpoint> {
    vat(move |d, ctx| {
        let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
        ctx.import(message.result.expect("a result").into()).map_err(fault)?;
        let target = message.args.slots[0];
        ctx.send(target, "before".into(), plain(""), None).map_err(fault)?;
        ctx.exit(false, plain("bye")).map_err(fault)?;
        *refused.borrow_mut() = ctx.send(target, "after".into(), plain(""), None).err();
        match end {
            "error" => Err(Fault::VatError("after exit".into())),
            "panic" => panic!("after exit"),
            _ => Ok(()),
        }
    })
}

#[test]
fn exit_commits_the_delivery_so_far_terminates_the_vat_and_refuses_later_syscalls() {
    for end in ["ok", "error", "panic"] {
        let mut k = new_kernel();
        let (b_ep, b_log) = recorder();
        let (_, b_root) = add(&mut k, "b", b_ep);
        let refused = Rc::default();
        let (a, a_root) = add(&mut k, "a", exiting_vat(end, Rc::clone(&refused)));
        let kp = k.queue_message(a_root.into(), "go", refs(&[b_root.into()])).expect("queue");
        let report = step(&mut k);
        assert_eq!(report.outcome, CrankOutcome::Exited { endpoint: a, failure: false }, "ending with {end}");
        assert_eq!(*refused.borrow(), Some(SyscallError::Terminated), "ending with {end}");
        assert_eq!(settlement(&k, kp), Some(Settlement::Rejected(plain("bye"))), "its decided promises carry the exit info");
        assert!(matches!(k.endpoint(a).expect("endpoint").map(|e| e.status), Some(EndpointStatus::Terminated { .. })));
        k.run(None).expect("run");
        assert_eq!(methods(&b_log), ["before"], "ending with {end}: the send before the exit commits, the one after does not");
    }
}

// ---- kernel failures (DESIGN §4: a store error is not the vat's fault) ----

/// A vat that writes its vatstore, sends to itself and fulfils its result; with `fail_get`
/// set it also reads its vatstore while the store's reads fail (once).
fn busy_vat(fail_get: Option<Rc<Cell<bool>>>) -> Box<dyn Endpoint> {
    let mut armed = fail_get.is_some();
    vat(move |d, ctx| {
        let KernelDelivery::Message { target, message } = d else { return Ok(()) };
        ctx.vatstore_set(b"k", b"v".to_vec()).map_err(fault)?;
        ctx.send(target.into(), "again".into(), plain(""), None).map_err(fault)?;
        if let (true, Some(flag)) = (armed, &fail_get) {
            armed = false;
            flag.set(true);
            let r = ctx.vatstore_get(b"unwritten"); // not in the overlay: reads the store
            flag.set(false);
            assert_eq!(r, Err(SyscallError::Kernel));
            return Ok(()); // the vat carries on; the kernel still abandons the crank
        }
        if let Some(kp) = message.result {
            ctx.resolve(vec![(kp, Settlement::Fulfilled(plain("done")))]).map_err(fault)?;
        }
        Ok(())
    })
}

/// Every committed entry.
fn committed(k: &Kernel<FailingStore>) -> Vec<(Vec<u8>, Vec<u8>)> {
    kernel_core::store::scan_committed(&k.store().inner, b"").expect("scan")
}

fn assert_store_error_leaves_nothing(mut k: Kernel<FailingStore>, fail_apply: Option<Rc<Cell<bool>>>) {
    let events = Rc::new(Cell::new(0));
    let counted = events.clone();
    k.add_commit_observer(move |_| counted.set(counted.get() + 1));
    let ep = k.endpoint_id("v").expect("lookup").expect("registered");
    let root = k.root(ep).expect("root");
    let kp = k.queue_message(root.into(), "work", plain("")).expect("queue");
    let watched = Rc::new(Cell::new(false));
    let w = watched.clone();
    k.watch(kp, move |_, _| w.set(true)).expect("watch");
    let before = committed(&k);
    let queue_before = k.run_queue().expect("queue");
    if let Some(flag) = &fail_apply {
        flag.set(true);
    }

    assert!(k.step().is_err(), "the store failure is reported to the host");
    assert_eq!(committed(&k), before, "the store is unchanged");
    assert_eq!(k.run_queue().expect("queue"), queue_before, "the item is still queued");
    assert_eq!(k.cranks().0, 0);
    assert_eq!(k.endpoint(ep).expect("endpoint").map(|e| e.status), Some(EndpointStatus::Live), "not the vat's fault");
    assert_eq!(events.get(), 0, "no commit event");
    assert!(!watched.get(), "no watcher");

    if let Some(flag) = &fail_apply {
        flag.set(false);
    }
    let report = step(&mut k);
    assert_eq!(report.outcome, CrankOutcome::Committed, "the same item is delivered again");
    assert_eq!(settlement(&k, kp), Some(Settlement::Fulfilled(plain("done"))));
    assert_eq!(k.vatstore(ep).expect("vatstore"), [(b"k".to_vec(), b"v".to_vec())]);
    assert_eq!(events.get(), 1);
    assert!(watched.get());
}

#[test]
fn a_store_error_when_a_crank_commits_leaves_nothing_and_keeps_the_item_queued() {
    let store = FailingStore::default();
    let fail_apply = store.fail_apply.clone();
    let mut k = Kernel::open(store).expect("open");
    k.add_endpoint("v", busy_vat(None)).expect("add");
    assert_store_error_leaves_nothing(k, Some(fail_apply));
}

#[test]
fn a_store_error_in_the_middle_of_a_delivery_leaves_nothing_and_keeps_the_item_queued() {
    let store = FailingStore::default();
    let fail_get = store.fail_get.clone();
    let mut k = Kernel::open(store).expect("open");
    k.add_endpoint("v", busy_vat(Some(fail_get))).expect("add");
    assert_store_error_leaves_nothing(k, None);
}

#[test]
fn a_store_error_when_a_crank_commits_keeps_an_item_a_crank_queued() {
    let store = FailingStore::default();
    let fail_apply = store.fail_apply.clone();
    let mut k = Kernel::open(store).expect("open");
    let ep = k.add_endpoint("v", busy_vat(None)).expect("add");
    let root = k.root(ep).expect("root");
    k.queue_message(root.into(), "work", plain("")).expect("queue");
    step(&mut k); // queues `again` (the kernel keeps the items cranks queue decoded)
    let before = committed(&k);
    let queue_before = k.run_queue().expect("queue");
    fail_apply.set(true);
    assert!(k.step().is_err(), "the store failure is reported to the host");
    assert_eq!(committed(&k), before, "the store is unchanged");
    assert_eq!(k.run_queue().expect("queue"), queue_before, "the item is still queued");
    fail_apply.set(false);
    let again = CrankInput::Send { target: root.into(), method: "again".into(), delivered_to: Some(ep) };
    assert_eq!(step(&mut k).input, again, "the same item is delivered again");
    assert_eq!(step(&mut k).input, again, "and the one it queued then");
}
