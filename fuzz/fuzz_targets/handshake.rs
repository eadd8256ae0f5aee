//! Arbitrary bytes as the peer's half of the channel handshake, to a backup and to a primary:
//! neither side ever accepts (the bytes cannot hold a MAC over the nonce it just drew), panics
//! or hangs (`transport::fuzz`, whose corpus test runs the same checks on stable).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = transport::fuzz::check_backup(data) {
        panic!("{v}");
    }
    if let Err(v) = transport::fuzz::check_primary(data) {
        panic!("{v}");
    }
});
