//! How many rows the engine hands to the Publisher and has not settled yet: sized from what
//! is measured, capped by `publisher.max_in_flight`.
//!
//! Every row between its publish and its durable outcome is a duplicate if the engine dies:
//! it may have reached the queue, and the engine that takes over publishes it again (a row
//! claimed but not yet handed on costs nothing: it was never published). Handing on every
//! claimed row at once kept up to 4,096 rows published and unconfirmed while a backlog
//! drained, so a crash cost thousands of duplicates; the broker needs only enough rows to
//! cover its round trip at the rate it achieves (Little's law: rows in flight = rate × time
//! in flight) plus what its confirm batching wants.
//!
//! The window follows that: `rate × target + HEADROOM`, where `rate` is the settle rate
//! just measured and `target` the dispatch→settle time the engine aims at: `GAIN` times the
//! base latency (the shortest recent average of a group of rows settled together — the
//! pipeline with no queue in it), and never below `FLOOR`: RabbitMQ confirms persistent
//! messages in batches and goes faster with more of them waiting (raw lapin here: 10.5k msg/s
//! with 64 unconfirmed, 12k with 256, 16k with 1,024), and a row's outcome is written in a
//! group commit after its ack, so the floor keeps a broker's fill of rows in flight plus one
//! write's worth. It is a trade (measured here, release build, one engine draining 50,000
//! rows, in alternating pairs against a window pinned at 4,096): 100 ms kept about 2,000
//! rows dispatched and the drain within about 4 % of the pinned window's rate, 60 ms about
//! 1,000 rows and 0–12 % (noisy), 40 ms about 700 rows and 4 %; the crash tests' duplicates
//! follow the rows dispatched. Rows in flight = rate × latency, so when latency is under the
//! target the window grows by their ratio each sample (a fast start from `MIN`), and over it
//! the window shrinks.

use std::time::{Duration, Instant};

/// The smallest window: enough for full publish batches from the first claim on.
pub(super) const MIN: usize = 256;
/// The target latency in base latencies (see the module doc).
const GAIN: f64 = 2.0;
/// The target latency's floor (see the module doc).
const FLOOR: Duration = Duration::from_millis(100);
/// Rows on top, so claims and publishes stay batched.
const HEADROOM: usize = 128;
/// How often the rate is sampled.
const RATE_PERIOD: Duration = Duration::from_millis(25);
/// Weight of the newest rate sample.
const RATE_WEIGHT: f64 = 0.3;
/// The base latency is the minimum over the last one to two of these. Long, because under a
/// sustained drain every sample carries the queue the window itself keeps: once the last
/// unqueued sample ages out, the base is the loaded latency and the target (twice it) lets
/// the window creep up towards the cap. A slower broker is still followed, a period later.
const BASE_PERIOD: Duration = Duration::from_secs(30);

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

    /// `rows` settled together at `now`, after `latency` on average (claim to durable
    /// outcome).
    pub(super) fn settled(&mut self, rows: usize, latency: Duration, now: Instant) {
        if rows > 0 {
            self.settled_since += rows;
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
        let target = base.mul_f64(GAIN).max(FLOOR);
        let wanted = self.rate * target.as_secs_f64();
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
            w.settled(per_tick, latency, *t);
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
        // 20k rows/s, 80 ms each: the target is 160 ms, 3,200 rows, plus headroom.
        drive(&mut w, &mut t, 20_000, 80 * MS, 2);
        assert!((3_250..=3_450).contains(&w.size()), "{}", w.size());
        // 10 ms each: the target is the floor, 100 ms, 2,000 rows.
        drive(&mut w, &mut t, 20_000, 10 * MS, 61);
        assert!((2_050..=2_250).contains(&w.size()), "{}", w.size());
    }

    #[test]
    fn queueing_does_not_grow_it_but_the_base_does() {
        let mut t = Instant::now();
        let mut w = Window::new(100_000, true, t);
        drive(&mut w, &mut t, 20_000, 60 * MS, 1);
        let settled = w.size();
        // Same rate, latency up 5× (a queue in the broker): the base stays, so does the size.
        drive(&mut w, &mut t, 20_000, 300 * MS, 1);
        assert!(w.size() <= settled + 20, "{} vs {settled}", w.size());
        // The base itself grows (a slower broker) once the old minimum has aged out.
        drive(&mut w, &mut t, 20_000, 300 * MS, 61);
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
