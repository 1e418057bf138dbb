//! The kernel's errors ([`KernelError`], failures of the kernel or its store, never a vat's
//! fault) and the verdicts on an endpoint ([`Fault`], [`SyscallError`]).

use crate::ids::{EndpointId, KRef};
use crate::store::StoreError;

/// A failure of the kernel itself. When `step` returns one, the crank left nothing behind:
/// its transaction was dropped and the run-queue item is still queued.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored record could not be decoded.
    #[error("corrupt {table} record at key {key}: {reason}")]
    Corrupt {
        /// The table (`promise`, `object`, `run-queue`, ...).
        table: &'static str,
        /// The key, printed escaped.
        key: String,
        /// What the decoder said.
        reason: String,
    },
    /// The store was written by a newer kernel, or is not a kernel store.
    #[error("store format {found:?} is not supported (this kernel reads format {supported})")]
    UnsupportedFormat {
        /// What the store says, if it says anything decodable.
        found: Option<u32>,
        /// What this kernel reads.
        supported: u32,
    },
    /// The host named a reference the kernel has no record of.
    #[error("unknown reference {0}")]
    UnknownRef(KRef),
    /// The host named an endpoint the kernel has no record of.
    #[error("unknown endpoint {0}")]
    UnknownEndpoint(EndpointId),
    /// An endpoint is recorded in the store but no implementation was attached for it.
    #[error("endpoint {0} ({1}) has work queued but is not attached")]
    NotAttached(EndpointId, String),
    /// The host asked for something the kernel refuses (e.g. a name already taken).
    #[error("{0}")]
    Refused(String),
}

/// Why a delivery failed. Any fault aborts the crank and terminates the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// The endpoint made a syscall the kernel refuses (DESIGN §3).
    #[error("illegal syscall: {0}")]
    IllegalSyscall(String),
    /// The endpoint's code reported an error.
    #[error("vat error: {0}")]
    VatError(String),
    /// The endpoint's code panicked.
    #[error("vat panicked: {0}")]
    Panic(String),
    /// The endpoint ran out of its per-crank budget.
    #[error("meter exhausted: {0}")]
    MeterExhausted(String),
}

/// What a syscall returns to an endpoint that may not proceed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyscallError {
    /// This syscall was illegal; the crank will abort and the endpoint will be terminated
    /// whatever the endpoint does next.
    #[error("illegal syscall: {0}")]
    Illegal(String),
    /// An earlier syscall of this delivery was illegal, or the endpoint asked to exit: nothing
    /// more is honoured.
    #[error("endpoint is being terminated; syscall ignored")]
    Terminated,
    /// The kernel failed (store error); the crank will be abandoned without blaming the endpoint.
    #[error("kernel error; crank abandoned")]
    Kernel,
}
