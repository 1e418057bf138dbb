//! The vat API a script sees: functions registered on the engine, each working on the
//! [`Session`] of the delivery in progress. They read and write the vat's vatstore mirror and
//! record syscalls ([`Effect`]); the vat makes the recorded syscalls when the script returns.

use super::{LogLine, LogSink, Script};
use crate::codec::{self, Ref};
use kernel_core::{RefKind, VRef};
use kernel_syscall::{VatData, MAX_KEY_LEN, MAX_VALUE_LEN};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// A recorded syscall, made through the real handle once the script has returned.
#[derive(Debug)]
pub(super) enum Effect {
    Send { target: VRef, method: String, args: VatData, result: Option<VRef> },
    Subscribe(VRef),
    Resolve { promise: VRef, rejected: bool, data: VatData },
    Exit { failure: bool, info: VatData },
}

/// State shared between the vat and the engine's registered functions.
pub(super) struct Session {
    pub(super) vat: String,
    /// True only while a delivery runs a script function.
    pub(super) active: bool,
    /// The committed vatstore (`None` until loaded after attach).
    pub(super) committed: Option<BTreeMap<String, String>>,
    /// This delivery's vatstore writes (`None`: delete).
    pub(super) overlay: BTreeMap<String, Option<String>>,
    pub(super) effects: Vec<Effect>,
    pub(super) target: VRef,
    pub(super) result: Option<VRef>,
    pub(super) result_taken: bool,
    pub(super) exited: bool,
    pub(super) params: Map,
    pub(super) script: Script,
    pub(super) logs: LogSink,
}

pub(super) const NEXT_OBJECT: &str = "$next-object";
pub(super) const NEXT_PROMISE: &str = "$next-promise";
pub(super) const WATCH_PREFIX: &str = "$watch/";
pub(super) const OBJECT_PREFIX: &str = "$obj/";

pub(super) type ApiResult<T> = Result<T, Box<EvalAltResult>>;

fn api_err<T>(msg: impl Into<String>) -> ApiResult<T> {
    Err(msg.into().into())
}

impl Session {
    fn check(&self) -> ApiResult<()> {
        if !self.active {
            return api_err("the vat API is only available while the vat handles a delivery");
        }
        if self.exited {
            return api_err("the vat has exited: nothing more is done in this delivery");
        }
        Ok(())
    }

    pub(super) fn get(&self, key: &str) -> Option<String> {
        match self.overlay.get(key) {
            Some(v) => v.clone(),
            None => self.committed.as_ref().and_then(|c| c.get(key).cloned()),
        }
    }

    pub(super) fn set(&mut self, key: &str, value: Option<String>) {
        self.overlay.insert(key.to_owned(), value);
    }

    fn allocate(&mut self, key: &str) -> ApiResult<u64> {
        let n = match self.get(key) {
            Some(v) => v.parse::<u64>().map_err(|_| format!("corrupt vatstore counter {key}: {v:?}"))?,
            None => 1,
        };
        self.set(key, Some((n + 1).to_string()));
        Ok(n)
    }

    pub(super) fn encode(&self, v: &Dynamic) -> ApiResult<VatData> {
        codec::encode(v).map_err(|e| e.to_string().into())
    }

    pub(super) fn store_encode(&self, v: &Dynamic) -> ApiResult<String> {
        let text = codec::store_encode(v).map_err(|e| e.to_string())?;
        if text.len() > MAX_VALUE_LEN {
            return api_err(format!("a vatstore value of {} bytes exceeds {MAX_VALUE_LEN}", text.len()));
        }
        Ok(text)
    }

    fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut keys: BTreeMap<&str, bool> = BTreeMap::new();
        if let Some(c) = &self.committed {
            for k in c.range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded)).map(|(k, _)| k) {
                if !k.starts_with(prefix) {
                    break;
                }
                keys.insert(k, true);
            }
        }
        for (k, v) in &self.overlay {
            if k.starts_with(prefix) {
                keys.insert(k, v.is_some());
            }
        }
        keys.into_iter().filter(|(k, live)| *live && !k.starts_with('$')).map(|(k, _)| k.to_owned()).collect()
    }

    pub(super) fn object_record(&self, obj: VRef) -> ApiResult<(String, Dynamic)> {
        let Some(text) = self.get(&format!("{OBJECT_PREFIX}{obj}")) else {
            return api_err(format!("{obj} is not an object this vat made with make_object"));
        };
        let rec = codec::store_decode(&text).map_err(|e| format!("corrupt object record {obj}: {e}"))?;
        let mut map = rec.try_cast::<Map>().ok_or_else(|| format!("corrupt object record {obj}"))?;
        let kind = map.remove("kind").and_then(|k| k.into_string().ok()).ok_or_else(|| format!("corrupt object record {obj}"))?;
        Ok((kind, map.remove("state").unwrap_or(Dynamic::UNIT)))
    }

    pub(super) fn set_object_record(&mut self, obj: VRef, kind: &str, state: Dynamic) -> ApiResult<()> {
        let mut rec = Map::new();
        rec.insert("kind".into(), Dynamic::from(kind.to_owned()));
        rec.insert("state".into(), state);
        let text = self.store_encode(&Dynamic::from_map(rec))?;
        self.set(&format!("{OBJECT_PREFIX}{obj}"), Some(text));
        Ok(())
    }

    /// Every vref the committed vatstore names: in values (`{"$ref": ...}`) and watch keys.
    pub(super) fn referenced(&self) -> std::collections::HashSet<VRef> {
        fn walk(v: &serde_json::Value, out: &mut std::collections::HashSet<VRef>) {
            match v {
                serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
                serde_json::Value::Object(m) => {
                    if let (1, Some(Ok(r))) = (m.len(), m.get("$ref").and_then(|r| r.as_str()).map(str::parse::<VRef>)) {
                        out.insert(r);
                    }
                    m.values().for_each(|x| walk(x, out));
                }
                _ => {}
            }
        }
        let mut out = std::collections::HashSet::new();
        for (k, v) in self.committed.iter().flatten() {
            if let Some(Ok(p)) = k.strip_prefix(WATCH_PREFIX).map(str::parse::<VRef>) {
                out.insert(p);
            }
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(v) {
                walk(&json, &mut out);
            }
        }
        out
    }

    pub(super) fn log(&self, text: String) {
        self.logs.borrow_mut().push(LogLine { vat: self.vat.clone(), text });
    }
}

fn user_key(key: &str) -> ApiResult<()> {
    if key.is_empty() || key.starts_with('$') || key.len() > MAX_KEY_LEN {
        return api_err(format!("vatstore key {key:?} is not allowed (1..={MAX_KEY_LEN} bytes, not starting with '$')"));
    }
    Ok(())
}

fn promise_ref(r: Ref, role: &str) -> ApiResult<VRef> {
    if r.0.kind != RefKind::Promise {
        return api_err(format!("{role}: {} is not a promise", r.0));
    }
    Ok(r.0)
}

fn identifier(kind: &str) -> bool {
    let mut chars = kind.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_') && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Register the vat API on `engine`; every function works on `session`.
pub(super) fn register_api(engine: &mut Engine, session: &Rc<RefCell<Session>>) {
    engine.register_type_with_name::<Ref>("Ref");
    engine.register_fn("to_string", |r: &mut Ref| r.0.to_string());
    engine.register_fn("to_debug", |r: &mut Ref| format!("Ref({})", r.0));
    engine.register_fn("==", |a: Ref, b: Ref| a == b);
    engine.register_fn("!=", |a: Ref, b: Ref| a != b);
    engine.register_fn("is_promise", |r: Ref| r.0.kind == RefKind::Promise);

    let s = Rc::clone(session);
    let send = move |target: Ref, method: &str, args: Array, with_result: bool| -> ApiResult<Dynamic> {
        let mut s = s.borrow_mut();
        s.check()?;
        let args = codec::encode_args(args).map_err(|e| e.to_string())?;
        let result = if with_result { Some(VRef::local_promise(s.allocate(NEXT_PROMISE)?)) } else { None };
        s.effects.push(Effect::Send { target: target.0, method: method.to_owned(), args, result });
        Ok(result.map(|p| Dynamic::from(Ref(p))).unwrap_or(Dynamic::UNIT))
    };
    let send = Rc::new(send);
    let f = Rc::clone(&send);
    engine.register_fn("send", move |t: Ref, m: &str, a: Array| f(t, m, a, true));
    let f = Rc::clone(&send);
    engine.register_fn("send", move |t: Ref, m: &str| f(t, m, Array::new(), true));
    let f = Rc::clone(&send);
    engine.register_fn("send_only", move |t: Ref, m: &str, a: Array| f(t, m, a, false).map(|_| ()));
    let f = Rc::clone(&send);
    engine.register_fn("send_only", move |t: Ref, m: &str| f(t, m, Array::new(), false).map(|_| ()));

    let s = Rc::clone(session);
    engine.register_fn("make_promise", move || -> ApiResult<Ref> {
        let mut s = s.borrow_mut();
        s.check()?;
        Ok(Ref(VRef::local_promise(s.allocate(NEXT_PROMISE)?)))
    });

    let s = Rc::clone(session);
    let settle = Rc::new(move |p: Ref, value: Dynamic, rejected: bool| -> ApiResult<()> {
        let mut s = s.borrow_mut();
        s.check()?;
        let promise = promise_ref(p, if rejected { "reject" } else { "resolve" })?;
        let data = s.encode(&value)?;
        s.effects.push(Effect::Resolve { promise, rejected, data });
        if s.result == Some(promise) {
            s.result_taken = true;
        }
        Ok(())
    });
    let f = Rc::clone(&settle);
    engine.register_fn("resolve", move |p: Ref, v: Dynamic| f(p, v, false));
    let f = Rc::clone(&settle);
    engine.register_fn("reject", move |p: Ref, v: Dynamic| f(p, v, true));

    let s = Rc::clone(session);
    engine.register_fn("take_result", move || -> ApiResult<Dynamic> {
        let mut s = s.borrow_mut();
        s.check()?;
        s.result_taken = true;
        Ok(s.result.map(|r| Dynamic::from(Ref(r))).unwrap_or(Dynamic::UNIT))
    });

    let s = Rc::clone(session);
    let watch = Rc::new(move |p: Ref, handler: &str, context: Option<Dynamic>| -> ApiResult<()> {
        let mut s = s.borrow_mut();
        s.check()?;
        let promise = promise_ref(p, "watch")?;
        let arity = if context.is_some() { 2 } else { 1 };
        if !s.script.has_function(handler, arity, false) {
            return api_err(format!("watch: the script has no function {handler} with {arity} parameter(s)"));
        }
        let key = format!("{WATCH_PREFIX}{promise}");
        let mut watchers = match s.get(&key) {
            Some(text) => codec::store_decode(&text).ok().and_then(|d| d.try_cast::<Array>()).unwrap_or_default(),
            None => {
                s.effects.push(Effect::Subscribe(promise));
                Array::new()
            }
        };
        let mut w = Map::new();
        w.insert("handler".into(), Dynamic::from(handler.to_owned()));
        if let Some(c) = context {
            w.insert("context".into(), c);
        }
        watchers.push(Dynamic::from_map(w));
        let text = s.store_encode(&Dynamic::from_array(watchers))?;
        s.set(&key, Some(text));
        Ok(())
    });
    let f = Rc::clone(&watch);
    engine.register_fn("watch", move |p: Ref, h: &str| f(p, h, None));
    let f = Rc::clone(&watch);
    engine.register_fn("watch", move |p: Ref, h: &str, c: Dynamic| f(p, h, Some(c)));

    let s = Rc::clone(session);
    engine.register_fn("make_object", move |kind: &str, state: Dynamic| -> ApiResult<Ref> {
        let mut s = s.borrow_mut();
        s.check()?;
        if !identifier(kind) {
            return api_err(format!("make_object: kind {kind:?} is not an identifier"));
        }
        let obj = VRef::export(s.allocate(NEXT_OBJECT)?);
        s.set_object_record(obj, kind, state)?;
        Ok(Ref(obj))
    });
    let s = Rc::clone(session);
    engine.register_fn("get_state", move |obj: Ref| -> ApiResult<Dynamic> {
        let s = s.borrow();
        s.check()?;
        Ok(s.object_record(obj.0)?.1)
    });
    let s = Rc::clone(session);
    engine.register_fn("set_state", move |obj: Ref, state: Dynamic| -> ApiResult<()> {
        let mut s = s.borrow_mut();
        s.check()?;
        let (kind, _) = s.object_record(obj.0)?;
        s.set_object_record(obj.0, &kind, state)
    });
    let s = Rc::clone(session);
    engine.register_fn("self_ref", move || -> ApiResult<Ref> {
        let s = s.borrow();
        s.check()?;
        Ok(Ref(s.target))
    });
    engine.register_fn("root", || Ref(VRef::ROOT));

    let s = Rc::clone(session);
    engine.register_fn("store_get", move |key: &str| -> ApiResult<Dynamic> {
        let s = s.borrow();
        s.check()?;
        user_key(key)?;
        match s.get(key) {
            None => Ok(Dynamic::UNIT),
            Some(text) => codec::store_decode(&text).map_err(|e| format!("vatstore {key:?}: {e}").into()),
        }
    });
    let s = Rc::clone(session);
    engine.register_fn("store_set", move |key: &str, value: Dynamic| -> ApiResult<()> {
        let mut s = s.borrow_mut();
        s.check()?;
        user_key(key)?;
        let text = s.store_encode(&value)?;
        s.set(key, Some(text));
        Ok(())
    });
    let s = Rc::clone(session);
    engine.register_fn("store_delete", move |key: &str| -> ApiResult<()> {
        let mut s = s.borrow_mut();
        s.check()?;
        user_key(key)?;
        s.set(key, None);
        Ok(())
    });
    let s = Rc::clone(session);
    engine.register_fn("store_keys", move |prefix: &str| -> ApiResult<Array> {
        let s = s.borrow();
        s.check()?;
        Ok(s.keys_with_prefix(prefix).into_iter().map(Dynamic::from).collect())
    });

    let s = Rc::clone(session);
    engine.register_fn("log", move |v: Dynamic| {
        let s = s.borrow();
        let text = match v.clone().into_string() {
            Ok(text) => text,
            Err(_) => codec::to_text(&v).unwrap_or_else(|_| v.to_string()),
        };
        s.log(text);
    });
    let s = Rc::clone(session);
    engine.on_print(move |text| s.borrow().log(text.to_owned()));
    let s = Rc::clone(session);
    engine.on_debug(move |text, _, _| s.borrow().log(text.to_owned()));

    let s = Rc::clone(session);
    engine.register_fn("params", move || Dynamic::from_map(s.borrow().params.clone()));
    let s = Rc::clone(session);
    engine.register_fn("vat_name", move || s.borrow().vat.clone());

    let s = Rc::clone(session);
    engine.register_fn("exit", move |failure: bool, info: Dynamic| -> ApiResult<()> {
        let mut s = s.borrow_mut();
        s.check()?;
        let info = s.encode(&info)?;
        s.effects.push(Effect::Exit { failure, info });
        s.exited = true;
        api_err("exit")
    });
}
