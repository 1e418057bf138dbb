//! Values that travel through the kernel: [`CapData`], [`Message`], [`Settlement`] and the
//! run-queue items ([`RunQueueItem`]).

use crate::gc::GcAction;
use crate::ids::{EndpointId, KPromiseId, KRef};
use serde::{Deserialize, Serialize};

/// Data with capabilities: an opaque body and the references it carries, in order.
///
/// The kernel never parses `body` except to recognise the one reserved shape
/// [`CapData::REF_BODY`] (a value that *is* its single slot), which it needs to forward promises
/// and to re-target messages sent to a promise fulfilled to an object. The documented body
/// encoding is JSON with `{"$slot":N}` marking the N-th slot, and `{"$error":"..."}` for errors
/// the kernel makes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CapData {
    /// The encoded value.
    pub body: Vec<u8>,
    /// The references the value carries.
    pub slots: Vec<KRef>,
}

impl CapData {
    /// The body of a value that is exactly its single slot.
    pub const REF_BODY: &'static [u8] = br#"{"$slot":0}"#;

    /// Data with no references.
    pub fn plain(body: impl Into<Vec<u8>>) -> Self {
        CapData { body: body.into(), slots: Vec::new() }
    }

    /// A value that is exactly one reference.
    pub fn reference(r: KRef) -> Self {
        CapData { body: Self::REF_BODY.to_vec(), slots: vec![r] }
    }

    /// An error value made by the kernel: `{"$error":"<message>"}` (JSON-escaped).
    pub fn error(message: &str) -> Self {
        let mut body = Vec::with_capacity(message.len() + 14);
        body.extend_from_slice(br#"{"$error":""#);
        json_escape_into(message, &mut body);
        body.extend_from_slice(br#""}"#);
        CapData { body, slots: Vec::new() }
    }

    /// If this value is exactly one reference, that reference.
    pub fn as_reference(&self) -> Option<KRef> {
        match self.slots.as_slice() {
            [r] if self.body == Self::REF_BODY => Some(*r),
            _ => None,
        }
    }
}

fn json_escape_into(s: &str, out: &mut Vec<u8>) {
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 => out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes()),
            c => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
}

/// A method call: `method(args)`, with an optional promise for its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// The method name.
    pub method: String,
    /// The arguments.
    pub args: CapData,
    /// The promise the receiver decides with its answer, if the sender wants one.
    pub result: Option<KPromiseId>,
}

/// How a promise settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settlement {
    /// Fulfilled with a value.
    Fulfilled(CapData),
    /// Rejected with a reason.
    Rejected(CapData),
}

impl Settlement {
    /// The value or reason.
    pub fn data(&self) -> &CapData {
        match self {
            Settlement::Fulfilled(d) | Settlement::Rejected(d) => d,
        }
    }

    /// True if rejected.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Settlement::Rejected(_))
    }
}

/// One item on the kernel's run queue; each is one crank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunQueueItem {
    /// Deliver `message` to whatever `target` designates (DESIGN §2 routing).
    Send {
        /// An object or promise.
        target: KRef,
        /// The call.
        message: Message,
    },
    /// Tell `endpoint` that `promise` has settled.
    Notify {
        /// The subscriber.
        endpoint: EndpointId,
        /// The settled promise.
        promise: KPromiseId,
    },
    /// A garbage-collection delivery (DESIGN §6) to `endpoint`.
    Gc {
        /// Who is told.
        endpoint: EndpointId,
        /// What about.
        action: GcAction,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::KObjectId;

    #[test]
    fn a_reference_value_is_recognised_and_nothing_else_is() {
        let r = KRef::Object(KObjectId(4));
        assert_eq!(CapData::reference(r).as_reference(), Some(r));
        let two = CapData { body: CapData::REF_BODY.to_vec(), slots: vec![r, r] };
        assert_eq!(two.as_reference(), None);
        let other = CapData { body: b"[{\"$slot\":0}]".to_vec(), slots: vec![r] };
        assert_eq!(other.as_reference(), None);
    }

    #[test]
    fn error_bodies_are_escaped_json() {
        let e = CapData::error("bad \"x\"\n");
        assert_eq!(e.body, br#"{"$error":"bad \"x\"\n"}"#.to_vec());
    }
}
