//! The channel's error type: one variant per way a channel can fail, so callers (the VMM, the
//! failover logic) can tell a dead peer from a bad key from a corrupt frame.

use std::time::Duration;

use crate::ring::RingError;

/// Why a channel operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChannelError {
    /// The peer closed the connection (or its process died and the kernel closed it).
    #[error("peer closed the channel")]
    PeerClosed,
    /// Nothing arrived from the peer for longer than the heartbeat timeout.
    #[error("peer silent for {silent_for:?} (heartbeat timeout)")]
    HeartbeatTimeout {
        /// How long the peer has been silent.
        silent_for: Duration,
    },
    /// A frame failed validation; it was not applied.
    #[error("corrupt frame from peer: {0}")]
    CorruptFrame(#[from] logfmt::DecodeError),
    /// A message on the wire that is not a frame or ack of this protocol.
    #[error("corrupt message from peer: {0}")]
    CorruptMessage(String),
    /// A frame's first sequence number is not the one expected next.
    #[error("sequence gap: expected entry {expected}, frame starts at {found}")]
    SequenceGap {
        /// The next sequence number expected.
        expected: u64,
        /// The frame's first sequence number.
        found: u64,
    },
    /// A frame or peer carries an older fencing epoch than the newest seen.
    #[error("stale epoch {frame} (current epoch {current})")]
    StaleEpoch {
        /// The epoch that was refused.
        frame: u64,
        /// The newest epoch known here.
        current: u64,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// The peer belongs to another FT pair.
    #[error("session mismatch: ours {ours:#x}, peer's {theirs:#x}")]
    SessionMismatch {
        /// Our session id.
        ours: u64,
        /// The peer's session id.
        theirs: u64,
    },
    /// The peer runs another guest (image or memory size), as the authenticated handshake
    /// showed; both sides refuse.
    #[error(
        "the peer runs another guest: {}",
        crate::handshake::describe_mismatch(ours, theirs)
    )]
    GuestMismatch {
        /// What this side runs.
        ours: crate::handshake::GuestIdentity,
        /// What the peer runs.
        theirs: crate::handshake::GuestIdentity,
    },
    /// The peer was set up for another medium.
    #[error("medium mismatch: the peer expects another transport")]
    MediumMismatch,
    /// The backup refused our proof of the pre-shared key.
    #[error("authentication refused by peer: pre-shared keys differ")]
    AuthRejected,
    /// The peer could not prove it holds the pre-shared key.
    #[error("peer failed pre-shared-key authentication: keys differ")]
    PeerNotAuthenticated,
    /// A frame or ACK after the handshake without a valid tag: forged, altered, replayed or
    /// reordered ([`crate::auth`]). Nothing in it was applied or counted.
    #[error("unauthenticated {what} refused: {reason}")]
    Unauthenticated {
        /// `frame` or `ACK`.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The two sides were configured with different channel protection (`--channel-crypto`).
    #[error("channel crypto mismatch: this side uses '{ours}', the peer '{theirs}' (both must use the same --channel-crypto)")]
    CryptoMismatch {
        /// Ours.
        ours: crate::auth::ChannelCrypto,
        /// The peer's (its name, or the byte it sent).
        theirs: String,
    },
    /// The peer broke the handshake protocol (e.g. garbage on the socket).
    #[error("bad handshake: {0}")]
    BadHandshake(String),
    /// The peer did not answer the handshake in time.
    #[error("handshake timed out waiting for {waiting_for}")]
    HandshakeTimeout {
        /// The message awaited.
        waiting_for: &'static str,
    },
    /// A bounded wait ended before its condition held.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: Duration,
    },
    /// A frame larger than the channel's configured limit.
    #[error("frame of {len} bytes exceeds the channel limit of {max}")]
    FrameTooLarge {
        /// Frame length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The local log ring failed.
    #[error("log ring: {0}")]
    Ring(#[from] RingError),
    /// Encoding an entry failed.
    #[error("encoding entry: {0}")]
    Encode(#[from] logfmt::EncodeError),
    /// Wrong configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The channel failed earlier (on another thread) and cannot be used.
    #[error("channel failed earlier: {0}")]
    Failed(String),
    /// The backup authenticated this primary but could not set up its side of the medium (its
    /// RDMA device failed, for example); the text is the backup's own error.
    #[error("the backup could not set up the medium: {0}")]
    PeerMediumFailed(String),
    /// An RDMA device could not be found, opened or used as configured (no such device, port
    /// down, empty GID entry, no kernel RDMA support).
    #[error("RDMA device {device:?}: {reason}")]
    RdmaDevice {
        /// The device name asked for.
        device: String,
        /// What was wrong.
        reason: String,
    },
    /// A verbs call (resource creation, queue-pair transition, posting) failed.
    #[error("RDMA {op}: {source}")]
    RdmaVerbs {
        /// The verbs operation.
        op: &'static str,
        /// The errno it returned.
        #[source]
        source: std::io::Error,
    },
    /// An RDMA work request completed with an error (e.g. retries exceeded: the peer's queue
    /// pair is gone; remote access error: a write outside the peer's registered region).
    #[error(
        "RDMA completion error: {status_text} (status {status}, vendor error {vendor_err:#x})"
    )]
    RdmaCompletion {
        /// `ibv_wc_status` value.
        status: u32,
        /// libibverbs' text for it.
        status_text: String,
        /// The device's own error code.
        vendor_err: u32,
    },
    /// The queue pair is in the error state: nothing more can be sent or received on it.
    #[error("RDMA queue pair in the error state")]
    RdmaQpError,
    /// A write would fall outside the peer's registered region; it was not posted.
    #[error("RDMA write of {len} bytes at offset {offset} falls outside the {region}-byte registered region")]
    RdmaOutOfBounds {
        /// Offset of the write in the region.
        offset: u64,
        /// Bytes of the write.
        len: u64,
        /// Size of the registered region.
        region: u64,
    },
    /// The peer's RDMA set-up message was malformed or out of bounds; the connection was refused.
    #[error("RDMA set-up refused: {0}")]
    RdmaSetup(String),
    /// A pre-shared key file that group or others may access (as ssh refuses a private key):
    /// nothing was read from it.
    #[error(
        "permissions {mode:04o} for '{}' are too open: a key file must be readable by its owner \
         only (chmod 600 it)",
        path.display()
    )]
    KeyFilePermissions {
        /// The key file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A pre-shared key file could not be read.
    #[error("reading pre-shared key file '{}': {source}", path.display())]
    KeyFile {
        /// The key file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ChannelError {
    /// Maps an I/O error, turning the kinds that mean "the peer is gone" into `PeerClosed`.
    pub(crate) fn io(context: &'static str, source: std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match source.kind() {
            BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof => {
                ChannelError::PeerClosed
            }
            _ => ChannelError::Io { context, source },
        }
    }

    /// Why a received frame was refused, for the metrics (`None`: not a refused frame).
    pub fn reject_cause(&self) -> Option<ftvm_metrics::RejectCause> {
        use ftvm_metrics::RejectCause;
        match self {
            ChannelError::CorruptFrame(_) | ChannelError::CorruptMessage(_) => {
                Some(RejectCause::Corrupt)
            }
            ChannelError::StaleEpoch { .. } => Some(RejectCause::StaleEpoch),
            ChannelError::SequenceGap { .. } => Some(RejectCause::SequenceGap),
            ChannelError::Unauthenticated { .. } => Some(RejectCause::Unauthenticated),
            _ => None,
        }
    }
}
