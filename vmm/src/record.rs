//! The primary's event source: reads the live world (client requests on a UDP socket, the host
//! clock, the host's random numbers, a wall-clock timer), logs every value at the exit where the
//! guest observes it, and parks outputs in the [`OutputGate`] until the backup has the log.
//!
//! The same recorder with a [`NoLog`] sink is the unreplicated baseline: identical work, no
//! logging, outputs released at once.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use logfmt::{ControlOp, Entry, Event, Position};
use transport::PrimaryLink;

use crate::engine::{EngineError, EventSource, NET_DEVICE, TIMER_VECTOR};
use crate::output_gate::OutputGate;

/// Where the recorder's log entries go.
pub trait LogSink {
    /// Appends an entry; returns its sequence number.
    fn append(&mut self, entry: &Entry<'_>) -> Result<u64, EngineError>;
    /// Does the medium's work without blocking (send, read ACKs).
    fn pump(&mut self) -> Result<(), EngineError>;
    /// The cumulative ACK.
    fn acked(&self) -> u64;
    /// Waits until entry `seq` is acknowledged.
    fn wait_acked(&mut self, seq: u64) -> Result<(), EngineError>;
    /// Bytes of log sent so far.
    fn log_bytes(&self) -> u64;
}

impl<L: PrimaryLink> LogSink for transport::Primary<L> {
    fn append(&mut self, entry: &Entry<'_>) -> Result<u64, EngineError> {
        Ok(transport::Primary::append(self, entry)?)
    }
    fn pump(&mut self) -> Result<(), EngineError> {
        transport::Primary::pump(self)?;
        Ok(())
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
}

/// No replication: every entry counts as acknowledged at once. The unreplicated baseline.
#[derive(Debug, Default)]
pub struct NoLog {
    seq: u64,
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
}

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            tick: Duration::from_millis(10),
            idle_wait: Duration::from_micros(500),
            commit_spin: Duration::from_micros(30),
        }
    }
}

/// The primary's [`EventSource`].
#[derive(Debug)]
pub struct Recorder<S: LogSink> {
    log: S,
    gate: OutputGate,
    socket: UdpSocket,
    config: RecordConfig,
    started: Instant,
    next_tick: Instant,
    stop: Arc<AtomicBool>,
    requests: u64,
    first_output_exit: Option<u64>,
    rx: Vec<u8>,
}

impl<S: LogSink> Recorder<S> {
    /// A recorder serving clients on `socket` (made non-blocking here), logging into `log`;
    /// setting `stop` ends the run at the next exit (logged, so the backup stops there too).
    pub fn new(
        log: S,
        socket: UdpSocket,
        config: RecordConfig,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, EngineError> {
        socket
            .set_nonblocking(true)
            .map_err(|source| EngineError::Io {
                context: "service socket",
                source,
            })?;
        let gate_socket = socket.try_clone().map_err(|source| EngineError::Io {
            context: "service socket",
            source,
        })?;
        let now = Instant::now();
        Ok(Recorder {
            log,
            gate: OutputGate::new(gate_socket)?,
            socket,
            next_tick: now + config.tick,
            config,
            started: now,
            stop,
            requests: 0,
            first_output_exit: None,
            rx: vec![0; 65536],
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

    /// Client requests handed to the guest.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// The exit at which the guest produced its first output.
    pub fn first_output_exit(&self) -> Option<u64> {
        self.first_output_exit
    }

    fn service(&mut self) -> Result<(), EngineError> {
        self.log.pump()?;
        self.gate.release(self.log.acked())?;
        Ok(())
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
        self.gate.release(self.log.acked())?;
        Ok(true)
    }

    fn interrupts(&mut self, exit: u64, out: &mut Vec<u8>) -> Result<(), EngineError> {
        let now = Instant::now();
        if now >= self.next_tick {
            out.push(TIMER_VECTOR);
            self.log.append(&Entry::new(
                Position::at_exit(exit),
                Event::Interrupt {
                    vector: TIMER_VECTOR,
                },
            ))?;
            // Ticks missed while busy are not replayed one by one: one tick, next one a period on.
            self.next_tick = now + self.config.tick;
        }
        Ok(())
    }

    fn net_rx(&mut self, exit: u64, buf: &mut Vec<u8>) -> Result<(), EngineError> {
        let deadline = Instant::now() + self.config.idle_wait;
        loop {
            match self.socket.recv_from(&mut self.rx) {
                Ok((n, from)) => {
                    let request = &self.rx[..n.min(crate::layout::NET_BUF_LEN)];
                    if let Some(id) = request.get(..4) {
                        self.gate
                            .note_client(u32::from_le_bytes([id[0], id[1], id[2], id[3]]), from);
                    }
                    buf.extend_from_slice(request);
                    self.requests += 1;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline || self.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Idle: keep the channel moving and outputs flowing while we wait.
                    self.service()?;
                    std::thread::yield_now();
                }
                Err(e) => {
                    return Err(EngineError::Io {
                        context: "receiving a request",
                        source: e,
                    })
                }
            }
        }
        self.log.append(&Entry::new(
            Position::at_exit(exit),
            Event::DeviceInput {
                device: NET_DEVICE,
                data: buf,
            },
        ))?;
        Ok(())
    }

    fn clock(&mut self, exit: u64) -> Result<u64, EngineError> {
        let ns = self.started.elapsed().as_nanos() as u64;
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

    fn output(&mut self, exit: u64, device: u16, bytes: &[u8]) -> Result<(), EngineError> {
        self.first_output_exit.get_or_insert(exit);
        let seq = self.log.append(&Entry::new(
            Position::at_exit(exit),
            Event::OutputMarker {
                device,
                len: bytes.len() as u32,
                digest: logfmt::digest(bytes),
            },
        ))?;
        self.gate.hold(seq, bytes);
        self.gate.release(self.log.acked())?;
        if self.gate.pending() > 0 && !self.config.commit_spin.is_zero() {
            let until = Instant::now() + self.config.commit_spin;
            while self.gate.pending() > 0 && Instant::now() < until {
                self.service()?;
            }
        }
        Ok(())
    }
}
