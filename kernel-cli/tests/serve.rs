//! `kernel serve`: two kernels on secure links over loopback. A message from a vat of one
//! reaches the other's bootstrap vat and the answer comes back; a kernel whose key is not in
//! the allow-list is refused and nothing it sends is applied.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn kernel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kernel")).args(args).env_remove("RUST_LOG").output().expect("the kernel binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Two ports nobody else is likely to use, different for each test process.
fn ports(offset: u16) -> (u16, u16) {
    let base = 20_000 + (std::process::id() % 20_000) as u16 + offset;
    (base, base + 1)
}

const ASKER: &str = r#"
// Asks the peer's bootstrap vat hello(who) at bootstrap and keeps its answer.
fn bootstrap(vats, peers) {
    let answer = send(peers.b, "hello", [params().who]);
    watch(answer, "on_answer");
    "asked b"
}

fn on_answer(outcome) {
    if !outcome.ok {
        throw `hello rejected: ${outcome.reason}`;
    }
    store_set("answer", outcome.value);
    log(`b answered: ${outcome.value}`);
}
"#;

const GREETER: &str = r#"
// Answers hello(who) and remembers who asked.
fn bootstrap(vats, peers) {
    "ready"
}

fn hello(who) {
    store_set("greeted", who);
    `hello ${who}, this is b`
}
"#;

/// Write cluster `stem` (its kernel named `kernel`) in `dir` with one vat running `script`,
/// listening on `port`, and `peers` as (name, key, dial port).
fn cluster(dir: &Path, stem: &str, kernel: &str, script: &str, who: &str, port: u16, peers: &[(&str, &str, Option<u16>)]) -> PathBuf {
    std::fs::write(dir.join(format!("{stem}.rhai")), script).expect("script");
    let mut toml = format!(
        "bootstrap = \"main\"\n\n[[vat]]\nname = \"main\"\nscript = \"{stem}.rhai\"\nparams = {{ who = \"{who}\" }}\n\n\
         [network]\nkernel = \"{kernel}\"\nlisten = \"127.0.0.1:{port}\"\n"
    );
    for (name, key, dial) in peers {
        toml.push_str(&format!("\n[[peer]]\nname = \"{name}\"\nkey = \"{key}\"\n"));
        if let Some(p) = dial {
            toml.push_str(&format!("address = \"127.0.0.1:{p}\"\n"));
        }
    }
    let file = dir.join(format!("{stem}.toml"));
    std::fs::write(&file, toml).expect("cluster file");
    file
}

/// Create the store (the bootstrap waits for the first serve) and return the kernel's key.
fn create_and_id(file: &Path) -> String {
    let out = kernel(&["run", "--quiet", arg(file)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("waits for the first `kernel serve`"), "{}", text(&out.stdout));
    let store = file.with_extension("store");
    let id = kernel(&["id", arg(&store)]);
    assert!(id.status.success(), "{}", text(&id.stderr));
    text(&id.stdout).trim().to_owned()
}

/// A running `kernel serve`, its stdout lines arriving on a channel.
struct Serving {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

fn serve(file: &Path, secs: u32) -> Serving {
    serve_with(file, secs, &[])
}

fn serve_with(file: &Path, secs: u32, extra: &[&str]) -> Serving {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kernel"))
        .args(["serve", arg(file), "--for", &secs.to_string()])
        .args(extra)
        .env("RUST_LOG", "kernel_remote=warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kernel serve starts");
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err = child.stderr.take().expect("stderr");
    let stderr = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    Serving { child, lines, seen: Vec::new(), stderr }
}

impl Serving {
    /// Wait (up to `within`) for a stdout line containing `needle`.
    fn wait_for(&mut self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        if self.seen.iter().any(|l| l.contains(needle)) {
            return true;
        }
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.seen.push(line);
                    if hit {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
        false
    }

    /// Stop it with SIGINT (as Ctrl-C) and wait: (exit code, stdout, stderr).
    fn stop(mut self) -> (Option<i32>, String, String) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let status = self.child.wait().expect("wait");
        self.seen.extend(self.lines.try_iter());
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        let err = self.stderr.join().unwrap_or_default();
        (status.code(), self.seen.join("\n"), err)
    }
}

fn vatstore(store: &Path) -> String {
    let out = kernel(&["inspect", arg(store), "vat", "main", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Kernel a (the asker, dialing) and kernel b (the greeter) on ports `pa` and `pb`, each with
/// the other as its peer: first the stores (and so the key pairs), from cluster files without
/// peers yet, then the cluster files naming each other's key. Returns (a, b, a's key, b's key).
fn peered_pair(dir: &Path, pa: u16, pb: u16) -> (PathBuf, PathBuf, String, String) {
    let a = cluster(dir, "a", "a", ASKER, "a", pa, &[]);
    let b = cluster(dir, "b", "b", GREETER, "b", pb, &[]);
    let (ka, kb) = (create_and_id(&a), create_and_id(&b));
    let a = cluster(dir, "a", "a", ASKER, "a", pa, &[("b", &kb, Some(pb))]);
    let b = cluster(dir, "b", "b", GREETER, "b", pb, &[("a", &ka, None)]);
    (a, b, ka, kb)
}

#[test]
fn in_turns_a_message_crosses_and_its_answer_is_in_the_store_after_a_clean_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, pb) = ports(4);
    let (a, b, _, _) = peered_pair(dir.path(), pa, pb);
    let mut sb = serve_with(&b, 60, &["--turns"]);
    assert!(sb.wait_for("serving main as b", Duration::from_secs(20)), "b did not start: {:?}", sb.seen);
    let mut sa = serve_with(&a, 60, &["--turns"]);
    let answered = sa.wait_for("b answered: hello a, this is b", Duration::from_secs(20));
    let (code_a, out_a, err_a) = sa.stop();
    let (code_b, out_b, err_b) = sb.stop();
    assert!(answered, "no answer from b\n--- a\n{out_a}\n{err_a}\n--- b\n{out_b}\n{err_b}");
    assert_eq!((code_a, code_b), (Some(130), Some(130)), "{err_a}\n{err_b}");
    let va = vatstore(&a.with_extension("store"));
    assert!(va.contains("hello a, this is b"), "the answer's turn was written: {va}");
    let vb = vatstore(&b.with_extension("store"));
    assert!(vb.contains(r#""greeted": "\"a\"""#), "{vb}");
}

#[test]
fn a_message_crosses_a_secure_link_and_an_unknown_key_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pa, pb) = ports(0);
    let (a, b, ka, kb) = peered_pair(dir.path(), pa, pb);
    assert_ne!(ka, kb);

    let mut sb = serve(&b, 60);
    assert!(sb.wait_for("serving main as b", Duration::from_secs(20)), "b did not start: {:?}", sb.seen);
    let mut sa = serve(&a, 60);
    let answered = sa.wait_for("b answered: hello a, this is b", Duration::from_secs(20));
    let (code_a, out_a, err_a) = sa.stop();
    let (code_b, out_b, err_b) = sb.stop();
    assert!(answered, "no answer from b\n--- a\n{out_a}\n{err_a}\n--- b\n{out_b}\n{err_b}");
    assert_eq!(code_a, Some(130), "{err_a}");
    assert_eq!(code_b, Some(130), "{err_b}");
    assert!(out_a.contains("link b: connected"), "{out_a}");
    assert!(out_b.contains("link a: connected"), "{out_b}");
    assert!(out_b.contains("main <- "), "b delivered hello to its vat: {out_b}");
    let va = vatstore(&a.with_extension("store"));
    assert!(va.contains("hello a, this is b"), "{va}");
    let vb = vatstore(&b.with_extension("store"));
    assert!(vb.contains(r#""greeted": "\"a\"""#), "b's vat recorded who asked: {vb}");

    // An impostor: it calls itself "a" and knows b's key, but its own key is not a's.
    let c = cluster(dir.path(), "c", "a", ASKER, "impostor", pa + 2, &[]);
    let kc = create_and_id(&c);
    assert_ne!(kc, ka);
    let c = cluster(dir.path(), "c", "a", ASKER, "impostor", pa + 2, &[("b", &kb, Some(pb))]);
    let mut sb = serve(&b, 60);
    assert!(sb.wait_for("serving main as b", Duration::from_secs(20)), "b did not restart: {:?}", sb.seen);
    let mut sc = serve(&c, 60);
    assert!(sc.wait_for("serving main as a", Duration::from_secs(20)), "c did not start: {:?}", sc.seen);
    // Give it time to dial (and be refused) a few times.
    let through = sc.wait_for("b answered", Duration::from_secs(3));
    let (_, out_c, err_c) = sc.stop();
    let (_, out_b, err_b) = sb.stop();
    assert!(!through, "the impostor got an answer\n--- c\n{out_c}\n{err_c}\n--- b\n{out_b}\n{err_b}");
    assert!(!out_c.contains("link b: connected"), "{out_c}");
    assert!(!out_b.contains("link a: connected"), "{out_b}");
    assert!(err_b.contains("refus") || err_b.contains("closing a connection"), "b logs the refusal: {err_b}");
    let vb = vatstore(&b.with_extension("store"));
    assert!(!vb.contains("impostor"), "nothing from the impostor was applied: {vb}");
    assert!(!vatstore(&c.with_extension("store")).contains("this is b"));
}

#[test]
fn serve_needs_a_network_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("plain.toml");
    std::fs::write(dir.path().join("x.rhai"), "fn bootstrap(vats) { 1 }\n").expect("script");
    std::fs::write(&file, "bootstrap = \"x\"\n[[vat]]\nname = \"x\"\nscript = \"x.rhai\"\n").expect("cluster");
    let out = kernel(&["serve", arg(&file), "--for", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("no [network] table"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!dir.path().join("plain.store").exists(), "nothing written");
}
