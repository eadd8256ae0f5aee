//! Arbitrary bytes as a journal file: the reader never panics, ends cleanly exactly when the
//! whole file is accepted, hands out frames all-or-nothing as a prefix of the file with
//! continuous sequence numbers, every one canonical, and reads a damaged genuine journal up to
//! the damage (`vmm::journal::fuzz`, whose corpus test runs the same check on stable). Seeds:
//! `fuzz/seeds/journal/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = vmm::journal::fuzz::check(data) {
        panic!("{v}");
    }
});
