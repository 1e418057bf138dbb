//! Model-based property test of the crank (DESIGN §2–§6).
//!
//! Random host actions (queue a message, or queue one with its answer handed to a callback, watch a
//! promise, pin and unpin references, ask a vat to bring out its dead, step, run, restart the
//! kernel on its store, apply work from outside a crank, begin and end a turn) and scripted vat
//! behaviour (sends with and without result promises, exports, subscribes, resolves, vatstore
//! writes, dropping and retiring imports, retiring and abandoning exports, forged and stale vrefs,
//! double and foreign resolves, illegal GC syscalls, faults, panics, exits) run against
//! `Kernel<MemStore>` and against [`Model`], a plain reference model that implements the design in
//! the most obvious way: `BTreeMap`s and `Vec`s, and a crank that aborts is undone by restoring a
//! clone of the whole model taken when the crank began. After every transition the observable state
//! must match exactly, krefs included: the run queue (GC deliveries too), every promise with its
//! reference count and pin, every object with its owner, pin, abandonment and
//! reachable/recognizable counts, every c-list entry with its reachable flag, every vatstore, every
//! endpoint's status, what each delivery handed its vat (and what it read), what the host was told,
//! the host watchers that ran and the commit events (as one sequence, so their relative order
//! counts too), and whether a turn is open. The kernel's tables, c-list reachable flags included,
//! are read through the kernel, which sees an open turn's writes.
//!
//! Garbage collection (DESIGN §6) is modelled without mirroring the kernel's increments: the
//! model never stores a count. [`Model::recount`] counts every reference from scratch (c-list
//! imports, reachable or not; queued and in-flight messages' targets, slots and results; queued
//! notifies; messages queued on promises; settled data), and the counts shown and compared are
//! the recount's. What the model does have to share with the kernel is *when* a kref is looked
//! at: at the end of each transaction, a kref is examined only if one of its counts fell to zero
//! during it (its reachable count, for an object) or it was unpinned, abandoned, or its exporter
//! terminated. [`Model::changing`] derives the first by recounting before and after each change
//! that can remove a reference, at the granularity the kernel removes them.
//!
//! This checks DESIGN §10.1 (an aborted crank leaves no trace: the model restores its clone),
//! §10.2 (outputs reach the run queue in the order made: queues are compared item by item) and
//! §10.6 (a forged or stale vref is an illegal syscall that terminates exactly its vat), and the
//! kernel's reference counts and GC deliveries against a from-scratch recount. Each of the first
//! three was seen to fail when broken on purpose (an abort keeping a vatstore write, a commit
//! flushing its outputs in reverse, `export` accepting an unknown `o-N`), and so was each of
//! these GC breakages: no `dropExports`, a decref not marking its kref, `retireImports` keeping
//! the entry, a resolver keeping its promise, message slots or a retargeted promise not
//! released, a stale `o+N` accepted, an abandon not marking, a revived export deleted at
//! `retireExports`. The model also checks its own state after every transition
//! ([`Model::sanity`]): no live reference to a deleted object or promise, and once the run queue
//! is empty nothing collectable left (seen to fail when unpinning stops marking in kernel and
//! model alike, which the comparison cannot see). It found two kernel bugs, pinned in
//! `gc_found.rs`.
//!
//! Turns (`Kernel::begin_turn` / `end_turn`) are modelled as the host sees them: inside a turn
//! the model changes as without one, but the watchers and commit events it owes the host are
//! held back and handed over, in order, at `EndTurn`; a `Restart` with a turn open goes back to a
//! clone of the model taken at `BeginTurn` (keeping only host memory: the vats' minds, the
//! watcher numbering and what the host already saw; the watchers themselves are gone, as after
//! any restart). About a fifth of all transitions run inside a turn. This was seen to fail when
//! broken on purpose: commit events or watcher callbacks not held back, and `into_store` ending
//! the turn instead of dropping it. It found a kernel bug: a `watch` inside a turn on a promise
//! already settled ran at end of turn together with the promise's earlier watchers, ahead of
//! the commit events before the `watch` call.
//!
//! Kernel-made error texts are compared exactly, except the detail after `illegal syscall: `,
//! which is the kernel's own wording ([`normalise`]). `PROPTEST_CASES=N` searches deeper.

use kernel_core::{
    Allocator, CapData, CrankContext, CrankInput, CrankOutcome, CrankReport, Endpoint, EndpointId, EndpointStatus, Fault, GcAction,
    KObjectId, KPromiseId, KRef, Kernel, KernelDelivery, MemStore, Message, PromiseState, RefKind, RunQueueItem, Settlement, VRef,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::rc::Rc;

// ---------------------------------------------------------------------------------------------
// Vat scripts: what a test vat does in one delivery. Shared by the vats under test and by the
// model, which replays them against its own syscall semantics.
// ---------------------------------------------------------------------------------------------

/// Which promise a scripted send names as its result.
#[derive(Clone, Debug)]
enum ResultChoice {
    /// No result.
    None,
    /// A fresh `p+N`.
    Fresh,
    /// A promise the vat decides (passing its answer on).
    Decided(u8),
    /// A promise the vat holds but does not decide: illegal.
    Undecided(u8),
}

/// How a scripted resolve settles its promise.
#[derive(Clone, Debug)]
enum How {
    Data(u8),
    /// Fulfil with a reference the vat holds (an object: retargeting; a promise: forwarding).
    Ref(u8),
    Reject(u8),
}

/// Where a forged kernel-allocated vref (`o-99`, `p-99`) is used.
#[derive(Clone, Debug)]
enum Forgery {
    SendTo,
    PassAsArg,
    Subscribe,
    Resolve,
}

/// A GC syscall the vat may not make (each is illegal unless the vat's state happens to make it
/// legal, e.g. retiring the root after the host unpinned it and no one reaches it).
#[derive(Clone, Debug)]
enum GcForgery {
    /// `dropImports` of its own root.
    DropExport,
    /// `dropImports` of a promise it decides.
    DropDecided(u8),
    /// `dropImports` of `o-99`.
    DropUnknown,
    /// `retireImports` of an import it still reaches.
    RetireReachable(u8),
    /// `retireExports` of its root.
    RetireRoot,
    /// `abandonExports` of an import.
    AbandonImport(u8),
    /// `abandonExports` of its root.
    AbandonRoot,
}

/// One scripted step of a delivery. Numbers index (modulo length) into the vat's lists of
/// references, so every script is valid whatever the vat holds.
#[derive(Clone, Debug)]
enum Action {
    /// Send to a reference the vat holds (an object it holds, if `to_object`).
    Send {
        target: u8,
        to_object: bool,
        method: u8,
        args: Vec<u8>,
        result: ResultChoice,
    },
    Export,
    Subscribe {
        promise: u8,
    },
    Resolve {
        promise: u8,
        how: How,
    },
    VatstoreSet {
        key: u8,
        value: u8,
    },
    VatstoreDelete {
        key: u8,
    },
    /// Read a key (reads must see this crank's own writes).
    VatstoreGet {
        key: u8,
    },
    /// List the keys with `next-key`.
    VatstoreScan,
    /// `dropImports` of an object import or a promise it does not decide.
    DropImport {
        index: u8,
    },
    /// `retireImports` of an import it dropped.
    RetireImport {
        index: u8,
    },
    /// `retireExports` of an export it was told no one reaches.
    RetireExport {
        index: u8,
    },
    /// `abandonExports` of one of its exports (other than the root).
    AbandonExport {
        index: u8,
    },
    /// What `bringOutYourDead` does: ask for the held imports, drop those `mask` picks, and
    /// retire the objects among them if `retire`.
    Reap {
        mask: u8,
        retire: bool,
    },
    /// Resolve a promise the vat holds but does not decide.
    ResolveUndecided {
        promise: u8,
    },
    /// Resolve a decided promise twice, in one syscall or in two.
    ResolveTwice {
        promise: u8,
        one_syscall: bool,
    },
    Forge(Forgery),
    ForgeGc(GcForgery),
    /// Use a vref the vat was told to forget or gave up (a notified or resolved promise, a
    /// dropped import, a retired or abandoned export).
    UseStale {
        index: u8,
    },
    Exit {
        failure: bool,
    },
    Fail,
    Panic,
}

/// A delivery's script; `propagate` makes the vat return an error at the first refused syscall
/// (otherwise it catches the error and carries on).
#[derive(Clone, Debug, Default)]
struct Script {
    actions: Vec<Action>,
    propagate: bool,
}

const ARGS_BODY: &[u8] = b"args";
const HOST_BODY: &[u8] = b"host";
const EXIT_BODY: &[u8] = b"bye";
const SCRIPTED_FAULT: &str = "scripted fault";
const SCRIPTED_PANIC: &str = "scripted panic";
const REFUSED_FAULT: &str = "a syscall was refused";

/// A vat's memory: the references it may use, the promises it decides and those it subscribed
/// to, the imports it dropped, the exports it was told no one reaches, the vrefs it must no
/// longer use, the exports it allocated but never named, and its allocation counters. Host
/// memory: not rolled back by an abort (the vat is terminated then, so it hardly matters, but a
/// restart that loses the turn brings the vat back), by a refused `apply_external`, nor by a
/// restart that loses an open turn. It only steers scripts towards legal syscalls: whatever it gets
/// wrong, the kernel and the model see the same syscalls.
#[derive(Clone, Debug)]
struct VatMind {
    seen: Vec<VRef>,
    decides: Vec<VRef>,
    subscribed: Vec<VRef>,
    dropped: Vec<VRef>,
    told_drop: Vec<VRef>,
    stale: Vec<VRef>,
    unannounced: Vec<VRef>,
    next_export: u64,
    next_promise: u64,
}

/// A delivery as the vat sees it.
struct VatDelivery {
    refs: Vec<VRef>,
    result: Option<VRef>,
    notified: Vec<VRef>,
    /// A GC delivery: the action's name and the vat's refs for its objects.
    gc: Option<(&'static str, Vec<VRef>)>,
}

fn remove(list: &mut Vec<VRef>, v: VRef) {
    list.retain(|x| *x != v);
}

fn add(list: &mut Vec<VRef>, v: VRef) {
    if !list.contains(&v) {
        list.push(v);
    }
}

fn is_own_export(v: VRef) -> bool {
    !v.is_promise() && v.allocator == Allocator::Endpoint
}

fn is_object_import(v: VRef) -> bool {
    !v.is_promise() && v.allocator == Allocator::Kernel
}

impl VatMind {
    fn new() -> Self {
        VatMind {
            seen: vec![VRef::ROOT],
            decides: Vec::new(),
            subscribed: Vec::new(),
            dropped: Vec::new(),
            told_drop: Vec::new(),
            stale: Vec::new(),
            unannounced: Vec::new(),
            next_export: 1,
            next_promise: 1,
        }
    }

    /// The kernel handed the vat `v`: usable (again).
    fn learn(&mut self, v: VRef) {
        add(&mut self.seen, v);
        remove(&mut self.dropped, v);
        remove(&mut self.stale, v);
        // An export handed back is reachable again.
        remove(&mut self.told_drop, v);
    }

    /// The vat may no longer use `v`.
    fn forget(&mut self, v: VRef) {
        for list in [&mut self.seen, &mut self.decides, &mut self.subscribed, &mut self.dropped, &mut self.told_drop, &mut self.unannounced]
        {
            remove(list, v);
        }
        add(&mut self.stale, v);
    }

    /// The vat names `v` in a syscall: an export named is reachable again, and the kernel now
    /// knows it. Lower unnamed exports stay new: the kernel keeps them as an export gap.
    fn name(&mut self, v: VRef) {
        if is_own_export(v) {
            remove(&mut self.told_drop, v);
            remove(&mut self.unannounced, v);
        }
    }

    /// `dropImports` of `v` succeeded.
    fn dropped_import(&mut self, v: VRef) {
        if v.is_promise() {
            self.forget(v);
        } else {
            self.forget(v);
            add(&mut self.dropped, v);
        }
    }

    fn observe(&mut self, d: &VatDelivery) {
        for v in d.refs.iter().chain(&d.notified).chain(&d.result) {
            self.learn(*v);
        }
        if let Some(r) = d.result {
            add(&mut self.decides, r);
        }
        if let Some(("dropExports", vrefs)) = &d.gc {
            for v in vrefs {
                add(&mut self.told_drop, *v);
            }
        }
    }

    /// After a notify the c-list forgets the notified promises; after `retireExports` and
    /// `retireImports`, the retired objects. So does the vat.
    fn after(&mut self, d: &VatDelivery) {
        for v in &d.notified {
            self.forget(*v);
        }
        if let Some(("retireExports" | "retireImports", vrefs)) = &d.gc {
            for v in vrefs {
                self.forget(*v);
            }
        }
    }

    fn pick(list: &[VRef], i: u8) -> Option<VRef> {
        (!list.is_empty()).then(|| list[i as usize % list.len()])
    }

    fn pick_where(&self, i: u8, f: impl Fn(&VRef) -> bool) -> Option<VRef> {
        let vs: Vec<VRef> = self.seen.iter().copied().filter(f).collect();
        Self::pick(&vs, i)
    }

    fn seen_ref(&self, i: u8) -> Option<VRef> {
        Self::pick(&self.seen, i)
    }

    fn seen_object(&self, i: u8) -> Option<VRef> {
        self.pick_where(i, |v| !v.is_promise())
    }

    fn seen_promise(&self, i: u8) -> Option<VRef> {
        self.pick_where(i, |v| v.is_promise())
    }

    fn undecided_promise(&self, i: u8) -> Option<VRef> {
        self.pick_where(i, |v| v.is_promise() && !self.decides.contains(v))
    }

    fn droppable(&self, i: u8) -> Option<VRef> {
        self.pick_where(i, |v| is_object_import(*v) || (v.is_promise() && !self.decides.contains(v)))
    }

    fn object_import(&self, i: u8) -> Option<VRef> {
        self.pick_where(i, |v| is_object_import(*v))
    }

    fn export_other_than_root(&self, i: u8) -> Option<VRef> {
        self.pick_where(i, |v| is_own_export(*v) && *v != VRef::ROOT)
    }

    fn take_decided(&mut self, i: u8) -> Option<VRef> {
        let p = Self::pick(&self.decides, i)?;
        remove(&mut self.decides, p);
        Some(p)
    }

    fn fresh_promise(&mut self) -> VRef {
        let p = VRef::local_promise(self.next_promise);
        self.next_promise += 1;
        self.learn(p);
        p
    }

    fn fresh_export(&mut self) -> VRef {
        let o = VRef::export(self.next_export);
        self.next_export += 1;
        self.learn(o);
        self.unannounced.push(o);
        o
    }
}

/// A settlement at the vat level.
#[derive(Clone, Debug)]
struct VSettlement {
    rejected: bool,
    body: Vec<u8>,
    slots: Vec<VRef>,
}

impl VSettlement {
    fn data(body: String) -> Self {
        VSettlement { rejected: false, body: body.into_bytes(), slots: Vec::new() }
    }
}

/// A syscall was refused (the kernel's error is not needed: the vat only catches or propagates).
#[derive(Debug)]
struct Refused;

/// The vref-level syscalls a script makes: implemented over `CrankContext` for the vats under
/// test and over the model for the reference. The GC syscalls name refs the c-list must hold
/// (translated without allocating anything, as `kernel-syscall` does).
trait Syscalls {
    fn send(&mut self, target: VRef, method: String, slots: Vec<VRef>, result: Option<VRef>) -> Result<(), Refused>;
    fn subscribe(&mut self, promise: VRef) -> Result<(), Refused>;
    fn resolve(&mut self, resolutions: Vec<(VRef, VSettlement)>) -> Result<(), Refused>;
    fn exit(&mut self, failure: bool) -> Result<(), Refused>;
    fn vatstore_set(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), Refused>;
    fn vatstore_delete(&mut self, key: Vec<u8>) -> Result<(), Refused>;
    fn vatstore_get(&mut self, key: Vec<u8>) -> Result<Option<Vec<u8>>, Refused>;
    fn vatstore_next_key(&mut self, after: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, Refused>;
    fn drop_imports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused>;
    fn retire_imports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused>;
    fn retire_exports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused>;
    fn abandon_exports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused>;
    fn held_imports(&mut self) -> Result<Vec<VRef>, Refused>;
    /// Record what the vat read, for the comparison.
    fn note(&mut self, line: String);
}

/// How a script's delivery ended.
enum End {
    Returned,
    Failed(String),
    Panicked(String),
}

fn vatstore_key(key: u8) -> Vec<u8> {
    vec![b'k', b'0' + key % 4]
}

/// Run `script` for one delivery: deterministic in the vat's memory and the syscall results.
fn run_script(mind: &mut VatMind, script: &Script, sys: &mut dyn Syscalls) -> End {
    for action in &script.actions {
        let r = match action {
            Action::Send { target, to_object, method, args, result } => {
                let target = if *to_object { mind.seen_object(*target) } else { mind.seen_ref(*target) };
                let Some(target) = target else { continue };
                let slots: Vec<VRef> = args.iter().filter_map(|i| mind.seen_ref(*i)).collect();
                let result = match result {
                    ResultChoice::None => None,
                    ResultChoice::Fresh => Some(mind.fresh_promise()),
                    ResultChoice::Decided(i) => mind.take_decided(*i),
                    ResultChoice::Undecided(i) => mind.undecided_promise(*i),
                };
                for v in std::iter::once(&target).chain(&slots) {
                    mind.name(*v);
                }
                sys.send(target, format!("m{method}"), slots, result)
            }
            Action::Export => {
                mind.fresh_export();
                Ok(())
            }
            Action::Subscribe { promise } => match mind.seen_promise(*promise) {
                Some(p) => {
                    let r = sys.subscribe(p);
                    if r.is_ok() {
                        add(&mut mind.subscribed, p);
                    }
                    r
                }
                None => Ok(()),
            },
            Action::Resolve { promise, how } => {
                let Some(p) = mind.take_decided(*promise) else { continue };
                let settlement = match how {
                    How::Data(n) => VSettlement::data(format!("d{n}")),
                    How::Reject(n) => VSettlement { rejected: true, body: format!("r{n}").into_bytes(), slots: Vec::new() },
                    How::Ref(i) => match mind.seen_ref(*i) {
                        Some(r) => {
                            mind.name(r);
                            VSettlement { rejected: false, body: CapData::REF_BODY.to_vec(), slots: vec![r] }
                        }
                        None => VSettlement::data("none".into()),
                    },
                };
                let r = sys.resolve(vec![(p, settlement)]);
                // The resolver's c-list forgets the promise, unless it awaits its own notify.
                if r.is_ok() && !mind.subscribed.contains(&p) {
                    mind.forget(p);
                }
                r
            }
            Action::VatstoreSet { key, value } => sys.vatstore_set(vatstore_key(*key), vec![*value]),
            Action::VatstoreDelete { key } => sys.vatstore_delete(vatstore_key(*key)),
            Action::VatstoreGet { key } => sys.vatstore_get(vatstore_key(*key)).map(|v| sys.note(format!("get k{key} = {v:?}"))),
            Action::VatstoreScan => {
                let mut keys = Vec::new();
                let mut after = None;
                let r = loop {
                    match sys.vatstore_next_key(after.clone()) {
                        Ok(Some(k)) if keys.len() < 8 => {
                            keys.push(String::from_utf8_lossy(&k).into_owned());
                            after = Some(k);
                        }
                        Ok(_) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                };
                sys.note(format!("scan {keys:?}"));
                r
            }
            Action::DropImport { index } => {
                let Some(v) = mind.droppable(*index) else { continue };
                let r = sys.drop_imports(vec![v]);
                if r.is_ok() {
                    mind.dropped_import(v);
                }
                r
            }
            Action::RetireImport { index } => {
                let Some(v) = VatMind::pick(&mind.dropped, *index) else { continue };
                let r = sys.retire_imports(vec![v]);
                if r.is_ok() {
                    mind.forget(v);
                }
                r
            }
            Action::RetireExport { index } => {
                let Some(v) = VatMind::pick(&mind.told_drop, *index) else { continue };
                let r = sys.retire_exports(vec![v]);
                if r.is_ok() {
                    mind.forget(v);
                }
                r
            }
            Action::AbandonExport { index } => {
                let Some(v) = mind.export_other_than_root(*index) else { continue };
                if mind.unannounced.contains(&v) {
                    continue; // the kernel has never heard of it: nothing to abandon
                }
                let r = sys.abandon_exports(vec![v]);
                if r.is_ok() {
                    mind.forget(v);
                }
                r
            }
            Action::Reap { mask, retire } => match sys.held_imports() {
                Err(e) => Err(e),
                Ok(held) => {
                    sys.note(format!("held {}", show_vrefs(&held)));
                    let dead: Vec<VRef> = held.iter().enumerate().filter(|(i, _)| mask & (1 << (i % 8)) != 0).map(|(_, v)| *v).collect();
                    let objects: Vec<VRef> = dead.iter().copied().filter(|v| !v.is_promise()).collect();
                    if dead.is_empty() {
                        Ok(())
                    } else {
                        let r = sys.drop_imports(dead.clone());
                        if r.is_ok() {
                            for v in &dead {
                                mind.dropped_import(*v);
                            }
                        }
                        if r.is_ok() && *retire && !objects.is_empty() {
                            let r = sys.retire_imports(objects.clone());
                            if r.is_ok() {
                                for v in &objects {
                                    mind.forget(*v);
                                }
                            }
                            r
                        } else {
                            r
                        }
                    }
                }
            },
            Action::ResolveUndecided { promise } => match mind.undecided_promise(*promise) {
                Some(p) => sys.resolve(vec![(p, VSettlement::data("undecided".into()))]),
                None => Ok(()),
            },
            Action::ResolveTwice { promise, one_syscall } => {
                let Some(p) = mind.take_decided(*promise) else { continue };
                let once = VSettlement::data("once".into());
                let twice = VSettlement::data("twice".into());
                if *one_syscall {
                    sys.resolve(vec![(p, once), (p, twice)])
                } else {
                    let first = sys.resolve(vec![(p, once)]);
                    let second = sys.resolve(vec![(p, twice)]);
                    first.and(second)
                }
            }
            Action::Forge(how) => {
                let forged_object = VRef::import(99);
                let forged_promise = VRef::imported_promise(99);
                match how {
                    Forgery::SendTo => sys.send(forged_object, "forged".into(), Vec::new(), None),
                    Forgery::PassAsArg => sys.send(VRef::ROOT, "forged".into(), vec![forged_object], None),
                    Forgery::Subscribe => sys.subscribe(forged_promise),
                    Forgery::Resolve => sys.resolve(vec![(forged_promise, VSettlement::data("forged".into()))]),
                }
            }
            Action::ForgeGc(how) => match how {
                GcForgery::DropExport => sys.drop_imports(vec![VRef::ROOT]),
                GcForgery::DropDecided(i) => match VatMind::pick(&mind.decides, *i) {
                    Some(p) => sys.drop_imports(vec![p]),
                    None => Ok(()),
                },
                GcForgery::DropUnknown => sys.drop_imports(vec![VRef::import(99)]),
                GcForgery::RetireReachable(i) => match mind.object_import(*i) {
                    Some(v) => sys.retire_imports(vec![v]),
                    None => Ok(()),
                },
                GcForgery::RetireRoot => sys.retire_exports(vec![VRef::ROOT]),
                GcForgery::AbandonImport(i) => match mind.object_import(*i) {
                    Some(v) => sys.abandon_exports(vec![v]),
                    None => Ok(()),
                },
                GcForgery::AbandonRoot => sys.abandon_exports(vec![VRef::ROOT]),
            },
            Action::UseStale { index } => match VatMind::pick(&mind.stale, *index) {
                Some(p) if p.is_promise() => sys.subscribe(p),
                Some(o) => sys.send(o, "stale".into(), Vec::new(), None),
                None => Ok(()),
            },
            Action::Exit { failure } => sys.exit(*failure),
            Action::Fail => return End::Failed(SCRIPTED_FAULT.into()),
            Action::Panic => return End::Panicked(SCRIPTED_PANIC.into()),
        };
        if r.is_err() && script.propagate {
            return End::Failed(REFUSED_FAULT.into());
        }
    }
    End::Returned
}

fn show_vrefs(vs: &[VRef]) -> String {
    let vs: Vec<String> = vs.iter().map(ToString::to_string).collect();
    format!("[{}]", vs.join(","))
}

/// Translate a kernel-level delivery into the vat's references, importing in a fixed order
/// (target, argument slots, result; or each notified promise followed by its data's slots).
fn translate_delivery(d: &KernelDelivery, mut import: impl FnMut(KRef) -> VRef) -> VatDelivery {
    match d {
        KernelDelivery::Message { target, message } => {
            let mut refs = vec![import(KRef::Object(*target))];
            refs.extend(message.args.slots.iter().map(|k| import(*k)));
            let result = message.result.map(|kp| import(KRef::Promise(kp)));
            VatDelivery { refs, result, notified: Vec::new(), gc: None }
        }
        KernelDelivery::Notify { resolutions } => {
            let mut refs = Vec::new();
            let mut notified = Vec::new();
            for (kp, s) in resolutions {
                notified.push(import(KRef::Promise(*kp)));
                refs.extend(s.data().slots.iter().map(|k| import(*k)));
            }
            VatDelivery { refs, result: None, notified, gc: None }
        }
    }
}

/// A GC delivery as the vat sees it: its objects translated through the c-list without side
/// effects (`lookup` gives the vat's ref for a kref, if it has one).
fn translate_gc(action: &GcAction, mut lookup: impl FnMut(KRef) -> Option<VRef>) -> (VatDelivery, Vec<Option<VRef>>) {
    let vrefs: Vec<Option<VRef>> = action.objects().iter().map(|o| lookup(KRef::Object(*o))).collect();
    let known = vrefs.iter().flatten().copied().collect();
    (VatDelivery { refs: Vec::new(), result: None, notified: Vec::new(), gc: Some((action.name(), known)) }, vrefs)
}

fn show_gc_delivery(ep: EndpointId, action: &GcAction, vrefs: &[Option<VRef>]) -> String {
    let objects: Vec<String> =
        action.objects().iter().zip(vrefs).map(|(o, v)| format!("{o}={}", v.map_or("?".to_owned(), |v| v.to_string()))).collect();
    format!("{ep} gc {} [{}]", action.name(), objects.join(","))
}

// ---------------------------------------------------------------------------------------------
// The system under test: scripted vats over `CrankContext`.
// ---------------------------------------------------------------------------------------------

/// The scripts the vats run, one per delivery, in turn (cycling): set by each host transition.
/// Also records what each delivery handed the vat (host memory: an abort does not erase it).
#[derive(Default)]
struct Feed {
    scripts: Vec<Script>,
    next: usize,
    delivered: Vec<String>,
}

impl Feed {
    fn load(&mut self, scripts: Vec<Script>) {
        self.scripts = scripts;
        self.next = 0;
        self.delivered.clear();
    }

    fn take(&mut self) -> Script {
        if self.scripts.is_empty() {
            return Script::default();
        }
        let s = self.scripts[self.next % self.scripts.len()].clone();
        self.next += 1;
        s
    }
}

/// A vat under test. Its memory is shared with the test so a restarted kernel can re-attach it.
struct ScriptedVat {
    mind: Rc<RefCell<VatMind>>,
    feed: Rc<RefCell<Feed>>,
}

impl ScriptedVat {
    /// Run the next script for a delivery the vat sees as `vd`.
    fn run(&mut self, vd: VatDelivery, script: Script, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let mut mind = self.mind.borrow_mut();
        mind.observe(&vd);
        let mut sys = CtxSyscalls { ctx, notes: Vec::new() };
        let end = run_script(&mut mind, &script, &mut sys);
        self.feed.borrow_mut().delivered.append(&mut sys.notes);
        mind.after(&vd);
        match end {
            End::Returned => Ok(()),
            End::Failed(why) => Err(Fault::VatError(why)),
            End::Panicked(why) => panic!("{why}"),
        }
    }
}

impl Endpoint for ScriptedVat {
    fn deliver(&mut self, delivery: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let script = {
            let mut feed = self.feed.borrow_mut();
            feed.delivered.push(show_delivery(ctx.endpoint(), &delivery));
            feed.take()
        };
        let vd = translate_delivery(&delivery, |k| ctx.import(k).expect("import at the start of a delivery"));
        self.run(vd, script, ctx)
    }

    fn collect(&mut self, action: GcAction, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let (vd, vrefs) = translate_gc(&action, |k| ctx.vref(k).expect("look up a GC delivery's ref"));
        let script = {
            let mut feed = self.feed.borrow_mut();
            feed.delivered.push(show_gc_delivery(ctx.endpoint(), &action, &vrefs));
            feed.take()
        };
        self.run(vd, script, ctx)
    }
}

struct CtxSyscalls<'a, 's> {
    ctx: &'a mut CrankContext<'s>,
    notes: Vec<String>,
}

impl CtxSyscalls<'_, '_> {
    fn kref(&mut self, v: VRef) -> Result<KRef, Refused> {
        self.ctx.export(v).map_err(|_| Refused)
    }

    fn kpromise(&mut self, v: VRef) -> Result<KPromiseId, Refused> {
        Ok(self.kref(v)?.as_promise().expect("a promise vref maps to a promise kref"))
    }

    /// A ref the c-list must already hold (the GC syscalls' translation).
    fn known(&mut self, vrefs: Vec<VRef>) -> Result<Vec<KRef>, Refused> {
        let mut out = Vec::new();
        for v in vrefs {
            match self.ctx.lookup(v) {
                Ok(Some(k)) => out.push(k),
                Ok(None) => {
                    self.ctx.illegal(format!("{v} is not in the c-list"));
                    return Err(Refused);
                }
                Err(_) => return Err(Refused),
            }
        }
        Ok(out)
    }
}

impl Syscalls for CtxSyscalls<'_, '_> {
    fn send(&mut self, target: VRef, method: String, slots: Vec<VRef>, result: Option<VRef>) -> Result<(), Refused> {
        let target = self.kref(target)?;
        let slots = slots.into_iter().map(|s| self.kref(s)).collect::<Result<Vec<_>, _>>()?;
        let result = result.map(|r| self.kpromise(r)).transpose()?;
        self.ctx.send(target, method, CapData { body: ARGS_BODY.to_vec(), slots }, result).map_err(|_| Refused)
    }

    fn subscribe(&mut self, promise: VRef) -> Result<(), Refused> {
        let kp = self.kpromise(promise)?;
        self.ctx.subscribe(kp).map_err(|_| Refused)
    }

    fn resolve(&mut self, resolutions: Vec<(VRef, VSettlement)>) -> Result<(), Refused> {
        let mut krs = Vec::new();
        for (p, s) in resolutions {
            let kp = self.kpromise(p)?;
            let slots = s.slots.into_iter().map(|v| self.kref(v)).collect::<Result<Vec<_>, _>>()?;
            let data = CapData { body: s.body, slots };
            krs.push((kp, if s.rejected { Settlement::Rejected(data) } else { Settlement::Fulfilled(data) }));
        }
        self.ctx.resolve(krs).map_err(|_| Refused)
    }

    fn exit(&mut self, failure: bool) -> Result<(), Refused> {
        self.ctx.exit(failure, CapData::plain(EXIT_BODY)).map_err(|_| Refused)
    }

    fn vatstore_set(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), Refused> {
        self.ctx.vatstore_set(&key, value).map_err(|_| Refused)
    }

    fn vatstore_delete(&mut self, key: Vec<u8>) -> Result<(), Refused> {
        self.ctx.vatstore_delete(&key).map_err(|_| Refused)
    }

    fn vatstore_get(&mut self, key: Vec<u8>) -> Result<Option<Vec<u8>>, Refused> {
        self.ctx.vatstore_get(&key).map_err(|_| Refused)
    }

    fn vatstore_next_key(&mut self, after: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, Refused> {
        self.ctx.vatstore_next_key(after.as_deref()).map_err(|_| Refused)
    }

    fn drop_imports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused> {
        let krefs = self.known(vrefs)?;
        self.ctx.drop_imports(&krefs).map_err(|_| Refused)
    }

    fn retire_imports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused> {
        let krefs = self.known(vrefs)?;
        self.ctx.retire_imports(&krefs).map_err(|_| Refused)
    }

    fn retire_exports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused> {
        let krefs = self.known(vrefs)?;
        self.ctx.retire_exports(&krefs).map_err(|_| Refused)
    }

    fn abandon_exports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused> {
        let krefs = self.known(vrefs)?;
        self.ctx.abandon_exports(&krefs).map_err(|_| Refused)
    }

    fn held_imports(&mut self) -> Result<Vec<VRef>, Refused> {
        self.ctx.held_imports().map_err(|_| Refused)
    }

    fn note(&mut self, line: String) {
        self.notes.push(line);
    }
}

// ---------------------------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------------------------

/// What the host was told by the last transition.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Observed {
    Nothing,
    /// The queued message's result, and what unpinning it at once said (if asked to).
    Queued(Result<KPromiseId, String>, Option<Result<(), String>>),
    /// What `queue_send_only` said.
    Sent(Result<(), String>),
    Watched(Result<(), String>),
    Pinned(Result<(), String>),
    Reaped(Result<(), String>),
    Stepped(Option<CrankSummary>),
    Ran {
        cranks: u64,
        aborted: u64,
        quiescent: bool,
    },
    Restarted,
    External(Result<(), String>),
    TurnBegun,
    TurnEnded(Result<(), String>),
}

/// What the host sees run, in the order it runs: a watcher (by the number it was registered
/// under) or a commit event.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HostEvent {
    Watcher(u32, KPromiseId, Settlement),
    Commit(u64),
}

/// A crank report, with kernel wording normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CrankSummary {
    crank: u64,
    input: CrankInput,
    outcome: String,
    flushed: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Status {
    Live,
    Terminated(String),
}

#[derive(Clone, Debug)]
struct ModelObject {
    owner: EndpointId,
    pinned: bool,
    abandoned: bool,
}

#[derive(Clone, Debug)]
struct ModelPromise {
    state: PromiseState,
    pinned: bool,
}

#[derive(Clone, Debug)]
struct ModelVat {
    status: Status,
    /// kref -> (vref, reachable flag).
    clist: BTreeMap<KRef, (VRef, bool)>,
    vrefs: BTreeMap<VRef, KRef>,
    imported_objects: u64,
    imported_promises: u64,
    /// Every `o+N` and `p+N` index the vat has ever named: one it no longer has is stale, any
    /// other (in any order) is new.
    exported_objects: BTreeSet<u64>,
    exported_promises: BTreeSet<u64>,
    vatstore: BTreeMap<Vec<u8>, Vec<u8>>,
    mind: VatMind,
}

/// Reference counts, recounted from scratch: per object `(reachable, recognizable)`, per
/// promise its references.
#[derive(Default)]
struct Counts {
    objects: BTreeMap<u64, (u32, u32)>,
    promises: BTreeMap<u64, u32>,
}

impl Counts {
    fn add(&mut self, r: KRef, reachable: bool) {
        match r {
            KRef::Object(o) => {
                let c = self.objects.entry(o.0).or_default();
                c.1 += 1;
                if reachable {
                    c.0 += 1;
                }
            }
            KRef::Promise(p) => *self.promises.entry(p.0).or_default() += 1,
        }
    }

    /// A message counts its target, its argument slots and its result, all reachable.
    fn add_message(&mut self, target: KRef, m: &Message) {
        self.add(target, true);
        for s in &m.args.slots {
            self.add(*s, true);
        }
        if let Some(r) = m.result {
            self.add(KRef::Promise(r), true);
        }
    }

    fn object(&self, o: KObjectId) -> (u32, u32) {
        self.objects.get(&o.0).copied().unwrap_or_default()
    }

    fn promise(&self, p: KPromiseId) -> u32 {
        self.promises.get(&p.0).copied().unwrap_or_default()
    }
}

/// The whole kernel, as plain data. `Clone` is the transaction: see [`Model::step`].
#[derive(Clone, Debug)]
struct Model {
    cranks: u64,
    next_object: u64,
    next_promise: u64,
    objects: BTreeMap<u64, ModelObject>,
    promises: BTreeMap<u64, ModelPromise>,
    run_queue: VecDeque<RunQueueItem>,
    /// Endpoint `n` is `vats[n - 1]`.
    vats: Vec<ModelVat>,
    // ---- the transaction in progress (empty between transactions) ----
    /// The run-queue item the crank took, while it still holds the item's references.
    in_flight: Option<RunQueueItem>,
    /// The crank's buffered outputs, in the order made.
    pending: Vec<RunQueueItem>,
    /// The promises it settled, with their settlements (for the host watchers).
    settled: Vec<(KPromiseId, Settlement)>,
    /// Krefs to look at before the transaction ends (DESIGN §6).
    marked: Vec<KRef>,
    // ---- host memory ----
    watchers: BTreeMap<u64, Vec<u32>>,
    next_watch: u32,
    /// The watchers run and commit events emitted, in order.
    host_log: Vec<HostEvent>,
    /// While a turn is open: the model as it was when the turn began (what a restart goes back
    /// to), and what the host is owed when the turn ends.
    turn: Option<Box<Model>>,
    held: Vec<HostEvent>,
    last: Observed,
    /// What the vats were handed during the last transition.
    delivered: Vec<String>,
}

/// Why a delivery cannot go on (sticky).
enum Verdict {
    Illegal(String),
    Exit { failure: bool },
}

/// What a crank hands its vat.
enum Delivery {
    Kernel(KernelDelivery),
    Gc(GcAction),
}

impl Model {
    fn new(vats: usize) -> Self {
        let mut m = Model {
            cranks: 0,
            next_object: 1,
            next_promise: 1,
            objects: BTreeMap::new(),
            promises: BTreeMap::new(),
            run_queue: VecDeque::new(),
            vats: Vec::new(),
            in_flight: None,
            pending: Vec::new(),
            settled: Vec::new(),
            marked: Vec::new(),
            watchers: BTreeMap::new(),
            next_watch: 0,
            host_log: Vec::new(),
            turn: None,
            held: Vec::new(),
            last: Observed::Nothing,
            delivered: Vec::new(),
        };
        for i in 0..vats {
            let ep = EndpointId(i as u32 + 1);
            let root = KRef::Object(m.new_object(ep, true));
            let mut vat = ModelVat {
                status: Status::Live,
                clist: BTreeMap::new(),
                vrefs: BTreeMap::new(),
                imported_objects: 0,
                imported_promises: 0,
                exported_objects: BTreeSet::new(),
                exported_promises: BTreeSet::new(),
                vatstore: BTreeMap::new(),
                mind: VatMind::new(),
            };
            vat.clist.insert(root, (VRef::ROOT, true));
            vat.vrefs.insert(VRef::ROOT, root);
            m.vats.push(vat);
        }
        m
    }

    fn vat(&self, ep: EndpointId) -> &ModelVat {
        &self.vats[ep.0 as usize - 1]
    }

    fn vat_mut(&mut self, ep: EndpointId) -> &mut ModelVat {
        &mut self.vats[ep.0 as usize - 1]
    }

    fn endpoints(&self) -> impl Iterator<Item = EndpointId> {
        (1..=self.vats.len() as u32).map(EndpointId)
    }

    fn is_live(&self, ep: EndpointId) -> bool {
        self.vat(ep).status == Status::Live
    }

    fn new_object(&mut self, owner: EndpointId, pinned: bool) -> KObjectId {
        let o = self.next_object;
        self.next_object += 1;
        self.objects.insert(o, ModelObject { owner, pinned, abandoned: false });
        KObjectId(o)
    }

    fn new_promise(&mut self, decider: Option<EndpointId>, pinned: bool) -> KPromiseId {
        let p = self.next_promise;
        self.next_promise += 1;
        self.promises.insert(p, ModelPromise { state: PromiseState::new(decider), pinned });
        KPromiseId(p)
    }

    fn exists(&self, r: KRef) -> bool {
        match r {
            KRef::Object(o) => self.objects.contains_key(&o.0),
            KRef::Promise(p) => self.promises.contains_key(&p.0),
        }
    }

    fn state(&self, kp: KPromiseId) -> Option<&PromiseState> {
        self.promises.get(&kp.0).map(|p| &p.state)
    }

    fn decider(&self, kp: KPromiseId) -> Option<EndpointId> {
        self.state(kp).and_then(PromiseState::decider)
    }

    fn all_refs(&self) -> Vec<KRef> {
        let objects = self.objects.keys().map(|o| KRef::Object(KObjectId(*o)));
        objects.chain(self.promises.keys().map(|p| KRef::Promise(KPromiseId(*p)))).collect()
    }

    // ---- reference counts (DESIGN §6) ----

    /// Every reference, counted from scratch: c-list entries (an import of an object counts as
    /// recognizable, and reachable if its flag says so; an exporter's own `o+N` entry does not
    /// count; every promise entry counts), queued, buffered and in-flight sends (target, slots,
    /// result) and notifies (their promise), messages queued on a promise (which they target),
    /// and settled data (every slot, reachable).
    fn recount(&self) -> Counts {
        let mut c = Counts::default();
        for vat in &self.vats {
            for (k, (v, reachable)) in &vat.clist {
                match k {
                    KRef::Promise(_) => c.add(*k, true),
                    KRef::Object(_) if v.allocator == Allocator::Kernel => c.add(*k, *reachable),
                    KRef::Object(_) => {}
                }
            }
        }
        for item in self.run_queue.iter().chain(&self.pending).chain(&self.in_flight) {
            match item {
                RunQueueItem::Send { target, message } => c.add_message(*target, message),
                RunQueueItem::Notify { promise, .. } => c.add(KRef::Promise(*promise), true),
                RunQueueItem::Gc { .. } => {}
            }
        }
        for (kp, p) in &self.promises {
            match &p.state {
                PromiseState::Unresolved { queue, .. } => {
                    for m in queue {
                        c.add_message(KRef::Promise(KPromiseId(*kp)), m);
                    }
                }
                PromiseState::Settled(s) => {
                    for slot in &s.data().slots {
                        c.add(*slot, true);
                    }
                }
            }
        }
        c
    }

    /// Make a change that may remove references, and mark every kref whose count it brought
    /// down to zero (for an object: a count fell and it is no longer reachable).
    fn changing<T>(&mut self, change: impl FnOnce(&mut Self) -> T) -> T {
        let before = self.recount();
        let out = change(self);
        let after = self.recount();
        for (o, (r0, g0)) in &before.objects {
            let (r1, g1) = after.object(KObjectId(*o));
            if (r1 < *r0 || g1 < *g0) && r1 == 0 && self.objects.contains_key(o) {
                self.marked.push(KRef::Object(KObjectId(*o)));
            }
        }
        for (p, n0) in &before.promises {
            if after.promise(KPromiseId(*p)) < *n0 && after.promise(KPromiseId(*p)) == 0 && self.promises.contains_key(p) {
                self.marked.push(KRef::Promise(KPromiseId(*p)));
            }
        }
        out
    }

    /// Before a transaction ends: look at every marked kref. A promise nobody refers to (and
    /// the host does not pin) goes, and its data's references with it. An object nobody reaches
    /// (and not pinned): if its exporter still serves it, the exporter is told `dropExports`
    /// (once: its own entry's flag remembers), and `retireExports` too if no one even
    /// recognises it; otherwise it goes if no one recognises it, and else everyone who does is
    /// told `retireImports`. The GC deliveries follow the transaction's other outputs, one per
    /// endpoint and kind, objects in order.
    fn collect(&mut self) {
        let mut actions: BTreeMap<(EndpointId, u8), Vec<KObjectId>> = BTreeMap::new();
        while let Some(k) = self.marked.pop() {
            let counts = self.recount();
            match k {
                KRef::Promise(p) => {
                    let Some(rec) = self.promises.get(&p.0) else { continue };
                    if rec.pinned || counts.promise(p) > 0 {
                        continue;
                    }
                    self.changing(|m| m.promises.remove(&p.0));
                }
                KRef::Object(o) => {
                    let Some(obj) = self.objects.get(&o.0).cloned() else { continue };
                    let (reachable, recognizable) = counts.object(o);
                    if obj.pinned || reachable > 0 {
                        continue;
                    }
                    if !obj.abandoned && self.is_live(obj.owner) {
                        if let Some((_, flag)) = self.vat_mut(obj.owner).clist.get_mut(&k) {
                            if *flag {
                                *flag = false;
                                actions.entry((obj.owner, 0)).or_default().push(o);
                            }
                        }
                        if recognizable == 0 {
                            actions.entry((obj.owner, 1)).or_default().push(o);
                        }
                    } else if recognizable == 0 {
                        self.objects.remove(&o.0);
                    } else {
                        // Its exporter no longer holds it as an export: everyone who holds it
                        // imports it (the owner too, if handed back an object it abandoned).
                        for ep in self.endpoints() {
                            if self.vat(ep).clist.contains_key(&k) {
                                actions.entry((ep, 2)).or_default().push(o);
                            }
                        }
                    }
                }
            }
        }
        for ((endpoint, kind), mut objects) in actions {
            objects.sort_unstable();
            objects.dedup();
            let action = match kind {
                0 => GcAction::DropExports(objects),
                1 => GcAction::RetireExports(objects),
                _ => GcAction::RetireImports(objects),
            };
            self.pending.push(RunQueueItem::Gc { endpoint, action });
        }
    }

    /// The objects of a queued GC action it still applies to when its turn comes: an export
    /// still served by `ep` that no one reaches (for `retireExports`, nor recognises); an
    /// import `ep` still has, dropped.
    fn still_applies(&self, ep: EndpointId, action: GcAction) -> Option<GcAction> {
        let counts = self.recount();
        let applies = |o: &KObjectId| {
            let export = |retire: bool| {
                self.objects.get(&o.0).is_some_and(|r| {
                    let (reachable, recognizable) = counts.object(*o);
                    r.owner == ep && reachable == 0 && (!retire || recognizable == 0) && !r.pinned && !r.abandoned
                })
            };
            match action {
                GcAction::DropExports(_) => export(false),
                GcAction::RetireExports(_) => export(true),
                GcAction::RetireImports(_) => self.vat(ep).clist.get(&KRef::Object(*o)).is_some_and(|(_, reachable)| !reachable),
                GcAction::BringOutYourDead => true,
            }
        };
        let keep: Vec<KObjectId> = action.objects().iter().copied().filter(applies).collect();
        match action {
            GcAction::BringOutYourDead => Some(GcAction::BringOutYourDead),
            _ if keep.is_empty() => None,
            GcAction::DropExports(_) => Some(GcAction::DropExports(keep)),
            GcAction::RetireExports(_) => Some(GcAction::RetireExports(keep)),
            GcAction::RetireImports(_) => Some(GcAction::RetireImports(keep)),
        }
    }

    /// After a GC delivery: retired exports go (unless the exporter named them again during
    /// the delivery, which makes them referenced again), and retired imports leave the c-list.
    fn after_gc_delivery(&mut self, ep: EndpointId, action: &GcAction) {
        match action {
            GcAction::RetireExports(objects) => {
                for o in objects {
                    let (reachable, recognizable) = self.recount().object(*o);
                    if self.objects.contains_key(&o.0) && (reachable > 0 || recognizable > 0) {
                        continue;
                    }
                    self.clist_remove(ep, KRef::Object(*o));
                    self.objects.remove(&o.0);
                }
            }
            GcAction::RetireImports(objects) => {
                for o in objects {
                    self.changing(|m| m.clist_remove(ep, KRef::Object(*o)));
                }
            }
            GcAction::DropExports(_) | GcAction::BringOutYourDead => {}
        }
    }

    // ---- host API (immediate path) ----

    /// The host may queue only to and with references that exist.
    fn check_host_refs(&self, target: KRef, args: &[KRef]) -> Result<(), String> {
        match std::iter::once(&target).chain(args).find(|r| !self.exists(**r)) {
            Some(missing) => Err(format!("unknown reference {missing}")),
            None => Ok(()),
        }
    }

    fn queue_message(&mut self, target: KRef, method: String, args: Vec<KRef>, pinned: bool) -> Result<KPromiseId, String> {
        self.check_host_refs(target, &args)?;
        let kp = self.new_promise(None, pinned);
        let message = Message { method, args: CapData { body: HOST_BODY.to_vec(), slots: args }, result: Some(kp) };
        self.run_queue.push_back(RunQueueItem::Send { target, message });
        Ok(kp)
    }

    fn queue_send_only(&mut self, target: KRef, method: String, args: Vec<KRef>) -> Result<(), String> {
        self.check_host_refs(target, &args)?;
        let message = Message { method, args: CapData { body: HOST_BODY.to_vec(), slots: args }, result: None };
        self.run_queue.push_back(RunQueueItem::Send { target, message });
        Ok(())
    }

    fn watch(&mut self, kp: KPromiseId) -> Result<(), String> {
        let id = self.next_watch;
        self.next_watch += 1;
        match self.state(kp) {
            None => Err(format!("unknown reference {kp}")),
            Some(PromiseState::Settled(s)) => {
                let s = s.clone();
                self.emit(HostEvent::Watcher(id, kp, s));
                Ok(())
            }
            Some(PromiseState::Unresolved { .. }) => {
                self.watchers.entry(kp.0).or_default().push(id);
                Ok(())
            }
        }
    }

    /// The vats' roots are the first objects made, one per vat.
    fn is_root(&self, o: KObjectId) -> bool {
        (1..=self.vats.len() as u64).contains(&o.0)
    }

    /// The host pins or unpins `kref`; unpinning may make it garbage at once. Vat roots stay
    /// pinned.
    fn set_pinned(&mut self, kref: KRef, pinned: bool) -> Result<(), String> {
        if let (KRef::Object(o), false) = (kref, pinned) {
            if let Some(r) = self.objects.get(&o.0).filter(|_| self.is_root(o)) {
                return Err(format!("{o} is the root of {}: vat roots stay pinned", r.owner));
            }
        }
        match kref {
            KRef::Object(o) => self.objects.get_mut(&o.0).map(|r| r.pinned = pinned),
            KRef::Promise(p) => self.promises.get_mut(&p.0).map(|r| r.pinned = pinned),
        }
        .ok_or_else(|| format!("unknown reference {kref}"))?;
        if !pinned {
            self.marked.push(kref);
        }
        self.flush();
        Ok(())
    }

    fn reap(&mut self, ep: EndpointId) -> Result<(), String> {
        if ep.0 == 0 || ep.0 as usize > self.vats.len() {
            return Err(format!("unknown endpoint {ep}"));
        }
        self.run_queue.push_back(RunQueueItem::Gc { endpoint: ep, action: GcAction::BringOutYourDead });
        Ok(())
    }

    // ---- promises (DESIGN §5) ----

    /// The unresolved promise at the end of `kp`'s forwarding chain, if any.
    fn chain_end(&self, mut kp: KPromiseId) -> Option<KPromiseId> {
        for _ in 0..=self.promises.len() {
            match self.state(kp)? {
                PromiseState::Unresolved { .. } => return Some(kp),
                PromiseState::Settled(Settlement::Fulfilled(d)) => match d.as_reference() {
                    Some(KRef::Promise(next)) => kp = next,
                    _ => return None,
                },
                PromiseState::Settled(Settlement::Rejected(_)) => return None,
            }
        }
        panic!("model: promise forwarding loop through {kp}");
    }

    fn resolve(&mut self, kp: KPromiseId, mut settlement: Settlement) {
        let Some(PromiseState::Unresolved { subscribers, queue, .. }) = self.state(kp).cloned() else {
            return;
        };
        if let Some(KRef::Promise(other)) = match &settlement {
            Settlement::Fulfilled(d) => d.as_reference(),
            Settlement::Rejected(_) => None,
        } {
            match self.chain_end(other) {
                Some(end) if end == kp => {
                    settlement = Settlement::Rejected(CapData::error(&format!("{kp} resolved to a promise that forwards to itself")));
                }
                Some(end) => {
                    if let Some(ModelPromise { state: PromiseState::Unresolved { decider, subscribers: subs, .. }, .. }) =
                        self.promises.get_mut(&end.0)
                    {
                        for s in &subscribers {
                            if Some(*s) != *decider && !subs.contains(s) {
                                subs.push(*s);
                            }
                        }
                    }
                }
                None => {}
            }
        }
        let new_target = match &settlement {
            Settlement::Fulfilled(d) => d.as_reference().unwrap_or(KRef::Promise(kp)),
            Settlement::Rejected(_) => KRef::Promise(kp),
        };
        if let Some(p) = self.promises.get_mut(&kp.0) {
            p.state = PromiseState::Settled(settlement.clone());
        }
        self.pending.extend(subscribers.into_iter().map(|endpoint| RunQueueItem::Notify { endpoint, promise: kp }));
        self.pending.extend(queue.into_iter().map(|message| RunQueueItem::Send { target: new_target, message }));
        self.settled.push((kp, settlement));
    }

    fn reject(&mut self, kp: KPromiseId, reason: CapData) {
        self.resolve(kp, Settlement::Rejected(reason));
    }

    /// `kp`'s settlement and those of the settled promises its data names, depth first.
    fn resolutions_for_notify(&self, kp: KPromiseId, out: &mut Vec<(KPromiseId, Settlement)>) {
        if out.iter().any(|(q, _)| *q == kp) {
            return;
        }
        if let Some(PromiseState::Settled(s)) = self.state(kp) {
            out.push((kp, s.clone()));
            for slot in &s.data().slots {
                if let KRef::Promise(q) = slot {
                    self.resolutions_for_notify(*q, out);
                }
            }
        }
    }

    // ---- c-lists ----

    /// `ep`'s ref for `kref`, importing it if new; an import it had dropped is reachable again.
    fn import(&mut self, ep: EndpointId, kref: KRef) -> VRef {
        let vat = self.vat_mut(ep);
        if let Some((v, reachable)) = vat.clist.get_mut(&kref) {
            *reachable = true;
            return *v;
        }
        let v = match kref {
            KRef::Object(_) => {
                vat.imported_objects += 1;
                VRef::import(vat.imported_objects)
            }
            KRef::Promise(_) => {
                vat.imported_promises += 1;
                VRef::imported_promise(vat.imported_promises)
            }
        };
        vat.clist.insert(kref, (v, true));
        vat.vrefs.insert(v, kref);
        v
    }

    /// The kref for a vref `ep` names in a syscall. A kernel-allocated ref must be in its c-list
    /// (an object: not dropped); an own ref names what it named, or (above everything the vat
    /// named before) something new.
    fn export(&mut self, ep: EndpointId, vref: VRef) -> Result<KRef, String> {
        if let Some(&k) = self.vat(ep).vrefs.get(&vref) {
            if let KRef::Object(_) = k {
                let entry = self.vat_mut(ep).clist.get_mut(&k).expect("both directions");
                if vref.allocator == Allocator::Kernel {
                    if !entry.1 {
                        return Err(format!("{ep} dropped {vref}"));
                    }
                } else {
                    entry.1 = true;
                }
            }
            return Ok(k);
        }
        if vref.allocator == Allocator::Kernel {
            return Err(format!("{ep} was never given {vref}"));
        }
        let vat = self.vat_mut(ep);
        let named = match vref.kind {
            RefKind::Object => &mut vat.exported_objects,
            RefKind::Promise => &mut vat.exported_promises,
        };
        if vref.index == 0 || !named.insert(vref.index) {
            return Err(format!("{ep} no longer has {vref}"));
        }
        let kref = match vref.kind {
            RefKind::Object => KRef::Object(self.new_object(ep, false)),
            RefKind::Promise => KRef::Promise(self.new_promise(Some(ep), false)),
        };
        let vat = self.vat_mut(ep);
        vat.clist.insert(kref, (vref, true));
        vat.vrefs.insert(vref, kref);
        Ok(kref)
    }

    fn clist_remove(&mut self, ep: EndpointId, kref: KRef) {
        let vat = self.vat_mut(ep);
        if let Some((v, _)) = vat.clist.remove(&kref) {
            vat.vrefs.remove(&v);
        }
    }

    /// What `ep` may drop: object imports it still reaches, promises it holds but does not
    /// decide; in kref order.
    fn held_imports(&self, ep: EndpointId) -> Vec<VRef> {
        let vat = self.vat(ep);
        vat.clist
            .iter()
            .filter(|(k, (v, reachable))| match k {
                KRef::Object(_) => v.allocator == Allocator::Kernel && *reachable,
                KRef::Promise(p) => self.decider(*p) != Some(ep),
            })
            .map(|(_, (v, _))| *v)
            .collect()
    }

    // ---- routing (DESIGN §2) ----

    /// The in-flight send goes no further: its result is rejected, its references released.
    fn reject_in_flight(&mut self, message: &Message, reason: CapData) {
        if let Some(kp) = message.result {
            self.changing(|m| m.reject(kp, reason));
        }
        self.changing(|m| m.in_flight = None);
    }

    /// Route the in-flight send: `Some((owner, object, message))` to deliver (the send still
    /// in flight), `None` if it was queued on a promise or its result rejected.
    fn route(&mut self) -> Option<(EndpointId, KObjectId, Message)> {
        loop {
            let Some(RunQueueItem::Send { target, message }) = self.in_flight.clone() else { panic!("model: no send in flight") };
            match target {
                KRef::Object(o) => {
                    let Some(obj) = self.objects.get(&o.0).cloned() else {
                        self.reject_in_flight(&message, CapData::error(&format!("no such object {o}")));
                        return None;
                    };
                    match self.vat(obj.owner).status.clone() {
                        Status::Live if obj.abandoned => {
                            self.reject_in_flight(&message, CapData::error(&format!("{o} was abandoned by its exporter")));
                            return None;
                        }
                        Status::Live => return Some((obj.owner, o, message)),
                        Status::Terminated(reason) => {
                            let why = format!("vat terminated: {} ({reason})", obj.owner);
                            self.reject_in_flight(&message, CapData::error(&why));
                            return None;
                        }
                    }
                }
                KRef::Promise(p) => match self.state(p).cloned() {
                    None => {
                        self.reject_in_flight(&message, CapData::error(&format!("no such promise {p}")));
                        return None;
                    }
                    Some(PromiseState::Unresolved { .. }) => {
                        self.in_flight = None;
                        if let Some(ModelPromise { state: PromiseState::Unresolved { queue, .. }, .. }) = self.promises.get_mut(&p.0) {
                            queue.push(message);
                        }
                        return None;
                    }
                    Some(PromiseState::Settled(Settlement::Fulfilled(data))) => match data.as_reference() {
                        Some(next) => self.changing(|m| m.in_flight = Some(RunQueueItem::Send { target: next, message })),
                        None => {
                            let why = format!("cannot deliver {}: {p} was fulfilled to data, not an object", message.method);
                            self.reject_in_flight(&message, CapData::error(&why));
                            return None;
                        }
                    },
                    Some(PromiseState::Settled(Settlement::Rejected(reason))) => {
                        self.reject_in_flight(&message, reason);
                        return None;
                    }
                },
            }
        }
    }

    // ---- the crank (DESIGN §4) ----

    /// Terminate `ep`: mark it, reject every promise it decides with `data`, drop its c-list
    /// (releasing its imports, abandoning its exports). Its vatstore stays, for inspection.
    fn terminate(&mut self, ep: EndpointId, reason: &str, data: CapData) {
        self.vat_mut(ep).status = Status::Terminated(reason.to_owned());
        let decided: Vec<KPromiseId> =
            self.promises.iter().filter(|(_, p)| p.state.decider() == Some(ep)).map(|(kp, _)| KPromiseId(*kp)).collect();
        for kp in decided {
            self.changing(|m| m.reject(kp, data.clone()));
        }
        let entries: Vec<(KRef, VRef)> = self.vat(ep).clist.iter().map(|(k, (v, _))| (*k, *v)).collect();
        for (k, v) in entries {
            if let (KRef::Object(o), true) = (k, is_own_export(v)) {
                if let Some(obj) = self.objects.get_mut(&o.0) {
                    obj.abandoned = true;
                    self.marked.push(k);
                }
            }
            self.changing(|m| m.clist_remove(ep, k));
        }
    }

    /// End a transaction: collect, then flush the buffer to the run queue in order, then run
    /// the watchers of the promises it settled.
    fn flush(&mut self) -> usize {
        self.collect();
        let flushed = self.pending.len();
        self.run_queue.extend(self.pending.drain(..));
        for (kp, s) in std::mem::take(&mut self.settled) {
            if let Some(ids) = self.watchers.remove(&kp.0) {
                for id in ids {
                    self.emit(HostEvent::Watcher(id, kp, s.clone()));
                }
            }
        }
        flushed
    }

    /// What the host sees run: at once, or while a turn is open, when it ends.
    fn emit(&mut self, e: HostEvent) {
        if self.turn.is_some() {
            self.held.push(e);
        } else {
            self.host_log.push(e);
        }
    }

    /// Open a turn (nothing if one is open): remember the model as it is now.
    fn begin_turn(&mut self) {
        if self.turn.is_none() {
            self.turn = Some(Box::new(self.clone()));
        }
    }

    /// End the open turn (nothing if none is open): the host gets what it was owed, in order.
    fn end_turn(&mut self) {
        if self.turn.take().is_some() {
            let held = std::mem::take(&mut self.held);
            self.host_log.extend(held);
        }
    }

    /// A restart: the host's watchers are gone (host memory); an open turn is lost whole, back
    /// to the model as the turn began, except what lives outside the kernel: the vats' memory,
    /// the host's watcher numbering, and what the host already saw.
    fn restart(&mut self) {
        if let Some(begin) = self.turn.take() {
            let now = std::mem::replace(self, *begin);
            for (vat, then) in self.vats.iter_mut().zip(now.vats) {
                vat.mind = then.mind;
            }
            self.next_watch = now.next_watch;
            self.host_log = now.host_log;
        }
        self.watchers.clear();
    }

    /// Commit a crank: end its transaction, then the commit event.
    fn commit(&mut self, crank: u64, input: CrankInput, outcome: String) -> CrankSummary {
        let flushed = self.flush();
        self.emit(HostEvent::Commit(crank));
        CrankSummary { crank, input, outcome: normalise(&outcome), flushed }
    }

    /// Work arriving from outside a crank on behalf of `ep` (the immediate path): applied at
    /// once if it is sound, otherwise not at all (and `ep` is not terminated). No crank, no
    /// commit event. The vat's memory is host memory: it keeps what the script did to it.
    fn external(&mut self, ep: EndpointId, script: &Script, notes: &mut Vec<String>) -> Result<(), String> {
        if !self.is_live(ep) {
            return Err(normalise(&format!("illegal syscall: {ep} is not live")));
        }
        let begin = self.clone();
        let mut mind = self.vat(ep).mind.clone();
        let mut sys = ModelSyscalls { model: self, ep, verdict: None, notes: Vec::new() };
        let end = run_script(&mut mind, script, &mut sys);
        notes.append(&mut sys.notes);
        let fault = match (sys.verdict, end) {
            (Some(Verdict::Illegal(why)), _) => Some(format!("illegal syscall: {why}")),
            (Some(Verdict::Exit { .. }), _) => Some("illegal syscall: exit outside a delivery".to_owned()),
            (None, End::Failed(why)) => Some(format!("vat error: {why}")),
            (None, End::Panicked(why)) => Some(format!("vat panicked: {why}")),
            (None, End::Returned) => None,
        };
        if let Some(fault) = fault {
            *self = begin;
            self.vat_mut(ep).mind = mind;
            return Err(normalise(&fault));
        }
        self.vat_mut(ep).mind = mind;
        self.flush();
        Ok(())
    }

    /// What a committed delivery leaves behind: its decider holds its result promise, a notify's
    /// promises leave the c-list, a GC delivery's retirements take effect.
    fn after_delivery(&mut self, ep: EndpointId, result: Option<KPromiseId>, notified: &[KPromiseId], gc: Option<&GcAction>) {
        if let Some(kp) = result {
            if self.decider(kp) == Some(ep) {
                self.import(ep, KRef::Promise(kp));
            }
        }
        for kp in notified {
            self.changing(|m| m.clist_remove(ep, KRef::Promise(*kp)));
        }
        if let Some(action) = gc {
            self.after_gc_delivery(ep, action);
        }
    }

    /// One crank. The crank's transaction is a clone of the whole model taken before it
    /// begins: an abort restores it, then applies the consequence as its own step.
    fn step(&mut self, feed: &mut Feed) -> Option<CrankSummary> {
        let begin = self.clone();
        let item = self.run_queue.pop_front()?;
        self.in_flight = Some(item.clone());
        self.cranks += 1;
        let crank = self.cranks;
        let (input, ep, delivery) = match item {
            RunQueueItem::Send { target, message } => {
                let method = message.method.clone();
                let Some((ep, object, message)) = self.route() else {
                    let input = CrankInput::Send { target, method, delivered_to: None };
                    return Some(self.commit(crank, input, "committed".into()));
                };
                if let Some(kp) = message.result {
                    if let Some(ModelPromise { state: PromiseState::Unresolved { decider, .. }, .. }) = self.promises.get_mut(&kp.0) {
                        *decider = Some(ep);
                    }
                }
                // The receiver's c-list takes over the message's references as it imports them.
                self.changing(|m| m.in_flight = None);
                let input = CrankInput::Send { target, method, delivered_to: Some(ep) };
                (input, ep, Delivery::Kernel(KernelDelivery::Message { target: object, message }))
            }
            RunQueueItem::Notify { endpoint, promise } => {
                self.changing(|m| m.in_flight = None);
                // Not to a vat that no longer holds the promise (it dropped it).
                if !self.is_live(endpoint) || !self.vat(endpoint).clist.contains_key(&KRef::Promise(promise)) {
                    let input = CrankInput::Notify { endpoint, promise, delivered: false };
                    return Some(self.commit(crank, input, "committed".into()));
                }
                let mut resolutions = Vec::new();
                self.resolutions_for_notify(promise, &mut resolutions);
                let input = CrankInput::Notify { endpoint, promise, delivered: true };
                (input, endpoint, Delivery::Kernel(KernelDelivery::Notify { resolutions }))
            }
            RunQueueItem::Gc { endpoint, action } => {
                self.in_flight = None;
                let name = action.name();
                let applies = if self.is_live(endpoint) { self.still_applies(endpoint, action) } else { None };
                let Some(action) = applies else {
                    let input = CrankInput::Gc { endpoint, action: name, delivered: false };
                    return Some(self.commit(crank, input, "committed".into()));
                };
                (CrankInput::Gc { endpoint, action: name, delivered: true }, endpoint, Delivery::Gc(action))
            }
        };
        let (result, notified, gc) = match &delivery {
            Delivery::Kernel(KernelDelivery::Message { message, .. }) => (message.result, Vec::new(), None),
            Delivery::Kernel(KernelDelivery::Notify { resolutions }) => (None, resolutions.iter().map(|(kp, _)| *kp).collect(), None),
            Delivery::Gc(action) => (None, Vec::new(), Some(action.clone())),
        };

        // Deliver: the vat replays its script against the model's syscalls.
        let (vd, script) = match &delivery {
            Delivery::Kernel(d) => {
                feed.delivered.push(show_delivery(ep, d));
                let script = feed.take();
                (translate_delivery(d, |k| self.import(ep, k)), script)
            }
            Delivery::Gc(action) => {
                let (vd, vrefs) = translate_gc(action, |k| self.vat(ep).clist.get(&k).map(|(v, _)| *v));
                feed.delivered.push(show_gc_delivery(ep, action, &vrefs));
                (vd, feed.take())
            }
        };
        let mut mind = self.vat(ep).mind.clone();
        mind.observe(&vd);
        let mut sys = ModelSyscalls { model: self, ep, verdict: None, notes: Vec::new() };
        let end = run_script(&mut mind, &script, &mut sys);
        feed.delivered.append(&mut sys.notes);
        let verdict = sys.verdict;
        mind.after(&vd);
        self.vat_mut(ep).mind = mind;

        let fault = match (verdict, end) {
            (Some(Verdict::Illegal(why)), _) => format!("illegal syscall: {why}"),
            (Some(Verdict::Exit { failure }), _) => {
                self.after_delivery(ep, result, &notified, gc.as_ref());
                let why = if failure { "exited with failure" } else { "exited" };
                self.terminate(ep, why, CapData::plain(EXIT_BODY));
                return Some(self.commit(crank, input, format!("exited {ep} failure={failure}")));
            }
            (None, End::Failed(why)) => format!("vat error: {why}"),
            (None, End::Panicked(why)) => format!("vat panicked: {why}"),
            (None, End::Returned) => {
                self.after_delivery(ep, result, &notified, gc.as_ref());
                return Some(self.commit(crank, input, "committed".into()));
            }
        };

        // Abort: as if the delivery never happened; then the consequence, committed alone: the
        // item is consumed (its references released), the vat terminated, the result rejected.
        // The vat's memory is host memory: it keeps what the delivery did to it (which matters
        // once a restart loses the turn that terminated the vat).
        let mind = self.vat(ep).mind.clone();
        *self = begin;
        self.vat_mut(ep).mind = mind;
        let item = self.run_queue.pop_front().expect("the aborted crank's item");
        self.in_flight = Some(item.clone());
        self.cranks += 1;
        self.terminate(ep, &fault, CapData::error(&format!("vat terminated: {fault}")));
        match item {
            RunQueueItem::Send { message, .. } => {
                let reason = CapData::error(&format!("delivery failed: {fault}"));
                self.reject_in_flight(&message, reason);
            }
            RunQueueItem::Notify { .. } => self.changing(|m| m.in_flight = None),
            RunQueueItem::Gc { .. } => self.in_flight = None,
        }
        Some(self.commit(crank, input, format!("aborted {ep}: {fault}")))
    }

    fn run(&mut self, max: u64, feed: &mut Feed) -> Observed {
        let (mut cranks, mut aborted) = (0, 0);
        while cranks < max {
            match self.step(feed) {
                None => return Observed::Ran { cranks, aborted, quiescent: true },
                Some(s) => {
                    cranks += 1;
                    if s.outcome.starts_with("aborted") {
                        aborted += 1;
                    }
                }
            }
        }
        Observed::Ran { cranks, aborted, quiescent: self.run_queue.is_empty() }
    }

    /// The model's own invariants between transactions: no transaction left open, and nothing
    /// that can still be used names a deleted object or promise (a dropped import may outlive
    /// its object until `retireImports` removes it; a queued GC action may name a deleted one).
    fn sanity(&self) -> Result<(), String> {
        if self.in_flight.is_some() || !self.pending.is_empty() || !self.settled.is_empty() || !self.marked.is_empty() {
            return Err("a transaction was left open".into());
        }
        let check = |r: &KRef, what: &str| if self.exists(*r) { Ok(()) } else { Err(format!("{what} names {r}, which does not exist")) };
        let check_message = |target: KRef, m: &Message, what: &str| -> Result<(), String> {
            check(&target, what)?;
            m.args.slots.iter().try_for_each(|s| check(s, what))?;
            m.result.iter().try_for_each(|r| check(&KRef::Promise(*r), what))
        };
        for item in &self.run_queue {
            match item {
                RunQueueItem::Send { target, message } => check_message(*target, message, "a queued send")?,
                RunQueueItem::Notify { promise, .. } => check(&KRef::Promise(*promise), "a queued notify")?,
                RunQueueItem::Gc { .. } => {}
            }
        }
        for (kp, p) in &self.promises {
            match &p.state {
                PromiseState::Unresolved { queue, .. } => {
                    queue.iter().try_for_each(|m| check_message(KRef::Promise(KPromiseId(*kp)), m, "a message queued on a promise"))?
                }
                PromiseState::Settled(s) => s.data().slots.iter().try_for_each(|r| check(r, "settled data"))?,
            }
        }
        for (i, vat) in self.vats.iter().enumerate() {
            for (k, (v, reachable)) in &vat.clist {
                if *reachable || k.as_promise().is_some() {
                    check(k, &format!("e{}'s c-list entry {v}", i + 1))?;
                }
            }
        }
        // Once the run queue is empty every GC delivery has been made, so nothing collectable
        // is left (whatever the trigger rule missed, kernel and model alike, shows up here): no
        // unpinned promise nobody refers to; no unpinned object nobody reaches, unless it is
        // an export still served whose exporter was told so and keeps it (it may, until no
        // one recognises it).
        if self.run_queue.is_empty() {
            let counts = self.recount();
            for (kp, p) in &self.promises {
                if !p.pinned && counts.promise(KPromiseId(*kp)) == 0 {
                    return Err(format!("kp{kp} is left with no references"));
                }
            }
            for (o, obj) in &self.objects {
                let (reachable, recognizable) = counts.object(KObjectId(*o));
                if obj.pinned || reachable > 0 {
                    continue;
                }
                let served = !obj.abandoned && self.is_live(obj.owner);
                let told = self.vat(obj.owner).clist.get(&KRef::Object(KObjectId(*o))).is_some_and(|(_, flag)| !flag);
                if !served || !told || recognizable == 0 {
                    return Err(format!(
                        "ko{o} is left unreachable (recognizable {recognizable}, served {served}, dropExports told {told})"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The model's side of a delivery's syscalls.
struct ModelSyscalls<'a> {
    model: &'a mut Model,
    ep: EndpointId,
    verdict: Option<Verdict>,
    notes: Vec<String>,
}

impl ModelSyscalls<'_> {
    fn guard(&self) -> Result<(), Refused> {
        if self.verdict.is_some() {
            Err(Refused)
        } else {
            Ok(())
        }
    }

    fn illegal(&mut self, why: String) -> Refused {
        if self.verdict.is_none() {
            self.verdict = Some(Verdict::Illegal(why));
        }
        Refused
    }

    fn kref(&mut self, v: VRef) -> Result<KRef, Refused> {
        self.guard()?;
        self.model.export(self.ep, v).map_err(|why| self.illegal(why))
    }

    fn kpromise(&mut self, v: VRef) -> Result<KPromiseId, Refused> {
        Ok(self.kref(v)?.as_promise().expect("a promise vref maps to a promise kref"))
    }

    /// Refs the c-list must already hold (the GC syscalls name nothing new).
    fn known(&mut self, vrefs: Vec<VRef>) -> Result<Vec<KRef>, Refused> {
        self.guard()?;
        let mut out = Vec::new();
        for v in vrefs {
            match self.model.vat(self.ep).vrefs.get(&v) {
                Some(k) => out.push(*k),
                None => return Err(self.illegal(format!("{v} is not in the c-list"))),
            }
        }
        Ok(out)
    }
}

impl Syscalls for ModelSyscalls<'_> {
    fn send(&mut self, target: VRef, method: String, slots: Vec<VRef>, result: Option<VRef>) -> Result<(), Refused> {
        let target = self.kref(target)?;
        let slots = slots.into_iter().map(|s| self.kref(s)).collect::<Result<Vec<_>, _>>()?;
        let result = result.map(|r| self.kpromise(r)).transpose()?;
        self.guard()?;
        if let Some(kp) = result {
            match self.model.promises.get_mut(&kp.0) {
                Some(ModelPromise { state: PromiseState::Unresolved { decider, .. }, .. }) if *decider == Some(self.ep) => *decider = None,
                _ => return Err(self.illegal(format!("{} does not decide result {kp}", self.ep))),
            }
        }
        let message = Message { method, args: CapData { body: ARGS_BODY.to_vec(), slots }, result };
        self.model.pending.push(RunQueueItem::Send { target, message });
        Ok(())
    }

    fn subscribe(&mut self, promise: VRef) -> Result<(), Refused> {
        let kp = self.kpromise(promise)?;
        match &mut self.model.promises.get_mut(&kp.0).expect("a promise in a c-list exists").state {
            PromiseState::Unresolved { subscribers, .. } => {
                if !subscribers.contains(&self.ep) {
                    subscribers.push(self.ep);
                }
            }
            PromiseState::Settled(_) => self.model.pending.push(RunQueueItem::Notify { endpoint: self.ep, promise: kp }),
        }
        Ok(())
    }

    fn resolve(&mut self, resolutions: Vec<(VRef, VSettlement)>) -> Result<(), Refused> {
        let mut krs: Vec<(KPromiseId, Settlement)> = Vec::new();
        for (p, s) in resolutions {
            let kp = self.kpromise(p)?;
            let slots = s.slots.into_iter().map(|v| self.kref(v)).collect::<Result<Vec<_>, _>>()?;
            let data = CapData { body: s.body, slots };
            krs.push((kp, if s.rejected { Settlement::Rejected(data) } else { Settlement::Fulfilled(data) }));
        }
        self.guard()?;
        for (i, (kp, _)) in krs.iter().enumerate() {
            if krs[..i].iter().any(|(q, _)| q == kp) {
                return Err(self.illegal(format!("{kp} named twice")));
            }
            if self.model.decider(*kp) != Some(self.ep) {
                return Err(self.illegal(format!("{} may not resolve {kp}", self.ep)));
            }
        }
        let ep = self.ep;
        for (kp, s) in krs {
            // The resolver is done with the promise, unless it awaits its own notify.
            let subscribed =
                matches!(self.model.state(kp), Some(PromiseState::Unresolved { subscribers, .. }) if subscribers.contains(&ep));
            self.model.changing(|m| m.resolve(kp, s));
            if !subscribed {
                self.model.changing(|m| m.clist_remove(ep, KRef::Promise(kp)));
            }
        }
        Ok(())
    }

    fn exit(&mut self, failure: bool) -> Result<(), Refused> {
        self.guard()?;
        self.verdict = Some(Verdict::Exit { failure });
        Ok(())
    }

    fn vatstore_set(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), Refused> {
        self.guard()?;
        self.model.vat_mut(self.ep).vatstore.insert(key, value);
        Ok(())
    }

    fn vatstore_delete(&mut self, key: Vec<u8>) -> Result<(), Refused> {
        self.guard()?;
        self.model.vat_mut(self.ep).vatstore.remove(&key);
        Ok(())
    }

    fn vatstore_get(&mut self, key: Vec<u8>) -> Result<Option<Vec<u8>>, Refused> {
        self.guard()?;
        Ok(self.model.vat(self.ep).vatstore.get(&key).cloned())
    }

    fn vatstore_next_key(&mut self, after: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, Refused> {
        self.guard()?;
        let store = &self.model.vat(self.ep).vatstore;
        Ok(store.keys().find(|k| after.as_ref().is_none_or(|a| *k > a)).cloned())
    }

    /// Objects must be imports the vat still reaches (they become dropped); promises must be
    /// ones it does not decide (it forgets them, and is no longer a subscriber).
    fn drop_imports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused> {
        let krefs = self.known(vrefs)?;
        let ep = self.ep;
        for k in krefs {
            let entry = self.model.vat(ep).clist.get(&k).copied();
            let legal = match (k, entry) {
                (KRef::Object(_), Some((v, reachable))) => v.allocator == Allocator::Kernel && reachable,
                (KRef::Promise(p), Some(_)) => self.model.decider(p) != Some(ep),
                (_, None) => false,
            };
            if !legal {
                return Err(self.illegal(format!("{ep} does not hold {k} as a reachable import")));
            }
            match k {
                KRef::Object(_) => self.model.changing(|m| m.vat_mut(ep).clist.get_mut(&k).expect("checked").1 = false),
                KRef::Promise(p) => self.model.changing(|m| {
                    m.clist_remove(ep, k);
                    if let Some(ModelPromise { state: PromiseState::Unresolved { subscribers, .. }, .. }) = m.promises.get_mut(&p.0) {
                        subscribers.retain(|s| *s != ep);
                    }
                }),
            }
        }
        Ok(())
    }

    /// Each must be an object import the vat dropped: it leaves the c-list.
    fn retire_imports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused> {
        let krefs = self.known(vrefs)?;
        let ep = self.ep;
        for k in krefs {
            let legal =
                matches!((k, self.model.vat(ep).clist.get(&k)), (KRef::Object(_), Some((v, false))) if v.allocator == Allocator::Kernel);
            if !legal {
                return Err(self.illegal(format!("{ep} does not hold {k} as a dropped import")));
            }
            self.model.changing(|m| m.clist_remove(ep, k));
        }
        Ok(())
    }

    /// Each must be an export of the vat's that no one reaches (and not pinned or abandoned):
    /// it goes, and whoever still recognises it is told `retireImports`.
    fn retire_exports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused> {
        let krefs = self.known(vrefs)?;
        let ep = self.ep;
        for k in krefs {
            let KRef::Object(o) = k else { return Err(self.illegal(format!("retireExports of promise {k}"))) };
            let (reachable, _) = self.model.recount().object(o);
            let legal = self.model.objects.get(&o.0).is_some_and(|r| r.owner == ep && reachable == 0 && !r.pinned && !r.abandoned);
            if !legal {
                return Err(self.illegal(format!("{k} is not an unreachable export of {ep}")));
            }
            self.model.clist_remove(ep, k);
            self.model.objects.remove(&o.0);
            let recognizers: Vec<EndpointId> = self.model.endpoints().filter(|e| self.model.vat(*e).clist.contains_key(&k)).collect();
            for endpoint in recognizers {
                self.model.pending.push(RunQueueItem::Gc { endpoint, action: GcAction::RetireImports(vec![o]) });
            }
        }
        Ok(())
    }

    /// Each must be an export of the vat's other than its root (a host pin does not stop the
    /// vat giving it up), not yet abandoned: the vat stops serving it and forgets it; importers
    /// keep it until they drop it.
    fn abandon_exports(&mut self, vrefs: Vec<VRef>) -> Result<(), Refused> {
        let krefs = self.known(vrefs)?;
        let ep = self.ep;
        for k in krefs {
            let KRef::Object(o) = k else { return Err(self.illegal(format!("abandonExports of promise {k}"))) };
            let root = self.model.is_root(o);
            match self.model.objects.get_mut(&o.0) {
                Some(r) if r.owner == ep && !r.abandoned && !root => r.abandoned = true,
                _ => return Err(self.illegal(format!("{k} is not an export of {ep}"))),
            }
            self.model.changing(|m| m.clist_remove(ep, k));
            self.model.marked.push(k);
        }
        Ok(())
    }

    fn held_imports(&mut self) -> Result<Vec<VRef>, Refused> {
        self.guard()?;
        Ok(self.model.held_imports(self.ep))
    }

    fn note(&mut self, line: String) {
        self.notes.push(line);
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing the kernel with the model.
// ---------------------------------------------------------------------------------------------

/// Replace the kernel's own wording of an illegal syscall (`illegal syscall: <detail>`) by `…`.
fn normalise(text: &str) -> String {
    const MARK: &str = "illegal syscall: ";
    let Some(i) = text.find(MARK) else { return text.to_owned() };
    let start = i + MARK.len();
    let end = text[start..].find([')', '"']).map_or(text.len(), |j| start + j);
    format!("{}…{}", &text[..start], &text[end..])
}

fn normalise_data(d: &CapData) -> CapData {
    match std::str::from_utf8(&d.body) {
        Ok(text) => CapData { body: normalise(text).into_bytes(), slots: d.slots.clone() },
        Err(_) => d.clone(),
    }
}

/// Everything the comparison looks at, one readable line per item.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    fields: Vec<(&'static str, Vec<String>)>,
}

fn show_data(d: &CapData) -> String {
    let body = String::from_utf8_lossy(&d.body);
    if d.slots.is_empty() {
        format!("{body}")
    } else {
        let slots: Vec<String> = d.slots.iter().map(ToString::to_string).collect();
        format!("{body}[{}]", slots.join(","))
    }
}

fn show_settlement(s: &Settlement) -> String {
    match s {
        Settlement::Fulfilled(d) => format!("fulfilled {}", show_data(&normalise_data(d))),
        Settlement::Rejected(d) => format!("rejected {}", show_data(&normalise_data(d))),
    }
}

fn show_message(m: &Message) -> String {
    let result = m.result.map(|r| format!(" -> {r}")).unwrap_or_default();
    format!("{}({}){result}", m.method, show_data(&m.args))
}

fn show_objects(objects: &[KObjectId]) -> String {
    let os: Vec<String> = objects.iter().map(ToString::to_string).collect();
    format!("[{}]", os.join(","))
}

fn show_item(item: &RunQueueItem) -> String {
    match item {
        RunQueueItem::Send { target, message } => format!("send {target}.{}", show_message(message)),
        RunQueueItem::Notify { endpoint, promise } => format!("notify {endpoint} of {promise}"),
        RunQueueItem::Gc { endpoint, action } => format!("gc {endpoint} {} {}", action.name(), show_objects(action.objects())),
    }
}

fn show_delivery(ep: EndpointId, d: &KernelDelivery) -> String {
    match d {
        KernelDelivery::Message { target, message } => format!("{ep} gets {target}.{}", show_message(message)),
        KernelDelivery::Notify { resolutions } => {
            let rs: Vec<String> = resolutions.iter().map(|(kp, s)| format!("{kp} {}", show_settlement(s))).collect();
            format!("{ep} told {}", rs.join("; "))
        }
    }
}

fn show_promise(kp: u64, p: &PromiseState, refs: u32, pinned: bool) -> String {
    let state = match p {
        PromiseState::Unresolved { decider, subscribers, queue } => {
            let decider = decider.map_or("kernel".to_owned(), |d| d.to_string());
            let subs: Vec<String> = subscribers.iter().map(ToString::to_string).collect();
            let queue: Vec<String> = queue.iter().map(show_message).collect();
            format!("unresolved decider={decider} subscribers=[{}] queue=[{}]", subs.join(","), queue.join("; "))
        }
        PromiseState::Settled(s) => show_settlement(s),
    };
    format!("kp{kp} {state} refs={refs} pinned={pinned}")
}

fn show_object(o: u64, owner: EndpointId, pinned: bool, abandoned: bool, counts: (u32, u32)) -> String {
    format!("ko{o} owner={owner} pinned={pinned} abandoned={abandoned} reachable={} recognizable={}", counts.0, counts.1)
}

fn show_entry(ep: EndpointId, kref: KRef, vref: VRef, reachable: bool) -> String {
    format!("{ep} {kref} <-> {vref}{}", if reachable { "" } else { " (dropped)" })
}

fn show_status(s: &Status) -> String {
    match s {
        Status::Live => "live".into(),
        Status::Terminated(reason) => normalise(&format!("terminated: {reason}")),
    }
}

/// The parts of a snapshot, before formatting (tables already shown one line per item).
struct Parts<'a> {
    last: &'a Observed,
    delivered: &'a [String],
    cranks: u64,
    run_queue: Vec<RunQueueItem>,
    promises: Vec<String>,
    objects: Vec<String>,
    statuses: Vec<(EndpointId, Status)>,
    clists: Vec<String>,
    vatstores: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    host_log: Vec<HostEvent>,
    in_turn: bool,
}

impl Parts<'_> {
    fn snapshot(self) -> Snapshot {
        let per_vat = |i: usize| EndpointId(i as u32 + 1);
        Snapshot {
            fields: vec![
                ("last transition", vec![format!("{:?}", self.last)]),
                ("deliveries", self.delivered.to_vec()),
                ("cranks", vec![self.cranks.to_string()]),
                ("run queue", self.run_queue.iter().map(show_item).collect()),
                ("promises", self.promises),
                ("objects", self.objects),
                ("endpoints", self.statuses.iter().map(|(ep, s)| format!("{ep} {}", show_status(s))).collect()),
                ("c-lists", self.clists),
                (
                    "vatstores",
                    self.vatstores
                        .iter()
                        .enumerate()
                        .flat_map(|(i, s)| s.iter().map(move |(k, v)| format!("{} {} = {v:?}", per_vat(i), String::from_utf8_lossy(k))))
                        .collect(),
                ),
                (
                    "watchers run and commit events",
                    self.host_log
                        .iter()
                        .map(|e| match e {
                            HostEvent::Watcher(id, kp, s) => format!("watcher #{id} {kp} {}", show_settlement(s)),
                            HostEvent::Commit(crank) => format!("commit {crank}"),
                        })
                        .collect(),
                ),
                ("turn open", vec![self.in_turn.to_string()]),
            ],
        }
    }
}

/// Panic listing every part where the kernel and the model differ.
fn assert_same(kernel: &Snapshot, model: &Snapshot, after: &str) {
    if kernel == model {
        return;
    }
    let mut report = format!("kernel and model differ after {after}\n");
    for ((name, k), (_, m)) in kernel.fields.iter().zip(&model.fields) {
        if k != m {
            report.push_str(&format!("--- {name}\n  kernel:\n"));
            for line in k {
                report.push_str(&format!("    {line}\n"));
            }
            report.push_str("  model:\n");
            for line in m {
                report.push_str(&format!("    {line}\n"));
            }
        }
    }
    report.push_str("=== the whole model, for context\n");
    for (name, m) in &model.fields {
        report.push_str(&format!("--- {name}\n"));
        for line in m {
            report.push_str(&format!("    {line}\n"));
        }
    }
    panic!("{report}");
}

impl Model {
    fn snapshot(&self) -> Snapshot {
        let counts = self.recount();
        Parts {
            last: &self.last,
            delivered: &self.delivered,
            cranks: self.cranks,
            run_queue: self.run_queue.iter().cloned().collect(),
            promises: self.promises.iter().map(|(n, p)| show_promise(*n, &p.state, counts.promise(KPromiseId(*n)), p.pinned)).collect(),
            objects: self
                .objects
                .iter()
                .map(|(n, o)| show_object(*n, o.owner, o.pinned, o.abandoned, counts.object(KObjectId(*n))))
                .collect(),
            statuses: self.vats.iter().enumerate().map(|(i, v)| (EndpointId(i as u32 + 1), v.status.clone())).collect(),
            clists: self
                .vats
                .iter()
                .enumerate()
                .flat_map(|(i, v)| v.clist.iter().map(move |(k, (v, r))| show_entry(EndpointId(i as u32 + 1), *k, *v, *r)))
                .collect(),
            vatstores: self.vats.iter().map(|v| v.vatstore.clone().into_iter().collect()).collect(),
            host_log: self.host_log.clone(),
            in_turn: self.turn.is_some(),
        }
        .snapshot()
    }
}

struct Sut {
    kernel: Kernel<MemStore>,
    vats: Vec<EndpointId>,
    minds: Vec<Rc<RefCell<VatMind>>>,
    feed: Rc<RefCell<Feed>>,
    host_log: Rc<RefCell<Vec<HostEvent>>>,
    next_watch: u32,
    last: Observed,
}

impl Sut {
    fn snapshot(&self) -> Snapshot {
        let k = &self.kernel;
        let status = |s: EndpointStatus| match s {
            EndpointStatus::Live => Status::Live,
            EndpointStatus::Terminated { reason } => Status::Terminated(reason),
        };
        let feed = self.feed.borrow();
        Parts {
            last: &self.last,
            delivered: &feed.delivered,
            cranks: k.cranks().0,
            run_queue: k.run_queue().expect("run queue"),
            promises: k
                .promise_records()
                .expect("promises")
                .into_iter()
                .map(|(kp, p)| show_promise(kp.0, &p.state, p.refs, p.pinned))
                .collect(),
            objects: k
                .objects()
                .expect("objects")
                .into_iter()
                .map(|(o, r)| show_object(o.0, r.owner, r.pinned, r.abandoned, (r.reachable, r.recognizable)))
                .collect(),
            statuses: k.endpoints().expect("endpoints").into_iter().map(|(ep, rec)| (ep, status(rec.status))).collect(),
            clists: self
                .vats
                .iter()
                .flat_map(|ep| {
                    k.clist(*ep).expect("c-list").into_iter().map(|(kref, vref)| {
                        // Read through the kernel, which sees an open turn's writes.
                        let entry = k.clist_entry(*ep, kref).expect("c-list entry").expect("a listed c-list entry exists");
                        assert_eq!(entry.vref, vref, "the c-list names {kref} alike both ways");
                        show_entry(*ep, kref, vref, entry.reachable)
                    })
                })
                .collect(),
            vatstores: self.vats.iter().map(|ep| k.vatstore(*ep).expect("vatstore")).collect(),
            host_log: self.host_log.borrow().clone(),
            in_turn: k.in_turn(),
        }
        .snapshot()
    }
}

fn summarise(r: CrankReport) -> CrankSummary {
    assert_eq!(r.commit.crank, r.crank, "a crank's commit event names it");
    let outcome = match r.outcome {
        CrankOutcome::Committed => "committed".to_owned(),
        CrankOutcome::Exited { endpoint, failure } => format!("exited {endpoint} failure={failure}"),
        CrankOutcome::Aborted { endpoint, fault } => format!("aborted {endpoint}: {fault}"),
    };
    CrankSummary { crank: r.crank.0, input: r.input, outcome: normalise(&outcome), flushed: r.flushed }
}

// ---------------------------------------------------------------------------------------------
// The state machine.
// ---------------------------------------------------------------------------------------------

/// A host action.
#[derive(Clone, Debug)]
enum Transition {
    /// `queue_message(target, "h<method>", args)`, then `set_pinned(result, false)` if `unpin`
    /// (the host will not read the result).
    Queue { target: KRef, method: u8, args: Vec<KRef>, unpin: bool },
    /// `queue_message_then(target, "h<method>", args, ..)`: the result unpinned, watched.
    QueueThen { target: KRef, method: u8, args: Vec<KRef> },
    /// `queue_send_only(target, "h<method>", args)`: no result promise.
    SendOnly { target: KRef, method: u8, args: Vec<KRef> },
    /// `watch(kp, ..)`.
    Watch { kp: KPromiseId },
    /// `set_pinned(kref, pinned)`.
    Pin { kref: KRef, pinned: bool },
    /// `reap(e<vat>)` (one past the last vat: an unknown endpoint).
    Reap { vat: u8 },
    /// `step()`; a delivery runs `script`.
    Step { script: Script },
    /// `run(Some(max))`; deliveries run `scripts` in turn.
    Run { max: u8, scripts: Vec<Script> },
    /// Close the kernel and open a new one on its store, re-attaching the vats: everything but
    /// the host's watchers (host memory) and an open turn (not yet in the store) carries over.
    Restart,
    /// `apply_external(vat, ..)`: the vat's script runs outside any crank (as a remote's
    /// inbound message would). Scripts here never panic: `apply_external` does not catch panics.
    External { vat: u8, script: Script },
    /// `begin_turn()`: until `EndTurn`, commits stay in memory over the store and the host's
    /// watchers and commit events are held back; a `Restart` meanwhile loses the whole turn.
    BeginTurn,
    /// `end_turn()`: the turn's commits reach the store as one batch, then the host gets what
    /// was held back, in order.
    EndTurn,
}

fn benign_action() -> impl Strategy<Value = Action> {
    let result = prop_oneof![
        3 => Just(ResultChoice::None),
        3 => Just(ResultChoice::Fresh),
        1 => any::<u8>().prop_map(ResultChoice::Decided),
    ];
    let how = prop_oneof![any::<u8>().prop_map(How::Data), any::<u8>().prop_map(How::Ref), any::<u8>().prop_map(How::Reject),];
    prop_oneof![
        14 => (any::<u8>(), prop::bool::weighted(0.7), 0..4u8, prop::collection::vec(any::<u8>(), 0..3), result)
            .prop_map(|(target, to_object, method, args, result)| Action::Send { target, to_object, method, args, result }),
        3 => Just(Action::Export),
        4 => any::<u8>().prop_map(|promise| Action::Subscribe { promise }),
        10 => (any::<u8>(), how).prop_map(|(promise, how)| Action::Resolve { promise, how }),
        4 => (any::<u8>(), any::<u8>()).prop_map(|(key, value)| Action::VatstoreSet { key, value }),
        2 => any::<u8>().prop_map(|key| Action::VatstoreDelete { key }),
        2 => any::<u8>().prop_map(|key| Action::VatstoreGet { key }),
        1 => Just(Action::VatstoreScan),
        4 => any::<u8>().prop_map(|index| Action::DropImport { index }),
        1 => any::<u8>().prop_map(|index| Action::RetireImport { index }),
        6 => any::<u8>().prop_map(|index| Action::RetireExport { index }),
        2 => any::<u8>().prop_map(|index| Action::AbandonExport { index }),
        2 => (any::<u8>(), prop::bool::weighted(0.3)).prop_map(|(mask, retire)| Action::Reap { mask, retire }),
    ]
}

fn hazard() -> impl Strategy<Value = Action> {
    let gc_forgery = prop_oneof![
        Just(GcForgery::DropExport),
        any::<u8>().prop_map(GcForgery::DropDecided),
        Just(GcForgery::DropUnknown),
        any::<u8>().prop_map(GcForgery::RetireReachable),
        Just(GcForgery::RetireRoot),
        any::<u8>().prop_map(GcForgery::AbandonImport),
        Just(GcForgery::AbandonRoot),
    ];
    prop_oneof![
        1 => any::<u8>().prop_map(|promise| Action::ResolveUndecided { promise }),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(promise, one_syscall)| Action::ResolveTwice { promise, one_syscall }),
        1 => any::<u8>().prop_map(|i| Action::Send {
            target: 0,
            to_object: true,
            method: 0,
            args: Vec::new(),
            result: ResultChoice::Undecided(i)
        }),
        1 => prop_oneof![Just(Forgery::SendTo), Just(Forgery::PassAsArg), Just(Forgery::Subscribe), Just(Forgery::Resolve)]
            .prop_map(Action::Forge),
        1 => gc_forgery.prop_map(Action::ForgeGc),
        2 => any::<u8>().prop_map(|index| Action::UseStale { index }),
        1 => any::<bool>().prop_map(|failure| Action::Exit { failure }),
        1 => Just(Action::Fail),
        1 => Just(Action::Panic),
    ]
}

/// Mostly well-behaved scripts; about one delivery in twelve does something hazardous at some
/// point (and may carry on afterwards).
fn script() -> impl Strategy<Value = Script> {
    (prop::collection::vec(benign_action(), 0..6), prop::option::weighted(0.08, (hazard(), any::<prop::sample::Index>())), any::<bool>())
        .prop_map(|(mut actions, hazard, propagate)| {
            if let Some((h, at)) = hazard {
                let i = at.index(actions.len() + 1);
                actions.insert(i, h);
            }
            Script { actions, propagate }
        })
}

struct KernelModel;

impl ReferenceStateMachine for KernelModel {
    type State = Model;
    type Transition = Transition;

    fn init_state() -> BoxedStrategy<Model> {
        (2usize..=4).prop_map(Model::new).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Transition> {
        // Every table may be empty (even the roots may have been unpinned and collected): an
        // empty choice falls back to a reference that does not exist.
        fn select<T: Clone + std::fmt::Debug + 'static>(v: Vec<T>, missing: T) -> BoxedStrategy<T> {
            if v.is_empty() {
                Just(missing).boxed()
            } else {
                prop::sample::select(v).boxed()
            }
        }
        let missing_object = KRef::Object(KObjectId(1000));
        let missing_promise = KPromiseId(1000);
        let refs = state.all_refs();
        let objects: Vec<KRef> = state.objects.keys().map(|o| KRef::Object(KObjectId(*o))).collect();
        let promises: Vec<KPromiseId> = state.promises.keys().map(|p| KPromiseId(*p)).collect();
        let missing = prop_oneof![Just(missing_object), Just(KRef::Promise(missing_promise))];
        let target = prop_oneof![
            12 => select(objects.clone(), missing_object),
            6 => select(refs.clone(), missing_object),
            1 => missing.clone(),
        ];
        let args = prop::collection::vec(select(refs, missing_object), 0..3);
        let watched = prop_oneof![9 => select(promises.clone(), missing_promise), 1 => Just(missing_promise)];
        let pinnable = prop_oneof![
            8 => select(promises.into_iter().map(KRef::Promise).collect(), missing_object),
            4 => select(objects, missing_object),
            1 => missing,
        ];
        // Turns open now and then and stay open for a few transitions (an open turn is ended
        // three times as often as a closed one is begun).
        let (turn_weight, turn) = if state.turn.is_some() { (3, Transition::EndTurn) } else { (1, Transition::BeginTurn) };
        prop_oneof![
            1 => (target.clone(), 0..4u8, args.clone()).prop_map(|(target, method, args)| Transition::QueueThen { target, method, args }),
            1 => (target.clone(), 0..4u8, args.clone()).prop_map(|(target, method, args)| Transition::SendOnly { target, method, args }),
            3 => (target, 0..4u8, args, any::<bool>())
                .prop_map(|(target, method, args, unpin)| Transition::Queue { target, method, args, unpin }),
            1 => watched.prop_map(|kp| Transition::Watch { kp }),
            2 => (pinnable, prop::bool::weighted(0.2)).prop_map(|(kref, pinned)| Transition::Pin { kref, pinned }),
            1 => any::<u8>().prop_map(|vat| Transition::Reap { vat }),
            3 => script().prop_map(|script| Transition::Step { script }),
            3 => (1..24u8, prop::collection::vec(script(), 1..5)).prop_map(|(max, scripts)| Transition::Run { max, scripts }),
            1 => Just(Transition::Restart),
            turn_weight => Just(turn),
            1 => (any::<u8>(), script()).prop_map(|(vat, mut script)| {
                for a in &mut script.actions {
                    if matches!(a, Action::Panic) {
                        *a = Action::Fail;
                    }
                }
                Transition::External { vat, script }
            }),
        ]
        .boxed()
    }

    fn apply(mut state: Model, transition: &Transition) -> Model {
        state.delivered.clear();
        state.last = match transition {
            Transition::Queue { target, method, args, unpin } => {
                let queued = state.queue_message(*target, format!("h{method}"), args.clone(), true);
                let unpinned = match (&queued, unpin) {
                    (Ok(kp), true) => Some(state.set_pinned(KRef::Promise(*kp), false)),
                    _ => None,
                };
                Observed::Queued(queued, unpinned)
            }
            Transition::QueueThen { target, method, args } => {
                let id = state.next_watch;
                state.next_watch += 1;
                let queued = state.queue_message(*target, format!("h{method}"), args.clone(), false);
                if let Ok(kp) = queued {
                    state.watchers.entry(kp.0).or_default().push(id);
                }
                Observed::Queued(queued, None)
            }
            Transition::SendOnly { target, method, args } => {
                Observed::Sent(state.queue_send_only(*target, format!("h{method}"), args.clone()))
            }
            Transition::Watch { kp } => Observed::Watched(state.watch(*kp)),
            Transition::Pin { kref, pinned } => Observed::Pinned(state.set_pinned(*kref, *pinned)),
            Transition::Reap { vat } => Observed::Reaped(state.reap(reaped(*vat, state.vats.len()))),
            Transition::Step { script } => {
                let mut feed = Feed::default();
                feed.load(vec![script.clone()]);
                let stepped = state.step(&mut feed);
                state.delivered = feed.delivered;
                Observed::Stepped(stepped)
            }
            Transition::Run { max, scripts } => {
                let mut feed = Feed::default();
                feed.load(scripts.clone());
                let ran = state.run(u64::from(*max), &mut feed);
                state.delivered = feed.delivered;
                ran
            }
            Transition::Restart => {
                state.restart();
                Observed::Restarted
            }
            Transition::BeginTurn => {
                state.begin_turn();
                Observed::TurnBegun
            }
            Transition::EndTurn => {
                state.end_turn();
                Observed::TurnEnded(Ok(()))
            }
            Transition::External { vat, script } => {
                let ep = EndpointId((*vat as usize % state.vats.len()) as u32 + 1);
                let mut notes = Vec::new();
                let r = state.external(ep, script, &mut notes);
                state.delivered = notes;
                Observed::External(r)
            }
        };
        state
    }
}

/// The endpoint a `Reap { vat }` names: one of the `n` vats, or the unknown `e<n+1>`.
fn reaped(vat: u8, n: usize) -> EndpointId {
    EndpointId((vat as usize % (n + 1)) as u32 + 1)
}

struct KernelTest;

/// Open a kernel on `store` and attach the vats (registering them if the store is new).
fn boot(
    store: MemStore,
    minds: &[Rc<RefCell<VatMind>>],
    feed: &Rc<RefCell<Feed>>,
    host_log: &Rc<RefCell<Vec<HostEvent>>>,
) -> (Kernel<MemStore>, Vec<EndpointId>) {
    let mut kernel = Kernel::open(store).expect("open");
    let vats = minds
        .iter()
        .enumerate()
        .map(|(i, mind)| {
            let vat = ScriptedVat { mind: mind.clone(), feed: feed.clone() };
            kernel.add_endpoint(&format!("v{}", i + 1), Box::new(vat)).expect("attach a vat")
        })
        .collect();
    let log = host_log.clone();
    kernel.add_commit_observer(move |e| log.borrow_mut().push(HostEvent::Commit(e.crank.0)));
    (kernel, vats)
}

/// Scripted panics are expected; keep them out of the test output.
fn quiet_scripted_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let scripted = info.payload().downcast_ref::<String>().is_some_and(|s| s == SCRIPTED_PANIC);
            if !scripted {
                default(info);
            }
        }));
    });
}

impl StateMachineTest for KernelTest {
    type SystemUnderTest = Sut;
    type Reference = KernelModel;

    fn init_test(model: &Model) -> Sut {
        quiet_scripted_panics();
        let minds: Vec<_> = model.vats.iter().map(|_| Rc::new(RefCell::new(VatMind::new()))).collect();
        let feed = Rc::default();
        let host_log = Rc::default();
        let (kernel, vats) = boot(MemStore::new(), &minds, &feed, &host_log);
        let sut = Sut { kernel, vats, minds, feed, host_log, next_watch: 0, last: Observed::Nothing };
        assert_same(&sut.snapshot(), &model.snapshot(), "the initial state");
        sut
    }

    fn apply(mut sut: Sut, model: &Model, transition: Transition) -> Sut {
        let after = format!("{transition:?}");
        if let Err(problem) = model.sanity() {
            panic!("the model's own state is wrong after {after}: {problem}");
        }
        sut.feed.borrow_mut().load(Vec::new());
        sut.last = match transition {
            Transition::Queue { target, method, args, unpin } => {
                let args = CapData { body: HOST_BODY.to_vec(), slots: args };
                let queued = sut.kernel.queue_message(target, &format!("h{method}"), args).map_err(|e| e.to_string());
                let unpinned = match (&queued, unpin) {
                    (Ok(kp), true) => Some(sut.kernel.set_pinned(KRef::Promise(*kp), false).map_err(|e| e.to_string())),
                    _ => None,
                };
                Observed::Queued(queued, unpinned)
            }
            Transition::QueueThen { target, method, args } => {
                let id = sut.next_watch;
                sut.next_watch += 1;
                let log = sut.host_log.clone();
                let args = CapData { body: HOST_BODY.to_vec(), slots: args };
                let queued = sut
                    .kernel
                    .queue_message_then(target, &format!("h{method}"), args, move |kp, s| {
                        log.borrow_mut().push(HostEvent::Watcher(id, kp, s.clone()))
                    })
                    .map_err(|e| e.to_string());
                Observed::Queued(queued, None)
            }
            Transition::SendOnly { target, method, args } => {
                let args = CapData { body: HOST_BODY.to_vec(), slots: args };
                Observed::Sent(sut.kernel.queue_send_only(target, &format!("h{method}"), args).map_err(|e| e.to_string()))
            }
            Transition::Watch { kp } => {
                let id = sut.next_watch;
                sut.next_watch += 1;
                let log = sut.host_log.clone();
                let r = sut.kernel.watch(kp, move |kp, s| log.borrow_mut().push(HostEvent::Watcher(id, kp, s.clone())));
                Observed::Watched(r.map_err(|e| e.to_string()))
            }
            Transition::Pin { kref, pinned } => Observed::Pinned(sut.kernel.set_pinned(kref, pinned).map_err(|e| e.to_string())),
            Transition::Reap { vat } => Observed::Reaped(sut.kernel.reap(reaped(vat, sut.vats.len())).map_err(|e| e.to_string())),
            Transition::Step { script } => {
                sut.feed.borrow_mut().load(vec![script]);
                Observed::Stepped(sut.kernel.step().expect("step").map(summarise))
            }
            Transition::Run { max, scripts } => {
                sut.feed.borrow_mut().load(scripts);
                let s = sut.kernel.run(Some(u64::from(max))).expect("run");
                Observed::Ran { cranks: s.cranks, aborted: s.aborted, quiescent: s.quiescent }
            }
            Transition::Restart => {
                let placeholder = Kernel::open(MemStore::new()).expect("open");
                let store = std::mem::replace(&mut sut.kernel, placeholder).into_store();
                let (kernel, vats) = boot(store, &sut.minds, &sut.feed, &sut.host_log);
                assert_eq!(vats, sut.vats, "the vats keep their ids across a restart");
                sut.kernel = kernel;
                Observed::Restarted
            }
            Transition::External { vat, script } => {
                let i = vat as usize % sut.vats.len();
                let mind = sut.minds[i].clone();
                let mut notes = Vec::new();
                let r = sut.kernel.apply_external(sut.vats[i], |ctx| {
                    let mut sys = CtxSyscalls { ctx, notes: Vec::new() };
                    let end = run_script(&mut mind.borrow_mut(), &script, &mut sys);
                    notes = sys.notes;
                    match end {
                        End::Returned => Ok(()),
                        End::Failed(why) => Err(Fault::VatError(why)),
                        End::Panicked(why) => panic!("{why}"),
                    }
                });
                sut.feed.borrow_mut().delivered = notes;
                Observed::External(r.expect("apply_external").map_err(|f| normalise(&f.to_string())))
            }
            Transition::BeginTurn => {
                sut.kernel.begin_turn();
                Observed::TurnBegun
            }
            Transition::EndTurn => Observed::TurnEnded(sut.kernel.end_turn().map_err(|e| e.to_string())),
        };
        assert_same(&sut.snapshot(), &model.snapshot(), &after);
        sut
    }
}

prop_state_machine! {
    #![proptest_config(Config {
        // PROPTEST_CASES=N runs a deeper search locally.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(256),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/model.txt"))),
        ..Config::default()
    })]

    /// The kernel and the reference model agree after every transition.
    #[test]
    fn kernel_matches_the_reference_model(sequential 1..40 => KernelTest);
}
