//! The bank example's vats, from the example itself (`kernel-syscall/examples/bank.rs`, included
//! whole), and constructors for them.

#[allow(dead_code)] // the example's `main` and printing helpers run only as the example
#[path = "../../../kernel-syscall/examples/bank.rs"]
mod example;

use kernel_core::Endpoint;
use kernel_syscall::{HelperVat, VatEndpoint};

/// A new bank vat.
pub fn bank() -> Box<dyn Endpoint> {
    VatEndpoint::boxed(HelperVat::new(example::Bank))
}

/// A new auditor vat.
pub fn auditor() -> Box<dyn Endpoint> {
    VatEndpoint::boxed(HelperVat::new(example::Auditor))
}
