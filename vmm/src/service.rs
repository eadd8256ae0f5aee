//! The guest service's network address, and the fence in front of it.
//!
//! A replica talks to clients through a [`ServicePort`]: either a UDP socket bound to the
//! service address itself ([`ServicePort::direct`], one replica, no failover), or through a
//! [`Front`] that owns the service address and forwards to whichever replica currently holds the
//! newest fencing epoch ([`ServicePort::via_front`]).
//!
//! # Why a front
//!
//! After a failover the service must stay at one address, and a deposed primary that keeps
//! running must not reach a client. VMware FT moves the VM's MAC/IP to the survivor and relies
//! on the arbiter; a paused primary that wakes up could still emit packets until it learns it
//! lost. The front is the piece "between the primary and the client" that makes that
//! impossible: every response a replica releases carries the replica's epoch, and the front
//! drops any response whose epoch is older than the newest it has seen (a fencing token, as in
//! Chubby's sequencers). In production the front's role is played by whatever owns the service
//! address (a load balancer, a virtual IP on a router); on one machine it is this small UDP
//! relay.
//!
//! # The front's session (ftvm's one session layer)
//!
//! The front listens on TCP at the same address and port as its UDP service socket. A replica
//! registers, and a node probes, over a TCP connection that starts with the channel's
//! handshake ([`transport::handshake`], medium `Front`, the pair's session id and key: a peer
//! with another key or pair is refused there, with the reason) and then carries
//! [`transport::session::Sealed`] messages. So a registration cannot be forged, altered or
//! replayed, even by someone who captured an earlier one or hijacks the connection, and a
//! probe's answer cannot be forged. The datagrams between the front and its registered replica
//! (requests and responses) are sealed with the same connection's keys
//! ([`transport::session::Datagrams`]: a counter and a GMAC tag each); the front forwards a
//! response only if its seal verifies under the active registration's keys, so a datagram with
//! a spoofed source address reaches no client, and the replica takes only the front's genuine
//! requests. The registration's TCP connection stays open while the replica lives.
//!
//! # Messages (little-endian)
//!
//! Every message and datagram starts with an 8-byte header: magic `FTSV`, version 2, a kind
//! byte, two zero bytes.
//!
//! | kind | on | direction | body after the header |
//! |---|---|---|---|
//! | 1 REGISTER | TCP, sealed | replica → front | epoch u64, the replica's UDP address (18 B: IPv6 or v4-mapped, port u16) |
//! | 2 REGISTERED | TCP, sealed | front → replica | epoch u64 (the front's newest), accepted u8 |
//! | 3 REQUEST | UDP, sealed | front → replica | client address (18 B), the client's bytes |
//! | 4 RESPONSE | UDP, sealed | replica → front | epoch u64, client address (18 B), the guest's bytes |
//! | 5 PROBE | TCP, sealed | node → front | nothing |
//! | 6 STATUS | TCP, sealed | front → node | epoch u64 (the front's newest) |
//!
//! A PROBE claims nothing: a node about to start a new pair asks whether the front already
//! serves one (newest epoch above 0), so that a node with another pair id never starts a second
//! pair behind a live one.
//!
//! Clients speak the guest's own protocol to the front, unchanged.
//!
//! # Retries
//!
//! While no replica is registered (between a primary's death and the backup going live), the
//! front keeps each client's latest unanswered request and forwards it to the next replica that
//! registers with a newer epoch, so a failover does not wait for the client's retry timer.
//! Clients still retry (UDP loses datagrams); the guest answers a retried request id from its
//! cache without executing it again (see `KV_REPLY_CACHE` in [`crate::layout`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::net::{TcpListener, TcpStream};

use transport::handshake::{self, MediumKind, SessionParams};
use transport::session::{Datagrams, End, Sealed};
use transport::PreSharedKey;

use crate::engine::EngineError;

const MAGIC: &[u8; 4] = b"FTSV";
const VERSION: u8 = 2;
const HEADER: usize = 8;
const ADDR_LEN: usize = 18;
const KIND_REGISTER: u8 = 1;
const KIND_REGISTERED: u8 = 2;
const KIND_REQUEST: u8 = 3;
const KIND_RESPONSE: u8 = 4;
const KIND_PROBE: u8 = 5;
const KIND_STATUS: u8 = 6;
/// Largest datagram handled.
const MAX_DATAGRAM: usize = 65536;
/// Largest message on a front connection.
const MAX_MESSAGE: usize = 64;
/// What the front's handshake Welcome carries.
const FRONT_INFO: &[u8] = b"ftvm front";

fn header(kind: u8) -> [u8; HEADER] {
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], VERSION, kind, 0, 0]
}

/// The kind byte of a well-formed front datagram.
fn kind_of(b: &[u8]) -> Option<u8> {
    (b.len() >= HEADER && &b[..4] == MAGIC && b[4] == VERSION).then(|| b[5])
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

fn encode_addr(addr: SocketAddr, out: &mut Vec<u8>) {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&ip.octets());
    out.extend_from_slice(&addr.port().to_le_bytes());
}

fn decode_addr(b: &[u8]) -> Option<SocketAddr> {
    let b = b.get(..ADDR_LEN)?;
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&b[..16]);
    let ip = Ipv6Addr::from(octets);
    let port = u16::from_le_bytes([b[16], b[17]]);
    Some(match ip.to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
        None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)),
    })
}

/// A message on a front connection (after its seal was checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontMessage {
    /// A replica claims `epoch`; requests go to `udp`.
    Register {
        /// The epoch claimed.
        epoch: u64,
        /// The replica's UDP address.
        udp: SocketAddr,
    },
    /// A node asks for the newest epoch.
    Probe,
}

impl FrontMessage {
    /// Its bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            FrontMessage::Register { epoch, udp } => {
                let mut m = header(KIND_REGISTER).to_vec();
                m.extend_from_slice(&epoch.to_le_bytes());
                encode_addr(*udp, &mut m);
                m
            }
            FrontMessage::Probe => header(KIND_PROBE).to_vec(),
        }
    }

    /// Parses a message; `None` for anything but exactly a REGISTER or a PROBE.
    pub fn decode(b: &[u8]) -> Option<Self> {
        match kind_of(b)? {
            KIND_REGISTER if b.len() == HEADER + 8 + ADDR_LEN && b[6..8] == [0, 0] => {
                Some(FrontMessage::Register {
                    epoch: u64_at(b, HEADER)?,
                    udp: decode_addr(&b[HEADER + 8..])?,
                })
            }
            KIND_PROBE if b.len() == HEADER && b[6..8] == [0, 0] => Some(FrontMessage::Probe),
            _ => None,
        }
    }
}

/// A REQUEST datagram's client and bytes (after its seal was checked).
fn decode_request(b: &[u8]) -> Option<(SocketAddr, &[u8])> {
    if kind_of(b)? != KIND_REQUEST {
        return None;
    }
    let client = decode_addr(b.get(HEADER..)?)?;
    Some((client, &b[HEADER + ADDR_LEN..]))
}

/// A RESPONSE datagram's epoch, client and bytes (after its seal was checked).
fn decode_response(b: &[u8]) -> Option<(u64, SocketAddr, &[u8])> {
    if kind_of(b)? != KIND_RESPONSE {
        return None;
    }
    let epoch = u64_at(b, HEADER)?;
    let client = decode_addr(b.get(HEADER + 8..)?)?;
    Some((epoch, client, &b[HEADER + 8 + ADDR_LEN..]))
}

/// The handshake parameters of a front connection for pair `session`: medium `Front`, no
/// guest, always sealed (like the arbiter's, whatever the log channel's crypto).
fn front_params(key: &PreSharedKey, session: u64, epoch: u64) -> SessionParams {
    SessionParams {
        session_id: session,
        epoch,
        medium: MediumKind::Front,
        key: key.clone(),
        guest: transport::GuestIdentity::default(),
        crypto: transport::auth::ChannelCrypto::Auth,
    }
}

fn other(context: &'static str, e: impl ToString) -> EngineError {
    EngineError::Io {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}

/// Connects to the front at `front` and runs the handshake as the connecting end; retries a
/// refused or failed connection (the front not up yet) every 20 ms until `deadline`. A
/// handshake refusal (another key or pair) is not retried.
fn dial_front(
    front: SocketAddr,
    params: &SessionParams,
    deadline: Instant,
    context: &'static str,
) -> Result<(Sealed<TcpStream>, transport::auth::SessionKeys), EngineError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(EngineError::Io {
                context,
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no front answers at {front}"),
                ),
            });
        }
        let mut stream = match TcpStream::connect_timeout(&front, left) {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20).min(left));
                continue;
            }
        };
        stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(left)))
            .and_then(|()| stream.set_write_timeout(Some(left)))
            .map_err(io(context))?;
        let accepted = handshake::primary_handshake(&mut stream, params)
            .map_err(|e| other(context, format!("the front at {front}: {e}")))?;
        let keys = accepted.keys.clone();
        return Ok((
            Sealed::new(stream, &accepted.keys, End::Connecting, MAX_MESSAGE),
            keys,
        ));
    }
}

/// Asks the front at `front` for the newest epoch it has registered for pair `session`
/// (0: none yet), without claiming anything. A front that does not answer within `timeout`
/// (down), or refuses the handshake (it has another key or pair), is an error.
pub fn probe_front(
    front: SocketAddr,
    key: &PreSharedKey,
    session: u64,
    timeout: Duration,
) -> Result<u64, EngineError> {
    const CONTEXT: &str = "probing the service front";
    let deadline = Instant::now() + timeout;
    let (mut conn, _) = dial_front(front, &front_params(key, session, 0), deadline, CONTEXT)?;
    conn.write_message(&FrontMessage::Probe.encode())
        .map_err(io(CONTEXT))?;
    let b = conn.read_message().map_err(io(CONTEXT))?;
    match (kind_of(&b), u64_at(&b, HEADER)) {
        (Some(KIND_STATUS), Some(epoch)) if b.len() == HEADER + 8 => Ok(epoch),
        _ => Err(other(CONTEXT, format!("a malformed answer from {front}"))),
    }
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> EngineError {
    move |source| EngineError::Io { context, source }
}

/// Where a response goes: the address a request came from (direct), or the client behind the
/// front.
pub type ReplyTo = SocketAddr;

/// A replica's end of the service address.
#[derive(Debug)]
pub struct ServicePort {
    socket: UdpSocket,
    /// `Some(front)` when clients are reached through a [`Front`].
    front: Option<SocketAddr>,
    buf: Vec<u8>,
    /// The registration's session (shared with [`Self::try_clone`]'s handles): its datagram
    /// seals, and the TCP connection kept open while this replica is registered.
    link: Arc<Mutex<Option<FrontLink>>>,
}

/// A registration at the front.
#[derive(Debug)]
struct FrontLink {
    datagrams: Arc<Datagrams>,
    _conn: Sealed<TcpStream>,
}

impl ServicePort {
    /// Clients talk to `socket` directly (it is the service address). Made non-blocking.
    pub fn direct(socket: UdpSocket) -> Result<Self, EngineError> {
        socket.set_nonblocking(true).map_err(io("service socket"))?;
        Ok(ServicePort {
            socket,
            front: None,
            buf: vec![0; MAX_DATAGRAM],
            link: Arc::default(),
        })
    }

    /// Clients reach this replica through the front at `front`, once [`Self::register`] has
    /// claimed an epoch there. `socket` is the replica's own (any local address).
    pub fn via_front(socket: UdpSocket, front: SocketAddr) -> Result<Self, EngineError> {
        socket.set_nonblocking(true).map_err(io("service socket"))?;
        Ok(ServicePort {
            socket,
            front: Some(front),
            buf: vec![0; MAX_DATAGRAM],
            link: Arc::default(),
        })
    }

    /// The local address clients (direct) or the front send to.
    pub fn local_addr(&self) -> Result<SocketAddr, EngineError> {
        self.socket.local_addr().map_err(io("service socket"))
    }

    /// The front, if clients come through one.
    pub fn front(&self) -> Option<SocketAddr> {
        self.front
    }

    /// Claims `epoch` at the front, over an authenticated connection (retrying until
    /// `timeout` while the front is not up, or holds `epoch` for another replica). Returns the
    /// front's newest epoch: equal to `epoch` when accepted; greater when this replica is
    /// deposed (it must then release nothing). A direct port has nothing to register and
    /// returns `epoch`.
    pub fn register(
        &mut self,
        key: &PreSharedKey,
        session: u64,
        epoch: u64,
        timeout: Duration,
    ) -> Result<u64, EngineError> {
        const CONTEXT: &str = "registering with the service front";
        let Some(front) = self.front else {
            return Ok(epoch);
        };
        let deadline = Instant::now() + timeout;
        let params = front_params(key, session, epoch);
        loop {
            let (mut conn, keys) = dial_front(front, &params, deadline, CONTEXT)?;
            // The address the front sends requests to: ours, with the connection's local IP
            // if the socket is bound to any address.
            let mut udp = self.socket.local_addr().map_err(io(CONTEXT))?;
            if udp.ip().is_unspecified() {
                udp.set_ip(conn.get_ref().local_addr().map_err(io(CONTEXT))?.ip());
            }
            let m = FrontMessage::Register { epoch, udp }.encode();
            conn.write_message(&m).map_err(io(CONTEXT))?;
            let b = conn.read_message().map_err(io(CONTEXT))?;
            let (Some(KIND_REGISTERED), Some(newest), Some(&accepted)) =
                (kind_of(&b), u64_at(&b, HEADER), b.get(HEADER + 8))
            else {
                return Err(other(CONTEXT, format!("a malformed answer from {front}")));
            };
            if accepted == 1 {
                // Idle from now on: it only has to stay open.
                conn.get_ref().set_read_timeout(None).map_err(io(CONTEXT))?;
                let link = FrontLink {
                    datagrams: Arc::new(Datagrams::new(&keys, End::Connecting)),
                    _conn: conn,
                };
                *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
                return Ok(newest);
            }
            if newest > epoch {
                return Ok(newest);
            }
            // Our epoch is held by another replica's registration: wait for it to go.
            if Instant::now() >= deadline {
                return Err(EngineError::Io {
                    context: CONTEXT,
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{front} kept epoch {epoch} for another replica for {timeout:?}"),
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The registration's datagram seals, if registered.
    fn datagrams(&self) -> Option<Arc<Datagrams>> {
        self.link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|l| l.datagrams.clone())
    }

    /// The next client request, if one is waiting: its bytes (at most `max` are copied into
    /// `out`) and where its response goes. Non-blocking.
    pub fn try_recv(
        &mut self,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<Option<ReplyTo>, EngineError> {
        loop {
            let (n, from) = match self.socket.recv_from(&mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(io("receiving a request")(e)),
            };
            let b = &self.buf[..n];
            match self.front {
                None => {
                    out.extend_from_slice(&b[..n.min(max)]);
                    return Ok(Some(from));
                }
                Some(front) => {
                    // Only the front's sealed REQUESTs are requests; anything else is dropped.
                    if from != front {
                        continue;
                    }
                    let Some(d) = self.datagrams() else {
                        continue;
                    };
                    let Some(b) = d.open(b) else {
                        continue;
                    };
                    let Some((client, body)) = decode_request(b) else {
                        continue;
                    };
                    out.extend_from_slice(&body[..body.len().min(max)]);
                    return Ok(Some(client));
                }
            }
        }
    }

    /// Waits until a datagram can be read or `timeout` has passed (`ppoll`); returns whether one
    /// can. A signal ends the wait early (`false`).
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool, EngineError> {
        use std::os::fd::AsRawFd;
        let mut fd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fd` is one valid pollfd (count 1) and `ts` a valid timespec, both live locals
        // for the call; a null signal mask leaves the thread's mask unchanged.
        let n = unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(io("waiting for a request")(e));
        }
        Ok(n > 0)
    }

    /// Sends a released output to `to`, stamped with `epoch` when it goes through the front.
    /// A datagram the kernel cannot take now is dropped (the client retries).
    pub fn send(&self, to: ReplyTo, bytes: &[u8], epoch: u64) -> Result<(), EngineError> {
        let result = match self.front {
            None => self.socket.send_to(bytes, to),
            Some(front) => {
                // Unregistered (or deposed before registering): nothing can reach a client.
                let Some(d) = self.datagrams() else {
                    return Ok(());
                };
                let mut m = Vec::with_capacity(HEADER + 8 + ADDR_LEN + bytes.len() + 24);
                m.extend_from_slice(&header(KIND_RESPONSE));
                m.extend_from_slice(&epoch.to_le_bytes());
                encode_addr(to, &mut m);
                m.extend_from_slice(bytes);
                d.seal(&mut m);
                self.socket.send_to(&m, front)
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(io("sending a response")(e)),
        }
    }

    /// A second handle on the same socket (for the output gate).
    pub fn try_clone(&self) -> Result<Self, EngineError> {
        Ok(ServicePort {
            socket: self.socket.try_clone().map_err(io("service socket"))?,
            front: self.front,
            buf: Vec::new(),
            link: self.link.clone(),
        })
    }
}

/// What the front has seen.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FrontStats {
    /// Client requests forwarded to a replica.
    pub requests: u64,
    /// Responses forwarded to clients.
    pub responses: u64,
    /// Responses dropped because their epoch was older than the newest registered one.
    pub fenced: u64,
    /// Connections refused in the handshake (another key or pair), and registrations refused
    /// (an epoch older than the newest, or the newest held by another replica).
    pub refused: u64,
    /// Datagrams from the registered replica's address whose seal did not verify (forged,
    /// altered or replayed).
    pub unauthenticated: u64,
    /// Client requests that arrived while no replica was registered (kept for the next one).
    pub parked: u64,
    /// Malformed or unexpected datagrams ignored.
    pub ignored: u64,
    /// The newest epoch registered.
    pub epoch: u64,
}

#[derive(Debug, Default)]
struct FrontState {
    stats: FrontStats,
    /// The replica holding the newest epoch, if it is registered.
    active: Option<Active>,
    /// The newest epoch registered.
    newest: u64,
    /// Each client's latest request that has not been answered yet.
    pending: HashMap<SocketAddr, Vec<u8>>,
    /// When the first response of each epoch was forwarded.
    first_response: BTreeMap<u64, Instant>,
    /// Responses forwarded per epoch.
    responses_by_epoch: BTreeMap<u64, u64>,
    /// When each epoch was registered.
    registered_at: BTreeMap<u64, Instant>,
}

/// A registered replica.
#[derive(Debug)]
struct Active {
    addr: SocketAddr,
    epoch: u64,
    datagrams: Arc<Datagrams>,
}

/// The service front: owns the service address, forwards requests to the replica holding the
/// newest epoch and its responses back, and fences every older epoch. See the module docs.
#[derive(Debug)]
pub struct Front {
    addr: SocketAddr,
    state: Arc<Mutex<FrontState>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Front {
    /// Serves at `addr` (the service address: UDP for clients and replicas' datagrams, TCP on
    /// the same port for registrations and probes) for FT pair `session`, with pre-shared key
    /// `key`, on threads of its own. Port 0 picks a port free for both.
    pub fn bind(addr: SocketAddr, key: PreSharedKey, session: u64) -> Result<Self, EngineError> {
        const CONTEXT: &str = "binding the front's address";
        if addr.port() != 0 {
            let socket = UdpSocket::bind(addr).map_err(io(CONTEXT))?;
            let listener = TcpListener::bind(addr).map_err(io(CONTEXT))?;
            return Self::start(socket, listener, key, session);
        }
        // An ephemeral UDP port may be taken on the TCP side (the two ranges are shared).
        let mut last = None;
        for _ in 0..64 {
            let socket = UdpSocket::bind(addr).map_err(io(CONTEXT))?;
            let at = socket.local_addr().map_err(io(CONTEXT))?;
            match TcpListener::bind(at) {
                Ok(listener) => return Self::start(socket, listener, key, session),
                Err(e) => last = Some(e),
            }
        }
        Err(io(CONTEXT)(last.unwrap_or_else(|| {
            std::io::Error::other("no port free for both UDP and TCP")
        })))
    }

    fn start(
        socket: UdpSocket,
        listener: TcpListener,
        key: PreSharedKey,
        session: u64,
    ) -> Result<Self, EngineError> {
        let addr = socket.local_addr().map_err(io("front socket"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(io("front socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(io("the front's TCP listener"))?;
        let state = Arc::new(Mutex::new(FrontState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let udp = socket.try_clone().map_err(io("front socket"))?;
        let params = front_params(&key, session, 0);
        let (st2, sp2) = (state.clone(), stop.clone());
        std::thread::Builder::new()
            .name("ftvm-front-tcp".into())
            .spawn(move || accept_loop(listener, udp, params, st2, sp2))
            .map_err(io("starting the front thread"))?;
        let thread = std::thread::Builder::new()
            .name("ftvm-front".into())
            .spawn(move || front_loop(socket, st, sp))
            .map_err(io("starting the front thread"))?;
        Ok(Front {
            addr,
            state,
            stop,
            thread: Some(thread),
        })
    }

    /// The service address clients use.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reads the front's counters from any thread (for the metrics endpoint).
    pub fn stats_reader(&self) -> impl Fn() -> FrontStats + Send + Sync + 'static {
        let state = self.state.clone();
        move || state.lock().map(|s| s.stats.clone()).unwrap_or_default()
    }

    /// Counters so far.
    pub fn stats(&self) -> FrontStats {
        self.state
            .lock()
            .map(|s| s.stats.clone())
            .unwrap_or_default()
    }

    /// When the first response stamped with an epoch of at least `epoch` reached a client.
    pub fn first_response_at_or_after(&self, epoch: u64) -> Option<Instant> {
        let s = self.state.lock().ok()?;
        s.first_response.range(epoch..).map(|(_, t)| *t).min()
    }

    /// Responses stamped with `epoch` passed on to clients so far.
    pub fn responses_in(&self, epoch: u64) -> u64 {
        self.state
            .lock()
            .map(|s| s.responses_by_epoch.get(&epoch).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// When a replica first registered an epoch of at least `epoch`.
    pub fn registered_at_or_after(&self, epoch: u64) -> Option<Instant> {
        let s = self.state.lock().ok()?;
        s.registered_at.range(epoch..).map(|(_, t)| *t).min()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `request` from `client` to the active replica, sealed.
fn forward(socket: &UdpSocket, active: &Active, client: SocketAddr, request: &[u8]) {
    let mut out = Vec::with_capacity(HEADER + ADDR_LEN + request.len() + 24);
    out.extend_from_slice(&header(KIND_REQUEST));
    encode_addr(client, &mut out);
    out.extend_from_slice(request);
    active.datagrams.seal(&mut out);
    let _ = socket.send_to(&out, active.addr);
}

/// Accepts registration and probe connections until `stop`.
fn accept_loop(
    listener: TcpListener,
    udp: UdpSocket,
    params: SessionParams,
    state: Arc<Mutex<FrontState>>,
    stop: Arc<AtomicBool>,
) {
    let params = Arc::new(params);
    while !stop.load(Ordering::Relaxed) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        let (params, state) = (params.clone(), state.clone());
        let Ok(udp) = udp.try_clone() else { continue };
        let _ = std::thread::Builder::new()
            .name("ftvm-front-conn".into())
            .spawn(move || serve_connection(stream, &udp, &params, &state));
    }
}

/// One replica's (or node's) connection: the handshake, then REGISTER and PROBE messages
/// until it closes.
fn serve_connection(
    mut stream: TcpStream,
    udp: &UdpSocket,
    params: &SessionParams,
    state: &Mutex<FrontState>,
) {
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    let timeout = Some(Duration::from_secs(5));
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.set_read_timeout(timeout))
        .and_then(|()| stream.set_write_timeout(timeout));
    if setup.is_err() {
        return;
    }
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let hello = match handshake::backup_authenticate(&mut stream, params)
        .and_then(|hello| handshake::backup_welcome(&mut stream, 0, FRONT_INFO).map(|()| hello))
    {
        Ok(hello) => hello,
        Err(e) => {
            lock().stats.refused += 1;
            tracing::warn!(%peer, "front: refused a connection: {e}");
            return;
        }
    };
    // A registered replica's connection idles for as long as it lives.
    if stream.set_read_timeout(None).is_err() {
        return;
    }
    let mut conn = Sealed::new(stream, &hello.keys, End::Accepting, MAX_MESSAGE);
    loop {
        let Ok(b) = conn.read_message() else {
            // Closed, or a message that failed authentication: the connection ends.
            return;
        };
        let answer = match FrontMessage::decode(&b) {
            Some(FrontMessage::Register { epoch, udp: addr }) => {
                let mut st = lock();
                let accepted = epoch > st.newest
                    || (epoch == st.newest && st.active.as_ref().is_none_or(|a| a.addr == addr));
                let fresh = accepted && (epoch > st.newest || st.active.is_none());
                if accepted {
                    st.newest = epoch;
                    st.active = Some(Active {
                        addr,
                        epoch,
                        datagrams: Arc::new(Datagrams::new(&hello.keys, End::Accepting)),
                    });
                    st.stats.epoch = epoch;
                    st.registered_at.entry(epoch).or_insert_with(Instant::now);
                } else {
                    st.stats.refused += 1;
                }
                let mut reply = header(KIND_REGISTERED).to_vec();
                reply.extend_from_slice(&st.newest.to_le_bytes());
                reply.push(u8::from(accepted));
                // The answer first, then the waiting requests: the replica takes its keys from
                // the answer before it reads them.
                if conn.write_message(&reply).is_err() {
                    return;
                }
                if fresh {
                    let st = &mut *st;
                    if let Some(active) = &st.active {
                        for (client, request) in &st.pending {
                            forward(udp, active, *client, request);
                            st.stats.requests += 1;
                        }
                    }
                }
                continue;
            }
            Some(FrontMessage::Probe) => {
                let mut reply = header(KIND_STATUS).to_vec();
                reply.extend_from_slice(&lock().newest.to_le_bytes());
                reply
            }
            None => {
                lock().stats.ignored += 1;
                return;
            }
        };
        if conn.write_message(&answer).is_err() {
            return;
        }
    }
}

/// The UDP side: client requests to the active replica, its sealed responses to clients.
fn front_loop(socket: UdpSocket, state: Arc<Mutex<FrontState>>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        // A read timeout (the stop flag's polling interval) or any other receive error: the
        // front keeps serving; `stop` is what ends it.
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let b = &buf[..n];
        let Ok(mut st) = state.lock() else { return };
        let st = &mut *st;
        if !b.starts_with(MAGIC) {
            // A client request (the guest's protocol).
            st.pending.insert(from, b.to_vec());
            match &st.active {
                Some(active) => {
                    forward(&socket, active, from, b);
                    st.stats.requests += 1;
                }
                None => st.stats.parked += 1,
            }
            continue;
        }
        // Only the active replica's sealed RESPONSEs; a deposed replica's (other keys, older
        // epoch) are fenced.
        let Some(active) = st.active.as_ref().filter(|a| a.addr == from) else {
            st.stats.fenced += 1;
            continue;
        };
        let Some(b) = active.datagrams.open(b) else {
            st.stats.unauthenticated += 1;
            continue;
        };
        let Some((epoch, client, body)) = decode_response(b) else {
            st.stats.ignored += 1;
            continue;
        };
        // The fence: only the registered holder of the newest epoch reaches clients.
        if epoch < st.newest || epoch != active.epoch {
            st.stats.fenced += 1;
            continue;
        }
        if st
            .pending
            .get(&client)
            .is_some_and(|r| r.get(..4) == body.get(..4))
        {
            st.pending.remove(&client);
        }
        if socket.send_to(body, client).is_ok() {
            st.stats.responses += 1;
            st.first_response.entry(epoch).or_insert_with(Instant::now);
            *st.responses_by_epoch.entry(epoch).or_default() += 1;
        }
    }
}

/// What must hold for any bytes on a front connection after its handshake, and for any
/// datagrams from the front to its replica — the check the cargo-fuzz target
/// (`fuzz/fuzz_targets/front.rs`, nightly) and the corpus test below (stable) both run.
///
/// The input is `u32 LE n`, then `n` bytes read as the front reads a registration connection
/// (sealed messages under [`transport::auth::SessionKeys::for_test`]'s keys), then datagrams
/// (`u16 LE length`, bytes) as the replica reads requests. Must hold: no panic; the messages
/// taken are exactly the genuine seed messages, in order, each once, and decode to what was
/// sent; the datagrams taken are genuine requests, each at most once, in order, decoding to what
/// the front sealed. Without the keys, bytes can make the front take no other registration and
/// the replica no other request.
pub mod fuzz {
    use super::*;
    use transport::auth::SessionKeys;
    use transport::fuzz::Scripted;

    fn keys() -> SessionKeys {
        SessionKeys::for_test(0x3C)
    }

    /// The genuine messages of the seed, as a replica sends them.
    pub fn messages() -> Vec<FrontMessage> {
        let udp = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        vec![
            FrontMessage::Register {
                epoch: 5,
                udp: udp(4000),
            },
            FrontMessage::Probe,
            FrontMessage::Register {
                epoch: 6,
                udp: SocketAddr::from((Ipv6Addr::LOCALHOST, 4001)),
            },
        ]
    }

    /// The genuine requests of the seed: client and bytes.
    pub fn requests() -> Vec<(SocketAddr, Vec<u8>)> {
        (0..4u16)
            .map(|i| {
                (
                    SocketAddr::from(([10, 0, 0, 1], 5000 + i)),
                    format!("get key-{i}").into_bytes(),
                )
            })
            .collect()
    }

    /// The seed: the genuine messages sealed, then the genuine requests sealed.
    pub fn seed() -> Vec<u8> {
        let mut replica = Sealed::new(Scripted::new(&[]), &keys(), End::Connecting, MAX_MESSAGE);
        for m in messages() {
            let _ = replica.write_message(&m.encode());
        }
        let stream = std::mem::take(&mut replica.get_mut().written);
        let front = Datagrams::new(&keys(), End::Accepting);
        let mut out = (stream.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&stream);
        for (client, bytes) in requests() {
            let mut d = header(KIND_REQUEST).to_vec();
            encode_addr(client, &mut d);
            d.extend_from_slice(&bytes);
            front.seal(&mut d);
            out.extend_from_slice(&(d.len() as u16).to_le_bytes());
            out.extend_from_slice(&d);
        }
        out
    }

    /// Runs the check (see the module documentation); returns how many messages and datagrams
    /// were taken.
    pub fn check(data: &[u8]) -> Result<usize, String> {
        let n = data
            .get(..4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .min(data.len().saturating_sub(4));
        let stream = data.get(4..4 + n).unwrap_or(&[]);
        let mut rest = data.get(4 + n..).unwrap_or(&[]);
        // The front's side of a registration connection.
        let genuine = messages();
        let mut front = Sealed::new(Scripted::new(stream), &keys(), End::Accepting, MAX_MESSAGE);
        let mut taken = 0usize;
        while let Ok(b) = front.read_message() {
            let want = genuine
                .get(taken)
                .ok_or("a message beyond the genuine ones was taken")?;
            if b != want.encode() {
                return Err(format!("message {taken} taken but not the genuine one"));
            }
            if FrontMessage::decode(&b).as_ref() != Some(want) {
                return Err(format!("message {taken} decodes to something else"));
            }
            taken += 1;
        }
        // The replica's side of the datagrams.
        let requests = requests();
        let replica = Datagrams::new(&keys(), End::Connecting);
        let mut last: Option<usize> = None;
        let mut datagrams = 0usize;
        while rest.len() >= 2 {
            let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
            let end = (2 + len).min(rest.len());
            let d = &rest[2..end];
            rest = &rest[end..];
            let Some(body) = replica.open(d) else {
                continue;
            };
            let Some((client, bytes)) = decode_request(body) else {
                return Err("a sealed datagram that is not a request was taken".into());
            };
            let Some(i) = requests
                .iter()
                .position(|(c, b)| *c == client && b.as_slice() == bytes)
            else {
                return Err("a request that the front never sent was taken".into());
            };
            if last.is_some_and(|l| i <= l) {
                return Err(format!("request {i} taken again or out of order"));
            }
            last = Some(i);
            datagrams += 1;
        }
        Ok(taken + datagrams)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn key(b: u8) -> PreSharedKey {
        PreSharedKey::new(vec![b; 32]).expect("key")
    }

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().expect("addr")
    }

    fn replica(front: SocketAddr) -> ServicePort {
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        ServicePort::via_front(s, front).expect("port")
    }

    fn recv_request(p: &mut ServicePort) -> (Vec<u8>, ReplyTo) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut v = Vec::new();
            if let Some(to) = p.try_recv(&mut v, 4096).expect("recv") {
                return (v, to);
            }
            assert!(Instant::now() < deadline, "no request reached the replica");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn client() -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").expect("bind");
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        c
    }

    #[test]
    fn a_probe_reads_the_newest_epoch_and_claims_nothing() {
        let front = Front::bind(local(), key(1), 7).expect("front");
        let at = front.local_addr();
        let t = Duration::from_secs(2);
        assert_eq!(probe_front(at, &key(1), 7, t).expect("probe"), 0);
        let mut r = replica(at);
        assert_eq!(r.register(&key(1), 7, 3, t).expect("register"), 3);
        assert_eq!(probe_front(at, &key(1), 7, t).expect("probe"), 3);
        // Still the one registered replica: a probe took nothing.
        assert_eq!(front.stats().epoch, 3);
        assert_eq!(r.register(&key(1), 7, 3, t).expect("again"), 3);
        // Another key or another session: no answer.
        let short = Duration::from_millis(200);
        assert!(probe_front(at, &key(2), 7, short).is_err());
        assert!(probe_front(at, &key(1), 8, short).is_err());
    }

    #[test]
    fn no_bytes_make_the_front_or_replica_take_what_was_not_sent() {
        let seed = fuzz::seed();
        assert_eq!(fuzz::check(&seed), Ok(3 + 4), "the seed is taken whole");
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut current = seed.clone();
        for _ in 0..4000 {
            if let Err(v) = fuzz::check(&current) {
                panic!("{v}: {current:02x?}");
            }
            transport::fuzz::xorshift(&mut state);
            let base = if state.is_multiple_of(3) {
                &current
            } else {
                &seed
            };
            current = transport::fuzz::mutate(base, state);
        }
    }

    /// `fuzz/seeds/front/` holds the seed for `scripts/fuzz.sh`
    /// (`FTVM_WRITE_FUZZ_SEEDS=1 cargo test -p vmm --lib front_seed` writes it).
    #[test]
    fn the_checked_in_front_seed_is_current() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/front/seed-0.bin");
        if std::env::var_os("FTVM_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(path.parent().expect("dir")).expect("seed directory");
            std::fs::write(&path, fuzz::seed()).expect("write seed");
        }
        assert!(
            std::fs::read(&path).unwrap_or_default() == fuzz::seed(),
            "{} is stale: FTVM_WRITE_FUZZ_SEEDS=1 cargo test -p vmm --lib front_seed",
            path.display()
        );
    }

    #[test]
    fn messages_round_trip_and_nothing_else_decodes() {
        for m in fuzz::messages() {
            assert_eq!(FrontMessage::decode(&m.encode()), Some(m));
        }
        let reg = fuzz::messages()[0].encode();
        assert_eq!(FrontMessage::decode(&reg[..reg.len() - 1]), None);
        let mut bad = reg.clone();
        bad[4] = 1;
        assert_eq!(FrontMessage::decode(&bad), None, "version 1");
        let mut bad = reg;
        bad[7] = 1;
        assert_eq!(FrontMessage::decode(&bad), None, "reserved bytes");
    }

    #[test]
    fn addresses_round_trip() {
        for a in ["127.0.0.1:7400", "[::1]:9", "10.1.2.3:65535"] {
            let addr: SocketAddr = a.parse().expect("addr");
            let mut v = Vec::new();
            encode_addr(addr, &mut v);
            assert_eq!(decode_addr(&v), Some(addr));
        }
        assert_eq!(decode_addr(&[0; 17]), None);
    }

    #[test]
    fn forwards_to_the_newest_epoch_and_fences_older_ones() {
        let k = key(7);
        let front = Front::bind(local(), k.clone(), 9).expect("front");
        let addr = front.local_addr();
        let mut old = replica(addr);
        let mut new = replica(addr);
        let timeout = Duration::from_secs(2);
        assert_eq!(old.register(&k, 9, 1, timeout).expect("register"), 1);

        let c = client();
        c.send_to(b"\x01\0\0\0first", addr).expect("send");
        let (req, to) = recv_request(&mut old);
        assert_eq!(req, b"\x01\0\0\0first");
        assert_eq!(to, c.local_addr().expect("addr"));
        old.send(to, b"\x01\0\0\0answer-1", 1).expect("send");
        let mut buf = [0u8; 64];
        let (n, _) = c.recv_from(&mut buf).expect("response");
        assert_eq!(&buf[..n], b"\x01\0\0\0answer-1");

        // A request with no answer yet, then a new replica claims epoch 2: it gets the request.
        c.send_to(b"\x02\0\0\0second", addr).expect("send");
        let _ = recv_request(&mut old);
        assert_eq!(new.register(&k, 9, 2, timeout).expect("register"), 2);
        let (req, to) = recv_request(&mut new);
        assert_eq!(req, b"\x02\0\0\0second");

        // The deposed replica's answer is fenced; the new one's gets through.
        old.send(to, b"\x02\0\0\0stale", 1).expect("send");
        new.send(to, b"\x02\0\0\0fresh", 2).expect("send");
        let (n, _) = c.recv_from(&mut buf).expect("response");
        assert_eq!(&buf[..n], b"\x02\0\0\0fresh");
        assert!(c.recv_from(&mut buf).is_err(), "a fenced response arrived");
        // Nor can the deposed replica re-register at its old epoch.
        assert_eq!(old.register(&k, 9, 1, timeout).expect("register"), 2);
        let stats = front.stats();
        assert_eq!(stats.fenced, 1);
        assert_eq!(stats.refused, 1);
        assert_eq!(stats.epoch, 2);
        assert!(front.first_response_at_or_after(2).is_some());
    }

    #[test]
    fn refuses_foreign_registrations_and_unsealed_or_replayed_responses() {
        let k = key(7);
        let front = Front::bind(local(), k.clone(), 9).expect("front");
        let addr = front.local_addr();
        let mut r = replica(addr);
        let short = Duration::from_millis(300);
        // Wrong key, wrong session: refused in the handshake, with the reason.
        let err = r.register(&key(8), 9, 5, short).expect_err("wrong key");
        assert!(err.to_string().contains("front"), "{err}");
        let err = r.register(&k, 10, 5, short).expect_err("wrong session");
        assert!(err.to_string().contains("session"), "{err}");
        // Bytes that are not a handshake.
        let mut t = TcpStream::connect(addr).expect("connect");
        let _ = t.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut sink = Vec::new();
        let _ = t.read_to_end(&mut sink);
        assert_eq!(front.stats().epoch, 0);
        assert!(front.stats().refused >= 3, "{:?}", front.stats());
        // The real key works.
        assert_eq!(r.register(&k, 9, 5, short).expect("register"), 5);
        let c = client();
        c.send_to(b"\x01\0\0\0ask", addr).expect("send");
        let (_, to) = recv_request(&mut r);
        // A response without a seal, from the replica's own address: dropped and counted.
        let mut m = header(KIND_RESPONSE).to_vec();
        m.extend_from_slice(&5u64.to_le_bytes());
        encode_addr(to, &mut m);
        m.extend_from_slice(b"\x01\0\0\0forged");
        r.socket.send_to(&m, addr).expect("send");
        // A genuine sealed response, then the same datagram again (a replay).
        let mut genuine = header(KIND_RESPONSE).to_vec();
        genuine.extend_from_slice(&5u64.to_le_bytes());
        encode_addr(to, &mut genuine);
        genuine.extend_from_slice(b"\x01\0\0\0answer");
        r.datagrams().expect("registered").seal(&mut genuine);
        r.socket.send_to(&genuine, addr).expect("send");
        r.socket.send_to(&genuine, addr).expect("send");
        let mut buf = [0u8; 64];
        let (n, _) = c.recv_from(&mut buf).expect("the genuine response");
        assert_eq!(&buf[..n], b"\x01\0\0\0answer");
        assert!(
            c.recv_from(&mut buf).is_err(),
            "a forged or replayed response arrived"
        );
        assert_eq!(front.stats().unauthenticated, 2, "{:?}", front.stats());
        assert_eq!(front.stats().responses, 1);
    }
}
