//! Percentiles of a handful of samples (exact, nearest rank: with 20 joins a histogram's
//! buckets would only blur them) and the targets `bench join` reports against.

/// The `q` quantile of `v` by nearest rank (the smallest sample with at least `q` of the
/// samples at or below it); NaN for no samples.
pub fn percentile_ms(v: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The largest sample (exact, not bucketed); NaN for none.
pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().reduce(f64::max).unwrap_or(f64::NAN)
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The pause target for a guest of `mem_mib`: p99 ≤ 10 ms up to 256 MiB, ≤ 20 ms up to
/// 1 GiB; none set beyond.
pub fn pause_target_ms(mem_mib: u64) -> Option<f64> {
    match mem_mib {
        0..=256 => Some(10.0),
        257..=1024 => Some(20.0),
        _ => None,
    }
}

/// Join start to protected: at most 1 s per GiB of guest memory.
pub fn total_target_ms(mem_mib: u64) -> f64 {
    1000.0 * mem_mib as f64 / 1024.0
}

/// What the client may see during a join: no response slower than the pause + 10 ms.
pub const CLIENT_SLACK_MS: f64 = 10.0;

/// `PASS` / `MISS` / `-` (no target).
pub fn verdict(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "PASS",
        Some(false) => "MISS",
        None => "-",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_few_samples() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile_ms(&v, 0.5), 10.0);
        // With 20 samples the 99th percentile is the largest.
        assert_eq!(percentile_ms(&v, 0.99), 20.0);
        assert_eq!(max(&v), 20.0);
        assert_eq!(median(&v), 10.5);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        // Exact: a sample reads back as it was.
        assert_eq!(percentile_ms(&[1234.5], 0.5), 1234.5);
        assert_eq!(percentile_ms(&[5.0, 1.0, 3.0], 0.0), 1.0);
        assert!(percentile_ms(&[], 0.5).is_nan() && max(&[]).is_nan() && median(&[]).is_nan());
    }

    #[test]
    fn targets_by_size() {
        assert_eq!(pause_target_ms(16), Some(10.0));
        assert_eq!(pause_target_ms(256), Some(10.0));
        assert_eq!(pause_target_ms(1024), Some(20.0));
        assert_eq!(pause_target_ms(4096), None);
        assert_eq!(total_target_ms(1024), 1000.0);
        assert_eq!(total_target_ms(256), 250.0);
        assert_eq!(verdict(Some(true)), "PASS");
        assert_eq!(verdict(None), "-");
    }
}
