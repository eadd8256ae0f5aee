//! The primary's event source: reads the live world (client requests on a UDP socket, the host
//! clock, the host's random numbers, a wall-clock timer), logs every value at the exit where the
//! guest observes it, and parks outputs in the [`OutputGate`] until the backup has the log.
//!
//! The same recorder with a [`NoLog`] sink is the unreplicated baseline: identical work, no
//! logging, outputs released at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logfmt::{ControlOp, Entry, Event, Position};
use transport::{PreSharedKey, PrimaryLink};

use crate::engine::{EngineError, EventSource, NET_DEVICE, NET_RX_VECTOR, TIMER_VECTOR};
use crate::output_gate::OutputGate;
use crate::service::ServicePort;
use ftvm_metrics::METRICS;

/// Longest sleep of a primary whose guest waits for an interrupt: the channel (heartbeats, ACKs)
/// and the stop flag are serviced at least this often.
const WAIT_SLICE: Duration = Duration::from_millis(1);

/// Where the recorder's log entries go.
pub trait LogSink {
    /// Appends an entry; returns its sequence number.
    fn append(&mut self, entry: &Entry<'_>) -> Result<u64, EngineError>;
    /// Does the medium's work without blocking (send, read ACKs).
    fn pump(&mut self) -> Result<(), EngineError>;
    /// Sends the entries batched so far now (before the vCPU goes idle, so the backup is not
    /// left waiting for them).
    fn flush(&mut self) -> Result<(), EngineError> {
        Ok(())
    }
    /// The cumulative ACK.
    fn acked(&self) -> u64;
    /// Waits until entry `seq` is acknowledged.
    fn wait_acked(&mut self, seq: u64) -> Result<(), EngineError>;
    /// Bytes of log sent so far.
    fn log_bytes(&self) -> u64;
    /// The fencing epoch this replica runs in (stamped on every released output).
    fn epoch(&self) -> u64;
    /// Asks the backup to acknowledge now ([`transport::PrimaryLink::kick`]); whether a kick
    /// was sent.
    fn kick(&mut self) -> bool {
        false
    }
    /// Wakes the backup's ACK helper ([`transport::Primary::wake_ack_helper`]); whether there
    /// is one (then yield the core while waiting).
    fn wake_ack_helper(&mut self) -> bool {
        false
    }
}

impl<L: PrimaryLink> LogSink for transport::Primary<L> {
    fn append(&mut self, entry: &Entry<'_>) -> Result<u64, EngineError> {
        Ok(transport::Primary::append(self, entry)?)
    }
    fn pump(&mut self) -> Result<(), EngineError> {
        transport::Primary::pump(self)?;
        Ok(())
    }
    fn flush(&mut self) -> Result<(), EngineError> {
        Ok(transport::Primary::flush(self)?)
    }
    fn acked(&self) -> u64 {
        transport::Primary::acked(self)
    }
    fn wait_acked(&mut self, seq: u64) -> Result<(), EngineError> {
        Ok(transport::Primary::wait_acked(self, seq)?)
    }
    fn log_bytes(&self) -> u64 {
        self.stats().bytes
    }
    fn kick(&mut self) -> bool {
        transport::Primary::kick(self)
    }
    fn wake_ack_helper(&mut self) -> bool {
        transport::Primary::wake_ack_helper(self)
    }
    fn epoch(&self) -> u64 {
        self.config().epoch
    }
}

/// No replication: every entry counts as acknowledged at once. The unreplicated baseline, and
/// the log of a replica that went live after its peer was lost.
#[derive(Debug)]
pub struct NoLog {
    seq: u64,
    epoch: u64,
}

impl Default for NoLog {
    fn default() -> Self {
        NoLog::at_epoch(1)
    }
}

impl NoLog {
    /// Unreplicated, running in fencing `epoch`.
    pub fn at_epoch(epoch: u64) -> Self {
        NoLog { seq: 0, epoch }
    }
}

impl LogSink for NoLog {
    fn append(&mut self, _entry: &Entry<'_>) -> Result<u64, EngineError> {
        self.seq += 1;
        Ok(self.seq)
    }
    fn pump(&mut self) -> Result<(), EngineError> {
        Ok(())
    }
    fn acked(&self) -> u64 {
        u64::MAX
    }
    fn wait_acked(&mut self, _seq: u64) -> Result<(), EngineError> {
        Ok(())
    }
    fn log_bytes(&self) -> u64 {
        0
    }
    fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// Recorder settings.
#[derive(Debug, Clone)]
pub struct RecordConfig {
    /// Timer tick period (vector 32).
    pub tick: Duration,
    /// How long a NET_RX waits for a request before answering "none" (the guest then loops).
    pub idle_wait: Duration,
    /// After an output, how long the vCPU thread may poll for its ACK before re-entering the
    /// guest. The output is parked either way; this only decides whether it can leave now or at
    /// the next exit (which, at ~8 µs per exit and slow ring-0 code here, is ~10 µs away). Zero
    /// gives the pure "primary never waits" rule.
    pub commit_spin: Duration,
    /// When an output has waited this long for its ACK while the vCPU spins
    /// ([`Self::commit_spin`]), kick the backup ([`transport::kick`]: same host only) so it
    /// acknowledges now instead of at its guest's next exit. Zero: never.
    pub ack_kick: Duration,
    /// When an output has waited this long for its ACK, wake the backup's ACK helper thread
    /// (same host only) and yield this core to it until the ACK comes. Zero: never.
    pub ack_helper: Duration,
    /// The guest clock's value at the start of this recorder: 0 for a fresh guest, the last
    /// replayed clock value for a backup that goes live (the guest's clock never runs back).
    pub clock_base_ns: u64,
}

/// [`RecordConfig::ack_kick`]'s default, µs.
pub const ACK_KICK_US: u64 = 20;
/// The ACK helper's wake-up threshold `ftvm demo` uses, µs ([`RecordConfig::ack_helper`] is
/// off by default: with a CPU-starved backup, lag control's peaks grew with it — see the
/// README).
pub const ACK_HELPER_US: u64 = 3;

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            tick: Duration::from_millis(10),
            idle_wait: Duration::from_micros(500),
            commit_spin: Duration::from_micros(30),
            ack_kick: Duration::from_micros(ACK_KICK_US),
            ack_helper: Duration::ZERO,
            clock_base_ns: 0,
        }
    }
}

/// The primary's [`EventSource`].
#[derive(Debug)]
pub struct Recorder<S: LogSink> {
    log: S,
    gate: OutputGate,
    port: ServicePort,
    /// Key and pair id to re-register at the service front when the epoch changes.
    front_auth: Option<(PreSharedKey, u64)>,
    /// The epoch the front last accepted from us.
    registered_epoch: u64,
    config: RecordConfig,
    started: Instant,
    next_tick: Instant,
    stop: Arc<AtomicBool>,
    requests: u64,
    first_output_exit: Option<u64>,
    /// The last clock value the guest was given.
    last_clock_ns: u64,
    /// Set (by a join) to pause the run at the next exit boundary.
    pause: Option<Arc<AtomicBool>>,
}

impl<S: LogSink> Recorder<S> {
    /// A recorder serving clients on `port`, logging into `log`; setting `stop` ends the run at
    /// the next exit (logged, so the backup stops there too). A port behind a service front
    /// must already be registered at the log's epoch (see [`Self::reregister_with`]).
    pub fn new(
        log: S,
        port: ServicePort,
        config: RecordConfig,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, EngineError> {
        let gate_port = port.try_clone()?;
        let now = Instant::now();
        let registered_epoch = log.epoch();
        Ok(Recorder {
            log,
            gate: OutputGate::new(gate_port)?,
            port,
            front_auth: None,
            registered_epoch,
            next_tick: now + config.tick,
            config,
            started: now,
            stop,
            requests: 0,
            first_output_exit: None,
            last_clock_ns: 0,
            pause: None,
        })
    }

    /// The output gate (commit latencies, counts).
    pub fn gate(&self) -> &OutputGate {
        &self.gate
    }

    /// The log sink.
    pub fn log(&self) -> &S {
        &self.log
    }

    /// The log sink, to change it between runs (e.g. a backup joined).
    pub fn log_mut(&mut self) -> &mut S {
        &mut self.log
    }

    /// The last clock value the guest was given (a joining backup continues from it).
    pub fn last_clock_ns(&self) -> u64 {
        self.last_clock_ns
    }

    /// Setting `flag` pauses the run at the next exit boundary (see
    /// [`EventSource::pause_after`]); the flag stays set until the pauser clears it.
    pub fn with_pause(mut self, flag: Arc<AtomicBool>) -> Self {
        self.pause = Some(flag);
        self
    }

    /// Client requests handed to the guest.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The exit at which the guest produced its first output.
    pub fn first_output_exit(&self) -> Option<u64> {
        self.first_output_exit
    }

    /// When the log's epoch changes (a primary that lost its backup won the arbiter), register
    /// the new epoch at the service front with this key and pair id before releasing anything.
    pub fn reregister_with(mut self, key: PreSharedKey, session: u64) -> Self {
        self.front_auth = Some((key, session));
        self
    }

    /// Releases what the log's ACK covers, stamped with our epoch — after claiming a changed
    /// epoch at the front. A front that knows a newer epoch means we were deposed.
    fn release(&mut self) -> Result<(), EngineError> {
        let epoch = self.log.epoch();
        if epoch != self.registered_epoch {
            if let Some((key, session)) = &self.front_auth {
                let newest = self
                    .port
                    .register(key, *session, epoch, Duration::from_secs(5))?;
                if newest > epoch {
                    self.gate.discard();
                    return Err(EngineError::Deposed {
                        epoch,
                        by: format!("the service front knows epoch {newest}"),
                    });
                }
            }
            self.registered_epoch = epoch;
        }
        self.gate.release(self.log.acked(), epoch)?;
        Ok(())
    }

    /// The next client request into `buf`, if one is waiting (its client noted for the reply).
    fn take_request(&mut self, buf: &mut Vec<u8>) -> Result<bool, EngineError> {
        let Some(from) = self.port.try_recv(buf, crate::layout::NET_BUF_LEN)? else {
            return Ok(false);
        };
        if let Some(id) = buf.get(..4) {
            self.gate
                .note_client(u32::from_le_bytes([id[0], id[1], id[2], id[3]]), from);
        }
        self.requests += 1;
        Ok(true)
    }

    /// Logs a timer tick at `exit`; the next one is due a period after `now` (ticks missed
    /// while busy are not replayed one by one).
    fn tick(&mut self, exit: u64, now: Instant) -> Result<(), EngineError> {
        self.log.append(&Entry::new(
            Position::at_exit(exit),
            Event::Interrupt {
                vector: TIMER_VECTOR,
            },
        ))?;
        self.next_tick = now + self.config.tick;
        Ok(())
    }

    /// Logs `data` as the network input the guest sees at `exit`.
    fn log_input(&mut self, exit: u64, data: &[u8]) -> Result<(), EngineError> {
        self.log.append(&Entry::new(
            Position::at_exit(exit),
            Event::DeviceInput {
                device: NET_DEVICE,
                data,
            },
        ))?;
        Ok(())
    }

    fn service(&mut self) -> Result<(), EngineError> {
        self.log.pump()?;
        self.release()
    }
}

impl<S: LogSink> EventSource for Recorder<S> {
    fn should_stop(&mut self, exit: u64) -> Result<bool, EngineError> {
        self.service()?;
        if !self.stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let seq = self.log.append(&Entry::new(
            Position::at_exit(exit),
            Event::Control(ControlOp::Shutdown),
        ))?;
        self.log.wait_acked(seq)?;
        self.release()?;
        Ok(true)
    }

    fn interrupts(&mut self, exit: u64, out: &mut Vec<u8>) -> Result<(), EngineError> {
        let now = Instant::now();
        if now >= self.next_tick {
            out.push(TIMER_VECTOR);
            self.tick(exit, now)?;
        }
        Ok(())
    }

    fn net_rx(&mut self, exit: u64, buf: &mut Vec<u8>) -> Result<(), EngineError> {
        let deadline = Instant::now() + self.config.idle_wait;
        loop {
            if self.take_request(buf)? {
                break;
            }
            if Instant::now() >= deadline || self.stop.load(Ordering::Relaxed) {
                break;
            }
            // Idle: keep the channel moving and outputs flowing while we wait.
            self.service()?;
            std::thread::yield_now();
        }
        self.log_input(exit, buf)
    }

    fn wake(&mut self, exit: u64, rx: &mut Vec<u8>) -> Result<Option<u8>, EngineError> {
        loop {
            self.service()?;
            if self.stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            rx.clear();
            if self.take_request(rx)? {
                if rx.is_empty() {
                    continue; // an empty datagram is no request
                }
                self.log_input(exit, rx)?;
                return Ok(Some(NET_RX_VECTOR));
            }
            let now = Instant::now();
            // A pause (a join's switch-over) waits for this exit to end: a tick ends it now.
            if now >= self.next_tick || self.pause_after(exit) {
                self.tick(exit, now)?;
                return Ok(Some(TIMER_VECTOR));
            }
            if self.gate.pending() > 0 {
                // Outputs wait for ACKs: keep polling the channel.
                std::thread::yield_now();
                continue;
            }
            // Idle: send what the guest did so far (the backup catches up and can rest too),
            // then sleep until a request comes, the tick is due, or a slice has passed (the
            // channel's heartbeats and the stop flag are looked at every slice).
            self.log.flush()?;
            let slice = self
                .next_tick
                .saturating_duration_since(now)
                .min(WAIT_SLICE);
            self.port.wait_readable(slice)?;
        }
    }

    fn clock(&mut self, exit: u64) -> Result<u64, EngineError> {
        // Never backwards, also across a change of base (a takeover continues the clock).
        let ns = (self.config.clock_base_ns + self.started.elapsed().as_nanos() as u64)
            .max(self.last_clock_ns);
        self.last_clock_ns = ns;
        self.log
            .append(&Entry::new(Position::at_exit(exit), Event::Clock { ns }))?;
        Ok(ns)
    }

    fn random(&mut self, exit: u64) -> Result<[u8; 16], EngineError> {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes).map_err(|e| EngineError::Io {
            context: "drawing random bytes",
            source: std::io::Error::other(e.to_string()),
        })?;
        self.log.append(&Entry::new(
            Position::at_exit(exit),
            Event::Random { data: &bytes },
        ))?;
        Ok(bytes)
    }

    fn pause_after(&mut self, _exit: u64) -> bool {
        self.pause
            .as_ref()
            .is_some_and(|p| p.load(Ordering::Acquire))
    }

    fn output(&mut self, exit: u64, device: u16, bytes: &[u8]) -> Result<(), EngineError> {
        self.first_output_exit.get_or_insert(exit);
        // The output's commit starts here: appending and sending its marker is part of it.
        let produced = Instant::now();
        let seq = self.log.append(&Entry::new(
            Position::at_exit(exit),
            Event::OutputMarker {
                device,
                len: bytes.len() as u32,
                digest: logfmt::digest(bytes),
            },
        ))?;
        self.gate.hold(seq, bytes, produced);
        self.release()?;
        if self.gate.pending() > 0 && !self.config.commit_spin.is_zero() {
            let start = Instant::now();
            let until = start + self.config.commit_spin;
            let mut kick = (!self.config.ack_kick.is_zero()).then(|| start + self.config.ack_kick);
            let mut help =
                (!self.config.ack_helper.is_zero()).then(|| start + self.config.ack_helper);
            let mut yielding = false;
            loop {
                self.service()?;
                if self.gate.pending() == 0 {
                    break;
                }
                let now = Instant::now();
                if now >= until {
                    break;
                }
                if help.is_some_and(|at| now >= at) {
                    help = None;
                    if self.log.wake_ack_helper() {
                        METRICS.ack_helps.inc();
                        yielding = true;
                        kick = None;
                    }
                }
                if yielding {
                    // The helper runs on this core: let it.
                    std::thread::yield_now();
                } else if kick.is_some_and(|at| now >= at) {
                    kick = None;
                    if self.log.kick() {
                        METRICS.ack_kicks.inc();
                    }
                }
            }
        }
        Ok(())
    }
}
