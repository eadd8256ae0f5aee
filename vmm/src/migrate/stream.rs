//! The state stream's chunks. Every chunk is a 16-byte header — magic `FTJN`, `u8 kind`,
//! `u8 flags`, `u16 reserved` (0), `u32 payload length`, `u32 CRC32C` over the header's
//! first 12 bytes and the payload — followed by the payload and, when the flags say
//! [`FLAG_SEALED`], a 16-byte tag ([`transport::session::ChunkTags`]) over the chunk's number,
//! header and payload. All integers little-endian. The payloads (see `vmm/MIGRATION.md`) are
//! built and parsed only here.

use std::io::{Read, Write};

use transport::session::{ChunkTag, ChunkTags, CHUNK_TAG_LEN};

use super::MigrateError;
pub use crate::vm::page_hash;
use crate::vm::PAGE_SIZE;

/// First bytes of every chunk.
pub const MAGIC: [u8; 4] = *b"FTJN";
/// Chunk header length.
pub const CHUNK_HEADER_LEN: usize = 16;
/// The flags bit of a sealed chunk: a [`CHUNK_TAG_LEN`]-byte tag follows its payload.
pub const FLAG_SEALED: u8 = 1;
/// Version of the stream format (in the [`Header`] chunk).
pub const STREAM_VERSION: u32 = 2;
/// Most pages in one `PAGES` chunk (1 MiB of page data).
pub const MAX_PAGES_PER_CHUNK: u32 = 256;
/// Largest payload of any chunk.
pub const MAX_PAYLOAD: usize = 16 + MAX_PAGES_PER_CHUNK as usize * PAGE_SIZE;
/// Largest `DEVICE` payload.
pub const MAX_DEVICE_STATE: usize = 64 * 1024;
/// Length of the [`Header`] payload.
pub const HEADER_LEN: usize = 64;

/// Chunk kinds, in the order a stream carries them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Format version, memory size, image digest, pair id, epoch.
    Header = 1,
    /// A run of pages: `u64 first page`, `u32 count`, `u32 0`, then `count` × 4096 bytes.
    Pages = 2,
    /// A run of all-zero pages: `u64 first page`, `u32 count`, `u32 0`.
    Zeros = 3,
    /// End of a pre-copy round: `u32 round`, `u32 0`, `u64 pages sent in it`.
    RoundEnd = 4,
    /// The vCPU state ([`super::state::VcpuState::encode`]), once, with the guest stopped.
    Vcpu = 5,
    /// The VMM's device state (opaque to the stream), once, after `Vcpu`.
    Device = 6,
    /// `u64 pages digest`, `u64 registers digest`: the primary's at the switch-over.
    Hashes = 7,
    /// End of the stream (empty).
    End = 8,
    /// The sender refuses: a UTF-8 reason. Ends the stream.
    Refused = 9,
    /// The joiner's answer after loading: `u8 ok`, 7 × `u8 0`, `u64 pages digest`, `u64
    /// registers digest` (its own).
    Verdict = 10,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Header,
            2 => Kind::Pages,
            3 => Kind::Zeros,
            4 => Kind::RoundEnd,
            5 => Kind::Vcpu,
            6 => Kind::Device,
            7 => Kind::Hashes,
            8 => Kind::End,
            9 => Kind::Refused,
            10 => Kind::Verdict,
            _ => return None,
        })
    }

    /// The kind's name in messages and in `MIGRATION.md`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Header => "HEADER",
            Kind::Pages => "PAGES",
            Kind::Zeros => "ZEROS",
            Kind::RoundEnd => "ROUND_END",
            Kind::Vcpu => "VCPU",
            Kind::Device => "DEVICE",
            Kind::Hashes => "HASHES",
            Kind::End => "END",
            Kind::Refused => "REFUSED",
            Kind::Verdict => "VERDICT",
        }
    }

    /// Every kind.
    pub const ALL: [Kind; 10] = [
        Kind::Header,
        Kind::Pages,
        Kind::Zeros,
        Kind::RoundEnd,
        Kind::Vcpu,
        Kind::Device,
        Kind::Hashes,
        Kind::End,
        Kind::Refused,
        Kind::Verdict,
    ];
}

/// What the stream is for: the primary's guest and pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// SHA-256 of the guest image ([`super::image_digest`]).
    pub image_digest: [u8; 32],
    /// The FT pair's id (the channel's session id).
    pub session: u64,
    /// The primary's fencing epoch.
    pub epoch: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&STREAM_VERSION.to_le_bytes());
        b[8..16].copy_from_slice(&self.mem_size.to_le_bytes());
        b[16..48].copy_from_slice(&self.image_digest);
        b[48..56].copy_from_slice(&self.session.to_le_bytes());
        b[56..64].copy_from_slice(&self.epoch.to_le_bytes());
        b
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// Continues a PAGES chunk's CRC32C over one page hash, as 8 little-endian bytes.
fn crc_of_hash(crc: u32, hash: u64) -> u32 {
    crc32c::crc32c_append(crc, &hash.to_le_bytes())
}

/// Continues a PAGES chunk's CRC32C over page hashes.
fn crc_of_hashes(crc: u32, hashes: &[u64]) -> u32 {
    hashes.iter().fold(crc, |crc, &h| crc_of_hash(crc, h))
}

/// The CRC32C a chunk with header `h` (its first 12 bytes count) and `payload` carries, as a
/// reader computes it (a PAGES payload's pages through their hashes). For tools and tests that
/// rewrite chunks; the CRC is no secret, which is why a sealed stream also carries tags.
pub fn checksum(kind: Kind, h: &[u8; CHUNK_HEADER_LEN], payload: &[u8]) -> u32 {
    let start = crc32c::crc32c(&h[..12]);
    if kind == Kind::Pages && payload.len() >= 16 {
        payload[16..]
            .chunks(PAGE_SIZE)
            .fold(crc32c::crc32c_append(start, &payload[..16]), |crc, page| {
                crc_of_hash(crc, page_hash(page))
            })
    } else {
        crc32c::crc32c_append(start, payload)
    }
}

/// Whether a PAGES payload of `len` bytes holds its 16-byte head and then exactly `count`
/// pages, 1 to [`MAX_PAGES_PER_CHUNK`].
fn pages_fit(len: usize, count: u32) -> bool {
    (1..=MAX_PAGES_PER_CHUNK).contains(&count) && len == 16 + count as usize * PAGE_SIZE
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A parsed chunk, borrowing its payload from the reader's buffer.
#[derive(Debug)]
pub enum Chunk<'a> {
    /// [`Kind::Header`].
    Header(Header),
    /// [`Kind::Pages`]: the first page and the pages' bytes (a multiple of 4096).
    Pages {
        /// First page index.
        first: u64,
        /// `count` × 4096 bytes.
        data: &'a [u8],
    },
    /// [`Kind::Zeros`].
    Zeros {
        /// First page index.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// [`Kind::RoundEnd`].
    RoundEnd {
        /// Round number, from 0.
        round: u32,
        /// Pages sent in the round.
        pages: u64,
    },
    /// [`Kind::Vcpu`].
    Vcpu(&'a [u8]),
    /// [`Kind::Device`].
    Device(&'a [u8]),
    /// [`Kind::Hashes`].
    Hashes {
        /// Pages digest ([`crate::vm::Vm::pages_digest`]).
        pages: u64,
        /// Registers digest ([`crate::vm::Vm::registers_digest`]).
        registers: u64,
    },
    /// [`Kind::End`].
    End,
    /// [`Kind::Refused`].
    Refused(String),
    /// [`Kind::Verdict`].
    Verdict {
        /// The joiner loaded the state and its digests match.
        ok: bool,
        /// Its pages digest.
        pages: u64,
        /// Its registers digest.
        registers: u64,
    },
}

impl Chunk<'_> {
    /// The chunk's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Chunk::Header(_) => Kind::Header,
            Chunk::Pages { .. } => Kind::Pages,
            Chunk::Zeros { .. } => Kind::Zeros,
            Chunk::RoundEnd { .. } => Kind::RoundEnd,
            Chunk::Vcpu(_) => Kind::Vcpu,
            Chunk::Device(_) => Kind::Device,
            Chunk::Hashes { .. } => Kind::Hashes,
            Chunk::End => Kind::End,
            Chunk::Refused(_) => Kind::Refused,
            Chunk::Verdict { .. } => Kind::Verdict,
        }
    }
}

/// Writes chunks to `W`, counting bytes.
#[derive(Debug)]
pub struct ChunkWriter<W: Write> {
    out: W,
    bytes: u64,
    scratch: Vec<u8>,
    tags: Option<ChunkTags>,
}

impl<W: Write> ChunkWriter<W> {
    /// Chunks go to `out` (buffer it: chunks are written in a few pieces each), unsealed
    /// (crypto `none`, tests).
    pub fn new(out: W) -> Self {
        ChunkWriter {
            out,
            bytes: 0,
            scratch: Vec::with_capacity(64),
            tags: None,
        }
    }

    /// Chunks go to `out`, each sealed with the next of `tags`.
    pub fn sealed(out: W, tags: ChunkTags) -> Self {
        ChunkWriter {
            tags: Some(tags),
            ..Self::new(out)
        }
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> Result<(), MigrateError> {
        self.out
            .flush()
            .map_err(MigrateError::io("sending the state"))
    }

    /// The writer underneath.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    /// Writes one chunk whose payload is `head` followed by `body`.
    fn chunk(&mut self, kind: Kind, head: &[u8], body: &[u8]) -> Result<(), MigrateError> {
        self.chunk_checked(kind, head, body, |crc| crc32c::crc32c_append(crc, body))
    }

    /// Writes one chunk whose payload is `head` followed by `body`; `rest` continues the CRC
    /// from the header's first 12 bytes and `head` over what stands for `body`.
    fn chunk_checked(
        &mut self,
        kind: Kind,
        head: &[u8],
        body: &[u8],
        rest: impl FnOnce(u32) -> u32,
    ) -> Result<(), MigrateError> {
        let len = head.len() + body.len();
        debug_assert!(len <= MAX_PAYLOAD);
        let mut h = [0u8; CHUNK_HEADER_LEN];
        h[..4].copy_from_slice(&MAGIC);
        h[4] = kind as u8;
        if self.tags.is_some() {
            h[5] = FLAG_SEALED;
        }
        h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = rest(crc32c::crc32c_append(crc32c::crc32c(&h[..12]), head));
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        let tag = self.tags.as_mut().map(|tags| {
            let mut t = tags.begin();
            t.update(&h);
            t.update(head);
            t.update(body);
            t.finish()
        });
        let io = MigrateError::io("sending the state");
        self.out
            .write_all(&h)
            .and_then(|()| self.out.write_all(head))
            .and_then(|()| self.out.write_all(body))
            .and_then(|()| match &tag {
                Some(t) => self.out.write_all(t),
                None => Ok(()),
            })
            .map_err(io)?;
        let sealed = if tag.is_some() { CHUNK_TAG_LEN } else { 0 };
        self.bytes += (CHUNK_HEADER_LEN + len + sealed) as u64;
        Ok(())
    }

    /// A [`Kind::Header`] chunk.
    pub fn header(&mut self, h: &Header) -> Result<(), MigrateError> {
        self.chunk(Kind::Header, &h.encode(), &[])
    }

    /// A [`Kind::Pages`] chunk: `data` holds whole pages, at most [`MAX_PAGES_PER_CHUNK`],
    /// and `hashes` their xxh3-64 ([`page_hash`]), which the checksum covers in their place.
    pub fn pages(&mut self, first: u64, data: &[u8], hashes: &[u64]) -> Result<(), MigrateError> {
        let count = (data.len() / PAGE_SIZE) as u32;
        debug_assert_eq!(hashes.len(), count as usize);
        self.scratch.clear();
        self.scratch.extend_from_slice(&first.to_le_bytes());
        self.scratch.extend_from_slice(&count.to_le_bytes());
        self.scratch.extend_from_slice(&[0; 4]);
        let head = std::mem::take(&mut self.scratch);
        let r = self.chunk_checked(Kind::Pages, &head, data, |crc| crc_of_hashes(crc, hashes));
        self.scratch = head;
        r
    }

    /// A [`Kind::Zeros`] chunk.
    pub fn zeros(&mut self, first: u64, count: u32) -> Result<(), MigrateError> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&first.to_le_bytes());
        b[8..12].copy_from_slice(&count.to_le_bytes());
        self.chunk(Kind::Zeros, &b, &[])
    }

    /// A [`Kind::RoundEnd`] chunk.
    pub fn round_end(&mut self, round: u32, pages: u64) -> Result<(), MigrateError> {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&round.to_le_bytes());
        b[8..16].copy_from_slice(&pages.to_le_bytes());
        self.chunk(Kind::RoundEnd, &b, &[])
    }

    /// A [`Kind::Vcpu`] chunk.
    pub fn vcpu(&mut self, state: &[u8]) -> Result<(), MigrateError> {
        self.chunk(Kind::Vcpu, state, &[])
    }

    /// A [`Kind::Device`] chunk (at most [`MAX_DEVICE_STATE`] bytes).
    pub fn device(&mut self, state: &[u8]) -> Result<(), MigrateError> {
        if state.len() > MAX_DEVICE_STATE {
            return Err(MigrateError::Malformed {
                index: 0,
                kind: Kind::Device.name(),
                what: format!(
                    "{} bytes of device state (at most {MAX_DEVICE_STATE})",
                    state.len()
                ),
            });
        }
        self.chunk(Kind::Device, state, &[])
    }

    /// A [`Kind::Hashes`] chunk.
    pub fn hashes(&mut self, pages: u64, registers: u64) -> Result<(), MigrateError> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&pages.to_le_bytes());
        b[8..].copy_from_slice(&registers.to_le_bytes());
        self.chunk(Kind::Hashes, &b, &[])
    }

    /// A [`Kind::End`] chunk.
    pub fn end(&mut self) -> Result<(), MigrateError> {
        self.chunk(Kind::End, &[], &[])
    }

    /// A [`Kind::Refused`] chunk.
    pub fn refused(&mut self, reason: &str) -> Result<(), MigrateError> {
        let r = reason.as_bytes();
        self.chunk(Kind::Refused, &r[..r.len().min(4096)], &[])
    }

    /// A [`Kind::Verdict`] chunk.
    pub fn verdict(&mut self, ok: bool, pages: u64, registers: u64) -> Result<(), MigrateError> {
        let mut b = [0u8; 24];
        b[0] = u8::from(ok);
        b[8..16].copy_from_slice(&pages.to_le_bytes());
        b[16..].copy_from_slice(&registers.to_le_bytes());
        self.chunk(Kind::Verdict, &b, &[])
    }
}

/// Reads and checks chunks from `R`.
#[derive(Debug)]
pub struct ChunkReader<R: Read> {
    input: R,
    buf: Vec<u8>,
    index: u64,
    bytes: u64,
    /// A PAGES chunk whose page bytes are still in the stream ([`Self::next_placing`]).
    unread: Option<UnreadPages>,
    /// Checks every chunk's tag (and refuses unsealed chunks); without, tags are skipped.
    tags: Option<ChunkTags>,
}

/// A PAGES chunk read up to its page bytes.
#[derive(Debug)]
struct UnreadPages {
    /// The CRC32C so far (header and the payload's first 16 bytes).
    crc: u32,
    stored: u32,
    len: usize,
    /// The chunk is sealed: its tag follows the pages.
    sealed: bool,
    /// Its tag so far (header and the payload's first 16 bytes), when tags are checked.
    tag: Option<ChunkTag>,
}

/// What [`ChunkReader::next_placing`] read: a whole chunk, or a PAGES chunk whose page bytes
/// the caller reads into place with [`ChunkReader::read_pages`].
#[derive(Debug)]
pub enum Next<'a> {
    /// Any chunk but PAGES.
    Chunk(Chunk<'a>),
    /// A PAGES chunk: `count` pages from page `first` follow in the stream.
    Pages {
        /// First page index.
        first: u64,
        /// Pages.
        count: u32,
    },
}

impl<R: Read> ChunkReader<R> {
    /// Chunks come from `input`; a sealed chunk's tag is skipped, not checked (a stored
    /// stream, whose keys are gone, or crypto `none`).
    pub fn new(input: R) -> Self {
        ChunkReader {
            input,
            buf: Vec::new(),
            index: 0,
            bytes: 0,
            unread: None,
            tags: None,
        }
    }

    /// Chunks come from `input`, and every one must be sealed with the next of `tags`: an
    /// unsealed chunk, or one whose tag does not verify, is refused
    /// ([`MigrateError::Unauthenticated`]).
    pub fn sealed(input: R, tags: ChunkTags) -> Self {
        ChunkReader {
            tags: Some(tags),
            ..Self::new(input)
        }
    }

    /// Reads a sealed chunk's tag after its payload and checks it against `tag` (if tags are
    /// checked).
    fn check_tag(
        &mut self,
        kind: Kind,
        sealed: bool,
        tag: Option<ChunkTag>,
    ) -> Result<usize, MigrateError> {
        if !sealed {
            return Ok(0);
        }
        let mut stored = [0u8; CHUNK_TAG_LEN];
        self.input
            .read_exact(&mut stored)
            .map_err(MigrateError::io("a chunk's tag"))?;
        if tag.is_some_and(|t| !t.verifies(&stored)) {
            return Err(MigrateError::Unauthenticated {
                index: self.index,
                kind: kind.name(),
                what: "its tag does not verify (altered, forged, replayed, reordered, or from \
                       another session)"
                    .into(),
            });
        }
        Ok(CHUNK_TAG_LEN)
    }

    /// Starts a chunk's tag over its header, if tags are checked.
    fn begin_tag(&mut self, h: &[u8; CHUNK_HEADER_LEN]) -> Option<ChunkTag> {
        self.tags.as_mut().map(|tags| {
            let mut t = tags.begin();
            t.update(h);
            t
        })
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The reader underneath.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.input
    }

    /// The next chunk, checked: magic, kind, length bound, checksum, and its payload's shape.
    pub fn next_chunk(&mut self) -> Result<Chunk<'_>, MigrateError> {
        let (h, kind) = self.chunk_header()?;
        self.payload(h, kind)
    }

    /// As [`Self::next_chunk`], except that a PAGES chunk is returned as soon as its page
    /// count is known and checked, as [`Next::Pages`]: its page bytes must then be read with
    /// [`Self::read_pages`] (straight into their place: no copy through this reader's buffer)
    /// before the next chunk. A chunk's checksum is checked once all its bytes are read.
    pub fn next_placing(&mut self) -> Result<Next<'_>, MigrateError> {
        let (h, kind) = self.chunk_header()?;
        if kind != Kind::Pages {
            return self.payload(h, kind).map(Next::Chunk);
        }
        let index = self.index;
        let len = u32_at(&h, 8) as usize;
        let mut head = [0u8; 16];
        if len >= 16 {
            self.input
                .read_exact(&mut head)
                .map_err(MigrateError::io("a chunk's payload"))?;
        }
        let count = u32_at(&head, 8);
        if len < 16 || !pages_fit(len, count) {
            return Err(MigrateError::Malformed {
                index,
                kind: kind.name(),
                what: format!("{count} pages in {len} bytes"),
            });
        }
        if head[12..16] != [0; 4] {
            return Err(MigrateError::Malformed {
                index,
                kind: kind.name(),
                what: format!("bytes 12..16 must be zero: {:02x?}", &head[12..16]),
            });
        }
        let mut tag = self.begin_tag(&h);
        if let Some(t) = &mut tag {
            t.update(&head);
        }
        self.unread = Some(UnreadPages {
            crc: crc32c::crc32c_append(crc32c::crc32c(&h[..12]), &head),
            stored: u32_at(&h, 12),
            len,
            sealed: h[5] & FLAG_SEALED != 0,
            tag,
        });
        Ok(Next::Pages {
            first: u64_at(&head, 0),
            count,
        })
    }

    /// Reads the page bytes of the PAGES chunk [`Self::next_placing`] returned into `dst`
    /// (exactly `count` × 4096 bytes), their hashes ([`page_hash`]) into `hashes` (`count`
    /// of them), and checks the chunk's checksum. On an error `dst` and `hashes` hold values
    /// that must not be used.
    pub fn read_pages(&mut self, dst: &mut [u8], hashes: &mut [u64]) -> Result<(), MigrateError> {
        let index = self.index;
        let Some(unread) = self.unread.take() else {
            return Err(MigrateError::Malformed {
                index,
                kind: Kind::Pages.name(),
                what: "no PAGES chunk is waiting to be read".into(),
            });
        };
        if dst.len() + 16 != unread.len || hashes.len() * PAGE_SIZE != dst.len() {
            return Err(MigrateError::Malformed {
                index,
                kind: Kind::Pages.name(),
                what: format!(
                    "{} bytes of pages, {} read into place",
                    unread.len - 16,
                    dst.len()
                ),
            });
        }
        self.input
            .read_exact(dst)
            .map_err(MigrateError::io("a chunk's payload"))?;
        for (h, page) in hashes.iter_mut().zip(dst.chunks_exact(PAGE_SIZE)) {
            *h = page_hash(page);
        }
        let computed = crc_of_hashes(unread.crc, hashes);
        if computed != unread.stored {
            return Err(MigrateError::Checksum {
                index,
                kind: Kind::Pages.name(),
                stored: unread.stored,
                computed,
            });
        }
        let mut tag = unread.tag;
        if let Some(t) = &mut tag {
            t.update(dst);
        }
        let sealed = self.check_tag(Kind::Pages, unread.sealed, tag)?;
        self.index += 1;
        self.bytes += (CHUNK_HEADER_LEN + unread.len + sealed) as u64;
        Ok(())
    }

    /// Reads and checks a chunk's header: magic, kind, flags, length bound.
    fn chunk_header(&mut self) -> Result<([u8; CHUNK_HEADER_LEN], Kind), MigrateError> {
        let index = self.index;
        if self.unread.is_some() {
            return Err(MigrateError::Malformed {
                index,
                kind: Kind::Pages.name(),
                what: "its page bytes were never read".into(),
            });
        }
        let mut h = [0u8; CHUNK_HEADER_LEN];
        self.input
            .read_exact(&mut h)
            .map_err(MigrateError::io("a chunk header"))?;
        if h[..4] != MAGIC {
            return Err(MigrateError::BadMagic {
                index,
                found: [h[0], h[1], h[2], h[3]],
            });
        }
        let kind = Kind::from_u8(h[4]).ok_or(MigrateError::UnknownKind { index, kind: h[4] })?;
        let malformed = |what: String| MigrateError::Malformed {
            index,
            kind: kind.name(),
            what,
        };
        if h[5] & !FLAG_SEALED != 0 || h[6..8] != [0, 0] {
            return Err(malformed(format!("flags/reserved bytes {:02x?}", &h[5..8])));
        }
        if self.tags.is_some() && h[5] & FLAG_SEALED == 0 {
            return Err(MigrateError::Unauthenticated {
                index,
                kind: kind.name(),
                what: "an unsealed chunk in an authenticated stream".into(),
            });
        }
        let len = u32_at(&h, 8) as usize;
        if len > MAX_PAYLOAD {
            return Err(malformed(format!(
                "{len}-byte payload (at most {MAX_PAYLOAD})"
            )));
        }
        Ok((h, kind))
    }

    /// Reads a chunk's payload after its header, checks the checksum and parses it.
    fn payload(
        &mut self,
        h: [u8; CHUNK_HEADER_LEN],
        kind: Kind,
    ) -> Result<Chunk<'_>, MigrateError> {
        let index = self.index;
        let malformed = |what: String| MigrateError::Malformed {
            index,
            kind: kind.name(),
            what,
        };
        let len = u32_at(&h, 8) as usize;
        self.buf.resize(len, 0);
        self.input
            .read_exact(&mut self.buf)
            .map_err(MigrateError::io("a chunk's payload"))?;
        let stored = u32_at(&h, 12);
        let computed = if kind == Kind::Pages {
            // The checksum covers the first 16 bytes and the pages' hashes.
            if len < 16 || !(len - 16).is_multiple_of(PAGE_SIZE) {
                return Err(malformed(format!("{len} bytes: not 16 + whole pages")));
            }
            let head = crc32c::crc32c_append(crc32c::crc32c(&h[..12]), &self.buf[..16]);
            self.buf[16..]
                .chunks_exact(PAGE_SIZE)
                .fold(head, |crc, page| crc_of_hash(crc, page_hash(page)))
        } else {
            crc32c::crc32c_append(crc32c::crc32c(&h[..12]), &self.buf)
        };
        if stored != computed {
            return Err(MigrateError::Checksum {
                index,
                kind: kind.name(),
                stored,
                computed,
            });
        }
        let mut tag = self.begin_tag(&h);
        if let Some(t) = &mut tag {
            t.update(&self.buf);
        }
        let sealed = self.check_tag(kind, h[5] & FLAG_SEALED != 0, tag)?;
        self.index += 1;
        self.bytes += (CHUNK_HEADER_LEN + len + sealed) as u64;
        let p = &self.buf[..];
        let want = |n: usize| {
            if p.len() == n {
                Ok(())
            } else {
                Err(malformed(format!("{} bytes, expected {n}", p.len())))
            }
        };
        // The format's zero fields are zero: every payload has one encoding.
        let zero = |range: std::ops::Range<usize>| {
            let (a, b) = (range.start, range.end);
            if p[a..b].iter().all(|&x| x == 0) {
                Ok(())
            } else {
                Err(malformed(format!(
                    "bytes {a}..{b} must be zero: {:02x?}",
                    &p[a..b]
                )))
            }
        };
        Ok(match kind {
            Kind::Header => {
                want(HEADER_LEN)?;
                zero(4..8)?;
                let version = u32_at(p, 0);
                if version != STREAM_VERSION {
                    return Err(MigrateError::Mismatch {
                        what: "state stream version",
                        theirs: version.to_string(),
                        ours: STREAM_VERSION.to_string(),
                    });
                }
                let mut image_digest = [0u8; 32];
                image_digest.copy_from_slice(&p[16..48]);
                Chunk::Header(Header {
                    mem_size: u64_at(p, 8),
                    image_digest,
                    session: u64_at(p, 48),
                    epoch: u64_at(p, 56),
                })
            }
            Kind::Pages => {
                if p.len() < 16 {
                    return Err(malformed(format!("{} bytes", p.len())));
                }
                let count = u32_at(p, 8);
                if !pages_fit(p.len(), count) {
                    return Err(malformed(format!("{count} pages in {} bytes", p.len())));
                }
                zero(12..16)?;
                Chunk::Pages {
                    first: u64_at(p, 0),
                    data: &p[16..],
                }
            }
            Kind::Zeros => {
                want(16)?;
                zero(12..16)?;
                Chunk::Zeros {
                    first: u64_at(p, 0),
                    count: u32_at(p, 8),
                }
            }
            Kind::RoundEnd => {
                want(16)?;
                zero(4..8)?;
                Chunk::RoundEnd {
                    round: u32_at(p, 0),
                    pages: u64_at(p, 8),
                }
            }
            Kind::Vcpu => Chunk::Vcpu(p),
            Kind::Device => {
                if p.len() > MAX_DEVICE_STATE {
                    return Err(malformed(format!("{} bytes of device state", p.len())));
                }
                Chunk::Device(p)
            }
            Kind::Hashes => {
                want(16)?;
                Chunk::Hashes {
                    pages: u64_at(p, 0),
                    registers: u64_at(p, 8),
                }
            }
            Kind::End => {
                want(0)?;
                Chunk::End
            }
            Kind::Refused => Chunk::Refused(String::from_utf8_lossy(p).into_owned()),
            Kind::Verdict => {
                want(24)?;
                if p[0] > 1 {
                    return Err(malformed(format!("verdict byte {} (0 or 1)", p[0])));
                }
                zero(1..8)?;
                Chunk::Verdict {
                    ok: p[0] == 1,
                    pages: u64_at(p, 8),
                    registers: u64_at(p, 16),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream of one PAGES chunk (pages filled with 1, 2, 3) and an END.
    fn three_pages() -> Vec<u8> {
        let mut data = vec![0u8; 3 * PAGE_SIZE];
        for (i, page) in data.chunks_exact_mut(PAGE_SIZE).enumerate() {
            page.fill(i as u8 + 1);
        }
        let hashes: Vec<u64> = data.chunks_exact(PAGE_SIZE).map(page_hash).collect();
        let mut w = ChunkWriter::new(Vec::new());
        w.pages(7, &data, &hashes).expect("written");
        w.end().expect("written");
        w.get_mut().clone()
    }

    #[test]
    fn pages_read_whole_or_into_place_give_the_same_bytes_and_hashes() {
        let stream = three_pages();
        let mut r = ChunkReader::new(&stream[..]);
        match r.next_chunk().expect("a chunk") {
            Chunk::Pages { first, data } => {
                assert_eq!(first, 7);
                assert_eq!(data.len(), 3 * PAGE_SIZE);
                assert_eq!(data[2 * PAGE_SIZE], 3);
            }
            other => panic!("{:?}", other.kind()),
        }
        let mut r = ChunkReader::new(&stream[..]);
        let Next::Pages { first, count } = r.next_placing().expect("a chunk") else {
            panic!("not pages");
        };
        assert_eq!((first, count), (7, 3));
        let mut dst = vec![0u8; 3 * PAGE_SIZE];
        let mut hashes = [0u64; 3];
        r.read_pages(&mut dst, &mut hashes).expect("intact");
        assert_eq!(hashes[1], page_hash(&[2u8; PAGE_SIZE]));
        assert!(matches!(r.next_placing(), Ok(Next::Chunk(Chunk::End))));
    }

    #[test]
    fn checksum_is_what_the_writer_writes() {
        let stream = three_pages();
        let mut h = [0u8; CHUNK_HEADER_LEN];
        h.copy_from_slice(&stream[..CHUNK_HEADER_LEN]);
        let len = u32_at(&h, 8) as usize;
        let payload = &stream[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + len];
        assert_eq!(checksum(Kind::Pages, &h, payload), u32_at(&h, 12));
        let end = &stream[CHUNK_HEADER_LEN + len..];
        h.copy_from_slice(&end[..CHUNK_HEADER_LEN]);
        assert_eq!(checksum(Kind::End, &h, &[]), u32_at(&h, 12));
    }

    #[test]
    fn a_flipped_page_byte_fails_the_checksum_either_way() {
        let mut stream = three_pages();
        // The middle page's first byte (header 16, head 16, one page).
        stream[CHUNK_HEADER_LEN + 16 + PAGE_SIZE] ^= 0x40;
        let mut r = ChunkReader::new(&stream[..]);
        assert!(matches!(
            r.next_chunk(),
            Err(MigrateError::Checksum { index: 0, .. })
        ));
        let mut r = ChunkReader::new(&stream[..]);
        assert!(matches!(r.next_placing(), Ok(Next::Pages { count: 3, .. })));
        let mut dst = vec![0u8; 3 * PAGE_SIZE];
        let mut hashes = [0u64; 3];
        assert!(matches!(
            r.read_pages(&mut dst, &mut hashes),
            Err(MigrateError::Checksum { index: 0, .. })
        ));
    }

    #[test]
    fn unread_pages_or_a_wrong_size_are_refused() {
        let stream = three_pages();
        let mut r = ChunkReader::new(&stream[..]);
        assert!(matches!(r.next_placing(), Ok(Next::Pages { .. })));
        // The next chunk before the pages were read.
        assert!(matches!(
            r.next_placing(),
            Err(MigrateError::Malformed { .. })
        ));
        let mut r = ChunkReader::new(&stream[..]);
        assert!(matches!(r.next_placing(), Ok(Next::Pages { .. })));
        let mut dst = vec![0u8; 2 * PAGE_SIZE];
        let mut hashes = [0u64; 2];
        assert!(matches!(
            r.read_pages(&mut dst, &mut hashes),
            Err(MigrateError::Malformed { .. })
        ));
        // Pages to read when there are none.
        let mut r = ChunkReader::new(&stream[..]);
        assert!(matches!(
            r.read_pages(&mut dst, &mut hashes),
            Err(MigrateError::Malformed { .. })
        ));
    }
}
