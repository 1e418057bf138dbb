//! [`DurableStore`]: what the node needs to know about a store to gate outputs on durability —
//! a position for every applied batch, and the position known to be on disk.

use kernel_core::{MemStore, Store, StoreError};
use kernel_store::{Durability, FjallStore};
use std::time::Duration;

/// A store whose applied batches are numbered, with a watermark of those on disk. Remote
/// outputs (messages, acknowledgements) produced by batch `b` may leave once
/// `durable_mark() >= b`.
pub trait DurableStore: Store {
    /// Batches applied so far (the position of the last one).
    fn applied_mark(&self) -> u64;

    /// Every batch up to this position is durable.
    fn durable_mark(&self) -> u64;

    /// Group commit: sync now if a sync is due by count or time. Other modes do nothing.
    fn flush_due(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// When a time-based group sync falls due, if batches are waiting.
    fn flush_deadline(&self) -> Option<Duration> {
        None
    }

    /// Group commit: sync every batch applied so far now, ahead of the group's count or delay
    /// (the node asks when it is idle and outputs wait only for durability). Returns whether it
    /// synced. Other modes, where the store alone decides when batches reach the disk, do
    /// nothing.
    fn flush_now(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// In memory, commit is all there is: every applied batch counts as durable.
impl DurableStore for MemStore {
    fn applied_mark(&self) -> u64 {
        self.batches_applied()
    }

    fn durable_mark(&self) -> u64 {
        self.batches_applied()
    }
}

/// fjall: the durable watermark in batches ([`kernel_store::Durable::up_to_batch`]).
impl DurableStore for FjallStore {
    fn applied_mark(&self) -> u64 {
        self.applied()
    }

    fn durable_mark(&self) -> u64 {
        self.durable().up_to_batch
    }

    fn flush_due(&self) -> Result<(), StoreError> {
        FjallStore::flush_due(self).map(|_| ())
    }

    fn flush_deadline(&self) -> Option<Duration> {
        FjallStore::flush_deadline(self)
    }

    fn flush_now(&self) -> Result<bool, StoreError> {
        match self.durability() {
            Durability::Group { .. } if self.applied() > self.durable().up_to_batch => self.sync().map(|_| true),
            _ => Ok(false),
        }
    }
}
