//! What the engine tells the world: events on a broadcast channel and running counters.
//!
//! Events are announced only after the fact they report is durable (a `Confirmed` event
//! follows the committed UPDATE), so an application or a test can await a message's
//! outcome instead of sleeping (River's "test signals"). Counters feed the periodic summary
//! log and `EngineHandle::counters`.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use uuid::Uuid;

/// Something that happened in the engine.
#[derive(Debug, Clone)]
pub enum EngineEvent {
    /// The publisher connected (or reconnected) to the broker.
    BrokerConnected,
    /// The broker connection was lost; unconfirmed messages go back to `retrying`.
    BrokerDisconnected(String),
    /// The broker blocked publishers (memory or disk alarm).
    BrokerBlocked(String),
    /// The broker unblocked publishers.
    BrokerUnblocked,
    /// The LISTEN self-check finished: `receiving` is false behind a pooler that drops
    /// notifications (the engine then relies on the sweep).
    ListenerReady {
        /// Whether the engine's own NOTIFY came back.
        receiving: bool,
    },
    /// Rows were claimed.
    Claimed(usize),
    /// Messages were written to the broker (confirms pending).
    Published(usize),
    /// These messages are durably `confirmed`.
    Confirmed(Arc<Vec<Uuid>>),
    /// These messages are durably `retrying`, with the reason.
    Retrying(Arc<Vec<(Uuid, String)>>),
    /// These messages are durably in `dead_letters`, with the reason.
    DeadLettered(Arc<Vec<(Uuid, String)>>),
    /// The engine stopped claiming and is draining.
    ShuttingDown,
}

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

/// A copy of [`Counters`] at one instant.
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

/// The sending side shared by the actors.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Event fan-out; sending with no receiver is fine.
    pub events: tokio::sync::broadcast::Sender<EngineEvent>,
    /// Shared counters.
    pub counters: Arc<Counters>,
    /// Set when a graceful shutdown begins: nothing new is published.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Broker link state: 0 disconnected, 1 connected, 2 blocked.
    pub broker: Arc<std::sync::atomic::AtomicU8>,
    /// Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Whether the engine's registry beat is recent enough to publish.
    pub liveness: Liveness,
}

/// The engine's own view of its registry heartbeat. Another engine declares it dead once its
/// beat is `scheduler.engine_timeout` old by the database's clock; the engine stops claiming
/// and publishing once its last successful beat was *sent* longer ago than half of that by
/// its own monotonic clock, so it stops before anyone can take its rows over, whatever the
/// round trip or a freeze (`SIGSTOP`, a long pause) did meanwhile. Without a registry (no
/// beat recorded) it never stops.
#[derive(Debug, Clone)]
pub struct Liveness {
    origin: std::time::Instant,
    /// Milliseconds after `origin` until which the engine may publish.
    fresh_until: Arc<AtomicU64>,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            origin: std::time::Instant::now(),
            fresh_until: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

impl Liveness {
    /// A beat sent at `sent` succeeded: the engine may publish for `window` from then.
    pub fn beat(&self, sent: std::time::Instant, window: std::time::Duration) {
        let until = sent.saturating_duration_since(self.origin) + window;
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        self.fresh_until.store(ms, Ordering::SeqCst);
    }

    /// Whether the last successful beat is recent enough to claim and publish.
    pub fn fresh(&self) -> bool {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        now < self.fresh_until.load(Ordering::SeqCst)
    }
}

/// [`Signals::broker`] values.
pub mod broker_state {
    /// No connection.
    pub const DISCONNECTED: u8 = 0;
    /// Connected and accepting publishes.
    pub const CONNECTED: u8 = 1;
    /// Connected but blocked by a broker alarm.
    pub const BLOCKED: u8 = 2;
}

impl Signals {
    /// A fresh set with room for `capacity` unread events per receiver.
    pub fn new(capacity: usize) -> Signals {
        let (events, _) = tokio::sync::broadcast::channel(capacity);
        Signals {
            events,
            counters: Arc::new(Counters::default()),
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            broker: Arc::new(std::sync::atomic::AtomicU8::new(broker_state::DISCONNECTED)),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            liveness: Liveness::default(),
        }
    }

    /// Records the broker link state.
    pub fn set_broker(&self, state: u8) {
        self.broker.store(state, Ordering::SeqCst);
    }

    /// The broker link state (see [`broker_state`]).
    pub fn broker_state(&self) -> u8 {
        self.broker.load(Ordering::SeqCst)
    }

    /// Whether a graceful shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Announces an event (dropped when nobody listens).
    pub fn emit(&self, event: EngineEvent) {
        let _ = self.events.send(event);
    }
}
