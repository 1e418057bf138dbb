//! [`SimNet`]: a simulated network between numbered kernels. Each connection has an epoch;
//! frames in flight carry it, so a frame sent on a connection that has since dropped is lost.
//! Faults: drops, duplicates, and random delays (which reorder frames).
//!
//! It bypasses encryption but not what a secure link checks: with [`SimIdentities`], a
//! connection comes up only if each side's key is in the other's allow-list and each side's
//! encoded `Hello` names the kernel its key is allowed as ([`crate::check_hello`]); and every
//! frame that arrives passes the TCP reader's check ([`crate::tcp::receive_frame`]) before the
//! node sees it. A refusal is recorded as a close (see [`SimNet::take_closes`]).

use super::rng::Rng;
use crate::hello::check_hello;
use crate::identity::{AllowList, Identity, PublicKey, KEY_LEN};
use crate::rref::KernelId;
use crate::tcp::{receive_frame, FrameCipher, Plaintext, Security};
use crate::transport::{Transport, TransportEvent};
use crate::wire::{Frame, DEFAULT_MAX_FRAME};
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

/// Who each simulated kernel is: the key its handshake would authenticate, what its `Hello`
/// claims, and the allow-list it checks its peers against.
#[derive(Debug, Clone)]
pub struct SimIdentities {
    keys: Vec<PublicKey>,
    claims: Vec<KernelId>,
    allow: Vec<AllowList>,
}

impl SimIdentities {
    /// Kernels `names`, each with a key derived from `seed` and its index, each allowing all the
    /// others by those keys.
    pub fn derived(names: &[KernelId], seed: u64) -> Self {
        let keys: Vec<PublicKey> = (0..names.len())
            .map(|i| {
                let mut secret = [0x5a; KEY_LEN];
                secret[..8].copy_from_slice(&seed.to_le_bytes());
                secret[8..16].copy_from_slice(&(i as u64).to_le_bytes());
                Identity::from_secret(secret).public()
            })
            .collect();
        let allow = (0..names.len())
            .map(|i| {
                let mut list = AllowList::new();
                for (j, name) in names.iter().enumerate().filter(|(j, _)| *j != i) {
                    // Distinct names and distinct keys: the entries cannot conflict.
                    let _ = list.allow(name.clone(), keys[j]);
                }
                list
            })
            .collect();
        SimIdentities { keys, claims: names.to_vec(), allow }
    }

    /// Kernel `i` now holds `key` (e.g. a stranger's).
    pub fn set_key(&mut self, i: usize, key: PublicKey) {
        self.keys[i] = key;
    }

    /// Kernel `i`'s `Hello` now claims to be `kernel` (an impostor).
    pub fn set_claim(&mut self, i: usize, kernel: KernelId) {
        self.claims[i] = kernel;
    }

    /// Why kernel `me` refuses a connection from kernel `them` (dialed if `dialed`), if it does.
    fn refusal(&self, names: &[KernelId], me: usize, them: usize, dialed: bool) -> Option<String> {
        let Some(authenticated) = self.allow[me].kernel_of(&self.keys[them]) else {
            return Some(format!("handshake: the peer's key {} is not allowed", self.keys[them]));
        };
        let hello = match (Frame::Hello { kernel: self.claims[them].clone() }).encode() {
            Ok(h) => h,
            Err(e) => return Some(e.to_string()),
        };
        let expected = dialed.then(|| &names[them]);
        check_hello(&names[me], expected, Some(authenticated), &hello, DEFAULT_MAX_FRAME).err().map(|e| e.to_string())
    }
}

/// The simulated network.
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
    identities: Option<SimIdentities>,
    /// The reader's frame check, as on TCP (the plaintext cipher: the encryption is bypassed).
    reader: Box<dyn FrameCipher>,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet")
            .field("names", &self.names)
            .field("faults", &self.faults)
            .field("conns", &self.conns)
            .finish_non_exhaustive()
    }
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
            identities: None,
            reader: Plaintext.begin(false).finish(),
        }
    }

    /// Check identities when connections come up (see [`SimIdentities`]).
    pub fn with_identities(mut self, identities: SimIdentities) -> Self {
        self.identities = Some(identities);
        self
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

    /// Connect `a` and `b` (both must be up; `a` dials); each gets a `Connected` event — unless
    /// an identity check refuses, which is recorded as a close by the refusing side.
    pub fn connect(&mut self, a: usize, b: usize) {
        if a == b || self.is_connected(a, b) {
            return;
        }
        if let Some(ids) = &self.identities {
            // The acceptor checks the dialer, then the dialer the acceptor.
            let refused = ids
                .refusal(&self.names, b, a, false)
                .map(|r| (b, a, r))
                .or_else(|| ids.refusal(&self.names, a, b, true).map(|r| (a, b, r)));
            if let Some(refusal) = refused {
                self.closes.push(refusal);
                return;
            }
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
            match receive_frame(&mut *self.reader, f.frame, DEFAULT_MAX_FRAME) {
                Ok(frame) => self.events[f.to].push_back(TransportEvent::Frame(self.names[f.from].clone(), frame)),
                Err(reason) => {
                    self.closes.push((f.to, f.from, reason.clone()));
                    self.disconnect(f.to, f.from, &reason);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rref::PeerSeq;

    fn net() -> (SimNet, SimIdentities) {
        let names: Vec<KernelId> = ["k0", "k1", "k2"].iter().map(|n| n.parse().expect("id")).collect();
        let ids = SimIdentities::derived(&names, 7);
        (SimNet::new(names, Rng::new(1), NetFaults::NONE), ids)
    }

    fn events(net: &mut SimNet, i: usize) -> Vec<TransportEvent> {
        let mut port = net.port(i, Duration::ZERO);
        std::iter::from_fn(|| port.poll_event()).collect()
    }

    #[test]
    fn allowed_kernels_connect() {
        let (net, ids) = net();
        let mut net = net.with_identities(ids);
        net.connect(0, 1);
        assert!(net.is_connected(0, 1));
        assert!(net.take_closes().is_empty());
    }

    #[test]
    fn an_unknown_key_or_an_impostor_does_not_connect() {
        let (net, mut ids) = net();
        ids.set_key(2, Identity::from_secret([1; KEY_LEN]).public());
        ids.set_claim(1, "k2".parse().expect("id"));
        let mut net = net.with_identities(ids);
        net.connect(0, 2);
        net.connect(2, 0);
        net.connect(0, 1);
        assert!(!net.is_connected(0, 2) && !net.is_connected(0, 1));
        let closes = net.take_closes();
        assert_eq!(closes.len(), 3, "{closes:?}");
        assert!(closes[0].2.contains("not allowed") && closes[1].2.contains("not allowed"), "{closes:?}");
        assert!(closes[2].2.contains("hello names k2"), "{closes:?}");
        assert!(events(&mut net, 0).is_empty(), "the node never hears of a refused connection");
    }

    #[test]
    fn a_frame_that_fails_the_reader_check_closes_the_connection() {
        let (net, ids) = net();
        let mut net = net.with_identities(ids);
        net.connect(0, 1);
        events(&mut net, 1);
        let good = Frame::Ack { upto: PeerSeq(0), written: PeerSeq(0) }.encode().expect("frame");
        net.port(0, Duration::ZERO).send(&"k1".parse().expect("id"), vec![9, 9]);
        net.port(0, Duration::ZERO).send(&"k1".parse().expect("id"), good);
        while net.deliver_next(Duration::from_secs(1)) {}
        assert!(!net.is_connected(0, 1));
        let closes = net.take_closes();
        assert_eq!(closes.len(), 1);
        assert!(closes[0].2.contains("unknown wire version"), "{closes:?}");
        let ev = events(&mut net, 1);
        assert!(matches!(ev.as_slice(), [TransportEvent::Disconnected(..)]), "nothing after the bad frame arrives: {ev:?}");
    }
}
