//! The Publisher: owns one AMQP connection and its confirm-mode channel.
//!
//! An engine runs `publisher.connections` of them (lanes), each with its own
//! ConfirmTracker, and the Scheduler hands batches to them in turn. RabbitMQ's credit flow
//! pauses each connection on its own (seen here: one engine's only connection was in `flow`
//! in every 50 ms sample of a quorum drain), so a second connection publishes while the
//! first is paused. Per-key order does not need a key to stay on one connection: a key's
//! next message is handed on only after its predecessor's confirm.
//!
//! Every message is published persistent and `mandatory`, with `message_id` = row id. A
//! batch is written in one go (each `basic_publish` future registers its confirm and queues
//! its frames on first poll, so polling them together pipelines the whole batch), and each
//! message's `PublisherConfirm` goes to the ConfirmTracker. Messages that cannot be sent at
//! all — names over 255 bytes, headers AMQP cannot carry or too large for the connection's
//! `frame_max`, payloads over the limit, a missing exchange — never reach the channel: one
//! bad row must not close the channel under a thousand good ones. Missing
//! exchanges are found with a passive declare on a side channel, cached for a short while
//! (the cache, and the refusals below, are shared by the engine's publishing connections).
//! The first row to an exchange not seen lately is published alone on a fresh channel and
//! its confirm awaited (`probe`): an exchange that exists but refuses this user (403:
//! internal, or no write permission) closes that channel, not the publishing one. An
//! exchange the broker refused is remembered as long, and rows to it are failed — charged
//! an attempt — without being published, so a refused row closes a channel a bounded number
//! of times.
//!
//! A message the broker may have closed the whole connection over (it was in flight when
//! a connection-level error came, which names no message) is a suspect: it goes to the
//! Isolation actor, which publishes it alone on a connection of its own (`isolation`). A
//! connection that has no channel number left (lapin does not give back a channel the
//! broker closed, as each 404 of a passive declare does) is replaced.
//!
//! A batch's writes are bounded by progress (`broker::until_stalled`): the connection is
//! presumed dead only when no write of the batch completed for `broker.connect_timeout`, so a
//! batch of large messages on a slow link is not mistaken for a dead connection.
//!
//! The actor runs under an actix `Supervisor`. The publish handler is atomic (it blocks the
//! mailbox until the batch is written). Connection events are read by a small watcher task
//! outside the mailbox: `connection.blocked` must reach the Scheduler even while a publish
//! waits on the blocked socket. A lost connection stops the actor, `restarting` drops the
//! link and `started` reconnects at once, starting with the next node of `broker.url` (round
//! robin over a cluster's nodes); capped, jittered backoff only after a whole pass over the
//! nodes failed. A permanent refusal (login, vhost, TLS) is logged as an error with its
//! cause and retried all the same (at start, `Engine::start` refuses to start instead). The tracker fails every
//! unconfirmed message of the lost connection back to `retrying` (duplicates are allowed,
//! loss is not). Once a graceful shutdown begins, claimed rows that reach the publisher are
//! given back to the outbox unpublished.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use lapin::{
    options::BasicPublishOptions, types::ShortString, BasicProperties, Channel, Connection, Event,
};

mod exchanges;
mod isolation;
mod probe;
mod stuck;

pub use exchanges::ExchangeBook;
use exchanges::{exchange_exists, probe_new_exchanges, CheckFailed};
use isolation::{Isolate, Suspect};
pub use isolation::{Isolation, Suspects};
use stuck::ChannelAnswers;

use super::{
    confirms::{
        Blocked, ConfirmTracker, ConnectionLost, Published, Track, Unsent, Writing, Written,
    },
    ledger::{Ledger, Release},
    scheduler::{BrokerReady, Credits, Scheduler},
};
use crate::{
    backoff,
    broker::{self, BrokerError, ChannelClose},
    config::Config,
    events::{BrokerState, Signals},
    lifecycle::Lifecycle,
    state::{Delivery, FailureReason},
};

/// Publish these claimed messages.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish(pub Vec<Delivery>);

/// The broker closed a channel of connection `generation` (a soft error, e.g. 403).
#[derive(Message)]
#[rtype(result = "()")]
struct ChannelClosed {
    generation: u64,
    close: ChannelClose,
}

/// The watcher saw connection `generation` fail.
#[derive(Message)]
#[rtype(result = "()")]
struct ConnectionFailed {
    generation: u64,
    why: String,
    /// The broker closed it for something sent on it (see `isolation`).
    for_input: bool,
}

struct Link {
    conn: Arc<Connection>,
    channel: Channel,
    /// The publisher's number for `channel` (see `Published::channel`).
    channel_no: u64,
    /// How the broker has been answering `channel`'s publishes (see `stuck`).
    answers: ChannelAnswers,
    side: Option<Channel>,
}

/// Which of the engine's publishing connections a Publisher is, and what it shares with the
/// others.
pub struct Lane {
    /// From 0 to `publisher.connections - 1`.
    pub index: usize,
    /// Shared by every lane of the engine.
    pub exchanges: ExchangeBook,
    /// Messages to publish alone, shared by every lane and tracker of the engine.
    pub suspects: Suspects,
    /// Where suspects are published.
    pub isolation: Addr<Isolation>,
}

/// See the module documentation.
pub struct Publisher {
    /// Which of the engine's publishing connections this is (`publisher.connections`).
    lane: usize,
    /// Shared with the engine's other publishers.
    exchanges: ExchangeBook,
    suspects: Suspects,
    isolation: Addr<Isolation>,
    config: Arc<Config>,
    tracker: Addr<ConfirmTracker>,
    scheduler: Addr<Scheduler>,
    ledger: Addr<Ledger>,
    generation: u64,
    signals: Signals,
    lifecycle: Lifecycle,
    link: Option<Link>,
    next_token: u64,
    channels_opened: u64,
    failed_connects: u32,
    ever_connected: bool,
    /// The node of `broker.url` the link is on (or was, when it was lost).
    node: usize,
    /// Where the next connection attempt starts: the node after the one lost.
    next_node: usize,
}

impl Publisher {
    /// Publishing connection `lane`, which connects when started.
    pub fn new(
        Lane {
            index: lane,
            exchanges,
            suspects,
            isolation,
        }: Lane,
        config: Arc<Config>,
        tracker: Addr<ConfirmTracker>,
        scheduler: Addr<Scheduler>,
        ledger: Addr<Ledger>,
        signals: Signals,
        lifecycle: Lifecycle,
    ) -> Self {
        Publisher {
            lane,
            exchanges,
            suspects,
            isolation,
            config,
            tracker,
            scheduler,
            ledger,
            generation: 0,
            signals,
            lifecycle,
            link: None,
            next_token: 0,
            channels_opened: 0,
            failed_connects: 0,
            ever_connected: false,
            // The connections start on different nodes of a cluster.
            node: lane,
            next_node: lane,
        }
    }

    fn ready(&self, ready: bool) -> BrokerReady {
        BrokerReady {
            lane: self.lane,
            ready,
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        let cfg = self.config.broker.clone();
        let start = self.next_node;
        let lane = self.lane;
        ctx.wait(
            async move { open_link(&cfg, lane, start).await }
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok((mut link, events, node)) => {
                        act.node = node;
                        act.next_node = node;
                        let url = act.config.broker.url.get(node).map(|u| u.redacted());
                        tracing::info!(broker = url.as_deref().unwrap_or_default(), node, lane = act.lane, "connected to RabbitMQ");
                        if act.ever_connected {
                            // The broker may have restarted and lost exchanges: check
                            // again. (A lane's first connection keeps what the other
                            // lanes learned moments ago.)
                            act.signals.reconnected();
                            act.exchanges.entries().forget_known();
                        }
                        act.ever_connected = true;
                        act.failed_connects = 0;
                        act.channels_opened += 1;
                        link.channel_no = act.channels_opened;
                        act.generation += 1;
                        watch(
                            events,
                            act.generation,
                            act.lane,
                            ctx.address(),
                            act.tracker.clone(),
                            act.scheduler.clone(),
                            act.signals.clone(),
                        );
                        act.link = Some(link);
                        act.signals.broker_connected();
                        act.scheduler.do_send(act.ready(true));
                    }
                    Err(e) => {
                        // Every node was tried once: only now back off.
                        act.failed_connects += 1;
                        let delay = backoff::RECONNECT.delay(act.failed_connects);
                        if e.is_permanent() {
                            act.signals.broker_refused(e.to_string());
                            tracing::error!(error = %e, retry_in = ?delay, lane = act.lane, "RabbitMQ refused the connection; this needs a change of configuration or on the broker");
                        } else {
                            tracing::warn!(error = %e, retry_in = ?delay, lane = act.lane, "cannot reach RabbitMQ");
                        }
                        ctx.run_later(delay, |act, ctx| act.connect(ctx));
                    }
                }),
        );
    }

    /// The connection is gone: fail what was in flight and start over. `for_input`: the
    /// broker closed it for something sent on it (see `isolation`).
    fn lost(&mut self, ctx: &mut Context<Self>, why: String, for_input: bool) {
        if self.link.is_none() {
            return;
        }
        tracing::warn!(reason = %why, node = self.node, lane = self.lane, "lost the RabbitMQ connection; its unconfirmed messages go back to retrying");
        self.link = None;
        // Reconnect at once, starting with the next node of the list (round robin).
        self.next_node = self.node + 1;
        self.signals.broker_disconnected(why.clone());
        self.scheduler.do_send(self.ready(false));
        self.tracker.do_send(ConnectionLost { why, for_input });
        ctx.stop(); // the Supervisor restarts us: `restarting`, then `started` reconnects.
    }

    /// The publishing channel closed (e.g. 404 from a deleted exchange): open a new one on
    /// the same connection, or start over if the connection is gone too.
    fn reopen_channel(&mut self, ctx: &mut Context<Self>) {
        if self.link.is_none() {
            return;
        }
        self.signals.channel_closed();
        self.open_new_channel(
            ctx,
            "publishing channel closed by the broker; opened a new one",
        );
    }

    /// The publishing channel has had nothing but nacks for `stuck::STUCK_AFTER`: close it
    /// and publish on a new one (see `stuck` for why this helps).
    fn replace_stuck_channel(&mut self, ctx: &mut Context<Self>, nacks: u64) {
        let Some(link) = &self.link else { return };
        tracing::warn!(nacks, node = self.node, after = ?stuck::STUCK_AFTER,
            "every publish on the channel was nacked; replacing the channel");
        self.signals.channel_replaced();
        // Its unconfirmed publishes fail with the close and are published again.
        let old = link.channel.clone();
        actix::spawn(async move {
            let _ = old
                .close(200, "replaced: every publish nacked".into())
                .await;
        });
        self.open_new_channel(ctx, "replaced the nacked channel");
    }

    fn open_new_channel(&mut self, ctx: &mut Context<Self>, done: &'static str) {
        let Some(link) = &self.link else { return };
        self.exchanges.entries().forget_known();
        let conn = link.conn.clone();
        let timeout = self.config.broker.connect_timeout;
        ctx.wait(
            async move {
                tokio::time::timeout(timeout, broker::confirm_channel(&conn))
                    .await
                    .unwrap_or_else(|_| Err(BrokerError::Lost("no answer to channel.open".into())))
            }
            .into_actor(self)
            .map(move |result, act, ctx| match (result, act.link.as_mut()) {
                (Ok(channel), Some(link)) => {
                    tracing::info!("{done}");
                    act.channels_opened += 1;
                    link.channel = channel;
                    link.channel_no = act.channels_opened;
                    link.answers = ChannelAnswers::default();
                }
                (Err(e), _) => act.lost(ctx, format!("cannot reopen channel: {e}"), false),
                (Ok(_), None) => {}
            }),
        );
    }

    fn link_alive(&self) -> bool {
        self.link
            .as_ref()
            .is_some_and(|l| l.conn.status().connected())
    }
}

/// Connects to the first node that answers from node `start` on, opens the confirm channel
/// and subscribes to connection events. Publishing connection `lane` is named
/// `<connection_name>` for the first, `<connection_name>-publisher-<n>` for the others.
async fn open_link(
    cfg: &crate::config::BrokerConfig,
    lane: usize,
    start: usize,
) -> Result<(Link, futures::stream::BoxStream<'static, Event>, usize), BrokerError> {
    use futures::StreamExt;
    let suffix = match lane {
        0 => String::new(),
        n => format!("-publisher-{}", n + 1),
    };
    let (conn, node) = broker::connect_from(cfg, &suffix, start).await?;
    let conn = Arc::new(conn);
    let events = conn.events_listener().boxed();
    let channel = broker::confirm_channel(&conn).await?;
    Ok((
        Link {
            conn,
            channel,
            channel_no: 0,
            answers: ChannelAnswers::default(),
            side: None,
        },
        events,
        node,
    ))
}

/// Reads connection events outside the Publisher's mailbox (see the module doc).
fn watch(
    mut events: futures::stream::BoxStream<'static, Event>,
    generation: u64,
    lane: usize,
    publisher: Addr<Publisher>,
    tracker: Addr<ConfirmTracker>,
    scheduler: Addr<Scheduler>,
    signals: Signals,
) {
    use futures::StreamExt;
    actix::spawn(async move {
        let mut blocked_since: Option<Instant> = None;
        while let Some(event) = events.next().await {
            match event {
                Event::ConnectionBlocked(reason) => {
                    blocked_since.get_or_insert_with(Instant::now);
                    tracing::warn!(%reason, "RabbitMQ blocked publishers; pausing claims");
                    signals.broker_blocked(reason);
                    tracker.do_send(Blocked(true));
                    scheduler.do_send(BrokerReady { lane, ready: false });
                }
                Event::ConnectionUnblocked => {
                    let blocked_for = blocked_since.take().map(|since| since.elapsed());
                    tracing::info!("RabbitMQ unblocked publishers; resuming");
                    signals.broker_unblocked(blocked_for);
                    tracker.do_send(Blocked(false));
                    scheduler.do_send(BrokerReady { lane, ready: true });
                }
                // A channel closed by the broker is reported here too: it is not the
                // connection failing, but it tells which exchange was refused.
                Event::Error(e) => match ChannelClose::from_error(&e) {
                    Some(close) => publisher.do_send(ChannelClosed { generation, close }),
                    None => publisher.do_send(ConnectionFailed {
                        generation,
                        why: e.to_string(),
                        for_input: ChannelClose::connection_for_input(&e).is_some(),
                    }),
                },
                _ => {}
            }
        }
        publisher.do_send(ConnectionFailed {
            generation,
            why: "connection closed".into(),
            for_input: false,
        });
    });
}

/// The AMQP form of one message, or why it cannot be sent.
struct Prepared {
    exchange: ShortString,
    routing_key: ShortString,
    properties: BasicProperties,
}

/// The routing keys of RabbitMQ's direct reply-to on the default exchange.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Whether the message's routing key, or any key of its `CC`/`BCC` headers (RabbitMQ routes
/// on those as extra routing keys), is a direct reply-to key.
fn routes_to_direct_reply_to(m: &crate::OutboxMessage) -> bool {
    let cc = ["CC", "BCC"].into_iter().flat_map(|name| {
        m.headers
            .get(name)
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
    });
    std::iter::once(m.routing_key.as_str())
        .chain(cc)
        .any(|key| key.starts_with(DIRECT_REPLY_TO))
}

/// Debug builds only: `COURIER_TESTING_PUBLISH_REPLY_TO` set lets direct reply-to keys
/// through, so that a test can make the broker close a connection over one message and
/// watch the engine find it (`tests/isolation.rs`). Release builds always refuse them.
#[cfg(debug_assertions)]
fn reply_to_let_through() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("COURIER_TESTING_PUBLISH_REPLY_TO").is_some())
}

#[cfg(not(debug_assertions))]
fn reply_to_let_through() -> bool {
    false
}

fn prepare(d: &mut Delivery, max_payload: u64, frame_max: u32) -> Result<Prepared, String> {
    let m = &d.message;
    if m.exchange.is_empty() && routes_to_direct_reply_to(m) && !reply_to_let_through() {
        // RabbitMQ decodes the rest of such a key as the requester's channel; a suffix it
        // cannot decode closes the whole connection (541 INTERNAL_ERROR) naming no message,
        // so the row would be refunded and published again for ever, taking every
        // unconfirmed message on that connection down with it. A reply that goes through
        // an outbox outlives the requester's wait anyway.
        return Err(format!(
            "routing key `{DIRECT_REPLY_TO}…` on the default exchange (direct reply-to, \
             as the routing key or in a CC/BCC header) is not published from the outbox: a \
             malformed one closes the whole connection"
        ));
    }
    if m.payload.len() as u64 > max_payload {
        return Err(format!(
            "payload of {} bytes is over publisher.max_payload_bytes ({max_payload})",
            m.payload.len()
        ));
    }
    let mut properties = m.amqp_properties()?;
    if let Some(trace) = d.trace.as_mut() {
        // The message carries the engine's span context on to its consumers.
        let mut headers = properties.headers().clone().unwrap_or_default();
        trace.publishing(&mut headers);
        properties = properties.with_headers(headers);
    }
    let m = &d.message;
    crate::message::check_header_frame(&properties, frame_max)?;
    Ok(Prepared {
        exchange: m.amqp_exchange()?,
        routing_key: m.amqp_routing_key()?,
        properties,
    })
}

/// Why a publish whose write failed did not go out: charged when the broker closed the
/// channel naming this message's exchange, refunded otherwise.
fn write_failure(d: &Delivery, e: &lapin::Error) -> FailureReason {
    match ChannelClose::from_error(e) {
        Some(close) if close.exchange() == Some(d.message.exchange.as_str()) => {
            FailureReason::Refused {
                code: close.code,
                text: close.text,
            }
        }
        _ => FailureReason::ChannelLost(e.to_string()),
    }
}

/// What one publish round produced.
struct Round {
    published: Vec<Published>,
    unsent: Vec<(Delivery, FailureReason)>,
    side: Option<Channel>,
    exchanges: HashMap<String, bool>,
    /// Exchanges a probe found refused.
    refused: Vec<(String, ChannelClose)>,
    channel_broken: bool,
    /// The writes hung: the whole connection is presumed dead.
    connection_suspect: bool,
    /// No channel could be opened for a check or a probe: the connection has no channel
    /// number left (see `exchanges::MISSING_FOR`), so only a new connection can go on.
    channels_exhausted: bool,
}

/// The publishing channel of one round, with the publisher's number for it.
struct OnChannel {
    conn: Arc<Connection>,
    channel: Channel,
    channel_no: u64,
    answers: ChannelAnswers,
}

async fn publish_round(
    on: OnChannel,
    mut side: Option<Channel>,
    ready: Vec<(Delivery, Prepared, u64)>,
    unknown: HashSet<String>,
    missing: HashSet<String>,
    check_timeout: Duration,
    signals: Signals,
) -> Round {
    let OnChannel {
        conn,
        channel,
        channel_no,
        answers,
    } = on;
    let mut exchanges = HashMap::new();
    let mut unsent = Vec::new();
    let mut check_failed: Option<FailureReason> = None;
    let mut channels_exhausted = false;
    for name in unknown {
        // Bounded: a stalled broker must not hold the publisher (and its mailbox) forever.
        match tokio::time::timeout(check_timeout, exchange_exists(&conn, &mut side, &name)).await {
            Ok(Ok(exists)) => {
                exchanges.insert(name, exists);
            }
            Ok(Err(CheckFailed { why, exhausted })) => {
                channels_exhausted |= exhausted;
                check_failed = Some(FailureReason::ChannelLost(format!(
                    "exchange check failed: {why}"
                )));
            }
            Err(_) => {
                side = None;
                // Judged by the ConfirmTracker: refunded only while the broker answers
                // nothing else either (see `FailureReason::Unanswered`).
                check_failed = Some(FailureReason::Unanswered(format!(
                    "exchange check failed: no answer to a passive declare within {}",
                    humantime::format_duration(check_timeout)
                )));
            }
        }
    }
    let mut to_send = Vec::with_capacity(ready.len());
    for (d, p, token) in ready {
        let ex = &d.message.exchange;
        let missing_lately = missing.contains(ex).then_some(&false);
        match exchanges.get(ex).or(missing_lately) {
            Some(false) => {
                let why = format!("exchange `{ex}` does not exist (404 NOT_FOUND)");
                unsent.push((d, FailureReason::Rejected(why)));
            }
            None if !ex.is_empty() && !exchanges.contains_key(ex) && check_failed.is_some() => {
                if let Some(why) = check_failed.clone() {
                    unsent.push((d, why));
                }
            }
            _ => to_send.push((d, p, token)),
        }
    }
    let probed = probe_new_exchanges(&conn, &exchanges, &mut to_send, check_timeout).await;
    unsent.extend(probed.unsent);

    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let mut metas = Vec::with_capacity(to_send.len());
    let mut deliveries = Vec::with_capacity(to_send.len());
    for (d, p, token) in to_send {
        metas.push(p);
        deliveries.push((d, token));
    }
    // Polled together: each future registers its confirm and queues its frames on its
    // first poll, in order, so the batch is pipelined rather than one round trip each.
    let writes = deliveries.iter().zip(metas).map(|((d, _), p)| {
        channel.basic_publish(
            p.exchange,
            p.routing_key,
            options,
            &d.message.payload,
            p.properties,
        )
    });
    // Bounded by progress: a socket that died without failing its pending writes must not
    // hold the publisher (and its mailbox) forever, but a slow link that keeps writing is
    // alive however long the batch takes. A broker that blocked publishers is waited for.
    let blocked = || signals.broker_state() == BrokerState::Blocked;
    let Some(results) = broker::until_stalled(writes, check_timeout, blocked).await else {
        let why = format!(
            "no publish of the batch written for {}",
            humantime::format_duration(check_timeout)
        );
        unsent.extend(
            deliveries
                .into_iter()
                .map(|(d, _)| (d, FailureReason::ChannelLost(why.clone()))),
        );
        return Round {
            published: probed.published,
            unsent,
            side,
            exchanges,
            refused: probed.refused,
            channel_broken: true,
            connection_suspect: true,
            channels_exhausted: false,
        };
    };
    let mut published = probed.published;
    published.reserve(deliveries.len());
    let mut channel_broken = false;
    for ((delivery, token), result) in deliveries.into_iter().zip(results) {
        match result {
            Ok(confirm) => published.push(Published {
                delivery,
                token,
                channel: channel_no,
                confirm: Box::pin(answers.watch(confirm)),
            }),
            Err(e) => {
                channel_broken = true;
                let why = write_failure(&delivery, &e);
                unsent.push((delivery, why));
            }
        }
    }
    Round {
        published,
        unsent,
        side,
        exchanges,
        refused: probed.refused,
        channel_broken: channel_broken || !channel.status().connected(),
        connection_suspect: false,
        channels_exhausted: channels_exhausted || probed.exhausted,
    }
}

impl Actor for Publisher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.connect(ctx);
    }
}

impl Supervised for Publisher {
    fn restarting(&mut self, _: &mut Context<Self>) {
        // Spawned futures are gone with the old context; the tracker was told to fail
        // everything unconfirmed in `lost`. Drop the link so `started` makes a new one.
        self.link = None;
        self.scheduler.do_send(self.ready(false));
    }
}

impl Handler<ChannelClosed> for Publisher {
    type Result = ();

    fn handle(&mut self, msg: ChannelClosed, _: &mut Context<Self>) {
        if msg.generation != self.generation {
            return;
        }
        if let Some(size) = msg.close.max_size() {
            tracing::warn!(max_message_size = size, reason = %msg.close.text,
                "the broker refused a message over its max_message_size; larger rows are \
                 dead-lettered unpublished for a while");
            self.exchanges.entries().limit_body(size);
            return;
        }
        if !msg.close.refuses_exchange() {
            return;
        }
        if let Some(exchange) = msg.close.exchange() {
            tracing::warn!(%exchange, code = msg.close.code, reason = %msg.close.text,
                "the broker refused an exchange; rows to it are failed unpublished for a while");
            self.exchanges.entries().refuse(exchange, msg.close.clone());
        }
    }
}

impl Handler<ConnectionFailed> for Publisher {
    type Result = ();

    fn handle(&mut self, msg: ConnectionFailed, ctx: &mut Context<Self>) {
        if msg.generation != self.generation {
            return; // an old connection's last words
        }
        if !self.link_alive() {
            self.lost(ctx, msg.why, msg.for_input);
            return;
        }
        // The error may be reported before the status flips: look again shortly.
        let generation = msg.generation;
        ctx.run_later(Duration::from_secs(1), move |act, ctx| {
            if act.generation == generation && act.link.is_some() && !act.link_alive() {
                act.lost(ctx, msg.why, msg.for_input);
            }
        });
    }
}

impl Handler<Publish> for Publisher {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) -> Self::Result {
        let overdue = !self.lifecycle.liveness.fresh();
        if self.lifecycle.shutdown.begun() || overdue {
            // Draining, or the registry beat is overdue (this engine may have been declared
            // dead and its rows taken over): give the rows back unpublished. The release is
            // fenced by the holder, so rows another engine took are left alone.
            if overdue {
                tracing::warn!(
                    rows = msg.0.len(),
                    "engine heartbeat overdue; giving claimed rows back unpublished"
                );
            }
            self.ledger.do_send(Release(Credits::released(msg.0)));
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        if self.link.is_none() {
            let why = FailureReason::ChannelLost("broker not connected".into());
            self.tracker.do_send(Unsent(
                msg.0.into_iter().map(|d| (d, why.clone())).collect(),
            ));
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        }
        let max_payload = self.config.publisher.max_payload_bytes;
        let frame_max = self
            .link
            .as_ref()
            .map_or(0, |l| l.conn.configuration().frame_max());
        let mut book = self.exchanges.entries();
        book.prune();
        let max_body = book.max_body();
        let mut ready = Vec::with_capacity(msg.0.len());
        let mut rejected = Vec::new();
        let mut suspects = Vec::new();
        // One lock per batch while there is no suspect, as almost always.
        let any_suspect = !self.suspects.is_empty();
        let mut unknown = HashSet::new();
        let mut missing = HashSet::new();
        for mut d in msg.0 {
            if let Some(close) = book.refusal(&d.message.exchange) {
                let why = FailureReason::Refused {
                    code: close.code,
                    text: format!("{} (not published: refused moments ago)", close.text),
                };
                rejected.push((d, why));
                continue;
            }
            if let Some(max) = max_body.filter(|max| d.message.payload.len() > *max) {
                let why = format!(
                    "a payload of {} bytes is over the broker's max_message_size of {max} bytes \
                     (it refused a larger message moments ago); not published: raise it there, \
                     or set publisher.max_payload_bytes below it",
                    d.message.payload.len()
                );
                rejected.push((d, FailureReason::Unpublishable(why)));
                continue;
            }
            match prepare(&mut d, max_payload, frame_max) {
                Ok(p) if any_suspect && self.suspects.contains(&d.message.id) => {
                    self.next_token += 1;
                    suspects.push(Suspect {
                        delivery: d,
                        prepared: p,
                        token: self.next_token,
                        tracker: self.tracker.clone(),
                    });
                }
                Ok(p) => {
                    let ex = &d.message.exchange;
                    tracing::debug!(message_id = %d.message.id, exchange = %ex, attempt = d.attempts(), lane = self.lane, "publishing");
                    if book.missing(ex) {
                        missing.insert(ex.clone());
                    } else if !book.known(ex) {
                        unknown.insert(ex.clone());
                    }
                    self.next_token += 1;
                    ready.push((d, p, self.next_token));
                }
                Err(why) => rejected.push((d, FailureReason::Unpublishable(why))),
            }
        }
        drop(book);
        if !rejected.is_empty() {
            self.tracker.do_send(Unsent(rejected));
        }
        if !suspects.is_empty() {
            self.isolation.do_send(Isolate(suspects));
        }
        let Some(link) = self.link.as_mut() else {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        };
        let on = OnChannel {
            conn: link.conn.clone(),
            channel: link.channel.clone(),
            channel_no: link.channel_no,
            answers: link.answers.clone(),
        };
        self.tracker.do_send(Writing);
        let round = publish_round(
            on,
            link.side.take(),
            ready,
            unknown,
            missing,
            self.config.broker.connect_timeout,
            self.signals.clone(),
        );
        AtomicResponse::new(Box::pin(round.into_actor(self).map(|round, act, ctx| {
            let now = Instant::now();
            act.exchanges
                .entries()
                .learn(round.exchanges, round.refused, now);
            if let Some(link) = act.link.as_mut() {
                link.side = round.side;
            }
            let exchanges = round.published.iter();
            act.signals
                .published(exchanges.map(|p| p.delivery.message.exchange.as_str()));
            if !round.published.is_empty() {
                act.tracker.do_send(Track(round.published));
            }
            if !round.unsent.is_empty() {
                act.tracker.do_send(Unsent(round.unsent));
            }
            act.tracker.do_send(Written);
            let stuck = act.link.as_ref().and_then(|l| l.answers.stuck(now));
            if round.connection_suspect {
                act.lost(ctx, "publishes hung on the connection".into(), false);
            } else if round.channels_exhausted {
                let why = "no channel left to open on the connection (the client library does \
                           not give back channels the broker closed); connecting again";
                act.lost(ctx, why.into(), false);
            } else if round.channel_broken {
                act.reopen_channel(ctx);
            } else if let Some(nacks) = stuck {
                act.replace_stuck_channel(ctx, nacks);
            }
        })))
    }
}
