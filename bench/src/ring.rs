//! Ring microbenchmark: one thread pushes records, another pops them, each pinned to its own
//! core. The producer copies each payload in, the consumer copies it out, as the VMM and the
//! sender do; so the number is the ring's cost plus two memcpys, not an empty loop.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use transport::ring::{self, RingError};
use transport::PollPolicy;

#[derive(clap::Args, Debug)]
pub struct RingArgs {
    /// Payload sizes to measure, in bytes (comma separated).
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 4096])]
    sizes: Vec<usize>,
    /// Ring data capacity in bytes (a power of two).
    #[arg(long, default_value_t = 1 << 20)]
    capacity: usize,
    /// Records per producer commit (1 = publish every record on its own).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Measured duration per size, after the warm-up.
    #[arg(long, default_value = "2", value_parser = parse_seconds)]
    seconds: Duration,
    /// Warm-up duration per size, not measured.
    #[arg(long, default_value = "0.5", value_parser = parse_seconds)]
    warmup: Duration,
    /// Core for the producer thread.
    #[arg(long, default_value_t = 0)]
    producer_core: usize,
    /// Core for the consumer thread.
    #[arg(long, default_value_t = 1)]
    consumer_core: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s}: {e}"))
}

#[derive(Debug, Serialize)]
struct RingRow {
    payload_bytes: usize,
    capacity: usize,
    batch: usize,
    records: u64,
    seconds: f64,
    records_per_sec: f64,
    gbytes_per_sec: f64,
    ns_per_record: f64,
}

pub fn run(args: &RingArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.producer_core == args.consumer_core {
        eprintln!(
            "warning: producer and consumer share core {}; the numbers measure time-slicing",
            args.producer_core
        );
    }
    let producer_core = Some(args.producer_core);
    let consumer_core = Some(args.consumer_core);
    println!(
        "ring push→pop, producer core {}, consumer core {}, capacity {} B, commit every {} record(s)",
        args.producer_core, args.consumer_core, args.capacity, args.batch
    );
    println!(
        "{:>8} {:>12} {:>12} {:>10} {:>10}",
        "bytes", "records", "Mrec/s", "GB/s", "ns/rec"
    );
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let row = measure(args, size, producer_core, consumer_core)
            .with_context(|| format!("{size}-byte records"))?;
        println!(
            "{:>8} {:>12} {:>12.2} {:>10.2} {:>10.1}",
            row.payload_bytes,
            row.records,
            row.records_per_sec / 1e6,
            row.gbytes_per_sec,
            row.ns_per_record
        );
        rows.push(row);
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "ring": rows });
        std::fs::write(path, serde_json::to_vec_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn measure(
    args: &RingArgs,
    size: usize,
    producer_core: Option<usize>,
    consumer_core: Option<usize>,
) -> anyhow::Result<RingRow> {
    let (mut producer, mut consumer) = ring::heap(args.capacity)?;
    if size > producer.max_record_len() {
        bail!(
            "records of {size} bytes exceed the ring's limit of {}",
            producer.max_record_len()
        );
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_producer = stop.clone();
    let batch = args.batch;
    let producer_thread = std::thread::spawn(move || -> Result<u64, RingError> {
        if let Some(core) = producer_core {
            crate::pin::pin_current(core, "ring producer");
        }
        let source = vec![0x5Au8; size];
        let mut pushed = 0u64;
        let mut in_batch = 0;
        let mut poller = PollPolicy::BUSY.poller();
        while !stop_producer.load(std::sync::atomic::Ordering::Relaxed) {
            for _ in 0..256 {
                match producer.try_reserve(size) {
                    Ok(buf) => {
                        buf.copy_from_slice(&source);
                        pushed += 1;
                        in_batch += 1;
                        if in_batch == batch {
                            producer.commit();
                            in_batch = 0;
                        }
                    }
                    Err(RingError::Full { .. }) => {
                        producer.commit();
                        in_batch = 0;
                        poller.wait();
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        producer.commit();
        Ok(pushed)
    });

    if let Some(core) = consumer_core {
        crate::pin::pin_current(core, "ring consumer");
    }
    let mut sink = vec![0u8; size];
    let mut popped = 0u64;
    let mut poller = PollPolicy::BUSY.poller();
    let start = Instant::now();
    let warm_until = start + args.warmup;
    let end = warm_until + args.seconds;
    let mut measured_from = None;
    let mut popped_at_start = 0;
    loop {
        let n = consumer.consume(1024, |rec| sink.copy_from_slice(rec))?;
        popped += n as u64;
        if n == 0 {
            poller.wait();
        } else {
            poller.reset();
        }
        if popped.is_multiple_of(64) || n == 0 {
            let now = Instant::now();
            if measured_from.is_none() && now >= warm_until {
                measured_from = Some(now);
                popped_at_start = popped;
            }
            if now >= end {
                break;
            }
        }
    }
    let elapsed = measured_from.map(|t| t.elapsed()).unwrap_or_default();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Drain so the producer can exit even if it is waiting on a full ring.
    let pushed = loop {
        consumer.consume(usize::MAX, |_| {})?;
        if producer_thread.is_finished() {
            break producer_thread
                .join()
                .map_err(|_| anyhow::anyhow!("producer thread panicked"))??;
        }
        std::thread::yield_now();
    };
    std::hint::black_box(&sink);
    let records = popped - popped_at_start;
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 || records == 0 || pushed < popped {
        bail!("measurement failed: {records} records in {seconds} s");
    }
    let rate = records as f64 / seconds;
    Ok(RingRow {
        payload_bytes: size,
        capacity: args.capacity,
        batch: args.batch,
        records,
        seconds,
        records_per_sec: rate,
        gbytes_per_sec: rate * size as f64 / 1e9,
        ns_per_record: 1e9 / rate,
    })
}
