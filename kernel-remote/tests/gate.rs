//! Output gating and the receiver, one frame at a time: nothing leaves before its crank commits
//! and is durable; a crank that does not commit leaves nothing; duplicates are dropped and
//! re-acked, gaps are not applied, acks wait for durability; retransmission backs off to its
//! cap and never gives up.

use kernel_core::{CapData, Entry, Kernel, MemStore, Store, StoreError, VRef, WriteBatch};
use kernel_remote::sim::{SimClock, SimDurability, SimStore};
use kernel_remote::{DurableStore, Frame, KernelId, Node, PeerSeq, RRef, RemoteConfig, Transport, TransportEvent, WireData, WireMessage};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

fn id(s: &str) -> KernelId {
    s.parse().expect("kernel id")
}

/// A transport that records what the node sends.
#[derive(Default)]
struct Recorder {
    sent: Vec<(KernelId, Frame)>,
    closed: Vec<(KernelId, String)>,
}

impl Transport for Recorder {
    fn send(&mut self, peer: &KernelId, frame: Vec<u8>) {
        self.sent.push((peer.clone(), Frame::decode(&frame, usize::MAX).expect("the node sends valid frames")));
    }
    fn close(&mut self, peer: &KernelId, reason: &str) {
        self.closed.push((peer.clone(), reason.to_owned()));
    }
    fn poll_event(&mut self) -> Option<TransportEvent> {
        None
    }
}

impl Recorder {
    /// Every frame sent so far, taken.
    fn frames(&mut self) -> Vec<Frame> {
        std::mem::take(&mut self.sent).into_iter().map(|(_, f)| f).collect()
    }
    fn data(&mut self) -> Vec<u64> {
        let seqs = self.sent.iter().filter_map(|(_, f)| if let Frame::Data { seq, .. } = f { Some(seq.0) } else { None }).collect();
        self.sent.retain(|(_, f)| !matches!(f, Frame::Data { .. }));
        seqs
    }
    fn acks(&mut self) -> Vec<u64> {
        let acks = self.sent.iter().filter_map(|(_, f)| if let Frame::Ack { upto, .. } = f { Some(upto.0) } else { None }).collect();
        self.sent.retain(|(_, f)| !matches!(f, Frame::Ack { .. }));
        acks
    }
}

struct Echo;
impl Behavior for Echo {
    fn call(&mut self, _: &mut Cx<'_, '_, '_>, _: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        match method {
            "fail" => Err(VatError::new("asked to fail")),
            _ => Ok(Answer::Value(args)),
        }
    }
}

fn group_store() -> SimStore {
    SimStore::new(SimDurability::Group { max_batches: 1_000, max_delay: Duration::from_secs(3600), early: false }, SimClock::new())
}

fn node<S: DurableStore>(store: S, name: &str, peer: &str) -> Node<S> {
    let mut node = Node::new(Kernel::open(store).expect("open"), id(name), RemoteConfig::default());
    let echo = node.kernel_mut().add_endpoint("echo", VatEndpoint::boxed(HelperVat::new(Echo))).expect("vat");
    let root = node.kernel().root(echo).expect("root");
    node.set_bootstrap(root);
    node.add_peer(id(peer)).expect("peer");
    node
}

fn send_to_peer<S: DurableStore>(node: &mut Node<S>, peer: &str, method: &str) {
    let target = node.peer_root(&id(peer)).expect("peer root");
    node.kernel_mut().queue_message(target.into(), method, CapData::plain("1")).expect("queue");
}

#[test]
fn a_message_leaves_only_after_its_crank_commits_and_is_durable() {
    let mut a = node(group_store(), "a", "b");
    let mut net = Recorder::default();
    a.handle(Duration::ZERO, TransportEvent::Connected(id("b")), &mut net).expect("connect");
    send_to_peer(&mut a, "b", "hello");
    a.pump(Duration::ZERO, &mut net).expect("pump");
    assert_eq!(net.data(), Vec::<u64>::new(), "nothing before the crank");
    a.step().expect("crank").expect("a crank ran");
    assert_eq!(a.status()[0].backlog, 1, "the entry is committed to the outbox");
    a.pump(Duration::ZERO, &mut net).expect("pump");
    assert_eq!(net.data(), Vec::<u64>::new(), "committed but not durable: held back");
    a.kernel().store().sync();
    a.pump(Duration::ZERO, &mut net).expect("pump");
    assert_eq!(net.data(), vec![1], "durable: sent");
}

#[test]
fn an_aborted_crank_leaves_no_outbox_entry() {
    /// Sends to the peer, then fails: the send must vanish with the crank.
    struct SendThenFail(Rc<Cell<Option<kernel_core::KObjectId>>>);
    impl kernel_core::Endpoint for SendThenFail {
        fn deliver(&mut self, _: kernel_core::KernelDelivery, ctx: &mut kernel_core::CrankContext<'_>) -> Result<(), kernel_core::Fault> {
            let target = self.0.get().expect("target set");
            let _ = ctx.send(target.into(), "lost".into(), CapData::plain("0"), None);
            Err(kernel_core::Fault::VatError("after sending".into()))
        }
    }
    let mut a = node(MemStore::new(), "a", "b");
    let target = Rc::new(Cell::new(None));
    let bad = a.kernel_mut().add_endpoint("bad", Box::new(SendThenFail(Rc::clone(&target)))).expect("vat");
    target.set(Some(a.peer_root(&id("b")).expect("root")));
    let root = a.kernel().root(bad).expect("root");
    a.kernel_mut().queue_message(root.into(), "go", CapData::plain("0")).expect("queue");
    let mut net = Recorder::default();
    a.handle(Duration::ZERO, TransportEvent::Connected(id("b")), &mut net).expect("connect");
    a.run(None).expect("run");
    a.pump(Duration::ZERO, &mut net).expect("pump");
    assert_eq!(net.data(), Vec::<u64>::new());
    let ep = a.peer_endpoint(&id("b")).expect("ep");
    assert!(a.kernel().vatstore(ep).expect("vatstore").is_empty(), "no outbox entry, no sequence used");
    assert_eq!(a.backlog(), 0);
}

/// A MemStore whose next `apply` fails while the flag is set.
struct Flaky {
    inner: MemStore,
    fail: Rc<Cell<bool>>,
}

impl Store for Flaky {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<Entry>, StoreError> {
        self.inner.next(prefix, after)
    }
    fn apply(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        if self.fail.get() {
            return Err(StoreError::new("disk on fire"));
        }
        self.inner.apply(batch)
    }
}

impl DurableStore for Flaky {
    fn applied_mark(&self) -> u64 {
        self.inner.batches_applied()
    }
    fn durable_mark(&self) -> u64 {
        self.inner.batches_applied()
    }
}

#[test]
fn a_crank_that_fails_to_commit_sends_nothing_and_its_retry_sends_once() {
    let fail = Rc::new(Cell::new(false));
    let mut a = node(Flaky { inner: MemStore::new(), fail: Rc::clone(&fail) }, "a", "b");
    let mut net = Recorder::default();
    a.handle(Duration::ZERO, TransportEvent::Connected(id("b")), &mut net).expect("connect");
    send_to_peer(&mut a, "b", "hello");
    fail.set(true);
    assert!(a.step().is_err(), "the commit failed");
    a.pump(Duration::ZERO, &mut net).ok();
    assert_eq!(net.data(), Vec::<u64>::new(), "the link wrote an entry, but its crank never committed");
    fail.set(false);
    a.step().expect("retry").expect("a crank ran");
    a.pump(Duration::ZERO, &mut net).expect("pump");
    assert_eq!(net.data(), vec![1], "sent once, with the first sequence number");
    assert_eq!(a.backlog(), 1);
}

fn data(seq: u64, method: &str) -> Vec<u8> {
    // The sender's name for our bootstrap object is its `ro-0`.
    data_to(seq, RRef::BOOTSTRAP.flip(), method)
}

fn data_to(seq: u64, target: RRef, method: &str) -> Vec<u8> {
    let message =
        WireMessage::Deliver { target, method: method.into(), args: WireData { body: b"1".to_vec(), slots: vec![] }, result: None };
    Frame::Data { seq: PeerSeq(seq), message: message.encode().expect("encode") }.encode().expect("frame")
}

#[test]
fn the_receiver_applies_in_order_once_and_acks_only_what_is_durable() {
    let mut b = node(group_store(), "b", "a");
    let mut net = Recorder::default();
    let t = Duration::ZERO;
    b.handle(t, TransportEvent::Connected(id("a")), &mut net).expect("connect");
    b.pump(t, &mut net).expect("pump");
    net.acks(); // the greeting ack of a new connection
    b.handle(t, TransportEvent::Frame(id("a"), data(2, "second")), &mut net).expect("gap");
    b.pump(t, &mut net).expect("pump");
    assert_eq!(b.status()[0].applied, PeerSeq(0), "a gap is not applied");
    b.handle(t, TransportEvent::Frame(id("a"), data(1, "first")), &mut net).expect("first");
    b.pump(t, &mut net).expect("pump");
    assert_eq!(b.status()[0].applied, PeerSeq(1));
    assert_eq!(b.kernel().queue_len(), 1, "the message is on the run queue");
    assert_eq!(net.acks(), Vec::<u64>::new(), "applied but not durable: no ack yet");
    b.kernel().store().sync();
    b.pump(t, &mut net).expect("pump");
    assert_eq!(net.acks(), vec![1]);
    b.handle(t, TransportEvent::Frame(id("a"), data(1, "first")), &mut net).expect("duplicate");
    assert_eq!(b.kernel().queue_len(), 1, "the duplicate is dropped");
    b.pump(t, &mut net).expect("pump");
    assert_eq!(net.acks(), vec![1], "and re-acked");
    b.handle(t, TransportEvent::Frame(id("a"), data(2, "second")), &mut net).expect("second");
    b.pump(t, &mut net).expect("pump");
    assert_eq!((b.status()[0].applied, b.kernel().queue_len()), (PeerSeq(2), 2));
    assert!(net.closed.is_empty(), "{:?}", net.closed);
    // An ack for a message never written is a protocol violation.
    b.handle(t, TransportEvent::Frame(id("a"), Frame::Ack { upto: PeerSeq(5), written: PeerSeq(0) }.encode().expect("ack")), &mut net)
        .expect("bad ack");
    assert_eq!(net.closed.len(), 1);
    assert!(net.closed[0].1.contains("ack of #5"), "{}", net.closed[0].1);
}

#[test]
fn retransmission_backs_off_to_its_cap_and_never_gives_up() {
    let config =
        RemoteConfig { retransmit_base: Duration::from_millis(100), retransmit_max: Duration::from_millis(400), ..RemoteConfig::default() };
    let mut a = Node::new(Kernel::open(MemStore::new()).expect("open"), id("a"), config);
    a.add_peer(id("b")).expect("peer");
    let mut net = Recorder::default();
    a.handle(Duration::ZERO, TransportEvent::Connected(id("b")), &mut net).expect("connect");
    send_to_peer(&mut a, "b", "one");
    send_to_peer(&mut a, "b", "two");
    a.run(None).expect("run");
    let mut sends = Vec::new();
    for ms in (0..=5_000).step_by(10) {
        a.pump(Duration::from_millis(ms), &mut net).expect("pump");
        if !net.data().is_empty() {
            sends.push(ms);
        }
    }
    // 0, then +100, +200, +400, +400, ... : doubling to the cap, forever.
    assert_eq!(&sends[..5], &[0, 100, 300, 700, 1100]);
    assert!(sends.len() > 12, "{sends:?}");
    assert!(sends.windows(2).skip(3).all(|w| w[1] - w[0] == 400), "{sends:?}");
    assert_eq!(a.status()[0].backlog, 2, "the backlog is visible");
    // An ack of the first: the second is still resent, the backlog shrinks.
    a.handle(
        Duration::from_millis(5_000),
        TransportEvent::Frame(id("b"), Frame::Ack { upto: PeerSeq(1), written: PeerSeq(0) }.encode().expect("ack")),
        &mut net,
    )
    .expect("ack");
    assert_eq!(a.status()[0].backlog, 1);
    // A reconnect resends everything unacked at once, in order.
    a.handle(Duration::from_millis(5_001), TransportEvent::Connected(id("b")), &mut net).expect("reconnect");
    a.pump(Duration::from_millis(5_001), &mut net).expect("pump");
    assert_eq!(net.data(), vec![2]);
}

#[test]
fn a_message_too_large_for_the_link_is_rejected_at_the_source() {
    let config = RemoteConfig { max_frame: 200, ..RemoteConfig::default() };
    let mut a = Node::new(Kernel::open(MemStore::new()).expect("open"), id("a"), config);
    a.add_peer(id("b")).expect("peer");
    let target = a.peer_root(&id("b")).expect("root");
    let big = a.kernel_mut().queue_message(target.into(), "big", CapData::plain(vec![b'x'; 500])).expect("queue");
    let small = a.kernel_mut().queue_message(target.into(), "small", CapData::plain("1")).expect("queue");
    a.run(None).expect("run");
    let refused = a.kernel().settlement(big).expect("read");
    assert!(
        matches!(&refused, Some(kernel_core::Settlement::Rejected(d)) if String::from_utf8_lossy(&d.body).contains("exceeds")),
        "{refused:?}"
    );
    assert_eq!(a.kernel().settlement(small).expect("read"), None, "the small one is on its way");
    assert_eq!(a.status()[0].written, PeerSeq(1), "only the small one took a sequence number");
}

#[test]
fn a_refused_message_in_a_batch_stops_it_there_and_closes_the_connection() {
    let mut b = node(MemStore::new(), "b", "a");
    let mut net = Recorder::default();
    let t = Duration::ZERO;
    b.handle(t, TransportEvent::Connected(id("a")), &mut net).expect("connect");
    // #2 names an object of b's that b never exported to a: forged.
    let forged: RRef = "ro-7".parse().expect("rref");
    for frame in [data(1, "one"), data_to(2, forged, "steal"), data(3, "three")] {
        b.handle(t, TransportEvent::Frame(id("a"), frame), &mut net).expect("frame");
    }
    b.pump(t, &mut net).expect("pump");
    assert_eq!(b.status()[0].applied, PeerSeq(1), "the good prefix is applied, nothing from the forged one on");
    assert_eq!(b.kernel().queue_len(), 1);
    assert_eq!(net.closed.len(), 1);
    assert!(net.closed[0].1.contains("#2") && net.closed[0].1.contains("o-7"), "{}", net.closed[0].1);
    assert_eq!(b.take_faults().len(), 1, "the reason is kept for the host");
    // After reconnecting, the sender's resend of #2 (fixed or not) is considered afresh.
    b.handle(t, TransportEvent::Connected(id("a")), &mut net).expect("reconnect");
    b.handle(t, TransportEvent::Frame(id("a"), data(2, "two")), &mut net).expect("frame");
    b.pump(t, &mut net).expect("pump");
    assert_eq!(b.status()[0].applied, PeerSeq(2));
}

/// `first`: ask the peer to echo, keeping the result promise; `second`: hand that promise to
/// the peer.
struct Passer;

impl Behavior for Passer {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        let peer = args.slots.first().copied().ok_or_else(|| VatError::new("no peer"))?;
        match method {
            "first" => {
                let p = cx.send(peer, "echo", VatData::plain("1"))?;
                cx.set("p", &p.to_string())?;
            }
            _ => {
                let p: VRef = cx.get("p")?.and_then(|s| s.parse().ok()).ok_or_else(|| VatError::new("no p"))?;
                cx.send_only(peer, "take", VatData { body: b"[{\"$slot\":0}]".to_vec(), slots: vec![p] })?;
            }
        }
        Ok(Answer::Value(VatData::plain("ok")))
    }
}

/// Kernels a and b on memory, connected, a with a `Passer` vat: a, b, the passer's root, b's
/// root as a names it (the passer's argument), and what a and b send (`to_b`, `to_a`).
fn passer_pair() -> (Node<MemStore>, Node<MemStore>, kernel_core::KObjectId, kernel_core::KRef, Recorder, Recorder) {
    let mut a = node(MemStore::new(), "a", "b");
    let mut b = node(MemStore::new(), "b", "a");
    let passer = a.kernel_mut().add_endpoint("passer", VatEndpoint::boxed(HelperVat::new(Passer))).expect("vat");
    let passer = a.kernel().root(passer).expect("root");
    let peer = kernel_core::KRef::Object(a.peer_root(&id("b")).expect("root"));
    let (mut to_b, mut to_a) = (Recorder::default(), Recorder::default());
    a.handle(Duration::ZERO, TransportEvent::Connected(id("b")), &mut to_b).expect("connect");
    b.handle(Duration::ZERO, TransportEvent::Connected(id("a")), &mut to_a).expect("connect");
    (a, b, passer, peer, to_b, to_a)
}

/// a's host calls `method` on the passer, with b's root (`peer`); a runs it and sends what it
/// wrote (at time zero).
fn passer_call(a: &mut Node<MemStore>, passer: kernel_core::KObjectId, peer: kernel_core::KRef, method: &str, to_b: &mut Recorder) {
    a.kernel_mut().queue_message(passer.into(), method, CapData { body: b"[]".to_vec(), slots: vec![peer] }).expect("queue");
    a.run(None).expect("run");
    a.pump(Duration::ZERO, to_b).expect("pump");
}

/// Hand `frames` from `sender` to `to` at time `t`, then pump it.
fn deliver(t: Duration, frames: Vec<Frame>, to: &mut Node<MemStore>, sender: &str, net: &mut Recorder) {
    for f in frames {
        to.handle(t, TransportEvent::Frame(id(sender), f.encode().expect("encode")), net).expect("frame");
    }
    to.pump(t, net).expect("pump");
}

/// A result promise the peer has already resolved, named again by a message sent before its
/// resolution arrived, still names it: the peer keeps the name (an alias) until our
/// acknowledgements say no message naming it can still come.
#[test]
fn a_result_promise_named_again_while_its_resolution_is_in_flight_is_accepted() {
    let (mut a, mut b, passer, peer, mut to_b, mut to_a) = passer_pair();
    let t = Duration::ZERO;
    passer_call(&mut a, passer, peer, "first", &mut to_b);
    deliver(t, to_b.frames(), &mut b, "a", &mut to_a);
    b.run(None).expect("run"); // b answers; its Resolve for the result is now on its way to a
    b.pump(t, &mut to_a).expect("pump");
    to_a.sent.clear(); // ...and still in flight when a names the promise again
    passer_call(&mut a, passer, peer, "second", &mut to_b);
    deliver(t, to_b.frames(), &mut b, "a", &mut to_a);
    assert!(to_a.closed.is_empty(), "b refused a's message: {:?}", to_a.closed);
    let link_at_b = b.peer_endpoint(&id("a")).expect("link");
    assert_eq!(b.kernel().aliases(link_at_b).expect("aliases").len(), 1, "b keeps the resolved promise's name");
    // Let it all settle (b resends its Resolve after the timeout); a's acknowledgement of it,
    // once b has applied what a wrote before, lets b forget the name.
    for round in 1..=10u64 {
        let t = Duration::from_secs(5 * round);
        b.run(None).expect("run");
        b.pump(t, &mut to_a).expect("pump");
        deliver(t, to_a.frames(), &mut a, "b", &mut to_b);
        a.run(None).expect("run");
        a.pump(t, &mut to_b).expect("pump");
        deliver(t, to_b.frames(), &mut b, "a", &mut to_a);
    }
    assert!(to_a.closed.is_empty() && to_b.closed.is_empty(), "{:?} {:?}", to_a.closed, to_b.closed);
    assert!(a.is_idle() && b.is_idle(), "both sides settle");
    assert_eq!(b.kernel().aliases(link_at_b).expect("aliases"), vec![], "a's acknowledgement let b drop the name");
    let link_at_a = a.peer_endpoint(&id("b")).expect("link");
    assert!(a.kernel().clist(link_at_a).expect("c-list").iter().all(|(k, _)| k.as_promise().is_none()), "a holds no promise of b's");
}

/// The acknowledgement of a `Resolve` can overtake a message the acknowledging side sent
/// before it applied the `Resolve`, one naming the resolved promise: the name must outlive the
/// acknowledgement until that message is applied (the ack's `written` covers it).
#[test]
fn a_name_outlives_an_acknowledgement_that_overtakes_a_message_naming_it() {
    let (mut a, mut b, passer, peer, mut to_b, mut to_a) = passer_pair();
    let t = Duration::ZERO;
    // a sends echo (#1, result p); b answers: its Resolve of p is on its way to a.
    passer_call(&mut a, passer, peer, "first", &mut to_b);
    deliver(t, to_b.frames(), &mut b, "a", &mut to_a);
    b.run(None).expect("run");
    b.pump(t, &mut to_a).expect("pump");
    let resolve = to_a.frames();
    assert!(resolve.iter().any(|f| matches!(f, Frame::Data { .. })), "b's Resolve");
    // Before the Resolve reaches a, a names p again (#2).
    passer_call(&mut a, passer, peer, "second", &mut to_b);
    let named = to_b.frames();
    // a applies the Resolve and acknowledges it.
    deliver(t, resolve, &mut a, "b", &mut to_b);
    let acks: Vec<Frame> = to_b.frames().into_iter().filter(|f| matches!(f, Frame::Ack { .. })).collect();
    assert!(
        acks.iter().any(|f| matches!(f, Frame::Ack { upto, written } if upto.0 >= 1 && written.0 >= 2)),
        "a acknowledges the Resolve, its outbox written through #2 (echo, take): {acks:?}"
    );
    // The acknowledgement reaches b first: b must keep the name, #2 still to come.
    deliver(t, acks, &mut b, "a", &mut to_a);
    b.run(None).expect("run");
    b.pump(t, &mut to_a).expect("pump");
    let link_at_b = b.peer_endpoint(&id("a")).expect("link");
    assert_eq!(b.kernel().aliases(link_at_b).expect("aliases").len(), 1, "the name outlives the acknowledgement");
    // Then a's message naming p: applied, not refused.
    let named: Vec<Frame> = named.into_iter().filter(|f| matches!(f, Frame::Data { .. })).collect();
    assert!(!named.is_empty(), "a's take(p)");
    deliver(t, named, &mut b, "a", &mut to_a);
    assert!(to_a.closed.is_empty(), "b refused a's message naming p: {:?}", to_a.closed);
    b.run(None).expect("run");
    b.pump(t, &mut to_a).expect("pump");
    assert_eq!(b.kernel().aliases(link_at_b).expect("aliases"), vec![], "applied through the ack's written: the name goes");
    assert!(b.take_faults().is_empty());
}

/// Two `Resolve`s: the first forgettable, the second acknowledged only by an ack whose `written`
/// b has not applied yet. Deleting up to the first one must not take the second one's name too
/// (found in review: deletion looked only at the first pending `Resolve`, and b then refused
/// a's message naming the second promise, for good).
#[test]
fn a_later_resolve_keeps_its_name_when_an_earlier_one_may_be_forgotten() {
    let (mut a, mut b, passer, peer, mut to_b, mut to_a) = passer_pair();
    let t = Duration::ZERO;
    // a: echo #1 (p1), echo #2 (p2, kept as "p").
    for _ in 0..2 {
        a.kernel_mut().queue_message(passer.into(), "first", CapData { body: b"[]".to_vec(), slots: vec![peer] }).expect("queue");
    }
    a.run(None).expect("run");
    a.pump(t, &mut to_b).expect("pump");
    deliver(t, to_b.frames(), &mut b, "a", &mut to_a);
    b.run(None).expect("run");
    b.pump(t, &mut to_a).expect("pump");
    let from_b = to_a.frames();
    let data: Vec<Frame> = from_b.iter().filter(|f| matches!(f, Frame::Data { .. })).cloned().collect();
    assert_eq!(data.len(), 2, "b's two Resolves: {from_b:?}");
    // a gets b's Resolve #1 only; acks (1, written 2). b can forget p1.
    deliver(t, vec![data[0].clone()], &mut a, "b", &mut to_b);
    let ack1: Vec<Frame> = to_b.frames().into_iter().filter(|f| matches!(f, Frame::Ack { .. })).collect();
    // Before Resolve #2 (p2) reaches a, a names p2 again (#3).
    passer_call(&mut a, passer, peer, "second", &mut to_b);
    let named: Vec<Frame> = to_b.frames().into_iter().filter(|f| matches!(f, Frame::Data { .. })).collect();
    // a applies Resolve #2 and acks (2, written 3); that ack overtakes #3.
    deliver(t, vec![data[1].clone()], &mut a, "b", &mut to_b);
    let ack2: Vec<Frame> = to_b.frames().into_iter().filter(|f| matches!(f, Frame::Ack { .. })).collect();
    // Both acks reach b in one round (e.g. ack1 was delayed, or b was busy).
    deliver(t, ack1.into_iter().chain(ack2).collect(), &mut b, "a", &mut to_a);
    let link_at_b = b.peer_endpoint(&id("a")).expect("link");
    assert_eq!(b.kernel().aliases(link_at_b).expect("aliases").len(), 1, "p1's name went, p2's stays");
    deliver(t, named, &mut b, "a", &mut to_a);
    assert!(to_a.closed.is_empty(), "b refused a's message naming p2: {:?}", to_a.closed);
    b.run(None).expect("run");
    b.pump(t, &mut to_a).expect("pump");
    assert_eq!(b.kernel().aliases(link_at_b).expect("aliases"), vec![], "applied through the ack's written: p2's name goes too");
}
