//! Two processes share one ring in a `/dev/shm` file: this process produces, a child process
//! (this same test binary, re-executed with `consume <path> <count>`) consumes and verifies.
//!
//! Custom harness (`harness = false`) so the child role is a plain command line, not a test that
//! silently passes when run on its own.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use transport::ring::{self, Consumer, Producer, RingError};
use transport::{PollPolicy, SharedRegion};

const CAPACITY: usize = 1 << 16;
const RECORDS: u64 = 1_000_000;

/// Record `i`: its index, its length-dependent body, and a CRC32C of both.
fn fill_record(i: u64, buf: &mut [u8]) {
    buf[..8].copy_from_slice(&i.to_le_bytes());
    let body_end = buf.len() - 4;
    for (j, b) in buf[8..body_end].iter_mut().enumerate() {
        *b = (i as usize ^ j) as u8;
    }
    let crc = crc32c::crc32c(&buf[..body_end]);
    buf[body_end..].copy_from_slice(&crc.to_le_bytes());
}

fn record_len(i: u64) -> usize {
    // Sizes from 12 to 1035 bytes, varying pseudo-randomly.
    12 + (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize
}

fn produce(path: &std::path::Path, count: u64) -> Result<(), String> {
    let region =
        SharedRegion::create(path, ring::region_len(CAPACITY)).map_err(|e| e.to_string())?;
    ring::format(&region, CAPACITY).map_err(|e| e.to_string())?;
    let mut producer = Producer::attach(&region).map_err(|e| e.to_string())?;

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("consume")
        .arg(path)
        .arg(count.to_string())
        .spawn()
        .map_err(|e| format!("spawning consumer: {e}"))?;

    let started = Instant::now();
    let mut poller = PollPolicy::BALANCED.poller();
    for i in 0..count {
        loop {
            match producer.try_reserve(record_len(i)) {
                Ok(buf) => {
                    fill_record(i, buf);
                    if i % 8 == 7 {
                        producer.commit();
                    }
                    poller.reset();
                    break;
                }
                Err(RingError::Full { .. }) => {
                    producer.commit();
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!("consumer exited early: {status}"));
                    }
                    poller.wait();
                }
                Err(e) => return Err(format!("producer: {e}")),
            }
        }
    }
    producer.commit();
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("consumer failed: {status}"));
    }
    if !producer.is_drained() {
        return Err("consumer exited before releasing every record".into());
    }
    eprintln!(
        "ring_two_process: {count} records through {CAPACITY}-byte shared ring in {:?}",
        started.elapsed()
    );
    Ok(())
}

fn consume(path: &str, count: u64) -> Result<(), String> {
    let region = SharedRegion::open(path).map_err(|e| e.to_string())?;
    let mut consumer = Consumer::attach(&region).map_err(|e| e.to_string())?;
    let mut next = 0u64;
    let mut failure = None;
    let mut poller = PollPolicy::BALANCED.poller();
    let deadline = Instant::now() + Duration::from_secs(120);
    while next < count {
        let got = consumer
            .consume(64, |rec| {
                if failure.is_some() {
                    return;
                }
                let body_end = rec.len().saturating_sub(4);
                let index = rec
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
                let crc = rec
                    .get(body_end..)
                    .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
                if index != Some(next) {
                    failure = Some(format!("record {next}: found index {index:?}"));
                } else if rec.len() != record_len(next) {
                    failure = Some(format!("record {next}: length {}", rec.len()));
                } else if crc != Some(crc32c::crc32c(&rec[..body_end])) {
                    failure = Some(format!("record {next}: checksum mismatch"));
                }
                next += 1;
            })
            .map_err(|e| e.to_string())?;
        if let Some(f) = failure {
            return Err(f);
        }
        if got == 0 {
            if Instant::now() > deadline {
                return Err(format!("timed out after {next} records"));
            }
            poller.wait();
        } else {
            poller.reset();
        }
    }
    if consumer.has_records().map_err(|e| e.to_string())? {
        return Err("records beyond the expected count".into());
    }
    Ok(())
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
    // The child role (re-exec'd by `produce`) is decided before libtest-mimic sees argv.
    if args.get(1).map(String::as_str) == Some("consume") {
        let result = match (args.get(2), args.get(3).and_then(|n| n.parse().ok())) {
            (Some(path), Some(count)) => consume(path, count),
            _ => Err("usage: ring_two_process consume <path> <count>".into()),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ring_two_process consumer FAILED: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let trials = vec![libtest_mimic::Trial::test("ring_two_process", || {
        let path = std::path::PathBuf::from("/dev/shm")
            .join(format!("ftvm-ring-test-{}", std::process::id()));
        produce(&path, RECORDS).map_err(Into::into)
    })];
    libtest_mimic::run(&harness_args(), trials).exit_code()
}
