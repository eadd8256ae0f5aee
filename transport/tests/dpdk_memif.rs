//! The log channel over the DPDK medium between two real processes joined by `net_memif` (no
//! root, no hugepages). EAL can be initialised once per process, so every test runs in a child
//! (this binary re-executed as `primary <scenario>`), which starts its backup as a grandchild
//! (`backup <scenario> <memif socket> <file prefix> <lcore>`). Each process has its own EAL
//! with its own `--file-prefix`; the memif socket lives in a temporary directory; the backup is
//! the memif server, the primary the client.
//!
//! - `million_entries`: 1,000,000 entries of random sizes, every checksum verified by the
//!   backup in order, ACKs monotone; then 10,000 commits (output marker + `wait_acked`) timed.
//! - `million_entries_drop50`: the same with every 50th packet dropped in each direction;
//!   everything still arrives, in order, once, and the drop counters are > 0.
//! - `backup_killed`: the backup is killed mid-stream; the primary gets `PeerClosed` or
//!   `HeartbeatTimeout` within the heartbeat timeout.
//! - `backup_frozen`: the backup is stopped (SIGSTOP; its sockets stay open); the primary gets
//!   `HeartbeatTimeout` within the heartbeat timeout.
//!
//! Custom harness (`harness = false`). Needs `--features dpdk`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use dpdk_sys::{Eal, Mempool, Port};
mod common;

use common::stream::{check_backup_loss, payload, verify_stream, Loss, DEVICE};
use logfmt::{ControlOp, Entry, Event, Position};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use transport::dpdk::{self, DpdkConfig, DpdkStats};
use transport::{ChannelConfig, PreSharedKey};

const ENTRIES: u64 = 1_000_000;
const COMMITS: usize = 10_000;
/// Child protocol lines on stdout start with this (DPDK may print to stdout too).
const TAG: &str = "FTVM ";

fn config() -> ChannelConfig {
    let key = PreSharedKey::new(b"dpdk-memif-test-key!".to_vec()).expect("key");
    let mut c = ChannelConfig::new(0xD9D4, 1, key);
    c.heartbeat_interval = Duration::from_millis(10);
    c.heartbeat_timeout = Duration::from_millis(300);
    c.poll = transport::PollPolicy::BALANCED;
    c
}

fn dpdk_config(scenario: &str) -> DpdkConfig {
    DpdkConfig {
        drop_every: (scenario == "drop50").then_some(50),
        ..DpdkConfig::default()
    }
}

/// Initialises this process's EAL with one memif port and returns the started port.
fn eal_port(
    role: &str,
    socket: &str,
    prefix: &str,
    lcore: &str,
) -> Result<(Port, PathBuf), String> {
    let vdev = format!("--vdev=net_memif0,role={role},id=0,socket={socket},socket-abstract=no");
    let args = [
        "--no-huge",
        "-m",
        "256",
        "--no-pci",
        "--no-telemetry",
        "-l",
        lcore,
        "--file-prefix",
        prefix,
        &vdev,
    ];
    let eal = Eal::init(&args).map_err(|e| format!("Eal::init: {e}"))?;
    let runtime_dir = eal.runtime_dir().to_path_buf();
    let pool = Mempool::new("ftvm_pool", 8191, 256, Mempool::DEFAULT_DATA_ROOM)
        .map_err(|e| e.to_string())?;
    let ports = eal.ports();
    let &[id] = ports.as_slice() else {
        return Err(format!("expected one port, found {ports:?}"));
    };
    let mut port = Port::configure(id, &pool, 1024, 1024).map_err(|e| e.to_string())?;
    port.start().map_err(|e| e.to_string())?;
    Ok((port, runtime_dir))
}

fn stats_line(s: &DpdkStats) -> String {
    let g = DpdkStats::get;
    format!(
        "tx={} rx={} retransmits={} timeouts={} nacks={} test_dropped={} garbage={} duplicates={} out_of_order={} backlogged={} tx_full={}",
        g(&s.tx_packets),
        g(&s.rx_packets),
        g(&s.retransmits),
        g(&s.timeouts),
        g(&s.nacks),
        g(&s.test_dropped),
        g(&s.garbage),
        g(&s.duplicates),
        g(&s.out_of_order),
        g(&s.backlogged),
        g(&s.tx_full),
    )
}

// ---------------------------------------------------------------- backup role (grandchild)

fn backup(scenario: &str, socket: &str, prefix: &str, lcore: &str) -> Result<(), String> {
    let (port, runtime_dir) = eal_port("server", socket, prefix, lcore)?;
    println!("{TAG}RUNTIME_DIR {}", runtime_dir.display());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    println!(
        "{TAG}LISTENING {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let dcfg = dpdk_config(scenario);
    let stats = dcfg.stats.clone();
    let b = dpdk::accept(&listener, port, config(), dcfg).map_err(|e| e.to_string())?;
    let verified = verify_stream(b);
    println!("{TAG}STATS {}", stats_line(&stats));
    let n = verified?;
    println!("{TAG}VERIFIED {n}");
    // The EAL was cleaned up with the last handle (the port, inside the channel).
    let _ = std::fs::remove_dir_all(&runtime_dir);
    Ok(())
}

// ---------------------------------------------------------------- primary role (child)

struct BackupProcess {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    runtime_dir: Option<PathBuf>,
}

impl BackupProcess {
    /// The next protocol line (tagged), skipping anything else on stdout.
    fn next(&mut self) -> Option<String> {
        for line in self.lines.by_ref() {
            let line = line.ok()?;
            if let Some(rest) = line.strip_prefix(TAG) {
                return Some(rest.to_string());
            }
        }
        None
    }

    fn expect(&mut self, prefix: &str) -> Result<String, String> {
        let line = self
            .next()
            .ok_or_else(|| format!("backup exited before {prefix}"))?;
        line.strip_prefix(prefix)
            .map(str::to_string)
            .ok_or_else(|| format!("backup said {line:?}, expected {prefix}"))
    }
}

impl Drop for BackupProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.runtime_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, String> {
        let dir = std::env::temp_dir().join(format!(
            "ftvm-dpdk-memif-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(TempDir(dir))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn spawn_backup(
    scenario: &str,
    socket: &str,
    prefix: &str,
    lcore: &str,
) -> Result<(BackupProcess, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["backup", scenario, socket, prefix, lcore])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning backup: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut b = BackupProcess {
        child,
        lines: BufReader::new(stdout).lines(),
        runtime_dir: None,
    };
    b.runtime_dir = Some(PathBuf::from(b.expect("RUNTIME_DIR ")?));
    let addr = b.expect("LISTENING ")?;
    Ok((b, addr))
}

fn input(seq: u64, buf: &[u8]) -> Entry<'_> {
    Entry::new(
        Position::at_exit(seq),
        Event::DeviceInput {
            device: DEVICE,
            data: buf,
        },
    )
}

fn marker(seq: u64) -> Entry<'static> {
    Entry::new(
        Position::at_exit(seq),
        Event::OutputMarker {
            device: DEVICE,
            len: 0,
            digest: logfmt::digest(b""),
        },
    )
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn primary(scenario: &str, lcores: (&str, &str)) -> Result<(), String> {
    let dir = TempDir::new()?;
    let socket = dir.path().join("memif.sock").display().to_string();
    let id = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    let (mut backup, addr) = spawn_backup(scenario, &socket, &format!("fb{id}"), lcores.1)?;
    let (port, runtime_dir) = eal_port("client", &socket, &format!("fp{id}"), lcores.0)?;
    let result = run_primary(scenario, port, &addr, &mut backup);
    let _ = std::fs::remove_dir_all(&runtime_dir);
    result
}

fn run_primary(
    scenario: &str,
    port: Port,
    addr: &str,
    backup: &mut BackupProcess,
) -> Result<(), String> {
    let dcfg = dpdk_config(scenario);
    let stats = dcfg.stats.clone();
    let connected = Instant::now();
    let mut p = dpdk::connect(addr, port, config(), dcfg).map_err(|e| format!("connect: {e}"))?;
    eprintln!("  connected in {:.1?}", connected.elapsed());
    let mut rng = SmallRng::seed_from_u64(0x5EED);
    let mut buf = Vec::new();

    if scenario == "frozen" {
        // SIGSTOP: the backup's process, control socket and memif stay; only silence tells.
        let timeout = config().heartbeat_timeout;
        for seq in 1..=10_000u64 {
            payload(seq, &mut rng, &mut buf);
            p.append(&input(seq, &buf))
                .map_err(|e| format!("append {seq} before the freeze: {e}"))?;
        }
        p.wait_acked(10_000).map_err(|e| e.to_string())?;
        let pid = backup.child.id().to_string();
        let stopped = Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .map_err(|e| format!("kill -STOP: {e}"))?;
        if !stopped.success() {
            return Err(format!("kill -STOP {pid}: {stopped}"));
        }
        let frozen = Instant::now();
        let r = p.append(&marker(10_001)).and_then(|s| p.wait_acked(s));
        let took = frozen.elapsed();
        let err = match r {
            Err(e) => e,
            Ok(()) => return Err("a frozen backup acknowledged an entry".into()),
        };
        eprintln!("  backup frozen → primary error after {took:.1?}: {err}");
        check_backup_loss(Loss::Frozen, &err, took, timeout)?;
        return Ok(());
    }

    if scenario == "killed" {
        let timeout = config().heartbeat_timeout;
        for seq in 1..=10_000u64 {
            payload(seq, &mut rng, &mut buf);
            p.append(&input(seq, &buf))
                .map_err(|e| format!("append {seq} before the kill: {e}"))?;
        }
        p.wait_acked(10_000).map_err(|e| e.to_string())?;
        backup.child.kill().map_err(|e| e.to_string())?;
        let killed = Instant::now();
        let _ = backup.child.wait();
        let mut seq = 10_000u64;
        let err = loop {
            seq += 1;
            let r = p.append(&marker(seq)).and_then(|s| p.wait_acked(s));
            if let Err(e) = r {
                break e;
            }
            if killed.elapsed() > timeout * 4 {
                return Err(format!(
                    "no error {:?} after the backup died",
                    killed.elapsed()
                ));
            }
        };
        let took = killed.elapsed();
        eprintln!("  backup killed → primary error after {took:.1?}: {err}");
        check_backup_loss(Loss::Killed, &err, took, timeout)?;
        return Ok(());
    }

    let mut last_acked = 0;
    let started = Instant::now();
    for seq in 1..=ENTRIES {
        payload(seq, &mut rng, &mut buf);
        let got = p
            .append(&input(seq, &buf))
            .map_err(|e| format!("append {seq}: {e}"))?;
        if got != seq {
            return Err(format!("append returned seq {got}, expected {seq}"));
        }
        let acked = p.acked();
        if acked < last_acked {
            return Err(format!("ACK went backwards: {last_acked} then {acked}"));
        }
        last_acked = acked;
        if seq % 64 == 0 {
            p.pump().map_err(|e| e.to_string())?;
        }
    }
    let mut seq = ENTRIES;
    seq += 1;
    let s = p.append(&marker(seq)).map_err(|e| e.to_string())?;
    p.wait_acked(s).map_err(|e| e.to_string())?;
    let streamed = started.elapsed();
    let pstats = p.stats();

    // Commit latency: an output marker, then wait for its ACK.
    let mut lat: Vec<u32> = Vec::with_capacity(COMMITS);
    for _ in 0..COMMITS {
        seq += 1;
        let t = Instant::now();
        let s = p.append(&marker(seq)).map_err(|e| e.to_string())?;
        p.wait_acked(s).map_err(|e| e.to_string())?;
        lat.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
        let acked = p.acked();
        if acked < last_acked {
            return Err(format!("ACK went backwards: {last_acked} then {acked}"));
        }
        last_acked = acked;
    }
    lat.sort_unstable();

    seq += 1;
    let end = Entry::new(Position::at_exit(seq), Event::Control(ControlOp::Shutdown));
    let end_seq = p.append(&end).map_err(|e| e.to_string())?;
    p.wait_acked(end_seq).map_err(|e| e.to_string())?;
    drop(p);
    let bstats = backup.expect("STATS ")?;
    let verdict = backup.next().ok_or("backup printed no verdict")?;
    let status = backup.child.wait().map_err(|e| e.to_string())?;
    if !status.success() || verdict != format!("VERIFIED {end_seq}") {
        return Err(format!("backup: {status}, said {verdict:?}"));
    }
    eprintln!(
        "  {ENTRIES} entries streamed and verified in {streamed:.2?}; {} frames, {} bytes, {} throttle events, {} medium-full",
        pstats.frames, pstats.bytes, pstats.throttle_events, pstats.medium_full
    );
    eprintln!(
        "  commit latency (marker + wait_acked) x{COMMITS}: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us, {} over 1 ms",
        f64::from(pct(&lat, 0.5)) / 1e3,
        f64::from(pct(&lat, 0.99)) / 1e3,
        f64::from(pct(&lat, 0.999)) / 1e3,
        f64::from(lat[lat.len() - 1]) / 1e3,
        lat.iter().filter(|&&l| l > 1_000_000).count()
    );
    eprintln!("  primary link: {}", stats_line(&stats));
    eprintln!("  backup link:  {bstats}");
    if scenario == "drop50" {
        let backup_dropped = bstats
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("test_dropped="))
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("no test_dropped in the backup's stats")?;
        let primary_dropped = DpdkStats::get(&stats.test_dropped);
        if primary_dropped == 0 || backup_dropped == 0 {
            return Err(format!(
                "drop counters: primary {primary_dropped}, backup {backup_dropped}; both must be > 0"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- test runner (parent)

/// Two CPUs this process may run on (from `Cpus_allowed_list`), for the two busy-polling EALs.
fn two_cpus() -> (String, String) {
    let list = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_default();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        let mut ends = part.splitn(2, '-').map(|n| n.trim().parse::<usize>().ok());
        match (ends.next().flatten(), ends.next()) {
            (Some(a), None) => cpus.push(a),
            (Some(a), Some(Some(b))) => cpus.extend(a..=b.min(a + 1)),
            _ => {}
        }
        if cpus.len() >= 2 {
            break;
        }
    }
    match cpus.as_slice() {
        [] => ("0".into(), "0".into()),
        [only] => (only.to_string(), only.to_string()),
        [a, b, ..] => (a.to_string(), b.to_string()),
    }
}

fn run_child(scenario: &str) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (a, b) = two_cpus();
    let status = Command::new(exe)
        .args(["primary", scenario, &a, &b])
        .status()
        .map_err(|e| format!("spawning primary: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("primary process: {status}"))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let role = args.get(1).map(String::as_str);
    if role == Some("backup") {
        let [_, _, scenario, socket, prefix, lcore] = args.as_slice() else {
            eprintln!("usage: dpdk_memif backup <scenario> <socket> <prefix> <lcore>");
            return ExitCode::FAILURE;
        };
        return match backup(scenario, socket, prefix, lcore) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("backup: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if role == Some("primary") {
        let [_, _, scenario, a, b] = args.as_slice() else {
            eprintln!("usage: dpdk_memif primary <scenario> <lcore> <lcore>");
            return ExitCode::FAILURE;
        };
        return match primary(scenario, (a, b)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("primary: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let tests = [
        ("million_entries", "plain"),
        ("million_entries_drop50", "drop50"),
        ("backup_killed", "killed"),
        ("backup_frozen", "frozen"),
    ];
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filter.as_ref().is_none_or(|f| name.contains(f.as_str())))
        .collect();
    println!("running {} tests", selected.len());
    let mut failed = 0;
    for (name, scenario) in selected {
        let t = Instant::now();
        match run_child(scenario) {
            Ok(()) => println!("test {name} ... ok ({:.2?})", t.elapsed()),
            Err(e) => {
                println!("test {name} ... FAILED ({:.2?}): {e}", t.elapsed());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
