//! Lock-free latency histograms over [`LATENCY_BOUNDS_US`], cheap enough for every request and
//! every forward pass; read as [`kiln_wire::Histogram`] snapshots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_wire::{BATCH_BOUNDS, Histogram, LATENCY_BOUNDS_US};

#[derive(Debug)]
pub struct AtomicHistogram {
    counts: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl AtomicHistogram {
    pub const fn new() -> AtomicHistogram {
        AtomicHistogram {
            counts: [const { AtomicU64::new(0) }; LATENCY_BOUNDS_US.len() + 1],
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn record(&self, elapsed: Duration) {
        let us = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        let bucket = LATENCY_BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(LATENCY_BOUNDS_US.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Back to empty (an operator's reset; readers that take differences must saturate).
    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
        self.sum_us.store(0, Ordering::Relaxed);
    }

    /// Microseconds over every record.
    pub fn sum_us(&self) -> u64 {
        self.sum_us.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Histogram {
        Histogram {
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// Forward passes by batch size over [`BATCH_BOUNDS`] (one more bucket for larger batches).
#[derive(Debug, Default)]
pub struct BatchSizes {
    counts: [AtomicU64; BATCH_BOUNDS.len() + 1],
    rows: AtomicU64,
}

impl BatchSizes {
    pub fn record(&self, rows: u32) {
        let bucket = BATCH_BOUNDS.iter().position(|&b| rows <= b).unwrap_or(BATCH_BOUNDS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(u64::from(rows), Ordering::Relaxed);
    }

    pub fn reset(&self) {
        for c in &self.counts {
            c.store(0, Ordering::Relaxed);
        }
        self.rows.store(0, Ordering::Relaxed);
    }

    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Passes recorded.
    pub fn passes(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Rows over every recorded pass.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_land_in_their_buckets() {
        let h = AtomicHistogram::new();
        h.record(Duration::from_micros(7));
        h.record(Duration::from_micros(700));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!((s.counts[0], s.counts[6], s.counts[LATENCY_BOUNDS_US.len()]), (1, 1, 1));
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum_us, 7 + 700 + 60_000_000);
        let b = BatchSizes::default();
        b.record(1);
        b.record(3);
        b.record(500);
        assert_eq!(b.counts(), vec![1, 0, 1, 0, 0, 0, 0, 0, 1]);
        assert_eq!((b.rows(), b.passes()), (504, 3));
        assert_eq!(h.sum_us(), s.sum_us);
    }
}
