//! A thin owner of the verbs resources one channel end needs — device context, protection
//! domain, one completion queue, one reliable-connected queue pair and its memory registrations —
//! over the raw `rdma-sys` bindings.
//!
//! `ibv_post_send`, `ibv_post_recv` and `ibv_poll_cq` are `static inline` in `<infiniband/verbs.h>`
//! (they jump through the provider's function table), so bindgen cannot bind them and `rdma-sys`
//! does not re-implement them; we do the same jump through `ibv_context::ops`, looked up once when
//! the device is opened (a provider without them is refused with a typed error).

use std::ffi::CStr;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use rdma_sys::{
    ___ibv_query_port, ibv_access_flags, ibv_alloc_pd, ibv_close_device, ibv_context, ibv_cq,
    ibv_create_cq, ibv_create_qp, ibv_dealloc_pd, ibv_dereg_mr, ibv_destroy_cq, ibv_destroy_qp,
    ibv_free_device_list, ibv_get_device_list, ibv_get_device_name, ibv_gid, ibv_modify_qp, ibv_mr,
    ibv_open_device, ibv_pd, ibv_port_attr, ibv_port_state, ibv_qp, ibv_qp_attr, ibv_qp_attr_mask,
    ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_query_gid, ibv_query_qp, ibv_recv_wr,
    ibv_reg_mr, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_status, ibv_wc_status_str,
    ibv_wr_opcode,
};

use super::setup::PeerInfo;
use super::RdmaConfig;
use crate::error::ChannelError;
use crate::region::{HeapRegion, RingMemory};

type PostSend =
    unsafe extern "C" fn(*mut ibv_qp, *mut ibv_send_wr, *mut *mut ibv_send_wr) -> libc::c_int;
type PostRecv =
    unsafe extern "C" fn(*mut ibv_qp, *mut ibv_recv_wr, *mut *mut ibv_recv_wr) -> libc::c_int;
type PollCq = unsafe extern "C" fn(*mut ibv_cq, libc::c_int, *mut ibv_wc) -> libc::c_int;

fn verbs_err(op: &'static str) -> ChannelError {
    ChannelError::RdmaVerbs {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Verbs calls that return an errno value (0 = success) instead of setting `errno`.
fn check_rc(op: &'static str, rc: libc::c_int) -> Result<(), ChannelError> {
    if rc == 0 {
        Ok(())
    } else {
        let code = if rc > 0 {
            rc
        } else {
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        };
        Err(ChannelError::RdmaVerbs {
            op,
            source: std::io::Error::from_raw_os_error(code),
        })
    }
}

/// Lists the RDMA devices libibverbs sees. Fails with [`ChannelError::RdmaDevice`] when the
/// kernel has no RDMA support at all (`ibv_get_device_list` fails, e.g. with `ENOSYS`).
pub fn device_names() -> Result<Vec<String>, ChannelError> {
    with_device_list("", |_| None::<()>).map(|(_, names)| names)
}

/// Runs `pick` over the device list (name by name) and returns what it picked and every name.
fn with_device_list<T>(
    wanted: &str,
    mut pick: impl FnMut(*mut rdma_sys::ibv_device) -> Option<T>,
) -> Result<(Option<T>, Vec<String>), ChannelError> {
    let mut n: libc::c_int = 0;
    // SAFETY: `n` is a valid out-pointer; the returned list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        let err = std::io::Error::last_os_error();
        return Err(ChannelError::RdmaDevice {
            device: wanted.to_string(),
            reason: format!(
                "cannot list RDMA devices: {err} (no kernel RDMA support: load ib_uverbs and a \
                 driver, e.g. rdma_rxe for soft-RoCE)"
            ),
        });
    }
    let mut names = Vec::new();
    let mut picked = None;
    for i in 0..usize::try_from(n).unwrap_or(0) {
        // SAFETY: the list holds `n` device pointers (and a terminating null).
        let dev = unsafe { *list.add(i) };
        if dev.is_null() {
            break;
        }
        // SAFETY: `dev` is a device of the live list; the name is a NUL-terminated string owned
        // by it, copied before the list is freed.
        let name = unsafe { CStr::from_ptr(ibv_get_device_name(dev)) }
            .to_string_lossy()
            .into_owned();
        if picked.is_none() && name == wanted {
            picked = pick(dev);
        }
        names.push(name);
    }
    // SAFETY: `list` came from `ibv_get_device_list` and is freed once; opened contexts stay valid.
    unsafe { ibv_free_device_list(list) };
    Ok((picked, names))
}

/// The outcome of one work completion, copied out of the CQ entry.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The work request's id.
    pub wr_id: u64,
    /// Whether it completed successfully.
    pub ok: bool,
    /// `ibv_wc_status`.
    pub status: u32,
    /// Device-specific error code.
    pub vendor_err: u32,
    /// `ibv_wc_opcode` (valid only when `ok`).
    pub opcode: u32,
    /// Immediate data, host order (receives of a write-with-immediate).
    pub imm: u32,
}

impl Completion {
    /// The typed error for a failed completion.
    pub fn error(&self) -> ChannelError {
        // SAFETY: `ibv_wc_status_str` returns a static NUL-terminated string for any value.
        let text = unsafe { CStr::from_ptr(ibv_wc_status_str(self.status)) }
            .to_string_lossy()
            .into_owned();
        ChannelError::RdmaCompletion {
            status: self.status,
            status_text: text,
            vendor_err: self.vendor_err,
        }
    }
}

/// A local memory registration: the keys and address a work request names.
#[derive(Debug, Clone, Copy)]
pub struct Registered {
    /// Local key (for scatter/gather entries).
    pub lkey: u32,
    /// Remote key (for the peer's writes).
    pub rkey: u32,
    /// Address of the registered range's first byte.
    pub addr: u64,
    /// Bytes registered.
    pub len: u64,
}

/// One channel end's verbs resources. Dropped in the order verbs requires: queue pair, memory
/// registrations (before the memory they cover, which they keep alive), completion queue,
/// protection domain, device.
pub struct Endpoint {
    ctx: NonNull<ibv_context>,
    pd: *mut ibv_pd,
    cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    mrs: Vec<(*mut ibv_mr, Arc<HeapRegion>)>,
    post_send_fn: PostSend,
    post_recv_fn: PostRecv,
    poll_cq_fn: PollCq,
    /// Port used.
    pub port: u8,
    /// GID table index used.
    pub gid_index: u8,
    /// This port's GID.
    pub gid: [u8; 16],
    /// This port's LID.
    pub lid: u16,
    /// The port's active MTU (`ibv_mtu`).
    pub mtu: u8,
    /// Inline bytes the queue pair accepts per work request.
    pub max_inline: u32,
    /// Send queue depth granted.
    pub sq_depth: u32,
    /// Receive queue depth granted.
    pub rq_depth: u32,
    /// Our initial packet sequence number.
    pub psn: u32,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("qpn", &self.qpn())
            .field("mtu", &self.mtu)
            .field("max_inline", &self.max_inline)
            .field("sq_depth", &self.sq_depth)
            .finish_non_exhaustive()
    }
}

// SAFETY: the verbs objects are plain handles into libibverbs, which is thread-safe; an
// `Endpoint` is used by one thread at a time (it is not `Sync`), and moving it between threads
// moves only pointers.
unsafe impl Send for Endpoint {}

impl Endpoint {
    /// Opens `cfg.device`, checks its port and GID, and creates a PD, a CQ and an RC queue pair
    /// (still in the RESET state) with `sq_depth` send and `rq_depth` receive slots.
    pub fn open(cfg: &RdmaConfig, sq_depth: u32, rq_depth: u32) -> Result<Self, ChannelError> {
        let dev_err = |reason: String| ChannelError::RdmaDevice {
            device: cfg.device.clone(),
            reason,
        };
        let (ctx, names) = with_device_list(&cfg.device, |dev| {
            // SAFETY: `dev` is a live entry of the device list.
            NonNull::new(unsafe { ibv_open_device(dev) })
        })?;
        let Some(ctx) = ctx else {
            return Err(dev_err(if names.contains(&cfg.device) {
                format!("cannot open it: {}", std::io::Error::last_os_error())
            } else {
                format!("no such device (devices present: {names:?})")
            }));
        };
        // SAFETY: `ctx` is an open context; its ops table is filled by the provider.
        let ops = unsafe { (*ctx.as_ptr()).ops };
        let (Some(post_send_fn), Some(post_recv_fn), Some(poll_cq_fn)) =
            (ops.post_send, ops.post_recv, ops.poll_cq)
        else {
            // SAFETY: closing the context we just opened.
            unsafe { ibv_close_device(ctx.as_ptr()) };
            return Err(dev_err("provider lacks post_send/post_recv/poll_cq".into()));
        };
        let mut ep = Endpoint {
            ctx,
            pd: ptr::null_mut(),
            cq: ptr::null_mut(),
            qp: ptr::null_mut(),
            mrs: Vec::new(),
            post_send_fn,
            post_recv_fn,
            poll_cq_fn,
            port: cfg.ib_port,
            gid_index: cfg.gid_index,
            gid: [0; 16],
            lid: 0,
            mtu: 0,
            max_inline: 0,
            sq_depth,
            rq_depth,
            psn: 0,
        };
        // From here on, `ep`'s Drop releases whatever was created if a step fails.

        // SAFETY: all-zero is a valid `ibv_port_attr` (plain integers).
        let mut port: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open and `port` a valid out-pointer of the full struct size.
        let rc = unsafe { ___ibv_query_port(ctx.as_ptr(), cfg.ib_port, &mut port) };
        if rc != 0 {
            return Err(dev_err(format!(
                "cannot query port {}: {}",
                cfg.ib_port,
                std::io::Error::from_raw_os_error(rc.abs())
            )));
        }
        if port.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(dev_err(format!(
                "port {} is not active (state {})",
                cfg.ib_port, port.state
            )));
        }
        ep.lid = port.lid;
        ep.mtu = u8::try_from(port.active_mtu).unwrap_or(1).clamp(1, 5);

        // SAFETY: all-zero is a valid `ibv_gid` (16 bytes).
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `gid` is a valid out-pointer.
        let rc = unsafe {
            ibv_query_gid(
                ctx.as_ptr(),
                cfg.ib_port,
                libc::c_int::from(cfg.gid_index),
                &mut gid,
            )
        };
        // SAFETY: every bit pattern of the union is a valid `[u8; 16]`.
        let raw = unsafe { gid.raw };
        if rc != 0 || raw == [0; 16] {
            return Err(dev_err(format!(
                "GID index {} on port {} is empty or unreadable (rc {rc}); see \
                 /sys/class/infiniband/{}/ports/{}/gids/",
                cfg.gid_index, cfg.ib_port, cfg.device, cfg.ib_port
            )));
        }
        ep.gid = raw;

        // SAFETY: `ctx` is open.
        ep.pd = unsafe { ibv_alloc_pd(ctx.as_ptr()) };
        if ep.pd.is_null() {
            return Err(verbs_err("allocating a protection domain"));
        }
        let cqe = libc::c_int::try_from(sq_depth + rq_depth + 16)
            .map_err(|_| ChannelError::Config("RDMA queue depths too large".into()))?;
        // SAFETY: `ctx` is open; no completion channel, no vector.
        ep.cq = unsafe { ibv_create_cq(ctx.as_ptr(), cqe, ptr::null_mut(), ptr::null_mut(), 0) };
        if ep.cq.is_null() {
            return Err(verbs_err("creating a completion queue"));
        }
        // Ask for the configured inline size; devices that grant less (or none) get a second try
        // without, and then every write goes out of registered memory.
        for inline in [cfg.max_inline, 0] {
            // SAFETY: all-zero is a valid `ibv_qp_init_attr` (pointers null, integers zero).
            let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
            init.send_cq = ep.cq;
            init.recv_cq = ep.cq;
            init.cap.max_send_wr = sq_depth;
            init.cap.max_recv_wr = rq_depth.max(1);
            init.cap.max_send_sge = 1;
            init.cap.max_recv_sge = 1;
            init.cap.max_inline_data = inline;
            init.qp_type = ibv_qp_type::IBV_QPT_RC;
            init.sq_sig_all = 0;
            // SAFETY: `pd` and `cq` are live; `init` is fully initialised; the provider writes
            // the granted capabilities back into it.
            ep.qp = unsafe { ibv_create_qp(ep.pd, &mut init) };
            if !ep.qp.is_null() {
                ep.max_inline = init.cap.max_inline_data;
                ep.sq_depth = init.cap.max_send_wr.min(sq_depth);
                ep.rq_depth = init.cap.max_recv_wr.min(rq_depth);
                break;
            }
        }
        if ep.qp.is_null() {
            return Err(verbs_err("creating an RC queue pair"));
        }
        let mut psn = [0u8; 4];
        getrandom::getrandom(&mut psn).map_err(|e| ChannelError::RdmaVerbs {
            op: "choosing a PSN",
            source: std::io::Error::other(e.to_string()),
        })?;
        ep.psn = u32::from_le_bytes(psn) & 0x00ff_ffff;
        Ok(ep)
    }

    /// Our queue-pair number.
    pub fn qpn(&self) -> u32 {
        if self.qp.is_null() {
            0
        } else {
            // SAFETY: `qp` is a live queue pair owned by `self`.
            unsafe { (*self.qp).qp_num }
        }
    }

    /// Registers `len` bytes at `offset` of `region` (kept alive until the registration is
    /// dropped with this endpoint).
    pub fn register(
        &mut self,
        region: &Arc<HeapRegion>,
        offset: usize,
        len: usize,
        remote_write: bool,
    ) -> Result<Registered, ChannelError> {
        if offset.checked_add(len).is_none_or(|end| end > region.len()) || len == 0 {
            return Err(ChannelError::Config(format!(
                "registering [{offset}, +{len}) of a {}-byte region",
                region.len()
            )));
        }
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        if remote_write {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        // SAFETY: the range lies inside `region` (checked above), which the registration keeps
        // alive through the `Arc` stored next to it; `pd` is live.
        let mr = unsafe {
            ibv_reg_mr(
                self.pd,
                region.as_ptr().add(offset).cast(),
                len,
                access as libc::c_int,
            )
        };
        if mr.is_null() {
            return Err(verbs_err("registering memory"));
        }
        self.mrs.push((mr, region.clone()));
        // SAFETY: `mr` is the live registration just created.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        Ok(Registered {
            lkey,
            rkey,
            addr: region.as_ptr() as u64 + offset as u64,
            len: len as u64,
        })
    }

    fn modify(
        &mut self,
        attr: &mut ibv_qp_attr,
        mask: u32,
        op: &'static str,
    ) -> Result<(), ChannelError> {
        // SAFETY: `qp` is live; `attr` is a fully initialised attribute block.
        let rc = unsafe { ibv_modify_qp(self.qp, attr, mask as libc::c_int) };
        check_rc(op, rc)
    }

    /// RESET → INIT, allowing the peer to write into our registered memory.
    pub fn to_init(&mut self) -> Result<(), ChannelError> {
        // SAFETY: all-zero is a valid `ibv_qp_attr`.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = 0;
        attr.port_num = self.port;
        attr.qp_access_flags = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX.0
            | ibv_qp_attr_mask::IBV_QP_PORT.0
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS.0;
        self.modify(&mut attr, mask, "moving the queue pair to INIT")
    }

    /// INIT → RTR → RTS, connected to `peer`.
    pub fn connect(&mut self, peer: &PeerInfo, retry_timeout: u8) -> Result<(), ChannelError> {
        // SAFETY: all-zero is a valid `ibv_qp_attr`.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = u32::from(self.mtu.min(peer.mtu));
        attr.dest_qp_num = peer.qpn;
        attr.rq_psn = peer.psn;
        attr.max_dest_rd_atomic = 1;
        attr.min_rnr_timer = 1;
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh.dgid = ibv_gid { raw: peer.gid };
        attr.ah_attr.grh.sgid_index = self.gid_index;
        attr.ah_attr.grh.hop_limit = 64;
        attr.ah_attr.dlid = peer.lid;
        attr.ah_attr.sl = 0;
        attr.ah_attr.port_num = self.port;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_AV.0
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU.0
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN.0
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN.0
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC.0
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER.0;
        self.modify(&mut attr, mask, "moving the queue pair to RTR")?;

        // SAFETY: as above.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = retry_timeout;
        attr.retry_cnt = 7;
        attr.rnr_retry = 7;
        attr.sq_psn = self.psn;
        attr.max_rd_atomic = 1;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT.0
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT.0
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY.0
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN.0
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC.0;
        self.modify(&mut attr, mask, "moving the queue pair to RTS")
    }

    /// Revokes the peer's access to the registration whose remote key is `rkey`: deregisters
    /// it, so a write with that key gets a remote access error (NAK) at once and lands nowhere,
    /// and the writer's queue pair goes to its error state. The memory stays allocated (its
    /// owner's `Arc`). `false` if no registration has that key.
    pub fn revoke(&mut self, rkey: u32) -> Result<bool, ChannelError> {
        // SAFETY: every `mr` in `mrs` is a live registration of this endpoint.
        let Some(i) = self
            .mrs
            .iter()
            .position(|(mr, _)| unsafe { (**mr).rkey } == rkey)
        else {
            return Ok(false);
        };
        let (mr, _region) = self.mrs.swap_remove(i);
        // SAFETY: `mr` is live and removed from `mrs`, so it is deregistered exactly once; the
        // region it covers outlives the call (`_region`).
        let rc = unsafe { ibv_dereg_mr(mr) };
        check_rc("deregistering memory (fencing the peer)", rc)?;
        Ok(true)
    }

    /// Moves the queue pair to the error state: from now on it neither sends nor takes any
    /// packet. (A peer's writes are then dropped silently, and soft-RoCE's requester was seen
    /// to keep retrying them for 30 s without an error: [`Endpoint::revoke`] is what fences a
    /// peer promptly.) Irreversible for this queue pair.
    pub fn fence(&mut self) -> Result<(), ChannelError> {
        // SAFETY: all-zero is a valid `ibv_qp_attr`.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.qp_state = ibv_qp_state::IBV_QPS_ERR;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE.0;
        self.modify(
            &mut attr,
            mask,
            "moving the queue pair to ERR (fencing the peer)",
        )
    }

    /// The queue pair's current state (`ibv_qp_state`); a system call, so call it at heartbeat
    /// pace only.
    pub fn qp_state(&self) -> Result<u32, ChannelError> {
        // SAFETY: all-zero is valid for both attribute blocks.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `qp` is live; both out-pointers are valid.
        let rc = unsafe {
            ibv_query_qp(
                self.qp,
                &mut attr,
                ibv_qp_attr_mask::IBV_QP_STATE.0 as libc::c_int,
                &mut init,
            )
        };
        check_rc("querying the queue pair", rc)?;
        Ok(attr.qp_state)
    }

    /// Fails with [`ChannelError::RdmaQpError`] if the queue pair has gone into the error state.
    pub fn check_qp(&self) -> Result<(), ChannelError> {
        match self.qp_state()? {
            ibv_qp_state::IBV_QPS_ERR | ibv_qp_state::IBV_QPS_SQE => Err(ChannelError::RdmaQpError),
            _ => Ok(()),
        }
    }

    /// Posts a chain of send work requests.
    ///
    /// # Safety
    /// `wr` must head a valid, null-terminated chain whose scatter/gather entries name memory
    /// registered with this endpoint (or are inline), and which stays valid until the call
    /// returns; non-inline memory must stay untouched until the request completes.
    pub unsafe fn post_send(&mut self, wr: *mut ibv_send_wr) -> Result<(), ChannelError> {
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the caller vouches for the chain; `qp` is live and in RTS.
        let rc = unsafe { (self.post_send_fn)(self.qp, wr, &mut bad) };
        check_rc("posting a write", rc)
    }

    /// Posts `n` receive work requests without buffers (for writes with immediate data), with
    /// ids `first_id..first_id + n`.
    pub fn post_recvs(&mut self, first_id: u64, n: usize) -> Result<(), ChannelError> {
        if n == 0 {
            return Ok(());
        }
        let mut wrs: Vec<ibv_recv_wr> = (0..n)
            .map(|i| ibv_recv_wr {
                wr_id: first_id + i as u64,
                next: ptr::null_mut(),
                sg_list: ptr::null_mut(),
                num_sge: 0,
            })
            .collect();
        for i in 0..n - 1 {
            let next: *mut ibv_recv_wr = &mut wrs[i + 1];
            wrs[i].next = next;
        }
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: `wrs` is a valid null-terminated chain without buffers, alive for the call.
        let rc = unsafe { (self.post_recv_fn)(self.qp, wrs.as_mut_ptr(), &mut bad) };
        check_rc("posting receives", rc)
    }

    /// Posts one receive work request `wr_id` into `len` bytes at `addr` (registered under
    /// `lkey`), for a SEND from the peer.
    ///
    /// # Safety
    /// The buffer must lie in memory registered with this endpoint under `lkey` and stay
    /// untouched by anyone but the NIC until the receive completes.
    pub unsafe fn post_recv_buffer(
        &mut self,
        wr_id: u64,
        addr: u64,
        len: u32,
        lkey: u32,
    ) -> Result<(), ChannelError> {
        let mut sge = ibv_sge {
            addr,
            length: len,
            lkey,
        };
        let mut wr = ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: `wr` and `sge` live for the call; the caller vouches for the buffer.
        let rc = unsafe { (self.post_recv_fn)(self.qp, &mut wr, &mut bad) };
        check_rc("posting a receive buffer", rc)
    }

    /// Reaps up to `out.len()` completions without blocking; returns how many.
    pub fn poll(&mut self, out: &mut [Completion]) -> Result<usize, ChannelError> {
        const BATCH: usize = 16;
        // SAFETY: all-zero is a valid `ibv_wc` (integers and a union of integers).
        let mut wcs: [ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        let want = out.len().min(BATCH) as libc::c_int;
        // SAFETY: `cq` is live; `wcs` has room for `want` entries.
        let n = unsafe { (self.poll_cq_fn)(self.cq, want, wcs.as_mut_ptr()) };
        if n < 0 {
            return Err(ChannelError::RdmaVerbs {
                op: "polling the completion queue",
                source: std::io::Error::from_raw_os_error(-n),
            });
        }
        let n = n as usize;
        for (wc, slot) in wcs.iter().take(n).zip(out.iter_mut()) {
            *slot = Completion {
                wr_id: wc.wr_id,
                ok: wc.status == ibv_wc_status::IBV_WC_SUCCESS,
                status: wc.status,
                vendor_err: wc.vendor_err,
                opcode: wc.opcode,
                // SAFETY: both union members are plain u32; the value is meaningful only for
                // receives of writes with immediate data, where it is the immediate.
                imm: u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data }),
            };
        }
        Ok(n)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // SAFETY: each handle was created by this endpoint and is destroyed exactly once, in
        // dependency order; null handles (a failed `open`) are skipped. The regions behind the
        // registrations are released only after deregistration (the `Arc`s drop afterwards).
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            for (mr, _) in self.mrs.drain(..) {
                ibv_dereg_mr(mr);
            }
            if !self.cq.is_null() {
                ibv_destroy_cq(self.cq);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
            ibv_close_device(self.ctx.as_ptr());
        }
    }
}

/// Send-queue accounting for selective signalling: how many work requests are in flight, and
/// which to signal so the queue can always drain.
///
/// Only every `signal_every`-th request asks for a completion; a signalled completion retires
/// every request posted before it (RC send queues complete in order). Since fewer than
/// `signal_every` unsignalled requests ever trail the last signalled one and `signal_every` is at
/// most a quarter of the depth, a queue too full for the next chain always holds a signalled
/// request whose completion will free room — the queue cannot fill up with requests nobody will
/// ever hear about.
#[derive(Debug, Clone)]
pub struct SendQueue {
    depth: u64,
    signal_every: u64,
    posted: u64,
    completed: u64,
    last_signaled: u64,
}

impl SendQueue {
    /// Accounting for a queue of `depth` slots, signalling about every `signal_every` requests.
    pub fn new(depth: u32, signal_every: u32) -> Self {
        let depth = u64::from(depth.max(8));
        SendQueue {
            depth,
            signal_every: u64::from(signal_every).clamp(1, depth / 4),
            posted: 0,
            completed: 0,
            last_signaled: 0,
        }
    }

    /// Free slots.
    pub fn room(&self) -> u64 {
        self.depth - (self.posted - self.completed)
    }

    /// One request in this many is signalled.
    pub fn signal_every(&self) -> u64 {
        self.signal_every
    }

    /// Requests ever posted (the id of the latest).
    pub fn posted(&self) -> u64 {
        self.posted
    }

    /// Requests posted and not known to be complete.
    pub fn in_flight(&self) -> u64 {
        self.posted - self.completed
    }

    /// Accounts for a chain of `k` requests about to be posted (the caller checked
    /// [`SendQueue::room`]); returns the id of its last request and whether that one must be
    /// signalled. Earlier requests of the chain get ids `last - k + 1 ..`.
    pub fn plan(&mut self, k: u64) -> (u64, bool) {
        let last = self.posted + k;
        let signal = last - self.last_signaled >= self.signal_every;
        self.posted = last;
        if signal {
            self.last_signaled = last;
        }
        (last, signal)
    }

    /// Takes back a plan whose post failed.
    pub fn unplan(&mut self, k: u64, was_signaled: bool, prev_signaled: u64) {
        self.posted -= k;
        if was_signaled {
            self.last_signaled = prev_signaled;
        }
    }

    /// The id of the last signalled request (for [`SendQueue::unplan`]).
    pub fn last_signaled(&self) -> u64 {
        self.last_signaled
    }

    /// A signalled request `wr_id` completed: it and everything before it are done.
    pub fn complete(&mut self, wr_id: u64) {
        if wr_id <= self.posted {
            self.completed = self.completed.max(wr_id);
        }
    }
}

/// One RDMA write of a work-request chain being built.
#[derive(Debug, Clone, Copy)]
pub struct RdmaWrite {
    /// Local source address (inside memory registered under the chain's `lkey`).
    pub local: u64,
    /// Bytes to write.
    pub len: u32,
    /// Peer address (inside the region of the chain's `rkey`).
    pub remote: u64,
    /// Immediate data (the write is then a WRITE WITH IMMEDIATE, consuming a receive).
    pub imm: Option<u32>,
    /// Post a SEND (into the peer's next posted receive buffer) instead of a write; `remote`
    /// and `imm` are then ignored.
    pub send: bool,
}

/// Posts `writes` (one to three) as one chain (one `post_send`, so one doorbell); the last is signalled as `sq` decides. Writes of
/// at most `max_inline` bytes go inline.
///
/// # Safety
/// Every write's local range must lie in memory registered with `ep` under `lkey`, and stay
/// untouched until the write has completed (inline writes excepted: they are copied at post
/// time); its remote range must lie in the peer's region of `rkey`.
pub unsafe fn post_writes(
    ep: &mut Endpoint,
    sq: &mut SendQueue,
    lkey: u32,
    rkey: u32,
    writes: &[RdmaWrite],
) -> Result<(), ChannelError> {
    let k = writes.len();
    if !(1..=3).contains(&k) {
        return Err(ChannelError::Config(format!("a chain of {k} writes")));
    }
    let prev = sq.last_signaled();
    let (last, signal) = sq.plan(k as u64);
    let mut sges = [ibv_sge {
        addr: 0,
        length: 0,
        lkey,
    }; 3];
    // SAFETY: all-zero is a valid `ibv_send_wr` (null pointers, zero integers, union of
    // integers and pointers).
    let mut wrs: [ibv_send_wr; 3] = unsafe { std::mem::zeroed() };
    for (i, w) in writes.iter().enumerate() {
        sges[i].addr = w.local;
        sges[i].length = w.len;
        let wr = &mut wrs[i];
        wr.wr_id = last - (k - 1 - i) as u64;
        wr.num_sge = 1;
        let mut flags = 0;
        if w.len <= ep.max_inline {
            flags |= ibv_send_flags::IBV_SEND_INLINE.0;
        }
        if signal && i == k - 1 {
            flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
        }
        wr.send_flags = flags;
        wr.opcode = match w.imm {
            _ if w.send => ibv_wr_opcode::IBV_WR_SEND,
            Some(imm) => {
                wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
                ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
            }
            None => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
        };
        wr.wr.rdma.remote_addr = w.remote;
        wr.wr.rdma.rkey = rkey;
    }
    let sge_ptr = sges.as_mut_ptr();
    let wr_ptr = wrs.as_mut_ptr();
    for i in 0..k {
        // SAFETY: `i < k <= 3`: both pointers stay inside their arrays.
        unsafe {
            (*wr_ptr.add(i)).sg_list = sge_ptr.add(i);
            if i + 1 < k {
                (*wr_ptr.add(i)).next = wr_ptr.add(i + 1);
            }
        }
    }
    // SAFETY: the chain is null-terminated (zeroed `next` of the last request) and lives on
    // this stack frame for the call; the caller vouches for the memory its entries name.
    let posted = unsafe { ep.post_send(wr_ptr) };
    if posted.is_err() {
        sq.unplan(k as u64, signal, prev);
    }
    posted
}

/// Reaps send completions: a failed one is the link's error; successful ones free send slots.
/// Receive completions (backup only) go to `on_recv`.
pub fn reap(
    ep: &mut Endpoint,
    sq: &mut SendQueue,
    wcs: &mut [Completion; 16],
    mut on_recv: impl FnMut(&Completion) -> Result<(), ChannelError>,
) -> Result<(), ChannelError> {
    loop {
        let n = ep.poll(wcs)?;
        for c in &wcs[..n] {
            if !c.ok {
                return Err(c.error());
            }
            if c.wr_id & super::RECV_TAG != 0 {
                on_recv(c)?;
            } else {
                sq.complete(c.wr_id);
            }
        }
        if n < wcs.len() {
            return Ok(());
        }
    }
}

/// A placeholder for completion arrays.
pub const NO_COMPLETION: Completion = Completion {
    wr_id: 0,
    ok: true,
    status: 0,
    vendor_err: 0,
    opcode: 0,
    imm: 0,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selective_signalling_never_strands_the_queue() {
        let mut sq = SendQueue::new(64, 1000);
        // Clamped to a quarter of the depth.
        let mut signaled = Vec::new();
        let mut chain = 1;
        for _ in 0..10_000 {
            chain = chain % 3 + 1;
            while sq.room() < chain {
                // The queue is full: some signalled request must be in flight to wait for.
                let pending = signaled.iter().copied().find(|&id| id > sq.completed);
                let id = pending.expect("a full queue holds a signalled request");
                sq.complete(id);
            }
            let (last, signal) = sq.plan(chain);
            if signal {
                signaled.push(last);
            }
            assert!(last - sq.last_signaled() < 16);
        }
        assert!(signaled.len() > 10_000 * 2 / 16 / 2);
    }

    #[test]
    fn unplanned_chain_restores_accounting() {
        let mut sq = SendQueue::new(16, 4);
        let prev = sq.last_signaled();
        let (last, signal) = sq.plan(4);
        assert_eq!((last, signal), (4, true));
        sq.unplan(4, signal, prev);
        assert_eq!(sq.room(), 16);
        assert_eq!(sq.plan(1), (1, false));
    }

    #[test]
    fn missing_device_is_a_typed_error() {
        let cfg = RdmaConfig::new("ftvm-no-such-device", 0);
        match Endpoint::open(&cfg, 64, 64) {
            Err(e @ ChannelError::RdmaDevice { .. }) => {
                assert!(e.to_string().contains("ftvm-no-such-device"), "{e}");
                let ChannelError::RdmaDevice { device, reason } = e else {
                    unreachable!()
                };
                assert_eq!(device, "ftvm-no-such-device");
                assert!(!reason.is_empty());
            }
            other => panic!("expected RdmaDevice, got {other:?}"),
        }
    }
}
