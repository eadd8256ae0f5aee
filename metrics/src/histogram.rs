//! A fixed-bucket histogram of durations that the commit path can afford: one bucket search
//! over a short table and two plain stores per observation, no lock.
//!
//! Bounds run from 1 µs to 10 s at 1–1.5–2–3–5–7.5 steps per decade, fine enough that the
//! p50/p99 `ftvm status` interpolates over the last minute are within a bucket's width (50 %)
//! of the truth, and coarse enough that a scrape stays a few KiB.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the buckets, ns (the last bucket, +Inf, is implicit).
pub const BOUNDS_NS: [u64; 43] = [
    1_000,
    1_500,
    2_000,
    3_000,
    5_000,
    7_500,
    10_000,
    15_000,
    20_000,
    30_000,
    50_000,
    75_000,
    100_000,
    150_000,
    200_000,
    300_000,
    500_000,
    750_000,
    1_000_000,
    1_500_000,
    2_000_000,
    3_000_000,
    5_000_000,
    7_500_000,
    10_000_000,
    15_000_000,
    20_000_000,
    30_000_000,
    50_000_000,
    75_000_000,
    100_000_000,
    150_000_000,
    200_000_000,
    300_000_000,
    500_000_000,
    750_000_000,
    1_000_000_000,
    1_500_000_000,
    2_000_000_000,
    3_000_000_000,
    5_000_000_000,
    7_500_000_000,
    10_000_000_000,
];

const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// Durations in fixed buckets, written by one thread at a time (a replica's vCPU thread, or
/// whichever thread arbitrates), read by the metrics endpoint. A second concurrent writer could
/// lose an observation, never corrupt one.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Self {
        Histogram {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Counts one duration of `ns` nanoseconds.
    #[inline]
    pub fn observe_ns(&self, ns: u64) {
        // Short durations are the common case: a forward scan ends within a few compares.
        let i = BOUNDS_NS
            .iter()
            .position(|&b| ns <= b)
            .unwrap_or(BOUNDS_NS.len());
        bump(&self.buckets[i], 1);
        bump(&self.sum_ns, ns);
    }

    /// Counts one duration.
    pub fn observe(&self, d: std::time::Duration) {
        self.observe_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// A copy of the counts now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's counts at one moment; two of them give the window between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Per bucket (not cumulative); the last is everything above the last bound.
    pub counts: [u64; BUCKETS],
    /// The sum of all durations, ns.
    pub sum_ns: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        HistogramSnapshot {
            counts: [0; BUCKETS],
            sum_ns: 0,
        }
    }
}

impl HistogramSnapshot {
    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was counted after `earlier` (counters only grow; a wrapped one counts as zero).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.counts[i].saturating_sub(earlier.counts[i])),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
        }
    }

    /// `(upper bound in seconds, count in that bucket)` pairs ending with +Inf (the encoder
    /// makes them cumulative).
    pub fn buckets_seconds(&self) -> Vec<(f64, u64)> {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                (
                    BOUNDS_NS.get(i).map_or(f64::INFINITY, |&b| b as f64 / 1e9),
                    c,
                )
            })
            .collect()
    }

    /// The `q`-quantile (0..=1) in ns, interpolated linearly inside its bucket as Prometheus's
    /// `histogram_quantile` does; `None` with nothing counted. Above the last bound it answers
    /// the last bound.
    pub fn quantile_ns(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * n as f64;
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c > 0 && (below + c) as f64 >= rank {
                let lo = if i == 0 { 0 } else { BOUNDS_NS[i - 1] } as f64;
                let Some(&hi) = BOUNDS_NS.get(i) else {
                    return Some(lo);
                };
                let within = ((rank - below as f64) / c as f64).clamp(0.0, 1.0);
                return Some(lo + (hi as f64 - lo) * within);
            }
            below += c;
        }
        BOUNDS_NS.last().map(|&b| b as f64)
    }

    /// The mean in ns, if anything was counted.
    pub fn mean_ns(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_ns as f64 / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_increase() {
        assert!(BOUNDS_NS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn observations_land_in_their_bucket_and_sum() {
        let h = Histogram::new();
        h.observe_ns(999);
        h.observe_ns(1_000);
        h.observe_ns(1_001);
        h.observe_ns(20_000_000_000);
        let s = h.snapshot();
        assert_eq!(s.counts[0], 2);
        assert_eq!(s.counts[1], 1);
        assert_eq!(s.counts[BUCKETS - 1], 1);
        assert_eq!(s.count(), 4);
        assert_eq!(s.sum_ns, 999 + 1_000 + 1_001 + 20_000_000_000);
        let b = s.buckets_seconds();
        assert_eq!(b.len(), BUCKETS);
        assert_eq!(b[0], (1e-6, 2));
        assert_eq!(b[BUCKETS - 1].1, 1);
        assert!(b[BUCKETS - 1].0.is_infinite());
    }

    #[test]
    fn quantiles_interpolate_within_a_bucket() {
        let h = Histogram::new();
        assert_eq!(h.snapshot().quantile_ns(0.5), None);
        // 100 observations of 3-5 us (bucket 3000..5000], and one of 1 ms.
        for _ in 0..100 {
            h.observe_ns(4_000);
        }
        h.observe_ns(1_000_000);
        let s = h.snapshot();
        let p50 = s.quantile_ns(0.5).unwrap_or_default();
        assert!((3_000.0..=5_000.0).contains(&p50), "{p50}");
        let p100 = s.quantile_ns(1.0).unwrap_or_default();
        assert!((750_000.0..=1_000_000.0).contains(&p100), "{p100}");
    }

    #[test]
    fn a_window_is_the_difference_of_two_snapshots() {
        let h = Histogram::new();
        h.observe_ns(2_000);
        let a = h.snapshot();
        h.observe_ns(40_000_000);
        let w = h.snapshot().since(&a);
        assert_eq!(w.count(), 1);
        assert_eq!(w.sum_ns, 40_000_000);
        let p = w.quantile_ns(0.5).unwrap_or_default();
        assert!((30_000_000.0..=50_000_000.0).contains(&p), "{p}");
    }
}
