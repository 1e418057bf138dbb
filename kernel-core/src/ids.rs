//! Identifiers: kernel references (`ko12`, `kp3`), endpoint-local references (`o+0`, `p-2`),
//! endpoint ids and crank numbers. Parsed at the edge with `FromStr`, printed canonically by
//! `Display`, and encoded into byte-ordered store keys by [`KRef::key_bytes`] / [`VRef::key_bytes`].

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Why a reference's text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what} {text:?}")]
pub struct ParseRefError {
    /// What kind of identifier was expected (`kref`, `vref`, ...).
    pub what: &'static str,
    /// The offending text.
    pub text: String,
}

fn parse_index(what: &'static str, text: &str, digits: &str) -> Result<u64, ParseRefError> {
    let err = || ParseRefError { what, text: text.to_owned() };
    // Canonical decimal only: no sign, no leading zeros (except "0" itself), no overflow.
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || (digits.len() > 1 && digits.starts_with('0')) {
        return Err(err());
    }
    digits.parse().map_err(|_| err())
}

/// A kernel object id: `ko<N>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KObjectId(pub u64);

/// A kernel promise id: `kp<N>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KPromiseId(pub u64);

/// A kernel-wide reference: an object or a promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KRef {
    /// `ko<N>`
    Object(KObjectId),
    /// `kp<N>`
    Promise(KPromiseId),
}

impl KRef {
    /// The promise id, if this is a promise.
    pub fn as_promise(self) -> Option<KPromiseId> {
        match self {
            KRef::Promise(p) => Some(p),
            KRef::Object(_) => None,
        }
    }

    /// The object id, if this is an object.
    pub fn as_object(self) -> Option<KObjectId> {
        match self {
            KRef::Object(o) => Some(o),
            KRef::Promise(_) => None,
        }
    }

    /// A 9-byte key that sorts objects before promises and each by number.
    pub fn key_bytes(self) -> [u8; 9] {
        let (tag, n) = match self {
            KRef::Object(KObjectId(n)) => (b'o', n),
            KRef::Promise(KPromiseId(n)) => (b'p', n),
        };
        let mut k = [0u8; 9];
        k[0] = tag;
        k[1..].copy_from_slice(&n.to_be_bytes());
        k
    }

    /// The kref a [`KRef::key_bytes`] key stands for, if `b` is one.
    pub fn from_key_bytes(b: &[u8]) -> Option<KRef> {
        let (tag, n) = b.split_first()?;
        let n = u64::from_be_bytes(n.try_into().ok()?);
        match tag {
            b'o' => Some(KRef::Object(KObjectId(n))),
            b'p' => Some(KRef::Promise(KPromiseId(n))),
            _ => None,
        }
    }
}

impl From<KObjectId> for KRef {
    fn from(o: KObjectId) -> Self {
        KRef::Object(o)
    }
}

impl From<KPromiseId> for KRef {
    fn from(p: KPromiseId) -> Self {
        KRef::Promise(p)
    }
}

impl fmt::Display for KObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ko{}", self.0)
    }
}

impl fmt::Display for KPromiseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kp{}", self.0)
    }
}

impl fmt::Display for KRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KRef::Object(o) => o.fmt(f),
            KRef::Promise(p) => p.fmt(f),
        }
    }
}

impl FromStr for KRef {
    type Err = ParseRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(d) = s.strip_prefix("ko") {
            Ok(KRef::Object(KObjectId(parse_index("kref", s, d)?)))
        } else if let Some(d) = s.strip_prefix("kp") {
            Ok(KRef::Promise(KPromiseId(parse_index("kref", s, d)?)))
        } else {
            Err(ParseRefError { what: "kref", text: s.to_owned() })
        }
    }
}

impl FromStr for KObjectId {
    type Err = ParseRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<KRef>() {
            Ok(KRef::Object(o)) => Ok(o),
            _ => Err(ParseRefError { what: "object kref", text: s.to_owned() }),
        }
    }
}

impl FromStr for KPromiseId {
    type Err = ParseRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse::<KRef>() {
            Ok(KRef::Promise(p)) => Ok(p),
            _ => Err(ParseRefError { what: "promise kref", text: s.to_owned() }),
        }
    }
}

/// Whether a local reference names an object or a promise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RefKind {
    /// `o±N`
    Object,
    /// `p±N`
    Promise,
}

/// Who allocated a local reference: the endpoint itself (`+`) or the kernel (`-`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Allocator {
    /// `+`: allocated by the endpoint (an export, or a promise it made).
    Endpoint,
    /// `-`: allocated by the kernel (an import).
    Kernel,
}

/// An endpoint-local reference as a c-list holds it: `o+0`, `o-4`, `p+1`, `p-2`.
///
/// Vats see these as vrefs; a remote link uses the same shape for its rrefs (`ro±N`, `rp±N`),
/// so the kernel's c-list needs only this one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VRef {
    /// Object or promise.
    pub kind: RefKind,
    /// Who allocated it.
    pub allocator: Allocator,
    /// The index within (kind, allocator).
    pub index: u64,
}

impl VRef {
    /// `o+<index>`: an object the endpoint exports.
    pub const fn export(index: u64) -> Self {
        VRef { kind: RefKind::Object, allocator: Allocator::Endpoint, index }
    }
    /// `o-<index>`: an object the endpoint imports.
    pub const fn import(index: u64) -> Self {
        VRef { kind: RefKind::Object, allocator: Allocator::Kernel, index }
    }
    /// `p+<index>`: a promise the endpoint allocated.
    pub const fn local_promise(index: u64) -> Self {
        VRef { kind: RefKind::Promise, allocator: Allocator::Endpoint, index }
    }
    /// `p-<index>`: a promise the kernel gave the endpoint.
    pub const fn imported_promise(index: u64) -> Self {
        VRef { kind: RefKind::Promise, allocator: Allocator::Kernel, index }
    }
    /// The root object every vat exports: `o+0`.
    pub const ROOT: VRef = VRef::export(0);

    /// True for promise references.
    pub fn is_promise(self) -> bool {
        self.kind == RefKind::Promise
    }

    /// A 10-byte key that sorts by kind, allocator and index.
    pub fn key_bytes(self) -> [u8; 10] {
        let mut k = [0u8; 10];
        k[0] = match self.kind {
            RefKind::Object => b'o',
            RefKind::Promise => b'p',
        };
        k[1] = match self.allocator {
            Allocator::Endpoint => b'+',
            Allocator::Kernel => b'-',
        };
        k[2..].copy_from_slice(&self.index.to_be_bytes());
        k
    }

    /// The vref a [`VRef::key_bytes`] key stands for, if `b` is one.
    pub fn from_key_bytes(b: &[u8]) -> Option<VRef> {
        let [kind, alloc, n @ ..] = b else { return None };
        let index = u64::from_be_bytes(n.try_into().ok()?);
        let kind = match kind {
            b'o' => RefKind::Object,
            b'p' => RefKind::Promise,
            _ => return None,
        };
        let allocator = match alloc {
            b'+' => Allocator::Endpoint,
            b'-' => Allocator::Kernel,
            _ => return None,
        };
        Some(VRef { kind, allocator, index })
    }
}

impl fmt::Display for VRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match self.kind {
            RefKind::Object => 'o',
            RefKind::Promise => 'p',
        };
        let a = match self.allocator {
            Allocator::Endpoint => '+',
            Allocator::Kernel => '-',
        };
        write!(f, "{k}{a}{}", self.index)
    }
}

impl FromStr for VRef {
    type Err = ParseRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseRefError { what: "vref", text: s.to_owned() };
        let mut chars = s.chars();
        let kind = match chars.next() {
            Some('o') => RefKind::Object,
            Some('p') => RefKind::Promise,
            _ => return Err(err()),
        };
        let allocator = match chars.next() {
            Some('+') => Allocator::Endpoint,
            Some('-') => Allocator::Kernel,
            _ => return Err(err()),
        };
        let index = parse_index("vref", s, chars.as_str())?;
        Ok(VRef { kind, allocator, index })
    }
}

/// An endpoint (a vat, or later a remote kernel) as the kernel numbers it: `e<N>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EndpointId(pub u32);

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

impl FromStr for EndpointId {
    type Err = ParseRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseRefError { what: "endpoint id", text: s.to_owned() };
        let d = s.strip_prefix('e').ok_or_else(err)?;
        let n = parse_index("endpoint id", s, d)?;
        u32::try_from(n).map(EndpointId).map_err(|_| err())
    }
}

/// The number of a crank, counted from 1 over the life of a kernel store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CrankNumber(pub u64);

impl fmt::Display for CrankNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "crank {}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn krefs_round_trip_through_text() {
        for s in ["ko0", "ko12", "kp3", "kp18446744073709551615"] {
            let k: KRef = s.parse().expect("valid kref");
            assert_eq!(k.to_string(), s);
        }
    }

    #[test]
    fn vrefs_round_trip_through_text() {
        for s in ["o+0", "o-4", "p+1", "p-2", "o+99"] {
            let v: VRef = s.parse().expect("valid vref");
            assert_eq!(v.to_string(), s);
        }
        assert_eq!("o+0".parse::<VRef>(), Ok(VRef::ROOT));
    }

    #[test]
    fn malformed_refs_are_refused() {
        for s in ["", "o", "o+", "o+-1", "o+01", "x+1", "o*1", "o+1 ", "p-1a", "o+99999999999999999999"] {
            assert!(s.parse::<VRef>().is_err(), "{s:?} must not parse");
        }
        for s in ["", "ko", "k1", "ko-1", "ko01", "kq1", "ko1x"] {
            assert!(s.parse::<KRef>().is_err(), "{s:?} must not parse");
        }
        assert!("e4294967296".parse::<EndpointId>().is_err());
        assert_eq!("e7".parse::<EndpointId>(), Ok(EndpointId(7)));
    }

    #[test]
    fn key_bytes_sort_like_numbers() {
        let a = KRef::Object(KObjectId(2)).key_bytes();
        let b = KRef::Object(KObjectId(256)).key_bytes();
        assert!(a < b);
        assert!(VRef::export(9).key_bytes() < VRef::export(10).key_bytes());
        for k in [KRef::Object(KObjectId(2)), KRef::Promise(KPromiseId(u64::MAX))] {
            assert_eq!(KRef::from_key_bytes(&k.key_bytes()), Some(k));
        }
        for v in [VRef::export(9), VRef::import(3), VRef::imported_promise(7), VRef::ROOT] {
            assert_eq!(VRef::from_key_bytes(&v.key_bytes()), Some(v));
        }
        assert_eq!(VRef::from_key_bytes(b"x+\0\0\0\0\0\0\0\x01"), None);
    }
}
