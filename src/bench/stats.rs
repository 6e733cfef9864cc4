//! Order statistics for latency samples.
//!
//! WHY nearest-rank: every reported percentile is a latency that a real request actually
//! saw (no interpolation between two samples), and p99 of fewer than 100 samples is simply
//! the maximum, which is the honest answer for small runs.

use serde::Serialize;
use std::time::Duration;

/// Nearest-rank percentile of an ascending-sorted slice: the smallest sample such that at
/// least `p` percent of the samples are less than or equal to it
/// (rank = ceil(p / 100 * n), 1-based). `None` for an empty slice or a `p` outside 0..=100.
pub fn percentile_nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(0.0..=100.0).contains(&p) {
        return None;
    }
    let n = sorted.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    sorted.get(rank.clamp(1, n) - 1).copied()
}

/// A sorted set of samples in milliseconds, built once and queried for several percentiles.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    sorted_ms: Vec<f64>,
}

impl Samples {
    /// Sorts the durations (as milliseconds) once.
    pub fn from_durations<I: IntoIterator<Item = Duration>>(durations: I) -> Self {
        let mut sorted_ms: Vec<f64> = durations
            .into_iter()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        sorted_ms.sort_by(f64::total_cmp);
        Samples { sorted_ms }
    }

    pub fn len(&self) -> usize {
        self.sorted_ms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted_ms.is_empty()
    }

    /// Nearest-rank percentile in milliseconds (see [`percentile_nearest_rank`]).
    pub fn percentile(&self, p: f64) -> Option<f64> {
        percentile_nearest_rank(&self.sorted_ms, p)
    }

    pub fn mean(&self) -> Option<f64> {
        if self.sorted_ms.is_empty() {
            return None;
        }
        Some(self.sorted_ms.iter().sum::<f64>() / self.sorted_ms.len() as f64)
    }

    /// The usual summary (milliseconds) for reports.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.len(),
            mean_ms: self.mean(),
            p50_ms: self.percentile(50.0),
            p90_ms: self.percentile(90.0),
            p99_ms: self.percentile(99.0),
            max_ms: self.percentile(100.0),
        }
    }
}

/// Percentiles of one latency metric, in milliseconds (`None` when there were no samples).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: usize,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_on_ten_samples() {
        let s: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile_nearest_rank(&s, 50.0), Some(5.0));
        assert_eq!(percentile_nearest_rank(&s, 90.0), Some(9.0));
        assert_eq!(percentile_nearest_rank(&s, 91.0), Some(10.0));
        assert_eq!(percentile_nearest_rank(&s, 99.0), Some(10.0));
        assert_eq!(percentile_nearest_rank(&s, 100.0), Some(10.0));
        assert_eq!(percentile_nearest_rank(&s, 0.0), Some(1.0));
        assert_eq!(percentile_nearest_rank(&s, 10.0), Some(1.0));
        assert_eq!(percentile_nearest_rank(&s, 11.0), Some(2.0));
    }

    #[test]
    fn nearest_rank_on_hundred_samples_and_edges() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_nearest_rank(&s, 99.0), Some(99.0));
        assert_eq!(percentile_nearest_rank(&s, 50.0), Some(50.0));
        assert_eq!(percentile_nearest_rank(&[7.0], 50.0), Some(7.0));
        assert_eq!(percentile_nearest_rank(&[], 50.0), None);
        assert_eq!(percentile_nearest_rank(&s, 101.0), None);
        assert_eq!(percentile_nearest_rank(&s, f64::NAN), None);
    }

    #[test]
    fn samples_sort_durations_into_milliseconds() {
        let samples = Samples::from_durations([
            Duration::from_millis(30),
            Duration::from_millis(10),
            Duration::from_millis(20),
        ]);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples.percentile(50.0), Some(20.0));
        assert_eq!(samples.percentile(100.0), Some(30.0));
        assert_eq!(samples.mean(), Some(20.0));
        let summary = samples.summary();
        assert_eq!(summary.count, 3);
        assert_eq!(summary.p99_ms, Some(30.0));
        assert!(Samples::default().summary().p50_ms.is_none());
    }
}
