//! The output rule, in one place: a guest output leaves the primary only after the backup has
//! acknowledged every log entry up to the output's marker.
//!
//! The guest does not wait: its output is parked here with the sequence number of its marker,
//! and released (sent to the client) as soon as the cumulative ACK covers it. The time an output
//! spends parked is the output-commit latency the guest's clients see.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use hdrhistogram::Histogram;

use crate::engine::EngineError;
use crate::service::ServicePort;

#[derive(Debug)]
struct Held {
    seq: u64,
    bytes: Vec<u8>,
    held_at: Instant,
}

/// Holds guest outputs until the log that produced them is safe on the backup.
#[derive(Debug)]
pub struct OutputGate {
    held: VecDeque<Held>,
    port: ServicePort,
    /// Where each request came from, by request id (the first 4 bytes of request and response).
    clients: HashMap<u32, SocketAddr>,
    latency: Histogram<u64>,
    released: u64,
    undeliverable: u64,
}

impl OutputGate {
    /// A gate that releases outputs to clients through `port` (the service address).
    pub fn new(port: ServicePort) -> Result<Self, EngineError> {
        let latency =
            Histogram::new_with_bounds(1, 60_000_000_000, 3).map_err(|e| EngineError::Io {
                context: "creating the commit-latency histogram",
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(OutputGate {
            held: VecDeque::new(),
            port,
            clients: HashMap::new(),
            latency,
            released: 0,
            undeliverable: 0,
        })
    }

    /// Remembers who sent request `request_id`, so its response can be addressed.
    pub fn note_client(&mut self, request_id: u32, from: SocketAddr) {
        self.clients.insert(request_id, from);
    }

    /// Parks an output whose marker has log sequence number `seq`; the guest produced it at
    /// `produced` (before its marker was appended and sent), which is where its commit latency
    /// is counted from.
    pub fn hold(&mut self, seq: u64, bytes: &[u8], produced: Instant) {
        self.held.push_back(Held {
            seq,
            bytes: bytes.to_vec(),
            held_at: produced,
        });
    }

    /// Releases every parked output whose marker is covered by `acked`, in order, stamped with
    /// the replica's fencing `epoch` (checked by the service front, if there is one).
    pub fn release(&mut self, acked: u64, epoch: u64) -> Result<usize, EngineError> {
        let mut n = 0;
        while self.held.front().is_some_and(|h| h.seq <= acked) {
            let Some(h) = self.held.pop_front() else {
                break;
            };
            let took = h.held_at.elapsed();
            let ns = took.as_nanos() as u64;
            self.latency.saturating_record(ns);
            ftvm_metrics::METRICS.commit.observe_ns(ns);
            let id = h
                .bytes
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            match id.and_then(|id| self.clients.remove(&id)) {
                // UDP: a lost datagram is the client's to retry, as a lost TCP segment would be.
                Some(addr) => self.port.send(addr, &h.bytes, epoch)?,
                None => self.undeliverable += 1,
            }
            self.released += 1;
            n += 1;
        }
        Ok(n)
    }

    /// Drops every parked output (a deposed replica must release nothing); returns how many.
    pub fn discard(&mut self) -> usize {
        let n = self.held.len();
        self.held.clear();
        n
    }

    /// Outputs parked right now.
    pub fn pending(&self) -> usize {
        self.held.len()
    }

    /// Outputs released so far.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// Released outputs that had no known client address.
    pub fn undeliverable(&self) -> u64 {
        self.undeliverable
    }

    /// Time outputs spent parked (ns).
    pub fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }
}
