//! The kernel-TCP medium: log frames back to back on a TCP connection (`TCP_NODELAY`), 32-byte
//! ACK messages on the way back.
//!
//! The socket is always non-blocking after the handshake. In busy-poll mode (`tcp-spin`) the
//! channel spins on it under its [`PollPolicy`](crate::PollPolicy); in blocking mode
//! ([`ChannelConfig::blocking`]) waits sleep in `poll(2)` until the socket is readable, trading
//! latency (a kernel wake-up per message) for CPU.
//!
//! ACK message (56 bytes), little-endian: `b"FTAK"`, u32 zero, u64 epoch, u64 cumulative acked
//! sequence, u64 replayed sequence (see [`Ack`](crate::channel::Ack)), then the 24-byte seal
//! ([`crate::auth`]; zero with `--channel-crypto none`). With crypto `auth` each frame is
//! followed by its 24-byte trailer, and the primary accepts only ACKs whose seal verifies.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::auth::{AckOpener, AckSealer, ACK_SEAL_LEN, TRAILER_LEN};
use crate::channel::{Ack, Backup, BackupLink, BackupNews, ChannelConfig, Primary, PrimaryLink};
use crate::control;
use crate::error::ChannelError;
use crate::handshake::{self, MediumKind};

const ACK_MAGIC: [u8; 4] = *b"FTAK";
const ACK_BODY: usize = 32;
const ACK_LEN: usize = ACK_BODY + ACK_SEAL_LEN;

/// Waits in `poll(2)` until `fd` is readable (or writable, if asked) or `timeout` passes.
pub(crate) fn poll_fd(fd: i32, writable: bool, timeout: Duration) -> Result<bool, ChannelError> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN | if writable { libc::POLLOUT } else { 0 },
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(ChannelError::io("poll", err));
    }
    Ok(rc > 0)
}

/// Connects to a backup at `addr` and runs the handshake; returns the primary's channel end.
pub fn connect(
    addr: impl ToSocketAddrs,
    config: ChannelConfig,
) -> Result<Primary<TcpPrimaryLink>, ChannelError> {
    config.validate()?;
    let stream = control::dial(addr, config.handshake_timeout)?;
    primary_on(stream, config)
}

/// The primary's channel end over a connected stream, whichever side dialed: runs the
/// handshake as the primary.
pub fn primary_on(
    mut stream: TcpStream,
    config: ChannelConfig,
) -> Result<Primary<TcpPrimaryLink>, ChannelError> {
    config.validate()?;
    control::prepare(&stream, config.handshake_timeout)?;
    let accepted =
        handshake::primary_handshake(&mut stream, &config.session_params(MediumKind::Tcp))?;
    control::go_nonblocking(&stream)?;
    let link = TcpPrimaryLink {
        stream,
        pending: Vec::new(),
        pending_at: 0,
        inbox: vec![0; 4096],
        inbox_len: 0,
        closed: false,
        acks: None,
    };
    Primary::new(link, config, accepted.resume_seq, &accepted.keys)
}

/// Accepts one primary on `listener`, runs the handshake and returns the backup's channel end.
/// A primary that fails the handshake is refused with a typed error (accept again to go on;
/// [`crate::medium::Listener`] does).
pub fn accept(
    listener: &TcpListener,
    config: ChannelConfig,
) -> Result<Backup<TcpBackupLink>, ChannelError> {
    config.validate()?;
    let stream = control::accept(listener)?;
    backup_on(stream, config)
}

/// The backup's channel end over a connected stream, whichever side dialed: runs the
/// handshake as the backup.
pub fn backup_on(
    mut stream: TcpStream,
    config: ChannelConfig,
) -> Result<Backup<TcpBackupLink>, ChannelError> {
    config.validate()?;
    control::prepare(&stream, config.handshake_timeout)?;
    let hello =
        handshake::backup_authenticate(&mut stream, &config.session_params(MediumKind::Tcp))?;
    let resume = config.resume_seq.max(1);
    handshake::backup_welcome(&mut stream, resume, &[])?;
    control::go_nonblocking(&stream)?;
    let max_frame = config.max_frame_bytes;
    let link = TcpBackupLink {
        stream,
        inbox: vec![0; max_frame.max(64 * 1024) * 2],
        start: 0,
        end: 0,
        peeked: 0,
        max_frame,
        ack_pending: None,
        trailer: if config.crypto.seals() {
            TRAILER_LEN
        } else {
            0
        },
        sealer: None,
    };
    Backup::new(link, config, resume, hello.epoch, &hello.keys)
}

/// The primary's TCP link.
#[derive(Debug)]
pub struct TcpPrimaryLink {
    stream: TcpStream,
    /// Bytes of a frame the socket took only partly; sent before anything else.
    pending: Vec<u8>,
    pending_at: usize,
    inbox: Vec<u8>,
    inbox_len: usize,
    /// The backup hung up after its last ACKs were reported.
    closed: bool,
    /// Checks every ACK's seal (crypto `auth`).
    acks: Option<AckOpener>,
}

impl PrimaryLink for TcpPrimaryLink {
    fn offer(&mut self, frame: &[u8]) -> Result<bool, ChannelError> {
        if !self.flush()? {
            return Ok(false);
        }
        match self.stream.write(frame) {
            Ok(n) if n == frame.len() => Ok(true),
            Ok(n) => {
                self.pending.clear();
                self.pending.extend_from_slice(&frame[n..]);
                self.pending_at = 0;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(false),
            Err(e) => Err(ChannelError::io("sending a frame", e)),
        }
    }

    fn flush(&mut self) -> Result<bool, ChannelError> {
        while self.pending_at < self.pending.len() {
            match self.stream.write(&self.pending[self.pending_at..]) {
                Ok(0) => return Err(ChannelError::PeerClosed),
                Ok(n) => self.pending_at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(ChannelError::io("sending a frame", e)),
            }
        }
        self.pending.clear();
        self.pending_at = 0;
        Ok(true)
    }

    fn poll(&mut self) -> Result<BackupNews, ChannelError> {
        let mut news = BackupNews::default();
        if self.closed {
            return Err(ChannelError::PeerClosed);
        }
        loop {
            match self.stream.read(&mut self.inbox[self.inbox_len..]) {
                // ACKs that arrived just before the hang-up count: report them now, the hang-up
                // at the next poll.
                Ok(0) if news.heard => {
                    self.closed = true;
                    return Ok(news);
                }
                Ok(0) => return Err(ChannelError::PeerClosed),
                Ok(n) => {
                    self.inbox_len += n;
                    news.heard = true;
                    let whole = self.inbox_len / ACK_LEN * ACK_LEN;
                    for msg in self.inbox[..whole].chunks_exact(ACK_LEN) {
                        if msg[..4] != ACK_MAGIC || msg[4..8] != [0; 4] {
                            return Err(ChannelError::CorruptMessage(format!(
                                "expected an ACK, got {:02x?}",
                                &msg[..8]
                            )));
                        }
                        let word = |at: usize| {
                            let mut w = [0; 8];
                            w.copy_from_slice(&msg[at..at + 8]);
                            u64::from_le_bytes(w)
                        };
                        let (epoch, seq, replayed) = (word(8), word(16), word(24));
                        if let Some(opener) = &mut self.acks {
                            opener.open(epoch, seq, replayed, &msg[ACK_BODY..])?;
                        }
                        if replayed > seq {
                            return Err(ChannelError::CorruptMessage(format!(
                                "ACK of entry {seq} says entry {replayed} was replayed"
                            )));
                        }
                        news.acked = Some(news.acked.map_or(seq, |a: u64| a.max(seq)));
                        news.replayed =
                            Some(news.replayed.map_or(replayed, |r: u64| r.max(replayed)));
                    }
                    self.inbox.copy_within(whole..self.inbox_len, 0);
                    self.inbox_len -= whole;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(news),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(ChannelError::io("reading ACKs", e)),
            }
        }
    }

    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        poll_fd(self.stream.as_raw_fd(), !self.pending.is_empty(), timeout)
    }

    fn seal_acks(&mut self, opener: AckOpener) {
        self.acks = Some(opener);
    }
}

/// The backup's TCP link.
#[derive(Debug)]
pub struct TcpBackupLink {
    stream: TcpStream,
    /// Received bytes; the unconsumed ones are `inbox[start..end]`.
    inbox: Vec<u8>,
    start: usize,
    end: usize,
    /// Length of the frame the last `peek` returned.
    peeked: usize,
    max_frame: usize,
    /// An ACK the socket had no room for; cumulative, so only the newest matters.
    ack_pending: Option<[u8; ACK_LEN]>,
    /// Bytes after each frame: its authentication trailer (crypto `auth`) or none.
    trailer: usize,
    /// Seals every ACK (crypto `auth`).
    sealer: Option<AckSealer>,
}

impl TcpBackupLink {
    /// Reads what the socket has; `Ok(false)` if nothing.
    fn fill(&mut self) -> Result<bool, ChannelError> {
        if self.end == self.inbox.len() {
            self.inbox.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match self.stream.read(&mut self.inbox[self.end..]) {
                Ok(0) => return Err(ChannelError::PeerClosed),
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(ChannelError::io("receiving frames", e)),
            }
        }
    }

    fn send_ack(&mut self, msg: [u8; ACK_LEN]) -> Result<(), ChannelError> {
        match self.stream.write(&msg) {
            Ok(ACK_LEN) => {
                self.ack_pending = None;
                Ok(())
            }
            // A partial write of 56 bytes on an almost-full socket: the stream is now out of
            // step, so treat it as fatal rather than send a torn ACK.
            Ok(_) => Err(ChannelError::CorruptMessage("partial ACK write".into())),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                self.ack_pending = Some(msg);
                Ok(())
            }
            Err(e) => Err(ChannelError::io("sending an ACK", e)),
        }
    }
}

impl BackupLink for TcpBackupLink {
    fn peek(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        let have = self.end - self.start;
        if have < logfmt::FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = logfmt::peek_frame_len(&self.inbox[self.start..self.end])? + self.trailer;
        if len > self.max_frame {
            return Err(ChannelError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if have < len {
            if self.start + len > self.inbox.len() {
                // Make room for the whole frame at the front of the buffer.
                self.inbox.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            return Ok(None);
        }
        self.peeked = len;
        Ok(Some(&self.inbox[self.start..self.start + len]))
    }

    fn receive(&mut self) -> Result<bool, ChannelError> {
        if let Some(msg) = self.ack_pending {
            self.send_ack(msg)?;
        }
        self.fill()
    }

    fn consume(&mut self) -> Result<(), ChannelError> {
        self.start += self.peeked;
        self.peeked = 0;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(())
    }

    fn ack(&mut self, ack: Ack) -> Result<(), ChannelError> {
        let mut msg = [0u8; ACK_LEN];
        msg[..4].copy_from_slice(&ACK_MAGIC);
        msg[8..16].copy_from_slice(&ack.epoch.to_le_bytes());
        msg[16..24].copy_from_slice(&ack.received.to_le_bytes());
        msg[24..32].copy_from_slice(&ack.replayed.to_le_bytes());
        if let Some(sealer) = &mut self.sealer {
            msg[ACK_BODY..].copy_from_slice(&sealer.seal(ack.epoch, ack.received, ack.replayed));
        }
        self.send_ack(msg)
    }

    fn seal_acks(&mut self, sealer: AckSealer) {
        self.sealer = Some(sealer);
    }

    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        poll_fd(self.stream.as_raw_fd(), self.ack_pending.is_some(), timeout)
    }
}
