//! `ftvm demo --faults N`: a self-healing pair under a long run of mixed faults.
//!
//! Two `ftvm node` processes run behind the service front (in this process) over the TCP log
//! medium, each node's log channel reached through a relay (in this process) that can swallow
//! or corrupt bytes. A client drives verified requests in batches the whole time. Every
//! `--fault-every` requests the injector picks one fault at random, restarts the victim as a
//! supervisor would (`Restart=always`), and waits until the pair is protected again before the
//! next one. With `--arbiter-kind etcd` the arbiter is a three-member etcd cluster started
//! here, and now and then one member is killed for the length of a fault.
//!
//! What is checked: every batch's read-back (`acknowledged_lost`, `responses_bad`); no epoch
//! with two replicas going live (`split_brain`); the epoch advancing by exactly one per fault;
//! at the end, the primary's and the backup's guests equal, and the survivor equal to its
//! journal's replay.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ft_arbiter::Arbiter;
use rand::{Rng, SeedableRng};

use crate::client::{self, Workload};
use crate::demo::DemoArgs;
use crate::ready::Ready;
use crate::replica::NodeSummary;

/// A fault the injector can cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL of the primary (detected by the closed channel).
    KillPrimary,
    /// SIGKILL of the backup.
    KillBackup,
    /// SIGSTOP of the primary until the backup has taken over, then SIGCONT: it must halt.
    StopPrimary,
    /// SIGSTOP of the backup until the primary has gone on alone, then SIGCONT: it must halt.
    StopBackup,
    /// The log channel cut with both alive (the relay swallows every byte).
    CutChannel,
    /// One byte of the log stream flipped by the relay.
    CorruptFrame,
}

impl FaultKind {
    const ALL: [FaultKind; 6] = [
        FaultKind::KillPrimary,
        FaultKind::KillBackup,
        FaultKind::StopPrimary,
        FaultKind::StopBackup,
        FaultKind::CutChannel,
        FaultKind::CorruptFrame,
    ];

    fn name(self) -> &'static str {
        match self {
            FaultKind::KillPrimary => "kill-primary",
            FaultKind::KillBackup => "kill-backup",
            FaultKind::StopPrimary => "stop-primary",
            FaultKind::StopBackup => "stop-backup",
            FaultKind::CutChannel => "cut-channel",
            FaultKind::CorruptFrame => "corrupt-frame",
        }
    }
}

/// Which arbiter the campaign starts for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArbiterKind {
    /// A file store in the demo's directory.
    File,
    /// `ftvm arbiter serve`, a separate process.
    Server,
    /// A three-member etcd cluster on loopback (needs etcd: Debian's `etcd-server`).
    Etcd,
}

/// One fault, as the JSON summary lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultRecord {
    pub index: u64,
    pub kind: FaultKind,
    /// The node the fault hit (for a cut or corrupted channel: the backup's end).
    pub victim: String,
    /// The node that went live in the new epoch.
    pub winner: String,
    pub epoch: u64,
    /// Fault to the new epoch's replica registered at the front (serving), ms.
    pub failover_ms: f64,
    /// The winner's own account, from its log: end of the log to live for a backup that took
    /// over (the arbiter's decision and the front), the arbiter's decision for a primary that
    /// lost its backup, ms. The rest of `failover_ms` is noticing the fault.
    pub takeover_ms: Option<f64>,
    /// Fault to the pair protected again (the restarted node joined), ms.
    pub reprotect_ms: f64,
    /// The loser's exit status (3: deposed; -1: killed by the injector).
    pub loser_exit: i32,
    /// An etcd member was down during this fault.
    pub etcd_member_down: Option<usize>,
}

/// Resident memory of one process kind over the campaign, KiB.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RssRecord {
    pub process: String,
    pub first_kib: u64,
    pub max_kib: u64,
    pub last_kib: u64,
    pub samples: u64,
}

/// The JSON summary of `ftvm demo --faults N`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CampaignSummary {
    pub faults_requested: u64,
    pub faults_done: u64,
    pub arbiter: String,
    pub heartbeat_timeout_ms: u64,
    pub requests: u64,
    pub responses_ok: u64,
    pub responses_bad: u64,
    pub acknowledged_lost: u64,
    pub keys_verified: u64,
    /// The client stopped early (a response never came).
    pub client_aborted: bool,
    /// Its first wrong or missing answer.
    pub client_error: Option<String>,
    pub max_response_ms: f64,
    /// Epochs in which two replicas went live, plus client responses from a deposed replica
    /// (a wrong answer): must be 0.
    pub split_brain: u64,
    /// Faults after which the epoch did not advance by exactly one.
    pub epoch_anomalies: u64,
    pub divergences: u64,
    /// Every fault ended with the pair protected again.
    pub protected_after_every_fault: bool,
    pub failover_ms_p50: Option<f64>,
    pub failover_ms_p99: Option<f64>,
    pub failover_ms_max: Option<f64>,
    pub reprotect_ms_p50: Option<f64>,
    pub reprotect_ms_p99: Option<f64>,
    pub reprotect_ms_max: Option<f64>,
    /// p50 of failover after SIGKILL of the primary only (the target's case).
    pub kill_primary_failover_ms_p50: Option<f64>,
    /// p50 and max of those failovers' takeover (the winner's own account; the rest is noticing
    /// the closed channel).
    pub kill_primary_takeover_ms_p50: Option<f64>,
    pub kill_primary_takeover_ms_max: Option<f64>,
    pub etcd_member_restarts: u64,
    /// Bytes the relays flipped (one per corrupt-frame fault).
    pub bytes_corrupted: u64,
    pub front: Option<vmm::service::FrontStats>,
    pub primary_memory_hash: String,
    pub backup_memory_hash: String,
    pub final_hashes_equal: bool,
    /// The survivor's journal replayed on a fresh VM (`None`: the survivor never was a
    /// backup in its life, so it keeps no journal).
    pub journal_replay_memory_hash: Option<String>,
    pub journal_replay_matches: Option<bool>,
    pub rss: Vec<RssRecord>,
    pub error: Option<String>,
    pub faults: Vec<FaultRecord>,
    pub seconds: f64,
}

/// The etcd cluster a campaign with `--arbiter-kind etcd` starts.
#[cfg(feature = "etcd")]
type Cluster = ft_arbiter::etcd_cluster::EtcdCluster;

/// Without the `etcd` feature there is no cluster (asking for one is an error at start).
#[cfg(not(feature = "etcd"))]
struct Cluster;

#[cfg(not(feature = "etcd"))]
impl Cluster {
    fn members(&self) -> usize {
        0
    }
    fn kill(&mut self, _: usize) -> anyhow::Result<()> {
        Ok(())
    }
    fn restart(&mut self, _: usize) -> anyhow::Result<()> {
        Ok(())
    }
}

// ------------------------------------------------------------------------------ relay

/// A TCP relay in front of a node's log channel listener: passes bytes, or swallows them (a
/// cut), or flips one byte of the stream towards the node (a corrupted frame).
struct Relay {
    addr: SocketAddr,
    shared: Arc<RelayShared>,
}

struct RelayShared {
    target: SocketAddr,
    next_id: AtomicU64,
    /// Connections with an id below this swallow everything (cut).
    cut_below: AtomicU64,
    /// Flip a byte of the next chunk towards the node.
    corrupt: AtomicBool,
    corrupted: AtomicU64,
}

impl Relay {
    fn start(target: SocketAddr) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a relay")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(RelayShared {
            target,
            next_id: AtomicU64::new(0),
            cut_below: AtomicU64::new(0),
            corrupt: AtomicBool::new(false),
            corrupted: AtomicU64::new(0),
        });
        let s = shared.clone();
        std::thread::Builder::new()
            .name("ftvm-relay".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(from) = conn else { continue };
                    let Ok(to) = TcpStream::connect(s.target) else {
                        continue;
                    };
                    let id = s.next_id.fetch_add(1, Ordering::AcqRel);
                    let _ = from.set_nodelay(true);
                    let _ = to.set_nodelay(true);
                    let (Ok(from2), Ok(to2)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let (s1, s2) = (s.clone(), s.clone());
                    std::thread::spawn(move || pump(from, to, id, true, &s1));
                    std::thread::spawn(move || pump(to2, from2, id, false, &s2));
                }
            })
            .context("starting a relay thread")?;
        Ok(Relay { addr, shared })
    }

    /// Cuts every connection open now (new ones pass).
    fn cut(&self) {
        let next = self.shared.next_id.load(Ordering::Acquire);
        self.shared.cut_below.store(next, Ordering::Release);
    }

    fn corrupt_next(&self) {
        self.shared.corrupt.store(true, Ordering::Release);
    }

    fn corrupted(&self) -> u64 {
        self.shared.corrupted.load(Ordering::Acquire)
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, id: u64, towards_node: bool, s: &RelayShared) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if id < s.cut_below.load(Ordering::Acquire) {
            continue;
        }
        if towards_node && n >= 16 && s.corrupt.swap(false, Ordering::AcqRel) {
            buf[n / 2] ^= 0x5a;
            s.corrupted.fetch_add(1, Ordering::AcqRel);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

// ------------------------------------------------------------------------------ nodes

/// A log line of a node, with when it arrived and from which incarnation.
#[derive(Debug, Clone)]
struct Line {
    at: Instant,
    incarnation: u32,
    text: String,
}

/// One host's node, restarted as a supervisor would.
struct Slot {
    name: &'static str,
    args: Vec<String>,
    child: Option<Child>,
    incarnation: u32,
    lines: Arc<Mutex<Vec<Line>>>,
    ready: Option<std::sync::mpsc::Receiver<Option<Ready>>>,
    log_file: Arc<Mutex<std::fs::File>>,
    pid: Arc<AtomicU64>,
}

impl Slot {
    fn new(name: &'static str, args: Vec<String>, dir: &Path) -> anyhow::Result<Slot> {
        let path = dir.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Slot {
            name,
            args,
            child: None,
            incarnation: 0,
            lines: Arc::default(),
            ready: None,
            log_file: Arc::new(Mutex::new(file)),
            pid: Arc::new(AtomicU64::new(0)),
        })
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the ftvm binary")?;
        let mut child = Command::new(exe)
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting node {}", self.name))?;
        self.incarnation += 1;
        let incarnation = self.incarnation;
        self.pid.store(u64::from(child.id()), Ordering::Release);
        let err = child.stderr.take().context("node stderr")?;
        let (lines, file) = (self.lines.clone(), self.log_file.clone());
        std::thread::spawn(move || {
            for text in BufReader::new(err).lines().map_while(Result::ok) {
                if let Ok(mut f) = file.lock() {
                    let _ = writeln!(f, "[{incarnation}] {text}");
                }
                if let Ok(mut l) = lines.lock() {
                    l.push(Line {
                        at: Instant::now(),
                        incarnation,
                        text,
                    });
                }
            }
        });
        let out = child.stdout.take().context("node stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let _ = tx.send(crate::ready::find(&mut reader).ok().flatten());
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        self.ready = Some(rx);
        self.child = Some(child);
        Ok(())
    }

    fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            if let Ok(pid) = i32::try_from(c.id()) {
                // SAFETY: kill(2) on our own child process, which has not been reaped.
                unsafe { libc::kill(pid, sig) };
            }
        }
    }

    /// Its exit status if it has exited (-1: by a signal).
    fn exited(&mut self) -> Option<i32> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => Some(st.code().unwrap_or(-1)),
            _ => None,
        }
    }

    /// The first line since `since` containing `what` (in any incarnation).
    fn line_since(&self, since: Instant, what: &str) -> Option<Line> {
        let l = self.lines.lock().ok()?;
        l.iter()
            .find(|l| l.at >= since && l.text.contains(what))
            .cloned()
    }

    fn count_since(&self, since: Instant, what: &str) -> usize {
        self.lines.lock().map_or(0, |l| {
            l.iter()
                .filter(|l| l.at >= since && l.text.contains(what))
                .count()
        })
    }

    /// Incarnations that logged `what` since `since`.
    fn incarnations_with(&self, since: Instant, what: &str) -> Vec<u32> {
        let mut v: Vec<u32> = self.lines.lock().map_or(Vec::new(), |l| {
            l.iter()
                .filter(|l| l.at >= since && l.text.contains(what))
                .map(|l| l.incarnation)
                .collect()
        });
        v.dedup();
        v
    }

    fn tail(&self, n: usize) -> String {
        self.lines.lock().map_or(String::new(), |l| {
            let start = l.len().saturating_sub(n);
            l[start..]
                .iter()
                .map(|l| format!("  {} [{}] {}\n", self.name, l.incarnation, l.text))
                .collect()
        })
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `f` gives `Some` (polling every 2 ms), for at most `within`.
fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The milliseconds a winner's "won epoch" line reports: "… (X ms after the log ended)" (a
/// backup that took over) or "… in X ms; continuing unreplicated" (a primary alone).
fn takeover_ms(line: &str) -> Option<f64> {
    let number = if let Some((before, _)) = line.split_once(" ms after the log ended") {
        before.rsplit_once('(')?.1
    } else {
        let (before, _) = line.split_once(" ms; continuing")?;
        before.rsplit_once(" in ")?.1
    };
    number.trim().parse().ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    Some(s[i])
}

fn rss_kib(pid: u64) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Each thread of `pid`: name, state, kernel wait channel and kernel stack (when readable),
/// for a process that does not end when it should.
fn threads(pid: u64) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("  /proc/{pid}/task unreadable (gone?)");
    };
    let mut out = String::new();
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let state = read("status")
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or("")
            .to_owned();
        out.push_str(&format!(
            "  {} {} {state} wchan {}\n{}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan"),
            read("stack")
        ));
    }
    out
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ------------------------------------------------------------------------------ the run

/// The client: one verified run on `--keys` keys until `stop` (then it reads every key back).
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<anyhow::Result<client::ClientReport>>,
}

fn start_load(service: SocketAddr, args: &DemoArgs) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut w = Workload::new(u64::MAX, args.seed, args.keys, args.get_percent);
    w.protocol = crate::demo::workload(args);
    w.key_prefix = "campaign".into();
    w.verify = true;
    w.window = 4;
    w.timeout = Duration::from_secs(30);
    w.retry = Duration::from_millis(50);
    w.stop = Some(stop.clone());
    let dn = done.clone();
    let thread =
        std::thread::spawn(move || client::run(service, &w, |d| dn.store(d, Ordering::Release)));
    Load { stop, done, thread }
}

/// Runs the campaign; prints progress and returns the summary (also written as JSON).
pub fn run(args: &DemoArgs, faults: u64) -> anyhow::Result<CampaignSummary> {
    let started = Instant::now();
    let scratch = crate::demo::private_dir()?;
    let dir = scratch.path().to_path_buf();
    let key = match &args.key_file {
        Some(k) => k.clone(),
        None => crate::demo::write_key(&dir)?,
    };
    let psk = transport::PreSharedKey::from_file(&key)?;
    crate::replica::pin(Some(args.client_core));

    // The arbiter.
    let mut arbiter_proc: Option<Slot> = None;
    let mut etcd: Option<Cluster> = None;
    let spec: ft_arbiter::ArbiterSpec = match (&args.arbiter, args.arbiter_kind) {
        (Some(spec), _) => spec.clone(),
        (None, ArbiterKind::File) => {
            let store = dir.join("arbiter");
            ft_arbiter::FileArbiter::init(&store)?;
            ft_arbiter::ArbiterSpec::File(store)
        }
        (None, ArbiterKind::Server) => {
            let state = dir.join("arbiter-state");
            let mut slot = Slot::new(
                "arbiter",
                vec![
                    "arbiter".into(),
                    "serve".into(),
                    "--listen".into(),
                    "127.0.0.1:0".into(),
                    "--state-dir".into(),
                    state.display().to_string(),
                    "--key-file".into(),
                    key.display().to_string(),
                ],
                &dir,
            )?;
            slot.spawn()?;
            let ready = slot
                .ready
                .take()
                .and_then(|r| r.recv_timeout(Duration::from_secs(30)).ok().flatten())
                .context("the arbiter server did not start")?;
            arbiter_proc = Some(slot);
            ft_arbiter::ArbiterSpec::Server(ready.addr)
        }
        #[cfg(feature = "etcd")]
        (None, ArbiterKind::Etcd) => {
            let bin = ft_arbiter::etcd_cluster::etcd_binary()?;
            println!("  starting a three-member etcd cluster on loopback …");
            let cluster = Cluster::start(&bin, 3, &dir.join("etcd"))?;
            let spec = cluster.spec().parse()?;
            etcd = Some(cluster);
            spec
        }
        #[cfg(not(feature = "etcd"))]
        (None, ArbiterKind::Etcd) => {
            let _ = &mut etcd;
            bail!("--arbiter-kind etcd needs a build with the cargo feature `etcd` (the default)")
        }
    };
    let front = vmm::service::Front::bind(([127, 0, 0, 1], 0).into(), psk, 1)?;
    let service = front.local_addr();
    println!(
        "ftvm demo: a self-healing pair (two `ftvm node`s, TCP log channel through relays) behind \
         the front {service}, arbiter {spec};\n  {faults} faults, one every {} requests, \
         heartbeat timeout {} ms",
        args.fault_every, args.heartbeat_timeout_ms
    );
    crate::demo::say_skip(args);

    // The two nodes, each with a relay in front of its log channel.
    let mut slots = Vec::new();
    let mut relays = Vec::new();
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let relay = Relay::start(listen)?;
        let mut node_args = vec![
            "node".to_string(),
            "--transport".into(),
            "tcp".into(),
            "--key-file".into(),
            key.display().to_string(),
            "--arbiter".into(),
            spec.to_string(),
            "--front".into(),
            service.to_string(),
            "--name".into(),
            name.into(),
            "--heartbeat-timeout-ms".into(),
            args.heartbeat_timeout_ms.to_string(),
            "--core".into(),
            i.to_string(),
            "--listen".into(),
            listen.to_string(),
            "--advertise".into(),
            relay.addr.to_string(),
            "--accept-joins".into(),
            dir.join(format!("{name}-joins.sock")).display().to_string(),
            "--journal".into(),
            dir.join(format!("{name}.journal")).display().to_string(),
            "--json".into(),
            dir.join(format!("{name}.json")).display().to_string(),
        ];
        node_args.extend(crate::replica::guest_flags(
            args.guest,
            args.guest_image.as_deref(),
        ));
        if crate::demo::skips_guest_check(args) {
            node_args.push("--skip-guest-check".into());
        }
        slots.push(Slot::new(name, node_args, &dir)?);
        relays.push(relay);
    }
    let mut summary = CampaignSummary {
        faults_requested: faults,
        arbiter: spec.to_string(),
        heartbeat_timeout_ms: args.heartbeat_timeout_ms,
        protected_after_every_fault: true,
        ..Default::default()
    };
    let result = campaign(
        args,
        faults,
        &spec,
        &key,
        &front,
        &mut slots,
        &relays,
        etcd.as_mut(),
        arbiter_proc.as_ref(),
        &dir,
        &mut summary,
    );
    if let Err(e) = &result {
        summary.error = Some(format!("{e:#}"));
        for s in &slots {
            eprint!("{}", s.tail(15));
        }
    }
    summary.front = Some(front.stats());
    summary.seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        write_plot(path, &summary).with_context(|| format!("writing {}", path.display()))?;
    }
    drop(slots);
    drop(arbiter_proc);
    drop(etcd);
    if result.is_err() {
        // What the run wrote (the etcd members' logs, the arbiter's state) stays for a look.
        let kept = scratch.keep();
        println!(
            "  the campaign stopped; its directory is kept at {} (etcd/member-*/etcd.log, arbiter state)",
            kept.display()
        );
    }
    result.map(|()| summary)
}

#[allow(clippy::too_many_arguments)]
fn campaign(
    args: &DemoArgs,
    faults: u64,
    spec: &ft_arbiter::ArbiterSpec,
    key: &Path,
    front: &vmm::service::Front,
    slots: &mut [Slot],
    relays: &[Relay],
    mut etcd: Option<&mut Cluster>,
    arbiter_proc: Option<&Slot>,
    dir: &Path,
    summary: &mut CampaignSummary,
) -> anyhow::Result<()> {
    let psk = transport::PreSharedKey::from_file(key)?;
    let mut arbiter = spec.open(Some(&psk))?;
    let pair = "ftvm-pair-1";
    let phase = Duration::from_secs(args.fault_timeout_s.max(5));

    // RSS of every long-lived process, sampled four times a second.
    let sampling = Arc::new(AtomicBool::new(true));
    let mut watched: Vec<(String, Arc<AtomicU64>)> = slots
        .iter()
        .map(|s| (format!("node {}", s.name), s.pid.clone()))
        .collect();
    watched.push((
        "demo (front, relays, client)".into(),
        Arc::new(AtomicU64::new(u64::from(std::process::id()))),
    ));
    if let Some(a) = arbiter_proc {
        watched.push(("arbiter server".into(), a.pid.clone()));
    }
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut recs: Vec<RssRecord> = watched
                .iter()
                .map(|(n, _)| RssRecord {
                    process: n.clone(),
                    ..Default::default()
                })
                .collect();
            while sampling.load(Ordering::Acquire) {
                for (rec, (_, pid)) in recs.iter_mut().zip(&watched) {
                    if let Some(kib) = rss_kib(pid.load(Ordering::Acquire)) {
                        if rec.samples == 0 {
                            rec.first_kib = kib;
                        }
                        rec.samples += 1;
                        rec.max_kib = rec.max_kib.max(kib);
                        rec.last_kib = kib;
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            recs
        })
    };

    // Both nodes at once: one claims the new pair, the other joins it.
    println!("  starting nodes a and b at once …");
    let t_start = Instant::now();
    for s in slots.iter_mut() {
        s.spawn()?;
    }
    let mut roles = Vec::new();
    for s in slots.iter_mut() {
        let r = s
            .ready
            .take()
            .and_then(|r| r.recv_timeout(phase).ok().flatten())
            .with_context(|| format!("node {} did not start", s.name))?;
        roles.push(r.role);
    }
    let mut p = roles
        .iter()
        .position(|r| r == "primary")
        .context("no node became primary")?;
    if roles.iter().filter(|r| *r == "primary").count() != 1 {
        bail!("both nodes became primary: {roles:?}");
    }
    let mut b = 1 - p;
    wait_for(phase, || slots[p].line_since(t_start, "protected again"))
        .context("the pair was never protected")?;
    println!(
        "  node {} is primary (epoch 1), node {} joined it: protected",
        slots[p].name, slots[b].name
    );

    let load = start_load(front.local_addr(), args);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(args.seed);
    let kinds: Vec<FaultKind> = if args.fault_kinds.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        args.fault_kinds.clone()
    };
    let mut etcd_down: Option<usize> = None;
    let outcome = (|| -> anyhow::Result<()> {
        let mut progress =
            ftvm_metrics::progress::Progress::new("faults", faults, "faults").no_plain_lines();
        for i in 1..=faults {
            // Under load: wait for `fault_every` more requests.
            let target = load.done.load(Ordering::Acquire) + args.fault_every;
            wait_for(phase, || {
                (load.done.load(Ordering::Acquire) >= target || load.thread.is_finished())
                    .then_some(())
            })
            .context("the client made no progress")?;
            if load.thread.is_finished() {
                bail!("the client stopped (a response never came)");
            }
            // Now and then an etcd member is down for the length of a fault.
            if let Some(cluster) = etcd.as_deref_mut() {
                if i % 7 == 0 {
                    let m = (i / 7) as usize % cluster.members();
                    cluster.kill(m)?;
                    etcd_down = Some(m);
                }
            }
            // Retried while unavailable (an etcd member just killed may be the one asked).
            let e0 = wait_for(phase, || arbiter.latest(pair).ok())
                .context("asking the arbiter for the epoch: no answer")?
                .map_or(0, |r| r.epoch);
            let kind = kinds[rng.gen_range(0..kinds.len())];
            let victim = match kind {
                FaultKind::KillPrimary | FaultKind::StopPrimary => p,
                _ => b,
            };
            let t0 = Instant::now();
            match kind {
                FaultKind::KillPrimary | FaultKind::KillBackup => {
                    slots[victim].signal(libc::SIGKILL)
                }
                FaultKind::StopPrimary | FaultKind::StopBackup => {
                    slots[victim].signal(libc::SIGSTOP)
                }
                FaultKind::CutChannel => relays[b].cut(),
                FaultKind::CorruptFrame => relays[b].corrupt_next(),
            }
            // A replica serves in the next epoch.
            wait_for(phase, || (front.stats().epoch > e0).then_some(()))
                .with_context(|| format!("fault {i} ({}): nobody went live", kind.name()))?;
            let t_live = front
                .registered_at_or_after(e0 + 1)
                .unwrap_or_else(Instant::now);
            if matches!(kind, FaultKind::StopPrimary | FaultKind::StopBackup) {
                slots[victim].signal(libc::SIGCONT);
            }
            let record = wait_for(phase, || arbiter.latest(pair).ok().flatten())
                .context("the arbiter lost the decision")?;
            if record.epoch != e0 + 1 {
                summary.epoch_anomalies += 1;
            }
            let winner = slots
                .iter()
                .position(|s| record.winner.starts_with(&format!("{}.", s.name)))
                .with_context(|| format!("winner {} is neither node", record.winner))?;
            let loser = 1 - winner;
            // Exactly one replica went live in the new epoch.
            let won = format!(": won epoch {}", record.epoch);
            let live: usize = slots
                .iter()
                .map(|s| s.incarnations_with(t0, &won).len())
                .sum();
            if live > 1 {
                summary.split_brain += 1;
            }
            // The loser halts (deposed) or is dead; the winner serves on.
            let loser_exit = wait_for(phase, || slots[loser].exited()).with_context(|| {
                format!(
                    "fault {i} ({}): node {} neither halted nor died; its threads:\n{}",
                    kind.name(),
                    slots[loser].name,
                    threads(slots[loser].pid.load(Ordering::Acquire))
                )
            })?;
            if slots[winner].exited().is_some() {
                bail!("fault {i} ({}): both nodes are down", kind.name());
            }
            if loser_exit == crate::node::REFUSED_EXIT_CODE {
                bail!("node {} was refused for good", slots[loser].name);
            }
            // The supervisor restarts it: it joins the survivor.
            let protected_before = slots[winner].count_since(t0, "protected again");
            slots[loser].spawn()?;
            let joined = slots[loser]
                .ready
                .take()
                .and_then(|r| r.recv_timeout(phase).ok().flatten());
            if !joined.as_ref().is_some_and(|r| r.detail.contains("joined")) {
                summary.protected_after_every_fault = false;
                bail!(
                    "fault {i} ({}): node {} did not rejoin ({joined:?})",
                    kind.name(),
                    slots[loser].name
                );
            }
            let t_protected = wait_for(phase, || {
                (slots[winner].count_since(t0, "protected again") > protected_before)
                    .then(|| {
                        slots[winner].lines.lock().ok().and_then(|l| {
                            l.iter()
                                .rev()
                                .find(|l| l.text.contains("protected again"))
                                .map(|l| l.at)
                        })
                    })
                    .flatten()
            })
            .with_context(|| format!("fault {i}: the pair was not protected again"))?;
            // The winner's line has long arrived (it went live before the loser's restart).
            let takeover_ms = slots[winner]
                .line_since(t0, &won)
                .and_then(|l| takeover_ms(&l.text));
            let rec = FaultRecord {
                index: i,
                kind,
                victim: slots[victim].name.into(),
                winner: slots[winner].name.into(),
                epoch: record.epoch,
                failover_ms: ms(t_live.saturating_duration_since(t0)),
                takeover_ms,
                reprotect_ms: ms(t_protected.saturating_duration_since(t0)),
                loser_exit,
                etcd_member_down: etcd_down,
            };
            if let (Some(cluster), Some(m)) = (etcd.as_deref_mut(), etcd_down.take()) {
                cluster.restart(m)?;
                summary.etcd_member_restarts += 1;
            }
            progress.println(&format!(
                "  fault {i}/{faults} {:<13} victim {}: live in {:>7.1} ms (takeover {}), protected \
                 in {:>7.1} ms (epoch {}, {} serves{})",
                kind.name(),
                rec.victim,
                rec.failover_ms,
                rec.takeover_ms
                    .map_or_else(|| "-".to_owned(), |t| format!("{t:.1} ms")),
                rec.reprotect_ms,
                rec.epoch,
                rec.winner,
                if rec.etcd_member_down.is_some() {
                    ", an etcd member down"
                } else {
                    ""
                }
            ));
            progress.set(i);
            summary.faults.push(rec);
            // Only this fault's lines are looked at again: memory stays bounded.
            for s in slots.iter() {
                if let Ok(mut l) = s.lines.lock() {
                    l.retain(|l| l.at >= t0);
                }
            }
            summary.faults_done = i;
            (p, b) = (winner, loser);
        }
        Ok(())
    })();
    if let (Some(cluster), Some(m)) = (etcd, etcd_down) {
        let _ = cluster.restart(m);
    }
    load.stop.store(true, Ordering::Release);
    let report = load
        .thread
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))?;
    match report {
        Ok(r) => {
            summary.requests = r.requests;
            summary.responses_ok = r.responses_ok;
            summary.responses_bad = r.responses_bad;
            summary.acknowledged_lost = r.acknowledged_lost;
            summary.keys_verified = r.keys_verified;
            summary.max_response_ms = r.max_response_ms;
            summary.client_aborted = r.aborted;
            summary.client_error = r.first_error;
        }
        Err(e) => {
            summary.client_aborted = true;
            summary.client_error = Some(format!("{e:#}"));
        }
    }
    // A wrong answer would have come from a replica that should not answer.
    summary.split_brain += summary.responses_bad;
    let failover: Vec<f64> = summary.faults.iter().map(|f| f.failover_ms).collect();
    let reprotect: Vec<f64> = summary.faults.iter().map(|f| f.reprotect_ms).collect();
    let kill: Vec<f64> = summary
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::KillPrimary)
        .map(|f| f.failover_ms)
        .collect();
    summary.failover_ms_p50 = percentile(&failover, 0.5);
    summary.failover_ms_p99 = percentile(&failover, 0.99);
    summary.failover_ms_max = percentile(&failover, 1.0);
    summary.reprotect_ms_p50 = percentile(&reprotect, 0.5);
    summary.reprotect_ms_p99 = percentile(&reprotect, 0.99);
    summary.reprotect_ms_max = percentile(&reprotect, 1.0);
    summary.kill_primary_failover_ms_p50 = percentile(&kill, 0.5);
    let kill_takeover: Vec<f64> = summary
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::KillPrimary)
        .filter_map(|f| f.takeover_ms)
        .collect();
    summary.kill_primary_takeover_ms_p50 = percentile(&kill_takeover, 0.5);
    summary.kill_primary_takeover_ms_max = percentile(&kill_takeover, 1.0);
    summary.bytes_corrupted = relays.iter().map(Relay::corrupted).sum();
    outcome?;

    // The end: the primary stops at a logged exit, the backup replays to it.
    println!("  stopping the pair: primary {} first …", slots[p].name);
    slots[p].signal(libc::SIGTERM);
    let pe = wait_for(phase, || slots[p].exited()).context("the primary did not stop")?;
    let be = wait_for(phase, || slots[b].exited()).context("the backup did not stop")?;
    sampling.store(false, Ordering::Release);
    summary.rss = sampler.join().unwrap_or_default();
    if pe != 0 || be != 0 {
        bail!("the pair did not stop cleanly (primary exit {pe}, backup exit {be})");
    }
    let read = |name: &str| -> anyhow::Result<NodeSummary> {
        let path = dir.join(format!("{name}.json"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&bytes)?)
    };
    let (ps, bs) = (read(slots[p].name)?, read(slots[b].name)?);
    summary.divergences = u64::from(ps.divergence.is_some()) + u64::from(bs.divergence.is_some());
    summary.primary_memory_hash = ps.memory_hash.clone();
    summary.backup_memory_hash = bs.memory_hash.clone();
    summary.final_hashes_equal = ps.memory_hash == bs.memory_hash
        && ps.registers_digest == bs.registers_digest
        && !ps.memory_hash.is_empty();
    // The survivor's journal (kept since it last joined; a node that never was a backup in
    // its life has none).
    let journal = dir.join(format!("{}.journal", slots[p].name));
    if ps.joined.is_some() && journal.exists() && vmm::join::base_path(&journal).exists() {
        {
            println!("  replaying the survivor's journal on a fresh VM …");
            let r = crate::replica::replay_journal(&crate::replica::ReplayArgs {
                journal,
                mem_mib: 16,
                guest: args.guest,
                guest_image: args.guest_image.clone(),
                json: None,
            })?;
            summary.journal_replay_matches = Some(r.memory_hash == ps.memory_hash);
            summary.journal_replay_memory_hash = Some(r.memory_hash);
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------ plot

/// Two cumulative distributions (failover, re-protect) on a log time axis, as SVG.
fn write_plot(path: &Path, s: &CampaignSummary) -> anyhow::Result<()> {
    let (w, h, left, bottom, top, right) = (760.0, 420.0, 70.0, 50.0, 40.0, 20.0);
    let series: [(&str, &str, Vec<f64>); 2] = [
        (
            "failover (fault to live)",
            "#1f77b4",
            s.faults.iter().map(|f| f.failover_ms).collect(),
        ),
        (
            "re-protect (fault to protected)",
            "#d62728",
            s.faults.iter().map(|f| f.reprotect_ms).collect(),
        ),
    ];
    let all: Vec<f64> = series.iter().flat_map(|s| s.2.iter().copied()).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.1);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    let (l0, l1) = (lo.log10().floor(), hi.log10().ceil());
    let x = |v: f64| left + (v.max(lo).log10() - l0) / (l1 - l0) * (w - left - right);
    let y = |q: f64| top + (1.0 - q) * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" \
         fill=\"white\"/>\n<text x=\"{left}\" y=\"22\" font-size=\"14\">ftvm demo --faults {}: \
         {} faults, arbiter {} — cumulative distribution</text>\n",
        s.faults_requested,
        s.faults_done,
        xml(&s.arbiter)
    );
    let mut d = l0;
    while d <= l1 {
        let v = 10f64.powf(d);
        svg.push_str(&format!(
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{0:.1}\" y=\"{2:.1}\" text-anchor=\"middle\">{3} ms</text>\n",
            x(v),
            h - bottom,
            h - bottom + 16.0,
            v
        ));
        d += 1.0;
    }
    for q in [0.0, 0.5, 0.99, 1.0] {
        svg.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{0:.1}\" x2=\"{1:.1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/>\
             <text x=\"{2:.1}\" y=\"{3:.1}\" text-anchor=\"end\">{4}</text>\n",
            y(q),
            w - right,
            left - 6.0,
            y(q) + 4.0,
            q
        ));
    }
    for (k, (label, color, v)) in series.iter().enumerate() {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let points: String = v
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{:.1},{:.1} ", x(*t), y((i + 1) as f64 / n)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{points}\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{label} (p50 {})</text>\n",
            left + 10.0,
            top + 16.0 + 16.0 * k as f64,
            percentile(&v, 0.5).map_or("-".into(), |p| format!("{p:.1} ms"))
        ));
    }
    svg.push_str("</svg>\n");
    std::fs::write(path, svg)?;
    Ok(())
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takeover_times_are_read_from_the_winners_line() {
        let backup = "2026-12-04T22:28:36.1Z  INFO vmm::failover: b.1: won epoch 7; live at exit \
                      8380 (3.8 ms after the log ended)";
        assert_eq!(takeover_ms(backup), Some(3.8));
        let primary = "INFO vmm::failover: a.2: won epoch 2 in 15.8 ms; continuing unreplicated";
        assert_eq!(takeover_ms(primary), Some(15.8));
        assert_eq!(takeover_ms("a.2: won epoch 2"), None);
        assert_eq!(takeover_ms("won epoch 2 (x ms after the log ended)"), None);
    }

    #[test]
    fn percentiles_pick_ranks() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 0.5), Some(3.0));
        assert_eq!(percentile(&v, 1.0), Some(5.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    /// The relay passes bytes, swallows them after a cut (new connections pass), and flips
    /// exactly one byte when asked.
    #[test]
    fn the_relay_passes_cuts_and_corrupts() {
        let echo = TcpListener::bind("127.0.0.1:0").expect("echo");
        let target = echo.local_addr().expect("addr");
        std::thread::spawn(move || {
            for c in echo.incoming().map_while(Result::ok) {
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut buf = [0u8; 256];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let relay = Relay::start(target).expect("relay");
        let roundtrip = |c: &mut TcpStream, msg: &[u8]| -> Option<Vec<u8>> {
            c.write_all(msg).ok()?;
            let mut got = vec![0u8; msg.len()];
            c.read_exact(&mut got).ok()?;
            Some(got)
        };
        let msg = b"0123456789abcdef0123456789abcdef";
        let mut a = TcpStream::connect(relay.addr).expect("connect");
        a.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        assert_eq!(roundtrip(&mut a, msg).as_deref(), Some(&msg[..]));
        relay.corrupt_next();
        let got = roundtrip(&mut a, msg).expect("corrupted echo");
        assert_eq!(got.iter().zip(msg).filter(|(x, y)| x != y).count(), 1);
        assert_eq!(relay.corrupted(), 1);
        assert_eq!(roundtrip(&mut a, msg).as_deref(), Some(&msg[..]));
        relay.cut();
        assert_eq!(roundtrip(&mut a, msg), None, "cut: nothing comes back");
        let mut fresh = TcpStream::connect(relay.addr).expect("connect");
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        assert_eq!(roundtrip(&mut fresh, msg).as_deref(), Some(&msg[..]));
    }
}
