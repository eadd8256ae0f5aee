//! The DPDK medium's packet format (see the module documentation): constants, field readers,
//! and the encoders and classifier of our header. No I/O, and no DPDK: built without the
//! `dpdk` feature too (the `dpdk_packets` fuzz check uses it).

use super::DpdkStats;

/// A MAC address, as it appears in an Ethernet header.
pub(crate) type Mac = [u8; 6];
/// Our ethertype (`dpdk_sys::ETHERTYPE_FTVM`).
pub(crate) const ETHERTYPE_FTVM: u16 = 0x88B5;
/// Length of an Ethernet header without VLAN tags (`dpdk_sys::ETHER_HDR_LEN`).
pub(crate) const ETHER_HDR_LEN: usize = 14;

#[cfg(feature = "dpdk")]
const _: () =
    assert!(ETHERTYPE_FTVM == dpdk_sys::ETHERTYPE_FTVM && ETHER_HDR_LEN == dpdk_sys::ETHER_HDR_LEN);

/// Our header after the Ethernet header: magic.
pub(crate) const MAGIC: [u8; 2] = *b"FL";
/// Wire format version.
pub(crate) const VERSION: u8 = 2;
pub(crate) const T_DATA: u8 = 1;
pub(crate) const T_ACK: u8 = 2;
#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
pub(crate) const T_NACK: u8 = 3;
/// Length of our header in a DATA packet.
pub(crate) const DATA_HDR: usize = 28;
/// Length of our header (and body) in an ACK/NACK packet.
pub(crate) const ACK_HDR: usize = 40;
/// Bytes a DATA packet adds to the piece it carries, after the Ethernet header.
pub const DATA_HEADER_LEN: usize = DATA_HDR;
/// Bytes of an ACK/NACK packet after the Ethernet header.
pub const ACK_LEN: usize = ACK_HDR;

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

#[cfg_attr(not(feature = "dpdk"), allow(dead_code))]
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The fields of a DATA packet's header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataHead {
    pub(crate) seq: u64,
    pub(crate) total: u32,
    pub(crate) offset: u32,
    pub(crate) len: u16,
}

impl DataHead {
    /// Writes the whole packet (Ethernet header, our header, `piece`) into `b`, which is
    /// exactly `ETHER_HDR_LEN + DATA_HDR + piece.len()` bytes long.
    pub(crate) fn write(&self, b: &mut [u8], peer: Mac, mac: Mac, tag: u32, piece: &[u8]) {
        b[0..6].copy_from_slice(&peer);
        b[6..12].copy_from_slice(&mac);
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
pub(crate) fn classify<'a>(
    mac: Mac,
    peer: Mac,
    tag: u32,
    stats: &DpdkStats,
    data: &'a [u8],
) -> Option<(u8, u64, &'a [u8])> {
    // Other ethertypes, and our own frames seen again (an af_packet socket also sees what
    // its interface sends), are not for us.
    if data.len() < ETHER_HDR_LEN
        || data[12..14] != ETHERTYPE_FTVM.to_be_bytes()
        || data[6..12] == mac
    {
        DpdkStats::inc(&stats.foreign);
        return None;
    }
    DpdkStats::inc(&stats.rx_packets);
    let body = &data[ETHER_HDR_LEN..];
    let ok = data[0..6] == mac
        && data[6..12] == peer
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
