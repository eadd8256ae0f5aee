//! Arbitrary bytes as a join's state stream: both readers (whole chunks, and pages read into
//! place as the joiner does) never panic, agree on what they accept, and what they accept is
//! canonical, the vCPU and device state inside included (`vmm::migrate::fuzz`, whose corpus
//! test runs the same check on stable). Seeds: `fuzz/seeds/join_stream/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = vmm::migrate::fuzz::check(data) {
        panic!("{v}");
    }
});
