//! The kernel's tables in the store: byte-ordered keys, postcard values, and typed access
//! through [`KernelTxn`] (one store transaction plus the kernel counters it works on).
//!
//! Key layout (every number big-endian so keys sort numerically):
//! - `m/format` -> u32 format version
//! - `k/counters` -> [`Counters`]
//! - `q/<seq u64>` -> [`RunQueueItem`]
//! - `o/<ko u64>` -> [`ObjectRecord`]
//! - `p/<kp u64>` -> [`PromiseRecord`] (state, reference count, pin)
//! - `e/<ep u32>/r` -> name; `e/<ep u32>/s` -> [`EndpointStatus`]; `e/<ep u32>/c` -> [`ClistCounters`];
//!   `e/<ep u32>/o` -> its root [`KObjectId`]; `e/<ep u32>/g<o|p><last u64>` -> first u64: a run
//!   `first..=last` of the endpoint's own refs below its watermark that it has never named
//! - `n/<name>` -> [`EndpointId`]
//! - `l/<ep u32>/k<kref 9 bytes>` -> [`ClistEntry`]; `l/<ep u32>/v<vref 10 bytes>` -> [`KRef`]
//! - `l/<ep u32>/a<vref 10 bytes>` -> [`KRef`]: a promise name a peer-kernel endpoint keeps after
//!   its notify (an *alias*: it resolves inbound names only, counts one reference, and goes at
//!   `forget_names`; see [`crate::Endpoint::is_peer_kernel`])
//! - `s/<ep u32>/<key bytes>` -> vatstore value

use crate::error::KernelError;
use crate::ids::{Allocator, EndpointId, KObjectId, KPromiseId, KRef, RefKind, VRef};
use crate::message::{Message, RunQueueItem, Settlement};
use crate::records::{HashMap, Records, Scratch};
use crate::store::WriteBatch;
use crate::store::{Entry, Store, Txn};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::BTreeMap;
use std::hash::Hash;

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

/// A kernel object: who exports it, and how many references keep it alive (DESIGN §6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRecord {
    /// The exporting endpoint.
    pub owner: EndpointId,
    /// Pinned roots (vat roots, objects the host holds) are never collected.
    pub pinned: bool,
    /// The exporter gave it up (`abandonExports`, or termination): messages to it are rejected.
    pub abandoned: bool,
    /// References that can reach it: importers' c-list entries still flagged reachable, and
    /// every occurrence in a queued message or in a settled promise's data.
    pub reachable: u32,
    /// References that can recognise it: all importers' c-list entries, and the same message
    /// and settlement occurrences. Always >= `reachable`.
    pub recognizable: u32,
}

impl ObjectRecord {
    /// A new live object with no references yet.
    pub fn new(owner: EndpointId, pinned: bool) -> Self {
        ObjectRecord { owner, pinned, abandoned: false, reachable: 0, recognizable: 0 }
    }
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

/// A promise as stored: its state, how many references keep it alive (c-list entries, queued
/// messages naming it as target, argument or result, pending notifies, settled data naming it),
/// and whether the host pins it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromiseRecord {
    /// The state.
    pub state: PromiseState,
    /// References to it.
    pub refs: u32,
    /// Pinned by the host (the result of `queue_message` until `unpin`).
    pub pinned: bool,
}

/// One c-list entry, kref side: the endpoint's ref and, for imported objects, whether the
/// endpoint can still reach it (`dropImports` clears it; for an exporter, whether the kernel
/// has yet to say `dropExports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClistEntry {
    /// The endpoint's ref.
    pub vref: VRef,
    /// Reachable flag.
    pub reachable: bool,
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

/// Per-endpoint c-list counters: the last ref the kernel allocated of each kind (`o-N`, `p-N`)
/// and the highest ref the endpoint has named of each kind (`o+N`, `p+N`, its watermark). An
/// unknown `o+N`/`p+N` at or below the watermark is new only if it lies in one of the endpoint's
/// export gaps (indices it skipped, never named); otherwise it is a stale ref (retired or
/// resolved): an illegal syscall. Each index is thus accepted as new at most once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClistCounters {
    /// Last `o-N` allocated.
    pub import_object: u64,
    /// Last `p-N` allocated.
    pub import_promise: u64,
    /// Highest `o+N` seen.
    pub export_object: u64,
    /// Highest `p+N` seen.
    pub export_promise: u64,
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

fn clist_alias_key(ep: EndpointId, vref: VRef) -> Vec<u8> {
    let mut k = clist_prefix(ep);
    k.push(b'a');
    k.extend_from_slice(&vref.key_bytes());
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

/// [`KernelTxn::fetch`], on the fields it needs, so that a caller may hold other fields.
fn fetch_in<K: Hash + Eq + Copy, V: Clone + DeserializeOwned>(
    txn: &Txn<'_, dyn Store + '_>,
    fetched: &RefCell<Box<Records>>,
    pick: fn(&Records) -> &HashMap<K, Option<V>>,
    pick_mut: fn(&mut Records) -> &mut HashMap<K, Option<V>>,
    table: &'static str,
    key: K,
    raw_key: impl FnOnce() -> Vec<u8>,
) -> Result<Option<V>, KernelError> {
    if let Some(v) = pick(&fetched.borrow()).get(&key) {
        return Ok(v.clone());
    }
    let raw = raw_key();
    let v: Option<V> = match txn.get(&raw)? {
        Some(bytes) => Some(decode(table, &raw, &bytes)?),
        None => None,
    };
    pick_mut(&mut fetched.borrow_mut()).insert(key, v.clone());
    Ok(v)
}

/// The bytes' lexicographic order, decided by one integer comparison where the first 8 bytes
/// differ (keys of different tables, mostly) rather than a `memcmp` call.
fn key_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    if let (Some(x), Some(y)) = (a.first_chunk::<8>(), b.first_chunk::<8>()) {
        let (x, y) = (u64::from_be_bytes(*x), u64::from_be_bytes(*y));
        if x != y {
            return x.cmp(&y);
        }
    }
    a.cmp(b)
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Most records are a few dozen bytes: serialised on the stack first, one costs a single
    // allocation of its exact size rather than the several of a vector grown as it is written.
    let mut scratch = [0u8; 128];
    if let Ok(bytes) = postcard::to_slice(v, &mut scratch) {
        return bytes.to_vec();
    }
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
    /// Decoded committed records the kernel kept from earlier transactions.
    cache: &'s Records,
    /// Records this transaction wrote, decoded; each is encoded once when it ends.
    dirty: Box<Records>,
    /// Records this transaction decoded from the store.
    fetched: RefCell<Box<Records>>,
    /// Krefs whose reference counts fell to zero in this transaction; `gc::collect` looks at
    /// each before the transaction ends.
    pub(crate) maybe_free: Vec<KRef>,
    /// The counters as this transaction sees them; written back at commit if changed.
    pub counters: Counters,
    /// The committed counters, as the transaction began: an id at or past them was allocated
    /// here, so the committed state holds nothing under it.
    start: Counters,
    counters_dirty: bool,
}

/// A finished transaction: its batch, the counters after it, and its decoded records for the
/// kernel's cache.
pub(crate) struct TxnEnd {
    pub batch: WriteBatch,
    pub counters: Counters,
    pub dirty: Box<Records>,
    pub fetched: Box<Records>,
    /// The counters as the transaction began: the ids from there on were allocated in it.
    pub start: Counters,
}

impl TxnEnd {
    /// The objects and promises this transaction allocated.
    pub fn born(&self) -> impl Iterator<Item = KRef> {
        let objects = (self.start.next_object..self.counters.next_object).map(|o| KRef::Object(KObjectId(o)));
        objects.chain((self.start.next_promise..self.counters.next_promise).map(|p| KRef::Promise(KPromiseId(p))))
    }
}

impl<'s> KernelTxn<'s> {
    /// Begin a transaction over `store` whose committed counters are `counters` and whose
    /// committed records, as far as decoded, are in `cache`.
    pub(crate) fn begin(store: &'s (dyn Store + 's), cache: &'s Records, counters: Counters) -> Self {
        Self::begin_in(store, cache, counters, Scratch::default())
    }

    /// [`KernelTxn::begin`], filling `scratch`'s (empty) maps and `maybe_free` rather than new ones.
    pub(crate) fn begin_in(store: &'s (dyn Store + 's), cache: &'s Records, counters: Counters, scratch: Scratch) -> Self {
        debug_assert!(
            scratch.dirty.is_empty() && scratch.fetched.is_empty() && scratch.maybe_free.is_empty(),
            "scratch maps must come back empty"
        );
        KernelTxn {
            txn: Txn::begin(store),
            cache,
            dirty: scratch.dirty,
            fetched: RefCell::new(scratch.fetched),
            maybe_free: scratch.maybe_free,
            counters,
            start: counters,
            counters_dirty: false,
        }
    }

    /// End the transaction: every written record encoded once into the batch. A record deleted
    /// here that the committed state never held (its id or vref was allocated in this
    /// transaction, or it was looked up and found absent) puts no delete in the batch: a
    /// c-list entry made and dropped within one crank, say, leaves no tombstone in the store.
    /// Likewise a record written back unchanged (a root object whose counts a ping-pong crank
    /// lowers and raises again) puts nothing in the batch.
    pub(crate) fn finish(self) -> TxnEnd {
        /// Encode the records of one table into `batch`: a record equal to its committed
        /// version (counts that went down and up again, say) is not written again, and a
        /// deleted one the committed state never held (`born` here, or fetched and found
        /// absent) is not deleted.
        fn encode_all<K: Copy + Hash + Eq, V: Serialize + PartialEq>(
            batch: &mut WriteBatch,
            written: &HashMap<K, Option<V>>,
            [cached, fetched]: [&HashMap<K, Option<V>>; 2],
            key: impl Fn(K) -> Vec<u8>,
            born: impl Fn(K) -> bool,
        ) {
            for (k, v) in written {
                match v {
                    Some(v) => {
                        let before = cached.get(k).or_else(|| fetched.get(k));
                        if !matches!(before, Some(Some(c)) if c == v) {
                            batch.push((key(*k), Some(encode(v))));
                        }
                    }
                    None if matches!(fetched.get(k), Some(None)) || born(*k) => {}
                    None => batch.push((key(*k), None)),
                }
            }
        }
        let KernelTxn { txn, cache, dirty: d, fetched, counters, start, counters_dirty, .. } = self;
        let f = fetched.into_inner();
        // The records go straight into the batch: only this transaction's raw writes (run
        // queue, vatstores, ...) pass through the overlay, which reads needed to see.
        let mut batch = txn.into_batch_with_room(d.len() + 1);
        let born = |kref: KRef| match kref {
            KRef::Object(o) => o.0 >= start.next_object,
            KRef::Promise(p) => p.0 >= start.next_promise,
        };
        encode_all(
            &mut batch,
            &d.objects,
            [&cache.objects, &f.objects],
            |o: KObjectId| u64_key(OBJECT_PREFIX, o.0),
            |o| born(KRef::Object(o)),
        );
        encode_all(
            &mut batch,
            &d.promises,
            [&cache.promises, &f.promises],
            |p: KPromiseId| u64_key(PROMISE_PREFIX, p.0),
            |p| born(KRef::Promise(p)),
        );
        encode_all(
            &mut batch,
            &d.clist,
            [&cache.clist, &f.clist],
            |(ep, k)| clist_kref_key(ep, k),
            |(ep, k)| born(k) || cache.surely_not_held(ep, k),
        );
        // A vref numbered past its endpoint's committed watermark was allocated here.
        let vref_born = |ep: EndpointId, v: VRef| {
            let committed = cache.clist_counters.get(&ep).or_else(|| f.clist_counters.get(&ep));
            // Known absent: the endpoint has numbered nothing yet.
            let Some(c) = committed.map(|c| c.unwrap_or_default()) else { return false };
            let watermark = match (v.allocator, v.kind) {
                (Allocator::Kernel, RefKind::Object) => c.import_object,
                (Allocator::Kernel, RefKind::Promise) => c.import_promise,
                (Allocator::Endpoint, RefKind::Object) => c.export_object,
                (Allocator::Endpoint, RefKind::Promise) => c.export_promise,
            };
            v.index > watermark
        };
        encode_all(&mut batch, &d.clist_rev, [&cache.clist_rev, &f.clist_rev], |(ep, v)| clist_vref_key(ep, v), |(ep, v)| vref_born(ep, v));
        encode_all(&mut batch, &d.status, [&cache.status, &f.status], |ep| endpoint_key(ep, b"s"), |_| false);
        encode_all(&mut batch, &d.clist_counters, [&cache.clist_counters, &f.clist_counters], |ep| endpoint_key(ep, b"c"), |_| false);
        if counters_dirty {
            batch.push((COUNTERS_KEY.to_vec(), Some(encode(&counters))));
        }
        // A batch is sorted by key. The record tables and the raw keys do not overlap, so each
        // key is written once (were one written twice, the stable sort would keep the record
        // after the raw write, and a store applying the batch in order would end with the
        // record, as the overlay did).
        batch.sort_by(|a, b| key_order(&a.0, &b.0));
        debug_assert!(batch.windows(2).all(|w| w[0].0 < w[1].0), "a batch writes each key once");
        TxnEnd { batch, counters, dirty: d, fetched: f, start }
    }

    /// A record of a cached table: written here, else committed and decoded, else read from
    /// the store (and remembered).
    fn cached<K: Hash + Eq + Copy, V: Clone + DeserializeOwned>(
        &self,
        pick: fn(&Records) -> &HashMap<K, Option<V>>,
        pick_mut: fn(&mut Records) -> &mut HashMap<K, Option<V>>,
        table: &'static str,
        key: K,
        raw_key: impl FnOnce() -> Vec<u8>,
    ) -> Result<Option<V>, KernelError> {
        self.peek(pick, pick_mut, table, key, raw_key, |v| v.cloned())
    }

    /// `f` of a record of a cached table, found as [`KernelTxn::cached`] finds it, without
    /// copying it when it is decoded already (most reads want one field of a record).
    fn peek<K: Hash + Eq + Copy, V: Clone + DeserializeOwned, R>(
        &self,
        pick: fn(&Records) -> &HashMap<K, Option<V>>,
        pick_mut: fn(&mut Records) -> &mut HashMap<K, Option<V>>,
        table: &'static str,
        key: K,
        raw_key: impl FnOnce() -> Vec<u8>,
        f: impl FnOnce(Option<&V>) -> R,
    ) -> Result<R, KernelError> {
        if let Some(v) = pick(&self.dirty).get(&key) {
            return Ok(f(v.as_ref()));
        }
        if let Some(v) = pick(self.cache).get(&key) {
            return Ok(f(v.as_ref()));
        }
        // A copy, so that `f` runs with no borrow of `fetched` held.
        let v = self.fetch(pick, pick_mut, table, key, raw_key)?;
        Ok(f(v.as_ref()))
    }

    /// A record this transaction has not written: read earlier in it, else decoded from the
    /// store (and remembered in `fetched`).
    fn fetch<K: Hash + Eq + Copy, V: Clone + DeserializeOwned>(
        &self,
        pick: fn(&Records) -> &HashMap<K, Option<V>>,
        pick_mut: fn(&mut Records) -> &mut HashMap<K, Option<V>>,
        table: &'static str,
        key: K,
        raw_key: impl FnOnce() -> Vec<u8>,
    ) -> Result<Option<V>, KernelError> {
        fetch_in(&self.txn, &self.fetched, pick, pick_mut, table, key, raw_key)
    }

    /// A record of a cached table to change in place: moved into this transaction's writes
    /// (copied from committed state the first time). An absent record stays absent.
    fn cached_mut<K: Hash + Eq + Copy + 'static, V: Clone + DeserializeOwned + 'static>(
        &mut self,
        pick: fn(&Records) -> &HashMap<K, Option<V>>,
        pick_mut: fn(&mut Records) -> &mut HashMap<K, Option<V>>,
        table: &'static str,
        key: K,
        raw_key: impl FnOnce() -> Vec<u8>,
    ) -> Result<Option<&mut V>, KernelError> {
        // One lookup in the written records, whether the record is there or goes there; the
        // fields are borrowed apart so the committed state can be read meanwhile.
        match pick_mut(&mut self.dirty).entry(key) {
            MapEntry::Occupied(e) => Ok(e.into_mut().as_mut()),
            MapEntry::Vacant(e) => {
                let committed = match pick(self.cache).get(&key) {
                    Some(v) => v.clone(),
                    None => fetch_in(&self.txn, &self.fetched, pick, pick_mut, table, key, raw_key)?,
                };
                let Some(v) = committed else { return Ok(None) };
                Ok(e.insert(Some(v)).as_mut())
            }
        }
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

    /// Take the first item off the run queue. `decoded` is that item as committed, if the
    /// caller kept it decoded (then the store is not read).
    pub fn pop_run_queue(&mut self, decoded: Option<RunQueueItem>) -> Result<Option<RunQueueItem>, KernelError> {
        if self.counters.queue_head == self.counters.queue_tail {
            return Ok(None);
        }
        let key = u64_key(RUN_QUEUE_PREFIX, self.counters.queue_head);
        let item = match decoded {
            Some(item) => item,
            None => self.get("run-queue", &key)?.ok_or_else(|| KernelError::Corrupt {
                table: "run-queue",
                key: key.escape_ascii().to_string(),
                reason: "queued item missing".into(),
            })?,
        };
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
        self.dirty.objects.insert(id, Some(ObjectRecord::new(owner, pinned)));
        id
    }

    /// An object's record.
    pub fn object(&self, id: KObjectId) -> Result<Option<ObjectRecord>, KernelError> {
        self.cached(|r| &r.objects, |r| &mut r.objects, "object", id, || u64_key(OBJECT_PREFIX, id.0))
    }

    /// `f` of an object's record, without copying it.
    pub fn peek_object<R>(&self, id: KObjectId, f: impl FnOnce(Option<&ObjectRecord>) -> R) -> Result<R, KernelError> {
        self.peek(|r| &r.objects, |r| &mut r.objects, "object", id, || u64_key(OBJECT_PREFIX, id.0), f)
    }

    /// An object's record, to change in place (it is written when the transaction ends).
    pub fn object_mut(&mut self, id: KObjectId) -> Result<Option<&mut ObjectRecord>, KernelError> {
        self.cached_mut(|r| &r.objects, |r| &mut r.objects, "object", id, || u64_key(OBJECT_PREFIX, id.0))
    }

    /// Overwrite an object's record.
    pub fn set_object(&mut self, id: KObjectId, rec: &ObjectRecord) {
        self.dirty.objects.insert(id, Some(rec.clone()));
    }

    /// Delete an object's record.
    pub fn delete_object(&mut self, id: KObjectId) {
        self.dirty.objects.insert(id, None);
    }

    // ---- promises ----

    /// Allocate an unresolved promise.
    pub fn new_promise(&mut self, decider: Option<EndpointId>) -> KPromiseId {
        let c = self.counters_mut();
        let id = KPromiseId(c.next_promise);
        c.next_promise += 1;
        self.dirty.promises.insert(id, Some(PromiseRecord { state: PromiseState::new(decider), refs: 0, pinned: false }));
        id
    }

    /// A promise's full record.
    pub fn promise_record(&self, id: KPromiseId) -> Result<Option<PromiseRecord>, KernelError> {
        self.cached(|r| &r.promises, |r| &mut r.promises, "promise", id, || u64_key(PROMISE_PREFIX, id.0))
    }

    /// `f` of a promise's record, which is not copied (a promise carries its queued messages).
    pub fn with_promise<R>(&self, id: KPromiseId, f: impl FnOnce(Option<&PromiseRecord>) -> R) -> Result<R, KernelError> {
        self.peek(|r| &r.promises, |r| &mut r.promises, "promise", id, || u64_key(PROMISE_PREFIX, id.0), f)
    }

    /// A promise's record, to change in place (it is written when the transaction ends).
    pub fn promise_mut(&mut self, id: KPromiseId) -> Result<Option<&mut PromiseRecord>, KernelError> {
        self.cached_mut(|r| &r.promises, |r| &mut r.promises, "promise", id, || u64_key(PROMISE_PREFIX, id.0))
    }

    /// The decider of a promise (`None` if it is settled, decided by the kernel, or unknown).
    pub fn promise_decider(&self, id: KPromiseId) -> Result<Option<EndpointId>, KernelError> {
        self.with_promise(id, |r| r.and_then(|r| r.state.decider()))
    }

    /// Delete a promise, returning its record.
    pub fn take_promise(&mut self, id: KPromiseId) -> Result<Option<PromiseRecord>, KernelError> {
        let rec = match self.dirty.promises.get_mut(&id) {
            Some(written) => written.take(),
            None => self.promise_record(id)?,
        };
        self.dirty.promises.insert(id, None);
        Ok(rec)
    }

    /// A promise's state.
    pub fn promise(&self, id: KPromiseId) -> Result<Option<PromiseState>, KernelError> {
        self.with_promise(id, |r| r.map(|r| r.state.clone()))
    }

    /// Overwrite a promise's state, keeping its count and pin.
    pub fn set_promise(&mut self, id: KPromiseId, state: PromiseState) -> Result<(), KernelError> {
        let rec = self.promise_mut(id)?.ok_or(KernelError::UnknownRef(KRef::Promise(id)))?;
        rec.state = state;
        Ok(())
    }

    /// True if the kernel has a record of `r`.
    pub fn exists(&self, r: KRef) -> Result<bool, KernelError> {
        Ok(match r {
            KRef::Object(o) => self.object(o)?.is_some(),
            KRef::Promise(p) => self.with_promise(p, |r| r.is_some())?,
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
        // The exporter's own entry: no reference is counted, so this cannot fail.
        self.dirty.clist.insert((ep, KRef::Object(root)), Some(ClistEntry { vref: VRef::ROOT, reachable: true }));
        self.dirty.clist_rev.insert((ep, VRef::ROOT), Some(KRef::Object(root)));
        // Remembered apart from the c-list, which termination drops.
        self.put(endpoint_key(ep, b"o"), &root);
        (ep, root)
    }

    /// `ep`'s root object, live or terminated.
    pub fn endpoint_root(&self, ep: EndpointId) -> Result<Option<KObjectId>, KernelError> {
        self.get("endpoint-root", &endpoint_key(ep, b"o"))
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
        self.cached(|r| &r.status, |r| &mut r.status, "endpoint", ep, || endpoint_key(ep, b"s"))
    }

    /// Overwrite an endpoint's record.
    pub fn set_endpoint(&mut self, ep: EndpointId, rec: &EndpointRecord) {
        self.put(endpoint_key(ep, b"r"), &rec.name);
        self.dirty.status.insert(ep, Some(rec.status.clone()));
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

    /// `ep`'s c-list entry for `kref`.
    pub fn clist_entry(&self, ep: EndpointId, kref: KRef) -> Result<Option<ClistEntry>, KernelError> {
        // Written here first: an entry this crank made or changed is found in one lookup.
        if let Some(v) = self.dirty.clist.get(&(ep, kref)) {
            return Ok(*v);
        }
        if self.cache.surely_not_held(ep, kref) {
            return Ok(None);
        }
        self.cached(|r| &r.clist, |r| &mut r.clist, "c-list", (ep, kref), || clist_kref_key(ep, kref))
    }

    /// The kernel ref `ep`'s `vref` stands for.
    pub fn clist_kref(&self, ep: EndpointId, vref: VRef) -> Result<Option<KRef>, KernelError> {
        self.cached(|r| &r.clist_rev, |r| &mut r.clist_rev, "c-list", (ep, vref), || clist_vref_key(ep, vref))
    }

    /// Record `kref <-> vref` in `ep`'s c-list, reachable, counting the new reference (an
    /// exporter's own entry for its object does not count).
    pub fn clist_insert(&mut self, ep: EndpointId, kref: KRef, vref: VRef) -> Result<(), KernelError> {
        self.dirty.clist.insert((ep, kref), Some(ClistEntry { vref, reachable: true }));
        self.dirty.clist_rev.insert((ep, vref), Some(kref));
        if !self.is_exporter(ep, kref)? {
            self.incref(kref, true)?;
        }
        Ok(())
    }

    /// Change the reachable flag of `ep`'s entry for `kref`, counting the change.
    pub fn clist_set_reachable(&mut self, ep: EndpointId, kref: KRef, reachable: bool) -> Result<(), KernelError> {
        let Some(mut entry) = self.clist_entry(ep, kref)? else { return Ok(()) };
        if entry.reachable == reachable {
            return Ok(());
        }
        entry.reachable = reachable;
        self.dirty.clist.insert((ep, kref), Some(entry));
        if let (KRef::Object(o), false) = (kref, self.is_exporter(ep, kref)?) {
            if let Some(rec) = self.object_mut(o)? {
                if reachable {
                    rec.reachable += 1;
                } else {
                    rec.reachable = rec.reachable.saturating_sub(1);
                    if rec.reachable == 0 {
                        self.maybe_free.push(kref);
                    }
                }
            }
        }
        Ok(())
    }

    /// Forget `kref` in `ep`'s c-list (both directions), if present, releasing its reference.
    pub fn clist_remove(&mut self, ep: EndpointId, kref: KRef) -> Result<(), KernelError> {
        if let Some(entry) = self.clist_entry(ep, kref)? {
            self.dirty.clist.insert((ep, kref), None);
            self.dirty.clist_rev.insert((ep, entry.vref), None);
            if !self.is_exporter(ep, kref)? {
                self.decref(kref, entry.reachable)?;
            }
        }
        Ok(())
    }

    /// Turn `ep`'s c-list entry for promise `kp` into an alias: the entry goes (a later import
    /// of `kp` gets a fresh vref), but its vref still names `kp` inbound, and the reference it
    /// counted stays counted, until [`KernelTxn::alias_remove`].
    pub fn clist_alias(&mut self, ep: EndpointId, kp: KPromiseId) -> Result<(), KernelError> {
        let kref = KRef::Promise(kp);
        if let Some(entry) = self.clist_entry(ep, kref)? {
            self.dirty.clist.insert((ep, kref), None);
            self.dirty.clist_rev.insert((ep, entry.vref), None);
            self.txn.set(clist_alias_key(ep, entry.vref), encode(&kref));
        }
        Ok(())
    }

    /// The promise `ep`'s alias `vref` names, if it is one.
    pub fn alias_kref(&self, ep: EndpointId, vref: VRef) -> Result<Option<KRef>, KernelError> {
        let key = clist_alias_key(ep, vref);
        match self.txn.get(&key)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(decode("c-list alias", &key, &bytes)?)),
        }
    }

    /// Forget `ep`'s alias `vref`, releasing its reference. False if there was none.
    pub fn alias_remove(&mut self, ep: EndpointId, vref: VRef) -> Result<bool, KernelError> {
        let Some(kref) = self.alias_kref(ep, vref)? else { return Ok(false) };
        self.txn.delete(clist_alias_key(ep, vref));
        self.decref(kref, true)?;
        Ok(true)
    }

    /// Every alias `ep` keeps, as `(vref, kref)`.
    pub fn aliases(&self, ep: EndpointId) -> Result<Vec<(VRef, KRef)>, KernelError> {
        let mut prefix = clist_prefix(ep);
        prefix.push(b'a');
        let mut out = Vec::new();
        for (k, v) in self.txn.scan_prefix(&prefix)? {
            let kref: KRef = decode("c-list alias", &k, &v)?;
            let vref = VRef::from_key_bytes(&k[prefix.len()..]).ok_or_else(|| KernelError::Corrupt {
                table: "c-list alias",
                key: k.escape_ascii().to_string(),
                reason: "bad vref key".into(),
            })?;
            out.push((vref, kref));
        }
        Ok(out)
    }

    /// `ep`'s ref for `kref`, importing it (`o-N`/`p-N`) if `ep` has not seen it; an import it
    /// had dropped becomes reachable again.
    pub fn import(&mut self, ep: EndpointId, kref: KRef) -> Result<VRef, KernelError> {
        if let Some(entry) = self.clist_entry(ep, kref)? {
            if !entry.reachable {
                self.clist_set_reachable(ep, kref, true)?;
            }
            return Ok(entry.vref);
        }
        let vref = self.next_import(ep, kref.as_promise().is_some())?;
        self.clist_insert(ep, kref, vref)?;
        Ok(vref)
    }

    /// True if `ep` exports `kref` (owns the object and has not given it up); promises have no
    /// exporter. An endpoint that abandoned an object and is handed it again holds it as an
    /// import, counted like any other.
    fn is_exporter(&self, ep: EndpointId, kref: KRef) -> Result<bool, KernelError> {
        Ok(match kref {
            KRef::Object(o) => self.peek_object(o, |r| r.is_some_and(|r| r.owner == ep && !r.abandoned))?,
            KRef::Promise(_) => false,
        })
    }

    // ---- reference counts ----

    /// Pin or unpin `kref`; unpinning marks it for collection.
    pub fn pin(&mut self, kref: KRef, pinned: bool) -> Result<(), KernelError> {
        match kref {
            KRef::Object(o) => {
                if let Some(rec) = self.object_mut(o)? {
                    rec.pinned = pinned;
                }
            }
            KRef::Promise(p) => {
                if let Some(rec) = self.promise_mut(p)? {
                    rec.pinned = pinned;
                }
            }
        }
        if !pinned {
            self.maybe_free.push(kref);
        }
        Ok(())
    }

    /// Count one more reference to `kref` (for objects: recognizable, and reachable if `reachable`).
    pub fn incref(&mut self, kref: KRef, reachable: bool) -> Result<(), KernelError> {
        match kref {
            KRef::Object(o) => {
                if let Some(rec) = self.object_mut(o)? {
                    rec.recognizable += 1;
                    if reachable {
                        rec.reachable += 1;
                    }
                }
            }
            KRef::Promise(p) => {
                if let Some(rec) = self.promise_mut(p)? {
                    rec.refs += 1;
                }
            }
        }
        Ok(())
    }

    /// Count one reference fewer to `kref`; a count reaching zero marks it for collection.
    pub fn decref(&mut self, kref: KRef, reachable: bool) -> Result<(), KernelError> {
        match kref {
            KRef::Object(o) => {
                if let Some(rec) = self.object_mut(o)? {
                    rec.recognizable = rec.recognizable.saturating_sub(1);
                    if reachable {
                        rec.reachable = rec.reachable.saturating_sub(1);
                    }
                    if rec.reachable == 0 {
                        self.maybe_free.push(kref);
                    }
                }
            }
            KRef::Promise(p) => {
                if let Some(rec) = self.promise_mut(p)? {
                    rec.refs = rec.refs.saturating_sub(1);
                    if rec.refs == 0 {
                        self.maybe_free.push(kref);
                    }
                }
            }
        }
        Ok(())
    }

    /// Every `(kref, vref)` in `ep`'s c-list, ordered by kref.
    pub fn clist_entries(&self, ep: EndpointId) -> Result<Vec<(KRef, VRef)>, KernelError> {
        let mut prefix = clist_prefix(ep);
        prefix.push(b'k');
        // Committed entries from the store, then this transaction's own changes over them.
        let mut merged = BTreeMap::new();
        for (k, v) in self.txn.scan_prefix(&prefix)? {
            let vref = decode::<ClistEntry>("c-list", &k, &v)?.vref;
            let kref = KRef::from_key_bytes(&k[prefix.len()..]).ok_or_else(|| KernelError::Corrupt {
                table: "c-list",
                key: k.escape_ascii().to_string(),
                reason: "bad kref key".into(),
            })?;
            merged.insert(kref.key_bytes(), (kref, vref));
        }
        for ((e, kref), entry) in &self.dirty.clist {
            if *e == ep {
                match entry {
                    Some(entry) => merged.insert(kref.key_bytes(), (*kref, entry.vref)),
                    None => merged.remove(&kref.key_bytes()),
                };
            }
        }
        Ok(merged.into_values().collect())
    }

    /// `ep`'s c-list counters.
    pub fn clist_counters(&self, ep: EndpointId) -> Result<ClistCounters, KernelError> {
        Ok(self
            .cached(|r| &r.clist_counters, |r| &mut r.clist_counters, "endpoint-counters", ep, || endpoint_key(ep, b"c"))?
            .unwrap_or_default())
    }

    /// Overwrite `ep`'s c-list counters.
    pub fn set_clist_counters(&mut self, ep: EndpointId, c: &ClistCounters) {
        self.dirty.clist_counters.insert(ep, Some(*c));
    }

    /// Allocate the next kernel-side ref of `kind` in `ep`'s c-list.
    pub fn next_import(&mut self, ep: EndpointId, promise: bool) -> Result<VRef, KernelError> {
        let mut c = self.clist_counters(ep)?;
        let vref = if promise {
            c.import_promise += 1;
            VRef::imported_promise(c.import_promise)
        } else {
            c.import_object += 1;
            VRef::import(c.import_object)
        };
        self.set_clist_counters(ep, &c);
        Ok(vref)
    }

    fn export_gap_prefix(ep: EndpointId, kind: RefKind) -> Vec<u8> {
        endpoint_key(ep, if kind == RefKind::Object { b"go" } else { b"gp" })
    }

    /// The export gap of `ep` holding `vref`'s index, as `(first, last)`, if any.
    pub fn export_gap(&self, ep: EndpointId, vref: VRef) -> Result<Option<(u64, u64)>, KernelError> {
        let Some(below) = vref.index.checked_sub(1) else { return Ok(None) };
        let prefix = Self::export_gap_prefix(ep, vref.kind);
        let mut after = prefix.clone();
        after.extend_from_slice(&below.to_be_bytes());
        // The first gap ending at or above the index.
        let Some((k, v)) = self.txn.next(&prefix, Some(&after))? else { return Ok(None) };
        let corrupt =
            |reason: &str| KernelError::Corrupt { table: "export-gaps", key: k.escape_ascii().to_string(), reason: reason.into() };
        let last = k[prefix.len()..].try_into().map(u64::from_be_bytes).map_err(|_| corrupt("bad number in key"))?;
        let first: u64 = decode("export-gaps", &k, &v)?;
        if first > last {
            return Err(corrupt("gap ends before it starts"));
        }
        Ok((first <= vref.index).then_some((first, last)))
    }

    /// Record `first..=last` as a gap in `ep`'s exports of `kind` (`first <= last`).
    pub fn add_export_gap(&mut self, ep: EndpointId, kind: RefKind, first: u64, last: u64) {
        let mut k = Self::export_gap_prefix(ep, kind);
        k.extend_from_slice(&last.to_be_bytes());
        self.put(k, &first);
    }

    /// Forget the gap in `ep`'s exports of `kind` that ends at `last`.
    pub fn remove_export_gap(&mut self, ep: EndpointId, kind: RefKind, last: u64) {
        let mut k = Self::export_gap_prefix(ep, kind);
        k.extend_from_slice(&last.to_be_bytes());
        self.txn.delete(k);
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

#[cfg(test)]
mod tests {
    use super::{key_order, u64_key};

    #[test]
    fn key_order_is_the_bytes_order() {
        let samples: Vec<Vec<u8>> = vec![
            vec![],
            b"k/counters".to_vec(),
            b"k/counter".to_vec(),
            b"k/counte".to_vec(),
            b"k/count".to_vec(),
            b"k/countersz".to_vec(),
            u64_key(b"p/", 7),
            u64_key(b"p/", 8),
            u64_key(b"p/", 1 << 40),
            u64_key(b"q/", 0),
            vec![0xff; 9],
            vec![0; 8],
            vec![0; 9],
        ];
        for a in &samples {
            for b in &samples {
                assert_eq!(key_order(a, b), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }
}
