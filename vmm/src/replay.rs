//! The backup's event source: every value comes from the primary's log, at the exit the log
//! names. The backup never reads live inputs, stalls when the log has nothing for the current
//! exit (so it never runs ahead of the primary), drops its outputs, and checks each output's
//! digest against the primary's marker: a mismatch is a divergence, reported with the exit,
//! the device and both digests.

use std::time::Duration;

use logfmt::{ControlOp, Event};
use transport::channel::LoggedEntry;
use transport::{Backup, BackupLink, ChannelError, StatsSnapshot};

use crate::engine::{EngineError, EventSource, NET_DEVICE};
use crate::journal::Journal;

/// Where a replica's log entries come from, read in place: the live channel's validated ring
/// ([`transport::Backup`]) or a journal file ([`crate::journal::JournalSource`]).
pub trait EntrySource {
    /// The next entry not yet replayed, if one is here; it stays the next one until
    /// [`EntrySource::advance`]. No I/O.
    fn next_entry(&mut self) -> Result<Option<LoggedEntry<'_>>, ChannelError>;
    /// The entry `next_entry` returned is replayed.
    fn advance(&mut self);
    /// Does the source's work once (receive, acknowledge, report the replay position); an
    /// error means the log has ended (what was already received can still be replayed).
    fn pump(&mut self) -> Result<bool, ChannelError>;
    /// Pumps until an entry is ready or `timeout` passed.
    fn wait(&mut self, timeout: Duration) -> Result<bool, ChannelError>;
    /// Entries received so far.
    fn received(&self) -> u64;
    /// Like [`Self::wait`], while the replica's guest is idle: may sleep between polls.
    fn wait_idle(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        self.wait(timeout)
    }
    /// Like [`Self::wait`], but gives up at `timeout` after a short spin (the configured policy
    /// may spin far longer than that first).
    fn wait_idle_spin(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        self.wait(timeout)
    }
    /// Counters of the channel underneath, if there is one.
    fn stats(&self) -> Option<StatsSnapshot> {
        None
    }
    /// The calling thread (the vCPU's) may be kicked by the primary from now on
    /// ([`transport::kick`]); whether the source supports it.
    fn enable_kicks(&mut self) -> bool {
        false
    }
    /// Starts the source's ACK helper thread ([`transport::Backup::start_ack_helper`]);
    /// whether it has one.
    fn start_ack_helper(&mut self) -> bool {
        false
    }
}

impl<L: BackupLink + 'static> EntrySource for Backup<L> {
    fn next_entry(&mut self) -> Result<Option<LoggedEntry<'_>>, ChannelError> {
        Backup::next_entry(self)
    }
    fn advance(&mut self) {
        Backup::advance(self);
    }
    fn pump(&mut self) -> Result<bool, ChannelError> {
        Backup::pump(self)
    }
    fn wait(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        Backup::wait(self, timeout)
    }
    fn received(&self) -> u64 {
        Backup::stats(self).entries
    }
    fn wait_idle(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        fine_timer_slack();
        Backup::wait_with(self, timeout, transport::PollPolicy::IDLE)
    }
    fn wait_idle_spin(&mut self, timeout: Duration) -> Result<bool, ChannelError> {
        Backup::wait_with(self, timeout, transport::PollPolicy::SPIN_THEN_YIELD)
    }
    fn stats(&self) -> Option<StatsSnapshot> {
        Some(Backup::stats(self))
    }
    fn enable_kicks(&mut self) -> bool {
        Backup::enable_kicks(self)
    }
    fn start_ack_helper(&mut self) -> bool {
        Backup::start_ack_helper(self)
    }
}

/// The backup's [`EventSource`].
#[derive(Debug)]
pub struct Replayer<S: EntrySource> {
    source: S,
    stall_timeout: Duration,
    outputs_checked: u64,
    journal: Option<Journal>,
    journal_error: Option<String>,
    /// The last sequence number whose frame went to the journal.
    journaled: u64,
    /// The last sequence number replayed.
    replayed: u64,
    /// Why the log ended, once it has: from then on only what was received is replayed.
    ended: Option<String>,
    /// After the end, the source was pumped once more with nothing left and gave nothing.
    drained: bool,
    /// The newest clock value replayed (a backup that goes live continues from it).
    last_clock_ns: u64,
    /// When the channel's failure was noticed (ns since the Unix epoch).
    ended_unix_ns: u64,
    /// Set to leave before the primary's stop point ([`EngineError::Stopped`]).
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The guest is in a wait (`hlt`): the next entry may be far off.
    guest_waits: bool,
    /// How long to spin for the next entry while the guest waits, before sleeping between polls.
    idle_spin: Duration,
}

/// Sets this thread's timer slack to 1 µs (once per thread): the idle polls' short sleeps then
/// last what they ask for, not the default slack's 50 µs more.
fn fine_timer_slack() {
    thread_local!(static SET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    SET.with(|set| {
        if !set.replace(true) {
            // SAFETY: PR_SET_TIMERSLACK takes one integer argument (nanoseconds) and changes
            // only the calling thread's timer slack.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
        }
    });
}

/// How long a backup whose guest waits spins for the next entry before it sleeps between polls,
/// by default ([`Replayer::with_idle_spin`]).
const IDLE_SPIN: Duration = Duration::from_micros(500);

/// A copy of what an entry says, for error messages.
fn describe(event: &Event<'_>) -> String {
    match event {
        Event::DeviceInput { device, data } => {
            format!("Input {{ device: {device}, {} bytes }}", data.len())
        }
        other => format!("{other:?}"),
    }
}

impl<S: EntrySource> Replayer<S> {
    /// Replays the log arriving from `source`. A stall longer than `stall_timeout` with the
    /// source still alive is not an error (the primary may be idle); the channel's own
    /// heartbeat timeout ends a stall on a dead primary.
    pub fn new(source: S, stall_timeout: Duration) -> Self {
        Replayer {
            source,
            stall_timeout,
            outputs_checked: 0,
            journal: None,
            journal_error: None,
            journaled: 0,
            replayed: 0,
            ended: None,
            drained: false,
            last_clock_ns: 0,
            ended_unix_ns: 0,
            stop: None,
            guest_waits: false,
            idle_spin: IDLE_SPIN,
        }
    }

    /// Leaves (with [`EngineError::Stopped`] at the next exit) once `stop` is set, instead of
    /// replaying on to the primary's stop point.
    pub fn with_stop(mut self, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.stop = Some(stop);
        self
    }

    /// Outputs whose digest matched the primary's.
    pub fn outputs_checked(&self) -> u64 {
        self.outputs_checked
    }

    /// Log entries received.
    pub fn entries(&self) -> u64 {
        self.source.received()
    }

    /// Also appends every frame replayed to `journal` (when its first entry comes up).
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Takes the journal back (for the live log after a takeover), or says why it was lost.
    pub fn take_journal(&mut self) -> Result<Option<Journal>, String> {
        match self.journal_error.take() {
            Some(e) => Err(e),
            None => Ok(self.journal.take()),
        }
    }

    /// The sequence number of the last entry replayed (once the log has ended: of the last
    /// entry received, for every received entry is replayed before the end is reported).
    pub fn last_seq(&self) -> u64 {
        self.replayed
    }

    /// The entry source.
    pub fn source(&self) -> &S {
        &self.source
    }

    /// While the guest waits for an interrupt, spin `spin` for the next entry before sleeping
    /// between polls (a request soon after the last one then costs no wake-up).
    pub fn with_idle_spin(mut self, spin: Duration) -> Self {
        self.idle_spin = spin;
        self
    }

    /// Starts from a guest clock of `last_clock_ns` (a backup that joined a running guest: the
    /// clock it continues from, should it take over before the log gives it another).
    pub fn with_clock(mut self, last_clock_ns: u64) -> Self {
        self.last_clock_ns = last_clock_ns;
        self
    }

    /// The last clock value replayed (or given by [`Self::with_clock`]).
    pub fn last_clock_ns(&self) -> u64 {
        self.last_clock_ns
    }

    /// Why the log ended, if it has.
    pub fn ended(&self) -> Option<&str> {
        self.ended.as_deref()
    }

    /// When the channel's failure was noticed (ns since the Unix epoch; 0 if it has not failed).
    pub fn ended_unix_ns(&self) -> u64 {
        self.ended_unix_ns
    }

    fn end(&mut self, cause: ChannelError) {
        if self.ended.is_none() {
            self.ended = Some(cause.to_string());
            self.ended_unix_ns = crate::failover::unix_ns();
        }
    }

    /// Makes sure an entry is ready; waits (stalls) while there is none.
    ///
    /// Pumps the source at least once per call even when entries are ready: the channel is
    /// pumped only from this thread, so this is what keeps the backup's ACKs (and with them the
    /// primary's output commits) flowing while the replica works through a backlog.
    ///
    /// Once the source has failed, the entries already received are still replayed, in order
    /// (a failed medium may still hand over frames it validated: it is pumped once more when
    /// nothing is left); only when none is left does this return [`EngineError::LogEnded`].
    fn fill(&mut self, exit: u64) -> Result<(), EngineError> {
        if self
            .stop
            .as_ref()
            .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(EngineError::Stopped { exit });
        }
        if self.ended.is_none() {
            if let Err(e) = self.source.pump() {
                self.end(e);
            }
        }
        loop {
            if self.source.next_entry()?.is_some() {
                return Ok(());
            }
            if let Some(cause) = &self.ended {
                if self.drained {
                    return Err(EngineError::LogEnded {
                        exit,
                        cause: cause.clone(),
                    });
                }
                self.drained = true;
                let _ = self.source.pump();
                continue;
            }
            let waited = if self.guest_waits {
                // The guest sleeps until the primary's guest wakes: spin a little (a request
                // often follows soon), then let the core rest.
                match self.source.wait_idle_spin(self.idle_spin) {
                    Ok(false) => self.source.wait_idle(self.stall_timeout),
                    other => other,
                }
            } else {
                self.source.wait(self.stall_timeout)
            };
            if let Err(e) = waited {
                self.end(e);
            }
        }
    }

    /// The next entry that is not a heartbeat, which must belong to `exit`; journals its frame.
    fn front(&mut self, exit: u64) -> Result<LoggedEntry<'_>, EngineError> {
        loop {
            self.fill(exit)?;
            let Some(e) = self.source.next_entry()? else {
                unreachable!("fill returns only with an entry ready")
            };
            if !matches!(e.entry.event, Event::Heartbeat { .. }) {
                break;
            }
            let seq = e.seq;
            self.source.advance();
            self.replayed = seq;
        }
        let Some(e) = self.source.next_entry()? else {
            unreachable!("fill returned with an entry ready")
        };
        if let (Some(frame), Some(j)) = (e.frame, &mut self.journal) {
            if e.seq > self.journaled {
                self.journaled = e.seq;
                if let Err(err) = j.write_frame(frame) {
                    self.journal_error = Some(err.to_string());
                    self.journal = None;
                }
            }
        }
        let at = e.entry.position.exit;
        if at < exit {
            return Err(EngineError::MalformedLog {
                exit,
                what: format!(
                    "entry {} is for exit {at}, which the replica has passed",
                    e.seq
                ),
            });
        }
        if at > exit {
            return Err(EngineError::Divergence {
                exit,
                device: 0,
                primary: format!("no event until exit {at}"),
                backup: "a hypercall that needs a logged value".into(),
            });
        }
        Ok(e)
    }

    /// Steps over the entry `front` returned.
    fn advance(&mut self, seq: u64) {
        self.source.advance();
        self.replayed = seq;
    }

    /// Takes the next entry for `exit` if `pick` accepts it; else the divergence (or, for an
    /// entry of a kind the replica never expects, the malformed log) `pick` reports.
    fn take<T>(
        &mut self,
        exit: u64,
        wanted: &str,
        backup: &str,
        pick: impl FnOnce(&Event<'_>) -> Option<Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        let e = self.front(exit)?;
        let seq = e.seq;
        let picked = pick(&e.entry.event);
        let result = match picked {
            Some(r) => r,
            None => Err(match &e.entry.event {
                Event::DeviceInput { .. }
                | Event::Clock { .. }
                | Event::Random { .. }
                | Event::Interrupt { .. }
                | Event::OutputMarker { .. }
                | Event::Control(ControlOp::Shutdown) => EngineError::Divergence {
                    exit,
                    device: 0,
                    primary: format!("logged {}", describe(&e.entry.event)),
                    backup: backup.into(),
                },
                other => EngineError::MalformedLog {
                    exit,
                    what: format!(
                        "entry {seq}: {} where {wanted} was expected",
                        describe(other)
                    ),
                },
            }),
        };
        if result.is_ok() {
            self.advance(seq);
        }
        result
    }
}

impl<S: EntrySource> EventSource for Replayer<S> {
    fn on_vcpu_thread(&mut self) {
        if self.source.enable_kicks() {
            tracing::debug!("the primary may kick this vCPU thread to get its ACKs sooner");
        }
        if self.source.start_ack_helper() {
            tracing::debug!("an ACK helper thread answers the primary's wake-ups");
        }
    }

    fn interrupted(&mut self) {
        // Acknowledge what arrived while the guest ran; a failed channel is noticed here as at
        // the next exit (the entries received before it are still replayed).
        if self.ended.is_none() {
            if let Err(e) = self.source.pump() {
                self.end(e);
            }
        }
    }

    fn should_stop(&mut self, exit: u64) -> Result<bool, EngineError> {
        Ok(matches!(
            self.front(exit)?.entry.event,
            Event::Control(ControlOp::Shutdown)
        ))
    }

    fn interrupts(&mut self, exit: u64, out: &mut Vec<u8>) -> Result<(), EngineError> {
        loop {
            let e = self.front(exit)?;
            let Event::Interrupt { vector } = e.entry.event else {
                return Ok(());
            };
            let seq = e.seq;
            out.push(vector);
            self.advance(seq);
        }
    }

    fn net_rx(&mut self, exit: u64, buf: &mut Vec<u8>) -> Result<(), EngineError> {
        self.take(
            exit,
            "network input",
            "network receive",
            |event| match event {
                Event::DeviceInput {
                    device: NET_DEVICE,
                    data,
                } => {
                    buf.extend_from_slice(data);
                    Some(Ok(()))
                }
                _ => None,
            },
        )
    }

    fn wake(&mut self, exit: u64, rx: &mut Vec<u8>) -> Result<Option<u8>, EngineError> {
        self.guest_waits = true;
        let stop = self
            .front(exit)
            .map(|e| matches!(e.entry.event, Event::Control(ControlOp::Shutdown)));
        self.guest_waits = false;
        if stop? {
            return Ok(None);
        }
        self.take(
            exit,
            "a wake-up",
            "a wait for an interrupt",
            |event| match event {
                // A request woke the guest: one entry, so a takeover never finds half a wake-up.
                Event::DeviceInput {
                    device: NET_DEVICE,
                    data,
                } => {
                    rx.extend_from_slice(data);
                    Some(Ok(Some(crate::engine::NET_RX_VECTOR)))
                }
                Event::Interrupt { vector } => Some(Ok(Some(*vector))),
                _ => None,
            },
        )
    }

    fn clock(&mut self, exit: u64) -> Result<u64, EngineError> {
        let ns = self.take(exit, "clock", "clock read", |event| match event {
            Event::Clock { ns } => Some(Ok(*ns)),
            _ => None,
        })?;
        self.last_clock_ns = self.last_clock_ns.max(ns);
        Ok(ns)
    }

    fn random(&mut self, exit: u64) -> Result<[u8; 16], EngineError> {
        self.take(exit, "random bytes", "random read", |event| match event {
            Event::Random { data } => {
                Some((*data).try_into().map_err(|_| EngineError::MalformedLog {
                    exit,
                    what: format!("{} random bytes where 16 were expected", data.len()),
                }))
            }
            _ => None,
        })
    }

    fn output(&mut self, exit: u64, device: u16, bytes: &[u8]) -> Result<(), EngineError> {
        let ours = logfmt::digest(bytes);
        self.take(exit, "output marker", "an output", |event| match event {
            Event::OutputMarker {
                device: d,
                len,
                digest,
            } if *d == device => {
                if *digest != ours || *len as usize != bytes.len() {
                    return Some(Err(EngineError::Divergence {
                        exit,
                        device,
                        primary: format!("output digest {digest:#018x} ({len} bytes)"),
                        backup: format!("output digest {ours:#018x} ({} bytes)", bytes.len()),
                    }));
                }
                Some(Ok(()))
            }
            _ => None,
        })?;
        self.outputs_checked += 1;
        Ok(())
    }
}
