//! [`MemStore`]: the in-memory [`Store`] for tests, benchmarks and ephemeral kernels: a
//! `BTreeMap` over [`Key`]s, which compare with integer instructions rather than `memcmp`.

use super::key::Key;
use super::{Entry, Store, StoreError, WriteBatch};
use std::collections::BTreeMap;
use std::ops::Bound;

/// An in-memory [`Store`]. Two stores are equal when they hold the same entries.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    map: BTreeMap<Key, Vec<u8>>,
    batches: u64,
}

impl PartialEq for MemStore {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl Eq for MemStore {}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every committed entry in key order, for comparing whole states in tests.
    pub fn entries(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.map.iter().map(|(k, v)| (k.to_vec(), v.clone())).collect()
    }

    /// How many batches have been applied (one per committed transaction).
    pub fn batches_applied(&self) -> u64 {
        self.batches
    }

    /// How many keys the store holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Store for MemStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.map.get(&Key::new(key)).cloned())
    }

    fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<Entry>, StoreError> {
        let lower = match after {
            Some(a) => Bound::Excluded(Key::new(a)),
            None => Bound::Included(Key::new(prefix)),
        };
        Ok(self
            .map
            .range((lower, Bound::Unbounded))
            .next()
            .map(|(k, v)| (k.to_vec(), v))
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k, v.clone())))
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        for (k, v) in batch {
            match v {
                Some(v) => {
                    self.map.insert(Key::new(&k), v);
                }
                None => {
                    self.map.remove(&Key::new(&k));
                }
            }
        }
        self.batches += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(s: &mut MemStore, k: &str, v: Option<&str>) {
        s.apply(vec![(k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))]).expect("mem apply");
    }

    fn scan(s: &MemStore, prefix: &str) -> Vec<String> {
        crate::store::scan_committed(s, prefix.as_bytes())
            .expect("scan")
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).expect("utf8"))
            .collect()
    }

    #[test]
    fn scans_see_keys_in_order_across_deletes_and_reinserts() {
        let mut s = MemStore::new();
        for i in (0..1100u32).rev() {
            put(&mut s, &format!("a/{i:08}"), Some("x"));
        }
        put(&mut s, "a/00000005", None);
        put(&mut s, "b/1", Some("y"));
        let keys = scan(&s, "a/");
        assert_eq!(keys.len(), 1099);
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert!(!keys.contains(&"a/00000005".to_owned()));
        put(&mut s, "a/00000005", Some("back"));
        put(&mut s, "a/00000006", None);
        let keys = scan(&s, "a/");
        assert!(keys.contains(&"a/00000005".to_owned()));
        assert!(!keys.contains(&"a/00000006".to_owned()));
        assert_eq!(scan(&s, "b/"), ["b/1"]);
        assert_eq!(s.len(), 1100);
    }

    #[test]
    fn equal_contents_compare_equal_whatever_the_history() {
        let mut a = MemStore::new();
        let mut b = MemStore::new();
        put(&mut a, "k", Some("1"));
        put(&mut a, "j", Some("2"));
        put(&mut b, "j", Some("2"));
        put(&mut b, "x", Some("3"));
        put(&mut b, "k", Some("1"));
        put(&mut b, "x", None);
        assert_eq!(a, b);
    }
}
