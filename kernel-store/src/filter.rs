//! [`KeyFilter`]: a Bloom filter of the keys the engine may hold, so the overlay can tell, most
//! of the time without asking fjall, that a key created since the last checkpoint and deleted
//! again was never in the engine (and can be forgotten at once, with no tombstone).
//!
//! It is built from the engine's keys when the store opens and takes every key a checkpoint
//! sets. Keys the engine later deletes stay in it (a Bloom filter cannot remove), which only
//! makes it answer "maybe" more often; once it has taken more keys than it was sized for, the
//! store builds it again from the engine. "Maybe" is settled by asking the engine, so the filter
//! is never wrong in the direction that matters: it never says "absent" of a key the engine
//! holds.

use xxhash_rust::xxh3::xxh3_128;

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
