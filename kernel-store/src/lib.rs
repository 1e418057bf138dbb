//! # kernel-store
//!
//! kernel-core's [`Store`](kernel_core::Store) on [fjall](https://docs.rs/fjall): [`FjallStore`].
//! One crank is one atomic fjall write batch; an aborted crank writes nothing (the kernel never
//! hands its batch to the store). Keys are the kernel's byte-ordered keys and values its postcard
//! encodings, stored as they come.
//!
//! - **Durability** is a setting ([`Durability`]): `Sync` (every crank on disk before its commit
//!   event), `Group` (many cranks share one `fdatasync`; the durable watermark, [`Durable`], says
//!   which are on disk) or `Buffered` (survives a process crash, not a power loss).
//! - **Opening** checks the format record first ([`OpenError`] names what is wrong and refuses:
//!   a foreign directory, a newer format, a damaged record, a store already open).
//! - **Recovery**: reopening after a crash resumes at the last committed crank.
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
mod format;
mod overlay;
mod store;

pub use durability::{Clock, Durability, Durable, ManualClock, SystemClock};
pub use error::OpenError;
pub use format::{FORMAT_FILE, LOCK_FILE, STORE_FORMAT};
pub use store::{FjallStore, StoreOptions, RESERVED_PREFIX};
