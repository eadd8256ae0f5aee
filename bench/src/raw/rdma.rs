//! RDMA: WRITE into the peer's registered buffer (memory-polled), or WRITE WITH IMMEDIATE
//! (completion-polled); both queue pairs in this process (device A for the client, B for the
//! echo side), connected directly without a handshake.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{ensure, Context};
use hdrhistogram::Histogram;
use transport::rdma::setup::{PeerInfo, RemoteRegion, Role};
use transport::rdma::verbs::{
    post_writes, reap, Completion, Endpoint as Verbs, RdmaWrite, Registered, SendQueue,
    NO_COMPLETION,
};
use transport::rdma::{RdmaConfig, RECV_TAG};
use transport::region::RingMemory;
use transport::HeapRegion;

use super::{drive, Backoff, Endpoint, FailFlag, Plan};

/// The ping-pong over a connected pair of queue pairs (`imm`: writes with immediate).
pub(super) fn run(
    imm: bool,
    devices: Option<(RdmaConfig, RdmaConfig)>,
    hist: Histogram<u64>,
    plan: &Plan,
    peer_failed: &FailFlag,
) -> anyhow::Result<Histogram<u64>> {
    let (client, server) = pair(plan.payload, imm, devices, peer_failed)?;
    drive(client, server, hist, plan, peer_failed)
}

/// One side: a registered send buffer, a registered receive buffer the peer writes into.
pub struct RdmaEnd<'a> {
    ep: Verbs,
    sq: SendQueue,
    send_mem: Arc<HeapRegion>,
    send_mr: Registered,
    recv_mem: Arc<HeapRegion>,
    peer: RemoteRegion,
    wcs: [Completion; 16],
    next_recv: u64,
    /// Writes with immediate (completion-polled) rather than memory-polled writes.
    imm: bool,
    /// Messages received so far: the index the next one carries.
    received: u64,
    peer_failed: &'a FailFlag,
}

fn half<'a>(
    cfg: &RdmaConfig,
    payload: usize,
    imm: bool,
    peer_failed: &'a FailFlag,
) -> anyhow::Result<(RdmaEnd<'a>, PeerInfo, Registered)> {
    let mut ep = Verbs::open(cfg, cfg.send_queue_depth, 64)?;
    let len = payload.div_ceil(4096) * 4096;
    let send_mem = Arc::new(HeapRegion::new(len)?);
    let recv_mem = Arc::new(HeapRegion::new(len)?);
    // No message carries index u64::MAX: a memory-polled receive never mistakes the
    // initial contents for one.
    // SAFETY: the fresh region holds `len` bytes and nothing else uses it yet.
    unsafe { std::ptr::write_bytes(recv_mem.as_ptr(), 0xff, len) };
    let send_mr = ep.register(&send_mem, 0, len, false)?;
    let recv_mr = ep.register(&recv_mem, 0, len, true)?;
    ep.to_init()?;
    if imm {
        ep.post_recvs(RECV_TAG, 64)?;
    }
    let info = PeerInfo {
        role: Role::Backup,
        mtu: ep.mtu,
        qpn: ep.qpn(),
        psn: ep.psn,
        lid: ep.lid,
        flags: 0,
        rkey: recv_mr.rkey,
        gid: ep.gid,
        addr: recv_mr.addr,
        len: recv_mr.len,
    };
    let sq = SendQueue::new(ep.sq_depth, cfg.signal_every);
    let end = RdmaEnd {
        ep,
        sq,
        send_mem,
        send_mr,
        recv_mem,
        peer: RemoteRegion {
            addr: 0,
            len: 0,
            rkey: 0,
        },
        wcs: [NO_COMPLETION; 16],
        next_recv: RECV_TAG + 64,
        imm,
        received: 0,
        peer_failed,
    };
    Ok((end, info, recv_mr))
}

/// Both sides, connected to each other: the client on `devices.0` (default: side A of the
/// `FTVM_RDMA_*` environment), the echo on `devices.1` (side B).
pub fn pair(
    payload: usize,
    imm: bool,
    devices: Option<(RdmaConfig, RdmaConfig)>,
    peer_failed: &FailFlag,
) -> anyhow::Result<(RdmaEnd<'_>, RdmaEnd<'_>)> {
    let (a, b) = match devices {
        Some(d) => d,
        None => (RdmaConfig::from_env("A")?.0, RdmaConfig::from_env("B")?.0),
    };
    let (mut client, ci, _) = half(&a, payload, imm, peer_failed)?;
    let (mut server, si, _) = half(&b, payload, imm, peer_failed)?;
    client.ep.connect(&si, a.retry_timeout)?;
    server.ep.connect(&ci, b.retry_timeout)?;
    client.peer = RemoteRegion {
        addr: si.addr,
        len: si.len,
        rkey: si.rkey,
    };
    server.peer = RemoteRegion {
        addr: ci.addr,
        len: ci.len,
        rkey: ci.rkey,
    };
    Ok((client, server))
}

impl RdmaEnd<'_> {
    /// The 8-byte word at byte `at` of the receive buffer, read atomically (the peer's NIC
    /// writes it).
    fn recv_word(&self, at: usize) -> u64 {
        debug_assert!(at + 8 <= self.recv_mem.len());
        // SAFETY: the 8 bytes at `at` lie inside the receive buffer, which `self` keeps
        // alive; a volatile read of a byte array has no alignment requirement, and the
        // caller only trusts the value once the whole message is there.
        let bytes =
            unsafe { std::ptr::read_volatile(self.recv_mem.as_ptr().add(at).cast::<[u8; 8]>()) };
        std::sync::atomic::fence(Ordering::Acquire);
        u64::from_le_bytes(bytes)
    }
}

impl Endpoint for RdmaEnd<'_> {
    fn send(&mut self, buf: &[u8]) -> anyhow::Result<()> {
        ensure!(
            buf.len() <= self.send_mem.len(),
            "payload larger than the buffer"
        );
        let mut backoff = Backoff::new(self.peer_failed);
        // Completions only free send slots: reap once a signalled one can be outstanding.
        if self.sq.in_flight() >= self.sq.signal_every() {
            reap(&mut self.ep, &mut self.sq, &mut self.wcs, |_| Ok(()))?;
        }
        while self.sq.room() < 1 {
            reap(&mut self.ep, &mut self.sq, &mut self.wcs, |_| Ok(()))?;
            backoff.snooze("a free send slot")?;
        }
        // SAFETY: `buf` fits the send buffer (checked above), which this side owns. The
        // previous write from it has landed: the peer echoed it before this send.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.send_mem.as_ptr(), buf.len()) };
        let len = u32::try_from(buf.len()).context("payload length")?;
        let write = RdmaWrite {
            local: self.send_mr.addr,
            len,
            remote: self.peer.target(0, u64::from(len))?,
            imm: self.imm.then_some(len),
            send: false,
        };
        // SAFETY: the source is the registered send buffer, untouched until the echo came
        // back; the target was bounds-checked against the peer's receive buffer.
        unsafe {
            post_writes(
                &mut self.ep,
                &mut self.sq,
                self.send_mr.lkey,
                self.peer.rkey,
                &[write],
            )?
        };
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        ensure!(
            buf.len() <= self.recv_mem.len() && buf.len() >= 8,
            "payload of {} bytes does not fit the receive buffer",
            buf.len()
        );
        let mut backoff = Backoff::new(self.peer_failed);
        let want = self.received;
        loop {
            let arrived = if self.imm {
                let mut got = None;
                reap(&mut self.ep, &mut self.sq, &mut self.wcs, |c| {
                    got = Some(c.imm);
                    Ok(())
                })?;
                if let Some(len) = got {
                    ensure!(
                        len as usize == buf.len(),
                        "received {len} bytes, expected {}",
                        buf.len()
                    );
                    self.ep.post_recvs(self.next_recv, 1)?;
                    self.next_recv += 1;
                }
                got.is_some()
            } else {
                // The message's last word, then its first, carry its index (as perftest
                // polls the last byte); a message whose index is not there yet has not
                // arrived yet.
                self.recv_word(buf.len() - 8) == want && self.recv_word(0) == want
            };
            if arrived {
                // SAFETY: the message lies inside the receive buffer (the sender wrote it
                // there, bounds-checked); the peer writes again only after our next send.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.recv_mem.as_ptr(),
                        buf.as_mut_ptr(),
                        buf.len(),
                    )
                };
                self.received += 1;
                return Ok(());
            }
            backoff.snooze("an RDMA write from the peer")?;
        }
    }
}
