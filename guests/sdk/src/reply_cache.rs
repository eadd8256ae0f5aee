//! At most once over a lossy network: a cache of recent responses, keyed by the request's first
//! word, so that a client's retry is answered with the response already given instead of being
//! executed again.
//!
//! Clients of an ftvm service retry a request (same bytes, same request id) when no response
//! came. After a failover that matters: the survivor replays the old primary's log, so a request
//! the old primary executed but whose response was still held by the output rule is executed
//! again in the replay, and its retry must not be executed a third time. A service keeps its
//! responses here and answers a request whose key (its first 8 bytes: request id and whatever
//! the protocol puts next) matches a cached one from the cache, byte for byte.
//!
//! `SETS` sets of `WAYS` entries; the set is the key's low 32 bits modulo `SETS` (with request
//! ids in the low 32 bits, consecutive requests spread over the sets), each set replacing its
//! oldest entry. A retry is caught as long as its response is still cached: a set keeps its last
//! `WAYS` responses. Key 0 is never cached (it marks an empty entry).
//!
//! A cache lives in the guest's state (it is large: put it in a [`crate::Global`] so it lands in
//! `.bss`). Lookups and inserts cost a few word operations and one word copy per 8 bytes of
//! response; `WORDS` bounds the response length (`8 * WORDS` bytes).

use crate::net::{Request, Tx};

/// Recent responses: `SETS` sets of `WAYS` entries of at most `8 * WORDS` bytes.
#[derive(Debug)]
pub struct ReplyCache<const SETS: usize, const WAYS: usize, const WORDS: usize> {
    sets: [[Reply<WORDS>; WAYS]; SETS],
    /// Per set, the way the next response replaces.
    next: [u8; SETS],
}

/// A cached response.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct Reply<const WORDS: usize> {
    /// The request's first word; 0 = empty.
    key: u64,
    /// Response length in bytes.
    len: u64,
    words: [u64; WORDS],
}

impl<const WORDS: usize> Reply<WORDS> {
    const EMPTY: Self = Reply {
        key: 0,
        len: 0,
        words: [0; WORDS],
    };

    /// Response length in bytes (what was cached: at most `8 * WORDS`).
    #[inline(always)]
    pub fn len(&self) -> usize {
        let len = self.len as usize;
        if len > 8 * WORDS {
            8 * WORDS
        } else {
            len
        }
    }

    /// Whether the cached response is empty.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sends the cached response again as the answer to `req` (NET_TX).
    #[inline(always)]
    pub fn resend(&self, req: &mut Request<'_>) {
        let len = self.len();
        let n = len.div_ceil(8);
        let tx = req.tx();
        let mut i = 0;
        while i < n && i < WORDS {
            tx.set_word(i, self.words[i]);
            i += 1;
        }
        req.send(len);
    }
}

impl<const SETS: usize, const WAYS: usize, const WORDS: usize> ReplyCache<SETS, WAYS, WORDS> {
    /// An empty cache (all zero: in `.bss` when it is part of a zero static).
    pub const EMPTY: Self = {
        assert!(
            SETS >= 1 && WAYS >= 1 && WAYS <= 256,
            "1..=256 ways, at least one set"
        );
        ReplyCache {
            sets: [[Reply::EMPTY; WAYS]; SETS],
            next: [0; SETS],
        }
    };

    #[inline(always)]
    fn set_of(key: u64) -> usize {
        (key as u32) as usize % SETS
    }

    /// The cached response to the request whose first word is `key`, if any.
    #[inline(always)]
    pub fn get(&self, key: u64) -> Option<&Reply<WORDS>> {
        if key == 0 {
            return None;
        }
        let set = &self.sets[Self::set_of(key)];
        let mut hit = None;
        let mut w = 0;
        while w < WAYS {
            if set[w].key == key {
                hit = Some(&set[w]);
            }
            w += 1;
        }
        hit
    }

    /// Caches the response to the request whose first word is `key`: the first `len` bytes of
    /// `tx` (at most `8 * WORDS` are kept), replacing the oldest entry of its set. Key 0 is not cached.
    #[inline(always)]
    pub fn insert(&mut self, key: u64, tx: &Tx, len: usize) {
        if key == 0 {
            return;
        }
        let s = Self::set_of(key);
        let way = self.next[s] as usize % WAYS;
        self.next[s] = ((way + 1) % WAYS) as u8;
        let r = &mut self.sets[s][way];
        r.key = key;
        r.len = len as u64;
        let n = len.div_ceil(8);
        let mut i = 0;
        while i < n && i < WORDS {
            r.words[i] = tx.word(i);
            i += 1;
        }
    }
}
