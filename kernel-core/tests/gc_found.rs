//! Garbage-collection bugs the model test (`model.rs`) found, each pinned by its minimal
//! sequence at the kref level.

use kernel_core::{CapData, CrankContext, Endpoint, Fault, KRef, Kernel, KernelDelivery, MemStore, Settlement, SyscallError, VRef};
use std::cell::RefCell;
use std::rc::Rc;

fn fault(e: SyscallError) -> Fault {
    Fault::VatError(e.to_string())
}

/// A vat driven by method names. Every delivery first imports what the message carries, as a
/// vat's translation would. `give(to)`: export `o+1` and send it to `to.hold`; `return(to)`:
/// send its first import (`o-1`) to `to.take`; `abandon`: abandon `o+1`; `forget`: drop and
/// retire every object import it still reaches; `answer`: fulfil the result.
struct Vat;

impl Endpoint for Vat {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
        for s in &message.args.slots {
            ctx.import(*s).map_err(fault)?;
        }
        if let Some(kp) = message.result {
            ctx.import(KRef::Promise(kp)).map_err(fault)?;
        }
        let first_arg = || message.args.slots.first().copied().ok_or_else(|| Fault::VatError("no argument".into()));
        match message.method.as_str() {
            "give" => {
                let thing = ctx.export(VRef::export(1)).map_err(fault)?;
                ctx.send(first_arg()?, "hold".into(), CapData { body: b"[]".to_vec(), slots: vec![thing] }, None).map_err(fault)?;
            }
            "return" => {
                let thing = ctx.export(VRef::import(1)).map_err(fault)?;
                ctx.send(first_arg()?, "take".into(), CapData { body: b"[]".to_vec(), slots: vec![thing] }, None).map_err(fault)?;
            }
            "abandon" => {
                let thing = ctx.lookup(VRef::export(1)).map_err(fault)?.ok_or_else(|| Fault::VatError("no o+1".into()))?;
                ctx.abandon_exports(&[thing]).map_err(fault)?;
            }
            "forget" => {
                let mut objects = Vec::new();
                for v in ctx.held_imports().map_err(fault)? {
                    if !v.is_promise() {
                        objects.extend(ctx.lookup(v).map_err(fault)?);
                    }
                }
                ctx.drop_imports(&objects).map_err(fault)?;
                ctx.retire_imports(&objects).map_err(fault)?;
            }
            "answer" => {
                if let Some(kp) = message.result {
                    ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain("ok")))]).map_err(fault)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn args(slots: &[KRef]) -> CapData {
    CapData { body: b"[]".to_vec(), slots: slots.to_vec() }
}

/// A host watcher on a promise the host does not pin: the crank that settles the promise also
/// collects it (its resolver forgets it, nothing else refers to it). The watcher must still run,
/// with the settlement, after the commit; it used to be dropped silently, the kernel looking the
/// settlement up after the promise had gone.
#[test]
fn a_watcher_runs_even_if_its_promise_is_collected_by_the_crank_that_settles_it() {
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let v = k.add_endpoint("v", Box::new(Vat)).expect("add");
    let root = k.root(v).expect("root");
    let kp = k.queue_message(root.into(), "answer", CapData::plain("[]")).expect("queue");
    k.set_pinned(kp.into(), false).expect("unpin");
    let seen = Rc::new(RefCell::new(Vec::new()));
    let log = Rc::clone(&seen);
    k.watch(kp, move |kp, s| log.borrow_mut().push((kp, s.clone()))).expect("watch");
    assert!(k.run(None).expect("run").quiescent);
    assert!(k.promise(kp).expect("read").is_none(), "collected in the crank that settled it");
    assert_eq!(*seen.borrow(), vec![(kp, Settlement::Fulfilled(CapData::plain("ok")))]);
}

/// A vat abandons an export; an importer hands it back; the vat now holds its own abandoned
/// object as an import (`o-N`). That entry must count like any import: the kernel used to treat
/// it as the exporter's own (uncounted) entry, so once the other importer dropped and retired
/// it the object was deleted while the vat could still reach it, and could pass the deleted kref
/// on to others.
#[test]
fn an_abandoned_object_handed_back_to_its_owner_is_counted_as_its_import() {
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let a = k.add_endpoint("a", Box::new(Vat)).expect("add");
    let b = k.add_endpoint("b", Box::new(Vat)).expect("add");
    let (ra, rb): (KRef, KRef) = (k.root(a).expect("root").into(), k.root(b).expect("root").into());
    let call = |k: &mut Kernel<MemStore>, to: KRef, method: &str, slots: &[KRef]| {
        let kp = k.queue_message(to, method, args(slots)).expect("queue");
        k.set_pinned(kp.into(), false).expect("unpin");
        assert!(k.run(None).expect("run").quiescent);
    };
    call(&mut k, ra, "give", &[rb]); // b holds a's o+1
    let thing = k.clist(b).expect("clist").into_iter().find(|(_, v)| *v == VRef::import(1)).expect("b's o-1").0;
    call(&mut k, ra, "abandon", &[]);
    call(&mut k, rb, "return", &[ra]); // a imports its own abandoned object
    assert!(k.clist(a).expect("clist").iter().any(|(kref, v)| *kref == thing && *v != VRef::export(1)), "a holds it as an import");
    call(&mut k, rb, "forget", &[]); // b drops and retires it: a's import still keeps it
    let rec = k.object(thing.as_object().expect("an object")).expect("read").expect("a still reaches it, so it exists");
    assert_eq!((rec.reachable, rec.recognizable, rec.abandoned), (1, 1, true));
    call(&mut k, ra, "forget", &[]); // now no one holds it
    assert_eq!(k.object(thing.as_object().expect("an object")).expect("read"), None);
    assert!(k.clist(a).expect("clist").iter().all(|(kref, _)| *kref != thing));
}
