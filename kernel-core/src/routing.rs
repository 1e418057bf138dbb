//! Routing a `send` taken off the run queue (DESIGN §2): to an object's live owner, onto an
//! unresolved promise's queue, through a fulfilled promise to what it names, or to a rejection
//! of the message's result.

use crate::crank::Work;
use crate::error::KernelError;
use crate::gc;
use crate::ids::{EndpointId, KObjectId, KRef};
use crate::message::{CapData, Message, Settlement};
use crate::promise;
use crate::tables::{EndpointStatus, PromiseRecord, PromiseState};

/// Where a send goes.
pub(crate) enum Route {
    /// Deliver to `endpoint`, which exports `target`.
    Deliver { endpoint: EndpointId, target: KObjectId, message: Message },
    /// Nothing to deliver: the message was queued on a promise or its result rejected.
    Done,
}

/// Route `message` to `target`; queueing and rejections are written into `w`. The message's
/// references stay counted while it is queued on a promise or delivered (the caller releases
/// them once the delivery has imported what it needs); a rejected message releases them here.
pub(crate) fn route(w: &mut Work<'_>, mut target: KRef, message: Message) -> Result<Route, KernelError> {
    loop {
        match target {
            KRef::Object(o) => {
                let Some(rec) = w.db.object(o)? else {
                    reject_result(w, target, &message, CapData::error(&format!("no such object {o}")))?;
                    return Ok(Route::Done);
                };
                match w.db.endpoint_status(rec.owner)? {
                    Some(EndpointStatus::Live) if rec.abandoned => {
                        reject_result(w, target, &message, CapData::error(&format!("{o} was abandoned by its exporter")))?;
                        return Ok(Route::Done);
                    }
                    Some(EndpointStatus::Live) => return Ok(Route::Deliver { endpoint: rec.owner, target: o, message }),
                    Some(EndpointStatus::Terminated { reason }) => {
                        let why = format!("vat terminated: {} ({reason})", rec.owner);
                        reject_result(w, target, &message, CapData::error(&why))?;
                        return Ok(Route::Done);
                    }
                    None => return Err(KernelError::UnknownEndpoint(rec.owner)),
                }
            }
            KRef::Promise(p) => match w.db.with_promise(p, |r| r.map(|r| Found::of(&r.state)))? {
                None => {
                    reject_result(w, target, &message, CapData::error(&format!("no such promise {p}")))?;
                    return Ok(Route::Done);
                }
                Some(Found::Unresolved) => {
                    if let Some(PromiseRecord { state: PromiseState::Unresolved { queue, .. }, .. }) = w.db.promise_mut(p)? {
                        queue.push(message);
                    }
                    return Ok(Route::Done);
                }
                Some(Found::Fulfilled(reference)) => match reference {
                    Some(next) => {
                        w.db.incref(next, true)?;
                        w.db.decref(target, true)?;
                        target = next;
                    }
                    None => {
                        let why = format!("cannot deliver {}: {p} was fulfilled to data, not an object", message.method);
                        reject_result(w, target, &message, CapData::error(&why))?;
                        return Ok(Route::Done);
                    }
                },
                Some(Found::Rejected(reason)) => {
                    reject_result(w, target, &message, reason)?;
                    return Ok(Route::Done);
                }
            },
        }
    }
}

/// What routing needs of a promise, taken without copying its queue.
enum Found {
    Unresolved,
    /// What it was fulfilled to, if exactly a reference.
    Fulfilled(Option<KRef>),
    Rejected(CapData),
}

impl Found {
    fn of(state: &PromiseState) -> Self {
        match state {
            PromiseState::Unresolved { .. } => Found::Unresolved,
            PromiseState::Settled(Settlement::Fulfilled(data)) => Found::Fulfilled(data.as_reference()),
            PromiseState::Settled(Settlement::Rejected(reason)) => Found::Rejected(reason.clone()),
        }
    }
}

/// The message goes no further: reject its result and release its references.
fn reject_result(w: &mut Work<'_>, target: KRef, message: &Message, reason: CapData) -> Result<(), KernelError> {
    if let Some(kp) = message.result {
        promise::reject(w, kp, reason)?;
    }
    gc::remove_message_refs(&mut w.db, target, message)
}
