//! Retry delays: exponential, capped, with jitter, never past the cap.
//!
//! Every retry loop in Courier names its [`Policy`] here, so the whole table of delays
//! reads in one place and each one is tested as a spec. Jitter spreads the retries of
//! things that failed together (a broker restart fails thousands of messages at once) so
//! they do not all come back in the same instant.

use std::time::Duration;

use rand::Rng;

use crate::config::BackoffConfig;

/// A retry schedule: `first` after the first failure, `factor` times longer after each
/// further one, capped at `max`, then spread by ± `jitter` (a fraction of the delay)
/// without ever passing `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    /// The delay after the first failure.
    pub first: Duration,
    /// Growth per further failure (>= 1.0).
    pub factor: f64,
    /// Cap on every delay, jitter included.
    pub max: Duration,
    /// Random spread as a fraction of the delay (0.0..=1.0).
    pub jitter: f64,
}

/// Opening the database at engine start while `database.wait_at_start` is on:
/// 500 ms doubling to 10 s, ±20 %.
pub const ENGINE_START: Policy = Policy {
    first: Duration::from_millis(500),
    factor: 2.0,
    max: Duration::from_secs(10),
    jitter: 0.2,
};

/// The Publisher reconnecting to RabbitMQ once every node was tried: 100 ms doubling to
/// 10 s, ±30 %.
pub const RECONNECT: Policy = Policy {
    first: Duration::from_millis(100),
    factor: 2.0,
    max: Duration::from_secs(10),
    jitter: 0.3,
};

/// The Scheduler after a failed claim round: 200 ms doubling to 5 s, ±20 %.
pub const CLAIM: Policy = Policy {
    first: Duration::from_millis(200),
    factor: 2.0,
    max: Duration::from_secs(5),
    jitter: 0.2,
};

/// Writing outcomes (and moving rows to `dead_letters`) again after a failed write:
/// 200 ms doubling to 5 s, no jitter (one writer, nothing to spread).
pub const STORE_WRITE: Policy = Policy {
    first: Duration::from_millis(200),
    factor: 2.0,
    max: Duration::from_secs(5),
    jitter: 0.0,
};

/// The inbox reconnecting after a session that never consumed: 200 ms doubling to 10 s,
/// no jitter.
pub const INBOX_RECONNECT: Policy = Policy {
    first: Duration::from_millis(200),
    factor: 2.0,
    max: Duration::from_secs(10),
    jitter: 0.0,
};

/// The default for trying again a delivery the inbox holds while its database is
/// unreachable (`InboxConfig::database_retry`): 100 ms doubling to 5 s, ±20 %.
pub const INBOX_HOLD: Policy = Policy {
    first: Duration::from_millis(100),
    factor: 2.0,
    max: Duration::from_secs(5),
    jitter: 0.2,
};

/// The default wait before a delivery whose handler failed goes back to the queue
/// (`InboxConfig::failure_backoff`): 2 s doubling to 1 min, ±20 %, so the default five
/// requeues span about a minute, not the milliseconds a short fault (a lock timeout, a
/// table being migrated) lasts.
pub const INBOX_FAILURE: Policy = Policy {
    first: Duration::from_secs(2),
    factor: 2.0,
    max: Duration::from_secs(60),
    jitter: 0.2,
};

impl Policy {
    /// The delay after failure number `failures` (1-based; 0 counts as 1), before jitter:
    /// `first * factor^(failures-1)`, capped at `max`.
    pub fn base(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(1024) as i32;
        let secs = self.first.as_secs_f64() * self.factor.powi(exp);
        let max = self.max.as_secs_f64();
        if !secs.is_finite() || secs >= max {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// [`base`](Self::base) spread by ± `jitter`, never above `max` and never negative.
    pub fn delay_with<R: Rng + ?Sized>(&self, failures: u32, rng: &mut R) -> Duration {
        let base = self.base(failures).as_secs_f64();
        let spread = if self.jitter > 0.0 {
            rng.gen_range(-self.jitter..=self.jitter)
        } else {
            0.0
        };
        let secs = (base * (1.0 + spread)).clamp(0.0, self.max.as_secs_f64());
        Duration::from_secs_f64(secs)
    }

    /// [`delay_with`](Self::delay_with) using the thread's random generator.
    pub fn delay(&self, failures: u32) -> Duration {
        self.delay_with(failures, &mut rand::thread_rng())
    }
}

impl From<&BackoffConfig> for Policy {
    fn from(cfg: &BackoffConfig) -> Self {
        Policy {
            first: cfg.initial,
            factor: cfg.multiplier,
            max: cfg.max,
            jitter: cfg.jitter,
        }
    }
}

impl From<Policy> for BackoffConfig {
    fn from(p: Policy) -> Self {
        BackoffConfig {
            initial: p.first,
            max: p.max,
            multiplier: p.factor,
            jitter: p.jitter,
        }
    }
}

/// The delay after failed attempt number `attempt` under a configured schedule
/// (`retry.backoff`, `InboxConfig::database_retry`).
pub fn delay(cfg: &BackoffConfig, attempt: u32) -> Duration {
    Policy::from(cfg).delay(attempt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn policy(first_ms: u64, max_ms: u64, factor: f64, jitter: f64) -> Policy {
        Policy {
            first: Duration::from_millis(first_ms),
            factor,
            max: Duration::from_millis(max_ms),
            jitter,
        }
    }

    /// Base delays in ms after failures 1..=n.
    fn schedule(p: &Policy, n: u32) -> Vec<u128> {
        (1..=n).map(|f| p.base(f).as_millis()).collect()
    }

    #[test]
    fn engine_start_waits_half_a_second_doubling_to_ten() {
        assert_eq!(
            schedule(&ENGINE_START, 7),
            [500, 1000, 2000, 4000, 8000, 10_000, 10_000]
        );
        assert_eq!(ENGINE_START.jitter, 0.2);
    }

    #[test]
    fn publisher_reconnects_from_a_tenth_of_a_second_doubling_to_ten() {
        assert_eq!(
            schedule(&RECONNECT, 9),
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        assert_eq!(RECONNECT.jitter, 0.3);
    }

    #[test]
    fn claims_pause_from_a_fifth_of_a_second_doubling_to_five() {
        assert_eq!(schedule(&CLAIM, 7), [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(CLAIM.jitter, 0.2);
    }

    #[test]
    fn inbox_holds_from_a_tenth_of_a_second_doubling_to_five() {
        assert_eq!(
            schedule(&INBOX_HOLD, 8),
            [100, 200, 400, 800, 1600, 3200, 5000, 5000]
        );
        assert_eq!(INBOX_HOLD.jitter, 0.2);
    }

    /// Store writes kept the delays of the formula they replaced, to the nanosecond:
    /// `100 ms << min(failures, 6)`, capped at 5 s.
    #[test]
    fn store_writes_retry_exactly_as_before() {
        for failures in 1..=40u32 {
            let before = Duration::from_millis((100u64 << failures.min(6)).min(5_000));
            assert_eq!(STORE_WRITE.delay(failures), before, "failure {failures}");
        }
        assert_eq!(schedule(&STORE_WRITE, 6), [200, 400, 800, 1600, 3200, 5000]);
    }

    /// The inbox reconnects with the delays of the formula it replaced, to the nanosecond:
    /// `100 ms << min(failures, 7)`, capped at 10 s.
    #[test]
    fn inbox_reconnects_exactly_as_before() {
        for failures in 1..=40u32 {
            let before = Duration::from_millis((100u64 << failures.min(7)).min(10_000));
            assert_eq!(
                INBOX_RECONNECT.delay(failures),
                before,
                "failure {failures}"
            );
        }
    }

    #[test]
    fn configured_schedules_convert_both_ways() {
        let cfg = BackoffConfig::from(INBOX_HOLD);
        assert_eq!(Policy::from(&cfg), INBOX_HOLD);
        assert!(cfg.validate().is_ok());
        for p in [ENGINE_START, RECONNECT, CLAIM, STORE_WRITE, INBOX_RECONNECT] {
            assert!(BackoffConfig::from(p).validate().is_ok(), "{p:?}");
        }
    }

    #[test]
    fn grows_exponentially_then_caps() {
        let p = policy(100, 1000, 2.0, 0.0);
        assert_eq!(schedule(&p, 6), [100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn no_jitter_is_exact() {
        let p = policy(100, 1000, 3.0, 0.0);
        assert_eq!(p.delay(2), Duration::from_millis(300));
        assert_eq!(
            delay(&BackoffConfig::from(p), 2),
            Duration::from_millis(300)
        );
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let p = policy(1, 60_000, 10.0, 0.5);
        assert_eq!(p.base(u32::MAX), Duration::from_millis(60_000));
        assert!(p.delay(u32::MAX) <= Duration::from_millis(60_000));
    }

    proptest! {
        #[test]
        fn never_past_max_and_within_jitter(
            initial in 1u64..10_000,
            extra in 0u64..1_000_000,
            multiplier in 1.0f64..10.0,
            jitter in 0.0f64..=1.0,
            attempt in 1u32..200,
            seed in any::<u64>(),
        ) {
            let p = policy(initial, initial + extra, multiplier, jitter);
            prop_assert!(BackoffConfig::from(p).validate().is_ok());
            let mut rng = StdRng::seed_from_u64(seed);
            let d = p.delay_with(attempt, &mut rng);
            let base = p.base(attempt);
            prop_assert!(d <= p.max, "{d:?} > max {:?}", p.max);
            prop_assert!(base <= p.max);
            let low = base.as_secs_f64() * (1.0 - jitter) - 1e-6;
            let high = base.as_secs_f64() * (1.0 + jitter) + 1e-6;
            prop_assert!(d.as_secs_f64() >= low && d.as_secs_f64() <= high);
        }

        #[test]
        fn base_is_monotonic(
            initial in 1u64..10_000,
            extra in 0u64..1_000_000,
            multiplier in 1.0f64..10.0,
            attempt in 1u32..100,
        ) {
            let p = policy(initial, initial + extra, multiplier, 0.0);
            prop_assert!(p.base(attempt) <= p.base(attempt + 1));
        }

        /// Each named policy stays within its jitter of its base delay and under its cap.
        #[test]
        fn named_policies_stay_within_jitter_and_cap(failures in 1u32..100, seed in any::<u64>()) {
            let mut rng = StdRng::seed_from_u64(seed);
            for p in [ENGINE_START, RECONNECT, CLAIM, STORE_WRITE, INBOX_RECONNECT, INBOX_HOLD, INBOX_FAILURE] {
                let base = p.base(failures).as_secs_f64();
                let d = p.delay_with(failures, &mut rng);
                prop_assert!(d <= p.max);
                prop_assert!(d.as_secs_f64() >= base * (1.0 - p.jitter) - 1e-6);
                prop_assert!(d.as_secs_f64() <= base * (1.0 + p.jitter) + 1e-6);
            }
        }
    }
}
