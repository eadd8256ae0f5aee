//! `bench metrics-cost`: what a replica's metrics cost the commit path. Output commits over
//! shared memory with a live metrics endpoint and a scraper reading it every `--scrape-ms`
//! (Prometheus's usual pace is 15 s); in blocks of `--block` commits, alternately without and
//! with the work a replica's metrics add per served request (two exits and a request counted,
//! the commit's latency observed). Alternating blocks within one channel session see the
//! machine in the same state, which alternating runs do not (their p50s moved by ±130 ns
//! between runs of 100,000 commits here, against an effect of a few ns). The channel's own
//! counters, which the endpoint reads through a probe, predate the metrics and run in both.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ftvm_metrics::{ExitKind, METRICS};
use hdrhistogram::Histogram;
use serde::Serialize;
use transport::PrimaryLink;

use crate::commit::{commit_loop, median, with_pair, Commits, Medium, PrimaryJob};

#[derive(clap::Args, Debug)]
pub struct MetricsCostArgs {
    /// Rounds; each measures both ways (the order alternates between rounds).
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Commits measured per run.
    #[arg(long, default_value_t = 400_000)]
    count: u64,
    /// Commits before measuring, excluded.
    #[arg(long, default_value_t = 10_000)]
    warmup: u64,
    /// Input bytes per commit.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// How often the scraper reads /metrics, ms (0: never).
    #[arg(long, default_value_t = 100)]
    scrape_ms: u64,
    /// Commits per block; blocks alternate without and with the metrics work.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    block: u64,
    #[arg(long, default_value_t = 0)]
    primary_core: usize,
    #[arg(long, default_value_t = 1)]
    backup_core: usize,
    /// Write the rounds and the verdict as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct Round {
    round: u32,
    off_p50_ns: f64,
    on_p50_ns: f64,
    off_p99_ns: f64,
    on_p99_ns: f64,
    off_mean_ns: f64,
    on_mean_ns: f64,
    ratio: f64,
    overhead_ns: f64,
    /// The difference of the means (finer than the p50s, which move in the clock's steps).
    mean_overhead_ns: f64,
    /// The difference of the means of the commits up to each side's p90 (as fine as the
    /// means, without their sensitivity to a few long stalls): the cost estimate.
    trimmed_overhead_ns: f64,
    scrapes: u64,
}

#[derive(Debug, Serialize)]
struct Report {
    medium: &'static str,
    payload: usize,
    count: u64,
    block: u64,
    scrape_ms: u64,
    rounds: Vec<Round>,
    median_ratio: f64,
    median_overhead_ns: f64,
    median_mean_overhead_ns: f64,
    median_trimmed_overhead_ns: f64,
    /// The median trimmed-mean overhead as a share of the median p50 without metrics, %.
    overhead_percent: f64,
    target_percent: f64,
    met: bool,
}

/// Scrapes `addr`'s /metrics every `every` until stopped; returns how many scrapes succeeded.
fn scraper(addr: String, every: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            if ftvm_metrics::status::get(&addr, "/metrics", Duration::from_secs(2)).is_ok() {
                n += 1;
            }
            std::thread::sleep(every);
        }
        n
    })
}

/// Commits in alternating blocks without and with the metrics work; returns both histograms.
struct Alternating<'a>(&'a MetricsCostArgs);

impl PrimaryJob for Alternating<'_> {
    type Output = [Histogram<u64>; 2];

    fn run<L: PrimaryLink>(
        self,
        primary: transport::Primary<L>,
    ) -> anyhow::Result<[Histogram<u64>; 2]> {
        let args = self.0;
        let commits = Commits {
            payload: args.payload,
            warmup: args.warmup,
            count: args.count,
        };
        let mut h = commit_loop(primary, &commits, 2, |i, start| {
            let on = (i / args.block) % 2 == 1;
            // The output gate reads the clock for its own latency record either way: the
            // metrics observe that reading.
            let released = start.elapsed().as_nanos() as u64;
            if on {
                // What the VMM adds for a request: its NET_RX and NET_TX exits and the request
                // counted (engine), the released output's latency observed (output gate).
                METRICS.exit(ExitKind::NetRx);
                METRICS.requests.add_single(1);
                METRICS.exit(ExitKind::NetTx);
                METRICS.commit.observe_ns(released);
            }
            std::hint::black_box(released);
            usize::from(on)
        })?
        .into_iter();
        match (h.next(), h.next()) {
            (Some(off), Some(on)) => Ok([off, on]),
            _ => anyhow::bail!("the commit loop returned fewer than two histograms"),
        }
    }
}

/// The mean of the values up to the histogram's p90.
fn trimmed_mean(h: &Histogram<u64>) -> f64 {
    let cut = h.value_at_quantile(0.9);
    let (mut sum, mut n) = (0f64, 0u64);
    for v in h.iter_recorded() {
        if v.value_iterated_to() > cut {
            break;
        }
        sum += v.value_iterated_to() as f64 * v.count_at_value() as f64;
        n += v.count_at_value();
    }
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

/// One round: a channel session with the endpoint up and scraped.
fn run_round(args: &MetricsCostArgs) -> anyhow::Result<([Histogram<u64>; 2], u64)> {
    let server = ftvm_metrics::MetricsServer::start("127.0.0.1:0", &METRICS)?;
    let stop = Arc::new(AtomicBool::new(false));
    let scraping = (args.scrape_ms > 0).then(|| {
        scraper(
            server.local_addr().to_owned(),
            Duration::from_millis(args.scrape_ms),
            stop.clone(),
        )
    });
    let h = with_pair(
        Medium::Shm,
        transport::auth::ChannelCrypto::Auth,
        args.primary_core,
        args.backup_core,
        Alternating(args),
    );
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraping.map_or(0, |t| t.join().unwrap_or(0));
    drop(server);
    Ok((h?, scrapes))
}

pub fn run(args: &MetricsCostArgs) -> anyhow::Result<()> {
    METRICS.set_process(ftvm_metrics::Process::Replica, "bench");
    println!(
        "metrics cost on the commit path: shm, {} B input, {} commits per round in blocks of \
         {} alternating without/with the metrics work, {} rounds (scrape every {} ms)",
        args.payload, args.count, args.block, args.rounds, args.scrape_ms
    );
    println!(
        "{:>5} {:>11} {:>11} {:>11} {:>11} {:>8} {:>9} {:>10} {:>10} {:>8}",
        "round",
        "off p50 ns",
        "on p50 ns",
        "off p99 ns",
        "on p99 ns",
        "ratio",
        "+ns p50",
        "+ns mean",
        "+ns ≤p90",
        "scrapes"
    );
    let mut rounds = Vec::new();
    for round in 1..=args.rounds {
        let ([off, on], scrapes) = run_round(args)?;
        let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64;
        let r = Round {
            round,
            off_p50_ns: q(&off, 0.5),
            on_p50_ns: q(&on, 0.5),
            off_p99_ns: q(&off, 0.99),
            on_p99_ns: q(&on, 0.99),
            off_mean_ns: off.mean(),
            on_mean_ns: on.mean(),
            ratio: q(&on, 0.5) / q(&off, 0.5),
            overhead_ns: q(&on, 0.5) - q(&off, 0.5),
            mean_overhead_ns: on.mean() - off.mean(),
            trimmed_overhead_ns: trimmed_mean(&on) - trimmed_mean(&off),
            scrapes,
        };
        println!(
            "{:>5} {:>11.0} {:>11.0} {:>11.0} {:>11.0} {:>8.4} {:>9.1} {:>10.1} {:>10.1} {:>8}",
            r.round,
            r.off_p50_ns,
            r.on_p50_ns,
            r.off_p99_ns,
            r.on_p99_ns,
            r.ratio,
            r.overhead_ns,
            r.mean_overhead_ns,
            r.trimmed_overhead_ns,
            r.scrapes
        );
        rounds.push(r);
    }
    let median_ratio = median(rounds.iter().map(|r| r.ratio).collect());
    let median_overhead_ns = median(rounds.iter().map(|r| r.overhead_ns).collect());
    let median_mean_overhead_ns = median(rounds.iter().map(|r| r.mean_overhead_ns).collect());
    let median_trimmed_overhead_ns = median(rounds.iter().map(|r| r.trimmed_overhead_ns).collect());
    let base = median(rounds.iter().map(|r| r.off_p50_ns).collect());
    // The cost estimate: the difference of the trimmed means (the p50s move in the clock's
    // 10 ns steps here; the full means with a few long stalls), against the commit p50.
    let overhead_percent = 100.0 * median_trimmed_overhead_ns / base;
    let report = Report {
        medium: "shm",
        payload: args.payload,
        count: args.count,
        block: args.block,
        scrape_ms: args.scrape_ms,
        median_ratio,
        median_overhead_ns,
        median_mean_overhead_ns,
        median_trimmed_overhead_ns,
        overhead_percent,
        target_percent: 1.0,
        met: overhead_percent <= 1.0,
        rounds,
    };
    println!(
        "median of the rounds: ratio of p50s {:.4} ({:+.1} ns), difference of means {:+.1} ns, \
         of means up to p90 {:+.1} ns = {:+.2} % of the commit p50 ({:.0} ns) without metrics; \
         target <= 1 %: {}",
        report.median_ratio,
        report.median_overhead_ns,
        report.median_mean_overhead_ns,
        report.median_trimmed_overhead_ns,
        report.overhead_percent,
        base,
        if report.met { "met" } else { "NOT met" }
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
