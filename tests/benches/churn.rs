//! Churn benchmark (issue 7): a long-running loop that creates, passes and drops objects and
//! promises on a MemStore kernel; the store must stay the same size however long it runs.
//!
//! Three vats take turns. At each churn step the host ticks one vat, which makes a new object and
//! hands it to the next vat, and asks that vat for a fresh object of its own (a result promise
//! it subscribes to, fulfilled with a reference). Each vat keeps only the last few things it was
//! given and drops and retires the oldest at once; the exporters are then told dropExports and
//! retireExports. The host unpins every tick's answer. So every step allocates two objects and
//! two promises, and (once warm) frees as many.
//!
//! Printed: the store's key count (`MemStore::len`) and total bytes after 10^4 and after 10^6
//! steps (10^5 if 10^6 would take much more than a minute here; said so in the output), their
//! ratio (target <= 1.1), the kernel's table sizes, the process's resident memory, and the time.
//!
//! `cargo bench -p tests --bench churn [-- --steps N]`

use kernel_core::{CapData, EndpointId, KRef, Kernel, MemStore};
use kernel_syscall::{Resolution, Syscall, Vat, VatData, VatEndpoint, VatError};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many things a vat keeps before dropping the oldest.
const WINDOW: usize = 8;
/// Where the size is measured first.
const EARLY: u64 = 10_000;
/// The long run, if it fits in about a minute.
const LONG: u64 = 1_000_000;
const FALLBACK: u64 = 100_000;

struct Churner {
    next_object: u64,
    next_promise: u64,
    window: VecDeque<kernel_core::VRef>,
}

impl Churner {
    fn keep(&mut self, thing: kernel_core::VRef, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.window.push_back(thing);
        if self.window.len() > WINDOW {
            if let Some(old) = self.window.pop_front() {
                if !self.window.contains(&old) {
                    sys.drop_imports(&[old])?;
                    sys.retire_imports(&[old])?;
                }
            }
        }
        Ok(())
    }

    fn new_object(&mut self) -> kernel_core::VRef {
        self.next_object += 1;
        kernel_core::VRef::export(self.next_object)
    }
}

impl Vat for Churner {
    fn deliver(
        &mut self,
        _target: kernel_core::VRef,
        method: &str,
        args: VatData,
        result: Option<kernel_core::VRef>,
        sys: &mut Syscall<'_, '_>,
    ) -> Result<(), VatError> {
        let arg = || args.slots.first().copied().ok_or_else(|| VatError::new("missing argument"));
        let answer = match method {
            "tick" => {
                let peer = arg()?;
                let o = self.new_object();
                sys.send(peer, "hold", &VatData { body: br#"[{"$slot":0}]"#.to_vec(), slots: vec![o] }, None)?;
                self.next_promise += 1;
                let p = kernel_core::VRef::local_promise(self.next_promise);
                sys.send(peer, "ask", &VatData::plain("[]"), Some(p))?;
                sys.subscribe(p)?;
                VatData::plain("null")
            }
            "hold" => {
                self.keep(arg()?, sys)?;
                VatData::plain("null")
            }
            "ask" => VatData::reference(self.new_object()),
            other => return Err(VatError::new(format!("no method {other}"))),
        };
        if let Some(r) = result {
            sys.resolve(&[(r, false, answer)])?;
        }
        Ok(())
    }

    fn notify(&mut self, resolutions: Vec<Resolution>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        for r in resolutions {
            if let Some(thing) = r.data.as_reference() {
                self.keep(thing, sys)?;
            }
        }
        Ok(())
    }
}

struct Churn {
    k: Kernel<MemStore>,
    roots: Vec<KRef>,
    vats: Vec<EndpointId>,
    steps: u64,
    cranks: u64,
    elapsed: Duration,
}

struct Size {
    steps: u64,
    keys: usize,
    bytes: usize,
    objects: usize,
    promises: usize,
    clist: usize,
    rss_kib: Option<u64>,
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Churn {
    fn new() -> Result<Self, kernel_core::KernelError> {
        let mut k = Kernel::open(MemStore::new())?;
        let mut roots = Vec::new();
        let mut vats = Vec::new();
        for i in 0..3 {
            let ep = k.add_endpoint(
                &format!("churner{i}"),
                VatEndpoint::boxed(Churner { next_object: 0, next_promise: 0, window: VecDeque::new() }),
            )?;
            roots.push(k.root(ep)?.into());
            vats.push(ep);
        }
        Ok(Churn { k, roots, vats, steps: 0, cranks: 0, elapsed: Duration::ZERO })
    }

    fn run_to(&mut self, steps: u64) -> Result<(), kernel_core::KernelError> {
        let start = Instant::now();
        while self.steps < steps {
            let i = (self.steps % 3) as usize;
            let peer = self.roots[(i + 1) % 3];
            let kp = self.k.queue_message(self.roots[i], "tick", CapData::reference(peer))?;
            self.k.set_pinned(kp.into(), false)?;
            let summary = self.k.run(None)?;
            assert_eq!(summary.aborted, 0, "a churner failed");
            self.cranks += summary.cranks;
            self.steps += 1;
        }
        self.elapsed += start.elapsed();
        Ok(())
    }

    fn size(&self) -> Result<Size, kernel_core::KernelError> {
        let entries = self.k.store().entries();
        let mut clist = 0;
        for ep in &self.vats {
            clist += self.k.clist(*ep)?.len();
        }
        Ok(Size {
            steps: self.steps,
            keys: self.k.store().len(),
            bytes: entries.iter().map(|(k, v)| k.len() + v.len()).sum(),
            objects: self.k.objects()?.len(),
            promises: self.k.promises()?.len(),
            clist,
            rss_kib: rss_kib(),
        })
    }
}

fn show(s: &Size) {
    let rss = s.rss_kib.map(|r| format!("{r} KiB")).unwrap_or_else(|| "n/a".into());
    println!(
        "after {:>9} steps: {:>5} keys, {:>7} bytes ({} objects, {} promises, {} c-list entries); resident memory {rss}",
        s.steps, s.keys, s.bytes, s.objects, s.promises, s.clist
    );
}

fn main() -> Result<(), kernel_core::KernelError> {
    let args: Vec<String> = std::env::args().collect();
    let asked = args.iter().position(|a| a == "--steps").and_then(|i| args.get(i + 1)).and_then(|s| s.parse::<u64>().ok());
    let mut churn = Churn::new()?;
    churn.run_to(EARLY)?;
    let early = churn.size()?;
    let per_step = churn.elapsed / EARLY as u32;
    let (long, note) = match asked {
        Some(n) => (n.max(EARLY), format!("{n} steps as asked")),
        None if per_step * (LONG as u32) <= Duration::from_secs(75) => (LONG, "10^6 steps".to_owned()),
        None => (
            FALLBACK,
            format!("10^5 steps: 10^6 would take about {:.0} s here ({per_step:?} per step)", (per_step * LONG as u32).as_secs_f64()),
        ),
    };
    println!("churn: 3 vats, window {WINDOW}; each step makes and frees 2 objects and 2 promises; long run: {note}");
    show(&early);
    churn.run_to(long)?;
    let late = churn.size()?;
    show(&late);
    let keys = late.keys as f64 / early.keys as f64;
    let bytes = late.bytes as f64 / early.bytes as f64;
    println!(
        "ratio {} / {} steps: keys {keys:.3}, bytes {bytes:.3} (target <= 1.1: {})",
        late.steps,
        early.steps,
        if keys <= 1.1 && bytes <= 1.1 { "met" } else { "MISSED" }
    );
    println!(
        "{} cranks in {:.2} s ({:.2} us per step, {:.2} us per crank)",
        churn.cranks,
        churn.elapsed.as_secs_f64(),
        churn.elapsed.as_secs_f64() * 1e6 / churn.steps as f64,
        churn.elapsed.as_secs_f64() * 1e6 / churn.cranks as f64
    );
    Ok(())
}
