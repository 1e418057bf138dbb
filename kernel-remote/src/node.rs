//! [`Node`]: a kernel with its links to peer kernels, and the host side of Ken — the part that
//! does what kernel-core never does: decide when outputs may leave, talk to a [`Transport`],
//! retransmit, and apply what arrives.
//!
//! Output gating: a link's delivery stages its outbox entry in a [`Gate`] shared with the node.
//! The kernel's commit event for that crank promotes it (anything staged by a crank that did not
//! commit is dropped); the node then stamps it with the store position of the batch that
//! committed it, and transmits it only once the store's durable mark covers that position.
//! Acknowledgements wait the same way for the batch that applied the message.

use crate::durable::DurableStore;
use crate::error::{ProtocolError, RemoteError};
use crate::link::{self, decode_u64, Gate, LinkEndpoint, OUTBOX_PREFIX};
use crate::rref::{KernelId, PeerSeq};
use crate::transport::{Transport, TransportEvent};
use crate::wire::{Frame, WireMessage, DEFAULT_MAX_FRAME};
use kernel_core::{CrankReport, EndpointId, KObjectId, Kernel, RunSummary, VRef};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// Delete acknowledged outbox entries once this many wait...
const DELETE_BATCH: u64 = 256;
/// ...or this long after the last deletion.
const DELETE_EVERY: Duration = Duration::from_millis(50);

/// Tuning of the remote layer.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The first retransmission timeout while connected with unacknowledged messages.
    pub retransmit_base: Duration,
    /// The cap of the doubling retransmission timeout. There is no retry limit.
    pub retransmit_max: Duration,
    /// At most this many messages beyond the last acknowledged one are in flight.
    pub window: u64,
    /// The largest frame accepted.
    pub max_frame: usize,
    /// Wait for the durable mark (not only the commit event) before transmitting. Turn off only
    /// for a store whose commits are its durability (a `MemStore` host).
    pub wait_for_durable: bool,
    /// Run the kernel in turns ([`Kernel::begin_turn`]): what the node applies and the cranks
    /// that follow share one store write, ended by [`Node::pump`] once the run queue is empty or
    /// a limit is reached. Commit events, host callbacks and output wait for the end of the
    /// turn. `None`: every commit is its own store write (under sync durability, its own
    /// `fdatasync`).
    pub turns: Option<TurnLimits>,
}

/// How far a turn may grow before [`Node::pump`] ends it with the run queue not yet empty. The
/// default (512 cranks, 2 ms) keeps output flowing to peers under load while sharing each sync
/// among many cranks (measured in kernel-remote's `remote` bench: larger turns cost in-memory
/// throughput, smaller ones sync throughput).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnLimits {
    /// Cranks in one turn.
    pub max_cranks: u64,
    /// Time from the first pump that saw the turn open.
    pub max_delay: Duration,
}

impl Default for TurnLimits {
    fn default() -> Self {
        TurnLimits { max_cranks: 512, max_delay: Duration::from_millis(2) }
    }
}

impl Default for RemoteConfig {
    fn default() -> Self {
        RemoteConfig {
            retransmit_base: Duration::from_millis(200),
            retransmit_max: Duration::from_secs(5),
            window: 4096,
            max_frame: DEFAULT_MAX_FRAME,
            wait_for_durable: true,
            turns: None,
        }
    }
}

/// One link's state as the host API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// The peer.
    pub peer: KernelId,
    /// Its endpoint in the kernel.
    pub endpoint: EndpointId,
    /// Whether the transport reports it connected.
    pub connected: bool,
    /// Messages committed to the outbox and not yet acknowledged: the backlog.
    pub backlog: u64,
    /// The highest sequence written to the outbox (committed).
    pub written: PeerSeq,
    /// The highest sequence the peer acknowledged.
    pub acked: PeerSeq,
    /// The highest sequence from the peer applied here.
    pub applied: PeerSeq,
}

/// Counters for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Data frames transmitted (first sends and retransmissions).
    pub data_sent: u64,
    /// Data frames transmitted again (retransmission or resend after reconnect).
    pub resent: u64,
    /// Inbound messages applied.
    pub applied: u64,
    /// Inbound duplicates dropped.
    pub duplicates: u64,
    /// Inbound messages beyond a gap, not applied.
    pub gaps: u64,
    /// Acknowledgements transmitted.
    pub acks_sent: u64,
    /// Connections closed for a protocol violation.
    pub closed: u64,
    /// Group syncs the node asked for early, being idle with output waiting for durability.
    pub early_syncs: u64,
}

/// A committed outbox entry.
#[derive(Debug, Clone)]
struct OutEntry {
    seq: u64,
    message: Vec<u8>,
    /// The store position of the batch that committed it.
    mark: u64,
}

/// The host side of one link.
#[derive(Debug)]
struct PeerLink {
    peer: KernelId,
    ep: EndpointId,
    // ---- sending ----
    /// Committed, unacknowledged entries, in sequence order.
    unacked: VecDeque<OutEntry>,
    /// The highest sequence committed to the outbox.
    written: u64,
    /// The highest sequence the peer acknowledged.
    acked: u64,
    /// Acknowledged entries are deleted from the store up to here.
    deleted: u64,
    /// When acknowledged entries were last deleted.
    last_delete: Duration,
    /// The next sequence to transmit on this connection.
    next_send: u64,
    /// Sequences below this were transmitted before on some connection (resends are counted).
    high_sent: u64,
    connected: bool,
    rto: Duration,
    deadline: Option<Duration>,
    // ---- receiving ----
    applied: u64,
    /// The store position of the batch that applied `applied`.
    applied_mark: u64,
    /// The highest sequence accepted for application (applied, or waiting in `inbound`).
    received: u64,
    /// Accepted messages, in sequence order, waiting to be applied in one transaction.
    inbound: Vec<(PeerSeq, WireMessage)>,
    /// The highest acknowledgement transmitted on this connection.
    ack_sent: u64,
    /// Send an acknowledgement even if it repeats (a duplicate arrived, or a new connection).
    reack: bool,
    // ---- forgetting the names our `Resolve`s leave (see `link`) ----
    /// Our outbox entries that are `Resolve`s, with the names they leave as aliases, in
    /// sequence order: forgotten when the entry is deleted.
    forgets: VecDeque<(u64, Vec<VRef>)>,
    /// The peer's acknowledgements not yet usable for forgetting: `(upto, written)`, in order.
    /// Usable once we have applied its messages up to `written`.
    marks: VecDeque<(u64, u64)>,
    /// Our `Resolve`s up to here may have their names forgotten (the highest `upto` of the
    /// marks used).
    forgettable: u64,
}

/// Acknowledgements kept for forgetting at most; past it the newest two merge into one that
/// waits for the later `written` (later forgetting, never earlier).
const MAX_MARKS: usize = 64;

impl PeerLink {
    /// The peer acknowledged our messages up to `upto`, having written its own up to `written`.
    fn mark(&mut self, upto: u64, written: u64) {
        // The highest `upto` marked so far: the newest mark waiting, or else the last one used.
        let marked = self.marks.back().map_or(self.forgettable, |&(u, _)| u);
        if upto <= marked {
            return;
        }
        let full = self.marks.len() >= MAX_MARKS;
        match self.marks.back_mut() {
            Some(last) if full => *last = (upto, last.1.max(written)),
            _ => self.marks.push_back((upto, written)),
        }
        self.use_marks();
    }

    /// Marks whose `written` we have applied: our `Resolve`s up to their `upto` are forgettable.
    fn use_marks(&mut self) {
        while let Some(&(upto, written)) = self.marks.front() {
            if written > self.applied {
                break;
            }
            self.forgettable = self.forgettable.max(upto);
            self.marks.pop_front();
        }
    }

    /// Acknowledged entries that may be deleted: all of them, up to the first `Resolve` (of any
    /// still pending, not only the first) whose names may not be forgotten yet.
    fn deletable(&self) -> u64 {
        // `forgets` is in sequence order.
        match self.forgets.get(self.forgets.partition_point(|&(seq, _)| seq <= self.forgettable)) {
            Some(&(seq, _)) => self.acked.min(seq - 1),
            None => self.acked,
        }
    }

    /// True if a `Resolve`'s names may be forgotten now (its entry is deletable).
    fn forget_due(&self) -> bool {
        self.forgets.front().is_some_and(|&(seq, _)| seq <= self.deletable())
    }

    /// The highest of our entries that is durable at store position `durable`: entries the
    /// peer acknowledged were, and each unacknowledged one carries its position.
    fn durable_written(&self, durable: u64) -> u64 {
        match self.unacked.partition_point(|e| e.mark <= durable) {
            0 => self.acked,
            n => self.unacked[n - 1].seq,
        }
    }
}

/// The open turn, as the node sees it: what its end must stamp.
#[derive(Debug, Default)]
struct Turn {
    /// When a pump first saw it open.
    started: Option<Duration>,
    /// The kernel's crank count when it opened.
    cranks_at_start: u64,
    /// Outbox entries immediate-path transactions of the turn wrote (crank entries wait in the
    /// gate for their commit events).
    staged: Vec<link::Staged>,
    /// Inbound messages applied: `(link, count, highest sequence)`.
    applied: Vec<(usize, u64, u64)>,
}

/// A kernel and its links to peers: the host side of Ken.
pub struct Node<S: DurableStore> {
    kernel: Kernel<S>,
    id: KernelId,
    config: RemoteConfig,
    gate: Rc<RefCell<Gate>>,
    bootstrap: Rc<Cell<Option<KObjectId>>>,
    links: Vec<PeerLink>,
    by_peer: HashMap<KernelId, usize>,
    faults: Vec<(KernelId, String)>,
    stats: NodeStats,
    /// The open turn, under [`RemoteConfig::turns`].
    turn: Option<Turn>,
}

/// The name of the kernel endpoint for `peer`.
pub fn link_endpoint_name(peer: &KernelId) -> String {
    format!("ken:{peer}")
}

impl<S: DurableStore> Node<S> {
    /// Make `kernel` (freshly opened on its store) the kernel `id`. Register the store's own
    /// commit observers (e.g. `FjallStore::crank_observer`) on the kernel first. Then attach
    /// vats, [`Node::set_bootstrap`], and [`Node::add_peer`] each peer (again after a restart).
    pub fn new(mut kernel: Kernel<S>, id: KernelId, config: RemoteConfig) -> Self {
        let gate = Rc::new(RefCell::new(Gate::default()));
        let g = Rc::clone(&gate);
        kernel.add_commit_observer(move |e| g.borrow_mut().on_commit(e.crank.0));
        let turn = config.turns.map(|_| {
            kernel.begin_turn();
            Turn { cranks_at_start: kernel.cranks().0, ..Turn::default() }
        });
        Node {
            kernel,
            id,
            config,
            gate,
            bootstrap: Rc::new(Cell::new(None)),
            links: Vec::new(),
            by_peer: HashMap::new(),
            faults: Vec::new(),
            stats: NodeStats::default(),
            turn,
        }
    }

    /// This kernel's id.
    pub fn id(&self) -> &KernelId {
        &self.id
    }

    /// The kernel, for inspection.
    pub fn kernel(&self) -> &Kernel<S> {
        &self.kernel
    }

    /// The kernel, for setup: attaching vats, queueing messages, watching promises. Run cranks
    /// through [`Node::step`] / [`Node::run`], never the kernel's own `step`: the node must see
    /// every crank to gate link output on its commit.
    pub fn kernel_mut(&mut self) -> &mut Kernel<S> {
        &mut self.kernel
    }

    /// Close the node, giving back the kernel. Under turns, [`Node::end_turn`] first: a turn
    /// still open is lost, as a crash would lose it.
    pub fn into_kernel(self) -> Kernel<S> {
        self.kernel
    }

    /// Counters since this node was made.
    pub fn stats(&self) -> NodeStats {
        self.stats
    }

    /// The object peers reach as our bootstrap (`ro+0` here, `ro-0` there). Set it after every
    /// restart, before messages arrive; until then a message to it is refused.
    pub fn set_bootstrap(&mut self, object: KObjectId) {
        self.bootstrap.set(Some(object));
    }

    /// Attach the link to `peer`, creating its endpoint the first time, and load its durable
    /// state (outbox, sequence numbers).
    pub fn add_peer(&mut self, peer: KernelId) -> Result<EndpointId, RemoteError> {
        if peer == self.id {
            return Err(RemoteError::Refused(format!("{peer} is this kernel")));
        }
        if self.by_peer.contains_key(&peer) {
            return Err(RemoteError::Refused(format!("peer {peer} is already attached")));
        }
        let index = self.links.len();
        let max_message = self.config.max_frame.saturating_sub(link::FRAME_OVERHEAD);
        let endpoint = LinkEndpoint::new(index, Rc::clone(&self.gate), Rc::clone(&self.bootstrap), max_message);
        let ep = self.kernel.add_endpoint(&link_endpoint_name(&peer), Box::new(endpoint))?;
        let corrupt = |reason: String| RemoteError::Corrupt { peer: peer.clone(), reason };
        let (mut unacked, mut forgets) = (VecDeque::new(), VecDeque::new());
        let (mut written, mut applied) = (0u64, 0u64);
        let mark = self.kernel.store().applied_mark();
        for (k, v) in self.kernel.vatstore(ep)? {
            if k == link::NEXT_SEQ_KEY {
                written = decode_u64(&v).and_then(|n| n.checked_sub(1)).ok_or_else(|| corrupt("next-sequence record".into()))?;
            } else if k == link::APPLIED_KEY {
                applied = decode_u64(&v).ok_or_else(|| corrupt("applied-sequence record".into()))?;
            } else if let Some(seq) = k.strip_prefix(OUTBOX_PREFIX) {
                let seq = decode_u64(seq).ok_or_else(|| corrupt(format!("outbox key {}", k.escape_ascii())))?;
                // A `Resolve` still in the outbox has not had its names forgotten.
                let message = WireMessage::decode(&v).map_err(|e| corrupt(format!("outbox entry {seq}: {e}")))?;
                let names = link::resolve_names(&message);
                if !names.is_empty() {
                    forgets.push_back((seq, names));
                }
                unacked.push_back(OutEntry { seq, message: v, mark });
            }
        }
        let acked = unacked.front().map_or(written, |e| e.seq - 1);
        if unacked.iter().enumerate().any(|(i, e)| e.seq != acked + 1 + i as u64) || acked + unacked.len() as u64 != written {
            return Err(corrupt(format!("outbox does not hold exactly {}..={written}", acked + 1)));
        }
        self.links.push(PeerLink {
            peer: peer.clone(),
            ep,
            unacked,
            written,
            acked,
            deleted: acked,
            last_delete: Duration::ZERO,
            next_send: acked + 1,
            high_sent: written,
            connected: false,
            rto: self.config.retransmit_base,
            deadline: None,
            applied,
            applied_mark: mark,
            received: applied,
            inbound: Vec::new(),
            ack_sent: 0,
            reack: true,
            forgets,
            marks: VecDeque::new(),
            forgettable: 0,
        });
        self.by_peer.insert(peer, index);
        Ok(ep)
    }

    /// The peers added so far.
    pub fn peers(&self) -> Vec<KernelId> {
        self.links.iter().map(|l| l.peer.clone()).collect()
    }

    /// The link endpoint for `peer`.
    pub fn peer_endpoint(&self, peer: &KernelId) -> Result<EndpointId, RemoteError> {
        self.link_index(peer).map(|i| self.links[i].ep)
    }

    /// `peer`'s bootstrap object as a local object (the root of its link endpoint): send to it
    /// and the message travels to the peer.
    pub fn peer_root(&self, peer: &KernelId) -> Result<KObjectId, RemoteError> {
        Ok(self.kernel.root(self.peer_endpoint(peer)?)?)
    }

    fn link_index(&self, peer: &KernelId) -> Result<usize, RemoteError> {
        self.by_peer.get(peer).copied().ok_or_else(|| RemoteError::UnknownPeer(peer.clone()))
    }

    /// Every link's state: connection, backlog, sequence numbers.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.links
            .iter()
            .map(|l| PeerStatus {
                peer: l.peer.clone(),
                endpoint: l.ep,
                connected: l.connected,
                backlog: l.unacked.len() as u64,
                written: PeerSeq(l.written),
                acked: PeerSeq(l.acked),
                applied: PeerSeq(l.applied),
            })
            .collect()
    }

    /// Messages committed for all peers and not yet acknowledged.
    pub fn backlog(&self) -> u64 {
        self.links.iter().map(|l| l.unacked.len() as u64).sum()
    }

    /// Connections closed for protocol violations since the last call: `(peer, reason)`.
    pub fn take_faults(&mut self) -> Vec<(KernelId, String)> {
        std::mem::take(&mut self.faults)
    }

    /// Run one crank (see [`Kernel::step`]); link outputs it committed become transmittable.
    pub fn step(&mut self) -> Result<Option<CrankReport>, RemoteError> {
        let crank = self.kernel.cranks().0 + 1;
        self.gate.borrow_mut().crank = crank;
        let result = self.kernel.step();
        let committed = {
            let mut gate = self.gate.borrow_mut();
            let delivered = matches!(&result, Ok(Some(r)) if !matches!(r.outcome, kernel_core::CrankOutcome::Aborted { .. }));
            if !delivered {
                gate.discard(crank);
            }
            // Inside a turn the commit events come at its end, and this is empty.
            gate.take_committed()
        };
        self.outbox_written(committed);
        Ok(result?)
    }

    /// End the open turn now (nothing without [`RemoteConfig::turns`]): its commits reach the
    /// store as one batch, their commit events and host callbacks run, the outbox entries and
    /// applied messages it holds become transmittable and acknowledgeable once that batch is
    /// durable, and the next turn opens. [`Node::pump`] does this when a turn is due; a host
    /// stopping cleanly does it last.
    ///
    /// On a store error nothing of the turn survives (see [`Kernel::end_turn`]): messages it
    /// applied are taken again when the peer resends them.
    pub fn end_turn(&mut self) -> Result<(), RemoteError> {
        let Some(turn) = self.turn.take() else { return Ok(()) };
        let ended = self.kernel.end_turn();
        let mut written = self.gate.borrow_mut().take_committed();
        self.kernel.begin_turn();
        self.turn = Some(Turn { cranks_at_start: self.kernel.cranks().0, ..Turn::default() });
        if let Err(e) = ended {
            self.gate.borrow_mut().staged.clear();
            for l in &mut self.links {
                l.received = l.applied;
            }
            return Err(e.into());
        }
        // Crank entries and immediate-path entries, in the order they were written.
        written.extend(turn.staged);
        written.sort_by_key(|s| (s.link, s.seq));
        self.stamp_written(written);
        for (i, n, upto) in turn.applied {
            self.stamp_applied(i, n, upto);
        }
        Ok(())
    }

    /// True if the open turn holds as many cranks as a turn may.
    fn turn_full(&self) -> bool {
        match (self.config.turns, &self.turn) {
            (Some(limits), Some(turn)) => self.kernel.cranks().0 - turn.cranks_at_start >= limits.max_cranks,
            _ => false,
        }
    }

    /// End the open turn if it is due: the run queue is empty, or it reached a limit.
    fn end_turn_if_due(&mut self, now: Duration) -> Result<(), RemoteError> {
        let full = self.turn_full();
        let (Some(limits), Some(turn)) = (self.config.turns, &mut self.turn) else { return Ok(()) };
        let started = *turn.started.get_or_insert(now);
        let holds = self.kernel.turn_pending() || !turn.staged.is_empty() || !turn.applied.is_empty();
        let due = self.kernel.queue_len() == 0 || full || now.saturating_sub(started) >= limits.max_delay;
        if holds && due {
            self.end_turn()?;
            if let Some(t) = &mut self.turn {
                t.started = Some(now);
            }
        }
        Ok(())
    }

    /// Run up to `max_cranks` cranks (all, if `None`) until the run queue is empty. Under
    /// turns, also stop once the open turn holds [`TurnLimits::max_cranks`]: the next
    /// [`Node::pump`] ends it and sends its output while later cranks wait for the next turn.
    pub fn run(&mut self, max_cranks: Option<u64>) -> Result<RunSummary, RemoteError> {
        let mut summary = RunSummary::default();
        loop {
            if max_cranks.is_some_and(|m| summary.cranks >= m) || self.turn_full() {
                summary.quiescent = self.kernel.queue_len() == 0;
                return Ok(summary);
            }
            match self.step()? {
                None => {
                    summary.quiescent = true;
                    return Ok(summary);
                }
                Some(report) => {
                    summary.cranks += 1;
                    if matches!(report.outcome, kernel_core::CrankOutcome::Aborted { .. }) {
                        summary.aborted += 1;
                    }
                }
            }
        }
    }

    /// Handle one transport event at time `now`. A protocol violation closes the connection
    /// through `net` and is recorded (see [`Node::take_faults`]); only kernel or store failures
    /// are returned as errors.
    pub fn handle(&mut self, now: Duration, event: TransportEvent, net: &mut dyn Transport) -> Result<(), RemoteError> {
        match event {
            TransportEvent::Connected(peer) => {
                let Ok(i) = self.link_index(&peer) else {
                    self.fault(net, &peer, "not a peer of this kernel");
                    return Ok(());
                };
                let base = self.config.retransmit_base;
                let l = &mut self.links[i];
                l.connected = true;
                l.next_send = l.acked + 1; // resend everything unacknowledged, in order
                l.ack_sent = 0;
                l.reack = true;
                l.rto = base;
                l.deadline = None;
                let _ = now;
            }
            TransportEvent::Disconnected(peer, _reason) => {
                if let Ok(i) = self.link_index(&peer) {
                    let l = &mut self.links[i];
                    l.connected = false;
                    l.deadline = None;
                }
            }
            TransportEvent::Frame(peer, bytes) => {
                let Ok(i) = self.link_index(&peer) else {
                    self.fault(net, &peer, "not a peer of this kernel");
                    return Ok(());
                };
                if let Err(e) = self.frame(now, i, &bytes) {
                    match e {
                        FrameError::Protocol(p) => self.fault(net, &peer, &p.to_string()),
                        FrameError::Host(h) => return Err(h),
                    }
                }
            }
        }
        Ok(())
    }

    fn fault(&mut self, net: &mut dyn Transport, peer: &KernelId, reason: &str) {
        log::warn!("{}: closing the connection to {peer}: {reason}", self.id);
        self.stats.closed += 1;
        self.faults.push((peer.clone(), reason.to_owned()));
        net.close(peer, reason);
        if let Ok(i) = self.link_index(peer) {
            self.links[i].connected = false;
            self.links[i].deadline = None;
        }
    }

    fn frame(&mut self, now: Duration, i: usize, bytes: &[u8]) -> Result<(), FrameError> {
        match Frame::decode(bytes, self.config.max_frame).map_err(ProtocolError::from)? {
            Frame::Hello { .. } => Err(ProtocolError::Unexpected("hello").into()),
            Frame::Ack { upto, written } => {
                let base = self.config.retransmit_base;
                let l = &mut self.links[i];
                if upto.0 > l.written {
                    return Err(ProtocolError::AckBeyondSent { upto, sent: PeerSeq(l.written) }.into());
                }
                l.mark(upto.0, written.0);
                if upto.0 > l.acked {
                    while l.unacked.front().is_some_and(|e| e.seq <= upto.0) {
                        l.unacked.pop_front();
                    }
                    l.acked = upto.0;
                    l.next_send = l.next_send.max(l.acked + 1);
                    l.rto = base;
                    l.deadline = if l.unacked.is_empty() { None } else { Some(now + base) };
                }
                Ok(())
            }
            Frame::Data { seq, message } => {
                let l = &mut self.links[i];
                if seq.0 <= l.received {
                    l.reack = true;
                    self.stats.duplicates += 1;
                    return Ok(());
                }
                if seq.0 > l.received + 1 {
                    self.stats.gaps += 1;
                    return Ok(()); // acks are cumulative: the sender will resend the missing one
                }
                let message = WireMessage::decode(&message).map_err(ProtocolError::from)?;
                l.received = seq.0;
                l.inbound.push((seq, message));
                Ok(())
            }
        }
    }

    /// Apply the messages accepted from each peer, all of a peer's in one immediate-path
    /// transaction that also records the highest sequence applied. If one is refused, the ones
    /// before it are applied one by one, nothing from it on is, and the connection is closed.
    pub fn apply_received(&mut self, net: &mut dyn Transport) -> Result<(), RemoteError> {
        let bootstrap = self.bootstrap.get();
        for i in 0..self.links.len() {
            if self.links[i].inbound.is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.links[i].inbound);
            let ep = self.links[i].ep;
            let all = self.kernel.apply_external(ep, |ctx| link::apply_batch(ctx, bootstrap, &batch))?;
            if all.is_ok() {
                self.applied(i, batch.len() as u64, batch.last().map_or(0, |(s, _)| s.0));
                continue;
            }
            // Find the refused one: apply the good prefix one message at a time.
            for one in batch.chunks(1) {
                let seq = one[0].0;
                match self.kernel.apply_external(ep, |ctx| link::apply_batch(ctx, bootstrap, one))? {
                    Ok(()) => self.applied(i, 1, seq.0),
                    Err(fault) => {
                        let peer = self.links[i].peer.clone();
                        self.links[i].received = self.links[i].applied;
                        self.fault(net, &peer, &ProtocolError::Refused { seq, fault }.to_string());
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Outbox entries a crank or an immediate-path transaction wrote and committed: stamped
    /// now, or inside a turn when it ends.
    fn outbox_written(&mut self, staged: Vec<link::Staged>) {
        match &mut self.turn {
            Some(t) => t.staged.extend(staged),
            None => self.stamp_written(staged),
        }
    }

    /// Outbox entries whose commit is in the store, stamped with the store position that covers
    /// them: transmittable once that is durable.
    fn stamp_written(&mut self, staged: Vec<link::Staged>) {
        if staged.is_empty() {
            return;
        }
        let mark = self.kernel.store().applied_mark();
        for s in staged {
            let link = &mut self.links[s.link];
            debug_assert_eq!(s.seq, link.written + 1, "outbox sequence for {}", link.peer);
            link.written = s.seq;
            if !s.forget.is_empty() {
                link.forgets.push_back((s.seq, s.forget));
            }
            link.unacked.push_back(OutEntry { seq: s.seq, message: s.message, mark });
        }
    }

    /// Inbound messages applied: acknowledgeable once durable, or inside a turn once it ends.
    fn applied(&mut self, i: usize, n: u64, upto: u64) {
        match &mut self.turn {
            Some(t) => t.applied.push((i, n, upto)),
            None => self.stamp_applied(i, n, upto),
        }
    }

    fn stamp_applied(&mut self, i: usize, n: u64, upto: u64) {
        let mark = self.kernel.store().applied_mark();
        let l = &mut self.links[i];
        l.applied = upto;
        l.applied_mark = mark;
        l.use_marks();
        self.stats.applied += n;
    }

    /// Do the I/O that is due at `now`: apply what was received, run a due group sync (or an
    /// early one, if idle with output waiting for durability), transmit what has become durable
    /// (in order, within the window), acknowledge what has been applied durably, retransmit
    /// after a timeout, and delete acknowledged entries.
    pub fn pump(&mut self, now: Duration, net: &mut dyn Transport) -> Result<(), RemoteError> {
        self.apply_received(net)?;
        self.end_turn_if_due(now)?;
        self.kernel.store().flush_due()?;
        if self.kernel.queue_len() == 0 && self.output_awaits_durability() {
            // Idle, with output held back only by durability: sync now rather than let it wait
            // out the group's delay. Under load the queue is rarely empty and groups stay large;
            // when it empties, whatever accumulated goes to disk in one sync.
            if self.kernel.store().flush_now()? {
                self.stats.early_syncs += 1;
            }
        }
        let durable = if self.config.wait_for_durable { self.kernel.store().durable_mark() } else { u64::MAX };
        let (max_rto, window) = (self.config.retransmit_max, self.config.window);
        for l in &mut self.links {
            if !l.connected {
                continue;
            }
            // Acknowledge what is applied and durable.
            if (l.applied > l.ack_sent || l.reack) && l.applied_mark <= durable {
                let written = PeerSeq(l.durable_written(durable));
                if let Ok(bytes) = (Frame::Ack { upto: PeerSeq(l.applied), written }).encode() {
                    net.send(&l.peer, bytes);
                    self.stats.acks_sent += 1;
                }
                l.ack_sent = l.applied;
                l.reack = false;
            }
            // Retransmit after a timeout, doubling it up to the cap; never give up.
            if let Some(deadline) = l.deadline {
                if now >= deadline && !l.unacked.is_empty() {
                    l.next_send = l.acked + 1;
                    l.rto = (l.rto * 2).min(max_rto);
                    l.deadline = None;
                }
            }
            // Transmit in order what is committed and durable, within the window.
            let first = l.acked + 1;
            while l.next_send <= l.written && l.next_send < first + window {
                let Some(entry) = l.unacked.get((l.next_send - first) as usize) else { break };
                if entry.mark > durable {
                    break;
                }
                let frame = Frame::Data { seq: PeerSeq(entry.seq), message: entry.message.clone() };
                if let Ok(bytes) = frame.encode() {
                    net.send(&l.peer, bytes);
                }
                self.stats.data_sent += 1;
                if entry.seq <= l.high_sent {
                    self.stats.resent += 1;
                }
                l.high_sent = l.high_sent.max(entry.seq);
                l.next_send += 1;
            }
            if !l.unacked.is_empty() && l.next_send > first && l.deadline.is_none() {
                l.deadline = Some(now + l.rto);
            }
        }
        net.flush();
        // After transmitting: under sync durability the deletion is a sync of its own, which
        // would otherwise hold back this round's output.
        self.delete_acknowledged(now)
    }

    /// Delete acknowledged outbox entries, many at once or every so often, forgetting the names
    /// the `Resolve`s among them left (see `link`): when the peer's acknowledgements allow it,
    /// and at once when it is all that is left to do.
    fn delete_acknowledged(&mut self, now: Duration) -> Result<(), RemoteError> {
        let idle = self.kernel.queue_len() == 0;
        for i in 0..self.links.len() {
            let l = &self.links[i];
            let to = l.deletable();
            // Deleting acknowledged entries costs a store batch (an fsync under sync durability):
            // do it for many at once, or every so often, off the path of each message. Entries
            // not yet deleted when the kernel stops are resent after a restart and dropped as
            // duplicates. Names to forget do not wait for the clock once the kernel is idle.
            let due = to - l.deleted >= DELETE_BATCH || now >= l.last_delete + DELETE_EVERY || (idle && l.forget_due());
            if to > l.deleted && due {
                let (ep, from) = (l.ep, l.deleted + 1);
                let n = l.forgets.partition_point(|&(seq, _)| seq <= to);
                let names: Vec<VRef> = l.forgets.iter().take(n).flat_map(|(_, names)| names.iter().copied()).collect();
                let r = self.kernel.apply_external(ep, |ctx| {
                    let fault = |e: kernel_core::SyscallError| kernel_core::Fault::VatError(e.to_string());
                    for seq in from..=to {
                        ctx.vatstore_delete(&link::outbox_key(seq)).map_err(fault)?;
                    }
                    // A name a version-2 peer's `Forget` took already is skipped.
                    ctx.forget_names(&names).map_err(fault)
                })?;
                if let Err(fault) = r {
                    return Err(RemoteError::Refused(format!("deleting acknowledged entries for {}: {fault}", self.links[i].peer)));
                }
                let l = &mut self.links[i];
                l.forgets.drain(..n);
                l.deleted = to;
                l.last_delete = now;
            }
        }
        Ok(())
    }

    /// True if some connected link has output that is committed but waits for the durable mark:
    /// the next entry to transmit, or an acknowledgement.
    fn output_awaits_durability(&self) -> bool {
        if !self.config.wait_for_durable {
            return false;
        }
        let store = self.kernel.store();
        let durable = store.durable_mark();
        if durable >= store.applied_mark() {
            return false;
        }
        let window = self.config.window;
        self.links.iter().filter(|l| l.connected).any(|l| {
            let ack_waits = (l.applied > l.ack_sent || l.reack) && l.applied_mark > durable;
            let first = l.acked + 1;
            let send_waits = l.next_send <= l.written
                && l.next_send < first + window
                && l.unacked.get((l.next_send - first) as usize).is_some_and(|e| e.mark > durable);
            ack_waits || send_waits
        })
    }

    /// The earliest time [`Node::pump`] has something to do by the clock (a retransmission),
    /// if any.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.links.iter().filter(|l| l.connected).filter_map(|l| l.deadline).min()
    }

    /// True when nothing is waiting: no queued cranks, no unacknowledged output, no
    /// acknowledgement owed, no names left to forget that may be forgotten.
    pub fn is_idle(&self) -> bool {
        self.kernel.queue_len() == 0
            && !self.kernel.turn_pending()
            && self
                .links
                .iter()
                .all(|l| l.unacked.is_empty() && l.inbound.is_empty() && l.ack_sent >= l.applied && !l.reack && !l.forget_due())
    }
}

enum FrameError {
    Protocol(ProtocolError),
    Host(RemoteError),
}

impl From<ProtocolError> for FrameError {
    fn from(e: ProtocolError) -> Self {
        FrameError::Protocol(e)
    }
}

impl From<RemoteError> for FrameError {
    fn from(e: RemoteError) -> Self {
        FrameError::Host(e)
    }
}
