//! The helper layer: durable watches, `settled` dispatch, and how answers end the crank.

use kernel_core::{CapData, CrankOutcome, EndpointStatus, Fault, Kernel, MemStore, Settlement, VRef};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
use std::cell::RefCell;
use std::rc::Rc;

type Settled = Rc<RefCell<Vec<(String, Result<String, String>)>>>;

/// On `go(target)`, asks the target `question` and watches the answer as `watch-<n>`, counting
/// calls in its vatstore. Records every `settled` call.
struct Asker {
    settled: Settled,
}

impl Behavior for Asker {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        match method {
            "go" => {
                let target = args.as_reference().ok_or_else(|| VatError::new("go needs a target"))?;
                let n = cx.get_u64("asked")? + 1;
                cx.set("asked", &n.to_string())?;
                let answer = cx.send(target, "question", VatData::plain(n.to_string()))?;
                cx.watch(answer, &format!("watch-{n}"))?;
                Ok(Answer::Value(VatData::plain("\"asked\"")))
            }
            other => Err(VatError::new(format!("no method {other}"))),
        }
    }

    fn settled(&mut self, cx: &mut Cx<'_, '_, '_>, watch: &str, outcome: Result<VatData, VatData>) -> Result<(), VatError> {
        cx.set(&format!("heard/{watch}"), "yes")?;
        let text = |d: VatData| d.text().into_owned();
        self.settled.borrow_mut().push((watch.to_owned(), outcome.map(text).map_err(text)));
        Ok(())
    }
}

/// Answers `question(n)`: even n with a value, odd n with a rejection.
struct Oracle;

impl Behavior for Oracle {
    fn call(&mut self, _cx: &mut Cx<'_, '_, '_>, _target: VRef, _method: &str, args: VatData) -> Result<Answer, VatError> {
        let n: u64 = args.text().parse().map_err(|_| VatError::new("not a number"))?;
        if n % 2 == 0 {
            Ok(Answer::Value(VatData::plain(format!("\"yes {n}\""))))
        } else {
            Ok(Answer::Reject(VatData::plain(format!("\"no {n}\""))))
        }
    }
}

fn text_store(k: &Kernel<MemStore>, ep: kernel_core::EndpointId) -> Vec<(String, String)> {
    k.vatstore(ep)
        .expect("vatstore")
        .into_iter()
        .map(|(a, b)| (String::from_utf8_lossy(&a).into_owned(), String::from_utf8_lossy(&b).into_owned()))
        .collect()
}

fn step(k: &mut Kernel<MemStore>) -> kernel_core::CrankReport {
    k.step().expect("step").expect("queued work")
}

#[test]
fn settled_is_called_with_the_watch_name_and_the_outcome() {
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let settled: Settled = Rc::default();
    let asker = k.add_endpoint("asker", VatEndpoint::boxed(HelperVat::new(Asker { settled: Rc::clone(&settled) }))).expect("add");
    let oracle = k.add_endpoint("oracle", VatEndpoint::boxed(HelperVat::new(Oracle))).expect("add");
    let oracle_root = k.root(oracle).expect("root").into();
    let asker_root = k.root(asker).expect("root").into();
    k.queue_message(asker_root, "go", CapData::reference(oracle_root)).expect("queue");
    k.queue_message(asker_root, "go", CapData::reference(oracle_root)).expect("queue");
    let summary = k.run(None).expect("run");
    assert_eq!(summary.aborted, 0);
    let mut got = settled.borrow().clone();
    got.sort();
    assert_eq!(got, vec![("watch-1".to_owned(), Err("\"no 1\"".to_owned())), ("watch-2".to_owned(), Ok("\"yes 2\"".to_owned()))]);
    let store = text_store(&k, asker);
    assert!(!store.iter().any(|(k, _)| k.starts_with("$watch/")), "a fired watch is forgotten: {store:?}");
    assert!(store.contains(&("heard/watch-1".to_owned(), "yes".to_owned())), "settled ran inside a committed crank");
}

#[test]
fn a_watch_is_durable_vatstore_state_that_survives_a_restart() {
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let before: Settled = Rc::default();
    let asker = k.add_endpoint("asker", VatEndpoint::boxed(HelperVat::new(Asker { settled: Rc::clone(&before) }))).expect("add");
    let oracle = k.add_endpoint("oracle", VatEndpoint::boxed(HelperVat::new(Oracle))).expect("add");
    let oracle_root = k.root(oracle).expect("root").into();
    let asker_root = k.root(asker).expect("root").into();
    k.queue_message(asker_root, "go", CapData::reference(oracle_root)).expect("queue");
    k.queue_message(asker_root, "go", CapData::reference(oracle_root)).expect("queue");
    step(&mut k); // asker: go #1 -> question(1), watch-1
    step(&mut k); // asker: go #2 -> question(2), watch-2
    let watches: Vec<(String, String)> = text_store(&k, asker).into_iter().filter(|(k, _)| k.starts_with("$watch/")).collect();
    assert_eq!(watches.len(), 2, "each watch is a vatstore entry: {watches:?}");
    let mut names: Vec<&str> = watches.iter().map(|(_, v)| v.as_str()).collect();
    names.sort();
    assert_eq!(names, ["watch-1", "watch-2"]);

    // Restart: a new kernel on the same store, with fresh vat instances that remember nothing.
    let store = k.into_store();
    let mut k = Kernel::open(store).expect("reopen");
    let after: Settled = Rc::default();
    let asker2 = k.add_endpoint("asker", VatEndpoint::boxed(HelperVat::new(Asker { settled: Rc::clone(&after) }))).expect("re-attach");
    let oracle2 = k.add_endpoint("oracle", VatEndpoint::boxed(HelperVat::new(Oracle))).expect("re-attach");
    assert_eq!((asker2, oracle2), (asker, oracle));
    let summary = k.run(None).expect("run");
    assert_eq!(summary.aborted, 0);
    assert!(before.borrow().is_empty());
    let mut got = after.borrow().clone();
    got.sort();
    assert_eq!(got, vec![("watch-1".to_owned(), Err("\"no 1\"".to_owned())), ("watch-2".to_owned(), Ok("\"yes 2\"".to_owned()))]);
}

/// `touch` writes the vatstore and sends to itself, then answers as told by the method name.
struct Toucher;

impl Behavior for Toucher {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, _target: VRef, method: &str, _args: VatData) -> Result<Answer, VatError> {
        if method == "echo" {
            return Ok(Answer::Value(VatData::plain("\"echo\"")));
        }
        cx.set("touched", method)?;
        cx.send_only(VRef::ROOT, "echo", VatData::plain("[]"))?;
        match method {
            "reject" => Ok(Answer::Reject(VatData::plain("\"refused\""))),
            "fail" => Err(VatError::new("failed on purpose")),
            _ => Ok(Answer::Value(VatData::plain("\"ok\""))),
        }
    }
}

#[test]
fn answer_reject_rejects_the_callers_result_but_commits_the_crank() {
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let vat = k.add_endpoint("toucher", VatEndpoint::boxed(HelperVat::new(Toucher))).expect("add");
    let root = k.root(vat).expect("root").into();
    let kp = k.queue_message(root, "reject", CapData::plain("[]")).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.outcome, CrankOutcome::Committed);
    assert_eq!(report.flushed, 1, "the send to itself was flushed");
    assert_eq!(k.settlement(kp).expect("settlement"), Some(Settlement::Rejected(CapData::plain("\"refused\""))));
    assert!(text_store(&k, vat).contains(&("touched".to_owned(), "reject".to_owned())));
    assert_eq!(k.endpoint(vat).expect("ep").map(|r| r.status), Some(EndpointStatus::Live));
    assert_eq!(step(&mut k).outcome, CrankOutcome::Committed, "the vat still takes deliveries");
}

#[test]
fn an_err_from_a_behavior_aborts_the_crank_and_terminates_the_vat() {
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let vat = k.add_endpoint("toucher", VatEndpoint::boxed(HelperVat::new(Toucher))).expect("add");
    let root = k.root(vat).expect("root").into();
    let ok = k.queue_message(root, "fine", CapData::plain("[]")).expect("queue");
    k.run(None).expect("run");
    assert_eq!(k.settlement(ok).expect("settlement"), Some(Settlement::Fulfilled(CapData::plain("\"ok\""))));
    let before = text_store(&k, vat);

    let kp = k.queue_message(root, "fail", CapData::plain("[]")).expect("queue");
    let report = step(&mut k);
    assert_eq!(report.outcome, CrankOutcome::Aborted { endpoint: vat, fault: Fault::VatError("failed on purpose".into()) });
    assert_eq!(report.flushed, 0, "its send was dropped");
    assert_eq!(k.queue_len(), 0);
    assert_eq!(text_store(&k, vat), before, "its vatstore write was rolled back");
    match k.settlement(kp).expect("settlement") {
        Some(Settlement::Rejected(d)) => assert!(String::from_utf8_lossy(&d.body).contains("failed on purpose")),
        other => panic!("the caller's result should be rejected, got {other:?}"),
    }
    match k.endpoint(vat).expect("ep").map(|r| r.status) {
        Some(EndpointStatus::Terminated { reason }) => assert!(reason.contains("failed on purpose"), "{reason}"),
        other => panic!("expected terminated, got {other:?}"),
    }
    let late = k.queue_message(root, "fine", CapData::plain("[]")).expect("queue");
    k.run(None).expect("run");
    assert!(k.settlement(late).expect("settlement").is_some_and(|s| s.is_rejected()), "a terminated vat answers nothing");
}

/// Keeps no import at `bringOutYourDead` (answers `live_imports` with nothing), and otherwise
/// behaves like [`Asker`].
struct Forgetful(Asker);

impl Behavior for Forgetful {
    fn call(&mut self, cx: &mut Cx<'_, '_, '_>, target: VRef, method: &str, args: VatData) -> Result<Answer, VatError> {
        self.0.call(cx, target, method, args)
    }

    fn settled(&mut self, cx: &mut Cx<'_, '_, '_>, watch: &str, outcome: Result<VatData, VatData>) -> Result<(), VatError> {
        self.0.settled(cx, watch, outcome)
    }

    fn live_imports(&mut self, _: &mut Cx<'_, '_, '_>, _: &[VRef]) -> Result<Option<Vec<VRef>>, VatError> {
        Ok(Some(Vec::new()))
    }
}

/// Dropping a promise unsubscribes the vat, so the helper never drops a promise it watches at
/// `bringOutYourDead`, even when the behavior does not name it as live: the watch still fires.
#[test]
fn a_watched_promise_survives_bring_out_your_dead() {
    let settled: Settled = Rc::default();
    let mut k = Kernel::open(MemStore::new()).expect("open");
    let asker =
        k.add_endpoint("asker", VatEndpoint::boxed(HelperVat::new(Forgetful(Asker { settled: Rc::clone(&settled) })))).expect("add");
    let oracle = k.add_endpoint("oracle", VatEndpoint::boxed(HelperVat::new(Oracle))).expect("add");
    let (asker_root, oracle_root) = (k.root(asker).expect("root"), k.root(oracle).expect("root"));
    k.queue_message(asker_root.into(), "go", CapData::reference(oracle_root.into())).expect("queue");
    step(&mut k); // asker: go -> question(1), watch-1; the question waits behind the reap
    k.reap(asker).expect("reap");
    let queue = k.run_queue().expect("queue");
    assert!(queue.len() == 2 && matches!(queue[1], kernel_core::RunQueueItem::Gc { .. }), "{queue:?}");
    // The reap runs after the question is answered but before the notify reaches the asker.
    step(&mut k);
    let report = step(&mut k);
    assert_eq!(report.outcome, CrankOutcome::Committed, "{report:?}");
    k.run(None).expect("run");
    assert_eq!(*settled.borrow(), vec![("watch-1".to_owned(), Err("\"no 1\"".to_owned()))]);
}
