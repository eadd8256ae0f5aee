//! The log channel's numbers, read from the channel's own counters when scraped: the channel
//! does no work for metrics beyond what it already counts.
//!
//! A channel attaches a [`LogProbe`] when it comes up and drops the returned [`LogHandle`]
//! when it ends; the counters of channels that ended are kept, so the process's totals only
//! grow across failovers and joins.

use std::sync::{Arc, Mutex};

/// One reading of a channel end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogReading {
    /// Log entries sent (primary) or received and validated (backup).
    pub entries: u64,
    /// Bytes of the frames that carried them.
    pub bytes: u64,
    /// Frames that carried them.
    pub frames: u64,
    /// Heartbeats sent.
    pub heartbeats: u64,
    /// Primary: entries sealed and not yet acknowledged. Backup: 0.
    pub ack_lag_entries: u64,
    /// Entries received by the backup and not yet replayed (as the primary last heard, or as
    /// the backup knows).
    pub replay_lag_entries: u64,
    /// Primary: the time the backup needs to replay its backlog, ns (lag control's estimate at
    /// the last frame). Backup: 0.
    pub replay_lag_ns: u64,
}

impl LogReading {
    fn add_counters(&mut self, o: &LogReading) {
        self.entries += o.entries;
        self.bytes += o.bytes;
        self.frames += o.frames;
        self.heartbeats += o.heartbeats;
    }
}

/// Something that can read a live channel end's counters from any thread.
pub trait LogProbe: Send + Sync + std::fmt::Debug {
    /// The counters now.
    fn read(&self) -> LogReading;
}

#[derive(Debug, Default)]
struct Slot {
    current: Option<(u64, Arc<dyn LogProbe>)>,
    ended: LogReading,
    next_id: u64,
}

/// The process's log channel, if one is up, and the totals of those that ended.
#[derive(Debug)]
pub struct LogSlot(Mutex<Option<Slot>>);

impl Default for LogSlot {
    fn default() -> Self {
        Self::new()
    }
}

impl LogSlot {
    /// No channel yet.
    pub const fn new() -> Self {
        LogSlot(Mutex::new(None))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.get_or_insert_with(Slot::default))
    }

    /// Makes `probe` the process's channel (a channel still attached is taken as ended).
    pub fn attach(&'static self, probe: Arc<dyn LogProbe>) -> LogHandle {
        self.with(|s| {
            if let Some((_, old)) = s.current.take() {
                let r = old.read();
                s.ended.add_counters(&r);
            }
            s.next_id += 1;
            s.current = Some((s.next_id, probe));
            LogHandle {
                slot: self,
                id: s.next_id,
            }
        })
    }

    fn detach(&self, id: u64) {
        self.with(|s| {
            if s.current.as_ref().is_some_and(|(i, _)| *i == id) {
                if let Some((_, p)) = s.current.take() {
                    let r = p.read();
                    s.ended.add_counters(&r);
                }
            }
        });
    }

    /// The process's totals (ended channels plus the live one) and the live one's lags.
    pub fn read(&self) -> LogReading {
        // Read the probe outside the lock: a probe's read must not wait for a detach.
        let (ended, current) = self.with(|s| (s.ended, s.current.as_ref().map(|(_, p)| p.clone())));
        let mut total = ended;
        if let Some(p) = current {
            let r = p.read();
            total.add_counters(&r);
            total.ack_lag_entries = r.ack_lag_entries;
            total.replay_lag_entries = r.replay_lag_entries;
            total.replay_lag_ns = r.replay_lag_ns;
        }
        total
    }

    /// Whether a channel is attached now.
    pub fn attached(&self) -> bool {
        self.with(|s| s.current.is_some())
    }
}

/// Keeps a channel attached; dropping it keeps the channel's counters in the totals.
#[derive(Debug)]
pub struct LogHandle {
    slot: &'static LogSlot,
    id: u64,
}

impl Drop for LogHandle {
    fn drop(&mut self) {
        self.slot.detach(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A test double standing in for a channel's counters.
    #[derive(Debug, Default)]
    struct FakeProbe(AtomicU64);

    impl LogProbe for FakeProbe {
        fn read(&self) -> LogReading {
            let n = self.0.load(Ordering::Relaxed);
            LogReading {
                entries: n,
                bytes: n * 10,
                ack_lag_entries: 3,
                ..Default::default()
            }
        }
    }

    #[test]
    fn totals_keep_ended_channels_and_lags_are_the_live_ones() {
        static SLOT: LogSlot = LogSlot::new();
        let a = Arc::new(FakeProbe::default());
        let h = SLOT.attach(a.clone());
        a.0.store(5, Ordering::Relaxed);
        assert_eq!(SLOT.read().entries, 5);
        assert_eq!(SLOT.read().ack_lag_entries, 3);
        drop(h);
        assert!(!SLOT.attached());
        let r = SLOT.read();
        assert_eq!((r.entries, r.bytes, r.ack_lag_entries), (5, 50, 0));
        let b = Arc::new(FakeProbe::default());
        let _h2 = SLOT.attach(b.clone());
        b.0.store(2, Ordering::Relaxed);
        assert_eq!(SLOT.read().entries, 7);
    }
}
