//! Packet-buffer pools (`rte_pktmbuf_pool_create`).

use std::ffi::CString;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::DpdkError;
use crate::ffi;
use crate::{Eal, Mbuf};

struct MempoolInner {
    pool: NonNull<ffi::rte_mempool>,
    name: String,
    size: u32,
    eal: Eal,
}

// SAFETY: an rte_mempool created by rte_pktmbuf_pool_create uses the default multi-producer /
// multi-consumer ring ops, so get/put from any thread is safe; the per-lcore caches are only
// touched by the thread owning that lcore (non-EAL threads bypass them).
unsafe impl Send for MempoolInner {}
// SAFETY: see Send; every operation through &MempoolInner is an MP/MC-safe mempool call.
unsafe impl Sync for MempoolInner {}

impl Drop for MempoolInner {
    fn drop(&mut self) {
        // SAFETY: the pool is valid until freed here; no Port uses it (each holds a handle).
        let in_use = unsafe { ffi::rte_mempool_in_use_count(self.pool.as_ptr()) };
        if in_use == 0 {
            // SAFETY: no mbuf of this pool is outstanding and no other handle exists.
            unsafe { ffi::rte_mempool_free(self.pool.as_ptr()) };
        } else {
            // Mbufs of this pool are still alive somewhere (they carry no reference): leak the
            // pool and keep the EAL alive for good, so those mbufs stay valid and can still be
            // freed back into the pool.
            std::mem::forget(self.eal.clone());
        }
    }
}

/// A pool of packet buffers. Cheap to clone (shared handle); freed when the last clone and the
/// last [`crate::Port`] using it are dropped. Keeps the EAL alive.
#[derive(Clone)]
pub struct Mempool {
    inner: Arc<MempoolInner>,
}

impl std::fmt::Debug for Mempool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mempool")
            .field("name", &self.inner.name)
            .field("size", &self.inner.size)
            .field("in_use", &self.in_use())
            .finish()
    }
}

impl Mempool {
    /// `RTE_MBUF_DEFAULT_BUF_SIZE`: 2048 bytes of data after `RTE_PKTMBUF_HEADROOM` (128).
    pub const DEFAULT_DATA_ROOM: u16 = ffi::RTE_MBUF_DEFAULT_BUF_SIZE as u16;
    /// Headroom reserved at the front of every mbuf's data room.
    pub const HEADROOM: u16 = ffi::RTE_PKTMBUF_HEADROOM as u16;

    /// Creates a pool of `n` mbufs (DPDK recommends `2^k - 1`) with a per-lcore cache of
    /// `cache` mbufs (at most 512, and at most `n / 1.5`) and `data_room` bytes of buffer per
    /// mbuf, headroom included (use [`Mempool::DEFAULT_DATA_ROOM`] for standard frames). `name`
    /// must be unique in the process. Needs a live EAL ([`DpdkError::NotInitialized`]).
    pub fn new(name: &str, n: u32, cache: u32, data_room: u16) -> Result<Mempool, DpdkError> {
        Self::with_ops(name, n, cache, data_room, None)
    }

    /// As [`Mempool::new`], with the mempool driver `ops` (e.g. `"stack"`: a LIFO pool that
    /// hands out the most recently freed mbuf first; `None`: DPDK's default ring).
    pub fn with_ops(
        name: &str,
        n: u32,
        cache: u32,
        data_room: u16,
        ops: Option<&str>,
    ) -> Result<Mempool, DpdkError> {
        let eal = Eal::current().ok_or(DpdkError::NotInitialized)?;
        if data_room < Self::HEADROOM {
            return Err(DpdkError::InvalidArgument(format!(
                "data_room {data_room} is smaller than the mbuf headroom {}",
                Self::HEADROOM
            )));
        }
        let c_name = CString::new(name)
            .map_err(|_| DpdkError::InvalidArgument(format!("{name:?} contains a NUL")))?;
        let c_ops = ops
            .map(|o| {
                CString::new(o)
                    .map_err(|_| DpdkError::InvalidArgument(format!("{o:?} contains a NUL")))
            })
            .transpose()?;
        let socket = Eal::socket_id();
        // SAFETY: c_name (and c_ops, if any) are NUL-terminated and outlive the call; DPDK
        // validates the numbers and the ops name and copies what it keeps.
        let pool = unsafe {
            match &c_ops {
                None => {
                    ffi::rte_pktmbuf_pool_create(c_name.as_ptr(), n, cache, 0, data_room, socket)
                }
                Some(o) => ffi::rte_pktmbuf_pool_create_by_ops(
                    c_name.as_ptr(),
                    n,
                    cache,
                    0,
                    data_room,
                    socket,
                    o.as_ptr(),
                ),
            }
        };
        let pool = NonNull::new(pool)
            .ok_or_else(|| DpdkError::from_rte_errno("rte_pktmbuf_pool_create"))?;
        Ok(Mempool {
            inner: Arc::new(MempoolInner {
                pool,
                name: name.to_owned(),
                size: n,
                eal,
            }),
        })
    }

    /// Allocates an mbuf (empty, with the default headroom).
    pub fn alloc(&self) -> Result<Mbuf, DpdkError> {
        Mbuf::alloc(self)
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Number of mbufs in the pool.
    pub fn size(&self) -> u32 {
        self.inner.size
    }

    /// Mbufs currently allocated (by us or held by a driver).
    pub fn in_use(&self) -> u32 {
        // SAFETY: the pool is valid while self exists.
        unsafe { ffi::rte_mempool_in_use_count(self.inner.pool.as_ptr()) }
    }

    /// Mbufs currently free (in the ring or in per-lcore caches).
    pub fn available(&self) -> u32 {
        // SAFETY: the pool is valid while self exists.
        unsafe { ffi::rte_mempool_avail_count(self.inner.pool.as_ptr()) }
    }

    /// The raw pool, for calling DPDK directly. Valid while this handle (or a clone) lives.
    pub fn as_ptr(&self) -> *mut ffi::rte_mempool {
        self.inner.pool.as_ptr()
    }
}
