//! How the RDMA backup finds new records in its ring: sealed head words (see the module
//! documentation), checked without a verbs call. Plain code over the ring's memory (no verbs):
//! it builds without the `rdma` feature, and the `rdma_setup` fuzz check
//! (`transport::fuzz::rdma_setup`) drives it over a ring that a model primary and arbitrary
//! bytes write into.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::setup::{seal_sum, HeadSeal, SHORT_SEAL_LEN};
use super::{BAD_SUM_GRACE, WALK_LIMIT};
use crate::error::ChannelError;
use crate::region::RingMemory;
use crate::ring::{self, RING_HEADER_LEN};

/// The backup's search for sealed head words in its ring (a ring region of `capacity` data
/// bytes followed by the doorbell block), and how far it got.
#[derive(Debug, Clone)]
pub(crate) struct Scanner {
    pub(crate) capacity: u64,
    /// The producer's head, as far as the seals found so far.
    pub(crate) head: u64,
    /// Since when a seal's bytes have not added up (they may still be in flight).
    pub(crate) bad_sum_since: Option<Instant>,
    /// The check word of the short seal at `head` (what an untouched head position holds).
    pub(crate) last_check: u64,
    /// The check word of the doorbell seal last dealt with.
    pub(crate) last_bell_check: u64,
}

impl Scanner {
    /// A scanner of a fresh ring of `capacity` data bytes (a power of two).
    pub(crate) fn new(capacity: u64) -> Self {
        Scanner {
            capacity,
            head: 0,
            bad_sum_since: None,
            last_check: 0,
            last_bell_check: 0,
        }
    }
}

/// One scan of one ring region, with the clock it reads (only when a seal's bytes do not add
/// up).
struct Scan<'a, R: RingMemory, C: FnMut() -> Instant> {
    s: &'a mut Scanner,
    ring: &'a R,
    now: C,
}

impl Scanner {
    /// Sealed mode: looks for new records in `ring` (the region the ring is laid out in, the
    /// doorbell block after its data area) in memory, without a verbs call. Returns whether the
    /// head moved (it is then stored in the ring's header for the consumer). `now` is the clock
    /// ([`Instant::now`] outside tests), read only while a seal's bytes do not add up.
    pub(crate) fn scan<R: RingMemory>(
        &mut self,
        ring: &R,
        now: impl FnMut() -> Instant,
    ) -> Result<bool, ChannelError> {
        Scan { s: self, ring, now }.scan()
    }
}

impl<R: RingMemory, C: FnMut() -> Instant> Scan<'_, R, C> {
    /// The word at byte `at` of the ring region (8-aligned, in bounds), read atomically: the
    /// primary's NIC may be writing it.
    fn ring_word(&self, at: usize) -> u64 {
        u64::from_le(self.ring.word(at).load(Ordering::Acquire))
    }

    /// A valid seal at byte `at` of the ring region, if there is one.
    fn seal_at(&self, at: usize) -> Option<HeadSeal> {
        HeadSeal::from_words([
            self.ring_word(at),
            self.ring_word(at + 8),
            self.ring_word(at + 16),
            self.ring_word(at + 24),
        ])
    }

    /// [`seal_sum`] of the ring bytes `[start, end)` (which must not cross the ring's end).
    fn ring_sum(&self, start: u64, end: u64) -> u64 {
        let base = RING_HEADER_LEN + (start & (self.s.capacity - 1)) as usize;
        let words = (end - start) as usize / 8;
        seal_sum((0..words).map(|i| self.ring_word(base + 8 * i)))
    }

    /// Bytes a seal covers that do not add up: "not yet" (they may still be on their way), for
    /// at most [`BAD_SUM_GRACE`], then corruption.
    fn not_yet(&mut self, start: u64, end: u64) -> Result<bool, ChannelError> {
        let since = *self.s.bad_sum_since.get_or_insert_with(&mut self.now);
        if (self.now)().saturating_duration_since(since) > BAD_SUM_GRACE {
            return Err(ChannelError::CorruptMessage(format!(
                "ring bytes [{start}, {end}) do not match their seal"
            )));
        }
        Ok(false)
    }

    /// Whether the bytes a doorbell seal (check word valid) covers are all here. A seal that is
    /// not the primary's own (runaway, across the ring's end, before what we have) is
    /// corruption.
    fn covered(&mut self, seal: &HeadSeal, limit: u64) -> Result<bool, ChannelError> {
        let cap = self.s.capacity;
        let off = seal.start & (cap - 1);
        if seal.start < self.s.head
            || seal.end <= seal.start
            || seal.end > limit
            || !seal.start.is_multiple_of(8)
            || !seal.end.is_multiple_of(8)
            || off + (seal.end - seal.start) > cap
        {
            return Err(ChannelError::CorruptMessage(format!(
                "primary sealed ring bytes [{}, {}) with the ring at {} and room up to {limit}",
                seal.start, seal.end, self.s.head
            )));
        }
        if self.ring_sum(seal.start, seal.end) == seal.sum {
            self.s.bad_sum_since = None;
            return Ok(true);
        }
        self.not_yet(seal.start, seal.end)
    }

    /// Sealed mode: looks for new records in memory, without a verbs call. Returns whether the
    /// head moved (it is then stored for the consumer).
    fn scan(&mut self) -> Result<bool, ChannelError> {
        let cap = self.s.capacity;
        let mask = cap - 1;
        // Nothing the primary wrote can end beyond what we have not released plus the ring.
        let limit = ring::tail_word(self.ring).load(Ordering::Acquire) + cap;
        let mut best = self.s.head;
        let bell = RING_HEADER_LEN + cap as usize;
        // A doorbell seal whose check word was already dealt with is skipped on one load (each
        // seal's check word differs: it covers `end`).
        let bell_check = self.ring_word(bell + 24);
        if bell_check != self.s.last_bell_check {
            if let Some(seal) = self.seal_at(bell) {
                if seal.end <= best {
                    self.s.last_bell_check = bell_check;
                } else if self.covered(&seal, limit)? {
                    best = seal.end;
                    self.s.last_check = seal.ring_check();
                    self.s.last_bell_check = bell_check;
                }
            }
        }
        // An intact short seal at the head: nothing was written there since (the next frame's
        // write starts there and overwrites it).
        let head_off = best & mask;
        if head_off != 0
            && head_off + SHORT_SEAL_LEN as u64 <= cap
            && self.ring_word(RING_HEADER_LEN + head_off as usize) == best
            && self.ring_word(RING_HEADER_LEN + head_off as usize + 8) == self.s.last_check
        {
            return Ok(self.publish(best));
        }
        // Otherwise follow the record headers from there, at most WALK_LIMIT of them, to the
        // first record followed by its short seal: `end` equal to that very position (a seal
        // from an earlier lap holds an older counter) and a check word matching `end` and the
        // sum of the record's bytes. The headers are only a guess at where to look (stale from
        // an earlier lap, or half written): what moves the head is a seal that matches.
        let max_payload = (cap / 2) - ring::RECORD_HEADER_LEN as u64;
        let mut pos = best;
        let mut unmatched = None;
        for _ in 0..WALK_LIMIT {
            if pos + 8 > limit {
                break;
            }
            let word = self.ring_word(RING_HEADER_LEN + (pos & mask) as usize);
            let (len, flags) = (word & 0xffff_ffff, word >> 32);
            let start = pos;
            pos = match flags {
                1 => (pos | mask) + 1,
                0 if len > 0 && len <= max_payload => {
                    pos + ring::record_footprint(len as usize) as u64
                }
                _ => break,
            };
            if pos > limit {
                break;
            }
            let end_off = ((pos - 1) & mask) + 1;
            if flags != 0
                || end_off + SHORT_SEAL_LEN as u64 > cap
                || self.ring_word(RING_HEADER_LEN + end_off as usize) != pos
            {
                continue;
            }
            // `end` matches: the primary wrote this seal, for a record ending here.
            let check = HeadSeal {
                end: pos,
                start,
                sum: self.ring_sum(start, pos),
            }
            .ring_check();
            if self.ring_word(RING_HEADER_LEN + end_off as usize + 8) == check {
                self.s.bad_sum_since = None;
                self.s.last_check = check;
                best = pos;
                break;
            }
            // Not (yet) a seal that matches: its bytes may still be on their way, or the word
            // is the next record's header that happens to equal the position. Walk on.
            unmatched.get_or_insert((start, pos));
        }
        if best == self.s.head {
            if let Some((start, end)) = unmatched {
                self.not_yet(start, end)?;
            }
        }
        Ok(self.publish(best))
    }

    /// Moves the head to `best` if that is news, for the consumer to read (it bounds-checks it
    /// against its own position and capacity).
    fn publish(&mut self, best: u64) -> bool {
        if best == self.s.head {
            return false;
        }
        self.s.head = best;
        ring::head_word(self.ring).store(best, Ordering::Release);
        crate::trace::backup_arrived();
        true
    }
}
