//! The RDMA medium's decoders of outside data, without a device: the set-up message a peer
//! sends ([`PeerInfo::decode`]), the ACK block and the head seals it finds in memory
//! ([`AckBlock::from_words`], [`HeadSeal::from_words`]), and the backup's seal scanning over
//! its ring (`rdma::scan`), which the primary's NIC writes into.
//!
//! The input's first 64 bytes are a set-up message (read as a backup's and as a primary's);
//! its first 40 and 32 bytes are also read as an ACK block and a doorbell seal. What must hold:
//! no panic; whatever decodes encodes back to exactly its bytes (a set-up message that is
//! accepted is canonical, and within the bounds [`PeerInfo::decode`] promises).
//!
//! The bytes after the first 64 are operations on a small ring ([`CAPACITY`] bytes, with its
//! doorbell block) that a model primary writes genuine frames into exactly as
//! `RdmaPrimaryLink::offer` lays them out (record, short seal, doorbell seal), sometimes torn
//! (only the first words of a write landed), while other operations write arbitrary words, or
//! seals with a valid check word that lie about what they cover, into the ring and the doorbell
//! block; between them the backup scans ([`Scanner`]) and consumes records. What must hold at
//! every scan:
//! - no panic, and a refusal only as [`ChannelError::CorruptMessage`] with a reason (and never
//!   while only the genuine primary wrote);
//! - the head never goes back, stays 8-aligned, never goes past what the ring can hold
//!   (released position plus capacity), and the head word the consumer reads is the scanner's;
//! - every move of the head is backed by a seal that holds over the ring's bytes as they are:
//!   a doorbell seal with a valid check word ending there whose bytes, from at or after the old
//!   head, add up to its sum, or a short seal right there whose `end` is that position and whose
//!   check word matches the bytes of a record starting at or after the old head;
//! - while only the genuine primary wrote: the head is always the end of a genuine frame whose
//!   record write (the record and its short seal; the doorbell seal is a second write) landed
//!   completely, the consumer reads exactly the genuine frames in order, and once
//!   every write has landed, one scan finds them all.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use crate::error::ChannelError;
use crate::rdma::scan::Scanner;
use crate::rdma::setup::{
    seal_sum, AckBlock, HeadSeal, PeerInfo, Role, ACK_BLOCK_LEN, ACK_LEN, ACK_WORDS, DOORBELL_LEN,
    FLAG_SEALED, MAX_RING_CAPACITY, SEAL_LEN, SETUP_LEN, SHORT_SEAL_LEN,
};
use crate::rdma::DOORBELL_EVERY;
use crate::region::{HeapRegion, RingMemory};
use crate::ring::{self, Consumer, Producer, RingError, RING_HEADER_LEN};

/// Data bytes of the fuzzed ring (small, so operations wrap it often).
pub const CAPACITY: u64 = 1024;
/// The largest frame the backup's set-up message must make room for.
const MAX_FRAME: usize = 256;

/// Checks everything the module documentation lists for `data`. Returns how many genuine
/// frames the backup consumed.
pub fn check(data: &[u8]) -> Result<usize, String> {
    let msg = &data[..data.len().min(SETUP_LEN)];
    check_setup(msg, Role::Backup, MAX_FRAME)?;
    check_setup(msg, Role::Primary, 0)?;
    if let Some(b) = data.get(..ACK_LEN) {
        let words = words::<ACK_WORDS>(b);
        if let Some(block) = AckBlock::from_words(words) {
            if block.encode()[..] != *b {
                return Err(format!(
                    "ACK block {b:02x?} decodes, encodes as {:02x?}",
                    block.encode()
                ));
            }
        }
    }
    if let Some(b) = data.get(..SEAL_LEN) {
        if let Some(seal) = HeadSeal::from_words(words::<4>(b)) {
            if seal.encode()[..] != *b {
                return Err(format!(
                    "seal {b:02x?} decodes, encodes as {:02x?}",
                    seal.encode()
                ));
            }
        }
    }
    let mut model = Model::new()?;
    let ops = data.get(SETUP_LEN..).unwrap_or(&[]);
    let mut i = 0;
    let mut next = || {
        let b = ops.get(i).copied();
        i += 1;
        b
    };
    while let Some(op) = next() {
        match op % 6 {
            0 => model.frame(None)?,
            1 => {
                let k = next().unwrap_or(0);
                model.frame(Some(usize::from(k)))?;
            }
            2 => model.scan()?,
            3 => model.consume()?,
            4 => {
                let at = u16::from_le_bytes([next().unwrap_or(0), next().unwrap_or(0)]);
                let n = usize::from(next().unwrap_or(0) % 4) + 1;
                let mut vals = Vec::with_capacity(n);
                for _ in 0..n {
                    let mut w = [0u8; 8];
                    for b in &mut w {
                        *b = next().unwrap_or(0);
                    }
                    vals.push(u64::from_le_bytes(w));
                }
                model.garbage(usize::from(at), &vals);
            }
            _ => {
                let kind = next().unwrap_or(0);
                let back = u64::from(next().unwrap_or(0));
                let len = u64::from(next().unwrap_or(0));
                model.forge(kind, back, len);
            }
        }
    }
    model.finish()
}

/// A decoded set-up message must be canonical and within the bounds `decode` promises.
fn check_setup(msg: &[u8], role: Role, max_frame: usize) -> Result<(), String> {
    let Ok(info) = PeerInfo::decode(msg, role, max_frame) else {
        return Ok(());
    };
    let fail = |why: &str| {
        Err(format!(
            "accepted {role:?} set-up message {msg:02x?} ({info:?}): {why}"
        ))
    };
    if info.encode()[..] != *msg {
        return fail(&format!("not canonical: encodes as {:02x?}", info.encode()));
    }
    if info.role != role {
        return fail("another role");
    }
    if !(1..=5).contains(&info.mtu) || info.qpn == 0 || info.qpn >= 1 << 24 || info.psn >= 1 << 24 {
        return fail("MTU, QPN or PSN out of range");
    }
    if info.flags & !FLAG_SEALED != 0 || info.addr == 0 || !info.addr.is_multiple_of(8) {
        return fail("unknown flags, or a null or misaligned region");
    }
    let extra = if role == Role::Backup && info.flags & FLAG_SEALED != 0 {
        DOORBELL_LEN
    } else {
        0
    };
    if info
        .addr
        .checked_add(info.len)
        .and_then(|e| e.checked_add(extra))
        .is_none()
    {
        return fail("the region wraps the address space");
    }
    match role {
        Role::Backup => {
            let cap = info.len;
            if !cap.is_power_of_two()
                || cap < ring::MIN_CAPACITY as u64
                || cap > MAX_RING_CAPACITY
                || (cap / 2 - ring::RECORD_HEADER_LEN as u64) < max_frame as u64
            {
                return fail("a ring that cannot be used");
            }
        }
        Role::Primary if info.len < ACK_BLOCK_LEN => return fail("a too-small ACK block"),
        Role::Primary => {}
    }
    Ok(())
}

fn words<const N: usize>(b: &[u8]) -> [u64; N] {
    let mut w = [0u64; N];
    for (i, c) in b.chunks_exact(8).take(N).enumerate() {
        let mut x = [0u8; 8];
        x.copy_from_slice(c);
        w[i] = u64::from_le_bytes(x);
    }
    w
}

/// The payload of genuine frame `i` (built once per process: the payloads repeat every
/// 7 x 256 frames, and building them for every frame was a large part of each fuzz run).
fn genuine(i: usize) -> &'static [u8] {
    const LENS: [usize; 7] = [24, 200, 8, 64, 120, 16, 256];
    const PERIOD: usize = LENS.len() * 256;
    static PAYLOADS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    let all = PAYLOADS.get_or_init(|| {
        (0..PERIOD)
            .map(|i| {
                (0..LENS[i % LENS.len()])
                    .map(|j| (i * 31 + j * 7 + 1) as u8)
                    .collect()
            })
            .collect()
    });
    &all[i % PERIOD]
}

/// The backup's ring and scanner, and a model primary writing into it.
struct Model {
    /// The backup's region: ring header, data area, doorbell block.
    ring: Arc<HeapRegion>,
    consumer: Consumer<Arc<HeapRegion>>,
    scanner: Scanner,
    /// The primary's mirror of the ring, where its producer lays out records.
    mirror: Arc<HeapRegion>,
    producer: Producer<Arc<HeapRegion>>,
    sent: u64,
    since_doorbell: u32,
    /// The next genuine frame to write.
    next: usize,
    /// Word writes (region offset, value) of the primary not landed yet, in order, and the
    /// frame they carry with the number of words of its doorbell write (the last ones): the
    /// record is complete once only those are left.
    pending: VecDeque<(usize, u64)>,
    pending_frame: Option<(u64, &'static [u8], usize)>,
    /// Genuine frames whose record writes landed completely, not consumed yet (end, payload).
    landed: VecDeque<(u64, &'static [u8])>,
    /// Ends of every genuine frame whose record write landed.
    ends: Vec<u64>,
    consumed: usize,
    /// Anything but the genuine primary wrote into the ring.
    garbage: bool,
    /// The scanner or the consumer refused the ring (after garbage): the backup stops.
    dead: bool,
}

impl Model {
    fn new() -> Result<Self, String> {
        let e = |e: RingError| format!("setting up the ring: {e}");
        let cap = CAPACITY as usize;
        let region = |len| {
            HeapRegion::new(len)
                .map(Arc::new)
                .map_err(|e| format!("region: {e}"))
        };
        let ring = region(ring::region_len(cap) + DOORBELL_LEN as usize)?;
        ring::format(&*ring, cap).map_err(e)?;
        let consumer = Consumer::attach(ring.clone()).map_err(e)?;
        let mirror = region(ring::region_len(cap))?;
        ring::format(&*mirror, cap).map_err(e)?;
        let producer = Producer::attach(mirror.clone()).map_err(e)?;
        Ok(Model {
            ring,
            consumer,
            scanner: Scanner::new(CAPACITY),
            mirror,
            producer,
            sent: 0,
            since_doorbell: 0,
            next: 0,
            pending: VecDeque::new(),
            pending_frame: None,
            landed: VecDeque::new(),
            ends: Vec::new(),
            consumed: 0,
            garbage: false,
            dead: false,
        })
    }

    fn word(&self, at: usize) -> u64 {
        u64::from_le(
            self.ring
                .word(at)
                .load(std::sync::atomic::Ordering::Acquire),
        )
    }

    fn tail(&self) -> u64 {
        ring::tail_word(&*self.ring).load(std::sync::atomic::Ordering::Acquire)
    }

    /// Lands up to `n` of the primary's pending word writes (all with `None`).
    fn land(&mut self, n: Option<usize>) {
        let n = n.unwrap_or(usize::MAX);
        for _ in 0..n {
            let Some((at, w)) = self.pending.pop_front() else {
                break;
            };
            self.ring
                .word(at)
                .store(w.to_le(), std::sync::atomic::Ordering::Release);
        }
        // The record's write (with its short seal) landed: the doorbell write is another one.
        if self
            .pending_frame
            .as_ref()
            .is_some_and(|(_, _, bell)| self.pending.len() <= *bell)
        {
            if let Some((end, payload, _)) = self.pending_frame.take() {
                self.ends.push(end);
                self.landed.push_back((end, payload));
            }
        }
    }

    /// The primary writes its next frame, as `RdmaPrimaryLink::offer` does (the ACK that told
    /// it the backup's released position is taken as just read); only `torn` words of the
    /// write land now, if given.
    fn frame(&mut self, torn: Option<usize>) -> Result<(), String> {
        // RDMA writes on one queue pair land in order: the previous one first.
        self.land(None);
        let tail = self.tail();
        ring::tail_word(&*self.mirror).store(tail, std::sync::atomic::Ordering::Release);
        let payload = genuine(self.next);
        match self.producer.try_reserve(payload.len()) {
            Ok(slot) => slot.copy_from_slice(payload),
            Err(RingError::Full { .. }) => return Ok(()),
            Err(e) => return Err(format!("the model primary's producer: {e}")),
        }
        self.producer.commit();
        self.next += 1;
        let cap = CAPACITY;
        let old = self.sent;
        let new = ring::head_word(&*self.mirror).load(std::sync::atomic::Ordering::Relaxed);
        let offset = old & (cap - 1);
        let to_end = cap - offset;
        let data = RING_HEADER_LEN;
        let mirror_word = |off: u64| {
            u64::from_le(
                self.mirror
                    .word(data + off as usize)
                    .load(std::sync::atomic::Ordering::Relaxed),
            )
        };
        let (start, rec_off) = if new - old > to_end {
            self.pending
                .push_back((data + offset as usize, mirror_word(offset)));
            (old + to_end, 0)
        } else {
            (old, offset)
        };
        let len = new - start;
        let seal = HeadSeal {
            end: new,
            start,
            sum: seal_sum((0..len / 8).map(|i| mirror_word(rec_off + 8 * i))),
        };
        for i in 0..len / 8 {
            self.pending.push_back((
                data + (rec_off + 8 * i) as usize,
                mirror_word(rec_off + 8 * i),
            ));
        }
        let end_off = rec_off + len;
        let in_ring =
            end_off + SHORT_SEAL_LEN as u64 <= cap && new + SHORT_SEAL_LEN as u64 <= tail + cap;
        self.since_doorbell += 1;
        let bell = !in_ring || (old > tail && self.since_doorbell >= DOORBELL_EVERY);
        if in_ring {
            self.pending.push_back((data + end_off as usize, seal.end));
            self.pending
                .push_back((data + end_off as usize + 8, seal.ring_check()));
        }
        let bell_words = if bell { SEAL_LEN / 8 } else { 0 };
        if bell {
            let at = data + cap as usize;
            for (k, w) in words::<4>(&seal.encode()).into_iter().enumerate() {
                self.pending.push_back((at + 8 * k, w));
            }
            self.since_doorbell = 0;
        }
        self.sent = new;
        self.pending_frame = Some((new, payload, bell_words));
        self.land(torn);
        Ok(())
    }

    /// Arbitrary words written at word `at` of the data area and doorbell block.
    fn garbage(&mut self, at: usize, vals: &[u64]) {
        let words = (CAPACITY + DOORBELL_LEN) as usize / 8;
        for (k, &v) in vals.iter().enumerate() {
            let off = RING_HEADER_LEN + (at + k) % words * 8;
            self.ring
                .word(off)
                .store(v.to_le(), std::sync::atomic::Ordering::Release);
        }
        self.garbage = true;
    }

    /// A seal with a valid check word over the ring's bytes as they are, claiming bytes it
    /// may not be the primary's seal for: in the doorbell block (`kind` even) or as a short
    /// seal (odd), ending `back` words before or after the newest genuine end, `len` words
    /// long.
    fn forge(&mut self, kind: u8, back: u64, len: u64) {
        let cap = CAPACITY;
        let end = (self.sent + 8 * (back % 16)).saturating_sub(8 * (back / 16)) & !7;
        let start = end.saturating_sub(8 * len.max(1));
        let sum_of = |s: u64, e: u64| {
            seal_sum(
                (s..e)
                    .step_by(8)
                    .map(|p| self.word(RING_HEADER_LEN + (p & (cap - 1)) as usize)),
            )
        };
        let seal = HeadSeal {
            end,
            start,
            sum: sum_of(start, end),
        };
        if kind.is_multiple_of(2) {
            self.garbage(cap as usize / 8, &words::<4>(&seal.encode()));
        } else {
            let end_off = ((end.wrapping_sub(1)) & (cap - 1)) + 1;
            self.garbage(end_off as usize / 8, &[seal.end, seal.ring_check()]);
        }
    }

    /// One scan, and the properties of its outcome.
    fn scan(&mut self) -> Result<(), String> {
        if self.dead {
            return Ok(());
        }
        let before = self.scanner.head;
        let limit = self.tail() + CAPACITY;
        // A clock that never moves: a seal whose bytes do not add up stays "not yet".
        let now = Instant::now();
        match self.scanner.scan(&*self.ring, || now) {
            Ok(_) => {}
            Err(ChannelError::CorruptMessage(m)) if self.garbage && !m.is_empty() => {
                self.dead = true;
                return Ok(());
            }
            Err(e) => {
                return Err(format!(
                    "the scan failed: {e} (garbage written: {})",
                    self.garbage
                ))
            }
        }
        let head = self.scanner.head;
        let published = ring::head_word(&*self.ring).load(std::sync::atomic::Ordering::Acquire);
        if head < before || !head.is_multiple_of(8) || head > limit || published != head {
            return Err(format!(
                "the head moved from {before} to {head} (published {published}), room up to {limit}"
            ));
        }
        if head != before && !self.sealed(before, head) {
            return Err(format!(
                "the head moved from {before} to {head} without a seal that holds"
            ));
        }
        if !self.garbage && head != before && !self.ends.contains(&head) {
            return Err(format!(
                "the head moved to {head}, not the end of a genuine frame that landed (ends {:?})",
                self.ends
            ));
        }
        Ok(())
    }

    /// Whether a seal that holds over the ring's bytes as they are says `[from, to)` was written.
    fn sealed(&self, from: u64, to: u64) -> bool {
        let cap = CAPACITY;
        // The data area as it is, read once: the search below sums many ranges of it.
        let mut data = [0u64; CAPACITY as usize / 8];
        for (k, w) in data.iter_mut().enumerate() {
            *w = self.word(RING_HEADER_LEN + 8 * k);
        }
        let crosses = |s: u64, e: u64| (s & (cap - 1)) + (e - s) > cap;
        // Only called for ranges that do not cross the end of the data area; `e` is a head,
        // so 8-aligned. A forged seal may give an unaligned start: read that one word by word.
        let sum = |s: u64, e: u64| {
            if !s.is_multiple_of(8) {
                return seal_sum(
                    (s..e)
                        .step_by(8)
                        .map(|p| self.word(RING_HEADER_LEN + (p & (cap - 1)) as usize)),
                );
            }
            let first = (s & (cap - 1)) as usize / 8;
            seal_sum(data[first..first + (e - s) as usize / 8].iter().copied())
        };
        let bell = RING_HEADER_LEN + cap as usize;
        if let Some(seal) = HeadSeal::from_words([
            self.word(bell),
            self.word(bell + 8),
            self.word(bell + 16),
            self.word(bell + 24),
        ]) {
            if seal.end == to
                && seal.start >= from
                && seal.start < to
                && !crosses(seal.start, to)
                && sum(seal.start, to) == seal.sum
            {
                return true;
            }
        }
        let end_off = ((to - 1) & (cap - 1)) + 1;
        if end_off + SHORT_SEAL_LEN as u64 > cap
            || self.word(RING_HEADER_LEN + end_off as usize) != to
        {
            return false;
        }
        let check = self.word(RING_HEADER_LEN + end_off as usize + 8);
        let lowest = from.max(to.saturating_sub(cap));
        (lowest..to).step_by(8).any(|s| {
            !crosses(s, to)
                && HeadSeal {
                    end: to,
                    start: s,
                    sum: sum(s, to),
                }
                .ring_check()
                    == check
        })
    }

    /// The backup reads every record up to the head and releases them.
    fn consume(&mut self) -> Result<(), String> {
        if self.dead {
            return Ok(());
        }
        loop {
            let record = match self.consumer.peek() {
                Ok(Some(r)) => r.to_vec(),
                Ok(None) => break,
                Err(e) if self.garbage => {
                    let _ = e;
                    self.dead = true;
                    return Ok(());
                }
                Err(e) => return Err(format!("the consumer refused the genuine ring: {e}")),
            };
            if !self.garbage {
                match self.landed.pop_front() {
                    Some((_, want)) if want == record => self.consumed += 1,
                    want => {
                        return Err(format!(
                            "consumed {record:02x?}, the next genuine frame is {want:02x?}"
                        ))
                    }
                }
            }
            self.consumer.advance_peeked();
        }
        self.consumer.release();
        Ok(())
    }

    /// Every write lands; one scan then finds every genuine frame (if nothing else wrote).
    fn finish(mut self) -> Result<usize, String> {
        self.land(None);
        self.scan()?;
        self.consume()?;
        if !self.garbage && (self.scanner.head != self.sent || !self.landed.is_empty()) {
            return Err(format!(
                "every write landed, but the scan stopped at {} of {} ({} frames not consumed)",
                self.scanner.head,
                self.sent,
                self.landed.len()
            ));
        }
        Ok(self.consumed)
    }
}

/// A valid set-up message of `role`.
pub fn setup_message(role: Role) -> [u8; SETUP_LEN] {
    PeerInfo {
        role,
        mtu: 3,
        qpn: 0x11,
        psn: 0x12_3456,
        lid: 0,
        flags: FLAG_SEALED,
        rkey: 0xdead_beef,
        gid: [7; 16],
        addr: 0x7f00_0000_1000,
        len: if role == Role::Backup {
            1 << 20
        } else {
            ACK_BLOCK_LEN
        },
    }
    .encode()
}

/// Seeds: set-up messages of both roles followed by ring operations (genuine frames with scans
/// and consumption, torn writes, garbage and forged seals), and junk.
pub fn seeds() -> Vec<Vec<u8>> {
    let with = |role: Role, ops: &[u8]| {
        let mut v = setup_message(role).to_vec();
        v.extend_from_slice(ops);
        v
    };
    // 0 = frame, 1 k = torn frame, 2 = scan, 3 = consume, 4 = garbage, 5 = forged seal.
    let steady: Vec<u8> = (0..40)
        .flat_map(|i| [0, 2, if i % 3 == 0 { 3 } else { 2 }])
        .collect();
    let backlog: Vec<u8> = std::iter::repeat_n(0u8, 30)
        .chain([2, 3, 2, 3])
        .chain(std::iter::repeat_n(0u8, 20))
        .chain([2, 3])
        .collect();
    let torn = [0, 2, 1, 3, 2, 1, 20, 2, 3, 0, 2, 3, 1, 1, 2, 2, 3];
    let hostile = [
        0, 0, 2, 4, 10, 0, 1, 9, 9, 9, 9, 9, 9, 9, 9, 2, 5, 0, 3, 4, 2, 5, 1, 0, 2, 2, 3,
    ];
    vec![
        with(Role::Backup, &steady),
        with(Role::Primary, &backlog),
        with(Role::Backup, &torn),
        with(Role::Primary, &hostile),
        vec![0xA5; SETUP_LEN + 17],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::{mutate, xorshift};

    #[test]
    fn the_seeds_exercise_the_scan() {
        assert!(check(&seeds()[0]).expect("steady") >= 40);
        assert!(check(&seeds()[1]).expect("backlog") > 10);
        check(&seeds()[2]).expect("torn");
        check(&seeds()[3]).expect("hostile");
    }

    #[test]
    fn every_torn_point_of_a_write_is_sound() {
        // Found by the cargo-fuzz target (a fault of the model, not of the scanner): a write
        // torn after the record and its short seal landed, before the doorbell seal (a second
        // write) did. The scanner rightly finds the record by its short seal. Here: frames
        // with one unreleased frame behind (so every 16th also rings the doorbell), and the
        // next write torn at every word.
        for n in 10..20 {
            for k in 0..48u8 {
                let mut ops = setup_message(Role::Backup).to_vec();
                ops.push(0);
                for _ in 0..n {
                    ops.extend_from_slice(&[0, 3, 2]);
                }
                ops.extend_from_slice(&[1, k, 2, 3, 2]);
                if let Err(v) = check(&ops) {
                    panic!("{n} frames, torn after {k} words: {v}");
                }
            }
        }
    }

    #[test]
    fn no_bytes_make_the_rdma_decoders_accept_anything_unsound() {
        let mut state = 0x3C6E_F372_FE94_F82Bu64;
        let mut runs = 0;
        for seed in seeds() {
            let mut current = seed.clone();
            for _ in 0..1000 {
                if let Err(v) = check(&current) {
                    panic!("{v}: input {current:02x?}");
                }
                runs += 1;
                let r = xorshift(&mut state);
                current = mutate(if r.is_multiple_of(3) { &current } else { &seed }, r);
            }
        }
        assert_eq!(runs, seeds().len() * 1000);
    }
}
