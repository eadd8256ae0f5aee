//! Setting up the DPDK medium over its TCP control connection.

use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use dpdk_sys::{EtherAddr, Port};

use super::codec::{u16_at, u32_at};
use super::link::{DpdkBackupLink, DpdkPrimaryLink};
use super::reassembly::Reassembly;
use super::retransmit::Retransmit;
use super::wire::Wire;
use super::{dpdk_err, DpdkConfig};
use crate::channel::{Ack, Backup, ChannelConfig, Primary};
use crate::control;
use crate::error::ChannelError;
use crate::handshake::{self, MediumKind};

/// Marks the welcome's medium info as ours (the handshake's medium kind is shared with TCP).
const INFO_MAGIC: &[u8; 8] = b"FTVMDPDK";
/// Medium info: magic, MAC (6), link tag (4), MTU (2).
const INFO_LEN: usize = 8 + 6 + 4 + 2;
/// The primary's answer to the welcome: 'M', its MAC.
const MAC_MSG_LEN: usize = 7;
/// Frames at most this many received packets per `rx_burst`.
const BURST: usize = 32;

fn wait_link(port: &Port, timeout: Duration) -> Result<(), ChannelError> {
    let start = Instant::now();
    loop {
        if port
            .link()
            .map_err(|e| dpdk_err("reading the port's link status", e))?
            .up
        {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(ChannelError::Timeout {
                what: "the DPDK port's link to come up",
                waited: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn random_u32() -> Result<u32, ChannelError> {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b)
        .map_err(|e| ChannelError::io("random link tag", std::io::Error::other(e.to_string())))?;
    Ok(u32::from_le_bytes(b))
}

fn wire(port: Port, mac: EtherAddr, peer: EtherAddr, tag: u32, cfg: &DpdkConfig) -> Wire {
    let pool = port.mempool().clone();
    Wire {
        port,
        pool,
        mac,
        peer,
        tag,
        drop_every: cfg.drop_every,
        sent_count: 0,
        rx: Vec::with_capacity(BURST),
        spare: None,
        stats: cfg.stats.clone(),
    }
}

/// Accepts one primary on the control `listener` and sets up the backup's channel end over
/// `port` with [`backup_on`]. Kept for existing callers: a listener that should survive a failed
/// handshake calls [`backup_on`] itself with the same `Option<Port>`.
pub fn accept(
    listener: &TcpListener,
    port: Port,
    config: ChannelConfig,
    dpdk: DpdkConfig,
) -> Result<Backup<DpdkBackupLink>, ChannelError> {
    config.validate()?;
    dpdk.validate(&config)?;
    let stream = control::accept(listener)?;
    backup_on(stream, &mut Some(port), config, dpdk)
}

/// The backup's end of the DPDK medium over an already-connected control `stream`, whoever
/// dialed it: authenticates the primary (the handshake is role-based), exchanges MAC addresses
/// and waits up to [`DpdkConfig::link_timeout`] for the link of `port` (configured and started
/// by the caller, in a process that did `Eal::init`).
///
/// The port is taken out of `port` only once the primary is authenticated and set-up succeeded:
/// after a failed handshake (a stray connection, a wrong key) it is still there, so a listener
/// can go on accepting with it. `None` is a [`ChannelError::Config`].
pub fn backup_on(
    mut control: TcpStream,
    port: &mut Option<Port>,
    config: ChannelConfig,
    dpdk: DpdkConfig,
) -> Result<Backup<DpdkBackupLink>, ChannelError> {
    config.validate()?;
    dpdk.validate(&config)?;
    let mac = port
        .as_ref()
        .ok_or_else(no_port)?
        .mac_address()
        .map_err(|e| dpdk_err("reading the port's MAC address", e))?;
    control::prepare(&control, config.handshake_timeout)?;
    let hello =
        handshake::backup_authenticate(&mut control, &config.session_params(MediumKind::Dpdk))?;
    let tag = random_u32()?;
    let mut info = Vec::with_capacity(INFO_LEN);
    info.extend_from_slice(INFO_MAGIC);
    info.extend_from_slice(&mac.0);
    info.extend_from_slice(&tag.to_le_bytes());
    // validate() bounds the MTU to u16.
    info.extend_from_slice(&(dpdk.mtu as u16).to_le_bytes());
    handshake::backup_welcome(&mut control, config.resume_seq.max(1), &info)?;
    let mut msg = [0u8; MAC_MSG_LEN];
    control::read_exact(&mut control, &mut msg, "the primary's MAC address")?;
    if msg[0] != b'M' {
        return Err(ChannelError::BadHandshake(
            "primary did not send its MAC address".into(),
        ));
    }
    let mut peer = [0u8; 6];
    peer.copy_from_slice(&msg[1..7]);
    wait_link(port.as_ref().ok_or_else(no_port)?, dpdk.link_timeout)?;
    control::go_nonblocking(&control)?;
    let port = port.take().ok_or_else(no_port)?;
    let link = DpdkBackupLink {
        wire: wire(port, mac, EtherAddr(peer), tag, &dpdk),
        control,
        frames: Reassembly::new(
            logfmt::MAX_FRAME_LEN.max(config.max_frame_bytes),
            dpdk.backlog_frames,
            dpdk.window,
        ),
        spent: Vec::new(),
        cfg: dpdk,
        log: Ack {
            epoch: hello.epoch.max(config.epoch),
            ..Ack::default()
        },
        nacked: 0,
        ack_owed: false,
        sealer: None,
    };
    let resume = config.resume_seq;
    Backup::new(link, config, resume, hello.epoch, &hello.keys)
}

/// Connects to a backup's control address and sets up the primary's channel end over `port`
/// with [`primary_on`]. Kept for existing callers.
pub fn connect(
    control_addr: impl ToSocketAddrs,
    port: Port,
    config: ChannelConfig,
    dpdk: DpdkConfig,
) -> Result<Primary<DpdkPrimaryLink>, ChannelError> {
    config.validate()?;
    let control = crate::control::dial(control_addr, config.handshake_timeout)?;
    primary_on(control, &mut Some(port), config, dpdk)
}

/// The primary's end of the DPDK medium over an already-connected control `stream`, whoever
/// dialed it: authenticates with the backup, exchanges MAC addresses and waits up to
/// [`DpdkConfig::link_timeout`] for the link of `port` (configured and started by the caller,
/// in a process that did `Eal::init`). As in [`backup_on`], the port is taken out of `port` only
/// once the backup is authenticated and set-up succeeded.
pub fn primary_on(
    mut control: TcpStream,
    port: &mut Option<Port>,
    config: ChannelConfig,
    dpdk: DpdkConfig,
) -> Result<Primary<DpdkPrimaryLink>, ChannelError> {
    config.validate()?;
    let mac = port
        .as_ref()
        .ok_or_else(no_port)?
        .mac_address()
        .map_err(|e| dpdk_err("reading the port's MAC address", e))?;
    control::prepare(&control, config.handshake_timeout)?;
    let accepted =
        handshake::primary_handshake(&mut control, &config.session_params(MediumKind::Dpdk))?;
    let info = accepted.medium_info;
    if info.len() != INFO_LEN || info[..8] != INFO_MAGIC[..] {
        return Err(ChannelError::MediumMismatch);
    }
    let mut peer = [0u8; 6];
    peer.copy_from_slice(&info[8..14]);
    let tag = u32_at(&info, 14);
    let backup_mtu = usize::from(u16_at(&info, 18));
    // Both sides send at most their own MTU; use the smaller.
    let mut dpdk = dpdk;
    dpdk.mtu = dpdk.mtu.min(backup_mtu);
    dpdk.validate(&config)?;
    let mut msg = [0u8; MAC_MSG_LEN];
    msg[0] = b'M';
    msg[1..].copy_from_slice(&mac.0);
    control::write_all(&mut control, &msg, "sending our MAC address")?;
    wait_link(port.as_ref().ok_or_else(no_port)?, dpdk.link_timeout)?;
    control::go_nonblocking(&control)?;
    let port = port.take().ok_or_else(no_port)?;
    let link = DpdkPrimaryLink {
        wire: wire(port, mac, EtherAddr(peer), tag, &dpdk),
        control,
        rt: Retransmit::new(dpdk.window, dpdk.rto_initial, dpdk.rto_max, Instant::now()),
        cfg: dpdk,
        epoch: accepted.epoch.max(config.epoch),
        acks: None,
    };
    Primary::new(link, config, accepted.resume_seq, &accepted.keys)
}

fn no_port() -> ChannelError {
    ChannelError::Config("no DPDK port to set the channel up on (taken by an earlier one)".into())
}
