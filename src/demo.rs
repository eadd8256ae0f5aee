//! `ftvm demo`: an FT pair on one machine. Starts a backup and a primary (separate processes,
//! pinned to different cores) on the default transport, drives client requests through the
//! primary with a progress display, stops the pair at a logged exit, and compares the two
//! guests. Then runs the same workload unreplicated to measure what FT costs.

use std::io::{BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::client::{self, ClientReport, Workload};
use crate::ready::Ready;
use crate::replica::NodeSummary;

/// `ftvm demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Client requests to send.
    #[arg(long, default_value_t = 10_000)]
    pub requests: u64,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Percent of GET requests.
    #[arg(long, default_value_t = 40)]
    pub get_percent: u8,
    /// Distinct keys.
    #[arg(long, default_value_t = 100)]
    pub keys: u32,
    /// Skip the unreplicated baseline run.
    #[arg(long)]
    pub no_baseline: bool,
    /// Guest program (`nondet` demonstrates divergence detection; `ledger` is the second example
    /// guest, driven by the ledger workload).
    #[arg(long, value_enum, default_value = "kvstore")]
    pub guest: crate::replica::Guest,
    /// Run this guest image file instead (see `ftvm primary --guest-image`).
    #[arg(long, conflicts_with = "guest")]
    pub guest_image: Option<PathBuf>,
    /// The service the client speaks (default: the built-in guest's; `kvstore` for an image).
    #[arg(long, value_enum)]
    pub workload: Option<crate::client::Protocol>,
    /// Write the summary as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Core for the client (default: the primary's core 0; on core 1 it would preempt the
    /// backup and delay its ACKs).
    #[arg(long, default_value_t = 0)]
    pub client_core: usize,
    /// Give both replicas a metrics endpoint (`--metrics 127.0.0.1:0`), and scrape both
    /// (`/metrics`, `/status`) when the client is done, before the pair stops: the scrapes go
    /// into the JSON summary (`metrics`).
    #[arg(long)]
    pub metrics: bool,
    /// Kill the primary with SIGKILL after this many requests and let the backup take over
    /// (through the arbiter and the service front); then report the failover.
    #[arg(long)]
    pub kill_primary_after: Option<u64>,
    /// The pair's pre-shared key (default: a fresh random one). A `server:` arbiter must have
    /// been started with the same key.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// The arbiter for `--kill-primary-after` (default: a file store in the demo's directory).
    #[arg(long)]
    pub arbiter: Option<ft_arbiter::ArbiterSpec>,
    /// With `--kill-primary-after`: send the SIGKILL a random 0..N µs after that response, so
    /// that it lands anywhere in the primary's work, not only between requests.
    #[arg(long, default_value_t = 0)]
    pub kill_jitter_us: u64,
    /// Heartbeat timeout of the pair, ms (how long a silent peer is given).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_timeout_ms: u64,
    /// What protects the log channel's frames and ACKs (`auth`, `encrypt` or `none`; see `ftvm primary
    /// --help`).
    #[arg(long, default_value = "auth")]
    pub channel_crypto: transport::auth::ChannelCrypto,
    /// The replicas' `--ack-kick-us`: an output that waited this long for its ACK kicks the
    /// backup (µs; 0: never).
    #[arg(long, default_value_t = vmm::record::ACK_KICK_US)]
    pub ack_kick_us: u64,
    /// The replicas' `--ack-helper-us`: an output that waited this long for its ACK wakes the
    /// backup's ACK helper (µs; 0: never).
    #[arg(long, default_value_t = vmm::record::ACK_HELPER_US)]
    pub ack_helper_us: u64,
    /// With `--kill-primary-after`: once the backup has taken over, start a new backup that
    /// joins it by live state transfer, so the run ends protected again.
    #[arg(long, requires = "kill_primary_after")]
    pub reprotect: bool,
    /// A fault campaign: two `ftvm node`s heal after each of N faults picked at random
    /// (`--fault-kinds`), injected every `--fault-every` requests under verified load.
    #[arg(long, conflicts_with = "kill_primary_after")]
    pub faults: Option<u64>,
    /// With `--faults`: the arbiter the demo starts (unless `--arbiter` names one).
    #[arg(long, value_enum, default_value = "file")]
    pub arbiter_kind: crate::campaign::ArbiterKind,
    /// With `--faults`: requests between two faults.
    #[arg(long, default_value_t = 300)]
    pub fault_every: u64,
    /// With `--faults`: the kinds to pick from (comma-separated; default all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub fault_kinds: Vec<crate::campaign::FaultKind>,
    /// With `--faults`: write the failover and re-protect distributions here (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// With `--faults`: give up when a phase of a fault (live, halted, rejoined) takes longer, s.
    #[arg(long, default_value_t = 60)]
    pub fault_timeout_s: u64,
}

/// The JSON summary of a demo with `--kill-primary-after`.
#[derive(Debug, serde::Serialize)]
pub struct FailoverSummary {
    pub requests: u64,
    pub responses_ok: u64,
    pub responses_bad: u64,
    /// Acknowledged updates missing from the survivor (read back by the client): must be 0.
    pub acknowledged_lost: u64,
    pub keys_verified: u64,
    pub retries: u64,
    pub killed_after: u64,
    /// Primary death (SIGKILL sent) to the first response from the new primary, through the
    /// service front.
    pub failover_ms: Option<f64>,
    /// Primary death to the backup's registration of its new epoch at the front.
    pub live_ms: Option<f64>,
    /// Primary death to the backup noticing the channel's failure.
    pub detect_ms: Option<f64>,
    /// Primary death to the backup having replayed every entry it received.
    pub drained_ms: Option<f64>,
    /// The backup's own account: end of the log to live (arbiter + front), ms.
    pub takeover_ms: Option<f64>,
    pub arbiter_decide_ms: Option<f64>,
    pub winner: Option<String>,
    pub epoch: u64,
    /// Why the backup's log ended.
    pub detected: Option<String>,
    /// The exit at which the backup went live.
    pub live_at_exit: Option<u64>,
    pub entries_replayed: u64,
    pub served_live: u64,
    pub max_response_ms: f64,
    pub front: vmm::service::FrontStats,
    pub arbiter: String,
    /// The survivor's guest memory when it stopped.
    pub survivor_memory_hash: String,
    /// The same after replaying the survivor's journal (the old primary's log it replayed,
    /// then what it recorded live) on a fresh VM.
    pub journal_replay_memory_hash: String,
    /// The two agree: the takeover continued exactly the guest the log described.
    pub journal_replay_matches: bool,
    /// With `--reprotect`: a new backup joined the survivor and followed it to the end.
    pub reprotected: bool,
    /// The survivor's guest was stopped this long for the switch-over, ms.
    pub join_pause_ms: Option<f64>,
    /// From the joiner's connection to protected, ms.
    pub join_total_ms: Option<f64>,
    /// Bytes of the state stream.
    pub join_bytes: Option<u64>,
    /// Pre-copy rounds (with the guest running).
    pub join_rounds: Option<usize>,
    /// The joined backup's guest memory and registers when the run stopped (equal to the
    /// survivor's when the join worked).
    pub joined_memory_hash: Option<String>,
    pub survivor_registers_digest: String,
    pub joined_registers_digest: Option<String>,
}

/// The demo's JSON summary.
#[derive(Debug, serde::Serialize)]
pub struct DemoSummary {
    pub requests: u64,
    pub responses_ok: u64,
    pub outputs_committed: u64,
    /// Requests the client sent again (each retry is answered, from the guest's reply cache).
    pub retries: u64,
    /// Outputs whose digest the backup's replica reproduced.
    pub outputs_checked: u64,
    pub divergences: u64,
    pub divergence_exit: Option<u64>,
    pub first_output_exit: Option<u64>,
    pub primary_memory_hash: String,
    pub backup_memory_hash: String,
    pub primary_registers_digest: String,
    pub backup_registers_digest: String,
    pub commit_p50_us: f64,
    pub commit_p99_us: f64,
    /// Times an output's wait for its ACK kicked the backup (`--ack-kick-us`).
    pub ack_kicks: u64,
    /// Times an output's wait for its ACK woke the backup's ACK helper (`--ack-helper-us`).
    pub ack_helps: u64,
    pub log_bytes: u64,
    pub vm_exits: u64,
    pub primary_exits_per_sec: f64,
    pub ft_throughput_ratio: Option<f64>,
    pub ft_requests_per_sec: f64,
    pub unreplicated_requests_per_sec: Option<f64>,
    /// With `--metrics`: both replicas scraped after the client finished.
    pub metrics: Option<DemoMetrics>,
}

/// Both replicas' metrics endpoints, scraped while the pair still ran.
#[derive(Debug, serde::Serialize)]
pub struct DemoMetrics {
    pub primary_endpoint: String,
    pub backup_endpoint: String,
    /// The Prometheus exposition each served.
    pub primary_exposition: String,
    pub backup_exposition: String,
    /// The status each served (what `ftvm status --json` shows).
    pub primary_status: ftvm_metrics::Status,
    pub backup_status: ftvm_metrics::Status,
}

/// Scrapes both replicas' endpoints.
fn scrape_pair(primary: &Ready, backup: &Ready) -> anyhow::Result<DemoMetrics> {
    let timeout = std::time::Duration::from_secs(5);
    let endpoint = |r: &Ready| {
        r.metrics
            .clone()
            .with_context(|| format!("the {} announced no metrics endpoint", r.role))
    };
    let (pe, be) = (endpoint(primary)?, endpoint(backup)?);
    Ok(DemoMetrics {
        primary_exposition: ftvm_metrics::status::get(&pe, "/metrics", timeout)?,
        backup_exposition: ftvm_metrics::status::get(&be, "/metrics", timeout)?,
        primary_status: ftvm_metrics::fetch_status(&pe, timeout)?,
        backup_status: ftvm_metrics::fetch_status(&be, timeout)?,
        primary_endpoint: pe,
        backup_endpoint: be,
    })
}

struct Node {
    child: Child,
    name: &'static str,
    /// Kept open so the child never writes into a closed pipe.
    _stdout: BufReader<std::process::ChildStdout>,
}

impl Node {
    fn spawn(name: &'static str, args: &[String]) -> anyhow::Result<(Node, Ready)> {
        let exe = std::env::current_exe().context("finding the ftvm binary")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut reader = BufReader::new(stdout);
        let ready = crate::ready::find(&mut reader)
            .with_context(|| format!("reading the {name}'s readiness line"))?;
        let Some(ready) = ready else {
            let status = child.wait()?;
            bail!("the {name} exited before it was ready ({status})");
        };
        Ok((
            Node {
                child,
                name,
                _stdout: reader,
            },
            ready,
        ))
    }

    fn stop(self) -> anyhow::Result<()> {
        let pid = i32::try_from(self.child.id()).context("pid")?;
        // SAFETY: kill(2) on our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait()
    }

    fn wait(mut self) -> anyhow::Result<()> {
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the {} failed ({status})", self.name);
        }
        Ok(())
    }
}

fn read_summary(path: &Path) -> anyhow::Result<NodeSummary> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn drive(service: &Ready, args: &DemoArgs, label: &str) -> anyhow::Result<ClientReport> {
    let addr: SocketAddr = service
        .addr
        .parse()
        .with_context(|| format!("service address {:?}", service.addr))?;
    let mut w = Workload::new(args.requests, args.seed, args.keys, args.get_percent);
    w.protocol = workload(args);
    w.timeout = Duration::from_secs(2);
    let mut progress = ftvm_metrics::progress::Progress::new(label, args.requests, "requests");
    let report = client::run(addr, &w, |done| progress.set(done))?;
    progress.finish();
    Ok(report)
}

/// The service the demo's client speaks: `--workload`, else that of the built-in guest.
pub(crate) fn workload(args: &DemoArgs) -> client::Protocol {
    args.workload.unwrap_or(match args.guest_image {
        Some(_) => client::Protocol::Kvstore,
        None => client::Protocol::of(args.guest),
    })
}

/// Whether the demo starts its primaries with `--skip-guest-check`: for the `nondet` guest only,
/// which reads the TSC on purpose to show that divergence detection catches it.
pub(crate) fn skips_guest_check(args: &DemoArgs) -> bool {
    args.guest_image.is_none() && args.guest == crate::replica::Guest::Nondet
}

/// Says that the demo starts the `nondet` guest despite the determinism checker.
pub(crate) fn say_skip(args: &DemoArgs) {
    if skips_guest_check(args) {
        println!(
            "  the nondet guest reads the TSC on purpose (the checker `ftvm check-guest` refuses \
             it): its primary runs with --skip-guest-check, so that divergence detection can \
             catch it"
        );
    }
}

fn node_args(role: &str, dir: &Path, key: &Path, core: usize, args: &DemoArgs) -> Vec<String> {
    let mut a = vec![role.to_string()];
    a.extend(crate::replica::guest_flags(
        args.guest,
        args.guest_image.as_deref(),
    ));
    if role == "primary" && skips_guest_check(args) {
        a.push("--skip-guest-check".into());
    }
    a.extend([
        "--key-file".into(),
        key.display().to_string(),
        "--core".into(),
        core.to_string(),
        "--json".into(),
        dir.join(format!("{role}.json")).display().to_string(),
        "--channel-crypto".into(),
        args.channel_crypto.to_string(),
        "--ack-kick-us".into(),
        args.ack_kick_us.to_string(),
        "--ack-helper-us".into(),
        args.ack_helper_us.to_string(),
    ]);
    a
}

/// Runs the demo and prints a summary.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if let Some(n) = args.faults {
        let s = crate::campaign::run(args, n)?;
        println!(
            "  {} faults: {} requests, {} acknowledged updates lost, split-brain {}, {} \
             divergences; failover p50 {} ms, re-protected p50 {} ms; final hashes equal: {}, \
             survivor equals its journal's replay: {}",
            s.faults_done,
            s.requests,
            s.acknowledged_lost,
            s.split_brain,
            s.divergences,
            s.failover_ms_p50.map_or("-".into(), |v| format!("{v:.1}")),
            s.reprotect_ms_p50.map_or("-".into(), |v| format!("{v:.0}")),
            s.final_hashes_equal,
            s.journal_replay_matches
                .map_or("n/a (it never was a backup)".into(), |m| m.to_string()),
        );
        if s.acknowledged_lost > 0
            || s.split_brain > 0
            || s.divergences > 0
            || !s.final_hashes_equal
        {
            bail!("the campaign found a failure (see the summary)");
        }
        return Ok(());
    }
    match args.kill_primary_after {
        Some(m) => run_failover(args, m).map(|_| ()),
        None => run_pair(args).map(|_| ()),
    }
}

/// A fresh directory only this user can enter (0700), removed when dropped.
pub(crate) fn private_dir() -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix("ftvm-demo-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .context("creating the demo's private directory")
}

/// A random pre-shared key in `dir/psk`, created 0600 (the key file rule of
/// `PreSharedKey::from_file`).
pub(crate) fn write_key(dir: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = dir.join("psk");
    let mut k = [0u8; 32];
    getrandom::getrandom(&mut k).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .and_then(|mut f| {
            f.write_all(
                k.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
                    .as_bytes(),
            )
        })
        .with_context(|| format!("writing the key file {}", key.display()))?;
    Ok(key)
}

/// The FT pair behind the service front, the primary killed after `kill_after` requests.
pub fn run_failover(args: &DemoArgs, kill_after: u64) -> anyhow::Result<FailoverSummary> {
    let scratch = private_dir()?;
    let dir = scratch.path().to_path_buf();
    let key = match &args.key_file {
        Some(k) => k.clone(),
        None => write_key(&dir)?,
    };
    let arbiter = match &args.arbiter {
        Some(spec) => spec.clone(),
        None => {
            let store = dir.join("arbiter");
            std::fs::create_dir_all(&store)?;
            ft_arbiter::FileArbiter::create_store(&store)?;
            ft_arbiter::ArbiterSpec::File(store)
        }
    };
    // The client (and the front's thread, spawned from here) share the primary's core: on the
    // backup's they would preempt it and delay its ACKs (or, for long, its heartbeat checks).
    crate::replica::pin(Some(args.client_core));
    let psk = transport::PreSharedKey::from_file(&key)?;
    let front = vmm::service::Front::bind(([127, 0, 0, 1], 0).into(), psk, 1)?;
    let service = front.local_addr();
    let sock = dir.join("backup.sock");
    println!(
        "ftvm demo: FT pair over shared memory behind the service front {service}, arbiter {arbiter};\n  \
         {} requests, the primary is killed (SIGKILL) after {kill_after}",
        args.requests
    );
    say_skip(args);
    let common = |role: &str, core: usize| {
        let mut a = node_args(role, &dir, &key, core, args);
        a.extend([
            "--arbiter".into(),
            arbiter.to_string(),
            "--front".into(),
            service.to_string(),
            "--name".into(),
            format!("{role}-{}", std::process::id()),
            "--heartbeat-timeout-ms".into(),
            args.heartbeat_timeout_ms.to_string(),
        ]);
        a
    };
    println!("  starting backup (core 1) …");
    let mut bargs = common("backup", 1);
    let journal = dir.join("backup.journal");
    let joins = dir.join("joins.sock");
    bargs.extend([
        "--listen".into(),
        sock.display().to_string(),
        "--journal".into(),
        journal.display().to_string(),
    ]);
    if args.reprotect {
        bargs.extend(["--accept-joins".into(), joins.display().to_string()]);
    }
    // The joiner, started once the backup serves: on the dead primary's core, with its own
    // name and summary.
    let mut jargs = common("backup", 0);
    if let Some(j) = jargs.iter_mut().find(|a| a.ends_with("backup.json")) {
        *j = dir.join("joiner.json").display().to_string();
    }
    if let Some(n) = jargs.iter_mut().find(|a| a.starts_with("backup-")) {
        *n = format!("joiner-{}", std::process::id());
    }
    jargs.extend([
        "--join".into(),
        joins.display().to_string(),
        "--listen".into(),
        dir.join("joiner.sock").display().to_string(),
    ]);
    let mut joiner: Option<std::thread::JoinHandle<anyhow::Result<(Node, Ready)>>> = None;
    let (backup, _) = Node::spawn("backup", &bargs)?;
    println!("  starting primary (core 0) …");
    let mut pargs = common("primary", 0);
    pargs.extend([
        "--backup".into(),
        sock.display().to_string(),
        "--service".into(),
        "127.0.0.1:0".into(),
    ]);
    let (mut primary, serving) = Node::spawn("primary", &pargs)?;
    println!("  primary serving {} ({})", serving.addr, serving.detail);
    // The pair starts in the arbiter's latest epoch for it (1 for a new pair).
    let first_epoch = front.stats().epoch;

    let mut w = Workload::new(args.requests, args.seed, args.keys, args.get_percent);
    w.protocol = workload(args);
    w.verify = true;
    let mut progress = ftvm_metrics::progress::Progress::new("requests", args.requests, "requests");
    let killed: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, u64)>>> =
        Default::default();
    let mut killer = None;
    let pid = i32::try_from(primary.child.id()).context("primary pid")?;
    let report = client::run(service, &w, |done| {
        if done == kill_after && killer.is_none() {
            let jitter = if args.kill_jitter_us > 0 {
                rand::Rng::gen_range(&mut rand::thread_rng(), 0..args.kill_jitter_us)
            } else {
                0
            };
            let killed = killed.clone();
            killer = Some(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_micros(jitter));
                // SAFETY: kill(2) on our own child process, which has not been waited for.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                if let Ok(mut k) = killed.lock() {
                    *k = Some((std::time::Instant::now(), vmm::failover::unix_ns()));
                }
            }));
            progress.println(&format!(
                "  killing the primary after {done} requests (+{jitter} µs); the client keeps going"
            ));
        }
        if args.reprotect && joiner.is_none() && front.stats().epoch > first_epoch {
            progress.println(&format!(
                "  the backup serves in epoch {}: a new backup joins it …",
                front.stats().epoch
            ));
            let jargs = jargs.clone();
            joiner = Some(std::thread::spawn(move || Node::spawn("joiner", &jargs)));
        }
        progress.set(done);
    })?;
    progress.finish();
    if let Some(k) = killer {
        let _ = k.join();
    }
    let (killed_at, killed_unix) = match killed.lock().ok().and_then(|k| *k) {
        Some((at, unix)) => (Some(at), unix),
        None => (None, 0),
    };
    let _ = primary.child.wait();
    let joined = match joiner.map(|j| j.join()) {
        Some(Ok(Ok((node, ready)))) => {
            println!(
                "  the new backup joined ({}); the pair is protected again",
                ready.detail
            );
            Some(node)
        }
        Some(Ok(Err(e))) => {
            eprintln!("  the new backup did not join: {e:#}");
            None
        }
        Some(Err(_)) => None,
        None => None,
    };
    println!("  stopping the survivor …");
    let backup_result = backup.stop();
    // The survivor's stop point is logged: the joined backup replays up to it and stops.
    let joiner_result = joined.map(Node::wait);
    let b = read_summary(&dir.join("backup.json"));
    let jsum = joiner_result
        .as_ref()
        .map(|_| read_summary(&dir.join("joiner.json")));
    let join_report = b
        .as_ref()
        .ok()
        .and_then(|b| b.joins.iter().find(|j| j.joined).cloned());
    let since_kill = |t: Option<std::time::Instant>| match (killed_at, t) {
        (Some(k), Some(t)) => Some(t.saturating_duration_since(k).as_secs_f64() * 1e3),
        _ => None,
    };
    let takeover = b.as_ref().ok().and_then(|b| b.takeover.clone());
    println!("  replaying the survivor's journal on a fresh VM …");
    let replayed = crate::replica::replay_journal(&crate::replica::ReplayArgs {
        journal: journal.clone(),
        mem_mib: 16,
        guest: args.guest,
        guest_image: args.guest_image.clone(),
        json: None,
    });
    let survivor_memory_hash = b
        .as_ref()
        .map(|b| b.memory_hash.clone())
        .unwrap_or_default();
    let journal_replay_memory_hash = match &replayed {
        Ok(r) => r.memory_hash.clone(),
        Err(e) => {
            eprintln!("  journal replay: {e:#}");
            String::new()
        }
    };
    let summary = FailoverSummary {
        requests: report.requests,
        responses_ok: report.responses_ok,
        responses_bad: report.responses_bad,
        acknowledged_lost: report.acknowledged_lost,
        keys_verified: report.keys_verified,
        retries: report.retries,
        killed_after: kill_after,
        failover_ms: since_kill(front.first_response_at_or_after(first_epoch + 1)),
        live_ms: since_kill(front.registered_at_or_after(first_epoch + 1)),
        detect_ms: takeover
            .as_ref()
            .filter(|_| killed_unix > 0)
            .map(|t| (t.detected_unix_ns as f64 - killed_unix as f64) / 1e6),
        drained_ms: takeover
            .as_ref()
            .filter(|_| killed_unix > 0)
            .map(|t| (t.log_end_unix_ns as f64 - killed_unix as f64) / 1e6),
        takeover_ms: takeover.as_ref().map(|t| t.takeover_ms),
        arbiter_decide_ms: takeover.as_ref().map(|t| t.arbitration.decide_ms),
        winner: takeover.as_ref().map(|t| t.arbitration.winner.clone()),
        epoch: front.stats().epoch,
        detected: takeover.as_ref().map(|t| t.cause.clone()),
        live_at_exit: takeover.as_ref().map(|t| t.exit),
        entries_replayed: b.as_ref().map(|b| b.entries_received).unwrap_or(0),
        served_live: b.as_ref().map(|b| b.requests).unwrap_or(0),
        max_response_ms: report.max_response_ms,
        front: front.stats(),
        arbiter: arbiter.to_string(),
        journal_replay_matches: !survivor_memory_hash.is_empty()
            && survivor_memory_hash == journal_replay_memory_hash,
        reprotected: match (&jsum, &b) {
            (Some(Ok(j)), Ok(b)) => {
                j.error.is_none()
                    && j.memory_hash == b.memory_hash
                    && j.registers_digest == b.registers_digest
            }
            _ => false,
        },
        join_pause_ms: join_report.as_ref().map(|r| r.pause_ms),
        join_total_ms: join_report.as_ref().map(|r| r.total_ms),
        join_bytes: join_report.as_ref().map(|r| r.bytes),
        join_rounds: join_report.as_ref().map(|r| r.rounds.len()),
        joined_memory_hash: jsum
            .as_ref()
            .and_then(|j| j.as_ref().ok())
            .map(|j| j.memory_hash.clone()),
        joined_registers_digest: jsum
            .as_ref()
            .and_then(|j| j.as_ref().ok())
            .map(|j| j.registers_digest.clone()),
        survivor_registers_digest: b
            .as_ref()
            .map(|b| b.registers_digest.clone())
            .unwrap_or_default(),
        survivor_memory_hash,
        journal_replay_memory_hash,
    };
    println!();
    println!(
        "  requests            {} sent, {} answered correctly, {} retried",
        summary.requests, summary.responses_ok, summary.retries
    );
    if let Some(e) = &report.first_error {
        println!("  first problem       {e}");
    }
    println!(
        "  read-back           {} keys, acknowledged updates lost: {}",
        summary.keys_verified, summary.acknowledged_lost
    );
    if let Some(d) = &summary.detected {
        println!("  backup detected     {d}");
    }
    println!(
        "  winner              {} (epoch {}), live at exit {}",
        summary.winner.as_deref().unwrap_or("none"),
        summary.epoch,
        summary.live_at_exit.map_or("-".into(), |e| e.to_string())
    );
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2} ms"));
    println!(
        "  failover            {} to the first response from the new primary (detected {}, \
         log replayed {}, live {}; takeover {}, arbiter {})",
        ms(summary.failover_ms),
        ms(summary.detect_ms),
        ms(summary.drained_ms),
        ms(summary.live_ms),
        ms(summary.takeover_ms),
        ms(summary.arbiter_decide_ms)
    );
    println!(
        "  front               {} requests, {} responses, {} fenced",
        summary.front.requests, summary.front.responses, summary.front.fenced
    );
    println!(
        "  guest state         survivor {} / journal replayed {} ({})",
        summary.survivor_memory_hash,
        summary.journal_replay_memory_hash,
        if summary.journal_replay_matches {
            "equal"
        } else {
            "DIFFERENT"
        }
    );
    if args.reprotect {
        println!(
            "  re-protection       {} (pause {}, join {} in all, {} rounds, {:.1} MiB); joined \
             backup {} / survivor {}",
            if summary.reprotected {
                "protected again, replicas equal"
            } else {
                "FAILED"
            },
            ms(summary.join_pause_ms),
            ms(summary.join_total_ms),
            summary.join_rounds.unwrap_or(0),
            summary.join_bytes.unwrap_or(0) as f64 / (1 << 20) as f64,
            summary.joined_memory_hash.as_deref().unwrap_or("-"),
            summary.survivor_memory_hash
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    drop(scratch);
    if let Err(e) = &backup_result {
        eprintln!("  backup: {e}");
    }
    if let Some(Err(e)) = &joiner_result {
        eprintln!("  joined backup: {e}");
    }
    if summary.responses_ok != summary.requests
        || summary.acknowledged_lost > 0
        || summary.winner.is_none()
        || !summary.journal_replay_matches
        || backup_result.is_err()
        || (args.reprotect && !summary.reprotected)
    {
        bail!("the failover lost or corrupted something (see above)");
    }
    Ok(summary)
}

/// The FT pair run to a clean stop, then compared.
pub fn run_pair(args: &DemoArgs) -> anyhow::Result<DemoSummary> {
    let scratch = private_dir()?;
    let dir = scratch.path().to_path_buf();
    let key = write_key(&dir)?;
    let sock = dir.join("backup.sock");
    crate::replica::pin(Some(args.client_core));

    println!(
        "ftvm demo: FT pair over shared memory, {} requests",
        args.requests
    );
    say_skip(args);
    println!("  starting backup (core 1) …");
    let mut bargs = node_args("backup", &dir, &key, 1, args);
    bargs.extend(["--listen".into(), sock.display().to_string()]);
    let metrics_flag = ["--metrics".to_string(), "127.0.0.1:0".to_string()];
    if args.metrics {
        bargs.extend(metrics_flag.clone());
    }
    let (backup, backup_ready) = Node::spawn("backup", &bargs)?;
    println!("  starting primary (core 0) …");
    let mut pargs = node_args("primary", &dir, &key, 0, args);
    pargs.extend([
        "--backup".into(),
        sock.display().to_string(),
        "--service".into(),
        "127.0.0.1:0".into(),
    ]);
    if args.metrics {
        pargs.extend(metrics_flag);
    }
    let (primary, serving) = Node::spawn("primary", &pargs)?;
    println!("  primary serving {} ({})", serving.addr, serving.detail);
    if let (Some(p), Some(b)) = (&serving.metrics, &backup_ready.metrics) {
        println!(
            "  metrics: primary http://{p}/metrics, backup http://{b}/metrics (ftvm status ADDR)"
        );
    }
    let ft = drive(&serving, args, "FT pair")?;
    let metrics = if args.metrics {
        let m = scrape_pair(&serving, &backup_ready).context("scraping the replicas' metrics")?;
        for (name, st) in [("primary", &m.primary_status), ("backup", &m.backup_status)] {
            print!("{}", crate::status::render(st, &format!("{name} endpoint")));
        }
        Some(m)
    } else {
        None
    };
    println!("  stopping the pair at a logged exit …");
    let primary_result = primary.stop();
    let backup_result = backup.wait();
    let p = read_summary(&dir.join("primary.json"))?;
    let b = read_summary(&dir.join("backup.json"))?;
    for (name, result, s) in [
        ("primary", &primary_result, &p),
        ("backup", &backup_result, &b),
    ] {
        if let Err(e) = result {
            eprintln!("  {name}: {e}: {}", s.error.clone().unwrap_or_default());
        }
    }

    let mut solo_rate = None;
    if !args.no_baseline {
        println!("  baseline: the same workload unreplicated …");
        let mut sargs = node_args("primary", &dir, &key, 0, args);
        if let Some(j) = sargs.iter_mut().find(|a| a.ends_with("primary.json")) {
            *j = dir.join("solo.json").display().to_string();
        }
        sargs.extend([
            "--unreplicated".into(),
            "--service".into(),
            "127.0.0.1:0".into(),
        ]);
        let (solo, serving) = Node::spawn("unreplicated primary", &sargs)?;
        let r = drive(&serving, args, "unreplicated")?;
        solo.stop()?;
        if r.responses_ok != r.requests {
            bail!("unreplicated run: {}", r.first_error.unwrap_or_default());
        }
        solo_rate = Some(r.throughput);
    }

    let summary = DemoSummary {
        requests: ft.requests,
        responses_ok: ft.responses_ok,
        outputs_committed: p.outputs_committed,
        retries: ft.retries,
        outputs_checked: b.outputs_checked,
        divergences: u64::from(b.divergence.is_some()),
        divergence_exit: b.divergence_exit,
        first_output_exit: p.first_output_exit,
        primary_memory_hash: p.memory_hash.clone(),
        backup_memory_hash: b.memory_hash.clone(),
        primary_registers_digest: p.registers_digest.clone(),
        backup_registers_digest: b.registers_digest.clone(),
        commit_p50_us: p.commit_p50_us,
        commit_p99_us: p.commit_p99_us,
        ack_kicks: p.ack_kicks,
        ack_helps: p.ack_helps,
        log_bytes: p.log_bytes,
        vm_exits: p.exits,
        primary_exits_per_sec: p.exits_per_sec,
        ft_throughput_ratio: solo_rate.map(|s| ft.throughput / s),
        ft_requests_per_sec: ft.throughput,
        unreplicated_requests_per_sec: solo_rate,
        metrics,
    };
    print_summary(&summary, &ft, &b);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    drop(scratch);
    if summary.responses_ok != summary.requests
        || summary.divergences > 0
        || summary.primary_memory_hash.is_empty()
        || summary.primary_memory_hash != summary.backup_memory_hash
        || summary.primary_registers_digest != summary.backup_registers_digest
    {
        bail!("the FT pair did not stay in step (see above)");
    }
    Ok(summary)
}

fn print_summary(s: &DemoSummary, ft: &ClientReport, b: &NodeSummary) {
    println!();
    println!(
        "  requests            {} sent, {} answered correctly",
        s.requests, s.responses_ok
    );
    if let Some(e) = &ft.first_error {
        println!("  first bad response  {e}");
    }
    println!(
        "  outputs committed   {} (backup checked {})",
        s.outputs_committed, b.outputs_checked
    );
    println!(
        "  VM exits            {} ({:.0} exits/s on the primary; {} B of log, {:.0} B/request)",
        s.vm_exits,
        s.primary_exits_per_sec,
        s.log_bytes,
        s.log_bytes as f64 / s.requests.max(1) as f64
    );
    println!(
        "  commit latency      p50 {:.2} µs, p99 {:.2} µs ({} ACK helper wake-ups, {} kicks)",
        s.commit_p50_us, s.commit_p99_us, s.ack_helps, s.ack_kicks
    );
    let verdict = if s.primary_memory_hash.is_empty() || s.backup_memory_hash.is_empty() {
        "a replica did not finish: not compared"
    } else if s.primary_memory_hash == s.backup_memory_hash
        && s.primary_registers_digest == s.backup_registers_digest
    {
        "memory and registers equal"
    } else {
        "DIFFERENT"
    };
    println!(
        "  guest state         primary {} / backup {} ({verdict})",
        s.primary_memory_hash, s.backup_memory_hash,
    );
    println!("  divergences         {}", s.divergences);
    if let Some(d) = &b.divergence {
        println!("    {d}");
    }
    match (s.ft_throughput_ratio, s.unreplicated_requests_per_sec) {
        (Some(r), Some(solo)) => println!(
            "  throughput          FT {:.0} req/s, unreplicated {:.0} req/s, ratio {:.3}",
            s.ft_requests_per_sec, solo, r
        ),
        _ => println!(
            "  throughput          FT {:.0} req/s",
            s.ft_requests_per_sec
        ),
    }
}
