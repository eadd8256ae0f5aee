//! The primary's end of the RDMA medium.

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::setup::{
    seal_sum, AckBlock, HeadSeal, RemoteRegion, ACK_WORDS, SEALED_ACK_WORDS, SEAL_LEN,
    SHORT_SEAL_LEN,
};
use super::verbs::{post_writes, reap, Completion, Endpoint, RdmaWrite, Registered, SendQueue};
use super::DOORBELL_EVERY;
use crate::auth::AckOpener;
use crate::channel::{BackupNews, PrimaryLink};
use crate::control;
use crate::error::ChannelError;
use crate::poll::PollPolicy;
use crate::region::{HeapRegion, RingMemory};
use crate::ring::{self, Producer, RingError, RING_HEADER_LEN};

/// The primary's RDMA link: frames laid out in a local mirror of the backup's ring and written
/// to the same offsets of the real one.
pub struct RdmaPrimaryLink {
    pub(super) ep: Endpoint,
    pub(super) producer: Producer<Arc<HeapRegion>>,
    pub(super) mirror: Arc<HeapRegion>,
    pub(super) mirror_mr: Registered,
    /// The block the backup's ACKs land in.
    pub(super) acks: Arc<HeapRegion>,
    pub(super) remote: RemoteRegion,
    /// The backup's doorbell block.
    pub(super) doorbell: RemoteRegion,
    /// Seal staging slots after the mirror's ring.
    pub(super) seal_slots: u64,
    /// Frames since the last seal written to the doorbell block.
    pub(super) since_doorbell: u32,
    pub(super) capacity: u64,
    /// Head counter as far as writes were posted.
    pub(super) sent: u64,
    /// The backup's released position, as last reported.
    pub(super) tail: u64,
    pub(super) sq: SendQueue,
    pub(super) last_beats: u64,
    /// The check word of the last valid ACK block read.
    pub(super) last_ack_check: u64,
    /// The newest ACK seen, and whether its arrival is yet to be reported as "heard".
    pub(super) last_acked: u64,
    pub(super) heard_pending: bool,
    pub(super) torn_reads: u64,
    /// Checks every ACK's seal (crypto `auth`/`encrypt`).
    pub(super) opener: Option<AckOpener>,
    pub(super) stream: TcpStream,
    pub(super) wcs: [Completion; 16],
}

impl std::fmt::Debug for RdmaPrimaryLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaPrimaryLink")
            .field("ep", &self.ep)
            .field("capacity", &self.capacity)
            .field("sent", &self.sent)
            .field("tail", &self.tail)
            .field("in_flight", &self.sq.in_flight())
            .finish_non_exhaustive()
    }
}

impl RdmaPrimaryLink {
    /// The queue pair's state (`ibv_qp_state`; a system call).
    pub fn qp_state(&self) -> Result<u32, ChannelError> {
        self.ep.qp_state()
    }

    /// Reads of the ACK block that raced the backup's write and were retried.
    pub fn torn_reads(&self) -> u64 {
        self.torn_reads
    }

    /// Inline bytes the queue pair accepts per write.
    pub fn max_inline(&self) -> u32 {
        self.ep.max_inline
    }

    fn reap(&mut self) -> Result<(), ChannelError> {
        reap(&mut self.ep, &mut self.sq, &mut self.wcs, |_| {
            Err(ChannelError::CorruptMessage(
                "receive completion on the primary".into(),
            ))
        })
    }

    /// [`seal_sum`] of `len` bytes at data offset `off` of the mirror.
    fn mirror_sum(&self, off: u64, len: u64) -> u64 {
        debug_assert!(off + len <= self.capacity && off.is_multiple_of(8) && len.is_multiple_of(8));
        let base = RING_HEADER_LEN + off as usize;
        seal_sum((0..len as usize / 8).map(|i| {
            // SAFETY: `off + len <= capacity` (a record never crosses the ring's end), so each
            // 8-aligned word lies in the mirror's data area, which only this producer writes.
            u64::from_le(unsafe { self.mirror.as_ptr().add(base + 8 * i).cast::<u64>().read() })
        }))
    }

    fn ack_word(&self, i: usize) -> u64 {
        // The ACK block is the first 64 bytes of `acks`; the NIC writes it concurrently.
        self.acks.word(8 * i).load(Ordering::Acquire)
    }
}

impl PrimaryLink for RdmaPrimaryLink {
    fn offer(&mut self, frame: &[u8]) -> Result<bool, ChannelError> {
        if self.sq.room() < 3 {
            self.reap()?;
            if self.sq.room() < 3 {
                return Ok(false);
            }
        }
        match self.producer.try_reserve(frame.len()) {
            Ok(slot) => slot.copy_from_slice(frame),
            Err(RingError::Full { .. }) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        self.producer.commit();
        let old = self.sent;
        let new = ring::head_word(&*self.mirror).load(Ordering::Relaxed);
        let cap = self.capacity;
        let data = self.mirror_mr.addr + RING_HEADER_LEN as u64;
        let offset = old & (cap - 1);
        let to_end = cap - offset;
        let none = RdmaWrite {
            local: 0,
            len: 0,
            remote: 0,
            imm: None,
            send: false,
        };
        let mut writes = [none; 3];
        let mut k = 0;
        // The record's bytes: [start, new) at `rec_off`, after a padding header if it wrapped.
        let (start, rec_off) = if new - old > to_end {
            writes[0] = RdmaWrite {
                local: data + offset,
                len: ring::RECORD_HEADER_LEN as u32,
                remote: self.remote.target(offset, ring::RECORD_HEADER_LEN as u64)?,
                ..none
            };
            k = 1;
            (old + to_end, 0)
        } else {
            (old, offset)
        };
        let mut len = new - start;
        {
            let seal = HeadSeal {
                end: new,
                start,
                sum: self.mirror_sum(rec_off, len),
            };
            let short = seal.encode_short();
            let seal = seal.encode();
            let end_off = rec_off + len;
            // The short seal goes right after the record when that space is free at the backup
            // (not holding bytes it has not released) and does not cross the ring's end.
            let in_ring = end_off + SHORT_SEAL_LEN as u64 <= cap
                && new + SHORT_SEAL_LEN as u64 <= self.tail + cap;
            self.since_doorbell += 1;
            let bell = !in_ring || (old > self.tail && self.since_doorbell >= DOORBELL_EVERY);
            if in_ring {
                // SAFETY: `end_off + SHORT_SEAL_LEN <= capacity`, so the bytes lie in the mirror's
                // data area; they are free space the producer (owned by `self`) reserves only
                // later.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        short.as_ptr(),
                        self.mirror.as_ptr().add(RING_HEADER_LEN + end_off as usize),
                        SHORT_SEAL_LEN,
                    );
                }
                len += SHORT_SEAL_LEN as u64;
            }
            writes[k] = RdmaWrite {
                local: data + rec_off,
                len: len as u32,
                remote: self.remote.target(rec_off, len)?,
                ..none
            };
            k += 1;
            if bell {
                // Slot of the request about to carry it; reused only `seal_slots` (the queue's
                // depth) requests later, when this one has completed.
                let slot = (self.sq.posted() + k as u64 + 1) % self.seal_slots;
                let at = ring::region_len(cap as usize) + slot as usize * SEAL_LEN;
                // SAFETY: `slot < seal_slots`, so the bytes lie in the mirror's staging area
                // (allocated and registered with it); see above for why nothing reads them now.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        seal.as_ptr(),
                        self.mirror.as_ptr().add(at),
                        SEAL_LEN,
                    );
                }
                writes[k] = RdmaWrite {
                    local: self.mirror_mr.addr + at as u64,
                    len: SEAL_LEN as u32,
                    remote: self.doorbell.target(0, SEAL_LEN as u64)?,
                    ..none
                };
                k += 1;
                self.since_doorbell = 0;
            }
        }
        crate::trace::primary(crate::trace::PrimaryPoint::Sent);
        // SAFETY: the local ranges are the record's bytes (and its seal) in the mirror, or a seal
        // staging slot, all registered under `mirror_mr`; the producer reuses record bytes only
        // once the backup has released them, which it can do only after the writes landed. The
        // remote ranges were bounds-checked by `target` against the backup's registered data
        // area and doorbell block.
        unsafe {
            post_writes(
                &mut self.ep,
                &mut self.sq,
                self.mirror_mr.lkey,
                self.remote.rkey,
                &writes[..k],
            )?;
        }
        self.sent = new;
        Ok(true)
    }

    fn flush(&mut self) -> Result<bool, ChannelError> {
        Ok(true)
    }

    fn poll(&mut self) -> Result<BackupNews, ChannelError> {
        // Completions matter only for send-queue room: skip the verbs call until a signalled
        // request can be outstanding. A failed request still surfaces: at the next reap, or as
        // the queue pair's error state at heartbeat pace.
        if self.sq.in_flight() >= self.sq.signal_every() {
            self.reap()?;
        }
        let block = {
            // Every ACK write changes the check word (its beat count always moves), so an
            // unchanged check word means nothing new: one load per idle poll, and the poll
            // that finds the commit's ACK starts that much sooner.
            let check = self.ack_word(ACK_WORDS - 1);
            if check == self.last_ack_check {
                None
            } else if let Some(opener) = &mut self.opener {
                let mut words = [0; SEALED_ACK_WORDS];
                for (i, w) in words.iter_mut().enumerate() {
                    *w = if i == ACK_WORDS - 1 {
                        check
                    } else {
                        // The ACK block is 64 bytes: the sealed block fills it.
                        self.acks.word(8 * i).load(Ordering::Acquire)
                    };
                }
                match AckBlock::from_sealed_words(words) {
                    Some((block, seal)) => {
                        // A whole block whose seal does not verify is a forgery (or a replay):
                        // the channel ends, as over TCP.
                        opener.open_msg(&block.fields(), &seal)?;
                        self.last_ack_check = check;
                        Some(block)
                    }
                    None => {
                        if words != [0; SEALED_ACK_WORDS] {
                            self.torn_reads += 1;
                        }
                        None
                    }
                }
            } else {
                let mut words = [0; ACK_WORDS];
                for (i, w) in words.iter_mut().enumerate().take(ACK_WORDS - 1) {
                    *w = self.ack_word(i);
                }
                words[ACK_WORDS - 1] = check;
                let block = AckBlock::from_words(words);
                match block {
                    Some(_) => self.last_ack_check = check,
                    None if words != [0; ACK_WORDS] => self.torn_reads += 1,
                    None => {}
                }
                block
            }
        };
        let Some(block) = block else {
            return Ok(BackupNews {
                acked: None,
                replayed: None,
                heard: std::mem::take(&mut self.heard_pending),
            });
        };
        if block.tail < self.tail || block.tail > self.sent || !block.tail.is_multiple_of(8) {
            return Err(ChannelError::CorruptMessage(format!(
                "backup released its ring up to {}, but {} were written and {} released before",
                block.tail, self.sent, self.tail
            )));
        }
        if block.tail != self.tail {
            ring::tail_word(&*self.mirror).store(block.tail, Ordering::Release);
            self.tail = block.tail;
        }
        let fresh = block.beats != self.last_beats;
        self.last_beats = block.beats;
        // A new ACK is reported at once. That the backup was heard (for which the sender reads
        // the clock, to note its liveness) is reported with the next poll instead, which takes
        // that clock read off the output-commit path: in the soft-RoCE guest the clock source
        // is the emulated HPET, where a clock read is a system call and an emulated device
        // access. Liveness notes the time one poll later, which only errs towards patience.
        // (Deferred by one poll at most: a second new ACK reports both at once.)
        let heard = if fresh && block.acked > self.last_acked && !self.heard_pending {
            self.heard_pending = true;
            false
        } else {
            std::mem::take(&mut self.heard_pending) || fresh
        };
        self.last_acked = block.acked;
        Ok(BackupNews {
            acked: Some(block.acked),
            replayed: Some(block.replayed),
            heard,
        })
    }

    fn check_peer(&mut self) -> Result<(), ChannelError> {
        control::check_peer(&mut self.stream, "RDMA")?;
        self.reap()?;
        self.ep.check_qp()
    }

    fn seal_acks(&mut self, opener: AckOpener) {
        self.opener = Some(opener);
    }

    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        // Completions are polled, not waited for.
        Ok(PollPolicy::nap(timeout))
    }
}
