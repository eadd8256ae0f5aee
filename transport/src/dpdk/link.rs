//! The two ends of the DPDK link: [`DpdkPrimaryLink`] (sending; the retransmission state it
//! drives is `retransmit`'s, which does no I/O) and
//! [`DpdkBackupLink`] (receiving, ACKs).

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpdk_sys::{Mbuf, ETHER_HDR_LEN};

use super::codec::{classify, u64_at, DataHead, ACK_HDR, DATA_HDR, T_ACK, T_NACK};
use super::reassembly::{Packet, Reassembly};
use super::retransmit::{Retransmit, Went};
use super::wire::{Sent, Wire};
use super::{DpdkConfig, DpdkStats};
use crate::auth::ACK_SEAL_LEN;
use crate::channel::{Ack, BackupLink, BackupNews, PrimaryLink};
use crate::control;
use crate::error::ChannelError;
use crate::poll::PollPolicy;

impl Packet for Mbuf {
    fn data(&self) -> &[u8] {
        Mbuf::data(self)
    }
}

/// The primary's DPDK link: the packet I/O around its retransmission state (`Retransmit`).
#[derive(Debug)]
pub struct DpdkPrimaryLink {
    pub(super) wire: Wire,
    pub(super) control: TcpStream,
    pub(super) cfg: DpdkConfig,
    /// The packets sent and not yet acknowledged, and what to send again when.
    pub(super) rt: Retransmit,
    pub(super) epoch: u64,
    /// Checks every ACK/NACK packet's seal (crypto `auth`); a packet whose seal fails is
    /// dropped and counted (on a shared L2 segment anyone can send one, and the next real ACK
    /// supersedes it).
    pub(super) acks: Option<crate::auth::AckOpener>,
}

impl DpdkPrimaryLink {
    /// Counters of this side.
    pub fn stats(&self) -> &Arc<DpdkStats> {
        &self.cfg.stats
    }

    /// Hands the pending packets (a resend first, then those queued) to the port; returns
    /// whether all went.
    fn transmit(&mut self) -> Result<bool, ChannelError> {
        let mut now = None;
        while let Some(bytes) = self.rt.pending() {
            match self.wire.send(bytes)? {
                Sent::Yes => {
                    if self.rt.sent(|| *now.get_or_insert_with(Instant::now)) == Some(Went::Resend)
                    {
                        DpdkStats::inc(&self.cfg.stats.retransmits);
                    }
                }
                Sent::Full => return Ok(false),
            }
        }
        Ok(true)
    }
}

impl PrimaryLink for DpdkPrimaryLink {
    fn offer(&mut self, frame: &[u8]) -> Result<bool, ChannelError> {
        let piece = self.cfg.piece_len();
        let pieces = frame.len().div_ceil(piece).max(1);
        if !self.rt.admit(pieces) {
            // Blocked on the window (the channel's backpressure).
            return Ok(false);
        }
        let total = u32::try_from(frame.len()).map_err(|_| ChannelError::FrameTooLarge {
            len: frame.len(),
            max: u32::MAX as usize,
        })?;
        // Nothing queued before this frame: its packets go straight from `frame` into mbufs,
        // and the copies kept for retransmission are made after they left (off the latency
        // path).
        let mut direct = self.rt.start_frame();
        let mut offset = 0usize;
        loop {
            let chunk = &frame[offset..(offset + piece).min(frame.len())];
            let seq = self.rt.next_seq();
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
                    .send_with(len, |b| head.write(b, peer.0, mac.0, tag, chunk))?
                {
                    Sent::Yes => sent = true,
                    Sent::Full => direct = false,
                }
            }
            let mut buf = self.rt.buffer();
            buf.clear();
            buf.resize(len, 0);
            head.write(
                &mut buf,
                self.wire.peer.0,
                self.wire.mac.0,
                self.wire.tag,
                chunk,
            );
            self.rt.push(buf, sent, Instant::now);
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
        if !self.rt.has_pending() {
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
                self.wire.mac.0,
                self.wire.peer.0,
                self.wire.tag,
                &self.cfg.stats,
                m.data(),
            ) else {
                continue;
            };
            if (kind != T_ACK && kind != T_NACK)
                || body.len() < ACK_HDR
                || ack >= self.rt.next_seq()
            {
                DpdkStats::garbage(&self.cfg.stats.garbage, 1);
                continue;
            }
            if let Some(opener) = &mut self.acks {
                let sealed = body
                    .get(ACK_HDR..ACK_HDR + ACK_SEAL_LEN)
                    .ok_or_else(|| ChannelError::Unauthenticated {
                        what: "ACK",
                        reason: "an ACK packet without its seal".into(),
                    })
                    .and_then(|seal| opener.open_msg(&body[..ACK_HDR], seal));
                if let Err(e) = sealed {
                    tracing::debug!("dropped an ACK packet: {e}");
                    ftvm_metrics::METRICS.rejected(ftvm_metrics::RejectCause::Unauthenticated);
                    continue;
                }
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
            self.rt.acknowledge(ack, Instant::now);
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
            if self.rt.nack(ack, Instant::now) {
                DpdkStats::inc(&self.cfg.stats.nacks);
            }
        }
        // Timeout: resend the oldest unacknowledged packet (the backup keeps later ones). The
        // clock is read every few polls only.
        if self.rt.tick(Instant::now) {
            DpdkStats::inc(&self.cfg.stats.timeouts);
        }
        if self.rt.has_pending() {
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

    fn seal_acks(&mut self, opener: crate::auth::AckOpener) {
        self.acks = Some(opener);
    }
}

/// The backup's DPDK link.
#[derive(Debug)]
pub struct DpdkBackupLink {
    /// Before `wire`: fields drop in order, and frames kept in their mbufs go back to the
    /// port's pool before the port and pool handles do.
    pub(super) frames: Reassembly<Mbuf>,
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
    /// Seals every ACK/NACK packet (crypto `auth`).
    pub(super) sealer: Option<crate::auth::AckSealer>,
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
            .send_ack(
                kind,
                self.frames.expected - 1,
                self.log,
                self.sealer.as_mut(),
            )
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
            let (mac, peer, tag) = (self.wire.mac.0, self.wire.peer.0, self.wire.tag);
            if let Some(taken) = self.frames.packet(mac, peer, tag, stats, m) {
                answer = true;
                took |= taken;
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
            DpdkStats::garbage(&self.cfg.stats.garbage, bad);
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

    fn seal_acks(&mut self, sealer: crate::auth::AckSealer) {
        self.sealer = Some(sealer);
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
