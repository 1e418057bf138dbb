//! Distributed GC across a link (issue 7): an object exported by a vat on one kernel, held by a
//! vat on the other and then let go, leaves every table on both kernels — and a drop that races
//! a message naming the object again does not lose it.

use kernel_core::{CapData, KRef, Kernel, MemStore, VRef};
use kernel_remote::{KernelId, Node, RemoteConfig, Transport, TransportEvent};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
use std::time::Duration;

fn id(s: &str) -> KernelId {
    s.parse().expect("kernel id")
}

/// A transport that queues what the node sends, for the test to carry across.
#[derive(Default)]
struct Wire {
    sent: Vec<Vec<u8>>,
    closed: Vec<String>,
}

impl Transport for Wire {
    fn send(&mut self, _: &KernelId, frame: Vec<u8>) {
        self.sent.push(frame);
    }
    fn close(&mut self, _: &KernelId, reason: &str) {
        self.closed.push(reason.to_owned());
    }
    fn poll_event(&mut self) -> Option<TransportEvent> {
        None
    }
}

/// The vat on both kernels. Holds at most one reference, as `held` in its vatstore.
/// - `give(to)`: export a new object and send it to `to` with `take`;
/// - `give_held(to)`: send the held reference to `to` with `take`;
/// - `take(x)`: hold `x`;
/// - `let_go`: hold nothing (the import goes at the next `bringOutYourDead`);
/// - `ping`: answer `pong`.
struct Holder;

impl Behavior for Holder {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        let one = |v: VRef| VatData { body: br#"[{"$slot":0}]"#.to_vec(), slots: vec![v] };
        match method {
            "give" => {
                let to = *args.slots.first().ok_or_else(|| VatError::new("give to whom?"))?;
                let x = cx.export()?;
                cx.send_only(to, "take", one(x))?;
                cx.set("mine", &x.to_string())?;
            }
            "give_held" => {
                let to = *args.slots.first().ok_or_else(|| VatError::new("give to whom?"))?;
                let held: VRef = cx.get("held")?.and_then(|s| s.parse().ok()).ok_or_else(|| VatError::new("nothing held"))?;
                cx.send_only(to, "take", one(held))?;
            }
            "take" => {
                let x = *args.slots.first().ok_or_else(|| VatError::new("take what?"))?;
                cx.set("held", &x.to_string())?;
            }
            "let_go" => cx.syscall().vatstore_delete("held")?,
            _ => {}
        }
        Ok(Answer::Value(VatData::plain("pong")))
    }

    fn live_imports(&mut self, cx: &mut Cx<'_, '_, '_>, _: &[VRef]) -> Result<Option<Vec<VRef>>, VatError> {
        Ok(Some(cx.get("held")?.and_then(|s| s.parse().ok()).into_iter().collect()))
    }

    fn forget(&mut self, cx: &mut Cx<'_, '_, '_>, export: VRef) -> Result<(), VatError> {
        if cx.get("mine")?.as_deref() == Some(export.to_string().as_str()) {
            cx.syscall().vatstore_delete("mine")?;
            cx.set("forgot", &export.to_string())?;
        }
        Ok(())
    }
}

struct Pair {
    a: Node<MemStore>,
    b: Node<MemStore>,
    to_a: Wire,
    to_b: Wire,
    t: Duration,
}

fn node(name: &str, peer: &str) -> Node<MemStore> {
    let mut node = Node::new(Kernel::open(MemStore::new()).expect("open"), id(name), RemoteConfig::default());
    let holder = node.kernel_mut().add_endpoint("holder", VatEndpoint::boxed(HelperVat::new(Holder))).expect("vat");
    let root = node.kernel().root(holder).expect("root");
    node.set_bootstrap(root);
    node.add_peer(id(peer)).expect("peer");
    node
}

impl Pair {
    fn new() -> Pair {
        let mut p = Pair { a: node("a", "b"), b: node("b", "a"), to_a: Wire::default(), to_b: Wire::default(), t: Duration::ZERO };
        p.a.handle(p.t, TransportEvent::Connected(id("b")), &mut p.to_b).expect("connect");
        p.b.handle(p.t, TransportEvent::Connected(id("a")), &mut p.to_a).expect("connect");
        p
    }

    fn holder(node: &Node<MemStore>) -> KRef {
        let ep = node.kernel().endpoint_id("holder").expect("read").expect("holder");
        KRef::Object(node.kernel().root(ep).expect("root"))
    }

    fn peer(node: &Node<MemStore>, peer: &str) -> KRef {
        KRef::Object(node.peer_root(&id(peer)).expect("peer root"))
    }

    /// The host of `on` asks its holder to `method`, naming `arg`.
    fn ask(&mut self, on_a: bool, method: &str, arg: Option<KRef>) {
        let node = if on_a { &mut self.a } else { &mut self.b };
        let target = Pair::holder(node);
        let args = CapData { body: br#"[{"$slot":0}]"#.to_vec(), slots: arg.into_iter().collect() };
        let kp = node.kernel_mut().queue_message(target, method, args).expect("queue");
        node.kernel_mut().set_pinned(KRef::Promise(kp), false).expect("the host does not keep the answer");
    }

    /// Run, pump and carry frames both ways until nothing moves; every holder is reaped each
    /// round if `reap`.
    fn settle(&mut self, reap: bool) {
        for _ in 0..50 {
            self.t += Duration::from_millis(10);
            for on_a in [true, false] {
                let (node, out) = if on_a { (&mut self.a, &mut self.to_b) } else { (&mut self.b, &mut self.to_a) };
                if reap {
                    let ep = node.kernel().endpoint_id("holder").expect("read").expect("holder");
                    node.kernel_mut().reap(ep).expect("reap");
                }
                node.run(None).expect("run");
                node.pump(self.t, out).expect("pump");
            }
            for f in std::mem::take(&mut self.to_b.sent) {
                self.b.handle(self.t, TransportEvent::Frame(id("a"), f), &mut self.to_a).expect("frame");
            }
            self.b.pump(self.t, &mut self.to_a).expect("pump");
            for f in std::mem::take(&mut self.to_a.sent) {
                self.a.handle(self.t, TransportEvent::Frame(id("b"), f), &mut self.to_b).expect("frame");
            }
            self.a.pump(self.t, &mut self.to_b).expect("pump");
            if self.a.is_idle() && self.b.is_idle() && self.to_a.sent.is_empty() && self.to_b.sent.is_empty() {
                break;
            }
        }
        assert!(self.to_a.closed.is_empty() && self.to_b.closed.is_empty(), "{:?} {:?}", self.to_a.closed, self.to_b.closed);
    }

    fn clean(node: &Node<MemStore>, name: &str) {
        let k = node.kernel();
        let objects = k.objects().expect("objects");
        assert!(objects.iter().all(|(_, r)| r.pinned), "{name}: only pinned roots are left: {objects:?}");
        assert_eq!(objects.len(), 2, "{name}: the holder's root and the link's");
        assert_eq!(k.promises().expect("promises"), vec![], "{name}: no promise is left");
        for (ep, _) in k.endpoints().expect("endpoints") {
            let clist = k.clist(ep).expect("c-list");
            assert_eq!(clist.iter().map(|(_, v)| *v).collect::<Vec<_>>(), vec![VRef::ROOT], "{name}: {ep}'s c-list is its root");
            assert_eq!(k.aliases(ep).expect("aliases"), vec![], "{name}: {ep} keeps no names");
            let marks: Vec<_> = k.vatstore(ep).expect("vatstore").into_iter().filter(|(k, _)| k.first() == Some(&b'x')).collect();
            assert!(marks.is_empty() || k.endpoint(ep).expect("read").is_some_and(|r| r.name == "holder"), "{name}: {ep}: {marks:?}");
        }
    }
}

#[test]
fn an_object_held_across_the_link_and_let_go_leaves_both_kernels() {
    let mut p = Pair::new();
    let b_root = Pair::peer(&p.a, "b");
    p.ask(true, "give", Some(b_root));
    p.settle(false);
    // b holds a's object: its link exports it there, a's link imports it.
    let link_b = p.b.peer_endpoint(&id("a")).expect("link");
    assert_eq!(p.b.kernel().clist(link_b).expect("c-list").len(), 2, "b's link: its root and a's object");
    assert_eq!(p.a.kernel().objects().expect("objects").len(), 3);
    p.ask(false, "let_go", None);
    p.settle(true);
    Pair::clean(&p.a, "a");
    Pair::clean(&p.b, "b");
    let holder_a = p.a.kernel().endpoint_id("holder").expect("read").expect("holder");
    let forgot = p.a.kernel().vatstore(holder_a).expect("vatstore").into_iter().any(|(k, _)| k == b"forgot");
    assert!(forgot, "a's vat was told to retire its export");
}

#[test]
fn an_object_named_again_while_its_drop_is_in_flight_survives() {
    let mut p = Pair::new();
    let b_root = Pair::peer(&p.a, "b");
    p.ask(true, "give", Some(b_root));
    p.settle(false);
    // b lets go of it, and b's Drop and Retire are held up on the way...
    p.ask(false, "let_go", None);
    let ep = p.b.kernel().endpoint_id("holder").expect("read").expect("holder");
    p.b.kernel_mut().reap(ep).expect("reap");
    p.b.run(None).expect("run");
    p.b.kernel_mut().reap(ep).expect("reap");
    p.b.run(None).expect("run");
    p.b.pump(p.t, &mut p.to_a).expect("pump");
    let held_up = std::mem::take(&mut p.to_a.sent);
    assert!(!held_up.is_empty(), "b sent its drop");
    // ...while a's vat, which still has it, sends it to b again.
    let holder_a = p.a.kernel().endpoint_id("holder").expect("read").expect("holder");
    let mine =
        p.a.kernel().vatstore(holder_a).expect("vatstore").into_iter().find(|(k, _)| k == b"mine").expect("a's vat keeps its object");
    let mine: VRef = String::from_utf8(mine.1).expect("utf8").parse().expect("vref");
    let x = p.a.kernel().clist(holder_a).expect("c-list").into_iter().find(|(_, v)| *v == mine).expect("exported").0;
    p.ask(true, "take", Some(x)); // a's vat holds its own object as `held` too
    p.ask(true, "give_held", Some(b_root));
    p.a.run(None).expect("run");
    p.a.pump(p.t, &mut p.to_b).expect("pump");
    // The old drop arrives first, then the new message.
    for f in held_up {
        p.a.handle(p.t, TransportEvent::Frame(id("b"), f), &mut p.to_b).expect("frame");
    }
    p.a.pump(p.t, &mut p.to_b).expect("pump");
    p.settle(false);
    // b holds it again and can call it: a did not retire it.
    let link_b = p.b.peer_endpoint(&id("a")).expect("link");
    assert_eq!(p.b.kernel().clist(link_b).expect("c-list").len(), 2, "b's link holds a's object again");
    assert!(p.b.kernel().vatstore(ep).expect("vatstore").into_iter().any(|(k, _)| k == b"held"));
    let forgot = p.a.kernel().vatstore(holder_a).expect("vatstore").into_iter().any(|(k, _)| k == b"forgot");
    assert!(!forgot, "a's vat was not told to retire an object b holds");
    // Letting go for real, on both sides, leaves nothing.
    p.ask(false, "let_go", None);
    p.ask(true, "let_go", None);
    p.settle(true);
    Pair::clean(&p.a, "a");
    Pair::clean(&p.b, "b");
}
