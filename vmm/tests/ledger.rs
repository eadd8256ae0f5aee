//! The ledger guest (`guests/ledger`, on the guest SDK) under KVM, driven by a scripted device:
//! its answers byte for byte, what each request costs in exits, malformed requests, retries
//! answered from its reply cache, the client model agreeing with it on a long random run, and a
//! broken invariant reported through the SDK's panic handler. Needs /dev/kvm.

mod common;

use std::collections::VecDeque;

use common::{new_vm, Device, Stop};
use rand::{Rng, SeedableRng};
use vmm::layout::{DEFAULT_MEM_SIZE, GUEST_IMAGE_END, GUEST_LOAD_ADDR, HALT_PANIC, MIN_MEM_SIZE};
use vmm::ledger::{decode_response, op, status, LedgerModel, Request, Response, ACCOUNTS};
use vmm::vm::{VmError, GUEST_LEDGER_IMAGE};

/// A device that stops when its requests are served, hands out counting transaction ids
/// (RANDOM = 1, 2, 3 …) and a clock of 1000, 2000, 3000 … ns.
fn device(requests: impl IntoIterator<Item = Vec<u8>>) -> Device {
    Device {
        requests: requests.into_iter().collect::<VecDeque<_>>(),
        clock_base: 1_000,
        clock_step: 1_000,
        random_counts: true,
        stop_when_idle: true,
        ..Default::default()
    }
}

fn decoded(dev: &Device) -> Vec<Response> {
    dev.responses
        .iter()
        .map(|r| decode_response(r).unwrap_or_else(|| panic!("malformed response {r:02x?}")))
        .collect()
}

/// (status, txn, time, a, b, c) of each response.
fn outcomes(dev: &Device) -> Vec<(u8, u64, u64, u64, u64, u64)> {
    decoded(dev)
        .iter()
        .map(|r| (r.status, r.txn, r.time_ns, r.a, r.b, r.c))
        .collect()
}

#[test]
fn deposits_transfers_balances_and_the_audit() -> Result<(), VmError> {
    let mut vm = new_vm(MIN_MEM_SIZE, GUEST_LEDGER_IMAGE);
    let mut dev = device([
        Request::deposit(1, 500).encode(10),
        Request::transfer(1, 2, 200).encode(11),
        Request::transfer(2, 3, 201).encode(12), // 200 available: refused
        Request::balance(2).encode(13),
        Request::balance(3).encode(14), // never touched
        Request::deposit(3, 7).encode(15),
        Request::audit().encode(16),
    ]);
    assert_eq!(dev.drive(&mut vm, 1_000)?, Stop::Idle);
    assert_eq!(
        outcomes(&dev),
        vec![
            (status::OK, 1, 1_000, 500, 0, 0),
            (status::OK, 2, 2_000, 300, 200, 0),
            (status::REFUSED, 0, 0, 200, 0, 0),
            (status::OK, 2, 2_000, 200, 0, 0),
            (status::OK, 0, 0, 0, 0, 0),
            (status::OK, 3, 3_000, 7, 0, 0),
            (status::OK, 3, 3_000, 507, 507, 3),
        ]
    );
    let r = decoded(&dev);
    assert!(r.iter().zip(10..).all(|(r, id)| r.id == id));
    assert_eq!(
        r.iter().map(|r| r.op).collect::<Vec<_>>(),
        [1, 2, 2, 3, 3, 1, 4]
    );
    // Transactions draw CLOCK and RANDOM (4 exits), reads and refusals do not (2 exits):
    // 3 × 4 + 4 × 2 request exits and the final idle NET_RX.
    assert_eq!((dev.clocks, dev.randoms), (3, 3));
    assert_eq!(vm.exit_count(), 3 * 4 + 4 * 2 + 1);
    Ok(())
}

#[test]
fn malformed_requests_get_status_2_and_no_transaction() -> Result<(), VmError> {
    let mut vm = new_vm(MIN_MEM_SIZE, GUEST_LEDGER_IMAGE);
    // Its first word must differ from the others': a request with the first word of one
    // already answered is a retry.
    let full = Request::deposit(4, 9).encode(30);
    let mut dev = device([
        vec![0xaa],                                       // shorter than a req_id
        vec![21, 0, 0, 0],                                // a req_id only
        Request::deposit(4, 9).encode(22)[..23].to_vec(), // one byte short
        Request::deposit(ACCOUNTS as u32, 1).encode(23),  // no such account
        Request::deposit(4, 0).encode(24),                // nothing to deposit
        Request::transfer(4, 4, 1).encode(25),            // to the payer itself
        Request::transfer(4, u32::MAX, 1).encode(26),     // no such payee
        Request::balance(ACCOUNTS as u32).encode(27),     // no such account
        Request {
            op: 0,
            ..Request::audit()
        }
        .encode(28),
        Request {
            op: 77,
            ..Request::audit()
        }
        .encode(29),
        [full.clone(), vec![0xee; 40]].concat(), // trailing bytes ignored: fine
    ]);
    assert_eq!(dev.drive(&mut vm, 1_000)?, Stop::Idle);
    let r = decoded(&dev);
    let got: Vec<(u32, u8, u8)> = r.iter().map(|r| (r.id, r.status, r.op)).collect();
    let bad = status::BAD_REQUEST;
    let deposit = op::DEPOSIT;
    assert_eq!(
        got,
        vec![
            (0, bad, 0),
            (21, bad, 0),
            (22, bad, deposit),
            (23, bad, deposit),
            (24, bad, deposit),
            (25, bad, op::TRANSFER),
            (26, bad, op::TRANSFER),
            (27, bad, op::BALANCE),
            (28, bad, 0),
            (29, bad, 77),
            (30, status::OK, deposit),
        ]
    );
    assert!(r[..10]
        .iter()
        .all(|r| (r.txn, r.time_ns, r.a, r.b, r.c) == (0, 0, 0, 0, 0)));
    assert_eq!((r[10].txn, r[10].a), (1, 9));
    Ok(())
}

#[test]
fn a_retry_is_answered_from_the_reply_cache_not_executed_again() -> Result<(), VmError> {
    let mut vm = new_vm(MIN_MEM_SIZE, GUEST_LEDGER_IMAGE);
    let deposit = Request::deposit(9, 100).encode(77);
    let transfer = Request::transfer(9, 8, 60).encode(78);
    let mut dev = device([
        deposit.clone(),
        transfer.clone(),
        deposit.clone(),
        transfer.clone(),
        transfer,
        Request::audit().encode(79),
    ]);
    assert_eq!(dev.drive(&mut vm, 1_000)?, Stop::Idle);
    let r = &dev.responses;
    assert_eq!(r[2], r[0], "the deposit's retry, byte for byte");
    assert_eq!(r[3], r[1], "the transfer's retry");
    assert_eq!(r[4], r[1], "and its second retry");
    // Two transactions, each executed once; the retries cost 2 exits each.
    assert_eq!(
        outcomes(&dev)[5],
        (status::OK, 2, 2_000, 100, 100, 2),
        "audit: 100 deposited, 2 transactions"
    );
    assert_eq!((dev.clocks, dev.randoms), (2, 2));
    assert_eq!(vm.exit_count(), 2 * 4 + 3 * 2 + 2 + 1);
    Ok(())
}

/// Random requests, malformed ones among them, checked one by one against the client's model,
/// with an AUDIT every 50 — the model the load generator uses must agree with the guest.
#[test]
fn the_client_model_agrees_with_the_guest() -> Result<(), VmError> {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(15);
    let accounts = 12u32;
    let requests: Vec<Request> = (0..1_500)
        .map(|i| {
            let a = rng.gen_range(0..accounts);
            let b = rng.gen_range(0..accounts);
            match (i % 50, rng.gen_range(0..10)) {
                (49, _) => Request::audit(),
                (_, 0..=2) => Request::deposit(a, rng.gen_range(0..300)),
                (_, 3..=6) => Request::transfer(a, b, rng.gen_range(0..10_000)),
                (_, 7 | 8) => Request::balance(a),
                _ => Request {
                    op: rng.gen_range(0..8),
                    account: rng.gen_range(0..ACCOUNTS as u32 + 2),
                    to: rng.gen_range(0..ACCOUNTS as u32 + 2),
                    amount: rng.gen_range(0..3),
                },
            }
        })
        .collect();
    let mut vm = new_vm(DEFAULT_MEM_SIZE, GUEST_LEDGER_IMAGE);
    let mut dev = device(
        requests
            .iter()
            .enumerate()
            .map(|(i, r)| r.encode(i as u32 + 1)),
    );
    assert_eq!(dev.drive(&mut vm, 10_000)?, Stop::Idle);
    let mut model = LedgerModel::default();
    let responses = decoded(&dev);
    assert_eq!(responses.len(), requests.len());
    let mut by_status = [0u32; 3];
    let mut transfers_done = 0;
    for (i, (req, resp)) in requests.iter().zip(&responses).enumerate() {
        assert_eq!(resp.id, i as u32 + 1);
        if let Err(e) = model.apply(req, resp) {
            panic!("request {i}: {e}");
        }
        by_status[usize::from(resp.status.min(2))] += 1;
        if req.op == op::TRANSFER && resp.status == status::OK {
            transfers_done += 1;
        }
    }
    // Each outcome (ok, refused, bad request) happened plenty of times.
    assert!(by_status.iter().all(|&n| n > 100), "{by_status:?}");
    assert!(transfers_done > 100, "{transfers_done} transfers done");
    assert!(model.deposited() > 0);
    Ok(())
}

/// A balance corrupted in guest memory (as a bit flip or a bug would) breaks the invariant:
/// the next AUDIT panics, the SDK's panic handler halts with HALT_PANIC, and the VMM reads the
/// guest's message.
#[test]
fn a_broken_invariant_panics_through_the_sdk() -> Result<(), VmError> {
    const MARK: u64 = 0x5eed_0123_4567_89ab;
    let mut vm = new_vm(MIN_MEM_SIZE, GUEST_LEDGER_IMAGE);
    let mut dev = device([
        Request::deposit(5, MARK).encode(1),
        Request::deposit(6, 10).encode(2),
        Request::audit().encode(3),
    ]);
    assert_eq!(dev.drive(&mut vm, 1_000)?, Stop::Idle);
    assert_eq!(outcomes(&dev)[2].3, MARK + 10, "the audit passes");
    assert_eq!(vm.panic_message()?, None);

    // Account 5's balance is MARK; so is the cached response's `a` of request 1, which is
    // harmless to change too.
    let mut image = vec![0u8; (GUEST_IMAGE_END - GUEST_LOAD_ADDR) as usize];
    vm.read_bytes(GUEST_LOAD_ADDR, &mut image)?;
    let mut hits = 0;
    for (i, w) in image.chunks_exact(8).enumerate() {
        if w == MARK.to_le_bytes() {
            vm.write_u64(GUEST_LOAD_ADDR + 8 * i as u64, MARK + 1)?;
            hits += 1;
        }
    }
    assert!(hits >= 1, "account 5's balance not found in guest memory");

    dev.requests.push_back(Request::balance(6).encode(4));
    dev.requests.push_back(Request::audit().encode(5));
    dev.stop_when_idle = false;
    assert_eq!(dev.drive(&mut vm, 1_000)?, Stop::Halted(HALT_PANIC));
    assert_eq!(dev.responses.len(), 4, "no answer to the failed audit");
    let msg = vm.panic_message()?.expect("a panic message");
    let expected = format!(
        "ledger audit failed: balances sum to {}, deposits total {}",
        MARK + 11,
        MARK + 10
    );
    assert!(
        msg.starts_with("ledger/src/main.rs:") && msg.ends_with(&expected),
        "{msg:?}"
    );
    Ok(())
}
