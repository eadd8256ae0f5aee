//! Arbitrary bytes as an arbiter-server request, answer and decision-log record: decoding
//! never panics and what decodes encodes back to exactly its bytes
//! (`ft_arbiter::server::fuzz`, whose corpus test runs the same check on stable).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = ft_arbiter::server::fuzz::check(data) {
        panic!("{v}");
    }
});
