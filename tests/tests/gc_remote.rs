//! GC property test across two kernels (DESIGN §6 and §8; issue 7): random graphs of objects
//! passed between vats on two kernels joined by a link, over a network that drops, duplicates
//! and reorders frames, with random drops, reaps and crank faults; then everyone lets go and
//! both kernels' tables must hold nothing but pinned roots.
//!
//! Two [`Node`]s, `a` and `b`, each with 2–3 raw [`Vat`]s ([`GcVat`], the vat of `gc_props.rs`:
//! it makes objects, hands what it holds on, asks for objects with a pipelined ping on the
//! answer, pings what it holds, abandons some of its objects, and lets go at once or at its next
//! `bringOutYourDead`, in two phases). Vat 0 of each kernel is the node's bootstrap (the hub):
//! a vat reaches the other kernel by sending to the peer's bootstrap (`Node::peer_root`), which
//! the host hands it; objects of the hub's kernel's other vats cross when the hub hands them on.
//!
//! The network is in the test: each node's frames wait in a queue until a scheduled step
//! delivers, drops, duplicates or delays (sends to the back) them; a clock step makes the
//! senders retransmit what is unacknowledged. Both nodes are pumped after every step.
//!
//! Checked throughout, so that nothing still reachable is ever collected (on either kernel):
//! - a vat is never handed a retired reference, nor told to drop or retire what it does not
//!   have (`gc_props`' `observe` and the GC delivery checks);
//! - a vat's syscalls on what it holds always succeed;
//! - a ping of a held object (also one exported by the other kernel) is answered, or rejected
//!   only because its exporter was terminated or abandoned it;
//! - `tests::check_tables` holds on both kernels after every step, and no connection is ever
//!   closed for a protocol fault.
//!
//! At the end every live vat drops everything, and both kernels run, exchange every frame and
//! reap every live vat until nothing changes: then, on each kernel, the object table holds only
//! the pinned roots (of the vats and of the link), the promise table is empty, every live vat's
//! and the link's c-list is just its root `o+0`, the link keeps no promise aliases and no GC
//! records (its vatstore holds only its sequence numbers), terminated vats' c-lists are empty,
//! and both nodes are idle with nothing unacknowledged.

use kernel_core::{CapData, EndpointId, EndpointStatus, KObjectId, KRef, Kernel, MemStore, VRef};
use kernel_remote::{Frame, KernelId, Node, RemoteConfig, Transport, TransportEvent, WireMessage, APPLIED_KEY, NEXT_SEQ_KEY};
use kernel_syscall::VatEndpoint;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;
use std::time::Duration;
use tests::gc_vat::*;

/// What becomes of the next frame in flight.
#[derive(Debug, Clone, Copy)]
enum Fate {
    Deliver,
    /// Lost: the sender retransmits after its timeout.
    Lose,
    Duplicate,
    /// Sent to the back of the queue (reordered).
    Delay,
}

/// One step of a scenario. Vats (numbered over both kernels: `a`'s first) and picks are taken
/// modulo what exists.
#[derive(Debug, Clone)]
enum Op {
    /// A vat makes an object and holds it.
    Make(usize),
    /// `from` hands one of its things to a vat of its own kernel (`to`), or to the other
    /// kernel's hub.
    Give { from: usize, to: usize, remote: bool, pick: u64 },
    /// `from` asks a vat of its kernel, or the other kernel's hub, for one of its things (odd
    /// `pick`: and pings it, pipelined).
    Ask { from: usize, to: usize, remote: bool, pick: u64 },
    /// A vat pings one of its things.
    Ping { vat: usize, pick: u64 },
    /// A vat lets go of one of its things (even `pick`: `dropImports` at once).
    Drop { vat: usize, pick: u64 },
    /// A vat abandons one of its exported objects it holds.
    Abandon { vat: usize, pick: u64 },
    /// The vat's next delivery fails (hubs excepted).
    Fault(usize),
    /// The host asks a kernel to reap a vat.
    Reap(usize),
    /// A node runs this many cranks.
    Run { node: usize, cranks: u8 },
    /// The next frames from a node meet these fates.
    Net { from: usize, fates: Vec<Fate> },
    /// Time passes: senders retransmit what is unacknowledged.
    Tick,
    /// A node sees its connection come up again (frames in flight stay in flight): it resends
    /// everything unacknowledged.
    Reconnect(usize),
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![6 => Just(Fate::Deliver), 1 => Just(Fate::Lose), 1 => Just(Fate::Duplicate), 2 => Just(Fate::Delay)]
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0usize..6;
    let n = any::<u64>();
    let side = 0usize..2;
    prop_oneof![
        3 => v.clone().prop_map(Op::Make),
        4 => (v.clone(), v.clone(), any::<bool>(), n).prop_map(|(from, to, remote, pick)| Op::Give { from, to, remote, pick }),
        3 => (v.clone(), v.clone(), any::<bool>(), n).prop_map(|(from, to, remote, pick)| Op::Ask { from, to, remote, pick }),
        2 => (v.clone(), n).prop_map(|(vat, pick)| Op::Ping { vat, pick }),
        4 => (v.clone(), n).prop_map(|(vat, pick)| Op::Drop { vat, pick }),
        2 => (v.clone(), n).prop_map(|(vat, pick)| Op::Abandon { vat, pick }),
        1 => v.clone().prop_map(Op::Fault),
        2 => v.prop_map(Op::Reap),
        3 => (side.clone(), 0u8..12).prop_map(|(node, cranks)| Op::Run { node, cranks }),
        6 => (side, proptest::collection::vec(fate(), 1..6)).prop_map(|(from, fates)| Op::Net { from, fates }),
        2 => Just(Op::Tick),
        1 => (0usize..2).prop_map(Op::Reconnect),
    ]
}

/// The network as one node sees it: what it sent, waiting for the schedule.
#[derive(Default)]
struct Net {
    out: VecDeque<Vec<u8>>,
    closed: Vec<String>,
}

impl Transport for Net {
    fn send(&mut self, _peer: &KernelId, frame: Vec<u8>) {
        self.out.push_back(frame);
    }
    fn close(&mut self, peer: &KernelId, reason: &str) {
        self.closed.push(format!("closed to {peer}: {reason}"));
    }
    fn poll_event(&mut self) -> Option<TransportEvent> {
        None
    }
}

/// One kernel with its vats and its link to the other.
struct Side {
    node: Node<MemStore>,
    net: Net,
    id: KernelId,
    /// Global indexes of its vats (the first is the hub).
    vats: Vec<usize>,
    /// Their roots.
    roots: Vec<KRef>,
    /// The other kernel's hub, as a local object.
    peer_root: KRef,
    link: EndpointId,
    link_root: KObjectId,
}

fn id(s: &str) -> KernelId {
    s.parse().expect("kernel id")
}

type Seen = Rc<RefCell<BTreeMap<&'static str, u64>>>;

struct World {
    sides: [Side; 2],
    shared: SharedRef,
    now: Duration,
    /// Data frames delivered, by direction (`from` side) and sequence: each counted once.
    delivered: [BTreeSet<u64>; 2],
    /// Objects that were in a link's c-list, by side: `o-N` (a local object the peer imported)
    /// and `o+N` (the peer's object, imported here).
    crossed: [BTreeSet<(KObjectId, bool)>; 2],
    seen: Seen,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl World {
    fn new(counts: [usize; 2], seen: &Seen) -> Result<Self, String> {
        let shared: SharedRef = Rc::new(RefCell::new(Shared { seen: Rc::clone(seen), ..Shared::default() }));
        let names = ["a", "b"];
        let mut sides = Vec::new();
        let mut g = 0;
        for s in 0..2 {
            let mut node = Node::new(Kernel::open(MemStore::new()).map_err(err)?, id(names[s]), RemoteConfig::default());
            let (mut vats, mut roots) = (Vec::new(), Vec::new());
            for _ in 0..counts[s] {
                let vat = GcVat { idx: g, shared: Rc::clone(&shared) };
                let ep = node.kernel_mut().add_endpoint(&format!("v{g}"), VatEndpoint::boxed(vat)).map_err(err)?;
                let root = node.kernel().root(ep).map_err(err)?;
                if vats.is_empty() {
                    node.set_bootstrap(root);
                }
                let mut st = VatState { ep: Some(ep), ..VatState::default() };
                st.objects.insert(VRef::ROOT);
                shared.borrow_mut().vats.push(st);
                vats.push(g);
                roots.push(KRef::Object(root));
                g += 1;
            }
            let peer = id(names[1 - s]);
            let link = node.add_peer(peer.clone()).map_err(err)?;
            let link_root = node.kernel().root(link).map_err(err)?;
            let peer_root = KRef::Object(node.peer_root(&peer).map_err(err)?);
            let mut net = Net::default();
            node.handle(Duration::ZERO, TransportEvent::Connected(peer), &mut net).map_err(err)?;
            sides.push(Side { node, net, id: id(names[s]), vats, roots, peer_root, link, link_root });
        }
        let [a, b]: [Side; 2] = sides.try_into().map_err(|_| "two sides")?;
        Ok(World {
            sides: [a, b],
            shared,
            now: Duration::ZERO,
            delivered: [BTreeSet::new(), BTreeSet::new()],
            crossed: [BTreeSet::new(), BTreeSet::new()],
            seen: Rc::clone(seen),
        })
    }

    fn total(&self) -> usize {
        self.sides[0].vats.len() + self.sides[1].vats.len()
    }

    /// Vat `v` (modulo): its side and its index there.
    fn locate(&self, v: usize) -> (usize, usize) {
        let v = v % self.total();
        let na = self.sides[0].vats.len();
        if v < na {
            (0, v)
        } else {
            (1, v - na)
        }
    }

    fn ep(&self, g: usize) -> EndpointId {
        self.shared.borrow().vats[g].ep.expect("registered")
    }

    fn live(&self, s: usize, g: usize) -> Result<bool, String> {
        Ok(matches!(self.sides[s].node.kernel().endpoint(self.ep(g)).map_err(err)?.map(|r| r.status), Some(EndpointStatus::Live)))
    }

    fn saw(&self, what: &'static str) {
        *self.seen.borrow_mut().entry(what).or_default() += 1;
    }

    /// The host queues `method` on vat `v`'s root, not caring for the answer.
    fn tell(&mut self, v: usize, method: &str, n: u64, slots: Vec<KRef>) -> Result<(), String> {
        let (s, i) = self.locate(v);
        let side = &mut self.sides[s];
        let kp = side
            .node
            .kernel_mut()
            .queue_message(side.roots[i], method, CapData { body: n.to_string().into_bytes(), slots })
            .map_err(err)?;
        side.node.kernel_mut().set_pinned(kp.into(), false).map_err(err)
    }

    /// Where `from` sends a give or an ask: a vat of its own kernel, or the other kernel's hub.
    fn destination(&self, from: usize, to: usize, remote: bool) -> KRef {
        let (s, _) = self.locate(from);
        let side = &self.sides[s];
        if remote {
            side.peer_root
        } else {
            side.roots[to % side.roots.len()]
        }
    }

    fn pump(&mut self) -> Result<(), String> {
        let now = self.now;
        for side in &mut self.sides {
            side.node.pump(now, &mut side.net).map_err(err)?;
        }
        Ok(())
    }

    /// Hand one frame from side `from` to the other side, counting the GC messages that cross.
    fn deliver(&mut self, from: usize, frame: Vec<u8>) -> Result<(), String> {
        if let Ok(Frame::Data { seq, message }) = Frame::decode(&frame, usize::MAX) {
            if self.delivered[from].insert(seq.0) {
                let kind = match WireMessage::decode(&message) {
                    Ok(WireMessage::Deliver { .. }) => "wire Deliver",
                    Ok(WireMessage::Resolve { .. }) => "wire Resolve",
                    Ok(WireMessage::Drop { .. }) => "wire Drop",
                    Ok(WireMessage::Retire { .. }) => "wire Retire",
                    Ok(WireMessage::Retired { .. }) => "wire Retired",
                    Ok(WireMessage::Forget { .. }) => "wire Forget",
                    Err(_) => "wire undecodable",
                };
                self.saw(kind);
            }
        }
        let now = self.now;
        let sender = self.sides[from].id.clone();
        let to = &mut self.sides[1 - from];
        to.node.handle(now, TransportEvent::Frame(sender, frame), &mut to.net).map_err(err)
    }

    fn net(&mut self, from: usize, fates: &[Fate]) -> Result<(), String> {
        for fate in fates {
            let Some(frame) = self.sides[from].net.out.pop_front() else { break };
            match fate {
                Fate::Deliver => self.deliver(from, frame)?,
                Fate::Lose => self.saw("frame lost"),
                Fate::Duplicate => {
                    self.saw("frame duplicated");
                    self.deliver(from, frame.clone())?;
                    self.deliver(from, frame)?;
                }
                Fate::Delay => {
                    self.saw("frame delayed");
                    self.sides[from].net.out.push_back(frame);
                }
            }
        }
        Ok(())
    }

    fn check(&mut self, when: &str) -> Result<(), String> {
        let failures = self.shared.borrow().failures.clone();
        if !failures.is_empty() {
            return Err(format!("{when}: {}", failures.join("\n  ")));
        }
        for (s, side) in self.sides.iter_mut().enumerate() {
            for (kref, vref) in side.node.kernel().clist(side.link).map_err(err)? {
                if let KRef::Object(o) = kref {
                    if vref != VRef::ROOT {
                        self.crossed[s].insert((o, vref.allocator == kernel_core::Allocator::Kernel));
                    }
                }
            }
            let problems = tests::check_tables(side.node.kernel());
            if !problems.is_empty() {
                return Err(format!("{when}: kernel {}: inconsistent tables:\n  {}", side.id, problems.join("\n  ")));
            }
            let faults = side.node.take_faults();
            if !faults.is_empty() || !side.net.closed.is_empty() {
                return Err(format!("{when}: kernel {} closed a connection: {faults:?} {:?}", side.id, side.net.closed));
            }
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Make(v) => self.tell(*v, "make", 0, vec![])?,
            Op::Give { from, to, remote, pick } => {
                let dest = self.destination(*from, *to, *remote);
                self.tell(*from, "give", *pick, vec![dest])?;
            }
            Op::Ask { from, to, remote, pick } => {
                let dest = self.destination(*from, *to, *remote);
                self.tell(*from, "ask", *pick, vec![dest])?;
            }
            Op::Ping { vat, pick } => self.tell(*vat, "pingOut", *pick, vec![])?,
            Op::Drop { vat, pick } => self.tell(*vat, "drop", *pick, vec![])?,
            Op::Abandon { vat, pick } => self.tell(*vat, "abandon", *pick, vec![])?,
            Op::Fault(v) => {
                let (s, i) = self.locate(*v);
                if i != 0 {
                    let g = self.sides[s].vats[i];
                    self.shared.borrow_mut().vats[g].fault_armed = true;
                }
            }
            Op::Reap(v) => {
                let (s, i) = self.locate(*v);
                let ep = self.ep(self.sides[s].vats[i]);
                self.sides[s].node.kernel_mut().reap(ep).map_err(err)?;
            }
            Op::Run { node, cranks } => {
                self.sides[*node].node.run(Some(u64::from(*cranks))).map_err(err)?;
            }
            Op::Net { from, fates } => self.net(*from, fates)?,
            Op::Tick => self.now += Duration::from_secs(6),
            Op::Reconnect(s) => {
                let peer = self.sides[1 - s].id.clone();
                let side = &mut self.sides[*s];
                side.node.handle(self.now, TransportEvent::Connected(peer), &mut side.net).map_err(err)?;
            }
        }
        self.pump()
    }

    /// Run both kernels and exchange every frame, without loss, until both nodes are idle.
    fn settle(&mut self) -> Result<(), String> {
        for _ in 0..200 {
            for side in &mut self.sides {
                side.node.run(None).map_err(err)?;
            }
            self.pump()?;
            let mut moved = false;
            for from in 0..2 {
                while let Some(frame) = self.sides[from].net.out.pop_front() {
                    self.deliver(from, frame)?;
                    moved = true;
                }
            }
            self.pump()?;
            let idle = self.sides.iter().all(|s| s.node.is_idle() && s.net.out.is_empty());
            if idle && !moved {
                return Ok(());
            }
            self.now += Duration::from_secs(6);
        }
        Err("the two kernels do not settle".into())
    }

    /// What the end state is measured by: table sizes and backlogs on both kernels.
    fn size(&self) -> Result<Vec<usize>, String> {
        let mut size = Vec::new();
        for side in &self.sides {
            let k = side.node.kernel();
            size.extend([
                k.objects().map_err(err)?.len(),
                k.promise_records().map_err(err)?.len(),
                k.store().len(),
                side.node.backlog() as usize,
            ]);
        }
        Ok(size)
    }

    /// Everyone lets go; reap and exchange until nothing changes.
    fn wind_down(&mut self) -> Result<(), String> {
        for st in &mut self.shared.borrow_mut().vats {
            st.fault_armed = false;
        }
        self.settle()?;
        self.check("settling")?;
        for g in 0..self.total() {
            let (s, _) = self.locate(g);
            if self.live(s, g)? {
                self.tell(g, "dropAll", 0, vec![])?;
            }
        }
        self.settle()?;
        let (mut last, mut same) = (None, 0);
        for _ in 0..40 {
            for g in 0..self.total() {
                let (s, _) = self.locate(g);
                if self.live(s, g)? {
                    let ep = self.ep(g);
                    self.sides[s].node.kernel_mut().reap(ep).map_err(err)?;
                }
            }
            self.settle()?;
            self.check("winding down")?;
            let size = self.size()?;
            if last.as_ref() == Some(&size) {
                same += 1;
                if same >= 3 {
                    return Ok(());
                }
            } else {
                same = 0;
            }
            last = Some(size);
        }
        Err("reaping does not converge".into())
    }

    /// Zero leaks on both kernels (see the module doc).
    fn leaks(&self) -> Result<Vec<String>, String> {
        let mut leaks = Vec::new();
        for (s, side) in self.sides.iter().enumerate() {
            let k = side.node.kernel();
            let who = &side.id;
            let mut roots: BTreeSet<KRef> = side.roots.iter().copied().collect();
            roots.insert(KRef::Object(side.link_root));
            for (o, rec) in k.objects().map_err(err)? {
                if !roots.contains(&KRef::Object(o)) || !rec.pinned {
                    leaks.push(format!("{who}: object {o} {rec:?}"));
                }
            }
            for (p, rec) in k.promise_records().map_err(err)? {
                leaks.push(format!("{who}: promise {p} {rec:?}"));
            }
            for &g in &side.vats {
                let ep = self.ep(g);
                let live = self.live(s, g)?;
                for (kref, vref) in k.clist(ep).map_err(err)? {
                    if !(live && vref == VRef::ROOT) {
                        leaks.push(format!("{who}: vat {g} ({ep}, live {live}) c-list: {kref} {vref}"));
                    }
                }
                let sh = self.shared.borrow();
                if live && !sh.vats[g].awaiting.is_empty() {
                    leaks.push(format!("{who}: vat {g} still awaits {:?}", sh.vats[g].awaiting));
                }
            }
            for (kref, vref) in k.clist(side.link).map_err(err)? {
                if vref != VRef::ROOT || kref != KRef::Object(side.link_root) {
                    leaks.push(format!("{who}: link c-list: {kref} {vref}"));
                }
            }
            for (vref, kref) in k.aliases(side.link).map_err(err)? {
                leaks.push(format!("{who}: link alias {vref} -> {kref}"));
            }
            for (key, _) in k.vatstore(side.link).map_err(err)? {
                if key != NEXT_SEQ_KEY && key != APPLIED_KEY {
                    leaks.push(format!("{who}: link vatstore keeps {}", key.escape_ascii()));
                }
            }
            if !side.node.is_idle() || side.node.backlog() != 0 || k.queue_len() != 0 {
                leaks.push(format!("{who}: not idle: backlog {}, {} queued", side.node.backlog(), k.queue_len()));
            }
        }
        Ok(leaks)
    }
}

fn run_case(counts: [usize; 2], ops: &[Op], seen: &Seen) -> Result<(), String> {
    let mut w = World::new(counts, seen)?;
    w.pump()?;
    for (i, op) in ops.iter().enumerate() {
        w.apply(op)?;
        w.check(&format!("after op {i} {op:?}"))?;
    }
    w.wind_down()?;
    w.check("after winding down")?;
    // Objects that crossed the link and are gone now: collected across kernels.
    for s in 0..2 {
        let k = w.sides[s].node.kernel();
        for (o, exported) in &w.crossed[s] {
            if k.object(*o).map_err(err)?.is_none() {
                w.saw(if *exported { "collected: exported to the peer" } else { "collected: imported from the peer" });
            }
        }
    }
    let leaks = w.leaks()?;
    if !leaks.is_empty() {
        return Err(format!("leaks after everyone let go:\n  {}", leaks.join("\n  ")));
    }
    Ok(())
}

#[test]
fn object_graphs_across_two_kernels_are_collected_completely_and_never_early() {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(128);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let strategy = (2usize..=3, 2usize..=3, proptest::collection::vec(op(), 1..120));
    let seen: Seen = Rc::default();
    let outcome = runner.run(&strategy, |(na, nb, ops)| run_case([na, nb], &ops, &seen).map_err(TestCaseError::fail));
    if let Err(e) = outcome {
        panic!("{e}");
    }
    let seen = seen.borrow();
    eprintln!("over {cases} cases: {seen:?}");
    // The scenarios carry GC across the link, both ways of it, and reach every kind of GC
    // delivery, faults and answered pings.
    for what in [
        "collected: exported to the peer",
        "collected: imported from the peer",
        "wire Drop",
        "wire Retire",
        "wire Retired",
        // Each Resolve leaves names its acknowledgement later lets go (no Forget messages
        // since wire version 3).
        "wire Resolve",
        "dropExports",
        "retireExports",
        "retireImports",
        "fault",
        "pong",
    ] {
        // The seed is random (each run explores new cases), so the bar sits well below the
        // usual counts: the rarest, wire Retired, averages ~28 per 128 cases and once came in
        // at 15, under the old bar of cases / 8.
        assert!(seen.get(what).copied().unwrap_or(0) >= u64::from(cases / 16), "too few {what}: {seen:?}");
    }
}
