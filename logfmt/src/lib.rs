//! The ftvm event-log format: the contract between the primary and the backup.
//!
//! In ftvm the primary runs the guest and records every non-deterministic event (device
//! input, clock reads, random numbers, interrupts) as a log entry tagged with the guest
//! position where it took effect; the backup replays the same guest and injects each event at
//! the same position, so the two executions stay identical. Entries travel in batch *frames*:
//! a 40-byte header (magic, version, fencing epoch, first sequence number, entry count, body
//! length, CRC32C) followed by the entries packed back to back. `FORMAT.md` in this crate
//! documents the layout byte for byte.
//!
//! This crate only converts between typed entries and bytes. It does no I/O, spawns no
//! threads and contains no `unsafe`, so the transport, the VMM and the tools can share it and
//! it can be fuzzed in isolation.
//!
//! # Decoding
//!
//! [`FrameView::parse`] validates a whole frame (header, limits, CRC, every entry) before it
//! exposes anything, so a bad frame is never partially applied. Decoding is zero-copy: the
//! view and its [`Entry`] values borrow the input bytes, and iterating allocates nothing.
//! Bad input never panics; every way a frame can be wrong has its own [`DecodeError`].
//!
//! # Encoding
//!
//! [`FrameWriter`] encodes into a caller-provided buffer, such as a slot of a ring;
//! [`FrameBuf`] is the same over an owned buffer reused from frame to frame; and
//! [`encode_frame`] is the allocating convenience. The encoding is canonical: every reserved
//! field and flag must be zero, so decoding then re-encoding a frame reproduces it exactly.
//!
//! # Versioning
//!
//! Every frame carries [`FORMAT_VERSION`], and a decoder accepts exactly its own version:
//! a peer speaking another version is refused with [`DecodeError::UnsupportedVersion`] rather
//! than half-understood. Any change to the layout, a new entry kind, a new flag or a new
//! control op needs a new version; unknown kinds, flags and ops are errors, never skipped,
//! because a backup that ignored an event would silently diverge from the primary.
//!
//! # Example
//!
//! ```
//! use logfmt::{ControlOp, Entry, Event, FrameView, FrameWriter, Position};
//!
//! // The primary encodes a batch into a buffer it owns.
//! let mut buf = [0u8; 256];
//! let mut writer = FrameWriter::new(&mut buf, /* epoch */ 3, /* first_seq */ 100)?;
//! writer.push(&Entry::new(
//!     Position::at_exit(41),
//!     Event::DeviceInput { device: 2, data: b"ping" },
//! ))?;
//! writer.push(&Entry::new(Position::at_insn(42, 9_000), Event::Clock { ns: 5_000 }))?;
//! writer.push(&Entry::new(Position::at_exit(43), Event::Control(ControlOp::GoLive)))?;
//! let len = writer.finish()?;
//!
//! // The backup validates the whole frame, then replays its entries.
//! let (frame, consumed) = FrameView::parse(&buf[..len])?;
//! assert_eq!(consumed, len);
//! assert_eq!(frame.epoch(), 3);
//! assert_eq!(frame.last_seq(), Some(102));
//! let mut entries = frame.entries_with_seq();
//! assert_eq!(
//!     entries.next(),
//!     Some((100, Entry::new(
//!         Position::at_exit(41),
//!         Event::DeviceInput { device: 2, data: b"ping" },
//!     ))),
//! );
//! assert_eq!(entries.next().map(|(seq, e)| (seq, e.event)), Some((101, Event::Clock { ns: 5_000 })));
//! assert_eq!(entries.count(), 1);
//!
//! // A single flipped bit anywhere rejects the whole frame.
//! buf[60] ^= 1;
//! assert!(FrameView::parse(&buf[..len]).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod crc;
mod entry;
mod error;
mod frame;
mod wire;
mod writer;

pub use entry::{ControlOp, Entry, Event, Kind, Position, HAS_INSN_COUNT};
pub use error::{DecodeError, EncodeError, InvalidKind};
pub use frame::{
    decode_frame, frames, peek_frame_len, Entries, EntriesWithSeq, FrameHeader, FrameView, Frames,
};
pub use writer::{encode_frame, FrameBuf, FrameWriter};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FTLG";

/// The format version this build writes and the only one it reads.
pub const FORMAT_VERSION: u16 = 1;

/// Length of the frame header in bytes.
pub const FRAME_HEADER_LEN: usize = 40;

/// Length of the fixed entry header in bytes; also the smallest possible entry.
pub const ENTRY_HEADER_LEN: usize = 16;

/// Length of the optional instruction count that follows an entry header.
pub const INSN_COUNT_LEN: usize = 8;

/// The largest frame body, in bytes (16 MiB). It bounds the memory a receiver commits to a
/// frame on the strength of an unauthenticated length field.
pub const MAX_BODY_LEN: u32 = 16 * 1024 * 1024;

/// The largest frame, header included, in bytes.
pub const MAX_FRAME_LEN: usize = FRAME_HEADER_LEN + MAX_BODY_LEN as usize;

/// The digest of an output carried by [`Event::OutputMarker`]: XXH3-64 with seed 0.
///
/// The backup computes the same digest over the output its replica produced and compares, to
/// detect divergence before it could matter. It is a fast non-cryptographic hash: it detects
/// accidental divergence, not a malicious peer.
#[inline]
pub fn digest(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests;
