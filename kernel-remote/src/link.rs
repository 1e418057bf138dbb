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
//! Known gap: the kernel forgets a peer-allocated `+` ref when it is retired (distributed GC,
//! not yet carried across links: `collect` deliveries are ignored here) or, for a result
//! promise, after the notify that sends its settlement back; kernel-core then refuses that ref
//! as stale. A peer that names it again — a message sent before our `Resolve` (or a future
//! `Retire`) reached it — is refused, and the link stops there (see the ignored test in
//! `tests/gate.rs`). Closing it needs the link to keep such refs, or their settlements, until the
//! peer can no longer name them (the peer's outbox position at the time it applied our message,
//! carried on its acks), with kernel-core letting a link keep or revive them.

use crate::rref::{PeerSeq, RRef};
use crate::wire::{WireData, WireMessage, WireResolution};
use kernel_core::{
    Allocator, CapData, CrankContext, Endpoint, Fault, KObjectId, KPromiseId, KRef, KernelDelivery, Settlement, SyscallError,
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
}

/// Shared between the link endpoints (inside the kernel) and the node (the host): entries wait
/// here until the commit event of the crank that wrote them.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// Bumped by the node before each crank; staged entries carry the crank's generation.
    pub generation: u64,
    /// Written by the running crank: `(generation, entry)`.
    pub staged: Vec<(u64, Staged)>,
    /// Promoted by a commit event, waiting for the node to stamp them with the store position.
    pub committed: Vec<Staged>,
}

impl Gate {
    /// The commit event of the current crank: its staged entries are committed; anything staged
    /// by an earlier crank that never committed is dropped.
    pub fn on_commit(&mut self) {
        let generation = self.generation;
        for (g, s) in self.staged.drain(..) {
            if g == generation {
                self.committed.push(s);
            }
        }
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
}

impl Out<'_, '_> {
    fn rref(&mut self, kref: KRef) -> Result<RRef, Fault> {
        if let (KRef::Object(o), Some(b)) = (kref, self.bootstrap) {
            if o == b {
                return Ok(RRef::BOOTSTRAP);
            }
        }
        let vref = self.ctx.import(kref).map_err(kernel_fault)?;
        Ok(RRef::from_clist(vref))
    }

    /// A promise in data: if this kernel decides it (it is not the peer's), subscribe so its
    /// settlement follows it across the link.
    fn slot(&mut self, kref: KRef) -> Result<RRef, Fault> {
        let r = self.rref(kref)?;
        if let KRef::Promise(kp) = kref {
            if r.to_clist().allocator == Allocator::Kernel && !self.subscribed.contains(&kp) {
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
        let mut out = Out { ctx, bootstrap: self.bootstrap.get(), subscribed: Vec::new() };
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
        let ctx = out.ctx;
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
                WireMessage::Resolve { resolutions } => {
                    let error = CapData::error(&why);
                    let resolutions = resolutions
                        .into_iter()
                        .map(|r| WireResolution {
                            promise: r.promise,
                            rejected: true,
                            data: WireData { body: error.body.clone(), slots: vec![] },
                        })
                        .collect();
                    bytes = WireMessage::Resolve { resolutions }.encode().map_err(|e| Fault::VatError(e.to_string()))?;
                }
            }
        }
        let seq = match ctx.vatstore_get(NEXT_SEQ_KEY).map_err(kernel_fault)? {
            None => 1,
            Some(v) => decode_u64(&v).ok_or_else(|| Fault::VatError("corrupt next-sequence record".into()))?,
        };
        ctx.vatstore_set(&outbox_key(seq), bytes.clone()).map_err(kernel_fault)?;
        ctx.vatstore_set(NEXT_SEQ_KEY, (seq + 1).to_be_bytes().to_vec()).map_err(kernel_fault)?;
        // Last, after every fallible step: staged entries leave only on this crank's commit event.
        let mut gate = self.gate.borrow_mut();
        let generation = gate.generation;
        gate.staged.push((generation, Staged { link: self.index, seq, message: bytes }));
        Ok(())
    }
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
    let applied = match ctx.vatstore_get(APPLIED_KEY).map_err(refused)? {
        None => 0,
        Some(v) => decode_u64(&v).ok_or_else(|| Fault::VatError("corrupt applied-sequence record".into()))?,
    };
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
    }
    ctx.vatstore_set(APPLIED_KEY, seq.0.to_be_bytes().to_vec()).map_err(refused)?;
    Ok(())
}
