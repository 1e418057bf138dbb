//! A small helper layer so a Rust vat is a few dozen lines: implement [`Behavior`] (method
//! dispatch by name, plus what to do when a watched promise settles) and wrap it in
//! [`HelperVat`]. [`Cx`] allocates exports and promises, sends with result promises, watches
//! promises durably, resolves, and reads and writes the vatstore.
//!
//! The helper keeps its own bookkeeping in the vatstore under keys starting with `$`, so it
//! commits and rolls back with the crank and survives restarts.

use crate::data::VatData;
use crate::syscall::Syscall;
use crate::vat::{Resolution, Vat, VatError};
use kernel_core::VRef;

/// What a method call answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Fulfil the caller's result promise with this value.
    Value(VatData),
    /// Reject the caller's result promise with this reason (the crank still commits; return
    /// `Err` instead to fail the delivery and terminate the vat).
    Reject(VatData),
    /// Leave the result unresolved; the behavior keeps [`Cx::result`] and resolves it later.
    Later,
}

/// The code of a vat written with the helper layer.
pub trait Behavior {
    /// `target.method(args)`. `Err` fails the delivery: the crank aborts and the vat is terminated.
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, target: VRef, method: &str, args: VatData) -> Result<Answer, VatError>;

    /// A promise watched as `watch` has settled: `Ok(value)` or `Err(reason)`.
    fn settled(&mut self, cx: &mut Cx<'_, '_, '_>, watch: &str, outcome: Result<VatData, VatData>) -> Result<(), VatError> {
        let _ = (cx, watch, outcome);
        Ok(())
    }

    /// At `bringOutYourDead`: the imports (and promises) this vat still uses, out of `held`;
    /// the helper drops and retires the rest, except promises it watches for this vat (dropping
    /// a promise unsubscribes: the watch would never fire). `None` (the default) keeps
    /// everything. A vat that keeps references in its vatstore answers with the vrefs found there.
    fn live_imports(&mut self, cx: &mut Cx<'_, '_, '_>, held: &[VRef]) -> Result<Option<Vec<VRef>>, VatError> {
        let _ = (cx, held);
        Ok(None)
    }

    /// No one can recognise this export any more: drop whatever state it has.
    fn forget(&mut self, cx: &mut Cx<'_, '_, '_>, export: VRef) -> Result<(), VatError> {
        let _ = (cx, export);
        Ok(())
    }
}

/// The helper's view of one delivery.
pub struct Cx<'c, 'a, 's> {
    sys: &'c mut Syscall<'a, 's>,
    counters: &'c mut Counters,
    result: Option<VRef>,
}

#[derive(Debug, Default)]
struct Counters {
    next_object: Option<u64>,
    next_promise: Option<u64>,
}

const NEXT_OBJECT_KEY: &str = "$next-object";
const NEXT_PROMISE_KEY: &str = "$next-promise";
const WATCH_PREFIX: &str = "$watch/";

impl<'a, 's> Cx<'_, 'a, 's> {
    /// The raw syscall handle.
    pub fn syscall(&mut self) -> &mut Syscall<'a, 's> {
        self.sys
    }

    /// The result promise of the message being delivered, if any.
    pub fn result(&self) -> Option<VRef> {
        self.result
    }

    /// Allocate the next index under `key`, starting at 1. The in-memory copy may run ahead of
    /// the vatstore after an aborted crank; the gap is harmless because indices only grow.
    fn allocate(&mut self, which: fn(&mut Counters) -> &mut Option<u64>, key: &str) -> Result<u64, VatError> {
        let current = match *which(self.counters) {
            Some(n) => n,
            None => match self.sys.vatstore_get(key)? {
                Some(v) => {
                    std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()).ok_or_else(|| VatError::new(format!("corrupt {key}")))?
                }
                None => 1,
            },
        };
        *which(self.counters) = Some(current + 1);
        self.sys.vatstore_set(key, (current + 1).to_string().as_bytes())?;
        Ok(current)
    }

    /// A new object this vat exports (`o+N`); it becomes a kernel object when first sent, in
    /// whatever order the vat sends its objects (the kernel keeps skipped indices as export gaps).
    pub fn export(&mut self) -> Result<VRef, VatError> {
        Ok(VRef::export(self.allocate(|c| &mut c.next_object, NEXT_OBJECT_KEY)?))
    }

    /// A new promise this vat decides (`p+N`).
    pub fn new_promise(&mut self) -> Result<VRef, VatError> {
        Ok(VRef::local_promise(self.allocate(|c| &mut c.next_promise, NEXT_PROMISE_KEY)?))
    }

    /// `target.method(args)` with a fresh result promise, which is returned.
    pub fn send(&mut self, target: VRef, method: &str, args: VatData) -> Result<VRef, VatError> {
        let p = self.new_promise()?;
        self.sys.send(target, method, &args, Some(p))?;
        Ok(p)
    }

    /// `target.method(args)` with no result.
    pub fn send_only(&mut self, target: VRef, method: &str, args: VatData) -> Result<(), VatError> {
        Ok(self.sys.send(target, method, &args, None)?)
    }

    /// Subscribe to `promise` and call [`Behavior::settled`] with `name` when it settles. The
    /// watch is kept in the vatstore, so it survives restarts.
    pub fn watch(&mut self, promise: VRef, name: &str) -> Result<(), VatError> {
        self.sys.vatstore_set(&format!("{WATCH_PREFIX}{promise}"), name.as_bytes())?;
        Ok(self.sys.subscribe(promise)?)
    }

    /// Fulfil `promise`.
    pub fn resolve(&mut self, promise: VRef, value: VatData) -> Result<(), VatError> {
        Ok(self.sys.resolve(&[(promise, false, value)])?)
    }

    /// Reject `promise`.
    pub fn reject(&mut self, promise: VRef, reason: VatData) -> Result<(), VatError> {
        Ok(self.sys.resolve(&[(promise, true, reason)])?)
    }

    /// Read a vatstore value as text.
    pub fn get(&mut self, key: &str) -> Result<Option<String>, VatError> {
        Ok(self.sys.vatstore_get(key)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Write a vatstore value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), VatError> {
        Ok(self.sys.vatstore_set(key, value.as_bytes())?)
    }

    /// Read a vatstore value as a number (missing: 0).
    pub fn get_u64(&mut self, key: &str) -> Result<u64, VatError> {
        match self.get(key)? {
            None => Ok(0),
            Some(s) => s.parse().map_err(|_| VatError::new(format!("vatstore {key:?} holds {s:?}, not a number"))),
        }
    }
}

/// Wraps a [`Behavior`] into a [`Vat`].
pub struct HelperVat<B: Behavior> {
    behavior: B,
    counters: Counters,
}

impl<B: Behavior> HelperVat<B> {
    /// Wrap `behavior`.
    pub fn new(behavior: B) -> Self {
        HelperVat { behavior, counters: Counters::default() }
    }

    /// The behavior, for inspection in tests.
    pub fn behavior(&self) -> &B {
        &self.behavior
    }
}

impl<B: Behavior> Vat for HelperVat<B> {
    fn deliver(
        &mut self,
        target: VRef,
        method: &str,
        args: VatData,
        result: Option<VRef>,
        sys: &mut Syscall<'_, '_>,
    ) -> Result<(), VatError> {
        let mut cx = Cx { sys, counters: &mut self.counters, result };
        let answer = self.behavior.call(&mut cx, target, method, args)?;
        match (answer, result) {
            (Answer::Value(v), Some(r)) => cx.resolve(r, v),
            (Answer::Reject(v), Some(r)) => cx.reject(r, v),
            _ => Ok(()),
        }
    }

    fn retire_exports(&mut self, exports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let mut cx = Cx { sys, counters: &mut self.counters, result: None };
        for &e in exports {
            self.behavior.forget(&mut cx, e)?;
        }
        Ok(())
    }

    fn bring_out_your_dead(&mut self, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let held = sys.held_imports()?;
        let mut cx = Cx { sys, counters: &mut self.counters, result: None };
        let Some(live) = self.behavior.live_imports(&mut cx, &held)? else { return Ok(()) };
        let mut dead = Vec::new();
        for v in held {
            let watched = v.is_promise() && cx.sys.vatstore_get(&format!("{WATCH_PREFIX}{v}"))?.is_some();
            if !live.contains(&v) && !watched {
                dead.push(v);
            }
        }
        if dead.is_empty() {
            return Ok(());
        }
        cx.sys.drop_imports(&dead)?;
        let objects: Vec<VRef> = dead.into_iter().filter(|v| !v.is_promise()).collect();
        if !objects.is_empty() {
            cx.sys.retire_imports(&objects)?;
        }
        Ok(())
    }

    fn notify(&mut self, resolutions: Vec<Resolution>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let mut cx = Cx { sys, counters: &mut self.counters, result: None };
        for r in resolutions {
            let key = format!("{WATCH_PREFIX}{}", r.promise);
            let Some(name) = cx.get(&key)? else { continue };
            cx.sys.vatstore_delete(&key)?;
            let outcome = if r.rejected { Err(r.data) } else { Ok(r.data) };
            self.behavior.settled(&mut cx, &name, outcome)?;
        }
        Ok(())
    }
}
