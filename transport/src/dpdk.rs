//! The DPDK medium: log frames as raw Ethernet frames (ethertype [`ETHERTYPE_FTVM`]) over a
//! DPDK port, with reliable in-order delivery on top of a lossy link.
//!
//! Set-up runs over a TCP control connection, like [`crate::shm`] runs over a Unix socket: the
//! PSK handshake first; the backup's welcome carries its MAC address, a random link tag and its
//! MTU; the primary answers with its own MAC address. The control connection stays open: its
//! end-of-file tells each side at once that the other process died (`check_peer`); heartbeats
//! cover a hung peer.
//!
//! # Wire format
//!
//! Every packet is a 14-byte Ethernet header (dst, src, ethertype 0x88B5) followed by
//!
//! ```text
//! off len  field
//!   0   2  magic "FL"
//!   2   1  version (1)
//!   3   1  type: 1 DATA, 2 ACK, 3 NACK
//!   4   4  link tag (random, chosen by the backup per connection; little-endian)
//!   8   8  DATA: this packet's sequence number (from 1, per direction)
//!          ACK/NACK: cumulative packet ACK (every DATA packet up to this one arrived in order)
//! DATA:
//!  16   4  length of the whole log frame this packet carries a piece of
//!  20   4  offset of this piece in the log frame
//!  24   2  length of this piece
//!  26   2  reserved (0)
//!  28      the piece
//! ACK/NACK:
//!  16   8  the channel's cumulative log ACK (`BackupLink::ack`)
//!  24   8  the backup's epoch
//! ```
//!
//! # Reliability
//!
//! Selective repeat with cumulative ACKs: the primary keeps every sent, unacknowledged packet
//! (at most [`DpdkConfig::window`]; `offer` answers `Ok(false)` when a frame's pieces do not
//! fit, which is the channel's backpressure). The backup takes DATA packets in order, keeps
//! packets that arrive after a gap (up to a window ahead) until the gap is filled, drops
//! duplicates, and answers every burst with a cumulative ACK that also carries the newest log
//! ACK. While packets wait behind a gap, the backup sends one NACK per missing packet, and the
//! primary resends that packet at once. Otherwise the primary resends its oldest
//! unacknowledged packet when nothing was acknowledged for the retransmission timeout (srtt +
//! 4 × rttvar within [`DpdkConfig::rto_initial`]..=[`DpdkConfig::rto_max`], doubling while
//! nothing is acknowledged). The backup hands only complete log frames to the channel, in order.
//!
//! Packets with our ethertype that do not parse (or carry another link tag, or come from
//! another MAC) are counted in [`DpdkStats::garbage`] and ignored.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpdk_sys::{DpdkError, EtherAddr, Mbuf, Mempool, Port, ETHERTYPE_FTVM, ETHER_HDR_LEN};

use crate::channel::{Backup, BackupLink, BackupNews, ChannelConfig, Primary, PrimaryLink};
use crate::error::ChannelError;
use crate::handshake::{self, MediumKind};

/// Our header after the Ethernet header: magic.
const MAGIC: [u8; 2] = *b"FL";
/// Wire format version.
const VERSION: u8 = 1;
const T_DATA: u8 = 1;
const T_ACK: u8 = 2;
const T_NACK: u8 = 3;
/// Length of our header in a DATA packet.
const DATA_HDR: usize = 28;
/// Length of our header (and body) in an ACK/NACK packet.
const ACK_HDR: usize = 32;
/// Bytes a DATA packet adds to the piece it carries, after the Ethernet header.
pub const DATA_HEADER_LEN: usize = DATA_HDR;
/// Bytes of an ACK/NACK packet after the Ethernet header.
pub const ACK_LEN: usize = ACK_HDR;
/// Marks the welcome's medium info as ours (the handshake's medium kind is shared with TCP).
const INFO_MAGIC: &[u8; 8] = b"FTVMDPDK";
/// Medium info: magic, MAC (6), link tag (4), MTU (2).
const INFO_LEN: usize = 8 + 6 + 4 + 2;
/// The primary's answer to the welcome: 'M', its MAC.
const MAC_MSG_LEN: usize = 7;
/// Frames at most this many received packets per `rx_burst`.
const BURST: usize = 32;
/// Empty primary polls between two reads of the clock for the retransmission timer (a poll
/// takes tens of nanoseconds, so the timer is late by a few microseconds at most).
const TIMER_POLLS: u32 = 64;
/// One DATA packet in this many (by sequence number) is timed for the RTT estimate.
const RTT_SAMPLE_EVERY: u64 = 8;
/// Smallest MTU we accept (a piece must hold something useful).
const MIN_MTU: usize = 256;

/// Medium-specific settings, next to the [`ChannelConfig`].
#[derive(Debug, Clone)]
pub struct DpdkConfig {
    /// Ethernet payload size (our header included), at most what the port carries; default 1500.
    pub mtu: usize,
    /// Most DATA packets sent but not yet acknowledged (primary); must hold the pieces of a
    /// largest log frame.
    pub window: usize,
    /// Smallest retransmission timeout (the timeout follows the measured round-trip time,
    /// srtt + 4 × rttvar, within `rto_initial..=rto_max`, and doubles while nothing is
    /// acknowledged).
    pub rto_initial: Duration,
    /// Cap of the retransmission timeout.
    pub rto_max: Duration,
    /// Most complete log frames the backup keeps waiting for the channel; DATA beyond that is
    /// dropped (and resent by the primary later).
    pub backlog_frames: usize,
    /// Test hook: drop every Nth packet this side sends (counted in [`DpdkStats::test_dropped`]).
    pub drop_every: Option<u32>,
    /// How long `connect`/`accept` wait for the port's link to come up.
    pub link_timeout: Duration,
    /// Counters of one channel end, shared with whoever holds a clone of this `Arc` (give each
    /// end its own: only the thread driving an end may count into it).
    pub stats: Arc<DpdkStats>,
}

impl Default for DpdkConfig {
    fn default() -> Self {
        DpdkConfig {
            mtu: 1500,
            window: 256,
            rto_initial: Duration::from_micros(200),
            rto_max: Duration::from_millis(5),
            backlog_frames: 256,
            drop_every: None,
            link_timeout: Duration::from_secs(10),
            stats: Arc::new(DpdkStats::default()),
        }
    }
}

impl DpdkConfig {
    fn piece_len(&self) -> usize {
        self.mtu - DATA_HDR
    }

    fn validate(&self, channel: &ChannelConfig) -> Result<(), ChannelError> {
        if self.mtu < MIN_MTU || self.mtu > usize::from(u16::MAX) {
            return Err(ChannelError::Config(format!(
                "DPDK MTU {} outside {MIN_MTU}..=65535",
                self.mtu
            )));
        }
        let pieces = channel.max_frame_bytes.div_ceil(self.piece_len());
        if self.window < pieces {
            return Err(ChannelError::Config(format!(
                "DPDK window of {} packets cannot hold a {}-byte frame ({pieces} packets)",
                self.window, channel.max_frame_bytes
            )));
        }
        if self.rto_initial.is_zero() || self.rto_max < self.rto_initial {
            return Err(ChannelError::Config(
                "DPDK retransmission timeouts must be > 0 and rto_max >= rto_initial".into(),
            ));
        }
        if self.backlog_frames == 0 {
            return Err(ChannelError::Config(
                "DPDK backlog must be at least 1".into(),
            ));
        }
        if self.drop_every == Some(0) {
            return Err(ChannelError::Config("drop_every must be at least 1".into()));
        }
        Ok(())
    }
}

/// Counters of one side of the DPDK medium.
#[derive(Debug, Default)]
pub struct DpdkStats {
    /// Packets handed to the port (retransmissions included, test drops excluded).
    pub tx_packets: AtomicU64,
    /// Packets with our ethertype received.
    pub rx_packets: AtomicU64,
    /// DATA packets sent again.
    pub retransmits: AtomicU64,
    /// Retransmission timeouts that fired.
    pub timeouts: AtomicU64,
    /// NACKs sent (backup) or acted on (primary).
    pub nacks: AtomicU64,
    /// Packets not sent because of [`DpdkConfig::drop_every`].
    pub test_dropped: AtomicU64,
    /// Received packets with our ethertype that did not parse, or came from the wrong peer.
    pub garbage: AtomicU64,
    /// DATA packets received again (already delivered), dropped.
    pub duplicates: AtomicU64,
    /// DATA packets received after a gap (kept until the gap is filled, unless too far ahead).
    pub out_of_order: AtomicU64,
    /// DATA packets received more than a window ahead of a gap, dropped.
    pub too_far: AtomicU64,
    /// DATA packets dropped because the backup's backlog was full.
    pub backlogged: AtomicU64,
    /// Received packets of other ethertypes, or sent by this side (seen again), ignored.
    pub foreign: AtomicU64,
    /// Times the port or the mempool could not take a packet right now.
    pub tx_full: AtomicU64,
}

impl DpdkStats {
    /// Counts one. Each side's counters are written by the thread that drives its link only
    /// (share one `DpdkStats` between the two ends of a channel and counts may be lost), so a
    /// plain load and store does: no locked read-modify-write per packet.
    fn inc(counter: &AtomicU64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }

    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

fn dpdk_err(context: &'static str, e: DpdkError) -> ChannelError {
    ChannelError::Io {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}

fn with_timeouts(stream: &TcpStream, t: Duration) -> Result<(), ChannelError> {
    let io = |e| ChannelError::io("setting control socket timeouts", e);
    stream.set_read_timeout(Some(t)).map_err(io)?;
    stream.set_write_timeout(Some(t)).map_err(io)?;
    let _ = stream.set_nodelay(true);
    Ok(())
}

/// Checks the control socket without blocking: end-of-file means the peer process is gone.
fn check_socket(stream: &mut TcpStream) -> Result<(), ChannelError> {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => Err(ChannelError::PeerClosed),
        Ok(_) => Err(ChannelError::CorruptMessage(
            "unexpected data on the DPDK control socket".into(),
        )),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(()),
        Err(e) => Err(ChannelError::io("checking the control socket", e)),
    }
}

fn wait_link(port: &Port, timeout: Duration) -> Result<(), ChannelError> {
    let start = Instant::now();
    loop {
        if port
            .link()
            .map_err(|e| dpdk_err("reading the port's link status", e))?
            .up
        {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(ChannelError::Timeout {
                what: "the DPDK port's link to come up",
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn random_u32() -> Result<u32, ChannelError> {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b)
        .map_err(|e| ChannelError::io("random link tag", std::io::Error::other(e.to_string())))?;
    Ok(u32::from_le_bytes(b))
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// One port, its peer, and the packet I/O both sides share.
struct Wire {
    /// Received mbufs; before `port` and `pool` so they are freed first.
    rx: Vec<Mbuf>,
    /// An mbuf allocated ahead, after the last send, so the next send does not wait for the
    /// pool (see [`Wire::refill`]).
    spare: Option<Mbuf>,
    port: Port,
    pool: Mempool,
    mac: EtherAddr,
    peer: EtherAddr,
    tag: u32,
    drop_every: Option<u32>,
    sent_count: u64,
    stats: Arc<DpdkStats>,
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wire")
            .field("port", &self.port)
            .field("mac", &self.mac.to_string())
            .field("peer", &self.peer.to_string())
            .field("tag", &self.tag)
            .finish()
    }
}

/// What the test hook and the port did with a packet.
enum Sent {
    /// Handed to the port (or dropped by the test hook, which counts as sent).
    Yes,
    /// The port or the mempool had no room; try again later.
    Full,
}

/// The fields of a DATA packet's header.
#[derive(Debug, Clone, Copy)]
struct DataHead {
    seq: u64,
    total: u32,
    offset: u32,
    len: u16,
}

impl DataHead {
    /// Writes the whole packet (Ethernet header, our header, `piece`) into `b`, which is
    /// exactly `ETHER_HDR_LEN + DATA_HDR + piece.len()` bytes long.
    fn write(&self, b: &mut [u8], peer: EtherAddr, mac: EtherAddr, tag: u32, piece: &[u8]) {
        b[0..6].copy_from_slice(&peer.0);
        b[6..12].copy_from_slice(&mac.0);
        b[12..14].copy_from_slice(&ETHERTYPE_FTVM.to_be_bytes());
        let h = &mut b[ETHER_HDR_LEN..];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = VERSION;
        h[3] = T_DATA;
        h[4..8].copy_from_slice(&tag.to_le_bytes());
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..20].copy_from_slice(&self.total.to_le_bytes());
        h[20..24].copy_from_slice(&self.offset.to_le_bytes());
        h[24..26].copy_from_slice(&self.len.to_le_bytes());
        h[26..28].copy_from_slice(&[0, 0]);
        h[DATA_HDR..].copy_from_slice(piece);
    }
}

impl Wire {
    /// Sends one complete Ethernet frame (copied into an mbuf).
    fn send(&mut self, frame: &[u8]) -> Result<Sent, ChannelError> {
        self.send_with(frame.len(), |b| b.copy_from_slice(frame))
    }

    /// Sends an ACK or NACK, written straight into the mbuf.
    fn send_ack(
        &mut self,
        kind: u8,
        ack: u64,
        log_acked: u64,
        epoch: u64,
    ) -> Result<Sent, ChannelError> {
        let (peer, mac, tag) = (self.peer, self.mac, self.tag);
        self.send_with(ETHER_HDR_LEN + ACK_HDR, |b| {
            b[0..6].copy_from_slice(&peer.0);
            b[6..12].copy_from_slice(&mac.0);
            b[12..14].copy_from_slice(&ETHERTYPE_FTVM.to_be_bytes());
            let h = &mut b[ETHER_HDR_LEN..];
            h[0..2].copy_from_slice(&MAGIC);
            h[2] = VERSION;
            h[3] = kind;
            h[4..8].copy_from_slice(&tag.to_le_bytes());
            h[8..16].copy_from_slice(&ack.to_le_bytes());
            h[16..24].copy_from_slice(&log_acked.to_le_bytes());
            h[24..32].copy_from_slice(&epoch.to_le_bytes());
        })
    }

    /// Sends one Ethernet frame of `len` bytes that `fill` writes into the mbuf.
    fn send_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Sent, ChannelError> {
        let mut m = match self
            .spare
            .take()
            .map_or_else(|| Mbuf::alloc(&self.pool), Ok)
        {
            Ok(m) => m,
            Err(DpdkError::PoolExhausted(_)) => {
                DpdkStats::inc(&self.stats.tx_full);
                return Ok(Sent::Full);
            }
            Err(e) => return Err(dpdk_err("allocating an mbuf", e)),
        };
        fill(m.append(len).map_err(|e| dpdk_err("filling an mbuf", e))?);
        if let Some(n) = self.drop_every {
            self.sent_count += 1;
            if self.sent_count.is_multiple_of(u64::from(n)) {
                DpdkStats::inc(&self.stats.test_dropped);
                return Ok(Sent::Yes);
            }
        }
        match self.port.tx_one(m) {
            Ok(()) => {
                DpdkStats::inc(&self.stats.tx_packets);
                Ok(Sent::Yes)
            }
            Err(_back) => {
                // Not sent: undo the test hook's count so the Nth packet stays the Nth.
                if self.drop_every.is_some() {
                    self.sent_count -= 1;
                }
                DpdkStats::inc(&self.stats.tx_full);
                Ok(Sent::Full)
            }
        }
    }

    /// Allocates the next send's mbuf now, while the last packet is in flight: taking an mbuf
    /// from the pool is then not on the way from a commit to its packet, nor from a frame to
    /// its ACK. (Pool exhaustion is left to the send itself to report.)
    fn refill(&mut self) {
        if self.spare.is_none() {
            self.spare = Mbuf::alloc(&self.pool).ok();
        }
    }

    /// Receives one burst into `self.rx`; returns how many packets arrived.
    fn receive(&mut self) -> usize {
        self.rx.clear();
        self.port.rx_burst(&mut self.rx)
    }

    /// Our header of a received packet, if it is ours and well-formed enough to look at:
    /// (type, sequence/ACK, body after the Ethernet header).
    fn classify<'a>(
        mac: EtherAddr,
        peer: EtherAddr,
        tag: u32,
        stats: &DpdkStats,
        data: &'a [u8],
    ) -> Option<(u8, u64, &'a [u8])> {
        // Other ethertypes, and our own frames seen again (an af_packet socket also sees what
        // its interface sends), are not for us.
        if data.len() < ETHER_HDR_LEN
            || data[12..14] != ETHERTYPE_FTVM.to_be_bytes()
            || data[6..12] == mac.0
        {
            DpdkStats::inc(&stats.foreign);
            return None;
        }
        DpdkStats::inc(&stats.rx_packets);
        let body = &data[ETHER_HDR_LEN..];
        let ok = data[0..6] == mac.0
            && data[6..12] == peer.0
            && body.len() >= 16
            && body[0..2] == MAGIC
            && body[2] == VERSION
            && u32_at(body, 4) == tag;
        if !ok {
            DpdkStats::inc(&stats.garbage);
            return None;
        }
        Some((body[3], u64_at(body, 8), body))
    }
}

/// A DATA packet kept until acknowledged.
#[derive(Debug)]
struct Outstanding {
    seq: u64,
    /// The whole Ethernet frame.
    bytes: Vec<u8>,
    /// Whether it was handed to the port.
    sent: bool,
    /// When it was first handed to the port, for packets that give an RTT sample (one in
    /// [`RTT_SAMPLE_EVERY`]: the clock is read only for those).
    sent_at: Option<Instant>,
    /// Whether it was sent more than once (no RTT sample then: Karn's rule).
    resent: bool,
}

/// The primary's DPDK link.
#[derive(Debug)]
pub struct DpdkPrimaryLink {
    wire: Wire,
    control: TcpStream,
    cfg: DpdkConfig,
    /// Sent (or to be sent) and not yet acknowledged, oldest first.
    unacked: VecDeque<Outstanding>,
    /// Index in `unacked` of the next packet to (re)send.
    next_send: usize,
    /// Sequence number of the next new DATA packet.
    next_seq: u64,
    /// Spare packet buffers.
    free: Vec<Vec<u8>>,
    /// Current retransmission timeout, and the estimate it falls back to on progress.
    rto: Duration,
    rto_base: Duration,
    /// Smoothed round-trip time and its mean deviation, in nanoseconds (0: no sample yet).
    srtt_ns: u64,
    rttvar_ns: u64,
    /// When the retransmission timer was last started (progress, or a resend).
    timer: Instant,
    /// Progress (an ACK, or a new packet after an idle spell) since the timer was last
    /// checked: the timer restarts at the next check instead of reading the clock now.
    progress: bool,
    /// The cumulative ACK of the last NACK acted on (a repeat for the same gap is ignored).
    last_nack: u64,
    /// The oldest unacknowledged packet is to be sent again before anything new.
    resend_front: bool,
    /// Polls since the retransmission timer was last checked (the clock is read only every
    /// [`TIMER_POLLS`] empty polls: a busy loop stays cheap).
    polls: u32,
    /// An offer was refused for lack of window since the last progress.
    blocked: bool,
    epoch: u64,
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
            let Some((kind, ack, body)) = Wire::classify(
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
            if epoch > self.epoch {
                self.wire.rx = rx;
                return Err(ChannelError::StaleEpoch {
                    frame: self.epoch,
                    current: epoch,
                });
            }
            news.heard = true;
            news.acked = Some(news.acked.map_or(log_acked, |a| a.max(log_acked)));
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
        check_socket(&mut self.control)
    }

    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        // Nothing to sleep on for a polled port; sleep briefly so blocking mode stays cheap.
        std::thread::sleep(timeout.min(Duration::from_micros(50)));
        Ok(false)
    }
}

/// What became of a received DATA packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
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
enum Ready {
    /// Reassembled from pieces (or copied out of a packet that came after a gap).
    Owned(Vec<u8>),
    /// Carried whole by one packet that arrived in order: kept in its mbuf, no copy.
    Held {
        mbuf: Mbuf,
        /// Where the frame starts in the mbuf's data, and its length.
        start: usize,
        len: usize,
    },
}

impl Ready {
    fn bytes(&self) -> &[u8] {
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
struct Reassembly {
    max_frame: usize,
    backlog: usize,
    /// How far ahead of `expected` packets are kept.
    window: u64,
    /// Bodies of packets that came after a gap, by sequence number.
    ahead: BTreeMap<u64, Vec<u8>>,
    /// Sequence number of the next DATA packet to accept.
    expected: u64,
    /// The log frame being reassembled, and its announced length.
    partial: Vec<u8>,
    partial_len: Option<usize>,
    /// Complete log frames, oldest first.
    ready: VecDeque<Ready>,
    /// Spare frame buffers.
    free: Vec<Vec<u8>>,
}

impl Reassembly {
    fn new(max_frame: usize, backlog: usize, window: usize) -> Self {
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
    fn data(&mut self, seq: u64, body: &[u8]) -> Piece {
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
    fn drain(&mut self) -> u64 {
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
    fn has_gap(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// Takes one in-order DATA packet's body; `false` if it does not fit what came before.
    fn take_piece(&mut self, body: &[u8]) -> bool {
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
    fn data_whole(&mut self, seq: u64, mbuf: Mbuf) -> Result<(), Mbuf> {
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

    fn peek(&self) -> Option<&[u8]> {
        self.ready.front().map(Ready::bytes)
    }

    /// Drops the oldest complete frame; returns how many kept packets then failed to fit. A
    /// frame held in its mbuf goes to `spent` (the caller frees it once the ACK is out).
    fn consume(&mut self, spent: &mut Vec<Mbuf>) -> u64 {
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

/// The backup's DPDK link.
#[derive(Debug)]
pub struct DpdkBackupLink {
    /// Before `wire`: fields drop in order, and frames kept in their mbufs go back to the
    /// port's pool before the port and pool handles do.
    frames: Reassembly,
    /// Consumed frames' mbufs, freed after the ACK for them went out (freeing is not on the
    /// way to the ACK).
    spent: Vec<Mbuf>,
    wire: Wire,
    control: TcpStream,
    cfg: DpdkConfig,
    /// The last log ACK and epoch the channel published.
    log_acked: u64,
    epoch: u64,
    /// The gap (value of `expected`) a NACK was last sent for.
    nacked: u64,
    /// A packet ACK is owed: DATA arrived that completed a log frame, and the channel's log
    /// ACK for it (which carries the packet ACK too) is expected next. Sent on its own only if
    /// the channel does not ACK before the next receive.
    ack_owed: bool,
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
            .send_ack(kind, self.frames.expected - 1, self.log_acked, self.epoch)
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
            let Some((kind, seq, _)) = Wire::classify(
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

    fn ack(&mut self, acked: u64, epoch: u64) -> Result<(), ChannelError> {
        self.log_acked = acked;
        self.epoch = epoch;
        let sent = self.send_ack(T_ACK);
        self.spent.clear();
        self.wire.refill();
        sent
    }

    fn check_peer(&mut self) -> Result<(), ChannelError> {
        if self.ack_owed {
            self.send_ack(T_ACK)?;
        }
        check_socket(&mut self.control)
    }

    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        if self.ack_owed {
            self.send_ack(T_ACK)?;
        }
        std::thread::sleep(timeout.min(Duration::from_micros(50)));
        Ok(false)
    }
}

fn wire(port: Port, mac: EtherAddr, peer: EtherAddr, tag: u32, cfg: &DpdkConfig) -> Wire {
    let pool = port.mempool().clone();
    Wire {
        port,
        pool,
        mac,
        peer,
        tag,
        drop_every: cfg.drop_every,
        sent_count: 0,
        rx: Vec::with_capacity(BURST),
        spare: None,
        stats: cfg.stats.clone(),
    }
}

/// Accepts one primary on the control `listener`, authenticates it, exchanges MAC addresses,
/// and returns the backup's channel end over `port` (configured and started by the caller, in a
/// process that did `Eal::init`). Waits up to [`DpdkConfig::link_timeout`] for the link.
pub fn accept(
    listener: &TcpListener,
    port: Port,
    config: ChannelConfig,
    dpdk: DpdkConfig,
) -> Result<Backup<DpdkBackupLink>, ChannelError> {
    config.validate()?;
    dpdk.validate(&config)?;
    let mac = port
        .mac_address()
        .map_err(|e| dpdk_err("reading the port's MAC address", e))?;
    let (mut control, _) = listener
        .accept()
        .map_err(|e| ChannelError::io("accepting the primary", e))?;
    with_timeouts(&control, config.handshake_timeout)?;
    let hello =
        handshake::backup_authenticate(&mut control, &config.session_params(MediumKind::Dpdk))?;
    let tag = random_u32()?;
    let mut info = Vec::with_capacity(INFO_LEN);
    info.extend_from_slice(INFO_MAGIC);
    info.extend_from_slice(&mac.0);
    info.extend_from_slice(&tag.to_le_bytes());
    // validate() bounds the MTU to u16.
    info.extend_from_slice(&(dpdk.mtu as u16).to_le_bytes());
    handshake::backup_welcome(&mut control, 1, &info)?;
    let mut msg = [0u8; MAC_MSG_LEN];
    control.read_exact(&mut msg).map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => ChannelError::HandshakeTimeout {
            waiting_for: "the primary's MAC address",
        },
        _ => ChannelError::io("waiting for the primary's MAC address", e),
    })?;
    if msg[0] != b'M' {
        return Err(ChannelError::BadHandshake(
            "primary did not send its MAC address".into(),
        ));
    }
    let mut peer = [0u8; 6];
    peer.copy_from_slice(&msg[1..7]);
    wait_link(&port, dpdk.link_timeout)?;
    control
        .set_nonblocking(true)
        .map_err(|e| ChannelError::io("control socket", e))?;
    let link = DpdkBackupLink {
        wire: wire(port, mac, EtherAddr(peer), tag, &dpdk),
        control,
        frames: Reassembly::new(
            logfmt::MAX_FRAME_LEN.max(config.max_frame_bytes),
            dpdk.backlog_frames,
            dpdk.window,
        ),
        spent: Vec::new(),
        cfg: dpdk,
        log_acked: 0,
        epoch: hello.epoch.max(config.epoch),
        nacked: 0,
        ack_owed: false,
    };
    Backup::new(link, config, 1, hello.epoch)
}

/// Connects to a backup's control address, authenticates, exchanges MAC addresses, and returns
/// the primary's channel end over `port` (configured and started by the caller, in a process
/// that did `Eal::init`). Waits up to [`DpdkConfig::link_timeout`] for the link.
pub fn connect(
    control_addr: impl ToSocketAddrs,
    port: Port,
    config: ChannelConfig,
    dpdk: DpdkConfig,
) -> Result<Primary<DpdkPrimaryLink>, ChannelError> {
    config.validate()?;
    let mac = port
        .mac_address()
        .map_err(|e| dpdk_err("reading the port's MAC address", e))?;
    let mut control = TcpStream::connect(control_addr)
        .map_err(|e| ChannelError::io("connecting to the backup's control socket", e))?;
    with_timeouts(&control, config.handshake_timeout)?;
    let accepted =
        handshake::primary_handshake(&mut control, &config.session_params(MediumKind::Dpdk))?;
    let info = accepted.medium_info;
    if info.len() != INFO_LEN || info[..8] != INFO_MAGIC[..] {
        return Err(ChannelError::MediumMismatch);
    }
    let mut peer = [0u8; 6];
    peer.copy_from_slice(&info[8..14]);
    let tag = u32_at(&info, 14);
    let backup_mtu = usize::from(u16_at(&info, 18));
    // Both sides send at most their own MTU; use the smaller.
    let mut dpdk = dpdk;
    dpdk.mtu = dpdk.mtu.min(backup_mtu);
    dpdk.validate(&config)?;
    let mut msg = [0u8; MAC_MSG_LEN];
    msg[0] = b'M';
    msg[1..].copy_from_slice(&mac.0);
    control
        .write_all(&msg)
        .map_err(|e| ChannelError::io("sending our MAC address", e))?;
    wait_link(&port, dpdk.link_timeout)?;
    control
        .set_nonblocking(true)
        .map_err(|e| ChannelError::io("control socket", e))?;
    let link = DpdkPrimaryLink {
        wire: wire(port, mac, EtherAddr(peer), tag, &dpdk),
        control,
        rto: dpdk.rto_initial,
        rto_base: dpdk.rto_initial,
        srtt_ns: 0,
        rttvar_ns: 0,
        cfg: dpdk,
        unacked: VecDeque::new(),
        next_send: 0,
        next_seq: 1,
        free: Vec::new(),
        timer: Instant::now(),
        progress: false,
        last_nack: u64::MAX,
        resend_front: false,
        polls: 0,
        blocked: false,
        epoch: accepted.epoch.max(config.epoch),
    };
    Primary::new(link, config, accepted.resume_seq)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut r = Reassembly::new(1 << 20, 8, 4);
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
        let mut r = Reassembly::new(1 << 20, 1, 8);
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
    fn garbage_never_panics_and_is_refused() {
        let mut r = Reassembly::new(4096, 8, 64);
        // Inconsistent pieces.
        assert_eq!(r.data(1, &data_body(1, 100, 10, &[1; 10])), Piece::Garbage);
        assert_eq!(r.data(1, &data_body(1, 0, 0, &[])), Piece::Garbage);
        assert_eq!(r.data(1, &data_body(1, 5000, 0, &[1; 10])), Piece::Garbage);
        assert_eq!(r.data(1, &data_body(1, 10, 5, &[1; 10])), Piece::Garbage);
        let mut short = data_body(1, 100, 0, &[1; 10]);
        short.truncate(DATA_HDR + 5);
        assert_eq!(r.data(1, &short), Piece::Garbage);
        // Random bodies, and random Ethernet frames through the classifier.
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let stats = DpdkStats::default();
        let (mac, peer) = (EtherAddr([2, 0, 0, 0, 0, 1]), EtherAddr([2, 0, 0, 0, 0, 2]));
        for i in 0..20_000 {
            let len = (next() % 200) as usize;
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && b.len() >= 30 {
                b[..2].copy_from_slice(&MAGIC);
                b[2] = VERSION;
                b[3] = T_DATA;
                b[4..8].copy_from_slice(&7u32.to_le_bytes());
                b[8..16].copy_from_slice(&r.expected.to_le_bytes());
            }
            let _ = r.data(r.expected, &b);
            let mut eth = Vec::new();
            eth.extend_from_slice(&mac.0);
            eth.extend_from_slice(&peer.0);
            eth.extend_from_slice(&ETHERTYPE_FTVM.to_be_bytes());
            eth.extend_from_slice(&b);
            let _ = Wire::classify(mac, peer, 7, &stats, &eth);
            let _ = Wire::classify(mac, peer, 7, &stats, &b);
        }
        assert!(DpdkStats::get(&stats.garbage) > 0);
    }
}
