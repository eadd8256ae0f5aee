//! The primary split in two: the writer on one thread (as the vCPU thread), the sender on its
//! own thread, as on a machine with a core to spare for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logfmt::{ControlOp, Entry, Event, Position};
use transport::{tcp, ChannelConfig, ChannelError, PollPolicy, PreSharedKey};

fn config() -> ChannelConfig {
    let key = PreSharedKey::new(b"threaded-sender-test-key".to_vec()).expect("key");
    let mut c = ChannelConfig::new(2, 1, key);
    c.poll = PollPolicy::BALANCED;
    c.heartbeat_interval = Duration::from_millis(10);
    c.heartbeat_timeout = Duration::from_millis(300);
    c
}

#[test]
fn a_sender_thread_carries_the_log_and_its_failure_reaches_the_writer() {
    const ENTRIES: u64 = 50_000;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let backup = std::thread::spawn(move || {
        let mut b = tcp::accept(&listener, config()).expect("accept");
        let mut last = 0;
        let mut done = false;
        while !done {
            b.poll_timeout(Duration::from_secs(1), |frame| {
                for (seq, e) in frame.entries_with_seq() {
                    assert_eq!(seq, last + 1);
                    last = seq;
                    done |= e.event == Event::Control(ControlOp::Shutdown);
                }
            })
            .expect("backup");
        }
        last
        // Dropping `b` here closes the connection: the sender thread must notice.
    });

    let primary = tcp::connect(addr, config()).expect("connect");
    let (mut writer, sender) = primary.split();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sender = stop.clone();
    let sender = std::thread::spawn(move || sender.run(&stop_sender, PollPolicy::BALANCED));

    let data = [9u8; 48];
    for i in 1..=ENTRIES {
        let e = Entry::new(
            Position::at_exit(i),
            Event::DeviceInput {
                device: 4,
                data: &data,
            },
        );
        writer.append(&e).expect("append");
        if i % 1000 == 0 {
            let m = Entry::new(
                Position::at_exit(i),
                Event::OutputMarker {
                    device: 4,
                    len: 0,
                    digest: i,
                },
            );
            let seq = writer.append(&m).expect("marker");
            writer.wait_acked(seq).expect("acked");
            assert!(writer.acked() >= seq);
        }
    }
    let end = writer
        .append(&Entry::new(
            Position::at_exit(ENTRIES + 1),
            Event::Control(ControlOp::Shutdown),
        ))
        .expect("shutdown");
    writer.wait_acked(end).expect("final ack");
    assert_eq!(backup.join().expect("backup thread"), end);

    // The backup is gone: the sender thread fails, and the writer learns it instead of hanging.
    let started = Instant::now();
    let err = loop {
        let m = Entry::new(
            Position::at_exit(0),
            Event::OutputMarker {
                device: 4,
                len: 0,
                digest: 0,
            },
        );
        match writer.append(&m).and_then(|seq| writer.wait_acked(seq)) {
            Err(e) => break e,
            Ok(()) => assert!(
                started.elapsed() < Duration::from_secs(2),
                "no failure seen"
            ),
        }
    };
    assert!(matches!(err, ChannelError::Failed(_)), "{err:?}");
    assert!(err.to_string().contains("peer closed"), "{err}");
    stop.store(true, Ordering::Relaxed);
    let sender_result = sender.join().expect("sender thread");
    assert!(
        matches!(sender_result, Err(ChannelError::PeerClosed)),
        "{sender_result:?}"
    );
}

/// Waiting for an entry that was never appended fails at once (no ACK would ever cover it: the
/// wait would spin for as long as the backup stays alive), as `Primary::wait_acked` does.
#[test]
fn waiting_for_an_entry_never_appended_fails_instead_of_spinning() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let backup = std::thread::spawn(move || {
        let mut b = tcp::accept(&listener, config()).expect("accept");
        // Alive and acknowledging (heartbeats too) until the writer is done.
        while done_rx.try_recv().is_err() {
            b.poll_timeout(Duration::from_millis(5), |_| {})
                .expect("backup");
        }
    });
    let primary = tcp::connect(addr, config()).expect("connect");
    let (mut writer, sender) = primary.split();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sender = stop.clone();
    let sender = std::thread::spawn(move || sender.run(&stop_sender, PollPolicy::BALANCED));
    let seq = writer
        .append(&Entry::new(
            Position::at_exit(1),
            Event::Control(ControlOp::Shutdown),
        ))
        .expect("append");
    writer
        .wait_acked(seq)
        .expect("an appended entry is acknowledged");
    // The wait runs on its own thread so that a regression shows as this test failing, not
    // hanging: the answer must come while the backup is still alive.
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(writer.wait_acked(seq + 10));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Err(ChannelError::Config(m))) => assert!(m.contains("only 1 were appended"), "{m}"),
        Ok(other) => panic!("expected a refusal, got {other:?}"),
        Err(_) => panic!("wait_acked for a never-appended entry did not return"),
    }
    waiter.join().expect("waiter");
    let _ = done_tx.send(());
    backup.join().expect("backup thread");
    // The sender may have seen the backup go; either way it stops.
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join().expect("sender thread");
}
