//! FjallStore against MemStore, the obviously correct model: the same random batches, then the
//! same answers to `get` and to prefix scans through `next`, in every durability mode (under
//! group commit the answers merge batches still held in memory with the engine's), across
//! syncs and a reopen.

use kernel_core::{MemStore, Store, WriteBatch};
use kernel_store::{Durability, FjallStore, StoreOptions};
use std::time::Duration;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

const PREFIXES: [&[u8]; 3] = [b"a/", b"b/", b"ab"];

fn key(rng: &mut Rng) -> Vec<u8> {
    let mut k = PREFIXES[rng.below(3) as usize].to_vec();
    k.push(b'0' + rng.below(6) as u8);
    k
}

fn batch(rng: &mut Rng) -> WriteBatch {
    let mut b: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..1 + rng.below(4))
        .map(|_| {
            let k = key(rng);
            let v = (rng.below(3) > 0).then(|| vec![rng.below(256) as u8]);
            (k, v)
        })
        .collect();
    // A transaction's batch is sorted with one write per key.
    b.sort_by(|x, y| x.0.cmp(&y.0));
    b.dedup_by(|x, y| x.0 == y.0);
    b
}

fn scan<S: Store>(s: &S, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    while let Some((k, v)) = s.next(prefix, after.as_deref()).expect("next") {
        after = Some(k.clone());
        out.push((k, v));
    }
    out
}

fn agree(fjall: &FjallStore, model: &MemStore, step: usize) {
    for p in PREFIXES.iter().chain([&b"a".as_slice(), &b"".as_slice()]) {
        assert_eq!(scan(fjall, p), scan(model, p), "scan {:?} after step {step}", p.escape_ascii().to_string());
        for d in 0..6u8 {
            let mut k = p.to_vec();
            k.push(b'0' + d);
            assert_eq!(fjall.get(&k).expect("get"), model.get(&k).expect("get"), "get {k:?} after step {step}");
        }
    }
    // `after` inside the prefix, between keys.
    assert_eq!(fjall.next(b"a/", Some(b"a/2x")).expect("next"), model.next(b"a/", Some(b"a/2x")).expect("next"));
}

fn run(durability: Durability, seed: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(seed);
    let mut model = MemStore::new();
    let mut fjall = FjallStore::open(dir.path(), StoreOptions::new(durability)).expect("open");
    for step in 0..200 {
        let b = batch(&mut rng);
        model.apply(b.clone()).expect("model");
        fjall.apply(b).expect("apply");
        if rng.below(25) == 0 {
            fjall.sync().expect("sync");
        }
        if step == 100 {
            drop(fjall);
            fjall = FjallStore::open(dir.path(), StoreOptions::new(durability)).expect("reopen");
        }
        agree(&fjall, &model, step);
    }
    assert_eq!(fjall.entries().expect("entries").into_iter().collect::<Vec<_>>(), scan(&model, b""));
}

#[test]
fn every_mode_answers_like_the_model() {
    run(Durability::Sync, 1);
    for seed in 1..3 {
        run(Durability::Buffered, seed);
        run(Durability::Group { max_cranks: 7, max_delay: Duration::from_secs(3600) }, seed);
        run(Durability::Group { max_cranks: 1_000_000, max_delay: Duration::from_secs(3600) }, seed);
    }
}

/// Keys a group creates and deletes again need no tombstone in the engine, but only if the
/// engine does not hold them: one it held before the group (then set and deleted again) must
/// stay deleted after the group is written and the store reopened.
#[test]
fn keys_created_and_deleted_within_a_group_stay_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let group = Durability::Group { max_cranks: 1_000_000, max_delay: Duration::from_secs(3600) };
    let key = |n: u32| [b"q/".as_slice(), &n.to_be_bytes()].concat();
    let mut fjall = FjallStore::open(dir.path(), StoreOptions::new(group)).expect("open");
    // In the engine before the group: q/3, q/20 and one beyond every run, q/99.
    fjall.apply([3, 20, 99].map(|n| (key(n), Some(b"old".to_vec()))).to_vec()).expect("apply");
    fjall.sync().expect("sync");
    // The group: q/0..40 queued, then all but q/10 delivered (deleted); q/3 and q/20 among them.
    for n in 0..40 {
        fjall.apply(vec![(key(n), Some(vec![n as u8]))]).expect("queue");
    }
    for n in (0..40).filter(|&n| n != 10) {
        fjall.apply(vec![(key(n), None)]).expect("deliver");
    }
    fjall.sync().expect("sync");
    drop(fjall);
    let fjall = FjallStore::open(dir.path(), StoreOptions::new(group)).expect("reopen");
    let left: Vec<_> = scan(&fjall, b"q/").into_iter().map(|(k, _)| k).collect();
    assert_eq!(left, vec![key(10), key(99)]);
}
