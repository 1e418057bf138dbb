//! `kernel id STORE`: the kernel's identity for secure peer links.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn kernel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kernel")).args(args).output().expect("the kernel binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ping_pong() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ping-pong/cluster.toml").display().to_string()
}

#[test]
fn id_prints_the_same_public_key_every_time_and_keeps_the_secret_owner_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let store = store.to_str().expect("utf-8 path");
    let run = kernel(&["run", "--quiet", "--store", store, &ping_pong()]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let first = kernel(&["id", store]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let id = text(&first.stdout);
    assert_eq!(id.trim().len(), 64, "a 32-byte public key in hex: {id:?}");
    assert!(id.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(text(&kernel(&["id", store]).stdout), id, "the key pair is created once");
    let key_file = Path::new(store).join("kernel").join(kernel_remote::IDENTITY_FILE);
    let mode = std::fs::metadata(&key_file).expect("key file").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The store still runs and resumes with the key beside it.
    let again = kernel(&["run", "--quiet", "--store", store, &ping_pong()]);
    assert!(again.status.success(), "{}", text(&again.stderr));
}

#[test]
fn id_refuses_a_key_others_can_read_and_a_directory_that_is_no_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let store = store.to_str().expect("utf-8 path");
    assert!(kernel(&["run", "--quiet", "--store", store, &ping_pong()]).status.success());
    assert!(kernel(&["id", store]).status.success());
    let key_file = Path::new(store).join("kernel").join(kernel_remote::IDENTITY_FILE);
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let refused = kernel(&["id", store]);
    assert_eq!(refused.status.code(), Some(2));
    let err = text(&refused.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains("0644") && err.contains("owner only"), "{err}");

    let nothing = dir.path().join("nothing");
    let refused = kernel(&["id", nothing.to_str().expect("utf-8 path")]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(text(&refused.stderr).contains("not a kernel store"), "{}", text(&refused.stderr));
    assert!(!nothing.exists(), "nothing was created");
}
