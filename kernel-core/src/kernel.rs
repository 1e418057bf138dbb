//! The kernel: opens a store, runs cranks one at a time (DESIGN §4), and offers the host API
//! (queue a message, watch a result, inspect the tables).

use crate::crank::{CrankBuffer, CrankContext, Endpoint, KernelDelivery, Verdict, Work};
use crate::error::{Fault, KernelError};
use crate::ids::{CrankNumber, EndpointId, KObjectId, KPromiseId, KRef, VRef};
use crate::message::{CapData, Message, RunQueueItem, Settlement};
use crate::promise;
use crate::routing::{self, Route};
use crate::store::{Entry, Store, WriteBatch};
use crate::tables::{
    self, Counters, EndpointRecord, EndpointStatus, KernelTxn, ObjectRecord, PromiseState, COUNTERS_KEY, FORMAT_KEY, FORMAT_VERSION,
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

type Watcher = Box<dyn FnOnce(KPromiseId, &Settlement)>;
type Observer = Box<dyn FnMut(&CommitEvent)>;

/// The kernel over a store `S`.
pub struct Kernel<S: Store> {
    store: S,
    counters: Counters,
    endpoints: Vec<Option<Box<dyn Endpoint>>>,
    watchers: HashMap<KPromiseId, Vec<Watcher>>,
    observers: Vec<Observer>,
}

impl<S: Store> Kernel<S> {
    /// Open a kernel on `store`: a new store is initialised; an existing one must carry this
    /// kernel's format and resumes at its last committed crank.
    pub fn open(mut store: S) -> Result<Self, KernelError> {
        let counters = {
            let db = KernelTxn::begin(&store, Counters::default());
            match db.get_raw(FORMAT_KEY)? {
                None => None,
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
                    Some(tables::decode::<Counters>("counters", COUNTERS_KEY, &raw)?)
                }
            }
        };
        let counters = match counters {
            Some(c) => c,
            None => {
                let mut db =
                    KernelTxn::begin(&store, Counters { next_object: 1, next_promise: 1, next_endpoint: 1, ..Counters::default() });
                db.set_raw(FORMAT_KEY, FORMAT_VERSION.to_be_bytes().to_vec());
                db.set_raw(COUNTERS_KEY, tables::encode(&db.counters));
                let (batch, c) = db.finish();
                store.apply(batch)?;
                c
            }
        };
        Ok(Kernel { store, counters, endpoints: Vec::new(), watchers: HashMap::new(), observers: Vec::new() })
    }

    /// The store, for inspection.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Close the kernel, giving back its store.
    pub fn into_store(self) -> S {
        self.store
    }

    /// Cranks committed over the store's life.
    pub fn cranks(&self) -> CrankNumber {
        CrankNumber(self.counters.cranks)
    }

    fn read(&self) -> KernelTxn<'_> {
        KernelTxn::begin(&self.store, self.counters)
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
        self.endpoints[i] = Some(endpoint);
        Ok(ep)
    }

    /// The endpoint recorded under `name`.
    pub fn endpoint_id(&self, name: &str) -> Result<Option<EndpointId>, KernelError> {
        self.read().endpoint_by_name(name)
    }

    /// The root object (`o+0`) of `ep`.
    pub fn root(&self, ep: EndpointId) -> Result<KObjectId, KernelError> {
        match self.read().clist_kref(ep, VRef::ROOT)? {
            Some(KRef::Object(o)) => Ok(o),
            _ => Err(KernelError::UnknownEndpoint(ep)),
        }
    }

    /// Queue `target.method(args)` from the host, with a fresh result promise (immediate path:
    /// committed before this returns). Every reference must exist.
    pub fn queue_message(&mut self, target: KRef, method: &str, args: CapData) -> Result<KPromiseId, KernelError> {
        let mut db = self.read();
        for r in std::iter::once(&target).chain(args.slots.iter()) {
            if !db.exists(*r)? {
                return Err(KernelError::UnknownRef(*r));
            }
        }
        let kp = db.new_promise(None);
        db.push_run_queue(&RunQueueItem::Send { target, message: Message { method: method.to_owned(), args, result: Some(kp) } });
        let finished = db.finish();
        self.apply_immediate(finished)?;
        Ok(kp)
    }

    /// Run `callback` once `kp` settles, after the crank that settles it commits (at once if it
    /// already has). Callbacks are host memory: they do not survive a restart.
    pub fn watch(&mut self, kp: KPromiseId, callback: impl FnOnce(KPromiseId, &Settlement) + 'static) -> Result<(), KernelError> {
        match self.read().promise(kp)? {
            None => Err(KernelError::UnknownRef(KRef::Promise(kp))),
            Some(PromiseState::Settled(s)) => {
                callback(kp, &s);
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
        Ok(self.read().numbered("promise", tables::PROMISE_PREFIX)?.into_iter().map(|(n, s)| (KPromiseId(n), s)).collect())
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

    /// `ep`'s vatstore.
    pub fn vatstore(&self, ep: EndpointId) -> Result<Vec<Entry>, KernelError> {
        self.read().vatstore_entries(ep)
    }

    fn apply_immediate(&mut self, (batch, counters): (WriteBatch, Counters)) -> Result<(), KernelError> {
        self.store.apply(batch)?;
        self.counters = counters;
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
        let mut work = Work { db: KernelTxn::begin(&self.store, self.counters), buf: CrankBuffer::default() };
        let Some(item) = work.db.pop_run_queue()? else {
            return Ok(None);
        };
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
                        let result = message.result;
                        let d = KernelDelivery::Message { target: obj, message };
                        (CrankInput::Send { target, method, delivered_to: Some(endpoint) }, Some((endpoint, d, result)))
                    }
                }
            }
            RunQueueItem::Notify { endpoint, promise: kp } => {
                if work.db.is_live(endpoint)? {
                    let resolutions = promise::resolutions_for_notify(&work, kp)?;
                    let d = KernelDelivery::Notify { resolutions };
                    (CrankInput::Notify { endpoint, promise: kp, delivered: true }, Some((endpoint, d, None)))
                } else {
                    (CrankInput::Notify { endpoint, promise: kp, delivered: false }, None)
                }
            }
        };
        let Some((endpoint, delivery, result)) = delivery else {
            let flushed = self.commit(finish(work), crank)?;
            return Ok(Some(CrankReport { crank, input, outcome: CrankOutcome::Committed, flushed, commit: CommitEvent { crank } }));
        };
        let notified: Vec<KPromiseId> = match &delivery {
            KernelDelivery::Notify { resolutions } => resolutions.iter().map(|(kp, _)| *kp).collect(),
            KernelDelivery::Message { .. } => Vec::new(),
        };
        let Some(Some(imp)) = self.endpoints.get_mut(endpoint.0 as usize) else {
            let name = work.db.endpoint(endpoint)?.map(|r| r.name).unwrap_or_default();
            return Err(KernelError::NotAttached(endpoint, name));
        };
        let mut ctx = CrankContext::new(work, endpoint);
        let returned = catch_unwind(AssertUnwindSafe(|| imp.deliver(delivery, &mut ctx)));
        let (mut work, verdict, kernel_error) = ctx.into_parts();
        if let Some(e) = kernel_error {
            return Err(e); // the transaction is dropped; the item stays queued
        }
        let fault = match (verdict, returned) {
            (Some(Verdict::Illegal(reason)), _) => Some(Fault::IllegalSyscall(reason)),
            // The exit verdict is sticky too: an error or panic after asking to exit (e.g. the
            // endpoint not catching a refused later syscall) cannot turn it into an abort.
            (Some(Verdict::Exit { failure, info }), _) => {
                for kp in &notified {
                    work.db.clist_remove(endpoint, KRef::Promise(*kp))?;
                }
                let why = if failure { "exited with failure" } else { "exited" };
                terminate(&mut work, endpoint, why, info)?;
                let flushed = self.commit(finish(work), crank)?;
                let outcome = CrankOutcome::Exited { endpoint, failure };
                return Ok(Some(CrankReport { crank, input, outcome, flushed, commit: CommitEvent { crank } }));
            }
            (None, Ok(Err(fault))) => Some(fault),
            (None, Err(panic)) => Some(Fault::Panic(panic_message(&panic))),
            (None, Ok(Ok(()))) => None,
        };
        let Some(fault) = fault else {
            for kp in &notified {
                work.db.clist_remove(endpoint, KRef::Promise(*kp))?;
            }
            let flushed = self.commit(finish(work), crank)?;
            return Ok(Some(CrankReport { crank, input, outcome: CrankOutcome::Committed, flushed, commit: CommitEvent { crank } }));
        };
        // Abort: drop the delivery's transaction and buffer, then commit the consequence alone.
        drop(work);
        let mut work = Work { db: KernelTxn::begin(&self.store, self.counters), buf: CrankBuffer::default() };
        work.db.pop_run_queue()?;
        work.db.counters.cranks += 1;
        let reason = fault.to_string();
        terminate(&mut work, endpoint, &reason, CapData::error(&format!("vat terminated: {reason}")))?;
        if let Some(kp) = result {
            promise::reject(&mut work, kp, CapData::error(&format!("delivery failed: {reason}")))?;
        }
        let flushed = self.commit(finish(work), crank)?;
        Ok(Some(CrankReport { crank, input, outcome: CrankOutcome::Aborted { endpoint, fault }, flushed, commit: CommitEvent { crank } }))
    }

    /// Commit: the transaction and the flushed buffer as one atomic batch, then deferred host
    /// callbacks, then the commit event.
    fn commit(&mut self, done: Finished, crank: CrankNumber) -> Result<usize, KernelError> {
        let flushed = self.apply_finished(done)?;
        let event = CommitEvent { crank };
        for o in &mut self.observers {
            o(&event);
        }
        Ok(flushed)
    }

    /// Write a finished transaction, then run the host callbacks of the promises it settled.
    fn apply_finished(&mut self, done: Finished) -> Result<usize, KernelError> {
        self.store.apply(done.batch)?;
        self.counters = done.counters;
        if !self.watchers.is_empty() {
            for kp in done.settled {
                if let Some(callbacks) = self.watchers.remove(&kp) {
                    if let Some(PromiseState::Settled(s)) = self.read().promise(kp)? {
                        for cb in callbacks {
                            cb(kp, &s);
                        }
                    }
                }
            }
        }
        Ok(done.flushed)
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
        let work = Work { db: KernelTxn::begin(&self.store, self.counters), buf: CrankBuffer::default() };
        let mut ctx = CrankContext::new(work, ep);
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
                let done = finish(work);
                self.apply_finished(done)?;
                Ok(Ok(value))
            }
        }
    }
}

/// A crank's transaction closed, with its buffer flushed into the same batch.
struct Finished {
    batch: WriteBatch,
    counters: Counters,
    settled: Vec<KPromiseId>,
    flushed: usize,
}

/// Flush the buffer into the transaction (so the run-queue writes commit atomically with the
/// rest) and close it.
fn finish(work: Work<'_>) -> Finished {
    let Work { mut db, buf } = work;
    let flushed = buf.outputs.len();
    for item in &buf.outputs {
        db.push_run_queue(item);
    }
    let (batch, counters) = db.finish();
    Finished { batch, counters, settled: buf.settled, flushed }
}

fn set_decider(work: &mut Work<'_>, kp: KPromiseId, endpoint: EndpointId) -> Result<(), KernelError> {
    if let Some(PromiseState::Unresolved { subscribers, queue, .. }) = work.db.promise(kp)? {
        work.db.set_promise(kp, &PromiseState::Unresolved { decider: Some(endpoint), subscribers, queue });
    }
    Ok(())
}

/// Terminate `ep` inside `work` (DESIGN §4): mark it, reject every promise it decides with
/// `data`, drop its c-list. Messages to its objects are rejected as they are routed. Its
/// vatstore is kept, read-only, for post-mortem inspection.
fn terminate(work: &mut Work<'_>, ep: EndpointId, reason: &str, data: CapData) -> Result<(), KernelError> {
    let Some(mut rec) = work.db.endpoint(ep)? else {
        return Err(KernelError::UnknownEndpoint(ep));
    };
    rec.status = EndpointStatus::Terminated { reason: reason.to_owned() };
    work.db.set_endpoint(ep, &rec);
    for (kref, _) in work.db.clist_entries(ep)? {
        if let KRef::Promise(kp) = kref {
            if work.db.promise(kp)?.and_then(|p| p.decider()) == Some(ep) {
                promise::reject(work, kp, data.clone())?;
            }
        }
    }
    work.db.clist_clear(ep)?;
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
