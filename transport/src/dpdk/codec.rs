//! The DPDK medium's packet format (see the module documentation): constants, field readers,
//! and the encoders and classifier of our header. No I/O.

use dpdk_sys::{EtherAddr, ETHERTYPE_FTVM, ETHER_HDR_LEN};

use super::DpdkStats;

/// Our header after the Ethernet header: magic.
pub(super) const MAGIC: [u8; 2] = *b"FL";
/// Wire format version.
pub(super) const VERSION: u8 = 2;
pub(super) const T_DATA: u8 = 1;
pub(super) const T_ACK: u8 = 2;
pub(super) const T_NACK: u8 = 3;
/// Length of our header in a DATA packet.
pub(super) const DATA_HDR: usize = 28;
/// Length of our header (and body) in an ACK/NACK packet.
pub(super) const ACK_HDR: usize = 40;
/// Bytes a DATA packet adds to the piece it carries, after the Ethernet header.
pub const DATA_HEADER_LEN: usize = DATA_HDR;
/// Bytes of an ACK/NACK packet after the Ethernet header.
pub const ACK_LEN: usize = ACK_HDR;

pub(super) fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The fields of a DATA packet's header.
#[derive(Debug, Clone, Copy)]
pub(super) struct DataHead {
    pub(super) seq: u64,
    pub(super) total: u32,
    pub(super) offset: u32,
    pub(super) len: u16,
}

impl DataHead {
    /// Writes the whole packet (Ethernet header, our header, `piece`) into `b`, which is
    /// exactly `ETHER_HDR_LEN + DATA_HDR + piece.len()` bytes long.
    pub(super) fn write(
        &self,
        b: &mut [u8],
        peer: EtherAddr,
        mac: EtherAddr,
        tag: u32,
        piece: &[u8],
    ) {
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

/// Our header of a received packet, if it is ours and well-formed enough to look at:
/// (type, sequence/ACK, body after the Ethernet header).
pub(super) fn classify<'a>(
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
        DpdkStats::garbage(&stats.garbage, 1);
        return None;
    }
    Some((body[3], u64_at(body, 8), body))
}
