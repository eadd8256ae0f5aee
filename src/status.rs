//! `--metrics ADDR` on every long-lived process, and `ftvm status ADDR`: a one-screen summary
//! of a running replica read from that endpoint.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::Context;
use ftvm_metrics::{MetricsServer, Process, Status, METRICS};

/// Starts the metrics endpoint when asked for (`addr`), for a process of `kind` named `name`.
/// Keep the returned server alive for as long as the process serves.
pub fn start_metrics(
    addr: Option<&str>,
    kind: Process,
    name: &str,
) -> anyhow::Result<Option<MetricsServer>> {
    METRICS.set_process(kind, name);
    let Some(addr) = addr else {
        return Ok(None);
    };
    let server = MetricsServer::start(addr, &METRICS)
        .with_context(|| format!("starting the metrics endpoint (--metrics {addr})"))?;
    let _ = crate::ready::METRICS_AT.set(server.local_addr().to_owned());
    Ok(Some(server))
}

/// `ftvm status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The replica's (or front's, or arbiter's) metrics endpoint: its `--metrics` address.
    pub addr: String,
    /// Print the status as JSON (for scripts) instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Refresh every this many seconds until interrupted.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<f64>,
    /// Give up on the endpoint after this long, ms.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// Runs `ftvm status`.
pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let Some(every) = args.watch else {
        let s = ftvm_metrics::fetch_status(&args.addr, timeout)?;
        print(&s, args);
        return Ok(());
    };
    anyhow::ensure!(
        every.is_finite() && every > 0.0,
        "--watch needs a positive number of seconds"
    );
    let stop = crate::replica::stop_flag()?;
    let tty = std::io::stdout().is_terminal();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let s = ftvm_metrics::fetch_status(&args.addr, timeout);
        if tty {
            // Clear the screen and go home: one screen, refreshed in place.
            print!("\x1b[2J\x1b[H");
        }
        match s {
            Ok(s) => print(&s, args),
            Err(e) => println!("{e}"),
        }
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs_f64(every));
    }
    Ok(())
}

fn print(s: &Status, args: &StatusArgs) {
    if args.json {
        match serde_json::to_string_pretty(s) {
            Ok(j) => println!("{j}"),
            Err(e) => println!("{{\"error\": \"{e}\"}}"),
        }
        return;
    }
    print!("{}", render(s, &args.addr));
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02} UTC")
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
}

/// The one-screen summary.
pub fn render(s: &Status, addr: &str) -> String {
    let mut o = String::new();
    let kind = match s.process {
        Process::Replica => "replica",
        Process::Front => "service front",
        Process::Arbiter => "arbiter server",
    };
    o += &format!(
        "ftvm {kind} {} (ftvm {}) at {addr}, up {}\n",
        if s.name.is_empty() { "-" } else { &s.name },
        s.version,
        ago(s.now_unix_ms, s.started_unix_ms)
    );
    let Some(r) = &s.replica else {
        return o;
    };
    o += &format!(
        "  state       {} ({} in epoch {}) for {}, since {}: {}\n",
        r.state.name().to_uppercase(),
        r.role.name(),
        r.epoch,
        ago(s.now_unix_ms, r.since_unix_ms),
        utc(r.since_unix_ms),
        r.cause
    );
    o += &format!("  peer        {}\n", r.peer.as_deref().unwrap_or("none"));
    o += &format!(
        "  protected   {}\n",
        match r.protected_since_unix_ms {
            Some(t) => format!("yes, for {} (since {})", ago(s.now_unix_ms, t), utc(t)),
            None => "NO".into(),
        }
    );
    let l = &s.log;
    o += &format!(
        "  log         {} entries, {} in all; {:.0} entries/s, {}/s over the last {:.0} s{}\n",
        l.entries,
        mib(l.bytes as f64),
        s.log_entries_per_s,
        mib(s.log_bytes_per_s),
        s.window_s,
        if s.channel_up {
            ""
        } else {
            " (no channel now)"
        }
    );
    o += &match r.role {
        // The primary knows both lags, and estimates the replay lag's time.
        ftvm_metrics::Role::Primary => format!(
            "  lag         ACK {} entries; replay {} entries, {:.2} ms\n",
            l.ack_lag_entries,
            l.replay_lag_entries,
            l.replay_lag_ns as f64 / 1e6
        ),
        _ => format!(
            "  lag         replay {} entries received and not yet replayed\n",
            l.replay_lag_entries
        ),
    };
    let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} µs"));
    o += &format!(
        "  commit      p50 {}, p99 {} ({} outputs over the last {:.0} s)\n",
        us(s.commit_p50_us),
        us(s.commit_p99_us),
        s.commits,
        s.window_s
    );
    o += &format!(
        "  events      {} failovers, {} joins, {} heartbeat timeouts, {} frames rejected\n",
        s.failovers, s.joins, s.heartbeats_missed, s.frames_rejected
    );
    o
}
