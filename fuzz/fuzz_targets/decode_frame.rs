//! Decodes arbitrary bytes as a frame; an accepted frame must re-encode to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod check;

fuzz_target!(|data: &[u8]| check::check(data));
