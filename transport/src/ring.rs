//! A single-producer single-consumer lock-free ring of variable-size records, laid out in any
//! [`RingMemory`] region.
//!
//! The vCPU thread produces log records, the sender thread consumes them; over shared memory
//! the producer and consumer are different processes, and over RDMA the producer's writes arrive
//! through a NIC. So the ring is a documented byte layout, not a Rust object: a `#[repr(C)]`
//! header followed by a power-of-two data area.
//!
//! # Layout (all integers little-endian, offsets from the start of the region)
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"FTVMRING"`, written last when the ring is formatted |
//! | 8 | 4 | layout version (1) |
//! | 12 | 4 | offset of the data area (384) |
//! | 16 | 8 | data capacity in bytes, a power of two |
//! | 24 | 104 | reserved, zero |
//! | 128 | 8 | `head`: bytes ever committed by the producer (own 128-byte line) |
//! | 256 | 8 | `tail`: bytes ever released by the consumer (own 128-byte line) |
//! | 384 | capacity | data area |
//!
//! `head` and `tail` are monotonic byte counters; a position's place in the data area is
//! `counter & (capacity - 1)`. The bytes in `[tail, head)` belong to the consumer, the rest to the
//! producer. The producer publishes with a release store of `head`, the consumer frees with a
//! release store of `tail`; each side keeps a private cached copy of the other's counter and only
//! reloads it when the cache says "full" or "empty", so the shared cache lines move rarely.
//!
//! # Records
//! Every record is an 8-byte header — `len: u32` (payload bytes), `flags: u32` (0 = data,
//! 1 = padding) — then the payload, padded to a multiple of 8 bytes. A record never wraps: when
//! it does not fit before the end of the data area, the producer fills the rest with one padding
//! record and starts at offset 0. Payloads are limited to half the capacity (minus the header),
//! which guarantees an empty ring always has room for the largest record plus its padding.
//!
//! The consumer trusts nothing the producer wrote: every counter and length is bounds-checked
//! and a violation is a [`RingError::Corrupt`], never an out-of-bounds read.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::region::{HeapRegion, RegionError, RingMemory, REGION_ALIGN};

/// `b"FTVMRING"` read as a little-endian u64.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"FTVMRING");
/// The layout version this code reads and writes.
pub const RING_LAYOUT_VERSION: u32 = 1;
/// Bytes before the data area.
pub const RING_HEADER_LEN: usize = 384;
/// Bytes of each record's header.
pub const RECORD_HEADER_LEN: usize = 8;
/// Records start on multiples of this.
pub const RECORD_ALIGN: usize = 8;
/// Offset of the producer's `head` counter in a ring region.
pub const HEAD_OFFSET: usize = 128;
/// Offset of the consumer's `tail` counter in a ring region.
pub const TAIL_OFFSET: usize = 256;
/// Smallest data capacity accepted.
pub const MIN_CAPACITY: usize = 64;

const FLAG_DATA: u32 = 0;
const FLAG_PADDING: u32 = 1;

/// Region bytes needed for a ring with `capacity` data bytes.
pub const fn region_len(capacity: usize) -> usize {
    RING_HEADER_LEN + capacity
}

/// Bytes a record with `payload_len` bytes of payload occupies in the data area.
pub const fn record_footprint(payload_len: usize) -> usize {
    (RECORD_HEADER_LEN + payload_len + RECORD_ALIGN - 1) & !(RECORD_ALIGN - 1)
}

#[repr(C, align(128))]
struct PaddedCounter {
    value: AtomicU64,
}

/// The ring header as it sits at the start of the region.
#[repr(C)]
struct RingHeader {
    magic: AtomicU64,
    version: AtomicU32,
    data_offset: AtomicU32,
    capacity: AtomicU64,
    _reserved: [u8; 104],
    head: PaddedCounter,
    tail: PaddedCounter,
}

const _: () = assert!(std::mem::size_of::<RingHeader>() == RING_HEADER_LEN);
const _: () = assert!(std::mem::offset_of!(RingHeader, head) == HEAD_OFFSET);
const _: () = assert!(std::mem::offset_of!(RingHeader, tail) == TAIL_OFFSET);
const _: () = assert!(REGION_ALIGN >= std::mem::align_of::<RingHeader>());

/// Why a ring operation failed. None of these loses data: a failed push leaves the ring as it
/// was, and a consumer that finds corruption stops before it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingError {
    /// Not enough free space right now; retry after the consumer releases records.
    #[error("ring full: record needs {needed} bytes, {free} free")]
    Full {
        /// Bytes the record (and any wrap padding) needs.
        needed: usize,
        /// Bytes free at the time of the call.
        free: usize,
    },
    /// The record can never fit: payloads are limited to half the ring.
    #[error("record of {len} bytes exceeds the ring's limit of {max}")]
    RecordTooLarge {
        /// Requested payload length.
        len: usize,
        /// Largest payload this ring accepts.
        max: usize,
    },
    /// The capacity is not a power of two of at least [`MIN_CAPACITY`] bytes.
    #[error("ring capacity {0} is not a power of two >= 64")]
    BadCapacity(usize),
    /// The region is smaller than the ring needs.
    #[error("region of {len} bytes too small for a ring needing {needed}")]
    RegionTooSmall {
        /// Region size.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The region is not aligned for the ring header.
    #[error("region not aligned to {REGION_ALIGN} bytes")]
    Misaligned,
    /// The region does not hold a formatted ring (yet).
    #[error("no ring in region (magic {found:#018x})")]
    BadMagic {
        /// The value found where the magic belongs.
        found: u64,
    },
    /// The ring was formatted by a different layout version.
    #[error("ring layout version {found}, this build speaks {supported}")]
    VersionMismatch {
        /// Version in the region.
        found: u32,
        /// Version this code speaks.
        supported: u32,
    },
    /// The producer wrote something the protocol does not allow; the consumer stops before it.
    #[error("ring corrupt at byte {position}: {what}")]
    Corrupt {
        /// Consumer position (byte counter) of the bad record or counter.
        position: u64,
        /// What was wrong.
        what: &'static str,
    },
    /// Allocating the region failed.
    #[error("ring region: {0}")]
    Region(String),
}

impl From<RegionError> for RingError {
    fn from(err: RegionError) -> Self {
        RingError::Region(err.to_string())
    }
}

/// Checks a region's size and alignment and returns a pointer to its header.
fn header_of<M: RingMemory>(mem: &M, capacity: usize) -> Result<*const RingHeader, RingError> {
    if capacity < MIN_CAPACITY || !capacity.is_power_of_two() || capacity > u32::MAX as usize {
        return Err(RingError::BadCapacity(capacity));
    }
    let needed = region_len(capacity);
    if mem.len() < needed {
        return Err(RingError::RegionTooSmall {
            len: mem.len(),
            needed,
        });
    }
    let ptr = mem.as_ptr();
    if !(ptr as usize).is_multiple_of(std::mem::align_of::<RingHeader>()) {
        return Err(RingError::Misaligned);
    }
    Ok(ptr.cast::<RingHeader>().cast_const())
}

/// Lays out an empty ring with `capacity` data bytes at the start of `mem`.
///
/// Call this once, before any producer or consumer attaches (in another process, attach only
/// after learning that formatting finished — [`Producer::attach`] refuses an unformatted region).
pub fn format<M: RingMemory>(mem: &M, capacity: usize) -> Result<(), RingError> {
    let header = header_of(mem, capacity)?;
    // SAFETY: `header_of` checked that the region holds a whole, aligned `RingHeader`; the
    // atomics are valid for any bit pattern, so viewing the bytes as the header is sound.
    let header = unsafe { &*header };
    header.magic.store(0, Ordering::Relaxed);
    header.version.store(RING_LAYOUT_VERSION, Ordering::Relaxed);
    header
        .data_offset
        .store(RING_HEADER_LEN as u32, Ordering::Relaxed);
    header.capacity.store(capacity as u64, Ordering::Relaxed);
    header.head.value.store(0, Ordering::Relaxed);
    header.tail.value.store(0, Ordering::Relaxed);
    // Release: whoever sees the magic sees every field above.
    header.magic.store(RING_MAGIC, Ordering::Release);
    Ok(())
}

/// The producer's `head` counter of the ring laid out at the start of `mem` ([`HEAD_OFFSET`]),
/// for a side that stands in for a producer that is not a [`Producer`]: over RDMA the primary's
/// NIC writes the records, and the backup publishes here how far they are complete. Store with
/// `Release`; a [`Consumer`] bounds-checks whatever it finds here. Panics if `mem` is smaller
/// than a ring header (see [`RingMemory::word`]).
pub fn head_word<M: RingMemory>(mem: &M) -> &AtomicU64 {
    mem.word(HEAD_OFFSET)
}

/// The consumer's `tail` counter of the ring laid out at the start of `mem` ([`TAIL_OFFSET`]):
/// read by a side that stands in for the producer, stored by one that stands in for a consumer
/// that is not a [`Consumer`] (over RDMA the primary's mirror learns the backup's `tail` from its
/// ACKs). A [`Producer`] bounds-checks whatever it finds here. Panics as [`head_word`] does.
pub fn tail_word<M: RingMemory>(mem: &M) -> &AtomicU64 {
    mem.word(TAIL_OFFSET)
}

/// The two ends of a ring in (shared) heap memory.
pub type HeapRing = (Producer<Arc<HeapRegion>>, Consumer<Arc<HeapRegion>>);

/// A new heap ring with `capacity` data bytes, split into its two ends.
pub fn heap(capacity: usize) -> Result<HeapRing, RingError> {
    if capacity < MIN_CAPACITY || !capacity.is_power_of_two() {
        return Err(RingError::BadCapacity(capacity));
    }
    let region = Arc::new(HeapRegion::new(region_len(capacity))?);
    format(&region, capacity)?;
    Ok((Producer::attach(region.clone())?, Consumer::attach(region)?))
}

/// What both ends learn from a formatted header.
struct Attached {
    header: *const RingHeader,
    data: *mut u8,
    capacity: u64,
}

fn attach<M: RingMemory>(mem: &M) -> Result<Attached, RingError> {
    let min = header_of(mem, MIN_CAPACITY)?;
    // SAFETY: `header_of` checked the region holds an aligned `RingHeader`.
    let header = unsafe { &*min };
    let magic = header.magic.load(Ordering::Acquire);
    if magic != RING_MAGIC {
        return Err(RingError::BadMagic { found: magic });
    }
    let version = header.version.load(Ordering::Relaxed);
    if version != RING_LAYOUT_VERSION {
        return Err(RingError::VersionMismatch {
            found: version,
            supported: RING_LAYOUT_VERSION,
        });
    }
    let capacity = usize::try_from(header.capacity.load(Ordering::Relaxed))
        .map_err(|_| RingError::BadCapacity(usize::MAX))?;
    header_of(mem, capacity)?;
    if header.data_offset.load(Ordering::Relaxed) as usize != RING_HEADER_LEN {
        return Err(RingError::Corrupt {
            position: 0,
            what: "data offset in header is not 384",
        });
    }
    // SAFETY: the region is at least `RING_HEADER_LEN + capacity` bytes (checked by `header_of`).
    let data = unsafe { mem.as_ptr().add(RING_HEADER_LEN) };
    Ok(Attached {
        header: min,
        data,
        capacity: capacity as u64,
    })
}

/// The writing end of a ring.
///
/// Records are written in two steps: [`Producer::try_reserve`] hands out space, and
/// [`Producer::commit`] publishes everything reserved so far in one release store — so a batch
/// of records costs one shared-cache-line write, and the consumer never sees half a batch.
#[derive(Debug)]
pub struct Producer<M: RingMemory> {
    mem: M,
    header: *const RingHeader,
    data: *mut u8,
    capacity: u64,
    /// Byte counter up to which records are written (reserved), committed or not.
    head: u64,
    /// Byte counter last published to the consumer.
    committed: u64,
    /// Last value of the consumer's `tail` we read.
    cached_tail: u64,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

// SAFETY: the producer owns its end of the ring exclusively (it is not `Clone`, and only one may
// be attached by contract); the raw pointers point into `mem`, which moves with it.
unsafe impl<M: RingMemory + Send> Send for Producer<M> {}

impl<M: RingMemory> Producer<M> {
    /// Attaches the writing end to a formatted ring, continuing from its current `head`.
    ///
    /// Exactly one producer may be attached to a ring at a time; this is the caller's contract.
    pub fn attach(mem: M) -> Result<Self, RingError> {
        let Attached {
            header,
            data,
            capacity,
        } = attach(&mem)?;
        // SAFETY: `attach` validated the header pointer.
        let hdr = unsafe { &*header };
        let head = hdr.head.value.load(Ordering::Relaxed);
        let tail = hdr.tail.value.load(Ordering::Acquire);
        Ok(Producer {
            mem,
            header,
            data,
            capacity,
            head,
            committed: head,
            cached_tail: tail,
            _not_sync: PhantomData,
        })
    }

    fn hdr(&self) -> &RingHeader {
        // SAFETY: `header` points into `self.mem`, which we keep alive; validated at attach.
        unsafe { &*self.header }
    }

    /// Data bytes in the ring.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// The largest payload a single record may carry.
    pub fn max_record_len(&self) -> usize {
        self.capacity as usize / 2 - RECORD_HEADER_LEN
    }

    /// Bytes free for new records as of the consumer's latest release.
    pub fn free_bytes(&mut self) -> usize {
        self.cached_tail = self.hdr().tail.value.load(Ordering::Acquire);
        (self.capacity - (self.head - self.cached_tail)) as usize
    }

    /// True when the consumer has released everything committed.
    pub fn is_drained(&self) -> bool {
        self.hdr().tail.value.load(Ordering::Acquire) == self.committed
    }

    /// Bytes reserved but not yet committed.
    pub fn uncommitted_bytes(&self) -> usize {
        (self.head - self.committed) as usize
    }

    /// Reserves a record of `len` payload bytes and returns its payload to fill in. The record
    /// becomes visible to the consumer at the next [`Producer::commit`].
    ///
    /// On `Full` nothing changes; reserved-but-uncommitted records stay reserved.
    #[inline]
    pub fn try_reserve(&mut self, len: usize) -> Result<&mut [u8], RingError> {
        let max = self.max_record_len();
        if len > max {
            return Err(RingError::RecordTooLarge { len, max });
        }
        let footprint = record_footprint(len) as u64;
        let offset = self.head & (self.capacity - 1);
        let to_end = self.capacity - offset;
        let wraps = footprint > to_end;
        let needed = if wraps { to_end + footprint } else { footprint };
        if self.head + needed - self.cached_tail > self.capacity {
            self.cached_tail = self.hdr().tail.value.load(Ordering::Acquire);
            if self.head + needed - self.cached_tail > self.capacity {
                return Err(RingError::Full {
                    needed: needed as usize,
                    free: (self.capacity - (self.head - self.cached_tail)) as usize,
                });
            }
        }
        let mut offset = offset;
        if wraps {
            // `to_end` is a multiple of 8 and at least 8, so a padding header always fits.
            self.write_record_header(
                offset,
                (to_end as usize - RECORD_HEADER_LEN) as u32,
                FLAG_PADDING,
            );
            self.head += to_end;
            offset = 0;
        }
        self.write_record_header(offset, len as u32, FLAG_DATA);
        self.head += footprint;
        // SAFETY: the record lies in [offset, offset + footprint) ⊆ the data area (it did not
        // wrap), and that range is the producer's: the space check above shows it is not in
        // [tail, committed). The slice's lifetime is tied to `&mut self`, so it cannot outlive
        // the producer or alias another reservation.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.data.add(offset as usize + RECORD_HEADER_LEN), len)
        })
    }

    #[inline]
    fn write_record_header(&mut self, offset: u64, len: u32, flags: u32) {
        let word = u64::from(len) | (u64::from(flags) << 32);
        // SAFETY: `offset` is 8-aligned and at most `capacity - 8`, so the 8 bytes lie inside the
        // data area, whose base is page-aligned plus 384; the space belongs to the producer.
        unsafe {
            self.data
                .add(offset as usize)
                .cast::<u64>()
                .write_volatile(word.to_le())
        }
    }

    /// Publishes every record reserved so far.
    #[inline]
    pub fn commit(&mut self) {
        if self.committed != self.head {
            self.hdr().head.value.store(self.head, Ordering::Release);
            self.committed = self.head;
        }
    }

    /// Forgets every record reserved since the last commit.
    pub fn discard_uncommitted(&mut self) {
        self.head = self.committed;
    }

    /// Copies `payload` into one new record and commits it.
    #[inline]
    pub fn try_push(&mut self, payload: &[u8]) -> Result<(), RingError> {
        self.try_reserve(payload.len())?.copy_from_slice(payload);
        self.commit();
        Ok(())
    }

    /// The region the ring lives in.
    pub fn memory(&self) -> &M {
        &self.mem
    }
}

/// The reading end of a ring.
///
/// Reading does not free space: records stay in place (and borrowed slices stay valid) until
/// [`Consumer::release`], which frees everything read so far in one release store.
#[derive(Debug)]
pub struct Consumer<M: RingMemory> {
    mem: M,
    header: *const RingHeader,
    data: *mut u8,
    capacity: u64,
    /// Byte counter of the next record to read.
    read: u64,
    /// Byte counter last released to the producer.
    released: u64,
    /// Last value of the producer's `head` we read.
    cached_head: u64,
    /// Where the record returned by the last `peek` ends.
    peeked_end: u64,
    _not_sync: PhantomData<std::cell::Cell<()>>,
}

// SAFETY: as for `Producer`: one consumer per ring, raw pointers into the `mem` it owns.
unsafe impl<M: RingMemory + Send> Send for Consumer<M> {}

impl<M: RingMemory> Consumer<M> {
    /// Attaches the reading end to a formatted ring, continuing from its current `tail`.
    ///
    /// Exactly one consumer may be attached to a ring at a time; this is the caller's contract.
    pub fn attach(mem: M) -> Result<Self, RingError> {
        let Attached {
            header,
            data,
            capacity,
        } = attach(&mem)?;
        // SAFETY: `attach` validated the header pointer.
        let hdr = unsafe { &*header };
        let tail = hdr.tail.value.load(Ordering::Relaxed);
        Ok(Consumer {
            mem,
            header,
            data,
            capacity,
            read: tail,
            released: tail,
            cached_head: tail,
            peeked_end: tail,
            _not_sync: PhantomData,
        })
    }

    fn hdr(&self) -> &RingHeader {
        // SAFETY: `header` points into `self.mem`, which we keep alive; validated at attach.
        unsafe { &*self.header }
    }

    /// Data bytes in the ring.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Loads the producer's `head` and checks it is a position the producer could have reached.
    fn refresh_head(&mut self) -> Result<(), RingError> {
        let head = self.hdr().head.value.load(Ordering::Acquire);
        if head < self.cached_head
            || head - self.released > self.capacity
            || !head.is_multiple_of(8)
        {
            return Err(RingError::Corrupt {
                position: self.read,
                what: "producer head out of range",
            });
        }
        self.cached_head = head;
        Ok(())
    }

    /// True if a record is committed and not yet read.
    pub fn has_records(&mut self) -> Result<bool, RingError> {
        if self.read == self.cached_head {
            self.refresh_head()?;
        }
        Ok(self.read != self.cached_head)
    }

    /// Reads the next committed record, or `None` if there is none. The record is not freed
    /// until [`Consumer::release`].
    #[inline]
    pub fn read(&mut self) -> Result<Option<&[u8]>, RingError> {
        match self.next_record()? {
            // SAFETY: `next_record` bounds-checked the range inside the data area; it lies in
            // [released, head), which the producer does not touch until we release it, and
            // releasing needs `&mut self`, which this borrow prevents.
            Some((ptr, len)) => Ok(Some(unsafe { std::slice::from_raw_parts(ptr, len) })),
            None => Ok(None),
        }
    }

    /// Returns the next committed record without consuming it: the next `peek` or `read`
    /// returns it again until [`Consumer::advance_peeked`] steps over it. For senders that may
    /// find the medium full and must retry the same record later.
    #[inline]
    pub fn peek(&mut self) -> Result<Option<&[u8]>, RingError> {
        let start = self.read;
        let found = self.next_record()?;
        self.peeked_end = self.read;
        // Padding before the record stays skipped; the record itself is read again next time.
        self.read = match found {
            Some((_, len)) => self.peeked_end - record_footprint(len) as u64,
            None => start.max(self.read),
        };
        match found {
            // SAFETY: as in `Consumer::read`.
            Some((ptr, len)) => Ok(Some(unsafe { std::slice::from_raw_parts(ptr, len) })),
            None => Ok(None),
        }
    }

    /// Consumes the record the last [`Consumer::peek`] returned (it is freed at the next
    /// [`Consumer::release`]). Does nothing if the last peek found no record.
    #[inline]
    pub fn advance_peeked(&mut self) {
        self.read = self.read.max(self.peeked_end);
    }

    /// Iterates over every record committed right now; all the slices stay valid together (so a
    /// sender can hand them to one gathered write). Call [`Consumer::release`] afterwards.
    pub fn read_batch(&mut self) -> Result<Batch<'_, M>, RingError> {
        self.refresh_head()?;
        Ok(Batch { consumer: self })
    }

    /// Finds, validates and steps over the next data record; returns its payload's place.
    #[inline]
    fn next_record(&mut self) -> Result<Option<(*const u8, usize)>, RingError> {
        loop {
            if self.read == self.cached_head {
                self.refresh_head()?;
                if self.read == self.cached_head {
                    return Ok(None);
                }
            }
            let available = self.cached_head - self.read;
            let offset = self.read & (self.capacity - 1);
            let to_end = self.capacity - offset;
            let corrupt = |what| RingError::Corrupt {
                position: self.read,
                what,
            };
            if available < RECORD_HEADER_LEN as u64 {
                return Err(corrupt("committed bytes end inside a record header"));
            }
            // SAFETY: `read` is 8-aligned (it only advances by footprints, which are multiples
            // of 8, and head is checked to be 8-aligned) so `offset <= capacity - 8`: the word is
            // in the data area, in the consumer's part. Volatile: the producer (possibly remote)
            // wrote it; read it exactly once and validate that copy.
            let word = u64::from_le(unsafe {
                self.data.add(offset as usize).cast::<u64>().read_volatile()
            });
            let len = word as u32 as u64;
            let flags = (word >> 32) as u32;
            let footprint = record_footprint(len as usize) as u64;
            if footprint > to_end {
                return Err(corrupt("record runs past the end of the data area"));
            }
            if footprint > available {
                return Err(corrupt("record runs past the committed head"));
            }
            match flags {
                FLAG_PADDING => {
                    if footprint != to_end {
                        return Err(corrupt("padding record does not reach the end of the ring"));
                    }
                    self.read += footprint;
                }
                FLAG_DATA => {
                    self.read += footprint;
                    // SAFETY: the payload lies inside the data area (checked above).
                    let ptr = unsafe { self.data.add(offset as usize + RECORD_HEADER_LEN) };
                    return Ok(Some((ptr, len as usize)));
                }
                _ => return Err(corrupt("unknown record flags")),
            }
        }
    }

    /// Frees every record read so far for the producer to reuse.
    #[inline]
    pub fn release(&mut self) {
        if self.released != self.read {
            self.hdr().tail.value.store(self.read, Ordering::Release);
            self.released = self.read;
        }
    }

    /// Reads up to `max` records, hands each to `f`, then releases them; returns how many.
    pub fn consume(&mut self, max: usize, mut f: impl FnMut(&[u8])) -> Result<usize, RingError> {
        let mut n = 0;
        while n < max {
            match self.read()? {
                Some(record) => f(record),
                None => break,
            }
            n += 1;
        }
        self.release();
        Ok(n)
    }

    /// The region the ring lives in.
    pub fn memory(&self) -> &M {
        &self.mem
    }
}

/// The records committed when [`Consumer::read_batch`] was called.
#[derive(Debug)]
pub struct Batch<'c, M: RingMemory> {
    consumer: &'c mut Consumer<M>,
}

impl<'c, M: RingMemory> Iterator for Batch<'c, M> {
    type Item = Result<&'c [u8], RingError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Stay within the head seen when the batch began: the batch is a snapshot.
        if self.consumer.read == self.consumer.cached_head {
            return None;
        }
        match self.consumer.next_record() {
            // SAFETY: as in `Consumer::read`; in addition, the slice lives for `'c`, during which
            // the consumer is mutably borrowed by this batch, so `release` cannot run and the
            // producer cannot reuse the bytes.
            Ok(Some((ptr, len))) => Some(Ok(unsafe { std::slice::from_raw_parts(ptr, len) })),
            Ok(None) => None,
            Err(err) => Some(Err(err)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_then_read_in_order() {
        let (mut p, mut c) = heap(1024).expect("ring");
        for i in 0u8..10 {
            p.try_push(&vec![i; usize::from(i)]).expect("push");
        }
        for i in 0u8..10 {
            let rec = c.read().expect("read").expect("record");
            assert_eq!(rec, &vec![i; usize::from(i)][..]);
        }
        assert_eq!(c.read().expect("read"), None);
    }

    #[test]
    fn reserved_records_are_invisible_until_commit() {
        let (mut p, mut c) = heap(1024).expect("ring");
        p.try_reserve(3).expect("reserve").copy_from_slice(b"abc");
        p.try_reserve(2).expect("reserve").copy_from_slice(b"de");
        assert!(!c.has_records().expect("ok"));
        p.commit();
        let got: Vec<Vec<u8>> = c
            .read_batch()
            .expect("batch")
            .map(|r| r.expect("record").to_vec())
            .collect();
        assert_eq!(got, vec![b"abc".to_vec(), b"de".to_vec()]);
    }

    #[test]
    fn discarded_reservations_never_appear() {
        let (mut p, mut c) = heap(1024).expect("ring");
        p.try_push(b"kept").expect("push");
        p.try_reserve(5).expect("reserve").copy_from_slice(b"gone!");
        p.discard_uncommitted();
        p.try_push(b"also kept").expect("push");
        assert_eq!(c.read().expect("ok"), Some(&b"kept"[..]));
        assert_eq!(c.read().expect("ok"), Some(&b"also kept"[..]));
        assert_eq!(c.read().expect("ok"), None);
    }

    #[test]
    fn full_ring_refuses_without_losing_anything_and_recovers_after_release() {
        let (mut p, mut c) = heap(256).expect("ring");
        let mut pushed = 0u8;
        let err = loop {
            match p.try_push(&[pushed; 24]) {
                Ok(()) => pushed += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(pushed, 8, "eight 32-byte records fill 256 bytes");
        assert_eq!(
            err,
            RingError::Full {
                needed: 32,
                free: 0
            }
        );
        assert_eq!(c.consume(3, |r| assert_eq!(r.len(), 24)).expect("ok"), 3);
        p.try_push(&[99; 24]).expect("room after release");
        let mut seen = Vec::new();
        c.consume(usize::MAX, |r| seen.push(r[0])).expect("ok");
        assert_eq!(seen, vec![3, 4, 5, 6, 7, 99]);
    }

    #[test]
    fn records_wrap_with_padding_and_never_split() {
        let (mut p, mut c) = heap(128).expect("ring");
        // 40-byte footprints: after three, 8 bytes remain before the end.
        for round in 0u8..50 {
            p.try_push(&[round; 32]).expect("push");
            let rec = c.read().expect("ok").expect("record");
            assert_eq!(rec, &[round; 32][..]);
            c.release();
        }
    }

    #[test]
    fn peek_returns_the_same_record_until_advanced() {
        let (mut p, mut c) = heap(128).expect("ring");
        // Move to offset 96 so that `first` (40-byte footprint) wraps behind a padding record.
        p.try_push(&[0; 40]).expect("push");
        p.try_push(&[0; 40]).expect("push");
        c.consume(2, |_| {}).expect("ok");
        p.try_push(&[1; 30]).expect("push");
        p.try_push(b"second").expect("push");
        assert_eq!(c.peek().expect("ok"), Some(&[1u8; 30][..]));
        assert_eq!(c.peek().expect("ok"), Some(&[1u8; 30][..]));
        c.advance_peeked();
        c.advance_peeked();
        assert_eq!(c.peek().expect("ok"), Some(&b"second"[..]));
        c.advance_peeked();
        assert_eq!(c.peek().expect("ok"), None);
        c.advance_peeked();
        c.release();
        assert!(p.is_drained());
    }

    #[test]
    fn oversized_records_are_refused() {
        let (mut p, _c) = heap(256).expect("ring");
        assert_eq!(p.max_record_len(), 120);
        assert_eq!(
            p.try_push(&[0; 121]),
            Err(RingError::RecordTooLarge { len: 121, max: 120 })
        );
        p.try_push(&[0; 120]).expect("largest record fits");
    }

    #[test]
    fn largest_record_fits_an_empty_ring_at_any_offset() {
        let (mut p, mut c) = heap(256).expect("ring");
        for shift in 0..40 {
            p.try_push(&vec![1; shift % 17]).expect("small");
            c.consume(usize::MAX, |_| {}).expect("ok");
            p.try_push(&[2; 120]).expect("largest after any offset");
            c.consume(usize::MAX, |r| assert_eq!(r.len(), 120))
                .expect("ok");
        }
    }

    #[test]
    fn bad_capacities_and_regions_are_refused() {
        assert!(matches!(heap(100), Err(RingError::BadCapacity(100))));
        assert!(matches!(heap(32), Err(RingError::BadCapacity(32))));
        let small = HeapRegion::new(region_len(1024) - 1).expect("region");
        assert!(matches!(
            format(&small, 1024),
            Err(RingError::RegionTooSmall { .. })
        ));
    }

    #[test]
    fn attaching_to_an_unformatted_region_is_refused() {
        let region = HeapRegion::new(region_len(1024)).expect("region");
        assert!(matches!(
            Consumer::attach(&region),
            Err(RingError::BadMagic { found: 0 })
        ));
    }

    #[test]
    fn attaching_to_another_layout_version_is_refused() {
        let region = HeapRegion::new(region_len(1024)).expect("region");
        format(&region, 1024).expect("format");
        // SAFETY: the region is valid and 4096-aligned; offset 8 is the version field.
        unsafe { region.as_ptr().add(8).cast::<u32>().write(2) };
        assert!(matches!(
            Producer::attach(&region),
            Err(RingError::VersionMismatch {
                found: 2,
                supported: 1
            })
        ));
    }

    /// A test double for a misbehaving (or malicious, remote) producer: it writes raw bytes
    /// into the ring region and moves `head` itself.
    fn forge(region: &HeapRegion, offset: usize, word: u64, head: u64) {
        // SAFETY: offsets used by the tests are inside the 384 + 256 byte region, 8-aligned.
        unsafe {
            region
                .as_ptr()
                .add(RING_HEADER_LEN + offset)
                .cast::<u64>()
                .write(word);
            region.as_ptr().add(128).cast::<u64>().write(head);
        }
    }

    fn corrupt_reason(region: &HeapRegion) -> &'static str {
        let mut c = Consumer::attach(region).expect("attach");
        match c.read() {
            Err(RingError::Corrupt { what, .. }) => what,
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[test]
    fn consumer_bounds_checks_everything_the_producer_wrote() {
        let fresh = || {
            let region = HeapRegion::new(region_len(256)).expect("region");
            format(&region, 256).expect("format");
            region
        };
        let r = fresh();
        forge(&r, 0, 1000, 64);
        assert_eq!(
            corrupt_reason(&r),
            "record runs past the end of the data area"
        );
        let r = fresh();
        forge(&r, 0, 100, 64);
        assert_eq!(corrupt_reason(&r), "record runs past the committed head");
        let r = fresh();
        forge(&r, 0, 8 | (7 << 32), 64);
        assert_eq!(corrupt_reason(&r), "unknown record flags");
        let r = fresh();
        forge(&r, 0, 8 | (1 << 32), 16);
        assert_eq!(
            corrupt_reason(&r),
            "padding record does not reach the end of the ring"
        );
        let r = fresh();
        forge(&r, 0, 0, 4096);
        assert_eq!(corrupt_reason(&r), "producer head out of range");
        let r = fresh();
        forge(&r, 0, 0, 12);
        assert_eq!(corrupt_reason(&r), "producer head out of range");
        let r = fresh();
        forge(&r, 0, u64::from(u32::MAX), 256);
        assert_eq!(
            corrupt_reason(&r),
            "record runs past the end of the data area"
        );
    }

    #[test]
    fn reattaching_continues_where_the_previous_ends_left_off() {
        let region = Arc::new(HeapRegion::new(region_len(512)).expect("region"));
        format(&region, 512).expect("format");
        {
            let mut p = Producer::attach(region.clone()).expect("p");
            p.try_push(b"one").expect("push");
            p.try_push(b"two").expect("push");
            let mut c = Consumer::attach(region.clone()).expect("c");
            assert_eq!(c.consume(1, |r| assert_eq!(r, b"one")).expect("ok"), 1);
        }
        let mut c = Consumer::attach(region.clone()).expect("c again");
        let mut p = Producer::attach(region).expect("p again");
        p.try_push(b"three").expect("push");
        let mut seen = Vec::new();
        c.consume(usize::MAX, |r| seen.push(r.to_vec()))
            .expect("ok");
        assert_eq!(seen, vec![b"two".to_vec(), b"three".to_vec()]);
    }

    #[test]
    fn two_threads_pass_checksummed_records_across_many_wraps() {
        // Small under miri (which interprets every instruction), large enough to wrap often.
        let count: u32 = if cfg!(miri) { 300 } else { 50_000 };
        let (mut p, mut c) = heap(512).expect("ring");
        let producer = std::thread::spawn(move || {
            let mut poller = crate::PollPolicy::BALANCED.poller();
            for i in 0..count {
                let len = 4 + (i as usize * 7919) % 100;
                loop {
                    match p.try_reserve(len) {
                        Ok(buf) => {
                            buf[..4].copy_from_slice(&i.to_le_bytes());
                            for (j, b) in buf[4..].iter_mut().enumerate() {
                                *b = (i as usize + j) as u8;
                            }
                            if i % 3 == 0 {
                                p.commit();
                            }
                            break;
                        }
                        Err(RingError::Full { .. }) => {
                            p.commit();
                            poller.wait();
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            }
            p.commit();
        });
        let mut next = 0u32;
        let mut poller = crate::PollPolicy::BALANCED.poller();
        while next < count {
            let n = c
                .consume(16, |rec| {
                    let i = u32::from_le_bytes(rec[..4].try_into().expect("4 bytes"));
                    assert_eq!(i, next, "records arrive in order, once");
                    assert_eq!(rec.len(), 4 + (i as usize * 7919) % 100);
                    for (j, b) in rec[4..].iter().enumerate() {
                        assert_eq!(*b, (i as usize + j) as u8);
                    }
                    next += 1;
                })
                .expect("no corruption");
            if n == 0 {
                poller.wait();
            } else {
                poller.reset();
            }
        }
        producer.join().expect("producer");
    }
}
