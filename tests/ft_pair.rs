//! The FT pair end to end, with real KVM guests in real processes: `ftvm demo` starts a backup
//! and a primary over shared memory, drives client requests, stops both at a logged exit and
//! compares them. Needs /dev/kvm (our CI machines have it); without it these tests fail with
//! the VMM's "cannot open /dev/kvm" message.

use std::process::Command;
use std::sync::Mutex;

/// One demo at a time: each pins a primary and a backup that spin on the machine's two cores,
/// and three at once would starve each other into heartbeat timeouts.
static ONE_PAIR_AT_A_TIME: Mutex<()> = Mutex::new(());

fn demo(args: &[&str]) -> (bool, serde_json::Value, String) {
    let _turn = ONE_PAIR_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let dir = tempfile::Builder::new()
        .prefix("ftvm-ft-pair-")
        .tempdir()
        .expect("temp dir");
    let json = dir.path().join("demo.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .arg("demo")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run ftvm demo");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = std::fs::read(&json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    (out.status.success(), summary, log)
}

/// The demo with `args` ends in step after `requests` requests, each of which cost the guest at
/// least `min_exits` exits.
fn assert_in_step(args: &[&str], requests: u64, min_exits: u64) {
    let (ok, s, log) = demo(args);
    assert!(ok, "demo failed:\n{log}");
    assert_eq!(s["requests"], requests, "{log}");
    assert_eq!(
        s["responses_ok"], requests,
        "every response verified by the client\n{log}"
    );
    assert_eq!(s["divergences"], 0, "{log}");
    // One output per request, plus one per retry (answered from the guest's reply cache).
    let retries = s["retries"].as_u64().unwrap_or(u64::MAX);
    assert_eq!(s["outputs_committed"], requests + retries, "{log}");
    assert_eq!(
        s["outputs_checked"], s["outputs_committed"],
        "every output digest matched on the backup\n{log}"
    );
    assert_eq!(s["primary_memory_hash"], s["backup_memory_hash"], "{log}");
    assert_eq!(
        s["primary_registers_digest"], s["backup_registers_digest"],
        "{log}"
    );
    assert!(
        s["vm_exits"].as_u64().unwrap_or(0) >= min_exits * requests,
        "{log}"
    );
}

#[test]
fn ten_thousand_requests_leave_primary_and_backup_identical() {
    assert_in_step(&["--requests", "10000", "--no-baseline"], 10_000, 4);
}

#[test]
fn another_seed_and_request_mix_also_stays_in_step() {
    assert_in_step(
        &[
            "--requests",
            "3000",
            "--seed",
            "77",
            "--get-percent",
            "80",
            "--keys",
            "7",
            "--no-baseline",
        ],
        3_000,
        4,
    );
}

/// The second example guest: the ledger, with its own workload (every answer checked against
/// the ledger model: balances, refusals, audits, transaction ids). Its reads cost 2 exits.
#[test]
fn a_ledger_pair_stays_in_step() {
    assert_in_step(
        &["--guest", "ledger", "--requests", "10000", "--no-baseline"],
        10_000,
        2,
    );
}

#[test]
fn a_non_deterministic_guest_is_caught_at_its_first_output() {
    let (ok, s, log) = demo(&["--requests", "3", "--no-baseline", "--guest", "nondet"]);
    assert!(!ok, "a diverging pair must fail the demo\n{log}");
    assert_eq!(s["divergences"], 1, "{log}");
    let first_output = s["first_output_exit"]
        .as_u64()
        .expect("primary produced an output");
    assert_eq!(
        s["divergence_exit"].as_u64(),
        Some(first_output),
        "divergence reported at the exit of the first output\n{log}"
    );
}

#[test]
fn an_encrypted_log_keeps_the_pair_in_step() {
    assert_in_step(
        &[
            "--requests",
            "2000",
            "--no-baseline",
            "--channel-crypto",
            "encrypt",
        ],
        2_000,
        4,
    );
}
