//! The hypercall instruction and the mailbox words the SDK reads and writes around it.
//!
//! Mailbox accesses are volatile reads and writes through raw pointers, never references: the
//! VMM writes the mailbox during exits, behind the compiler's back.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use crate::abi::{Mailbox, HYPERCALL_PORT, MAILBOX_ADDR};

const MAILBOX: *mut Mailbox = MAILBOX_ADDR as *mut Mailbox;

/// `out dx, al` on the hypercall port: one VM exit, handled by the VMM before the guest goes on.
/// No `nomem`: the VMM reads and writes guest memory during the exit (the mailbox, the network
/// buffers), so the compiler must treat this as touching all memory.
#[inline(always)]
pub(crate) fn out(op: u8) {
    // SAFETY: port I/O on the hypercall port; the VMM's side effects on guest memory are those of
    // the ABI for `op`, which every caller in this crate accounts for. The asm touches neither the
    // stack nor the flags.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") HYPERCALL_PORT, in("al") op,
                         options(nostack, preserves_flags));
    }
}

/// A hypercall followed by the delivery of any paravirtual interrupts the VMM raised at its exit.
#[inline(always)]
pub(crate) fn call(op: u8) {
    out(op);
    crate::irq::poll();
}

// Each accessor below is a volatile access to one field of the mailbox, which is identity-mapped
// guest RAM at MAILBOX_ADDR, aligned, and only ever accessed through these raw pointers.

#[inline(always)]
pub(crate) fn op_result() -> u64 {
    // SAFETY: see above.
    unsafe { read_volatile(addr_of!((*MAILBOX).op_result)) }
}

#[inline(always)]
pub(crate) fn set_op_result(v: u64) {
    // SAFETY: see above.
    unsafe { write_volatile(addr_of_mut!((*MAILBOX).op_result), v) }
}

#[inline(always)]
pub(crate) fn clock_ns() -> u64 {
    // SAFETY: see above.
    unsafe { read_volatile(addr_of!((*MAILBOX).clock_ns)) }
}

/// The first 8 bytes of `random` as a little-endian word (`random` is 8-byte aligned).
#[inline(always)]
pub(crate) fn random_word(i: usize) -> u64 {
    // SAFETY: see above; `random` is 16 bytes at offset 16, so words 0 and 1 are inside it.
    unsafe { read_volatile((addr_of!((*MAILBOX).random) as *const u64).add(i & 1)) }
}

#[inline(always)]
pub(crate) fn rx_len() -> u32 {
    // SAFETY: see above.
    unsafe { read_volatile(addr_of!((*MAILBOX).rx_len)) }
}

#[inline(always)]
pub(crate) fn set_tx_len(v: u32) {
    // SAFETY: see above.
    unsafe { write_volatile(addr_of_mut!((*MAILBOX).tx_len), v) }
}

#[cfg(feature = "polling")]
#[inline(always)]
pub(crate) fn pending_irqs() -> u64 {
    // SAFETY: see above.
    unsafe { read_volatile(addr_of!((*MAILBOX).pending_irqs)) }
}

#[cfg(feature = "polling")]
#[inline(always)]
pub(crate) fn clear_pending_irqs() {
    // SAFETY: see above.
    unsafe { write_volatile(addr_of_mut!((*MAILBOX).pending_irqs), 0) }
}

#[inline(always)]
pub(crate) fn mem_size() -> u64 {
    // SAFETY: see above.
    unsafe { read_volatile(addr_of!((*MAILBOX).mem_size)) }
}
