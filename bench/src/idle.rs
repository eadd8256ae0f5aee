//! `bench idle`: what an idle FT pair costs, and the latency of requests that find it idle, per
//! guest — the interrupt-driven kvstore (waits in `hlt` until the VMM injects an interrupt)
//! next to the same service built to poll NET_RX (`kvstore-polling`), in alternating rounds so
//! that both are measured in the same state of the machine.
//!
//! Per round and guest: (1) an idle pair (real `ftvm backup` and `ftvm primary` processes,
//! cores 1 and 0): CPU time of both processes over `--idle-secs` (from /proc), and the VM exits
//! per second (the primary's exit count at its stop); (2) a new pair under a paced client: one
//! GET every `--interval-us`, so the guest is idle between requests, latency per request into
//! an HDR histogram. Reported: per round and guest, and the median of the per-round ratios
//! against the first guest of `--guests`.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use hdrhistogram::Histogram;

use crate::join::procs::Proc;

/// `bench idle` options.
#[derive(clap::Args, Debug, Clone)]
pub struct IdleArgs {
    /// Guests to compare (`ftvm --guest` names), each optionally with `:US`, the replicas'
    /// `--idle-spin-us`; ratios are against the first.
    #[arg(long, value_delimiter = ',', default_value = "kvstore,kvstore-polling")]
    pub guests: Vec<String>,
    /// Rounds; each measures every guest, in alternating order.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Seconds an idle pair is watched.
    #[arg(long, default_value_t = 5.0)]
    pub idle_secs: f64,
    /// Requests of the paced client per round and guest.
    #[arg(long, default_value_t = 2000)]
    pub requests: u32,
    /// The paced client sends one request every this many microseconds.
    #[arg(long, default_value_t = 2000)]
    pub interval_us: u64,
    /// The `ftvm` binary (default: next to this one).
    #[arg(long)]
    pub ftvm: Option<PathBuf>,
    /// Writes idle.json and idle.csv here.
    #[arg(long, default_value = "target/bench/idle")]
    pub out: PathBuf,
}

/// One guest in one round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdleSample {
    pub round: u32,
    pub guest: String,
    /// CPU of the primary / backup process while idle, percent of one core.
    pub primary_cpu_pct: f64,
    pub backup_cpu_pct: f64,
    /// VM exits per second while idle.
    pub idle_exits_per_s: f64,
    /// Paced requests' latency, µs.
    pub latency_p50_us: f64,
    pub latency_p99_us: f64,
    pub latency_max_us: f64,
    /// Requests that got no answer within a second.
    pub lost: u32,
}

/// The median over rounds of a guest's ratio to the first guest, per measure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdleRatio {
    pub guest: String,
    pub against: String,
    pub pair_cpu: f64,
    pub idle_exits: f64,
    pub latency_p50: f64,
    pub latency_p99: f64,
}

pub fn run(args: &IdleArgs) -> anyhow::Result<()> {
    ensure!(!args.guests.is_empty(), "--guests: none given");
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    let ftvm = crate::join::ftvm_binary(args.ftvm.as_deref())?;
    let mut samples = Vec::new();
    for round in 1..=args.rounds {
        let mut order: Vec<&String> = args.guests.iter().collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for guest in order {
            let s = measure(args, &ftvm, round, guest)
                .with_context(|| format!("round {round}, guest {guest}"))?;
            println!(
                "round {round} {:<16} idle: primary {:5.1} % CPU, backup {:5.1} % CPU, {:7.0} exits/s; paced: p50 {:7.1} µs p99 {:7.1} µs max {:7.1} µs, {} lost",
                s.guest,
                s.primary_cpu_pct,
                s.backup_cpu_pct,
                s.idle_exits_per_s,
                s.latency_p50_us,
                s.latency_p99_us,
                s.latency_max_us,
                s.lost
            );
            samples.push(s);
        }
    }
    let ratios = ratios(&args.guests, &samples);
    for r in &ratios {
        println!(
            "{} / {} (median of per-round ratios): pair CPU {:.3}, idle exits {:.3}, latency p50 {:.3}, p99 {:.3}",
            r.guest, r.against, r.pair_cpu, r.idle_exits, r.latency_p50, r.latency_p99
        );
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json = serde_json::json!({
        "idle_secs": args.idle_secs,
        "requests": args.requests,
        "interval_us": args.interval_us,
        "samples": samples,
        "ratios": ratios,
    });
    let path = args.out.join("idle.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    let path = args.out.join("idle.csv");
    crate::report::write_csv(&path, &samples)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn ratios(guests: &[String], samples: &[IdleSample]) -> Vec<IdleRatio> {
    let Some(base) = guests.first() else {
        return Vec::new();
    };
    let find = |round: u32, guest: &str| {
        samples
            .iter()
            .find(|s| s.round == round && s.guest == guest)
    };
    let rounds: Vec<u32> = {
        let mut r: Vec<u32> = samples.iter().map(|s| s.round).collect();
        r.dedup();
        r
    };
    guests
        .iter()
        .skip(1)
        .map(|g| {
            let per = |f: fn(&IdleSample) -> f64| {
                let v: Vec<f64> = rounds
                    .iter()
                    .filter_map(|&r| Some(f(find(r, g)?) / f(find(r, base)?)))
                    .filter(|x| x.is_finite())
                    .collect();
                crate::join::stats::median(&v)
            };
            IdleRatio {
                guest: g.clone(),
                against: base.clone(),
                pair_cpu: per(|s| s.primary_cpu_pct + s.backup_cpu_pct),
                idle_exits: per(|s| s.idle_exits_per_s),
                latency_p50: per(|s| s.latency_p50_us),
                latency_p99: per(|s| s.latency_p99_us),
            }
        })
        .collect()
}

/// A started pair: the scratch directory (key, socket) and both processes.
struct Pair {
    dir: tempfile::TempDir,
    backup: Proc,
    primary: Proc,
    service: SocketAddr,
    ready_at: Instant,
}

fn start_pair(ftvm: &Path, guest: &str) -> anyhow::Result<Pair> {
    let dir = tempfile::Builder::new()
        .prefix("ftvm-bench-idle-")
        .tempdir()
        .context("a scratch directory")?;
    let key = dir.path().join("key");
    crate::join::write_key(&key)?;
    let sock = dir.path().join("backup.sock");
    let (name, spin) = match guest.split_once(':') {
        Some((n, us)) => (n, Some(us)),
        None => (guest, None),
    };
    let common = |role: &str| -> Vec<String> {
        let mut a = vec![
            role.into(),
            "--key-file".into(),
            key.display().to_string(),
            "--guest".into(),
            name.into(),
        ];
        if let Some(us) = spin {
            a.extend(["--idle-spin-us".into(), us.into()]);
        }
        a
    };
    let mut b = common("backup");
    b.extend(["--listen".into(), sock.display().to_string()]);
    b.extend(["--core".into(), "1".into()]);
    let backup = Proc::spawn("backup", ftvm, &b)?;
    if backup.ready(Duration::from_secs(20))?.is_none() {
        bail!("the backup exited:\n{}", backup.log());
    }
    let mut p = common("primary");
    p.extend(["--backup".into(), sock.display().to_string()]);
    p.extend(["--service".into(), "127.0.0.1:0".into()]);
    p.extend(["--core".into(), "0".into()]);
    let primary = Proc::spawn("primary", ftvm, &p)?;
    let Some(ready) = primary.ready(Duration::from_secs(20))? else {
        bail!("the primary exited:\n{}", primary.log());
    };
    let service = ready
        .addr
        .parse()
        .with_context(|| format!("the primary's service address {:?}", ready.addr))?;
    Ok(Pair {
        dir,
        backup,
        primary,
        service,
        ready_at: Instant::now(),
    })
}

impl Pair {
    /// SIGTERM to the primary (the backup stops at the same logged exit); the primary's exit
    /// count from its last line.
    fn stop(mut self) -> anyhow::Result<u64> {
        self.primary.signal(libc::SIGTERM)?;
        let within = Duration::from_secs(20);
        ensure!(
            self.primary.wait(within)?.is_some(),
            "the primary did not stop"
        );
        ensure!(
            self.backup.wait(within)?.is_some(),
            "the backup did not stop"
        );
        let log = self.primary.log();
        let exits = log
            .lines()
            .rev()
            .find_map(|l| {
                let (before, _) = l.split_once(" exits,")?;
                before.rsplit(' ').next()?.parse::<u64>().ok()
            })
            .with_context(|| format!("no exit count in the primary's log:\n{log}"))?;
        drop(self.dir);
        Ok(exits)
    }
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: libc::pid_t) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name in parentheses (which may hold spaces).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("a /proc stat line without a command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name and state.
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("a short /proc stat line")?
            .parse::<f64>()?)
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ensure!(hz > 0.0, "sysconf(_SC_CLK_TCK) failed");
    Ok((ticks(11)? + ticks(12)?) / hz)
}

fn measure(args: &IdleArgs, ftvm: &Path, round: u32, guest: &str) -> anyhow::Result<IdleSample> {
    // 1. Idle.
    let pair = start_pair(ftvm, guest)?;
    std::thread::sleep(Duration::from_millis(500));
    let (pp, bp) = (pair.primary.pid()?, pair.backup.pid()?);
    let (p0, b0, t0) = (cpu_seconds(pp)?, cpu_seconds(bp)?, Instant::now());
    std::thread::sleep(Duration::from_secs_f64(args.idle_secs));
    let (p1, b1, dt) = (cpu_seconds(pp)?, cpu_seconds(bp)?, t0.elapsed());
    let since_ready = pair.ready_at.elapsed();
    let exits = pair.stop()?;
    let secs = dt.as_secs_f64();

    // 2. Paced requests.
    let pair = start_pair(ftvm, guest)?;
    let (hist, lost) = paced(pair.service, args.requests, args.interval_us)?;
    pair.stop()?;
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    Ok(IdleSample {
        round,
        guest: guest.into(),
        primary_cpu_pct: (p1 - p0) / secs * 100.0,
        backup_cpu_pct: (b1 - b0) / secs * 100.0,
        idle_exits_per_s: exits as f64 / since_ready.as_secs_f64(),
        latency_p50_us: us(0.5),
        latency_p99_us: us(0.99),
        latency_max_us: hist.max() as f64 / 1e3,
        lost,
    })
}

/// One GET (of a key nobody stores) every `interval_us`; the latency of each, ns.
fn paced(
    service: SocketAddr,
    requests: u32,
    interval_us: u64,
) -> anyhow::Result<(Histogram<u64>, u32)> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("the client's socket")?;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
    let mut lost = 0;
    let key = b"idle-probe";
    let mut buf = [0u8; 4096];
    let mut next = Instant::now();
    // A few unmeasured requests first (warm-up).
    for id in 1..=requests + 20 {
        let mut req = Vec::with_capacity(8 + key.len());
        req.extend_from_slice(&id.to_le_bytes());
        req.push(1); // GET
        req.push(key.len() as u8);
        req.extend_from_slice(&0u16.to_le_bytes());
        req.extend_from_slice(key);
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += Duration::from_micros(interval_us);
        let sent = Instant::now();
        socket.send_to(&req, service).context("sending a request")?;
        let answered = loop {
            match socket.recv_from(&mut buf) {
                Ok((n, _)) if n >= 4 && buf[..4] == id.to_le_bytes() => break true,
                Ok(_) => continue, // a late answer to an earlier request
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break false
                }
                Err(e) => return Err(e).context("receiving a response"),
            }
        };
        if id <= 20 {
            continue;
        }
        if answered {
            hist.saturating_record(sent.elapsed().as_nanos() as u64);
        } else {
            lost += 1;
        }
    }
    Ok((hist, lost))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: u32, guest: &str, cpu: f64, p50: f64) -> IdleSample {
        IdleSample {
            round,
            guest: guest.into(),
            primary_cpu_pct: cpu,
            backup_cpu_pct: cpu,
            idle_exits_per_s: cpu * 10.0,
            latency_p50_us: p50,
            latency_p99_us: p50 * 2.0,
            latency_max_us: p50 * 3.0,
            lost: 0,
        }
    }

    #[test]
    fn ratios_are_medians_of_per_round_ratios_against_the_first_guest() {
        let guests = vec!["a".to_string(), "b".to_string()];
        let samples = vec![
            sample(1, "a", 10.0, 100.0),
            sample(1, "b", 100.0, 100.0),
            sample(2, "b", 50.0, 300.0),
            sample(2, "a", 10.0, 100.0),
            sample(3, "a", 20.0, 100.0),
            sample(3, "b", 40.0, 200.0),
        ];
        let r = ratios(&guests, &samples);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].guest, "b");
        // Per-round pair CPU ratios 10, 5, 2: median 5.
        assert!((r[0].pair_cpu - 5.0).abs() < 1e-9, "{r:?}");
        // Latency p50 ratios 1, 3, 2: median 2.
        assert!((r[0].latency_p50 - 2.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn cpu_time_of_this_process_reads() {
        let pid = libc::pid_t::try_from(std::process::id()).expect("pid");
        let t = cpu_seconds(pid).expect("readable");
        assert!(t >= 0.0);
    }
}
