//! Starting the engine and talking to it: [`Engine::start`] and [`EngineHandle`].
//!
//! The engine is a set of actors on the calling actix `System` (see [`crate::actors`]).
//! `courier run` starts it in its own System; an application embeds it by calling
//! [`Engine::start`] from inside its own (e.g. actix-web's) and keeps the handle.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = courier::Config::load("config.yaml".as_ref())?;
//! let engine = courier::Engine::start(config).await?;
//! let message = courier::OutboxMessage::new("orders", "order.created", b"{}".to_vec());
//! engine.store().enqueue(&message).await?;
//! engine.nudge(); // optional: NOTIFY already wakes it
//! let outcome = engine.wait_for(message.id, std::time::Duration::from_secs(10)).await?;
//! assert_eq!(outcome, courier::Outcome::Confirmed);
//! engine.shutdown().await;
//! # Ok(()) }
//! ```

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use actix::{prelude::*, Supervisor};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::{
    actors::{
        confirms::{ConfirmTracker, Outage},
        dead_letter::DeadLetterActor,
        heartbeat::{Heartbeat, StopBeating},
        ledger::{Flushed, Ledger, ReleaseAll},
        publisher::{ExchangeBook, Isolation, Lane, Publisher, Suspects},
        retention::{Retention, RunRetention},
        scheduler::{Outstanding, Peers, Scheduler, StopClaiming, Wake},
    },
    config::{Config, ConfigError},
    events::{BrokerState, CounterSnapshot, EngineEvent, Signals},
    lifecycle::Lifecycle,
    store::{self, Outcome, Store, StoreError, NOTIFY_RELEASED},
};

/// How often a draining shutdown counts what is left when no event came.
const SHUTDOWN_RECOUNT: Duration = Duration::from_millis(100);

/// Why the engine could not start, or a wait failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database is unreachable or a statement failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker refused the engine at start in a way retrying cannot mend: login or vhost
    /// refused, TLS certificate rejected (the source says which).
    #[error("RabbitMQ cannot be used as configured (refused, or TLS failed); fix the configuration or the broker")]
    Broker(#[source] crate::broker::BrokerError),
    /// Not called from inside a running actix `System`.
    #[error("Engine::start must be called inside a running actix System")]
    NoSystem,
    /// The schema's migrations do not fit this binary: not migrated (with
    /// `database.auto_migrate` off), or migrated by a newer Courier.
    #[error("schema `{schema}` {}", .fit.explain())]
    Schema {
        /// The schema.
        schema: String,
        /// How its migrations compare with this binary's.
        fit: store::SchemaFit,
    },
    /// The admin server could not start.
    #[error("admin API: cannot serve on {bind}: {source}")]
    Admin {
        /// The address it was to listen on.
        bind: String,
        /// Why not (the address is taken, the admin connection URL is unusable…).
        #[source]
        source: crate::admin::AdminError,
    },
    /// A wait ran out of time; the ids not settled yet are listed.
    #[error("timed out waiting for {} message(s)", .0.len())]
    Timeout(Vec<Uuid>),
}

/// Entry point; see the module documentation.
pub struct Engine;

/// A handle on a running engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    engine_id: String,
    store: Store,
    signals: Signals,
    lifecycle: Lifecycle,
    scheduler: Addr<Scheduler>,
    ledger: Addr<Ledger>,
    retention: Addr<Retention>,
    heartbeat: Addr<Heartbeat>,
    admin: std::sync::Mutex<Option<actix_web::dev::ServerHandle>>,
}

impl Engine {
    /// Validates `config`, migrates (unless `database.auto_migrate` is off), connects to
    /// PostgreSQL and starts the actors on the current actix System. The broker is tried
    /// once first: a permanent refusal (login, vhost, TLS) fails the start with its cause;
    /// a node down or unreachable does not, and the connection is then made in the
    /// background and retried until it succeeds.
    pub async fn start(config: Config) -> Result<EngineHandle, EngineError> {
        config.validate()?;
        if System::try_current().is_none() {
            return Err(EngineError::NoSystem);
        }
        // Bound first: a taken port fails the start before anything is claimed.
        let admin = match config.admin.bind.clone() {
            Some(bind) => match crate::admin::Listeners::bind(&bind) {
                Ok(listeners) => Some((bind, listeners)),
                Err(source) => return Err(EngineError::Admin { bind, source }),
            },
            None => None,
        };
        check_broker(&config).await?;
        let store = connect_database(&config).await?;
        let engine_id = format!(
            "{}-{}-{}",
            config.broker.connection_name,
            std::process::id(),
            &Uuid::new_v4().simple().to_string()[..8]
        );
        let config = Arc::new(config);
        let signals = Signals::new(16_384);
        let lifecycle = Lifecycle::default();
        let me = store::Identity::of_this_process(&engine_id);
        register(&store, &me, &config, &lifecycle).await?;

        // The Scheduler and the actors that wake it (Publisher, Heartbeat) refer to each
        // other: make its context first, so its address exists before it runs.
        let scheduler_ctx = Context::<Scheduler>::new();
        let scheduler = scheduler_ctx.address();
        let ledger = Ledger::new(
            store.clone(),
            engine_id.clone(),
            config.scheduler.lease_duration,
            signals.clone(),
        )
        .start();
        let dead_letter =
            DeadLetterActor::new(config.clone(), ledger.clone(), signals.clone()).start();
        // One Publisher per publishing connection, each with its own ConfirmTracker; what
        // they learn of exchanges they share.
        let exchanges = ExchangeBook::default();
        let suspects = Suspects::default();
        let isolation = Isolation::new(
            config.clone(),
            suspects.clone(),
            ledger.clone(),
            lifecycle.clone(),
        )
        .start();
        // One run of failed publishes for the engine: a retry may go out on another
        // connection.
        let outage = Outage::new(&config);
        let publishers = (0..config.publisher.connections as usize)
            .map(|lane| {
                let tracker = ConfirmTracker::new(
                    config.clone(),
                    ledger.clone(),
                    dead_letter.clone(),
                    scheduler.clone(),
                    signals.clone(),
                    suspects.clone(),
                    outage.clone(),
                )
                .start();
                let publisher = Publisher::new(
                    Lane {
                        index: lane,
                        exchanges: exchanges.clone(),
                        suspects: suspects.clone(),
                        isolation: isolation.clone(),
                    },
                    config.clone(),
                    tracker,
                    scheduler.clone(),
                    ledger.clone(),
                    signals.clone(),
                    lifecycle.clone(),
                );
                Supervisor::start(move |_| publisher)
            })
            .collect();
        let retention =
            Retention::new(store.clone(), config.retention.clone(), signals.clone()).start();
        let heartbeat = Heartbeat::new(
            store.clone(),
            me,
            &config.scheduler,
            config.retry.backoff.max,
            scheduler.clone(),
            signals.clone(),
            lifecycle.liveness.clone(),
        )
        .start();
        scheduler_ctx.run(Scheduler::new(
            config.clone(),
            Peers {
                ledger: ledger.clone(),
                publishers,
                dead_letter,
            },
            store.clone(),
            signals.clone(),
            lifecycle.clone(),
            engine_id.clone(),
        ));
        tracing::info!(engine = %engine_id, schema = %config.database.schema, "engine started");
        let handle = EngineHandle {
            inner: Arc::new(Inner {
                config,
                engine_id,
                store,
                signals,
                lifecycle,
                scheduler,
                ledger,
                retention,
                heartbeat,
                admin: std::sync::Mutex::new(None),
            }),
        };
        if let Some((bind, listeners)) = admin {
            let server = match crate::admin::serve(handle.clone(), listeners).await {
                Ok(server) => server,
                Err(source) => {
                    // The actors already run (the admin pools failed): stop them as a clean
                    // stop does (what they claimed goes back, the registry row goes).
                    handle.shutdown().await;
                    return Err(EngineError::Admin { bind, source });
                }
            };
            tracing::info!(%bind, mutating = handle.inner.config.admin.token.is_some(), "admin API and dashboard listening");
            if let Ok(mut slot) = handle.inner.admin.lock() {
                *slot = Some(server);
            }
        }
        Ok(handle)
    }
}

/// Joins the engine registry before anything is claimed, so the engine is known (and, when
/// it dies, rescued) from its first row on.
async fn register(
    store: &Store,
    me: &store::Identity,
    config: &Config,
    lifecycle: &Lifecycle,
) -> Result<(), EngineError> {
    let sent = Instant::now();
    let mut conn = store.conn().await?;
    let bound = Heartbeat::beat_bound(config.scheduler.engine_timeout);
    store::beat(&mut conn, store.schema(), me, bound).await?;
    lifecycle
        .liveness
        .beat(sent, Heartbeat::publish_window(&config.scheduler));
    Ok(())
}

/// One connection attempt over the broker's nodes at start: only a permanent refusal is an
/// error; a transient one is logged and left to the Publisher's retries.
async fn check_broker(config: &Config) -> Result<(), EngineError> {
    match crate::broker::connect(&config.broker, "-start-check").await {
        Ok(conn) => {
            let _ = conn.close(200, "start check".into()).await;
            Ok(())
        }
        Err(e) if e.is_permanent() => Err(EngineError::Broker(e)),
        Err(e) => {
            tracing::warn!(error = %e, "RabbitMQ not reachable yet; the engine keeps trying");
            Ok(())
        }
    }
}

/// Migrates (if configured) and connects, waiting for PostgreSQL per
/// `database.wait_at_start` ([`Store::open`]); then checks that the server and schema fit.
async fn connect_database(config: &Config) -> Result<Store, EngineError> {
    let store = Store::open(&config.database)
        .await?
        .bounded(config.scheduler.lease_duration);
    fit_to_write(&store).await?;
    fits(config, store).await
}

/// Refuses a standby (every claim would fail on it: a permanent fault, not one to wait out),
/// and warns of a `statement_timeout` short enough to cancel claims over a backlog.
async fn fit_to_write(store: &Store) -> Result<(), EngineError> {
    let server = store.server_role().await?;
    if server.standby {
        return Err(store::StoreError::Standby.into());
    }
    if let Some(ms) = server.short_statement_timeout() {
        tracing::warn!(
            statement_timeout_ms = ms,
            "PostgreSQL's statement_timeout on Courier's connections is under {}: claims and \
             outcome writes over a large backlog are cancelled and retried, and the backlog \
             drains slowly; {}",
            humantime::format_duration(store::SHORTEST_STATEMENT_TIMEOUT),
            store::STATEMENT_TIMEOUT_FIX
        );
    }
    Ok(())
}

/// `store`, once its schema holds exactly the migrations this binary knows: an engine must
/// not run on a schema it would misread (a newer Courier's) nor fail later on a missing
/// table.
async fn fits(config: &Config, store: Store) -> Result<Store, EngineError> {
    match store.schema_fit().await? {
        store::SchemaFit::Current => Ok(store),
        fit => Err(EngineError::Schema {
            schema: config.database.schema.clone(),
            fit,
        }),
    }
}

impl EngineHandle {
    /// Wakes the scheduler now (for applications that enqueue without NOTIFY).
    pub fn nudge(&self) {
        self.inner.scheduler.do_send(Wake::ALL);
    }

    /// This engine's id (the `locked_by` of the rows it holds).
    pub fn engine_id(&self) -> &str {
        &self.inner.engine_id
    }

    /// The engine's store (for enqueueing outside a transaction, stats, tools).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<EngineEvent> {
        self.inner.signals.subscribe()
    }

    /// The Prometheus metrics.
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        self.inner.signals.metrics()
    }

    /// Whether the engine's own registry beat succeeded lately (within its publish window:
    /// half of `scheduler.engine_timeout`, or a third of the lease if shorter): the database
    /// answers the engine, whichever host of the URL that now is.
    pub(crate) fn beating(&self) -> bool {
        self.inner.lifecycle.liveness.fresh()
    }

    /// The broker link state.
    pub fn broker_state(&self) -> BrokerState {
        self.inner.signals.broker_state()
    }

    /// Why the broker refuses this engine now (login, vhost, TLS: a fault no retry mends),
    /// while it does.
    pub fn broker_refusal(&self) -> Option<String> {
        self.inner.signals.broker_refusal()
    }

    /// The counters now.
    pub fn counters(&self) -> CounterSnapshot {
        self.inner.signals.counters()
    }

    /// Waits until message `id` is confirmed or dead-lettered, up to `timeout`.
    pub async fn wait_for(&self, id: Uuid, timeout: Duration) -> Result<Outcome, EngineError> {
        let mut all = self.wait_for_all(&[id], timeout).await?;
        all.remove(&id).ok_or(EngineError::Timeout(vec![id]))
    }

    /// Waits until every id is confirmed or dead-lettered, up to `timeout`. Listens to the
    /// engine's events and falls back to the database when events were missed (a lagging
    /// receiver) or announced by another engine.
    pub async fn wait_for_all(
        &self,
        ids: &[Uuid],
        timeout: Duration,
    ) -> Result<HashMap<Uuid, Outcome>, EngineError> {
        let deadline = Instant::now() + timeout;
        let mut events = self.subscribe();
        let mut waiting: HashSet<Uuid> = ids.iter().copied().collect();
        let mut done = HashMap::with_capacity(ids.len());
        let mut recheck = true;
        let mut poll = tokio::time::interval(Duration::from_millis(500));
        loop {
            if recheck {
                recheck = false;
                let ids: Vec<Uuid> = waiting.iter().copied().collect();
                // A database that is failing over is waited for, like the rows themselves.
                match self.inner.store.outcomes(&ids).await {
                    Ok(outcomes) => {
                        for (id, outcome) in outcomes {
                            waiting.remove(&id);
                            done.insert(id, outcome);
                        }
                    }
                    Err(e) if e.is_transient() => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if waiting.is_empty() {
                return Ok(done);
            }
            let event = tokio::select! {
                e = events.recv() => e,
                _ = poll.tick() => { recheck = true; continue; }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    return Err(EngineError::Timeout(waiting.into_iter().collect()));
                }
            };
            match event {
                Ok(EngineEvent::Confirmed(settled)) => {
                    for id in settled.iter() {
                        if waiting.remove(id) {
                            done.insert(*id, Outcome::Confirmed);
                        }
                    }
                }
                Ok(EngineEvent::DeadLettered(settled)) => {
                    for (id, why) in settled.iter() {
                        if waiting.remove(id) {
                            done.insert(*id, Outcome::DeadLettered(why.clone()));
                        }
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => recheck = true,
                Err(broadcast::error::RecvError::Closed) => recheck = true,
            }
        }
    }

    /// Runs retention now; returns the confirmed rows removed.
    pub async fn run_retention(&self) -> Result<usize, EngineError> {
        match self.inner.retention.send(RunRetention).await {
            Ok(result) => Ok(result?),
            Err(_) => Ok(0),
        }
    }

    /// Messages claimed and not yet settled.
    pub async fn outstanding(&self) -> usize {
        self.inner.scheduler.send(Outstanding).await.unwrap_or(0)
    }

    /// Graceful stop. Claims stop at once; rows claimed but not yet published are given
    /// back unpublished; outstanding confirms are awaited (up to `shutdown.timeout`) and
    /// their outcomes written. Whatever is still unsettled then is released to the outbox,
    /// so the next engine starts on it at once rather than after a lease expiry (its
    /// confirm may still have been on the way: a possible duplicate, never a loss).
    /// Returns how many rows were released that way.
    pub async fn shutdown(&self) -> usize {
        let timeout = self.inner.config.shutdown.timeout;
        let deadline = Instant::now() + timeout;
        let mut events = self.subscribe();
        self.inner.lifecycle.shutdown.begin();
        let mut left = self.inner.scheduler.send(StopClaiming).await.unwrap_or(0);
        tracing::info!(
            outstanding = left,
            "shutting down: claims stopped, draining"
        );
        let admin = self.inner.admin.lock().ok().and_then(|mut s| s.take());
        if let Some(server) = admin {
            server.stop(true).await;
        }
        while left > 0 && Instant::now() < deadline {
            // Woken by a settlement's event, or after a short while at most: rows given
            // back unpublished (the rest of a key's run) settle the count without one.
            let wake = deadline.min(Instant::now() + SHUTDOWN_RECOUNT);
            let _ = tokio::time::timeout_at(wake.into(), events.recv()).await;
            left = self.outstanding().await;
        }
        let flush_by = deadline.max(Instant::now() + Duration::from_secs(1));
        let _ = tokio::time::timeout_at(flush_by.into(), self.inner.ledger.send(Flushed)).await;
        let released = if left == 0 {
            tracing::info!("shutdown complete: every claimed message settled");
            0
        } else {
            self.release_all(left).await
        };
        self.wake_the_others().await;
        self.deregister().await;
        released
    }

    /// Rows given back during the shutdown (unpublished, or unconfirmed at its timeout) are
    /// due at once, but no insert announces them: without a NOTIFY the other engines would
    /// find them only at their next sweep (`scheduler.sweep_interval`). One NOTIFY, after
    /// the releases committed, with a payload the listeners read as "anything may be
    /// ready" (unkeyed rows and every key).
    async fn wake_the_others(&self) {
        if let Err(e) = self.inner.store.notify(NOTIFY_RELEASED).await {
            tracing::warn!(error = %e, "could not wake the other engines; they find the released rows at their next sweep");
        }
    }

    /// Leaves the engine registry: no beat after this, and the row goes (other engines
    /// would otherwise declare this one dead once it is silent).
    async fn deregister(&self) {
        let _ = self.inner.heartbeat.send(StopBeating).await;
        if let Err(e) = self.inner.store.deregister(&self.inner.engine_id).await {
            tracing::warn!(error = %e, "could not leave the engine registry; other engines will mark this one dead");
        }
    }

    /// End of a shutdown that timed out: give back what is still held.
    async fn release_all(&self, left: usize) -> usize {
        match self.inner.ledger.send(ReleaseAll).await {
            Ok(Ok(released)) => {
                tracing::warn!(
                    unsettled = left,
                    released,
                    "shutdown timeout: released unconfirmed rows for the next engine"
                );
                released
            }
            Ok(Err(e)) => {
                tracing::warn!(unsettled = left, error = %e, "shutdown timeout: could not release rows; their leases will expire");
                0
            }
            Err(_) => 0,
        }
    }
}
