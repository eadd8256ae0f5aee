//! A backup joins a running primary, with real processes: `ftvm primary --accept-joins` serving
//! clients through the front, `ftvm backup --join` taking its state while it serves.
//!
//! - The joined backup follows the primary (equal memory at the end), and when the primary is
//!   SIGKILLed it wins the arbiter and serves on: no acknowledged update lost.
//! - Joiners that must be refused are: the wrong key (no state at all), another memory size
//!   (the reason names both), a second joiner while the pair is protected.
//! - A corrupted chunk (a relay that flips a byte): the joiner refuses to start, the primary
//!   serves on unprotected, and a later join succeeds.
//!
//! Needs /dev/kvm.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::Proc;
use vmm::service::Front;

const FTVM: &str = env!("CARGO_BIN_EXE_ftvm");
const LONG: Duration = Duration::from_secs(60);

fn s(v: impl ToString) -> String {
    v.to_string()
}

struct Pair {
    dir: tempfile::TempDir,
    key: PathBuf,
    arbiter: String,
    front: Front,
    primary: Proc,
    join_addr: String,
    primary_json: PathBuf,
}

fn common_args(p: &Pair, role: &str, key: &Path) -> Vec<String> {
    vec![
        s(role),
        s("--key-file"),
        key.display().to_string(),
        s("--arbiter"),
        p.arbiter.clone(),
        s("--front"),
        p.front.local_addr().to_string(),
        s("--heartbeat-timeout-ms"),
        s(300),
        s("--name"),
        format!("{role}-{}", rand::random::<u32>()),
    ]
}

/// A primary serving alone through the front, accepting joins on loopback.
fn primary(name: &str) -> Pair {
    let common::Site {
        dir,
        key,
        arbiter,
        front,
    } = common::Site::new(&format!("ftvm-join-{name}-"));
    let primary_json = dir.path().join("primary.json");
    let mut pair = Pair {
        arbiter: arbiter.to_string(),
        key,
        front,
        primary_json,
        join_addr: String::new(),
        // Replaced below.
        primary: Proc::start("true", &[]).0,
        dir,
    };
    let mut args = common_args(&pair, "primary", &pair.key.clone());
    args.extend([
        s("--accept-joins"),
        s("127.0.0.1:0"),
        s("--service"),
        s("127.0.0.1:0"),
        s("--core"),
        s(0),
        s("--json"),
        pair.primary_json.display().to_string(),
    ]);
    let (p, ready) = Proc::start(FTVM, &args);
    let ready = ready.unwrap_or_else(|| panic!("primary did not start:\n{}", p.log()));
    pair.join_addr = ready
        .detail
        .rsplit("joins at ")
        .next()
        .expect("join address in the readiness line")
        .trim()
        .to_string();
    pair.primary = p;
    pair
}

impl Pair {
    /// `ftvm backup --join` with extra args; returns the process and whether it said "joined".
    fn joiner(&self, name: &str, extra: &[String]) -> (Proc, bool) {
        self.joiner_at(name, &self.join_addr.clone(), &self.key.clone(), extra)
    }

    fn joiner_at(&self, name: &str, addr: &str, key: &Path, extra: &[String]) -> (Proc, bool) {
        let mut args = common_args(self, "backup", key);
        args.extend([
            s("--join"),
            s(addr),
            s("--listen"),
            self.dir
                .path()
                .join(format!("{name}.sock"))
                .display()
                .to_string(),
            s("--core"),
            s(1),
            s("--json"),
            self.dir
                .path()
                .join(format!("{name}.json"))
                .display()
                .to_string(),
        ]);
        args.extend(extra.iter().cloned());
        let (p, ready) = Proc::start(FTVM, &args);
        let joined = ready.is_some_and(|r| r.detail.contains("joined"));
        (p, joined)
    }

    fn client(&self, requests: u64, prefix: &str) -> std::process::Child {
        client(&self.front, requests, prefix)
    }

    fn json(&self, name: &str) -> serde_json::Value {
        let p = self.dir.path().join(format!("{name}.json"));
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_slice(&bytes).expect("json")
    }
}

/// A pipelined client with read-back through `front`, on keys `PREFIX-N`.
fn client(front: &Front, requests: u64, prefix: &str) -> std::process::Child {
    Command::new(FTVM)
        .args([
            "client",
            "--service",
            &front.local_addr().to_string(),
            "--requests",
            &s(requests),
            "--keys",
            "40",
            "--key-prefix",
            prefix,
            "--window",
            "4",
            "--verify",
            "--timeout-ms",
            "30000",
            "--retry-ms",
            "1000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("client")
}

fn client_ok(out: Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = text.find('{').expect("client JSON");
    let v: serde_json::Value = serde_json::from_str(&text[json_start..]).expect("client JSON");
    assert_eq!(v["acknowledged_lost"], 0, "{v}");
    assert_eq!(v["responses_bad"], 0, "{v}");
    v
}

#[test]
fn a_joined_backup_follows_and_takes_over_after_sigkill_of_the_primary() {
    let mut pair = primary("takeover");
    let client = pair.client(4_000, "a");
    let journal = pair.dir.path().join("b1.journal");
    let (mut backup, joined) = pair.joiner("b1", &[s("--journal"), journal.display().to_string()]);
    assert!(
        joined,
        "the backup joined:\n{}\n{}",
        backup.log(),
        pair.primary.log()
    );
    assert!(
        pair.primary.wait_for_log("protected again", LONG),
        "{}",
        pair.primary.log()
    );
    // Let the pair run protected for a while under the load, then kill the primary.
    assert!(backup.wait_for_log("peer connected", LONG));
    std::thread::sleep(Duration::from_millis(300));
    pair.primary.signal(libc::SIGKILL);
    assert!(
        backup.wait_for_log("won epoch", LONG),
        "the joined backup took over:\n{}",
        backup.log()
    );
    let c = client_ok(client.wait_with_output().expect("client"));
    println!("client across join and takeover: {c}");
    backup.signal(libc::SIGTERM);
    assert_eq!(backup.wait(LONG), Some(0), "{}", backup.log());
    let b = pair.json("b1");
    assert_eq!(b["takeover"]["arbitration"]["won"], true, "{b}");
    assert!(
        b["joined"]["exit"].as_u64().expect("joined exit") > 0,
        "{b}"
    );
    assert_eq!(b["divergence"], serde_json::Value::Null, "{b}");
    // Its journal starts from the state it joined with and replays to the same guest.
    let replay_json = pair.dir.path().join("replay.json");
    let out = Command::new(FTVM)
        .args([
            "replay",
            "--journal",
            &journal.display().to_string(),
            "--json",
            &replay_json.display().to_string(),
        ])
        .output()
        .expect("ftvm replay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&replay_json).expect("replay.json")).expect("json");
    assert_eq!(r["memory_hash"], b["memory_hash"], "replay {r}\nbackup {b}");
    assert_eq!(r["divergence"], serde_json::Value::Null, "{r}");
}

#[test]
fn joiners_that_must_be_refused_are_and_the_primary_serves_on() {
    let mut pair = primary("refuse");
    let client = pair.client(1_500, "r");
    // The wrong key: authentication fails before any state is sent.
    let wrong = common::write_key(
        pair.dir.path(),
        "wrong",
        "some-other-key-entirely-0123456789",
    );
    let (mut w, joined) = pair.joiner_at("w", &pair.join_addr.clone(), &wrong, &[]);
    assert!(!joined);
    assert_ne!(w.wait(LONG), Some(0));
    assert!(
        w.log().contains("authenticat") || w.log().contains("MAC"),
        "wrong key:\n{}",
        w.log()
    );
    // Another memory size: refused, naming both.
    let (mut m, joined) = pair.joiner("m", &[s("--mem-mib"), s(32)]);
    assert!(!joined);
    assert_ne!(m.wait(LONG), Some(0));
    let log = m.log();
    assert!(
        log.contains(&(16u64 << 20).to_string()) && log.contains(&(32u64 << 20).to_string()),
        "memory size refusal names both:\n{log}"
    );
    // A good joiner, then a second one while the pair is protected.
    let (b, joined) = pair.joiner("b", &[]);
    assert!(joined, "{}", b.log());
    assert!(pair.primary.wait_for_log("protected again", LONG));
    let (mut second, joined) = pair.joiner("second", &[]);
    assert!(!joined);
    assert_ne!(second.wait(LONG), Some(0));
    assert!(second.log().contains("protected"), "{}", second.log());
    client_ok(client.wait_with_output().expect("client"));
    drop(b);
}

/// Forwards one connection `listen` → `to`, flipping one byte of the primary's stream after
/// `after` bytes.
fn corrupting_relay(to: String, after: usize) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("relay");
    let addr = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let Ok((mut joiner, _)) = l.accept() else {
            return;
        };
        let Ok(mut primary) = TcpStream::connect(&to) else {
            return;
        };
        let (mut j2, mut p2) = (
            joiner.try_clone().expect("clone"),
            primary.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut j2, &mut p2);
        });
        let mut seen = 0usize;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match primary.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if seen <= after && after < seen + n {
                buf[after - seen] ^= 0x40;
            }
            seen += n;
            if joiner.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    addr
}

#[test]
fn a_corrupted_state_stream_is_refused_and_a_later_join_succeeds() {
    let mut pair = primary("corrupt");
    let client = pair.client(1_500, "x");
    // Well past the handshake, inside the pages.
    let relay = corrupting_relay(pair.join_addr.clone(), 100_000);
    let (mut bad, joined) = pair.joiner_at("bad", &relay, &pair.key.clone(), &[]);
    assert!(!joined, "a corrupted stream must not be loaded");
    assert_ne!(bad.wait(LONG), Some(0));
    assert!(bad.log().contains("corrupt"), "{}", bad.log());
    assert!(pair.primary.wait_for_log("a join failed", LONG));
    let (good, joined) = pair.joiner("good", &[]);
    assert!(joined, "{}", good.log());
    assert!(pair.primary.wait_for_log("protected again", LONG));
    client_ok(client.wait_with_output().expect("client"));
}

/// Re-protection after a failure: a pair (primary, backup accepting joins once live) loses its
/// primary; the survivor takes over and a new backup joins it; then the survivor is killed
/// too and the joined backup takes over. The client runs through all of it and loses nothing.
#[test]
fn the_survivor_of_a_takeover_is_joined_and_a_second_failure_is_survived() {
    let common::Site {
        dir,
        key,
        arbiter: spec,
        front,
    } = common::Site::new("ftvm-join-survivor-");
    let base = |role: &str| {
        vec![
            s(role),
            s("--key-file"),
            key.display().to_string(),
            s("--arbiter"),
            spec.to_string(),
            s("--front"),
            front.local_addr().to_string(),
            s("--heartbeat-timeout-ms"),
            s(300),
            s("--name"),
            format!("{role}-{}", rand::random::<u32>()),
        ]
    };
    let join_sock = dir.path().join("b1-joins.sock");
    let mut b1_args = base("backup");
    b1_args.extend([
        s("--listen"),
        dir.path().join("b1.sock").display().to_string(),
        s("--accept-joins"),
        join_sock.display().to_string(),
        s("--json"),
        dir.path().join("b1.json").display().to_string(),
    ]);
    let (mut b1, ready) = Proc::start(FTVM, &b1_args);
    let b1_addr = ready.expect("backup ready").addr;
    let mut p_args = base("primary");
    p_args.extend([s("--backup"), b1_addr, s("--service"), s("127.0.0.1:0")]);
    let (p, ready) = Proc::start(FTVM, &p_args);
    assert!(ready.is_some(), "{}", p.log());
    let client = client(&front, 5_000, "key");
    // A backup cannot be joined before it serves.
    let mut early_args = base("backup");
    early_args.extend([
        s("--join"),
        join_sock.display().to_string(),
        s("--listen"),
        dir.path().join("early.sock").display().to_string(),
    ]);
    let (mut early, ready) = Proc::start(FTVM, &early_args);
    assert!(ready.is_none());
    assert_ne!(early.wait(LONG), Some(0));
    assert!(early.log().contains("not serving"), "{}", early.log());

    std::thread::sleep(Duration::from_millis(300));
    p.signal(libc::SIGKILL);
    assert!(b1.wait_for_log("won epoch", LONG), "{}", b1.log());
    // A new backup joins the survivor.
    let mut b2_args = base("backup");
    b2_args.extend([
        s("--join"),
        join_sock.display().to_string(),
        s("--listen"),
        dir.path().join("b2.sock").display().to_string(),
        s("--json"),
        dir.path().join("b2.json").display().to_string(),
    ]);
    let (mut b2, ready) = Proc::start(FTVM, &b2_args);
    assert!(
        ready.is_some_and(|r| r.detail.contains("joined")),
        "{}\n{}",
        b2.log(),
        b1.log()
    );
    assert!(b1.wait_for_log("protected again", LONG), "{}", b1.log());
    std::thread::sleep(Duration::from_millis(300));
    b1.signal(libc::SIGKILL);
    assert!(b2.wait_for_log("won epoch", LONG), "{}", b2.log());
    let c = client_ok(client.wait_with_output().expect("client"));
    println!("client across two failures and a re-protection: {c}");
    b2.signal(libc::SIGTERM);
    assert_eq!(b2.wait(LONG), Some(0), "{}", b2.log());
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("b2.json")).expect("b2.json"))
            .expect("json");
    assert_eq!(j["takeover"]["arbitration"]["won"], true, "{j}");
    assert!(
        j["takeover"]["arbitration"]["epoch"].as_u64() >= Some(3),
        "{j}"
    );
}
