//! Packet buffers, freed back to their pool on drop.

use std::ptr::NonNull;

use crate::error::DpdkError;
use crate::ffi;
use crate::Mempool;

/// An owned packet buffer (`struct rte_mbuf *`), returned to its mempool on drop.
///
/// One pointer wide (`repr(transparent)`), so slices of `Mbuf` are passed to
/// `rte_eth_rx_burst`/`rte_eth_tx_burst` in place. It holds no reference to its pool: the pool
/// is never freed while any of its mbufs is outstanding (see [`Mempool`]).
///
/// [`Mbuf::data`] and [`Mbuf::data_mut`] cover the first segment; a received frame larger than
/// the pool's data room arrives chained ([`Mbuf::segments`] > 1, [`Mbuf::pkt_len`] > `len()`).
#[repr(transparent)]
pub struct Mbuf(NonNull<ffi::rte_mbuf>);

// SAFETY: an Mbuf is uniquely owned; freeing it from another thread returns it to an MP/MC-safe
// mempool (threads without an lcore bypass the per-lcore caches).
unsafe impl Send for Mbuf {}
// SAFETY: &Mbuf only reads the mbuf's header and data; all mutation needs &mut Mbuf.
unsafe impl Sync for Mbuf {}

impl std::fmt::Debug for Mbuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mbuf")
            .field("ptr", &self.0)
            .field("len", &self.len())
            .field("pkt_len", &self.pkt_len())
            .field("segments", &self.segments())
            .finish()
    }
}

impl Drop for Mbuf {
    fn drop(&mut self) {
        // SAFETY: we own the mbuf (and the chain behind it); its pool is still alive.
        unsafe { ffi::ftvm_rte_pktmbuf_free(self.0.as_ptr()) }
    }
}

impl Mbuf {
    /// Allocates an empty mbuf from `pool`.
    pub fn alloc(pool: &Mempool) -> Result<Mbuf, DpdkError> {
        // SAFETY: the pool is a live pktmbuf pool.
        let m = unsafe { ffi::ftvm_rte_pktmbuf_alloc(pool.as_ptr()) };
        NonNull::new(m)
            .map(Mbuf)
            .ok_or_else(|| DpdkError::PoolExhausted(pool.name().to_owned()))
    }

    /// Bytes of data in the first segment (`data_len`).
    #[inline]
    pub fn len(&self) -> usize {
        // SAFETY: self points to a valid mbuf we own.
        usize::from(unsafe { ffi::ftvm_rte_pktmbuf_data_len(self.0.as_ptr()) })
    }

    /// Whether the first segment holds no data.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of data in the whole chain (`pkt_len`).
    #[inline]
    pub fn pkt_len(&self) -> usize {
        // SAFETY: self points to a valid mbuf we own.
        unsafe { ffi::ftvm_rte_pktmbuf_pkt_len(self.0.as_ptr()) as usize }
    }

    /// Number of segments in the chain.
    #[inline]
    pub fn segments(&self) -> u16 {
        // SAFETY: self points to a valid mbuf we own.
        unsafe { ffi::ftvm_rte_pktmbuf_nb_segs(self.0.as_ptr()) }
    }

    /// Free bytes before the data (for [`Mbuf::prepend`]).
    #[inline]
    pub fn headroom(&self) -> usize {
        // SAFETY: self points to a valid mbuf we own.
        usize::from(unsafe { ffi::ftvm_rte_pktmbuf_headroom(self.0.as_ptr()) })
    }

    /// Free bytes after the data of the last segment (for [`Mbuf::append`]).
    #[inline]
    pub fn tailroom(&self) -> usize {
        // SAFETY: self points to a valid mbuf we own.
        usize::from(unsafe { ffi::ftvm_rte_pktmbuf_tailroom(self.0.as_ptr()) })
    }

    /// The first segment's data.
    #[inline]
    pub fn data(&self) -> &[u8] {
        // SAFETY: mtod points at data_len initialised bytes inside the mbuf's buffer, which we
        // own; the slice borrows self, so the mbuf cannot be freed or resized meanwhile.
        unsafe {
            let p = ffi::ftvm_rte_pktmbuf_mtod(self.0.as_ptr()).cast::<u8>();
            std::slice::from_raw_parts(p, self.len())
        }
    }

    /// The first segment's data, writable.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: as for data(); &mut self makes the access exclusive.
        unsafe {
            let p = ffi::ftvm_rte_pktmbuf_mtod(self.0.as_ptr()).cast::<u8>();
            std::slice::from_raw_parts_mut(p, len)
        }
    }

    /// Grows the packet by `len` bytes at the end (of the last segment) and returns the new
    /// bytes (zeroed) for the caller to fill.
    pub fn append(&mut self, len: usize) -> Result<&mut [u8], DpdkError> {
        let available = self.tailroom();
        let no_room = DpdkError::NoRoom {
            which: "tail",
            requested: len,
            available,
        };
        let len16 = u16::try_from(len).map_err(|_| no_room.clone())?;
        // SAFETY: we own the mbuf; append returns NULL (changing nothing) if tailroom is short.
        let p = unsafe { ffi::ftvm_rte_pktmbuf_append(self.0.as_ptr(), len16) };
        if p.is_null() {
            return Err(no_room);
        }
        // SAFETY: p points at `len` bytes inside the mbuf's buffer now counted as data; they may
        // hold stale bytes from an earlier packet, so zero them before handing them out.
        unsafe {
            std::ptr::write_bytes(p.cast::<u8>(), 0, len);
            Ok(std::slice::from_raw_parts_mut(p.cast::<u8>(), len))
        }
    }

    /// Appends a copy of `bytes`.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) -> Result<(), DpdkError> {
        let available = self.tailroom();
        let len16 = u16::try_from(bytes.len()).map_err(|_| DpdkError::NoRoom {
            which: "tail",
            requested: bytes.len(),
            available,
        })?;
        // SAFETY: we own the mbuf; append returns NULL (changing nothing) if tailroom is short.
        let p = unsafe { ffi::ftvm_rte_pktmbuf_append(self.0.as_ptr(), len16) };
        if p.is_null() {
            return Err(DpdkError::NoRoom {
                which: "tail",
                requested: bytes.len(),
                available,
            });
        }
        // SAFETY: p points at bytes.len() writable bytes of this mbuf, disjoint from `bytes`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.cast::<u8>(), bytes.len()) };
        Ok(())
    }

    /// Grows the packet by `len` bytes at the front (into the headroom) and returns them
    /// (zeroed).
    pub fn prepend(&mut self, len: usize) -> Result<&mut [u8], DpdkError> {
        let available = self.headroom();
        let no_room = DpdkError::NoRoom {
            which: "head",
            requested: len,
            available,
        };
        let len16 = u16::try_from(len).map_err(|_| no_room.clone())?;
        // SAFETY: we own the mbuf; prepend returns NULL (changing nothing) if headroom is short.
        let p = unsafe { ffi::ftvm_rte_pktmbuf_prepend(self.0.as_ptr(), len16) };
        if p.is_null() {
            return Err(no_room);
        }
        // SAFETY: p points at `len` bytes of this mbuf's data; zero any stale contents.
        unsafe {
            std::ptr::write_bytes(p.cast::<u8>(), 0, len);
            Ok(std::slice::from_raw_parts_mut(p.cast::<u8>(), len))
        }
    }

    /// Removes `len` bytes from the end of the last segment.
    pub fn trim(&mut self, len: usize) -> Result<(), DpdkError> {
        let err = || {
            DpdkError::InvalidArgument(format!("cannot trim {len} bytes from a shorter segment"))
        };
        let len16 = u16::try_from(len).map_err(|_| err())?;
        // SAFETY: we own the mbuf; trim fails (changing nothing) if the last segment is short.
        let ret = unsafe { ffi::ftvm_rte_pktmbuf_trim(self.0.as_ptr(), len16) };
        if ret == 0 {
            Ok(())
        } else {
            Err(err())
        }
    }

    /// Removes `len` bytes from the front of the first segment.
    pub fn adj(&mut self, len: usize) -> Result<(), DpdkError> {
        let err = || {
            DpdkError::InvalidArgument(format!("cannot remove {len} bytes from a shorter segment"))
        };
        let len16 = u16::try_from(len).map_err(|_| err())?;
        // SAFETY: we own the mbuf; adj fails (changing nothing) if the first segment is short.
        let p = unsafe { ffi::ftvm_rte_pktmbuf_adj(self.0.as_ptr(), len16) };
        if p.is_null() {
            Err(err())
        } else {
            Ok(())
        }
    }

    /// The raw mbuf, still owned by `self`.
    pub fn as_ptr(&self) -> *mut ffi::rte_mbuf {
        self.0.as_ptr()
    }

    /// Gives up ownership: the caller must free the mbuf (or hand it to DPDK).
    pub fn into_raw(self) -> *mut ffi::rte_mbuf {
        let p = self.0.as_ptr();
        std::mem::forget(self);
        p
    }

    /// Takes ownership of a raw mbuf.
    ///
    /// # Safety
    /// `m` must be a valid mbuf that nobody else owns or will free, allocated from a pool
    /// created through [`Mempool`] (so the pool outlives it).
    pub unsafe fn from_raw(m: NonNull<ffi::rte_mbuf>) -> Mbuf {
        Mbuf(m)
    }
}
