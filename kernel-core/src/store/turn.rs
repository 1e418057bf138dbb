//! A turn: the transactions the kernel commits while a turn is open are laid over the store in
//! memory (later ones read what earlier ones wrote) and reach the store together, as one
//! atomic batch, when the turn ends (see `Kernel::begin_turn`).

use super::{merged_next, Entry, Store, StoreError, WriteBatch};
use std::collections::BTreeMap;

/// The kernel's store, with the writes of the open turn (if any) on top.
pub(crate) struct Turned<S> {
    /// The store itself.
    pub(crate) inner: S,
    /// While a turn is open: the merged writes of the transactions it committed, by key
    /// (`None`: deleted).
    pending: Option<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl<S: Store> Turned<S> {
    pub(crate) fn new(inner: S) -> Self {
        Turned { inner, pending: None }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.pending.is_some()
    }

    /// True if the open turn has committed writes the store has not seen.
    pub(crate) fn has_pending(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| !p.is_empty())
    }

    /// Open a turn (nothing if one is open).
    pub(crate) fn open(&mut self) {
        if self.pending.is_none() {
            self.pending = Some(BTreeMap::new());
        }
    }

    /// Close the turn: its writes as one batch in key order (`None` if no turn was open).
    pub(crate) fn close(&mut self) -> Option<WriteBatch> {
        self.pending.take().map(|p| p.into_iter().collect())
    }
}

impl<S: Store> Store for Turned<S> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.pending.as_ref().and_then(|p| p.get(key)) {
            return Ok(v.clone());
        }
        self.inner.get(key)
    }

    fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<Entry>, StoreError> {
        match &self.pending {
            Some(p) if !p.is_empty() => merged_next(&self.inner, p, prefix, after),
            _ => self.inner.next(prefix, after),
        }
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        let Turned { inner, pending } = self;
        let Some(p) = pending else { return inner.apply(batch) };
        for (k, v) in batch {
            match v {
                Some(v) => {
                    p.insert(k, Some(v));
                }
                // A key this turn wrote that the store does not hold needs no delete at all
                // (a run-queue entry queued and taken within the turn, say).
                None if matches!(p.get(&k), Some(Some(_))) && inner.get(&k)?.is_none() => {
                    p.remove(&k);
                }
                None => {
                    p.insert(k, None);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{scan_committed, MemStore};

    fn set(k: &str, v: &str) -> (Vec<u8>, Option<Vec<u8>>) {
        (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))
    }

    fn del(k: &str) -> (Vec<u8>, Option<Vec<u8>>) {
        (k.as_bytes().to_vec(), None)
    }

    #[test]
    fn a_turn_reaches_the_store_as_one_merged_batch() {
        let mut inner = MemStore::new();
        inner.apply(vec![set("p/a", "1"), set("p/b", "2")]).expect("apply");
        let mut t = Turned::new(inner);
        t.open();
        t.apply(vec![set("p/c", "3"), del("p/a")]).expect("apply");
        t.apply(vec![set("p/c", "33"), set("p/d", "4")]).expect("apply");
        t.apply(vec![del("p/d")]).expect("apply"); // made and deleted within the turn
                                                   // Reads see the turn; the store does not yet.
        assert_eq!(t.get(b"p/c").expect("get"), Some(b"33".to_vec()));
        assert_eq!(t.get(b"p/a").expect("get"), None);
        let seen: Vec<_> = scan_committed(&t, b"p/").expect("scan").into_iter().map(|(k, _)| k).collect();
        assert_eq!(seen, [b"p/b".to_vec(), b"p/c".to_vec()]);
        assert_eq!(t.inner.get(b"p/a").expect("get"), Some(b"1".to_vec()));
        let batch = t.close().expect("a turn was open");
        assert_eq!(batch, vec![del("p/a"), set("p/c", "33")]);
        assert!(!t.is_open());
    }

    #[test]
    fn without_a_turn_writes_go_straight_to_the_store() {
        let mut t = Turned::new(MemStore::new());
        t.apply(vec![set("k", "v")]).expect("apply");
        assert_eq!(t.inner.get(b"k").expect("get"), Some(b"v".to_vec()));
        assert_eq!(t.close(), None);
    }
}
