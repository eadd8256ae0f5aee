//! Cross-crate: log frames encoded by `logfmt` straight into `transport` ring memory (no
//! intermediate buffer), consumed and validated on the other side; a frame damaged in the ring
//! is refused whole.

use logfmt::{Entry, Event, FrameView, FrameWriter, Position};
use transport::ring;

fn entry(i: u64, data: &[u8]) -> Entry<'_> {
    Entry::new(Position::at_exit(i), Event::DeviceInput { device: 1, data })
}

#[test]
fn frames_encoded_in_ring_memory_decode_on_the_consumer_side() {
    let (mut producer, mut consumer) = ring::heap(1 << 16).expect("ring");
    let payload = [7u8; 100];
    let mut seq = 1u64;
    for batch in 0..200u64 {
        let n = 1 + batch % 9;
        let frame_len = logfmt::FRAME_HEADER_LEN
            + (0..n)
                .map(|i| entry(seq + i, &payload).encoded_len())
                .sum::<usize>();
        let slot = producer.try_reserve(frame_len).expect("room");
        let mut writer = FrameWriter::new(slot, 9, seq).expect("writer");
        for i in 0..n {
            writer.push(&entry(seq + i, &payload)).expect("push");
        }
        assert_eq!(writer.finish().expect("finish"), frame_len);
        producer.commit();
        seq += n;

        let mut expected = seq - n;
        consumer
            .consume(usize::MAX, |bytes| {
                let (frame, len) = FrameView::parse(bytes).expect("valid frame");
                assert_eq!(len, bytes.len());
                assert_eq!(frame.epoch(), 9);
                for (s, e) in frame.entries_with_seq() {
                    assert_eq!(s, expected);
                    assert_eq!(e, entry(expected, &payload));
                    expected += 1;
                }
            })
            .expect("consume");
        assert_eq!(expected, seq);
    }
}

#[test]
fn a_frame_damaged_in_the_ring_is_refused_whole() {
    let (mut producer, mut consumer) = ring::heap(4096).expect("ring");
    let frame = logfmt::encode_frame(1, 1, &[entry(1, b"abc"), entry(2, b"defg")]).expect("encode");
    let slot = producer.try_reserve(frame.len()).expect("room");
    slot.copy_from_slice(&frame);
    slot[logfmt::FRAME_HEADER_LEN + 20] ^= 0x40;
    producer.commit();
    let record = consumer.read().expect("read").expect("record");
    assert!(matches!(
        FrameView::parse(record),
        Err(logfmt::DecodeError::CrcMismatch { .. })
    ));
}
