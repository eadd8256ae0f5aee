//! The ftvm VMM: a KVM guest whose every non-deterministic input is recorded on the primary and
//! replayed on the backup, with the output gate enforcing the output rule.
//!
//! - [`vm`]: the KVM VM (one vCPU, long mode, memory via vm-memory) and the built-in guests;
//! - [`image`]: guest images — checked against the ABI and loaded into guest memory without
//!   KVM, and the determinism checker ([`image::check`]);
//! - [`layout`]: the guest ABI — memory map, hypercall port and ops (see `GUEST-ABI.md`); the
//!   same file is the guest SDK's `ftvm_guest::abi` (`guests/sdk/src/abi.rs`, its one source);
//! - [`kv`], [`ledger`]: the wire formats of the built-in guests (`guests/kvstore`,
//!   `guests/ledger`) and the models their clients check responses against;
//! - [`engine`]: the run loop that numbers exits and drives the paravirtual devices from an
//!   [`engine::EventSource`];
//! - [`record`]: the primary's source (live inputs, logged), [`replay`]: the backup's (the log);
//! - [`output_gate`]: the only code that releases guest outputs, once the backup has the log;
//! - [`service`]: the service address (direct, or behind the fencing [`service::Front`]);
//! - [`failover`]: what each side does when the channel falls silent — ask the arbiter, then go
//!   live (the backup after draining its log) or halt; [`journal`]: the log a replica keeps of
//!   what it replayed and recorded, replayable on a fresh VM;
//! - [`join`]: a backup joins a running primary (over [`migrate`]);
//! - [`migrate`]: live state transfer (pre-copy over KVM's dirty log) for a joining backup.

pub mod engine;
pub mod failover;
pub mod image;
pub mod join;
pub mod journal;
pub mod kv;
#[path = "../../guests/sdk/src/abi.rs"]
pub mod layout;
pub mod ledger;
pub mod migrate;
pub mod output_gate;
pub mod record;
pub mod replay;
pub mod service;
pub mod vm;
