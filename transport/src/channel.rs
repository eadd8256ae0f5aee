//! The channel protocol, independent of the medium.
//!
//! ```text
//! primary                                                      backup
//!  LogWriter ──frames──► log ring ──► Sender ──PrimaryLink══BackupLink──► Receiver ──► backup ring ──► replay
//!      ▲                                 │                                   │
//!      └──── acked (cumulative seq) ◄────┴──────────── ACK ◄─────────────────┘
//! ```
//! - [`LogWriter`] (the vCPU thread) batches entries into frames; an output marker flushes at
//!   once, so its commit waits for no batch. Appends are throttled (and counted) when the
//!   backup's *replay* lags behind by more than the configured bound
//!   ([`ChannelConfig::max_lag_time`], `max_lag_entries`, `max_lag_bytes`): VMware FT's lag
//!   control, which bounds what a failover has to drain.
//! - [`Sender`] moves frames from the log ring onto the medium, reads ACKs, sends heartbeats
//!   (empty frames) and notices a silent backup. It runs on its own pinned thread, or inline in
//!   the caller's thread ([`Primary`]) — on a 2-core machine a separate sender thread would
//!   share a core with the vCPU or the backup and cost a context switch per hand-off.
//! - [`Receiver`] validates every frame completely (CRC, sequence, epoch) before it lands in the
//!   backup's own ring, and only then acknowledges it: nothing acknowledged can be lost by the
//!   receiver, and a bad frame is never applied.
//! - The replica reads entries in place from that ring ([`Backup::next_entry`],
//!   [`Backup::advance`]); a frame's space is freed once its last entry is replayed, so the ring
//!   bounds the backup's memory. Every ACK also carries the replay position ([`Ack`]).
//!
//! Sequence numbers start at 1; an ACK of `n` covers every entry up to and including `n`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use logfmt::{Entry, Event, FrameBuf, FrameHeader, FrameView};

use crate::auth::{
    AckOpener, AckSealer, ChannelCrypto, FrameOpener, FrameSealer, SessionKeys, TRAILER_LEN,
};
use crate::error::ChannelError;
use crate::handshake::{GuestIdentity, MediumKind, PreSharedKey, SessionParams};
use crate::poll::PollPolicy;
use crate::region::HeapRegion;
use crate::ring::{self, Consumer, Producer, RingError};
use crate::trace::{self, BackupPoint, PrimaryPoint};

/// How the channel behaves; both sides should use the same timing values.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// Identifies the FT pair.
    pub session_id: u64,
    /// This side's fencing epoch.
    pub epoch: u64,
    /// The pre-shared key for the handshake.
    pub key: PreSharedKey,
    /// What protects frames and ACKs after the handshake ([`crate::auth`]); both sides must
    /// use the same. Default: [`ChannelCrypto::Auth`].
    pub crypto: ChannelCrypto,
    /// What this side runs, compared in the handshake: the peer must run the same (opaque
    /// here; all zero by default).
    pub guest: GuestIdentity,
    /// How often a side that has nothing else to send tells the other it is alive.
    pub heartbeat_interval: Duration,
    /// Silence after which the peer is declared gone.
    pub heartbeat_timeout: Duration,
    /// Limit for each handshake step.
    pub handshake_timeout: Duration,
    /// The backup's side: the sequence number of the first entry it expects, which it names in
    /// its welcome and the primary's log starts at: 1 for a new log; for a backup that joined
    /// a running primary by state transfer, the first entry after the transferred state.
    pub resume_seq: u64,
    /// Largest frame (header included); entries are batched up to this size.
    pub max_frame_bytes: usize,
    /// Lag bound in entries: appends wait while more entries than this are not yet replayed by
    /// the backup (replayed entries are acknowledged ones, so this bounds those too).
    pub max_lag_entries: u64,
    /// Lag bound in bytes: appends wait while the frames the backup has not finished replaying
    /// hold more bytes than this (the backup's ring holds them, so keep it below
    /// [`ChannelConfig::ring_capacity`] for the ACKs to keep flowing while it catches up).
    pub max_lag_bytes: u64,
    /// Lag bound in time: what a failover may have to drain. Appends wait while the backup
    /// would need longer than [`LAG_TARGET`] of this to replay what it has received and not
    /// replayed, at its replay rate as measured from its reports (before a rate is known: while
    /// the oldest unreplayed frame is older than that); the headroom absorbs the rate
    /// estimate's error and the frames sealed between two checks. `None`: no time bound.
    pub max_lag_time: Option<Duration>,
    /// If set, a batch is flushed once its first entry is this old (checked at each append), so
    /// the backup follows the primary closely instead of a batch behind. Output markers always
    /// flush at once. Off by default: when the backup's ACKs come from its vCPU thread (as on
    /// 2-core hosts), a backup that trails by a batch is idle, and so ACKs at once, when an
    /// output marker arrives; a closely following one is inside the guest and ACKs at its next
    /// exit (measured: commit p50 0.8 µs batched, 25-50 µs with a 20 µs flush delay).
    pub max_batch_delay: Option<Duration>,
    /// Data capacity of each side's log ring (a power of two, at least 2 × `max_frame_bytes`).
    pub ring_capacity: usize,
    /// How waits escalate from spinning to sleeping.
    pub poll: PollPolicy,
    /// Wait for the medium in the kernel (`poll(2)`) instead of busy-polling, where the medium
    /// supports it (TCP). Lower CPU use, higher latency.
    pub blocking: bool,
}

impl ChannelConfig {
    /// Defaults suited to a local pair: 5 ms heartbeats, 200 ms timeout, 64 KiB frames, a 4 MiB
    /// ring and a replay lag of at most 100 ms, 2 MiB or 2^20 entries.
    pub fn new(session_id: u64, epoch: u64, key: PreSharedKey) -> Self {
        ChannelConfig {
            session_id,
            epoch,
            key,
            guest: GuestIdentity::default(),
            crypto: ChannelCrypto::Auth,
            heartbeat_interval: Duration::from_millis(5),
            heartbeat_timeout: Duration::from_millis(200),
            handshake_timeout: Duration::from_secs(5),
            resume_seq: 1,
            max_frame_bytes: 64 * 1024,
            max_lag_entries: 1 << 20,
            max_lag_bytes: 2 << 20,
            max_lag_time: Some(DEFAULT_MAX_LAG),
            max_batch_delay: None,
            ring_capacity: 4 << 20,
            poll: PollPolicy::BUSY,
            blocking: false,
        }
    }

    /// What the handshake over `medium` must agree on: this pair, this epoch, this key, this
    /// guest.
    pub fn session_params(&self, medium: MediumKind) -> SessionParams {
        SessionParams {
            session_id: self.session_id,
            epoch: self.epoch,
            medium,
            key: self.key.clone(),
            guest: self.guest,
            crypto: self.crypto,
        }
    }

    /// Checks the values fit together.
    pub fn validate(&self) -> Result<(), ChannelError> {
        let bad = |m: String| Err(ChannelError::Config(m));
        if self.max_frame_bytes < logfmt::FRAME_HEADER_LEN + 64
            || self.max_frame_bytes > logfmt::MAX_FRAME_LEN
        {
            return bad(format!(
                "max frame size {} outside {}..={}",
                self.max_frame_bytes,
                logfmt::FRAME_HEADER_LEN + 64,
                logfmt::MAX_FRAME_LEN
            ));
        }
        if !self.ring_capacity.is_power_of_two()
            || self.ring_capacity / 2 - ring::RECORD_HEADER_LEN < self.max_frame_bytes
        {
            return bad(format!(
                "ring capacity {} must be a power of two of at least twice the max frame size {} (+16)",
                self.ring_capacity, self.max_frame_bytes
            ));
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_timeout <= self.heartbeat_interval {
            return bad(format!(
                "heartbeat timeout {:?} must exceed the heartbeat interval {:?} (> 0)",
                self.heartbeat_timeout, self.heartbeat_interval
            ));
        }
        if self.max_lag_entries == 0 {
            return bad("max lag must be at least one entry".into());
        }
        if self.max_lag_bytes < self.max_frame_bytes as u64 {
            return bad(format!(
                "max lag of {} bytes is less than one frame ({} bytes)",
                self.max_lag_bytes, self.max_frame_bytes
            ));
        }
        if self.max_lag_time.is_some_and(|t| t.is_zero()) {
            return bad("a max lag time must be more than zero".into());
        }
        Ok(())
    }
}

/// The fraction of [`ChannelConfig::max_lag_time`] that lag control holds the backup's replay
/// lag to (numerator, denominator): the rest is headroom, so the lag a failover drains stays
/// under the bound itself.
pub const LAG_TARGET: (u32, u32) = (3, 4);

/// The default bound on the backup's replay lag ([`ChannelConfig::max_lag_time`]).
pub const DEFAULT_MAX_LAG: Duration = Duration::from_millis(100);

/// How often, at most, a backup whose replay moved reports it when it has nothing else to send.
pub const REPLAY_REPORT_INTERVAL: Duration = Duration::from_micros(500);

/// Counters of a channel end, readable from any thread while it runs.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// Frames handed to the medium (primary) or accepted (backup), heartbeats excluded.
    pub frames: AtomicU64,
    /// Entries in those frames.
    pub entries: AtomicU64,
    /// Bytes of those frames.
    pub bytes: AtomicU64,
    /// Heartbeats sent.
    pub heartbeats: AtomicU64,
    /// Times an append waited because the backup lagged or the ring was full.
    pub throttle_events: AtomicU64,
    /// Total nanoseconds appends spent throttled.
    pub throttled_ns: AtomicU64,
    /// Times the medium refused a frame for lack of room (it was retried later).
    pub medium_full: AtomicU64,
    /// Times an append waited because the backup's replay lagged beyond the bound (also
    /// counted in `throttle_events`).
    pub lag_throttles: AtomicU64,
    /// Largest replay lag seen when a frame was sealed, in ns (the time the backup needs to
    /// replay its backlog); appends wait while it exceeds [`ChannelConfig::max_lag_time`].
    pub lag_max_ns: AtomicU64,
    /// Largest replay lag seen when a frame was sealed, in bytes.
    pub lag_max_bytes: AtomicU64,
    /// Largest replay lag seen when a frame was sealed, in entries.
    pub lag_max_entries: AtomicU64,
    /// Primary: the last sequence number sealed into a frame. Backup: the last acknowledged
    /// (as of the last ACK sent).
    pub last_seq: AtomicU64,
    /// Primary: the replay lag at the last sealed frame, ns (lag control's estimate). Backup:
    /// the replay position as of the last ACK sent.
    pub lag_now: AtomicU64,
}

impl ChannelStats {
    /// Adds to a counter. Every counter has one writing thread (the writer's, the sender's or
    /// the receiver's), so a plain load and store does: no locked read-modify-write on the
    /// commit path. Readers on other threads see a recent value.
    fn add(counter: &AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Sets a current value (one writing thread, as for [`ChannelStats::add`]).
    fn set(counter: &AtomicU64, n: u64) {
        counter.store(n, Ordering::Relaxed);
    }

    /// Raises a maximum (one writing thread, as for [`ChannelStats::add`]).
    fn max(counter: &AtomicU64, n: u64) {
        if n > counter.load(Ordering::Relaxed) {
            counter.store(n, Ordering::Relaxed);
        }
    }

    /// A plain copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            frames: g(&self.frames),
            entries: g(&self.entries),
            bytes: g(&self.bytes),
            heartbeats: g(&self.heartbeats),
            throttle_events: g(&self.throttle_events),
            throttled_ns: g(&self.throttled_ns),
            medium_full: g(&self.medium_full),
            lag_throttles: g(&self.lag_throttles),
            lag_max_ns: g(&self.lag_max_ns),
            lag_max_bytes: g(&self.lag_max_bytes),
            lag_max_entries: g(&self.lag_max_entries),
        }
    }
}

/// A copy of [`ChannelStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct StatsSnapshot {
    pub frames: u64,
    pub entries: u64,
    pub bytes: u64,
    pub heartbeats: u64,
    pub throttle_events: u64,
    pub throttled_ns: u64,
    pub medium_full: u64,
    pub lag_throttles: u64,
    pub lag_max_ns: u64,
    pub lag_max_bytes: u64,
    pub lag_max_entries: u64,
}

/// Reads a primary end's counters for the metrics endpoint.
#[derive(Debug)]
struct PrimaryProbe(Arc<PrimaryShared>);

impl ftvm_metrics::LogProbe for PrimaryProbe {
    fn read(&self) -> ftvm_metrics::LogReading {
        let s = &self.0.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let sealed = g(&s.last_seq);
        ftvm_metrics::LogReading {
            entries: g(&s.entries),
            bytes: g(&s.bytes),
            frames: g(&s.frames),
            heartbeats: g(&s.heartbeats),
            ack_lag_entries: sealed.saturating_sub(self.0.acked.load(Ordering::Relaxed)),
            replay_lag_entries: sealed.saturating_sub(self.0.replayed.load(Ordering::Relaxed)),
            replay_lag_ns: g(&s.lag_now),
        }
    }
}

/// Reads a backup end's counters for the metrics endpoint.
#[derive(Debug)]
struct BackupProbe(Arc<ChannelStats>);

impl ftvm_metrics::LogProbe for BackupProbe {
    fn read(&self) -> ftvm_metrics::LogReading {
        let s = &self.0;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ftvm_metrics::LogReading {
            entries: g(&s.entries),
            bytes: g(&s.bytes),
            frames: g(&s.frames),
            heartbeats: g(&s.heartbeats),
            ack_lag_entries: 0,
            replay_lag_entries: g(&s.last_seq).saturating_sub(g(&s.lag_now)),
            replay_lag_ns: 0,
        }
    }
}

/// What a primary learns from one poll of its medium.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackupNews {
    /// The newest cumulative ACK that arrived, if any.
    pub acked: Option<u64>,
    /// The newest replay position that arrived with it: every entry up to this sequence
    /// number has been replayed by the backup.
    pub replayed: Option<u64>,
    /// Whether anything at all (ACK or heartbeat) arrived.
    pub heard: bool,
}

/// The primary's end of a medium: one-sided appends of whole frames into the backup's buffer,
/// cumulative ACKs back. Implemented once per medium; nothing above it knows which one runs.
pub trait PrimaryLink: Send {
    /// Offers one whole frame. `Ok(true)`: the link took it and will deliver it unless the link
    /// fails. `Ok(false)`: no room right now (backpressure); offer the same frame again later.
    fn offer(&mut self, frame: &[u8]) -> Result<bool, ChannelError>;
    /// Pushes out bytes the link buffered; `Ok(true)` when nothing is left.
    fn flush(&mut self) -> Result<bool, ChannelError>;
    /// Reads whatever the backup sent, without blocking.
    fn poll(&mut self) -> Result<BackupNews, ChannelError>;
    /// Checks, at heartbeat pace, for a peer that is gone in ways `poll` does not show (e.g. a
    /// closed control socket).
    fn check_peer(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
    /// Blocks until the backup may have sent something or `timeout` passes. Media without a
    /// kernel wait return at once (the caller then polls under its [`PollPolicy`]).
    fn block(&mut self, _timeout: Duration) -> Result<bool, ChannelError> {
        Ok(false)
    }
    /// From now on, accept only ACKs sealed under this opener's key ([`crate::auth`]). A
    /// medium whose ACK has no room for a seal ignores it (see the medium's documentation).
    fn seal_acks(&mut self, _opener: AckOpener) {}
    /// Asks the backup to acknowledge now, not at its guest's next exit ([`crate::kick`]);
    /// returns whether a kick was sent. Media that cannot reach the backup's thread (another
    /// host) send none.
    fn kick(&mut self) -> bool {
        false
    }
    /// Wakes the backup's ACK helper ([`Backup::start_ack_helper`]), which then runs on this
    /// thread's core: the caller should yield the core while it waits for the ACK. Whether
    /// there is a helper to wake.
    fn wake_ack_helper(&mut self) -> bool {
        false
    }
}

/// What a backup's ACK says; every medium carries all of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ack {
    /// Every entry up to this sequence number is in the backup's ring (cumulative).
    pub received: u64,
    /// Every entry up to this sequence number has been replayed (`replayed <= received`).
    pub replayed: u64,
    /// The newest epoch the backup has seen.
    pub epoch: u64,
}

/// The backup's end of a medium: whole frames in order, cumulative ACKs out.
pub trait BackupLink: Send {
    /// The next whole frame's bytes, if one has fully arrived and is already here, without any
    /// I/O; it stays the next frame until [`BackupLink::consume`]. The bytes are not yet
    /// validated.
    fn peek(&mut self) -> Result<Option<&[u8]>, ChannelError>;
    /// Fetches more bytes from the medium (one non-blocking read, for media that need one);
    /// returns whether anything arrived. Kept apart from `peek` so the receiver can acknowledge
    /// what it already has before it spends a system call looking for more.
    fn receive(&mut self) -> Result<bool, ChannelError> {
        Ok(false)
    }
    /// Drops the frame the last `peek` returned.
    fn consume(&mut self) -> Result<(), ChannelError>;
    /// Publishes a cumulative ACK with the replay position (also the backup's heartbeat, when
    /// sent unchanged).
    fn ack(&mut self, ack: Ack) -> Result<(), ChannelError>;
    /// As [`PrimaryLink::check_peer`].
    fn check_peer(&mut self) -> Result<(), ChannelError> {
        Ok(())
    }
    /// As [`PrimaryLink::block`].
    fn block(&mut self, _timeout: Duration) -> Result<bool, ChannelError> {
        Ok(false)
    }
    /// From now on, seal every ACK with this sealer ([`PrimaryLink::seal_acks`]).
    fn seal_acks(&mut self, _sealer: AckSealer) {}
    /// The channel has ended (the primary is gone, deposed, or broke the protocol): make sure
    /// nothing it still sends can land. Media whose peer writes into this side's memory
    /// (RDMA) revoke that access here; the others stop reading, which the channel does anyway.
    /// Called once, at the channel's first error.
    fn fence(&mut self) {}
    /// What an ACK helper thread sleeps on and the primary wakes it through
    /// ([`Backup::start_ack_helper`]); `None` for media whose primary cannot reach this host's
    /// threads.
    fn ack_helper(&mut self) -> Option<Arc<dyn HelperWake>> {
        None
    }
    /// The calling thread (the one that pumps this channel) may be kicked by the primary from
    /// now on ([`crate::kick`]); returns whether this medium supports it.
    fn enable_kicks(&mut self) -> bool {
        false
    }
}

/// Longest pause between two runs of the medium's peer check ([`PrimaryLink::check_peer`]).
pub const PEER_CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// When the peer was last heard from, and the medium's peer check; both channel ends keep one.
#[derive(Debug)]
struct Liveness {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    last_check: Instant,
}

impl Liveness {
    fn new(config: &ChannelConfig, now: Instant) -> Self {
        Liveness {
            // The medium's own check (a closed control socket: the peer process is gone) is a
            // cheap non-blocking syscall, so it runs every millisecond: a dead peer is noticed
            // at once, a silent one only after the heartbeat timeout.
            interval: config.heartbeat_interval.min(PEER_CHECK_INTERVAL),
            timeout: config.heartbeat_timeout,
            last_heard: now,
            last_check: now,
        }
    }

    /// Runs the medium's peer check at heartbeat pace, and fails once the peer has been silent
    /// for the heartbeat timeout.
    fn check(
        &mut self,
        now: Instant,
        check_peer: impl FnOnce() -> Result<(), ChannelError>,
    ) -> Result<(), ChannelError> {
        if now.duration_since(self.last_check) >= self.interval {
            check_peer()?;
            self.last_check = now;
        }
        let silent = now.duration_since(self.last_heard);
        if silent >= self.timeout {
            ftvm_metrics::METRICS.heartbeats_missed.inc();
            return Err(ChannelError::HeartbeatTimeout { silent_for: silent });
        }
        Ok(())
    }
}

/// State the primary's writer and sender share across threads.
#[derive(Debug, Default)]
struct PrimaryShared {
    acked: crossbeam_utils::CachePadded<AtomicU64>,
    /// The backup's newest replay position.
    replayed: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    stats: ChannelStats,
}

impl PrimaryShared {
    fn fail(&self, err: &ChannelError) {
        if let Ok(mut slot) = self.failure.lock() {
            slot.get_or_insert_with(|| err.to_string());
        }
        self.failed.store(true, Ordering::Release);
    }

    fn check(&self) -> Result<(), ChannelError> {
        if self.failed.load(Ordering::Acquire) {
            let why = self
                .failure
                .lock()
                .ok()
                .and_then(|s| s.clone())
                .unwrap_or_else(|| "unknown".into());
            return Err(ChannelError::Failed(why));
        }
        Ok(())
    }
}

/// What the writer knows of the backup's replay: the frames sealed and not yet known to be
/// replayed, for the lag bounds of [`ChannelConfig`].
#[derive(Debug)]
struct LagControl {
    max_entries: u64,
    max_bytes: u64,
    /// The time target: [`LAG_TARGET`] of the bound.
    max_time: Option<Duration>,
    /// Sealed frames not yet known to be replayed, oldest first: (last sequence number, bytes
    /// sealed up to and including it, when it was sealed).
    unreplayed: VecDeque<(u64, u64, Instant)>,
    /// Bytes of every frame sealed.
    sealed_bytes: u64,
    /// Bytes of the frames known to be replayed.
    replayed_bytes: u64,
    /// The backlog would take longer than `max_time` to replay, at the last look.
    late: bool,
    /// The backup's replay rate, measured while it had a backlog.
    rate: ReplayRate,
}

/// The replay rate (entries per second) lag control assumes until it has measured one: faster
/// than any backup replays here (ftvm's replays ~40,000 entries/s), so it only catches a backlog
/// that is large for any rate.
const PRIOR_REPLAY_RATE: f64 = 200_000.0;

/// The backup's replay rate (entries per second), measured over windows of at least
/// [`ReplayRate::WINDOW`] during which it had a backlog throughout (an idle backup replays
/// slowly because it has nothing to replay, not because it is slow), smoothed.
#[derive(Debug)]
struct ReplayRate {
    start: Instant,
    start_replayed: u64,
    busy: bool,
    per_sec: f64,
}

impl ReplayRate {
    const WINDOW: Duration = Duration::from_millis(20);

    fn observe(&mut self, now: Instant, replayed: u64, backlog: u64) {
        if backlog == 0 {
            self.busy = false;
        }
        let dt = now.duration_since(self.start);
        if dt < Self::WINDOW && self.busy {
            return;
        }
        if self.busy && dt >= Self::WINDOW {
            let sample = (replayed - self.start_replayed) as f64 / dt.as_secs_f64();
            self.per_sec = if self.per_sec == 0.0 {
                sample
            } else {
                0.7 * self.per_sec + 0.3 * sample
            };
        }
        self.start = now;
        self.start_replayed = replayed;
        self.busy = backlog > 0;
    }

    /// How long `backlog` entries take to replay at the measured rate (`None`: no rate yet).
    /// A backup that stopped replaying decays the rate towards zero: its drain time then
    /// saturates at [`Duration::MAX`] instead of overflowing.
    fn drain_time(&self, backlog: u64) -> Option<Duration> {
        (self.per_sec > 0.0 && backlog > 0).then(|| {
            Duration::try_from_secs_f64(backlog as f64 / self.per_sec).unwrap_or(Duration::MAX)
        })
    }
}

impl LagControl {
    fn new(config: &ChannelConfig) -> Self {
        LagControl {
            max_entries: config.max_lag_entries,
            max_bytes: config.max_lag_bytes,
            max_time: config.max_lag_time.map(|t| t * LAG_TARGET.0 / LAG_TARGET.1),
            unreplayed: VecDeque::new(),
            sealed_bytes: 0,
            replayed_bytes: 0,
            late: false,
            rate: ReplayRate {
                start: Instant::now(),
                start_replayed: 0,
                busy: false,
                per_sec: 0.0,
            },
        }
    }

    /// Drops the frames the backup has replayed completely.
    fn forget(&mut self, replayed: u64) {
        while let Some(&(last, bytes, _)) = self.unreplayed.front() {
            if last > replayed {
                break;
            }
            self.replayed_bytes = bytes;
            self.unreplayed.pop_front();
        }
    }

    /// The replay lag in time: how long the backup needs to replay what it has not, at its
    /// measured rate — what a failover would have to drain. Until a rate is known, the longer of
    /// how long ago the oldest unreplayed frame was sealed and the backlog's drain time at
    /// [`PRIOR_REPLAY_RATE`] (a primary that appends thousands of entries before the first rate
    /// window ends would otherwise see only their few milliseconds of age).
    fn lag(&mut self, now: Instant, last_seq: u64, replayed: u64) -> Duration {
        let backlog = last_seq.saturating_sub(replayed);
        self.rate.observe(now, replayed, backlog);
        self.rate.drain_time(backlog).unwrap_or_else(|| {
            let age = self
                .unreplayed
                .front()
                .map_or(Duration::ZERO, |&(_, _, at)| now.duration_since(at));
            age.max(Duration::from_secs_f64(backlog as f64 / PRIOR_REPLAY_RATE))
        })
    }

    /// Notes a sealed frame; updates `late` and the lag maxima.
    fn sealed(&mut self, last_seq: u64, len: usize, replayed: u64, stats: &ChannelStats) {
        let now = Instant::now();
        self.sealed_bytes += len as u64;
        self.unreplayed
            .push_back((last_seq, self.sealed_bytes, now));
        self.forget(replayed);
        let age = self.lag(now, last_seq, replayed);
        self.late = self.max_time.is_some_and(|max| age > max);
        ChannelStats::max(&stats.lag_max_ns, age.as_nanos() as u64);
        ChannelStats::max(
            &stats.lag_max_bytes,
            self.sealed_bytes - self.replayed_bytes,
        );
        ChannelStats::max(&stats.lag_max_entries, last_seq.saturating_sub(replayed));
        ChannelStats::set(&stats.last_seq, last_seq);
        ChannelStats::set(&stats.lag_now, age.as_nanos() as u64);
    }

    /// Whether appending entry `next_seq` now would exceed a bound. Integer checks only; the
    /// time bound was checked when the last frame was sealed (or, with `now`, is checked again).
    fn exceeded(&mut self, next_seq: u64, replayed: u64, now: Option<Instant>) -> bool {
        if let Some(now) = now {
            self.forget(replayed);
            let lag = self.lag(now, next_seq - 1, replayed);
            self.late = self.max_time.is_some_and(|max| lag > max);
        }
        self.late
            || next_seq - replayed > self.max_entries
            || self.sealed_bytes - self.replayed_bytes > self.max_bytes
    }
}

/// The primary's producing end: turns entries into frames in the log ring.
#[derive(Debug)]
pub struct LogWriter {
    producer: Producer<Arc<HeapRegion>>,
    frame: FrameBuf,
    epoch: u64,
    /// Sequence number the next appended entry gets.
    next_seq: u64,
    lag: LagControl,
    shared: Arc<PrimaryShared>,
    /// Frames put into the log ring so far.
    frames_flushed: u64,
    /// When the open batch got its first entry.
    batch_started: Option<Instant>,
    max_batch_delay: Option<Duration>,
    /// Seals every frame (crypto `auth`); `None` with crypto `none`.
    sealer: Option<FrameSealer>,
}

/// A frame buffer for frames of at most `max` bytes on the medium: with a sealer, the frame
/// itself is [`TRAILER_LEN`] bytes smaller and the buffer keeps room for its trailer.
fn frame_buf(max: usize, sealed: bool) -> FrameBuf {
    if sealed {
        FrameBuf::with_room(max - TRAILER_LEN, TRAILER_LEN)
    } else {
        FrameBuf::new(max)
    }
}

/// Finishes `frame` and, with a sealer, appends its trailer: the bytes that go on the medium.
fn seal_frame<'a>(
    frame: &'a mut FrameBuf,
    sealer: &mut Option<FrameSealer>,
    heartbeat: bool,
) -> Result<&'a [u8], ChannelError> {
    Ok(match sealer {
        Some(sealer) => {
            let bytes = frame.finish_with_room()?;
            sealer.seal(bytes, heartbeat);
            bytes
        }
        None => frame.finish()?,
    })
}

impl LogWriter {
    /// The sequence number of the last appended entry (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The newest cumulative ACK: every entry up to this sequence number is in the backup's buffer.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Acquire)
    }

    /// The backup's newest replay position.
    pub fn replayed(&self) -> u64 {
        self.shared.replayed.load(Ordering::Acquire)
    }

    /// The fencing epoch stamped on every frame.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Counters shared with the sender.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Appends `entry` to the open batch. Returns its sequence number and whether the batch
    /// is now due to go out (an output marker, or the batch delay passed); the caller then
    /// flushes it. A batch that is full is shipped through the log ring here.
    fn append_with(
        &mut self,
        entry: &Entry<'_>,
        pump: &mut dyn FnMut(Option<Instant>) -> Result<(), ChannelError>,
        timeout: Duration,
    ) -> Result<(u64, bool), ChannelError> {
        // Lag control: the backup's replay may trail by at most the configured bounds.
        if self.lag.exceeded(self.next_seq, self.replayed(), None) {
            self.wait_for_replay(pump, timeout)?;
        }
        if self.frame.is_empty() {
            self.frame.reset(self.epoch, self.next_seq);
        }
        if self.frame.push(entry).is_err() {
            // Full: ship what we have and start a new frame with this entry.
            self.flush_with(pump, timeout)?;
            self.frame.reset(self.epoch, self.next_seq);
            self.frame.push(entry)?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let overdue = self.max_batch_delay.is_some_and(|delay| {
            let now = Instant::now();
            now.duration_since(*self.batch_started.get_or_insert(now)) >= delay
        });
        Ok((
            seq,
            overdue || matches!(entry.event, Event::OutputMarker { .. }),
        ))
    }

    /// Waits until the backup's replay is back within the lag bounds. The open batch goes out
    /// first (the backup cannot replay what it has not been sent). Fails if the backup's replay
    /// does not move for the heartbeat timeout plus the lag bound.
    fn wait_for_replay(
        &mut self,
        pump: &mut dyn FnMut(Option<Instant>) -> Result<(), ChannelError>,
        timeout: Duration,
    ) -> Result<(), ChannelError> {
        self.flush_with(pump, timeout)?;
        let start = Instant::now();
        let patience = timeout + self.lag.max_time.unwrap_or(Duration::ZERO);
        let stats = &self.shared.stats;
        ChannelStats::add(&stats.throttle_events, 1);
        ChannelStats::add(&stats.lag_throttles, 1);
        let mut seen = self.replayed();
        let mut moved_at = start;
        loop {
            let now = Instant::now();
            let replayed = self.replayed();
            if !self.lag.exceeded(self.next_seq, replayed, Some(now)) {
                break;
            }
            if replayed != seen {
                seen = replayed;
                moved_at = now;
            } else if now.duration_since(moved_at) >= patience {
                return Err(ChannelError::Timeout {
                    what: "the backup's replay to catch up (lag control)",
                    waited: start.elapsed(),
                });
            }
            pump(Some(moved_at + patience))?;
        }
        ChannelStats::add(
            &self.shared.stats.throttled_ns,
            start.elapsed().as_nanos() as u64,
        );
        Ok(())
    }

    /// The open batch has gone out by another way than the log ring: start the next one.
    fn batch_sent(&mut self, len: usize) {
        let replayed = self.replayed();
        self.lag
            .sealed(self.next_seq - 1, len, replayed, &self.shared.stats);
        self.frame.clear();
        self.frames_flushed += 1;
        self.batch_started = None;
    }

    fn flush_with(
        &mut self,
        pump: &mut dyn FnMut(Option<Instant>) -> Result<(), ChannelError>,
        timeout: Duration,
    ) -> Result<(), ChannelError> {
        if self.frame.is_empty() {
            return Ok(());
        }
        let bytes = seal_frame(&mut self.frame, &mut self.sealer, false)?;
        let len = bytes.len();
        let mut throttled: Option<Instant> = None;
        loop {
            match self.producer.try_reserve(bytes.len()) {
                Ok(slot) => {
                    slot.copy_from_slice(bytes);
                    self.producer.commit();
                    break;
                }
                Err(RingError::Full { .. }) => {
                    let start = *throttled.get_or_insert_with(|| {
                        ChannelStats::add(&self.shared.stats.throttle_events, 1);
                        Instant::now()
                    });
                    if start.elapsed() >= timeout {
                        return Err(ChannelError::Timeout {
                            what: "room in the log ring",
                            waited: start.elapsed(),
                        });
                    }
                    pump(Some(start + timeout))?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(start) = throttled {
            ChannelStats::add(
                &self.shared.stats.throttled_ns,
                start.elapsed().as_nanos() as u64,
            );
        }
        self.batch_sent(len);
        Ok(())
    }
}

/// The primary's medium end: moves frames from the log ring onto a [`PrimaryLink`], tracks
/// ACKs, sends heartbeats and notices a silent backup.
#[derive(Debug)]
pub struct Sender<L: PrimaryLink> {
    link: L,
    consumer: Consumer<Arc<HeapRegion>>,
    shared: Arc<PrimaryShared>,
    epoch: u64,
    /// Sequence number of the last entry handed to the link.
    sent_seq: u64,
    heartbeat: FrameBuf,
    heartbeat_interval: Duration,
    last_sent: Instant,
    liveness: Liveness,
    pumps: u32,
    /// The last round heard from the backup and left reading the clock to this one.
    heard_undated: bool,
    /// A frame went out directly (not through a round) and the clock was not read for it.
    sent_undated: bool,
    /// Seals heartbeats (crypto `auth`).
    sealer: Option<FrameSealer>,
}

impl<L: PrimaryLink> Sender<L> {
    /// One round of work: frames out, news in, heartbeat and liveness checks. Returns whether
    /// anything moved. Never blocks.
    pub fn pump(&mut self) -> Result<bool, ChannelError> {
        let result = self.pump_inner();
        if let Err(e) = &result {
            self.shared.fail(e);
        }
        result
    }

    fn pump_inner(&mut self) -> Result<bool, ChannelError> {
        let mut progress = false;
        let mut sent_any = false;
        if self.link.flush()? {
            while let Some(frame) = self.consumer.peek()? {
                let header = FrameHeader::parse(frame)?;
                trace::primary(PrimaryPoint::Sent);
                if !self.link.offer(frame)? {
                    ChannelStats::add(&self.shared.stats.medium_full, 1);
                    break;
                }
                let stats = &self.shared.stats;
                ChannelStats::add(&stats.frames, 1);
                ChannelStats::add(&stats.entries, u64::from(header.entry_count));
                ChannelStats::add(&stats.bytes, frame.len() as u64);
                if let Some(last) = header.last_seq() {
                    self.sent_seq = last;
                }
                self.consumer.advance_peeked();
                sent_any = true;
            }
            self.consumer.release();
        }
        let news = self.link.poll()?;
        if let Some(acked) = news.acked {
            if acked > self.sent_seq {
                return Err(ChannelError::CorruptMessage(format!(
                    "backup acknowledged entry {acked}, only {} were sent",
                    self.sent_seq
                )));
            }
            if acked > self.shared.acked.load(Ordering::Relaxed) {
                trace::primary(PrimaryPoint::Acked);
                self.shared.acked.store(acked, Ordering::Release);
                progress = true;
            }
        }
        if let Some(replayed) = news.replayed {
            if replayed > self.sent_seq {
                return Err(ChannelError::CorruptMessage(format!(
                    "backup replayed entry {replayed}, only {} were sent",
                    self.sent_seq
                )));
            }
            if replayed > self.shared.replayed.load(Ordering::Relaxed) {
                self.shared.replayed.store(replayed, Ordering::Release);
                progress = true;
            }
        }
        progress |= sent_any;
        // Clocks are read every 32 rounds, or whenever something happened: a busy loop stays
        // cheap, and a heartbeat is never late by more than 32 rounds. A round that only heard
        // from the backup (typically: the ACK a commit waits for) leaves the clock to the next
        // round, so the waiter is not held up by it.
        self.pumps = self.pumps.wrapping_add(1);
        let undated = std::mem::take(&mut self.heard_undated);
        let sent_undated = std::mem::take(&mut self.sent_undated);
        let periodic = self.pumps.is_multiple_of(32);
        if news.heard && !undated && !sent_any && !periodic {
            self.heard_undated = true;
            self.sent_undated = sent_undated;
        } else if news.heard || undated || sent_any || sent_undated || periodic {
            let now = Instant::now();
            if news.heard || undated {
                self.liveness.last_heard = now;
            }
            if sent_any || sent_undated {
                self.last_sent = now;
            }
            self.timers(now)?;
        }
        Ok(progress)
    }

    fn timers(&mut self, now: Instant) -> Result<(), ChannelError> {
        if now.duration_since(self.last_sent) >= self.heartbeat_interval {
            // An empty frame: it carries the epoch and the next sequence number, no entries.
            let idle = self.consumer_is_idle();
            self.heartbeat.reset(self.epoch, self.sent_seq + 1);
            let frame = seal_frame(&mut self.heartbeat, &mut self.sealer, true)?;
            if idle && self.link.offer(frame)? {
                ChannelStats::add(&self.shared.stats.heartbeats, 1);
            }
            self.last_sent = now;
        }
        let link = &mut self.link;
        self.liveness.check(now, || link.check_peer())
    }

    /// Whether nothing is queued before a new frame: the log ring is empty and the link has
    /// nothing buffered. Then the frame may go straight to the link ([`Sender::offer_direct`]).
    fn can_offer_direct(&mut self) -> Result<bool, ChannelError> {
        if !self.consumer_is_idle() {
            return Ok(false);
        }
        self.link.flush().inspect_err(|e| self.shared.fail(e))
    }

    /// Offers a whole frame straight to the link, bypassing the log ring (call it when
    /// [`Sender::can_offer_direct`] said so). Returns whether the link took it; if not, the
    /// caller queues it in the ring as usual. For the inline sender: a commit then costs no
    /// copy into the ring and no second look at the header.
    fn offer_direct(
        &mut self,
        frame: &[u8],
        entry_count: u32,
        last_seq: u64,
    ) -> Result<bool, ChannelError> {
        trace::primary(PrimaryPoint::Sent);
        let taken = self
            .link
            .offer(frame)
            .inspect_err(|e| self.shared.fail(e))?;
        if !taken {
            return Ok(false);
        }
        let stats = &self.shared.stats;
        ChannelStats::add(&stats.frames, 1);
        ChannelStats::add(&stats.entries, u64::from(entry_count));
        ChannelStats::add(&stats.bytes, frame.len() as u64);
        self.sent_seq = last_seq;
        // The next round dates the send (for the heartbeat timer); reading the clock now
        // would only delay the wait for the ACK.
        self.sent_undated = true;
        Ok(true)
    }

    /// A heartbeat may go out only when no frame is waiting, or it would overtake it.
    fn consumer_is_idle(&mut self) -> bool {
        matches!(self.consumer.has_records(), Ok(false))
    }

    /// The newest cumulative ACK.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Acquire)
    }

    /// Runs the sender until `stop` is set or the channel fails, waiting under `policy` when
    /// idle. For a dedicated (pinned) sender thread.
    pub fn run(mut self, stop: &AtomicBool, policy: PollPolicy) -> Result<(), ChannelError> {
        let mut poller = policy.poller();
        while !stop.load(Ordering::Relaxed) {
            if self.pump()? {
                poller.reset();
            } else {
                poller.wait();
            }
        }
        Ok(())
    }

    /// The medium underneath.
    pub fn link(&self) -> &L {
        &self.link
    }
}

/// The primary's end of a channel with the sender run inline, by whichever thread calls in.
#[derive(Debug)]
pub struct Primary<L: PrimaryLink> {
    writer: LogWriter,
    sender: Sender<L>,
    config: ChannelConfig,
    /// Keeps this channel the process's in the metrics ([`ftvm_metrics::METRICS`]).
    metrics: ftvm_metrics::LogHandle,
}

/// A primary end's local log ring made ahead of time ([`prepare_primary_ring`]).
static SPARE_RING: Mutex<Option<(usize, ring::HeapRing)>> = Mutex::new(None);

/// Makes the local log ring the next [`Primary::new`] with this `capacity` takes, so that
/// its allocation (every page touched: about 3 ms for 4 MiB on a nested host) is not spent
/// while a caller waits for the channel — a primary whose guest is stopped for a joining
/// backup makes it while the backup is still copying memory. One spare per process; a newer
/// one replaces it.
pub fn prepare_primary_ring(capacity: usize) -> Result<(), ChannelError> {
    let ring = ring::heap(capacity)?;
    *SPARE_RING.lock().unwrap_or_else(|e| e.into_inner()) = Some((capacity, ring));
    Ok(())
}

/// The spare ring if it has `capacity`, else a new one.
fn primary_ring(capacity: usize) -> Result<ring::HeapRing, ChannelError> {
    let spare = SPARE_RING.lock().unwrap_or_else(|e| e.into_inner()).take();
    match spare {
        Some((c, ring)) if c == capacity => Ok(ring),
        _ => Ok(ring::heap(capacity)?),
    }
}

impl<L: PrimaryLink> Primary<L> {
    /// Builds the primary's end over a connected, authenticated link. `resume_seq` is the
    /// sequence number the backup expects next (1 for a new log).
    pub fn new(
        mut link: L,
        config: ChannelConfig,
        resume_seq: u64,
        keys: &SessionKeys,
    ) -> Result<Self, ChannelError> {
        config.validate()?;
        let sealed = config.crypto.seals();
        let encrypt = config.crypto == ChannelCrypto::Encrypt;
        if sealed {
            link.seal_acks(keys.ack_opener());
        }
        let (producer, consumer) = primary_ring(config.ring_capacity)?;
        let shared = Arc::new(PrimaryShared::default());
        let resume_seq = resume_seq.max(1);
        shared.acked.store(resume_seq - 1, Ordering::Relaxed);
        shared.replayed.store(resume_seq - 1, Ordering::Relaxed);
        shared
            .stats
            .last_seq
            .store(resume_seq - 1, Ordering::Relaxed);
        let metrics = ftvm_metrics::METRICS
            .log
            .attach(Arc::new(PrimaryProbe(shared.clone())));
        let now = Instant::now();
        Ok(Primary {
            writer: LogWriter {
                producer,
                frame: frame_buf(config.max_frame_bytes, sealed),
                epoch: config.epoch,
                next_seq: resume_seq,
                lag: LagControl::new(&config),
                shared: shared.clone(),
                frames_flushed: 0,
                batch_started: None,
                max_batch_delay: config.max_batch_delay,
                sealer: sealed.then(|| keys.frame_sealer().encrypting(encrypt)),
            },
            sender: Sender {
                link,
                consumer,
                shared,
                epoch: config.epoch,
                sent_seq: resume_seq - 1,
                heartbeat: frame_buf(logfmt::FRAME_HEADER_LEN + TRAILER_LEN, sealed),
                heartbeat_interval: config.heartbeat_interval,
                last_sent: now,
                liveness: Liveness::new(&config, now),
                pumps: 0,
                heard_undated: false,
                sent_undated: false,
                sealer: sealed.then(|| keys.frame_sealer().encrypting(encrypt)),
            },
            config,
            metrics,
        })
    }

    /// The same end over another link type that wraps this one (e.g. the medium layer's
    /// [`crate::medium::AnyPrimaryLink`]); all state is kept.
    pub fn map_link<M: PrimaryLink>(self, wrap: impl FnOnce(L) -> M) -> Primary<M> {
        let s = self.sender;
        Primary {
            writer: self.writer,
            sender: Sender {
                link: wrap(s.link),
                consumer: s.consumer,
                shared: s.shared,
                epoch: s.epoch,
                sent_seq: s.sent_seq,
                heartbeat: s.heartbeat,
                heartbeat_interval: s.heartbeat_interval,
                last_sent: s.last_sent,
                liveness: s.liveness,
                pumps: s.pumps,
                heard_undated: s.heard_undated,
                sent_undated: s.sent_undated,
                sealer: s.sealer,
            },
            config: self.config,
            metrics: self.metrics,
        }
    }

    /// Appends one entry and returns its sequence number. Entries are batched; an output marker
    /// (or a full batch) flushes the batch to the medium at once. Waits (counted as throttling)
    /// while the backup lags more than the configured bound.
    pub fn append(&mut self, entry: &Entry<'_>) -> Result<u64, ChannelError> {
        let (writer, sender, cfg) = (&mut self.writer, &mut self.sender, &self.config);
        let frames_before = writer.frames_flushed;
        let (seq, due) =
            writer.append_with(entry, &mut pump_inline(sender, cfg), cfg.heartbeat_timeout)?;
        if due {
            self.flush()?;
        } else if writer.frames_flushed != frames_before {
            // A full batch went into the log ring: move it on now.
            sender.pump()?;
        }
        Ok(seq)
    }

    /// Sends any batched entries now: straight to the medium when nothing is queued before
    /// them, else through the log ring.
    pub fn flush(&mut self) -> Result<(), ChannelError> {
        let (writer, sender, cfg) = (&mut self.writer, &mut self.sender, &self.config);
        if writer.frame.is_empty() {
            return Ok(());
        }
        if sender.can_offer_direct()? {
            let entry_count = writer.frame.entry_count();
            let last_seq = writer.next_seq - 1;
            let frame = seal_frame(&mut writer.frame, &mut writer.sealer, false)?;
            trace::primary(PrimaryPoint::Sealed);
            let len = frame.len();
            if sender.offer_direct(frame, entry_count, last_seq)? {
                writer.batch_sent(len);
                return Ok(());
            }
            // The medium is full after all (rare): the ring takes the frame, sealed again.
        }
        writer.flush_with(&mut pump_inline(sender, cfg), cfg.heartbeat_timeout)?;
        sender.pump()?;
        Ok(())
    }

    /// Does the medium's work once (send, read ACKs, heartbeats) without blocking; call it
    /// regularly while not appending. Returns whether anything moved.
    pub fn pump(&mut self) -> Result<bool, ChannelError> {
        self.sender.pump()
    }

    /// The newest cumulative ACK, without waiting or touching the medium.
    pub fn acked(&self) -> u64 {
        self.writer.acked()
    }

    /// Sequence number of the last appended entry.
    pub fn last_seq(&self) -> u64 {
        self.writer.last_seq()
    }

    /// Waits until the backup has acknowledged entry `seq` (and so every entry before it).
    /// Fails with a heartbeat timeout if the backup falls silent; never waits forever.
    pub fn wait_acked(&mut self, seq: u64) -> Result<(), ChannelError> {
        if self.writer.acked() >= seq {
            return Ok(());
        }
        if seq > self.writer.last_seq() {
            return Err(ChannelError::Config(format!(
                "waiting for entry {seq}, but only {} were appended",
                self.writer.last_seq()
            )));
        }
        if self.sender.sent_seq < seq {
            self.flush()?;
        }
        let (sender, cfg) = (&mut self.sender, &self.config);
        let mut pump = pump_inline(sender, cfg);
        while self.writer.acked() < seq {
            pump(None)?;
        }
        Ok(())
    }

    /// Counters of this end.
    pub fn stats(&self) -> StatsSnapshot {
        self.writer.stats()
    }

    /// Asks the backup to acknowledge now ([`PrimaryLink::kick`]); whether a kick was sent.
    pub fn kick(&mut self) -> bool {
        self.sender.link.kick()
    }

    /// Wakes the backup's ACK helper ([`PrimaryLink::wake_ack_helper`]); yield the core while
    /// waiting for the ACK. Whether there is one.
    pub fn wake_ack_helper(&mut self) -> bool {
        self.sender.link.wake_ack_helper()
    }

    /// The medium underneath.
    pub fn link(&self) -> &L {
        self.sender.link()
    }

    /// The configuration in force.
    pub fn config(&self) -> &ChannelConfig {
        &self.config
    }

    /// Splits into a writer for the vCPU thread and a sender for its own (pinned) thread; run
    /// the sender with [`Sender::run`]. The writer's waits then watch the sender's progress.
    pub fn split(self) -> (ThreadedWriter, Sender<L>) {
        let policy = self.config.poll;
        let timeout = self.config.heartbeat_timeout;
        (
            ThreadedWriter {
                writer: self.writer,
                policy,
                timeout,
            },
            self.sender,
        )
    }
}

/// A pump closure that does one round of the sender's work, then waits under the policy (or in
/// the kernel, in blocking mode) if nothing moved.
fn pump_inline<'a, L: PrimaryLink>(
    sender: &'a mut Sender<L>,
    cfg: &'a ChannelConfig,
) -> impl FnMut(Option<Instant>) -> Result<(), ChannelError> + 'a {
    let mut poller = cfg.poll.poller();
    move |_deadline| {
        if sender.pump()? {
            poller.reset();
        } else if cfg.blocking {
            sender.link.block(cfg.heartbeat_interval)?;
        } else {
            poller.wait();
        }
        Ok(())
    }
}

/// The writer half of a split [`Primary`], for when a separate thread runs the [`Sender`].
#[derive(Debug)]
pub struct ThreadedWriter {
    writer: LogWriter,
    policy: PollPolicy,
    timeout: Duration,
}

impl ThreadedWriter {
    fn waiter(
        policy: PollPolicy,
        shared: Arc<PrimaryShared>,
    ) -> impl FnMut(Option<Instant>) -> Result<(), ChannelError> {
        let mut poller = policy.poller();
        move |_| {
            shared.check()?;
            poller.wait();
            Ok(())
        }
    }

    /// As [`Primary::append`].
    pub fn append(&mut self, entry: &Entry<'_>) -> Result<u64, ChannelError> {
        self.writer.shared.check()?;
        let mut wait = Self::waiter(self.policy, self.writer.shared.clone());
        let (seq, due) = self.writer.append_with(entry, &mut wait, self.timeout)?;
        if due {
            self.writer.flush_with(&mut wait, self.timeout)?;
        }
        Ok(seq)
    }

    /// As [`Primary::flush`].
    pub fn flush(&mut self) -> Result<(), ChannelError> {
        let mut wait = Self::waiter(self.policy, self.writer.shared.clone());
        self.writer.flush_with(&mut wait, self.timeout)
    }

    /// The newest cumulative ACK.
    pub fn acked(&self) -> u64 {
        self.writer.acked()
    }

    /// Sequence number of the last appended entry.
    pub fn last_seq(&self) -> u64 {
        self.writer.last_seq()
    }

    /// As [`Primary::wait_acked`]; fails if the sender thread failed, and at once for an entry
    /// that was never appended (which no ACK would ever cover).
    pub fn wait_acked(&mut self, seq: u64) -> Result<(), ChannelError> {
        if self.writer.acked() >= seq {
            return Ok(());
        }
        if seq > self.writer.last_seq() {
            return Err(ChannelError::Config(format!(
                "waiting for entry {seq}, but only {} were appended",
                self.writer.last_seq()
            )));
        }
        self.flush()?;
        let mut poller = self.policy.poller();
        while self.writer.acked() < seq {
            self.writer.shared.check()?;
            poller.wait();
        }
        Ok(())
    }

    /// Counters shared with the sender.
    pub fn stats(&self) -> StatsSnapshot {
        self.writer.stats()
    }
}

/// The backup's end: validates frames from a [`BackupLink`], lands them in the backup's own ring,
/// and acknowledges them once they are there.
#[derive(Debug)]
pub struct Receiver<L: BackupLink> {
    link: L,
    producer: Producer<Arc<HeapRegion>>,
    epoch: u64,
    /// Sequence number the next entry must have.
    expected: u64,
    /// Last ACK published.
    acked: u64,
    /// The replica's replay position, as the backup last set it.
    replayed: u64,
    /// The replay position last published.
    replayed_sent: u64,
    heartbeat_interval: Duration,
    last_acked_at: Instant,
    liveness: Liveness,
    pumps: u32,
    stats: Arc<ChannelStats>,
    /// Checks every frame's trailer (crypto `auth` and `encrypt`).
    opener: Option<FrameOpener>,
    /// The frame decrypted (crypto `encrypt`).
    plain: Vec<u8>,
    /// The medium was fenced (after the channel's first error).
    fenced: bool,
}

impl<L: BackupLink> Receiver<L> {
    /// One round of work: accept every complete frame that fits in the backup ring, ACK, and
    /// check liveness. Returns whether anything moved. Never blocks. The first error fences the
    /// medium ([`BackupLink::fence`]): the channel is over, and its primary may write nothing
    /// more.
    pub fn pump(&mut self) -> Result<bool, ChannelError> {
        let r = self.pump_once();
        if r.is_err() && !self.fenced {
            self.fenced = true;
            self.link.fence();
        }
        r
    }

    fn pump_once(&mut self) -> Result<bool, ChannelError> {
        let mut accepted = false;
        let mut acked_now = false;
        loop {
            let result = self.accept_buffered();
            // Frames validated before any bad one are kept and acknowledged, even when this
            // round ends in an error: a bad frame is never applied, a good one never dropped.
            self.producer.commit();
            // Acknowledge what is in our buffer now, before looking for more on the medium:
            // the ACK is what the primary's output is waiting for.
            if self.expected - 1 > self.acked {
                self.acked = self.expected - 1;
                trace::backup(BackupPoint::Acking);
                let acked = self.send_ack();
                if result.is_ok() {
                    acked?;
                }
                acked_now = true;
            }
            let (took, room_left) = result?;
            accepted |= took;
            if !room_left || !self.link.receive()? {
                break;
            }
        }
        self.pumps = self.pumps.wrapping_add(1);
        let report = self.replayed != self.replayed_sent;
        if accepted || acked_now || report || self.pumps.is_multiple_of(32) {
            let now = Instant::now();
            if accepted {
                self.liveness.last_heard = now;
            }
            if acked_now {
                self.last_acked_at = now;
            }
            let quiet = now.duration_since(self.last_acked_at);
            if quiet >= self.heartbeat_interval || (report && quiet >= REPLAY_REPORT_INTERVAL) {
                self.send_ack()?;
                if !report {
                    ChannelStats::add(&self.stats.heartbeats, 1);
                }
                self.last_acked_at = now;
            }
            let link = &mut self.link;
            self.liveness.check(now, || link.check_peer())?;
        }
        Ok(accepted || acked_now)
    }

    /// Publishes the ACK and the replay position.
    fn send_ack(&mut self) -> Result<(), ChannelError> {
        self.replayed_sent = self.replayed;
        ChannelStats::set(&self.stats.last_seq, self.acked);
        ChannelStats::set(&self.stats.lag_now, self.replayed);
        self.link.ack(Ack {
            received: self.acked,
            replayed: self.replayed,
            epoch: self.epoch,
        })
    }

    /// Validates and lands every frame already delivered by the link. Returns whether any was
    /// accepted, and whether the backup ring still had room. A refused frame is counted in the
    /// metrics by cause.
    fn accept_buffered(&mut self) -> Result<(bool, bool), ChannelError> {
        let result = self.accept_frames();
        if let Err(e) = &result {
            if let Some(cause) = e.reject_cause() {
                ftvm_metrics::METRICS.rejected(cause);
            }
        }
        result
    }

    fn accept_frames(&mut self) -> Result<(bool, bool), ChannelError> {
        let mut accepted = false;
        while let Some(sealed) = self.link.peek()? {
            let since = trace::stamp();
            // The tag first: nothing in a frame is looked at before it proves its origin.
            let (bytes, counter) = match &self.opener {
                Some(opener) if opener.encrypts() => {
                    let counter = opener.decrypt(sealed, &mut self.plain)?;
                    (&self.plain[..], counter)
                }
                Some(opener) => opener.verify(sealed)?,
                None => (sealed, 0),
            };
            let (frame, len) = FrameView::parse(bytes)?;
            if len != bytes.len() {
                return Err(ChannelError::CorruptMessage(format!(
                    "medium delivered {} bytes for a {len}-byte frame",
                    bytes.len()
                )));
            }
            follows(&frame, self.expected, self.epoch)?;
            let count = u64::from(frame.entry_count());
            if count > 0 {
                trace::backup_frame(since);
                match self.producer.try_reserve(len) {
                    Ok(slot) => slot.copy_from_slice(bytes),
                    // The backup's buffer is full: leave the frame on the medium (which then
                    // fills up and pushes back on the primary) until replay frees space.
                    Err(RingError::Full { .. }) => return Ok((accepted, false)),
                    Err(e) => return Err(e.into()),
                }
                ChannelStats::add(&self.stats.frames, 1);
                ChannelStats::add(&self.stats.entries, count);
                ChannelStats::add(&self.stats.bytes, len as u64);
            }
            self.epoch = frame.epoch();
            self.expected += count;
            if let Some(opener) = &mut self.opener {
                opener.accept(counter);
            }
            self.link.consume()?;
            if count > 0 {
                trace::backup(BackupPoint::Landed);
            }
            accepted = true;
        }
        Ok((accepted, true))
    }

    /// The last sequence number acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The newest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The medium underneath.
    pub fn link(&self) -> &L {
        &self.link
    }
}

/// Whether `frame` may come next in a log whose next sequence number is `expected` and whose
/// newest epoch is `epoch`: the rule every reader of a log applies (the live receiver, a
/// journal): a frame of an older epoch is a deposed primary's ([`ChannelError::StaleEpoch`]),
/// and sequence numbers continue without a gap or a repeat ([`ChannelError::SequenceGap`]).
pub fn follows(frame: &FrameView<'_>, expected: u64, epoch: u64) -> Result<(), ChannelError> {
    if frame.epoch() < epoch {
        return Err(ChannelError::StaleEpoch {
            frame: frame.epoch(),
            current: epoch,
        });
    }
    if frame.first_seq() != expected {
        return Err(ChannelError::SequenceGap {
            expected,
            found: frame.first_seq(),
        });
    }
    Ok(())
}

/// One entry read in place from the backup's ring ([`Backup::next_entry`]).
#[derive(Debug, Clone, Copy)]
pub struct LoggedEntry<'a> {
    /// Its sequence number.
    pub seq: u64,
    /// The entry, borrowed from the ring.
    pub entry: Entry<'a>,
    /// The whole frame, on the frame's first entry (for a journal); `None` on the others.
    pub frame: Option<&'a [u8]>,
}

/// Where the replica is in the frame at the front of the backup's ring.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    /// Body offset and index of the next entry to replay.
    offset: usize,
    index: u32,
    /// Of the entry the last `next_entry` returned: where the one after it starts, its frame's
    /// first sequence number and entry count; `current` says there is one.
    next: usize,
    first_seq: u64,
    count: u32,
    current: bool,
}

/// The backup's end with the receiver run inline. The replica reads entries in place with
/// [`Backup::next_entry`] and [`Backup::advance`] (the frame-level [`Backup::poll`] is for
/// callers that consume whole frames at once; use one or the other).
///
/// The receiver sits behind a mutex so that an ACK helper thread ([`Backup::start_ack_helper`])
/// can pump it too, when the primary asks for an ACK while the replica's thread is inside its
/// guest; without one the lock is never contended.
#[derive(Debug)]
pub struct Backup<L: BackupLink> {
    receiver: Arc<Mutex<Receiver<L>>>,
    helper: Option<AckHelper>,
    /// The replay position not yet handed to the receiver (its lock was the helper's).
    replayed: Option<u64>,
    frames: Consumer<Arc<HeapRegion>>,
    cursor: Cursor,
    config: ChannelConfig,
    stats: Arc<ChannelStats>,
    /// Keeps this channel the process's in the metrics ([`ftvm_metrics::METRICS`]).
    metrics: ftvm_metrics::LogHandle,
}

/// What an ACK helper thread sleeps on and is woken through (a medium whose primary can reach
/// this host's threads: shared memory).
pub trait HelperWake: Send + Sync + std::fmt::Debug {
    /// The wake counter now.
    fn current(&self) -> u32;
    /// Sleeps until the wake counter is no longer `seen`, or `timeout` passed.
    fn wait(&self, seen: u32, timeout: Duration);
    /// Wakes the helper (to make it notice a stop).
    fn wake(&self);
    /// The core the primary asked from last (the helper runs there: the primary's thread
    /// yields it while it waits for the ACK), if it said.
    fn core(&self) -> Option<usize>;
    /// The helper is there (`true`) or gone.
    fn set_ready(&self, ready: bool);
}

/// A thread that pumps the backup's receiver when the primary wakes it ([`HelperWake`]).
#[derive(Debug)]
struct AckHelper {
    stop: Arc<AtomicBool>,
    wake: Arc<dyn HelperWake>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for AckHelper {
    fn drop(&mut self) {
        self.wake.set_ready(false);
        self.stop.store(true, Ordering::SeqCst);
        self.wake.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Pins the calling thread to `core`.
fn pin_to(core: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it (core is bounded by
    // the set's size, checked); sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if core >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return false;
        }
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

impl<L: BackupLink> Backup<L> {
    fn rx(&self) -> std::sync::MutexGuard<'_, Receiver<L>> {
        self.receiver.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pumps the receiver from the replica's thread, unless the ACK helper is pumping it right
    /// now (`Ok(false)`: the helper does the same work). Never waits for the lock: a thread
    /// blocked on it would need a wake-up from the helper's core, which on our hosts costs
    /// 25 µs or more.
    fn pump_here(&mut self) -> Result<bool, ChannelError> {
        let mut r = match self.receiver.try_lock() {
            Ok(r) => r,
            Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        };
        if let Some(replayed) = self.replayed.take() {
            r.replayed = replayed;
        }
        r.pump()
    }

    /// Records the replay position: in the receiver now if its lock is free, else at the next
    /// pump.
    fn set_replayed(&mut self, replayed: u64) {
        match self.receiver.try_lock() {
            Ok(mut r) => {
                r.replayed = replayed;
                self.replayed = None;
            }
            Err(std::sync::TryLockError::Poisoned(e)) => {
                e.into_inner().replayed = replayed;
                self.replayed = None;
            }
            Err(std::sync::TryLockError::WouldBlock) => self.replayed = Some(replayed),
        }
    }

    /// Runs `f` on the medium underneath.
    pub fn with_link<R>(&self, f: impl FnOnce(&L) -> R) -> R {
        f(&self.rx().link)
    }

    /// The calling thread may be kicked by the primary from now on ([`BackupLink::enable_kicks`]):
    /// call it from the thread that pumps this channel. Whether the medium supports it.
    pub fn enable_kicks(&mut self) -> bool {
        self.rx().link.enable_kicks()
    }

    /// Starts a thread that pumps this channel (validates, lands and acknowledges frames)
    /// whenever the primary wakes it ([`BackupLink::ack_helper`]: shared memory): the primary
    /// does so when an output waits for its ACK, and yields its core to the helper meanwhile, so
    /// the ACK comes without waiting for this replica's next exit and without a signal to
    /// another core. Whether the medium has one (one helper per channel end).
    pub fn start_ack_helper(&mut self) -> bool
    where
        L: 'static,
    {
        if self.helper.is_some() {
            return true;
        }
        let Some(wake) = self.rx().link.ack_helper() else {
            return false;
        };
        let stop = Arc::new(AtomicBool::new(false));
        let receiver = self.receiver.clone();
        // Read before the primary may wake it (it does only once the helper is ready, below):
        // a wake-up between the thread's start and its first read would otherwise be lost.
        let mut seen = wake.current();
        let thread = {
            let (stop, wake) = (stop.clone(), wake.clone());
            std::thread::Builder::new()
                .name("ftvm-ack-helper".into())
                .spawn(move || {
                    let mut pinned = None;
                    while !stop.load(Ordering::SeqCst) {
                        wake.wait(seen, Duration::from_millis(100));
                        let now = wake.current();
                        if now == seen {
                            continue;
                        }
                        seen = now;
                        if let Some(core) = wake.core() {
                            if pinned != Some(core) && pin_to(core) {
                                pinned = Some(core);
                            }
                        }
                        // Busy: the replica's thread is pumping, and acknowledges itself.
                        if let Ok(mut r) = receiver.try_lock() {
                            // An error ends the channel; the replica's thread meets it too.
                            let _ = r.pump();
                        }
                    }
                })
        };
        match thread {
            Ok(t) => {
                wake.set_ready(true);
                self.helper = Some(AckHelper {
                    stop,
                    wake,
                    thread: Some(t),
                });
                true
            }
            Err(e) => {
                tracing::warn!("no ACK helper thread: {e}");
                false
            }
        }
    }

    /// Builds the backup's end over a connected, authenticated link; `expected` is the sequence
    /// number of the next entry (1 for a new log), `epoch` the primary's epoch from the handshake.
    pub fn new(
        mut link: L,
        config: ChannelConfig,
        expected: u64,
        epoch: u64,
        keys: &SessionKeys,
    ) -> Result<Self, ChannelError> {
        config.validate()?;
        let sealed = config.crypto.seals();
        let encrypt = config.crypto == ChannelCrypto::Encrypt;
        if sealed {
            link.seal_acks(keys.ack_sealer());
        }
        let (producer, frames) = ring::heap(config.ring_capacity)?;
        let stats = Arc::new(ChannelStats::default());
        let now = Instant::now();
        let expected = expected.max(1);
        stats.last_seq.store(expected - 1, Ordering::Relaxed);
        stats.lag_now.store(expected - 1, Ordering::Relaxed);
        let metrics = ftvm_metrics::METRICS
            .log
            .attach(Arc::new(BackupProbe(stats.clone())));
        Ok(Backup {
            helper: None,
            replayed: None,
            receiver: Arc::new(Mutex::new(Receiver {
                link,
                producer,
                epoch: epoch.max(config.epoch),
                expected,
                acked: expected - 1,
                replayed: expected - 1,
                replayed_sent: expected - 1,
                heartbeat_interval: config.heartbeat_interval,
                last_acked_at: now,
                liveness: Liveness::new(&config, now),
                pumps: 0,
                stats: stats.clone(),
                opener: sealed.then(|| keys.frame_opener().decrypting(encrypt)),
                plain: Vec::new(),
                fenced: false,
            })),
            frames,
            cursor: Cursor::default(),
            config,
            stats,
            metrics,
        })
    }

    /// The same end over another link type that wraps this one (e.g. the medium layer's
    /// [`crate::medium::AnyBackupLink`]); all state is kept.
    pub fn map_link<M: BackupLink>(mut self, wrap: impl FnOnce(L) -> M) -> Backup<M> {
        // The helper holds the other handle on the receiver: stop it first.
        drop(self.helper.take());
        let r = match Arc::try_unwrap(self.receiver) {
            Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
            Err(_) => unreachable!("the only other handle was the helper's, joined above"),
        };
        Backup {
            helper: None,
            replayed: self.replayed,
            receiver: Arc::new(Mutex::new(Receiver {
                link: wrap(r.link),
                producer: r.producer,
                epoch: r.epoch,
                expected: r.expected,
                acked: r.acked,
                replayed: r.replayed,
                replayed_sent: r.replayed_sent,
                heartbeat_interval: r.heartbeat_interval,
                last_acked_at: r.last_acked_at,
                liveness: r.liveness,
                pumps: r.pumps,
                stats: r.stats,
                opener: r.opener,
                plain: r.plain,
                fenced: r.fenced,
            })),
            frames: self.frames,
            cursor: self.cursor,
            config: self.config,
            stats: self.stats,
            metrics: self.metrics,
        }
    }

    /// Pumps the medium once and hands every frame now in the backup's buffer to `f`, in order;
    /// returns how many frames were handed over. Frames reach `f` only after they were
    /// validated and acknowledged.
    ///
    /// If the channel fails, every frame that was acknowledged before the failure is still
    /// handed to `f` first; then the error is returned.
    pub fn poll(&mut self, mut f: impl FnMut(&FrameView<'_>)) -> Result<usize, ChannelError> {
        let pumped = self.pump_here();
        let mut n = 0;
        let mut last_replayed = None;
        while let Some(bytes) = self.frames.read()? {
            // Our own ring holds only frames the receiver validated, CRC included.
            let (frame, _) = FrameView::parse_validated(bytes)?;
            f(&frame);
            if let Some(last) = frame.last_seq() {
                last_replayed = Some(last);
            }
            n += 1;
        }
        self.frames.release();
        if let Some(last) = last_replayed {
            self.set_replayed(last);
        }
        pumped?;
        Ok(n)
    }

    /// Does the medium's work once (accept frames, acknowledge them, report the replay
    /// position, check liveness) without blocking; returns whether anything moved.
    pub fn pump(&mut self) -> Result<bool, ChannelError> {
        self.pump_here()
    }

    /// The next entry not yet replayed, read in place from the backup's ring, if one has landed;
    /// it stays the next one until [`Backup::advance`]. Does no I/O (see [`Backup::pump`]).
    pub fn next_entry(&mut self) -> Result<Option<LoggedEntry<'_>>, ChannelError> {
        let Some(bytes) = self.frames.peek()? else {
            return Ok(None);
        };
        // Only frames the receiver validated completely land in this ring, and only frames
        // with entries.
        let frame = FrameView::parse_landed(bytes)?;
        let c = &mut self.cursor;
        let (entry, next) = frame.entry_at(c.offset, c.index)?;
        c.next = next;
        c.first_seq = frame.first_seq();
        c.count = frame.entry_count();
        c.current = true;
        Ok(Some(LoggedEntry {
            seq: frame.first_seq() + u64::from(c.index),
            entry,
            frame: (c.index == 0).then(|| frame.as_bytes()),
        }))
    }

    /// The entry the last [`Backup::next_entry`] returned is replayed: step over it, and free
    /// its frame's space if it was the frame's last. Its sequence number goes to the primary
    /// with the next ACK (or within [`REPLAY_REPORT_INTERVAL`]). Does nothing if there was none.
    pub fn advance(&mut self) {
        let c = &mut self.cursor;
        if !std::mem::take(&mut c.current) {
            return;
        }
        let replayed = c.first_seq + u64::from(c.index);
        c.index += 1;
        c.offset = c.next;
        if c.index >= c.count {
            self.cursor = Cursor::default();
            self.frames.advance_peeked();
            self.frames.release();
        }
        self.set_replayed(replayed);
    }

    /// Pumps until an entry is ready for [`Backup::next_entry`] (`Ok(true)`) or `timeout`
    /// passed (`Ok(false)`), waiting under the configured policy (or in the kernel, in blocking
    /// mode). A failed channel still hands over what landed before: the error comes once the
    /// ring holds no entry.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        self.wait_with(timeout, self.config.poll)
    }

    /// [`Backup::wait`] under `policy` instead of the configured one (e.g. a relaxed policy
    /// while the replica's guest is idle).
    pub fn wait_with(
        &mut self,
        timeout: Duration,
        policy: PollPolicy,
    ) -> Result<bool, ChannelError> {
        let deadline = Instant::now() + timeout;
        let mut poller = policy.poller();
        loop {
            let pumped = self.pump_here();
            if self.frames.has_records()? {
                return Ok(true);
            }
            pumped?;
            if poller.is_past_spinning() && Instant::now() >= deadline {
                return Ok(false);
            }
            if self.config.blocking {
                self.rx().link.block(self.config.heartbeat_interval)?;
            } else {
                poller.wait();
            }
        }
    }

    /// The sequence number of the last entry replayed (as set by [`Backup::advance`], or by
    /// [`Backup::poll`] when it handed a frame over).
    pub fn replayed(&self) -> u64 {
        self.replayed.unwrap_or_else(|| self.rx().replayed)
    }

    /// Polls until at least one frame was handed to `f` or `timeout` passed (`Ok(0)`), waiting
    /// under the configured policy (or in the kernel, in blocking mode).
    pub fn poll_timeout(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&FrameView<'_>),
    ) -> Result<usize, ChannelError> {
        let deadline = Instant::now() + timeout;
        let mut poller = self.config.poll.poller();
        loop {
            let n = self.poll(&mut f)?;
            if n > 0 {
                return Ok(n);
            }
            if poller.is_past_spinning() && Instant::now() >= deadline {
                return Ok(0);
            }
            if self.config.blocking {
                self.rx().link.block(self.config.heartbeat_interval)?;
            } else {
                poller.wait();
            }
        }
    }

    /// The last sequence number acknowledged.
    pub fn acked(&self) -> u64 {
        self.rx().acked()
    }

    /// The newest epoch seen.
    pub fn epoch(&self) -> u64 {
        self.rx().epoch()
    }

    /// Counters of this end.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_replay_rate_saturates_the_drain_time() {
        // A backup that stopped replaying: its rate has decayed towards zero.
        let rate = ReplayRate {
            start: Instant::now(),
            start_replayed: 0,
            busy: true,
            per_sec: 1e-300,
        };
        assert_eq!(rate.drain_time(1_000), Some(Duration::MAX));
        assert_eq!(rate.drain_time(0), None);
    }
}
