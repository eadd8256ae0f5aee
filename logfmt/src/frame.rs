//! Decoding batch frames: header validation, CRC check, and zero-copy entry iteration.
//!
//! A frame is validated completely before anything in it is exposed: [`FrameView::parse`]
//! checks the header, the limits, the CRC, and every entry, and only then returns a view. A
//! frame that fails any check yields an error and no entries, so a backup never applies part
//! of a bad frame. After a successful parse the entry iterators cannot fail.

use core::iter::FusedIterator;

use crate::entry::Entry;
use crate::error::DecodeError;
use crate::wire::{Reader, Writer};
use crate::{ENTRY_HEADER_LEN, FORMAT_VERSION, FRAME_HEADER_LEN, MAGIC, MAX_BODY_LEN};

/// Number of header bytes covered by the CRC: everything before the CRC field.
pub(crate) const CRC_COVERED_LEN: usize = FRAME_HEADER_LEN - 4;

/// The CRC32C of a frame: the header bytes before the CRC field, then the body.
#[inline]
pub(crate) fn frame_crc(covered_header: &[u8; CRC_COVERED_LEN], body: &[u8]) -> u32 {
    let crc = crate::crc::implementation();
    crc.append(crc.append(0, covered_header), body)
}

/// The validated fields of a frame header.
///
/// The magic, version, flags, reserved field and CRC are not kept: once a header has been
/// accepted they carry no information.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameHeader {
    /// The fencing epoch of the primary that wrote the frame. A backup refuses frames from an
    /// epoch older than the newest it has seen, so a deposed primary cannot feed it.
    pub epoch: u64,
    /// The sequence number of the frame's first entry; entry `i` has `first_seq + i`.
    pub first_seq: u64,
    /// The number of entries in the body.
    pub entry_count: u32,
    /// The length of the body in bytes.
    pub body_len: u32,
}

impl FrameHeader {
    /// Validates the 40-byte frame header at the start of `bytes`, without the CRC (which
    /// needs the body).
    ///
    /// Checks, in order: length, magic, version, flags, reserved field, body length limit,
    /// entry count against body length, and that the last sequence number fits in a `u64`.
    /// Bytes after the header are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        let truncated = DecodeError::Truncated {
            what: "frame header",
            needed: FRAME_HEADER_LEN,
            available: bytes.len(),
        };
        let mut r = Reader::new(bytes);
        let (
            Some(magic),
            Some(version),
            Some(flags),
            Some(epoch),
            Some(first_seq),
            Some(entry_count),
            Some(body_len),
            Some(reserved),
            Some(_crc),
        ) = (
            r.array::<4>(),
            r.u16(),
            r.u16(),
            r.u64(),
            r.u64(),
            r.u32(),
            r.u32(),
            r.u32(),
            r.u32(),
        )
        else {
            return Err(truncated);
        };

        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if flags != 0 {
            return Err(DecodeError::UnknownFrameFlags(flags));
        }
        if reserved != 0 {
            return Err(DecodeError::ReservedNotZero {
                what: "frame header reserved",
            });
        }
        if body_len > MAX_BODY_LEN {
            return Err(DecodeError::FrameTooLarge {
                body_len,
                max: MAX_BODY_LEN,
            });
        }
        // ENTRY_HEADER_LEN is 16, so the cast is lossless.
        if entry_count > body_len / ENTRY_HEADER_LEN as u32 {
            return Err(DecodeError::ImpossibleEntryCount {
                count: entry_count,
                body_len,
            });
        }
        if entry_count > 0 && first_seq.checked_add(u64::from(entry_count) - 1).is_none() {
            return Err(DecodeError::SequenceOverflow {
                first_seq,
                count: entry_count,
            });
        }
        Ok(Self {
            epoch,
            first_seq,
            entry_count,
            body_len,
        })
    }

    /// The frame's total length in bytes: the header plus the body.
    #[inline]
    pub const fn frame_len(&self) -> usize {
        // `body_len` is a `u32`, so this cannot overflow a 64-bit `usize`; saturating keeps
        // narrower targets panic-free (such a frame is then simply reported truncated).
        FRAME_HEADER_LEN.saturating_add(self.body_len as usize)
    }

    /// The sequence number of the frame's last entry, or `None` if it has no entries.
    #[inline]
    pub const fn last_seq(&self) -> Option<u64> {
        match self.entry_count {
            0 => None,
            n => self.first_seq.checked_add(n as u64 - 1),
        }
    }

    /// Encodes the header into `out`, sealing it with the CRC of the header and `body`.
    /// `None` only if `out` were too short, which its type rules out.
    ///
    /// The fields are written straight into the output and the CRC is read back from there,
    /// so nothing is copied.
    pub(crate) fn seal(&self, out: &mut [u8; FRAME_HEADER_LEN], body: &[u8]) -> Option<()> {
        let (covered, crc_field) = out.split_first_chunk_mut::<CRC_COVERED_LEN>()?;
        {
            let mut w = Writer::new(covered);
            w.array(MAGIC)?;
            w.u16(FORMAT_VERSION)?;
            w.u16(0)?; // flags
            w.u64(self.epoch)?;
            w.u64(self.first_seq)?;
            w.u32(self.entry_count)?;
            w.u32(self.body_len)?;
            w.u32(0)?; // reserved
        }
        let crc = frame_crc(covered, body);
        Writer::new(crc_field).u32(crc)
    }
}

/// Validates the header at the start of `header_bytes` and returns the length of the whole
/// frame, so a stream reader knows how many bytes to read before calling
/// [`FrameView::parse`].
///
/// Only the header is checked (see [`FrameHeader::parse`]); the CRC and entries are checked
/// when the whole frame is parsed.
#[inline]
pub fn peek_frame_len(header_bytes: &[u8]) -> Result<usize, DecodeError> {
    FrameHeader::parse(header_bytes).map(|h| h.frame_len())
}

/// Parses the frame at the start of `bytes`; the same as [`FrameView::parse`].
#[inline]
pub fn decode_frame(bytes: &[u8]) -> Result<(FrameView<'_>, usize), DecodeError> {
    FrameView::parse(bytes)
}

/// A fully validated frame, borrowing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameView<'a> {
    header: FrameHeader,
    bytes: &'a [u8],
    body: &'a [u8],
}

impl<'a> FrameView<'a> {
    /// Parses and fully validates the frame at the start of `bytes`, returning a view of it
    /// and its length in bytes; anything after the frame is left alone, so a buffer of
    /// back-to-back frames can be walked by advancing by the returned length.
    ///
    /// Checks the header (see [`FrameHeader::parse`]), that all `40 + body_len` bytes are
    /// present, the CRC, and then every entry in order; the first failure is returned.
    pub fn parse(bytes: &'a [u8]) -> Result<(Self, usize), DecodeError> {
        Self::parse_checked(bytes, true)
    }

    /// As [`FrameView::parse`], but without recomputing the CRC: for a frame this process
    /// already accepted with [`FrameView::parse`] and has kept since in memory nobody else
    /// writes (the backup's own ring of validated frames). The header and every entry are
    /// still checked, so the view's iterators cannot fail; only the integrity of the bytes in
    /// transit, which the first parse established, is taken as given.
    pub fn parse_validated(bytes: &'a [u8]) -> Result<(Self, usize), DecodeError> {
        Self::parse_checked(bytes, false)
    }

    /// A view of a frame this process validated completely before and kept since in memory
    /// nobody else writes, with only its header and length checked again: for reading a
    /// landed frame entry by entry in place ([`FrameView::entry_at`]), where re-walking every
    /// entry at each step would cost the frame's length per entry.
    pub fn parse_landed(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        Ok(Self::split(bytes)?.0)
    }

    /// The header parsed and the frame cut to its declared length; also returns the header
    /// bytes the CRC covers and the CRC stored. Nothing past the header is checked.
    fn split(bytes: &'a [u8]) -> Result<(Self, &'a [u8; FRAME_HEADER_LEN - 4], u32), DecodeError> {
        let header = FrameHeader::parse(bytes)?;
        let frame_len = header.frame_len();
        let truncated = DecodeError::Truncated {
            what: "frame",
            needed: frame_len,
            available: bytes.len(),
        };
        let frame = bytes.get(..frame_len).ok_or(truncated)?;
        let (head, body) = frame
            .split_first_chunk::<FRAME_HEADER_LEN>()
            .ok_or(truncated)?;
        let (covered, stored) = head
            .split_last_chunk::<4>()
            .and_then(|(covered, stored)| Some((covered.first_chunk()?, stored)))
            .ok_or(truncated)?;
        let view = Self {
            header,
            bytes: frame,
            body,
        };
        Ok((view, covered, u32::from_le_bytes(*stored)))
    }

    /// The entry with index `index` that starts at body offset `offset`, and the body offset
    /// of the next one: the step of an in-place cursor (start at `(0, 0)`). The entry is
    /// decoded and checked as [`FrameView::parse`] checks it, so a wrong offset is an error,
    /// never a wrong entry read as a right one.
    pub fn entry_at(&self, offset: usize, index: u32) -> Result<(Entry<'a>, usize), DecodeError> {
        if index >= self.header.entry_count {
            return Err(DecodeError::EntryCountMismatch {
                declared: self.header.entry_count,
                found: index,
            });
        }
        Entry::parse(self.body, offset, index)
    }

    fn parse_checked(bytes: &'a [u8], check_crc: bool) -> Result<(Self, usize), DecodeError> {
        let (view, covered, stored) = Self::split(bytes)?;
        let (header, body) = (view.header, view.body);
        if check_crc {
            let computed = frame_crc(covered, body);
            if stored != computed {
                return Err(DecodeError::CrcMismatch { stored, computed });
            }
        }

        let mut offset = 0;
        for index in 0..header.entry_count {
            if offset == body.len() {
                return Err(DecodeError::EntryCountMismatch {
                    declared: header.entry_count,
                    found: index,
                });
            }
            offset = Entry::parse(body, offset, index)?.1;
        }
        if offset != body.len() {
            return Err(DecodeError::TrailingBytes {
                offset: FRAME_HEADER_LEN + offset,
                count: body.len().saturating_sub(offset),
            });
        }
        let len = view.bytes.len();
        Ok((view, len))
    }

    /// The frame's header fields.
    #[inline]
    pub const fn header(&self) -> FrameHeader {
        self.header
    }

    /// The fencing epoch of the primary that wrote the frame.
    #[inline]
    pub const fn epoch(&self) -> u64 {
        self.header.epoch
    }

    /// The sequence number of the first entry.
    #[inline]
    pub const fn first_seq(&self) -> u64 {
        self.header.first_seq
    }

    /// The number of entries.
    #[inline]
    pub const fn entry_count(&self) -> u32 {
        self.header.entry_count
    }

    /// The sequence number of the last entry, or `None` if the frame has none.
    #[inline]
    pub const fn last_seq(&self) -> Option<u64> {
        self.header.last_seq()
    }

    /// The encoded entries: the bytes after the header.
    #[inline]
    pub const fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The whole frame, header and body.
    #[inline]
    pub const fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The entries, in order.
    #[inline]
    pub fn entries(&self) -> Entries<'a> {
        Entries {
            body: self.body,
            offset: 0,
            index: 0,
            count: self.header.entry_count,
        }
    }

    /// The entries in order, each with its sequence number.
    #[inline]
    pub fn entries_with_seq(&self) -> EntriesWithSeq<'a> {
        EntriesWithSeq {
            entries: self.entries(),
            next_seq: self.header.first_seq,
        }
    }
}

/// Iterator over the entries of a validated frame; see [`FrameView::entries`].
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    body: &'a [u8],
    offset: usize,
    index: u32,
    count: u32,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Entry<'a>;

    #[inline]
    fn next(&mut self) -> Option<Entry<'a>> {
        if self.index >= self.count {
            return None;
        }
        match Entry::parse(self.body, self.offset, self.index) {
            Ok((entry, next)) => {
                self.offset = next;
                self.index += 1;
                Some(entry)
            }
            Err(_) => {
                // The frame was validated by `FrameView::parse` with this same function, so
                // this is a bug in this crate, not bad input. Stop rather than panic in
                // release builds; debug builds (and the fuzzer) flag it.
                debug_assert!(false, "validated frame failed to re-parse");
                self.index = self.count;
                None
            }
        }
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.count.saturating_sub(self.index) as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Entries<'_> {}
impl FusedIterator for Entries<'_> {}

/// Iterator over `(sequence number, entry)` pairs; see [`FrameView::entries_with_seq`].
#[derive(Debug, Clone)]
pub struct EntriesWithSeq<'a> {
    entries: Entries<'a>,
    next_seq: u64,
}

impl<'a> Iterator for EntriesWithSeq<'a> {
    type Item = (u64, Entry<'a>);

    #[inline]
    fn next(&mut self) -> Option<(u64, Entry<'a>)> {
        let entry = self.entries.next()?;
        let seq = self.next_seq;
        // Wraps only past the last entry when its sequence number is `u64::MAX`, after which
        // the iterator is exhausted.
        self.next_seq = seq.wrapping_add(1);
        Some((seq, entry))
    }

    #[inline]
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }
}

impl ExactSizeIterator for EntriesWithSeq<'_> {}
impl FusedIterator for EntriesWithSeq<'_> {}

/// Walks a buffer of back-to-back frames; see [`frames`].
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    rest: &'a [u8],
    failed: bool,
}

/// Iterates over the frames packed back to back in `bytes`.
///
/// Yields each frame in turn; the first frame that fails to parse is yielded as an error and
/// ends the iteration, because after a bad frame the next frame's start is unknown.
#[inline]
pub fn frames(bytes: &[u8]) -> Frames<'_> {
    Frames {
        rest: bytes,
        failed: false,
    }
}

impl<'a> Frames<'a> {
    /// The bytes not yet consumed: empty after a clean walk, or starting with the frame that
    /// failed.
    #[inline]
    pub const fn remainder(&self) -> &'a [u8] {
        self.rest
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<FrameView<'a>, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match FrameView::parse(self.rest) {
            Ok((view, len)) => {
                self.rest = self.rest.get(len..).unwrap_or_default();
                Some(Ok(view))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

impl FusedIterator for Frames<'_> {}
