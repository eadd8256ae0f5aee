//! The guest ABI: memory map, hypercall port and operations, mailbox layout.
//!
//! **This file is the single source of the ABI's numbers.** It is the guest SDK's `abi` module
//! (`ftvm_guest::abi`, crate `guests/sdk`), and the VMM compiles the very same file as
//! `vmm::layout` (`#[path = "../../guests/sdk/src/abi.rs"]` in `vmm/src/lib.rs`), so the two sides
//! cannot drift apart. It must therefore stay `core`-only: constants and `#[repr(C)]` types, no
//! `std`, no dependencies, nothing that names either crate. `vmm/GUEST-ABI.md` is the prose
//! version.
//!
//! All of guest memory is identity-mapped (guest physical = guest virtual) by the page tables the
//! VMM writes at [`PML4_ADDR`], [`PDPT_ADDR`] and [`PD_ADDR`].
//!
//! | range | contents |
//! |---|---|
//! | `0x0000..0x0500` | unused, zero |
//! | `0x0500..0x0528` | GDT: null, code `0x08`, data `0x10`, 64-bit TSS `0x18` (16 bytes) |
//! | `0x0600..0x0668` | TSS (all zero, never used: the guest never changes privilege) |
//! | `0x1000` / `0x2000` / `0x3000` | PML4 / PDPT / PD (2 MiB pages identity-mapping the first 1 GiB) |
//! | `0x8000..0x9000` | mailbox page: [`Mailbox`] (64 bytes), the panic message at [`PANIC_MSG_ADDR`] |
//! | `0x10000..0x11000` | network receive buffer (VMM writes, guest reads) |
//! | `0x11000..0x12000` | network transmit buffer (guest writes, VMM reads) |
//! | `0x100000..0x300000` | guest image: code, rodata, data, bss |
//! | `0x300000..0x400000` | stack (grows down from [`STACK_TOP`]) |
//! | `0x400000..mem_size` | free, zero |

/// Guest physical address of the PML4 (CR3 points here).
pub const PML4_ADDR: u64 = 0x1000;
/// Guest physical address of the single PDPT.
pub const PDPT_ADDR: u64 = 0x2000;
/// Guest physical address of the single page directory (512 × 2 MiB pages).
pub const PD_ADDR: u64 = 0x3000;
/// Bytes identity-mapped by the page tables (guest memory never exceeds this).
pub const IDENTITY_MAP_SIZE: u64 = 1 << 30;

/// Guest physical address of the GDT.
pub const GDT_ADDR: u64 = 0x500;
/// Number of 8-byte GDT slots: null, code, data, TSS (two slots).
pub const GDT_ENTRIES: usize = 5;
/// Guest physical address of the (zero, unused) 64-bit TSS.
pub const TSS_ADDR: u64 = 0x600;
/// Code segment selector (64-bit, DPL 0).
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector (DS, ES, FS, GS, SS).
pub const DATA_SELECTOR: u16 = 0x10;
/// Task register selector.
pub const TSS_SELECTOR: u16 = 0x18;

/// Guest physical address of the mailbox page ([`Mailbox`]).
pub const MAILBOX_ADDR: u64 = 0x8000;
/// Size of the mailbox page.
pub const MAILBOX_PAGE_LEN: usize = 4096;

/// Guest physical address of the network receive buffer.
pub const RX_BUF_ADDR: u64 = 0x10000;
/// Guest physical address of the network transmit buffer.
pub const TX_BUF_ADDR: u64 = 0x11000;
/// Size of each network buffer.
pub const NET_BUF_LEN: usize = 4096;

/// Where the guest image is linked and loaded (1 MiB).
pub const GUEST_LOAD_ADDR: u64 = 0x10_0000;
/// End (exclusive) of the region the guest image, including its bss, must fit in.
pub const GUEST_IMAGE_END: u64 = 0x30_0000;
/// Lowest address of the guest stack.
pub const STACK_BOTTOM: u64 = 0x30_0000;
/// Top of the guest stack (exclusive; 16-byte aligned).
pub const STACK_TOP: u64 = 0x40_0000;
/// RSP at entry: as if `_start` had just been called (the 8 bytes above it are a zero "return
/// address"), so the SysV ABI's `rsp % 16 == 8` at function entry holds.
pub const INITIAL_RSP: u64 = STACK_TOP - 8;

/// Smallest guest memory size the VMM accepts (everything above fits below it).
pub const MIN_MEM_SIZE: usize = 4 << 20;
/// Default guest memory size.
pub const DEFAULT_MEM_SIZE: usize = 16 << 20;
/// Largest guest memory size (the identity map covers 1 GiB).
pub const MAX_MEM_SIZE: usize = IDENTITY_MAP_SIZE as usize;
/// Guest memory sizes must be a multiple of this.
pub const MEM_SIZE_ALIGN: usize = 4096;

/// The one I/O port the guest uses: `out dx, al` with `dx = HYPERCALL_PORT`, `al = op`.
pub const HYPERCALL_PORT: u16 = 0x500;

/// NET_RX: the VMM writes the next client request into the RX buffer and its length into
/// `rx_len` (0 if there is none). It writes `op_result` = [`RX_OK`], or [`RX_SHUTDOWN`] to ask
/// the guest to stop (the guest then issues HALT).
pub const OP_NET_RX: u8 = 1;
/// NET_TX: the guest wrote `tx_len` bytes of a response into the TX buffer; the VMM takes them
/// as output.
pub const OP_NET_TX: u8 = 2;
/// CLOCK: the VMM writes the current time in nanoseconds into `clock_ns`.
pub const OP_CLOCK: u8 = 3;
/// RANDOM: the VMM writes 16 random bytes into `random`.
pub const OP_RANDOM: u8 = 4;
/// HALT: the guest is done (`op_result` holds its exit code, [`HALT_OK`] or [`HALT_PANIC`]);
/// the VM stops.
pub const OP_HALT: u8 = 5;

/// `op_result` after NET_RX: carry on.
pub const RX_OK: u64 = 0;
/// `op_result` after NET_RX: the VMM asks the guest to halt.
pub const RX_SHUTDOWN: u64 = 1;
/// `op_result` written by the guest before HALT: normal stop.
pub const HALT_OK: u64 = 0;
/// `op_result` written by the guest before HALT: the guest panicked.
pub const HALT_PANIC: u64 = 0xDEAD_0001;

/// Where a guest that panics leaves a message before HALT with [`HALT_PANIC`], in the mailbox
/// page after [`Mailbox`]: a `u32` length, then that many bytes of UTF-8 (at most
/// [`PANIC_MSG_MAX`]). The VMM reads it when the guest halts with `HALT_PANIC`; nobody reads it
/// otherwise. A guest that panics without writing it leaves length 0 (the page starts zeroed).
pub const PANIC_MSG_ADDR: u64 = MAILBOX_ADDR + 0x100;
/// Longest panic message (bytes after the length word).
pub const PANIC_MSG_MAX: usize = 252;

/// First paravirtual interrupt vector; bit `i` of `pending_irqs` is vector `IRQ_VECTOR_BASE + i`.
pub const IRQ_VECTOR_BASE: u8 = 32;
/// Timer tick vector: the guest increments its tick counter.
pub const TIMER_VECTOR: u8 = 32;
/// `pending_irqs` bit of the timer tick.
pub const TIMER_IRQ_BIT: u64 = 1 << (TIMER_VECTOR - IRQ_VECTOR_BASE);
/// Network-receive vector: injected (never set in `pending_irqs`) when the guest waits in `hlt`
/// with interrupts enabled and a request arrives; the request is already in the receive buffer
/// and its length in `rx_len`, as after a NET_RX.
pub const NET_RX_VECTOR: u8 = 33;

/// The mailbox at [`MAILBOX_ADDR`]; all fields little-endian.
///
/// | offset | field | written by |
/// |---|---|---|
/// | 0 | `op_result: u64` | VMM (NET_RX), guest (HALT) |
/// | 8 | `clock_ns: u64` | VMM (CLOCK) |
/// | 16 | `random: [u8; 16]` | VMM (RANDOM) |
/// | 32 | `rx_len: u32` | VMM (NET_RX) |
/// | 36 | `tx_len: u32` | guest (before NET_TX) |
/// | 40 | `pending_irqs: u64` | VMM sets bits at any hypercall exit; guest clears them |
/// | 48 | `mem_size: u64` | VMM, once, before the guest starts (guest RAM in bytes) |
/// | 56 | `reserved: [u8; 8]` | nobody (zero) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mailbox {
    /// Per-operation result word.
    pub op_result: u64,
    /// Time from the last CLOCK, nanoseconds.
    pub clock_ns: u64,
    /// Bytes from the last RANDOM.
    pub random: [u8; 16],
    /// Length of the request in the RX buffer (0 = none).
    pub rx_len: u32,
    /// Length of the response in the TX buffer.
    pub tx_len: u32,
    /// Bit `i` set = vector `32 + i` pending.
    pub pending_irqs: u64,
    /// Guest RAM in bytes (set once at creation).
    pub mem_size: u64,
    /// Zero.
    pub reserved: [u8; 8],
}

/// Size of [`Mailbox`].
pub const MAILBOX_LEN: usize = 64;
/// Offset of `op_result` in the mailbox.
pub const MB_OP_RESULT: u64 = 0;
/// Offset of `clock_ns` in the mailbox.
pub const MB_CLOCK_NS: u64 = 8;
/// Offset of `random` in the mailbox.
pub const MB_RANDOM: u64 = 16;
/// Offset of `rx_len` in the mailbox.
pub const MB_RX_LEN: u64 = 32;
/// Offset of `tx_len` in the mailbox.
pub const MB_TX_LEN: u64 = 36;
/// Offset of `pending_irqs` in the mailbox.
pub const MB_PENDING_IRQS: u64 = 40;
/// Offset of `mem_size` in the mailbox.
pub const MB_MEM_SIZE: u64 = 48;

/// Guest physical address of `op_result`.
pub const OP_RESULT_ADDR: u64 = MAILBOX_ADDR + MB_OP_RESULT;
/// Guest physical address of `clock_ns`.
pub const CLOCK_NS_ADDR: u64 = MAILBOX_ADDR + MB_CLOCK_NS;
/// Guest physical address of `random`.
pub const RANDOM_ADDR: u64 = MAILBOX_ADDR + MB_RANDOM;
/// Guest physical address of `rx_len`.
pub const RX_LEN_ADDR: u64 = MAILBOX_ADDR + MB_RX_LEN;
/// Guest physical address of `tx_len`.
pub const TX_LEN_ADDR: u64 = MAILBOX_ADDR + MB_TX_LEN;
/// Guest physical address of `pending_irqs`.
pub const PENDING_IRQS_ADDR: u64 = MAILBOX_ADDR + MB_PENDING_IRQS;

const _: () = {
    assert!(core::mem::size_of::<Mailbox>() == MAILBOX_LEN);
    assert!(core::mem::offset_of!(Mailbox, op_result) == MB_OP_RESULT as usize);
    assert!(core::mem::offset_of!(Mailbox, clock_ns) == MB_CLOCK_NS as usize);
    assert!(core::mem::offset_of!(Mailbox, random) == MB_RANDOM as usize);
    assert!(core::mem::offset_of!(Mailbox, rx_len) == MB_RX_LEN as usize);
    assert!(core::mem::offset_of!(Mailbox, tx_len) == MB_TX_LEN as usize);
    assert!(core::mem::offset_of!(Mailbox, pending_irqs) == MB_PENDING_IRQS as usize);
    assert!(core::mem::offset_of!(Mailbox, mem_size) == MB_MEM_SIZE as usize);
    assert!(GDT_ADDR + (GDT_ENTRIES as u64) * 8 <= TSS_ADDR);
    assert!(TSS_ADDR + 0x68 <= PML4_ADDR);
    assert!(PD_ADDR + 0x1000 <= MAILBOX_ADDR);
    assert!(PANIC_MSG_ADDR >= MAILBOX_ADDR + MAILBOX_LEN as u64);
    assert!(PANIC_MSG_ADDR + 4 + PANIC_MSG_MAX as u64 <= MAILBOX_ADDR + MAILBOX_PAGE_LEN as u64);
    assert!(TX_BUF_ADDR + NET_BUF_LEN as u64 <= GUEST_LOAD_ADDR);
    assert!(GUEST_IMAGE_END <= STACK_BOTTOM);
    assert!(STACK_TOP <= MIN_MEM_SIZE as u64);
    assert!(STACK_TOP & 15 == 0);
};
