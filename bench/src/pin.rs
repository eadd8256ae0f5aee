//! Core pinning shared by every benchmark.

/// Pins the calling thread to `core`; warns on stderr (once per role and core) and runs
/// unpinned if the system refuses.
///
/// The core is named by id directly rather than looked up in `core_affinity::get_core_ids()`:
/// that lists only the cores in the caller's *current* affinity mask, so once the main thread
/// is pinned every other core would look absent to the threads it spawns.
pub fn pin_current(core: usize, role: &str) -> bool {
    // `core_affinity` indexes a fixed-size CPU set with the id and panics beyond it.
    let ok = core < libc::CPU_SETSIZE as usize
        && core_affinity::set_for_current(core_affinity::CoreId { id: core });
    if !ok {
        eprintln!("warning: could not pin the {role} to core {core}; running it unpinned");
    }
    ok
}

/// Runs `f` with the calling thread registered as a DPDK lcore, if this process has an EAL:
/// mbufs it allocates and frees (its own, and the ones a PMD frees in a transmit) then go
/// through the mempools' per-lcore caches, as they do on any DPDK application's polling
/// threads, instead of the shared ring. Every thread that polls a port in a measurement runs
/// under this, the raw ping-pong's as much as the channel's.
#[cfg(feature = "dpdk")]
pub fn as_dpdk_lcore<T>(f: impl FnOnce() -> T) -> T {
    let eal = dpdk_sys::Eal::current();
    if let Some(eal) = &eal {
        if let Err(e) = eal.register_thread() {
            eprintln!("warning: cannot register this thread as a DPDK lcore ({e}); its mbufs bypass the mempool caches");
        }
    }
    let out = f();
    if let Some(eal) = &eal {
        eal.unregister_thread();
    }
    out
}

/// Without DPDK there is no EAL to register with: runs `f`.
#[cfg(not(feature = "dpdk"))]
pub fn as_dpdk_lcore<T>(f: impl FnOnce() -> T) -> T {
    f()
}
