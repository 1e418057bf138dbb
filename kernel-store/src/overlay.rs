//! What the store keeps in memory in front of the engine: the writes of every batch applied
//! since the last checkpoint (the write-ahead log holds them on disk; the engine takes them as
//! one atomic batch at the next checkpoint), and a bounded cache of what the engine holds, so
//! the kernel's hot records (endpoints, roots, counters) are not looked up in the LSM tree on
//! every crank.
//!
//! Both are hash maps: the kernel's reads are point reads, and batches are merged by key as
//! they arrive (a key written by many cranks is held, and written to the engine, once; a key
//! created and deleted again leaves, see [`Overlay::hold`]). Prefix scans, rare during cranks,
//! need the pending keys in order: that index is built at a scan and kept up to date while scans
//! keep reading it, so writes without scans never pay for ordering.

use kernel_core::{StoreError, WriteBatch};
use std::collections::BTreeSet;

/// Hash maps keyed by byte strings (see the workspace's note on aHash).
type HashMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
use std::ops::Bound;

/// A pending write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Slot {
    /// `None` is a delete.
    pub value: Option<Vec<u8>>,
    /// The first write since the last checkpoint set the key: a key created since, if the
    /// engine did not hold it before. Such a key deleted again (a run-queue entry queued and
    /// delivered) need not reach the engine at all, once the engine is seen not to hold it.
    pub created: bool,
}

/// The pending writes of a checkpoint, in key order: what goes to the engine.
pub(crate) type Pending = Vec<(Vec<u8>, Slot)>;

/// The in-memory state in front of the engine.
#[derive(Debug)]
pub(crate) struct Overlay {
    /// Written by applied batches, not yet in the engine: `None` is a delete.
    pending: HashMap<Vec<u8>, Slot>,
    /// The keys of `pending` in order, once a scan needed them (until a checkpoint, or until
    /// `unread_changes` says nobody reads them).
    ordered: Option<BTreeSet<Vec<u8>>>,
    /// Changes made to `ordered` since the last scan: past the size of the overlay, the order
    /// is dropped (the next scan sorts again), so a scan now and then (opening a kernel, adding
    /// a peer) does not leave every later write paying for an order nobody reads.
    unread_changes: usize,
    /// What the engine holds at some keys (`None`: absent). Always coherent: every write to the
    /// engine updates it.
    clean: HashMap<Vec<u8>, Option<Vec<u8>>>,
    clean_limit: usize,
    /// Set when a checkpoint or a log write failed: the store then refuses
    /// everything rather than serve a state older than the one the kernel saw.
    pub failed: Option<String>,
}

impl Overlay {
    /// An empty overlay whose cache holds at most `clean_limit` keys.
    pub fn new(clean_limit: usize) -> Self {
        Overlay { pending: HashMap::default(), ordered: None, unread_changes: 0, clean: HashMap::default(), clean_limit, failed: None }
    }

    /// Refuse if an earlier checkpoint or log write failed.
    pub fn check(&self) -> Result<(), StoreError> {
        match &self.failed {
            None => Ok(()),
            Some(why) => Err(StoreError::new(format!("the store failed earlier and must be reopened: {why}"))),
        }
    }

    /// What the store holds at `key`, if known without asking the engine: `Some(None)` is
    /// known-absent.
    pub fn lookup(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        match self.pending.get(key) {
            Some(slot) => Some(slot.value.clone()),
            None => self.clean.get(key).cloned(),
        }
    }

    /// The engine holds `value` at `key` (read from it or just written to it).
    pub fn remember(&mut self, key: &[u8], value: Option<&[u8]>) {
        if self.clean_limit == 0 {
            return;
        }
        if let Some(v) = self.clean.get_mut(key) {
            *v = value.map(<[u8]>::to_vec);
            return;
        }
        self.make_room();
        self.clean.insert(key.to_vec(), value.map(<[u8]>::to_vec));
    }

    fn make_room(&mut self) {
        if self.clean.len() >= self.clean_limit {
            // Crude but cheap: start over. The hot records come straight back.
            self.clean.clear();
        }
    }

    /// True if no batch waits to be written.
    pub fn nothing_pending(&self) -> bool {
        self.pending.is_empty()
    }

    /// Hold `batch` until the next checkpoint; reads see it from now on. A key created since the
    /// last checkpoint and now deleted is dropped from the overlay at once if the engine does not
    /// hold it (`in_engine`, asked only then; the cache answers first): it is as if it had never
    /// been written, so the overlay holds what is live plus the engine's keys to delete, not every
    /// key the kernel ever used, and the checkpoint writes no tombstone for it.
    pub fn hold(&mut self, batch: WriteBatch, mut in_engine: impl FnMut(&[u8]) -> bool) {
        for (k, v) in batch {
            match self.pending.entry(k) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let gone = v.is_none() && e.get().created && {
                        let k = e.key();
                        match self.clean.get(k) {
                            Some(cached) => cached.is_none(),
                            None => !in_engine(k),
                        }
                    };
                    if gone {
                        let (k, _) = e.remove_entry();
                        if self.ordered.as_mut().is_some_and(|ordered| ordered.remove(&k)) {
                            self.order_changed();
                        }
                    } else {
                        e.get_mut().value = v;
                    }
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    let ordered = self.ordered.as_mut().is_some_and(|ordered| ordered.insert(e.key().clone()));
                    let created = v.is_some();
                    e.insert(Slot { value: v, created });
                    if ordered {
                        self.order_changed();
                    }
                }
            }
        }
    }

    /// One more change to the scan order since a scan last read it: past the overlay's size
    /// (and 1,024), drop the order; the next scan sorts again.
    fn order_changed(&mut self) {
        self.unread_changes += 1;
        if self.unread_changes > self.pending.len().max(1024) {
            self.ordered = None;
            self.unread_changes = 0;
        }
    }

    /// Every pending write, in key order, leaving none pending: the checkpoint to write. Pass it
    /// back to [`Overlay::written`] once the engine holds it.
    pub fn take_pending(&mut self) -> Pending {
        self.ordered = None;
        self.unread_changes = 0;
        let mut out: Pending = self.pending.drain().collect();
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The engine now holds `written` (taken by [`Overlay::take_pending`]): a key the cache
    /// holds takes its new value, a deleted one leaves the cache (most are run-queue entries and
    /// promises, whose keys are never used again), and a key it does not hold stays out. The
    /// kernel keeps its hot records itself, so most of a checkpoint's keys are never read back from
    /// the store; caching them all (an outbox entry, a settled promise…) cost a remote node
    /// under load 14% of its time in hash-map inserts and whole-cache clears, and 25% of its
    /// throughput. A key read back is cached by [`Overlay::remember`].
    pub fn written(&mut self, written: Pending) {
        if self.clean_limit == 0 {
            return;
        }
        for (k, slot) in written {
            match slot.value {
                Some(v) => {
                    if let Some(cached) = self.clean.get_mut(&k) {
                        *cached = Some(v);
                    }
                }
                None => {
                    self.clean.remove(&k);
                }
            }
        }
    }

    /// Every pending write, in no particular order.
    pub fn pending(&self) -> impl Iterator<Item = (&Vec<u8>, &Option<Vec<u8>>)> {
        self.pending.iter().map(|(k, slot)| (k, &slot.value))
    }

    /// The first pending entry with `prefix` after `after` (deletes included).
    pub fn pending_next(&mut self, prefix: &[u8], after: Option<&[u8]>) -> Option<(&Vec<u8>, &Option<Vec<u8>>)> {
        let pending = &self.pending;
        self.unread_changes = 0;
        let ordered = self.ordered.get_or_insert_with(|| pending.keys().cloned().collect());
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Included(prefix),
        };
        let key = ordered.range::<[u8], _>((lower, Bound::Unbounded)).next().filter(|k| k.starts_with(prefix))?;
        pending.get_key_value(key.as_slice()).map(|(k, slot)| (k, &slot.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_writes_shadow_the_cache() {
        let mut o = Overlay::new(2);
        o.remember(b"a", Some(b"1"));
        o.remember(b"b", None);
        assert_eq!(o.lookup(b"a"), Some(Some(b"1".to_vec())));
        assert_eq!(o.lookup(b"b"), Some(None));
        assert_eq!(o.lookup(b"c"), None);
        o.hold(vec![(b"a".to_vec(), None)], |_| false);
        assert_eq!(o.lookup(b"a"), Some(None));
        // A third key overflows the cache, which starts over.
        o.remember(b"c", Some(b"3"));
        assert_eq!(o.lookup(b"b"), None);
        assert_eq!(o.lookup(b"c"), Some(Some(b"3".to_vec())));
    }

    #[test]
    fn written_groups_keep_the_cache_true() {
        let mut o = Overlay::new(8);
        o.remember(b"a", Some(b"1"));
        o.hold(vec![(b"b".to_vec(), Some(b"2".to_vec())), (b"a".to_vec(), Some(b"0".to_vec()))], |_| false);
        o.hold(vec![(b"a".to_vec(), None)], |_| false);
        let group = o.take_pending();
        let slot = |value: Option<&[u8]>, created| Slot { value: value.map(<[u8]>::to_vec), created };
        assert_eq!(group, vec![(b"a".to_vec(), slot(None, true)), (b"b".to_vec(), slot(Some(b"2"), true))]);
        assert!(o.nothing_pending());
        // Until the engine has it, the cache still says what the engine held before.
        assert_eq!(o.lookup(b"a"), Some(Some(b"1".to_vec())));
        o.written(group);
        // A deleted key is no longer cached: the engine is asked (and knows it is absent); a key
        // the cache did not hold stays out until it is read.
        assert_eq!(o.lookup(b"a"), None);
        assert_eq!(o.lookup(b"b"), None);
        o.remember(b"b", Some(b"2"));
        o.hold(vec![(b"b".to_vec(), Some(b"3".to_vec()))], |_| false);
        let group = o.take_pending();
        o.written(group);
        assert_eq!(o.lookup(b"b"), Some(Some(b"3".to_vec())), "a cached key takes its new value");
    }

    #[test]
    fn a_key_created_and_deleted_leaves_no_trace_unless_the_engine_holds_it() {
        let mut o = Overlay::new(8);
        o.remember(b"cached-absent", None);
        let set = |k: &str| (k.as_bytes().to_vec(), Some(b"v".to_vec()));
        let del = |k: &str| (k.as_bytes().to_vec(), None);
        o.hold(vec![set("new"), set("old"), set("cached-absent")], |_| panic!("asked before any delete"));
        let _ = o.pending_next(b"", None); // build the scan order too
        let mut asked = Vec::new();
        o.hold(vec![del("new"), del("old"), del("cached-absent")], |k| {
            asked.push(k.to_vec());
            k == b"old"
        });
        assert_eq!(asked, vec![b"new".to_vec(), b"old".to_vec()], "the cache answers for the key it knows");
        // Only the engine's key is left to delete, in the map and in the scan order.
        assert_eq!(o.take_pending(), vec![(b"old".to_vec(), Slot { value: None, created: true })]);
        let mut o = Overlay::new(0);
        o.hold(vec![set("k")], |_| false);
        let _ = o.pending_next(b"", None);
        o.hold(vec![del("k")], |_| false);
        assert_eq!(o.pending_next(b"", None), None);
        // A key whose first write was a delete keeps its tombstone without asking.
        o.hold(vec![del("d"), set("d"), del("d")], |_| panic!("not created here"));
        assert_eq!(o.take_pending(), vec![(b"d".to_vec(), Slot { value: None, created: false })]);
    }

    #[test]
    fn an_order_no_scan_reads_is_dropped_and_rebuilt_when_needed() {
        let mut o = Overlay::new(0);
        o.hold(vec![(b"a".to_vec(), Some(vec![]))], |_| false);
        assert!(o.pending_next(b"", None).is_some());
        assert!(o.ordered.is_some());
        // Keys come and go (a run queue, an outbox): each created and deleted again, two
        // changes to the order.
        let churn = |o: &mut Overlay, range: std::ops::Range<u32>| {
            for i in range {
                let k = format!("t{i:05}").into_bytes();
                o.hold(vec![(k.clone(), Some(vec![])), (k, None)], |_| false);
            }
        };
        churn(&mut o, 0..500);
        assert!(o.ordered.is_some(), "1,000 changes: not yet past 1,024");
        churn(&mut o, 500..513);
        assert!(o.ordered.is_none(), "1,026 changes since the last scan");
        o.hold(vec![(b"k1".to_vec(), Some(vec![])), (b"k2".to_vec(), Some(vec![]))], |_| false);
        // The next scan sorts again and sees every key.
        assert_eq!(o.pending_next(b"k", Some(b"k1")).map(|e| e.0.clone()), Some(b"k2".to_vec()));
        assert_eq!(o.pending_next(b"t", None), None);
    }

    #[test]
    fn pending_scans_stay_in_their_prefix() {
        let mut o = Overlay::new(0);
        o.hold(["p/2", "q/1", "p/1"].iter().map(|k| (k.as_bytes().to_vec(), Some(vec![]))).collect(), |_| false);
        assert_eq!(o.pending_next(b"p/", None).map(|e| e.0.clone()), Some(b"p/1".to_vec()));
        // Keys held after the first scan join the order.
        o.hold(vec![(b"p/15".to_vec(), None)], |_| false);
        assert_eq!(o.pending_next(b"p/", Some(b"p/1")).map(|e| e.0.clone()), Some(b"p/15".to_vec()));
        assert_eq!(o.pending_next(b"p/", Some(b"p/15")).map(|e| e.0.clone()), Some(b"p/2".to_vec()));
        assert_eq!(o.pending_next(b"p/", Some(b"p/2")), None);
    }
}
