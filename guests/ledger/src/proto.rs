//! The ledger's wire format: the constants the guest (`guests/ledger`) and its clients share.
//! The VMM crate compiles this same file into `vmm::ledger` (`#[path]`), so it stays `core`-only:
//! constants, nothing that names either crate. The prose version is `guests/ledger/README.md`.
//!
//! All integers little-endian. Request, [`REQUEST_LEN`] bytes (bytes after them are ignored):
//!
//! | offset | field |
//! |---|---|
//! | 0 | `req_id: u32` |
//! | 4 | `op: u8` ([`op`]) |
//! | 5 | 3 bytes, ignored (send 0) |
//! | 8 | `account: u32` — DEPOSIT, BALANCE: the account; TRANSFER: the payer |
//! | 12 | `to: u32` — TRANSFER: the payee |
//! | 16 | `amount: u64` — DEPOSIT, TRANSFER |
//!
//! Response, [`RESPONSE_LEN`] bytes:
//!
//! | offset | field |
//! |---|---|
//! | 0 | `req_id: u32` (0 if the request was shorter than 4 bytes) |
//! | 4 | `status: u8` ([`status`]) |
//! | 5 | `op: u8` (the request's; 0 if it was shorter than 5 bytes) |
//! | 6 | `u16` 0 |
//! | 8 | `txn: u64` |
//! | 16 | `time_ns: u64` |
//! | 24 | `a: u64` |
//! | 32 | `b: u64` |
//! | 40 | `c: u64` |

/// Request length (shorter requests are answered with [`status::BAD_REQUEST`]).
pub const REQUEST_LEN: usize = 24;
/// Response length.
pub const RESPONSE_LEN: usize = 48;
/// Accounts: ids `0..ACCOUNTS`.
pub const ACCOUNTS: usize = 256;
/// Responses kept for retries: `REPLY_CACHE / REPLY_WAYS` sets of [`REPLY_WAYS`], keyed by the
/// request's first word (`req_id`, `op` and the three ignored bytes).
pub const REPLY_CACHE: usize = 1024;
/// Entries per set of the reply cache.
pub const REPLY_WAYS: usize = 4;

/// Request operations.
pub mod op {
    /// DEPOSIT(account, amount): adds `amount` (> 0) to the account. OK: `txn`/`time_ns` of this
    /// transaction, `a` = the account's new balance. REFUSED if the ledger's total deposits would
    /// pass `u64::MAX`.
    pub const DEPOSIT: u8 = 1;
    /// TRANSFER(account, to, amount): moves `amount` (> 0) from `account` to `to` (another
    /// account). OK: `txn`/`time_ns` of this transaction, `a`/`b` = the payer's/payee's new
    /// balance. REFUSED (nothing moves, `txn` = `time_ns` = 0, `a`/`b` = the two balances) when
    /// the payer's balance is short.
    pub const TRANSFER: u8 = 2;
    /// BALANCE(account): `a` = the balance, `txn`/`time_ns` = the last transaction that changed
    /// it (0 if none).
    pub const BALANCE: u8 = 3;
    /// AUDIT: the guest sums every balance and checks the ledger's invariant, sum = total
    /// deposits (it panics if not: a broken invariant is a bug or corrupted memory, and the FT
    /// pair must stop rather than serve it). `a` = the sum, `b` = total deposits, `c` =
    /// transactions committed; `txn`/`time_ns` = the last transaction (0 if none).
    pub const AUDIT: u8 = 4;
}

/// Response status.
pub mod status {
    /// Done.
    pub const OK: u8 = 0;
    /// Refused: insufficient funds (TRANSFER), or total deposits would overflow (DEPOSIT).
    pub const REFUSED: u8 = 1;
    /// Malformed: shorter than [`super::REQUEST_LEN`], unknown op, an account id out of range,
    /// amount 0, or a transfer to the payer itself. Everything else in the response is 0.
    pub const BAD_REQUEST: u8 = 2;
}
