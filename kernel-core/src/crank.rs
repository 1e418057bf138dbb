//! One crank's working state ([`Work`]: the transaction plus the [`CrankBuffer`]), the
//! [`Endpoint`] trait deliveries go through, and [`CrankContext`], the buffered kref-level API an
//! endpoint's syscalls use during its delivery.

use crate::error::{KernelError, SyscallError};
use crate::gc::{self, GcAction};
use crate::ids::{Allocator, EndpointId, KObjectId, KPromiseId, KRef, RefKind, VRef};
use crate::message::{CapData, Message, RunQueueItem, Settlement};
use crate::promise;
use crate::tables::{ClistEntry, KernelTxn, PromiseRecord, PromiseState};

/// What a crank produced that only takes effect if it commits: run-queue items in the order
/// made, and the promises it settled (whose host watchers run after the commit).
#[derive(Debug, Default)]
pub struct CrankBuffer {
    /// Sends and notifies, flushed to the run queue in this order at commit.
    pub outputs: Vec<RunQueueItem>,
    /// Promises settled by this crank.
    pub settled: Vec<KPromiseId>,
}

/// A crank in progress: its transaction and its buffer. Dropping it is the abort.
pub struct Work<'s> {
    /// The transaction.
    pub db: KernelTxn<'s>,
    /// The buffered outputs.
    pub buf: CrankBuffer,
}

/// A delivery at the kernel level, before an endpoint translates it into its own references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelDelivery {
    /// Invoke `message` on `target`, an object the endpoint exports. If the message has a result
    /// promise, the endpoint is now its decider.
    Message {
        /// The receiving object.
        target: KObjectId,
        /// The call.
        message: Message,
    },
    /// These promises settled. The first is the one subscribed to; the rest are settled promises
    /// its data names. After the delivery commits, the endpoint's c-list forgets all of them.
    Notify {
        /// `(promise, settlement)` pairs.
        resolutions: Vec<(KPromiseId, Settlement)>,
    },
}

impl KernelDelivery {
    /// A short description for reports and logs (`send ko3.ping`, `notify kp7`).
    pub fn describe(&self) -> String {
        match self {
            KernelDelivery::Message { target, message } => format!("send {target}.{}", message.method),
            KernelDelivery::Notify { resolutions } => match resolutions.first() {
                Some((kp, _)) => format!("notify {kp}"),
                None => "notify".to_owned(),
            },
        }
    }
}

/// Something the kernel delivers to: a vat (through `kernel-syscall`) or a remote kernel.
///
/// Implementations translate the delivery into their own references and act only through
/// `ctx`. Returning `Err` (or panicking) aborts the crank and terminates the endpoint.
pub trait Endpoint {
    /// Handle one delivery.
    fn deliver(&mut self, delivery: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), crate::Fault>;

    /// Handle a garbage-collection delivery (DESIGN §6). The kernel keeps its own tables right
    /// whatever the endpoint does, so ignoring these (the default) is always safe; an endpoint
    /// that holds state for its exports, or imports it no longer uses, should act on them.
    fn collect(&mut self, action: GcAction, ctx: &mut CrankContext<'_>) -> Result<(), crate::Fault> {
        let _ = (action, ctx);
        Ok(())
    }

    /// True if this endpoint stands for another kernel (a link of `kernel-remote`), which names
    /// references asynchronously: a message it sent before it learned that a reference was
    /// retired or resolved may still arrive. For such an endpoint the kernel
    /// - keeps the names of the promises a notify carried as *aliases* (they still resolve
    ///   inbound, counting one reference, until [`CrankContext::forget_names`]; a new import of
    ///   the promise gets a fresh name), and
    /// - takes an `o+N` it has retired, named again, as a new export (a new kernel object), not
    ///   as a stale ref; the endpoint's own protocol must make that consistent on its side.
    ///
    /// Vats are not peers (the default): a stale ref from a vat is an illegal syscall.
    fn is_peer_kernel(&self) -> bool {
        false
    }

    /// True if this endpoint takes its notifies inside the crank that settles the promise,
    /// rather than in a crank of its own off the run queue: for an endpoint that is part of the
    /// kernel's machinery (a link of `kernel-remote`, which only translates and records), never
    /// for a vat. The notify then commits with the settlement: one crank, one transaction,
    /// instead of two. Only if nothing queued ahead of it (by earlier cranks, or earlier in this
    /// one) may reach the endpoint; otherwise it is queued, so the endpoint still receives a
    /// crank's outputs, and the queue's items, in order.
    ///
    /// Such an endpoint must not fail a notify: a fault, an illegal syscall, an exit or a panic
    /// there is a kernel error ([`crate::KernelError::Refused`]), and the settling crank does
    /// not commit. Only a crank whose delivery succeeds (or that had none to make) delivers so;
    /// the consequences of an aborted crank, and the immediate path, queue their notifies.
    ///
    /// The kernel asks when the endpoint is attached (to start counting its run queue by
    /// destination) and at each notify: the answer must not change.
    fn notifies_in_crank(&self) -> bool {
        false
    }
}

/// Why an endpoint stops receiving deliveries after this crank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Illegal(String),
    Exit { failure: bool, info: CapData },
}

/// The crank's API for the endpoint being delivered to: every syscall is checked, buffered or
/// written into the crank's transaction, and takes effect only if the crank commits.
///
/// The verdict is sticky: after an illegal syscall or an `exit`, every later syscall of this
/// delivery returns an error and does nothing, and nothing the endpoint does can undo it.
pub struct CrankContext<'s> {
    work: Work<'s>,
    endpoint: EndpointId,
    /// [`Endpoint::is_peer_kernel`] of the endpoint.
    peer: bool,
    verdict: Option<Verdict>,
    kernel_error: Option<KernelError>,
}

impl<'s> CrankContext<'s> {
    pub(crate) fn new(work: Work<'s>, endpoint: EndpointId, peer: bool) -> Self {
        CrankContext { work, endpoint, peer, verdict: None, kernel_error: None }
    }

    pub(crate) fn into_parts(self) -> (Work<'s>, Option<Verdict>, Option<KernelError>) {
        (self.work, self.verdict, self.kernel_error)
    }

    /// The endpoint this delivery is for.
    pub fn endpoint(&self) -> EndpointId {
        self.endpoint
    }

    fn guard(&self) -> Result<(), SyscallError> {
        if self.kernel_error.is_some() {
            Err(SyscallError::Kernel)
        } else if self.verdict.is_some() {
            Err(SyscallError::Terminated)
        } else {
            Ok(())
        }
    }

    /// Record an illegal syscall: the crank will abort and the endpoint be terminated. Used by
    /// translation layers for faults only they can see (a malformed vref, a bad vatstore key).
    /// After the verdict (or a kernel failure) this is just another refused syscall.
    pub fn illegal(&mut self, reason: impl Into<String>) -> SyscallError {
        if let Err(e) = self.guard() {
            return e;
        }
        let reason = reason.into();
        self.verdict = Some(Verdict::Illegal(reason.clone()));
        SyscallError::Illegal(reason)
    }

    fn kernel_failed(&mut self, e: KernelError) -> SyscallError {
        if self.kernel_error.is_none() {
            self.kernel_error = Some(e);
        }
        SyscallError::Kernel
    }

    fn check<T>(&mut self, r: Result<T, KernelError>) -> Result<T, SyscallError> {
        r.map_err(|e| self.kernel_failed(e))
    }

    /// True once this delivery can no longer make syscalls.
    pub fn is_finished(&self) -> bool {
        self.guard().is_err()
    }

    // ---- c-list translation ----

    /// The kref for the endpoint's `vref`, allocating a kernel object or promise the first time
    /// the endpoint exports one of its own (`o+N`, `p+N`). An unknown kernel-allocated ref
    /// (`o-N`, `p-N`) is illegal: the endpoint was never given it.
    pub fn export(&mut self, vref: VRef) -> Result<KRef, SyscallError> {
        self.guard()?;
        let ep = self.endpoint;
        // An endpoint's own ref above its watermark is new: its c-list cannot hold it, so the
        // lookup (a store miss) is skipped.
        let fresh = vref.allocator == Allocator::Endpoint && {
            let r = self.work.db.clist_counters(ep);
            let c = self.check(r)?;
            vref.index > if vref.is_promise() { c.export_promise } else { c.export_object }
        };
        if fresh {
            return self.export_new(vref);
        }
        if let Some(k) = self.check(self.work.db.clist_kref(ep, vref))? {
            if let KRef::Object(_) = k {
                if vref.allocator == Allocator::Kernel {
                    // A dropped import is stale: the endpoint said it can no longer reach it,
                    // and its exporter may have retired it since.
                    let entry = self.check(self.work.db.clist_entry(ep, k))?;
                    if !entry.is_some_and(|e| e.reachable) {
                        return Err(self.illegal(format!("{vref} is stale: {ep} dropped it")));
                    }
                } else {
                    // Sending an export again makes it reachable again, should it have been dropped.
                    let r = self.work.db.clist_set_reachable(ep, k, true);
                    self.check(r)?;
                }
            }
            return Ok(k);
        }
        if self.peer {
            // A peer kernel may name a promise it has not yet heard was resolved...
            if let Some(k) = self.check(self.work.db.alias_kref(ep, vref))? {
                return Ok(k);
            }
            // ...or an export of its own it has not yet heard was retired here: a new object.
            if vref.allocator == Allocator::Endpoint && vref.kind == RefKind::Object {
                return self.allocate_export(vref);
            }
        }
        if vref.allocator == Allocator::Kernel {
            return Err(self.illegal(format!("{vref} is not in the c-list of {ep}")));
        }
        // Below the watermark and unknown: new only if the endpoint skipped it and never named
        // it; an index it named before (since retired or resolved) is never accepted again.
        if let Some((first, last)) = self.check(self.work.db.export_gap(ep, vref))? {
            self.work.db.remove_export_gap(ep, vref.kind, last);
            if first < vref.index {
                self.work.db.add_export_gap(ep, vref.kind, first, vref.index - 1);
            }
            if vref.index < last {
                self.work.db.add_export_gap(ep, vref.kind, vref.index + 1, last);
            }
            return self.allocate_export(vref);
        }
        Err(self.illegal(format!("{vref} is stale: {ep} allocated it before and it has been retired or resolved")))
    }

    /// Forget promise names this (peer-kernel) endpoint kept after their notify (see
    /// [`Endpoint::is_peer_kernel`]): the peer will not name them again. A name that is no
    /// longer kept (forgotten already) is skipped.
    pub fn forget_names(&mut self, vrefs: &[VRef]) -> Result<(), SyscallError> {
        self.guard()?;
        let ep = self.endpoint;
        for &v in vrefs {
            let r = self.work.db.alias_remove(ep, v);
            self.check(r)?;
        }
        Ok(())
    }

    /// The endpoint's c-list entry for `kref` (its vref and reachable flag); changes nothing.
    pub fn entry(&mut self, kref: KRef) -> Result<Option<ClistEntry>, SyscallError> {
        self.guard()?;
        let r = self.work.db.clist_entry(self.endpoint, kref);
        self.check(r)
    }

    /// True if this endpoint decides promise `kp` (it is unresolved and this endpoint is the one
    /// to resolve it).
    pub fn decides(&mut self, kp: KPromiseId) -> Result<bool, SyscallError> {
        self.guard()?;
        let r = self.work.db.promise_decider(kp);
        Ok(self.check(r)? == Some(self.endpoint))
    }

    /// True if [`CrankContext::retire_exports`] of `kref` would be legal now: an object this
    /// endpoint exports that no importer can reach, not pinned, not abandoned.
    pub fn can_retire_export(&mut self, kref: KRef) -> Result<bool, SyscallError> {
        self.guard()?;
        let KRef::Object(o) = kref else { return Ok(false) };
        let ep = self.endpoint;
        let rec = self.check(self.work.db.object(o))?;
        Ok(matches!(&rec, Some(r) if r.owner == ep && r.reachable == 0 && !r.pinned && !r.abandoned))
    }

    /// Allocate the kernel object or promise for a new `o+N`/`p+N` above the watermark. The
    /// indices it skips become an export gap: the endpoint may still name them later, once each
    /// (an endpoint may hand out refs at creation and send them in any order).
    fn export_new(&mut self, vref: VRef) -> Result<KRef, SyscallError> {
        let ep = self.endpoint;
        let r = self.work.db.clist_counters(ep);
        let mut counters = self.check(r)?;
        let watermark = match vref.kind {
            RefKind::Object => &mut counters.export_object,
            RefKind::Promise => &mut counters.export_promise,
        };
        let skipped_from = *watermark + 1;
        *watermark = vref.index;
        self.work.db.set_clist_counters(ep, &counters);
        if skipped_from < vref.index {
            self.work.db.add_export_gap(ep, vref.kind, skipped_from, vref.index - 1);
        }
        self.allocate_export(vref)
    }

    /// The kernel object or promise for a new export `vref`, entered in the c-list.
    fn allocate_export(&mut self, vref: VRef) -> Result<KRef, SyscallError> {
        let ep = self.endpoint;
        let kref = match vref.kind {
            RefKind::Object => KRef::Object(self.work.db.new_object(ep, false)),
            RefKind::Promise => KRef::Promise(self.work.db.new_promise(Some(ep))),
        };
        let r = self.work.db.clist_insert(ep, kref, vref);
        self.check(r)?;
        Ok(kref)
    }

    /// The kref for `vref` if the endpoint's c-list has it; allocates nothing.
    pub fn lookup(&mut self, vref: VRef) -> Result<Option<KRef>, SyscallError> {
        self.guard()?;
        let r = self.work.db.clist_kref(self.endpoint, vref);
        self.check(r)
    }

    /// The endpoint's vref for `kref`, allocating an import (`o-N`, `p-N`) the first time the
    /// endpoint sees it. An import the endpoint had dropped becomes reachable again.
    pub fn import(&mut self, kref: KRef) -> Result<VRef, SyscallError> {
        self.guard()?;
        let r = self.work.db.import(self.endpoint, kref);
        self.check(r)
    }

    /// The endpoint's vref for `kref`, if its c-list has it; changes nothing (unlike
    /// [`CrankContext::import`], which also makes a dropped import reachable again). GC
    /// deliveries are translated with this.
    pub fn vref(&mut self, kref: KRef) -> Result<Option<VRef>, SyscallError> {
        self.guard()?;
        let r = self.work.db.clist_entry(self.endpoint, kref);
        Ok(self.check(r)?.map(|e| e.vref))
    }

    /// What the endpoint may drop at `bringOutYourDead`: the objects it imports and can still
    /// reach, and the promises it holds without deciding them; in c-list order.
    pub fn held_imports(&mut self) -> Result<Vec<VRef>, SyscallError> {
        self.guard()?;
        let r = self.work.db.clist_entries(self.endpoint);
        let entries = self.check(r)?;
        let mut out = Vec::new();
        for (kref, vref) in entries {
            let keep = match kref {
                KRef::Object(_) => {
                    let r = self.work.db.clist_entry(self.endpoint, kref);
                    vref.allocator == Allocator::Kernel && self.check(r)?.is_some_and(|e| e.reachable)
                }
                KRef::Promise(p) => {
                    let r = self.work.db.promise_decider(p);
                    self.check(r)? != Some(self.endpoint)
                }
            };
            if keep {
                out.push(vref);
            }
        }
        Ok(out)
    }

    // ---- syscalls ----

    /// `send(target, method, args, result?)`: buffered until commit. `result` must be an
    /// unresolved promise this endpoint decides; the kernel decides it while the message is in
    /// flight, and the receiver decides it on delivery.
    pub fn send(&mut self, target: KRef, method: String, args: CapData, result: Option<KPromiseId>) -> Result<(), SyscallError> {
        self.guard()?;
        if let Some(kp) = result {
            if self.check(self.work.db.promise_decider(kp))? != Some(self.endpoint) {
                return Err(self.illegal(format!("result {kp} is not an unresolved promise decided by {}", self.endpoint)));
            }
            // The kernel decides it while the message is in flight.
            let r = self.work.db.promise_mut(kp).map(|rec| {
                if let Some(PromiseRecord { state: PromiseState::Unresolved { decider, .. }, .. }) = rec {
                    *decider = None;
                }
            });
            self.check(r)?;
        }
        let message = Message { method, args, result };
        let r = gc::add_message_refs(&mut self.work.db, target, &message);
        self.check(r)?;
        self.work.buf.outputs.push(RunQueueItem::Send { target, message });
        Ok(())
    }

    /// `subscribe(kp)`: be notified (after commit) when `kp` settles, or at once if settled.
    pub fn subscribe(&mut self, kp: KPromiseId) -> Result<(), SyscallError> {
        self.guard()?;
        let ep = self.endpoint;
        let r = promise::subscribe(&mut self.work, ep, kp);
        self.check(r)
    }

    /// `resolve([(kp, settlement)])`: every promise must be unresolved, decided by this endpoint,
    /// and named once; otherwise nothing is resolved and the syscall is illegal. The resolver's
    /// c-list forgets each promise it resolves (at its own notify, if it subscribed to it);
    /// naming it afterwards is a stale or unknown ref.
    pub fn resolve(&mut self, resolutions: Vec<(KPromiseId, Settlement)>) -> Result<(), SyscallError> {
        self.guard()?;
        let ep = self.endpoint;
        for (i, (kp, _)) in resolutions.iter().enumerate() {
            if resolutions[..i].iter().any(|(q, _)| q == kp) {
                return Err(self.illegal(format!("{kp} resolved twice in one syscall")));
            }
            let r = self.work.db.with_promise(*kp, |r| match r.map(|r| &r.state) {
                Some(PromiseState::Unresolved { decider: Some(d), .. }) if *d == ep => Ok(()),
                Some(PromiseState::Settled(_)) => Err(format!("{kp} is already resolved")),
                _ => Err(format!("{ep} is not the decider of {kp}")),
            });
            if let Err(reason) = self.check(r)? {
                return Err(self.illegal(reason));
            }
        }
        for (kp, settlement) in resolutions {
            // The resolver is done with the promise, unless it also awaits its own notify,
            // which will make it forget the promise then.
            let r = self.work.db.with_promise(
                kp,
                |r| matches!(r.map(|r| &r.state), Some(PromiseState::Unresolved { subscribers, .. }) if subscribers.contains(&ep)),
            );
            let subscribed = self.check(r)?;
            let r = promise::resolve(&mut self.work, kp, settlement);
            self.check(r)?;
            if !subscribed {
                let r = self.work.db.clist_remove(ep, KRef::Promise(kp));
                self.check(r)?;
            }
        }
        Ok(())
    }

    /// `exit(failure, info)`: this delivery's effects so far commit, then the endpoint is
    /// terminated in the same transaction, its promises rejected with `info`.
    pub fn exit(&mut self, failure: bool, info: CapData) -> Result<(), SyscallError> {
        self.guard()?;
        self.verdict = Some(Verdict::Exit { failure, info });
        Ok(())
    }

    /// `dropImports`: the endpoint can no longer reach these imports (objects it holds as
    /// `o-N`, or promises it holds but does not decide, which it forgets at once and is no
    /// longer subscribed to: it will not be notified of them).
    pub fn drop_imports(&mut self, krefs: &[KRef]) -> Result<(), SyscallError> {
        self.guard()?;
        let ep = self.endpoint;
        for &k in krefs {
            let entry = self.check(self.work.db.clist_entry(ep, k))?;
            let legal = match (k, entry) {
                (KRef::Object(_), Some(e)) => e.vref.allocator == Allocator::Kernel && e.reachable,
                (KRef::Promise(p), Some(_)) => self.check(self.work.db.promise_decider(p))? != Some(ep),
                (_, None) => false,
            };
            if !legal {
                return Err(self.illegal(format!("dropImports of {k}, which {ep} does not hold as a reachable import")));
            }
            let r = match k {
                KRef::Object(_) => self.work.db.clist_set_reachable(ep, k, false),
                KRef::Promise(p) => promise::unsubscribe(&mut self.work, ep, p).and_then(|()| self.work.db.clist_remove(ep, k)),
            };
            self.check(r)?;
        }
        Ok(())
    }

    /// `retireImports`: the endpoint can no longer even recognise these dropped imports.
    pub fn retire_imports(&mut self, krefs: &[KRef]) -> Result<(), SyscallError> {
        self.guard()?;
        let ep = self.endpoint;
        for &k in krefs {
            let entry = self.check(self.work.db.clist_entry(ep, k))?;
            if !matches!((k, entry), (KRef::Object(_), Some(e)) if e.vref.allocator == Allocator::Kernel && !e.reachable) {
                return Err(self.illegal(format!("retireImports of {k}, which {ep} does not hold as a dropped import")));
            }
            let r = self.work.db.clist_remove(ep, k);
            self.check(r)?;
        }
        Ok(())
    }

    /// `retireExports`: the endpoint has deleted these exports, which no one can reach any more
    /// (it was told `dropExports`). Endpoints that still recognise them are told `retireImports`.
    pub fn retire_exports(&mut self, krefs: &[KRef]) -> Result<(), SyscallError> {
        self.guard()?;
        let ep = self.endpoint;
        for &k in krefs {
            let KRef::Object(o) = k else { return Err(self.illegal(format!("retireExports of promise {k}"))) };
            let rec = self.check(self.work.db.object(o))?;
            let ok = matches!(&rec, Some(r) if r.owner == ep && r.reachable == 0 && !r.pinned && !r.abandoned);
            if !ok {
                return Err(self.illegal(format!("retireExports of {k}, which is not an unreachable export of {ep}")));
            }
            let r = self.retire_export(ep, o);
            self.check(r)?;
        }
        Ok(())
    }

    fn retire_export(&mut self, ep: EndpointId, o: KObjectId) -> Result<(), KernelError> {
        self.work.db.clist_remove(ep, KRef::Object(o))?;
        self.work.db.delete_object(o);
        for importer in gc::recognizers(&self.work.db, o)? {
            self.work.buf.outputs.push(RunQueueItem::Gc { endpoint: importer, action: GcAction::RetireImports(vec![o]) });
        }
        Ok(())
    }

    /// `abandonExports`: the endpoint stops serving these exports. Messages to them are
    /// rejected from now on; importers keep them until they drop them.
    pub fn abandon_exports(&mut self, krefs: &[KRef]) -> Result<(), SyscallError> {
        self.guard()?;
        let ep = self.endpoint;
        for &k in krefs {
            let KRef::Object(o) = k else { return Err(self.illegal(format!("abandonExports of promise {k}"))) };
            // A host pin on an ordinary export is the host holding it, like an importer, which
            // the exporter cannot know of and which does not stop it giving up; only its root,
            // pinned for good, may not be abandoned.
            let entry = self.check(self.work.db.clist_entry(ep, k))?;
            let root = entry.is_some_and(|e| e.vref == VRef::ROOT);
            match self.check(self.work.db.object(o))? {
                Some(mut rec) if rec.owner == ep && !rec.abandoned && !root => {
                    // The exporter's own entry goes first, while it is still the export's
                    // (it counts nothing).
                    let r = self.work.db.clist_remove(ep, k);
                    self.check(r)?;
                    rec.abandoned = true;
                    self.work.db.set_object(o, &rec);
                    self.work.db.maybe_free.push(k);
                }
                _ => return Err(self.illegal(format!("abandonExports of {k}, which is not an export of {ep}"))),
            }
        }
        Ok(())
    }

    /// `vatstore get`.
    pub fn vatstore_get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, SyscallError> {
        self.guard()?;
        let r = self.work.db.vatstore_get(self.endpoint, key);
        self.check(r)
    }

    /// `vatstore set`.
    pub fn vatstore_set(&mut self, key: &[u8], value: Vec<u8>) -> Result<(), SyscallError> {
        self.guard()?;
        self.work.db.vatstore_set(self.endpoint, key, value);
        Ok(())
    }

    /// `vatstore delete`.
    pub fn vatstore_delete(&mut self, key: &[u8]) -> Result<(), SyscallError> {
        self.guard()?;
        self.work.db.vatstore_delete(self.endpoint, key);
        Ok(())
    }

    /// `vatstore next-key`: the first key after `after` (or the first key).
    pub fn vatstore_next_key(&mut self, after: Option<&[u8]>) -> Result<Option<Vec<u8>>, SyscallError> {
        self.guard()?;
        let r = self.work.db.vatstore_next_key(self.endpoint, after);
        self.check(r)
    }
}
