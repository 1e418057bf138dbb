//! Secure links over TCP loopback: kernels with Noise identities and allow-lists exchange
//! messages; an unknown key, an impostor (a `Hello` naming another kernel than its key), a man
//! in the middle flipping a byte, a replayed or reordered frame, garbage and oversized frames,
//! too many connections, and a flooding peer are each refused or held back — the connection
//! closes with a logged reason, nothing from it is applied, and other peers carry on. A peer that
//! comes back from another address keeps its Ken session (it is keyed by the authenticated id).

use kernel_core::{CapData, Kernel, MemStore, Settlement, VRef};
use kernel_remote::tcp::{InboundLimits, TcpConfig, TcpTransport};
use kernel_remote::{
    AllowList, Frame, Identity, KernelId, Node, NoiseCipher, NoiseSecurity, PeerSeq, RemoteConfig, Transport, TransportEvent, WireData,
    WireMessage, KEY_LEN,
};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

struct Echo;
impl Behavior for Echo {
    fn call(&mut self, _: &mut Cx<'_, '_, '_>, _: VRef, _: &str, args: VatData) -> Result<Answer, VatError> {
        Ok(Answer::Value(args))
    }
}

fn id(s: &str) -> KernelId {
    s.parse().expect("kernel id")
}

/// Fixed test keys: a, b, m (an allowed but hostile peer), x (a stranger).
fn key(name: &str) -> Identity {
    let n = match name {
        "a" => 1,
        "b" => 2,
        "m" => 3,
        "c" => 4,
        _ => 99,
    };
    Identity::from_secret([n; KEY_LEN])
}

fn allow(peers: &[(&str, &Identity)]) -> AllowList {
    AllowList::from_pairs(peers.iter().map(|(n, k)| (id(n), k.public()))).expect("allow-list")
}

fn secure(me: &Identity, peers: &[(&str, &Identity)]) -> TcpConfig {
    TcpConfig { security: Arc::new(NoiseSecurity::new(me, allow(peers))), ..TcpConfig::default() }
}

/// What a kernel saw, for the assertions.
#[derive(Debug, Default)]
struct Outcome {
    answered: u64,
    faults: Vec<(KernelId, String)>,
    applied_from: Vec<(KernelId, PeerSeq)>,
    /// Transport-level ends of connections: (peer, reason).
    dropped: Vec<(KernelId, String)>,
    connects: u64,
}

/// A kernel on MemStore with an echo bootstrap, on a TCP transport.
struct Host {
    node: Node<MemStore>,
    net: TcpTransport,
    start: Instant,
    answered: Rc<Cell<u64>>,
    dropped: Vec<(KernelId, String)>,
    connects: u64,
}

impl Host {
    fn new(name: &str, config: TcpConfig, listen: &str) -> Host {
        let mut node = Node::new(Kernel::open(MemStore::new()).expect("open"), id(name), RemoteConfig::default());
        let echo = node.kernel_mut().add_endpoint("echo", VatEndpoint::boxed(HelperVat::new(Echo))).expect("vat");
        let root = node.kernel().root(echo).expect("root");
        node.set_bootstrap(root);
        let net = TcpTransport::start(id(name), listen.parse().expect("addr"), config).expect("start");
        Host { node, net, start: Instant::now(), answered: Rc::new(Cell::new(0)), dropped: Vec::new(), connects: 0 }
    }

    /// Queue `n` echo messages to `peer`'s bootstrap, counting the right answers.
    fn send(&mut self, peer: &str, n: u64) {
        let target = self.node.peer_root(&id(peer)).expect("root");
        for i in 0..n {
            let body = format!("{peer}{i}");
            let kp = self.node.kernel_mut().queue_message(target.into(), "echo", CapData::plain(body.clone())).expect("queue");
            let a = Rc::clone(&self.answered);
            self.node
                .kernel_mut()
                .watch(kp, move |_, s| {
                    if *s == Settlement::Fulfilled(CapData::plain(body)) {
                        a.set(a.get() + 1);
                    }
                })
                .expect("watch");
        }
    }

    fn event(&mut self, e: TransportEvent) {
        match &e {
            TransportEvent::Disconnected(p, reason) => self.dropped.push((p.clone(), reason.clone())),
            TransportEvent::Connected(_) => self.connects += 1,
            TransportEvent::Frame(..) => {}
        }
        let now = self.start.elapsed();
        self.node.handle(now, e, &mut self.net).expect("handle");
    }

    /// One round of the host loop (as `serve_once`, recording connection events).
    fn serve(&mut self) {
        for _ in 0..4096 {
            let Some(e) = self.net.poll_event() else { break };
            self.event(e);
        }
        self.node.run(Some(256)).expect("run");
        self.node.pump(self.start.elapsed(), &mut self.net).expect("pump");
        if self.node.kernel().queue_len() == 0 {
            if let Some(e) = self.net.wait_event(Duration::from_millis(2)) {
                self.event(e);
            }
            self.node.pump(self.start.elapsed(), &mut self.net).expect("pump");
        }
    }

    fn serve_until(&mut self, what: &str, timeout: Duration, mut done: impl FnMut(&Host) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(start.elapsed() < timeout, "timed out waiting for {what}");
            self.serve();
        }
    }

    fn outcome(mut self) -> Outcome {
        let applied_from = self.node.status().into_iter().map(|s| (s.peer, s.applied)).collect();
        Outcome {
            answered: self.answered.get(),
            faults: self.node.take_faults(),
            applied_from,
            dropped: self.dropped,
            connects: self.connects,
        }
    }
}

/// A host in its own thread, serving until `stop`; it dials the peers given an address and
/// sends `sends` messages to each peer; `progress` counts its answers.
fn spawn_host(
    name: &'static str,
    config: TcpConfig,
    peers: Vec<(&'static str, Option<SocketAddr>)>,
    sends: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> (SocketAddr, thread::JoinHandle<Outcome>) {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut host = Host::new(name, config, "127.0.0.1:0");
        tx.send(host.net.local_addr()).expect("send addr");
        for (peer, addr) in &peers {
            host.node.add_peer(id(peer)).expect("peer");
            if let Some(addr) = addr {
                host.net.dial(id(peer), *addr);
            }
            host.send(peer, sends);
        }
        while !stop.load(Ordering::SeqCst) {
            host.serve();
            // Published once nothing waits for an ack: the peer has applied all we wrote.
            if host.node.backlog() == 0 {
                progress.store(host.answered.get(), Ordering::SeqCst);
            }
        }
        host.outcome()
    });
    (rx.recv().expect("address"), handle)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

fn write_frame(s: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    s.write_all(&u32::try_from(bytes.len()).expect("len").to_be_bytes())?;
    s.write_all(bytes)
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// True if the other side closes `s` within `within` (frames it sends meanwhile are skipped);
/// false if it is still open then.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match read_frame(s) {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// A hand-driven secure client: the Noise handshake and `Hello` of `me` with its key, then
/// frames sealed (or not) as the test likes.
struct SecureRaw {
    s: TcpStream,
    cipher: NoiseCipher,
}

impl SecureRaw {
    fn connect(addr: SocketAddr, me: &Identity, peers: &[(&str, &Identity)], hello_as: &str) -> Result<SecureRaw, String> {
        let security = NoiseSecurity::new(me, allow(peers));
        let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let mut hs = security.handshake(true);
        let (m1, _) = hs.advance(None).map_err(|e| e.to_string())?;
        write_frame(&mut s, &m1.ok_or("no first message")?).map_err(|e| e.to_string())?;
        let m2 = read_frame(&mut s).map_err(|e| format!("reading the second message: {e}"))?;
        let (m3, done) = hs.advance(Some(&m2)).map_err(|e| e.to_string())?;
        assert!(done);
        write_frame(&mut s, &m3.ok_or("no third message")?).map_err(|e| e.to_string())?;
        let mut cipher = hs.into_cipher().map_err(|e| e.to_string())?;
        let hello = Frame::Hello { kernel: id(hello_as) }.encode().map_err(|e| e.to_string())?;
        write_frame(&mut s, &cipher.seal_frame(&hello).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        let theirs = read_frame(&mut s).map_err(|e| format!("reading their hello: {e}"))?;
        let theirs = cipher.open_frame(&theirs).map_err(|e| e.to_string())?;
        match Frame::decode(&theirs, 1 << 20) {
            Ok(Frame::Hello { .. }) => Ok(SecureRaw { s, cipher }),
            other => Err(format!("their hello: {other:?}")),
        }
    }

    fn seal(&mut self, f: &Frame) -> Vec<u8> {
        self.cipher.seal_frame(&f.encode().expect("encode")).expect("seal")
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let _ = write_frame(&mut self.s, bytes);
    }

    fn closed_within(&mut self, within: Duration) -> bool {
        closed_within(&mut self.s, within)
    }
}

/// A message to the receiver's bootstrap (its `ro+0`, our `ro-0`).
fn echo_data(seq: u64) -> Frame {
    let message = WireMessage::Deliver {
        target: "ro-0".parse().expect("rref"),
        method: "echo".into(),
        args: WireData { body: b"1".to_vec(), slots: vec![] },
        result: None,
    };
    Frame::Data { seq: PeerSeq(seq), message: message.encode().expect("encode") }
}

fn applied(o: &Outcome, peer: &str) -> PeerSeq {
    o.applied_from.iter().find(|(p, _)| *p == id(peer)).map_or(PeerSeq(0), |(_, s)| *s)
}

#[test]
fn allowed_peers_talk_over_the_secure_link() {
    let (ka, kb) = (key("a"), key("b"));
    let stop = Arc::new(AtomicBool::new(false));
    let (pa, pb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (b_addr, b) = spawn_host("b", secure(&kb, &[("a", &ka)]), vec![("a", None)], 200, Arc::clone(&stop), Arc::clone(&pb));
    let (_, a) = spawn_host("a", secure(&ka, &[("b", &kb)]), vec![("b", Some(b_addr))], 200, Arc::clone(&stop), Arc::clone(&pa));
    wait_until("both sides answered", Duration::from_secs(60), || pa.load(Ordering::SeqCst) == 200 && pb.load(Ordering::SeqCst) == 200);
    stop.store(true, Ordering::SeqCst);
    let (a, b) = (a.join().expect("a"), b.join().expect("b"));
    assert_eq!((a.answered, b.answered), (200, 200));
    assert!(a.faults.is_empty() && b.faults.is_empty(), "{:?} {:?}", a.faults, b.faults);
    // 200 sends and 200 answers each way.
    assert_eq!(applied(&a, "b"), PeerSeq(400));
    assert_eq!(applied(&b, "a"), PeerSeq(400));
    let refused = |o: &Outcome| o.dropped.iter().any(|(_, r)| r.contains("authentication") || r.contains("allowed") || r.contains("hello"));
    assert!(!refused(&a) && !refused(&b), "no security refusal between allowed peers: {:?} {:?}", a.dropped, b.dropped);
}

#[test]
fn unknown_keys_and_impostors_are_refused_and_the_kernel_carries_on() {
    let (ka, kb, kc, km, kx) = (key("a"), key("b"), key("c"), key("m"), key("x"));
    let stop = Arc::new(AtomicBool::new(false));
    let pb = Arc::new(AtomicU64::new(0));
    // b knows a, c and m by their keys.
    let config = secure(&kb, &[("a", &ka), ("c", &kc), ("m", &km)]);
    let (b_addr, b) = spawn_host("b", config, vec![("a", None), ("c", None), ("m", None)], 0, Arc::clone(&stop), Arc::clone(&pb));
    // A stranger with its own key, claiming to be c: refused in the handshake.
    let e = SecureRaw::connect(b_addr, &kx, &[("b", &kb)], "c").err().expect("a stranger is refused");
    assert!(e.contains("hello") || e.contains("reading"), "{e}");
    // m (allowed, as m) says it is a: refused at the hello.
    let mut m = SecureRaw::connect(b_addr, &km, &[("b", &kb)], "a").expect("the handshake itself succeeds");
    assert!(m.closed_within(Duration::from_secs(5)), "an impostor's connection is closed");
    // A full kernel with a stranger's key posing as c: never connects, nothing applied.
    let pc = Arc::new(AtomicU64::new(0));
    let (_, c) = spawn_host("c", secure(&kx, &[("b", &kb)]), vec![("b", Some(b_addr))], 5, Arc::clone(&stop), Arc::clone(&pc));
    // The dialer refuses an acceptor whose key it does not know, too.
    let pd = Arc::new(AtomicU64::new(0));
    let (_, d) = spawn_host("a", secure(&ka, &[("b", &kx)]), vec![("b", Some(b_addr))], 5, Arc::clone(&stop), Arc::clone(&pd));
    // Meanwhile the real a talks to b.
    let pa = Arc::new(AtomicU64::new(0));
    let (_, a) = spawn_host("a", secure(&ka, &[("b", &kb)]), vec![("b", Some(b_addr))], 50, Arc::clone(&stop), Arc::clone(&pa));
    wait_until("a's answers", Duration::from_secs(60), || pa.load(Ordering::SeqCst) == 50);
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (a, b, c, d) = (a.join().expect("a"), b.join().expect("b"), c.join().expect("c"), d.join().expect("d"));
    assert_eq!(a.answered, 50, "the good peer was unaffected");
    assert_eq!((c.answered, c.connects), (0, 0), "the stranger never connected");
    assert_eq!((d.answered, d.connects), (0, 0), "a dialer never connects to a key it does not know");
    assert_eq!(applied(&b, "a"), PeerSeq(50), "a's 50 sends");
    assert_eq!(applied(&b, "c"), PeerSeq(0), "nothing from the stranger posing as c");
    assert!(b.faults.is_empty(), "refusals happen before the node hears of the connection: {:?}", b.faults);
    assert_eq!(b.connects, 1, "only a ever reached b's node: {:?}", b.dropped);
}

/// Forward `listen` <-> `upstream`, frame by frame (length-prefixed), flipping one byte of the
/// frames `tamper` names: (connection number, client-to-server?, frame index, byte offset).
/// Outgoing connections leave from `source`. Returns the proxy's address and its connection
/// count.
fn proxy(upstream: SocketAddr, source: IpAddr, tamper: Vec<(usize, bool, usize, usize)>) -> (SocketAddr, Arc<AtomicUsize>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    let tamper = Arc::new(tamper);
    thread::spawn(move || {
        rt.block_on(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket.bind(SocketAddr::new(source, 0)).expect("bind source");
                let Ok(server) = socket.connect(upstream).await else { continue };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let t = Arc::clone(&tamper);
                tokio::spawn(pipe(cr, sw, n, true, Arc::clone(&t)));
                tokio::spawn(pipe(sr, cw, n, false, t));
            }
        });
    });
    (addr, count)
}

async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    conn: usize,
    upward: bool,
    tamper: Arc<Vec<(usize, bool, usize, usize)>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for index in 0.. {
        let mut len = [0u8; 4];
        if r.read_exact(&mut len).await.is_err() {
            break;
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        if r.read_exact(&mut body).await.is_err() {
            break;
        }
        for &(c, up, i, at) in tamper.iter() {
            if (c, up, i) == (conn, upward, index) && at < body.len() {
                body[at] ^= 0x20;
            }
        }
        if w.write_all(&len).await.is_err() || w.write_all(&body).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

#[test]
fn a_man_in_the_middle_flipping_a_byte_is_detected_and_the_session_recovers() {
    let (ka, kb) = (key("a"), key("b"));
    let stop = Arc::new(AtomicBool::new(false));
    let pb = Arc::new(AtomicU64::new(0));
    let (b_addr, b) = spawn_host("b", secure(&kb, &[("a", &ka)]), vec![("a", None)], 0, Arc::clone(&stop), Arc::clone(&pb));
    // Connection 0: a byte of a's first frame after the hello (frames: m1, m3, hello, ...).
    // Connection 1: a byte of b's handshake message (m2). Later connections pass untouched.
    let (p_addr, connections) = proxy(b_addr, "127.0.0.1".parse().expect("ip"), vec![(0, true, 3, 5), (1, false, 0, 40)]);
    let pa = Arc::new(AtomicU64::new(0));
    let (_, a) = spawn_host("a", secure(&ka, &[("b", &kb)]), vec![("b", Some(p_addr))], 100, Arc::clone(&stop), Arc::clone(&pa));
    wait_until("a's answers", Duration::from_secs(60), || pa.load(Ordering::SeqCst) == 100);
    stop.store(true, Ordering::SeqCst);
    let (a, b) = (a.join().expect("a"), b.join().expect("b"));
    assert!(connections.load(Ordering::SeqCst) >= 3, "a redialed after each tampered connection");
    assert!(
        b.dropped.iter().any(|(p, r)| *p == id("a") && r.contains("failed authentication")),
        "b saw the altered frame and closed: {:?}",
        b.dropped
    );
    // Exactly once, in spite of the lost connections.
    assert_eq!(a.answered, 100);
    assert_eq!(applied(&b, "a"), PeerSeq(100), "a's 100 sends");
    assert_eq!(applied(&a, "b"), PeerSeq(100));
    assert!(a.faults.is_empty() && b.faults.is_empty(), "{:?} {:?}", a.faults, b.faults);
}

#[test]
fn a_peer_that_moves_address_keeps_its_session() {
    let (ka, kb) = (key("a"), key("b"));
    let stop = Arc::new(AtomicBool::new(false));
    let pb = Arc::new(AtomicU64::new(0));
    let (b_addr, b) = spawn_host("b", secure(&kb, &[("a", &ka)]), vec![("a", None)], 0, Arc::clone(&stop), Arc::clone(&pb));
    let mut a = Host::new("a", secure(&ka, &[("b", &kb)]), "127.0.0.1:0");
    a.node.add_peer(id("b")).expect("peer");
    a.net.dial(id("b"), b_addr);
    a.send("b", 30);
    a.serve_until("the first answers", Duration::from_secs(60), |h| h.answered.get() == 30);
    // a's network goes away with messages still queued; it comes back from 127.0.0.2.
    a.send("b", 30);
    let (p_addr, connections) = proxy(b_addr, "127.0.0.2".parse().expect("ip"), vec![]);
    a.net = TcpTransport::start(id("a"), "127.0.0.1:0".parse().expect("addr"), secure(&ka, &[("b", &kb)])).expect("start");
    a.net.dial(id("b"), p_addr);
    a.serve_until("the answers from the new address", Duration::from_secs(60), |h| h.answered.get() == 60 && h.node.backlog() == 0);
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    let status = a.node.status();
    stop.store(true, Ordering::SeqCst);
    let b = b.join().expect("b");
    assert_eq!(applied(&b, "a"), PeerSeq(60), "one session: b applied a's 60 sends, in order, once");
    assert_eq!(status[0].applied, PeerSeq(60));
    assert_eq!(status[0].backlog, 0);
    assert!(b.faults.is_empty(), "{:?}", b.faults);
}

#[test]
fn replayed_reordered_altered_and_garbage_frames_close_only_that_connection() {
    let (ka, kb, km) = (key("a"), key("b"), key("m"));
    let stop = Arc::new(AtomicBool::new(false));
    let pb = Arc::new(AtomicU64::new(0));
    let config = secure(&kb, &[("a", &ka), ("m", &km)]);
    let (b_addr, b) = spawn_host("b", config, vec![("a", None), ("m", None)], 0, Arc::clone(&stop), Arc::clone(&pb));
    let connect = || SecureRaw::connect(b_addr, &km, &[("b", &kb)], "m").expect("m connects");
    // A replay: message 1 applies once; its copy closes the connection.
    let mut m = connect();
    let one = m.seal(&echo_data(1));
    m.send_raw(&one);
    m.send_raw(&one);
    let two = m.seal(&echo_data(2));
    m.send_raw(&two);
    assert!(m.closed_within(Duration::from_secs(5)), "a replayed frame closes the connection");
    // Reordered: message 3 sealed after 2, sent first.
    let mut m = connect();
    let two = m.seal(&echo_data(2));
    let three = m.seal(&echo_data(3));
    m.send_raw(&three);
    m.send_raw(&two);
    assert!(m.closed_within(Duration::from_secs(5)), "a reordered frame closes the connection");
    // Altered.
    let mut m = connect();
    let mut two = m.seal(&echo_data(2));
    two[3] ^= 1;
    m.send_raw(&two);
    assert!(m.closed_within(Duration::from_secs(5)), "an altered frame closes the connection");
    // Garbage in place of a sealed frame; sealed garbage that is no frame; an oversized length.
    let mut m = connect();
    m.send_raw(&[0x55; 64]);
    assert!(m.closed_within(Duration::from_secs(5)), "garbage closes the connection");
    let mut m = connect();
    let junk = m.cipher.seal_frame(&[0xff, 1, 2, 3]).expect("seal");
    m.send_raw(&junk);
    assert!(m.closed_within(Duration::from_secs(5)), "a sealed non-frame closes the connection");
    let mut m = connect();
    let _ = m.s.write_all(&u32::MAX.to_be_bytes());
    assert!(m.closed_within(Duration::from_secs(5)), "an oversized frame closes the connection");
    // A good peer is unaffected throughout.
    let pa = Arc::new(AtomicU64::new(0));
    let (_, a) = spawn_host("a", secure(&ka, &[("b", &kb)]), vec![("b", Some(b_addr))], 20, Arc::clone(&stop), Arc::clone(&pa));
    wait_until("a's answers", Duration::from_secs(60), || pa.load(Ordering::SeqCst) == 20);
    stop.store(true, Ordering::SeqCst);
    let (a, b) = (a.join().expect("a"), b.join().expect("b"));
    assert_eq!(a.answered, 20);
    assert_eq!(applied(&b, "m"), PeerSeq(1), "only the first, genuine message from m was applied");
    assert_eq!(applied(&b, "a"), PeerSeq(20), "a's 20 sends");
    let reasons: Vec<&str> = b.dropped.iter().filter(|(p, _)| *p == id("m")).map(|(_, r)| r.as_str()).collect();
    // Each of the four bad sealed frames closed its connection for failing to open. Under load a
    // connection can also lose the race with its own handshake and close as "no session" (seen
    // once in CI on a 2-core machine); either way it is refused at the security layer.
    let refused = |r: &&&str| r.contains("failed authentication") || r.contains("no session");
    assert_eq!(reasons.iter().filter(refused).count(), 4, "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("malformed") || r.contains("unknown wire version")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("exceeds the limit")), "{reasons:?}");
}

#[test]
fn too_many_connections_are_refused() {
    let (ka, kb, km) = (key("a"), key("b"), key("m"));
    let stop = Arc::new(AtomicBool::new(false));
    let limits = InboundLimits {
        handshakes_per_address: 4,
        connects_per_peer: 3,
        connect_window: Duration::from_secs(60),
        ..InboundLimits::default()
    };
    let config = TcpConfig { limits, handshake_timeout: Duration::from_secs(3), ..secure(&kb, &[("a", &ka), ("m", &km)]) };
    let (b_addr, b) = spawn_host("b", config, vec![("a", None), ("m", None)], 0, Arc::clone(&stop), Arc::new(AtomicU64::new(0)));
    // Ten connections that never handshake: four wait for the timeout, the rest close at once.
    let mut idle: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(b_addr).expect("connect")).collect();
    thread::sleep(Duration::from_millis(200));
    let closed = idle.iter_mut().filter_map(|s| closed_within(s, Duration::from_millis(300)).then_some(())).count();
    assert_eq!(closed, 6, "connections past the per-address handshake limit are closed");
    drop(idle);
    thread::sleep(Duration::from_millis(100));
    // m connects three times in the window; the fourth is refused.
    let mut kept = Vec::new();
    for _ in 0..3 {
        let mut m = SecureRaw::connect(b_addr, &km, &[("b", &kb)], "m").expect("within the budget");
        assert!(!m.closed_within(Duration::from_millis(200)));
        kept.push(m);
    }
    let mut m = SecureRaw::connect(b_addr, &km, &[("b", &kb)], "m").expect("the handshake completes");
    assert!(m.closed_within(Duration::from_secs(5)), "the fourth connection in the window is refused");
    // a is unaffected.
    let pa = Arc::new(AtomicU64::new(0));
    let (_, a) = spawn_host("a", secure(&ka, &[("b", &kb)]), vec![("b", Some(b_addr))], 10, Arc::clone(&stop), Arc::clone(&pa));
    wait_until("a's answers", Duration::from_secs(60), || pa.load(Ordering::SeqCst) == 10);
    stop.store(true, Ordering::SeqCst);
    let (a, _) = (a.join().expect("a"), b.join().expect("b"));
    assert_eq!(a.answered, 10);
}

#[test]
fn a_flooding_peer_is_held_back_by_the_inbound_budget_and_rate() {
    let (kb, km) = (key("b"), key("m"));
    // b's host takes nothing for a while: m's frames pile up to the budget, then TCP pushes back.
    let budget = 256 << 10;
    let limits = InboundLimits { queued_bytes: budget, ..InboundLimits::default() };
    let config = TcpConfig { limits, ..secure(&kb, &[("m", &km)]) };
    let mut b = TcpTransport::start(id("b"), "127.0.0.1:0".parse().expect("addr"), config).expect("start");
    let mut m = SecureRaw::connect(b.local_addr(), &km, &[("b", &kb)], "m").expect("connect");
    m.s.set_write_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let frame = Frame::Data { seq: PeerSeq(1), message: vec![7; 4000] };
    let mut sent = 0usize;
    let held_back = loop {
        let sealed = m.seal(&frame);
        if let Err(e) = write_frame(&mut m.s, &sealed) {
            break matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
        }
        sent += sealed.len();
        assert!(sent < 256 << 20, "256 MiB went in without push-back");
    };
    assert!(held_back, "the flood was held back by TCP");
    let queued = b.queued_inbound();
    assert!(queued <= budget, "{queued} bytes waiting for the host, budget {budget}");
    assert!(queued > budget / 2, "the budget was used: {queued}");
    // The host takes frames again: they flow.
    let mut frames = 0;
    while let Some(e) = b.wait_event(Duration::from_millis(200)) {
        frames += usize::from(matches!(e, TransportEvent::Frame(..)));
    }
    assert!(frames * 4000 >= queued, "{frames} frames");
    drop(m);

    // A rate of 2 MiB/s (burst 256 KiB): 3 MiB take at least ~1.4 s to arrive.
    let limits = InboundLimits { bytes_per_sec: 2 << 20, burst_bytes: 256 << 10, ..InboundLimits::default() };
    let config = TcpConfig { limits, ..secure(&kb, &[("m", &km)]) };
    let mut b = TcpTransport::start(id("b"), "127.0.0.1:0".parse().expect("addr"), config).expect("start");
    let mut m = SecureRaw::connect(b.local_addr(), &km, &[("b", &kb)], "m").expect("connect");
    let total = 3 << 20;
    let sealed: Vec<Vec<u8>> = (0..total / 4000).map(|_| m.seal(&frame)).collect();
    let writer = thread::spawn(move || {
        for s in &sealed {
            if write_frame(&mut m.s, s).is_err() {
                break;
            }
        }
        m
    });
    let start = Instant::now();
    let mut got = 0usize;
    while got < total / 4000 {
        match b.wait_event(Duration::from_secs(10)) {
            Some(TransportEvent::Frame(..)) => got += 1,
            Some(_) => {}
            None => panic!("frames stopped arriving after {got}"),
        }
    }
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(1200), "3 MiB arrived in {elapsed:?} at 2 MiB/s");
    let _m = writer.join().expect("writer");
}
