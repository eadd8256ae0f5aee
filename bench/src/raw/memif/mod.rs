//! This process's one DPDK EAL, set up the first time a DPDK medium is measured and kept for
//! the rest of the process, with port pairs for the DPDK media [`want`]ed before (net_memif
//! only, if nothing was asked for):
//!
//! - [`Kind::Memif`]: pairs of `net_memif` ports (four, or as many as [`want_memif_channels`]
//!   asks) joined over Unix sockets in a private temporary directory (no root needed).
//! - [`Kind::AfPacket`]: one `net_af_packet` port on each end of the veth pair
//!   `ftvm-ap0`/`ftvm-ap1` (root).
//! - [`Kind::AfXdp`]: one `net_af_xdp` port on each end of the veth pair `ftvm-xd0`/`ftvm-xd1`
//!   (root, 2 MiB hugepages; with it, the whole EAL runs from hugepages).
//!
//! The veth pairs and hugepages are set up on first use by running `scripts/dpdk-setup.sh`
//! (idempotent; the pairs are kept for the next run), the one place those steps live.
//!
//! A pair is taken with [`take`]. The raw ping-pong gives it back afterwards; the log
//! channel consumes it (`transport::dpdk` closes its port when the channel drops, and a closed
//! vdev is gone), so each channel over DPDK uses up one pair. [`cleanup`] closes what is left
//! and removes the files.
//!
//! [`Kind`] and [`want`] exist in every build; the EAL and its ports only with the bench's
//! `dpdk` feature, without which a DPDK row is refused up front (by [`want`]) with the command
//! that builds it.

use std::sync::Mutex;

#[cfg(feature = "dpdk")]
mod ports;
#[cfg(feature = "dpdk")]
pub use ports::{cleanup, give_back_kind, take, MemifPair, MAX_RAW_PAYLOAD};

/// The DPDK media the benchmark measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `net_memif`, two ports of this process joined over a Unix socket.
    Memif,
    /// `net_af_packet` on the two ends of veth pair `ftvm-ap0`/`ftvm-ap1`.
    AfPacket,
    /// `net_af_xdp` on the two ends of veth pair `ftvm-xd0`/`ftvm-xd1`.
    AfXdp,
}

impl Kind {
    /// The bench's name for the medium (`--transport`).
    pub fn row(self) -> &'static str {
        match self {
            Kind::Memif => "dpdk-memif",
            Kind::AfPacket => "dpdk-af-packet",
            Kind::AfXdp => "dpdk-af-xdp",
        }
    }
}

/// The DPDK media [`want`]ed so far.
static WANTED: Mutex<Vec<Kind>> = Mutex::new(Vec::new());

/// memif port pairs to create at EAL init: each channel over DPDK uses one up.
static MEMIF_PAIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(4);

/// Asks for at least `n` channels over memif in this process (call before the first [`take`]).
pub fn want_memif_channels(n: usize) {
    MEMIF_PAIRS.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
}

/// memif port pairs this process creates.
pub(crate) fn memif_pairs() -> usize {
    MEMIF_PAIRS.load(std::sync::atomic::Ordering::Relaxed)
}

impl Kind {
    /// How many channels this process can run over this medium: memif creates as many port
    /// pairs as asked for; a veth end takes one socket only (a second port on the same
    /// interface would see the first one's frames too), and a channel closes its ports.
    pub fn channels(self) -> usize {
        match self {
            Kind::Memif => memif_pairs(),
            Kind::AfPacket | Kind::AfXdp => 1,
        }
    }
}

/// Declares which DPDK media this process will measure; call before the first
/// [`take`] (the EAL and its ports are set up once). In a bench built without the `dpdk`
/// feature, any DPDK medium is an error that says how to rebuild.
pub fn want(kinds: &[Kind]) -> anyhow::Result<()> {
    #[cfg(not(feature = "dpdk"))]
    if let Some(first) = kinds.first() {
        anyhow::bail!("--transport {}: {}", first.row(), super::NO_DPDK);
    }
    let mut w = WANTED.lock().unwrap_or_else(|e| e.into_inner());
    for k in kinds {
        if !w.contains(k) {
            w.push(*k);
        }
    }
    Ok(())
}
