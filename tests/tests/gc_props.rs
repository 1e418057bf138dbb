//! GC property test (DESIGN §6, §10.7; issue 7): random graphs of objects passed between 2–5
//! vats, random drops, random reaps, random crank faults; then everyone lets go and the tables
//! must hold nothing but pinned roots.
//!
//! Each vat ([`GcVat`]) makes objects, hands what it holds to other vats (directly, or as the
//! answer to a request, with a message pipelined on that answer), pings what it holds, abandons
//! some of its objects, and lets
//! go of things: at once (`dropImports` in the same delivery) or at its next
//! `bringOutYourDead`, which drops every import it no longer holds and retires those it had
//! dropped before (two phases, so dropped-but-recognised imports linger). The host also asks vats
//! for objects, pins them, pings them and unpins them. A fault armed on a vat makes its next
//! delivery (of any kind, GC ones included) fail, which terminates it.
//!
//! Checked throughout, so that nothing still reachable is ever collected:
//! - a vat is never handed a retired reference: every `o+N` it is delivered is one of its live
//!   objects, every `o-N` is either held in its c-list or a new import numbered past all earlier
//!   ones, every GC delivery names refs it has (dropExports/retireExports: its objects;
//!   retireImports: imports it dropped);
//! - a vat's syscalls on what it holds always succeed (a vat only fails when a fault was armed);
//! - a message to a held object (by a vat or the host) is delivered, or rejected only because its
//!   exporter was terminated or abandoned it (or, pipelined on an answer that was plain data, "not an object"),
//!   never as "no such object/promise"; every answer a vat awaits arrives;
//! - `tests::check_tables` (c-lists both ways, deciders, and every reference count recomputed
//!   from scratch) holds after every operation.
//!
//! At the end every live vat drops everything, the host unpins everything it pinned, and every
//! live vat is reaped until nothing changes: then the object table holds only the (pinned) vat
//! roots, the promise table is empty, every live vat's c-list is just its root `o+0`, and every
//! terminated vat's c-list is empty.

use kernel_core::{CapData, EndpointId, EndpointStatus, KRef, Kernel, MemStore, Settlement, VRef};
use kernel_syscall::VatEndpoint;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use tests::gc_vat::*;

/// One step of a scenario. Vats and picks are taken modulo what exists.
#[derive(Debug, Clone)]
enum Op {
    /// A vat makes an object and holds it.
    Make(usize),
    /// `from` hands one of its things to `to`.
    Give { from: usize, to: usize, pick: u64 },
    /// `from` asks `to` for one of its things (odd `pick`: and pings it, pipelined).
    Ask { from: usize, to: usize, pick: u64 },
    /// A vat pings one of its things.
    Ping { vat: usize, pick: u64 },
    /// A vat lets go of one of its things (even `pick`: `dropImports` at once).
    Drop { vat: usize, pick: u64 },
    /// A vat abandons one of its exported objects it holds.
    Abandon { vat: usize, pick: u64 },
    /// The vat's next delivery fails.
    Fault(usize),
    /// The host asks the kernel to reap a vat.
    Reap(usize),
    /// The host asks a vat for a thing and pins it.
    HostAsk { vat: usize, pick: u64 },
    /// The host pings a thing it pinned.
    HostPing(u64),
    /// The host unpins a thing.
    HostUnpin(u64),
    /// Run this many cranks.
    Run(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let v = 0usize..5;
    let n = any::<u64>();
    prop_oneof![
        3 => v.clone().prop_map(Op::Make),
        4 => (v.clone(), v.clone(), n).prop_map(|(from, to, pick)| Op::Give { from, to, pick }),
        3 => (v.clone(), v.clone(), n).prop_map(|(from, to, pick)| Op::Ask { from, to, pick }),
        2 => (v.clone(), n).prop_map(|(vat, pick)| Op::Ping { vat, pick }),
        4 => (v.clone(), n).prop_map(|(vat, pick)| Op::Drop { vat, pick }),
        1 => v.clone().prop_map(Op::Fault),
        1 => (v.clone(), n).prop_map(|(vat, pick)| Op::Abandon { vat, pick }),
        2 => v.clone().prop_map(Op::Reap),
        1 => (v, n).prop_map(|(vat, pick)| Op::HostAsk { vat, pick }),
        1 => n.prop_map(Op::HostPing),
        1 => n.prop_map(Op::HostUnpin),
        3 => (0u8..12).prop_map(Op::Run),
    ]
}

struct World {
    k: Kernel<MemStore>,
    shared: SharedRef,
    roots: Vec<KRef>,
    /// What the host pinned, in order.
    pins: Vec<KRef>,
}

impl World {
    fn new(n: usize, seen: &Rc<RefCell<BTreeMap<&'static str, u64>>>) -> Self {
        let shared: SharedRef = Rc::new(RefCell::new(Shared { seen: Rc::clone(seen), ..Shared::default() }));
        let mut k = Kernel::open(MemStore::new()).expect("open");
        let mut roots = Vec::new();
        for idx in 0..n {
            let ep = k.add_endpoint(&format!("v{idx}"), VatEndpoint::boxed(GcVat { idx, shared: Rc::clone(&shared) })).expect("add");
            roots.push(KRef::Object(k.root(ep).expect("root")));
            let mut st = VatState { ep: Some(ep), ..VatState::default() };
            st.objects.insert(VRef::ROOT);
            shared.borrow_mut().vats.push(st);
        }
        World { k, shared, roots, pins: Vec::new() }
    }

    fn ep(&self, i: usize) -> EndpointId {
        self.shared.borrow().vats[i].ep.expect("registered")
    }

    fn live(&self, i: usize) -> bool {
        matches!(self.k.endpoint(self.ep(i)).expect("read").map(|r| r.status), Some(EndpointStatus::Live))
    }

    /// The host queues `method` on vat `i`'s root, not caring for the answer (unpinned at once).
    fn tell(&mut self, i: usize, method: &str, n: u64, slots: Vec<KRef>) -> Result<(), String> {
        let kp =
            self.k.queue_message(self.roots[i], method, CapData { body: n.to_string().into_bytes(), slots }).map_err(|e| e.to_string())?;
        self.k.set_pinned(kp.into(), false).map_err(|e| e.to_string())
    }

    /// The host queues a request whose answer it watches (pinned until the host has read it).
    fn request(&mut self, target: KRef, method: &str, n: u64, ping: bool) -> Result<(), String> {
        let kp = self.k.queue_message(target, method, CapData::plain(n.to_string())).map_err(|e| e.to_string())?;
        let shared = Rc::clone(&self.shared);
        self.k.watch(kp, move |kp, s| shared.borrow_mut().host_settled.push((kp, s.clone(), ping))).map_err(|e| e.to_string())
    }

    /// Act on the answers the host's watchers saw: pin what was asked for, check pings, and
    /// unpin the answers.
    fn absorb_answers(&mut self) -> Result<(), String> {
        let settled = std::mem::take(&mut self.shared.borrow_mut().host_settled);
        for (kp, s, ping) in settled {
            match (&s, ping) {
                (Settlement::Fulfilled(d), false) => {
                    if let Some(r @ KRef::Object(_)) = d.as_reference() {
                        self.k.set_pinned(r, true).map_err(|e| e.to_string())?;
                        self.pins.push(r);
                    }
                }
                (Settlement::Rejected(d), true) => {
                    let text = String::from_utf8_lossy(&d.body);
                    if !(text.contains("vat terminated") || text.contains("delivery failed") || text.contains("abandoned by its exporter"))
                    {
                        self.shared.borrow_mut().failures.push(format!("the host's ping was rejected: {text}"));
                    }
                }
                _ => {}
            }
            self.k.set_pinned(kp.into(), false).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn step(&mut self, max: u64) -> Result<(), String> {
        for _ in 0..max {
            if self.k.step().map_err(|e| format!("step failed: {e}"))?.is_none() {
                break;
            }
            self.absorb_answers()?;
        }
        Ok(())
    }

    fn check(&self, when: &str) -> Result<(), String> {
        let failures = self.shared.borrow().failures.clone();
        if !failures.is_empty() {
            return Err(format!("{when}: {}", failures.join("\n  ")));
        }
        let problems = tests::check_tables(&self.k);
        if !problems.is_empty() {
            return Err(format!("{when}: inconsistent tables:\n  {}", problems.join("\n  ")));
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let n = self.roots.len();
        match *op {
            Op::Make(v) => self.tell(v % n, "make", 0, vec![]),
            Op::Give { from, to, pick } => self.tell(from % n, "give", pick, vec![self.roots[to % n]]),
            Op::Ask { from, to, pick } => self.tell(from % n, "ask", pick, vec![self.roots[to % n]]),
            Op::Ping { vat, pick } => self.tell(vat % n, "pingOut", pick, vec![]),
            Op::Drop { vat, pick } => self.tell(vat % n, "drop", pick, vec![]),
            Op::Abandon { vat, pick } => self.tell(vat % n, "abandon", pick, vec![]),
            Op::Fault(v) => {
                self.shared.borrow_mut().vats[v % n].fault_armed = true;
                Ok(())
            }
            Op::Reap(v) => self.k.reap(self.ep(v % n)).map_err(|e| e.to_string()),
            Op::HostAsk { vat, pick } => self.request(self.roots[vat % n], "provide", pick, false),
            Op::HostPing(pick) if !self.pins.is_empty() => {
                let target = self.pins[(pick % self.pins.len() as u64) as usize];
                self.request(target, "ping", 0, true)
            }
            Op::HostUnpin(pick) if !self.pins.is_empty() => {
                let r = self.pins.remove((pick % self.pins.len() as u64) as usize);
                // Pinned twice (asked for twice): still pinned while the other pin stands.
                if !self.pins.contains(&r) {
                    self.k.set_pinned(r, false).map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Op::HostPing(_) | Op::HostUnpin(_) => Ok(()),
            Op::Run(c) => self.step(u64::from(c)),
        }
    }

    /// Everyone lets go; reap until nothing changes.
    fn wind_down(&mut self) -> Result<(), String> {
        for i in 0..self.roots.len() {
            self.shared.borrow_mut().vats[i].fault_armed = false;
        }
        self.step(u64::MAX)?;
        for i in 0..self.roots.len() {
            if self.live(i) {
                self.tell(i, "dropAll", 0, vec![])?;
            }
        }
        self.step(u64::MAX)?;
        let pins: BTreeSet<KRef> = std::mem::take(&mut self.pins).into_iter().collect();
        for r in pins {
            self.k.set_pinned(r, false).map_err(|e| e.to_string())?;
        }
        let mut last = None;
        for _ in 0..20 {
            for i in 0..self.roots.len() {
                if self.live(i) {
                    self.k.reap(self.ep(i)).map_err(|e| e.to_string())?;
                }
            }
            self.step(u64::MAX)?;
            let size = (
                self.k.objects().map_err(|e| e.to_string())?.len(),
                self.k.promises().map_err(|e| e.to_string())?.len(),
                self.k.store().len(),
            );
            if last == Some(size) {
                return Ok(());
            }
            last = Some(size);
        }
        Err("reaping does not converge".into())
    }

    /// Zero leaks: only the roots, no promises, c-lists hold only their roots.
    fn leaks(&self) -> Result<Vec<String>, String> {
        let mut leaks = Vec::new();
        let roots: BTreeSet<KRef> = self.roots.iter().copied().collect();
        for (o, rec) in self.k.objects().map_err(|e| e.to_string())? {
            if !roots.contains(&KRef::Object(o)) || !rec.pinned {
                leaks.push(format!("object {o} {rec:?}"));
            }
        }
        for (p, rec) in self.k.promise_records().map_err(|e| e.to_string())? {
            leaks.push(format!("promise {p} {rec:?}"));
        }
        for i in 0..self.roots.len() {
            let ep = self.ep(i);
            let live = self.live(i);
            for (kref, vref) in self.k.clist(ep).map_err(|e| e.to_string())? {
                if !(live && vref == VRef::ROOT) {
                    leaks.push(format!("{ep} (live {live}) c-list: {kref} {vref}"));
                }
            }
            let sh = self.shared.borrow();
            if live && !sh.vats[i].awaiting.is_empty() {
                leaks.push(format!("vat {i} still awaits {:?}", sh.vats[i].awaiting));
            }
        }
        if self.k.queue_len() != 0 {
            leaks.push(format!("{} items still queued", self.k.queue_len()));
        }
        Ok(leaks)
    }
}

fn run_case(vats: usize, ops: &[Op], seen: &Rc<RefCell<BTreeMap<&'static str, u64>>>) -> Result<(), String> {
    let mut w = World::new(vats, seen);
    for (i, op) in ops.iter().enumerate() {
        w.apply(op)?;
        w.check(&format!("after op {i} {op:?}"))?;
    }
    w.wind_down()?;
    w.check("after winding down")?;
    let leaks = w.leaks()?;
    if !leaks.is_empty() {
        return Err(format!("leaks after everyone let go:\n  {}", leaks.join("\n  ")));
    }
    Ok(())
}

#[test]
fn random_object_graphs_are_collected_completely_and_never_early() {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(96);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let strategy = (2usize..=5, proptest::collection::vec(op(), 1..120));
    let seen: Rc<RefCell<BTreeMap<&'static str, u64>>> = Rc::default();
    let outcome = runner.run(&strategy, |(vats, ops)| run_case(vats, &ops, &seen).map_err(TestCaseError::fail));
    if let Err(e) = outcome {
        panic!("{e}");
    }
    let seen = seen.borrow();
    eprintln!("{seen:?}");
    // The scenarios reach every kind of GC delivery, faults and answered pings. The seed is
    // random (each run explores new cases), so the bar sits well below the usual counts: the
    // rarest, retireImports, came in at 17-41 per 96 cases over 15 runs and once at 9, under
    // the old bar of cases / 8.
    for what in ["dropExports", "retireExports", "retireImports", "bringOutYourDead", "fault", "pong", "notify"] {
        assert!(seen.get(what).copied().unwrap_or(0) >= u64::from(cases / 16), "too few {what}: {seen:?}");
    }
}
