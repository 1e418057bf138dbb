//! The crate's errors: [`ParseError`] (text at the edge), [`WireError`] (a frame or message
//! that cannot be accepted), [`ProtocolError`] (a peer breaking the protocol: its connection is
//! closed) and [`RemoteError`] (a failure of the host side: kernel, store or setup).

use crate::rref::{KernelId, PeerSeq};
use kernel_core::{Fault, KernelError, StoreError};

/// Text that is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} {text:?}")]
pub struct ParseError {
    /// What was expected.
    pub what: &'static str,
    /// The offending text.
    pub text: String,
}

/// Bytes that are not an acceptable frame or message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame with no bytes at all.
    #[error("empty frame")]
    Empty,
    /// A frame of another wire version.
    #[error("unknown wire version {0}")]
    UnknownVersion(u8),
    /// A frame longer than allowed.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Bytes that do not decode.
    #[error("malformed {0}")]
    Malformed(String),
}

/// A peer broke the protocol; the connection to it is closed and nothing it sent in the
/// offending frame is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The frame did not decode.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The message applied with a fault (a forged rref, resolving a promise it does not decide,
    /// ...): the transaction was dropped.
    #[error("message {seq} refused: {fault}")]
    Refused {
        /// The message's sequence number.
        seq: PeerSeq,
        /// The fault.
        fault: Fault,
    },
    /// An acknowledgement of a message never sent.
    #[error("ack of {upto} but only {sent} were ever written")]
    AckBeyondSent {
        /// What was acknowledged.
        upto: PeerSeq,
        /// The highest sequence written to the outbox.
        sent: PeerSeq,
    },
    /// A second `Hello`, or a frame other than `Hello` first.
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
    /// The handshake named an unexpected kernel.
    #[error("handshake from {found}, expected {expected}")]
    WrongPeer {
        /// Whom we expected.
        expected: KernelId,
        /// Who said hello.
        found: KernelId,
    },
}

/// A failure of the host side of the remote layer.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The kernel failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored link record could not be decoded.
    #[error("corrupt link record for peer {peer}: {reason}")]
    Corrupt {
        /// The peer.
        peer: KernelId,
        /// What is wrong.
        reason: String,
    },
    /// The host named a peer that was never added.
    #[error("unknown peer {0}")]
    UnknownPeer(KernelId),
    /// The host asked for something refused (a peer that is ourselves, a terminated link...).
    #[error("{0}")]
    Refused(String),
    /// Encoding failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A transport failed to start.
    #[error("transport: {0}")]
    Transport(String),
}
