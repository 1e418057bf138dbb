//! The immediate path for work from outside a crank (`Kernel::apply_external`).

use kernel_core::{CapData, CrankContext, Endpoint, Fault, KRef, Kernel, KernelDelivery, MemStore, RunQueueItem, VRef};

/// An endpoint that accepts every delivery and does nothing.
struct Quiet;

impl Endpoint for Quiet {
    fn deliver(&mut self, _: KernelDelivery, _: &mut CrankContext<'_>) -> Result<(), Fault> {
        Ok(())
    }
}

#[test]
fn external_work_commits_at_once_with_its_sends_queued() {
    let mut kernel = Kernel::open(MemStore::new()).expect("open");
    let remote = kernel.add_endpoint("remote", Box::new(Quiet)).expect("add");
    let vat = kernel.add_endpoint("vat", Box::new(Quiet)).expect("add");
    let vat_root = kernel.root(vat).expect("root");
    let cranks_before = kernel.cranks();
    let applied = kernel
        .apply_external(remote, |ctx| {
            let target = ctx.import(KRef::Object(vat_root)).map_err(|e| Fault::VatError(e.to_string()))?;
            let kref = ctx.export(target).map_err(|e| Fault::VatError(e.to_string()))?;
            ctx.send(kref, "hello".into(), CapData::plain("1"), None).map_err(|e| Fault::VatError(e.to_string()))?;
            Ok(kref)
        })
        .expect("no kernel error");
    assert_eq!(applied, Ok(KRef::Object(vat_root)));
    assert_eq!(kernel.cranks(), cranks_before, "the immediate path is not a crank");
    let queue = kernel.run_queue().expect("queue");
    assert!(
        matches!(&queue[..], [RunQueueItem::Send { target, message }] if *target == KRef::Object(vat_root) && message.method == "hello")
    );
}

#[test]
fn illegal_external_work_applies_nothing_and_terminates_no_one() {
    let mut kernel = Kernel::open(MemStore::new()).expect("open");
    let remote = kernel.add_endpoint("remote", Box::new(Quiet)).expect("add");
    let before = kernel.store().clone();
    let applied = kernel
        .apply_external(remote, |ctx| {
            // An export that allocates, a vatstore write, then a forged import: all must vanish.
            let _ = ctx.export(VRef::export(7));
            let _ = ctx.vatstore_set(b"seq", b"9".to_vec());
            ctx.export(VRef::import(99)).map_err(|e| Fault::VatError(e.to_string()))
        })
        .expect("no kernel error");
    assert!(matches!(applied, Err(Fault::IllegalSyscall(_))), "{applied:?}");
    assert_eq!(kernel.store(), &before, "nothing of the refused work was written");
    let status = kernel.endpoint(remote).expect("read").expect("exists").status;
    assert_eq!(status, kernel_core::EndpointStatus::Live);
}
