//! The channel's opening handshake: protocol version, session, fencing epoch, medium, and mutual
//! pre-shared-key authentication by HMAC-SHA256 challenge/response. The key never crosses the
//! wire; each side proves it holds the key by a MAC over both sides' fresh nonces.
//!
//! It runs over any byte stream (the TCP connection itself, or the Unix control socket of the
//! shared-memory medium) before anything else does, so a peer that speaks another version or
//! holds another key learns nothing — in particular no shared-memory path, and (later) no RDMA key.
//!
//! ```text
//! primary (connects)                         backup (listens)
//!   Hello     {version, session, epoch, medium, nonce_p}  ──►
//!          ◄──  Challenge {status, version, session, epoch, nonce_b, mac_b}
//!   Response  {mac_p}                                     ──►
//!          ◄──  Welcome   {status, resume_seq, medium info}
//! mac_b = HMAC(key, "ftvm-backup-v1"  ‖ Hello ‖ nonce_b)
//! mac_p = HMAC(key, "ftvm-primary-v1" ‖ Hello ‖ Challenge)
//! ```
//! All integers little-endian; every message starts with `b"FTHS"` and a type byte.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::control;
use crate::error::ChannelError;

/// The channel protocol version this build speaks (handshake and data phase).
pub const PROTOCOL_VERSION: u16 = 2;

const MAGIC: [u8; 4] = *b"FTHS";
const HELLO: u8 = 1;
const CHALLENGE: u8 = 2;
const RESPONSE: u8 = 3;
const WELCOME: u8 = 4;
const HELLO_LEN: usize = 64;
const CHALLENGE_LEN: usize = 96;
const RESPONSE_LEN: usize = 40;
const WELCOME_LEN: usize = 24;
/// Longest medium description a Welcome may carry.
pub const MAX_MEDIUM_INFO: usize = 4096;

/// Smallest key accepted: 16 bytes (128 bits).
pub const MIN_KEY_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// A pre-shared key. Its bytes are never printed.
#[derive(Clone)]
pub struct PreSharedKey(Vec<u8>);

impl PreSharedKey {
    /// Wraps key bytes; refuses keys shorter than [`MIN_KEY_LEN`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, ChannelError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_LEN {
            return Err(ChannelError::Config(format!(
                "pre-shared key has {} bytes, need at least {MIN_KEY_LEN}",
                bytes.len()
            )));
        }
        Ok(PreSharedKey(bytes))
    }

    /// Reads a key file: its contents, with surrounding whitespace trimmed. A file that group
    /// or others may access (any of the mode bits 0o077) is refused with
    /// [`ChannelError::KeyFilePermissions`] before anything is read from it.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ChannelError> {
        use std::os::unix::fs::PermissionsExt;
        let key_file = |source| ChannelError::KeyFile {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(key_file)?;
        let mode = file.metadata().map_err(key_file)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(ChannelError::KeyFilePermissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut raw = Vec::new();
        file.read_to_end(&mut raw).map_err(key_file)?;
        Self::new(raw.trim_ascii().to_vec())
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        // HMAC accepts keys of any length; `new_from_slice` cannot fail for HMAC.
        let mut mac = match HmacSha256::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        mac.update(label);
        for part in parts {
            mac.update(part);
        }
        mac
    }

    /// HMAC-SHA256 of `label` followed by `parts`, keyed with this key: for small authenticated
    /// messages outside the channel handshake (the service front's registrations, say).
    pub fn tag(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.mac(label, parts).finalize().into_bytes().into()
    }

    /// Checks, in constant time, that `tag` is a prefix (at least 16 bytes) of [`Self::tag`].
    pub fn verify_tag(&self, label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
        tag.len() >= 16 && self.mac(label, parts).verify_truncated_left(tag).is_ok()
    }
}

impl std::fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreSharedKey({} bytes)", self.0.len())
    }
}

/// Which medium carries the data phase; both sides must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum MediumKind {
    /// Kernel TCP.
    Tcp = 1,
    /// A shared-memory ring between two processes on one host.
    Shm = 2,
    /// A client of the failover arbiter server (`ft-arbiter`), not a log channel.
    Arbiter = 3,
    /// Raw Ethernet frames over a DPDK port (set up over a TCP control connection).
    Dpdk = 4,
    /// RDMA writes over a reliable-connected queue pair (set up over the TCP handshake socket).
    Rdma = 5,
    /// A backup joining a running primary: the state transfer's connection, not a log channel.
    Join = 6,
}

impl MediumKind {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(MediumKind::Tcp),
            2 => Some(MediumKind::Shm),
            3 => Some(MediumKind::Arbiter),
            4 => Some(MediumKind::Dpdk),
            5 => Some(MediumKind::Rdma),
            6 => Some(MediumKind::Join),
            _ => None,
        }
    }
}

/// What the two sides must agree on.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// Identifies the FT pair; a primary of another pair is refused.
    pub session_id: u64,
    /// The sender's fencing epoch; a backup refuses a primary older than the newest it has seen.
    pub epoch: u64,
    /// The medium of the data phase.
    pub medium: MediumKind,
    /// The shared key.
    pub key: PreSharedKey,
}

/// Reasons a backup refuses a primary, as carried in Challenge and Welcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    Ok = 0,
    VersionMismatch = 1,
    SessionMismatch = 2,
    MediumMismatch = 3,
    StaleEpoch = 4,
    AuthFailed = 5,
    /// After authentication: the backup could not set up its side of the medium (e.g. its RDMA
    /// device); the Welcome's medium info carries the reason as text.
    MediumUnavailable = 6,
}

/// Longest reason text a [`backup_refuse_medium`] sends.
const MAX_REASON: usize = 512;

/// What the primary learns from a successful handshake.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The epoch both sides now use (the primary's).
    pub epoch: u64,
    /// The sequence number the backup expects next.
    pub resume_seq: u64,
    /// Medium-specific set-up data (for shared memory: where the ring is).
    pub medium_info: Vec<u8>,
}

fn read_msg<S: Read>(
    stream: &mut S,
    buf: &mut [u8],
    what: &'static str,
) -> Result<(), ChannelError> {
    control::read_exact(stream, buf, what)
}

fn write_msg<S: Write>(stream: &mut S, buf: &[u8], what: &'static str) -> Result<(), ChannelError> {
    control::write_all(stream, buf, what)
}

fn check_magic(buf: &[u8], kind: u8, what: &'static str) -> Result<(), ChannelError> {
    if buf[..4] != MAGIC {
        return Err(ChannelError::BadHandshake(format!(
            "{what}: not an ftvm handshake (magic {:02x?})",
            &buf[..4]
        )));
    }
    if buf[4] != kind {
        return Err(ChannelError::BadHandshake(format!(
            "{what}: expected message type {kind}, got {}",
            buf[4]
        )));
    }
    Ok(())
}

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}
fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}
fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

fn nonce() -> Result<[u8; 32], ChannelError> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).map_err(|e| ChannelError::Io {
        context: "drawing a handshake nonce",
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(n)
}

fn refusal(status: u8, theirs: u16, params_session: u64, their_session: u64) -> ChannelError {
    match status {
        s if s == Status::VersionMismatch as u8 => ChannelError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs,
        },
        s if s == Status::SessionMismatch as u8 => ChannelError::SessionMismatch {
            ours: params_session,
            theirs: their_session,
        },
        s if s == Status::MediumMismatch as u8 => ChannelError::MediumMismatch,
        s if s == Status::StaleEpoch as u8 => ChannelError::StaleEpoch {
            frame: 0,
            current: 0,
        },
        s if s == Status::AuthFailed as u8 => ChannelError::AuthRejected,
        other => ChannelError::BadHandshake(format!("unknown refusal status {other}")),
    }
}

/// The primary's side: proves the key, checks the backup's proof, and returns what the backup
/// accepted. The stream should have read and write timeouts set (a silent peer then gives
/// [`ChannelError::HandshakeTimeout`] instead of a hang).
pub fn primary_handshake<S: Read + Write>(
    stream: &mut S,
    params: &SessionParams,
) -> Result<Accepted, ChannelError> {
    let mut hello = [0u8; HELLO_LEN];
    hello[..4].copy_from_slice(&MAGIC);
    hello[4] = HELLO;
    hello[5] = 1; // role: primary
    hello[6..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    hello[8..16].copy_from_slice(&params.session_id.to_le_bytes());
    hello[16..24].copy_from_slice(&params.epoch.to_le_bytes());
    hello[24..56].copy_from_slice(&nonce()?);
    hello[56..60].copy_from_slice(&(params.medium as u32).to_le_bytes());
    write_msg(stream, &hello, "sending hello")?;

    let mut challenge = [0u8; CHALLENGE_LEN];
    read_msg(stream, &mut challenge, "backup's challenge")?;
    check_magic(&challenge, CHALLENGE, "backup's challenge")?;
    let status = challenge[5];
    let their_version = u16_at(&challenge, 6);
    let their_session = u64_at(&challenge, 8);
    if status != Status::Ok as u8 {
        return Err(refusal(
            status,
            their_version,
            params.session_id,
            their_session,
        ));
    }
    if their_version != PROTOCOL_VERSION {
        return Err(ChannelError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: their_version,
        });
    }
    let nonce_b = &challenge[24..56];
    if params
        .key
        .mac(b"ftvm-backup-v1", &[&hello, nonce_b])
        .verify_slice(&challenge[56..88])
        .is_err()
    {
        // Tell the backup why we stop (no MAC), so it reports the key mismatch too.
        let mut refusal = [0u8; RESPONSE_LEN];
        refusal[..4].copy_from_slice(&MAGIC);
        refusal[4] = RESPONSE;
        refusal[5] = Status::AuthFailed as u8;
        let _ = write_msg(stream, &refusal, "sending refusal");
        return Err(ChannelError::PeerNotAuthenticated);
    }

    let mut response = [0u8; RESPONSE_LEN];
    response[..4].copy_from_slice(&MAGIC);
    response[4] = RESPONSE;
    let mac_p = params
        .key
        .mac(b"ftvm-primary-v1", &[&hello, &challenge])
        .finalize()
        .into_bytes();
    response[8..40].copy_from_slice(&mac_p);
    write_msg(stream, &response, "sending response")?;

    let mut welcome = [0u8; WELCOME_LEN];
    read_msg(stream, &mut welcome, "backup's welcome")?;
    check_magic(&welcome, WELCOME, "backup's welcome")?;
    if welcome[5] == Status::MediumUnavailable as u8 {
        let len = (u32_at(&welcome, 16) as usize).min(MAX_REASON);
        let mut reason = vec![0u8; len];
        read_msg(stream, &mut reason, "backup's reason")?;
        return Err(ChannelError::PeerMediumFailed(
            String::from_utf8_lossy(&reason).into_owned(),
        ));
    }
    if welcome[5] != Status::Ok as u8 {
        return Err(refusal(
            welcome[5],
            their_version,
            params.session_id,
            their_session,
        ));
    }
    let resume_seq = u64_at(&welcome, 8);
    let info_len = u32_at(&welcome, 16) as usize;
    if info_len > MAX_MEDIUM_INFO {
        return Err(ChannelError::BadHandshake(format!(
            "welcome announces {info_len} bytes of medium info (max {MAX_MEDIUM_INFO})"
        )));
    }
    let mut medium_info = vec![0u8; info_len];
    read_msg(stream, &mut medium_info, "backup's medium info")?;
    Ok(Accepted {
        epoch: params.epoch,
        resume_seq,
        medium_info,
    })
}

/// What the backup learned about the primary it accepted.
#[derive(Debug, Clone)]
pub struct PrimaryHello {
    /// The primary's fencing epoch.
    pub epoch: u64,
}

/// The backup's side, in two steps so the medium can be set up between authentication and the
/// welcome: [`backup_authenticate`] checks the primary, then [`backup_welcome`] answers with the
/// medium info (sent only to an authenticated primary).
pub fn backup_authenticate<S: Read + Write>(
    stream: &mut S,
    params: &SessionParams,
) -> Result<PrimaryHello, ChannelError> {
    let mut hello = [0u8; HELLO_LEN];
    read_msg(stream, &mut hello, "primary's hello")?;
    check_magic(&hello, HELLO, "primary's hello")?;
    let their_version = u16_at(&hello, 6);
    let their_session = u64_at(&hello, 8);
    let their_epoch = u64_at(&hello, 16);
    let their_medium = MediumKind::from_u32(u32_at(&hello, 56));

    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge[..4].copy_from_slice(&MAGIC);
    challenge[4] = CHALLENGE;
    challenge[6..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    challenge[8..16].copy_from_slice(&params.session_id.to_le_bytes());
    challenge[16..24].copy_from_slice(&params.epoch.to_le_bytes());
    let (status, err) = if their_version != PROTOCOL_VERSION {
        (
            Status::VersionMismatch,
            Some(ChannelError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: their_version,
            }),
        )
    } else if their_session != params.session_id {
        (
            Status::SessionMismatch,
            Some(ChannelError::SessionMismatch {
                ours: params.session_id,
                theirs: their_session,
            }),
        )
    } else if their_medium != Some(params.medium) {
        (Status::MediumMismatch, Some(ChannelError::MediumMismatch))
    } else if their_epoch < params.epoch {
        (
            Status::StaleEpoch,
            Some(ChannelError::StaleEpoch {
                frame: their_epoch,
                current: params.epoch,
            }),
        )
    } else {
        (Status::Ok, None)
    };
    challenge[5] = status as u8;
    if let Some(err) = err {
        // Tell the primary why (best effort), then fail; no nonce or MAC is sent.
        let _ = write_msg(stream, &challenge, "sending refusal");
        return Err(err);
    }
    let nonce_b = nonce()?;
    challenge[24..56].copy_from_slice(&nonce_b);
    let mac_b = params
        .key
        .mac(b"ftvm-backup-v1", &[&hello, &nonce_b])
        .finalize()
        .into_bytes();
    challenge[56..88].copy_from_slice(&mac_b);
    write_msg(stream, &challenge, "sending challenge")?;

    let mut response = [0u8; RESPONSE_LEN];
    read_msg(stream, &mut response, "primary's response")?;
    check_magic(&response, RESPONSE, "primary's response")?;
    if response[5] == Status::AuthFailed as u8 {
        return Err(ChannelError::AuthRejected);
    }
    let verified = params
        .key
        .mac(b"ftvm-primary-v1", &[&hello, &challenge])
        .verify_slice(&response[8..40]);
    if verified.is_err() {
        let mut welcome = [0u8; WELCOME_LEN];
        welcome[..4].copy_from_slice(&MAGIC);
        welcome[4] = WELCOME;
        welcome[5] = Status::AuthFailed as u8;
        let _ = write_msg(stream, &welcome, "sending refusal");
        return Err(ChannelError::PeerNotAuthenticated);
    }
    Ok(PrimaryHello { epoch: their_epoch })
}

/// Second step of the backup's side, when the medium could not be set up after all (its device
/// failed, say): tells the authenticated primary why, so it reports that instead of a hang-up.
/// The reason is cut to 512 bytes.
pub fn backup_refuse_medium<S: Write>(stream: &mut S, reason: &str) -> Result<(), ChannelError> {
    let mut end = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut welcome = Vec::with_capacity(WELCOME_LEN + reason.len());
    welcome.extend_from_slice(&MAGIC);
    welcome.push(WELCOME);
    welcome.push(Status::MediumUnavailable as u8);
    welcome.extend_from_slice(&[0; 10]);
    welcome.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    welcome.extend_from_slice(&[0; 4]);
    welcome.extend_from_slice(reason);
    write_msg(stream, &welcome, "sending the medium's refusal")
}

/// Second step of the backup's side: accept the authenticated primary.
pub fn backup_welcome<S: Write>(
    stream: &mut S,
    resume_seq: u64,
    medium_info: &[u8],
) -> Result<(), ChannelError> {
    if medium_info.len() > MAX_MEDIUM_INFO {
        return Err(ChannelError::Config(format!(
            "medium info of {} bytes exceeds {MAX_MEDIUM_INFO}",
            medium_info.len()
        )));
    }
    let mut welcome = Vec::with_capacity(WELCOME_LEN + medium_info.len());
    welcome.extend_from_slice(&MAGIC);
    welcome.push(WELCOME);
    welcome.push(Status::Ok as u8);
    welcome.extend_from_slice(&[0, 0]);
    welcome.extend_from_slice(&resume_seq.to_le_bytes());
    welcome.extend_from_slice(&(medium_info.len() as u32).to_le_bytes());
    welcome.extend_from_slice(&[0; 4]);
    welcome.extend_from_slice(medium_info);
    write_msg(stream, &welcome, "sending welcome")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn params(key: &[u8], epoch: u64) -> SessionParams {
        SessionParams {
            session_id: 7,
            epoch,
            medium: MediumKind::Tcp,
            key: PreSharedKey::new(key.to_vec()).expect("key"),
        }
    }

    fn run(
        primary: SessionParams,
        backup: SessionParams,
    ) -> (
        Result<Accepted, ChannelError>,
        Result<PrimaryHello, ChannelError>,
    ) {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
        }
        let backup_side = std::thread::spawn(move || {
            let hello = backup_authenticate(&mut b, &backup)?;
            backup_welcome(&mut b, 1, b"info")?;
            Ok(hello)
        });
        let p = primary_handshake(&mut a, &primary);
        let b = backup_side.join().expect("backup thread");
        (p, b)
    }

    const KEY: &[u8] = b"0123456789abcdef-key";

    /// A backup whose medium fails after authentication: the primary gets the reason, cut to
    /// 512 bytes on a character boundary, and nothing is left unread on the socket.
    #[test]
    fn medium_refusal_carries_the_reason() {
        for (reason, expect) in [
            ("RDMA device \"rxe9\": no such device".to_string(), None),
            ("é".repeat(300), Some("é".repeat(256))),
        ] {
            let (mut a, mut b) = UnixStream::pair().expect("pair");
            a.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let sent = reason.clone();
            let backup_side = std::thread::spawn(move || {
                backup_authenticate(&mut b, &params(KEY, 3))?;
                backup_refuse_medium(&mut b, &sent)?;
                Ok::<_, ChannelError>(b)
            });
            let p = primary_handshake(&mut a, &params(KEY, 3));
            let _b = backup_side
                .join()
                .expect("backup thread")
                .expect("backup side");
            match p {
                Err(ChannelError::PeerMediumFailed(got)) => {
                    assert_eq!(got, expect.unwrap_or(reason));
                }
                other => panic!("expected the backup's reason, got {other:?}"),
            }
            a.set_nonblocking(true).expect("nonblocking");
            let mut rest = [0u8; 1];
            assert!(
                matches!(std::io::Read::read(&mut a, &mut rest), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                "bytes left after the refusal"
            );
        }
    }

    #[test]
    fn matching_peers_agree() {
        let (p, b) = run(params(KEY, 3), params(KEY, 3));
        let accepted = p.expect("primary accepted");
        assert_eq!(accepted.resume_seq, 1);
        assert_eq!(accepted.medium_info, b"info");
        assert_eq!(b.expect("backup accepted").epoch, 3);
    }

    #[test]
    fn wrong_key_is_refused_on_both_sides() {
        let (p, b) = run(params(b"another-key-of-16+", 3), params(KEY, 3));
        assert!(
            matches!(p, Err(ChannelError::PeerNotAuthenticated)),
            "{p:?}"
        );
        // The primary stops at the backup's bad proof and says so; the backup reports it.
        assert!(matches!(b, Err(ChannelError::AuthRejected)), "{b:?}");
    }

    #[test]
    fn stale_epoch_is_refused() {
        let (p, b) = run(params(KEY, 2), params(KEY, 3));
        assert!(matches!(p, Err(ChannelError::StaleEpoch { .. })), "{p:?}");
        assert!(matches!(
            b,
            Err(ChannelError::StaleEpoch {
                frame: 2,
                current: 3
            })
        ));
    }

    #[test]
    fn other_session_is_refused() {
        let mut other = params(KEY, 3);
        other.session_id = 8;
        let (p, b) = run(other, params(KEY, 3));
        assert!(
            matches!(p, Err(ChannelError::SessionMismatch { ours: 8, theirs: 7 })),
            "{p:?}"
        );
        assert!(matches!(b, Err(ChannelError::SessionMismatch { .. })));
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        b.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        a.write_all(&[0xAB; 200]).expect("write");
        let err = backup_authenticate(&mut b, &params(KEY, 1)).expect_err("garbage");
        assert!(matches!(err, ChannelError::BadHandshake(_)), "{err:?}");
    }

    #[test]
    fn key_files_readable_by_group_or_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("psk");
        std::fs::write(&path, b"  key-file-test-key-0123456789\n").expect("write");
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            match PreSharedKey::from_file(&path) {
                Err(e @ ChannelError::KeyFilePermissions { .. }) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&format!("permissions {mode:04o} for '{}'", path.display())),
                        "{msg}"
                    );
                    assert!(msg.contains("too open"), "{msg}");
                }
                other => panic!("mode {mode:o} must be refused, got {other:?}"),
            }
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let key = PreSharedKey::from_file(&path).expect("an owner-only key file is read");
            let expected =
                PreSharedKey::new(b"key-file-test-key-0123456789".to_vec()).expect("key");
            assert_eq!(
                key.tag(b"t", &[]),
                expected.tag(b"t", &[]),
                "trimmed contents"
            );
        }
        let missing = dir.path().join("nope");
        match PreSharedKey::from_file(&missing) {
            Err(e @ ChannelError::KeyFile { .. }) => {
                assert!(e.to_string().contains("nope"), "{e}")
            }
            other => panic!("a missing key file is a KeyFile error, got {other:?}"),
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(matches!(
            PreSharedKey::new(b"short".to_vec()),
            Err(ChannelError::Config(_))
        ));
        assert_eq!(
            format!("{:?}", PreSharedKey::new(KEY.to_vec()).expect("key")),
            "PreSharedKey(20 bytes)"
        );
    }
}
