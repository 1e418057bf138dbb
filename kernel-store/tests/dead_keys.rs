//! Keys created and deleted between checkpoints leave no trace, but a key the engine holds,
//! overwritten and then deleted, keeps its tombstone: its old value never comes back, also
//! after the store's filter of engine keys has been rebuilt and after a reopen.

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
