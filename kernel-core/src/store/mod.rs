//! The store traits: an ordered key-value space the kernel keeps all its tables in, and the
//! transaction ([`Txn`]) a crank runs in: an in-memory overlay of writes over the committed
//! state, applied as one [`WriteBatch`] at commit and dropped at abort. [`MemStore`] is the
//! in-memory implementation for tests and benchmarks; `kernel-store` implements [`Store`] on fjall.

mod key;
mod mem;
mod turn;

pub use mem::MemStore;
pub(crate) use turn::Turned;

use std::collections::BTreeMap;
use std::ops::Bound;

/// A failure of the underlying store (I/O, corruption). Never a vat's fault.
#[derive(Debug, thiserror::Error)]
#[error("store: {message}")]
pub struct StoreError {
    /// What went wrong, naming the key or table where known.
    pub message: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl StoreError {
    /// An error with a message and no underlying cause.
    pub fn new(message: impl Into<String>) -> Self {
        StoreError { message: message.into(), source: None }
    }

    /// An error wrapping an underlying cause.
    pub fn with_source(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError { message: message.into(), source: Some(Box::new(source)) }
    }
}

/// One key-value pair as read from a store.
pub type Entry = (Vec<u8>, Vec<u8>);

/// The writes of one transaction, sorted by key: `Some(value)` sets, `None` deletes.
pub type WriteBatch = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A committed, ordered key-value space. Reads see only committed state; all writes arrive as
/// one atomic [`WriteBatch`] per transaction.
pub trait Store {
    /// The committed value at `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The first committed entry whose key starts with `prefix` and sorts after `after`
    /// (or the first with `prefix` when `after` is `None`).
    fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<Entry>, StoreError>;

    /// Apply `batch` atomically: after a crash either all of it or none of it is visible.
    fn apply(&mut self, batch: WriteBatch) -> Result<(), StoreError>;
}

/// One transaction: reads see its own writes first, then the committed store.
pub struct Txn<'s, S: Store + ?Sized> {
    store: &'s S,
    /// Keyed by the caller's own key vectors, which go into the batch as they are: an overlay
    /// holds a handful of keys, so comparing them costs less than converting each one.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'s, S: Store + ?Sized> Txn<'s, S> {
    /// Begin a transaction over `store`.
    pub fn begin(store: &'s S) -> Self {
        Txn { store, writes: BTreeMap::new() }
    }

    /// The value at `key` as this transaction sees it.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if self.writes.is_empty() {
            return self.store.get(key);
        }
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(key),
        }
    }

    /// Set `key` to `value` in this transaction.
    pub fn set(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    /// Delete `key` in this transaction.
    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// The first entry (as this transaction sees it) whose key starts with `prefix` and sorts
    /// after `after`.
    pub fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<Entry>, StoreError> {
        merged_next(self.store, &self.writes, prefix, after)
    }

    /// Every entry with `prefix`, in key order, as this transaction sees them.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        while let Some((k, v)) = self.next(prefix, after.as_deref())? {
            after = Some(k.clone());
            out.push((k, v));
        }
        Ok(out)
    }

    /// True if the transaction has written nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// End the transaction, yielding its writes as one sorted batch.
    pub fn into_batch(self) -> WriteBatch {
        self.into_batch_with_room(0)
    }

    /// [`Txn::into_batch`], with room in the batch for `extra` more writes.
    pub(crate) fn into_batch_with_room(self, extra: usize) -> WriteBatch {
        let mut batch = Vec::with_capacity(self.writes.len() + extra);
        batch.extend(self.writes);
        batch
    }
}

/// The first entry of `writes` laid over `store` whose key starts with `prefix` and sorts after
/// `after`: a key `writes` holds shadows the store's (`None`: deleted).
fn merged_next<S: Store + ?Sized>(
    store: &S,
    writes: &BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    prefix: &[u8],
    after: Option<&[u8]>,
) -> Result<Option<Entry>, StoreError> {
    let mut cursor: Option<Vec<u8>> = after.map(<[u8]>::to_vec);
    loop {
        let committed = store.next(prefix, cursor.as_deref())?;
        let lower = cursor.as_deref().unwrap_or(prefix);
        let lower = if cursor.is_some() { Bound::Excluded(lower) } else { Bound::Included(lower) };
        let overlay =
            writes.range::<[u8], _>((lower, Bound::Unbounded)).next().map(|(k, v)| (k.clone(), v)).filter(|(k, _)| k.starts_with(prefix));
        match (committed, overlay) {
            (None, None) => return Ok(None),
            (Some((ck, cv)), None) => return Ok(Some((ck, cv))),
            (c, Some((ok, ov))) => {
                // The overlay entry wins if it sorts first or shadows the committed key.
                let overlay_first = match &c {
                    Some((ck, _)) => ok.as_slice() <= ck.as_slice(),
                    None => true,
                };
                if overlay_first {
                    match ov {
                        Some(v) => return Ok(Some((ok, v.clone()))),
                        None => cursor = Some(ok), // deleted here: keep looking
                    }
                } else if let Some((ck, cv)) = c {
                    return Ok(Some((ck, cv)));
                }
            }
        }
    }
}

/// Every committed entry with `prefix`, in key order.
pub fn scan_committed<S: Store + ?Sized>(store: &S, prefix: &[u8]) -> Result<Vec<Entry>, StoreError> {
    Txn::begin(store).scan_prefix(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_with(entries: &[(&str, &str)]) -> MemStore {
        let mut s = MemStore::new();
        let batch = entries.iter().map(|(k, v)| (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))).collect();
        s.apply(batch).expect("mem apply");
        s
    }

    fn keys(entries: Vec<Entry>) -> Vec<String> {
        entries.into_iter().map(|(k, _)| String::from_utf8(k).expect("utf8")).collect()
    }

    #[test]
    fn reads_see_the_transactions_own_writes() {
        let s = store_with(&[("a", "1")]);
        let mut t = Txn::begin(&s);
        t.set(b"a".to_vec(), b"2".to_vec());
        t.set(b"b".to_vec(), b"3".to_vec());
        assert_eq!(t.get(b"a").expect("get"), Some(b"2".to_vec()));
        assert_eq!(t.get(b"b").expect("get"), Some(b"3".to_vec()));
        t.delete(b"a".to_vec());
        assert_eq!(t.get(b"a").expect("get"), None);
        // The committed store is untouched until the batch is applied.
        assert_eq!(s.get(b"a").expect("get"), Some(b"1".to_vec()));
    }

    #[test]
    fn scans_merge_overlay_and_committed_in_order() {
        let s = store_with(&[("p/a", "1"), ("p/c", "3"), ("p/e", "5"), ("q/x", "9")]);
        let mut t = Txn::begin(&s);
        t.set(b"p/b".to_vec(), b"2".to_vec());
        t.delete(b"p/c".to_vec());
        t.set(b"p/e".to_vec(), b"55".to_vec());
        t.set(b"p/f".to_vec(), b"6".to_vec());
        let all = t.scan_prefix(b"p/").expect("scan");
        assert_eq!(keys(all.clone()), ["p/a", "p/b", "p/e", "p/f"]);
        assert_eq!(all[2].1, b"55".to_vec());
        assert_eq!(t.next(b"p/", Some(b"p/b")).expect("next").map(|e| e.0), Some(b"p/e".to_vec()));
    }

    #[test]
    fn an_applied_batch_is_visible_and_a_dropped_one_is_not() {
        let mut s = store_with(&[("k", "old")]);
        {
            let mut t = Txn::begin(&s);
            t.set(b"k".to_vec(), b"aborted".to_vec());
            drop(t);
        }
        assert_eq!(s.get(b"k").expect("get"), Some(b"old".to_vec()));
        let mut t = Txn::begin(&s);
        t.set(b"k".to_vec(), b"new".to_vec());
        let batch = t.into_batch();
        s.apply(batch).expect("apply");
        assert_eq!(s.get(b"k").expect("get"), Some(b"new".to_vec()));
    }
}
