//! Property tests: arbitrary entries survive encode → decode unchanged, and a writer that runs
//! out of buffer stops cleanly with a decodable frame.

mod common;

use common::{borrow_all, OwnedEntry, OwnedEvent};
use logfmt::{
    encode_frame, frames, peek_frame_len, ControlOp, EncodeError, FrameBuf, FrameView, FrameWriter,
    Position, FRAME_HEADER_LEN,
};
use proptest::prelude::*;

fn data() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..32),
        1 => proptest::collection::vec(any::<u8>(), 0..600),
    ]
}

fn control_op() -> impl Strategy<Value = ControlOp> {
    prop_oneof![
        Just(ControlOp::GoLive),
        Just(ControlOp::Shutdown),
        any::<u64>().prop_map(|new_epoch| ControlOp::EpochChange { new_epoch }),
    ]
}

fn event() -> impl Strategy<Value = OwnedEvent> {
    prop_oneof![
        (any::<u16>(), data()).prop_map(|(d, v)| OwnedEvent::DeviceInput(d, v)),
        any::<u64>().prop_map(OwnedEvent::Clock),
        data().prop_map(OwnedEvent::Random),
        any::<u8>().prop_map(OwnedEvent::Interrupt),
        (any::<u16>(), any::<u32>(), any::<u64>())
            .prop_map(|(d, l, h)| OwnedEvent::OutputMarker(d, l, h)),
        any::<u64>().prop_map(OwnedEvent::Heartbeat),
        control_op().prop_map(OwnedEvent::Control),
    ]
}

fn entry() -> impl Strategy<Value = OwnedEntry> {
    (any::<u64>(), proptest::option::of(any::<u64>()), event()).prop_map(|(exit, insn, event)| {
        OwnedEntry {
            position: Position { exit, insn },
            event,
        }
    })
}

fn entries() -> impl Strategy<Value = Vec<OwnedEntry>> {
    proptest::collection::vec(entry(), 0..40)
}

/// A first sequence number, biased towards the top of the range, for which `n` entries fit.
fn first_seq_for(n: usize) -> impl Strategy<Value = u64> {
    let top = u64::MAX - n.saturating_sub(1) as u64;
    prop_oneof![0..=top, (top - 3)..=top]
}

proptest! {
    #[test]
    fn encode_decode_round_trip(
        (owned, first_seq) in entries().prop_flat_map(|e| { let n = e.len(); (Just(e), first_seq_for(n)) }),
        epoch in any::<u64>(),
    ) {
        let entries = borrow_all(&owned);
        let frame = encode_frame(epoch, first_seq, &entries).expect("encodes");
        let expected_len = FRAME_HEADER_LEN + entries.iter().map(|e| e.encoded_len()).sum::<usize>();
        prop_assert_eq!(frame.len(), expected_len);
        prop_assert_eq!(peek_frame_len(&frame), Ok(frame.len()));

        let (view, consumed) = FrameView::parse(&frame).expect("decodes");
        prop_assert_eq!(consumed, frame.len());
        prop_assert_eq!(view.epoch(), epoch);
        prop_assert_eq!(view.first_seq(), first_seq);
        prop_assert_eq!(view.entry_count() as usize, entries.len());
        let decoded: Vec<_> = view.entries_with_seq().collect();
        let expected: Vec<_> = entries.iter().enumerate().map(|(i, e)| (first_seq + i as u64, *e)).collect();
        prop_assert_eq!(&decoded, &expected);
        prop_assert_eq!(view.last_seq(), decoded.last().map(|(s, _)| *s));

        // Decoding is canonical: re-encoding the decoded entries gives the same bytes.
        let decoded_entries: Vec<_> = view.entries().collect();
        prop_assert_eq!(encode_frame(epoch, first_seq, &decoded_entries).expect("re-encodes"), frame);
    }

    #[test]
    fn buffer_full_stops_cleanly(owned in entries(), buf_len in 0usize..1500, epoch in any::<u64>()) {
        let entries = borrow_all(&owned);
        let mut buf = vec![0xA5; buf_len];
        let mut writer = match FrameWriter::new(&mut buf, epoch, 7) {
            Ok(w) => w,
            Err(e) => {
                prop_assert!(buf_len < FRAME_HEADER_LEN);
                prop_assert_eq!(e, EncodeError::BufferFull { needed: FRAME_HEADER_LEN, available: buf_len });
                return Ok(());
            }
        };
        let mut pushed = 0;
        for entry in &entries {
            let (len_before, count_before) = (writer.len(), writer.entry_count());
            match writer.push(entry) {
                Ok(()) => pushed += 1,
                Err(e) => {
                    // The entry really did not fit, and the writer is untouched.
                    prop_assert_eq!(e, EncodeError::BufferFull {
                        needed: entry.encoded_len(),
                        available: buf_len - len_before,
                    });
                    prop_assert!(entry.encoded_len() > buf_len - len_before);
                    prop_assert_eq!((writer.len(), writer.entry_count()), (len_before, count_before));
                    break;
                }
            }
        }
        let len = writer.finish().expect("finishes");
        let (view, consumed) = FrameView::parse(&buf[..len]).expect("finished frame decodes");
        prop_assert_eq!(consumed, len);
        prop_assert_eq!(view.entries().collect::<Vec<_>>(), entries[..pushed].to_vec());
        // The bytes after the frame were not written.
        prop_assert!(buf[len..].iter().all(|&b| b == 0xA5));
    }

    /// The producer loop the transport runs: push into a reusable frame buffer, and when it is
    /// full, finish the frame, ship it, and continue in a fresh frame.
    #[test]
    fn producer_loop_splits_into_frames(owned in entries(), capacity in 700usize..2000) {
        let entries = borrow_all(&owned);
        let mut stream = Vec::new();
        let mut frame = FrameBuf::new(capacity);
        frame.reset(1, 1);
        for (seq, entry) in (1u64..).zip(&entries) {
            if let Err(e) = frame.push(entry) {
                prop_assert!(matches!(e, EncodeError::BufferFull { .. }), "{e:?}");
                prop_assert!(!frame.is_empty(), "entries are smaller than the buffer");
                stream.extend_from_slice(frame.finish().expect("finishes"));
                frame.reset(1, seq);
                frame.push(entry).expect("fits in an empty frame");
            }
        }
        if !frame.is_empty() {
            stream.extend_from_slice(frame.finish().expect("finishes"));
        }
        let mut decoded = Vec::new();
        for frame in frames(&stream) {
            let frame = frame.expect("every frame decodes");
            decoded.extend(frame.entries_with_seq());
        }
        let expected: Vec<_> = entries.iter().enumerate().map(|(i, e)| (1 + i as u64, *e)).collect();
        prop_assert_eq!(decoded, expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok((view, consumed)) = FrameView::parse(&bytes) {
            prop_assert_eq!(view.as_bytes(), &bytes[..consumed]);
        }
    }
}
