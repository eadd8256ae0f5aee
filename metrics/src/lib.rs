//! ftvm's process metrics: one [`Metrics`] per process ([`METRICS`]), written where things
//! happen and read by the metrics endpoint ([`server`]) when Prometheus scrapes it or
//! `ftvm status` asks.
//!
//! Cost on the hot paths: an exit adds to one counter with a plain load and store (the vCPU
//! thread is its only writer); a released output adds to one histogram bucket and its sum the
//! same way; the log channel's numbers are the channel's own counters, read at scrape time
//! through a [`log::LogProbe`]. Everything else (failovers, joins, arbiter decisions,
//! rejected frames) happens a few times per failure.
//!
//! [`progress`] shows long runs to the person watching (a bar on a terminal, lines otherwise).

pub mod counter;
pub mod expose;
pub mod histogram;
pub mod log;
pub mod progress;
pub mod server;
pub mod state;
pub mod status;

pub use counter::{Counter, Gauge};
pub use histogram::{Histogram, HistogramSnapshot};
pub use log::{LogHandle, LogProbe, LogReading, LogSlot};
pub use server::{MetricsServer, ServeError};
pub use state::{ReplicaState, Role, StateCell, StateView};
pub use status::{fetch_status, Status};

use std::sync::Mutex;

/// The kinds of VM exit a replica counts (`ftvm_vm_exits_total{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    NetRx,
    NetTx,
    Clock,
    Random,
    /// `hlt` with interrupts enabled: the guest waits for a request or a tick.
    Wait,
    Halt,
}

impl ExitKind {
    /// Every kind, in label order.
    pub const ALL: [ExitKind; 6] = [
        ExitKind::NetRx,
        ExitKind::NetTx,
        ExitKind::Clock,
        ExitKind::Random,
        ExitKind::Wait,
        ExitKind::Halt,
    ];

    /// The `kind` label.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::NetRx => "net_rx",
            ExitKind::NetTx => "net_tx",
            ExitKind::Clock => "clock",
            ExitKind::Random => "random",
            ExitKind::Wait => "wait",
            ExitKind::Halt => "halt",
        }
    }
}

/// Why a received log frame or message was refused (`ftvm_log_frames_rejected_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCause {
    /// Failed validation (CRC, framing, lengths).
    Corrupt,
    /// From an older fencing epoch (a deposed primary).
    StaleEpoch,
    /// Does not continue the log (a gap or a repeat).
    SequenceGap,
    /// Not a frame of this protocol at all (e.g. a stray packet on a DPDK port).
    Garbage,
    /// A frame or ACK without a valid tag: forged, altered, replayed or reordered.
    Unauthenticated,
}

impl RejectCause {
    /// Every cause, in label order.
    pub const ALL: [RejectCause; 5] = [
        RejectCause::Corrupt,
        RejectCause::StaleEpoch,
        RejectCause::SequenceGap,
        RejectCause::Garbage,
        RejectCause::Unauthenticated,
    ];

    /// The `cause` label.
    pub fn name(self) -> &'static str {
        match self {
            RejectCause::Corrupt => "corrupt",
            RejectCause::StaleEpoch => "stale_epoch",
            RejectCause::SequenceGap => "sequence_gap",
            RejectCause::Garbage => "garbage",
            RejectCause::Unauthenticated => "unauthenticated",
        }
    }
}

/// Outcomes of asking the arbiter (`ftvm_arbiter_decisions_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Won,
    Lost,
    /// The arbiter gave no answer to one attempt (counted per attempt).
    Unavailable,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 3] = [Outcome::Won, Outcome::Lost, Outcome::Unavailable];

    /// The `outcome` label.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Won => "won",
            Outcome::Lost => "lost",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// What kind of ftvm process this is; decides which metric families it exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Process {
    /// `ftvm primary`, `backup` or `node`: a replica.
    Replica,
    /// `ftvm front`.
    Front,
    /// `ftvm arbiter serve`.
    Arbiter,
}

/// One number of a process-specific source ([`Metrics::set_source`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The full metric name (`ftvm_front_requests`; a counter gets `_total` added).
    pub name: &'static str,
    pub help: &'static str,
    /// A counter (else a gauge).
    pub counter: bool,
    pub value: f64,
}

impl Sample {
    /// A counter's sample.
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Sample {
        Sample {
            name,
            help,
            counter: true,
            value: value as f64,
        }
    }

    /// A gauge's sample.
    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Sample {
        Sample {
            name,
            help,
            counter: false,
            value,
        }
    }
}

/// Reads a process's own numbers (the front's, the arbiter server's) at each scrape.
pub type Source = Box<dyn Fn() -> Vec<Sample> + Send + Sync>;

/// Everything a process exports. One per process: [`METRICS`].
#[derive(Debug)]
pub struct Metrics {
    process: Mutex<Option<(Process, String)>>,
    /// The replica's state machine.
    pub state: StateCell,
    /// Output-commit latency: from the guest's output to its release (the backup's ACK).
    pub commit: Histogram,
    /// VM exits by [`ExitKind`].
    pub exits: [Counter; 6],
    /// Guest requests taken in (network inputs logged or replayed).
    pub requests: Counter,
    /// Frames refused by [`RejectCause`].
    pub frames_rejected: [Counter; RejectCause::ALL.len()],
    /// Times the peer was silent past the heartbeat timeout.
    pub heartbeats_missed: Counter,
    /// Times this replica went on live after its peer failed (a backup's takeover, or a primary
    /// going on alone after losing its backup), having won the arbiter.
    pub failovers: Counter,
    /// Times the primary kicked its backup for an ACK an output was waiting for.
    pub ack_kicks: Counter,
    /// Times the primary woke its backup's ACK helper for an ACK an output was waiting for.
    pub ack_helps: Counter,
    /// Joins served (primary) or made (backup): completed and failed.
    pub joins_completed: Counter,
    pub joins_failed: Counter,
    /// Joiners turned away (wrong configuration, or the pair already protected).
    pub joins_refused: Counter,
    /// How long the primary's guest stood still for a join.
    pub join_pause: Histogram,
    /// Join start to protected.
    pub join_duration: Histogram,
    /// Arbiter decisions asked for, by [`Outcome`].
    pub arbiter_decisions: [Counter; 3],
    /// First attempt to decision.
    pub arbiter_latency: Histogram,
    /// The log channel.
    pub log: LogSlot,
    /// The process's own numbers (`ftvm front`, `ftvm arbiter serve`).
    source: SourceCell,
}

/// Holds the process's [`Source`].
struct SourceCell(Mutex<Option<Source>>);

impl std::fmt::Debug for SourceCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SourceCell")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All at zero, starting.
    pub const fn new() -> Self {
        Metrics {
            process: Mutex::new(None),
            state: StateCell::new(),
            commit: Histogram::new(),
            exits: [const { Counter::new() }; 6],
            requests: Counter::new(),
            frames_rejected: [const { Counter::new() }; RejectCause::ALL.len()],
            heartbeats_missed: Counter::new(),
            failovers: Counter::new(),
            ack_kicks: Counter::new(),
            ack_helps: Counter::new(),
            joins_completed: Counter::new(),
            joins_failed: Counter::new(),
            joins_refused: Counter::new(),
            join_pause: Histogram::new(),
            join_duration: Histogram::new(),
            arbiter_decisions: [const { Counter::new() }; 3],
            arbiter_latency: Histogram::new(),
            log: LogSlot::new(),
            source: SourceCell(Mutex::new(None)),
        }
    }

    /// Says what this process is, and its name (e.g. the replica's name in the arbiter).
    pub fn set_process(&self, kind: Process, name: &str) {
        let mut p = self.process.lock().unwrap_or_else(|e| e.into_inner());
        *p = Some((kind, name.to_owned()));
    }

    /// What this process is (a replica unless said otherwise) and its name.
    pub fn process(&self) -> (Process, String) {
        self.process
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or((Process::Replica, String::new()))
    }

    /// Exports `source`'s numbers too (the front's, the arbiter server's).
    pub fn set_source(&self, source: Source) {
        *self.source.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// The source's numbers now.
    pub fn source_samples(&self) -> Vec<Sample> {
        self.source
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or_else(Vec::new, |f| f())
    }

    /// Counts one exit of `kind` (the vCPU thread is the only writer).
    #[inline]
    pub fn exit(&self, kind: ExitKind) {
        self.exits[kind as usize].add_single(1);
    }

    /// Counts a refused frame.
    pub fn rejected(&self, cause: RejectCause) {
        self.frames_rejected[cause as usize].inc();
    }

    /// Counts an arbiter decision (or an unanswered attempt).
    pub fn arbitrated(&self, outcome: Outcome) {
        self.arbiter_decisions[outcome as usize].inc();
    }
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics::new();
