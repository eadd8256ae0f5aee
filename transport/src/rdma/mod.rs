//! The RDMA medium: the primary writes log frames with one-sided RDMA WRITEs straight into the
//! backup's ring, and the backup writes its cumulative ACK one-sidedly back into a registered
//! block on the primary. Reliable-connected queue pair; works over InfiniBand, RoCE and soft-RoCE
//! (`rdma_rxe`).
//!
//! # Set-up
//! Out of band, over the channel's TCP handshake ([`crate::handshake`]): mutual HMAC
//! authentication first, and only then does the backup create its queue pair, register its ring
//! and send the ring's address, size and rkey (with its QPN, GID and PSN) in the Welcome; the
//! primary, which has checked the backup's proof by then, answers with its own queue pair and the
//! rkey of its ACK block; the backup moves its queue pair to RTS and says `R`. An unauthenticated
//! peer never gets an rkey — none exists yet when it is refused. Both sides check the other's
//! set-up message ([`setup::PeerInfo::decode`]): a ring size that is no power of two or too small
//! for the frames, a region that wraps the address space or a too-small ACK block is refused with
//! [`ChannelError::RdmaSetup`].
//!
//! The TCP socket stays open as the control socket: its end-of-file tells each side at once that
//! the other process died (as the Unix socket of the shared-memory medium does); heartbeats cover
//! a hung peer.
//!
//! # Data path
//! The primary keeps a *mirror* of the backup's ring in its own registered memory, with the same
//! capacity and byte layout: [`crate::ring::Producer`] lays each frame out there as a record
//! (header, payload, wrap padding), and the bytes the record occupies are written to the same
//! offsets of the backup's ring — one RDMA WRITE per frame (two when the record wraps: the
//! padding header, then the record at offset 0), all of a frame's work requests posted with one
//! `ibv_post_send` (on soft-RoCE, one doorbell system call). The backup's ring header is not
//! registered: the primary can only write into the data area (and the doorbell block after it),
//! and the consumer validates every length and counter it reads from it ([`crate::ring`]).
//!
//! ## How the backup learns of new records: sealed head words
//! A seal ([`setup::HeadSeal`]) says "the write of ring bytes `[start, end)` is complete and
//! they add up to `sum`". The frame's write carries its seal in short form right after the
//! record — 16 bytes, `{end, check(end, sum)}` — and the backup polls for it in memory, as
//! perftest's `ib_write_lat` polls its buffer's last byte: no receive to post, no completion for
//! the responder to generate, no completion-queue poll. Its scan (each `receive`):
//! - an intact short seal at its head (the `end` and check word it last accepted) means
//!   nothing was written since — the next frame's write starts there and overwrites it;
//! - otherwise it follows the record headers from its head (at most `WALK_LIMIT` of them) to
//!   the first record followed by a matching short seal: `end` exactly that position (a seal
//!   from an earlier lap holds an older counter) and a check word matching `end` and the sum of
//!   the record's bytes, which the backup computes itself. The headers are only a guess at
//!   where to look (stale from an earlier lap, or half written): what moves the head is a seal
//!   that matches.
//!
//! When the short seal does not fit behind the record (it would cross the ring's end, or land
//! on bytes the backup has not released), and every `DOORBELL_EVERY` frames while older frames
//! are still unreleased (so the walk stays short when frames queue up and each one's seal is
//! overwritten by the next), the full 32-byte seal `{end, start, sum, check}` also goes by a
//! second, inline write into the 64-byte *doorbell block* the backup registered right after its
//! data area (same rkey; announced with [`setup::FLAG_SEALED`]). The backup checks it first.
//!
//! What this relies on: on one RC queue pair, RDMA WRITEs are executed and placed in order, so
//! a seal's bytes land after everything the same and earlier writes carried — what perftest,
//! FaRM-style systems and every memory-polled RDMA protocol rely on; soft-RoCE (`rdma_rxe`)
//! places the packets of a queue pair in order with `memcpy` (x86: stores become visible in
//! program order). It does *not* rely on the bytes *within* one write becoming visible in
//! order (a NIC's DMA or a string copy need not): the `sum` catches a seal that is visible
//! before the bytes it covers (or read torn); such a seal simply does not count yet. A seal
//! whose `end` matches but whose bytes still do not add up after `BAD_SUM_GRACE` (1 s) is
//! corruption ([`ChannelError::CorruptMessage`]), as is a valid doorbell seal claiming bytes
//! before the backup's head, across the ring's end, or beyond what the ring can hold. Either way the consumer still checks every record header, and the
//! receiver every frame's CRC, before anything is acknowledged: a seal only says where to look.
//!
//! Writes of at most `max_inline_data` bytes (heartbeats, small frames with their seal, ACKs)
//! go inline, copied into the work request at post time. Only every
//! [`RdmaConfig::signal_every`]-th work request is signalled ([`verbs::SendQueue`] makes sure a
//! full send queue always holds one), and completion queues are polled only when a signalled
//! request can be outstanding (or receives are expected): a failed request still surfaces at
//! the next reap, at the latest at the heartbeat-paced peer check, which also reaps and reads
//! the queue pair's state. Everything is polled from `poll`/`receive` under the channel's
//! [`crate::PollPolicy`], like every other medium, never waited on.
//!
//! # ACKs
//! The backup publishes `{acked, tail, beats, replayed, check}` (40 bytes, [`setup::AckBlock`])
//! with an inline RDMA WRITE into the primary's ACK block: the cumulative ACK, how far it has
//! released its ring (the primary's free space), a counter that changes with every ACK
//! (heartbeat), and how far its replica has replayed (lag control).
//! The primary reads the block from memory with no verbs call at all; the check word catches a
//! read that raced the write. A new ACK is handed to the channel at once; that the backup was
//! *heard* (which makes the channel read the clock for its liveness bookkeeping) is reported one
//! poll later, which takes a clock read off the output-commit path (in an emulated guest a clock
//! read can cost microseconds).
//!
//! With crypto `auth` or `encrypt` the block is *sealed*: 64 bytes, the four fields, a check
//! word that also covers the seal, and the seal ([`crate::auth::AckSealer`]: a counter and a
//! GMAC tag over the four fields under the backup-to-primary session key). A read that raced
//! the write fails the check word and is retried; a whole block whose seal does not verify, or
//! whose counter is not above the last one taken (a replay), is a forgery and ends the channel
//! ([`ChannelError::Unauthenticated`](crate::ChannelError::Unauthenticated)), as over TCP.
//! Frames carry their trailer here as on every medium (the seal scanning above only says where
//! to look; the channel checks each frame's tag before anything else).
//!
//! ACKs go by RDMA WRITE rather than SEND because the write does strictly less work per ACK: no
//! receive to consume, no receive completion for the responder to generate, and on the primary
//! no completion to poll and no receive to repost — the ACK is one memory read. Neither side
//! posts receives at all.
//!
//! # Measurements
//! Numbers measured on this medium (soft-RoCE in the CI guest), with the commands that produced
//! them, are in `docs/rdma.md`; the README's "RDMA / soft-RoCE" section has the summary.
//!
//! # What someone on the fabric can do, and fencing
//! The rkeys travel only inside the authenticated handshake, and the backup exposes only its
//! ring's data area and doorbell block (the primary only its ACK block), each to its own
//! queue pair: RC queue pairs take packets only from the one peer they are connected to.
//! Someone who can inject packets on the fabric and has learned an rkey and a queue pair's
//! PSN could still place bytes there. What the tags guarantee is that such bytes are never
//! taken for a frame or an ACK: a frame without a valid tag under the session's key is refused
//! before it is parsed, a forged ACK ends the channel. What they cannot stop is someone
//! scribbling (denial of service: the channel ends with a typed error and the pair fails
//! over).
//!
//! A deposed primary (paused past the timeout, say, and the backup took over) must not write
//! into the ring of the replica that replaced it: at the channel's first error
//! ([`crate::channel::BackupLink::fence`], before it asks the arbiter) the backup deregisters
//! its ring's memory region, so from then on the old primary's writes get a remote access error
//! and land nowhere, as Mu fences a deposed leader by revoking its RDMA permissions. (Moving the
//! queue pair to ERR instead was tried first: soft-RoCE then drops the writes silently and the
//! writer kept retrying for 30 s without an error.) The soft-RoCE test
//! `a_deposed_primary_is_fenced` checks it.
//!
//! # Failures
//! A failed completion ([`ChannelError::RdmaCompletion`], e.g. retries exceeded once the peer's
//! queue pair is gone), a queue pair in the error state ([`ChannelError::RdmaQpError`], checked at
//! heartbeat pace), the control socket's end-of-file ([`ChannelError::PeerClosed`]), a silent
//! peer (the channel's heartbeat timeout) and a write outside the peer's registered region
//! ([`ChannelError::RdmaOutOfBounds`], refused before it is posted) all surface as typed errors;
//! nothing waits without a bound.
//!
//! # Without the `rdma` feature
//! The set-up messages ([`setup`]) and the backup's seal scanning (`scan`) are plain code over
//! bytes and memory: they build without libibverbs, for the `rdma_setup` fuzz check
//! ([`crate::fuzz::rdma_setup`]). The queue pairs, the two links and the connection set-up need
//! the feature.

#[cfg(feature = "rdma")]
mod backup;
#[cfg(feature = "rdma")]
mod connect;
#[cfg(feature = "rdma")]
mod primary;
pub(crate) mod scan;
pub mod setup;
#[cfg(feature = "rdma")]
pub mod verbs;

use std::net::IpAddr;
#[cfg(feature = "rdma")]
use std::sync::Arc;
use std::time::Duration;

use crate::error::ChannelError;
#[cfg(feature = "rdma")]
use crate::region::HeapRegion;
#[cfg(feature = "rdma")]
use crate::ring::RingError;

#[cfg(feature = "rdma")]
pub use self::backup::RdmaBackupLink;
#[cfg(feature = "rdma")]
pub use self::connect::{accept, backup_on, connect, primary_on};
#[cfg(feature = "rdma")]
pub use self::primary::RdmaPrimaryLink;
#[cfg(feature = "rdma")]
pub use self::verbs::device_names;

/// Receive work requests carry this bit in their ids, send requests never do.
pub const RECV_TAG: u64 = 1 << 63;
/// With a backlog of unreleased frames, every this many frames the primary also writes the
/// seal into the doorbell block, so the backup's walk over record headers stays short.
pub(crate) const DOORBELL_EVERY: u32 = 16;
/// Record headers the backup's scan follows at most per poll (the doorbell seals keep the
/// distance between two readable seals to about `DOORBELL_EVERY` frames).
pub(super) const WALK_LIMIT: usize = 64;
/// How long a seal whose bytes do not add up may stay so before it is corruption.
pub(super) const BAD_SUM_GRACE: Duration = Duration::from_secs(1);

/// Which RDMA device and port a channel end uses, and how its queues are sized; named after
/// perftest's options (`-d`, `-i`, `-x`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaConfig {
    /// Device name, as `ibv_devices` lists it (e.g. `"rxe0"`, `"mlx5_0"`).
    pub device: String,
    /// Port number on the device (perftest `-i`), usually 1.
    pub ib_port: u8,
    /// GID table index (perftest `-x`); on RoCE, the entry that maps this side's IP address.
    pub gid_index: u8,
    /// Send queue slots requested.
    pub send_queue_depth: u32,
    /// Signal one send work request in this many (clamped to a quarter of the queue).
    pub signal_every: u32,
    /// Inline bytes requested per work request (`max_inline_data`); writes up to what the device
    /// grants are copied at post time instead of read from registered memory.
    pub max_inline: u32,
    /// Local ACK timeout exponent (4.096 µs × 2^n) before the NIC retransmits; 7 retries.
    pub retry_timeout: u8,
}

impl RdmaConfig {
    /// Port 1 of `device`, GID index `gid_index`, default queue sizes.
    pub fn new(device: impl Into<String>, gid_index: u8) -> Self {
        RdmaConfig {
            device: device.into(),
            ib_port: 1,
            gid_index,
            send_queue_depth: 256,
            signal_every: 32,
            max_inline: 256,
            retry_timeout: 14,
        }
    }

    /// One side's device, GID index and IP address from `FTVM_RDMA_DEV_<side>`,
    /// `FTVM_RDMA_GID_<side>` and `FTVM_RDMA_IP_<side>` (`side` is `"A"` for the primary, `"B"`
    /// for the backup) — the contract of the soft-RoCE CI guest. Missing or malformed variables
    /// are a [`ChannelError::Config`] naming them.
    pub fn from_env(side: &str) -> Result<(Self, IpAddr), ChannelError> {
        let var = |name: String| {
            std::env::var(&name).map_err(|_| {
                ChannelError::Config(format!(
                    "{name} is not set: RDMA tests and benchmarks need FTVM_RDMA_DEV_A/B, \
                     FTVM_RDMA_GID_A/B and FTVM_RDMA_IP_A/B (they run in the soft-RoCE guest)"
                ))
            })
        };
        let device = var(format!("FTVM_RDMA_DEV_{side}"))?;
        let gid_name = format!("FTVM_RDMA_GID_{side}");
        let gid: u8 = var(gid_name.clone())?
            .trim()
            .parse()
            .map_err(|_| ChannelError::Config(format!("{gid_name} is not a GID index")))?;
        let ip_name = format!("FTVM_RDMA_IP_{side}");
        let ip: IpAddr = var(ip_name.clone())?
            .trim()
            .parse()
            .map_err(|_| ChannelError::Config(format!("{ip_name} is not an IP address")))?;
        Ok((RdmaConfig::new(device, gid), ip))
    }
}

impl Default for RdmaConfig {
    /// Soft-RoCE's first device: `rxe0`, port 1, GID index 0.
    fn default() -> Self {
        RdmaConfig::new("rxe0", 0)
    }
}

#[cfg(feature = "rdma")]
pub(super) fn heap(len: usize) -> Result<Arc<HeapRegion>, ChannelError> {
    Ok(Arc::new(HeapRegion::new(len).map_err(RingError::from)?))
}
