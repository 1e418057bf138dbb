//! # kernel-syscall
//!
//! Vats for the kernel: the [`Vat`] trait (one method per delivery kind), the [`Syscall`] handle
//! that translates a vat's vrefs through its c-list and validates every syscall (anything
//! illegal aborts the crank and terminates the vat, and the verdict is sticky), [`VatEndpoint`]
//! which makes a vat a kernel [`kernel_core::Endpoint`], and a helper layer ([`Behavior`],
//! [`HelperVat`], [`Cx`]) so a Rust vat is a few dozen lines.
//!
//! ```
//! use kernel_core::{CapData, Kernel, MemStore, Settlement};
//! use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
//! use kernel_core::VRef;
//!
//! /// Counts calls in its vatstore and answers with the count.
//! struct Counter;
//! impl Behavior for Counter {
//!     fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, _args: VatData) -> Result<Answer, VatError> {
//!         match method {
//!             "increment" => {
//!                 let n = cx.get_u64("count")? + 1;
//!                 cx.set("count", &n.to_string())?;
//!                 Ok(Answer::Value(VatData::plain(n.to_string())))
//!             }
//!             other => Err(VatError::new(format!("no method {other}"))),
//!         }
//!     }
//! }
//!
//! let mut kernel = Kernel::open(MemStore::new())?;
//! let vat = kernel.add_endpoint("counter", VatEndpoint::boxed(HelperVat::new(Counter)))?;
//! let root = kernel.root(vat)?;
//! kernel.queue_message(root.into(), "increment", CapData::plain("[]"))?;
//! let second = kernel.queue_message(root.into(), "increment", CapData::plain("[]"))?;
//! kernel.run(None)?;
//! assert_eq!(kernel.settlement(second)?, Some(Settlement::Fulfilled(CapData::plain("2"))));
//! # Ok::<(), kernel_core::KernelError>(())
//! ```
#![forbid(unsafe_code)]

mod data;
mod helper;
mod syscall;
mod vat;

pub use data::VatData;
pub use helper::{Answer, Behavior, Cx, HelperVat};
pub use syscall::{RawData, RawSyscall, Syscall, MAX_KEY_LEN, MAX_VALUE_LEN};
pub use vat::{Resolution, Vat, VatEndpoint, VatError};
