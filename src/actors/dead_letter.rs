//! The DeadLetter actor: the last stop of a message whose attempts are exhausted.
//!
//! It asks the Store to move the rows to `dead_letters` (one statement: the row leaves the
//! outbox only as it lands there) and, when `dead_letter.exchange` is set, also publishes
//! each moved message to that exchange with `x-courier-*` headers saying why. The table is
//! the record; the exchange is a convenience, so a failed dead-letter publish is logged,
//! never retried into a loop. It owns its own AMQP connection, opened on first use, so a
//! blocked or broken publishing channel never holds up dead-lettering. A failed move keeps
//! its rows and is retried with backoff.
//!
//! **The exchange is a side path that must not block the table.** Moving rows and publishing
//! them to the exchange are two independent loops: the next batch is moved while the last
//! one is still being published. Every step of a dead-letter publish is bounded — opening
//! the link by `broker.connect_timeout`, the writes by progress (nothing written for
//! `broker.connect_timeout`), the confirms by progress (none for `retry.confirm_timeout`) —
//! and a publish that times out is logged and its link dropped, to be reopened for the next
//! batch. While the exchange is unreachable, at most [`EXCHANGE_BACKLOG`] moved rows wait
//! for it; older ones are dropped from the exchange side with a warning (they are in the
//! table).
//!
//! **One line per dead letter, within bounds.** Each moved row gets a WARN naming its id and
//! reason, at most [`LINES_PER_WINDOW`] per [`LINE_WINDOW`]; beyond that the rows are
//! counted and said in one WARN at the window's end. A producer that writes a million rows
//! to a missing exchange must not write a million log lines; every reason is in
//! `dead_letters` (`courier dead-letters list`).

use std::{collections::VecDeque, sync::Arc, time::Duration};

use actix::prelude::*;
use lapin::{
    options::BasicPublishOptions,
    types::{AMQPValue, LongString, ShortString},
    BasicProperties, Channel, Confirmation, Connection,
};
use uuid::Uuid;

use super::{
    ledger::{Ledger, MoveToDeadLetters},
    scheduler::Credits,
};
use crate::{
    broker, config::Config, events::Signals, message::check_header_frame, state::Delivery,
    store::DeadLetterUpdate,
};

/// Most moved rows waiting to be published to the dead-letter exchange.
pub const EXCHANGE_BACKLOG: usize = 10_000;

/// Most rows in one dead-letter exchange publish.
const EXCHANGE_BATCH: usize = 512;

/// Most per-row "dead-lettered" lines in one [`LINE_WINDOW`].
const LINES_PER_WINDOW: u32 = 20;

/// The window of [`LINES_PER_WINDOW`], and how often the rows beyond it are said.
const LINE_WINDOW: Duration = Duration::from_secs(10);

/// Dead-letter these messages (each in state `Failed`) with the final reason.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Bury(pub Vec<(Delivery, String)>);

/// See the module documentation.
pub struct DeadLetterActor {
    config: Arc<Config>,
    ledger: Addr<Ledger>,
    signals: Signals,
    pending: Vec<(Delivery, String)>,
    busy: bool,
    failures: u32,
    /// After a batch failed: rows are moved one at a time, so that one row that cannot
    /// leave the outbox (a producer's foreign key references it) holds up no other.
    solo: bool,
    /// Moved rows waiting for the dead-letter exchange.
    to_exchange: VecDeque<(Delivery, String)>,
    /// A dead-letter exchange publish is under way (it owns `link` meanwhile).
    forwarding: bool,
    link: Option<(Arc<Connection>, Channel)>,
    lines: Lines,
}

/// The per-row lines written in the current window, and the rows moved without one.
#[derive(Debug, Default)]
struct Lines {
    since: Option<std::time::Instant>,
    said: u32,
    unsaid: u64,
}

impl Lines {
    /// Whether one more moved row gets its own line at `now`.
    fn take(&mut self, now: std::time::Instant) -> bool {
        let fresh = self
            .since
            .is_none_or(|since| now.saturating_duration_since(since) >= LINE_WINDOW);
        if fresh {
            self.since = Some(now);
            self.said = 0;
        }
        if self.said < LINES_PER_WINDOW {
            self.said += 1;
            true
        } else {
            self.unsaid += 1;
            false
        }
    }

    /// The rows moved without a line of their own since the last call.
    fn unsaid(&mut self) -> u64 {
        std::mem::take(&mut self.unsaid)
    }
}

impl DeadLetterActor {
    /// A dead-letter actor writing through `ledger`.
    pub fn new(config: Arc<Config>, ledger: Addr<Ledger>, signals: Signals) -> Self {
        DeadLetterActor {
            config,
            ledger,
            signals,
            pending: Vec::new(),
            busy: false,
            failures: 0,
            solo: false,
            to_exchange: VecDeque::new(),
            forwarding: false,
            link: None,
            lines: Lines::default(),
        }
    }

    fn drain(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.pending.is_empty() {
            return;
        }
        self.busy = true;
        let batch = if self.solo {
            vec![self.pending.remove(0)]
        } else {
            std::mem::take(&mut self.pending)
        };
        // Where each moved row's `dead letter` span starts.
        let since = std::time::SystemTime::now();
        let updates = batch
            .iter()
            .map(|(d, why)| DeadLetterUpdate {
                id: d.message.id,
                error: why.clone(),
            })
            .collect();
        self.ledger
            .send(MoveToDeadLetters(updates))
            .into_actor(self)
            .map(move |result, act, ctx| match result {
                Ok(Ok(moved)) => {
                    act.failures = 0;
                    act.solo &= !act.pending.is_empty();
                    act.buried(ctx, batch, moved, since);
                }
                Ok(Err(e)) => act.retry_later(ctx, batch, e.to_string()),
                Err(e) => act.retry_later(ctx, batch, e.to_string()),
            })
            .spawn(ctx);
    }

    fn retry_later(
        &mut self,
        ctx: &mut Context<Self>,
        batch: Vec<(Delivery, String)>,
        why: String,
    ) {
        self.failures += 1;
        let delay = crate::backoff::STORE_WRITE.delay(self.failures);
        tracing::warn!(error = %why, rows = batch.len(), retry_in = ?delay, "could not move rows to dead_letters; retrying");
        if self.solo {
            // This one row failed alone: the others go first.
            self.pending.extend(batch);
        } else {
            self.solo = batch.len() > 1;
            self.pending.splice(0..0, batch);
        }
        ctx.run_later(delay, |act, ctx| {
            act.busy = false;
            act.drain(ctx);
        });
    }

    fn buried(
        &mut self,
        ctx: &mut Context<Self>,
        batch: Vec<(Delivery, String)>,
        moved: Vec<Uuid>,
        since: std::time::SystemTime,
    ) {
        let moved: std::collections::HashSet<Uuid> = moved.into_iter().collect();
        // Every row of the batch is settled here, moved or not (a row no longer held was
        // taken over by another engine: it is not this engine's to bound any more).
        let mut credits = Credits::default();
        let mut announced = Vec::with_capacity(moved.len());
        let mut to_exchange = Vec::new();
        let now = std::time::Instant::now();
        for (mut delivery, why) in batch {
            credits.settled(delivery.take_credit());
            if moved.contains(&delivery.message.id) {
                if self.lines.take(now) {
                    tracing::warn!(message_id = %delivery.message.id, reason = %why, "dead-lettered");
                } else {
                    tracing::debug!(message_id = %delivery.message.id, reason = %why, "dead-lettered");
                }
                if let Some(trace) = delivery.trace.take() {
                    trace.dead_lettered(since, &why);
                }
                announced.push((delivery.message.id, why.clone()));
                to_exchange.push((delivery, why));
            } else {
                tracing::warn!(message_id = %delivery.message.id, "not dead-lettered: the row is no longer held by this engine");
            }
        }
        let exchanges = to_exchange.iter().map(|(d, _)| d.message.exchange.as_str());
        self.signals.dead_lettered(announced, exchanges);
        credits.repay();
        if self.config.dead_letter.exchange.is_some() {
            self.to_exchange.extend(to_exchange);
            let over = self.to_exchange.len().saturating_sub(EXCHANGE_BACKLOG);
            if over > 0 {
                self.to_exchange.drain(..over);
                tracing::warn!(
                    dropped = over,
                    "dead-letter exchange backlog full; the oldest rows are not published there (they are in dead_letters)"
                );
            }
        }
        // The next batch is moved now, whatever the exchange is doing.
        self.busy = false;
        self.drain(ctx);
        self.forward(ctx);
    }

    /// Publishes the next batch of moved rows to the dead-letter exchange, one batch at a time.
    fn forward(&mut self, ctx: &mut Context<Self>) {
        let Some(exchange) = self.config.dead_letter.exchange.clone() else {
            return;
        };
        if self.forwarding || self.to_exchange.is_empty() {
            return;
        }
        self.forwarding = true;
        let n = self.to_exchange.len().min(EXCHANGE_BATCH);
        let items: Vec<_> = self.to_exchange.drain(..n).collect();
        let link = self.link.take();
        let cfg = self.config.broker.clone();
        let bounds = Bounds {
            connect: cfg.connect_timeout,
            confirm: self.config.retry.confirm_timeout,
        };
        async move { publish_to_exchange(link, &cfg, bounds, &exchange, items).await }
            .into_actor(self)
            .map(|link, act, ctx| {
                act.link = link;
                act.forwarding = false;
                act.forward(ctx);
            })
            .spawn(ctx);
    }
}

/// How long a dead-letter exchange publish may go without progress.
#[derive(Clone, Copy)]
struct Bounds {
    /// Opening the link, and the gap between two completed writes.
    connect: Duration,
    /// The gap between two confirms.
    confirm: Duration,
}

/// Publishes dead letters to the exchange with confirms; returns the link for reuse, or
/// `None` when it failed or stalled (it is reopened for the next batch).
async fn publish_to_exchange(
    link: Option<(Arc<Connection>, Channel)>,
    cfg: &crate::config::BrokerConfig,
    bounds: Bounds,
    exchange: &str,
    items: Vec<(Delivery, String)>,
) -> Option<(Arc<Connection>, Channel)> {
    let (conn, channel) = match link.filter(|(_, ch)| ch.status().connected()) {
        Some(l) => l,
        None => {
            // Each node of the list gets its own bound (a dead node is skipped, not waited on).
            let nodes = u32::try_from(cfg.url.len()).unwrap_or(u32::MAX).max(1);
            let opened = tokio::time::timeout(bounds.connect.saturating_mul(nodes), open(cfg))
                .await
                .unwrap_or_else(|_| {
                    Err(broker::BrokerError::Lost(format!(
                        "no link within {}",
                        humantime::format_duration(bounds.connect)
                    )))
                });
            match opened {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, count = items.len(), "cannot publish to the dead-letter exchange (rows are in dead_letters)");
                    return None;
                }
            }
        }
    };
    let Ok(exchange_name) = ShortString::try_new(exchange) else {
        return None;
    };
    let frame_max = conn.configuration().frame_max();
    let mut writes = Vec::with_capacity(items.len());
    for (d, why) in &items {
        let m = &d.message;
        let Some(props) = dead_letter_properties(d, why, frame_max) else {
            tracing::error!(message_id = %m.id, "dead letter has no publishable form (row is in dead_letters)");
            continue;
        };
        let routing_key = ShortString::try_new(m.routing_key.as_str()).unwrap_or_default();
        let publish = channel.basic_publish(
            exchange_name.clone(),
            routing_key,
            BasicPublishOptions::default(),
            &m.payload,
            props,
        );
        let id = m.id;
        writes.push(async move { (id, publish.await) });
    }
    let Some(written) = broker::until_stalled(writes, bounds.connect, || false).await else {
        tracing::error!(count = items.len(), idle = %humantime::format_duration(bounds.connect),
            "dead-letter exchange publish stalled; dropping its link (rows are in dead_letters)");
        return None;
    };
    let mut confirms = Vec::with_capacity(written.len());
    for (id, result) in written {
        match result {
            Ok(confirm) => confirms.push(async move { (id, confirm.await) }),
            Err(e) => {
                tracing::error!(message_id = %id, error = %e, "dead-letter exchange publish failed (row is in dead_letters)");
            }
        }
    }
    let Some(answers) = broker::until_stalled(confirms, bounds.confirm, || false).await else {
        tracing::error!(count = items.len(), idle = %humantime::format_duration(bounds.confirm),
            "dead-letter exchange did not confirm in time; dropping its link (rows are in dead_letters)");
        return None;
    };
    for (id, answer) in answers {
        match answer {
            Ok(Confirmation::Ack(_)) => {}
            Ok(Confirmation::Nack(_) | Confirmation::NotRequested) => {
                tracing::error!(message_id = %id, "dead-letter exchange did not take the copy: nacked (row is in dead_letters)")
            }
            Err(e) => {
                let why = match broker::ChannelClose::from_error(&e) {
                    Some(close) => format!("{} {}", close.code, close.text),
                    None => e.to_string(),
                };
                tracing::error!(message_id = %id, error = %why, "dead-letter exchange did not confirm (row is in dead_letters)")
            }
        }
    }
    channel.status().connected().then_some((conn, channel))
}

/// The row's properties plus the `x-courier-*` headers. A row whose headers or content type
/// AMQP cannot carry, or whose headers would not fit in one frame of this connection (a
/// frame error closes the whole dead-letter connection), still reaches the exchange, without
/// them.
fn dead_letter_properties(d: &Delivery, why: &str, frame_max: u32) -> Option<BasicProperties> {
    let m = &d.message;
    let with_courier_headers = |props: BasicProperties| {
        let mut headers = props.headers().clone().unwrap_or_default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
        headers.insert("x-courier-reason".into(), text(why));
        headers.insert(
            "x-courier-attempts".into(),
            AMQPValue::LongLongInt(i64::from(d.attempts())),
        );
        headers.insert("x-courier-original-exchange".into(), text(&m.exchange));
        headers.insert(
            "x-courier-original-routing-key".into(),
            text(&m.routing_key),
        );
        props.with_headers(headers)
    };
    let full = m
        .amqp_properties()
        .map(with_courier_headers)
        .and_then(|p| check_header_frame(&p, frame_max).map(|()| p));
    full.or_else(|dropped| {
        let mut bare = m.clone();
        bare.headers = serde_json::json!({ "x-courier-headers-dropped": dropped });
        bare.content_type = None;
        let p = with_courier_headers(bare.amqp_properties()?);
        check_header_frame(&p, frame_max).map(|()| p)
    })
    .ok()
}

async fn open(
    cfg: &crate::config::BrokerConfig,
) -> Result<(Arc<Connection>, Channel), broker::BrokerError> {
    let conn = Arc::new(broker::connect(cfg, "-dead-letters").await?);
    let channel = broker::confirm_channel(&conn).await?;
    Ok((conn, channel))
}

impl Actor for DeadLetterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(LINE_WINDOW, |act, _| match act.lines.unsaid() {
            0 => {}
            rows => tracing::warn!(
                rows,
                "more rows dead-lettered in the last {} than get a line each ({LINES_PER_WINDOW}); \
                 `courier dead-letters list` shows them with their reasons",
                humantime::format_duration(LINE_WINDOW)
            ),
        });
    }
}

impl Handler<Bury> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, msg: Bury, ctx: &mut Context<Self>) {
        self.pending.extend(msg.0);
        self.drain(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn dead_letter_lines_are_bounded_per_window_and_the_rest_counted() {
        let mut lines = Lines::default();
        let start = Instant::now();
        let said = (0..1_000).filter(|_| lines.take(start)).count();
        assert_eq!(said, LINES_PER_WINDOW as usize);
        assert_eq!(lines.unsaid(), 1_000 - u64::from(LINES_PER_WINDOW));
        assert_eq!(lines.unsaid(), 0, "counted once");
        // Within the window, still nothing; a new window says rows again.
        assert!(!lines.take(start + LINE_WINDOW / 2));
        assert!(lines.take(start + LINE_WINDOW));
    }
}
