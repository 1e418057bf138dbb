//! Routing a `send` taken off the run queue (DESIGN §2): to an object's live owner, onto an
//! unresolved promise's queue, through a fulfilled promise to what it names, or to a rejection
//! of the message's result.

use crate::crank::Work;
use crate::error::KernelError;
use crate::gc;
use crate::ids::{EndpointId, KObjectId, KRef};
use crate::message::{CapData, Message, Settlement};
use crate::promise;
use crate::tables::{EndpointStatus, PromiseState};

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
            KRef::Promise(p) => match w.db.promise(p)? {
                None => {
                    reject_result(w, target, &message, CapData::error(&format!("no such promise {p}")))?;
                    return Ok(Route::Done);
                }
                Some(PromiseState::Unresolved { decider, subscribers, mut queue }) => {
                    queue.push(message);
                    w.db.set_promise(p, &PromiseState::Unresolved { decider, subscribers, queue })?;
                    return Ok(Route::Done);
                }
                Some(PromiseState::Settled(Settlement::Fulfilled(data))) => match data.as_reference() {
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
                Some(PromiseState::Settled(Settlement::Rejected(reason))) => {
                    reject_result(w, target, &message, reason)?;
                    return Ok(Route::Done);
                }
            },
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
