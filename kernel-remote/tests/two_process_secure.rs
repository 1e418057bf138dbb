//! Two real processes (`ken-node`) on fjall over secure links: each kernel's identity is created
//! in its store directory on first use (`ken-node id`, what `kernel id STORE` does), each allows
//! only the other's key, and both are SIGKILLed at random moments and restarted — every restart
//! reloads the same key and handshakes again. In the end both apps counted exactly `count`
//! messages and answers, read back from the stores; the keys never changed.

mod common;

use common::{final_counters, free_ports, identity, kill_at_random_until_done, Side};

#[test]
fn two_secure_processes_killed_at_random_end_with_exact_counters_and_the_same_keys() {
    let count = 100u64;
    let kills = 4u64;
    let tmp = tempfile::tempdir().expect("tempdir");
    let (la, lb) = free_ports();
    let (da, db) = (tmp.path().join("a"), tmp.path().join("b"));
    let (ka, kb) = (identity(&da), identity(&db));
    assert_ne!(ka, kb);
    assert_eq!(identity(&da), ka, "the key is kept, not made again");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(da.join(kernel_remote::IDENTITY_FILE)).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let mut a = Side::new("a", "b", &da, "group", la, Some(lb), Some(kb.clone()));
    let mut b = Side::new("b", "a", &db, "sync", lb, None, Some(ka.clone()));
    kill_at_random_until_done(&mut a, &mut b, count, kills, 0x2545_F491_4F6C_DD1D, false);
    assert_eq!(final_counters(&da, "b"), (count, count, 0), "a's app");
    assert_eq!(final_counters(&db, "a"), (count, count, 0), "b's app");
    assert_eq!((identity(&da), identity(&db)), (ka, kb), "the identities survived every kill");
}
