//! ftvm's benchmark harness.
//!
//! `bench ring` measures the log ring between two pinned threads (records/s, GB/s);
//! `bench commit` measures output-commit latency per medium next to the raw medium's ping-pong;
//! `bench join` drives real `ftvm` processes: backups joining a primary under load, per guest
//! memory size, next to the raw bandwidth of the join stream's medium.
//! Results print as a table; `--json PATH` writes them for plots and reports.

mod commit;
mod idle;
mod join;
mod metrics_cost;
mod pin;
mod raw;
mod report;
mod ring;
mod throughput;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "bench", about = "ftvm benchmark harness")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Ring push→pop throughput between two threads pinned to different cores.
    Ring(ring::RingArgs),
    /// Output-commit latency per medium, next to the raw medium's ping-pong.
    Commit(commit::CommitArgs),
    /// Entries per second through the channel with batching.
    Throughput(throughput::ThroughputArgs),
    /// Backups joining a running primary under load (real `ftvm` processes): pause and time to
    /// protected per guest memory size, next to the join stream medium's raw bandwidth.
    Join(join::JoinArgs),
    /// What an idle pair costs (CPU, VM exits) and the latency of requests that find it idle,
    /// per guest (interrupt-driven vs polling), in alternating rounds.
    Idle(idle::IdleArgs),
    /// What a replica's metrics cost the commit path: commits over shm without and with them,
    /// in alternating rounds.
    MetricsCost(metrics_cost::MetricsCostArgs),
    /// One self-contained HTML page of the results in a directory (the JSON of commit,
    /// throughput, join, metrics-cost and fault campaigns), with plots.
    Report(report::ReportArgs),
}

fn main() -> anyhow::Result<()> {
    let result = match Cli::parse().command {
        Command::Ring(args) => ring::run(&args),
        Command::Commit(args) => commit::run(&args),
        Command::Throughput(args) => throughput::run(&args),
        Command::Join(args) => join::run(&args),
        Command::Idle(args) => idle::run(&args),
        Command::MetricsCost(args) => metrics_cost::run(&args),
        Command::Report(args) => report::run(&args).map(|_| ()),
    };
    // DPDK media leave memif sockets and the EAL's runtime directory behind otherwise.
    #[cfg(feature = "dpdk")]
    raw::memif::cleanup();
    result
}
