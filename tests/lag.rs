//! Lag control with a really slowed backup: the backup process runs under a cgroup v1 CPU quota
//! (20 % of a core, in 5 ms periods) while clients load the pair through the front.
//!
//! - The primary is throttled (lag control waits > 0), the lag it estimated when it sealed frames
//!   stays near the bound, and the backup's memory stays bounded (its ring holds the backlog in
//!   place: no queue grows behind it).
//! - SIGKILL of the primary under that load: the backup drains what it had received within
//!   the bound, goes live (it won the arbiter), and no acknowledged update is lost.
//!
//! Needs root (the cgroup), /dev/kvm, and the `cpu` cgroup v1 controller.
//!
//! The clients are pipelined (`ftvm client --window`): with one request at a time the output
//! rule would hold the primary back first (every response waits for an ACK, so the primary
//! produces no faster than the backup acknowledges and the lag never builds up).

mod common;

use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::service::Front;

const FTVM: &str = env!("CARGO_BIN_EXE_ftvm");
/// The bound under test (`--max-lag-ms`, the default).
const MAX_LAG_MS: f64 = 100.0;
/// Concurrent clients, each with [`WINDOW`] requests in flight on [`KEYS`] keys of its own:
/// enough that the primary, unthrottled, would outrun a backup with a fifth of a core (the
/// guest's table holds 256 keys).
const CLIENTS: u64 = 8;
const WINDOW: u64 = 12;
const KEYS: u64 = 24;

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// A child killed on drop.
struct Proc(Child);

impl Proc {
    fn start(args: &[String]) -> (Proc, common::ready::Ready) {
        let mut child = Command::new(FTVM)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ftvm");
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let ready = common::ready::find(&mut reader).expect("stdout");
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        let ready = ready.unwrap_or_else(|| panic!("{args:?} exited before it was ready"));
        (Proc(child), ready)
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).expect("pid")
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.0.try_wait().expect("try_wait") {
                return Some(st.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A cgroup v1 `cpu` group with a CFS quota, removed on drop.
struct CpuQuota(PathBuf);

impl CpuQuota {
    fn new(period_us: u64, quota_us: u64) -> CpuQuota {
        let dir = PathBuf::from(format!(
            "/sys/fs/cgroup/cpu/ftvm-lag-{:08x}",
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "creating {} (this test needs root and the cgroup v1 cpu controller): {e}",
                dir.display()
            )
        });
        let g = CpuQuota(dir);
        g.write("cpu.cfs_period_us", period_us);
        g.write("cpu.cfs_quota_us", quota_us);
        g
    }

    fn write(&self, file: &str, v: impl ToString) {
        let p = self.0.join(file);
        std::fs::write(&p, v.to_string()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }

    /// Moves every thread of `pid` into the group.
    fn add(&self, pid: i32) {
        self.write("cgroup.procs", pid);
    }

    /// Times the group was throttled.
    fn throttled(&self) -> u64 {
        let stat = std::fs::read_to_string(self.0.join("cpu.stat")).unwrap_or_default();
        stat.lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        // Members must leave first: back to the root group.
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write("/sys/fs/cgroup/cpu/cgroup.procs", pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Resident memory of `pid`, KiB.
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn read_json(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The two tests take turns: each pins its pair to both cores and measures lag.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Run {
    _dir: tempfile::TempDir,
    _front: Front,
    quota: CpuQuota,
    primary: Proc,
    backup: Proc,
    primary_json: PathBuf,
    backup_json: PathBuf,
    clients: Vec<Child>,
    /// Largest resident-memory growth of the backup under load, KiB, and its samples.
    rss_growth_kib: u64,
    samples: usize,
    /// Last, so it is released after the processes are gone.
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// A pair over shared memory with a file arbiter, the backup under a 20 % CPU quota, and
/// [`CLIENTS`] clients of `requests` each started against the front.
fn start(name: &str, requests: u64) -> Run {
    let turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let common::Site {
        dir,
        key,
        arbiter,
        front,
    } = common::Site::new(&format!("ftvm-lag-{name}-"));
    let common_args = |role: &str, core: u8, json: &Path| {
        vec![
            s(role),
            s("--key-file"),
            key.display().to_string(),
            s("--arbiter"),
            arbiter.to_string(),
            s("--front"),
            front.local_addr().to_string(),
            s("--core"),
            s(core),
            s("--heartbeat-timeout-ms"),
            s(500),
            s("--max-lag-ms"),
            s(MAX_LAG_MS),
            s("--json"),
            json.display().to_string(),
            s("--name"),
            format!("{role}-{}", rand::random::<u32>()),
        ]
    };
    let sock = dir.path().join("backup.sock");
    let backup_json = dir.path().join("backup.json");
    let primary_json = dir.path().join("primary.json");
    let mut b = common_args("backup", 1, &backup_json);
    b.extend([s("--listen"), sock.display().to_string()]);
    let (backup, _) = Proc::start(&b);
    let quota = CpuQuota::new(5_000, 1_000);
    quota.add(backup.pid());
    let mut p = common_args("primary", 0, &primary_json);
    p.extend([
        s("--backup"),
        sock.display().to_string(),
        s("--service"),
        s("127.0.0.1:0"),
    ]);
    let (primary, _) = Proc::start(&p);
    let clients = (0..CLIENTS)
        .map(|i| {
            Command::new(FTVM)
                .args([
                    "client",
                    "--service",
                    &front.local_addr().to_string(),
                    "--requests",
                    &s(requests),
                    "--seed",
                    &s(rand::random::<u32>() as u64 + i),
                    "--keys",
                    &s(KEYS),
                    "--window",
                    &s(WINDOW),
                    // No retries while the pair is alive: a response waits for the backup's
                    // ACK, and a throttled backup may take the bound and more.
                    "--retry-ms",
                    "2000",
                    "--key-prefix",
                    &format!("c{i}"),
                    "--verify",
                    "--timeout-ms",
                    "60000",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a client")
        })
        .collect();
    Run {
        _dir: dir,
        _front: front,
        quota,
        primary,
        backup,
        primary_json,
        backup_json,
        clients,
        rss_growth_kib: 0,
        samples: 0,
        _turn: turn,
    }
}

impl Run {
    /// Samples the backup's memory every 10 ms for `d` (the load keeps running meanwhile).
    fn watch(&mut self, d: Duration) {
        let base = rss_kib(self.backup.pid()).expect("backup RSS");
        let end = Instant::now() + d;
        while Instant::now() < end {
            if let Some(now) = rss_kib(self.backup.pid()) {
                self.rss_growth_kib = self.rss_growth_kib.max(now.saturating_sub(base));
                self.samples += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for every client; asserts each saw one consistent history and lost nothing.
    fn clients_ok(&mut self) {
        for c in self.clients.drain(..) {
            let out = c.wait_with_output().expect("client");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "client:\n{text}");
            assert!(text.contains("\"acknowledged_lost\": 0"), "client:\n{text}");
        }
    }
}

/// Memory the backup may grow by under load: its 4 MiB ring filling up, plus what a process
/// touches anyway (stacks, allocator).
const RSS_GROWTH_LIMIT_KIB: u64 = 8 << 10;

#[test]
fn a_slowed_backup_throttles_the_primary_and_stays_bounded() {
    let mut run = start("throttle", 600);
    run.watch(Duration::from_secs(3));
    run.clients_ok();
    assert!(run.quota.throttled() > 0, "the cgroup throttled the backup");
    run.primary.signal(libc::SIGTERM);
    assert_eq!(
        run.primary.wait(Duration::from_secs(30)),
        Some(0),
        "primary"
    );
    assert_eq!(run.backup.wait(Duration::from_secs(30)), Some(0), "backup");
    let p = read_json(&run.primary_json);
    let lag = &p["lag"];
    let lag_max_ms = lag["lag_max_ms"].as_f64().expect("lag_max_ms");
    let throttles = lag["lag_throttles"].as_u64().expect("lag_throttles");
    println!(
        "lag control: {throttles} waits, {:.0} ms throttled, lag at seal max {lag_max_ms:.1} ms \
         / {} bytes / {} entries (bound {MAX_LAG_MS} ms); backup RSS grew by at most {} KiB \
         ({} samples); {} requests, commit p50 {} µs p99 {} µs",
        lag["throttled_ms"].as_f64().unwrap_or(f64::NAN),
        lag["lag_max_bytes"],
        lag["lag_max_entries"],
        run.rss_growth_kib,
        run.samples,
        p["requests"],
        p["commit_p50_us"],
        p["commit_p99_us"],
    );
    assert!(throttles > 0, "the primary was held back: {p}");
    // The primary's estimate when a frame is sealed, before the wait: lag control holds it to
    // 3/4 of the bound, but its peaks (a replay-rate sample taken while the quota or a busy
    // machine stops the backup) pass the bound for a moment — 93 ms here on a quiet machine,
    // 254 ms once in CI. It is the controller's input, not what a failover drains: that is
    // measured, and held to the bound, in the SIGKILL test below. Without lag control the
    // backlog would grow for the whole run (seconds).
    assert!(
        lag_max_ms < 5.0 * MAX_LAG_MS,
        "lag {lag_max_ms} ms over the bound"
    );
    assert!(
        run.rss_growth_kib < RSS_GROWTH_LIMIT_KIB,
        "backup memory grew by {} KiB",
        run.rss_growth_kib
    );
    let b = read_json(&run.backup_json);
    assert_eq!(b["divergence"], serde_json::Value::Null, "{b}");
    assert_eq!(b["memory_hash"], p["memory_hash"], "replicas agree");
}

#[test]
fn after_sigkill_of_the_primary_the_slowed_backup_drains_within_the_bound() {
    let mut run = start("kill", 1_200);
    run.watch(Duration::from_secs(2));
    let killed_at = unix_ns();
    run.primary.signal(libc::SIGKILL);
    run.clients_ok();
    run.backup.signal(libc::SIGTERM);
    assert_eq!(run.backup.wait(Duration::from_secs(30)), Some(0), "backup");
    let b = read_json(&run.backup_json);
    let t = &b["takeover"];
    assert_eq!(
        t["arbitration"]["won"], true,
        "the backup won the arbiter: {b}"
    );
    let detected = t["detected_unix_ns"].as_u64().expect("detected");
    let log_end = t["log_end_unix_ns"].as_u64().expect("log end");
    let drain_ms = log_end.saturating_sub(detected) as f64 / 1e6;
    let since_kill_ms = log_end.saturating_sub(killed_at) as f64 / 1e6;
    println!(
        "drain after SIGKILL: {drain_ms:.1} ms from detection to the last entry replayed \
         ({since_kill_ms:.1} ms after the kill), live {:.1} ms later; backup RSS grew by at \
         most {} KiB under load",
        t["takeover_ms"].as_f64().unwrap_or(f64::NAN),
        run.rss_growth_kib
    );
    assert!(
        drain_ms < MAX_LAG_MS,
        "drain {drain_ms} ms exceeds the {MAX_LAG_MS} ms bound"
    );
    assert!(
        run.rss_growth_kib < RSS_GROWTH_LIMIT_KIB,
        "backup memory grew by {} KiB",
        run.rss_growth_kib
    );
}
