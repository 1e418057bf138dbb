//! The [`Vat`] trait (one method per delivery kind) and [`VatEndpoint`], which makes a vat a
//! kernel [`Endpoint`] by translating deliveries out through its c-list.

use crate::data::VatData;
use crate::syscall::Syscall;
use kernel_core::{CapData, CrankContext, Endpoint, Fault, GcAction, KRef, KernelDelivery, Settlement, SyscallError, VRef};

/// A vat's failure: the crank aborts and the vat is terminated with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VatError(pub String);

impl From<SyscallError> for VatError {
    fn from(e: SyscallError) -> Self {
        VatError(e.to_string())
    }
}

impl VatError {
    /// An error with this message.
    pub fn new(msg: impl Into<String>) -> Self {
        VatError(msg.into())
    }
}

/// One settled promise in a `notify`: the vat's vref for it, and how it settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The promise.
    pub promise: VRef,
    /// True if rejected.
    pub rejected: bool,
    /// The value or reason.
    pub data: VatData,
}

/// A vat: isolated objects that act only through syscalls during their deliveries.
pub trait Vat {
    /// `target.method(args)`; if `result` is given, this vat decides it.
    fn deliver(
        &mut self,
        target: VRef,
        method: &str,
        args: VatData,
        result: Option<VRef>,
        sys: &mut Syscall<'_, '_>,
    ) -> Result<(), VatError>;

    /// Promises this vat subscribed to have settled. After this delivery commits the vat's
    /// c-list forgets these vrefs.
    fn notify(&mut self, resolutions: Vec<Resolution>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError>;

    /// No importer can reach these exports any more (`dropExports`). The default keeps them:
    /// the kernel's tables are right either way.
    fn drop_exports(&mut self, exports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let _ = (exports, sys);
        Ok(())
    }

    /// No one can even recognise these exports: the kernel forgets them after this delivery and
    /// the vat may drop any state it keeps for them (`retireExports`).
    fn retire_exports(&mut self, exports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let _ = (exports, sys);
        Ok(())
    }

    /// The exporter of these imports is gone: the kernel forgets them after this delivery
    /// (`retireImports`).
    fn retire_imports(&mut self, imports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let _ = (imports, sys);
        Ok(())
    }

    /// Drop the imports this vat no longer uses (`bringOutYourDead`): call
    /// [`Syscall::drop_imports`] / [`Syscall::retire_imports`] for them. The default keeps all.
    fn bring_out_your_dead(&mut self, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let _ = sys;
        Ok(())
    }
}

/// Adapts a [`Vat`] into a kernel [`Endpoint`].
pub struct VatEndpoint<V: Vat> {
    vat: V,
}

impl<V: Vat> VatEndpoint<V> {
    /// Wrap `vat`.
    pub fn new(vat: V) -> Self {
        VatEndpoint { vat }
    }

    /// Wrap `vat`, boxed for [`kernel_core::Kernel::add_endpoint`].
    pub fn boxed(vat: V) -> Box<dyn Endpoint>
    where
        V: 'static,
    {
        Box::new(VatEndpoint { vat })
    }

    /// The wrapped vat.
    pub fn vat(&self) -> &V {
        &self.vat
    }
}

fn data_out(ctx: &mut CrankContext<'_>, d: CapData) -> Result<VatData, SyscallError> {
    let mut slots = Vec::with_capacity(d.slots.len());
    for k in d.slots {
        slots.push(ctx.import(k)?);
    }
    Ok(VatData { body: d.body, slots })
}

fn kernel_fault(e: SyscallError) -> Fault {
    // Only a store failure can make an outbound translation fail; the kernel reports that itself
    // and does not blame the vat.
    Fault::VatError(format!("delivery translation failed: {e}"))
}

impl<V: Vat> Endpoint for VatEndpoint<V> {
    fn deliver(&mut self, delivery: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        match delivery {
            KernelDelivery::Message { target, message } => {
                let target = ctx.import(KRef::Object(target)).map_err(kernel_fault)?;
                let args = data_out(ctx, message.args).map_err(kernel_fault)?;
                let result = match message.result {
                    Some(kp) => Some(ctx.import(KRef::Promise(kp)).map_err(kernel_fault)?),
                    None => None,
                };
                let mut sys = Syscall::new(ctx);
                self.vat.deliver(target, &message.method, args, result, &mut sys).map_err(|e| Fault::VatError(e.0))
            }
            KernelDelivery::Notify { resolutions } => {
                let mut out = Vec::with_capacity(resolutions.len());
                for (kp, settlement) in resolutions {
                    let promise = ctx.import(KRef::Promise(kp)).map_err(kernel_fault)?;
                    let rejected = settlement.is_rejected();
                    let data = match settlement {
                        Settlement::Fulfilled(d) | Settlement::Rejected(d) => d,
                    };
                    out.push(Resolution { promise, rejected, data: data_out(ctx, data).map_err(kernel_fault)? });
                }
                let mut sys = Syscall::new(ctx);
                self.vat.notify(out, &mut sys).map_err(|e| Fault::VatError(e.0))
            }
        }
    }

    fn collect(&mut self, action: GcAction, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        // Translated without side effects: importing would make a dropped import reachable
        // again, or mark an export the kernel just dropped as undropped. The kernel only
        // delivers actions on refs the endpoint's c-list holds.
        let mut vrefs = Vec::with_capacity(action.objects().len());
        for &o in action.objects() {
            match ctx.vref(KRef::Object(o)).map_err(kernel_fault)? {
                Some(v) => vrefs.push(v),
                None => return Err(Fault::VatError(format!("{} for {o}, which is not in the c-list", action.name()))),
            }
        }
        let mut sys = Syscall::new(ctx);
        let r = match action {
            GcAction::DropExports(_) => self.vat.drop_exports(&vrefs, &mut sys),
            GcAction::RetireExports(_) => self.vat.retire_exports(&vrefs, &mut sys),
            GcAction::RetireImports(_) => self.vat.retire_imports(&vrefs, &mut sys),
            GcAction::BringOutYourDead => self.vat.bring_out_your_dead(&mut sys),
        };
        r.map_err(|e| Fault::VatError(e.0))
    }
}
