//! Timer ticks: the VMM raises vector 32 ([`crate::abi::TIMER_VECTOR`]) now and then, at exits
//! it logs, so both replicas see each tick at the same point of the guest's execution.

use core::cell::UnsafeCell;

/// The tick counter: a plain word, so that reading it costs one load, which the compiler may
/// narrow (a response field of 32 bits loads 32 bits).
struct Counter(UnsafeCell<u64>);

// SAFETY: a guest has one thread of execution, and interrupts are taken only where the guest lets
// them (after a hypercall, in `irq::poll`; with a real IDT, inside `irq::wait`): the handler that
// writes the counter never runs while guest code reads it.
unsafe impl Sync for Counter {}

static TICKS: Counter = Counter(UnsafeCell::new(0));

/// Timer ticks seen so far.
#[inline(always)]
pub fn ticks() -> u64 {
    // SAFETY: see `Counter`: no write is in progress.
    unsafe { *TICKS.0.get() }
}

/// The timer vector's handler.
#[inline(always)]
pub(crate) fn tick() {
    // SAFETY: see `Counter`: this is the only writer, and no reference to the counter is held
    // anywhere.
    unsafe { *TICKS.0.get() = (*TICKS.0.get()).wrapping_add(1) };
}
