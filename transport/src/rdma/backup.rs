//! The backup's end of the RDMA medium (the seal scanning that finds new records is in
//! `scan.rs`).

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::scan::Scanner;
use super::setup::{AckBlock, RemoteRegion, SEALED_ACK_LEN};
use super::verbs::{post_writes, reap, Completion, Endpoint, RdmaWrite, Registered, SendQueue};
use crate::auth::AckSealer;
use crate::channel::{Ack, BackupLink};
use crate::control;
use crate::error::ChannelError;
use crate::poll::PollPolicy;
use crate::region::{HeapRegion, RingMemory};
use crate::ring::{self, Consumer};

/// The backup's RDMA link: its ring, written by the primary's NIC, and one-sided ACK writes.
pub struct RdmaBackupLink {
    pub(super) ep: Endpoint,
    pub(super) consumer: Consumer<Arc<HeapRegion>>,
    pub(super) ring: Arc<HeapRegion>,
    /// How far the seals found so far go (see `scan.rs`).
    pub(super) scanner: Scanner,
    pub(super) sq: SendQueue,
    /// Source slots for ACK writes the device cannot take inline.
    pub(super) acks: Arc<HeapRegion>,
    pub(super) ack_mr: Registered,
    pub(super) peer: RemoteRegion,
    /// An ACK the send queue had no room for (its bytes and length); cumulative, so only the
    /// newest matters.
    pub(super) pending: Option<([u8; SEALED_ACK_LEN], usize)>,
    /// Seals every ACK (crypto `auth`/`encrypt`).
    pub(super) sealer: Option<AckSealer>,
    /// The ring's registration was revoked when the channel ended.
    pub(super) fenced: bool,
    /// The remote key of the ring's registration (data area and doorbell block).
    pub(super) ring_rkey: u32,
    pub(super) beats: u64,
    pub(super) stream: TcpStream,
    pub(super) wcs: [Completion; 16],
}

impl std::fmt::Debug for RdmaBackupLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaBackupLink")
            .field("ep", &self.ep)
            .field("capacity", &self.scanner.capacity)
            .field("head", &self.scanner.head)
            .finish_non_exhaustive()
    }
}

impl RdmaBackupLink {
    /// Whether the queue pair was fenced ([`BackupLink::fence`]).
    pub fn fenced(&self) -> bool {
        self.fenced
    }

    /// The queue pair's state (`ibv_qp_state`; a system call).
    pub fn qp_state(&self) -> Result<u32, ChannelError> {
        self.ep.qp_state()
    }

    /// Reaps the completions of ACK writes (send-queue room). The backup posts no receives, so a
    /// receive completion cannot happen; one would be the primary's protocol violation.
    pub(super) fn reap(&mut self) -> Result<(), ChannelError> {
        reap(&mut self.ep, &mut self.sq, &mut self.wcs, |_| {
            Err(ChannelError::CorruptMessage(
                "receive completion on the backup".into(),
            ))
        })
    }
}

impl RdmaBackupLink {
    /// Writes `len` bytes of `msg` (a plain or a sealed ACK block) into the primary's ACK
    /// block.
    pub(super) fn send_ack(
        &mut self,
        msg: [u8; SEALED_ACK_LEN],
        len: usize,
    ) -> Result<(), ChannelError> {
        if self.sq.room() < 1 {
            self.reap()?;
            if self.sq.room() < 1 {
                self.pending = Some((msg, len));
                return Ok(());
            }
        }
        // Slot of the request about to be posted; it is reused `depth` requests later, by which
        // time this one has completed (the queue never holds more than `depth`).
        let len = len.min(SEALED_ACK_LEN);
        let slots = self.ack_mr.len / SEALED_ACK_LEN as u64;
        let slot = (self.sq.posted() + 1) % slots;
        let at = slot as usize * SEALED_ACK_LEN;
        debug_assert!(at + SEALED_ACK_LEN <= self.acks.len());
        // SAFETY: `slot < slots`, so the `len` ≤ SEALED_ACK_LEN bytes lie inside the registered
        // slot region owned by `self`; the NIC reads them only for a request posted from this
        // slot, which completed before the slot came round again.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), self.acks.as_ptr().add(at), len);
        }
        let local = self.ack_mr.addr + at as u64;
        let write = RdmaWrite {
            local,
            len: len as u32,
            remote: self.peer.target(0, len as u64)?,
            imm: None,
            send: false,
        };
        // SAFETY: the source is this request's slot in the registered slot region, untouched
        // until the slot comes round again (after the request completed); the target was
        // bounds-checked against the primary's ACK block.
        unsafe {
            post_writes(
                &mut self.ep,
                &mut self.sq,
                self.ack_mr.lkey,
                self.peer.rkey,
                &[write],
            )?;
        }
        self.pending = None;
        Ok(())
    }
}

impl BackupLink for RdmaBackupLink {
    fn peek(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        Ok(self.consumer.peek()?)
    }

    fn receive(&mut self) -> Result<bool, ChannelError> {
        // Completions only free send slots for ACKs here: reap once a signalled one can be
        // outstanding (a failed write also shows as the queue pair's error state).
        if self.sq.in_flight() >= self.sq.signal_every() {
            self.reap()?;
        }
        let arrived = self.scanner.scan(&*self.ring, Instant::now)?;
        if let Some((msg, len)) = self.pending {
            self.send_ack(msg, len)?;
        }
        Ok(arrived)
    }

    fn consume(&mut self) -> Result<(), ChannelError> {
        self.consumer.advance_peeked();
        self.consumer.release();
        Ok(())
    }

    fn ack(&mut self, ack: Ack) -> Result<(), ChannelError> {
        self.beats += 1;
        let block = AckBlock {
            acked: ack.received,
            tail: ring::tail_word(&*self.ring).load(Ordering::Acquire),
            beats: self.beats,
            replayed: ack.replayed,
        };
        let mut msg = [0u8; SEALED_ACK_LEN];
        match &mut self.sealer {
            Some(sealer) => {
                let seal = sealer.seal_msg(&block.fields());
                msg = block.encode_sealed(&seal);
                self.send_ack(msg, SEALED_ACK_LEN)
            }
            None => {
                msg[..super::setup::ACK_LEN].copy_from_slice(&block.encode());
                self.send_ack(msg, super::setup::ACK_LEN)
            }
        }
    }

    fn seal_acks(&mut self, sealer: AckSealer) {
        self.sealer = Some(sealer);
    }

    fn fence(&mut self) {
        if self.fenced {
            return;
        }
        self.fenced = true;
        // The channel is over: the primary that wrote into our ring may be deposed (or only
        // paused, and about to wake up). With the ring's registration gone, its next write gets
        // a remote access error and lands nowhere (its queue pair then goes to ERR).
        match self.ep.revoke(self.ring_rkey) {
            Ok(_) => tracing::info!(
                "RDMA: the log channel ended; the ring's registration revoked: the primary can write nothing more into it"
            ),
            Err(e) => {
                tracing::warn!("RDMA: could not revoke the ring's registration ({e}); moving the queue pair to ERR");
                if let Err(e) = self.ep.fence() {
                    tracing::warn!("RDMA: could not fence the queue pair either: {e}");
                }
            }
        }
    }

    fn check_peer(&mut self) -> Result<(), ChannelError> {
        control::check_peer(&mut self.stream, "RDMA")?;
        self.reap()?;
        self.ep.check_qp()
    }

    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        Ok(PollPolicy::nap(timeout))
    }
}
