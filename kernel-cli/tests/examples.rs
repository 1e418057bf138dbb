//! Golden tests: each example under `examples/` is driven through the real binary by the
//! commands in `tests/golden/<example>.cmds` (one per line; `$CLUSTER` is the example's cluster
//! file, `$STORE` a fresh store directory), and the transcript and the final `inspect --json` of
//! every table are compared with `tests/golden/<example>.transcript` and `.inspect.json`. An
//! example runs from a copy, scaled down by `tests/golden/<example>.patch` where it has one.
//! Adding a case is adding a `.cmds` file; `BLESS=1` writes the expectations.

mod support;

use support::*;

/// A copy of `examples/<example>` in `dir`, with the replacements of
/// `tests/golden/<example>.patch` (lines `FROM => TO`) made in its cluster file: how a test runs
/// an example at a smaller scale. Returns the copy's cluster file.
fn example_copy(example: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let from = crate_dir().join("examples").join(example);
    let to = dir.join(example);
    std::fs::create_dir_all(&to).expect("copy dir");
    for entry in std::fs::read_dir(&from).expect("example dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let cluster = to.join("cluster.toml");
    if let Ok(patch) = std::fs::read_to_string(crate_dir().join(format!("tests/golden/{example}.patch"))) {
        let mut text = std::fs::read_to_string(&cluster).expect("cluster file");
        for line in patch.lines().filter(|l| !l.trim().is_empty()) {
            let (a, b) = line.split_once(" => ").expect("FROM => TO");
            assert!(text.contains(a), "{example}.patch: {a:?} not in the cluster file");
            text = text.replace(a, b);
        }
        std::fs::write(&cluster, text).expect("write cluster file");
    }
    cluster
}

fn golden(example: &str) {
    let dir = tempdir();
    let store = dir.path().join("store");
    let cluster = example_copy(example, dir.path());
    let cluster = arg(&cluster).to_owned();
    let cmds = std::fs::read_to_string(crate_dir().join(format!("tests/golden/{example}.cmds"))).expect("commands file");
    let mut out = String::new();
    for line in cmds.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        out.push_str(&format!("$ kernel {line}\n"));
        let args: Vec<String> = line.split_whitespace().map(|w| w.replace("$CLUSTER", &cluster).replace("$STORE", arg(&store))).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = kernel(&args);
        out.push_str(&transcript(&o));
        for l in stderr(&o).lines() {
            out.push_str(&format!("stderr: {}\n", l.replace(arg(&store), "$STORE").replace(&cluster, "$CLUSTER")));
        }
        if !o.status.success() {
            out.push_str(&format!("exit: {}\n", o.status.code().unwrap_or(-1)));
        }
    }
    expect_file(&format!("tests/golden/{example}.transcript"), &out);
    let summary = kernel(&["inspect", arg(&store), "--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&summary.stdout).expect("summary JSON");
    let vats: Vec<String> =
        summary["vats"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str().map(str::to_owned)).collect();
    let vats: Vec<&str> = vats.iter().map(String::as_str).collect();
    expect_file(&format!("tests/golden/{example}.inspect.json"), &inspect_all(&store, &vats));
}

#[test]
fn ping_pong() {
    golden("ping-pong");
}

#[test]
fn bank() {
    golden("bank");
}

#[test]
fn pipeline() {
    golden("pipeline");
}

#[test]
fn crash_resume() {
    golden("crash-resume");
}

/// kill -9 in the middle of a counting run, then resume: the totals are exact.
#[test]
fn crash_resume_survives_kill_9() {
    let dir = tempdir();
    let store = dir.path().join("store");
    let cluster = example_copy("crash-resume", dir.path());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kernel"))
        .args(["run", arg(&cluster), "--quiet", "--store", arg(&store)])
        .current_dir(crate_dir())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Let it get going (past the bootstrap), then kill it without warning.
    std::thread::sleep(std::time::Duration::from_millis(200));
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let resumed = kernel(&["run", arg(&cluster), "--quiet", "--store", arg(&store)]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let t = transcript(&resumed);
    assert!(t.contains("run queue empty"), "{t}");
    for (vat, key) in [("counter", "count"), ("driver", "acked")] {
        let o = kernel(&["inspect", arg(&store), "vat", vat, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
        assert_eq!(v["vatstore"][key], "1000", "{vat} {key}: {t}");
    }
}

/// Ctrl-C (SIGINT) stops the run after the crank in progress commits, with exit code 130, and
/// a later run resumes from there. (The full-length example, so it is still running when the
/// signal comes.)
#[test]
fn ctrl_c_stops_after_the_current_crank_and_the_run_resumes() {
    let dir = tempdir();
    let store = dir.path().join("store");
    let cluster = crate_dir().join("examples/crash-resume/cluster.toml");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_kernel"))
        .args(["run", arg(&cluster), "--quiet", "--store", arg(&store)])
        .current_dir(crate_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(400));
    let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill -INT");
    assert!(sent.success());
    let out = child.wait_with_output().expect("wait");
    let t = transcript(&out);
    assert_eq!(out.status.code(), Some(130), "{t}");
    assert!(t.contains("1 queued (interrupted)"), "{t}");
    let count = |vat: &str, key: &str| -> u64 {
        let o = kernel(&["inspect", arg(&store), "vat", vat, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
        v["vatstore"][key].as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
    };
    let (counted, acked) = (count("counter", "count"), count("driver", "acked"));
    assert!(counted == acked || counted == acked + 1, "stopped between cranks: count {counted}, acked {acked}");
    // Resume for five cranks: from a pending add, two more steps acknowledged; from a pending
    // notify, three.
    let steps = if counted == acked { 2 } else { 3 };
    let resumed = kernel(&["run", arg(&cluster), "--quiet", "--store", arg(&store), "--max-cranks", "5"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(transcript(&resumed).starts_with("resuming after crank"), "{}", transcript(&resumed));
    assert_eq!(count("driver", "acked"), acked + steps, "count was {counted}");
    assert_eq!(count("counter", "count"), acked + 3, "count was {counted}");
}
