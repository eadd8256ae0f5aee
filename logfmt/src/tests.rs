//! Unit tests: one or more hand-built bad frames per error variant, asserting the exact error,
//! plus the encoder's limits and the agreement between `FORMAT.md` and the code.

use super::*;

const EPOCH: u64 = 9;
const FIRST: u64 = 100;
const MAX: usize = MAX_BODY_LEN as usize;

/// Offset of the first entry in a frame.
const E0: usize = FRAME_HEADER_LEN;

fn encode(entries: &[Entry<'_>]) -> Vec<u8> {
    encode_frame(EPOCH, FIRST, entries).expect("valid entries encode")
}

/// Recomputes the CRC from the header's (possibly edited) body length, so a test reaches the
/// checks after the CRC.
fn fix_crc(f: &mut [u8]) {
    let body_len = u32::from_le_bytes(f[28..32].try_into().expect("4 bytes")) as usize;
    let end = FRAME_HEADER_LEN.saturating_add(body_len).min(f.len());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f[..36]), &f[FRAME_HEADER_LEN..end]);
    f[36..40].copy_from_slice(&crc.to_le_bytes());
}

/// Overwrites bytes at `at` and fixes the CRC.
fn set(f: &mut [u8], at: usize, bytes: &[u8]) {
    f[at..at + bytes.len()].copy_from_slice(bytes);
    fix_crc(f);
}

fn reject(f: &[u8]) -> DecodeError {
    match FrameView::parse(f) {
        Ok((view, _)) => panic!("bad frame accepted: {view:?}"),
        Err(e) => e,
    }
}

fn random(data: &[u8]) -> Entry<'_> {
    Entry::new(Position::at_exit(1), Event::Random { data })
}

fn with_event(event: Event<'_>) -> Entry<'_> {
    Entry::new(Position::at_exit(2), event)
}

fn one_of_each<'a>(out_digest: u64) -> Vec<Entry<'a>> {
    vec![
        Entry::new(
            Position::at_exit(5),
            Event::DeviceInput {
                device: 3,
                data: b"hi",
            },
        ),
        Entry::new(
            Position::at_insn(6, 1234),
            Event::Clock {
                ns: 1_700_000_000_000_000_000,
            },
        ),
        Entry::new(
            Position::at_exit(7),
            Event::Random {
                data: &[0xaa, 0xbb, 0xcc],
            },
        ),
        Entry::new(Position::at_exit(8), Event::Interrupt { vector: 0x20 }),
        Entry::new(
            Position::at_exit(9),
            Event::OutputMarker {
                device: 3,
                len: 4,
                digest: out_digest,
            },
        ),
        Entry::new(Position::at_exit(10), Event::Heartbeat { sender_ns: 42 }),
        Entry::new(
            Position::at_exit(11),
            Event::Control(ControlOp::EpochChange { new_epoch: 8 }),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Valid frames

#[test]
fn valid_frame_round_trips() {
    let entries = one_of_each(digest(&[0xde, 0xad, 0xbe, 0xef]));
    let f = encode(&entries);
    let (view, consumed) = FrameView::parse(&f).expect("valid frame");
    assert_eq!(consumed, f.len());
    assert_eq!(view.epoch(), EPOCH);
    assert_eq!(view.first_seq(), FIRST);
    assert_eq!(view.entry_count(), 7);
    assert_eq!(view.last_seq(), Some(FIRST + 6));
    assert_eq!(view.as_bytes(), &f[..]);
    assert_eq!(view.body(), &f[FRAME_HEADER_LEN..]);
    assert_eq!(view.entries().len(), 7);
    assert_eq!(view.entries().collect::<Vec<_>>(), entries);
    let seqs: Vec<u64> = view.entries_with_seq().map(|(s, _)| s).collect();
    assert_eq!(seqs, (FIRST..FIRST + 7).collect::<Vec<_>>());
    for entry in &entries {
        // Each entry alone, to pin down `encoded_len`.
        assert_eq!(
            encode(&[*entry]).len(),
            FRAME_HEADER_LEN + entry.encoded_len()
        );
    }
}

#[test]
fn empty_frame_is_valid() {
    let f = encode(&[]);
    assert_eq!(f.len(), FRAME_HEADER_LEN);
    let (view, consumed) = FrameView::parse(&f).expect("empty frame");
    assert_eq!(consumed, FRAME_HEADER_LEN);
    assert_eq!(view.entry_count(), 0);
    assert_eq!(view.last_seq(), None);
    assert_eq!(view.entries().next(), None);
}

#[test]
fn bytes_after_the_frame_are_left_alone() {
    let mut f = encode(&[random(b"abc")]);
    let len = f.len();
    f.extend_from_slice(b"next frame starts here");
    let (view, consumed) = decode_frame(&f).expect("frame with trailing input");
    assert_eq!(consumed, len);
    assert_eq!(view.as_bytes().len(), len);
}

#[test]
fn largest_frame_is_accepted() {
    let data = vec![7u8; MAX - ENTRY_HEADER_LEN];
    let f = encode(&[random(&data)]);
    assert_eq!(f.len(), MAX_FRAME_LEN);
    let (view, _) = FrameView::parse(&f).expect("maximal frame");
    assert_eq!(view.entries().next(), Some(random(&data)));
    assert_eq!(peek_frame_len(&f), Ok(MAX_FRAME_LEN));
}

#[test]
fn last_sequence_number_may_be_u64_max() {
    let mut f = encode(&[random(b""), random(b"")]);
    set(&mut f, 16, &(u64::MAX - 1).to_le_bytes());
    let (view, _) = FrameView::parse(&f).expect("sequence numbers up to u64::MAX");
    assert_eq!(view.last_seq(), Some(u64::MAX));
    let seqs: Vec<u64> = view.entries_with_seq().map(|(s, _)| s).collect();
    assert_eq!(seqs, [u64::MAX - 1, u64::MAX]);
}

#[test]
fn frames_walks_back_to_back_frames() {
    let mut stream = encode(&[random(b"a")]);
    stream.extend(encode_frame(EPOCH, FIRST + 1, &[random(b"bc")]).expect("encode"));
    stream.extend(encode(&[]));
    let seqs: Vec<_> = frames(&stream).map(|f| f.map(|v| v.last_seq())).collect();
    assert_eq!(seqs, [Ok(Some(FIRST)), Ok(Some(FIRST + 1)), Ok(None)]);

    // Corrupt the second frame: the walk yields the first, then the error, then stops.
    let second = FRAME_HEADER_LEN + 17;
    stream[second + FRAME_HEADER_LEN] ^= 0x10;
    let mut it = frames(&stream);
    assert!(matches!(it.next(), Some(Ok(_))));
    assert!(matches!(
        it.next(),
        Some(Err(DecodeError::CrcMismatch { .. }))
    ));
    assert_eq!(it.remainder().len(), stream.len() - second);
    assert!(it.next().is_none());
}

// ---------------------------------------------------------------------------------------------
// Header errors

#[test]
fn truncated_header() {
    let f = encode(&[]);
    assert_eq!(
        reject(&f[..39]),
        DecodeError::Truncated {
            what: "frame header",
            needed: 40,
            available: 39
        }
    );
    assert_eq!(
        reject(&[]),
        DecodeError::Truncated {
            what: "frame header",
            needed: 40,
            available: 0
        }
    );
    assert_eq!(peek_frame_len(&f[..10]), Err(reject(&f[..10])));
}

#[test]
fn truncated_frame() {
    let f = encode(&[random(b"abc")]);
    let len = f.len();
    assert_eq!(
        reject(&f[..len - 1]),
        DecodeError::Truncated {
            what: "frame",
            needed: len,
            available: len - 1
        }
    );
    // The header alone is enough to learn the frame length.
    assert_eq!(peek_frame_len(&f[..FRAME_HEADER_LEN]), Ok(len));
}

#[test]
fn bad_magic() {
    let mut f = encode(&[]);
    f[0] = b'X';
    assert_eq!(reject(&f), DecodeError::BadMagic { found: *b"XTLG" });
    assert_eq!(peek_frame_len(&f), Err(reject(&f)));
}

#[test]
fn unsupported_version() {
    for version in [0u16, 2, u16::MAX] {
        let mut f = encode(&[]);
        set(&mut f, 4, &version.to_le_bytes());
        assert_eq!(
            reject(&f),
            DecodeError::UnsupportedVersion {
                found: version,
                supported: 1
            }
        );
    }
}

#[test]
fn unknown_frame_flags() {
    for flags in [1u16, 0x8000] {
        let mut f = encode(&[]);
        set(&mut f, 6, &flags.to_le_bytes());
        assert_eq!(reject(&f), DecodeError::UnknownFrameFlags(flags));
    }
}

#[test]
fn frame_reserved_not_zero() {
    let mut f = encode(&[]);
    set(&mut f, 32, &[0, 0, 0, 1]);
    assert_eq!(
        reject(&f),
        DecodeError::ReservedNotZero {
            what: "frame header reserved"
        }
    );
}

#[test]
fn frame_too_large() {
    for body_len in [MAX_BODY_LEN + 1, u32::MAX] {
        let mut f = encode(&[]);
        set(&mut f, 28, &body_len.to_le_bytes());
        let expected = DecodeError::FrameTooLarge {
            body_len,
            max: MAX_BODY_LEN,
        };
        assert_eq!(reject(&f), expected);
        assert_eq!(peek_frame_len(&f), Err(expected));
    }
    // Exactly the limit passes the header checks.
    let mut f = encode(&[]);
    set(&mut f, 28, &MAX_BODY_LEN.to_le_bytes());
    assert_eq!(peek_frame_len(&f), Ok(MAX_FRAME_LEN));
}

#[test]
fn impossible_entry_count() {
    let mut f = encode(&[random(&[0; 20])]); // body of 36 bytes: room for at most 2 entries
    set(&mut f, 24, &3u32.to_le_bytes());
    assert_eq!(
        reject(&f),
        DecodeError::ImpossibleEntryCount {
            count: 3,
            body_len: 36
        }
    );
    set(&mut f, 24, &u32::MAX.to_le_bytes());
    assert!(matches!(
        reject(&f),
        DecodeError::ImpossibleEntryCount {
            count: u32::MAX,
            ..
        }
    ));
}

#[test]
fn sequence_overflow() {
    let mut f = encode(&[random(b""), random(b"")]);
    set(&mut f, 16, &u64::MAX.to_le_bytes());
    assert_eq!(
        reject(&f),
        DecodeError::SequenceOverflow {
            first_seq: u64::MAX,
            count: 2
        }
    );
}

#[test]
fn crc_mismatch() {
    let f = encode(&[random(b"abc")]);
    let stored = u32::from_le_bytes(f[36..40].try_into().expect("4 bytes"));
    // A flipped bit in the body, in a CRC-covered header field, and in the CRC itself.
    for at in [f.len() - 1, 8, 38] {
        let mut bad = f.clone();
        bad[at] ^= 0x04;
        let computed = crc32c::crc32c_append(crc32c::crc32c(&bad[..36]), &bad[40..]);
        let stored = if at == 38 {
            stored ^ 0x0004_0000
        } else {
            stored
        };
        assert_eq!(reject(&bad), DecodeError::CrcMismatch { stored, computed });
    }
}

#[test]
fn parse_validated_skips_only_the_crc() {
    let f = encode(&[random(b"abc"), random(b"de")]);
    let (checked, len) = FrameView::parse(&f).expect("valid frame");
    let (trusted, trusted_len) = FrameView::parse_validated(&f).expect("valid frame");
    assert_eq!((checked, len), (trusted, trusted_len));
    // A wrong CRC is the one thing it does not look at...
    let mut bad_crc = f.clone();
    bad_crc[38] ^= 0x04;
    assert!(FrameView::parse(&bad_crc).is_err());
    let (view, _) = FrameView::parse_validated(&bad_crc).expect("CRC not checked");
    assert_eq!(view.entries().count(), 2);
    // ...every structural check still holds.
    let mut bad_kind = f.clone();
    bad_kind[40 + 8] = 0xEE;
    assert!(matches!(
        FrameView::parse_validated(&bad_kind),
        Err(DecodeError::UnknownKind { kind: 0xEE, .. })
    ));
    assert!(matches!(
        FrameView::parse_validated(&f[..f.len() - 1]),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn a_landed_frame_reads_entry_by_entry_in_place() {
    let f = encode(&[random(b"abc"), random(b"de"), random(b"")]);
    let (checked, _) = FrameView::parse(&f).expect("valid frame");
    let landed = FrameView::parse_landed(&f).expect("valid header");
    assert_eq!(landed.header(), checked.header());
    let mut offset = 0;
    let mut stepped = Vec::new();
    for index in 0..landed.entry_count() {
        let (entry, next) = landed.entry_at(offset, index).expect("entry");
        assert!(next > offset);
        stepped.push(entry);
        offset = next;
    }
    assert_eq!(offset, landed.body().len());
    assert_eq!(stepped, checked.entries().collect::<Vec<_>>());
    // Past the last entry, and at an offset inside an entry, it is an error.
    assert!(matches!(
        landed.entry_at(offset, 3),
        Err(DecodeError::EntryCountMismatch {
            declared: 3,
            found: 3
        })
    ));
    assert!(landed.entry_at(1, 0).is_err());
    // Only the header and the length are checked again.
    assert!(matches!(
        FrameView::parse_landed(&f[..f.len() - 1]),
        Err(DecodeError::Truncated { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// Entry errors

#[test]
fn entry_header_truncated() {
    let mut f = encode(&[random(&[0; 20])]); // one 36-byte entry
    f.extend_from_slice(&[0; 10]);
    set(&mut f, 24, &2u32.to_le_bytes());
    set(&mut f, 28, &46u32.to_le_bytes());
    assert_eq!(
        reject(&f),
        DecodeError::EntryTruncated {
            index: 1,
            offset: E0 + 36,
            what: "entry header",
            needed: 16,
            available: 10
        }
    );
}

#[test]
fn instruction_count_truncated() {
    let mut f = encode(&[random(&[1, 2, 3, 4])]); // one 20-byte entry
    set(&mut f, E0 + 9, &[HAS_INSN_COUNT]);
    assert_eq!(
        reject(&f),
        DecodeError::EntryTruncated {
            index: 0,
            offset: E0,
            what: "instruction count",
            needed: 24,
            available: 20
        }
    );
}

#[test]
fn payload_length_lies() {
    let mut f = encode(&[random(b""), random(&[1, 2, 3, 4])]); // 16 + 20 bytes
    for (len, needed) in [
        (5u32, 21usize),
        (100, 116),
        (u32::MAX, 16 + u32::MAX as usize),
    ] {
        set(&mut f, E0 + 16 + 12, &len.to_le_bytes());
        assert_eq!(
            reject(&f),
            DecodeError::EntryTruncated {
                index: 1,
                offset: E0 + 16,
                what: "payload",
                needed,
                available: 20
            }
        );
    }
    // A payload length that is too short leaves the rest of the body for a following
    // entry that is not declared.
    set(&mut f, E0 + 16 + 12, &0u32.to_le_bytes());
    assert_eq!(
        reject(&f),
        DecodeError::TrailingBytes {
            offset: E0 + 32,
            count: 4
        }
    );
}

#[test]
fn unknown_kind() {
    for kind in [0u8, 8, 0xff] {
        let mut f = encode(&[random(b"x"), random(b"y")]); // 17 bytes each
        set(&mut f, E0 + 17 + 8, &[kind]);
        assert_eq!(
            reject(&f),
            DecodeError::UnknownKind {
                index: 1,
                offset: E0 + 17,
                kind
            }
        );
    }
}

#[test]
fn unknown_entry_flags() {
    for flags in [0x02u8, 0x81, 0xff] {
        let mut f = encode(&[random(&[0; 8])]);
        set(&mut f, E0 + 9, &[flags]);
        assert_eq!(
            reject(&f),
            DecodeError::UnknownEntryFlags {
                index: 0,
                offset: E0,
                flags
            }
        );
    }
}

#[test]
fn entry_reserved_not_zero() {
    let output = with_event(Event::OutputMarker {
        device: 1,
        len: 2,
        digest: 3,
    });
    let control = with_event(Event::Control(ControlOp::Shutdown));
    let cases = [
        (random(b""), E0 + 11, "entry reserved"),
        (output, E0 + 16 + 3, "output marker reserved"),
        (control, E0 + 16 + 7, "control reserved"),
    ];
    for (entry, at, what) in cases {
        let mut f = encode(&[entry]);
        set(&mut f, at, &[0x80]);
        assert_eq!(
            reject(&f),
            DecodeError::EntryReservedNotZero {
                index: 0,
                offset: E0,
                what
            }
        );
    }
}

#[test]
fn bad_payload_length() {
    let input = with_event(Event::DeviceInput {
        device: 1,
        data: &[9; 8],
    });
    let cases = [
        (input, 0u32, "at least 2"),
        (input, 1, "at least 2"),
        (with_event(Event::Clock { ns: 1 }), 7, "8"),
        (with_event(Event::Clock { ns: 1 }), 9, "8"),
        (with_event(Event::Interrupt { vector: 1 }), 0, "1"),
        (with_event(Event::Interrupt { vector: 1 }), 2, "1"),
        (
            with_event(Event::OutputMarker {
                device: 1,
                len: 2,
                digest: 3,
            }),
            15,
            "16",
        ),
        (with_event(Event::Heartbeat { sender_ns: 1 }), 0, "8"),
        (
            with_event(Event::Control(ControlOp::GoLive)),
            u32::MAX,
            "16",
        ),
    ];
    for (entry, len, expected) in cases {
        let mut f = encode(&[entry]);
        set(&mut f, E0 + 12, &len.to_le_bytes());
        assert_eq!(
            reject(&f),
            DecodeError::BadPayloadLength {
                index: 0,
                offset: E0,
                kind: entry.event.kind(),
                len,
                expected
            },
            "{entry:?} with payload length {len}"
        );
    }
}

#[test]
fn unknown_control_op() {
    for op in [0u32, 4, u32::MAX] {
        let mut f = encode(&[with_event(Event::Control(ControlOp::GoLive))]);
        set(&mut f, E0 + 16, &op.to_le_bytes());
        assert_eq!(
            reject(&f),
            DecodeError::UnknownControlOp {
                index: 0,
                offset: E0,
                op
            }
        );
    }
}

#[test]
fn invalid_control_argument() {
    for (op, argument) in [(ControlOp::GoLive, 1u64), (ControlOp::Shutdown, u64::MAX)] {
        let mut f = encode(&[with_event(Event::Control(op))]);
        set(&mut f, E0 + 24, &argument.to_le_bytes());
        assert_eq!(
            reject(&f),
            DecodeError::InvalidControlArgument {
                index: 0,
                offset: E0,
                op: op.code(),
                argument
            }
        );
    }
    // EpochChange takes any argument.
    let mut f = encode(&[with_event(Event::Control(ControlOp::EpochChange {
        new_epoch: 0,
    }))]);
    set(&mut f, E0 + 24, &u64::MAX.to_le_bytes());
    let (view, _) = FrameView::parse(&f).expect("epoch change to u64::MAX");
    assert_eq!(
        view.entries().next().map(|e| e.event),
        Some(Event::Control(ControlOp::EpochChange {
            new_epoch: u64::MAX
        }))
    );
}

#[test]
fn entry_count_mismatch() {
    let mut f = encode(&[random(&[0; 32]), random(&[0; 32])]); // body of 96 bytes
    set(&mut f, 24, &3u32.to_le_bytes());
    assert_eq!(
        reject(&f),
        DecodeError::EntryCountMismatch {
            declared: 3,
            found: 2
        }
    );
}

#[test]
fn trailing_bytes() {
    let mut f = encode(&[random(&[0; 32]), random(&[0; 32])]); // two 48-byte entries
    set(&mut f, 24, &1u32.to_le_bytes());
    assert_eq!(
        reject(&f),
        DecodeError::TrailingBytes {
            offset: E0 + 48,
            count: 48
        }
    );
    set(&mut f, 24, &0u32.to_le_bytes());
    assert_eq!(
        reject(&f),
        DecodeError::TrailingBytes {
            offset: E0,
            count: 96
        }
    );
}

#[test]
fn error_messages_name_the_problem() {
    let e = DecodeError::UnknownKind {
        index: 3,
        offset: 99,
        kind: 9,
    };
    assert_eq!(e.to_string(), "entry 3 at offset 99: unknown kind 9");
    let e = DecodeError::BadMagic { found: *b"XTLG" };
    assert_eq!(
        e.to_string(),
        "bad magic [58, 54, 4c, 47], expected \"FTLG\""
    );
    let e = EncodeError::BufferFull {
        needed: 24,
        available: 10,
    };
    assert_eq!(e.to_string(), "buffer full: need 24 bytes, have 10");
    assert_eq!(InvalidKind(0).to_string(), "unknown entry kind 0");
}

// ---------------------------------------------------------------------------------------------
// Encoder

#[test]
fn writer_needs_room_for_the_header() {
    let mut buf = [0u8; 39];
    assert_eq!(
        FrameWriter::new(&mut buf, 0, 0).err(),
        Some(EncodeError::BufferFull {
            needed: 40,
            available: 39
        })
    );
}

#[test]
fn buffer_full_leaves_the_writer_unchanged() {
    let mut buf = [0u8; 40 + 20 + 10];
    let mut w = FrameWriter::new(&mut buf, EPOCH, FIRST).expect("room for the header");
    assert!(w.is_empty());
    w.push(&random(&[1, 2, 3, 4])).expect("20 bytes fit");
    assert_eq!(w.remaining(), 10);
    let clock = with_event(Event::Clock { ns: 1 });
    assert_eq!(
        w.push(&clock),
        Err(EncodeError::BufferFull {
            needed: 24,
            available: 10
        })
    );
    assert_eq!(
        (w.len(), w.entry_count(), w.next_seq()),
        (60, 1, Some(FIRST + 1))
    );
    let len = w.finish().expect("finish");
    assert_eq!(len, 60);
    let (view, _) = FrameView::parse(&buf[..len]).expect("finished frame");
    assert_eq!(view.entries().collect::<Vec<_>>(), [random(&[1, 2, 3, 4])]);
}

#[test]
fn entry_too_large() {
    let data = vec![0u8; MAX];
    let entry = random(&data);
    let expected = EncodeError::EntryTooLarge {
        len: MAX + 16,
        max: MAX,
    };
    assert_eq!(encode_frame(0, 0, &[entry]), Err(expected));
    let mut buf = [0u8; 64];
    let mut w = FrameWriter::new(&mut buf, 0, 0).expect("room for the header");
    assert_eq!(w.push(&entry), Err(expected));
    assert!(w.is_empty());
}

#[test]
fn body_too_large() {
    let data = vec![0u8; MAX - 26]; // a MAX - 10 byte entry
    let big = random(&data);
    let clock = with_event(Event::Clock { ns: 1 });
    let expected = EncodeError::BodyTooLarge {
        needed: MAX + 14,
        max: MAX,
    };
    assert_eq!(encode_frame(0, 0, &[big, clock]), Err(expected));
    let mut buf = vec![0u8; MAX_FRAME_LEN + 64];
    let mut w = FrameWriter::new(&mut buf, 0, 0).expect("room for the header");
    w.push(&big).expect("fits");
    assert_eq!(w.remaining(), 10);
    assert_eq!(w.push(&clock), Err(expected));
    assert_eq!(w.entry_count(), 1);
    let len = w.finish().expect("finish");
    assert!(FrameView::parse(&buf[..len]).is_ok());
}

#[test]
fn writer_refuses_sequence_overflow() {
    let mut buf = [0u8; 128];
    let mut w = FrameWriter::new(&mut buf, 0, u64::MAX).expect("room for the header");
    w.push(&random(b"")).expect("sequence u64::MAX is fine");
    assert_eq!(w.next_seq(), None);
    assert_eq!(
        w.push(&random(b"")),
        Err(EncodeError::SequenceOverflow {
            first_seq: u64::MAX,
            count: 1
        })
    );
    let len = w.finish().expect("finish");
    let (view, _) = FrameView::parse(&buf[..len]).expect("one entry at u64::MAX");
    assert_eq!(view.last_seq(), Some(u64::MAX));
}

#[test]
fn frame_buf_is_a_reusable_writer() {
    let mut fb = FrameBuf::new(40 + 20 + 20);
    assert_eq!(
        (fb.capacity(), fb.remaining(), fb.is_empty()),
        (80, 40, true)
    );
    fb.reset(EPOCH, FIRST);
    fb.push(&random(&[1, 2, 3, 4])).expect("20 bytes fit");
    assert_eq!(
        fb.push(&with_event(Event::Clock { ns: 1 })),
        Err(EncodeError::BufferFull {
            needed: 24,
            available: 20
        })
    );
    assert_eq!(
        (fb.len(), fb.entry_count(), fb.next_seq()),
        (60, 1, Some(FIRST + 1))
    );
    let frame = fb.finish().expect("finish").to_vec();
    assert_eq!(frame, encode(&[random(&[1, 2, 3, 4])]));

    // Finishing again after another push reseals the longer frame.
    fb.push(&random(b"")).expect("16 bytes fit");
    let frame = fb.finish().expect("finish").to_vec();
    assert_eq!(frame, encode(&[random(&[1, 2, 3, 4]), random(b"")]));

    // Reuse for the next frame.
    fb.reset(EPOCH + 1, FIRST + 2);
    assert!(fb.is_empty());
    fb.push(&with_event(Event::Heartbeat { sender_ns: 5 }))
        .expect("fits");
    let (view, _) = FrameView::parse(fb.finish().expect("finish")).expect("decodes");
    assert_eq!(
        (view.epoch(), view.first_seq(), view.entry_count()),
        (EPOCH + 1, FIRST + 2, 1)
    );
    fb.clear();
    assert_eq!(
        (fb.epoch(), fb.first_seq(), fb.len()),
        (EPOCH + 1, FIRST + 2, 40)
    );
}

#[test]
fn frame_buf_header_only_and_too_small() {
    // Room for the header alone: an empty frame (a heartbeat) and nothing else.
    let mut fb = FrameBuf::new(FRAME_HEADER_LEN);
    fb.reset(3, 77);
    assert_eq!(fb.finish().map(<[u8]>::len), Ok(40));
    assert_eq!(
        fb.push(&random(b"")),
        Err(EncodeError::BufferFull {
            needed: 16,
            available: 0
        })
    );
    let mut small = FrameBuf::new(39);
    let header_full = EncodeError::BufferFull {
        needed: 40,
        available: 39,
    };
    assert_eq!(small.push(&random(b"")), Err(header_full));
    assert_eq!(small.finish().err(), Some(header_full));
    assert!(small.is_empty());
}

#[test]
fn kind_conversions() {
    for (i, kind) in Kind::ALL.into_iter().enumerate() {
        assert_eq!(u8::from(kind) as usize, i + 1);
        assert_eq!(Kind::try_from(u8::from(kind)), Ok(kind));
    }
    assert_eq!(Kind::try_from(0), Err(InvalidKind(0)));
    assert_eq!(Kind::try_from(8), Err(InvalidKind(8)));
}

// ---------------------------------------------------------------------------------------------
// FORMAT.md agrees with the code

const FORMAT_MD: &str = include_str!("../FORMAT.md");

#[test]
fn format_md_example_matches_encoder() {
    let block = FORMAT_MD
        .split("<!-- example-frame-begin -->")
        .nth(1)
        .and_then(|s| s.split("<!-- example-frame-end -->").next())
        .expect("FORMAT.md has the example frame");
    let mut bytes = Vec::new();
    for line in block.lines().filter(|l| l.contains('|')) {
        let (hex, note) = line.split_once('|').expect("a | separator");
        let offset: usize = note
            .split_whitespace()
            .next()
            .and_then(|o| o.parse().ok())
            .expect("an offset after the |");
        assert_eq!(offset, bytes.len(), "offset column of {line:?}");
        for byte in hex.split_whitespace() {
            bytes.push(u8::from_str_radix(byte, 16).expect("a hex byte"));
        }
    }
    let expected =
        encode_frame(7, 1000, &one_of_each(digest(&[0xde, 0xad, 0xbe, 0xef]))).expect("encode");
    assert_eq!(bytes, expected);
}

#[test]
fn format_md_tables_match_the_code() {
    for kind in Kind::ALL {
        let row = format!("| {} | `{:?}`", u8::from(kind), kind);
        assert!(FORMAT_MD.contains(&row), "FORMAT.md lacks {row:?}");
    }
    for op in [
        ControlOp::GoLive,
        ControlOp::Shutdown,
        ControlOp::EpochChange { new_epoch: 0 },
    ] {
        let name = format!("{op:?}");
        let name = name.split(' ').next().unwrap_or_default();
        let row = format!("|  {} | `{}`", op.code(), name);
        assert!(FORMAT_MD.contains(&row), "FORMAT.md lacks {row:?}");
    }
    for fact in [
        format!("`{}`", FORMAT_VERSION),
        "16 777 216".to_string(),
        "`0xE3069283`".to_string(),
        "`0x2D06800538D394C2`".to_string(),
    ] {
        assert!(FORMAT_MD.contains(&fact), "FORMAT.md lacks {fact:?}");
    }
    assert_eq!(MAX_BODY_LEN, 16_777_216);
    assert_eq!(MAGIC, *b"FTLG");
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(digest(b""), 0x2D06_8005_38D3_94C2);
}
