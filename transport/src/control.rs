//! The control stream every medium sets itself up over, and keeps open afterwards.
//!
//! Each medium meets its peer on a byte stream — the TCP connection itself (`tcp`), the TCP
//! control connection of `dpdk` and `rdma`, the Unix socket of `shm` — runs the handshake
//! ([`crate::handshake`]) and its own set-up messages over it, and then keeps it open: its
//! end-of-file tells each side at once that the other process died. This module is what they
//! share:
//!
//! - [`accept`]: the listening side's accept of the control stream (TCP or Unix listener);
//! - [`dial`]: the TCP control stream's connect (the first of the address's resolutions that
//!   answers within the handshake timeout);
//! - [`prepare`]: no Nagle delay (TCP) and every read and write bounded by the handshake
//!   timeout, so a peer that sends nothing cannot hold a side forever;
//! - [`read_exact`] / [`write_all`]: one fixed-length message, with a timeout reported as
//!   [`ChannelError::HandshakeTimeout`] naming what was awaited and the peer's end-of-file (or
//!   reset) as [`ChannelError::PeerClosed`];
//! - [`read_prefixed`] / [`write_prefixed`]: one length-prefixed message (a little-endian `u32`
//!   length, then that many bytes), the length bounded by the reader;
//! - [`go_nonblocking`] once set-up is done, and then [`check_peer`]: a read that never blocks,
//!   where end-of-file means the peer is gone and any byte is a protocol violation (nothing is
//!   sent on the control stream after set-up).
//!
//! Whoever dialed, both sides use the same calls: the stream is a connected stream, and the
//! handshake's roles (the primary speaks first) do not depend on who connected.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use crate::error::ChannelError;

/// A connected stream a medium sets itself up over: [`TcpStream`] or [`UnixStream`].
pub trait ControlStream: Read + Write {
    /// `TCP_NODELAY` where the stream has it (TCP); nothing otherwise.
    fn set_no_delay(&self) -> std::io::Result<()>;
    /// As the std streams' `set_read_timeout`.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    /// As the std streams' `set_write_timeout`.
    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    /// As the std streams' `set_nonblocking`.
    fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()>;
}

impl ControlStream for TcpStream {
    fn set_no_delay(&self) -> std::io::Result<()> {
        self.set_nodelay(true)
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
    fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()> {
        TcpStream::set_nonblocking(self, nonblocking)
    }
}

impl ControlStream for UnixStream {
    fn set_no_delay(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
    fn set_nonblocking(&self, nonblocking: bool) -> std::io::Result<()> {
        UnixStream::set_nonblocking(self, nonblocking)
    }
}

/// A listener control streams are accepted on: [`TcpListener`] or [`UnixListener`].
pub trait ControlListener {
    /// The stream it accepts.
    type Stream: ControlStream;
    /// As the std listeners' `accept`, without the peer's address.
    fn accept_stream(&self) -> std::io::Result<Self::Stream>;
}

impl ControlListener for TcpListener {
    type Stream = TcpStream;
    fn accept_stream(&self) -> std::io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl ControlListener for UnixListener {
    type Stream = UnixStream;
    fn accept_stream(&self) -> std::io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

/// Accepts one control stream on `listener`: the backup's accept of the primary, before the
/// medium's `backup_on` prepares it and runs the handshake.
pub fn accept<L: ControlListener>(listener: &L) -> Result<L::Stream, ChannelError> {
    listener
        .accept_stream()
        .map_err(|e| ChannelError::io("accepting the primary", e))
}

/// Dials a TCP control stream to `addr`: the first of its resolutions that answers within
/// `timeout` (the channel's handshake timeout). The stream then wants [`prepare`].
pub fn dial(addr: impl ToSocketAddrs, timeout: Duration) -> Result<TcpStream, ChannelError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| ChannelError::io("resolving the peer's address", e))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(match last {
        Some(e) => ChannelError::io("connecting to the peer", e),
        None => ChannelError::Config("peer address resolved to nothing".into()),
    })
}

/// Readies a freshly connected (or accepted) stream for set-up: blocking, no Nagle delay (TCP),
/// and reads and writes bounded by `timeout` (the channel's handshake timeout).
pub fn prepare<S: ControlStream>(stream: &S, timeout: Duration) -> Result<(), ChannelError> {
    if timeout.is_zero() {
        return Err(ChannelError::Config(
            "the handshake timeout must be greater than zero".into(),
        ));
    }
    let io = |context| move |e| ChannelError::io(context, e);
    // An accepted socket may inherit non-blocking mode from its listener on some platforms.
    stream
        .set_nonblocking(false)
        .map_err(io("making the control stream blocking"))?;
    stream
        .set_no_delay()
        .map_err(io("setting TCP_NODELAY on the control stream"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io("setting the control stream's read timeout"))?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(io("setting the control stream's write timeout"))?;
    Ok(())
}

/// Puts the stream into non-blocking mode, for [`check_peer`] once set-up is done.
pub fn go_nonblocking<S: ControlStream>(stream: &S) -> Result<(), ChannelError> {
    stream
        .set_nonblocking(true)
        .map_err(|e| ChannelError::io("making the control stream non-blocking", e))
}

fn read_error(e: std::io::Error, waiting_for: &'static str) -> ChannelError {
    match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
            ChannelError::PeerClosed
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            ChannelError::HandshakeTimeout { waiting_for }
        }
        _ => ChannelError::io(waiting_for, e),
    }
}

fn write_error(e: std::io::Error, what: &'static str) -> ChannelError {
    match e.kind() {
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
            ChannelError::PeerClosed
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            ChannelError::HandshakeTimeout { waiting_for: what }
        }
        _ => ChannelError::io(what, e),
    }
}

/// Reads exactly `buf.len()` bytes: a timeout is [`ChannelError::HandshakeTimeout`] naming
/// `waiting_for`, the peer's end-of-file (or reset) [`ChannelError::PeerClosed`].
pub fn read_exact<S: Read>(
    stream: &mut S,
    buf: &mut [u8],
    waiting_for: &'static str,
) -> Result<(), ChannelError> {
    stream
        .read_exact(buf)
        .map_err(|e| read_error(e, waiting_for))
}

/// Writes all of `buf` and flushes: a peer that is gone is [`ChannelError::PeerClosed`], a
/// write that does not finish in time [`ChannelError::HandshakeTimeout`] naming `what`.
pub fn write_all<S: Write>(
    stream: &mut S,
    buf: &[u8],
    what: &'static str,
) -> Result<(), ChannelError> {
    stream
        .write_all(buf)
        .and_then(|()| stream.flush())
        .map_err(|e| write_error(e, what))
}

/// Writes one length-prefixed message: its length as a little-endian `u32`, then `msg`.
pub fn write_prefixed<S: Write>(
    stream: &mut S,
    msg: &[u8],
    what: &'static str,
) -> Result<(), ChannelError> {
    let len = u32::try_from(msg.len()).map_err(|_| {
        ChannelError::Config(format!("{what}: a {}-byte message is too long", msg.len()))
    })?;
    let mut buf = Vec::with_capacity(4 + msg.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(msg);
    write_all(stream, &buf, what)
}

/// Reads one length-prefixed message of at most `max` bytes (see [`write_prefixed`]). A longer
/// announced length is refused with [`ChannelError::BadHandshake`] before anything is
/// allocated for it.
pub fn read_prefixed<S: Read>(
    stream: &mut S,
    max: usize,
    waiting_for: &'static str,
) -> Result<Vec<u8>, ChannelError> {
    let mut len = [0u8; 4];
    read_exact(stream, &mut len, waiting_for)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(ChannelError::BadHandshake(format!(
            "{waiting_for}: message of {len} bytes, at most {max} allowed"
        )));
    }
    let mut msg = vec![0u8; len];
    read_exact(stream, &mut msg, waiting_for)?;
    Ok(msg)
}

/// Checks a non-blocking control stream without waiting: the peer's end-of-file (or reset) is
/// [`ChannelError::PeerClosed`], and any byte is a [`ChannelError::CorruptMessage`] (nothing is
/// sent on the control stream once set-up is done). `medium` names the medium in that message.
pub fn check_peer<S: Read>(stream: &mut S, medium: &'static str) -> Result<(), ChannelError> {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Err(ChannelError::PeerClosed),
        Ok(_) => Err(ChannelError::CorruptMessage(format!(
            "unexpected data on the {medium} control socket"
        ))),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) =>
        {
            Err(ChannelError::PeerClosed)
        }
        Err(e) => Err(ChannelError::io("checking the control socket", e)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::time::Instant;

    use super::*;

    const T: Duration = Duration::from_millis(200);

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let dialed = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        (dialed, accepted)
    }

    fn unix_pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().expect("socketpair")
    }

    fn messages_cross<S: ControlStream>(mut a: S, mut b: S) {
        prepare(&a, T).expect("prepare a");
        prepare(&b, T).expect("prepare b");
        write_all(&mut a, b"HELLO", "hello").expect("write");
        let mut got = [0u8; 5];
        read_exact(&mut b, &mut got, "hello").expect("read");
        assert_eq!(&got, b"HELLO");
        write_prefixed(&mut b, b"medium info", "info").expect("write prefixed");
        write_prefixed(&mut b, b"", "empty").expect("write empty");
        assert_eq!(
            read_prefixed(&mut a, 64, "info").expect("read"),
            b"medium info"
        );
        assert_eq!(read_prefixed(&mut a, 64, "empty").expect("read"), b"");
    }

    #[test]
    fn fixed_and_prefixed_messages_cross_tcp_and_unix() {
        let (a, b) = tcp_pair();
        messages_cross(a, b);
        let (a, b) = unix_pair();
        messages_cross(a, b);
    }

    fn silence_is_a_handshake_timeout<S: ControlStream>(mut a: S, _b: &S) {
        prepare(&a, T).expect("prepare");
        let start = Instant::now();
        let mut buf = [0u8; 4];
        match read_exact(&mut a, &mut buf, "the peer's hello") {
            Err(ChannelError::HandshakeTimeout { waiting_for }) => {
                assert_eq!(waiting_for, "the peer's hello")
            }
            other => panic!("expected a handshake timeout, got {other:?}"),
        }
        assert!(start.elapsed() >= T, "returned before the timeout");
    }

    #[test]
    fn a_silent_peer_is_a_handshake_timeout_naming_what_was_awaited() {
        let (a, b) = tcp_pair();
        silence_is_a_handshake_timeout(a, &b);
        let (a, b) = unix_pair();
        silence_is_a_handshake_timeout(a, &b);
    }

    fn eof_is_peer_closed<S: ControlStream>(mut a: S, mut b: S) {
        prepare(&a, T).expect("prepare");
        // Half a message, then the peer is gone.
        write_all(&mut b, &[1, 2], "half").expect("write");
        drop(b);
        let mut buf = [0u8; 4];
        assert!(matches!(
            read_exact(&mut a, &mut buf, "a message"),
            Err(ChannelError::PeerClosed)
        ));
    }

    #[test]
    fn end_of_file_mid_message_is_peer_closed() {
        let (a, b) = tcp_pair();
        eof_is_peer_closed(a, b);
        let (a, b) = unix_pair();
        eof_is_peer_closed(a, b);
    }

    #[test]
    fn an_oversized_prefix_is_refused_before_allocating() {
        let (mut a, mut b) = unix_pair();
        prepare(&a, T).expect("prepare");
        write_all(&mut b, &u32::MAX.to_le_bytes(), "prefix").expect("write");
        match read_prefixed(&mut a, 4096, "medium info") {
            Err(ChannelError::BadHandshake(m)) => assert!(m.contains("4294967295"), "{m}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn peer_check<S: ControlStream>(mut a: S, mut b: S) {
        go_nonblocking(&a).expect("nonblocking");
        // A live, quiet peer: fine, and the check does not wait.
        check_peer(&mut a, "test").expect("live peer");
        // A byte after set-up is a protocol violation.
        write_all(&mut b, b"x", "stray byte").expect("write");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match check_peer(&mut a, "test") {
                Ok(()) if Instant::now() < deadline => std::thread::yield_now(),
                Err(ChannelError::CorruptMessage(m)) => {
                    assert!(m.contains("test control socket"), "{m}");
                    break;
                }
                other => panic!("expected a corrupt-message error, got {other:?}"),
            }
        }
        // The peer gone: PeerClosed.
        drop(b);
        loop {
            match check_peer(&mut a, "test") {
                Ok(()) if Instant::now() < deadline => std::thread::yield_now(),
                Err(ChannelError::PeerClosed) => break,
                other => panic!("expected PeerClosed, got {other:?}"),
            }
        }
    }

    #[test]
    fn peer_check_never_blocks_and_reports_end_of_file() {
        let (a, b) = tcp_pair();
        peer_check(a, b);
        let (a, b) = unix_pair();
        peer_check(a, b);
    }

    #[test]
    fn dial_connects_to_a_listener_and_reports_a_refusal_as_io() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let dialed = dial(addr, T).expect("dial a listener");
        let (accepted, _) = listener.accept().expect("accept");
        assert_eq!(dialed.peer_addr().expect("peer"), addr);
        assert_eq!(
            accepted.peer_addr().expect("peer"),
            dialed.local_addr().expect("local")
        );
        drop(listener);
        // Nobody listens there any more.
        match dial(addr, T) {
            Err(ChannelError::Io { context, .. }) => assert_eq!(context, "connecting to the peer"),
            other => panic!("expected an I/O error, got {other:?}"),
        }
    }

    #[test]
    fn accept_takes_a_stream_off_tcp_and_unix_listeners() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let dialed = dial(listener.local_addr().expect("addr"), T).expect("dial");
        let accepted = accept(&listener).expect("accept over TCP");
        assert_eq!(
            accepted.peer_addr().expect("peer"),
            dialed.local_addr().expect("local")
        );
        messages_cross(dialed, accepted);

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).expect("bind a Unix socket");
        let dialed = UnixStream::connect(&path).expect("connect");
        let accepted = accept(&listener).expect("accept over a Unix socket");
        messages_cross(dialed, accepted);
    }

    #[test]
    fn prepare_makes_an_inherited_nonblocking_stream_block_again() {
        let (a, _b) = tcp_pair();
        a.set_nonblocking(true).expect("nonblocking");
        // Blocking again: a read with nothing to read waits out the timeout instead of
        // returning at once.
        silence_is_a_handshake_timeout(a, &_b);
        let (a, _b) = unix_pair();
        assert!(matches!(
            prepare(&a, Duration::ZERO),
            Err(ChannelError::Config(_))
        ));
    }
}
