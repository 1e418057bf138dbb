//! Model-based property test of the crank (DESIGN §2–§5).
//!
//! Random host actions (queue a message, watch a promise, step, run, restart the kernel on its
//! store, apply work from outside a crank) and scripted vat behaviour (sends with and without
//! result promises, exports, subscribes, resolves, vatstore writes, forged and stale vrefs,
//! double and foreign resolves, faults, panics, exits) run against `Kernel<MemStore>` and
//! against [`Model`], a plain reference model that implements the design in the most obvious
//! way: `BTreeMap`s and `Vec`s, and a crank that aborts is undone by restoring a clone of the
//! whole model taken when the crank began. After every transition the observable state must
//! match exactly, krefs included: the run queue, every promise, every object, every c-list and
//! vatstore, every endpoint's status, what each delivery handed its vat, what the host was
//! told, the host watchers that ran and the commit events.
//!
//! This checks DESIGN §10.1 (an aborted crank leaves no trace: the model restores its clone),
//! §10.2 (outputs reach the run queue in the order made: queues are compared item by item) and
//! §10.6 (a forged or stale vref is an illegal syscall that terminates exactly its vat). Each
//! was seen to fail when broken on purpose (an abort keeping a vatstore write, a commit
//! flushing its outputs in reverse, `export` accepting an unknown `o-N`).
//!
//! Kernel-made error texts are compared exactly, except the detail after `illegal syscall: `,
//! which is the kernel's own wording ([`normalise`]). `PROPTEST_CASES=N` searches deeper.

use kernel_core::{
    Allocator, CapData, CrankContext, CrankInput, CrankOutcome, CrankReport, Endpoint, EndpointId, EndpointStatus, Fault, KObjectId,
    KPromiseId, KRef, Kernel, KernelDelivery, MemStore, Message, PromiseState, RefKind, RunQueueItem, Settlement, VRef,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
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
    /// Use a promise vref the vat was told to forget (after a notify).
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

/// A vat's memory: the references it has seen, the promises it decides, the vrefs it was told
/// to forget, and its allocation counters. Host memory: not rolled back by an abort (the vat
/// is terminated then, so it never matters).
#[derive(Clone, Debug)]
struct VatMind {
    seen: Vec<VRef>,
    decides: Vec<VRef>,
    stale: Vec<VRef>,
    next_export: u64,
    next_promise: u64,
}

/// A delivery as the vat sees it.
struct VatDelivery {
    refs: Vec<VRef>,
    result: Option<VRef>,
    notified: Vec<VRef>,
}

impl VatMind {
    fn new() -> Self {
        VatMind { seen: vec![VRef::ROOT], decides: Vec::new(), stale: Vec::new(), next_export: 1, next_promise: 1 }
    }

    fn learn(&mut self, v: VRef) {
        if !self.seen.contains(&v) {
            self.seen.push(v);
        }
    }

    fn observe(&mut self, d: &VatDelivery) {
        for v in d.refs.iter().chain(&d.notified).chain(&d.result) {
            self.learn(*v);
        }
        if let Some(r) = d.result {
            if !self.decides.contains(&r) {
                self.decides.push(r);
            }
        }
    }

    /// After a notify the c-list forgets the notified promises; so does the vat.
    fn after(&mut self, d: &VatDelivery) {
        for v in &d.notified {
            self.seen.retain(|s| s != v);
            self.decides.retain(|s| s != v);
            if !self.stale.contains(v) {
                self.stale.push(*v);
            }
        }
    }

    fn pick(list: &[VRef], i: u8) -> Option<VRef> {
        (!list.is_empty()).then(|| list[i as usize % list.len()])
    }

    fn seen_ref(&self, i: u8) -> Option<VRef> {
        Self::pick(&self.seen, i)
    }

    fn seen_object(&self, i: u8) -> Option<VRef> {
        let os: Vec<VRef> = self.seen.iter().copied().filter(|v| !v.is_promise()).collect();
        Self::pick(&os, i)
    }

    fn seen_promise(&self, i: u8) -> Option<VRef> {
        let ps: Vec<VRef> = self.seen.iter().copied().filter(|v| v.is_promise()).collect();
        Self::pick(&ps, i)
    }

    fn undecided_promise(&self, i: u8) -> Option<VRef> {
        let ps: Vec<VRef> = self.seen.iter().copied().filter(|v| v.is_promise() && !self.decides.contains(v)).collect();
        Self::pick(&ps, i)
    }

    fn take_decided(&mut self, i: u8) -> Option<VRef> {
        let p = Self::pick(&self.decides, i)?;
        self.decides.retain(|d| *d != p);
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
/// test and over the model for the reference.
trait Syscalls {
    fn send(&mut self, target: VRef, method: String, slots: Vec<VRef>, result: Option<VRef>) -> Result<(), Refused>;
    fn subscribe(&mut self, promise: VRef) -> Result<(), Refused>;
    fn resolve(&mut self, resolutions: Vec<(VRef, VSettlement)>) -> Result<(), Refused>;
    fn exit(&mut self, failure: bool) -> Result<(), Refused>;
    fn vatstore_set(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), Refused>;
    fn vatstore_delete(&mut self, key: Vec<u8>) -> Result<(), Refused>;
    fn vatstore_get(&mut self, key: Vec<u8>) -> Result<Option<Vec<u8>>, Refused>;
    fn vatstore_next_key(&mut self, after: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, Refused>;
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
                let slots = args.iter().filter_map(|i| mind.seen_ref(*i)).collect();
                let result = match result {
                    ResultChoice::None => None,
                    ResultChoice::Fresh => Some(mind.fresh_promise()),
                    ResultChoice::Decided(i) => mind.take_decided(*i),
                    ResultChoice::Undecided(i) => mind.undecided_promise(*i),
                };
                sys.send(target, format!("m{method}"), slots, result)
            }
            Action::Export => {
                mind.fresh_export();
                Ok(())
            }
            Action::Subscribe { promise } => match mind.seen_promise(*promise) {
                Some(p) => sys.subscribe(p),
                None => Ok(()),
            },
            Action::Resolve { promise, how } => {
                let Some(p) = mind.take_decided(*promise) else { continue };
                let settlement = match how {
                    How::Data(n) => VSettlement::data(format!("d{n}")),
                    How::Reject(n) => VSettlement { rejected: true, body: format!("r{n}").into_bytes(), slots: Vec::new() },
                    How::Ref(i) => match mind.seen_ref(*i) {
                        Some(r) => VSettlement { rejected: false, body: CapData::REF_BODY.to_vec(), slots: vec![r] },
                        None => VSettlement::data("none".into()),
                    },
                };
                sys.resolve(vec![(p, settlement)])
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
            Action::UseStale { index } => match VatMind::pick(&mind.stale, *index) {
                Some(p) => sys.subscribe(p),
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

/// Translate a kernel-level delivery into the vat's references, importing in a fixed order
/// (target, argument slots, result; or each notified promise followed by its data's slots).
fn translate_delivery(d: &KernelDelivery, mut import: impl FnMut(KRef) -> VRef) -> VatDelivery {
    match d {
        KernelDelivery::Message { target, message } => {
            let mut refs = vec![import(KRef::Object(*target))];
            refs.extend(message.args.slots.iter().map(|k| import(*k)));
            let result = message.result.map(|kp| import(KRef::Promise(kp)));
            VatDelivery { refs, result, notified: Vec::new() }
        }
        KernelDelivery::Notify { resolutions } => {
            let mut refs = Vec::new();
            let mut notified = Vec::new();
            for (kp, s) in resolutions {
                notified.push(import(KRef::Promise(*kp)));
                refs.extend(s.data().slots.iter().map(|k| import(*k)));
            }
            VatDelivery { refs, result: None, notified }
        }
    }
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

impl Endpoint for ScriptedVat {
    fn deliver(&mut self, delivery: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let script = {
            let mut feed = self.feed.borrow_mut();
            feed.delivered.push(show_delivery(ctx.endpoint(), &delivery));
            feed.take()
        };
        let vd = translate_delivery(&delivery, |k| ctx.import(k).expect("import at the start of a delivery"));
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
    Queued(Result<KPromiseId, String>),
    Watched(Result<(), String>),
    Stepped(Option<CrankSummary>),
    Ran { cranks: u64, aborted: u64, quiescent: bool },
    Restarted,
    External(Result<(), String>),
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
struct ModelVat {
    status: Status,
    clist: BTreeMap<KRef, VRef>,
    vrefs: BTreeMap<VRef, KRef>,
    imported_objects: u64,
    imported_promises: u64,
    vatstore: BTreeMap<Vec<u8>, Vec<u8>>,
    mind: VatMind,
}

/// A crank's buffered outputs and settled promises.
#[derive(Default)]
struct Buffer {
    outputs: Vec<RunQueueItem>,
    settled: Vec<KPromiseId>,
}

/// The whole kernel, as plain data. `Clone` is the transaction: see [`Model::step`].
#[derive(Clone, Debug)]
struct Model {
    cranks: u64,
    next_object: u64,
    next_promise: u64,
    /// Object -> (owner, pinned).
    objects: BTreeMap<u64, (EndpointId, bool)>,
    promises: BTreeMap<u64, PromiseState>,
    run_queue: VecDeque<RunQueueItem>,
    /// Endpoint `n` is `vats[n - 1]`.
    vats: Vec<ModelVat>,
    watchers: BTreeMap<u64, Vec<u32>>,
    next_watch: u32,
    watch_log: Vec<(u32, KPromiseId, Settlement)>,
    commits: Vec<u64>,
    last: Observed,
    /// What the vats were handed during the last transition.
    delivered: Vec<String>,
}

/// Why a delivery cannot go on (sticky).
enum Verdict {
    Illegal(String),
    Exit { failure: bool },
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
            watchers: BTreeMap::new(),
            next_watch: 0,
            watch_log: Vec::new(),
            commits: Vec::new(),
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
                vatstore: BTreeMap::new(),
                mind: VatMind::new(),
            };
            vat.clist.insert(root, VRef::ROOT);
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

    fn new_object(&mut self, owner: EndpointId, pinned: bool) -> KObjectId {
        let o = self.next_object;
        self.next_object += 1;
        self.objects.insert(o, (owner, pinned));
        KObjectId(o)
    }

    fn new_promise(&mut self, decider: Option<EndpointId>) -> KPromiseId {
        let p = self.next_promise;
        self.next_promise += 1;
        self.promises.insert(p, PromiseState::Unresolved { decider, subscribers: Vec::new(), queue: Vec::new() });
        KPromiseId(p)
    }

    fn exists(&self, r: KRef) -> bool {
        match r {
            KRef::Object(o) => self.objects.contains_key(&o.0),
            KRef::Promise(p) => self.promises.contains_key(&p.0),
        }
    }

    fn all_refs(&self) -> Vec<KRef> {
        let objects = self.objects.keys().map(|o| KRef::Object(KObjectId(*o)));
        objects.chain(self.promises.keys().map(|p| KRef::Promise(KPromiseId(*p)))).collect()
    }

    // ---- host API (immediate path) ----

    fn queue_message(&mut self, target: KRef, method: String, args: Vec<KRef>) -> Result<KPromiseId, String> {
        if let Some(missing) = std::iter::once(&target).chain(&args).find(|r| !self.exists(**r)) {
            return Err(format!("unknown reference {missing}"));
        }
        let kp = self.new_promise(None);
        let message = Message { method, args: CapData { body: HOST_BODY.to_vec(), slots: args }, result: Some(kp) };
        self.run_queue.push_back(RunQueueItem::Send { target, message });
        Ok(kp)
    }

    fn watch(&mut self, kp: KPromiseId) -> Result<(), String> {
        let id = self.next_watch;
        self.next_watch += 1;
        match self.promises.get(&kp.0) {
            None => Err(format!("unknown reference {kp}")),
            Some(PromiseState::Settled(s)) => {
                self.watch_log.push((id, kp, s.clone()));
                Ok(())
            }
            Some(PromiseState::Unresolved { .. }) => {
                self.watchers.entry(kp.0).or_default().push(id);
                Ok(())
            }
        }
    }

    // ---- promises (DESIGN §5) ----

    /// The unresolved promise at the end of `kp`'s forwarding chain, if any.
    fn chain_end(&self, mut kp: KPromiseId) -> Option<KPromiseId> {
        for _ in 0..=self.promises.len() {
            match self.promises.get(&kp.0)? {
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

    fn resolve(&mut self, kp: KPromiseId, mut settlement: Settlement, buf: &mut Buffer) {
        let Some(PromiseState::Unresolved { subscribers, queue, .. }) = self.promises.get(&kp.0).cloned() else {
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
                    if let Some(PromiseState::Unresolved { decider, subscribers: subs, .. }) = self.promises.get_mut(&end.0) {
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
        self.promises.insert(kp.0, PromiseState::Settled(settlement));
        buf.outputs.extend(subscribers.into_iter().map(|endpoint| RunQueueItem::Notify { endpoint, promise: kp }));
        buf.outputs.extend(queue.into_iter().map(|message| RunQueueItem::Send { target: new_target, message }));
        buf.settled.push(kp);
    }

    fn reject(&mut self, kp: KPromiseId, reason: CapData, buf: &mut Buffer) {
        self.resolve(kp, Settlement::Rejected(reason), buf);
    }

    /// `kp`'s settlement and those of the settled promises its data names, depth first.
    fn resolutions_for_notify(&self, kp: KPromiseId, out: &mut Vec<(KPromiseId, Settlement)>) {
        if out.iter().any(|(q, _)| *q == kp) {
            return;
        }
        if let Some(PromiseState::Settled(s)) = self.promises.get(&kp.0) {
            out.push((kp, s.clone()));
            for slot in &s.data().slots {
                if let KRef::Promise(q) = slot {
                    self.resolutions_for_notify(*q, out);
                }
            }
        }
    }

    // ---- c-lists ----

    fn import(&mut self, ep: EndpointId, kref: KRef) -> VRef {
        let vat = self.vat_mut(ep);
        if let Some(v) = vat.clist.get(&kref) {
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
        vat.clist.insert(kref, v);
        vat.vrefs.insert(v, kref);
        v
    }

    fn export(&mut self, ep: EndpointId, vref: VRef) -> Result<KRef, String> {
        if let Some(k) = self.vat(ep).vrefs.get(&vref) {
            return Ok(*k);
        }
        if vref.allocator == Allocator::Kernel {
            return Err(format!("{ep} was never given {vref}"));
        }
        let kref = match vref.kind {
            RefKind::Object => KRef::Object(self.new_object(ep, false)),
            RefKind::Promise => KRef::Promise(self.new_promise(Some(ep))),
        };
        let vat = self.vat_mut(ep);
        vat.clist.insert(kref, vref);
        vat.vrefs.insert(vref, kref);
        Ok(kref)
    }

    fn forget(&mut self, ep: EndpointId, kref: KRef) {
        let vat = self.vat_mut(ep);
        if let Some(v) = vat.clist.remove(&kref) {
            vat.vrefs.remove(&v);
        }
    }

    // ---- routing (DESIGN §2) ----

    fn reject_result(&mut self, message: &Message, reason: CapData, buf: &mut Buffer) {
        if let Some(kp) = message.result {
            self.reject(kp, reason, buf);
        }
    }

    /// Where a send goes: `Some((owner, object, message))` to deliver, `None` if it was queued
    /// on a promise or its result rejected.
    fn route(&mut self, mut target: KRef, message: Message, buf: &mut Buffer) -> Option<(EndpointId, KObjectId, Message)> {
        loop {
            match target {
                KRef::Object(o) => {
                    let Some(&(owner, _)) = self.objects.get(&o.0) else {
                        self.reject_result(&message, CapData::error(&format!("no such object {o}")), buf);
                        return None;
                    };
                    match self.vat(owner).status.clone() {
                        Status::Live => return Some((owner, o, message)),
                        Status::Terminated(reason) => {
                            self.reject_result(&message, CapData::error(&format!("vat terminated: {owner} ({reason})")), buf);
                            return None;
                        }
                    }
                }
                KRef::Promise(p) => match self.promises.get_mut(&p.0) {
                    None => {
                        self.reject_result(&message, CapData::error(&format!("no such promise {p}")), buf);
                        return None;
                    }
                    Some(PromiseState::Unresolved { queue, .. }) => {
                        queue.push(message);
                        return None;
                    }
                    Some(PromiseState::Settled(Settlement::Fulfilled(data))) => match data.as_reference() {
                        Some(next) => target = next,
                        None => {
                            let why = format!("cannot deliver {}: {p} was fulfilled to data, not an object", message.method);
                            self.reject_result(&message, CapData::error(&why), buf);
                            return None;
                        }
                    },
                    Some(PromiseState::Settled(Settlement::Rejected(reason))) => {
                        let reason = reason.clone();
                        self.reject_result(&message, reason, buf);
                        return None;
                    }
                },
            }
        }
    }

    // ---- the crank (DESIGN §4) ----

    /// Terminate `ep`: mark it, reject every promise it decides with `data`, drop its c-list.
    /// Its vatstore stays, for inspection.
    fn terminate(&mut self, ep: EndpointId, reason: &str, data: CapData, buf: &mut Buffer) {
        self.vat_mut(ep).status = Status::Terminated(reason.to_owned());
        let decided: Vec<KPromiseId> =
            self.promises.iter().filter(|(_, s)| s.decider() == Some(ep)).map(|(kp, _)| KPromiseId(*kp)).collect();
        for kp in decided {
            self.reject(kp, data.clone(), buf);
        }
        let vat = self.vat_mut(ep);
        vat.clist.clear();
        vat.vrefs.clear();
    }

    /// Commit: flush the buffer to the run queue in order, then run the watchers of the promises
    /// it settled, then the commit event.
    fn commit(&mut self, buf: Buffer, crank: u64, input: CrankInput, outcome: String) -> CrankSummary {
        let flushed = self.flush(buf);
        self.commits.push(crank);
        CrankSummary { crank, input, outcome: normalise(&outcome), flushed }
    }

    /// The committed buffer reaches the run queue in order; then the settled promises' watchers.
    fn flush(&mut self, buf: Buffer) -> usize {
        let flushed = buf.outputs.len();
        self.run_queue.extend(buf.outputs);
        for kp in buf.settled {
            if let Some(ids) = self.watchers.remove(&kp.0) {
                if let Some(PromiseState::Settled(s)) = self.promises.get(&kp.0) {
                    self.watch_log.extend(ids.into_iter().map(|id| (id, kp, s.clone())));
                }
            }
        }
        flushed
    }

    /// Work arriving from outside a crank on behalf of `ep` (the immediate path): applied at
    /// once if it is sound, otherwise not at all (and `ep` is not terminated). No crank, no
    /// commit event. The vat's memory is host memory: it keeps what the script did to it.
    fn external(&mut self, ep: EndpointId, script: &Script, notes: &mut Vec<String>) -> Result<(), String> {
        if self.vat(ep).status != Status::Live {
            return Err(normalise(&format!("illegal syscall: {ep} is not live")));
        }
        let begin = self.clone();
        let mut buf = Buffer::default();
        let mut mind = self.vat(ep).mind.clone();
        let mut sys = ModelSyscalls { model: self, ep, buf: &mut buf, verdict: None, notes: Vec::new() };
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
        self.flush(buf);
        Ok(())
    }

    /// One crank. The crank's transaction is a clone of the whole model taken before it
    /// begins: an abort restores it, then applies the consequence as its own step.
    fn step(&mut self, feed: &mut Feed) -> Option<CrankSummary> {
        let begin = self.clone();
        let item = self.run_queue.pop_front()?;
        self.cranks += 1;
        let crank = self.cranks;
        let mut buf = Buffer::default();
        let (input, ep, delivery, result) = match item {
            RunQueueItem::Send { target, message } => {
                let method = message.method.clone();
                let Some((ep, object, message)) = self.route(target, message, &mut buf) else {
                    let input = CrankInput::Send { target, method, delivered_to: None };
                    return Some(self.commit(buf, crank, input, "committed".into()));
                };
                let result = message.result;
                if let Some(kp) = result {
                    if let Some(PromiseState::Unresolved { decider, .. }) = self.promises.get_mut(&kp.0) {
                        *decider = Some(ep);
                    }
                }
                let input = CrankInput::Send { target, method, delivered_to: Some(ep) };
                (input, ep, KernelDelivery::Message { target: object, message }, result)
            }
            RunQueueItem::Notify { endpoint, promise } => {
                if self.vat(endpoint).status != Status::Live {
                    let input = CrankInput::Notify { endpoint, promise, delivered: false };
                    return Some(self.commit(buf, crank, input, "committed".into()));
                }
                let mut resolutions = Vec::new();
                self.resolutions_for_notify(promise, &mut resolutions);
                let input = CrankInput::Notify { endpoint, promise, delivered: true };
                (input, endpoint, KernelDelivery::Notify { resolutions }, None)
            }
        };
        let notified: Vec<KPromiseId> = match &delivery {
            KernelDelivery::Notify { resolutions } => resolutions.iter().map(|(kp, _)| *kp).collect(),
            KernelDelivery::Message { .. } => Vec::new(),
        };

        // Deliver: the vat replays its script against the model's syscalls.
        feed.delivered.push(show_delivery(ep, &delivery));
        let script = feed.take();
        let vd = translate_delivery(&delivery, |k| self.import(ep, k));
        let mut mind = self.vat(ep).mind.clone();
        mind.observe(&vd);
        let mut sys = ModelSyscalls { model: self, ep, buf: &mut buf, verdict: None, notes: Vec::new() };
        let end = run_script(&mut mind, &script, &mut sys);
        feed.delivered.append(&mut sys.notes);
        let verdict = sys.verdict;
        mind.after(&vd);
        self.vat_mut(ep).mind = mind;

        let fault = match (verdict, end) {
            (Some(Verdict::Illegal(why)), _) => format!("illegal syscall: {why}"),
            (Some(Verdict::Exit { failure }), _) => {
                for kp in notified {
                    self.forget(ep, KRef::Promise(kp));
                }
                let why = if failure { "exited with failure" } else { "exited" };
                self.terminate(ep, why, CapData::plain(EXIT_BODY), &mut buf);
                return Some(self.commit(buf, crank, input, format!("exited {ep} failure={failure}")));
            }
            (None, End::Failed(why)) => format!("vat error: {why}"),
            (None, End::Panicked(why)) => format!("vat panicked: {why}"),
            (None, End::Returned) => {
                for kp in notified {
                    self.forget(ep, KRef::Promise(kp));
                }
                return Some(self.commit(buf, crank, input, "committed".into()));
            }
        };

        // Abort: as if the delivery never happened; then the consequence, committed alone.
        *self = begin;
        self.run_queue.pop_front();
        self.cranks += 1;
        let mut buf = Buffer::default();
        self.terminate(ep, &fault, CapData::error(&format!("vat terminated: {fault}")), &mut buf);
        if let Some(kp) = result {
            self.reject(kp, CapData::error(&format!("delivery failed: {fault}")), &mut buf);
        }
        Some(self.commit(buf, crank, input, format!("aborted {ep}: {fault}")))
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
}

/// The model's side of a delivery's syscalls.
struct ModelSyscalls<'a> {
    model: &'a mut Model,
    ep: EndpointId,
    buf: &'a mut Buffer,
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
}

impl Syscalls for ModelSyscalls<'_> {
    fn send(&mut self, target: VRef, method: String, slots: Vec<VRef>, result: Option<VRef>) -> Result<(), Refused> {
        let target = self.kref(target)?;
        let slots = slots.into_iter().map(|s| self.kref(s)).collect::<Result<Vec<_>, _>>()?;
        let result = result.map(|r| self.kpromise(r)).transpose()?;
        self.guard()?;
        if let Some(kp) = result {
            match self.model.promises.get_mut(&kp.0) {
                Some(PromiseState::Unresolved { decider, .. }) if *decider == Some(self.ep) => *decider = None,
                _ => return Err(self.illegal(format!("{} does not decide result {kp}", self.ep))),
            }
        }
        let message = Message { method, args: CapData { body: ARGS_BODY.to_vec(), slots }, result };
        self.buf.outputs.push(RunQueueItem::Send { target, message });
        Ok(())
    }

    fn subscribe(&mut self, promise: VRef) -> Result<(), Refused> {
        let kp = self.kpromise(promise)?;
        match self.model.promises.get_mut(&kp.0).expect("an exported promise exists") {
            PromiseState::Unresolved { subscribers, .. } => {
                if !subscribers.contains(&self.ep) {
                    subscribers.push(self.ep);
                }
            }
            PromiseState::Settled(_) => self.buf.outputs.push(RunQueueItem::Notify { endpoint: self.ep, promise: kp }),
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
            match self.model.promises.get(&kp.0) {
                Some(PromiseState::Unresolved { decider: Some(d), .. }) if *d == self.ep => {}
                _ => return Err(self.illegal(format!("{} may not resolve {kp}", self.ep))),
            }
        }
        for (kp, s) in krs {
            self.model.resolve(kp, s, self.buf);
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

fn show_item(item: &RunQueueItem) -> String {
    match item {
        RunQueueItem::Send { target, message } => format!("send {target}.{}", show_message(message)),
        RunQueueItem::Notify { endpoint, promise } => format!("notify {endpoint} of {promise}"),
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

fn show_promise(kp: u64, p: &PromiseState) -> String {
    match p {
        PromiseState::Unresolved { decider, subscribers, queue } => {
            let decider = decider.map_or("kernel".to_owned(), |d| d.to_string());
            let subs: Vec<String> = subscribers.iter().map(ToString::to_string).collect();
            let queue: Vec<String> = queue.iter().map(show_message).collect();
            format!("kp{kp} unresolved decider={decider} subscribers=[{}] queue=[{}]", subs.join(","), queue.join("; "))
        }
        PromiseState::Settled(s) => format!("kp{kp} {}", show_settlement(s)),
    }
}

fn show_status(s: &Status) -> String {
    match s {
        Status::Live => "live".into(),
        Status::Terminated(reason) => normalise(&format!("terminated: {reason}")),
    }
}

/// The parts of a snapshot, before formatting.
struct Parts<'a> {
    last: &'a Observed,
    delivered: &'a [String],
    cranks: u64,
    run_queue: Vec<RunQueueItem>,
    promises: Vec<(u64, PromiseState)>,
    objects: Vec<(u64, EndpointId, bool)>,
    statuses: Vec<(EndpointId, Status)>,
    clists: Vec<Vec<(KRef, VRef)>>,
    vatstores: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    watch_log: Vec<(u32, KPromiseId, Settlement)>,
    commits: Vec<u64>,
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
                ("promises", self.promises.iter().map(|(kp, p)| show_promise(*kp, p)).collect()),
                ("objects", self.objects.iter().map(|(o, owner, pinned)| format!("ko{o} owner={owner} pinned={pinned}")).collect()),
                ("endpoints", self.statuses.iter().map(|(ep, s)| format!("{ep} {}", show_status(s))).collect()),
                (
                    "c-lists",
                    self.clists
                        .iter()
                        .enumerate()
                        .flat_map(|(i, c)| c.iter().map(move |(k, v)| format!("{} {k} <-> {v}", per_vat(i))))
                        .collect(),
                ),
                (
                    "vatstores",
                    self.vatstores
                        .iter()
                        .enumerate()
                        .flat_map(|(i, s)| s.iter().map(move |(k, v)| format!("{} {} = {v:?}", per_vat(i), String::from_utf8_lossy(k))))
                        .collect(),
                ),
                ("watchers run", self.watch_log.iter().map(|(id, kp, s)| format!("#{id} {kp} {}", show_settlement(s))).collect()),
                ("commit events", vec![format!("{:?}", self.commits)]),
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
    panic!("{report}");
}

impl Model {
    fn snapshot(&self) -> Snapshot {
        Parts {
            last: &self.last,
            delivered: &self.delivered,
            cranks: self.cranks,
            run_queue: self.run_queue.iter().cloned().collect(),
            promises: self.promises.iter().map(|(n, p)| (*n, p.clone())).collect(),
            objects: self.objects.iter().map(|(n, (owner, pinned))| (*n, *owner, *pinned)).collect(),
            statuses: self.vats.iter().enumerate().map(|(i, v)| (EndpointId(i as u32 + 1), v.status.clone())).collect(),
            clists: self.vats.iter().map(|v| v.clist.iter().map(|(k, v)| (*k, *v)).collect()).collect(),
            vatstores: self.vats.iter().map(|v| v.vatstore.clone().into_iter().collect()).collect(),
            watch_log: self.watch_log.clone(),
            commits: self.commits.clone(),
        }
        .snapshot()
    }
}

struct Sut {
    kernel: Kernel<MemStore>,
    vats: Vec<EndpointId>,
    minds: Vec<Rc<RefCell<VatMind>>>,
    feed: Rc<RefCell<Feed>>,
    watch_log: Rc<RefCell<Vec<(u32, KPromiseId, Settlement)>>>,
    commits: Rc<RefCell<Vec<u64>>>,
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
            promises: k.promises().expect("promises").into_iter().map(|(kp, p)| (kp.0, p)).collect(),
            objects: k.objects().expect("objects").into_iter().map(|(o, r)| (o.0, r.owner, r.pinned)).collect(),
            statuses: k.endpoints().expect("endpoints").into_iter().map(|(ep, rec)| (ep, status(rec.status))).collect(),
            clists: self.vats.iter().map(|ep| k.clist(*ep).expect("c-list")).collect(),
            vatstores: self.vats.iter().map(|ep| k.vatstore(*ep).expect("vatstore")).collect(),
            watch_log: self.watch_log.borrow().clone(),
            commits: self.commits.borrow().clone(),
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
    /// `queue_message(target, "h<method>", args)`.
    Queue { target: KRef, method: u8, args: Vec<KRef> },
    /// `watch(kp, ..)`.
    Watch { kp: KPromiseId },
    /// `step()`; a delivery runs `script`.
    Step { script: Script },
    /// `run(Some(max))`; deliveries run `scripts` in turn.
    Run { max: u8, scripts: Vec<Script> },
    /// Close the kernel and open a new one on its store, re-attaching the vats: everything but
    /// the host's watchers (host memory) carries over.
    Restart,
    /// `apply_external(vat, ..)`: the vat's script runs outside any crank (as a remote's
    /// inbound message would). Scripts here never panic: `apply_external` does not catch panics.
    External { vat: u8, script: Script },
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
    ]
}

fn hazard() -> impl Strategy<Value = Action> {
    prop_oneof![
        any::<u8>().prop_map(|promise| Action::ResolveUndecided { promise }),
        (any::<u8>(), any::<bool>()).prop_map(|(promise, one_syscall)| Action::ResolveTwice { promise, one_syscall }),
        any::<u8>().prop_map(|i| Action::Send {
            target: 0,
            to_object: true,
            method: 0,
            args: Vec::new(),
            result: ResultChoice::Undecided(i)
        }),
        prop_oneof![Just(Forgery::SendTo), Just(Forgery::PassAsArg), Just(Forgery::Subscribe), Just(Forgery::Resolve)]
            .prop_map(Action::Forge),
        any::<u8>().prop_map(|index| Action::UseStale { index }),
        any::<bool>().prop_map(|failure| Action::Exit { failure }),
        Just(Action::Fail),
        Just(Action::Panic),
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
        let refs = state.all_refs();
        let objects: Vec<KRef> = state.objects.keys().map(|o| KRef::Object(KObjectId(*o))).collect();
        let missing = prop_oneof![Just(KRef::Object(KObjectId(1000))), Just(KRef::Promise(KPromiseId(1000)))];
        let target = prop_oneof![
            12 => prop::sample::select(objects),
            6 => prop::sample::select(refs.clone()),
            1 => missing,
        ];
        let args = prop::collection::vec(prop::sample::select(refs), 0..3);
        let promises: Vec<KPromiseId> = state.promises.keys().map(|p| KPromiseId(*p)).collect();
        let watched = if promises.is_empty() {
            Just(KPromiseId(1000)).boxed()
        } else {
            prop_oneof![9 => prop::sample::select(promises), 1 => Just(KPromiseId(1000))].boxed()
        };
        prop_oneof![
            3 => (target, 0..4u8, args).prop_map(|(target, method, args)| Transition::Queue { target, method, args }),
            1 => watched.prop_map(|kp| Transition::Watch { kp }),
            3 => script().prop_map(|script| Transition::Step { script }),
            3 => (1..24u8, prop::collection::vec(script(), 1..5)).prop_map(|(max, scripts)| Transition::Run { max, scripts }),
            1 => Just(Transition::Restart),
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
            Transition::Queue { target, method, args } => {
                Observed::Queued(state.queue_message(*target, format!("h{method}"), args.clone()))
            }
            Transition::Watch { kp } => Observed::Watched(state.watch(*kp)),
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
                state.watchers.clear();
                Observed::Restarted
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

struct KernelTest;

/// Open a kernel on `store` and attach the vats (registering them if the store is new).
fn boot(
    store: MemStore,
    minds: &[Rc<RefCell<VatMind>>],
    feed: &Rc<RefCell<Feed>>,
    commits: &Rc<RefCell<Vec<u64>>>,
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
    let log = commits.clone();
    kernel.add_commit_observer(move |e| log.borrow_mut().push(e.crank.0));
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
        let commits = Rc::default();
        let (kernel, vats) = boot(MemStore::new(), &minds, &feed, &commits);
        let sut = Sut { kernel, vats, minds, feed, watch_log: Rc::default(), commits, next_watch: 0, last: Observed::Nothing };
        assert_same(&sut.snapshot(), &model.snapshot(), "the initial state");
        sut
    }

    fn apply(mut sut: Sut, model: &Model, transition: Transition) -> Sut {
        let after = format!("{transition:?}");
        sut.feed.borrow_mut().load(Vec::new());
        sut.last = match transition {
            Transition::Queue { target, method, args } => {
                let args = CapData { body: HOST_BODY.to_vec(), slots: args };
                Observed::Queued(sut.kernel.queue_message(target, &format!("h{method}"), args).map_err(|e| e.to_string()))
            }
            Transition::Watch { kp } => {
                let id = sut.next_watch;
                sut.next_watch += 1;
                let log = sut.watch_log.clone();
                let r = sut.kernel.watch(kp, move |kp, s| log.borrow_mut().push((id, kp, s.clone())));
                Observed::Watched(r.map_err(|e| e.to_string()))
            }
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
                let (kernel, vats) = boot(store, &sut.minds, &sut.feed, &sut.commits);
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
