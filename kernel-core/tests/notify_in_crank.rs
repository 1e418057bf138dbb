//! `Endpoint::notifies_in_crank`: an endpoint that is part of the kernel's machinery (a link to
//! a peer kernel) takes its notify inside the crank that settles the promise, instead of in a
//! crank of its own; if it fails that notify, the settling crank does not commit.

use kernel_core::{
    CapData, CrankContext, Endpoint, Fault, KPromiseId, KRef, Kernel, KernelDelivery, KernelError, MemStore, Settlement, SyscallError,
};
use std::cell::RefCell;
use std::rc::Rc;

fn fault(e: SyscallError) -> Fault {
    Fault::VatError(e.to_string())
}

/// `later` keeps its result promise; `resolve` settles the kept one.
#[derive(Default)]
struct Decider(Option<KPromiseId>);

impl Endpoint for Decider {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
        match message.method.as_str() {
            "later" => self.0 = message.result,
            _ => {
                if let Some(kp) = self.0.take() {
                    ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain("done")))]).map_err(fault)?;
                }
            }
        }
        Ok(())
    }
}

/// `watch(kp)` subscribes to `kp`; notifies are logged (or failed, if `fail`).
struct Watcher {
    in_crank: bool,
    fail: bool,
    log: Rc<RefCell<Vec<KPromiseId>>>,
}

impl Endpoint for Watcher {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        match d {
            KernelDelivery::Message { message, .. } => {
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
    let watcher = k.add_endpoint("watcher", Box::new(Watcher { in_crank, fail, log: Rc::clone(&log) })).expect("watcher");
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
