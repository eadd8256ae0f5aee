//! `ftvm node`: the process each host of a pair runs under a supervisor. It asks the arbiter
//! whether the pair has a live primary; if so it joins it as the backup (by live state
//! transfer), and if the pair is new it claims the first epoch — exactly one node wins, the
//! other joins the winner. After a failure the survivor serves on and records where it accepts
//! joins with its win; the failed node, restarted by its supervisor, joins it: the pair heals.
//!
//! A node never starts a fresh guest over a pair that already has a decision: if the recorded
//! primary cannot be reached, the node waits (its state is the pair's only copy).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use ft_arbiter::{Arbiter, Decision, Record};

use crate::replica::{self, BackupArgs, Common, NodeSummary};

/// `ftvm node`.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Where this node accepts joining backups while it is the primary (`host:port` or a Unix
    /// socket path). Recorded at the arbiter with every epoch it wins, so the other node finds
    /// it; it must be reachable from the other host.
    #[arg(long)]
    pub accept_joins: vmm::join::JoinAddr,
    /// Where this node's log channel listens while it is the backup: a Unix socket path (shm)
    /// or host:port (tcp; dpdk, rdma: the set-up address). The primary learns it in the join.
    #[arg(long)]
    pub listen: String,
    /// The log channel address the primary is told to dial (default: the `--listen`
    /// address), for a relay or address translation in between.
    #[arg(long)]
    pub advertise: Option<String>,
    /// The replica's own UDP address (the front forwards to it); the default reaches a front
    /// on another host as well as one on loopback.
    #[arg(long, default_value = "0.0.0.0:0")]
    pub service: String,
    /// Keep a journal here while this node is the backup (as `ftvm backup --journal`).
    #[arg(long)]
    pub journal: Option<std::path::PathBuf>,
    /// Longest pause between two attempts to join, ms (the first retry comes after 20 ms; the
    /// pause doubles up to this).
    #[arg(long, default_value_t = 500)]
    pub retry_max_ms: u64,
    /// Start the guest even if the determinism checker (`ftvm check-guest`) finds instructions
    /// the backup cannot replay; the findings are logged as a warning.
    #[arg(long)]
    pub skip_guest_check: bool,
}

/// A node's error that retrying cannot cure: its key, pair, guest image, memory size or medium
/// is not the live primary's, or its guest image is malformed or fails the determinism check.
/// The binary exits with [`REFUSED_EXIT_CODE`] (a supervisor should not restart it: systemd's
/// `RestartPreventExitStatus=4`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// How long a node waits for the front's answer to its probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Exit status of a node the live primary refused for good.
pub const REFUSED_EXIT_CODE: i32 = 4;

/// Runs the node until SIGTERM/SIGINT, a deposition (exit 3: restart it, it rejoins), or a
/// refusal for good (exit 4).
pub fn node(args: &NodeArgs) -> anyhow::Result<NodeSummary> {
    let mut common = args.common.clone();
    let Some(spec) = common.arbiter.clone() else {
        anyhow::bail!("ftvm node needs --arbiter: it is how the two nodes find each other");
    };
    let Some(front) = common.front else {
        anyhow::bail!("ftvm node needs --front: the service address both nodes serve behind");
    };
    // Unique per process: a restarted node must never inherit its predecessor's wins.
    let base = common.name.clone().unwrap_or_else(|| "node".into());
    common.name = Some(format!("{base}.{}", std::process::id()));
    let me = common.name.clone().unwrap_or_default();
    // Before anything else: a guest that cannot run deterministically (or cannot be read) is a
    // configuration no retry cures. `common` keeps the image read here for the whole run.
    replica::check_guest(&common, args.skip_guest_check)
        .map_err(|e| Refused(format!("node {me}: {e:#}")))?;
    let pair = replica::pair_id(&common);
    let key = replica::read_key(&common)?;
    let stop = replica::stop_flag()?;
    let mut arbiter = spec
        .open(Some(&key))
        .with_context(|| format!("opening the arbiter {spec}"))?;
    let backup_args = |join: vmm::join::JoinAddr| BackupArgs {
        common: common.clone(),
        listen: args.listen.clone(),
        advertise: args.advertise.clone(),
        service: args.service.clone(),
        journal: args.journal.clone(),
        join: Some(join),
        accept_joins: Some(args.accept_joins.clone()),
    };
    tracing::info!("node {me}: pair {pair}, arbiter {spec}; asking who is live");
    let mut retry = Backoff::new(Duration::from_millis(args.retry_max_ms.max(20)));
    loop {
        if stop.load(Ordering::Relaxed) {
            anyhow::bail!("stopped before serving");
        }
        let Some(latest) = ask(&mut *arbiter, &pair, &stop, &mut retry)? else {
            // A new pair — unless the front already serves one: then this node's pair id (or
            // arbiter) is not the live pair's, and a second pair must not start behind it.
            let newest = vmm::service::probe_front(front, &key, common.session, PROBE_TIMEOUT)
                .context("asking the service front whether it serves a pair already")?;
            // The live primary wins at the arbiter before it registers with the front: if the
            // front serves, a decision of the same pair must be readable now. (The other node
            // may have won between our question and our probe: ask again before refusing.)
            if newest > 0 && ask(&mut *arbiter, &pair, &stop, &mut retry)?.is_some() {
                continue;
            }
            if newest > 0 {
                return Err(Refused(format!(
                    "the arbiter has no decision for pair {pair}, but the service front {front} \
                     already serves pair session {} in epoch {newest}: this node's --pair-id or \
                     --arbiter is not the live pair's; not starting a second pair",
                    common.session
                ))
                .into());
            }
            // Claim the new pair's first epoch, saying where we accept joins.
            let vm = replica::new_vm(&common)?;
            let join = replica::join_service(&common, &vm, &args.accept_joins, 1, true)?;
            match claim(
                &mut *arbiter,
                &pair,
                &me,
                join.local_addr(),
                &stop,
                &mut retry,
            )? {
                Decision::Won { epoch } => {
                    tracing::info!(
                        "node {me}: won epoch {epoch} of the new pair {pair}: primary, joins at {}",
                        join.local_addr()
                    );
                    return replica::primary_won(&common, vm, &args.service, join, epoch);
                }
                Decision::Lost { winner, epoch } => {
                    tracing::info!("node {me}: {winner} won epoch {epoch} of the new pair first");
                    continue;
                }
            }
        };
        let Some(addr) = latest.joins_at.clone() else {
            retry.wait(&format!(
                "the pair's primary {} (epoch {}) accepts no joins; waiting for one that does",
                latest.winner, latest.epoch
            ));
            continue;
        };
        let join: vmm::join::JoinAddr = match addr.parse() {
            Ok(j) => j,
            Err(e) => {
                retry.wait(&format!("the recorded join address {addr:?}: {e}; waiting"));
                continue;
            }
        };
        tracing::info!(
            "node {me}: {} is primary in epoch {}: joining it at {join}",
            latest.winner,
            latest.epoch
        );
        let vm = replica::new_vm(&common)?;
        match replica::backup_on(&backup_args(join), vm, latest.epoch) {
            Ok(summary) => return Ok(summary),
            Err(e) => match e.downcast_ref::<vmm::join::JoinError>() {
                Some(j) if j.is_permanent() => {
                    return Err(Refused(format!(
                        "the live primary {} refuses this node: {e:#}",
                        latest.winner
                    ))
                    .into())
                }
                // Not joined yet (nothing was served): ask again and retry.
                Some(_) => retry.wait(&format!("the join did not complete: {e:#}")),
                None => return Err(e),
            },
        }
    }
}

/// The pair's latest decision; waits while the arbiter is unreachable (a node whose arbiter
/// is unreachable does not serve).
fn ask(
    arbiter: &mut dyn Arbiter,
    pair: &str,
    stop: &AtomicBool,
    retry: &mut Backoff,
) -> anyhow::Result<Option<Record>> {
    loop {
        match arbiter.latest(pair) {
            Ok(r) => return Ok(r),
            Err(e @ ft_arbiter::ArbiterError::Unavailable(_)) => {
                if stop.load(Ordering::Relaxed) {
                    anyhow::bail!("stopped while the arbiter was unreachable");
                }
                retry.wait(&format!("the arbiter gives no answer ({e}): not serving"));
            }
            Err(e) => return Err(e).context("asking the arbiter for the pair's primary"),
        }
    }
}

/// Claims the first epoch of a new pair; waits while the arbiter is unreachable.
fn claim(
    arbiter: &mut dyn Arbiter,
    pair: &str,
    me: &str,
    joins_at: &str,
    stop: &AtomicBool,
    retry: &mut Backoff,
) -> anyhow::Result<Decision> {
    loop {
        match arbiter.claim(pair, me, 0, Some(joins_at)) {
            Ok(d) => return Ok(d),
            Err(e @ ft_arbiter::ArbiterError::Unavailable(_)) => {
                if stop.load(Ordering::Relaxed) {
                    anyhow::bail!("stopped while the arbiter was unreachable");
                }
                retry.wait(&format!("the arbiter gives no answer ({e}): not serving"));
            }
            Err(e) => return Err(e).context("claiming the new pair's first epoch"),
        }
    }
}

/// Pauses between attempts: 20 ms, doubling up to a maximum; says why at most once a second
/// (and at once when the reason changes).
struct Backoff {
    next: Duration,
    max: Duration,
    said: Option<(String, Instant)>,
}

impl Backoff {
    fn new(max: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(20),
            max,
            said: None,
        }
    }

    fn wait(&mut self, why: &str) {
        let repeat = self
            .said
            .as_ref()
            .is_some_and(|(w, at)| w == why && at.elapsed() < Duration::from_secs(1));
        if !repeat {
            tracing::info!("{why}; retrying in {} ms", self.next.as_millis());
            self.said = Some((why.to_owned(), Instant::now()));
        }
        std::thread::sleep(self.next);
        self.next = (self.next * 2).min(self.max);
    }
}
