//! Keys created and deleted between checkpoints leave no trace, but a key the engine holds,
//! overwritten and then deleted, keeps its tombstone: its old value never comes back, also
//! after the store's filter of engine keys has been rebuilt and after a reopen. And batches
//! that left nothing behind still move the engine's batch count on at a checkpoint.

mod common;

use common::snapshot;

use kernel_core::Store;
use kernel_store::{Durability, FjallStore, StoreOptions};
use std::path::Path;

fn open(dir: &Path) -> FjallStore {
    let options = StoreOptions { checkpoint_bytes: 256 << 10, ..StoreOptions::new(Durability::Buffered) };
    FjallStore::open(dir, options).expect("open")
}

fn set(k: &str, v: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    (k.as_bytes().to_vec(), Some(v.as_bytes().to_vec()))
}

fn del(k: &str) -> (Vec<u8>, Option<Vec<u8>>) {
    (k.as_bytes().to_vec(), None)
}

#[test]
fn an_engine_key_overwritten_then_deleted_stays_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = open(dir.path());
    s.apply(vec![set("held", "old"), set("kept", "1")]).expect("apply");
    drop(s); // a clean close checkpoints: the engine holds both
    let mut s = open(dir.path());
    // Enough distinct keys reaching the engine, over many checkpoints, to overfill the filter
    // sized at open (65,536 keys; it is then rebuilt from the engine at a checkpoint), and a
    // third of them deleted again right away.
    for round in 0..150u32 {
        let batch: Vec<_> = (0..1_000u32).map(|i| set(&format!("t/{round:04}/{i:04}"), "x")).collect();
        s.apply(batch).expect("apply");
        if round % 3 == 0 {
            let batch: Vec<_> = (0..1_000u32).map(|i| del(&format!("t/{round:04}/{i:04}"))).collect();
            s.apply(batch).expect("apply");
        }
    }
    // Overwrite the engine's key (its first write since the checkpoint is a set) and delete it.
    s.apply(vec![set("held", "new")]).expect("apply");
    s.apply(vec![del("held")]).expect("apply");
    assert_eq!(s.get(b"held").expect("get"), None);
    let live = s.entries().expect("entries");
    drop(s);
    let s = open(dir.path());
    assert_eq!(s.get(b"held").expect("get"), None, "the old value came back");
    assert_eq!(s.get(b"kept").expect("get"), Some(b"1".to_vec()));
    assert_eq!(s.entries().expect("entries"), live);
    assert_eq!(live.keys().filter(|k| k.starts_with(b"t/")).count(), 100 * 1_000);
}

#[test]
fn a_checkpoint_of_batches_that_left_nothing_still_moves_the_engine_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = StoreOptions { checkpoint_bytes: 4 << 10, ..StoreOptions::new(Durability::Sync) };
    let mut s = FjallStore::open(dir.path(), options.clone()).expect("open");
    // Keys that come and go: the overlay stays empty while the log passes a checkpoint.
    for i in 0..200u32 {
        let k = format!("run/{i:04}");
        s.apply(vec![set(&k, "x")]).expect("apply");
        s.apply(vec![del(&k)]).expect("apply");
    }
    s.apply(vec![set("kept", "1")]).expect("apply");
    let crashed = tempfile::tempdir().expect("tempdir");
    snapshot(dir.path(), crashed.path());
    let applied = s.applied();
    drop(s);
    let s = FjallStore::open(crashed.path(), options).expect("the log continues the engine");
    assert_eq!(s.applied(), applied);
    assert_eq!(s.get(b"kept").expect("get"), Some(b"1".to_vec()));
    assert_eq!(s.get(b"run/0007").expect("get"), None);
}
