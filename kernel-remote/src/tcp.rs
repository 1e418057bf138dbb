//! [`TcpTransport`]: Ken over TCP with tokio. Frames are length-prefixed (u32 big-endian, then
//! the frame: version byte and postcard). A connection starts with the [`Security`] handshake
//! ([`Plaintext`], or [`crate::NoiseSecurity`]), then each side sends `Hello` with its kernel id.
//! An oversized frame, a bad handshake or a wrong `Hello` closes that connection with a logged
//! reason and delivers nothing from it; a malformed frame or unknown version is caught by the
//! node, which asks the transport to close the connection. Other connections are unaffected.
//!
//! Reading, accepting, dialing and handshakes run on a tokio runtime owned by the transport;
//! events arrive on a channel the host polls ([`Transport::poll_event`]) or waits on
//! ([`TcpTransport::wait_event`]). `send` seals a frame into the connection's buffer, and
//! [`Transport::flush`] (or `wait_event`) writes a few buffered frames in one non-blocking
//! system call from the host's thread, so a message reaches the socket without waking the
//! runtime's thread; a larger batch (a busy round's output), and whatever a full socket does not
//! take, is written by the connection's writer task while the host goes on. The side given a
//! peer's address dials it and redials with capped backoff whenever the connection drops; the
//! other side accepts.
//!
//! With [`crate::NoiseSecurity`] the handshake authenticates both kernels' keys against an
//! allow-list, and the `Hello` must name the kernel the peer's key is allowed as
//! ([`crate::check_hello`]). [`InboundLimits`] bound what one peer can cost: handshakes in
//! progress per address, connections per peer per window, inbound bytes per second, and the
//! bytes waiting for the host (past which the reader stops reading and TCP holds the sender back).

use crate::error::RemoteError;
use crate::hello::check_hello;
pub use crate::limits::InboundLimits;
use crate::limits::{ConnectionGate, TokenBucket};
use crate::rref::KernelId;
use crate::transport::{Transport, TransportEvent};
use crate::wire::{Frame, DEFAULT_MAX_FRAME};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc as tmpsc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Seals and opens frames after the handshake (identity for plaintext; an AEAD for Noise).
pub trait FrameCipher: Send {
    /// Protect an outgoing frame.
    fn seal(&mut self, plain: Vec<u8>) -> Result<Vec<u8>, String>;
    /// Check and unwrap an incoming frame; an error closes the connection.
    fn open(&mut self, sealed: Vec<u8>) -> Result<Vec<u8>, String>;
    /// The longest sealed frame a plain frame of `max_plain` bytes can become.
    fn max_sealed(&self, max_plain: usize) -> usize {
        max_plain
    }
}

/// One side of a connection's handshake, driven message by message by the transport (the shape
/// of a Noise handshake: `snow::HandshakeState` fits behind it).
pub trait Handshake: Send {
    /// Advance with the peer's last handshake message (`None` to start, or when it is our turn
    /// again). Returns the message to send next, if any, and whether the handshake is complete.
    fn step(&mut self, incoming: Option<&[u8]>) -> Result<(Option<Vec<u8>>, bool), String>;
    /// The cipher for the session (called once `step` reported completion).
    fn finish(self: Box<Self>) -> Box<dyn FrameCipher>;
    /// The kernel the completed handshake authenticated (its key's allow-list entry), which the
    /// peer's `Hello` must then name; `None` for a security that does not authenticate.
    fn authenticated(&self) -> Option<KernelId> {
        None
    }
}

/// Authentication and encryption of connections: makes a [`Handshake`] per connection.
pub trait Security: Send + Sync + 'static {
    /// Begin a handshake as the dialer (`initiator`) or the acceptor.
    fn begin(&self, initiator: bool) -> Box<dyn Handshake>;
}

/// No authentication, no encryption: for tests and trusted loopback (the default). Anything
/// reachable from other hosts should use [`crate::NoiseSecurity`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Plaintext;

struct PlainHandshake;
struct PlainCipher;

impl Security for Plaintext {
    fn begin(&self, _initiator: bool) -> Box<dyn Handshake> {
        Box::new(PlainHandshake)
    }
}

impl Handshake for PlainHandshake {
    fn step(&mut self, _incoming: Option<&[u8]>) -> Result<(Option<Vec<u8>>, bool), String> {
        Ok((None, true))
    }
    fn finish(self: Box<Self>) -> Box<dyn FrameCipher> {
        Box::new(PlainCipher)
    }
}

impl FrameCipher for PlainCipher {
    fn seal(&mut self, plain: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(plain)
    }
    fn open(&mut self, sealed: Vec<u8>) -> Result<Vec<u8>, String> {
        Ok(sealed)
    }
}

/// How the TCP transport behaves.
#[derive(Clone)]
pub struct TcpConfig {
    /// The largest frame accepted (length prefix excluded).
    pub max_frame: usize,
    /// The first redial delay after a failed or dropped connection.
    pub redial_min: Duration,
    /// The cap of the doubling redial delay.
    pub redial_max: Duration,
    /// How long a handshake (security and `Hello`) may take.
    pub handshake_timeout: Duration,
    /// Connection security.
    pub security: Arc<dyn Security>,
    /// What one peer may cost this kernel.
    pub limits: InboundLimits,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_frame: DEFAULT_MAX_FRAME,
            redial_min: Duration::from_millis(20),
            redial_max: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            security: Arc::new(Plaintext),
            limits: InboundLimits::default(),
        }
    }
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig")
            .field("max_frame", &self.max_frame)
            .field("redial_max", &self.redial_max)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

enum Cmd {
    /// Bytes are left in the connection's [`Outbound`] buffer: wait until writable, write them.
    Flush,
    Close(String),
}

/// Sealed, length-prefixed frames waiting to be written to one connection, and the cipher that
/// seals them: one lock, so frames reach the socket in the order they were sealed, whoever (the
/// host thread or the connection's writer task) writes them.
struct Outbound {
    buf: Vec<u8>,
    /// Where the unwritten bytes of `buf` begin.
    start: usize,
    /// Why writing failed, once it has: nothing more is queued or written.
    failed: Option<String>,
}

impl Outbound {
    fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Write as much as the socket takes without blocking. `Ok(true)`: all written; `Ok(false)`:
    /// the socket is full (the writer task waits for it).
    fn write_some(&mut self, socket: &tokio::net::tcp::OwnedWriteHalf) -> Result<bool, String> {
        if let Some(reason) = &self.failed {
            return Err(reason.clone());
        }
        while self.start < self.buf.len() {
            match socket.try_write(&self.buf[self.start..]) {
                Ok(0) => return self.fail("writing: the connection is closed".into()),
                Ok(n) => self.start += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(format!("writing: {e}")),
            }
        }
        self.buf.clear();
        self.start = 0;
        Ok(true)
    }

    fn fail(&mut self, reason: String) -> Result<bool, String> {
        self.failed = Some(reason.clone());
        self.buf = Vec::new();
        self.start = 0;
        Err(reason)
    }
}

/// The most bytes [`Transport::flush`] writes on the host's thread (a handful of frames: one
/// message and its acknowledgements); more go to the writer task.
const DIRECT_WRITE_MAX: usize = 512;

/// A live connection as the transport's handle sees it.
struct Conn {
    id: u64,
    tx: tmpsc::UnboundedSender<Cmd>,
    out: Arc<Mutex<Outbound>>,
    socket: Arc<tokio::net::tcp::OwnedWriteHalf>,
    cipher: Arc<Mutex<Box<dyn FrameCipher>>>,
}

impl Conn {
    /// Seal `frame` and queue it behind the connection's unwritten bytes; `false` if dropped.
    fn queue(&self, frame: Vec<u8>, limit: usize) -> Result<bool, String> {
        let Ok(mut out) = self.out.lock() else { return Err("outbound lock poisoned".into()) };
        if let Some(reason) = &out.failed {
            return Err(reason.clone());
        }
        // A peer that does not read gets nothing more queued (Ken resends later); one frame
        // always fits an empty queue.
        let pending = out.pending();
        if pending > 0 && pending + frame.len() > limit {
            return Ok(false);
        }
        let sealed = match self.cipher.lock() {
            Ok(mut c) => c.seal(frame)?,
            Err(_) => return Err("cipher lock poisoned".into()),
        };
        let len = u32::try_from(sealed.len()).map_err(|_| "frame too long to send".to_owned())?;
        out.buf.extend_from_slice(&len.to_be_bytes());
        out.buf.extend_from_slice(&sealed);
        Ok(true)
    }

    /// Write what is queued from the calling thread, without blocking, if it is a few frames
    /// (a message's latency then includes no hand-off to the runtime's thread); a larger batch,
    /// and what the socket does not take now, is left to the writer task, which writes it while
    /// the host goes on (under load the host's thread is the busier one).
    fn flush(&self) {
        let Ok(mut out) = self.out.lock() else { return };
        if out.pending() == 0 {
            return;
        }
        if out.pending() > DIRECT_WRITE_MAX {
            let _ = self.tx.send(Cmd::Flush);
            return;
        }
        match out.write_some(&self.socket) {
            Ok(true) => {}
            Ok(false) => {
                let _ = self.tx.send(Cmd::Flush);
            }
            Err(reason) => {
                let _ = self.tx.send(Cmd::Close(reason));
            }
        }
    }
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// The live connection per peer.
    by_peer: HashMap<KernelId, Conn>,
}

/// An event on its way to the host, holding its share of the connection's inbound budget.
type Queued = (TransportEvent, Option<OwnedSemaphorePermit>);

struct Inner {
    me: KernelId,
    config: TcpConfig,
    conns: Mutex<Conns>,
    gate: Mutex<ConnectionGate>,
    events: Mutex<mpsc::Sender<Queued>>,
    /// Bytes of frames waiting for the host, all connections together.
    queued_in: AtomicUsize,
}

impl Inner {
    fn emit(&self, e: TransportEvent) {
        if let Ok(tx) = self.events.lock() {
            let _ = tx.send((e, None));
        }
    }

    fn emit_frame(&self, peer: KernelId, frame: Vec<u8>, permit: OwnedSemaphorePermit) {
        self.queued_in.fetch_add(frame.len(), Ordering::Relaxed);
        if let Ok(tx) = self.events.lock() {
            let _ = tx.send((TransportEvent::Frame(peer, frame), Some(permit)));
        }
    }
}

/// A handshake in progress from an address, counted until dropped.
struct HandshakeSlot {
    inner: Arc<Inner>,
    addr: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.inner.gate.lock() {
            g.end_handshake(self.addr);
        }
    }
}

/// Ken over TCP.
pub struct TcpTransport {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Runtime,
    events: mpsc::Receiver<Queued>,
    local: SocketAddr,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport").field("me", &self.inner.me).field("local", &self.local).finish_non_exhaustive()
    }
}

fn io_err(doing: &str, e: std::io::Error) -> RemoteError {
    RemoteError::Transport(format!("{doing}: {e}"))
}

impl TcpTransport {
    /// Start kernel `me`'s transport, accepting connections on `listen` (port 0: any free port;
    /// see [`TcpTransport::local_addr`]).
    pub fn start(me: KernelId, listen: SocketAddr, config: TcpConfig) -> Result<Self, RemoteError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("ken-{me}"))
            .enable_all()
            .build()
            .map_err(|e| io_err("starting the runtime", e))?;
        let listener = runtime.block_on(TcpListener::bind(listen)).map_err(|e| io_err(&format!("binding {listen}"), e))?;
        let local = listener.local_addr().map_err(|e| io_err("reading the bound address", e))?;
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            me,
            config,
            conns: Mutex::new(Conns::default()),
            gate: Mutex::new(ConnectionGate::default()),
            events: Mutex::new(tx),
            queued_in: AtomicUsize::new(0),
        });
        let acceptor = Arc::clone(&inner);
        runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, from)) => {
                        let limit = acceptor.config.limits.handshakes_per_address;
                        let admitted = acceptor.gate.lock().is_ok_and(|mut g| g.begin_handshake(from.ip(), limit));
                        if !admitted {
                            log::warn!(
                                "{}: refusing a connection from {from}: {limit} handshakes from {} in progress",
                                acceptor.me,
                                from.ip()
                            );
                            drop(stream);
                            continue;
                        }
                        let inner = Arc::clone(&acceptor);
                        let slot = HandshakeSlot { inner: Arc::clone(&acceptor), addr: from.ip() };
                        tokio::spawn(async move {
                            let reason = connection(&inner, stream, None, Some(slot)).await;
                            log::info!("{}: connection from {from} ended: {reason}", inner.me);
                        });
                    }
                    Err(e) => {
                        log::warn!("{}: accept failed: {e}", acceptor.me);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(TcpTransport { inner, runtime, events: rx, local })
    }

    /// The address this transport accepts connections on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Keep a connection to `peer` at `addr`: dial now, and redial with capped backoff whenever
    /// it drops, for as long as the transport lives.
    pub fn dial(&self, peer: KernelId, addr: SocketAddr) {
        let inner = Arc::clone(&self.inner);
        self.runtime.spawn(async move {
            let mut delay = inner.config.redial_min;
            loop {
                match TcpStream::connect(addr).await {
                    Ok(stream) => {
                        let _ = stream.set_nodelay(true);
                        let started = tokio::time::Instant::now();
                        let reason = connection(&inner, stream, Some(peer.clone()), None).await;
                        log::info!("{}: connection to {peer} at {addr} ended: {reason}", inner.me);
                        if started.elapsed() > Duration::from_secs(1) {
                            delay = inner.config.redial_min;
                        }
                    }
                    Err(e) => log::debug!("{}: dialing {peer} at {addr}: {e}", inner.me),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(inner.config.redial_max);
            }
        });
    }

    /// Wait up to `timeout` for the next event (writing what [`Transport::send`] queued first).
    pub fn wait_event(&mut self, timeout: Duration) -> Option<TransportEvent> {
        // Nothing queued stays unwritten while the host sleeps.
        Transport::flush(self);
        self.events.recv_timeout(timeout).ok().map(|q| self.taken(q))
    }

    /// Bytes of received frames waiting for the host to take them (bounded by
    /// [`InboundLimits::queued_bytes`] per connection).
    pub fn queued_inbound(&self) -> usize {
        self.inner.queued_in.load(Ordering::Relaxed)
    }

    /// An event leaves the queue: its bytes no longer count, and its permit goes back to its
    /// connection's reader.
    fn taken(&self, (event, permit): Queued) -> TransportEvent {
        if let TransportEvent::Frame(_, f) = &event {
            self.inner.queued_in.fetch_sub(f.len(), Ordering::Relaxed);
        }
        drop(permit);
        event
    }
}

impl Transport for TcpTransport {
    fn send(&mut self, peer: &KernelId, frame: Vec<u8>) {
        if let Ok(conns) = self.inner.conns.lock() {
            if let Some(c) = conns.by_peer.get(peer) {
                let len = frame.len();
                match c.queue(frame, self.inner.config.limits.outbound_queued_bytes) {
                    Ok(true) => {}
                    Ok(false) => log::debug!("{}: {peer} is not reading; dropping a frame of {len} bytes", self.inner.me),
                    Err(reason) => {
                        let _ = c.tx.send(Cmd::Close(reason));
                    }
                }
            }
        }
    }

    /// Write every connection's queued frames: a few (one message and its acknowledgements)
    /// from this thread, in one system call per connection and with no hand-off to the
    /// runtime's thread on the path of the message; a larger batch by the connection's writer
    /// task (see `Conn::flush`).
    fn flush(&mut self) {
        if let Ok(conns) = self.inner.conns.lock() {
            for c in conns.by_peer.values() {
                c.flush();
            }
        }
    }

    fn close(&mut self, peer: &KernelId, reason: &str) {
        log::warn!("{}: closing the connection to {peer}: {reason}", self.inner.me);
        if let Ok(conns) = self.inner.conns.lock() {
            if let Some(c) = conns.by_peer.get(peer) {
                let _ = c.tx.send(Cmd::Close(reason.to_owned()));
            }
        }
    }

    fn poll_event(&mut self) -> Option<TransportEvent> {
        self.events.try_recv().ok().map(|q| self.taken(q))
    }
}

/// One round of a host loop on TCP: handle the events waiting (at most
/// [`InboundLimits::events_per_round`]), do the due I/O ([`crate::Node::pump`]: apply what
/// arrived, send what is durable), run up to `max_cranks` cranks, do the due I/O again; if the kernel has nothing queued, wait up to `idle_wait` for the next
/// event (less if a retransmission falls due). `now` is the host's clock.
///
/// Keep `max_cranks` small (tens): a round's output leaves at its end, so with thousands of
/// cranks per round two busy kernels take turns being idle, each waiting for the other's burst
/// (kernel-remote's `remote` bench: 64 cranks a round ran twice the in-memory rate of 4,096).
pub fn serve_once<S: crate::DurableStore>(
    node: &mut crate::Node<S>,
    net: &mut TcpTransport,
    now: impl Fn() -> Duration,
    max_cranks: u64,
    idle_wait: Duration,
) -> Result<(), RemoteError> {
    for _ in 0..net.inner.config.limits.events_per_round {
        let Some(e) = net.poll_event() else { break };
        node.handle(now(), e, net)?;
    }
    // Apply what arrived before running cranks, so the cranks it queues run in this round, and
    // send what is already durable (under sync durability, the acknowledgements of what was just
    // applied) before the cranks, rather than hold it back behind their commits. Under group
    // commit nothing waits here: with cranks queued the node does not sync early, so the
    // acknowledgements still share the round's sync with the cranks' outputs.
    node.pump(now(), net)?;
    node.run(Some(max_cranks))?;
    node.pump(now(), net)?;
    if node.kernel().queue_len() == 0 {
        let t = now();
        let wait = node.next_deadline().map_or(idle_wait, |d| d.saturating_sub(t).min(idle_wait));
        if let Some(e) = net.wait_event(wait) {
            node.handle(now(), e, net)?;
        }
        node.pump(now(), net)?;
    }
    Ok(())
}

/// What a connection's reader does with each sealed frame it reads: open it with the session
/// `cipher` and check that it decodes as a [`Frame`] of at most `max` bytes. An error is the
/// reason the connection closes; nothing from that frame (or after it) reaches the node.
pub fn receive_frame(cipher: &mut dyn FrameCipher, sealed: Vec<u8>, max: usize) -> Result<Vec<u8>, String> {
    let frame = cipher.open(sealed).map_err(|reason| format!("unreadable frame: {reason}"))?;
    Frame::decode(&frame, max).map_err(|e| e.to_string())?;
    Ok(frame)
}

/// Read one length-prefixed frame; an oversized length is refused before reading its body.
async fn read_frame(r: &mut (impl AsyncReadExt + Unpin), max: usize) -> Result<Vec<u8>, String> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(|e| format!("reading: {e}"))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(format!("frame of {len} bytes exceeds the limit of {max}"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| format!("reading: {e}"))?;
    Ok(buf)
}

async fn write_frame(w: &mut (impl AsyncWriteExt + Unpin), frame: &[u8]) -> Result<(), String> {
    let len = u32::try_from(frame.len()).map_err(|_| "frame too long to send".to_owned())?;
    w.write_all(&len.to_be_bytes()).await.map_err(|e| format!("writing: {e}"))?;
    w.write_all(frame).await.map_err(|e| format!("writing: {e}"))
}

/// Security handshake, then `Hello` both ways. Returns the peer and the session cipher.
async fn handshake(inner: &Inner, stream: &mut TcpStream, expected: Option<&KernelId>) -> Result<(KernelId, Box<dyn FrameCipher>), String> {
    // Before the peer is known, it may make us read only small frames.
    let max_message = inner.config.limits.max_handshake_message;
    let mut hs = inner.config.security.begin(expected.is_some());
    let mut incoming: Option<Vec<u8>> = None;
    loop {
        let (out, done) = hs.step(incoming.as_deref()).map_err(|e| format!("handshake: {e}"))?;
        if let Some(m) = out {
            write_frame(stream, &m).await?;
        }
        if done {
            break;
        }
        incoming = Some(read_frame(stream, max_message).await?);
    }
    let authenticated = hs.authenticated();
    let mut cipher = hs.finish();
    let hello = Frame::Hello { kernel: inner.me.clone() }.encode().map_err(|e| e.to_string())?;
    write_frame(stream, &cipher.seal(hello)?).await?;
    let theirs = cipher.open(read_frame(stream, cipher.max_sealed(max_message)).await?)?;
    let peer = check_hello(&inner.me, expected, authenticated.as_ref(), &theirs, max_message).map_err(|e| e.to_string())?;
    Ok((peer, cipher))
}

/// Run one connection to its end; returns why it ended. `slot` counts an accepted connection's
/// handshake against its address until the handshake is over.
async fn connection(inner: &Arc<Inner>, mut stream: TcpStream, expected: Option<KernelId>, slot: Option<HandshakeSlot>) -> String {
    let _ = stream.set_nodelay(true);
    let timeout = inner.config.handshake_timeout;
    let (peer, cipher) = match tokio::time::timeout(timeout, handshake(inner, &mut stream, expected.as_ref())).await {
        Ok(Ok(done)) => done,
        Ok(Err(reason)) => {
            log::warn!("{}: closing a connection during the handshake: {reason}", inner.me);
            return reason;
        }
        Err(_) => {
            log::warn!("{}: closing a connection: handshake timed out", inner.me);
            return "handshake timed out".into();
        }
    };
    drop(slot);
    let limits = &inner.config.limits;
    if expected.is_none() {
        let admitted = match inner.gate.lock() {
            Ok(mut g) => g.admit(&peer, std::time::Instant::now(), limits.connects_per_peer, limits.connect_window),
            Err(_) => Err("lock poisoned".into()),
        };
        if let Err(reason) = admitted {
            log::warn!("{}: refusing a connection from {peer}: {reason}", inner.me);
            return reason;
        }
    }
    let sealed_max = cipher.max_sealed(inner.config.max_frame);
    let cipher = Arc::new(Mutex::new(cipher));
    let (reader, writer) = stream.into_split();
    let writer = Arc::new(writer);
    let out = Arc::new(Mutex::new(Outbound { buf: Vec::new(), start: 0, failed: None }));
    let (tx, mut rx) = tmpsc::unbounded_channel();
    let id = {
        let Ok(mut conns) = inner.conns.lock() else { return "lock poisoned".into() };
        conns.next_id += 1;
        let id = conns.next_id;
        let conn = Conn { id, tx, out: Arc::clone(&out), socket: Arc::clone(&writer), cipher: Arc::clone(&cipher) };
        if let Some(old) = conns.by_peer.insert(peer.clone(), conn) {
            let _ = old.tx.send(Cmd::Close("replaced by a newer connection".into()));
        }
        id
    };
    inner.emit(TransportEvent::Connected(peer.clone()));
    let mut reader = tokio::io::BufReader::with_capacity(64 << 10, reader);
    let max = inner.config.max_frame;
    let read_cipher = Arc::clone(&cipher);
    let read_inner = Arc::clone(inner);
    let read_peer = peer.clone();
    // The bytes this connection may have waiting for the host, and its inbound rate.
    let budget = limits.queued_bytes.clamp(1, u32::MAX as usize);
    let permits = Arc::new(Semaphore::new(budget));
    let mut bucket = TokenBucket::new(limits.bytes_per_sec, limits.burst_bytes, std::time::Instant::now());
    let min_cost = limits.min_frame_cost;
    let mut read_task = tokio::spawn(async move {
        loop {
            let sealed = match read_frame(&mut reader, sealed_max).await {
                Ok(f) => f,
                Err(reason) => {
                    if !reason.starts_with("reading") {
                        log::warn!("{}: closing the connection to {read_peer}: {reason}", read_inner.me);
                    }
                    return reason;
                }
            };
            // Over its rate, the peer waits: nothing more is read from it meanwhile.
            let wait = bucket.take((sealed.len() as u64).max(min_cost), std::time::Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let received = match read_cipher.lock() {
                Ok(mut c) => receive_frame(&mut **c, sealed, max),
                Err(_) => Err("cipher lock poisoned".into()),
            };
            match received {
                Ok(frame) => {
                    // Wait for room among this connection's frames waiting for the host.
                    let cost = u32::try_from(frame.len().clamp(1, budget)).unwrap_or(u32::MAX);
                    let Ok(permit) = Arc::clone(&permits).acquire_many_owned(cost).await else {
                        return "inbound budget closed".into();
                    };
                    read_inner.emit_frame(read_peer.clone(), frame, permit);
                }
                Err(reason) => {
                    // It ends the connection here, before anything after it is delivered.
                    log::warn!("{}: closing the connection to {read_peer}: {reason}", read_inner.me);
                    return reason;
                }
            }
        }
    });
    // The host thread writes frames itself (`Conn::flush`); this task writes only what the
    // socket did not take then, once it is writable again.
    let reason = loop {
        tokio::select! {
            r = &mut read_task => break r.unwrap_or_else(|e| format!("reader failed: {e}")),
            cmd = rx.recv() => match cmd {
                Some(Cmd::Flush) => {
                    let written = loop {
                        if let Err(e) = writer.writable().await {
                            break Err(format!("writing: {e}"));
                        }
                        let r = match out.lock() {
                            Ok(mut o) => o.write_some(&writer),
                            Err(_) => Err("outbound lock poisoned".into()),
                        };
                        if !matches!(r, Ok(false)) {
                            break r;
                        }
                    };
                    if let Err(reason) = written {
                        break reason;
                    }
                }
                Some(Cmd::Close(reason)) => {
                    // What was queued before the close still goes out, if the socket takes it.
                    if let Ok(mut o) = out.lock() {
                        let _ = o.write_some(&writer);
                    }
                    break format!("closed: {reason}");
                }
                None => break "transport dropped".into(),
            },
        }
    };
    read_task.abort();
    // Dropping the last handle of the write half (the `Conn`'s, below) shuts it down.
    if let Ok(mut o) = out.lock() {
        o.failed.get_or_insert_with(|| reason.clone());
    }
    let current = match inner.conns.lock() {
        Ok(mut conns) => {
            let current = conns.by_peer.get(&peer).is_some_and(|c| c.id == id);
            if current {
                conns.by_peer.remove(&peer);
            }
            current
        }
        Err(_) => false,
    };
    if current {
        inner.emit(TransportEvent::Disconnected(peer, reason.clone()));
    }
    reason
}
