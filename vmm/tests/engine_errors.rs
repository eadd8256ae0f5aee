//! The run loop's error paths with a real KVM guest: a guest that triple-faults, and a log that
//! does not fit the guest, each end the run with a clear, typed error.

use vmm::engine::{self, EngineError, EventSource};
use vmm::layout::DEFAULT_MEM_SIZE;
use vmm::vm::{Vm, GUEST_IMAGE};

fn new_vm() -> Vm {
    Vm::new(DEFAULT_MEM_SIZE, GUEST_IMAGE)
        .unwrap_or_else(|e| panic!("these tests boot a real guest and need KVM: {e}"))
}

/// A test double source: no requests, fixed clock and random values, counts exits; `vector`
/// is "delivered" at every exit.
struct Quiet {
    stop_at: u64,
    vector: u8,
}

impl EventSource for Quiet {
    fn should_stop(&mut self, exit: u64) -> Result<bool, EngineError> {
        Ok(exit >= self.stop_at)
    }
    fn interrupts(&mut self, _exit: u64, out: &mut Vec<u8>) -> Result<(), EngineError> {
        out.push(self.vector);
        Ok(())
    }
    fn net_rx(&mut self, _exit: u64, _buf: &mut Vec<u8>) -> Result<(), EngineError> {
        Ok(())
    }
    fn clock(&mut self, _exit: u64) -> Result<u64, EngineError> {
        Ok(0)
    }
    fn random(&mut self, _exit: u64) -> Result<[u8; 16], EngineError> {
        Ok([0; 16])
    }
    fn output(&mut self, _exit: u64, _device: u16, _bytes: &[u8]) -> Result<(), EngineError> {
        Ok(())
    }
    fn wake(&mut self, _exit: u64, _rx: &mut Vec<u8>) -> Result<Option<u8>, EngineError> {
        Ok(Some(vmm::layout::TIMER_VECTOR))
    }
}

#[test]
fn a_triple_faulting_guest_is_reported_with_its_exit() {
    let mut vm = new_vm();
    // `ud2` at the entry point: with no IDT the #UD escalates to a triple fault.
    vm.write_bytes(vm.entry(), &[0x0f, 0x0b]).expect("patch");
    let err = engine::run(
        &mut vm,
        &mut Quiet {
            stop_at: 10,
            vector: 32,
        },
        1,
    )
    .expect_err("the guest crashes");
    assert!(
        matches!(err, EngineError::GuestCrashed { exit: 1 }),
        "{err:?}"
    );
    assert!(err.to_string().contains("triple fault"), "{err}");
}

#[test]
fn a_logged_interrupt_vector_outside_the_abi_is_a_malformed_log() {
    let mut vm = new_vm();
    let err = engine::run(
        &mut vm,
        &mut Quiet {
            stop_at: 10,
            vector: 7,
        },
        1,
    )
    .expect_err("refused");
    assert!(
        matches!(err, EngineError::MalformedLog { exit: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn the_source_decides_where_the_run_stops() {
    let mut vm = new_vm();
    let run = engine::run(
        &mut vm,
        &mut Quiet {
            stop_at: 25,
            vector: 32,
        },
        1,
    )
    .expect("runs");
    assert_eq!(run.exits, 24);
    assert!(!run.guest_halted);
}
