//! Nodes in turns (`RemoteConfig::turns`): what a node applies, the cranks that follow and the
//! host's own calls reach the store as one batch per round; nothing of a turn — output,
//! acknowledgement, host callback — is seen before that batch is in the store; a node stopped
//! with its turn open loses the turn, and its peer's resend makes up for it.

use kernel_core::{CapData, Kernel, MemStore, Settlement, VRef};
use kernel_remote::{Frame, KernelId, Node, RemoteConfig, Transport, TransportEvent, TurnLimits};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

fn id(s: &str) -> KernelId {
    s.parse().expect("kernel id")
}

/// A transport that keeps what the node sends, for the test to carry to the peer.
#[derive(Default)]
struct Wire {
    sent: Vec<Vec<u8>>,
}

impl Transport for Wire {
    fn send(&mut self, _: &KernelId, frame: Vec<u8>) {
        self.sent.push(frame);
    }
    fn close(&mut self, peer: &KernelId, reason: &str) {
        panic!("closed the connection to {peer}: {reason}");
    }
    fn poll_event(&mut self) -> Option<TransportEvent> {
        None
    }
}

impl Wire {
    /// (data frames, acknowledgements) sent since the last look.
    fn take(&mut self) -> (Vec<Vec<u8>>, usize) {
        let frames = std::mem::take(&mut self.sent);
        let acks = frames.iter().filter(|f| matches!(Frame::decode(f, usize::MAX), Ok(Frame::Ack { .. }))).count();
        (frames, acks)
    }
}

struct Echo;
impl Behavior for Echo {
    fn call(&mut self, _: &mut Cx<'_, '_, '_>, _: VRef, _: &str, args: VatData) -> Result<Answer, VatError> {
        Ok(Answer::Value(args))
    }
}

fn node(store: MemStore, name: &str, peer: &str) -> Node<MemStore> {
    let config =
        RemoteConfig { turns: Some(TurnLimits { max_cranks: 1_000, max_delay: Duration::from_secs(60) }), ..RemoteConfig::default() };
    let mut node = Node::new(Kernel::open(store).expect("open"), id(name), config);
    let echo = node.kernel_mut().add_endpoint("echo", VatEndpoint::boxed(HelperVat::new(Echo))).expect("vat");
    let root = node.kernel().root(echo).expect("root");
    node.set_bootstrap(root);
    node.add_peer(id(peer)).expect("peer");
    node.end_turn().expect("setup written");
    node
}

fn connect(n: &mut Node<MemStore>, peer: &str, wire: &mut Wire) {
    n.handle(Duration::ZERO, TransportEvent::Connected(id(peer)), wire).expect("connect");
}

/// Nodes a and b, each connected to the other, with the wires toward b and toward a.
fn connected_pair() -> (Node<MemStore>, Node<MemStore>, Wire, Wire) {
    let (mut a, mut b) = (node(MemStore::new(), "a", "b"), node(MemStore::new(), "b", "a"));
    let (mut to_b, mut to_a) = (Wire::default(), Wire::default());
    connect(&mut a, "b", &mut to_b);
    connect(&mut b, "a", &mut to_a);
    (a, b, to_b, to_a)
}

/// Hand `frames` from `from` to `to`, as its transport would.
fn deliver(frames: Vec<Vec<u8>>, to: &mut Node<MemStore>, from: &str, wire: &mut Wire) {
    for f in frames {
        to.handle(Duration::ZERO, TransportEvent::Frame(id(from), f), wire).expect("frame");
    }
}

fn batches(n: &Node<MemStore>) -> u64 {
    n.kernel().store().batches_applied()
}

#[test]
fn a_round_trip_costs_each_node_one_store_batch_per_round_and_nothing_is_seen_before_it() {
    let (mut a, mut b, mut to_b, mut to_a) = connected_pair();
    let t = Duration::ZERO;
    a.pump(t, &mut to_b).expect("pump");
    b.pump(t, &mut to_a).expect("pump");
    to_a.take();
    to_b.take();

    // a: the host's queue and the send crank, one batch.
    let answer = Rc::new(RefCell::new(None));
    let target = a.peer_root(&id("b")).expect("root");
    let kp = a.kernel_mut().queue_message(target.into(), "echo", CapData::plain("7")).expect("queue");
    let seen = Rc::clone(&answer);
    a.kernel_mut().watch(kp, move |_, s| *seen.borrow_mut() = Some(s.clone())).expect("watch");
    let before = batches(&a);
    a.run(None).expect("run");
    assert_eq!(batches(&a), before, "the send crank waits in the open turn");
    assert!(to_b.take().0.is_empty(), "and so does its message");
    a.pump(t, &mut to_b).expect("pump");
    assert_eq!(batches(&a), before + 1, "queue and send: one batch");
    let (frames, _) = to_b.take();
    assert_eq!(frames.len(), 1, "the message leaves once its turn is written");

    // b: the apply, the delivery and the answer, one batch; the ack only after it.
    let before = batches(&b);
    deliver(frames, &mut b, "a", &mut to_a);
    b.pump(t, &mut to_a).expect("pump");
    assert_eq!(batches(&b), before, "applied inside the turn: cranks are queued, the turn stays open");
    assert_eq!(to_a.take().1, 0, "no ack before the apply is written");
    b.run(None).expect("run");
    b.pump(t, &mut to_a).expect("pump");
    assert_eq!(batches(&b), before + 1, "apply, delivery and answer: one batch");
    let (frames, acks) = to_a.take();
    assert_eq!((frames.len(), acks), (2, 1), "the ack and the answer leave together");

    // a: applying the answer settles the promise; its watcher runs when the turn is written.
    let before = batches(&a);
    deliver(frames, &mut a, "b", &mut to_b);
    assert!(answer.borrow().is_none());
    a.pump(t, &mut to_b).expect("pump");
    assert_eq!(batches(&a), before + 1, "the answer's apply: one batch");
    assert_eq!(*answer.borrow(), Some(Settlement::Fulfilled(CapData::plain("7"))));
}

#[test]
fn a_node_stopped_with_its_turn_open_loses_the_turn_and_the_peer_resend_makes_up_for_it() {
    let (mut a, mut b, mut to_b, mut to_a) = connected_pair();
    let t = Duration::ZERO;
    let target = a.peer_root(&id("b")).expect("root");
    a.kernel_mut().queue_message(target.into(), "echo", CapData::plain("1")).expect("queue");
    a.run(None).expect("run");
    a.pump(t, &mut to_b).expect("pump");
    let (frames, _) = to_b.take();
    // b applies the message and delivers it, but stops before its turn is written.
    deliver(frames.clone(), &mut b, "a", &mut to_a);
    b.pump(t, &mut to_a).expect("pump");
    b.run(None).expect("run");
    assert_eq!(b.status()[0].applied.0, 0, "applied only inside the open turn");
    let store = b.into_kernel().into_store();
    let mut b = node(store, "b", "a");
    assert_eq!(b.status()[0].applied.0, 0, "the turn is gone with the stop");
    assert_eq!(b.kernel().queue_len(), 0, "and so are the cranks it queued");
    // a's resend (after the reconnect) is applied as new, once.
    connect(&mut b, "a", &mut to_a);
    deliver(frames.clone(), &mut b, "a", &mut to_a);
    b.pump(t, &mut to_a).expect("pump");
    b.run(None).expect("run");
    b.pump(t, &mut to_a).expect("pump");
    assert_eq!(b.status()[0].applied.0, 1);
    deliver(frames, &mut b, "a", &mut to_a);
    b.pump(t, &mut to_a).expect("pump");
    assert_eq!((b.status()[0].applied.0, b.kernel().queue_len()), (1, 0), "a duplicate is dropped");
}
