//! The primary's kick over shared memory ([`transport::kick`]): a backup whose channel thread
//! is blocked (as a vCPU thread is inside `KVM_RUN`) acknowledges only once the primary kicks
//! it, and a kick reaches that thread, not another; an ACK helper thread acknowledges while
//! the backup's own thread does not pump at all.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logfmt::{Entry, Event, Position};
use transport::{shm, ChannelConfig, PreSharedKey};

const KEY: &[u8] = b"kick-tests-shared-key-0123";

fn config() -> ChannelConfig {
    let mut c = ChannelConfig::new(0x4b, 1, PreSharedKey::new(KEY.to_vec()).expect("key"));
    c.heartbeat_timeout = Duration::from_secs(5);
    c.heartbeat_interval = Duration::from_millis(50);
    c
}

#[test]
fn a_blocked_backup_acknowledges_when_kicked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("kick.sock");
    let l = shm::listen(&sock).expect("listen");
    let stop = Arc::new(AtomicBool::new(false));
    let wakeups = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let backup = {
        let (stop, wakeups) = (stop.clone(), wakeups.clone());
        std::thread::spawn(move || -> Result<u64, String> {
            let mut b = shm::accept(&l, config()).map_err(|e| e.to_string())?;
            if !b.enable_kicks() {
                return Err("shared memory refused kicks".into());
            }
            ready_tx.send(()).map_err(|e| e.to_string())?;
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
    let mut p = shm::connect(&sock, config()).expect("connect");
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("backup ready");
    let data = [7u8; 64];
    let seq = p
        .append(&Entry::new(
            Position::at_exit(1),
            Event::DeviceInput {
                device: 0,
                data: &data,
            },
        ))
        .expect("append");
    p.flush().expect("flush");
    p.pump().expect("pump");
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
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("helper.sock");
    let l = shm::listen(&sock).expect("listen");
    let stop = Arc::new(AtomicBool::new(false));
    let pumps = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let backup = {
        let (stop, pumps) = (stop.clone(), pumps.clone());
        std::thread::spawn(move || -> Result<u64, String> {
            let mut b = shm::accept(&l, config()).map_err(|e| e.to_string())?;
            if !b.start_ack_helper() {
                return Err("shared memory has no ACK helper".into());
            }
            ready_tx.send(()).map_err(|e| e.to_string())?;
            // Stands in for a vCPU thread inside its guest: it never pumps until told to stop.
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            pumps.fetch_add(1, Ordering::SeqCst);
            b.pump().map_err(|e| e.to_string())?;
            Ok(b.acked())
        })
    };
    let mut p = shm::connect(&sock, config()).expect("connect");
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("backup ready");
    let data = [9u8; 64];
    let deadline = Instant::now() + Duration::from_secs(10);
    for at in 1..=3u64 {
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
