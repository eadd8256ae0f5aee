//! Like `decode_frame`, but first overwrites the CRC with the correct one for the bytes as
//! given, so the fuzzer spends its time on the header and entry checks behind the CRC
//! instead of on guessing CRCs.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod check;

/// Byte range of the CRC field in the frame header.
const CRC: std::ops::Range<usize> = 36..40;

fuzz_target!(|data: &[u8]| {
    let mut frame = data.to_vec();
    if frame.len() >= logfmt::FRAME_HEADER_LEN {
        let body_len = u32::from_le_bytes([frame[28], frame[29], frame[30], frame[31]]) as usize;
        let end = (logfmt::FRAME_HEADER_LEN + body_len).min(frame.len());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&frame[..CRC.start]),
            &frame[logfmt::FRAME_HEADER_LEN..end],
        );
        frame[CRC].copy_from_slice(&crc.to_le_bytes());
    }
    check::check(&frame);
});
