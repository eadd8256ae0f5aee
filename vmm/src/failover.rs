//! Failover: what each replica does when the log channel between them fails.
//!
//! Neither side can tell a dead peer from a cut link, so neither decides alone: each survivor
//! asks the pair's [`Arbiter`] for an atomic test-and-set of the next fencing epoch, and only a
//! [`Decision::Won`] lets it go on.
//!
//! - **Backup** ([`Failover`]): when the channel fails it first replays every entry it received
//!   (they are all in its own buffer: the channel hands over each frame it validated, even after
//!   a failure), then, at the first exit the log has nothing for, asks the arbiter. A win makes it
//!   the primary: it registers the new epoch at the service front and continues the same guest,
//!   at the same exit, with live inputs (a [`Recorder`] without a backup). A loss halts it.
//! - **Primary** ([`FailoverSink`]): when it loses its backup it asks the arbiter before it
//!   continues unreplicated; a win releases the outputs it was holding (nobody else can now) in
//!   the new epoch, a loss means it was deposed: it discards them and halts.
//!
//! An arbiter that cannot be reached gives no decision: the replica waits, retrying, and never
//! goes live without a win. A replica that is asked to stop while waiting stops with
//! [`EngineError::NoDecision`].

use ftvm_metrics::{Outcome, ReplicaState, Role, METRICS};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ft_arbiter::{Arbiter, Decision};
use logfmt::Entry;
use transport::{PreSharedKey, Primary, PrimaryLink, StatsSnapshot};

use crate::engine::{EngineError, EventSource};
use crate::journal::AloneLog;
use crate::record::{LogSink, RecordConfig, Recorder};
use crate::replay::{EntrySource, Replayer};
use crate::service::ServicePort;

/// How a replica asks the arbiter.
pub struct ArbiterClient {
    /// The backend.
    pub arbiter: Box<dyn Arbiter>,
    /// The FT pair's id at the arbiter.
    pub pair_id: String,
    /// This replica's unique name.
    pub candidate: String,
    /// Where this replica accepts joining backups once live (recorded with a win, so a new
    /// backup finds it).
    pub joins_at: Option<String>,
    /// Pause between attempts while the arbiter is unreachable.
    pub retry: Duration,
    /// Set to give up waiting (SIGTERM).
    pub stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for ArbiterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArbiterClient")
            .field("pair_id", &self.pair_id)
            .field("candidate", &self.candidate)
            .field("joins_at", &self.joins_at)
            .finish_non_exhaustive()
    }
}

/// What one arbitration took and gave.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Arbitration {
    /// Whether this replica won.
    pub won: bool,
    /// The winner's name.
    pub winner: String,
    /// The winner's (new) epoch.
    pub epoch: u64,
    /// Attempts that found the arbiter unavailable.
    pub unavailable: u32,
    /// Time from the first attempt to the decision, ms.
    pub decide_ms: f64,
}

impl ArbiterClient {
    /// Asks until there is a decision (waiting, and saying so once, while the arbiter is
    /// unreachable). Only [`Arbitration::won`] lets the caller go live.
    pub fn decide(&mut self, epoch: u64) -> Result<Arbitration, EngineError> {
        let started = Instant::now();
        let mut unavailable = 0u32;
        loop {
            match self.arbiter.claim(
                &self.pair_id,
                &self.candidate,
                epoch,
                self.joins_at.as_deref(),
            ) {
                Ok(d) => {
                    let (won, winner) = match &d {
                        Decision::Won { .. } => (true, self.candidate.clone()),
                        Decision::Lost { winner, .. } => (false, winner.clone()),
                    };
                    METRICS.arbitrated(if won { Outcome::Won } else { Outcome::Lost });
                    METRICS.arbiter_latency.observe(started.elapsed());
                    return Ok(Arbitration {
                        won,
                        winner,
                        epoch: d.epoch(),
                        unavailable,
                        decide_ms: started.elapsed().as_secs_f64() * 1e3,
                    });
                }
                Err(e) => {
                    METRICS.arbitrated(Outcome::Unavailable);
                    if unavailable == 0 {
                        tracing::warn!(
                            "{}: arbiter gave no decision ({e}); waiting, not going live",
                            self.candidate
                        );
                    }
                    unavailable = unavailable.saturating_add(1);
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(EngineError::NoDecision(e.to_string()));
                    }
                    std::thread::sleep(self.retry);
                }
            }
        }
    }
}

enum SinkState<L: PrimaryLink> {
    Replicated(Box<Primary<L>>),
    Alone(AloneLog),
}

/// The primary's log sink: the channel to the backup while it works; after it fails, the
/// arbiter's verdict — unreplicated in the next epoch, or deposed.
pub struct FailoverSink<L: PrimaryLink> {
    state: SinkState<L>,
    /// While replicated after running alone with a journal: that log, still journaling every
    /// entry, so the journal covers the whole run whatever the state.
    shadow: Option<AloneLog>,
    arbiter: Option<ArbiterClient>,
    log_bytes: u64,
    /// The channel's counters when it was lost.
    last_stats: Option<StatsSnapshot>,
    arbitration: Option<Arbitration>,
    lost_backup: Option<String>,
    protection: Option<Arc<crate::join::Protection>>,
}

impl<L: PrimaryLink> std::fmt::Debug for FailoverSink<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailoverSink")
            .field(
                "replicated",
                &matches!(self.state, SinkState::Replicated(_)),
            )
            .field("arbitration", &self.arbitration)
            .finish_non_exhaustive()
    }
}

impl<L: PrimaryLink> FailoverSink<L> {
    /// Replicates through `primary`; on a channel failure asks `arbiter` (without one, the
    /// failure ends the run, as before).
    pub fn new(primary: Primary<L>, arbiter: Option<ArbiterClient>) -> Self {
        Self::in_state(SinkState::Replicated(Box::new(primary)), arbiter)
    }

    fn in_state(state: SinkState<L>, arbiter: Option<ArbiterClient>) -> Self {
        FailoverSink {
            state,
            shadow: None,
            arbiter,
            log_bytes: 0,
            last_stats: None,
            arbitration: None,
            lost_backup: None,
            protection: None,
        }
    }

    /// Unprotected from the start: `log` (in its epoch, its sequence numbers going on) until a
    /// backup joins ([`Self::protect`]); `arbiter` is asked if that backup is lost later.
    pub fn alone(log: AloneLog, arbiter: Option<ArbiterClient>) -> Self {
        Self::in_state(SinkState::Alone(log), arbiter)
    }

    /// Keeps `p` up to date with this log's state (live, protected, epoch) as it changes.
    pub fn with_protection(mut self, p: Arc<crate::join::Protection>) -> Self {
        p.set(true, self.is_protected(), self.epoch());
        self.protection = Some(p);
        self
    }

    fn note_state(&self) {
        if let Some(p) = &self.protection {
            p.set(true, self.is_protected(), self.epoch());
        }
    }

    /// Whether a backup has the log now.
    pub fn is_protected(&self) -> bool {
        matches!(self.state, SinkState::Replicated(_))
    }

    /// The sequence number the next entry gets.
    pub fn next_seq(&self) -> u64 {
        match &self.state {
            SinkState::Replicated(p) => p.last_seq() + 1,
            SinkState::Alone(a) => a.next_seq(),
        }
    }

    /// A backup joined (it has the guest's state up to this point, and expects the log from
    /// [`Self::next_seq`] on, in this epoch): replicate through `primary` from now on, so
    /// outputs wait for its ACKs again. Refused while another backup has the log, or if
    /// `primary`'s log does not continue this one.
    pub fn protect(&mut self, primary: Primary<L>) -> Result<(), EngineError> {
        let SinkState::Alone(alone) = &self.state else {
            return Err(EngineError::Join("a backup already has the log".into()));
        };
        let (next, epoch) = (alone.next_seq(), alone.epoch());
        let (theirs, their_epoch) = (primary.last_seq() + 1, primary.config().epoch);
        if theirs != next || their_epoch != epoch {
            return Err(EngineError::Join(format!(
                "the new channel starts at entry {theirs} in epoch {their_epoch}, the log is at \
                 entry {next} in epoch {epoch}"
            )));
        }
        self.log_bytes = 0;
        self.lost_backup = None;
        if let SinkState::Alone(alone) =
            std::mem::replace(&mut self.state, SinkState::Replicated(Box::new(primary)))
        {
            self.shadow = alone.has_journal().then_some(alone);
        }
        self.note_state();
        METRICS.state.set(
            ReplicaState::Protected,
            Role::Primary,
            epoch,
            "a backup joined: outputs wait for its ACKs again",
        );
        Ok(())
    }

    /// The arbitration, if the backup was lost.
    pub fn arbitration(&self) -> Option<&Arbitration> {
        self.arbitration.as_ref()
    }

    /// Why the backup was lost, if it was.
    pub fn lost_backup(&self) -> Option<&str> {
        self.lost_backup.as_deref()
    }

    /// The channel's counters (lag control among them): now, or when the backup was lost.
    pub fn channel_stats(&self) -> Option<StatsSnapshot> {
        match &self.state {
            SinkState::Replicated(p) => Some(p.stats()),
            SinkState::Alone(_) => self.last_stats,
        }
    }

    /// Handles a failed channel operation: asks the arbiter; on a win continues alone.
    fn failed(&mut self, e: EngineError) -> Result<(), EngineError> {
        let SinkState::Replicated(p) = &self.state else {
            return Err(e);
        };
        let Some(arbiter) = self.arbiter.as_mut() else {
            return Err(e);
        };
        let epoch = p.config().epoch;
        self.log_bytes = p.stats().bytes;
        self.last_stats = Some(p.stats());
        self.lost_backup = Some(e.to_string());
        tracing::warn!(
            "{}: lost the backup ({e}); asking the arbiter",
            arbiter.candidate
        );
        let a = arbiter.decide(epoch)?;
        self.arbitration = Some(a.clone());
        if !a.won {
            METRICS.state.set(
                ReplicaState::Deposed,
                Role::Primary,
                epoch,
                &format!("lost the backup ({e}); {} won epoch {}", a.winner, a.epoch),
            );
            return Err(EngineError::Deposed {
                epoch,
                by: format!("{} won epoch {}", a.winner, a.epoch),
            });
        }
        tracing::info!(
            "{}: won epoch {} in {:.1} ms; continuing unreplicated",
            arbiter.candidate,
            a.epoch,
            a.decide_ms
        );
        // Alone, everything counts as acknowledged: the outputs held for the lost backup go
        // out now, stamped with the epoch just won. Sequence numbers go on, so a backup that
        // joins later continues this log.
        let next = p.last_seq() + 1;
        let alone = match self.shadow.take() {
            Some(journaling) => journaling.in_epoch(a.epoch),
            None => AloneLog::new(a.epoch, next, None),
        };
        self.state = SinkState::Alone(alone);
        self.note_state();
        METRICS.failovers.inc();
        METRICS.state.set_peer(None);
        METRICS.state.set(
            ReplicaState::Unprotected,
            Role::Primary,
            a.epoch,
            &format!("lost the backup ({e}); won the arbiter"),
        );
        Ok(())
    }
}

impl<L: PrimaryLink> LogSink for FailoverSink<L> {
    fn append(&mut self, entry: &Entry<'_>) -> Result<u64, EngineError> {
        if let SinkState::Replicated(p) = &mut self.state {
            match p.append(entry) {
                Ok(seq) => {
                    if let Some(shadow) = &mut self.shadow {
                        shadow.append(entry)?;
                    }
                    return Ok(seq);
                }
                Err(e) => self.failed(e.into())?,
            }
        }
        match &mut self.state {
            SinkState::Alone(n) => n.append(entry),
            SinkState::Replicated(_) => unreachable!("failed() leaves the sink alone or errs"),
        }
    }

    fn pump(&mut self) -> Result<(), EngineError> {
        if let SinkState::Replicated(p) = &mut self.state {
            if let Err(e) = p.pump() {
                self.failed(e.into())?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), EngineError> {
        if let SinkState::Replicated(p) = &mut self.state {
            if let Err(e) = p.flush() {
                self.failed(e.into())?;
            }
        }
        Ok(())
    }

    fn acked(&self) -> u64 {
        match &self.state {
            SinkState::Replicated(p) => p.acked(),
            SinkState::Alone(n) => n.acked(),
        }
    }

    fn wait_acked(&mut self, seq: u64) -> Result<(), EngineError> {
        match &mut self.state {
            SinkState::Replicated(p) => {
                if let Err(e) = p.wait_acked(seq) {
                    self.failed(e.into())?;
                }
            }
            SinkState::Alone(alone) => alone.wait_acked(seq)?,
        }
        if let Some(shadow) = &mut self.shadow {
            shadow.wait_acked(seq)?;
        }
        Ok(())
    }

    fn log_bytes(&self) -> u64 {
        match &self.state {
            SinkState::Replicated(p) => p.stats().bytes,
            SinkState::Alone(_) => self.log_bytes,
        }
    }

    fn epoch(&self) -> u64 {
        match &self.state {
            SinkState::Replicated(p) => p.config().epoch,
            SinkState::Alone(n) => n.epoch(),
        }
    }

    fn kick(&mut self) -> bool {
        match &mut self.state {
            SinkState::Replicated(p) => p.kick(),
            SinkState::Alone(_) => false,
        }
    }

    fn wake_ack_helper(&mut self) -> bool {
        match &mut self.state {
            SinkState::Replicated(p) => p.wake_ack_helper(),
            SinkState::Alone(_) => false,
        }
    }
}

/// The log of a replica serving live: replicated to a backup over any medium, or alone (and
/// joinable).
pub type LiveLog = FailoverSink<transport::medium::AnyPrimaryLink>;

/// What the backup needs to take over.
#[derive(Debug)]
pub struct Takeover {
    /// The arbiter.
    pub arbiter: ArbiterClient,
    /// The epoch the pair ran in.
    pub epoch: u64,
    /// The service port to serve clients on once live (behind the front, normally).
    pub port: ServicePort,
    /// Key and pair id for registering at the front.
    pub key: PreSharedKey,
    /// Pair id at the front.
    pub session: u64,
    /// Recorder settings once live (the clock base is filled in here).
    pub record: RecordConfig,
    /// Stops the live run (SIGTERM).
    pub stop: Arc<AtomicBool>,
    /// Once live: pause at an exit boundary when this is set (a backup joining the survivor),
    /// and keep this protection state up to date ([`crate::join::JoinService`]).
    pub joins: Option<(Arc<AtomicBool>, Arc<crate::join::Protection>)>,
}

/// What happened when the backup's log ended.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TakeoverReport {
    /// Why the channel ended.
    pub cause: String,
    /// The first exit the log had nothing for (the first live exit, on a win).
    pub exit: u64,
    /// The arbiter's answer.
    pub arbitration: Arbitration,
    /// From the end of the log to serving live (arbiter and front registration), ms.
    pub takeover_ms: f64,
    /// Wall-clock time (ns since the Unix epoch) at which the channel's failure was noticed,
    /// for comparing with events in other processes.
    pub detected_unix_ns: u64,
    /// Wall-clock time at which the log's last entry had been replayed.
    pub log_end_unix_ns: u64,
}

/// Nanoseconds since the Unix epoch, now.
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

enum Mode<S: EntrySource> {
    Replay(Box<Replayer<S>>),
    Live(Box<Recorder<LiveLog>>),
    Switching,
}

/// The backup's event source: replays the log; when it ends, asks the arbiter and (on a win)
/// continues the same guest live. See the module docs.
pub struct Failover<S: EntrySource> {
    mode: Mode<S>,
    takeover: Option<Takeover>,
    report: Option<TakeoverReport>,
    replayed_entries: u64,
    outputs_checked: u64,
}

impl<S: EntrySource> std::fmt::Debug for Failover<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("live", &matches!(self.mode, Mode::Live(_)))
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl<S: EntrySource> Failover<S> {
    /// Replays through `replayer`; with `takeover`, goes live when the log ends (without it, the
    /// end of the log ends the run).
    pub fn new(replayer: Replayer<S>, takeover: Option<Takeover>) -> Self {
        Failover {
            mode: Mode::Replay(Box::new(replayer)),
            takeover,
            report: None,
            replayed_entries: 0,
            outputs_checked: 0,
        }
    }

    /// The replayer, while replaying.
    pub fn replayer(&self) -> Option<&Replayer<S>> {
        match &self.mode {
            Mode::Replay(r) => Some(r),
            _ => None,
        }
    }

    /// The live recorder, after a takeover.
    pub fn recorder(&self) -> Option<&Recorder<LiveLog>> {
        match &self.mode {
            Mode::Live(r) => Some(r),
            _ => None,
        }
    }

    /// The live recorder, after a takeover, to change its log (a backup joined).
    pub fn recorder_mut(&mut self) -> Option<&mut Recorder<LiveLog>> {
        match &mut self.mode {
            Mode::Live(r) => Some(r),
            _ => None,
        }
    }

    /// What the takeover did, if the log ended.
    pub fn report(&self) -> Option<&TakeoverReport> {
        self.report.as_ref()
    }

    /// Log entries received from the primary.
    pub fn replayed_entries(&self) -> u64 {
        match &self.mode {
            Mode::Replay(r) => r.entries(),
            _ => self.replayed_entries,
        }
    }

    /// Outputs whose digest matched the primary's.
    pub fn outputs_checked(&self) -> u64 {
        match &self.mode {
            Mode::Replay(r) => r.outputs_checked(),
            _ => self.outputs_checked,
        }
    }

    /// Called with the error of a replay step: a log end with a takeover configured goes live
    /// (or halts, deposed); anything else is returned.
    fn on_replay_error(&mut self, e: EngineError) -> Result<(), EngineError> {
        let EngineError::LogEnded { exit, cause } = e else {
            return Err(e);
        };
        let Some(mut t) = self.takeover.take() else {
            return Err(EngineError::LogEnded { exit, cause });
        };
        let ended_at = Instant::now();
        let log_end_unix_ns = unix_ns();
        let Mode::Replay(mut replayer) = std::mem::replace(&mut self.mode, Mode::Switching) else {
            return Err(EngineError::LogEnded { exit, cause });
        };
        self.replayed_entries = replayer.entries();
        self.outputs_checked = replayer.outputs_checked();
        tracing::warn!(
            "{}: log ended at exit {exit} ({cause}); every received entry replayed; asking the arbiter",
            t.arbiter.candidate
        );
        METRICS.state.set(
            ReplicaState::TakingOver,
            Role::Backup,
            t.epoch,
            &format!("the log ended at exit {exit} ({cause}); asking the arbiter"),
        );
        let arbitration = t.arbiter.decide(t.epoch)?;
        let mut report = TakeoverReport {
            cause,
            exit,
            arbitration: arbitration.clone(),
            takeover_ms: 0.0,
            detected_unix_ns: replayer.ended_unix_ns(),
            log_end_unix_ns,
        };
        if !arbitration.won {
            METRICS.state.set(
                ReplicaState::Deposed,
                Role::Backup,
                t.epoch,
                &format!("{} won epoch {}", arbitration.winner, arbitration.epoch),
            );
            self.report = Some(report);
            return Err(EngineError::Deposed {
                epoch: t.epoch,
                by: format!("{} won epoch {}", arbitration.winner, arbitration.epoch),
            });
        }
        let epoch = arbitration.epoch;
        let newest = t
            .port
            .register(&t.key, t.session, epoch, Duration::from_secs(5))?;
        if newest > epoch {
            METRICS.state.set(
                ReplicaState::Deposed,
                Role::Backup,
                epoch,
                &format!("the service front knows epoch {newest}"),
            );
            self.report = Some(report);
            return Err(EngineError::Deposed {
                epoch,
                by: format!("the service front knows epoch {newest}"),
            });
        }
        let mut record = t.record.clone();
        record.clock_base_ns = replayer.last_clock_ns().saturating_add(1);
        let journal = replayer.take_journal().unwrap_or_else(|e| {
            tracing::error!(
                "{}: journal lost ({e}); going on without it",
                t.arbiter.candidate
            );
            None
        });
        let candidate = t.arbiter.candidate.clone();
        // Alone, journaling, and ready for a new backup to join: one that is lost later is
        // handled as the original primary handles losing its backup (the arbiter again).
        let log = AloneLog::new(epoch, replayer.last_seq() + 1, journal);
        let mut sink = FailoverSink::alone(log, Some(t.arbiter));
        if let Some((_, protection)) = &t.joins {
            sink = sink.with_protection(protection.clone());
        }
        let mut recorder =
            Recorder::new(sink, t.port, record, t.stop)?.reregister_with(t.key, t.session);
        if let Some((pause, _)) = t.joins {
            recorder = recorder.with_pause(pause);
        }
        report.takeover_ms = ended_at.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            "{candidate}: won epoch {epoch}; live at exit {exit} ({:.1} ms after the log ended)",
            report.takeover_ms
        );
        self.report = Some(report);
        self.mode = Mode::Live(Box::new(recorder));
        METRICS.failovers.inc();
        METRICS.state.set_peer(None);
        METRICS.state.set(
            ReplicaState::Unprotected,
            Role::Primary,
            epoch,
            &format!("took over at exit {exit}: the primary's log ended"),
        );
        Ok(())
    }
}

/// Runs `$call` on the replayer; a log end switches to live and runs it on the recorder.
macro_rules! step {
    ($self:ident, $src:ident => $call:expr) => {{
        if let Mode::Replay($src) = &mut $self.mode {
            match $call {
                Err(e) => $self.on_replay_error(e)?,
                ok => return ok,
            }
        }
        match &mut $self.mode {
            Mode::Live($src) => $call,
            _ => Err(EngineError::NoDecision("no source after a takeover".into())),
        }
    }};
}

impl<S: EntrySource> EventSource for Failover<S> {
    fn should_stop(&mut self, exit: u64) -> Result<bool, EngineError> {
        step!(self, s => s.should_stop(exit))
    }

    fn interrupts(&mut self, exit: u64, out: &mut Vec<u8>) -> Result<(), EngineError> {
        step!(self, s => s.interrupts(exit, out))
    }

    fn net_rx(&mut self, exit: u64, buf: &mut Vec<u8>) -> Result<(), EngineError> {
        step!(self, s => s.net_rx(exit, buf))
    }

    fn wake(&mut self, exit: u64, rx: &mut Vec<u8>) -> Result<Option<u8>, EngineError> {
        step!(self, s => s.wake(exit, rx))
    }

    fn clock(&mut self, exit: u64) -> Result<u64, EngineError> {
        step!(self, s => s.clock(exit))
    }

    fn random(&mut self, exit: u64) -> Result<[u8; 16], EngineError> {
        step!(self, s => s.random(exit))
    }

    fn output(&mut self, exit: u64, device: u16, bytes: &[u8]) -> Result<(), EngineError> {
        step!(self, s => s.output(exit, device, bytes))
    }

    fn pause_after(&mut self, exit: u64) -> bool {
        match &mut self.mode {
            Mode::Live(r) => r.pause_after(exit),
            _ => false,
        }
    }

    fn on_vcpu_thread(&mut self) {
        match &mut self.mode {
            Mode::Replay(r) => r.on_vcpu_thread(),
            Mode::Live(r) => r.on_vcpu_thread(),
            _ => {}
        }
    }

    fn interrupted(&mut self) {
        match &mut self.mode {
            Mode::Replay(r) => r.interrupted(),
            Mode::Live(r) => r.interrupted(),
            _ => {}
        }
    }
}
