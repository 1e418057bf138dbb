//! Secure links against plain TCP, in the same run: two kernels over TCP loopback exchange
//! `echo(n)` messages (kernel a's host sends to b's bootstrap with a result promise; a message
//! counts when its answer is back in a), first with [`Plaintext`] connections, then with
//! [`NoiseSecurity`] (Noise XX handshake, ChaCha20-Poly1305 per frame, allow-lists). Reported:
//! messages/s with a window in flight, round-trip latency p50/p99 one message at a time, and the
//! secure/plain ratio (target >= 0.8). In-memory stores show the link's own cost (the worst
//! case for the ratio); group commit on fjall is the realistic setting. Each round runs plain
//! and secure back to back (which goes first alternates), so the two share the host's load of
//! the moment; the ratio is the median of the rounds' ratios (this host's load swings by ±25%
//! within minutes, more than the link costs), and the rates and latencies shown are the best of
//! the rounds.
//!
//! `cargo bench -p kernel-remote --bench secure [-- --quick]`

use kernel_core::{CapData, KObjectId, Kernel, MemStore, Settlement, VRef};
use kernel_remote::tcp::{serve_once, Plaintext, TcpConfig, TcpTransport};
use kernel_remote::{AllowList, DurableStore, Identity, KernelId, Node, NoiseSecurity, RemoteConfig, KEY_LEN};
use kernel_store::{Durability, FjallStore, StoreOptions};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

/// The allocator a kernel binary ships with (see the workspace's note on mimalloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Echo;
impl Behavior for Echo {
    fn call(&mut self, _: &mut Cx<'_, '_, '_>, _: VRef, _: &str, args: VatData) -> Result<Answer, VatError> {
        Ok(Answer::Value(args))
    }
}

fn id(s: &str) -> KernelId {
    s.parse().expect("kernel id")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Link {
    Plain,
    Secure,
}

#[derive(Clone, Copy)]
enum Backing {
    Memory,
    Group,
}

/// The TCP configuration of kernel `me` (the other is `peer`).
fn config(link: Link, me: &str, peer: &str) -> TcpConfig {
    match link {
        Link::Plain => TcpConfig { security: Arc::new(Plaintext), ..TcpConfig::default() },
        Link::Secure => {
            let key = |n: &str| Identity::from_secret([if n == "a" { 1 } else { 2 }; KEY_LEN]);
            let allow = AllowList::from_pairs([(id(peer), key(peer).public())]).expect("allow-list");
            TcpConfig { security: Arc::new(NoiseSecurity::new(&key(me), allow)), ..TcpConfig::default() }
        }
    }
}

fn setup<S: DurableStore>(kernel: Kernel<S>, name: &str, peer: &str) -> Node<S> {
    let mut node = Node::new(kernel, id(name), RemoteConfig::default());
    let echo = node.kernel_mut().add_endpoint("echo", VatEndpoint::boxed(HelperVat::new(Echo))).expect("vat");
    let root = node.kernel().root(echo).expect("root");
    node.set_bootstrap(root);
    node.add_peer(id(peer)).expect("peer");
    node
}

fn fjall_node(dir: &std::path::Path, name: &str, peer: &str) -> Node<FjallStore> {
    let store = FjallStore::open(dir, StoreOptions::new(Durability::GROUP)).expect("store");
    let observer = store.crank_observer();
    let mut kernel = Kernel::open(store).expect("kernel");
    kernel.add_commit_observer(observer);
    setup(kernel, name, peer)
}

fn memory_node(_: &std::path::Path, name: &str, peer: &str) -> Node<MemStore> {
    setup(Kernel::open(MemStore::new()).expect("open"), name, peer)
}

/// Keep `window` messages in flight until `total` are answered; returns (elapsed, latencies).
fn drive<S: DurableStore>(
    node: &mut Node<S>,
    service: &mut impl FnMut(&mut Node<S>),
    target: KObjectId,
    total: u64,
    window: u64,
) -> (Duration, Vec<Duration>) {
    let done = Rc::new(RefCell::new((0u64, Vec::new())));
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let answered = done.borrow().0;
        if answered >= total {
            break;
        }
        while sent < total && sent - answered < window {
            let at = Instant::now();
            let kp = node.kernel_mut().queue_message(target.into(), "echo", CapData::plain(sent.to_string())).expect("queue");
            let d = Rc::clone(&done);
            node.kernel_mut()
                .watch(kp, move |_, s| {
                    assert!(matches!(s, Settlement::Fulfilled(_)), "{s:?}");
                    let mut d = d.borrow_mut();
                    d.0 += 1;
                    d.1.push(at.elapsed());
                })
                .expect("watch");
            sent += 1;
        }
        service(node);
    }
    let latencies = std::mem::take(&mut done.borrow_mut().1);
    (start.elapsed(), latencies)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[derive(Clone, Copy)]
struct Run {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

/// Two kernels over loopback with `link`: throughput with `window` in flight, then latency one
/// message at a time.
fn run<S: DurableStore>(
    link: Link,
    make: impl Fn(&std::path::Path, &str, &str) -> Node<S> + Send + Clone + 'static,
    total: u64,
    window: u64,
    pings: u64,
) -> Run {
    let tmp = tempfile::tempdir().expect("tempdir");
    let stop = Arc::new(AtomicBool::new(false));
    let (addr_tx, addr_rx) = mpsc::channel();
    let b_dir = tmp.path().join("b");
    let b_stop = Arc::clone(&stop);
    let make_b = make.clone();
    let b = thread::spawn(move || {
        let mut node = make_b(&b_dir, "b", "a");
        let mut net = TcpTransport::start(id("b"), "127.0.0.1:0".parse().expect("addr"), config(link, "b", "a")).expect("start");
        addr_tx.send(net.local_addr()).expect("addr");
        let clock = Instant::now();
        while !b_stop.load(Ordering::Relaxed) {
            serve_once(&mut node, &mut net, || clock.elapsed(), 4096, Duration::from_micros(200)).expect("serve b");
        }
    });
    let b_addr = addr_rx.recv().expect("b's address");
    let mut node = make(&tmp.path().join("a"), "a", "b");
    let mut net = TcpTransport::start(id("a"), "127.0.0.1:0".parse().expect("addr"), config(link, "a", "b")).expect("start");
    net.dial(id("b"), b_addr);
    let target = node.peer_root(&id("b")).expect("b's root");
    let clock = Instant::now();
    let mut service = |n: &mut Node<S>| {
        serve_once(n, &mut net, || clock.elapsed(), 4096, Duration::from_micros(200)).expect("serve a");
    };
    drive(&mut node, &mut service, target, window.min(total), window); // connect, warm up
    let (elapsed, _) = drive(&mut node, &mut service, target, total, window);
    let (_, mut lat) = drive(&mut node, &mut service, target, pings, 1);
    stop.store(true, Ordering::Relaxed);
    b.join().expect("b");
    lat.sort();
    Run { rate: total as f64 / elapsed.as_secs_f64(), p50: percentile(&lat, 0.5), p99: percentile(&lat, 0.99) }
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// `rounds` rounds of a plain and a secure run back to back: the best plain run, the best secure
/// run, and each round's secure/plain rate ratio, lowest first.
fn compare(backing: Backing, rounds: usize, total: u64, window: u64, pings: u64) -> (Run, Run, Vec<f64>) {
    let best = |a: Option<Run>, b: Run| match a {
        None => b,
        Some(a) => Run { rate: a.rate.max(b.rate), p50: a.p50.min(b.p50), p99: a.p99.min(b.p99) },
    };
    let (mut plain, mut secure, mut ratios) = (None, None, Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 { [Link::Plain, Link::Secure] } else { [Link::Secure, Link::Plain] };
        let mut rates = [0.0; 2];
        for link in order {
            let r = match backing {
                Backing::Memory => run(link, memory_node, total, window, pings),
                Backing::Group => run(link, fjall_node, total, window, pings),
            };
            let (slot, rate) = if link == Link::Plain { (&mut plain, &mut rates[0]) } else { (&mut secure, &mut rates[1]) };
            *rate = r.rate;
            *slot = Some(best(*slot, r));
        }
        eprintln!("secure: round {round}: plain {:.0} msg/s, noise {:.0} msg/s", rates[0], rates[1]);
        ratios.push(rates[1] / rates[0]);
    }
    ratios.sort_by(f64::total_cmp);
    (plain.expect("a round"), secure.expect("a round"), ratios)
}

fn report(what: &str, plain: Run, secure: Run, ratios: &[f64]) {
    println!("secure: {what}, plain tcp  {:>9.0} msg/s; round trip p50 {} p99 {}", plain.rate, ms(plain.p50), ms(plain.p99));
    println!(
        "secure: {what}, noise      {:>9.0} msg/s ({:.3}x plain: median of {} rounds, {:.3}..{:.3}; target >= 0.8); round trip p50 {} ({:.3}x plain) p99 {}",
        secure.rate,
        ratios[ratios.len() / 2],
        ratios.len(),
        ratios[0],
        ratios[ratios.len() - 1],
        ms(secure.p50),
        secure.p50.as_secs_f64() / plain.p50.as_secs_f64().max(1e-9),
        ms(secure.p99)
    );
}

/// The cost of sealing and opening one frame of `len` bytes on an established session.
fn frame_cost(len: usize, frames: u32) -> Duration {
    let (a, b) = (Identity::from_secret([1; KEY_LEN]), Identity::from_secret([2; KEY_LEN]));
    let sa = NoiseSecurity::new(&a, AllowList::from_pairs([(id("b"), b.public())]).expect("list"));
    let sb = NoiseSecurity::new(&b, AllowList::from_pairs([(id("a"), a.public())]).expect("list"));
    let (mut i, mut r) = (sa.handshake(true), sb.handshake(false));
    let (m1, _) = i.advance(None).expect("m1");
    let _ = r.advance(None).expect("wait");
    let (m2, _) = r.advance(m1.as_deref()).expect("m2");
    let (m3, _) = i.advance(m2.as_deref()).expect("m3");
    r.advance(m3.as_deref()).expect("done");
    let (mut ci, mut cr) = (i.into_cipher().expect("cipher"), r.into_cipher().expect("cipher"));
    let plain = vec![7u8; len];
    let start = Instant::now();
    for _ in 0..frames {
        let sealed = ci.seal_frame(&plain).expect("seal");
        std::hint::black_box(cr.open_frame(&sealed).expect("open"));
    }
    start.elapsed() / frames
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    for len in [64, 1024, 16 << 10] {
        println!("secure: seal + open of a {len}-byte frame: {:.2} us", frame_cost(len, 20_000).as_secs_f64() * 1e6);
    }
    let (rounds, total, pings) = if quick { (1, 5_000, 200) } else { (5, 30_000, 1_000) };
    let window = 2_000;
    let (p, s, ratios) = compare(Backing::Memory, rounds, total, window, pings);
    report("in-memory stores", p, s, &ratios);
    let (p, s, ratios) = compare(Backing::Group, rounds, total, window, pings);
    report("group commit    ", p, s, &ratios);
}
