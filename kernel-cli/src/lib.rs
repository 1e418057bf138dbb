//! # kernel-cli
//!
//! The library behind the `kernel` binary: cluster files ([`cluster`]), sandboxed scripted vats
//! in rhai ([`script`]) and their value encoding ([`codec`]), built-in Rust vats ([`builtins`]),
//! attaching a cluster to a kernel ([`host`]) and read-only views of its tables ([`inspect`]).
//!
//! ```
//! use kernel_cli::script::{LogSink, Script, ScriptLimits, ScriptVat};
//! use kernel_core::{CapData, Kernel, MemStore, Settlement};
//!
//! let limits = ScriptLimits::default();
//! let script = Script::compile("fn double(n) { n * 2 }", &limits).expect("compiles");
//! let mut kernel = Kernel::open(MemStore::new())?;
//! let vat = kernel.add_endpoint("doubler", ScriptVat::new("doubler", script, limits, rhai::Map::new(), LogSink::default()).endpoint())?;
//! let answer = kernel.queue_message(kernel.root(vat)?.into(), "double", CapData::plain("[21]"))?;
//! kernel.run(None)?;
//! assert_eq!(kernel.settlement(answer)?, Some(Settlement::Fulfilled(CapData::plain("42"))));
//! # Ok::<(), kernel_core::KernelError>(())
//! ```
#![forbid(unsafe_code)]

pub mod builtins;
pub mod cluster;
pub mod codec;
pub mod host;
pub mod inspect;
pub mod script;
