//! The RDMA medium end to end, on real (soft-)RoCE devices: this process is the primary on
//! device A, a child process (this binary re-executed as `backup <addr>`) the backup on device B.
//!
//! - `million_entries`: a million entries (`FTVM_RDMA_ENTRIES` overrides the count) of random
//!   sizes through a 256 KiB ring — 665 wraps — every entry verified in order by the backup.
//!   In the TCG guest this debug build moves 11,000–32,000 entries/s depending on the host's
//!   load (31–88 s for the million; a release build about 46,000/s), inside the CI's
//!   per-binary timeout;
//! - `backup_killed` / `backup_frozen`: the backup SIGKILLed or SIGSTOPped mid-stream; the
//!   primary's error arrives within the heartbeat timeout;
//! - `wrong_key_gets_no_rkey`: a peer that fails authentication receives the challenge and a
//!   refusal and nothing else — no set-up message, no rkey; the real primary with a wrong key is
//!   refused on both sides;
//! - `garbage_ring_is_refused`: an authenticated primary writing into the ring header is
//!   refused by the backup's NIC; `sealed_garbage_is_refused`: a sealed garbage frame, or a seal
//!   in the doorbell block claiming more than the ring holds, gets a typed error from the
//!   backup, not a frame;
//! - `bad_setup_is_refused`: an authenticated peer announcing an out-of-bounds ACK block, or a
//!   backup announcing a ring of a bad size or address, is refused with `RdmaSetup`;
//! - `listener_survives_strays`: the medium layer's listener (`transport::Listener` on
//!   `Medium::Rdma`) refuses stray connections to its TCP set-up address — a port probe, an
//!   HTTP request, another protocol version, a peer with the wrong key, a silent connection —
//!   one after another and goes on accepting; then the real primary dials and its entries are
//!   verified and acknowledged.
//!
//! Needs `FTVM_RDMA_DEV_A/B`, `FTVM_RDMA_GID_A/B`, `FTVM_RDMA_IP_A/B` (the soft-RoCE guest of
//! `scripts/softroce-ci.sh` sets them); without them it FAILS, since it is only ever run there.
//! Custom harness (`harness = false`) so the backup role is a plain command line.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod common;

use common::stream::{
    self, check_backup_loss, check_verdict, commit, end_stream, lose_backup, send_stream,
    verify_stream, BackupProcess, Loss,
};
use std::sync::Arc;
use transport::handshake::{self, MediumKind, SessionParams};

use transport::medium::{self, Listener, Medium, RdmaDevice};
use transport::rdma::setup::{
    seal_sum, HeadSeal, PeerInfo, RemoteRegion, Role, ACK_BLOCK_LEN, FLAG_SEALED, SETUP_LEN,
};
use transport::rdma::verbs::{post_writes, Endpoint, RdmaWrite, SendQueue};
use transport::rdma::{self, RdmaConfig};
use transport::{ChannelConfig, ChannelError, HeapRegion, PreSharedKey};

const KEY: &[u8] = b"rdma-channel-test-key";
const SESSION: u64 = 0x4D4A;

fn config() -> ChannelConfig {
    let key = PreSharedKey::new(KEY.to_vec()).expect("key");
    let mut c = ChannelConfig::new(SESSION, 1, key);
    c.heartbeat_interval = Duration::from_millis(20);
    // Generous: under TCG emulation on a loaded host a healthy backup was once silent 578 ms.
    c.heartbeat_timeout = Duration::from_secs(1);
    // A small ring, so a million entries wrap it hundreds of times.
    c.ring_capacity = 256 * 1024;
    c.max_frame_bytes = 16 * 1024;
    // Two processes on the guest's two vCPUs: do not spin for long.
    c.poll = transport::PollPolicy::BALANCED;
    c
}

struct Sides {
    a: RdmaConfig,
    b: RdmaConfig,
    ip_b: IpAddr,
}

fn sides() -> Result<Sides, String> {
    let (a, _) = RdmaConfig::from_env("A").map_err(|e| e.to_string())?;
    let (b, ip_b) = RdmaConfig::from_env("B").map_err(|e| e.to_string())?;
    Ok(Sides { a, b, ip_b })
}

fn entries() -> u64 {
    std::env::var("FTVM_RDMA_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

// ---------------------------------------------------------------- backup role (child process)

fn backup_role(address: &str) -> Result<(), String> {
    let s = sides()?;
    let listener = TcpListener::bind(address).map_err(|e| e.to_string())?;
    println!(
        "LISTENING {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let b = rdma::accept(&listener, config(), &s.b).map_err(|e| e.to_string())?;
    println!("VERIFIED {}", verify_stream(b)?);
    Ok(())
}

// ---------------------------------------------------------------- primary role (this process)

fn spawn_backup(s: &Sides) -> Result<(BackupProcess, String), String> {
    stream::spawn_backup(&["backup", &SocketAddr::new(s.ip_b, 0).to_string()])
}

fn stream_entries(s: &Sides, count: u64) -> Result<(), String> {
    let (mut backup, addr) = spawn_backup(s)?;
    let mut p = rdma::connect(addr.as_str(), config(), &s.a).map_err(|e| e.to_string())?;
    let started = Instant::now();
    send_stream(&mut p, count, 0x5EED, |_| String::new())?;
    commit(&mut p, count + 1)?;
    let end_seq = end_stream(&mut p, count + 2)?;
    let took = started.elapsed();
    let stats = p.stats();
    drop(p);
    let verdict = backup.lines.next().and_then(Result::ok);
    let status = backup.child.wait().map_err(|e| e.to_string())?;
    check_verdict(verdict, status, end_seq)?;
    let wraps = stats.bytes / config().ring_capacity as u64;
    println!(
        "  rdma: {end_seq} entries verified in {took:.2?} ({:.0} entries/s); {} frames, {} \
         bytes (~{wraps} ring wraps), {} throttle events, {} medium-full",
        end_seq as f64 / took.as_secs_f64(),
        stats.frames,
        stats.bytes,
        stats.throttle_events,
        stats.medium_full
    );
    Ok(())
}

fn backup_lost(s: &Sides, loss: Loss) -> Result<(), String> {
    let (mut backup, addr) = spawn_backup(s)?;
    let mut p = rdma::connect(addr.as_str(), config(), &s.a).map_err(|e| e.to_string())?;
    let timeout = config().heartbeat_timeout;
    let (err, took) = lose_backup(&mut p, &mut backup.child, loss, timeout)?;
    println!("  rdma: backup {loss:?} → primary error after {took:.1?}: {err}");
    check_backup_loss(loss, &err, took, timeout)
}

fn raw_hello() -> [u8; 104] {
    // The Hello layout of `transport::handshake` (the guest identity, bytes 64..104, is the
    // default all-zero one of `config()`).
    let mut h = [0u8; 104];
    h[..4].copy_from_slice(b"FTHS");
    h[4] = 1;
    h[6..8].copy_from_slice(&transport::PROTOCOL_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&SESSION.to_le_bytes());
    h[16..24].copy_from_slice(&1u64.to_le_bytes());
    h[24..56].copy_from_slice(&[0x42; 32]);
    h[56..60].copy_from_slice(&(MediumKind::Rdma as u32).to_le_bytes());
    // The channel crypto mode (protocol 4): the backup's default, so the hello reaches the MAC.
    h[60] = transport::auth::ChannelCrypto::Auth as u8;
    h
}

fn listener_b(s: &Sides) -> Result<(TcpListener, SocketAddr), String> {
    let l = TcpListener::bind(SocketAddr::new(s.ip_b, 0)).map_err(|e| e.to_string())?;
    let a = l.local_addr().map_err(|e| e.to_string())?;
    Ok((l, a))
}

/// A real backup (`rdma::accept` on device B) in a thread, for a test that plays the primary
/// by hand: the thread's result, and the address to connect to.
type BackupThread = std::thread::JoinHandle<Result<(), ChannelError>>;
fn backup_thread(s: &Sides) -> Result<(BackupThread, SocketAddr), String> {
    let (l, addr) = listener_b(s)?;
    let b_cfg = s.b.clone();
    let backup = std::thread::spawn(move || rdma::accept(&l, config(), &b_cfg).map(|_| ()));
    Ok((backup, addr))
}

fn wrong_key_gets_no_rkey(s: &Sides) -> Result<(), String> {
    // 1. An attacker that ignores the backup's proof and answers with a made-up MAC.
    let (backup, addr) = backup_thread(s)?;
    let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    sock.write_all(&raw_hello()).map_err(|e| e.to_string())?;
    let mut challenge = [0u8; 136];
    sock.read_exact(&mut challenge)
        .map_err(|e| format!("reading the challenge: {e}"))?;
    if challenge[5] != 0 {
        return Err(format!("backup refused the hello: status {}", challenge[5]));
    }
    let mut response = [0u8; 40];
    response[..4].copy_from_slice(b"FTHS");
    response[4] = 3;
    response[8..40].copy_from_slice(&[0x5A; 32]);
    sock.write_all(&response).map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    sock.read_to_end(&mut rest)
        .map_err(|e| format!("reading after the bad response: {e}"))?;
    let result = backup.join().map_err(|_| "backup thread panicked")?;
    if !matches!(result, Err(ChannelError::PeerNotAuthenticated)) {
        return Err(format!("backup accepted a bad MAC: {result:?}"));
    }
    // Everything received after the challenge: one 24-byte Welcome with status AuthFailed and
    // no medium info — no set-up message, so no QPN, address or rkey.
    if rest.len() != 24 || &rest[..4] != b"FTHS" || rest[4] != 4 || rest[5] != 5 {
        return Err(format!(
            "after a failed authentication the peer received {} bytes: {rest:02x?}",
            rest.len()
        ));
    }
    if rest[16..20] != [0; 4] || rest.windows(4).any(|w| w == b"FTRD") {
        return Err("refusal carried medium info".into());
    }

    // 2. The real primary with the wrong key: refused on both sides.
    let (backup, addr) = backup_thread(s)?;
    let mut wrong = config();
    wrong.key = PreSharedKey::new(b"not-the-rdma-test-key".to_vec()).map_err(|e| e.to_string())?;
    let primary = rdma::connect(addr, wrong, &s.a).map(|_| ());
    let backup = backup.join().map_err(|_| "backup thread panicked")?;
    if !matches!(primary, Err(ChannelError::PeerNotAuthenticated))
        || !matches!(backup, Err(ChannelError::AuthRejected))
    {
        return Err(format!("wrong key: primary {primary:?}, backup {backup:?}"));
    }
    println!(
        "  rdma: failed authentication received {} bytes after the challenge, no rkey",
        rest.len()
    );
    Ok(())
}

fn session() -> SessionParams {
    SessionParams {
        session_id: SESSION,
        epoch: 1,
        medium: MediumKind::Rdma,
        key: PreSharedKey::new(KEY.to_vec()).expect("key"),
        guest: transport::GuestIdentity::default(),
        crypto: transport::auth::ChannelCrypto::Auth,
    }
}

fn plausible(role: Role) -> PeerInfo {
    PeerInfo {
        role,
        mtu: 3,
        qpn: 0x77,
        psn: 0x1234,
        lid: 0,
        flags: 0,
        rkey: 0x1111,
        gid: [0xfe; 16],
        addr: 0x10_0000,
        len: match role {
            Role::Backup => 256 * 1024,
            Role::Primary => ACK_BLOCK_LEN,
        },
    }
}

/// What a malicious primary's attempt came to.
struct Verdict {
    /// The backup's error, or why there was none.
    backup: Result<ChannelError, String>,
    /// The failed completion of the primary's own write, if it failed.
    write: Option<ChannelError>,
}

/// Where a malicious primary writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Offset 0 of the ring, as a primary that announced sealed heads (the bytes carry the seal).
    Sealed,
    /// The doorbell block after the ring's data area, as a sealed-heads primary.
    Doorbell,
    /// The ring header's head counter, just before the registered data area.
    Header,
}

/// An authenticated but malicious primary: sets up a real queue pair, then writes `garbage`
/// where `target` says.
fn malicious_primary(s: &Sides, garbage: &[u8], target: Target) -> Result<Verdict, String> {
    let e = |e: ChannelError| e.to_string();
    let (l, addr) = listener_b(s)?;
    let b_cfg = s.b.clone();
    let backup = std::thread::spawn(move || -> Result<ChannelError, String> {
        let mut b = rdma::accept(&l, config(), &b_cfg).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            let mut frames = 0;
            if let Err(err) = b.poll(|_| frames += 1) {
                return Ok(err);
            }
            if frames > 0 {
                return Err("the backup accepted a frame from garbage".into());
            }
            std::thread::yield_now();
        }
        Err("the backup saw nothing wrong for 3 s".into())
    });
    let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let accepted = handshake::primary_handshake(&mut sock, &session()).map_err(e)?;
    let ring = PeerInfo::decode(&accepted.medium_info, Role::Backup, 0).map_err(e)?;
    let mut ep = Endpoint::open(&s.a, 16, 1).map_err(e)?;
    let mem = Arc::new(HeapRegion::new(4096).map_err(|e| e.to_string())?);
    // SAFETY: `garbage` fits in the fresh 4 KiB region, which nothing else uses yet.
    unsafe {
        std::ptr::copy_nonoverlapping(
            garbage.as_ptr(),
            transport::RingMemory::as_ptr(&*mem),
            garbage.len().min(4096),
        )
    };
    let mr = ep.register(&mem, 0, 4096, true).map_err(e)?;
    ep.to_init().map_err(e)?;
    ep.connect(&ring, 14).map_err(e)?;
    let ours = PeerInfo {
        role: Role::Primary,
        mtu: ep.mtu,
        qpn: ep.qpn(),
        psn: ep.psn,
        lid: ep.lid,
        flags: FLAG_SEALED,
        rkey: mr.rkey,
        gid: ep.gid,
        addr: mr.addr,
        len: ACK_BLOCK_LEN,
    };
    sock.write_all(&ours.encode()).map_err(|e| e.to_string())?;
    let mut ready = [0u8; 1];
    sock.read_exact(&mut ready).map_err(|e| e.to_string())?;
    let remote = RemoteRegion {
        addr: ring.addr,
        len: ring.len,
        rkey: ring.rkey,
    };
    // Signal every write, to see how it completes.
    let mut sq = SendQueue::new(ep.sq_depth, 1);
    let write = RdmaWrite {
        local: mr.addr,
        len: garbage.len() as u32,
        remote: match target {
            // The head counter sits 256 bytes before the data area (see transport::ring).
            Target::Header => ring.addr.wrapping_sub(256),
            // The doorbell block follows the data area, in the same registration.
            Target::Doorbell => ring.addr + ring.len,
            Target::Sealed => remote.target(0, garbage.len() as u64).map_err(e)?,
        },
        imm: None,
        send: false,
    };
    // SAFETY: the source is the registered region above, untouched from here on. The target is
    // the peer's memory: the NIC, not this process, checks it against the peer's registration.
    unsafe { post_writes(&mut ep, &mut sq, mr.lkey, remote.rkey, &[write]) }.map_err(e)?;
    let mut wcs = [transport::rdma::verbs::NO_COMPLETION; 16];
    let mut write_err = None;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let n = ep.poll(&mut wcs).map_err(e)?;
        if let Some(c) = wcs[..n].first() {
            if !c.ok {
                write_err = Some(c.error());
            }
            break;
        }
        std::thread::yield_now();
    }
    // Keep the queue pair and the control socket open until the backup has judged.
    let backup = backup.join().map_err(|_| "backup thread panicked")?;
    drop(sock);
    drop(ep);
    Ok(Verdict {
        backup,
        write: write_err,
    })
}

/// The backup trusts nothing the primary's NIC wrote: the ring header is out of its reach.
fn garbage_ring_is_refused(s: &Sides) -> Result<(), String> {
    // A write over the ring header (outside the registered data area): the backup's NIC
    // refuses it (remote access error for the writer), the head stays, no frame appears.
    let v = malicious_primary(s, &[0x08; 8], Target::Header)?;
    match (&v.write, &v.backup) {
        (Some(w @ ChannelError::RdmaCompletion { .. }), backup) => {
            if let Ok(ChannelError::Ring(_)) = backup {
                return Err(format!(
                    "write into the header reached the ring: {backup:?}"
                ));
            }
            println!(
                "  rdma: write into the ring header → writer's completion: {w}; backup: {}",
                match backup {
                    Ok(err) => err.to_string(),
                    Err(why) => why.clone(),
                }
            );
        }
        (w, b) => {
            return Err(format!(
                "write into the header completed as {w:?}, backup said {b:?}"
            ))
        }
    }
    Ok(())
}

/// The same with sealed head words: a garbage frame under a valid seal is refused by the frame
/// checks, never handed on; a seal in the doorbell block claiming more than the ring can hold
/// is a typed error.
fn sealed_garbage_is_refused(s: &Sides) -> Result<(), String> {
    // A record of 56 bytes of 0xFF (no frame), sealed right after it (short form) as the real
    // primary does.
    let mut bytes = vec![0u8; 64 + 16];
    bytes[..8].copy_from_slice(&56u64.to_le_bytes());
    bytes[8..64].fill(0xFF);
    let words = |b: &[u8]| -> Vec<u64> {
        b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    };
    let seal = HeadSeal {
        end: 64,
        start: 0,
        sum: seal_sum(words(&bytes[..64]).into_iter()),
    };
    bytes[64..].copy_from_slice(&seal.encode_short());
    let v = malicious_primary(s, &bytes, Target::Sealed)?;
    match &v.backup {
        Ok(err) => println!("  rdma: sealed garbage frame → {err}"),
        Err(why) => return Err(format!("sealed garbage frame: {why}")),
    }
    // A valid seal in the doorbell block moving the head a terabyte on.
    let seal = HeadSeal {
        end: 1 << 40,
        start: (1 << 40) - 64,
        sum: 0,
    };
    let v = malicious_primary(s, &seal.encode(), Target::Doorbell)?;
    match &v.backup {
        Ok(err @ ChannelError::CorruptMessage(_)) => println!("  rdma: runaway seal → {err}"),
        other => return Err(format!("runaway seal: backup said {other:?}")),
    }
    Ok(())
}

fn bad_setup_is_refused(s: &Sides) -> Result<(), String> {
    // 1. An authenticated primary announcing an ACK block too small / wrapping the address space.
    for bad in [
        PeerInfo {
            len: 8,
            ..plausible(Role::Primary)
        },
        PeerInfo {
            addr: u64::MAX - 16,
            ..plausible(Role::Primary)
        },
    ] {
        let (backup, addr) = backup_thread(s)?;
        let mut sock = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let accepted =
            handshake::primary_handshake(&mut sock, &session()).map_err(|e| e.to_string())?;
        PeerInfo::decode(&accepted.medium_info, Role::Backup, 0)
            .map_err(|e| format!("the real backup's set-up does not decode: {e}"))?;
        sock.write_all(&bad.encode()).map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        let _ = sock.read_to_end(&mut answer);
        let result = backup.join().map_err(|_| "backup thread panicked")?;
        if !matches!(result, Err(ChannelError::RdmaSetup(_))) || answer != b"X" {
            return Err(format!(
                "bad ACK block {bad:?}: backup {result:?}, answered {answer:?}"
            ));
        }
    }
    // 2. A backup announcing a ring of a bad size or at a bad address.
    for bad in [
        PeerInfo {
            len: 3 << 16,
            ..plausible(Role::Backup)
        },
        PeerInfo {
            len: 1 << 40,
            ..plausible(Role::Backup)
        },
        PeerInfo {
            addr: u64::MAX - 4096,
            ..plausible(Role::Backup)
        },
    ] {
        let (l, addr) = listener_b(s)?;
        let fake = std::thread::spawn(move || -> Result<(), ChannelError> {
            let (mut sock, _) = l.accept().map_err(|e| ChannelError::Io {
                context: "accept",
                source: e,
            })?;
            sock.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| ChannelError::Io {
                    context: "timeout",
                    source: e,
                })?;
            handshake::backup_authenticate(&mut sock, &session())?;
            handshake::backup_welcome(&mut sock, 1, &bad.encode())?;
            let mut rest = [0u8; SETUP_LEN];
            // The primary must hang up rather than answer with its own set-up.
            match sock.read(&mut rest) {
                Ok(0) => Ok(()),
                Ok(n) => Err(ChannelError::CorruptMessage(format!(
                    "primary answered a bad ring with {n} bytes"
                ))),
                Err(e) => Err(ChannelError::Io {
                    context: "read",
                    source: e,
                }),
            }
        });
        let primary = rdma::connect(addr, config(), &s.a).map(|_| ());
        let fake = fake.join().map_err(|_| "fake backup panicked")?;
        if !matches!(primary, Err(ChannelError::RdmaSetup(_))) || fake.is_err() {
            return Err(format!(
                "bad ring {bad:?}: primary {primary:?}, fake backup {fake:?}"
            ));
        }
    }
    println!("  rdma: out-of-bounds ACK blocks and rings refused on both sides");
    Ok(())
}

/// The medium layer's view of a side's device.
fn rdma_medium(addr: String, c: &RdmaConfig) -> Medium {
    Medium::Rdma {
        addr,
        device: RdmaDevice {
            device: c.device.clone(),
            gid_index: c.gid_index,
            ib_port: c.ib_port,
        },
    }
}

/// Throws every kind of stray at the set-up address of the backup's listener (`b`, on device
/// B), in order, from device A's side (`a`); returns how many, and the silent connection, which
/// the caller keeps open while the real primary dials behind it.
fn rdma_strays(a: &Medium, addr: SocketAddr) -> Result<(u64, TcpStream), String> {
    let open = || TcpStream::connect(addr).map_err(|e| format!("connecting a stray: {e}"));
    // A port probe: connect and close.
    drop(open()?);
    // An HTTP request. The listener may already have hung up on a stray: that is fine.
    let mut http = open()?;
    let _ = http.write_all(b"GET / HTTP/1.1\r\nHost: ftvm\r\n\r\n");
    drop(http);
    // Another protocol version.
    let mut foreign = open()?;
    let mut hello = raw_hello();
    hello[6..8].copy_from_slice(&99u16.to_le_bytes());
    let _ = foreign.write_all(&hello);
    drop(foreign);
    // A peer with the wrong key, speaking the real protocol over the medium layer.
    let mut wrong = config();
    wrong.key = PreSharedKey::new(b"not-the-rdma-test-key".to_vec()).map_err(|e| e.to_string())?;
    let refused = medium::dial_primary(a, wrong).map(|_| ());
    if !matches!(
        refused,
        Err(ChannelError::PeerNotAuthenticated | ChannelError::AuthRejected)
    ) {
        return Err(format!("a wrong key must be refused: {refused:?}"));
    }
    // A connection that sends nothing: the listener must give up on it after its handshake
    // timeout, which the real primary's success behind it proves.
    Ok((5, open()?))
}

fn listener_survives_strays(s: &Sides) -> Result<(), String> {
    const COUNT: u64 = 2_000;
    let mut listener = Listener::bind(&rdma_medium(SocketAddr::new(s.ip_b, 0).to_string(), &s.b))
        .map_err(|e| format!("binding the listener: {e}"))?;
    let bound = listener.local_addr();
    let addr: SocketAddr = bound
        .parse()
        .map_err(|e| format!("the listener's address {bound}: {e}"))?;
    let a = rdma_medium(bound, &s.a);
    // The listener refuses strays within a short handshake timeout; the real primary allows
    // itself a longer one, since it queues behind the silent stray.
    let mut listener_cfg = config();
    listener_cfg.handshake_timeout = Duration::from_secs(3);
    let mut primary_cfg = config();
    primary_cfg.handshake_timeout = Duration::from_secs(20);
    let server = std::thread::spawn(move || {
        listener
            .backup(listener_cfg)
            .map(|b| (b, listener.refused()))
    });
    let (strays, _silent) = rdma_strays(&a, addr)?;
    let mut p =
        medium::dial_primary(&a, primary_cfg).map_err(|e| format!("the real primary: {e}"))?;
    let (b, refused) = server
        .join()
        .map_err(|_| "listener thread panicked")?
        .map_err(|e| format!("the listener gave up: {e}"))?;
    if refused != strays {
        return Err(format!(
            "the listener refused {refused} connections, expected the {strays} strays"
        ));
    }
    let verifier = std::thread::spawn(move || verify_stream(b));
    send_stream(&mut p, COUNT, 0x57A4, |_| String::new())?;
    commit(&mut p, COUNT + 1)?;
    let end_seq = end_stream(&mut p, COUNT + 2)?;
    drop(p);
    let verified = verifier.join().map_err(|_| "verifier panicked")??;
    if verified != end_seq {
        return Err(format!(
            "the backup verified {verified} entries, the primary's stream ended at {end_seq}"
        ));
    }
    println!(
        "  rdma: the listener refused {refused} strays, then {verified} entries were verified and \
         acknowledged"
    );
    Ok(())
}

/// libtest-mimic's arguments (`--list`, filters, `--ignored`, ...), one test at a time unless
/// `--test-threads` says otherwise: each test runs two processes that pin or spin on the
/// machine's cores.
fn harness_args() -> libtest_mimic::Arguments {
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = args.test_threads.or(Some(1));
    args
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("backup") {
        let Some(addr) = args.get(2) else {
            eprintln!("usage: rdma_channel backup <address>");
            return ExitCode::FAILURE;
        };
        return match backup_role(addr) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("backup: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let args = harness_args();
    // Without RDMA devices nothing here can run, and in the soft-RoCE guest (the only place this
    // runs) that is a failure, not a skip; `--list` still lists.
    let s = match sides() {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) if !args.list => {
            println!("rdma_channel: FAILED, no RDMA devices configured: {e}");
            return ExitCode::FAILURE;
        }
        Err(_) => return libtest_mimic::run(&args, trial_list(None)).exit_code(),
    };
    libtest_mimic::run(&args, trial_list(Some(s))).exit_code()
}

/// A deposed primary is fenced: the backup's channel ends (the primary went silent past the
/// backup's heartbeat timeout, as a paused primary does), which moves the backup's queue pair to
/// ERR while the backup process lives on; the primary then wakes up and writes its next frame,
/// which must fail at the primary (retries exhausted, or its queue pair in error) instead of
/// landing in the backup's ring. The frames before the silence were sealed, and so were the
/// ACKs that released them.
fn a_deposed_primary_is_fenced(s: &Sides) -> Result<(), String> {
    let (l, addr) = listener_b(s)?;
    let b_cfg = s.b.clone();
    let (ended_tx, ended_rx) = std::sync::mpsc::channel::<(String, u64)>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let backup = std::thread::spawn(move || -> Result<(), String> {
        let mut cfg = config();
        cfg.heartbeat_timeout = Duration::from_millis(400);
        let mut b = rdma::accept(&l, cfg, &b_cfg).map_err(|e| e.to_string())?;
        let mut last = 0;
        let err = loop {
            match b.poll(|f| last = f.last_seq().unwrap_or(last)) {
                Ok(_) => std::thread::sleep(Duration::from_micros(100)),
                Err(e) => break e,
            }
        };
        let (state, fenced) = b.with_link(|l| {
            (
                l.qp_state()
                    .map_or_else(|e| e.to_string(), |s| s.to_string()),
                l.fenced(),
            )
        });
        let _ = ended_tx.send((
            format!("{err}; fenced {fenced}, queue pair state {state}"),
            last,
        ));
        // Alive, fenced, until the primary has tried: its queue pair is in ERR, not destroyed.
        let _ = done_rx.recv_timeout(Duration::from_secs(60));
        drop(b);
        Ok(())
    });
    let mut cfg = config();
    // The primary's own patience is long: the error it gets must be the fence, not its timer.
    cfg.heartbeat_timeout = Duration::from_secs(60);
    let mut p = rdma::connect(addr.to_string().as_str(), cfg, &s.a).map_err(|e| e.to_string())?;
    let seq = commit(&mut p, 1)?;
    // Silence: the backup gives up on this primary and fences it.
    let (why, last) = ended_rx
        .recv_timeout(Duration::from_secs(20))
        .map_err(|_| "the backup's channel never ended".to_string())?;
    if last != seq {
        return Err(format!("the backup had {last} of {seq} entries"));
    }
    // The primary wakes up and writes on.
    let started = Instant::now();
    let next = p.append(&stream::marker(2)).map_err(|e| e.to_string())?;
    p.flush().map_err(|e| e.to_string())?;
    let err = loop {
        match p.pump() {
            Err(e) => break e,
            Ok(_) if p.acked() >= next => {
                return Err("a write after the fence was acknowledged".into());
            }
            Ok(_) if started.elapsed() > Duration::from_secs(30) => {
                let _ = done_tx.send(());
                return Err(format!(
                    "the deposed primary's write neither failed nor landed (backup: {why}; \
                     primary: queue pair state {:?}, {} frames sent)",
                    p.link().qp_state(),
                    p.stats().frames
                ));
            }
            Ok(_) => std::thread::sleep(Duration::from_micros(200)),
        }
    };
    let _ = done_tx.send(());
    backup
        .join()
        .map_err(|_| "the backup thread panicked".to_string())??;
    println!(
        "  rdma: backup ended ({why}); the deposed primary's next write failed after {:.1?}: {err}",
        started.elapsed()
    );
    match err {
        ChannelError::RdmaCompletion { .. } | ChannelError::RdmaQpError => Ok(()),
        other => Err(format!("expected a failed RDMA write, got {other}")),
    }
}

type Test = fn(&Sides) -> Result<(), String>;

/// The tests, each run against `sides` (`None`: only listed).
fn trial_list(sides: Option<std::sync::Arc<Sides>>) -> Vec<libtest_mimic::Trial> {
    let tests: Vec<(&str, Test)> = vec![
        ("wrong_key_gets_no_rkey", wrong_key_gets_no_rkey),
        ("bad_setup_is_refused", bad_setup_is_refused),
        ("listener_survives_strays", listener_survives_strays),
        ("garbage_ring_is_refused", garbage_ring_is_refused),
        ("sealed_garbage_is_refused", sealed_garbage_is_refused),
        ("million_entries", |s| stream_entries(s, entries())),
        ("backup_killed", |s| backup_lost(s, Loss::Killed)),
        ("backup_frozen", |s| backup_lost(s, Loss::Frozen)),
        ("a_deposed_primary_is_fenced", a_deposed_primary_is_fenced),
    ];
    tests
        .into_iter()
        .map(|(name, test)| {
            let sides = sides.clone();
            libtest_mimic::Trial::test(name, move || match &sides {
                Some(s) => test(s).map_err(Into::into),
                None => Err("no RDMA devices configured".into()),
            })
        })
        .collect()
}
