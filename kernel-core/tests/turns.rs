//! Turns (`Kernel::begin_turn` / `end_turn`): the commits of an open turn reach the store as one
//! batch at its end, with the same result as without a turn; the host's commit events and watch
//! callbacks wait for that batch and then run in commit order; a crank that aborts inside a turn
//! leaves nothing while the cranks before it keep their effects; a batch the store refuses
//! leaves the store as it was and the kernel as if reopened on it; and a kernel closed with a
//! turn open (`into_store`, like a crash) loses the turn whole.

mod common;

use common::FailingStore;
use kernel_core::store::scan_committed;
use kernel_core::{
    CapData, CrankContext, Endpoint, EndpointId, EndpointStatus, Entry, Fault, KObjectId, KPromiseId, KRef, Kernel, KernelDelivery,
    MemStore, Settlement, Store, SyscallError,
};
use std::cell::RefCell;
use std::rc::Rc;

/// Everything a store holds (every key starts with the empty prefix).
fn contents(s: &impl Store) -> Vec<Entry> {
    scan_committed(s, b"").expect("scan")
}

/// A vat that logs the methods it receives (host memory) and, by method: `bump` counts in its
/// vatstore and fulfils the result with the count; `send` sends `bump` to every object in the
/// arguments; `fail` and `panic` first write to the vatstore and send, then fault.
struct Bumper(Rc<RefCell<Vec<String>>>);

fn fault(e: SyscallError) -> Fault {
    Fault::VatError(e.to_string())
}

impl Endpoint for Bumper {
    fn deliver(&mut self, d: KernelDelivery, ctx: &mut CrankContext<'_>) -> Result<(), Fault> {
        let KernelDelivery::Message { message, .. } = d else { return Ok(()) };
        self.0.borrow_mut().push(message.method.clone());
        let send_all = |ctx: &mut CrankContext<'_>| -> Result<(), Fault> {
            for slot in &message.args.slots {
                ctx.send(*slot, "bump".into(), CapData::plain(""), None).map_err(fault)?;
            }
            Ok(())
        };
        match message.method.as_str() {
            "bump" => {
                let n = ctx.vatstore_get(b"n").map_err(fault)?.map_or(0, |v| v[0]) + 1;
                ctx.vatstore_set(b"n", vec![n]).map_err(fault)?;
                if let Some(kp) = message.result {
                    ctx.import(KRef::Promise(kp)).map_err(fault)?;
                    ctx.resolve(vec![(kp, Settlement::Fulfilled(CapData::plain(n.to_string())))]).map_err(fault)?;
                }
                Ok(())
            }
            "send" => send_all(ctx),
            "fail" | "panic" => {
                ctx.vatstore_set(b"bad", vec![1]).map_err(fault)?;
                send_all(ctx)?;
                if message.method == "fail" {
                    return Err(Fault::VatError("asked to fail".into()));
                }
                panic!("asked to panic");
            }
            other => Err(Fault::VatError(format!("unknown method {other}"))),
        }
    }
}

type Log = Rc<RefCell<Vec<String>>>;

/// A kernel on `store` with vats `a`, `b`, `c` attached (registered if new), their delivery logs,
/// and their roots.
fn boot<S: Store>(store: S) -> (Kernel<S>, Vec<Log>, Vec<(EndpointId, KObjectId)>) {
    let mut k = Kernel::open(store).expect("open");
    let mut logs = Vec::new();
    let mut vats = Vec::new();
    for name in ["a", "b", "c"] {
        let log = Log::default();
        let ep = k.add_endpoint(name, Box::new(Bumper(log.clone()))).expect("add");
        logs.push(log);
        vats.push((ep, k.root(ep).expect("root")));
    }
    (k, logs, vats)
}

fn queue<S: Store>(k: &mut Kernel<S>, to: KObjectId, method: &str, slots: &[KObjectId]) -> KPromiseId {
    let args = CapData { body: b"x".to_vec(), slots: slots.iter().map(|o| KRef::Object(*o)).collect() };
    k.queue_message(KRef::Object(to), method, args).expect("queue")
}

/// The host's view of the kernel's tables, for comparing two kernels.
fn tables<S: Store>(k: &Kernel<S>) -> String {
    format!(
        "cranks {:?}\nqueue {:?}\npromises {:?}\nobjects {:?}\nendpoints {:?}",
        k.cranks(),
        k.run_queue().expect("queue"),
        k.promise_records().expect("promises"),
        k.objects().expect("objects"),
        k.endpoints().expect("endpoints")
    )
}

/// Records what the host sees run: commit events and watch callbacks, in order.
fn observe<S: Store>(k: &mut Kernel<S>) -> Log {
    let log = Log::default();
    let l = log.clone();
    k.add_commit_observer(move |e| l.borrow_mut().push(format!("commit {}", e.crank.0)));
    log
}

fn watch<S: Store>(k: &mut Kernel<S>, log: &Log, kp: KPromiseId, name: &str) {
    let (l, name) = (log.clone(), name.to_owned());
    k.watch(kp, move |kp, s| l.borrow_mut().push(format!("{name} {kp} {}", String::from_utf8_lossy(&s.data().body)))).expect("watch");
}

/// The same host work with or without a turn around it: the store it leaves, and how many
/// batches reached the store while the work ran.
fn work_with_and_without_a_turn(turn: bool) -> (Vec<Entry>, u64) {
    let store = FailingStore::default();
    let applies = store.applies.clone();
    let (mut k, _, vats) = boot(store);
    let [(_, a), (_, b), (_, c)] = vats[..] else { unreachable!() };
    let before = applies.get();
    if turn {
        assert!(!k.in_turn() && !k.turn_pending());
        k.begin_turn();
        assert!(k.in_turn() && !k.turn_pending(), "a new turn has nothing pending");
    }
    queue(&mut k, a, "send", &[b, c, a]);
    queue(&mut k, b, "bump", &[]);
    let summary = k.run(None).expect("run");
    assert_eq!((summary.cranks, summary.aborted), (5, 0));
    k.set_pinned(KRef::Object(c), true).expect("pin");
    if turn {
        assert!(k.in_turn() && k.turn_pending());
        assert_eq!(applies.get(), before, "nothing reached the store while the turn was open");
        k.end_turn().expect("end turn");
        assert!(!k.in_turn() && !k.turn_pending());
        k.end_turn().expect("ending no turn is nothing");
    }
    assert_eq!(k.vatstore(vats[1].0).expect("vatstore"), [(b"n".to_vec(), vec![2])], "b was bumped twice");
    (contents(k.store()), applies.get() - before)
}

#[test]
fn a_turn_of_several_cranks_reaches_the_store_in_one_apply_and_leaves_what_the_same_run_without_a_turn_leaves() {
    let (with, applies) = work_with_and_without_a_turn(true);
    let (without, applies_without) = work_with_and_without_a_turn(false);
    assert_eq!(applies, 1, "one batch for the whole turn");
    assert_eq!(applies_without, 8, "two queued messages, five cranks, one pin: a batch each");
    assert_eq!(with, without);
}

#[test]
fn commit_events_and_watch_callbacks_wait_for_end_turn_and_then_run_in_commit_order() {
    let (mut k, _, vats) = boot(MemStore::new());
    let log = observe(&mut k);
    let p1 = queue(&mut k, vats[0].1, "bump", &[]);
    let p2 = queue(&mut k, vats[1].1, "bump", &[]);
    watch(&mut k, &log, p2, "w2");
    watch(&mut k, &log, p1, "w1");
    k.begin_turn();
    k.step().expect("step").expect("a crank");
    k.step().expect("step").expect("a crank");
    // Settled within the turn (the host can read that), but the watcher runs only at its end,
    // after the commits before it.
    assert_eq!(k.settlement(p1).expect("read"), Some(Settlement::Fulfilled(CapData::plain("1"))));
    watch(&mut k, &log, p1, "late");
    assert_eq!(log.borrow().len(), 0, "nothing runs before end_turn: {:?}", log.borrow());
    k.end_turn().expect("end turn");
    assert_eq!(*log.borrow(), ["w1 kp1 1", "commit 1", "w2 kp2 1", "commit 2", "late kp1 1"]);
    // Without a turn, the same runs at once.
    watch(&mut k, &log, p2, "after");
    assert_eq!(log.borrow().last().map(String::as_str), Some("after kp2 1"));
}

#[test]
fn a_watch_registered_in_a_turn_on_a_promise_the_turn_settled_runs_only_at_end_turn() {
    let (mut k, _, vats) = boot(MemStore::new());
    let log = observe(&mut k);
    k.begin_turn();
    let p = queue(&mut k, vats[0].1, "bump", &[]);
    k.run(None).expect("run");
    watch(&mut k, &log, p, "w");
    assert_eq!(log.borrow().len(), 0, "{:?}", log.borrow());
    k.end_turn().expect("end turn");
    assert_eq!(*log.borrow(), ["commit 1", "w kp1 1"]);
}

#[test]
fn a_crank_that_aborts_in_a_turn_leaves_no_trace_and_the_cranks_before_it_keep_their_effects() {
    for bad in ["fail", "panic"] {
        let (mut k, logs, vats) = boot(MemStore::new());
        let [(a, ra), (b, rb), (_, rc)] = vats[..] else { unreachable!() };
        k.begin_turn();
        let p1 = queue(&mut k, ra, "bump", &[]);
        let p2 = queue(&mut k, rb, bad, &[rc]);
        let summary = k.run(None).expect("run");
        assert_eq!((summary.cranks, summary.aborted), (2, 1), "{bad}");
        k.end_turn().expect("end turn");
        // Checked on a kernel reopened on the store, which holds exactly what the turn kept.
        let (k, _, _) = boot(k.into_store());
        assert_eq!(k.settlement(p1).expect("read"), Some(Settlement::Fulfilled(CapData::plain("1"))), "{bad}");
        assert_eq!(k.vatstore(a).expect("vatstore"), [(b"n".to_vec(), vec![1])], "{bad}");
        assert!(k.vatstore(b).expect("vatstore").is_empty(), "{bad}: the aborted crank's vatstore write is gone");
        assert!(matches!(k.endpoint(b).expect("read").expect("exists").status, EndpointStatus::Terminated { .. }), "{bad}");
        let rejected = k.settlement(p2).expect("read");
        assert!(matches!(&rejected, Some(Settlement::Rejected(_))), "{bad}: {rejected:?}");
        assert!(k.run_queue().expect("queue").is_empty(), "{bad}: the aborted crank's send is gone");
        assert_eq!(k.cranks().0, 2, "{bad}");
        assert!(logs[2].borrow().is_empty(), "{bad}: c never heard from b");
    }
}

#[test]
fn a_refused_end_turn_leaves_the_store_unchanged_and_the_kernel_as_if_reopened_on_it() {
    let store = FailingStore::default();
    let refuse = store.fail_apply.clone();
    let (mut k, logs, vats) = boot(store);
    let [(a, ra), (_, rb), _] = vats[..] else { unreachable!() };
    let log = observe(&mut k);
    let p1 = queue(&mut k, ra, "bump", &[]);
    watch(&mut k, &log, p1, "w1");
    let before = contents(k.store());
    let tables_before = tables(&k);

    k.begin_turn();
    k.run(None).expect("run");
    let p2 = queue(&mut k, rb, "send", &[ra]);
    watch(&mut k, &log, p2, "w2");
    refuse.set(true);
    let err = k.end_turn().expect_err("the store refuses the batch");
    refuse.set(false);
    assert!(err.to_string().contains("injected write failure"), "{err}");
    assert!(!k.in_turn());
    assert_eq!(contents(k.store()), before, "the store is unchanged");
    assert!(log.borrow().is_empty(), "the turn's held-back callbacks and events are dropped: {:?}", log.borrow());
    assert_eq!(*logs[0].borrow(), ["bump"], "a got the message once, in the lost turn");

    // The kernel is where a kernel freshly opened on the store is, and goes on the same way.
    let (mut fresh, _, _) = boot(FailingStore { inner: k.store().inner.clone(), ..FailingStore::default() });
    assert_eq!(tables(&k), tables_before);
    assert_eq!(tables(&fresh), tables_before);
    assert_eq!(k.settlement(p1).expect("read"), None, "unsettled again");
    assert_eq!(k.run(None).expect("run"), fresh.run(None).expect("run"));
    assert_eq!(contents(k.store()), contents(fresh.store()));
    assert_eq!(*logs[0].borrow(), ["bump", "bump"], "the queued message was delivered again");
    assert_eq!(k.vatstore(a).expect("vatstore"), [(b"n".to_vec(), vec![1])]);
    assert_eq!(*log.borrow(), ["w1 kp1 1", "commit 1"], "the watcher registered before the turn ran once");
}

#[test]
fn a_watch_made_in_a_refused_turn_neither_waits_forever_nor_fires_for_another_promise() {
    let store = FailingStore::default();
    let refuse = store.fail_apply.clone();
    let (mut k, _, vats) = boot(store);
    let ra = vats[0].1;
    let log = observe(&mut k);
    let settled = queue(&mut k, ra, "bump", &[]);
    k.run(None).expect("run");
    log.borrow_mut().clear();

    k.begin_turn();
    // On a promise the store already holds settled: held back until the turn ends.
    watch(&mut k, &log, settled, "old");
    // On a promise the turn made, which the refused batch takes away with it.
    let made = queue(&mut k, ra, "bump", &[]);
    watch(&mut k, &log, made, "made");
    refuse.set(true);
    k.end_turn().expect_err("refused");
    refuse.set(false);
    assert_eq!(*log.borrow(), ["old kp1 1"], "a watch on a promise settled in the store still runs");

    // The promise number comes round again for another promise: the lost one's watcher is gone.
    let again = queue(&mut k, ra, "bump", &[]);
    assert_eq!(again, made);
    k.run(None).expect("run");
    assert_eq!(*log.borrow(), ["old kp1 1", "commit 2"]);
}

#[test]
fn into_store_with_a_turn_open_drops_the_turn_and_open_resumes_from_before_it() {
    let (mut k, _, vats) = boot(MemStore::new());
    let [(a, ra), _, _] = vats[..] else { unreachable!() };
    queue(&mut k, ra, "bump", &[]);
    let before = k.store().clone();
    let tables_before = tables(&k);
    k.begin_turn();
    k.run(None).expect("run");
    queue(&mut k, ra, "bump", &[]);
    assert!(k.turn_pending());
    let store = k.into_store();
    assert_eq!(store, before, "none of the turn's writes");
    let (mut k, logs, _) = boot(store);
    assert_eq!(tables(&k), tables_before);
    assert_eq!(k.run(None).expect("run").cranks, 1);
    assert_eq!(*logs[0].borrow(), ["bump"]);
    assert_eq!(k.vatstore(a).expect("vatstore"), [(b"n".to_vec(), vec![1])]);
}
