//! The authenticated session: ftvm's handshake, then ftvm's one session layer.
//!
//! Every connection starts with [`transport::handshake`]: the client plays the connecting
//! ("primary") role with [`MediumKind::Arbiter`], session [`ARBITER_SESSION_ID`] and epoch 0;
//! the server plays the listening role. Both prove they hold the pre-shared key, so a host with
//! another key gets no answer, and the client never takes a `Won` from a server that does not
//! hold the key. The handshake gives both the connection's session keys, and every message then
//! goes through [`transport::session::Sealed`]: `len: u32` (little-endian), `len` bytes (at most
//! [`MAX_MESSAGE`]), a 16-byte GMAC tag under the sender's direction key with the message's
//! number as nonce. So a message cannot be forged, altered, replayed, reordered, reflected or
//! moved to another connection by anyone without the key, even one who hijacks the TCP
//! connection. (Messages are not encrypted: decisions are not secret.) The same construction
//! protects the log channel's frames and ACKs ([`transport::auth`]).

use transport::handshake::{MediumKind, SessionParams};
use transport::PreSharedKey;

pub(super) use super::protocol::MAX_MESSAGE;

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

/// One authenticated connection after the handshake: ftvm's one session layer
/// ([`transport::session`]), which the log channel's tags share.
pub(super) use transport::session::Sealed;
