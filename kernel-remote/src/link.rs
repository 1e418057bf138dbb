//! A remote kernel as a kernel [`Endpoint`]: [`LinkEndpoint`] translates each delivery into
//! rrefs through the link's c-list and writes the wire message into the link's outbox inside the
//! crank; [`apply_inbound`] applies a message from the peer on the immediate path.
//!
//! The link's durable state lives in its vatstore, so it commits and rolls back with the crank
//! or the immediate-path transaction that changes it:
//! - `q<seq u64 BE>` -> an outbox entry (an encoded [`WireMessage`]), until acknowledged;
//! - `n` -> the next outbound sequence number (u64 BE; absent: 1);
//! - `a` -> the highest inbound sequence applied (u64 BE; absent: 0).
//!
//! - `x<vref>` -> the last outbound sequence that named our object `vref` (an `o-N` of the
//!   link's c-list), for distributed GC.
//!
//! Distributed GC (DESIGN §6 across a link) rides the same outbox, so it is exactly once and in
//! order. The kernel's GC deliveries to the link become wire messages: `dropExports` ->
//! [`WireMessage::Drop`], `retireExports` -> [`WireMessage::Retire`] (the peer's objects we no
//! longer reach / recognise), `retireImports` -> [`WireMessage::Retired`] (our objects whose
//! exporter is gone). The races are settled by order and one number:
//! - a `Drop`/`Retire` carries `seen`, the highest peer message applied when it was decided;
//!   the exporter applies it only if it has not named the object in a message after `seen` —
//!   if it has, that message makes the object reachable again at the importer (for a retired
//!   object, as a new import: kernel-core takes a peer kernel's retired `o+N` named again as a
//!   new export), and the drop is moot;
//! - a notify's promises stay nameable as aliases in the link's c-list (kernel-core, for peer
//!   kernels), because the peer may name them in messages sent before our `Resolve` reached
//!   it. The peer's acknowledgement of our `Resolve` says how far its outbox was written
//!   (durably) by then ([`crate::Frame::Ack`]'s `written`): once we have applied its messages
//!   that far, none naming them can still come, and the aliases go, in the transaction that
//!   deletes the `Resolve`'s outbox entry (the node's `delete_acknowledged`). So an outbox
//!   entry that is a `Resolve` stays until its names are forgotten, and after a restart the
//!   outbox itself says which names are still to forget.

use crate::rref::{PeerSeq, RRef};
use crate::wire::{WireData, WireMessage, WireResolution};
use kernel_core::{
    Allocator, CapData, CrankContext, Endpoint, Fault, GcAction, KObjectId, KPromiseId, KRef, KernelDelivery, RefKind, Settlement,
    SyscallError, VRef,
};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Vatstore key prefix of outbox entries.
pub const OUTBOX_PREFIX: &[u8] = b"q";
/// Vatstore key of the next outbound sequence number.
pub const NEXT_SEQ_KEY: &[u8] = b"n";
/// Vatstore key of the highest inbound sequence applied.
pub const APPLIED_KEY: &[u8] = b"a";

/// The vatstore key of outbox entry `seq`.
pub fn outbox_key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = OUTBOX_PREFIX[0];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// A big-endian u64 record, or `None` if the bytes are not one.
pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_be_bytes)
}

/// An outbox entry written by a delivery that has not committed yet.
#[derive(Debug, Clone)]
pub(crate) struct Staged {
    /// Which link (index in the node).
    pub link: usize,
    /// Its sequence number.
    pub seq: u64,
    /// The encoded message.
    pub message: Vec<u8>,
    /// For a `Resolve`: the names (ours) of the promises it settled, which the link keeps as
    /// aliases until the peer's acknowledgements let it forget them.
    pub forget: Vec<VRef>,
}

/// The names a `Resolve` in our outbox leaves as aliases until forgotten: its promises, as the
/// link names them. Empty for any other message.
pub(crate) fn resolve_names(message: &WireMessage) -> Vec<VRef> {
    match message {
        WireMessage::Resolve { resolutions } => resolutions.iter().map(|r| r.promise.to_clist()).collect(),
        _ => Vec::new(),
    }
}

/// Shared between the link endpoints (inside the kernel) and the node (the host): entries wait
/// here until the commit event of the crank that wrote them.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// Set by the node before each crank: the number the crank will commit under.
    pub crank: u64,
    /// Written by cranks not yet committed: `(crank number, entry)`. Inside a turn, several
    /// cranks' entries wait here for their commit events, which come when the turn ends.
    pub staged: std::collections::VecDeque<(u64, Staged)>,
    /// Promoted by a commit event, waiting for the node to stamp them with the store position.
    pub committed: Vec<(u64, Staged)>,
}

impl Gate {
    /// The commit event of crank `crank`: the entries it staged are committed. Cranks commit in
    /// order and stage in order, so they are at the front; anything staged by an earlier crank
    /// that never committed is dropped.
    pub fn on_commit(&mut self, crank: u64) {
        while let Some((c, _)) = self.staged.front() {
            if *c > crank {
                break;
            }
            if let Some(entry) = self.staged.pop_front() {
                if entry.0 == crank {
                    self.committed.push(entry);
                }
            }
        }
    }

    /// The committed entries, for the node to stamp.
    pub fn take_committed(&mut self) -> Vec<Staged> {
        self.committed.drain(..).map(|(_, s)| s).collect()
    }

    /// Crank `crank`'s delivery did not commit (it failed, or the kernel refused it): nothing it
    /// staged may leave, whatever its number's later commit event says (an aborted crank's
    /// consequences commit under the same number).
    pub fn discard(&mut self, crank: u64) {
        self.staged.retain(|(c, _)| *c != crank);
        self.committed.retain(|(c, _)| *c != crank);
    }
}

/// The kernel endpoint for one peer.
pub struct LinkEndpoint {
    index: usize,
    gate: Rc<RefCell<Gate>>,
    bootstrap: Rc<Cell<Option<KObjectId>>>,
    max_message: usize,
}

impl LinkEndpoint {
    pub(crate) fn new(index: usize, gate: Rc<RefCell<Gate>>, bootstrap: Rc<Cell<Option<KObjectId>>>, max_message: usize) -> Self {
        LinkEndpoint { index, gate, bootstrap, max_message }
    }
}

/// The frame bytes around a message: version byte, variant tag, sequence and length varints.
pub(crate) const FRAME_OVERHEAD: usize = 32;

fn kernel_fault(e: SyscallError) -> Fault {
    // Outbound translation can only fail if the kernel (its store) failed; the kernel reports
    // that itself, as an error of the crank, and does not blame the link.
    Fault::VatError(format!("link translation failed: {e}"))
}

/// Outbound translation: krefs to this kernel's rrefs, subscribing to promises the peer will
/// want the settlement of.
struct Out<'a, 's> {
    ctx: &'a mut CrankContext<'s>,
    bootstrap: Option<KObjectId>,
    /// Promises already subscribed to (or settled in this very delivery): subscribe once.
    subscribed: Vec<KPromiseId>,
    /// Our objects (the link's `o-N`) this message names: the peer's drop of them is moot if it
    /// was decided before it saw this message.
    named: Vec<VRef>,
}

impl Out<'_, '_> {
    fn rref(&mut self, kref: KRef) -> Result<RRef, Fault> {
        if let (KRef::Object(o), Some(b)) = (kref, self.bootstrap) {
            if o == b {
                return Ok(RRef::BOOTSTRAP);
            }
        }
        let vref = self.ctx.import(kref).map_err(kernel_fault)?;
        if vref.kind == RefKind::Object && vref.allocator == Allocator::Kernel && !self.named.contains(&vref) {
            self.named.push(vref);
        }
        Ok(RRef::from_clist(vref))
    }

    /// A promise in data: unless the peer decides it (through this link), subscribe so its
    /// settlement follows it across the link.
    fn slot(&mut self, kref: KRef) -> Result<RRef, Fault> {
        let r = self.rref(kref)?;
        if let KRef::Promise(kp) = kref {
            if !self.subscribed.contains(&kp) && !self.ctx.decides(kp).map_err(kernel_fault)? {
                self.ctx.subscribe(kp).map_err(kernel_fault)?;
                self.subscribed.push(kp);
            }
        }
        Ok(r)
    }

    fn data(&mut self, d: CapData) -> Result<WireData, Fault> {
        let mut slots = Vec::with_capacity(d.slots.len());
        for k in d.slots {
            slots.push(self.slot(k)?);
        }
        Ok(WireData { body: d.body, slots })
    }
}

impl Endpoint for LinkEndpoint {
    fn deliver(&mut self, delivery: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let mut out = Out { ctx, bootstrap: self.bootstrap.get(), subscribed: Vec::new(), named: Vec::new() };
        let mut result_kp = None;
        let message = match delivery {
            KernelDelivery::Message { target, message } => {
                result_kp = message.result;
                let target = out.rref(KRef::Object(target))?;
                let args = out.data(message.args)?;
                let result = match message.result {
                    Some(kp) => Some(out.rref(KRef::Promise(kp))?),
                    None => None,
                };
                WireMessage::Deliver { target, method: message.method, args, result }
            }
            KernelDelivery::Notify { resolutions } => {
                // Settled promises this notify carries go with it; subscribing to them would
                // send their settlement twice.
                out.subscribed.extend(resolutions.iter().map(|(kp, _)| *kp));
                let mut wire = Vec::with_capacity(resolutions.len());
                for (kp, settlement) in resolutions {
                    let promise = out.rref(KRef::Promise(kp))?;
                    let rejected = settlement.is_rejected();
                    let data = match settlement {
                        Settlement::Fulfilled(d) | Settlement::Rejected(d) => d,
                    };
                    wire.push(WireResolution { promise, rejected, data: out.data(data)? });
                }
                WireMessage::Resolve { resolutions: wire }
            }
        };
        let (ctx, named) = (out.ctx, out.named);
        let mut bytes = message.encode().map_err(|e| Fault::VatError(e.to_string()))?;
        if bytes.len() > self.max_message {
            // Too large for any peer to accept: refuse it here rather than lose the link to it.
            let why = format!("a message of {} bytes exceeds the link's limit of {}", bytes.len(), self.max_message);
            log::warn!("{}: {why}", message.describe());
            match message {
                WireMessage::Deliver { .. } => {
                    if let Some(kp) = result_kp {
                        ctx.resolve(vec![(kp, Settlement::Rejected(CapData::error(&why)))]).map_err(kernel_fault)?;
                    }
                    return Ok(());
                }
                WireMessage::Resolve { ref resolutions } => {
                    let error = CapData::error(&why);
                    let resolutions = resolutions
                        .iter()
                        .map(|r| WireResolution {
                            promise: r.promise,
                            rejected: true,
                            data: WireData { body: error.body.clone(), slots: vec![] },
                        })
                        .collect();
                    bytes = WireMessage::Resolve { resolutions }.encode().map_err(|e| Fault::VatError(e.to_string()))?;
                }
                _ => return Err(Fault::VatError(why)),
            }
        }
        let seq = write_outbox(ctx, &bytes).map_err(kernel_fault)?;
        for v in named {
            ctx.vatstore_set(&named_key(v), seq.to_be_bytes().to_vec()).map_err(kernel_fault)?;
        }
        // The kernel keeps a notify's promises as our aliases: the names the peer may still use.
        let forget = resolve_names(&message);
        self.stage(seq, bytes, forget);
        Ok(())
    }

    fn collect(&mut self, action: GcAction, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let mut refs = Vec::new();
        for &o in action.objects() {
            if let Some(v) = ctx.vref(KRef::Object(o)).map_err(kernel_fault)? {
                refs.push(RRef::from_clist(v));
            }
        }
        if refs.is_empty() {
            return Ok(()); // bringOutYourDead: the link holds nothing of its own
        }
        let seen = PeerSeq(read_u64(ctx, APPLIED_KEY, 0)?);
        let message = match action {
            GcAction::DropExports(_) => WireMessage::Drop { refs, seen },
            GcAction::RetireExports(_) => WireMessage::Retire { refs, seen },
            GcAction::RetireImports(_) => {
                for r in &refs {
                    ctx.vatstore_delete(&named_key(r.to_clist())).map_err(kernel_fault)?;
                }
                WireMessage::Retired { refs }
            }
            GcAction::BringOutYourDead => return Ok(()),
        };
        let bytes = message.encode().map_err(|e| Fault::VatError(e.to_string()))?;
        let seq = write_outbox(ctx, &bytes).map_err(kernel_fault)?;
        self.stage(seq, bytes, Vec::new());
        Ok(())
    }

    fn is_peer_kernel(&self) -> bool {
        true
    }

    /// A link's notify only translates and records (it fails only if the kernel's store does):
    /// it commits with the settlement, one crank instead of two.
    fn notifies_in_crank(&self) -> bool {
        true
    }
}

impl LinkEndpoint {
    /// Last, after every fallible step: staged entries leave only on this crank's commit event.
    fn stage(&self, seq: u64, message: Vec<u8>, forget: Vec<VRef>) {
        let mut gate = self.gate.borrow_mut();
        let crank = gate.crank;
        gate.staged.push_back((crank, Staged { link: self.index, seq, message, forget }));
    }
}

/// The vatstore key recording the last outbound sequence that named our object `vref`.
fn named_key(vref: VRef) -> Vec<u8> {
    let mut k = Vec::with_capacity(11);
    k.push(b'x');
    k.extend_from_slice(&vref.key_bytes());
    k
}

/// A big-endian u64 vatstore record, or `absent`.
fn read_u64(ctx: &mut CrankContext<'_>, key: &[u8], absent: u64) -> Result<u64, Fault> {
    match ctx.vatstore_get(key).map_err(kernel_fault)? {
        None => Ok(absent),
        Some(v) => decode_u64(&v).ok_or_else(|| Fault::VatError(format!("corrupt link record {}", key.escape_ascii()))),
    }
}

/// Append `bytes` to the link's outbox (in the transaction): its sequence number.
fn write_outbox(ctx: &mut CrankContext<'_>, bytes: &[u8]) -> Result<u64, SyscallError> {
    let seq = match ctx.vatstore_get(NEXT_SEQ_KEY)? {
        None => 1,
        Some(v) => decode_u64(&v).ok_or_else(|| SyscallError::Illegal("corrupt next-sequence record".into()))?,
    };
    ctx.vatstore_set(&outbox_key(seq), bytes.to_vec())?;
    ctx.vatstore_set(NEXT_SEQ_KEY, (seq + 1).to_be_bytes().to_vec())?;
    Ok(seq)
}

fn refused(e: SyscallError) -> Fault {
    match e {
        SyscallError::Illegal(reason) => Fault::IllegalSyscall(reason),
        other => Fault::IllegalSyscall(other.to_string()),
    }
}

/// Inbound translation: sender rrefs to krefs. An rref naming something of ours must be in the
/// c-list (else it is forged); one naming something of the peer's is imported on first sight.
fn in_ref(ctx: &mut CrankContext<'_>, bootstrap: Option<KObjectId>, sender: RRef) -> Result<KRef, Fault> {
    let ours = sender.flip();
    if ours == RRef::BOOTSTRAP {
        return bootstrap.map(KRef::Object).ok_or_else(|| Fault::IllegalSyscall("this kernel has no bootstrap object".into()));
    }
    ctx.export(ours.to_clist()).map_err(refused)
}

fn in_data(ctx: &mut CrankContext<'_>, bootstrap: Option<KObjectId>, d: &WireData) -> Result<CapData, Fault> {
    let mut slots = Vec::with_capacity(d.slots.len());
    for r in &d.slots {
        slots.push(in_ref(ctx, bootstrap, *r)?);
    }
    Ok(CapData { body: d.body.clone(), slots })
}

/// Apply message `seq` from the peer inside an immediate-path transaction, recording `seq` as
/// the highest applied in the same transaction. Any fault means nothing is applied.
pub fn apply_inbound(ctx: &mut CrankContext<'_>, bootstrap: Option<KObjectId>, seq: PeerSeq, message: &WireMessage) -> Result<(), Fault> {
    let applied = read_u64(ctx, APPLIED_KEY, 0)?;
    if seq.0 != applied + 1 {
        return Err(Fault::IllegalSyscall(format!("message {seq} does not follow {}", PeerSeq(applied))));
    }
    match message {
        WireMessage::Deliver { target, method, args, result } => {
            let target = in_ref(ctx, bootstrap, *target)?;
            let args = in_data(ctx, bootstrap, args)?;
            let result = match result {
                None => None,
                Some(r) if r.is_promise() && r.ours => match in_ref(ctx, bootstrap, *r)? {
                    KRef::Promise(kp) => Some(kp),
                    KRef::Object(_) => return Err(Fault::IllegalSyscall(format!("result {r} is not a promise"))),
                },
                Some(r) => return Err(Fault::IllegalSyscall(format!("result {r} is not a promise the sender allocated"))),
            };
            ctx.send(target, method.clone(), args, result).map_err(refused)?;
            if let Some(kp) = result {
                // The link answers for the result: learn its settlement to send it back.
                ctx.subscribe(kp).map_err(refused)?;
            }
        }
        WireMessage::Resolve { resolutions } => {
            let mut settled = Vec::with_capacity(resolutions.len());
            for r in resolutions {
                let kp = match in_ref(ctx, bootstrap, r.promise)? {
                    KRef::Promise(kp) => kp,
                    KRef::Object(_) => return Err(Fault::IllegalSyscall(format!("resolve of {} which is not a promise", r.promise))),
                };
                let data = in_data(ctx, bootstrap, &r.data)?;
                settled.push((kp, if r.rejected { Settlement::Rejected(data) } else { Settlement::Fulfilled(data) }));
            }
            ctx.resolve(settled).map_err(refused)?;
        }
        WireMessage::Drop { refs, seen } | WireMessage::Retire { refs, seen } => {
            let retire = matches!(message, WireMessage::Retire { .. });
            for r in refs {
                let vref = r.flip().to_clist();
                if vref.kind != RefKind::Object || vref.allocator != Allocator::Kernel {
                    return Err(Fault::IllegalSyscall(format!("{} of {r}, which is not an object of ours", message.describe())));
                }
                // Unknown here (already retired: our exporter went) or named again since the
                // peer decided: nothing to do.
                let Some(kref) = ctx.lookup(vref).map_err(refused)? else { continue };
                if read_u64(ctx, &named_key(vref), 0)? > seen.0 {
                    continue;
                }
                let reachable = ctx.entry(kref).map_err(refused)?.is_some_and(|e| e.reachable);
                if reachable {
                    ctx.drop_imports(&[kref]).map_err(refused)?;
                }
                if retire {
                    ctx.retire_imports(&[kref]).map_err(refused)?;
                    ctx.vatstore_delete(&named_key(vref)).map_err(refused)?;
                }
            }
        }
        WireMessage::Retired { refs } => {
            for r in refs {
                let vref = r.flip().to_clist();
                if vref.kind != RefKind::Object || vref.allocator != Allocator::Endpoint || vref == VRef::ROOT {
                    return Err(Fault::IllegalSyscall(format!("{} of {r}, which is not an object of the sender's", message.describe())));
                }
                let Some(kref) = ctx.lookup(vref).map_err(refused)? else { continue };
                // Still reachable here (named again since): the peer will hear of it again.
                if ctx.can_retire_export(kref).map_err(refused)? {
                    ctx.retire_exports(&[kref]).map_err(refused)?;
                }
            }
        }
        WireMessage::Forget { refs } => {
            // Written by a version-2 peer. A name it lists that is no longer an alias was
            // forgotten already (by an acknowledgement, after an upgrade), and is skipped.
            let names: Vec<VRef> = refs.iter().map(|r| r.flip().to_clist()).collect();
            ctx.forget_names(&names).map_err(refused)?;
        }
    }
    ctx.vatstore_set(APPLIED_KEY, seq.0.to_be_bytes().to_vec()).map_err(refused)
}

/// Apply a batch of messages from the peer inside one immediate-path transaction (see
/// [`apply_inbound`]).
pub(crate) fn apply_batch(ctx: &mut CrankContext<'_>, bootstrap: Option<KObjectId>, batch: &[(PeerSeq, WireMessage)]) -> Result<(), Fault> {
    for (seq, message) in batch {
        apply_inbound(ctx, bootstrap, *seq, message)?;
    }
    Ok(())
}
