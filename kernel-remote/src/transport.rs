//! The transport seam: what the node needs from a network ([`Transport`]) and what a network
//! reports ([`TransportEvent`]). Implementations: the deterministic simulated network
//! ([`crate::sim::SimNet`]) and TCP ([`crate::tcp::TcpTransport`]).
//!
//! A transport moves whole frames between kernels it has identified (for TCP: by the `Hello`
//! handshake). It never blocks: `send` queues, and a frame to a peer that is not connected is
//! dropped (the node retransmits after reconnecting).

use crate::rref::KernelId;

/// Something the network reports to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// A connection to `peer` is up (after the handshake): the node resends what is unacked.
    Connected(KernelId),
    /// The connection to `peer` is gone, for `reason`.
    Disconnected(KernelId, String),
    /// A frame arrived from `peer`.
    Frame(KernelId, Vec<u8>),
}

/// The network as the node sees it.
pub trait Transport {
    /// Queue `frame` for `peer`; dropped if not connected. Never blocks.
    fn send(&mut self, peer: &KernelId, frame: Vec<u8>);

    /// Put the frames queued by [`Transport::send`] on the wire now (the node calls it at the end
    /// of each [`crate::Node::pump`], so one round's frames can leave together). A transport that
    /// sends at once does nothing.
    fn flush(&mut self) {}

    /// Close the connection to `peer` (a protocol violation), logging `reason`.
    fn close(&mut self, peer: &KernelId, reason: &str);

    /// The next event, if one is ready. Never blocks.
    fn poll_event(&mut self) -> Option<TransportEvent>;
}
