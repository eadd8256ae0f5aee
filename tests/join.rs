//! A backup joins a running primary, with real processes: `ftvm primary --accept-joins` serving
//! clients through the front, `ftvm backup --join` taking its state while it serves.
//!
//! - The joined backup follows the primary (equal memory at the end), and when the primary is
//!   SIGKILLed it wins the arbiter and serves on: no acknowledged update lost.
//! - Joiners that must be refused are: the wrong key (no state at all), another pair, another
//!   guest image, another memory size (the reason names both), a second joiner while one is
//!   joining and while the pair is protected.
//! - A corrupted chunk (a relay that flips a byte): the joiner refuses to start, the primary
//!   serves on unprotected, and a later join succeeds.
//! - The joiner SIGKILLed mid-transfer: the primary never stopped its guest for it, and a later
//!   join succeeds; the primary SIGKILLed mid-transfer: the joiner fails clearly and never goes
//!   live.
//!
//! Needs /dev/kvm.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{client, client_ok, Proc};
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
    /// The primary's epoch, from its readiness line.
    epoch: u64,
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
    primary_with(name, &[])
}

/// [`primary`] with extra arguments.
fn primary_with(name: &str, extra: &[String]) -> Pair {
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
        epoch: 0,
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
    args.extend(extra.iter().cloned());
    let (p, ready) = Proc::start(FTVM, &args);
    let ready = ready.unwrap_or_else(|| panic!("primary did not start:\n{}", p.log()));
    pair.join_addr = ready
        .detail
        .rsplit("joins at ")
        .next()
        .expect("join address in the readiness line")
        .trim()
        .to_string();
    pair.epoch = ready
        .detail
        .split("epoch ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("epoch in the readiness line {:?}", ready.detail));
    pair.primary = p;
    pair
}

/// A primary with `mem_mib` MiB of guest memory, most of it written (FILL requests) before
/// anyone joins, so that a state transfer takes long enough to be cut in the middle.
fn filled_primary(name: &str, mem_mib: u64) -> Pair {
    let pair = primary_with(name, &[s("--mem-mib"), s(mem_mib)]);
    let out = Command::new(FTVM)
        .args([
            "client",
            "--service",
            &pair.front.local_addr().to_string(),
            "--requests",
            "48",
            "--fill-percent",
            "100",
            "--fill-pages",
            "1024",
            "--mem-mib",
            &s(mem_mib),
            "--timeout-ms",
            "30000",
            "--retry-ms",
            "1000",
        ])
        .output()
        .expect("fill client");
    assert!(
        out.status.success(),
        "fill client: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    pair
}

impl Pair {
    /// `ftvm backup --join` with extra args; returns the process and whether it said "joined".
    fn joiner(&self, name: &str, extra: &[String]) -> (Proc, bool) {
        self.joiner_at(name, &self.join_addr.clone(), &self.key.clone(), extra)
    }

    fn joiner_at(&self, name: &str, addr: &str, key: &Path, extra: &[String]) -> (Proc, bool) {
        let (p, ready) = Proc::start(FTVM, &self.joiner_args(name, addr, key, extra));
        let joined = ready.is_some_and(|r| r.detail.contains("joined"));
        (p, joined)
    }

    /// Starts a joiner without waiting for it: its readiness (or `None`) arrives on the
    /// receiver.
    fn spawn_joiner(
        &self,
        name: &str,
        extra: &[String],
    ) -> (
        Proc,
        std::sync::mpsc::Receiver<Option<common::ready::Ready>>,
    ) {
        Proc::spawn(
            FTVM,
            &self.joiner_args(name, &self.join_addr, &self.key, extra),
        )
    }

    fn joiner_args(&self, name: &str, addr: &str, key: &Path, extra: &[String]) -> Vec<String> {
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
        args
    }

    /// Waits until the primary says it is copying memory to a joiner (`joiner`, for the
    /// failure message).
    fn wait_until_copying(&mut self, joiner: &Proc) {
        assert!(
            self.primary.wait_for_log("a backup is joining", LONG),
            "{}\n{}",
            self.primary.log(),
            joiner.log()
        );
    }

    fn client(&self, requests: u64, prefix: &str) -> std::process::Child {
        client(self.front.local_addr(), requests, prefix)
    }

    fn json(&self, name: &str) -> serde_json::Value {
        let p = self.dir.path().join(format!("{name}.json"));
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_slice(&bytes).expect("json")
    }
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
    // Another pair (its session id): refused in the handshake, before any state.
    let (mut o, joined) = pair.joiner("o", &[s("--session"), s(7)]);
    assert!(!joined);
    assert_ne!(o.wait(LONG), Some(0));
    assert!(o.log().contains("session"), "another pair:\n{}", o.log());
    // Another guest image: refused, naming the image.
    let (mut g, joined) = pair.joiner("g", &[s("--guest"), s("nondet")]);
    assert!(!joined);
    assert_ne!(g.wait(LONG), Some(0));
    assert!(
        g.log().contains("guest image"),
        "another image:\n{}",
        g.log()
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

/// A relay for one connection: listens on a fresh loopback port (returned), connects the one
/// joiner it accepts to `to`, copies the joiner's bytes to the primary as they are, and hands
/// the primary's direction to `forward(primary, joiner)`.
fn relay(to: String, forward: impl FnOnce(TcpStream, TcpStream) + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("relay");
    let addr = l.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let Ok((joiner, _)) = l.accept() else {
            return;
        };
        let Ok(primary) = TcpStream::connect(&to) else {
            return;
        };
        let (mut j2, mut p2) = (
            joiner.try_clone().expect("clone"),
            primary.try_clone().expect("clone"),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut j2, &mut p2);
        });
        forward(primary, joiner);
    });
    addr
}

/// Forwards one connection `listen` → `to`, flipping one byte of the primary's stream after
/// `after` bytes.
fn corrupting_relay(to: String, after: usize) -> String {
    relay(to, move |mut primary, mut joiner| {
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
    })
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

/// Forwards one connection `listen` → `to` as someone on the path who knows the stream format
/// but not the key: in the primary's first PAGES chunk it changes a page byte and writes the
/// chunk's CRC again, so the chunk is well-formed and its checksum right.
fn rewriting_relay(to: String) -> String {
    use vmm::migrate::stream::{checksum, Kind, CHUNK_HEADER_LEN};
    relay(to, move |mut primary, mut joiner| {
        // Bytes from the primary not yet forwarded: held from the first PAGES chunk's header
        // until the whole chunk is in.
        let mut held: Vec<u8> = Vec::new();
        let mut done = false;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match primary.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if done {
                if joiner.write_all(&buf[..n]).is_err() {
                    break;
                }
                continue;
            }
            held.extend_from_slice(&buf[..n]);
            const PAGES: &[u8] = b"FTJN\x02";
            let Some(at) = held.windows(5).position(|w| w == PAGES) else {
                // Hold back only a tail that may begin the header (it can straddle reads).
                let tail = (1..PAGES.len())
                    .rev()
                    .find(|&k| held.ends_with(&PAGES[..k]))
                    .unwrap_or(0);
                let keep = held.len() - tail;
                if joiner.write_all(&held[..keep]).is_err() {
                    break;
                }
                held.drain(..keep);
                continue;
            };
            let Some(h) = held.get(at..at + CHUNK_HEADER_LEN) else {
                continue;
            };
            let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
            let start = at + CHUNK_HEADER_LEN;
            if held.len() < start + len {
                continue;
            }
            held[start + 16 + 100] ^= 0x01;
            let mut header = [0u8; CHUNK_HEADER_LEN];
            header.copy_from_slice(&held[at..start]);
            let crc = checksum(Kind::Pages, &header, &held[start..start + len]);
            held[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
            done = true;
            if joiner.write_all(&held).is_err() {
                break;
            }
        }
    })
}

/// Someone on the path rewrites a page and its chunk's CRC (the format is public, the CRC no
/// secret): the joiner's tag check refuses the chunk before the state is used, and says so.
#[test]
fn a_rewritten_chunk_with_a_right_checksum_is_refused_as_not_authentic() {
    let mut pair = primary("rewrite");
    let relay = rewriting_relay(pair.join_addr.clone());
    let (mut bad, joined) = pair.joiner_at("bad", &relay, &pair.key.clone(), &[]);
    assert!(!joined, "a rewritten stream must not be loaded");
    assert_ne!(bad.wait(LONG), Some(0));
    let log = bad.log();
    assert!(
        log.contains("not authentic") && log.contains("PAGES"),
        "the tag, not the CRC, refused it:\n{log}"
    );
    assert!(pair.primary.wait_for_log("a join failed", LONG));
    let (good, joined) = pair.joiner("good", &[]);
    assert!(joined, "{}", good.log());
}

/// The joiner dies in the middle of the transfer (stopped while the primary copies memory,
/// then SIGKILLed): the primary drops the transfer without ever stopping its guest, serves on
/// unprotected, and a later joiner gets the pair protected.
#[test]
fn a_joiner_killed_mid_transfer_costs_the_primary_no_pause_and_a_later_join_succeeds() {
    const MIB: u64 = 64;
    let mut pair = filled_primary("killjoiner", MIB);
    let client = pair.client(3_000, "k");
    let mem = [s("--mem-mib"), s(MIB)];
    let (mut victim, ready) = pair.spawn_joiner("victim", &mem);
    pair.wait_until_copying(&victim);
    victim.signal(libc::SIGSTOP);
    // Stopped, it takes no more of the stream: the transfer cannot end.
    assert!(
        !pair.primary.log().contains("protected again"),
        "the transfer ended before the joiner was stopped (make the guest's memory larger):\n{}",
        pair.primary.log()
    );
    victim.signal(libc::SIGKILL);
    assert!(
        pair.primary.wait_for_log("a join failed", LONG),
        "{}",
        pair.primary.log()
    );
    assert_eq!(victim.wait(LONG), Some(-1));
    assert!(
        !matches!(ready.try_recv(), Ok(Some(_))),
        "a killed joiner announced itself"
    );
    assert!(!pair.primary.log().contains("protected again"));
    // A later joiner gets the pair protected.
    let (good, joined) = pair.joiner("good", &mem);
    assert!(joined, "{}\n{}", good.log(), pair.primary.log());
    assert!(pair.primary.wait_for_log("protected again", LONG));
    let c = client_ok(client.wait_with_output().expect("client"));
    println!("client across a killed and a good join: {c}");
    pair.primary.signal(libc::SIGTERM);
    assert_eq!(pair.primary.wait(LONG), Some(0), "{}", pair.primary.log());
    let p = pair.json("primary");
    let joins = p["joins"]
        .as_array()
        .expect("joins in the primary's summary");
    assert_eq!(joins.len(), 2, "{p}");
    assert_eq!(joins[0]["joined"], false, "{p}");
    assert!(joins[0]["error"].is_string(), "{p}");
    // The killed join never stopped the guest.
    assert_eq!(joins[0]["pause_ms"].as_f64(), Some(0.0), "{p}");
    assert!(
        joins[0]["bytes"].as_u64().unwrap_or(0) < MIB << 20,
        "the first join was cut short: {p}"
    );
    assert_eq!(joins[1]["joined"], true, "{p}");
    drop(good);
}

/// A second joiner while one is joining (the first stopped in the middle of its transfer) is
/// refused at once; the first then completes its join.
#[test]
fn a_second_joiner_during_a_join_is_refused_and_the_first_completes() {
    const MIB: u64 = 64;
    let mut pair = filled_primary("second", MIB);
    let mem = [s("--mem-mib"), s(MIB)];
    let (first, ready) = pair.spawn_joiner("first", &mem);
    pair.wait_until_copying(&first);
    first.signal(libc::SIGSTOP);
    let (mut second, joined) = pair.joiner("second", &mem);
    assert!(!joined);
    assert_ne!(second.wait(LONG), Some(0));
    assert!(
        second.log().contains("another backup is joining"),
        "{}",
        second.log()
    );
    first.signal(libc::SIGCONT);
    let r = ready.recv_timeout(LONG).ok().flatten();
    assert!(
        r.is_some_and(|r| r.detail.contains("joined")),
        "the first joiner completes:\n{}\n{}",
        first.log(),
        pair.primary.log()
    );
    assert!(pair.primary.wait_for_log("protected again", LONG));
}

/// The primary dies in the middle of the transfer (stopped while it copies memory, then
/// SIGKILLed): the joiner has no complete state, so it exits with an error naming the join,
/// never announces itself, never takes over and never registers at the front.
#[test]
fn a_joiner_whose_primary_dies_mid_transfer_fails_clearly_and_never_goes_live() {
    const MIB: u64 = 64;
    let mut pair = filled_primary("killprimary", MIB);
    let mem = [s("--mem-mib"), s(MIB)];
    let (mut orphan, ready) = pair.spawn_joiner("orphan", &mem);
    pair.wait_until_copying(&orphan);
    pair.primary.signal(libc::SIGSTOP);
    assert!(
        !pair.primary.log().contains("protected again"),
        "the transfer ended before the primary was stopped:\n{}",
        pair.primary.log()
    );
    pair.primary.signal(libc::SIGKILL);
    assert_eq!(pair.primary.wait(LONG), Some(-1));
    let code = orphan.wait(LONG);
    let log = orphan.log();
    assert!(
        matches!(code, Some(c) if c != 0),
        "the joiner exits with an error: {code:?}\n{log}"
    );
    assert!(
        matches!(ready.recv_timeout(LONG), Ok(None) | Err(_)),
        "a joiner without complete state announced itself:\n{log}"
    );
    assert!(
        log.contains("error: joining the primary") && log.contains("does not start"),
        "{log}"
    );
    assert!(!log.contains("won epoch"), "{log}");
    assert!(
        pair.front.registered_at_or_after(pair.epoch + 1).is_none(),
        "nobody registered at the front after the primary's epoch {}:\n{log}",
        pair.epoch
    );
    println!("the orphaned joiner said:\n{log}");
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
    let client = client(front.local_addr(), 5_000, "key");
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

/// The issue's own acceptance run: `ftvm demo --kill-primary-after 500 --reprotect` ends
/// protected again, both replicas equal, nothing acknowledged lost.
#[test]
fn the_demo_reprotects_after_killing_its_primary() {
    let dir = common::scratch("ftvm-join-demo-");
    let json = dir.path().join("reprotect.json");
    let out = Command::new(FTVM)
        .args([
            "demo",
            "--requests",
            "1500",
            "--kill-primary-after",
            "500",
            "--reprotect",
            "--json",
            &json.display().to_string(),
        ])
        .output()
        .expect("ftvm demo");
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("demo json")).expect("json");
    assert_eq!(v["acknowledged_lost"], 0, "{v}");
    assert_eq!(v["responses_ok"], 1500, "{v}");
    assert_eq!(v["reprotected"], true, "{v}\n{log}");
    assert!(v["join_pause_ms"].as_f64().is_some_and(|p| p > 0.0), "{v}");
    assert!(v["join_total_ms"].as_f64().is_some_and(|t| t > 0.0), "{v}");
    assert!(v["join_bytes"].as_u64().is_some_and(|b| b > 0), "{v}");
    assert!(v["join_rounds"].as_u64().is_some_and(|r| r >= 1), "{v}");
    assert!(v["joined_memory_hash"].is_string(), "{v}");
    assert_eq!(v["joined_memory_hash"], v["survivor_memory_hash"], "{v}");
    assert_eq!(
        v["joined_registers_digest"], v["survivor_registers_digest"],
        "{v}"
    );
}
