//! Latency histograms for metrics: fixed buckets, lock-free recording, read
//! as a snapshot. The store records its metadata commits in one
//! ([`Store::metadata_commit_latency`](crate::Store::metadata_commit_latency));
//! a server embedding the store may keep its own per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets in seconds (Prometheus `le`), ascending; a
/// last bucket, `+Inf`, takes the rest.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0,
];

const BOUNDS_NANOS: [u64; 15] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Counts of durations by bucket, and their sum.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket, not cumulative; the last is `+Inf`.
    counts: [AtomicU64; 16],
    sum_nanos: AtomicU64,
}

/// A [`LatencyHistogram`] read at one instant (each field read on its own:
/// a recording in between may show in one and not another).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct LatencySnapshot {
    /// Cumulative counts per bound of [`LATENCY_BUCKETS`], then `+Inf`
    /// (the total count).
    pub cumulative: [u64; 16],
    /// The durations' sum, in seconds.
    pub sum_seconds: f64,
}

impl LatencySnapshot {
    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.cumulative[15]
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> LatencyHistogram {
        LatencyHistogram::default()
    }

    /// Records one duration.
    pub fn record(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_NANOS
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(BOUNDS_NANOS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut cumulative = [0u64; 16];
        let mut total = 0u64;
        for (slot, count) in cumulative.iter_mut().zip(&self.counts) {
            total += count.load(Ordering::Relaxed);
            *slot = total;
        }
        LatencySnapshot {
            cumulative,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_land_in_the_first_bucket_that_holds_them() {
        let h = LatencyHistogram::new();
        h.record(Duration::from_micros(50));
        h.record(Duration::from_micros(100));
        h.record(Duration::from_micros(101));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 2, "50 µs and exactly 100 µs");
        assert_eq!(s.cumulative[1], 3);
        assert_eq!(s.cumulative[4], 3, "3 ms is above 2.5 ms");
        assert_eq!(s.cumulative[5], 4);
        assert_eq!(s.cumulative[14], 4, "a minute is above 10 s");
        assert_eq!(s.count(), 5);
        let want = 60.0 + 0.003 + 0.000_251;
        assert!((s.sum_seconds - want).abs() < 1e-9, "{}", s.sum_seconds);
        for pair in s.cumulative.windows(2) {
            assert!(pair[0] <= pair[1]);
        }
        assert_eq!(LATENCY_BUCKETS.len(), BOUNDS_NANOS.len());
        for (secs, nanos) in LATENCY_BUCKETS.iter().zip(BOUNDS_NANOS) {
            assert_eq!((secs * 1e9).round() as u64, nanos);
        }
    }
}
