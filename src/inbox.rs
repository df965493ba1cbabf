//! The consumer inbox: turns Courier's at-least-once delivery into effectively-once
//! processing, so consumers do not hand-write idempotency.
//!
//! For each delivery, in **one PostgreSQL transaction**, the inbox records
//! `(consumer, message_id)` in `<schema>.inbox` (`ON CONFLICT DO NOTHING`) and, only when
//! that row is new, runs the handler with the same transaction; it commits, and only then
//! acks. A duplicate (re-published, redelivered after a channel loss, or redelivered after a
//! crash between commit and ack) is acked without running the handler; one under a known id
//! with another body (the SHA-256 recorded with the id differs) is another message whose
//! producer reused the id, and is rejected with a WARN instead. A handler error
//! rolls everything back and the message is requeued after a wait (`failure_backoff`), up
//! to `max_redeliveries`; then it is rejected without requeue, to the queue's own
//! dead-letter exchange (a queue without one deletes it). A delivery without a
//! `message_id` (or with an empty one, or one holding a NUL, which PostgreSQL's `text`
//! cannot store) cannot be deduplicated: it is rejected with a log line naming it, never
//! processed twice silently. Failures are counted across reconnections, so a message that
//! fails in every session still reaches `max_redeliveries`.
//!
//! A delivery the AMQP client cannot parse (a `message_id` or another short-string property
//! that is not UTF-8) ends the connection before the inbox sees it, and the broker puts it
//! back at the head of the queue: the inbox then reconnects with backoff, not at once, says
//! at ERROR what blocks the queue and how to set it aside, and takes one delivery at a time
//! for a while (see `Node::careful`).
//!
//! A database that cannot be reached (no connection from the pool, the connection broken
//! during the insert, the handler or the commit) is not the message's fault: the delivery
//! is held, unacked, and processed again with capped backoff until the database is back.
//! It never counts toward `max_redeliveries` and is never rejected for it; on stop it is
//! requeued. Holding rather than requeueing keeps the broker's own redelivery count (a
//! quorum queue's `delivery-limit`) untouched during an outage.
//!
//! The consumer uses its own AMQP connection (a blocked publishing connection must not
//! stall its acks), a configurable prefetch and concurrency, and a graceful stop that
//! cancels the consumer and finishes the handlers in flight.
//!
//! ```no_run
//! # async fn demo(store: courier::Store, broker: courier::config::BrokerConfig) -> Result<(), courier::inbox::InboxError> {
//! use courier::inbox::{Inbox, InboxConfig, InboxMessage, HandlerError};
//! use diesel_async::AsyncPgConnection;
//! fn apply<'a>(tx: &'a mut AsyncPgConnection, msg: &'a InboxMessage)
//!     -> futures::future::BoxFuture<'a, Result<(), HandlerError>> {
//!     Box::pin(async move { /* write with `tx` */ Ok(()) })
//! }
//! let inbox = Inbox::new(store, broker, InboxConfig::new("billing", "orders.billing"));
//! inbox.run(std::sync::Arc::new(apply), tokio::signal::ctrl_c()).await?;
//! # Ok(()) }
//! ```

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use diesel_async::{AsyncConnection, AsyncPgConnection};
use futures::{future::BoxFuture, StreamExt};
use lapin::{
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, BasicRejectOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel,
};
use tracing::Instrument;

use crate::{
    backoff,
    broker::{self, BrokerError},
    config::{BackoffConfig, BrokerConfig},
    store::{Store, StoreError},
};

/// How one consumer behaves.
#[derive(Debug, Clone)]
pub struct InboxConfig {
    /// The consumer's name: the deduplication scope (two services consuming the same
    /// message each apply it once).
    pub consumer: String,
    /// The queue to consume.
    pub queue: String,
    /// Unacked deliveries the broker may send ahead.
    pub prefetch: u16,
    /// Handlers running at once.
    pub concurrency: usize,
    /// Requeues after handler errors before the message is rejected to the DLX. An
    /// unreachable database is not a handler error and does not count.
    pub max_redeliveries: u32,
    /// How long a delivery whose handler failed is held (unacked) before it goes back to
    /// the queue, by failure: without a wait, a fault of a second (a lock timeout, a table
    /// being migrated) used up every redelivery in milliseconds and the message was
    /// rejected — on a queue without a dead-letter exchange, deleted.
    pub failure_backoff: BackoffConfig,
    /// How long a stop waits for the handlers in flight (a frozen database holds them):
    /// past it they are abandoned, their transactions rolled back and their deliveries
    /// left to the broker, which requeues them when the connection closes.
    pub stop_timeout: Duration,
    /// How often a delivery held during a database outage is tried again: the cap
    /// (`max`) bounds how long after the database returns a held message waits.
    pub database_retry: BackoffConfig,
    /// Inbox rows older than this are deleted (a duplicate older than this is processed
    /// again); `None` keeps them.
    pub retention: Option<Duration>,
    /// An OpenTelemetry span `process <queue>` (kind consumer) per message, continuing the
    /// trace of the delivery's `traceparent` header (the engine's `publish` span), sent to
    /// the global tracer provider (see [`crate::telemetry`]).
    pub traces: bool,
}

impl InboxConfig {
    /// Defaults: prefetch 32, concurrency 8, 5 redeliveries each after a wait of 2 s
    /// doubling to 1 min (±20 %), 7 days of inbox rows, database retries from 100 ms
    /// doubling to 5 s, a stop that waits 15 s for the handlers in flight.
    pub fn new(consumer: impl Into<String>, queue: impl Into<String>) -> Self {
        InboxConfig {
            consumer: consumer.into(),
            queue: queue.into(),
            prefetch: 32,
            concurrency: 8,
            max_redeliveries: 5,
            failure_backoff: backoff::INBOX_FAILURE.into(),
            stop_timeout: Duration::from_secs(15),
            database_retry: backoff::INBOX_HOLD.into(),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            traces: false,
        }
    }
}

/// One delivery, as the handler sees it.
#[derive(Debug, Clone)]
pub struct InboxMessage {
    /// The AMQP `message_id` (for Courier messages: the outbox row id).
    pub message_id: String,
    /// Exchange it was published to.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// The bytes as published.
    pub payload: Vec<u8>,
    /// Properties (headers, content type, …).
    pub properties: BasicProperties,
    /// The broker's redelivered flag.
    pub redelivered: bool,
}

/// Why a handler failed (the transaction is rolled back and the message requeued).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The handler's own failure.
    #[error("{0}")]
    Failed(String),
    /// A database error inside the handler.
    #[error(transparent)]
    Database(#[from] diesel::result::Error),
}

/// The user's handler: runs inside the inbox transaction.
pub trait Handler: Send + Sync + 'static {
    /// Applies one message with `tx`; an error rolls back and requeues.
    fn handle<'a>(
        &'a self,
        tx: &'a mut AsyncPgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<F> Handler for F
where
    F: for<'a> Fn(
            &'a mut AsyncPgConnection,
            &'a InboxMessage,
        ) -> BoxFuture<'a, Result<(), HandlerError>>
        + Send
        + Sync
        + 'static,
{
    fn handle<'a>(
        &'a self,
        tx: &'a mut AsyncPgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        self(tx, msg)
    }
}

/// What happened to one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// New: the handler ran and its transaction committed.
    Applied,
    /// Seen before by this consumer: the handler did not run.
    Duplicate,
    /// Seen before by this consumer under this `message_id`, with another body: not a
    /// duplicate but another message under a reused id. The handler did not run; the
    /// delivery is rejected (to the queue's dead-letter exchange) with a WARN, not acked
    /// away as a duplicate.
    Reused,
    /// The handler failed; rolled back.
    Failed(String),
}

/// An inbox failure (not a handler failure).
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// PostgreSQL failed outside a handler's transaction.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No node could be reached, or a session ended (its deliveries come back redelivered).
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

enum TxError {
    Db(diesel::result::Error),
    Handler(HandlerError),
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        TxError::Db(e)
    }
}

/// Which node of `broker.url` the inbox connects to next, and whether the session on it got
/// as far as consuming (then losing it means moving on at once, not backing off), unless a
/// delivery the client could not parse ended it (it comes back first on any node).
#[derive(Debug, Default)]
struct Node {
    next: usize,
    consumed: bool,
    unparsable: bool,
    /// A session ended on an unparsable delivery, and no session has run [`CAREFUL_FOR`]
    /// since without one: take one delivery at a time (kept across connection attempts
    /// that fail before consuming). Every delivery unacked when a connection ends counts
    /// as delivered once more, and a quorum queue dead-letters a message past its
    /// `delivery-limit`: with the usual prefetch, the messages fetched behind the
    /// unparsable one would be set aside with it.
    careful: bool,
    /// The session ended to leave careful mode, not for a fault.
    restart: bool,
    /// The session received a delivery whole.
    whole: bool,
}

/// How long a careful session (see [`Node::careful`]) consumes one delivery at a time before
/// it takes the usual prefetch again, unless an unparsable delivery ends it first. Not "until
/// the first whole delivery": a quorum queue hands back the deliveries a closed connection
/// left unacked in no set order, so the unparsable one may come after whole ones; on a
/// classic queue it comes first and ends the session within milliseconds.
const CAREFUL_FOR: Duration = Duration::from_secs(5);

/// Failures counted per message id, across the run's sessions (see [`Inbox::settle`]),
/// with the broker's delivery count when the first of them was seen (see [`failures_seen`]).
type Failures = Mutex<HashMap<String, (u32, u32)>>;

/// Message ids whose failures are remembered at most; past it the counts start again (a
/// failing message then reaches `max_redeliveries` later, never earlier).
const FAILURES_KEPT: usize = 100_000;

/// What a run processed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxReport {
    /// Handlers that ran and committed.
    pub applied: u64,
    /// Duplicates acked without running the handler.
    pub duplicates: u64,
    /// Handler failures requeued.
    pub requeued: u64,
    /// Rejected to the dead-letter exchange (no message_id, or redeliveries exhausted).
    pub rejected: u64,
    /// Deliveries held because the database was unreachable (not counted as failures).
    pub held: u64,
}

/// What a delivery's task holds beside the delivery: the run's stop and the session's end
/// (which release a delivery held for the database or waiting to be requeued), and its
/// handler slot (given up while it waits to be requeued).
struct Turn {
    halt: [tokio::sync::watch::Receiver<bool>; 2],
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// How processing a delivery ended when the database may be away.
enum Held {
    /// Processed (or failed for a reason other than an unreachable database).
    Done(Result<Disposition, StoreError>),
    /// Asked to stop, or the session ended, while waiting for the database.
    Stopped,
}

/// See the module documentation.
#[derive(Clone)]
pub struct Inbox {
    store: Store,
    broker: BrokerConfig,
    config: InboxConfig,
}

impl Inbox {
    /// An inbox for `config.consumer`, recording in `store`'s schema.
    pub fn new(store: Store, broker: BrokerConfig, config: InboxConfig) -> Self {
        Inbox {
            store,
            broker,
            config,
        }
    }

    /// Processes one message in one transaction: record it, run the handler if it is new,
    /// commit. Does not ack: callers ack only after this returns `Applied`/`Duplicate`.
    /// A handler error is `Ok(Failed)`, unless it is the connection breaking under the
    /// handler's own statement: that, like any database failure, is an `Err`.
    pub async fn process(
        &self,
        handler: &dyn Handler,
        msg: &InboxMessage,
    ) -> Result<Disposition, StoreError> {
        let span = self.config.traces.then(|| {
            let headers = msg.properties.headers().as_ref();
            crate::telemetry::consumer_span(&self.config.queue, headers, &msg.message_id)
        });
        let result = self.apply(handler, msg).await;
        if let Some(span) = span {
            crate::telemetry::end_consumer_span(&span, &result);
        }
        result
    }

    /// [`Inbox::process`] without its span.
    async fn apply(
        &self,
        handler: &dyn Handler,
        msg: &InboxMessage,
    ) -> Result<Disposition, StoreError> {
        let mut conn = self.store.conn().await?;
        let consumer = self.config.consumer.as_str();
        let store = &self.store;
        let result = conn
            .transaction::<Disposition, TxError, _>(async |tx| {
                let digest = body_digest(&msg.payload);
                let recorded = store
                    .record_received(tx, consumer, &msg.message_id, &digest)
                    .await?;
                match (recorded.fresh, recorded.digest) {
                    (true, _) => {}
                    (false, Some(known)) if known != digest => return Ok(Disposition::Reused),
                    (false, _) => return Ok(Disposition::Duplicate),
                }
                handler.handle(tx, msg).await.map_err(TxError::Handler)?;
                Ok(Disposition::Applied)
            })
            .await;
        match result {
            Ok(d) => Ok(d),
            // The handler's statement failed because the connection broke: an outage,
            // not the handler's fault.
            Err(TxError::Handler(HandlerError::Database(e))) if connection_failed(&e) => {
                Err(StoreError::Query(e))
            }
            Err(TxError::Handler(e)) => Ok(Disposition::Failed(e.to_string())),
            Err(TxError::Db(e)) => Err(StoreError::Query(e)),
        }
    }

    /// Deletes this consumer's inbox rows older than `age` (in batches; other consumers'
    /// rows are theirs to keep). Returns how many.
    pub async fn purge(&self, age: Duration) -> Result<usize, StoreError> {
        self.store.purge_inbox(&self.config.consumer, age).await
    }

    /// Consumes until `shutdown` resolves, then cancels the consumer and waits for the
    /// handlers in flight before returning. A lost connection (broker restart, network) is
    /// re-established at once on the next node of `broker.url` (round robin over a
    /// cluster's nodes), with capped backoff only when no node answers; unacked deliveries
    /// come back as redeliveries and are recognised as duplicates if their transaction had
    /// committed.
    pub async fn run(
        &self,
        handler: Arc<dyn Handler>,
        shutdown: impl Future,
    ) -> Result<InboxReport, InboxError> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let report: Arc<Mutex<InboxReport>> = Default::default();
        let counted: Arc<Failures> = Default::default();
        let sessions = async {
            let mut failures = 0u32;
            let mut node = Node::default();
            loop {
                node.consumed = false;
                node.whole = false;
                node.careful |= std::mem::take(&mut node.unparsable);
                let began = tokio::time::Instant::now();
                let session = self.session(
                    handler.clone(),
                    stop_rx.clone(),
                    report.clone(),
                    counted.clone(),
                    &mut node,
                );
                match session.await {
                    Ok(()) => return,
                    Err(_) if std::mem::take(&mut node.restart) => {
                        failures = 0;
                        tracing::info!(consumer = %self.config.consumer, "no unparsable delivery for {}; consuming at the usual prefetch again", humantime::format_duration(CAREFUL_FOR));
                    }
                    Err(e) if node.consumed && !node.unparsable => {
                        // A working session lost its node: the next node of the list at
                        // once (its unacked deliveries come back there as redeliveries).
                        failures = 0;
                        node.next += 1;
                        tracing::warn!(error = %e, consumer = %self.config.consumer, "inbox lost its broker connection; reconnecting");
                    }
                    Err(e) => {
                        if node.unparsable && (node.whole || began.elapsed() >= CAREFUL_FOR) {
                            // The session went well before the unparsable delivery came (a
                            // new one, not the last one back): its backoff starts again.
                            failures = 0;
                        }
                        failures += 1;
                        let delay = backoff::INBOX_RECONNECT.delay(failures);
                        tracing::warn!(error = %e, retry_in = ?delay, consumer = %self.config.consumer, "inbox lost its broker connection; reconnecting");
                        let mut stop = stop_rx.clone();
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stopped(&mut stop) => return,
                        }
                    }
                }
            }
        };
        tokio::pin!(sessions);
        tokio::select! {
            _ = &mut sessions => {}
            _ = shutdown => {
                let _ = stop_tx.send(true);
                sessions.await;
            }
        }
        let report = *report.lock().unwrap_or_else(|e| e.into_inner());
        Ok(report)
    }

    /// One connection's worth of consuming. `Ok` when asked to stop; `Err` when the
    /// connection or consumer ended (after the handlers in flight finished).
    async fn session(
        &self,
        handler: Arc<dyn Handler>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        report: Arc<Mutex<InboxReport>>,
        failures: Arc<Failures>,
        node: &mut Node,
    ) -> Result<(), InboxError> {
        let suffix = format!("-inbox-{}", self.config.consumer);
        let (conn, index) = broker::connect_from(&self.broker, &suffix, node.next).await?;
        node.next = index;
        let channel = conn.create_channel().await.map_err(BrokerError::from)?;
        // A consumer's prefetch is fixed when it starts consuming (and quorum queues refuse
        // a channel-wide one): a careful session ends after `CAREFUL_FOR`, to start again.
        let prefetch = if node.careful {
            1
        } else {
            self.config.prefetch
        };
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(BrokerError::from)?;
        let tag = format!(
            "courier-inbox-{}-{}",
            self.config.consumer,
            uuid::Uuid::new_v4()
        );
        let mut consumer = channel
            .basic_consume(
                self.config.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::from)?;
        node.consumed = true;
        // Tells deliveries held for the database that this session is over.
        let (halt_tx, halt_rx) = tokio::sync::watch::channel(false);
        let permits = Arc::new(tokio::sync::Semaphore::new(self.config.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        let mut retention = tokio::time::interval(Duration::from_secs(60));
        let careful_until = tokio::time::Instant::now() + CAREFUL_FOR;
        let ended = loop {
            tokio::select! {
                _ = stopped(&mut stop) => break None,
                _ = tokio::time::sleep_until(careful_until), if node.careful => {
                    // Nothing unparsable came for that long: it is gone (set aside by the
                    // queue, or moved). A new session, at the usual prefetch, once the
                    // deliveries in hand are settled.
                    node.careful = false;
                    node.restart = true;
                    break Some("careful consuming over".to_string());
                }
                _ = retention.tick() => {
                    if let Some(age) = self.config.retention {
                        if let Err(e) = self.purge(age).await {
                            tracing::warn!(error = %e, "inbox retention failed");
                        }
                    }
                }
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = done {
                        tracing::error!(error = %e, "inbox handler task failed");
                    }
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        node.whole = true;
                        // Every handler slot may be held by a statement a frozen database
                        // never answers: a stop must not wait for one to free up.
                        let permit = tokio::select! {
                            permit = permits.clone().acquire_owned() => permit.ok(),
                            _ = stopped(&mut stop) => {
                                let requeue = BasicNackOptions { multiple: false, requeue: true };
                                let _ = channel.basic_nack(delivery.delivery_tag, requeue).await;
                                break None;
                            }
                        };
                        let (inbox, handler, channel) = (self.clone(), handler.clone(), channel.clone());
                        let (failures, report) = (failures.clone(), report.clone());
                        let turn = Turn { halt: [stop.clone(), halt_rx.clone()], permit };
                        tasks.spawn(async move {
                            inbox.settle(&*handler, &channel, delivery, &failures, &report, turn).await;
                        });
                    }
                    Some(Err(e)) if matches!(e.kind(), lapin::ErrorKind::ParsingError(_)) => {
                        node.unparsable = true;
                        tracing::error!(queue = %self.config.queue, consumer = %self.config.consumer, error = %e,
                            "a delivery the AMQP client cannot parse (a message_id, another \
                             short-string property or a header name that is not UTF-8?) closed the inbox's \
                             connection; the broker puts it back at the head of the queue, so it \
                             blocks the messages behind it: move it aside (a quorum queue with a \
                             delivery-limit and a dead-letter exchange does so by itself) or purge \
                             it; reconnecting with backoff");
                        break Some(e.to_string());
                    }
                    Some(Err(e)) => break Some(e.to_string()),
                    None => break Some("consumer closed".to_string()),
                },
            }
        };
        if ended.is_none() || node.restart {
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        let _ = halt_tx.send(true);
        self.finish(&mut tasks).await;
        let _ = conn.close(200, "inbox stopped".into()).await;
        match ended {
            None => Ok(()),
            Some(why) => Err(InboxError::Broker(BrokerError::Lost(why))),
        }
    }

    /// Waits for the handlers in flight, at most `stop_timeout`: a handler blocked on a
    /// frozen database would otherwise hold a stop (or a reconnection) for as long as the
    /// freeze lasts. One abandoned rolls back (its connection is dropped) and its delivery,
    /// never acked, is requeued by the broker once the connection closes; had it committed
    /// just before, the redelivery is a duplicate.
    async fn finish(&self, tasks: &mut tokio::task::JoinSet<()>) {
        let waited = tokio::time::timeout(self.config.stop_timeout, async {
            while let Some(done) = tasks.join_next().await {
                if let Err(e) = done {
                    tracing::error!(error = %e, "inbox handler task failed");
                }
            }
        })
        .await;
        if waited.is_err() {
            tracing::warn!(
                consumer = %self.config.consumer,
                handlers = tasks.len(),
                "handlers still running after {} (a frozen database?): abandoned; their \
                 transactions roll back and the broker requeues their deliveries",
                humantime::format_duration(self.config.stop_timeout)
            );
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Processes one delivery and acks, requeues or rejects it. `halt`: the run's stop and
    /// the session's end, which release a delivery held for the database.
    async fn settle(
        &self,
        handler: &dyn Handler,
        channel: &Channel,
        delivery: lapin::message::Delivery,
        failures: &Failures,
        report: &Mutex<InboxReport>,
        turn: Turn,
    ) {
        let Turn { halt, permit } = turn;
        let tag = delivery.delivery_tag;
        let count =
            |f: fn(&mut InboxReport)| f(&mut report.lock().unwrap_or_else(|e| e.into_inner()));
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string());
        let message_id = match unrecordable(message_id.as_deref()) {
            None => message_id.unwrap_or_default(),
            Some(why) => {
                tracing::warn!(
                    queue = %self.config.queue,
                    routing_key = %delivery.routing_key,
                    "rejecting a delivery {why}: it cannot be deduplicated"
                );
                let _ = channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false })
                    .await;
                count(|r| r.rejected += 1);
                return;
            }
        };
        let msg = InboxMessage {
            message_id: message_id.clone(),
            exchange: delivery.exchange.to_string(),
            routing_key: delivery.routing_key.to_string(),
            payload: delivery.data,
            properties: delivery.properties,
            redelivered: delivery.redelivered,
        };
        let span = tracing::debug_span!("inbox", consumer = %self.config.consumer, message_id = %message_id);
        let [mut stop, mut ended] = halt.clone();
        let held = self
            .process_holding(handler, &msg, halt, report)
            .instrument(span)
            .await;
        let outcome = match held {
            Held::Done(Ok(d)) => d,
            Held::Done(Err(e)) => Disposition::Failed(format!("inbox database error: {e}")),
            Held::Stopped => {
                // Back to the queue for whoever consumes next; not a failure. (If the
                // channel is gone, the broker has requeued it already.)
                let requeue = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                let _ = channel.basic_nack(tag, requeue).await;
                return;
            }
        };
        match outcome {
            Disposition::Reused => {
                tracing::warn!(queue = %self.config.queue, message_id = %message_id,
                    "a delivery under the message_id of one already applied, with another body: \
                     not applied (a producer reused the id?); rejected, to the queue's \
                     dead-letter exchange if it has one");
                let _ = channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false })
                    .await;
                count(|r| r.rejected += 1);
            }
            Disposition::Applied | Disposition::Duplicate => {
                if outcome == Disposition::Duplicate {
                    tracing::debug!(message_id = %message_id, "duplicate: acked without running the handler");
                    count(|r| r.duplicates += 1);
                } else {
                    count(|r| r.applied += 1);
                }
                failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&message_id);
                // If this ack is lost, the redelivery is recognised as a duplicate.
                let _ = channel.basic_ack(tag, BasicAckOptions::default()).await;
            }
            Disposition::Failed(why) => {
                let seen = {
                    let mut f = failures.lock().unwrap_or_else(|e| e.into_inner());
                    if f.len() >= FAILURES_KEPT && !f.contains_key(&message_id) {
                        f.clear();
                    }
                    let header = delivery_count(&msg);
                    let (n, base) = f.entry(message_id.clone()).or_insert((0, header));
                    *n += 1;
                    failures_seen(*n, *base, header)
                };
                if seen > self.config.max_redeliveries {
                    tracing::warn!(message_id = %message_id, error = %why, attempts = seen,
                        "handler keeps failing: rejected; the broker moves it to the queue's \
                         dead-letter exchange if it has one, and deletes it if not");
                    failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&message_id);
                    let _ = channel
                        .basic_reject(tag, BasicRejectOptions { requeue: false })
                        .await;
                    count(|r| r.rejected += 1);
                } else {
                    let delay = backoff::delay(&self.config.failure_backoff, seen);
                    tracing::warn!(message_id = %message_id, error = %why, attempt = seen, retry_in = ?delay, "handler failed: rolled back; requeueing after a wait");
                    // Held meanwhile, in one of the prefetch's places but not in a handler's:
                    // the messages behind it go on. A stop or the session's end requeues it
                    // at once.
                    drop(permit);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stopped(&mut stop) => {}
                        _ = stopped(&mut ended) => {}
                    }
                    let _ = channel
                        .basic_nack(
                            tag,
                            BasicNackOptions {
                                multiple: false,
                                requeue: true,
                            },
                        )
                        .await;
                    count(|r| r.requeued += 1);
                }
            }
        }
    }

    /// [`process`](Self::process), holding the delivery while the database is unreachable:
    /// tried again with capped backoff until it is back, or until `halt` says stop.
    async fn process_holding(
        &self,
        handler: &dyn Handler,
        msg: &InboxMessage,
        halt: [tokio::sync::watch::Receiver<bool>; 2],
        report: &Mutex<InboxReport>,
    ) -> Held {
        let [mut stop, mut ended] = halt;
        let mut waits = 0u32;
        loop {
            let e = match self.process(handler, msg).await {
                Err(e) if database_unavailable(&e) => e,
                done => return Held::Done(done),
            };
            waits += 1;
            let delay = backoff::delay(&self.config.database_retry, waits);
            if waits == 1 {
                report.lock().unwrap_or_else(|p| p.into_inner()).held += 1;
                tracing::warn!(message_id = %msg.message_id, error = %e, retry_in = ?delay, "inbox database unreachable: holding the delivery until it is back (not counted as a failure)");
            } else {
                tracing::debug!(message_id = %msg.message_id, error = %e, retry_in = ?delay, attempt = waits, "inbox database still unreachable");
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut stop) => return Held::Stopped,
                _ = stopped(&mut ended) => return Held::Stopped,
            }
        }
    }
}

/// The body's SHA-256, recorded with its id: a later body under the same id is compared.
fn body_digest(payload: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(payload).to_vec()
}

/// Why a delivery's `message_id` cannot be recorded in the inbox, if it cannot: none, an
/// empty one (every such message would share one inbox row, and all but the first would be
/// dropped as duplicates), or one holding a NUL (PostgreSQL's `text` refuses it, so every
/// attempt would fail).
fn unrecordable(message_id: Option<&str>) -> Option<&'static str> {
    match message_id {
        None => Some("without message_id"),
        Some("") => Some("with an empty message_id"),
        Some(id) if id.contains('\0') => Some("whose message_id holds a NUL byte"),
        Some(_) => None,
    }
}

/// Whether `e` means the database could not be reached or the connection broke. The
/// message is not at fault then, unlike a statement PostgreSQL answered with an error.
fn database_unavailable(e: &StoreError) -> bool {
    match e {
        StoreError::Connect { .. } | StoreError::Pool(_) => true,
        StoreError::Query(e) => connection_failed(e),
        _ => false,
    }
}

/// diesel-async reports a failure that carries no SQLSTATE (socket closed or reset,
/// nothing could be sent) as `UnableToSendCommand`. A statement the server answered
/// and then dropped the connection for (an administrator shutdown) shows up here too:
/// the rollback that follows it fails that way, and that is the error returned.
///
/// The server's own goodbye (SQLSTATE class 57: "terminating connection due to
/// administrator command", "… due to unexpected postmaster exit", "… because of crash of
/// another server process") can be the error returned too; diesel does not pass the
/// SQLSTATE on, so its text is read (a server whose messages are in another language leaves
/// it a handler failure, counted).
fn connection_failed(e: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind as Kind, Error};
    match e {
        Error::DatabaseError(Kind::UnableToSendCommand | Kind::ClosedConnection, _) => true,
        Error::DatabaseError(_, info) if info.message().starts_with("terminating connection") => {
            true
        }
        Error::BrokenTransactionManager => true,
        Error::RollbackErrorOnCommit {
            rollback_error,
            commit_error,
        } => connection_failed(rollback_error) || connection_failed(commit_error),
        _ => false,
    }
}

/// Resolves once a stop was requested (or the sender is gone).
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// How many times a message has failed, as far as this run can tell: its own count `n`,
/// and never below a quorum queue's `x-delivery-count` (`header`; failures in other
/// consumers' runs count too), but never more than the count the header had at this run's
/// first failure (`base`) plus `n`. A classic queue keeps a producer's own header on every
/// redelivery: `x-delivery-count: 100`, written by the producer, would otherwise have the
/// message rejected at its first failure here.
fn failures_seen(n: u32, base: u32, header: u32) -> u32 {
    n.max(header.min(base.saturating_add(n)))
}

/// The broker's own redelivery count (quorum queues set `x-delivery-count`).
fn delivery_count(msg: &InboxMessage) -> u32 {
    // A first delivery's header can only be the publisher's: a producer could otherwise
    // have a message rejected at its first failure by writing `x-delivery-count: 100`.
    if !msg.redelivered {
        return 0;
    }
    match msg
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
    {
        Some(AMQPValue::LongLongInt(n)) => u32::try_from(*n).unwrap_or(0),
        Some(AMQPValue::LongInt(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::result::{DatabaseErrorKind as Kind, Error};

    #[test]
    fn a_producers_delivery_count_does_not_count_as_failures() {
        // A classic queue keeps the producer's header; the first delivery's is ignored.
        assert_eq!(failures_seen(1, 0, 100), 1);
        assert_eq!(failures_seen(2, 0, 100), 2);
        // A quorum queue's own count, including failures in another consumer's run.
        assert_eq!(failures_seen(1, 3, 3), 3);
        assert_eq!(failures_seen(2, 3, 4), 4);
        assert_eq!(failures_seen(1, 0, 0), 1);
    }

    fn db(kind: Kind) -> Error {
        Error::DatabaseError(kind, Box::new("connection closed".to_string()))
    }

    #[test]
    fn an_unreachable_database_is_told_apart_from_a_refused_statement() {
        let unreachable = [
            StoreError::Connect {
                target: "postgres://h/db".into(),
                reason: "refused".into(),
            },
            StoreError::Pool("timed out".into()),
            StoreError::Query(db(Kind::UnableToSendCommand)),
            StoreError::Query(db(Kind::ClosedConnection)),
            StoreError::Query(Error::RollbackErrorOnCommit {
                rollback_error: Box::new(db(Kind::UnableToSendCommand)),
                commit_error: Box::new(db(Kind::Unknown)),
            }),
            // The server's FATAL as a postmaster dies (57P01), as an outside audit saw it.
            StoreError::Query(Error::DatabaseError(
                Kind::Unknown,
                Box::new("terminating connection due to unexpected postmaster exit".to_string()),
            )),
        ];
        for e in &unreachable {
            assert!(database_unavailable(e), "{e}");
        }
        let refused = [
            StoreError::Query(db(Kind::UniqueViolation)),
            StoreError::Query(db(Kind::Unknown)),
            StoreError::Query(Error::NotFound),
            StoreError::Schema("x".into()),
        ];
        for e in &refused {
            assert!(!database_unavailable(e), "{e}");
        }
    }

    #[test]
    fn message_ids_the_inbox_cannot_record_are_named() {
        assert_eq!(unrecordable(Some("a5c1")), None);
        assert!(unrecordable(None).is_some());
        assert!(unrecordable(Some("")).is_some());
        assert!(unrecordable(Some("a\0b")).unwrap().contains("NUL"));
    }
}
