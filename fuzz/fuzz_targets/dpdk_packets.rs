//! Arbitrary bytes as a list of packets (arbitrary ones, and genuine packets of a known stream
//! of log frames by index) fed to the DPDK backup's classifier and reassembly: no panic;
//! garbage counted and never delivered; every frame handed out made of pieces that came with
//! the link tag, unaltered, with sequence numbers 1, 2, 3, …; and while only genuine packets
//! pass the tag, exactly a prefix of the genuine frames (`transport::fuzz::dpdk_packets`, whose
//! corpus test runs the same check on stable). Seeds: `fuzz/seeds/dpdk_packets/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = transport::fuzz::dpdk_packets::check(data) {
        panic!("{v}");
    }
});
