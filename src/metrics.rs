//! Prometheus metrics, one registry per engine (several engines in one process, as in the
//! tests, do not share counters). The actors update them where the facts are decided;
//! outbox depth and the oldest pending age come from the database at scrape time.

use std::time::Duration;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::store::Stats;

/// Every metric Courier exports.
pub struct Metrics {
    registry: Registry,
    /// Publishes written to the broker, by exchange.
    pub published: IntCounterVec,
    /// Acks that made a message confirmed, by exchange.
    pub confirmed: IntCounterVec,
    /// `basic.nack`s, by exchange.
    pub nacked: IntCounterVec,
    /// Unroutable returns, by exchange.
    pub returned: IntCounterVec,
    /// Confirms that never came, by exchange.
    pub timed_out: IntCounterVec,
    /// Failed attempts sent back to `retrying`, by exchange.
    pub retried: IntCounterVec,
    /// Messages moved to `dead_letters`, by exchange.
    pub dead_lettered: IntCounterVec,
    /// Messages published and awaiting a confirm.
    pub in_flight: IntGauge,
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
    /// Seconds spent blocked by the broker (memory or disk alarm).
    pub blocked_seconds: prometheus::Counter,
}

fn counter_vec(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help).namespace("courier"), &["exchange"])
        .expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let in_flight = IntGauge::with_opts(
            Opts::new("in_flight", "messages published and awaiting a confirm")
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
        for m in [
            Box::new(in_flight.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(outbox_rows.clone()),
            Box::new(dead_letter_rows.clone()),
            Box::new(oldest_pending_age.clone()),
            Box::new(latency.clone()),
            Box::new(reconnects.clone()),
            Box::new(blocked_seconds.clone()),
        ] {
            registry.register(m).expect("unique metric");
        }
        Metrics {
            published: counter_vec(
                &registry,
                "published_total",
                "publishes written to the broker",
            ),
            confirmed: counter_vec(
                &registry,
                "confirmed_total",
                "messages confirmed by the broker",
            ),
            nacked: counter_vec(&registry, "nacked_total", "publishes nacked by the broker"),
            returned: counter_vec(
                &registry,
                "returned_total",
                "publishes returned as unroutable",
            ),
            timed_out: counter_vec(
                &registry,
                "confirm_timeouts_total",
                "confirms that did not arrive in time",
            ),
            retried: counter_vec(
                &registry,
                "retried_total",
                "failed attempts sent back to retrying",
            ),
            dead_lettered: counter_vec(
                &registry,
                "dead_lettered_total",
                "messages moved to dead_letters",
            ),
            registry,
            in_flight,
            outbox_rows,
            dead_letter_rows,
            oldest_pending_age,
            latency,
            reconnects,
            blocked_seconds,
        }
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
