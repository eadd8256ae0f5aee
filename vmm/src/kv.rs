//! The wire format of the guest's key-value service (see `GUEST-ABI.md`), for clients and tests:
//! requests are encoded here exactly as the guest parses them, responses decoded as it writes
//! them. [`KvModel`] is the client-side model a load generator checks responses against.

use std::collections::HashMap;

// The constants the guest and its clients share (`KV_*`), compiled from the guest's own file.
use crate::layout as abi;
#[path = "../../guests/kvstore/src/proto.rs"]
mod proto;
pub use proto::*;

/// GET: return the stored value.
pub const OP_GET: u8 = KV_GET;
/// PUT: store a value.
pub const OP_PUT: u8 = KV_PUT;
/// INCR: add one to the u64 stored at the key and return it.
pub const OP_INCR: u8 = KV_INCR;
/// FILL: the guest dirties a range of pages (state-transfer load; see [`KV_FILL`]).
pub const OP_FILL: u8 = KV_FILL;
/// Longest key.
pub const MAX_KEY: usize = KV_MAX_KEY;
/// Longest value.
pub const MAX_VALUE: usize = KV_MAX_VAL;
/// Bytes before the value in a response.
pub const RESPONSE_HEADER: usize = KV_RESP_HEADER_LEN;

/// Response status codes.
pub mod status {
    /// Done.
    pub const OK: u8 = super::KV_OK;
    /// GET of a missing key.
    pub const NOT_FOUND: u8 = super::KV_NOT_FOUND;
    /// Malformed request or full table.
    pub const BAD_REQUEST: u8 = super::KV_BAD_REQUEST;
}

/// Encodes a request. Keys of 1..=32 bytes and values of at most 64 bytes; longer ones are the
/// caller's error and are encoded anyway (the guest answers them with `BAD_REQUEST`).
pub fn encode_request(id: u32, op: u8, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(8 + key.len() + value.len());
    r.extend_from_slice(&id.to_le_bytes());
    r.push(op);
    r.push(key.len().min(255) as u8);
    r.extend_from_slice(&(value.len().min(65535) as u16).to_le_bytes());
    r.extend_from_slice(key);
    r.extend_from_slice(value);
    r
}

/// A decoded response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The request it answers.
    pub id: u32,
    /// See [`status`].
    pub status: u8,
    /// The guest's clock when it handled the request.
    pub timestamp_ns: u64,
    /// Random token drawn by the guest.
    pub token: u64,
    /// Timer ticks the guest had seen.
    pub ticks: u32,
    /// The value returned.
    pub value: Vec<u8>,
}

/// Decodes a response; `None` if it is malformed.
pub fn decode_response(b: &[u8]) -> Option<Response> {
    let u32_at = |i: usize| {
        b.get(i..i + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |i: usize| {
        b.get(i..i + 8).map(|s| {
            let mut a = [0; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
    };
    let len = usize::from(u16::from_le_bytes([*b.get(6)?, *b.get(7)?]));
    let value = b.get(RESPONSE_HEADER..RESPONSE_HEADER + len)?.to_vec();
    if b.len() != RESPONSE_HEADER + len {
        return None;
    }
    Some(Response {
        id: u32_at(0)?,
        status: *b.get(4)?,
        timestamp_ns: u64_at(8)?,
        token: u64_at(16)?,
        ticks: u32_at(24)?,
        value,
    })
}

/// What a correct service answers, tracked by the client.
#[derive(Debug, Default, Clone)]
pub struct KvModel {
    store: HashMap<Vec<u8>, Vec<u8>>,
}

impl KvModel {
    /// Applies a request to the model and returns the (status, value) the service must answer.
    pub fn apply(&mut self, op: u8, key: &[u8], value: &[u8]) -> (u8, Vec<u8>) {
        if op == OP_FILL {
            // Touches no key; answers with the page count (the caller keeps the range valid).
            return match value.get(4..8) {
                Some(c) if key.is_empty() && value.len() == 16 => {
                    let count = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    (status::OK, u64::from(count).to_le_bytes().to_vec())
                }
                _ => (status::BAD_REQUEST, Vec::new()),
            };
        }
        if key.is_empty() || key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return (status::BAD_REQUEST, Vec::new());
        }
        match op {
            OP_GET => match self.store.get(key) {
                Some(v) => (status::OK, v.clone()),
                None => (status::NOT_FOUND, Vec::new()),
            },
            OP_PUT => {
                self.store.insert(key.to_vec(), value.to_vec());
                (status::OK, Vec::new())
            }
            OP_INCR => {
                let old = self.store.get(key).map_or(0, |v| {
                    let mut a = [0u8; 8];
                    let n = v.len().min(8);
                    a[..n].copy_from_slice(&v[..n]);
                    if v.len() < 8 {
                        0
                    } else {
                        u64::from_le_bytes(a)
                    }
                });
                let new = old.wrapping_add(1).to_le_bytes().to_vec();
                self.store.insert(key.to_vec(), new.clone());
                (status::OK, new)
            }
            _ => (status::BAD_REQUEST, Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_follows_the_documented_semantics() {
        let mut m = KvModel::default();
        assert_eq!(m.apply(OP_GET, b"k", b""), (status::NOT_FOUND, vec![]));
        assert_eq!(
            m.apply(OP_INCR, b"k", b""),
            (status::OK, 1u64.to_le_bytes().to_vec())
        );
        assert_eq!(
            m.apply(OP_INCR, b"k", b""),
            (status::OK, 2u64.to_le_bytes().to_vec())
        );
        assert_eq!(m.apply(OP_PUT, b"k", b"abc"), (status::OK, vec![]));
        assert_eq!(
            m.apply(OP_INCR, b"k", b""),
            (status::OK, 1u64.to_le_bytes().to_vec())
        );
        assert_eq!(m.apply(OP_PUT, b"", b"x"), (status::BAD_REQUEST, vec![]));
    }

    #[test]
    fn responses_decode_and_malformed_ones_do_not() {
        let mut r = vec![0u8; RESPONSE_HEADER];
        r[..4].copy_from_slice(&7u32.to_le_bytes());
        r[6..8].copy_from_slice(&3u16.to_le_bytes());
        r.extend_from_slice(b"xyz");
        let d = decode_response(&r).expect("valid");
        assert_eq!((d.id, d.value.as_slice()), (7, &b"xyz"[..]));
        assert_eq!(decode_response(&r[..r.len() - 1]), None);
        assert_eq!(decode_response(&[1, 2, 3]), None);
    }
}
