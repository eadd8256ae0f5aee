//! Any guest image, with real processes: replicas run a guest from a file (`--guest-image`),
//! the channel's handshake refuses a primary that runs another image or memory size — naming
//! both on both sides, the backup listening on — and then accepts the right one, whose pair
//! serves and ends with equal guests.
//!
//! Needs /dev/kvm.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Proc;

const FTVM: &str = env!("CARGO_BIN_EXE_ftvm");
const LONG: Duration = Duration::from_secs(60);

fn s(v: impl ToString) -> String {
    v.to_string()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p
}

fn primary_args(key: &Path, sock: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = vec![
        s("primary"),
        s("--key-file"),
        key.display().to_string(),
        s("--backup"),
        sock.display().to_string(),
        s("--service"),
        s("127.0.0.1:0"),
        s("--core"),
        s(0),
    ];
    a.extend(extra.iter().map(s));
    a
}

/// A primary the backup must refuse: it exits non-zero before serving, and both logs give
/// the reason, each from its own side (`primary_says`, `backup_says`).
fn refused(
    key: &Path,
    sock: &Path,
    extra: &[&str],
    backup: &mut Proc,
    primary_says: &str,
    backup_says: &str,
) {
    let (mut p, ready) = Proc::start(FTVM, &primary_args(key, sock, extra));
    assert!(ready.is_none(), "{extra:?} must not serve: {ready:?}");
    let code = p.wait(LONG);
    assert!(
        matches!(code, Some(c) if c != 0),
        "{extra:?}: exit {code:?}\n{}",
        p.log()
    );
    let log = p.log();
    assert!(
        log.contains("the peer runs another guest") && log.contains(primary_says),
        "{extra:?}, primary:\n{log}"
    );
    assert!(
        backup.wait_for_log(backup_says, LONG),
        "{extra:?}, backup:\n{}",
        backup.log()
    );
}

#[test]
fn the_handshake_refuses_another_guest_and_a_pair_on_an_image_file_stays_in_step() {
    let dir = common::scratch("ftvm-guest-image-");
    let key = common::write_key(dir.path(), "psk", "guest-image-test-key-0123456789");
    let kv = write(dir.path(), "kvstore.elf", vmm::vm::GUEST_IMAGE);
    let kv_digest = hex(&vmm::migrate::image_digest(vmm::vm::GUEST_IMAGE));
    let nondet_digest = hex(&vmm::migrate::image_digest(vmm::vm::GUEST_NONDET_IMAGE));
    assert_ne!(kv_digest, nondet_digest);
    let sock = dir.path().join("backup.sock");
    let backup_json = dir.path().join("backup.json");
    let primary_json = dir.path().join("primary.json");
    let (mut backup, ready) = Proc::start(
        FTVM,
        &[
            s("backup"),
            s("--key-file"),
            key.display().to_string(),
            s("--listen"),
            sock.display().to_string(),
            s("--guest-image"),
            kv.display().to_string(),
            s("--core"),
            s(1),
            s("--json"),
            backup_json.display().to_string(),
        ],
    );
    assert!(ready.is_some(), "backup did not start:\n{}", backup.log());

    // The built-in nondet guest against the backup's kvstore file: both digests, both sides.
    refused(
        &key,
        &sock,
        &["--guest", "nondet", "--skip-guest-check"],
        &mut backup,
        &format!("guest image sha256 {nondet_digest} here, {kv_digest} at the peer"),
        &format!("guest image sha256 {kv_digest} here, {nondet_digest} at the peer"),
    );
    // The same image with another memory size: both sizes, both sides.
    let kv_arg = kv.display().to_string();
    refused(
        &key,
        &sock,
        &["--guest-image", &kv_arg, "--mem-mib", "32"],
        &mut backup,
        "guest memory size 33554432 bytes here, 16777216 at the peer",
        "guest memory size 16777216 bytes here, 33554432 at the peer",
    );

    // The built-in kvstore is the same bytes as the backup's file: the same guest.
    let primary_extra = [
        "--guest",
        "kvstore",
        "--json",
        primary_json.to_str().expect("utf-8 path"),
    ];
    let (primary, ready) = Proc::start(FTVM, &primary_args(&key, &sock, &primary_extra));
    let ready = ready.unwrap_or_else(|| panic!("primary did not start:\n{}", primary.log()));
    let out = std::process::Command::new(FTVM)
        .args([
            "client",
            "--service",
            &ready.addr.to_string(),
            "--requests",
            "200",
            "--verify",
        ])
        .output()
        .expect("client");
    assert!(
        out.status.success(),
        "client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut primary = primary;
    primary.signal(libc::SIGTERM);
    assert_eq!(primary.wait(LONG), Some(0), "{}", primary.log());
    assert_eq!(backup.wait(LONG), Some(0), "{}", backup.log());
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).expect("summary")).expect("summary JSON")
    };
    let (p, b) = (read(&primary_json), read(&backup_json));
    assert!(p["requests"].as_u64() >= Some(200), "{p}");
    assert_eq!(b["divergence"], serde_json::Value::Null, "{b}");
    assert_eq!(p["memory_hash"], b["memory_hash"], "{p}\n{b}");
    assert_eq!(p["registers_digest"], b["registers_digest"], "{p}\n{b}");
}
