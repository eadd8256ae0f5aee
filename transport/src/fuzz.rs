//! What must hold for any bytes a peer sends during the handshake — the checks the fuzz targets
//! (`fuzz/fuzz_targets/handshake_*.rs`, nightly) and the corpus tests below (stable: seeds and
//! thousands of mutants) both run.
//!
//! The peer's bytes come from a [`Scripted`] stream: reads return the input, writes are kept.
//! No input may make either side accept (the input cannot hold a MAC over the fresh nonce this
//! side just drew), panic, or hang (the stream ends where the input does).

use std::io::{Read, Write};

use crate::handshake::{self, GuestIdentity, MediumKind, SessionParams, PROTOCOL_VERSION};
use crate::PreSharedKey;

/// A stream whose reads return a fixed input (then end) and whose writes are kept.
#[derive(Debug)]
pub struct Scripted<'a> {
    input: &'a [u8],
    /// Everything written to it.
    pub written: Vec<u8>,
}

impl<'a> Scripted<'a> {
    /// A stream that will read `input`.
    pub fn new(input: &'a [u8]) -> Self {
        Scripted {
            input,
            written: Vec::new(),
        }
    }
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The session both checks run as (the peer's bytes never know its key).
pub fn params() -> SessionParams {
    SessionParams {
        session_id: 0x5EED,
        epoch: 3,
        medium: MediumKind::Tcp,
        key: PreSharedKey::new(b"fuzzing-key-nobody-else-knows".to_vec())
            .unwrap_or_else(|_| unreachable_key()),
        guest: GuestIdentity::default(),
        crypto: crate::auth::ChannelCrypto::Auth,
    }
}

#[cold]
fn unreachable_key() -> PreSharedKey {
    // The literal above is longer than the minimum; this is never reached.
    panic!("the fuzzing key is too short")
}

/// A backup reading `input` as the primary's messages: it must refuse.
pub fn check_backup(input: &[u8]) -> Result<(), String> {
    let mut s = Scripted::new(input);
    match handshake::backup_authenticate(&mut s, &params()) {
        Ok(h) => Err(format!(
            "the backup accepted a primary that never had the key (epoch {})",
            h.epoch
        )),
        Err(e) if e.to_string().is_empty() => Err("a refusal without a reason".into()),
        Err(_) => Ok(()),
    }
}

/// A primary reading `input` as the backup's messages: it must refuse.
pub fn check_primary(input: &[u8]) -> Result<(), String> {
    let mut s = Scripted::new(input);
    match handshake::primary_handshake(&mut s, &params()) {
        Ok(a) => Err(format!(
            "the primary accepted a backup that never had the key (epoch {})",
            a.epoch
        )),
        Err(e) if e.to_string().is_empty() => Err("a refusal without a reason".into()),
        Err(_) => Ok(()),
    }
}

/// Seeds: well-formed message heads (so mutants reach the checks behind them) and junk.
pub fn seeds() -> Vec<Vec<u8>> {
    let p = params();
    let head = |kind: u8, role: u8, len: usize| {
        let mut m = vec![0u8; len];
        m[..4].copy_from_slice(b"FTHS");
        m[4] = kind;
        m[5] = role;
        m[6..8].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        m[8..16].copy_from_slice(&p.session_id.to_le_bytes());
        m[16..24].copy_from_slice(&p.epoch.to_le_bytes());
        m[56..60].copy_from_slice(&(p.medium as u32).to_le_bytes());
        // The crypto mode: the Hello's byte 60, the Challenge's byte 88.
        match kind {
            1 => m[60] = p.crypto as u8,
            _ if len > 88 => m[88] = p.crypto as u8,
            _ => {}
        }
        m
    };
    // A Hello (64 + 40 bytes) then a Response (40), as a primary sends them; a Challenge
    // (96 + 40) then a Welcome (24), as a backup sends them.
    let mut primary = head(1, 1, 104);
    primary.extend(vec![3u8; 40]);
    let mut backup = head(2, 2, 136);
    backup.extend(vec![0u8; 24]);
    vec![
        Vec::new(),
        primary,
        backup,
        head(1, 1, 64),
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        vec![0xFF; 300],
    ]
}

/// `seed` changed by one of a few mutations chosen by `r` (a deterministic generator's output).
pub fn mutate(seed: &[u8], r: u64) -> Vec<u8> {
    let mut m = seed.to_vec();
    let pick = |n: usize, salt: u64| {
        if n == 0 {
            0
        } else {
            ((r >> 8).wrapping_mul(salt | 1) % n as u64) as usize
        }
    };
    match r % 5 {
        0 if !m.is_empty() => {
            let i = pick(m.len(), 3);
            m[i] ^= 1 << ((r >> 40) % 8);
        }
        1 => m.truncate(pick(m.len() + 1, 5)),
        2 if !m.is_empty() => {
            let i = pick(m.len(), 7);
            m[i] = (r >> 32) as u8;
        }
        3 => m.extend_from_slice(&r.to_le_bytes()),
        _ => {
            // A field's worth of bytes set to an extreme.
            let i = pick(m.len().max(1), 11);
            for b in m.iter_mut().skip(i).take(8) {
                *b = if r & 1 == 0 { 0 } else { 0xFF };
            }
        }
    }
    m
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
    fn no_bytes_make_either_side_accept_the_handshake() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut runs = 0;
        for seed in seeds() {
            let mut current = seed.clone();
            for _ in 0..1500 {
                for check in [check_backup, check_primary] {
                    if let Err(v) = check(&current) {
                        panic!("{v}: input {current:02x?}");
                    }
                    runs += 1;
                }
                // Mutate the mutant now and then, so mutations pile up.
                let r = xorshift(&mut state);
                current = mutate(if r.is_multiple_of(3) { &current } else { &seed }, r);
            }
        }
        assert_eq!(runs, seeds().len() * 3000);
    }

    #[test]
    fn the_seeds_reach_the_authentication() {
        // A well-formed Hello gets the backup as far as its Challenge: it wrote one.
        let seed = &seeds()[1];
        let mut s = Scripted::new(seed);
        let e = handshake::backup_authenticate(&mut s, &params()).err();
        assert!(e.is_some());
        assert!(
            s.written.len() >= 136,
            "the backup sent its challenge: {} bytes, {e:?}",
            s.written.len()
        );
    }
}
