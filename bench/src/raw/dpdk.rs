//! DPDK: raw Ethernet frames between two ports of this process's EAL ([`super::memif`]):
//! `net_memif`, or `net_af_packet` / `net_af_xdp` on the two ends of a veth pair.

use anyhow::{ensure, Context};
use hdrhistogram::Histogram;

use super::memif::{self, Kind};
use super::{drive, Backoff, Endpoint, FailFlag, Plan};

/// The ping-pong over a pair of ports of medium `kind`, given back afterwards.
pub(super) fn run(
    kind: Kind,
    hist: Histogram<u64>,
    plan: &Plan,
    peer_failed: &FailFlag,
) -> anyhow::Result<Histogram<u64>> {
    ensure!(
        plan.payload.max(plan.reply) <= memif::MAX_RAW_PAYLOAD,
        "the raw DPDK ping-pong sends one frame per message: payload and reply \
         must be at most {} bytes, got {} and {}",
        memif::MAX_RAW_PAYLOAD,
        plan.payload,
        plan.reply
    );
    let mut pair = memif::take(kind)?;
    let result = {
        let (server, client) = (&mut pair.server, &mut pair.client);
        let client_end = DpdkEnd::new(client, server.mac_address()?, peer_failed)?;
        let server_end = DpdkEnd::new(server, client_end.src, peer_failed)?;
        drive(client_end, server_end, hist, plan, peer_failed)
    };
    // A ping-pong leaves nothing in flight: the ports can carry the next run.
    if result.is_ok() {
        memif::give_back_kind(kind, pair);
    }
    result
}

/// One side of the raw DPDK medium: every message is one Ethernet frame (dst, src, ethertype
/// [`dpdk_sys::ETHERTYPE_FTVM`], payload) on its own port.
struct DpdkEnd<'a> {
    port: &'a mut dpdk_sys::Port,
    pool: dpdk_sys::Mempool,
    /// Ethernet header of the frames this side sends.
    header: [u8; dpdk_sys::ETHER_HDR_LEN],
    src: dpdk_sys::EtherAddr,
    /// Received frames not yet taken, from `rx[next]` on.
    rx: Vec<dpdk_sys::Mbuf>,
    next: usize,
    peer_failed: &'a FailFlag,
}

impl std::fmt::Debug for DpdkEnd<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpdkEnd")
            .field("port", &self.port.id())
            .field("src", &self.src)
            .finish_non_exhaustive()
    }
}

impl<'a> DpdkEnd<'a> {
    fn new(
        port: &'a mut dpdk_sys::Port,
        peer: dpdk_sys::EtherAddr,
        peer_failed: &'a FailFlag,
    ) -> anyhow::Result<Self> {
        let src = port
            .mac_address()
            .context("reading the port's MAC address")?;
        let mut header = [0u8; dpdk_sys::ETHER_HDR_LEN];
        header[..6].copy_from_slice(&peer.0);
        header[6..12].copy_from_slice(&src.0);
        header[12..14].copy_from_slice(&dpdk_sys::ETHERTYPE_FTVM.to_be_bytes());
        let pool = port.mempool().clone();
        Ok(DpdkEnd {
            port,
            pool,
            header,
            src,
            rx: Vec::with_capacity(32),
            next: 0,
            peer_failed,
        })
    }
}

impl Endpoint for DpdkEnd<'_> {
    fn send(&mut self, buf: &[u8]) -> anyhow::Result<()> {
        let mut frame = self.pool.alloc().context("allocating an mbuf")?;
        {
            let data = frame
                .append(self.header.len() + buf.len())
                .context("making room for the frame in the mbuf")?;
            data[..self.header.len()].copy_from_slice(&self.header);
            data[self.header.len()..].copy_from_slice(buf);
        }
        let mut backoff = Backoff::new(self.peer_failed);
        loop {
            match self.port.tx_one(frame) {
                Ok(()) => return Ok(()),
                Err(back) => {
                    frame = back;
                    backoff.snooze("room in the port's tx queue")?;
                }
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(self.peer_failed);
        loop {
            if self.next == self.rx.len() {
                // Frees the frames already taken.
                self.rx.clear();
                self.next = 0;
                if self.port.rx_burst(&mut self.rx) == 0 {
                    backoff.snooze("a frame on the port")?;
                    continue;
                }
            }
            let frame = &self.rx[self.next];
            self.next += 1;
            let data = frame.data();
            let hdr = dpdk_sys::ETHER_HDR_LEN;
            if data.len() < hdr || data[12..14] != dpdk_sys::ETHERTYPE_FTVM.to_be_bytes() {
                // Not ours (nothing else should be on the link, but never mind).
                continue;
            }
            ensure!(
                frame.segments() == 1 && data.len() == hdr + buf.len(),
                "received a {}-byte frame in {} segment(s), expected {} bytes in one",
                frame.pkt_len(),
                frame.segments(),
                hdr + buf.len()
            );
            buf.copy_from_slice(&data[hdr..]);
            return Ok(());
        }
    }
}
#[cfg(test)]
mod tests {
    use crate::raw::memif;
    use crate::raw::tests::{cfg, check};
    use crate::raw::{ping_pong, RawMedium};

    /// The only test that touches DPDK: the EAL is set up once per process (tests are threads
    /// of one process), and this test removes its files at the end.
    #[test]
    fn dpdk_memif_64_and_1500() -> anyhow::Result<()> {
        let result = (|| -> anyhow::Result<()> {
            check(RawMedium::DpdkMemif, 64)?;
            check(RawMedium::DpdkMemif, 1500)?;
            assert!(ping_pong(RawMedium::DpdkMemif, &cfg(memif::MAX_RAW_PAYLOAD + 1)).is_err());
            // The pair went back after each run: the same ports carry the next one.
            check(RawMedium::DpdkMemif, 8)
        })();
        memif::cleanup();
        result
    }
}
