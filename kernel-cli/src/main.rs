//! `kernel`: run a cluster of vats on a durable kernel, send it messages, inspect its tables.
//!
//! Exit codes: 0 success; 1 a runtime failure (store, kernel), or `send` whose result was
//! rejected or never settled; 2 bad input (cluster file, arguments, not a store); 130
//! interrupted by Ctrl-C (after the current crank committed).

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kernel_cli::cluster::Cluster;
use kernel_cli::codec;
use kernel_cli::host::{self, Host, HostError, Start};
use kernel_cli::inspect::{self, View};
use kernel_core::{CapData, CrankOutcome, EndpointStatus, KRef, Kernel, KernelError, MemStore, Store};
use kernel_store::{FjallStore, OpenError, StoreOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The allocator (see the workspace's note on mimalloc: the kernel churns small allocations).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod serve;

#[derive(Parser)]
#[command(name = "kernel", version, about = "Run a cluster of vats on an object-capability kernel with transactional cranks.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a cluster until its run queue is empty. The first run creates the store and
    /// bootstraps; later runs on the same store resume where it stopped.
    Run(RunArgs),
    /// Serve a cluster with a [network] table to its peers over secure links until Ctrl-C or
    /// --for elapses: like `run`, but the kernel keeps running, applying what peers send and
    /// sending what its vats send to peers.
    Serve(ServeArgs),
    /// Send VAT.METHOD(ARGS) from the host, run until its result settles, and print the settlement.
    Send(SendArgs),
    /// Show the kernel's tables (read-only).
    Inspect(InspectArgs),
    /// Print the kernel's identity for secure peer links: the public half of its static key
    /// pair, created (owner-only permissions) in the store directory on first use.
    Id(IdArgs),
}

#[derive(Args)]
struct IdArgs {
    /// The store directory of a cluster that has run.
    store: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    /// The cluster file (TOML).
    cluster: PathBuf,
    /// The store directory (default: the cluster file's `store`, else `<stem>.store` beside it).
    #[arg(long, conflicts_with = "memory")]
    store: Option<PathBuf>,
    /// Keep everything in memory: nothing is written, every run starts afresh.
    #[arg(long)]
    memory: bool,
    /// Stop after this many cranks (a later run resumes).
    #[arg(long)]
    max_cranks: Option<u64>,
    /// Print no line per crank (and no vat logs), only the start and the summary.
    #[arg(long, short)]
    quiet: bool,
    /// When the run queue empties, ask every live vat once to drop the references it no longer
    /// holds (bringOutYourDead), and run the garbage collection that follows.
    #[arg(long)]
    reap: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// The cluster file (TOML), with a [network] table and its [[peer]] entries.
    cluster: PathBuf,
    /// The store directory (default: the cluster file's `store`, else `<stem>.store` beside it).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Stop after this many cranks (a later run resumes).
    #[arg(long)]
    max_cranks: Option<u64>,
    /// Print no line per crank (and no vat logs), only the start and the summary.
    #[arg(long, short)]
    quiet: bool,
    /// Stop after this many seconds (default: serve until Ctrl-C).
    #[arg(long = "for", value_name = "SECONDS")]
    for_secs: Option<f64>,
    /// Run in turns: what arrives from peers, the cranks that follow and their output share
    /// one store write per round (under `durability = "sync"`, one fdatasync), and nothing of
    /// a round is reported or sent before that write.
    #[arg(long)]
    turns: bool,
}

#[derive(Args)]
struct SendArgs {
    /// The store directory of a cluster that has run.
    store: PathBuf,
    /// The vat and the method of its root object: `bob.ping`.
    target: String,
    /// The arguments, as JSON: an array is the argument list, anything else is one argument.
    /// References are `{"$slot":N}`, naming the N-th --slot.
    #[arg(default_value = "[]")]
    args: String,
    /// A reference to pass as the next slot: a kref (`ko3`, `kp7`) or a vat name (its root).
    #[arg(long = "slot", value_name = "REF")]
    slots: Vec<String>,
    /// Stop after this many cranks even if the result has not settled.
    #[arg(long)]
    max_cranks: Option<u64>,
    /// Print no line per crank.
    #[arg(long, short)]
    quiet: bool,
    /// Print only the settlement, as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct InspectArgs {
    /// The store directory.
    store: PathBuf,
    /// What to show (default: summary).
    #[command(subcommand)]
    view: Option<ViewArg>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Clone)]
enum ViewArg {
    /// Counts, and one line per vat.
    Summary,
    /// The run queue, in order.
    Queue,
    /// Every promise: state, decider, subscribers, settlement.
    Promises,
    /// Every object: owner, reference counts.
    Objects,
    /// One vat: status, vatstore, c-list.
    Vat {
        /// The vat's name.
        name: String,
    },
    /// One vat's c-list.
    Clist {
        /// The vat's name.
        name: String,
    },
}

/// A failure to report: one line, and an exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn input(message: impl std::fmt::Display) -> Self {
        Failure { code: 2, message: message.to_string() }
    }
    fn runtime(message: impl std::fmt::Display) -> Self {
        Failure { code: 1, message: message.to_string() }
    }
}

impl From<KernelError> for Failure {
    fn from(e: KernelError) -> Self {
        Failure::runtime(e)
    }
}

impl From<HostError> for Failure {
    fn from(e: HostError) -> Self {
        match e {
            HostError::Kernel(e) => Failure::runtime(e),
            HostError::Mismatch(m) => Failure::input(m),
        }
    }
}

impl From<OpenError> for Failure {
    fn from(e: OpenError) -> Self {
        Failure::runtime(e)
    }
}

fn io_failure(what: &Path) -> impl FnOnce(std::io::Error) -> Failure + '_ {
    move |e| Failure::runtime(format!("{}: {e}", what.display()))
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
        tracing::warn!("cannot catch Ctrl-C: {e}");
    }
    // Scripts recurse natively (up to their call-depth limit): give the kernel a deep stack.
    let worker = std::thread::Builder::new().name("kernel".into()).stack_size(256 << 20).spawn(move || dispatch(cli, &stop));
    let result = match worker {
        Ok(handle) => handle.join().unwrap_or_else(|_| Err(Failure::runtime("the kernel thread panicked"))),
        Err(e) => Err(Failure::runtime(format!("cannot start the kernel thread: {e}"))),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("kernel: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn dispatch(cli: Cli, stop: &AtomicBool) -> Result<ExitCode, Failure> {
    match cli.command {
        Command::Run(a) => run(a, stop),
        Command::Serve(a) => serve::serve(a, stop),
        Command::Send(a) => send(a, stop),
        Command::Inspect(a) => inspect_cmd(a),
        Command::Id(a) => id_cmd(a),
    }
}

fn id_cmd(a: IdArgs) -> Result<ExitCode, Failure> {
    // The key pair lives beside the kernel's fjall store, which must exist (`kernel run` makes it).
    let dir = a.store.join(host::KERNEL_DIR);
    let identity = kernel_remote::Identity::load_or_create(&dir).map_err(Failure::input)?;
    println!("{}", identity.public_text());
    Ok(ExitCode::SUCCESS)
}

/// Refuse a directory holding anything but what a store directory holds (`run` would write
/// into it). A store directory cut short by a crash while it was being made is accepted.
fn check_store_dir(store: &Path) -> Result<(), Failure> {
    let Ok(entries) = std::fs::read_dir(store) else { return Ok(()) };
    for entry in entries {
        let name = entry.map_err(io_failure(store))?.file_name();
        if !host::STORE_DIR_ENTRIES.iter().any(|ok| name == *ok) {
            return Err(Failure::input(format!(
                "{}: not a kernel store directory (it holds {:?}); refusing to write into it",
                store.display(),
                name.to_string_lossy()
            )));
        }
    }
    Ok(())
}

fn open_fjall(store: &Path, cluster: &Cluster) -> Result<Kernel<FjallStore>, Failure> {
    let fjall = FjallStore::open(host::kernel_dir(store), StoreOptions::new(cluster.durability.durability()))?;
    let observer = fjall.crank_observer();
    let mut kernel = Kernel::open(fjall)?;
    kernel.add_commit_observer(observer);
    Ok(kernel)
}

fn run(a: RunArgs, stop: &AtomicBool) -> Result<ExitCode, Failure> {
    let cluster = Cluster::load(&a.cluster).map_err(Failure::input)?;
    if a.memory {
        let kernel = Kernel::open(MemStore::new())?;
        return drive(kernel, &cluster, &a, None, stop);
    }
    let store = a.store.clone().unwrap_or_else(|| cluster.store.clone());
    check_store_dir(&store)?;
    std::fs::create_dir_all(&store).map_err(io_failure(&store))?;
    let kernel = open_fjall(&store, &cluster)?;
    drive(kernel, &cluster, &a, Some(&store), stop)
}

/// Attach, bootstrap or resume, and run cranks, printing the transcript.
fn drive<S: Store>(
    kernel: Kernel<S>,
    cluster: &Cluster,
    a: &RunArgs,
    store: Option<&Path>,
    stop: &AtomicBool,
) -> Result<ExitCode, Failure> {
    let (mut host, start) = Host::attach(kernel, cluster)?;
    if let Some(dir) = store {
        cluster.write_snapshot(dir).map_err(io_failure(dir))?;
    }
    let names: Vec<&str> = cluster.vats.iter().map(|v| v.name.as_str()).collect();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let w = |e: std::io::Error| Failure::runtime(format!("writing the transcript: {e}"));
    match start {
        Start::Bootstrapped(Some(kp)) => writeln!(
            out,
            "new store: {} vats ({}); bootstrap {}.bootstrap queued, result {kp}",
            names.len(),
            names.join(", "),
            cluster.bootstrap.as_deref().unwrap_or_default()
        ),
        Start::Bootstrapped(None) => writeln!(out, "new store: {} vats ({}); no bootstrap vat", names.len(), names.join(", ")),
        Start::Deferred => writeln!(
            out,
            "new store: {} vats ({}); bootstrap {}.bootstrap waits for the first `kernel serve` (it gets the peers)",
            names.len(),
            names.join(", "),
            cluster.bootstrap.as_deref().unwrap_or_default()
        ),
        Start::Resumed { cranks, queued } => writeln!(out, "resuming after crank {cranks}: {queued} queued"),
    }
    .map_err(w)?;
    let started = Instant::now();
    let bar = progress_bar(a.quiet);
    let (mut cranks, mut aborted) = (0u64, 0u64);
    let mut stopped = None;
    let mut reaped = false;
    loop {
        if stop.load(Ordering::SeqCst) {
            stopped = Some("interrupted");
            break;
        }
        if a.max_cranks.is_some_and(|m| cranks >= m) {
            stopped = Some("stopped at --max-cranks");
            break;
        }
        let Some((report, logs)) = host.step()? else {
            if a.reap && !reaped {
                reaped = true;
                host.reap_all()?;
                continue;
            }
            break;
        };
        cranks += 1;
        if matches!(report.outcome, CrankOutcome::Aborted { .. }) {
            aborted += 1;
        }
        tracing::debug!(crank = report.crank.0, input = %report.input, outcome = ?report.outcome, "crank");
        if !a.quiet {
            writeln!(out, "{}", host.crank_line(&report)).map_err(w)?;
            for l in logs {
                writeln!(out, "         {}: {}", l.vat, l.text).map_err(w)?;
            }
        }
        if let Some(bar) = &bar {
            if cranks % 256 == 0 {
                update_bar(bar, cranks, started);
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let elapsed = started.elapsed();
    let terminated = host.terminated()?;
    let queued = host.kernel().queue_len();
    let queue = match (queued, stopped) {
        (0, _) => "run queue empty".to_owned(),
        (n, Some(why)) => format!("{n} queued ({why})"),
        (n, None) => format!("{n} queued"),
    };
    let dead = if terminated.is_empty() { String::new() } else { format!(" ({})", terminated.join(", ")) };
    writeln!(
        out,
        "-- {cranks} cranks: {} committed, {aborted} aborted; {} terminated{dead}; {queue}",
        cranks - aborted,
        plural(terminated.len(), "vat")
    )
    .map_err(w)?;
    writeln!(out, "-- elapsed {}, {} cranks/s", human(elapsed), rate(cranks, elapsed)).map_err(w)?;
    out.flush().map_err(w)?;
    Ok(if stopped == Some("interrupted") { ExitCode::from(130) } else { ExitCode::SUCCESS })
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

fn rate(cranks: u64, d: Duration) -> u64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        (cranks as f64 / s) as u64
    } else {
        0
    }
}

/// A spinner with cranks/s on stderr, when stderr is a terminal and the transcript is not
/// going to the same terminal. It appears once the run has taken a second.
fn progress_bar(quiet: bool) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() || (!quiet && std::io::stdout().is_terminal()) {
        return None;
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {pos} cranks  {msg}") {
        bar.set_style(style);
    }
    Some(bar)
}

fn update_bar(bar: &ProgressBar, cranks: u64, started: Instant) {
    let elapsed = started.elapsed();
    if elapsed < Duration::from_secs(1) {
        return;
    }
    if bar.is_hidden() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar.set_position(cranks);
    bar.set_message(format!("{} cranks/s", rate(cranks, elapsed)));
}

fn open_existing(store: &Path) -> Result<(), Failure> {
    if host::is_store_dir(store) {
        Ok(())
    } else {
        Err(Failure::input(format!("{}: not a kernel store directory (`kernel run CLUSTER --store DIR` makes one)", store.display())))
    }
}

fn send(a: SendArgs, stop: &AtomicBool) -> Result<ExitCode, Failure> {
    open_existing(&a.store)?;
    let snapshot = host::snapshot_file(&a.store);
    if !snapshot.is_file() {
        return Err(Failure::input(format!("{}: missing; run the cluster once with `kernel run` to write it", snapshot.display())));
    }
    let cluster = Cluster::load(&snapshot).map_err(Failure::input)?;
    let Some((vat, method)) = a.target.split_once('.') else {
        return Err(Failure::input(format!("{:?}: expected VAT.METHOD", a.target)));
    };
    let body = codec::parse_args(&a.args).map_err(|e| Failure::input(format!("ARGS-JSON {:?}: {e}", a.args)))?;
    let kernel = open_fjall(&a.store, &cluster)?;
    let (mut host, _) = Host::attach(kernel, &cluster)?;
    let ep = host.endpoint(vat).ok_or_else(|| Failure::input(format!("no vat is named {vat:?}")))?;
    let live = |host: &Host<FjallStore>, name: &str, ep| -> Result<(), Failure> {
        match host.kernel().endpoint(ep)?.map(|r| r.status) {
            Some(EndpointStatus::Terminated { reason }) => {
                Err(Failure::runtime(format!("vat {name:?} is terminated ({reason}); nothing was sent")))
            }
            _ => Ok(()),
        }
    };
    live(&host, vat, ep)?;
    let mut slots = Vec::with_capacity(a.slots.len());
    for s in &a.slots {
        let r = match s.parse::<KRef>() {
            Ok(k) => k,
            Err(_) => match host.endpoint(s) {
                Some(e) => {
                    live(&host, s, e)?;
                    host.kernel().root(e)?.into()
                }
                None => return Err(Failure::input(format!("--slot {s:?}: neither a kref nor a vat name"))),
            },
        };
        slots.push(r);
    }
    let root = host.kernel().root(ep)?;
    let kp = host.kernel_mut().queue_message(root.into(), method, CapData { body, slots }).map_err(|e| match e {
        KernelError::UnknownRef(r) => Failure::input(format!("unknown reference {r}")),
        e => Failure::runtime(e),
    })?;
    let talk = !a.quiet && !a.json;
    let mut cranks = 0u64;
    while host.kernel().settlement(kp)?.is_none() {
        if stop.load(Ordering::SeqCst) || a.max_cranks.is_some_and(|m| cranks >= m) {
            break;
        }
        let Some((report, logs)) = host.step()? else { break };
        cranks += 1;
        if talk {
            println!("{}", host.crank_line(&report));
            for l in logs {
                println!("         {}: {}", l.vat, l.text);
            }
        }
    }
    let settled = host.kernel().settlement(kp)?;
    if settled.is_some() {
        host.kernel_mut().set_pinned(kp.into(), false)?;
    }
    match settled {
        Some(s) => {
            if a.json {
                let mut v = inspect::settlement(&s);
                v["promise"] = serde_json::Value::from(kp.to_string());
                println!("{v}");
            } else {
                println!("{kp} {}: {}", if s.is_rejected() { "rejected" } else { "fulfilled" }, inspect::capdata_text(s.data()));
            }
            Ok(if s.is_rejected() { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        None => {
            if a.json {
                println!("{}", serde_json::json!({ "promise": kp.to_string(), "state": "unresolved" }));
            } else {
                println!("{kp} unresolved ({} queued)", host.kernel().queue_len());
            }
            Ok(ExitCode::from(1))
        }
    }
}

fn inspect_cmd(a: InspectArgs) -> Result<ExitCode, Failure> {
    open_existing(&a.store)?;
    let fjall = FjallStore::open(host::kernel_dir(&a.store), StoreOptions::new(kernel_store::Durability::Buffered))?;
    let kernel = Kernel::open(fjall)?;
    let view = match a.view.unwrap_or(ViewArg::Summary) {
        ViewArg::Summary => View::Summary,
        ViewArg::Queue => View::Queue,
        ViewArg::Promises => View::Promises,
        ViewArg::Objects => View::Objects,
        ViewArg::Vat { name } => View::Vat(name),
        ViewArg::Clist { name } => View::Clist(name),
    };
    let bad = |e: inspect::InspectError| match e {
        inspect::InspectError::NoVat(_) => Failure::input(e),
        other => Failure::runtime(other),
    };
    if a.json {
        let v = inspect::view_json(&kernel, &view).map_err(bad)?;
        println!("{}", serde_json::to_string_pretty(&v).map_err(Failure::runtime)?);
    } else {
        for line in inspect::view_text(&kernel, &view).map_err(bad)? {
            println!("{line}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
