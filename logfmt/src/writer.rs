//! Encoding batch frames.
//!
//! The primary encodes straight into the memory the frame will be sent from, so
//! [`FrameWriter`] writes into a borrowed `&mut [u8]` (a ring slot, a socket buffer) and
//! allocates nothing. [`FrameBuf`] is the same writer over an owned buffer that is allocated
//! once and reused for frame after frame. In both, entries are appended one by one and the
//! header and CRC are written last, by `finish`, once the body is complete.

use crate::entry::Entry;
use crate::error::EncodeError;
use crate::frame::FrameHeader;
use crate::{FRAME_HEADER_LEN, MAX_BODY_LEN};

/// [`MAX_BODY_LEN`] as a `usize` (lossless: it is 16 MiB).
const MAX_BODY: usize = MAX_BODY_LEN as usize;

/// The state of a frame being built, shared by [`FrameWriter`] and [`FrameBuf`].
#[derive(Debug, Clone, Copy)]
struct Progress {
    epoch: u64,
    first_seq: u64,
    body_len: usize,
    entry_count: u32,
}

impl Progress {
    const fn new(epoch: u64, first_seq: u64) -> Self {
        Self {
            epoch,
            first_seq,
            body_len: 0,
            entry_count: 0,
        }
    }

    /// Appends `entry` to the body being built in `body`, or fails leaving `self` unchanged.
    fn push(&mut self, body: &mut [u8], entry: &Entry<'_>) -> Result<(), EncodeError> {
        let len = entry.encoded_len();
        let too_large = EncodeError::EntryTooLarge { len, max: MAX_BODY };
        if len > MAX_BODY {
            return Err(too_large);
        }
        // The payload is shorter than the entry, which is at most MAX_BODY_LEN (a `u32`).
        let payload_len = u32::try_from(entry.event.payload_len()).map_err(|_| too_large)?;
        if self
            .first_seq
            .checked_add(u64::from(self.entry_count))
            .is_none()
        {
            return Err(EncodeError::SequenceOverflow {
                first_seq: self.first_seq,
                count: self.entry_count,
            });
        }
        // Both terms are at most MAX_BODY_LEN, so the sum cannot overflow.
        let end = self.body_len + len;
        if end > MAX_BODY {
            return Err(EncodeError::BodyTooLarge {
                needed: end,
                max: MAX_BODY,
            });
        }
        let full = EncodeError::BufferFull {
            needed: len,
            available: body.len().saturating_sub(self.body_len),
        };
        let dst = body.get_mut(self.body_len..end).ok_or(full)?;
        entry.write(dst, payload_len).ok_or(full)?;
        self.body_len = end;
        // Every entry is at least 16 bytes and the body at most 16 MiB, so the count stays
        // below 2^20.
        self.entry_count += 1;
        Ok(())
    }

    /// Writes the header and CRC for the body in `body[..body_len]`; returns the frame length.
    fn seal(&self, header: &mut [u8; FRAME_HEADER_LEN], body: &[u8]) -> Result<usize, EncodeError> {
        let len = self.len();
        let full = EncodeError::BufferFull {
            needed: len,
            available: FRAME_HEADER_LEN + body.len(),
        };
        let fields = FrameHeader {
            epoch: self.epoch,
            first_seq: self.first_seq,
            entry_count: self.entry_count,
            // At most MAX_BODY_LEN, enforced by `push`.
            body_len: u32::try_from(self.body_len).map_err(|_| full)?,
        };
        let body = body.get(..self.body_len).ok_or(full)?;
        fields.seal(header, body).ok_or(full)?;
        Ok(len)
    }

    const fn len(&self) -> usize {
        FRAME_HEADER_LEN + self.body_len
    }

    const fn next_seq(&self) -> Option<u64> {
        self.first_seq.checked_add(self.entry_count as u64)
    }

    /// Body bytes still available in a body buffer of `capacity` bytes.
    fn remaining(&self, capacity: usize) -> usize {
        capacity.min(MAX_BODY).saturating_sub(self.body_len)
    }
}

/// Builds one frame in a caller-provided buffer.
///
/// Every frame the writer finishes is accepted by [`FrameView::parse`](crate::FrameView::parse).
/// A [`push`](Self::push) that fails leaves the writer unchanged, so when a frame is full the
/// caller finishes it and pushes the entry into a new one.
#[derive(Debug)]
pub struct FrameWriter<'a> {
    header: &'a mut [u8; FRAME_HEADER_LEN],
    body: &'a mut [u8],
    progress: Progress,
}

impl<'a> FrameWriter<'a> {
    /// Starts a frame at the start of `buf` for fencing epoch `epoch`, whose first entry will
    /// have sequence number `first_seq`.
    ///
    /// Fails with [`EncodeError::BufferFull`] if `buf` cannot hold the 40-byte header.
    pub fn new(buf: &'a mut [u8], epoch: u64, first_seq: u64) -> Result<Self, EncodeError> {
        let available = buf.len();
        let (header, body) =
            buf.split_first_chunk_mut::<FRAME_HEADER_LEN>()
                .ok_or(EncodeError::BufferFull {
                    needed: FRAME_HEADER_LEN,
                    available,
                })?;
        Ok(Self {
            header,
            body,
            progress: Progress::new(epoch, first_seq),
        })
    }

    /// Appends `entry` to the frame.
    ///
    /// On error nothing is written and the writer is unchanged:
    /// - [`EncodeError::EntryTooLarge`]: the entry exceeds [`MAX_BODY_LEN`] and fits in no frame;
    /// - [`EncodeError::SequenceOverflow`]: the entry's sequence number would exceed `u64::MAX`;
    /// - [`EncodeError::BodyTooLarge`]: the frame body would exceed [`MAX_BODY_LEN`];
    /// - [`EncodeError::BufferFull`]: the buffer has no room for the entry.
    #[inline]
    pub fn push(&mut self, entry: &Entry<'_>) -> Result<(), EncodeError> {
        self.progress.push(self.body, entry)
    }

    /// The frame's length so far in bytes, header included.
    #[inline]
    pub const fn len(&self) -> usize {
        self.progress.len()
    }

    /// Whether no entry has been pushed yet.
    #[inline]
    pub const fn is_empty(&self) -> bool {
        self.progress.entry_count == 0
    }

    /// The number of entries pushed.
    #[inline]
    pub const fn entry_count(&self) -> u32 {
        self.progress.entry_count
    }

    /// The bytes still available for entries: what is left of the buffer, capped by what is
    /// left under [`MAX_BODY_LEN`].
    #[inline]
    pub fn remaining(&self) -> usize {
        self.progress.remaining(self.body.len())
    }

    /// The fencing epoch the frame is written for.
    #[inline]
    pub const fn epoch(&self) -> u64 {
        self.progress.epoch
    }

    /// The sequence number of the frame's first entry.
    #[inline]
    pub const fn first_seq(&self) -> u64 {
        self.progress.first_seq
    }

    /// The sequence number the next pushed entry will get, or `None` if it would exceed
    /// `u64::MAX`.
    #[inline]
    pub const fn next_seq(&self) -> Option<u64> {
        self.progress.next_seq()
    }

    /// Writes the header and CRC and returns the frame's total length: the frame occupies
    /// `buf[..len]`. An empty frame (no entries) is valid.
    ///
    /// Version 1 has no failure left at this point (every limit was enforced by
    /// [`new`](Self::new) and [`push`](Self::push)); the `Result` keeps room for checks a
    /// later format version may need.
    pub fn finish(self) -> Result<usize, EncodeError> {
        self.progress.seal(self.header, self.body)
    }
}

/// A reusable frame buffer: [`FrameWriter`] over memory it owns.
///
/// The buffer is allocated once, by [`new`](Self::new), and reused: [`reset`](Self::reset)
/// starts a frame, [`push`](Self::push) appends entries, [`finish`](Self::finish) seals the
/// frame and lends out its bytes. A failed push leaves the frame unchanged, as with
/// [`FrameWriter`].
#[derive(Debug, Clone)]
pub struct FrameBuf {
    buf: Vec<u8>,
    /// Bytes kept free after the largest frame, for whoever sends the frame to append
    /// something (a transport's authentication trailer); see [`FrameBuf::with_room`].
    room: usize,
    progress: Progress,
}

impl FrameBuf {
    /// A buffer for frames of up to `capacity` bytes, header included. With less than the
    /// 40-byte header, every [`push`](Self::push) and [`finish`](Self::finish) fails with
    /// [`EncodeError::BufferFull`]. The frame starts empty, with epoch and sequence number 0.
    pub fn new(capacity: usize) -> Self {
        Self::with_room(capacity, 0)
    }

    /// As [`new`](Self::new), with `room` more bytes after the largest frame, which
    /// [`finish_with_room`](Self::finish_with_room) lends out right after the frame. They are
    /// not part of the frame.
    pub fn with_room(capacity: usize, room: usize) -> Self {
        Self {
            buf: vec![0; capacity + room],
            room,
            progress: Progress::new(0, 0),
        }
    }

    /// Discards the frame and starts an empty one for fencing epoch `epoch`, whose first
    /// entry will have sequence number `first_seq`.
    #[inline]
    pub fn reset(&mut self, epoch: u64, first_seq: u64) {
        self.progress = Progress::new(epoch, first_seq);
    }

    /// Discards the frame's entries, keeping its epoch and first sequence number.
    #[inline]
    pub fn clear(&mut self) {
        self.reset(self.progress.epoch, self.progress.first_seq);
    }

    /// The header part and the body part of the buffer.
    fn parts(&mut self) -> Result<(&mut [u8; FRAME_HEADER_LEN], &mut [u8]), EncodeError> {
        let available = self.buf.len() - self.room;
        self.buf[..available]
            .split_first_chunk_mut::<FRAME_HEADER_LEN>()
            .ok_or(EncodeError::BufferFull {
                needed: FRAME_HEADER_LEN,
                available,
            })
    }

    /// Appends `entry` to the frame; fails, leaving the frame unchanged, exactly as
    /// [`FrameWriter::push`] does.
    #[inline]
    pub fn push(&mut self, entry: &Entry<'_>) -> Result<(), EncodeError> {
        let mut progress = self.progress;
        let (_, body) = self.parts()?;
        progress.push(body, entry)?;
        self.progress = progress;
        Ok(())
    }

    /// Writes the header and CRC and returns the whole frame. The frame stays in the buffer
    /// until the next [`reset`](Self::reset) or [`clear`](Self::clear); pushing more entries
    /// and finishing again is allowed.
    pub fn finish(&mut self) -> Result<&[u8], EncodeError> {
        let progress = self.progress;
        let (header, body) = self.parts()?;
        let len = progress.seal(header, body)?;
        self.buf.get(..len).ok_or(EncodeError::BufferFull {
            needed: len,
            available: self.buf.len(),
        })
    }

    /// As [`finish`](Self::finish), and lends out the frame followed by the buffer's extra
    /// room ([`with_room`](Self::with_room)) for the caller to fill.
    pub fn finish_with_room(&mut self) -> Result<&mut [u8], EncodeError> {
        let progress = self.progress;
        let (header, body) = self.parts()?;
        let len = progress.seal(header, body)?;
        let available = self.buf.len();
        self.buf
            .get_mut(..len + self.room)
            .ok_or(EncodeError::BufferFull {
                needed: len + self.room,
                available,
            })
    }

    /// The frame's length so far in bytes, header included.
    #[inline]
    pub const fn len(&self) -> usize {
        self.progress.len()
    }

    /// Whether the frame has no entries.
    #[inline]
    pub const fn is_empty(&self) -> bool {
        self.progress.entry_count == 0
    }

    /// The number of entries pushed.
    #[inline]
    pub const fn entry_count(&self) -> u32 {
        self.progress.entry_count
    }

    /// The largest frame the buffer holds, header included.
    #[inline]
    pub fn capacity(&self) -> usize {
        self.buf.len() - self.room
    }

    /// The bytes still available for entries (see [`FrameWriter::remaining`]).
    #[inline]
    pub fn remaining(&self) -> usize {
        self.progress
            .remaining(self.capacity().saturating_sub(FRAME_HEADER_LEN))
    }

    /// The fencing epoch the frame is written for.
    #[inline]
    pub const fn epoch(&self) -> u64 {
        self.progress.epoch
    }

    /// The sequence number of the frame's first entry.
    #[inline]
    pub const fn first_seq(&self) -> u64 {
        self.progress.first_seq
    }

    /// The sequence number the next pushed entry will get, or `None` if it would exceed
    /// `u64::MAX`.
    #[inline]
    pub const fn next_seq(&self) -> Option<u64> {
        self.progress.next_seq()
    }
}

/// Encodes `entries` as one frame in a new `Vec`.
///
/// A convenience for tests and cold paths; the hot path uses [`FrameWriter`] or [`FrameBuf`]
/// on memory it already has. Fails without allocating if the entries exceed a frame's limits.
pub fn encode_frame(
    epoch: u64,
    first_seq: u64,
    entries: &[Entry<'_>],
) -> Result<Vec<u8>, EncodeError> {
    let mut body_len = 0usize;
    for entry in entries {
        let len = entry.encoded_len();
        if len > MAX_BODY {
            return Err(EncodeError::EntryTooLarge { len, max: MAX_BODY });
        }
        body_len = body_len.saturating_add(len);
        if body_len > MAX_BODY {
            return Err(EncodeError::BodyTooLarge {
                needed: body_len,
                max: MAX_BODY,
            });
        }
    }
    let mut buf = vec![0; FRAME_HEADER_LEN + body_len];
    let mut writer = FrameWriter::new(&mut buf, epoch, first_seq)?;
    for entry in entries {
        writer.push(entry)?;
    }
    let len = writer.finish()?;
    buf.truncate(len);
    Ok(buf)
}
