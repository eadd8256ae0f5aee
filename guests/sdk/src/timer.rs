//! Timer ticks: the VMM raises vector 32 ([`crate::abi::TIMER_VECTOR`]) now and then, at exits
//! it logs, so both replicas see each tick at the same point of the guest's execution.

use core::sync::atomic::{AtomicU64, Ordering};

static TICKS: AtomicU64 = AtomicU64::new(0);

/// Timer ticks seen so far.
#[inline(always)]
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// The timer vector's handler.
#[inline(always)]
pub(crate) fn tick() {
    // One thread of execution, and interrupts are only ever taken where the guest lets them
    // ([`crate::irq`]): a plain load and store, no locked instruction.
    TICKS.store(
        TICKS.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Relaxed,
    );
}
