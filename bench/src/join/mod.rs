//! `bench join`: how long a backup takes to join a running primary, and how long the guest is
//! stopped for it, per guest memory size, with real `ftvm` processes under load.
//!
//! Per size: a service front, a primary accepting joins (`--accept-joins`) with a file
//! arbiter, a fill client dirtying guest memory for the whole run and, per join, a latency
//! client. Each join: the raw bandwidth of the join stream's medium (a plain bulk copy, Unix
//! socket or loopback TCP, [`crate::raw::bulk`]) right before it, then `ftvm backup --join`;
//! once the primary says "protected again" the joiner is SIGKILLed and the bench waits for
//! the primary to see the loss and win the next epoch ("continuing unreplicated") before the
//! next join — so every join after the first also checks that a primary that lost a joined
//! backup accepts a new one. The numbers come from the primary's JSON summary (`joins`,
//! written when it stops), cross-checked with its per-join log lines.

pub(crate) mod procs;
pub(crate) mod stats;

use std::fmt::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde::{Deserialize, Serialize};

use crate::raw::bulk;
use procs::Proc;

/// The medium of the join stream (the primary's `--accept-joins`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinLink {
    /// A Unix socket in the run's directory.
    Unix,
    /// TCP on 127.0.0.1.
    Tcp,
}

/// The log channel's medium (`ftvm --transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogMedium {
    Shm,
    Tcp,
}

#[derive(clap::Args, Debug)]
pub struct JoinArgs {
    /// Guest memory sizes, MiB (comma separated); one primary per size.
    #[arg(long, value_delimiter = ',', default_value = "16,256,1024")]
    mem_mib: Vec<u64>,
    /// Measured joins per size.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    joins: u32,
    /// Joins per size before the measured ones, excluded from the statistics.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// The `ftvm` binary (default: `ftvm` next to this bench binary).
    #[arg(long)]
    ftvm: Option<PathBuf>,
    /// The join stream's medium: the primary accepts joins on a Unix socket or on loopback TCP.
    #[arg(long, value_enum, default_value = "unix")]
    join_addr: JoinLink,
    /// The log channel's medium once joined.
    #[arg(long, value_enum, default_value = "shm")]
    transport: LogMedium,
    /// The channel's crypto, which also seals the join's state stream (`auth`) or not (`none`).
    #[arg(long, default_value = "auth")]
    channel_crypto: transport::auth::ChannelCrypto,
    /// Where join.json, join.csv, joins.csv and join.svg go.
    #[arg(long, default_value = "target/bench/join")]
    out: PathBuf,
    /// The fill client's percentage of FILL requests (each dirties `--fill-pages` pages at a
    /// random place in guest memory).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    fill_percent: u8,
    /// Pages one FILL request dirties.
    #[arg(long, default_value_t = 256)]
    fill_pages: u32,
    /// The fill client's requests in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    fill_window: u16,
    /// MiB copied by each raw bulk-bandwidth measurement (after 16 MiB not timed).
    #[arg(long, default_value_t = 256)]
    raw_mib: u64,
    /// Core of the primary's vCPU (and of the raw copy's writer).
    #[arg(long, default_value_t = 0)]
    primary_core: usize,
    /// Core of the joiner's vCPU (and of the raw copy's reader).
    #[arg(long, default_value_t = 1)]
    joiner_core: usize,
    /// Longest wait for any one step (a process ready, a join, a loss seen), seconds.
    #[arg(long, default_value_t = 120)]
    step_timeout_s: u64,
    /// The replicas' heartbeat timeout, ms. The tests' 300 ms made a joined 1 GiB backup under
    /// the fill load take over from a live primary (300 ms without a heartbeat).
    #[arg(long, default_value_t = 1000)]
    heartbeat_timeout_ms: u64,
    /// Keep each size's scratch directory (logs, JSON summaries) instead of removing it.
    #[arg(long)]
    keep: bool,
}

impl JoinArgs {
    fn step(&self) -> Duration {
        Duration::from_secs(self.step_timeout_s.max(1))
    }
}

/// One join as the bench saw it, with the primary's numbers for it.
#[derive(Debug, Clone, Serialize)]
pub struct JoinSample {
    index: u32,
    warmup: bool,
    /// From the primary's JSON `joins` (the primary's own clock).
    pause_ms: f64,
    total_ms: f64,
    bytes: u64,
    rounds: usize,
    final_pages: u64,
    finish_ms: f64,
    verdict_ms: f64,
    channel_ms: f64,
    /// Parts of finish_ms: the last dirty bitmap, the last pages.
    finish_dirty_log_ms: f64,
    finish_pages_ms: f64,
    /// Before the pause: authentication, pre-copy rounds, the joiner catching up, the vCPU
    /// stopping.
    auth_ms: f64,
    rounds_ms: f64,
    catch_up_ms: f64,
    stop_ms: f64,
    /// The raw bulk copy just before the join, MiB/s.
    raw_mib_s: f64,
    /// bytes / total_ms, MiB/s.
    join_mib_s: f64,
    /// join_mib_s / raw_mib_s.
    bw_ratio: f64,
    /// The latency client that ran across this join.
    client_max_response_ms: f64,
    /// The same client (requests, keys) just before the join, no join running: what the load
    /// alone costs.
    client_base_max_ms: f64,
    client_errors: u64,
    client_requests: u64,
    /// The latency client was still running when the primary was protected again (so it
    /// saw the whole join, the pause included).
    client_covered: bool,
    /// The bench's clock: joiner started → "protected again" seen, ms.
    seen_protected_ms: f64,
    /// The bench's clock: joiner SIGKILLed → the primary serving on alone in a new epoch, ms.
    loss_seen_ms: f64,
}

/// One guest size's results.
#[derive(Debug, Clone, Serialize)]
pub struct JoinRow {
    mem_mib: u64,
    join_addr: JoinLink,
    transport: LogMedium,
    channel_crypto: String,
    joins: usize,
    pause_p50_ms: f64,
    pause_p99_ms: f64,
    pause_max_ms: f64,
    total_p50_ms: f64,
    total_p99_ms: f64,
    total_max_ms: f64,
    mib_per_join: f64,
    rounds_mean: f64,
    raw_mib_s_median: f64,
    /// Median over the joins of (join bytes/total) / (raw bulk bandwidth just before it).
    bw_ratio_median: f64,
    client_max_response_ms: f64,
    /// The largest response of the same clients run just before each join, with no join.
    client_base_max_ms: f64,
    client_errors: u64,
    /// Measured joins whose latency client ended before the pair was protected (it missed the
    /// pause, so the client target cannot pass).
    client_uncovered: usize,
    /// Fill-client runs that ended with errors (each restarted).
    fill_client_failures: u64,
    pause_target_ms: Option<f64>,
    pause_pass: Option<bool>,
    total_target_ms: f64,
    total_pass: bool,
    /// Client max response ≤ pause max + 10 ms and no client errors.
    client_pass: bool,
    samples: Vec<JoinSample>,
}

/// The primary's `joins` entries (vmm::join::JoinReport), the fields the bench reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct PrimaryJoin {
    joined: bool,
    error: Option<String>,
    pause_ms: f64,
    total_ms: f64,
    bytes: u64,
    rounds: Vec<serde_json::Value>,
    final_pages: u64,
    finish_ms: f64,
    verdict_ms: f64,
    channel_ms: f64,
    finish_dirty_log_ms: f64,
    finish_pages_ms: f64,
    auth_ms: f64,
    rounds_ms: f64,
    catch_up_ms: f64,
    stop_ms: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct PrimarySummary {
    joins: Vec<PrimaryJoin>,
    error: Option<String>,
}

/// What `ftvm client` prints (src/client.rs ClientReport), the fields the bench reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct ClientReport {
    requests: u64,
    responses_ok: u64,
    responses_bad: u64,
    first_error: Option<String>,
    aborted: bool,
    throughput: f64,
    seconds: f64,
    acknowledged_lost: u64,
    max_response_ms: f64,
}

impl ClientReport {
    fn errors(&self) -> u64 {
        let e = self.responses_bad
            + self
                .requests
                .saturating_sub(self.responses_ok + self.responses_bad)
            + self.acknowledged_lost;
        if self.aborted {
            e.max(1)
        } else {
            e
        }
    }
}

/// The client's JSON report in its stdout (it is the whole of it, pretty-printed).
fn parse_client(stdout: &str) -> anyhow::Result<ClientReport> {
    let start = stdout
        .find('{')
        .context("no JSON report in the client's output")?;
    serde_json::from_str(&stdout[start..]).context("the client's JSON report")
}

/// Numbers from the primary's per-join log line, "a backup joined at exit N: pause P ms (…),
/// T ms in all, R rounds, M MiB": (pause ms, total ms).
fn parse_joined_line(line: &str) -> Option<(f64, f64)> {
    let rest = &line[line.find("a backup joined at exit")?..];
    let pause = rest
        .split("pause ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    let before_total = rest.split(" ms in all").next()?;
    let total = before_total.rsplit(' ').next()?.parse().ok()?;
    Some((pause, total))
}

/// The `ftvm` binary: `--ftvm`, else `ftvm` next to this one.
pub(crate) fn ftvm_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        ensure!(p.exists(), "--ftvm {}: no such file", p.display());
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("this binary's path")?;
    let next = exe
        .parent()
        .map(|d| d.join("ftvm"))
        .filter(|p| p.exists())
        .with_context(|| {
            format!(
                "no ftvm next to {} (cargo build --release, or pass --ftvm PATH)",
                exe.display()
            )
        })?;
    Ok(next)
}

/// Writes a new pre-shared key file at `path` (0600, 32 random bytes as hex).
pub(crate) fn write_key(path: &Path) -> anyhow::Result<()> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?,
        &mut bytes,
    )
    .context("reading /dev/urandom")?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, hex.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// A size's scratch directory (0700) with the pair's key file (0600).
struct Site {
    dir: PathBuf,
    key: PathBuf,
    arbiter: String,
    keep: bool,
}

impl Site {
    fn new(mem_mib: u64, keep: bool) -> anyhow::Result<Site> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "ftvm-bench-join-{}-{mem_mib}-{nanos:x}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let key = dir.join("psk");
        write_key(&key)?;
        Ok(Site {
            arbiter: format!("file:{}", dir.join("store").display()),
            dir,
            key,
            keep,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The processes of one size's run.
struct Run<'a> {
    args: &'a JoinArgs,
    ftvm: PathBuf,
    site: Site,
    mem_mib: u64,
    front_addr: String,
    join_addr: String,
    primary: Proc,
    front: Proc,
    fill: Option<Proc>,
    fill_runs: u64,
    fill_failures: u64,
}

impl Run<'_> {
    fn common(&self, role: &str, name: &str) -> Vec<String> {
        vec![
            s(role),
            s("--key-file"),
            self.site.key.display().to_string(),
            s("--arbiter"),
            self.site.arbiter.clone(),
            s("--front"),
            self.front_addr.clone(),
            s("--heartbeat-timeout-ms"),
            s(self.args.heartbeat_timeout_ms),
            s("--name"),
            s(name),
            s("--mem-mib"),
            s(self.mem_mib),
            s("--channel-crypto"),
            s(self.args.channel_crypto),
            s("--transport"),
            s(match self.args.transport {
                LogMedium::Shm => "shm",
                LogMedium::Tcp => "tcp",
            }),
        ]
    }

    fn client_args(&self, requests: u64, prefix: &str, fill: bool) -> Vec<String> {
        let mut a = vec![
            s("client"),
            s("--service"),
            self.front_addr.clone(),
            s("--requests"),
            s(requests),
            s("--keys"),
            s(if fill { FILL_KEYS } else { LATENCY_KEYS }),
            s("--key-prefix"),
            s(prefix),
            s("--timeout-ms"),
            s(30_000),
            s("--retry-ms"),
            s(1000),
        ];
        if fill {
            a.extend([
                s("--window"),
                s(self.args.fill_window),
                s("--fill-percent"),
                s(self.args.fill_percent),
                s("--fill-pages"),
                s(self.args.fill_pages),
                s("--mem-mib"),
                s(self.mem_mib),
            ]);
        } else {
            a.extend([s("--window"), s(1), s("--verify")]);
        }
        a
    }

    /// Keeps the fill client running: restarts it if it ended (noting a failed run).
    fn keep_filling(&mut self) -> anyhow::Result<()> {
        if self.args.fill_percent == 0 {
            return Ok(());
        }
        if let Some(f) = &mut self.fill {
            if !f.exited() {
                return Ok(());
            }
            let code = f.wait(Duration::from_secs(5))?;
            if code != Some(0) {
                self.fill_failures += 1;
                eprintln!(
                    "  fill client run {} ended with {code:?}: {}",
                    self.fill_runs,
                    f.stdout()
                        .lines()
                        .rev()
                        .take(3)
                        .collect::<Vec<_>>()
                        .join(" / ")
                );
            }
        }
        ensure!(
            self.fill_runs < MAX_FILL_RUNS,
            "the fill client failed {} times; stopping",
            self.fill_failures
        );
        self.fill_runs += 1;
        let args = self.client_args(100_000_000, &format!("fill{}", self.fill_runs), true);
        self.fill = Some(Proc::spawn("fill client", &self.ftvm, &args)?);
        Ok(())
    }

    /// Runs a latency client of `requests` to its end: its report.
    fn client_to_end(&self, requests: u64, prefix: &str) -> anyhow::Result<ClientReport> {
        let mut c = Proc::spawn(
            "latency client",
            &self.ftvm,
            &self.client_args(requests, prefix, false),
        )?;
        c.wait(self.args.step())?
            .with_context(|| format!("the latency client did not finish:\n{}", c.log()))?;
        parse_client(&c.stdout()).with_context(|| format!("latency client:\n{}", c.log()))
    }
}

fn start_run<'a>(args: &'a JoinArgs, ftvm: &Path, mem_mib: u64) -> anyhow::Result<Run<'a>> {
    let site = Site::new(mem_mib, args.keep)?;
    let init = std::process::Command::new(ftvm)
        .args(["arbiter", "init", &site.arbiter])
        .output()
        .context("ftvm arbiter init")?;
    ensure!(
        init.status.success(),
        "ftvm arbiter init {}: {}",
        site.arbiter,
        String::from_utf8_lossy(&init.stderr)
    );
    let front = Proc::spawn(
        "front",
        ftvm,
        &[
            s("front"),
            s("--listen"),
            s("127.0.0.1:0"),
            s("--key-file"),
            site.key.display().to_string(),
        ],
    )?;
    let front_addr = front
        .ready(args.step())?
        .with_context(|| format!("the front exited:\n{}", front.log()))?
        .addr;
    let accept = match args.join_addr {
        JoinLink::Unix => site.path("join.sock").display().to_string(),
        JoinLink::Tcp => s("127.0.0.1:0"),
    };
    // Replaced once the primary is up.
    let mut run = Run {
        args,
        ftvm: ftvm.to_path_buf(),
        mem_mib,
        front_addr,
        join_addr: String::new(),
        primary: Proc::spawn("placeholder", Path::new("true"), &[])?,
        front,
        fill: None,
        fill_runs: 0,
        fill_failures: 0,
        site,
    };
    let mut pargs = run.common("primary", "primary");
    pargs.extend([
        s("--accept-joins"),
        accept,
        s("--service"),
        s("127.0.0.1:0"),
        s("--core"),
        s(args.primary_core),
        s("--json"),
        run.site.path("primary.json").display().to_string(),
    ]);
    let primary = Proc::spawn("primary", ftvm, &pargs)?;
    let ready = primary
        .ready(args.step())?
        .with_context(|| format!("the primary exited:\n{}", primary.log()))?;
    run.join_addr = ready
        .detail
        .rsplit("joins at ")
        .next()
        .filter(|_| ready.detail.contains("joins at "))
        .with_context(|| format!("no join address in the primary's readiness: {ready:?}"))?
        .trim()
        .to_string();
    run.primary = primary;
    Ok(run)
}

/// Keys per latency client, each client its own (`latN-K`): the guest's key-value table has
/// 256 slots and no deletions, so every client's keys stay for the primary's whole run.
const LATENCY_KEYS: u32 = 3;
/// Keys of a fill client run (only its non-FILL requests use them).
const FILL_KEYS: u32 = 4;
/// Fill client runs per primary (one, restarted if it fails).
const MAX_FILL_RUNS: u64 = 3;
/// Keys the bench may use in one primary's run, below the guest's 256 slots.
const KEY_BUDGET: u32 = 240;

/// The log lines that say a join ended without protection.
const JOIN_FAILED: [&str; 3] = [
    "a join failed",
    "the join did not complete",
    "the joined backup's channel",
];

/// One size: every join, then the primary stopped and its summary read.
fn run_size(args: &JoinArgs, ftvm: &Path, mem_mib: u64) -> anyhow::Result<JoinRow> {
    let n = args.warmup + args.joins;
    // The calibration client and one per join; fill client runs are checked as they start.
    // Each join has two latency clients (the control without a join, then the one across it),
    // each on keys of its own: a client's model starts from absent keys.
    let keys = (2 * n + 1) * LATENCY_KEYS + MAX_FILL_RUNS as u32 * FILL_KEYS;
    ensure!(
        keys <= KEY_BUDGET,
        "{n} joins need {keys} distinct keys in the guest's 256-slot table (no deletions) for          their latency clients; at most {} joins per size",
        ((KEY_BUDGET - MAX_FILL_RUNS as u32 * FILL_KEYS) / LATENCY_KEYS - 1) / 2
    );
    let mut run = start_run(args, ftvm, mem_mib)?;
    let step = args.step();
    run.keep_filling()?;
    // The latency client's rate, to size each join's client to outlast the join.
    let cal = run.client_to_end(300, "cal")?;
    ensure!(
        cal.errors() == 0,
        "the calibration client saw errors: {:?}",
        cal.first_error
    );
    let mut rate = cal.throughput.max(50.0);
    eprintln!(
        "bench join: {mem_mib} MiB guest, primary up (joins at {}), latency client {rate:.0} req/s{}",
        run.join_addr,
        if args.keep {
            format!("; logs kept in {}", run.site.dir.display())
        } else {
            String::new()
        }
    );
    let link = match args.join_addr {
        JoinLink::Unix => bulk::Link::Unix(run.site.path("bulk.sock")),
        JoinLink::Tcp => bulk::Link::Tcp,
    };
    let mut expected_s = (stats::total_target_ms(mem_mib) / 1e3).max(0.5);
    let mut seen = Vec::new();
    let mut progress =
        ftvm_metrics::progress::Progress::new(&format!("{mem_mib} MiB"), u64::from(n), "joins")
            .no_plain_lines();
    for i in 0..n {
        run.keep_filling()?;
        let raw = bulk::copy(
            &link,
            16 << 20,
            args.raw_mib.max(1) << 20,
            args.primary_core,
            args.joiner_core,
        )
        .context("raw bulk copy")?;
        let raw_mib_s = raw.bytes_per_sec() / f64::from(1 << 20);
        // The control: the join's latency client, run first with no join.
        let requests = ((rate * (2.0 * expected_s + 1.0)) as u64).clamp(200, 5_000_000);
        let base = run.client_to_end(requests, &format!("base{i}"))?;
        let failed_before: usize = JOIN_FAILED
            .iter()
            .map(|w| run.primary.count_in_log(w))
            .sum();
        let name = format!("joiner{i}");
        let mut jargs = run.common("backup", &name);
        let listen = match args.transport {
            LogMedium::Shm => run.site.path(&format!("{name}.sock")).display().to_string(),
            LogMedium::Tcp => s("127.0.0.1:0"),
        };
        jargs.extend([
            s("--join"),
            run.join_addr.clone(),
            s("--listen"),
            listen,
            s("--core"),
            s(args.joiner_core),
            s("--json"),
            run.site.path(&format!("{name}.json")).display().to_string(),
        ]);
        let t0 = Instant::now();
        let mut joiner = Proc::spawn(&name, ftvm, &jargs)?;
        // The latency client starts once the joiner has its VM and dials the primary (its
        // process start-up is not part of the join), and runs on past the longest join so far.
        let _ = joiner.wait_for_count(&["joining the primary"], 1, step);
        let mut client = Proc::spawn(
            "latency client",
            ftvm,
            &run.client_args(requests, &format!("lat{i}"), false),
        )?;
        // Protected again, and the join service's own line with its numbers (either order).
        let deadline = Instant::now() + step;
        let outcome = loop {
            let protected = run.primary.count_in_log("protected again") > i as usize;
            let line = run.primary.count_in_log("a backup joined at exit") > i as usize;
            if protected && line {
                break Ok(());
            }
            let failed: usize = JOIN_FAILED
                .iter()
                .map(|w| run.primary.count_in_log(w))
                .sum();
            if failed > failed_before {
                break Err("the primary says the join failed");
            }
            if run.primary.exited() {
                break Err("the primary exited");
            }
            if joiner.exited() && !protected {
                // Its last words may still be on the way to the primary's log.
                std::thread::sleep(Duration::from_millis(200));
                if run.primary.count_in_log("protected again") > i as usize {
                    continue;
                }
                break Err("the joiner exited before the pair was protected");
            }
            if Instant::now() >= deadline {
                break Err("no protection within the step timeout");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let seen_protected_ms = t0.elapsed().as_secs_f64() * 1e3;
        let covered = !client.exited();
        if let Err(why) = outcome {
            let _ = joiner.wait(Duration::from_secs(5));
            let what = if i > 0 {
                format!(
                    "join {} of {n} at {mem_mib} MiB failed after {i} successful join(s), each \
                     followed by SIGKILL of the joined backup and the primary winning the next \
                     epoch: {why}. This is the primary's join handling after losing a joined \
                     backup (not worked around in the bench).",
                    i + 1
                )
            } else {
                format!("the first join at {mem_mib} MiB failed: {why}")
            };
            let report = run.site.path("failure.txt");
            let text = format!(
                "{what}\n\n--- primary log ---\n{}\n--- {name} log ---\n{}\n",
                run.primary.log(),
                joiner.log()
            );
            let _ = std::fs::write(&report, &text);
            run.site.keep = true;
            bail!(
                "{what}\nlogs in {}\n--- primary log (last 30 lines) ---\n{}\n--- {name} log (last 30 lines) ---\n{}",
                run.site.dir.display(),
                tail(&run.primary.log(), 30),
                tail(&joiner.log(), 30)
            );
        }
        let (pause, total) = run
            .primary
            .log()
            .lines()
            .filter_map(parse_joined_line)
            .nth(i as usize)
            .unwrap_or((f64::NAN, f64::NAN));
        if total.is_finite() {
            expected_s = expected_s.max(total / 1e3);
        }
        // The client runs on a while after the join; its end is the join's latency report.
        let code = client
            .wait(step)?
            .with_context(|| format!("the latency client did not finish:\n{}", client.log()))?;
        let c = match parse_client(&client.stdout()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("  latency client (exit {code}): {e:#}; counted as one error");
                ClientReport {
                    responses_bad: 1,
                    max_response_ms: f64::NAN,
                    ..Default::default()
                }
            }
        };
        if c.errors() > 0 {
            let _ = std::fs::write(
                run.site.path(&format!("lat{i}.out")),
                format!("{}\n--- log ---\n{}", client.stdout(), client.log()),
            );
            eprintln!(
                "  latency client {i}: {} errors, first: {}",
                c.errors(),
                c.first_error.as_deref().unwrap_or("-")
            );
        }
        if c.seconds > 0.0 && c.requests > 0 {
            rate = (c.requests as f64 / c.seconds).max(50.0);
        }
        // Lose the joined backup; the primary must see it and serve on in a new epoch.
        if joiner.count_in_log("won epoch") > 0 {
            run.site.keep = true;
            let _ = std::fs::write(run.site.path(&format!("{name}.log")), joiner.log());
            bail!(
                "joined backup {name} took over from the live primary before the bench killed it \
                 (a false failover; the primary is deposed); logs in {}\n--- {name} log (last 10 lines) ---\n{}",
                run.site.dir.display(),
                tail(&joiner.log(), 10)
            );
        }
        let killed = Instant::now();
        joiner.kill()?;
        let _ = std::fs::write(run.site.path(&format!("{name}.log")), joiner.log());
        let lost = run
            .primary
            .wait_for_count(&["continuing unreplicated"], i as usize + 1, step);
        let Some(lost_at) = lost else {
            run.site.keep = true;
            bail!(
                "after SIGKILL of joined backup {name}, the primary did not say it serves on \
                 alone (\"continuing unreplicated\") within {step:?}; logs in {}\n--- primary log (last 30 lines) ---\n{}",
                run.site.dir.display(),
                tail(&run.primary.log(), 30)
            );
        };
        let loss_seen_ms = lost_at.duration_since(killed).as_secs_f64() * 1e3;
        progress.println(&format!(
            "  {mem_mib} MiB join {}/{n}{}: pause {pause:.2} ms, total {total:.0} ms (seen {seen_protected_ms:.0} ms), \
             raw {raw_mib_s:.0} MiB/s, client max {:.1} ms (without a join {:.1} ms), {} errors{}; loss seen in {loss_seen_ms:.0} ms",
            i + 1,
            if i < args.warmup { " (warm-up)" } else { "" },
            c.max_response_ms,
            base.max_response_ms,
            c.errors(),
            if covered { "" } else { " (client ended before protection)" }
        ));
        progress.set(u64::from(i) + 1);
        if !covered {
            expected_s *= 2.0;
        }
        seen.push((
            i,
            raw_mib_s,
            c,
            base.max_response_ms,
            covered,
            seen_protected_ms,
            loss_seen_ms,
        ));
    }
    // Stop everything; the primary writes its summary as it stops.
    if let Some(mut f) = run.fill.take() {
        f.kill()?;
    }
    run.primary.signal(libc::SIGTERM)?;
    let code = run.primary.wait(step)?;
    run.front.signal(libc::SIGTERM)?;
    let _ = run.front.wait(Duration::from_secs(5));
    for (name, p) in [("primary", &run.primary), ("front", &run.front)] {
        let _ = std::fs::write(run.site.path(&format!("{name}.log")), p.log());
    }
    let json_path = run.site.path("primary.json");
    let bytes = std::fs::read(&json_path).with_context(|| {
        format!(
            "{} (the primary exited {code:?}):\n{}",
            json_path.display(),
            tail(&run.primary.log(), 30)
        )
    })?;
    let summary: PrimarySummary =
        serde_json::from_slice(&bytes).with_context(|| format!("{}", json_path.display()))?;
    if let Some(e) = &summary.error {
        eprintln!("  the primary's summary reports an error: {e}");
    }
    let reports: Vec<&PrimaryJoin> = summary.joins.iter().filter(|j| j.joined).collect();
    if let Some(bad) = summary.joins.iter().find(|j| !j.joined) {
        eprintln!("  the primary's summary has a failed join: {:?}", bad.error);
    }
    ensure!(
        reports.len() == seen.len(),
        "the primary's summary has {} completed joins, the bench saw {}",
        reports.len(),
        seen.len()
    );
    let samples: Vec<JoinSample> = seen
        .into_iter()
        .zip(reports)
        .map(
            |((i, raw_mib_s, c, base_ms, covered, seen_ms, loss_ms), r)| {
                let join_mib_s =
                    r.bytes as f64 / f64::from(1 << 20) / (r.total_ms / 1e3).max(f64::MIN_POSITIVE);
                JoinSample {
                    index: i,
                    warmup: i < args.warmup,
                    pause_ms: r.pause_ms,
                    total_ms: r.total_ms,
                    bytes: r.bytes,
                    rounds: r.rounds.len(),
                    final_pages: r.final_pages,
                    finish_ms: r.finish_ms,
                    verdict_ms: r.verdict_ms,
                    channel_ms: r.channel_ms,
                    finish_dirty_log_ms: r.finish_dirty_log_ms,
                    finish_pages_ms: r.finish_pages_ms,
                    auth_ms: r.auth_ms,
                    rounds_ms: r.rounds_ms,
                    catch_up_ms: r.catch_up_ms,
                    stop_ms: r.stop_ms,
                    raw_mib_s,
                    join_mib_s,
                    bw_ratio: join_mib_s / raw_mib_s.max(f64::MIN_POSITIVE),
                    client_max_response_ms: c.max_response_ms,
                    client_base_max_ms: base_ms,
                    client_errors: c.errors(),
                    client_requests: c.requests,
                    client_covered: covered,
                    seen_protected_ms: seen_ms,
                    loss_seen_ms: loss_ms,
                }
            },
        )
        .collect();
    Ok(row(args, mem_mib, samples, run.fill_failures))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn row(args: &JoinArgs, mem_mib: u64, samples: Vec<JoinSample>, fill_failures: u64) -> JoinRow {
    let measured: Vec<&JoinSample> = samples.iter().filter(|s| !s.warmup).collect();
    let pick = |f: fn(&JoinSample) -> f64| measured.iter().map(|s| f(s)).collect::<Vec<f64>>();
    let pause = pick(|s| s.pause_ms);
    let total = pick(|s| s.total_ms);
    let n = measured.len().max(1) as f64;
    let pause_max = stats::max(&pause);
    let total_max = stats::max(&total);
    let client_max = stats::max(&pick(|s| s.client_max_response_ms));
    let client_errors = measured.iter().map(|s| s.client_errors).sum();
    let pause_target = stats::pause_target_ms(mem_mib);
    let pause_p99 = stats::percentile_ms(&pause, 0.99);
    let total_target = stats::total_target_ms(mem_mib);
    JoinRow {
        mem_mib,
        join_addr: args.join_addr,
        transport: args.transport,
        channel_crypto: args.channel_crypto.to_string(),
        joins: measured.len(),
        pause_p50_ms: stats::percentile_ms(&pause, 0.5),
        pause_p99_ms: pause_p99,
        pause_max_ms: pause_max,
        total_p50_ms: stats::percentile_ms(&total, 0.5),
        total_p99_ms: stats::percentile_ms(&total, 0.99),
        total_max_ms: total_max,
        mib_per_join: measured.iter().map(|s| s.bytes as f64).sum::<f64>() / n / f64::from(1 << 20),
        rounds_mean: measured.iter().map(|s| s.rounds as f64).sum::<f64>() / n,
        raw_mib_s_median: stats::median(&pick(|s| s.raw_mib_s)),
        bw_ratio_median: stats::median(&pick(|s| s.bw_ratio)),
        client_max_response_ms: client_max,
        client_base_max_ms: stats::max(&pick(|s| s.client_base_max_ms)),
        client_errors,
        client_uncovered: measured.iter().filter(|s| !s.client_covered).count(),
        fill_client_failures: fill_failures,
        pause_target_ms: pause_target,
        pause_pass: pause_target.map(|t| pause_p99 <= t),
        total_target_ms: total_target,
        total_pass: total_max <= total_target,
        client_pass: client_errors == 0
            && client_max <= pause_max + stats::CLIENT_SLACK_MS
            && measured.iter().all(|s| s.client_covered),
        samples,
    }
}

pub fn run(args: &JoinArgs) -> anyhow::Result<()> {
    let ftvm = ftvm_binary(args.ftvm.as_deref())?;
    ensure!(!args.mem_mib.is_empty(), "--mem-mib: no sizes");
    println!(
        "join to a running primary under load: {} measured joins per size after {} warm-up, join stream over {}, log over {}, \
         fill client {}% FILLs of {} pages (window {}), raw bulk copy of {} MiB before each join; {}",
        args.joins,
        args.warmup,
        match args.join_addr {
            JoinLink::Unix => "a Unix socket",
            JoinLink::Tcp => "loopback TCP",
        },
        match args.transport {
            LogMedium::Shm => "shm",
            LogMedium::Tcp => "tcp",
        },
        args.fill_percent,
        args.fill_pages,
        args.fill_window,
        args.raw_mib,
        ftvm.display()
    );
    let mut rows = Vec::new();
    for &m in &args.mem_mib {
        let r = run_size(args, &ftvm, m).with_context(|| format!("bench join at {m} MiB"))?;
        rows.push(r);
    }
    print_table(&rows);
    write_outputs(args, &rows)
}

fn print_table(rows: &[JoinRow]) {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:>6} {:>5} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>8} {:>6} | {:>8} {:>6} | {:>9} {:>7} {:>4} | pause total client",
        "MiB", "joins", "pause50", "p99", "max", "total50", "p99", "max", "MiB/join", "rounds",
        "raw MiB/s", "bw/raw", "client ms", "no join", "errs"
    );
    for r in rows {
        let _ = writeln!(
            t,
            "{:>6} {:>5} | {:>8.2} {:>8.2} {:>8.2} | {:>8.0} {:>8.0} {:>8.0} | {:>8.1} {:>6.1} | {:>8.0} {:>6.3} | {:>9.1} {:>7.1} {:>4} | {} (p99 ≤ {}) {} (≤ {:.0} ms) {} (≤ pause max + {} ms, 0 errors{})",
            r.mem_mib,
            r.joins,
            r.pause_p50_ms,
            r.pause_p99_ms,
            r.pause_max_ms,
            r.total_p50_ms,
            r.total_p99_ms,
            r.total_max_ms,
            r.mib_per_join,
            r.rounds_mean,
            r.raw_mib_s_median,
            r.bw_ratio_median,
            r.client_max_response_ms,
            r.client_base_max_ms,
            r.client_errors,
            stats::verdict(r.pause_pass),
            r.pause_target_ms
                .map_or_else(|| s("-"), |t| format!("{t:.0} ms")),
            stats::verdict(Some(r.total_pass)),
            r.total_target_ms,
            stats::verdict(Some(r.client_pass)),
            stats::CLIENT_SLACK_MS,
            if r.client_uncovered > 0 {
                format!("; {} join(s) not covered by the client", r.client_uncovered)
            } else {
                String::new()
            },
        );
    }
    let _ = writeln!(
        t,
        "(pause/total: the primary's clock, ms; bw/raw: median over joins of (bytes/total) / raw bulk copy just before; \
         client ms: the largest response time of the latency clients across the joins; no join: of the same clients run just before each join)"
    );
    print!("{t}");
}

fn write_outputs(args: &JoinArgs, rows: &[JoinRow]) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::json!({
        "rows": rows,
        "targets": {
            "pause_p99_ms": "≤ 10 up to 256 MiB, ≤ 20 up to 1 GiB",
            "total_ms": "≤ 1000 × MiB / 1024 (every join)",
            "client": "max response ≤ pause max + 10 ms, 0 errors",
        },
    });
    let path = args.out.join("join.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    let path = args.out.join("join.csv");
    crate::report::write_csv(&path, rows)?;
    println!("wrote {}", path.display());
    let per_join: Vec<serde_json::Value> = rows
        .iter()
        .flat_map(|r| {
            r.samples.iter().map(move |s| {
                let mut v = serde_json::json!({ "mem_mib": r.mem_mib });
                if let (Some(o), Ok(serde_json::Value::Object(f))) =
                    (v.as_object_mut(), serde_json::to_value(s))
                {
                    o.extend(f);
                }
                v
            })
        })
        .collect();
    let path = args.out.join("joins.csv");
    crate::report::write_csv(&path, &per_join)?;
    println!("wrote {}", path.display());
    let path = args.out.join("join.svg");
    let point = |f: fn(&JoinRow) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.mem_mib as f64, f(r))).collect()
    };
    let series = vec![
        crate::report::Series::new("pause p50", "#1f77b4", point(|r| r.pause_p50_ms)),
        crate::report::Series::new("pause p99", "#aec7e8", point(|r| r.pause_p99_ms)),
        crate::report::Series::new("total p50", "#ff7f0e", point(|r| r.total_p50_ms)),
        crate::report::Series::new("total max", "#ffbb78", point(|r| r.total_max_ms)),
        crate::report::Series::new("total target", "#999", point(|r| r.total_target_ms)).dashed(),
    ];
    crate::report::write_lines_svg(
        &path,
        &format!(
            "ftvm join under load: pause and total vs guest memory ({} joins per size)",
            args.joins
        ),
        "guest memory, MiB",
        &series,
    )?;
    println!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primarys_join_line_parses() {
        let line = "2026-01-01T00:00:00.000Z  INFO vmm::join: a backup joined at exit 4242: pause 7.31 ms \
                    (state 2.10, joiner's check 1.20, channel 4.01), 1571 ms in all, 5 rounds, 546.2 MiB";
        assert_eq!(parse_joined_line(line), Some((7.31, 1571.0)));
        assert_eq!(
            parse_joined_line("INFO protected again: the log goes on"),
            None
        );
        assert_eq!(
            parse_joined_line("a backup joined at exit 1: pause x ms"),
            None
        );
    }

    #[test]
    fn client_and_primary_reports_parse_with_missing_fields() {
        let c = parse_client(
            "{\n  \"requests\": 10,\n  \"responses_ok\": 9,\n  \"responses_bad\": 1,\n  \"max_response_ms\": 3.5,\n  \"new_field\": 1\n}\n",
        )
        .expect("client report");
        assert_eq!(c.errors(), 1);
        assert_eq!(c.max_response_ms, 3.5);
        let lost = parse_client(
            r#"{"requests": 10, "responses_ok": 8, "responses_bad": 0, "acknowledged_lost": 2}"#,
        )
        .expect("client report");
        assert_eq!(lost.errors(), 4);
        assert!(parse_client("error: no service").is_err());
        assert!(parse_client("{ truncated").is_err());
        let p: PrimarySummary = serde_json::from_str(
            r#"{"role":"primary","joins":[{"joined":true,"pause_ms":5.5,"total_ms":900.0,"bytes":1048576,"rounds":[{},{}]},{"joined":false,"error":"refused"}]}"#,
        )
        .expect("primary summary");
        assert_eq!(p.joins.len(), 2);
        assert_eq!(p.joins[0].rounds.len(), 2);
        assert!(!p.joins[1].joined);
    }
}
