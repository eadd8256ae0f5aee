//! Interrupts: a real IDT, and the one place a guest waits for something to happen.
//!
//! [`init`] (run by [`crate::entry!`] before `main`) installs an IDT and enables interrupts.
//! ftvm injects them through KVM, and only at VM exits — right after a hypercall, or while the
//! guest waits in `hlt` — so the point where one lands is an exit number the primary logs and the
//! backup replays. Nothing else can interrupt the guest: the VM has no interrupt controller,
//! no device and no timer of its own.
//!
//! | vector | what | handler |
//! |---|---|---|
//! | 0–31 | CPU exceptions | the guest panics: `CPU exception N (name) at RIP` through the panic handler |
//! | 32 | timer tick | increments [`crate::timer::ticks`] |
//! | 33 | network receive (only while waiting) | none: the request is already in the receive buffer |
//!
//! Every gate runs on its own stack (IST 1 of the TSS the VMM set up), so a handler never
//! touches the red zone below the interrupted code's stack pointer (the guest is compiled for
//! the SysV ABI, which lets leaf functions use it). Handlers never make hypercalls, so an
//! interrupt right after one cannot disturb the mailbox values it returned.
//!
//! [`wait`] sleeps in `hlt` until the next interrupt: an idle guest costs its host nothing and
//! makes no exits but its wake-ups (a request, a timer tick).
//!
//! With the `polling` feature the SDK keeps the older paravirtual scheme instead (no IDT,
//! interrupts never enabled, the timer as a bit in the mailbox's `pending_irqs` read after every
//! hypercall, [`wait`] returning at once so that the guest polls NET_RX): ftvm still runs such
//! guests, and `bench idle` compares the two.

use core::sync::atomic::{AtomicU64, Ordering};

static SPURIOUS: AtomicU64 = AtomicU64::new(0);

/// Interrupts raised on vectors without a handler so far (counted, otherwise ignored; only the
/// paravirtual scheme can raise them).
pub fn spurious() -> u64 {
    SPURIOUS.load(Ordering::Relaxed)
}

#[cfg(feature = "polling")]
mod scheme {
    use super::SPURIOUS;
    use crate::abi::TIMER_IRQ_BIT;
    use crate::hypercall;
    use core::sync::atomic::Ordering;

    pub fn init() {}

    /// Delivers the paravirtual interrupts raised at the exit that just happened.
    #[inline(always)]
    pub fn poll() {
        let pending = hypercall::pending_irqs();
        if pending != 0 {
            deliver(pending);
        }
    }

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

    #[inline(always)]
    pub fn wait() {}
}

#[cfg(not(feature = "polling"))]
mod scheme {
    use core::arch::{asm, global_asm};
    use core::ptr::{addr_of, addr_of_mut};

    use crate::abi::{CODE_SELECTOR, NET_RX_VECTOR, TIMER_VECTOR, TSS_ADDR};

    /// Gates: the 32 exceptions, the timer and network receive.
    const VECTORS: usize = 34;
    /// Offset of IST 1 in the 64-bit TSS.
    const TSS_IST1: u64 = 0x24;
    const IST_LEN: usize = 16 * 1024;

    #[repr(C, align(16))]
    struct Idt([u64; 2 * VECTORS]);
    static mut IDT: Idt = Idt([0; 2 * VECTORS]);

    #[repr(C, align(16))]
    struct IstStack([u8; IST_LEN]);
    static mut IST1: IstStack = IstStack([0; IST_LEN]);

    // Exception stubs, 16 bytes apart from `ftvm_exc_base`: push the vector, go to the common
    // code, which calls `ftvm_exception(vector, frame)` on a 16-byte aligned stack.
    macro_rules! exception_stubs {
        ($($v:literal)*) => {
            global_asm!(
                ".pushsection .text.ftvm_irq,\"ax\"",
                ".balign 16",
                "ftvm_exc_base:",
                $(
                    ".balign 16",
                    concat!("push ", $v),
                    "jmp ftvm_exc_common",
                )*
                "ftvm_exc_common:",
                "    pop rdi",
                "    mov rsi, rsp",
                "    and rsp, -16",
                "    call {exception}",
                "    ud2",
                ".balign 16",
                "ftvm_timer_entry:",
                "    inc qword ptr [rip + {ticks}]",
                "    iretq",
                ".balign 16",
                "ftvm_net_entry:",
                "    iretq",
                ".popsection",
                exception = sym ftvm_exception,
                ticks = sym crate::timer::TICKS,
            );
        };
    }
    exception_stubs!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31);

    extern "C" {
        fn ftvm_exc_base();
        fn ftvm_timer_entry();
        fn ftvm_net_entry();
    }

    /// An interrupt gate (present, DPL 0, 64-bit) to `handler` on IST 1.
    fn gate(handler: u64) -> [u64; 2] {
        let lo = (handler & 0xffff)
            | (u64::from(CODE_SELECTOR) << 16)
            | (1 << 32)
            | (0x8e << 40)
            | (((handler >> 16) & 0xffff) << 48);
        [lo, handler >> 32]
    }

    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }

    pub fn init() {
        let base = ftvm_exc_base as *const () as u64;
        // SAFETY: runs once, before interrupts are enabled and before `main`: nothing else
        // refers to IDT or IST1. The TSS at TSS_ADDR is identity-mapped RAM that the VMM set up
        // and only the CPU reads; IST 1 is its u64 at offset 0x24 (unaligned by design).
        unsafe {
            let idt = &mut *addr_of_mut!(IDT);
            for v in 0..VECTORS {
                let handler = match v as u8 {
                    TIMER_VECTOR => ftvm_timer_entry as *const () as u64,
                    NET_RX_VECTOR => ftvm_net_entry as *const () as u64,
                    _ => base + 16 * v as u64,
                };
                let [lo, hi] = gate(handler);
                idt.0[2 * v] = lo;
                idt.0[2 * v + 1] = hi;
            }
            let top = addr_of!(IST1) as u64 + IST_LEN as u64;
            ((TSS_ADDR + TSS_IST1) as *mut u64).write_unaligned(top);
            let idtr = Idtr {
                limit: (VECTORS * 16 - 1) as u16,
                base: addr_of!(IDT) as u64,
            };
            asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
            asm!("sti", options(nomem, nostack));
        }
    }

    /// Nothing to poll: interrupts arrive through the IDT.
    #[inline(always)]
    pub fn poll() {}

    #[inline(always)]
    pub fn wait() {
        // SAFETY: interrupts are enabled (`init`), so `hlt` returns once an injected interrupt's
        // handler has run. Not `nomem`: the handlers and the VMM write memory meanwhile.
        unsafe { asm!("hlt", options(nostack)) };
    }

    const NAMES: [&str; 32] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor segment overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD error",
        "#VE virtualization",
        "#CP control protection",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "reserved",
        "#HV hypervisor injection",
        "#VC VMM communication",
        "#SX security",
        "reserved",
    ];

    /// Exceptions that push an error code below the return address.
    fn has_error_code(vector: u64) -> bool {
        matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
    }

    /// Called by the exception stubs: the guest panics, naming the exception and where it was.
    extern "C" fn ftvm_exception(vector: u64, frame: *const u64) -> ! {
        let rip_slot = if has_error_code(vector) { 1 } else { 0 };
        // SAFETY: `frame` points at the interrupt frame the CPU pushed on IST 1 (after the
        // optional error code comes RIP), which stays valid: this function never returns.
        let rip = unsafe { frame.add(rip_slot).read() };
        let name = NAMES.get(vector as usize).copied().unwrap_or("?");
        panic!("CPU exception {vector} ({name}) at {rip:#x}");
    }
}

pub(crate) use scheme::poll;

/// Installs the IDT and enables interrupts (nothing with the `polling` feature). Called by
/// [`crate::entry!`] before `main`; not for guests to call.
#[doc(hidden)]
pub fn init() {
    scheme::init()
}

/// Waits until something may have happened (a request arrived, a timer tick): `hlt` until the
/// next interrupt (with the `polling` feature: returns at once, and the caller polls).
#[inline(always)]
pub fn wait() {
    scheme::wait()
}
