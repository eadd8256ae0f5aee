//! Output-commit latency: the time from the primary appending an output marker (behind an
//! input entry of `--payload` bytes) until it sees the backup's ACK for it — the wait every
//! guest output pays under the output rule. The primary (this thread) and the backup (a second
//! thread running the real channel over the real medium) are pinned to different cores. In the
//! same run the raw medium's own ping-pong of the same payload is measured, so each row is also
//! a ratio: what the protocol costs over the medium.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use logfmt::{ControlOp, Entry, Event, Position};
use serde::Serialize;
use transport::auth::ChannelCrypto;
#[cfg(feature = "dpdk")]
use transport::dpdk;
use transport::{BackupLink, ChannelConfig, PollPolicy, PreSharedKey, PrimaryLink};

use crate::raw::memif::Kind;
#[cfg(feature = "dpdk")]
use crate::raw::memif::MemifPair;
use crate::raw::{self, RawConfig, RawMedium};

/// Media the commit benchmark knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Medium {
    /// Kernel TCP on loopback, waits sleep in poll(2).
    Tcp,
    /// Kernel TCP on loopback, busy-polled non-blocking sockets.
    TcpSpin,
    /// A ring in memory shared by the two sides.
    Shm,
    /// Raw Ethernet frames over two DPDK `net_memif` ports joined to each other (one EAL in
    /// this process, set up on first use; TCP control connection on loopback).
    DpdkMemif,
    /// One-sided RDMA writes over a reliable-connected queue pair: the primary on device A, the
    /// backup on device B, TCP handshake on B's address (`FTVM_RDMA_DEV/GID/IP_A/B`); needs the
    /// bench built with `--features rdma`.
    Rdma,
    /// The same over `net_af_packet` ports on the two ends of veth pair `ftvm-ap0`/`ftvm-ap1`
    /// (created by the benchmark if missing; needs root).
    DpdkAfPacket,
    /// The same over `net_af_xdp` ports on the two ends of veth pair `ftvm-xd0`/`ftvm-xd1`
    /// (created by the benchmark if missing, like the hugepages; needs root).
    DpdkAfXdp,
}

impl Medium {
    /// The medium's name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Medium::Tcp => "tcp",
            Medium::TcpSpin => "tcp-spin",
            Medium::Shm => "shm",
            Medium::DpdkMemif => "dpdk-memif",
            Medium::Rdma => "rdma",
            Medium::DpdkAfPacket => "dpdk-af-packet",
            Medium::DpdkAfXdp => "dpdk-af-xdp",
        }
    }

    fn is_dpdk(self) -> bool {
        self.dpdk_kind().is_some()
    }

    /// The DPDK port pairs this medium runs on.
    pub fn dpdk_kind(self) -> Option<Kind> {
        match self {
            Medium::DpdkMemif => Some(Kind::Memif),
            Medium::DpdkAfPacket => Some(Kind::AfPacket),
            Medium::DpdkAfXdp => Some(Kind::AfXdp),
            _ => None,
        }
    }

    fn raw(self) -> RawMedium {
        match self {
            Medium::Tcp => RawMedium::TcpBlocking,
            Medium::TcpSpin => RawMedium::TcpSpin,
            Medium::Shm => RawMedium::Shm,
            Medium::DpdkMemif => RawMedium::DpdkMemif,
            Medium::Rdma => RawMedium::Rdma,
            Medium::DpdkAfPacket => RawMedium::DpdkAfPacket,
            Medium::DpdkAfXdp => RawMedium::DpdkAfXdp,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct CommitArgs {
    /// Media to measure (comma separated).
    #[arg(long = "transport", value_delimiter = ',', default_value = "tcp-spin")]
    transports: Vec<Medium>,
    /// Bytes of guest input logged before each output marker (and sent each way by the raw
    /// ping-pong).
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Measured commits per medium and round (and as many raw round trips).
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Rounds per medium, each measuring the raw medium and the commit back to back, so that
    /// both see the machine in the same state; each row reports the median of the rounds'
    /// ratios (and of their per-commit overheads) besides the percentiles of all rounds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Commits before measuring, excluded.
    #[arg(long, default_value_t = 10_000)]
    warmup: u64,
    /// Core for the primary.
    #[arg(long, default_value_t = 0)]
    primary_core: usize,
    /// Core for the backup.
    #[arg(long, default_value_t = 1)]
    backup_core: usize,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write the rows as CSV here.
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// Write an SVG bar chart (commit p50/p99 against the raw p50, per medium) here.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Also break each commit down into the steps of its path (time stamps on both sides,
    /// `transport::trace`), printed as p50/mean per step and written to the JSON; needs the
    /// bench built with `--features trace`.
    #[arg(long)]
    trace: bool,
    /// Channel protection modes to measure (comma separated: `auth`, `encrypt`, `none`). With
    /// more than one, each round measures the raw medium and then a commit run per mode, back
    /// to back, and the table adds what `auth` and `encrypt` cost per commit beyond `none`
    /// (median of the rounds).
    #[arg(long, value_delimiter = ',', default_value = "auth")]
    crypto: Vec<ChannelCrypto>,
    #[command(flatten)]
    rdma: RdmaArgs,
}

/// One step of the commit path, as `--trace` reports it.
#[derive(Debug, Serialize)]
struct TraceStep {
    step: &'static str,
    p50_ns: f64,
    mean_ns: f64,
}

/// TSC ticks per nanosecond, from the ticks and the time a run took.
struct TscRate {
    ticks: u64,
    start: Instant,
}

impl TscRate {
    fn begin() -> Self {
        TscRate {
            ticks: transport::trace::stamp(),
            start: Instant::now(),
        }
    }

    fn per_ns(&self) -> f64 {
        let ns = self.start.elapsed().as_nanos().max(1) as f64;
        transport::trace::stamp().wrapping_sub(self.ticks) as f64 / ns
    }
}

/// The measured commits' steps (frames `warmup..warmup + count`), in nanoseconds.
fn trace_steps(args: &CommitArgs, per_ns: f64) -> Vec<TraceStep> {
    let from = args.warmup as usize;
    let to = from + args.count as usize;
    transport::trace::segments(from, to)
        .into_iter()
        .filter(|s| !s.ticks.is_empty())
        .map(|mut s| {
            s.ticks.sort_unstable();
            let ns = |t: i64| t as f64 / per_ns.max(f64::MIN_POSITIVE);
            let mean = s.ticks.iter().map(|&t| ns(t)).sum::<f64>() / s.ticks.len() as f64;
            TraceStep {
                step: s.name,
                p50_ns: ns(s.ticks[s.ticks.len() / 2]),
                mean_ns: mean,
            }
        })
        .collect()
}

/// RDMA devices, named as perftest names them; each overrides the `FTVM_RDMA_*` environment
/// (side A: the primary, side B: the backup).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RdmaArgs {
    /// The primary's RDMA device (perftest `-d`; else `FTVM_RDMA_DEV_A`).
    #[arg(long)]
    rdma_dev: Option<String>,
    /// The primary's GID index (perftest `-x`; else `FTVM_RDMA_GID_A`).
    #[arg(long)]
    gid_index: Option<u8>,
    /// The primary's port (perftest `-i`; default 1).
    #[arg(long)]
    ib_port: Option<u8>,
    /// The backup's RDMA device (else `FTVM_RDMA_DEV_B`).
    #[arg(long)]
    peer_rdma_dev: Option<String>,
    /// The backup's GID index (else `FTVM_RDMA_GID_B`).
    #[arg(long)]
    peer_gid_index: Option<u8>,
    /// The backup's port (default 1).
    #[arg(long)]
    peer_ib_port: Option<u8>,
    /// The IP address the backup's handshake socket binds (else `FTVM_RDMA_IP_B`).
    #[arg(long)]
    peer_ip: Option<std::net::IpAddr>,
}

/// The flags given to `bench commit`, read by [`with_pair`] (which `bench throughput` shares).
static RDMA_ARGS: std::sync::OnceLock<RdmaArgs> = std::sync::OnceLock::new();

#[cfg(feature = "rdma")]
impl RdmaArgs {
    /// One side's device: the flags where given, the environment for the rest.
    fn side(
        side: &str,
        dev: &Option<String>,
        gid: Option<u8>,
        port: Option<u8>,
        ip: Option<std::net::IpAddr>,
    ) -> anyhow::Result<(transport::rdma::RdmaConfig, std::net::IpAddr)> {
        use transport::rdma::RdmaConfig;
        let env = |name: &str| std::env::var(format!("FTVM_RDMA_{name}_{side}")).ok();
        let Some(device) = dev.clone().or_else(|| env("DEV")) else {
            bail!(
                "no RDMA device for side {side}: pass --{}rdma-dev or set FTVM_RDMA_DEV_{side}",
                if side == "A" { "" } else { "peer-" }
            )
        };
        let gid = match gid {
            Some(g) => g,
            None => match env("GID") {
                Some(g) => g
                    .trim()
                    .parse()
                    .with_context(|| format!("FTVM_RDMA_GID_{side} is not a GID index"))?,
                None => bail!(
                    "no GID index for side {side}: pass --{}gid-index or set FTVM_RDMA_GID_{side}",
                    if side == "A" { "" } else { "peer-" }
                ),
            },
        };
        let ip = match ip {
            Some(ip) => ip,
            None => match env("IP") {
                Some(ip) => ip
                    .trim()
                    .parse()
                    .with_context(|| format!("FTVM_RDMA_IP_{side} is not an IP address"))?,
                None => std::net::Ipv4Addr::UNSPECIFIED.into(),
            },
        };
        let mut cfg = RdmaConfig::new(device, gid);
        if let Some(p) = port {
            cfg.ib_port = p;
        }
        Ok((cfg, ip))
    }

    /// (primary device, backup device, the backup's handshake address).
    pub fn resolve(
        &self,
    ) -> anyhow::Result<(
        transport::rdma::RdmaConfig,
        transport::rdma::RdmaConfig,
        std::net::IpAddr,
    )> {
        let (a, _) = Self::side("A", &self.rdma_dev, self.gid_index, self.ib_port, None)?;
        let (b, ip) = Self::side(
            "B",
            &self.peer_rdma_dev,
            self.peer_gid_index,
            self.peer_ib_port,
            self.peer_ip,
        )?;
        Ok((a, b, ip))
    }
}

/// One row of results; later media add rows with the same fields.
#[derive(Debug, Serialize)]
pub struct CommitRow {
    transport: String,
    /// The channel protection mode (`auth`, `none`).
    crypto: String,
    payload_bytes: usize,
    count: u64,
    commit_p50_us: f64,
    commit_p90_us: f64,
    commit_p99_us: f64,
    commit_p999_us: f64,
    commit_max_us: f64,
    raw_p50_us: f64,
    raw_p99_us: f64,
    /// Bytes the raw ping-pong sent each way (for DPDK: one commit's DATA and ACK packets,
    /// after the Ethernet header).
    raw_request_bytes: usize,
    raw_reply_bytes: usize,
    overhead_ratio_p50: f64,
    /// Median over the rounds of (commit p50 / raw p50 of the same round).
    ratio_median: f64,
    /// Median over the rounds of (commit p50 − raw p50 of the same round), ns: what one commit
    /// costs beyond the medium's own round trip.
    overhead_ns_median: f64,
    rounds: Vec<Round>,
}

/// One round: the raw medium and the commit, measured back to back.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Round {
    raw_p50_us: f64,
    commit_p50_us: f64,
    ratio: f64,
    overhead_ns: f64,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

pub fn channel_config(medium: Medium, crypto: ChannelCrypto) -> anyhow::Result<ChannelConfig> {
    let key = PreSharedKey::new(b"ftvm-bench-pre-shared-key".to_vec())?;
    let mut cfg = ChannelConfig::new(0xBE7C, 1, key);
    cfg.crypto = crypto;
    cfg.blocking = medium == Medium::Tcp;
    cfg.poll = PollPolicy::BUSY;
    if medium == Medium::Rdma {
        // Soft-RoCE does the NIC's work in the kernel (softirq, often in ksoftirqd) on the same
        // CPUs as the two spinning threads: a long pure spin starves it until the scheduler
        // tick, which measured p90 3.3 ms / p99 8.8 ms in the 2-vCPU guest. Yield after a short
        // spin instead (never sleep), as the raw ping-pong does.
        cfg.poll = PollPolicy {
            spins: 256,
            yields: u32::MAX,
            ..PollPolicy::BUSY
        };
    }
    cfg.heartbeat_timeout = Duration::from_secs(2);
    Ok(cfg)
}

fn pin(core: usize) {
    crate::pin::pin_current(core, "commit benchmark thread");
}

pub fn run(args: &CommitArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    println!(
        "output commit latency: {} B input + output marker per commit, {} commits after {} warm-up, primary core {}, backup core {}, frame CRC32C by {}",
        args.payload,
        args.count,
        args.warmup,
        args.primary_core,
        args.backup_core,
        logfmt::crc::implementation().name()
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} | {:>9} {:>9} | {:>7} {:>9} | raw bytes out/back",
        "transport",
        "p50 µs",
        "p90",
        "p99",
        "p99.9",
        "max",
        "raw p50",
        "raw p99",
        "ratio",
        "extra ns"
    );
    println!(
        "({} rounds per medium, raw medium then commit in each; ratio and extra ns: medians of the rounds' \
         p50 ratio and p50 difference; percentiles over all rounds)",
        args.rounds
    );
    let kinds: Vec<Kind> = args
        .transports
        .iter()
        .filter_map(|m| m.dpdk_kind())
        .collect();
    raw::memif::want(&kinds)?;
    raw::memif::want_memif_channels(args.rounds as usize);
    if args.trace && !cfg!(feature = "trace") {
        bail!("--trace needs the bench built with the trace feature (cargo build --release -p bench --features trace)");
    }
    let mut rows = Vec::new();
    let mut traces = serde_json::Map::new();
    let mut auth_costs = serde_json::Map::new();
    let mut encrypt_costs = serde_json::Map::new();
    let _ = RDMA_ARGS.set(args.rdma.clone());
    #[cfg(feature = "rdma")]
    let rdma_devices = if args.transports.contains(&Medium::Rdma) {
        let (a, b, _) = args.rdma.resolve()?;
        Some((a, b))
    } else {
        None
    };
    for &medium in &args.transports {
        // Over DPDK the raw ping-pong moves exactly the bytes one commit puts on the wire: a
        // DATA packet with the whole log frame one way, an ACK packet back. (The other media
        // echo `--payload` bytes each way.)
        let (payload, reply) = if medium.is_dpdk() {
            #[cfg(not(feature = "dpdk"))]
            bail!("--transport {}: {}", medium.name(), raw::NO_DPDK);
            #[cfg(feature = "dpdk")]
            {
                // With `auth` the frame has its trailer and the ACK its seal.
                let auth = args.crypto.iter().any(|c| c.seals());
                let (trailer, seal) = if auth {
                    (transport::auth::TRAILER_LEN, transport::auth::ACK_SEAL_LEN)
                } else {
                    (0, 0)
                };
                let frame = commit_frame_len(args.payload)? + trailer;
                (frame + dpdk::DATA_HEADER_LEN, Some(dpdk::ACK_LEN + seal))
            }
        } else {
            (args.payload.max(8), None)
        };
        let raw_config = RawConfig {
            payload,
            reply,
            count: args.count,
            warmup: args.warmup,
            client_core: Some(args.primary_core),
            server_core: Some(args.backup_core),
            #[cfg(feature = "rdma")]
            rdma: rdma_devices.clone(),
        };
        let raw_ping_pong = || {
            raw::ping_pong(medium.raw(), &raw_config)
                .with_context(|| format!("raw ping-pong over {}", medium.name()))
        };
        let measure = |crypto: ChannelCrypto| -> anyhow::Result<(Histogram<u64>, Vec<TraceStep>)> {
            if args.trace {
                // Every frame of the run gets a row: warm-up, measured, and the last ones.
                transport::trace::start((args.warmup + args.count) as usize + 64);
            }
            let rate = TscRate::begin();
            let commit = measure_commit(medium, crypto, args)
                .with_context(|| format!("commit latency over {} ({crypto})", medium.name()))?;
            let steps = if args.trace {
                trace_steps(args, rate.per_ns())
            } else {
                Vec::new()
            };
            Ok((commit, steps))
        };
        let modes = &args.crypto;
        let mut commit = Vec::new();
        let mut steps = Vec::new();
        let mut rounds = Vec::new();
        for _ in modes {
            commit.push(Histogram::<u64>::new(3)?);
            steps.push(Vec::new());
            rounds.push(Vec::new());
        }
        let mut raw = Histogram::<u64>::new(3)?;
        // A channel over DPDK closes its ports: a veth end gives one channel per process.
        let n_rounds = match medium.dpdk_kind() {
            Some(kind) if kind.channels() < args.rounds as usize * modes.len() => {
                let n = (kind.channels() / modes.len()).max(1);
                println!(
                    "  {}: {n} round(s) only (one channel per veth end and process)",
                    medium.name(),
                );
                n as u32
            }
            _ => args.rounds,
        };
        for round in 0..n_rounds {
            // The channel closes its DPDK ports when it is done, and the raw ping-pong gives
            // its pair back: the raw medium goes first, so both run over the same two ports.
            let r = raw_ping_pong()?;
            let raw_p50 = us(&r, 0.5);
            raw.add(&r)?;
            for (m, &crypto) in modes.iter().enumerate() {
                let (c, s) = measure(crypto)?;
                let commit_p50 = us(&c, 0.5);
                let this = Round {
                    raw_p50_us: raw_p50,
                    commit_p50_us: commit_p50,
                    ratio: commit_p50 / raw_p50.max(f64::MIN_POSITIVE),
                    overhead_ns: (commit_p50 - raw_p50) * 1e3,
                };
                if n_rounds > 1 || modes.len() > 1 {
                    println!(
                        "  {} ({crypto}) round {}/{}: raw p50 {:.2} µs, commit p50 {:.2} µs, ratio {:.2}",
                        medium.name(),
                        round + 1,
                        n_rounds,
                        this.raw_p50_us,
                        this.commit_p50_us,
                        this.ratio
                    );
                }
                rounds[m].push(this);
                commit[m].add(&c)?;
                steps[m] = s;
            }
        }
        // What `auth` and `encrypt` add to a commit beyond `none`, round by round.
        let at = |c: ChannelCrypto| modes.iter().position(|&m| m == c);
        let cost_of = |c: ChannelCrypto| match (at(c), at(ChannelCrypto::None)) {
            (Some(a), Some(n)) => Some(median(
                rounds[a]
                    .iter()
                    .zip(&rounds[n])
                    .map(|(a, n)| (a.commit_p50_us - n.commit_p50_us) * 1e3)
                    .collect(),
            )),
            _ => None,
        };
        let costs = [
            (ChannelCrypto::Auth, cost_of(ChannelCrypto::Auth)),
            (ChannelCrypto::Encrypt, cost_of(ChannelCrypto::Encrypt)),
        ];
        for (m, &crypto) in modes.iter().enumerate() {
            let (commit, steps, rounds) = (&commit[m], &steps[m], std::mem::take(&mut rounds[m]));
            let row = CommitRow {
                transport: if modes.len() > 1 {
                    format!("{} ({crypto})", medium.name())
                } else {
                    medium.name().into()
                },
                crypto: crypto.name().into(),
                payload_bytes: args.payload,
                count: args.count,
                commit_p50_us: us(commit, 0.5),
                commit_p90_us: us(commit, 0.9),
                commit_p99_us: us(commit, 0.99),
                commit_p999_us: us(commit, 0.999),
                commit_max_us: commit.max() as f64 / 1000.0,
                raw_p50_us: us(&raw, 0.5),
                raw_p99_us: us(&raw, 0.99),
                raw_request_bytes: payload,
                raw_reply_bytes: reply.unwrap_or(payload),
                overhead_ratio_p50: us(commit, 0.5) / us(&raw, 0.5).max(f64::MIN_POSITIVE),
                ratio_median: median(rounds.iter().map(|r| r.ratio).collect()),
                overhead_ns_median: median(rounds.iter().map(|r| r.overhead_ns).collect()),
                rounds,
            };
            println!(
            "{:<14} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.1} | {:>9.2} {:>9.2} | {:>7.2} {:>9.0} | {}/{}",
            row.transport,
            row.commit_p50_us,
            row.commit_p90_us,
            row.commit_p99_us,
            row.commit_p999_us,
            row.commit_max_us,
            row.raw_p50_us,
            row.raw_p99_us,
            row.ratio_median,
            row.overhead_ns_median,
            row.raw_request_bytes,
            row.raw_reply_bytes
        );
            if args.trace {
                println!(
                    "  {} step by step (p50 / mean, ns per commit):",
                    row.transport
                );
                for step in steps {
                    println!(
                        "    {:<32} {:>9.0} {:>9.0}",
                        step.step, step.p50_ns, step.mean_ns
                    );
                }
                traces.insert(row.transport.clone(), serde_json::to_value(steps)?);
            }
            for (mode, cost) in costs {
                let (Some(cost), true) = (cost, crypto == mode) else {
                    continue;
                };
                println!(
                    "  {}: {mode} costs {cost:+.0} ns per commit over none (median of {n_rounds} rounds' p50 differences)",
                    medium.name()
                );
                let into = if mode == ChannelCrypto::Auth {
                    &mut auth_costs
                } else {
                    &mut encrypt_costs
                };
                into.insert(medium.name().to_string(), serde_json::json!(cost));
            }
            rows.push(row);
        }
    }
    if let Some(path) = &args.json {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut json = serde_json::json!({
            "rows": rows,
            "auth_cost_ns": auth_costs,
            "encrypt_cost_ns": encrypt_costs,
            "frame_crc32c": logfmt::crc::implementation().name(),
        });
        if args.trace {
            json["trace"] = serde_json::Value::Object(traces);
        }
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.csv {
        crate::report::write_csv(path, &rows)?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        let groups: Vec<_> = rows
            .iter()
            .map(|r| crate::report::Bars {
                label: r.transport.clone(),
                commit_p50: r.commit_p50_us,
                commit_p99: r.commit_p99_us,
                raw_p50: r.raw_p50_us,
            })
            .collect();
        let title = format!("ftvm output-commit latency, {} B payload", args.payload);
        crate::report::write_svg(path, &title, &groups)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Length of the log frame one commit sends: the input entry of `payload` bytes (if any) and
/// the output marker, as `primary_loop` appends them.
#[cfg(feature = "dpdk")]
fn commit_frame_len(payload: usize) -> anyhow::Result<usize> {
    let input = vec![0xA5u8; payload];
    let mut frame = logfmt::FrameBuf::new(payload + 1024);
    frame.reset(1, 1);
    if payload > 0 {
        frame.push(&Entry::new(
            Position::at_exit(1),
            Event::DeviceInput {
                device: 1,
                data: &input,
            },
        ))?;
    }
    frame.push(&Entry::new(
        Position::at_exit(1),
        Event::OutputMarker {
            device: 2,
            len: payload as u32,
            digest: 0,
        },
    ))?;
    Ok(frame.finish()?.len())
}

/// Runs the backup end until it sees a Shutdown entry.
fn backup_loop<L: BackupLink>(mut backup: transport::Backup<L>) -> anyhow::Result<u64> {
    let mut entries = 0u64;
    let mut done = false;
    while !done {
        // Waits as the channel is configured: busy-polling, or in poll(2) in blocking mode.
        backup.poll_timeout(Duration::from_millis(100), |frame| {
            for entry in frame.entries() {
                entries += 1;
                if entry.event == Event::Control(ControlOp::Shutdown) {
                    done = true;
                }
            }
        })?;
    }
    // Let the primary see the last ACK before this end goes away.
    let until = Instant::now() + Duration::from_millis(50);
    while Instant::now() < until {
        if backup.poll(|_| {}).is_err() {
            break;
        }
    }
    Ok(entries)
}

/// What one measured run of commits does.
#[derive(Debug, Clone, Copy)]
pub struct Commits {
    /// Input bytes per commit (0: the output marker alone).
    pub payload: usize,
    pub warmup: u64,
    pub count: u64,
}

impl From<&CommitArgs> for Commits {
    fn from(a: &CommitArgs) -> Self {
        Commits {
            payload: a.payload,
            warmup: a.warmup,
            count: a.count,
        }
    }
}

/// Commits one by one (an input entry, an output marker, the wait for its ACK), timing each;
/// `after_ack(i, start)` runs after commit `i`'s ACK, inside its time, and says which of the
/// `arms` histograms it goes into (`bench metrics-cost` adds its work there).
pub fn commit_loop<L: PrimaryLink>(
    mut primary: transport::Primary<L>,
    args: &Commits,
    arms: usize,
    mut after_ack: impl FnMut(u64, Instant) -> usize,
) -> anyhow::Result<Vec<Histogram<u64>>> {
    let mut hist = (0..arms.max(1))
        .map(|_| Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3))
        .collect::<Result<Vec<_>, _>>()?;
    let input = vec![0xA5u8; args.payload];
    let mut exit = 0u64;
    for i in 0..args.warmup + args.count {
        exit += 1;
        let start = Instant::now();
        transport::trace::primary(transport::trace::PrimaryPoint::Start);
        if !input.is_empty() {
            primary.append(&Entry::new(
                Position::at_exit(exit),
                Event::DeviceInput {
                    device: 1,
                    data: &input,
                },
            ))?;
        }
        let seq = primary.append(&Entry::new(
            Position::at_exit(exit),
            Event::OutputMarker {
                device: 2,
                len: args.payload as u32,
                digest: i,
            },
        ))?;
        primary.wait_acked(seq)?;
        let arm = after_ack(i, start);
        let took = start.elapsed();
        transport::trace::primary(transport::trace::PrimaryPoint::Done);
        transport::trace::primary_next();
        if i >= args.warmup {
            if let Some(h) = hist.get_mut(arm) {
                h.saturating_record(took.as_nanos() as u64);
            }
        }
    }
    let end = primary.append(&Entry::new(
        Position::at_exit(exit + 1),
        Event::Control(ControlOp::Shutdown),
    ))?;
    primary.wait_acked(end)?;
    Ok(hist)
}

fn primary_loop<L: PrimaryLink>(
    primary: transport::Primary<L>,
    args: &Commits,
) -> anyhow::Result<Histogram<u64>> {
    commit_loop(primary, args, 1, |_, _| 0)?
        .pop()
        .context("the commit loop's histogram")
}

/// Work the primary does once its end of the channel is up; generic over the medium's link.
pub trait PrimaryJob {
    /// What the job measures.
    type Output;
    /// Runs the job on a connected primary.
    fn run<L: PrimaryLink>(self, primary: transport::Primary<L>) -> anyhow::Result<Self::Output>;
}

/// The two sides' medium descriptions for a bench row: the backup's (which listens) and the
/// primary's (which dials the address the backup's listener was given).
fn sides(medium: Medium) -> anyhow::Result<(transport::Medium, transport::Medium)> {
    Ok(match medium {
        Medium::Tcp | Medium::TcpSpin => {
            let m: transport::Medium = "tcp:127.0.0.1:0".parse()?;
            (m.clone(), m)
        }
        Medium::Shm => {
            let socket =
                std::env::temp_dir().join(format!("ftvm-bench-{}.sock", std::process::id()));
            let m = transport::Medium::Shm { socket };
            (m.clone(), m)
        }
        #[cfg(not(feature = "dpdk"))]
        Medium::DpdkMemif | Medium::DpdkAfPacket | Medium::DpdkAfXdp => {
            bail!("--transport {}: {}", medium.name(), raw::NO_DPDK)
        }
        #[cfg(feature = "dpdk")]
        Medium::DpdkMemif | Medium::DpdkAfPacket | Medium::DpdkAfXdp => {
            use transport::medium::{DpdkDevice, DpdkPortSlot};
            let kind = medium.dpdk_kind().context("a DPDK medium")?;
            let MemifPair { server, client } = raw::memif::take(kind)?;
            let side = |port| transport::Medium::Dpdk {
                addr: "127.0.0.1:0".into(),
                device: DpdkDevice {
                    opened: Some(DpdkPortSlot::new(port)),
                    ..DpdkDevice::default()
                },
            };
            (side(server), side(client))
        }
        Medium::Rdma => {
            #[cfg(feature = "rdma")]
            {
                use transport::medium::RdmaDevice;
                let (a, b, ip_b) = RDMA_ARGS.get().cloned().unwrap_or_default().resolve()?;
                let device = |c: &transport::rdma::RdmaConfig| RdmaDevice {
                    device: c.device.clone(),
                    gid_index: c.gid_index,
                    ib_port: c.ib_port,
                };
                let addr = std::net::SocketAddr::new(ip_b, 0).to_string();
                (
                    transport::Medium::Rdma {
                        addr: addr.clone(),
                        device: device(&b),
                    },
                    transport::Medium::Rdma {
                        addr,
                        device: device(&a),
                    },
                )
            }
            #[cfg(not(feature = "rdma"))]
            bail!("the bench was built without the `rdma` feature (cargo build -p bench --features rdma)")
        }
    })
}

/// Sets up a real channel over `medium` through `transport::medium`: the backup end listens in
/// a thread pinned to `backup_core` (consuming until it sees a Shutdown entry), the primary end
/// dials it from this thread, pinned to `primary_core`, and runs `job`.
pub fn with_pair<J: PrimaryJob>(
    medium: Medium,
    crypto: ChannelCrypto,
    primary_core: usize,
    backup_core: usize,
    job: J,
) -> anyhow::Result<J::Output> {
    let (backup_side, primary_side) = sides(medium)?;
    let mut listener = transport::Listener::bind(&backup_side)?;
    let dial = primary_side.with_address(listener.local_addr());
    let cfg = channel_config(medium, crypto)?;
    // Threads that poll DPDK ports are registered lcores (mempool caches).
    let lcore = medium.is_dpdk();
    let backup = std::thread::spawn(move || -> anyhow::Result<u64> {
        pin(backup_core);
        let run = || backup_loop(listener.backup(cfg)?);
        if lcore {
            crate::pin::as_dpdk_lcore(run)
        } else {
            run()
        }
    });
    pin(primary_core);
    let run = || {
        transport::medium::dial_primary(&dial, channel_config(medium, crypto)?)
            .map_err(anyhow::Error::from)
            .and_then(|p| job.run(p))
    };
    let out = if lcore {
        crate::pin::as_dpdk_lcore(run)
    } else {
        run()
    };
    join(backup)?;
    out
}

/// Commits on a connected primary.
struct CommitJob(Commits);

impl PrimaryJob for CommitJob {
    type Output = Histogram<u64>;
    fn run<L: PrimaryLink>(self, primary: transport::Primary<L>) -> anyhow::Result<Histogram<u64>> {
        primary_loop(primary, &self.0)
    }
}

fn measure_commit(
    medium: Medium,
    crypto: ChannelCrypto,
    args: &CommitArgs,
) -> anyhow::Result<Histogram<u64>> {
    with_pair(
        medium,
        crypto,
        args.primary_core,
        args.backup_core,
        CommitJob(args.into()),
    )
}

fn join(handle: std::thread::JoinHandle<anyhow::Result<u64>>) -> anyhow::Result<u64> {
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("backup thread panicked"))?
}
