//! Ken over TCP on loopback: two kernels exchange messages; a peer sending a malformed frame,
//! an unknown version, an oversized frame or a forged reference loses its connection with a
//! logged reason and gets nothing applied, while other peers carry on.

use kernel_core::{CapData, Kernel, MemStore, Settlement, VRef};
use kernel_remote::tcp::{serve_once, TcpConfig, TcpTransport};
use kernel_remote::{Frame, KernelId, Node, PeerSeq, RRef, RemoteConfig, WireData, WireMessage, WIRE_VERSION};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

struct Outcome {
    answered: u64,
    faults: Vec<(KernelId, String)>,
    applied_from: Vec<(KernelId, PeerSeq)>,
}

/// A kernel on MemStore with an echo bootstrap, serving TCP until `stop`; it sends `sends`
/// messages to each peer's bootstrap and counts the correct answers.
fn spawn_node(
    name: &'static str,
    peers: Vec<(&'static str, Option<SocketAddr>)>,
    sends: u64,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> (SocketAddr, thread::JoinHandle<Outcome>) {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let mut node = Node::new(Kernel::open(MemStore::new()).expect("open"), id(name), RemoteConfig::default());
        let echo = node.kernel_mut().add_endpoint("echo", VatEndpoint::boxed(HelperVat::new(Echo))).expect("vat");
        let root = node.kernel().root(echo).expect("root");
        node.set_bootstrap(root);
        let mut net = TcpTransport::start(id(name), "127.0.0.1:0".parse().expect("addr"), TcpConfig::default()).expect("start");
        tx.send(net.local_addr()).expect("send addr");
        let answered = Rc::new(Cell::new(0u64));
        for (peer, addr) in &peers {
            node.add_peer(id(peer)).expect("peer");
            if let Some(addr) = addr {
                net.dial(id(peer), *addr);
            }
            let target = node.peer_root(&id(peer)).expect("root");
            for n in 0..sends {
                let body = format!("{n}");
                let kp = node.kernel_mut().queue_message(target.into(), "echo", CapData::plain(body.clone())).expect("queue");
                let a = Rc::clone(&answered);
                node.kernel_mut()
                    .watch(kp, move |_, s| {
                        if *s == Settlement::Fulfilled(CapData::plain(body)) {
                            a.set(a.get() + 1);
                        }
                    })
                    .expect("watch");
            }
        }
        let start = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            serve_once(&mut node, &mut net, || start.elapsed(), 256, Duration::from_millis(2)).expect("serve");
            // Published once nothing waits for an ack: the peer has applied all we wrote.
            if node.backlog() == 0 {
                progress.store(answered.get(), Ordering::SeqCst);
            }
        }
        let applied_from = node.status().into_iter().map(|s| (s.peer, s.applied)).collect();
        Outcome { answered: answered.get(), faults: node.take_faults(), applied_from }
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

#[test]
fn two_kernels_exchange_messages_over_tcp() {
    let stop = Arc::new(AtomicBool::new(false));
    let (pa, pb) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (b_addr, b) = spawn_node("b", vec![("a", None)], 300, Arc::clone(&stop), Arc::clone(&pb));
    let (_, a) = spawn_node("a", vec![("b", Some(b_addr))], 300, Arc::clone(&stop), Arc::clone(&pa));
    wait_until("both sides answered", Duration::from_secs(60), || pa.load(Ordering::SeqCst) == 300 && pb.load(Ordering::SeqCst) == 300);
    stop.store(true, Ordering::SeqCst);
    let (a, b) = (a.join().expect("a"), b.join().expect("b"));
    assert_eq!((a.answered, b.answered), (300, 300));
    assert!(a.faults.is_empty() && b.faults.is_empty(), "{:?} {:?}", a.faults, b.faults);
    // Each side applied the other's 300 sends and 300 answers.
    assert_eq!(a.applied_from, vec![(id("b"), PeerSeq(600))]);
    assert_eq!(b.applied_from, vec![(id("a"), PeerSeq(600))]);
}

/// A raw client that claims to be kernel `name`.
struct Raw(TcpStream);

impl Raw {
    fn connect(addr: SocketAddr, name: &str) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut raw = Raw(s);
        raw.frame(&Frame::Hello { kernel: id(name) }.encode().expect("hello"));
        let hello = raw.read().expect("their hello");
        assert!(matches!(Frame::decode(&hello, 1 << 20), Ok(Frame::Hello { .. })));
        raw
    }

    fn frame(&mut self, bytes: &[u8]) {
        self.raw(&(bytes.len() as u32).to_be_bytes());
        self.raw(bytes);
    }

    fn raw(&mut self, bytes: &[u8]) {
        let _ = self.0.write_all(bytes);
    }

    /// The next frame, or `None` once the other side closed.
    fn read(&mut self) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).ok()?;
        let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut buf).ok()?;
        Some(buf)
    }

    /// True once the other side closes (frames it sent before are skipped).
    fn closed(&mut self) -> bool {
        for _ in 0..10_000 {
            if self.read().is_none() {
                return true;
            }
        }
        false
    }
}

#[test]
fn bad_peers_are_cut_off_and_good_ones_carry_on() {
    let stop = Arc::new(AtomicBool::new(false));
    let (b_addr, b) = spawn_node("b", vec![("a", None), ("m", None)], 0, Arc::clone(&stop), Arc::new(AtomicU64::new(0)));
    // Malformed postcard, an unknown version, an empty frame, an oversized length prefix.
    for bad in [vec![WIRE_VERSION, 0xff, 0xff, 0xff], vec![9, 0, 1], vec![]] {
        let mut m = Raw::connect(b_addr, "m");
        m.frame(&bad);
        assert!(m.closed(), "frame {bad:?} must close the connection");
    }
    let mut m = Raw::connect(b_addr, "m");
    m.raw(&u32::MAX.to_be_bytes());
    assert!(m.closed(), "an oversized frame must close the connection");
    // A forged reference: ro-7 names an object of b's that b never exported.
    let forged = WireMessage::Deliver {
        target: "ro-7".parse::<RRef>().expect("rref"),
        method: "steal".into(),
        args: WireData::default(),
        result: None,
    };
    let mut m = Raw::connect(b_addr, "m");
    m.frame(&Frame::Data { seq: PeerSeq(1), message: forged.encode().expect("encode") }.encode().expect("frame"));
    assert!(m.closed(), "a forged reference must close the connection");
    // Meanwhile a good peer talks to b as usual.
    let pa = Arc::new(AtomicU64::new(0));
    let (_, a) = spawn_node("a", vec![("b", Some(b_addr))], 50, Arc::clone(&stop), Arc::clone(&pa));
    wait_until("a's answers", Duration::from_secs(60), || pa.load(Ordering::SeqCst) == 50);
    stop.store(true, Ordering::SeqCst);
    let (a, b) = (a.join().expect("a"), b.join().expect("b"));
    assert_eq!(a.answered, 50, "the good peer was unaffected");
    assert!(a.faults.is_empty(), "{:?}", a.faults);
    // a's 50 sends.
    assert_eq!(b.applied_from, vec![(id("a"), PeerSeq(50)), (id("m"), PeerSeq(0))], "nothing from m was applied");
    assert_eq!(b.faults.len(), 1, "the forged reference was refused by the kernel: {:?}", b.faults);
    assert_eq!(b.faults[0].0, id("m"));
    assert!(b.faults[0].1.contains("refused") && b.faults[0].1.contains("o-7"), "{}", b.faults[0].1);
}
