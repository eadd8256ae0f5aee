//! The log channel between two real processes, over each medium: this process is the primary,
//! a child process (this binary re-executed as `backup <medium> <address>`) is the backup.
//!
//! - a million entries of random sizes, every checksum verified by the backup, ACKs monotone,
//!   nothing lost or duplicated;
//! - the backup killed mid-stream: the primary gets a clear error within the heartbeat timeout.
//!
//! Custom harness (`harness = false`) so the backup role is a plain command line.

use std::process::ExitCode;
use std::time::{Duration, Instant};

mod common;

use common::stream::{
    self, check_backup_loss, check_verdict, commit, end_stream, lose_backup, send_stream,
    verify_stream, BackupProcess, Loss,
};
use transport::medium::{self, Listener, Medium};
use transport::{AnyPrimary, ChannelConfig, ChannelError, PreSharedKey};

const ENTRIES: u64 = 1_000_000;

fn config() -> ChannelConfig {
    let key = PreSharedKey::new(b"two-process-test-key".to_vec()).expect("key");
    let mut c = ChannelConfig::new(0xF7, 1, key);
    c.heartbeat_interval = Duration::from_millis(10);
    c.heartbeat_timeout = Duration::from_millis(300);
    // Two processes on two cores plus the test harness: do not spin for long.
    c.poll = transport::PollPolicy::BALANCED;
    c
}

// ---------------------------------------------------------------- backup role (child process)

/// `medium` is `tcp`, `tcp-blocking` or `shm`; `address` the set-up address. The child builds
/// its medium description and listens through `transport::medium`, as `ftvm backup` does.
fn backup(medium: &str, address: &str) -> Result<(), String> {
    let mut cfg = config();
    // The tests time the primary's detection of a lost backup; the backup's own patience with
    // a silent primary only has to outlast a stall of this shared host.
    cfg.heartbeat_timeout = INTEGRITY_TIMEOUT;
    cfg.blocking = medium == "tcp-blocking";
    let mut listener = Listener::bind(&describe(medium, address)?).map_err(|e| e.to_string())?;
    println!("LISTENING {}", listener.local_addr());
    let b = listener.backup(cfg).map_err(|e| e.to_string())?;
    verified(verify_stream(b))
}

/// The medium description of one of this test's media.
fn describe(medium: &str, address: &str) -> Result<Medium, String> {
    match medium {
        "tcp" | "tcp-blocking" => format!("tcp:{address}"),
        "shm" => format!("shm:{address}"),
        other => return Err(format!("unknown medium {other}")),
    }
    .parse()
    .map_err(|e: ChannelError| e.to_string())
}

fn verified(result: Result<u64, String>) -> Result<(), String> {
    println!("VERIFIED {}", result?);
    Ok(())
}

// ---------------------------------------------------------------- primary role (this process)

fn spawn_backup(medium: &str, address: &str) -> Result<(BackupProcess, String), String> {
    stream::spawn_backup(&["backup", medium, address])
}

/// The primary's end over `medium`, dialing the backup at `addr`.
fn connect(medium: &str, addr: &str) -> Result<AnyPrimary, String> {
    connect_with(medium, addr, config().heartbeat_timeout)
}

/// The heartbeat timeout of the million-entry runs, which test integrity, not detection: CI
/// saw a 300 ms timeout trip after 1.3 s of silence on the loaded 2-core host (the primary
/// itself had not run its check for a second).
const INTEGRITY_TIMEOUT: Duration = Duration::from_secs(5);

fn connect_with(medium: &str, addr: &str, timeout: Duration) -> Result<AnyPrimary, String> {
    let mut cfg = config();
    cfg.heartbeat_timeout = timeout;
    cfg.blocking = medium == "tcp-blocking";
    medium::dial_primary(&describe(medium, addr)?, cfg).map_err(|e| e.to_string())
}

fn address_for(medium: &str) -> String {
    match medium {
        "shm" => std::env::temp_dir()
            .join(format!(
                "ftvm-chan-{}-{}.sock",
                std::process::id(),
                rand::random::<u32>()
            ))
            .display()
            .to_string(),
        _ => "127.0.0.1:0".to_string(),
    }
}

fn million_entries(medium: &str) -> Result<(), String> {
    let (mut backup, addr) = spawn_backup(medium, &address_for(medium))?;
    let mut p = connect_with(medium, &addr, INTEGRITY_TIMEOUT)?;
    let started = Instant::now();
    send_stream(&mut p, ENTRIES, 0x5EED, |_| String::new())?;
    commit(&mut p, ENTRIES + 1)?;
    let end_seq = end_stream(&mut p, ENTRIES + 2)?;
    let stats = p.stats();
    drop(p);
    let verdict = backup.lines.next().and_then(Result::ok);
    let status = backup.child.wait().map_err(|e| e.to_string())?;
    check_verdict(verdict, status, end_seq)?;
    eprintln!(
        "  {medium}: {end_seq} entries verified in {:.2?}; {} frames, {} bytes, {} throttle events",
        started.elapsed(),
        stats.frames,
        stats.bytes,
        stats.throttle_events
    );
    Ok(())
}

/// A backup taken away after 10,000 entries: SIGKILLed (the primary sees the hang-up or the
/// silence), or SIGSTOPped (alive, socket open, silent: only the heartbeat timeout can tell).
fn backup_lost(medium: &str, loss: Loss) -> Result<(), String> {
    let (mut backup, addr) = spawn_backup(medium, &address_for(medium))?;
    let mut p = connect(medium, &addr)?;
    let timeout = config().heartbeat_timeout;
    let (err, took) = lose_backup(&mut p, &mut backup.child, loss, timeout)?;
    eprintln!("  {medium}: backup {loss:?} → primary error after {took:.1?}: {err}");
    check_backup_loss(loss, &err, took, timeout)
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
    if args.get(1).map(String::as_str) == Some("backup") {
        let (Some(medium), Some(addr)) = (args.get(2), args.get(3)) else {
            eprintln!("usage: channel_two_process backup <medium> <address>");
            return ExitCode::FAILURE;
        };
        return match backup(medium, addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("backup: {e}");
                ExitCode::FAILURE
            }
        };
    }
    type Test = Box<dyn Fn() -> Result<(), String> + Send>;
    let tests: Vec<(String, Test)> = vec![
        (
            "million_entries_tcp_spin".into(),
            Box::new(|| million_entries("tcp")),
        ),
        (
            "million_entries_tcp_blocking".into(),
            Box::new(|| million_entries("tcp-blocking")),
        ),
        (
            "million_entries_shm".into(),
            Box::new(|| million_entries("shm")),
        ),
        (
            "backup_killed_tcp".into(),
            Box::new(|| backup_lost("tcp", Loss::Killed)),
        ),
        (
            "backup_killed_shm".into(),
            Box::new(|| backup_lost("shm", Loss::Killed)),
        ),
        (
            "backup_frozen_tcp".into(),
            Box::new(|| backup_lost("tcp", Loss::Frozen)),
        ),
        (
            "backup_frozen_shm".into(),
            Box::new(|| backup_lost("shm", Loss::Frozen)),
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, test)| libtest_mimic::Trial::test(name, move || test().map_err(Into::into)))
        .collect();
    libtest_mimic::run(&harness_args(), trials).exit_code()
}
