//! Live state transfer: a running guest's memory, vCPU and VMM state copied to a new replica
//! while the guest keeps running (pre-copy with KVM's dirty-page log), so that a new backup can
//! join a running primary. The byte format is specified in `vmm/MIGRATION.md` (checked by a
//! test against this code).
//!
//! - [`stream`]: the chunks, each checksummed; the only code that reads or writes their bytes;
//! - [`source`]: the primary's side ([`source::Precopy`]): every page while the guest runs,
//!   then the pages dirtied meanwhile, round after round until the dirty set is small or stops
//!   shrinking; then, with the guest stopped at an exit boundary, the last dirty pages, the
//!   vCPU state, the VMM's device state and the digests;
//! - [`sink`]: the joiner's side ([`sink::restore`]): checks every chunk, the header against
//!   what it expects, loads the state into a fresh VM of the same image and memory size, and
//!   refuses unless its own memory and register digests equal the primary's;
//! - [`state`]: the vCPU state's encoding.

pub mod fuzz;
pub mod sink;
pub mod source;
pub mod state;
pub mod stream;

use crate::vm::VmError;

/// The SHA-256 of a guest image: the digest a join (and later a handshake) compares.
pub fn image_digest(image: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(image).into()
}

/// Hex of a digest, for messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a state transfer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The stream could not be read or written.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The stream ended before its last chunk.
    #[error("the state stream ended early, inside {0}")]
    Truncated(&'static str),
    /// A chunk's bytes do not match its checksum: corrupted in transit.
    #[error(
        "chunk {index} ({kind}) is corrupt: checksum {stored:#010x}, computed {computed:#010x}"
    )]
    Checksum {
        /// Chunk number, from 0.
        index: u64,
        /// Its kind's name.
        kind: &'static str,
        /// Checksum in the chunk.
        stored: u32,
        /// Checksum of its bytes.
        computed: u32,
    },
    /// A chunk of an authenticated stream without a valid tag: altered, forged, replayed or
    /// reordered by someone without the session's keys, or not sealed at all.
    #[error("chunk {index} ({kind}) is not authentic: {what}")]
    Unauthenticated {
        /// Chunk number.
        index: u64,
        /// Its kind's name.
        kind: &'static str,
        /// Why.
        what: String,
    },
    /// Not a chunk at all.
    #[error("chunk {index}: bad magic {found:02x?}")]
    BadMagic {
        /// Chunk number.
        index: u64,
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A kind this build does not know.
    #[error("chunk {index}: unknown kind {kind}")]
    UnknownKind {
        /// Chunk number.
        index: u64,
        /// The kind byte.
        kind: u8,
    },
    /// A chunk that is malformed or out of place.
    #[error("chunk {index} ({kind}): {what}")]
    Malformed {
        /// Chunk number.
        index: u64,
        /// Its kind's name.
        kind: &'static str,
        /// What is wrong.
        what: String,
    },
    /// The primary's state is not for this joiner (another pair, image or memory size, or an
    /// older epoch).
    #[error("{what}: the primary has {theirs}, this joiner {ours}")]
    Mismatch {
        /// What differs.
        what: &'static str,
        /// The primary's.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// The state arrived but does not reproduce the primary's: the joiner must not start.
    #[error("the transferred state differs from the primary's: {what} {ours:#018x} here, {theirs:#018x} there")]
    HashMismatch {
        /// Which digest.
        what: &'static str,
        /// Ours.
        ours: u64,
        /// The primary's.
        theirs: u64,
    },
    /// The other side refused the join, with its reason.
    #[error("join refused: {0}")]
    Refused(String),
    /// The vCPU state in the stream is malformed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// KVM or guest memory failed.
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl MigrateError {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| {
            if source.kind() == std::io::ErrorKind::UnexpectedEof {
                MigrateError::Truncated(context)
            } else {
                MigrateError::Io { context, source }
            }
        }
    }
}
