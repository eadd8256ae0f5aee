//! Log throughput: how many entries per second the primary can push through the channel with
//! batching, until the backup has acknowledged the last one. Both ends are the real channel
//! over the real medium, pinned to different cores.

use std::time::Instant;

use anyhow::{bail, Context};
use logfmt::{ControlOp, Entry, Event, Position};
use serde::Serialize;
use transport::PrimaryLink;

use crate::commit::{with_pair, Medium, PrimaryJob};

#[derive(clap::Args, Debug)]
pub struct ThroughputArgs {
    /// Media to measure (comma separated).
    #[arg(long = "transport", value_delimiter = ',', default_value = "shm")]
    transports: Vec<Medium>,
    /// Guest-input bytes per entry (each entry also has a 16-byte header and a 2-byte device id).
    #[arg(long, default_value_t = 64)]
    entry_bytes: usize,
    /// Entries per medium.
    #[arg(long, default_value_t = 5_000_000)]
    count: u64,
    /// Core for the primary.
    #[arg(long, default_value_t = 0)]
    primary_core: usize,
    /// Core for the backup.
    #[arg(long, default_value_t = 1)]
    backup_core: usize,
    /// Write the rows as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct ThroughputRow {
    transport: String,
    entry_bytes: usize,
    count: u64,
    seconds: f64,
    entries_per_sec: f64,
    mbytes_per_sec: f64,
    frames: u64,
    throttle_events: u64,
}

struct Job<'a>(&'a ThroughputArgs);

impl PrimaryJob for Job<'_> {
    type Output = (f64, transport::StatsSnapshot);

    fn run<L: PrimaryLink>(self, mut p: transport::Primary<L>) -> anyhow::Result<Self::Output> {
        let data = vec![0x3Cu8; self.0.entry_bytes];
        let start = Instant::now();
        let mut last = 0;
        for exit in 1..=self.0.count {
            let entry = Entry::new(
                Position::at_exit(exit),
                Event::DeviceInput {
                    device: 1,
                    data: &data,
                },
            );
            last = p.append(&entry)?;
        }
        p.flush()?;
        p.wait_acked(last)?;
        let seconds = start.elapsed().as_secs_f64();
        let stats = p.stats();
        let end = p.append(&Entry::new(
            Position::at_exit(self.0.count + 1),
            Event::Control(ControlOp::Shutdown),
        ))?;
        p.wait_acked(end)?;
        Ok((seconds, stats))
    }
}

pub fn run(args: &ThroughputArgs) -> anyhow::Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    println!(
        "log throughput: {} entries of {} B input each, batched; primary core {}, backup core {}",
        args.count, args.entry_bytes, args.primary_core, args.backup_core
    );
    println!(
        "{:<14} {:>12} {:>10} {:>10} {:>10}",
        "transport", "Mentries/s", "MB/s", "frames", "throttled"
    );
    let kinds: Vec<_> = args
        .transports
        .iter()
        .filter_map(|m| m.dpdk_kind())
        .collect();
    crate::raw::memif::want(&kinds)?;
    let mut rows = Vec::new();
    for &medium in &args.transports {
        let (seconds, stats) = with_pair(
            medium,
            transport::auth::ChannelCrypto::Auth,
            args.primary_core,
            args.backup_core,
            Job(args),
        )
        .with_context(|| format!("throughput over {}", medium.name()))?;
        let rate = args.count as f64 / seconds;
        let row = ThroughputRow {
            transport: medium.name().into(),
            entry_bytes: args.entry_bytes,
            count: args.count,
            seconds,
            entries_per_sec: rate,
            mbytes_per_sec: stats.bytes as f64 / seconds / 1e6,
            frames: stats.frames,
            throttle_events: stats.throttle_events,
        };
        println!(
            "{:<14} {:>12.2} {:>10.1} {:>10} {:>10}",
            row.transport,
            rate / 1e6,
            row.mbytes_per_sec,
            row.frames,
            row.throttle_events
        );
        rows.push(row);
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "throughput": rows });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
