//! One simulated world per seed: three kernels running the [`App`] workload over a [`SimNet`],
//! with crashes, partitions and network faults for a while, then calm until quiescence; the
//! same seed again without faults; then the checks.
//!
//! Checked, per seed:
//! - output validity (§10.3): every `Data` frame a node hands the network is an outbox entry
//!   already in the sender's *durable* state, byte for byte; every `Ack` covers only messages
//!   whose application is durable;
//! - exactly once, in order (§10.4): every app saw each peer's numbers 1..=count exactly once in
//!   order, and each answer once in order; every link's outbox drained, and what each side wrote
//!   equals what the other applied; no connection was closed for a protocol violation; no
//!   promise is left unresolved;
//! - recovery (§10.5): the apps' state and the links' sequence numbers equal the fault-free run's.

use super::net::{NetFaults, SimIdentities, SimNet, Transmission};
use super::rng::Rng;
use super::store::{SimClock, SimDurability, SimStore};
use super::workload::{App, APP_NAME};
use crate::error::RemoteError;
use crate::link::{decode_u64, outbox_key, APPLIED_KEY, NEXT_SEQ_KEY};
use crate::node::{Node, RemoteConfig, TurnLimits};
use crate::rref::KernelId;
use crate::transport::Transport;
use crate::wire::{Frame, DEFAULT_MAX_FRAME};
use crate::DurableStore;
use kernel_core::{CapData, EndpointId, KRef, Kernel, PromiseState};
use kernel_syscall::{HelperVat, VatEndpoint};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How to run the simulation.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Kernels in the world.
    pub kernels: usize,
    /// Host actions with faults before the calm phase.
    pub fault_steps: u64,
    /// Host actions allowed in the calm phase before the world counts as stuck.
    pub calm_steps: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions { kernels: 3, fault_steps: 1_500, calm_steps: 200_000 }
    }
}

/// What one seed did and what it broke.
#[derive(Debug, Clone, Default)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Every invariant violation found (empty: the seed passed).
    pub violations: Vec<String>,
    /// Host actions taken in the faulty run.
    pub steps: u64,
    /// Crashes injected.
    pub crashes: u64,
    /// Partitions injected.
    pub partitions: u64,
    /// Data frames transmitted, and of those resent.
    pub data_sent: u64,
    /// Data frames resent.
    pub resent: u64,
    /// Messages per peer direction in the workload.
    pub count: u64,
    /// The durability the stores used.
    pub durability: String,
}

/// The state compared with the fault-free run.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    apps: Vec<Vec<(Vec<u8>, Vec<u8>)>>,
    links: Vec<Vec<(String, u64, u64)>>,
}

#[derive(Debug, Clone, Copy)]
struct Workload {
    count: u64,
    burst: u64,
    durability: SimDurability,
    window: u64,
    /// Whether the nodes run in turns, and their limits.
    turns: Option<TurnLimits>,
}

struct Slot {
    name: KernelId,
    node: Option<Node<SimStore>>,
    down: Option<(SimStore, Duration)>,
}

struct World {
    rng: Rng,
    clock: SimClock,
    net: SimNet,
    slots: Vec<Slot>,
    partitioned: BTreeSet<(usize, usize)>,
    work: Workload,
    violations: Vec<String>,
    steps: u64,
    crashes: u64,
    partitions: u64,
    data_sent: u64,
    resent: u64,
}

const CALM: NetFaults =
    NetFaults { drop_per_mille: 0, dup_per_mille: 0, min_delay: Duration::from_micros(200), max_delay: Duration::from_millis(2) };

fn names(k: usize) -> Vec<KernelId> {
    (0..k).filter_map(|i| KernelId::try_from(format!("k{i}")).ok()).collect()
}

/// The raw store key of `ep`'s vatstore `key` (kernel-core's documented layout, `s/<ep>/<key>`),
/// for reading the durable snapshot directly.
fn vatstore_raw_key(ep: EndpointId, key: &[u8]) -> Vec<u8> {
    let mut k = b"s/".to_vec();
    k.extend_from_slice(&ep.0.to_be_bytes());
    k.push(b'/');
    k.extend_from_slice(key);
    k
}

fn open_node(store: SimStore, name: &KernelId, all: &[KernelId], work: &Workload) -> Result<Node<SimStore>, RemoteError> {
    let kernel = Kernel::open(store)?;
    let config = RemoteConfig {
        retransmit_base: Duration::from_millis(40),
        retransmit_max: Duration::from_millis(640),
        window: work.window,
        max_frame: DEFAULT_MAX_FRAME,
        wait_for_durable: true,
        turns: work.turns,
    };
    let mut node = Node::new(kernel, name.clone(), config);
    let app = node.kernel_mut().add_endpoint(APP_NAME, VatEndpoint::boxed(HelperVat::new(App)))?;
    let root = node.kernel().root(app)?;
    node.set_bootstrap(root);
    for peer in all.iter().filter(|p| *p != name) {
        node.add_peer(peer.clone())?;
    }
    Ok(node)
}

impl World {
    fn new(seed: u64, work: Workload, faulty: bool, k: usize) -> Result<World, RemoteError> {
        let mut rng = Rng::new(seed);
        let net_rng = rng.fork();
        let all = names(k);
        let faults = if faulty {
            NetFaults {
                drop_per_mille: rng.range(0, 150),
                dup_per_mille: rng.range(0, 150),
                min_delay: Duration::from_micros(100),
                max_delay: Duration::from_millis(rng.range(1, 30)),
            }
        } else {
            CALM
        };
        let clock = SimClock::new();
        let mut slots = Vec::new();
        for name in &all {
            let mut node = open_node(SimStore::new(work.durability, clock.clone()), name, &all, &work)?;
            let peers: Vec<&KernelId> = all.iter().filter(|p| *p != name).collect();
            let mut slots_refs = Vec::new();
            for p in &peers {
                slots_refs.push(KRef::Object(node.peer_root(p)?));
            }
            let list: Vec<String> = peers.iter().map(|p| p.to_string()).collect();
            let body = format!("{name}|{}|{}|{}", work.count, work.burst, list.join(","));
            let app = node.kernel().endpoint_id(APP_NAME)?.ok_or_else(|| RemoteError::Refused("no app".into()))?;
            let root = node.kernel().root(app)?;
            node.kernel_mut().queue_message(root.into(), "start", CapData { body: body.into_bytes(), slots: slots_refs })?;
            node.end_turn()?;
            node.kernel().store().sync(); // the setup is durable before any fault
            slots.push(Slot { name: name.clone(), node: Some(node), down: None });
        }
        Ok(World {
            rng,
            clock,
            net: SimNet::new(all.clone(), net_rng, faults).with_identities(SimIdentities::derived(&all, seed)),
            slots,
            partitioned: BTreeSet::new(),
            work,
            violations: Vec::new(),
            steps: 0,
            crashes: 0,
            partitions: 0,
            data_sent: 0,
            resent: 0,
        })
    }

    fn now(&self) -> Duration {
        self.clock.now()
    }

    fn violation(&mut self, v: String) {
        if self.violations.len() < 20 {
            self.violations.push(v);
        }
    }

    /// Events and output for every live node, and the checks on what they transmitted.
    fn io(&mut self) {
        let now = self.now();
        for i in 0..self.slots.len() {
            let Some(node) = self.slots[i].node.as_mut() else { continue };
            let mut port = self.net.port(i, now);
            let mut result = Ok(());
            while let Some(e) = port.poll_event() {
                result = node.handle(now, e, &mut port);
                if result.is_err() {
                    break;
                }
            }
            if result.is_ok() {
                result = node.pump(now, &mut port);
            }
            if let Err(e) = result {
                self.violation(format!("k{i}: host error: {e}"));
            }
            for t in self.net.take_transmissions() {
                self.check_transmission(&t);
            }
        }
        for (closer, peer, reason) in self.net.take_closes() {
            self.violation(format!("k{closer} closed its connection to k{peer}: {reason}"));
        }
    }

    /// §10.3: a frame leaves only what is durable at the sender.
    fn check_transmission(&mut self, t: &Transmission) {
        let Some(node) = self.slots[t.from].node.as_ref() else {
            return self.violation(format!("k{} transmitted while down", t.from));
        };
        let peer = self.slots[t.to].name.clone();
        let Ok(ep) = node.peer_endpoint(&peer) else { return };
        let store = node.kernel().store();
        let durable_u64 = |key: &[u8]| store.durable_get(&vatstore_raw_key(ep, key)).and_then(|v| decode_u64(&v)).unwrap_or(0);
        match Frame::decode(&t.frame, DEFAULT_MAX_FRAME) {
            Ok(Frame::Data { seq, message }) => {
                if durable_u64(NEXT_SEQ_KEY) <= seq.0 {
                    self.violation(format!("k{} sent {seq} to k{} before the crank that wrote it was durable", t.from, t.to));
                } else if store.durable_get(&vatstore_raw_key(ep, &outbox_key(seq.0))) != Some(message) {
                    self.violation(format!("k{} sent {seq} to k{} but its durable outbox does not hold those bytes", t.from, t.to));
                }
            }
            Ok(Frame::Ack { upto, written }) => {
                // The peer forgets names on the strength of `written`: it must be durable.
                let (applied, durable_written) = (durable_u64(APPLIED_KEY), durable_u64(NEXT_SEQ_KEY).max(1) - 1);
                if applied < upto.0 {
                    self.violation(format!("k{} acked {upto} to k{} before applying it durably", t.from, t.to));
                }
                if durable_written < written.0 {
                    self.violation(format!("k{} told k{} its outbox was written to {written} before that was durable", t.from, t.to));
                }
            }
            Ok(Frame::Hello { .. }) => {}
            Err(e) => self.violation(format!("k{} sent an undecodable frame: {e}", t.from)),
        }
    }

    fn crash(&mut self, i: usize) {
        let Some(node) = self.slots[i].node.take() else { return };
        let stats = node.stats();
        self.data_sent += stats.data_sent;
        self.resent += stats.resent;
        let store = node.into_kernel().into_store().crash();
        let back = self.now() + Duration::from_millis(self.rng.range(0, 400));
        self.slots[i].down = Some((store, back));
        self.net.crash(i);
        self.crashes += 1;
    }

    fn restart(&mut self, i: usize, force: bool) {
        let now = self.now();
        let due = matches!(&self.slots[i].down, Some((_, at)) if force || *at <= now);
        if !due {
            return;
        }
        let Some((store, _)) = self.slots[i].down.take() else { return };
        let all: Vec<KernelId> = self.slots.iter().map(|s| s.name.clone()).collect();
        let name = self.slots[i].name.clone();
        match open_node(store, &name, &all, &self.work) {
            Ok(node) => self.slots[i].node = Some(node),
            Err(e) => self.violation(format!("k{i}: restart failed: {e}")),
        }
    }

    fn connect_eligible(&mut self, chance: u64) {
        let k = self.slots.len();
        for a in 0..k {
            for b in a + 1..k {
                let up = self.slots[a].node.is_some() && self.slots[b].node.is_some();
                if up && !self.partitioned.contains(&(a, b)) && !self.net.is_connected(a, b) && self.rng.chance(chance) {
                    self.net.connect(a, b);
                }
            }
        }
    }

    fn crank(&mut self, i: usize) {
        let Some(node) = self.slots[i].node.as_mut() else { return };
        if let Err(e) = node.step() {
            self.violation(format!("k{i}: crank failed: {e}"));
        }
    }

    fn with_work(&self) -> Vec<usize> {
        (0..self.slots.len()).filter(|&i| self.slots[i].node.as_ref().is_some_and(|n| n.kernel().queue_len() > 0)).collect()
    }

    /// One host action chosen at random, faults included.
    fn faulty_step(&mut self) {
        let k = self.slots.len();
        for i in 0..k {
            self.restart(i, false);
        }
        self.connect_eligible(200);
        let r = self.rng.below(100);
        match r {
            0..=39 => {
                let busy = self.with_work();
                if !busy.is_empty() {
                    let i = busy[self.rng.below(busy.len() as u64) as usize];
                    self.crank(i);
                }
            }
            40..=64 => {
                if let Some(at) = self.net.next_arrival() {
                    self.clock.set(at);
                    self.net.deliver_next(self.now());
                }
            }
            65..=74 => {
                let by = Duration::from_millis(self.rng.range(0, 60));
                self.clock.set(self.now() + by);
            }
            75..=76 => {
                let i = self.rng.below(k as u64) as usize;
                self.crash(i);
            }
            77..=79 => {
                let a = self.rng.below(k as u64) as usize;
                let b = (a + 1 + self.rng.below(k as u64 - 1) as usize) % k;
                let p = (a.min(b), a.max(b));
                if self.partitioned.insert(p) {
                    self.partitions += 1;
                }
                self.net.disconnect(p.0, p.1, "partition");
            }
            80..=83 => {
                if !self.partitioned.is_empty() {
                    let n = self.rng.below(self.partitioned.len() as u64) as usize;
                    if let Some(p) = self.partitioned.iter().nth(n).copied() {
                        self.partitioned.remove(&p);
                    }
                }
            }
            84..=87 => {
                let i = self.rng.below(k as u64) as usize;
                if let Some(node) = &self.slots[i].node {
                    node.kernel().store().sync();
                }
            }
            88..=91 => {
                let a = self.rng.below(k as u64) as usize;
                let b = (a + 1 + self.rng.below(k as u64 - 1) as usize) % k;
                self.net.disconnect(a, b, "connection reset");
            }
            _ => {
                let busy = self.with_work();
                if let Some(&i) = busy.first() {
                    self.crank(i);
                }
            }
        }
        self.io();
    }

    /// Everything up, nothing injected; returns false once quiescent.
    fn calm_step(&mut self) -> bool {
        for i in 0..self.slots.len() {
            self.restart(i, true);
        }
        self.partitioned.clear();
        self.connect_eligible(1000);
        let busy = self.with_work();
        if !busy.is_empty() {
            for i in busy {
                self.crank(i);
            }
        } else if self.net.next_arrival().is_some_and(|t| t <= self.now()) {
            while self.net.deliver_next(self.now()) {}
        } else {
            let settled = self.slots.iter().all(|s| s.node.as_ref().is_some_and(|n| n.is_idle()));
            let net_quiet = self.net.in_flight() == 0 && (0..self.slots.len()).all(|i| !self.net.has_events(i));
            if settled && net_quiet {
                return false;
            }
            let mut next: Vec<Duration> = self.net.next_arrival().into_iter().collect();
            for s in &self.slots {
                if let Some(n) = &s.node {
                    next.extend(n.next_deadline());
                    next.extend(n.kernel().store().flush_deadline());
                }
            }
            match next.into_iter().min() {
                Some(t) => self.clock.set(t.max(self.now() + Duration::from_micros(1))),
                None => self.clock.set(self.now() + Duration::from_millis(1)),
            }
            while self.net.deliver_next(self.now()) {}
        }
        self.io();
        true
    }

    fn run(&mut self, faulty: bool, opts: &SimOptions) {
        if faulty {
            for _ in 0..opts.fault_steps {
                self.faulty_step();
                self.steps += 1;
            }
            self.net.set_faults(CALM);
        }
        let mut calm = 0;
        while self.calm_step() {
            calm += 1;
            self.steps += 1;
            if calm > opts.calm_steps {
                let status: Vec<String> =
                    self.slots.iter().filter_map(|s| s.node.as_ref()).flat_map(|n| n.status()).map(|p| format!("{p:?}")).collect();
                self.violation(format!("no quiescence after {calm} calm steps: {}", status.join("; ")));
                return;
            }
        }
        for s in &self.slots {
            if let Some(n) = &s.node {
                let st = n.stats();
                self.data_sent += st.data_sent;
                self.resent += st.resent;
            }
        }
    }

    /// §10.4 checks on the quiescent world, and the state to compare with the clean run.
    fn outcome(&mut self) -> Outcome {
        let mut apps = Vec::new();
        let mut links = Vec::new();
        let mut found = Vec::new();
        let k = self.slots.len();
        for (i, s) in self.slots.iter().enumerate() {
            let Some(node) = &s.node else {
                found.push(format!("k{i} is down at the end"));
                continue;
            };
            let kernel = node.kernel();
            let entries = kernel.endpoint_id(APP_NAME).ok().flatten().and_then(|ep| kernel.vatstore(ep).ok()).unwrap_or_default();
            let get = |key: &str| {
                entries.iter().find(|(k, _)| k.as_slice() == key.as_bytes()).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            };
            if let Some(first) = get("bad/first") {
                found.push(format!("k{i}: app saw {} violations, first: {first}", get("bad").unwrap_or_default()));
            }
            let callbacks = self.work.count / 4;
            for peer in self.slots.iter().filter(|p| p.name != s.name) {
                for what in ["in", "got", "sent"] {
                    let v = get(&format!("{what}/{}", peer.name));
                    if v.as_deref() != Some(self.work.count.to_string().as_str()) {
                        found.push(format!("k{i}: {what}/{} is {v:?}, expected {}", peer.name, self.work.count));
                    }
                }
                let cb = get(&format!("cb/{}", peer.name)).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                if cb != callbacks {
                    found.push(format!("k{i}: {cb} callbacks answered by {}, expected {callbacks}", peer.name));
                }
            }
            let served = get("served").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if served != callbacks * (k as u64 - 1) {
                found.push(format!("k{i}: served {served} callbacks, expected {}", callbacks * (k as u64 - 1)));
            }
            if kernel.queue_len() != 0 {
                found.push(format!("k{i}: run queue not empty"));
            }
            match kernel.promises() {
                Ok(ps) => {
                    let open: Vec<String> =
                        ps.iter().filter(|(_, p)| matches!(p, PromiseState::Unresolved { .. })).map(|(kp, _)| kp.to_string()).collect();
                    if !open.is_empty() {
                        found.push(format!("k{i}: unresolved promises {}", open.join(",")));
                    }
                }
                Err(e) => found.push(format!("k{i}: reading promises: {e}")),
            }
            apps.push(entries);
            let mut ls = Vec::new();
            for st in node.status() {
                if st.backlog != 0 {
                    found.push(format!("k{i}: backlog {} to {}", st.backlog, st.peer));
                }
                // Every resolution sent was acknowledged and its names let go: no names kept.
                match node.peer_endpoint(&st.peer).map(|ep| kernel.aliases(ep)) {
                    Ok(Ok(a)) if a.is_empty() => {}
                    Ok(Ok(a)) => found.push(format!("k{i}: the link to {} still keeps {} resolved promise names", st.peer, a.len())),
                    Ok(Err(e)) => found.push(format!("k{i}: reading the aliases of the link to {}: {e}", st.peer)),
                    Err(e) => found.push(format!("k{i}: the link to {}: {e}", st.peer)),
                }
                ls.push((st.peer.to_string(), st.written.0, st.applied.0));
            }
            links.push(ls);
        }
        // What each side wrote, the other applied.
        for a in 0..k {
            for b in 0..k {
                if a == b {
                    continue;
                }
                let (Some(na), Some(nb)) = (&self.slots[a].node, &self.slots[b].node) else { continue };
                let wa = na.status().into_iter().find(|p| p.peer == self.slots[b].name).map(|p| p.written);
                let ab = nb.status().into_iter().find(|p| p.peer == self.slots[a].name).map(|p| p.applied);
                if wa != ab {
                    found.push(format!("k{a} wrote {wa:?} for k{b}, which applied {ab:?}"));
                }
            }
        }
        for f in found {
            self.violation(f);
        }
        Outcome { apps, links }
    }
}

fn world(seed: u64, work: Workload, faulty: bool, opts: &SimOptions) -> Result<(World, Outcome), RemoteError> {
    let mut w = World::new(seed, work, faulty, opts.kernels)?;
    w.run(faulty, opts);
    let outcome = w.outcome();
    Ok((w, outcome))
}

/// Run `seed`: the faulty world, the same workload without faults, and every check.
pub fn run_seed(seed: u64, opts: &SimOptions) -> SeedReport {
    let mut rng = Rng::new(seed ^ 0x05EE_D0F0_C0FF_EE00);
    let durability = if rng.chance(400) {
        SimDurability::Sync
    } else {
        SimDurability::Group {
            max_batches: rng.range(1, 12) as usize,
            max_delay: Duration::from_millis(rng.range(1, 20)),
            early: rng.chance(500),
        }
    };
    let (count, burst, window) = (rng.range(3, 12), rng.range(1, 4), [1, 2, 8, 64, 4096][rng.below(5) as usize]);
    let turns = rng.chance(500).then(|| TurnLimits { max_cranks: rng.range(1, 40), max_delay: Duration::from_millis(rng.range(0, 10)) });
    let work = Workload { count, burst, durability, window, turns };
    let mut report =
        SeedReport { seed, count: work.count, durability: format!("{durability:?}, turns {turns:?}"), ..SeedReport::default() };
    let faulty = match world(seed, work, true, opts) {
        Ok(w) => w,
        Err(e) => {
            report.violations.push(format!("setup failed: {e}"));
            return report;
        }
    };
    let (w, outcome) = faulty;
    report.violations.extend(w.violations.iter().cloned());
    report.steps = w.steps;
    report.crashes = w.crashes;
    report.partitions = w.partitions;
    report.data_sent = w.data_sent;
    report.resent = w.resent;
    match world(seed, work, false, opts) {
        Ok((clean, clean_outcome)) => {
            report.violations.extend(clean.violations.iter().map(|v| format!("fault-free run: {v}")));
            if clean_outcome != outcome {
                report.violations.push(describe_difference(&outcome, &clean_outcome));
            }
        }
        Err(e) => report.violations.push(format!("fault-free setup failed: {e}")),
    }
    report
}

fn describe_difference(faulty: &Outcome, clean: &Outcome) -> String {
    for (i, (a, b)) in faulty.apps.iter().zip(&clean.apps).enumerate() {
        if a != b {
            let show = |e: &Vec<(Vec<u8>, Vec<u8>)>| {
                e.iter().map(|(k, v)| format!("{}={}", k.escape_ascii(), v.escape_ascii())).collect::<Vec<_>>().join(" ")
            };
            return format!("k{i}: app state differs from the fault-free run: [{}] vs [{}]", show(a), show(b));
        }
    }
    format!("link state differs from the fault-free run: {:?} vs {:?}", faulty.links, clean.links)
}

/// Run seeds `first..first + n`, printing a line per failing seed and the summary
/// `sim: N seeds, V violations`. Returns the number of violating seeds.
pub fn run_seeds(first: u64, n: u64, opts: &SimOptions, verbose: bool) -> u64 {
    let started = Instant::now();
    let (mut bad, mut violations, mut crashes, mut resent) = (0u64, 0u64, 0u64, 0u64);
    for seed in first..first + n {
        let r = run_seed(seed, opts);
        crashes += r.crashes;
        resent += r.resent;
        if verbose {
            println!(
                "seed {seed}: {} steps, {} crashes, {} partitions, {} data frames ({} resent), count {}, {}",
                r.steps, r.crashes, r.partitions, r.data_sent, r.resent, r.count, r.durability
            );
        }
        if !r.violations.is_empty() {
            bad += 1;
            violations += r.violations.len() as u64;
            println!("sim: seed {seed} FAILED ({}); replay with `cargo xtask sim --seed {seed}`", r.durability);
            for v in r.violations.iter().take(5) {
                println!("  {v}");
            }
        }
    }
    println!(
        "sim: {n} seeds, {violations} violations ({bad} failing seeds; {crashes} crashes, {resent} resent frames; {:.1} s)",
        started.elapsed().as_secs_f64()
    );
    bad
}
