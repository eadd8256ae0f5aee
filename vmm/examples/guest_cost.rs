//! What a guest program's requests cost: VM exits, guest instructions (counted exactly by
//! single-stepping) and wall time per request, for guest images given as files, measured in
//! alternating rounds so that images compare under the same machine conditions.
//!
//! ```sh
//! cargo run --release -p vmm --example guest_cost -- kvstore=old.elf kvstore=new.elf
//! cargo run --release -p vmm --example guest_cost -- --rounds 9 ledger=guests/target/x86_64-unknown-linux-gnu/release/ftvm-ledger
//! ```
//!
//! `kvstore` images get the key-value mix of `vm_boot`'s measurement (PUT, INCR, GET over 64
//! keys), `ledger` images a ledger mix (deposits, transfers, balances, an audit every 16th); both
//! scripted, so every image of a kind sees the same inputs. Needs /dev/kvm.

use std::time::Instant;

use vmm::kv::{KV_GET, KV_INCR, KV_PUT};
use vmm::layout::{
    CLOCK_NS_ADDR, NET_BUF_LEN, OP_CLOCK, OP_NET_RX, OP_NET_TX, OP_RANDOM, RANDOM_ADDR,
    RX_BUF_ADDR, RX_LEN_ADDR, TX_BUF_ADDR, TX_LEN_ADDR,
};
use vmm::vm::{Vm, VmError, VmExit};

const MEM: usize = 16 << 20;

fn kv_requests(n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let key = format!("key-{:02}", i % 64);
            let (op, val): (u8, &[u8]) = match i % 3 {
                0 => (KV_PUT, &[b'x'; 16]),
                1 => (KV_INCR, b""),
                _ => (KV_GET, b""),
            };
            vmm::kv::encode_request(i + 1, op, key.as_bytes(), val)
        })
        .collect()
}

fn ledger_requests(n: u32) -> Vec<Vec<u8>> {
    use vmm::ledger::Request;
    (0..n)
        .map(|i| {
            let a = i % 32;
            let r = match i % 16 {
                15 => Request::audit(),
                k if k % 3 == 0 => Request::deposit(a, 1000),
                k if k % 3 == 1 => Request::transfer(a, (a + 7) % 32, 10),
                _ => Request::balance(a),
            };
            r.encode(i + 1)
        })
        .collect()
}

/// Serves `requests` to `vm` (fresh: its first exit is a NET_RX); returns (exits, guest
/// instructions if `count`). Answers every NET_RX with the next request.
fn drive(vm: &mut Vm, requests: &[Vec<u8>], count: bool) -> Result<(u64, u64), VmError> {
    let (mut exits, mut instructions, mut next, mut clock) = (0u64, 0u64, 0usize, 0u64);
    let mut out = vec![0u8; NET_BUF_LEN];
    loop {
        let exit = if count {
            let (exit, n) = vm.run_counting_instructions()?;
            instructions += n;
            exit
        } else {
            vm.run()?
        };
        match exit {
            VmExit::Hypercall { op: OP_NET_RX } => {
                let Some(req) = requests.get(next) else {
                    return Ok((exits, instructions));
                };
                vm.write_bytes(RX_BUF_ADDR, req)?;
                vm.write_u32(RX_LEN_ADDR, req.len() as u32)?;
                next += 1;
            }
            VmExit::Hypercall { op: OP_CLOCK } => {
                clock += 1_000;
                vm.write_u64(CLOCK_NS_ADDR, clock)?;
            }
            VmExit::Hypercall { op: OP_RANDOM } => vm.write_bytes(RANDOM_ADDR, &[7; 16])?,
            VmExit::Hypercall { op: OP_NET_TX } => {
                let len = (vm.read_u32(TX_LEN_ADDR)? as usize).min(NET_BUF_LEN);
                vm.read_bytes(TX_BUF_ADDR, &mut out[..len])?;
            }
            other => panic!("unexpected exit {other:?}"),
        }
        exits += 1;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut rounds = 7;
    if let Some(i) = args.iter().position(|a| a == "--rounds") {
        rounds = args.get(i + 1).ok_or("--rounds N")?.parse()?;
        args.drain(i..i + 2);
    }
    let mut images = Vec::new();
    for a in &args {
        let (kind, path) = a.split_once('=').ok_or("arguments are KIND=ELF")?;
        let requests = match kind {
            "kvstore" => kv_requests(600),
            "ledger" => ledger_requests(600),
            _ => return Err(format!("unknown kind {kind} (kvstore, ledger)").into()),
        };
        images.push((a.clone(), std::fs::read(path)?, requests));
    }
    if images.is_empty() {
        return Err("usage: guest_cost [--rounds N] KIND=ELF ... (KIND: kvstore, ledger)".into());
    }
    // Exact counts first (deterministic: once is enough), on the first 60 requests.
    for (name, image, requests) in &images {
        let mut vm = Vm::new(MEM, image)?;
        let few = &requests[..60];
        let (exits, instructions) = drive(&mut vm, few, true)?;
        println!(
            "{name}: {:.2} exits/request, {:.1} guest instructions/request (first {} requests)",
            exits as f64 / few.len() as f64,
            instructions as f64 / few.len() as f64,
            few.len()
        );
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); images.len()];
    for _ in 0..rounds {
        for (i, (_, image, requests)) in images.iter().enumerate() {
            let mut vm = Vm::new(MEM, image)?;
            let t = Instant::now();
            drive(&mut vm, requests, false)?;
            times[i].push(t.elapsed().as_nanos() as f64 / requests.len() as f64 / 1e3);
        }
    }
    for ((name, _, _), t) in images.iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        println!(
            "{name}: {:.1} µs/request median of {rounds} alternating rounds (min {:.1}, max {:.1})",
            t[t.len() / 2],
            t[0],
            t[t.len() - 1]
        );
    }
    Ok(())
}
