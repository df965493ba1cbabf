//! [`Signals`]: the one path from the actors to events, counters and metrics.

use std::{
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use uuid::Uuid;

use super::{BrokerState, CounterSnapshot, Counters, EngineEvent};
use crate::{
    message::OutboxMessage,
    metrics::{Metrics, OTHER_EXCHANGE},
    state::FailureReason,
};

/// The one telemetry path the actors share: each method reports one fact and updates the
/// events, counters and metrics that record it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Event fan-out; sending with no receiver is fine.
    events: tokio::sync::broadcast::Sender<EngineEvent>,
    counters: Arc<Counters>,
    metrics: Arc<Metrics>,
    /// The broker link (a [`BrokerState`]; atomic so the publish path reads it lock-free).
    broker: Arc<std::sync::atomic::AtomicU8>,
    /// Publishing connections open (`publisher.connections` of them when all is well): the
    /// engine is connected while one is.
    links_up: Arc<std::sync::atomic::AtomicUsize>,
    /// Why the broker refuses this engine (login, vhost, TLS), until it connects again.
    refusal: Arc<std::sync::Mutex<Option<String>>>,
}

impl Signals {
    /// A fresh set with room for `capacity` unread events per receiver.
    pub fn new(capacity: usize) -> Signals {
        let (events, _) = tokio::sync::broadcast::channel(capacity);
        Signals {
            events,
            counters: Arc::new(Counters::default()),
            metrics: Arc::new(Metrics::new()),
            broker: Arc::new(std::sync::atomic::AtomicU8::new(
                BrokerState::Disconnected.to_u8(),
            )),
            links_up: Arc::default(),
            refusal: Arc::default(),
        }
    }

    /// Events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<EngineEvent> {
        self.events.subscribe()
    }

    /// The counters now.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// The Prometheus metrics (the scrape adds the database's view).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The broker link state.
    pub fn broker_state(&self) -> BrokerState {
        BrokerState::from_u8(self.broker.load(Ordering::SeqCst))
    }

    /// Why the broker refuses this engine now (a fault no retry mends), if it does.
    pub fn broker_refusal(&self) -> Option<String> {
        self.refusal.lock().ok().and_then(|r| r.clone())
    }

    /// The broker refused the connection for `why` (login, vhost, TLS): kept for `/ready`
    /// until a connection succeeds.
    pub fn broker_refused(&self, why: String) {
        if let Ok(mut refusal) = self.refusal.lock() {
            *refusal = Some(why);
        }
    }

    fn set_broker(&self, state: BrokerState) {
        self.broker.store(state.to_u8(), Ordering::SeqCst);
        if state != BrokerState::Disconnected {
            if let Ok(mut refusal) = self.refusal.lock() {
                *refusal = None;
            }
        }
        let (up, blocked) = match state {
            BrokerState::Connected => (1, 0),
            BrokerState::Blocked => (1, 1),
            BrokerState::Disconnected => (0, 0),
        };
        self.metrics.broker_up.set(up);
        self.metrics.broker_blocked.set(blocked);
    }

    /// Announces an event (dropped when nobody listens).
    fn emit(&self, event: EngineEvent) {
        let _ = self.events.send(event);
    }

    // The Scheduler's facts.

    /// `n` rows were claimed; the engine now holds `held_bytes` payload bytes.
    pub fn claimed(&self, n: usize, held_bytes: u64) {
        self.counters
            .peak_held_bytes
            .fetch_max(held_bytes, Ordering::Relaxed);
        Counters::add(&self.counters.claimed, n);
        self.emit(EngineEvent::Claimed(n));
    }

    /// A claim round failed (the database is unreachable).
    pub fn claim_failed(&self) {
        Counters::add(&self.counters.claim_failures, 1);
    }

    /// The measured window is now `rows` rows.
    pub fn window(&self, rows: usize) {
        self.metrics.window.set(rows as i64);
    }

    /// The LISTEN self-check finished.
    pub fn listener_ready(&self, receiving: bool) {
        self.emit(EngineEvent::ListenerReady { receiving });
    }

    /// Claims stopped: the engine is draining.
    pub fn shutting_down(&self) {
        self.emit(EngineEvent::ShuttingDown);
    }

    // The Publisher's facts.

    /// A publishing connection opened: publishes may flow. (A block the broker announced
    /// holds for every connection until it lifts.)
    pub fn broker_connected(&self) {
        self.links_up.fetch_add(1, Ordering::SeqCst);
        if self.broker_state() != BrokerState::Blocked {
            self.set_broker(BrokerState::Connected);
        }
        self.emit(EngineEvent::BrokerConnected);
    }

    /// The connection that just opened replaces a lost one.
    pub fn reconnected(&self) {
        Counters::add(&self.counters.reconnects, 1);
        self.metrics.reconnects.inc();
    }

    /// A publishing connection was lost, for `why`: the engine is disconnected when it was
    /// the last one open.
    pub fn broker_disconnected(&self, why: String) {
        let was = self
            .links_up
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .unwrap_or(0);
        if was <= 1 {
            self.set_broker(BrokerState::Disconnected);
        }
        self.emit(EngineEvent::BrokerDisconnected(why));
    }

    /// The broker blocked publishers, for `reason` (each connection is told: the first
    /// tells).
    pub fn broker_blocked(&self, reason: String) {
        if self.broker_state() == BrokerState::Blocked {
            return;
        }
        self.set_broker(BrokerState::Blocked);
        self.emit(EngineEvent::BrokerBlocked(reason));
    }

    /// The broker unblocked publishers after `blocked_for` (when the block was seen; each
    /// connection is told: the first tells).
    pub fn broker_unblocked(&self, blocked_for: Option<Duration>) {
        if self.broker_state() != BrokerState::Blocked {
            return;
        }
        if let Some(blocked) = blocked_for {
            self.metrics.blocked_seconds.inc_by(blocked.as_secs_f64());
        }
        let state = if self.links_up.load(Ordering::SeqCst) > 0 {
            BrokerState::Connected
        } else {
            BrokerState::Disconnected
        };
        self.set_broker(state);
        self.emit(EngineEvent::BrokerUnblocked);
    }

    /// Messages to these exchanges were written to the broker (confirms pending).
    pub fn published<'a>(&self, exchanges: impl IntoIterator<Item = &'a str>) {
        let mut n = 0;
        for exchange in exchanges {
            self.metrics.published.with_label_values(&[exchange]).inc();
            n += 1;
        }
        Counters::add(&self.counters.published, n);
        if n > 0 {
            self.emit(EngineEvent::Published(n));
        }
    }

    /// The broker closed the publishing channel (the publisher opens another).
    pub fn channel_closed(&self) {
        Counters::add(&self.counters.channel_closes, 1);
    }

    /// The publisher replaced a channel the broker nacked everything on.
    pub fn channel_replaced(&self) {
        Counters::add(&self.counters.channels_replaced, 1);
    }

    // The ConfirmTracker's facts.

    /// One connection's tracker went from `was` to `now` messages published and awaiting
    /// a confirm (the gauge is the sum over the connections).
    pub fn in_flight(&self, was: usize, now: usize) {
        let (was, now) = (was as u64, now as u64);
        let moved = |n: u64| (n + now).saturating_sub(was);
        let before = self
            .counters
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(moved(n)))
            .unwrap_or_default();
        let n = moved(before);
        self.metrics.in_flight.set(n as i64);
        self.counters.peak_in_flight.fetch_max(n, Ordering::Relaxed);
    }

    /// The broker acked `message` (its `confirmed` write follows): the ack counts, and the
    /// commit-to-confirm latency is sampled.
    pub fn acked(&self, message: &OutboxMessage) {
        Counters::add(&self.counters.acked, 1);
        self.metrics
            .confirmed
            .with_label_values(&[message.exchange.as_str()])
            .inc();
        let age = chrono::Utc::now() - message.created_at;
        self.metrics
            .latency
            .observe(age.to_std().unwrap_or_default().as_secs_f64());
    }

    /// An attempt to publish to `exchange` failed for `reason`.
    pub fn failed(&self, exchange: &str, reason: &FailureReason) {
        let (c, m) = (&self.counters, &self.metrics);
        let (counter, metric) = match reason {
            FailureReason::Nacked | FailureReason::NackedUnavailable => {
                (&c.nacked, Some(&m.nacked))
            }
            FailureReason::Returned { .. } => (&c.returned, Some(&m.returned)),
            FailureReason::ConfirmTimeout(_) | FailureReason::ConfirmTimeoutUnavailable(_) => {
                (&c.timed_out, Some(&m.timed_out))
            }
            FailureReason::ChannelLost(_) | FailureReason::Unanswered(_) => (&c.channel_lost, None),
            FailureReason::Rejected(_)
            | FailureReason::Unpublishable(_)
            | FailureReason::Refused { .. }
            | FailureReason::ClosedConnection { .. }
            | FailureReason::LeaseExpired => (&c.rejected, None),
        };
        Counters::add(counter, 1);
        if let Some(metric) = metric {
            metric.with_label_values(&[exchange]).inc();
        }
    }

    /// A failed message to `exchange` goes back to `retrying` (its write follows).
    pub fn retry_decided(&self, exchange: &str) {
        self.metrics.retried.with_label_values(&[exchange]).inc();
    }

    /// A return arrived on another message's confirm (correlated by id).
    pub fn return_on_other_confirm(&self) {
        Counters::add(&self.counters.returns_on_other_confirm, 1);
    }

    /// A return arrived for a message no longer in flight.
    pub fn late_return(&self) {
        Counters::add(&self.counters.late_returns, 1);
        self.metrics.late_returns.inc();
    }

    // Durable outcomes (the Store and DeadLetter actors, after their writes commit).

    /// These rows are durably `confirmed`, and these durably `retrying` (with the reason).
    pub fn recorded(&self, confirmed: Vec<Uuid>, retrying: Vec<(Uuid, String)>) {
        Counters::add(&self.counters.confirmed, confirmed.len());
        Counters::add(&self.counters.retried, retrying.len());
        if !confirmed.is_empty() {
            self.emit(EngineEvent::Confirmed(Arc::new(confirmed)));
        }
        if !retrying.is_empty() {
            self.emit(EngineEvent::Retrying(Arc::new(retrying)));
        }
    }

    /// These rows were moved to `dead_letters` at claim, never publishable (no exchange
    /// label: the claim reads no more than the id and the reason).
    pub fn dead_lettered_at_claim(&self, rows: &[(Uuid, String)]) {
        self.metrics
            .dead_lettered
            .with_label_values(&[OTHER_EXCHANGE])
            .inc_by(rows.len() as u64);
        Counters::add(&self.counters.rejected, rows.len());
        Counters::add(&self.counters.dead_lettered, rows.len());
        self.emit(EngineEvent::DeadLettered(Arc::new(rows.to_vec())));
    }

    /// These rows, to these exchanges, are durably in `dead_letters` (with the reason).
    pub fn dead_lettered<'a>(
        &self,
        rows: Vec<(Uuid, String)>,
        exchanges: impl IntoIterator<Item = &'a str>,
    ) {
        for exchange in exchanges {
            self.metrics
                .dead_lettered
                .with_label_values(&[exchange])
                .inc();
        }
        Counters::add(&self.counters.dead_lettered, rows.len());
        if !rows.is_empty() {
            self.emit(EngineEvent::DeadLettered(Arc::new(rows)));
        }
    }

    // The Heartbeat's and Retention's facts.

    /// This engine had been declared dead and rejoined.
    pub fn rejoined(&self) {
        Counters::add(&self.counters.rejoins, 1);
        self.metrics.rejoins.inc();
    }

    /// This engine declared another dead and freed the `rows` it held.
    pub fn rescued(&self, rows: i64) {
        Counters::add(&self.counters.engines_rescued, 1);
        Counters::add(
            &self.counters.rows_rescued,
            usize::try_from(rows).unwrap_or(0),
        );
        self.metrics.engines_rescued.inc();
        self.metrics
            .rows_rescued
            .inc_by(u64::try_from(rows).unwrap_or(0));
    }

    /// Retention removed `n` confirmed rows.
    pub fn retention_removed(&self, n: usize) {
        Counters::add(&self.counters.retention_removed, n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next(rx: &mut tokio::sync::broadcast::Receiver<EngineEvent>) -> Option<EngineEvent> {
        rx.try_recv().ok()
    }

    #[test]
    fn a_failure_counts_once_and_labels_what_it_always_labelled() {
        let signals = Signals::new(16);
        signals.failed("orders", &FailureReason::Nacked);
        signals.failed("orders", &FailureReason::ChannelLost("gone".into()));
        signals.failed("orders", &FailureReason::LeaseExpired);
        let c = signals.counters();
        assert_eq!((c.nacked, c.channel_lost, c.rejected), (1, 1, 1));
        let text = signals.metrics().render();
        assert!(
            text.contains("courier_nacked_total{exchange=\"_other\"} 1"),
            "{text}"
        );
        // Not a return: that counter stays at the 0 it is exported with.
        assert!(
            text.contains("courier_returned_total{exchange=\"_other\"} 0"),
            "{text}"
        );
    }

    #[test]
    fn publishes_and_acks_update_counters_metrics_and_events_together() {
        let signals = Signals::new(16);
        let mut rx = signals.subscribe();
        signals.published(["orders", "orders"]);
        signals.published(std::iter::empty());
        assert!(matches!(next(&mut rx), Some(EngineEvent::Published(2))));
        assert!(
            next(&mut rx).is_none(),
            "nothing published, nothing announced"
        );
        signals.acked(&OutboxMessage::new("orders", "k", vec![]));
        let c = signals.counters();
        assert_eq!((c.published, c.acked, c.confirmed), (2, 1, 0));
        let text = signals.metrics().render();
        assert!(
            text.contains("courier_confirmed_total{exchange=\"orders\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("courier_commit_to_confirm_seconds_count 1"),
            "{text}"
        );
    }

    #[test]
    fn durable_outcomes_count_then_announce() {
        let signals = Signals::new(16);
        let mut rx = signals.subscribe();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        signals.recorded(vec![a], vec![(b, "nacked".into())]);
        signals.dead_lettered(vec![(b, "why".into())], ["orders"]);
        let c = signals.counters();
        assert_eq!((c.confirmed, c.retried, c.dead_lettered), (1, 1, 1));
        assert!(matches!(next(&mut rx), Some(EngineEvent::Confirmed(ids)) if *ids == [a]));
        assert!(matches!(next(&mut rx), Some(EngineEvent::Retrying(rows)) if rows[0].0 == b));
        assert!(matches!(next(&mut rx), Some(EngineEvent::DeadLettered(rows)) if rows[0].0 == b));
    }

    #[test]
    fn the_broker_state_follows_its_events() {
        let signals = Signals::new(16);
        let mut rx = signals.subscribe();
        assert_eq!(signals.broker_state(), BrokerState::Disconnected);
        signals.broker_connected();
        assert_eq!(signals.broker_state(), BrokerState::Connected);
        signals.broker_blocked("memory".into());
        assert_eq!(signals.broker_state().as_str(), "blocked");
        let text = signals.metrics().render();
        assert!(text.contains("courier_broker_blocked 1"), "{text}");
        assert!(text.contains("courier_broker_up 1"), "{text}");
        signals.broker_unblocked(Some(Duration::from_secs(2)));
        assert_eq!(signals.broker_state(), BrokerState::Connected);
        signals.broker_disconnected("gone".into());
        assert_eq!(signals.broker_state(), BrokerState::Disconnected);
        assert!(matches!(next(&mut rx), Some(EngineEvent::BrokerConnected)));
        assert!(matches!(next(&mut rx), Some(EngineEvent::BrokerBlocked(_))));
        assert!(matches!(next(&mut rx), Some(EngineEvent::BrokerUnblocked)));
        assert!(matches!(
            next(&mut rx),
            Some(EngineEvent::BrokerDisconnected(_))
        ));
        let text = signals.metrics().render();
        assert!(
            text.contains("courier_broker_blocked_seconds_total 2"),
            "{text}"
        );
        assert!(text.contains("courier_broker_blocked 0"), "{text}");
        assert!(text.contains("courier_broker_up 0"), "{text}");
    }

    #[test]
    fn several_connections_make_one_state_and_one_gauge() {
        let signals = Signals::new(16);
        signals.broker_connected();
        signals.broker_connected();
        signals.broker_disconnected("one of two".into());
        assert_eq!(signals.broker_state(), BrokerState::Connected);
        // The broker blocks every connection: one episode, counted once.
        signals.broker_blocked("memory".into());
        signals.broker_blocked("memory".into());
        signals.broker_unblocked(Some(Duration::from_secs(3)));
        signals.broker_unblocked(Some(Duration::from_secs(3)));
        let text = signals.metrics().render();
        assert!(
            text.contains("courier_broker_blocked_seconds_total 3"),
            "{text}"
        );
        signals.broker_disconnected("the other".into());
        assert_eq!(signals.broker_state(), BrokerState::Disconnected);

        signals.in_flight(0, 30);
        signals.in_flight(0, 20);
        signals.in_flight(30, 5);
        let c = signals.counters();
        assert_eq!((c.in_flight, c.peak_in_flight), (25, 50));
    }
}
