//! The backup's end of the RDMA medium (the seal scanning that finds new records is in
//! `scan.rs`).

use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::scan::Scanner;
use super::setup::{AckBlock, RemoteRegion, ACK_LEN};
use super::verbs::{post_writes, reap, Completion, Endpoint, RdmaWrite, Registered, SendQueue};
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
    /// An ACK the send queue had no room for; cumulative, so only the newest matters.
    pub(super) pending: Option<[u8; ACK_LEN]>,
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
    pub(super) fn send_ack(&mut self, msg: [u8; ACK_LEN]) -> Result<(), ChannelError> {
        if self.sq.room() < 1 {
            self.reap()?;
            if self.sq.room() < 1 {
                self.pending = Some(msg);
                return Ok(());
            }
        }
        // Slot of the request about to be posted; it is reused `depth` requests later, by which
        // time this one has completed (the queue never holds more than `depth`).
        let slots = self.ack_mr.len / ACK_LEN as u64;
        let slot = (self.sq.posted() + 1) % slots;
        let at = slot as usize * ACK_LEN;
        debug_assert!(at + ACK_LEN <= self.acks.len());
        // SAFETY: `slot < slots`, so the ACK_LEN bytes lie inside the registered slot region owned by
        // `self`; the NIC reads them only for a request posted from this slot, which completed
        // before the slot came round again.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), self.acks.as_ptr().add(at), ACK_LEN);
        }
        let local = self.ack_mr.addr + at as u64;
        let write = RdmaWrite {
            local,
            len: ACK_LEN as u32,
            remote: self.peer.target(0, ACK_LEN as u64)?,
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
        if let Some(msg) = self.pending {
            self.send_ack(msg)?;
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
        self.send_ack(block.encode())
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
