//! Shared by kernel-core's test binaries.

use kernel_core::{Entry, MemStore, Store, StoreError, WriteBatch};
use std::cell::Cell;
use std::rc::Rc;

/// A [`MemStore`] that counts the batches applied to it, and whose `apply` or `get` fails while
/// the matching flag is set. Clones share the counter and the flags.
#[derive(Clone, Default)]
pub struct FailingStore {
    pub inner: MemStore,
    pub applies: Rc<Cell<u64>>,
    pub fail_apply: Rc<Cell<bool>>,
    pub fail_get: Rc<Cell<bool>>,
}

impl Store for FailingStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if self.fail_get.get() {
            return Err(StoreError::new("injected read failure"));
        }
        self.inner.get(key)
    }
    fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<Entry>, StoreError> {
        self.inner.next(prefix, after)
    }
    fn apply(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        if self.fail_apply.get() {
            return Err(StoreError::new("injected write failure"));
        }
        self.applies.set(self.applies.get() + 1);
        self.inner.apply(batch)
    }
}
