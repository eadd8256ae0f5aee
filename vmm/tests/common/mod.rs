//! What the KVM guest tests share: a VM that insists on KVM, and a scripted device.

#![allow(dead_code)] // Each test file uses its own part.

use std::collections::VecDeque;

use vmm::layout::{
    CLOCK_NS_ADDR, NET_BUF_LEN, NET_RX_VECTOR, OP_CLOCK, OP_HALT, OP_NET_RX, OP_NET_TX, OP_RANDOM,
    OP_RESULT_ADDR, PENDING_IRQS_ADDR, RANDOM_ADDR, RX_BUF_ADDR, RX_LEN_ADDR, RX_SHUTDOWN,
    TIMER_IRQ_BIT, TIMER_VECTOR, TX_BUF_ADDR, TX_LEN_ADDR,
};
use vmm::vm::{Vm, VmError, VmExit};

pub fn new_vm(mem_size: usize, image: &[u8]) -> Vm {
    match Vm::new(mem_size, image) {
        Ok(vm) => vm,
        Err(e @ VmError::KvmOpen(_)) => panic!("these tests boot a real guest and need KVM: {e}"),
        Err(e) => panic!("cannot create the VM: {e}"),
    }
}

/// A scripted device: answers each hypercall from fixed inputs and collects the outputs.
#[derive(Default)]
pub struct Device {
    pub requests: VecDeque<Vec<u8>>,
    /// CLOCK returns `clock_base + clock_step * n` for the n-th CLOCK (from 0).
    pub clock_base: u64,
    pub clock_step: u64,
    pub clocks: u64,
    /// RANDOM's bytes; with `random_counts`, their first 8 bytes are replaced by `n + 1` (LE)
    /// for the n-th RANDOM (from 0).
    pub random: [u8; 16],
    pub random_counts: bool,
    pub randoms: u64,
    /// Raise the timer interrupt at these exit numbers (1-based).
    pub timer_at: Vec<u64>,
    /// Ask the guest to halt at the first NET_RX after the requests run out.
    pub shutdown_when_idle: bool,
    /// Return [`Stop::Idle`] at the first NET_RX after the requests run out.
    pub stop_when_idle: bool,
    pub responses: Vec<Vec<u8>>,
    /// Waits (`hlt` with interrupts enabled) the guest made, and how many of them a request
    /// ended (network-receive interrupt) rather than a timer tick.
    pub waits: u64,
    pub woken_by_request: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The exit budget ran out.
    Budget,
    /// The guest issued HALT with this op_result.
    Halted(u64),
    /// A NET_RX found no request left (with `stop_when_idle`).
    Idle,
}

impl Device {
    /// Runs `vm` until `max_exits` exits have been handled or the guest halts.
    pub fn drive(&mut self, vm: &mut Vm, max_exits: u64) -> Result<Stop, VmError> {
        for _ in 0..max_exits {
            let exit = vm.run()?;
            if let Some(stop) = self.respond(vm, exit)? {
                return Ok(stop);
            }
        }
        Ok(Stop::Budget)
    }

    /// Handles `exit`, the one `vm` just made; `Some` when the drive ends there.
    pub fn respond(&mut self, vm: &mut Vm, exit: VmExit) -> Result<Option<Stop>, VmError> {
        if self.timer_at.contains(&vm.exit_count()) && !matches!(exit, VmExit::Halt) {
            if vm.interrupt_ready() {
                // A guest with an IDT and interrupts on: a real injected interrupt.
                vm.inject_interrupt(TIMER_VECTOR)?;
            } else {
                let pending = vm.read_u64(PENDING_IRQS_ADDR)?;
                vm.write_u64(PENDING_IRQS_ADDR, pending | TIMER_IRQ_BIT)?;
            }
        }
        match exit {
            // The guest waits for an interrupt: the next request wakes it (as the engine does,
            // the request goes into the receive buffer and vector 33 is injected); with none
            // left, a timer tick, so that it polls NET_RX again (and meets a shutdown there).
            VmExit::Halt if vm.interrupt_ready() => {
                self.waits += 1;
                match self.requests.pop_front() {
                    Some(req) => {
                        vm.write_bytes(RX_BUF_ADDR, &req)?;
                        vm.write_u32(RX_LEN_ADDR, req.len() as u32)?;
                        vm.inject_interrupt(NET_RX_VECTOR)?;
                        self.woken_by_request += 1;
                    }
                    None => {
                        if self.stop_when_idle {
                            return Ok(Some(Stop::Idle));
                        }
                        vm.write_u32(RX_LEN_ADDR, 0)?;
                        vm.inject_interrupt(TIMER_VECTOR)?;
                    }
                }
            }
            VmExit::Hypercall { op: OP_NET_RX } => match self.requests.pop_front() {
                Some(req) => {
                    vm.write_bytes(RX_BUF_ADDR, &req)?;
                    vm.write_u32(RX_LEN_ADDR, req.len() as u32)?;
                }
                None => {
                    vm.write_u32(RX_LEN_ADDR, 0)?;
                    if self.stop_when_idle {
                        return Ok(Some(Stop::Idle));
                    }
                    if self.shutdown_when_idle {
                        vm.write_u64(OP_RESULT_ADDR, RX_SHUTDOWN)?;
                    }
                }
            },
            VmExit::Hypercall { op: OP_CLOCK } => {
                let t = self.clock_base + self.clock_step * self.clocks;
                self.clocks += 1;
                vm.write_u64(CLOCK_NS_ADDR, t)?;
            }
            VmExit::Hypercall { op: OP_RANDOM } => {
                let mut r = self.random;
                if self.random_counts {
                    r[..8].copy_from_slice(&(self.randoms + 1).to_le_bytes());
                }
                self.randoms += 1;
                vm.write_bytes(RANDOM_ADDR, &r)?;
            }
            VmExit::Hypercall { op: OP_NET_TX } => {
                let len = vm.read_u32(TX_LEN_ADDR)? as usize;
                assert!(len <= NET_BUF_LEN, "tx_len {len} too large");
                let mut out = vec![0; len];
                vm.read_bytes(TX_BUF_ADDR, &mut out)?;
                self.responses.push(out);
            }
            VmExit::Hypercall { op: OP_HALT } => {
                return Ok(Some(Stop::Halted(vm.read_u64(OP_RESULT_ADDR)?)));
            }
            other => panic!("unexpected exit #{}: {other:?}", vm.exit_count()),
        }
        Ok(None)
    }
}
