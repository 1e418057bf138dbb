//! Garbage collection (DESIGN §6).
//!
//! Every kernel object counts the references that can reach it and those that can recognise
//! it; every promise counts its references (see [`crate::ObjectRecord`] and
//! [`crate::PromiseRecord`] for what counts). Counts change inside the transaction that changes
//! the references, so they commit and roll back with the crank. A count that falls to zero marks
//! the kref; before the transaction ends, [`collect`] looks at each marked kref: promises nobody
//! refers to are deleted, and for objects the kernel queues [`GcAction`]s, delivered as ordinary
//! cranks:
//! - no importer can reach it -> `DropExports` to the exporter;
//! - no importer can recognise it either -> `RetireExports` to the exporter (the object goes);
//! - its exporter is gone (terminated, abandoned, retired) and no one can reach it ->
//!   `RetireImports` to each endpoint that still recognises it.

use crate::crank::Work;
use crate::error::KernelError;
use crate::ids::{EndpointId, KObjectId, KRef};
use crate::message::{CapData, Message, RunQueueItem};
use crate::tables::{KernelTxn, PromiseState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A garbage-collection delivery to one endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GcAction {
    /// No importer can reach these exports any more; the exporter may drop its strong hold.
    DropExports(Vec<KObjectId>),
    /// No importer can even recognise these exports: the kernel has forgotten them (after this
    /// delivery) and so may the exporter.
    RetireExports(Vec<KObjectId>),
    /// The exporter of these imports is gone and no one can reach them: forget them (the kernel
    /// removes them from the endpoint's c-list after this delivery).
    RetireImports(Vec<KObjectId>),
    /// Drop every import you no longer use (`dropImports`, `retireImports`).
    BringOutYourDead,
}

impl GcAction {
    /// The action's name, as the syscall/delivery is called in DESIGN §2.
    pub fn name(&self) -> &'static str {
        match self {
            GcAction::DropExports(_) => "dropExports",
            GcAction::RetireExports(_) => "retireExports",
            GcAction::RetireImports(_) => "retireImports",
            GcAction::BringOutYourDead => "bringOutYourDead",
        }
    }

    /// The objects it names.
    pub fn objects(&self) -> &[KObjectId] {
        match self {
            GcAction::DropExports(o) | GcAction::RetireExports(o) | GcAction::RetireImports(o) => o,
            GcAction::BringOutYourDead => &[],
        }
    }
}

/// Count the references a message holds: its target, every slot of its arguments, its result.
pub(crate) fn add_message_refs(db: &mut KernelTxn<'_>, target: KRef, m: &Message) -> Result<(), KernelError> {
    db.incref(target, true)?;
    add_data_refs(db, &m.args)?;
    if let Some(r) = m.result {
        db.incref(KRef::Promise(r), true)?;
    }
    Ok(())
}

/// Release the references a message held (it was delivered, rejected or dropped).
pub(crate) fn remove_message_refs(db: &mut KernelTxn<'_>, target: KRef, m: &Message) -> Result<(), KernelError> {
    db.decref(target, true)?;
    remove_data_refs(db, &m.args)?;
    if let Some(r) = m.result {
        db.decref(KRef::Promise(r), true)?;
    }
    Ok(())
}

/// Count the references held by data (settlement data, arguments).
pub(crate) fn add_data_refs(db: &mut KernelTxn<'_>, d: &CapData) -> Result<(), KernelError> {
    for s in &d.slots {
        db.incref(*s, true)?;
    }
    Ok(())
}

/// Release the references held by data.
pub(crate) fn remove_data_refs(db: &mut KernelTxn<'_>, d: &CapData) -> Result<(), KernelError> {
    for s in &d.slots {
        db.decref(*s, true)?;
    }
    Ok(())
}

/// The endpoints whose c-list holds `o` (called once its exporter no longer does: each of them
/// imports it, the exporter too if it was handed back an object it abandoned).
pub(crate) fn recognizers(db: &KernelTxn<'_>, o: KObjectId) -> Result<Vec<EndpointId>, KernelError> {
    let mut out = Vec::new();
    for ep in (1..db.counters.next_endpoint).map(EndpointId) {
        // A terminated endpoint's c-list is empty; its status is cached, its c-list rows not.
        if db.is_live(ep)? && db.clist_entry(ep, KRef::Object(o))?.is_some() {
            out.push(ep);
        }
    }
    Ok(out)
}

/// Look at every kref whose count fell to zero in this transaction: delete unreferenced
/// promises, and queue the GC deliveries unreferenced objects call for (coalesced per endpoint
/// and action, in a deterministic order, after the crank's other outputs).
pub(crate) fn collect(w: &mut Work<'_>) -> Result<(), KernelError> {
    let mut actions: BTreeMap<(EndpointId, u8), Vec<KObjectId>> = BTreeMap::new();
    while let Some(kref) = w.db.maybe_free.pop() {
        match kref {
            KRef::Promise(p) => {
                if !w.db.with_promise(p, |r| r.is_some_and(|r| r.refs == 0 && !r.pinned))? {
                    continue;
                }
                let Some(rec) = w.db.take_promise(p)? else { continue };
                if let PromiseState::Settled(s) = rec.state {
                    remove_data_refs(&mut w.db, s.data())?;
                }
            }
            KRef::Object(o) => {
                let Some(rec) = w.db.object(o)? else { continue };
                if rec.pinned || rec.reachable > 0 {
                    continue;
                }
                if !rec.abandoned && w.db.is_live(rec.owner)? {
                    if let Some(entry) = w.db.clist_entry(rec.owner, kref)? {
                        if entry.reachable {
                            // The exporter's own flag: clearing it changes no count.
                            w.db.clist_set_reachable(rec.owner, kref, false)?;
                            actions.entry((rec.owner, 0)).or_default().push(o);
                        }
                    }
                    if rec.recognizable == 0 {
                        actions.entry((rec.owner, 1)).or_default().push(o);
                    }
                } else if rec.recognizable == 0 {
                    w.db.delete_object(o);
                } else {
                    for ep in recognizers(&w.db, o)? {
                        actions.entry((ep, 2)).or_default().push(o);
                    }
                }
            }
        }
    }
    for ((endpoint, kind), mut objects) in actions {
        objects.sort_unstable();
        objects.dedup();
        let action = match kind {
            0 => GcAction::DropExports(objects),
            1 => GcAction::RetireExports(objects),
            _ => GcAction::RetireImports(objects),
        };
        w.buf.outputs.push(RunQueueItem::Gc { endpoint, action });
    }
    Ok(())
}

/// Before a GC delivery: keep only the objects the action still applies to (the state may have
/// changed since it was queued).
pub(crate) fn still_applies(db: &KernelTxn<'_>, ep: EndpointId, action: GcAction) -> Result<Option<GcAction>, KernelError> {
    let mut keep = Vec::new();
    for &o in action.objects() {
        let rec = db.object(o)?;
        let ok = match (&action, rec) {
            // An export abandoned since (the endpoint's entry is gone) is no longer the
            // endpoint's business.
            (GcAction::DropExports(_), Some(r)) => r.owner == ep && r.reachable == 0 && !r.pinned && !r.abandoned,
            (GcAction::RetireExports(_), Some(r)) => r.owner == ep && r.reachable == 0 && r.recognizable == 0 && !r.pinned && !r.abandoned,
            (GcAction::RetireImports(_), _) => db.clist_entry(ep, KRef::Object(o))?.is_some_and(|e| !e.reachable),
            _ => false,
        };
        if ok {
            keep.push(o);
        }
    }
    Ok(match action {
        GcAction::BringOutYourDead => Some(GcAction::BringOutYourDead),
        _ if keep.is_empty() => None,
        GcAction::DropExports(_) => Some(GcAction::DropExports(keep)),
        GcAction::RetireExports(_) => Some(GcAction::RetireExports(keep)),
        GcAction::RetireImports(_) => Some(GcAction::RetireImports(keep)),
    })
}

/// After a GC delivery committed its effects: the kernel forgets what was retired.
pub(crate) fn after_delivery(db: &mut KernelTxn<'_>, ep: EndpointId, action: &GcAction) -> Result<(), KernelError> {
    match action {
        GcAction::RetireExports(objects) => {
            for &o in objects {
                // An export the endpoint sent again during this very delivery is alive again.
                if db.object(o)?.is_some_and(|r| r.reachable > 0 || r.recognizable > 0) {
                    continue;
                }
                db.clist_remove(ep, KRef::Object(o))?;
                db.delete_object(o);
            }
        }
        GcAction::RetireImports(objects) => {
            for &o in objects {
                db.clist_remove(ep, KRef::Object(o))?;
            }
        }
        GcAction::DropExports(_) | GcAction::BringOutYourDead => {}
    }
    Ok(())
}
