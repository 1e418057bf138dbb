//! # kernel-core
//!
//! The pure semantics of an object-capability kernel with transactional cranks: the run queue,
//! the object and promise tables, c-lists and vatstores, kept in a [`Store`]; and the crank, which
//! delivers one run-queue item to one [`Endpoint`], buffers everything the delivery does, and
//! either commits it as one atomic write or drops all of it.
//!
//! This crate does no I/O, starts no threads and reads no clock. The host owns the store and the
//! endpoints and drives the kernel with [`Kernel::step`] / [`Kernel::run`].
//!
//! ```
//! use kernel_core::{CapData, CrankContext, Endpoint, Fault, Kernel, KernelDelivery, MemStore, Settlement};
//!
//! /// Answers every message with "pong".
//! struct Ponger;
//! impl Endpoint for Ponger {
//!     fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
//!         if let KernelDelivery::Message { message, .. } = d {
//!             if let Some(kp) = message.result {
//!                 ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain("\"pong\"")))])
//!                     .map_err(|e| Fault::VatError(e.to_string()))?;
//!             }
//!         }
//!         Ok(())
//!     }
//! }
//!
//! let mut kernel = Kernel::open(MemStore::new())?;
//! let vat = kernel.add_endpoint("ponger", Box::new(Ponger))?;
//! let root = kernel.root(vat)?;
//! let answer = kernel.queue_message(root.into(), "ping", CapData::plain("[]"))?;
//! kernel.run(None)?;
//! assert_eq!(kernel.settlement(answer)?, Some(Settlement::Fulfilled(CapData::plain("\"pong\""))));
//! # Ok::<(), kernel_core::KernelError>(())
//! ```
#![forbid(unsafe_code)]

mod crank;
mod error;
mod gc;
mod ids;
mod kernel;
mod message;
mod promise;
mod records;
mod routing;
pub mod store;
mod tables;

pub use crank::{CrankBuffer, CrankContext, Endpoint, KernelDelivery};
pub use error::{Fault, KernelError, SyscallError};
pub use gc::GcAction;
pub use ids::{Allocator, CrankNumber, EndpointId, KObjectId, KPromiseId, KRef, ParseRefError, RefKind, VRef};
pub use kernel::{CommitEvent, CrankInput, CrankOutcome, CrankReport, Kernel, RunSummary};
pub use message::{CapData, Message, RunQueueItem, Settlement};
pub use store::{Entry, MemStore, Store, StoreError, WriteBatch};
pub use tables::{ClistEntry, EndpointRecord, EndpointStatus, ObjectRecord, PromiseRecord, PromiseState, FORMAT_VERSION};
