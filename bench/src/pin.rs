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
