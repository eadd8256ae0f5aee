//! Backpressure: when the backup lags by more than the configured bound, appends wait (and are
//! counted); nothing is lost, and the lag never exceeds the bound.

use std::time::Duration;

use logfmt::{ControlOp, Entry, Event, Position};
use transport::tcp::{self, TcpBackupLink};
use transport::{Backup, ChannelConfig, PreSharedKey};

/// A pair's configuration for session `session` (balanced polling), changed by `tune`.
fn config(session: u64, key: &[u8], tune: impl FnOnce(&mut ChannelConfig)) -> ChannelConfig {
    let mut cfg = ChannelConfig::new(session, 1, PreSharedKey::new(key.to_vec()).expect("key"));
    cfg.poll = transport::PollPolicy::BALANCED;
    tune(&mut cfg);
    cfg
}

/// A backup over TCP loopback running `body` on its own thread, and the primary connected to it.
fn pair<T: Send + 'static>(
    cfg: ChannelConfig,
    body: impl FnOnce(Backup<TcpBackupLink>) -> T + Send + 'static,
) -> (
    transport::Primary<tcp::TcpPrimaryLink>,
    std::thread::JoinHandle<T>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let backup_cfg = cfg.clone();
    let backup =
        std::thread::spawn(move || body(tcp::accept(&listener, backup_cfg).expect("accept")));
    (tcp::connect(addr, cfg).expect("connect"), backup)
}

#[test]
fn a_slow_backup_throttles_the_primary_within_the_bound() {
    const MAX_LAG: u64 = 64;
    const ENTRIES: u64 = 3_000;
    let cfg = config(1, b"backpressure-test-key", |c| {
        c.max_lag_entries = MAX_LAG;
    });
    let (mut p, backup) = pair(cfg, move |mut b| {
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
    let cfg = config(3, b"batch-delay-test-key", |c| {
        c.max_batch_delay = Some(Duration::ZERO);
    });
    let (mut p, backup) = pair(cfg, move |mut b| {
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

/// Lag control on the replay position: a backup that acknowledges on receipt but replays in
/// place slowly (one entry per 20 µs, its ring freed only as it goes) holds the primary back by
/// time; the ACKs keep flowing, the lag seen at every seal stays near the bound, and every
/// entry is replayed once, in order.
#[test]
fn a_slowly_replaying_backup_is_kept_within_the_time_bound() {
    const ENTRIES: u64 = 40_000;
    const BOUND: Duration = Duration::from_millis(20);
    let cfg = config(4, b"replay-lag-test-key", |c| {
        c.max_lag_time = Some(BOUND);
    });
    let (mut p, backup) = pair(cfg, move |mut b| {
        let mut seen = 0u64;
        let mut most_unreplayed = 0u64;
        loop {
            let _ = b.pump().expect("pump");
            most_unreplayed = most_unreplayed.max(b.acked() - b.replayed());
            let Some(e) = b.next_entry().expect("entry") else {
                b.wait(Duration::from_secs(5)).expect("wait");
                continue;
            };
            assert_eq!(e.seq, seen + 1, "in order, once");
            seen = e.seq;
            let done = e.entry.event == Event::Control(ControlOp::Shutdown);
            b.advance();
            if done {
                break;
            }
            let until = std::time::Instant::now() + Duration::from_micros(20);
            while std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        let finished = std::time::Instant::now();
        // The last report goes out with the next pump.
        for _ in 0..100 {
            let _ = b.pump();
            std::thread::sleep(Duration::from_millis(1));
        }
        (seen, most_unreplayed, finished)
    });
    for i in 1..=ENTRIES {
        p.append(&Entry::new(Position::at_exit(i), Event::Clock { ns: i }))
            .expect("append");
        if i % 64 == 0 {
            p.flush().expect("flush");
        }
    }
    let end = p
        .append(&Entry::new(
            Position::at_exit(ENTRIES + 1),
            Event::Control(ControlOp::Shutdown),
        ))
        .expect("append");
    p.wait_acked(end).expect("all acknowledged");
    let appended = std::time::Instant::now();
    // A live primary keeps its channel going (heartbeats) while the backup drains.
    while !backup.is_finished() {
        let _ = p.pump();
        std::thread::yield_now();
    }
    let (seen, most_unreplayed, finished) = backup.join().expect("backup");
    let drain = finished.saturating_duration_since(appended);
    assert_eq!(seen, ENTRIES + 1);
    let stats = p.stats();
    println!(
        "replay lag control: {} waits, {:.1} ms throttled, lag at seal max {:.2} ms (bound {BOUND:?}), \
         {} bytes, {} entries; backup held at most {most_unreplayed} received-but-unreplayed entries; \
         drained {drain:?} after the last append",
        stats.lag_throttles,
        stats.throttled_ns as f64 / 1e6,
        stats.lag_max_ns as f64 / 1e6,
        stats.lag_max_bytes,
        stats.lag_max_entries
    );
    assert!(
        stats.lag_throttles > 0,
        "the slow replay held the primary back"
    );
    assert!(
        most_unreplayed > 64,
        "the backup acknowledged ahead of its replay (receipt, not replay, is what it ACKs)"
    );
    // Checked at each seal (every 64 entries here, ~1.3 ms of this backup's replay): the
    // lag seen there exceeds the bound by at most that much plus the report interval.
    assert!(
        Duration::from_nanos(stats.lag_max_ns) < BOUND + Duration::from_millis(10),
        "lag {} ns over the bound",
        stats.lag_max_ns
    );
    // What matters for a failover: the backlog at the end took about the bound to replay.
    assert!(
        drain < BOUND * 2,
        "the backup needed {drain:?} to drain (bound {BOUND:?})"
    );
}
