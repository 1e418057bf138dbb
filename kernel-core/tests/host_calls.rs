//! The host's calls into a kernel: `queue_message_then` queues a message and hands the host its
//! answer once, leaving nothing behind; `queue_message` keeps the answer pinned for the host;
//! `queue_send_only` queues a one-way message, with no result promise at all.

use kernel_core::{CapData, CrankContext, Endpoint, Fault, KPromiseId, KRef, Kernel, KernelDelivery, MemStore, Settlement, SyscallError};
use std::cell::RefCell;
use std::rc::Rc;

/// Fulfils every result with the method's name; `fail` faults instead. Records each message's
/// method and whether it had a result.
struct Answerer(Rc<RefCell<Vec<(String, bool)>>>);

impl Endpoint for Answerer {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let fault = |e: SyscallError| Fault::VatError(e.to_string());
        let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
        self.0.borrow_mut().push((message.method.clone(), message.result.is_some()));
        if message.method == "fail" {
            return Err(Fault::VatError("asked to fail".into()));
        }
        if let Some(kp) = message.result {
            ctx.import(KRef::Promise(kp)).map_err(fault)?;
            ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain(message.method.clone())))]).map_err(fault)?;
        }
        Ok(())
    }
}

type Answers = Rc<RefCell<Vec<(KPromiseId, Settlement)>>>;

type Delivered = Rc<RefCell<Vec<(String, bool)>>>;

fn kernel() -> (Kernel<MemStore>, KRef) {
    let (k, root, _) = recording_kernel();
    (k, root)
}

fn recording_kernel() -> (Kernel<MemStore>, KRef, Delivered) {
    let delivered = Delivered::default();
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let vat = k.add_endpoint("answerer", Box::new(Answerer(Rc::clone(&delivered)))).expect("vat");
    let root = k.root(vat).expect("root");
    (k, root.into(), delivered)
}

fn record(answers: &Answers) -> impl FnOnce(KPromiseId, &Settlement) + 'static {
    let answers = Rc::clone(answers);
    move |kp, s| answers.borrow_mut().push((kp, s.clone()))
}

#[test]
fn an_answer_is_handed_over_once_and_then_collected() {
    let (mut k, root) = kernel();
    let answers = Answers::default();
    let kp = k.queue_message_then(root, "hello", CapData::plain("[]"), record(&answers)).expect("queue");
    assert!(k.promise(kp).expect("read").is_some(), "held by the queued message");
    assert!(answers.borrow().is_empty(), "nothing before the answering crank");
    k.run(None).expect("run");
    assert_eq!(*answers.borrow(), vec![(kp, Settlement::Fulfilled(CapData::plain("hello")))]);
    assert_eq!(k.promise(kp).expect("read"), None, "settled, unpinned and unreferenced: collected");
    // queue_message keeps its answer for the host until released.
    let pinned = k.queue_message(root, "kept", CapData::plain("[]")).expect("queue");
    k.run(None).expect("run");
    assert_eq!(k.settlement(pinned).expect("read"), Some(Settlement::Fulfilled(CapData::plain("kept"))));
    k.set_pinned(pinned.into(), false).expect("release");
    k.run(None).expect("run");
    assert_eq!(k.promise(pinned).expect("read"), None);
}

#[test]
fn a_failed_delivery_hands_over_the_rejection() {
    let (mut k, root) = kernel();
    let answers = Answers::default();
    let kp = k.queue_message_then(root, "fail", CapData::plain("[]"), record(&answers)).expect("queue");
    k.run(None).expect("run");
    let got = answers.borrow().clone();
    assert!(matches!(&got[..], [(p, Settlement::Rejected(_))] if *p == kp), "{got:?}");
    assert_eq!(k.promise(kp).expect("read"), None);
}

#[test]
fn inside_a_turn_the_answer_waits_for_the_turn() {
    let (mut k, root) = kernel();
    let answers = Answers::default();
    k.begin_turn();
    k.queue_message_then(root, "hello", CapData::plain("[]"), record(&answers)).expect("queue");
    k.run(None).expect("run");
    assert!(answers.borrow().is_empty(), "held until the turn's batch is written");
    k.end_turn().expect("end turn");
    assert_eq!(answers.borrow().len(), 1);
}

#[test]
fn an_unknown_target_is_refused_and_nothing_is_queued() {
    let (mut k, _) = kernel();
    let answers = Answers::default();
    let ghost = KRef::Object(kernel_core::KObjectId(999));
    assert!(k.queue_message_then(ghost, "hello", CapData::plain("[]"), record(&answers)).is_err());
    assert_eq!(k.queue_len(), 0);
}

#[test]
fn a_send_only_message_is_delivered_without_a_result_and_makes_no_promise() {
    let (mut k, root, delivered) = recording_kernel();
    k.queue_send_only(root, "ping", CapData::plain("[]")).expect("send");
    assert_eq!(k.queue_len(), 1);
    k.run(None).expect("run");
    assert_eq!(*delivered.borrow(), vec![("ping".to_owned(), false)]);
    // No promise was made for it: the next result promise is the one a fresh kernel makes first.
    let answers = Answers::default();
    let next = k.queue_message_then(root, "hello", CapData::plain("[]"), record(&answers)).expect("queue");
    let (mut fresh, fresh_root) = kernel();
    let first = fresh.queue_message_then(fresh_root, "hello", CapData::plain("[]"), record(&answers)).expect("queue");
    assert_eq!(next, first);
    let ghost = KRef::Object(kernel_core::KObjectId(999));
    assert!(k.queue_send_only(ghost, "ping", CapData::plain("[]")).is_err());
    assert_eq!(k.queue_len(), 1, "only the hello is queued");
}
