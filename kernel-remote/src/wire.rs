//! The wire format: every frame is one version byte ([`WIRE_VERSION`]) followed by a postcard
//! encoded [`Frame`]. A frame carrying a message carries it as the exact bytes stored in the
//! sender's outbox (a postcard [`WireMessage`]), so a retransmission is byte-identical.
//!
//! Compatibility: a peer that sees another version byte closes the connection. New message
//! kinds are added as new variants at the end of [`WireMessage`]; a kernel that does not know a
//! variant fails to decode it and treats the frame as malformed, so such an addition bumps
//! [`WIRE_VERSION`] (version 2 added the distributed-GC messages `Drop`, `Retire`, `Retired` and
//! `Forget`; version 3 added `written` to `Ack`, which does `Forget`'s work: see
//! [`Frame::Ack`]).

use crate::error::WireError;
use crate::rref::{KernelId, PeerSeq, RRef};
use serde::{Deserialize, Serialize};

/// The version byte every frame starts with.
pub const WIRE_VERSION: u8 = 3;

/// The largest frame accepted by default (16 MiB), version byte included.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// One unit on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// The first frame each way on a connection: who is speaking.
    Hello {
        /// The sender's kernel id.
        kernel: KernelId,
    },
    /// Outbox entry `seq` of the sender's outbox for this peer.
    Data {
        /// Its per-peer sequence number.
        seq: PeerSeq,
        /// The encoded [`WireMessage`], exactly as stored in the outbox.
        message: Vec<u8>,
    },
    /// Cumulative acknowledgement: every message up to and including `upto` is applied and
    /// committed (and durable, when the receiver's store is asked to be).
    ///
    /// It also lets the receiver of the ack forget the names of the promises its `Resolve`s up
    /// to `upto` settled. The sender of the ack applied those `Resolve`s, so it will never name
    /// those promises under those names again; every message it wrote before applying them is
    /// at or below `written`. Once the receiver has applied the sender's messages up to
    /// `written`, no message naming them can still arrive. (Before version 3 a `Forget` message
    /// said this for each `Resolve`.)
    Ack {
        /// The highest sequence applied.
        upto: PeerSeq,
        /// The highest sequence of the sender's own outbox for this peer that is committed (and
        /// durable, when asked to be).
        written: PeerSeq,
    },
}

/// Data with references, as the sender names them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct WireData {
    /// The opaque body.
    pub body: Vec<u8>,
    /// The references, in order, as sender rrefs.
    pub slots: Vec<RRef>,
}

/// One settled promise in a [`WireMessage::Resolve`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireResolution {
    /// The promise (a sender rref).
    pub promise: RRef,
    /// True if rejected.
    pub rejected: bool,
    /// The value or reason.
    pub data: WireData,
}

/// A message from one kernel to another: what a link's outbox holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireMessage {
    /// `target.method(args)`; the receiver decides `result`, a promise the sender allocated.
    Deliver {
        /// An object the receiver hosts.
        target: RRef,
        /// The method.
        method: String,
        /// The arguments.
        args: WireData,
        /// The result promise, if the sender wants one.
        result: Option<RRef>,
    },
    /// Promises the receiver subscribed to (or whose result it is waiting for) have settled.
    Resolve {
        /// The settlements, first the one notified, then those its data names.
        resolutions: Vec<WireResolution>,
    },
    /// Distributed GC: the sender can no longer reach these objects of the receiver's (its
    /// imports). `seen` is the highest of the receiver's messages the sender had applied when
    /// it decided: if the receiver has named one of them in a later message, that message
    /// makes it reachable again at the sender, and the receiver ignores the drop of it.
    Drop {
        /// The objects, as the sender names them (the receiver's exports: `ro-N`).
        refs: Vec<RRef>,
        /// The highest of the receiver's messages the sender had applied.
        seen: PeerSeq,
    },
    /// Distributed GC: the sender can no longer even recognise these objects of the
    /// receiver's, and has forgotten them; `seen` as for [`WireMessage::Drop`] (an object the
    /// receiver named again after `seen` is a new import at the sender).
    Retire {
        /// The objects, as the sender names them (`ro-N`).
        refs: Vec<RRef>,
        /// The highest of the receiver's messages the sender had applied.
        seen: PeerSeq,
    },
    /// Distributed GC: these exports of the sender's are gone (their exporter retired or
    /// abandoned them, and the receiver had dropped them): the receiver forgets them.
    Retired {
        /// The objects, as the sender names them (its own: `ro+N`).
        refs: Vec<RRef>,
    },
    /// The sender has applied the receiver's resolution of these promises and will never name
    /// them again under these names: the receiver may forget the names (see
    /// `kernel_core::Endpoint::is_peer_kernel`). Written by version 2 only (version 3 says it
    /// with [`Frame::Ack`]'s `written`); an outbox written by version 2 may still hold some,
    /// and they are applied, names already forgotten skipped.
    Forget {
        /// The promises, as the sender names them.
        refs: Vec<RRef>,
    },
}

impl WireMessage {
    /// The postcard encoding stored in the outbox.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        postcard::to_allocvec(self).map_err(|e| WireError::Malformed(format!("encoding a message: {e}")))
    }

    /// Decode an outbox entry or a received message.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(format!("message: {e}")))
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            WireMessage::Deliver { target, method, .. } => format!("deliver {target}.{method}"),
            WireMessage::Resolve { resolutions } => match resolutions.first() {
                Some(r) => format!("resolve {}", r.promise),
                None => "resolve".into(),
            },
            WireMessage::Drop { refs, .. } => format!("drop {}", list(refs)),
            WireMessage::Retire { refs, .. } => format!("retire {}", list(refs)),
            WireMessage::Retired { refs } => format!("retired {}", list(refs)),
            WireMessage::Forget { refs } => format!("forget {}", list(refs)),
        }
    }
}

fn list(refs: &[RRef]) -> String {
    refs.iter().map(RRef::to_string).collect::<Vec<_>>().join(" ")
}

impl Frame {
    /// The frame's bytes: the version byte, then postcard.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = vec![WIRE_VERSION];
        postcard::to_io(self, &mut out).map_err(|e| WireError::Malformed(format!("encoding a frame: {e}")))?;
        Ok(out)
    }

    /// Decode one frame, refusing an empty, oversized, other-version or malformed one.
    pub fn decode(bytes: &[u8], max: usize) -> Result<Self, WireError> {
        if bytes.len() > max {
            return Err(WireError::Oversized { len: bytes.len(), max });
        }
        let Some((&version, body)) = bytes.split_first() else {
            return Err(WireError::Empty);
        };
        if version != WIRE_VERSION {
            return Err(WireError::UnknownVersion(version));
        }
        let (frame, rest) = postcard::take_from_bytes::<Frame>(body).map_err(|e| WireError::Malformed(format!("frame: {e}")))?;
        if !rest.is_empty() {
            return Err(WireError::Malformed(format!("{} bytes after the frame", rest.len())));
        }
        Ok(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> WireMessage {
        WireMessage::Deliver {
            target: "ro-0".parse().expect("rref"),
            method: "incr".into(),
            args: WireData { body: b"[1]".to_vec(), slots: vec!["rp+2".parse().expect("rref")] },
            result: Some("rp+1".parse().expect("rref")),
        }
    }

    #[test]
    fn frames_round_trip() {
        let msg = sample().encode().expect("encode");
        assert_eq!(WireMessage::decode(&msg).expect("decode"), sample());
        let r: RRef = "ro-3".parse().expect("rref");
        for m in [
            WireMessage::Drop { refs: vec![r], seen: PeerSeq(9) },
            WireMessage::Retire { refs: vec![r, r.flip()], seen: PeerSeq(0) },
            WireMessage::Retired { refs: vec![r.flip()] },
            WireMessage::Forget { refs: vec!["rp+2".parse().expect("rref")] },
        ] {
            assert_eq!(WireMessage::decode(&m.encode().expect("encode")).expect("decode"), m);
        }
        for f in [
            Frame::Hello { kernel: "a".parse().expect("id") },
            Frame::Data { seq: PeerSeq(7), message: msg.clone() },
            Frame::Ack { upto: PeerSeq(u64::MAX), written: PeerSeq(3) },
        ] {
            let bytes = f.encode().expect("encode");
            assert_eq!(bytes[0], WIRE_VERSION);
            assert_eq!(Frame::decode(&bytes, DEFAULT_MAX_FRAME).expect("decode"), f);
        }
    }

    #[test]
    fn bad_frames_are_refused_with_the_reason() {
        let good = Frame::Ack { upto: PeerSeq(3), written: PeerSeq(0) }.encode().expect("encode");
        assert!(matches!(Frame::decode(&[], 100), Err(WireError::Empty)));
        let mut other = good.clone();
        other[0] = 9;
        assert!(matches!(Frame::decode(&other, 100), Err(WireError::UnknownVersion(9))));
        assert!(matches!(Frame::decode(&good, 1), Err(WireError::Oversized { .. })));
        assert!(matches!(Frame::decode(&[WIRE_VERSION, 0xff, 0xff], 100), Err(WireError::Malformed(_))));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(Frame::decode(&trailing, 100), Err(WireError::Malformed(_))));
        // A kernel id that breaks the rules is malformed, not accepted.
        let bad_id = [WIRE_VERSION, 0, 3, b'a', b' ', b'b'];
        assert!(matches!(Frame::decode(&bad_id, 100), Err(WireError::Malformed(_))));
    }
}
