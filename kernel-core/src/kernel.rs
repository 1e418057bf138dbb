//! The kernel: opens a store, runs cranks one at a time (DESIGN §4), and offers the host API
//! (queue a message, watch a result, inspect the tables).

use crate::crank::{CrankBuffer, CrankContext, Endpoint, KernelDelivery, Verdict, Work};
use crate::error::{Fault, KernelError};
use crate::gc::{self, GcAction};
use crate::ids::{CrankNumber, EndpointId, KObjectId, KPromiseId, KRef, VRef};
use crate::message::{CapData, Message, RunQueueItem, Settlement};
use crate::promise;
use crate::records::{HashMap as IdHashMap, Records, Scratch};
use crate::routing::{self, Route};
use crate::store::{Entry, Store, Turned};
use crate::tables::{
    self, ClistEntry, Counters, EndpointRecord, EndpointStatus, KernelTxn, ObjectRecord, PromiseRecord, PromiseState, TxnEnd, COUNTERS_KEY,
    FORMAT_KEY, FORMAT_VERSION,
};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Emitted after every committed crank: the one signal that lets the crank's outputs for remote
/// kernels leave the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitEvent {
    /// The crank that committed.
    pub crank: CrankNumber,
}

/// What a crank took off the run queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrankInput {
    /// A send, with the endpoint it was delivered to (`None`: the kernel routed it without a
    /// delivery: queued on a promise, or its result rejected).
    Send {
        /// The target as queued.
        target: KRef,
        /// The method.
        method: String,
        /// Who received it.
        delivered_to: Option<EndpointId>,
    },
    /// A notify for `endpoint` about `promise` (`delivered` is false if the endpoint was gone).
    Notify {
        /// The subscriber.
        endpoint: EndpointId,
        /// The settled promise.
        promise: KPromiseId,
        /// Whether a delivery happened.
        delivered: bool,
    },
    /// A garbage-collection delivery (`delivered` is false if it no longer applied).
    Gc {
        /// Who is told.
        endpoint: EndpointId,
        /// `dropExports`, `retireExports`, `retireImports` or `bringOutYourDead`.
        action: &'static str,
        /// Whether a delivery happened.
        delivered: bool,
    },
}

impl std::fmt::Display for CrankInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CrankInput::Send { target, method, delivered_to: Some(ep) } => write!(f, "{ep} <- {target}.{method}"),
            CrankInput::Send { target, method, delivered_to: None } => write!(f, "kernel routed {target}.{method}"),
            CrankInput::Notify { endpoint, promise, delivered: true } => write!(f, "{endpoint} <- notify {promise}"),
            CrankInput::Notify { endpoint, promise, delivered: false } => write!(f, "dropped notify {promise} for {endpoint}"),
            CrankInput::Gc { endpoint, action, delivered: true } => write!(f, "{endpoint} <- {action}"),
            CrankInput::Gc { endpoint, action, delivered: false } => write!(f, "skipped {action} for {endpoint}"),
        }
    }
}

/// How a crank ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrankOutcome {
    /// Everything the delivery did was committed.
    Committed,
    /// The delivery committed and the endpoint, having asked to exit, was terminated with it.
    Exited {
        /// Who exited.
        endpoint: EndpointId,
        /// Whether it exited reporting failure.
        failure: bool,
    },
    /// The delivery failed: nothing it did survived; the endpoint was terminated and the
    /// message's result rejected, in one committed step of their own.
    Aborted {
        /// The terminated endpoint.
        endpoint: EndpointId,
        /// Why.
        fault: Fault,
    },
}

/// The report of one crank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrankReport {
    /// Its number.
    pub crank: CrankNumber,
    /// What it took off the run queue.
    pub input: CrankInput,
    /// How it ended.
    pub outcome: CrankOutcome,
    /// How many sends and notifies it added to the run queue.
    pub flushed: usize,
    /// The commit event observers were given.
    pub commit: CommitEvent,
}

/// Totals from [`Kernel::run`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunSummary {
    /// Cranks run.
    pub cranks: u64,
    /// Cranks whose delivery aborted.
    pub aborted: u64,
    /// True if the run queue was empty when the run stopped.
    pub quiescent: bool,
}

/// How many decoded run-queue items the kernel keeps (a long queue is read from the store).
const QUEUED_BOUND: usize = 4096;

type Watcher = Box<dyn FnOnce(KPromiseId, &Settlement)>;
type Observer = Box<dyn FnMut(&CommitEvent)>;

/// What an open turn holds back until its batch is in the store: host callbacks and commit
/// events, in the order the commits made them.
enum Deferred {
    /// A commit settled a promise host watchers wait for.
    Settled(KPromiseId, Settlement),
    Commit(CommitEvent),
    /// [`Kernel::watch`] on a promise already settled: the callback runs at this point, after
    /// the commits before the call (not with the watchers of an earlier settlement).
    Watch(KPromiseId, Settlement, Watcher),
}

/// The kernel over a store `S`.
pub struct Kernel<S: Store> {
    /// The store, with the open turn's writes (if any) on top.
    store: Turned<S>,
    /// While a turn is open: the callbacks and commit events its commits owe (see
    /// [`Kernel::begin_turn`]).
    deferred: Option<Vec<Deferred>>,
    counters: Counters,
    /// Decoded committed records (see `records.rs`).
    cache: Records,
    /// The emptied maps of the last committed transaction, for the next.
    scratch: Option<Scratch>,
    /// Run-queue items committed by cranks, by sequence, as they were before encoding (at
    /// most [`QUEUED_BOUND`]): the crank that takes one off the queue does not read and decode
    /// it again. An item is here only while the store holds it; any it lacks, the store has.
    queued: IdHashMap<u64, RunQueueItem>,
    /// Whether an attached endpoint takes its notifies in the settling crank
    /// ([`Endpoint::notifies_in_crank`]); only then is `reach` kept.
    in_crank: bool,
    /// How many run-queue items may be delivered where (see [`Reach`]), counted while
    /// `reach_known`: since the kernel last saw the queue empty, every item queued and taken has
    /// been counted. A notify is taken in the settling crank only if nothing queued ahead of it
    /// may reach its endpoint (DESIGN §10.2: outputs reach their endpoint in order).
    reach: HashMap<Reach, u64>,
    reach_known: bool,
    endpoints: Vec<Option<Box<dyn Endpoint>>>,
    watchers: HashMap<KPromiseId, Vec<Watcher>>,
    observers: Vec<Observer>,
}

impl<S: Store> Kernel<S> {
    /// Open a kernel on `store`: a new store is initialised; an existing one must carry this
    /// kernel's format and resumes at its last committed crank.
    pub fn open(mut store: S) -> Result<Self, KernelError> {
        let cache = Records::default();
        let counters = load_counters(&store, &cache)?;
        let counters = match counters {
            Some(c) => c,
            None => {
                let mut db =
                    KernelTxn::begin(&store, &cache, Counters { next_object: 1, next_promise: 1, next_endpoint: 1, ..Counters::default() });
                db.set_raw(FORMAT_KEY, FORMAT_VERSION.to_be_bytes().to_vec());
                db.set_raw(COUNTERS_KEY, tables::encode(&db.counters));
                let end = db.finish();
                store.apply(end.batch)?;
                end.counters
            }
        };
        Ok(Kernel {
            store: Turned::new(store),
            deferred: None,
            counters,
            cache,
            scratch: None,
            queued: IdHashMap::default(),
            in_crank: false,
            reach: HashMap::new(),
            // Set when an endpoint that takes notifies in the crank is attached.
            reach_known: false,
            endpoints: Vec::new(),
            watchers: HashMap::new(),
            observers: Vec::new(),
        })
    }

    /// The store, for inspection. While a turn is open it lacks the turn's writes.
    pub fn store(&self) -> &S {
        &self.store.inner
    }

    /// Close the kernel, giving back its store. An open turn is dropped, as a crash would
    /// drop it: end it first to keep it.
    pub fn into_store(self) -> S {
        self.store.inner
    }

    /// Open a turn (nothing if one is open). Until [`Kernel::end_turn`], every commit — of a
    /// crank, an immediate-path call, an [`Kernel::apply_external`] — is kept in memory over the
    /// store, where later cranks read it, and its commit event and host callbacks
    /// ([`Kernel::watch`]) are held back. Each crank is still atomic: one that fails inside a
    /// turn leaves nothing behind, and the cranks before it keep their effects.
    ///
    /// A turn lets several cranks share one store write (under sync durability, one
    /// `fdatasync`) without reporting anything before that write: the commit events, which
    /// let output leave the machine, come only once the whole turn is in the store.
    pub fn begin_turn(&mut self) {
        self.store.open();
        if self.deferred.is_none() {
            self.deferred = Some(Vec::new());
        }
    }

    /// True while a turn is open.
    pub fn in_turn(&self) -> bool {
        self.store.is_open()
    }

    /// True if the open turn has committed something the store has not seen yet.
    pub fn turn_pending(&self) -> bool {
        self.store.has_pending()
    }

    /// End the open turn (nothing if none is open): apply everything it committed to the
    /// store as one atomic batch, then run the host callbacks and emit the commit events it
    /// held back, in commit order.
    ///
    /// If the store refuses the batch, nothing of the turn survives: the kernel goes back to
    /// the store's state (the run-queue items the turn's cranks took are queued again, the
    /// promises they settled are unsettled, and their watchers still wait; a watcher of a
    /// promise the turn made is dropped, and a watch of a promise the store holds settled runs
    /// now), and the error is returned.
    pub fn end_turn(&mut self) -> Result<(), KernelError> {
        let Some(batch) = self.store.close() else { return Ok(()) };
        let deferred = self.deferred.take().unwrap_or_default();
        if !batch.is_empty() {
            if let Err(e) = self.store.inner.apply(batch) {
                self.reload()?;
                self.rewatch(deferred)?;
                return Err(e.into());
            }
        }
        for d in deferred {
            match d {
                Deferred::Settled(kp, s) => fire(&mut self.watchers, kp, &s),
                Deferred::Watch(kp, s, callback) => callback(kp, &s),
                Deferred::Commit(event) => {
                    for o in &mut self.observers {
                        o(&event);
                    }
                }
            }
        }
        Ok(())
    }

    /// After a refused turn: the watchers stay, as if registered on the store's state. A watcher
    /// of a promise the turn made is dropped (the promise is gone, and its number will be used
    /// again); a watch the turn held back runs now if the store holds its promise settled, and
    /// waits if it holds it unresolved.
    fn rewatch(&mut self, deferred: Vec<Deferred>) -> Result<(), KernelError> {
        let mut gone = Vec::new();
        for kp in self.watchers.keys() {
            if self.read().promise(*kp)?.is_none() {
                gone.push(*kp);
            }
        }
        for kp in gone {
            self.watchers.remove(&kp);
        }
        for d in deferred {
            if let Deferred::Watch(kp, _, callback) = d {
                match self.read().promise(kp)? {
                    Some(PromiseState::Settled(s)) => callback(kp, &s),
                    Some(PromiseState::Unresolved { .. }) => self.watchers.entry(kp).or_default().push(callback),
                    None => {}
                }
            }
        }
        Ok(())
    }

    /// Forget everything held in memory about committed state and read it again from the store.
    fn reload(&mut self) -> Result<(), KernelError> {
        self.cache = Records::default();
        self.scratch = None;
        self.queued.clear();
        if let Some(c) = load_counters(&self.store, &self.cache)? {
            self.counters = c;
        }
        self.reach.clear();
        self.reach_known = self.queue_len() == 0;
        Ok(())
    }

    /// Cranks committed over the store's life.
    pub fn cranks(&self) -> CrankNumber {
        CrankNumber(self.counters.cranks)
    }

    fn read(&self) -> KernelTxn<'_> {
        KernelTxn::begin(&self.store, &self.cache, self.counters)
    }

    /// Register an endpoint named `name` with its implementation, or re-attach the
    /// implementation of the endpoint already recorded under that name (after a restart).
    /// A new endpoint gets a pinned root object, `o+0` in its c-list. Immediate path.
    pub fn add_endpoint(&mut self, name: &str, endpoint: Box<dyn Endpoint>) -> Result<EndpointId, KernelError> {
        if name.is_empty() {
            return Err(KernelError::Refused("an endpoint name may not be empty".into()));
        }
        let existing = self.read().endpoint_by_name(name)?;
        let ep = match existing {
            Some(ep) => {
                if self.endpoints.get(ep.0 as usize).is_some_and(Option::is_some) {
                    return Err(KernelError::Refused(format!("endpoint {name:?} is already attached as {ep}")));
                }
                ep
            }
            None => {
                let mut db = self.read();
                let (ep, _root) = db.new_endpoint(name);
                let finished = db.finish();
                self.apply_immediate(finished)?;
                ep
            }
        };
        let i = ep.0 as usize;
        if self.endpoints.len() <= i {
            self.endpoints.resize_with(i + 1, || None);
        }
        if endpoint.notifies_in_crank() && !self.in_crank {
            // From now on the queue is counted; what it holds already, once it has emptied.
            self.in_crank = true;
            self.reach.clear();
            self.reach_known = self.queue_len() == 0;
        }
        self.endpoints[i] = Some(endpoint);
        Ok(ep)
    }

    /// The endpoint recorded under `name`.
    pub fn endpoint_id(&self, name: &str) -> Result<Option<EndpointId>, KernelError> {
        self.read().endpoint_by_name(name)
    }

    /// The root object (`o+0`) of `ep`, also after `ep` was terminated (messages to it are then
    /// rejected).
    pub fn root(&self, ep: EndpointId) -> Result<KObjectId, KernelError> {
        self.read().endpoint_root(ep)?.ok_or(KernelError::UnknownEndpoint(ep))
    }

    /// Queue `target.method(args)` from the host, with a fresh result promise (immediate path:
    /// committed before this returns). Every reference must exist.
    pub fn queue_message(&mut self, target: KRef, method: &str, args: CapData) -> Result<KPromiseId, KernelError> {
        self.queue(target, method, args, |db| {
            let kp = db.new_promise(None);
            db.pin(KRef::Promise(kp), true)?;
            Ok((Some(kp), kp))
        })
    }

    /// Queue `target.method(args)` from the host as a one-way message: no result promise, so
    /// nothing to settle, watch or collect (immediate path: committed before this returns). A
    /// delivery of it that fails is still that crank's failure, reported by [`Kernel::step`].
    /// Every reference must exist.
    pub fn queue_send_only(&mut self, target: KRef, method: &str, args: CapData) -> Result<(), KernelError> {
        self.queue(target, method, args, |_| Ok((None, ())))
    }

    /// Queue `target.method(args)` like [`Kernel::queue_message`], and call `callback` with the
    /// result's settlement once the crank that settles it commits, as [`Kernel::watch`] would.
    /// The result is not pinned: once settled and no longer referenced it is collected, so the
    /// host has nothing to release. For a host that wants each answer once, this is one
    /// immediate-path transaction per message where `queue_message`, `watch` and
    /// `set_pinned(.., false)` take two. The callback is host memory: after a restart the answer
    /// is not kept for anyone (use `queue_message` to read it then).
    pub fn queue_message_then(
        &mut self,
        target: KRef,
        method: &str,
        args: CapData,
        callback: impl FnOnce(KPromiseId, &Settlement) + 'static,
    ) -> Result<KPromiseId, KernelError> {
        let kp = self.queue(target, method, args, |db| {
            let kp = db.new_promise(None);
            Ok((Some(kp), kp))
        })?;
        self.watchers.entry(kp).or_default().push(Box::new(callback));
        Ok(kp)
    }

    /// Queue a host message; `result` makes its result promise, if it has one, in the same
    /// transaction, and says what to return.
    fn queue<R>(
        &mut self,
        target: KRef,
        method: &str,
        args: CapData,
        result: impl FnOnce(&mut KernelTxn<'_>) -> Result<(Option<KPromiseId>, R), KernelError>,
    ) -> Result<R, KernelError> {
        let mut db = self.read();
        for r in std::iter::once(&target).chain(args.slots.iter()) {
            if !db.exists(*r)? {
                return Err(KernelError::UnknownRef(*r));
            }
        }
        let (kp, out) = result(&mut db)?;
        let message = Message { method: method.to_owned(), args, result: kp };
        gc::add_message_refs(&mut db, target, &message)?;
        let item = RunQueueItem::Send { target, message };
        db.push_run_queue(&item);
        let finished = db.finish();
        self.apply_immediate(finished)?;
        self.count_queued(std::slice::from_ref(&item));
        Ok(out)
    }

    /// Pin `kref` so it is never collected (the host holds it), or unpin it. The results of
    /// `queue_message` start pinned; unpin them when their settlement has been read. Vat roots
    /// are pinned for good: unpinning one is refused. Immediate path; unpinning may queue GC
    /// deliveries.
    pub fn set_pinned(&mut self, kref: KRef, pinned: bool) -> Result<(), KernelError> {
        let mut work = Work { db: self.read(), buf: CrankBuffer::default() };
        if !work.db.exists(kref)? {
            return Err(KernelError::UnknownRef(kref));
        }
        if let (KRef::Object(o), false) = (kref, pinned) {
            if let Some(owner) = work.db.object(o)?.map(|r| r.owner) {
                if work.db.endpoint_root(owner)? == Some(o) {
                    return Err(KernelError::Refused(format!("{o} is the root of {owner}: vat roots stay pinned")));
                }
            }
        }
        work.db.pin(kref, pinned)?;
        let done = close(work, &self.watchers)?;
        self.apply_finished(done)?;
        Ok(())
    }

    /// Queue a `bringOutYourDead` delivery for `ep`, asking it to drop the imports it no longer
    /// uses (immediate path).
    pub fn reap(&mut self, ep: EndpointId) -> Result<(), KernelError> {
        let mut db = self.read();
        if db.endpoint_status(ep)?.is_none() {
            return Err(KernelError::UnknownEndpoint(ep));
        }
        let item = RunQueueItem::Gc { endpoint: ep, action: GcAction::BringOutYourDead };
        db.push_run_queue(&item);
        let finished = db.finish();
        self.apply_immediate(finished)?;
        self.count_queued(std::slice::from_ref(&item));
        Ok(())
    }

    /// Count committed run-queue items by where they may be delivered (see `reach`). The items
    /// are committed already: if reading where one goes fails, the counts are dropped (and
    /// trusted again once the queue has emptied) rather than the commit reported as failed.
    fn count_queued(&mut self, items: &[RunQueueItem]) {
        if !self.in_crank || !self.reach_known || items.is_empty() {
            return;
        }
        let reaches = {
            let db = self.read();
            items.iter().map(|item| reach_of(&db, item)).collect::<Result<Vec<_>, _>>()
        };
        match reaches {
            Ok(reaches) => {
                for r in reaches {
                    *self.reach.entry(r).or_default() += 1;
                }
            }
            Err(_) => {
                self.reach.clear();
                self.reach_known = false;
            }
        }
    }

    /// A crank that took an item reaching `taken` off the queue committed.
    fn count_taken(&mut self, taken: Option<Reach>) {
        if let (Some(r), true) = (taken, self.reach_known) {
            if let Some(n) = self.reach.get_mut(&r) {
                *n = n.saturating_sub(1);
            }
        }
        if self.in_crank && self.queue_len() == 0 {
            self.reach.clear();
            self.reach_known = true;
        }
    }

    /// Run `callback` once `kp` settles, after the crank that settles it commits (at once if it
    /// already has; inside a turn, when the turn ends). Callbacks are host memory: they do not
    /// survive a restart.
    pub fn watch(&mut self, kp: KPromiseId, callback: impl FnOnce(KPromiseId, &Settlement) + 'static) -> Result<(), KernelError> {
        match self.read().promise(kp)? {
            None => Err(KernelError::UnknownRef(KRef::Promise(kp))),
            Some(PromiseState::Settled(s)) => {
                match &mut self.deferred {
                    // Settled, perhaps only within the open turn: called when the turn ends.
                    Some(d) => d.push(Deferred::Watch(kp, s, Box::new(callback))),
                    None => callback(kp, &s),
                }
                Ok(())
            }
            Some(PromiseState::Unresolved { .. }) => {
                self.watchers.entry(kp).or_default().push(Box::new(callback));
                Ok(())
            }
        }
    }

    /// Call `observer` with every commit event from now on.
    pub fn add_commit_observer(&mut self, observer: impl FnMut(&CommitEvent) + 'static) {
        self.observers.push(Box::new(observer));
    }

    /// How `kp` settled, or `None` while unresolved.
    pub fn settlement(&self, kp: KPromiseId) -> Result<Option<Settlement>, KernelError> {
        match self.read().promise(kp)? {
            None => Err(KernelError::UnknownRef(KRef::Promise(kp))),
            Some(PromiseState::Settled(s)) => Ok(Some(s)),
            Some(PromiseState::Unresolved { .. }) => Ok(None),
        }
    }

    /// A promise's full state.
    pub fn promise(&self, kp: KPromiseId) -> Result<Option<PromiseState>, KernelError> {
        self.read().promise(kp)
    }

    /// An object's record.
    pub fn object(&self, ko: KObjectId) -> Result<Option<ObjectRecord>, KernelError> {
        self.read().object(ko)
    }

    /// Every promise, by number.
    pub fn promises(&self) -> Result<Vec<(KPromiseId, PromiseState)>, KernelError> {
        Ok(self.promise_records()?.into_iter().map(|(kp, r)| (kp, r.state)).collect())
    }

    /// Every promise with its reference count and pin, by number.
    pub fn promise_records(&self) -> Result<Vec<(KPromiseId, PromiseRecord)>, KernelError> {
        Ok(self.read().numbered("promise", tables::PROMISE_PREFIX)?.into_iter().map(|(n, r)| (KPromiseId(n), r)).collect())
    }

    /// Every object, by number.
    pub fn objects(&self) -> Result<Vec<(KObjectId, ObjectRecord)>, KernelError> {
        Ok(self.read().numbered("object", tables::OBJECT_PREFIX)?.into_iter().map(|(n, s)| (KObjectId(n), s)).collect())
    }

    /// Every endpoint record, by id.
    pub fn endpoints(&self) -> Result<Vec<(EndpointId, EndpointRecord)>, KernelError> {
        let db = self.read();
        (1..self.counters.next_endpoint)
            .map(EndpointId)
            .filter_map(|ep| db.endpoint(ep).transpose().map(|r| r.map(|rec| (ep, rec))))
            .collect()
    }

    /// An endpoint's record.
    pub fn endpoint(&self, ep: EndpointId) -> Result<Option<EndpointRecord>, KernelError> {
        self.read().endpoint(ep)
    }

    /// The run queue, in order.
    pub fn run_queue(&self) -> Result<Vec<RunQueueItem>, KernelError> {
        self.read().run_queue()
    }

    /// How many items are queued.
    pub fn queue_len(&self) -> u64 {
        self.counters.queue_tail - self.counters.queue_head
    }

    /// `ep`'s c-list, ordered by kref.
    pub fn clist(&self, ep: EndpointId) -> Result<Vec<(KRef, VRef)>, KernelError> {
        self.read().clist_entries(ep)
    }

    /// `ep`'s c-list entry for `kref`, with its reachable flag (`None`: `ep` does not hold it).
    pub fn clist_entry(&self, ep: EndpointId, kref: KRef) -> Result<Option<ClistEntry>, KernelError> {
        self.read().clist_entry(ep, kref)
    }

    /// The promise names peer-kernel endpoint `ep` keeps after their notify, as `(vref, kref)`
    /// (see [`Endpoint::is_peer_kernel`]); each counts one reference.
    pub fn aliases(&self, ep: EndpointId) -> Result<Vec<(VRef, KRef)>, KernelError> {
        self.read().aliases(ep)
    }

    /// `ep`'s vatstore.
    pub fn vatstore(&self, ep: EndpointId) -> Result<Vec<Entry>, KernelError> {
        self.read().vatstore_entries(ep)
    }

    fn apply_immediate(&mut self, end: TxnEnd) -> Result<(), KernelError> {
        let born = end.born();
        let TxnEnd { batch, counters, mut dirty, mut fetched, .. } = end;
        self.store.apply(batch)?;
        self.counters = counters;
        self.cache.absorb_commit(&mut fetched, &mut dirty, born);
        // A crank's lists are handed back by `apply_finished`.
        self.scratch = Some(Scratch { dirty, fetched, maybe_free: Vec::new(), outputs: Vec::new(), settled: Vec::new() });
        Ok(())
    }

    /// Run cranks until the run queue is empty or `max_cranks` have run.
    pub fn run(&mut self, max_cranks: Option<u64>) -> Result<RunSummary, KernelError> {
        let mut summary = RunSummary::default();
        loop {
            if max_cranks.is_some_and(|m| summary.cranks >= m) {
                summary.quiescent = self.queue_len() == 0;
                return Ok(summary);
            }
            match self.step()? {
                None => {
                    summary.quiescent = true;
                    return Ok(summary);
                }
                Some(report) => {
                    summary.cranks += 1;
                    if matches!(report.outcome, CrankOutcome::Aborted { .. }) {
                        summary.aborted += 1;
                    }
                }
            }
        }
    }

    /// Run one crank: take the next run-queue item, route it, deliver it, and commit or abort.
    /// Returns `None` if the queue is empty. On `Err` the crank left nothing behind.
    pub fn step(&mut self) -> Result<Option<CrankReport>, KernelError> {
        if self.queue_len() == 0 {
            return Ok(None);
        }
        // The item leaves the decoded queue whatever becomes of this crank: should it not
        // commit, the store still has it.
        let decoded = self.queued.remove(&self.counters.queue_head);
        // In the maps the last committed transaction left.
        let mut work = begin_work(&self.store, &self.cache, self.counters, self.scratch.take());
        let Some(item) = work.db.pop_run_queue(decoded)? else {
            return Ok(None);
        };
        let taken = if self.in_crank { Some(reach_of(&work.db, &item)?) } else { None };
        let queue = QueueReach { known: self.in_crank && self.reach_known, counts: &self.reach, taken };
        work.db.counters.cranks += 1;
        let crank = CrankNumber(work.db.counters.cranks);
        let (input, delivery) = match item {
            RunQueueItem::Send { target, message } => {
                let method = message.method.clone();
                match routing::route(&mut work, target, message)? {
                    Route::Done => (CrankInput::Send { target, method, delivered_to: None }, None),
                    Route::Deliver { endpoint, target: obj, message } => {
                        if let Some(kp) = message.result {
                            set_decider(&mut work, kp, endpoint)?;
                        }
                        // The message's references pass to the receiver's c-list as it imports
                        // them; counts that touch zero meanwhile are checked again at the end.
                        gc::remove_message_refs(&mut work.db, KRef::Object(obj), &message)?;
                        let d = Delivery::Kernel(KernelDelivery::Message { target: obj, message });
                        (CrankInput::Send { target, method, delivered_to: Some(endpoint) }, Some((endpoint, d)))
                    }
                }
            }
            RunQueueItem::Notify { endpoint, promise: kp } => match take_notify(&mut work, endpoint, kp)? {
                Some(resolutions) => {
                    let d = Delivery::Kernel(KernelDelivery::Notify { resolutions });
                    (CrankInput::Notify { endpoint, promise: kp, delivered: true }, Some((endpoint, d)))
                }
                None => (CrankInput::Notify { endpoint, promise: kp, delivered: false }, None),
            },
            RunQueueItem::Gc { endpoint, action } => {
                let name = action.name();
                let applies = if work.db.is_live(endpoint)? { gc::still_applies(&work.db, endpoint, action)? } else { None };
                match applies {
                    Some(action) => (CrankInput::Gc { endpoint, action: name, delivered: true }, Some((endpoint, Delivery::Gc(action)))),
                    None => (CrankInput::Gc { endpoint, action: name, delivered: false }, None),
                }
            }
        };
        let Some((endpoint, delivery)) = delivery else {
            let work = if self.in_crank { notify_in_crank(work, &mut self.endpoints, &queue)? } else { work };
            let done = close(work, &self.watchers)?;
            let flushed = self.commit(done, crank)?;
            self.count_taken(taken);
            return Ok(Some(CrankReport { crank, input, outcome: CrankOutcome::Committed, flushed, commit: CommitEvent { crank } }));
        };
        let notified: Vec<KPromiseId> = match &delivery {
            Delivery::Kernel(KernelDelivery::Notify { resolutions }) => resolutions.iter().map(|(kp, _)| *kp).collect(),
            _ => Vec::new(),
        };
        let gc_action = match &delivery {
            Delivery::Gc(a) => Some(a.clone()),
            Delivery::Kernel(_) => None,
        };
        let result = match &delivery {
            Delivery::Kernel(KernelDelivery::Message { message, .. }) => message.result,
            _ => None,
        };
        let Some(Some(imp)) = self.endpoints.get_mut(endpoint.0 as usize) else {
            let name = work.db.endpoint(endpoint)?.map(|r| r.name).unwrap_or_default();
            return Err(KernelError::NotAttached(endpoint, name));
        };
        let peer = imp.is_peer_kernel();
        // On a kernel error the transaction is dropped; the item stays queued.
        let (mut work, exit) = deliver(work, imp.as_mut(), endpoint, delivery)?;
        match exit {
            Ok(exit) => {
                if let Some(kp) = result {
                    // A decider always holds its promise in its c-list (an endpoint that never
                    // translated its result gets it now), so its termination finds it and
                    // collection never takes it while it is undecided.
                    if work.db.promise_decider(kp)? == Some(endpoint) {
                        work.db.import(endpoint, KRef::Promise(kp))?;
                    }
                }
                after_notify(&mut work.db, endpoint, peer, &notified)?;
                if let Some(action) = &gc_action {
                    gc::after_delivery(&mut work.db, endpoint, action)?;
                }
                let outcome = match exit {
                    Some((failure, info)) => {
                        let why = if failure { "exited with failure" } else { "exited" };
                        terminate(&mut work, endpoint, why, info)?;
                        CrankOutcome::Exited { endpoint, failure }
                    }
                    None => CrankOutcome::Committed,
                };
                let work = if self.in_crank { notify_in_crank(work, &mut self.endpoints, &queue)? } else { work };
                let done = close(work, &self.watchers)?;
                let flushed = self.commit(done, crank)?;
                self.count_taken(taken);
                Ok(Some(CrankReport { crank, input, outcome, flushed, commit: CommitEvent { crank } }))
            }
            Err(fault) => {
                // Abort: drop the delivery's transaction and buffer, then commit the consequence
                // alone: the item is consumed, the endpoint terminated, the result rejected.
                drop(work);
                let mut work = Work { db: KernelTxn::begin(&self.store, &self.cache, self.counters), buf: CrankBuffer::default() };
                let consumed = work.db.pop_run_queue(None)?;
                work.db.counters.cranks += 1;
                let reason = fault.to_string();
                terminate(&mut work, endpoint, &reason, CapData::error(&format!("vat terminated: {reason}")))?;
                match consumed {
                    Some(RunQueueItem::Send { target, message }) => {
                        if let Some(kp) = message.result {
                            promise::reject(&mut work, kp, CapData::error(&format!("delivery failed: {reason}")))?;
                        }
                        gc::remove_message_refs(&mut work.db, target, &message)?;
                    }
                    Some(RunQueueItem::Notify { promise: kp, .. }) => work.db.decref(KRef::Promise(kp), true)?,
                    Some(RunQueueItem::Gc { .. }) | None => {}
                }
                let done = close(work, &self.watchers)?;
                let flushed = self.commit(done, crank)?;
                self.count_taken(taken);
                Ok(Some(CrankReport {
                    crank,
                    input,
                    outcome: CrankOutcome::Aborted { endpoint, fault },
                    flushed,
                    commit: CommitEvent { crank },
                }))
            }
        }
    }

    /// Commit: the transaction and the flushed buffer as one atomic batch, then deferred host
    /// callbacks, then the commit event.
    fn commit(&mut self, done: Finished, crank: CrankNumber) -> Result<usize, KernelError> {
        let flushed = self.apply_finished(done)?;
        let event = CommitEvent { crank };
        match &mut self.deferred {
            Some(d) => d.push(Deferred::Commit(event)),
            None => {
                for o in &mut self.observers {
                    o(&event);
                }
            }
        }
        Ok(flushed)
    }

    /// Write a finished transaction, then run the host callbacks of the promises it settled.
    fn apply_finished(&mut self, done: Finished) -> Result<usize, KernelError> {
        let Finished { end, mut queued, first_queued, watched, flushed, maybe_free, settled } = done;
        self.apply_immediate(end)?;
        self.count_queued(&queued);
        for (seq, item) in (first_queued..).zip(queued.drain(..)) {
            if self.queued.len() >= QUEUED_BOUND {
                break;
            }
            self.queued.insert(seq, item);
        }
        if let Some(scratch) = &mut self.scratch {
            queued.clear();
            scratch.outputs = queued;
            scratch.maybe_free = maybe_free;
            scratch.settled = settled;
        }
        for (kp, s) in watched {
            match &mut self.deferred {
                Some(d) => d.push(Deferred::Settled(kp, s)),
                None => fire(&mut self.watchers, kp, &s),
            }
        }
        Ok(flushed)
    }

    /// Apply work that arrives from outside any crank on behalf of endpoint `ep` (a message
    /// from a remote kernel) on the immediate path: `f` gets the same context a delivery gets,
    /// and what it does commits at once as one transaction, its sends and notifies flushed to the
    /// run queue. Being `&mut self`, it can never run inside a crank.
    ///
    /// If `f` returns a fault or makes an illegal syscall (or asks to exit), nothing is applied
    /// and the fault is returned as `Ok(Err(fault))`; the endpoint is not terminated — the
    /// caller decides what a bad inbound message means (e.g. closing the connection).
    pub fn apply_external<T>(
        &mut self,
        ep: EndpointId,
        f: impl FnOnce(&mut CrankContext<'_>) -> Result<T, Fault>,
    ) -> Result<Result<T, Fault>, KernelError> {
        if !self.read().is_live(ep)? {
            return Ok(Err(Fault::IllegalSyscall(format!("{ep} is not a live endpoint"))));
        }
        let work = begin_work(&self.store, &self.cache, self.counters, self.scratch.take());
        let peer = self.endpoints.get(ep.0 as usize).and_then(Option::as_ref).is_some_and(|e| e.is_peer_kernel());
        let mut ctx = CrankContext::new(work, ep, peer);
        let returned = f(&mut ctx);
        let (work, verdict, kernel_error) = ctx.into_parts();
        if let Some(e) = kernel_error {
            return Err(e);
        }
        match (verdict, returned) {
            (Some(Verdict::Illegal(reason)), _) => Ok(Err(Fault::IllegalSyscall(reason))),
            (Some(Verdict::Exit { .. }), _) => Ok(Err(Fault::IllegalSyscall("exit outside a delivery".into()))),
            (None, Err(fault)) => Ok(Err(fault)),
            (None, Ok(value)) => {
                let done = close(work, &self.watchers)?;
                self.apply_finished(done)?;
                Ok(Ok(value))
            }
        }
    }
}

/// Run and forget the host callbacks waiting for `kp`.
fn fire(watchers: &mut HashMap<KPromiseId, Vec<Watcher>>, kp: KPromiseId, s: &Settlement) {
    if let Some(callbacks) = watchers.remove(&kp) {
        for cb in callbacks {
            cb(kp, s);
        }
    }
}

/// The counters a store holds: `None` for a new store, an error for another format.
fn load_counters(store: &dyn Store, cache: &Records) -> Result<Option<Counters>, KernelError> {
    let db = KernelTxn::begin(store, cache, Counters::default());
    match db.get_raw(FORMAT_KEY)? {
        None => Ok(None),
        Some(bytes) => {
            let found = <[u8; 4]>::try_from(bytes.as_slice()).ok().map(u32::from_be_bytes);
            if found != Some(FORMAT_VERSION) {
                return Err(KernelError::UnsupportedFormat { found, supported: FORMAT_VERSION });
            }
            let raw = db.get_raw(COUNTERS_KEY)?.ok_or_else(|| KernelError::Corrupt {
                table: "counters",
                key: String::from_utf8_lossy(COUNTERS_KEY).into_owned(),
                reason: "missing".into(),
            })?;
            Ok(Some(tables::decode::<Counters>("counters", COUNTERS_KEY, &raw)?))
        }
    }
}

/// What a crank hands its endpoint.
enum Delivery {
    Kernel(KernelDelivery),
    Gc(GcAction),
}

/// A crank's transaction closed, with its buffer flushed into the same batch.
struct Finished {
    end: TxnEnd,
    /// The run-queue items it queued, the first under sequence `first_queued`.
    queued: Vec<RunQueueItem>,
    first_queued: u64,
    /// The settlements of the promises it settled that host watchers wait for.
    watched: Vec<(KPromiseId, Settlement)>,
    flushed: usize,
    /// The transaction's emptied `maybe_free` and the crank's emptied settled list, for the
    /// next crank to fill.
    maybe_free: Vec<KRef>,
    settled: Vec<KPromiseId>,
}

/// End a transaction: note the settlements host watchers wait for (read first: collection may
/// delete a promise the same transaction settled), collect, then flush the buffer into the
/// transaction (so the run-queue writes commit atomically with the rest) and close it.
fn close(mut work: Work<'_>, watchers: &HashMap<KPromiseId, Vec<Watcher>>) -> Result<Finished, KernelError> {
    let mut watched = Vec::new();
    if !watchers.is_empty() {
        for kp in &work.buf.settled {
            if watchers.contains_key(kp) {
                if let Some(PromiseState::Settled(s)) = work.db.promise(*kp)? {
                    watched.push((*kp, s));
                }
            }
        }
    }
    gc::collect(&mut work)?;
    let Work { mut db, buf } = work;
    let flushed = buf.outputs.len();
    let first_queued = db.counters.queue_tail;
    for item in &buf.outputs {
        db.push_run_queue(item);
    }
    // Collection emptied it; its room goes back to the kernel with the settled list's.
    let maybe_free = std::mem::take(&mut db.maybe_free);
    let mut settled = buf.settled;
    settled.clear();
    Ok(Finished { end: db.finish(), queued: buf.outputs, first_queued, watched, flushed, maybe_free, settled })
}

/// Deliver, inside this crank, the notifies it queued for endpoints that take them so
/// ([`Endpoint::notifies_in_crank`]), in the order they were queued (and any such notify one of
/// those deliveries queues in turn), as a crank of their own would: the queue item's reference
/// released, nothing for an endpoint that is gone or no longer holds the promise, the notified
/// promises leaving the endpoint's c-list (kept as aliases for a peer kernel) afterwards.
fn notify_in_crank<'s>(
    mut work: Work<'s>,
    endpoints: &mut [Option<Box<dyn Endpoint>>],
    queue: &QueueReach<'_>,
) -> Result<Work<'s>, KernelError> {
    // Where the outputs passed over so far (left queued, ahead of later ones) may reach.
    let (mut reached, mut anyone) = (Vec::<EndpointId>::new(), false);
    let mut i = 0;
    while i < work.buf.outputs.len() {
        let candidate = match &work.buf.outputs[i] {
            RunQueueItem::Notify { endpoint, promise } => Some((*endpoint, *promise)),
            _ => None,
        };
        // Only if nothing queued ahead of it, by earlier cranks or earlier in this one, may
        // reach the endpoint: otherwise it waits its turn in the run queue.
        let take = candidate.filter(|(endpoint, _)| !anyone && !reached.contains(endpoint) && !queue.may_reach(*endpoint));
        let imp = take.and_then(|(endpoint, _)| endpoints.get_mut(endpoint.0 as usize)?.as_mut().filter(|e| e.notifies_in_crank()));
        let (Some((endpoint, kp)), Some(imp)) = (take, imp) else {
            match reach_of(&work.db, &work.buf.outputs[i])? {
                Reach::To(ep) if !reached.contains(&ep) => reached.push(ep),
                Reach::Anyone => anyone = true,
                _ => {}
            }
            i += 1;
            continue;
        };
        work.buf.outputs.remove(i);
        let Some(resolutions) = take_notify(&mut work, endpoint, kp)? else { continue };
        let notified: Vec<KPromiseId> = resolutions.iter().map(|(kp, _)| *kp).collect();
        let peer = imp.is_peer_kernel();
        let (back, exit) = deliver(work, imp.as_mut(), endpoint, Delivery::Kernel(KernelDelivery::Notify { resolutions }))?;
        work = back;
        let failure = match exit {
            Ok(None) => None,
            Ok(Some(_)) => Some("an exit".to_owned()),
            Err(fault) => Some(fault.to_string()),
        };
        if let Some(failure) = failure {
            return Err(KernelError::Refused(format!(
                "{endpoint} takes its notifies in the settling crank, and failed one of {kp} with {failure}"
            )));
        }
        after_notify(&mut work.db, endpoint, peer, &notified)?;
    }
    Ok(work)
}

/// A queued notify of `kp` for `endpoint` is taken: the item's reference is released, and the
/// resolutions to deliver are returned, unless the endpoint is gone or no longer holds the
/// promise (it dropped it, or learned of it through another notify: it would get the promise
/// under a fresh vref).
fn take_notify(work: &mut Work<'_>, endpoint: EndpointId, kp: KPromiseId) -> Result<Option<Vec<(KPromiseId, Settlement)>>, KernelError> {
    work.db.decref(KRef::Promise(kp), true)?;
    if work.db.is_live(endpoint)? && work.db.clist_entry(endpoint, KRef::Promise(kp))?.is_some() {
        Ok(Some(promise::resolutions_for_notify(work, kp)?))
    } else {
        Ok(None)
    }
}

/// How a delivery ended: `Ok(None)` returned, `Ok(Some((failure, info)))` asked to exit,
/// `Err` faulted (an illegal syscall, an error, a panic).
type DeliveryEnd = Result<Option<(bool, CapData)>, Fault>;

/// Deliver `delivery` to `imp` (endpoint `endpoint`) inside `work`, catching a panic: the work
/// back, and how the delivery ended. A kernel error is returned as such.
fn deliver<'s>(
    work: Work<'s>,
    imp: &mut dyn Endpoint,
    endpoint: EndpointId,
    delivery: Delivery,
) -> Result<(Work<'s>, DeliveryEnd), KernelError> {
    let mut ctx = CrankContext::new(work, endpoint, imp.is_peer_kernel());
    let returned = catch_unwind(AssertUnwindSafe(|| match delivery {
        Delivery::Kernel(d) => imp.deliver(d, &mut ctx),
        Delivery::Gc(a) => imp.collect(a, &mut ctx),
    }));
    let (work, verdict, kernel_error) = ctx.into_parts();
    if let Some(e) = kernel_error {
        return Err(e);
    }
    let exit = match (verdict, returned) {
        (Some(Verdict::Illegal(reason)), _) => Err(Fault::IllegalSyscall(reason)),
        // The exit verdict is sticky too: an error or panic after asking to exit (e.g. the
        // endpoint not catching a refused later syscall) cannot turn it into an abort.
        (Some(Verdict::Exit { failure, info }), _) => Ok(Some((failure, info))),
        (None, Ok(Err(fault))) => Err(fault),
        (None, Err(panic)) => Err(Fault::Panic(panic_message(&panic))),
        (None, Ok(Ok(()))) => Ok(None),
    };
    Ok((work, exit))
}

/// After a notify to `endpoint` committed: the promises it carried leave its c-list. A peer
/// kernel may name them in messages already on their way (see `Endpoint::is_peer_kernel`): it
/// keeps the names as aliases until it says it is done.
fn after_notify(db: &mut KernelTxn<'_>, endpoint: EndpointId, peer: bool, notified: &[KPromiseId]) -> Result<(), KernelError> {
    for &kp in notified {
        if peer {
            db.clist_alias(endpoint, kp)?;
        } else {
            db.clist_remove(endpoint, KRef::Promise(kp))?;
        }
    }
    Ok(())
}

/// Where a run-queue item may be delivered: to one endpoint (a notify, a GC action, a send to
/// an object, which goes to its owner or is rejected), to any (a send to a promise: routing
/// decides when it is taken), or to none (a send to an object that no longer exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Reach {
    To(EndpointId),
    Anyone,
    Nobody,
}

fn reach_of(db: &KernelTxn<'_>, item: &RunQueueItem) -> Result<Reach, KernelError> {
    Ok(match item {
        RunQueueItem::Notify { endpoint, .. } | RunQueueItem::Gc { endpoint, .. } => Reach::To(*endpoint),
        RunQueueItem::Send { target: KRef::Promise(_), .. } => Reach::Anyone,
        RunQueueItem::Send { target: KRef::Object(o), .. } => match db.peek_object(*o, |r| r.map(|r| r.owner))? {
            Some(owner) => Reach::To(owner),
            None => Reach::Nobody,
        },
    })
}

/// What the run queue holds, for a crank deciding whether a notify may be taken in it: the
/// counts of `Kernel::reach`, less the item this crank took.
struct QueueReach<'a> {
    known: bool,
    counts: &'a HashMap<Reach, u64>,
    taken: Option<Reach>,
}

impl QueueReach<'_> {
    /// True if an item still queued may be delivered to `ep` (or nobody can tell).
    fn may_reach(&self, ep: EndpointId) -> bool {
        let queued = |r: Reach| self.counts.get(&r).copied().unwrap_or(0).saturating_sub(u64::from(self.taken == Some(r)));
        !self.known || queued(Reach::To(ep)) > 0 || queued(Reach::Anyone) > 0
    }
}

/// Begin a crank's work in the maps the last committed transaction left, if any.
fn begin_work<'s, S: Store>(store: &'s S, cache: &'s Records, counters: Counters, scratch: Option<Scratch>) -> Work<'s> {
    let mut scratch = scratch.unwrap_or_default();
    let buf = CrankBuffer { outputs: std::mem::take(&mut scratch.outputs), settled: std::mem::take(&mut scratch.settled) };
    Work { db: KernelTxn::begin_in(store, cache, counters, scratch), buf }
}

fn set_decider(work: &mut Work<'_>, kp: KPromiseId, endpoint: EndpointId) -> Result<(), KernelError> {
    if let Some(PromiseRecord { state: PromiseState::Unresolved { decider, .. }, .. }) = work.db.promise_mut(kp)? {
        *decider = Some(endpoint);
    }
    Ok(())
}

/// Terminate `ep` inside `work` (DESIGN §4): mark it, reject every promise it decides with
/// `data`, drop its c-list (releasing its imports, abandoning its exports). Messages to its
/// objects are rejected as they are routed. Its vatstore is kept, read-only, for post-mortem
/// inspection.
fn terminate(work: &mut Work<'_>, ep: EndpointId, reason: &str, data: CapData) -> Result<(), KernelError> {
    let Some(mut rec) = work.db.endpoint(ep)? else {
        return Err(KernelError::UnknownEndpoint(ep));
    };
    rec.status = EndpointStatus::Terminated { reason: reason.to_owned() };
    work.db.set_endpoint(ep, &rec);
    let entries = work.db.clist_entries(ep)?;
    for (kref, _) in &entries {
        if let KRef::Promise(kp) = kref {
            if work.db.promise_decider(*kp)? == Some(ep) {
                promise::reject(work, *kp, data.clone())?;
            }
        }
    }
    for (vref, _) in work.db.aliases(ep)? {
        work.db.alias_remove(ep, vref)?;
    }
    for (kref, _) in entries {
        // Removed before its export is marked abandoned: the exporter's own entry counts
        // nothing, while an import of an object it abandoned earlier counts like any other.
        work.db.clist_remove(ep, kref)?;
        if let KRef::Object(o) = kref {
            if let Some(mut obj) = work.db.object(o)? {
                if obj.owner == ep {
                    obj.abandoned = true;
                    work.db.set_object(o, &obj);
                    work.db.maybe_free.push(kref);
                }
            }
        }
    }
    Ok(())
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
