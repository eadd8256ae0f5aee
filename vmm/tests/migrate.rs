//! Live state transfer on real KVM: a guest running the key-value service is copied to a fresh
//! VM while it serves requests (pre-copy over KVM's dirty log), stopped at an exit boundary for
//! the switch-over, and then both VMs, fed the same inputs, must answer alike and end with
//! equal memory — which proves the transferred state complete (memory, vCPU, device state).
//! And a stream that is corrupted, cut short or meant for another guest is refused.
//!
//! The "device" here is a test double: a scripted request generator and a counter clock,
//! carried across in the DEVICE chunk.

use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use vmm::kv::{KV_INCR, KV_PUT};
use vmm::layout::{
    CLOCK_NS_ADDR, NET_BUF_LEN, NET_RX_VECTOR, OP_CLOCK, OP_NET_RX, OP_NET_TX, OP_RANDOM,
    RANDOM_ADDR, RX_BUF_ADDR, RX_LEN_ADDR, TX_BUF_ADDR, TX_LEN_ADDR,
};
use vmm::migrate::sink::{restore, Expect};
use vmm::migrate::source::{Precopy, PrecopyConfig};
use vmm::migrate::stream::{ChunkReader, ChunkWriter, Header};
use vmm::migrate::{image_digest, MigrateError};
use vmm::vm::{Vm, VmExit, GUEST_IMAGE};

const SESSION: u64 = 77;

/// Test double of the devices: request `n` is a PUT or INCR on one of 40 keys, the clock
/// counts, random bytes are fixed; every 7th request is not there at the guest's NET_RX, so it
/// waits in `hlt` and the request wakes it (network-receive interrupt, as the engine does). Its
/// state is two counters and whether the guest was left waiting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Script {
    next_request: u64,
    clocks: u64,
    /// The last NET_RX found nothing: the guest is about to wait (or waits).
    idled: bool,
    /// The last exit handled was a NET_RX that handed the guest a request (written into the
    /// RX buffer by the VMM, not the guest: KVM's dirty log does not see it).
    just_received: bool,
    /// The last exit handled was a wait that a request ended: its interrupt is injected but not
    /// yet taken (it is in the vCPU's pending events).
    just_woken: bool,
}

impl Script {
    fn request(&self) -> Vec<u8> {
        let n = self.next_request;
        let key = format!("key-{}", n % 40);
        let (op, val): (u8, Vec<u8>) = if n.is_multiple_of(3) {
            (KV_INCR, Vec::new())
        } else {
            (KV_PUT, (0..(n % 60 + 1)).map(|i| (n + i) as u8).collect())
        };
        let mut r = Vec::new();
        r.extend_from_slice(&(n as u32 + 1).to_le_bytes());
        r.push(op);
        r.push(key.len() as u8);
        r.extend_from_slice(&(val.len() as u16).to_le_bytes());
        r.extend_from_slice(key.as_bytes());
        r.extend_from_slice(&val);
        r
    }

    fn encode(&self) -> Vec<u8> {
        [
            self.next_request.to_le_bytes(),
            self.clocks.to_le_bytes(),
            u64::from(self.idled).to_le_bytes(),
        ]
        .concat()
    }

    fn decode(b: &[u8]) -> Script {
        let w = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        Script {
            next_request: w(0),
            clocks: w(8),
            idled: w(16) != 0,
            just_received: false,
            just_woken: false,
        }
    }

    /// Handles exits until `exits` more were handled (each one completely) or `stop` is set;
    /// returns the responses.
    fn drive(&mut self, vm: &mut Vm, exits: u64, stop: Option<&AtomicBool>) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for _ in 0..exits {
            if stop.is_some_and(|s| s.load(Ordering::Acquire)) {
                break;
            }
            self.just_received = false;
            self.just_woken = false;
            match vm.run().expect("run") {
                VmExit::Hypercall { op: OP_NET_RX }
                    if self.next_request % 7 == 3 && !self.idled =>
                {
                    self.idled = true;
                    vm.write_u32(RX_LEN_ADDR, 0).expect("rx len");
                }
                VmExit::Hypercall { op: OP_NET_RX } => {
                    self.just_received = true;
                    self.idled = false;
                    let req = self.request();
                    self.next_request += 1;
                    vm.write_bytes(RX_BUF_ADDR, &req).expect("rx");
                    vm.write_u32(RX_LEN_ADDR, req.len() as u32).expect("rx len");
                }
                VmExit::Halt => {
                    assert!(
                        self.idled && vm.interrupt_ready(),
                        "a wait after an empty NET_RX"
                    );
                    self.just_woken = true;
                    self.idled = false;
                    let req = self.request();
                    self.next_request += 1;
                    vm.write_bytes(RX_BUF_ADDR, &req).expect("rx");
                    vm.write_u32(RX_LEN_ADDR, req.len() as u32).expect("rx len");
                    vm.inject_interrupt(NET_RX_VECTOR).expect("inject");
                }
                VmExit::Hypercall { op: OP_CLOCK } => {
                    self.clocks += 1;
                    vm.write_u64(CLOCK_NS_ADDR, self.clocks * 1000)
                        .expect("clock");
                }
                VmExit::Hypercall { op: OP_RANDOM } => {
                    vm.write_bytes(RANDOM_ADDR, &[7; 16]).expect("random")
                }
                VmExit::Hypercall { op: OP_NET_TX } => {
                    let len = vm.read_u32(TX_LEN_ADDR).expect("tx len") as usize;
                    assert!(len <= NET_BUF_LEN);
                    let mut r = vec![0; len];
                    vm.read_bytes(TX_BUF_ADDR, &mut r).expect("tx");
                    out.push(r);
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        out
    }
}

fn header(mem_size: usize) -> Header {
    Header {
        mem_size: mem_size as u64,
        image_digest: image_digest(GUEST_IMAGE),
        session: SESSION,
        epoch: 3,
    }
}

fn expect(mem_size: usize) -> Expect {
    Expect {
        mem_size: mem_size as u64,
        image_digest: image_digest(GUEST_IMAGE),
        session: SESSION,
        min_epoch: 1,
    }
}

/// Moves a guest that keeps serving during the rounds, stopped right after a NET_RX handed it a
/// request or (`at_wake`) right after a request ended a wait, with its interrupt still pending;
/// returns (rounds, pages, bytes, pause ms).
fn live_transfer(mem_mib: usize, at_wake: bool) -> (usize, u64, u64, f64, f64) {
    let mem = mem_mib << 20;
    let mut src = Vm::new(mem, GUEST_IMAGE).expect("source VM (needs /dev/kvm)");
    let mut script = Script::default();
    script.drive(&mut src, 2_000, None);
    let log = src.dirty_log().expect("dirty log");
    let (tx_sock, rx_sock) = UnixStream::pair().expect("socket pair");

    // The joiner: a fresh VM of the same image and size, restored from the socket.
    let joiner = std::thread::spawn(move || {
        let mut vm = Vm::new(mem, GUEST_IMAGE).expect("joiner VM");
        let mut r = ChunkReader::new(BufReader::with_capacity(1 << 20, rx_sock));
        let restored = restore(&mut r, &mut vm, &expect(mem)).expect("restore");
        (vm, restored)
    });

    // The copier: rounds while the vCPU runs, then the switch-over with the state the vCPU
    // thread hands it.
    let switch = Arc::new(AtomicBool::new(false));
    let (state_tx, state_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel();
    let copier = {
        let switch = switch.clone();
        std::thread::spawn(move || {
            let mut w = ChunkWriter::new(BufWriter::with_capacity(1 << 20, tx_sock));
            let mut pre = Precopy::new(log, PrecopyConfig::default());
            let started = Instant::now();
            pre.run(&mut w, &header(mem), || true).expect("rounds");
            switch.store(true, Ordering::Release);
            let (state, device, regs): (vmm::migrate::state::VcpuState, Vec<u8>, u64) =
                state_rx.recv().expect("the vCPU's state");
            let fin = pre.finish(&mut w, &state, &device, regs).expect("finish");
            done_tx.send(()).expect("done");
            let total_ms = started.elapsed().as_secs_f64() * 1e3;
            (pre.rounds().to_vec(), fin, w.bytes(), total_ms)
        })
    };

    // The vCPU thread (this one): serves until the copier asks for the switch-over.
    let mut served = 0;
    while !switch.load(Ordering::Acquire) {
        served += script.drive(&mut src, 200, Some(&switch)).len();
    }
    // Stop right after the VMM handed the guest a request: the page it wrote must go too (and
    // at a wake-up, the injected interrupt the guest has not taken yet).
    while !(if at_wake {
        script.just_woken
    } else {
        script.just_received
    }) {
        served += script.drive(&mut src, 1, None).len();
    }
    let paused = Instant::now();
    let state = src.vcpu_state().expect("vCPU state");
    if at_wake {
        // The network-receive interrupt is injected but not taken: it must travel with the
        // vCPU's events, or the joiner's guest would never run its handler.
        let irq = state.events.interrupt;
        assert_eq!(
            (irq.injected, irq.nr),
            (1, NET_RX_VECTOR),
            "the pending interrupt is in the state sent"
        );
    }
    let regs = src.registers_digest().expect("registers");
    state_tx
        .send((state, script.encode(), regs))
        .expect("hand over");
    done_rx.recv().expect("switch-over sent");
    let pause_ms = paused.elapsed().as_secs_f64() * 1e3;
    let (rounds, fin, bytes, total_ms) = copier.join().expect("copier");
    let (mut dst, restored) = joiner.join().expect("joiner");
    assert!(served > 0, "the guest served while its memory was copied");
    assert_eq!(restored.pages_digest, fin.pages_digest);
    assert_eq!(restored.exits, src.exit_count());
    let mut dst_script = Script::decode(&restored.device);
    script.just_received = false;
    script.just_woken = false;
    assert_eq!(dst_script, script, "device state carried across");

    // Both go on with the same inputs: same answers, same memory, same registers.
    let a = script.drive(&mut src, 3_000, None);
    let b = dst_script.drive(&mut dst, 3_000, None);
    assert!(!a.is_empty());
    assert_eq!(a, b, "the joined VM answers exactly as the original");
    assert_eq!(src.memory_hash(), dst.memory_hash(), "memory equal");
    assert_eq!(
        src.registers_digest().expect("regs"),
        dst.registers_digest().expect("regs")
    );
    let pages: u64 = rounds.iter().map(|r| r.pages).sum::<u64>() + fin.pages;
    (rounds.len(), pages, bytes, pause_ms, total_ms)
}

#[test]
fn a_serving_guest_moves_to_a_fresh_vm_and_both_go_on_alike() {
    for (mib, at_wake) in [(16, false), (16, true), (256, false)] {
        let (rounds, pages, bytes, pause_ms, total_ms) = live_transfer(mib, at_wake);
        println!(
            "{mib} MiB (stopped at a wake-up: {at_wake}): {rounds} pre-copy rounds, {pages} pages sent, {:.1} MiB on the wire, \
             pause {pause_ms:.2} ms, total {total_ms:.1} ms",
            bytes as f64 / (1 << 20) as f64
        );
    }
}

/// A complete stream of a guest stopped after some requests (captured to memory).
fn captured(mem: usize) -> Vec<u8> {
    let mut vm = Vm::new(mem, GUEST_IMAGE).expect("VM");
    let mut script = Script::default();
    script.drive(&mut vm, 500, None);
    let log = vm.dirty_log().expect("dirty log");
    let mut w = ChunkWriter::new(Vec::new());
    let mut pre = Precopy::new(log, PrecopyConfig::default());
    pre.run(&mut w, &header(mem), || true).expect("rounds");
    let state = vm.vcpu_state().expect("state");
    let regs = vm.registers_digest().expect("regs");
    pre.finish(&mut w, &state, &script.encode(), regs)
        .expect("finish");
    drop(pre);
    std::mem::take(w.get_mut())
}

fn load(bytes: &[u8], e: &Expect) -> Result<(), MigrateError> {
    let mut vm = Vm::new(e.mem_size as usize, GUEST_IMAGE).expect("VM");
    restore(&mut ChunkReader::new(bytes), &mut vm, e).map(|_| ())
}

#[test]
fn a_corrupted_truncated_or_foreign_stream_is_refused() {
    let mem = 8 << 20;
    let stream = captured(mem);
    load(&stream, &expect(mem)).expect("the intact stream loads");

    // A flipped byte anywhere in a chunk: its checksum says so.
    for at in [20, stream.len() / 2, stream.len() - 40] {
        let mut bad = stream.clone();
        bad[at] ^= 0x10;
        let e = load(&bad, &expect(mem)).expect_err("corrupt stream refused");
        assert!(
            matches!(
                e,
                MigrateError::Checksum { .. }
                    | MigrateError::BadMagic { .. }
                    | MigrateError::Malformed { .. }
                    | MigrateError::UnknownKind { .. }
            ),
            "byte {at}: {e}"
        );
    }
    // Cut short anywhere: a typed error.
    for cut in [0, 10, 100, stream.len() / 3, stream.len() - 1] {
        let e = load(&stream[..cut], &expect(mem)).expect_err("truncated stream refused");
        assert!(matches!(e, MigrateError::Truncated(_)), "cut at {cut}: {e}");
    }
    // Meant for another memory size, image or pair: refused naming both values.
    let mut other = expect(mem);
    other.mem_size = 16 << 20;
    let e = load(&stream, &other).expect_err("other memory size");
    let msg = e.to_string();
    assert!(
        msg.contains(&(8u64 << 20).to_string()) && msg.contains(&(16u64 << 20).to_string()),
        "{msg}"
    );
    let mut other = expect(mem);
    other.image_digest = [9; 32];
    let msg = load(&stream, &other).expect_err("other image").to_string();
    assert!(msg.contains("guest image") && msg.contains("0909"), "{msg}");
    let mut other = expect(mem);
    other.session = 5;
    let msg = load(&stream, &other).expect_err("other pair").to_string();
    assert!(msg.contains("77") && msg.contains('5'), "{msg}");
}

/// `Vm::zero_pages` (how a ZEROS chunk is loaded) leaves zeros where data was, touches nothing
/// else, and refuses a range past the end.
#[test]
fn zeroed_pages_read_back_as_zeros_and_out_of_range_is_refused() -> Result<(), vmm::vm::VmError> {
    const MEM: usize = 16 << 20;
    const PAGE: u64 = 4096;
    let fresh = Vm::new(MEM, GUEST_IMAGE)?;
    let mut vm = Vm::new(MEM, GUEST_IMAGE)?;
    vm.prefault().expect("prefault");
    assert_eq!(
        vm.memory_hash(),
        fresh.memory_hash(),
        "prefault changes nothing"
    );
    let first = 1000u64;
    vm.write_bytes(first * PAGE, &vec![0xa5; 3 * PAGE as usize])?;
    vm.write_bytes((first + 3) * PAGE, &[0x5a; 16])?;
    vm.zero_pages(first, 3)?;
    let mut buf = vec![0xffu8; 3 * PAGE as usize];
    vm.read_bytes(first * PAGE, &mut buf)?;
    assert!(
        buf.iter().all(|&b| b == 0),
        "zeroed pages read back as zeros"
    );
    let mut next = [0u8; 16];
    vm.read_bytes((first + 3) * PAGE, &mut next)?;
    assert_eq!(next, [0x5a; 16], "the page after the range is untouched");
    vm.zero_pages(first + 3, 1)?;
    assert_eq!(vm.memory_hash(), fresh.memory_hash());
    let pages = (MEM as u64) / PAGE;
    assert!(vm.zero_pages(pages - 1, 2).is_err());
    assert!(vm.zero_pages(u64::MAX / 2, 1).is_err());
    vm.zero_pages(pages - 1, 1)?;
    Ok(())
}
