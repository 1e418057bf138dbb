//! Scripted ping-pong cranks/s beside the same rally between built-in Rust vats, measured in
//! the same run on the same in-memory kernel: `pinger` sends `ping(n)` with a result promise and
//! watches it durably; `ponger` answers `n`; on each pong the pinger pings `n + 1`. Two cranks
//! per ping (the delivery, then the notify). Target: scripted >= 0.25x the Rust-vat rate.
//! Interleaved, best of 3.
//!
//! `cargo bench -p kernel-cli --bench scripted [-- --rally N]`

use kernel_cli::builtins;
use kernel_cli::script::{LogSink, Script, ScriptLimits, ScriptVat};
use kernel_core::{CapData, Endpoint, KRef, Kernel, MemStore};
use std::time::{Duration, Instant};

/// The `kernel` binary's allocator (see the workspace's note on mimalloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The scripted pinger: the ping-pong example's alice, without her log line.
const PINGER: &str = r#"
fn bootstrap(vats) {
    store_set("partner", vats[params().partner]);
    serve(1);
    "started"
}
private fn serve(n) {
    watch(send(store_get("partner"), "ping", [n]), "pong");
}
fn pong(outcome) {
    if !outcome.ok { throw `ping rejected: ${outcome.reason}`; }
    store_set("pongs", outcome.value);
    if outcome.value < params().rally { serve(outcome.value + 1); }
}
"#;

/// The scripted ponger.
const PONGER: &str = "fn ping(n) { n }";

fn script(name: &str, src: &str, params: serde_json::Value) -> Box<dyn Endpoint> {
    let limits = ScriptLimits::default();
    let script = Script::compile(src, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
    let params = kernel_cli::codec::decode(&kernel_syscall::VatData::plain(params.to_string())).try_cast::<rhai::Map>().unwrap_or_default();
    ScriptVat::new(name, script, limits, params, LogSink::default()).endpoint()
}

/// Run a rally of `rally` pings; the cranks it took and how long.
fn rally(scripted: bool, rally: u64) -> (u64, Duration) {
    let params = serde_json::json!({ "partner": "bob", "rally": rally });
    let (alice, bob) = if scripted {
        (script("alice", PINGER, params), script("bob", PONGER, serde_json::json!({})))
    } else {
        let a = builtins::builtin("pinger", &params).expect("pinger");
        let b = builtins::builtin("ponger", &params).expect("ponger");
        (a, b)
    };
    let run = || -> Result<(u64, Duration), kernel_core::KernelError> {
        let mut kernel = Kernel::open(MemStore::new())?;
        let a = kernel.add_endpoint("alice", alice)?;
        let b = kernel.add_endpoint("bob", bob)?;
        let (ra, rb) = (kernel.root(a)?, kernel.root(b)?);
        let args =
            CapData { body: br#"[{"alice":{"$slot":0},"bob":{"$slot":1}}]"#.to_vec(), slots: vec![KRef::Object(ra), KRef::Object(rb)] };
        kernel.queue_message(ra.into(), "bootstrap", args)?;
        let start = Instant::now();
        let summary = kernel.run(None)?;
        let elapsed = start.elapsed();
        assert_eq!(summary.aborted, 0);
        let pongs = kernel.vatstore(a)?.into_iter().find(|(k, _)| k == b"pongs").map(|(_, v)| v);
        assert_eq!(pongs, Some(rally.to_string().into_bytes()), "the rally must finish");
        Ok((summary.cranks, elapsed))
    };
    run().unwrap_or_else(|e| panic!("rally failed: {e}"))
}

fn rate(cranks: u64, d: Duration) -> f64 {
    cranks as f64 / d.as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = args.iter().position(|a| a == "--rally").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(20_000u64);
    let (mut best_rust, mut best_script) = (0f64, 0f64);
    let mut cranks = 0;
    for _ in 0..3 {
        let (c, d) = rally(false, n);
        best_rust = best_rust.max(rate(c, d));
        let (c, d) = rally(true, n);
        best_script = best_script.max(rate(c, d));
        cranks = c;
    }
    println!("scripted ping-pong ({cranks} cranks, in memory, best of 3)");
    println!("  rust vats (baseline)   {best_rust:>12.0} cranks/s");
    println!("  rhai scripts           {best_script:>12.0} cranks/s");
    println!("  ratio                  {:>12.2}x   (target >= 0.25x)", best_script / best_rust);
}
