//! The network backend: a small arbiter server with a durable decision log, and its client.
//!
//! ```text
//! ServerArbiter (on each FT host)                      ArbiterServer (on a third host)
//!   TCP connect ── ftvm handshake (medium Arbiter, mutual HMAC-SHA256 over the PSK) ──►
//!   request  {len u32, body, tag} ──►   under one lock: decide, append a record + fdatasync
//!                                 ◄──   response {len u32, body, tag}, only once the record is durable
//! ```
//!
//! One concern per module:
//!
//! - `protocol`: the request and response messages and their codec (bytes only, no I/O);
//! - `session`: authentication, the handshake, then a tag on every message, so nobody without
//!   the key can forge, alter, replay or reorder one;
//! - `decision_log`: the durable state, an append-only, checksummed, fsynced log replayed on
//!   start (a torn tail is cut off, earlier damage refused; after a failed append or sync the
//!   server decides nothing more until restarted);
//! - `serve`: the server loop ([`ArbiterServer`]);
//! - `client`: [`ServerArbiter`], which reconnects and asks once more if a kept connection
//!   died (safe: test-and-set is idempotent for the recorded winner).
//!
//! Each module's docs give its exact format (wire messages, tags, log records);
//! `cargo doc -p ft-arbiter --document-private-items` shows them.

mod client;
mod decision_log;
pub mod fuzz;
mod protocol;
mod serve;
mod session;

pub use client::ServerArbiter;
pub use decision_log::LOG_FILE;
pub use protocol::MAX_MESSAGE;
pub use serve::{ArbiterServer, ServerStats, StopHandle, MAX_CONNECTIONS};
pub use session::ARBITER_SESSION_ID;
