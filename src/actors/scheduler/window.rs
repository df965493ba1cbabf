//! How many rows the engine keeps claimed and unsettled: sized from what is measured, capped
//! by `publisher.max_in_flight`.
//!
//! Every row held between its claim and its durable outcome is a duplicate if the engine
//! dies: it may have reached the queue, and the next engine publishes it again. A fixed
//! window of 4,096 is always full while a backlog drains (claims are faster than confirms),
//! so a crash cost thousands of duplicates, while the pipeline needs only enough rows to
//! cover one round trip at the rate it achieves (Little's law: rows in flight = rate ×
//! time in flight).
//!
//! The window follows that: `rate × base latency × GAIN + HEADROOM`, where `rate` is the
//! settle rate just measured and `base latency` the shortest claim→settle time seen lately
//! (the pipeline with no queue in it). With no queueing, latency ≈ base and the formula
//! gives about twice the rows now in flight, so the window doubles each round trip (a slow
//! start from `MIN`); once rows queue (in the broker, in the batches), latency grows past
//! `GAIN × base` and the window stops growing: it settles where a round trip holds about
//! `GAIN` times the base's worth of rows, which keeps the broker busy without a standing
//! queue of thousands.

use std::time::{Duration, Instant};

/// The smallest window: enough for full publish batches from the first claim on.
pub(super) const MIN: usize = 256;
/// Rows in flight per base round trip at the current rate (see the module doc).
const GAIN: f64 = 2.0;
/// Rows on top, so claims and publishes stay batched.
const HEADROOM: usize = 128;
/// How often the rate is sampled.
const RATE_PERIOD: Duration = Duration::from_millis(25);
/// Weight of the newest rate sample.
const RATE_WEIGHT: f64 = 0.3;
/// The base latency is the minimum over the last one to two of these.
const BASE_PERIOD: Duration = Duration::from_secs(5);

/// See the module documentation.
#[derive(Debug)]
pub(super) struct Window {
    adaptive: bool,
    cap: usize,
    /// Settled rows per second (smoothed).
    rate: f64,
    settled_since: usize,
    sampled_at: Instant,
    /// Shortest claim→settle time in this base period and the one before.
    base_now: Option<Duration>,
    base_before: Option<Duration>,
    base_since: Instant,
    size: usize,
}

impl Window {
    /// A window that starts at `MIN` (or the cap, when smaller) and never exceeds `cap`;
    /// not `adaptive`, it is always `cap`.
    pub(super) fn new(cap: usize, adaptive: bool, now: Instant) -> Window {
        Window {
            adaptive,
            cap,
            rate: 0.0,
            settled_since: 0,
            sampled_at: now,
            base_now: None,
            base_before: None,
            base_since: now,
            size: if adaptive { MIN.min(cap) } else { cap },
        }
    }

    /// Rows that may be held now.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// Rows settled at `now`, each after `latencies` (claim to durable outcome).
    pub(super) fn settled(&mut self, latencies: impl IntoIterator<Item = Duration>, now: Instant) {
        for latency in latencies {
            self.settled_since += 1;
            self.base_now = Some(self.base_now.map_or(latency, |b| b.min(latency)));
        }
        if now.saturating_duration_since(self.base_since) >= BASE_PERIOD {
            self.base_before = self.base_now.take();
            self.base_since = now;
        }
        let dt = now.saturating_duration_since(self.sampled_at);
        if dt < RATE_PERIOD {
            return;
        }
        let sample = self.settled_since as f64 / dt.as_secs_f64();
        self.rate = if self.rate == 0.0 {
            sample
        } else {
            self.rate * (1.0 - RATE_WEIGHT) + sample * RATE_WEIGHT
        };
        self.settled_since = 0;
        self.sampled_at = now;
        self.resize();
    }

    fn base(&self) -> Option<Duration> {
        match (self.base_now, self.base_before) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn resize(&mut self) {
        let Some(base) = self.base().filter(|_| self.adaptive) else {
            return;
        };
        let wanted = self.rate * base.as_secs_f64() * GAIN;
        let wanted = if wanted.is_finite() {
            wanted as usize
        } else {
            self.cap
        };
        self.size = (wanted + HEADROOM).clamp(MIN.min(self.cap), self.cap);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Settles `rate` rows per second for `secs`, each after `latency`.
    fn drive(w: &mut Window, t: &mut Instant, rate: usize, latency: Duration, secs: u64) {
        let per_tick = rate / 100;
        for _ in 0..secs * 100 {
            *t += 10 * MS;
            w.settled(std::iter::repeat_n(latency, per_tick), *t);
        }
    }

    #[test]
    fn it_starts_small_and_never_leaves_its_bounds() {
        let t = Instant::now();
        let w = Window::new(4096, true, t);
        assert_eq!(w.size(), MIN);
        assert_eq!(
            Window::new(100, true, t).size(),
            100,
            "a cap below MIN wins"
        );
    }

    #[test]
    fn it_follows_rate_times_base_latency() {
        let mut t = Instant::now();
        let mut w = Window::new(4096, true, t);
        // 20k rows/s, 10 ms each: 200 rows per round trip, so about 2 × 200 + headroom.
        drive(&mut w, &mut t, 20_000, 10 * MS, 2);
        assert!((480..=560).contains(&w.size()), "{}", w.size());
    }

    #[test]
    fn queueing_does_not_grow_it_but_the_base_does() {
        let mut t = Instant::now();
        let mut w = Window::new(4096, true, t);
        drive(&mut w, &mut t, 20_000, 10 * MS, 1);
        let settled = w.size();
        // Same rate, latency up 5× (a queue in the broker): the base stays, so does the size.
        drive(&mut w, &mut t, 20_000, 50 * MS, 1);
        assert!(w.size() <= settled + 20, "{} vs {settled}", w.size());
        // The base itself grows (a slower broker) once the old minimum has aged out.
        drive(&mut w, &mut t, 20_000, 50 * MS, 11);
        assert!(w.size() > 3 * settled, "{} vs {settled}", w.size());
    }

    #[test]
    fn it_is_capped() {
        let mut t = Instant::now();
        let mut w = Window::new(1000, true, t);
        drive(&mut w, &mut t, 50_000, 100 * MS, 1);
        assert_eq!(w.size(), 1000);
        let mut fixed = Window::new(4096, false, t);
        drive(&mut fixed, &mut t, 20_000, 10 * MS, 1);
        assert_eq!(fixed.size(), 4096, "not adaptive: always the cap");
    }
}
