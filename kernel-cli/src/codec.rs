//! The one body encoding for values that cross the kernel (DESIGN §1 CapData), and the text form
//! scripted vats keep in their vatstore.
//!
//! **Bodies** are JSON. A reference is the object `{"$slot":N}`, naming the N-th slot of the
//! CapData; a value that *is* one reference is exactly `{"$slot":0}` with one slot (the shape the
//! kernel recognises, [`kernel_core::CapData::REF_BODY`]). Errors the kernel makes are
//! `{"$error":"..."}`. A key of plain data that could be mistaken for a marker (`$slot`, `$ref`,
//! or any key starting with `$$`) is escaped with one more leading `$`, so no data can pass for a
//! reference; other keys (`$error` included) are written as they are.
//!
//! In a script these are rhai values: `()` null, booleans, integers, floats, strings, arrays,
//! object maps, and [`Ref`], an opaque reference no script can make from text.
//!
//! **Vatstore values** of scripted vats use the same JSON with a reference written inline as
//! `{"$ref":"o-3"}` (a vref of that vat), so that stored state is readable in `kernel inspect`.
//! Only the runtime writes these; script data is escaped the same way.

use kernel_core::VRef;
use kernel_syscall::VatData;
use rhai::{Array, Dynamic, Map};
use serde_json::Value;

/// A reference held by a script: a vref of its vat. Scripts can pass it around, compare it and
/// print it, but never make one from a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ref(pub VRef);

/// Why a value cannot cross the kernel or be stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// A rhai value with no place in the encoding (a function pointer, a timestamp, a custom type).
    #[error("a value of type {0} cannot be sent or stored")]
    Unsupported(String),
    /// A float that JSON cannot hold (NaN, infinity).
    #[error("the number {0} cannot be sent or stored")]
    NonFinite(f64),
    /// Nested deeper than the encoder follows.
    #[error("a value nested deeper than {MAX_DEPTH} levels cannot be sent or stored")]
    TooDeep,
    /// Not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
}

/// The deepest nesting encoded.
pub const MAX_DEPTH: usize = 128;

const SLOT: &str = "$slot";
const REF: &str = "$ref";

fn escape_key(k: &str) -> String {
    if k == SLOT || k == REF || k.starts_with("$$") {
        format!("${k}")
    } else {
        k.to_owned()
    }
}

fn unescape_key(k: &str) -> &str {
    if k.starts_with("$$") {
        &k[1..]
    } else {
        k
    }
}

fn to_json(v: &Dynamic, depth: usize, on_ref: &mut dyn FnMut(VRef) -> Value) -> Result<Value, CodecError> {
    if depth > MAX_DEPTH {
        return Err(CodecError::TooDeep);
    }
    if v.is_shared() {
        return to_json(&v.flatten_clone(), depth, on_ref);
    }
    if v.is_unit() {
        return Ok(Value::Null);
    }
    if let Ok(b) = v.as_bool() {
        return Ok(Value::Bool(b));
    }
    if let Ok(i) = v.as_int() {
        return Ok(Value::from(i));
    }
    if let Ok(f) = v.as_float() {
        return serde_json::Number::from_f64(f).map(Value::Number).ok_or(CodecError::NonFinite(f));
    }
    if let Some(s) = v.read_lock::<rhai::ImmutableString>() {
        return Ok(Value::String(s.to_string()));
    }
    if let Ok(c) = v.as_char() {
        return Ok(Value::String(c.to_string()));
    }
    if let Some(r) = v.read_lock::<Ref>() {
        return Ok(on_ref(r.0));
    }
    if let Some(a) = v.read_lock::<Array>() {
        return a.iter().map(|x| to_json(x, depth + 1, on_ref)).collect::<Result<Vec<_>, _>>().map(Value::Array);
    }
    if let Some(m) = v.read_lock::<Map>() {
        let mut out = serde_json::Map::new();
        for (k, x) in m.iter() {
            out.insert(escape_key(k), to_json(x, depth + 1, on_ref)?);
        }
        return Ok(Value::Object(out));
    }
    if let Some(b) = v.read_lock::<rhai::Blob>() {
        return Ok(Value::Array(b.iter().map(|&x| Value::from(x)).collect()));
    }
    Err(CodecError::Unsupported(v.type_name().to_owned()))
}

fn from_json(v: Value, on_marker: &dyn Fn(&serde_json::Map<String, Value>) -> Option<VRef>) -> Dynamic {
    match v {
        Value::Null => Dynamic::UNIT,
        Value::Bool(b) => Dynamic::from_bool(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Dynamic::from_int(i),
            None => Dynamic::from_float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Dynamic::from(s),
        Value::Array(a) => Dynamic::from_array(a.into_iter().map(|x| from_json(x, on_marker)).collect()),
        Value::Object(m) => {
            if m.len() == 1 {
                if let Some(r) = on_marker(&m) {
                    return Dynamic::from(Ref(r));
                }
            }
            let mut out = Map::new();
            for (k, x) in m {
                out.insert(unescape_key(&k).into(), from_json(x, on_marker));
            }
            Dynamic::from_map(out)
        }
    }
}

/// Encode a script value as CapData: JSON body, references as `{"$slot":N}` (each distinct
/// reference gets one slot).
pub fn encode(v: &Dynamic) -> Result<VatData, CodecError> {
    let mut slots: Vec<VRef> = Vec::new();
    let json = to_json(v, 0, &mut |r| {
        let i = slots.iter().position(|s| *s == r).unwrap_or_else(|| {
            slots.push(r);
            slots.len() - 1
        });
        let mut m = serde_json::Map::new();
        m.insert(SLOT.to_owned(), Value::from(i));
        Value::Object(m)
    })?;
    Ok(VatData { body: json.to_string().into_bytes(), slots })
}

/// Decode CapData into a script value. Decoding never fails: a body that is not JSON arrives
/// as its text, and a `{"$slot":N}` naming no slot stays a plain map.
pub fn decode(d: &VatData) -> Dynamic {
    match serde_json::from_slice::<Value>(&d.body) {
        Ok(v) => from_json(v, &|m| {
            let i = m.get(SLOT)?.as_u64()?;
            d.slots.get(usize::try_from(i).ok()?).copied()
        }),
        Err(_) => Dynamic::from(d.text().into_owned()),
    }
}

/// Encode a script value for the vat's own vatstore (references inline as `{"$ref":"o-3"}`).
pub fn store_encode(v: &Dynamic) -> Result<String, CodecError> {
    let json = to_json(v, 0, &mut |r| {
        let mut m = serde_json::Map::new();
        m.insert(REF.to_owned(), Value::String(r.to_string()));
        Value::Object(m)
    })?;
    Ok(json.to_string())
}

/// Decode a value written by [`store_encode`].
pub fn store_decode(text: &str) -> Result<Dynamic, CodecError> {
    let v: Value = serde_json::from_str(text).map_err(|e| CodecError::NotJson(e.to_string()))?;
    Ok(from_json(v, &|m| m.get(REF)?.as_str()?.parse().ok()))
}

/// A script value as JSON text with references written `{"$slot":N}` (for printing).
pub fn to_text(v: &Dynamic) -> Result<String, CodecError> {
    encode(v).map(|d| d.text().into_owned())
}

/// Parse a JSON argument list typed by a user (the CLI's `ARGS-JSON`): must be JSON; an array is
/// the argument list, anything else is one argument.
pub fn parse_args(text: &str) -> Result<Vec<u8>, CodecError> {
    let v: Value = serde_json::from_str(text).map_err(|e| CodecError::NotJson(e.to_string()))?;
    let list = match v {
        Value::Array(a) => Value::Array(a),
        other => Value::Array(vec![other]),
    };
    Ok(list.to_string().into_bytes())
}

/// The arguments of a call: a JSON array body gives one argument per element; any other body is
/// one argument.
pub fn decode_args(d: &VatData) -> Vec<Dynamic> {
    let v = decode(d);
    if v.is_array() {
        v.into_array().unwrap_or_default()
    } else {
        vec![v]
    }
}

/// Encode a list of arguments as a JSON array body.
pub fn encode_args(args: Array) -> Result<VatData, CodecError> {
    encode(&Dynamic::from_array(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, Dynamic)]) -> Dynamic {
        let mut m = Map::new();
        for (k, v) in pairs {
            m.insert((*k).into(), v.clone());
        }
        Dynamic::from_map(m)
    }

    #[test]
    fn a_single_reference_is_the_kernel_reference_body() {
        let d = encode(&Dynamic::from(Ref(VRef::import(3)))).expect("encodes");
        assert_eq!(d.body, kernel_core::CapData::REF_BODY);
        assert_eq!(d.slots, vec![VRef::import(3)]);
        assert_eq!(d.as_reference(), Some(VRef::import(3)));
    }

    #[test]
    fn values_round_trip_with_slots_shared_between_equal_references() {
        let r = Dynamic::from(Ref(VRef::export(2)));
        let v = Dynamic::from_array(vec![r.clone(), map(&[("to", r), ("n", Dynamic::from_int(5)), ("x", Dynamic::from_float(1.5))])]);
        let d = encode(&v).expect("encodes");
        assert_eq!(d.text(), r#"[{"$slot":0},{"n":5,"to":{"$slot":0},"x":1.5}]"#);
        assert_eq!(d.slots.len(), 1);
        let back = decode(&d);
        assert_eq!(encode(&back).expect("re-encodes"), d);
    }

    #[test]
    fn data_cannot_pass_for_a_reference() {
        let forged = map(&[("$slot", Dynamic::from_int(0))]);
        let d = encode(&forged).expect("encodes");
        assert_eq!(d.text(), r#"{"$$slot":0}"#);
        let back = decode(&VatData { body: d.body.clone(), slots: vec![VRef::import(1)] });
        assert!(!back.is::<Ref>(), "escaped key must stay data");
        assert_eq!(encode(&back).expect("re-encodes").body, d.body);
        let stored = store_encode(&map(&[("$ref", Dynamic::from("o-1".to_owned()))])).expect("encodes");
        assert!(!store_decode(&stored).expect("decodes").is::<Ref>());
        // Kernel errors keep their shape through a script.
        let err = decode(&VatData::plain(kernel_core::CapData::error("boom").body));
        assert_eq!(encode(&err).expect("encodes").body, kernel_core::CapData::error("boom").body);
    }

    #[test]
    fn store_form_keeps_references_inline() {
        let v = map(&[("owner", Dynamic::from(Ref(VRef::import(4)))), ("balance", Dynamic::from_int(10))]);
        let s = store_encode(&v).expect("encodes");
        assert_eq!(s, r#"{"balance":10,"owner":{"$ref":"o-4"}}"#);
        assert_eq!(store_encode(&store_decode(&s).expect("decodes")).expect("re-encodes"), s);
    }

    #[test]
    fn odd_bodies_decode_without_failing() {
        assert_eq!(decode(&VatData::plain("not json")).into_string().expect("string"), "not json");
        let v = decode(&VatData::plain(r#"{"$slot":3}"#));
        assert!(v.is_map());
        assert!(encode(&Dynamic::from_float(f64::NAN)).is_err());
    }
}
