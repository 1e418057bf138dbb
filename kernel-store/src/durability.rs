//! Durability as a setting ([`Durability`]), the injected time source group commit uses
//! ([`Clock`]), and the durable watermark ([`Durable`]): which applied batches, and which
//! committed cranks, are known to be on disk.

use kernel_core::CrankNumber;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// When an applied batch reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every batch is written and `fdatasync`ed before `apply` returns, so every crank is on
    /// disk before its commit event. Survives process crashes and power loss.
    Sync,
    /// Group commit: applied batches are held in memory (reads see them) and written together,
    /// as one atomic fjall batch followed by one `fdatasync`, once `max_cranks` batches wait or
    /// the oldest has waited `max_delay` on the store's [`Clock`] (checked at each `apply` and by
    /// [`FjallStore::flush_due`]). Overwrites within a group reach the disk once. A group
    /// closed inside `apply` is synced by the store's sync thread while the kernel goes on;
    /// [`Durable`] moves when that `fdatasync` returns.
    /// A batch not yet reported [`Durable`] may be lost to a process crash or a power loss; a
    /// reported one survives both. After a crash the store reopens at a committed batch no
    /// older than the last one reported durable, never in the middle of one.
    ///
    /// [`FjallStore::flush_due`]: crate::FjallStore::flush_due
    Group {
        /// Sync once this many batches (one per crank, one per immediate-path write) wait.
        max_cranks: u64,
        /// Sync once the oldest waiting batch is this old.
        max_delay: Duration,
    },
    /// Every batch is handed to the operating system before `apply` returns, never synced by
    /// the store: it survives a crash of this process but **not** a power loss or an operating
    /// system crash. The watermark advances only on [`FjallStore::sync`] (and everything
    /// recovered at open counts as durable).
    ///
    /// [`FjallStore::sync`]: crate::FjallStore::sync
    Buffered,
}

impl Durability {
    /// Group commit with defaults suited to a host that sends to remotes: 1,000 batches or
    /// 2 ms, whichever comes first.
    pub const GROUP: Durability = Durability::Group { max_cranks: 1_000, max_delay: Duration::from_millis(2) };
}

/// A monotonic time source, injected so group commit's `max_delay` can be driven by tests and
/// simulations (kernel-core itself reads no clock).
pub trait Clock: Send + Sync {
    /// Time since an arbitrary fixed origin; never decreases.
    fn now(&self) -> Duration;
}

/// The machine's monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        SystemClock { origin: Instant::now() }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to: for tests and deterministic simulations. Clones share
/// one time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Move the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let n = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(n, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

/// The durable watermark: everything up to here is on disk.
///
/// Batches are counted over the store's whole life (the count is stored with every batch), so
/// the numbers mean the same after a restart. Cranks are known only for commits observed
/// through [`FjallStore::crank_observer`].
///
/// [`FjallStore::crank_observer`]: crate::FjallStore::crank_observer
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durable {
    /// Every batch up to and including this one (counted from 1 over the store's life) is on
    /// disk.
    pub up_to_batch: u64,
    /// The newest observed crank whose commit is on disk, if any.
    pub up_to_crank: Option<CrankNumber>,
}

/// Shared by the store and its crank observers.
#[derive(Debug, Default)]
pub(crate) struct Watermark {
    /// Batches applied over the store's life.
    pub applied: u64,
    /// Batches written to the write-ahead log (group commit holds the others' records in memory).
    pub written: u64,
    /// Batches known to be on disk.
    pub durable: u64,
    /// When the oldest batch not yet written to the log was applied (group commit only).
    pub oldest_pending: Option<Duration>,
    /// When the oldest group written to the log but not yet known to be on disk was written
    /// (group commit: its `fdatasync` runs on the store's sync thread).
    pub syncing_since: Option<Duration>,
    /// Why the sync thread, a log write or a checkpoint failed, if one did: the store refuses
    /// further writes (and reads: see `FjallStore::check_sync_thread` and the overlay's).
    pub failed: Option<String>,
    /// Batches the engine holds (the count written with the last checkpoint); the write-ahead
    /// log holds those after it.
    pub checkpointed: u64,
    /// Observed cranks not yet on disk: (the batch that committed it, the crank).
    pub cranks: VecDeque<(u64, CrankNumber)>,
    /// The newest observed crank on disk.
    pub durable_crank: Option<CrankNumber>,
    /// What the last [`Durable`] handed out said.
    pub reported: Durable,
}

impl Watermark {
    /// A store reopened with `applied` batches, all of them on disk.
    pub fn recovered(applied: u64) -> Self {
        let d = Durable { up_to_batch: applied, up_to_crank: None };
        Watermark { applied, written: applied, durable: applied, reported: d, ..Watermark::default() }
    }

    pub fn current(&self) -> Durable {
        Durable { up_to_batch: self.durable, up_to_crank: self.durable_crank }
    }

    /// Everything applied is now on disk.
    pub fn synced(&mut self) {
        self.written = self.applied;
        self.oldest_pending = None;
        self.durable_up_to(self.applied);
    }

    /// Group commit: every applied batch is now in the engine (not yet synced), since `now`.
    pub fn handed_over(&mut self, now: Duration) {
        self.written = self.applied;
        self.oldest_pending = None;
        self.syncing_since.get_or_insert(now);
    }

    /// Every batch up to `batch` is on disk.
    pub fn durable_up_to(&mut self, batch: u64) {
        self.durable = self.durable.max(batch);
        if self.durable >= self.written {
            self.syncing_since = None;
        }
        while let Some(&(batch, crank)) = self.cranks.front() {
            if batch > self.durable {
                break;
            }
            self.durable_crank = Some(crank);
            self.cranks.pop_front();
        }
    }

    /// A commit event for `crank`: its batch is the one applied last.
    pub fn observe(&mut self, crank: CrankNumber) {
        if self.applied <= self.durable {
            self.durable_crank = Some(crank);
        } else {
            self.cranks.push_back((self.applied, crank));
        }
    }

    /// The watermark, if it moved since the last time this was asked.
    pub fn take(&mut self) -> Option<Durable> {
        let now = self.current();
        if now == self.reported {
            None
        } else {
            self.reported = now;
            Some(now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cranks_become_durable_with_the_batch_that_committed_them() {
        let mut w = Watermark::recovered(10);
        w.applied = 11; // an immediate-path write
        w.applied = 12;
        w.observe(CrankNumber(5));
        w.applied = 13;
        w.observe(CrankNumber(6));
        assert_eq!(w.take(), None);
        w.synced();
        assert_eq!(w.take(), Some(Durable { up_to_batch: 13, up_to_crank: Some(CrankNumber(6)) }));
        assert_eq!(w.take(), None);
        w.applied = 14;
        w.durable = 14; // sync mode: on disk before the commit event
        w.observe(CrankNumber(7));
        assert_eq!(w.take(), Some(Durable { up_to_batch: 14, up_to_crank: Some(CrankNumber(7)) }));
    }

    #[test]
    fn the_manual_clock_moves_only_when_told() {
        let c = ManualClock::new();
        let shared = c.clone();
        assert_eq!(c.now(), Duration::ZERO);
        shared.advance(Duration::from_millis(3));
        assert_eq!(c.now(), Duration::from_millis(3));
    }
}
