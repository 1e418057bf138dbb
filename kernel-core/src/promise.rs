//! Promise semantics inside a transaction (DESIGN §5): resolving once, forwarding to another
//! promise, subscribing, and gathering the settlements one `notify` carries.

use crate::crank::Work;
use crate::error::KernelError;
use crate::gc;
use crate::ids::{EndpointId, KPromiseId, KRef};
use crate::message::{CapData, RunQueueItem, Settlement};
use crate::tables::PromiseState;

/// Settle the unresolved promise `kp`.
///
/// Subscribers get a buffered `notify`; messages queued on it are buffered as sends to what it
/// resolved to (they are routed again when their crank comes). Fulfilling with a reference to
/// another promise forwards: subscribers follow to the end of that promise's chain. A
/// resolution that would make a chain of promises loop is turned into a rejection.
pub(crate) fn resolve(w: &mut Work<'_>, kp: KPromiseId, mut settlement: Settlement) -> Result<(), KernelError> {
    let Some(PromiseState::Unresolved { subscribers, queue, .. }) = w.db.promise(kp)? else {
        return Ok(()); // already settled: callers validate, so this is the kernel's own reject racing a settle
    };
    let mut follow_to: Option<KPromiseId> = None;
    if let Settlement::Fulfilled(data) = &settlement {
        if let Some(KRef::Promise(other)) = data.as_reference() {
            match chain_end(w, other)? {
                ChainEnd::Unresolved(end) if end == kp => {
                    settlement = Settlement::Rejected(CapData::error(&format!("{kp} resolved to a promise that forwards to itself")));
                }
                ChainEnd::Unresolved(end) => follow_to = Some(end),
                ChainEnd::Settled => {}
            }
        }
    }
    if let Some(end) = follow_to {
        if let Some(PromiseState::Unresolved { decider, subscribers: mut subs, queue: q }) = w.db.promise(end)? {
            let mut changed = false;
            for s in &subscribers {
                if Some(*s) != decider && !subs.contains(s) {
                    subs.push(*s);
                    changed = true;
                }
            }
            if changed {
                w.db.set_promise(end, &PromiseState::Unresolved { decider, subscribers: subs, queue: q })?;
            }
        }
    }
    let new_target = match settlement.data().as_reference() {
        Some(r) if !settlement.is_rejected() => r,
        _ => KRef::Promise(kp),
    };
    gc::add_data_refs(&mut w.db, settlement.data())?;
    w.db.set_promise(kp, &PromiseState::Settled(settlement))?;
    for endpoint in subscribers {
        w.db.incref(KRef::Promise(kp), true)?;
        w.buf.outputs.push(RunQueueItem::Notify { endpoint, promise: kp });
    }
    for message in queue {
        // Each queued message counted `kp` as its target; it now counts what `kp` resolved to.
        if new_target != KRef::Promise(kp) {
            w.db.incref(new_target, true)?;
            w.db.decref(KRef::Promise(kp), true)?;
        }
        w.buf.outputs.push(RunQueueItem::Send { target: new_target, message });
    }
    w.buf.settled.push(kp);
    Ok(())
}

/// Reject `kp` on the kernel's authority (terminations, failed routing), if still unresolved.
pub(crate) fn reject(w: &mut Work<'_>, kp: KPromiseId, reason: CapData) -> Result<(), KernelError> {
    resolve(w, kp, Settlement::Rejected(reason))
}

enum ChainEnd {
    Unresolved(KPromiseId),
    Settled,
}

/// Follow promises fulfilled to promises until an unresolved one or a final settlement.
fn chain_end(w: &Work<'_>, mut kp: KPromiseId) -> Result<ChainEnd, KernelError> {
    loop {
        match w.db.promise(kp)? {
            None => return Ok(ChainEnd::Settled),
            Some(PromiseState::Unresolved { .. }) => return Ok(ChainEnd::Unresolved(kp)),
            Some(PromiseState::Settled(Settlement::Fulfilled(d))) => match d.as_reference() {
                Some(KRef::Promise(next)) => kp = next,
                _ => return Ok(ChainEnd::Settled),
            },
            Some(PromiseState::Settled(Settlement::Rejected(_))) => return Ok(ChainEnd::Settled),
        }
    }
}

/// Subscribe `ep` to `kp`: noted if unresolved, or a `notify` buffered at once if settled.
pub(crate) fn subscribe(w: &mut Work<'_>, ep: EndpointId, kp: KPromiseId) -> Result<(), KernelError> {
    match w.db.promise(kp)? {
        Some(PromiseState::Unresolved { decider, mut subscribers, queue }) => {
            if !subscribers.contains(&ep) {
                subscribers.push(ep);
                w.db.set_promise(kp, &PromiseState::Unresolved { decider, subscribers, queue })?;
            }
        }
        Some(PromiseState::Settled(_)) => {
            w.db.incref(KRef::Promise(kp), true)?;
            w.buf.outputs.push(RunQueueItem::Notify { endpoint: ep, promise: kp });
        }
        None => return Err(KernelError::UnknownRef(KRef::Promise(kp))),
    }
    Ok(())
}

/// Take `ep` off `kp`'s subscribers, if it is unresolved and `ep` is one: the endpoint dropped
/// it and will not be told when it settles. (A notify already queued for a settled promise is
/// not delivered to an endpoint whose c-list no longer holds the promise.)
pub(crate) fn unsubscribe(w: &mut Work<'_>, ep: EndpointId, kp: KPromiseId) -> Result<(), KernelError> {
    if let Some(PromiseState::Unresolved { decider, mut subscribers, queue }) = w.db.promise(kp)? {
        if subscribers.contains(&ep) {
            subscribers.retain(|s| *s != ep);
            w.db.set_promise(kp, &PromiseState::Unresolved { decider, subscribers, queue })?;
        }
    }
    Ok(())
}

/// The settlement of `kp` and of every already-settled promise its data names (transitively),
/// in the order found: what one `notify` delivery carries.
pub(crate) fn resolutions_for_notify(w: &Work<'_>, kp: KPromiseId) -> Result<Vec<(KPromiseId, Settlement)>, KernelError> {
    let mut out: Vec<(KPromiseId, Settlement)> = Vec::new();
    let mut pending = vec![kp];
    while let Some(p) = pending.pop() {
        if out.iter().any(|(q, _)| *q == p) {
            continue;
        }
        if let Some(PromiseState::Settled(s)) = w.db.promise(p)? {
            for slot in s.data().slots.iter().rev() {
                if let KRef::Promise(q) = slot {
                    pending.push(*q);
                }
            }
            out.push((p, s));
        }
    }
    Ok(out)
}
