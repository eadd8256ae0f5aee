//! Random bytes: the RANDOM hypercall, the guest's only source of randomness (never `rdrand`
//! or `rdseed`: the backup could not reproduce them). Each call is one hypercall exit giving 16
//! bytes, logged by the primary and replayed by the backup.

use crate::abi::OP_RANDOM;
use crate::hypercall;

/// Eight random bytes as a little-endian word (one hypercall exit).
#[inline(always)]
pub fn u64() -> u64 {
    hypercall::call(OP_RANDOM);
    hypercall::random_word(0)
}

/// Sixteen random bytes (one hypercall exit).
#[inline(always)]
pub fn bytes() -> [u8; 16] {
    hypercall::call(OP_RANDOM);
    let lo = hypercall::random_word(0).to_le_bytes();
    let hi = hypercall::random_word(1).to_le_bytes();
    let mut b = [0; 16];
    b[..8].copy_from_slice(&lo);
    b[8..].copy_from_slice(&hi);
    b
}

/// Fills `buf` with random bytes (one hypercall exit per 16 bytes).
pub fn fill(buf: &mut [u8]) {
    for chunk in buf.chunks_mut(16) {
        let b = bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}
