//! What a crank asks of the store: the batches it writes and the reads it makes. A durable store
//! pays for every key it is handed (a tombstone is a write like any other) and for every read
//! that misses its caches, so the kernel hands it no delete of a key it never held and does not
//! look up c-list entries it knows cannot exist.

use kernel_core::{
    CapData, CrankContext, Endpoint, Fault, KRef, Kernel, KernelDelivery, MemStore, Settlement, Store, StoreError, VRef, WriteBatch,
};
use std::cell::RefCell;
use std::rc::Rc;

/// What the kernel asked of a [`Recording`] store.
#[derive(Default)]
struct Traffic {
    /// Deletes of keys the store did not hold, with the number of their batch.
    deletes_of_absent: Vec<(Vec<u8>, u64)>,
    /// Point reads of c-list keys (`l/…`) the store did not hold.
    clist_misses: Vec<Vec<u8>>,
    batches: u64,
}

/// A MemStore that records its traffic.
struct Recording {
    inner: MemStore,
    traffic: Rc<RefCell<Traffic>>,
}

impl Store for Recording {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.inner.get(key)?;
        if v.is_none() && key.starts_with(b"l/") {
            self.traffic.borrow_mut().clist_misses.push(key.to_vec());
        }
        Ok(v)
    }
    fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.inner.next(prefix, after)
    }
    fn apply(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut t = self.traffic.borrow_mut();
        t.batches += 1;
        for (k, v) in &batch {
            if v.is_none() && self.inner.get(k)?.is_none() {
                let n = t.batches;
                t.deletes_of_absent.push((k.clone(), n));
            }
        }
        drop(t);
        self.inner.apply(batch)
    }
}

/// Answers each ping (resolving its result in the crank that imported it) and pings its peer
/// back with a fresh result promise it exports and lets go of in the same crank.
struct Player {
    peer: Option<KRef>,
    next_promise: u64,
}

impl Endpoint for Player {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let KernelDelivery::Message { target, message } = d else { return Ok(()) };
        let fail = |e: kernel_core::SyscallError| Fault::VatError(e.to_string());
        if let Some(r) = message.result {
            ctx.import(KRef::Promise(r)).map_err(fail)?;
            ctx.resolve(vec![(r, Settlement::Fulfilled(CapData::plain("1")))]).map_err(fail)?;
        }
        let peer = match self.peer {
            Some(p) => p,
            None => *message.args.slots.first().ok_or_else(|| Fault::VatError("no peer".into()))?,
        };
        self.peer = Some(peer);
        self.next_promise += 1;
        let kp = ctx.export(VRef::local_promise(self.next_promise)).map_err(fail)?;
        ctx.send(peer, "ping".into(), CapData::reference(target.into()), kp.as_promise()).map_err(fail)?;
        ctx.drop_imports(&[kp]).map_err(fail)?;
        Ok(())
    }
}

fn rally(cranks: u64) -> Traffic {
    let traffic = Rc::new(RefCell::new(Traffic::default()));
    let store = Recording { inner: MemStore::new(), traffic: traffic.clone() };
    let mut k = Kernel::open(store).expect("open");
    let a = k.add_endpoint("a", Box::new(Player { peer: None, next_promise: 0 })).expect("add a");
    let b = k.add_endpoint("b", Box::new(Player { peer: None, next_promise: 0 })).expect("add b");
    let (ra, rb) = (k.root(a).expect("root a"), k.root(b).expect("root b"));
    k.queue_message(ra.into(), "ping", CapData::reference(rb.into())).expect("queue");
    let summary = k.run(Some(cranks)).expect("run");
    assert_eq!((summary.cranks, summary.aborted), (cranks, 0));
    // The rally really did make and drop c-list entries every crank: the tables stay small.
    assert!(k.store().inner.len() < 100, "store grew to {} keys", k.store().inner.len());
    drop(k);
    Rc::try_unwrap(traffic).ok().expect("the kernel is gone").into_inner()
}

#[test]
fn c_list_entries_made_and_dropped_within_a_crank_put_no_delete_in_its_batch() {
    let t = rally(200);
    assert!(t.batches >= 200);
    let shown: Vec<String> = t.deletes_of_absent.iter().take(5).map(|(k, n)| format!("{} in batch {n}", k.escape_ascii())).collect();
    assert!(t.deletes_of_absent.is_empty(), "{} deletes of keys never held, e.g. {shown:?}", t.deletes_of_absent.len());
}

#[test]
fn importing_a_promise_allocated_by_an_earlier_crank_reads_no_c_list_key_from_the_store() {
    let t = rally(200);
    let shown: Vec<String> = t.clist_misses.iter().take(5).map(|k| k.escape_ascii().to_string()).collect();
    assert!(t.clist_misses.is_empty(), "{} c-list reads missed the store, e.g. {shown:?}", t.clist_misses.len());
}
