//! Promise semantics inside a transaction (DESIGN §5): resolving once, forwarding to another
//! promise, subscribing, and gathering the settlements one `notify` carries.

use crate::crank::Work;
use crate::error::KernelError;
use crate::gc;
use crate::ids::{EndpointId, KPromiseId, KRef};
use crate::message::{CapData, RunQueueItem, Settlement};
use crate::tables::{PromiseRecord, PromiseState};
use std::mem::take;
use std::ops::ControlFlow;

/// Settle the unresolved promise `kp`.
///
/// Subscribers get a buffered `notify`; messages queued on it are buffered as sends to what it
/// resolved to (they are routed again when their crank comes). Fulfilling with a reference to
/// another promise forwards: subscribers follow to the end of that promise's chain. A
/// resolution that would make a chain of promises loop is turned into a rejection.
pub(crate) fn resolve(w: &mut Work<'_>, kp: KPromiseId, mut settlement: Settlement) -> Result<(), KernelError> {
    // Its subscribers and queued messages leave the record, which is settled below.
    let (subscribers, queue) = match w.db.promise_mut(kp)? {
        Some(PromiseRecord { state: PromiseState::Unresolved { subscribers, queue, .. }, .. }) => (take(subscribers), take(queue)),
        // Already settled: callers validate, so this is the kernel's own reject racing a settle.
        _ => return Ok(()),
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
        let joining = w.db.with_promise(end, |r| match r.map(|r| &r.state) {
            Some(PromiseState::Unresolved { decider, subscribers: subs, .. }) => {
                subscribers.iter().any(|s| Some(*s) != *decider && !subs.contains(s))
            }
            _ => false,
        })?;
        if joining {
            if let Some(PromiseRecord { state: PromiseState::Unresolved { decider, subscribers: subs, .. }, .. }) = w.db.promise_mut(end)? {
                for s in &subscribers {
                    if Some(*s) != *decider && !subs.contains(s) {
                        subs.push(*s);
                    }
                }
            }
        }
    }
    let new_target = match settlement.data().as_reference() {
        Some(r) if !settlement.is_rejected() => r,
        _ => KRef::Promise(kp),
    };
    gc::add_data_refs(&mut w.db, settlement.data())?;
    w.db.set_promise(kp, PromiseState::Settled(settlement))?;
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
        let step = w.db.with_promise(kp, |r| match r.map(|r| &r.state) {
            None => ControlFlow::Break(ChainEnd::Settled),
            Some(PromiseState::Unresolved { .. }) => ControlFlow::Break(ChainEnd::Unresolved(kp)),
            Some(PromiseState::Settled(Settlement::Fulfilled(d))) => match d.as_reference() {
                Some(KRef::Promise(next)) => ControlFlow::Continue(next),
                _ => ControlFlow::Break(ChainEnd::Settled),
            },
            Some(PromiseState::Settled(Settlement::Rejected(_))) => ControlFlow::Break(ChainEnd::Settled),
        })?;
        match step {
            ControlFlow::Break(end) => return Ok(end),
            ControlFlow::Continue(next) => kp = next,
        }
    }
}

/// Subscribe `ep` to `kp`: noted if unresolved, or a `notify` buffered at once if settled.
pub(crate) fn subscribe(w: &mut Work<'_>, ep: EndpointId, kp: KPromiseId) -> Result<(), KernelError> {
    // `Some(subscribed)` while unresolved.
    let unresolved = w.db.with_promise(kp, |r| {
        r.map(|r| match &r.state {
            PromiseState::Unresolved { subscribers, .. } => Some(subscribers.contains(&ep)),
            PromiseState::Settled(_) => None,
        })
    })?;
    match unresolved {
        Some(Some(true)) => {}
        Some(Some(false)) => {
            if let Some(PromiseRecord { state: PromiseState::Unresolved { subscribers, .. }, .. }) = w.db.promise_mut(kp)? {
                subscribers.push(ep);
            }
        }
        Some(None) => {
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
    let subscribed = w.db.with_promise(
        kp,
        |r| matches!(r.map(|r| &r.state), Some(PromiseState::Unresolved { subscribers, .. }) if subscribers.contains(&ep)),
    )?;
    if subscribed {
        if let Some(PromiseRecord { state: PromiseState::Unresolved { subscribers, .. }, .. }) = w.db.promise_mut(kp)? {
            subscribers.retain(|s| *s != ep);
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
        let settled = w.db.with_promise(p, |r| match r.map(|r| &r.state) {
            Some(PromiseState::Settled(s)) => Some(s.clone()),
            _ => None,
        })?;
        if let Some(s) = settled {
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
