//! The wire format of the ledger guest (`guests/ledger`, format in its `README.md`), for clients
//! and tests: requests encoded exactly as the guest parses them, responses decoded as it writes
//! them, and [`LedgerModel`], the client-side model every response is checked against.

// The constants the guest and its clients share, compiled from the guest's own file.
#[path = "../../guests/ledger/src/proto.rs"]
mod proto;
pub use proto::*;

/// A ledger request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// One of [`op`].
    pub op: u8,
    /// DEPOSIT, BALANCE: the account; TRANSFER: the payer.
    pub account: u32,
    /// TRANSFER: the payee.
    pub to: u32,
    /// DEPOSIT, TRANSFER.
    pub amount: u64,
}

impl Request {
    /// DEPOSIT `amount` into `account`.
    pub fn deposit(account: u32, amount: u64) -> Request {
        Request {
            op: op::DEPOSIT,
            account,
            to: 0,
            amount,
        }
    }

    /// TRANSFER `amount` from `from` to `to`.
    pub fn transfer(from: u32, to: u32, amount: u64) -> Request {
        Request {
            op: op::TRANSFER,
            account: from,
            to,
            amount,
        }
    }

    /// BALANCE of `account`.
    pub fn balance(account: u32) -> Request {
        Request {
            op: op::BALANCE,
            account,
            to: 0,
            amount: 0,
        }
    }

    /// AUDIT.
    pub fn audit() -> Request {
        Request {
            op: op::AUDIT,
            account: 0,
            to: 0,
            amount: 0,
        }
    }

    /// The [`REQUEST_LEN`] bytes of this request with id `id`.
    pub fn encode(&self, id: u32) -> Vec<u8> {
        let mut r = Vec::with_capacity(REQUEST_LEN);
        r.extend_from_slice(&id.to_le_bytes());
        r.extend_from_slice(&[self.op, 0, 0, 0]);
        r.extend_from_slice(&self.account.to_le_bytes());
        r.extend_from_slice(&self.to.to_le_bytes());
        r.extend_from_slice(&self.amount.to_le_bytes());
        r
    }

    /// The accounts this request reads or changes; `None` for all of them (AUDIT).
    pub fn accounts(&self) -> Option<Vec<u32>> {
        match self.op {
            op::AUDIT => None,
            op::TRANSFER => Some(vec![self.account, self.to]),
            _ => Some(vec![self.account]),
        }
    }

    /// Whether the request changes balances when it succeeds.
    pub fn is_transaction(&self) -> bool {
        matches!(self.op, op::DEPOSIT | op::TRANSFER)
    }
}

/// A decoded response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    /// The request it answers.
    pub id: u32,
    /// See [`status`].
    pub status: u8,
    /// The request's op.
    pub op: u8,
    /// Transaction id (0: none).
    pub txn: u64,
    /// The transaction's time (the guest's clock), ns.
    pub time_ns: u64,
    /// First result (see [`op`]): a balance, or AUDIT's sum of balances.
    pub a: u64,
    /// Second result: TRANSFER's payee balance, AUDIT's total deposits.
    pub b: u64,
    /// Third result: AUDIT's count of committed transactions.
    pub c: u64,
}

/// Decodes a response of exactly [`RESPONSE_LEN`] bytes; `None` if it is malformed.
pub fn decode_response(b: &[u8]) -> Option<Response> {
    if b.len() != RESPONSE_LEN || b[6..8] != [0, 0] {
        return None;
    }
    let u64_at = |i: usize| {
        let mut a = [0; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    Some(Response {
        id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        status: b[4],
        op: b[5],
        txn: u64_at(8),
        time_ns: u64_at(16),
        a: u64_at(24),
        b: u64_at(32),
        c: u64_at(40),
    })
}

/// Per account: balance and the last transaction that changed it, with its time.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Account {
    balance: u64,
    txn: u64,
    time_ns: u64,
}

/// What a correct ledger answers, tracked by a client from the responses it got: balances,
/// totals, and the transaction ids and times the guest drew (learnt from its answers to
/// transactions, then checked in BALANCE and AUDIT answers).
#[derive(Debug, Clone)]
pub struct LedgerModel {
    accounts: Vec<Account>,
    deposited: u64,
    committed: u64,
    /// The last transaction (id, time).
    last: (u64, u64),
}

impl Default for LedgerModel {
    fn default() -> Self {
        LedgerModel {
            accounts: vec![Account::default(); ACCOUNTS],
            deposited: 0,
            committed: 0,
            last: (0, 0),
        }
    }
}

impl LedgerModel {
    /// Checks the guest's response to `req` against the model, then applies `req` as the guest
    /// did. `Err` describes the first difference (the model is then left as it was).
    pub fn apply(&mut self, req: &Request, resp: &Response) -> Result<(), String> {
        let bad = Expected::bare(status::BAD_REQUEST);
        let n = ACCOUNTS as u32;
        let (expected, commit) = match req.op {
            op::DEPOSIT if req.account < n && req.amount > 0 => {
                let acc = self.accounts[req.account as usize];
                match self.deposited.checked_add(req.amount) {
                    None => (Expected::refused(acc.balance, 0), None),
                    Some(_) => (
                        Expected::transaction(acc.balance + req.amount, 0),
                        Some(vec![(req.account, acc.balance + req.amount)]),
                    ),
                }
            }
            op::TRANSFER
                if req.account < n && req.to < n && req.account != req.to && req.amount > 0 =>
            {
                let from = self.accounts[req.account as usize].balance;
                let to = self.accounts[req.to as usize].balance;
                if from < req.amount {
                    (Expected::refused(from, to), None)
                } else {
                    let (f, t) = (from - req.amount, to + req.amount);
                    (
                        Expected::transaction(f, t),
                        Some(vec![(req.account, f), (req.to, t)]),
                    )
                }
            }
            op::BALANCE if req.account < n => {
                let acc = self.accounts[req.account as usize];
                (
                    Expected::read(acc.txn, acc.time_ns, acc.balance, 0, 0),
                    None,
                )
            }
            op::AUDIT => (
                Expected::read(
                    self.last.0,
                    self.last.1,
                    self.deposited,
                    self.deposited,
                    self.committed,
                ),
                None,
            ),
            _ => (bad, None),
        };
        expected.check(req, resp)?;
        if let Some(changes) = commit {
            for (account, balance) in changes {
                self.accounts[account as usize] = Account {
                    balance,
                    txn: resp.txn,
                    time_ns: resp.time_ns,
                };
            }
            if req.op == op::DEPOSIT {
                self.deposited += req.amount;
            }
            self.committed += 1;
            self.last = (resp.txn, resp.time_ns);
        }
        Ok(())
    }

    /// The balance the model holds for `account`.
    pub fn balance(&self, account: u32) -> Option<u64> {
        self.accounts.get(account as usize).map(|a| a.balance)
    }

    /// Total deposited.
    pub fn deposited(&self) -> u64 {
        self.deposited
    }
}

/// A response the model expects. `txn`/`time_ns` of `None`: a new transaction, whose id (never 0)
/// and time come from the guest's RANDOM and CLOCK and are learnt from the response.
struct Expected {
    status: u8,
    stamp: Option<(u64, u64)>,
    a: u64,
    b: u64,
    c: u64,
}

impl Expected {
    fn bare(status: u8) -> Expected {
        Expected {
            status,
            stamp: Some((0, 0)),
            a: 0,
            b: 0,
            c: 0,
        }
    }

    fn refused(a: u64, b: u64) -> Expected {
        Expected {
            a,
            b,
            ..Expected::bare(status::REFUSED)
        }
    }

    fn transaction(a: u64, b: u64) -> Expected {
        Expected {
            status: status::OK,
            stamp: None,
            a,
            b,
            c: 0,
        }
    }

    fn read(txn: u64, time_ns: u64, a: u64, b: u64, c: u64) -> Expected {
        Expected {
            status: status::OK,
            stamp: Some((txn, time_ns)),
            a,
            b,
            c,
        }
    }

    fn check(&self, req: &Request, r: &Response) -> Result<(), String> {
        let stamp_ok = match self.stamp {
            Some(s) => (r.txn, r.time_ns) == s,
            None => r.txn != 0,
        };
        if r.status == self.status
            && r.op == req.op
            && stamp_ok
            && (r.a, r.b, r.c) == (self.a, self.b, self.c)
        {
            return Ok(());
        }
        let stamp = match self.stamp {
            Some((t, s)) => format!("txn {t:#x} time {s}"),
            None => "a new txn".to_owned(),
        };
        Err(format!(
            "{req:?}: got status {} op {} txn {:#x} time {} a {} b {} c {}, expected status {} \
             op {} {stamp} a {} b {} c {}",
            r.status,
            r.op,
            r.txn,
            r.time_ns,
            r.a,
            r.b,
            r.c,
            self.status,
            req.op,
            self.a,
            self.b,
            self.c
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(req: &Request, status: u8, txn: u64, time_ns: u64, a: u64, b: u64, c: u64) -> Response {
        Response {
            id: 1,
            status,
            op: req.op,
            txn,
            time_ns,
            a,
            b,
            c,
        }
    }

    #[test]
    fn model_follows_the_documented_semantics() {
        let mut m = LedgerModel::default();
        let d = Request::deposit(3, 100);
        assert!(m.apply(&d, &resp(&d, status::OK, 7, 10, 100, 0, 0)).is_ok());
        // A transaction's id must not be 0.
        assert!(m
            .apply(&d, &resp(&d, status::OK, 0, 11, 200, 0, 0))
            .is_err());
        let t = Request::transfer(3, 4, 150);
        assert!(m
            .apply(&t, &resp(&t, status::REFUSED, 0, 0, 100, 0, 0))
            .is_ok());
        let t = Request::transfer(3, 4, 60);
        assert!(m.apply(&t, &resp(&t, status::OK, 8, 12, 40, 60, 0)).is_ok());
        let b = Request::balance(4);
        assert!(m.apply(&b, &resp(&b, status::OK, 8, 12, 60, 0, 0)).is_ok());
        assert!(m.apply(&b, &resp(&b, status::OK, 7, 12, 60, 0, 0)).is_err());
        let a = Request::audit();
        assert!(m
            .apply(&a, &resp(&a, status::OK, 8, 12, 100, 100, 2))
            .is_ok());
        for bad in [
            Request::deposit(ACCOUNTS as u32, 1),
            Request::deposit(1, 0),
            Request::transfer(1, 1, 5),
            Request::transfer(1, ACCOUNTS as u32, 5),
            Request::balance(u32::MAX),
            Request {
                op: 9,
                ..Request::audit()
            },
        ] {
            assert!(
                m.apply(&bad, &resp(&bad, status::BAD_REQUEST, 0, 0, 0, 0, 0))
                    .is_ok(),
                "{bad:?}"
            );
        }
        assert_eq!(m.balance(3), Some(40));
        assert_eq!(m.deposited(), 100);
    }

    #[test]
    fn requests_encode_and_responses_decode() {
        let r = Request::transfer(1, 2, 3).encode(0x0a0b_0c0d);
        assert_eq!(r.len(), REQUEST_LEN);
        assert_eq!(&r[..8], &[0x0d, 0x0c, 0x0b, 0x0a, op::TRANSFER, 0, 0, 0]);
        assert_eq!(&r[8..16], &[1, 0, 0, 0, 2, 0, 0, 0]);
        let mut b = vec![0u8; RESPONSE_LEN];
        b[..4].copy_from_slice(&5u32.to_le_bytes());
        b[5] = op::AUDIT;
        b[24..32].copy_from_slice(&9u64.to_le_bytes());
        let d = decode_response(&b).expect("valid");
        assert_eq!((d.id, d.op, d.a), (5, op::AUDIT, 9));
        assert_eq!(decode_response(&b[..RESPONSE_LEN - 1]), None);
        b[6] = 1;
        assert_eq!(decode_response(&b), None);
    }
}
