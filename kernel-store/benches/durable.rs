//! Durable ping-pong on fjall, in each durability mode, printed beside baselines measured in the
//! same run on the same disk: a raw `fdatasync` loop (64-byte appends) and the in-memory kernel
//! (MemStore). Then scale: crank cost with 1,000,000 live objects vs 1,000, and the time to
//! reopen the 1,000,000-object store.
//!
//! `cargo bench -p kernel-store --bench durable [-- --quick | --only modes|scale|group|memory|reopen]`
//!
//! What dominates (perf, on the 2-core development machine):
//! - sync: the `fdatasync` itself (one per crank, ~0.2 ms); the crank's CPU is ~15 µs of it.
//! - group: the kernel's own work, about what the in-memory kernel spends (~85% of the time).
//!   The store's share is holding each crank's batch in its hash map (a key made and dropped
//!   before the next checkpoint — a ping-pong crank's run-queue entry, its promise — leaves it at
//!   once) and appending it to the write-ahead log, whose group write and fdatasync run on the
//!   store's sync thread, overlapping the next group. fjall sees only what is live at each
//!   checkpoint. Until keys stopped reaching it, fjall's memtable inserts (~1.3 µs per key, two
//!   tombstones and three rows per crank) dominated.
//! - buffered: one write(2) of the batch's log record per crank.
//! - sync in turns of 1,000 cranks (`Kernel::begin_turn`): one fdatasync per turn, and the turn's
//!   merged batch (its cranks' run-queue entries and promises are made and gone within it) is
//!   a few keys, so the kernel's work and the turn's in-memory layer dominate; every commit event
//!   still comes only after the fdatasync that covers it, unlike group commit's.
//! - scale: nothing grows with the object count but the LSM tree's depth, so 1,000,000 objects
//!   cost little more per crank than 1,000.
//! - reopen: after a clean close, opening the tables (the store empties fjall's journal once
//!   everything is flushed) and reading the stored filter of the engine's keys. After a crash
//!   it is also reading back the write-ahead log since the last checkpoint (up to
//!   `checkpoint_bytes`, 16 MiB) and fjall replaying its active journal (checkpoints only):
//!   it depends on those lengths, not on how many objects the store holds.

use kernel_core::{CapData, CrankContext, Endpoint, Fault, KRef, Kernel, KernelDelivery, MemStore, Settlement, Store, VRef};
use kernel_store::{Durability, FjallStore, StoreOptions};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

type Error = Box<dyn std::error::Error>;

/// Answers each ping and pings its peer back with a fresh result promise (as kernel-core's
/// in-memory ping-pong benchmark does).
struct Player {
    peer: Option<KRef>,
    next_promise: u64,
}

impl Endpoint for Player {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let KernelDelivery::Message { target, message } = d else { return Ok(()) };
        let fail = |e: kernel_core::SyscallError| Fault::VatError(e.to_string());
        if let Some(r) = message.result {
            ctx.resolve(vec![(r, Settlement::Fulfilled(CapData::plain("1")))]).map_err(fail)?;
        }
        let peer = match self.peer {
            Some(p) => p,
            None => *message.args.slots.first().ok_or_else(|| Fault::VatError("no peer".into()))?,
        };
        self.peer = Some(peer);
        // Promise numbers live in the vatstore so a reopened store continues without reuse.
        let n = ctx.vatstore_get(b"p").map_err(fail)?.and_then(|v| v.try_into().ok()).map_or(0, u64::from_be_bytes) + 1;
        ctx.vatstore_set(b"p", n.to_be_bytes().to_vec()).map_err(fail)?;
        self.next_promise = n;
        let kp = ctx.export(VRef::local_promise(n)).map_err(fail)?;
        // Carry our own root along so the peer learns whom to answer.
        ctx.send(peer, "ping".into(), CapData::reference(target.into()), kp.as_promise()).map_err(fail)?;
        // Nobody waits for the answer: let it go, so the tables stay the size of the rally.
        ctx.drop_imports(&[kp]).map_err(fail)?;
        Ok(())
    }
}

/// Exports `n` new objects per `make` (its body), numbering them on from its vatstore.
struct Maker;

impl Endpoint for Maker {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
        let fail = |e: kernel_core::SyscallError| Fault::VatError(e.to_string());
        let n: u64 = std::str::from_utf8(&message.args.body).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        let first = ctx.vatstore_get(b"next").map_err(fail)?.and_then(|v| v.try_into().ok()).map_or(1, u64::from_be_bytes);
        for i in first..first + n {
            ctx.export(VRef::export(i)).map_err(fail)?;
        }
        ctx.vatstore_set(b"next", (first + n).to_be_bytes().to_vec()).map_err(fail)?;
        Ok(())
    }
}

/// Set up two players (once per store) and start their rally.
fn start_pingpong<S: Store>(kernel: &mut Kernel<S>) -> Result<(), Error> {
    let a = kernel.add_endpoint("a", Box::new(Player { peer: None, next_promise: 0 }))?;
    let b = kernel.add_endpoint("b", Box::new(Player { peer: None, next_promise: 0 }))?;
    if kernel.queue_len() == 0 {
        let (ra, rb) = (kernel.root(a)?, kernel.root(b)?);
        kernel.queue_message(ra.into(), "ping", CapData::reference(rb.into()))?;
    }
    Ok(())
}

/// Run `cranks` ping-pong cranks; the elapsed time.
fn rally<S: Store>(kernel: &mut Kernel<S>, cranks: u64) -> Result<Duration, Error> {
    let start = Instant::now();
    let summary = kernel.run(Some(cranks))?;
    let elapsed = start.elapsed();
    if summary.cranks != cranks || summary.aborted != 0 {
        return Err(format!("ran {} cranks ({} aborted), expected {cranks}", summary.cranks, summary.aborted).into());
    }
    Ok(elapsed)
}

/// [`rally`], in turns of `turn` cranks (`Kernel::begin_turn`): one store batch, and under sync
/// durability one fdatasync, per turn; every commit event comes after its turn's batch.
fn rally_in_turns<S: Store>(kernel: &mut Kernel<S>, cranks: u64, turn: u64) -> Result<Duration, Error> {
    let start = Instant::now();
    let mut done = 0;
    while done < cranks {
        let n = turn.min(cranks - done);
        kernel.begin_turn();
        let summary = kernel.run(Some(n))?;
        kernel.end_turn()?;
        if summary.cranks != n || summary.aborted != 0 {
            return Err(format!("ran {} cranks ({} aborted), expected {n}", summary.cranks, summary.aborted).into());
        }
        done += n;
    }
    Ok(start.elapsed())
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn fdatasync_loop(dir: &Path, n: u64) -> Result<f64, Error> {
    let mut f = std::fs::File::create(dir.join("fdatasync-loop"))?;
    let buf = [7u8; 64];
    let start = Instant::now();
    for _ in 0..n {
        f.write_all(&buf)?;
        f.sync_data()?;
    }
    Ok(rate(n, start.elapsed()))
}

fn memory_rate(cranks: u64) -> Result<f64, Error> {
    let mut kernel = Kernel::open(MemStore::new())?;
    start_pingpong(&mut kernel)?;
    rally(&mut kernel, cranks / 10)?;
    Ok(rate(cranks, rally(&mut kernel, cranks)?))
}

fn fjall_kernel(dir: &Path, durability: Durability) -> Result<Kernel<FjallStore>, Error> {
    let store = FjallStore::open(dir, StoreOptions::new(durability))?;
    Ok(Kernel::open(store)?)
}

fn fjall_rate(dir: &Path, durability: Durability, cranks: u64) -> Result<f64, Error> {
    let mut kernel = fjall_kernel(dir, durability)?;
    start_pingpong(&mut kernel)?;
    rally(&mut kernel, cranks / 10)?;
    let d = rally(&mut kernel, cranks)?;
    kernel.store().sync()?;
    Ok(rate(cranks, d))
}

/// Sync durability, in turns of `turn` cranks.
fn fjall_turns_rate(dir: &Path, turn: u64, cranks: u64) -> Result<f64, Error> {
    let mut kernel = fjall_kernel(dir, Durability::Sync)?;
    start_pingpong(&mut kernel)?;
    rally_in_turns(&mut kernel, cranks / 10, turn)?;
    Ok(rate(cranks, rally_in_turns(&mut kernel, cranks, turn)?))
}

/// A store holding `objects` live objects (plus the players'), in group mode.
fn store_with_objects(dir: &Path, objects: u64) -> Result<Duration, Error> {
    let mut kernel = fjall_kernel(dir, Durability::GROUP)?;
    let maker = kernel.add_endpoint("maker", Box::new(Maker))?;
    let root = kernel.root(maker)?;
    let per_crank = 10_000.min(objects);
    let start = Instant::now();
    for _ in 0..objects / per_crank {
        kernel.queue_message(root.into(), "make", CapData::plain(per_crank.to_string()))?;
        kernel.run(None)?;
    }
    kernel.store().sync()?;
    Ok(start.elapsed())
}

/// Best of `rounds` runs of each of `runs`, interleaved so every contender sees the same machine
/// (the disk and cores are shared).
fn best_of(rounds: usize, runs: &mut [&mut dyn FnMut() -> Result<f64, Error>]) -> Result<Vec<f64>, Error> {
    let mut best = vec![f64::MIN; runs.len()];
    for _ in 0..rounds {
        for (b, run) in best.iter_mut().zip(runs.iter_mut()) {
            *b = b.max(run()?);
        }
    }
    Ok(best)
}

fn pingpong_modes(dir: &Path, quick: bool) -> Result<(), Error> {
    let n = if quick { 100_000 } else { 300_000 };
    let mut round = 0;
    let mut fresh = |name: &str| {
        round += 1;
        dir.join(format!("{name}-{round}"))
    };
    let (mut sync_dirs, mut group_dirs, mut buffered_dirs, mut turn_dirs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        sync_dirs.push(fresh("sync"));
        group_dirs.push(fresh("group"));
        buffered_dirs.push(fresh("buffered"));
        turn_dirs.push(fresh("turns"));
    }
    let rates = best_of(
        3,
        &mut [
            &mut || fdatasync_loop(dir, 1_000),
            &mut || fjall_rate(&sync_dirs.pop().unwrap_or_else(|| dir.join("sync")), Durability::Sync, 1_000),
            &mut || memory_rate(n),
            &mut || fjall_rate(&group_dirs.pop().unwrap_or_else(|| dir.join("group")), Durability::GROUP, n),
            &mut || fjall_rate(&buffered_dirs.pop().unwrap_or_else(|| dir.join("buffered")), Durability::Buffered, n),
            &mut || fjall_turns_rate(&turn_dirs.pop().unwrap_or_else(|| dir.join("turns")), 1_000, n),
        ],
    )?;
    let [raw, sync, mem, group, buffered, turns] = rates[..] else { return Err("six rates".into()) };
    println!("kernel-store durable ping-pong, best of 3 interleaved (store and fdatasync loop in {})", dir.display());
    println!("  raw fdatasync loop (64 B):      {raw:>10.0} /s");
    println!("  fjall sync:                     {sync:>10.0} cranks/s   {:.2}x fdatasync  (target >= 0.8)", sync / raw);
    println!("  in-memory kernel (MemStore):    {mem:>10.0} cranks/s");
    println!("  fjall group (1000 / 2 ms):      {group:>10.0} cranks/s   {:.2}x in-memory  (target >= 0.5)", group / mem);
    println!("  fjall buffered:                 {buffered:>10.0} cranks/s   {:.2}x in-memory", buffered / mem);
    println!(
        "  fjall sync, turns of 1,000:     {turns:>10.0} cranks/s   {:.2}x in-memory, {:.0}x fjall sync (one fdatasync per turn)",
        turns / mem,
        turns / sync
    );
    Ok(())
}

fn scale(dir: &Path, quick: bool) -> Result<(), Error> {
    let objects = if quick { 100_000 } else { 1_000_000 };
    println!("kernel-store scale ({objects} live objects vs 1,000)");
    let small = dir.join("small");
    let big = dir.join("big");
    store_with_objects(&small, 1_000)?;
    let fill = store_with_objects(&big, objects)?;
    println!("  filled {objects} objects in {fill:.2?} ({:.0} objects/s)", rate(objects, fill));
    let cranks = if quick { 30_000 } else { 100_000 };
    let rates =
        best_of(3, &mut [&mut || fjall_rate(&small, Durability::GROUP, cranks), &mut || fjall_rate(&big, Durability::GROUP, cranks)])?;
    let [small_rate, big_rate] = rates[..] else { return Err("two rates".into()) };
    println!("  group ping-pong, 1,000 objects:  {small_rate:>10.0} cranks/s");
    println!(
        "  group ping-pong, {objects} objects: {big_rate:>10.0} cranks/s   crank cost ratio {:.2} (target <= 1.5)",
        small_rate / big_rate
    );
    let start = Instant::now();
    let kernel = fjall_kernel(&big, Durability::GROUP)?;
    let reopen = start.elapsed();
    println!("  reopen the {objects}-object store (store + kernel): {reopen:.2?}, at {} (target < 1 s)", kernel.cranks());
    drop(kernel);
    println!("  journal left for the next open: {:.1} MB", journal_bytes(&big)? as f64 / 1e6);
    Ok(())
}

/// The size of the engine's journal files: what an open replays.
fn journal_bytes(store: &Path) -> Result<u64, Error> {
    let mut total = 0;
    for e in std::fs::read_dir(store.join("fjall"))? {
        let e = e?;
        if e.path().extension().is_some_and(|x| x == "jnl") {
            total += e.metadata()?.len();
        }
    }
    Ok(total)
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(String::as_str);
    let tmp = tempfile::tempdir()?;
    match only {
        None => {
            pingpong_modes(tmp.path(), quick)?;
            scale(tmp.path(), quick)?;
        }
        Some("modes") => pingpong_modes(tmp.path(), quick)?,
        Some("scale") => scale(tmp.path(), quick)?,
        Some("group") => println!("group: {:.0} cranks/s", fjall_rate(&tmp.path().join("g"), Durability::GROUP, 300_000)?),
        Some("memory") => println!("memory: {:.0} cranks/s", memory_rate(300_000)?),
        Some("reopen") => {
            let big = tmp.path().join("big");
            store_with_objects(&big, if quick { 100_000 } else { 1_000_000 })?;
            fjall_rate(&big, Durability::GROUP, 100_000)?;
            println!("journal: {} bytes", journal_bytes(&big)?);
            for _ in 0..3 {
                let start = Instant::now();
                let store = FjallStore::open(&big, StoreOptions::new(Durability::GROUP))?;
                let opened = start.elapsed();
                let kernel = Kernel::open(store)?;
                println!("reopen: store {opened:.2?}, with kernel {:.2?}", start.elapsed());
                drop(kernel);
            }
        }
        Some(other) => return Err(format!("unknown part {other:?} (modes | scale | group | memory)").into()),
    }
    Ok(())
}
