//! A scriptable test vat: each delivery runs a closure against the raw [`Syscall`] handle, and
//! every delivery the vat received is recorded, so a test can make any syscall, legal or not,
//! and then look at what the kernel did.

#![allow(dead_code)] // each test file uses a different part of this harness

use kernel_core::{
    CapData, CrankOutcome, CrankReport, EndpointId, EndpointStatus, Fault, KPromiseId, KRef, Kernel, MemStore, Settlement, VRef,
};
use kernel_syscall::{Resolution, Syscall, Vat, VatData, VatEndpoint, VatError};
use std::cell::RefCell;
use std::rc::Rc;

/// One delivery as the vat saw it, in vrefs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message to one of the vat's objects.
    Message {
        /// The receiving object.
        target: VRef,
        /// The method.
        method: String,
        /// The arguments.
        args: VatData,
        /// The result promise, which the vat now decides.
        result: Option<VRef>,
    },
    /// Settled promises.
    Notify(Vec<Resolution>),
}

impl Incoming {
    /// The arguments of a message delivery.
    pub fn args(&self) -> &VatData {
        match self {
            Incoming::Message { args, .. } => args,
            Incoming::Notify(_) => panic!("expected a message, got {self:?}"),
        }
    }

    /// The result promise of a message delivery.
    pub fn result(&self) -> Option<VRef> {
        match self {
            Incoming::Message { result, .. } => *result,
            Incoming::Notify(_) => None,
        }
    }
}

/// What a scripted vat does with one delivery.
pub type Script = Box<dyn FnMut(&mut Syscall<'_, '_>, &Incoming) -> Result<(), VatError>>;

/// Everything a [`ScriptVat`] received, in order.
pub type Seen = Rc<RefCell<Vec<Incoming>>>;

/// A vat driven by a closure.
pub struct ScriptVat {
    script: Script,
    seen: Seen,
}

impl Vat for ScriptVat {
    fn deliver(
        &mut self,
        target: VRef,
        method: &str,
        args: VatData,
        result: Option<VRef>,
        sys: &mut Syscall<'_, '_>,
    ) -> Result<(), VatError> {
        let incoming = Incoming::Message { target, method: method.to_owned(), args, result };
        self.seen.borrow_mut().push(incoming.clone());
        (self.script)(sys, &incoming)
    }

    fn notify(&mut self, resolutions: Vec<Resolution>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let incoming = Incoming::Notify(resolutions);
        self.seen.borrow_mut().push(incoming.clone());
        (self.script)(sys, &incoming)
    }
}

/// Add a scripted vat named `name`; returns its id and what it will see.
pub fn add_vat(
    kernel: &mut Kernel<MemStore>,
    name: &str,
    script: impl FnMut(&mut Syscall<'_, '_>, &Incoming) -> Result<(), VatError> + 'static,
) -> (EndpointId, Seen) {
    let seen: Seen = Rc::default();
    let vat = ScriptVat { script: Box::new(script), seen: Rc::clone(&seen) };
    let ep = kernel.add_endpoint(name, VatEndpoint::boxed(vat)).expect("add vat");
    (ep, seen)
}

/// A vat that does nothing with its deliveries (it still decides their results).
pub fn add_idle_vat(kernel: &mut Kernel<MemStore>, name: &str) -> (EndpointId, Seen) {
    add_vat(kernel, name, |_, _| Ok(()))
}

/// A fresh kernel on a [`MemStore`].
pub fn kernel() -> Kernel<MemStore> {
    Kernel::open(MemStore::new()).expect("open kernel")
}

/// The root object of `ep` as a kref.
pub fn root(kernel: &Kernel<MemStore>, ep: EndpointId) -> KRef {
    kernel.root(ep).expect("root").into()
}

/// Queue `method` to `ep`'s root from the host with these args.
pub fn call(kernel: &mut Kernel<MemStore>, ep: EndpointId, method: &str, args: CapData) -> KPromiseId {
    let target = root(kernel, ep);
    kernel.queue_message(target, method, args).expect("queue")
}

/// Run one crank, which must exist and not fail at the kernel level.
pub fn step(kernel: &mut Kernel<MemStore>) -> CrankReport {
    kernel.step().expect("step must not fail").expect("the run queue must not be empty")
}

/// Run until the queue is empty; returns every report.
pub fn run(kernel: &mut Kernel<MemStore>) -> Vec<CrankReport> {
    let mut reports = Vec::new();
    while let Some(r) = kernel.step().expect("step must not fail") {
        reports.push(r);
        assert!(reports.len() < 10_000, "runaway run queue");
    }
    reports
}

/// `ep`'s status.
pub fn status(kernel: &Kernel<MemStore>, ep: EndpointId) -> EndpointStatus {
    kernel.endpoint(ep).expect("endpoint").expect("endpoint record").status
}

/// The settlement of `kp`, which must have settled.
pub fn settled(kernel: &Kernel<MemStore>, kp: KPromiseId) -> Settlement {
    kernel.settlement(kp).expect("settlement").unwrap_or_else(|| panic!("{kp} is unresolved"))
}

/// `ep`'s vatstore as text pairs.
pub fn vatstore(kernel: &Kernel<MemStore>, ep: EndpointId) -> Vec<(String, String)> {
    kernel
        .vatstore(ep)
        .expect("vatstore")
        .into_iter()
        .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

/// The kref `ep` knows as `vref`, from its c-list.
pub fn kref_of(kernel: &Kernel<MemStore>, ep: EndpointId, vref: VRef) -> Option<KRef> {
    kernel.clist(ep).expect("clist").into_iter().find(|(_, v)| *v == vref).map(|(k, _)| k)
}

/// The vref `ep` knows `kref` by, from its c-list.
pub fn vref_of(kernel: &Kernel<MemStore>, ep: EndpointId, kref: KRef) -> Option<VRef> {
    kernel.clist(ep).expect("clist").into_iter().find(|(k, _)| *k == kref).map(|(_, v)| v)
}

/// Parse a vref the test spells out.
pub fn v(text: &str) -> VRef {
    text.parse().expect("test vref")
}

/// Assert that `report` is an abort of `ep` for an illegal syscall whose reason contains
/// `needle`, that the host sees the same reason in the endpoint's status, and that `result`
/// (the failed message's result) was rejected with it.
pub fn assert_aborted_illegal(kernel: &Kernel<MemStore>, report: &CrankReport, ep: EndpointId, needle: &str, result: Option<KPromiseId>) {
    let reason = match &report.outcome {
        CrankOutcome::Aborted { endpoint, fault: Fault::IllegalSyscall(reason) } if *endpoint == ep => reason.clone(),
        other => panic!("expected {ep} aborted for an illegal syscall ({needle}), got {other:?}"),
    };
    assert!(reason.contains(needle), "reason {reason:?} should mention {needle:?}");
    match status(kernel, ep) {
        EndpointStatus::Terminated { reason: r } => {
            assert!(r.contains("illegal syscall") && r.contains(&reason), "status reason {r:?} should carry {reason:?}")
        }
        EndpointStatus::Live => panic!("{ep} should be terminated"),
    }
    if let Some(kp) = result {
        match settled(kernel, kp) {
            Settlement::Rejected(d) => {
                let body = String::from_utf8_lossy(&d.body);
                assert!(body.contains("delivery failed") && body.contains(needle), "result rejected with {body:?}")
            }
            s => panic!("the failed message's result should be rejected, got {s:?}"),
        }
    }
}

/// Queue `method` to `ep`'s root from the host, carrying a reference to `other`'s root.
pub fn introduce(kernel: &mut Kernel<MemStore>, ep: EndpointId, method: &str, other: EndpointId) -> KPromiseId {
    let r = root(kernel, other);
    call(kernel, ep, method, CapData::reference(r))
}
