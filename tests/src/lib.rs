//! # tests
//!
//! Cross-crate tests of the kernel (in `tests/`), and what they share: [`check_tables`], which
//! reads a kernel's tables (through the host API and, for the c-lists' vref side and reachable
//! flags, the raw store) and lists every way they disagree with each other; and [`recount`],
//! which recomputes every reference count from scratch.
#![forbid(unsafe_code)]

pub mod gc_vat;

use kernel_core::store::{scan_committed, Store};
use kernel_core::{
    Allocator, ClistEntry, EndpointId, EndpointStatus, KObjectId, KPromiseId, KRef, Kernel, Message, ObjectRecord, PromiseRecord,
    PromiseState, RefKind, RunQueueItem, VRef,
};
use std::collections::{BTreeMap, BTreeSet};

/// What the raw store holds under `l/` (the c-lists): the kref side, `(endpoint, kref) ->`
/// entry (vref and reachable flag), and the vref side, `(endpoint, vref) -> kref`.
struct RawCLists {
    kref_rows: BTreeMap<(EndpointId, KRef), ClistEntry>,
    by_vref: BTreeMap<(EndpointId, VRef), KRef>,
    /// Promise names a peer-kernel endpoint keeps after their notify: `(endpoint, vref) -> kref`.
    aliases: BTreeMap<(EndpointId, VRef), KRef>,
}

/// Read the c-list rows (`l/<ep u32>/k<kref 9 bytes>` and `l/<ep u32>/v<vref 10 bytes>`, as
/// `kernel-core`'s tables document them).
fn read_clists<S: Store>(store: &S, problems: &mut Vec<String>) -> RawCLists {
    let mut raw = RawCLists { kref_rows: BTreeMap::new(), by_vref: BTreeMap::new(), aliases: BTreeMap::new() };
    let rows = match scan_committed(store, b"l/") {
        Ok(rows) => rows,
        Err(e) => {
            problems.push(format!("cannot scan the c-lists: {e}"));
            return raw;
        }
    };
    for (key, value) in rows {
        let shown = key.escape_ascii().to_string();
        if key.len() < 8 || key[6] != b'/' {
            problems.push(format!("c-list key {shown} is malformed"));
            continue;
        }
        let ep = EndpointId(u32::from_be_bytes([key[2], key[3], key[4], key[5]]));
        let rest = &key[8..];
        match key[7] {
            b'k' => match (KRef::from_key_bytes(rest), postcard::from_bytes::<ClistEntry>(&value)) {
                (Some(k), Ok(entry)) if rest.len() == 9 => {
                    raw.kref_rows.insert((ep, k), entry);
                }
                (Some(_), Err(_)) if rest.len() == 9 => problems.push(format!("c-list row {shown} does not decode")),
                _ => problems.push(format!("c-list row {shown} has a malformed kref key")),
            },
            b'v' => match (VRef::from_key_bytes(rest), postcard::from_bytes::<KRef>(&value)) {
                (Some(v), Ok(k)) => {
                    raw.by_vref.insert((ep, v), k);
                }
                _ => problems.push(format!("c-list row {shown} does not decode")),
            },
            b'a' => match (VRef::from_key_bytes(rest), postcard::from_bytes::<KRef>(&value)) {
                (Some(v), Ok(k)) => {
                    raw.aliases.insert((ep, v), k);
                }
                _ => problems.push(format!("c-list alias row {shown} does not decode")),
            },
            _ => {} // other per-endpoint c-list rows, if any, are not checked here
        }
    }
    raw
}

/// Every way the kernel's tables disagree with each other (empty: consistent). Checks:
/// - each c-list entry has its reverse row, and the host API's c-lists are the stored rows;
/// - c-list krefs exist, their kinds match the vrefs', `o+N` names an object the endpoint owns
///   and `o-N` one it does not (or abandoned); a terminated endpoint has no c-list;
/// - objects are owned by known endpoints;
/// - an unresolved promise is decided by a live endpoint holding it in its c-list, or by the
///   kernel while exactly one queued message carries it as its result;
/// - every reference in the run queue, in promise queues and in settlements exists;
/// - every object's reachable and recognizable counts and every promise's reference count are
///   what [`recount`] finds from scratch, and no object is more reachable than recognizable.
pub fn check_tables<S: Store>(kernel: &Kernel<S>) -> Vec<String> {
    let mut problems = Vec::new();
    let (endpoints, objects, records, queue) = match (kernel.endpoints(), kernel.objects(), kernel.promise_records(), kernel.run_queue()) {
        (Ok(e), Ok(o), Ok(p), Ok(q)) => (e, o, p, q),
        _ => return vec!["the host API cannot read the tables".to_owned()],
    };
    let endpoints: BTreeMap<EndpointId, EndpointStatus> = endpoints.into_iter().map(|(ep, r)| (ep, r.status)).collect();
    let objects: BTreeMap<_, _> = objects.into_iter().collect();
    let records: BTreeMap<KPromiseId, PromiseRecord> = records.into_iter().collect();
    let promises: BTreeMap<KPromiseId, PromiseState> = records.iter().map(|(kp, r)| (*kp, r.state.clone())).collect();
    let exists = |k: &KRef| match k {
        KRef::Object(o) => objects.contains_key(o),
        KRef::Promise(p) => promises.contains_key(p),
    };

    // The c-lists, both ways: the kref side through the host API, the vref side from the store.
    let raw = read_clists(kernel.store(), &mut problems);
    let mut by_kref: BTreeMap<(EndpointId, KRef), VRef> = BTreeMap::new();
    for ep in endpoints.keys() {
        match kernel.clist(*ep) {
            Ok(entries) => by_kref.extend(entries.into_iter().map(|(k, v)| ((*ep, k), v))),
            Err(e) => problems.push(format!("{ep}: cannot read its c-list: {e}")),
        }
    }
    if by_kref.keys().ne(raw.kref_rows.keys()) {
        problems.push("the host API's c-lists differ from the stored kref rows".to_owned());
    }
    for ((ep, k), v) in &by_kref {
        match raw.by_vref.get(&(*ep, *v)) {
            Some(back) if back == k => {}
            Some(back) => problems.push(format!("{ep}: {k} -> {v} but {v} -> {back}")),
            None => problems.push(format!("{ep}: {k} -> {v} has no reverse row")),
        }
    }
    for ((ep, v), k) in &raw.by_vref {
        match by_kref.get(&(*ep, *k)) {
            Some(back) if back == v => {}
            Some(back) => problems.push(format!("{ep}: {v} -> {k} but {k} -> {back}")),
            None => problems.push(format!("{ep}: {v} -> {k} has no reverse row")),
        }
    }
    let mut held: BTreeSet<(EndpointId, KRef)> = BTreeSet::new();
    for ((ep, k), v) in &by_kref {
        held.insert((*ep, *k));
        let Some(status) = endpoints.get(ep) else {
            problems.push(format!("c-list of unknown endpoint {ep} holds {k}"));
            continue;
        };
        if matches!(status, EndpointStatus::Terminated { .. }) {
            problems.push(format!("terminated {ep} still has {k} <-> {v} in its c-list"));
        }
        if !exists(k) {
            problems.push(format!("{ep}'s c-list names {k} ({v}), which does not exist"));
        }
        if (v.kind == RefKind::Promise) != k.as_promise().is_some() {
            problems.push(format!("{ep}: {v} and {k} are of different kinds"));
        }
        if let (KRef::Object(o), RefKind::Object) = (k, v.kind) {
            if let Some(rec) = objects.get(o) {
                let own = rec.owner == *ep;
                match v.allocator {
                    Allocator::Endpoint if !own => problems.push(format!("{ep} exports {o} as {v} but {} owns it", rec.owner)),
                    // An object its owner abandoned may come back to it, as an import.
                    Allocator::Kernel if own && !rec.abandoned => problems.push(format!("{ep} imports its own object {o} as {v}")),
                    _ => {}
                }
            }
        }
    }
    for ((ep, v), k) in &raw.aliases {
        if !matches!(k, KRef::Promise(_)) || !exists(k) {
            problems.push(format!("{ep}'s alias {v} names {k}, which is not an existing promise"));
        }
        if !matches!(endpoints.get(ep), Some(EndpointStatus::Live)) {
            problems.push(format!("{ep} keeps alias {v} -> {k} but is not a live endpoint"));
        }
        if raw.by_vref.contains_key(&(*ep, *v)) {
            problems.push(format!("{ep}: {v} is both a c-list entry and an alias"));
        }
    }
    for (ep, _) in raw.kref_rows.keys() {
        if !endpoints.contains_key(ep) {
            problems.push(format!("the store holds c-list rows of unknown endpoint {ep}"));
        }
    }

    for (o, rec) in &objects {
        if !endpoints.contains_key(&rec.owner) {
            problems.push(format!("{o} is owned by unknown endpoint {}", rec.owner));
        }
    }

    // Messages in flight: on the run queue and queued on promises.
    let mut in_flight: BTreeMap<KPromiseId, usize> = BTreeMap::new();
    let mut check_message = |where_: &str, target: Option<&KRef>, m: &kernel_core::Message, problems: &mut Vec<String>| {
        for r in target.into_iter().chain(&m.args.slots) {
            if !exists(r) {
                problems.push(format!("{where_}: {}({}) names {r}, which does not exist", m.method, m.args.slots.len()));
            }
        }
        if let Some(kp) = m.result {
            *in_flight.entry(kp).or_default() += 1;
        }
    };
    for item in &queue {
        // Not a `match`: other kinds of item (GC) carry nothing checked here.
        if let RunQueueItem::Send { target, message } = item {
            check_message("run queue", Some(target), message, &mut problems);
        } else if let RunQueueItem::Notify { endpoint, promise } = item {
            if !endpoints.contains_key(endpoint) {
                problems.push(format!("run queue: notify for unknown endpoint {endpoint}"));
            }
            if !matches!(promises.get(promise), Some(PromiseState::Settled(_))) {
                problems.push(format!("run queue: notify {endpoint} of {promise}, which is not settled"));
            }
        }
    }
    for (kp, state) in &promises {
        match state {
            PromiseState::Unresolved { queue, .. } => {
                for m in queue {
                    check_message(&format!("queue of {kp}"), None, m, &mut problems);
                }
            }
            PromiseState::Settled(s) => {
                for r in &s.data().slots {
                    if !exists(r) {
                        problems.push(format!("{kp} settled to data naming {r}, which does not exist"));
                    }
                }
            }
        }
    }

    // Reference counts, recomputed from scratch.
    let mut counts = count(&objects, &raw.kref_rows, &queue, &promises);
    for k in raw.aliases.values() {
        counts.add(*k, true);
    }
    for (o, rec) in &objects {
        let (reachable, recognizable) = counts.objects.get(o).copied().unwrap_or((0, 0));
        if (rec.reachable, rec.recognizable) != (reachable, recognizable) {
            problems.push(format!(
                "{o} counts reachable {} recognizable {}, but {reachable} and {recognizable} references exist",
                rec.reachable, rec.recognizable
            ));
        }
        if rec.reachable > rec.recognizable {
            problems.push(format!("{o} is more reachable ({}) than recognizable ({})", rec.reachable, rec.recognizable));
        }
    }
    for (kp, rec) in &records {
        let refs = counts.promises.get(kp).copied().unwrap_or(0);
        if rec.refs != refs {
            problems.push(format!("{kp} counts {} references, but {refs} exist", rec.refs));
        }
    }

    // Deciders.
    for (kp, state) in &promises {
        let flying = in_flight.get(kp).copied().unwrap_or(0);
        match state {
            PromiseState::Unresolved { decider: None, .. } if flying != 1 => {
                problems.push(format!("{kp} is decided by the kernel but is the result of {flying} queued messages"))
            }
            PromiseState::Unresolved { decider: Some(d), .. } => {
                if flying != 0 {
                    problems.push(format!("{kp} is decided by {d} yet is the result of {flying} queued messages"));
                }
                if !matches!(endpoints.get(d), Some(EndpointStatus::Live)) {
                    problems.push(format!("{kp} is decided by {d}, which is not live"));
                }
                if !held.contains(&(*d, KRef::Promise(*kp))) {
                    problems.push(format!("{kp} is decided by {d}, whose c-list does not hold it"));
                }
            }
            PromiseState::Settled(_) if flying != 0 => {
                problems.push(format!("{kp} is settled yet is the result of {flying} queued messages"))
            }
            _ => {}
        }
    }
    problems
}

/// Reference counts recomputed from the tables, as DESIGN §6 and `kernel-core`'s records define
/// them: see [`recount`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Per object: `(reachable, recognizable)`.
    pub objects: BTreeMap<KObjectId, (u32, u32)>,
    /// Per promise: its references.
    pub promises: BTreeMap<KPromiseId, u32>,
    /// Per c-list entry: its reachable flag.
    pub flags: BTreeMap<(EndpointId, KRef), bool>,
}

impl Counts {
    fn add(&mut self, r: KRef, reachable: bool) {
        match r {
            KRef::Object(o) => {
                let c = self.objects.entry(o).or_default();
                c.1 += 1;
                if reachable {
                    c.0 += 1;
                }
            }
            KRef::Promise(p) => *self.promises.entry(p).or_default() += 1,
        }
    }

    fn add_message(&mut self, target: KRef, m: &Message) {
        self.add(target, true);
        for s in &m.args.slots {
            self.add(*s, true);
        }
        if let Some(r) = m.result {
            self.add(KRef::Promise(r), true);
        }
    }
}

/// Recompute every reference count from scratch: an importer's c-list entry counts toward its
/// object's recognizable count, and toward its reachable count if flagged reachable (an
/// exporter's own entry counts for nothing, until it abandons the object); every c-list entry of a promise counts one; every
/// queued message (on the run queue, or waiting on a promise: its target is that promise)
/// counts its target, its argument slots and its result as reachable; a queued `notify` counts
/// its promise; a settled promise's data counts each slot as reachable; a peer kernel's alias
/// (a promise name it keeps after the notify) counts its promise.
pub fn recount<S: Store>(kernel: &Kernel<S>) -> Result<Counts, String> {
    let err = |e: kernel_core::KernelError| format!("the host API cannot read the tables: {e}");
    let objects: BTreeMap<KObjectId, ObjectRecord> = kernel.objects().map_err(err)?.into_iter().collect();
    let promises: BTreeMap<KPromiseId, PromiseState> = kernel.promises().map_err(err)?.into_iter().collect();
    let queue = kernel.run_queue().map_err(err)?;
    let mut problems = Vec::new();
    let raw = read_clists(kernel.store(), &mut problems);
    if let Some(p) = problems.into_iter().next() {
        return Err(p);
    }
    let mut counts = count(&objects, &raw.kref_rows, &queue, &promises);
    for k in raw.aliases.values() {
        counts.add(*k, true);
    }
    Ok(counts)
}

fn count(
    objects: &BTreeMap<KObjectId, ObjectRecord>,
    clists: &BTreeMap<(EndpointId, KRef), ClistEntry>,
    queue: &[RunQueueItem],
    promises: &BTreeMap<KPromiseId, PromiseState>,
) -> Counts {
    // The endpoint whose own entry for an object counts for nothing: its exporter, until it
    // abandons the object (if handed it back after that, it imports it like anyone else).
    let exporters: BTreeMap<KObjectId, EndpointId> = objects.iter().filter(|(_, r)| !r.abandoned).map(|(o, r)| (*o, r.owner)).collect();
    let mut counts = Counts::default();
    for (&(ep, kref), entry) in clists {
        counts.flags.insert((ep, kref), entry.reachable);
        match kref {
            KRef::Object(o) if exporters.get(&o) == Some(&ep) => {}
            _ => counts.add(kref, entry.reachable),
        }
    }
    for item in queue {
        match item {
            RunQueueItem::Send { target, message } => counts.add_message(*target, message),
            RunQueueItem::Notify { promise, .. } => counts.add(KRef::Promise(*promise), true),
            RunQueueItem::Gc { .. } => {}
        }
    }
    for (kp, state) in promises {
        match state {
            PromiseState::Unresolved { queue, .. } => {
                for m in queue {
                    counts.add_message(KRef::Promise(*kp), m);
                }
            }
            PromiseState::Settled(s) => {
                for r in &s.data().slots {
                    counts.add(*r, true);
                }
            }
        }
    }
    counts
}
