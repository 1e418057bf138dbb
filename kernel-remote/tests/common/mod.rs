//! The two-process harness shared by `two_process.rs` (plain TCP) and `two_process_secure.rs`
//! (Noise links): two `ken-node` processes on fjall over loopback, SIGKILLed at random moments and
//! restarted, then read back from their stores.
#![allow(dead_code)] // each test binary uses its part

use kernel_core::Kernel;
use kernel_store::{FjallStore, StoreOptions};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

pub const EXE: &str = env!("CARGO_BIN_EXE_ken-node");

/// One `ken-node` process and its store.
pub struct Side {
    pub id: &'static str,
    pub peer: &'static str,
    pub dir: PathBuf,
    pub mode: &'static str,
    pub listen: SocketAddr,
    pub dial: Option<SocketAddr>,
    /// The only key the node allows (`--peer-key`): a secure link; `None`: plain TCP.
    pub peer_key: Option<String>,
    pub child: Option<(Child, Receiver<String>)>,
    pub last: String,
}

/// Two different loopback addresses with ports free right now (both listeners are held until
/// both ports are known: one released before the next bind can be handed out again, and two
/// nodes on one port make one of them exit).
pub fn free_ports() -> (SocketAddr, SocketAddr) {
    let a = TcpListener::bind("127.0.0.1:0").expect("bind");
    let b = TcpListener::bind("127.0.0.1:0").expect("bind");
    (a.local_addr().expect("addr"), b.local_addr().expect("addr"))
}

/// `ken-node id --dir DIR`: the kernel's public key.
pub fn identity(dir: &Path) -> String {
    let out = Command::new(EXE).args(["id", "--dir", &dir.display().to_string()]).output().expect("run id");
    assert!(out.status.success(), "id failed: {}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert_eq!(key.len(), 64, "{key:?}");
    key
}

impl Side {
    /// A side that has not started.
    pub fn new(
        id: &'static str,
        peer: &'static str,
        dir: &Path,
        mode: &'static str,
        listen: SocketAddr,
        dial: Option<SocketAddr>,
        peer_key: Option<String>,
    ) -> Self {
        Side { id, peer, dir: dir.to_path_buf(), mode, listen, dial, peer_key, child: None, last: String::new() }
    }

    pub fn args(&self, command: &str) -> Vec<String> {
        let mut a: Vec<String> = vec![command.into(), "--id".into(), self.id.into(), "--peer".into(), self.peer.into()];
        a.extend(["--dir".into(), self.dir.display().to_string(), "--mode".into(), self.mode.into()]);
        a
    }

    pub fn init(&self, count: u64, burst: u64) {
        let mut args = self.args("init");
        args.extend(["--count".into(), count.to_string(), "--burst".into(), burst.to_string()]);
        let status = Command::new(EXE).args(&args).status().expect("run init");
        assert!(status.success(), "init of {} failed", self.id);
    }

    pub fn start(&mut self) {
        let mut args = self.args("run");
        args.extend(["--listen".into(), self.listen.to_string()]);
        if let Some(key) = &self.peer_key {
            args.extend(["--peer-key".into(), key.clone()]);
        }
        if let Some(d) = self.dial {
            args.extend(["--dial".into(), d.to_string()]);
        }
        let mut child = Command::new(EXE).args(&args).stdout(Stdio::piped()).stdin(Stdio::null()).spawn().expect("spawn ken-node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.child = Some((child, rx));
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some((mut child, _)) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn poll(&mut self) -> &str {
        if let Some((child, rx)) = &mut self.child {
            while let Ok(l) = rx.try_recv() {
                self.last = l;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{} exited by itself: {status}", self.id);
            }
        }
        &self.last
    }
}

/// The app's final counters, read from the store: (in, got, bad).
pub fn final_counters(dir: &Path, peer: &str) -> (u64, u64, u64) {
    let kernel = Kernel::open(FjallStore::open(dir, StoreOptions::default()).expect("reopen")).expect("kernel");
    let app = kernel.endpoint_id("app").expect("read").expect("app");
    let entries = kernel.vatstore(app).expect("vatstore");
    let num = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k.as_slice() == key.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0)
    };
    (num(&format!("in/{peer}")), num(&format!("got/{peer}")), num("bad"))
}

/// Initialise and start both sides, SIGKILL a random one `kills` times (after a random pause,
/// optionally pausing again before the restart), wait until both report `count` messages and
/// answers with an empty backlog, and kill both.
pub fn kill_at_random_until_done(a: &mut Side, b: &mut Side, count: u64, kills: u64, mut seed: u64, pause_before_restart: bool) {
    a.init(count, 10);
    b.init(count, 10);
    a.start();
    b.start();
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(100 + next() % 400));
        let side = if next() % 2 == 0 { &mut *a } else { &mut *b };
        side.poll();
        eprintln!("kill {k}: {} (last said {:?})", side.id, side.last);
        side.kill();
        if pause_before_restart && next() % 3 == 0 {
            std::thread::sleep(Duration::from_millis(next() % 300));
        }
        side.start();
    }
    let done = format!("status in={count} got={count} backlog=0 bad=0");
    let start = Instant::now();
    loop {
        let (sa, sb) = (a.poll().to_owned(), b.poll().to_owned());
        if sa == done && sb == done {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no completion: a says {sa:?}, b says {sb:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.kill();
    b.kill();
}
