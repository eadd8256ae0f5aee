//! The network backend: a small arbiter server with a durable decision log, and its client.
//!
//! ```text
//! ServerArbiter (on each FT host)                      ArbiterServer (on a third host)
//!   TCP connect ── ftvm handshake (medium Arbiter, mutual HMAC-SHA256 over the PSK) ──►
//!   request  {len u32, body} ──►   under one lock: decide, append a record + fdatasync
//!                            ◄──   response {len u32, body}, only once the record is durable
//! ```
//!
//! **Authentication.** Every connection starts with [`transport::handshake`]: the client plays
//! the connecting ("primary") role with [`MediumKind::Arbiter`], session
//! [`ARBITER_SESSION_ID`] and epoch 0; the server plays the listening role. Both prove they hold
//! the pre-shared key, so a host with another key gets no answer, and the client never takes a
//! `Won` from a server that does not hold the key. After the handshake each side sends a fresh
//! 16-byte nonce, and every message carries a tag: the first 16 bytes of HMAC-SHA256 over the
//! key, both nonces, the direction, the message's number on the connection, and the message. So
//! a message cannot be forged, altered, replayed, reordered or moved to another connection by
//! anyone without the key, even one who hijacks the TCP connection. (Messages are not
//! encrypted: decisions are not secret.)
//!
//! **Protocol.** All integers little-endian; every message is `len: u32`, then `len` bytes
//! (at most 1024), then its 16-byte tag.
//!
//! ```text
//! request  1 TestAndSet: op=1 u8, epoch u64, pair_len u16, pair, candidate_len u16, candidate
//! request  2 Current:    op=2 u8, pair_len u16, pair
//! response 0 Won:        0 u8, epoch u64
//! response 1 Lost:       1 u8, epoch u64, winner_len u16, winner
//! response 2 None:       2 u8                               (Current: no decision yet)
//! response 3 Decision:   3 u8, epoch u64, winner_len u16, winner   (Current)
//! response 4 Unavailable: 4 u8, msg_len u16, msg            (the server cannot decide durably)
//! response 5 Refused:    5 u8, msg_len u16, msg             (a malformed or invalid request)
//! ```
//!
//! **Durability.** The server keeps its decisions in `STATE_DIR/decisions.log`: an 8-byte header
//! `FTARBLG1`, then records `body_len: u32, crc32c(body): u32, body` with body `epoch: u64,
//! pair_len: u16, pair, winner_len: u16, winner`. A test-and-set that wins appends its record and
//! `fdatasync`s it before answering; on start the server replays the log, so a decision survives
//! a crash. A torn last record (a crash mid-append, never acknowledged) is cut off; damage before
//! the last record stops the server with [`ArbiterError::Corrupt`]. If an append or sync fails,
//! the server answers every later test-and-set with `Unavailable` until restarted (after an
//! fsync failure the kernel may have dropped the data, so retrying it would be unsafe). The log
//! file is locked, so a second server on the same state directory refuses to start.
//!
//! **Retries.** The client keeps its connection between calls. If a reused connection fails, it
//! reconnects and asks once more, which is safe because test-and-set is idempotent for the
//! recorded winner.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use transport::handshake::{
    backup_authenticate, backup_welcome, primary_handshake, MediumKind, SessionParams,
};
use transport::{ChannelError, PreSharedKey};

use crate::{
    decide_against, validate_candidate, validate_pair_id, validate_request, Arbiter, ArbiterError,
    Decision,
};

/// The handshake session id of arbiter connections (`"ftvmarb1"`).
pub const ARBITER_SESSION_ID: u64 = u64::from_le_bytes(*b"ftvmarb1");
/// Longest request or response body.
pub const MAX_MESSAGE: usize = 1024;
/// Most connections a server serves at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// The name of the decision log inside the state directory.
pub const LOG_FILE: &str = "decisions.log";

const LOG_MAGIC: [u8; 8] = *b"FTARBLG1";
const RECORD_HEADER: usize = 8;
const MAX_RECORD_BODY: usize = 8 + 2 + crate::MAX_PAIR_ID + 2 + crate::MAX_CANDIDATE;
const SERVER_INFO: &[u8] = b"ftvm-arbiter 1";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

const OP_TEST_AND_SET: u8 = 1;
const OP_CURRENT: u8 = 2;
const RE_WON: u8 = 0;
const RE_LOST: u8 = 1;
const RE_NONE: u8 = 2;
const RE_DECISION: u8 = 3;
const RE_UNAVAILABLE: u8 = 4;
const RE_REFUSED: u8 = 5;

fn session(key: PreSharedKey) -> SessionParams {
    SessionParams {
        session_id: ARBITER_SESSION_ID,
        epoch: 0,
        medium: MediumKind::Arbiter,
        key,
    }
}

// ------------------------------------------------------------------------------ wire format

#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    TestAndSet {
        pair: String,
        candidate: String,
        epoch: u64,
    },
    Current {
        pair: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Response {
    Won(u64),
    Lost(String, u64),
    Current(Option<(String, u64)>),
    Unavailable(String),
    Refused(String),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Every string we send is validated or truncated to far below u16::MAX.
    let mut len = s.len().min(MAX_MESSAGE / 2);
    while !s.is_char_boundary(len) {
        len -= 1;
    }
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

/// Bounds-checked reading of a received body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }
    fn u64(&mut self) -> Option<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.bytes(8)?);
        Some(u64::from_le_bytes(b))
    }
    fn string(&mut self) -> Option<String> {
        let mut b = [0u8; 2];
        b.copy_from_slice(self.bytes(2)?);
        let len = u16::from_le_bytes(b) as usize;
        String::from_utf8(self.bytes(len)?.to_vec()).ok()
    }
    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

impl Request {
    fn encode(&self) -> Vec<u8> {
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
        }
        out
    }

    fn decode(body: &[u8]) -> Option<Request> {
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
            _ => return None,
        };
        c.end()?;
        Some(req)
    }
}

impl Response {
    fn encode(&self) -> Vec<u8> {
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

    fn decode(body: &[u8]) -> Option<Response> {
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
            RE_UNAVAILABLE => Response::Unavailable(c.string()?),
            RE_REFUSED => Response::Refused(c.string()?),
            _ => return None,
        };
        c.end()?;
        Some(resp)
    }
}

const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 16;
const SEAL_LABEL: &[u8] = b"ftvm-arbiter-message-v1";
const CLIENT_TO_SERVER: u8 = 1;
const SERVER_TO_CLIENT: u8 = 2;

/// One authenticated connection, after the handshake: every message is tagged (see the module
/// docs), so nobody without the key can forge, alter, replay or reorder one.
struct Sealed<S> {
    stream: S,
    key: PreSharedKey,
    /// The client's nonce, then the server's.
    nonces: [u8; 2 * NONCE_LEN],
    /// Direction byte of the messages we send.
    outgoing: u8,
    sent: u64,
    received: u64,
}

impl<S: Read + Write> Sealed<S> {
    /// Exchanges nonces: the client sends first, the server answers with its own.
    fn open(mut stream: S, key: PreSharedKey, client: bool) -> std::io::Result<Self> {
        let mut ours = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut ours).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut theirs = [0u8; NONCE_LEN];
        if client {
            stream.write_all(&ours)?;
            stream.read_exact(&mut theirs)?;
        } else {
            stream.read_exact(&mut theirs)?;
            stream.write_all(&ours)?;
        }
        let mut nonces = [0u8; 2 * NONCE_LEN];
        let (first, second) = if client {
            (ours, theirs)
        } else {
            (theirs, ours)
        };
        nonces[..NONCE_LEN].copy_from_slice(&first);
        nonces[NONCE_LEN..].copy_from_slice(&second);
        Ok(Sealed {
            stream,
            key,
            nonces,
            outgoing: if client {
                CLIENT_TO_SERVER
            } else {
                SERVER_TO_CLIENT
            },
            sent: 0,
            received: 0,
        })
    }

    fn tag(&self, direction: u8, number: u64, body: &[u8]) -> [u8; 32] {
        self.key.tag(
            SEAL_LABEL,
            &[
                &self.nonces,
                &[direction],
                &number.to_le_bytes(),
                &(body.len() as u32).to_le_bytes(),
                body,
            ],
        )
    }

    fn write_message(&mut self, body: &[u8]) -> std::io::Result<()> {
        let tag = self.tag(self.outgoing, self.sent, body);
        let mut msg = Vec::with_capacity(4 + body.len() + TAG_LEN);
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        msg.extend_from_slice(&tag[..TAG_LEN]);
        self.stream.write_all(&msg)?;
        self.sent += 1;
        Ok(())
    }

    /// Reads one message; `InvalidData` if it announces more than [`MAX_MESSAGE`] bytes or its
    /// tag does not verify.
    fn read_message(&mut self) -> std::io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("message of {len} bytes (max {MAX_MESSAGE})"),
            ));
        }
        let mut body = vec![0u8; len + TAG_LEN];
        self.stream.read_exact(&mut body)?;
        let tag = body.split_off(len);
        let incoming = CLIENT_TO_SERVER + SERVER_TO_CLIENT - self.outgoing;
        let parts: [&[u8]; 5] = [
            &self.nonces,
            &[incoming],
            &self.received.to_le_bytes(),
            &(len as u32).to_le_bytes(),
            &body,
        ];
        if !self.key.verify_tag(SEAL_LABEL, &parts, &tag) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "message failed authentication (altered, replayed, or another key)",
            ));
        }
        self.received += 1;
        Ok(body)
    }
}

impl<S> std::fmt::Debug for Sealed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

// ------------------------------------------------------------------------------ durable state

/// The decisions and the append-only log that makes them durable.
#[derive(Debug)]
struct DecisionLog {
    file: File,
    path: PathBuf,
    latest: HashMap<String, (String, u64)>,
    /// Set when an append failed: the log's tail is unknown, so nothing more is decided.
    failed: Option<String>,
}

fn encode_record(pair: &str, winner: &str, epoch: u64) -> Vec<u8> {
    let mut body = Vec::with_capacity(MAX_RECORD_BODY);
    body.extend_from_slice(&epoch.to_le_bytes());
    put_str(&mut body, pair);
    put_str(&mut body, winner);
    let mut rec = Vec::with_capacity(RECORD_HEADER + body.len());
    rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    rec
}

/// One record at the start of `buf`: `(pair, winner, epoch, record length)`, or `None` if the
/// bytes there are not a whole valid record.
fn decode_record(buf: &[u8]) -> Option<(String, String, u64, usize)> {
    let mut c = Cursor(buf);
    let mut b = [0u8; 4];
    b.copy_from_slice(c.bytes(4)?);
    let len = u32::from_le_bytes(b) as usize;
    b.copy_from_slice(c.bytes(4)?);
    let crc = u32::from_le_bytes(b);
    if len > MAX_RECORD_BODY {
        return None;
    }
    let body = c.bytes(len)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let mut body = Cursor(body);
    let epoch = body.u64()?;
    let pair = body.string()?;
    let winner = body.string()?;
    body.end()?;
    validate_pair_id(&pair).ok()?;
    validate_candidate(&winner).ok()?;
    Some((pair, winner, epoch, RECORD_HEADER + len))
}

impl DecisionLog {
    /// Opens (creating if needed), locks and replays the log in `state_dir`.
    fn open(state_dir: &Path) -> Result<Self, ArbiterError> {
        let io = |context: &'static str| move |source| ArbiterError::Io { context, source };
        fs::create_dir_all(state_dir).map_err(io("creating the state directory"))?;
        let path = state_dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io("opening the decision log"))?;
        file.try_lock().map_err(|e| ArbiterError::Io {
            context: "locking the decision log (another arbiter server on this state directory?)",
            source: e.into(),
        })?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(io("reading the decision log"))?;
        let corrupt = |what: String| ArbiterError::Corrupt(format!("{}: {what}", path.display()));

        if buf.len() < LOG_MAGIC.len() {
            // New, or a crash while writing the header of a new log.
            if !LOG_MAGIC.starts_with(&buf) {
                return Err(corrupt("not an arbiter decision log".into()));
            }
            file.set_len(0).map_err(io("resetting the decision log"))?;
            file.write_all(&LOG_MAGIC)
                .and_then(|()| file.sync_all())
                .map_err(io("writing the decision log header"))?;
            File::open(state_dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing the state directory"))?;
            buf = LOG_MAGIC.to_vec();
        } else if buf[..LOG_MAGIC.len()] != LOG_MAGIC {
            return Err(corrupt("not an arbiter decision log".into()));
        }

        let mut latest: HashMap<String, (String, u64)> = HashMap::new();
        let mut pos = LOG_MAGIC.len();
        while pos < buf.len() {
            match decode_record(&buf[pos..]) {
                Some((pair, winner, epoch, len)) => {
                    if let Some((_, prev)) = latest.get(&pair) {
                        if epoch <= *prev {
                            return Err(corrupt(format!(
                                "pair {pair}: epoch {epoch} recorded after {prev}"
                            )));
                        }
                    }
                    latest.insert(pair, (winner, epoch));
                    pos += len;
                }
                None if buf.len() - pos < RECORD_HEADER + MAX_RECORD_BODY => {
                    // A torn last append: it was never acknowledged, so drop it.
                    tracing::warn!(
                        log = %path.display(),
                        offset = pos,
                        bytes = buf.len() - pos,
                        "cutting off a torn record at the end of the decision log"
                    );
                    file.set_len(pos as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(io("truncating a torn decision record"))?;
                    break;
                }
                None => {
                    return Err(corrupt(format!("damaged record at byte {pos}")));
                }
            }
        }
        file.seek(SeekFrom::End(0))
            .map_err(io("seeking the decision log"))?;
        Ok(DecisionLog {
            file,
            path,
            latest,
            failed: None,
        })
    }

    fn test_and_set(&mut self, pair: &str, candidate: &str, epoch: u64) -> Response {
        let new_epoch = match validate_request(pair, candidate, epoch) {
            Ok(e) => e,
            Err(e) => return Response::Refused(e.to_string()),
        };
        let latest = self.latest.get(pair).map(|(w, e)| (w.as_str(), *e));
        match decide_against(latest, candidate, epoch) {
            Some(Decision::Won { epoch }) => return Response::Won(epoch),
            Some(Decision::Lost { winner, epoch }) => return Response::Lost(winner, epoch),
            None => {}
        }
        if let Some(why) = &self.failed {
            return Response::Unavailable(why.clone());
        }
        let record = encode_record(pair, candidate, new_epoch);
        if let Err(e) = self
            .file
            .write_all(&record)
            .and_then(|()| self.file.sync_data())
        {
            let why = format!("decision log {} failed: {e}", self.path.display());
            tracing::error!("{why}; refusing further decisions until restarted");
            self.failed = Some(why.clone());
            return Response::Unavailable(why);
        }
        self.latest
            .insert(pair.to_owned(), (candidate.to_owned(), new_epoch));
        Response::Won(new_epoch)
    }

    fn current(&self, pair: &str) -> Response {
        match validate_pair_id(pair) {
            Ok(()) => Response::Current(self.latest.get(pair).cloned()),
            Err(e) => Response::Refused(e.to_string()),
        }
    }
}

// ------------------------------------------------------------------------------ server

/// Counters of a running server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: u64,
    /// Connections whose handshake failed (wrong key, garbage, wrong medium) or that were
    /// turned away for exceeding [`MAX_CONNECTIONS`].
    pub refused: u64,
    /// Requests answered.
    pub requests: u64,
    /// Test-and-sets that recorded a new decision.
    pub decisions: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    refused: AtomicU64,
    requests: AtomicU64,
    decisions: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<DecisionLog>,
    params: SessionParams,
    stop: AtomicBool,
    /// Open connections, so stopping can shut them down.
    conns: Mutex<HashMap<u64, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    counters: Counters,
}

/// Locks a mutex, recovering from a panicked holder (our state stays consistent: the map is
/// updated only after a successful append).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running arbiter server. Dropping it stops it.
#[derive(Debug)]
pub struct ArbiterServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

/// Stops a server from another thread (a signal handler's thread, say). Cheap to clone.
#[derive(Debug, Clone)]
pub struct StopHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl StopHandle {
    /// Stops accepting, shuts down open connections; [`ArbiterServer::wait`] then returns.
    /// Idempotent.
    pub fn stop(&self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        for conn in lock(&self.shared.conns).values() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }
        // Wake the acceptor blocked in accept(2).
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        if let Err(e) = TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
            tracing::warn!(%wake, "could not wake the arbiter's acceptor: {e}");
        }
    }
}

impl ArbiterServer {
    /// Replays (or creates) the decision log in `state_dir`, then serves `listener` on a thread
    /// of its own until stopped. Clients must hold `key`.
    pub fn serve(
        listener: TcpListener,
        state_dir: impl AsRef<Path>,
        key: PreSharedKey,
    ) -> Result<Self, ArbiterError> {
        let state = DecisionLog::open(state_dir.as_ref())?;
        let addr = listener.local_addr().map_err(|source| ArbiterError::Io {
            context: "reading the listener's address",
            source,
        })?;
        tracing::info!(
            %addr,
            log = %state.path.display(),
            pairs = state.latest.len(),
            "arbiter server serving"
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            params: session(key),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
            counters: Counters::default(),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("arbiter-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(|source| ArbiterError::Io {
                    context: "spawning the arbiter's acceptor",
                    source,
                })?
        };
        Ok(ArbiterServer {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that stops the server from elsewhere.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            addr: self.addr,
            shared: self.shared.clone(),
        }
    }

    /// The server's counters so far.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        ServerStats {
            connections: c.connections.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            requests: c.requests.load(Ordering::Relaxed),
            decisions: c.decisions.load(Ordering::Relaxed),
        }
    }

    /// Stops the server and waits for its threads; the decision log is closed (and unlocked).
    pub fn stop(mut self) {
        self.stop_handle().stop();
        self.join();
    }

    /// Blocks until a [`StopHandle`] stops the server, then waits for its threads.
    pub fn wait(mut self) {
        self.join();
    }

    fn join(&mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for ArbiterServer {
    fn drop(&mut self) {
        self.stop_handle().stop();
        self.join();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("arbiter accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        lock(&shared.workers).retain(|w| !w.is_finished());
        let registered = stream.try_clone().ok().and_then(|clone| {
            let mut conns = lock(&shared.conns);
            (conns.len() < MAX_CONNECTIONS).then(|| {
                next_id += 1;
                conns.insert(next_id, clone);
                next_id
            })
        });
        let Some(id) = registered else {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("arbiter: turning a connection away (limit {MAX_CONNECTIONS})");
            continue;
        };
        if shared.stop.load(Ordering::SeqCst) {
            // Stopped while registering: the stopper may have missed this connection.
            lock(&shared.conns).remove(&id);
            break;
        }
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("arbiter-conn".into())
                .spawn(move || {
                    serve_connection(stream, &shared);
                    lock(&shared.conns).remove(&id);
                })
        };
        match worker {
            Ok(w) => lock(&shared.workers).push(w),
            Err(e) => {
                lock(&shared.conns).remove(&id);
                tracing::warn!("arbiter: cannot spawn a connection thread: {e}");
            }
        }
    }
}

fn serve_connection(mut stream: TcpStream, shared: &Shared) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let _ = stream.set_nodelay(true);
    if stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .is_err()
    {
        return;
    }
    // The server plays the handshake's listening role.
    let authenticated = backup_authenticate(&mut stream, &shared.params)
        .and_then(|_| backup_welcome(&mut stream, 0, SERVER_INFO));
    if let Err(e) = authenticated {
        if !shared.stop.load(Ordering::SeqCst) {
            shared.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "arbiter: refused a client: {e}");
        }
        return;
    }
    let Ok(mut stream) = Sealed::open(stream, shared.params.key.clone(), false) else {
        return;
    };
    if stream.stream.set_read_timeout(Some(IDLE_TIMEOUT)).is_err() {
        return;
    }
    loop {
        let body = match stream.read_message() {
            Ok(body) => body,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    tracing::warn!(%peer, "arbiter: dropping a client: {e}");
                    let _ = stream.write_message(&Response::Refused(e.to_string()).encode());
                }
                return;
            }
        };
        let response = match Request::decode(&body) {
            None => Response::Refused("malformed request".into()),
            Some(req) => {
                let mut state = lock(&shared.state);
                let response = match &req {
                    Request::TestAndSet {
                        pair,
                        candidate,
                        epoch,
                    } => {
                        let before = state.latest.get(pair).map(|(_, e)| *e);
                        let response = state.test_and_set(pair, candidate, *epoch);
                        if state.latest.get(pair).map(|(_, e)| *e) != before {
                            shared.counters.decisions.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(pair, candidate, epoch = epoch + 1, "arbiter decided");
                        }
                        response
                    }
                    Request::Current { pair } => state.current(pair),
                };
                drop(state);
                response
            }
        };
        shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        let refused = matches!(response, Response::Refused(_));
        if stream.write_message(&response.encode()).is_err() || refused {
            return;
        }
    }
}

// ------------------------------------------------------------------------------ client

/// A client of an [`ArbiterServer`]: an [`Arbiter`] over TCP.
#[derive(Debug)]
pub struct ServerArbiter {
    addr: String,
    params: SessionParams,
    connect_timeout: Duration,
    io_timeout: Duration,
    conn: Option<Sealed<TcpStream>>,
}

impl ServerArbiter {
    /// A client of the server at `addr` (`host:port`, resolved at each connection). It connects
    /// on first use, with a 1 s connect and a 3 s I/O timeout.
    pub fn new(addr: impl Into<String>, key: PreSharedKey) -> Self {
        ServerArbiter {
            addr: addr.into(),
            params: session(key),
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(3),
            conn: None,
        }
    }

    /// Sets the connect timeout (per address) and the timeout of each read and write.
    pub fn with_timeouts(mut self, connect: Duration, io: Duration) -> Self {
        self.connect_timeout = connect;
        self.io_timeout = io;
        self
    }

    fn connect(&self) -> Result<Sealed<TcpStream>, ArbiterError> {
        let addrs = self
            .addr
            .to_socket_addrs()
            .map_err(|e| ArbiterError::unavailable(&format!("resolving {}", self.addr), e))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.connect_timeout) {
                Ok(mut stream) => {
                    let setup = stream
                        .set_nodelay(true)
                        .and_then(|()| stream.set_read_timeout(Some(self.io_timeout)))
                        .and_then(|()| stream.set_write_timeout(Some(self.io_timeout)));
                    setup.map_err(|e| ArbiterError::unavailable("configuring a socket", e))?;
                    primary_handshake(&mut stream, &self.params).map_err(handshake_error)?;
                    return Sealed::open(stream, self.params.key.clone(), true)
                        .map_err(|e| ArbiterError::unavailable("arbiter nonce exchange", e));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(ArbiterError::Unavailable(match last {
            Some(e) => format!("connecting to arbiter {}: {e}", self.addr),
            None => format!("arbiter {} resolves to no address", self.addr),
        }))
    }

    fn request(&mut self, req: &Request) -> Result<Response, ArbiterError> {
        let body = req.encode();
        loop {
            let reused = self.conn.is_some();
            let mut stream = match self.conn.take() {
                Some(s) => s,
                None => self.connect()?,
            };
            let answer = stream
                .write_message(&body)
                .and_then(|()| stream.read_message());
            match answer {
                Ok(answer) => {
                    let response = Response::decode(&answer).ok_or_else(|| {
                        ArbiterError::Protocol("malformed response from the arbiter".into())
                    })?;
                    self.conn = Some(stream);
                    return Ok(response);
                }
                // A kept connection may have died since (server restarted): ask once more on a
                // new one. Safe: the recorded winner asking again gets the same Won.
                Err(_) if reused => continue,
                Err(e) => {
                    return Err(ArbiterError::unavailable(
                        &format!("asking arbiter {}", self.addr),
                        e,
                    ))
                }
            }
        }
    }
}

fn handshake_error(e: ChannelError) -> ArbiterError {
    match e {
        ChannelError::AuthRejected | ChannelError::PeerNotAuthenticated => ArbiterError::Auth(e),
        ChannelError::PeerClosed
        | ChannelError::HandshakeTimeout { .. }
        | ChannelError::Timeout { .. }
        | ChannelError::Io { .. } => ArbiterError::unavailable("arbiter handshake", e),
        other => ArbiterError::Protocol(format!("arbiter handshake: {other}")),
    }
}

fn server_error(resp: Response, what: &str) -> ArbiterError {
    match resp {
        Response::Unavailable(msg) => ArbiterError::Unavailable(format!("arbiter server: {msg}")),
        Response::Refused(msg) => ArbiterError::Protocol(format!("arbiter server refused: {msg}")),
        other => ArbiterError::Protocol(format!("unexpected answer to {what}: {other:?}")),
    }
}

impl Arbiter for ServerArbiter {
    fn test_and_set(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
    ) -> Result<Decision, ArbiterError> {
        let new_epoch = validate_request(pair_id, candidate, epoch)?;
        let resp = self.request(&Request::TestAndSet {
            pair: pair_id.to_owned(),
            candidate: candidate.to_owned(),
            epoch,
        })?;
        match resp {
            Response::Won(e) if e == new_epoch => Ok(Decision::Won { epoch: e }),
            Response::Lost(winner, e) if e > epoch && validate_candidate(&winner).is_ok() => {
                Ok(Decision::Lost { winner, epoch: e })
            }
            other => Err(server_error(other, "test-and-set")),
        }
    }

    fn current(&mut self, pair_id: &str) -> Result<Option<(String, u64)>, ArbiterError> {
        validate_pair_id(pair_id)?;
        match self.request(&Request::Current {
            pair: pair_id.to_owned(),
        })? {
            Response::Current(c) => Ok(c),
            other => Err(server_error(other, "current")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ft-arbiter-unit-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn messages_round_trip() {
        for req in [
            Request::TestAndSet {
                pair: "p".into(),
                candidate: "host-a".into(),
                epoch: 7,
            },
            Request::Current { pair: "p".into() },
        ] {
            assert_eq!(Request::decode(&req.encode()), Some(req));
        }
        for resp in [
            Response::Won(3),
            Response::Lost("b".into(), 9),
            Response::Current(None),
            Response::Current(Some(("c".into(), 2))),
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
    fn log_replays_and_cuts_a_torn_tail() {
        let dir = temp_dir("torn");
        {
            let mut log = DecisionLog::open(&dir).expect("new log");
            assert_eq!(log.test_and_set("p", "a", 1), Response::Won(2));
            assert_eq!(log.test_and_set("q", "b", 5), Response::Won(6));
        }
        let path = dir.join(LOG_FILE);
        let good_len = fs::metadata(&path).expect("meta").len();
        // A crash halfway through a third append.
        let rec = encode_record("p", "c", 3);
        let mut f = OpenOptions::new().append(true).open(&path).expect("append");
        f.write_all(&rec[..rec.len() - 3]).expect("torn write");
        drop(f);
        let log = DecisionLog::open(&dir).expect("replay");
        assert_eq!(log.latest.get("p"), Some(&("a".to_owned(), 2)));
        assert_eq!(log.latest.get("q"), Some(&("b".to_owned(), 6)));
        assert_eq!(fs::metadata(&path).expect("meta").len(), good_len);
        drop(log);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn log_refuses_damage_before_the_tail_and_foreign_files() {
        let dir = temp_dir("damage");
        {
            let mut log = DecisionLog::open(&dir).expect("new log");
            for e in 1..40 {
                assert_eq!(log.test_and_set("p", "a", e), Response::Won(e + 1));
            }
        }
        let path = dir.join(LOG_FILE);
        let mut bytes = fs::read(&path).expect("read");
        bytes[LOG_MAGIC.len() + 10] ^= 0xff;
        fs::write(&path, &bytes).expect("write");
        assert!(matches!(
            DecisionLog::open(&dir),
            Err(ArbiterError::Corrupt(_))
        ));
        fs::write(&path, b"something else entirely").expect("write");
        assert!(matches!(
            DecisionLog::open(&dir),
            Err(ArbiterError::Corrupt(_))
        ));
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn second_server_on_the_same_state_is_refused() {
        let dir = temp_dir("lock");
        let first = DecisionLog::open(&dir).expect("first");
        let err = DecisionLog::open(&dir).expect_err("second must fail");
        assert!(matches!(err, ArbiterError::Io { .. }), "{err:?}");
        drop(first);
        DecisionLog::open(&dir).expect("free again");
        fs::remove_dir_all(&dir).ok();
    }

    /// A byte pipe that records what is written, for replaying and tampering with it.
    #[derive(Default)]
    struct Tap {
        input: std::collections::VecDeque<u8>,
        written: Vec<u8>,
    }

    impl Read for Tap {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.input.len());
            for b in buf.iter_mut().take(n) {
                *b = self.input.pop_front().unwrap_or_default();
            }
            Ok(n)
        }
    }

    impl Write for Tap {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn key(b: u8) -> PreSharedKey {
        PreSharedKey::new(vec![b; 32]).expect("key")
    }

    /// A client and a server end joined by taps; the server's input is whatever we feed it.
    fn sealed_pair(server_key: u8) -> (Sealed<Tap>, Sealed<Tap>) {
        // The server answers the client's nonce with its own: pre-load each side's input with
        // the other's nonce by opening the client against a server nonce we make up first.
        let server_nonce = [7u8; NONCE_LEN];
        let client_tap = Tap {
            input: server_nonce.iter().copied().collect(),
            ..Default::default()
        };
        let mut client = Sealed::open(client_tap, key(1), true).expect("client");
        let client_nonce = client.nonces[..NONCE_LEN].to_vec();
        let server_tap = Tap {
            input: client_nonce.into_iter().collect(),
            ..Default::default()
        };
        let mut server = Sealed::open(server_tap, key(server_key), false).expect("server");
        // Make the server use the nonce the client saw.
        server.nonces[NONCE_LEN..].copy_from_slice(&server_nonce);
        // Only the messages from here on.
        client.stream.written.clear();
        (client, server)
    }

    #[test]
    fn sealed_messages_are_authenticated_in_order() {
        let (mut client, mut server) = sealed_pair(1);
        client.write_message(b"first").expect("write");
        client.write_message(b"second").expect("write");
        let wire = std::mem::take(&mut client.stream.written);
        server.stream.input.extend(&wire);
        assert_eq!(server.read_message().expect("first"), b"first");
        assert_eq!(server.read_message().expect("second"), b"second");
        // The same bytes again: a replay, numbered 0 and 1 where 2 is due.
        server.stream.input.extend(&wire);
        let e = server.read_message().expect_err("a replay must fail");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn sealed_messages_refuse_tampering_and_other_keys() {
        let (mut client, mut server) = sealed_pair(1);
        client.write_message(&[1, 2, 3, 4]).expect("write");
        let mut wire = std::mem::take(&mut client.stream.written);
        wire[5] ^= 1;
        server.stream.input.extend(&wire);
        let e = server.read_message().expect_err("tampered");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);

        let (mut client, mut server) = sealed_pair(2);
        client.write_message(b"hello").expect("write");
        let wire = std::mem::take(&mut client.stream.written);
        server.stream.input.extend(&wire);
        let e = server.read_message().expect_err("another key");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    }
}
