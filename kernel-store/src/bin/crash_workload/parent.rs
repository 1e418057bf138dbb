//! The parent: runs the workload once without crashes, then again in a child process that it
//! SIGKILLs at random instants (seeded), restarting it each time, and finally lets it finish;
//! then compares the two final states.

use crate::workload::{self, Shape, COUNTERS};
use kernel_core::Kernel;
use kernel_store::{Durability, FjallStore, StoreOptions};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the parent was asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Kills to perform.
    pub kills: u64,
    /// PRNG seed for the kill instants.
    pub seed: u64,
    /// Durability mode of the crashed run.
    pub mode: String,
    /// The workload's size.
    pub shape: Shape,
    /// Where to put the two stores (a fresh temporary directory if `None`).
    pub dir: Option<PathBuf>,
    /// Keep the stores afterwards.
    pub keep: bool,
}

/// splitmix64: small, seeded, good enough to spread kill instants.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, d)`.
    fn below(&mut self, d: Duration) -> Duration {
        let n = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        Duration::from_nanos(self.next() % n)
    }
}

/// A running child and its stdout lines.
struct Running {
    child: Child,
    lines: Receiver<String>,
    reader: JoinHandle<()>,
}

fn spawn(dir: &Path, mode: &str, shape: Shape) -> Result<Running, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut child = Command::new(exe)
        .arg("child")
        .arg("--dir")
        .arg(dir)
        .args(["--mode", mode])
        .args(["--vats", &shape.vats.to_string(), "--rounds", &shape.rounds.to_string()])
        .args(["--chains", &shape.chains.to_string(), "--hops", &shape.hops.to_string()])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot spawn the workload child: {e}"))?;
    let stdout = child.stdout.take().ok_or("child has no stdout")?;
    let (tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) => {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    });
    Ok(Running { child, lines, reader })
}

/// What the crashed run's children said, checked as it comes.
#[derive(Default)]
struct Observed {
    /// Whether applied batches must survive a kill even before they are durable (sync and
    /// buffered modes: `apply` hands every batch to the OS before it returns).
    applied_survives: bool,
    /// The highest batch any child reported durable.
    max_durable: u64,
    /// The highest batch any child reported applied.
    max_applied: u64,
    /// Batches that had to survive and that a later open did not find.
    durability_lost: u64,
    /// Applied batches that were not yet durable and that a kill took away (group mode may).
    rolled_back: u64,
    finished: bool,
}

impl Observed {
    fn new(mode: &str) -> Self {
        Observed { applied_survives: mode != "group", max_durable: 0, max_applied: 0, durability_lost: 0, rolled_back: 0, finished: false }
    }
}

impl Observed {
    fn line(&mut self, line: &str) -> Result<(), String> {
        if let Some(rest) = line.strip_prefix("opened batch=") {
            let batch: u64 = rest.split(' ').next().and_then(|b| b.parse().ok()).ok_or_else(|| format!("bad line {line:?}"))?;
            let floor = if self.applied_survives { self.max_durable.max(self.max_applied) } else { self.max_durable };
            if batch < floor {
                eprintln!("crash-test: reopened at batch {batch}, but batch {floor} had to survive");
                self.durability_lost += floor - batch;
            }
            self.rolled_back += self.max_applied.saturating_sub(batch.max(floor));
            // What an open finds is on disk (recovery syncs it), and the batches after it will
            // be numbered anew.
            self.max_applied = batch;
            self.max_durable = batch;
        } else if let Some(b) = line.strip_prefix("durable ") {
            let b: u64 = b.parse().map_err(|_| format!("bad line {line:?}"))?;
            self.max_durable = self.max_durable.max(b);
            self.max_applied = self.max_applied.max(b);
        } else if let Some(b) = line.strip_prefix("applied ") {
            let b: u64 = b.parse().map_err(|_| format!("bad line {line:?}"))?;
            self.max_applied = self.max_applied.max(b);
        } else if line.starts_with("done") {
            self.finished = true;
        }
        Ok(())
    }

    fn drain(&mut self, r: Running) -> Result<std::process::ExitStatus, String> {
        let Running { mut child, lines, reader } = r;
        let status = child.wait().map_err(|e| format!("waiting for the child: {e}"))?;
        reader.join().map_err(|_| "the reader thread panicked")?;
        for l in lines.try_iter() {
            self.line(&l)?;
        }
        Ok(status)
    }
}

/// Run a child to the end; returns (time to open, time from open to done).
fn run_to_end(dir: &Path, mode: &str, shape: Shape, obs: &mut Observed) -> Result<(Duration, Duration), String> {
    let start = Instant::now();
    let r = spawn(dir, mode, shape)?;
    let first = r.lines.recv().map_err(|_| "the child exited before opening the store".to_owned())?;
    let opened = start.elapsed();
    obs.line(&first)?;
    let status = obs.drain(r)?;
    let work = start.elapsed().saturating_sub(opened);
    if !status.success() || !obs.finished {
        return Err(format!("the workload child failed ({status})"));
    }
    Ok((opened, work))
}

/// Open a finished store read-only in spirit and gather its state.
/// A finished run: every store entry, and each endpoint's counters (in [`COUNTERS`] order).
struct FinalState {
    entries: std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    counters: Vec<(String, [u64; 4])>,
}

fn final_state(dir: &Path) -> Result<FinalState, String> {
    let store = FjallStore::open(dir, StoreOptions::new(Durability::Buffered)).map_err(|e| e.to_string())?;
    let entries = store.entries().map_err(|e| e.to_string())?;
    let kernel = Kernel::open(store).map_err(|e| e.to_string())?;
    let mut counters = Vec::new();
    for (ep, rec) in kernel.endpoints().map_err(|e| e.to_string())? {
        let mut c = [0u64; 4];
        for (slot, key) in c.iter_mut().zip(COUNTERS) {
            *slot = workload::counter(&kernel, ep, key)?;
        }
        counters.push((rec.name, c));
    }
    Ok(FinalState { entries, counters })
}

/// Run the whole crash test; returns whether it passed.
pub fn run(plan: &Plan) -> Result<bool, String> {
    let base = match &plan.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kernel-store-crash-{}-{}", std::process::id(), plan.seed)),
    };
    let clean_dir = base.join("clean");
    let crash_dir = base.join("crashed");
    for d in [&clean_dir, &crash_dir] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| format!("cannot clear {}: {e}", d.display()))?;
        }
    }
    let mut rng = Rng(plan.seed);
    let shape = plan.shape;

    // 1. The reference: the same workload, never interrupted.
    let (open_time, work_time) = run_to_end(&clean_dir, &plan.mode, shape, &mut Observed::new(&plan.mode))?;
    eprintln!("crash-test: reference run: opened in {open_time:?}, worked {work_time:?}; mode {}, seed {}", plan.mode, plan.seed);

    // 2. Kill, restart, repeat. A kill lands at a uniform instant in the next slice of work
    //    (1 in 8 during process start and recovery), so the kills spread over about a quarter
    //    of the workload and the last child still has work to finish.
    let slice = work_time / u32::try_from(plan.kills.max(1) * 2).unwrap_or(u32::MAX);
    let mut open_time = open_time;
    let mut obs = Observed::new(&plan.mode);
    let mut kills = 0u64;
    while kills < plan.kills && !obs.finished {
        let spawned = Instant::now();
        let mut r = spawn(&crash_dir, &plan.mode, shape)?;
        if rng.next().is_multiple_of(8) {
            std::thread::sleep(rng.below(open_time));
        } else {
            match r.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(first) => {
                    open_time = spawned.elapsed();
                    obs.line(&first)?;
                }
                Err(RecvTimeoutError::Timeout) => return Err("a child took over 60 s to open the store".into()),
                Err(RecvTimeoutError::Disconnected) => {}
            }
            std::thread::sleep(rng.below(slice));
        }
        let still_running = r.child.try_wait().map_err(|e| e.to_string())?.is_none();
        if still_running {
            r.child.kill().map_err(|e| format!("cannot kill the child: {e}"))?;
            kills += 1;
        }
        let status = obs.drain(r)?;
        if !still_running && !status.success() {
            return Err(format!("a workload child failed on its own ({status})"));
        }
    }
    if !obs.finished {
        run_to_end(&crash_dir, &plan.mode, shape, &mut obs)?;
    }
    if obs.rolled_back > 0 {
        eprintln!(
            "crash-test: kills took away {} applied batches that were not yet reported durable (allowed in group mode)",
            obs.rolled_back
        );
    }
    if kills < plan.kills {
        eprintln!("crash-test: the workload finished after {kills} of {} kills (make it longer with --rounds)", plan.kills);
    }

    // 3. Compare.
    let FinalState { entries: clean, counters: clean_counters } = final_state(&clean_dir)?;
    let FinalState { entries: crashed, counters: crashed_counters } = final_state(&crash_dir)?;
    let (mut lost, mut duplicated) = (obs.durability_lost, 0u64);
    for ((name, want), (name2, got)) in clean_counters.iter().zip(&crashed_counters) {
        for ((w, g), key) in want.iter().zip(got).zip(COUNTERS) {
            if name != name2 || w != g {
                eprintln!("crash-test: {name} {}: {g}, expected {w}", String::from_utf8_lossy(key));
            }
            lost += w.saturating_sub(*g);
            duplicated += g.saturating_sub(*w);
        }
    }
    let sums = clean_counters.iter().fold([0u64; 4], |mut acc, (_, c)| {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
        acc
    });
    let (recv, notified, chains, rounds) = shape.expected_totals();
    let reference_ok = sums == [recv, notified, chains, rounds];
    if !reference_ok {
        eprintln!("crash-test: the reference run's totals {sums:?} are not the expected {:?}", [recv, notified, chains, rounds]);
    }
    let matches = clean == crashed && clean_counters.len() == crashed_counters.len() && reference_ok;
    if clean != crashed {
        let differing =
            clean.iter().filter(|(k, v)| crashed.get(*k) != Some(*v)).count() + crashed.keys().filter(|k| !clean.contains_key(*k)).count();
        eprintln!("crash-test: {differing} of {} store entries differ from the reference", clean.len());
    }
    println!("crash-test: {kills} kills, {lost} lost, {duplicated} duplicated, state matches: {}", if matches { "yes" } else { "no" });
    if !plan.keep && plan.dir.is_none() {
        let _ = std::fs::remove_dir_all(&base);
    }
    Ok(lost == 0 && duplicated == 0 && matches)
}
