//! The joiner's side of a state transfer: every chunk checked, the state loaded into a fresh
//! VM of the same image and memory size, and the result proved equal to the primary's.

use std::io::Read;

use super::state::VcpuState;
use super::stream::{page_hash, Chunk, ChunkReader, Header, Kind, Next};
use super::{hex, MigrateError};
use crate::vm::{Vm, PAGE_SIZE};

/// What the joiner runs, which the primary's state must be for.
#[derive(Debug, Clone)]
pub struct Expect {
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// SHA-256 of the guest image.
    pub image_digest: [u8; 32],
    /// The pair's id.
    pub session: u64,
    /// The oldest epoch acceptable (the arbiter's latest, if known).
    pub min_epoch: u64,
}

/// What a completed restore gives.
#[derive(Debug, Clone)]
pub struct Restored {
    /// The primary's header.
    pub header: Header,
    /// The VMM's device state, as the primary sent it.
    pub device: Vec<u8>,
    /// The vCPU's exit counter at the switch-over.
    pub exits: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Pages received (zero runs included).
    pub pages: u64,
    /// Stream bytes.
    pub bytes: u64,
    /// The digests, equal on both sides.
    pub pages_digest: u64,
    /// The registers digest, equal on both sides.
    pub registers_digest: u64,
}

/// Loads the state stream from `r` into `vm` (fresh, of the joiner's image and memory size):
/// refuses a stream for another pair, image or memory size (naming both values) before it
/// touches memory, checks every chunk, and at the end refuses unless `vm`'s own digests equal
/// the primary's. On any error `vm` must be discarded.
pub fn restore<R: Read>(
    r: &mut ChunkReader<R>,
    vm: &mut Vm,
    expect: &Expect,
) -> Result<Restored, MigrateError> {
    restore_with(r, vm, expect, &mut |_, _| Ok(()))
}

/// As [`restore`], calling `round_done(round, pages)` once each pre-copy round is loaded (a
/// joiner tells the primary, which then knows the joiner has caught up before it stops its
/// guest: the pause then holds only the last pages, not the joiner's backlog).
pub fn restore_with<R: Read>(
    r: &mut ChunkReader<R>,
    vm: &mut Vm,
    expect: &Expect,
    round_done: &mut dyn FnMut(u32, u64) -> Result<(), MigrateError>,
) -> Result<Restored, MigrateError> {
    let header = match r.next_chunk()? {
        Chunk::Header(h) => h,
        Chunk::Refused(why) => return Err(MigrateError::Refused(why)),
        other => return Err(out_of_place(0, other.kind(), "the header")),
    };
    check_header(&header, expect)?;
    let pages_total = (header.mem_size as usize / PAGE_SIZE) as u64;
    let in_range = |index: u64, kind: Kind, first: u64, count: u64| match first.checked_add(count) {
        Some(end) if end <= pages_total => Ok(()),
        _ => Err(MigrateError::Malformed {
            index,
            kind: kind.name(),
            what: format!("pages {first}+{count} outside the guest's {pages_total}"),
        }),
    };
    let zero_hash = page_hash(&[0u8; PAGE_SIZE]);
    // The hash of every page as the stream wrote it, so the digest at the end needs no pass
    // over memory (the primary's guest is stopped while we check). Round 0 covers every page;
    // one the stream left alone is hashed from memory at the end.
    let mut hashes = vec![0u64; pages_total as usize];
    let mut covered = vec![false; pages_total as usize];
    let mut index = 1u64;
    let mut pages = 0u64;
    let mut rounds = 0u32;
    let state = loop {
        match r.next_placing()? {
            Next::Pages { first, count } => {
                let n = u64::from(count);
                in_range(index, Kind::Pages, first, n)?;
                // Straight from the stream into guest memory; a corrupt chunk leaves its bytes
                // there, and the error discards the VM.
                let len = count as usize * PAGE_SIZE;
                let at = first as usize..first as usize + count as usize;
                vm.with_bytes_mut(first * PAGE_SIZE as u64, len, |dst| {
                    r.read_pages(dst, &mut hashes[at.clone()])
                })??;
                covered[at].fill(true);
                pages += n;
            }
            Next::Chunk(Chunk::Zeros { first, count }) => {
                in_range(index, Kind::Zeros, first, u64::from(count))?;
                // Dropped, not written: a fresh VM's untouched page is never faulted in.
                vm.zero_pages(first, u64::from(count))?;
                for p in first..first + u64::from(count) {
                    hashes[p as usize] = zero_hash;
                    covered[p as usize] = true;
                }
                pages += u64::from(count);
            }
            Next::Chunk(Chunk::RoundEnd { round, pages }) => {
                rounds += 1;
                round_done(round, pages)?;
            }
            Next::Chunk(Chunk::Vcpu(bytes)) => break VcpuState::decode(bytes)?,
            Next::Chunk(Chunk::Refused(why)) => return Err(MigrateError::Refused(why)),
            Next::Chunk(other) => {
                return Err(out_of_place(index, other.kind(), "pages or the vCPU state"))
            }
        }
        index += 1;
    };
    vm.set_vcpu_state(&state)?;
    index += 1;
    let device = match r.next_chunk()? {
        Chunk::Device(bytes) => bytes.to_vec(),
        other => return Err(out_of_place(index, other.kind(), "the device state")),
    };
    index += 1;
    let (theirs_pages, theirs_regs) = match r.next_chunk()? {
        Chunk::Hashes { pages, registers } => (pages, registers),
        other => return Err(out_of_place(index, other.kind(), "the digests")),
    };
    index += 1;
    match r.next_chunk()? {
        Chunk::End => {}
        other => return Err(out_of_place(index, other.kind(), "the end")),
    }
    let ours_regs = vm.registers_digest()?;
    if ours_regs != theirs_regs {
        return Err(MigrateError::HashMismatch {
            what: "registers digest",
            ours: ours_regs,
            theirs: theirs_regs,
        });
    }
    let mut page = vec![0u8; PAGE_SIZE];
    for (p, _) in covered.iter().enumerate().filter(|(_, c)| !**c) {
        vm.read_bytes((p * PAGE_SIZE) as u64, &mut page)?;
        hashes[p] = page_hash(&page);
    }
    let ours_pages = crate::vm::pages_digest(&hashes);
    if ours_pages != theirs_pages {
        return Err(MigrateError::HashMismatch {
            what: "memory digest",
            ours: ours_pages,
            theirs: theirs_pages,
        });
    }
    Ok(Restored {
        header,
        device,
        exits: state.exits,
        rounds,
        pages,
        bytes: r.bytes(),
        pages_digest: ours_pages,
        registers_digest: ours_regs,
    })
}

fn out_of_place(index: u64, kind: Kind, expected: &str) -> MigrateError {
    MigrateError::Malformed {
        index,
        kind: kind.name(),
        what: format!("out of place: expected {expected}"),
    }
}

/// Refuses a header that is not for this joiner, naming both values.
pub fn check_header(h: &Header, e: &Expect) -> Result<(), MigrateError> {
    if h.session != e.session {
        return Err(MigrateError::Mismatch {
            what: "FT pair (session id)",
            theirs: h.session.to_string(),
            ours: e.session.to_string(),
        });
    }
    if h.image_digest != e.image_digest {
        return Err(MigrateError::Mismatch {
            what: "guest image (SHA-256)",
            theirs: hex(&h.image_digest),
            ours: hex(&e.image_digest),
        });
    }
    if h.mem_size != e.mem_size {
        return Err(MigrateError::Mismatch {
            what: "guest memory size (bytes)",
            theirs: h.mem_size.to_string(),
            ours: e.mem_size.to_string(),
        });
    }
    if h.epoch < e.min_epoch {
        return Err(MigrateError::Mismatch {
            what: "fencing epoch (a deposed primary?)",
            theirs: h.epoch.to_string(),
            ours: format!("at least {}", e.min_epoch),
        });
    }
    Ok(())
}
