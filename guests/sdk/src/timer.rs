//! Timer ticks: the VMM raises vector 32 ([`crate::abi::TIMER_VECTOR`]) now and then, at exits
//! it logs, so both replicas see each tick at the same point of the guest's execution.

use core::cell::UnsafeCell;

/// The tick counter: a plain word, so that reading it costs one load, which the compiler may
/// narrow (a response field of 32 bits loads 32 bits). `repr(transparent)`: the timer's
/// interrupt handler increments it as a u64 in memory (`crate::irq`).
#[repr(transparent)]
pub(crate) struct Counter(UnsafeCell<u64>);

// SAFETY: a guest has one thread of execution, and interrupts are taken only at VM exits — after
// a hypercall's `out`, or in `irq::wait`'s `hlt` (with the `polling` feature: in `irq::poll`,
// after a hypercall) — never in the middle of guest code that reads the counter; reads are
// single loads after such a point, which the compiler cannot hoist above the `out`/`hlt` (their
// asm is not `nomem`).
unsafe impl Sync for Counter {}

pub(crate) static TICKS: Counter = Counter(UnsafeCell::new(0));

/// Timer ticks seen so far.
#[inline(always)]
pub fn ticks() -> u64 {
    // SAFETY: see `Counter`: no write is in progress.
    unsafe { *TICKS.0.get() }
}

/// The timer vector's handler under the paravirtual scheme (with the IDT, the interrupt handler
/// increments the counter itself).
#[cfg(feature = "polling")]
#[inline(always)]
pub(crate) fn tick() {
    // SAFETY: see `Counter`: this is the only writer, and no reference to the counter is held
    // anywhere.
    unsafe { *TICKS.0.get() = (*TICKS.0.get()).wrapping_add(1) };
}
