//! `ftvm`: the command-line front end. Thin by design: it parses arguments, builds a
//! configuration and calls into the library crates.

mod arbiter;
mod campaign;
mod check_guest;
mod client;
mod demo;
mod node;
mod ready;
mod replica;
mod status;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ftvm",
    version,
    about = "Primary/backup fault tolerance for KVM guests over a kernel-bypass log channel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an FT pair with a guest on one machine, drive client requests, compare the replicas.
    Demo(demo::DemoArgs),
    /// Run one host's node of a self-healing pair (under a supervisor): join the live primary
    /// as its backup, or claim a new pair's first epoch; take over when the primary fails.
    Node(node::NodeArgs),
    /// Run the primary VMM: the guest live, its log replicated to a backup.
    Primary(replica::PrimaryArgs),
    /// Run the backup VMM: replay the primary's log, check every output.
    Backup(replica::BackupArgs),
    /// Replay a backup's journal on a fresh VM and print the guest's final state.
    Replay(replica::ReplayArgs),
    /// Send requests (key-value or ledger) to a running primary and verify every response.
    Client(ClientArgs),
    /// The failover arbiter (`ftvm arbiter serve`, `ftvm arbiter init`).
    Arbiter(arbiter::ArbiterArgs),
    /// The service front: owns the service address, forwards to the replica holding the newest
    /// fencing epoch, and drops every response from an older one.
    Front(FrontArgs),
    /// Show a running replica's state, peer, lag, commit latency and log rate (from its
    /// `--metrics` endpoint).
    Status(status::StatusArgs),
    /// Print the versions of the wire and memory formats this build speaks.
    Formats,
    /// Check a guest image for instructions the primary and the backup cannot agree on
    /// (`rdtsc`, `cpuid`, ...). Exit status 0: none; 1: listed; 2: not a loadable image.
    CheckGuest(check_guest::CheckGuestArgs),
}

#[derive(clap::Args, Debug)]
struct FrontArgs {
    /// The service address clients use.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// File holding the pair's pre-shared key (replicas prove it when they register).
    #[arg(long)]
    key_file: std::path::PathBuf,
    /// FT pair id (the replicas' `--session`).
    #[arg(long, default_value_t = 1)]
    session: u64,
    /// Serve Prometheus metrics (`/metrics`) and a status (`/status`) at this `host:port`.
    #[arg(long)]
    metrics: Option<String>,
}

#[derive(clap::Args, Debug)]
struct ClientArgs {
    /// The service address (the `addr` of the primary's or the front's readiness line).
    #[arg(long)]
    service: SocketAddr,
    /// The service the guest runs: the key-value store or the ledger (`--guest ledger`).
    #[arg(long, value_enum, default_value = "kvstore")]
    workload: client::Protocol,
    /// Requests to send.
    #[arg(long, default_value_t = 1000)]
    requests: u64,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100)]
    keys: u32,
    /// Keys are named PREFIX-N (clients sharing a service keep to their own keys).
    #[arg(long, default_value = "key")]
    key_prefix: String,
    /// Percent of GET requests.
    #[arg(long, default_value_t = 40)]
    get_percent: u8,
    /// Afterwards, read back every key used and compare with what the responses implied.
    #[arg(long)]
    verify: bool,
    /// Give up on a request after this long without a response (retrying meanwhile), ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Send a request again when no response came for this long, ms.
    #[arg(long, default_value_t = 50)]
    retry_ms: u64,
    /// Requests in flight at once, never two on the same key (1: one at a time).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    window: u16,
    /// Percent of FILL requests: the guest dirties `--fill-pages` pages at a random place in
    /// its memory (`--mem-mib`, as the replicas run with) — load for a join.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    fill_percent: u8,
    #[arg(long, default_value_t = 256)]
    fill_pages: u32,
    #[arg(long, default_value_t = 16)]
    mem_mib: u64,
}

/// Logs go to stderr through `tracing`, filtered by `RUST_LOG` (default `info`); stdout keeps
/// what other programs read (the readiness line, JSON reports).
fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        let code = if e.is::<replica::Deposed>() {
            replica::DEPOSED_EXIT_CODE
        } else if e.is::<node::Refused>() {
            node::REFUSED_EXIT_CODE
        } else {
            1
        };
        std::process::exit(code);
    }
}

/// The front's counters as metrics.
fn front_samples(f: &vmm::service::FrontStats) -> Vec<ftvm_metrics::Sample> {
    use ftvm_metrics::Sample;
    vec![
        Sample::counter(
            "ftvm_front_requests",
            "Client requests passed to the serving replica.",
            f.requests,
        ),
        Sample::counter(
            "ftvm_front_responses",
            "Responses passed back to clients.",
            f.responses,
        ),
        Sample::counter(
            "ftvm_front_fenced_responses",
            "Responses dropped because their epoch is older than the newest registered.",
            f.fenced,
        ),
        Sample::counter(
            "ftvm_front_refused_registrations",
            "Connections refused in the handshake (another key or pair) and registrations \
             refused (an older epoch, or the newest held by another replica).",
            f.refused,
        ),
        Sample::counter(
            "ftvm_front_unauthenticated_datagrams",
            "Datagrams from the registered replica's address whose seal did not verify.",
            f.unauthenticated,
        ),
        Sample::counter(
            "ftvm_front_parked_requests",
            "Requests that arrived while no replica was registered.",
            f.parked,
        ),
        Sample::counter(
            "ftvm_front_ignored",
            "Malformed or unexpected datagrams ignored.",
            f.ignored,
        ),
        Sample::gauge(
            "ftvm_front_epoch",
            "The newest epoch registered.",
            f.epoch as f64,
        ),
    ]
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckGuest(args) => {
            // Its own exit statuses (1: findings, 2: not a loadable image), its own output.
            let status = check_guest::run(&args);
            if status != check_guest::PASS {
                std::process::exit(status);
            }
        }
        Command::Formats => {
            println!("log frame format version {}", logfmt::FORMAT_VERSION);
            println!(
                "ring layout version {}",
                transport::ring::RING_LAYOUT_VERSION
            );
            println!("channel protocol version {}", transport::PROTOCOL_VERSION);
        }
        Command::Arbiter(args) => arbiter::run(&args)?,
        Command::Status(args) => status::run(&args)?,
        Command::Replay(args) => {
            let s = replica::replay_journal(&args)?;
            println!(
                "replayed {} exits ({} entries), {} outputs checked, memory {}",
                s.exits, s.entries_received, s.outputs_checked, s.memory_hash
            );
        }
        Command::Front(args) => {
            let key = transport::PreSharedKey::from_file(&args.key_file)?;
            let front = vmm::service::Front::bind(args.listen, key, args.session)?;
            let _metrics = status::start_metrics(
                args.metrics.as_deref(),
                ftvm_metrics::Process::Front,
                &format!("front-{}", args.session),
            )?;
            let reader = front.stats_reader();
            ftvm_metrics::METRICS.set_source(Box::new(move || front_samples(&reader())));
            let stop = replica::stop_signals()?;
            ready::Ready::new(
                "front",
                front.local_addr(),
                format!("pair {}", args.session),
            )
            .announce()?;
            stop.wait();
            println!("{}", serde_json::to_string_pretty(&front.stats())?);
        }
        Command::Demo(args) => {
            demo::run(&args)?;
        }
        Command::Primary(args) => {
            let _metrics = replica::start_metrics(&args.common, "primary")?;
            let s = replica::primary(&args)?;
            tracing::info!(
                "primary: {} exits, {} outputs committed, stopped cleanly",
                s.exits,
                s.outputs_committed
            );
        }
        Command::Node(args) => {
            let _metrics = replica::start_metrics(&args.common, "node")?;
            let s = node::node(&args)?;
            tracing::info!(
                "node: stopped as {} in epoch {} after {} exits, memory {}",
                s.role,
                s.epoch,
                s.exits,
                s.memory_hash
            );
        }
        Command::Backup(args) => {
            let _metrics = replica::start_metrics(&args.common, "backup")?;
            let s = replica::backup(&args)?;
            match &s.takeover {
                Some(t) => tracing::info!(
                    "backup: took over at exit {} in epoch {} ({} outputs checked before, {} \
                     requests served live), stopped at exit {}, memory {}",
                    t.exit,
                    t.arbitration.epoch,
                    s.outputs_checked,
                    s.requests,
                    s.exits,
                    s.memory_hash
                ),
                None => tracing::info!(
                    "backup: replayed {} exits, {} outputs checked, memory {}",
                    s.exits,
                    s.outputs_checked,
                    s.memory_hash
                ),
            }
        }
        Command::Client(args) => {
            let mut w =
                client::Workload::new(args.requests, args.seed, args.keys, args.get_percent);
            w.protocol = args.workload;
            w.verify = args.verify;
            w.key_prefix = args.key_prefix.clone();
            w.timeout = Duration::from_millis(args.timeout_ms);
            w.retry = Duration::from_millis(args.retry_ms.max(1));
            w.window = usize::from(args.window);
            w.fill_percent = args.fill_percent;
            w.fill_pages = args.fill_pages;
            w.mem_size = args.mem_mib << 20;
            let r = client::run(args.service, &w, |_| {})?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            if r.responses_ok != r.requests || r.acknowledged_lost > 0 {
                anyhow::bail!(
                    "{} bad responses, {} acknowledged updates lost",
                    r.responses_bad,
                    r.acknowledged_lost
                );
            }
        }
    }
    Ok(())
}
