//! The DPDK medium's packets as the backup takes them — classifier, DATA header, in-order
//! reassembly ([`crate::dpdk`]'s `codec` and `reassembly`, plain code without DPDK) — fed any
//! sequence of packets, arbitrary ones mixed with the genuine packets of a known stream of log
//! frames (reordered, repeated, dropped).
//!
//! The input is a list of operations, each a control byte (`c % 4`) and its operands:
//! - 0: an arbitrary packet: a 16-bit little-endian length, then that many bytes (as many as
//!   are left), an Ethernet frame from its header on;
//! - 1: genuine packet number `b % n` (one operand byte `b`);
//! - 2: the channel takes one complete frame, if one is ready;
//! - 3: the channel takes every complete frame that is ready.
//!
//! What must hold:
//! - no panic;
//! - every packet is counted once, as foreign or as received; one that is not ours by the wire
//!   format (another ethertype, MAC, magic, version or link tag, too short, not DATA) is
//!   counted as foreign or as garbage and changes nothing in the reassembly: garbage is
//!   counted, not delivered;
//! - every frame handed to the channel is made of pieces of DATA packets that came with the
//!   link tag, exactly as they came (each at the offset and in the frame length its header
//!   announced), with sequence numbers 1, 2, 3, … over all the frames handed out: nothing
//!   altered, reordered, skipped or used twice;
//! - while every packet that passes the tag is byte for byte a genuine one (the others
//!   dropped, anything repeated or reordered), what is handed out is exactly the genuine
//!   frames, whole, in order and once — a prefix of the stream.
//!
//! The medium does not authenticate packets: a packet with the link tag that lies about its
//! contents is handed on (a piece of a frame, as it came), and the channel's CRC and, with
//! crypto `auth`, the frame's seal refuse the frame. That is why the strict prefix property is
//! stated for packets that pass the tag unaltered.

use std::collections::{BTreeMap, HashSet};

use crate::dpdk::codec::{
    u16_at, u32_at, u64_at, DataHead, Mac, DATA_HDR, ETHERTYPE_FTVM, ETHER_HDR_LEN, MAGIC, T_DATA,
    VERSION,
};
use crate::dpdk::reassembly::Reassembly;
use crate::dpdk::DpdkStats;

/// The backup's MAC address (packets are addressed to it).
const BACKUP: Mac = [2, 0, 0, 0, 0, 0xB];
/// The primary's MAC address (packets come from it).
const PRIMARY: Mac = [2, 0, 0, 0, 0, 0xA];
/// The link tag the backup chose.
const TAG: u32 = 0x7A6_0001;
/// Bytes of log frame per DATA packet (small, so frames come in several pieces).
const PIECE: usize = 96;
/// The reassembly's limits: largest frame, complete frames waiting, packets kept ahead.
const MAX_FRAME: usize = 2048;
const BACKLOG: usize = 3;
const WINDOW: usize = 8;

/// The genuine log frames (their bytes are only for this check: the reassembly does not read
/// inside a frame).
pub fn frames() -> Vec<Vec<u8>> {
    [40usize, 300, 96, 97, 1, 500, 64]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (i * 37 + j * 11 + 5) as u8).collect())
        .collect()
}

/// The genuine packets: every frame cut into pieces of [`PIECE`] bytes, as the primary's
/// link sends them, with sequence numbers from 1.
pub fn packets() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut seq = 1u64;
    for f in frames() {
        let mut offset = 0;
        loop {
            let chunk = &f[offset..(offset + PIECE).min(f.len())];
            let head = DataHead {
                seq,
                total: f.len() as u32,
                offset: offset as u32,
                len: chunk.len() as u16,
            };
            let mut b = vec![0u8; ETHER_HDR_LEN + DATA_HDR + chunk.len()];
            head.write(&mut b, BACKUP, PRIMARY, TAG, chunk);
            out.push(b);
            seq += 1;
            offset += chunk.len();
            if offset >= f.len() {
                break;
            }
        }
    }
    out
}

/// Whether a packet passes the classifier as a DATA packet for us, by the wire format: our
/// ethertype, from the primary to the backup, magic, version, link tag, type DATA.
fn tagged(p: &[u8]) -> bool {
    p.len() >= ETHER_HDR_LEN + 16
        && p[0..6] == BACKUP
        && p[6..12] == PRIMARY
        && p[12..14] == ETHERTYPE_FTVM.to_be_bytes()
        && p[ETHER_HDR_LEN..ETHER_HDR_LEN + 2] == MAGIC
        && p[ETHER_HDR_LEN + 2] == VERSION
        && p[ETHER_HDR_LEN + 3] == T_DATA
        && u32_at(p, ETHER_HDR_LEN + 4) == TAG
}

/// The DATA header fields of a tagged packet whose header and piece are all there: (seq,
/// total, offset, piece).
fn piece(p: &[u8]) -> Option<(u64, usize, usize, &[u8])> {
    let body = p.get(ETHER_HDR_LEN..).filter(|b| b.len() >= DATA_HDR)?;
    let len = usize::from(u16_at(body, 24));
    Some((
        u64_at(body, 8),
        u32_at(body, 16) as usize,
        u32_at(body, 20) as usize,
        body.get(DATA_HDR..DATA_HDR + len)?,
    ))
}

/// Pieces of DATA packets that passed the tag, by sequence number: (frame length, offset,
/// piece).
type Pieces = BTreeMap<u64, Vec<(usize, usize, Vec<u8>)>>;

/// What a run handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The frames handed to the channel, in order.
    pub frames: Vec<Vec<u8>>,
    /// Packets counted as garbage.
    pub garbage: u64,
}

/// Runs the operations in `data` and checks the module's properties.
pub fn check(data: &[u8]) -> Result<Delivery, String> {
    let genuine = packets();
    let genuine_set: HashSet<&[u8]> = genuine.iter().map(Vec::as_slice).collect();
    let stats = DpdkStats::default();
    let mut r = Reassembly::<Vec<u8>>::new(MAX_FRAME, BACKLOG, WINDOW);
    // Pieces of DATA packets that passed the tag, by sequence number: (total, offset, piece).
    let mut pieces: Pieces = BTreeMap::new();
    let mut all_genuine = true;
    let mut delivered: Vec<Vec<u8>> = Vec::new();
    let mut fed = 0u64;
    let mut spent = Vec::new();
    let mut i = 0usize;
    let byte = |i: &mut usize| {
        let b = data.get(*i).copied();
        *i += 1;
        b
    };
    let take =
        |r: &mut Reassembly<Vec<u8>>, delivered: &mut Vec<Vec<u8>>, spent: &mut Vec<Vec<u8>>| {
            let Some(f) = r.peek() else {
                return false;
            };
            delivered.push(f.to_vec());
            let bad = r.consume(spent);
            DpdkStats::garbage(&stats.garbage, bad);
            spent.clear();
            true
        };
    while let Some(c) = byte(&mut i) {
        let packet = match c % 4 {
            0 => {
                let len = usize::from(u16::from_le_bytes([
                    byte(&mut i).unwrap_or(0),
                    byte(&mut i).unwrap_or(0),
                ]));
                let end = (i + len).min(data.len());
                let p = data.get(i..end).unwrap_or(&[]).to_vec();
                i = end;
                p
            }
            1 => genuine[usize::from(byte(&mut i).unwrap_or(0)) % genuine.len()].clone(),
            2 => {
                take(&mut r, &mut delivered, &mut spent);
                continue;
            }
            _ => {
                while take(&mut r, &mut delivered, &mut spent) {}
                continue;
            }
        };
        fed += 1;
        let is_tagged = tagged(&packet);
        if is_tagged {
            if let Some((seq, total, offset, piece)) = piece(&packet) {
                pieces
                    .entry(seq)
                    .or_default()
                    .push((total, offset, piece.to_vec()));
            }
            if !genuine_set.contains(packet.as_slice()) {
                all_genuine = false;
            }
        }
        let before = (
            r.expected,
            r.partial.len(),
            r.partial_len,
            r.ready.len(),
            r.ahead.len(),
        );
        let garbage_before = DpdkStats::get(&stats.garbage);
        let copy = packet.clone();
        let answer = r.packet(BACKUP, PRIMARY, TAG, &stats, packet);
        let counted = DpdkStats::get(&stats.foreign) + DpdkStats::get(&stats.rx_packets);
        if counted != fed {
            return Err(format!(
                "{fed} packets fed, {counted} counted as foreign or received"
            ));
        }
        if !is_tagged {
            let after = (
                r.expected,
                r.partial.len(),
                r.partial_len,
                r.ready.len(),
                r.ahead.len(),
            );
            if after != before {
                return Err(format!(
                    "a packet that is not a DATA packet with our tag changed the reassembly ({before:?} -> {after:?}): {copy:02x?}"
                ));
            }
            if answer == Some(true) {
                return Err(format!("a packet that is not ours was taken: {copy:02x?}"));
            }
            let foreign = copy.len() < ETHER_HDR_LEN
                || copy[12..14] != ETHERTYPE_FTVM.to_be_bytes()
                || copy[6..12] == BACKUP;
            if !foreign && DpdkStats::get(&stats.garbage) != garbage_before + 1 {
                return Err(format!(
                    "a packet that is not ours was not counted as garbage: {copy:02x?}"
                ));
            }
        }
        if r.ready.len() > BACKLOG {
            return Err(format!("{} frames ready, backlog {BACKLOG}", r.ready.len()));
        }
    }
    while take(&mut r, &mut delivered, &mut spent) {}
    explained(&delivered, &pieces)?;
    if all_genuine {
        let want = frames();
        if delivered.len() > want.len() || delivered[..] != want[..delivered.len()] {
            return Err(format!(
                "only genuine packets passed the tag, but {} frames were handed out that are not the genuine stream's first ones",
                delivered.len()
            ));
        }
    }
    Ok(Delivery {
        frames: delivered,
        garbage: DpdkStats::get(&stats.garbage),
    })
}

/// Whether the frames handed out are pieces that came, with sequence numbers 1, 2, 3, …:
/// a search over the states (frame, offset in it, next sequence number).
fn explained(delivered: &[Vec<u8>], pieces: &Pieces) -> Result<(), String> {
    let mut states = vec![(0usize, 0usize, 1u64)];
    let mut seen = HashSet::new();
    while let Some((j, off, seq)) = states.pop() {
        if j == delivered.len() {
            return Ok(());
        }
        if !seen.insert((j, off, seq)) {
            continue;
        }
        let f = &delivered[j];
        for (total, offset, piece) in pieces.get(&seq).into_iter().flatten() {
            if *total == f.len()
                && *offset == off
                && !piece.is_empty()
                && f.get(off..off + piece.len()) == Some(piece.as_slice())
            {
                let end = off + piece.len();
                states.push(if end == f.len() {
                    (j + 1, 0, seq + 1)
                } else {
                    (j, end, seq + 1)
                });
            }
        }
    }
    Err(format!(
        "the {} frames handed out are not pieces that came, in sequence from 1: {delivered:02x?}",
        delivered.len()
    ))
}

/// The input that sends every genuine packet once, in order, with the channel taking frames as
/// they come.
pub fn seed() -> Vec<u8> {
    let n = packets().len();
    (0..n).flat_map(|k| [1, k as u8, 3]).collect()
}

/// Seeds: the genuine stream in order; reordered with repeats and losses; interleaved with
/// arbitrary packets (a wrong tag, another MAC, a torn header, an ACK, a piece that lies about
/// its frame); with the channel slow to take frames (the backlog fills); and the genuine
/// packets written out whole, in order and shuffled, so that mutations reach their headers.
pub fn seeds() -> Vec<Vec<u8>> {
    let g = packets();
    let n = g.len() as u8;
    let raw = |p: &[u8]| {
        let mut v = vec![0u8];
        v.extend_from_slice(&(p.len() as u16).to_le_bytes());
        v.extend_from_slice(p);
        v
    };
    let mut reordered = Vec::new();
    for k in [1u8, 0, 2, 2, 4, 3, 5, 9, 6, 7, 8, 8, 10, 12, 11, 13, 14, 15] {
        reordered.extend_from_slice(&[1, k % n, 2]);
    }
    reordered.push(3);
    let mut hostile = Vec::new();
    let mut wrong_tag = g[0].clone();
    wrong_tag[ETHER_HDR_LEN + 4] ^= 1;
    let mut other_mac = g[1].clone();
    other_mac[7] ^= 0x40;
    let torn = g[2][..ETHER_HDR_LEN + 10].to_vec();
    let mut ack = g[0][..ETHER_HDR_LEN + 40.min(g[0].len() - ETHER_HDR_LEN)].to_vec();
    ack[ETHER_HDR_LEN + 3] = crate::dpdk::codec::T_ACK;
    let mut liar = g[1].clone();
    let at = ETHER_HDR_LEN + DATA_HDR + 5;
    liar[at] ^= 0xFF;
    for (k, junk) in [wrong_tag, other_mac, torn, ack, liar].iter().enumerate() {
        hostile.extend(raw(junk));
        hostile.extend_from_slice(&[1, k as u8, 3]);
    }
    for k in 5..n {
        hostile.extend_from_slice(&[1, k, 3]);
    }
    let slow: Vec<u8> = (0..n).flat_map(|k| [1, k]).chain([3, 1, 0, 3]).collect();
    // The genuine packets written out whole (mutations then reach their headers and pieces):
    // in order, and out of order with repeats.
    let mut whole = Vec::new();
    for p in &g {
        whole.extend(raw(p));
        whole.push(2);
    }
    whole.push(3);
    let mut shuffled = Vec::new();
    for k in [
        0usize, 2, 1, 1, 3, 5, 4, 6, 8, 7, 9, 10, 12, 11, 3, 13, 15, 14, 16,
    ] {
        shuffled.extend(raw(&g[k % g.len()]));
        shuffled.push(if k % 2 == 0 { 2 } else { 3 });
    }
    shuffled.push(3);
    vec![
        seed(),
        reordered,
        hostile,
        slow,
        whole,
        shuffled,
        raw(&[0xFF; 60]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::{mutate, xorshift};

    #[test]
    fn the_genuine_stream_is_delivered_whole() {
        let all = frames();
        assert_eq!(check(&seed()).expect("the seed").frames, all);
        let s = seeds();
        // Reordered, repeated, one packet lost (seq 17 is never sent): the frames before it.
        let got = check(&s[1]).expect("reordered");
        assert!(!got.frames.is_empty() && got.frames[..] == all[..got.frames.len()]);
        // The liar (a genuine header over an altered piece) is handed on as it came: the
        // frame it is part of is not the genuine one, and the channel's CRC refuses it.
        let got = check(&s[2]).expect("hostile");
        assert!(got.garbage >= 4, "{got:?}");
        // The backlog fills and drains: everything arrives in the end (DATA refused while the
        // backlog is full is not taken, so what is left is resent: here, not).
        let got = check(&s[3]).expect("slow");
        assert_eq!(got.frames[..], all[..got.frames.len()]);
    }

    #[test]
    fn no_packets_make_the_backup_deliver_anything_but_what_came_in_order() {
        let mut state = 0xBB67_AE85_84CA_A73Bu64;
        let mut runs = 0;
        for seed in seeds() {
            let mut current = seed.clone();
            for _ in 0..600 {
                if let Err(v) = check(&current) {
                    panic!("{v}: input {current:02x?}");
                }
                runs += 1;
                let r = xorshift(&mut state);
                current = mutate(if r.is_multiple_of(3) { &current } else { &seed }, r);
            }
        }
        assert_eq!(runs, seeds().len() * 600);
    }
}
