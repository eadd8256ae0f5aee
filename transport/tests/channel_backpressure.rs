//! Backpressure: when the backup lags by more than the configured bound, appends wait (and are
//! counted); nothing is lost, and the lag never exceeds the bound.

use std::time::Duration;

use logfmt::{ControlOp, Entry, Event, Position};
use transport::{tcp, ChannelConfig, PreSharedKey};

#[test]
fn a_slow_backup_throttles_the_primary_within_the_bound() {
    const MAX_LAG: u64 = 64;
    const ENTRIES: u64 = 3_000;
    let mut cfg = ChannelConfig::new(
        1,
        1,
        PreSharedKey::new(b"backpressure-test-key".to_vec()).expect("key"),
    );
    cfg.max_lag_entries = MAX_LAG;
    cfg.poll = transport::PollPolicy::BALANCED;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let backup_cfg = cfg.clone();
    let backup = std::thread::spawn(move || {
        let mut b = tcp::accept(&listener, backup_cfg).expect("accept");
        let mut seen = 0u64;
        let mut done = false;
        while !done {
            // A slow replayer: one poll every 200 µs.
            std::thread::sleep(Duration::from_micros(200));
            b.poll(|frame| {
                for (seq, e) in frame.entries_with_seq() {
                    assert_eq!(seq, seen + 1, "in order, once");
                    seen = seq;
                    done |= e.event == Event::Control(ControlOp::Shutdown);
                }
            })
            .expect("backup poll");
        }
        seen
    });
    let mut p = tcp::connect(addr, cfg).expect("connect");
    for i in 1..=ENTRIES {
        // Flush every entry so the lag is visible entry by entry.
        let seq = p
            .append(&Entry::new(
                Position::at_exit(i),
                Event::OutputMarker {
                    device: 0,
                    len: 0,
                    digest: i,
                },
            ))
            .expect("append");
        assert!(
            seq - p.acked() <= MAX_LAG + 1,
            "lag {} above bound",
            seq - p.acked()
        );
    }
    let end = p
        .append(&Entry::new(
            Position::at_exit(ENTRIES + 1),
            Event::Control(ControlOp::Shutdown),
        ))
        .expect("append");
    p.wait_acked(end).expect("all acknowledged");
    let stats = p.stats();
    assert!(
        stats.throttle_events > 0,
        "the slow backup must have throttled the primary"
    );
    assert!(stats.throttled_ns > 0);
    assert_eq!(backup.join().expect("backup"), ENTRIES + 1);
}

#[test]
fn a_batch_delay_of_zero_flushes_every_entry() {
    let mut cfg = ChannelConfig::new(
        3,
        1,
        PreSharedKey::new(b"batch-delay-test-key".to_vec()).expect("key"),
    );
    cfg.max_batch_delay = Some(Duration::ZERO);
    cfg.poll = transport::PollPolicy::BALANCED;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let backup_cfg = cfg.clone();
    let backup = std::thread::spawn(move || {
        let mut b = tcp::accept(&listener, backup_cfg).expect("accept");
        let mut frames = 0u64;
        let mut done = false;
        while !done {
            b.poll_timeout(Duration::from_secs(1), |frame| {
                frames += 1;
                assert_eq!(frame.entry_count(), 1, "one entry per frame");
                done |= frame
                    .entries()
                    .any(|e| e.event == Event::Control(ControlOp::Shutdown));
            })
            .expect("backup poll");
        }
        frames
    });
    let mut p = tcp::connect(addr, cfg).expect("connect");
    for i in 1..=100u64 {
        p.append(&Entry::new(Position::at_exit(i), Event::Clock { ns: i }))
            .expect("append");
    }
    let end = p
        .append(&Entry::new(
            Position::at_exit(101),
            Event::Control(ControlOp::Shutdown),
        ))
        .expect("append");
    p.wait_acked(end).expect("acked");
    assert_eq!(backup.join().expect("backup"), 101);
}
