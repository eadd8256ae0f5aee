//! Failover end to end, with real KVM guests in real processes and real arbiters (a shared
//! directory, the `ftvm arbiter serve` process, a real etcd):
//!
//! - the primary SIGKILLed at random points under client load, 50 times per backend: every
//!   response fits one sequential history (the client checks each against its model), no
//!   acknowledged update is lost (read back at the end), the backup goes live, and its guest
//!   equals a fresh replay of its journal;
//! - the channel cut with both replicas alive (a relay that swallows bytes on loopback, and a
//!   veth pair between network namespaces set down): exactly one goes live, the other halts;
//! - the arbiter down: nobody goes live; back: exactly one does;
//! - a deposed primary that wakes up cannot reach a client.
//!
//! Needs /dev/kvm and Debian's `etcd-server` (scripts/install-deps.sh installs it).

#[path = "../ft-arbiter/tests/common/mod.rs"]
mod arbiters;
mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use transport::PreSharedKey;
use vmm::service::Front;

/// One FT pair at a time: each pins two spinning VMMs to the machine's two cores.
static ONE_PAIR_AT_A_TIME: Mutex<()> = Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_PAIR_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

const FTVM: &str = env!("CARGO_BIN_EXE_ftvm");
/// Kills per arbiter backend.
const KILLS: usize = 50;

/// A private temporary directory for one test, removed on drop.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new(name: &str) -> Self {
        Scratch(common::scratch(&format!("ftvm-failover-{name}-")))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Where [`Scratch::file_arbiter`] keeps its store.
    fn store(&self) -> PathBuf {
        self.path().join("store")
    }

    /// A fresh file-arbiter store in the scratch directory, as an `--arbiter` spec.
    fn file_arbiter(&self) -> String {
        let spec = ft_arbiter::ArbiterSpec::File(self.store());
        spec.init().expect("store"); // what `ftvm arbiter init` does
        spec.to_string()
    }

    fn key(&self) -> PathBuf {
        let k = self.path().join("psk");
        if k.exists() {
            return k;
        }
        common::write_key(
            self.path(),
            "psk",
            &format!("failover-test-key-{:032x}", rand::random::<u128>()),
        )
    }
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    name: String,
    /// Its readiness line.
    ready: common::ready::Ready,
}

impl Proc {
    /// Starts `ftvm args…` and waits for its readiness line on stdout.
    fn start(name: &str, args: &[String]) -> Proc {
        Proc::start_in(None, name, args)
    }

    /// As [`Proc::start`], inside network namespace `netns` if given.
    fn start_in(netns: Option<&str>, name: &str, args: &[String]) -> Proc {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, FTVM]);
                c
            }
            None => Command::new(FTVM),
        };
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        let ready = common::ready::find(&mut reader).expect("reading stdout");
        // Keep draining so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        let ready = ready.unwrap_or_else(|| panic!("{name} exited before it was ready"));
        Proc {
            child,
            name: name.into(),
            ready,
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child process, which has not been reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// The exit code, if the process has exited within `within`.
    fn exited_within(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then the exit code.
    fn stop(mut self) -> i32 {
        self.signal(libc::SIGTERM);
        let code = self.exited_within(Duration::from_secs(20));
        code.unwrap_or_else(|| panic!("{} did not stop on SIGTERM", self.name))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

// ------------------------------------------------------------------ SIGKILL at random points

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs `ftvm demo ARGS --json JSON` (one pair at a time) with `--kill-primary-after`, and
/// checks that the backup took over with nothing lost: all `requests` answered correctly, at least
/// `min_read_back` keys read back with every acknowledged update there, the survivor equal to its
/// journal's replay. Returns the summary and the demo's output.
fn failed_over_demo(
    args: &[&str],
    json: &Path,
    label: &str,
    requests: u64,
    min_read_back: u64,
) -> (serde_json::Value, String) {
    let _turn = turn();
    let out = Command::new(FTVM)
        .arg("demo")
        .args(args)
        .arg("--json")
        .arg(json)
        .output()
        .expect("run ftvm demo");
    drop(_turn);
    let log = format!(
        "{label}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = std::fs::read(json)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    assert!(out.status.success(), "{log}");
    assert_eq!(v["responses_ok"], requests, "every response checked\n{log}");
    assert_eq!(v["acknowledged_lost"], 0, "{log}");
    assert!(
        v["keys_verified"].as_u64().unwrap_or(0) >= min_read_back,
        "{log}"
    );
    assert!(
        v["winner"]
            .as_str()
            .is_some_and(|w| w.starts_with("backup-")),
        "the backup took over\n{log}"
    );
    assert_eq!(v["journal_replay_matches"], true, "{log}");
    (v, log)
}

/// Kills the primary of a pair running `guest` `kills` times at random points with `arbiter`
/// deciding, checking each run.
fn random_kills(backend: &str, arbiter: &str, key: &Path, guest: &str, kills: usize) {
    let seed = rand::random::<u64>();
    println!("{backend}: seed {seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut failover_ms = Vec::new();
    let scratch = Scratch::new(backend);
    for i in 0..kills {
        let kill_after = rng.gen_range(1..=120u64);
        let requests = kill_after + 30;
        let json = scratch.path().join(format!("kill-{i}.json"));
        let args = [
            "--guest",
            guest,
            "--requests",
            &s(requests),
            "--seed",
            &s(rng.gen::<u32>()),
            "--keys",
            "20",
            "--kill-primary-after",
            &s(kill_after),
            "--kill-jitter-us",
            "3000",
            "--arbiter",
            arbiter,
            "--key-file",
            &key.display().to_string(),
        ];
        let label = format!("{backend} kill {i} (after {kill_after} of {requests})");
        let (v, log) = failed_over_demo(&args, &json, &label, requests, 1);
        // Live well within the heartbeat timeout: a killed process closes its channel.
        let live = v["live_ms"].as_f64().expect("live_ms");
        assert!(live < 1000.0, "backup live {live} ms after the kill\n{log}");
        failover_ms.push(v["failover_ms"].as_f64().expect("failover_ms"));
    }
    failover_ms.sort_by(f64::total_cmp);
    let line = format!(
        "{backend}: failover over {} kills: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        failover_ms.len(),
        percentile(&failover_ms, 0.5),
        percentile(&failover_ms, 0.99),
        failover_ms.last().copied().unwrap_or(f64::NAN)
    );
    println!("{line}");
    // Keep the numbers for the README/closing notes (best effort).
    let report = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("failover-{backend}.txt"));
    let _ = std::fs::write(report, format!("{line}\n{failover_ms:?}\n"));
}

#[test]
fn sigkill_the_primary_at_random_points_file_arbiter() {
    let store = Scratch::new("file-store");
    let key = store.key();
    ft_arbiter::FileArbiter::create_store(store.path()).expect("store");
    // One store for all kills: each demo is the same pair id, so every run starts in the epoch
    // the previous takeover won and wins the next one (the "later rounds" of the arbiter).
    random_kills(
        "file",
        &format!("file:{}", store.path().display()),
        &key,
        "kvstore",
        KILLS,
    );
}

#[test]
fn sigkill_the_primary_at_random_points_server_arbiter() {
    let scratch = Scratch::new("server");
    let key = scratch.key();
    let server = start_arbiter_server(&scratch, &key, "127.0.0.1:0");
    let addr = server.ready.addr.clone();
    random_kills("server", &format!("server:{addr}"), &key, "kvstore", KILLS);
}

#[cfg(feature = "etcd")]
#[test]
fn sigkill_the_primary_at_random_points_etcd_arbiter() {
    let scratch = Scratch::new("etcd");
    let key = scratch.key();
    let bin = arbiters::etcd_binary().unwrap_or_else(|e| panic!("{e}"));
    let etcd = arbiters::EtcdProcess::start(&bin).unwrap_or_else(|e| panic!("{e}"));
    random_kills(
        "etcd",
        &format!("etcd:{}", etcd.url()),
        &key,
        "kvstore",
        KILLS,
    );
}

/// The ledger guest behind the pair, its primary SIGKILLed at random points (file arbiter):
/// every answer fits the ledger model, and the read-back (every account's balance and last
/// transaction, then an audit) finds every acknowledged transaction applied exactly once.
#[test]
fn sigkill_the_primary_of_a_ledger_at_random_points() {
    let store = Scratch::new("ledger-store");
    let key = store.key();
    ft_arbiter::FileArbiter::create_store(store.path()).expect("store");
    let arbiter = format!("file:{}", store.path().display());
    random_kills("ledger", &arbiter, &key, "ledger", 10);
}

/// `ftvm demo --guest ledger --kill-primary-after 500`, as documented: 10,000 requests, the
/// primary SIGKILLed after 500, nothing acknowledged lost.
#[test]
fn the_ledger_demo_loses_nothing_when_the_primary_is_killed() {
    let scratch = Scratch::new("ledger-demo");
    let json = scratch.path().join("demo.json");
    // The 100 accounts used and the final audit are read back.
    failed_over_demo(
        &["--guest", "ledger", "--kill-primary-after", "500"],
        &json,
        "ftvm demo --guest ledger --kill-primary-after 500",
        10_000,
        101,
    );
}

fn start_arbiter_server(scratch: &Scratch, key: &Path, listen: &str) -> Proc {
    Proc::start(
        "arbiter server",
        &[
            s("arbiter"),
            s("serve"),
            s("--listen"),
            s(listen),
            s("--state-dir"),
            scratch.path().join("arbiter-state").display().to_string(),
            s("--key-file"),
            key.display().to_string(),
        ],
    )
}

// ------------------------------------------------------------------ pairs run by hand

/// A TCP cable between the primary and the backup that the test can cut without closing it:
/// after [`Cable::cut`] bytes are swallowed in both directions, so each side hears only
/// silence, as across a failed switch.
///
/// It can also play a man in the middle ([`Cable::hold`], [`Cable::to_primary`]): keep the
/// primary's bytes from the backup, and send the primary bytes of its own.
struct Cable {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<u8>>>,
    primary: Arc<Mutex<Option<TcpStream>>>,
}

impl Cable {
    fn to(backup: SocketAddr) -> Cable {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cable listener");
        let addr = listener.local_addr().expect("cable address");
        let cut = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let held = Arc::new(Mutex::new(Vec::new()));
        let to_primary: Arc<Mutex<Option<TcpStream>>> = Arc::default();
        let (c, h, kept, tp) = (cut.clone(), hold.clone(), held.clone(), to_primary.clone());
        std::thread::spawn(move || {
            let Ok((primary, _)) = listener.accept() else {
                return;
            };
            let Ok(backup) = TcpStream::connect(backup) else {
                return;
            };
            *tp.lock().unwrap_or_else(|e| e.into_inner()) = primary.try_clone().ok();
            let pumps = [
                (primary.try_clone(), backup.try_clone(), true),
                (backup.try_clone(), primary.try_clone(), false),
            ];
            for (from, to, from_primary) in pumps {
                let (Ok(mut from), Ok(mut to)) = (from, to) else {
                    return;
                };
                let (cut, hold, kept, tp) = (c.clone(), h.clone(), kept.clone(), tp.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                // Cut: swallow, but keep both connections open.
                                if cut.load(Ordering::Relaxed) {
                                    continue;
                                }
                                if from_primary && hold.load(Ordering::Relaxed) {
                                    kept.lock()
                                        .unwrap_or_else(|e| e.into_inner())
                                        .extend_from_slice(&buf[..n]);
                                    continue;
                                }
                                // Towards the primary, one writer at a time (the test may
                                // inject).
                                let _guard = (!from_primary)
                                    .then(|| tp.lock().unwrap_or_else(|e| e.into_inner()));
                                if to.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
            // The two pump threads own clones; keep these alive until the process ends.
            std::mem::forget((primary, backup));
        });
        Cable {
            addr,
            cut,
            hold,
            held,
            primary: to_primary,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }

    /// From now on the primary's bytes stop here (kept, see [`Cable::held`]).
    fn hold(&self) {
        self.hold.store(true, Ordering::Relaxed);
    }

    /// What the primary sent since [`Cable::hold`].
    fn held(&self) -> Vec<u8> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends `bytes` to the primary as if from the backup.
    fn to_primary(&self, bytes: &[u8]) {
        let mut p = self.primary.lock().unwrap_or_else(|e| e.into_inner());
        p.as_mut()
            .expect("the primary is connected")
            .write_all(bytes)
            .expect("injecting");
    }
}

/// An FT pair started by hand (not through `ftvm demo`), behind an in-process front.
struct Pair {
    front: Front,
    primary: Proc,
    backup: Proc,
    first_epoch: u64,
    cable: Option<Cable>,
}

fn node_args(role: &str, key: &Path, arbiter: &str, front: SocketAddr, core: u8) -> Vec<String> {
    vec![
        s(role),
        s("--key-file"),
        key.display().to_string(),
        s("--arbiter"),
        s(arbiter),
        s("--front"),
        front.to_string(),
        s("--core"),
        s(core),
        s("--heartbeat-timeout-ms"),
        s(300),
        s("--name"),
        format!("{role}-{}", rand::random::<u32>()),
    ]
}

/// Starts a pair: over TCP through a cuttable cable, or over shared memory.
fn start_pair(scratch: &Scratch, arbiter: &str, over_cable: bool) -> Pair {
    start_pair_with(scratch, arbiter, over_cable, &[], 300)
}

/// As [`start_pair`], with `extra` arguments for both replicas and their heartbeat timeout.
fn start_pair_with(
    scratch: &Scratch,
    arbiter: &str,
    over_cable: bool,
    extra: &[String],
    heartbeat_timeout_ms: u64,
) -> Pair {
    let key = scratch.key();
    let psk = PreSharedKey::from_file(&key).expect("key");
    let front = Front::bind(([127, 0, 0, 1], 0).into(), psk, 1).expect("front");
    let mut b = node_args("backup", &key, arbiter, front.local_addr(), 1);
    let mut p = node_args("primary", &key, arbiter, front.local_addr(), 0);
    for args in [&mut b, &mut p] {
        if let Some(i) = args.iter().position(|a| a == "--heartbeat-timeout-ms") {
            args[i + 1] = s(heartbeat_timeout_ms);
        }
        args.extend(extra.iter().cloned());
    }
    p.extend([s("--service"), s("127.0.0.1:0")]);
    let (backup, cable) = if over_cable {
        b.extend([s("--transport"), s("tcp"), s("--listen"), s("127.0.0.1:0")]);
        let backup = Proc::start("backup", &b);
        let listening: SocketAddr = backup
            .ready
            .addr
            .parse()
            .unwrap_or_else(|_| panic!("backup said {:?}", backup.ready));
        let cable = Cable::to(listening);
        p.extend([
            s("--transport"),
            s("tcp"),
            s("--backup"),
            cable.addr.to_string(),
        ]);
        (backup, Some(cable))
    } else {
        let sock = scratch
            .path()
            .join(format!("backup-{}.sock", rand::random::<u32>()));
        b.extend([s("--listen"), sock.display().to_string()]);
        let backup = Proc::start("backup", &b);
        p.extend([s("--backup"), sock.display().to_string()]);
        (backup, None)
    };
    let primary = Proc::start("primary", &p);
    let first_epoch = front.stats().epoch;
    assert!(first_epoch >= 1, "the primary registered at the front");
    Pair {
        front,
        primary,
        backup,
        first_epoch,
        cable,
    }
}

/// Starts `ftvm client` against the front: `requests` requests, read-back, a long timeout.
fn start_client(front: SocketAddr, requests: u64, seed: u64) -> Child {
    Command::new(FTVM)
        .args([
            "client",
            "--service",
            &front.to_string(),
            "--requests",
            &s(requests),
            "--seed",
            &s(seed),
            "--keys",
            "20",
            "--verify",
            "--timeout-ms",
            "60000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the client")
}

/// Waits for the client; asserts it saw one consistent history and lost nothing.
fn client_ok(client: Child) {
    let out = client.wait_with_output().expect("client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "client:\n{text}");
    assert!(text.contains("\"acknowledged_lost\": 0"), "client:\n{text}");
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// Waits until exactly one replica has exited deposed; returns which ("primary"/"backup").
fn one_deposed(pair: &mut Pair, within: Duration) -> &'static str {
    let deadline = Instant::now() + within;
    loop {
        let p = pair.primary.exited_within(Duration::ZERO);
        let b = pair.backup.exited_within(Duration::ZERO);
        match (p, b) {
            (None, None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            (Some(3), None) => return "primary",
            (None, Some(3)) => return "backup",
            other => panic!("expected exactly one replica deposed (exit 3), got {other:?}"),
        }
    }
}

#[test]
fn a_cut_channel_leaves_exactly_one_replica_live() {
    let mut winners = Vec::new();
    for round in 0..4 {
        let scratch = Scratch::new("cut");
        let arbiter = scratch.file_arbiter();
        let _turn = turn();
        let mut pair = start_pair(&scratch, &arbiter, true);
        let client = start_client(pair.front.local_addr(), 300, round);
        std::thread::sleep(Duration::from_millis(150 + 100 * round));
        pair.cable.as_ref().expect("cable").cut();
        let loser = one_deposed(&mut pair, Duration::from_secs(10));
        // The other goes on, alone, in the next epoch.
        let epoch = pair.first_epoch + 1;
        assert!(
            wait_until(Duration::from_secs(5), || pair.front.stats().epoch == epoch),
            "the winner registered epoch {epoch}: {:?}",
            pair.front.stats()
        );
        client_ok(client);
        let survivor = if loser == "primary" {
            pair.backup
        } else {
            pair.primary
        };
        assert_eq!(survivor.stop(), 0, "the survivor stops cleanly");
        winners.push(if loser == "primary" {
            "backup"
        } else {
            "primary"
        });
    }
    println!("cut channel winners: {winners:?}");
}

/// A forged ACK from the middle of the log channel, with real processes: the cable keeps the
/// primary's frames from the backup once armed, a client sends one update, and when the
/// primary's frame with the update's output marker has reached the cable, the cable sends the
/// primary an ACK for it — well-formed, the right epoch and sequence, no valid seal. Returns how
/// many responses the front passed on in the first epoch after the cable started holding
/// (released on the forged ACK's word), and whether the client saw a consistent history.
fn forged_ack_run(crypto: &str) -> (u64, bool) {
    let scratch = Scratch::new(&format!("forged-ack-{crypto}"));
    let arbiter = scratch.file_arbiter();
    let _turn = turn();
    // A long heartbeat timeout: the backup must not give up on the held channel before the
    // forgery is tried.
    let extra = [s("--channel-crypto"), s(crypto)];
    let pair = start_pair_with(&scratch, &arbiter, true, &extra, 5000);
    let front = pair.front.local_addr();
    client_ok(start_client(front, 20, 1));
    let epoch = pair.first_epoch;
    let before = pair.front.responses_in(epoch);
    let cable = pair.cable.as_ref().expect("cable");
    cable.hold();
    // Its own keys: its model of the store starts empty.
    let client = Command::new(FTVM)
        .args(["client", "--service", &front.to_string(), "--requests", "3"])
        .args([
            "--seed",
            "2",
            "--keys",
            "5",
            "--key-prefix",
            "mitm-",
            "--verify",
        ])
        .args(["--timeout-ms", "60000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the client");
    // Wait for the frame with the output marker of the update (an observable event).
    let trailer = if crypto == "auth" { 24 } else { 0 };
    let marker = wait_for(Duration::from_secs(20), || {
        let held = cable.held();
        let mut at = 0;
        let mut marker = None;
        while let Ok((frame, len)) = logfmt::FrameView::parse(&held[at..]) {
            for (seq, entry) in frame.entries_with_seq() {
                if matches!(entry.event, logfmt::Event::OutputMarker { .. }) {
                    marker = Some((frame.epoch(), seq));
                }
            }
            at += len + trailer;
        }
        marker
    })
    .expect("the update's output marker reached the cable");
    let (frame_epoch, seq) = marker;
    // `FTAK`, 0, epoch, received, replayed, and 24 bytes where the seal goes.
    let mut ack = vec![0u8; 56];
    ack[..4].copy_from_slice(b"FTAK");
    ack[8..16].copy_from_slice(&frame_epoch.to_le_bytes());
    ack[16..24].copy_from_slice(&seq.to_le_bytes());
    ack[24..32].copy_from_slice(&seq.to_le_bytes());
    cable.to_primary(&ack);
    let out = client.wait_with_output().expect("client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let consistent = out.status.success() && text.contains("\"acknowledged_lost\": 0");
    if !consistent {
        println!("client:\n{text}");
    }
    (pair.front.responses_in(epoch) - before, consistent)
}

fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_forged_ack_releases_no_output_in_real_processes() {
    let (early, consistent) = forged_ack_run("auth");
    assert_eq!(
        early, 0,
        "an output was released in the old epoch on a forged ACK's word"
    );
    assert!(consistent, "the client saw a consistent history");
}

#[test]
fn without_tags_the_forged_ack_releases_the_output() {
    // The control: with `--channel-crypto none` the same forgery works (so the test above can
    // fail for the right reason).
    let (early, _) = forged_ack_run("none");
    assert_eq!(early, 1, "the forged ACK released the update's response");
}

#[test]
fn with_the_arbiter_down_nobody_goes_live_until_it_is_back() {
    let scratch = Scratch::new("arbiter-down");
    let key = scratch.key();
    let mut server = start_arbiter_server(&scratch, &key, "127.0.0.1:0");
    let addr = server.ready.addr.clone();
    let _turn = turn();
    let mut pair = start_pair(&scratch, &format!("server:{addr}"), true);
    let client = start_client(pair.front.local_addr(), 300, 5);
    std::thread::sleep(Duration::from_millis(200));
    server.signal(libc::SIGKILL);
    assert!(server.exited_within(Duration::from_secs(5)).is_some());
    pair.cable.as_ref().expect("cable").cut();
    // Both sides notice the silence and ask; nobody gets an answer, so nobody goes on.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        pair.front.stats().epoch,
        pair.first_epoch,
        "someone went live without the arbiter"
    );
    assert_eq!(pair.primary.exited_within(Duration::ZERO), None);
    assert_eq!(pair.backup.exited_within(Duration::ZERO), None);
    // The arbiter comes back (same address, same durable state): exactly one goes live.
    let _server = start_arbiter_server(&scratch, &key, &addr);
    let loser = one_deposed(&mut pair, Duration::from_secs(15));
    let epoch = pair.first_epoch + 1;
    assert!(wait_until(Duration::from_secs(5), || pair
        .front
        .stats()
        .epoch
        == epoch));
    client_ok(client);
    let survivor = if loser == "primary" {
        pair.backup
    } else {
        pair.primary
    };
    assert_eq!(survivor.stop(), 0);
}

#[test]
fn a_deposed_primary_cannot_reach_a_client() {
    let scratch = Scratch::new("deposed");
    let arbiter = scratch.file_arbiter();
    let _turn = turn();
    let mut pair = start_pair(&scratch, &arbiter, false);
    let client = start_client(pair.front.local_addr(), 400, 9);
    std::thread::sleep(Duration::from_millis(200));
    // Freeze the primary: to the backup it is as good as dead, but it will wake up.
    pair.primary.signal(libc::SIGSTOP);
    let epoch = pair.first_epoch + 1;
    assert!(
        wait_until(Duration::from_secs(10), || pair.front.stats().epoch
            == epoch),
        "the backup took over: {:?}",
        pair.front.stats()
    );
    let before = pair.front.stats();
    pair.primary.signal(libc::SIGCONT);
    // Awake, it finds its backup gone, asks the arbiter, learns it lost, and halts.
    assert_eq!(
        pair.primary.exited_within(Duration::from_secs(10)),
        Some(3),
        "the woken primary must halt as deposed"
    );
    client_ok(client);
    let after = pair.front.stats();
    assert_eq!(after.epoch, epoch, "the front still serves the new epoch");
    println!(
        "front: {} responses fenced while the deposed primary woke ({} before)",
        after.fenced, before.fenced
    );
    // A replica of the old epoch cannot even claim the service address again.
    let mut stale = Command::new(FTVM)
        .args([
            "primary",
            "--unreplicated",
            "--key-file",
            &scratch.key().display().to_string(),
            "--front",
            &pair.front.local_addr().to_string(),
            "--service",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stale primary");
    let status = wait_until(Duration::from_secs(10), || {
        matches!(stale.try_wait(), Ok(Some(_)))
    });
    assert!(status, "a stale primary must give up at once");
    let out = stale.wait_with_output().expect("stale primary");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pair.front.stats().refused > after.refused);
    assert_eq!(pair.backup.stop(), 0);
}

/// Network namespace and veth pairs for one test, removed on drop:
/// `ns` holds the primary; the channel runs over one veth pair (cut by downing it), the service
/// (front) over another that stays up.
struct Veths {
    ns: String,
    channel_peer: String,
    service_peer: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Veths {
    fn new() -> Veths {
        let tag = format!("{:04x}", rand::random::<u16>());
        let v = Veths {
            ns: format!("ftvm-fo-{tag}"),
            channel_peer: format!("fvc{tag}b"),
            service_peer: format!("fvs{tag}b"),
        };
        let (ca, sa) = (format!("fvc{tag}a"), format!("fvs{tag}a"));
        ip(&["netns", "add", &v.ns]);
        ip(&[
            "link",
            "add",
            &ca,
            "type",
            "veth",
            "peer",
            "name",
            &v.channel_peer,
        ]);
        ip(&[
            "link",
            "add",
            &sa,
            "type",
            "veth",
            "peer",
            "name",
            &v.service_peer,
        ]);
        for a in [&ca, &sa] {
            ip(&["link", "set", a, "netns", &v.ns]);
        }
        ip(&["-n", &v.ns, "addr", "add", "10.77.0.1/24", "dev", &ca]);
        ip(&["-n", &v.ns, "addr", "add", "10.78.0.1/24", "dev", &sa]);
        ip(&["addr", "add", "10.77.0.2/24", "dev", &v.channel_peer]);
        ip(&["addr", "add", "10.78.0.2/24", "dev", &v.service_peer]);
        for a in [&ca, &sa, &"lo".to_string()] {
            ip(&["-n", &v.ns, "link", "set", a, "up"]);
        }
        ip(&["link", "set", &v.channel_peer, "up"]);
        ip(&["link", "set", &v.service_peer, "up"]);
        v
    }
}

impl Drop for Veths {
    fn drop(&mut self) {
        // Deleting one end deletes the pair; the namespace goes with its interfaces.
        let _ = Command::new("ip")
            .args(["link", "del", &self.channel_peer])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.service_peer])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

#[test]
fn a_downed_veth_between_the_replicas_leaves_exactly_one_live() {
    for round in 0..3u64 {
        let scratch = Scratch::new("veth");
        let key = scratch.key();
        let arbiter = scratch.file_arbiter();
        let _turn = turn();
        let veths = Veths::new();
        let psk = PreSharedKey::from_file(&key).expect("key");
        // The front listens on every address: the primary reaches it over the service veth.
        let front = Front::bind(([0, 0, 0, 0], 0).into(), psk, 1).expect("front");
        let port = front.local_addr().port();
        let service_front: SocketAddr = format!("10.78.0.2:{port}").parse().expect("addr");
        let mut b = node_args("backup", &key, &arbiter, service_front, 1);
        // The backup's own service address on the service link too: the front (bound to every
        // address) answers from the address the route to the replica picks.
        b.extend([
            s("--transport"),
            s("tcp"),
            s("--listen"),
            s("10.77.0.2:0"),
            s("--service"),
            s("10.78.0.2:0"),
        ]);
        let mut backup = Proc::start("backup", &b);
        let listening = backup.ready.addr.clone();
        let mut p = node_args("primary", &key, &arbiter, service_front, 0);
        p.extend([
            s("--transport"),
            s("tcp"),
            s("--backup"),
            listening,
            s("--service"),
            s("10.78.0.1:0"),
        ]);
        let mut primary = Proc::start_in(Some(&veths.ns), "primary", &p);
        let first_epoch = front.stats().epoch;
        let local_front: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let client = start_client(local_front, 300, 40 + round);
        std::thread::sleep(Duration::from_millis(200 + 150 * round));
        ip(&["link", "set", &veths.channel_peer, "down"]);
        let mut pair_exits = || {
            (
                primary.exited_within(Duration::ZERO),
                backup.exited_within(Duration::ZERO),
            )
        };
        assert!(
            wait_until(Duration::from_secs(10), || pair_exits() != (None, None)),
            "nobody halted after the cut"
        );
        std::thread::sleep(Duration::from_millis(300));
        let exits = (
            primary.exited_within(Duration::ZERO),
            backup.exited_within(Duration::ZERO),
        );
        let survivor = match exits {
            (Some(3), None) => backup,
            (None, Some(3)) => primary,
            other => panic!("expected exactly one replica deposed (exit 3), got {other:?}"),
        };
        assert!(wait_until(Duration::from_secs(5), || front.stats().epoch
            == first_epoch + 1));
        client_ok(client);
        assert_eq!(survivor.stop(), 0);
    }
}

#[test]
fn a_primary_that_loses_its_backup_asks_then_goes_on_alone() {
    let scratch = Scratch::new("backup-killed");
    let arbiter = scratch.file_arbiter();
    let _turn = turn();
    let mut pair = start_pair(&scratch, &arbiter, false);
    let client = start_client(pair.front.local_addr(), 300, 11);
    std::thread::sleep(Duration::from_millis(150));
    pair.backup.signal(libc::SIGKILL);
    // The primary wins the next epoch and re-registers at the front under it.
    let epoch = pair.first_epoch + 1;
    assert!(
        wait_until(Duration::from_secs(10), || pair.front.stats().epoch
            == epoch),
        "the primary claimed epoch {epoch}: {:?}",
        pair.front.stats()
    );
    client_ok(client);
    assert_eq!(pair.primary.exited_within(Duration::ZERO), None);
    assert_eq!(pair.primary.stop(), 0);
    let current = ft_arbiter::FileArbiter::open(scratch.store())
        .and_then(|mut a| ft_arbiter::Arbiter::current(&mut a, "ftvm-pair-1"))
        .expect("arbiter");
    assert!(
        current.is_some_and(|(winner, e)| winner.starts_with("primary-") && e == epoch),
        "the arbiter recorded the primary's win"
    );
}
