//! The properties both fuzz targets check on every input.

use logfmt::{encode_frame, FrameHeader, FrameView, FrameWriter};

/// Decodes `data` and checks everything that must hold for any input:
///
/// - decoding never panics;
/// - an accepted frame's entries re-encode to exactly the accepted bytes (with both the
///   allocating encoder and `FrameWriter` into an exact-size buffer), its sequence numbers are
///   contiguous from `first_seq`, and the header-only check agrees on its length;
/// - a rejected frame whose header is already bad is rejected with the header-only error.
pub fn check(data: &[u8]) {
    let header = FrameHeader::parse(data);
    match FrameView::parse(data) {
        Ok((view, consumed)) => {
            assert_eq!(header.map(|h| h.frame_len()), Ok(consumed));
            assert_eq!(view.as_bytes(), &data[..consumed]);

            let entries: Vec<_> = view.entries().collect();
            assert_eq!(entries.len(), view.entry_count() as usize);
            let mut expected_seq = view.first_seq();
            let mut last = None;
            for (seq, entry) in view.entries_with_seq() {
                assert_eq!(seq, expected_seq);
                assert_eq!(Some(&entry), entries.get((seq - view.first_seq()) as usize));
                last = Some(seq);
                expected_seq = expected_seq.wrapping_add(1);
            }
            assert_eq!(last, view.last_seq());

            let again = encode_frame(view.epoch(), view.first_seq(), &entries)
                .expect("accepted entries re-encode");
            assert_eq!(again, &data[..consumed], "re-encoded frame differs");

            let mut buf = vec![0; consumed];
            let mut writer =
                FrameWriter::new(&mut buf, view.epoch(), view.first_seq()).expect("header fits");
            for entry in &entries {
                writer
                    .push(entry)
                    .expect("entry fits in an exact-size buffer");
            }
            assert_eq!(writer.finish(), Ok(consumed));
            assert_eq!(buf, &data[..consumed]);
        }
        Err(e) => {
            if let Err(header_error) = header {
                assert_eq!(e, header_error);
            }
            // Formatting must not panic either.
            let _ = e.to_string();
        }
    }
}
