//! `Endpoint::notifies_in_crank`: an endpoint that is part of the kernel's machinery (a link to
//! a peer kernel) takes its notify inside the crank that settles the promise, instead of in a
//! crank of its own, unless something queued ahead of the notify may reach it (order stays as
//! DESIGN §10.2 has it); if it fails that notify, the settling crank does not commit.

use kernel_core::{
    CapData, CrankContext, Endpoint, Fault, KPromiseId, KRef, Kernel, KernelDelivery, KernelError, MemStore, Settlement, SyscallError,
};
use std::cell::RefCell;
use std::rc::Rc;

fn fault(e: SyscallError) -> Fault {
    Fault::VatError(e.to_string())
}

/// `later` keeps its result promise; any other method first sends `hello` to the object in its
/// slot, if it has one, then settles the kept promise.
#[derive(Default)]
struct Decider(Option<KPromiseId>);

impl Endpoint for Decider {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
        match message.method.as_str() {
            "later" => self.0 = message.result,
            _ => {
                if let Some(&to) = message.args.slots.first() {
                    ctx.send(to, "hello".into(), CapData::plain("[]"), None).map_err(fault)?;
                }
                if let Some(kp) = self.0.take() {
                    ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain("done")))]).map_err(fault)?;
                }
            }
        }
        Ok(())
    }
}

/// `watch(kp)` subscribes to `kp`; notifies are logged (or failed, if `fail`), and so are the
/// methods of other messages, in `order`.
struct Watcher {
    in_crank: bool,
    fail: bool,
    log: Rc<RefCell<Vec<KPromiseId>>>,
    order: Rc<RefCell<Vec<String>>>,
}

impl Endpoint for Watcher {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        match d {
            KernelDelivery::Message { message, .. } => {
                self.order.borrow_mut().push(message.method.clone());
                for r in message.args.slots {
                    if let KRef::Promise(kp) = r {
                        ctx.import(r).map_err(fault)?;
                        ctx.subscribe(kp).map_err(fault)?;
                    }
                }
                Ok(())
            }
            KernelDelivery::Notify { resolutions } => {
                if self.fail {
                    return Err(Fault::VatError("cannot take this notify".into()));
                }
                self.log.borrow_mut().extend(resolutions.iter().map(|(kp, _)| *kp));
                self.order.borrow_mut().push("notify".into());
                Ok(())
            }
        }
    }

    fn notifies_in_crank(&self) -> bool {
        self.in_crank
    }
}

/// A kernel where the watcher has subscribed to a promise the decider still holds, and a
/// `resolve` is queued: the next crank settles it.
fn subscribed(in_crank: bool, fail: bool) -> (Kernel<MemStore>, KPromiseId, Rc<RefCell<Vec<KPromiseId>>>) {
    let log = Rc::default();
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let decider = k.add_endpoint("decider", Box::new(Decider::default())).expect("decider");
    let watcher =
        k.add_endpoint("watcher", Box::new(Watcher { in_crank, fail, log: Rc::clone(&log), order: Rc::default() })).expect("watcher");
    let (decider, watcher) = (KRef::Object(k.root(decider).expect("root")), KRef::Object(k.root(watcher).expect("root")));
    let kp = k.queue_message(decider, "later", CapData::plain("[]")).expect("queue");
    k.queue_send_only(watcher, "watch", CapData { body: b"[]".to_vec(), slots: vec![KRef::Promise(kp)] }).expect("send");
    k.queue_send_only(decider, "resolve", CapData::plain("[]")).expect("send");
    k.step().expect("later").expect("a crank");
    k.step().expect("watch").expect("a crank");
    assert!(log.borrow().is_empty());
    (k, kp, log)
}

#[test]
fn the_notify_commits_with_the_settlement_in_one_crank() {
    let (mut k, kp, log) = subscribed(true, false);
    k.step().expect("resolve").expect("a crank");
    assert_eq!(*log.borrow(), vec![kp], "notified inside the settling crank");
    assert_eq!(k.queue_len(), 0, "no notify queued");
    assert_eq!(k.cranks().0, 3);
    // A vat takes it in a crank of its own, off the run queue.
    let (mut k, kp, log) = subscribed(false, false);
    k.step().expect("resolve").expect("a crank");
    assert!(log.borrow().is_empty());
    assert_eq!(k.queue_len(), 1, "the notify is queued");
    k.step().expect("notify").expect("a crank");
    assert_eq!(*log.borrow(), vec![kp]);
    assert_eq!(k.cranks().0, 4);
}

#[test]
fn a_subscription_to_a_settled_promise_is_notified_in_the_subscribing_crank() {
    let (mut k, kp, log) = subscribed(true, false);
    k.step().expect("resolve").expect("a crank");
    // A second watch of the now settled promise: the notify comes in the watching crank.
    let watcher = KRef::Object(k.root(k.endpoint_id("watcher").expect("read").expect("watcher")).expect("root"));
    k.queue_send_only(watcher, "watch", CapData { body: b"[]".to_vec(), slots: vec![KRef::Promise(kp)] }).expect("send");
    k.step().expect("watch").expect("a crank");
    assert_eq!(*log.borrow(), vec![kp, kp]);
    assert_eq!(k.queue_len(), 0);
}

#[test]
fn a_failed_notify_in_the_settling_crank_is_a_kernel_error_and_nothing_commits() {
    let (mut k, kp, log) = subscribed(true, true);
    let err = k.step().expect_err("the watcher fails its notify");
    assert!(matches!(&err, KernelError::Refused(why) if why.contains("settling crank")), "{err}");
    assert!(log.borrow().is_empty());
    assert_eq!(k.cranks().0, 2, "the settling crank did not commit");
    assert_eq!(k.queue_len(), 1, "the resolve is still queued");
    assert_eq!(k.settlement(kp).expect("read"), None, "still unsettled");
}

/// What the watcher saw, in order, when the settling crank (`go`) also sends it `hello` first
/// (`from_crank`), or the host queued `hello` to it behind `go` (still queued when `go` runs).
fn order(in_crank: bool, from_crank: bool) -> Vec<String> {
    let order: Rc<RefCell<Vec<String>>> = Rc::default();
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let w = Watcher { in_crank, fail: false, log: Rc::default(), order: Rc::clone(&order) };
    let watcher = k.add_endpoint("watcher", Box::new(w)).expect("watcher");
    let watcher = KRef::Object(k.root(watcher).expect("root"));
    let decider = k.add_endpoint("decider", Box::new(Decider::default())).expect("decider");
    let decider = KRef::Object(k.root(decider).expect("root"));
    let kp = k.queue_message(decider, "later", CapData::plain("[]")).expect("queue");
    k.queue_send_only(watcher, "watch", CapData { body: b"[]".to_vec(), slots: vec![KRef::Promise(kp)] }).expect("send");
    let slots = if from_crank { vec![watcher] } else { vec![] };
    k.queue_send_only(decider, "go", CapData { body: b"[]".to_vec(), slots }).expect("send");
    if !from_crank {
        k.queue_send_only(watcher, "hello", CapData::plain("[]")).expect("send");
    }
    k.run(None).expect("run");
    let seen = order.borrow().clone();
    seen
}

#[test]
fn a_notify_waits_its_turn_behind_what_is_queued_ahead_of_it_for_the_same_endpoint() {
    let expected = ["watch", "hello", "notify"];
    for from_crank in [true, false] {
        assert_eq!(order(false, from_crank), expected, "a vat, from_crank {from_crank}");
        assert_eq!(order(true, from_crank), expected, "in the crank, from_crank {from_crank}");
    }
}

#[test]
fn a_notify_is_taken_in_the_crank_past_what_is_queued_for_other_endpoints() {
    let (mut k, kp, log) = subscribed(true, false);
    // Queued behind the resolve: a message for the decider, which cannot reach the watcher.
    let decider = KRef::Object(k.root(k.endpoint_id("decider").expect("read").expect("decider")).expect("root"));
    k.queue_send_only(decider, "nothing", CapData::plain("[]")).expect("send");
    k.step().expect("resolve").expect("a crank");
    assert_eq!(*log.borrow(), vec![kp], "notified inside the settling crank");
    assert_eq!(k.queue_len(), 1, "only the decider's message is queued");
}
