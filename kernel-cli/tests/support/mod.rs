//! Running the real `kernel` binary from tests, and comparing its output with checked-in
//! expectation files (`BLESS=1 cargo test -p kernel-cli` rewrites them).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The crate's directory: commands run there, so paths in output are relative and stable.
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run `kernel args...` in the crate directory.
pub fn kernel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kernel"))
        .args(args)
        .current_dir(crate_dir())
        .env_remove("RUST_LOG")
        .output()
        .expect("the kernel binary runs")
}

/// stdout as text, without the timing line of `run`'s summary.
pub fn transcript(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.starts_with("-- elapsed")).map(|l| format!("{l}\n")).collect()
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Compare `actual` with the file at `path` (relative to the crate), or write it under BLESS=1.
pub fn expect_file(path: &str, actual: &str) {
    let file = crate_dir().join(path);
    if std::env::var_os("BLESS").is_some() {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).expect("create expectation dir");
        }
        std::fs::write(&file, actual).expect("write expectation");
        return;
    }
    let expected = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e} (run with BLESS=1 to create it)", file.display()));
    if expected != actual {
        panic!("{} differs (BLESS=1 rewrites it)\n--- expected\n{expected}\n--- actual\n{actual}", file.display());
    }
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Path as a &str for arguments.
pub fn arg(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Every view of `kernel inspect --json` of a store, as one JSON document.
pub fn inspect_all(store: &Path, vats: &[&str]) -> String {
    let view = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["inspect", arg(store)];
        all.extend_from_slice(args);
        all.push("--json");
        let out = kernel(&all);
        assert!(out.status.success(), "inspect {args:?} failed: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("inspect prints JSON")
    };
    let mut doc = serde_json::Map::new();
    for name in ["summary", "queue", "promises", "objects"] {
        doc.insert(name.to_owned(), view(&[name]));
    }
    let mut per_vat = serde_json::Map::new();
    for v in vats {
        per_vat.insert((*v).to_owned(), view(&["vat", v]));
    }
    doc.insert("vats".to_owned(), serde_json::Value::Object(per_vat));
    let mut text = serde_json::to_string_pretty(&serde_json::Value::Object(doc)).expect("serialize");
    text.push('\n');
    text
}
