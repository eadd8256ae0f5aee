//! One home for choosing and setting up a medium.
//!
//! A [`Medium`] is the typed description of how this process reaches its peer: which medium
//! carries the log and where the set-up socket is (the address to listen on or to dial), plus
//! this side's own device for RDMA and DPDK. It is parsed once (from an option string with
//! [`str::parse`], or built by the CLI from its flags) and then handed to one of four entry
//! points, which give a [`Primary`] or a [`Backup`] over any medium:
//!
//! | this side | listens | dials |
//! |---|---|---|
//! | primary | [`Listener::primary`] | [`dial_primary`] |
//! | backup  | [`Listener::backup`]  | [`dial_backup`]  |
//!
//! Either side can be the one that listens: the handshake is role-based (the primary speaks
//! first, whoever dialed), so a new backup can dial a primary that is already running.
//!
//! A [`Listener`] keeps listening: a connection that fails the handshake — a port probe, an
//! HTTP request, a peer with the wrong key or of another version, or one that sends nothing
//! for [`ChannelConfig::handshake_timeout`] — is logged and refused, and the listener accepts
//! the next one. Only an error of the listener itself (or a DPDK port that an authenticated
//! peer's failed set-up used up) ends the wait.
//!
//! Option-string forms (see [`Medium::from_str`]):
//!
//! ```text
//! shm:/run/ftvm/pair.sock
//! tcp:127.0.0.1:7500
//! rdma:10.0.0.2:7410,dev=mlx5_0,gid=3,port=1
//! dpdk:127.0.0.1:7500,port=net_memif0,eal=--no-huge -m 256 --no-pci -l 0 --file-prefix p --vdev=net_memif0,role=client
//! ```
//!
//! Adding a medium means one module with `primary_on`/`backup_on` over a connected stream,
//! plus its arm here.

use std::fmt;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::channel::{Ack, Backup, BackupLink, BackupNews, ChannelConfig, Primary, PrimaryLink};
use crate::error::ChannelError;
use crate::{control, shm, tcp};

/// This side's RDMA device, as perftest names it (`-d`, `-x`, `-i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdmaDevice {
    /// Device name (`ibv_devices`), e.g. `mlx5_0` or `rxe0`.
    pub device: String,
    /// GID table index.
    pub gid_index: u8,
    /// Port on the device.
    pub ib_port: u8,
}

impl Default for RdmaDevice {
    fn default() -> Self {
        RdmaDevice {
            device: "rxe0".into(),
            gid_index: 0,
            ib_port: 1,
        }
    }
}

/// This side's DPDK port: either an EAL to initialise (once per process) and the port to take
/// from it, or a port the caller opened itself (one EAL serving several channel ends, as in the
/// benchmark).
#[derive(Debug, Clone, Default)]
pub struct DpdkDevice {
    /// This process's EAL options, one string split like a shell. `None`: the port is in
    /// [`DpdkDevice::opened`].
    pub eal: Option<String>,
    /// The DPDK device to use (e.g. `net_memif0`); default: the only one.
    pub port: Option<String>,
    /// The medium's tuning (MTU, window, timers, test hooks, counters).
    #[cfg(feature = "dpdk")]
    pub tuning: crate::dpdk::DpdkConfig,
    /// A port opened and started by the caller.
    #[cfg(feature = "dpdk")]
    pub opened: Option<DpdkPortSlot>,
}

impl DpdkDevice {
    /// A port from an EAL this call initialises: `eal` is one option string split like a
    /// shell, `port` the device name (default: the only one), default tuning.
    // Without the feature, the update below covers no field.
    #[allow(clippy::needless_update)]
    pub fn from_eal(eal: impl Into<String>, port: Option<String>) -> Self {
        DpdkDevice {
            eal: Some(eal.into()),
            port,
            ..DpdkDevice::default()
        }
    }
}

/// A DPDK port handed over to the medium layer (taken out at set-up).
#[cfg(feature = "dpdk")]
#[derive(Clone)]
pub struct DpdkPortSlot(std::sync::Arc<std::sync::Mutex<Option<dpdk_sys::Port>>>);

#[cfg(feature = "dpdk")]
impl DpdkPortSlot {
    /// Wraps a configured, started port.
    pub fn new(port: dpdk_sys::Port) -> Self {
        DpdkPortSlot(std::sync::Arc::new(std::sync::Mutex::new(Some(port))))
    }

    fn take(&self) -> Option<dpdk_sys::Port> {
        self.0.lock().ok().and_then(|mut p| p.take())
    }
}

#[cfg(feature = "dpdk")]
impl fmt::Debug for DpdkPortSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DpdkPortSlot")
    }
}

/// How this process reaches its peer: the medium and the set-up address.
#[derive(Debug, Clone)]
pub enum Medium {
    /// A ring in shared memory between two processes on one host; set up over a Unix stream
    /// socket at `socket`.
    Shm {
        /// The control socket's path.
        socket: PathBuf,
    },
    /// Kernel TCP (busy-polled, or blocking with [`ChannelConfig::blocking`]).
    Tcp {
        /// `host:port` to listen on or dial.
        addr: String,
    },
    /// RDMA writes over a reliable-connected queue pair, set up over TCP at `addr`.
    Rdma {
        /// `host:port` of the set-up connection.
        addr: String,
        /// This side's device.
        device: RdmaDevice,
    },
    /// Raw Ethernet frames on a DPDK port; MAC addresses are exchanged over TCP at `addr`.
    Dpdk {
        /// `host:port` of the control connection.
        addr: String,
        /// This side's port.
        device: DpdkDevice,
    },
}

impl Medium {
    /// The medium's name: `shm`, `tcp`, `rdma` or `dpdk`.
    pub fn name(&self) -> &'static str {
        match self {
            Medium::Shm { .. } => "shm",
            Medium::Tcp { .. } => "tcp",
            Medium::Rdma { .. } => "rdma",
            Medium::Dpdk { .. } => "dpdk",
        }
    }

    /// The set-up address: a socket path or `host:port`.
    pub fn address(&self) -> String {
        match self {
            Medium::Shm { socket } => socket.display().to_string(),
            Medium::Tcp { addr } | Medium::Rdma { addr, .. } | Medium::Dpdk { addr, .. } => {
                addr.clone()
            }
        }
    }

    /// The same medium with another set-up address (e.g. the port a listener was given).
    pub fn with_address(mut self, address: impl Into<String>) -> Self {
        let address = address.into();
        match &mut self {
            Medium::Shm { socket } => *socket = PathBuf::from(address),
            Medium::Tcp { addr } | Medium::Rdma { addr, .. } | Medium::Dpdk { addr, .. } => {
                *addr = address
            }
        }
        self
    }
}

impl fmt::Display for Medium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Medium::Shm { socket } => write!(f, "shm:{}", socket.display()),
            Medium::Tcp { addr } => write!(f, "tcp:{addr}"),
            Medium::Rdma { addr, device } => write!(
                f,
                "rdma:{addr},dev={},gid={},port={}",
                device.device, device.gid_index, device.ib_port
            ),
            Medium::Dpdk { addr, device } => {
                write!(f, "dpdk:{addr}")?;
                if let Some(p) = &device.port {
                    write!(f, ",port={p}")?;
                }
                if let Some(e) = &device.eal {
                    write!(f, ",eal={e}")?;
                }
                Ok(())
            }
        }
    }
}

/// `key=value` pairs of a medium description.
type Options<'a> = Vec<(&'a str, &'a str)>;

/// Splits `host:port,key=value,…` into the address and its options; a key named `last` takes
/// the rest of the string, commas included.
fn options<'a>(rest: &'a str, last: Option<&str>) -> Result<(&'a str, Options<'a>), ChannelError> {
    let (addr, mut tail) = rest.split_once(',').unwrap_or((rest, ""));
    let mut out = Vec::new();
    while !tail.is_empty() {
        let (key, after) = tail.split_once('=').ok_or_else(|| {
            ChannelError::Config(format!("medium option {tail:?} is not key=value"))
        })?;
        if Some(key) == last {
            out.push((key, after));
            break;
        }
        let (value, next) = after.split_once(',').unwrap_or((after, ""));
        out.push((key, value));
        tail = next;
    }
    if addr.is_empty() {
        return Err(ChannelError::Config("medium has no address".into()));
    }
    Ok((addr, out))
}

impl FromStr for Medium {
    type Err = ChannelError;

    /// Parses `shm:PATH`, `tcp:HOST:PORT`, `rdma:HOST:PORT[,dev=D][,gid=N][,port=P]` or
    /// `dpdk:HOST:PORT[,port=NAME][,eal=OPTIONS]` (`eal=` last: it takes the rest).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |m: String| ChannelError::Config(m);
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            bad(format!(
                "medium {s:?}: expected shm:PATH, tcp:HOST:PORT, rdma:HOST:PORT,… or dpdk:HOST:PORT,…"
            ))
        })?;
        match kind {
            "shm" if !rest.is_empty() => Ok(Medium::Shm {
                socket: PathBuf::from(rest),
            }),
            "tcp" => {
                let (addr, opts) = options(rest, None)?;
                if let Some((k, _)) = opts.first() {
                    return Err(bad(format!("tcp takes no option {k:?}")));
                }
                Ok(Medium::Tcp { addr: addr.into() })
            }
            "rdma" => {
                let (addr, opts) = options(rest, None)?;
                let mut device = RdmaDevice::default();
                for (k, v) in opts {
                    let num = |v: &str| {
                        v.parse::<u8>()
                            .map_err(|_| bad(format!("rdma option {k}={v:?} is not a number")))
                    };
                    match k {
                        "dev" => device.device = v.into(),
                        "gid" => device.gid_index = num(v)?,
                        "port" => device.ib_port = num(v)?,
                        _ => return Err(bad(format!("unknown rdma option {k:?}"))),
                    }
                }
                Ok(Medium::Rdma {
                    addr: addr.into(),
                    device,
                })
            }
            "dpdk" => {
                let (addr, opts) = options(rest, Some("eal"))?;
                let mut device = DpdkDevice::default();
                for (k, v) in opts {
                    match k {
                        "port" => device.port = Some(v.into()),
                        "eal" => device.eal = Some(v.into()),
                        _ => return Err(bad(format!("unknown dpdk option {k:?}"))),
                    }
                }
                Ok(Medium::Dpdk {
                    addr: addr.into(),
                    device,
                })
            }
            _ => Err(bad(format!(
                "medium {s:?}: unknown kind {kind:?} (shm, tcp, rdma, dpdk)"
            ))),
        }
    }
}

#[cfg_attr(all(feature = "rdma", feature = "dpdk"), allow(dead_code))]
fn not_built(medium: &str, feature: &str) -> ChannelError {
    ChannelError::Config(format!(
        "the {medium} medium is not in this build: rebuild with `--features {feature}`"
    ))
}

/// The primary's link over whichever medium was chosen.
// One per channel end, never moved on the data path: the size of the largest medium is no
// cost, a box would be a pointer chase per call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyPrimaryLink {
    /// Over TCP.
    Tcp(tcp::TcpPrimaryLink),
    /// Over shared memory.
    Shm(shm::ShmPrimaryLink),
    /// Over RDMA.
    #[cfg(feature = "rdma")]
    Rdma(crate::rdma::RdmaPrimaryLink),
    /// Over DPDK.
    #[cfg(feature = "dpdk")]
    Dpdk(crate::dpdk::DpdkPrimaryLink),
}

/// The backup's link over whichever medium was chosen.
// One per channel end, never moved on the data path: the size of the largest medium is no
// cost, a box would be a pointer chase per call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyBackupLink {
    /// Over TCP.
    Tcp(tcp::TcpBackupLink),
    /// Over shared memory.
    Shm(shm::ShmBackupLink),
    /// Over RDMA.
    #[cfg(feature = "rdma")]
    Rdma(crate::rdma::RdmaBackupLink),
    /// Over DPDK.
    #[cfg(feature = "dpdk")]
    Dpdk(crate::dpdk::DpdkBackupLink),
}

macro_rules! each {
    ($enum:ident, $self:expr, $l:ident => $body:expr) => {
        match $self {
            $enum::Tcp($l) => $body,
            $enum::Shm($l) => $body,
            #[cfg(feature = "rdma")]
            $enum::Rdma($l) => $body,
            #[cfg(feature = "dpdk")]
            $enum::Dpdk($l) => $body,
        }
    };
}

impl PrimaryLink for AnyPrimaryLink {
    #[inline]
    fn offer(&mut self, frame: &[u8]) -> Result<bool, ChannelError> {
        each!(AnyPrimaryLink, self, l => l.offer(frame))
    }
    #[inline]
    fn flush(&mut self) -> Result<bool, ChannelError> {
        each!(AnyPrimaryLink, self, l => l.flush())
    }
    #[inline]
    fn poll(&mut self) -> Result<BackupNews, ChannelError> {
        each!(AnyPrimaryLink, self, l => l.poll())
    }
    fn check_peer(&mut self) -> Result<(), ChannelError> {
        each!(AnyPrimaryLink, self, l => l.check_peer())
    }
    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        each!(AnyPrimaryLink, self, l => l.block(timeout))
    }
    fn seal_acks(&mut self, opener: crate::auth::AckOpener) {
        each!(AnyPrimaryLink, self, l => l.seal_acks(opener))
    }
    #[inline]
    fn kick(&mut self) -> bool {
        each!(AnyPrimaryLink, self, l => l.kick())
    }
    fn wake_ack_helper(&mut self) -> bool {
        each!(AnyPrimaryLink, self, l => l.wake_ack_helper())
    }
}

impl BackupLink for AnyBackupLink {
    #[inline]
    fn peek(&mut self) -> Result<Option<&[u8]>, ChannelError> {
        each!(AnyBackupLink, self, l => l.peek())
    }
    #[inline]
    fn receive(&mut self) -> Result<bool, ChannelError> {
        each!(AnyBackupLink, self, l => l.receive())
    }
    #[inline]
    fn consume(&mut self) -> Result<(), ChannelError> {
        each!(AnyBackupLink, self, l => l.consume())
    }
    #[inline]
    fn ack(&mut self, ack: Ack) -> Result<(), ChannelError> {
        each!(AnyBackupLink, self, l => l.ack(ack))
    }
    fn check_peer(&mut self) -> Result<(), ChannelError> {
        each!(AnyBackupLink, self, l => l.check_peer())
    }
    fn block(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        each!(AnyBackupLink, self, l => l.block(timeout))
    }
    fn seal_acks(&mut self, sealer: crate::auth::AckSealer) {
        each!(AnyBackupLink, self, l => l.seal_acks(sealer))
    }

    fn fence(&mut self) {
        each!(AnyBackupLink, self, l => l.fence())
    }

    fn enable_kicks(&mut self) -> bool {
        each!(AnyBackupLink, self, l => l.enable_kicks())
    }

    fn ack_helper(&mut self) -> Option<std::sync::Arc<dyn crate::channel::HelperWake>> {
        each!(AnyBackupLink, self, l => l.ack_helper())
    }
}

/// The primary's channel end over any medium.
pub type AnyPrimary = Primary<AnyPrimaryLink>;
/// The backup's channel end over any medium.
pub type AnyBackup = Backup<AnyBackupLink>;

/// A connected set-up stream, before the handshake.
#[derive(Debug)]
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "an unknown peer".into(), |a| a.to_string()),
            Stream::Unix(_) => "a local process".into(),
        }
    }
}

/// Which side this process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Primary,
    Backup,
}

/// A channel end, once set up (moved once, from set-up to the caller: boxing buys nothing).
#[allow(clippy::large_enum_variant)]
enum End {
    Primary(AnyPrimary),
    Backup(AnyBackup),
}

/// The device state a set-up attempt draws on, kept across attempts.
#[derive(Debug, Default)]
struct Devices {
    #[cfg(feature = "dpdk")]
    dpdk_port: Option<dpdk_sys::Port>,
    /// A shared ring made ahead ([`Listener::prepare`]) for the next primary.
    shm_ring: Option<shm::PreparedRing>,
}

impl Devices {
    /// Opens what `medium` needs before any peer connects (so a bad EAL or device name is
    /// reported at once).
    fn open(medium: &Medium) -> Result<Self, ChannelError> {
        #[allow(unused_mut)]
        let mut d = Devices::default();
        match medium {
            #[cfg(feature = "dpdk")]
            Medium::Dpdk { device, .. } => d.dpdk_port = Some(open_dpdk_port(device)?),
            #[cfg(not(feature = "dpdk"))]
            Medium::Dpdk { .. } => return Err(not_built("dpdk", "dpdk")),
            #[cfg(not(feature = "rdma"))]
            Medium::Rdma { .. } => return Err(not_built("rdma", "rdma")),
            _ => {}
        }
        Ok(d)
    }
}

#[cfg(feature = "rdma")]
fn rdma_config(device: &RdmaDevice) -> crate::rdma::RdmaConfig {
    let mut r = crate::rdma::RdmaConfig::new(device.device.clone(), device.gid_index);
    r.ib_port = device.ib_port;
    r
}

/// Runs the handshake and the medium's set-up over a connected stream, as `role`.
fn set_up(
    medium: &Medium,
    devices: &mut Devices,
    stream: Stream,
    role: Role,
    config: ChannelConfig,
) -> Result<End, ChannelError> {
    Ok(match (medium, stream, role) {
        (Medium::Shm { .. }, Stream::Unix(s), Role::Primary) => End::Primary(map_primary(
            shm::primary_on(s, config)?,
            AnyPrimaryLink::Shm,
        )),
        (Medium::Shm { .. }, Stream::Unix(s), Role::Backup) => End::Backup(map_backup(
            shm::backup_on_prepared(s, config, devices.shm_ring.take())?,
            AnyBackupLink::Shm,
        )),
        (Medium::Tcp { .. }, Stream::Tcp(s), Role::Primary) => End::Primary(map_primary(
            tcp::primary_on(s, config)?,
            AnyPrimaryLink::Tcp,
        )),
        (Medium::Tcp { .. }, Stream::Tcp(s), Role::Backup) => {
            End::Backup(map_backup(tcp::backup_on(s, config)?, AnyBackupLink::Tcp))
        }
        #[cfg(feature = "rdma")]
        (Medium::Rdma { device, .. }, Stream::Tcp(s), Role::Primary) => End::Primary(map_primary(
            crate::rdma::primary_on(s, config, &rdma_config(device))?,
            AnyPrimaryLink::Rdma,
        )),
        #[cfg(feature = "rdma")]
        (Medium::Rdma { device, .. }, Stream::Tcp(s), Role::Backup) => End::Backup(map_backup(
            crate::rdma::backup_on(s, config, &rdma_config(device))?,
            AnyBackupLink::Rdma,
        )),
        #[cfg(feature = "dpdk")]
        (Medium::Dpdk { device, .. }, Stream::Tcp(s), role) => {
            if devices.dpdk_port.is_none() {
                return Err(ChannelError::Config(
                    "the DPDK port was used up by an earlier set-up that failed".into(),
                ));
            }
            let tuning = device.tuning.clone();
            let port = &mut devices.dpdk_port;
            match role {
                Role::Primary => End::Primary(map_primary(
                    crate::dpdk::primary_on(s, port, config, tuning)?,
                    AnyPrimaryLink::Dpdk,
                )),
                Role::Backup => End::Backup(map_backup(
                    crate::dpdk::backup_on(s, port, config, tuning)?,
                    AnyBackupLink::Dpdk,
                )),
            }
        }
        (m, _, _) => {
            return Err(ChannelError::Config(format!(
                "the {} medium is not in this build",
                m.name()
            )))
        }
    })
}

fn map_primary<L: PrimaryLink>(
    p: Primary<L>,
    wrap: impl FnOnce(L) -> AnyPrimaryLink,
) -> AnyPrimary {
    p.map_link(wrap)
}

fn map_backup<L: BackupLink>(b: Backup<L>, wrap: impl FnOnce(L) -> AnyBackupLink) -> AnyBackup {
    b.map_link(wrap)
}

/// Initialises this process's EAL from the device's options (or takes the caller's port) and
/// opens, configures and starts the port.
#[cfg(feature = "dpdk")]
fn open_dpdk_port(device: &DpdkDevice) -> Result<dpdk_sys::Port, ChannelError> {
    use dpdk_sys::{EalArgs, Mempool, Port};
    let err = |what: &str, e: dpdk_sys::DpdkError| ChannelError::Config(format!("{what}: {e}"));
    if let Some(slot) = &device.opened {
        return slot.take().ok_or_else(|| {
            ChannelError::Config("the DPDK port handed over was already used".into())
        });
    }
    let Some(line) = device.eal.as_deref() else {
        return Err(ChannelError::Config(
            "the dpdk medium needs EAL options (eal=… / --eal \"…\") or an opened port".into(),
        ));
    };
    let args = EalArgs::parse(line).map_err(|e| err("EAL options", e))?;
    let eal = args
        .init()
        .map_err(|e| err(&format!("initialising DPDK with {args}"), e))?;
    let id = match &device.port {
        Some(name) => eal
            .port_by_name(name)
            .ok_or_else(|| ChannelError::Config(format!("no DPDK port named {name}")))?,
        None => match eal.ports().as_slice() {
            [id] => *id,
            ports => {
                return Err(ChannelError::Config(format!(
                    "the EAL options created {} DPDK ports; name one (port=…/--dpdk-port)",
                    ports.len()
                )))
            }
        },
    };
    let pool = Mempool::new("ftvm_log", 8191, 256, Mempool::DEFAULT_DATA_ROOM)
        .map_err(|e| err("creating the mbuf pool", e))?;
    let mut port =
        Port::configure(id, &pool, 1024, 1024).map_err(|e| err("configuring the DPDK port", e))?;
    port.start().map_err(|e| err("starting the DPDK port", e))?;
    Ok(port)
}

/// Dials `medium`'s address and returns the stream.
fn dial(medium: &Medium, timeout: Duration) -> Result<Stream, ChannelError> {
    match medium {
        Medium::Shm { socket } => UnixStream::connect(socket)
            .map(Stream::Unix)
            .map_err(|e| ChannelError::io("connecting to the peer's control socket", e)),
        Medium::Tcp { addr } | Medium::Rdma { addr, .. } | Medium::Dpdk { addr, .. } => {
            control::dial(addr.as_str(), timeout).map(Stream::Tcp)
        }
    }
}

fn dial_as(medium: &Medium, role: Role, config: ChannelConfig) -> Result<End, ChannelError> {
    config.validate()?;
    let mut devices = Devices::open(medium)?;
    let stream = dial(medium, config.handshake_timeout)?;
    set_up(medium, &mut devices, stream, role, config)
}

/// This side is the primary and dials the backup at `medium`'s address.
pub fn dial_primary(medium: &Medium, config: ChannelConfig) -> Result<AnyPrimary, ChannelError> {
    match dial_as(medium, Role::Primary, config)? {
        End::Primary(p) => Ok(p),
        End::Backup(_) => unreachable!("set_up returns the role asked for"),
    }
}

/// This side is the backup and dials the primary at `medium`'s address (a joining backup).
pub fn dial_backup(medium: &Medium, config: ChannelConfig) -> Result<AnyBackup, ChannelError> {
    match dial_as(medium, Role::Backup, config)? {
        End::Backup(b) => Ok(b),
        End::Primary(_) => unreachable!("set_up returns the role asked for"),
    }
}

#[derive(Debug)]
enum Socket {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

/// A bound set-up address that keeps listening until a peer completes the handshake.
#[derive(Debug)]
pub struct Listener {
    medium: Medium,
    socket: Socket,
    devices: Devices,
    refused: u64,
}

impl Listener {
    /// Binds `medium`'s address (a stale Unix socket file there is replaced) and opens this
    /// side's device (DPDK port), so errors show before any peer connects.
    pub fn bind(medium: &Medium) -> Result<Self, ChannelError> {
        let devices = Devices::open(medium)?;
        let socket = match medium {
            Medium::Shm { socket } => Socket::Unix {
                listener: shm::listen(socket)?,
                path: socket.clone(),
            },
            Medium::Tcp { addr } | Medium::Rdma { addr, .. } | Medium::Dpdk { addr, .. } => {
                Socket::Tcp(
                    TcpListener::bind(addr.as_str())
                        .map_err(|e| ChannelError::io("binding the set-up address", e))?,
                )
            }
        };
        Ok(Listener {
            medium: medium.clone(),
            socket,
            devices,
            refused: 0,
        })
    }

    /// The bound address: `host:port` (with the port the system chose for `:0`) or the path.
    pub fn local_addr(&self) -> String {
        match &self.socket {
            Socket::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| self.medium.address(), |a| a.to_string()),
            Socket::Unix { path, .. } => path.display().to_string(),
        }
    }

    /// The medium, with the bound address (what a peer dials).
    pub fn medium(&self) -> Medium {
        self.medium.clone().with_address(self.local_addr())
    }

    /// Makes ahead what this side's end of a channel with `config` needs, so that the set-up
    /// after a peer dials is only the handshake: for shared memory (as the backup), the ring
    /// and its mapping. Other media have nothing to make ahead (their devices open in
    /// [`Listener::bind`]).
    pub fn prepare(&mut self, config: &ChannelConfig) -> Result<(), ChannelError> {
        if let Medium::Shm { .. } = self.medium {
            self.devices.shm_ring = Some(shm::PreparedRing::create(config)?);
        }
        Ok(())
    }

    /// How many connections were refused so far (failed handshakes or set-ups).
    pub fn refused(&self) -> u64 {
        self.refused
    }

    fn accept(&self) -> Result<Stream, ChannelError> {
        loop {
            let got = match &self.socket {
                Socket::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                Socket::Unix { listener, .. } => listener.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match got {
                Ok(s) => return Ok(s),
                // A connection reset before it was accepted, or a signal: accept the next.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(ChannelError::io("accepting a connection", e)),
            }
        }
    }

    fn serve(&mut self, role: Role, config: ChannelConfig) -> Result<End, ChannelError> {
        config.validate()?;
        loop {
            let stream = self.accept()?;
            let peer = stream.peer();
            match set_up(
                &self.medium,
                &mut self.devices,
                stream,
                role,
                config.clone(),
            ) {
                Ok(end) => {
                    tracing::info!(%peer, medium = self.medium.name(), "peer connected");
                    return Ok(end);
                }
                Err(e) => {
                    #[cfg(feature = "dpdk")]
                    if matches!(self.medium, Medium::Dpdk { .. })
                        && self.devices.dpdk_port.is_none()
                    {
                        return Err(e);
                    }
                    self.refused += 1;
                    tracing::warn!(
                        %peer,
                        error = %e,
                        "refused a connection on {}; still listening",
                        self.local_addr()
                    );
                }
            }
        }
    }

    /// This side is the primary: waits for a backup (a joiner) to dial in and complete the
    /// handshake; connections that fail it are refused and logged.
    pub fn primary(&mut self, config: ChannelConfig) -> Result<AnyPrimary, ChannelError> {
        match self.serve(Role::Primary, config)? {
            End::Primary(p) => Ok(p),
            End::Backup(_) => unreachable!("set_up returns the role asked for"),
        }
    }

    /// This side is the backup: waits for the primary to dial in and complete the handshake;
    /// connections that fail it are refused and logged.
    pub fn backup(&mut self, config: ChannelConfig) -> Result<AnyBackup, ChannelError> {
        match self.serve(Role::Backup, config)? {
            End::Backup(b) => Ok(b),
            End::Primary(_) => unreachable!("set_up returns the role asked for"),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Socket::Unix { path, .. } = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        let m: Medium = "shm:/tmp/x.sock".parse().expect("parses");
        assert!(matches!(&m, Medium::Shm { socket } if socket == &PathBuf::from("/tmp/x.sock")));
        let m: Medium = "tcp:127.0.0.1:7500".parse().expect("parses");
        assert_eq!(m.address(), "127.0.0.1:7500");
        let m: Medium = "rdma:10.0.0.2:7410,dev=mlx5_0,gid=3,port=2"
            .parse()
            .expect("parses");
        match &m {
            Medium::Rdma { addr, device } => {
                assert_eq!(addr, "10.0.0.2:7410");
                assert_eq!(
                    device,
                    &RdmaDevice {
                        device: "mlx5_0".into(),
                        gid_index: 3,
                        ib_port: 2
                    }
                );
            }
            other => panic!("{other:?}"),
        }
        let line = "--no-huge -m 256 -l 0 --vdev=net_memif0,role=client,id=0";
        let m: Medium = format!("dpdk:127.0.0.1:7500,port=net_memif0,eal={line}")
            .parse()
            .expect("parses");
        match &m {
            Medium::Dpdk { addr, device } => {
                assert_eq!(addr, "127.0.0.1:7500");
                assert_eq!(device.port.as_deref(), Some("net_memif0"));
                assert_eq!(device.eal.as_deref(), Some(line));
            }
            other => panic!("{other:?}"),
        }
        // Display gives back a string that parses to the same thing.
        let again: Medium = m.to_string().parse().expect("parses");
        assert_eq!(again.to_string(), m.to_string());
    }

    #[test]
    fn refuses_malformed_descriptions() {
        for bad in [
            "",
            "tcp",
            "shm:",
            "udp:1.2.3.4:5",
            "tcp:,x=1",
            "tcp:1.2.3.4:5,blocking=1",
            "rdma:1.2.3.4:5,gid=300",
            "rdma:1.2.3.4:5,colour=red",
            "rdma:1.2.3.4:5,dev",
            "dpdk:1.2.3.4:5,mtu=9000",
        ] {
            match bad.parse::<Medium>() {
                Err(ChannelError::Config(_)) => {}
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[cfg(not(feature = "rdma"))]
    #[test]
    fn a_medium_not_built_says_how_to_rebuild() {
        let m: Medium = "rdma:127.0.0.1:1".parse().expect("parses");
        let e = Listener::bind(&m).expect_err("not built").to_string();
        assert!(e.contains("--features rdma"), "{e}");
    }
}
