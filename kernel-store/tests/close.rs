//! A clean close leaves the engine no journal to replay, so reopening a large store does not
//! depend on how much was written before the close; and the store reopened that way reads and
//! orders later writes exactly as one that replayed its journal would.

use kernel_core::{Store, WriteBatch};
use kernel_store::{Durability, FjallStore, StoreOptions};
use std::path::Path;

/// The bytes of the engine's journal files (`<dir>/fjall/*.jnl`): what the next open replays.
fn journal_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir.join("fjall")).expect("list the engine directory") {
        let e = e.expect("directory entry");
        if e.path().extension().is_some_and(|x| x == "jnl") {
            total += e.metadata().expect("journal metadata").len();
        }
    }
    total
}

fn key(i: u64) -> Vec<u8> {
    format!("k/{i:08}").into_bytes()
}

fn value(round: u64, i: u64) -> Vec<u8> {
    let mut v = format!("{round}:{i}:").into_bytes();
    v.resize(200, b'.');
    v
}

/// `batches` batches of two keys each, with values of `round`.
fn write(store: &mut FjallStore, round: u64, batches: u64) {
    for b in 0..batches {
        let batch: WriteBatch = vec![(key(2 * b), Some(value(round, 2 * b))), (key(2 * b + 1), Some(value(round, 2 * b + 1)))];
        store.apply(batch).expect("apply");
    }
}

fn check(store: &FjallStore, round: u64, batches: u64, deleted: Option<u64>) {
    for i in 0..2 * batches {
        let expected = (Some(i) != deleted).then(|| value(round, i));
        assert_eq!(store.get(&key(i)).expect("get"), expected, "key {i} after round {round}");
    }
}

fn closes_cleanly(durability: Durability, batches: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || FjallStore::open(dir.path(), StoreOptions::new(durability)).expect("open");
    let mut last_seqno = 0;
    for round in 0..3 {
        let mut store = open();
        if round > 0 {
            // Written before the last close, served from the engine's tables alone.
            check(&store, round - 1, batches, Some(round - 1));
        }
        // Overwrite every key and delete one: after a reopen that replayed nothing these must
        // still win over the versions already in the tables (the engine's sequence numbers go
        // on from the tables', not from an empty journal). The first round writes every key
        // three times, so a numbering that started again at 0 would put the later rounds'
        // versions below the first round's, and the checks after the next reopen would see it.
        for _ in 0..if round == 0 { 3 } else { 1 } {
            write(&mut store, round, batches);
        }
        store.apply(vec![(key(round), None)]).expect("delete");
        check(&store, round, batches, Some(round));
        drop(store);
        let left = journal_bytes(dir.path());
        assert!(left <= 4096, "{durability:?}, round {round}: a clean close left {left} journal bytes for the next open to replay");
        // The engine, opened on its own, numbers on from every write so far. (Deleting the
        // journal instead of emptying it would restart it at 0: fjall takes its sequence number
        // from the tables only while an active journal file exists.)
        let seqno = fjall::Database::builder(dir.path().join("fjall")).open().expect("open the engine").seqno();
        assert!(seqno > last_seqno, "{durability:?}, round {round}: the engine reopens at sequence number {seqno}, not past {last_seqno}");
        last_seqno = seqno;
    }
    let store = open();
    check(&store, 2, batches, Some(2));
}

#[test]
fn a_clean_close_leaves_no_journal_in_group_mode() {
    closes_cleanly(Durability::GROUP, 5_000);
}

#[test]
fn a_clean_close_leaves_no_journal_in_buffered_mode() {
    closes_cleanly(Durability::Buffered, 2_000);
}

#[test]
fn a_clean_close_leaves_no_journal_in_sync_mode() {
    closes_cleanly(Durability::Sync, 100);
}
