//! One authenticated session over a byte stream, after [`crate::handshake`]: the layer every
//! ftvm connection that carries messages uses (the arbiter server's requests and answers;
//! the log channel's frames and ACKs use the same keys and tags through [`crate::auth`]).
//!
//! The handshake proves both sides hold the pre-shared key and gives both the same
//! [`SessionKeys`] (HKDF-SHA256 of the key over both sides' fresh nonces, one key per
//! direction). On top of it, a message on the wire is
//!
//! ```text
//! | len: u32 LE | body: len bytes (at most the caller's limit) | tag: 16 bytes |
//! ```
//!
//! where `tag` is GMAC (AES-128-GCM over an empty plaintext) under the sender's direction key,
//! with the message's number on the connection (0, 1, …) as the nonce and `len ‖ body` as the
//! associated data. The receiver expects the next number, so a message cannot be forged,
//! altered, replayed, reordered, reflected (the other direction has the other key) or moved to
//! another connection (other nonces, other keys) by anyone without the key — even one who
//! hijacks the TCP connection. Messages are not encrypted.

use std::io::{Read, Write};

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes128Gcm;

use crate::auth::{gmac, gmac_verifies, SessionKeys};

/// Bytes of a message's tag.
pub const TAG_LEN: usize = 16;

/// Which end of the handshake this side played: the connecting end (the handshake's
/// "primary") sends under the first direction key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Connected and ran `primary_handshake`.
    Connecting,
    /// Accepted and ran `backup_authenticate`.
    Accepting,
}

/// An authenticated connection (see the module documentation).
pub struct Sealed<S> {
    stream: S,
    tx: Aes128Gcm,
    rx: Aes128Gcm,
    sent: u64,
    received: u64,
    max: usize,
}

impl<S> std::fmt::Debug for Sealed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

impl<S: Read + Write> Sealed<S> {
    /// The session over `stream`, whose handshake gave `keys`; messages of at most `max` bytes.
    pub fn new(stream: S, keys: &SessionKeys, end: End, max: usize) -> Self {
        let (a, b) = keys.directions();
        let (tx, rx) = match end {
            End::Connecting => (a, b),
            End::Accepting => (b, a),
        };
        Sealed {
            stream,
            tx: Aes128Gcm::new((&tx).into()),
            rx: Aes128Gcm::new((&rx).into()),
            sent: 0,
            received: 0,
            max,
        }
    }

    /// Sends one message.
    pub fn write_message(&mut self, body: &[u8]) -> std::io::Result<()> {
        if body.len() > self.max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("message of {} bytes (max {})", body.len(), self.max),
            ));
        }
        let mut msg = Vec::with_capacity(4 + body.len() + TAG_LEN);
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        let tag = gmac(&self.tx, self.sent, &msg);
        msg.extend_from_slice(&tag);
        self.stream.write_all(&msg)?;
        self.sent += 1;
        Ok(())
    }

    /// Reads one message; `InvalidData` if it announces more than the limit or its tag does not
    /// verify (altered, forged, replayed, reordered, or another session).
    pub fn read_message(&mut self) -> std::io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let n = u32::from_le_bytes(len) as usize;
        if n > self.max {
            return Err(invalid(format!("message of {n} bytes (max {})", self.max)));
        }
        let mut msg = vec![0u8; 4 + n + TAG_LEN];
        msg[..4].copy_from_slice(&len);
        self.stream.read_exact(&mut msg[4..])?;
        let tag = msg.split_off(4 + n);
        if !gmac_verifies(&self.rx, self.received, &msg, &tag) {
            return Err(invalid(
                "message failed authentication (altered, replayed, reordered, or another session)",
            ));
        }
        self.received += 1;
        Ok(msg.split_off(4))
    }
}

impl<S> Sealed<S> {
    /// The underlying stream (to adjust its timeouts, say).
    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A byte pipe that records what is written, for replaying and tampering with it. A test
    /// double for a socket.
    #[derive(Default)]
    struct Tap {
        input: VecDeque<u8>,
        written: Vec<u8>,
    }

    impl Read for Tap {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.input.len());
            for b in buf.iter_mut().take(n) {
                *b = self.input.pop_front().unwrap_or_default();
            }
            Ok(n)
        }
    }

    impl Write for Tap {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pair(keys: &SessionKeys) -> (Sealed<Tap>, Sealed<Tap>) {
        (
            Sealed::new(Tap::default(), keys, End::Connecting, 1024),
            Sealed::new(Tap::default(), keys, End::Accepting, 1024),
        )
    }

    /// Moves what `from` wrote into `to`'s input.
    fn deliver(from: &mut Sealed<Tap>, to: &mut Sealed<Tap>) -> Vec<u8> {
        let bytes = std::mem::take(&mut from.stream.written);
        to.stream.input.extend(bytes.iter().copied());
        bytes
    }

    #[test]
    fn messages_go_both_ways_in_order() {
        let keys = SessionKeys::for_test(1);
        let (mut c, mut s) = pair(&keys);
        c.write_message(b"one").expect("write");
        c.write_message(b"two").expect("write");
        deliver(&mut c, &mut s);
        assert_eq!(s.read_message().expect("read"), b"one");
        assert_eq!(s.read_message().expect("read"), b"two");
        s.write_message(b"answer").expect("write");
        deliver(&mut s, &mut c);
        assert_eq!(c.read_message().expect("read"), b"answer");
    }

    #[test]
    fn altered_replayed_reflected_or_foreign_messages_are_refused() {
        let keys = SessionKeys::for_test(1);
        // Altered: any byte.
        let (mut c, _) = pair(&keys);
        c.write_message(b"take epoch 7").expect("write");
        let good = std::mem::take(&mut c.stream.written);
        for i in 0..good.len() {
            let (_, mut s) = pair(&keys);
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            s.stream.input.extend(bad);
            let r = s.read_message();
            assert!(r.is_err(), "byte {i} altered and accepted");
        }
        // Replayed: the same message twice.
        let (_, mut s) = pair(&keys);
        s.stream.input.extend(good.iter().copied());
        s.stream.input.extend(good.iter().copied());
        s.read_message().expect("first");
        assert_eq!(
            s.read_message().expect_err("replay").kind(),
            std::io::ErrorKind::InvalidData
        );
        // Reflected: a side's own message back to it.
        let (mut c, _) = pair(&keys);
        c.stream.input.extend(good.iter().copied());
        assert!(c.read_message().is_err());
        // Another session's keys.
        let (_, mut other) = pair(&SessionKeys::for_test(2));
        other.stream.input.extend(good.iter().copied());
        assert!(other.read_message().is_err());
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading_it() {
        let keys = SessionKeys::for_test(1);
        let (_, mut s) = pair(&keys);
        s.stream.input.extend(u32::MAX.to_le_bytes());
        let err = s.read_message().expect_err("too long");
        assert!(err.to_string().contains("max 1024"), "{err}");
    }
}
