//! [`SimStore`]: an in-memory store that can crash. It keeps a durable snapshot beside the live
//! state; `Sync` makes every batch durable at once, `Group` only when enough batches wait, when
//! the oldest has waited long enough on the virtual clock, or when the simulation says so. A
//! crash keeps only the durable snapshot.

use crate::durable::DurableStore;
use kernel_core::{Entry, MemStore, Store, StoreError, WriteBatch};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// The simulation's virtual clock; clones share one time.
#[derive(Debug, Clone, Default)]
pub struct SimClock(Rc<Cell<Duration>>);

impl SimClock {
    /// A clock at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The time now.
    pub fn now(&self) -> Duration {
        self.0.get()
    }

    /// Move to `t` (never backwards).
    pub fn set(&self, t: Duration) {
        if t > self.0.get() {
            self.0.set(t);
        }
    }
}

/// When a [`SimStore`]'s batches become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimDurability {
    /// Every batch is durable when applied.
    Sync,
    /// Group commit: durable once `max_batches` wait or the oldest has waited `max_delay`.
    Group {
        /// Batches per sync.
        max_batches: usize,
        /// The longest a batch waits.
        max_delay: Duration,
        /// Whether the node's early sync ([`DurableStore::flush_now`], asked for when it is
        /// idle with output waiting for durability) syncs; some seeds run without, so the
        /// group windows stay wide open to crashes.
        early: bool,
    },
}

#[derive(Debug, Clone, Default)]
struct Disk {
    durable: MemStore,
    pending: Vec<WriteBatch>,
    applied: u64,
    durable_count: u64,
    oldest_pending: Option<Duration>,
}

impl Disk {
    fn sync(&mut self) {
        for b in self.pending.drain(..) {
            // MemStore's apply cannot fail.
            let _ = self.durable.apply(b);
        }
        self.durable_count = self.applied;
        self.oldest_pending = None;
    }
}

/// An in-memory store with a durable snapshot, for crash simulation.
#[derive(Debug)]
pub struct SimStore {
    live: MemStore,
    disk: RefCell<Disk>,
    mode: SimDurability,
    clock: SimClock,
}

impl SimStore {
    /// An empty store.
    pub fn new(mode: SimDurability, clock: SimClock) -> Self {
        SimStore { live: MemStore::new(), disk: RefCell::new(Disk::default()), mode, clock }
    }

    /// The store after a crash: only what was durable.
    pub fn crash(self) -> SimStore {
        let mut disk = self.disk.into_inner();
        disk.pending.clear();
        disk.oldest_pending = None;
        disk.applied = disk.durable_count;
        SimStore { live: disk.durable.clone(), disk: RefCell::new(disk), mode: self.mode, clock: self.clock }
    }

    /// Make everything applied durable now (an fsync).
    pub fn sync(&self) {
        self.disk.borrow_mut().sync();
    }

    /// The durable value at `key`.
    pub fn durable_get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.disk.borrow().durable.get(key).ok().flatten()
    }

    /// The live state.
    pub fn live(&self) -> &MemStore {
        &self.live
    }
}

impl Store for SimStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.live.get(key)
    }

    fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<Entry>, StoreError> {
        self.live.next(prefix, after)
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        let disk = self.disk.get_mut();
        disk.applied += 1;
        match self.mode {
            SimDurability::Sync => {
                disk.durable.apply(batch.clone())?;
                disk.durable_count = disk.applied;
            }
            SimDurability::Group { max_batches, .. } => {
                disk.pending.push(batch.clone());
                if disk.oldest_pending.is_none() {
                    disk.oldest_pending = Some(self.clock.now());
                }
                if disk.pending.len() >= max_batches {
                    disk.sync();
                }
            }
        }
        self.live.apply(batch)
    }
}

impl DurableStore for SimStore {
    fn applied_mark(&self) -> u64 {
        self.disk.borrow().applied
    }

    fn durable_mark(&self) -> u64 {
        self.disk.borrow().durable_count
    }

    fn flush_due(&self) -> Result<(), StoreError> {
        if let SimDurability::Group { max_delay, .. } = self.mode {
            let mut disk = self.disk.borrow_mut();
            if disk.oldest_pending.is_some_and(|t| self.clock.now() >= t + max_delay) {
                disk.sync();
            }
        }
        Ok(())
    }

    fn flush_now(&self) -> Result<bool, StoreError> {
        let mut disk = self.disk.borrow_mut();
        match self.mode {
            SimDurability::Group { early: true, .. } if !disk.pending.is_empty() => {
                disk.sync();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn flush_deadline(&self) -> Option<Duration> {
        match self.mode {
            SimDurability::Group { max_delay, .. } => self.disk.borrow().oldest_pending.map(|t| t + max_delay),
            SimDurability::Sync => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> WriteBatch {
        vec![(k.as_bytes().to_vec(), Some(b"v".to_vec()))]
    }

    #[test]
    fn a_crash_keeps_only_what_was_durable() {
        let clock = SimClock::new();
        let mut s =
            SimStore::new(SimDurability::Group { max_batches: 2, max_delay: Duration::from_millis(5), early: false }, clock.clone());
        s.apply(put("a")).expect("apply");
        assert_eq!((s.applied_mark(), s.durable_mark()), (1, 0));
        s.apply(put("b")).expect("apply");
        assert_eq!(s.durable_mark(), 2, "the second batch fills the group");
        s.apply(put("c")).expect("apply");
        clock.set(Duration::from_millis(5));
        s.flush_due().expect("flush");
        assert_eq!(s.durable_mark(), 3, "the delay ran out");
        s.apply(put("d")).expect("apply");
        let s = s.crash();
        assert_eq!(s.get(b"c").expect("get"), Some(b"v".to_vec()));
        assert_eq!(s.get(b"d").expect("get"), None);
        assert_eq!((s.applied_mark(), s.durable_mark()), (3, 3));
    }
}
