//! The ping-pong example's vats, from the example itself (`kernel-syscall/examples/ping_pong.rs`,
//! included whole), and constructors for them.

#[allow(dead_code)] // the example's `main` runs only as the example
#[path = "../../../kernel-syscall/examples/ping_pong.rs"]
mod example;

use kernel_core::Endpoint;
use kernel_syscall::{HelperVat, VatEndpoint};

/// A new Alice, who plays a rally of `rally` pings.
pub fn alice(rally: u64) -> Box<dyn Endpoint> {
    VatEndpoint::boxed(HelperVat::new(example::Alice { rally }))
}

/// A new Bob.
pub fn bob() -> Box<dyn Endpoint> {
    VatEndpoint::boxed(HelperVat::new(example::Bob))
}
