//! The two ends of the DPDK link: [`DpdkPrimaryLink`] (sending, retransmission) and
//! [`DpdkBackupLink`] (receiving, ACKs).

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpdk_sys::{Mbuf, ETHER_HDR_LEN};

use super::codec::{classify, u64_at, DataHead, ACK_HDR, DATA_HDR, T_ACK, T_DATA, T_NACK};
use super::reassembly::{Piece, Reassembly};
use super::wire::{Sent, Wire};
use super::{DpdkConfig, DpdkStats};
use crate::channel::{Ack, BackupLink, BackupNews, PrimaryLink};
use crate::control;
use crate::error::ChannelError;
use crate::poll::PollPolicy;

/// Empty primary polls between two reads of the clock for the retransmission timer (a poll
/// takes tens of nanoseconds, so the timer is late by a few microseconds at most).
const TIMER_POLLS: u32 = 64;
/// One DATA packet in this many (by sequence number) is timed for the RTT estimate.
const RTT_SAMPLE_EVERY: u64 = 8;

/// A DATA packet kept until acknowledged.
#[derive(Debug)]
pub(super) struct Outstanding {
    pub(super) seq: u64,
    /// The whole Ethernet frame.
    pub(super) bytes: Vec<u8>,
    /// Whether it was handed to the port.
    pub(super) sent: bool,
    /// When it was first handed to the port, for packets that give an RTT sample (one in
    /// [`RTT_SAMPLE_EVERY`]: the clock is read only for those).
    pub(super) sent_at: Option<Instant>,
    /// Whether it was sent more than once (no RTT sample then: Karn's rule).
    pub(super) resent: bool,
}

/// The primary's DPDK link.
#[derive(Debug)]
pub struct DpdkPrimaryLink {
    pub(super) wire: Wire,
    pub(super) control: TcpStream,
    pub(super) cfg: DpdkConfig,
    /// Sent (or to be sent) and not yet acknowledged, oldest first.
    pub(super) unacked: VecDeque<Outstanding>,
    /// Index in `unacked` of the next packet to (re)send.
    pub(super) next_send: usize,
    /// Sequence number of the next new DATA packet.
    pub(super) next_seq: u64,
    /// Spare packet buffers.
    pub(super) free: Vec<Vec<u8>>,
    /// Current retransmission timeout, and the estimate it falls back to on progress.
    pub(super) rto: Duration,
    pub(super) rto_base: Duration,
    /// Smoothed round-trip time and its mean deviation, in nanoseconds (0: no sample yet).
    pub(super) srtt_ns: u64,
    pub(super) rttvar_ns: u64,
    /// When the retransmission timer was last started (progress, or a resend).
    pub(super) timer: Instant,
    /// Progress (an ACK, or a new packet after an idle spell) since the timer was last
    /// checked: the timer restarts at the next check instead of reading the clock now.
    pub(super) progress: bool,
    /// The cumulative ACK of the last NACK acted on (a repeat for the same gap is ignored).
    pub(super) last_nack: u64,
    /// The oldest unacknowledged packet is to be sent again before anything new.
    pub(super) resend_front: bool,
    /// Polls since the retransmission timer was last checked (the clock is read only every
    /// [`TIMER_POLLS`] empty polls: a busy loop stays cheap).
    pub(super) polls: u32,
    /// An offer was refused for lack of window since the last progress.
    pub(super) blocked: bool,
    pub(super) epoch: u64,
}

impl DpdkPrimaryLink {
    /// Counters of this side.
    pub fn stats(&self) -> &Arc<DpdkStats> {
        &self.cfg.stats
    }

    /// Sends queued packets from `next_send`; returns whether all went.
    fn transmit(&mut self) -> Result<bool, ChannelError> {
        let mut now = None;
        if self.resend_front {
            if let Some(p) = self.unacked.front_mut() {
                if p.sent {
                    match self.wire.send(&p.bytes)? {
                        Sent::Yes => {
                            p.resent = true;
                            DpdkStats::inc(&self.cfg.stats.retransmits);
                        }
                        Sent::Full => return Ok(false),
                    }
                }
            }
            self.resend_front = false;
        }
        while let Some(p) = self.unacked.get_mut(self.next_send) {
            match self.wire.send(&p.bytes)? {
                Sent::Yes => {
                    self.next_send += 1;
                    if p.sent {
                        p.resent = true;
                    } else {
                        p.sent = true;
                        if p.seq.is_multiple_of(RTT_SAMPLE_EVERY) {
                            p.sent_at = Some(*now.get_or_insert_with(Instant::now));
                        }
                    }
                }
                Sent::Full => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Sends the oldest unacknowledged packet again (the one the backup is missing).
    fn resend_oldest(&mut self) {
        self.resend_front = true;
        self.timer = Instant::now();
    }

    /// Drops every packet up to `ack` from the window; returns whether any was dropped.
    fn acknowledge(&mut self, ack: u64) -> bool {
        let mut any = false;
        let mut sample_from = None;
        while self.unacked.front().is_some_and(|p| p.seq <= ack) {
            if let Some(p) = self.unacked.pop_front() {
                if !p.resent {
                    sample_from = p.sent_at.or(sample_from);
                }
                self.free.push(p.bytes);
            }
            self.next_send = self.next_send.saturating_sub(1);
            any = true;
        }
        if any {
            if let Some(sent) = sample_from {
                let now = Instant::now();
                self.rtt_sample(now.duration_since(sent));
            }
            self.rto = self.rto_base;
            self.progress = true;
            self.blocked = false;
        }
        any
    }

    /// Updates the RTT estimate (Jacobson/Karels) and the base timeout derived from it.
    fn rtt_sample(&mut self, rtt: Duration) {
        let r = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX / 8);
        if self.srtt_ns == 0 {
            self.srtt_ns = r.max(1);
            self.rttvar_ns = r / 2;
        } else {
            self.rttvar_ns = (3 * self.rttvar_ns + self.srtt_ns.abs_diff(r)) / 4;
            self.srtt_ns = (7 * self.srtt_ns + r) / 8;
        }
        let rto = Duration::from_nanos(self.srtt_ns.saturating_add(4 * self.rttvar_ns));
        self.rto_base = rto.clamp(self.cfg.rto_initial, self.cfg.rto_max);
    }
}

impl PrimaryLink for DpdkPrimaryLink {
    fn offer(&mut self, frame: &[u8]) -> Result<bool, ChannelError> {
        let piece = self.cfg.piece_len();
        let pieces = frame.len().div_ceil(piece).max(1);
        if self.unacked.len() + pieces > self.cfg.window {
            // Blocked on the window: from now on the timer is checked on every poll (a caller
            // that waits between polls may take long for TIMER_POLLS of them).
            self.blocked = true;
            return Ok(false);
        }
        let total = u32::try_from(frame.len()).map_err(|_| ChannelError::FrameTooLarge {
            len: frame.len(),
            max: u32::MAX as usize,
        })?;
        if self.unacked.is_empty() {
            self.progress = true;
        }
        // Nothing queued before this frame: its packets go straight from `frame` into mbufs,
        // and the copies kept for retransmission are made after they left (off the latency
        // path).
        let mut direct = !self.resend_front && self.next_send == self.unacked.len();
        let mut offset = 0usize;
        loop {
            let chunk = &frame[offset..(offset + piece).min(frame.len())];
            let seq = self.next_seq;
            self.next_seq += 1;
            let head = DataHead {
                seq,
                total,
                // Both fit: offset < total (u32), chunk <= piece < mtu <= u16::MAX.
                offset: offset as u32,
                len: chunk.len() as u16,
            };
            let len = ETHER_HDR_LEN + DATA_HDR + chunk.len();
            let mut sent = false;
            if direct {
                crate::trace::primary(crate::trace::PrimaryPoint::Sent);
                let (peer, mac, tag) = (self.wire.peer, self.wire.mac, self.wire.tag);
                match self
                    .wire
                    .send_with(len, |b| head.write(b, peer, mac, tag, chunk))?
                {
                    Sent::Yes => sent = true,
                    Sent::Full => direct = false,
                }
            }
            let mut buf = self.free.pop().unwrap_or_default();
            buf.clear();
            buf.resize(len, 0);
            head.write(
                &mut buf,
                self.wire.peer,
                self.wire.mac,
                self.wire.tag,
                chunk,
            );
            let sent_at = (sent && seq.is_multiple_of(RTT_SAMPLE_EVERY)).then(Instant::now);
            self.unacked.push_back(Outstanding {
                seq,
                bytes: buf,
                sent,
                sent_at,
                resent: false,
            });
            if sent {
                self.next_send += 1;
            }
            offset += chunk.len();
            if offset >= frame.len() {
                break;
            }
        }
        if !direct {
            self.transmit()?;
        }
        self.wire.refill();
        Ok(true)
    }

    fn flush(&mut self) -> Result<bool, ChannelError> {
        if !self.resend_front && self.next_send == self.unacked.len() {
            return Ok(true);
        }
        self.transmit()
    }

    fn poll(&mut self) -> Result<BackupNews, ChannelError> {
        let mut news = BackupNews::default();
        let n = self.wire.receive();
        let rx = std::mem::take(&mut self.wire.rx);
        let mut nack: Option<u64> = None;
        for m in rx.iter().take(n) {
            let Some((kind, ack, body)) = classify(
                self.wire.mac,
                self.wire.peer,
                self.wire.tag,
                &self.cfg.stats,
                m.data(),
            ) else {
                continue;
            };
            if (kind != T_ACK && kind != T_NACK) || body.len() < ACK_HDR || ack >= self.next_seq {
                DpdkStats::inc(&self.cfg.stats.garbage);
                continue;
            }
            let log_acked = u64_at(body, 16);
            let epoch = u64_at(body, 24);
            let replayed = u64_at(body, 32);
            if epoch > self.epoch {
                self.wire.rx = rx;
                return Err(ChannelError::StaleEpoch {
                    frame: self.epoch,
                    current: epoch,
                });
            }
            news.heard = true;
            news.acked = Some(news.acked.map_or(log_acked, |a| a.max(log_acked)));
            news.replayed = Some(news.replayed.map_or(replayed, |r| r.max(replayed)));
            self.acknowledge(ack);
            if kind == T_NACK {
                nack = Some(ack);
            }
        }
        // The ACK packets stay in `rx` until the next receive frees them: freeing them is not
        // on the way to the waiting commit.
        self.wire.rx = rx;
        // A NACK: the backup holds later packets but misses the one after `ack`; resend it at
        // once (once per gap).
        if let Some(ack) = nack {
            if self.unacked.front().is_some_and(|p| p.seq == ack + 1) && self.last_nack != ack {
                self.last_nack = ack;
                DpdkStats::inc(&self.cfg.stats.nacks);
                self.resend_oldest();
            }
        }
        // Timeout: resend the oldest unacknowledged packet (the backup keeps later ones).
        // The clock is read every TIMER_POLLS polls only; progress since the last check
        // restarts the timer then.
        self.polls = self.polls.wrapping_add(1);
        if self.blocked || self.polls.is_multiple_of(TIMER_POLLS) {
            let now = Instant::now();
            if std::mem::take(&mut self.progress) || self.unacked.is_empty() {
                self.timer = now;
            } else if self.next_send > 0 && now.duration_since(self.timer) >= self.rto {
                DpdkStats::inc(&self.cfg.stats.timeouts);
                self.resend_oldest();
                self.rto = (self.rto * 2).min(self.cfg.rto_max);
                // A timeout may be a lost NACK for the same gap: allow a new one.
                self.last_nack = u64::MAX;
            }
        }
        if self.resend_front || self.next_send < self.unacked.len() {
            self.transmit()?;
        }
        Ok(news)
    }

    fn check_peer(&mut self) -> Result<(), ChannelError> {
        control::check_peer(&mut self.control, "DPDK")
    }

    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        // Nothing to sleep on for a polled port.
        Ok(PollPolicy::nap(timeout))
    }
}

/// The backup's DPDK link.
#[derive(Debug)]
pub struct DpdkBackupLink {
    /// Before `wire`: fields drop in order, and frames kept in their mbufs go back to the
    /// port's pool before the port and pool handles do.
    pub(super) frames: Reassembly,
    /// Consumed frames' mbufs, freed after the ACK for them went out (freeing is not on the
    /// way to the ACK).
    pub(super) spent: Vec<Mbuf>,
    pub(super) wire: Wire,
    pub(super) control: TcpStream,
    pub(super) cfg: DpdkConfig,
    /// The last log ACK (with the epoch and replay position) the channel published.
    pub(super) log: Ack,
    /// The gap (value of `expected`) a NACK was last sent for.
    pub(super) nacked: u64,
    /// A packet ACK is owed: DATA arrived that completed a log frame, and the channel's log
    /// ACK for it (which carries the packet ACK too) is expected next. Sent on its own only if
    /// the channel does not ACK before the next receive.
    pub(super) ack_owed: bool,
}

impl DpdkBackupLink {
    /// Counters of this side.
    pub fn stats(&self) -> &Arc<DpdkStats> {
        &self.cfg.stats
    }

    fn send_ack(&mut self, kind: u8) -> Result<(), ChannelError> {
        self.ack_owed = false;
        // An ACK that finds no room is not retried: a later one supersedes it.
        self.wire
            .send_ack(kind, self.frames.expected - 1, self.log)
            .map(|_| ())
    }
}

impl BackupLink for DpdkBackupLink {
    fn peek(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        Ok(self.frames.peek())
    }

    fn receive(&mut self) -> Result<bool, ChannelError> {
        if self.ack_owed {
            // The channel did not acknowledge the frame it was handed (its buffer is full):
            // acknowledge the packets on their own, so the primary does not resend them.
            self.send_ack(T_ACK)?;
        }
        self.spent.clear();
        let n = self.wire.receive();
        if n == 0 {
            return Ok(false);
        }
        let mut rx = std::mem::take(&mut self.wire.rx);
        let mut took = false;
        let mut answer = false;
        let stats = &self.cfg.stats;
        for m in rx.drain(..) {
            let Some((kind, seq, _)) = classify(
                self.wire.mac,
                self.wire.peer,
                self.wire.tag,
                stats,
                m.data(),
            ) else {
                continue;
            };
            if kind != T_DATA {
                DpdkStats::inc(&stats.garbage);
                continue;
            }
            answer = true;
            crate::trace::backup_arrived();
            let m = match self.frames.data_whole(seq, m) {
                Ok(()) => {
                    took = true;
                    continue;
                }
                Err(m) => m,
            };
            let body = m.data().get(ETHER_HDR_LEN..).unwrap_or(&[]);
            match self.frames.data(seq, body) {
                Piece::Taken => took = true,
                Piece::Duplicate => DpdkStats::inc(&stats.duplicates),
                Piece::Buffered => DpdkStats::inc(&stats.out_of_order),
                Piece::Gap => {
                    DpdkStats::inc(&stats.out_of_order);
                    DpdkStats::inc(&stats.too_far);
                }
                Piece::Backlogged => DpdkStats::inc(&stats.backlogged),
                Piece::Garbage => DpdkStats::inc(&stats.garbage),
            }
        }
        rx.clear();
        self.wire.rx = rx;
        // After a gap, one NACK per missing packet (the next one after a refill draws its own).
        if self.frames.has_gap() && self.nacked != self.frames.expected {
            self.nacked = self.frames.expected;
            DpdkStats::inc(&self.cfg.stats.nacks);
            self.send_ack(T_NACK)?;
        } else if took && self.frames.peek().is_some() {
            // A complete log frame is waiting: the channel takes it and calls `ack` at once,
            // and that one packet carries both the packet ACK and the log ACK (one ACK per
            // commit instead of two).
            self.ack_owed = true;
        } else if answer {
            self.send_ack(T_ACK)?;
        }
        Ok(took)
    }

    fn consume(&mut self) -> Result<(), ChannelError> {
        let bad = self.frames.consume(&mut self.spent);
        if bad > 0 {
            let g = &self.cfg.stats.garbage;
            g.store(
                g.load(Ordering::Relaxed).wrapping_add(bad),
                Ordering::Relaxed,
            );
        }
        Ok(())
    }

    fn ack(&mut self, ack: Ack) -> Result<(), ChannelError> {
        self.log = ack;
        let sent = self.send_ack(T_ACK);
        self.spent.clear();
        self.wire.refill();
        sent
    }

    fn check_peer(&mut self) -> Result<(), ChannelError> {
        if self.ack_owed {
            self.send_ack(T_ACK)?;
        }
        control::check_peer(&mut self.control, "DPDK")
    }

    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        if self.ack_owed {
            self.send_ack(T_ACK)?;
        }
        Ok(PollPolicy::nap(timeout))
    }
}
