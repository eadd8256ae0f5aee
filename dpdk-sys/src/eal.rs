//! The Environment Abstraction Layer: once per process.

use std::ffi::{c_char, c_int, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::error::DpdkError;
use crate::ffi;

/// Set by the first [`Eal::init`] call, successful or not: DPDK cannot be initialised twice in
/// a process (nor retried safely after a failure part-way, nor re-initialised after cleanup).
static ATTEMPTED: AtomicBool = AtomicBool::new(false);

/// The live EAL, for constructors that do not take an [`Eal`] ([`crate::Mempool::new`]).
static LIVE: Mutex<Weak<EalInner>> = Mutex::new(Weak::new());

/// The program name passed to `rte_eal_init` as `argv[0]`.
const PROGRAM: &str = "ftvm-dpdk";

#[derive(Debug)]
struct EalInner {
    runtime_dir: PathBuf,
}

impl Drop for EalInner {
    fn drop(&mut self) {
        // DPDK 22.11's cleanup unmaps the EAL's memory without stopping the interrupt thread,
        // which reads every interrupt source's handle (some live in that memory) whenever a
        // descriptor wakes it: core dumps of the crash left after `intr`'s port barriers show
        // the thread in `rte_intr_fd_get` and the main thread in the cleanup's `munmap` (or,
        // with two barriers before the cleanup, already in `exit`). So the thread is parked
        // for good first, after everything pending (see `intr::park`).
        let _one = crate::intr::TEARDOWN
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !crate::intr::park(crate::intr::BARRIER_TIMEOUT) {
            tracing::warn!("EAL's interrupt thread could not be parked before rte_eal_cleanup");
        }
        // SAFETY: the EAL was initialised by Eal::init, and this is the last handle: every
        // Mempool and Port holds an Eal clone, so none is alive any more (a mempool with mbufs
        // still out leaks its Eal clone instead, and then we never get here).
        unsafe {
            ffi::rte_eal_cleanup();
        }
    }
}

/// A handle to this process's initialised DPDK EAL. Cloning is cheap; `rte_eal_cleanup` runs
/// when the last clone, and the last [`crate::Mempool`] and [`crate::Port`], is dropped.
///
/// `rte_eal_init` pins the calling thread to the main lcore (`-l`/`--main-lcore`); threads
/// spawned from it afterwards inherit that affinity.
#[derive(Debug, Clone)]
pub struct Eal {
    inner: Arc<EalInner>,
}

impl Eal {
    /// Initialises the EAL with `args` (EAL options only, without a program name; e.g.
    /// `["--no-huge", "-m", "256", "--no-pci", "-l", "0", "--file-prefix", "a", "--vdev=..."]`).
    ///
    /// DPDK's log is redirected to stderr (DPDK otherwise writes it to stdout and syslog).
    ///
    /// Errors: [`DpdkError::AlreadyInitialized`] on any call after the first in a process
    /// (whether the first succeeded or not), [`DpdkError::EalInit`] if DPDK rejects the
    /// arguments or cannot set up, [`DpdkError::InvalidArgument`] for arguments DPDK would
    /// treat as application arguments, and for `-h`/`--help` (on which DPDK calls `exit`).
    pub fn init(args: &[&str]) -> Result<Eal, DpdkError> {
        let mut c_args = Vec::with_capacity(args.len() + 1);
        c_args.push(CString::new(PROGRAM).map_err(|e| DpdkError::InvalidArgument(e.to_string()))?);
        for &a in args {
            if a == "-h" || a == "--help" {
                return Err(DpdkError::InvalidArgument(format!(
                    "{a}: DPDK prints its usage and exits the process"
                )));
            }
            c_args.push(
                CString::new(a)
                    .map_err(|_| DpdkError::InvalidArgument(format!("{a:?} contains a NUL")))?,
            );
        }
        let argc = c_int::try_from(c_args.len())
            .map_err(|_| DpdkError::InvalidArgument("too many arguments".into()))?;

        if ATTEMPTED.swap(true, Ordering::SeqCst) {
            return Err(DpdkError::AlreadyInitialized);
        }

        // SAFETY: sets DPDK's log stream to stderr; legal before rte_eal_init.
        unsafe {
            ffi::ftvm_log_to_stderr();
        }

        // rte_eal_init permutes argv (getopt) and may keep pointers into the strings: leak both
        // (a few hundred bytes, once per process).
        let strings: &'static mut [CString] = Vec::leak(c_args);
        let argv: &'static mut [*mut c_char] = Vec::leak(
            strings
                .iter()
                .map(|s| s.as_ptr().cast_mut())
                .chain(std::iter::once(std::ptr::null_mut()))
                .collect(),
        );
        // SAFETY: argc/argv form a valid NULL-terminated argument vector that lives forever;
        // ATTEMPTED guarantees this is the only rte_eal_init call in the process.
        let ret = unsafe { ffi::rte_eal_init(argc, argv.as_mut_ptr()) };
        if ret < 0 {
            let errno = crate::rte_errno();
            return Err(DpdkError::EalInit {
                errno,
                message: crate::strerror(errno),
            });
        }
        let consumed = usize::try_from(ret).unwrap_or(0);
        if consumed < args.len() {
            // getopt moved the arguments it did not take to the end of argv.
            let rest: Vec<String> = argv[consumed + 1..argv.len() - 1]
                .iter()
                // SAFETY: every non-null argv entry points into one of the leaked CStrings.
                .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                .collect();
            // SAFETY: the EAL was just initialised and nothing else uses it yet.
            unsafe {
                ffi::rte_eal_cleanup();
            }
            return Err(DpdkError::InvalidArgument(format!(
                "not EAL options: {rest:?} (Eal::init takes EAL options only)"
            )));
        }

        // SAFETY: returns a pointer to a static NUL-terminated string, valid after init.
        let runtime_dir = unsafe {
            let p = ffi::rte_eal_get_runtime_dir();
            if p.is_null() {
                PathBuf::new()
            } else {
                PathBuf::from(CStr::from_ptr(p).to_string_lossy().into_owned())
            }
        };
        let inner = Arc::new(EalInner { runtime_dir });
        *LIVE.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&inner);
        Ok(Eal { inner })
    }

    /// The live EAL of this process, if [`Eal::init`] succeeded and a handle still exists.
    pub fn current() -> Option<Eal> {
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
            .map(|inner| Eal { inner })
    }

    /// Whether [`Eal::init`] has been called in this process (successfully or not).
    pub fn init_attempted() -> bool {
        ATTEMPTED.load(Ordering::SeqCst)
    }

    /// The runtime directory EAL created for this process's `--file-prefix`
    /// (`/var/run/dpdk/<prefix>` as root, else `$XDG_RUNTIME_DIR/dpdk/<prefix>` or
    /// `/tmp/dpdk/<prefix>`). EAL does not remove it on cleanup; whoever picks the prefix should.
    pub fn runtime_dir(&self) -> &Path {
        &self.inner.runtime_dir
    }

    /// The main lcore (the one `Eal::init` ran on).
    pub fn main_lcore(&self) -> u32 {
        // SAFETY: reads EAL configuration; the EAL is initialised (self exists).
        unsafe { ffi::rte_get_main_lcore() }
    }

    /// Number of lcores EAL was given.
    pub fn lcore_count(&self) -> u32 {
        // SAFETY: reads EAL configuration; the EAL is initialised (self exists).
        unsafe { ffi::rte_lcore_count() }
    }

    /// The calling thread's lcore id; `None` for threads EAL did not create or register.
    pub fn lcore_id() -> Option<u32> {
        // SAFETY: reads a thread-local; valid on any thread, before or after init.
        let id = unsafe { ffi::ftvm_rte_lcore_id() };
        (id != ffi::LCORE_ID_ANY).then_some(id)
    }

    /// Makes the calling thread an lcore (`rte_thread_register`) and returns its id; a thread
    /// that already is one (the one that ran [`Eal::init`], or one registered before) keeps
    /// its id.
    ///
    /// Why: mempools keep a per-lcore cache, and a thread without an lcore id bypasses it, so
    /// every mbuf it allocates or frees (including the ones a PMD frees inside a transmit)
    /// goes through the pool's shared ring with atomic operations. A thread that polls ports
    /// should be registered; [`Eal::unregister_thread`] gives the id back before it exits.
    pub fn register_thread(&self) -> Result<u32, DpdkError> {
        if let Some(id) = Self::lcore_id() {
            return Ok(id);
        }
        // SAFETY: the EAL is initialised (self exists); registers the calling thread only.
        if unsafe { ffi::rte_thread_register() } != 0 {
            return Err(DpdkError::from_rte_errno("rte_thread_register"));
        }
        Self::lcore_id().ok_or_else(|| DpdkError::from_rte_errno("rte_thread_register"))
    }

    /// Gives back the lcore id [`Eal::register_thread`] gave the calling thread (a no-op for
    /// a thread that has none). Call it on the thread itself, before it exits; the EAL's own
    /// main thread keeps its id.
    pub fn unregister_thread(&self) {
        if Self::lcore_id().is_some_and(|id| id != self.main_lcore()) {
            // SAFETY: the EAL is initialised; releases the calling thread's lcore only.
            unsafe { ffi::rte_thread_unregister() };
        }
    }

    /// The NUMA socket of the calling thread's lcore (`rte_socket_id`).
    pub fn socket_id() -> i32 {
        // SAFETY: reads a thread-local; no preconditions.
        let id = unsafe { ffi::rte_socket_id() };
        i32::try_from(id).unwrap_or(ffi::SOCKET_ID_ANY)
    }

    /// Ids of the usable ethdev ports (e.g. one per `--vdev`).
    pub fn ports(&self) -> Vec<u16> {
        (0..ffi::RTE_MAX_ETHPORTS as u16)
            // SAFETY: checks a port id against ethdev's table; any id is accepted.
            .filter(|&p| unsafe { ffi::rte_eth_dev_is_valid_port(p) } == 1)
            .collect()
    }

    /// The port id of the device called `name` (e.g. `"net_memif0"`).
    pub fn port_by_name(&self, name: &str) -> Option<u16> {
        let name = CString::new(name).ok()?;
        let mut id = 0u16;
        // SAFETY: name is NUL-terminated, id a valid out-pointer.
        let ret = unsafe { ffi::rte_eth_dev_get_port_by_name(name.as_ptr(), &mut id) };
        (ret == 0).then_some(id)
    }
}
