//! Built-in Rust vats a cluster file can name with `builtin = "<name>"`. They speak the same
//! body encoding as scripts (arguments are a JSON array; see [`crate::codec`]) and are written
//! with kernel-syscall's helper layer.
//!
//! - `echo`: every method answers with its argument (or its argument list, if it has not one).
//! - `counter`: `increment()` adds one to a durable count and answers it; `get()` answers it.
//! - `ponger`: `ping(n)` answers `n`.
//! - `pinger`: `bootstrap(vats)` starts a rally with the vat named by param `partner`: it sends
//!   `ping(1)`, watches the answer, and pings `n + 1` on each pong until param `rally` (the
//!   last pong is kept in vatstore key `pongs`). The same protocol as the ping-pong example's
//!   scripts, so the two can be compared (the benchmark does).

use kernel_core::{CapData, Endpoint, VRef};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
use serde_json::Value;

/// The names `builtin` accepts.
pub const BUILTINS: &[&str] = &["echo", "counter", "pinger", "ponger"];

/// The built-in vat `name`, configured by `params` (a JSON object), or `None` if there is no
/// such built-in.
pub fn builtin(name: &str, params: &Value) -> Option<Box<dyn Endpoint>> {
    Some(match name {
        "echo" => VatEndpoint::boxed(HelperVat::new(Echo)),
        "counter" => VatEndpoint::boxed(HelperVat::new(Counter)),
        "ponger" => VatEndpoint::boxed(HelperVat::new(Ponger)),
        "pinger" => VatEndpoint::boxed(HelperVat::new(Pinger {
            partner: params.get("partner").and_then(Value::as_str).unwrap_or("bob").to_owned(),
            rally: params.get("rally").and_then(Value::as_u64).unwrap_or(3),
        })),
        _ => return None,
    })
}

fn no_method(method: &str) -> Answer {
    Answer::Reject(VatData::plain(CapData::error(&format!("no method {method}")).body))
}

/// The argument list of a call, as JSON values.
fn args_of(args: &VatData) -> Vec<Value> {
    match serde_json::from_slice::<Value>(&args.body) {
        Ok(Value::Array(a)) => a,
        Ok(v) => vec![v],
        Err(_) => vec![Value::String(args.text().into_owned())],
    }
}

struct Echo;

impl Behavior for Echo {
    fn call(&mut self, _cx: &mut Cx<'_, '_, '_>, _target: VRef, _method: &str, args: VatData) -> Result<Answer, VatError> {
        let list = args_of(&args);
        let body = match list.as_slice() {
            [one] => one.to_string(),
            _ => Value::Array(list).to_string(),
        };
        Ok(Answer::Value(VatData { body: body.into_bytes(), slots: args.slots }))
    }
}

struct Counter;

impl Behavior for Counter {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, _args: VatData) -> Result<Answer, VatError> {
        match method {
            "increment" => {
                let n = cx.get_u64("count")? + 1;
                cx.set("count", &n.to_string())?;
                Ok(Answer::Value(VatData::plain(n.to_string())))
            }
            "get" => Ok(Answer::Value(VatData::plain(cx.get_u64("count")?.to_string()))),
            other => Ok(no_method(other)),
        }
    }
}

struct Ponger;

impl Behavior for Ponger {
    fn call(&mut self, _cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        match (method, args_of(&args).as_slice()) {
            ("ping", [n]) => Ok(Answer::Value(VatData::plain(n.to_string()))),
            _ => Ok(no_method(method)),
        }
    }
}

struct Pinger {
    partner: String,
    rally: u64,
}

impl Pinger {
    fn ping(&mut self, cx: &mut Cx<'_, '_, '_>, n: u64) -> Result<(), VatError> {
        let partner = cx.get("partner")?.ok_or_else(|| VatError::new("pinger: no partner"))?;
        let partner: VRef = partner.parse().map_err(|e| VatError::new(format!("pinger: {e}")))?;
        let answer = cx.send(partner, "ping", VatData::plain(format!("[{n}]")))?;
        cx.watch(answer, "pong")
    }
}

impl Behavior for Pinger {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        if method != "bootstrap" {
            return Ok(no_method(method));
        }
        let slot = args_of(&args)
            .first()
            .and_then(|vats| vats.get(&self.partner))
            .and_then(|r| r.get("$slot"))
            .and_then(Value::as_u64)
            .and_then(|i| args.slots.get(usize::try_from(i).ok()?).copied())
            .ok_or_else(|| VatError::new(format!("pinger: bootstrap names no vat {:?}", self.partner)))?;
        cx.set("partner", &slot.to_string())?;
        self.ping(cx, 1)?;
        Ok(Answer::Value(VatData::plain("\"started\"")))
    }

    fn settled(&mut self, cx: &mut Cx<'_, '_, '_>, _watch: &str, outcome: Result<VatData, VatData>) -> Result<(), VatError> {
        let pong = outcome.map_err(|r| VatError::new(format!("pinger: ping rejected: {}", r.text())))?;
        let n: u64 = pong.text().parse().map_err(|_| VatError::new(format!("pinger: bad pong {}", pong.text())))?;
        cx.set("pongs", &n.to_string())?;
        if n < self.rally {
            self.ping(cx, n + 1)?;
        }
        Ok(())
    }
}
