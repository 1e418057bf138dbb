//! The workload: a kernel on a [`FjallStore`] with one starter vat and a ring of relay vats
//! (kref-level [`Endpoint`]s) that keep durable counters in their vatstores and relay messages
//! in chains with result promises, so a lost or doubled delivery changes a counter.
//!
//! The host seeds round `r` (a `start` message to the starter) only when the kernel is
//! quiescent and the starter's `round` counter says `r` rounds have started, so the run is the
//! same sequence of operations however often the process is killed and restarted.

use kernel_core::{CapData, CrankContext, Endpoint, EndpointId, Fault, KPromiseId, KRef, Kernel, KernelDelivery, Settlement, VRef};
use kernel_store::{Durability, FjallStore, StoreOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// The size of a run.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Relay vats in the ring.
    pub vats: u32,
    /// Rounds the host seeds, one after another.
    pub rounds: u64,
    /// Chains each round starts.
    pub chains: u64,
    /// Hops in each chain.
    pub hops: u64,
}

impl Shape {
    /// The counters a run without loss or duplication ends with, summed over vats:
    /// (relay deliveries, relay notifies, chains finished, rounds started).
    pub fn expected_totals(&self) -> (u64, u64, u64, u64) {
        let chains = self.rounds * self.chains;
        (chains * (self.hops + 1), chains * self.hops, chains, self.rounds)
    }
}

/// The counter keys every vat may keep.
pub const COUNTERS: [&[u8]; 4] = [b"recv", b"notified", b"chains_done", b"round"];

fn fault(e: impl std::fmt::Display) -> Fault {
    Fault::VatError(e.to_string())
}

fn get_u64(ctx: &mut CrankContext<'_>, key: &[u8]) -> Result<u64, Fault> {
    match ctx.vatstore_get(key).map_err(fault)? {
        None => Ok(0),
        Some(v) => <[u8; 8]>::try_from(v.as_slice()).map(u64::from_be_bytes).map_err(|_| fault(format!("bad counter {key:?}"))),
    }
}

fn bump(ctx: &mut CrankContext<'_>, key: &[u8], by: u64) -> Result<u64, Fault> {
    let n = get_u64(ctx, key)? + by;
    ctx.vatstore_set(key, n.to_be_bytes().to_vec()).map_err(fault)?;
    Ok(n)
}

/// A fresh promise this vat decides (`p+N`), as a kref.
fn new_promise(ctx: &mut CrankContext<'_>) -> Result<KPromiseId, Fault> {
    let n = bump(ctx, b"next_p", 1)?;
    match ctx.export(VRef::local_promise(n)).map_err(fault)? {
        KRef::Promise(kp) => Ok(kp),
        KRef::Object(o) => Err(fault(format!("p+{n} exported as object {o}"))),
    }
}

/// Note every slot in this vat's c-list, as a vref-level vat would see them.
fn import_all(ctx: &mut CrankContext<'_>, slots: &[KRef]) -> Result<(), Fault> {
    for s in slots {
        ctx.import(*s).map_err(fault)?;
    }
    Ok(())
}

fn parse_numbers(body: &[u8]) -> Result<Vec<u64>, Fault> {
    std::str::from_utf8(body).map_err(fault)?.split(',').map(|n| n.parse::<u64>().map_err(fault)).collect()
}

fn settled_number(s: &Settlement) -> Result<u64, Fault> {
    match s {
        Settlement::Fulfilled(d) => Ok(parse_numbers(&d.body)?.first().copied().unwrap_or(0)),
        Settlement::Rejected(d) => Err(fault(format!("chain rejected: {}", String::from_utf8_lossy(&d.body)))),
    }
}

/// Starts `chains` chains per `start`, each with a result promise it subscribes to, and counts
/// the chains that come back.
struct Starter {
    shape: Shape,
}

impl Endpoint for Starter {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        match d {
            KernelDelivery::Message { message, .. } => {
                if message.method != "start" {
                    return Err(fault(format!("starter got {}", message.method)));
                }
                let relays = message.args.slots;
                import_all(ctx, &relays)?;
                let round = bump(ctx, b"round", 1)?;
                for c in 0..self.shape.chains {
                    let kp = new_promise(ctx)?;
                    let target = relays[(c % relays.len() as u64) as usize];
                    let body = format!("{},{},{}", self.shape.hops, round, c);
                    ctx.send(target, "relay".into(), CapData { body: body.into_bytes(), slots: relays.clone() }, Some(kp))
                        .map_err(fault)?;
                    ctx.subscribe(kp).map_err(fault)?;
                }
                if let Some(kp) = message.result {
                    ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain(round.to_string())))]).map_err(fault)?;
                }
            }
            KernelDelivery::Notify { resolutions } => {
                for (_, s) in &resolutions {
                    let hops = settled_number(s)?;
                    if hops != self.shape.hops + 1 {
                        return Err(fault(format!("a chain came back after {hops} vats, expected {}", self.shape.hops + 1)));
                    }
                    bump(ctx, b"chains_done", 1)?;
                }
            }
        }
        Ok(())
    }
}

/// Counts each `relay` it receives and, while hops remain, passes it on with a result promise
/// of its own; answers upstream (hops so far + 1) when the downstream answer arrives.
struct Relay {
    index: u64,
}

fn waiting_key(kp: KPromiseId) -> Vec<u8> {
    let mut k = b"w/".to_vec();
    k.extend_from_slice(&kp.0.to_be_bytes());
    k
}

impl Endpoint for Relay {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        match d {
            KernelDelivery::Message { message, .. } => {
                let n = parse_numbers(&message.args.body)?;
                let (hops, round, chain) = match n.as_slice() {
                    [h, r, c] => (*h, *r, *c),
                    _ => return Err(fault("bad relay body")),
                };
                let relays = message.args.slots;
                import_all(ctx, &relays)?;
                bump(ctx, b"recv", 1)?;
                let Some(upstream) = message.result else { return Err(fault("relay without a result promise")) };
                if hops == 0 {
                    return ctx.resolve(vec![(upstream, Settlement::Fulfilled(CapData::plain("1")))]).map_err(fault);
                }
                let kp = new_promise(ctx)?;
                let next = relays[((self.index + 1 + hops % 3) % relays.len() as u64) as usize];
                let body = format!("{},{},{}", hops - 1, round, chain);
                ctx.send(next, "relay".into(), CapData { body: body.into_bytes(), slots: relays }, Some(kp)).map_err(fault)?;
                ctx.subscribe(kp).map_err(fault)?;
                ctx.vatstore_set(&waiting_key(kp), upstream.0.to_be_bytes().to_vec()).map_err(fault)?;
            }
            KernelDelivery::Notify { resolutions } => {
                for (kp, s) in &resolutions {
                    let key = waiting_key(*kp);
                    let Some(up) = ctx.vatstore_get(&key).map_err(fault)? else { continue };
                    let up = KPromiseId(u64::from_be_bytes(<[u8; 8]>::try_from(up.as_slice()).map_err(fault)?));
                    let hops = settled_number(s)? + 1;
                    ctx.vatstore_delete(&key).map_err(fault)?;
                    ctx.resolve(vec![(up, Settlement::Fulfilled(CapData::plain(hops.to_string())))]).map_err(fault)?;
                    bump(ctx, b"notified", 1)?;
                }
            }
        }
        Ok(())
    }
}

/// Attach the workload's endpoints (creating them in a fixed order the first time).
fn attach(kernel: &mut Kernel<FjallStore>, shape: Shape) -> Result<(EndpointId, Vec<KRef>), String> {
    let starter = kernel.add_endpoint("starter", Box::new(Starter { shape })).map_err(|e| e.to_string())?;
    let mut relays = Vec::new();
    for i in 0..shape.vats {
        let ep = kernel.add_endpoint(&format!("relay-{i}"), Box::new(Relay { index: u64::from(i) })).map_err(|e| e.to_string())?;
        relays.push(KRef::Object(kernel.root(ep).map_err(|e| e.to_string())?));
    }
    Ok((starter, relays))
}

/// A vat's counter, as the host reads it.
pub fn counter(kernel: &Kernel<FjallStore>, ep: EndpointId, key: &[u8]) -> Result<u64, String> {
    let entries = kernel.vatstore(ep).map_err(|e| e.to_string())?;
    Ok(entries
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0))
}

/// Write-ahead log bytes between checkpoints in the child.
const CHECKPOINT_BYTES: u64 = 64 << 10;

/// The longest turn in `sync-turns` mode.
const TURN_CRANKS: u64 = 50;

/// Parse a durability mode name.
pub fn durability(mode: &str) -> Result<Durability, String> {
    match mode {
        "sync" | "sync-turns" => Ok(Durability::Sync),
        "group" => Ok(Durability::Group { max_cranks: 64, max_delay: Duration::from_millis(2) }),
        "buffered" => Ok(Durability::Buffered),
        other => Err(format!("unknown mode {other:?} (sync | sync-turns | group | buffered)")),
    }
}

/// The child: open (or create) the store in `dir`, attach the vats, and run to the end of the
/// workload, reporting on stdout:
/// `opened batch=B crank=C` once open, `durable B` each time the durable watermark moves,
/// `applied B` every 16 cranks (the batch count when the crank's `step` returned), and
/// `done crank=C` at the end. In `sync-turns` mode the kernel runs in turns of up to
/// [`TURN_CRANKS`] cranks (`Kernel::begin_turn`): one batch, one fdatasync per turn.
pub fn child(dir: &Path, mode: &str, shape: Shape) -> Result<(), String> {
    let turns = mode.ends_with("-turns");
    // A checkpoint every 64 KiB of log (a few hundred batches), not 16 MiB: kills then land
    // before, during and after checkpoints and log restarts, not only between them.
    let options = StoreOptions { checkpoint_bytes: CHECKPOINT_BYTES, ..StoreOptions::new(durability(mode)?) };
    let store = FjallStore::open(dir, options).map_err(|e| e.to_string())?;
    let observer = store.crank_observer();
    let mut kernel = Kernel::open(store).map_err(|e| e.to_string())?;
    kernel.add_commit_observer(observer);
    let mut out = std::io::stdout().lock();
    let say =
        |out: &mut std::io::StdoutLock<'_>, line: String| writeln!(out, "{line}").and_then(|()| out.flush()).map_err(|e| e.to_string());
    say(&mut out, format!("opened batch={} crank={}", kernel.store().applied(), kernel.cranks().0))?;
    let (starter, relays) = attach(&mut kernel, shape)?;
    let starter_root = kernel.root(starter).map_err(|e| e.to_string())?;
    let mut in_turn = 0;
    loop {
        if turns && !kernel.in_turn() {
            kernel.begin_turn();
            in_turn = 0;
        }
        let stepped = kernel.step().map_err(|e| e.to_string())?;
        in_turn += 1;
        if turns && (stepped.is_none() || in_turn >= TURN_CRANKS) {
            kernel.end_turn().map_err(|e| e.to_string())?;
        }
        if let Some(d) = kernel.store().flush_due().map_err(|e| e.to_string())? {
            say(&mut out, format!("durable {}", d.up_to_batch))?;
        }
        if let Some(report) = stepped {
            if report.crank.0 % 16 == 0 {
                say(&mut out, format!("applied {}", kernel.store().applied()))?;
            }
            continue;
        }
        let round = counter(&kernel, starter, b"round")?;
        if round >= shape.rounds {
            break;
        }
        let args = CapData { body: round.to_string().into_bytes(), slots: relays.clone() };
        kernel.queue_message(starter_root.into(), "start", args).map_err(|e| e.to_string())?;
    }
    let d = kernel.store().sync().map_err(|e| e.to_string())?;
    say(&mut out, format!("durable {}", d.up_to_batch))?;
    say(&mut out, format!("done crank={}", kernel.cranks().0))?;
    Ok(())
}
