//! One port, its peer, and the packet I/O both sides of the DPDK medium share.

use std::sync::Arc;

use dpdk_sys::{DpdkError, EtherAddr, Mbuf, Mempool, Port, ETHERTYPE_FTVM, ETHER_HDR_LEN};

use super::codec::{ACK_HDR, MAGIC, VERSION};
use super::{dpdk_err, DpdkStats};
use crate::channel::Ack;
use crate::error::ChannelError;

/// One port, its peer, and the packet I/O both sides share.
pub(super) struct Wire {
    /// Received mbufs; before `port` and `pool` so they are freed first.
    pub(super) rx: Vec<Mbuf>,
    /// An mbuf allocated ahead, after the last send, so the next send does not wait for the
    /// pool (see [`Wire::refill`]).
    pub(super) spare: Option<Mbuf>,
    pub(super) port: Port,
    pub(super) pool: Mempool,
    pub(super) mac: EtherAddr,
    pub(super) peer: EtherAddr,
    pub(super) tag: u32,
    pub(super) drop_every: Option<u32>,
    pub(super) sent_count: u64,
    pub(super) stats: Arc<DpdkStats>,
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
pub(super) enum Sent {
    /// Handed to the port (or dropped by the test hook, which counts as sent).
    Yes,
    /// The port or the mempool had no room; try again later.
    Full,
}

impl Wire {
    /// Sends one complete Ethernet frame (copied into an mbuf).
    pub(super) fn send(&mut self, frame: &[u8]) -> Result<Sent, ChannelError> {
        self.send_with(frame.len(), |b| b.copy_from_slice(frame))
    }

    /// Sends an ACK or NACK, written straight into the mbuf.
    /// With a sealer, the packet's header is followed by its seal ([`crate::auth`]).
    pub(super) fn send_ack(
        &mut self,
        kind: u8,
        ack: u64,
        log: Ack,
        sealer: Option<&mut crate::auth::AckSealer>,
    ) -> Result<Sent, ChannelError> {
        let (peer, mac, tag) = (self.peer, self.mac, self.tag);
        let seal_len = if sealer.is_some() {
            crate::auth::ACK_SEAL_LEN
        } else {
            0
        };
        self.send_with(ETHER_HDR_LEN + ACK_HDR + seal_len, |b| {
            b[0..6].copy_from_slice(&peer.0);
            b[6..12].copy_from_slice(&mac.0);
            b[12..14].copy_from_slice(&ETHERTYPE_FTVM.to_be_bytes());
            let h = &mut b[ETHER_HDR_LEN..];
            h[0..2].copy_from_slice(&MAGIC);
            h[2] = VERSION;
            h[3] = kind;
            h[4..8].copy_from_slice(&tag.to_le_bytes());
            h[8..16].copy_from_slice(&ack.to_le_bytes());
            h[16..24].copy_from_slice(&log.received.to_le_bytes());
            h[24..32].copy_from_slice(&log.epoch.to_le_bytes());
            h[32..40].copy_from_slice(&log.replayed.to_le_bytes());
            if let Some(sealer) = sealer {
                let seal = sealer.seal_msg(&h[..ACK_HDR]);
                h[ACK_HDR..ACK_HDR + seal.len()].copy_from_slice(&seal);
            }
        })
    }

    /// Sends one Ethernet frame of `len` bytes that `fill` writes into the mbuf.
    pub(super) fn send_with(
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
    pub(super) fn refill(&mut self) {
        if self.spare.is_none() {
            self.spare = Mbuf::alloc(&self.pool).ok();
        }
    }

    /// Receives one burst into `self.rx`; returns how many packets arrived.
    pub(super) fn receive(&mut self) -> usize {
        self.rx.clear();
        self.port.rx_burst(&mut self.rx)
    }
}
