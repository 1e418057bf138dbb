//! [`KeyFilter`]: a Bloom filter of the keys the engine may hold, so the overlay can tell, most
//! of the time without asking fjall, that a key created since the last checkpoint and deleted
//! again was never in the engine (and can be forgotten at once, with no tombstone).
//!
//! Each checkpoint stores it in the engine, in the same atomic write (the store's reserved key
//! `0xFF keys`, checksummed), so an open reads it back. Without one (a store written before it
//! existed, or a damaged one), [`EngineKeys`] builds it from the engine's keys on a background
//! thread (so a store of a million keys still opens in milliseconds; until the scan is done
//! every question goes to fjall). It takes every key a checkpoint sets. Keys the engine later
//! deletes stay in it (a Bloom filter cannot remove), which only makes it answer "maybe" more
//! often; once it has taken more keys than it was sized for, it is built again the same way. "Maybe" is settled by asking the engine, so it
//! is never wrong in the direction that matters: it never says "absent" of a key the engine
//! holds.

use fjall::Keyspace;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// Bits per key the filter is sized for (a few percent false positives with four probes).
const BITS_PER_KEY: u64 = 10;
const PROBES: u32 = 4;
/// Words per block: every probe of a key falls in one 512-bit block (one cache line), so a
/// lookup costs one cache miss, not four.
const BLOCK_WORDS: usize = 8;
/// The fewest keys a filter is sized for.
const MIN_KEYS: u64 = 1 << 16;

/// A blocked Bloom filter over byte keys.
#[derive(Debug)]
pub(crate) struct KeyFilter {
    bits: Vec<u64>,
    /// The number of blocks, minus one (a power of two, minus one).
    mask: u64,
    /// Keys inserted.
    inserted: u64,
    /// Keys it was sized for.
    capacity: u64,
}

impl KeyFilter {
    /// An empty filter sized for `keys` keys (at least [`MIN_KEYS`]), with room to grow to twice
    /// that before it must be rebuilt.
    pub fn with_capacity(keys: u64) -> Self {
        let capacity = (keys.saturating_mul(2)).max(MIN_KEYS);
        let blocks = (capacity.saturating_mul(BITS_PER_KEY) / 512).next_power_of_two();
        KeyFilter { bits: vec![0; blocks as usize * BLOCK_WORDS], mask: blocks - 1, inserted: 0, capacity }
    }

    /// The word index and bit of each probe of `key`, all in one block.
    fn probes(&self, key: &[u8]) -> impl Iterator<Item = (usize, u64)> + use<> {
        let h = xxh3_128(key);
        let block = ((h as u64) & self.mask) as usize * BLOCK_WORDS;
        let bits = (h >> 64) as u64;
        (0..PROBES).map(move |i| {
            let bit = (bits >> (9 * i)) & 511;
            (block + (bit / 64) as usize, 1 << (bit % 64))
        })
    }

    /// Take `key`.
    pub fn insert(&mut self, key: &[u8]) {
        for (word, bit) in self.probes(key) {
            self.bits[word] |= bit;
        }
        self.inserted += 1;
    }

    /// False only if `key` was never inserted.
    pub fn may_hold(&self, key: &[u8]) -> bool {
        self.probes(key).all(|(word, bit)| self.bits[word] & bit != 0)
    }

    /// It has taken more keys than it was sized for: build it again.
    pub fn overfull(&self) -> bool {
        self.inserted > self.capacity
    }

    /// The filter as bytes: capacity, keys inserted, block mask, the bits, and a checksum of all
    /// that (little-endian u64s).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * (self.bits.len() + 4));
        for w in [self.capacity, self.inserted, self.mask].iter().chain(&self.bits) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// A filter from [`KeyFilter::to_bytes`]; `None` if the bytes are not one, whole.
    pub fn from_bytes(bytes: &[u8]) -> Option<KeyFilter> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(8)?)?;
        if xxh3_64(body).to_le_bytes() != sum || body.len() % 8 != 0 {
            return None;
        }
        let mut words = body.chunks_exact(8).map(|c| c.try_into().map(u64::from_le_bytes).unwrap_or_default());
        let (capacity, inserted, mask) = (words.next()?, words.next()?, words.next()?);
        let bits: Vec<u64> = words.collect();
        let blocks = mask.checked_add(1)?;
        (blocks.is_power_of_two() && bits.len() as u64 == blocks * BLOCK_WORDS as u64).then_some(KeyFilter {
            bits,
            mask,
            inserted,
            capacity,
        })
    }

    /// Take every key `other` holds (a filter of the same capacity).
    fn union(&mut self, other: &KeyFilter) {
        debug_assert_eq!(self.bits.len(), other.bits.len());
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
        self.inserted += other.inserted;
    }
}

/// What the store knows of the keys its engine holds: a [`KeyFilter`] of them, built by a
/// background scan of the engine. Dropping it stops a scan in progress (declared before the
/// store's journal reset, so fjall is closed by then).
pub(crate) struct EngineKeys {
    data: Keyspace,
    /// The filter in use (`None` until the first scan is done).
    ready: Option<KeyFilter>,
    /// A scan in progress, and the keys checkpoints wrote since it began.
    scan: Option<Scan>,
}

#[derive(Debug)]
struct Scan {
    since: KeyFilter,
    thread: Option<JoinHandle<Option<KeyFilter>>>,
    stop: Arc<AtomicBool>,
}

impl EngineKeys {
    /// The filter `stored` by the last checkpoint ([`EngineKeys::persisted`]), or, if there is
    /// none or it is damaged, a scan of `data`'s keys.
    pub fn open(data: Keyspace, stored: Option<&[u8]>) -> Self {
        let ready = stored.and_then(KeyFilter::from_bytes);
        let mut keys = EngineKeys { data, ready, scan: None };
        if keys.ready.is_none() {
            keys.rescan();
        }
        keys
    }

    /// The filter to store with a checkpoint (after its keys were inserted): `None` while the
    /// first scan is still running, when there is none to store.
    pub fn persisted(&self) -> Option<Vec<u8>> {
        self.ready.as_ref().map(KeyFilter::to_bytes)
    }

    fn rescan(&mut self) {
        let capacity = self.data.approximate_len() as u64;
        let stop = Arc::new(AtomicBool::new(false));
        let (data, halt) = (self.data.clone(), Arc::clone(&stop));
        // The scan's snapshot and `since` (every key written after it began) together hold
        // every key the engine holds when it ends. Failing to start is failing to scan: every
        // question then goes to fjall.
        let thread = std::thread::Builder::new()
            .name("kernel-store keys".into())
            .spawn(move || {
                let mut filter = KeyFilter::with_capacity(capacity);
                for (i, guard) in data.iter().enumerate() {
                    if i % 4096 == 0 && halt.load(Ordering::Relaxed) {
                        return None;
                    }
                    filter.insert(&guard.key().ok()?);
                }
                Some(filter)
            })
            .ok();
        self.scan = Some(Scan { since: KeyFilter::with_capacity(capacity), thread, stop });
    }

    /// A finished scan becomes the filter in use.
    fn poll(&mut self) {
        let Some(scan) = &mut self.scan else { return };
        if !scan.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            return;
        }
        // A scan that failed leaves the old filter (if any) in use; the next checkpoint's
        // `maintain` tries again.
        if let Some(Ok(Some(mut filter))) = scan.thread.take().map(JoinHandle::join) {
            filter.union(&scan.since);
            self.ready = Some(filter);
        }
        self.scan = None;
    }

    /// True if the engine may hold `key`: false only when the filter is sure it does not;
    /// otherwise the engine is asked (an engine error reads as "held").
    pub fn may_hold(&mut self, key: &[u8]) -> bool {
        self.poll();
        // Before the first scan is done nothing is known of the keys it has not reached.
        let maybe = self.ready.as_ref().is_none_or(|f| f.may_hold(key));
        maybe && self.data.contains_key(key).unwrap_or(true)
    }

    /// A checkpoint wrote `key`.
    pub fn insert(&mut self, key: &[u8]) {
        if let Some(f) = &mut self.ready {
            f.insert(key);
        }
        if let Some(scan) = &mut self.scan {
            scan.since.insert(key);
        }
    }

    /// After a checkpoint: once the filter in use has taken more keys than it was sized for, or
    /// if there is none (a scan failed), scan again (an old filter serves meanwhile: it holds
    /// every key the new one would, and more).
    pub fn maintain(&mut self) {
        self.poll();
        if self.scan.is_none() && self.ready.as_ref().is_none_or(KeyFilter::overfull) {
            self.rescan();
        }
    }
}

impl Drop for EngineKeys {
    /// Stop a scan in progress and wait for it: the engine must be free to close.
    fn drop(&mut self) {
        if let Some(scan) = &mut self.scan {
            scan.stop.store(true, Ordering::Relaxed);
            if let Some(t) = scan.thread.take() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_keys_are_always_maybe_and_others_mostly_not() {
        let keys: Vec<Vec<u8>> = (0..10_000u32).map(|i| format!("kp/{i}").into_bytes()).collect();
        let mut f = KeyFilter::with_capacity(keys.len() as u64);
        for k in &keys {
            f.insert(k);
        }
        assert!(keys.iter().all(|k| f.may_hold(k)));
        let false_positives = (0..10_000u32).filter(|i| f.may_hold(format!("ko/{i}").as_bytes())).count();
        assert!(false_positives < 200, "{false_positives} of 10,000");
        assert!(!f.overfull());
    }

    #[test]
    fn stored_bytes_read_back_and_damage_is_refused() {
        let mut f = KeyFilter::with_capacity(100);
        f.insert(b"a");
        let bytes = f.to_bytes();
        let back = KeyFilter::from_bytes(&bytes).expect("reads back");
        assert!(back.may_hold(b"a") && back.inserted == 1 && back.capacity == f.capacity);
        for i in [0, 9, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(KeyFilter::from_bytes(&bad).is_none(), "a flipped byte at {i}");
        }
        assert!(KeyFilter::from_bytes(&bytes[..bytes.len() - 8]).is_none());
        assert!(KeyFilter::from_bytes(&[]).is_none());
    }

    #[test]
    fn a_stored_filter_serves_at_once_and_a_damaged_one_is_rebuilt_by_a_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = fjall::Database::builder(dir.path()).open().expect("open");
        let data = db.keyspace("kernel", fjall::KeyspaceCreateOptions::default).expect("keyspace");
        data.insert(b"held", b"v").expect("insert");
        let mut stored = KeyFilter::with_capacity(1);
        stored.insert(b"held");
        let bytes = stored.to_bytes();
        let keys = EngineKeys::open(data.clone(), Some(&bytes));
        assert_eq!(keys.persisted(), Some(bytes.clone()), "read back, no scan");
        let mut damaged = bytes.clone();
        damaged[20] ^= 1;
        let mut keys = EngineKeys::open(data.clone(), Some(&damaged));
        // Until its scan is done it asks the engine; once done, the scan's filter serves.
        assert!(keys.may_hold(b"held"));
        assert!(!keys.may_hold(b"never"));
        let start = std::time::Instant::now();
        while keys.persisted().is_none() {
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "the scan never finished");
            keys.maintain();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let scanned = KeyFilter::from_bytes(&keys.persisted().expect("scanned")).expect("decodes");
        assert!(scanned.may_hold(b"held"));
    }

    #[test]
    fn it_asks_to_be_rebuilt_past_its_size() {
        let mut f = KeyFilter::with_capacity(0);
        for i in 0..MIN_KEYS {
            f.insert(&i.to_be_bytes());
        }
        assert!(!f.overfull());
        f.insert(b"one more");
        assert!(f.overfull());
    }
}
