//! What must hold for any bytes on a join's state stream — the check the cargo-fuzz target
//! (`fuzz/fuzz_targets/join_stream.rs`, nightly) and the corpus test below (stable: a real
//! stream and thousands of mutants) both run.
//!
//! Reading never panics and every refusal is a typed [`MigrateError`](super::MigrateError)
//! with a message; the two ways of reading ([`ChunkReader::next_chunk`], and
//! [`ChunkReader::next_placing`] with [`ChunkReader::read_pages`], which the joiner uses) accept
//! exactly the same chunks and stop at the same byte; what is accepted is canonical: written
//! again with [`ChunkWriter`] it gives back exactly the bytes read (a REFUSED reason that is not
//! UTF-8 or is longer than the writer's 4 KiB is the one exception: it is read lossily, for the
//! person reading it); and the vCPU and device state inside decode to values that encode back
//! to the same bytes.
//!
//! A stream whose first chunk is sealed is read as a joiner with crypto `auth` reads it: every
//! chunk must carry a valid tag under [`SessionKeys::for_test`]'s keys (the seeds are sealed
//! under them), so what is accepted is exactly what the keys' holder wrote — written again by
//! a sealed writer it gives back the same bytes, tags included. Any other stream is read
//! as crypto `none` reads it (tags skipped unchecked; a sealed chunk there ends the canonical
//! comparison, since its tag cannot be written again without the keys).

use transport::auth::SessionKeys;
use transport::session::{ChunkTags, End, CHUNK_TAG_LEN};

use super::state::VcpuState;
use super::stream::{page_hash, Chunk, ChunkReader, ChunkWriter, Header, Next, FLAG_SEALED};
use crate::join::DeviceState;
use crate::vm::PAGE_SIZE;

/// The keys of the sealed seeds.
fn keys() -> SessionKeys {
    SessionKeys::for_test(7)
}

/// A reader of `data` as this check reads it (see the module documentation).
fn reader(data: &[u8], sealed: bool) -> ChunkReader<&[u8]> {
    if sealed {
        ChunkReader::sealed(data, ChunkTags::receiving(&keys(), End::Accepting))
    } else {
        ChunkReader::new(data)
    }
}

/// A writer whose chunks [`reader`] accepts.
fn writer(sealed: bool) -> ChunkWriter<Vec<u8>> {
    if sealed {
        ChunkWriter::sealed(Vec::new(), ChunkTags::sending(&keys(), End::Connecting))
    } else {
        ChunkWriter::new(Vec::new())
    }
}

/// Whether the chunk at the start of `b` says it is sealed.
fn is_sealed(b: &[u8]) -> bool {
    b.get(5).is_some_and(|f| f & FLAG_SEALED != 0)
}

/// Writes `c` again; `Ok(false)` for a REFUSED chunk that cannot be written back byte for
/// byte (see the module documentation).
fn rewrite(out: &mut ChunkWriter<Vec<u8>>, c: &Chunk<'_>, raw: &[u8]) -> Result<bool, String> {
    let e = |e: super::MigrateError| format!("rewriting: {e}");
    match c {
        Chunk::Header(h) => out.header(h).map_err(e)?,
        Chunk::Pages { first, data } => {
            let hashes: Vec<u64> = data.chunks_exact(PAGE_SIZE).map(page_hash).collect();
            out.pages(*first, data, &hashes).map_err(e)?
        }
        Chunk::Zeros { first, count } => out.zeros(*first, *count).map_err(e)?,
        Chunk::RoundEnd { round, pages } => out.round_end(*round, *pages).map_err(e)?,
        Chunk::Vcpu(p) => out.vcpu(p).map_err(e)?,
        Chunk::Device(p) => out.device(p).map_err(e)?,
        Chunk::Hashes { pages, registers } => out.hashes(*pages, *registers).map_err(e)?,
        Chunk::End => out.end().map_err(e)?,
        Chunk::Refused(reason) => {
            if reason.len() > 4096 || reason.as_bytes() != raw {
                return Ok(false);
            }
            out.refused(reason).map_err(e)?
        }
        Chunk::Verdict {
            ok,
            pages,
            registers,
        } => out.verdict(*ok, *pages, *registers).map_err(e)?,
    }
    Ok(true)
}

/// The payload bytes of the chunk that ends at `end` (for REFUSED's comparison).
fn payload(data: &[u8], start: usize, end: usize) -> &[u8] {
    &data[(start + super::stream::CHUNK_HEADER_LEN).min(end)..end]
}

/// Reads `data` as a state stream both ways and checks the properties above. Returns how many
/// chunks were accepted.
pub fn check(data: &[u8]) -> Result<usize, String> {
    let sealed = is_sealed(data);
    // By whole chunks.
    let mut r = reader(data, sealed);
    let mut out = writer(sealed);
    let mut accepted = 0usize;
    let mut canonical_upto = 0usize;
    let mut comparable = true;
    loop {
        let start = r.bytes() as usize;
        let c = match r.next_chunk() {
            Ok(c) => c,
            Err(e) => {
                if e.to_string().is_empty() {
                    return Err("a refusal without a message".into());
                }
                break;
            }
        };
        accepted += 1;
        match &c {
            Chunk::Vcpu(p) => {
                if let Ok(s) = VcpuState::decode(p) {
                    if s.encode() != *p {
                        return Err("a vCPU state that does not encode back to its bytes".into());
                    }
                }
            }
            Chunk::Device(p) => {
                if let Ok(d) = DeviceState::decode(p) {
                    if d.encode() != *p {
                        return Err("a device state that does not encode back to its bytes".into());
                    }
                }
            }
            _ => {}
        }
        let end_chunk = matches!(c, Chunk::End | Chunk::Refused(_));
        let tagged = is_sealed(&data[start..]);
        let end = start + super::stream::CHUNK_HEADER_LEN + chunk_len(&data[start..]);
        if tagged != sealed {
            // Read as crypto `none` reads a sealed chunk: its tag is not ours to write.
            comparable = false;
        }
        if comparable && !rewrite(&mut out, &c, payload(data, start, end))? {
            comparable = false;
        }
        let end = end + if tagged { CHUNK_TAG_LEN } else { 0 };
        if comparable {
            canonical_upto = end;
        }
        if end_chunk {
            break;
        }
    }
    let consumed = r.bytes() as usize;
    if out.get_mut()[..] != data[..canonical_upto] {
        return Err(format!(
            "accepted chunks are not canonical: written again they differ within the first {canonical_upto} bytes"
        ));
    }
    // As the joiner reads: page bytes straight into place.
    let mut r2 = reader(data, sealed);
    let mut accepted2 = 0usize;
    while let Ok(next) = r2.next_placing() {
        match next {
            Next::Chunk(c) => {
                accepted2 += 1;
                if matches!(c, Chunk::End | Chunk::Refused(_)) {
                    break;
                }
            }
            Next::Pages { count, .. } => {
                let mut dst = vec![0u8; count as usize * PAGE_SIZE];
                let mut hashes = vec![0u64; count as usize];
                if r2.read_pages(&mut dst, &mut hashes).is_err() {
                    break;
                }
                accepted2 += 1;
            }
        }
    }
    if accepted2 != accepted || r2.bytes() as usize != consumed {
        return Err(format!(
            "the two readers disagree: {accepted} chunks ({consumed} bytes) whole, {accepted2} ({} bytes) placing",
            r2.bytes()
        ));
    }
    Ok(accepted)
}

/// The payload length a chunk header at the start of `b` announces (0 if there is none).
fn chunk_len(b: &[u8]) -> usize {
    b.get(8..12).map_or(0, |w| {
        let mut a = [0u8; 4];
        a.copy_from_slice(w);
        u32::from_le_bytes(a) as usize
    })
}

/// A real stream as a primary sends it: HEADER, a round of PAGES and ZEROS, ROUND_END, VCPU,
/// DEVICE, HASHES, END; and a joiner's answer (ROUND_END, VERDICT), and a REFUSED: unsealed,
/// then the same sealed.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = seeds_of(false);
    out.extend(seeds_of(true));
    out
}

fn seeds_of(sealed: bool) -> Vec<Vec<u8>> {
    let mut w = writer(sealed);
    let header = Header {
        mem_size: 16 << 20,
        image_digest: [0x11; 32],
        session: 1,
        epoch: 3,
    };
    let mut pages = vec![0u8; 2 * PAGE_SIZE];
    for (i, b) in pages.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let hashes: Vec<u64> = pages.chunks_exact(PAGE_SIZE).map(page_hash).collect();
    let vcpu = VcpuState {
        exits: 58,
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debugregs: Default::default(),
        events: Default::default(),
        mp_state: Default::default(),
        msrs: vec![Default::default(); 2],
    };
    let device = DeviceState {
        exit: 58,
        next_seq: 59,
        epoch: 3,
        last_clock_ns: 1_000_000,
    };
    let stream = (|| -> Result<(), super::MigrateError> {
        w.header(&header)?;
        w.pages(0, &pages, &hashes)?;
        w.zeros(2, 30)?;
        w.round_end(0, 32)?;
        w.vcpu(&vcpu.encode())?;
        w.device(&device.encode())?;
        w.hashes(0xAB, 0xCD)?;
        w.end()
    })();
    let mut out = vec![std::mem::take(w.get_mut())];
    let mut answer = writer(sealed);
    let answered = answer
        .round_end(0, 32)
        .and_then(|()| answer.verdict(true, 0xAB, 0xCD));
    out.push(std::mem::take(answer.get_mut()));
    let mut refused = writer(sealed);
    let _ = refused.refused("the joiner runs another guest");
    out.push(std::mem::take(refused.get_mut()));
    if stream.is_err() || answered.is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use transport::fuzz::{mutate, xorshift};

    #[test]
    fn the_seeds_are_read_whole() {
        let s = seeds();
        assert_eq!(s.len(), 6);
        for sealed in [0, 3] {
            assert_eq!(check(&s[sealed]), Ok(8));
            assert_eq!(check(&s[sealed + 1]), Ok(2));
            assert_eq!(check(&s[sealed + 2]), Ok(1));
        }
        // The sealed stream is the unsealed one with the flag and a tag per chunk.
        assert_eq!(s[3].len(), s[0].len() + 8 * CHUNK_TAG_LEN);
        assert!(is_sealed(&s[3]) && !is_sealed(&s[0]));
    }

    #[test]
    fn no_bytes_break_the_state_stream_readers() {
        let mut state = 0x853C_49E6_748F_EA9Bu64;
        let mut runs = 0;
        for seed in seeds() {
            let mut current = seed.clone();
            for _ in 0..3000 {
                if let Err(v) = check(&current) {
                    panic!(
                        "{v}: input of {} bytes {:02x?}",
                        current.len(),
                        &current[..current.len().min(256)]
                    );
                }
                runs += 1;
                xorshift(&mut state);
                current = mutate(
                    if state.is_multiple_of(3) {
                        &current
                    } else {
                        &seed
                    },
                    state,
                );
            }
        }
        assert_eq!(runs, 18000);
    }

    /// `fuzz/seeds/join_stream/` holds these seeds for `scripts/fuzz.sh`
    /// (`FTVM_WRITE_FUZZ_SEEDS=1 cargo test -p vmm --lib join_stream_seeds` writes them).
    #[test]
    fn the_checked_in_join_stream_seeds_are_current() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/join_stream");
        for (i, seed) in seeds().iter().enumerate() {
            let path = dir.join(format!("seed-{i}.bin"));
            if std::env::var_os("FTVM_WRITE_FUZZ_SEEDS").is_some() {
                std::fs::create_dir_all(&dir).expect("seed directory");
                std::fs::write(&path, seed).expect("write seed");
            }
            assert!(
                std::fs::read(&path).unwrap_or_default() == *seed,
                "{} is stale: FTVM_WRITE_FUZZ_SEEDS=1 cargo test -p vmm --lib join_stream_seeds",
                path.display()
            );
        }
    }

    #[test]
    fn a_sealed_stream_accepts_only_what_the_keys_holder_wrote() {
        let genuine = &seeds()[3];
        // Every single changed byte (past the first chunk's flags, which pick the mode) is
        // refused at or before its chunk: the stream's accepted prefix never includes it.
        let mut r = reader(genuine, true);
        let mut ends = Vec::new();
        while r.next_chunk().is_ok() {
            ends.push(r.bytes() as usize);
        }
        assert_eq!(ends.len(), 8);
        for at in (6..genuine.len()).step_by(97) {
            let mut bad = genuine.clone();
            bad[at] ^= 0x01;
            let chunk = ends.iter().position(|&e| at < e).expect("inside a chunk");
            let mut r = reader(&bad, true);
            let mut accepted = 0;
            while r.next_chunk().is_ok() {
                accepted += 1;
            }
            assert_eq!(accepted, chunk, "byte {at} flipped: chunk {chunk} accepted");
        }
        // Chunks dropped or swapped: the tags count chunks.
        let mut dropped = genuine[..ends[0]].to_vec();
        dropped.extend_from_slice(&genuine[ends[1]..]);
        let mut r = reader(&dropped, true);
        r.next_chunk().expect("the header");
        let err = r.next_chunk().expect_err("chunk 1 dropped");
        assert!(
            matches!(err, super::super::MigrateError::Unauthenticated { .. }),
            "{err}"
        );
        // Another session's keys: the first chunk is refused.
        let mut r = ChunkReader::sealed(
            &genuine[..],
            ChunkTags::receiving(&SessionKeys::for_test(8), End::Accepting),
        );
        assert!(r.next_chunk().is_err());
        // An unsealed stream where a sealed one is expected.
        let plain = &seeds()[0];
        let mut r = ChunkReader::sealed(&plain[..], ChunkTags::receiving(&keys(), End::Accepting));
        let err = r.next_chunk().expect_err("unsealed");
        assert!(err.to_string().contains("unsealed"), "{err}");
    }

    #[test]
    fn a_nonzero_reserved_field_is_refused() {
        // ZEROS: `u64 first`, `u32 count`, `u32 0`; the last word set.
        let mut w = ChunkWriter::new(Vec::new());
        w.zeros(1, 2).expect("written");
        let mut b = std::mem::take(w.get_mut());
        b[16 + 12] = 1;
        // Fix the CRC so only the reserved field is wrong.
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..12]), &b[16..]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        let mut r = ChunkReader::new(&b[..]);
        let err = r.next_chunk().expect_err("refused");
        assert!(err.to_string().contains("must be zero"), "{err}");
    }
}
