//! [`SimNet`]: a simulated network between numbered kernels. Each connection has an epoch;
//! frames in flight carry it, so a frame sent on a connection that has since dropped is lost.
//! Faults: drops, duplicates, and random delays (which reorder frames).

use super::rng::Rng;
use crate::rref::KernelId;
use crate::transport::{Transport, TransportEvent};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::Duration;

/// How unreliable the simulated network is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetFaults {
    /// Frames dropped, per mille.
    pub drop_per_mille: u64,
    /// Frames delivered twice, per mille.
    pub dup_per_mille: u64,
    /// The shortest delay.
    pub min_delay: Duration,
    /// The longest delay; frames with different delays overtake each other.
    pub max_delay: Duration,
}

impl NetFaults {
    /// A perfect network with a fixed 1 ms delay.
    pub const NONE: NetFaults =
        NetFaults { drop_per_mille: 0, dup_per_mille: 0, min_delay: Duration::from_millis(1), max_delay: Duration::from_millis(1) };
}

/// A frame a node handed to the network, for the simulation's checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmission {
    /// Sender index.
    pub from: usize,
    /// Receiver index.
    pub to: usize,
    /// The frame.
    pub frame: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct InFlight {
    at: Duration,
    order: u64,
    from: usize,
    to: usize,
    epoch: u64,
    frame: Vec<u8>,
}

/// The simulated network.
#[derive(Debug)]
pub struct SimNet {
    names: Vec<KernelId>,
    rng: Rng,
    faults: NetFaults,
    conns: BTreeMap<(usize, usize), u64>,
    next_epoch: u64,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    order: u64,
    events: Vec<VecDeque<TransportEvent>>,
    transmissions: Vec<Transmission>,
    closes: Vec<(usize, usize, String)>,
}

fn pair(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl SimNet {
    /// A network between the kernels `names` (indexed by position), with no connections yet.
    pub fn new(names: Vec<KernelId>, rng: Rng, faults: NetFaults) -> Self {
        let n = names.len();
        SimNet {
            names,
            rng,
            faults,
            conns: BTreeMap::new(),
            next_epoch: 1,
            in_flight: BinaryHeap::new(),
            order: 0,
            events: vec![VecDeque::new(); n],
            transmissions: Vec::new(),
            closes: Vec::new(),
        }
    }

    /// Change the faults (e.g. none for the final phase).
    pub fn set_faults(&mut self, faults: NetFaults) {
        self.faults = faults;
    }

    /// The index of kernel `id`.
    pub fn index(&self, id: &KernelId) -> Option<usize> {
        self.names.iter().position(|n| n == id)
    }

    /// True if `a` and `b` are connected.
    pub fn is_connected(&self, a: usize, b: usize) -> bool {
        self.conns.contains_key(&pair(a, b))
    }

    /// Connect `a` and `b` (both must be up); each gets a `Connected` event.
    pub fn connect(&mut self, a: usize, b: usize) {
        if a == b || self.is_connected(a, b) {
            return;
        }
        self.conns.insert(pair(a, b), self.next_epoch);
        self.next_epoch += 1;
        self.events[a].push_back(TransportEvent::Connected(self.names[b].clone()));
        self.events[b].push_back(TransportEvent::Connected(self.names[a].clone()));
    }

    /// Drop the connection between `a` and `b`; each gets a `Disconnected` event. Frames in
    /// flight on it are lost.
    pub fn disconnect(&mut self, a: usize, b: usize, reason: &str) {
        if self.conns.remove(&pair(a, b)).is_some() {
            self.events[a].push_back(TransportEvent::Disconnected(self.names[b].clone(), reason.to_owned()));
            self.events[b].push_back(TransportEvent::Disconnected(self.names[a].clone(), reason.to_owned()));
        }
    }

    /// Node `i` crashed: its connections drop (peers are told) and its pending events vanish.
    pub fn crash(&mut self, i: usize) {
        for j in 0..self.names.len() {
            self.disconnect(i, j, "peer crashed");
        }
        self.events[i].clear();
    }

    /// The transport as node `me` sees it.
    pub fn port(&mut self, me: usize, now: Duration) -> SimPort<'_> {
        SimPort { net: self, me, now }
    }

    /// When the next frame in flight arrives.
    pub fn next_arrival(&self) -> Option<Duration> {
        self.in_flight.peek().map(|Reverse(f)| f.at)
    }

    /// Frames in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Deliver the earliest frame in flight (if it arrives by `now`) as a `Frame` event, unless
    /// its connection has dropped. Returns whether a frame left the wire.
    pub fn deliver_next(&mut self, now: Duration) -> bool {
        match self.in_flight.peek() {
            Some(Reverse(f)) if f.at <= now => {}
            _ => return false,
        }
        let Some(Reverse(f)) = self.in_flight.pop() else { return false };
        if self.conns.get(&pair(f.from, f.to)) == Some(&f.epoch) {
            self.events[f.to].push_back(TransportEvent::Frame(self.names[f.from].clone(), f.frame));
        }
        true
    }

    /// True if node `i` has events waiting.
    pub fn has_events(&self, i: usize) -> bool {
        !self.events[i].is_empty()
    }

    /// Frames handed to the network since the last call.
    pub fn take_transmissions(&mut self) -> Vec<Transmission> {
        std::mem::take(&mut self.transmissions)
    }

    /// Connections closed by a node since the last call: `(closer, peer, reason)`.
    pub fn take_closes(&mut self) -> Vec<(usize, usize, String)> {
        std::mem::take(&mut self.closes)
    }

    fn transmit(&mut self, from: usize, to: usize, frame: Vec<u8>, now: Duration) {
        self.transmissions.push(Transmission { from, to, frame: frame.clone() });
        let Some(&epoch) = self.conns.get(&pair(from, to)) else { return };
        if self.rng.chance(self.faults.drop_per_mille) {
            return;
        }
        let copies = if self.rng.chance(self.faults.dup_per_mille) { 2 } else { 1 };
        for _ in 0..copies {
            let span = self.faults.max_delay.saturating_sub(self.faults.min_delay).as_micros() as u64;
            let at = now + self.faults.min_delay + Duration::from_micros(self.rng.below(span + 1));
            self.order += 1;
            self.in_flight.push(Reverse(InFlight { at, order: self.order, from, to, epoch, frame: frame.clone() }));
        }
    }
}

/// [`SimNet`] as one node's [`Transport`].
pub struct SimPort<'a> {
    net: &'a mut SimNet,
    me: usize,
    now: Duration,
}

impl Transport for SimPort<'_> {
    fn send(&mut self, peer: &KernelId, frame: Vec<u8>) {
        if let Some(to) = self.net.index(peer) {
            self.net.transmit(self.me, to, frame, self.now);
        }
    }

    fn close(&mut self, peer: &KernelId, reason: &str) {
        if let Some(to) = self.net.index(peer) {
            self.net.closes.push((self.me, to, reason.to_owned()));
            self.net.disconnect(self.me, to, reason);
        }
    }

    fn poll_event(&mut self) -> Option<TransportEvent> {
        self.net.events[self.me].pop_front()
    }
}
