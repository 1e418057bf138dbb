//! Fuzzing syscall validation through the whole kernel (DESIGN §3, §10.6).
//!
//! Several vats make random syscalls through [`Syscall::execute`], with vref strings that are
//! mostly forged or malformed (random text, out-of-range numbers, wrong kinds, other vats'
//! vrefs, stale vrefs), and random vatstore keys; the GC syscalls (`dropImports`,
//! `retireImports`, `retireExports`, `abandonExports`) among them. Each vat keeps a model of what
//! its c-list and vatstore must be, and predicts every syscall's answer before making it.
//!
//! GC makes a few answers depend on what other vats did: whether an export can still be reached
//! (`retireExports` needs it unreachable), whether the vat is subscribed to a promise it resolves
//! (the resolver forgets it at once unless it awaits the notify), and how many messages wait on a
//! promise it resolves to one of its objects (each then reaches that object). Before every crank
//! the host reads these facts from the kernel for each vat (as of the delivery's start), and the
//! vat's model carries them through the delivery; the periodic table check recomputes every
//! reference count from scratch, so the facts are not taken on trust. GC deliveries reach the
//! vats' GC hooks, which check what they are told and make random syscalls too. After every crank
//! the host checks: `step` never fails or panics; a crank with an illegal syscall aborts and
//! terminates exactly the vat that made it, with that syscall's reason; every other vat stays
//! as it was; legal syscalls keep working; the vatstore holds exactly the committed writes.
//! Periodically and at the end, the kernel's tables are checked for internal consistency.
//!
//! A failure names the seed; `FUZZ_SEED=<seed> cargo test -p tests --test fuzz_syscalls`
//! replays exactly that run.

use kernel_core::{
    Allocator, CapData, CrankInput, CrankOutcome, CrankReport, EndpointId, EndpointStatus, Fault, KRef, Kernel, MemStore, RefKind,
    SyscallError, VRef,
};
use kernel_core::{PromiseState, RunQueueItem, Store};
use kernel_syscall::{RawData, RawSyscall, Resolution, Syscall, Vat, VatData, VatEndpoint, VatError, MAX_KEY_LEN, MAX_VALUE_LEN};
use proptest::prelude::any;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::rc::Rc;

/// Syscalls made over the whole test (all cases together).
const TOTAL_SYSCALLS: u64 = 120_000;
/// Proptest cases (each a fresh kernel and seed).
const CASES: u32 = 12;
/// Vats kept alive at any time: a terminated one is replaced by a new one.
const LIVE_VATS: usize = 4;
/// Above this many queued items, vats stop sending (so the queue does not grow without bound).
const BUSY_QUEUE: u64 = 150;
/// The chance that a vref a vat does not forge names a new object of its own (`o+N`, next N).
const FRESH_EXPORT_RATE: f64 = 0.1;
/// A careful vat makes fewer syscalls per delivery (below this), so that most stay forged.
const CAREFUL_SYSCALLS: u64 = 5;
/// Deliveries after which a careful vat exits.
const CAREFUL_LIFETIME: u64 = 150;
/// How many syscalls a careful vat (forge rate 0) considers before making one.
const CAREFUL_TRIES: usize = 6;
/// The chance, per crank, that the host asks a live vat to bring out its dead.
const REAP_RATE: f64 = 0.03;
/// Tables are checked every this many cranks (and at the end).
const CHECK_EVERY: u64 = 400;
const PANIC_TAG: &str = "fuzz vat panics on purpose";

/// SplitMix64: small, seedable, good enough to drive a fuzzer.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            Some(items[self.below(items.len() as u64) as usize].clone())
        }
    }

    fn text(&mut self, max: u64) -> String {
        const CHARS: &[char] = &['o', 'p', '+', '-', '0', '1', '9', ' ', 'k', 'x', 'é', '\0', '/', '$', '٣', '🦀'];
        (0..self.below(max + 1)).map(|_| CHARS[self.below(CHARS.len() as u64) as usize]).collect()
    }
}

/// What one vat's c-list and vatstore must hold, as the vat itself can know it.
#[derive(Clone, Debug)]
struct VatModel {
    ep: EndpointId,
    root: KRef,
    live: bool,
    /// The status reason once terminated.
    reason: Option<String>,
    /// How often this vat reaches for a forged or malformed vref instead of one it holds.
    forge_rate: f64,
    /// The c-list: every vref held, and (for promises) whether this vat decides it.
    known: BTreeMap<VRef, bool>,
    /// Imports (`o-N`) in the c-list that this vat dropped: recognised, no longer reachable.
    dropped: BTreeSet<VRef>,
    /// Promises this vat decides and is subscribed to: resolving one keeps it in the c-list
    /// until its notify. From the kernel at each delivery's start, then kept by the model.
    subscribed: BTreeSet<VRef>,
    /// For each export (`o+N`) with a kernel object: how many references can reach it. From the
    /// kernel at each delivery's start, then counted by the model.
    reach: BTreeMap<VRef, u32>,
    /// For each unresolved promise held: how many messages wait on it (at the delivery's start).
    queued: BTreeMap<VRef, u32>,
    /// Vrefs forgotten (after a notify, a resolve, a drop or a retirement): stale.
    forgotten: Vec<VRef>,
    vatstore: BTreeMap<String, String>,
    /// The last `o-N` and `p-N` the kernel allocated here.
    last_import: (u64, u64),
    /// The highest `o+N` and `p+N` this vat has exported (where the generator makes new ones).
    last_export: (u64, u64),
    /// Every `o+N` and `p+N` index this vat has exported: the kernel accepts each as new once,
    /// in any order, and refuses it as stale once it is gone.
    named: (BTreeSet<u64>, BTreeSet<u64>),
    /// Deliveries this vat has had.
    deliveries: u64,
}

impl VatModel {
    /// The kref for `v` as the c-list would give it: held (and not a dropped import), or
    /// allocated on a first export.
    fn export(&mut self, v: VRef) -> bool {
        if self.known.contains_key(&v) {
            return !self.dropped.contains(&v);
        }
        if v.allocator == Allocator::Kernel {
            return false;
        }
        let (last, named) = match v.kind {
            RefKind::Object => (&mut self.last_export.0, &mut self.named.0),
            RefKind::Promise => (&mut self.last_export.1, &mut self.named.1),
        };
        // Index 0 is never new (`o+0` is the root; `p+0` is never allocated).
        if v.index == 0 || !named.insert(v.index) {
            return false;
        }
        *last = (*last).max(v.index);
        self.known.insert(v, v.is_promise());
        true
    }

    fn decides(&self, v: VRef) -> bool {
        self.known.get(&v).copied().unwrap_or(false)
    }

    /// Forget `v` (gone from the c-list); naming it later is stale.
    fn forget(&mut self, v: VRef) {
        self.known.remove(&v);
        self.dropped.remove(&v);
        self.subscribed.remove(&v);
        self.reach.remove(&v);
        self.queued.remove(&v);
        if self.forgotten.len() >= 64 {
            self.forgotten.remove(0);
        }
        self.forgotten.push(v);
    }

    /// One more reference reaches `v`, if it is one of this vat's exported objects.
    fn reached(&mut self, v: VRef) {
        if is_export(v) {
            *self.reach.entry(v).or_default() += 1;
        }
    }

    /// A random held vref of `kind` (any kind if `None`).
    fn pick_known(&self, rng: &mut Rng, kind: Option<RefKind>) -> Option<VRef> {
        let of_kind = |v: &&VRef| kind.is_none_or(|k| v.kind == k);
        let n = self.known.keys().filter(of_kind).count();
        if n == 0 {
            return None;
        }
        self.known.keys().filter(of_kind).nth(rng.below(n as u64) as usize).copied()
    }

    /// Random held vrefs for a GC syscall: mostly ones it could apply to.
    fn pick_where(&self, rng: &mut Rng, ok: impl Fn(&VRef) -> bool) -> Option<VRef> {
        let fits: Vec<VRef> = self.known.keys().copied().filter(|v| ok(v)).collect();
        rng.pick(&fits)
    }
}

/// An object the vat exports (`o+N`).
fn is_export(v: VRef) -> bool {
    v.kind == RefKind::Object && v.allocator == Allocator::Endpoint
}

/// What the host read from the kernel for one vat before a crank: see the module doc.
#[derive(Clone, Debug, Default)]
struct Facts {
    reach: BTreeMap<VRef, u32>,
    subscribed: BTreeSet<VRef>,
    queued: BTreeMap<VRef, u32>,
}

/// The result promise of the message at the head of the run queue, if any: its subscribers and
/// how many messages wait on it.
#[derive(Clone, Debug, Default)]
struct HeadResult {
    subscribers: Vec<EndpointId>,
    queued: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Illegal(String),
    Exit(bool),
}

#[derive(Clone, Debug)]
enum End {
    Returned,
    Failed(String),
    Panicked(String),
}

/// What the vat did in the delivery now running: its model as it will be if the crank commits.
struct Delivery {
    vat: usize,
    pending: VatModel,
    forget: Vec<VRef>,
    /// Refs a GC delivery retires: the kernel removes them from the c-list after it commits
    /// (an export only if still unreferenced then).
    retire: Vec<VRef>,
    verdict: Option<Verdict>,
    end: End,
    legal: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Stats {
    syscalls: u64,
    judged_legal: u64,
    judged_illegal: u64,
    refused_after_verdict: u64,
    refs: u64,
    forged_refs: u64,
    cranks: u64,
    deliveries: u64,
    aborted_illegal: u64,
    aborted_other: u64,
    exited: u64,
    committed_with_legal_syscalls: u64,
    vats: u64,
    gc_syscalls: u64,
    gc_legal: u64,
    gc_deliveries: u64,
    /// GC deliveries other than bringOutYourDead: dropExports, retireExports, retireImports.
    gc_told: u64,
    stale_illegal: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.syscalls += o.syscalls;
        self.judged_legal += o.judged_legal;
        self.judged_illegal += o.judged_illegal;
        self.refused_after_verdict += o.refused_after_verdict;
        self.refs += o.refs;
        self.forged_refs += o.forged_refs;
        self.cranks += o.cranks;
        self.deliveries += o.deliveries;
        self.aborted_illegal += o.aborted_illegal;
        self.aborted_other += o.aborted_other;
        self.exited += o.exited;
        self.committed_with_legal_syscalls += o.committed_with_legal_syscalls;
        self.vats += o.vats;
        self.gc_syscalls += o.gc_syscalls;
        self.gc_legal += o.gc_legal;
        self.gc_deliveries += o.gc_deliveries;
        self.gc_told += o.gc_told;
        self.stale_illegal += o.stale_illegal;
    }
}

struct World {
    rng: Rng,
    vats: Vec<VatModel>,
    /// Indices of the vats the model holds live.
    live: Vec<usize>,
    queue_len: u64,
    delivery: Option<Delivery>,
    failures: Vec<String>,
    stats: Stats,
    /// Draining the run queue at the end: vats make no syscalls.
    quiet: bool,
    /// Read from the kernel before the crank now running, per vat.
    facts: BTreeMap<EndpointId, Facts>,
    head_result: Option<HeadResult>,
}

type Shared = Rc<RefCell<World>>;

// ---- generating syscalls ----

#[derive(Clone, Copy)]
enum Want {
    Any,
    Object,
    Promise,
}

impl Want {
    fn kind(self) -> Option<RefKind> {
        match self {
            Want::Any => None,
            Want::Object => Some(RefKind::Object),
            Want::Promise => Some(RefKind::Promise),
        }
    }

    fn letter(self, rng: &mut Rng) -> char {
        match self {
            Want::Object => 'o',
            Want::Promise => 'p',
            Want::Any => rng.pick(&['o', 'p']).unwrap_or('o'),
        }
    }
}

const BIG: &[&str] = &[
    "o-18446744073709551615",
    "p-18446744073709551615",
    "o+18446744073709551615",
    "p+18446744073709551615",
    "o-18446744073709551616",
    "p+99999999999999999999",
    "o-4294967296",
    "p-1000000",
];

const MALFORMED: &[&str] = &[
    "", "o", "p", "o+", "p-", "x+1", "O+1", "P-1", "o*1", "o+01", "p-00", "o+-1", "o-+1", " o+1", "o+1 ", "o+1\n", "o+١", "ko1", "kp2",
    "o+0x1", "p-1e3", "o++1", "o+ 1", "+1", "-1", "o-1.0", "🦀", "o\u{0}+1", "o+1/2", "ro+1", "rp-1",
];

struct Gen<'a> {
    rng: &'a mut Rng,
    me: &'a VatModel,
    vats: &'a [VatModel],
    refs: u64,
    forged: u64,
}

impl Gen<'_> {
    /// A vref string: usually one the vat holds (per its forge rate), else forged or malformed.
    fn vref(&mut self, want: Want) -> String {
        self.refs += 1;
        if !self.rng.chance(self.me.forge_rate) {
            if !matches!(want, Want::Promise) && self.rng.chance(FRESH_EXPORT_RATE) {
                // A new object, sometimes skipping indices (named later, or never: export gaps).
                return VRef::export(self.me.last_export.0.saturating_add(1 + self.rng.below(3))).to_string();
            }
            if let Some(v) = self.me.pick_known(self.rng, want.kind()) {
                return v.to_string();
            }
        }
        self.forged += 1;
        match self.rng.below(9) {
            0 => format!("{}+{}", want.letter(self.rng), self.rng.below(40)),
            1 | 2 => format!("{}-{}", want.letter(self.rng), self.rng.below(25)),
            3 => (self.rng.pick(BIG).unwrap_or("o-1")).to_owned(),
            4 => (self.rng.pick(MALFORMED).unwrap_or("")).to_owned(),
            5 => self.rng.text(6),
            6 => {
                let other = &self.vats[self.rng.below(self.vats.len() as u64) as usize];
                other.pick_known(self.rng, want.kind()).map(|v| v.to_string()).unwrap_or_else(|| "o-3".to_owned())
            }
            7 => self.rng.pick(&self.me.forgotten).map(|v| v.to_string()).unwrap_or_else(|| "p-2".to_owned()),
            _ => {
                let wrong = match want {
                    Want::Object => Some(RefKind::Promise),
                    Want::Promise => Some(RefKind::Object),
                    Want::Any => None,
                };
                self.me.pick_known(self.rng, wrong).map(|v| v.to_string()).unwrap_or_else(|| "o+0".to_owned())
            }
        }
    }

    fn key(&mut self) -> String {
        match self.rng.below(24) {
            0 => String::new(),
            1 => "k".repeat(MAX_KEY_LEN + 1 + self.rng.below(40) as usize),
            2 => "é".repeat(MAX_KEY_LEN / 2 + 1),
            3 => "x".repeat(MAX_KEY_LEN),
            4 | 5 => self.rng.text(8),
            6..=10 => {
                let keys: Vec<String> = self.me.vatstore.keys().cloned().collect();
                self.rng.pick(&keys).unwrap_or_else(|| "a".to_owned())
            }
            _ => (self.rng.pick(&["a", "b", "c", "d/1", "d/2", "ü", "$x", "a\0"]).unwrap_or("a")).to_owned(),
        }
    }

    fn data(&mut self) -> RawData {
        if self.rng.chance(0.2) {
            return RawData { body: "{\"$slot\":0}".to_owned(), slots: vec![self.vref(Want::Any)] };
        }
        let n = self.rng.below(3);
        RawData { body: format!("\"v{}\"", self.rng.below(100)), slots: (0..n).map(|_| self.vref(Want::Any)).collect() }
    }

    /// 1..=3 vrefs for a GC syscall: per the forge rate, held ones it could apply to (`fits`),
    /// else any vref string the generator makes (held of another kind, forged, malformed, stale).
    fn gc_vrefs(&mut self, fits: impl Fn(&VatModel, &VRef) -> bool) -> Vec<String> {
        let n = 1 + self.rng.below(3) * u64::from(self.rng.chance(0.3));
        (0..n)
            .map(|_| {
                if !self.rng.chance(self.me.forge_rate) {
                    let me = self.me;
                    if let Some(v) = me.pick_where(self.rng, |v| fits(me, v)) {
                        self.refs += 1;
                        return v.to_string();
                    }
                }
                self.vref(Want::Any)
            })
            .collect()
    }

    fn gc_syscall(&mut self) -> RawSyscall {
        match self.rng.below(4) {
            0 => RawSyscall::DropImports {
                vrefs: self
                    .gc_vrefs(|m, v| (v.is_promise() && !m.decides(*v)) || (v.allocator == Allocator::Kernel && !m.dropped.contains(v))),
            },
            1 => RawSyscall::RetireImports { vrefs: self.gc_vrefs(|m, v| m.dropped.contains(v)) },
            2 => RawSyscall::RetireExports { vrefs: self.gc_vrefs(|m, v| is_export(*v) && m.reach.get(v).is_none_or(|r| *r == 0)) },
            _ => RawSyscall::AbandonExports { vrefs: self.gc_vrefs(|_, v| is_export(*v) && *v != VRef::ROOT) },
        }
    }

    fn syscall(&mut self, result: Option<VRef>, busy: bool) -> RawSyscall {
        let roll = self.rng.below(112);
        match roll {
            0..=29 if !busy => {
                let want = if self.rng.chance(0.3) { Want::Object } else { Want::Any };
                let target = self.vref(want);
                let method = (self.rng.pick(&["m", "ping", "x"]).unwrap_or("m")).to_owned();
                let args = self.data();
                let result = match self.rng.below(4) {
                    0 | 1 => None,
                    2 => Some(format!("p+{}", self.me.last_export.1.saturating_add(1 + self.rng.below(3)))),
                    _ => Some(self.vref(Want::Promise)),
                };
                RawSyscall::Send { target, method, args, result }
            }
            30..=39 => RawSyscall::Subscribe { promise: self.vref(Want::Promise) },
            40..=54 => {
                let first = match result {
                    Some(r) if self.rng.chance(0.6) => r.to_string(),
                    _ => self.vref(Want::Promise),
                };
                let mut resolutions = vec![(first.clone(), self.rng.chance(0.3), self.data())];
                if self.rng.chance(0.2) {
                    resolutions.push((self.vref(Want::Promise), self.rng.chance(0.3), self.data()));
                }
                if self.rng.chance(0.1) {
                    resolutions.push((first, false, self.data()));
                }
                RawSyscall::Resolve { resolutions }
            }
            55..=66 => RawSyscall::VatstoreSet { key: self.key(), value: self.rng.text(5) },
            67..=76 => RawSyscall::VatstoreGet { key: self.key() },
            77..=82 => RawSyscall::VatstoreDelete { key: self.key() },
            83..=88 => RawSyscall::VatstoreNextKey { after: if self.rng.chance(0.4) { String::new() } else { self.key() } },
            89..=91 => {
                let kind = self
                    .rng
                    .pick(&["dropImports", "retireImports", "retireExports", "abandonExports", "callNow", "", "send"])
                    .unwrap_or("");
                RawSyscall::Other { kind: kind.to_owned() }
            }
            92 if self.rng.chance(0.25) => RawSyscall::Exit { failure: self.rng.chance(0.5), info: self.data() },
            100.. => self.gc_syscall(),
            _ => RawSyscall::VatstoreGet { key: self.key() },
        }
    }
}

// ---- predicting syscalls ----

/// What a syscall must return.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Ok(Option<String>),
    Illegal,
    Exit(bool),
    /// After the verdict: refused, not honoured.
    Refused,
}

/// The canonical vref grammar, written independently of the kernel's parser.
fn parse(s: &str) -> Option<VRef> {
    let b = s.as_bytes();
    if b.len() < 3 {
        return None;
    }
    let kind = match b[0] {
        b'o' => RefKind::Object,
        b'p' => RefKind::Promise,
        _ => return None,
    };
    let allocator = match b[1] {
        b'+' => Allocator::Endpoint,
        b'-' => Allocator::Kernel,
        _ => return None,
    };
    let digits = &s[2..];
    if !digits.bytes().all(|c| c.is_ascii_digit()) || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    let index = digits.parse::<u64>().ok()?;
    Some(VRef { kind, allocator, index })
}

fn parse_all(slots: &[String]) -> Option<Vec<VRef>> {
    slots.iter().map(|s| parse(s)).collect()
}

fn bad_key(key: &str) -> bool {
    key.is_empty() || key.len() > MAX_KEY_LEN
}

/// Predict `call` against the model, updating it as the kernel would.
fn predict(m: &mut VatModel, call: &RawSyscall) -> Expect {
    match call {
        RawSyscall::Send { target, args, result, .. } => {
            let (Some(t), Some(slots)) = (parse(target), parse_all(&args.slots)) else { return Expect::Illegal };
            let r = match result.as_deref().map(parse) {
                Some(None) => return Expect::Illegal,
                Some(Some(r)) => Some(r),
                None => None,
            };
            if !m.export(t) || !slots.iter().all(|s| m.export(*s)) {
                return Expect::Illegal;
            }
            if let Some(r) = r {
                if !r.is_promise() || !m.export(r) || !m.decides(r) {
                    return Expect::Illegal;
                }
                m.known.insert(r, false); // the kernel decides it now, then the receiver
            }
            // The queued message reaches its target and every object in its arguments.
            for v in std::iter::once(t).chain(slots) {
                m.reached(v);
            }
            Expect::Ok(None)
        }
        RawSyscall::Subscribe { promise } => match parse(promise) {
            Some(p) if p.is_promise() && m.export(p) => {
                if m.decides(p) {
                    m.subscribed.insert(p); // unresolved, since it decides it
                }
                Expect::Ok(None)
            }
            _ => Expect::Illegal,
        },
        RawSyscall::Resolve { resolutions } => {
            let mut parsed = Vec::new();
            for (p, rejected, data) in resolutions {
                let (Some(p), Some(slots)) = (parse(p), parse_all(&data.slots)) else { return Expect::Illegal };
                // Fulfilled to exactly one reference: messages waiting on it go there.
                let single = (!rejected && data.body.as_bytes() == CapData::REF_BODY && slots.len() == 1).then(|| slots[0]);
                parsed.push((p, slots, single));
            }
            for (p, slots, _) in &parsed {
                if !p.is_promise() || !m.export(*p) || !slots.iter().all(|s| m.export(*s)) {
                    return Expect::Illegal;
                }
            }
            for (i, (p, _, _)) in parsed.iter().enumerate() {
                if parsed[..i].iter().any(|(q, _, _)| q == p) || !m.decides(*p) {
                    return Expect::Illegal;
                }
            }
            for (p, slots, single) in parsed {
                // The settlement reaches every object in its data; the messages queued on the
                // promise are sent on to the object it was fulfilled to.
                for v in slots {
                    m.reached(v);
                }
                if let Some(target) = single.filter(|v| is_export(*v)) {
                    *m.reach.entry(target).or_default() += m.queued.get(&p).copied().unwrap_or(0);
                }
                // The resolver forgets it, unless it awaits its notify (which forgets it then).
                if m.subscribed.remove(&p) {
                    m.known.insert(p, false);
                    m.queued.remove(&p);
                } else {
                    m.forget(p);
                }
            }
            Expect::Ok(None)
        }
        RawSyscall::Exit { failure, info } => match parse_all(&info.slots) {
            Some(slots) if slots.iter().all(|s| m.export(*s)) => Expect::Exit(*failure),
            _ => Expect::Illegal,
        },
        RawSyscall::VatstoreGet { key } if !bad_key(key) => Expect::Ok(m.vatstore.get(key).cloned()),
        RawSyscall::VatstoreSet { key, value } if !bad_key(key) && value.len() <= MAX_VALUE_LEN => {
            m.vatstore.insert(key.clone(), value.clone());
            Expect::Ok(None)
        }
        RawSyscall::VatstoreDelete { key } if !bad_key(key) => {
            m.vatstore.remove(key);
            Expect::Ok(None)
        }
        RawSyscall::VatstoreNextKey { after } if after.len() <= MAX_KEY_LEN => {
            let next = if after.is_empty() {
                m.vatstore.keys().next()
            } else {
                m.vatstore.range::<String, _>((Bound::Excluded(after), Bound::Unbounded)).next().map(|(k, _)| k)
            };
            Expect::Ok(next.cloned())
        }
        RawSyscall::DropImports { vrefs } => gc(m, vrefs, |m, v| {
            if v.is_promise() && !m.decides(v) {
                m.forget(v); // a promise is forgotten at once
                true
            } else {
                v.kind == RefKind::Object && v.allocator == Allocator::Kernel && m.dropped.insert(v)
            }
        }),
        RawSyscall::RetireImports { vrefs } => gc(m, vrefs, |m, v| {
            let ok = m.dropped.contains(&v);
            if ok {
                m.forget(v);
            }
            ok
        }),
        RawSyscall::RetireExports { vrefs } => gc(m, vrefs, |m, v| {
            // Unreachable, and not the (pinned) root.
            let ok = is_export(v) && v != VRef::ROOT && m.reach.get(&v).copied().unwrap_or(0) == 0;
            if ok {
                m.forget(v);
            }
            ok
        }),
        RawSyscall::AbandonExports { vrefs } => gc(m, vrefs, |m, v| {
            let ok = is_export(v) && v != VRef::ROOT;
            if ok {
                m.forget(v);
            }
            ok
        }),
        _ => Expect::Illegal,
    }
}

/// A GC syscall: every vref well formed and in the c-list (looked up, never allocated), then
/// each in turn legal for `apply` (which updates the model), else the whole call is illegal.
fn gc(m: &mut VatModel, vrefs: &[String], apply: impl Fn(&mut VatModel, VRef) -> bool) -> Expect {
    let Some(vrefs) = parse_all(vrefs) else { return Expect::Illegal };
    if !vrefs.iter().all(|v| m.known.contains_key(v)) {
        return Expect::Illegal;
    }
    for v in vrefs {
        if !m.known.contains_key(&v) || !apply(m, v) {
            return Expect::Illegal;
        }
    }
    Expect::Ok(None)
}

fn matches(expect: &Expect, got: &Result<Option<String>, SyscallError>) -> bool {
    match (expect, got) {
        (Expect::Ok(v), Ok(g)) => v == g,
        (Expect::Exit(_), Ok(None)) => true,
        (Expect::Illegal, Err(SyscallError::Illegal(_))) => true,
        (Expect::Refused, Err(SyscallError::Terminated)) => true,
        _ => false,
    }
}

// ---- the fuzz vat ----

struct FuzzVat {
    idx: usize,
    world: Shared,
}

impl Delivery {
    /// Check a vref the kernel hands the vat: held already, or a new import numbered next.
    fn observe(&mut self, v: VRef, failures: &mut Vec<String>) {
        if self.pending.known.contains_key(&v) {
            // The kernel importing it again makes a dropped import reachable again.
            self.pending.dropped.remove(&v);
            return;
        }
        let ep = self.pending.ep;
        if v.allocator == Allocator::Endpoint {
            failures.push(format!("{ep} was delivered {v}, an export it does not hold"));
            return;
        }
        let last = match v.kind {
            RefKind::Object => &mut self.pending.last_import.0,
            RefKind::Promise => &mut self.pending.last_import.1,
        };
        if v.index != *last + 1 {
            failures.push(format!("{ep} got new import {v} out of order (the last was {})", *last));
        }
        *last = v.index;
        self.pending.known.insert(v, false);
    }
}

impl FuzzVat {
    fn run(&mut self, mut d: Delivery, result: Option<VRef>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let mut w = self.world.borrow_mut();
        if !d.pending.live {
            let ep = d.pending.ep;
            w.failures.push(format!("{ep} got a delivery after it was terminated"));
        }
        w.stats.deliveries += 1;
        d.pending.deliveries += 1;
        let careful = d.pending.forge_rate == 0.0;
        let most = if careful { CAREFUL_SYSCALLS } else { 17 };
        let n = if w.quiet { 0 } else { w.rng.below(most) };
        // A careful vat that has lived long enough exits (its c-list, grown large, is released
        // at once), and another takes its place.
        let retire = careful && !w.quiet && d.pending.deliveries > CAREFUL_LIFETIME;
        for i in 0..n.max(u64::from(retire)) {
            let World { rng, vats, queue_len, stats, failures, .. } = &mut *w;
            if d.verdict.is_some() && rng.chance(0.15) {
                break; // a vat that ignores its error may carry on for a while, or not
            }
            // A careful vat (forge rate 0) tries a few syscalls and makes the first its model
            // deems legal: it lives long, so GC deliveries reach it.
            let tries = if d.pending.forge_rate == 0.0 { CAREFUL_TRIES } else { 1 };
            let mut call = None;
            for _ in 0..tries {
                let mut g = Gen { rng, me: &d.pending, vats, refs: 0, forged: 0 };
                let c = g.syscall(result, *queue_len > BUSY_QUEUE);
                let (refs, forged) = (g.refs, g.forged);
                let legal = predict(&mut d.pending.clone(), &c) != Expect::Illegal;
                call = Some((c, refs, forged));
                if legal {
                    break;
                }
            }
            let Some((mut call, refs, forged)) = call else { break };
            if retire && i == 0 {
                call = RawSyscall::Exit { failure: false, info: RawData { body: "\"retired\"".to_owned(), slots: Vec::new() } };
            }
            stats.refs += refs;
            stats.forged_refs += forged;
            let expect = if d.verdict.is_some() { Expect::Refused } else { predict(&mut d.pending, &call) };
            let got = sys.execute(&call);
            stats.syscalls += 1;
            let is_gc = matches!(
                call,
                RawSyscall::DropImports { .. }
                    | RawSyscall::RetireImports { .. }
                    | RawSyscall::RetireExports { .. }
                    | RawSyscall::AbandonExports { .. }
            );
            if is_gc && d.verdict.is_none() {
                stats.gc_syscalls += 1;
                if expect == Expect::Ok(None) {
                    stats.gc_legal += 1;
                }
            }
            if !matches(&expect, &got) {
                failures.push(format!("{} made {call:?}: expected {expect:?}, got {got:?}", d.pending.ep));
                continue;
            }
            match (expect, got) {
                (Expect::Illegal, Err(SyscallError::Illegal(reason))) => {
                    stats.judged_illegal += 1;
                    if reason.contains("stale") {
                        stats.stale_illegal += 1;
                    }
                    d.verdict = Some(Verdict::Illegal(reason));
                }
                (Expect::Exit(failure), _) => {
                    stats.judged_legal += 1;
                    d.verdict = Some(Verdict::Exit(failure));
                }
                (Expect::Refused, _) => stats.refused_after_verdict += 1,
                _ => {
                    stats.judged_legal += 1;
                    d.legal += 1;
                }
            }
        }
        let finished = sys.is_finished();
        if finished != d.verdict.is_some() {
            w.failures.push(format!("{}: is_finished() is {finished} with verdict {:?}", d.pending.ep, d.verdict));
        }
        if d.verdict.is_none() && !w.quiet {
            if w.rng.chance(0.01) {
                d.end = End::Failed(format!("fuzz vat error {}", w.rng.below(1000)));
            } else if w.rng.chance(0.005) {
                d.end = End::Panicked(format!("{PANIC_TAG} {}", w.rng.below(1000)));
            }
        }
        let end = d.end.clone();
        w.delivery = Some(d);
        drop(w);
        match end {
            End::Returned => Ok(()),
            End::Failed(why) => Err(VatError::new(why)),
            End::Panicked(why) => panic!("{why}"),
        }
    }

    /// A delivery begins: the model as last committed, with the facts the host read from the
    /// kernel for it. The vat's own subscriptions to promises it still decides must be among
    /// the kernel's.
    fn start(&self) -> Delivery {
        let mut w = self.world.borrow_mut();
        let mut pending = w.vats[self.idx].clone();
        let facts = w.facts.get(&pending.ep).cloned().unwrap_or_default();
        for p in &pending.subscribed {
            if pending.decides(*p) && !facts.subscribed.contains(p) {
                let ep = pending.ep;
                w.failures.push(format!("{ep} subscribed to {p}, which it decides, but the kernel has it unsubscribed"));
            }
        }
        pending.reach = facts.reach;
        pending.subscribed = facts.subscribed;
        pending.queued = facts.queued;
        Delivery { vat: self.idx, pending, forget: Vec::new(), retire: Vec::new(), verdict: None, end: End::Returned, legal: 0 }
    }

    /// A GC delivery about `vrefs`: each must be in the c-list, and `ok` for the action.
    fn gc_delivery(
        &mut self,
        action: &str,
        vrefs: &[VRef],
        ok: impl Fn(&VatModel, VRef) -> bool,
        retire: bool,
        sys: &mut Syscall<'_, '_>,
    ) -> Result<(), VatError> {
        let mut d = self.start();
        {
            let mut w = self.world.borrow_mut();
            w.stats.gc_deliveries += 1;
            if !vrefs.is_empty() {
                w.stats.gc_told += 1;
            }
            let ep = d.pending.ep;
            if vrefs.is_empty() && action != "bringOutYourDead" {
                w.failures.push(format!("{ep} was told {action} of nothing"));
            }
            for v in vrefs {
                if !d.pending.known.contains_key(v) || !ok(&d.pending, *v) {
                    w.failures.push(format!("{ep} was told {action} of {v}, which does not qualify (model {:?})", d.pending));
                }
            }
            if retire {
                d.retire = vrefs.to_vec();
            }
        }
        self.run(d, None, sys)
    }
}

impl Vat for FuzzVat {
    fn deliver(
        &mut self,
        target: VRef,
        _method: &str,
        args: VatData,
        result: Option<VRef>,
        sys: &mut Syscall<'_, '_>,
    ) -> Result<(), VatError> {
        let mut d = self.start();
        {
            let mut w = self.world.borrow_mut();
            let ep = d.pending.ep;
            if target.kind != RefKind::Object || target.allocator != Allocator::Endpoint || !d.pending.known.contains_key(&target) {
                w.failures.push(format!("{ep} was delivered a message for {target}, not an object it exports"));
            }
            for s in &args.slots {
                d.observe(*s, &mut w.failures);
            }
            if let Some(r) = result {
                if !r.is_promise() {
                    w.failures.push(format!("{ep} got result {r}, not a promise"));
                }
                d.observe(r, &mut w.failures);
                d.pending.known.insert(r, true);
                match w.head_result.clone() {
                    Some(head) => {
                        if head.subscribers.contains(&ep) {
                            d.pending.subscribed.insert(r);
                        }
                        d.pending.queued.insert(r, head.queued);
                    }
                    None => w.failures.push(format!("{ep} got result {r}, but the queued message had none")),
                }
            }
        }
        self.run(d, result, sys)
    }

    fn notify(&mut self, resolutions: Vec<Resolution>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let mut d = self.start();
        {
            let mut w = self.world.borrow_mut();
            for r in &resolutions {
                if !r.promise.is_promise() {
                    let ep = d.pending.ep;
                    w.failures.push(format!("{ep} was notified of {}, not a promise", r.promise));
                }
                d.observe(r.promise, &mut w.failures);
                if d.pending.decides(r.promise) {
                    let ep = d.pending.ep;
                    w.failures.push(format!("{ep} was notified of {}, which it still decides", r.promise));
                }
                for s in &r.data.slots {
                    d.observe(*s, &mut w.failures);
                }
                d.forget.push(r.promise);
            }
        }
        self.run(d, None, sys)
    }

    fn drop_exports(&mut self, exports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let unreachable = |m: &VatModel, v: VRef| is_export(v) && v != VRef::ROOT && m.reach.get(&v).copied().unwrap_or(0) == 0;
        self.gc_delivery("dropExports", exports, unreachable, false, sys)
    }

    fn retire_exports(&mut self, exports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let unreachable = |m: &VatModel, v: VRef| is_export(v) && v != VRef::ROOT && m.reach.get(&v).copied().unwrap_or(0) == 0;
        self.gc_delivery("retireExports", exports, unreachable, true, sys)
    }

    fn retire_imports(&mut self, imports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.gc_delivery("retireImports", imports, |m, v| m.dropped.contains(&v), true, sys)
    }

    fn bring_out_your_dead(&mut self, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.gc_delivery("bringOutYourDead", &[], |_, _| true, false, sys)
    }
}

// ---- the host ----

fn add_vat(kernel: &mut Kernel<MemStore>, world: &Shared) -> Result<usize, String> {
    let idx = world.borrow().vats.len();
    let ep =
        kernel.add_endpoint(&format!("v{idx}"), VatEndpoint::boxed(FuzzVat { idx, world: Rc::clone(world) })).map_err(|e| e.to_string())?;
    let root = KRef::Object(kernel.root(ep).map_err(|e| e.to_string())?);
    let mut w = world.borrow_mut();
    // At most one careful vat at a time: the others keep most syscalls forged.
    let careful_live = w.live.iter().any(|i| w.vats[*i].forge_rate == 0.0);
    let rates: &[f64] = if careful_live { &[0.05, 0.6, 0.8, 0.95] } else { &[0.0, 0.05, 0.6, 0.8, 0.95] };
    let forge_rate = w.rng.pick(rates).unwrap_or(0.6);
    let known = BTreeMap::from([(VRef::ROOT, false)]);
    w.vats.push(VatModel {
        ep,
        root,
        live: true,
        reason: None,
        forge_rate,
        known,
        dropped: BTreeSet::new(),
        subscribed: BTreeSet::new(),
        reach: BTreeMap::new(),
        queued: BTreeMap::new(),
        forgotten: Vec::new(),
        vatstore: BTreeMap::new(),
        last_import: (0, 0),
        last_export: (0, 0),
        named: (BTreeSet::new(), BTreeSet::new()),
        deliveries: 0,
    });
    w.live.push(idx);
    w.stats.vats += 1;
    Ok(idx)
}

/// The host sends `vat` a message carrying some vats' roots (live or not).
fn poke(kernel: &mut Kernel<MemStore>, world: &Shared, vat: usize) -> Result<(), String> {
    let (target, slots) = {
        let mut w = world.borrow_mut();
        let n = w.rng.below(4);
        let count = w.vats.len() as u64;
        let slots: Vec<KRef> = (0..n)
            .map(|_| {
                let i = w.rng.below(count) as usize;
                w.vats[i].root
            })
            .collect();
        (w.vats[vat].root, slots)
    };
    let kp = kernel.queue_message(target, "poke", CapData { body: b"[]".to_vec(), slots }).map_err(|e| e.to_string())?;
    // The host does not read the answer: it lets go at once, and the promise is collected once
    // settled and forgotten.
    kernel.set_pinned(kp.into(), false).map_err(|e| e.to_string())?;
    Ok(())
}

/// Read, before a crank, what the model of the vat about to run needs from the kernel (see the
/// module doc): its exports' reachable counts, its subscriptions and its promises' queue
/// lengths, as of the start of the delivery of the item at the head of the run queue (whose own
/// references the kernel releases before the vat runs).
fn gather_facts(kernel: &Kernel<MemStore>, world: &Shared) -> Result<(), String> {
    let err = |e: kernel_core::KernelError| e.to_string();
    // The run queue's first row (`q/<seq>`, lowest sequence first).
    let head: Option<RunQueueItem> = match kernel.store().next(b"q/", None).map_err(|e| e.to_string())? {
        Some((k, v)) => Some(postcard::from_bytes(&v).map_err(|e| format!("run-queue row {}: {e}", k.escape_ascii()))?),
        None => None,
    };
    let mut released: BTreeMap<KRef, u32> = BTreeMap::new();
    let mut head_result = None;
    let receiver = match &head {
        None => None,
        Some(RunQueueItem::Notify { endpoint, .. } | RunQueueItem::Gc { endpoint, .. }) => Some(*endpoint),
        Some(RunQueueItem::Send { target, message }) => {
            if let KRef::Object(_) = target {
                *released.entry(*target).or_default() += 1;
            }
            for s in &message.args.slots {
                *released.entry(*s).or_default() += 1;
            }
            if let Some(kp) = message.result {
                head_result = Some(match kernel.promise(kp).map_err(err)? {
                    Some(PromiseState::Unresolved { subscribers, queue, .. }) => {
                        HeadResult { subscribers, queued: u32::try_from(queue.len()).unwrap_or(u32::MAX) }
                    }
                    other => return Err(format!("the queued message's result {kp} is {other:?}")),
                });
            }
            // Follow promises fulfilled to a reference, as routing will.
            let mut t = *target;
            loop {
                match t {
                    KRef::Object(o) => break kernel.object(o).map_err(err)?.map(|r| r.owner),
                    KRef::Promise(p) => match kernel.promise(p).map_err(err)? {
                        Some(PromiseState::Settled(kernel_core::Settlement::Fulfilled(d))) if d.as_reference().is_some() => {
                            t = d.as_reference().unwrap_or(t);
                        }
                        _ => break None,
                    },
                }
            }
        }
    };
    let mut w = world.borrow_mut();
    w.facts.clear();
    w.head_result = head_result;
    let Some(ep) = receiver.filter(|ep| w.live.iter().any(|i| w.vats[*i].ep == *ep)) else { return Ok(()) };
    // Only its exports and the promises it decides matter; their krefs come from the c-list's
    // vref rows (`l/<ep u32>/v<vref 10 bytes>`, as kernel-core's tables document them).
    let m = w.vats.iter().find(|v| v.ep == ep).ok_or("the receiver has no model")?;
    let mut f = Facts::default();
    for (&vref, &decides) in &m.known {
        if !is_export(vref) && !decides {
            continue;
        }
        let mut key = b"l/".to_vec();
        key.extend_from_slice(&ep.0.to_be_bytes());
        key.extend_from_slice(b"/v");
        key.extend_from_slice(&vref.key_bytes());
        let Some(raw) = kernel.store().get(&key).map_err(|e| e.to_string())? else {
            return Err(format!("{ep}'s model holds {vref}, which its c-list does not"));
        };
        let kref: KRef = postcard::from_bytes(&raw).map_err(|e| format!("c-list row for {vref}: {e}"))?;
        match kref {
            KRef::Object(o) => {
                let rec = kernel.object(o).map_err(err)?.ok_or_else(|| format!("{ep}'s {vref} names {o}, which does not exist"))?;
                let gone = released.get(&kref).copied().unwrap_or(0);
                let reach = rec
                    .reachable
                    .checked_sub(gone)
                    .ok_or_else(|| format!("{o} counts {} references, the head message alone holds {gone}", rec.reachable))?;
                f.reach.insert(vref, reach);
            }
            KRef::Promise(p) => {
                if let Some(PromiseState::Unresolved { subscribers, queue, .. }) = kernel.promise(p).map_err(err)? {
                    if subscribers.contains(&ep) {
                        f.subscribed.insert(vref);
                    }
                    f.queued.insert(vref, u32::try_from(queue.len()).unwrap_or(u32::MAX));
                }
            }
        }
    }
    w.facts.insert(ep, f);
    Ok(())
}

fn status_of(kernel: &Kernel<MemStore>, ep: EndpointId) -> Result<EndpointStatus, String> {
    kernel.endpoint(ep).map_err(|e| e.to_string())?.map(|r| r.status).ok_or_else(|| format!("{ep} has no record"))
}

fn model_status(v: &VatModel) -> EndpointStatus {
    match &v.reason {
        None => EndpointStatus::Live,
        Some(reason) => EndpointStatus::Terminated { reason: reason.clone() },
    }
}

/// Check one crank's report against what its vat did, and fold the delivery into the model.
fn judge(kernel: &Kernel<MemStore>, world: &Shared, report: &CrankReport) -> Result<(), String> {
    let mut w = world.borrow_mut();
    w.stats.cranks += 1;
    if !w.failures.is_empty() {
        return Err(w.failures.join("\n"));
    }
    // Not a `match`, so that it reads the same whatever other kinds of crank exist: GC
    // deliveries reach the vat's GC hooks, not the scripted deliveries this test records.
    let delivered = if let CrankInput::Send { delivered_to, .. } = &report.input {
        *delivered_to
    } else if let CrankInput::Notify { endpoint, delivered: true, .. } = &report.input {
        Some(*endpoint)
    } else if let CrankInput::Gc { endpoint, delivered: true, .. } = &report.input {
        Some(*endpoint)
    } else {
        None
    };
    let d = w.delivery.take();
    let touched = match (delivered, d) {
        (None, None) => {
            if report.outcome != CrankOutcome::Committed {
                return Err(format!("a crank without a delivery ended {:?}", report.outcome));
            }
            None
        }
        (Some(ep), Some(d)) => {
            let vat = d.vat;
            if w.vats[vat].ep != ep {
                return Err(format!("the kernel delivered to {ep} but vat {} ran", w.vats[vat].ep));
            }
            let expected = match (&d.verdict, &d.end) {
                (Some(Verdict::Illegal(reason)), _) => CrankOutcome::Aborted { endpoint: ep, fault: Fault::IllegalSyscall(reason.clone()) },
                (Some(Verdict::Exit(failure)), End::Returned) => CrankOutcome::Exited { endpoint: ep, failure: *failure },
                (_, End::Failed(why)) => CrankOutcome::Aborted { endpoint: ep, fault: Fault::VatError(why.clone()) },
                (_, End::Panicked(why)) => CrankOutcome::Aborted { endpoint: ep, fault: Fault::Panic(why.clone()) },
                (None, End::Returned) => CrankOutcome::Committed,
            };
            if report.outcome != expected {
                return Err(format!("{ep}: expected {expected:?}, the kernel reported {:?}", report.outcome));
            }
            let m = &mut w.vats[vat];
            match &report.outcome {
                CrankOutcome::Committed => {
                    let Delivery { mut pending, forget, retire, legal, .. } = d;
                    for p in forget {
                        pending.forget(p);
                    }
                    // Retired imports go; a retired export goes unless the delivery sent it again.
                    for v in retire {
                        if !is_export(v) || pending.reach.get(&v).copied().unwrap_or(0) == 0 {
                            pending.forget(v);
                        }
                    }
                    *m = pending;
                    if legal > 0 {
                        w.stats.committed_with_legal_syscalls += 1;
                    }
                }
                CrankOutcome::Exited { failure, .. } => {
                    m.vatstore = d.pending.vatstore;
                    m.live = false;
                    m.reason = Some(if *failure { "exited with failure" } else { "exited" }.to_owned());
                    w.stats.exited += 1;
                }
                CrankOutcome::Aborted { fault, .. } => {
                    m.live = false;
                    m.reason = Some(fault.to_string());
                    if matches!(fault, Fault::IllegalSyscall(_)) {
                        w.stats.aborted_illegal += 1;
                    } else {
                        w.stats.aborted_other += 1;
                    }
                }
            }
            Some(vat)
        }
        (Some(ep), None) => return Err(format!("the kernel reports a delivery to {ep} but no vat ran")),
        (None, Some(d)) => return Err(format!("vat {} ran but the kernel reports no delivery", w.vats[d.vat].ep)),
    };
    if let Some(vat) = touched {
        if !w.vats[vat].live {
            w.live.retain(|i| *i != vat);
        }
    }
    // Exactly the delivered vat may have changed: every vat the model holds live is live.
    for v in w.live.iter().chain(touched.as_ref()).map(|i| &w.vats[*i]) {
        let status = status_of(kernel, v.ep)?;
        if status != model_status(v) {
            return Err(format!("{} is {status:?}, expected {:?}", v.ep, model_status(v)));
        }
    }
    if let Some(vat) = touched {
        let m = &w.vats[vat];
        let stored: BTreeMap<String, String> = kernel
            .vatstore(m.ep)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
            .collect();
        if stored != m.vatstore {
            return Err(format!("{}'s vatstore is {stored:?}, expected {:?}", m.ep, m.vatstore));
        }
    }
    Ok(())
}

/// Whole-kernel checks: every vat's status and c-list as modelled, and the tables consistent.
fn check_all(kernel: &Kernel<MemStore>, world: &Shared) -> Result<(), String> {
    let w = world.borrow();
    for v in &w.vats {
        let status = status_of(kernel, v.ep)?;
        if status != model_status(v) {
            return Err(format!("{} is {status:?}, expected {:?}", v.ep, model_status(v)));
        }
        let clist: Vec<VRef> = kernel.clist(v.ep).map_err(|e| e.to_string())?.into_iter().map(|(_, r)| r).collect();
        let mut clist_sorted = clist.clone();
        clist_sorted.sort();
        let expected: Vec<VRef> = if v.live { v.known.keys().copied().collect() } else { Vec::new() };
        if clist_sorted != expected {
            return Err(format!("{}'s c-list holds {clist_sorted:?}, the vat expects {expected:?}", v.ep));
        }
    }
    let problems = tests::check_tables(kernel);
    if !problems.is_empty() {
        return Err(format!("inconsistent tables:\n  {}", problems.join("\n  ")));
    }
    Ok(())
}

fn run_case(seed: u64, budget: u64) -> Result<Stats, String> {
    let world: Shared = Rc::new(RefCell::new(World {
        rng: Rng(seed),
        vats: Vec::new(),
        live: Vec::new(),
        queue_len: 0,
        delivery: None,
        failures: Vec::new(),
        stats: Stats::default(),
        quiet: false,
        facts: BTreeMap::new(),
        head_result: None,
    }));
    let mut kernel = Kernel::open(MemStore::new()).map_err(|e| e.to_string())?;
    let mut cranks = 0u64;
    while world.borrow().stats.syscalls < budget {
        while world.borrow().live.len() < LIVE_VATS {
            let idx = add_vat(&mut kernel, &world)?;
            poke(&mut kernel, &world, idx)?;
        }
        let poke_now = { kernel.queue_len() == 0 || world.borrow_mut().rng.chance(0.03) };
        if poke_now {
            let target = {
                let mut w = world.borrow_mut();
                let live = w.live.clone();
                w.rng.pick(&live)
            };
            if let Some(t) = target {
                poke(&mut kernel, &world, t)?;
            }
        }
        // Now and then ask a vat to bring out its dead (a GC delivery its model sees).
        let reap = {
            let mut w = world.borrow_mut();
            let live = w.live.clone();
            if w.rng.chance(REAP_RATE) {
                w.rng.pick(&live).map(|i| w.vats[i].ep)
            } else {
                None
            }
        };
        if let Some(ep) = reap {
            kernel.reap(ep).map_err(|e| e.to_string())?;
        }
        world.borrow_mut().queue_len = kernel.queue_len();
        gather_facts(&kernel, &world)?;
        let report = match kernel.step() {
            Ok(Some(r)) => r,
            Ok(None) => return Err("the run queue was empty after a poke".into()),
            Err(e) => return Err(format!("step failed: {e}")),
        };
        judge(&kernel, &world, &report).map_err(|e| format!("crank {}: {e}", report.crank.0))?;
        cranks += 1;
        if cranks % CHECK_EVERY == 0 {
            check_all(&kernel, &world).map_err(|e| format!("after crank {}: {e}", report.crank.0))?;
        }
        if cranks > budget * 4 {
            return Err(format!("{cranks} cranks made only {} syscalls", world.borrow().stats.syscalls));
        }
    }
    // Drain the queue (vats now quiet), still judging every crank, then check everything.
    world.borrow_mut().quiet = true;
    while let Some(report) = {
        gather_facts(&kernel, &world)?;
        kernel.step().map_err(|e| format!("step failed while draining: {e}"))?
    } {
        judge(&kernel, &world, &report).map_err(|e| format!("crank {} (draining): {e}", report.crank.0))?;
        cranks += 1;
        if cranks > budget * 5 {
            return Err("the run queue does not drain".into());
        }
    }
    check_all(&kernel, &world).map_err(|e| format!("at the end: {e}"))?;
    let stats = world.borrow().stats;
    Ok(stats)
}

/// Keep the output readable: the vats' deliberate panics are expected.
fn quiet_deliberate_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied()).unwrap_or("");
        if !msg.starts_with(PANIC_TAG) {
            default(info);
        }
    }));
}

#[test]
fn random_syscalls_never_break_the_kernel_and_each_illegal_one_terminates_exactly_its_vat() {
    quiet_deliberate_panics();
    if let Some(seed) = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse::<u64>().ok()) {
        let stats = run_case(seed, TOTAL_SYSCALLS / u64::from(CASES)).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        eprintln!("seed {seed}: {stats:?}");
        return;
    }
    let totals = RefCell::new(Stats::default());
    let mut runner = TestRunner::new(Config { cases: CASES, failure_persistence: None, max_shrink_iters: 0, ..Config::default() });
    let outcome = runner.run(&any::<u64>(), |seed| {
        let stats = run_case(seed, TOTAL_SYSCALLS / u64::from(CASES)).map_err(|e| TestCaseError::fail(format!("seed {seed}: {e}")))?;
        totals.borrow_mut().add(&stats);
        Ok(())
    });
    if let Err(e) = outcome {
        panic!("{e}\nreplay with FUZZ_SEED=<seed>");
    }
    let t = totals.into_inner();
    eprintln!("{t:?}");
    assert!(t.syscalls >= TOTAL_SYSCALLS, "only {} syscalls were made", t.syscalls);
    assert!(t.forged_refs * 2 > t.refs, "most vref strings should be forged: {} of {}", t.forged_refs, t.refs);
    assert!(t.judged_illegal > 5_000 && t.aborted_illegal > 1_000, "too few illegal syscalls: {t:?}");
    assert!(t.judged_legal > 20_000 && t.committed_with_legal_syscalls > 1_000, "too few legal syscalls: {t:?}");
    assert!(t.gc_syscalls > 2_000 && t.gc_legal > 200, "too few GC syscalls: {t:?}");
    assert!(t.gc_told > 100 && t.stale_illegal > 50, "too few GC deliveries or stale refs: {t:?}");
}
