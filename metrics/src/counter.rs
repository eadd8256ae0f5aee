//! Counters and gauges: plain atomics, read by the metrics endpoint while the process runs.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// A monotonically increasing count.
///
/// [`Counter::inc`] and [`Counter::add`] are safe from any number of threads. On paths where
/// one thread at a time writes (a replica's vCPU thread), [`Counter::add_single`] does a plain
/// load and store instead of a locked read-modify-write: a concurrent second writer could lose
/// counts, never corrupt memory.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A counter at zero.
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n` from the one thread that writes this counter (see the type's documentation).
    pub fn add_single(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (a lag, a position).
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// A gauge at zero.
    pub const fn new() -> Self {
        Gauge(AtomicI64::new(0))
    }

    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}
