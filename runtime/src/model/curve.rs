//! What a forward pass costs by batch size, learned while the model serves, and the decision it
//! drives: whether holding a partial batch for rows that are on their way pays.
//!
//! A fixed batching window (Triton's and TorchServe's `max_queue_delay`) makes every request
//! pay for it, and is right for one model on one machine at one load. Kiln knows two things they
//! do not: how many guests are running now that may still call the model (they are its own
//! sandboxes), and what each batch size has cost on this replica. It holds a batch only when
//! rows are on their way *and* the curve says a fuller batch costs less per row; and never for
//! longer than the batch it holds would take to run, so a wrong guess costs at most one forward
//! pass of latency; and not at all for a model whose pass is under a millisecond (the wake-ups
//! of a hold cost more than such a batch saves). A lone request never waits: nothing is on its
//! way.

use std::time::Duration;

/// Weight of a new sample in a size's running mean, once it has a few.
const SMOOTHING: f64 = 0.2;
/// A fuller batch must be this much cheaper per row to be worth waiting for.
const WORTHWHILE: f64 = 0.9;
/// Below this a forward pass is cheaper than the thread wake-ups a hold costs, and shorter than
/// the sleep granularity that would time it: a model this fast never holds.
const SHORTEST_HOLD: Duration = Duration::from_millis(1);

/// Mean forward time by rows, indexed by rows.
#[derive(Debug, Clone)]
pub struct ForwardCurve {
    points: Vec<Point>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Point {
    mean_us: f64,
    samples: u64,
}

impl ForwardCurve {
    pub fn new(max_rows: u32) -> ForwardCurve {
        ForwardCurve {
            points: vec![Point::default(); max_rows as usize + 1],
        }
    }

    /// Makes room for batches of up to `max_rows` rows (a larger `max_batch_size` set while
    /// serving); what was learned stays.
    pub fn grow(&mut self, max_rows: u32) {
        let len = max_rows as usize + 1;
        if self.points.len() < len {
            self.points.resize(len, Point::default());
        }
    }

    /// Adds one forward pass of `rows` rows that took `elapsed`.
    pub fn record(&mut self, rows: u32, elapsed: Duration) {
        let Some(point) = self.points.get_mut(rows as usize).filter(|_| rows > 0) else {
            return;
        };
        let us = elapsed.as_secs_f64() * 1e6;
        point.samples += 1;
        // A plain mean for the first few samples, then a running one that follows change.
        let weight = (1.0 / point.samples as f64).max(SMOOTHING);
        point.mean_us += weight * (us - point.mean_us);
    }

    /// The sizes measured so far: `(rows, mean forward µs, samples)`, by rows.
    pub fn points(&self) -> Vec<(u32, f64, u64)> {
        self.points
            .iter()
            .enumerate()
            .filter(|(_, p)| p.samples > 0)
            .map(|(rows, p)| (rows as u32, p.mean_us, p.samples))
            .collect()
    }

    /// The expected forward time of `rows` rows in µs: measured, else interpolated between the
    /// nearest measured sizes, else extrapolated along the two largest. With one size measured,
    /// any larger one is guessed to cost the same (optimistic, so that the scheduler tries it
    /// once and learns). `None` before any forward pass.
    pub fn estimate_us(&self, rows: u32) -> Option<f64> {
        let rows = rows as usize;
        if let Some(p) = self.points.get(rows).filter(|p| p.samples > 0) {
            return Some(p.mean_us);
        }
        let below = self.first_measured((1..rows.min(self.points.len())).rev());
        let above = self.first_measured(rows + 1..self.points.len());
        let x = rows as f64;
        match (below, above) {
            (Some((x0, y0)), Some((x1, y1))) => Some(y0 + (y1 - y0) * (x - x0) / (x1 - x0)),
            (None, Some((_, y1))) => Some(y1),
            (Some((x1, y1)), None) => match self.first_measured((1..x1 as usize).rev()) {
                Some((x0, y0)) => Some(y1 + ((y1 - y0) / (x1 - x0)).max(0.0) * (x - x1)),
                None => Some(y1),
            },
            (None, None) => None,
        }
    }

    /// The first size in `sizes` with a measurement, as `(rows, mean µs)`.
    fn first_measured(&self, mut sizes: impl Iterator<Item = usize>) -> Option<(f64, f64)> {
        sizes
            .find(|&r| self.points[r].samples > 0)
            .map(|r| (r as f64, self.points[r].mean_us))
    }

    /// How long a batch of `rows` may wait for up to `coming` more rows (never past
    /// `max_rows`): the time its own forward pass takes, when a batch with them is expected to
    /// cost clearly less per row; `None` when waiting does not pay or nothing is known yet.
    pub fn hold(&self, rows: u32, coming: u32, max_rows: u32) -> Option<Duration> {
        let fuller = rows.saturating_add(coming).min(max_rows);
        if rows == 0 || fuller <= rows {
            return None;
        }
        let now = self.estimate_us(rows)?;
        let later = self.estimate_us(fuller)?;
        let hold = Duration::from_secs_f64(now / 1e6);
        (hold >= SHORTEST_HOLD && later / f64::from(fuller) < WORTHWHILE * now / f64::from(rows)).then_some(hold)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(points: &[(u32, u64)]) -> ForwardCurve {
        let mut c = ForwardCurve::new(64);
        for &(rows, us) in points {
            c.record(rows, Duration::from_micros(us));
        }
        c
    }

    #[test]
    fn estimates_come_from_measured_sizes_between_and_beyond_them() {
        let c = curve(&[(4, 1000), (8, 1800)]);
        assert_eq!(c.estimate_us(4), Some(1000.0));
        assert_eq!(c.estimate_us(6), Some(1400.0));
        assert_eq!(c.estimate_us(16), Some(3400.0));
        assert_eq!(c.estimate_us(2), Some(1000.0));
        assert_eq!(ForwardCurve::new(8).estimate_us(1), None);
        // One size known: a larger one is guessed to cost the same, so it gets tried.
        assert_eq!(curve(&[(8, 2000)]).estimate_us(16), Some(2000.0));
    }

    #[test]
    fn a_size_s_mean_follows_its_samples() {
        let mut c = curve(&[(8, 1000), (8, 3000)]);
        assert_eq!(c.estimate_us(8), Some(2000.0));
        for _ in 0..50 {
            c.record(8, Duration::from_micros(500));
        }
        assert!((c.estimate_us(8).unwrap_or(0.0) - 500.0).abs() < 5.0);
    }

    #[test]
    fn holding_pays_only_when_a_fuller_batch_is_cheaper_per_row() {
        // A fixed cost per pass (a transformer on a CPU: 8 rows 29 ms, 16 rows 48 ms).
        let fixed = curve(&[(8, 29_000), (16, 48_000)]);
        assert_eq!(fixed.hold(8, 8, 64), Some(Duration::from_micros(29_000)));
        // Cost proportional to rows: nothing to gain.
        let linear = curve(&[(8, 8_000), (16, 16_000)]);
        assert_eq!(linear.hold(8, 8, 64), None);
        // A model faster than a millisecond never holds: its batches cost less than the wait.
        assert_eq!(curve(&[(4, 200), (8, 250)]).hold(4, 4, 64), None);
        // Nothing on its way, a full batch, or nothing learned yet: no hold.
        assert_eq!(fixed.hold(8, 0, 64), None);
        assert_eq!(fixed.hold(16, 8, 16), None);
        assert_eq!(ForwardCurve::new(64).hold(1, 8, 64), None);
    }
}
