//! Scripted vats: a rhai script as a [`kernel_syscall::Vat`], sandboxed and metered.
//!
//! The script's functions are the root object's methods; `make_object(kind, state)` exports
//! more objects, whose methods are the functions named `<kind>_<method>` (with `this` bound to
//! the object's durable state). The API a script sees is documented in `kernel-cli/README.md`
//! ("Script API"); [`ScriptVat`] implements it.
//!
//! **How the API reaches the kernel.** rhai's registered functions must be `'static`, and a
//! delivery's syscall handle is not, so a script never calls the kernel directly. The vat keeps
//! a mirror of its own vatstore (it is the only writer of it; loaded once after attach), the
//! script reads and writes that mirror, and its sends, subscriptions, resolutions and exit are
//! recorded. When the script returns, the vatstore writes and then the recorded syscalls are
//! made, in order, through the delivery's [`Syscall`] handle — so every one is translated and
//! validated exactly as a Rust vat's are. When the script fails, nothing is made and the delivery
//! fails: the crank aborts and the vat is terminated (DESIGN §4).
//!
//! **Sandbox.** A raw engine with only the pure packages (no file, network, clock, randomness,
//! `sleep`, `eval`, modules), and limits per vat: operations per crank, string, array and map
//! sizes, call depth and expression depth ([`ScriptLimits`]).

mod api;

use crate::codec;
use api::{register_api, ApiResult, Effect, Session, OBJECT_PREFIX, WATCH_PREFIX};
use kernel_core::{Fault, VRef};
use kernel_syscall::{Resolution, Syscall, Vat, VatData, VatEndpoint, VatError};
use rhai::packages::{
    ArithmeticPackage, BasicArrayPackage, BasicBlobPackage, BasicFnPackage, BasicIteratorPackage, BasicMapPackage, BasicMathPackage,
    BasicStringPackage, BitFieldPackage, LogicPackage, MoreStringPackage, Package,
};
use rhai::{Array, CallFnOptions, Dynamic, Engine, EvalAltResult, FnAccess, Map, Scope, AST};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// Per-vat limits of a scripted vat. Every limit is at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptLimits {
    /// rhai operations one crank may use (the meter).
    pub max_operations: u64,
    /// Longest string, in bytes.
    pub max_string_size: usize,
    /// Largest array.
    pub max_array_size: usize,
    /// Largest object map.
    pub max_map_size: usize,
    /// Deepest function call nesting.
    pub max_call_levels: usize,
    /// Deepest expression nesting (functions get half).
    pub max_expr_depth: usize,
}

impl Default for ScriptLimits {
    fn default() -> Self {
        ScriptLimits {
            max_operations: 1_000_000,
            max_string_size: 1 << 20,
            max_array_size: 100_000,
            max_map_size: 100_000,
            max_call_levels: 64,
            max_expr_depth: 64,
        }
    }
}

/// A script that failed to compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CompileError {
    /// The line, if rhai names one.
    pub line: Option<usize>,
    /// What rhai said.
    pub message: String,
}

/// A compiled script: its AST (compiled once, shared by every instance) and its functions.
#[derive(Clone)]
pub struct Script {
    ast: Rc<AST>,
    /// `(name, arity)` -> public?
    functions: Rc<HashMap<(String, usize), bool>>,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Script").field("functions", &self.functions.len()).finish()
    }
}

impl Script {
    /// Compile `source` under `limits`. Only `fn` definitions count: top-level statements are
    /// never run (durable state belongs in the vatstore, not in script globals).
    pub fn compile(source: &str, limits: &ScriptLimits) -> Result<Script, CompileError> {
        let engine = sandbox(limits);
        let mut ast = engine.compile(source).map_err(|e| CompileError { line: e.1.line(), message: e.0.to_string() })?;
        ast.clear_statements();
        let functions = ast.iter_functions().map(|f| ((f.name.to_owned(), f.params.len()), matches!(f.access, FnAccess::Public))).collect();
        Ok(Script { ast: Rc::new(ast), functions: Rc::new(functions) })
    }

    /// True if the script defines `name` with `arity` parameters (public only, if asked).
    pub fn has_function(&self, name: &str, arity: usize, public_only: bool) -> bool {
        self.functions.get(&(name.to_owned(), arity)).is_some_and(|public| *public || !public_only)
    }
}

/// An engine with the pure packages only and the vat's limits: no I/O, no clock, no randomness,
/// no `sleep`, no `eval`, no modules (`import` is not even in the language: feature `no_module`).
fn sandbox(limits: &ScriptLimits) -> Engine {
    let mut engine = Engine::new_raw();
    // LanguageCorePackage is left out: it holds `sleep`, `exit` (rhai's) and `parse_json`.
    engine.register_global_module(ArithmeticPackage::new().as_shared_module());
    engine.register_global_module(LogicPackage::new().as_shared_module());
    engine.register_global_module(BasicStringPackage::new().as_shared_module());
    engine.register_global_module(MoreStringPackage::new().as_shared_module());
    engine.register_global_module(BasicIteratorPackage::new().as_shared_module());
    engine.register_global_module(BasicArrayPackage::new().as_shared_module());
    engine.register_global_module(BasicBlobPackage::new().as_shared_module());
    engine.register_global_module(BasicMapPackage::new().as_shared_module());
    engine.register_global_module(BasicMathPackage::new().as_shared_module());
    engine.register_global_module(BitFieldPackage::new().as_shared_module());
    engine.register_global_module(BasicFnPackage::new().as_shared_module());
    engine.disable_symbol("eval");
    engine.set_strict_variables(true);
    engine.set_max_operations(limits.max_operations.max(1));
    engine.set_max_string_size(limits.max_string_size.max(1));
    engine.set_max_array_size(limits.max_array_size.max(1));
    engine.set_max_map_size(limits.max_map_size.max(1));
    engine.set_max_call_levels(limits.max_call_levels.max(1));
    engine.set_max_expr_depths(limits.max_expr_depth.max(1), (limits.max_expr_depth / 2).max(1));
    engine
}

/// One line a vat logged (`log`, `print`, `debug`, or the runtime about the vat).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// The vat.
    pub vat: String,
    /// The text.
    pub text: String,
}

/// Where vats' log lines go; the host drains it after each crank.
pub type LogSink = Rc<RefCell<Vec<LogLine>>>;

/// Why a script call failed, for the crank's fault.
enum Failure {
    Meter(String),
    Error(String),
}

/// The innermost error of a chain of function calls.
fn root_cause(e: &EvalAltResult) -> &EvalAltResult {
    match e {
        EvalAltResult::ErrorInFunctionCall(_, _, inner, _) => root_cause(inner),
        other => other,
    }
}

fn describe(e: &EvalAltResult, limits: &ScriptLimits) -> Failure {
    let root = root_cause(e);
    let at = root.position().line().map(|l| format!(" (line {l})")).unwrap_or_default();
    match root {
        EvalAltResult::ErrorTooManyOperations(_) => {
            Failure::Meter(format!("used more than {} operations in one crank{at}", limits.max_operations))
        }
        EvalAltResult::ErrorRuntime(v, _) => {
            let v = if v.is_string() { format!("{:?}", v.to_string()) } else { codec::to_text(v).unwrap_or_else(|_| v.to_string()) };
            Failure::Error(format!("threw {v}{at}"))
        }
        EvalAltResult::ErrorDataTooLarge(what, _) => Failure::Error(format!("limit breached: {what} exceeds the vat's limit{at}")),
        EvalAltResult::ErrorStackOverflow(_) => {
            Failure::Error(format!("limit breached: calls nested deeper than {} levels{at}", limits.max_call_levels))
        }
        EvalAltResult::ErrorFunctionNotFound(sig, _) => {
            let sig = sig.replace("&str | ImmutableString | String", "string");
            Failure::Error(format!("no function {sig}: a script reaches only its own functions and the vat API{at}"))
        }
        other => Failure::Error(other.to_string()),
    }
}

/// A scripted vat. Wrap it with [`ScriptVat::endpoint`] to attach it to a kernel.
pub struct ScriptVat {
    name: String,
    engine: Engine,
    script: Script,
    limits: ScriptLimits,
    session: Rc<RefCell<Session>>,
    /// Operations used by the running call (written by the progress callback).
    ops: Rc<Cell<u64>>,
    /// Set when a delivery failed by exhausting the meter.
    meter_fault: Rc<Cell<bool>>,
}

impl ScriptVat {
    /// A vat named `name` running `script` under `limits`, with `params` from the cluster file
    /// and its log lines going to `logs`.
    pub fn new(name: &str, script: Script, limits: ScriptLimits, params: Map, logs: LogSink) -> ScriptVat {
        let session = Rc::new(RefCell::new(Session {
            vat: name.to_owned(),
            active: false,
            committed: None,
            overlay: BTreeMap::new(),
            effects: Vec::new(),
            target: VRef::ROOT,
            result: None,
            result_taken: false,
            exited: false,
            params,
            script: script.clone(),
            logs,
        }));
        let mut engine = sandbox(&limits);
        register_api(&mut engine, &session);
        let ops = Rc::new(Cell::new(0));
        let seen = Rc::clone(&ops);
        engine.on_progress(move |n| {
            seen.set(n);
            None
        });
        ScriptVat { name: name.to_owned(), engine, script, limits, session, ops, meter_fault: Rc::new(Cell::new(false)) }
    }

    /// This vat as a kernel endpoint: a [`VatEndpoint`] whose meter faults are reported as
    /// [`Fault::MeterExhausted`].
    pub fn endpoint(self) -> Box<dyn kernel_core::Endpoint> {
        let meter = Rc::clone(&self.meter_fault);
        Box::new(ScriptEndpoint { inner: VatEndpoint::new(self), meter })
    }

    fn load_mirror(&mut self, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        if self.session.borrow().committed.is_some() {
            return Ok(());
        }
        let mut mirror = BTreeMap::new();
        let mut after = String::new();
        while let Some(key) = sys.vatstore_next_key(&after)? {
            if let Some(v) = sys.vatstore_get(&key)? {
                mirror.insert(key.clone(), String::from_utf8_lossy(&v).into_owned());
            }
            after = key;
        }
        self.session.borrow_mut().committed = Some(mirror);
        Ok(())
    }

    fn begin(&mut self, target: VRef, result: Option<VRef>) {
        let mut s = self.session.borrow_mut();
        s.active = true;
        s.overlay.clear();
        s.effects.clear();
        s.target = target;
        s.result = result;
        s.result_taken = false;
        s.exited = false;
        self.meter_fault.set(false);
    }

    fn end(&mut self) {
        let mut s = self.session.borrow_mut();
        s.active = false;
        s.overlay.clear();
        s.effects.clear();
    }

    /// Call script function `name` within the crank's remaining budget.
    fn call(&mut self, budget: &mut u64, name: &str, args: Vec<Dynamic>, this: Option<&mut Dynamic>) -> Result<Dynamic, Failure> {
        self.engine.set_max_operations((*budget).max(1));
        self.ops.set(0);
        let options = CallFnOptions::new().eval_ast(false).rewind_scope(true);
        let options = match this {
            Some(t) => options.bind_this_ptr(t),
            None => options,
        };
        let r = self.engine.call_fn_with_options::<Dynamic>(options, &mut Scope::new(), &self.script.ast, name, args);
        *budget = budget.saturating_sub(self.ops.get());
        r.map_err(|e| describe(&e, &self.limits))
    }

    fn fail(&self, what: &str, f: Failure) -> VatError {
        let (meter, why) = match f {
            Failure::Meter(w) => (true, w),
            Failure::Error(w) => (false, w),
        };
        self.meter_fault.set(meter);
        tracing::debug!(vat = %self.name, function = what, meter, "script failed: {why}");
        VatError::new(format!("{}.{what}: {why}", self.name))
    }

    /// Make the recorded vatstore writes and syscalls through the real handle, then adopt the
    /// writes into the mirror.
    fn flush(&mut self, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let (overlay, effects) = {
            let mut s = self.session.borrow_mut();
            (std::mem::take(&mut s.overlay), std::mem::take(&mut s.effects))
        };
        for (k, v) in &overlay {
            match v {
                Some(v) => sys.vatstore_set(k, v.as_bytes())?,
                None => sys.vatstore_delete(k)?,
            }
        }
        for e in effects {
            match e {
                Effect::Send { target, method, args, result } => sys.send(target, &method, &args, result)?,
                Effect::Subscribe(p) => sys.subscribe(p)?,
                Effect::Resolve { promise, rejected, data } => sys.resolve(&[(promise, rejected, data)])?,
                Effect::Exit { failure, info } => sys.exit(failure, &info)?,
            }
        }
        let mut s = self.session.borrow_mut();
        if let Some(c) = s.committed.as_mut() {
            for (k, v) in overlay {
                match v {
                    Some(v) => c.insert(k, v),
                    None => c.remove(&k),
                };
            }
        }
        Ok(())
    }

    fn deliver_inner(
        &mut self,
        target: VRef,
        method: &str,
        args: VatData,
        result: Option<VRef>,
        sys: &mut Syscall<'_, '_>,
    ) -> Result<(), VatError> {
        self.load_mirror(sys)?;
        self.begin(target, result);
        let (function, mut this, kind) = if target == VRef::ROOT {
            (method.to_owned(), None, None)
        } else {
            match self.session.borrow().object_record(target) {
                Ok((kind, state)) => (format!("{kind}_{method}"), Some(state), Some(kind)),
                Err(_) => (String::new(), None, None),
            }
        };
        let args = codec::decode_args(&args);
        if function.is_empty() || !self.script.has_function(&function, args.len(), true) {
            // The caller's mistake, not the vat's: reject the result, keep the vat.
            let why = format!("no method {method} with {} argument(s) on {target}", args.len());
            self.session.borrow().log(why.clone());
            let reason = format!("{}: {why}", self.name);
            if let Some(r) = result {
                let data = VatData::plain(kernel_core::CapData::error(&reason).body);
                self.session.borrow_mut().effects.push(Effect::Resolve { promise: r, rejected: true, data });
            }
            return self.flush(sys);
        }
        let mut budget = self.limits.max_operations;
        let returned = self.call(&mut budget, &function, args, this.as_mut());
        if self.session.borrow().exited {
            return self.flush(sys);
        }
        let value = returned.map_err(|f| self.fail(&function, f))?;
        {
            let mut s = self.session.borrow_mut();
            if let (Some(kind), Some(state)) = (&kind, this) {
                s.set_object_record(target, kind, state).map_err(|e| VatError::new(format!("{}.{function}: {e}", self.name)))?;
            }
            if let (Some(r), false) = (result, s.result_taken) {
                let data = s.encode(&value).map_err(|e| VatError::new(format!("{}.{function} returned: {e}", self.name)))?;
                s.effects.push(Effect::Resolve { promise: r, rejected: false, data });
            }
        }
        self.flush(sys)
    }

    /// Add `watchers` to the watch record of `promise`, subscribing if it had none.
    fn move_watchers(&mut self, promise: VRef, watchers: Array) -> ApiResult<()> {
        let mut s = self.session.borrow_mut();
        let key = format!("{WATCH_PREFIX}{promise}");
        let mut all = match s.get(&key) {
            Some(text) => codec::store_decode(&text).ok().and_then(|d| d.try_cast::<Array>()).unwrap_or_default(),
            None => {
                s.effects.push(Effect::Subscribe(promise));
                Array::new()
            }
        };
        all.extend(watchers);
        let text = s.store_encode(&Dynamic::from_array(all))?;
        s.set(&key, Some(text));
        Ok(())
    }

    fn notify_inner(&mut self, resolutions: Vec<Resolution>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.load_mirror(sys)?;
        self.begin(VRef::ROOT, None);
        let mut budget = self.limits.max_operations;
        let settled: HashMap<VRef, (bool, VatData)> = resolutions.iter().map(|r| (r.promise, (r.rejected, r.data.clone()))).collect();
        for r in &resolutions {
            let key = format!("{WATCH_PREFIX}{}", r.promise);
            let watchers = {
                let mut s = self.session.borrow_mut();
                let Some(text) = s.get(&key) else { continue };
                s.set(&key, None);
                codec::store_decode(&text).ok().and_then(|d| d.try_cast::<Array>()).unwrap_or_default()
            };
            // A promise fulfilled to another promise forwards: follow the chain through the
            // settlements this notify carries; if it ends at a promise still unresolved, the
            // watch moves there (the kernel already made this vat a subscriber of it).
            let (mut rejected, mut data) = (r.rejected, r.data.clone());
            let mut hops = 0;
            while let (false, Some(next)) = (rejected, data.as_reference().filter(|v| v.is_promise())) {
                match settled.get(&next) {
                    Some((rj, d)) if hops < settled.len() => {
                        (rejected, data) = (*rj, d.clone());
                        hops += 1;
                    }
                    Some(_) => break,
                    None => {
                        self.move_watchers(next, watchers.clone()).map_err(|e| VatError::new(format!("{}: {e}", self.name)))?;
                        break;
                    }
                }
            }
            if !rejected && data.as_reference().is_some_and(|v| v.is_promise() && !settled.contains_key(&v)) {
                continue;
            }
            let r = Resolution { promise: r.promise, rejected, data };
            let value = codec::decode(&r.data);
            let mut outcome = Map::new();
            outcome.insert("ok".into(), Dynamic::from_bool(!r.rejected));
            outcome.insert(if r.rejected { "reason" } else { "value" }.into(), value);
            let outcome = Dynamic::from_map(outcome);
            for w in watchers {
                let Some(mut w) = w.try_cast::<Map>() else { continue };
                let handler = w.remove("handler").and_then(|h| h.into_string().ok()).unwrap_or_default();
                let mut args = vec![outcome.clone()];
                if let Some(c) = w.remove("context") {
                    args.push(c);
                }
                if !self.script.has_function(&handler, args.len(), false) {
                    let s = self.session.borrow();
                    s.log(format!("watch handler {handler}/{} is gone; settlement of {} dropped", args.len(), r.promise));
                    continue;
                }
                let returned = self.call(&mut budget, &handler, args, None);
                if self.session.borrow().exited {
                    return self.flush(sys);
                }
                let _value = returned.map_err(|f| self.fail(&handler, f))?;
            }
        }
        self.flush(sys)
    }
}

impl Vat for ScriptVat {
    fn deliver(
        &mut self,
        target: VRef,
        method: &str,
        args: VatData,
        result: Option<VRef>,
        sys: &mut Syscall<'_, '_>,
    ) -> Result<(), VatError> {
        let r = self.deliver_inner(target, method, args, result, sys);
        self.end();
        r
    }

    fn notify(&mut self, resolutions: Vec<Resolution>, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        let r = self.notify_inner(resolutions, sys);
        self.end();
        r
    }

    /// Drop the imports (and promises held without deciding them) that nothing in the vatstore
    /// names: a script holds references only in its vatstore, its objects' state and its
    /// watches, so whatever is not there is garbage (DESIGN §6).
    fn bring_out_your_dead(&mut self, sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.load_mirror(sys)?;
        let held = sys.held_imports()?;
        let live = self.session.borrow().referenced();
        let dead: Vec<VRef> = held.into_iter().filter(|v| !live.contains(v)).collect();
        if dead.is_empty() {
            return Ok(());
        }
        sys.drop_imports(&dead)?;
        let objects: Vec<VRef> = dead.into_iter().filter(|v| !v.is_promise()).collect();
        if !objects.is_empty() {
            sys.retire_imports(&objects)?;
        }
        Ok(())
    }

    /// No one can reach or recognise these objects any more: forget their state.
    fn retire_exports(&mut self, exports: &[VRef], sys: &mut Syscall<'_, '_>) -> Result<(), VatError> {
        self.load_mirror(sys)?;
        self.begin(VRef::ROOT, None);
        {
            let mut s = self.session.borrow_mut();
            for e in exports {
                let key = format!("{OBJECT_PREFIX}{e}");
                if s.get(&key).is_some() {
                    s.set(&key, None);
                }
            }
        }
        let r = self.flush(sys);
        self.end();
        r
    }
}

/// A [`VatEndpoint`] around a [`ScriptVat`] that reports meter exhaustion as such.
struct ScriptEndpoint {
    inner: VatEndpoint<ScriptVat>,
    meter: Rc<Cell<bool>>,
}

impl kernel_core::Endpoint for ScriptEndpoint {
    fn deliver(&mut self, d: kernel_core::KernelDelivery, ctx: &mut kernel_core::CrankContext<'_>) -> Result<(), Fault> {
        self.inner.deliver(d, ctx).map_err(|f| match f {
            Fault::VatError(why) if self.meter.get() => Fault::MeterExhausted(why),
            other => other,
        })
    }

    fn collect(&mut self, action: kernel_core::GcAction, ctx: &mut kernel_core::CrankContext<'_>) -> Result<(), Fault> {
        self.inner.collect(action, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernel_core::{CapData, CrankOutcome, EndpointId, EndpointStatus, Kernel, MemStore, Settlement};

    fn cluster(scripts: &[(&str, &str)]) -> (Kernel<MemStore>, Vec<EndpointId>, LogSink) {
        let mut kernel = Kernel::open(MemStore::new()).expect("kernel");
        let logs = LogSink::default();
        let eps = scripts
            .iter()
            .map(|(name, src)| {
                let limits = ScriptLimits::default();
                let script = Script::compile(src, &limits).expect("compiles");
                let vat = ScriptVat::new(name, script, limits, Map::new(), LogSink::clone(&logs));
                kernel.add_endpoint(name, vat.endpoint()).expect("add")
            })
            .collect();
        (kernel, eps, logs)
    }

    fn call(kernel: &mut Kernel<MemStore>, ep: EndpointId, method: &str, args: &str) -> kernel_core::KPromiseId {
        let root = kernel.root(ep).expect("root");
        kernel.queue_message(root.into(), method, CapData::plain(args)).expect("queue")
    }

    fn vatstore(kernel: &Kernel<MemStore>, ep: EndpointId) -> BTreeMap<String, String> {
        kernel
            .vatstore(ep)
            .expect("vatstore")
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
            .collect()
    }

    #[test]
    fn exit_keeps_what_came_before_and_nothing_after_even_if_caught() {
        let src = r#"fn quit() { store_set("before", 1); try { exit(false, "bye"); } catch { store_set("after", 1); } 5 }"#;
        let (mut k, eps, _) = cluster(&[("q", src)]);
        let answer = call(&mut k, eps[0], "quit", "[]");
        let report = k.step().expect("step").expect("a crank");
        assert_eq!(report.outcome, CrankOutcome::Exited { endpoint: eps[0], failure: false });
        let store = vatstore(&k, eps[0]);
        assert_eq!(store.get("before").map(String::as_str), Some("1"));
        assert!(!store.contains_key("after"), "{store:?}");
        assert!(matches!(k.endpoint(eps[0]).expect("rec").map(|r| r.status), Some(EndpointStatus::Terminated { .. })));
        assert!(matches!(k.settlement(answer).expect("settlement"), Some(Settlement::Rejected(_))));
    }

    #[test]
    fn rejecting_the_result_keeps_the_vat_and_a_throw_terminates_it() {
        let src = r#"
            fn no(x) { store_set("seen", x); reject(take_result(), `no ${x}`); }
            fn boom() { store_set("boom", true); throw "boom"; }
        "#;
        let (mut k, eps, _) = cluster(&[("v", src)]);
        let no = call(&mut k, eps[0], "no", "[3]");
        k.run(None).expect("run");
        assert_eq!(k.settlement(no).expect("s"), Some(Settlement::Rejected(CapData::plain("\"no 3\""))));
        assert_eq!(vatstore(&k, eps[0]).get("seen").map(String::as_str), Some("3"));
        let boom = call(&mut k, eps[0], "boom", "[]");
        let summary = k.run(None).expect("run");
        assert_eq!(summary.aborted, 1);
        assert!(!vatstore(&k, eps[0]).contains_key("boom"));
        let Some(Settlement::Rejected(reason)) = k.settlement(boom).expect("s") else { panic!("boom must be rejected") };
        assert!(String::from_utf8_lossy(&reason.body).contains(r#"v.boom: threw \"boom\" (line 3)"#), "{reason:?}");
    }

    #[test]
    fn objects_keep_their_state_and_watches_carry_their_context() {
        let maker = r#"
            fn make(n) { make_object("cell", #{ n: n }) }
            fn cell_add(d) { this.n += d; this.n }
        "#;
        let user = r#"
            fn start(maker) {
                store_set("maker", maker);
                watch(send(maker, "make", [40]), "made", "first");
            }
            fn made(outcome, tag) {
                store_set("tag", tag);
                watch(send(outcome.value, "add", [2]), "added");
            }
            private fn added(outcome) { store_set("total", outcome.value); store_set("keys", store_keys("t")); }
        "#;
        let (mut k, eps, _) = cluster(&[("maker", maker), ("user", user)]);
        let maker_root = k.root(eps[0]).expect("root");
        let user_root = k.root(eps[1]).expect("root");
        let args = CapData { body: br#"[{"$slot":0}]"#.to_vec(), slots: vec![maker_root.into()] };
        k.queue_message(user_root.into(), "start", args).expect("queue");
        let summary = k.run(None).expect("run");
        assert_eq!(summary.aborted, 0);
        let user = vatstore(&k, eps[1]);
        assert_eq!(user.get("tag").map(String::as_str), Some("\"first\""));
        assert_eq!(user.get("total").map(String::as_str), Some("42"));
        assert_eq!(user.get("keys").map(String::as_str), Some(r#"["tag","total"]"#));
        let maker = vatstore(&k, eps[0]);
        assert_eq!(maker.get("$obj/o+1").map(String::as_str), Some(r#"{"kind":"cell","state":{"n":42}}"#));
        assert!(!user.keys().any(|k| k.starts_with(WATCH_PREFIX)), "watches are forgotten once they fire: {user:?}");
    }

    #[test]
    fn a_stale_reference_is_an_illegal_syscall_through_the_same_validation() {
        let echo = "fn ping(n) { n }";
        let user = r#"
            fn start(peer) {
                let p = send(peer, "ping", [1]);
                store_set("p", p);
                watch(p, "done");
            }
            fn done(outcome) { }
            fn reuse() { send(store_get("p"), "ping", [2]) }
        "#;
        let (mut k, eps, _) = cluster(&[("echo", echo), ("user", user)]);
        let echo_root = k.root(eps[0]).expect("root");
        let user_root = k.root(eps[1]).expect("root");
        let args = CapData { body: br#"[{"$slot":0}]"#.to_vec(), slots: vec![echo_root.into()] };
        k.queue_message(user_root.into(), "start", args).expect("queue");
        assert_eq!(k.run(None).expect("run").aborted, 0);
        call(&mut k, eps[1], "reuse", "[]");
        let summary = k.run(None).expect("run");
        assert_eq!(summary.aborted, 1);
        let Some(EndpointStatus::Terminated { reason }) = k.endpoint(eps[1]).expect("rec").map(|r| r.status) else {
            panic!("user must be terminated")
        };
        assert!(reason.starts_with("illegal syscall"), "{reason}");
    }

    #[test]
    fn keys_starting_with_a_dollar_belong_to_the_runtime() {
        let src = r#"fn sneak() { store_set("$next-promise", 1) }"#;
        let (mut k, eps, _) = cluster(&[("s", src)]);
        call(&mut k, eps[0], "sneak", "[]");
        assert_eq!(k.run(None).expect("run").aborted, 1);
        let Some(EndpointStatus::Terminated { reason }) = k.endpoint(eps[0]).expect("rec").map(|r| r.status) else { panic!("terminated") };
        assert!(reason.contains("is not allowed"), "{reason}");
    }

    #[test]
    fn a_result_taken_now_is_resolved_in_a_later_crank() {
        let src = r#"
            fn ask() { store_set("pending", take_result()); }
            fn answer(v) { resolve(store_get("pending"), v); store_delete("pending"); "done" }
        "#;
        let (mut k, eps, _) = cluster(&[("v", src)]);
        let asked = call(&mut k, eps[0], "ask", "[]");
        k.run(None).expect("run");
        assert_eq!(k.settlement(asked).expect("s"), None, "still unresolved");
        let answered = call(&mut k, eps[0], "answer", r#"["yes"]"#);
        k.run(None).expect("run");
        assert_eq!(k.settlement(asked).expect("s"), Some(Settlement::Fulfilled(CapData::plain("\"yes\""))));
        assert_eq!(k.settlement(answered).expect("s"), Some(Settlement::Fulfilled(CapData::plain("\"done\""))));
        assert!(!vatstore(&k, eps[0]).contains_key("pending"));
    }
}
