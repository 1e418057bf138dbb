//! `kernel serve`: a cluster's kernel on secure links to its peers (kernel-remote's [`Node`]
//! over a [`TcpTransport`] with [`NoiseSecurity`]), until Ctrl-C or `--for` elapses.
//!
//! - The kernel is known on links by `[network] kernel` (default: the cluster file's stem); its
//!   key pair is the store's identity (`kernel id STORE`).
//! - Only the `[[peer]]` entries' keys are let in, each bound to its peer's name; a peer with an
//!   `address` is dialed, the others are waited for.
//! - What a peer reaches (its bootstrap object for us) is the root of our bootstrap vat (the
//!   first vat if the cluster names none). Our bootstrap vat reaches each peer's through
//!   `bootstrap(vats, peers)`, `peers` mapping peer names to their bootstrap objects.

use super::{check_store_dir, human, io_failure, open_fjall, plural, rate, Failure, ServeArgs};
use kernel_cli::cluster::Cluster;
use kernel_cli::host::{self, Start, Vats};
use kernel_core::{CrankOutcome, KObjectId};
use kernel_remote::tcp::{TcpConfig, TcpTransport};
use kernel_remote::{link_endpoint_name, AllowList, Identity, Node, NoiseSecurity, RemoteConfig, RemoteError, Transport, TurnLimits};
use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest the loop waits for the network when the run queue is empty (Ctrl-C and `--for`
/// are noticed within it).
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// Cranks run between two looks at the network.
const CRANKS_PER_ROUND: u64 = 64;

fn remote(e: RemoteError) -> Failure {
    Failure::runtime(e)
}

pub(crate) fn serve(a: ServeArgs, stop: &AtomicBool) -> Result<ExitCode, Failure> {
    let limit = match a.for_secs {
        None => None,
        Some(s) => Some(Duration::try_from_secs_f64(s).map_err(|e| Failure::input(format!("--for {s}: {e}")))?),
    };
    let cluster = Cluster::load(&a.cluster).map_err(Failure::input)?;
    let Some(network) = cluster.network.clone() else {
        return Err(Failure::input(format!(
            "{}: no [network] table; `kernel serve` needs `[network] listen = \"ADDR\"` and the peers as [[peer]] entries",
            a.cluster.display()
        )));
    };
    let store = a.store.clone().unwrap_or_else(|| cluster.store.clone());
    check_store_dir(&store)?;
    std::fs::create_dir_all(&store).map_err(io_failure(&store))?;
    let kernel = open_fjall(&store, &cluster)?;
    let identity = Identity::load_or_create(&host::kernel_dir(&store)).map_err(Failure::input)?;
    let config = RemoteConfig { turns: a.turns.then(TurnLimits::default), ..RemoteConfig::default() };
    let mut node = Node::new(kernel, network.kernel.clone(), config);
    let mut peers: Vec<(String, KObjectId)> = Vec::with_capacity(network.peers.len());
    for p in &network.peers {
        node.add_peer(p.name.clone()).map_err(remote)?;
        peers.push((p.name.to_string(), node.peer_root(&p.name).map_err(remote)?));
    }
    let (mut vats, start) = Vats::attach(node.kernel_mut(), &cluster, Some(&peers))?;
    for p in &network.peers {
        vats.name_endpoint(node.peer_endpoint(&p.name).map_err(remote)?, link_endpoint_name(&p.name));
    }
    let exposed = cluster.bootstrap.clone().or_else(|| cluster.vats.first().map(|v| v.name.clone())).unwrap_or_default();
    if let Some(ep) = vats.endpoint(&exposed) {
        let root = node.kernel().root(ep)?;
        node.set_bootstrap(root);
    }
    cluster.write_snapshot(&store).map_err(io_failure(&store))?;

    let allow = AllowList::from_pairs(network.peers.iter().map(|p| (p.name.clone(), p.key))).map_err(Failure::input)?;
    let config = TcpConfig { security: Arc::new(NoiseSecurity::new(&identity, allow)), ..TcpConfig::default() };
    let events_per_round = config.limits.events_per_round;
    let mut net = TcpTransport::start(network.kernel.clone(), network.listen, config)
        .map_err(|e| Failure::runtime(format!("listening on {}: {e}", network.listen)))?;
    for p in &network.peers {
        if let Some(addr) = p.address {
            net.dial(p.name.clone(), addr);
        }
    }

    let stdout = std::io::stdout();
    let mut out = std::io::LineWriter::new(stdout.lock());
    let w = |e: std::io::Error| Failure::runtime(format!("writing the transcript: {e}"));
    let names: Vec<&str> = cluster.vats.iter().map(|v| v.name.as_str()).collect();
    match start {
        Start::Bootstrapped(Some(kp)) => writeln!(
            out,
            "new store: {} vats ({}); bootstrap {}.bootstrap queued with {}, result {kp}",
            names.len(),
            names.join(", "),
            cluster.bootstrap.as_deref().unwrap_or_default(),
            plural(peers.len(), "peer")
        ),
        Start::Bootstrapped(None) | Start::Deferred => {
            writeln!(out, "new store: {} vats ({}); no bootstrap vat", names.len(), names.join(", "))
        }
        Start::Resumed { cranks, queued } => writeln!(out, "resuming after crank {cranks}: {queued} queued"),
    }
    .map_err(w)?;
    let peer_list: Vec<String> = network
        .peers
        .iter()
        .map(|p| match p.address {
            Some(addr) => format!("{} (dialing {addr})", p.name),
            None => format!("{} (waiting)", p.name),
        })
        .collect();
    writeln!(
        out,
        "serving {} as {} on {}; peers: {}",
        exposed,
        network.kernel,
        net.local_addr(),
        if peer_list.is_empty() { "none".to_owned() } else { peer_list.join(", ") }
    )
    .map_err(w)?;

    let clock = Instant::now();
    let (mut cranks, mut aborted) = (0u64, 0u64);
    let mut connected: HashMap<String, bool> = HashMap::new();
    let stopped = loop {
        if stop.load(Ordering::SeqCst) {
            break "interrupted";
        }
        if limit.is_some_and(|l| clock.elapsed() >= l) {
            break "stopped after --for";
        }
        for _ in 0..events_per_round {
            let Some(e) = net.poll_event() else { break };
            node.handle(clock.elapsed(), e, &mut net).map_err(remote)?;
        }
        // As kernel-remote's `serve_once`: apply what arrived, so the cranks it queues run in
        // this round, and send what is already durable before this round's cranks commit.
        node.pump(clock.elapsed(), &mut net).map_err(remote)?;
        for _ in 0..CRANKS_PER_ROUND {
            if a.max_cranks.is_some_and(|m| cranks >= m) {
                break;
            }
            let Some(report) = node.step().map_err(remote)? else { break };
            let logs = vats.take_logs();
            cranks += 1;
            if matches!(report.outcome, CrankOutcome::Aborted { .. }) {
                aborted += 1;
            }
            if !a.quiet {
                writeln!(out, "{}", vats.crank_line(node.kernel(), &report)).map_err(w)?;
                for l in logs {
                    writeln!(out, "         {}: {}", l.vat, l.text).map_err(w)?;
                }
            }
        }
        node.pump(clock.elapsed(), &mut net).map_err(remote)?;
        for (peer, reason) in node.take_faults() {
            writeln!(out, "link {peer}: closed: {reason}").map_err(w)?;
        }
        for s in node.status() {
            let was = connected.insert(s.peer.to_string(), s.connected).unwrap_or(false);
            if was != s.connected && !a.quiet {
                writeln!(out, "link {}: {}", s.peer, if s.connected { "connected" } else { "disconnected" }).map_err(w)?;
            }
        }
        if a.max_cranks.is_some_and(|m| cranks >= m) {
            break "stopped at --max-cranks";
        }
        if node.kernel().queue_len() == 0 {
            let now = clock.elapsed();
            let mut wait = node.next_deadline().map_or(IDLE_WAIT, |d| d.saturating_sub(now).min(IDLE_WAIT));
            if let Some(l) = limit {
                wait = wait.min(l.saturating_sub(now));
            }
            if let Some(e) = net.wait_event(wait) {
                node.handle(clock.elapsed(), e, &mut net).map_err(remote)?;
            }
            node.pump(clock.elapsed(), &mut net).map_err(remote)?;
        }
    };
    // A clean stop keeps the open turn (a crash would lose it, and the peers resend).
    node.end_turn().map_err(remote)?;
    let elapsed = clock.elapsed();
    let backlog = node.backlog();
    let queued = node.kernel().queue_len();
    drop(net);
    let kernel = node.into_kernel();
    let terminated: Vec<String> = kernel
        .endpoints()?
        .into_iter()
        .filter(|(_, r)| matches!(r.status, kernel_core::EndpointStatus::Terminated { .. }))
        .map(|(_, r)| r.name)
        .collect();
    drop(kernel);
    let dead = if terminated.is_empty() { String::new() } else { format!(" ({})", terminated.join(", ")) };
    writeln!(
        out,
        "-- {cranks} cranks: {} committed, {aborted} aborted; {} terminated{dead}; {queued} queued, {backlog} unacknowledged for peers ({stopped})",
        cranks - aborted,
        plural(terminated.len(), "vat")
    )
    .map_err(w)?;
    writeln!(out, "-- elapsed {}, {} cranks/s", human(elapsed), rate(cranks, elapsed)).map_err(w)?;
    out.flush().map_err(w)?;
    Ok(if stopped == "interrupted" { ExitCode::from(130) } else { ExitCode::SUCCESS })
}
