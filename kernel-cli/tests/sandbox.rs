//! Sandbox escapes: a script reading a file or the clock, looping forever, growing a string or
//! an array without end, recursing without end, or forging a reference. Each ends in a clean
//! termination of that vat, with a reason that says which vat, which method and why; the vat
//! that set them off lives on. The transcript is `tests/sandbox/expected.transcript`.

mod support;

use support::*;

#[test]
fn every_escape_ends_in_a_clean_termination_with_a_clear_reason() {
    let dir = tempdir();
    let store = dir.path().join("store");
    let out = kernel(&["run", "tests/sandbox/cluster.toml", "--store", arg(&store)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let t = transcript(&out);
    expect_file("tests/sandbox/expected.transcript", &t);
    let summary = kernel(&["inspect", arg(&store), "--json"]);
    let summary: serde_json::Value = serde_json::from_slice(&summary.stdout).expect("JSON");
    for (vat, why) in [
        ("files", "no function open"),
        ("clock", "no function timestamp"),
        ("spin", "meter exhausted: spin.attempt: used more than 20000 operations"),
        ("bloat", "bloat.attempt: limit breached: Length of string"),
        ("hoard", "hoard.attempt: limit breached: Size of array"),
        ("deep", "deep.attempt: limit breached: calls nested deeper than 32 levels"),
        ("forger", "no function send (map"),
    ] {
        let v = summary["vats"].as_array().into_iter().flatten().find(|v| v["name"] == vat).expect("vat listed");
        let reason = v["status"]["terminated"].as_str().unwrap_or_else(|| panic!("{vat} must be terminated: {v}"));
        assert!(reason.contains(why), "{vat}: {reason}");
    }
    let prober = summary["vats"].as_array().into_iter().flatten().find(|v| v["name"] == "prober").expect("prober");
    assert_eq!(prober["status"], "live");
}
