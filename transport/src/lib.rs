//! ftvm's log channel.
//!
//! The primary's vCPU thread writes log records into a [`ring`]; a sender drains the ring onto a
//! medium; the backup receives them in order and acknowledges them. This crate holds the parts
//! every medium shares:
//!
//! - [`ring`]: a single-producer single-consumer ring of variable-size records whose layout is a
//!   documented byte format, so it works the same in heap memory, in a mapping shared by two
//!   processes, and in memory a remote NIC writes into;
//! - [`region`]: the memory regions a ring can live in;
//! - [`poll`]: the one spin → yield → park policy every busy loop uses;
//! - [`channel`]: the medium-independent protocol (batching, cumulative ACKs, heartbeats,
//!   backpressure) over two small traits, [`PrimaryLink`] and [`BackupLink`];
//! - [`control`]: the control stream each medium sets itself up over (timeouts, messages, the
//!   peer check);
//! - [`handshake`]: version, session, epoch and pre-shared-key authentication;
//! - the media: [`tcp`] (kernel TCP, busy-polled or blocking), [`shm`] (a ring shared by two
//!   processes: the kernel-bypass reference), and behind features `dpdk` (raw Ethernet frames)
//!   and `rdma` (one-sided RDMA writes into the backup's ring over a reliable-connected queue pair);
//!   their decoders of outside data (packet format and reassembly, set-up messages and seal
//!   scanning) are plain code and build without the features, for the [`fuzz`] checks.
//!
//! Where an ordinary bounded queue of owned items is needed (free buffers, for example), use
//! `crossbeam-queue`; the ring is for records that must live in a particular memory region.

pub mod auth;
pub mod channel;
pub mod control;
// Without the feature: the packet format and the reassembly only (plain code, fuzzed).
pub mod dpdk;
pub mod error;
pub mod fuzz;
pub mod handshake;
pub mod kick;
pub mod medium;
pub mod poll;
// Without the feature: the set-up messages and the seal scanning only (plain code, fuzzed).
pub mod rdma;
pub mod region;
pub mod ring;
pub mod session;
pub mod shm;
pub mod tcp;
pub mod trace;

pub use channel::{
    Ack, Backup, BackupLink, BackupNews, ChannelConfig, ChannelStats, LogWriter, LoggedEntry,
    Primary, PrimaryLink, Receiver, Sender, StatsSnapshot, ThreadedWriter,
};
pub use error::ChannelError;
pub use handshake::{GuestIdentity, MediumKind, PreSharedKey, PROTOCOL_VERSION};
pub use medium::{AnyBackup, AnyPrimary, Listener, Medium};
pub use poll::{PollPolicy, Poller};
pub use region::{HeapRegion, RegionError, RingMemory, SharedRegion};
pub use ring::{Consumer, Producer, RingError};
