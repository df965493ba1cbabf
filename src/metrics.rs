//! Prometheus metrics, one registry per engine (several engines in one process, as in the
//! tests, do not share counters). The actors update them through `events::Signals`, where
//! the facts are decided, together with the matching counters and events; outbox depth, the oldest pending age and the engines by state come from the database at
//! scrape time.
//!
//! The `exchange` label is bounded: an exchange name is a producer's free text, and a
//! label per name would let any producer grow the registry (and every scrape) without end.
//! An exchange gets its own label once the broker has confirmed a message to it (so it
//! exists), for at most [`MAX_EXCHANGE_LABELS`] names per engine; everything else —
//! exchanges that do not exist, publishes before an exchange's first confirm, names past
//! the cap — counts under [`OTHER_EXCHANGE`].

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
    time::Duration,
};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::store::{EngineRecord, Stats};

/// Most distinct `exchange` label values per engine (besides `_other`).
pub const MAX_EXCHANGE_LABELS: usize = 100;

/// The `exchange` label of everything not (yet) given its own.
pub const OTHER_EXCHANGE: &str = "_other";

/// The exchanges that have earned their own label (confirmed by the broker), bounded.
#[derive(Default)]
struct ExchangeLabels {
    known: RwLock<HashSet<String>>,
    /// Every counter by exchange: an exchange admitted gets its series in all of them at
    /// once, at 0. A series that first appears already at 1 is never seen by `increase()`,
    /// so the first dead letter to a newly labelled exchange would raise no alert.
    families: RwLock<Vec<IntCounterVec>>,
}

impl ExchangeLabels {
    /// The label for `exchange`: its name if it has one, else [`OTHER_EXCHANGE`].
    fn label<'a>(&self, exchange: &'a str) -> &'a str {
        match self.known.read() {
            Ok(known) if known.contains(exchange) => exchange,
            _ => OTHER_EXCHANGE,
        }
    }

    /// Gives `exchange` its own label if there is room; returns its label.
    fn admit<'a>(&self, exchange: &'a str) -> &'a str {
        if self.label(exchange) == exchange && exchange != OTHER_EXCHANGE {
            return exchange;
        }
        match self.known.write() {
            Ok(mut known) if known.len() < MAX_EXCHANGE_LABELS && exchange != OTHER_EXCHANGE => {
                if known.insert(exchange.to_string()) {
                    if let Ok(families) = self.families.read() {
                        for family in families.iter() {
                            family.with_label_values(&[exchange]);
                        }
                    }
                }
                exchange
            }
            _ => OTHER_EXCHANGE,
        }
    }
}

/// A counter by `exchange` whose label values are bounded (see the module doc). Used like a
/// `prometheus::IntCounterVec`: `metrics.published.with_label_values(&[exchange]).inc()`.
#[derive(Clone)]
pub struct ExchangeCounter {
    inner: IntCounterVec,
    labels: Arc<ExchangeLabels>,
    /// A count here proves the exchange exists (a broker confirm): it earns its label.
    admits: bool,
}

impl ExchangeCounter {
    /// The counter for `values[0]`, an exchange name, under its bounded label.
    pub fn with_label_values<V: AsRef<str>>(&self, values: &[V]) -> IntCounter {
        let exchange = values.first().map(AsRef::as_ref).unwrap_or_default();
        let label = if self.admits {
            self.labels.admit(exchange)
        } else {
            self.labels.label(exchange)
        };
        self.inner.with_label_values(&[label])
    }
}

/// Every metric Courier exports.
pub struct Metrics {
    registry: Registry,
    /// Publishes written to the broker, by exchange.
    pub published: ExchangeCounter,
    /// Acks that made a message confirmed, by exchange (a confirm earns the exchange its
    /// own label).
    pub confirmed: ExchangeCounter,
    /// `basic.nack`s, by exchange.
    pub nacked: ExchangeCounter,
    /// Unroutable returns, by exchange.
    pub returned: ExchangeCounter,
    /// Confirms that never came, by exchange.
    pub timed_out: ExchangeCounter,
    /// Failed attempts sent back to `retrying`, by exchange.
    pub retried: ExchangeCounter,
    /// Messages moved to `dead_letters`, by exchange.
    pub dead_lettered: ExchangeCounter,
    /// Messages published and awaiting a confirm.
    pub in_flight: IntGauge,
    /// Rows the engine may hold claimed and unsettled now (the measured window).
    pub window: IntGauge,
    /// Outbox rows by status (read at scrape).
    pub outbox_rows: IntGaugeVec,
    /// Rows in `dead_letters` (read at scrape).
    pub dead_letter_rows: IntGauge,
    /// Age of the oldest undelivered row in seconds (read at scrape).
    pub oldest_pending_age: Gauge,
    /// Commit → confirm latency in seconds.
    pub latency: Histogram,
    /// Broker reconnects.
    pub reconnects: IntCounter,
    /// Seconds spent blocked by the broker (memory or disk alarm), counted when the block
    /// ends.
    pub blocked_seconds: prometheus::Counter,
    /// 1 while a publishing connection is open (blocked or not), else 0.
    pub broker_up: IntGauge,
    /// 1 while the broker blocks publishers (memory or disk alarm) now, else 0: an alert
    /// on a block that lasts minutes reads this, not the counter above.
    pub broker_blocked: IntGauge,
    /// 1 when the database answered this scrape's reads, else 0: the gauges read from it
    /// then keep their last values, which say nothing about now.
    pub database_up: IntGauge,
    /// Engines of the registry by state, `running` or `dead` (read at scrape).
    pub engines: IntGaugeVec,
    /// Other engines this one declared dead.
    pub engines_rescued: IntCounter,
    /// Rows freed from engines this one declared dead.
    pub rows_rescued: IntCounter,
    /// Times this engine found itself declared dead and rejoined.
    pub rejoins: IntCounter,
    /// Returns that arrived after their message was settled (README, What Courier guarantees).
    pub late_returns: IntCounter,
}

fn counter_vec(
    registry: &Registry,
    labels: &Arc<ExchangeLabels>,
    name: &str,
    help: &str,
) -> ExchangeCounter {
    let c = IntCounterVec::new(Opts::new(name, help).namespace("courier"), &["exchange"])
        .expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    // Exported at 0 from the start: a dashboard or alert reading `rate()` of a counter
    // that has never counted gets 0, not "no data".
    c.with_label_values(&[OTHER_EXCHANGE]);
    if let Ok(mut families) = labels.families.write() {
        families.push(c.clone());
    }
    ExchangeCounter {
        inner: c,
        labels: labels.clone(),
        admits: false,
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let labels = Arc::new(ExchangeLabels::default());
        let in_flight = IntGauge::with_opts(
            Opts::new("in_flight", "messages published and awaiting a confirm")
                .namespace("courier"),
        )
        .expect("valid metric");
        let window = IntGauge::with_opts(
            Opts::new(
                "in_flight_window",
                "rows the engine may hold claimed and unsettled (measured, capped by publisher.max_in_flight)",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        let outbox_rows = IntGaugeVec::new(
            Opts::new("outbox_rows", "outbox rows by status").namespace("courier"),
            &["status"],
        )
        .expect("valid metric");
        let dead_letter_rows = IntGauge::with_opts(
            Opts::new("dead_letter_rows", "rows in dead_letters").namespace("courier"),
        )
        .expect("valid metric");
        let oldest_pending_age = Gauge::with_opts(
            Opts::new(
                "oldest_pending_age_seconds",
                "age of the oldest row not yet confirmed",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        let latency = Histogram::with_opts(
            HistogramOpts::new(
                "commit_to_confirm_seconds",
                "time from the producer's commit to the broker's confirm",
            )
            .namespace("courier")
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0,
            ]),
        )
        .expect("valid metric");
        let reconnects = IntCounter::with_opts(
            Opts::new("broker_reconnects_total", "broker reconnects").namespace("courier"),
        )
        .expect("valid metric");
        let blocked_seconds = prometheus::Counter::with_opts(
            Opts::new(
                "broker_blocked_seconds_total",
                "seconds publishers were blocked by the broker",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        let engines = IntGaugeVec::new(
            Opts::new("engines", "engines of the registry by state").namespace("courier"),
            &["state"],
        )
        .expect("valid metric");
        let engines_rescued = IntCounter::with_opts(
            Opts::new(
                "engines_rescued_total",
                "engines this one declared dead (their rows freed)",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        let rows_rescued = IntCounter::with_opts(
            Opts::new(
                "rows_rescued_total",
                "in-flight rows freed from engines this one declared dead",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        let broker_up = IntGauge::with_opts(
            Opts::new(
                "broker_up",
                "1 while a publishing connection to the broker is open (blocked or not)",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        let database_up = IntGauge::with_opts(
            Opts::new(
                "database_up",
                "1 when the database answered the scrape's reads; 0: the outbox gauges are stale",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        let broker_blocked = IntGauge::with_opts(
            Opts::new(
                "broker_blocked",
                "1 while the broker blocks publishers (memory or disk alarm)",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        let rejoins = IntCounter::with_opts(
            Opts::new(
                "rejoins_total",
                "times this engine found itself declared dead and rejoined",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        let late_returns = IntCounter::with_opts(
            Opts::new(
                "late_returns_total",
                "broker returns that arrived after their message was recorded confirmed",
            )
            .namespace("courier"),
        )
        .expect("valid metric");
        for m in [
            Box::new(in_flight.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(window.clone()),
            Box::new(outbox_rows.clone()),
            Box::new(dead_letter_rows.clone()),
            Box::new(oldest_pending_age.clone()),
            Box::new(latency.clone()),
            Box::new(reconnects.clone()),
            Box::new(blocked_seconds.clone()),
            Box::new(broker_up.clone()),
            Box::new(database_up.clone()),
            Box::new(broker_blocked.clone()),
            Box::new(engines.clone()),
            Box::new(engines_rescued.clone()),
            Box::new(rows_rescued.clone()),
            Box::new(rejoins.clone()),
            Box::new(late_returns.clone()),
        ] {
            registry.register(m).expect("unique metric");
        }
        Metrics {
            published: counter_vec(
                &registry,
                &labels,
                "published_total",
                "publishes written to the broker",
            ),
            confirmed: ExchangeCounter {
                admits: true,
                ..counter_vec(
                    &registry,
                    &labels,
                    "confirmed_total",
                    "messages confirmed by the broker",
                )
            },
            nacked: counter_vec(
                &registry,
                &labels,
                "nacked_total",
                "publishes nacked by the broker",
            ),
            returned: counter_vec(
                &registry,
                &labels,
                "returned_total",
                "publishes returned as unroutable",
            ),
            timed_out: counter_vec(
                &registry,
                &labels,
                "confirm_timeouts_total",
                "confirms that did not arrive in time",
            ),
            retried: counter_vec(
                &registry,
                &labels,
                "retried_total",
                "failed attempts sent back to retrying",
            ),
            dead_lettered: counter_vec(
                &registry,
                &labels,
                "dead_lettered_total",
                "messages moved to dead_letters",
            ),
            registry,
            in_flight,
            window,
            outbox_rows,
            dead_letter_rows,
            oldest_pending_age,
            latency,
            reconnects,
            blocked_seconds,
            broker_up,
            database_up,
            broker_blocked,
            engines,
            engines_rescued,
            rows_rescued,
            rejoins,
            late_returns,
        }
    }

    /// The `exchange` label `exchange` is counted under right now: its own name once the
    /// broker confirmed a message to it (within the cap), else [`OTHER_EXCHANGE`].
    #[cfg(test)]
    fn exchange_label<'a>(&self, exchange: &'a str) -> &'a str {
        self.published.labels.label(exchange)
    }

    /// Records the database's view (at scrape time).
    pub fn observe_stats(&self, stats: &Stats) {
        for (status, n) in &stats.outbox {
            self.outbox_rows
                .with_label_values(&[status.as_str()])
                .set(*n);
        }
        self.dead_letter_rows.set(stats.dead_letters);
        self.oldest_pending_age.set(
            stats
                .oldest_pending_age
                .unwrap_or(Duration::ZERO)
                .as_secs_f64(),
        );
    }

    /// Records the registry (at scrape time): both states always, zero included, so a
    /// dashboard's `courier_engines{state="dead"}` reads 0 rather than no data.
    pub fn observe_engines(&self, engines: &[EngineRecord]) {
        for state in ["running", "silent", "dead"] {
            let n = engines.iter().filter(|e| e.state == state).count();
            self.engines
                .with_label_values(&[state])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_labels_are_earned_by_a_confirm_and_bounded() {
        let m = Metrics::new();
        m.published.with_label_values(&["nowhere"]).inc();
        assert_eq!(m.exchange_label("nowhere"), OTHER_EXCHANGE);
        m.confirmed.with_label_values(&["orders"]).inc();
        assert_eq!(m.exchange_label("orders"), "orders");
        for i in 0..(MAX_EXCHANGE_LABELS * 2) {
            m.confirmed.with_label_values(&[&format!("ex{i}")]).inc();
            m.nacked.with_label_values(&[&format!("bogus{i}")]).inc();
        }
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("courier_confirmed_total{"))
            .count();
        assert_eq!(series, MAX_EXCHANGE_LABELS + 1, "the cap plus _other");
        assert!(
            !text.contains("bogus"),
            "unconfirmed names never become labels"
        );
        assert!(text.contains("courier_nacked_total{exchange=\"_other\"} 200"));
    }

    #[test]
    fn an_admitted_exchange_starts_at_zero_in_every_counter() {
        let m = Metrics::new();
        m.confirmed.with_label_values(&["orders"]).inc();
        let text = m.render();
        for family in [
            "published",
            "nacked",
            "returned",
            "confirm_timeouts",
            "retried",
            "dead_lettered",
        ] {
            let series = format!("courier_{family}_total{{exchange=\"orders\"}} 0");
            assert!(text.contains(&series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn engines_are_counted_by_state_zero_included() {
        let m = Metrics::new();
        let at = chrono::Utc::now();
        let engine = |state: &str| EngineRecord {
            id: format!("e-{state}"),
            host: "h".into(),
            pid: 1,
            version: "0".into(),
            started_at: at,
            heartbeat_at: at,
            since_beat_ms: 0,
            state: state.into(),
            holds: 0,
        };
        m.observe_engines(&[engine("running"), engine("running")]);
        let text = m.render();
        assert!(
            text.contains("courier_engines{state=\"running\"} 2"),
            "{text}"
        );
        assert!(text.contains("courier_engines{state=\"dead\"} 0"), "{text}");
        m.observe_engines(&[engine("dead")]);
        let text = m.render();
        assert!(
            text.contains("courier_engines{state=\"running\"} 0"),
            "{text}"
        );
        assert!(text.contains("courier_engines{state=\"dead\"} 1"), "{text}");
        for counter in [
            "courier_engines_rescued_total 0",
            "courier_rows_rescued_total 0",
            "courier_rejoins_total 0",
            "courier_late_returns_total 0",
        ] {
            assert!(text.contains(counter), "{counter} in {text}");
        }
    }
}
