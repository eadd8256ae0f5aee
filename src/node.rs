//! `ftvm primary` and `ftvm backup`: one VMM each, joined by the log channel.

use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use transport::{shm, tcp, ChannelConfig, PollPolicy, PreSharedKey};
use vmm::engine::{self, EngineError, RunSummary};
use vmm::record::{LogSink, NoLog, RecordConfig, Recorder};
use vmm::replay::Replayer;
use vmm::vm::Vm;

/// The log channel's medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Medium {
    /// Shared memory between two processes on one host (the default).
    Shm,
    /// Kernel TCP, busy-polled.
    Tcp,
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
    /// Write a JSON summary here when the run ends.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The guest program: the key-value service, or a deliberately non-deterministic variant
    /// (it reads the TSC) that divergence detection must catch.
    #[arg(long, value_enum, default_value = "kvstore")]
    pub guest: Guest,
    /// `--transport dpdk`: this process's EAL options, one string split like a shell, e.g.
    /// "--no-huge -m 256 --no-pci -l 1 --file-prefix ftvm-p
    /// --vdev=net_memif0,role=client,id=0,socket=/tmp/ftvm-memif.sock,socket-abstract=no"
    /// (each process its own --file-prefix; see dpdk_sys::EalArgs for the verified sets).
    #[arg(long, allow_hyphen_values = true)]
    pub eal: Option<String>,
    /// `--transport dpdk`: the DPDK device to use (e.g. net_memif0); default: the only one.
    #[arg(long)]
    pub dpdk_port: Option<String>,
}

/// Guest programs built into ftvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Guest {
    /// The key-value service.
    Kvstore,
    /// The key-value service mixing `rdtsc` into its responses: replay cannot reproduce it.
    Nondet,
}

/// `ftvm primary`.
#[derive(clap::Args, Debug, Clone)]
pub struct PrimaryArgs {
    #[command(flatten)]
    pub common: Common,
    /// The backup: a Unix socket path (shm) or host:port (tcp; dpdk: its control address).
    #[arg(long, required_unless_present = "unreplicated")]
    pub backup: Option<String>,
    /// UDP address clients send requests to (port 0 picks one; printed as `SERVING addr`).
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
    pub requests: u64,
    pub outputs_checked: u64,
    pub divergence: Option<String>,
    pub divergence_exit: Option<u64>,
    pub first_output_exit: Option<u64>,
    pub error: Option<String>,
    pub seconds: f64,
    pub exits_per_sec: f64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// SIGTERM and SIGINT set the returned flag (the primary checks it at every exit).
pub fn stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_signal` only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, handler as libc::sighandler_t) };
    }
    let f = flag.clone();
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::Relaxed) {
            f.store(true, Ordering::Relaxed);
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    });
    flag
}

fn pin(core: Option<usize>) {
    if let Some(core) = core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
            eprintln!("warning: could not pin the vCPU thread to core {core}");
        }
    }
}

fn channel_config(c: &Common) -> anyhow::Result<ChannelConfig> {
    let key = PreSharedKey::from_file(&c.key_file)
        .with_context(|| format!("pre-shared key {}", c.key_file.display()))?;
    let mut cfg = ChannelConfig::new(c.session, 1, key);
    cfg.heartbeat_timeout = Duration::from_millis(c.heartbeat_timeout_ms);
    cfg.heartbeat_interval = cfg.heartbeat_timeout / 10;
    // Each VMM owns its core: spin, then yield (so a client sharing the core still runs), but
    // never sleep — a sleeping backup would delay its ACKs, and with them every output.
    cfg.poll = PollPolicy::BUSY;
    Ok(cfg)
}

fn new_vm(c: &Common) -> anyhow::Result<Vm> {
    let image = match c.guest {
        Guest::Kvstore => vmm::vm::GUEST_IMAGE,
        Guest::Nondet => vmm::vm::GUEST_NONDET_IMAGE,
    };
    Vm::new(c.mem_mib << 20, image).context("creating the VM")
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

fn record<S: LogSink>(
    mut vm: Vm,
    sink: S,
    socket: UdpSocket,
    args: &PrimaryArgs,
    role: &str,
) -> anyhow::Result<NodeSummary> {
    let stop = stop_flag();
    let mut rec = Recorder::new(sink, socket, RecordConfig::default(), stop)?;
    let started = Instant::now();
    let result = engine::run(&mut vm, &mut rec, 1);
    let mut summary = match &result {
        Ok(run) => finish(&vm, role, *run, started)?,
        Err(e) => NodeSummary {
            role: role.into(),
            error: Some(e.to_string()),
            ..Default::default()
        },
    };
    let gate = rec.gate();
    summary.outputs_committed = gate.released();
    summary.commit_p50_us = gate.latency().value_at_quantile(0.5) as f64 / 1000.0;
    summary.commit_p99_us = gate.latency().value_at_quantile(0.99) as f64 / 1000.0;
    summary.log_bytes = rec.log().log_bytes();
    summary.requests = rec.requests();
    summary.first_output_exit = rec.first_output_exit();
    write_summary(&args.common.json, &summary)?;
    result?;
    Ok(summary)
}

/// Runs the primary until SIGTERM/SIGINT, then logs the stop point and exits.
pub fn primary(args: &PrimaryArgs) -> anyhow::Result<NodeSummary> {
    let vm = new_vm(&args.common)?;
    pin(args.common.core);
    let socket = UdpSocket::bind(&args.service)
        .with_context(|| format!("binding the service address {}", args.service))?;
    let addr = socket.local_addr()?;
    if args.unreplicated {
        println!("SERVING {addr} (unreplicated)");
        return record(vm, NoLog::default(), socket, args, "unreplicated");
    }
    let Some(backup) = &args.backup else {
        bail!("--backup is required unless --unreplicated");
    };
    let cfg = channel_config(&args.common)?;
    match args.common.transport {
        Medium::Shm => {
            let p = shm::connect(backup, cfg)
                .with_context(|| format!("connecting to the backup at {backup}"))?;
            println!("SERVING {addr} (replicating to {backup} over shm)");
            record(vm, p, socket, args, "primary")
        }
        Medium::Tcp => {
            let p = tcp::connect(backup.as_str(), cfg)
                .with_context(|| format!("connecting to the backup at {backup}"))?;
            println!("SERVING {addr} (replicating to {backup} over tcp)");
            record(vm, p, socket, args, "primary")
        }
        Medium::Dpdk => dpdk_primary(vm, socket, backup, cfg, args),
    }
}

/// `--transport dpdk`: initialises this process's EAL from `--eal` and opens its port. EAL
/// pins the calling thread to its main lcore (`-l`); `--core` is applied again afterwards.
#[cfg(feature = "dpdk")]
fn dpdk_port(c: &Common) -> anyhow::Result<dpdk_sys::Port> {
    use dpdk_sys::{EalArgs, Mempool, Port};
    let line = c
        .eal
        .as_deref()
        .context("--transport dpdk needs --eal \"<EAL options>\"")?;
    let eal_args = EalArgs::parse(line).context("--eal")?;
    let eal = eal_args
        .init()
        .with_context(|| format!("initialising DPDK with {eal_args}"))?;
    let id = match &c.dpdk_port {
        Some(name) => eal
            .port_by_name(name)
            .with_context(|| format!("--dpdk-port {name}: no such DPDK port"))?,
        None => match eal.ports().as_slice() {
            [id] => *id,
            ports => bail!(
                "--eal created {} DPDK ports; name one with --dpdk-port",
                ports.len()
            ),
        },
    };
    let pool = Mempool::new("ftvm_log", 8191, 256, Mempool::DEFAULT_DATA_ROOM)
        .context("creating the mbuf pool")?;
    let mut port = Port::configure(id, &pool, 1024, 1024).context("configuring the DPDK port")?;
    port.start().context("starting the DPDK port")?;
    pin(c.core);
    Ok(port)
}

#[cfg(feature = "dpdk")]
fn dpdk_primary(
    vm: Vm,
    socket: UdpSocket,
    backup: &str,
    cfg: ChannelConfig,
    args: &PrimaryArgs,
) -> anyhow::Result<NodeSummary> {
    use transport::dpdk::{self, DpdkConfig};
    let addr = socket.local_addr()?;
    let port = dpdk_port(&args.common)?;
    let p = dpdk::connect(backup, port, cfg, DpdkConfig::default())
        .with_context(|| format!("connecting to the backup at {backup}"))?;
    println!("SERVING {addr} (replicating to {backup} over dpdk)");
    record(vm, p, socket, args, "primary")
}

#[cfg(not(feature = "dpdk"))]
fn dpdk_primary(
    _: Vm,
    _: UdpSocket,
    _: &str,
    _: ChannelConfig,
    _: &PrimaryArgs,
) -> anyhow::Result<NodeSummary> {
    bail!("--transport dpdk: this ftvm was built without the dpdk feature (cargo build --features dpdk)")
}

fn replay<L: transport::BackupLink>(
    mut vm: Vm,
    b: transport::Backup<L>,
    args: &BackupArgs,
) -> anyhow::Result<NodeSummary> {
    let mut rep = Replayer::new(b, Duration::from_millis(100));
    let started = Instant::now();
    let result = engine::run(&mut vm, &mut rep, 1);
    let mut summary = match &result {
        Ok(run) => finish(&vm, "backup", *run, started)?,
        Err(e) => NodeSummary {
            role: "backup".into(),
            error: Some(e.to_string()),
            ..Default::default()
        },
    };
    if let Err(e @ EngineError::Divergence { exit, .. }) = &result {
        summary.divergence = Some(e.to_string());
        summary.divergence_exit = Some(*exit);
    }
    summary.outputs_checked = rep.outputs_checked();
    summary.log_bytes = rep.backup().stats().bytes;
    write_summary(&args.common.json, &summary)?;
    result?;
    Ok(summary)
}

/// Runs the backup: accepts one primary, replays its log until its stop point.
pub fn backup(args: &BackupArgs) -> anyhow::Result<NodeSummary> {
    let vm = new_vm(&args.common)?;
    pin(args.common.core);
    let cfg = channel_config(&args.common)?;
    match args.common.transport {
        Medium::Shm => {
            let l = shm::listen(&args.listen)?;
            println!("LISTENING {}", args.listen);
            let b = shm::accept(&l, cfg).context("accepting the primary")?;
            let _ = std::fs::remove_file(&args.listen);
            replay(vm, b, args)
        }
        Medium::Tcp => {
            let l = std::net::TcpListener::bind(&args.listen)
                .with_context(|| format!("binding {}", args.listen))?;
            println!("LISTENING {}", l.local_addr()?);
            let b = tcp::accept(&l, cfg).context("accepting the primary")?;
            replay(vm, b, args)
        }
        Medium::Dpdk => dpdk_backup(vm, cfg, args),
    }
}

#[cfg(feature = "dpdk")]
fn dpdk_backup(vm: Vm, cfg: ChannelConfig, args: &BackupArgs) -> anyhow::Result<NodeSummary> {
    use transport::dpdk::{self, DpdkConfig};
    let port = dpdk_port(&args.common)?;
    let l = std::net::TcpListener::bind(&args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    println!("LISTENING {}", l.local_addr()?);
    let b = dpdk::accept(&l, port, cfg, DpdkConfig::default()).context("accepting the primary")?;
    replay(vm, b, args)
}

#[cfg(not(feature = "dpdk"))]
fn dpdk_backup(_: Vm, _: ChannelConfig, _: &BackupArgs) -> anyhow::Result<NodeSummary> {
    bail!("--transport dpdk: this ftvm was built without the dpdk feature (cargo build --features dpdk)")
}
