//! Opening a store: creation, recovery at the last committed crank, and the refusals (foreign
//! directory, newer format, damaged records, a second open) with errors that say what is wrong.

mod common;

use common::snapshot;

use kernel_core::{CapData, CrankContext, Endpoint, Fault, Kernel, KernelDelivery, KernelError, Message, Settlement, Store};
use kernel_store::{Durability, FjallStore, ManualClock, OpenError, StoreOptions, FORMAT_FILE, STORE_FORMAT};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Counts calls in its vatstore and answers with the count; `fail` aborts after writing.
struct Counter;

impl Endpoint for Counter {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let err = |e: kernel_core::SyscallError| Fault::VatError(e.to_string());
        if let KernelDelivery::Message { message: Message { method, result, .. }, .. } = d {
            let n = ctx.vatstore_get(b"n").map_err(err)?.map_or(0, |v| u64::from_be_bytes(v.try_into().unwrap_or_default())) + 1;
            ctx.vatstore_set(b"n", n.to_be_bytes().to_vec()).map_err(err)?;
            if method == "fail" {
                return Err(Fault::VatError("asked to fail".into()));
            }
            if let Some(kp) = result {
                ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain(n.to_string())))]).map_err(err)?;
            }
        }
        Ok(())
    }
}

fn open(dir: &Path) -> Kernel<FjallStore> {
    let mut k = Kernel::open(FjallStore::open(dir, StoreOptions::new(Durability::Sync)).expect("open store")).expect("open kernel");
    k.add_endpoint("a", Box::new(Counter)).expect("attach a");
    k.add_endpoint("b", Box::new(Counter)).expect("attach b");
    k
}

/// Everything the kernel shows of its state.
fn tables(k: &Kernel<FjallStore>) -> String {
    let eps = k.endpoints().expect("endpoints");
    let mut s = format!(
        "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n",
        k.cranks(),
        eps,
        k.objects().expect("objects"),
        k.promises().expect("promises"),
        k.run_queue().expect("queue")
    );
    for (ep, _) in eps {
        s += &format!("{:?}\n{:?}\n", k.clist(ep).expect("clist"), k.vatstore(ep).expect("vatstore"));
    }
    s
}

fn populated(dir: &Path) -> String {
    let mut k = open(dir);
    let a = k.endpoint_id("a").expect("id").expect("a");
    let b = k.endpoint_id("b").expect("id").expect("b");
    for i in 0..5 {
        let target = if i % 2 == 0 { a } else { b };
        k.queue_message(k.root(target).expect("root").into(), "count", CapData::plain("[]")).expect("queue");
    }
    k.run(Some(3)).expect("run");
    tables(&k)
}

#[test]
fn reopening_resumes_at_the_last_committed_crank() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = populated(dir.path());
    let mut k = open(dir.path());
    assert_eq!(tables(&k), before, "every table survives the restart");
    assert_eq!(k.queue_len(), 2, "the two undelivered messages are still queued");
    let summary = k.run(None).expect("run");
    assert_eq!(summary.cranks, 2);
    let a = k.endpoint_id("a").expect("id").expect("a");
    assert_eq!(k.vatstore(a).expect("vatstore"), vec![(b"n".to_vec(), 3u64.to_be_bytes().to_vec())]);
}

#[test]
fn an_aborted_crank_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut k = open(dir.path());
    let a = k.endpoint_id("a").expect("id").expect("a");
    let b = k.endpoint_id("b").expect("id").expect("b");
    k.queue_message(k.root(b).expect("root").into(), "count", CapData::plain("[]")).expect("queue");
    k.queue_message(k.root(a).expect("root").into(), "fail", CapData::plain("[]")).expect("queue");
    k.run(Some(1)).expect("run");
    let applied = k.store().applied();
    k.run(Some(1)).expect("run");
    assert_eq!(k.store().applied(), applied + 1, "the abort's consequence is one batch; the delivery's writes none");
    drop(k);
    let k = open(dir.path());
    assert!(k.vatstore(a).expect("vatstore").is_empty(), "the failed delivery's vatstore write is not on disk");
    assert_eq!(k.vatstore(b).expect("vatstore"), vec![(b"n".to_vec(), 1u64.to_be_bytes().to_vec())]);
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = FjallStore::open(dir.path(), StoreOptions::default()).expect("first open");
    let second = FjallStore::open(dir.path(), StoreOptions::default()).expect_err("second open");
    assert!(matches!(second, OpenError::Locked { .. }), "{second}");
    drop(first);
    FjallStore::open(dir.path(), StoreOptions::default()).expect("open after the first closed");
}

#[test]
fn a_foreign_directory_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("notes.txt"), "mine").expect("write");
    let e = FjallStore::open(dir.path(), StoreOptions::default()).expect_err("foreign");
    assert!(matches!(&e, OpenError::Foreign { found, .. } if found == "notes.txt"), "{e}");
    let names: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["notes.txt"], "nothing was written into it");
}

#[test]
fn a_newer_format_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path());
    std::fs::write(dir.path().join(FORMAT_FILE), "kernel-store\nformat 3\nengine fjall-3\n").expect("write");
    let e = FjallStore::open(dir.path(), StoreOptions::default()).expect_err("newer");
    assert!(matches!(e, OpenError::NewerFormat { found: 3, supported: STORE_FORMAT, .. }), "{e}");
    assert!(e.to_string().contains("newer"), "{e}");
}

#[test]
fn a_format_1_store_opens_and_is_marked_format_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = populated(dir.path());
    // Format 1 had no write-ahead log; a clean close leaves the engine holding everything.
    std::fs::remove_file(dir.path().join("wal")).expect("remove the log");
    std::fs::write(dir.path().join(FORMAT_FILE), "kernel-store\nformat 1\nengine fjall-3\n").expect("write");
    assert_eq!(tables(&open(dir.path())), before);
    let record = std::fs::read_to_string(dir.path().join(FORMAT_FILE)).expect("read");
    assert_eq!(record, format!("kernel-store\nformat {STORE_FORMAT}\nengine fjall-3\n"));
    assert_eq!(STORE_FORMAT, 2);
}

/// A sync-mode kernel with a checkpoint every `checkpoint` bytes of log, after `n` cranks.
fn counted(dir: &Path, checkpoint: u64, n: u64) -> Kernel<FjallStore> {
    let options = StoreOptions { checkpoint_bytes: checkpoint, ..StoreOptions::new(Durability::Sync) };
    let mut k = Kernel::open(FjallStore::open(dir, options).expect("open store")).expect("open kernel");
    let a = k.add_endpoint("a", Box::new(Counter)).expect("attach a");
    for _ in 0..n {
        k.queue_message(k.root(a).expect("root").into(), "count", CapData::plain("[]")).expect("queue");
        k.run(None).expect("run");
    }
    k
}

#[test]
fn a_crash_between_checkpoints_reopens_from_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = counted(dir.path(), 1 << 30, 20);
    let crashed = tempfile::tempdir().expect("tempdir");
    snapshot(dir.path(), crashed.path());
    let expected = tables(&k);
    let applied = k.store().applied();
    drop(k);
    let store = FjallStore::open(crashed.path(), StoreOptions::new(Durability::Sync)).expect("reopen");
    assert_eq!(store.applied(), applied, "every synced batch is read back from the log");
    let mut k = Kernel::open(store).expect("kernel");
    k.add_endpoint("a", Box::new(Counter)).expect("attach a");
    assert_eq!(tables(&k), expected);
    // The replayed batches were checkpointed: a second reopen finds them in the engine.
    drop(k);
    assert_eq!(FjallStore::open(crashed.path(), StoreOptions::default()).expect("again").applied(), applied);
}

#[test]
fn a_damaged_log_record_ends_the_replay_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = counted(dir.path(), 1 << 30, 20);
    let crashed = tempfile::tempdir().expect("tempdir");
    snapshot(dir.path(), crashed.path());
    let applied = k.store().applied();
    drop(k);
    let log = crashed.path().join("wal");
    let mut bytes = std::fs::read(&log).expect("read");
    // The file runs on in zeros past the records: damage the middle of the records.
    let records = bytes.iter().rposition(|&b| b != 0).expect("records");
    let middle = records / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&log, &bytes).expect("write");
    let store = FjallStore::open(crashed.path(), StoreOptions::default()).expect("a torn log is not an error");
    assert!(store.applied() < applied && store.applied() > 0, "{} of {applied}", store.applied());
    let mut k = Kernel::open(store).expect("the prefix is a committed state");
    k.add_endpoint("a", Box::new(Counter)).expect("attach a");
    k.run(None).expect("it runs on");
}

#[test]
fn a_log_that_starts_past_the_engine_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Small checkpoints: take the engine from one instant and the log from a later one, after
    // another checkpoint; the batches between them are in neither.
    let mut k = counted(dir.path(), 4 << 10, 5);
    let early = tempfile::tempdir().expect("tempdir");
    snapshot(dir.path(), early.path());
    let a = k.endpoint_id("a").expect("id").expect("a");
    for _ in 0..200 {
        k.queue_message(k.root(a).expect("root").into(), "count", CapData::plain("[]")).expect("queue");
        k.run(None).expect("run");
    }
    let late = tempfile::tempdir().expect("tempdir");
    snapshot(dir.path(), late.path());
    drop(k);
    std::fs::copy(late.path().join("wal"), early.path().join("wal")).expect("copy the log");
    let e = FjallStore::open(early.path(), StoreOptions::default()).expect_err("batches missing");
    assert!(matches!(&e, OpenError::BadRecord { table: "wal", .. }), "{e}");
    assert!(e.to_string().contains("batches are missing"), "{e}");
}

#[test]
fn flipped_bytes_in_the_format_record_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path());
    let path = dir.path().join(FORMAT_FILE);
    let good = std::fs::read(&path).expect("read");
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x55;
        std::fs::write(&path, &bad).expect("write");
        let e = FjallStore::open(dir.path(), StoreOptions::default()).expect_err("damaged record");
        assert!(matches!(&e, OpenError::BadRecord { table: "format-file", .. } | OpenError::NewerFormat { .. }), "byte {i}: {e}");
        assert!(e.to_string().contains(FORMAT_FILE) || matches!(e, OpenError::NewerFormat { .. }), "byte {i}: {e}");
    }
    std::fs::write(&path, &good).expect("restore");
    FjallStore::open(dir.path(), StoreOptions::default()).expect("the restored record opens");
}

#[test]
fn a_bad_batch_count_record_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path());
    {
        let db = fjall::Database::builder(dir.path().join("fjall")).open().expect("raw open");
        let data = db.keyspace("kernel", fjall::KeyspaceCreateOptions::default).expect("keyspace");
        data.insert(b"\xFFapplied", "xyz").expect("insert");
        db.persist(fjall::PersistMode::SyncAll).expect("persist");
    }
    let e = FjallStore::open(dir.path(), StoreOptions::default()).expect_err("bad record");
    assert!(matches!(&e, OpenError::BadRecord { table: "kernel", key, .. } if key == "\\xffapplied"), "{e}");
    assert!(e.to_string().contains("8-byte batch count"), "{e}");
}

#[test]
fn the_store_keeps_its_reserved_keys_to_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = FjallStore::open(dir.path(), StoreOptions::default()).expect("open");
    let e = store.apply(vec![(b"\xFFmine".to_vec(), Some(vec![1]))]).expect_err("reserved");
    assert!(e.to_string().contains("reserves"), "{e}");
    store.apply(vec![(b"a".to_vec(), Some(vec![1]))]).expect("apply");
    assert_eq!(store.next(b"", Some(b"a")).expect("next"), None, "the batch counter is not visible");
    assert_eq!(store.entries().expect("entries").len(), 1);
}

#[test]
fn a_bad_kernel_record_is_refused_by_the_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path());
    let mut store = FjallStore::open(dir.path(), StoreOptions::default()).expect("open");
    store.apply(vec![(b"m/format".to_vec(), Some(vec![0, 0, 0, 99]))]).expect("apply");
    match Kernel::open(store) {
        Err(KernelError::UnsupportedFormat { found: Some(99), .. }) => {}
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("a store of kernel format 99 was opened"),
    }
}

#[test]
fn flipped_bytes_in_the_journal_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    populated(dir.path());
    // A clean close empties the journal; a crash leaves the last batches in it. Put one back as
    // a crash would: write the kernel's counters record again through the engine alone, which
    // leaves it in the journal when it closes.
    {
        let db = fjall::Database::builder(dir.path().join("fjall")).open().expect("raw open");
        let data = db.keyspace("kernel", fjall::KeyspaceCreateOptions::default).expect("keyspace");
        let counters = data.get(b"k/counters").expect("get").expect("the kernel's counters record");
        data.insert(b"k/counters", counters).expect("insert");
        db.persist(fjall::PersistMode::SyncAll).expect("persist");
    }
    let journals: Vec<_> = walk(&dir.path().join("fjall")).into_iter().filter(|p| p.extension().is_some_and(|e| e == "jnl")).collect();
    assert!(!journals.is_empty(), "no journal files found");
    // Damage the counters record's value in the journal.
    let mut flipped = 0;
    for path in &journals {
        let mut bytes = std::fs::read(path).expect("read journal");
        if let Some(at) = bytes.windows(10).position(|w| w == b"k/counters") {
            let i = at + 12;
            bytes[i] ^= 0xff;
            std::fs::write(path, &bytes).expect("write journal");
            flipped += 1;
        }
    }
    assert!(flipped > 0, "no batch found to damage in {journals:?}");
    let e = FjallStore::open(dir.path(), StoreOptions::default()).expect_err("damaged journal");
    assert!(matches!(e, OpenError::Engine { .. }), "{e}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("ls") {
        let p = entry.expect("entry").path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn group_commit_syncs_by_count_and_by_time_on_the_injected_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new();
    let opts =
        StoreOptions::new(Durability::Group { max_cranks: 4, max_delay: Duration::from_millis(5) }).with_clock(Arc::new(clock.clone()));
    let store = FjallStore::open(dir.path(), opts).expect("open");
    let observer = store.crank_observer();
    let mut k = Kernel::open(store).expect("kernel");
    k.add_commit_observer(observer);
    let a = k.add_endpoint("a", Box::new(Counter)).expect("attach");
    // Kernel::open and add_endpoint: 2 batches, not yet durable.
    assert_eq!(k.store().applied(), 2);
    assert_eq!(k.store().durable().up_to_batch, 0);
    assert_eq!(k.store().flush_deadline(), Some(Duration::from_millis(5)));
    for _ in 0..3 {
        k.queue_message(k.root(a).expect("root").into(), "count", CapData::plain("[]")).expect("queue");
    }
    // The fourth waiting batch was written to the engine inside apply, and handed to the sync
    // thread, whose fdatasync moves the watermark.
    let started = std::time::Instant::now();
    while k.store().durable().up_to_batch < 4 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(k.store().durable().up_to_batch, 4);
    assert_eq!(k.store().take_durable().map(|d| d.up_to_batch), Some(4));
    k.run(Some(2)).expect("run");
    assert_eq!(k.store().flush_due().expect("flush"), None, "not due yet");
    clock.advance(Duration::from_millis(5));
    let d = k.store().flush_due().expect("flush").expect("the watermark moved");
    assert_eq!(d.up_to_batch, 7);
    assert_eq!(d.up_to_crank, Some(k.cranks()));
    assert_eq!(k.store().flush_deadline(), None, "nothing waits");
}
