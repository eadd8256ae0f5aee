//! What must hold for any bytes given as a guest image — the one check the fuzz target
//! (`fuzz/fuzz_targets/load_image.rs`, nightly) and the corpus test below (stable: seeds and
//! a few thousand mutated images) both run — and [`ElfBuilder`], which makes small images for
//! seeds and tests. No KVM is involved: images load into a plain [`GuestMemoryMmap`].

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{check, load, parse, ImageFault};
use crate::layout::{GUEST_IMAGE_END, GUEST_LOAD_ADDR, MIN_MEM_SIZE};
use crate::vm::VmError;

/// What an image did in [`Harness::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Loaded; the checker found this many instructions to refuse.
    Loaded {
        /// The entry point.
        entry: u64,
        /// Determinism findings.
        findings: usize,
    },
    /// Refused.
    Refused(ImageFault),
}

/// Guest memory to load images into, reused from image to image (zeroed again after each).
#[derive(Debug)]
pub struct Harness {
    mem: GuestMemoryMmap,
    scan: Vec<u8>,
    expect: Vec<u8>,
}

/// Memory is compared with what it should hold in blocks of this many bytes.
const BLOCK: usize = 64 << 10;

impl Harness {
    /// A harness with the smallest guest memory a VM may have ([`MIN_MEM_SIZE`]).
    pub fn new() -> Result<Self, VmError> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIN_MEM_SIZE)])
            .map_err(|e| VmError::MemAlloc(e.to_string()))?;
        Ok(Harness {
            mem,
            scan: vec![0; BLOCK],
            expect: vec![0; BLOCK],
        })
    }

    /// Loads `image` and checks, returning a description of the first that fails:
    ///
    /// - [`parse`], [`load`] and [`check::check_image`] agree: all accept, or all refuse with
    ///   the same [`VmError::Image`] fault (never another error), whose message is not empty;
    /// - a refused image has written nothing: all of guest memory is still zero;
    /// - an accepted image's segments lie in the image area, none overlapping another, its
    ///   entry point in an executable segment's data, and guest memory holds exactly the
    ///   segments' data at their addresses and zero everywhere else;
    /// - every finding of the checker lies inside an executable segment's data, in order.
    ///
    /// Not panicking on any input is the property the callers check by calling it. Memory is
    /// zero again afterwards (unless a property failed).
    pub fn check(&mut self, image: &[u8]) -> Result<Outcome, String> {
        let parsed = parse(image);
        let loaded = load(&self.mem, MIN_MEM_SIZE, image);
        let report = check::check_image(image);
        let outcome = match (parsed, loaded, report) {
            (Err(VmError::Image(p)), Err(VmError::Image(l)), Err(VmError::Image(c))) => {
                if p != l || p != c {
                    return Err(format!(
                        "parse, load and check refuse differently: {p:?} / {l:?} / {c:?}"
                    ));
                }
                if p.to_string().is_empty() {
                    return Err(format!("{p:?} has an empty message"));
                }
                self.compare(&[])?;
                return Ok(Outcome::Refused(p));
            }
            (Ok(elf), Ok(entry), Ok(report)) => {
                if entry.addr != elf.entry {
                    return Err(format!("load's entry {entry:?}, parse's {:#x}", elf.entry));
                }
                Self::check_layout(&elf)?;
                let code: Vec<_> = elf.segments.iter().filter(|s| s.executable).collect();
                let mut last = 0;
                for f in &report.findings {
                    if f.addr < last
                        || !code
                            .iter()
                            .any(|s| (s.addr..s.data_end()).contains(&f.addr))
                    {
                        return Err(format!("finding {f:?} outside the code or out of order"));
                    }
                    last = f.addr;
                }
                let regions: Vec<(u64, &[u8])> =
                    elf.segments.iter().map(|s| (s.addr, s.data)).collect();
                self.compare(&regions)?;
                for (addr, data) in regions {
                    self.zero(addr, data.len())?;
                }
                Outcome::Loaded {
                    entry: elf.entry,
                    findings: report.findings.len(),
                }
            }
            (p, l, c) => {
                return Err(format!(
                    "parse, load and check disagree: {:?} / {:?} / {:?}",
                    p.map(|e| e.entry),
                    l,
                    c.map(|r| r.findings.len())
                ))
            }
        };
        Ok(outcome)
    }

    fn check_layout(elf: &super::Elf<'_>) -> Result<(), String> {
        for s in &elf.segments {
            if s.addr < GUEST_LOAD_ADDR
                || s.end() > GUEST_IMAGE_END
                || s.data.len() as u64 > s.mem_len
            {
                return Err(format!("accepted a segment outside the area: {s:?}"));
            }
            for t in &elf.segments {
                if s.index < t.index
                    && s.mem_len > 0
                    && t.mem_len > 0
                    && s.addr < t.end()
                    && t.addr < s.end()
                {
                    return Err(format!("accepted overlapping segments {s:?} and {t:?}"));
                }
            }
        }
        if !elf
            .segments
            .iter()
            .any(|s| s.executable && (s.addr..s.data_end()).contains(&elf.entry))
        {
            return Err(format!("accepted entry {:#x} outside the code", elf.entry));
        }
        Ok(())
    }

    /// Guest memory equals `regions` (address, bytes) and zero elsewhere.
    fn compare(&mut self, regions: &[(u64, &[u8])]) -> Result<(), String> {
        for block in (0..MIN_MEM_SIZE as u64).step_by(BLOCK) {
            let end = block + BLOCK as u64;
            self.expect.fill(0);
            for &(addr, data) in regions {
                let (lo, hi) = (addr.max(block), (addr + data.len() as u64).min(end));
                if lo < hi {
                    self.expect[(lo - block) as usize..(hi - block) as usize]
                        .copy_from_slice(&data[(lo - addr) as usize..(hi - addr) as usize]);
                }
            }
            self.mem
                .read_slice(&mut self.scan, GuestAddress(block))
                .map_err(|e| format!("reading guest memory at {block:#x}: {e}"))?;
            if self.scan != self.expect {
                let at = self
                    .scan
                    .iter()
                    .zip(&self.expect)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "guest memory at {:#x} is {:#04x}, expected {:#04x}",
                    block + at as u64,
                    self.scan[at],
                    self.expect[at]
                ));
            }
        }
        Ok(())
    }

    fn zero(&mut self, mut addr: u64, mut len: usize) -> Result<(), String> {
        let zeros = [0u8; 4096];
        while len > 0 {
            let n = len.min(zeros.len());
            self.mem
                .write_slice(&zeros[..n], GuestAddress(addr))
                .map_err(|e| format!("zeroing guest memory at {addr:#x}: {e}"))?;
            addr += n as u64;
            len -= n;
        }
        Ok(())
    }
}

/// Builds a small static x86-64 ELF executable: the ELF header, one program header per
/// segment (in the order added), then the segments' data.
#[derive(Debug, Clone)]
pub struct ElfBuilder {
    entry: u64,
    segments: Vec<(u32, u64, Vec<u8>, u64)>,
}

/// `PF_R | PF_X`.
const CODE: u32 = 5;
/// `PF_R | PF_W`.
const DATA: u32 = 6;

impl ElfBuilder {
    /// An image starting at `entry`, with no segments yet.
    pub fn new(entry: u64) -> Self {
        ElfBuilder {
            entry,
            segments: Vec::new(),
        }
    }

    /// Adds an executable segment holding `code` at `addr`.
    pub fn code(mut self, addr: u64, code: Vec<u8>) -> Self {
        let len = code.len() as u64;
        self.segments.push((CODE, addr, code, len));
        self
    }

    /// Adds a writable data segment holding `data` at `addr`.
    pub fn data(mut self, addr: u64, data: Vec<u8>) -> Self {
        let len = data.len() as u64;
        self.segments.push((DATA, addr, data, len));
        self
    }

    /// Adds a writable segment of `len` zero bytes (bss) at `addr`.
    pub fn bss(mut self, addr: u64, len: u64) -> Self {
        self.segments.push((DATA, addr, Vec::new(), len));
        self
    }

    /// The image's bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut out = vec![0u8; 64];
        out[..8].copy_from_slice(b"\x7fELF\x02\x01\x01\x00");
        out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[24..32].copy_from_slice(&self.entry.to_le_bytes());
        out[32..40].copy_from_slice(&64u64.to_le_bytes());
        out[52..54].copy_from_slice(&64u16.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&(self.segments.len() as u16).to_le_bytes());
        let mut offset = 64 + 56 * self.segments.len() as u64;
        for (flags, addr, data, memsz) in &self.segments {
            let mut ph = [0u8; 56];
            ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
            ph[4..8].copy_from_slice(&flags.to_le_bytes());
            ph[8..16].copy_from_slice(&offset.to_le_bytes());
            ph[16..24].copy_from_slice(&addr.to_le_bytes());
            ph[24..32].copy_from_slice(&addr.to_le_bytes());
            ph[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
            out.extend_from_slice(&ph);
            offset += data.len() as u64;
        }
        for (_, _, data, _) in &self.segments {
            out.extend_from_slice(data);
        }
        out
    }
}

/// Small valid images: one code segment; code, data and bss; code at the very end of the area;
/// two code segments with an IDT load and `sti`; one with a `rdtsc` (loads, with a finding).
pub fn seeds() -> Vec<Vec<u8>> {
    // mov dx, 0x500; mov al, 5; out dx, al; hlt
    let halt = vec![0x66, 0xba, 0x00, 0x05, 0xb0, 0x05, 0xee, 0xf4];
    let end = GUEST_IMAGE_END - halt.len() as u64;
    vec![
        ElfBuilder::new(0x100000)
            .code(0x100000, halt.clone())
            .build(),
        ElfBuilder::new(0x100000)
            .code(0x100000, halt.clone())
            .data(0x101000, b"ftvm".to_vec())
            .bss(0x101004, 0x3000)
            .build(),
        ElfBuilder::new(end).code(end, halt.clone()).build(),
        ElfBuilder::new(0x100000)
            .code(0x100000, [&[0xfbu8][..], &halt].concat())
            .code(0x200000, vec![0x0f, 0x01, 0x18, 0xc3])
            .build(),
        ElfBuilder::new(0x100000)
            .code(0x100000, [&[0x0fu8, 0x31][..], &halt].concat())
            .build(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{GUEST_IMAGE, GUEST_NONDET_IMAGE};
    use std::collections::BTreeMap;

    /// xorshift64*: a fixed, dependency-free sequence.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// Values that sit on the loader's boundaries.
    const INTERESTING: [u64; 16] = [
        0,
        1,
        0x1000,
        0x8000,
        0xf_ffff,
        0x10_0000,
        0x10_0001,
        0x2f_ffff,
        0x30_0000,
        0x30_0001,
        0x40_0000,
        0x7fff_ffff,
        0xffff_ffff,
        1 << 63,
        u64::MAX - 1,
        u64::MAX,
    ];

    /// One mutation of `seed`: header or program-header fields set to boundary values, random
    /// bytes changed, a program header copied over another, a truncation or an extension.
    fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
        let mut b = seed.to_vec();
        let phnum = if b.len() >= 58 {
            usize::from(u16::from_le_bytes([b[56], b[57]])).clamp(1, 8)
        } else {
            1
        };
        for _ in 0..1 + rng.below(3) {
            match rng.below(7) {
                0 | 1 => {
                    // A field: the ELF header's or a program header's (offset, width).
                    let fields: [(usize, usize); 13] = [
                        (16, 2),
                        (18, 2),
                        (24, 8),
                        (32, 8),
                        (54, 2),
                        (56, 2),
                        (0, 4),
                        (4, 4),
                        (8, 8),
                        (16, 8),
                        (24, 8),
                        (32, 8),
                        (40, 8),
                    ];
                    let (mut at, width) = fields[rng.below(fields.len())];
                    if at < 16 || rng.below(2) == 0 {
                        at += 64 + 56 * rng.below(phnum);
                    }
                    let v = if rng.below(4) == 0 {
                        rng.next()
                    } else {
                        INTERESTING[rng.below(INTERESTING.len())]
                            .wrapping_add(rng.below(3) as u64)
                            .wrapping_sub(1)
                    };
                    if let Some(dst) = b.get_mut(at..at + width) {
                        dst.copy_from_slice(&v.to_le_bytes()[..width]);
                    }
                }
                2 => {
                    for _ in 0..1 + rng.below(4) {
                        let at = rng.below(b.len());
                        if let Some(x) = b.get_mut(at) {
                            *x = rng.next() as u8;
                        }
                    }
                }
                3 => {
                    let (i, j) = (rng.below(phnum), rng.below(phnum));
                    let (src, dst) = (64 + 56 * i, 64 + 56 * j);
                    if b.len() >= src.max(dst) + 56 {
                        b.copy_within(src..src + 56, dst);
                    }
                }
                4 => b.truncate(rng.below(b.len() + 1)),
                5 => {
                    // Move a segment: its virtual and physical address together.
                    let at = 64 + 56 * rng.below(phnum);
                    let v =
                        INTERESTING[rng.below(INTERESTING.len())].wrapping_add(rng.next() % 0x2000);
                    for field in [at + 16, at + 24] {
                        if let Some(dst) = b.get_mut(field..field + 8) {
                            dst.copy_from_slice(&v.to_le_bytes());
                        }
                    }
                }
                _ => {
                    let n = rng.below(64);
                    b.extend((0..n).map(|_| rng.next() as u8));
                }
            }
        }
        b
    }

    fn kind(f: &ImageFault) -> String {
        format!("{f:?}")
            .split([' ', '{', '('])
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn seeds_and_thousands_of_mutants_keep_every_property() {
        let mut h = Harness::new().expect("harness");
        let mut seeds = seeds();
        seeds.push(GUEST_IMAGE.to_vec());
        seeds.push(GUEST_NONDET_IMAGE.to_vec());
        for (i, s) in seeds.iter().enumerate() {
            match h.check(s) {
                Ok(Outcome::Loaded { .. }) => {}
                other => panic!("seed {i} must load: {other:?}"),
            }
        }
        let mut rng = Rng(0x5eed_f00d_cafe_b0ba);
        let mut loaded = 0;
        let mut with_findings = 0;
        let mut faults: BTreeMap<String, u32> = BTreeMap::new();
        for n in 0..4000 {
            let seed = &seeds[n % seeds.len()];
            let image = mutate(seed, &mut rng);
            match h.check(&image) {
                Ok(Outcome::Loaded { findings, .. }) => {
                    loaded += 1;
                    with_findings += usize::from(findings > 0);
                }
                Ok(Outcome::Refused(f)) => *faults.entry(kind(&f)).or_default() += 1,
                Err(violation) => panic!("mutant {n} of seed {}: {violation}", n % seeds.len()),
            }
        }
        println!("{loaded} mutants loaded ({with_findings} with findings); refusals: {faults:?}");
        // The mutants reach the deep checks, not only the magic.
        assert!(loaded > 100, "{loaded} loaded");
        assert!(with_findings > 10, "{with_findings} with findings");
        for kind in [
            "NotElf",
            "Truncated",
            "Unsupported",
            "NotIdentityMapped",
            "FileSizeExceedsMemSize",
            "DataOutsideFile",
            "SegmentOutside",
            "BssPastEnd",
            "SegmentsOverlap",
            "EntryNotExecutable",
        ] {
            assert!(faults.contains_key(kind), "no {kind} among {faults:?}");
        }
    }

    /// Writes [`seeds`] to `fuzz/image-seeds/` (the fuzz target's starting corpus), and the
    /// built-in guests too if `FTVM_SEED_BUILTINS` is set: run by hand,
    /// `cargo test -p vmm --lib write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes into the source tree; run by hand"]
    fn write_fuzz_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/image-seeds");
        std::fs::create_dir_all(&dir).expect("seed directory");
        let mut all: Vec<(String, Vec<u8>)> = seeds()
            .into_iter()
            .enumerate()
            .map(|(i, s)| (format!("seed-{i}.elf"), s))
            .collect();
        if std::env::var_os("FTVM_SEED_BUILTINS").is_some() {
            all.push(("kvstore.elf".into(), GUEST_IMAGE.to_vec()));
            all.push(("nondet.elf".into(), GUEST_NONDET_IMAGE.to_vec()));
        }
        for (name, bytes) in all {
            std::fs::write(dir.join(&name), bytes).expect("write seed");
        }
    }

    #[test]
    fn the_harness_notices_a_write_where_none_belongs() {
        let mut h = Harness::new().expect("harness");
        h.mem
            .write_slice(&[1], GuestAddress(0x8000))
            .expect("write");
        let err = h.check(b"not an image").expect_err("stray byte");
        assert!(err.contains("0x8000"), "{err}");
    }
}
