//! `ftvm primary` and `ftvm backup`: one replica (VMM) each, joined by the log channel.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ft_arbiter::ArbiterSpec;
use ftvm_metrics::{ReplicaState, Role, METRICS};
use transport::{ChannelConfig, PollPolicy, PreSharedKey};
use vmm::engine::{self, EngineError, RunSummary};
use vmm::failover::{ArbiterClient, Arbitration, Failover, FailoverSink, Takeover, TakeoverReport};
use vmm::journal::{Journal, JournalSource};
use vmm::record::{LogSink, NoLog, RecordConfig, Recorder};
use vmm::replay::Replayer;
use vmm::service::ServicePort;
use vmm::vm::Vm;

use crate::ready::Ready;

/// The log channel's medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Medium {
    /// Shared memory between two processes on one host (the default).
    Shm,
    /// Kernel TCP, busy-polled.
    Tcp,
    /// RDMA WRITEs into the backup's registered ring over a reliable-connected queue pair
    /// (InfiniBand, RoCE, soft-RoCE); set up over an authenticated TCP connection to the
    /// backup's `host:port`. Needs a build with `--features rdma`.
    Rdma,
    /// Raw Ethernet frames on a DPDK port (`--eal` says which; build with `--features dpdk`).
    /// Set-up runs over a TCP control connection: the backup's `--listen host:port`, the
    /// primary's `--backup host:port`; the two ports' MAC addresses are exchanged there.
    Dpdk,
}

/// Options both roles share.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Medium of the log channel.
    #[arg(long, value_enum, default_value = "shm")]
    pub transport: Medium,
    /// File holding the pre-shared key (at least 16 bytes).
    #[arg(long)]
    pub key_file: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 16)]
    pub mem_mib: usize,
    /// Pin the vCPU thread to this core.
    #[arg(long)]
    pub core: Option<usize>,
    /// FT pair id (both sides must agree).
    #[arg(long, default_value_t = 1)]
    pub session: u64,
    /// Heartbeat timeout in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_timeout_ms: u64,
    /// What protects every log frame and ACK after the handshake: `auth` (a GMAC tag on each,
    /// keys derived from the pre-shared key in the handshake), `encrypt` (as `auth`, and each
    /// frame's body encrypted with AES-128-GCM) or `none` (only the handshake is
    /// authenticated). Both replicas must use the same.
    #[arg(long, default_value = "auth")]
    pub channel_crypto: transport::auth::ChannelCrypto,
    /// How long a replica whose guest has nothing to do keeps polling before it sleeps, µs:
    /// the primary's NET_RX waits this long for a request, a backup whose guest waits in `hlt`
    /// spins this long for the next entry. A request that arrives within it is served at
    /// polling latency; one after it pays the wake-up (`bench idle` measures both sides).
    #[arg(long, default_value_t = 500)]
    pub idle_spin_us: u64,
    /// A primary whose output has waited this long for its ACK kicks the backup's vCPU thread
    /// (a signal: `KVM_RUN` returns, the backup acknowledges, the guest runs on), µs; 0:
    /// never. Shared memory only (the backup on the same host); the backup acknowledges
    /// otherwise at its guest's next exit.
    #[arg(long, default_value_t = vmm::record::ACK_KICK_US)]
    pub ack_kick_us: u64,
    /// A primary whose output has waited this long for its ACK wakes the backup's ACK helper
    /// thread and yields its core to it until the ACK comes, µs; 0: never (the default here;
    /// `ftvm demo` uses 3). Shared memory only; the helper answers in a few µs where a kick
    /// crosses cores.
    #[arg(long, default_value_t = 0)]
    pub ack_helper_us: u64,
    /// Lag control: the primary waits while its backup's replay trails by more than this much
    /// time (ms; 0: no time bound) — about what a failover then has to drain.
    #[arg(long, default_value_t = 100)]
    pub max_lag_ms: u64,
    /// Lag control: ... or by more than this many bytes of log.
    #[arg(long, default_value_t = 2 << 20)]
    pub max_lag_bytes: u64,
    /// Lag control: ... or by more than this many entries.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_lag_entries: u64,
    /// Write a JSON summary here when the run ends.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The guest program: the key-value service, a deliberately non-deterministic variant of it
    /// (it reads the TSC) that divergence detection must catch, or the ledger.
    #[arg(long, value_enum, default_value = "kvstore")]
    pub guest: Guest,
    /// Run this guest image instead of a built-in program: a static x86-64 ELF executable
    /// built against the guest ABI (vmm/GUEST-ABI.md), at most 8 MiB. Both replicas must run
    /// the same file: the channel's handshake compares its SHA-256.
    #[arg(long, conflicts_with = "guest")]
    pub guest_image: Option<PathBuf>,
    /// The guest, once read ([`guest`]).
    #[arg(skip)]
    pub loaded_guest: std::sync::OnceLock<Arc<GuestImage>>,
    /// The failover arbiter: `file:DIR`, `server:HOST:PORT` or `etcd:URL[,URL…]`. With one, a
    /// replica that loses its peer asks it before going on (and halts if it loses); without
    /// one, losing the peer ends the run.
    #[arg(long)]
    pub arbiter: Option<ArbiterSpec>,
    /// The pair's id at the arbiter (default `ftvm-pair-<session>`).
    #[arg(long)]
    pub pair_id: Option<String>,
    /// This replica's name at the arbiter (default `<role>-<pid>`); unique per replica.
    #[arg(long)]
    pub name: Option<String>,
    /// The service front (`ftvm front`) that owns the service address and fences deposed
    /// replicas. Needed for failover: the survivor registers there.
    #[arg(long)]
    pub front: Option<std::net::SocketAddr>,
    /// RDMA device for `--transport rdma` (as perftest's `-d`; `ibv_devices` lists them).
    #[arg(long, default_value = "rxe0")]
    pub rdma_dev: String,
    /// GID index for `--transport rdma` (as perftest's `-x`; RoCE v2 over IPv4 is usually the
    /// index whose GID ends in the interface's IPv4 address; `scripts/softroce-up.sh` prints it).
    #[arg(long, default_value_t = 0)]
    pub gid_index: u8,
    /// Port of the RDMA device (as perftest's `-i`).
    #[arg(long, default_value_t = 1)]
    pub ib_port: u8,
    /// `--transport dpdk`: this process's EAL options, one string split like a shell, e.g.
    /// "--no-huge -m 256 --no-pci -l 1 --file-prefix ftvm-p
    /// --vdev=net_memif0,role=client,id=0,socket=/tmp/ftvm-memif.sock,socket-abstract=no"
    /// (each process its own --file-prefix; see dpdk_sys::EalArgs for the verified sets).
    #[arg(long, allow_hyphen_values = true)]
    pub eal: Option<String>,
    /// `--transport dpdk`: the DPDK device to use (e.g. net_memif0); default: the only one.
    #[arg(long)]
    pub dpdk_port: Option<String>,
    /// Serve Prometheus metrics (`/metrics`) and the replica's status (`/status`, read by
    /// `ftvm status`) at this `host:port` (port 0: any; the readiness line names it).
    #[arg(long)]
    pub metrics: Option<String>,
}

/// Starts the replica's metrics endpoint if `--metrics` asks for one; keep the result alive.
pub fn start_metrics(
    c: &Common,
    role: &str,
) -> anyhow::Result<Option<ftvm_metrics::MetricsServer>> {
    crate::status::start_metrics(
        c.metrics.as_deref(),
        ftvm_metrics::Process::Replica,
        &replica_name(c, role),
    )
}

/// The log channel's medium description, from the flags, with `addr` as the set-up address
/// (the backup's `--listen`, the primary's `--backup`): built once, then handed to
/// `transport::medium`.
fn medium(c: &Common, addr: &str) -> anyhow::Result<transport::Medium> {
    use transport::medium::{DpdkDevice, RdmaDevice};
    let addr = addr.to_owned();
    Ok(match c.transport {
        Medium::Shm => transport::Medium::Shm {
            socket: PathBuf::from(addr),
        },
        Medium::Tcp => transport::Medium::Tcp { addr },
        Medium::Rdma => transport::Medium::Rdma {
            addr,
            device: RdmaDevice {
                device: c.rdma_dev.clone(),
                gid_index: c.gid_index,
                ib_port: c.ib_port,
            },
        },
        Medium::Dpdk => transport::Medium::Dpdk {
            addr,
            device: DpdkDevice::from_eal(
                c.eal
                    .clone()
                    .context("--transport dpdk needs --eal \"<EAL options>\"")?,
                c.dpdk_port.clone(),
            ),
        },
    })
}

/// Guest programs built into ftvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Guest {
    /// The key-value service.
    Kvstore,
    /// The key-value service mixing `rdtsc` into its responses: replay cannot reproduce it.
    Nondet,
    /// The ledger (`guests/ledger`): accounts, transfers, an audited invariant.
    Ledger,
    /// The key-value service on the older paravirtual interrupt scheme: no IDT, polls NET_RX
    /// while idle (for comparison: `bench idle`).
    KvstorePolling,
}

/// The guest a replica runs: a built-in program or an image file, read once.
pub struct GuestImage {
    /// The built-in program's name, or the file's path.
    pub name: String,
    /// The ELF image.
    pub bytes: std::borrow::Cow<'static, [u8]>,
    /// Its SHA-256 (what the handshake and a join compare).
    pub digest: [u8; 32],
}

impl std::fmt::Debug for GuestImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GuestImage({}, {} bytes, sha256 {})",
            self.name,
            self.bytes.len(),
            vmm::migrate::hex(&self.digest)
        )
    }
}

/// The guest image `--guest` or `--guest-image` names, read on first use and kept: every later
/// use (the VM, the handshake's identity, a join's digest) sees the same bytes.
pub(crate) fn guest(c: &Common) -> anyhow::Result<Arc<GuestImage>> {
    if let Some(g) = c.loaded_guest.get() {
        return Ok(g.clone());
    }
    let g = Arc::new(read_guest(c.guest, c.guest_image.as_deref())?);
    Ok(c.loaded_guest.get_or_init(|| g).clone())
}

/// A built-in guest, or the image file at `path` (bounded read, typed errors).
pub(crate) fn read_guest(
    builtin: Guest,
    path: Option<&std::path::Path>,
) -> anyhow::Result<GuestImage> {
    let (name, bytes) = match path {
        Some(p) => (
            p.display().to_string(),
            std::borrow::Cow::Owned(vmm::image::read_file(p)?),
        ),
        None => (
            builtin_name(builtin),
            std::borrow::Cow::Borrowed(builtin_image(builtin)),
        ),
    };
    let digest = vmm::migrate::image_digest(&bytes);
    Ok(GuestImage {
        name,
        bytes,
        digest,
    })
}

/// The command-line flags that name `guest` (a built-in) or `image` to another ftvm process.
pub(crate) fn guest_flags(builtin: Guest, image: Option<&std::path::Path>) -> [String; 2] {
    match image {
        Some(p) => ["--guest-image".into(), p.display().to_string()],
        None => ["--guest".into(), builtin_name(builtin)],
    }
}

/// A built-in guest's name on the command line (`kvstore`, `nondet`).
fn builtin_name(guest: Guest) -> String {
    clap::ValueEnum::to_possible_value(&guest)
        .map_or_else(|| format!("{guest:?}"), |v| v.get_name().to_owned())
}

/// A guest the determinism checker refuses (`ftvm check-guest`), or whose image is malformed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct GuestRefused(pub String);

/// Runs the determinism checker on the replica's guest before it starts: a finding refuses it
/// ([`GuestRefused`]) unless `skip` (`--skip-guest-check`), which only logs a warning naming
/// the findings.
pub(crate) fn check_guest(c: &Common, skip: bool) -> anyhow::Result<()> {
    let g = guest(c)?;
    let report = vmm::image::check::check_image(&g.bytes)
        .map_err(|e| GuestRefused(format!("the guest image {}: {e}", g.name)))?;
    if report.passes() {
        tracing::debug!(
            "guest {}: the determinism check found nothing in {} instructions",
            g.name,
            report.instructions
        );
        return Ok(());
    }
    let lines = report.lines();
    if skip {
        tracing::warn!(
            "guest {}: the determinism check found {} instruction(s) the primary and the backup \
             cannot agree on ({}); starting it anyway (--skip-guest-check): the backup may \
             diverge",
            g.name,
            lines.len(),
            lines.join("; ")
        );
        return Ok(());
    }
    Err(GuestRefused(format!(
        "the guest {} fails the determinism check: {} instruction(s) the primary and the backup \
         cannot agree on:\n  {}\n(`ftvm check-guest` lists them; --skip-guest-check starts it \
         anyway)",
        g.name,
        lines.len(),
        lines.join("\n  ")
    ))
    .into())
}

/// `ftvm primary`.
#[derive(clap::Args, Debug, Clone)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub common: Common,
    /// Start the guest even if the determinism checker (`ftvm check-guest`) finds instructions
    /// the backup cannot replay; the findings are logged as a warning.
    #[arg(long)]
    pub skip_guest_check: bool,
    /// The backup: a Unix socket path (shm) or host:port (tcp; dpdk: its control address).
    /// Without it (and with `--accept-joins`) the primary starts unprotected and waits for a
    /// backup to join.
    #[arg(long, required_unless_present_any = ["unreplicated", "accept_joins"])]
    pub backup: Option<String>,
    /// Accept joining backups here (`host:port` or a Unix socket path): a new backup gets the
    /// running guest's state and the pair is protected again.
    #[arg(long)]
    pub accept_joins: Option<vmm::join::JoinAddr>,
    /// UDP address clients send requests to (port 0 picks one; printed in the readiness line).
    /// With `--front`, the replica's own address the front forwards to.
    #[arg(long, default_value = "127.0.0.1:7400")]
    pub service: String,
    /// Run without a backup (baseline for the FT overhead).
    #[arg(long)]
    pub unreplicated: bool,
}

/// `ftvm backup`.
#[derive(clap::Args, Debug, Clone)]
pub struct BackupArgs {
    #[command(flatten)]
    pub common: Common,
    /// Where to listen: a Unix socket path (shm) or host:port (tcp; dpdk: the control address).
    #[arg(long)]
    pub listen: String,
    /// The replica's own UDP address once live (the front forwards to it).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub service: String,
    /// Keep a journal here: every frame replayed and, after a takeover, every entry recorded
    /// (`ftvm replay --journal` replays it on a fresh VM).
    #[arg(long)]
    pub journal: Option<PathBuf>,
    /// Join a running primary at this address (its `--accept-joins`): take its guest's state
    /// while it serves, then replay its log from there. `--listen` is where its log arrives.
    #[arg(long)]
    pub join: Option<vmm::join::JoinAddr>,
    /// With `--join`: the log channel address the primary is told to dial (default: the
    /// `--listen` address), for a relay or address translation in between.
    #[arg(long, requires = "join")]
    pub advertise: Option<String>,
    /// Once this backup has taken over, accept joining backups here (`host:port` or a Unix
    /// socket path), so the pair is protected again; refused while it is a backup.
    #[arg(long)]
    pub accept_joins: Option<vmm::join::JoinAddr>,
}

/// `ftvm replay`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplayArgs {
    /// The journal a backup kept (`ftvm backup --journal`).
    #[arg(long)]
    pub journal: PathBuf,
    /// Guest memory in MiB (as the replica ran with).
    #[arg(long, default_value_t = 16)]
    pub mem_mib: usize,
    /// The guest program the replica ran.
    #[arg(long, value_enum, default_value = "kvstore")]
    pub guest: Guest,
    /// The guest image file the replica ran (its `--guest-image`).
    #[arg(long, conflicts_with = "guest")]
    pub guest_image: Option<PathBuf>,
    /// Write the JSON summary here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What a node reports when it stops.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeSummary {
    pub role: String,
    pub exits: u64,
    pub memory_hash: String,
    pub registers_digest: String,
    pub log_bytes: u64,
    pub outputs_committed: u64,
    pub commit_p50_us: f64,
    pub commit_p99_us: f64,
    /// Primary: times an output's wait for its ACK kicked the backup (`--ack-kick-us`).
    #[serde(default)]
    pub ack_kicks: u64,
    /// Primary: times an output's wait for its ACK woke the backup's ACK helper.
    #[serde(default)]
    pub ack_helps: u64,
    pub requests: u64,
    pub outputs_checked: u64,
    pub divergence: Option<String>,
    pub divergence_exit: Option<u64>,
    pub first_output_exit: Option<u64>,
    pub error: Option<String>,
    pub seconds: f64,
    pub exits_per_sec: f64,
    /// The fencing epoch the replica ended in.
    pub epoch: u64,
    /// The replica was deposed (another holds a newer epoch) and halted.
    pub deposed: bool,
    /// Primary: why it lost its backup.
    pub lost_backup: Option<String>,
    /// Primary: the arbiter's verdict after losing the backup.
    pub arbitration: Option<Arbitration>,
    /// Backup: what happened when the log ended.
    pub takeover: Option<TakeoverReport>,
    /// Backup: log entries received from the primary.
    pub entries_received: u64,
    /// Primary: the lag control's record (`None` unreplicated).
    pub lag: Option<LagSummary>,
    /// Joins this replica served (as the primary), in order.
    pub joins: Vec<vmm::join::JoinReport>,
    /// Backup: how it joined, if it did.
    pub joined: Option<JoinedSummary>,
}

/// How a backup joined a running primary.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct JoinedSummary {
    /// The exit it started replaying after.
    pub exit: u64,
    /// The first log entry it received.
    pub first_seq: u64,
    /// The epoch it joined in.
    pub epoch: u64,
    /// Pre-copy rounds.
    pub rounds: u32,
    /// Pages and stream bytes received.
    pub pages: u64,
    pub bytes: u64,
    /// From dialing to the state loaded and checked, ms.
    pub transfer_ms: f64,
    /// The digests both sides agreed on.
    pub pages_digest: String,
    pub registers_digest: String,
}

/// What lag control did on a primary: the largest replay lag seen when a frame was sealed
/// (before any wait), and how often and how long appends waited for the backup's replay.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LagSummary {
    pub lag_max_ms: f64,
    pub lag_max_bytes: u64,
    pub lag_max_entries: u64,
    pub lag_throttles: u64,
    /// All throttled time (lag control and full rings), ms.
    pub throttled_ms: f64,
}

/// SIGTERM and SIGINT set the returned flag (the primary checks it at every exit). The
/// handler (signal-hook's) only stores to the flag: no thread polls for it. Every call returns
/// the process's one flag, installed by the first: a signal that arrives while one part of the
/// process hands over to the next (a node's backup between accepting its primary's channel and
/// replaying) sets the flag the next part reads, not one nobody reads any more.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    if let Some(flag) = FLAG.get() {
        return Ok(flag.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, flag.clone())
            .with_context(|| format!("installing the handler for signal {sig}"))?;
    }
    // Two first calls at once each install a handler; both return the one flag kept.
    Ok(FLAG.get_or_init(|| flag).clone())
}

/// Blocks the calling thread until SIGTERM or SIGINT arrives (for processes that only serve:
/// the front, the arbiter server). The handlers are installed when this returns its
/// [`StopSignals`], so create it before saying the process is ready.
pub fn stop_signals() -> anyhow::Result<StopSignals> {
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .context("installing the SIGTERM/SIGINT handlers")?;
    Ok(StopSignals(signals))
}

/// SIGTERM/SIGINT handlers installed by [`stop_signals`].
#[derive(Debug)]
pub struct StopSignals(signal_hook::iterator::Signals);

impl StopSignals {
    /// Returns once SIGTERM or SIGINT has arrived.
    pub fn wait(mut self) {
        let _ = self.0.forever().next();
    }
}

/// Pins the calling thread to `core`, if given (a warning if that fails).
pub fn pin(core: Option<usize>) {
    if let Some(core) = core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            tracing::warn!("could not pin the vCPU thread to core {core}");
        }
    }
}

pub(crate) fn pair_id(c: &Common) -> String {
    c.pair_id
        .clone()
        .unwrap_or_else(|| format!("ftvm-pair-{}", c.session))
}

fn replica_name(c: &Common, role: &str) -> String {
    c.name
        .clone()
        .unwrap_or_else(|| format!("{role}-{}", std::process::id()))
}

/// The epoch the pair starts in: the arbiter's latest decision for the pair, or 1 (both replicas
/// of a new pair compute the same; the handshake refuses a primary older than its backup).
fn start_epoch(c: &Common) -> anyhow::Result<u64> {
    let Some(spec) = &c.arbiter else {
        return Ok(1);
    };
    let key = read_key(c)?;
    let mut a = spec
        .open(Some(&key))
        .with_context(|| format!("opening the arbiter {spec}"))?;
    let current = a
        .current(&pair_id(c))
        .with_context(|| format!("asking the arbiter {spec} for the pair's epoch"))?;
    Ok(current.map_or(1, |(_, epoch)| epoch.max(1)))
}

/// The replica's arbiter client; `joins_at` is where it accepts joins once live (recorded with
/// each epoch it wins). It connects now, on a thread of its own (`ft_arbiter::warm_up`), so that
/// the decision after a failure does not also pay for the connection (server, etcd); an arbiter
/// that does not answer now is logged and asked again then.
fn arbiter_client(
    c: &Common,
    role: &str,
    stop: Arc<AtomicBool>,
    joins_at: Option<&str>,
) -> anyhow::Result<Option<ArbiterClient>> {
    let Some(spec) = &c.arbiter else {
        return Ok(None);
    };
    let key = read_key(c)?;
    let arbiter = spec
        .open(Some(&key))
        .with_context(|| format!("opening the arbiter {spec}"))?;
    let arbiter = ft_arbiter::warm_up(arbiter, &pair_id(c), &spec.to_string());
    Ok(Some(ArbiterClient {
        arbiter,
        pair_id: pair_id(c),
        candidate: replica_name(c, role),
        joins_at: joins_at.map(str::to_owned),
        retry: Duration::from_millis(50),
        stop,
    }))
}

/// The recorder's settings from the options.
fn record_config(c: &Common) -> RecordConfig {
    RecordConfig {
        idle_wait: Duration::from_micros(c.idle_spin_us),
        ack_kick: Duration::from_micros(c.ack_kick_us),
        ack_helper: Duration::from_micros(c.ack_helper_us),
        ..RecordConfig::default()
    }
}

pub(crate) fn read_key(c: &Common) -> anyhow::Result<PreSharedKey> {
    PreSharedKey::from_file(&c.key_file)
        .with_context(|| format!("pre-shared key {}", c.key_file.display()))
}

fn channel_config(c: &Common, epoch: u64) -> anyhow::Result<ChannelConfig> {
    let mut cfg = ChannelConfig::new(c.session, epoch, read_key(c)?);
    cfg.heartbeat_timeout = Duration::from_millis(c.heartbeat_timeout_ms);
    cfg.heartbeat_interval = cfg.heartbeat_timeout / 10;
    cfg.crypto = c.channel_crypto;
    if cfg.crypto == transport::auth::ChannelCrypto::None {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::warn!(
                "--channel-crypto none: log frames and ACKs are NOT authenticated after the \
                 handshake; anyone who can write to the log link can feed the backup inputs or \
                 release outputs early"
            )
        });
    }
    cfg.max_lag_time = (c.max_lag_ms > 0).then(|| Duration::from_millis(c.max_lag_ms));
    cfg.max_lag_bytes = c.max_lag_bytes;
    cfg.max_lag_entries = c.max_lag_entries;
    // The handshake refuses a peer that runs another guest image or memory size.
    cfg.guest = transport::GuestIdentity {
        image_digest: guest(c)?.digest,
        mem_size: (c.mem_mib << 20) as u64,
    };
    cfg.validate().context("the channel options")?;
    // Each VMM owns its core: spin, then yield (so a client sharing the core still runs), but
    // never sleep — a sleeping backup would delay its ACKs, and with them every output.
    cfg.poll = PollPolicy::BUSY;
    Ok(cfg)
}

fn builtin_image(guest: Guest) -> &'static [u8] {
    match guest {
        Guest::Kvstore => vmm::vm::GUEST_IMAGE,
        Guest::Nondet => vmm::vm::GUEST_NONDET_IMAGE,
        Guest::Ledger => vmm::vm::GUEST_LEDGER_IMAGE,
        Guest::KvstorePolling => vmm::vm::GUEST_POLLING_IMAGE,
    }
}

pub(crate) fn new_vm(c: &Common) -> anyhow::Result<Vm> {
    let g = guest(c)?;
    Vm::new(c.mem_mib << 20, &g.bytes).with_context(|| format!("creating the VM for {}", g.name))
}

/// How long a switch-over may wait for the vCPU, and for the joiner's verdict.
const SWITCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts the join service at `addr` for this replica's guest.
pub(crate) fn join_service(
    c: &Common,
    vm: &Vm,
    addr: &vmm::join::JoinAddr,
    epoch: u64,
    live: bool,
) -> anyhow::Result<vmm::join::JoinService> {
    let settings = vmm::join::JoinSettings {
        // The joiner says where its medium listens; kind and devices are ours.
        medium: medium(c, "")?,
        channel: channel_config(c, epoch)?,
        mem_size: (c.mem_mib << 20) as u64,
        image_digest: guest(c)?.digest,
        precopy: vmm::migrate::source::PrecopyConfig::default(),
        switch_timeout: SWITCH_TIMEOUT,
    };
    let j = vmm::join::JoinService::spawn(addr, vm.memory_handle(), settings, live)
        .with_context(|| format!("accepting joins at {addr}"))?;
    tracing::info!("accepting joining backups at {}", j.local_addr());
    Ok(j)
}

/// Runs the guest live through `rec`; when a join pauses it, switches the log over to the
/// new backup (or, if that fails, goes on as before) and runs on.
/// An event source that may be serving live through a joinable log.
trait Live: engine::EventSource {
    fn live(&mut self) -> Option<&mut Recorder<vmm::failover::LiveLog>>;
}

impl Live for Recorder<vmm::failover::LiveLog> {
    fn live(&mut self) -> Option<&mut Recorder<vmm::failover::LiveLog>> {
        Some(self)
    }
}

impl<S: vmm::replay::EntrySource> Live for Failover<S> {
    fn live(&mut self) -> Option<&mut Recorder<vmm::failover::LiveLog>> {
        self.recorder_mut()
    }
}

fn serve_live(
    vm: &mut Vm,
    source: &mut impl Live,
    join: Option<&vmm::join::JoinService>,
    first_exit: u64,
) -> Result<RunSummary, EngineError> {
    let mut first = first_exit;
    loop {
        let run = engine::run(vm, source, first)?;
        if !run.paused {
            return Ok(run);
        }
        first = run.exits + 1;
        let (Some(j), Some(rec)) = (join, source.live()) else {
            continue;
        };
        let log = rec.log();
        let device = vmm::join::DeviceState {
            exit: run.exits,
            next_seq: log.next_seq(),
            epoch: log.epoch(),
            last_clock_ns: rec.last_clock_ns(),
        };
        match j.switch_over(vm, device, SWITCH_TIMEOUT) {
            Ok(p) => match rec.log_mut().protect(p) {
                Ok(()) => tracing::info!(
                    "protected again: the log goes to the new backup from entry {} (exit {})",
                    device.next_seq,
                    device.exit + 1
                ),
                Err(e) => tracing::warn!("the joined backup's channel: {e}; serving on alone"),
            },
            Err(e) => tracing::warn!("the join did not complete: {e}; serving on alone"),
        }
    }
}

/// The replica's service port: the service address itself, or its own address behind the front.
fn service_port(c: &Common, bind: &str) -> anyhow::Result<ServicePort> {
    let socket =
        UdpSocket::bind(bind).with_context(|| format!("binding the service address {bind}"))?;
    Ok(match c.front {
        Some(front) => ServicePort::via_front(socket, front)?,
        None => ServicePort::direct(socket)?,
    })
}

fn write_summary(path: &Option<PathBuf>, s: &NodeSummary) -> anyhow::Result<()> {
    if let Some(p) = path {
        std::fs::write(p, serde_json::to_vec_pretty(s)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

fn finish(vm: &Vm, role: &str, run: RunSummary, started: Instant) -> anyhow::Result<NodeSummary> {
    let seconds = started.elapsed().as_secs_f64();
    Ok(NodeSummary {
        role: role.into(),
        exits: run.exits,
        memory_hash: format!("{:016x}", vm.memory_hash()),
        registers_digest: format!("{:016x}", vm.registers_digest()?),
        seconds,
        exits_per_sec: run.exits as f64 / seconds.max(f64::MIN_POSITIVE),
        ..Default::default()
    })
}

fn summarize(
    vm: &Vm,
    role: &str,
    result: &Result<RunSummary, EngineError>,
    started: Instant,
) -> anyhow::Result<NodeSummary> {
    let mut summary = match result {
        Ok(run) => finish(vm, role, *run, started)?,
        Err(e) => NodeSummary {
            role: role.into(),
            error: Some(e.to_string()),
            ..Default::default()
        },
    };
    summary.deposed = matches!(result, Err(EngineError::Deposed { .. }));
    Ok(summary)
}

fn fill_gate<S: LogSink>(summary: &mut NodeSummary, rec: &Recorder<S>) {
    let gate = rec.gate();
    summary.outputs_committed = gate.released();
    summary.commit_p50_us = gate.latency().value_at_quantile(0.5) as f64 / 1000.0;
    summary.commit_p99_us = gate.latency().value_at_quantile(0.99) as f64 / 1000.0;
    summary.ack_kicks = ftvm_metrics::METRICS.ack_kicks.get();
    summary.ack_helps = ftvm_metrics::METRICS.ack_helps.get();
    summary.log_bytes = rec.log().log_bytes();
    summary.requests = rec.requests();
    summary.first_output_exit = rec.first_output_exit();
    summary.epoch = rec.log().epoch();
}

/// A node's error after its summary was written: a deposed replica's (the binary exits with
/// [`DEPOSED_EXIT_CODE`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Deposed(pub String);

/// Exit status of a replica that halted because another holds a newer epoch.
pub const DEPOSED_EXIT_CODE: i32 = 3;

/// Writes the summary, then returns the run's outcome.
fn conclude(
    json: &Option<PathBuf>,
    summary: NodeSummary,
    result: Result<RunSummary, EngineError>,
) -> anyhow::Result<NodeSummary> {
    let (state, cause) = match &result {
        Ok(run) if run.guest_halted => (ReplicaState::Stopped, "the guest halted".to_string()),
        Ok(_) => (ReplicaState::Stopped, "told to stop".to_string()),
        Err(e @ EngineError::Deposed { .. }) => (ReplicaState::Deposed, e.to_string()),
        Err(e) => (ReplicaState::Stopped, format!("error: {e}")),
    };
    METRICS
        .state
        .set(state, METRICS.state.role(), summary.epoch, &cause);
    write_summary(json, &summary)?;
    match result {
        Ok(_) => Ok(summary),
        Err(e @ EngineError::Deposed { .. }) => Err(Deposed(e.to_string()).into()),
        Err(e) => Err(e.into()),
    }
}

/// Runs the guest live with `sink` as its log; `extra` adds the sink's own findings.
fn record<S: LogSink>(
    mut vm: Vm,
    sink: S,
    port: ServicePort,
    c: &Common,
    role: &str,
    stop: Arc<AtomicBool>,
    extra: impl FnOnce(&mut NodeSummary, &S),
) -> anyhow::Result<NodeSummary> {
    let mut rec = Recorder::new(sink, port, record_config(c), stop)?;
    if c.front.is_some() {
        rec = rec.reregister_with(read_key(c)?, c.session);
    }
    let started = Instant::now();
    let result = engine::run(&mut vm, &mut rec, 1);
    let mut summary = summarize(&vm, role, &result, started)?;
    fill_gate(&mut summary, &rec);
    extra(&mut summary, rec.log());
    conclude(&c.json, summary, result)
}

fn register(port: &mut ServicePort, c: &Common, epoch: u64) -> anyhow::Result<()> {
    if let Some(front) = port.front() {
        let newest = port
            .register(&read_key(c)?, c.session, epoch, Duration::from_secs(5))
            .with_context(|| format!("registering with the service front {front}"))?;
        if newest > epoch {
            return Err(Deposed(format!(
                "the service front {front} already knows epoch {newest} > ours {epoch}"
            ))
            .into());
        }
    }
    Ok(())
}

fn serving_addr(port: &ServicePort) -> anyhow::Result<std::net::SocketAddr> {
    Ok(match port.front() {
        Some(front) => front,
        None => port.local_addr()?,
    })
}

fn sink_findings<L: transport::PrimaryLink>(s: &mut NodeSummary, sink: &FailoverSink<L>) {
    s.arbitration = sink.arbitration().cloned();
    s.lost_backup = sink.lost_backup().map(str::to_owned);
    s.lag = sink.channel_stats().map(|st| LagSummary {
        lag_max_ms: st.lag_max_ns as f64 / 1e6,
        lag_max_bytes: st.lag_max_bytes,
        lag_max_entries: st.lag_max_entries,
        lag_throttles: st.lag_throttles,
        throttled_ms: st.throttled_ns as f64 / 1e6,
    });
}

/// A node's primary: it won `epoch` at the arbiter, with `join` as its join service (already
/// accepting joins, and recorded with the win); it serves unprotected until a backup joins.
pub(crate) fn primary_won(
    c: &Common,
    vm: Vm,
    service: &str,
    join: vmm::join::JoinService,
    epoch: u64,
) -> anyhow::Result<NodeSummary> {
    pin(c.core);
    let stop = stop_flag()?;
    let port = service_port(c, service)?;
    let arbiter = arbiter_client(c, "primary", stop.clone(), Some(join.local_addr()))?;
    let live = Replicating {
        vm,
        port,
        epoch,
        arbiter,
        stop,
        join: Some(join),
    };
    live.alone(c)
}

/// Runs the primary until SIGTERM/SIGINT, then logs the stop point and exits.
pub fn primary(args: &PrimaryArgs) -> anyhow::Result<NodeSummary> {
    let c = &args.common;
    check_guest(c, args.skip_guest_check)?;
    let vm = new_vm(c)?;
    pin(c.core);
    let stop = stop_flag()?;
    let mut port = service_port(c, &args.service)?;
    let epoch = start_epoch(c)?;
    if args.unreplicated {
        register(&mut port, c, epoch)?;
        METRICS.state.set(
            ReplicaState::Unprotected,
            Role::Primary,
            epoch,
            "unreplicated (--unreplicated)",
        );
        Ready::new("primary", serving_addr(&port)?, "unreplicated").announce()?;
        return record(
            vm,
            NoLog::at_epoch(epoch),
            port,
            c,
            "unreplicated",
            stop,
            |_, _| {},
        );
    }
    let cfg = channel_config(c, epoch)?;
    let join = match &args.accept_joins {
        Some(addr) => Some(join_service(c, &vm, addr, epoch, true)?),
        None => None,
    };
    let joins_at = join.as_ref().map(|j| j.local_addr());
    let arbiter = arbiter_client(c, "primary", stop.clone(), joins_at)?;
    let live = Replicating {
        vm,
        port,
        epoch,
        arbiter,
        stop,
        join,
    };
    let Some(backup) = &args.backup else {
        if args.accept_joins.is_none() {
            bail!("--backup is required unless --unreplicated or --accept-joins");
        }
        return live.alone(c);
    };
    let medium = medium(c, backup)?;
    let p = transport::medium::dial_primary(&medium, cfg)
        .with_context(|| format!("connecting to the backup at {medium}"))?;
    METRICS.state.set_peer(Some(medium.to_string()));
    // DPDK's EAL pins the calling thread to its main lcore: apply --core again.
    pin(c.core);
    live.run(p, c, &format!("replicating to {medium}"))
}

/// A primary about to replicate: its VM, service port, epoch and arbiter.
struct Replicating {
    vm: Vm,
    port: ServicePort,
    epoch: u64,
    arbiter: Option<ArbiterClient>,
    stop: Arc<AtomicBool>,
    join: Option<vmm::join::JoinService>,
}

impl Replicating {
    /// Claims the service address, says so, and runs the guest replicating through `p`.
    fn run(
        mut self,
        p: transport::AnyPrimary,
        c: &Common,
        how: &str,
    ) -> anyhow::Result<NodeSummary> {
        register(&mut self.port, c, self.epoch)?;
        let failover = if self.arbiter.is_some() {
            ", failover by arbiter"
        } else {
            ""
        };
        let detail = format!("{how}, epoch {}{failover}", self.epoch);
        METRICS.state.set(
            ReplicaState::Protected,
            Role::Primary,
            self.epoch,
            &format!("{how}: outputs wait for the backup's ACKs"),
        );
        Ready::new("primary", serving_addr(&self.port)?, detail).announce()?;
        let sink = FailoverSink::new(p, self.arbiter.take());
        self.serve(sink, c)
    }

    /// Claims the service address and serves unprotected until a backup joins.
    fn alone(mut self, c: &Common) -> anyhow::Result<NodeSummary> {
        register(&mut self.port, c, self.epoch)?;
        let join_at = self
            .join
            .as_ref()
            .map_or(String::new(), |j| format!(", joins at {}", j.local_addr()));
        let detail = format!("unprotected, epoch {}{join_at}", self.epoch);
        METRICS.state.set(
            ReplicaState::Unprotected,
            Role::Primary,
            self.epoch,
            &format!("serving without a backup{join_at}"),
        );
        Ready::new("primary", serving_addr(&self.port)?, detail).announce()?;
        let sink = FailoverSink::alone(
            vmm::journal::AloneLog::new(self.epoch, 1, None),
            self.arbiter.take(),
        );
        self.serve(sink, c)
    }

    fn serve(self, mut sink: vmm::failover::LiveLog, c: &Common) -> anyhow::Result<NodeSummary> {
        if let Some(j) = &self.join {
            sink = sink.with_protection(j.protection());
        }
        let mut vm = self.vm;
        let mut rec = Recorder::new(sink, self.port, record_config(c), self.stop)?;
        if c.front.is_some() {
            rec = rec.reregister_with(read_key(c)?, c.session);
        }
        if let Some(j) = &self.join {
            rec = rec.with_pause(j.pause_flag());
        }
        let started = Instant::now();
        let result = serve_live(&mut vm, &mut rec, self.join.as_ref(), 1);
        let mut summary = summarize(&vm, "primary", &result, started)?;
        fill_gate(&mut summary, &rec);
        sink_findings(&mut summary, rec.log());
        if let Some(j) = &self.join {
            summary.joins = j.reports();
        }
        conclude(&c.json, summary, result)
    }
}

/// Where a backup's replay starts: exit 1 of a fresh guest, or after a join.
struct Start {
    first_exit: u64,
    last_clock_ns: u64,
    joined: Option<JoinedSummary>,
}

fn replay<L: transport::BackupLink + 'static>(
    mut vm: Vm,
    b: transport::Backup<L>,
    args: &BackupArgs,
    epoch: u64,
    start: Start,
) -> anyhow::Result<NodeSummary> {
    let c = &args.common;
    let stop = stop_flag()?;
    let join = match &args.accept_joins {
        Some(addr) => Some(join_service(c, &vm, addr, epoch, false)?),
        None => None,
    };
    let joins_at = join.as_ref().map(|j| j.local_addr());
    let takeover = match arbiter_client(c, "backup", stop.clone(), joins_at)? {
        Some(arbiter) => {
            if c.front.is_none() {
                bail!("--arbiter on the backup needs --front: the service address it takes over");
            }
            Some(Takeover {
                arbiter,
                epoch,
                port: service_port(c, &args.service)?,
                key: read_key(c)?,
                session: c.session,
                record: record_config(c),
                stop: stop.clone(),
                joins: join.as_ref().map(|j| (j.pause_flag(), j.protection())),
            })
        }
        None => None,
    };
    let mut replayer = Replayer::new(b, Duration::from_millis(100))
        .with_idle_spin(Duration::from_micros(c.idle_spin_us))
        .with_clock(start.last_clock_ns)
        .with_stop(stop.clone());
    if let Some(path) = &args.journal {
        if start.joined.is_none() {
            // A journal from exit 1 has no base; an old one would be taken for its start.
            let _ = std::fs::remove_file(vmm::join::base_path(path));
        }
        replayer = replayer.with_journal(
            Journal::create(path).with_context(|| format!("journal {}", path.display()))?,
        );
    }
    let mut source = Failover::new(replayer, takeover);
    let started = Instant::now();
    let result = serve_live(&mut vm, &mut source, join.as_ref(), start.first_exit);
    // Told to stop as a backup: a clean end (the primary goes on without it).
    let result = match result {
        Err(EngineError::Stopped { exit }) => {
            tracing::info!(
                "stopped at exit {exit} as the backup (SIGTERM): the primary goes on without it"
            );
            Ok(RunSummary {
                exits: exit - 1,
                guest_halted: false,
                paused: false,
            })
        }
        other => other,
    };
    let mut summary = summarize(&vm, "backup", &result, started)?;
    if let Err(e @ EngineError::Divergence { exit, .. }) = &result {
        summary.divergence = Some(e.to_string());
        summary.divergence_exit = Some(*exit);
    }
    summary.outputs_checked = source.outputs_checked();
    summary.entries_received = source.replayed_entries();
    summary.epoch = epoch;
    if let Some(r) = source.replayer() {
        summary.log_bytes = r.source().stats().bytes;
    }
    if let Some(rec) = source.recorder() {
        fill_gate(&mut summary, rec);
    }
    summary.takeover = source.report().cloned();
    summary.joined = start.joined;
    if let Some(j) = &join {
        summary.joins = j.reports();
    }
    conclude(&c.json, summary, result)
}

/// Runs the backup: accepts one primary, replays its log until its stop point — or, with an
/// arbiter, until the log ends, then takes over if the arbiter says so.
pub fn backup(args: &BackupArgs) -> anyhow::Result<NodeSummary> {
    let vm = new_vm(&args.common)?;
    backup_on(args, vm, start_epoch(&args.common)?)
}

/// [`backup`] on a new VM, starting in `epoch`. A failed join leaves a
/// [`vmm::join::JoinError`] in the error's chain (the VM then holds partial state).
pub(crate) fn backup_on(args: &BackupArgs, vm: Vm, epoch: u64) -> anyhow::Result<NodeSummary> {
    let c = &args.common;
    pin(c.core);
    let cfg = channel_config(c, epoch)?;
    let medium = medium(c, &args.listen)?;
    let mut listener = transport::Listener::bind(&medium)
        .with_context(|| format!("listening for the primary at {medium}"))?;
    pin(c.core);
    let mut vm = vm;
    let mut cfg = cfg;
    let mut epoch = epoch;
    // The channel's ring is made now, not while a joined-with primary waits with its guest
    // stopped.
    listener
        .prepare(&cfg)
        .with_context(|| format!("preparing the log channel at {medium}"))?;
    if args.join.is_some() {
        // Memory is made before the join, not while the primary copies into it.
        let t0 = Instant::now();
        match vm.prefault() {
            Ok(()) => tracing::info!(
                "guest memory ready: {} MiB in {:.0} ms",
                c.mem_mib,
                t0.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => tracing::warn!("guest memory not prefaulted ({e}): the join will fault it"),
        }
    }
    let start = match &args.join {
        None => Start {
            first_exit: 1,
            last_clock_ns: 0,
            joined: None,
        },
        Some(addr) => {
            let request = vmm::join::JoinRequest {
                mem_size: (c.mem_mib << 20) as u64,
                image_digest: guest(c)?.digest,
                medium: medium.name().into(),
                address: args
                    .advertise
                    .clone()
                    .unwrap_or_else(|| listener.local_addr()),
            };
            tracing::info!(
                "joining the primary at {addr}: taking its guest's state while it serves"
            );
            METRICS.state.set_peer(Some(addr.to_string()));
            METRICS.state.set(
                ReplicaState::Joining,
                Role::Backup,
                epoch,
                &format!("joining the primary at {addr}"),
            );
            let t0 = Instant::now();
            let base = args.journal.as_deref().map(vmm::join::base_path);
            let (dev, restored) = vmm::join::join(addr, &cfg, &request, &mut vm, base.as_deref())
                .with_context(|| {
                format!(
                    "joining the primary at {addr} (no complete state: this backup does not \
                         start)"
                )
            })?;
            let transfer_ms = t0.elapsed().as_secs_f64() * 1e3;
            tracing::info!(
                "joined at exit {}: {} rounds, {:.1} MiB in {transfer_ms:.0} ms, digests equal; \
                 replaying the log from entry {}",
                dev.exit,
                restored.rounds,
                restored.bytes as f64 / (1 << 20) as f64,
                dev.next_seq
            );
            cfg.resume_seq = dev.next_seq;
            epoch = epoch.max(dev.epoch);
            cfg.epoch = epoch;
            Start {
                first_exit: dev.exit + 1,
                last_clock_ns: dev.last_clock_ns,
                joined: Some(JoinedSummary {
                    exit: dev.exit,
                    first_seq: dev.next_seq,
                    epoch: dev.epoch,
                    rounds: restored.rounds,
                    pages: restored.pages,
                    bytes: restored.bytes,
                    transfer_ms,
                    pages_digest: format!("{:016x}", restored.pages_digest),
                    registers_digest: format!("{:016x}", restored.registers_digest),
                }),
            }
        }
    };
    let detail = if start.joined.is_some() {
        format!("{}, joined", medium.name())
    } else {
        medium.name().to_string()
    };
    Ready::new("backup", listener.local_addr(), detail).announce()?;
    tracing::debug!("accepting the primary's channel");
    let b = listener.backup(cfg).context("accepting the primary")?;
    tracing::debug!("the primary's channel is up");
    METRICS
        .state
        .set_peer(Some(format!("the primary, through {medium}")));
    if start.joined.is_some() {
        METRICS.joins_completed.inc();
    }
    METRICS.state.set(
        ReplicaState::Protected,
        Role::Backup,
        epoch,
        if start.joined.is_some() {
            "joined: replaying the primary's log"
        } else {
            "the primary connected: replaying its log"
        },
    );
    drop(listener);
    replay(vm, b, args, epoch, start)
}

/// Replays a journal on a fresh VM, to its end (a logged shutdown, or the last entry). A
/// joined backup's journal starts from the state it joined with ([`vmm::join::base_path`]):
/// that is loaded first (checked as at the join), then the journal replays from there.
pub fn replay_journal(args: &ReplayArgs) -> anyhow::Result<NodeSummary> {
    let guest = read_guest(args.guest, args.guest_image.as_deref())?;
    let image = &guest.bytes[..];
    let mut vm = Vm::new(args.mem_mib << 20, image)
        .with_context(|| format!("creating the VM for {}", guest.name))?;
    let base = vmm::join::base_path(&args.journal);
    let (first_exit, first_seq, clock) = if base.exists() {
        let dev = load_base(&base, &mut vm, args.mem_mib, image)
            .with_context(|| format!("the journal's base {}", base.display()))?;
        tracing::info!(
            "loaded the joined state from {} (exit {}); replaying the journal from entry {}",
            base.display(),
            dev.exit,
            dev.next_seq
        );
        (dev.exit + 1, dev.next_seq, dev.last_clock_ns)
    } else {
        (1, 1, 0)
    };
    let journal = JournalSource::open(&args.journal)
        .with_context(|| format!("journal {}", args.journal.display()))?
        .starting_at(first_seq);
    let mut replayer = Replayer::new(journal, Duration::from_millis(1)).with_clock(clock);
    let started = Instant::now();
    let result = engine::run(&mut vm, &mut replayer, first_exit);
    // A journal that ends without a logged shutdown replays to its last entry.
    let result = match result {
        Err(EngineError::LogEnded { exit, .. }) => Ok(RunSummary {
            exits: exit - 1,
            guest_halted: false,
            paused: false,
        }),
        other => other,
    };
    let mut summary = summarize(&vm, "replay", &result, started)?;
    if let Err(e @ EngineError::Divergence { exit, .. }) = &result {
        summary.divergence = Some(e.to_string());
        summary.divergence_exit = Some(*exit);
    }
    summary.outputs_checked = replayer.outputs_checked();
    summary.entries_received = replayer.entries();
    conclude(&args.json, summary, result)
}

/// Loads a joined backup's base (its state stream, as received) into the fresh `vm`.
fn load_base(
    path: &std::path::Path,
    vm: &mut Vm,
    mem_mib: usize,
    image: &[u8],
) -> anyhow::Result<vmm::join::DeviceState> {
    use vmm::migrate::stream::{Chunk, ChunkReader};
    let open = || -> anyhow::Result<_> {
        Ok(ChunkReader::new(std::io::BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(path)?,
        )))
    };
    // The pair and epoch are the base's own; the image and memory size must be ours.
    let session = match open()?.next_chunk()? {
        Chunk::Header(h) => h.session,
        other => bail!("starts with {}, not a header", other.kind().name()),
    };
    let expect = vmm::migrate::sink::Expect {
        mem_size: (mem_mib << 20) as u64,
        image_digest: vmm::migrate::image_digest(image),
        session,
        min_epoch: 0,
    };
    let restored = vmm::migrate::sink::restore(&mut open()?, vm, &expect)?;
    Ok(vmm::join::DeviceState::decode(&restored.device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// A signal sets the flag every part of the process reads, whenever that part asked for it.
    #[test]
    fn every_part_of_the_process_reads_the_one_stop_flag() {
        let first = stop_flag().expect("handlers");
        let later = stop_flag().expect("handlers");
        assert!(Arc::ptr_eq(&first, &later));
        assert!(!later.load(Ordering::Relaxed));
        // SAFETY: raise(2) with a valid signal; signal-hook's handler, installed above, replaces
        // the default action (it only stores to the flag).
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert!(stop_flag().expect("handlers").load(Ordering::Relaxed));
    }
}
