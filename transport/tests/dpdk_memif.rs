//! The log channel over the DPDK medium between two real processes joined by `net_memif` (no
//! root, no hugepages) or by `net_af_packet` on the two ends of a veth pair (root). EAL can be
//! initialised once per process, so every test runs in a child (this binary re-executed as
//! `primary <medium> <scenario>`), which starts its backup as a grandchild
//! (`backup <medium> <scenario> <endpoint> <file prefix> <lcore>`). Each process has its own EAL
//! (built with `dpdk_sys::EalArgs`) with its own `--file-prefix`. memif: the socket lives in a
//! temporary directory; the backup is the memif server, the primary the client. af_packet: the
//! primary creates a veth pair with a unique name (`ftvN<pid>a`/`b`, removed afterwards), the
//! backup's port sits on `b`, the primary's on `a`.
//!
//! - `million_entries`: 1,000,000 entries of random sizes, every checksum verified by the
//!   backup in order, ACKs monotone; then 10,000 commits (output marker + `wait_acked`) timed.
//! - `million_entries_drop50`: the same with every 50th packet dropped in each direction;
//!   everything still arrives, in order, once, and the drop counters are > 0.
//! - `backup_killed`: the backup is killed mid-stream; the primary gets `PeerClosed` or
//!   `HeartbeatTimeout` within the heartbeat timeout.
//! - `backup_frozen`: the backup is stopped (SIGSTOP; its sockets stay open); the primary gets
//!   `HeartbeatTimeout` within the heartbeat timeout.
//! - `af_packet_million_entries`: `million_entries` over af_packet on a veth pair.
//! - `af_packet_garbage`: the million entries over af_packet while a thread injects 2,000 raw
//!   frames with our ethertype but garbage inside (random bytes, a wrong link tag, truncated
//!   headers, the wrong packet type) into the link, half towards each side, through AF_PACKET
//!   sockets of its own on the veth ends: the stream arrives intact and in order, and each
//!   side's `garbage` counter equals what was injected towards it (on a loaded machine the
//!   kernel may drop some frames on the way: then at least half, never more).
//! - `listener_strays`: the backup waits through the medium layer's `Listener` on its DPDK
//!   port (`Medium::Dpdk` with the port it opened); the primary first fires strays at the
//!   backup's TCP control address — a port probe, an HTTP request, a Hello of another protocol
//!   version, a primary with the wrong key (over its own port, which the failed handshake leaves
//!   in place), a connection that sends nothing and stays open — then dials for real with
//!   `medium::dial_primary`. The backup reports how many connections it refused (`REFUSED n`):
//!   exactly the five strays, none fatal; then entries flow, are acknowledged and verified.
//!
//! The af_packet tests need root (CAP_NET_RAW + CAP_NET_ADMIN, `ip` from iproute2); without
//! root they say so and are skipped.
//!
//! Custom harness (`harness = false`). Needs `--features dpdk`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use dpdk_sys::{EalArgs, MemifRole, Mempool, Port};
mod common;

use common::stream::{
    check_acked, check_backup_loss, check_verdict, commit, end_stream, lose_backup, send_stream,
    verify_stream, Loss,
};
use transport::dpdk::{self, DpdkConfig, DpdkStats};
use transport::medium::{self, DpdkDevice, DpdkPortSlot, Listener, Medium};
use transport::{ChannelConfig, ChannelError, PreSharedKey};

const ENTRIES: u64 = 1_000_000;
const COMMITS: usize = 10_000;
/// Child protocol lines on stdout start with this (DPDK may print to stdout too).
const TAG: &str = "FTVM ";
/// Entries `listener_strays` streams once the real primary is through.
const STRAY_ENTRIES: u64 = 20_000;
/// The listening backup's handshake timeout in `listener_strays`: how long it gives the silent
/// stray (the real primary, queued behind it, allows itself the default 5 s).
const STRAY_HANDSHAKE: Duration = Duration::from_millis(400);

fn config(scenario: &str) -> ChannelConfig {
    let key = PreSharedKey::new(b"dpdk-memif-test-key!".to_vec()).expect("key");
    let mut c = ChannelConfig::new(0xD9D4, 1, key);
    c.heartbeat_interval = Duration::from_millis(10);
    // The tests that lose the backup check detection within 300 ms. The streaming tests get
    // 3 s: on this 2-core machine shared with other jobs (builds, a TCG guest), two
    // busy-polling debug-build processes were not heard from for 300 ms now and then.
    let lose = matches!(scenario, "killed" | "frozen");
    c.heartbeat_timeout = Duration::from_millis(if lose { 300 } else { 3000 });
    c.poll = transport::PollPolicy::BALANCED;
    c
}

fn dpdk_config(medium: &str, scenario: &str) -> DpdkConfig {
    DpdkConfig {
        drop_every: (scenario == "drop50").then_some(50),
        // af_packet: at most 64 packets in flight, well inside the kernel's receive ring of
        // each socket (512 frames), so a slow (debug-build) side loses no frames there and the
        // garbage counts stay exact.
        window: if medium == "afpacket" { 64 } else { 256 },
        ..DpdkConfig::default()
    }
}

/// Initialises this process's EAL with one port on `endpoint` (`memif`: the socket path, this
/// side being the memif server if `server`; `afpacket`: the interface) and returns the started
/// port.
fn eal_port(
    medium: &str,
    server: bool,
    endpoint: &str,
    prefix: &str,
    lcore: &str,
) -> Result<(Port, PathBuf), String> {
    let lcore: u32 = lcore.parse().map_err(|e| format!("lcore {lcore:?}: {e}"))?;
    let args = match medium {
        "memif" => {
            let role = if server {
                MemifRole::Server
            } else {
                MemifRole::Client
            };
            EalArgs::memif(role, Path::new(endpoint), prefix, lcore)
        }
        "afpacket" => EalArgs::af_packet(endpoint, prefix, lcore),
        other => return Err(format!("unknown medium {other:?}")),
    };
    let eal = args.init().map_err(|e| format!("Eal::init({args}): {e}"))?;
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
        "tx={} rx={} retransmits={} timeouts={} nacks={} test_dropped={} garbage={} duplicates={} out_of_order={} backlogged={} tx_full={} foreign={}",
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
        g(&s.foreign),
    )
}

// ---------------------------------------------------------------- backup role (grandchild)

fn backup(
    medium: &str,
    scenario: &str,
    endpoint: &str,
    prefix: &str,
    lcore: &str,
) -> Result<(), String> {
    let (port, runtime_dir) = eal_port(medium, true, endpoint, prefix, lcore)?;
    println!("{TAG}RUNTIME_DIR {}", runtime_dir.display());
    if scenario == "strays" {
        let verified = backup_behind_listener(medium, port);
        let _ = std::fs::remove_dir_all(&runtime_dir);
        return verified;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    println!(
        "{TAG}LISTENING {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let dcfg = dpdk_config(medium, scenario);
    let stats = dcfg.stats.clone();
    let b = dpdk::accept(&listener, port, config(scenario), dcfg).map_err(|e| e.to_string())?;
    let verified = verify_stream(b);
    println!("{TAG}STATS {}", stats_line(&stats));
    let n = verified?;
    println!("{TAG}VERIFIED {n}");
    // The EAL was cleaned up with the last handle (the port, inside the channel).
    let _ = std::fs::remove_dir_all(&runtime_dir);
    Ok(())
}

/// The backup of `listener_strays`: waits for the primary through the medium layer's
/// [`Listener`] on `port`, says how many connections it refused before the real one, then
/// checks the stream.
fn backup_behind_listener(medium: &str, port: Port) -> Result<(), String> {
    let tuning = dpdk_config(medium, "strays");
    let stats = tuning.stats.clone();
    let m = Medium::Dpdk {
        addr: "127.0.0.1:0".into(),
        device: DpdkDevice {
            tuning,
            opened: Some(DpdkPortSlot::new(port)),
            ..DpdkDevice::default()
        },
    };
    let mut listener = Listener::bind(&m).map_err(|e| format!("binding the listener: {e}"))?;
    println!("{TAG}LISTENING {}", listener.local_addr());
    let mut cfg = config("strays");
    cfg.handshake_timeout = STRAY_HANDSHAKE;
    let b = listener
        .backup(cfg)
        .map_err(|e| format!("the listener gave up: {e}"))?;
    println!("{TAG}REFUSED {}", listener.refused());
    let verified = verify_stream(b);
    println!("{TAG}STATS {}", stats_line(&stats));
    let n = verified?;
    println!("{TAG}VERIFIED {n}");
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

fn spawn_backup(
    medium: &str,
    scenario: &str,
    endpoint: &str,
    prefix: &str,
    lcore: &str,
) -> Result<(BackupProcess, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["backup", medium, scenario, endpoint, prefix, lcore])
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

fn pct(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// A veth pair with a name unique to this process, up, IPv6 off; removed on drop.
struct Veth {
    a: String,
    b: String,
}

impl Veth {
    fn new() -> Result<Veth, String> {
        let n = std::process::id() % 1_000_000;
        let v = Veth {
            a: format!("ftvN{n}a"),
            b: format!("ftvN{n}b"),
        };
        ip(&["link", "add", &v.a, "type", "veth", "peer", "name", &v.b])?;
        for i in [&v.a, &v.b] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{i}/disable_ipv6"), "1");
            ip(&["link", "set", i, "up"])?;
        }
        Ok(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // Deleting one end deletes the pair.
        let _ = ip(&["link", "del", &self.a]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip {}: {e} (iproute2 installed?)", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn primary(medium: &str, scenario: &str, lcores: (&str, &str)) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("ftvm-dpdk-memif-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let (veth, primary_end, backup_end) = match medium {
        "afpacket" => {
            let v = Veth::new()?;
            let (a, b) = (v.a.clone(), v.b.clone());
            (Some(v), a, b)
        }
        _ => {
            let socket = dir.path().join("memif.sock").display().to_string();
            (None, socket.clone(), socket)
        }
    };
    let id = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    let (mut backup, addr) =
        spawn_backup(medium, scenario, &backup_end, &format!("fb{id}"), lcores.1)?;
    let (port, runtime_dir) = eal_port(medium, false, &primary_end, &format!("fp{id}"), lcores.0)?;
    let injector = match (&veth, scenario) {
        (Some(v), "garbage") => Some(garbage::Injector::start(&v.a, &v.b)?),
        _ => None,
    };
    let result = run_primary(medium, scenario, port, &addr, &mut backup, injector);
    if result.is_err() {
        if let Some(line) = backup.next() {
            eprintln!("  backup said: {line}");
        }
    }
    let _ = std::fs::remove_dir_all(&runtime_dir);
    drop(backup);
    drop(veth);
    result
}

fn stat_of(line: &str, name: &str) -> Result<u64, String> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| format!("no {name} in {line:?}"))
}

fn run_primary(
    medium: &str,
    scenario: &str,
    port: Port,
    addr: &str,
    backup: &mut BackupProcess,
    injector: Option<garbage::Injector>,
) -> Result<(), String> {
    if scenario == "strays" {
        return run_primary_after_strays(medium, port, addr, backup);
    }
    let dcfg = dpdk_config(medium, scenario);
    let stats = dcfg.stats.clone();
    let connected = Instant::now();
    let mut p =
        dpdk::connect(addr, port, config(scenario), dcfg).map_err(|e| format!("connect: {e}"))?;
    eprintln!("  connected in {:.1?}", connected.elapsed());
    let injecting = injector.map(garbage::Injector::go);

    if scenario == "frozen" || scenario == "killed" {
        // SIGSTOP leaves the backup's process, control socket and memif in place: only the
        // silence tells. SIGKILL closes the control socket too.
        let loss = match scenario {
            "frozen" => Loss::Frozen,
            _ => Loss::Killed,
        };
        let timeout = config(scenario).heartbeat_timeout;
        let (err, took) = lose_backup(&mut p, &mut backup.child, loss, timeout)?;
        eprintln!("  backup {loss:?} → primary error after {took:.1?}: {err}");
        return check_backup_loss(loss, &err, took, timeout);
    }

    let started = Instant::now();
    let mut last_acked = send_stream(&mut p, ENTRIES, 0x5EED, |p| {
        format!(" (link: {}; channel: {:?})", stats_line(&stats), p.stats())
    })?;
    let mut seq = ENTRIES + 1;
    commit(&mut p, seq)?;
    let streamed = started.elapsed();
    // Every garbage frame is out before the end of the stream: the counters below are final.
    let injected = match injecting {
        Some(handle) => Some(
            handle
                .join()
                .map_err(|_| "the injector thread panicked".to_string())??,
        ),
        None => None,
    };
    let pstats = p.stats();

    // Commit latency: an output marker, then wait for its ACK.
    let mut lat: Vec<u32> = Vec::with_capacity(COMMITS);
    for _ in 0..COMMITS {
        seq += 1;
        let t = Instant::now();
        commit(&mut p, seq)?;
        lat.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
        last_acked = check_acked(&p, last_acked)?;
    }
    lat.sort_unstable();

    let end_seq = end_stream(&mut p, seq + 1)?;
    drop(p);
    let bstats = backup.expect("STATS ")?;
    let verdict = backup.next();
    let status = backup.child.wait().map_err(|e| e.to_string())?;
    check_verdict(verdict, status, end_seq)?;
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
    if let Some(sent) = injected {
        let to_backup = stat_of(&bstats, "garbage")?;
        let to_primary = DpdkStats::get(&stats.garbage);
        eprintln!(
            "  garbage injected: {} towards the backup (counted {to_backup}), {} towards the primary (counted {to_primary})",
            sent.to_backup, sent.to_primary
        );
        // Exact on a quiet machine. The kernel may drop frames on the way (a busy-polling
        // side descheduled on a loaded machine: retransmits show it), garbage among them, so
        // only what was injected can be counted, and most of it must be.
        let counted = |got: u64, sent: u64| got <= sent && got >= sent / 2;
        if !counted(to_backup, sent.to_backup) || !counted(to_primary, sent.to_primary) {
            return Err(format!(
                "garbage counters: backup {to_backup} of {} injected, primary {to_primary} of {}",
                sent.to_backup, sent.to_primary
            ));
        }
    }
    if scenario == "drop50" {
        let backup_dropped = stat_of(&bstats, "test_dropped")?;
        let primary_dropped = DpdkStats::get(&stats.test_dropped);
        if primary_dropped == 0 || backup_dropped == 0 {
            return Err(format!(
                "drop counters: primary {primary_dropped}, backup {backup_dropped}; both must be > 0"
            ));
        }
    }
    Ok(())
}

/// A Hello of protocol version 99 for our session (layout in `transport::handshake`).
fn foreign_hello() -> [u8; 64] {
    let mut h = [0u8; 64];
    h[..4].copy_from_slice(b"FTHS");
    h[4] = 1;
    h[5] = 1;
    h[6..8].copy_from_slice(&99u16.to_le_bytes());
    h[8..16].copy_from_slice(&0xD9D4u64.to_le_bytes());
    h
}

/// Fires every kind of stray at the backup's control address `addr`, one after another: a port
/// probe, an HTTP request, a Hello of another protocol version, a primary with the wrong key
/// (set up over `port`, which its failed handshake must leave in place), and last a connection
/// that sends nothing. Returns how many, the port, and the silent connection (kept open by the
/// caller while the real primary connects behind it).
fn strays(medium: &str, addr: &str, port: Port) -> Result<(u64, Port, TcpStream), String> {
    let open =
        || TcpStream::connect(addr).map_err(|e| format!("a stray connecting to {addr}: {e}"));
    // A port probe: connect and close.
    drop(open()?);
    // The backup may hang up on the next two before they finish writing: that is fine.
    let mut http = open()?;
    let _ = http.write_all(b"GET / HTTP/1.1\r\nHost: ftvm\r\n\r\n");
    drop(http);
    let mut foreign = open()?;
    let _ = foreign.write_all(&foreign_hello());
    drop(foreign);
    // The real protocol with the wrong key: the handshake with the backup fails both ways.
    let key = PreSharedKey::new(b"some-other-key-entirely".to_vec()).map_err(|e| e.to_string())?;
    let mut slot = Some(port);
    let wrong = ChannelConfig::new(0xD9D4, 1, key);
    match dpdk::primary_on(open()?, &mut slot, wrong, dpdk_config(medium, "strays")) {
        Err(ChannelError::PeerNotAuthenticated | ChannelError::AuthRejected) => {}
        Err(e) => return Err(format!("the wrong key gave an unexpected error: {e}")),
        Ok(_) => return Err("a primary with the wrong key was let in".into()),
    }
    let port = slot.ok_or("the failed handshake used up the primary's port")?;
    // A connection that sends nothing: the backup gives up on it after its handshake timeout,
    // which the real primary's success behind it shows.
    Ok((5, port, open()?))
}

/// The primary of `listener_strays`: strays first, then the real set-up through the medium
/// layer, the backup's count of refusals, and a stream that must be acknowledged and verified.
fn run_primary_after_strays(
    medium: &str,
    port: Port,
    addr: &str,
    backup: &mut BackupProcess,
) -> Result<(), String> {
    let (fired, port, silent) = strays(medium, addr, port)?;
    let tuning = dpdk_config(medium, "strays");
    let stats = tuning.stats.clone();
    let m = Medium::Dpdk {
        addr: addr.into(),
        device: DpdkDevice {
            tuning,
            opened: Some(DpdkPortSlot::new(port)),
            ..DpdkDevice::default()
        },
    };
    let connected = Instant::now();
    let mut p = medium::dial_primary(&m, config("strays"))
        .map_err(|e| format!("the real primary, after {fired} strays: {e}"))?;
    eprintln!(
        "  connected behind {fired} strays in {:.1?}",
        connected.elapsed()
    );
    drop(silent);
    let refused = backup.expect("REFUSED ")?;
    if refused != fired.to_string() {
        return Err(format!(
            "the backup refused {refused} connections; {fired} strays were fired at it"
        ));
    }
    let mut last_acked = send_stream(&mut p, STRAY_ENTRIES, 0x57A7, |p| {
        format!(" (link: {}; channel: {:?})", stats_line(&stats), p.stats())
    })?;
    let seq = commit(&mut p, STRAY_ENTRIES + 1)?;
    last_acked = check_acked(&p, last_acked)?;
    if last_acked < seq {
        return Err(format!("commit {seq} returned with ACK {last_acked}"));
    }
    let end_seq = end_stream(&mut p, STRAY_ENTRIES + 2)?;
    drop(p);
    let bstats = backup.expect("STATS ")?;
    let verdict = backup.next();
    let status = backup.child.wait().map_err(|e| e.to_string())?;
    check_verdict(verdict, status, end_seq)?;
    eprintln!("  {STRAY_ENTRIES} entries acknowledged and verified after the strays");
    eprintln!("  primary link: {}", stats_line(&stats));
    eprintln!("  backup link:  {bstats}");
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

fn run_child(medium: &str, scenario: &str) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (a, b) = two_cpus();
    let status = Command::new(exe)
        .args(["primary", medium, scenario, &a, &b])
        .status()
        .map_err(|e| format!("spawning primary: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("primary process: {status}"))
    }
}

/// libtest-mimic's arguments (`--list`, filters, `--ignored`, ...), one test at a time unless
/// `--test-threads` says otherwise: each test runs two processes that pin or spin on the
/// machine's cores.
fn harness_args() -> libtest_mimic::Arguments {
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = args.test_threads.or(Some(1));
    args
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let role = args.get(1).map(String::as_str);
    if role == Some("backup") {
        let [_, _, medium, scenario, endpoint, prefix, lcore] = args.as_slice() else {
            eprintln!("usage: dpdk_memif backup <medium> <scenario> <endpoint> <prefix> <lcore>");
            return ExitCode::FAILURE;
        };
        return match backup(medium, scenario, endpoint, prefix, lcore) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("backup: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if role == Some("primary") {
        let [_, _, medium, scenario, a, b] = args.as_slice() else {
            eprintln!("usage: dpdk_memif primary <medium> <scenario> <lcore> <lcore>");
            return ExitCode::FAILURE;
        };
        return match primary(medium, scenario, (a, b)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("primary: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let tests = [
        ("million_entries", "memif", "plain"),
        ("million_entries_drop50", "memif", "drop50"),
        ("backup_killed", "memif", "killed"),
        ("backup_frozen", "memif", "frozen"),
        ("af_packet_million_entries", "afpacket", "plain"),
        ("af_packet_garbage", "afpacket", "garbage"),
        ("listener_strays", "memif", "strays"),
    ];
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let trials = tests
        .into_iter()
        .map(|(name, medium, scenario)| {
            let trial = libtest_mimic::Trial::test(name, move || {
                run_child(medium, scenario).map_err(Into::into)
            });
            if medium == "afpacket" && !root {
                // Cannot run here: reported as ignored, never as passed.
                trial.with_kind("needs root").with_ignored_flag(true)
            } else {
                trial
            }
        })
        .collect();
    libtest_mimic::run(&harness_args(), trials).exit_code()
}

// ---------------------------------------------------------------- garbage injection

mod garbage {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    /// Frames injected in each direction.
    const PER_SIDE: u64 = 1_000;

    /// What was injected.
    #[derive(Debug, Clone, Copy)]
    pub struct Sent {
        pub to_backup: u64,
        pub to_primary: u64,
    }

    /// A raw AF_PACKET socket bound to one interface, for sending.
    struct RawSocket {
        fd: OwnedFd,
    }

    impl RawSocket {
        fn bind(iface: &str) -> Result<RawSocket, String> {
            let name = std::ffi::CString::new(iface).map_err(|e| e.to_string())?;
            // SAFETY: name is NUL-terminated.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if index == 0 {
                return Err(format!(
                    "if_nametoindex({iface}): {}",
                    std::io::Error::last_os_error()
                ));
            }
            // Protocol 0: this socket only sends, it receives nothing.
            // SAFETY: plain socket(2) call.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            if raw < 0 {
                return Err(format!(
                    "AF_PACKET socket: {} (needs CAP_NET_RAW)",
                    std::io::Error::last_os_error()
                ));
            }
            // SAFETY: raw is a new, valid descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = index as i32;
            // SAFETY: addr is a valid sockaddr_ll of the size passed.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if r != 0 {
                return Err(format!(
                    "bind to {iface}: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(RawSocket { fd })
        }

        fn send(&self, frame: &[u8]) -> Result<(), String> {
            // SAFETY: frame is a valid buffer of the length passed.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n < 0 || n as usize != frame.len() {
                return Err(format!("send: {}", std::io::Error::last_os_error()));
            }
            Ok(())
        }
    }

    fn mac_of(iface: &str) -> Result<[u8; 6], String> {
        let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
            .map_err(|e| format!("MAC of {iface}: {e}"))?;
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = text.trim().split(':').collect();
        if parts.len() != 6 {
            return Err(format!("MAC of {iface}: {text:?}"));
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = u8::from_str_radix(p, 16).map_err(|e| format!("MAC of {iface}: {e}"))?;
        }
        Ok(mac)
    }

    /// Sends garbage with our ethertype into both ends of the veth pair: frames sent on the
    /// primary's end `a` arrive at the backup's port on `b`, and the other way round.
    pub struct Injector {
        a: RawSocket,
        b: RawSocket,
        mac_a: [u8; 6],
        mac_b: [u8; 6],
    }

    impl Injector {
        pub fn start(a: &str, b: &str) -> Result<Injector, String> {
            Ok(Injector {
                a: RawSocket::bind(a)?,
                b: RawSocket::bind(b)?,
                mac_a: mac_of(a)?,
                mac_b: mac_of(b)?,
            })
        }

        /// Injects [`PER_SIDE`] frames each way, spread over the first part of the run.
        pub fn go(self) -> JoinHandle<Result<Sent, String>> {
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(0x6A5B);
                let mut sent = Sent {
                    to_backup: 0,
                    to_primary: 0,
                };
                for i in 0..2 * PER_SIDE {
                    let to_backup = i % 2 == 0;
                    let (sock, dst, src) = if to_backup {
                        (&self.a, self.mac_b, self.mac_a)
                    } else {
                        (&self.b, self.mac_a, self.mac_b)
                    };
                    let mut f = Vec::with_capacity(128);
                    f.extend_from_slice(&dst);
                    f.extend_from_slice(&src);
                    f.extend_from_slice(&dpdk_sys::ETHERTYPE_FTVM.to_be_bytes());
                    match i % 4 {
                        // Random bytes.
                        0 | 1 => {
                            let len = rng.gen_range(0..120);
                            f.extend((0..len).map(|_| rng.gen::<u8>()));
                        }
                        // Our magic and version, a DATA or ACK type, a made-up link tag.
                        2 => {
                            f.extend_from_slice(b"FL");
                            f.push(1);
                            f.push(rng.gen_range(1..=3));
                            f.extend_from_slice(&rng.gen::<u32>().to_le_bytes());
                            f.extend_from_slice(&rng.gen::<u64>().to_le_bytes());
                            f.extend((0..rng.gen_range(0..64)).map(|_| rng.gen::<u8>()));
                        }
                        // A header cut short.
                        _ => {
                            f.extend_from_slice(b"FL");
                            f.push(1);
                            f.push(1);
                            f.extend((0..rng.gen_range(0..12)).map(|_| rng.gen::<u8>()));
                        }
                    }
                    sock.send(&f)?;
                    if to_backup {
                        sent.to_backup += 1;
                    } else {
                        sent.to_primary += 1;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Ok(sent)
            })
        }
    }
}
