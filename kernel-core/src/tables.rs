//! The kernel's tables in the store: byte-ordered keys, postcard values, and typed access
//! through [`KernelTxn`] (one store transaction plus the kernel counters it works on).
//!
//! Key layout (every number big-endian so keys sort numerically):
//! - `m/format` -> u32 format version
//! - `k/counters` -> [`Counters`]
//! - `q/<seq u64>` -> [`RunQueueItem`]
//! - `o/<ko u64>` -> [`ObjectRecord`]
//! - `p/<kp u64>` -> [`PromiseState`]
//! - `e/<ep u32>/r` -> name; `e/<ep u32>/s` -> [`EndpointStatus`]; `e/<ep u32>/c` -> [`ImportCounters`]
//! - `n/<name>` -> [`EndpointId`]
//! - `l/<ep u32>/k<kref 9 bytes>` -> [`VRef`]; `l/<ep u32>/v<vref 10 bytes>` -> [`KRef`]
//! - `s/<ep u32>/<key bytes>` -> vatstore value

use crate::error::KernelError;
use crate::ids::{EndpointId, KObjectId, KPromiseId, KRef, VRef};
use crate::message::{Message, RunQueueItem, Settlement};
use crate::store::{Entry, Store, Txn};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeMap;

/// The store format this kernel writes and reads.
pub const FORMAT_VERSION: u32 = 1;

pub(crate) const FORMAT_KEY: &[u8] = b"m/format";
pub(crate) const COUNTERS_KEY: &[u8] = b"k/counters";
pub(crate) const RUN_QUEUE_PREFIX: &[u8] = b"q/";
pub(crate) const OBJECT_PREFIX: &[u8] = b"o/";
pub(crate) const PROMISE_PREFIX: &[u8] = b"p/";
pub(crate) const ENDPOINT_PREFIX: &[u8] = b"e/";
pub(crate) const NAME_PREFIX: &[u8] = b"n/";

/// Kernel-wide counters, read once when the kernel opens and written with every transaction
/// that changes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Next `ko` number.
    pub next_object: u64,
    /// Next `kp` number.
    pub next_promise: u64,
    /// Next endpoint number.
    pub next_endpoint: u32,
    /// Cranks committed so far.
    pub cranks: u64,
    /// Sequence of the run queue's first item.
    pub queue_head: u64,
    /// Sequence the next queued item gets.
    pub queue_tail: u64,
}

/// A kernel object: who exports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    /// The exporting endpoint.
    pub owner: EndpointId,
    /// Pinned roots (vat roots) are never collected.
    pub pinned: bool,
}

/// A promise's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PromiseState {
    /// Not yet settled.
    Unresolved {
        /// Who may resolve it (`None`: the kernel, while its message is in flight).
        decider: Option<EndpointId>,
        /// Who is told when it settles.
        subscribers: Vec<EndpointId>,
        /// Messages sent to it, waiting for it to settle.
        queue: Vec<Message>,
    },
    /// Settled.
    Settled(Settlement),
}

impl PromiseState {
    /// A fresh unresolved promise.
    pub fn new(decider: Option<EndpointId>) -> Self {
        PromiseState::Unresolved { decider, subscribers: Vec::new(), queue: Vec::new() }
    }

    /// The decider, if unresolved.
    pub fn decider(&self) -> Option<EndpointId> {
        match self {
            PromiseState::Unresolved { decider, .. } => *decider,
            PromiseState::Settled(_) => None,
        }
    }
}

/// Whether an endpoint still runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndpointStatus {
    /// Receiving deliveries.
    Live,
    /// Terminated; the reason its promises were rejected with.
    Terminated {
        /// Human-readable reason.
        reason: String,
    },
}

/// An endpoint's durable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Its unique name.
    pub name: String,
    /// Live or terminated.
    pub status: EndpointStatus,
}

/// Counters for the refs the kernel allocates in one endpoint's c-list (`o-N`, `p-N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ImportCounters {
    /// Next `o-N`.
    pub next_object: u64,
    /// Next `p-N`.
    pub next_promise: u64,
}

pub(crate) fn u64_key(prefix: &[u8], n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

pub(crate) fn endpoint_key(ep: EndpointId, tail: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(7 + tail.len());
    k.extend_from_slice(ENDPOINT_PREFIX);
    k.extend_from_slice(&ep.0.to_be_bytes());
    k.push(b'/');
    k.extend_from_slice(tail);
    k
}

pub(crate) fn clist_prefix(ep: EndpointId) -> Vec<u8> {
    let mut k = Vec::with_capacity(20);
    k.extend_from_slice(b"l/");
    k.extend_from_slice(&ep.0.to_be_bytes());
    k.push(b'/');
    k
}

fn clist_kref_key(ep: EndpointId, kref: KRef) -> Vec<u8> {
    let mut k = clist_prefix(ep);
    k.push(b'k');
    k.extend_from_slice(&kref.key_bytes());
    k
}

fn clist_vref_key(ep: EndpointId, vref: VRef) -> Vec<u8> {
    let mut k = clist_prefix(ep);
    k.push(b'v');
    k.extend_from_slice(&vref.key_bytes());
    k
}

pub(crate) fn vatstore_prefix(ep: EndpointId) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(b"s/");
    k.extend_from_slice(&ep.0.to_be_bytes());
    k.push(b'/');
    k
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // postcard serialisation of these plain data types cannot fail (no maps with non-string
    // keys, no unsized sequences); an error here would be a programming error.
    postcard::to_allocvec(v).unwrap_or_else(|e| unreachable!("postcard encode of kernel record failed: {e}"))
}

pub(crate) fn decode<T: DeserializeOwned>(table: &'static str, key: &[u8], bytes: &[u8]) -> Result<T, KernelError> {
    postcard::from_bytes(bytes).map_err(|e| KernelError::Corrupt { table, key: key.escape_ascii().to_string(), reason: e.to_string() })
}

/// One transaction over the kernel's tables, with typed access to each.
pub struct KernelTxn<'s> {
    txn: Txn<'s, dyn Store + 's>,
    /// Promises written by this transaction, decoded; encoded once each at `finish`. A crank
    /// reads and rewrites the same few promises several times, so this saves most of the
    /// encoding and decoding.
    promises: BTreeMap<KPromiseId, PromiseState>,
    /// The counters as this transaction sees them; written back at commit if changed.
    pub counters: Counters,
    counters_dirty: bool,
}

impl<'s> KernelTxn<'s> {
    /// Begin a transaction over `store` whose committed counters are `counters`.
    pub fn begin(store: &'s (dyn Store + 's), counters: Counters) -> Self {
        KernelTxn { txn: Txn::begin(store), promises: BTreeMap::new(), counters, counters_dirty: false }
    }

    /// End the transaction: its batch (counters included) and the counters after it.
    pub fn finish(mut self) -> (crate::store::WriteBatch, Counters) {
        for (id, state) in std::mem::take(&mut self.promises) {
            self.txn.set(u64_key(PROMISE_PREFIX, id.0), encode(&state));
        }
        if self.counters_dirty {
            self.txn.set(COUNTERS_KEY.to_vec(), encode(&self.counters));
        }
        (self.txn.into_batch(), self.counters)
    }

    fn get<T: DeserializeOwned>(&self, table: &'static str, key: &[u8]) -> Result<Option<T>, KernelError> {
        match self.txn.get(key)? {
            Some(bytes) => decode(table, key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&mut self, key: Vec<u8>, v: &T) {
        self.txn.set(key, encode(v));
    }

    fn counters_mut(&mut self) -> &mut Counters {
        self.counters_dirty = true;
        &mut self.counters
    }

    // ---- run queue ----

    /// Append an item to the run queue.
    pub fn push_run_queue(&mut self, item: &RunQueueItem) {
        let c = self.counters_mut();
        let seq = c.queue_tail;
        c.queue_tail += 1;
        self.put(u64_key(RUN_QUEUE_PREFIX, seq), item);
    }

    /// Take the first item off the run queue.
    pub fn pop_run_queue(&mut self) -> Result<Option<RunQueueItem>, KernelError> {
        if self.counters.queue_head == self.counters.queue_tail {
            return Ok(None);
        }
        let key = u64_key(RUN_QUEUE_PREFIX, self.counters.queue_head);
        let item = self.get("run-queue", &key)?.ok_or_else(|| KernelError::Corrupt {
            table: "run-queue",
            key: key.escape_ascii().to_string(),
            reason: "queued item missing".into(),
        })?;
        self.txn.delete(key);
        self.counters_mut().queue_head += 1;
        Ok(Some(item))
    }

    /// Every queued item, in order.
    pub fn run_queue(&self) -> Result<Vec<RunQueueItem>, KernelError> {
        self.txn.scan_prefix(RUN_QUEUE_PREFIX)?.iter().map(|(k, v)| decode("run-queue", k, v)).collect()
    }

    // ---- objects ----

    /// Allocate a kernel object exported by `owner`.
    pub fn new_object(&mut self, owner: EndpointId, pinned: bool) -> KObjectId {
        let c = self.counters_mut();
        let id = KObjectId(c.next_object);
        c.next_object += 1;
        self.put(u64_key(OBJECT_PREFIX, id.0), &ObjectRecord { owner, pinned });
        id
    }

    /// An object's record.
    pub fn object(&self, id: KObjectId) -> Result<Option<ObjectRecord>, KernelError> {
        self.get("object", &u64_key(OBJECT_PREFIX, id.0))
    }

    // ---- promises ----

    /// Allocate an unresolved promise.
    pub fn new_promise(&mut self, decider: Option<EndpointId>) -> KPromiseId {
        let c = self.counters_mut();
        let id = KPromiseId(c.next_promise);
        c.next_promise += 1;
        self.promises.insert(id, PromiseState::new(decider));
        id
    }

    /// A promise's state.
    pub fn promise(&self, id: KPromiseId) -> Result<Option<PromiseState>, KernelError> {
        match self.promises.get(&id) {
            Some(p) => Ok(Some(p.clone())),
            None => self.get("promise", &u64_key(PROMISE_PREFIX, id.0)),
        }
    }

    /// Overwrite a promise's state.
    pub fn set_promise(&mut self, id: KPromiseId, state: &PromiseState) {
        self.promises.insert(id, state.clone());
    }

    /// True if the kernel has a record of `r`.
    pub fn exists(&self, r: KRef) -> Result<bool, KernelError> {
        Ok(match r {
            KRef::Object(o) => self.txn.get(&u64_key(OBJECT_PREFIX, o.0))?.is_some(),
            KRef::Promise(p) => self.promises.contains_key(&p) || self.txn.get(&u64_key(PROMISE_PREFIX, p.0))?.is_some(),
        })
    }

    // ---- endpoints ----

    /// Create an endpoint record named `name` and its root object.
    pub fn new_endpoint(&mut self, name: &str) -> (EndpointId, KObjectId) {
        let c = self.counters_mut();
        let ep = EndpointId(c.next_endpoint);
        c.next_endpoint += 1;
        self.set_endpoint(ep, &EndpointRecord { name: name.to_owned(), status: EndpointStatus::Live });
        self.put(name_key(name), &ep);
        let root = self.new_object(ep, true);
        self.clist_insert(ep, KRef::Object(root), VRef::ROOT);
        (ep, root)
    }

    /// An endpoint's record.
    pub fn endpoint(&self, ep: EndpointId) -> Result<Option<EndpointRecord>, KernelError> {
        let Some(name) = self.get::<String>("endpoint", &endpoint_key(ep, b"r"))? else { return Ok(None) };
        let status = self.endpoint_status(ep)?.ok_or_else(|| KernelError::Corrupt {
            table: "endpoint",
            key: endpoint_key(ep, b"s").escape_ascii().to_string(),
            reason: "status missing".into(),
        })?;
        Ok(Some(EndpointRecord { name, status }))
    }

    /// An endpoint's status alone (kept under its own key: routing reads it every crank).
    pub fn endpoint_status(&self, ep: EndpointId) -> Result<Option<EndpointStatus>, KernelError> {
        self.get("endpoint", &endpoint_key(ep, b"s"))
    }

    /// Overwrite an endpoint's record.
    pub fn set_endpoint(&mut self, ep: EndpointId, rec: &EndpointRecord) {
        self.put(endpoint_key(ep, b"r"), &rec.name);
        self.put(endpoint_key(ep, b"s"), &rec.status);
    }

    /// The endpoint registered under `name`.
    pub fn endpoint_by_name(&self, name: &str) -> Result<Option<EndpointId>, KernelError> {
        self.get("endpoint-name", &name_key(name))
    }

    /// True if `ep` exists and is not terminated.
    pub fn is_live(&self, ep: EndpointId) -> Result<bool, KernelError> {
        Ok(matches!(self.endpoint_status(ep)?, Some(EndpointStatus::Live)))
    }

    // ---- c-lists ----

    /// The local ref `ep` knows `kref` by.
    pub fn clist_vref(&self, ep: EndpointId, kref: KRef) -> Result<Option<VRef>, KernelError> {
        self.get("c-list", &clist_kref_key(ep, kref))
    }

    /// The kernel ref `ep`'s `vref` stands for.
    pub fn clist_kref(&self, ep: EndpointId, vref: VRef) -> Result<Option<KRef>, KernelError> {
        self.get("c-list", &clist_vref_key(ep, vref))
    }

    /// Record `kref <-> vref` in `ep`'s c-list.
    pub fn clist_insert(&mut self, ep: EndpointId, kref: KRef, vref: VRef) {
        self.put(clist_kref_key(ep, kref), &vref);
        self.put(clist_vref_key(ep, vref), &kref);
    }

    /// Forget `kref` in `ep`'s c-list (both directions), if present.
    pub fn clist_remove(&mut self, ep: EndpointId, kref: KRef) -> Result<(), KernelError> {
        if let Some(vref) = self.clist_vref(ep, kref)? {
            self.txn.delete(clist_kref_key(ep, kref));
            self.txn.delete(clist_vref_key(ep, vref));
        }
        Ok(())
    }

    /// Every `(kref, vref)` in `ep`'s c-list, ordered by kref.
    pub fn clist_entries(&self, ep: EndpointId) -> Result<Vec<(KRef, VRef)>, KernelError> {
        let mut prefix = clist_prefix(ep);
        prefix.push(b'k');
        let mut out = Vec::new();
        for (k, v) in self.txn.scan_prefix(&prefix)? {
            let vref: VRef = decode("c-list", &k, &v)?;
            let kref = kref_from_key_bytes(&k[prefix.len()..]).ok_or_else(|| KernelError::Corrupt {
                table: "c-list",
                key: k.escape_ascii().to_string(),
                reason: "bad kref key".into(),
            })?;
            out.push((kref, vref));
        }
        Ok(out)
    }

    /// Delete `ep`'s whole c-list.
    pub fn clist_clear(&mut self, ep: EndpointId) -> Result<(), KernelError> {
        for (k, _) in self.txn.scan_prefix(&clist_prefix(ep))? {
            self.txn.delete(k);
        }
        Ok(())
    }

    /// Allocate the next kernel-side ref of `kind` in `ep`'s c-list.
    pub fn next_import(&mut self, ep: EndpointId, promise: bool) -> Result<VRef, KernelError> {
        let key = endpoint_key(ep, b"c");
        let mut c: ImportCounters = self.get("endpoint-counters", &key)?.unwrap_or_default();
        let vref = if promise {
            c.next_promise += 1;
            VRef::imported_promise(c.next_promise)
        } else {
            c.next_object += 1;
            VRef::import(c.next_object)
        };
        self.put(key, &c);
        Ok(vref)
    }

    // ---- vatstores ----

    /// `ep`'s value at `key`.
    pub fn vatstore_get(&self, ep: EndpointId, key: &[u8]) -> Result<Option<Vec<u8>>, KernelError> {
        Ok(self.txn.get(&vatstore_key(ep, key))?)
    }

    /// Set `ep`'s `key`.
    pub fn vatstore_set(&mut self, ep: EndpointId, key: &[u8], value: Vec<u8>) {
        self.txn.set(vatstore_key(ep, key), value);
    }

    /// Delete `ep`'s `key`.
    pub fn vatstore_delete(&mut self, ep: EndpointId, key: &[u8]) {
        self.txn.delete(vatstore_key(ep, key));
    }

    /// `ep`'s first key after `after` (or its first key).
    pub fn vatstore_next_key(&self, ep: EndpointId, after: Option<&[u8]>) -> Result<Option<Vec<u8>>, KernelError> {
        let prefix = vatstore_prefix(ep);
        let after_full = after.map(|a| vatstore_key(ep, a));
        Ok(self.txn.next(&prefix, after_full.as_deref())?.map(|(k, _)| k[prefix.len()..].to_vec()))
    }

    /// Every `(key, value)` in `ep`'s vatstore.
    pub fn vatstore_entries(&self, ep: EndpointId) -> Result<Vec<Entry>, KernelError> {
        let prefix = vatstore_prefix(ep);
        Ok(self.txn.scan_prefix(&prefix)?.into_iter().map(|(k, v)| (k[prefix.len()..].to_vec(), v)).collect())
    }

    /// Every record under `prefix`, decoded, with the number that ends its key.
    pub(crate) fn numbered<T: DeserializeOwned>(&self, table: &'static str, prefix: &[u8]) -> Result<Vec<(u64, T)>, KernelError> {
        debug_assert!(self.promises.is_empty(), "scans run on read-only transactions");
        let mut out = Vec::new();
        for (k, v) in self.txn.scan_prefix(prefix)? {
            let n = k[prefix.len()..].try_into().map(u64::from_be_bytes).map_err(|_| KernelError::Corrupt {
                table,
                key: k.escape_ascii().to_string(),
                reason: "bad number in key".into(),
            })?;
            out.push((n, decode(table, &k, &v)?));
        }
        Ok(out)
    }

    /// Write raw bytes (format record).
    pub(crate) fn set_raw(&mut self, key: &[u8], value: Vec<u8>) {
        self.txn.set(key.to_vec(), value);
    }

    /// Read raw bytes.
    pub(crate) fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KernelError> {
        Ok(self.txn.get(key)?)
    }
}

fn name_key(name: &str) -> Vec<u8> {
    let mut k = NAME_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn vatstore_key(ep: EndpointId, key: &[u8]) -> Vec<u8> {
    let mut k = vatstore_prefix(ep);
    k.extend_from_slice(key);
    k
}

fn kref_from_key_bytes(b: &[u8]) -> Option<KRef> {
    let (tag, n) = b.split_first()?;
    let n = u64::from_be_bytes(n.try_into().ok()?);
    match tag {
        b'o' => Some(KRef::Object(KObjectId(n))),
        b'p' => Some(KRef::Promise(KPromiseId(n))),
        _ => None,
    }
}
