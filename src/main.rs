//! `ftvm`: the command-line front end. Thin by design: it parses arguments, builds a
//! configuration and calls into the library crates.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ftvm",
    version,
    about = "Primary/backup fault tolerance for KVM guests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the versions of the wire and memory formats this build speaks.
    Formats,
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
        }
    }
    Ok(())
}
