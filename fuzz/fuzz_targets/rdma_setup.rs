//! Arbitrary bytes as an RDMA set-up message (both roles), an ACK block and a doorbell seal —
//! whatever decodes encodes back to its bytes — then as operations on a backup's ring that a
//! model primary, torn writes, arbitrary words and lying seals write into: the seal scanning
//! never panics, never moves the head back, past the ring's room, or without a seal that holds
//! over the ring's bytes (`transport::fuzz::rdma_setup`, whose corpus test runs the same check
//! on stable). Seeds: `fuzz/seeds/rdma_setup/`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(v) = transport::fuzz::rdma_setup::check(data) {
        panic!("{v}");
    }
});
