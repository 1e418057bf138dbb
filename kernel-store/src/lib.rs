//! # kernel-store
//!
//! kernel-core's [`Store`](kernel_core::Store) on [fjall](https://docs.rs/fjall): [`FjallStore`].
//! A crank is one atomic write: the kernel hands the store one batch per committed crank (and one
//! per immediate-path write), and the store never lets the engine hold part of a batch; an
//! aborted crank hands it nothing. Keys are the kernel's byte-ordered keys and values its postcard
//! encodings, stored as they come.
//!
//! ## The write-ahead log and checkpoints
//! Each batch is held in memory (reads see it) and appended to the store's own write-ahead log
//! as one checksummed record. fjall receives the batches only at a checkpoint, every
//! [`StoreOptions::checkpoint_bytes`] of log and at a clean close, merged by key as one synced
//! write; a key created and deleted in between (a run-queue entry, an outbox entry, a promise
//! that lived for one round trip) never reaches it.
//!
//! ## Durability
//! A setting ([`Durability`]) of when the log's records reach the disk:
//! - `Sync`: each batch is written and `fdatasync`ed inside `apply`, so every crank is on disk
//!   before its commit event;
//! - `Group { max_cranks, max_delay }`: batches wait in memory and one write plus one
//!   `fdatasync` covers many of them; `max_delay` is measured on an injected [`Clock`]
//!   ([`SystemClock`], or [`ManualClock`] in tests);
//! - `Buffered`: each batch is handed to the OS inside `apply` and never synced by the store: it
//!   survives a crash of the process, **not** a power loss or an OS crash.
//!
//! ## The durable event
//! The store counts batches over its whole life and keeps a durable watermark, [`Durable`]
//! `{ up_to_batch, up_to_crank }`. The host registers [`FjallStore::crank_observer`] as a commit
//! observer (so the store learns which batch committed which crank) and, after each
//! `Kernel::step`, polls [`FjallStore::take_durable`]: it returns the new watermark whenever it
//! moved. While the kernel is idle the host calls [`FjallStore::flush_due`] (at
//! [`FjallStore::flush_deadline`]) so a waiting group is synced on time. Outputs to remotes may
//! leave only up to `up_to_crank` (DESIGN §8). kernel-core is unchanged: the store does the
//! bookkeeping beside it, the way raft-rs's storage reports what is persisted.
//!
//! ## Opening and recovery
//! [`FjallStore::open`] checks the format record ([`FORMAT_FILE`]) before the engine touches the
//! directory and refuses, with an [`OpenError`] naming the record and the fault, a foreign
//! directory, a newer format, a damaged record, or a store another handle holds open (a lock
//! file). After a crash the store reopens at its last committed batch, which is a committed crank:
//! the kernel resumes with its run queue, promises, c-lists, vatstores and counters intact.
//!
//! ## Crash test
//! `cargo xtask crash-test --kills N [--seed S] [--mode sync|group]` runs the `crash-workload`
//! binary of this crate: a kernel in a child process, SIGKILLed at random instants and restarted,
//! compared at the end with an uninterrupted run. `tests/crash.rs` runs a short version.
//!
//! ```
//! use kernel_core::{CapData, Kernel};
//! use kernel_store::{Durability, FjallStore, StoreOptions};
//! # use kernel_core::{CrankContext, Endpoint, Fault, KernelDelivery, Settlement};
//! # struct Ponger;
//! # impl Endpoint for Ponger {
//! #     fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
//! #         if let KernelDelivery::Message { message: kernel_core::Message { result: Some(kp), .. }, .. } = d {
//! #             ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain("\"pong\"")))]).map_err(|e| Fault::VatError(e.to_string()))?;
//! #         }
//! #         Ok(())
//! #     }
//! # }
//! let dir = tempfile::tempdir()?;
//! let store = FjallStore::open(dir.path(), StoreOptions::new(Durability::GROUP))?;
//! let observer = store.crank_observer();
//! let mut kernel = Kernel::open(store)?;
//! kernel.add_commit_observer(observer);
//! let vat = kernel.add_endpoint("ponger", Box::new(Ponger))?;
//! let answer = kernel.queue_message(kernel.root(vat)?.into(), "ping", CapData::plain("[]"))?;
//! kernel.run(None)?;
//! // Outputs for remotes may leave once the crank that made them is durable.
//! let durable = kernel.store().sync()?;
//! assert_eq!(durable.up_to_crank, Some(kernel.cranks()));
//! assert!(kernel.settlement(answer)?.is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod durability;
mod error;
mod filter;
mod format;
mod overlay;
mod store;
mod wal;

pub use durability::{Clock, Durability, Durable, ManualClock, SystemClock};
pub use error::OpenError;
pub use format::{FORMAT_FILE, LOCK_FILE, STORE_FORMAT};
pub use store::{FjallStore, StoreOptions, RESERVED_PREFIX};
