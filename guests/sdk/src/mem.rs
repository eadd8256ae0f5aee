//! The memory functions the compiler may call (a guest has no libc). Implemented with string
//! instructions so that LLVM cannot turn their bodies back into calls to themselves, and so that
//! a copy costs few (slow, ring-0) guest instructions.

use core::arch::asm;
use core::ptr::read_volatile;

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
