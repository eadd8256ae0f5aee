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
//!   2   1  version (2)
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
//!  32   8  the backup's replay position (`Ack::replayed`)
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

//!
//! # Without the `dpdk` feature
//! The packet format (`codec`), the backup's reassembly (`reassembly`) and the counters
//! ([`DpdkStats`]) are plain code over bytes: they build without DPDK, for the `dpdk_packets`
//! fuzz check ([`crate::fuzz::dpdk_packets`]). The port I/O, the links, the set-up and
//! [`DpdkConfig`] need the feature.

pub(crate) mod codec;
#[cfg(feature = "dpdk")]
mod link;
pub(crate) mod reassembly;
// The retransmission state machine does no I/O either: its unit tests run without the feature.
#[cfg(any(feature = "dpdk", test))]
mod retransmit;
#[cfg(feature = "dpdk")]
mod setup;
#[cfg(feature = "dpdk")]
mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "dpdk")]
use std::sync::Arc;
#[cfg(feature = "dpdk")]
use std::time::Duration;

#[cfg(feature = "dpdk")]
use dpdk_sys::DpdkError;

#[cfg(feature = "dpdk")]
use crate::channel::ChannelConfig;
#[cfg(feature = "dpdk")]
use crate::error::ChannelError;

pub use self::codec::{ACK_LEN, DATA_HEADER_LEN};
#[cfg(feature = "dpdk")]
pub use self::link::{DpdkBackupLink, DpdkPrimaryLink};
#[cfg(feature = "dpdk")]
pub use self::setup::{accept, backup_on, connect, primary_on};

#[cfg(feature = "dpdk")]
use self::codec::DATA_HDR;

/// Smallest MTU we accept (a piece must hold something useful).
#[cfg(feature = "dpdk")]
const MIN_MTU: usize = 256;

/// Medium-specific settings, next to the [`ChannelConfig`].
#[cfg(feature = "dpdk")]
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

#[cfg(feature = "dpdk")]
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

#[cfg(feature = "dpdk")]
impl DpdkConfig {
    pub(super) fn piece_len(&self) -> usize {
        self.mtu - DATA_HDR
    }

    pub(super) fn validate(&self, channel: &ChannelConfig) -> Result<(), ChannelError> {
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
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(1),
            Ordering::Relaxed,
        );
    }

    /// Counts `n` packets that are not ours (the `garbage` counter), in the metrics too.
    pub(crate) fn garbage(counter: &AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
        ftvm_metrics::METRICS.frames_rejected[ftvm_metrics::RejectCause::Garbage as usize].add(n);
    }

    /// Reads one counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[cfg(feature = "dpdk")]
pub(super) fn dpdk_err(context: &'static str, e: DpdkError) -> ChannelError {
    ChannelError::Io {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}
