//! Kicking a backup's vCPU thread so it acknowledges now, not at its next exit.
//!
//! (The first remedy is the backup's ACK helper, `Backup::start_ack_helper`, which the primary
//! wakes on its own core; a kick is the fallback when there is no helper. On our nested hosts a
//! kick reaches the ACK 25–30 µs after it is sent, a helper 8–10 µs.)
//!
//! A backup acknowledges log frames from the thread that runs its guest: while that thread is
//! inside `KVM_RUN`, frames wait in the medium until the guest's next exit, and the primary's
//! outputs wait with them (tens to hundreds of µs on our nested hosts). A receiver thread of
//! its own would answer at once, but it needs a core: on two cores it shares the vCPU's and
//! steals its time whenever it polls. A kick costs nothing until it is needed: when an output
//! has waited a few µs for its ACK (the vmm's `RecordConfig::ack_kick`), the primary sends the backup's
//! vCPU thread a signal; `KVM_RUN` returns `EINTR` (not a guest exit: nothing the guest sees
//! changes, and exits are not counted), the backup pumps its channel — validating and
//! acknowledging what arrived — and enters the guest again.
//!
//! Same host only (the shared-memory medium): the backup's vCPU thread publishes its thread id
//! in the shared control page ([`crate::shm`]); the primary signals it with `tgkill`, whose
//! process id comes from the kernel (`SO_PEERCRED` of the set-up socket), not from the page,
//! so a wrong thread id can reach no thread outside the backup process. The backup clears the
//! thread id when its channel ends (`fence`), so a primary that has not noticed yet does not
//! interrupt its system calls during a takeover. The signal is
//! [`signal()`] (the first real-time signal), whose handler does nothing and restarts
//! interrupted system calls (`SA_RESTART`): a kick only ends `KVM_RUN`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

/// The kick signal: the first real-time signal the C library leaves to programs.
pub fn signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_sig: libc::c_int) {}

/// Installs the kick signal's handler (does nothing, `SA_RESTART`), once per process. Returns
/// whether it is installed.
pub fn install_handler() -> bool {
    static ONCE: Once = Once::new();
    static OK: AtomicBool = AtomicBool::new(false);
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is an
        // async-signal-safe function that does nothing; sigaction only reads `act`.
        let ok = unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(signal(), &act, std::ptr::null_mut()) == 0
        };
        OK.store(ok, Ordering::Release);
    });
    OK.load(Ordering::Acquire)
}

/// The calling thread's id.
pub fn current_tid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The process at the other end of a connected Unix stream socket (`SO_PEERCRED`), as the
/// kernel recorded it at `connect`/`listen` time.
pub fn peer_pid(stream: &std::os::unix::net::UnixStream) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`, a ucred.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Sends the kick signal to thread `tid` of process `pid`; `false` if there is no such thread
/// in that process (the kernel checks that the thread belongs to it).
pub fn kick(pid: i32, tid: i32) -> bool {
    if pid <= 0 || tid <= 0 {
        return false;
    }
    // SAFETY: tgkill takes two ids and a signal number and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal()) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI32;
    use std::sync::Arc;

    #[test]
    fn a_kick_interrupts_a_blocking_wait_of_that_thread_only() {
        assert!(install_handler());
        // A thread blocked in pause(2) (never restarted) wakes with EINTR when kicked.
        let tid = Arc::new(AtomicI32::new(0));
        let t = {
            let tid = tid.clone();
            std::thread::spawn(move || {
                tid.store(current_tid(), Ordering::SeqCst);
                // SAFETY: pause blocks until a signal's handler ran.
                let rc = unsafe { libc::pause() };
                (rc, std::io::Error::last_os_error().raw_os_error())
            })
        };
        while tid.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // SAFETY: getpid has no arguments and cannot fail.
        let me = unsafe { libc::getpid() };
        // Until the thread is in pause(), a kick only runs the handler: kick until it returns.
        while !t.is_finished() {
            assert!(kick(me, tid.load(Ordering::SeqCst)));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(t.join().expect("thread"), (-1, Some(libc::EINTR)));
        // Another process's id with our thread's id: refused by the kernel.
        assert!(!kick(1, current_tid()));
        assert!(!kick(me, 0));
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        // SAFETY: getpid has no arguments and cannot fail.
        assert_eq!(peer_pid(&a), Some(unsafe { libc::getpid() }));
    }
}
