//! The server loop: an acceptor thread, one thread per authenticated connection, and one lock
//! around the [`DecisionLog`] under which every request is decided.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use transport::handshake::{backup_authenticate, backup_welcome, SessionParams};
use transport::PreSharedKey;

use super::decision_log::DecisionLog;
use super::protocol::{Request, Response};
use super::session::{self, Sealed, MAX_MESSAGE};
use crate::ArbiterError;
use transport::session::End;

/// Most connections a server serves at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;

const SERVER_INFO: &[u8] = b"ftvm-arbiter 1";
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

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
            params: session::params(key),
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
        self.stats_reader()()
    }

    /// Reads the server's counters from any thread (for a metrics endpoint).
    pub fn stats_reader(&self) -> impl Fn() -> ServerStats + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || {
            let c = &shared.counters;
            ServerStats {
                connections: c.connections.load(Ordering::Relaxed),
                refused: c.refused.load(Ordering::Relaxed),
                requests: c.requests.load(Ordering::Relaxed),
                decisions: c.decisions.load(Ordering::Relaxed),
            }
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
        .and_then(|hello| backup_welcome(&mut stream, 0, SERVER_INFO).map(|()| hello));
    let hello = match authenticated {
        Ok(hello) => hello,
        Err(e) => {
            if !shared.stop.load(Ordering::SeqCst) {
                shared.counters.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "arbiter: refused a client: {e}");
            }
            return;
        }
    };
    let mut stream = Sealed::new(stream, &hello.keys, End::Accepting, MAX_MESSAGE);
    if stream
        .get_ref()
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .is_err()
    {
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
                    } => decide(&mut state, &shared.counters, pair, candidate, *epoch, None),
                    Request::Claim {
                        pair,
                        candidate,
                        epoch,
                        joins_at,
                    } => decide(
                        &mut state,
                        &shared.counters,
                        pair,
                        candidate,
                        *epoch,
                        joins_at.as_deref(),
                    ),
                    Request::Current { pair } => state.current(pair),
                    Request::Latest { pair } => state.latest(pair),
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

/// One claim on the decision log, counted and logged if it decided something new.
fn decide(
    state: &mut DecisionLog,
    counters: &Counters,
    pair: &str,
    candidate: &str,
    epoch: u64,
    joins_at: Option<&str>,
) -> Response {
    let before = state.latest_epoch(pair);
    let response = state.claim(pair, candidate, epoch, joins_at);
    if state.latest_epoch(pair) != before {
        counters.decisions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            pair,
            candidate,
            epoch = epoch + 1,
            joins_at,
            "arbiter decided"
        );
    }
    response
}
