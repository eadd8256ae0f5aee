//! The backup's in-order reassembly of log frames from DATA packets. No I/O, and no DPDK: the
//! packets it keeps are any [`Packet`] (an mbuf on the medium), so it builds without the
//! `dpdk` feature too, for the `dpdk_packets` fuzz check (`transport::fuzz::dpdk_packets`).

use std::collections::{BTreeMap, VecDeque};

use super::codec::{classify, u16_at, u32_at, Mac, DATA_HDR, ETHER_HDR_LEN, T_DATA};
use super::DpdkStats;

/// A received Ethernet frame the reassembly can keep (an mbuf on the medium).
pub(crate) trait Packet {
    /// The frame's bytes, from the Ethernet header on.
    fn data(&self) -> &[u8];
}

impl Packet for Vec<u8> {
    fn data(&self) -> &[u8] {
        self
    }
}

/// What became of a received DATA packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Taken, in order.
    Taken,
    /// Already taken before.
    Duplicate,
    /// After a gap: kept until the missing packets arrive.
    Buffered,
    /// Too far ahead of the gap to keep: dropped.
    Gap,
    /// In order, but the backlog of complete frames is full.
    Backlogged,
    /// In order, but it does not parse or does not fit what came before.
    Garbage,
}

/// A complete log frame waiting for the channel.
#[derive(Debug)]
pub(crate) enum Ready<P> {
    /// Reassembled from pieces (or copied out of a packet that came after a gap).
    Owned(Vec<u8>),
    /// Carried whole by one packet that arrived in order: kept in its mbuf, no copy.
    Held {
        mbuf: P,
        /// Where the frame starts in the mbuf's data, and its length.
        start: usize,
        len: usize,
    },
}

impl<P: Packet> Ready<P> {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Ready::Owned(v) => v,
            // `data_whole` checked the range when it kept the mbuf.
            Ready::Held { mbuf, start, len } => {
                mbuf.data().get(*start..*start + *len).unwrap_or(&[])
            }
        }
    }
}

/// The backup's in-order reassembly of log frames from DATA packets (no I/O, so it is tested
/// on its own).
#[derive(Debug)]
pub(crate) struct Reassembly<P> {
    pub(crate) max_frame: usize,
    pub(crate) backlog: usize,
    /// How far ahead of `expected` packets are kept.
    pub(crate) window: u64,
    /// Bodies of packets that came after a gap, by sequence number.
    pub(crate) ahead: BTreeMap<u64, Vec<u8>>,
    /// Sequence number of the next DATA packet to accept.
    pub(crate) expected: u64,
    /// The log frame being reassembled, and its announced length.
    pub(crate) partial: Vec<u8>,
    pub(crate) partial_len: Option<usize>,
    /// Complete log frames, oldest first.
    pub(crate) ready: VecDeque<Ready<P>>,
    /// Spare frame buffers.
    pub(crate) free: Vec<Vec<u8>>,
}

impl<P: Packet> Reassembly<P> {
    pub(crate) fn new(max_frame: usize, backlog: usize, window: usize) -> Self {
        Reassembly {
            max_frame,
            backlog,
            window: window as u64,
            ahead: BTreeMap::new(),
            expected: 1,
            partial: Vec::new(),
            partial_len: None,
            ready: VecDeque::new(),
            free: Vec::new(),
        }
    }

    /// Takes a DATA packet with sequence number `seq` and body (after the Ethernet header)
    /// `body`.
    pub(crate) fn data(&mut self, seq: u64, body: &[u8]) -> Piece {
        if seq < self.expected {
            Piece::Duplicate
        } else if seq > self.expected {
            if seq - self.expected > self.window {
                Piece::Gap
            } else if self.ahead.contains_key(&seq) {
                Piece::Duplicate
            } else {
                let mut copy = self.free.pop().unwrap_or_default();
                copy.clear();
                copy.extend_from_slice(body);
                self.ahead.insert(seq, copy);
                Piece::Buffered
            }
        } else if self.ready.len() >= self.backlog {
            Piece::Backlogged
        } else if self.take_piece(body) {
            self.expected += 1;
            self.drain();
            Piece::Taken
        } else {
            Piece::Garbage
        }
    }

    /// Takes the kept packets that are now in order. Returns how many failed to fit (garbage).
    pub(crate) fn drain(&mut self) -> u64 {
        let mut bad = 0;
        while self.ready.len() < self.backlog {
            let Some(body) = self.ahead.remove(&self.expected) else {
                break;
            };
            if self.take_piece(&body) {
                self.expected += 1;
            } else {
                bad += 1;
            }
            if self.free.len() < 64 {
                self.free.push(body);
            }
            if bad > 0 {
                break;
            }
        }
        // Anything kept from before `expected` is stale.
        while self
            .ahead
            .first_key_value()
            .is_some_and(|(&k, _)| k < self.expected)
        {
            self.ahead.pop_first();
        }
        bad
    }

    /// Whether packets after a gap are waiting for the missing one.
    #[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
    pub(crate) fn has_gap(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// Takes one in-order DATA packet's body; `false` if it does not fit what came before.
    pub(crate) fn take_piece(&mut self, body: &[u8]) -> bool {
        if body.len() < DATA_HDR {
            return false;
        }
        let total = u32_at(body, 16) as usize;
        let offset = u32_at(body, 20) as usize;
        let len = usize::from(u16_at(body, 24));
        let Some(piece) = body.get(DATA_HDR..DATA_HDR + len) else {
            return false;
        };
        if total == 0
            || total > self.max_frame
            || offset.checked_add(len).is_none_or(|e| e > total)
            || (len == 0 && offset < total)
        {
            return false;
        }
        match self.partial_len {
            None if offset == 0 => {
                self.partial = self.free.pop().unwrap_or_default();
                self.partial.clear();
                self.partial_len = Some(total);
            }
            Some(t) if t == total && offset == self.partial.len() => {}
            _ => return false,
        }
        self.partial.extend_from_slice(piece);
        if self.partial.len() == total {
            self.ready
                .push_back(Ready::Owned(std::mem::take(&mut self.partial)));
            self.partial_len = None;
        }
        true
    }

    /// The fast path for the common case: DATA packet `seq`, received in `mbuf` (our header at
    /// `ETHER_HDR_LEN`), is the next one expected and carries a whole log frame: the frame is
    /// kept in the mbuf, not copied. Gives the mbuf back for [`Reassembly::data`] otherwise.
    pub(crate) fn data_whole(&mut self, seq: u64, mbuf: P) -> Result<(), P> {
        if seq != self.expected
            || self.partial_len.is_some()
            || !self.ahead.is_empty()
            || self.ready.len() >= self.backlog
        {
            return Err(mbuf);
        }
        let Some(body) = mbuf.data().get(ETHER_HDR_LEN..) else {
            return Err(mbuf);
        };
        if body.len() < DATA_HDR {
            return Err(mbuf);
        }
        let total = u32_at(body, 16) as usize;
        let offset = u32_at(body, 20) as usize;
        let len = usize::from(u16_at(body, 24));
        if offset != 0
            || len != total
            || total == 0
            || total > self.max_frame
            || body.len() < DATA_HDR + len
        {
            return Err(mbuf);
        }
        self.ready.push_back(Ready::Held {
            mbuf,
            start: ETHER_HDR_LEN + DATA_HDR,
            len,
        });
        self.expected += 1;
        Ok(())
    }

    /// One received Ethernet frame, as the backup's link takes it: a packet that is not ours
    /// (another ethertype, our own seen again) is counted as foreign, one that is ours but
    /// does not parse, carries another link tag or comes from another MAC, or is not DATA, as
    /// garbage; a DATA packet goes to [`Reassembly::data_whole`] or [`Reassembly::data`] and
    /// is counted by what became of it. `None` for a packet that is not DATA for us (it needs
    /// no answer), else whether it was taken in order.
    pub(crate) fn packet(
        &mut self,
        mac: Mac,
        peer: Mac,
        tag: u32,
        stats: &DpdkStats,
        m: P,
    ) -> Option<bool> {
        let (kind, seq, _) = classify(mac, peer, tag, stats, m.data())?;
        if kind != T_DATA {
            DpdkStats::garbage(&stats.garbage, 1);
            return None;
        }
        crate::trace::backup_arrived();
        let m = match self.data_whole(seq, m) {
            Ok(()) => return Some(true),
            Err(m) => m,
        };
        let body = m.data().get(ETHER_HDR_LEN..).unwrap_or(&[]);
        Some(match self.data(seq, body) {
            Piece::Taken => true,
            Piece::Duplicate => {
                DpdkStats::inc(&stats.duplicates);
                false
            }
            Piece::Buffered => {
                DpdkStats::inc(&stats.out_of_order);
                false
            }
            Piece::Gap => {
                DpdkStats::inc(&stats.out_of_order);
                DpdkStats::inc(&stats.too_far);
                false
            }
            Piece::Backlogged => {
                DpdkStats::inc(&stats.backlogged);
                false
            }
            Piece::Garbage => {
                DpdkStats::garbage(&stats.garbage, 1);
                false
            }
        })
    }

    pub(crate) fn peek(&self) -> Option<&[u8]> {
        self.ready.front().map(Ready::bytes)
    }

    /// Drops the oldest complete frame; returns how many kept packets then failed to fit. A
    /// frame held in its mbuf goes to `spent` (the caller frees it once the ACK is out).
    pub(crate) fn consume(&mut self, spent: &mut Vec<P>) -> u64 {
        match self.ready.pop_front() {
            Some(Ready::Owned(buf)) if self.free.len() < 64 => self.free.push(buf),
            Some(Ready::Held { mbuf, .. }) => spent.push(mbuf),
            Some(Ready::Owned(_)) | None => {}
        }
        if self.ahead.is_empty() {
            0
        } else {
            self.drain()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpdk::codec::{MAGIC, VERSION};

    /// A DATA body (after the Ethernet header) as the primary builds it.
    fn data_body(seq: u64, total: usize, offset: usize, piece: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.push(VERSION);
        b.push(T_DATA);
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&seq.to_le_bytes());
        b.extend_from_slice(&(total as u32).to_le_bytes());
        b.extend_from_slice(&(offset as u32).to_le_bytes());
        b.extend_from_slice(&(piece.len() as u16).to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(piece);
        b
    }

    #[test]
    fn reassembles_in_order_keeps_packets_after_a_gap_and_drops_duplicates() {
        let mut r = Reassembly::<Vec<u8>>::new(1 << 20, 8, 4);
        let frame: Vec<u8> = (0..250u8).collect();
        let body = |seq: u64| {
            let range = match seq {
                1 => 0..100,
                2 => 100..200,
                _ => 200..250,
            };
            data_body(seq, 250, range.start, &frame[range])
        };
        assert_eq!(r.data(1, &body(1)), Piece::Taken);
        assert_eq!(r.peek(), None);
        assert_eq!(r.data(3, &body(3)), Piece::Buffered);
        assert!(r.has_gap());
        assert_eq!(r.data(3, &body(3)), Piece::Duplicate);
        assert_eq!(r.data(1, &body(1)), Piece::Duplicate);
        assert_eq!(r.data(9, &body(3)), Piece::Gap);
        assert_eq!(r.data(2, &body(2)), Piece::Taken);
        assert!(!r.has_gap());
        assert_eq!(r.expected, 4);
        assert_eq!(r.peek(), Some(&frame[..]));
        assert_eq!(r.consume(&mut Vec::new()), 0);
        assert_eq!(r.peek(), None);
    }

    #[test]
    fn backlog_holds_packets_back_until_consumed() {
        let mut r = Reassembly::<Vec<u8>>::new(1 << 20, 1, 8);
        assert_eq!(r.data(1, &data_body(1, 10, 0, &[1; 10])), Piece::Taken);
        assert_eq!(r.data(2, &data_body(2, 10, 0, &[2; 10])), Piece::Backlogged);
        assert_eq!(r.data(3, &data_body(3, 10, 0, &[3; 10])), Piece::Buffered);
        assert_eq!(r.peek(), Some(&[1u8; 10][..]));
        assert_eq!(r.consume(&mut Vec::new()), 0);
        assert_eq!(r.data(2, &data_body(2, 10, 0, &[2; 10])), Piece::Taken);
        assert_eq!(r.peek(), Some(&[2u8; 10][..]));
        assert_eq!(r.consume(&mut Vec::new()), 0);
        assert_eq!(r.peek(), Some(&[3u8; 10][..]));
    }

    #[test]
    fn inconsistent_pieces_are_refused() {
        let mut r = Reassembly::<Vec<u8>>::new(4096, 8, 64);
        // Inconsistent pieces.
        assert_eq!(r.data(1, &data_body(1, 100, 10, &[1; 10])), Piece::Garbage);
        assert_eq!(r.data(1, &data_body(1, 0, 0, &[])), Piece::Garbage);
        assert_eq!(r.data(1, &data_body(1, 5000, 0, &[1; 10])), Piece::Garbage);
        assert_eq!(r.data(1, &data_body(1, 10, 5, &[1; 10])), Piece::Garbage);
        let mut short = data_body(1, 100, 0, &[1; 10]);
        short.truncate(DATA_HDR + 5);
        assert_eq!(r.data(1, &short), Piece::Garbage);
        // Arbitrary packets mixed with genuine ones, through the classifier and the
        // reassembly, with what must hold of them (garbage counted and never delivered, and
        // nothing delivered but the genuine frames, whole, in order and once): the corpus test
        // of `transport::fuzz::dpdk_packets`.
        assert_eq!(r.expected, 1);
        assert!(r.peek().is_none());
    }
}
