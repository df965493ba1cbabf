//! The retry delay schedule: exponential, capped, with jitter, never past the cap.
//!
//! Jitter spreads the retries of messages that failed together (a broker restart fails
//! thousands at once) so they do not all come back in the same instant.

use std::time::Duration;

use rand::Rng;

use crate::config::BackoffConfig;

/// The delay before the attempt after failed attempt number `attempt` (1-based), before
/// jitter: `initial * multiplier^(attempt-1)`, capped at `max`.
pub fn base_delay(cfg: &BackoffConfig, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(1024) as i32;
    let secs = cfg.initial.as_secs_f64() * cfg.multiplier.powi(exp);
    let max = cfg.max.as_secs_f64();
    if !secs.is_finite() || secs >= max {
        cfg.max
    } else {
        Duration::from_secs_f64(secs)
    }
}

/// `base_delay` spread by ± `jitter` (a fraction), never above `max` and never negative.
pub fn delay_with<R: Rng + ?Sized>(cfg: &BackoffConfig, attempt: u32, rng: &mut R) -> Duration {
    let base = base_delay(cfg, attempt).as_secs_f64();
    let spread = if cfg.jitter > 0.0 {
        rng.gen_range(-cfg.jitter..=cfg.jitter)
    } else {
        0.0
    };
    let secs = (base * (1.0 + spread)).clamp(0.0, cfg.max.as_secs_f64());
    Duration::from_secs_f64(secs)
}

/// `delay_with` using the thread's random generator.
pub fn delay(cfg: &BackoffConfig, attempt: u32) -> Duration {
    delay_with(cfg, attempt, &mut rand::thread_rng())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn cfg(initial_ms: u64, max_ms: u64, multiplier: f64, jitter: f64) -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(initial_ms),
            max: Duration::from_millis(max_ms),
            multiplier,
            jitter,
        }
    }

    #[test]
    fn grows_exponentially_then_caps() {
        let c = cfg(100, 1000, 2.0, 0.0);
        let ms: Vec<u128> = (1..=6).map(|a| base_delay(&c, a).as_millis()).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn no_jitter_is_exact() {
        let c = cfg(100, 1000, 3.0, 0.0);
        assert_eq!(delay(&c, 2), Duration::from_millis(300));
    }

    #[test]
    fn huge_attempt_numbers_do_not_overflow() {
        let c = cfg(1, 60_000, 10.0, 0.5);
        assert_eq!(base_delay(&c, u32::MAX), Duration::from_millis(60_000));
        assert!(delay(&c, u32::MAX) <= Duration::from_millis(60_000));
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
            let c = cfg(initial, initial + extra, multiplier, jitter);
            prop_assert!(c.validate().is_ok());
            let mut rng = StdRng::seed_from_u64(seed);
            let d = delay_with(&c, attempt, &mut rng);
            let base = base_delay(&c, attempt);
            prop_assert!(d <= c.max, "{d:?} > max {:?}", c.max);
            prop_assert!(base <= c.max);
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
            let c = cfg(initial, initial + extra, multiplier, 0.0);
            prop_assert!(base_delay(&c, attempt) <= base_delay(&c, attempt + 1));
        }
    }
}
