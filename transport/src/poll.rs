//! The one polling policy shared by every busy loop in ftvm.
//!
//! Busy-polling gives the lowest latency, but our reference machines have two cores: two spinning
//! threads plus a vCPU thread would starve each other (two busy-pollers sharing a core measured
//! 8 ms per round trip). So every wait in ftvm escalates the same way — spin, then
//! `sched_yield`, then sleep with exponential back-off — and the thresholds are the user's to set.

use std::time::{Duration, Instant};

/// How a waiting thread escalates from spinning to yielding to sleeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollPolicy {
    /// Iterations of `spin_loop` hints before the first yield.
    pub spins: u32,
    /// `sched_yield` calls after spinning, before the first sleep.
    pub yields: u32,
    /// First sleep once spinning and yielding gave nothing; doubles on every further sleep.
    pub min_park: Duration,
    /// Upper bound for one sleep.
    pub max_park: Duration,
}

impl PollPolicy {
    /// Lowest latency: spin a long time and never sleep for long. For pinned threads that own a core.
    pub const BUSY: PollPolicy = PollPolicy {
        spins: 1 << 16,
        yields: u32::MAX,
        min_park: Duration::from_micros(50),
        max_park: Duration::from_micros(50),
    };

    /// A short spin, then yields, then sleeps up to 1 ms: for threads that share a core.
    pub const BALANCED: PollPolicy = PollPolicy {
        spins: 256,
        yields: 10_000,
        min_park: Duration::from_micros(20),
        max_park: Duration::from_millis(1),
    };

    /// Sleep almost at once: for background threads whose latency does not matter.
    pub const LOW_CPU: PollPolicy = PollPolicy {
        spins: 16,
        yields: 16,
        min_park: Duration::from_micros(100),
        max_park: Duration::from_millis(10),
    };

    /// A short spin, then yields and never a sleep: for a bounded wait that must notice its
    /// deadline soon (as [`Self::BUSY`] only does after its long spin).
    pub const SPIN_THEN_YIELD: PollPolicy = PollPolicy {
        spins: 1024,
        yields: u32::MAX,
        min_park: Duration::from_micros(50),
        max_park: Duration::from_micros(50),
    };

    /// For a replica whose guest is idle: a short spin and a few yields, then sleeps of 20 µs
    /// growing to 100 µs — an idle pair does not burn its cores, and the first entry after the
    /// idle spell is seen within a sleep.
    pub const IDLE: PollPolicy = PollPolicy {
        spins: 256,
        yields: 64,
        min_park: Duration::from_micros(20),
        max_park: Duration::from_micros(100),
    };

    /// A fresh poller that starts at the spinning stage.
    pub fn poller(&self) -> Poller {
        Poller {
            policy: *self,
            step: 0,
            park: self.min_park,
        }
    }

    /// Polls `ready` until it returns `Some`, or gives up at `deadline` (returning `None`).
    pub fn wait_until<T>(
        &self,
        deadline: Option<Instant>,
        mut ready: impl FnMut() -> Option<T>,
    ) -> Option<T> {
        let mut poller = self.poller();
        loop {
            if let Some(value) = ready() {
                return Some(value);
            }
            if let Some(deadline) = deadline {
                if poller.is_past_spinning() && Instant::now() >= deadline {
                    return None;
                }
            }
            poller.wait();
        }
    }
}

/// Longest sleep of [`PollPolicy::nap`].
pub const MAX_NAP: Duration = Duration::from_micros(50);

impl PollPolicy {
    /// The blocking wait of a medium that has nothing to sleep on (a polled DPDK port, shared
    /// memory, RDMA completion queues that are polled rather than waited on): sleeps `timeout`,
    /// but at most [`MAX_NAP`], so blocking mode stays cheap on the CPU and still answers within
    /// tens of microseconds. Returns `false`, "nothing is known to have arrived", which is what
    /// such a medium's `PrimaryLink::block` / `BackupLink::block` then answers.
    pub fn nap(timeout: Duration) -> bool {
        std::thread::sleep(timeout.min(MAX_NAP));
        false
    }
}

impl Default for PollPolicy {
    fn default() -> Self {
        PollPolicy::BALANCED
    }
}

/// The state of one wait under a [`PollPolicy`]: call [`Poller::wait`] each time the condition
/// was not met, [`Poller::reset`] when progress was made.
#[derive(Debug, Clone)]
pub struct Poller {
    policy: PollPolicy,
    step: u64,
    park: Duration,
}

impl Poller {
    /// Waits a little, escalating on each call.
    #[inline]
    pub fn wait(&mut self) {
        let spins = u64::from(self.policy.spins);
        let yields = u64::from(self.policy.yields);
        if self.step < spins {
            std::hint::spin_loop();
        } else if self.step < spins + yields {
            std::thread::yield_now();
        } else {
            sleep_once(self.park);
            self.park = (self.park * 2).min(self.policy.max_park);
        }
        self.step = self.step.saturating_add(1);
    }

    /// Back to spinning: call after the awaited condition made progress.
    #[inline]
    pub fn reset(&mut self) {
        self.step = 0;
        self.park = self.policy.min_park;
    }

    /// True once the poller has left the pure spinning stage; callers check clocks only then,
    /// so the spinning stage stays free of `Instant::now` calls.
    #[inline]
    pub fn is_past_spinning(&self) -> bool {
        self.step >= u64::from(self.policy.spins) || self.step % 1024 == 1023
    }
}

/// Sleeps up to `d`, and less if a signal arrives: one `nanosleep`, not restarted (unlike
/// `std::thread::sleep`). A poll loop re-checks its condition anyway, and a backup's vCPU thread
/// napping while its guest is idle then wakes at once when the primary kicks it
/// ([`crate::kick`]).
fn sleep_once(d: Duration) {
    let ts = libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(d.subsec_nanos() as i32),
    };
    // SAFETY: nanosleep reads `ts` and may write the remaining time into a null pointer's place
    // (none asked for); an interruption (EINTR) just ends the nap.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_value_once_ready() {
        let mut calls = 0;
        let got = PollPolicy::BALANCED.wait_until(None, || {
            calls += 1;
            (calls == 500).then_some(calls)
        });
        assert_eq!(got, Some(500));
    }

    #[test]
    fn wait_until_gives_up_at_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(20);
        let got: Option<()> = PollPolicy::BALANCED.wait_until(Some(deadline), || None);
        assert_eq!(got, None);
        assert!(start.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn nap_sleeps_at_most_max_nap_and_reports_nothing() {
        assert!(!PollPolicy::nap(Duration::ZERO));
        let start = Instant::now();
        // Capped: an hour's timeout naps for MAX_NAP (a test that hangs would fail it).
        assert!(!PollPolicy::nap(Duration::from_secs(3600)));
        assert!(start.elapsed() >= MAX_NAP);
        assert!(start.elapsed() < Duration::from_secs(60));
    }

    #[test]
    fn poller_escalates_to_sleeping_and_caps_the_sleep() {
        let policy = PollPolicy {
            spins: 2,
            yields: 2,
            min_park: Duration::from_micros(10),
            max_park: Duration::from_micros(40),
        };
        let mut poller = policy.poller();
        for _ in 0..4 {
            poller.wait();
        }
        assert_eq!(poller.park, Duration::from_micros(10));
        for _ in 0..5 {
            poller.wait();
        }
        assert_eq!(poller.park, Duration::from_micros(40));
        poller.reset();
        assert_eq!(poller.step, 0);
        assert!(!poller.is_past_spinning());
    }
}
