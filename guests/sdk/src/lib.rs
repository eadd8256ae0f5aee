//! The ftvm guest SDK: what a program needs to run as an ftvm guest, wrapped safely.
//!
//! An ftvm guest is a freestanding x86-64 program that runs in ring 0 on one vCPU (interrupts
//! arrive only at VM exits: [`irq`]), under a primary/backup pair that must keep it bit-identical on both replicas. It
//! talks to the VMM only through hypercalls (`out` on one port, one VM exit each) and a few pages
//! of shared memory ([`abi`]). Every input — requests, time, random bytes, timer ticks — arrives
//! at a numbered exit, so the backup can replay it at the same place; that is the whole
//! determinism contract, spelled out in `README.md` beside this crate.
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use ftvm_guest::net::Net;
//!
//! ftvm_guest::entry!(main);
//!
//! fn main() {
//!     let mut net = Net::take();
//!     // `None` once the VMM asks the guest to stop; returning from `main` halts it.
//!     while let Some(mut req) = net.next_request() {
//!         // Echo the request's first 8 bytes (read in place), then the time (one CLOCK exit).
//!         let head = req.word(0);
//!         let now = ftvm_guest::clock::now_ns();
//!         let tx = req.tx();
//!         tx.set_word(0, head);
//!         tx.set_word(1, now);
//!         req.send(16); // NET_TX: the first 16 bytes of the transmit buffer
//!     }
//! }
//! ```
//!
//! - [`entry!`] defines `_start`; [`halt`] stops the guest; the SDK's panic handler reports a
//!   panic through the ABI ([`abi::HALT_PANIC`] and a message at [`abi::PANIC_MSG_ADDR`]).
//! - [`net`]: the request loop ([`net::Net::next_request`]) with zero-copy access to the
//!   receive buffer and direct writes into the transmit buffer.
//! - [`clock`], [`random`]: the guest's only sources of time and randomness.
//! - [`timer`]: timer ticks; [`irq`]: the IDT, and where the guest waits for an interrupt.
//! - [`reply_cache`]: answering a client's retry from a cache instead of executing it again.
//! - [`Global`]: a guest's state in a `static`, handed out once as `&'static mut`.
//!
//! Ring-0 guest instructions cost ~240 ns each on the development hosts (KVM's instruction
//! emulator), so everything on a request's path is `#[inline(always)]` and costs what the
//! equivalent hand-written code costs: no formatting, no allocation, no copies the caller did not
//! ask for.
#![no_std]

pub mod abi;
pub mod clock;
mod hypercall;
pub mod irq;
mod mem;
pub mod net;
mod panic;
pub mod random;
pub mod reply_cache;
pub mod timer;

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// Defines the guest's entry point, `_start`, which calls `main` (a `fn()`) and halts the guest
/// with [`abi::HALT_OK`] when it returns. The VMM starts the guest there, in long mode, with the
/// stack set up (`vmm/GUEST-ABI.md`).
///
/// ```ignore
/// ftvm_guest::entry!(main);
/// fn main() { /* serve requests */ }
/// ```
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// The guest's entry point (the ELF's `e_entry`), defined by `ftvm_guest::entry!`.
        #[no_mangle]
        #[link_section = ".text._start"]
        pub extern "C" fn _start() -> ! {
            $crate::irq::init();
            let main: fn() = $main;
            main();
            $crate::halt($crate::abi::HALT_OK)
        }
    };
}

/// Stops the guest with `code` in `op_result` ([`abi::HALT_OK`] for a normal stop; the panic
/// handler uses [`abi::HALT_PANIC`]). The VM stops at this HALT exit and never resumes the guest;
/// if it did, the guest would stop again in `hlt`.
pub fn halt(code: u64) -> ! {
    // SAFETY: `cli` only masks interrupts: nothing may wake the final `hlt`.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    hypercall::set_op_result(code);
    hypercall::out(abi::OP_HALT);
    loop {
        // SAFETY: interrupts are disabled (just above), so `hlt` only stops the vCPU: KVM exits
        // to the VMM with a HLT exit that ends the run.
        unsafe { core::arch::asm!("hlt", options(nomem, nostack)) };
    }
}

/// Guest RAM in bytes (the mailbox's `mem_size`, set by the VMM before the guest starts). Memory
/// from [`abi::STACK_TOP`] up to this is free for the guest's own use, and zero at start.
#[inline(always)]
pub fn mem_size() -> u64 {
    hypercall::mem_size()
}

/// A guest's state in a `static`, handed out once as `&'static mut T` by [`Global::take`].
///
/// Give it an all-zero initial value and it costs no image space: it lands in `.bss`, which the
/// VMM hands over zeroed.
///
/// ```ignore
/// static STATE: ftvm_guest::Global<State> = ftvm_guest::Global::new(State::EMPTY);
/// fn main() {
///     let state: &'static mut State = STATE.take();
/// }
/// ```
#[derive(Debug)]
pub struct Global<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is only reachable through the one `&mut T` that `take` hands out (the
// `taken` flag makes a second `take` panic), so sharing the `Global` itself shares nothing; the
// `&mut T` may end up on another thread only if `T: Send`.
unsafe impl<T: Send> Sync for Global<T> {}

impl<T> Global<T> {
    /// A global holding `value`.
    pub const fn new(value: T) -> Self {
        Global {
            taken: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// The value, as the only reference there will ever be to it.
    ///
    /// # Panics
    /// When called a second time (a guest bug).
    // A `&mut` from `&self` is the point: the flag makes it the only one (as `static_cell` does).
    #[allow(clippy::mut_from_ref)]
    pub fn take(&'static self) -> &'static mut T {
        if self.taken.swap(true, Ordering::Relaxed) {
            panic!("ftvm_guest::Global taken twice");
        }
        // SAFETY: the flag was clear, and is now set for good: this is the first and only
        // reference made to the value, and it lives as long as the static.
        unsafe { &mut *self.value.get() }
    }
}
