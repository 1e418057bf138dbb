//! [`TcpTransport`]: Ken over TCP with tokio. Frames are length-prefixed (u32 big-endian, then
//! the frame: version byte and postcard). A connection starts with the [`Security`] handshake
//! (plaintext today: the seam where Noise goes), then each side sends `Hello` with its kernel id.
//! An oversized frame, a bad handshake or a wrong `Hello` closes that connection with a logged
//! reason and delivers nothing from it; a malformed frame or unknown version is caught by the
//! node, which asks the transport to close the connection. Other connections are unaffected.
//!
//! I/O runs on a tokio runtime owned by the transport, never on the host's thread: `send` and
//! `close` queue a command, events arrive on a channel the host polls ([`Transport::poll_event`])
//! or waits on ([`TcpTransport::wait_event`]). The side given a peer's address dials it and
//! redials with capped backoff whenever the connection drops; the other side accepts.

use crate::error::RemoteError;
use crate::rref::KernelId;
use crate::transport::{Transport, TransportEvent};
use crate::wire::{Frame, DEFAULT_MAX_FRAME};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc as tmpsc;

/// Seals and opens frames after the handshake (identity for plaintext; an AEAD for Noise).
pub trait FrameCipher: Send {
    /// Protect an outgoing frame.
    fn seal(&mut self, plain: Vec<u8>) -> Result<Vec<u8>, String>;
    /// Check and unwrap an incoming frame; an error closes the connection.
    fn open(&mut self, sealed: Vec<u8>) -> Result<Vec<u8>, String>;
}

/// One side of a connection's handshake, driven message by message by the transport (the shape
/// of a Noise handshake: `snow::HandshakeState` fits behind it).
pub trait Handshake: Send {
    /// Advance with the peer's last handshake message (`None` to start, or when it is our turn
    /// again). Returns the message to send next, if any, and whether the handshake is complete.
    fn step(&mut self, incoming: Option<&[u8]>) -> Result<(Option<Vec<u8>>, bool), String>;
    /// The cipher for the session (called once `step` reported completion).
    fn finish(self: Box<Self>) -> Box<dyn FrameCipher>;
}

/// Authentication and encryption of connections: makes a [`Handshake`] per connection.
pub trait Security: Send + Sync + 'static {
    /// Begin a handshake as the dialer (`initiator`) or the acceptor.
    fn begin(&self, initiator: bool) -> Box<dyn Handshake>;
}

/// No authentication, no encryption: for loopback and tests until the Noise issue lands.
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
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_frame: DEFAULT_MAX_FRAME,
            redial_min: Duration::from_millis(20),
            redial_max: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            security: Arc::new(Plaintext),
        }
    }
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig").field("max_frame", &self.max_frame).field("redial_max", &self.redial_max).finish_non_exhaustive()
    }
}

enum Cmd {
    Frame(Vec<u8>),
    Close(String),
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// The live connection per peer: (connection id, its command queue).
    by_peer: HashMap<KernelId, (u64, tmpsc::UnboundedSender<Cmd>)>,
}

struct Inner {
    me: KernelId,
    config: TcpConfig,
    conns: Mutex<Conns>,
    events: Mutex<mpsc::Sender<TransportEvent>>,
}

impl Inner {
    fn emit(&self, e: TransportEvent) {
        if let Ok(tx) = self.events.lock() {
            let _ = tx.send(e);
        }
    }
}

/// Ken over TCP.
pub struct TcpTransport {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Runtime,
    events: mpsc::Receiver<TransportEvent>,
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
        let inner = Arc::new(Inner { me, config, conns: Mutex::new(Conns::default()), events: Mutex::new(tx) });
        let acceptor = Arc::clone(&inner);
        runtime.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, from)) => {
                        let inner = Arc::clone(&acceptor);
                        tokio::spawn(async move {
                            let reason = connection(&inner, stream, None).await;
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
                        let reason = connection(&inner, stream, Some(peer.clone())).await;
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

    /// Wait up to `timeout` for the next event.
    pub fn wait_event(&mut self, timeout: Duration) -> Option<TransportEvent> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Transport for TcpTransport {
    fn send(&mut self, peer: &KernelId, frame: Vec<u8>) {
        if let Ok(conns) = self.inner.conns.lock() {
            if let Some((_, tx)) = conns.by_peer.get(peer) {
                let _ = tx.send(Cmd::Frame(frame));
            }
        }
    }

    fn close(&mut self, peer: &KernelId, reason: &str) {
        log::warn!("{}: closing the connection to {peer}: {reason}", self.inner.me);
        if let Ok(conns) = self.inner.conns.lock() {
            if let Some((_, tx)) = conns.by_peer.get(peer) {
                let _ = tx.send(Cmd::Close(reason.to_owned()));
            }
        }
    }

    fn poll_event(&mut self) -> Option<TransportEvent> {
        self.events.try_recv().ok()
    }
}

/// One round of a host loop on TCP: handle every event waiting, run up to `max_cranks` cranks,
/// do the due I/O ([`crate::Node::pump`]); if the kernel has nothing queued, wait up to `idle_wait`
/// for the next event (less if a retransmission falls due). `now` is the host's clock.
pub fn serve_once<S: crate::DurableStore>(
    node: &mut crate::Node<S>,
    net: &mut TcpTransport,
    now: impl Fn() -> Duration,
    max_cranks: u64,
    idle_wait: Duration,
) -> Result<(), RemoteError> {
    while let Some(e) = net.poll_event() {
        node.handle(now(), e, net)?;
    }
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
    let max = inner.config.max_frame;
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
        incoming = Some(read_frame(stream, max).await?);
    }
    let mut cipher = hs.finish();
    let hello = Frame::Hello { kernel: inner.me.clone() }.encode().map_err(|e| e.to_string())?;
    write_frame(stream, &cipher.seal(hello)?).await?;
    let theirs = cipher.open(read_frame(stream, max).await?)?;
    match Frame::decode(&theirs, max) {
        Ok(Frame::Hello { kernel }) => {
            if let Some(e) = expected {
                if *e != kernel {
                    return Err(format!("handshake from {kernel}, expected {e}"));
                }
            }
            if kernel == inner.me {
                return Err("handshake from a kernel with our own id".into());
            }
            Ok((kernel, cipher))
        }
        Ok(_) => Err("the first frame was not a hello".into()),
        Err(e) => Err(format!("bad hello: {e}")),
    }
}

/// Run one connection to its end; returns why it ended.
async fn connection(inner: &Arc<Inner>, mut stream: TcpStream, expected: Option<KernelId>) -> String {
    let _ = stream.set_nodelay(true);
    let timeout = inner.config.handshake_timeout;
    let (peer, cipher) = match tokio::time::timeout(timeout, handshake(inner, &mut stream, expected.as_ref())).await {
        Ok(Ok(done)) => done,
        Ok(Err(reason)) => {
            log::warn!("{}: closing a connection during the handshake: {reason}", inner.me);
            return reason;
        }
        Err(_) => return "handshake timed out".into(),
    };
    let (tx, mut rx) = tmpsc::unbounded_channel();
    let id = {
        let Ok(mut conns) = inner.conns.lock() else { return "lock poisoned".into() };
        conns.next_id += 1;
        let id = conns.next_id;
        if let Some((_, old)) = conns.by_peer.insert(peer.clone(), (id, tx)) {
            let _ = old.send(Cmd::Close("replaced by a newer connection".into()));
        }
        id
    };
    inner.emit(TransportEvent::Connected(peer.clone()));
    let cipher = Arc::new(Mutex::new(cipher));
    let (reader, writer) = stream.into_split();
    let mut reader = tokio::io::BufReader::with_capacity(64 << 10, reader);
    let max = inner.config.max_frame;
    let read_cipher = Arc::clone(&cipher);
    let read_inner = Arc::clone(inner);
    let read_peer = peer.clone();
    let mut read_task = tokio::spawn(async move {
        loop {
            let sealed = match read_frame(&mut reader, max).await {
                Ok(f) => f,
                Err(reason) => return reason,
            };
            let opened = match read_cipher.lock() {
                Ok(mut c) => c.open(sealed),
                Err(_) => Err("cipher lock poisoned".into()),
            };
            match opened {
                Ok(frame) => {
                    // A frame that does not decode ends the connection here, before anything
                    // after it is delivered.
                    if let Err(e) = Frame::decode(&frame, max) {
                        log::warn!("{}: closing the connection to {read_peer}: {e}", read_inner.me);
                        return e.to_string();
                    }
                    read_inner.emit(TransportEvent::Frame(read_peer.clone(), frame));
                }
                Err(reason) => return format!("unreadable frame: {reason}"),
            }
        }
    });
    let mut w = BufWriter::with_capacity(64 << 10, writer);
    let reason = loop {
        tokio::select! {
            r = &mut read_task => break r.unwrap_or_else(|e| format!("reader failed: {e}")),
            cmd = rx.recv() => {
                let mut next = cmd;
                let mut closing = None;
                // Write everything queued, then flush once.
                loop {
                    match next {
                        Some(Cmd::Frame(f)) => {
                            let sealed = match cipher.lock() {
                                Ok(mut c) => c.seal(f),
                                Err(_) => Err("cipher lock poisoned".into()),
                            };
                            let r = match sealed {
                                Ok(s) => write_frame(&mut w, &s).await,
                                Err(e) => Err(e),
                            };
                            if let Err(e) = r {
                                closing = Some(e);
                                break;
                            }
                        }
                        Some(Cmd::Close(reason)) => {
                            closing = Some(format!("closed: {reason}"));
                            break;
                        }
                        None => {
                            closing = Some("transport dropped".into());
                            break;
                        }
                    }
                    match rx.try_recv() {
                        Ok(c) => next = Some(c),
                        Err(_) => break,
                    }
                }
                if let Err(e) = w.flush().await {
                    closing.get_or_insert(format!("flushing: {e}"));
                }
                if let Some(reason) = closing {
                    break reason;
                }
            }
        }
    };
    read_task.abort();
    let _ = w.shutdown().await;
    let current = match inner.conns.lock() {
        Ok(mut conns) => {
            let current = conns.by_peer.get(&peer).is_some_and(|(cid, _)| *cid == id);
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
