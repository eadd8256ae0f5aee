//! `ftvm primary` / `ftvm backup --transport dpdk --eal "..."` end to end, with real KVM
//! guests in real processes joined by `net_memif` (no root, no hugepages): a client sends a few
//! hundred requests and verifies every response; the primary is stopped with SIGTERM, the
//! backup replays to the same stop point; both must agree on the memory hash, every output must
//! be committed by the primary and checked by the backup. Needs /dev/kvm and
//! `--features dpdk`.
#![cfg(feature = "dpdk")]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const REQUESTS: u64 = 300;

/// Kills the child if the test fails half-way.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_ftvm")
}

/// Starts `ftvm <role> ...` and returns it with the address of its readiness line (the
/// backup's listening address, the primary's service address); EAL's lines may come first.
fn start(args: &[String], role: &str) -> (Node, String) {
    let mut child = Command::new(exe())
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    let stdout = child.stdout.take().expect("stdout");
    let mut node = Node(child);
    let mut reader = BufReader::new(stdout);
    let ready = match common::ready::find(&mut reader) {
        Ok(Some(r)) if r.role == role => r,
        other => {
            let status = node.0.wait();
            panic!("{args:?} was not ready as the {role} ({other:?}): {status:?}");
        }
    };
    // Keep draining stdout so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in reader.lines() {});
    (node, ready.addr)
}

fn eal(lcore: u32, prefix: &str, role: dpdk_sys::MemifRole, socket: &Path) -> String {
    dpdk_sys::EalArgs::memif(role, socket, prefix, lcore).to_string()
}

fn json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).expect("summary JSON")
}

#[test]
fn a_pair_over_dpdk_memif_serves_requests_and_stays_in_step() {
    let scratch = common::scratch("ftvm-ft-dpdk-");
    let dir = scratch.path();
    let key = common::write_key(dir, "key", "ftvm-dpdk-pair-test-key-32-bytes");
    let socket = dir.join("memif.sock");
    let id = std::process::id();
    let common = |role: &str, core: u32, summary: &Path, eal_args: String| -> Vec<String> {
        vec![
            role.into(),
            "--transport".into(),
            "dpdk".into(),
            "--key-file".into(),
            key.display().to_string(),
            "--core".into(),
            core.to_string(),
            "--json".into(),
            summary.display().to_string(),
            "--eal".into(),
            eal_args,
        ]
    };
    let (bjson, pjson) = (dir.join("backup.json"), dir.join("primary.json"));
    let mut bargs = common(
        "backup",
        1,
        &bjson,
        eal(
            1,
            &format!("ftvm-tb{id}"),
            dpdk_sys::MemifRole::Server,
            &socket,
        ),
    );
    bargs.extend(["--listen".into(), "127.0.0.1:0".into()]);
    let (mut backup, listen) = start(&bargs, "backup");
    let mut pargs = common(
        "primary",
        0,
        &pjson,
        eal(
            0,
            &format!("ftvm-tp{id}"),
            dpdk_sys::MemifRole::Client,
            &socket,
        ),
    );
    pargs.extend([
        "--backup".into(),
        listen,
        "--service".into(),
        "127.0.0.1:0".into(),
    ]);
    let (mut primary, service) = start(&pargs, "primary");

    let client = Command::new(exe())
        .args([
            "client",
            "--service",
            &service,
            "--requests",
            &REQUESTS.to_string(),
        ])
        .output()
        .expect("run ftvm client");
    assert!(
        client.status.success(),
        "client: {}\n{}",
        String::from_utf8_lossy(&client.stdout),
        String::from_utf8_lossy(&client.stderr)
    );

    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(primary.0.id() as i32, libc::SIGTERM) };
    let pstatus = primary.0.wait().expect("wait primary");
    let bstatus = wait_timeout(&mut backup.0, Duration::from_secs(30));
    assert!(pstatus.success(), "primary: {pstatus}");
    assert!(
        bstatus,
        "backup did not stop cleanly at the primary's stop point"
    );

    let (p, b) = (json(&pjson), json(&bjson));
    assert_eq!(p["outputs_committed"], REQUESTS, "{p}");
    assert_eq!(b["outputs_checked"], REQUESTS, "{b}");
    assert_eq!(p["exits"], b["exits"], "{p}\n{b}");
    assert_eq!(p["memory_hash"], b["memory_hash"], "{p}\n{b}");
    assert_eq!(p["registers_digest"], b["registers_digest"], "{p}\n{b}");
    eprintln!(
        "dpdk pair: {} requests, commit p50 {} us, p99 {} us",
        REQUESTS, p["commit_p50_us"], p["commit_p99_us"]
    );
    drop(scratch);
    // EAL leaves its runtime directories behind (as root under /var/run/dpdk).
    for prefix in [format!("ftvm-tb{id}"), format!("ftvm-tp{id}")] {
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&prefix));
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join("dpdk").join(&prefix));
    }
}

/// Waits up to `limit` for the child; true if it exited successfully.
fn wait_timeout(child: &mut Child, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => return false,
        }
    }
    false
}
