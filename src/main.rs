//! `ftvm`: the command-line front end. Thin by design: it parses arguments, builds a
//! configuration and calls into the library crates.

mod arbiter;
mod client;
mod demo;
mod node;

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
    /// Run the primary VMM: the guest live, its log replicated to a backup.
    Primary(node::PrimaryArgs),
    /// Run the backup VMM: replay the primary's log, check every output.
    Backup(node::BackupArgs),
    /// Send key-value requests to a running primary and verify every response.
    Client(ClientArgs),
    /// The failover arbiter (`ftvm arbiter serve`).
    Arbiter(arbiter::ArbiterArgs),
    /// Print the versions of the wire and memory formats this build speaks.
    Formats,
}

#[derive(clap::Args, Debug)]
struct ClientArgs {
    /// The service address the primary printed (`SERVING addr`).
    #[arg(long)]
    service: SocketAddr,
    /// Requests to send.
    #[arg(long, default_value_t = 1000)]
    requests: u64,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100)]
    keys: u32,
    /// Percent of GET requests.
    #[arg(long, default_value_t = 40)]
    get_percent: u8,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Formats => {
            println!("log frame format version {}", logfmt::FORMAT_VERSION);
            println!(
                "ring layout version {}",
                transport::ring::RING_LAYOUT_VERSION
            );
            println!("channel protocol version {}", transport::PROTOCOL_VERSION);
        }
        Command::Arbiter(args) => arbiter::run(&args)?,
        Command::Demo(args) => {
            demo::run(&args)?;
        }
        Command::Primary(args) => {
            let s = node::primary(&args)?;
            eprintln!(
                "primary: {} exits, {} outputs committed, stopped cleanly",
                s.exits, s.outputs_committed
            );
        }
        Command::Backup(args) => {
            let s = node::backup(&args)?;
            eprintln!(
                "backup: replayed {} exits, {} outputs checked, memory {}",
                s.exits, s.outputs_checked, s.memory_hash
            );
        }
        Command::Client(args) => {
            let w = client::Workload {
                requests: args.requests,
                seed: args.seed,
                keys: args.keys,
                get_percent: args.get_percent,
                timeout: Duration::from_secs(5),
            };
            let r = client::run(args.service, &w, |_| {})?;
            println!("{}", serde_json::to_string_pretty(&r)?);
            if r.responses_ok != r.requests {
                anyhow::bail!("{} bad responses", r.responses_bad);
            }
        }
    }
    Ok(())
}
