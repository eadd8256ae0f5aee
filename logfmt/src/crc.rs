//! CRC32C (Castagnoli), the frame checksum, computed by whichever of two implementations this
//! CPU runs faster.
//!
//! - [`CrcImpl::Instruction`]: SSE4.2's `crc32` instruction, through the `crc32c` crate (which
//!   falls back to its own software code on CPUs without it). On real x86 hardware this is
//!   several times faster than any table.
//! - [`CrcImpl::Table`]: slicing-by-8 over eight 256-entry tables built at compile time.
//!
//! Why both: an emulated CPU can advertise SSE4.2 and still run its `crc32` instruction slowly.
//! QEMU's TCG, which runs the soft-RoCE CI guest, implements it one bit per loop iteration, so a
//! 150-byte frame cost about 1.5 µs there per checksum, ten times the table's cost. The choice
//! is made once per process, on first use, by timing both on the same buffer (a few
//! microseconds natively); `FTVM_CRC32C=instruction|table` forces one. Both compute the same
//! function (tested on random input), so the two ends of a channel never need to agree on
//! which they use.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The reflected CRC32C polynomial.
const POLY: u32 = 0x82F6_3B78;

/// `TABLES[k][b]`: the CRC register after byte `b` followed by `k` zero bytes.
static TABLES: [[u32; 256]; 8] = make_tables();

const fn make_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut b = 0;
    while b < 256 {
        let mut crc = b as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        t[0][b] = crc;
        b += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut b = 0;
        while b < 256 {
            let prev = t[k - 1][b];
            t[k][b] = (prev >> 8) ^ t[0][(prev & 0xFF) as usize];
            b += 1;
        }
        k += 1;
    }
    t
}

/// Which code computes the checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrcImpl {
    /// The CPU's `crc32` instruction (SSE4.2), via the `crc32c` crate.
    Instruction,
    /// Table-driven slicing-by-8.
    Table,
}

impl CrcImpl {
    /// The name used in `FTVM_CRC32C` and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            CrcImpl::Instruction => "instruction",
            CrcImpl::Table => "table",
        }
    }

    /// Extends `crc` (the CRC32C of earlier bytes; 0 for none) over `data`.
    #[inline]
    pub fn append(self, crc: u32, data: &[u8]) -> u32 {
        match self {
            CrcImpl::Instruction => crc32c::crc32c_append(crc, data),
            CrcImpl::Table => table_append(crc, data),
        }
    }
}

/// Table-driven CRC32C: extends `crc` over `data`, eight bytes per step.
pub fn table_append(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let lo = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) ^ c;
        let hi = u32::from_le_bytes([word[4], word[5], word[6], word[7]]);
        c = TABLES[7][(lo & 0xFF) as usize]
            ^ TABLES[6][((lo >> 8) & 0xFF) as usize]
            ^ TABLES[5][((lo >> 16) & 0xFF) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][(hi & 0xFF) as usize]
            ^ TABLES[2][((hi >> 8) & 0xFF) as usize]
            ^ TABLES[1][((hi >> 16) & 0xFF) as usize]
            ^ TABLES[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ TABLES[0][((c ^ u32::from(b)) & 0xFF) as usize];
    }
    !c
}

const UNDECIDED: u8 = 0;
const INSTRUCTION: u8 = 1;
const TABLE: u8 = 2;

static CHOSEN: AtomicU8 = AtomicU8::new(UNDECIDED);

/// The implementation this process uses: `FTVM_CRC32C` if set to a known name, else the faster
/// one on this CPU, timed on first use.
pub fn implementation() -> CrcImpl {
    match CHOSEN.load(Ordering::Relaxed) {
        INSTRUCTION => CrcImpl::Instruction,
        TABLE => CrcImpl::Table,
        _ => {
            let chosen = choose();
            let code = match chosen {
                CrcImpl::Instruction => INSTRUCTION,
                CrcImpl::Table => TABLE,
            };
            // Two threads may both time on first use; either answer is correct.
            CHOSEN.store(code, Ordering::Relaxed);
            chosen
        }
    }
}

fn choose() -> CrcImpl {
    match std::env::var("FTVM_CRC32C").as_deref() {
        Ok("instruction") => return CrcImpl::Instruction,
        Ok("table") => return CrcImpl::Table,
        _ => {}
    }
    // A frame-sized buffer; the best of a few rounds of each, interleaved, so a preemption in
    // one round does not decide.
    let buf: Vec<u8> = (0..256u32)
        .map(|i| (i.wrapping_mul(151) >> 3) as u8)
        .collect();
    let mut best = [Duration::MAX; 2];
    for _ in 0..5 {
        for (slot, imp) in [CrcImpl::Instruction, CrcImpl::Table]
            .into_iter()
            .enumerate()
        {
            let start = Instant::now();
            let mut crc = 0;
            for _ in 0..32 {
                crc = imp.append(crc, std::hint::black_box(&buf));
            }
            std::hint::black_box(crc);
            best[slot] = best[slot].min(start.elapsed());
        }
    }
    if best[1] < best[0] {
        CrcImpl::Table
    } else {
        CrcImpl::Instruction
    }
}

/// The CRC32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// Extends `crc` (the CRC32C of earlier bytes) over `data`, with [`implementation`].
#[inline]
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    implementation().append(crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        // The catalogue check value of CRC-32/ISCSI.
        assert_eq!(table_append(0, b"123456789"), 0xE306_9283);
        assert_eq!(CrcImpl::Instruction.append(0, b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn table_matches_the_instruction_on_every_length_and_split() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..1500)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for len in 0..data.len() {
            let d = &data[..len];
            assert_eq!(table_append(0, d), crc32c::crc32c(d), "length {len}");
        }
        for split in 0..200 {
            let (a, b) = data[..200].split_at(split);
            assert_eq!(
                table_append(table_append(0, a), b),
                crc32c::crc32c(&data[..200]),
                "split at {split}"
            );
        }
    }

    #[test]
    fn the_choice_is_one_of_the_two_and_stays() {
        let first = implementation();
        assert!(matches!(first, CrcImpl::Instruction | CrcImpl::Table));
        assert_eq!(implementation(), first);
    }
}
