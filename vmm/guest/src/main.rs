//! ftvm's guest program: a tiny key-value service that runs in ring 0, 64-bit long mode, on one
//! vCPU with interrupts disabled, and talks to the VMM only through hypercalls on port 0x500 and
//! the mailbox page (see `vmm/GUEST-ABI.md` and `vmm/src/layout.rs`, which this file includes).
//!
//! Deterministic by construction: every input (requests, time, randomness, timer ticks) arrives
//! through a hypercall exit, and the program never executes `rdtsc`, `rdrand`, `rdseed`, `cpuid`
//! or `sti` — except the `nondet` feature's variant, which mixes `rdtsc` into the response token
//! on purpose so that divergence detection can be tested.
//!
//! Ring-0 guest instructions are expensive on the development host (~240 ns each), so the code
//! path per request is kept short: keys and values move as words, the only byte loop is the
//! FNV-1a hash over the key, no formatting, no allocation.
#![no_std]
#![no_main]

use core::arch::asm;
use core::cell::UnsafeCell;
use core::panic::PanicInfo;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

#[path = "../../src/layout.rs"]
#[allow(dead_code)]
mod layout;

use layout::*;

const MAILBOX: *mut Mailbox = MAILBOX_ADDR as *mut Mailbox;
const RX: *const u8 = RX_BUF_ADDR as *const u8;
const TX: *mut u8 = TX_BUF_ADDR as *mut u8;
const KEY_WORDS: usize = KV_MAX_KEY / 8;
const VAL_WORDS: usize = KV_MAX_VAL / 8;

/// A table slot. Keys and values are kept as little-endian words, zero past their length, so that
/// comparing and copying costs a few word operations instead of byte loops.
#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    used: u8,
    key_len: u8,
    val_len: u8,
    key: [u64; KEY_WORDS],
    val: [u64; VAL_WORDS],
}

impl Slot {
    const EMPTY: Slot = Slot {
        used: 0,
        key_len: 0,
        val_len: 0,
        key: [0; KEY_WORDS],
        val: [0; VAL_WORDS],
    };
}

/// A response kept for retries: the request's header word and the response, as words.
#[derive(Clone, Copy)]
#[repr(C)]
struct Reply {
    /// The request's first word (`req_id | op | key_len | val_len`); 0 = empty.
    request: u64,
    /// Response length in bytes (header + value).
    len: u64,
    words: [u64; REPLY_WORDS],
}

const REPLY_WORDS: usize = (KV_RESP_HEADER_LEN + KV_MAX_VAL) / 8;
const REPLY_SETS: usize = KV_REPLY_CACHE / KV_REPLY_WAYS;

impl Reply {
    const EMPTY: Reply = Reply {
        request: 0,
        len: 0,
        words: [0; REPLY_WORDS],
    };
}

struct State {
    table: [Slot; KV_SLOTS],
    /// Recent responses for answering retries: `KV_REPLY_CACHE / KV_REPLY_WAYS` sets of
    /// `KV_REPLY_WAYS` entries, the set chosen by `req_id`, each set replaced oldest first.
    replies: [Reply; KV_REPLY_CACHE],
    /// Per set, the way the next response replaces.
    reply_next: [u8; REPLY_SETS],
    /// Timer ticks (vector 32) seen so far.
    ticks: u32,
    /// Interrupts on vectors without a handler (counted, otherwise ignored).
    spurious: u32,
}

struct Global(UnsafeCell<State>);

// SAFETY: the guest has one vCPU and never enables interrupts, so there is exactly one thread of
// execution and `_start` takes the only reference to the state.
unsafe impl Sync for Global {}

/// All-zero, so it lives in .bss (the VMM hands the guest zeroed memory).
static STATE: Global = Global(UnsafeCell::new(State {
    table: [Slot::EMPTY; KV_SLOTS],
    replies: [Reply::EMPTY; KV_REPLY_CACHE],
    reply_next: [0; REPLY_SETS],
    ticks: 0,
    spurious: 0,
}));

/// `out dx, al` on the hypercall port. No `nomem`: the VMM reads and writes guest memory during
/// the exit, so the compiler must treat this as touching all memory.
#[inline(always)]
fn hypercall(op: u8) {
    // SAFETY: port I/O on the hypercall port has no effect on guest memory other than what the
    // VMM does per the ABI; the asm does not touch the stack or flags.
    unsafe {
        asm!("out dx, al", in("dx") HYPERCALL_PORT, in("al") op, options(nostack, preserves_flags));
    }
}

/// A hypercall followed by delivery of any pending paravirtual interrupts.
#[inline(always)]
fn call(st: &mut State, op: u8) {
    hypercall(op);
    // SAFETY: the mailbox is identity-mapped guest RAM, aligned; the VMM only writes it during
    // exits, so a volatile read after the exit sees the current value.
    let pending = unsafe { read_volatile(addr_of!((*MAILBOX).pending_irqs)) };
    if pending != 0 {
        handle_irqs(st, pending);
    }
}

#[cold]
#[inline(never)]
fn handle_irqs(st: &mut State, pending: u64) {
    if pending & TIMER_IRQ_BIT != 0 {
        st.ticks = st.ticks.wrapping_add(1);
    }
    let others = pending & !TIMER_IRQ_BIT;
    if others != 0 {
        st.spurious = st.spurious.wrapping_add(others.count_ones());
    }
    // SAFETY: as in `call`; every pending bit has been handled, so all are cleared.
    unsafe { write_volatile(addr_of_mut!((*MAILBOX).pending_irqs), 0) };
}

fn halt(code: u64) -> ! {
    // SAFETY: the mailbox is identity-mapped guest RAM.
    unsafe { write_volatile(addr_of_mut!((*MAILBOX).op_result), code) };
    hypercall(OP_HALT);
    loop {
        // SAFETY: interrupts are disabled, so `hlt` just stops the vCPU (KVM exits to the VMM).
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Entry point: the VMM sets RIP here (the ELF's e_entry), RSP = `INITIAL_RSP`, long mode.
#[no_mangle]
#[link_section = ".text._start"]
pub extern "C" fn _start() -> ! {
    // SAFETY: single thread of execution (see `Global`); this is the only reference ever made.
    let st = unsafe { &mut *STATE.0.get() };
    loop {
        call(st, OP_NET_RX);
        // SAFETY: mailbox is identity-mapped guest RAM, written by the VMM during the exit.
        let (result, rx_len) = unsafe {
            (
                read_volatile(addr_of!((*MAILBOX).op_result)),
                read_volatile(addr_of!((*MAILBOX).rx_len)),
            )
        };
        if result == RX_SHUTDOWN {
            halt(HALT_OK);
        }
        if rx_len != 0 {
            serve(st, rx_len as usize);
        }
    }
}

/// Reads the little-endian word at `off` bytes into the RX buffer.
#[inline(always)]
fn rx_word(off: usize) -> u64 {
    // SAFETY: callers keep `off + 8 <= 8 + KV_MAX_KEY + KV_MAX_VAL < NET_BUF_LEN`; the RX buffer
    // is identity-mapped guest RAM that the VMM does not write before the next NET_RX.
    unsafe { (RX.add(off) as *const u64).read_unaligned() }
}

/// Loads `len` (<= 8 * N) bytes at `off` in the RX buffer as zero-padded words into `out`.
#[inline(always)]
fn rx_words<const N: usize>(off: usize, len: usize, out: &mut [u64; N]) {
    let full = len / 8;
    let mut i = 0;
    while i < full && i < N {
        out[i] = rx_word(off + 8 * i);
        i += 1;
    }
    let tail = len % 8;
    if tail != 0 && i < N {
        out[i] = rx_word(off + 8 * i) & ((1u64 << (8 * tail)) - 1);
    }
}

/// FNV-1a, 64-bit, over `len` bytes at `off` in the RX buffer.
#[inline(always)]
fn fnv1a_rx(off: usize, len: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < len {
        // SAFETY: as in `rx_word`.
        h ^= unsafe { *RX.add(off + i) } as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// Handles one request of `rx_len` bytes in the RX buffer: CLOCK, RANDOM, execute, NET_TX.
/// Inlined into the main loop: every instruction counts on hosts that emulate ring-0 code.
#[inline(always)]
fn serve(st: &mut State, rx_len: usize) {
    // A retry (same header word as the response cached in its slot) gets that response again and
    // is not executed: at most once, whatever the client's retries and the pair's failovers.
    let first = if rx_len >= KV_REQ_HEADER_LEN {
        rx_word(0)
    } else {
        0
    };
    let set = (first as u32) as usize % REPLY_SETS;
    let base = set * KV_REPLY_WAYS;
    let mut hit = KV_REPLY_CACHE;
    if first != 0 {
        let mut w = 0;
        while w < KV_REPLY_WAYS {
            if st.replies[base + w].request == first {
                hit = base + w;
            }
            w += 1;
        }
    }
    if hit < KV_REPLY_CACHE {
        let r = &st.replies[hit];
        let n = (r.len as usize).div_ceil(8);
        let mut i = 0;
        while i < n && i < REPLY_WORDS {
            // SAFETY: TX buffer is identity-mapped guest RAM; REPLY_WORDS words fit in it.
            unsafe { (TX as *mut u64).add(i).write(r.words[i]) };
            i += 1;
        }
        // SAFETY: mailbox is identity-mapped guest RAM.
        unsafe { write_volatile(addr_of_mut!((*MAILBOX).tx_len), r.len as u32) };
        call(st, OP_NET_TX);
        return;
    }
    call(st, OP_CLOCK);
    // SAFETY: mailbox is identity-mapped guest RAM, written by the VMM during the exit.
    let timestamp = unsafe { read_volatile(addr_of!((*MAILBOX).clock_ns)) };
    call(st, OP_RANDOM);
    // SAFETY: as above; `random` is 8-byte aligned (offset 16).
    #[allow(unused_mut)]
    let mut token = unsafe { read_volatile(addr_of!((*MAILBOX).random) as *const u64) };
    #[cfg(feature = "nondet")]
    {
        token ^= rdtsc();
    }

    let (req_id, status, val_len) = if (KV_REQ_HEADER_LEN..=NET_BUF_LEN).contains(&rx_len) {
        let h = rx_word(0);
        let req_id = h as u32;
        let op = (h >> 32) as u8;
        let kl = (h >> 40) as u8 as usize;
        let vl = (h >> 48) as usize;
        if op == KV_FILL {
            let (status, len) = fill(kl, vl, rx_len);
            (req_id, status, len)
        } else if kl == 0
            || kl > KV_MAX_KEY
            || vl > KV_MAX_VAL
            || rx_len < KV_REQ_HEADER_LEN + kl + vl
            || !(KV_GET..=KV_INCR).contains(&op)
        {
            (req_id, KV_BAD_REQUEST, 0)
        } else {
            let (status, len) = execute(&mut st.table, op, kl, vl);
            (req_id, status, len)
        }
    } else if rx_len >= 4 {
        (rx_word(0) as u32, KV_BAD_REQUEST, 0)
    } else {
        (0, KV_BAD_REQUEST, 0)
    };

    let tx_len = KV_RESP_HEADER_LEN + val_len;
    // SAFETY: the TX buffer and mailbox are identity-mapped guest RAM; the TX buffer is 4 KiB and
    // 8-byte aligned, the header is 32 bytes.
    unsafe {
        let w = TX as *mut u64;
        w.write(req_id as u64 | (status as u64) << 32 | (val_len as u64) << 48);
        w.add(1).write(timestamp);
        w.add(2).write(token);
        w.add(3).write(st.ticks as u64);
        write_volatile(addr_of_mut!((*MAILBOX).tx_len), tx_len as u32);
    }
    if first != 0 {
        let way = st.reply_next[set] as usize % KV_REPLY_WAYS;
        st.reply_next[set] = ((way + 1) % KV_REPLY_WAYS) as u8;
        let r = &mut st.replies[base + way];
        r.request = first;
        r.len = tx_len as u64;
        let n = tx_len.div_ceil(8);
        let mut i = 0;
        while i < n && i < REPLY_WORDS {
            // SAFETY: TX buffer is identity-mapped guest RAM, just written above.
            r.words[i] = unsafe { (TX as *const u64).add(i).read() };
            i += 1;
        }
    }
    call(st, OP_NET_TX);
}

/// FILL (`layout::KV_FILL`): one store per page of `start_page..start_page + count`, inside
/// RAM above the stack; the response value is the page count. Returns (status, value length).
#[inline(always)]
fn fill(kl: usize, vl: usize, rx_len: usize) -> (u8, usize) {
    if kl != 0 || vl != 16 || rx_len < KV_REQ_HEADER_LEN + 16 {
        return (KV_BAD_REQUEST, 0);
    }
    let range = rx_word(KV_REQ_HEADER_LEN);
    let seed = rx_word(KV_REQ_HEADER_LEN + 8);
    let start = range as u32 as u64;
    let count = range >> 32;
    // SAFETY: mailbox is identity-mapped guest RAM; the VMM set `mem_size` before we started.
    let pages = unsafe { read_volatile(addr_of!((*MAILBOX).mem_size)) } / 4096;
    if start < KV_FILL_FIRST_PAGE || count > KV_FILL_MAX_PAGES || start + count > pages {
        return (KV_BAD_REQUEST, 0);
    }
    let mut page = start;
    while page < start + count {
        // SAFETY: the page is inside guest RAM (checked against `mem_size` above, which the
        // identity map covers) and above everything this program uses.
        unsafe { write_volatile((page * 4096) as *mut u64, seed ^ page) };
        page += 1;
    }
    tx_value(&[count], 8);
    (KV_OK, 8)
}

/// Writes value words to the TX buffer after the response header.
#[inline(always)]
fn tx_value(words: &[u64], len: usize) {
    let n = len.div_ceil(8);
    let mut i = 0;
    while i < n && i < words.len() {
        // SAFETY: TX buffer is identity-mapped guest RAM; 32 + 8 * 8 bytes fit in it.
        unsafe {
            (TX.add(KV_RESP_HEADER_LEN) as *mut u64)
                .add(i)
                .write(words[i])
        };
        i += 1;
    }
}

/// Runs a well-formed request (`kl` key bytes then `vl` value bytes after the header in the RX
/// buffer); writes the response value to the TX buffer; returns (status, value length).
#[inline(always)]
fn execute(table: &mut [Slot; KV_SLOTS], op: u8, kl: usize, vl: usize) -> (u8, usize) {
    let mut key = [0u64; KEY_WORDS];
    rx_words(KV_REQ_HEADER_LEN, kl, &mut key);
    // Open addressing, linear probing; no deletions, so an empty slot ends a probe sequence.
    let mut i = fnv1a_rx(KV_REQ_HEADER_LEN, kl) as usize;
    let mut probes = 0;
    let (found, idx) = loop {
        if probes == KV_SLOTS {
            // Full and not present.
            if op == KV_GET {
                return (KV_NOT_FOUND, 0);
            }
            return (KV_BAD_REQUEST, 0);
        }
        i &= KV_SLOTS - 1;
        let s = &table[i];
        if s.used == 0 {
            break (false, i);
        }
        if s.key_len as usize == kl && s.key == key {
            break (true, i);
        }
        i += 1;
        probes += 1;
    };
    let s = &mut table[idx];
    match op {
        KV_GET => {
            if !found {
                return (KV_NOT_FOUND, 0);
            }
            let vl = s.val_len as usize;
            tx_value(&s.val, vl);
            (KV_OK, vl)
        }
        KV_PUT => {
            if !found {
                s.used = 1;
                s.key_len = kl as u8;
                s.key = key;
            }
            // Overwrite every word so that bytes past the new length are zero.
            let old_words = (s.val_len as usize).div_ceil(8);
            let mut val = [0u64; VAL_WORDS];
            rx_words(KV_REQ_HEADER_LEN + kl, vl, &mut val);
            let n = vl.div_ceil(8).max(old_words);
            let mut w = 0;
            while w < n && w < VAL_WORDS {
                s.val[w] = val[w];
                w += 1;
            }
            s.val_len = vl as u8;
            (KV_OK, 0)
        }
        _ => {
            // INCR: stored value as u64 LE (missing or shorter than 8 bytes = 0), plus one.
            let old = if found && s.val_len >= 8 { s.val[0] } else { 0 };
            if !found {
                s.used = 1;
                s.key_len = kl as u8;
                s.key = key;
            }
            let new = old.wrapping_add(1);
            s.val[0] = new;
            if s.val_len > 8 {
                let mut w = 1;
                while w < VAL_WORDS {
                    s.val[w] = 0;
                    w += 1;
                }
            }
            s.val_len = 8;
            tx_value(&[new], 8);
            (KV_OK, 8)
        }
    }
}

#[cfg(feature = "nondet")]
#[inline(always)]
fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time-stamp counter. This is the deliberate non-determinism of
    // the `nondet` variant.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    halt(HALT_PANIC)
}

// ---- The memory functions the compiler may call (there is no libc). Implemented with string
// instructions so that LLVM cannot turn their bodies back into calls to themselves, and so that a
// copy costs few (slow, ring-0) guest instructions.

/// # Safety
/// Standard `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and disjoint; DF is clear (ABI). Words
    // first (each rep iteration costs about one emulated instruction), then the tail bytes.
    unsafe {
        asm!("rep movsq", "mov ecx, edx", "rep movsb",
             inout("rcx") n / 8 => _, inout("rdi") dest => _, inout("rsi") src => _,
             in("edx") (n % 8) as u32, options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // No harmful overlap for a forward copy.
        // SAFETY: the caller guarantees both ranges are valid; a forward copy is correct here.
        unsafe { memcpy(dest, src, n) }
    } else {
        // SAFETY: the caller guarantees both ranges are valid; copy backwards with DF set, then
        // restore DF = 0 as the ABI requires.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _,
                 inout("rdi") dest.add(n).wrapping_sub(1) => _,
                 inout("rsi") src.add(n).wrapping_sub(1) => _,
                 options(nostack));
        }
        dest
    }
}

/// # Safety
/// Standard `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    let byte = c as u8 as u64;
    // SAFETY: the caller guarantees the range is valid; DF is clear (ABI). Words, then the tail.
    unsafe {
        asm!("rep stosq", "mov ecx, edx", "rep stosb",
             inout("rcx") n / 8 => _, inout("rdi") dest => _,
             in("rax") byte * 0x0101_0101_0101_0101, in("edx") (n % 8) as u32,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Standard `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes. Volatile keeps LLVM
        // from recognising this loop as a memcmp idiom (which would recurse).
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
