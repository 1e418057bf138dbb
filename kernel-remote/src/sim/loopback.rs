//! [`LoopbackPair`]: two nodes on a perfect simulated network, run until nothing moves. For
//! examples and unit tests.

use super::net::{NetFaults, SimIdentities, SimNet};
use super::rng::Rng;
use crate::durable::DurableStore;
use crate::error::RemoteError;
use crate::node::Node;
use crate::transport::Transport;
use std::time::Duration;

/// Two connected nodes on a fault-free [`SimNet`] with a virtual clock.
#[derive(Debug)]
pub struct LoopbackPair {
    net: SimNet,
    now: Duration,
}

impl LoopbackPair {
    /// Connect `a` (index 0) and `b` (index 1).
    pub fn connected<S: DurableStore, T: DurableStore>(a: &mut Node<S>, b: &mut Node<T>) -> Result<Self, RemoteError> {
        let names = vec![a.id().clone(), b.id().clone()];
        let ids = SimIdentities::derived(&names, 0);
        let mut net = SimNet::new(names, Rng::new(0), NetFaults::NONE).with_identities(ids);
        net.connect(0, 1);
        Ok(LoopbackPair { net, now: Duration::ZERO })
    }

    /// The network, e.g. to disconnect or inspect.
    pub fn net(&mut self) -> &mut SimNet {
        &mut self.net
    }

    /// Run cranks, deliver frames and advance the clock until both nodes are idle and nothing
    /// is in flight (or `10_000` rounds pass).
    pub fn run_until_idle<S: DurableStore, T: DurableStore>(&mut self, a: &mut Node<S>, b: &mut Node<T>) -> Result<(), RemoteError> {
        for _ in 0..10_000 {
            a.run(None)?;
            b.run(None)?;
            for _ in 0..2 {
                let mut port = self.net.port(0, self.now);
                while let Some(e) = port.poll_event() {
                    a.handle(self.now, e, &mut port)?;
                }
                a.pump(self.now, &mut port)?;
                let mut port = self.net.port(1, self.now);
                while let Some(e) = port.poll_event() {
                    b.handle(self.now, e, &mut port)?;
                }
                b.pump(self.now, &mut port)?;
            }
            self.net.take_transmissions();
            let moving = self.net.in_flight() > 0 || self.net.has_events(0) || self.net.has_events(1);
            if !moving && a.is_idle() && b.is_idle() {
                return Ok(());
            }
            if let Some(t) = self.net.next_arrival() {
                self.now = self.now.max(t);
            }
            while self.net.deliver_next(self.now) {}
        }
        Err(RemoteError::Refused("the pair did not become idle".into()))
    }
}
