//! Bad input ends with one clear line on stderr naming the file, the line and the key, exit
//! code 2, and nothing written. Every `tests/bad/<case>.toml` is a case; its expected line is
//! `tests/bad/<case>.expected` (`BLESS=1` writes them).

mod support;

use support::*;

fn refused(args: &[&str]) -> String {
    let out = kernel(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?} must exit 2; stderr: {err}");
    assert!(out.stdout.is_empty(), "{args:?} printed: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(err.lines().count(), 1, "{args:?} must print one line: {err}");
    err
}

#[test]
fn every_bad_cluster_file_is_refused_with_one_line_and_nothing_written() {
    let dir = crate_dir().join("tests/bad");
    let mut cases: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/bad")
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".toml").map(str::to_owned))
        .collect();
    cases.sort();
    assert!(cases.len() >= 15, "cases: {cases:?}");
    for case in cases {
        let file = format!("tests/bad/{case}.toml");
        let store = dir.join(format!("{case}.store"));
        let err = refused(&["run", &file]);
        assert!(!store.exists(), "{case}: {} was created", store.display());
        assert!(err.starts_with(&format!("kernel: error: {file}:")) || err.contains(".rhai:"), "{case}: {err}");
        expect_file(&format!("tests/bad/{case}.expected"), &err);
    }
}

#[test]
fn a_missing_cluster_file_is_refused() {
    let err = refused(&["run", "tests/bad/there-is-no-such-file.toml"]);
    assert!(err.contains("there-is-no-such-file.toml: cannot read the cluster file"), "{err}");
}

#[test]
fn send_and_inspect_refuse_what_is_not_a_store() {
    let dir = tempdir();
    for args in [vec!["inspect", arg(dir.path())], vec!["send", arg(dir.path()), "a.b"], vec!["inspect", "tests/bad"]] {
        let err = refused(&args);
        assert!(err.contains("not a kernel store directory"), "{err}");
    }
}

#[test]
fn run_refuses_to_write_into_a_foreign_directory() {
    let err = refused(&["run", "examples/ping-pong/cluster.toml", "--store", "tests/bad"]);
    assert!(err.contains("not a kernel store directory (it holds"), "{err}");
}

#[test]
fn a_store_refuses_a_cluster_with_other_vats() {
    let dir = tempdir();
    let store = dir.path().join("s");
    let ok = kernel(&["run", "examples/ping-pong/cluster.toml", "--store", arg(&store), "--quiet"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let err = refused(&["run", "examples/bank/cluster.toml", "--store", arg(&store)]);
    assert!(err.contains("cannot change once it has run"), "{err}");
}

#[test]
fn send_refuses_bad_arguments() {
    let dir = tempdir();
    let store = dir.path().join("s");
    let ok = kernel(&["run", "examples/ping-pong/cluster.toml", "--store", arg(&store), "--quiet"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    for (args, needle) in [
        (vec!["send", arg(&store), "bob"], "expected VAT.METHOD"),
        (vec!["send", arg(&store), "carol.ping"], "no vat is named \"carol\""),
        (vec!["send", arg(&store), "bob.ping", "[1,"], "ARGS-JSON"),
        (vec!["send", arg(&store), "bob.ping", "[1]", "--slot", "nobody"], "neither a kref nor a vat name"),
        (vec!["send", arg(&store), "bob.ping", "[1]", "--slot", "ko99"], "unknown reference ko99"),
        (vec!["inspect", arg(&store), "vat", "carol"], "no vat is named \"carol\""),
    ] {
        let err = refused(&args);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_store_directory_cut_short_while_being_made_is_accepted() {
    let dir = tempdir();
    let store = dir.path().join("s");
    std::fs::create_dir_all(store.join("kernel")).expect("mkdir");
    std::fs::write(store.join("kernel").join("kernel-store.lock"), b"").expect("lock file");
    let out = kernel(&["run", "examples/ping-pong/cluster.toml", "--store", arg(&store), "--quiet"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(transcript(&out).starts_with("new store"), "{}", transcript(&out));
}
