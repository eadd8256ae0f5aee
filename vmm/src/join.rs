//! A backup joins a running primary: authentication, the checks, the live state transfer
//! ([`crate::migrate`]) and the switch-over, after which the primary's log goes to the new
//! backup and outputs wait for its ACKs again.
//!
//! ```text
//! joiner                                   primary (serving; its join service listens)
//!   binds its medium listener (as any backup)
//!   dials the join address ───────────────► handshake (PSK, pair, epoch; medium "join"),
//!   Welcome{memory size, image digest,          the joiner's request in the Welcome
//!           medium and its address}         refuses (REFUSED chunk) if protected, busy, or
//!                                           another image / memory size / medium
//!          ◄───────────────── HEADER, rounds of PAGES/ZEROS while the guest runs
//!                                           pauses the vCPU at an exit boundary
//!          ◄───────────────── last pages, VCPU, DEVICE, HASHES, END
//!   loads, checks digests; VERDICT ───────►
//!   accepts the channel ◄──────────────────── dials the joiner's medium (log resumes at the
//!                                           DEVICE's next sequence number), resumes the guest
//! ```
//! Until the channel is up the guest stays stopped (the pause), so no entry is ever produced
//! that the new backup would miss. Any failure before that leaves the primary serving
//! unprotected as before, and the joiner exiting without ever going live.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use transport::auth::{ChannelCrypto, SessionKeys};
use transport::handshake::{self, MediumKind};
use transport::session::{ChunkTags, End};
use transport::{AnyPrimary, ChannelConfig, Medium};

use crate::migrate::sink::{restore_with, Expect, Restored};
use crate::migrate::source::{Precopy, PrecopyConfig, RoundStats};
use crate::migrate::state::VcpuState;
use crate::migrate::stream::{Chunk, ChunkReader, ChunkWriter, Header};
use crate::migrate::{hex, MigrateError};
use crate::vm::{MemoryHandle, Vm};

/// Where a primary accepts joins: `host:port`, or a Unix socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinAddr {
    /// TCP.
    Tcp(String),
    /// A Unix socket.
    Unix(PathBuf),
}

impl std::str::FromStr for JoinAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an empty join address".into());
        }
        if s.contains('/') {
            Ok(JoinAddr::Unix(PathBuf::from(s)))
        } else if s.contains(':') {
            Ok(JoinAddr::Tcp(s.to_owned()))
        } else {
            Err(format!(
                "join address {s:?}: expected host:port or a Unix socket path (with a '/')"
            ))
        }
    }
}

impl std::fmt::Display for JoinAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinAddr::Tcp(a) => f.write_str(a),
            JoinAddr::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What the primary's VMM hands the joiner besides memory and vCPU: where its log stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceState {
    /// The exit the guest stopped after (the joiner's next exit is `exit + 1`).
    pub exit: u64,
    /// The sequence number of the first log entry after the switch-over.
    pub next_seq: u64,
    /// The primary's fencing epoch.
    pub epoch: u64,
    /// The last clock value the guest was given (the joiner continues from it on a takeover).
    pub last_clock_ns: u64,
}

impl DeviceState {
    /// 32 bytes: the four fields, little-endian.
    pub fn encode(&self) -> Vec<u8> {
        [self.exit, self.next_seq, self.epoch, self.last_clock_ns]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    /// Reads [`DeviceState::encode`]'s bytes.
    pub fn decode(b: &[u8]) -> Result<Self, MigrateError> {
        if b.len() != 32 {
            return Err(MigrateError::Malformed {
                index: 0,
                kind: "DEVICE",
                what: format!("{} bytes of device state, expected 32", b.len()),
            });
        }
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i * 8..i * 8 + 8]);
            u64::from_le_bytes(a)
        };
        Ok(DeviceState {
            exit: w(0),
            next_seq: w(1),
            epoch: w(2),
            last_clock_ns: w(3),
        })
    }
}

/// What a joiner asks for (in its handshake Welcome).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    /// Its guest memory size.
    pub mem_size: u64,
    /// Its guest image's SHA-256.
    pub image_digest: [u8; 32],
    /// Its log medium's name (`shm`, `tcp`, …).
    pub medium: String,
    /// Where its medium listener waits for the primary.
    pub address: String,
}

impl JoinRequest {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&self.mem_size.to_le_bytes());
        b.extend_from_slice(&self.image_digest);
        b.extend_from_slice(format!("{}\n{}", self.medium, self.address).as_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < 40 {
            return Err(format!("a join request of {} bytes", b.len()));
        }
        let mut m = [0u8; 8];
        m.copy_from_slice(&b[..8]);
        let mut image_digest = [0u8; 32];
        image_digest.copy_from_slice(&b[8..40]);
        let text = std::str::from_utf8(&b[40..]).map_err(|_| "a join request not in UTF-8")?;
        let (medium, address) = text
            .split_once('\n')
            .ok_or("a join request without a medium address")?;
        Ok(JoinRequest {
            mem_size: u64::from_le_bytes(m),
            image_digest,
            medium: medium.to_owned(),
            address: address.to_owned(),
        })
    }
}

/// Why a join failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// The connection or its handshake failed.
    #[error("{0}")]
    Channel(#[from] transport::ChannelError),
    /// The state transfer failed.
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    /// I/O outside the channel.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Anything else, said plainly.
    #[error("{0}")]
    Other(String),
}

/// A refusal for now: another joiner is being served.
const REFUSED_BUSY: &str = "another backup is joining right now";
/// A refusal for now: the pair has its backup (it may be this joiner's dead predecessor, not
/// yet noticed).
const REFUSED_PROTECTED: &str = "the pair is protected: a backup already has the log";
/// A refusal for now: the replica asked is a backup (it may be about to take over).
const REFUSED_NOT_LIVE: &str = "this replica is a backup, not serving: join the primary";

impl JoinError {
    /// True if this joiner can never join this primary as configured: another key, pair,
    /// protocol version, guest image, memory size or medium. Every other failure (nobody
    /// listening yet, a primary that is busy, protected, not yet live, or died mid-transfer, a
    /// stream corrupted in transit) may pass: a retry with a fresh VM can succeed.
    pub fn is_permanent(&self) -> bool {
        use transport::ChannelError as C;
        match self {
            JoinError::Channel(
                C::AuthRejected
                | C::PeerNotAuthenticated
                | C::SessionMismatch { .. }
                | C::VersionMismatch { .. }
                | C::MediumMismatch
                | C::GuestMismatch { .. }
                | C::KeyFile { .. }
                | C::KeyFilePermissions { .. }
                | C::Config(_),
            ) => true,
            JoinError::Migrate(MigrateError::Refused(why)) => {
                ![REFUSED_BUSY, REFUSED_PROTECTED, REFUSED_NOT_LIVE]
                    .iter()
                    .any(|transient| why.contains(transient))
            }
            _ => false,
        }
    }
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> JoinError {
    move |source| JoinError::Io { context, source }
}

/// A connected join stream, TCP or Unix.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// One completed or failed join, as the primary saw it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct JoinReport {
    /// Whether the backup joined (the pair is protected again).
    pub joined: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// The guest was stopped this long (switch-over), ms.
    pub pause_ms: f64,
    /// From the joiner's connection to protected, ms.
    pub total_ms: f64,
    /// Stream bytes sent.
    pub bytes: u64,
    /// Pre-copy rounds (the final one, with the guest stopped, not counted).
    pub rounds: Vec<RoundStats>,
    /// Pages sent with the guest stopped.
    pub final_pages: u64,
    /// The exit at which the log went on to the new backup.
    pub exit: u64,
    /// The pause's parts, ms: sending the last pages and the state; the joiner loading and
    /// checking them (until its verdict); setting up the log channel to it.
    pub finish_ms: f64,
    pub verdict_ms: f64,
    pub channel_ms: f64,
    /// Parts of `finish_ms`: reading the last dirty bitmap, sending the last pages (until the
    /// joiner's socket took them).
    pub finish_dirty_log_ms: f64,
    pub finish_pages_ms: f64,
    /// Before the pause, ms: authenticating the joiner and checking its request; the
    /// pre-copy rounds; waiting for the joiner to load the last round; waiting for the vCPU
    /// to stop at its next exit.
    #[serde(default)]
    pub auth_ms: f64,
    #[serde(default)]
    pub rounds_ms: f64,
    #[serde(default)]
    pub catch_up_ms: f64,
    #[serde(default)]
    pub stop_ms: f64,
}

/// What the primary's join service needs to know.
#[derive(Debug, Clone)]
pub struct JoinSettings {
    /// The log medium (its kind and devices; the address is the joiner's).
    pub medium: Medium,
    /// The channel's settings (key, pair, timeouts); the epoch is the service's current one.
    pub channel: ChannelConfig,
    /// Guest memory size.
    pub mem_size: u64,
    /// Guest image SHA-256.
    pub image_digest: [u8; 32],
    /// When the pre-copy rounds stop.
    pub precopy: PrecopyConfig,
    /// Longest wait for the vCPU to reach the switch-over, and for the joiner's verdict.
    pub switch_timeout: Duration,
}

/// The vCPU thread's hand-over at the switch-over.
struct Handover {
    state: VcpuState,
    registers: u64,
    device: DeviceState,
}

/// Whether a replica's log has a backup, and its epoch: kept up to date by its log sink
/// ([`crate::failover::FailoverSink::with_protection`]), read by the join service.
#[derive(Debug, Default)]
pub struct Protection {
    /// A backup has the log (joins are refused).
    pub protected: AtomicBool,
    /// The epoch the replica serves in.
    pub epoch: AtomicU64,
    /// This replica serves live (a backup that has not taken over refuses joins).
    pub live: AtomicBool,
}

impl Protection {
    /// Records a change.
    pub fn set(&self, live: bool, protected: bool, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
        self.protected.store(protected, Ordering::Release);
        self.live.store(live, Ordering::Release);
    }
}

/// State shared between the vCPU thread and the join threads.
struct Shared {
    /// Set by the join thread when the rounds are done: the vCPU pauses at its next exit.
    pause: Arc<AtomicBool>,
    state: Arc<Protection>,
    /// A join is under way.
    busy: AtomicBool,
    reports: Mutex<Vec<JoinReport>>,
    /// The service was dropped: the accept loop ends (and frees the address) at its next wake.
    closed: AtomicBool,
}

/// The primary's side: a listener thread that accepts joiners one at a time while the guest
/// runs, and the switch-over the vCPU thread performs when the run pauses.
pub struct JoinService {
    shared: Arc<Shared>,
    handover: SyncSender<Handover>,
    result: Mutex<Receiver<Result<AnyPrimary, String>>>,
    local: String,
}

impl std::fmt::Debug for JoinService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinService")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

enum Listening {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Drop for JoinService {
    /// Stops accepting and frees the address: the accept loop is woken by a connection of our
    /// own and ends, dropping its listener (a node that lost a claim binds the address again).
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        let woken = match self.local.parse::<std::net::SocketAddr>() {
            Ok(mut a) => {
                if a.ip().is_unspecified() {
                    a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                TcpStream::connect_timeout(&a, Duration::from_secs(1)).map(drop)
            }
            Err(_) => UnixStream::connect(&self.local).map(drop),
        };
        if let Err(e) = woken {
            tracing::debug!("join service: waking its accept loop to close: {e}");
        }
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Listening::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl JoinService {
    /// Listens for joiners at `addr`; `memory` is the guest's (for the copier), `live` whether
    /// this replica serves now (a backup that may take over later says `false` and calls
    /// [`JoinService::set_live`] then).
    pub fn spawn(
        addr: &JoinAddr,
        memory: MemoryHandle,
        settings: JoinSettings,
        live: bool,
    ) -> Result<Self, JoinError> {
        let listening = match addr {
            JoinAddr::Tcp(a) => {
                Listening::Tcp(TcpListener::bind(a).map_err(io("binding the join address"))?)
            }
            JoinAddr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Listening::Unix(
                    UnixListener::bind(p).map_err(io("binding the join socket"))?,
                    p.clone(),
                )
            }
        };
        let local = match &listening {
            Listening::Tcp(l) => l.local_addr().map_err(io("the join address"))?.to_string(),
            Listening::Unix(_, p) => p.display().to_string(),
        };
        let state = Arc::new(Protection::default());
        state.set(live, false, settings.channel.epoch);
        let shared = Arc::new(Shared {
            pause: Arc::new(AtomicBool::new(false)),
            state,
            busy: AtomicBool::new(false),
            reports: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
        });
        let (handover_tx, handover_rx) = mpsc::sync_channel(1);
        let (result_tx, result_rx) = mpsc::channel();
        let worker = Worker {
            shared: shared.clone(),
            memory,
            settings,
            handover: handover_rx,
            result: result_tx,
        };
        std::thread::Builder::new()
            .name("ftvm-join".into())
            .spawn(move || {
                run_on_every_cpu();
                accept_loop(listening, worker)
            })
            .map_err(io("starting the join thread"))?;
        Ok(JoinService {
            shared,
            handover: handover_tx,
            result: Mutex::new(result_rx),
            local,
        })
    }

    /// Where joiners dial.
    pub fn local_addr(&self) -> &str {
        &self.local
    }

    /// The flag the recorder pauses on ([`crate::record::Recorder::with_pause`]).
    pub fn pause_flag(&self) -> Arc<AtomicBool> {
        self.shared.pause.clone()
    }

    /// The replica's protection state, for its log sink to keep up to date.
    pub fn protection(&self) -> Arc<Protection> {
        self.shared.state.clone()
    }

    /// Every join so far.
    pub fn reports(&self) -> Vec<JoinReport> {
        self.shared
            .reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The switch-over, on the vCPU thread after the run paused at exit `device.exit`: hands
    /// the vCPU state over and waits for the new backup's channel. Always clears the pause.
    pub fn switch_over(
        &self,
        vm: &mut Vm,
        device: DeviceState,
        timeout: Duration,
    ) -> Result<AnyPrimary, String> {
        let r = self.hand_over(vm, device, timeout);
        self.shared.pause.store(false, Ordering::Release);
        r
    }

    fn hand_over(
        &self,
        vm: &mut Vm,
        device: DeviceState,
        timeout: Duration,
    ) -> Result<AnyPrimary, String> {
        let result = self
            .result
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // An answer to an earlier switch-over that timed out is stale.
        while result.try_recv().is_ok() {}
        let state = vm.vcpu_state().map_err(|e| e.to_string())?;
        let registers = vm.registers_digest().map_err(|e| e.to_string())?;
        self.handover
            .try_send(Handover {
                state,
                registers,
                device,
            })
            .map_err(|_| "the join thread is not waiting for the switch-over".to_string())?;
        match result.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => Err(format!("no new channel within {timeout:?}")),
        }
    }
}

struct Worker {
    shared: Arc<Shared>,
    memory: MemoryHandle,
    settings: JoinSettings,
    handover: Receiver<Handover>,
    result: Sender<Result<AnyPrimary, String>>,
}

/// Lets the calling thread run on every CPU. The join thread is spawned by the vCPU thread and
/// would inherit its pinning (`--core`): the pre-copy would then take the guest's core (under
/// load the guest's responses waited behind it). (Moving it onto the vCPU's idle core for the
/// switch-over was tried: the last pages went out slower.)
fn run_on_every_cpu() {
    // SAFETY: all-zero is a valid (empty) `cpu_set_t`; CPU_SET writes bits inside it;
    // sched_setaffinity gets a valid pointer to it and its size, for this thread (pid 0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::debug!(
            "the join thread keeps its CPU affinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn accept_loop(listening: Listening, worker: Worker) {
    // One thread serves joiners one at a time; this one keeps accepting, so that a joiner
    // arriving during a join is refused at once rather than left waiting.
    let shared = worker.shared.clone();
    let settings = worker.settings.clone();
    let (conns, serve) = std::sync::mpsc::channel::<Conn>();
    let spawned = std::thread::Builder::new()
        .name("ftvm-join-serve".into())
        .spawn(move || serve_loop(serve, worker));
    if let Err(e) = spawned {
        tracing::warn!("join service: starting its worker thread: {e}; not accepting joins");
        return;
    }
    loop {
        let conn = match &listening {
            Listening::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
            Listening::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
        };
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("join listener: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.busy.swap(true, Ordering::AcqRel) {
            // Refused at once, not after the join under way.
            let settings = settings.clone();
            let epoch = shared.state.epoch.load(Ordering::Acquire);
            std::thread::spawn(move || {
                refuse(conn, &settings, epoch, REFUSED_BUSY);
            });
            continue;
        }
        if conns.send(conn).is_err() {
            tracing::warn!("join service: its worker thread is gone; not accepting joins");
            return;
        }
    }
}

/// Counts a join the primary served in the metrics.
fn count_join(r: &JoinReport) {
    use ftvm_metrics::METRICS;
    match &r.error {
        None => {
            METRICS.joins_completed.inc();
            METRICS.join_pause.observe_ns((r.pause_ms * 1e6) as u64);
            METRICS.join_duration.observe_ns((r.total_ms * 1e6) as u64);
        }
        Some(e) if e.starts_with("refused") => METRICS.joins_refused.inc(),
        Some(_) => METRICS.joins_failed.inc(),
    }
}

/// Serves the joiners the accept loop hands over, one at a time (`busy` is set for each).
fn serve_loop(conns: std::sync::mpsc::Receiver<Conn>, mut worker: Worker) {
    for conn in conns {
        let report = worker.serve(conn);
        worker.shared.busy.store(false, Ordering::Release);
        if let Some(r) = report {
            count_join(&r);
            match &r.error {
                None => tracing::info!(
                    "a backup joined at exit {}: pause {:.2} ms (state {:.2}, joiner's check {:.2}, \
                     channel {:.2}), {:.0} ms in all, {} rounds, {:.1} MiB",
                    r.exit,
                    r.pause_ms,
                    r.finish_ms,
                    r.verdict_ms,
                    r.channel_ms,
                    r.total_ms,
                    r.rounds.len(),
                    r.bytes as f64 / (1 << 20) as f64
                ),
                Some(e) if worker.shared.state.protected.load(Ordering::Acquire) => {
                    tracing::info!("turned a joiner away: {e}; the pair stays protected")
                }
                Some(e) => tracing::warn!("a join failed: {e}; serving on unprotected"),
            }
            worker
                .shared
                .reports
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(r);
        }
    }
}

/// Runs the handshake with a joiner as the primary, in `epoch`, within the handshake timeout.
fn authenticate(
    conn: &mut Conn,
    settings: &JoinSettings,
    epoch: u64,
) -> Result<handshake::Accepted, JoinError> {
    conn.set_timeouts(Some(settings.channel.handshake_timeout))
        .map_err(io("the join connection"))?;
    let mut params = settings.channel.session_params(MediumKind::Join);
    params.epoch = epoch;
    Ok(handshake::primary_handshake(conn, &params)?)
}

/// The state stream's writer to the other side: every chunk sealed under the handshake's
/// keys, unless the channel's crypto is `none`. `end` is this side's end of the handshake.
fn stream_writer<W: Write>(
    out: W,
    keys: &SessionKeys,
    crypto: ChannelCrypto,
    end: End,
) -> ChunkWriter<W> {
    match crypto {
        // `encrypt` seals the state stream as `auth` does (it is not encrypted).
        ChannelCrypto::Auth | ChannelCrypto::Encrypt => {
            ChunkWriter::sealed(out, ChunkTags::sending(keys, end))
        }
        ChannelCrypto::None => ChunkWriter::new(out),
    }
}

/// The state stream's reader from the other side: every chunk must carry a valid tag, unless
/// the channel's crypto is `none`.
fn stream_reader<R: Read>(
    input: R,
    keys: &SessionKeys,
    crypto: ChannelCrypto,
    end: End,
) -> ChunkReader<R> {
    match crypto {
        ChannelCrypto::Auth | ChannelCrypto::Encrypt => {
            ChunkReader::sealed(input, ChunkTags::receiving(keys, end))
        }
        ChannelCrypto::None => ChunkReader::new(input),
    }
}

/// Tells an authenticated joiner why it is refused (best effort: it may be gone).
fn send_refusal(conn: &mut Conn, keys: &SessionKeys, crypto: ChannelCrypto, why: &str) {
    let mut w = stream_writer(conn, keys, crypto, End::Connecting);
    let _ = w.refused(why);
    let _ = w.flush();
    tracing::warn!("refused a joiner: {why}");
}

/// Authenticates the joiner and refuses it with `why` (a joiner that fails authentication
/// learns nothing).
fn refuse(mut conn: Conn, settings: &JoinSettings, epoch: u64, why: &str) {
    ftvm_metrics::METRICS.joins_refused.inc();
    if let Ok(a) = authenticate(&mut conn, settings, epoch) {
        send_refusal(&mut conn, &a.keys, settings.channel.crypto, why);
    }
}

impl Worker {
    /// Serves one joiner; `None` if it never got past authentication (nothing to report).
    fn serve(&mut self, mut conn: Conn) -> Option<JoinReport> {
        let started = Instant::now();
        let s = &self.settings;
        let epoch = self.shared.state.epoch.load(Ordering::Acquire);
        let accepted = match authenticate(&mut conn, s, epoch) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("refused a joiner: {e}");
                return None;
            }
        };
        let request = match self.check(&accepted.medium_info) {
            Ok(r) => r,
            Err(why) => {
                send_refusal(&mut conn, &accepted.keys, s.channel.crypto, &why);
                return Some(JoinReport {
                    error: Some(format!("refused: {why}")),
                    ..Default::default()
                });
            }
        };
        tracing::info!(
            "a backup is joining: copying {} MiB of guest memory while the guest runs",
            s.mem_size >> 20
        );
        let mut report = JoinReport {
            auth_ms: ms_since(started),
            ..Default::default()
        };
        let r = self.transfer(&mut conn, &accepted.keys, &request, epoch, &mut report);
        report.total_ms = ms_since(started);
        // The vCPU thread waits for an answer only once it handed its state over.
        let vcpu_waiting = report.exit > 0;
        match r {
            Ok((p, pre)) => {
                report.joined = true;
                self.shared.state.protected.store(true, Ordering::Release);
                let _ = self.result.send(Ok(p));
                // The guest resumes; dirty logging goes off beside it.
                let t = Instant::now();
                drop(pre);
                tracing::debug!("join: dirty logging off in {:.2} ms", ms_since(t));
            }
            Err(e) => {
                report.error = Some(e.to_string());
                self.shared.pause.store(false, Ordering::Release);
                if vcpu_waiting {
                    let _ = self.result.send(Err(e.to_string()));
                }
            }
        }
        Some(report)
    }

    /// The joiner's request, if this replica can serve it now; else why not.
    fn check(&self, info: &[u8]) -> Result<JoinRequest, String> {
        let s = &self.settings;
        let r = JoinRequest::decode(info)?;
        if r.mem_size != s.mem_size {
            return Err(format!(
                "guest memory size: the primary has {} bytes, the joiner {}",
                s.mem_size, r.mem_size
            ));
        }
        if r.image_digest != s.image_digest {
            return Err(format!(
                "guest image: the primary runs {}, the joiner {}",
                hex(&s.image_digest),
                hex(&r.image_digest)
            ));
        }
        if r.medium != s.medium.name() {
            return Err(format!(
                "log medium: the primary uses {}, the joiner {}",
                s.medium.name(),
                r.medium
            ));
        }
        // A joiner that could never join hears so first; one that may later, after.
        if !self.shared.state.live.load(Ordering::Acquire) {
            return Err(REFUSED_NOT_LIVE.into());
        }
        if self.shared.state.protected.load(Ordering::Acquire) {
            return Err(REFUSED_PROTECTED.into());
        }
        Ok(r)
    }

    fn transfer(
        &mut self,
        conn: &mut Conn,
        keys: &SessionKeys,
        request: &JoinRequest,
        epoch: u64,
        report: &mut JoinReport,
    ) -> Result<(AnyPrimary, Precopy), JoinError> {
        let s = &self.settings;
        // Stale hand-overs (a switch-over that timed out before) are dropped.
        while self.handover.try_recv().is_ok() {}
        let log = self.memory.start_dirty_log().map_err(MigrateError::from)?;
        let reader = conn.try_clone().map_err(io("the join connection"))?;
        let crypto = s.channel.crypto;
        let out = BufWriter::with_capacity(1 << 20, &mut *conn);
        let mut w = stream_writer(out, keys, crypto, End::Connecting);
        let mut pre = Precopy::new(log, s.precopy.clone());
        let header = Header {
            mem_size: s.mem_size,
            image_digest: s.image_digest,
            session: s.channel.session_id,
            epoch,
        };
        let t = Instant::now();
        pre.run(&mut w, &header, || true)?;
        report.rounds_ms = ms_since(t);
        report.rounds = pre.rounds().to_vec();
        let t = Instant::now();
        // Wait until the joiner has loaded every round (it echoes each ROUND_END), so that
        // the pause holds only the last pages, not the joiner's backlog.
        let last = report.rounds.len() as u32 - 1;
        let mut r = stream_reader(BufReader::new(reader), keys, crypto, End::Connecting);
        loop {
            match r.next_chunk()? {
                Chunk::RoundEnd { round, .. } if round >= last => break,
                Chunk::RoundEnd { .. } => {}
                Chunk::Refused(why) => {
                    return Err(JoinError::Other(format!("the joiner refused: {why}")))
                }
                other => {
                    return Err(JoinError::Other(format!(
                        "expected the joiner's round echo, got {}",
                        other.kind().name()
                    )))
                }
            }
        }
        report.catch_up_ms = ms_since(t);
        // The log channel's local ring is made now, not with the guest stopped.
        let mut cfg = s.channel.clone();
        cfg.epoch = epoch;
        transport::channel::prepare_primary_ring(cfg.ring_capacity)?;
        // Stop the guest at its next exit boundary and take its state.
        let t = Instant::now();
        self.shared.pause.store(true, Ordering::Release);
        let h = self
            .handover
            .recv_timeout(s.switch_timeout)
            .map_err(|_| JoinError::Other("the vCPU did not reach the switch-over".into()))?;
        report.stop_ms = ms_since(t);
        let paused = Instant::now();
        report.exit = h.device.exit;
        let fin = pre.finish(&mut w, &h.state, &h.device.encode(), h.registers)?;
        report.finish_ms = ms_since(paused);
        report.final_pages = fin.pages;
        report.finish_dirty_log_ms = fin.dirty_log_ms;
        report.finish_pages_ms = fin.pages_ms;
        report.bytes = w.bytes();
        drop(w);
        match r.next_chunk()? {
            Chunk::Verdict { ok: true, pages, registers }
                if pages == fin.pages_digest && registers == h.registers => {}
            Chunk::Verdict { pages, registers, .. } => {
                return Err(JoinError::Other(format!(
                    "the joiner's state differs: memory {pages:#018x} / registers {registers:#018x} there, \
                     {:#018x} / {:#018x} here",
                    fin.pages_digest, h.registers
                )))
            }
            Chunk::Refused(why) => return Err(JoinError::Other(format!("the joiner refused: {why}"))),
            other => {
                return Err(JoinError::Other(format!(
                    "expected the joiner's verdict, got {}",
                    other.kind().name()
                )))
            }
        }
        report.verdict_ms = ms_since(paused) - report.finish_ms;
        tracing::debug!("join: verdict received, dialing the joiner's medium");
        // The log goes on over the joiner's medium from the switch-over on.
        let medium = s.medium.clone().with_address(request.address.clone());
        let p = transport::medium::dial_primary(&medium, cfg)?;
        tracing::debug!("join: channel up");
        if p.last_seq() + 1 != h.device.next_seq {
            return Err(JoinError::Other(format!(
                "the joiner expects entry {}, the log is at {}",
                p.last_seq() + 1,
                h.device.next_seq
            )));
        }
        report.pause_ms = ms_since(paused);
        report.channel_ms = report.pause_ms - report.finish_ms - report.verdict_ms;
        // The pre-copy (and with it the dirty log) goes back to the caller: turning KVM's
        // dirty logging off rewrites the memory slot (milliseconds for a large guest), so
        // it is done once the guest runs again, not inside the pause.
        Ok((p, pre))
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Copies everything read through it to a file: the joiner keeps the state stream as its
/// journal's base ([`base_path`]).
struct Tee<R> {
    inner: R,
    copy: Option<BufWriter<std::fs::File>>,
}

impl<R> Tee<R> {
    /// Writes the copy out to its file (no fsync: like the journal, a record to check
    /// against, not a durable store).
    fn finish(&mut self) -> std::io::Result<()> {
        match self.copy.take() {
            Some(mut c) => c.flush(),
            None => Ok(()),
        }
    }
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(c) = &mut self.copy {
            c.write_all(&buf[..n])?;
        }
        Ok(n)
    }
}

/// Where a joined backup keeps the state it joined with, next to its journal `journal`: the
/// state stream as received (MIGRATION.md), from which `ftvm replay` starts before it
/// replays the journal.
pub fn base_path(journal: &std::path::Path) -> PathBuf {
    let mut p = journal.as_os_str().to_owned();
    p.push(".base");
    PathBuf::from(p)
}

/// The joiner's side: dials `addr`, asks to join with `request` (its image, memory size and
/// medium address), loads the primary's state into `vm` (fresh, of that image and size) and
/// answers with its verdict; with `keep`, the state stream is also written there (removed
/// again if the join fails). On success the caller accepts the primary's channel on its
/// medium listener, expecting the log from the returned state's `next_seq`, and replays from
/// exit `exit + 1`.
pub fn join(
    addr: &JoinAddr,
    channel: &ChannelConfig,
    request: &JoinRequest,
    vm: &mut Vm,
    keep: Option<&std::path::Path>,
) -> Result<(DeviceState, Restored), JoinError> {
    let r = join_keeping(addr, channel, request, vm, keep);
    if let (Err(_), Some(path)) = (&r, keep) {
        let _ = std::fs::remove_file(path);
    }
    r
}

fn join_keeping(
    addr: &JoinAddr,
    channel: &ChannelConfig,
    request: &JoinRequest,
    vm: &mut Vm,
    keep: Option<&std::path::Path>,
) -> Result<(DeviceState, Restored), JoinError> {
    let conn = match addr {
        JoinAddr::Tcp(a) => Conn::Tcp(transport::control::dial(
            a.as_str(),
            channel.handshake_timeout,
        )?),
        JoinAddr::Unix(p) => {
            Conn::Unix(UnixStream::connect(p).map_err(io("dialing the join socket"))?)
        }
    };
    let mut conn = conn;
    conn.set_timeouts(Some(channel.handshake_timeout))
        .map_err(io("the join connection"))?;
    let params = channel.session_params(MediumKind::Join);
    let hello = handshake::backup_authenticate(&mut conn, &params)?;
    handshake::backup_welcome(&mut conn, 1, &request.encode())?;
    // The rounds may pause between chunks for as long as the primary's guest keeps it busy.
    conn.set_timeouts(Some(channel.handshake_timeout.max(Duration::from_secs(30))))
        .map_err(io("the join connection"))?;
    let writer = conn.try_clone().map_err(io("the join connection"))?;
    let expect = Expect {
        mem_size: request.mem_size,
        image_digest: request.image_digest,
        session: channel.session_id,
        min_epoch: channel.epoch,
    };
    let source = Tee {
        inner: conn,
        copy: match keep {
            None => None,
            Some(path) => Some(BufWriter::with_capacity(
                1 << 20,
                std::fs::File::create(path).map_err(io("creating the journal's base"))?,
            )),
        },
    };
    // A small buffer: a page run's bytes (up to 1 MiB) are read past it, straight into guest
    // memory, once the little it holds is used up.
    let input = BufReader::with_capacity(32 << 10, source);
    let mut r = stream_reader(input, &hello.keys, channel.crypto, End::Accepting);
    let mut w = stream_writer(writer, &hello.keys, channel.crypto, End::Accepting);
    let restored = match restore_with(&mut r, vm, &expect, &mut |round, pages| {
        // Each round loaded: the primary waits for the last one before it stops its guest.
        w.round_end(round, pages)?;
        w.flush()
    }) {
        Ok(restored) => restored,
        Err(e) => {
            // Tell the primary why (it then serves on unprotected); we never start.
            if !matches!(e, MigrateError::Refused(_)) {
                let _ = w.refused(&e.to_string());
                let _ = w.flush();
            }
            return Err(e.into());
        }
    };
    let device = DeviceState::decode(&restored.device)?;
    // The base is complete (its END was read): on disk before the joiner may go live.
    r.get_mut()
        .get_mut()
        .finish()
        .map_err(io("writing the journal's base"))?;
    w.verdict(true, restored.pages_digest, restored.registers_digest)?;
    w.flush()?;
    tracing::debug!("join: verdict sent");
    Ok((device, restored))
}
