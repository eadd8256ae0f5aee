//! The guest's clock: the CLOCK hypercall. Time is an input like any other: the primary logs
//! each value it hands out and the backup replays it, so never measure time any other way
//! (no `rdtsc`, no loops counted against a clock).

use crate::abi::OP_CLOCK;
use crate::hypercall;

/// The time in nanoseconds (one hypercall exit). Never goes backwards across a failover: the
/// survivor's clock continues from the last logged value.
#[inline(always)]
pub fn now_ns() -> u64 {
    hypercall::call(OP_CLOCK);
    hypercall::clock_ns()
}
