//! What the store keeps in memory in front of the engine: under group commit, the writes of
//! batches applied since the last sync ([`Overlay::pending`], written to the engine as one
//! atomic batch when the group syncs), and in every mode a bounded cache of what the engine
//! holds, so the kernel's hot records (endpoints, roots, counters) are not looked up in the LSM
//! tree on every crank.

use kernel_core::StoreError;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

/// The in-memory state in front of the engine.
#[derive(Debug)]
pub(crate) struct Overlay {
    /// Written by applied batches, not yet in the engine: `None` is a delete.
    pub pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// What the engine holds at some keys (`None`: absent). Always coherent: every write to the
    /// engine updates it.
    clean: HashMap<Vec<u8>, Option<Vec<u8>>>,
    clean_limit: usize,
    /// Set when a group's write failed after its batches left `pending`: the store then refuses
    /// everything rather than serve a state older than the one the kernel saw.
    pub failed: Option<String>,
}

impl Overlay {
    /// An empty overlay whose cache holds at most `clean_limit` keys.
    pub fn new(clean_limit: usize) -> Self {
        Overlay { pending: BTreeMap::new(), clean: HashMap::new(), clean_limit, failed: None }
    }

    /// Refuse if an earlier group write failed.
    pub fn check(&self) -> Result<(), StoreError> {
        match &self.failed {
            None => Ok(()),
            Some(why) => Err(StoreError::new(format!("the store failed earlier and must be reopened: {why}"))),
        }
    }

    /// What the store holds at `key`, if known without asking the engine: `Some(None)` is
    /// known-absent.
    pub fn lookup(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.pending.get(key).or_else(|| self.clean.get(key)).cloned()
    }

    /// The engine holds `value` at `key` (read from it or just written to it).
    pub fn remember(&mut self, key: &[u8], value: Option<&[u8]>) {
        if self.clean_limit == 0 {
            return;
        }
        if self.clean.len() >= self.clean_limit && !self.clean.contains_key(key) {
            // Crude but cheap: start over. The hot records come straight back.
            self.clean.clear();
        }
        self.clean.insert(key.to_vec(), value.map(<[u8]>::to_vec));
    }

    /// Drop whatever the cache says about `keys` (they are about to change in the engine).
    pub fn forget_all<'k>(&mut self, keys: impl Iterator<Item = &'k Vec<u8>>) {
        if self.clean.is_empty() {
            return;
        }
        for k in keys {
            self.clean.remove(k);
        }
    }

    /// The first pending entry with `prefix` after `after` (deletes included).
    pub fn pending_next(&self, prefix: &[u8], after: Option<&[u8]>) -> Option<(&Vec<u8>, &Option<Vec<u8>>)> {
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Included(prefix),
        };
        self.pending.range::<[u8], _>((lower, Bound::Unbounded)).next().filter(|(k, _)| k.starts_with(prefix))
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
        o.pending.insert(b"a".to_vec(), None);
        assert_eq!(o.lookup(b"a"), Some(None));
        // A third key overflows the cache, which starts over.
        o.remember(b"c", Some(b"3"));
        assert_eq!(o.lookup(b"b"), None);
        assert_eq!(o.lookup(b"c"), Some(Some(b"3".to_vec())));
    }

    #[test]
    fn pending_scans_stay_in_their_prefix() {
        let mut o = Overlay::new(0);
        for k in ["p/1", "p/2", "q/1"] {
            o.pending.insert(k.as_bytes().to_vec(), Some(vec![]));
        }
        assert_eq!(o.pending_next(b"p/", None).map(|e| e.0.clone()), Some(b"p/1".to_vec()));
        assert_eq!(o.pending_next(b"p/", Some(b"p/1")).map(|e| e.0.clone()), Some(b"p/2".to_vec()));
        assert_eq!(o.pending_next(b"p/", Some(b"p/2")), None);
    }
}
