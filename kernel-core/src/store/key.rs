//! [`Key`]: store keys that compare with integer instructions, for the in-memory maps.

use std::cmp::Ordering;

/// A store key held so that comparing two keys is a few integer comparisons instead of a
/// `memcmp` call: the first 32 bytes as two big-endian `u128`s (zero-padded), the rest (if any)
/// boxed, and the length. Their order (as a derive would give it) is exactly the bytes' lexicographic order: padding
/// can only tie a key with a longer one that continues with zeros, and then the shorter, a
/// prefix, sorts first through `rest` and `len`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    hi: u128,
    lo: u128,
    rest: Box<[u8]>,
    len: usize,
}

impl Ord for Key {
    /// The order a derive would give (`hi`, `lo`, `rest`, `len`), without comparing two empty
    /// `rest`s: most keys fit in 32 bytes, and a slice comparison is a `memcmp` call.
    fn cmp(&self, other: &Self) -> Ordering {
        self.hi.cmp(&other.hi).then(self.lo.cmp(&other.lo)).then_with(|| {
            if self.rest.is_empty() && other.rest.is_empty() {
                self.len.cmp(&other.len)
            } else {
                self.rest.cmp(&other.rest).then(self.len.cmp(&other.len))
            }
        })
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Key {
    pub(crate) fn new(b: &[u8]) -> Self {
        let word = |from: usize| {
            let mut w = [0u8; 16];
            if from < b.len() {
                let n = (b.len() - from).min(16);
                w[..n].copy_from_slice(&b[from..from + n]);
            }
            u128::from_be_bytes(w)
        };
        let rest: Box<[u8]> = if b.len() > 32 { b[32..].into() } else { Box::default() };
        Key { hi: word(0), lo: word(16), rest, len: b.len() }
    }

    pub(crate) fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        let head = self.len.min(32);
        let mut words = [0u8; 32];
        words[..16].copy_from_slice(&self.hi.to_be_bytes());
        words[16..].copy_from_slice(&self.lo.to_be_bytes());
        v.extend_from_slice(&words[..head]);
        v.extend_from_slice(&self.rest);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_exactly_like_their_bytes() {
        let samples: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            b"a".to_vec(),
            b"a\0".to_vec(),
            b"ab".to_vec(),
            vec![b'x'; 16],
            vec![b'x'; 17],
            [vec![b'x'; 32], vec![0]].concat(),
            vec![b'x'; 32],
            vec![b'x'; 33],
            [vec![b'x'; 31], vec![0xff]].concat(),
            [vec![b'x'; 40], vec![1]].concat(),
            vec![0xff; 64],
        ];
        for a in &samples {
            assert_eq!(&Key::new(a).to_vec(), a);
            for b in &samples {
                assert_eq!(Key::new(a).cmp(&Key::new(b)), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }
}
