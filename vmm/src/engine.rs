//! The vCPU run loop: numbers every guest-visible VM exit and dispatches the guest's
//! hypercalls to the paravirtual devices, taking every non-deterministic value from an
//! [`EventSource`].
//!
//! The loop is the same on the primary and the backup; only the source differs
//! ([`crate::record::Recorder`] reads the live world and logs it, [`crate::replay::Replayer`]
//! reads the log). That is the whole determinism argument: the guest sees the same values at the
//! same exits, so it executes identically.
//!
//! Position of an event = the number of the hypercall exit at which the guest observes it
//! (counting from 1). Our hosts have no PMU, so nothing can be injected between exits.

pub use crate::layout::NET_RX_VECTOR;
use crate::layout::{
    HYPERCALL_PORT, MAILBOX_ADDR, MB_CLOCK_NS, MB_PENDING_IRQS, MB_RANDOM, MB_RX_LEN, MB_TX_LEN,
    NET_BUF_LEN, OP_CLOCK, OP_HALT, OP_NET_RX, OP_NET_TX, OP_RANDOM, RX_BUF_ADDR, TX_BUF_ADDR,
};
use crate::vm::{Vm, VmError, VmExit};
use ftvm_metrics::{ExitKind, METRICS};

/// The device id of the paravirtual network device in log entries.
pub const NET_DEVICE: u16 = 1;
/// The timer's interrupt vector.
pub use crate::layout::TIMER_VECTOR;

/// Where the values the guest observes come from, and where its outputs go.
pub trait EventSource {
    /// Called first at every exit: `true` stops the VM here, before the hypercall is handled.
    fn should_stop(&mut self, exit: u64) -> Result<bool, EngineError>;
    /// Interrupt vectors to deliver at this exit (appended to `out`).
    fn interrupts(&mut self, exit: u64, out: &mut Vec<u8>) -> Result<(), EngineError>;
    /// The next network input (a client request), written into `buf`; empty if none.
    fn net_rx(&mut self, exit: u64, buf: &mut Vec<u8>) -> Result<(), EngineError>;
    /// The clock, in nanoseconds.
    fn clock(&mut self, exit: u64) -> Result<u64, EngineError>;
    /// Sixteen random bytes.
    fn random(&mut self, exit: u64) -> Result<[u8; 16], EngineError>;
    /// The guest waits for an interrupt (`hlt` with interrupts enabled) at exit `exit`: block
    /// until something is due, then return the one vector to deliver — [`TIMER_VECTOR`], or
    /// [`NET_RX_VECTOR`] with the request in `rx` (the engine writes it into the receive buffer
    /// as a NET_RX does). `None`: the source wants to stop here; the engine then asks
    /// [`Self::should_stop`], which a wait exit does not call first. The default refuses: a
    /// source that cannot wake a guest.
    fn wake(&mut self, exit: u64, _rx: &mut Vec<u8>) -> Result<Option<u8>, EngineError> {
        Err(EngineError::AbiViolation {
            exit,
            what: "the guest waits for an interrupt, which this event source cannot deliver".into(),
        })
    }
    /// An output the guest produced on `device`.
    fn output(&mut self, exit: u64, device: u16, bytes: &[u8]) -> Result<(), EngineError>;
    /// Called after exit `exit` was handled completely: `true` returns from the run loop here
    /// (a pause at an exit boundary, e.g. for a join's switch-over), before the guest runs
    /// again; [`run`] with `first_exit = exit + 1` goes on.
    fn pause_after(&mut self, _exit: u64) -> bool {
        false
    }
    /// The run loop starts on this thread (the vCPU's): e.g. let the primary kick it.
    fn on_vcpu_thread(&mut self) {}
    /// A signal ended `KVM_RUN` before the guest's next exit (not an exit; the guest runs on
    /// right after): e.g. the primary kicked this backup to acknowledge what it sent.
    fn interrupted(&mut self) {}
}

/// Why the run loop stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// KVM or guest-memory access failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest triple-faulted (or otherwise asked KVM to shut it down).
    #[error("guest shut down (triple fault?) at exit {exit}")]
    GuestCrashed {
        /// Exit number at which it happened.
        exit: u64,
    },
    /// The guest did something outside its ABI.
    #[error("guest left its ABI at exit {exit}: {what}")]
    AbiViolation {
        /// Exit number.
        exit: u64,
        /// What it did.
        what: String,
    },
    /// The backup's replica did something the primary's did not.
    #[error("divergence at exit {exit} on device {device}: primary {primary}, backup {backup}")]
    Divergence {
        /// Exit number.
        exit: u64,
        /// Device involved.
        device: u16,
        /// What the primary's log says (e.g. its output digest).
        primary: String,
        /// What the backup's replica did.
        backup: String,
    },
    /// The log channel failed.
    #[error("log channel: {0}")]
    Channel(#[from] transport::ChannelError),
    /// The log holds something the backup cannot replay.
    #[error("malformed log at exit {exit}: {what}")]
    MalformedLog {
        /// Exit number.
        exit: u64,
        /// What was wrong.
        what: String,
    },
    /// The backup's log ended (the channel to the primary failed) at this exit: every entry it
    /// received has been replayed. Without an arbiter to ask, this ends the backup.
    #[error("log ended at exit {exit}: {cause}")]
    LogEnded {
        /// The first exit the log has nothing for.
        exit: u64,
        /// Why the channel ended.
        cause: String,
    },
    /// A backup was told to stop (SIGTERM) before its primary's stop point: it leaves at this
    /// exit, and its primary goes on without it.
    #[error("stopped at exit {exit} before the primary's stop point: the pair loses this backup")]
    Stopped {
        /// The first exit not replayed.
        exit: u64,
    },
    /// This replica was deposed: another one holds a newer fencing epoch. It must halt and
    /// release nothing.
    #[error("deposed in epoch {epoch}: {by}")]
    Deposed {
        /// The epoch this replica ran in.
        epoch: u64,
        /// Who or what holds the newer epoch.
        by: String,
    },
    /// A backup could not join (or be joined).
    #[error("join: {0}")]
    Join(String),
    /// Asked to stop while waiting for the arbiter (no decision, nothing went live).
    #[error("stopped while waiting for the arbiter: {0}")]
    NoDecision(String),
    /// An I/O error outside the channel (client socket).
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    /// Hypercall exits executed.
    pub exits: u64,
    /// Whether the guest asked to halt (otherwise the source stopped it).
    pub guest_halted: bool,
    /// The source paused the run after exit `exits` ([`EventSource::pause_after`]).
    pub paused: bool,
}

/// Runs `vm` until the source says stop, the guest halts, or something fails. `first_exit` is
/// the number the next exit gets (1 for a fresh VM).
pub fn run(
    vm: &mut Vm,
    source: &mut impl EventSource,
    first_exit: u64,
) -> Result<RunSummary, EngineError> {
    let mut exit = first_exit.max(1) - 1;
    let mut irqs = Vec::new();
    let mut buf = Vec::with_capacity(NET_BUF_LEN);
    source.on_vcpu_thread();
    loop {
        match vm.run_with(&mut || source.interrupted())? {
            VmExit::Hypercall { op } => {
                exit += 1;
                if source.should_stop(exit)? {
                    return Ok(RunSummary {
                        exits: exit - 1,
                        guest_halted: false,
                        paused: false,
                    });
                }
                irqs.clear();
                source.interrupts(exit, &mut irqs)?;
                deliver(vm, exit, &irqs)?;
                match op {
                    OP_NET_RX => {
                        METRICS.exit(ExitKind::NetRx);
                        buf.clear();
                        source.net_rx(exit, &mut buf)?;
                        if !buf.is_empty() {
                            METRICS.requests.add_single(1);
                        }
                        if buf.len() > NET_BUF_LEN {
                            return Err(EngineError::MalformedLog {
                                exit,
                                what: format!("network input of {} bytes", buf.len()),
                            });
                        }
                        vm.write_bytes(RX_BUF_ADDR, &buf)?;
                        vm.write_u32(MAILBOX_ADDR + MB_RX_LEN, buf.len() as u32)?;
                    }
                    OP_NET_TX => {
                        METRICS.exit(ExitKind::NetTx);
                        let len = vm.read_u32(MAILBOX_ADDR + MB_TX_LEN)? as usize;
                        if len > NET_BUF_LEN {
                            return Err(EngineError::AbiViolation {
                                exit,
                                what: format!("transmit length {len} > {NET_BUF_LEN}"),
                            });
                        }
                        buf.resize(len, 0);
                        vm.read_bytes(TX_BUF_ADDR, &mut buf)?;
                        source.output(exit, NET_DEVICE, &buf)?;
                    }
                    OP_CLOCK => {
                        METRICS.exit(ExitKind::Clock);
                        let ns = source.clock(exit)?;
                        vm.write_u64(MAILBOX_ADDR + MB_CLOCK_NS, ns)?;
                    }
                    OP_RANDOM => {
                        METRICS.exit(ExitKind::Random);
                        let bytes = source.random(exit)?;
                        vm.write_bytes(MAILBOX_ADDR + MB_RANDOM, &bytes)?;
                    }
                    OP_HALT => {
                        METRICS.exit(ExitKind::Halt);
                        if let Some(msg) = vm.panic_message()? {
                            tracing::error!("the guest panicked (HALT at exit {exit}): {msg}");
                        }
                        return Ok(RunSummary {
                            exits: exit,
                            guest_halted: true,
                            paused: false,
                        });
                    }
                    other => {
                        return Err(EngineError::AbiViolation {
                            exit,
                            what: format!("unknown hypercall {other} on port {HYPERCALL_PORT:#x}"),
                        })
                    }
                }
                if source.pause_after(exit) {
                    return Ok(RunSummary {
                        exits: exit,
                        guest_halted: false,
                        paused: true,
                    });
                }
            }
            VmExit::Halt if vm.interrupt_ready() => {
                // A wait: the guest sleeps until an interrupt, and only the source can send one.
                // `wake` answers a stop too (`None`), so a backup's wait for the entry that
                // ends its guest's sleep happens in one place (where it may let the core rest).
                exit += 1;
                METRICS.exit(ExitKind::Wait);
                buf.clear();
                let Some(vector) = source.wake(exit, &mut buf)? else {
                    if source.should_stop(exit)? {
                        return Ok(RunSummary {
                            exits: exit - 1,
                            guest_halted: false,
                            paused: false,
                        });
                    }
                    return Err(EngineError::MalformedLog {
                        exit,
                        what: "the source neither woke the waiting guest nor stopped it".into(),
                    });
                };
                match vector {
                    NET_RX_VECTOR => {
                        METRICS.requests.add_single(1);
                        if buf.is_empty() || buf.len() > NET_BUF_LEN {
                            return Err(EngineError::MalformedLog {
                                exit,
                                what: format!("network wake-up with {} bytes", buf.len()),
                            });
                        }
                        vm.write_bytes(RX_BUF_ADDR, &buf)?;
                        vm.write_u32(MAILBOX_ADDR + MB_RX_LEN, buf.len() as u32)?;
                    }
                    TIMER_VECTOR => vm.write_u32(MAILBOX_ADDR + MB_RX_LEN, 0)?,
                    other => {
                        return Err(EngineError::MalformedLog {
                            exit,
                            what: format!("wake-up with interrupt vector {other}"),
                        })
                    }
                }
                vm.inject_interrupt(vector)?;
                if source.pause_after(exit) {
                    return Ok(RunSummary {
                        exits: exit,
                        guest_halted: false,
                        paused: true,
                    });
                }
            }
            // `hlt` with interrupts disabled: nothing can ever wake the guest.
            VmExit::Halt => {
                return Ok(RunSummary {
                    exits: exit,
                    guest_halted: true,
                    paused: false,
                })
            }
            VmExit::Shutdown => return Err(EngineError::GuestCrashed { exit: exit + 1 }),
            VmExit::Other(what) => {
                return Err(EngineError::AbiViolation {
                    exit: exit + 1,
                    what,
                })
            }
        }
    }
}

/// Delivers the vectors logged at hypercall exit `exit`: injected through KVM when the guest can
/// take an interrupt there (then at most one per exit: the primary never logs more), otherwise
/// set in the mailbox's `pending_irqs` for a guest that polls it.
fn deliver(vm: &mut Vm, exit: u64, irqs: &[u8]) -> Result<(), EngineError> {
    if irqs.is_empty() {
        return Ok(());
    }
    for &v in irqs {
        if !(32..96).contains(&v) {
            return Err(EngineError::MalformedLog {
                exit,
                what: format!("interrupt vector {v} outside 32..96"),
            });
        }
    }
    if vm.interrupt_ready() {
        let [vector] = irqs else {
            return Err(EngineError::MalformedLog {
                exit,
                what: format!(
                    "{} interrupts for one exit of a guest that takes them one at a time",
                    irqs.len()
                ),
            });
        };
        vm.inject_interrupt(*vector)?;
        return Ok(());
    }
    let mut pending = vm.read_u64(MAILBOX_ADDR + MB_PENDING_IRQS)?;
    for &v in irqs {
        pending |= 1 << (v - 32);
    }
    vm.write_u64(MAILBOX_ADDR + MB_PENDING_IRQS, pending)?;
    Ok(())
}
