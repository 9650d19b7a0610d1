//! What the stages count and time, as they record it: monotonic counters, and latencies kept
//! twice — a Prometheus histogram for scrapers, and the recent samples with their percentiles
//! over a window ("what is p99 right now", for `/v1/status` and the dashboard). Each stage owns
//! its own counters (a leaf module: every stage records here, none depends on another for it);
//! `ops` reads them all through one list of metrics.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde::{Deserialize, Serialize};

/// A count that only grows (or a level set by its owner), read by `ops` for status and metrics.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A count bumped from every thread on a hot path (cache hits): a slot per thread (of a few,
/// each on a cache line of its own), summed when read, so that threads counting at once do not
/// pass one cache line back and forth on every hit.
#[derive(Debug, Default)]
pub struct Striped([Stripe; STRIPES]);

/// Slots of a `Striped` count: threads beyond it share slots (still correct, only shared).
const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicU64);

/// Each thread's slot, given out in turn as threads first count.
fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: usize = NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES;
    }
    STRIPE.with(|s| *s)
}

impl Striped {
    pub fn inc(&self) {
        self.0[stripe()].0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// One latency, kept both ways: a histogram (seconds, for `/metrics`) and recent samples
/// (milliseconds, for percentiles in `/v1/status`).
#[derive(Debug)]
pub struct Latency {
    histogram: Histogram,
    recent: Recent,
}

impl Latency {
    /// Buckets from `first` seconds, doubling, `count` of them.
    pub fn new(first: f64, count: u16) -> Latency {
        Latency {
            histogram: Histogram::new(exponential_buckets(first, 2.0, count)),
            recent: Recent::default(),
        }
    }

    /// Records values (milliseconds) measured at `now_ms`.
    pub fn record(&self, now_ms: u64, values_ms: &[f64]) {
        for ms in values_ms {
            self.histogram.observe(ms / 1000.0);
        }
        self.recent.record(now_ms, values_ms);
    }

    pub fn histogram(&self) -> &Histogram {
        &self.histogram
    }

    /// The percentiles of the samples recorded in the `window` before `now_ms`.
    pub fn summary(&self, now_ms: u64, window: Duration) -> Summary {
        self.recent.summary(now_ms, window)
    }
}

/// Samples kept, at most (the newest): a burst of 100k changes keeps its last 4096.
const KEEP: usize = 4096;

/// The recent samples of one measure: (when recorded, unix ms; the value, ms).
#[derive(Debug, Default)]
pub struct Recent {
    samples: Mutex<VecDeque<(u64, f32)>>,
}

/// Percentiles of the samples in a window (nearest rank); `None` when there were none.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Recent {
    /// Records values (milliseconds) measured at `now_ms`.
    pub fn record(&self, now_ms: u64, values_ms: &[f64]) {
        let newest = &values_ms[values_ms.len().saturating_sub(KEEP)..];
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        for &value in newest {
            if samples.len() == KEEP {
                samples.pop_front();
            }
            samples.push_back((now_ms, value as f32));
        }
    }

    /// The percentiles of the samples recorded in the `window` before `now_ms`.
    pub fn summary(&self, now_ms: u64, window: Duration) -> Summary {
        let since = now_ms.saturating_sub(window.as_millis() as u64);
        let mut values: Vec<f32> = {
            let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            samples
                .iter()
                .filter(|(at, _)| *at >= since)
                .map(|(_, v)| *v)
                .collect()
        };
        values.sort_by(f32::total_cmp);
        let rank = |p: f64| -> Option<f64> {
            let n = values.len();
            let index = ((p * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1;
            values.get(index).map(|&v| f64::from(v))
        };
        Summary {
            count: values.len(),
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            max_ms: values.last().map(|&v| f64::from(v)),
        }
    }
}

/// Unix milliseconds now, with their fraction.
pub fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    unix_ms() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_over_the_window() {
        let recent = Recent::default();
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        recent.record(10_000, &values);
        recent.record(1_000, &[5_000.0]); // outside a 5 s window ending at 10 s
        let s = recent.summary(10_000, Duration::from_secs(5));
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, Some(50.0));
        assert_eq!(s.p99_ms, Some(99.0));
        assert_eq!(s.max_ms, Some(100.0));
        let empty = recent.summary(100_000, Duration::from_secs(5));
        assert_eq!((empty.count, empty.p50_ms), (0, None));
    }

    #[test]
    fn a_striped_count_sums_every_thread() {
        let count = Striped::default();
        std::thread::scope(|s| {
            for _ in 0..12 {
                s.spawn(|| (0..1000).for_each(|_| count.inc()));
            }
        });
        assert_eq!(count.get(), 12_000);
    }

    #[test]
    fn only_the_newest_samples_are_kept() {
        let recent = Recent::default();
        let values: Vec<f64> = (0..(KEEP as u32 * 3)).map(f64::from).collect();
        recent.record(1, &values);
        let s = recent.summary(1, Duration::from_secs(1));
        assert_eq!(s.count, KEEP);
        assert_eq!(s.max_ms, Some(f64::from(KEEP as u32 * 3 - 1)));
        assert_eq!(
            s.p50_ms,
            Some(f64::from(KEEP as u32 * 2 + KEEP as u32 / 2 - 1))
        );
    }
}
