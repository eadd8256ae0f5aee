//! The backup's event source: every value comes from the primary's log, at the exit the log
//! names. The backup never reads live inputs, stalls when the log has nothing for the current
//! exit (so it never runs ahead of the primary), drops its outputs, and checks each output's
//! digest against the primary's marker: a mismatch is a divergence, reported with the exit,
//! the device and both digests.

use std::collections::VecDeque;
use std::time::Duration;

use logfmt::{ControlOp, Event};
use transport::{Backup, BackupLink};

use crate::engine::{EngineError, EventSource, NET_DEVICE};
use crate::journal::Journal;

/// One log entry, owned (frames are borrowed from the channel only while it is polled).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Logged {
    Input { device: u16, data: Vec<u8> },
    Clock(u64),
    Random(Vec<u8>),
    Interrupt(u8),
    Output { device: u16, len: u32, digest: u64 },
    Shutdown,
    Other(String),
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    exit: u64,
    what: Logged,
}

/// Where received frames go besides the replay queue.
#[derive(Debug, Default)]
struct Sinks {
    entries: u64,
    last_seq: u64,
    journal: Option<Journal>,
    journal_error: Option<String>,
}

/// Copies a frame's entries into the replay queue, owned (and the frame into the journal).
fn enqueue(queue: &mut VecDeque<Pending>, sinks: &mut Sinks, frame: &logfmt::FrameView<'_>) {
    if let Some(j) = &mut sinks.journal {
        if let Err(e) = j.write_frame(frame.as_bytes()) {
            sinks.journal_error = Some(e.to_string());
            sinks.journal = None;
        }
    }
    if let Some(last) = frame.last_seq() {
        sinks.last_seq = last;
    }
    let entries = &mut sinks.entries;
    for (seq, entry) in frame.entries_with_seq() {
        *entries += 1;
        let what = match entry.event {
            Event::DeviceInput { device, data } => Logged::Input {
                device,
                data: data.to_vec(),
            },
            Event::Clock { ns } => Logged::Clock(ns),
            Event::Random { data } => Logged::Random(data.to_vec()),
            Event::Interrupt { vector } => Logged::Interrupt(vector),
            Event::OutputMarker {
                device,
                len,
                digest,
            } => Logged::Output {
                device,
                len,
                digest,
            },
            Event::Heartbeat { .. } => continue,
            Event::Control(ControlOp::Shutdown) => Logged::Shutdown,
            other => Logged::Other(format!("{other:?}")),
        };
        queue.push_back(Pending {
            seq,
            exit: entry.position.exit,
            what,
        });
    }
}

/// The backup's [`EventSource`].
#[derive(Debug)]
pub struct Replayer<L: BackupLink> {
    backup: Backup<L>,
    queue: VecDeque<Pending>,
    stall_timeout: Duration,
    outputs_checked: u64,
    sinks: Sinks,
    /// Why the channel ended, once it has: from then on only the queue is replayed.
    ended: Option<String>,
    /// The newest clock value replayed (a backup that goes live continues from it).
    last_clock_ns: u64,
    /// When the channel's failure was noticed (ns since the Unix epoch).
    ended_unix_ns: u64,
}

impl<L: BackupLink> Replayer<L> {
    /// Replays the log arriving on `backup`. A stall longer than `stall_timeout` with the channel
    /// still alive is not an error (the primary may be idle); the channel's own heartbeat timeout
    /// ends a stall on a dead primary.
    pub fn new(backup: Backup<L>, stall_timeout: Duration) -> Self {
        Replayer {
            backup,
            queue: VecDeque::new(),
            stall_timeout,
            outputs_checked: 0,
            sinks: Sinks::default(),
            ended: None,
            last_clock_ns: 0,
            ended_unix_ns: 0,
        }
    }

    /// Outputs whose digest matched the primary's.
    pub fn outputs_checked(&self) -> u64 {
        self.outputs_checked
    }

    /// Log entries received.
    pub fn entries(&self) -> u64 {
        self.sinks.entries
    }

    /// Also appends every frame received to `journal`.
    pub fn with_journal(mut self, journal: Journal) -> Self {
        self.sinks.journal = Some(journal);
        self
    }

    /// Takes the journal back (for the live log after a takeover), or says why it was lost.
    pub fn take_journal(&mut self) -> Result<Option<Journal>, String> {
        match self.sinks.journal_error.take() {
            Some(e) => Err(e),
            None => Ok(self.sinks.journal.take()),
        }
    }

    /// The sequence number of the last entry received.
    pub fn last_seq(&self) -> u64 {
        self.sinks.last_seq
    }

    /// The channel end.
    pub fn backup(&self) -> &Backup<L> {
        &self.backup
    }

    /// The newest guest clock value replayed so far.
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

    /// Entries received but not replayed yet.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Records that the channel failed, then drains it: a failed channel still hands over every
    /// frame it validated (and the medium may hold more), so poll until nothing new comes.
    fn end(&mut self, cause: transport::ChannelError) {
        self.ended = Some(cause.to_string());
        self.ended_unix_ns = crate::failover::unix_ns();
        for _ in 0..1024 {
            let before = self.sinks.entries;
            let (queue, sinks) = (&mut self.queue, &mut self.sinks);
            let _ = self.backup.poll(|frame| enqueue(queue, sinks, frame));
            if self.sinks.entries == before {
                break;
            }
        }
    }

    /// Copies newly arrived entries into the queue; waits (stalls) while there is nothing.
    ///
    /// Polls the channel at least once per call even when entries are queued: the channel is
    /// pumped only from this thread, so this is what keeps the backup's ACKs (and with them the
    /// primary's output commits) flowing while the replica works through a backlog.
    ///
    /// Once the channel has failed, the entries already received are still replayed, in order;
    /// only when none is left does this return [`EngineError::LogEnded`] for `exit`.
    fn fill(&mut self, exit: u64) -> Result<(), EngineError> {
        if self.ended.is_none() {
            let (queue, sinks) = (&mut self.queue, &mut self.sinks);
            if let Err(e) = self.backup.poll(|frame| enqueue(queue, sinks, frame)) {
                self.end(e);
            }
        }
        while self.queue.is_empty() {
            if let Some(cause) = &self.ended {
                return Err(EngineError::LogEnded {
                    exit,
                    cause: cause.clone(),
                });
            }
            let (queue, sinks) = (&mut self.queue, &mut self.sinks);
            if let Err(e) = self
                .backup
                .poll_timeout(self.stall_timeout, |frame| enqueue(queue, sinks, frame))
            {
                self.end(e);
            }
        }
        Ok(())
    }

    /// The next entry, which must belong to `exit`.
    fn front(&mut self, exit: u64) -> Result<&Pending, EngineError> {
        self.fill(exit)?;
        let Some(front) = self.queue.front() else {
            unreachable!("fill returns only with a non-empty queue")
        };
        if front.exit < exit {
            return Err(EngineError::MalformedLog {
                exit,
                what: format!(
                    "entry {} is for exit {}, which the replica has passed",
                    front.seq, front.exit
                ),
            });
        }
        if front.exit > exit {
            return Err(EngineError::Divergence {
                exit,
                device: 0,
                primary: format!("no event until exit {}", front.exit),
                backup: "a hypercall that needs a logged value".into(),
            });
        }
        Ok(front)
    }

    fn take(&mut self, exit: u64, wanted: &str) -> Result<Logged, EngineError> {
        self.front(exit)?;
        let Some(p) = self.queue.pop_front() else {
            unreachable!("front checked the queue")
        };
        match p.what {
            Logged::Other(what) => Err(EngineError::MalformedLog {
                exit,
                what: format!("entry {}: {what} where {wanted} was expected", p.seq),
            }),
            other => Ok(other),
        }
    }

    fn mismatch(exit: u64, primary: &Logged, backup: &str) -> EngineError {
        EngineError::Divergence {
            exit,
            device: 0,
            primary: format!("logged {primary:?}"),
            backup: backup.into(),
        }
    }
}

impl<L: BackupLink> EventSource for Replayer<L> {
    fn should_stop(&mut self, exit: u64) -> Result<bool, EngineError> {
        Ok(self.front(exit)?.what == Logged::Shutdown)
    }

    fn interrupts(&mut self, exit: u64, out: &mut Vec<u8>) -> Result<(), EngineError> {
        while let Logged::Interrupt(v) = self.front(exit)?.what {
            out.push(v);
            self.queue.pop_front();
        }
        Ok(())
    }

    fn net_rx(&mut self, exit: u64, buf: &mut Vec<u8>) -> Result<(), EngineError> {
        match self.take(exit, "network input")? {
            Logged::Input {
                device: NET_DEVICE,
                data,
            } => {
                buf.extend_from_slice(&data);
                Ok(())
            }
            other => Err(Self::mismatch(exit, &other, "network receive")),
        }
    }

    fn clock(&mut self, exit: u64) -> Result<u64, EngineError> {
        match self.take(exit, "clock")? {
            Logged::Clock(ns) => {
                self.last_clock_ns = self.last_clock_ns.max(ns);
                Ok(ns)
            }
            other => Err(Self::mismatch(exit, &other, "clock read")),
        }
    }

    fn random(&mut self, exit: u64) -> Result<[u8; 16], EngineError> {
        match self.take(exit, "random bytes")? {
            Logged::Random(data) => {
                data.as_slice()
                    .try_into()
                    .map_err(|_| EngineError::MalformedLog {
                        exit,
                        what: format!("{} random bytes where 16 were expected", data.len()),
                    })
            }
            other => Err(Self::mismatch(exit, &other, "random read")),
        }
    }

    fn output(&mut self, exit: u64, device: u16, bytes: &[u8]) -> Result<(), EngineError> {
        let ours = logfmt::digest(bytes);
        match self.take(exit, "output marker")? {
            Logged::Output {
                device: d,
                len,
                digest,
            } if d == device => {
                if digest != ours || len as usize != bytes.len() {
                    return Err(EngineError::Divergence {
                        exit,
                        device,
                        primary: format!("output digest {digest:#018x} ({len} bytes)"),
                        backup: format!("output digest {ours:#018x} ({} bytes)", bytes.len()),
                    });
                }
                self.outputs_checked += 1;
                Ok(())
            }
            other => Err(Self::mismatch(exit, &other, "an output")),
        }
    }
}
