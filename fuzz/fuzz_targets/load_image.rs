//! Arbitrary bytes as a guest image: loading and the determinism checker never panic, refuse
//! with a typed fault and write nothing, or load exactly the checked segments
//! (`vmm::image::fuzz::Harness::check`, which the corpus test in the vmm crate also runs).

#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use vmm::image::fuzz::Harness;

thread_local! {
    /// Guest memory is made once and zeroed again after each input.
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        let h = h.get_or_insert_with(|| Harness::new().expect("guest memory"));
        if let Err(violation) = h.check(data) {
            panic!("{violation}");
        }
    })
});
