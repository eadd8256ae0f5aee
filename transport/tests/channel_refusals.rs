//! Bad peers over real sockets: a wrong key, another protocol version, garbage bytes, corrupt
//! or out-of-order frames, a closed socket, a silent peer. Each is refused with its own typed
//! error, nothing panics, nothing hangs, and no bad frame reaches the backup's buffer.

use ftvm_metrics::RejectCause;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use logfmt::{Entry, Event, Position};
use transport::auth::{ChannelCrypto, FrameSealer, SessionKeys, TRAILER_LEN};
use transport::handshake::{self, MediumKind, SessionParams};
use transport::{shm, tcp, ChannelConfig, ChannelError, PreSharedKey};

const KEY: &[u8] = b"refusal-tests-shared-key";

fn config(key: &[u8]) -> ChannelConfig {
    let mut c = ChannelConfig::new(0xAB, 5, PreSharedKey::new(key.to_vec()).expect("key"));
    c.handshake_timeout = Duration::from_millis(500);
    c.heartbeat_interval = Duration::from_millis(10);
    c.heartbeat_timeout = Duration::from_millis(300);
    c.poll = transport::PollPolicy::BALANCED;
    c
}

fn listener() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// A hand-built Hello (see the layout in `transport::handshake`), for speaking as a primary of
/// another version.
fn raw_hello(version: u16, session: u64, epoch: u64) -> [u8; 64] {
    let mut h = [0u8; 64];
    h[..4].copy_from_slice(b"FTHS");
    h[4] = 1;
    h[5] = 1;
    h[6..8].copy_from_slice(&version.to_le_bytes());
    h[8..16].copy_from_slice(&session.to_le_bytes());
    h[16..24].copy_from_slice(&epoch.to_le_bytes());
    h[56..60].copy_from_slice(&1u32.to_le_bytes());
    h
}

#[test]
fn wrong_key_is_refused_on_both_sides() {
    let (l, addr) = listener();
    let backup = std::thread::spawn(move || tcp::accept(&l, config(KEY)).map(|_| ()));
    let primary = tcp::connect(addr, config(b"some-other-key-entirely")).map(|_| ());
    assert!(
        matches!(primary, Err(ChannelError::PeerNotAuthenticated)),
        "{primary:?}"
    );
    let backup = backup.join().expect("thread");
    assert!(
        matches!(backup, Err(ChannelError::AuthRejected)),
        "{backup:?}"
    );
}

#[test]
fn wrong_key_over_shm_never_reveals_the_ring() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sock = dir.path().join("refusal.sock");
    let l = shm::listen(&sock).expect("listen");
    let prefix = format!("ftvm-{:x}-{}-", 0xABu64, std::process::id());
    let backup = std::thread::spawn(move || shm::accept(&l, config(KEY)).map(|_| ()));
    let primary = shm::connect(&sock, config(b"some-other-key-entirely")).map(|_| ());
    assert!(
        matches!(primary, Err(ChannelError::PeerNotAuthenticated)),
        "{primary:?}"
    );
    assert!(backup.join().expect("thread").is_err());
    let leaked = std::fs::read_dir("/dev/shm")
        .expect("/dev/shm")
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().starts_with(&prefix));
    assert!(
        !leaked,
        "no ring may be created for an unauthenticated primary"
    );
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn other_protocol_version_is_refused_with_both_versions_named() {
    let (l, addr) = listener();
    let backup = std::thread::spawn(move || tcp::accept(&l, config(KEY)).map(|_| ()));
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(&raw_hello(99, 0xAB, 5)).expect("hello");
    let mut challenge = [0u8; 96];
    s.read_exact(&mut challenge).expect("refusal");
    assert_eq!(&challenge[..4], b"FTHS");
    assert_eq!(challenge[5], 1, "status: version mismatch");
    assert_eq!(
        u16::from_le_bytes([challenge[6], challenge[7]]),
        transport::PROTOCOL_VERSION
    );
    assert_eq!(
        challenge[24..88],
        [0u8; 64],
        "no nonce or MAC for a refused peer"
    );
    assert_eq!(
        challenge[88],
        ChannelCrypto::Auth as u8,
        "the backup's crypto mode"
    );
    assert_eq!(challenge[89..], [0u8; 7]);
    let err = backup.join().expect("thread").expect_err("refused");
    assert!(
        matches!(
            err,
            ChannelError::VersionMismatch {
                ours: transport::PROTOCOL_VERSION,
                theirs: 99
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_backup_of_another_version_is_refused_by_the_primary() {
    let (l, addr) = listener();
    let fake_backup = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut hello = [0u8; 64];
        s.read_exact(&mut hello).expect("hello");
        let mut challenge = [0u8; 96];
        challenge[..4].copy_from_slice(b"FTHS");
        challenge[4] = 2;
        challenge[6..8].copy_from_slice(&7u16.to_le_bytes());
        s.write_all(&challenge).expect("challenge");
    });
    let err = tcp::connect(addr, config(KEY))
        .map(|_| ())
        .expect_err("refused");
    assert!(
        matches!(err, ChannelError::VersionMismatch { ours, theirs: 7 } if ours == transport::PROTOCOL_VERSION),
        "{err:?}"
    );
    fake_backup.join().expect("thread");
}

#[test]
fn garbage_on_the_socket_is_refused_by_either_side() {
    let (l, addr) = listener();
    let backup = std::thread::spawn(move || tcp::accept(&l, config(KEY)).map(|_| ()));
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: ftvm\r\n\r\n-----------------------------------")
        .expect("garbage");
    let err = backup.join().expect("thread").expect_err("refused");
    assert!(matches!(err, ChannelError::BadHandshake(_)), "{err:?}");
    assert!(err.to_string().contains("not an ftvm handshake"), "{err}");

    let (l, addr) = listener();
    let fake_backup = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut hello = [0u8; 64];
        s.read_exact(&mut hello).expect("hello");
        s.write_all(&[0x5A; 96]).expect("garbage");
    });
    let err = tcp::connect(addr, config(KEY))
        .map(|_| ())
        .expect_err("refused");
    assert!(matches!(err, ChannelError::BadHandshake(_)), "{err:?}");
    fake_backup.join().expect("thread");
}

#[test]
fn a_silent_backup_times_out_the_handshake() {
    let (l, addr) = listener();
    let silent = std::thread::spawn(move || {
        let conn = l.accept();
        std::thread::sleep(Duration::from_millis(800));
        drop(conn);
    });
    let start = Instant::now();
    let err = tcp::connect(addr, config(KEY))
        .map(|_| ())
        .expect_err("timeout");
    assert!(
        matches!(err, ChannelError::HandshakeTimeout { .. }),
        "{err:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    silent.join().expect("thread");
}

/// Completes a real handshake as the primary on a raw socket, then lets the test write
/// whatever bytes it likes as "frames"; returns the session's keys too, so the test can seal
/// what it writes as a real primary would.
fn raw_primary(addr: std::net::SocketAddr) -> (TcpStream, SessionKeys) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let params = SessionParams {
        session_id: 0xAB,
        epoch: 5,
        medium: MediumKind::Tcp,
        key: PreSharedKey::new(KEY.to_vec()).expect("key"),
        guest: transport::GuestIdentity::default(),
        crypto: ChannelCrypto::Auth,
    };
    let accepted = handshake::primary_handshake(&mut s, &params).expect("handshake");
    (s, accepted.keys)
}

/// `frame` followed by its authentication trailer, as the channel sends it.
fn sealed(sealer: &mut FrameSealer, frame: &[u8]) -> Vec<u8> {
    let mut b = frame.to_vec();
    b.resize(frame.len() + TRAILER_LEN, 0);
    sealer.seal(&mut b, false);
    b
}

/// Sends what `bad` makes (given the session's sealer, which has sealed one valid frame) after
/// that valid frame and returns the backup's error, checking that only the valid frame reached
/// the backup's buffer and was acknowledged.
fn backup_error_after(bad: impl FnOnce(&mut FrameSealer, &[u8]) -> Vec<u8>) -> ChannelError {
    let (l, addr) = listener();
    let backup = std::thread::spawn(move || {
        let mut b = tcp::accept(&l, config(KEY)).expect("accept");
        let mut delivered = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = b.poll(|frame| {
                delivered.extend(frame.entries_with_seq().map(|(seq, _)| seq));
            });
            if let Err(e) = r {
                return (e, delivered, b.acked());
            }
            assert!(Instant::now() < deadline, "backup never failed");
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let (mut s, keys) = raw_primary(addr);
    let mut sealer = keys.frame_sealer();
    let good = logfmt::encode_frame(
        5,
        1,
        &[Entry::new(Position::at_exit(1), Event::Clock { ns: 42 })],
    )
    .expect("encode");
    let good = sealed(&mut sealer, &good);
    s.write_all(&good).expect("good frame");
    s.write_all(&bad(&mut sealer, &good)).expect("bad bytes");
    // Hang up: the backup must report the bad bytes (which come first), not the hang-up.
    drop(s);
    let (err, delivered, acked) = backup.join().expect("thread");
    assert_eq!(delivered, vec![1], "only the valid frame is applied");
    assert_eq!(acked, 1, "only the valid frame is acknowledged");
    err
}

/// The process's count of refused frames of `cause` (tests run in parallel: only ever more).
fn rejected(cause: RejectCause) -> u64 {
    ftvm_metrics::METRICS.frames_rejected[cause as usize].get()
}

fn frame(epoch: u64, first_seq: u64) -> Vec<u8> {
    logfmt::encode_frame(
        epoch,
        first_seq,
        &[Entry::new(
            Position::at_exit(2),
            Event::Interrupt { vector: 32 },
        )],
    )
    .expect("encode")
}

#[test]
fn garbage_after_the_handshake_is_a_corrupt_frame() {
    let before = rejected(RejectCause::Corrupt);
    let err = backup_error_after(|_, _| vec![0xEE; 100]);
    assert!(
        rejected(RejectCause::Corrupt) > before,
        "counted in ftvm_log_frames_rejected_total{{cause=\"{}\"}}",
        RejectCause::Corrupt.name()
    );
    assert!(
        matches!(
            err,
            ChannelError::CorruptFrame(logfmt::DecodeError::BadMagic { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn a_frame_with_a_bad_crc_is_never_applied() {
    let mut bad = frame(5, 2);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let before = rejected(RejectCause::Corrupt);
    // Sealed after the damage: the tag is right, the CRC is not (a primary's memory error).
    let err = backup_error_after(|s, _| sealed(s, &bad));
    assert!(
        rejected(RejectCause::Corrupt) > before,
        "counted in ftvm_log_frames_rejected_total{{cause=\"{}\"}}",
        RejectCause::Corrupt.name()
    );
    assert!(
        matches!(
            err,
            ChannelError::CorruptFrame(logfmt::DecodeError::CrcMismatch { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn a_sequence_gap_is_refused() {
    let before = rejected(RejectCause::SequenceGap);
    let err = backup_error_after(|s, _| sealed(s, &frame(5, 7)));
    assert!(
        rejected(RejectCause::SequenceGap) > before,
        "counted in ftvm_log_frames_rejected_total{{cause=\"{}\"}}",
        RejectCause::SequenceGap.name()
    );
    assert!(
        matches!(
            err,
            ChannelError::SequenceGap {
                expected: 2,
                found: 7
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_frame_from_an_older_epoch_is_refused() {
    let before = rejected(RejectCause::StaleEpoch);
    let err = backup_error_after(|s, _| sealed(s, &frame(4, 2)));
    assert!(
        rejected(RejectCause::StaleEpoch) > before,
        "counted in ftvm_log_frames_rejected_total{{cause=\"{}\"}}",
        RejectCause::StaleEpoch.name()
    );
    assert!(
        matches!(
            err,
            ChannelError::StaleEpoch {
                frame: 4,
                current: 5
            }
        ),
        "{err:?}"
    );
}

#[test]
fn an_oversized_frame_header_is_refused_before_buffering() {
    let mut huge = frame(5, 2);
    // Claim a 15 MiB body: within the format's limit, beyond the channel's frame limit.
    huge[28..32].copy_from_slice(&(15u32 << 20).to_le_bytes());
    let err = backup_error_after(|s, _| sealed(s, &huge));
    assert!(matches!(err, ChannelError::FrameTooLarge { .. }), "{err:?}");
}

#[test]
fn a_closed_primary_socket_is_peer_closed() {
    let err = backup_error_after(|_, _| Vec::new());
    assert!(matches!(err, ChannelError::PeerClosed), "{err:?}");
}

#[test]
fn a_well_formed_frame_without_a_valid_tag_is_never_applied() {
    // Right CRC, current epoch, next sequence number: everything but the key.
    let before = rejected(RejectCause::Unauthenticated);
    let err = backup_error_after(|_, _| {
        let mut forged = frame(5, 2);
        forged.extend_from_slice(&[0u8; TRAILER_LEN]);
        forged
    });
    assert!(
        matches!(err, ChannelError::Unauthenticated { what: "frame", .. }),
        "{err:?}"
    );
    assert!(rejected(RejectCause::Unauthenticated) > before);
    // Sealed under another session's keys.
    let err = backup_error_after(|_, _| {
        sealed(&mut SessionKeys::for_test(9).frame_sealer(), &frame(5, 2))
    });
    assert!(
        matches!(err, ChannelError::Unauthenticated { what: "frame", .. }),
        "{err:?}"
    );
}

#[test]
fn a_replayed_frame_is_refused() {
    // The valid frame again, byte for byte (its sequence number would be a repeat too, but the
    // tag's counter refuses it first).
    let err = backup_error_after(|_, good| good.to_vec());
    assert!(
        matches!(&err, ChannelError::Unauthenticated { what: "frame", reason } if reason.contains("replayed")),
        "{err:?}"
    );
}

#[test]
fn another_channel_crypto_is_refused_on_both_sides_naming_both() {
    let (l, addr) = listener();
    let backup = std::thread::spawn(move || tcp::accept(&l, config(KEY)).map(|_| ()));
    let mut none = config(KEY);
    none.crypto = ChannelCrypto::None;
    let primary = tcp::connect(addr, none).map(|_| ());
    let backup = backup.join().expect("thread");
    assert!(
        matches!(&primary, Err(ChannelError::CryptoMismatch { ours: ChannelCrypto::None, theirs }) if theirs == "auth"),
        "{primary:?}"
    );
    assert!(
        matches!(&backup, Err(ChannelError::CryptoMismatch { ours: ChannelCrypto::Auth, theirs }) if theirs == "none"),
        "{backup:?}"
    );
}
