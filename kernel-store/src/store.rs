//! [`FjallStore`]: kernel-core's [`Store`] on fjall. Each [`WriteBatch`] (one crank, or one
//! immediate-path write) is applied atomically: it is held in memory (reads see it) and appended
//! to the store's write-ahead log ([`crate::wal`]) as one checksummed record numbered with the
//! store's count of batches applied. Under `Sync` the record is written and `fdatasync`ed inside
//! `apply`; under `Buffered` written; under `Group` written with the rest of its group and synced
//! by the sync thread. The engine takes the held batches only at a **checkpoint** (every
//! [`StoreOptions::checkpoint_bytes`] of log, and at a clean close), merged by key, as one atomic
//! fjall write with the batch count, synced; then the log starts over. A key created and deleted
//! between two checkpoints never reaches fjall. A crash leaves the engine at a checkpoint and the
//! log's chain of whole records after it: the store reopens at a batch boundary, a committed
//! crank, and checkpoints what it read back.
//!
//! Layout of the engine's directory (`<dir>/fjall`): one keyspace, `kernel`, holding
//! - the kernel's keys and values, exactly as kernel-core wrote them (byte-ordered keys, postcard
//!   values);
//! - the store's own records under the reserved first byte `0xFF`, which kernel keys (ASCII table
//!   prefixes) never use and `apply` refuses: `0xFF applied` -> u64 big-endian, the number of
//!   batches applied over the store's life up to the last checkpoint, written with every
//!   checkpoint (the log holds the batches after it); `0xFF keys` -> the filter of the engine's
//!   keys as of that checkpoint (`filter.rs`).
//!
//! One keyspace, not two, because fjall deletes a journal only once every keyspace with data in
//! it has been flushed: a small, rarely flushed second keyspace would keep the journal (and the
//! replay at the next open) growing to hundreds of megabytes.
//!
//! A clean close (dropping the store) flushes the memtable to a table and, once fjall is closed,
//! empties the journal, so the next open replays nothing; after a crash the next open replays
//! the journal, and takes time in proportion to it (fjall seals a journal at 64 MB).

use crate::durability::{Clock, Durability, Durable, SystemClock, Watermark};
use crate::error::OpenError;
use crate::filter::EngineKeys;
use crate::format::{self, Found, ENGINE_DIR, LOCK_FILE};
use crate::overlay::Overlay;
use crate::wal::{Wal, WalError, WAL_FILE};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use kernel_core::{CommitEvent, Store, StoreError, WriteBatch};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const DATA_KEYSPACE: &str = "kernel";
/// The first byte of every key the store keeps for itself.
pub const RESERVED_PREFIX: u8 = 0xFF;
const APPLIED_KEY: &[u8] = b"\xFFapplied";
/// The filter of the engine's keys, as of the checkpoint that wrote it (`filter.rs`).
const FILTER_KEY: &[u8] = b"\xFFkeys";
/// A key and its value.
type Entry = (Vec<u8>, Vec<u8>);
/// Keys of engine contents cached in memory.
const CACHE_KEYS: usize = 65_536;

/// How to open a store.
#[derive(Clone)]
pub struct StoreOptions {
    /// When applied batches reach the disk.
    pub durability: Durability,
    /// The time source for group commit's `max_delay`.
    pub clock: Arc<dyn Clock>,
    /// The engine's block cache, in bytes.
    pub cache_bytes: u64,
    /// Write-ahead log bytes between checkpoints: past this, the next `apply` writes every batch
    /// held since the last checkpoint into the engine (synced) and the log starts over. Larger
    /// lets more short-lived keys die in memory, at the cost of memory, a longer pause at each
    /// checkpoint and a longer replay after a crash.
    pub checkpoint_bytes: u64,
}

impl StoreOptions {
    /// Options with `durability`, the system clock, a 64 MiB cache and a checkpoint every
    /// 16 MiB of log.
    pub fn new(durability: Durability) -> Self {
        StoreOptions { durability, clock: Arc::new(SystemClock::new()), cache_bytes: 64 << 20, checkpoint_bytes: 16 << 20 }
    }

    /// The same options with another clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

impl Default for StoreOptions {
    /// `Durability::Sync`.
    fn default() -> Self {
        Self::new(Durability::Sync)
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("durability", &self.durability)
            .field("cache_bytes", &self.cache_bytes)
            .field("checkpoint_bytes", &self.checkpoint_bytes)
            .finish()
    }
}

/// A kernel store on fjall, in one directory it holds locked while open.
pub struct FjallStore {
    dir: PathBuf,
    db: Database,
    data: Keyspace,
    durability: Durability,
    clock: Arc<dyn Clock>,
    watermark: Arc<Mutex<Watermark>>,
    /// Every batch since the last checkpoint (the engine does not hold them), and a cache.
    overlay: Mutex<Overlay>,
    /// The keys the engine may hold, to tell a dead key was never there without asking fjall.
    filter: Mutex<EngineKeys>,
    /// The write-ahead log of the batches the overlay holds.
    wal: Mutex<Wal>,
    checkpoint_bytes: u64,
    /// Set by the sync thread when an fdatasync failed: reads refuse too, as after any failed
    /// write or sync of the log (the batches they would show may never reach the disk).
    sync_failed: Arc<AtomicBool>,
    /// Group commit: the thread that `fdatasync`s the log after each group is written to it, so
    /// the kernel runs the next group's cranks meanwhile; it is sent the batch count to sync to.
    syncer: Option<(std::sync::mpsc::Sender<u64>, std::thread::JoinHandle<()>)>,
    /// Empties the journal once the engine is closed, if the close flushed everything. Declared
    /// after `db` and `data` because fields drop in declaration order: fjall is closed (its
    /// journal writer gone) by the time this runs.
    journal_reset: JournalReset,
    /// Held (locked) for as long as the store is open; the OS releases it if the process dies.
    /// Last, so no other open sees the engine before the journal is emptied.
    _lock: File,
}

impl std::fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallStore").field("dir", &self.dir).field("durability", &self.durability).finish_non_exhaustive()
    }
}

fn engine_error(message: &str, e: fjall::Error) -> StoreError {
    StoreError::with_source(message.to_owned(), e)
}

impl FjallStore {
    /// Open the store in `dir`, creating it (and `dir`) if `dir` is missing or empty.
    ///
    /// Refused: a non-empty directory without a format record ([`OpenError::Foreign`]), a record
    /// from a newer format ([`OpenError::NewerFormat`]) or one that does not decode
    /// ([`OpenError::BadRecord`]), and a store already open ([`OpenError::Locked`]). A store that
    /// crashed reopens at its last committed batch (in group mode: no older than the last one
    /// reported durable).
    pub fn open(dir: impl AsRef<Path>, options: StoreOptions) -> Result<Self, OpenError> {
        let dir = dir.as_ref().to_path_buf();
        let io = |doing: &'static str| {
            let dir = dir.clone();
            move |source| OpenError::Io { dir, doing, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("creating the directory"))?;
        // Look before writing anything: a foreign or newer directory is left exactly as found.
        format::inspect(&dir)?;
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(LOCK_FILE)).map_err(io("opening the lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(OpenError::Locked { dir }),
            Err(TryLockError::Error(e)) => return Err(io("locking the lock file")(e)),
        }
        // Inspect again under the lock: another process may have created the store meanwhile.
        match format::inspect(&dir)? {
            Found::Empty => format::create(&dir)?,
            // Format 1 had no write-ahead log: from now on it may hold batches, so builds that
            // would ignore it must refuse the store.
            Found::Store(found) if found < format::STORE_FORMAT => format::create(&dir)?,
            Found::Store(_) => {}
        }
        let engine = |source| OpenError::Engine { dir: dir.clone(), source };
        let db = Database::builder(dir.join(ENGINE_DIR)).cache_size(options.cache_bytes).open().map_err(|e| match e {
            fjall::Error::Locked => OpenError::Locked { dir: dir.clone() },
            e => engine(e),
        })?;
        let data = db.keyspace(DATA_KEYSPACE, KeyspaceCreateOptions::default).map_err(engine)?;
        let applied = match data.get(APPLIED_KEY).map_err(engine)? {
            None => 0,
            Some(v) => <[u8; 8]>::try_from(&*v).map(u64::from_be_bytes).map_err(|_| OpenError::BadRecord {
                dir: dir.clone(),
                table: DATA_KEYSPACE,
                key: APPLIED_KEY.escape_ascii().to_string(),
                reason: format!("expected an 8-byte batch count, found {} bytes {:?}", v.len(), v.escape_ascii().to_string()),
            })?,
        };
        if applied == 0 && data.first_key_value().is_some() {
            return Err(OpenError::BadRecord {
                dir,
                table: DATA_KEYSPACE,
                key: APPLIED_KEY.escape_ascii().to_string(),
                reason: "missing, but the kernel keyspace holds data".into(),
            });
        }
        // The batches the log holds past the engine's last checkpoint.
        let (wal, replay) = Wal::open(&dir, applied).map_err(|e| match e {
            WalError::Io(doing, source) => OpenError::Io { dir: dir.clone(), doing, source },
            WalError::Bad(reason) => OpenError::BadRecord { dir: dir.clone(), table: "wal", key: WAL_FILE.into(), reason },
        })?;
        let replayed = replay.len() as u64;
        let mut overlay = Overlay::new(CACHE_KEYS);
        let mut filter = EngineKeys::open(data.clone(), data.get(FILTER_KEY).map_err(engine)?.as_deref());
        for batch in replay {
            overlay.hold(batch, |k| filter.may_hold(k));
        }
        let mut recovered = Watermark::recovered(applied + replayed);
        recovered.checkpointed = applied;
        let watermark = Arc::new(Mutex::new(recovered));
        let sync_failed = Arc::new(AtomicBool::new(false));
        let syncer = match options.durability {
            Durability::Group { .. } => {
                let file = wal.sync_handle().map_err(io("opening the write-ahead log for the sync thread"))?;
                Some(spawn_syncer(file, Arc::clone(&watermark), Arc::clone(&sync_failed)).map_err(io("starting the sync thread"))?)
            }
            Durability::Sync | Durability::Buffered => None,
        };
        let journal_reset = JournalReset { engine_dir: dir.join(ENGINE_DIR), armed: false };
        let store = FjallStore {
            dir,
            db,
            data,
            durability: options.durability,
            clock: options.clock,
            watermark,
            overlay: Mutex::new(overlay),
            filter: Mutex::new(filter),
            wal: Mutex::new(wal),
            checkpoint_bytes: options.checkpoint_bytes,
            sync_failed,
            syncer,
            journal_reset,
            _lock: lock,
        };
        if replayed > 0 {
            // Into the engine (their count at least, if they left nothing) before the log starts
            // over and overwrites them.
            let mut w = store.watermark.lock();
            store.checkpoint(&mut w).map_err(|source| OpenError::Recovery { dir: store.dir.clone(), source })?;
        }
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The durability setting it was opened with.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Batches applied over the store's life (one per crank, one per immediate-path write).
    pub fn applied(&self) -> u64 {
        self.watermark.lock().applied
    }

    /// The durable watermark now.
    pub fn durable(&self) -> Durable {
        self.watermark.lock().current()
    }

    /// The durable event: the watermark, if it moved since the last call. Poll it after each
    /// crank (a group sync may happen inside `apply`) and after [`FjallStore::flush_due`]; only
    /// cranks up to its `up_to_crank` may have their outputs sent to remotes.
    pub fn take_durable(&self) -> Option<Durable> {
        self.watermark.lock().take()
    }

    /// A commit observer for `Kernel::add_commit_observer`: it ties each committed crank to the
    /// batch that committed it, so [`Durable::up_to_crank`] can name cranks.
    pub fn crank_observer(&self) -> impl FnMut(&CommitEvent) + 'static {
        let watermark = Arc::clone(&self.watermark);
        move |event: &CommitEvent| watermark.lock().observe(event.crank)
    }

    /// When a group sync falls due by time (on the store's clock), if batches are waiting:
    /// the host's timer for [`FjallStore::flush_due`] while the kernel is idle.
    pub fn flush_deadline(&self) -> Option<Duration> {
        match self.durability {
            Durability::Group { max_delay, .. } => {
                let w = self.watermark.lock();
                w.oldest_pending.into_iter().chain(w.syncing_since).min().map(|t| t + max_delay)
            }
            Durability::Sync | Durability::Buffered => None,
        }
    }

    /// Group commit: sync now if a sync is due (by count or by time), then return the durable
    /// event if the watermark moved. Other modes only return the event.
    pub fn flush_due(&self) -> Result<Option<Durable>, StoreError> {
        let mut w = self.watermark.lock();
        // The kernel is idle here: sync on this thread, so the durable event is not later than
        // `flush_deadline`. That includes a group the sync thread has had for `max_delay`.
        let overdue = match (self.durability, w.syncing_since) {
            (Durability::Group { max_delay, .. }, Some(since)) => self.clock.now().saturating_sub(since) >= max_delay,
            _ => false,
        };
        if overdue || self.group_sync_due(&w) {
            self.sync_locked(&mut w)?;
        }
        Ok(w.take())
    }

    /// Sync everything applied so far to disk now, in any mode.
    pub fn sync(&self) -> Result<Durable, StoreError> {
        let mut w = self.watermark.lock();
        self.sync_locked(&mut w)?;
        Ok(w.current())
    }

    fn group_sync_due(&self, w: &Watermark) -> bool {
        match (self.durability, w.oldest_pending) {
            (Durability::Group { max_cranks, max_delay }, Some(oldest)) => {
                w.applied - w.written >= max_cranks || self.clock.now().saturating_sub(oldest) >= max_delay
            }
            _ => false,
        }
    }

    /// Write and sync everything applied, now, on this thread.
    fn sync_locked(&self, w: &mut Watermark) -> Result<(), StoreError> {
        check_syncer(w)?;
        let mut wal = self.wal.lock();
        if let Err(e) = wal.write() {
            return Err(self.poison(w, format!("writing batches {}..={} to the write-ahead log", w.written + 1, w.applied), e));
        }
        if w.applied > w.durable {
            if let Err(e) = wal.sync() {
                return Err(self.poison(w, format!("syncing the write-ahead log up to batch {}", w.applied), e));
            }
        }
        w.synced();
        Ok(())
    }

    /// Group commit: write the group to the log and leave its `fdatasync` to the sync thread,
    /// which moves the durable watermark when it is done.
    fn hand_over(&self, w: &mut Watermark) -> Result<(), StoreError> {
        check_syncer(w)?;
        if let Err(e) = self.wal.lock().write() {
            return Err(self.poison(w, format!("writing batches {}..={} to the write-ahead log", w.written + 1, w.applied), e));
        }
        w.handed_over(self.clock.now());
        if let Some((to_syncer, _)) = &self.syncer {
            if to_syncer.send(w.written).is_err() {
                return Err(StoreError::new("the store's sync thread is gone"));
            }
        }
        Ok(())
    }

    /// Refuse if the sync thread failed.
    fn check_sync_thread(&self) -> Result<(), StoreError> {
        if self.sync_failed.load(Ordering::Acquire) {
            return check_syncer(&self.watermark.lock());
        }
        Ok(())
    }

    /// A write or sync of the log failed: the batches the kernel was told of may not be on disk
    /// whole, and the log's end is unknown. Refuse every later read and write (the store must be
    /// reopened, which reads back the log's whole records) and return the error.
    fn poison(&self, w: &mut Watermark, what: String, e: std::io::Error) -> StoreError {
        let why = format!("{what} failed: {e}");
        w.failed = Some(why.clone());
        self.overlay.lock().failed = Some(why);
        StoreError::with_source(what, e)
    }

    /// The checkpoint: every batch held since the last one, merged by key, into the engine as
    /// one atomic write with the batch count, synced; then the log starts over. Afterwards every
    /// batch applied is on disk.
    fn checkpoint(&self, w: &mut Watermark) -> Result<(), StoreError> {
        check_syncer(w)?;
        let mut overlay = self.overlay.lock();
        overlay.check()?;
        // Even with nothing held (every key since came and went) the engine must take the batch
        // count: the log is about to start over, and a reopen must find its first record right
        // after the engine's count.
        if !overlay.nothing_pending() || w.applied > w.checkpointed {
            let pending = overlay.take_pending();
            // A key created and deleted since the last checkpoint left the overlay then if the
            // engine did not hold it (`Overlay::hold`): every delete left is one the engine needs.
            let mut b = fjall::OwnedWriteBatch::with_capacity(self.db.clone(), pending.len() + 1).durability(Some(PersistMode::SyncData));
            for (k, slot) in &pending {
                match &slot.value {
                    Some(v) => b.insert(&self.data, k.as_slice(), v.as_slice()),
                    None => b.remove(&self.data, k.as_slice()),
                }
            }
            b.insert(&self.data, APPLIED_KEY, w.applied.to_be_bytes().to_vec());
            // The filter of the engine's keys, with this checkpoint's (a failed commit leaves it
            // holding keys the engine does not: more "maybe", never a wrong "absent").
            let mut filter = self.filter.lock();
            for (k, slot) in &pending {
                if slot.value.is_some() {
                    filter.insert(k);
                }
            }
            match filter.persisted() {
                Some(bytes) => b.insert(&self.data, FILTER_KEY, bytes),
                None => b.remove(&self.data, FILTER_KEY),
            }
            if let Err(e) = b.commit() {
                // The batches taken from the overlay are gone from memory and may not be in the
                // engine: refuse every later read and write rather than serve an older state.
                // The log still holds them; a reopen reads them back.
                let what = format!("checkpointing batches up to {}", w.applied);
                overlay.failed = Some(format!("{what} failed: {e:?}"));
                w.failed = overlay.failed.clone();
                return Err(engine_error(&what, e));
            }
            overlay.written(pending);
            w.checkpointed = w.applied;
            // Keys the engine deleted since it was built still answer "maybe": past its size it
            // is built again.
            filter.maintain();
        }
        drop(overlay);
        if let Err(e) = self.wal.lock().restart() {
            return Err(self.poison(w, "restarting the write-ahead log".into(), e));
        }
        w.synced();
        Ok(())
    }

    /// Every entry of the kernel keyspace, in key order: for comparing whole states in tests.
    pub fn entries(&self) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, StoreError> {
        let mut out = BTreeMap::new();
        for guard in self.data.iter() {
            let (k, v) = guard.into_inner().map_err(|e| engine_error("reading the kernel keyspace", e))?;
            if k.first() != Some(&RESERVED_PREFIX) {
                out.insert(k.to_vec(), v.to_vec());
            }
        }
        for (k, v) in self.overlay.lock().pending() {
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out)
    }

    /// The engine's first entry with `prefix` after `after`.
    fn engine_next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<Entry>, StoreError> {
        let lower = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let Some(guard) = self.data.range::<&[u8], _>((lower, Bound::Unbounded)).next() else {
            return Ok(None);
        };
        let (k, v) = guard.into_inner().map_err(|e| engine_error(&format!("scanning prefix {}", prefix.escape_ascii()), e))?;
        // The store's own records sort last; they are not the kernel's to see.
        let visible = k.starts_with(prefix) && k.first() != Some(&RESERVED_PREFIX);
        Ok(visible.then(|| (k.to_vec(), v.to_vec())))
    }
}

/// Refuse if the sync thread failed.
fn check_syncer(w: &Watermark) -> Result<(), StoreError> {
    match &w.failed {
        None => Ok(()),
        Some(why) => Err(StoreError::new(format!("the store failed earlier and must be reopened: {why}"))),
    }
}

/// The group-commit sync thread: for each batch count it is sent, `fdatasync` the log
/// (everything written before counts), then move the durable watermark. Counts sent while it
/// syncs are served together by the next `fdatasync`.
fn spawn_syncer(
    log: File,
    watermark: Arc<Mutex<Watermark>>,
    sync_failed: Arc<AtomicBool>,
) -> std::io::Result<(std::sync::mpsc::Sender<u64>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let thread = std::thread::Builder::new().name("kernel-store sync".into()).spawn(move || {
        while let Ok(mut upto) = rx.recv() {
            while let Ok(more) = rx.try_recv() {
                upto = upto.max(more);
            }
            match log.sync_data() {
                Ok(()) => watermark.lock().durable_up_to(upto),
                Err(e) => {
                    watermark.lock().failed = Some(format!("syncing the write-ahead log up to batch {upto} failed: {e}"));
                    sync_failed.store(true, Ordering::Release);
                    return;
                }
            }
        }
    })?;
    Ok((tx, thread))
}

impl Store for FjallStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if key.first() == Some(&RESERVED_PREFIX) {
            return Ok(None);
        }
        self.check_sync_thread()?;
        let mut overlay = self.overlay.lock();
        overlay.check()?;
        if let Some(known) = overlay.lookup(key) {
            return Ok(known);
        }
        let value = self.data.get(key).map_err(|e| engine_error(&format!("reading key {}", key.escape_ascii()), e))?;
        overlay.remember(key, value.as_deref());
        Ok(value.map(|v| v.to_vec()))
    }

    fn next(&self, prefix: &[u8], after: Option<&[u8]>) -> Result<Option<(Vec<u8>, Vec<u8>)>, StoreError> {
        self.check_sync_thread()?;
        let mut overlay = self.overlay.lock();
        overlay.check()?;
        if overlay.nothing_pending() {
            return self.engine_next(prefix, after);
        }
        // Merge the engine's entries with the pending writes, which win where both have a key.
        let mut cursor: Option<Vec<u8>> = after.map(<[u8]>::to_vec);
        loop {
            let engine = self.engine_next(prefix, cursor.as_deref())?;
            let Some((pk, pv)) = overlay.pending_next(prefix, cursor.as_deref()) else {
                return Ok(engine);
            };
            match engine {
                Some((ek, ev)) if ek.as_slice() < pk.as_slice() => return Ok(Some((ek, ev))),
                _ => match pv {
                    Some(v) => return Ok(Some((pk.clone(), v.clone()))),
                    None => cursor = Some(pk.clone()), // deleted: look past it
                },
            }
        }
    }

    fn apply(&mut self, batch: WriteBatch) -> Result<(), StoreError> {
        self.overlay.get_mut().check()?;
        if let Some((k, _)) = batch.iter().find(|(k, _)| k.first() == Some(&RESERVED_PREFIX)) {
            return Err(StoreError::new(format!(
                "key {} starts with the byte 0xFF, which the store reserves for itself",
                k.escape_ascii()
            )));
        }
        let mut w = self.watermark.lock();
        check_syncer(&w)?;
        let applied = w.applied + 1;
        self.wal.get_mut().append(applied, &batch).map_err(StoreError::new)?;
        let filter = self.filter.get_mut();
        self.overlay.get_mut().hold(batch, |k| filter.may_hold(k));
        w.applied = applied;
        match self.durability {
            Durability::Group { .. } => {
                if w.oldest_pending.is_none() {
                    w.oldest_pending = Some(self.clock.now());
                }
                if self.group_sync_due(&w) {
                    self.hand_over(&mut w)?;
                }
            }
            Durability::Sync => self.sync_locked(&mut w)?,
            Durability::Buffered => {
                if let Err(e) = self.wal.get_mut().write() {
                    return Err(self.poison(&mut w, format!("writing batch {applied} to the write-ahead log"), e));
                }
                w.written = applied;
                w.oldest_pending = None;
            }
        }
        if self.wal.get_mut().len() >= self.checkpoint_bytes {
            self.checkpoint(&mut w)?;
        }
        Ok(())
    }
}

/// How long a clean close waits for fjall to account for its last flush (see `FjallStore::drop`).
const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

impl Drop for FjallStore {
    /// A clean close checkpoints (the engine takes every batch the log holds, synced), then
    /// flushes the memtable and, once fjall is closed, empties its journal, so the next open
    /// replays nothing. Errors cannot be reported from here; call [`FjallStore::sync`] first to
    /// see them.
    fn drop(&mut self) {
        if let Some((to_syncer, thread)) = self.syncer.take() {
            drop(to_syncer);
            let _ = thread.join();
        }
        let mut w = self.watermark.lock();
        let synced = self.checkpoint(&mut w).is_ok();
        // Write the memtable out as a table file. On its own this does not spare the next open
        // its replay: fjall deletes a journal only once it is sealed, and it seals (rotates) the
        // active journal only when a flush finds it past 64 MB, a fixed threshold no option or
        // API lowers. Below that, every open reads the whole active journal (at ~30 MB/s: each
        // item's keyspace is resolved through the meta tree) even though it skips every item as
        // already in a table. `rotate_memtable_and_wait` is `#[doc(hidden)]`: fjall has no public
        // way to flush a memtable. The `SyncAll` leaves fjall's journal buffer empty.
        let flushed = self.data.rotate_memtable_and_wait().is_ok() && self.db.persist(PersistMode::SyncAll).is_ok();
        // So empty the journal ourselves, once fjall is closed, if nothing in it is outside the
        // tables: every batch applied reached the engine, no memtable of any keyspace holds a
        // byte (`write_buffer_size` counts the active and sealed memtables, what a replay would
        // rebuild; `#[doc(hidden)]`, but fjall's only measure of it) and no sealed journal waits
        // for eviction (`journal_count` counts the active one too). Otherwise the journal stays
        // and the next open replays it, which is always correct. Nothing writes to the engine
        // after this: the sync thread is gone and the store is being dropped.
        //
        // fjall's workers finish a flush's bookkeeping (the write buffer's count) just after
        // `rotate_memtable_and_wait` returns: on a loaded machine the count was seen at 2.9 MB
        // and at 0 20 ms later. So wait a little (at most `SETTLE`) for it to say so.
        let settled = || self.db.write_buffer_size() == 0 && self.db.journal_count() == 1;
        let start = std::time::Instant::now();
        let mut quiet = settled();
        while synced && flushed && !quiet && start.elapsed() < SETTLE {
            std::thread::sleep(std::time::Duration::from_millis(1));
            quiet = settled();
        }
        self.journal_reset.armed = synced && flushed && quiet;
    }
}

/// Truncates the engine's one journal file to nothing when dropped, if armed: see
/// `FjallStore::drop`, which arms it once a clean close has flushed every memtable.
///
/// Truncated, not deleted: fjall recovers its sequence number from the tables only when an
/// active journal file exists (an empty one is replayed as nothing); with no journal file at all
/// it would start again at 0, and later writes would sort below the tables' older versions.
/// An active journal holding nothing is what fjall itself leaves after sealing a journal and
/// evicting it (a new, empty one). A crash before the truncation leaves a journal whose every
/// item is already in a table: the next open reads it and skips them, as it always has.
struct JournalReset {
    engine_dir: PathBuf,
    armed: bool,
}

impl Drop for JournalReset {
    fn drop(&mut self) {
        if self.armed {
            // An error leaves the journal as it was: the next open replays it, correctly.
            let _ = self.reset();
        }
    }
}

impl JournalReset {
    fn reset(&self) -> std::io::Result<()> {
        let mut journals = Vec::new();
        for entry in std::fs::read_dir(&self.engine_dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|x| x.eq_ignore_ascii_case("jnl")) {
                journals.push(path);
            }
        }
        // More than one would be a sealed journal fjall has not evicted: not ours to judge.
        if let [journal] = &journals[..] {
            let file = OpenOptions::new().write(true).open(journal)?;
            file.set_len(0)?;
            file.sync_all()?;
        }
        Ok(())
    }
}
