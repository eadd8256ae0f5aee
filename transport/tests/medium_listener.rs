//! The medium layer's listener over real sockets: stray connections — a port probe, an HTTP
//! request, a peer with the wrong key, a peer of another protocol version, a connection that
//! sends nothing — are refused one after another and the listener goes on accepting, so the
//! real peer still gets through; and either side can be the one that listens (a backup that
//! dials a listening primary, as a joiner does).

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use logfmt::{Entry, Event, Position};
use transport::medium::{self, Listener, Medium};
use transport::{ChannelConfig, ChannelError, PollPolicy, PreSharedKey};

const KEY: &[u8] = b"medium-listener-test-key";
const ENTRIES: u64 = 2_000;

fn config(key: &[u8], handshake: Duration) -> ChannelConfig {
    let mut c = ChannelConfig::new(0x5EED, 1, PreSharedKey::new(key.to_vec()).expect("key"));
    c.handshake_timeout = handshake;
    c.heartbeat_interval = Duration::from_millis(10);
    c.heartbeat_timeout = Duration::from_secs(2);
    c.poll = PollPolicy::BALANCED;
    c
}

/// The listener's side refuses strays with a short handshake timeout; the real peer allows
/// itself a longer one, since it may queue behind a silent stray.
fn listener_config() -> ChannelConfig {
    config(KEY, Duration::from_millis(400))
}

fn peer_config() -> ChannelConfig {
    config(KEY, Duration::from_secs(5))
}

/// A Hello of protocol version 99 (layout in `transport::handshake`).
fn foreign_hello() -> [u8; 64] {
    let mut h = [0u8; 64];
    h[..4].copy_from_slice(b"FTHS");
    h[4] = 1;
    h[5] = 1;
    h[6..8].copy_from_slice(&99u16.to_le_bytes());
    h[8..16].copy_from_slice(&0x5EEDu64.to_le_bytes());
    h
}

enum Raw {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Raw {
    fn open(m: &Medium) -> Raw {
        match m {
            Medium::Shm { socket } => Raw::Unix(UnixStream::connect(socket).expect("connect")),
            other => Raw::Tcp(TcpStream::connect(other.address()).expect("connect")),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        // The listener may already have hung up on us: that is fine.
        let _ = match self {
            Raw::Tcp(s) => s.write_all(bytes),
            Raw::Unix(s) => s.write_all(bytes),
        };
    }
}

/// Throws every kind of stray at the medium's listener, in order; returns how many, and the
/// silent connection, which the caller keeps open while the real peer connects behind it.
fn strays(m: &Medium, peer_is_backup: bool) -> (u64, Raw) {
    // A port probe: connect and close.
    drop(Raw::open(m));
    // An HTTP request.
    let mut http = Raw::open(m);
    http.send(b"GET / HTTP/1.1\r\nHost: ftvm\r\n\r\n");
    drop(http);
    // Another protocol version (only meaningful towards a listening backup, which reads a
    // Hello first; towards a listening primary it is just garbage).
    let mut foreign = Raw::open(m);
    foreign.send(&foreign_hello());
    drop(foreign);
    // A peer with the wrong key, speaking the real protocol.
    let wrong = config(b"some-other-key-entirely", Duration::from_secs(5));
    let refused = if peer_is_backup {
        medium::dial_backup(m, wrong).map(|_| ())
    } else {
        medium::dial_primary(m, wrong).map(|_| ())
    };
    assert!(
        matches!(
            refused,
            Err(ChannelError::PeerNotAuthenticated | ChannelError::AuthRejected)
        ),
        "a wrong key must be refused: {refused:?}"
    );
    // A connection that sends nothing: the listener must give up on it after its handshake
    // timeout, which the real peer's success behind it proves.
    (5, Raw::open(m))
}

fn entry(i: u64) -> Entry<'static> {
    Entry::new(Position::at_exit(i), Event::Clock { ns: i * 1000 })
}

/// Streams `ENTRIES` entries from `primary`, waits for the last ACK.
fn stream(mut primary: transport::AnyPrimary) {
    let mut last = 0;
    for i in 1..=ENTRIES {
        last = primary.append(&entry(i)).expect("append");
    }
    primary.flush().expect("flush");
    primary.wait_acked(last).expect("all acknowledged");
}

/// Receives until `ENTRIES` entries arrived, checking each one's order and value.
fn receive(mut backup: transport::AnyBackup) {
    let mut seen = 0u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen < ENTRIES {
        assert!(Instant::now() < deadline, "only {seen} entries arrived");
        let polled = backup.poll_timeout(Duration::from_millis(50), |frame| {
            for e in frame.entries() {
                seen += 1;
                assert_eq!(e.position.exit, seen);
                assert_eq!(e.event, Event::Clock { ns: seen * 1000 });
            }
        });
        // The primary hangs up as soon as it has the last ACK, which may be while the same
        // poll is still looking for more: that poll hands over the last frames first and then
        // reports the hang-up. Only a hang-up before every entry arrived is a failure.
        if let Err(e) = polled {
            assert_eq!(seen, ENTRIES, "poll failed after {seen} entries: {e}");
        }
    }
}

fn backup_listens(m: Medium) {
    let mut l = Listener::bind(&m).expect("bind");
    let m = l.medium();
    let server = std::thread::spawn(move || {
        let b = l
            .backup(listener_config())
            .expect("the real primary gets through");
        (b, l.refused())
    });
    let (n, _silent) = strays(&m, false);
    let p = medium::dial_primary(&m, peer_config()).expect("dial the backup");
    let (b, refused) = server.join().expect("backup thread");
    assert_eq!(refused, n, "every stray refused, none fatal");
    let rx = std::thread::spawn(move || receive(b));
    stream(p);
    rx.join().expect("receiver");
}

fn primary_listens(m: Medium) {
    let mut l = Listener::bind(&m).expect("bind");
    let m = l.medium();
    let server = std::thread::spawn(move || {
        let p = l
            .primary(listener_config())
            .expect("the joining backup gets through");
        (p, l.refused())
    });
    let (n, _silent) = strays(&m, true);
    let b = medium::dial_backup(&m, peer_config()).expect("dial the primary");
    let (p, refused) = server.join().expect("primary thread");
    assert_eq!(refused, n, "every stray refused, none fatal");
    let rx = std::thread::spawn(move || receive(b));
    stream(p);
    rx.join().expect("receiver");
}

fn sock(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ftvm-medium-{name}-{}.sock", std::process::id()))
}

#[test]
fn tcp_backup_listener_survives_strays() {
    backup_listens("tcp:127.0.0.1:0".parse().expect("medium"));
}

#[test]
fn shm_backup_listener_survives_strays() {
    backup_listens(Medium::Shm {
        socket: sock("backup"),
    });
}

#[test]
fn tcp_primary_listens_and_a_backup_dials() {
    primary_listens("tcp:127.0.0.1:0".parse().expect("medium"));
}

#[test]
fn shm_primary_listens_and_a_backup_dials() {
    primary_listens(Medium::Shm {
        socket: sock("primary"),
    });
}

/// A backup that joins a running primary names where the log resumes (the first entry after
/// the state it was given): the primary's log continues from there, and the backup expects
/// exactly that sequence number.
fn joiner_resumes(m: Medium) {
    const RESUME: u64 = 5_001;
    let mut l = Listener::bind(&m).expect("bind");
    let m = l.medium();
    let server = std::thread::spawn(move || l.primary(listener_config()).expect("the joiner"));
    let mut cfg = peer_config();
    cfg.resume_seq = RESUME;
    let mut b = medium::dial_backup(&m, cfg).expect("join");
    let mut p = server.join().expect("primary thread");
    let rx = std::thread::spawn(move || {
        let mut seqs = Vec::new();
        while seqs.is_empty() {
            b.poll_timeout(Duration::from_secs(5), |f| {
                seqs.extend(f.entries_with_seq().map(|(s, _)| s));
            })
            .expect("poll");
        }
        seqs
    });
    let first = p
        .append(&Entry::new(
            Position::at_exit(RESUME),
            Event::Clock { ns: 1 },
        ))
        .expect("append");
    assert_eq!(
        first, RESUME,
        "the primary's log resumes where the joiner said"
    );
    p.flush().expect("flush");
    p.wait_acked(first).expect("acknowledged");
    let seqs = rx.join().expect("backup");
    assert_eq!(seqs, [RESUME]);
}

#[test]
fn tcp_joiner_resumes_the_log_where_its_state_ends() {
    joiner_resumes("tcp:127.0.0.1:0".parse().expect("medium"));
}

#[test]
fn shm_joiner_resumes_the_log_where_its_state_ends() {
    joiner_resumes(Medium::Shm {
        socket: sock("joiner"),
    });
}
