//! Arbitrary bytes on a front registration connection after its handshake, and arbitrary
//! datagrams from the front to its replica: the front takes only the genuine sealed messages
//! and the replica only genuine sealed requests, each once and in order
//! (`vmm::service::fuzz`, whose corpus test runs the same check on stable). Seeds:
//! `fuzz/seeds/front/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = vmm::service::fuzz::check(data) {
        panic!("{v}");
    }
});
