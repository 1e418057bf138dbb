//! `ken-node`: one kernel on fjall running the simulation's workload app against one peer over
//! TCP on loopback — the process the two-process kill test SIGKILLs and restarts.
//!
//! - `ken-node init --id A --peer B --dir DIR --mode MODE --count N --burst K`: create the
//!   store, the app vat and the link, queue the app's `start`, sync, exit.
//! - `ken-node run --id A --peer B --dir DIR --mode MODE --listen ADDR [--dial ADDR]
//!   [--peer-key KEY]`: reopen and serve until killed, printing `status in=I got=G backlog=L
//!   bad=X` whenever it changes (I: messages from the peer applied by the app, G: answers
//!   received). With `--peer-key`, the link is secure: Noise with this kernel's identity (kept in
//!   DIR) and the peer allowed only with KEY.
//! - `ken-node id --dir DIR`: print this kernel's public key (its identity), creating the key
//!   pair in the store directory on first use (what `kernel id STORE` does).
//!
//! MODE is the store's durability, `sync` or `group`, optionally in turns (`sync-turns`,
//! `group-turns`: `RemoteConfig::turns` with its default limits).

use kernel_core::{CapData, KRef, Kernel};
use kernel_remote::sim::{App, APP_NAME};
use kernel_remote::tcp::{serve_once, TcpConfig, TcpTransport};
use kernel_remote::{AllowList, Identity, IdentityError, KernelId, Node, NoiseSecurity, PublicKey, RemoteConfig, RemoteError, TurnLimits};
use kernel_store::{Durability, FjallStore, StoreOptions};
use kernel_syscall::{HelperVat, VatEndpoint};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    command: String,
    flags: HashMap<String, String>,
}

impl Args {
    fn parse() -> Result<Args, String> {
        let mut it = std::env::args().skip(1);
        let command = it.next().ok_or("missing command (init | run | id)")?;
        let mut flags = HashMap::new();
        while let Some(flag) = it.next() {
            let name = flag.strip_prefix("--").ok_or_else(|| format!("unexpected argument {flag:?}"))?;
            let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
            flags.insert(name.to_owned(), value);
        }
        Ok(Args { command, flags })
    }

    fn get(&self, name: &str) -> Result<&str, String> {
        self.flags.get(name).map(String::as_str).ok_or_else(|| format!("missing --{name}"))
    }

    fn parsed<T: std::str::FromStr>(&self, name: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        self.get(name)?.parse().map_err(|e| format!("--{name}: {e}"))
    }
}

fn open(args: &Args) -> Result<Node<FjallStore>, String> {
    let mode = args.get("mode")?;
    let (durability, turns) = match mode.strip_suffix("-turns") {
        Some(base) => (base, Some(TurnLimits::default())),
        None => (mode, None),
    };
    let durability = match durability {
        "sync" => Durability::Sync,
        "group" => Durability::GROUP,
        _ => return Err(format!("unknown mode {mode:?} (sync, group, sync-turns, group-turns)")),
    };
    let dir: PathBuf = args.get("dir")?.into();
    let store = FjallStore::open(&dir, StoreOptions::new(durability)).map_err(|e| e.to_string())?;
    let observer = store.crank_observer();
    let mut kernel = Kernel::open(store).map_err(|e| e.to_string())?;
    kernel.add_commit_observer(observer);
    let me: KernelId = args.parsed("id")?;
    let mut node = Node::new(kernel, me, RemoteConfig { turns, ..RemoteConfig::default() });
    let app = node.kernel_mut().add_endpoint(APP_NAME, VatEndpoint::boxed(HelperVat::new(App))).map_err(|e| e.to_string())?;
    let root = node.kernel().root(app).map_err(|e| e.to_string())?;
    node.set_bootstrap(root);
    node.add_peer(args.parsed("peer")?).map_err(|e| e.to_string())?;
    Ok(node)
}

fn init(args: &Args) -> Result<(), String> {
    let mut node = open(args)?;
    let peer: KernelId = args.parsed("peer")?;
    let count: u64 = args.parsed("count")?;
    let burst: u64 = args.parsed("burst")?;
    let app = node.kernel().endpoint_id(APP_NAME).map_err(|e| e.to_string())?.ok_or("no app")?;
    let root = node.kernel().root(app).map_err(|e| e.to_string())?;
    let target = node.peer_root(&peer).map_err(|e| e.to_string())?;
    let body = format!("{}|{count}|{burst}|{peer}", node.id());
    node.kernel_mut()
        .queue_message(root.into(), "start", CapData { body: body.into_bytes(), slots: vec![KRef::Object(target)] })
        .map_err(|e| e.to_string())?;
    node.end_turn().map_err(|e| e.to_string())?;
    node.kernel().store().sync().map_err(|e| e.to_string())?;
    Ok(())
}

/// The app's counters: (applied from the peer, answers received, violations seen).
fn counters(node: &Node<FjallStore>, peer: &KernelId) -> Result<(u64, u64, u64), RemoteError> {
    let kernel = node.kernel();
    let Some(app) = kernel.endpoint_id(APP_NAME)? else { return Ok((0, 0, 0)) };
    let entries = kernel.vatstore(app)?;
    let num = |key: String| {
        entries
            .iter()
            .find(|(k, _)| k.as_slice() == key.as_bytes())
            .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(0u64)
    };
    Ok((num(format!("in/{peer}")), num(format!("got/{peer}")), num("bad".into())))
}

/// The identity kept in the store directory `dir`, created there on first use (the store too).
fn identity(dir: &std::path::Path) -> Result<Identity, String> {
    match Identity::load_or_create(dir) {
        Err(IdentityError::NotAStore { .. }) => {
            drop(FjallStore::open(dir, StoreOptions::default()).map_err(|e| e.to_string())?);
            Identity::load_or_create(dir).map_err(|e| e.to_string())
        }
        other => other.map_err(|e| e.to_string()),
    }
}

fn id(args: &Args) -> Result<(), String> {
    let dir: PathBuf = args.get("dir")?.into();
    println!("{}", identity(&dir)?.public_text());
    Ok(())
}

/// Plain TCP, or with `--peer-key` a secure link allowing only the peer's key.
fn tcp_config(args: &Args, peer: &KernelId) -> Result<TcpConfig, String> {
    let Some(key) = args.flags.get("peer-key") else { return Ok(TcpConfig::default()) };
    let key: PublicKey = key.parse().map_err(|e| format!("--peer-key: {e}"))?;
    let me = identity(std::path::Path::new(args.get("dir")?))?;
    let allow = AllowList::from_pairs([(peer.clone(), key)]).map_err(|e| e.to_string())?;
    Ok(TcpConfig { security: Arc::new(NoiseSecurity::new(&me, allow)), ..TcpConfig::default() })
}

fn run(args: &Args) -> Result<(), String> {
    let mut node = open(args)?;
    let peer: KernelId = args.parsed("peer")?;
    let listen: SocketAddr = args.parsed("listen")?;
    if !listen.ip().is_loopback() {
        return Err(format!("{listen} is not a loopback address"));
    }
    let config = tcp_config(args, &peer)?;
    // The port may still be held by our killed predecessor for a moment.
    let started = Instant::now();
    let mut net = loop {
        match TcpTransport::start(node.id().clone(), listen, config.clone()) {
            Ok(t) => break t,
            Err(e) if started.elapsed() < Duration::from_secs(20) => {
                log::debug!("{e}; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    if let Some(dial) = args.flags.get("dial") {
        let addr: SocketAddr = dial.parse().map_err(|e| format!("--dial: {e}"))?;
        if !addr.ip().is_loopback() {
            return Err(format!("{addr} is not a loopback address"));
        }
        net.dial(peer.clone(), addr);
    }
    let clock = Instant::now();
    let mut last = String::new();
    loop {
        serve_once(&mut node, &mut net, || clock.elapsed(), 64, Duration::from_millis(1)).map_err(|e| e.to_string())?;
        let (applied, got, bad) = counters(&node, &peer).map_err(|e| e.to_string())?;
        let line = format!("status in={applied} got={got} backlog={} bad={bad}", node.backlog());
        if line != last {
            println!("{line}");
            last = line;
        }
    }
}

fn main() -> ExitCode {
    let result = Args::parse().and_then(|args| match args.command.as_str() {
        "init" => init(&args),
        "run" => run(&args),
        "id" => id(&args),
        other => Err(format!("unknown command {other:?}")),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ken-node: {e}");
            ExitCode::FAILURE
        }
    }
}
