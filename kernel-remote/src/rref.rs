//! Identifiers of the remote layer: [`KernelId`] (a kernel's name on the network), [`RRef`]
//! (a reference as one link names it: `ro+3`, `rp-1`) and [`PeerSeq`] (a per-peer message
//! sequence number).
//!
//! A link's c-list in the kernel holds [`VRef`]s, whose `+` means "allocated by the endpoint" —
//! for a link, by the peer. An rref's `+` means "allocated by us", this kernel. So an rref is its
//! c-list vref with the sign flipped, and the same reference named by the two ends of a link has
//! opposite signs: our `ro+4` is the peer's `ro-4`. On the wire a reference is the sender's rref;
//! the receiver flips it.

use crate::error::ParseError;
use kernel_core::{Allocator, RefKind, VRef};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The longest kernel id accepted.
pub const MAX_KERNEL_ID_LEN: usize = 64;

/// A kernel's name on the network: 1 to 64 ASCII letters, digits, `.`, `_` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KernelId(String);

impl KernelId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KernelId {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok = !s.is_empty()
            && s.len() <= MAX_KERNEL_ID_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
        if ok {
            Ok(KernelId(s))
        } else {
            Err(ParseError { what: "kernel id", text: s })
        }
    }
}

impl From<KernelId> for String {
    fn from(k: KernelId) -> String {
        k.0
    }
}

impl FromStr for KernelId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KernelId::try_from(s.to_owned())
    }
}

impl fmt::Display for KernelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A per-peer message sequence number, counted from 1 in each direction of each link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerSeq(pub u64);

impl fmt::Display for PeerSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A reference as one end of a link names it: `ro+N` / `rp+N` (allocated by this kernel) or
/// `ro-N` / `rp-N` (allocated by the peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RRef {
    /// Object or promise.
    pub kind: RefKind,
    /// True if this kernel allocated it (`+`).
    pub ours: bool,
    /// The index within (kind, allocator).
    pub index: u64,
}

impl RRef {
    /// The bootstrap object of the kernel naming it: `ro+0`. Each kernel says which of its
    /// objects that is; the peer reaches it as `ro-0`, its link's root object.
    pub const BOOTSTRAP: RRef = RRef { kind: RefKind::Object, ours: true, index: 0 };

    /// The rref for a link c-list entry.
    pub fn from_clist(v: VRef) -> RRef {
        RRef { kind: v.kind, ours: v.allocator == Allocator::Kernel, index: v.index }
    }

    /// The link c-list entry for this rref.
    pub fn to_clist(self) -> VRef {
        let allocator = if self.ours { Allocator::Kernel } else { Allocator::Endpoint };
        VRef { kind: self.kind, allocator, index: self.index }
    }

    /// The same reference as the other end of the link names it.
    pub fn flip(self) -> RRef {
        RRef { ours: !self.ours, ..self }
    }

    /// True for promises.
    pub fn is_promise(self) -> bool {
        self.kind == RefKind::Promise
    }
}

impl fmt::Display for RRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = match self.kind {
            RefKind::Object => 'o',
            RefKind::Promise => 'p',
        };
        let sign = if self.ours { '+' } else { '-' };
        write!(f, "r{k}{sign}{}", self.index)
    }
}

impl FromStr for RRef {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError { what: "rref", text: s.to_owned() };
        let rest = s.strip_prefix('r').ok_or_else(err)?;
        let v: VRef = rest.parse().map_err(|_| err())?;
        Ok(RRef { kind: v.kind, ours: v.allocator == Allocator::Endpoint, index: v.index })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrefs_print_and_parse() {
        for s in ["ro+0", "ro-3", "rp+1", "rp-17"] {
            let r: RRef = s.parse().expect("valid rref");
            assert_eq!(r.to_string(), s);
        }
        for s in ["o+1", "r", "ro", "ro+", "ro+01", "rx+1", "ro*1"] {
            assert!(s.parse::<RRef>().is_err(), "{s:?} must not parse");
        }
    }

    #[test]
    fn an_rref_is_its_clist_vref_with_the_sign_flipped() {
        let ours = RRef { kind: RefKind::Object, ours: true, index: 4 };
        assert_eq!(ours.to_clist(), VRef::import(4), "we allocated it: the kernel's import");
        assert_eq!(RRef::from_clist(VRef::export(2)).to_string(), "ro-2", "the peer allocated it");
        assert_eq!(ours.flip().to_string(), "ro-4");
        for v in [VRef::export(1), VRef::import(2), VRef::local_promise(3), VRef::imported_promise(4)] {
            assert_eq!(RRef::from_clist(v).to_clist(), v);
        }
    }

    #[test]
    fn kernel_ids_are_checked() {
        assert!("node-a.1_x".parse::<KernelId>().is_ok());
        for s in ["", "a b", "a/b", &"x".repeat(65)] {
            assert!(s.parse::<KernelId>().is_err(), "{s:?}");
        }
    }
}
