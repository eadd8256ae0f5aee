//! Arbitrary bytes as the log medium's stream after the handshake, read by a backup whose
//! channel authenticates every frame: no panic, no hang, and nothing delivered but the genuine
//! frames sealed with the session key, each once and in order (`transport::fuzz::log_stream`,
//! whose corpus test runs the same check on stable). Seed: `log_stream::seed()` (the fuzzer
//! starts from it when run with `-seed_inputs` or a corpus holding it; see `scripts/fuzz.sh`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = transport::fuzz::log_stream::check(data) {
        panic!("{v}");
    }
});
