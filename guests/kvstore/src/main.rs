//! ftvm's key-value service: a guest program on the guest SDK (`ftvm_guest`). Its wire format is
//! in `proto.rs` and the key-value section of `vmm/GUEST-ABI.md`.
//!
//! Deterministic by construction: every input (requests, time, randomness, timer ticks) arrives
//! through the SDK's hypercalls, and the program never executes `rdtsc`, `rdrand`, `rdseed`,
//! `cpuid` or `sti` — except the `nondet` feature's variant, which mixes `rdtsc` into the response
//! token on purpose so that divergence detection can be tested.
//!
//! Ring-0 guest instructions are expensive on the development host (~240 ns each), so the code
//! path per request is kept short: keys and values move as words, the only byte loop is the
//! FNV-1a hash over the key, no formatting, no allocation.
#![no_std]
#![no_main]

use ftvm_guest::abi::{self, NET_BUF_LEN};
use ftvm_guest::net::{Net, Request, Tx};
use ftvm_guest::reply_cache::ReplyCache;
use ftvm_guest::{clock, random, timer, Global};

mod proto;

use proto::*;

ftvm_guest::entry!(main);

const KEY_WORDS: usize = KV_MAX_KEY / 8;
const VAL_WORDS: usize = KV_MAX_VAL / 8;
/// Words of the longest response (header + value).
const REPLY_WORDS: usize = (KV_RESP_HEADER_LEN + KV_MAX_VAL) / 8;
const REPLY_SETS: usize = KV_REPLY_CACHE / KV_REPLY_WAYS;
/// Word index of the response value in the transmit buffer.
const VALUE_WORD: usize = KV_RESP_HEADER_LEN / 8;

/// A table slot. Keys and values are kept as little-endian words, zero past their length, so that
/// comparing and copying costs a few word operations instead of byte loops.
#[derive(Clone, Copy)]
#[repr(C)]
struct Slot {
    used: u8,
    key_len: u8,
    val_len: u8,
    key: [u64; KEY_WORDS],
    val: [u64; VAL_WORDS],
}

impl Slot {
    const EMPTY: Slot = Slot {
        used: 0,
        key_len: 0,
        val_len: 0,
        key: [0; KEY_WORDS],
        val: [0; VAL_WORDS],
    };
}

struct State {
    table: [Slot; KV_SLOTS],
    /// Recent responses for answering retries, keyed by the request's header word.
    replies: ReplyCache<REPLY_SETS, KV_REPLY_WAYS, REPLY_WORDS>,
}

/// All-zero, so it lives in .bss (the VMM hands the guest zeroed memory).
static STATE: Global<State> = Global::new(State {
    table: [Slot::EMPTY; KV_SLOTS],
    replies: ReplyCache::EMPTY,
});

fn main() {
    let st = STATE.take();
    let mut net = Net::take();
    while let Some(mut req) = net.next_request() {
        serve(st, &mut req);
    }
}

/// Loads `len` (<= 8 * N) bytes at `off` in the request as zero-padded words into `out`.
#[inline(always)]
fn rx_words<const N: usize>(req: &Request<'_>, off: usize, len: usize, out: &mut [u64; N]) {
    let full = len / 8;
    let mut i = 0;
    while i < full && i < N {
        out[i] = req.word(off + 8 * i);
        i += 1;
    }
    let tail = len % 8;
    if tail != 0 && i < N {
        out[i] = req.word(off + 8 * i) & ((1u64 << (8 * tail)) - 1);
    }
}

/// FNV-1a, 64-bit, over `len` bytes at `off` in the request.
#[inline(always)]
fn fnv1a(req: &Request<'_>, off: usize, len: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < len {
        h ^= req.byte(off + i) as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// Handles one request: CLOCK, RANDOM, execute, NET_TX — or, for a retry, NET_TX of the cached
/// response. Inlined into the request loop: every instruction counts on hosts that emulate ring-0
/// code.
#[inline(always)]
fn serve(st: &mut State, req: &mut Request<'_>) {
    let rx_len = req.len();
    // A retry (same header word as a cached response's request) gets that response again and is
    // not executed: at most once, whatever the client's retries and the pair's failovers.
    let first = if rx_len >= KV_REQ_HEADER_LEN {
        req.word(0)
    } else {
        0
    };
    if let Some(r) = st.replies.get(first) {
        r.resend(req);
        return;
    }
    let timestamp = clock::now_ns();
    #[allow(unused_mut)]
    let mut token = random::u64();
    #[cfg(feature = "nondet")]
    {
        token ^= rdtsc();
    }

    let (req_id, status, val_len) = if (KV_REQ_HEADER_LEN..=NET_BUF_LEN).contains(&rx_len) {
        let h = req.word(0);
        let req_id = h as u32;
        let op = (h >> 32) as u8;
        let kl = (h >> 40) as u8 as usize;
        let vl = (h >> 48) as usize;
        if op == KV_FILL {
            let (status, len) = fill(req, kl, vl, rx_len);
            (req_id, status, len)
        } else if kl == 0
            || kl > KV_MAX_KEY
            || vl > KV_MAX_VAL
            || rx_len < KV_REQ_HEADER_LEN + kl + vl
            || !(KV_GET..=KV_INCR).contains(&op)
        {
            (req_id, KV_BAD_REQUEST, 0)
        } else {
            let (status, len) = execute(&mut st.table, req, op, kl, vl);
            (req_id, status, len)
        }
    } else if rx_len >= 4 {
        (req.word(0) as u32, KV_BAD_REQUEST, 0)
    } else {
        (0, KV_BAD_REQUEST, 0)
    };

    let tx_len = KV_RESP_HEADER_LEN + val_len;
    let tx = req.tx();
    tx.set_word(
        0,
        req_id as u64 | (status as u64) << 32 | (val_len as u64) << 48,
    );
    tx.set_word(1, timestamp);
    tx.set_word(2, token);
    tx.set_word(3, timer::ticks() as u32 as u64);
    st.replies.insert(first, tx, tx_len);
    req.send(tx_len);
}

/// FILL (`KV_FILL`): one store per page of `start_page..start_page + count`, inside RAM above the
/// stack; the response value is the page count. Returns (status, value length).
#[inline(always)]
fn fill(req: &mut Request<'_>, kl: usize, vl: usize, rx_len: usize) -> (u8, usize) {
    if kl != 0 || vl != 16 || rx_len < KV_REQ_HEADER_LEN + 16 {
        return (KV_BAD_REQUEST, 0);
    }
    let range = req.word(KV_REQ_HEADER_LEN);
    let seed = req.word(KV_REQ_HEADER_LEN + 8);
    let start = range as u32 as u64;
    let count = range >> 32;
    let pages = ftvm_guest::mem_size() / 4096;
    if start < KV_FILL_FIRST_PAGE || count > KV_FILL_MAX_PAGES || start + count > pages {
        return (KV_BAD_REQUEST, 0);
    }
    let mut page = start;
    while page < start + count {
        // SAFETY: the page is inside guest RAM (checked against `mem_size` above, which the
        // identity map covers) and above everything this program uses: the image, its state and
        // the stack end at STACK_TOP = KV_FILL_FIRST_PAGE * 4096.
        unsafe { core::ptr::write_volatile((page * 4096) as *mut u64, seed ^ page) };
        page += 1;
    }
    tx_value(req.tx(), &[count], 8);
    (KV_OK, 8)
}

/// Writes value words to the transmit buffer after the response header.
#[inline(always)]
fn tx_value(tx: &mut Tx, words: &[u64], len: usize) {
    let n = len.div_ceil(8);
    let mut i = 0;
    while i < n && i < words.len() {
        tx.set_word(VALUE_WORD + i, words[i]);
        i += 1;
    }
}

/// Runs a well-formed request (`kl` key bytes then `vl` value bytes after the header); writes the
/// response value to the transmit buffer; returns (status, value length).
#[inline(always)]
fn execute(
    table: &mut [Slot; KV_SLOTS],
    req: &mut Request<'_>,
    op: u8,
    kl: usize,
    vl: usize,
) -> (u8, usize) {
    let mut key = [0u64; KEY_WORDS];
    rx_words(req, KV_REQ_HEADER_LEN, kl, &mut key);
    // Open addressing, linear probing; no deletions, so an empty slot ends a probe sequence.
    let mut i = fnv1a(req, KV_REQ_HEADER_LEN, kl) as usize;
    let mut probes = 0;
    let (found, idx) = loop {
        if probes == KV_SLOTS {
            // Full and not present.
            if op == KV_GET {
                return (KV_NOT_FOUND, 0);
            }
            return (KV_BAD_REQUEST, 0);
        }
        i &= KV_SLOTS - 1;
        let s = &table[i];
        if s.used == 0 {
            break (false, i);
        }
        if s.key_len as usize == kl && s.key == key {
            break (true, i);
        }
        i += 1;
        probes += 1;
    };
    let s = &mut table[idx];
    match op {
        KV_GET => {
            if !found {
                return (KV_NOT_FOUND, 0);
            }
            let vl = s.val_len as usize;
            tx_value(req.tx(), &s.val, vl);
            (KV_OK, vl)
        }
        KV_PUT => {
            if !found {
                s.used = 1;
                s.key_len = kl as u8;
                s.key = key;
            }
            // Overwrite every word so that bytes past the new length are zero.
            let old_words = (s.val_len as usize).div_ceil(8);
            let mut val = [0u64; VAL_WORDS];
            rx_words(req, KV_REQ_HEADER_LEN + kl, vl, &mut val);
            let n = vl.div_ceil(8).max(old_words);
            let mut w = 0;
            while w < n && w < VAL_WORDS {
                s.val[w] = val[w];
                w += 1;
            }
            s.val_len = vl as u8;
            (KV_OK, 0)
        }
        _ => {
            // INCR: stored value as u64 LE (missing or shorter than 8 bytes = 0), plus one.
            let old = if found && s.val_len >= 8 { s.val[0] } else { 0 };
            if !found {
                s.used = 1;
                s.key_len = kl as u8;
                s.key = key;
            }
            let new = old.wrapping_add(1);
            s.val[0] = new;
            if s.val_len > 8 {
                let mut w = 1;
                while w < VAL_WORDS {
                    s.val[w] = 0;
                    w += 1;
                }
            }
            s.val_len = 8;
            tx_value(req.tx(), &[new], 8);
            (KV_OK, 8)
        }
    }
}

#[cfg(feature = "nondet")]
#[inline(always)]
fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the time-stamp counter. This is the deliberate non-determinism of
    // the `nondet` variant.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi,
                         options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}
