//! Drives 120,000 random and mutated frames through the decoder.
//!
//! Most mutations recompute the CRC afterwards, so they get past the CRC check and exercise the
//! header and entry checks behind it. The test asserts that nothing panics, that every
//! unmodified frame decodes, that every accepted frame re-encodes to the same bytes, and that
//! every error variant was produced at least once, so it proves its own coverage.
//!
//! The run is reproducible: it prints its seed, and `LOGFMT_RANDOM_SEED=<seed>` replays it.

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, resume_unwind};

use common::{borrow_all, OwnedEntry, OwnedEvent};
use logfmt::{
    encode_frame, ControlOp, DecodeError, FrameView, Position, ENTRY_HEADER_LEN, FRAME_HEADER_LEN,
    HAS_INSN_COUNT, INSN_COUNT_LEN, MAX_BODY_LEN,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const ITERATIONS: usize = 120_000;
const DEFAULT_SEED: u64 = 0x4654_4c47_0001_5eed;

/// Byte offsets of the frame header's fields.
const VERSION: usize = 4;
const FLAGS: usize = 6;
const EPOCH: usize = 8;
const FIRST_SEQ: usize = 16;
const ENTRY_COUNT: usize = 24;
const BODY_LEN: usize = 28;
const RESERVED: usize = 32;
const CRC: usize = 36;

/// A valid frame and where its entries start.
struct Valid {
    owned: Vec<OwnedEntry>,
    epoch: u64,
    first_seq: u64,
    bytes: Vec<u8>,
    /// Frame offset of each entry.
    offsets: Vec<usize>,
}

fn random_data(rng: &mut SmallRng) -> Vec<u8> {
    let len = if rng.gen_ratio(1, 10) {
        rng.gen_range(0..200)
    } else {
        rng.gen_range(0..24)
    };
    (0..len).map(|_| rng.gen()).collect()
}

fn random_entry(rng: &mut SmallRng) -> OwnedEntry {
    let event = match rng.gen_range(0..7) {
        0 => OwnedEvent::DeviceInput(rng.gen(), random_data(rng)),
        1 => OwnedEvent::Clock(rng.gen()),
        2 => OwnedEvent::Random(random_data(rng)),
        3 => OwnedEvent::Interrupt(rng.gen()),
        4 => OwnedEvent::OutputMarker(rng.gen(), rng.gen(), rng.gen()),
        5 => OwnedEvent::Heartbeat(rng.gen()),
        _ => OwnedEvent::Control(match rng.gen_range(0..3) {
            0 => ControlOp::GoLive,
            1 => ControlOp::Shutdown,
            _ => ControlOp::EpochChange {
                new_epoch: rng.gen(),
            },
        }),
    };
    let insn = rng.gen_bool(0.3).then(|| rng.gen());
    OwnedEntry {
        position: Position {
            exit: rng.gen(),
            insn,
        },
        event,
    }
}

fn valid_frame(rng: &mut SmallRng) -> Valid {
    let n = rng.gen_range(0..12usize);
    let owned: Vec<OwnedEntry> = (0..n).map(|_| random_entry(rng)).collect();
    let epoch = rng.gen();
    let first_seq = if rng.gen_ratio(1, 8) {
        u64::MAX - n.saturating_sub(1) as u64
    } else {
        rng.gen_range(0..1 << 40)
    };
    let entries = borrow_all(&owned);
    let bytes = encode_frame(epoch, first_seq, &entries).expect("valid entries encode");
    let mut offsets = Vec::with_capacity(n);
    let mut at = FRAME_HEADER_LEN;
    for entry in &entries {
        offsets.push(at);
        at += entry.encoded_len();
    }
    Valid {
        owned,
        epoch,
        first_seq,
        bytes,
        offsets,
    }
}

fn read_u32(f: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(f[at..at + 4].try_into().expect("4 bytes"))
}

fn write(f: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = f.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// Recomputes the CRC over the header and as much of the declared body as is present.
fn fix_crc(f: &mut [u8]) {
    if f.len() < FRAME_HEADER_LEN {
        return;
    }
    let body_len = read_u32(f, BODY_LEN) as usize;
    let end = FRAME_HEADER_LEN.saturating_add(body_len).min(f.len());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..CRC]), &f[FRAME_HEADER_LEN..end]);
    f[CRC..FRAME_HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
}

/// A `u32` that is likely to lie: around the current value, at the edges, or random.
fn lying_u32(rng: &mut SmallRng, current: u32) -> u32 {
    match rng.gen_range(0..8) {
        0 => 0,
        1 => current.wrapping_add(1),
        2 => current.wrapping_sub(1),
        3 => current.wrapping_add(rng.gen_range(2..64)),
        4 => u32::MAX,
        5 => MAX_BODY_LEN + rng.gen_range(0..2),
        6 => rng.gen_range(0..256),
        _ => rng.gen(),
    }
}

fn flip_bits(rng: &mut SmallRng, f: &mut [u8], range: std::ops::Range<usize>) {
    if range.is_empty() {
        return;
    }
    for _ in 0..rng.gen_range(1..=4) {
        let at = rng.gen_range(range.clone());
        f[at] ^= 1 << rng.gen_range(0..8);
    }
}

/// Overwrites one field of one entry with a value likely to break a check.
fn mutate_entry(rng: &mut SmallRng, v: &Valid, f: &mut [u8]) {
    let i = rng.gen_range(0..v.offsets.len());
    let at = v.offsets[i];
    let entry = &v.owned[i];
    let payload = at + ENTRY_HEADER_LEN + entry.position.insn.map_or(0, |_| INSN_COUNT_LEN);
    match rng.gen_range(0..8) {
        0 => {
            let kind = if rng.gen() {
                rng.gen_range(0..=8)
            } else {
                rng.gen()
            };
            f[at + 8] = kind;
        }
        1 => {
            f[at + 9] = match rng.gen_range(0..3) {
                0 => f[at + 9] ^ HAS_INSN_COUNT,
                1 => 1 << rng.gen_range(1..8),
                _ => rng.gen(),
            }
        }
        2 => f[at + 10 + rng.gen_range(0..2)] = rng.gen_range(1..=255),
        3 | 4 => {
            let len = lying_u32(rng, read_u32(f, at + 12));
            write(f, at + 12, &len.to_le_bytes());
        }
        _ => match entry.event {
            OwnedEvent::Control(_) => match rng.gen_range(0..3) {
                0 => write(f, payload, &rng.gen_range(0u32..6).to_le_bytes()),
                1 => write(
                    f,
                    payload + 4,
                    &rng.gen_range(1u32..=u32::MAX).to_le_bytes(),
                ),
                _ => write(f, payload + 8, &rng.gen_range(0u64..3).to_le_bytes()),
            },
            OwnedEvent::OutputMarker(..) => write(f, payload + 2, &[rng.gen(), rng.gen()]),
            _ => {
                let end = at + ENTRY_HEADER_LEN;
                flip_bits(rng, f, at..end);
            }
        },
    }
}

/// Overwrites one header field with a value likely to break a check.
fn mutate_header(rng: &mut SmallRng, f: &mut [u8]) {
    match rng.gen_range(0..8) {
        0 => write(f, VERSION, &rng.gen_range(0u16..4).to_le_bytes()),
        1 => write(f, FLAGS, &(1u16 << rng.gen_range(0..16)).to_le_bytes()),
        2 => write(f, RESERVED, &rng.gen_range(1u32..=u32::MAX).to_le_bytes()),
        3 => write(
            f,
            FIRST_SEQ,
            &(u64::MAX - rng.gen_range(0..4)).to_le_bytes(),
        ),
        4 => write(f, EPOCH, &rng.gen::<u64>().to_le_bytes()),
        5 => {
            let len = lying_u32(rng, read_u32(f, BODY_LEN));
            write(f, BODY_LEN, &len.to_le_bytes());
        }
        _ => {
            let count = lying_u32(rng, read_u32(f, ENTRY_COUNT));
            write(f, ENTRY_COUNT, &count.to_le_bytes());
        }
    }
}

/// The error's variant name, with the truncated part for the two truncation variants.
fn class(e: &DecodeError) -> String {
    match e {
        DecodeError::Truncated { what, .. } => format!("Truncated({what})"),
        DecodeError::EntryTruncated { what, .. } => format!("EntryTruncated({what})"),
        other => {
            let debug = format!("{other:?}");
            debug
                .split(|c: char| !c.is_alphanumeric())
                .next()
                .unwrap_or_default()
                .to_string()
        }
    }
}

/// Every class the run must hit.
const EXPECTED: &[&str] = &[
    "Truncated(frame header)",
    "Truncated(frame)",
    "BadMagic",
    "UnsupportedVersion",
    "UnknownFrameFlags",
    "ReservedNotZero",
    "FrameTooLarge",
    "ImpossibleEntryCount",
    "SequenceOverflow",
    "CrcMismatch",
    "EntryTruncated(entry header)",
    "EntryTruncated(instruction count)",
    "EntryTruncated(payload)",
    "UnknownKind",
    "UnknownEntryFlags",
    "EntryReservedNotZero",
    "BadPayloadLength",
    "UnknownControlOp",
    "InvalidControlArgument",
    "EntryCountMismatch",
    "TrailingBytes",
];

const ENTRY_LEVEL: &[&str] = &[
    "EntryTruncated(entry header)",
    "EntryTruncated(instruction count)",
    "EntryTruncated(payload)",
    "UnknownKind",
    "UnknownEntryFlags",
    "EntryReservedNotZero",
    "BadPayloadLength",
    "UnknownControlOp",
    "InvalidControlArgument",
    "EntryCountMismatch",
    "TrailingBytes",
];

/// Decodes `input`; if it is accepted, checks that re-encoding reproduces it exactly.
/// Returns the outcome's class.
fn decode_and_check(input: &[u8], iteration: usize) -> String {
    let outcome = catch_unwind(|| match FrameView::parse(input) {
        Ok((view, consumed)) => {
            assert_eq!(view.as_bytes(), &input[..consumed]);
            let entries: Vec<_> = view.entries().collect();
            assert_eq!(entries.len(), view.entry_count() as usize);
            let again = encode_frame(view.epoch(), view.first_seq(), &entries)
                .expect("accepted entries re-encode");
            assert_eq!(again, view.as_bytes(), "accepted frame is not canonical");
            "ok".to_string()
        }
        Err(e) => class(&e),
    });
    match outcome {
        Ok(class) => class,
        Err(panic) => {
            eprintln!("iteration {iteration} panicked on input {input:02x?}");
            resume_unwind(panic)
        }
    }
}

#[test]
fn random_and_mutated_frames() {
    let seed = std::env::var("LOGFMT_RANDOM_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim_start_matches("0x");
            u64::from_str_radix(s, 16).ok()
        })
        .unwrap_or(DEFAULT_SEED);
    println!("random_frames seed: {seed:#x} (replay with LOGFMT_RANDOM_SEED={seed:x})");
    let mut rng = SmallRng::seed_from_u64(seed);

    // Outcome counts, separately for inputs whose CRC was recomputed after mutation.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut crc_fixed: BTreeMap<String, usize> = BTreeMap::new();
    let mut valid_decoded = 0;

    for iteration in 0..ITERATIONS {
        let strategy = rng.gen_range(0..10);
        if strategy == 0 {
            // Purely random bytes; every other time behind a valid magic and version.
            let len = rng.gen_range(0..120);
            let mut f: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if rng.gen() && f.len() >= 6 {
                f[..6].copy_from_slice(b"FTLG\x01\x00");
            }
            *counts.entry(decode_and_check(&f, iteration)).or_default() += 1;
            continue;
        }

        let v = valid_frame(&mut rng);
        let mut f = v.bytes.clone();
        let mut fix = true;
        match strategy {
            1 => {
                // Unmodified: must decode to exactly what was encoded.
                let (view, consumed) = FrameView::parse(&f).unwrap_or_else(|e| {
                    panic!("iteration {iteration}: valid frame rejected: {e}: {f:02x?}")
                });
                assert_eq!(consumed, f.len());
                assert_eq!((view.epoch(), view.first_seq()), (v.epoch, v.first_seq));
                assert_eq!(view.entries().collect::<Vec<_>>(), borrow_all(&v.owned));
                valid_decoded += 1;
                fix = false;
            }
            2 => {
                // Random bit flips anywhere; the CRC (or a header check) must catch them.
                let len = f.len();
                flip_bits(&mut rng, &mut f, 0..len);
                fix = false;
            }
            3 => {
                // Bit flips in the CRC-covered bytes, then a correct CRC.
                let len = f.len();
                flip_bits(&mut rng, &mut f, 0..len);
            }
            4 => {
                // Truncation; half the time the header is made to agree with it.
                f.truncate(rng.gen_range(0..f.len()));
                if rng.gen() && f.len() >= FRAME_HEADER_LEN {
                    let body = (f.len() - FRAME_HEADER_LEN) as u32;
                    write(&mut f, BODY_LEN, &body.to_le_bytes());
                } else {
                    fix = false;
                }
            }
            5 => {
                // Extension with random bytes: the frame still decodes, to the same length,
                // unless the header is made to claim the extra bytes.
                let extra = rng.gen_range(1..40);
                f.extend((0..extra).map(|_| rng.gen::<u8>()));
                if rng.gen() {
                    let body = (f.len() - FRAME_HEADER_LEN) as u32;
                    write(&mut f, BODY_LEN, &body.to_le_bytes());
                    if rng.gen() {
                        let count = read_u32(&f, ENTRY_COUNT) + 1;
                        write(&mut f, ENTRY_COUNT, &count.to_le_bytes());
                    }
                } else {
                    let (_, consumed) = FrameView::parse(&f).expect("extended frame decodes");
                    assert_eq!(consumed, v.bytes.len());
                    fix = false;
                }
            }
            6 | 7 => mutate_header(&mut rng, &mut f),
            _ => {
                if v.offsets.is_empty() {
                    mutate_header(&mut rng, &mut f);
                } else {
                    mutate_entry(&mut rng, &v, &mut f);
                }
            }
        }
        if fix {
            fix_crc(&mut f);
        }
        let class = decode_and_check(&f, iteration);
        if fix {
            *crc_fixed.entry(class.clone()).or_default() += 1;
        }
        *counts.entry(class).or_default() += 1;
    }

    println!("{ITERATIONS} inputs, {valid_decoded} unmodified valid frames decoded");
    println!("{:<36} {:>8} {:>14}", "outcome", "all", "crc-recomputed");
    for (class, n) in &counts {
        let fixed = crc_fixed.get(class).copied().unwrap_or(0);
        println!("{class:<36} {n:>8} {fixed:>14}");
    }

    assert!(valid_decoded > ITERATIONS / 20, "too few valid frames");
    let missing: Vec<_> = EXPECTED
        .iter()
        .filter(|c| !counts.contains_key(**c))
        .collect();
    assert!(missing.is_empty(), "never produced: {missing:?}");
    // The CRC-recomputed mutations must mostly get past the CRC, into the real checks.
    let fixed_total: usize = crc_fixed.values().sum();
    let fixed_crc_errors = crc_fixed.get("CrcMismatch").copied().unwrap_or(0);
    assert!(
        fixed_crc_errors * 5 < fixed_total,
        "CRC-recomputed inputs mostly rejected by the CRC"
    );
    let entry_level: usize = ENTRY_LEVEL
        .iter()
        .map(|c| crc_fixed.get(*c).copied().unwrap_or(0))
        .sum();
    assert!(
        entry_level * 5 > fixed_total,
        "entry checks reached by only {entry_level} of {fixed_total} inputs"
    );
    // Some mutations are harmless (e.g. a new epoch) and must decode.
    assert!(crc_fixed.get("ok").copied().unwrap_or(0) > 0);
}
