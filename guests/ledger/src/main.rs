//! The ledger: an example ftvm guest on the guest SDK. Accounts with balances; deposits,
//! transfers (refused when funds are short), balance queries and an audit of the ledger's
//! invariant — the balances sum to the total deposited — which panics (through the SDK's panic
//! handler, so the VMM logs the message) if it is ever broken. Request and response format:
//! `README.md` and `proto.rs`.
//!
//! Every transaction (a DEPOSIT or TRANSFER that changes balances) draws its time from CLOCK and a
//! transaction id from RANDOM; each account remembers the last transaction that changed it, and
//! BALANCE returns it. Reads (BALANCE, AUDIT) and refusals draw neither: they cost two exits
//! (NET_RX, NET_TX) instead of four. Retries are answered from the SDK's reply cache, so a
//! transfer is applied at most once whatever the client's retries and the pair's failovers.
#![no_std]
#![no_main]

use ftvm_guest::net::{Net, Request};
use ftvm_guest::reply_cache::ReplyCache;
use ftvm_guest::{clock, random, Global};

mod proto;

use proto::{op, status, ACCOUNTS, REPLY_CACHE, REPLY_WAYS, REQUEST_LEN, RESPONSE_LEN};

ftvm_guest::entry!(main);

const RESPONSE_WORDS: usize = RESPONSE_LEN / 8;

struct Ledger {
    /// Balances, one word per account (a dense array: AUDIT sums it in a tight loop).
    balance: [u64; ACCOUNTS],
    /// Per account, the last transaction that changed its balance (0: none) and its time.
    last_txn: [u64; ACCOUNTS],
    last_time: [u64; ACCOUNTS],
    /// Total deposited: what the balances must sum to.
    deposited: u64,
    /// Transactions committed.
    committed: u64,
    /// The last transaction and its time.
    txn: u64,
    time: u64,
    replies: ReplyCache<{ REPLY_CACHE / REPLY_WAYS }, REPLY_WAYS, RESPONSE_WORDS>,
}

/// All-zero, so it lives in .bss.
static LEDGER: Global<Ledger> = Global::new(Ledger {
    balance: [0; ACCOUNTS],
    last_txn: [0; ACCOUNTS],
    last_time: [0; ACCOUNTS],
    deposited: 0,
    committed: 0,
    txn: 0,
    time: 0,
    replies: ReplyCache::EMPTY,
});

fn main() {
    let ledger = LEDGER.take();
    let mut net = Net::take();
    while let Some(mut req) = net.next_request() {
        serve(ledger, &mut req);
    }
}

/// A response's fields after `req_id` and `op`.
struct Outcome {
    status: u8,
    txn: u64,
    time: u64,
    a: u64,
    b: u64,
    c: u64,
}

impl Outcome {
    const BAD: Outcome = Outcome::refused(status::BAD_REQUEST, 0, 0);

    const fn ok(txn: u64, time: u64, a: u64, b: u64, c: u64) -> Outcome {
        Outcome {
            status: status::OK,
            txn,
            time,
            a,
            b,
            c,
        }
    }

    const fn refused(status: u8, a: u64, b: u64) -> Outcome {
        Outcome {
            status,
            txn: 0,
            time: 0,
            a,
            b,
            c: 0,
        }
    }
}

#[inline(always)]
fn serve(ledger: &mut Ledger, req: &mut Request<'_>) {
    let len = req.len();
    let head = req.word(0);
    // A retry (same first word as a cached response's request) gets that response again.
    let key = if len >= 8 { head } else { 0 };
    if let Some(r) = ledger.replies.get(key) {
        r.resend(req);
        return;
    }
    let req_id = if len >= 4 { head as u32 } else { 0 };
    let opcode = if len >= 5 { (head >> 32) as u8 } else { 0 };
    let out = if len >= REQUEST_LEN {
        execute(ledger, opcode, req.word(8), req.word(16))
    } else {
        Outcome::BAD
    };
    let tx = req.tx();
    tx.set_word(
        0,
        req_id as u64 | (out.status as u64) << 32 | (opcode as u64) << 40,
    );
    tx.set_word(1, out.txn);
    tx.set_word(2, out.time);
    tx.set_word(3, out.a);
    tx.set_word(4, out.b);
    tx.set_word(5, out.c);
    ledger.replies.insert(key, tx, RESPONSE_LEN);
    req.send(RESPONSE_LEN);
}

/// A new transaction: its time (CLOCK) and id (RANDOM, never 0).
#[inline(always)]
fn begin() -> (u64, u64) {
    let time = clock::now_ns();
    let txn = random::u64();
    (if txn == 0 { 1 } else { txn }, time)
}

impl Ledger {
    /// Records a committed transaction that changed `account`'s balance.
    #[inline(always)]
    fn touch(&mut self, account: usize, txn: u64, time: u64) {
        if let (Some(t), Some(s)) = (
            self.last_txn.get_mut(account),
            self.last_time.get_mut(account),
        ) {
            *t = txn;
            *s = time;
        }
    }

    #[inline(always)]
    fn commit(&mut self, txn: u64, time: u64) {
        self.committed += 1;
        self.txn = txn;
        self.time = time;
    }
}

/// Runs a request of full length: `accounts` = `account | to << 32`.
#[inline(always)]
fn execute(l: &mut Ledger, opcode: u8, accounts: u64, amount: u64) -> Outcome {
    let from = accounts as u32 as usize;
    let to = (accounts >> 32) as usize;
    match opcode {
        op::DEPOSIT => {
            if from >= ACCOUNTS || amount == 0 {
                return Outcome::BAD;
            }
            let Some(total) = l.deposited.checked_add(amount) else {
                return Outcome::refused(status::REFUSED, l.balance[from], 0);
            };
            let (txn, time) = begin();
            l.deposited = total;
            // A balance is at most the total deposited, which did not overflow.
            l.balance[from] = l.balance[from].wrapping_add(amount);
            l.touch(from, txn, time);
            l.commit(txn, time);
            Outcome::ok(txn, time, l.balance[from], 0, 0)
        }
        op::TRANSFER => {
            if from >= ACCOUNTS || to >= ACCOUNTS || from == to || amount == 0 {
                return Outcome::BAD;
            }
            if l.balance[from] < amount {
                return Outcome::refused(status::REFUSED, l.balance[from], l.balance[to]);
            }
            let (txn, time) = begin();
            l.balance[from] -= amount;
            // The two balances sum to at most the total deposited.
            l.balance[to] = l.balance[to].wrapping_add(amount);
            l.touch(from, txn, time);
            l.touch(to, txn, time);
            l.commit(txn, time);
            Outcome::ok(txn, time, l.balance[from], l.balance[to], 0)
        }
        op::BALANCE => {
            if from >= ACCOUNTS {
                return Outcome::BAD;
            }
            Outcome::ok(l.last_txn[from], l.last_time[from], l.balance[from], 0, 0)
        }
        op::AUDIT => {
            let mut sum = 0u64;
            for b in &l.balance {
                sum = sum.wrapping_add(*b);
            }
            if sum != l.deposited {
                panic!(
                    "ledger audit failed: balances sum to {sum}, deposits total {}",
                    l.deposited
                );
            }
            Outcome::ok(l.txn, l.time, sum, l.deposited, l.committed)
        }
        _ => Outcome::BAD,
    }
}
