//! Guest images: a static x86-64 ELF executable built against the guest ABI (`GUEST-ABI.md`),
//! checked completely before a byte of it is written into guest memory.
//!
//! - [`read_file`]: an image from a file, refused before reading when the file is larger than
//!   [`MAX_IMAGE_FILE`] (an image is outside data);
//! - [`parse`]: the ELF header and every `PT_LOAD` segment checked against the ABI, with no guest
//!   memory involved (the determinism checker [`check`] reads the same parse);
//! - [`load`]: [`parse`], then the segments copied to their addresses in guest memory. No KVM
//!   object is needed, so the fuzz target (`fuzz/fuzz_targets/load_image.rs`) and the corpus
//!   test ([`fuzz`]) call it with a plain [`GuestMemoryMmap`].
//!
//! Every refusal is a [`VmError::Image`] naming what is wrong and where ([`ImageFault`]); a
//! refused image has written nothing.
//!
//! # Why not rust-vmm's `linux-loader`
//!
//! Measured with linux-loader 0.14.0 (the release for our vm-memory 0.18, so the versions fit),
//! `Elf::load(mem, Some(GuestAddress(0)), image, Some(GuestAddress(GUEST_LOAD_ADDR)))` into a
//! 4 MiB [`GuestMemoryMmap`]:
//!
//! - it copies each segment as soon as it has read its program header, bounded only by guest
//!   memory itself: segments at 0x1000 (our page tables), 0x8000 (the mailbox) and 0x380000
//!   (the stack) were accepted and written; its one range parameter bounds the entry point;
//! - it accepted an `ELFCLASS32` header, `e_machine` aarch64, `ET_DYN`, `p_filesz > p_memsz`
//!   (64 bytes written for an 8-byte segment), an entry point outside every segment and a bss
//!   ending 60 MiB past the end of RAM;
//! - a segment crossing the end of RAM was refused after the earlier segments and the first
//!   part of that one had been written;
//! - its errors name no segment or address ("Unable to read kernel image").
//!
//! So the ABI's constraints cannot be expressed through it, and every program header has to be
//! parsed and checked here before it runs anyway, at which point what is left for it is one
//! `write_slice` per segment, done by a second ELF parser with rules of its own (it refuses
//! `e_phentsize` ≠ 56, which ELF allows). The loader is therefore our own, in two steps: check
//! everything ([`parse`]), then write.

pub mod check;
pub mod fuzz;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{
    GDT_ADDR, GDT_ENTRIES, GUEST_IMAGE_END, GUEST_LOAD_ADDR, MAILBOX_ADDR, MAILBOX_PAGE_LEN,
    NET_BUF_LEN, PD_ADDR, PML4_ADDR, RX_BUF_ADDR, STACK_BOTTOM, STACK_TOP, TSS_ADDR, TX_BUF_ADDR,
};
use crate::vm::VmError;

/// Largest image file accepted (8 MiB): the loadable area is 2 MiB, and this leaves room for
/// symbols and debug sections. A larger file is refused before it is read.
pub const MAX_IMAGE_FILE: u64 = 8 << 20;

/// Size of the ELF64 header.
const EHDR_LEN: usize = 64;
/// Size of an ELF64 program header (`e_phentsize` may be larger, never smaller).
const PHDR_LEN: usize = 56;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

/// The VMM's own structures below the image area, which no segment may overwrite.
const RESERVED: [(&str, u64, u64); 7] = [
    ("the GDT", GDT_ADDR, GDT_ADDR + GDT_ENTRIES as u64 * 8),
    ("the TSS", TSS_ADDR, TSS_ADDR + 0x68),
    ("the page tables", PML4_ADDR, PD_ADDR + 0x1000),
    (
        "the mailbox",
        MAILBOX_ADDR,
        MAILBOX_ADDR + MAILBOX_PAGE_LEN as u64,
    ),
    (
        "the network receive buffer",
        RX_BUF_ADDR,
        RX_BUF_ADDR + NET_BUF_LEN as u64,
    ),
    (
        "the network transmit buffer",
        TX_BUF_ADDR,
        TX_BUF_ADDR + NET_BUF_LEN as u64,
    ),
    ("the stack", STACK_BOTTOM, STACK_TOP),
];

/// What is wrong with a guest image, and where: the payload of [`VmError::Image`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageFault {
    /// The image file could not be read.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        error: String,
    },
    /// The image file is larger than [`MAX_IMAGE_FILE`]; nothing was read.
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (at least; a file still growing may be larger).
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The bytes do not start with the ELF magic.
    NotElf,
    /// The file ends inside `what`, which needs bytes up to `end`.
    Truncated {
        /// The structure ("the ELF header", "program header 3").
        what: String,
        /// Where it ends in the file.
        end: u64,
        /// The file's length.
        len: u64,
    },
    /// A header field holds a value this ABI does not take.
    Unsupported {
        /// The field (`EI_CLASS`, `e_type`, ...).
        field: &'static str,
        /// Its value.
        value: u64,
        /// What the ABI needs.
        expected: &'static str,
    },
    /// No `PT_LOAD` segment: nothing to run.
    NoLoadSegment,
    /// Segment `index`'s address plus size does not fit in 64 bits.
    AddressOverflow {
        /// Program header index.
        index: usize,
    },
    /// Segment `index` is linked at another virtual address than it is loaded at; memory is
    /// identity-mapped, so its code would run at the wrong place.
    NotIdentityMapped {
        /// Program header index.
        index: usize,
        /// `p_vaddr`.
        vaddr: u64,
        /// `p_paddr`.
        paddr: u64,
    },
    /// Segment `index` has more bytes in the file than in memory.
    FileSizeExceedsMemSize {
        /// Program header index.
        index: usize,
        /// `p_filesz`.
        filesz: u64,
        /// `p_memsz`.
        memsz: u64,
    },
    /// Segment `index`'s data lies (partly) past the end of the file.
    DataOutsideFile {
        /// Program header index.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        filesz: u64,
        /// The file's length.
        len: u64,
    },
    /// The segments' contents in the file are larger than the whole image area.
    TooLarge {
        /// Bytes of segment data in the file.
        bytes: u64,
        /// Bytes in the image area.
        area: u64,
    },
    /// Segment `index` (its part from the file) lies outside the image area.
    SegmentOutside {
        /// Program header index.
        index: usize,
        /// First address.
        start: u64,
        /// End (exclusive) of its data from the file.
        end: u64,
        /// A structure of the VMM it would overwrite, if any.
        overlaps: Option<&'static str>,
    },
    /// Segment `index`'s data fits in the image area, its bss (`p_memsz` past `p_filesz`)
    /// does not.
    BssPastEnd {
        /// Program header index.
        index: usize,
        /// First address.
        start: u64,
        /// End (exclusive) of its data from the file.
        file_end: u64,
        /// End (exclusive) of the segment in memory.
        end: u64,
    },
    /// Segment `index` ends past guest memory.
    BeyondMemory {
        /// Program header index.
        index: usize,
        /// End (exclusive) of the segment.
        end: u64,
        /// Guest memory size.
        mem_size: u64,
    },
    /// Two segments share addresses.
    SegmentsOverlap {
        /// Program header index of one.
        first: usize,
        /// Program header index of the other.
        second: usize,
        /// Start of the shared range.
        start: u64,
        /// End (exclusive) of the shared range.
        end: u64,
    },
    /// The entry point is not in the file-backed part of an executable segment.
    EntryNotExecutable {
        /// `e_entry`.
        entry: u64,
    },
}

impl fmt::Display for ImageFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lo, hi) = (GUEST_LOAD_ADDR, GUEST_IMAGE_END);
        match self {
            ImageFault::Unreadable { path, error } => {
                write!(f, "cannot read {}: {error}", path.display())
            }
            ImageFault::FileTooLarge { path, len, max } => write!(
                f,
                "{} has {len} bytes, more than the {max} an image file may have",
                path.display()
            ),
            ImageFault::NotElf => write!(f, "not an ELF file (no \\x7fELF magic at offset 0)"),
            ImageFault::Truncated { what, end, len } => write!(
                f,
                "truncated: {what} ends at byte {end}, the file has {len} bytes"
            ),
            ImageFault::Unsupported {
                field,
                value,
                expected,
            } => write!(f, "{field} is {value:#x}, the ABI needs {expected}"),
            ImageFault::NoLoadSegment => write!(f, "no PT_LOAD segment"),
            ImageFault::AddressOverflow { index } => {
                write!(f, "segment {index}: address plus size overflows")
            }
            ImageFault::NotIdentityMapped {
                index,
                vaddr,
                paddr,
            } => write!(
                f,
                "segment {index} is linked at {vaddr:#x} but loaded at {paddr:#x} (guest memory \
                 is identity-mapped: they must be equal)"
            ),
            ImageFault::FileSizeExceedsMemSize {
                index,
                filesz,
                memsz,
            } => write!(
                f,
                "segment {index} has {filesz:#x} bytes in the file but only {memsz:#x} in memory"
            ),
            ImageFault::DataOutsideFile {
                index,
                offset,
                filesz,
                len,
            } => write!(
                f,
                "segment {index}'s data at file offset {offset:#x}+{filesz:#x} lies past the end \
                 of the file ({len:#x} bytes)"
            ),
            ImageFault::TooLarge { bytes, area } => write!(
                f,
                "the segments hold {bytes:#x} bytes, more than the whole image area \
                 ({lo:#x}..{hi:#x}, {area:#x} bytes)"
            ),
            ImageFault::SegmentOutside {
                index,
                start,
                end,
                overlaps,
            } => {
                write!(
                    f,
                    "segment {index} at {start:#x}..{end:#x} lies outside the image area \
                     {lo:#x}..{hi:#x}"
                )?;
                match overlaps {
                    Some(what) => write!(f, " (it would overwrite {what})"),
                    None => Ok(()),
                }
            }
            ImageFault::BssPastEnd {
                index,
                start,
                file_end,
                end,
            } => write!(
                f,
                "segment {index} at {start:#x}..{file_end:#x} has a bss up to {end:#x}, past the \
                 end of the image area {lo:#x}..{hi:#x}"
            ),
            ImageFault::BeyondMemory {
                index,
                end,
                mem_size,
            } => write!(
                f,
                "segment {index} ends at {end:#x}, past guest memory ({mem_size:#x} bytes)"
            ),
            ImageFault::SegmentsOverlap {
                first,
                second,
                start,
                end,
            } => write!(
                f,
                "segments {first} and {second} overlap at {start:#x}..{end:#x}"
            ),
            ImageFault::EntryNotExecutable { entry } => write!(
                f,
                "entry point {entry:#x} is not in the data of an executable segment"
            ),
        }
    }
}

impl From<ImageFault> for VmError {
    fn from(f: ImageFault) -> Self {
        VmError::Image(f)
    }
}

/// One `PT_LOAD` segment of a checked image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Its program header's index.
    pub index: usize,
    /// Guest physical (= virtual) address.
    pub addr: u64,
    /// Bytes in memory (`p_memsz`): `data`, then zeros.
    pub mem_len: u64,
    /// Executable (`PF_X`).
    pub executable: bool,
    /// Its bytes from the file (`p_filesz`).
    pub data: &'a [u8],
}

impl Segment<'_> {
    /// End (exclusive) of the file-backed part.
    pub fn data_end(&self) -> u64 {
        self.addr + self.data.len() as u64
    }

    /// End (exclusive) in memory.
    pub fn end(&self) -> u64 {
        self.addr + self.mem_len
    }
}

/// A guest image whose headers and segments passed every check of the ABI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Elf<'a> {
    /// `e_entry`: inside the data of an executable segment.
    pub entry: u64,
    /// The `PT_LOAD` segments, in program header order: inside the image area, none
    /// overlapping another.
    pub segments: Vec<Segment<'a>>,
}

/// Where the guest starts: the image's entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Guest address of the first instruction.
    pub addr: u64,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn unsupported(field: &'static str, value: u64, expected: &'static str) -> VmError {
    ImageFault::Unsupported {
        field,
        value,
        expected,
    }
    .into()
}

/// Checks the ELF header and every `PT_LOAD` segment of `image` against the ABI: a static
/// little-endian x86-64 `ET_EXEC`; each segment identity-mapped, its data inside the file,
/// inside the image area `GUEST_LOAD_ADDR..GUEST_IMAGE_END` together with its bss, and
/// overlapping no other; the entry point inside an executable segment's data. Reads nothing
/// outside `image` and writes nothing.
pub fn parse(image: &[u8]) -> Result<Elf<'_>, VmError> {
    let len = image.len() as u64;
    if image.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ImageFault::NotElf.into());
    }
    let Some(ehdr) = image.get(..EHDR_LEN) else {
        return Err(ImageFault::Truncated {
            what: "the ELF header".into(),
            end: EHDR_LEN as u64,
            len,
        }
        .into());
    };
    if ehdr[4] != 2 {
        return Err(unsupported("EI_CLASS", ehdr[4].into(), "2 (ELFCLASS64)"));
    }
    if ehdr[5] != 1 {
        return Err(unsupported("EI_DATA", ehdr[5].into(), "1 (little-endian)"));
    }
    if ehdr[6] != 1 {
        return Err(unsupported("EI_VERSION", ehdr[6].into(), "1"));
    }
    let e_type = u16_at(ehdr, 16);
    if e_type != ET_EXEC {
        return Err(unsupported(
            "e_type",
            e_type.into(),
            "2 (ET_EXEC: a static, non-PIE executable)",
        ));
    }
    let machine = u16_at(ehdr, 18);
    if machine != EM_X86_64 {
        return Err(unsupported("e_machine", machine.into(), "62 (x86-64)"));
    }
    let entry = u64_at(ehdr, 24);
    let phoff = u64_at(ehdr, 32);
    let phentsize = u16_at(ehdr, 54);
    let phnum = u16_at(ehdr, 56);
    if usize::from(phentsize) < PHDR_LEN {
        return Err(unsupported(
            "e_phentsize",
            phentsize.into(),
            "at least 56 (an ELF64 program header)",
        ));
    }

    let mut segments = Vec::new();
    for index in 0..usize::from(phnum) {
        // phoff + index × phentsize + 56, in u64: no overflow for a u16 count of u16 sizes
        // unless phoff itself is near 2^64.
        let start = phoff.checked_add(index as u64 * u64::from(phentsize));
        let end = start.and_then(|s| s.checked_add(PHDR_LEN as u64));
        let ph = match (start, end) {
            (Some(s), Some(e)) if e <= len => &image[s as usize..e as usize],
            _ => {
                return Err(ImageFault::Truncated {
                    what: format!("program header {index}"),
                    end: end.unwrap_or(u64::MAX),
                    len,
                }
                .into())
            }
        };
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let flags = u32_at(ph, 4);
        let (offset, vaddr, paddr) = (u64_at(ph, 8), u64_at(ph, 16), u64_at(ph, 24));
        let (filesz, memsz) = (u64_at(ph, 32), u64_at(ph, 40));
        if paddr.checked_add(memsz).is_none() {
            return Err(ImageFault::AddressOverflow { index }.into());
        }
        if vaddr != paddr {
            return Err(ImageFault::NotIdentityMapped {
                index,
                vaddr,
                paddr,
            }
            .into());
        }
        if filesz > memsz {
            return Err(ImageFault::FileSizeExceedsMemSize {
                index,
                filesz,
                memsz,
            }
            .into());
        }
        let data = match offset.checked_add(filesz) {
            Some(end) if end <= len => &image[offset as usize..end as usize],
            _ => {
                return Err(ImageFault::DataOutsideFile {
                    index,
                    offset,
                    filesz,
                    len,
                }
                .into())
            }
        };
        segments.push(Segment {
            index,
            addr: paddr,
            mem_len: memsz,
            executable: flags & PF_X != 0,
            data,
        });
    }
    if segments.is_empty() {
        return Err(ImageFault::NoLoadSegment.into());
    }

    let area = GUEST_IMAGE_END - GUEST_LOAD_ADDR;
    // Each data slice lies inside `image`, so the sum fits.
    let bytes: u64 = segments.iter().map(|s| s.data.len() as u64).sum();
    if bytes > area {
        return Err(ImageFault::TooLarge { bytes, area }.into());
    }
    for s in &segments {
        if s.addr < GUEST_LOAD_ADDR || s.data_end() > GUEST_IMAGE_END {
            let (start, end) = (s.addr, s.data_end().max(s.addr + 1));
            let overlaps = RESERVED
                .iter()
                .find(|(_, lo, hi)| start < *hi && *lo < end)
                .map(|(what, _, _)| *what);
            return Err(ImageFault::SegmentOutside {
                index: s.index,
                start: s.addr,
                end: s.data_end(),
                overlaps,
            }
            .into());
        }
        if s.end() > GUEST_IMAGE_END {
            return Err(ImageFault::BssPastEnd {
                index: s.index,
                start: s.addr,
                file_end: s.data_end(),
                end: s.end(),
            }
            .into());
        }
    }
    let mut by_addr: Vec<&Segment<'_>> = segments.iter().filter(|s| s.mem_len > 0).collect();
    by_addr.sort_by_key(|s| (s.addr, s.index));
    for pair in by_addr.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if b.addr < a.end() {
            return Err(ImageFault::SegmentsOverlap {
                first: a.index.min(b.index),
                second: a.index.max(b.index),
                start: b.addr,
                end: a.end().min(b.end()),
            }
            .into());
        }
    }
    if !segments
        .iter()
        .any(|s| s.executable && (s.addr..s.data_end()).contains(&entry))
    {
        return Err(ImageFault::EntryNotExecutable { entry }.into());
    }
    Ok(Elf { entry, segments })
}

/// Checks `image` ([`parse`]) and copies its segments into `mem` at their addresses; returns
/// its entry point. `mem` must be zero where the image goes: bss is not written. Every
/// segment must also lie inside the first `mem_size` bytes of `mem`. A refused image has
/// written nothing.
pub fn load(mem: &GuestMemoryMmap, mem_size: usize, image: &[u8]) -> Result<Entry, VmError> {
    let elf = parse(image)?;
    for s in &elf.segments {
        if s.end() > mem_size as u64 || !mem.check_range(GuestAddress(s.addr), s.mem_len as usize) {
            return Err(ImageFault::BeyondMemory {
                index: s.index,
                end: s.end(),
                mem_size: mem_size as u64,
            }
            .into());
        }
    }
    for s in &elf.segments {
        mem.write_slice(s.data, GuestAddress(s.addr))
            .map_err(|_| VmError::OutOfRange {
                gpa: s.addr,
                len: s.data.len(),
            })?;
    }
    Ok(Entry { addr: elf.entry })
}

/// Reads an image file: refused before reading if it is larger than [`MAX_IMAGE_FILE`], and
/// never more than that read (a file that grows meanwhile, or a device, is refused too).
pub fn read_file(path: &Path) -> Result<Vec<u8>, VmError> {
    let unreadable = |e: std::io::Error| ImageFault::Unreadable {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    let too_large = |len| ImageFault::FileTooLarge {
        path: path.to_path_buf(),
        len,
        max: MAX_IMAGE_FILE,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(ImageFault::Unreadable {
            path: path.to_path_buf(),
            error: "not a regular file".into(),
        }
        .into());
    }
    if meta.len() > MAX_IMAGE_FILE {
        return Err(too_large(meta.len()).into());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_IMAGE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.len() as u64 > MAX_IMAGE_FILE {
        return Err(too_large(bytes.len() as u64).into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::fuzz::ElfBuilder;
    use super::*;
    use crate::layout::MIN_MEM_SIZE;
    use crate::vm::{GUEST_IMAGE, GUEST_NONDET_IMAGE};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIN_MEM_SIZE)]).expect("memory")
    }

    fn fault(image: &[u8]) -> ImageFault {
        match load(&mem(), MIN_MEM_SIZE, image) {
            Err(VmError::Image(f)) => f,
            other => panic!("expected an image fault, got {other:?}"),
        }
    }

    /// One executable segment of `len` bytes at `addr`, entry at its start.
    fn one(addr: u64, len: usize) -> Vec<u8> {
        ElfBuilder::new(addr).code(addr, vec![0x90; len]).build()
    }

    #[test]
    fn the_built_in_guests_load() -> Result<(), VmError> {
        for image in [GUEST_IMAGE, GUEST_NONDET_IMAGE] {
            let m = mem();
            let entry = load(&m, MIN_MEM_SIZE, image)?;
            assert!((GUEST_LOAD_ADDR..GUEST_IMAGE_END).contains(&entry.addr));
            let elf = parse(image)?;
            for s in &elf.segments {
                let mut back = vec![0u8; s.data.len()];
                m.read_slice(&mut back, GuestAddress(s.addr))
                    .expect("read back");
                assert_eq!(back, s.data, "segment {} copied", s.index);
            }
        }
        Ok(())
    }

    #[test]
    fn a_bss_segment_is_left_to_zero_memory() -> Result<(), VmError> {
        let image = ElfBuilder::new(0x100000)
            .code(0x100000, vec![0xf4])
            .bss(0x101000, 0x4000)
            .build();
        let elf = parse(&image)?;
        assert_eq!(elf.segments.len(), 2);
        assert_eq!(elf.segments[1].mem_len, 0x4000);
        assert!(elf.segments[1].data.is_empty());
        assert_eq!(load(&mem(), MIN_MEM_SIZE, &image)?.addr, 0x100000);
        Ok(())
    }

    #[test]
    fn malformed_headers_are_named() {
        assert_eq!(fault(b""), ImageFault::NotElf);
        assert_eq!(fault(b"MZ\x90\x00"), ImageFault::NotElf);
        assert!(matches!(
            fault(b"\x7fELF\x02\x01\x01"),
            ImageFault::Truncated {
                end: 64,
                len: 7,
                ..
            }
        ));
        let good = one(0x100000, 16);
        for (at, value, field) in [
            (4, 1u8, "EI_CLASS"),
            (5, 2, "EI_DATA"),
            (6, 0, "EI_VERSION"),
            (16, 3, "e_type"),
            (18, 0xb7, "e_machine"),
            (54, 32, "e_phentsize"),
        ] {
            let mut bad = good.clone();
            bad[at] = value;
            match fault(&bad) {
                ImageFault::Unsupported { field: f, .. } => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // Program headers past the end of the file.
        let mut bad = good.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            matches!(fault(&bad), ImageFault::Truncated { what, .. } if what == "program header 0")
        );
        let mut bad = good.clone();
        bad[56..58].copy_from_slice(&3u16.to_le_bytes());
        assert!(
            matches!(fault(&bad), ImageFault::Truncated { what, .. } if what == "program header 1")
        );
        // No PT_LOAD at all.
        let mut bad = good.clone();
        bad[64..68].copy_from_slice(&6u32.to_le_bytes());
        assert_eq!(fault(&bad), ImageFault::NoLoadSegment);
    }

    #[test]
    fn segments_outside_the_area_name_what_they_would_overwrite() {
        for (addr, what) in [
            (0x500, Some("the GDT")),
            (0x1000, Some("the page tables")),
            (0x3ff0, Some("the page tables")),
            (0x8000, Some("the mailbox")),
            (0x10800, Some("the network receive buffer")),
            (0x11000, Some("the network transmit buffer")),
            (0x20000, None),
            (0x2fffc1, Some("the stack")),
            (0x300000, Some("the stack")),
            (0x500000, None),
        ] {
            let image = ElfBuilder::new(0x100000)
                .code(0x100000, vec![0x90; 16])
                .data(addr, vec![1; 64])
                .build();
            match fault(&image) {
                ImageFault::SegmentOutside {
                    index: 1,
                    start,
                    end,
                    overlaps,
                } => {
                    assert_eq!((start, end), (addr, addr + 64));
                    assert_eq!(overlaps, what, "{addr:#x}");
                }
                other => panic!("{addr:#x}: {other:?}"),
            }
        }
        let msg = VmError::from(ImageFault::SegmentOutside {
            index: 1,
            start: 0x8000,
            end: 0x8040,
            overlaps: Some("the mailbox"),
        })
        .to_string();
        assert!(
            msg.contains("segment 1 at 0x8000..0x8040")
                && msg.contains("0x100000..0x300000")
                && msg.contains("the mailbox"),
            "{msg}"
        );
    }

    #[test]
    fn a_bss_past_the_end_an_image_too_large_and_overlaps_are_refused() {
        // Data that fits, bss that does not.
        let image = ElfBuilder::new(0x100000)
            .code(0x100000, vec![0x90; 16])
            .bss(0x2ff000, 0x2000)
            .build();
        assert_eq!(
            fault(&image),
            ImageFault::BssPastEnd {
                index: 1,
                start: 0x2ff000,
                file_end: 0x2ff000,
                end: 0x301000
            }
        );
        // Exactly the area is fine; one byte more of data is too large.
        let area = (GUEST_IMAGE_END - GUEST_LOAD_ADDR) as usize;
        assert!(load(&mem(), MIN_MEM_SIZE, &one(0x100000, area)).is_ok());
        assert_eq!(
            fault(&one(0x100000, area + 1)),
            ImageFault::TooLarge {
                bytes: area as u64 + 1,
                area: area as u64
            }
        );
        // Two segments sharing a page.
        let image = ElfBuilder::new(0x100000)
            .code(0x100000, vec![0x90; 0x20])
            .data(0x100010, vec![1; 0x20])
            .build();
        assert_eq!(
            fault(&image),
            ImageFault::SegmentsOverlap {
                first: 0,
                second: 1,
                start: 0x100010,
                end: 0x100020
            }
        );
    }

    #[test]
    fn segment_fields_are_checked() {
        let good = one(0x100000, 16);
        let ph = 64;
        let set = |at: usize, v: u64| {
            let mut b = good.clone();
            b[ph + at..ph + at + 8].copy_from_slice(&v.to_le_bytes());
            b
        };
        assert_eq!(
            fault(&set(16, 0x200000)),
            ImageFault::NotIdentityMapped {
                index: 0,
                vaddr: 0x200000,
                paddr: 0x100000
            }
        );
        assert_eq!(
            fault(&set(40, 8)),
            ImageFault::FileSizeExceedsMemSize {
                index: 0,
                filesz: 16,
                memsz: 8
            }
        );
        assert!(matches!(
            fault(&set(8, u64::MAX - 4)),
            ImageFault::DataOutsideFile { index: 0, .. }
        ));
        let mut overflow = set(16, u64::MAX - 4);
        overflow[ph + 24..ph + 32].copy_from_slice(&(u64::MAX - 4).to_le_bytes());
        assert_eq!(fault(&overflow), ImageFault::AddressOverflow { index: 0 });
        // Entry outside the code, or in a segment that is not executable.
        let mut b = good.clone();
        b[24..32].copy_from_slice(&0x100010u64.to_le_bytes());
        assert_eq!(
            fault(&b),
            ImageFault::EntryNotExecutable { entry: 0x100010 }
        );
        let image = ElfBuilder::new(0x101000)
            .code(0x100000, vec![0x90; 16])
            .data(0x101000, vec![0x90; 16])
            .build();
        assert_eq!(
            fault(&image),
            ImageFault::EntryNotExecutable { entry: 0x101000 }
        );
    }

    #[test]
    fn a_segment_past_guest_memory_is_refused_before_anything_is_written() {
        // A memory smaller than the image area (only a test can make one).
        let small =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x200000)]).expect("memory");
        let image = ElfBuilder::new(0x100000)
            .code(0x100000, vec![0x90; 16])
            .data(0x1ff000, vec![7; 0x2000])
            .build();
        assert_eq!(
            load(&small, 0x200000, &image).map_err(|e| e.to_string()),
            Err(VmError::from(ImageFault::BeyondMemory {
                index: 1,
                end: 0x201000,
                mem_size: 0x200000
            })
            .to_string())
        );
        let mut first = [0u8; 16];
        small
            .read_slice(&mut first, GuestAddress(0x100000))
            .expect("read");
        assert_eq!(first, [0; 16], "nothing written");
    }

    #[test]
    fn image_files_are_bounded_and_read_errors_typed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("guest.elf");
        std::fs::write(&path, GUEST_IMAGE).expect("write");
        assert_eq!(read_file(&path).expect("read"), GUEST_IMAGE);
        let big = dir.path().join("big.elf");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(MAX_IMAGE_FILE + 1).expect("sparse file");
        match read_file(&big) {
            Err(VmError::Image(ImageFault::FileTooLarge { len, max, .. })) => {
                assert_eq!((len, max), (MAX_IMAGE_FILE + 1, MAX_IMAGE_FILE))
            }
            other => panic!("{other:?}"),
        }
        match read_file(&dir.path().join("missing.elf")) {
            Err(e @ VmError::Image(ImageFault::Unreadable { .. })) => {
                assert!(e.to_string().contains("missing.elf"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_file(dir.path()),
            Err(VmError::Image(ImageFault::Unreadable { .. }))
        ));
        assert!(matches!(
            read_file(Path::new("/dev/zero")),
            Err(VmError::Image(ImageFault::Unreadable { .. }))
        ));
    }
}
