//! The crate's error types: one enum per concern.
//!
//! [`DecodeError`] is everything that can be wrong with bytes received from a peer;
//! [`EncodeError`] is everything that can stop the primary from encoding a frame;
//! [`InvalidKind`] is the failed conversion of a raw kind byte. Every variant names what was
//! wrong, and entry-level decode errors carry the entry's index in the frame and its byte
//! offset from the start of the frame, so a rejected frame can be located in a hex dump.

use crate::entry::Kind;

/// Why a byte string is not a valid version-1 frame.
///
/// A frame that produces any of these is rejected as a whole: no entry of it is ever exposed.
/// Offsets are byte offsets from the start of the frame (so the first entry is at offset 40).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends before the frame header or the frame body does.
    #[error("truncated {what}: need {needed} bytes, have {available}")]
    Truncated {
        /// Which part is cut short: `"frame header"` or `"frame"`.
        what: &'static str,
        /// Bytes needed from the start of the input.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The first four bytes are not `b"FTLG"`.
    #[error("bad magic {found:02x?}, expected \"FTLG\"")]
    BadMagic {
        /// The four bytes found instead.
        found: [u8; 4],
    },
    /// The frame was written by a peer speaking another format version.
    #[error("unsupported format version {found}, expected {supported}")]
    UnsupportedVersion {
        /// The version in the frame.
        found: u16,
        /// The only version this build reads, [`FORMAT_VERSION`](crate::FORMAT_VERSION).
        supported: u16,
    },
    /// The frame header's flags field has bits set; version 1 defines none.
    #[error("unknown frame flags {0:#06x}")]
    UnknownFrameFlags(u16),
    /// A reserved field of the frame header is not zero.
    #[error("reserved field {what} is not zero")]
    ReservedNotZero {
        /// Which reserved field.
        what: &'static str,
    },
    /// The declared body length exceeds [`MAX_BODY_LEN`](crate::MAX_BODY_LEN).
    #[error("frame body of {body_len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge {
        /// The declared body length.
        body_len: u32,
        /// The limit.
        max: u32,
    },
    /// The declared entry count cannot fit in the declared body (every entry is at least
    /// [`ENTRY_HEADER_LEN`](crate::ENTRY_HEADER_LEN) bytes).
    #[error("entry count {count} cannot fit in a {body_len}-byte body")]
    ImpossibleEntryCount {
        /// The declared entry count.
        count: u32,
        /// The declared body length.
        body_len: u32,
    },
    /// The last entry's sequence number, `first_seq + count - 1`, does not fit in a `u64`.
    #[error("sequence numbers overflow: first {first_seq} with {count} entries")]
    SequenceOverflow {
        /// The declared first sequence number.
        first_seq: u64,
        /// The declared entry count.
        count: u32,
    },
    /// The CRC32C stored in the header does not match the header and body.
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the bytes received.
        computed: u32,
    },
    /// An entry runs past the end of the body (including a payload length that lies).
    #[error(
        "entry {index} at offset {offset}: truncated {what}: need {needed} bytes, have {available}"
    )]
    EntryTruncated {
        /// Index of the entry in the frame.
        index: u32,
        /// Offset of the entry from the start of the frame.
        offset: usize,
        /// Which part is cut short: `"entry header"`, `"instruction count"` or `"payload"`.
        what: &'static str,
        /// Bytes the entry needs from its start.
        needed: usize,
        /// Bytes left in the body from the entry's start.
        available: usize,
    },
    /// An entry's kind byte is not one version 1 defines.
    #[error("entry {index} at offset {offset}: unknown kind {kind}")]
    UnknownKind {
        /// Index of the entry in the frame.
        index: u32,
        /// Offset of the entry from the start of the frame.
        offset: usize,
        /// The kind byte found.
        kind: u8,
    },
    /// An entry's flags byte has bits set that version 1 does not define.
    #[error("entry {index} at offset {offset}: unknown entry flags {flags:#04x}")]
    UnknownEntryFlags {
        /// Index of the entry in the frame.
        index: u32,
        /// Offset of the entry from the start of the frame.
        offset: usize,
        /// The flags byte found.
        flags: u8,
    },
    /// A reserved field inside an entry is not zero.
    #[error("entry {index} at offset {offset}: reserved field {what} is not zero")]
    EntryReservedNotZero {
        /// Index of the entry in the frame.
        index: u32,
        /// Offset of the entry from the start of the frame.
        offset: usize,
        /// Which reserved field.
        what: &'static str,
    },
    /// An entry's payload length is wrong for its kind.
    #[error(
        "entry {index} at offset {offset}: {kind:?} payload of {len} bytes, expected {expected}"
    )]
    BadPayloadLength {
        /// Index of the entry in the frame.
        index: u32,
        /// Offset of the entry from the start of the frame.
        offset: usize,
        /// The entry's kind.
        kind: Kind,
        /// The declared payload length.
        len: u32,
        /// What the kind requires, e.g. `"8"` or `"at least 2"`.
        expected: &'static str,
    },
    /// A control entry's op is not one version 1 defines.
    #[error("entry {index} at offset {offset}: unknown control op {op}")]
    UnknownControlOp {
        /// Index of the entry in the frame.
        index: u32,
        /// Offset of the entry from the start of the frame.
        offset: usize,
        /// The op found.
        op: u32,
    },
    /// A control entry has a non-zero argument for an op that takes none.
    #[error("entry {index} at offset {offset}: control op {op} takes no argument, got {argument}")]
    InvalidControlArgument {
        /// Index of the entry in the frame.
        index: u32,
        /// Offset of the entry from the start of the frame.
        offset: usize,
        /// The op.
        op: u32,
        /// The argument found.
        argument: u64,
    },
    /// The body ends cleanly after fewer entries than the header declares.
    #[error("frame declares {declared} entries, body holds {found}")]
    EntryCountMismatch {
        /// The header's entry count.
        declared: u32,
        /// Entries found before the body ended.
        found: u32,
    },
    /// Bytes remain in the body after the last declared entry.
    #[error("{count} trailing bytes at offset {offset} after the last entry")]
    TrailingBytes {
        /// Offset of the first trailing byte from the start of the frame.
        offset: usize,
        /// Number of trailing bytes.
        count: usize,
    },
}

/// Why an entry or frame could not be encoded.
///
/// [`BufferFull`](Self::BufferFull) and [`BodyTooLarge`](Self::BodyTooLarge) mean "this frame
/// is full": the writer is unchanged, so the caller finishes the frame and pushes the entry
/// into the next one. [`EntryTooLarge`](Self::EntryTooLarge) means the entry fits in no frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The output buffer has no room for the frame header or for the next entry.
    #[error("buffer full: need {needed} bytes, have {available}")]
    BufferFull {
        /// Bytes the header or entry needs.
        needed: usize,
        /// Bytes left in the buffer.
        available: usize,
    },
    /// The entry alone is larger than [`MAX_BODY_LEN`](crate::MAX_BODY_LEN), so no frame can
    /// hold it.
    #[error("entry of {len} bytes exceeds the {max}-byte frame body limit")]
    EntryTooLarge {
        /// The entry's encoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Adding the entry would grow the body past [`MAX_BODY_LEN`](crate::MAX_BODY_LEN).
    #[error("frame body would grow to {needed} bytes, over the {max}-byte limit")]
    BodyTooLarge {
        /// The body length the entry would produce.
        needed: usize,
        /// The limit.
        max: usize,
    },
    /// The entry's sequence number, `first_seq + entry_count`, does not fit in a `u64`.
    #[error("sequence number overflow: entry {count} after first sequence {first_seq}")]
    SequenceOverflow {
        /// The frame's first sequence number.
        first_seq: u64,
        /// The index the entry would have had.
        count: u32,
    },
}

/// A byte that is not a [`Kind`] defined by this format version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown entry kind {0}")]
pub struct InvalidKind(pub u8);
