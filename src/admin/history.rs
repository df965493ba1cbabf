//! The rate chart's history, kept by the server: the engine's publish and confirm counters
//! sampled every [`SAMPLE_EVERY`] for the last [`KEPT`], so a reloaded dashboard (or a second
//! operator opening it) sees the last half hour at once instead of starting empty.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use crate::EngineHandle;

/// How often the counters are sampled (the dashboard refreshes as often).
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// How much history is kept.
const KEPT: Duration = Duration::from_secs(30 * 60);

/// One sample: when (Unix seconds) and the engine's running totals then.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(super) struct Sample {
    t: f64,
    published: u64,
    confirmed: u64,
}

/// The samples, oldest first, bounded by [`KEPT`].
#[derive(Debug, Default)]
pub(super) struct RateHistory {
    samples: VecDeque<Sample>,
}

impl RateHistory {
    fn push(&mut self, sample: Sample) {
        let most = (KEPT.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
        while self.samples.len() >= most {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// `/api/rates`: the sampling interval and every sample kept.
    pub(super) fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "interval_seconds": SAMPLE_EVERY.as_secs_f64(),
            "samples": self.samples,
        })
    }
}

/// Samples `engine` into `history` until the admin server (the history's owner) is gone.
pub(super) fn start(engine: EngineHandle, history: &Arc<Mutex<RateHistory>>) {
    let history: Weak<Mutex<RateHistory>> = Arc::downgrade(history);
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        loop {
            tick.tick().await;
            let Some(history) = history.upgrade() else {
                return;
            };
            let c = engine.counters();
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let sample = Sample {
                t,
                published: c.published,
                confirmed: c.confirmed,
            };
            if let Ok(mut h) = history.lock() {
                h.push(sample);
            };
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_is_bounded_to_the_last_half_hour() {
        let mut h = RateHistory::default();
        for i in 0..2_000 {
            h.push(Sample {
                t: f64::from(i),
                published: 0,
                confirmed: 0,
            });
        }
        assert_eq!(h.samples.len(), 900);
        assert_eq!(h.samples.front().map(|s| s.t), Some(1_100.0));
    }
}
