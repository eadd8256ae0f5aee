//! What must hold for any bytes the arbiter server decodes — a message from a client (after
//! its session's authentication), an answer from the server, a record of its decision log —
//! checked by the fuzz target (`fuzz/fuzz_targets/arbiter_messages.rs`, nightly) and the
//! corpus test below (stable: seeds and thousands of mutants).
//!
//! Decoding never panics, and what decodes is canonical: encoding it again gives back exactly
//! the bytes (so two readers cannot take one message two ways), and a decision-log record
//! never claims more bytes than it was given.

use super::decision_log::{decode_record, encode_record};
use super::protocol::{Request, Response};

/// Checks `input` as a request, an answer and a log record.
pub fn check(input: &[u8]) -> Result<(), String> {
    if let Some(req) = Request::decode(input) {
        if req.encode() != input {
            return Err(format!("request {req:?} does not encode back to its bytes"));
        }
    }
    if let Some(resp) = Response::decode(input) {
        if resp.encode() != input {
            return Err(format!("answer {resp:?} does not encode back to its bytes"));
        }
    }
    if let Some((pair, rec, len)) = decode_record(input) {
        if len > input.len() || len < 8 {
            return Err(format!("a record of {len} bytes in {} bytes", input.len()));
        }
        let again = encode_record(&pair, &rec.winner, rec.epoch, rec.joins_at.as_deref());
        if again != input[..len] {
            return Err(format!(
                "record {pair:?} {rec:?} does not encode back to its bytes"
            ));
        }
    }
    Ok(())
}

/// Seeds: one valid encoding of every message kind and a log record, with and without a
/// join address.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = vec![
        Request::TestAndSet {
            pair: "pair-1".into(),
            candidate: "host-a".into(),
            epoch: 7,
        }
        .encode(),
        Request::Current {
            pair: "pair-1".into(),
        }
        .encode(),
        Request::Claim {
            pair: "pair-1".into(),
            candidate: "host-a".into(),
            epoch: 0,
            joins_at: Some("10.0.0.1:7430".into()),
        }
        .encode(),
        Request::Latest {
            pair: "pair-1".into(),
        }
        .encode(),
        Response::Won(8).encode(),
        Response::Lost("host-b".into(), 9).encode(),
        Response::Current(Some(("host-b".into(), 9))).encode(),
        Response::Latest(Some(("host-b".into(), 9, Some("/run/j.sock".into())))).encode(),
        Response::Unavailable("etcd: no leader".into()).encode(),
        Response::Refused("bad pair id".into()).encode(),
        encode_record("pair-1", "host-a", 3, None),
        encode_record("pair-1", "host-a", 4, Some("10.0.0.1:7430")),
    ];
    out.push(Vec::new());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn every_seed_decodes_as_what_it_is() {
        let seeds = seeds();
        assert!(Request::decode(&seeds[0]).is_some());
        assert!(Response::decode(&seeds[4]).is_some());
        assert!(decode_record(&seeds[11]).is_some());
    }

    #[test]
    fn no_bytes_decode_in_two_ways_or_panic() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for seed in seeds() {
            for _ in 0..2000 {
                let r = xorshift(&mut state);
                let mut m = seed.clone();
                match r % 4 {
                    0 if !m.is_empty() => {
                        let i = (r >> 8) as usize % m.len();
                        m[i] ^= 1 << ((r >> 40) % 8);
                    }
                    1 => m.truncate((r >> 8) as usize % (m.len() + 1)),
                    2 if !m.is_empty() => {
                        let i = (r >> 8) as usize % m.len();
                        m[i] = (r >> 32) as u8;
                    }
                    _ => m.extend_from_slice(&r.to_le_bytes()[..(r >> 60) as usize % 8]),
                }
                if let Err(v) = check(&m) {
                    panic!("{v}: input {m:02x?}");
                }
            }
        }
    }
}
