//! What one peer may make a kernel hold or do ([`InboundLimits`]), and the bookkeeping the TCP
//! transport enforces them with: a [`TokenBucket`] per connection (inbound bytes per second),
//! and a [`ConnectionGate`] (handshakes in progress per address, connections accepted per peer
//! in a window).
//!
//! Nothing here drops a message a peer was promised: a flooding peer is slowed (its reader stops
//! reading, so TCP pushes back on it), a peer over its connection budget is refused and redials
//! later, and Ken retransmits anything a refused connection carried.

use crate::rref::KernelId;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Limits on inbound traffic and connections, per peer (see [`crate::tcp::TcpConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundLimits {
    /// Bytes of received frames a connection may have waiting for the host. While this many
    /// wait, the connection's reader stops reading, and TCP holds the sender back.
    pub queued_bytes: usize,
    /// Bytes of frames waiting to be written to one peer. Past it, [`crate::Transport::send`]
    /// drops the frame (as for a peer not connected: Ken resends it), so a peer that does not
    /// read cannot make this kernel buffer without bound.
    pub outbound_queued_bytes: usize,
    /// Sustained inbound bytes per second one connection may send; the reader waits past it.
    pub bytes_per_sec: u64,
    /// How far above the rate a connection may burst.
    pub burst_bytes: u64,
    /// Each frame counts as at least this many bytes against the rate, so a flood of tiny
    /// frames is held back too.
    pub min_frame_cost: u64,
    /// The largest handshake message (a Noise XX message is under 100 bytes).
    pub max_handshake_message: usize,
    /// Connections from one address still in their handshake; more are closed at once.
    pub handshakes_per_address: usize,
    /// Connections accepted from one authenticated peer within [`InboundLimits::connect_window`];
    /// more are refused (each would make this kernel resend its backlog).
    pub connects_per_peer: usize,
    /// The window of [`InboundLimits::connects_per_peer`].
    pub connect_window: Duration,
    /// Transport events one [`crate::tcp::serve_once`] round handles at most, so a busy peer
    /// cannot keep the host loop from running cranks and applying what it has.
    pub events_per_round: usize,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits {
            queued_bytes: 8 << 20,
            outbound_queued_bytes: 64 << 20,
            bytes_per_sec: 256 << 20,
            burst_bytes: 32 << 20,
            min_frame_cost: 256,
            max_handshake_message: 1024,
            handshakes_per_address: 16,
            connects_per_peer: 16,
            connect_window: Duration::from_secs(10),
            events_per_round: 8192,
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved. Taking more than there are
/// goes into debt, and the taker waits until the debt is paid.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// Tokens available; negative: debt.
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        TokenBucket { rate: rate.max(1), burst, tokens: burst as f64, at: now }
    }

    /// Take `n` tokens at `now`; returns how long to wait before going on (zero if none).
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst as f64);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

/// Connection accounting across a transport: handshakes in progress per address, and
/// connections accepted per authenticated peer in a sliding window.
#[derive(Debug, Default)]
pub struct ConnectionGate {
    handshaking: HashMap<IpAddr, usize>,
    accepted: HashMap<KernelId, VecDeque<Instant>>,
}

impl ConnectionGate {
    /// A connection from `addr` starts its handshake; false (refuse it) if `addr` already has
    /// `limit` in progress. A true answer must be matched by [`ConnectionGate::end_handshake`].
    pub fn begin_handshake(&mut self, addr: IpAddr, limit: usize) -> bool {
        let n = self.handshaking.entry(addr).or_insert(0);
        if *n >= limit {
            return false;
        }
        *n += 1;
        true
    }

    /// A handshake from `addr` ended (either way).
    pub fn end_handshake(&mut self, addr: IpAddr) {
        if let Some(n) = self.handshaking.get_mut(&addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.handshaking.remove(&addr);
            }
        }
    }

    /// Handshakes in progress from `addr`.
    pub fn handshaking(&self, addr: IpAddr) -> usize {
        self.handshaking.get(&addr).copied().unwrap_or(0)
    }

    /// Admit an authenticated connection from `peer` at `now`, or say why not: at most `limit`
    /// within `window`.
    pub fn admit(&mut self, peer: &KernelId, now: Instant, limit: usize, window: Duration) -> Result<(), String> {
        let recent = self.accepted.entry(peer.clone()).or_default();
        while recent.front().is_some_and(|t| now.saturating_duration_since(*t) >= window) {
            recent.pop_front();
        }
        if recent.len() >= limit {
            return Err(format!("too many connections from {peer}: {} in the last {window:?}", recent.len()));
        }
        recent.push_back(now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_lets_a_burst_through_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 500, t0);
        assert_eq!(b.take(500, t0), Duration::ZERO);
        assert_eq!(b.take(1000, t0), Duration::from_secs(1));
        // A second later the debt is paid, nothing saved.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.take(0, t1), Duration::ZERO);
        assert_eq!(b.take(100, t1), Duration::from_millis(100));
        // Idle time refills only up to the burst.
        let t2 = t1 + Duration::from_secs(100);
        assert_eq!(b.take(500, t2), Duration::ZERO);
        assert!(b.take(1, t2) > Duration::ZERO);
    }

    #[test]
    fn handshakes_per_address_and_connections_per_peer_are_capped() {
        let mut g = ConnectionGate::default();
        let (x, y): (IpAddr, IpAddr) = ("127.0.0.1".parse().expect("ip"), "127.0.0.2".parse().expect("ip"));
        assert!(g.begin_handshake(x, 2) && g.begin_handshake(x, 2));
        assert!(!g.begin_handshake(x, 2), "a third handshake from x is refused");
        assert!(g.begin_handshake(y, 2), "other addresses are unaffected");
        g.end_handshake(x);
        assert_eq!(g.handshaking(x), 1);
        assert!(g.begin_handshake(x, 2));
        let peer: KernelId = "p".parse().expect("id");
        let other: KernelId = "q".parse().expect("id");
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        for i in 0..3 {
            g.admit(&peer, t0 + Duration::from_secs(i), 3, w).expect("within the budget");
        }
        assert!(g.admit(&peer, t0 + Duration::from_secs(5), 3, w).is_err());
        g.admit(&other, t0 + Duration::from_secs(5), 3, w).expect("other peers are unaffected");
        g.admit(&peer, t0 + Duration::from_secs(10), 3, w).expect("the window moved on");
    }
}
