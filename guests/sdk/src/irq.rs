//! Paravirtual interrupts: where they are delivered, and where the guest waits for one.
//!
//! Today the guest never enables hardware interrupts. At any hypercall exit the VMM may set bits
//! in the mailbox's `pending_irqs` (bit *i* = vector 32 + *i*); after every hypercall the SDK
//! reads that word and, when it is not zero, runs the handler of each set bit and clears it
//! ([`poll`], called by every hypercall wrapper). Vector 32 is the timer ([`crate::timer`]);
//! other vectors have no handler and are counted ([`spurious`]).
//!
//! [`wait`] is the one place the guest waits for something to happen. Today it returns at once
//! (the guest polls NET_RX, exactly as before the SDK existed); a guest with a real IDT would
//! `sti; hlt` there and take vector 32 (timer) and 33 (network receive) as KVM-injected
//! interrupts at VM exits, without any change to code that waits through it
//! ([`crate::net::Net::next_request`] does).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::abi::TIMER_IRQ_BIT;
use crate::hypercall;

static SPURIOUS: AtomicU64 = AtomicU64::new(0);

/// Delivers the paravirtual interrupts raised at the exit that just happened. Called after every
/// hypercall; a read and a compare when nothing is pending.
#[inline(always)]
pub(crate) fn poll() {
    let pending = hypercall::pending_irqs();
    if pending != 0 {
        deliver(pending);
    }
}

/// Runs the handler of every pending vector and clears them all.
#[cold]
#[inline(never)]
fn deliver(pending: u64) {
    if pending & TIMER_IRQ_BIT != 0 {
        crate::timer::tick();
    }
    let others = pending & !TIMER_IRQ_BIT;
    if others != 0 {
        let n = u64::from(others.count_ones());
        SPURIOUS.store(
            SPURIOUS.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    hypercall::clear_pending_irqs();
}

/// Waits until something may have happened (a request arrived, a timer tick). Today: returns at
/// once, and the caller polls; see the module documentation.
#[inline(always)]
pub fn wait() {}

/// Interrupts raised on vectors without a handler so far (counted, otherwise ignored).
pub fn spurious() -> u64 {
    SPURIOUS.load(Ordering::Relaxed)
}
