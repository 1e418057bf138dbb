//! [`VatData`]: CapData as a vat sees it, with vrefs in its slots.

use kernel_core::VRef;
use serde::{Deserialize, Serialize};

/// Data with capabilities, vat side: an opaque body and the vrefs it carries, in order.
///
/// Bodies follow the kernel's documented encoding (JSON, with `{"$slot":N}` for the N-th slot);
/// the kernel itself only looks for the exact body of a single reference.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct VatData {
    /// The encoded value.
    pub body: Vec<u8>,
    /// The references it carries.
    pub slots: Vec<VRef>,
}

impl VatData {
    /// Data with no references.
    pub fn plain(body: impl Into<Vec<u8>>) -> Self {
        VatData { body: body.into(), slots: Vec::new() }
    }

    /// A value that is exactly one reference.
    pub fn reference(r: VRef) -> Self {
        VatData { body: kernel_core::CapData::REF_BODY.to_vec(), slots: vec![r] }
    }

    /// If this value is exactly one reference, that reference.
    pub fn as_reference(&self) -> Option<VRef> {
        match self.slots.as_slice() {
            [r] if self.body == kernel_core::CapData::REF_BODY => Some(*r),
            _ => None,
        }
    }

    /// The body as text (lossy for non-UTF-8 bodies).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }
}
