//! The arbiter's wire messages and their codec: no I/O, just bytes in and out.
//!
//! All integers little-endian. A request or response body is at most [`MAX_MESSAGE`] bytes
//! (the framing and tag around it are [`super::session`]'s):
//!
//! ```text
//! request  1 TestAndSet: op=1 u8, epoch u64, pair_len u16, pair, candidate_len u16, candidate
//! request  2 Current:    op=2 u8, pair_len u16, pair
//! request  3 Claim:      op=3 u8, epoch u64, pair_len u16, pair, candidate_len u16, candidate,
//!                        joins_len u16, joins              (joins_len 0: no join address)
//! request  4 Latest:     op=4 u8, pair_len u16, pair
//! response 0 Won:        0 u8, epoch u64
//! response 1 Lost:       1 u8, epoch u64, winner_len u16, winner
//! response 2 None:       2 u8                               (Current: no decision yet)
//! response 3 Decision:   3 u8, epoch u64, winner_len u16, winner   (Current)
//! response 4 Unavailable: 4 u8, msg_len u16, msg            (the server cannot decide durably)
//! response 5 Refused:    5 u8, msg_len u16, msg             (a malformed or invalid request)
//! response 6 Record:     6 u8, epoch u64, winner_len u16, winner, joins_len u16, joins  (Latest)
//! ```
//!
//! A test-and-set (1) is a claim without a join address, and Current (2) answers with None or
//! Decision; Latest (4) answers with None or Record. Clients of this version send 3 and 4 only.

/// Longest request or response body.
pub const MAX_MESSAGE: usize = 1024;

const OP_TEST_AND_SET: u8 = 1;
const OP_CURRENT: u8 = 2;
const OP_CLAIM: u8 = 3;
const OP_LATEST: u8 = 4;
const RE_WON: u8 = 0;
const RE_LOST: u8 = 1;
const RE_NONE: u8 = 2;
const RE_DECISION: u8 = 3;
const RE_UNAVAILABLE: u8 = 4;
const RE_REFUSED: u8 = 5;
const RE_RECORD: u8 = 6;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Request {
    TestAndSet {
        pair: String,
        candidate: String,
        epoch: u64,
    },
    Current {
        pair: String,
    },
    Claim {
        pair: String,
        candidate: String,
        epoch: u64,
        joins_at: Option<String>,
    },
    Latest {
        pair: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Response {
    Won(u64),
    Lost(String, u64),
    Current(Option<(String, u64)>),
    /// The answer to Latest: `(winner, epoch, joins_at)`.
    Latest(Option<(String, u64, Option<String>)>),
    Unavailable(String),
    Refused(String),
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    // Every string we send is validated or truncated to far below u16::MAX.
    let mut len = s.len().min(MAX_MESSAGE / 2);
    while !s.is_char_boundary(len) {
        len -= 1;
    }
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

/// Bounds-checked reading of a received body.
pub(super) struct Cursor<'a>(pub(super) &'a [u8]);

impl<'a> Cursor<'a> {
    pub(super) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    pub(super) fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }
    pub(super) fn u64(&mut self) -> Option<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.bytes(8)?);
        Some(u64::from_le_bytes(b))
    }
    pub(super) fn string(&mut self) -> Option<String> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.bytes(2)?);
        let len = u16::from_le_bytes(b) as usize;
        String::from_utf8(self.bytes(len)?.to_vec()).ok()
    }
    pub(super) fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

impl Request {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Request::TestAndSet {
                pair,
                candidate,
                epoch,
            } => {
                out.push(OP_TEST_AND_SET);
                out.extend_from_slice(&epoch.to_le_bytes());
                put_str(&mut out, pair);
                put_str(&mut out, candidate);
            }
            Request::Current { pair } => {
                out.push(OP_CURRENT);
                put_str(&mut out, pair);
            }
            Request::Claim {
                pair,
                candidate,
                epoch,
                joins_at,
            } => {
                out.push(OP_CLAIM);
                out.extend_from_slice(&epoch.to_le_bytes());
                put_str(&mut out, pair);
                put_str(&mut out, candidate);
                put_str(&mut out, joins_at.as_deref().unwrap_or(""));
            }
            Request::Latest { pair } => {
                out.push(OP_LATEST);
                put_str(&mut out, pair);
            }
        }
        out
    }

    pub(super) fn decode(body: &[u8]) -> Option<Request> {
        let mut c = Cursor(body);
        let req = match c.u8()? {
            OP_TEST_AND_SET => {
                let epoch = c.u64()?;
                Request::TestAndSet {
                    epoch,
                    pair: c.string()?,
                    candidate: c.string()?,
                }
            }
            OP_CURRENT => Request::Current { pair: c.string()? },
            OP_CLAIM => {
                let epoch = c.u64()?;
                Request::Claim {
                    epoch,
                    pair: c.string()?,
                    candidate: c.string()?,
                    joins_at: Some(c.string()?).filter(|a| !a.is_empty()),
                }
            }
            OP_LATEST => Request::Latest { pair: c.string()? },
            _ => return None,
        };
        c.end()?;
        Some(req)
    }
}

impl Response {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Response::Won(epoch) => {
                out.push(RE_WON);
                out.extend_from_slice(&epoch.to_le_bytes());
            }
            Response::Lost(winner, epoch) => {
                out.push(RE_LOST);
                out.extend_from_slice(&epoch.to_le_bytes());
                put_str(&mut out, winner);
            }
            Response::Current(None) => out.push(RE_NONE),
            Response::Current(Some((winner, epoch))) => {
                out.push(RE_DECISION);
                out.extend_from_slice(&epoch.to_le_bytes());
                put_str(&mut out, winner);
            }
            Response::Latest(None) => out.push(RE_NONE),
            Response::Latest(Some((winner, epoch, joins_at))) => {
                out.push(RE_RECORD);
                out.extend_from_slice(&epoch.to_le_bytes());
                put_str(&mut out, winner);
                put_str(&mut out, joins_at.as_deref().unwrap_or(""));
            }
            Response::Unavailable(msg) => {
                out.push(RE_UNAVAILABLE);
                put_str(&mut out, msg);
            }
            Response::Refused(msg) => {
                out.push(RE_REFUSED);
                put_str(&mut out, msg);
            }
        }
        out
    }

    pub(super) fn decode(body: &[u8]) -> Option<Response> {
        let mut c = Cursor(body);
        let resp = match c.u8()? {
            RE_WON => Response::Won(c.u64()?),
            RE_LOST => {
                let epoch = c.u64()?;
                Response::Lost(c.string()?, epoch)
            }
            RE_NONE => Response::Current(None),
            RE_DECISION => {
                let epoch = c.u64()?;
                Response::Current(Some((c.string()?, epoch)))
            }
            RE_RECORD => {
                let epoch = c.u64()?;
                let winner = c.string()?;
                let joins_at = Some(c.string()?).filter(|a| !a.is_empty());
                Response::Latest(Some((winner, epoch, joins_at)))
            }
            RE_UNAVAILABLE => Response::Unavailable(c.string()?),
            RE_REFUSED => Response::Refused(c.string()?),
            _ => return None,
        };
        c.end()?;
        Some(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for req in [
            Request::TestAndSet {
                pair: "p".into(),
                candidate: "host-a".into(),
                epoch: 7,
            },
            Request::Current { pair: "p".into() },
            Request::Claim {
                pair: "p".into(),
                candidate: "host-a".into(),
                epoch: 7,
                joins_at: Some("/run/j.sock".into()),
            },
            Request::Claim {
                pair: "p".into(),
                candidate: "host-a".into(),
                epoch: 7,
                joins_at: None,
            },
            Request::Latest { pair: "p".into() },
        ] {
            assert_eq!(Request::decode(&req.encode()), Some(req));
        }
        for resp in [
            Response::Won(3),
            Response::Lost("b".into(), 9),
            Response::Current(None),
            Response::Current(Some(("c".into(), 2))),
            Response::Latest(Some(("c".into(), 2, Some("10.0.0.1:7420".into())))),
            Response::Latest(Some(("c".into(), 2, None))),
            Response::Unavailable("disk".into()),
            Response::Refused("bad".into()),
        ] {
            let bytes = resp.encode();
            assert_eq!(Response::decode(&bytes), Some(resp));
            // Every truncation and an extra byte are refused, never misread.
            for n in 0..bytes.len() {
                assert_eq!(Response::decode(&bytes[..n]), None);
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert_eq!(Response::decode(&longer), None);
        }
        assert_eq!(Request::decode(&[9, 0, 0]), None);
        // Long messages are cut at a character boundary, so they still decode.
        let long = Response::Unavailable("é".repeat(MAX_MESSAGE));
        assert!(matches!(
            Response::decode(&long.encode()),
            Some(Response::Unavailable(m)) if m.len() <= MAX_MESSAGE / 2
        ));
    }

    #[test]
    fn truncated_or_padded_requests_are_refused() {
        let req = Request::TestAndSet {
            pair: "pair-1".into(),
            candidate: "host-a".into(),
            epoch: 1,
        };
        let bytes = req.encode();
        for n in 0..bytes.len() {
            assert_eq!(Request::decode(&bytes[..n]), None, "{n} bytes");
        }
        let mut longer = bytes;
        longer.push(0);
        assert_eq!(Request::decode(&longer), None);
        // A string that is not UTF-8.
        assert_eq!(Request::decode(&[2, 1, 0, 0xff]), None);
        assert_eq!(
            Request::decode(&[2, 1, 0, b'p']),
            Some(Request::Current { pair: "p".into() })
        );
    }
}
