//! Whether this engine may claim and publish right now: its registry beat is fresh
//! ([`Liveness`]) and no graceful stop has begun ([`Shutdown`]).
//!
//! Both are read on the publish path by several actors at once and written from outside
//! them (the Heartbeat's beat, `EngineHandle::shutdown`), so they are shared atomics
//! rather than actor messages: a `Publish` already in the Publisher's mailbox when the
//! shutdown begins must see it, not a message queued behind it.

use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Arc,
};

/// The engine's standing, cloned into each actor that gates on it. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Lifecycle {
    /// Whether the registry beat is recent enough to claim and publish.
    pub liveness: Liveness,
    /// Whether a graceful shutdown has begun.
    pub shutdown: Shutdown,
}

/// A graceful shutdown, once begun: nothing new is published (rows handed to the Publisher
/// from then on are given back unpublished).
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    /// Begins the shutdown; for good.
    pub fn begin(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the shutdown has begun.
    pub fn begun(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The engine's own view of its registry heartbeat. Another engine declares it dead once its
/// beat is `scheduler.engine_timeout` old by the database's clock, and takes a row whose lease
/// lapsed; the engine stops claiming and publishing once its last successful beat was *sent*
/// longer ago than half of that timeout, or a third of the lease, by its own monotonic clock
/// (see `Heartbeat::publish_window`), so it stops before anyone can take its rows over,
/// whatever the round trip or a freeze (`SIGSTOP`, a long pause) did meanwhile. Without a
/// registry (no beat recorded) it never stops.
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
