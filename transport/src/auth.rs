//! Authentication of every log frame and every ACK after the handshake.
//!
//! The handshake proves both sides hold the pre-shared key; this module keeps everything after
//! it honest. From the key and both sides' fresh handshake nonces, HKDF-SHA256 derives two
//! 128-bit session keys, one per direction ([`SessionKeys`]). The primary appends a 24-byte
//! **trailer** to every frame it puts on the medium, heartbeats included:
//!
//! ```text
//! | frame (logfmt, unchanged) | counter u64 LE | tag [16] |
//! ```
//!
//! `tag` is GMAC (AES-128-GCM with an empty plaintext; the frame and the counter are the
//! associated data) under the primary-to-backup key, with the nonce `counter ‖ 0u32`.
//! The frame's header carries the epoch and the first sequence number, so the tag covers the
//! bytes, the epoch, the sequence number and — through the per-direction key — the
//! direction. Counters are per class: data frames count up from 1, heartbeats (empty frames)
//! count up from `1 | HEARTBEAT_CLASS`; the receiver accepts a frame only if its tag verifies
//! and its counter is above the last one accepted in its class. So a forged frame (no key), a
//! replayed or reordered one (counter not above), one moved to another session or epoch (other
//! keys) or turned around (other key) is refused with
//! [`ChannelError::Unauthenticated`](crate::ChannelError::Unauthenticated) before anything in
//! it is looked at, counted, acknowledged or applied. A counter is never used twice under one
//! key (the sealer increments it for every tag it makes), as GCM requires.
//!
//! ACKs carry the same kind of seal under the backup-to-primary key: `counter ‖ tag` over the
//! ACK's epoch, received and replayed positions ([`AckSealer`], [`AckOpener`]). Media whose
//! ACK is a message (TCP, DPDK) carry it; see each medium for what it does.
//!
//! `--channel-crypto encrypt` also hides the log: the frame's body is encrypted with
//! AES-128-GCM under the same key, counter and nonce (the tag then covers the ciphertext, and
//! the header and counter as associated data). The header stays in clear — media read the
//! frame's length from it — except its CRC field, which is zero on the wire (a CRC of the
//! plaintext would let anyone test guesses of it); the backup decrypts into a buffer of its
//! own, writes the CRC of the plaintext back and then checks the frame as usual, so its ring,
//! journal and everything after see exactly the frames of `auth`. ACKs are sealed as in
//! `auth` (they carry positions, no guest data).
//!
//! `--channel-crypto none` turns all of this off (no trailer, no seals); both sides must agree,
//! which the handshake checks.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::error::ChannelError;

/// Bytes a sealed frame carries after the frame itself: counter (8) and tag (16).
pub const TRAILER_LEN: usize = 24;
/// Bytes of an ACK's seal: counter (8) and tag (16).
pub const ACK_SEAL_LEN: usize = 24;
/// The counter bit of the heartbeat class (empty frames, sent by the medium pump rather than
/// the log writer, so they count on their own).
pub const HEARTBEAT_CLASS: u64 = 1 << 63;

/// What protects the log channel after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum ChannelCrypto {
    /// No per-frame protection: only the handshake is authenticated. Only when asked for.
    None = 0,
    /// Every frame and ACK carries a GMAC tag (the default).
    #[default]
    Auth = 1,
    /// As `Auth`, and every frame's body is encrypted (AES-128-GCM).
    Encrypt = 2,
}

impl ChannelCrypto {
    /// The option's name (`none`, `auth`, `encrypt`).
    pub const fn name(self) -> &'static str {
        match self {
            ChannelCrypto::None => "none",
            ChannelCrypto::Auth => "auth",
            ChannelCrypto::Encrypt => "encrypt",
        }
    }

    /// Whether frames carry a trailer and ACKs a seal (`auth` and `encrypt`).
    pub const fn seals(self) -> bool {
        !matches!(self, ChannelCrypto::None)
    }

    /// The mode a handshake byte names.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(ChannelCrypto::None),
            1 => Some(ChannelCrypto::Auth),
            2 => Some(ChannelCrypto::Encrypt),
            _ => None,
        }
    }
}

impl std::fmt::Display for ChannelCrypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ChannelCrypto {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auth" => Ok(ChannelCrypto::Auth),
            "none" => Ok(ChannelCrypto::None),
            "encrypt" => Ok(ChannelCrypto::Encrypt),
            other => Err(format!(
                "unknown channel crypto '{other}': use auth, encrypt or none"
            )),
        }
    }
}

/// The two directions' keys of one channel session.
#[derive(Clone)]
pub struct SessionKeys {
    frames: [u8; 16],
    acks: [u8; 16],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// HKDF-SHA256: the pre-shared key as input keying material, both handshake nonces as
    /// salt, the session id, epoch and medium as context.
    pub(crate) fn derive(
        psk: &[u8],
        nonce_p: &[u8],
        nonce_b: &[u8],
        session: u64,
        epoch: u64,
        medium: u32,
    ) -> Self {
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(&nonce_p[..32]);
        salt[32..].copy_from_slice(&nonce_b[..32]);
        let hk = Hkdf::<Sha256>::new(Some(&salt), psk);
        let mut info = Vec::with_capacity(48);
        info.extend_from_slice(b"ftvm log channel keys v1");
        info.extend_from_slice(&session.to_le_bytes());
        info.extend_from_slice(&epoch.to_le_bytes());
        info.extend_from_slice(&medium.to_le_bytes());
        let mut okm = [0u8; 32];
        // 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
        if hk.expand(&info, &mut okm).is_err() {
            unreachable!("HKDF-SHA256 output of 32 bytes");
        }
        let mut frames = [0u8; 16];
        let mut acks = [0u8; 16];
        frames.copy_from_slice(&okm[..16]);
        acks.copy_from_slice(&okm[16..]);
        SessionKeys { frames, acks }
    }

    /// The two direction keys: the connecting end's (the primary's: frames), the accepting
    /// end's (the backup's: ACKs). For [`crate::session`].
    pub(crate) fn directions(&self) -> ([u8; 16], [u8; 16]) {
        (self.frames, self.acks)
    }

    /// Keys from fixed bytes: for tests and benches that build a channel without a handshake.
    pub fn for_test(seed: u8) -> Self {
        SessionKeys {
            frames: [seed; 16],
            acks: [seed ^ 0x5a; 16],
        }
    }

    /// The primary's frame sealer (one for the log writer's data frames, one for the medium
    /// pump's heartbeats: their counters are apart, see [`HEARTBEAT_CLASS`]).
    pub fn frame_sealer(&self) -> FrameSealer {
        FrameSealer::new(&self.frames)
    }

    /// The primary's ACK checker.
    pub fn ack_opener(&self) -> AckOpener {
        AckOpener {
            cipher: Aes128Gcm::new((&self.acks).into()),
            last: 0,
        }
    }

    /// The backup's frame checker.
    pub fn frame_opener(&self) -> FrameOpener {
        FrameOpener {
            cipher: Aes128Gcm::new((&self.frames).into()),
            last_data: 0,
            last_beat: HEARTBEAT_CLASS,
            encrypt: false,
        }
    }

    /// The backup's ACK sealer.
    pub fn ack_sealer(&self) -> AckSealer {
        AckSealer {
            cipher: Aes128Gcm::new((&self.acks).into()),
            counter: 0,
        }
    }
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Whether `tag` is the GMAC of `aad` under `cipher` with nonce `counter` (checked in constant
/// time by AES-GCM's own decryption of an empty plaintext).
pub(crate) fn gmac_verifies(cipher: &Aes128Gcm, counter: u64, aad: &[u8], tag: &[u8]) -> bool {
    tag.len() == 16
        && cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&nonce(counter)),
                aad,
                &mut [],
                Tag::from_slice(tag),
            )
            .is_ok()
}

/// GMAC: the tag of AES-GCM over an empty plaintext with `aad` as associated data.
pub(crate) fn gmac(cipher: &Aes128Gcm, counter: u64, aad: &[u8]) -> Tag {
    let n = nonce(counter);
    match cipher.encrypt_in_place_detached(Nonce::from_slice(&n), aad, &mut []) {
        Ok(tag) => tag,
        // Only a plaintext over GCM's 64 GiB limit fails; ours is empty.
        Err(_) => unreachable!("GMAC over an empty plaintext"),
    }
}

/// The primary's frame sealer.
pub struct FrameSealer {
    cipher: Aes128Gcm,
    data: u64,
    beats: u64,
    encrypt: bool,
}

impl std::fmt::Debug for FrameSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameSealer")
            .field("data", &self.data)
            .field("beats", &(self.beats & !HEARTBEAT_CLASS))
            .finish()
    }
}

impl FrameSealer {
    fn new(key: &[u8; 16]) -> Self {
        FrameSealer {
            cipher: Aes128Gcm::new(key.into()),
            data: 0,
            beats: HEARTBEAT_CLASS,
            encrypt: false,
        }
    }

    /// This sealer also encrypts each frame's body (crypto `encrypt`).
    pub fn encrypting(mut self, encrypt: bool) -> Self {
        self.encrypt = encrypt;
        self
    }

    /// Seals `buf` in place: `buf` is a frame followed by [`TRAILER_LEN`] bytes of room, which
    /// receive the counter and the tag. `heartbeat` picks the counter class.
    pub fn seal(&mut self, buf: &mut [u8], heartbeat: bool) {
        let counter = if heartbeat {
            self.beats += 1;
            self.beats
        } else {
            self.data += 1;
            self.data
        };
        let at = buf.len() - TRAILER_LEN;
        buf[at..at + 8].copy_from_slice(&counter.to_le_bytes());
        if self.encrypt && at >= FRAME_HEADER_LEN {
            buf[CRC_FIELD..FRAME_HEADER_LEN].fill(0);
            let aad = header_aad(&buf[..FRAME_HEADER_LEN], &buf[at..at + 8]);
            let (frame, trailer) = buf.split_at_mut(at);
            let body = &mut frame[FRAME_HEADER_LEN..];
            match self.cipher.encrypt_in_place_detached(
                Nonce::from_slice(&nonce(counter)),
                &aad,
                body,
            ) {
                Ok(tag) => trailer[8..].copy_from_slice(&tag),
                // Only a plaintext over GCM's 64 GiB limit fails; a frame is at most 16 MiB.
                Err(_) => unreachable!("a frame body over AES-GCM's limit"),
            }
            return;
        }
        let tag = gmac(&self.cipher, counter, &buf[..at + 8]);
        buf[at + 8..].copy_from_slice(&tag);
    }
}

/// A logfmt frame header's length.
const FRAME_HEADER_LEN: usize = logfmt::FRAME_HEADER_LEN;
/// Where the header's CRC field starts (it ends the header).
const CRC_FIELD: usize = FRAME_HEADER_LEN - 4;

/// An encrypted frame's associated data: its header (CRC field zero) and its counter.
fn header_aad(header: &[u8], counter: &[u8]) -> [u8; FRAME_HEADER_LEN + 8] {
    let mut aad = [0u8; FRAME_HEADER_LEN + 8];
    aad[..FRAME_HEADER_LEN].copy_from_slice(&header[..FRAME_HEADER_LEN]);
    aad[FRAME_HEADER_LEN..].copy_from_slice(&counter[..8]);
    aad
}

/// The backup's frame checker.
pub struct FrameOpener {
    cipher: Aes128Gcm,
    last_data: u64,
    last_beat: u64,
    encrypt: bool,
}

impl std::fmt::Debug for FrameOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameOpener")
            .field("last_data", &self.last_data)
            .field("last_beat", &(self.last_beat & !HEARTBEAT_CLASS))
            .finish()
    }
}

impl FrameOpener {
    /// This opener decrypts each frame's body (crypto `encrypt`): use
    /// [`decrypt`](Self::decrypt), not [`verify`](Self::verify).
    pub fn decrypting(mut self, encrypt: bool) -> Self {
        self.encrypt = encrypt;
        self
    }

    /// Whether frames are encrypted.
    pub fn encrypts(&self) -> bool {
        self.encrypt
    }

    /// As [`verify`](Self::verify), for an encrypted frame: checks its tag and decrypts it
    /// into `plain` (the frame, its CRC written back), returning the counter. Nothing is
    /// decrypted unless the tag verifies.
    pub fn decrypt(&self, bytes: &[u8], plain: &mut Vec<u8>) -> Result<u64, ChannelError> {
        let Some(at) = bytes
            .len()
            .checked_sub(TRAILER_LEN)
            .filter(|&at| at >= FRAME_HEADER_LEN)
        else {
            return Err(ChannelError::Unauthenticated {
                what: "frame",
                reason: format!("{} bytes: too short for an encrypted frame", bytes.len()),
            });
        };
        let mut c = [0u8; 8];
        c.copy_from_slice(&bytes[at..at + 8]);
        let counter = u64::from_le_bytes(c);
        self.check_order(counter)?;
        plain.clear();
        plain.extend_from_slice(&bytes[..at]);
        let aad = header_aad(&bytes[..FRAME_HEADER_LEN], &bytes[at..at + 8]);
        let tag = &bytes[at + 8..];
        let ok = bytes[CRC_FIELD..FRAME_HEADER_LEN] == [0; 4]
            && self
                .cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(&nonce(counter)),
                    &aad,
                    &mut plain[FRAME_HEADER_LEN..],
                    Tag::from_slice(tag),
                )
                .is_ok();
        if !ok {
            plain.clear();
            return Err(ChannelError::Unauthenticated {
                what: "frame",
                reason: "its tag does not verify (forged, altered, or from another session)".into(),
            });
        }
        let crc = logfmt::crc::crc32c_append(
            logfmt::crc::crc32c(&plain[..CRC_FIELD]),
            &plain[FRAME_HEADER_LEN..],
        );
        plain[CRC_FIELD..FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(counter)
    }

    /// Refuses a counter that is not above the last accepted one of its class.
    fn check_order(&self, counter: u64) -> Result<(), ChannelError> {
        let last = if counter & HEARTBEAT_CLASS != 0 {
            self.last_beat
        } else {
            self.last_data
        };
        if counter <= last {
            return Err(ChannelError::Unauthenticated {
                what: "frame",
                reason: format!(
                    "counter {} is not above the last accepted {} (a replayed or reordered frame)",
                    counter & !HEARTBEAT_CLASS,
                    last & !HEARTBEAT_CLASS
                ),
            });
        }
        Ok(())
    }

    /// Checks a sealed frame (`bytes`: frame and trailer) and returns the frame and its
    /// counter, without remembering anything: call [`accept`](Self::accept) with the counter
    /// once the frame is taken (a frame left on the medium for lack of room is checked again
    /// later). A frame whose tag does not verify, or whose counter is not above the last
    /// accepted one of its class (a replay or a reordering), is refused.
    pub fn verify<'a>(&self, bytes: &'a [u8]) -> Result<(&'a [u8], u64), ChannelError> {
        let Some(at) = bytes.len().checked_sub(TRAILER_LEN) else {
            return Err(ChannelError::Unauthenticated {
                what: "frame",
                reason: format!("{} bytes: too short for a sealed frame", bytes.len()),
            });
        };
        let mut c = [0u8; 8];
        c.copy_from_slice(&bytes[at..at + 8]);
        let counter = u64::from_le_bytes(c);
        if !gmac_verifies(&self.cipher, counter, &bytes[..at + 8], &bytes[at + 8..]) {
            return Err(ChannelError::Unauthenticated {
                what: "frame",
                reason: "its tag does not verify (forged, altered, or from another session)".into(),
            });
        }
        self.check_order(counter)?;
        Ok((&bytes[..at], counter))
    }

    /// Records a verified frame's counter as taken.
    pub fn accept(&mut self, counter: u64) {
        if counter & HEARTBEAT_CLASS != 0 {
            self.last_beat = counter;
        } else {
            self.last_data = counter;
        }
    }

    /// [`verify`](Self::verify) and [`accept`](Self::accept) in one step.
    pub fn open<'a>(&mut self, bytes: &'a [u8]) -> Result<&'a [u8], ChannelError> {
        let (frame, counter) = self.verify(bytes)?;
        self.accept(counter);
        Ok(frame)
    }
}

/// Longest message an ACK seal covers (a medium's whole ACK header).
pub const MAX_ACK_MSG: usize = 56;

/// The ACK fields a TCP ACK's seal covers, in order: epoch, received, replayed (LE).
fn ack_fields(epoch: u64, received: u64, replayed: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&epoch.to_le_bytes());
    b[8..16].copy_from_slice(&received.to_le_bytes());
    b[16..24].copy_from_slice(&replayed.to_le_bytes());
    b
}

/// `msg` followed by the counter: what an ACK's tag covers.
fn ack_aad(msg: &[u8], counter: &[u8]) -> ([u8; MAX_ACK_MSG + 8], usize) {
    let mut b = [0u8; MAX_ACK_MSG + 8];
    let n = msg.len().min(MAX_ACK_MSG);
    b[..n].copy_from_slice(&msg[..n]);
    b[n..n + 8].copy_from_slice(&counter[..8]);
    (b, n + 8)
}

/// The backup's ACK sealer.
pub struct AckSealer {
    cipher: Aes128Gcm,
    counter: u64,
}

impl std::fmt::Debug for AckSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckSealer")
            .field("counter", &self.counter)
            .finish()
    }
}

impl AckSealer {
    /// The seal of one ACK (counter and tag) over its epoch, received and replayed positions.
    pub fn seal(&mut self, epoch: u64, received: u64, replayed: u64) -> [u8; ACK_SEAL_LEN] {
        self.seal_msg(&ack_fields(epoch, received, replayed))
    }

    /// The seal of one ACK message of at most [`MAX_ACK_MSG`] bytes (a medium's whole ACK
    /// header, e.g. DPDK's, which also acknowledges packets).
    pub fn seal_msg(&mut self, msg: &[u8]) -> [u8; ACK_SEAL_LEN] {
        debug_assert!(msg.len() <= MAX_ACK_MSG);
        self.counter += 1;
        let counter = self.counter.to_le_bytes();
        let (aad, n) = ack_aad(msg, &counter);
        let tag = gmac(&self.cipher, self.counter, &aad[..n]);
        let mut out = [0u8; ACK_SEAL_LEN];
        out[..8].copy_from_slice(&counter);
        out[8..].copy_from_slice(&tag);
        out
    }
}

/// The primary's ACK checker.
pub struct AckOpener {
    cipher: Aes128Gcm,
    last: u64,
}

impl std::fmt::Debug for AckOpener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckOpener")
            .field("last", &self.last)
            .finish()
    }
}

impl AckOpener {
    /// Checks an ACK's seal over its epoch, received and replayed positions; refuses a forged
    /// one and one whose counter is not above the last accepted (a replayed ACK).
    pub fn open(
        &mut self,
        epoch: u64,
        received: u64,
        replayed: u64,
        seal: &[u8],
    ) -> Result<(), ChannelError> {
        self.open_msg(&ack_fields(epoch, received, replayed), seal)
    }

    /// As [`open`](Self::open), for a seal made by [`AckSealer::seal_msg`].
    pub fn open_msg(&mut self, msg: &[u8], seal: &[u8]) -> Result<(), ChannelError> {
        if seal.len() != ACK_SEAL_LEN || msg.len() > MAX_ACK_MSG {
            return Err(ChannelError::Unauthenticated {
                what: "ACK",
                reason: format!("a seal of {} bytes over {} bytes", seal.len(), msg.len()),
            });
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&seal[..8]);
        let counter = u64::from_le_bytes(c);
        let (aad, n) = ack_aad(msg, &c);
        if !gmac_verifies(&self.cipher, counter, &aad[..n], &seal[8..]) {
            return Err(ChannelError::Unauthenticated {
                what: "ACK",
                reason: "its tag does not verify (forged or altered)".into(),
            });
        }
        if counter <= self.last {
            return Err(ChannelError::Unauthenticated {
                what: "ACK",
                reason: format!(
                    "counter {counter} is not above the last accepted {} (a replayed ACK)",
                    self.last
                ),
            });
        }
        self.last = counter;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(sealer: &mut FrameSealer, frame: &[u8], heartbeat: bool) -> Vec<u8> {
        let mut buf = frame.to_vec();
        buf.resize(frame.len() + TRAILER_LEN, 0);
        sealer.seal(&mut buf, heartbeat);
        buf
    }

    #[test]
    fn a_sealed_frame_opens_once_and_in_order() {
        let keys = SessionKeys::for_test(7);
        let mut s = keys.frame_sealer();
        let mut o = keys.frame_opener();
        let a = sealed(&mut s, b"frame one", false);
        let b = sealed(&mut s, b"frame two", false);
        let hb = sealed(&mut s, b"beat", true);
        assert_eq!(o.open(&a).expect("first"), b"frame one");
        // A heartbeat counts on its own: it may come between data frames.
        assert_eq!(o.open(&hb).expect("beat"), b"beat");
        assert!(matches!(
            o.open(&a),
            Err(ChannelError::Unauthenticated { what: "frame", .. })
        ));
        assert!(matches!(
            o.open(&hb),
            Err(ChannelError::Unauthenticated { .. })
        ));
        assert_eq!(o.open(&b).expect("second"), b"frame two");
    }

    #[test]
    fn any_changed_byte_or_other_keys_refuse_the_frame() {
        let keys = SessionKeys::for_test(7);
        let mut s = keys.frame_sealer();
        let good = sealed(&mut s, b"some frame bytes", false);
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x01;
            let mut o = keys.frame_opener();
            assert!(o.open(&bad).is_err(), "byte {i} changed and accepted");
        }
        let mut other = SessionKeys::for_test(8).frame_opener();
        assert!(other.open(&good).is_err());
        let mut o = keys.frame_opener();
        assert!(o.open(&good[..5]).is_err(), "shorter than a trailer");
    }

    /// A real logfmt frame holding `data` as a device input.
    fn frame_with(data: &[u8]) -> Vec<u8> {
        let mut f = logfmt::FrameBuf::new(4096);
        f.reset(3, 10);
        f.push(&logfmt::Entry::new(
            logfmt::Position::at_exit(1),
            logfmt::Event::DeviceInput { device: 1, data },
        ))
        .expect("push");
        f.finish().expect("finish").to_vec()
    }

    #[test]
    fn an_encrypted_frame_hides_its_body_and_decrypts_to_the_same_frame() {
        let keys = SessionKeys::for_test(9);
        let mut s = keys.frame_sealer().encrypting(true);
        let o = keys.frame_opener().decrypting(true);
        assert!(o.encrypts());
        let secret = b"set password hunter2-hunter2";
        let frame = frame_with(secret);
        let wire = sealed(&mut s, &frame, false);
        // Header in clear (media read the length), CRC field zero, body unreadable.
        assert_eq!(wire[..CRC_FIELD], frame[..CRC_FIELD]);
        assert_eq!(wire[CRC_FIELD..FRAME_HEADER_LEN], [0; 4]);
        assert!(
            !wire.windows(8).any(|w| w == &secret[..8]),
            "plaintext on the wire"
        );
        let mut plain = Vec::new();
        let counter = o.decrypt(&wire, &mut plain).expect("decrypts");
        assert_eq!(plain, frame, "the very frame, CRC included");
        logfmt::FrameView::parse(&plain).expect("a valid frame");
        // Any byte changed, or other keys: refused, nothing decrypted.
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x10;
            let mut out = Vec::new();
            assert!(
                o.decrypt(&bad, &mut out).is_err(),
                "byte {i} changed and accepted"
            );
            assert!(out.is_empty());
        }
        let other = SessionKeys::for_test(10).frame_opener().decrypting(true);
        assert!(other.decrypt(&wire, &mut plain).is_err());
        // Replayed: refused once accepted.
        let mut o = o;
        o.accept(counter);
        assert!(o.decrypt(&wire, &mut plain).is_err());
        // A heartbeat (no body) and a frame too short.
        let beat = sealed(&mut s, &frame[..FRAME_HEADER_LEN], true);
        assert!(o.decrypt(&beat, &mut plain).is_ok());
        assert!(o.decrypt(&wire[..30], &mut plain).is_err());
        // `encrypt` and the others by name.
        assert_eq!(
            "encrypt".parse::<ChannelCrypto>(),
            Ok(ChannelCrypto::Encrypt)
        );
        assert_eq!(ChannelCrypto::from_u8(2), Some(ChannelCrypto::Encrypt));
        assert!(ChannelCrypto::Encrypt.seals() && !ChannelCrypto::None.seals());
    }

    #[test]
    fn derived_keys_depend_on_every_input() {
        let base = SessionKeys::derive(b"0123456789abcdef", &[1; 32], &[2; 32], 5, 6, 1);
        let variants = [
            SessionKeys::derive(b"0123456789abcdeF", &[1; 32], &[2; 32], 5, 6, 1),
            SessionKeys::derive(b"0123456789abcdef", &[3; 32], &[2; 32], 5, 6, 1),
            SessionKeys::derive(b"0123456789abcdef", &[1; 32], &[3; 32], 5, 6, 1),
            SessionKeys::derive(b"0123456789abcdef", &[1; 32], &[2; 32], 4, 6, 1),
            SessionKeys::derive(b"0123456789abcdef", &[1; 32], &[2; 32], 5, 7, 1),
            SessionKeys::derive(b"0123456789abcdef", &[1; 32], &[2; 32], 5, 6, 2),
        ];
        for v in variants {
            assert_ne!(v.frames, base.frames);
            assert_ne!(v.acks, base.acks);
        }
        assert_ne!(base.frames, base.acks);
    }

    #[test]
    fn acks_open_once_and_refuse_forgeries() {
        let keys = SessionKeys::for_test(3);
        let mut opener = keys.ack_opener();
        let mut sealer = keys.ack_sealer();
        let s1 = sealer.seal(2, 10, 9);
        let s2 = sealer.seal(2, 12, 9);
        opener.open(2, 10, 9, &s1).expect("first ACK");
        // Forged: another position under a valid seal.
        assert!(opener.open(2, 13, 9, &s2).is_err());
        // Replayed.
        assert!(opener.open(2, 10, 9, &s1).is_err());
        opener.open(2, 12, 9, &s2).expect("second ACK");
        // Another epoch.
        let s3 = sealer.seal(2, 14, 9);
        assert!(opener.open(3, 14, 9, &s3).is_err());
    }
}
