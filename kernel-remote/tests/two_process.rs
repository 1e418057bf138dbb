//! Two real processes (`ken-node`) on fjall, talking TCP over loopback, each SIGKILLed at
//! random moments and restarted; in the end both apps counted exactly `count` messages from the
//! other, in order, and exactly `count` answers — read back from the stores after the last kill.

use kernel_core::Kernel;
use kernel_store::{FjallStore, StoreOptions};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

const EXE: &str = env!("CARGO_BIN_EXE_ken-node");

struct Side {
    id: &'static str,
    peer: &'static str,
    dir: PathBuf,
    mode: &'static str,
    listen: SocketAddr,
    dial: Option<SocketAddr>,
    child: Option<(Child, Receiver<String>)>,
    last: String,
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

impl Side {
    fn args(&self, command: &str) -> Vec<String> {
        let mut a: Vec<String> = vec![command.into(), "--id".into(), self.id.into(), "--peer".into(), self.peer.into()];
        a.extend(["--dir".into(), self.dir.display().to_string(), "--mode".into(), self.mode.into()]);
        a
    }

    fn init(&self, count: u64, burst: u64) {
        let mut args = self.args("init");
        args.extend(["--count".into(), count.to_string(), "--burst".into(), burst.to_string()]);
        let status = Command::new(EXE).args(&args).status().expect("run init");
        assert!(status.success(), "init of {} failed", self.id);
    }

    fn start(&mut self) {
        let mut args = self.args("run");
        args.extend(["--listen".into(), self.listen.to_string()]);
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
    fn kill(&mut self) {
        if let Some((mut child, _)) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn poll(&mut self) -> &str {
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
fn final_counters(dir: &Path, peer: &str) -> (u64, u64, u64) {
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

#[test]
fn two_processes_killed_at_random_end_with_exact_counters() {
    let count: u64 = std::env::var("KEN_TWO_PROCESS_COUNT").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
    let kills: u64 = std::env::var("KEN_TWO_PROCESS_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (la, lb) = (free_port(), free_port());
    let mut a =
        Side { id: "a", peer: "b", dir: tmp.path().join("a"), mode: "group", listen: la, dial: Some(lb), child: None, last: String::new() };
    let mut b =
        Side { id: "b", peer: "a", dir: tmp.path().join("b"), mode: "sync", listen: lb, dial: None, child: None, last: String::new() };
    a.init(count, 10);
    b.init(count, 10);
    a.start();
    b.start();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(100 + next() % 400));
        let side = if next() % 2 == 0 { &mut a } else { &mut b };
        side.poll();
        eprintln!("kill {k}: {} (last said {:?})", side.id, side.last);
        side.kill();
        if next() % 3 == 0 {
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
    assert_eq!(final_counters(&a.dir, "b"), (count, count, 0), "a's app");
    assert_eq!(final_counters(&b.dir, "a"), (count, count, 0), "b's app");
}
