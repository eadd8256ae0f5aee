//! Memory regions a ring can live in: the heap, a shared mapping two processes see, and (later)
//! memory registered with an RDMA NIC.
//!
//! The ring only needs a base pointer and a length; [`RingMemory`] is that contract. Keeping it
//! this small is what lets the same ring code run over heap memory in a unit test, a `/dev/shm`
//! file shared by a primary and a backup process, and a region a remote NIC writes into.

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use memmap2::MmapMut;

/// Alignment every region guarantees. A page, so the same region can be registered with an RDMA
/// NIC or mapped into another process, and far above the ring's 128-byte cache-line padding.
pub const REGION_ALIGN: usize = 4096;

/// Errors creating or mapping a memory region.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegionError {
    /// The requested size was zero or overflowed the address space.
    #[error("invalid region size {0} bytes")]
    InvalidSize(usize),
    /// The heap allocator had no memory for the region.
    #[error("out of memory allocating a {0}-byte region")]
    OutOfMemory(usize),
    /// Creating, sizing or opening the backing file failed.
    #[error("shared region {path}: {source}")]
    File {
        /// The backing file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `mmap` refused the mapping.
    #[error("mapping shared region {path}: {source}")]
    Map {
        /// The backing file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A fixed block of memory a ring can be laid out in.
///
/// # Safety
/// Implementors guarantee that [`RingMemory::as_ptr`] returns the same pointer on every call,
/// that it is aligned to [`REGION_ALIGN`], and that it is valid for reads and writes of
/// [`RingMemory::len`] bytes for as long as the value exists (neither moved nor unmapped). The
/// memory may be written concurrently by others (another process, a NIC) — the ring's protocol,
/// not this trait, decides who writes where.
pub unsafe trait RingMemory {
    /// The first byte of the region.
    fn as_ptr(&self) -> *mut u8;
    /// Size of the region in bytes.
    fn len(&self) -> usize;
    /// True if the region has no bytes (never the case for the regions in this crate).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The 8-byte word at byte `offset` of the region, for atomic access: the one way this crate
    /// views a word of a region another process or a NIC may write at the same time (ring
    /// counters, ACK blocks, seals, control words). Whoever shares the word must access it
    /// atomically too; values are little-endian on the wire, which is the host order on the
    /// machines ftvm runs on (x86-64).
    ///
    /// # Panics
    /// If the word is not wholly inside the region or not 8-aligned: offsets come from this
    /// crate's layouts, never from a peer, so that is a bug in the caller.
    fn word(&self, offset: usize) -> &AtomicU64 {
        assert!(
            offset.checked_add(8).is_some_and(|end| end <= self.len()),
            "word at {offset} outside a {}-byte region",
            self.len()
        );
        // SAFETY: `offset + 8 <= len` (checked above), so the pointer stays inside the region.
        let ptr = unsafe { self.as_ptr().add(offset) };
        assert!(
            (ptr as usize).is_multiple_of(std::mem::align_of::<AtomicU64>()),
            "word at {offset} is not 8-aligned"
        );
        // SAFETY: the 8 bytes are inside the region and aligned (checked above); the trait's
        // contract keeps them valid for as long as `self`, which bounds the reference's
        // lifetime; `AtomicU64` is valid for any bit pattern, and concurrent writers (another
        // process, a NIC) are why the access is atomic.
        unsafe { &*ptr.cast::<AtomicU64>() }
    }
}

// SAFETY: an `Arc` never moves its contents and keeps them alive while any clone exists, so the
// inner region's guarantees carry over unchanged.
unsafe impl<T: RingMemory + ?Sized> RingMemory for Arc<T> {
    fn as_ptr(&self) -> *mut u8 {
        (**self).as_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

// SAFETY: a shared reference keeps the region alive and in place for its lifetime.
unsafe impl<T: RingMemory + ?Sized> RingMemory for &T {
    fn as_ptr(&self) -> *mut u8 {
        (**self).as_ptr()
    }
    fn len(&self) -> usize {
        (**self).len()
    }
}

/// A zeroed, page-aligned heap allocation.
#[derive(Debug)]
pub struct HeapRegion {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

impl HeapRegion {
    /// Allocates `len` zeroed bytes aligned to [`REGION_ALIGN`].
    pub fn new(len: usize) -> Result<Self, RegionError> {
        if len == 0 {
            return Err(RegionError::InvalidSize(len));
        }
        let layout = Layout::from_size_align(len, REGION_ALIGN)
            .map_err(|_| RegionError::InvalidSize(len))?;
        // SAFETY: the layout has a non-zero size (checked above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or(RegionError::OutOfMemory(len))?;
        // Touch every page now: a large zeroed allocation is mapped lazily, and a page fault
        // on the log's hot path costs microseconds (more under nested virtualisation).
        for offset in (0..len).step_by(4096) {
            // SAFETY: `offset < len`, inside the allocation we own; writing the zero it already
            // holds changes nothing but makes the kernel back the page.
            unsafe { ptr.as_ptr().add(offset).write_volatile(0) };
        }
        Ok(HeapRegion { ptr, layout })
    }
}

impl Drop for HeapRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout and is freed only here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// SAFETY: the allocation is owned exclusively by this value, page-aligned by its layout, and
// freed only on drop.
unsafe impl RingMemory for HeapRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.layout.size()
    }
}

// SAFETY: the region is plain memory with no thread affinity; all concurrent access to it goes
// through the ring's atomics.
unsafe impl Send for HeapRegion {}
// SAFETY: as above — `&HeapRegion` only hands out the raw pointer.
unsafe impl Sync for HeapRegion {}

/// A `MAP_SHARED` mapping of a file (in `/dev/shm`, or an anonymous memfd) that several processes
/// map at once.
#[derive(Debug)]
pub struct SharedRegion {
    map: MmapMut,
    file: File,
    path: PathBuf,
    unlink_on_drop: bool,
}

impl SharedRegion {
    /// Creates a new zero-filled file of `len` bytes at `path` (failing if it exists) and maps it.
    /// The file is removed again when this value is dropped.
    pub fn create(path: impl AsRef<Path>, len: usize) -> Result<Self, RegionError> {
        let path = path.as_ref().to_path_buf();
        if len == 0 {
            return Err(RegionError::InvalidSize(len));
        }
        let file_err = |source| RegionError::File {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(file_err)?;
        let mut region = Self::map(file, path.clone(), len)?;
        region.unlink_on_drop = true;
        Ok(region)
    }

    /// Maps an existing file at `path` as a whole; it stays on disk when this value is dropped.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RegionError> {
        let path = path.as_ref().to_path_buf();
        let file_err = |source| RegionError::File {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(file_err)?;
        let len = file.metadata().map_err(file_err)?.len();
        let len = usize::try_from(len).map_err(|_| RegionError::InvalidSize(usize::MAX))?;
        if len == 0 {
            return Err(RegionError::InvalidSize(0));
        }
        Self::map(file, path, len)
    }

    /// Creates an anonymous memfd of `len` bytes and maps it. Pass [`SharedRegion::fd`] to a child
    /// process (it is created without `CLOEXEC`) and map it there with [`SharedRegion::from_fd`].
    pub fn memfd(name: &str, len: usize) -> Result<Self, RegionError> {
        let path = PathBuf::from(format!("memfd:{name}"));
        if len == 0 {
            return Err(RegionError::InvalidSize(len));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| RegionError::File {
            path: path.clone(),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), 0) };
        if fd < 0 {
            return Err(RegionError::File {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor we own; `File` takes over closing it.
        let file = unsafe { File::from_raw_fd(fd) };
        Self::map(file, path, len)
    }

    /// Maps a region from an inherited file descriptor (see [`SharedRegion::memfd`]).
    ///
    /// # Safety
    /// `fd` must be an open descriptor of a regular file or memfd that nothing else will close;
    /// this value takes ownership of it.
    pub unsafe fn from_fd(fd: RawFd) -> Result<Self, RegionError> {
        let path = PathBuf::from(format!("fd:{fd}"));
        // SAFETY: the caller hands over ownership of an open descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        let len = file
            .metadata()
            .map_err(|source| RegionError::File {
                path: path.clone(),
                source,
            })?
            .len();
        let len = usize::try_from(len).map_err(|_| RegionError::InvalidSize(usize::MAX))?;
        Self::map(file, path, len)
    }

    fn map(file: File, path: PathBuf, len: usize) -> Result<Self, RegionError> {
        let size = u64::try_from(len).map_err(|_| RegionError::InvalidSize(len))?;
        if file.metadata().map(|m| m.len()).unwrap_or(0) != size {
            file.set_len(size).map_err(|source| RegionError::File {
                path: path.clone(),
                source,
            })?;
        }
        // SAFETY: the file stays open for the life of the mapping (stored alongside it). Other
        // processes may write the mapping concurrently; the ring only touches it through raw
        // pointers and atomics, never through references that assume exclusive access.
        // `populate` (MAP_POPULATE) faults every page in now, not on the hot path.
        let map =
            unsafe { memmap2::MmapOptions::new().populate().map_mut(&file) }.map_err(|source| {
                RegionError::Map {
                    path: path.clone(),
                    source,
                }
            })?;
        Ok(SharedRegion {
            map,
            file,
            path,
            unlink_on_drop: false,
        })
    }

    /// The descriptor of the backing file, e.g. to hand a memfd to a child process.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Where the region came from (`/dev/shm/...`, `memfd:name` or `fd:N`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        if self.unlink_on_drop {
            // Best effort: the mapping itself stays valid for other processes after unlinking.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

// SAFETY: `mmap` returns page-aligned memory that stays mapped (and in place) until the `MmapMut`
// is dropped together with this value.
unsafe impl RingMemory for SharedRegion {
    fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr().cast_mut()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_shared_in_place_and_bounds_checked() {
        use std::sync::atomic::Ordering;
        let region = HeapRegion::new(64).expect("region");
        region
            .word(8)
            .store(0x1122_3344_5566_7788, Ordering::Release);
        region.word(56).store(7, Ordering::Release);
        // The same bytes, seen through the word and through the region's memory.
        // SAFETY: bytes 8..16 of the 64-byte region; nothing writes them concurrently.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().add(8), 8) };
        assert_eq!(bytes, 0x1122_3344_5566_7788u64.to_ne_bytes());
        assert_eq!(region.word(56).load(Ordering::Acquire), 7);
        for bad in [57, 60, 64, usize::MAX - 3] {
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                region.word(bad);
            }));
            assert!(caught.is_err(), "word at {bad} was not refused");
        }
    }

    #[test]
    fn heap_region_is_zeroed_and_aligned() {
        let region = HeapRegion::new(10_000).expect("allocate");
        assert_eq!(region.len(), 10_000);
        assert_eq!(region.as_ptr() as usize % REGION_ALIGN, 0);
        // SAFETY: the region is valid for `len` bytes and nobody else holds it.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
    }

    #[test]
    fn zero_sized_regions_are_refused() {
        assert!(matches!(
            HeapRegion::new(0),
            Err(RegionError::InvalidSize(0))
        ));
    }

    #[cfg(not(miri))]
    #[test]
    fn shared_region_is_seen_by_a_second_mapping() {
        let path = std::env::temp_dir().join(format!("ftvm-region-test-{}", std::process::id()));
        let a = SharedRegion::create(&path, 8192).expect("create");
        let b = SharedRegion::open(&path).expect("open");
        assert_eq!(b.len(), 8192);
        // SAFETY: both mappings are valid for 8192 bytes; this test is their only user.
        unsafe {
            a.as_ptr().add(100).write(0xAB);
            assert_eq!(b.as_ptr().add(100).read(), 0xAB);
        }
        drop(b);
        drop(a);
        assert!(!path.exists(), "creator unlinks the file on drop");
    }

    #[cfg(not(miri))]
    #[test]
    fn create_refuses_an_existing_file() {
        let path = std::env::temp_dir().join(format!("ftvm-region-dup-{}", std::process::id()));
        let _a = SharedRegion::create(&path, 4096).expect("create");
        assert!(matches!(
            SharedRegion::create(&path, 4096),
            Err(RegionError::File { .. })
        ));
    }

    #[cfg(not(miri))]
    #[test]
    fn memfd_region_maps_again_from_its_fd() {
        let a = SharedRegion::memfd("ftvm-test", 4096).expect("memfd");
        // SAFETY: `dup` gives the second region its own descriptor to own.
        let dup = unsafe { libc::dup(a.fd()) };
        assert!(dup >= 0);
        // SAFETY: `dup` is an open memfd descriptor owned by nobody else.
        let b = unsafe { SharedRegion::from_fd(dup) }.expect("from_fd");
        // SAFETY: both mappings are valid for 4096 bytes; this test is their only user.
        unsafe {
            a.as_ptr().write(7);
            assert_eq!(b.as_ptr().read(), 7);
        }
    }
}
