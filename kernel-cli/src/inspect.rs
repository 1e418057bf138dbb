//! `kernel inspect`: read-only views of a kernel's tables, as JSON values (for `--json`) and as
//! text, with krefs and vrefs in their canonical text (`ko3`, `kp7`, `o+1`, `p-2`).

use kernel_core::{CapData, EndpointId, EndpointStatus, Kernel, KernelError, PromiseState, RunQueueItem, Settlement, Store};
use serde_json::{json, Value};

/// A view of the tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// Counts, and one line per vat.
    Summary,
    /// The run queue, in order.
    Queue,
    /// Every promise.
    Promises,
    /// Every object.
    Objects,
    /// One vat: status, vatstore, c-list.
    Vat(String),
    /// One vat's c-list.
    Clist(String),
}

/// Why a view could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The kernel or its store failed.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// No vat has that name.
    #[error("no vat is named {0:?}")]
    NoVat(String),
}

/// A body as JSON when it is JSON, else as a string.
fn body(d: &CapData) -> Value {
    serde_json::from_slice(&d.body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.body).into_owned()))
}

/// CapData as `{"body": ..., "slots": [...]}`.
pub fn capdata(d: &CapData) -> Value {
    json!({ "body": body(d), "slots": d.slots.iter().map(|k| k.to_string()).collect::<Vec<_>>() })
}

/// CapData as one line of text: the body, then `slots: ko1 kp2` if it has any.
pub fn capdata_text(d: &CapData) -> String {
    let b = String::from_utf8_lossy(&d.body).into_owned();
    if d.slots.is_empty() {
        b
    } else {
        format!("{b}  slots: {}", d.slots.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(" "))
    }
}

/// A settlement as JSON: `{"state": "fulfilled"|"rejected", "body": ..., "slots": [...]}`.
pub fn settlement(s: &Settlement) -> Value {
    let mut v = capdata(s.data());
    v["state"] = Value::from(if s.is_rejected() { "rejected" } else { "fulfilled" });
    v
}

fn names<S: Store>(k: &Kernel<S>) -> Result<Vec<(EndpointId, String)>, KernelError> {
    Ok(k.endpoints()?.into_iter().map(|(ep, r)| (ep, r.name)).collect())
}

fn name_of(names: &[(EndpointId, String)], ep: EndpointId) -> String {
    names.iter().find(|(e, _)| *e == ep).map(|(_, n)| n.clone()).unwrap_or_else(|| ep.to_string())
}

fn find<S: Store>(k: &Kernel<S>, name: &str) -> Result<EndpointId, InspectError> {
    k.endpoint_id(name)?.ok_or_else(|| InspectError::NoVat(name.to_owned()))
}

fn status(s: &EndpointStatus) -> Value {
    match s {
        EndpointStatus::Live => json!("live"),
        EndpointStatus::Terminated { reason } => json!({ "terminated": reason }),
    }
}

/// The view as JSON.
pub fn view_json<S: Store>(k: &Kernel<S>, view: &View) -> Result<Value, InspectError> {
    let names = names(k)?;
    Ok(match view {
        View::Summary => {
            let promises = k.promises()?;
            let unresolved = promises.iter().filter(|(_, p)| matches!(p, PromiseState::Unresolved { .. })).count();
            let rejected = promises.iter().filter(|(_, p)| matches!(p, PromiseState::Settled(s) if s.is_rejected())).count();
            let mut vats = Vec::new();
            for (ep, rec) in k.endpoints()? {
                vats.push(json!({
                    "id": ep.to_string(),
                    "name": rec.name,
                    "status": status(&rec.status),
                    "clist": k.clist(ep)?.len(),
                    "vatstore": k.vatstore(ep)?.len(),
                }));
            }
            json!({
                "cranks": k.cranks().0,
                "queue": k.queue_len(),
                "objects": k.objects()?.len(),
                "promises": { "unresolved": unresolved, "fulfilled": promises.len() - unresolved - rejected, "rejected": rejected },
                "vats": vats,
            })
        }
        View::Queue => Value::Array(
            k.run_queue()?
                .iter()
                .map(|item| match item {
                    RunQueueItem::Send { target, message } => json!({
                        "send": target.to_string(),
                        "method": message.method,
                        "args": capdata(&message.args),
                        "result": message.result.map(|p| p.to_string()),
                    }),
                    RunQueueItem::Notify { endpoint, promise } => {
                        json!({ "notify": name_of(&names, *endpoint), "promise": promise.to_string() })
                    }
                    RunQueueItem::Gc { endpoint, action } => json!({
                        "gc": name_of(&names, *endpoint),
                        "action": action.name(),
                        "objects": action.objects().iter().map(|o| o.to_string()).collect::<Vec<_>>(),
                    }),
                })
                .collect(),
        ),
        View::Promises => Value::Array(
            k.promise_records()?
                .into_iter()
                .map(|(kp, rec)| {
                    let mut v = match &rec.state {
                        PromiseState::Unresolved { decider, subscribers, queue } => json!({
                            "state": "unresolved",
                            "decider": decider.map(|d| name_of(&names, d)),
                            "subscribers": subscribers.iter().map(|s| name_of(&names, *s)).collect::<Vec<_>>(),
                            "queued": queue.iter().map(|m| m.method.clone()).collect::<Vec<_>>(),
                        }),
                        PromiseState::Settled(s) => settlement(s),
                    };
                    v["id"] = Value::from(kp.to_string());
                    v["refs"] = Value::from(rec.refs);
                    v["pinned"] = Value::from(rec.pinned);
                    v
                })
                .collect(),
        ),
        View::Objects => Value::Array(
            k.objects()?
                .into_iter()
                .map(|(ko, o)| {
                    json!({
                        "id": ko.to_string(),
                        "owner": name_of(&names, o.owner),
                        "pinned": o.pinned,
                        "abandoned": o.abandoned,
                        "reachable": o.reachable,
                        "recognizable": o.recognizable,
                    })
                })
                .collect(),
        ),
        View::Vat(name) => {
            let ep = find(k, name)?;
            let rec = k.endpoint(ep)?.ok_or(InspectError::NoVat(name.clone()))?;
            let mut store = serde_json::Map::new();
            for (key, v) in k.vatstore(ep)? {
                store.insert(String::from_utf8_lossy(&key).into_owned(), Value::String(String::from_utf8_lossy(&v).into_owned()));
            }
            json!({
                "id": ep.to_string(),
                "name": rec.name,
                "status": status(&rec.status),
                "vatstore": store,
                "clist": clist_json(k, ep)?,
            })
        }
        View::Clist(name) => clist_json(k, find(k, name)?)?,
    })
}

fn clist_json<S: Store>(k: &Kernel<S>, ep: EndpointId) -> Result<Value, KernelError> {
    Ok(Value::Array(k.clist(ep)?.into_iter().map(|(kref, vref)| json!({ "kref": kref.to_string(), "vref": vref.to_string() })).collect()))
}

fn status_text(s: &Value) -> String {
    match s.get("terminated") {
        Some(why) => format!("terminated: {}", why.as_str().unwrap_or_default()),
        None => s.as_str().unwrap_or_default().to_owned(),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The view as text lines.
pub fn view_text<S: Store>(k: &Kernel<S>, view: &View) -> Result<Vec<String>, InspectError> {
    let v = view_json(k, view)?;
    let empty = Vec::new();
    let items = v.as_array().unwrap_or(&empty);
    let mut out = Vec::new();
    match view {
        View::Summary => {
            out.push(format!("cranks     {}", v["cranks"]));
            out.push(format!("run queue  {}", v["queue"]));
            out.push(format!("objects    {}", v["objects"]));
            let p = &v["promises"];
            out.push(format!("promises   {} unresolved, {} fulfilled, {} rejected", p["unresolved"], p["fulfilled"], p["rejected"]));
            out.push("vats".to_owned());
            for vat in v["vats"].as_array().unwrap_or(&empty) {
                out.push(format!(
                    "  {:<4} {:<12} c-list {:<4} vatstore {:<4} {}",
                    text(&vat["id"]),
                    text(&vat["name"]),
                    vat["clist"],
                    vat["vatstore"],
                    status_text(&vat["status"])
                ));
            }
        }
        View::Queue => {
            if items.is_empty() {
                out.push("(run queue empty)".to_owned());
            }
            for (i, item) in items.iter().enumerate() {
                if let Some(t) = item.get("send") {
                    let result = item["result"].as_str().map(|r| format!(" -> {r}")).unwrap_or_default();
                    out.push(format!("{:>4}  send {}.{}({}){result}", i + 1, text(t), text(&item["method"]), args_text(&item["args"])));
                } else if let Some(who) = item.get("notify") {
                    out.push(format!("{:>4}  notify {} of {}", i + 1, text(who), text(&item["promise"])));
                } else {
                    out.push(format!("{:>4}  {} to {} {}", i + 1, text(&item["action"]), text(&item["gc"]), item["objects"]));
                }
            }
        }
        View::Promises => {
            for p in items {
                let state = text(&p["state"]);
                let detail = if state == "unresolved" {
                    format!(
                        "decider {}, subscribers {}, queued {}",
                        p["decider"].as_str().unwrap_or("kernel"),
                        p["subscribers"],
                        p["queued"]
                    )
                } else {
                    args_text(p)
                };
                let pin = if p["pinned"] == Value::Bool(true) { ", pinned" } else { "" };
                out.push(format!("{:<6} {state:<10} {detail}  (refs {}{pin})", text(&p["id"]), p["refs"]));
            }
        }
        View::Objects => {
            for o in items {
                let mut flags = Vec::new();
                if o["pinned"] == Value::Bool(true) {
                    flags.push("pinned");
                }
                if o["abandoned"] == Value::Bool(true) {
                    flags.push("abandoned");
                }
                out.push(format!(
                    "{:<6} owner {:<12} reachable {} recognizable {} {}",
                    text(&o["id"]),
                    text(&o["owner"]),
                    o["reachable"],
                    o["recognizable"],
                    flags.join(" ")
                ));
            }
        }
        View::Vat(_) => {
            out.push(format!("{} {}  {}", text(&v["id"]), text(&v["name"]), status_text(&v["status"])));
            out.push("vatstore".to_owned());
            for (key, val) in v["vatstore"].as_object().into_iter().flatten() {
                out.push(format!("  {key} = {}", text(val)));
            }
            out.push("c-list".to_owned());
            for e in v["clist"].as_array().unwrap_or(&empty) {
                out.push(format!("  {:<6} {}", text(&e["kref"]), text(&e["vref"])));
            }
        }
        View::Clist(_) => {
            for e in items {
                out.push(format!("{:<6} {}", text(&e["kref"]), text(&e["vref"])));
            }
        }
    }
    Ok(out)
}

fn args_text(d: &Value) -> String {
    let slots = d["slots"].as_array().map(|s| s.iter().map(text).collect::<Vec<_>>()).unwrap_or_default();
    if slots.is_empty() {
        d["body"].to_string()
    } else {
        format!("{}  slots: {}", d["body"], slots.join(" "))
    }
}
