//! [`GcVat`], the vat of the garbage-collection property tests (`tests/gc_props.rs` on one
//! kernel, `tests/gc_remote.rs` across two): it makes objects, hands what it holds to other vats
//! (directly, or as the answer to a request, with a message pipelined on that answer), pings
//! what it holds, abandons some of its objects, and lets go of things — at once (`dropImports`
//! in the same delivery) or at its next `bringOutYourDead`, which drops every import it no
//! longer holds and retires those it had dropped before. A fault armed on a vat makes its next
//! delivery fail. Its state lives outside the kernel ([`Shared`]) so the host can read it and
//! arm faults, and every delivery checks that the vat is never handed a retired reference
//! ([`VatState::observe`]) and that its syscalls on what it holds succeed.

use kernel_core::{EndpointId, KPromiseId, Settlement, VRef};
use kernel_syscall::{Resolution, Syscall, Vat, VatData, VatError};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// What a vat awaits an answer for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Await {
    /// An object asked for: hold it when it comes.
    Thing,
    /// A ping of an object: must be delivered.
    Pong,
    /// A ping pipelined on an answer: delivered, or rejected because the answer was data.
    PipelinedPong,
}

/// Something a vat holds: an object of its own not yet sent anywhere (it gets its `o+N` when
/// first sent: the kernel requires a vat's first exports in increasing order, as liveslots makes
/// them), or a ref in its c-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Thing {
    /// An object of its own, numbered by the test, not yet sent.
    Local(u64),
    /// A ref in its c-list.
    Ref(VRef),
}

/// One vat's state, kept by the test (outside the kernel) so the host can arm faults and read it.
#[derive(Debug, Default)]
pub struct VatState {
    /// Its endpoint, once added.
    pub ep: Option<EndpointId>,
    /// What the vat holds (its own objects and imports), in a stable order.
    pub held: BTreeSet<Thing>,
    /// The last local object number.
    pub next_local: u64,
    /// Its own objects the kernel has not retired (`o+N`, the root included).
    pub objects: BTreeSet<VRef>,
    /// Its imports in the c-list, and whether still reachable (not dropped).
    pub imports: BTreeMap<VRef, bool>,
    /// The highest `o-N` it was ever given.
    pub last_import: u64,
    /// The last `o+N` it allocated.
    pub next_object: u64,
    /// The last `p+N` it allocated.
    pub next_promise: u64,
    /// Result promises it subscribed to, and what for.
    pub awaiting: BTreeMap<VRef, Await>,
    /// The next delivery fails.
    pub fault_armed: bool,
    /// Terminated (as far as the test knows: an armed fault went off).
    pub dead: bool,
}

/// What the vats and the host share: every vat's state, and what went wrong.
#[derive(Default)]
pub struct Shared {
    /// Each vat's state, by index.
    pub vats: Vec<VatState>,
    /// Every broken expectation seen so far.
    pub failures: Vec<String>,
    /// Settlements of host requests, as their watchers saw them: `(promise, settlement, ping?)`.
    pub host_settled: Vec<(KPromiseId, Settlement, bool)>,
    /// What happened, by kind (over all cases).
    pub seen: Rc<RefCell<BTreeMap<&'static str, u64>>>,
}

impl Shared {
    /// Count one `what`.
    pub fn saw(&self, what: &'static str) {
        *self.seen.borrow_mut().entry(what).or_default() += 1;
    }
}

/// The shared state, as the vats hold it.
pub type SharedRef = Rc<RefCell<Shared>>;

/// A vat of the GC property tests (see the module doc).
pub struct GcVat {
    /// Its index in [`Shared::vats`].
    pub idx: usize,
    /// The shared state.
    pub shared: SharedRef,
}

/// Data holding the one reference `r`.
pub fn one(r: VRef) -> VatData {
    VatData { body: br#"[{"$slot":0}]"#.to_vec(), slots: vec![r] }
}

/// An allowed reason for a ping not to be answered: the object's exporter is gone, or (for a
/// pipelined ping) the answer it was sent to was not an object.
pub fn excused(reason: &VatData, pipelined: bool) -> bool {
    let text = reason.text();
    text.contains("vat terminated")
        || text.contains("delivery failed")
        || text.contains("abandoned by its exporter")
        || (pipelined && text.contains("not an object"))
}

impl GcVat {
    /// Run `f` on this vat's state, with the failure list; an armed fault makes the delivery
    /// fail before anything else happens.
    pub fn with<T>(&self, what: &'static str, f: impl FnOnce(&mut VatState, &mut Vec<String>) -> T) -> Result<T, VatError> {
        let mut sh = self.shared.borrow_mut();
        sh.saw(what);
        let Shared { vats, failures, seen, .. } = &mut *sh;
        let st = &mut vats[self.idx];
        if st.dead {
            failures.push(format!("vat {} got a delivery after it was terminated", self.idx));
        }
        if std::mem::take(&mut st.fault_armed) {
            st.dead = true;
            *seen.borrow_mut().entry("fault").or_default() += 1;
            return Err(VatError::new("armed fault"));
        }
        Ok(f(st, failures))
    }

    /// Record a failure of this vat.
    pub fn fail(&self, what: String) {
        self.shared.borrow_mut().failures.push(format!("vat {}: {what}", self.idx));
    }
}

impl VatState {
    /// A ref the kernel hands this vat must be live for it (see the module doc).
    pub fn observe(&mut self, v: VRef, failures: &mut Vec<String>, who: usize) {
        match (v.kind, v.allocator) {
            (kernel_core::RefKind::Object, kernel_core::Allocator::Endpoint) if !self.objects.contains(&v) => {
                failures.push(format!("vat {who} was handed {v}, an object of its own the kernel retired (or never had)"));
            }
            (kernel_core::RefKind::Object, kernel_core::Allocator::Kernel) => {
                if let Some(reachable) = self.imports.get_mut(&v) {
                    *reachable = true; // the kernel importing it again revives a dropped import
                } else if v.index > self.last_import {
                    self.last_import = v.index;
                    self.imports.insert(v, true);
                } else {
                    failures.push(format!("vat {who} was handed {v}, an import it retired (new imports are past o-{})", self.last_import));
                }
            }
            _ => {}
        }
    }

    /// The `n`-th thing held (modulo), as a ref: a local object gets its `o+N` now.
    pub fn pick(&mut self, n: u64) -> Option<VRef> {
        if self.held.is_empty() {
            return None;
        }
        let thing = self.held.iter().nth((n % self.held.len() as u64) as usize).copied()?;
        Some(match thing {
            Thing::Ref(v) => v,
            Thing::Local(_) => {
                self.held.remove(&thing);
                let o = self.new_object();
                self.held.insert(Thing::Ref(o));
                o
            }
        })
    }

    /// Allocate its next `o+N` (it is its own object from now on).
    pub fn new_object(&mut self) -> VRef {
        self.next_object += 1;
        let o = VRef::export(self.next_object);
        self.objects.insert(o);
        o
    }

    /// Allocate its next `p+N`.
    pub fn new_promise(&mut self) -> VRef {
        self.next_promise += 1;
        VRef::local_promise(self.next_promise)
    }
}

/// The number in `args` (0 if none).
pub fn number(args: &VatData) -> u64 {
    args.text().trim_matches(|c: char| !c.is_ascii_digit()).parse().unwrap_or(0)
}

impl Vat for GcVat {
    fn deliver(
        &mut self,
        target: VRef,
        method: &str,
        args: VatData,
        result: Option<VRef>,
        sys: &mut Syscall<'_, '_>,
    ) -> Result<(), VatError> {
        let idx = self.idx;
        // What the vat does, decided on its state; the syscalls follow.
        enum Act {
            Answer(VatData),
            Send { to: VRef, method: &'static str, args: VatData, wait: Option<Await>, then_ping: bool },
            Drop(Option<VRef>),
            Abandon(VRef),
            Nothing,
        }
        let act = self.with("message", |st, failures| {
            st.observe(target, failures, idx);
            for s in &args.slots {
                st.observe(*s, failures, idx);
            }
            let n = number(&args);
            match method {
                "make" => {
                    st.next_local += 1;
                    st.held.insert(Thing::Local(st.next_local));
                    Act::Nothing
                }
                "take" => {
                    st.held.extend(args.slots.iter().map(|v| Thing::Ref(*v)));
                    Act::Nothing
                }
                "give" => match (st.pick(n), args.slots.first()) {
                    (Some(thing), Some(to)) => Act::Send { to: *to, method: "take", args: one(thing), wait: None, then_ping: false },
                    _ => Act::Nothing,
                },
                "ask" => match args.slots.first() {
                    Some(to) => Act::Send {
                        to: *to,
                        method: "provide",
                        args: VatData::plain(n.to_string()),
                        wait: Some(Await::Thing),
                        then_ping: n % 2 == 1,
                    },
                    None => Act::Nothing,
                },
                "provide" => Act::Answer(st.pick(n).map(VatData::reference).unwrap_or_else(|| VatData::plain("\"nothing\""))),
                "pingOut" => match st.pick(n) {
                    Some(thing) => {
                        Act::Send { to: thing, method: "ping", args: VatData::plain("[]"), wait: Some(Await::Pong), then_ping: false }
                    }
                    None => Act::Nothing,
                },
                "ping" => Act::Answer(VatData::plain("\"pong\"")),
                "drop" => {
                    let thing = st.pick(n);
                    if let Some(t) = thing {
                        st.held.remove(&Thing::Ref(t));
                    }
                    // `n` even: drop an import at once, else wait for bringOutYourDead.
                    let now = thing.filter(|t| n % 2 == 0 && st.imports.get(t) == Some(&true));
                    if let Some(t) = now {
                        st.imports.insert(t, false);
                    }
                    Act::Drop(now)
                }
                "abandon" => {
                    let exported: Vec<VRef> = st
                        .held
                        .iter()
                        .filter_map(|t| match t {
                            Thing::Ref(v) if st.objects.contains(v) && *v != VRef::ROOT => Some(*v),
                            _ => None,
                        })
                        .collect();
                    match exported.get((n % exported.len().max(1) as u64) as usize) {
                        Some(v) => {
                            st.objects.remove(v);
                            st.held.remove(&Thing::Ref(*v));
                            Act::Abandon(*v)
                        }
                        None => Act::Nothing,
                    }
                }
                "dropAll" => {
                    st.held.clear();
                    Act::Nothing
                }
                other => {
                    failures.push(format!("vat {idx} got unknown method {other}"));
                    Act::Nothing
                }
            }
        })?;
        let outcome: Result<(), kernel_core::SyscallError> = (|| {
            match act {
                Act::Answer(v) => {
                    if let Some(r) = result {
                        sys.resolve(&[(r, false, v)])?;
                    }
                    return Ok(());
                }
                Act::Send { to, method, args, wait, then_ping } => {
                    let r = wait.map(|w| {
                        let mut sh = self.shared.borrow_mut();
                        let st = &mut sh.vats[idx];
                        let p = st.new_promise();
                        st.awaiting.insert(p, w);
                        p
                    });
                    sys.send(to, method, &args, r)?;
                    if let Some(p) = r {
                        sys.subscribe(p)?;
                        if then_ping {
                            // Pipelined: sent to the answer before it exists.
                            let q = {
                                let mut sh = self.shared.borrow_mut();
                                let st = &mut sh.vats[idx];
                                let q = st.new_promise();
                                st.awaiting.insert(q, Await::PipelinedPong);
                                q
                            };
                            sys.send(p, "ping", &VatData::plain("[]"), Some(q))?;
                            sys.subscribe(q)?;
                        }
                    }
                }
                Act::Drop(Some(t)) => sys.drop_imports(&[t])?,
                Act::Abandon(v) => sys.abandon_exports(&[v])?,
                Act::Drop(None) | Act::Nothing => {}
            }
            if let Some(r) = result {
                sys.resolve(&[(r, false, VatData::plain("null"))])?;
            }
            Ok(())
        })();
        outcome.map_err(|e| {
            self.fail(format!("{method}: a syscall on what it holds failed: {e}"));
            VatError::new(e.to_string())
        })
    }

    fn notify(&mut self, resolutions: Vec<Resolution>, _sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let idx = self.idx;
        let pongs = self.with("notify", |st, failures| {
            let mut pongs = 0;
            for r in resolutions {
                for s in &r.data.slots {
                    st.observe(*s, failures, idx);
                }
                let Some(why) = st.awaiting.remove(&r.promise) else {
                    failures.push(format!("vat {idx} was notified of {}, which it does not await", r.promise));
                    continue;
                };
                match (why, r.rejected) {
                    (Await::Thing, false) => {
                        if let Some(thing) = r.data.as_reference() {
                            st.held.insert(Thing::Ref(thing));
                        }
                    }
                    (Await::Thing, true) => {}
                    (Await::Pong | Await::PipelinedPong, false) => pongs += 1,
                    (Await::Pong, true) if excused(&r.data, false) => {}
                    (Await::PipelinedPong, true) if excused(&r.data, true) => {}
                    (why, true) => failures.push(format!("vat {idx}: a {why:?} was rejected: {}", r.data.text())),
                }
            }
            pongs
        })?;
        for _ in 0..pongs {
            self.shared.borrow().saw("pong");
        }
        Ok(())
    }

    fn drop_exports(&mut self, exports: &[VRef], _sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let idx = self.idx;
        self.with("dropExports", |st, failures| {
            for e in exports {
                if !st.objects.contains(e) || *e == VRef::ROOT {
                    failures.push(format!("vat {idx} was told dropExports of {e}, not a live object of its own"));
                }
            }
        })
    }

    fn retire_exports(&mut self, exports: &[VRef], _sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let idx = self.idx;
        self.with("retireExports", |st, failures| {
            for e in exports {
                if !st.objects.remove(e) || *e == VRef::ROOT {
                    failures.push(format!("vat {idx} was told retireExports of {e}, not a live object of its own"));
                }
                // Still used here: it lives on, and gets a new ref should it be sent again.
                if st.held.remove(&Thing::Ref(*e)) {
                    st.next_local += 1;
                    st.held.insert(Thing::Local(st.next_local));
                }
            }
        })
    }

    fn retire_imports(&mut self, imports: &[VRef], _sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let idx = self.idx;
        self.with("retireImports", |st, failures| {
            for i in imports {
                if st.imports.remove(i) != Some(false) {
                    failures.push(format!("vat {idx} was told retireImports of {i}, which it had not dropped"));
                }
                if st.held.contains(&Thing::Ref(*i)) {
                    failures.push(format!("vat {idx} was told retireImports of {i}, which it holds"));
                }
            }
        })
    }

    fn bring_out_your_dead(&mut self, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let (drop, retire) = self.with("bringOutYourDead", |st, _| {
            let dead: Vec<(VRef, bool)> =
                st.imports.iter().filter(|(v, _)| !st.held.contains(&Thing::Ref(**v))).map(|(v, r)| (*v, *r)).collect();
            // Two-phase, like a lazy collector: drop what it no longer holds now, retire only what
            // it had dropped before (so dropped-but-recognised imports stay around for a while).
            let drop: Vec<VRef> = dead.iter().filter(|(_, r)| *r).map(|(v, _)| *v).collect();
            let retire: Vec<VRef> = dead.iter().filter(|(_, r)| !*r).map(|(v, _)| *v).collect();
            for v in &retire {
                st.imports.remove(v);
            }
            for v in &drop {
                st.imports.insert(*v, false);
            }
            (drop, retire)
        })?;
        let r = (|| {
            if !drop.is_empty() {
                sys.drop_imports(&drop)?;
            }
            if !retire.is_empty() {
                sys.retire_imports(&retire)?;
            }
            Ok::<(), kernel_core::SyscallError>(())
        })();
        r.map_err(|e| {
            self.fail(format!("bringOutYourDead: {e}"));
            VatError::new(e.to_string())
        })
    }
}
