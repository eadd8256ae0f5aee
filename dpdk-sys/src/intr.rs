//! Synchronising with EAL's interrupt thread (`eal-intr-thread`).
//!
//! Control-path work of some drivers runs on that thread, not on the caller's: net_memif, for
//! one, handles its control channel there, and when one end of a memif pair stops, the *other*
//! end's disconnect (freeing its regions, closing its queue descriptors) runs on the interrupt
//! thread. If the application stops or closes that other port meanwhile, both threads tear
//! down the same device, and the interrupt thread may touch memory `rte_eth_dev_close` has
//! just freed: DPDK 22.11's `memif_dev_close` neither waits for nor cancels that handler.
//! This is the segfault in `eal-intr-thread` the bench used to see when it closed both ends of
//! its memif pairs before exiting.
//!
//! [`barrier`] waits until the interrupt thread has handled every event that was already
//! pending when it was called: it sets an EAL alarm (Linux EAL alarms are a timerfd the
//! interrupt thread polls, and epoll reports ready descriptors in the order they became ready)
//! and waits for the alarm's callback, which the single interrupt thread runs only after the
//! callbacks before it have returned. [`crate::Port`] stops and closes ports under one lock
//! and with a barrier before and after each stop, so a port's teardown never overlaps work the
//! interrupt thread is doing for it or for its peer. Before `rte_eal_cleanup`, [`park`] stops
//! the interrupt thread for good (the cleanup unmaps memory that thread still reads).

use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::ffi;

/// Serialises the stopping and closing of ports in this process.
pub(crate) static TEARDOWN: Mutex<()> = Mutex::new(());

/// How long [`barrier`] waits for the interrupt thread before giving up.
pub(crate) const BARRIER_TIMEOUT: Duration = Duration::from_secs(2);

type Signal = (Mutex<bool>, Condvar);

unsafe extern "C" fn reached(arg: *mut c_void) {
    // SAFETY: `arg` is the `Arc<Signal>` reference `barrier` gave up with `Arc::into_raw`; this
    // callback runs exactly once and takes that reference back.
    let signal = unsafe { Arc::from_raw(arg.cast_const().cast::<Signal>()) };
    *signal.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    signal.1.notify_all();
}

/// Waits until EAL's interrupt thread has finished handling everything that was pending when
/// this was called. Returns `false` if it could not be arranged (no EAL, or alarms refused) or
/// the thread did not get there within `timeout`.
pub fn barrier(timeout: Duration) -> bool {
    let signal: Arc<Signal> = Arc::new((Mutex::new(false), Condvar::new()));
    let arg = Arc::into_raw(Arc::clone(&signal))
        .cast_mut()
        .cast::<c_void>();
    // SAFETY: `reached` matches rte_eal_alarm_callback; `arg` stays valid until the callback
    // takes it back (it owns one reference of the Arc). 1 µs: the shortest alarm, so it fires
    // right after what is already pending.
    let rc = unsafe { ffi::rte_eal_alarm_set(1, Some(reached), arg) };
    if rc != 0 {
        // SAFETY: the alarm was not set, so the callback will never take the reference back.
        drop(unsafe { Arc::from_raw(arg.cast_const().cast::<Signal>()) });
        return false;
    }
    let done = signal.0.lock().unwrap_or_else(|e| e.into_inner());
    let (done, _) = signal
        .1
        .wait_timeout_while(done, timeout, |done| !*done)
        .unwrap_or_else(|e| e.into_inner());
    *done
}

unsafe extern "C" fn park_here(arg: *mut c_void) {
    // SAFETY: as in `reached`: the reference `park` gave up, taken back exactly once.
    let signal = unsafe { Arc::from_raw(arg.cast_const().cast::<Signal>()) };
    *signal.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
    signal.1.notify_all();
    drop(signal);
    // The interrupt thread stays here until the process exits.
    loop {
        std::thread::park();
    }
}

/// Parks EAL's interrupt thread for good, after everything pending when this was called: it
/// runs a callback that never returns. For [`crate::Eal`]'s cleanup only: DPDK 22.11's
/// `rte_eal_cleanup` unmaps the EAL's memory without stopping that thread, which goes on
/// reading every interrupt source's handle whenever a descriptor wakes it (core dumps: the
/// thread in `rte_intr_fd_get`, the main thread in `munmap` inside the cleanup, or already in
/// `exit`). A parked thread reads nothing; the process's exit ends it.
///
/// The callback is an interrupt source of its own (an eventfd, signalled once), not an alarm:
/// the cleanup unregisters the alarms' source synchronously, which waits for a running alarm
/// callback, so a parked alarm would hang it. Nothing in the cleanup knows this source. Its
/// handle and descriptor are left for the process's exit. Returns whether the thread was
/// parked within `timeout`.
pub(crate) fn park(timeout: Duration) -> bool {
    // SAFETY: eventfd takes an initial value and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return false;
    }
    // SAFETY: allocates a private (malloc'd, not in the EAL's memory) handle, or returns null.
    // 0 is RTE_INTR_INSTANCE_F_PRIVATE (a UINT32_C macro, which bindgen does not evaluate).
    let handle = unsafe { ffi::rte_intr_instance_alloc(0) };
    // SAFETY: `handle` is checked for null before each use; the setters only write the handle.
    let set = !handle.is_null()
        && unsafe { ffi::rte_intr_fd_set(handle, fd) } == 0
        && unsafe { ffi::rte_intr_type_set(handle, ffi::RTE_INTR_HANDLE_EXT) } == 0;
    if !set {
        // SAFETY: our own descriptor, not registered anywhere.
        unsafe { libc::close(fd) };
        return false;
    }
    let signal: Arc<Signal> = Arc::new((Mutex::new(false), Condvar::new()));
    let arg = Arc::into_raw(Arc::clone(&signal))
        .cast_mut()
        .cast::<c_void>();
    // SAFETY: `park_here` matches rte_intr_callback_fn; `arg` stays valid until the callback
    // takes it back (it owns one reference of the Arc); the handle lives for good.
    let rc = unsafe { ffi::rte_intr_callback_register(handle, Some(park_here), arg) };
    if rc != 0 {
        // SAFETY: not registered, so the callback will never take the reference back.
        drop(unsafe { Arc::from_raw(arg.cast_const().cast::<Signal>()) });
        return false;
    }
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from `one` to our eventfd, which wakes the interrupt thread.
    if unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) } != 8 {
        return false;
    }
    let done = signal.0.lock().unwrap_or_else(|e| e.into_inner());
    let (done, _) = signal
        .1
        .wait_timeout_while(done, timeout, |done| !*done)
        .unwrap_or_else(|e| e.into_inner());
    *done
}
