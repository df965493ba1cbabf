//! The running totals behind the summary log, `EngineHandle::counters` and
//! `GET /api/stats`; only [`Signals`](super::Signals) adds to them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Running totals since the engine started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Rows claimed.
    pub claimed: AtomicU64,
    /// Claim rounds that failed (database unreachable); each is followed by a backoff.
    pub claim_failures: AtomicU64,
    /// Publishes written to the broker.
    pub published: AtomicU64,
    /// Acks received (before their write; see `confirmed`).
    pub acked: AtomicU64,
    /// Messages recorded `confirmed`.
    pub confirmed: AtomicU64,
    /// Confirms that were `basic.nack`.
    pub nacked: AtomicU64,
    /// Messages returned as unroutable.
    pub returned: AtomicU64,
    /// Confirms that did not arrive in time.
    pub timed_out: AtomicU64,
    /// Confirms lost with a channel or connection.
    pub channel_lost: AtomicU64,
    /// Messages that could not be published at all.
    pub rejected: AtomicU64,
    /// Messages recorded `retrying`.
    pub retried: AtomicU64,
    /// Messages moved to `dead_letters`.
    pub dead_lettered: AtomicU64,
    /// Returns that arrived after their message was already recorded confirmed
    /// (should stay 0; see the ConfirmTracker).
    pub late_returns: AtomicU64,
    /// Returns that lapin delivered on another message's confirm (correlated by id).
    pub returns_on_other_confirm: AtomicU64,
    /// Broker reconnects.
    pub reconnects: AtomicU64,
    /// Publishing channels the broker closed (and the publisher replaced).
    pub channel_closes: AtomicU64,
    /// Engines this one declared dead (their rows taken over).
    pub engines_rescued: AtomicU64,
    /// Rows freed from engines declared dead.
    pub rows_rescued: AtomicU64,
    /// Times this engine found itself declared dead and rejoined.
    pub rejoins: AtomicU64,
    /// Publishing channels replaced because the broker nacked everything on them for a while
    /// (a quorum queue's stale leader after a node loss; see the Publisher).
    pub channels_replaced: AtomicU64,
    /// Confirmed rows removed by retention.
    pub retention_removed: AtomicU64,
    /// Messages published and not yet settled (gauge).
    pub in_flight: AtomicU64,
    /// The highest `in_flight` seen.
    pub peak_in_flight: AtomicU64,
    /// The most payload bytes held at once (claimed and not yet settled).
    pub peak_held_bytes: AtomicU64,
}

impl Counters {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A plain copy of every counter.
    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            claimed: get(&self.claimed),
            claim_failures: get(&self.claim_failures),
            published: get(&self.published),
            acked: get(&self.acked),
            confirmed: get(&self.confirmed),
            nacked: get(&self.nacked),
            returned: get(&self.returned),
            timed_out: get(&self.timed_out),
            channel_lost: get(&self.channel_lost),
            rejected: get(&self.rejected),
            retried: get(&self.retried),
            dead_lettered: get(&self.dead_lettered),
            late_returns: get(&self.late_returns),
            returns_on_other_confirm: get(&self.returns_on_other_confirm),
            reconnects: get(&self.reconnects),
            channel_closes: get(&self.channel_closes),
            channels_replaced: get(&self.channels_replaced),
            engines_rescued: get(&self.engines_rescued),
            rows_rescued: get(&self.rows_rescued),
            rejoins: get(&self.rejoins),
            retention_removed: get(&self.retention_removed),
            in_flight: get(&self.in_flight),
            peak_in_flight: get(&self.peak_in_flight),
            peak_held_bytes: get(&self.peak_held_bytes),
        }
    }
}

/// The engine's running totals at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[allow(missing_docs)]
pub struct CounterSnapshot {
    pub claimed: u64,
    pub claim_failures: u64,
    pub published: u64,
    pub acked: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub returned: u64,
    pub timed_out: u64,
    pub channel_lost: u64,
    pub rejected: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub late_returns: u64,
    pub returns_on_other_confirm: u64,
    pub reconnects: u64,
    pub channel_closes: u64,
    pub channels_replaced: u64,
    pub engines_rescued: u64,
    pub rows_rescued: u64,
    pub rejoins: u64,
    pub retention_removed: u64,
    pub in_flight: u64,
    pub peak_in_flight: u64,
    pub peak_held_bytes: u64,
}
