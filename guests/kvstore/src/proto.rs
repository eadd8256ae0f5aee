//! The key-value service's wire format: the constants the guest (`guests/kvstore`) and its
//! clients share. The VMM crate compiles this same file into `vmm::kv` (`#[path]`), so it stays
//! `core`-only: constants, nothing that names either crate; the one ABI number it needs comes
//! from `super::abi`, which both including modules provide (the guest: `ftvm_guest::abi`; the
//! VMM: `vmm::layout`). The prose version is the key-value section of `vmm/GUEST-ABI.md`.

use super::abi::STACK_TOP;

/// Request header length: `u32 req_id | u8 op | u8 key_len | u16 val_len`.
pub const KV_REQ_HEADER_LEN: usize = 8;
/// Response header length: `u32 req_id | u8 status | u8 0 | u16 val_len | u64 timestamp_ns |
/// u64 token | u32 ticks | u32 0`.
pub const KV_RESP_HEADER_LEN: usize = 32;
/// Longest key.
pub const KV_MAX_KEY: usize = 32;
/// Longest value.
pub const KV_MAX_VAL: usize = 64;
/// Slots in the guest's hash table.
pub const KV_SLOTS: usize = 256;
/// Entries in the guest's cache of recent responses: `KV_REPLY_CACHE / KV_REPLY_WAYS` sets of
/// [`KV_REPLY_WAYS`] entries, the set chosen by `req_id % (KV_REPLY_CACHE / KV_REPLY_WAYS)`, each
/// set replacing its oldest entry. A request whose header word (`req_id`, op, key and value
/// lengths) equals a cached one in its set is a client's retry: it is answered with the cached
/// response, byte for byte, and not executed again, so a request is applied at most once even
/// when it is retried after a failover — as long as its response is still cached (a set keeps
/// its last four: with many clients, hundreds of other requests may run before a retry).
pub const KV_REPLY_CACHE: usize = 1024;
/// Entries per set of the reply cache.
pub const KV_REPLY_WAYS: usize = 4;
/// Request op: GET.
pub const KV_GET: u8 = 1;
/// Request op: PUT.
pub const KV_PUT: u8 = 2;
/// Request op: INCR.
pub const KV_INCR: u8 = 3;
/// Request op: FILL — the guest dirties memory (for state-transfer load). `key_len` 0,
/// `val_len` 16, value = `start_page: u32 | count: u32 | seed: u64`: the guest writes the word
/// `seed ^ page` at the start of each page of `start_page..start_page + count` (one store per
/// page: ring-0 code is emulated on some hosts) and answers with `count` as a u64 value. Status 2
/// unless `KV_FILL_FIRST_PAGE <= start_page` and the range ends inside guest RAM (`mem_size`)
/// and holds at most [`KV_FILL_MAX_PAGES`] pages.
pub const KV_FILL: u8 = 4;
/// First page FILL may write: the free memory above the stack.
pub const KV_FILL_FIRST_PAGE: u64 = STACK_TOP / 4096;
/// Most pages one FILL writes.
pub const KV_FILL_MAX_PAGES: u64 = 65_536;
/// Response status: ok.
pub const KV_OK: u8 = 0;
/// Response status: key not found (GET).
pub const KV_NOT_FOUND: u8 = 1;
/// Response status: malformed request or table full.
pub const KV_BAD_REQUEST: u8 = 2;
