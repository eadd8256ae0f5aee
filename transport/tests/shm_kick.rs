//! The primary's kick over shared memory ([`transport::kick`]): a backup whose channel thread
//! is blocked (as a vCPU thread is inside `KVM_RUN`) acknowledges only once the primary kicks
//! it, and a kick reaches that thread, not another; an ACK helper thread acknowledges while
//! the backup's own thread does not pump at all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logfmt::{Entry, Event, Position};
use transport::shm::{ShmBackupLink, ShmPrimaryLink};
use transport::{shm, Backup, ChannelConfig, PreSharedKey, Primary};

const KEY: &[u8] = b"kick-tests-shared-key-0123";

fn config() -> ChannelConfig {
    let mut c = ChannelConfig::new(0x4b, 1, PreSharedKey::new(KEY.to_vec()).expect("key"));
    c.heartbeat_timeout = Duration::from_secs(5);
    c.heartbeat_interval = Duration::from_millis(50);
    c
}

type Ready = std::sync::mpsc::Sender<()>;

/// A primary connected to a backup whose thread runs `backup` (which says when it is ready),
/// once it is ready; the directory holds the set-up socket.
fn pair(
    backup: impl FnOnce(Backup<ShmBackupLink>, Ready) -> Result<u64, String> + Send + 'static,
) -> (
    Primary<ShmPrimaryLink>,
    std::thread::JoinHandle<Result<u64, String>>,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("pair.sock");
    let l = shm::listen(&sock).expect("listen");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let b = shm::accept(&l, config()).map_err(|e| e.to_string())?;
        backup(b, ready_tx)
    });
    let p = shm::connect(&sock, config()).expect("connect");
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("backup ready");
    (p, thread, dir)
}

/// Appends a 64-byte input at exit `at` and sends it; its sequence number.
fn send_input(p: &mut Primary<ShmPrimaryLink>, at: u64) -> u64 {
    let data = [at as u8; 64];
    let seq = p
        .append(&Entry::new(
            Position::at_exit(at),
            Event::DeviceInput {
                device: 0,
                data: &data,
            },
        ))
        .expect("append");
    p.flush().expect("flush");
    p.pump().expect("pump");
    seq
}

#[test]
fn a_blocked_backup_acknowledges_when_kicked() {
    let stop = Arc::new(AtomicBool::new(false));
    let wakeups = Arc::new(AtomicU64::new(0));
    let (mut p, backup, _dir) = {
        let (stop, wakeups) = (stop.clone(), wakeups.clone());
        pair(move |mut b, ready| {
            if !b.enable_kicks() {
                return Err("shared memory refused kicks".into());
            }
            ready.send(()).map_err(|e| e.to_string())?;
            while !stop.load(Ordering::SeqCst) {
                // Stands in for KVM_RUN: returns only when a signal's handler ran.
                // SAFETY: pause(2) has no arguments and touches no memory.
                unsafe { libc::pause() };
                wakeups.fetch_add(1, Ordering::SeqCst);
                b.pump().map_err(|e| e.to_string())?;
                while b.next_entry().map_err(|e| e.to_string())?.is_some() {
                    b.advance();
                }
            }
            Ok(b.acked())
        })
    };
    let seq = send_input(&mut p, 1);
    assert_eq!(
        wakeups.load(Ordering::SeqCst),
        0,
        "the backup thread ran before any kick"
    );
    assert!(p.acked() < seq, "acknowledged before the backup thread ran");
    // Kick until acknowledged: a kick that lands before the thread is inside pause() only runs
    // the handler, so the first may be lost.
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.acked() < seq {
        assert!(Instant::now() < deadline, "no ACK within 10 s of kicking");
        assert!(p.kick(), "the kick was not sent");
        let until = Instant::now() + Duration::from_millis(2);
        while p.acked() < seq && Instant::now() < until {
            p.pump().expect("pump");
        }
    }
    assert!(wakeups.load(Ordering::SeqCst) >= 1);
    stop.store(true, Ordering::SeqCst);
    while !backup.is_finished() {
        p.kick();
        std::thread::sleep(Duration::from_millis(1));
    }
    let acked = backup.join().expect("thread").expect("backup");
    assert!(acked >= seq);
}

#[test]
fn the_ack_helper_acknowledges_while_the_backup_thread_is_blocked() {
    let stop = Arc::new(AtomicBool::new(false));
    let pumps = Arc::new(AtomicU64::new(0));
    let (mut p, backup, _dir) = {
        let (stop, pumps) = (stop.clone(), pumps.clone());
        pair(move |mut b, ready| {
            if !b.start_ack_helper() {
                return Err("shared memory has no ACK helper".into());
            }
            ready.send(()).map_err(|e| e.to_string())?;
            // Stands in for a vCPU thread inside its guest: it never pumps until told to stop.
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            pumps.fetch_add(1, Ordering::SeqCst);
            b.pump().map_err(|e| e.to_string())?;
            Ok(b.acked())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    for at in 1..=3u64 {
        let seq = send_input(&mut p, at);
        assert!(p.wake_ack_helper(), "no helper to wake");
        while p.acked() < seq {
            assert!(Instant::now() < deadline, "the helper did not acknowledge");
            std::thread::yield_now();
            p.pump().expect("pump");
        }
    }
    assert_eq!(
        pumps.load(Ordering::SeqCst),
        0,
        "the backup's own thread pumped"
    );
    stop.store(true, Ordering::SeqCst);
    let acked = backup.join().expect("thread").expect("backup");
    assert!(acked >= 3);
}
