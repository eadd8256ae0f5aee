//! Authenticated ACKs over real sockets: a relay in the middle of a TCP channel (a hijacked
//! connection) forges an ACK for entries the backup never received, or replays a captured
//! one. With `--channel-crypto auth` the primary refuses both and releases nothing; with
//! `none` the same forgery is believed — which is what the tags are for.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use logfmt::{Entry, Event, Position};
use transport::auth::ChannelCrypto;
use transport::{tcp, ChannelConfig, ChannelError, PreSharedKey};

const KEY: &[u8] = b"channel-auth-tests-shared-key";
/// Handshake bytes each way over TCP (no medium info): Hello 104 + Response 40 from the
/// primary, Challenge 136 + Welcome 24 from the backup.
const FROM_PRIMARY: usize = 144;
const FROM_BACKUP: usize = 160;
/// A TCP ACK message with its seal.
const ACK_LEN: usize = 56;

fn config(crypto: ChannelCrypto) -> ChannelConfig {
    let mut c = ChannelConfig::new(0xA7, 5, PreSharedKey::new(KEY.to_vec()).expect("key"));
    c.crypto = crypto;
    c.handshake_timeout = Duration::from_secs(2);
    c.heartbeat_interval = Duration::from_millis(10);
    c.heartbeat_timeout = Duration::from_secs(3);
    c.poll = transport::PollPolicy::BALANCED;
    c
}

/// What the test tells the relay.
enum Cmd {
    /// Send these bytes to the primary as if from the backup.
    Inject(Vec<u8>),
    /// From now on, pass the primary's bytes to the backup.
    Release,
    /// Send the first ACK the backup sent (after the handshake) to the primary again.
    Replay,
}

/// A man in the middle: passes the handshake both ways, holds the primary's frames until
/// released, passes the backup's ACKs and keeps a copy of the first one.
fn relay(backup: std::net::SocketAddr) -> (std::net::SocketAddr, mpsc::Sender<Cmd>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel::<Cmd>();
    std::thread::spawn(move || {
        let (mut p, _) = l.accept().expect("accept");
        let mut b = TcpStream::connect(backup).expect("connect");
        p.set_nonblocking(true).expect("nonblocking");
        b.set_nonblocking(true).expect("nonblocking");
        let (mut from_p, mut from_b) = (0usize, 0usize);
        let mut held = Vec::new();
        let mut released = false;
        let mut first_ack: Vec<u8> = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match p.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    let hs = FROM_PRIMARY.saturating_sub(from_p).min(n);
                    from_p += n;
                    let _ = b.write_all(&buf[..hs]);
                    if released {
                        let _ = b.write_all(&buf[hs..n]);
                    } else {
                        held.extend_from_slice(&buf[hs..n]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            match b.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    for &byte in &buf[..n] {
                        if from_b >= FROM_BACKUP && first_ack.len() < ACK_LEN {
                            first_ack.push(byte);
                        }
                        from_b += 1;
                    }
                    let _ = p.write_all(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            match rx.try_recv() {
                Ok(Cmd::Inject(bytes)) => {
                    let _ = p.write_all(&bytes);
                }
                Ok(Cmd::Release) => {
                    released = true;
                    let _ = b.write_all(&std::mem::take(&mut held));
                }
                Ok(Cmd::Replay) => {
                    assert_eq!(first_ack.len(), ACK_LEN, "an ACK was captured");
                    let _ = p.write_all(&first_ack);
                }
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
            std::thread::yield_now();
        }
    });
    (addr, tx)
}

/// An ACK message for `received` with no valid seal: what an attacker without the key sends.
fn forged_ack(epoch: u64, received: u64) -> Vec<u8> {
    let mut m = vec![0u8; ACK_LEN];
    m[..4].copy_from_slice(b"FTAK");
    m[8..16].copy_from_slice(&epoch.to_le_bytes());
    m[16..24].copy_from_slice(&received.to_le_bytes());
    m
}

/// A backup that serves until `stop`.
fn backup(crypto: ChannelCrypto, stop: Arc<AtomicBool>) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        let Ok(mut b) = tcp::accept(&l, config(crypto)) else {
            return;
        };
        while !stop.load(Ordering::Relaxed) {
            if b.poll(|_| {}).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    addr
}

/// Pumps `primary` until `done` says so or it fails; the wait ends on an event.
fn pump_until(
    primary: &mut transport::Primary<tcp::TcpPrimaryLink>,
    done: impl Fn(u64) -> bool,
) -> Result<(), ChannelError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        primary.pump()?;
        if done(primary.acked()) {
            return Ok(());
        }
        assert!(Instant::now() < deadline, "neither the event nor an error");
        std::thread::yield_now();
    }
}

/// Logs an input and an output marker (entries 1 and 2); the frames stay at the relay.
fn commit_pending(primary: &mut transport::Primary<tcp::TcpPrimaryLink>) {
    primary
        .append(&Entry::new(
            Position::at_exit(1),
            Event::DeviceInput {
                device: 1,
                data: b"set x 1",
            },
        ))
        .expect("append");
    primary
        .append(&Entry::new(
            Position::at_exit(2),
            Event::OutputMarker {
                device: 1,
                len: 2,
                digest: logfmt::digest(b"ok"),
            },
        ))
        .expect("append");
}

fn forged_ack_run(crypto: ChannelCrypto) -> (Result<(), ChannelError>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let b = backup(crypto, stop.clone());
    let (r, cmd) = relay(b);
    let mut primary = tcp::connect(r, config(crypto)).expect("connect through the relay");
    commit_pending(&mut primary);
    // The backup has neither entry (the relay holds the frames): an ACK of 2 is a lie.
    cmd.send(Cmd::Inject(forged_ack(5, 2))).expect("relay");
    let result = pump_until(&mut primary, |acked| acked >= 2);
    let acked = primary.acked();
    stop.store(true, Ordering::Relaxed);
    (result, acked)
}

#[test]
fn a_forged_ack_releases_nothing() {
    let (result, acked) = forged_ack_run(ChannelCrypto::Auth);
    assert!(
        matches!(
            &result,
            Err(ChannelError::Unauthenticated { what: "ACK", .. })
        ),
        "{result:?}"
    );
    assert_eq!(
        acked, 0,
        "the output marker (entry 2) was never acknowledged"
    );
}

#[test]
fn without_tags_the_same_forgery_is_believed() {
    // The control: the relay's forgery works when nothing checks it (so the test above can
    // fail for the right reason).
    let (result, acked) = forged_ack_run(ChannelCrypto::None);
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(acked, 2, "the forged ACK released the output");
}

#[test]
fn a_replayed_ack_is_refused() {
    let stop = Arc::new(AtomicBool::new(false));
    let b = backup(ChannelCrypto::Auth, stop.clone());
    let (r, cmd) = relay(b);
    let mut primary = tcp::connect(r, config(ChannelCrypto::Auth)).expect("connect");
    commit_pending(&mut primary);
    cmd.send(Cmd::Release).expect("relay");
    pump_until(&mut primary, |acked| acked >= 2).expect("the real ACK");
    cmd.send(Cmd::Replay).expect("relay");
    let err = pump_until(&mut primary, |_| false).expect_err("refused");
    assert!(
        matches!(&err, ChannelError::Unauthenticated { what: "ACK", reason } if reason.contains("replayed")),
        "{err:?}"
    );
    stop.store(true, Ordering::Relaxed);
}

/// Forwards one connection both ways and keeps a copy of what the primary sent.
fn tap(backup: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let copy = seen.clone();
    std::thread::spawn(move || {
        let (p, _) = l.accept().expect("accept");
        let b = TcpStream::connect(backup).expect("connect");
        let (mut b2, mut p2) = (b.try_clone().expect("clone"), p.try_clone().expect("clone"));
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut p2);
        });
        let (mut p, mut b) = (p, b);
        let mut buf = [0u8; 65536];
        loop {
            match p.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    copy.lock().expect("tap").extend_from_slice(&buf[..n]);
                    if b.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    (addr, seen)
}

/// What one run of a TCP channel under `crypto` put on the wire, and what the backup got.
fn secret_run(crypto: ChannelCrypto) -> (Vec<u8>, Vec<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let backup_addr = l.local_addr().expect("addr");
    let (got_tx, got_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let Ok(mut b) = tcp::accept(&l, config(crypto)) else {
            return;
        };
        loop {
            let r = b.poll(|frame| {
                for entry in frame.entries() {
                    if let Event::DeviceInput { data, .. } = entry.event {
                        let _ = got_tx.send(data.to_vec());
                    }
                }
            });
            if let Err(e) = r {
                println!("backup: {e}");
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let (r, wire) = tap(backup_addr);
    let mut primary = tcp::connect(r, config(crypto)).expect("connect through the tap");
    let secrets: Vec<Vec<u8>> = (0..50)
        .map(|i| format!("set card-{i} 4111-1111-1111-{i:04}").into_bytes())
        .collect();
    for (i, s) in secrets.iter().enumerate() {
        primary
            .append(&Entry::new(
                Position::at_exit(i as u64 + 1),
                Event::DeviceInput { device: 1, data: s },
            ))
            .expect("append");
    }
    primary.flush().expect("flush");
    pump_until(&mut primary, |acked| acked >= secrets.len() as u64).expect("all acknowledged");
    let got: Vec<Vec<u8>> = (0..secrets.len())
        .map(|_| {
            got_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("delivered")
        })
        .collect();
    assert_eq!(got, secrets, "the backup got every input, in order, intact");
    let bytes = wire.lock().expect("tap").clone();
    (bytes, secrets)
}

#[test]
fn encrypted_frames_show_nothing_on_the_wire_and_arrive_intact() {
    let (wire, secrets) = secret_run(ChannelCrypto::Encrypt);
    for s in &secrets {
        assert!(
            !wire.windows(12).any(|w| w == &s[..12]),
            "plaintext on the wire"
        );
    }
    assert!(!wire.windows(9).any(|w| w == b"4111-1111"));
    // The control: with `auth` the same inputs are readable on the wire.
    let (wire, _) = secret_run(ChannelCrypto::Auth);
    assert!(wire.windows(9).any(|w| w == b"4111-1111"));
}
