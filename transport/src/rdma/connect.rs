//! Setting up the RDMA medium over the channel's TCP handshake socket.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};

use super::scan::Scanner;
use super::setup::{
    PeerInfo, RemoteRegion, Role, ACK_BLOCK_LEN, DOORBELL_LEN, FLAG_SEALED, SEALED_ACK_LEN,
    SEAL_LEN, SETUP_LEN,
};
use super::verbs::{Endpoint, SendQueue, NO_COMPLETION};
use super::{heap, RdmaBackupLink, RdmaConfig, RdmaPrimaryLink};
use crate::channel::{Backup, ChannelConfig, Primary};
use crate::control;
use crate::error::ChannelError;
use crate::handshake::{self, MediumKind};
use crate::ring::{self, Consumer, Producer, RING_HEADER_LEN};

/// Connects to a backup listening at `addr` (its TCP handshake socket) and sets up the
/// primary's channel end with [`primary_on`]. Kept for existing callers.
pub fn connect(
    addr: impl ToSocketAddrs,
    config: ChannelConfig,
    rdma: &RdmaConfig,
) -> Result<Primary<RdmaPrimaryLink>, ChannelError> {
    config.validate()?;
    let stream = control::dial(addr, config.handshake_timeout)?;
    primary_on(stream, config, rdma)
}

/// The primary's end of the RDMA medium over an already-connected TCP `stream`, whoever dialed
/// it: authenticates with the backup, sets up the RDMA queue pair on `rdma`'s device and returns
/// the primary's channel end.
pub fn primary_on(
    mut stream: TcpStream,
    config: ChannelConfig,
    rdma: &RdmaConfig,
) -> Result<Primary<RdmaPrimaryLink>, ChannelError> {
    config.validate()?;
    control::prepare(&stream, config.handshake_timeout)?;
    let accepted =
        handshake::primary_handshake(&mut stream, &config.session_params(MediumKind::Rdma))?;
    let backup = PeerInfo::decode(&accepted.medium_info, Role::Backup, config.max_frame_bytes)?;
    let capacity = backup.len as usize;

    if backup.flags & FLAG_SEALED == 0 {
        return Err(ChannelError::RdmaSetup(
            "the backup offers no doorbell block (sealed head words): an older build".into(),
        ));
    }
    let mut ep = Endpoint::open(rdma, rdma.send_queue_depth, 1)?;
    // The mirror, then one staging slot per send-queue entry for seals sent to the doorbell.
    let seal_slots = u64::from(ep.sq_depth.max(1));
    let mirror_len = ring::region_len(capacity) + seal_slots as usize * SEAL_LEN;
    let mirror = heap(mirror_len)?;
    ring::format(&*mirror, capacity)?;
    let producer = Producer::attach(mirror.clone())?;
    let mirror_mr = ep.register(&mirror, 0, mirror_len, false)?;
    let acks = heap(4096)?;
    let ack_mr = ep.register(&acks, 0, ACK_BLOCK_LEN as usize, true)?;
    ep.to_init()?;
    ep.connect(&backup, rdma.retry_timeout)?;
    let ours = PeerInfo {
        role: Role::Primary,
        mtu: ep.mtu,
        qpn: ep.qpn(),
        psn: ep.psn,
        lid: ep.lid,
        flags: FLAG_SEALED,
        rkey: ack_mr.rkey,
        gid: ep.gid,
        addr: ack_mr.addr,
        len: ack_mr.len,
    };
    control::write_all(&mut stream, &ours.encode(), "sending the RDMA set-up")?;
    let mut ready = [0u8; 1];
    control::read_exact(&mut stream, &mut ready, "the backup's RDMA ready signal")?;
    if ready != *b"R" {
        return Err(ChannelError::RdmaSetup(
            "the backup refused our RDMA set-up".into(),
        ));
    }
    control::go_nonblocking(&stream)?;
    let sq = SendQueue::new(ep.sq_depth, rdma.signal_every);
    let link = RdmaPrimaryLink {
        remote: RemoteRegion {
            addr: backup.addr,
            len: backup.len,
            rkey: backup.rkey,
        },
        doorbell: RemoteRegion {
            addr: backup.addr + backup.len,
            len: DOORBELL_LEN,
            rkey: backup.rkey,
        },
        seal_slots,
        since_doorbell: 0,
        capacity: capacity as u64,
        sent: 0,
        tail: 0,
        producer,
        mirror,
        mirror_mr,
        acks,
        sq,
        last_beats: 0,
        last_ack_check: 0,
        last_acked: 0,
        heard_pending: false,
        torn_reads: 0,
        opener: None,
        stream,
        wcs: [NO_COMPLETION; 16],
        ep,
    };
    Primary::new(link, config, accepted.resume_seq, &accepted.keys)
}

/// Accepts one primary on `listener` (the TCP handshake socket) and sets up the backup's channel
/// end with [`backup_on`]. Kept for existing callers.
pub fn accept(
    listener: &TcpListener,
    config: ChannelConfig,
    rdma: &RdmaConfig,
) -> Result<Backup<RdmaBackupLink>, ChannelError> {
    config.validate()?;
    let stream = control::accept(listener)?;
    backup_on(stream, config, rdma)
}

/// The backup's end of the RDMA medium over an already-connected TCP `stream`, whoever dialed
/// it: authenticates the primary, and only then creates the queue pair and the registered ring on
/// `rdma`'s device. A primary that fails the handshake or sends a bad set-up message is refused
/// with a typed error (accept another stream to go on); it has received no rkey.
pub fn backup_on(
    mut stream: TcpStream,
    config: ChannelConfig,
    rdma: &RdmaConfig,
) -> Result<Backup<RdmaBackupLink>, ChannelError> {
    config.validate()?;
    control::prepare(&stream, config.handshake_timeout)?;
    let hello =
        handshake::backup_authenticate(&mut stream, &config.session_params(MediumKind::Rdma))?;

    // The primary is authenticated: only now do the queue pair and the rkey come to exist. If
    // that fails (no device, port down, out of resources), the primary is told why.
    let capacity = config.ring_capacity;
    let set_up = || -> Result<_, ChannelError> {
        // No receives: new records are found in memory (sealed head words).
        let mut ep = Endpoint::open(rdma, rdma.send_queue_depth, 1)?;
        // The ring, then the doorbell block (zeroed: no valid seal in it).
        let ring_mem = heap(ring::region_len(capacity) + DOORBELL_LEN as usize)?;
        ring::format(&*ring_mem, capacity)?;
        let consumer = Consumer::attach(ring_mem.clone())?;
        // The data area and the doorbell block only: the header (head and tail) stays out of
        // the peer's reach.
        let ring_mr = ep.register(
            &ring_mem,
            RING_HEADER_LEN,
            capacity + DOORBELL_LEN as usize,
            true,
        )?;
        let slots = ep.sq_depth as usize;
        let ack_mem = heap(slots * SEALED_ACK_LEN)?;
        let ack_mr = ep.register(&ack_mem, 0, slots * SEALED_ACK_LEN, false)?;
        ep.to_init()?;
        Ok((ep, ring_mem, consumer, ring_mr, ack_mem, ack_mr))
    };
    let (mut ep, ring_mem, consumer, ring_mr, ack_mem, ack_mr) = match set_up() {
        Ok(parts) => parts,
        Err(e) => {
            let _ = handshake::backup_refuse_medium(&mut stream, &e.to_string());
            return Err(e);
        }
    };
    let ours = PeerInfo {
        role: Role::Backup,
        mtu: ep.mtu,
        qpn: ep.qpn(),
        psn: ep.psn,
        lid: ep.lid,
        flags: FLAG_SEALED,
        rkey: ring_mr.rkey,
        gid: ep.gid,
        addr: ring_mr.addr,
        len: capacity as u64,
    };
    handshake::backup_welcome(&mut stream, config.resume_seq.max(1), &ours.encode())?;
    let mut msg = [0u8; SETUP_LEN];
    control::read_exact(&mut stream, &mut msg, "the primary's RDMA set-up")?;
    let primary = match PeerInfo::decode(&msg, Role::Primary, 0).and_then(|p| {
        if p.flags & FLAG_SEALED == 0 {
            Err(ChannelError::RdmaSetup(
                "the primary does not announce sealed head words: an older build".into(),
            ))
        } else {
            Ok(p)
        }
    }) {
        Ok(p) => p,
        Err(e) => {
            let _ = control::write_all(&mut stream, b"X", "refusing the primary's RDMA set-up");
            return Err(e);
        }
    };
    ep.connect(&primary, rdma.retry_timeout)?;
    control::write_all(&mut stream, b"R", "sending the RDMA ready signal")?;
    control::go_nonblocking(&stream)?;
    let sq = SendQueue::new(ep.sq_depth, rdma.signal_every);
    let link = RdmaBackupLink {
        consumer,
        ring: ring_mem,
        scanner: Scanner::new(capacity as u64),
        sq,
        acks: ack_mem,
        ack_mr,
        peer: RemoteRegion {
            addr: primary.addr,
            len: primary.len,
            rkey: primary.rkey,
        },
        pending: None,
        sealer: None,
        fenced: false,
        ring_rkey: ring_mr.rkey,
        beats: 0,
        stream,
        wcs: [NO_COMPLETION; 16],
        ep,
    };
    let resume = config.resume_seq;
    Backup::new(link, config, resume, hello.epoch, &hello.keys)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::PreSharedKey;

    fn config(key: &[u8]) -> ChannelConfig {
        let mut c = ChannelConfig::new(9, 1, PreSharedKey::new(key.to_vec()).expect("key"));
        c.handshake_timeout = Duration::from_secs(2);
        c
    }

    fn no_device() -> RdmaConfig {
        RdmaConfig::new("ftvm-no-such-rdma-device", 0)
    }

    /// On a host without RDMA (or without that device), an authenticated pair fails with a typed
    /// device error on the backup — after authentication, which is when the device is opened —
    /// and the primary gets the backup's reason; nothing panics or hangs.
    #[test]
    fn missing_device_after_authentication_is_a_typed_error() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let backup = std::thread::spawn(move || {
            accept(&listener, config(b"rdma-unit-test-key"), &no_device()).map(|_| ())
        });
        let primary = connect(addr, config(b"rdma-unit-test-key"), &no_device()).map(|_| ());
        let backup = backup.join().expect("backup thread");
        assert!(
            matches!(backup, Err(ChannelError::RdmaDevice { .. })),
            "{backup:?}"
        );
        // The primary learns why, not just that the backup hung up.
        match &primary {
            Err(ChannelError::PeerMediumFailed(reason)) => {
                assert!(reason.contains("ftvm-no-such-rdma-device"), "{reason}")
            }
            other => panic!("expected the backup's reason, got {other:?}"),
        }
    }

    /// A wrong key is refused before any RDMA resource (and so any rkey) exists: the refusal is
    /// the handshake's, not a device error.
    #[test]
    fn wrong_key_is_refused_before_the_device_is_touched() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let backup = std::thread::spawn(move || {
            accept(&listener, config(b"rdma-unit-test-key"), &no_device()).map(|_| ())
        });
        let primary = connect(addr, config(b"another-rdma-test-key"), &no_device()).map(|_| ());
        let backup = backup.join().expect("backup thread");
        assert!(
            matches!(primary, Err(ChannelError::PeerNotAuthenticated)),
            "{primary:?}"
        );
        assert!(
            matches!(backup, Err(ChannelError::AuthRejected)),
            "{backup:?}"
        );
    }

    /// Either side can dial: here the primary listens and the backup dials it, and the
    /// role-based handshake still authenticates them (and fails on the device, after
    /// authentication, as above); a wrong key is still refused first.
    #[test]
    fn the_backup_can_dial_a_listening_primary() {
        for (key, authenticated) in [
            (&b"rdma-unit-test-key"[..], true),
            (&b"another-rdma-test-key"[..], false),
        ] {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let primary = std::thread::spawn(move || {
                let (stream, _) = listener.accept().expect("accept the backup");
                primary_on(stream, config(b"rdma-unit-test-key"), &no_device()).map(|_| ())
            });
            let stream = TcpStream::connect(addr).expect("dial the primary");
            let backup = backup_on(stream, config(key), &no_device()).map(|_| ());
            let primary = primary.join().expect("primary thread");
            if authenticated {
                assert!(
                    matches!(backup, Err(ChannelError::RdmaDevice { .. })),
                    "{backup:?}"
                );
                assert!(
                    matches!(primary, Err(ChannelError::PeerMediumFailed(_))),
                    "{primary:?}"
                );
            } else {
                // The primary checks the backup's proof first.
                assert!(
                    matches!(primary, Err(ChannelError::PeerNotAuthenticated)),
                    "{primary:?}"
                );
                assert!(
                    matches!(backup, Err(ChannelError::AuthRejected)),
                    "{backup:?}"
                );
            }
        }
    }

    #[test]
    fn env_config_names_missing_variables() {
        match RdmaConfig::from_env("ftvm-unset-side") {
            Err(ChannelError::Config(m)) => assert!(m.contains("FTVM_RDMA_DEV_ftvm-unset-side")),
            other => panic!("expected a config error, got {other:?}"),
        }
    }
}
