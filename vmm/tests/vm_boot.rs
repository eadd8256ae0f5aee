//! Boots the real guest program under KVM and drives it with a scripted "device".
//!
//! These tests need /dev/kvm; without it they fail with "cannot open /dev/kvm: … (is KVM
//! available?)".

mod common;

use std::collections::VecDeque;
use std::time::Instant;

use common::{new_vm, Device, Stop};

use vmm::kv::{KV_BAD_REQUEST, KV_GET, KV_INCR, KV_NOT_FOUND, KV_OK, KV_PUT, KV_SLOTS};
use vmm::layout::{DEFAULT_MEM_SIZE, HALT_OK, MIN_MEM_SIZE};
use vmm::vm::{VmError, VmExit, GUEST_IMAGE, GUEST_NONDET_IMAGE, GUEST_POLLING_IMAGE};

fn request(req_id: u32, op: u8, key: &[u8], val: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&req_id.to_le_bytes());
    r.push(op);
    r.push(key.len() as u8);
    r.extend_from_slice(&(val.len() as u16).to_le_bytes());
    r.extend_from_slice(key);
    r.extend_from_slice(val);
    r
}

fn response(req_id: u32, status: u8, val: &[u8], ts: u64, token: u64, ticks: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&req_id.to_le_bytes());
    r.push(status);
    r.push(0);
    r.extend_from_slice(&(val.len() as u16).to_le_bytes());
    r.extend_from_slice(&ts.to_le_bytes());
    r.extend_from_slice(&token.to_le_bytes());
    r.extend_from_slice(&ticks.to_le_bytes());
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(val);
    r
}

const RANDOM: [u8; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
const TOKEN: u64 = u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]);

fn put_get_device() -> Device {
    Device {
        requests: VecDeque::from([
            request(7, KV_PUT, b"hello", b"world"),
            request(8, KV_GET, b"hello", b""),
        ]),
        clock_base: 1_000,
        clock_step: 1_000,
        random: RANDOM,
        // Exit 1 is the first NET_RX: the guest sees the tick right after it.
        timer_at: vec![1],
        ..Default::default()
    }
}

#[test]
fn boots_and_serves_put_then_get() -> Result<(), VmError> {
    let mut vm = new_vm(DEFAULT_MEM_SIZE, GUEST_IMAGE);
    let mut dev = put_get_device();
    assert_eq!(dev.drive(&mut vm, 60)?, Stop::Budget);
    assert_eq!(vm.exit_count(), 60);
    assert_eq!(
        dev.responses,
        vec![
            response(7, KV_OK, b"", 1_000, TOKEN, 1),
            response(8, KV_OK, b"world", 2_000, TOKEN, 1),
        ]
    );
    // Exits: RX, CLOCK, RANDOM, TX for each request, then idle NET_RX only.
    assert_eq!(dev.clocks, 2);
    Ok(())
}

#[test]
fn get_missing_incr_and_ticks() -> Result<(), VmError> {
    let mut vm = new_vm(MIN_MEM_SIZE, GUEST_IMAGE);
    let mut dev = Device {
        requests: VecDeque::from([
            request(1, KV_GET, b"nope", b""),
            request(2, KV_INCR, b"ctr", b""),
            request(3, KV_INCR, b"ctr", b"ignored"),
            request(4, KV_PUT, b"short", b"abc"),
            request(5, KV_INCR, b"short", b""),
            request(6, KV_PUT, b"long", &[0xff, 0, 0, 0, 0, 0, 0, 0, 0xaa]),
            request(7, KV_INCR, b"long", b""),
            request(8, KV_GET, b"ctr", b""),
        ]),
        clock_base: 5,
        clock_step: 0,
        random: RANDOM,
        // Ticks at the RANDOM exit of request 2 and at two exits of request 3.
        timer_at: vec![7, 9, 10],
        ..Default::default()
    };
    assert_eq!(dev.drive(&mut vm, 40)?, Stop::Budget);
    let one = 1u64.to_le_bytes();
    let two = 2u64.to_le_bytes();
    let inc_long = 0x100u64.to_le_bytes();
    assert_eq!(
        dev.responses,
        vec![
            response(1, KV_NOT_FOUND, b"", 5, TOKEN, 0),
            response(2, KV_OK, &one, 5, TOKEN, 1),
            response(3, KV_OK, &two, 5, TOKEN, 3),
            response(4, KV_OK, b"", 5, TOKEN, 3),
            response(5, KV_OK, &one, 5, TOKEN, 3),
            response(6, KV_OK, b"", 5, TOKEN, 3),
            response(7, KV_OK, &inc_long, 5, TOKEN, 3),
            response(8, KV_OK, &two, 5, TOKEN, 3),
        ]
    );
    Ok(())
}

#[test]
fn malformed_requests_get_status_2() -> Result<(), VmError> {
    let mut vm = new_vm(MIN_MEM_SIZE, GUEST_IMAGE);
    let mut truncated = request(14, KV_PUT, b"key", b"value");
    truncated.pop();
    let mut dev = Device {
        requests: VecDeque::from([
            vec![9, 9, 9],                                               // shorter than a req_id
            vec![10, 0, 0, 0, KV_GET],                                   // shorter than a header
            request(11, KV_GET, b"", b""),                               // key_len 0
            request(12, KV_GET, &[b'k'; 33], b""),                       // key_len 33
            request(13, KV_PUT, b"k", &[0; 65]),                         // val_len 65
            truncated,                            // rx_len < header + key + value
            request(15, 9, b"k", b""),            // unknown op
            request(16, KV_PUT, b"key", b"fine"), // still serving afterwards
            [request(17, KV_GET, b"key", b""), vec![0xee; 10]].concat(), // trailing bytes ignored
        ]),
        clock_base: 42,
        random: RANDOM,
        ..Default::default()
    };
    assert_eq!(dev.drive(&mut vm, 60)?, Stop::Budget);
    let bad = |id| response(id, KV_BAD_REQUEST, b"", 42, TOKEN, 0);
    assert_eq!(
        dev.responses,
        vec![
            bad(0),
            bad(10),
            bad(11),
            bad(12),
            bad(13),
            bad(14),
            bad(15),
            response(16, KV_OK, b"", 42, TOKEN, 0),
            response(17, KV_OK, b"fine", 42, TOKEN, 0),
        ]
    );
    Ok(())
}

#[test]
fn full_table_answers_status_2() -> Result<(), VmError> {
    let mut vm = new_vm(MIN_MEM_SIZE, GUEST_IMAGE);
    let mut requests: VecDeque<Vec<u8>> = (0..=KV_SLOTS as u32)
        .map(|i| request(i, KV_PUT, format!("key-{i}").as_bytes(), b"v"))
        .collect();
    requests.push_back(request(1000, KV_GET, b"key-3", b""));
    requests.push_back(request(1001, KV_PUT, b"key-3", b"w"));
    let n = requests.len();
    let mut dev = Device {
        requests,
        random: RANDOM,
        ..Default::default()
    };
    assert_eq!(dev.drive(&mut vm, 4 * n as u64 + 1)?, Stop::Budget);
    assert_eq!(dev.responses.len(), n);
    for (i, r) in dev.responses.iter().take(KV_SLOTS).enumerate() {
        assert_eq!(r[4], KV_OK, "PUT #{i}");
    }
    assert_eq!(
        dev.responses[KV_SLOTS][4], KV_BAD_REQUEST,
        "PUT into a full table"
    );
    assert_eq!(dev.responses[KV_SLOTS + 1][4], KV_OK, "GET after full");
    assert_eq!(&dev.responses[KV_SLOTS + 1][32..], b"v");
    assert_eq!(
        dev.responses[KV_SLOTS + 2][4],
        KV_OK,
        "overwrite in a full table"
    );
    Ok(())
}

#[test]
fn shutdown_request_halts_the_guest() -> Result<(), VmError> {
    let mut vm = new_vm(MIN_MEM_SIZE, GUEST_IMAGE);
    let mut dev = put_get_device();
    dev.shutdown_when_idle = true;
    assert_eq!(dev.drive(&mut vm, 100)?, Stop::Halted(HALT_OK));
    assert_eq!(dev.responses.len(), 2);
    // After the HALT hypercall the guest parks in `hlt`.
    assert_eq!(vm.run()?, VmExit::Halt);
    Ok(())
}

#[test]
fn identical_inputs_give_identical_state_and_different_inputs_do_not() -> Result<(), VmError> {
    let mut a = new_vm(DEFAULT_MEM_SIZE, GUEST_IMAGE);
    let mut b = new_vm(DEFAULT_MEM_SIZE, GUEST_IMAGE);
    assert_eq!(
        a.memory_hash(),
        b.memory_hash(),
        "fresh VMs differ in memory"
    );
    assert_eq!(
        a.registers_digest()?,
        b.registers_digest()?,
        "fresh VMs differ in registers"
    );

    let mut da = put_get_device();
    let mut db = put_get_device();
    da.timer_at.push(6);
    db.timer_at.push(6);
    da.drive(&mut a, 41)?;
    db.drive(&mut b, 41)?;
    assert_eq!(da.responses, db.responses);
    assert_eq!(a.memory_hash(), b.memory_hash());
    assert_eq!(a.registers_digest()?, b.registers_digest()?);

    // Same script, but the second CLOCK answers differently: the hash must notice.
    let mut c = new_vm(DEFAULT_MEM_SIZE, GUEST_IMAGE);
    let mut dc = put_get_device();
    dc.timer_at.push(6);
    dc.clock_step = 1_001;
    dc.drive(&mut c, 41)?;
    assert_ne!(dc.responses, da.responses);
    assert_ne!(c.memory_hash(), a.memory_hash());
    Ok(())
}

#[test]
fn nondeterministic_guest_diverges() -> Result<(), VmError> {
    let mut a = new_vm(MIN_MEM_SIZE, GUEST_NONDET_IMAGE);
    let mut b = new_vm(MIN_MEM_SIZE, GUEST_NONDET_IMAGE);
    assert_eq!(a.memory_hash(), b.memory_hash());
    let mut da = put_get_device();
    let mut db = put_get_device();
    da.drive(&mut a, 20)?;
    db.drive(&mut b, 20)?;
    assert_eq!(da.responses.len(), 2);
    // The token has rdtsc mixed in; everything else matches.
    assert_ne!(da.responses, db.responses);
    assert_eq!(da.responses[1][..16], db.responses[1][..16]);
    assert_ne!(a.memory_hash(), b.memory_hash());
    Ok(())
}

#[test]
fn out_of_range_memory_access_is_an_error() {
    let vm = new_vm(MIN_MEM_SIZE, GUEST_IMAGE);
    let mut buf = [0; 8];
    assert!(vm.read_bytes(MIN_MEM_SIZE as u64 - 4, &mut buf).is_err());
    assert!(vm.write_bytes(MIN_MEM_SIZE as u64 - 4, &buf).is_err());
    assert!(vm.write_bytes(u64::MAX - 2, &buf).is_err());
    assert!(vm.read_bytes(MIN_MEM_SIZE as u64 - 8, &mut buf).is_ok());
}

/// Prints (does not assert) the cost of a hypercall exit and of a request.
#[test]
fn measure_exit_and_request_cost() -> Result<(), VmError> {
    // Idle loop: every exit is a NET_RX answered with rx_len 0 (~10 guest instructions between
    // exits).
    let mut vm = new_vm(DEFAULT_MEM_SIZE, GUEST_IMAGE);
    let mut idle = Device::default();
    idle.drive(&mut vm, 100)?; // warm up
    let exits = 20_000u64;
    let t = Instant::now();
    idle.drive(&mut vm, exits)?;
    let el = t.elapsed();
    let ns_per_exit = el.as_nanos() as f64 / exits as f64;
    println!(
        "idle NET_RX: {exits} exits in {el:?}: {:.0} exits/s, {ns_per_exit:.0} ns/exit",
        exits as f64 / el.as_secs_f64()
    );

    // Requests: a PUT/INCR/GET mix over 64 keys; 4 exits per request.
    let n = 600u32;
    let requests = (0..n)
        .map(|i| {
            let key = format!("key-{:02}", i % 64);
            match i % 3 {
                0 => request(i, KV_PUT, key.as_bytes(), &[b'x'; 16]),
                1 => request(i, KV_INCR, key.as_bytes(), b""),
                _ => request(i, KV_GET, key.as_bytes(), b""),
            }
        })
        .collect();
    let mut dev = Device {
        requests,
        random: RANDOM,
        ..Default::default()
    };
    let t = Instant::now();
    dev.drive(&mut vm, 4 * n as u64)?;
    let el = t.elapsed();
    assert_eq!(dev.responses.len(), n as usize);
    let per_req = el.as_nanos() as f64 / n as f64;
    // The idle loop runs ~10 guest instructions per exit; a request is 4 exits plus its own work.
    let guest_ns = per_req - 4.0 * ns_per_exit;
    println!(
        "requests: {n} in {el:?}: {per_req:.0} ns/request ({:.0} requests/s); ~{guest_ns:.0} ns \
         of it beyond 4 idle exits, i.e. roughly {:.0} more guest instructions at ~750 ns each \
         (emulated ring 0)",
        1e9 / per_req,
        guest_ns / 750.0
    );

    let t = Instant::now();
    let h = vm.memory_hash();
    println!(
        "memory_hash over {} MiB: {:?} ({h:#x})",
        vm.mem_size() >> 20,
        t.elapsed()
    );
    let r = vm.regs()?;
    println!("at exit #{}: rip {:#x}", vm.exit_count(), r.rip);
    Ok(())
}

fn fill_request(req_id: u32, start: u32, count: u32, seed: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&start.to_le_bytes());
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&seed.to_le_bytes());
    request(req_id, vmm::kv::KV_FILL, b"", &v)
}

#[test]
fn fill_dirties_pages_inside_ram_and_refuses_ranges_outside() -> Result<(), VmError> {
    use vmm::kv::{KV_FILL_FIRST_PAGE, KV_FILL_MAX_PAGES};
    let mem = 8 << 20;
    let pages = (mem / 4096) as u32;
    let first = KV_FILL_FIRST_PAGE as u32;
    let mut vm = new_vm(mem, GUEST_IMAGE);
    let mut dev = Device {
        requests: VecDeque::from([
            fill_request(1, first, 16, 0xABCD),
            // The last page of RAM: fine; one past it: refused, as below the stack.
            fill_request(2, pages - 1, 1, 7),
            fill_request(3, pages - 1, 2, 7),
            fill_request(4, first - 1, 1, 7),
            fill_request(5, first, KV_FILL_MAX_PAGES as u32 + 1, 7),
            // A start far beyond RAM, and one that wraps u32.
            fill_request(6, u32::MAX, 2, 7),
        ]),
        clock_base: 1,
        clock_step: 1,
        random: RANDOM,
        ..Default::default()
    };
    assert_eq!(dev.drive(&mut vm, 60)?, Stop::Budget);
    let status: Vec<(u32, u8)> = dev
        .responses
        .iter()
        .map(|r| (u32::from_le_bytes([r[0], r[1], r[2], r[3]]), r[4]))
        .collect();
    assert_eq!(
        status,
        vec![
            (1, KV_OK),
            (2, KV_OK),
            (3, KV_BAD_REQUEST),
            (4, KV_BAD_REQUEST),
            (5, KV_BAD_REQUEST),
            (6, KV_BAD_REQUEST)
        ]
    );
    assert_eq!(&dev.responses[0][32..40], &16u64.to_le_bytes());
    for page in u64::from(first)..u64::from(first) + 16 {
        assert_eq!(vm.read_u64(page * 4096)?, 0xABCD ^ page, "page {page}");
    }
    assert_eq!(
        vm.read_u64(u64::from(first + 16) * 4096)?,
        0,
        "one page past the range"
    );
    assert_eq!(
        vm.read_u64(u64::from(pages - 1) * 4096)?,
        7 ^ u64::from(pages - 1)
    );
    Ok(())
}

/// Single-stepping counts the guest's instructions without changing what it does: the idle
/// loop runs the same number of instructions between two NET_RX exits every time, and a VM
/// stepped through requests ends in the state of one that ran them. On the polling build of the
/// kvstore: its idle loop is a NET_RX loop, and it takes no interrupts. Stepping the
/// interrupt-driven build does change it (seen: the interrupt frame on its IST stack holds
/// RFLAGS with the stepping's trap flag set, and the stepped guest took a tick at another
/// instruction), so instruction counts of it are counts of a slightly different run.
#[test]
fn counting_instructions_leaves_the_guest_as_running_does() -> Result<(), VmError> {
    let mut ran = new_vm(MIN_MEM_SIZE, GUEST_POLLING_IMAGE);
    let mut stepped = new_vm(MIN_MEM_SIZE, GUEST_POLLING_IMAGE);
    put_get_device().drive(&mut ran, 12)?;
    // Exits 1..=8 serve the PUT and the GET (4 exits each), then the guest idles on NET_RX.
    let mut dev = put_get_device();
    let mut counts = Vec::new();
    for _ in 0..12 {
        let (exit, n) = stepped.run_counting_instructions()?;
        assert!(matches!(exit, VmExit::Hypercall { .. }), "{exit:?}");
        counts.push(n);
        dev.respond(&mut stepped, exit)?;
    }
    assert_eq!(dev.responses.len(), 2);
    assert!(counts.iter().all(|&n| n > 0), "{counts:?}");
    let idle = &counts[9..];
    assert!(idle.iter().all(|&n| n == idle[0]), "idle loop: {counts:?}");
    assert_eq!(stepped.exit_count(), ran.exit_count());
    assert_eq!(stepped.memory_hash(), ran.memory_hash());
    assert_eq!(stepped.registers_digest()?, ran.registers_digest()?);
    Ok(())
}

/// A signal that ends `KVM_RUN` early (the primary's ACK kick, `transport::kick`) is not an
/// exit: `Vm::run_with` calls its hook and runs the guest on, and the guest ends exactly as a
/// run that was never signalled (same exits, memory and registers). The guest fills pages
/// request after request (long stretches without exits) while another thread kicks its vCPU
/// thread, until a kick has landed inside `KVM_RUN`; an unsignalled VM then serves the same
/// requests.
#[test]
fn a_signal_inside_kvm_run_is_not_an_exit() -> Result<(), VmError> {
    use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
    use std::sync::Arc;
    let mem = 8 << 20;
    let fill = |i: u32| fill_request(i, vmm::kv::KV_FILL_FIRST_PAGE as u32, 256, u64::from(i));
    // Serves request `i` and runs on to the next NET_RX that finds none.
    fn serve(
        vm: &mut vmm::vm::Vm,
        dev: &mut Device,
        req: Vec<u8>,
        on_signal: &mut dyn FnMut(),
    ) -> Result<(), VmError> {
        dev.requests.push_back(req);
        for _ in 0..100 {
            let exit = vm.run_with(on_signal)?;
            if dev.respond(vm, exit)? == Some(Stop::Idle) {
                return Ok(());
            }
        }
        panic!("the request was not served within 100 exits");
    }
    let device = || Device {
        clock_base: 1,
        clock_step: 1,
        random: RANDOM,
        stop_when_idle: true,
        ..Default::default()
    };

    assert!(transport::kick::install_handler());
    let tid = Arc::new(AtomicI32::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let worker = {
        let (tid, done) = (tid.clone(), done.clone());
        std::thread::spawn(move || -> Result<_, VmError> {
            let mut vm = new_vm(mem, GUEST_POLLING_IMAGE);
            let mut dev = device();
            let mut signals = 0u64;
            tid.store(transport::kick::current_tid(), Ordering::SeqCst);
            let mut served = 0;
            while signals == 0 && served < 10_000 {
                served += 1;
                serve(&mut vm, &mut dev, fill(served), &mut || signals += 1)?;
            }
            done.store(true, Ordering::SeqCst);
            Ok((
                served,
                signals,
                vm.exit_count(),
                vm.memory_hash(),
                vm.registers_digest()?,
            ))
        })
    };
    // SAFETY: getpid has no arguments and cannot fail.
    let me = unsafe { libc::getpid() };
    while !done.load(Ordering::SeqCst) {
        let t = tid.load(Ordering::SeqCst);
        if t != 0 {
            transport::kick::kick(me, t);
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    let (served, signals, exits, memory, registers) = worker.join().expect("vCPU thread")?;
    assert!(
        signals > 0,
        "no kick landed inside KVM_RUN in {served} requests"
    );
    let mut plain = new_vm(mem, GUEST_POLLING_IMAGE);
    let mut dev = device();
    for i in 1..=served {
        serve(&mut plain, &mut dev, fill(i), &mut || {
            panic!("nobody signals this VM")
        })?;
    }
    assert_eq!(exits, plain.exit_count());
    assert_eq!(memory, plain.memory_hash());
    assert_eq!(registers, plain.registers_digest()?);
    Ok(())
}
