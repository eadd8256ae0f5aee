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

pub mod dpdk_packets;
pub mod rdma_setup;

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

/// The next value of a xorshift64 generator (the corpus tests' deterministic mutation source).
pub fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
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

/// The log stream after the handshake: what a backup makes of any bytes on the medium.
pub mod log_stream {
    use std::time::Duration;

    use logfmt::{Entry, Event, Position};

    use crate::auth::{SessionKeys, TRAILER_LEN};
    use crate::channel::{Ack, Backup, BackupLink, ChannelConfig};
    use crate::error::ChannelError;
    use crate::PreSharedKey;

    const EPOCH: u64 = 5;
    const MAX_FRAME: usize = 4096;

    /// The session keys the genuine frames are sealed with (the fuzzer never learns them from
    /// anything but the genuine frames themselves).
    fn keys() -> SessionKeys {
        SessionKeys::for_test(0x42)
    }

    /// A backup link over fixed bytes, framed as TCP frames them (frame, then its trailer).
    /// A test double for a medium, named as one.
    #[derive(Debug)]
    struct BytesLink<'a> {
        bytes: &'a [u8],
        at: usize,
        peeked: usize,
    }

    impl BackupLink for BytesLink<'_> {
        fn peek(&mut self) -> Result<Option<&[u8]>, ChannelError> {
            let rest = &self.bytes[self.at..];
            if rest.len() < logfmt::FRAME_HEADER_LEN {
                return Ok(None);
            }
            let len = logfmt::peek_frame_len(rest)? + TRAILER_LEN;
            if len > MAX_FRAME {
                return Err(ChannelError::FrameTooLarge {
                    len,
                    max: MAX_FRAME,
                });
            }
            if rest.len() < len {
                return Ok(None);
            }
            self.peeked = len;
            Ok(Some(&rest[..len]))
        }
        fn consume(&mut self) -> Result<(), ChannelError> {
            self.at += self.peeked;
            self.peeked = 0;
            Ok(())
        }
        fn ack(&mut self, _ack: Ack) -> Result<(), ChannelError> {
            Ok(())
        }
    }

    /// The genuine sealed frames (frame bytes with trailer), in the order a primary sends them:
    /// three data frames and a heartbeat between them.
    pub fn genuine() -> Vec<Vec<u8>> {
        let mut data = keys().frame_sealer();
        let mut beats = keys().frame_sealer();
        let mut out = Vec::new();
        let mut seal = |frame: Vec<u8>, beat: bool| {
            let mut b = frame;
            b.resize(b.len() + TRAILER_LEN, 0);
            if beat {
                beats.seal(&mut b, true);
            } else {
                data.seal(&mut b, false);
            }
            out.push(b);
        };
        let e = |exit: u64, ev: Event<'static>| Entry::new(Position::at_exit(exit), ev);
        let frame = |seq: u64, entries: &[Entry<'_>]| {
            logfmt::encode_frame(EPOCH, seq, entries).unwrap_or_default()
        };
        seal(frame(1, &[e(1, Event::Clock { ns: 7 })]), false);
        seal(
            frame(
                2,
                &[
                    e(
                        2,
                        Event::DeviceInput {
                            device: 1,
                            data: b"set k v",
                        },
                    ),
                    e(3, Event::Interrupt { vector: 33 }),
                ],
            ),
            false,
        );
        seal(frame(4, &[]), true);
        seal(
            frame(
                4,
                &[e(
                    4,
                    Event::OutputMarker {
                        device: 1,
                        len: 2,
                        digest: logfmt::digest(b"ok"),
                    },
                )],
            ),
            false,
        );
        out
    }

    /// The seed: the genuine frames back to back.
    pub fn seed() -> Vec<u8> {
        genuine().concat()
    }

    /// Feeds `data` to a backup as the medium's bytes. Must hold: no panic; the backup stops
    /// (a typed error, or the end of the bytes) after a bounded number of rounds; and every
    /// frame it delivers is one of the genuine frames, each at most once and in order — bytes
    /// without the session key can make it deliver nothing else. Returns how many frames it
    /// delivered.
    pub fn check(data: &[u8]) -> Result<usize, String> {
        let key = PreSharedKey::new(b"log-stream-fuzzing-key".to_vec())
            .map_err(|e| format!("key: {e}"))?;
        let mut config = ChannelConfig::new(0x5EED, EPOCH, key);
        config.max_frame_bytes = MAX_FRAME;
        config.ring_capacity = 64 * 1024;
        config.heartbeat_timeout = Duration::from_secs(3600);
        let link = BytesLink {
            bytes: data,
            at: 0,
            peeked: 0,
        };
        let mut backup =
            Backup::new(link, config, 1, EPOCH, &keys()).map_err(|e| format!("backup: {e}"))?;
        let genuine: Vec<Vec<u8>> = genuine()
            .into_iter()
            .map(|g| g[..g.len() - TRAILER_LEN].to_vec())
            .collect();
        let mut next = 0usize;
        let mut delivered = 0usize;
        let mut bad = None;
        for _ in 0..data.len() / logfmt::FRAME_HEADER_LEN + 2 {
            let r = backup.poll(|frame| {
                let bytes = frame.as_bytes();
                match genuine[next..].iter().position(|g| g == bytes) {
                    Some(k) => {
                        next += k + 1;
                        delivered += 1;
                    }
                    None => {
                        bad.get_or_insert_with(|| format!("delivered a frame that is not a genuine one, or again or out of order: {bytes:02x?}"));
                    }
                }
            });
            if let Some(b) = bad.take() {
                return Err(b);
            }
            match r {
                Ok(0) => return Ok(delivered),
                Ok(_) => {}
                Err(e) if e.to_string().is_empty() => {
                    return Err("an error without a reason".into())
                }
                Err(_) => return Ok(delivered),
            }
        }
        Err("the backup did not stop".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn no_bytes_on_the_log_stream_make_the_backup_deliver_anything_not_genuine() {
        let seed = log_stream::seed();
        log_stream::check(&seed).expect("the seed");
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut current = seed.clone();
        let mut runs = 0;
        for _ in 0..20_000 {
            if let Err(v) = log_stream::check(&current) {
                panic!("{v}: input {current:02x?}");
            }
            runs += 1;
            let r = xorshift(&mut state);
            current = mutate(if r.is_multiple_of(3) { &current } else { &seed }, r);
        }
        assert_eq!(runs, 20_000);
    }

    #[test]
    fn the_genuine_log_stream_is_delivered_whole() {
        // The check's own control: the seed's three data frames all get through, so a mutant
        // that changes nothing is not "refused" for a wrong reason.
        let seed = log_stream::seed();
        let data = log_stream::genuine();
        assert_eq!(data.len(), 4);
        assert_eq!(log_stream::check(&seed), Ok(3), "the three data frames");
        // The second frame's last tag bit flipped: refused; the frame before it delivered.
        let mut bad = seed.clone();
        let at = data[0].len() + data[1].len() - 1;
        bad[at] ^= 1;
        assert_eq!(log_stream::check(&bad), Ok(1));
        // A replayed first frame after the whole stream: nothing more.
        let mut again = seed.clone();
        again.extend_from_slice(&data[0]);
        assert_eq!(log_stream::check(&again), Ok(3));
    }

    /// The seed files `scripts/fuzz.sh` starts the cargo-fuzz targets from
    /// (`fuzz/seeds/<target>/`) are the seeds these checks use.
    #[test]
    fn the_checked_in_fuzz_seeds_are_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        let want: Vec<(String, Vec<u8>)> =
            std::iter::once(("log_stream/genuine.bin".to_string(), log_stream::seed()))
                .chain(
                    seeds()
                        .into_iter()
                        .enumerate()
                        .map(|(i, s)| (format!("handshake/seed-{i}.bin"), s)),
                )
                .chain(
                    dpdk_packets::seeds()
                        .into_iter()
                        .enumerate()
                        .map(|(i, s)| (format!("dpdk_packets/seed-{i}.bin"), s)),
                )
                .chain(
                    rdma_setup::seeds()
                        .into_iter()
                        .enumerate()
                        .map(|(i, s)| (format!("rdma_setup/seed-{i}.bin"), s)),
                )
                .collect();
        if std::env::var_os("FTVM_WRITE_FUZZ_SEEDS").is_some() {
            for (name, bytes) in &want {
                let path = root.join(name);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).expect("seed directory");
                }
                std::fs::write(path, bytes).expect("write seed");
            }
        }
        for (name, bytes) in want {
            let have = std::fs::read(root.join(&name)).unwrap_or_default();
            assert!(
                have == bytes,
                "fuzz/seeds/{name} is stale: FTVM_WRITE_FUZZ_SEEDS=1 cargo test -p transport --lib checked_in_fuzz_seeds"
            );
        }
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
