//! The simulation's workload: an [`App`] vat on every kernel, its root the kernel's bootstrap
//! object. `start` makes it send `count` numbered `incr` messages with result promises to each
//! peer (a burst at once, then one more per answer). Every receiver checks that each peer's
//! numbers arrive exactly once and in order, every sender that the answers do, and the state
//! they leave in the vatstore is what the simulation compares with a fault-free run.
//!
//! Some messages carry references: every third the receiver's own bootstrap object (it comes
//! back as the receiver's `ro+0`), every fifth a promise the sender resolves at once (its
//! settlement follows it across the link), every fourth a fresh object the sender exports, which
//! the receiver calls back (`cb`, with a result) across the link.

use kernel_core::VRef;
use kernel_syscall::{Answer, Behavior, Cx, VatData, VatError};

/// The vat's endpoint name.
pub const APP_NAME: &str = "app";

/// The workload vat. Its state is all in its vatstore: `me`, `count`, `peer/<name>` (the peer's
/// root vref), `sent/<name>`, `in/<name>` (the last number received), `got/<name>` (the last
/// answer received), `cb/<name>` (callbacks answered by that peer), `served` (callbacks this app
/// answered), `total`, and `bad` (protocol violations it saw; absent when none).
#[derive(Debug, Default)]
pub struct App;

fn bad(cx: &mut Cx<'_, '_, '_>, what: &str) -> Result<(), VatError> {
    let n = cx.get_u64("bad")? + 1;
    cx.set("bad", &n.to_string())?;
    let first = cx.get("bad/first")?;
    if first.is_none() {
        cx.set("bad/first", what)?;
    }
    Ok(())
}

fn send_incr(cx: &mut Cx<'_, '_, '_>, peer: &str, n: u64) -> Result<(), VatError> {
    let me = cx.get("me")?.unwrap_or_default();
    let target: VRef =
        cx.get(&format!("peer/{peer}"))?.and_then(|s| s.parse().ok()).ok_or_else(|| VatError::new(format!("no peer {peer}")))?;
    let mut args = VatData::plain(format!("{me}|{n}"));
    if n.is_multiple_of(3) {
        args.slots.push(target);
    }
    let mut resolve_after = None;
    if n.is_multiple_of(5) {
        let p = cx.new_promise()?;
        args.slots.push(p);
        resolve_after = Some(p);
    }
    if n.is_multiple_of(4) {
        args.slots.push(cx.export()?);
    }
    let result = cx.send(target, "incr", args)?;
    cx.watch(result, &format!("{peer}|{n}"))?;
    if let Some(p) = resolve_after {
        cx.resolve(p, VatData::plain(format!("gift {n}")))?;
    }
    cx.set(&format!("sent/{peer}"), &n.to_string())
}

fn parse_pair(s: &str) -> Option<(String, u64)> {
    let (a, b) = s.split_once('|')?;
    Some((a.to_owned(), b.parse().ok()?))
}

impl Behavior for App {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        match method {
            // body `me|count|burst|peer1,peer2`, slots: the peers' roots in that order.
            "start" => {
                let text = args.text().into_owned();
                let parts: Vec<&str> = text.split('|').collect();
                let [me, count, burst, peers] = parts[..] else { return Err(VatError::new(format!("bad start {text:?}"))) };
                let count: u64 = count.parse().map_err(|_| VatError::new("bad count"))?;
                let burst: u64 = burst.parse().map_err(|_| VatError::new("bad burst"))?;
                let peers: Vec<&str> = peers.split(',').collect();
                if peers.len() != args.slots.len() {
                    return Err(VatError::new("one slot per peer"));
                }
                cx.set("me", me)?;
                cx.set("count", &count.to_string())?;
                for (name, root) in peers.iter().zip(&args.slots) {
                    cx.set(&format!("peer/{name}"), &root.to_string())?;
                }
                for name in &peers {
                    for n in 1..=burst.min(count) {
                        send_incr(cx, name, n)?;
                    }
                }
                Ok(Answer::Value(VatData::plain("started")))
            }
            "incr" => {
                let Some((from, n)) = parse_pair(&args.text()) else { return Err(VatError::new("bad incr")) };
                let key = format!("in/{from}");
                let last = cx.get_u64(&key)?;
                if n != last + 1 {
                    bad(cx, &format!("incr {n} from {from} after {last}"))?;
                }
                let expect_slots = u64::from(n.is_multiple_of(3)) + u64::from(n.is_multiple_of(5)) + u64::from(n.is_multiple_of(4));
                if args.slots.len() as u64 != expect_slots {
                    bad(cx, &format!("incr {n} from {from} carried {} slots", args.slots.len()))?;
                } else if n.is_multiple_of(4) {
                    // Call the sender's fresh object back, across the link.
                    let callback = args.slots[args.slots.len() - 1];
                    let answer = cx.send(callback, "cb", VatData::plain(n.to_string()))?;
                    cx.watch(answer, &format!("cb:{from}|{n}"))?;
                }
                cx.set(&key, &n.to_string())?;
                let total = cx.get_u64("total")? + 1;
                cx.set("total", &total.to_string())?;
                Ok(Answer::Value(VatData::plain(n.to_string())))
            }
            "cb" => {
                let served = cx.get_u64("served")? + 1;
                cx.set("served", &served.to_string())?;
                Ok(Answer::Value(args))
            }
            other => Err(VatError::new(format!("no method {other}"))),
        }
    }

    fn settled(&mut self, cx: &mut Cx<'_, '_, '_>, watch: &str, outcome: Result<VatData, VatData>) -> Result<(), VatError> {
        let Some((peer, n)) = parse_pair(watch) else { return Err(VatError::new(format!("bad watch {watch}"))) };
        if let Some(from) = peer.strip_prefix("cb:") {
            match outcome {
                Ok(v) if v.text() == n.to_string() => {}
                _ => bad(cx, &format!("callback {n} to {from} went wrong"))?,
            }
            let key = format!("cb/{from}");
            let got = cx.get_u64(&key)? + 1;
            return cx.set(&key, &got.to_string());
        }
        match outcome {
            Ok(v) if v.text() == n.to_string() => {}
            Ok(v) => bad(cx, &format!("answer {n} from {peer} was {}", v.text()))?,
            Err(e) => bad(cx, &format!("answer {n} from {peer} rejected: {}", e.text()))?,
        }
        let key = format!("got/{peer}");
        let got = cx.get_u64(&key)?;
        if n != got + 1 {
            bad(cx, &format!("answer {n} from {peer} after {got}"))?;
        }
        cx.set(&key, &n.to_string())?;
        let next = cx.get_u64(&format!("sent/{peer}"))? + 1;
        if next <= cx.get_u64("count")? {
            send_incr(cx, &peer, next)?;
        }
        Ok(())
    }
}
