//! `ftvm arbiter serve`: the network arbiter both replicas of a pair ask on failover;
//! `ftvm arbiter init`: creates a file arbiter's store.

use std::path::PathBuf;

use anyhow::Context;
use ft_arbiter::{ArbiterServer, ArbiterSpec};
use transport::PreSharedKey;

/// `ftvm arbiter …`.
#[derive(clap::Args, Debug)]
pub struct ArbiterArgs {
    #[command(subcommand)]
    pub command: ArbiterCommand,
}

/// Arbiter subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ArbiterCommand {
    /// Create the store of a file arbiter, before the pair's first run.
    ///
    /// `file:DIR` creates DIR (and its parents) if missing and the store in it. Idempotent: a
    /// store already there is checked and left as it is (its decisions kept), so both hosts may
    /// run it. Run it where the shared storage is mounted. `server:` and `etcd:` arbiters need no
    /// init (the server creates its decision log when it starts; etcd keys appear with a pair's
    /// first decision): it says so and exits 0.
    Init {
        /// The arbiter, as the replicas' `--arbiter` takes it: `file:DIR`, `server:HOST:PORT` or
        /// `etcd:URL[,URL...]`.
        spec: ArbiterSpec,
    },
    /// Serve test-and-set decisions, durable in a state directory, to authenticated replicas.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7500")]
        listen: String,
        /// Directory of the durable decision log (created if missing).
        #[arg(long)]
        state_dir: PathBuf,
        /// File holding the pre-shared key the replicas use.
        #[arg(long)]
        key_file: PathBuf,
        /// Serve Prometheus metrics (`/metrics`) and a status (`/status`) at this `host:port`.
        #[arg(long)]
        metrics: Option<String>,
    },
}

/// Runs the subcommand until SIGTERM/SIGINT.
pub fn run(args: &ArbiterArgs) -> anyhow::Result<()> {
    match &args.command {
        ArbiterCommand::Init { spec } => {
            let outcome = spec
                .init()
                .with_context(|| format!("initializing arbiter {spec}"))?;
            println!("{outcome}");
            Ok(())
        }
        ArbiterCommand::Serve {
            listen,
            state_dir,
            key_file,
            metrics,
        } => {
            let key = PreSharedKey::from_file(key_file)
                .with_context(|| format!("pre-shared key {}", key_file.display()))?;
            let listener =
                std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
            let server = ArbiterServer::serve(listener, state_dir, key)
                .context("starting the arbiter server")?;
            let _metrics = crate::status::start_metrics(
                metrics.as_deref(),
                ftvm_metrics::Process::Arbiter,
                "arbiter",
            )?;
            let reader = server.stats_reader();
            ftvm_metrics::METRICS.set_source(Box::new(move || {
                use ftvm_metrics::Sample;
                let s = reader();
                vec![
                    Sample::counter(
                        "ftvm_arbiter_server_connections",
                        "Connections accepted.",
                        s.connections,
                    ),
                    Sample::counter(
                        "ftvm_arbiter_server_refused",
                        "Connections refused (failed handshake, too many).",
                        s.refused,
                    ),
                    Sample::counter(
                        "ftvm_arbiter_server_requests",
                        "Requests answered.",
                        s.requests,
                    ),
                    Sample::counter(
                        "ftvm_arbiter_server_decisions",
                        "Test-and-sets that recorded a new decision.",
                        s.decisions,
                    ),
                ]
            }));
            let stop = crate::replica::stop_signals()?;
            let detail = format!("decisions in {}", state_dir.display());
            crate::ready::Ready::new("arbiter", server.local_addr(), detail).announce()?;
            let handle = server.stop_handle();
            std::thread::spawn(move || {
                stop.wait();
                handle.stop();
            });
            server.wait();
            tracing::info!("arbiter: stopped");
            Ok(())
        }
    }
}
