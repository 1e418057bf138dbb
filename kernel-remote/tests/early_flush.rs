//! Group commit on fjall with a delay that never passes: the node, idle with output waiting
//! only for durability, syncs the group itself (`DurableStore::flush_now`), so messages and
//! acknowledgements leave at once — and still only once durable.

use kernel_core::{CapData, Kernel, Settlement, VRef};
use kernel_remote::sim::LoopbackPair;
use kernel_remote::{KernelId, Node, RemoteConfig};
use kernel_store::{Durability, FjallStore, ManualClock, StoreOptions};
use kernel_syscall::{Answer, Behavior, Cx, HelperVat, VatData, VatEndpoint, VatError};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

struct Echo;
impl Behavior for Echo {
    fn call(&mut self, _: &mut Cx<'_, '_, '_>, _: VRef, _: &str, args: VatData) -> Result<Answer, VatError> {
        Ok(Answer::Value(args))
    }
}

fn id(s: &str) -> KernelId {
    s.parse().expect("kernel id")
}

/// A node on a group-commit store whose clock never moves and whose group never fills.
fn node(dir: &std::path::Path, name: &str, peer: &str) -> Node<FjallStore> {
    let never = Durability::Group { max_cranks: u64::MAX, max_delay: Duration::from_secs(3600) };
    let store = FjallStore::open(dir, StoreOptions::new(never).with_clock(Arc::new(ManualClock::new()))).expect("store");
    let observer = store.crank_observer();
    let mut kernel = Kernel::open(store).expect("kernel");
    kernel.add_commit_observer(observer);
    let mut node = Node::new(kernel, id(name), RemoteConfig::default());
    let echo = node.kernel_mut().add_endpoint("echo", VatEndpoint::boxed(HelperVat::new(Echo))).expect("vat");
    let root = node.kernel().root(echo).expect("root");
    node.set_bootstrap(root);
    node.add_peer(id(peer)).expect("peer");
    node
}

#[test]
fn an_idle_node_syncs_its_group_instead_of_waiting_out_the_delay() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut a = node(&tmp.path().join("a"), "a", "b");
    let mut b = node(&tmp.path().join("b"), "b", "a");
    let mut pair = LoopbackPair::connected(&mut a, &mut b).expect("pair");
    let target = a.peer_root(&id("b")).expect("b's root");
    let answers = Rc::new(RefCell::new(Vec::new()));
    for i in 0..5u32 {
        let kp = a.kernel_mut().queue_message(target.into(), "echo", CapData::plain(i.to_string())).expect("queue");
        let seen = Rc::clone(&answers);
        a.kernel_mut()
            .watch(kp, move |_, s| {
                if let Settlement::Fulfilled(d) = s {
                    seen.borrow_mut().push(String::from_utf8_lossy(&d.body).into_owned());
                }
            })
            .expect("watch");
        pair.run_until_idle(&mut a, &mut b).expect("idle");
    }
    assert_eq!(*answers.borrow(), ["0", "1", "2", "3", "4"]);
    for n in [&a, &b] {
        // Every message was acknowledged: the receiver's applying batch became durable, which
        // only the node's early syncs could make happen here.
        assert_eq!(n.backlog(), 0, "{}", n.id());
        assert!(n.stats().early_syncs > 0, "{}: {:?}", n.id(), n.stats());
    }
    assert_eq!(b.stats().applied, 5, "the 5 echoes");
    assert_eq!(a.stats().applied, 5);
}
