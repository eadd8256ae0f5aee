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
//! relay. Replicas register with an HMAC-tagged message over the pair's pre-shared key, so only
//! a holder of the key can claim an epoch, and an epoch can only move forward.
//!
//! # Wire format (UDP, little-endian)
//!
//! Every replica↔front datagram starts with an 8-byte header: magic `FTSV`, version 1, a kind
//! byte, two zero bytes.
//!
//! | kind | direction | body |
//! |---|---|---|
//! | 1 REGISTER | replica → front | session u64, epoch u64, nonce u64, tag 16 B (HMAC-SHA256 of header and body, truncated) |
//! | 2 REGISTERED | front → replica | epoch u64 (the front's newest), accepted u8 |
//! | 3 REQUEST | front → replica | client address (18 B: IPv6 or v4-mapped, port u16), the client's bytes |
//! | 4 RESPONSE | replica → front | epoch u64, client address (18 B), the guest's bytes |
//! | 5 PROBE | node → front | session u64, nonce u64, tag 16 B (as REGISTER's) |
//! | 6 STATUS | front → node | nonce u64 (the probe's), epoch u64 (the front's newest) |
//!
//! A PROBE claims nothing: a node about to start a new pair asks whether the front already
//! serves one (newest epoch above 0), so that a node with another pair id never starts a second
//! pair behind a live one. The front answers only authentic probes for its own session.
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

use transport::PreSharedKey;

use crate::engine::EngineError;

const MAGIC: &[u8; 4] = b"FTSV";
const VERSION: u8 = 1;
const HEADER: usize = 8;
const ADDR_LEN: usize = 18;
const TAG_LEN: usize = 16;
const REGISTER_LEN: usize = HEADER + 24 + TAG_LEN;
const KIND_REGISTER: u8 = 1;
const KIND_REGISTERED: u8 = 2;
const KIND_REQUEST: u8 = 3;
const KIND_RESPONSE: u8 = 4;
const KIND_PROBE: u8 = 5;
const KIND_STATUS: u8 = 6;
const PROBE_LEN: usize = HEADER + 16 + TAG_LEN;
const TAG_LABEL: &[u8] = b"ftvm-front-register-v1";
/// Largest datagram handled.
const MAX_DATAGRAM: usize = 65536;

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

fn register_message(key: &PreSharedKey, session: u64, epoch: u64, nonce: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(REGISTER_LEN);
    m.extend_from_slice(&header(KIND_REGISTER));
    m.extend_from_slice(&session.to_le_bytes());
    m.extend_from_slice(&epoch.to_le_bytes());
    m.extend_from_slice(&nonce.to_le_bytes());
    let tag = key.tag(TAG_LABEL, &[&m]);
    m.extend_from_slice(&tag[..TAG_LEN]);
    m
}

fn probe_message(key: &PreSharedKey, session: u64, nonce: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(PROBE_LEN);
    m.extend_from_slice(&header(KIND_PROBE));
    m.extend_from_slice(&session.to_le_bytes());
    m.extend_from_slice(&nonce.to_le_bytes());
    let tag = key.tag(TAG_LABEL, &[&m]);
    m.extend_from_slice(&tag[..TAG_LEN]);
    m
}

/// Asks the front at `front` for the newest epoch it has registered for pair `session`
/// (0: none yet), without claiming anything. A front that does not answer within `timeout`
/// (down, or it has another key or session: it ignores such probes) is an error.
pub fn probe_front(
    front: SocketAddr,
    key: &PreSharedKey,
    session: u64,
    timeout: Duration,
) -> Result<u64, EngineError> {
    let bind = if front.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let socket = UdpSocket::bind(bind).map_err(io("probing the service front"))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(io("probing the service front"))?;
    let mut nonce = [0u8; 8];
    getrandom::getrandom(&mut nonce).map_err(|e| EngineError::Io {
        context: "drawing a probe nonce",
        source: std::io::Error::other(e.to_string()),
    })?;
    let nonce = u64::from_le_bytes(nonce);
    let msg = probe_message(key, session, nonce);
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        socket
            .send_to(&msg, front)
            .map_err(io("probing the service front"))?;
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let b = &buf[..n];
            if from == front && kind_of(b) == Some(KIND_STATUS) && u64_at(b, HEADER) == Some(nonce)
            {
                if let Some(epoch) = u64_at(b, HEADER + 8) {
                    return Ok(epoch);
                }
            }
        }
    }
    Err(EngineError::Io {
        context: "probing the service front",
        source: std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer from {front} within {timeout:?} (down, or its key or pair session \
                 is not this node's)"
            ),
        ),
    })
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
}

impl ServicePort {
    /// Clients talk to `socket` directly (it is the service address). Made non-blocking.
    pub fn direct(socket: UdpSocket) -> Result<Self, EngineError> {
        socket.set_nonblocking(true).map_err(io("service socket"))?;
        Ok(ServicePort {
            socket,
            front: None,
            buf: vec![0; MAX_DATAGRAM],
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

    /// Claims `epoch` at the front (retrying every 20 ms until `timeout`). Returns the front's
    /// newest epoch: equal to `epoch` when accepted; greater when this replica is deposed (it
    /// must then release nothing). A direct port has nothing to register and returns `epoch`.
    pub fn register(
        &mut self,
        key: &PreSharedKey,
        session: u64,
        epoch: u64,
        timeout: Duration,
    ) -> Result<u64, EngineError> {
        let Some(front) = self.front else {
            return Ok(epoch);
        };
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce).map_err(|e| EngineError::Io {
            context: "drawing a registration nonce",
            source: std::io::Error::other(e.to_string()),
        })?;
        let msg = register_message(key, session, epoch, u64::from_le_bytes(nonce));
        let deadline = Instant::now() + timeout;
        loop {
            self.socket
                .send_to(&msg, front)
                .map_err(io("registering with the service front"))?;
            let resend = Instant::now() + Duration::from_millis(20);
            while Instant::now() < resend {
                match self.socket.recv_from(&mut self.buf) {
                    Ok((n, from)) if from == front => {
                        let b = &self.buf[..n];
                        if kind_of(b) == Some(KIND_REGISTERED) {
                            if let (Some(newest), Some(&accepted)) = (u64_at(b, HEADER), b.get(16))
                            {
                                if accepted == 1 || newest > epoch {
                                    return Ok(newest);
                                }
                            }
                        }
                        // A request that raced the registration: the front resends pending ones.
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(e) => return Err(io("registering with the service front")(e)),
                }
            }
            if Instant::now() >= deadline {
                return Err(EngineError::Io {
                    context: "registering with the service front",
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer from {front} within {timeout:?}"),
                    ),
                });
            }
        }
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
                    // Only the front's REQUESTs are requests; anything else is dropped.
                    if from != front || kind_of(b) != Some(KIND_REQUEST) {
                        continue;
                    }
                    let Some(client) = decode_addr(&b[HEADER..]) else {
                        continue;
                    };
                    let body = &b[HEADER + ADDR_LEN..];
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
                let mut m = Vec::with_capacity(HEADER + 8 + ADDR_LEN + bytes.len());
                m.extend_from_slice(&header(KIND_RESPONSE));
                m.extend_from_slice(&epoch.to_le_bytes());
                encode_addr(to, &mut m);
                m.extend_from_slice(bytes);
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
    /// Registrations refused (bad tag, wrong session, or an epoch older than the newest).
    pub refused: u64,
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
    /// When the first response of each epoch was forwarded.
    first_response: BTreeMap<u64, Instant>,
    /// When each epoch was registered.
    registered_at: BTreeMap<u64, Instant>,
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
    /// Serves on `socket` (the service address) for FT pair `session`, accepting registrations
    /// tagged with `key`, on a thread of its own.
    pub fn spawn(socket: UdpSocket, key: PreSharedKey, session: u64) -> Result<Self, EngineError> {
        let addr = socket.local_addr().map_err(io("front socket"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .map_err(io("front socket"))?;
        let state = Arc::new(Mutex::new(FrontState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ftvm-front".into())
            .spawn(move || front_loop(socket, key, session, st, sp))
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

fn front_loop(
    socket: UdpSocket,
    key: PreSharedKey,
    session: u64,
    state: Arc<Mutex<FrontState>>,
    stop: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // The replica holding the newest epoch, if it is registered.
    let mut active: Option<(SocketAddr, u64)> = None;
    let mut newest = 0u64;
    // Each client's latest request that has not been answered yet.
    let mut pending: HashMap<SocketAddr, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    while !stop.load(Ordering::Relaxed) {
        // A read timeout (the stop flag's polling interval) or any other receive error: the
        // front keeps serving; `stop` is what ends it.
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let b = &buf[..n];
        let Ok(mut st) = state.lock() else { return };
        match kind_of(b) {
            Some(KIND_REGISTER) => {
                let fields = (u64_at(b, HEADER), u64_at(b, HEADER + 8));
                let authentic = n == REGISTER_LEN
                    && key.verify_tag(TAG_LABEL, &[&b[..HEADER + 24]], &b[HEADER + 24..]);
                let accepted = match fields {
                    (Some(s), Some(epoch)) if authentic && s == session => {
                        epoch > newest || (epoch == newest && active.is_none_or(|(a, _)| a == from))
                    }
                    _ => false,
                };
                let mut fresh = false;
                if accepted {
                    let epoch = fields.1.unwrap_or_default();
                    fresh = epoch > newest || active.is_none();
                    newest = epoch;
                    active = Some((from, epoch));
                    st.stats.epoch = epoch;
                    st.registered_at.entry(epoch).or_insert_with(Instant::now);
                } else {
                    st.stats.refused += 1;
                }
                // The answer first, then the waiting requests: the replica reads them in order.
                let mut reply = header(KIND_REGISTERED).to_vec();
                reply.extend_from_slice(&newest.to_le_bytes());
                reply.push(u8::from(accepted));
                let _ = socket.send_to(&reply, from);
                if fresh {
                    // A new replica: give it every request still waiting for an answer.
                    for (client, request) in &pending {
                        out.clear();
                        out.extend_from_slice(&header(KIND_REQUEST));
                        encode_addr(*client, &mut out);
                        out.extend_from_slice(request);
                        let _ = socket.send_to(&out, from);
                        st.stats.requests += 1;
                    }
                }
            }
            Some(KIND_RESPONSE) => {
                let (Some(epoch), Some(client)) =
                    (u64_at(b, HEADER), b.get(HEADER + 8..).and_then(decode_addr))
                else {
                    st.stats.ignored += 1;
                    continue;
                };
                // The fence: only the registered holder of the newest epoch reaches clients.
                if epoch < newest || active.is_none_or(|(a, e)| a != from || e != epoch) {
                    st.stats.fenced += 1;
                    continue;
                }
                let body = &b[HEADER + 8 + ADDR_LEN..];
                if pending
                    .get(&client)
                    .is_some_and(|r| r.get(..4) == body.get(..4))
                {
                    pending.remove(&client);
                }
                if socket.send_to(body, client).is_ok() {
                    st.stats.responses += 1;
                    st.first_response.entry(epoch).or_insert_with(Instant::now);
                }
            }
            Some(KIND_PROBE) => {
                let authentic = n == PROBE_LEN
                    && key.verify_tag(TAG_LABEL, &[&b[..HEADER + 16]], &b[HEADER + 16..]);
                match (u64_at(b, HEADER), u64_at(b, HEADER + 8)) {
                    (Some(s), Some(nonce)) if authentic && s == session => {
                        let mut reply = header(KIND_STATUS).to_vec();
                        reply.extend_from_slice(&nonce.to_le_bytes());
                        reply.extend_from_slice(&newest.to_le_bytes());
                        let _ = socket.send_to(&reply, from);
                    }
                    _ => st.stats.refused += 1,
                }
            }
            Some(_) => st.stats.ignored += 1,
            None => {
                // A client request (the guest's protocol).
                pending.insert(from, b.to_vec());
                match active {
                    Some((replica, _)) => {
                        out.clear();
                        out.extend_from_slice(&header(KIND_REQUEST));
                        encode_addr(from, &mut out);
                        out.extend_from_slice(b);
                        let _ = socket.send_to(&out, replica);
                        st.stats.requests += 1;
                    }
                    None => st.stats.parked += 1,
                }
            }
        }
    }
}

/// Test and tool helper: a registration datagram, as a replica would send it.
#[doc(hidden)]
pub fn encode_registration(key: &PreSharedKey, session: u64, epoch: u64, nonce: u64) -> Vec<u8> {
    register_message(key, session, epoch, nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> PreSharedKey {
        PreSharedKey::new(vec![b; 32]).expect("key")
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
        let front =
            Front::spawn(UdpSocket::bind("127.0.0.1:0").expect("bind"), key(1), 7).expect("front");
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
        let front = Front::spawn(UdpSocket::bind("127.0.0.1:0").expect("bind"), k.clone(), 9)
            .expect("front");
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
    fn refuses_forged_and_foreign_registrations() {
        let k = key(7);
        let front = Front::spawn(UdpSocket::bind("127.0.0.1:0").expect("bind"), k.clone(), 9)
            .expect("front");
        let addr = front.local_addr();
        let mut r = replica(addr);
        let short = Duration::from_millis(200);
        // Wrong key, wrong session: refused (no REGISTERED with accepted = 1 ever comes).
        assert!(r.register(&key(8), 9, 5, short).is_err());
        assert!(r.register(&k, 10, 5, short).is_err());
        // A tampered datagram (epoch changed after tagging).
        let mut m = encode_registration(&k, 9, 5, 1);
        m[HEADER + 8] = 6;
        let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
        s.send_to(&m, addr).expect("send");
        // Garbage with the magic and without.
        s.send_to(b"FTSV\x01\x04\0\0", addr).expect("send");
        s.send_to(b"FTSV\x01\x09\0\0xxxx", addr).expect("send");
        std::thread::sleep(Duration::from_millis(100));
        let stats = front.stats();
        assert_eq!(stats.epoch, 0);
        assert!(stats.refused >= 3, "{stats:?}");
        assert!(stats.ignored >= 2, "{stats:?}");
        // The real key still works.
        assert_eq!(r.register(&k, 9, 5, short).expect("register"), 5);
    }
}
