//! The identity check every connection passes before the node hears of it, on TCP and in the
//! simulation alike: the peer's `Hello` must decode, must not name this kernel, must name the
//! kernel the dialer meant to reach, and — when the connection's security authenticated a key —
//! must name the kernel that key is allowed as. Ken state (outbox, sequence numbers, c-list) is
//! keyed by [`KernelId`], so this check is what binds it to the peer's key: whoever holds the
//! key keeps the session from any address, and nobody else reaches it.

use crate::error::WireError;
use crate::rref::KernelId;
use crate::wire::Frame;

/// Why a connection's `Hello` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The first frame did not decode.
    #[error("bad hello: {0}")]
    Wire(#[from] WireError),
    /// The first frame was not a `Hello`.
    #[error("the first frame was not a hello")]
    NotHello,
    /// The peer claims this kernel's own id.
    #[error("hello from a kernel with our own id {0}")]
    Ourselves(KernelId),
    /// The dialed peer answered with another id.
    #[error("hello from {found}, expected {expected}")]
    WrongPeer {
        /// Whom we dialed.
        expected: KernelId,
        /// Who answered.
        found: KernelId,
    },
    /// The `Hello` names another kernel than the one the authenticated key is allowed as.
    #[error("hello names {claimed} but the connection's key is allowed as {authenticated}")]
    Impostor {
        /// The kernel the key speaks for.
        authenticated: KernelId,
        /// The kernel the hello claimed.
        claimed: KernelId,
    },
}

/// Check the peer's `Hello` frame `bytes` on a connection of kernel `me`; `expected` is the
/// kernel dialed (`None` when accepting), `authenticated` the kernel the security layer proved
/// the peer to be (`None` for a security that does not authenticate). Returns the peer.
pub fn check_hello(
    me: &KernelId,
    expected: Option<&KernelId>,
    authenticated: Option<&KernelId>,
    bytes: &[u8],
    max: usize,
) -> Result<KernelId, HelloError> {
    let Frame::Hello { kernel } = Frame::decode(bytes, max)? else {
        return Err(HelloError::NotHello);
    };
    if let Some(a) = authenticated {
        if *a != kernel {
            return Err(HelloError::Impostor { authenticated: a.clone(), claimed: kernel });
        }
    }
    if let Some(e) = expected {
        if *e != kernel {
            return Err(HelloError::WrongPeer { expected: e.clone(), found: kernel });
        }
    }
    if kernel == *me {
        return Err(HelloError::Ourselves(kernel));
    }
    Ok(kernel)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rref::PeerSeq;

    fn id(s: &str) -> KernelId {
        s.parse().expect("id")
    }

    fn hello(s: &str) -> Vec<u8> {
        Frame::Hello { kernel: id(s) }.encode().expect("encode")
    }

    #[test]
    fn a_hello_is_bound_to_the_authenticated_key() {
        let (me, a, b) = (id("me"), id("a"), id("b"));
        assert_eq!(check_hello(&me, None, None, &hello("a"), 1024), Ok(a.clone()));
        assert_eq!(check_hello(&me, Some(&a), Some(&a), &hello("a"), 1024), Ok(a.clone()));
        assert!(matches!(check_hello(&me, None, Some(&b), &hello("a"), 1024), Err(HelloError::Impostor { .. })));
        assert!(matches!(check_hello(&me, Some(&b), None, &hello("a"), 1024), Err(HelloError::WrongPeer { .. })));
        assert!(matches!(check_hello(&me, None, None, &hello("me"), 1024), Err(HelloError::Ourselves(_))));
        let ack = Frame::Ack { upto: PeerSeq(1), written: PeerSeq(0) }.encode().expect("encode");
        assert_eq!(check_hello(&me, None, None, &ack, 1024), Err(HelloError::NotHello));
        assert!(matches!(check_hello(&me, None, None, &[], 1024), Err(HelloError::Wire(_))));
    }
}
