//! The authenticated session: ftvm's handshake, then a nonce exchange and a tag on every
//! message.
//!
//! Every connection starts with [`transport::handshake`]: the client plays the connecting
//! ("primary") role with [`MediumKind::Arbiter`], session [`ARBITER_SESSION_ID`] and epoch 0;
//! the server plays the listening role. Both prove they hold the pre-shared key, so a host with
//! another key gets no answer, and the client never takes a `Won` from a server that does not
//! hold the key. After the handshake each side sends a fresh 16-byte nonce, and every message
//! carries a tag: the first 16 bytes of HMAC-SHA256 over the key, both nonces, the direction, the
//! message's number on the connection, and the message. So a message cannot be forged, altered,
//! replayed, reordered, reflected or moved to another connection by anyone without the key, even
//! one who hijacks the TCP connection. (Messages are not encrypted: decisions are not secret.)
//!
//! A message on the wire is `len: u32` (little-endian), then `len` bytes (at most
//! [`MAX_MESSAGE`]), then its 16-byte tag.

use std::io::{Read, Write};

use transport::handshake::{MediumKind, SessionParams};
use transport::PreSharedKey;

use super::protocol::MAX_MESSAGE;

/// The handshake session id of arbiter connections (`"ftvmarb1"`).
pub const ARBITER_SESSION_ID: u64 = u64::from_le_bytes(*b"ftvmarb1");

/// The handshake parameters both ends of an arbiter connection use.
pub(super) fn params(key: PreSharedKey) -> SessionParams {
    SessionParams {
        session_id: ARBITER_SESSION_ID,
        epoch: 0,
        medium: MediumKind::Arbiter,
        key,
        // Arbiter connections carry no guest.
        guest: transport::GuestIdentity::default(),
        // The arbiter's messages are sealed by its own session layer (below).
        crypto: transport::auth::ChannelCrypto::Auth,
    }
}

const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 16;
const SEAL_LABEL: &[u8] = b"ftvm-arbiter-message-v1";
const CLIENT_TO_SERVER: u8 = 1;
const SERVER_TO_CLIENT: u8 = 2;

/// One authenticated connection, after the handshake: every message is tagged (see the module
/// docs), so nobody without the key can forge, alter, replay or reorder one.
pub(super) struct Sealed<S> {
    stream: S,
    key: PreSharedKey,
    /// The client's nonce, then the server's.
    nonces: [u8; 2 * NONCE_LEN],
    /// Direction byte of the messages we send.
    outgoing: u8,
    sent: u64,
    received: u64,
}

impl<S: Read + Write> Sealed<S> {
    /// Exchanges nonces: the client sends first, the server answers with its own.
    pub(super) fn open(mut stream: S, key: PreSharedKey, client: bool) -> std::io::Result<Self> {
        let mut ours = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut ours).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut theirs = [0u8; NONCE_LEN];
        if client {
            stream.write_all(&ours)?;
            stream.read_exact(&mut theirs)?;
        } else {
            stream.read_exact(&mut theirs)?;
            stream.write_all(&ours)?;
        }
        let mut nonces = [0u8; 2 * NONCE_LEN];
        let (first, second) = if client {
            (ours, theirs)
        } else {
            (theirs, ours)
        };
        nonces[..NONCE_LEN].copy_from_slice(&first);
        nonces[NONCE_LEN..].copy_from_slice(&second);
        Ok(Sealed {
            stream,
            key,
            nonces,
            outgoing: if client {
                CLIENT_TO_SERVER
            } else {
                SERVER_TO_CLIENT
            },
            sent: 0,
            received: 0,
        })
    }

    fn tag(&self, direction: u8, number: u64, body: &[u8]) -> [u8; 32] {
        self.key.tag(
            SEAL_LABEL,
            &[
                &self.nonces,
                &[direction],
                &number.to_le_bytes(),
                &(body.len() as u32).to_le_bytes(),
                body,
            ],
        )
    }

    pub(super) fn write_message(&mut self, body: &[u8]) -> std::io::Result<()> {
        let tag = self.tag(self.outgoing, self.sent, body);
        let mut msg = Vec::with_capacity(4 + body.len() + TAG_LEN);
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        msg.extend_from_slice(&tag[..TAG_LEN]);
        self.stream.write_all(&msg)?;
        self.sent += 1;
        Ok(())
    }

    /// Reads one message; `InvalidData` if it announces more than [`MAX_MESSAGE`] bytes or its
    /// tag does not verify.
    pub(super) fn read_message(&mut self) -> std::io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("message of {len} bytes (max {MAX_MESSAGE})"),
            ));
        }
        let mut body = vec![0u8; len + TAG_LEN];
        self.stream.read_exact(&mut body)?;
        let tag = body.split_off(len);
        let incoming = CLIENT_TO_SERVER + SERVER_TO_CLIENT - self.outgoing;
        let parts: [&[u8]; 5] = [
            &self.nonces,
            &[incoming],
            &self.received.to_le_bytes(),
            &(len as u32).to_le_bytes(),
            &body,
        ];
        if !self.key.verify_tag(SEAL_LABEL, &parts, &tag) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "message failed authentication (altered, replayed, or another key)",
            ));
        }
        self.received += 1;
        Ok(body)
    }
}

impl<S> Sealed<S> {
    /// The underlying stream (to adjust its timeouts, say).
    pub(super) fn get_ref(&self) -> &S {
        &self.stream
    }
}

impl<S> std::fmt::Debug for Sealed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte pipe that records what is written, for replaying and tampering with it.
    #[derive(Default)]
    struct Tap {
        input: std::collections::VecDeque<u8>,
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

    fn key(b: u8) -> PreSharedKey {
        PreSharedKey::new(vec![b; 32]).expect("key")
    }

    /// A client and a server end joined by taps; the server's input is whatever we feed it.
    fn sealed_pair(server_key: u8) -> (Sealed<Tap>, Sealed<Tap>) {
        // The server answers the client's nonce with its own: pre-load each side's input with
        // the other's nonce by opening the client against a server nonce we make up first.
        let server_nonce = [7u8; NONCE_LEN];
        let client_tap = Tap {
            input: server_nonce.iter().copied().collect(),
            ..Default::default()
        };
        let mut client = Sealed::open(client_tap, key(1), true).expect("client");
        let client_nonce = client.nonces[..NONCE_LEN].to_vec();
        let server_tap = Tap {
            input: client_nonce.into_iter().collect(),
            ..Default::default()
        };
        let mut server = Sealed::open(server_tap, key(server_key), false).expect("server");
        // Make the server use the nonce the client saw.
        server.nonces[NONCE_LEN..].copy_from_slice(&server_nonce);
        // Only the messages from here on.
        client.stream.written.clear();
        (client, server)
    }

    #[test]
    fn sealed_messages_are_authenticated_in_order() {
        let (mut client, mut server) = sealed_pair(1);
        client.write_message(b"first").expect("write");
        client.write_message(b"second").expect("write");
        let wire = std::mem::take(&mut client.stream.written);
        server.stream.input.extend(&wire);
        assert_eq!(server.read_message().expect("first"), b"first");
        assert_eq!(server.read_message().expect("second"), b"second");
        // The same bytes again: a replay, numbered 0 and 1 where 2 is due.
        server.stream.input.extend(&wire);
        let e = server.read_message().expect_err("a replay must fail");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn sealed_messages_refuse_tampering_and_other_keys() {
        let (mut client, mut server) = sealed_pair(1);
        client.write_message(&[1, 2, 3, 4]).expect("write");
        let mut wire = std::mem::take(&mut client.stream.written);
        wire[5] ^= 1;
        server.stream.input.extend(&wire);
        let e = server.read_message().expect_err("tampered");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);

        let (mut client, mut server) = sealed_pair(2);
        client.write_message(b"hello").expect("write");
        let wire = std::mem::take(&mut client.stream.written);
        server.stream.input.extend(&wire);
        let e = server.read_message().expect_err("another key");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn answers_flow_back_and_reflections_are_refused() {
        let (mut client, mut server) = sealed_pair(1);
        server.stream.written.clear();
        server.write_message(b"answer").expect("write");
        let wire = std::mem::take(&mut server.stream.written);
        client.stream.input.extend(&wire);
        assert_eq!(client.read_message().expect("answer"), b"answer");
        // The client's own message bounced back to it: right key, right number, wrong direction.
        client.write_message(b"request").expect("write");
        let wire = std::mem::take(&mut client.stream.written);
        client.stream.input.extend(&wire);
        let e = client.read_message().expect_err("a reflection must fail");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn messages_of_another_connection_are_refused() {
        let (mut client, _) = sealed_pair(1);
        let (_, mut other_server) = sealed_pair(1);
        client.write_message(b"hello").expect("write");
        let wire = std::mem::take(&mut client.stream.written);
        other_server.stream.input.extend(&wire);
        let e = other_server
            .read_message()
            .expect_err("another connection's nonces");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn oversized_messages_are_refused_unread() {
        let (_, mut server) = sealed_pair(1);
        let len = (MAX_MESSAGE + 1) as u32;
        server.stream.input.extend(len.to_le_bytes());
        server.stream.input.extend(std::iter::repeat_n(0u8, 8));
        let e = server.read_message().expect_err("too long");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("max 1024"), "{e}");
        // The announced body was not consumed.
        assert_eq!(server.stream.input.len(), 8);
    }
}
