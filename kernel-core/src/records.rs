//! Decoded records, so a crank neither decodes nor encodes the same record twice.
//!
//! [`Records`] holds, per hot table, records by key (`None`: known to be absent). A
//! transaction has three: what it wrote (`dirty`, encoded once into its batch when it ends),
//! what it read from the store (`fetched`), and the kernel's [`Records`] of committed state,
//! shared read-only. After a commit the kernel folds the fetched and written records into its
//! committed cache, so the next crank finds the records it needs already decoded. The kernel is
//! the store's only writer, so the cache never goes stale; it is cleared when it grows past a
//! bound.

use crate::ids::{EndpointId, KObjectId, KPromiseId, KRef, VRef};
use crate::message::RunQueueItem;
use crate::tables::{ClistCounters, ClistEntry, EndpointStatus, ObjectRecord, PromiseRecord};
use std::collections::{HashMap as StdHashMap, HashSet as StdHashSet};
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// Hash maps keyed by the kernel's own small ids, with [`IdHasher`].
pub(crate) type HashMap<K, V> = StdHashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Hash sets of the kernel's own small ids, with [`IdHasher`].
pub(crate) type HashSet<K> = StdHashSet<K, BuildHasherDefault<IdHasher>>;

/// A fast hasher for the kernel's ids (multiply-rotate, as `FxHash`, with a final mix so the
/// low bits a table indexes by depend on every input bit). The keys are the kernel's own
/// numbers, not chosen by an adversary.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^ (h >> 33)
    }
}

/// The record maps of a committed transaction, emptied by [`Records::absorb_commit`], for the
/// next transaction to fill: a crank then allocates no maps of its own. Boxed, so that moving
/// a transaction (into a delivery's context and out again) copies two pointers, not the maps.
/// Likewise the (emptied) lists a crank fills, so a crank grows none of its own.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    /// Becomes the next transaction's written records.
    pub dirty: Box<Records>,
    /// Becomes the next transaction's fetched records.
    pub fetched: Box<Records>,
    /// Becomes the next transaction's `maybe_free`.
    pub maybe_free: Vec<KRef>,
    /// Becomes the next crank's buffered outputs.
    pub outputs: Vec<RunQueueItem>,
    /// Becomes the next crank's settled promises.
    pub settled: Vec<KPromiseId>,
}

/// How many records the committed cache holds before it starts over.
const CACHE_BOUND: usize = 1 << 20;

/// Records of the hot tables, decoded.
#[derive(Debug, Default)]
pub(crate) struct Records {
    pub objects: HashMap<KObjectId, Option<ObjectRecord>>,
    pub promises: HashMap<KPromiseId, Option<PromiseRecord>>,
    pub clist: HashMap<(EndpointId, KRef), Option<ClistEntry>>,
    pub clist_rev: HashMap<(EndpointId, VRef), Option<KRef>>,
    pub status: HashMap<EndpointId, Option<EndpointStatus>>,
    pub clist_counters: HashMap<EndpointId, Option<ClistCounters>>,
    /// Krefs whose c-list entries are all in `clist`: allocated by a transaction whose entries
    /// this cache absorbed, and kept since. An endpoint with no entry here for such a kref holds
    /// none, so importing a new promise costs no store miss. Only the committed cache fills it
    /// ([`Records::absorb_commit`]); a transaction's maps leave it empty.
    pub complete: HashSet<KRef>,
}

impl Records {
    /// True if no map holds anything.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many records (and absences) the maps hold.
    pub fn len(&self) -> usize {
        self.objects.len()
            + self.promises.len()
            + self.clist.len()
            + self.clist_rev.len()
            + self.status.len()
            + self.clist_counters.len()
            + self.complete.len()
    }

    /// Fold in a committed transaction: what it read from the store, what it wrote, and the
    /// krefs it allocated (`born`), whose every c-list entry it wrote. `fetched` and `written`
    /// are left empty, their maps' room kept for the next transaction.
    pub fn absorb_commit(&mut self, fetched: &mut Records, written: &mut Records, born: impl IntoIterator<Item = KRef>) {
        self.absorb_fetched(fetched);
        self.absorb(written);
        for k in born {
            let gone = match k {
                KRef::Object(o) => !self.objects.contains_key(&o),
                KRef::Promise(p) => !self.promises.contains_key(&p),
            };
            if !gone {
                self.complete.insert(k);
            }
        }
    }

    /// True if `ep` holds no c-list entry for `kref` by what the cache knows for sure.
    pub fn surely_not_held(&self, ep: EndpointId, kref: KRef) -> bool {
        self.complete.contains(&kref) && !self.clist.contains_key(&(ep, kref))
    }

    fn clear(&mut self) {
        *self = Records::default();
    }

    /// Fold `newer` in, its records replacing these, and leave it empty. A deleted record leaves
    /// the cache rather than staying as a tombstone: ids are never reused, so a long-running
    /// kernel would otherwise fill the cache with the dead (memory growing with history, not
    /// with live state, until the bound clears it). Forgetting is always safe: the store
    /// answers.
    pub fn absorb(&mut self, newer: &mut Records) {
        fn merge<K: Hash + Eq, V>(into: &mut HashMap<K, Option<V>>, from: &mut HashMap<K, Option<V>>) {
            // Draining visits every bucket of a map's kept room, even an empty one's.
            if from.is_empty() {
                return;
            }
            for (k, v) in from.drain() {
                match v {
                    Some(v) => {
                        into.insert(k, Some(v));
                    }
                    None => {
                        into.remove(&k);
                    }
                }
            }
        }
        if self.len() + newer.len() > CACHE_BOUND {
            self.clear();
        }
        // A deleted object or promise has no c-list entries left to be complete about.
        if !self.complete.is_empty() {
            let deleted_objects = newer.objects.iter().filter(|(_, v)| v.is_none()).map(|(o, _)| KRef::Object(*o));
            let deleted_promises = newer.promises.iter().filter(|(_, v)| v.is_none()).map(|(p, _)| KRef::Promise(*p));
            for k in deleted_objects.chain(deleted_promises) {
                self.complete.remove(&k);
            }
        }
        merge(&mut self.objects, &mut newer.objects);
        merge(&mut self.promises, &mut newer.promises);
        merge(&mut self.clist, &mut newer.clist);
        merge(&mut self.clist_rev, &mut newer.clist_rev);
        merge(&mut self.status, &mut newer.status);
        merge(&mut self.clist_counters, &mut newer.clist_counters);
    }

    /// Fold in what a transaction read from the store, where this cache has nothing newer, and
    /// leave `fetched` empty. Absences are not kept (see [`Records::absorb`]): they are mostly
    /// ids looked up once.
    pub fn absorb_fetched(&mut self, fetched: &mut Records) {
        fn fill<K: Hash + Eq, V>(into: &mut HashMap<K, Option<V>>, from: &mut HashMap<K, Option<V>>) {
            if from.is_empty() {
                return;
            }
            for (k, v) in from.drain() {
                if v.is_some() {
                    into.entry(k).or_insert(v);
                }
            }
        }
        if self.len() + fetched.len() > CACHE_BOUND {
            self.clear();
        }
        fill(&mut self.objects, &mut fetched.objects);
        fill(&mut self.promises, &mut fetched.promises);
        fill(&mut self.clist, &mut fetched.clist);
        fill(&mut self.clist_rev, &mut fetched.clist_rev);
        fill(&mut self.status, &mut fetched.status);
        fill(&mut self.clist_counters, &mut fetched.clist_counters);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long-running kernel deletes records all the time; the committed cache must not keep
    /// them as tombstones (it would grow with history, not with live state).
    #[test]
    fn deleted_and_absent_records_leave_the_cache() {
        let mut cache = Records::default();
        let mut written = Records::default();
        written.objects.insert(KObjectId(1), Some(ObjectRecord::new(EndpointId(1), false)));
        cache.absorb(&mut written);
        assert_eq!(cache.len(), 1);
        let mut deleted = Records::default();
        deleted.objects.insert(KObjectId(1), None);
        deleted.promises.insert(KPromiseId(7), None);
        cache.absorb(&mut deleted);
        assert_eq!(cache.len(), 0);
        let mut fetched = Records::default();
        fetched.objects.insert(KObjectId(2), None);
        fetched.objects.insert(KObjectId(3), Some(ObjectRecord::new(EndpointId(1), false)));
        cache.absorb_fetched(&mut fetched);
        assert_eq!(cache.objects.keys().copied().collect::<Vec<_>>(), vec![KObjectId(3)]);
    }
}
