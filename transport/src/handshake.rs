//! The channel's opening handshake: protocol version, session, fencing epoch, medium, the guest
//! both replicas run, and mutual pre-shared-key authentication by HMAC-SHA256
//! challenge/response. The key never crosses the wire; each side proves it holds the key by a
//! MAC over both sides' fresh nonces.
//!
//! It runs over any byte stream (the TCP connection itself, or the Unix control socket of the
//! shared-memory medium) before anything else does, so a peer that speaks another version or
//! holds another key learns nothing — in particular no shared-memory path, and no RDMA key.
//!
//! ```text
//! primary (connects)                         backup (listens)
//!   Hello     {version, session, epoch, medium, nonce_p, guest_p}   ──►
//!          ◄──  Challenge {status, version, session, epoch, nonce_b, mac_b, guest_b}
//!   Response  {status, mac_p}                                       ──►
//!          ◄──  Welcome   {status, resume_seq, medium info}
//! mac_b = HMAC(key, "ftvm-backup-v3"  ‖ Hello ‖ Challenge[0..56] ‖ guest_b)
//! mac_p = HMAC(key, "ftvm-primary-v3" ‖ Hello ‖ Challenge)
//! ```
//!
//! | message | bytes | layout |
//! |---|---|---|
//! | Hello | 104 | magic, type 1, role, version u16 @6, session u64 @8, epoch u64 @16, nonce_p @24..56, medium u32 @56, crypto u8 @60, 0 @61..64, guest_p @64..104 |
//! | Challenge | 136 | magic, type 2, status @5, version u16 @6, session u64 @8, epoch u64 @16, nonce_b @24..56, mac_b @56..88, crypto u8 @88, 0 @89..96, guest_b @96..136 |
//! | Response | 40 | magic, type 3, status @5, 0 @6..8, mac_p @8..40 |
//! | Welcome | 24 + info | magic, type 4, status @5, 0 @6..8, resume_seq u64 @8, info length u32 @16, 0 @20..24, then the medium info |
//!
//! A guest identity ([`GuestIdentity`], 40 bytes) is 32 opaque bytes and a u64 — for ftvm's
//! replicas the SHA-256 of the guest image and the guest memory size. The transport does not
//! interpret them: both sides must send equal ones. Each side compares them only once the
//! other has proved the key (both identities are covered by the MACs), and refuses a mismatch
//! with [`ChannelError::GuestMismatch`] naming both: the primary before its Response (status
//! 7, still with its MAC, so the backup reports it too), the backup after checking that
//! Response (Welcome status 7).
//!
//! The first 64 bytes of the Hello and the first 96 of the Challenge are laid out as in
//! protocol version 2, and each side reads the guest identity that follows only once the
//! version matches, so a peer of another version is refused by name
//! ([`ChannelError::VersionMismatch`]) rather than timed out. A refusal before authentication
//! (version, session, medium, crypto mode, epoch) is a 96-byte Challenge with no nonce, MAC or
//! identity; it carries the backup's crypto mode, so a mode mismatch names both modes
//! ([`ChannelError::CryptoMismatch`]).
//!
//! Both sides then derive the data phase's session keys ([`SessionKeys`]: HKDF-SHA256 of the
//! key, salted with both nonces, per direction), returned in [`Accepted`] and
//! [`PrimaryHello`]; with crypto `auth` every frame and ACK after the handshake is sealed with
//! them ([`crate::auth`]).
//!
//! All integers little-endian; every message starts with `b"FTHS"` and a type byte.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::auth::{ChannelCrypto, SessionKeys};
use crate::control;
use crate::error::ChannelError;

/// The channel protocol version this build speaks (handshake and data phase). Version 3 added
/// the guest identity to the Hello and the Challenge; version 4 the channel crypto mode
/// (Hello @60, Challenge @88) and, in the data phase, sealed frames and ACKs ([`crate::auth`]).
pub const PROTOCOL_VERSION: u16 = 4;

const MAGIC: [u8; 4] = *b"FTHS";
const HELLO: u8 = 1;
const CHALLENGE: u8 = 2;
const RESPONSE: u8 = 3;
const WELCOME: u8 = 4;
/// The Hello's first part, laid out as in every version: what a peer of another version sends.
const HELLO_HEAD: usize = 64;
const HELLO_LEN: usize = HELLO_HEAD + GUEST_LEN;
/// The Challenge's first part, laid out as in every version: a refusal is only this.
const CHALLENGE_HEAD: usize = 96;
const CHALLENGE_LEN: usize = CHALLENGE_HEAD + GUEST_LEN;
const RESPONSE_LEN: usize = 40;
/// An encoded [`GuestIdentity`].
const GUEST_LEN: usize = 40;
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
    /// A replica registering with (or a node probing) the service front, not a log channel.
    Front = 7,
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
            7 => Some(MediumKind::Front),
            _ => None,
        }
    }
}

/// What a replica runs, as the handshake compares it. Opaque to the transport, which only checks
/// that both sides send the same; ftvm's VMM puts the SHA-256 of its guest image and its guest
/// memory size here. All zero on connections that carry no guest (the arbiter's).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestIdentity {
    /// 32 opaque bytes: the guest image's SHA-256.
    pub image_digest: [u8; 32],
    /// An opaque number: the guest memory size in bytes.
    pub mem_size: u64,
}

impl GuestIdentity {
    fn encode(&self) -> [u8; GUEST_LEN] {
        let mut b = [0u8; GUEST_LEN];
        b[..32].copy_from_slice(&self.image_digest);
        b[32..].copy_from_slice(&self.mem_size.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Self {
        let mut image_digest = [0u8; 32];
        image_digest.copy_from_slice(&b[..32]);
        GuestIdentity {
            image_digest,
            mem_size: u64_at(b, 32),
        }
    }

    /// The image digest in hex.
    pub fn digest_hex(&self) -> String {
        self.image_digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl std::fmt::Debug for GuestIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GuestIdentity({}, {} bytes)",
            self.digest_hex(),
            self.mem_size
        )
    }
}

/// What a [`ChannelError::GuestMismatch`] says: each part that differs, with both values.
pub(crate) fn describe_mismatch(ours: &GuestIdentity, theirs: &GuestIdentity) -> String {
    let mut parts = Vec::new();
    if ours.image_digest != theirs.image_digest {
        parts.push(format!(
            "guest image sha256 {} here, {} at the peer",
            ours.digest_hex(),
            theirs.digest_hex()
        ));
    }
    if ours.mem_size != theirs.mem_size {
        parts.push(format!(
            "guest memory size {} bytes here, {} at the peer",
            ours.mem_size, theirs.mem_size
        ));
    }
    parts.join("; ")
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
    /// What this side runs; the peer must run the same.
    pub guest: GuestIdentity,
    /// What protects the data phase; the peer must use the same.
    pub crypto: ChannelCrypto,
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
    /// After authentication: the two sides run different guests (Response or Welcome).
    GuestMismatch = 7,
    /// Before authentication: the two sides use different channel crypto modes.
    CryptoMismatch = 8,
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
    /// The data phase's keys.
    pub keys: SessionKeys,
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

/// Domain labels of the two MACs (`v3`: the layout with guest identities).
const BACKUP_LABEL: &[u8] = b"ftvm-backup-v3";
const PRIMARY_LABEL: &[u8] = b"ftvm-primary-v3";

/// What `mac_b` covers: the whole Hello, the Challenge up to its MAC (status, version,
/// session, epoch, nonce), and the backup's guest identity.
fn backup_mac_input<'a>(hello: &'a [u8], challenge: &'a [u8]) -> [&'a [u8]; 3] {
    [hello, &challenge[..56], &challenge[CHALLENGE_HEAD..]]
}

fn nonce() -> Result<[u8; 32], ChannelError> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).map_err(|e| ChannelError::Io {
        context: "drawing a handshake nonce",
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(n)
}

fn crypto_name(b: u8) -> String {
    ChannelCrypto::from_u8(b).map_or_else(|| format!("unknown mode {b}"), |c| c.name().into())
}

/// The data phase's keys, from the Hello and the Challenge both sides hold.
fn session_keys(key: &PreSharedKey, hello: &[u8], challenge: &[u8]) -> SessionKeys {
    SessionKeys::derive(
        &key.0,
        &hello[24..56],
        &challenge[24..56],
        u64_at(hello, 8),
        u64_at(hello, 16),
        u32_at(hello, 56),
    )
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
        // The primary compares the guests before its Response: an honest backup never finds
        // a mismatch the primary did not.
        s if s == Status::GuestMismatch as u8 => ChannelError::BadHandshake(
            "the backup reports another guest, although the identities agreed here".into(),
        ),
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
    hello[60] = params.crypto as u8;
    hello[HELLO_HEAD..].copy_from_slice(&params.guest.encode());
    write_msg(stream, &hello, "sending hello")?;

    // The version-independent part first: a refusal, or a backup of another version, ends here.
    let mut challenge = [0u8; CHALLENGE_LEN];
    read_msg(
        stream,
        &mut challenge[..CHALLENGE_HEAD],
        "backup's challenge",
    )?;
    check_magic(&challenge, CHALLENGE, "backup's challenge")?;
    let status = challenge[5];
    let their_version = u16_at(&challenge, 6);
    let their_session = u64_at(&challenge, 8);
    if status == Status::CryptoMismatch as u8 {
        return Err(ChannelError::CryptoMismatch {
            ours: params.crypto,
            theirs: crypto_name(challenge[88]),
        });
    }
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
    read_msg(
        stream,
        &mut challenge[CHALLENGE_HEAD..],
        "backup's guest identity",
    )?;
    if params
        .key
        .mac(BACKUP_LABEL, &backup_mac_input(&hello, &challenge))
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

    let theirs = GuestIdentity::decode(&challenge[CHALLENGE_HEAD..]);
    let mismatch = theirs != params.guest;
    let mut response = [0u8; RESPONSE_LEN];
    response[..4].copy_from_slice(&MAGIC);
    response[4] = RESPONSE;
    if mismatch {
        response[5] = Status::GuestMismatch as u8;
    }
    let mac_p = params
        .key
        .mac(PRIMARY_LABEL, &[&hello, &challenge])
        .finalize()
        .into_bytes();
    response[8..40].copy_from_slice(&mac_p);
    if mismatch {
        // Authenticated, so the backup checks the identities and refuses too (best effort).
        let _ = write_msg(stream, &response, "sending refusal");
        return Err(ChannelError::GuestMismatch {
            ours: params.guest,
            theirs,
        });
    }
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
        keys: session_keys(&params.key, &hello, &challenge),
    })
}

/// What the backup learned about the primary it accepted.
#[derive(Debug, Clone)]
pub struct PrimaryHello {
    /// The primary's fencing epoch.
    pub epoch: u64,
    /// The data phase's keys.
    pub keys: SessionKeys,
}

/// The backup's side, in two steps so the medium can be set up between authentication and the
/// welcome: [`backup_authenticate`] checks the primary, then [`backup_welcome`] answers with the
/// medium info (sent only to an authenticated primary).
pub fn backup_authenticate<S: Read + Write>(
    stream: &mut S,
    params: &SessionParams,
) -> Result<PrimaryHello, ChannelError> {
    // The version-independent part first: a primary of another version is refused by name.
    let mut hello = [0u8; HELLO_LEN];
    read_msg(stream, &mut hello[..HELLO_HEAD], "primary's hello")?;
    check_magic(&hello, HELLO, "primary's hello")?;
    let their_version = u16_at(&hello, 6);
    let their_session = u64_at(&hello, 8);
    let their_epoch = u64_at(&hello, 16);
    let their_medium = MediumKind::from_u32(u32_at(&hello, 56));
    if their_version == PROTOCOL_VERSION {
        // The rest of our version's Hello, read before any refusal: a socket closed with
        // bytes unread may reset the connection before the primary has read why.
        read_msg(stream, &mut hello[HELLO_HEAD..], "primary's guest identity")?;
    }

    let mut challenge = [0u8; CHALLENGE_LEN];
    challenge[..4].copy_from_slice(&MAGIC);
    challenge[4] = CHALLENGE;
    challenge[6..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    challenge[8..16].copy_from_slice(&params.session_id.to_le_bytes());
    challenge[16..24].copy_from_slice(&params.epoch.to_le_bytes());
    challenge[88] = params.crypto as u8;
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
    } else if hello[60] != params.crypto as u8 {
        (
            Status::CryptoMismatch,
            Some(ChannelError::CryptoMismatch {
                ours: params.crypto,
                theirs: crypto_name(hello[60]),
            }),
        )
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
        // Tell the primary why (best effort), then fail; no nonce, MAC or identity is sent.
        let _ = write_msg(stream, &challenge[..CHALLENGE_HEAD], "sending refusal");
        return Err(err);
    }
    let nonce_b = nonce()?;
    challenge[24..56].copy_from_slice(&nonce_b);
    challenge[CHALLENGE_HEAD..].copy_from_slice(&params.guest.encode());
    let mac_b = params
        .key
        .mac(BACKUP_LABEL, &backup_mac_input(&hello, &challenge))
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
        .mac(PRIMARY_LABEL, &[&hello, &challenge])
        .verify_slice(&response[8..40]);
    let refuse = |stream: &mut S, status: Status| {
        let mut welcome = [0u8; WELCOME_LEN];
        welcome[..4].copy_from_slice(&MAGIC);
        welcome[4] = WELCOME;
        welcome[5] = status as u8;
        let _ = write_msg(stream, &welcome, "sending refusal");
    };
    if verified.is_err() {
        refuse(stream, Status::AuthFailed);
        return Err(ChannelError::PeerNotAuthenticated);
    }
    // The primary proved the key over its Hello: its identity is its own.
    let theirs = GuestIdentity::decode(&hello[HELLO_HEAD..]);
    if theirs != params.guest {
        refuse(stream, Status::GuestMismatch);
        return Err(ChannelError::GuestMismatch {
            ours: params.guest,
            theirs,
        });
    }
    if response[5] != Status::Ok as u8 {
        return Err(ChannelError::BadHandshake(format!(
            "the primary refuses with status {} although the identities agree",
            response[5]
        )));
    }
    Ok(PrimaryHello {
        epoch: their_epoch,
        keys: session_keys(&params.key, &hello, &challenge),
    })
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
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn params(key: &[u8], epoch: u64) -> SessionParams {
        SessionParams {
            session_id: 7,
            epoch,
            medium: MediumKind::Tcp,
            key: PreSharedKey::new(key.to_vec()).expect("key"),
            guest: GuestIdentity {
                image_digest: [0x11; 32],
                mem_size: 16 << 20,
            },
            crypto: ChannelCrypto::Auth,
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
    fn another_guest_image_is_refused_on_both_sides_naming_both_digests() {
        let mut other = params(KEY, 3);
        other.guest.image_digest = [0xab; 32];
        let (p, b) = run(other, params(KEY, 3));
        let ours = "ab".repeat(32);
        let theirs = "11".repeat(32);
        match &p {
            Err(e @ ChannelError::GuestMismatch { ours: o, theirs: t }) => {
                assert_eq!((o.image_digest, t.image_digest), ([0xab; 32], [0x11; 32]));
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!(
                        "guest image sha256 {ours} here, {theirs} at the peer"
                    )),
                    "{msg}"
                );
                assert!(!msg.contains("memory size"), "{msg}");
            }
            other => panic!("primary: {other:?}"),
        }
        match &b {
            Err(e @ ChannelError::GuestMismatch { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!(
                        "guest image sha256 {theirs} here, {ours} at the peer"
                    )),
                    "{msg}"
                );
            }
            other => panic!("backup: {other:?}"),
        }
    }

    #[test]
    fn another_memory_size_is_refused_on_both_sides_naming_both_sizes() {
        let mut other = params(KEY, 3);
        other.guest.mem_size = 32 << 20;
        let (p, b) = run(params(KEY, 3), other);
        for (side, r, here, there) in [
            ("primary", p.map(|_| ()), 16u64 << 20, 32u64 << 20),
            ("backup", b.map(|_| ()), 32 << 20, 16 << 20),
        ] {
            match r {
                Err(e @ ChannelError::GuestMismatch { .. }) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&format!(
                            "guest memory size {here} bytes here, {there} at the peer"
                        )) && !msg.contains("sha256"),
                        "{side}: {msg}"
                    );
                }
                other => panic!("{side}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_key_mismatch_is_reported_before_a_guest_mismatch() {
        let mut other = params(b"another-key-of-16+", 3);
        other.guest.mem_size = 1;
        let (p, b) = run(other, params(KEY, 3));
        assert!(
            matches!(p, Err(ChannelError::PeerNotAuthenticated)),
            "{p:?}"
        );
        assert!(matches!(b, Err(ChannelError::AuthRejected)), "{b:?}");
    }

    /// Runs the handshake through a relay that flips one byte, at offset `at` of what the
    /// primary sends (`to_backup`) or of what the backup sends.
    fn run_tampered(
        to_backup: bool,
        at: usize,
    ) -> (
        Result<Accepted, ChannelError>,
        Result<PrimaryHello, ChannelError>,
    ) {
        let (mut a, relay_a) = UnixStream::pair().expect("pair");
        let (relay_b, mut b) = UnixStream::pair().expect("pair");
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
        }
        let pump = |mut from: UnixStream, mut to: UnixStream, flip: Option<usize>| {
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                let mut seen = 0;
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Some(at) = flip.filter(|at| (seen..seen + n).contains(at)) {
                        buf[at - seen] ^= 0x01;
                    }
                    seen += n;
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = to.shutdown(std::net::Shutdown::Both);
            })
        };
        let (flip_p, flip_b) = if to_backup {
            (Some(at), None)
        } else {
            (None, Some(at))
        };
        pump(
            relay_a.try_clone().expect("clone"),
            relay_b.try_clone().expect("clone"),
            flip_p,
        );
        pump(relay_b, relay_a, flip_b);
        let backup_side = std::thread::spawn(move || {
            let hello = backup_authenticate(&mut b, &params(KEY, 3))?;
            backup_welcome(&mut b, 1, b"info")?;
            Ok(hello)
        });
        let p = primary_handshake(&mut a, &params(KEY, 3));
        drop(a);
        (p, backup_side.join().expect("backup thread"))
    }

    #[test]
    fn the_guest_identities_are_covered_by_the_macs() {
        // A relay that changes the primary's identity (in the Hello) or the backup's (in the
        // Challenge) breaks a proof: the change is reported as an authentication failure, never
        // taken for the other side's guest.
        for (to_backup, at) in [(true, 64), (true, 100), (false, 96), (false, 135)] {
            let (p, b) = run_tampered(to_backup, at);
            assert!(
                matches!(p, Err(ChannelError::PeerNotAuthenticated)),
                "byte {at} towards the {}: primary {p:?}",
                if to_backup { "backup" } else { "primary" }
            );
            assert!(b.is_err(), "byte {at}: backup {b:?}");
        }
        // The same relay, flipping nothing the handshake reads, changes nothing.
        let (p, b) = run_tampered(true, 10_000);
        assert!(p.is_ok() && b.is_ok(), "{p:?} {b:?}");
    }

    #[test]
    fn a_version_2_peer_is_refused_by_name_not_timed_out() {
        // A version-2 Hello is 64 bytes; the backup must not wait for a guest identity.
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        b.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut hello = [0u8; HELLO_HEAD];
        hello[..4].copy_from_slice(&MAGIC);
        hello[4] = HELLO;
        hello[5] = 1;
        hello[6..8].copy_from_slice(&2u16.to_le_bytes());
        hello[8..16].copy_from_slice(&7u64.to_le_bytes());
        a.write_all(&hello).expect("hello");
        let started = std::time::Instant::now();
        let err = backup_authenticate(&mut b, &params(KEY, 3)).expect_err("refused");
        assert!(
            matches!(
                err,
                ChannelError::VersionMismatch {
                    ours: PROTOCOL_VERSION,
                    theirs: 2
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        let mut refusal = [0u8; CHALLENGE_HEAD];
        a.read_exact(&mut refusal).expect("the refusal");
        assert_eq!(refusal[5], Status::VersionMismatch as u8);

        // A version-2 backup's Challenge is 96 bytes; the primary must not wait for more.
        let (mut a, mut b) = UnixStream::pair().expect("pair");
        a.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let old_backup = std::thread::spawn(move || {
            let mut hello = [0u8; HELLO_LEN];
            b.read_exact(&mut hello).expect("hello");
            let mut challenge = [0u8; CHALLENGE_HEAD];
            challenge[..4].copy_from_slice(&MAGIC);
            challenge[4] = CHALLENGE;
            challenge[6..8].copy_from_slice(&2u16.to_le_bytes());
            b.write_all(&challenge).expect("challenge");
            b
        });
        let err = primary_handshake(&mut a, &params(KEY, 3)).expect_err("refused");
        assert!(
            matches!(err, ChannelError::VersionMismatch { theirs: 2, .. }),
            "{err:?}"
        );
        let _b = old_backup.join().expect("old backup");
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
