//! Two real processes (`ken-node`) on fjall over secure links: each kernel's identity is created
//! in its store directory on first use (`ken-node id`, what `kernel id STORE` does), each allows
//! only the other's key, and both are SIGKILLed at random moments and restarted — every restart
//! reloads the same key and handshakes again. In the end both apps counted exactly `count`
//! messages and answers, read back from the stores; the keys never changed.

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
    peer_key: String,
    child: Option<(Child, Receiver<String>)>,
    last: String,
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// `ken-node id --dir DIR`: the kernel's public key.
fn identity(dir: &Path) -> String {
    let out = Command::new(EXE).args(["id", "--dir", &dir.display().to_string()]).output().expect("run id");
    assert!(out.status.success(), "id failed: {}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert_eq!(key.len(), 64, "{key:?}");
    key
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
        args.extend(["--listen".into(), self.listen.to_string(), "--peer-key".into(), self.peer_key.clone()]);
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
fn two_secure_processes_killed_at_random_end_with_exact_counters_and_the_same_keys() {
    let count = 100u64;
    let kills = 4u64;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (la, lb) = (free_port(), free_port());
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let (ka, kb) = (identity(&da), identity(&db));
    assert_ne!(ka, kb);
    assert_eq!(identity(&da), ka, "the key is kept, not made again");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(da.join(kernel_remote::IDENTITY_FILE)).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let side = |id, peer, dir: &Path, mode, listen, dial, peer_key: &str| Side {
        id,
        peer,
        dir: dir.to_path_buf(),
        mode,
        listen,
        dial,
        peer_key: peer_key.to_owned(),
        child: None,
        last: String::new(),
    };
    let mut a = side("a", "b", &da, "group", la, Some(lb), &kb);
    let mut b = side("b", "a", &db, "sync", lb, None, &ka);
    a.init(count, 10);
    b.init(count, 10);
    a.start();
    b.start();
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
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
    assert_eq!(final_counters(&da, "b"), (count, count, 0), "a's app");
    assert_eq!(final_counters(&db, "a"), (count, count, 0), "b's app");
    assert_eq!((identity(&da), identity(&db)), (ka, kb), "the identities survived every kill");
}
