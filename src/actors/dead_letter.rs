//! The DeadLetter actor: the last stop of a message whose attempts are exhausted.
//!
//! It asks the Store to move the rows to `dead_letters` (one statement: the row leaves the
//! outbox only as it lands there) and, when `dead_letter.exchange` is set, also publishes
//! each moved message to that exchange with `x-courier-*` headers saying why. The table is
//! the record; the exchange is a convenience, so a failed dead-letter publish is logged,
//! never retried into a loop. It owns its own AMQP connection, opened on first use, so a
//! blocked or broken publishing channel never holds up dead-lettering. A failed move keeps
//! its rows and is retried with backoff.

use std::sync::Arc;

use actix::prelude::*;
use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, LongString, ShortString},
    Channel, Confirmation, Connection,
};
use uuid::Uuid;

use super::{
    scheduler::{Scheduler, Settled},
    store::{MoveToDeadLetters, StoreActor},
};
use crate::{
    broker,
    config::Config,
    events::{Counters, EngineEvent, Signals},
    state::Delivery,
    store::DeadLetterUpdate,
};

/// Dead-letter these messages (each in state `Failed`) with the final reason.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Bury(pub Vec<(Delivery, String)>);

/// See the module documentation.
pub struct DeadLetterActor {
    config: Arc<Config>,
    store: Addr<StoreActor>,
    scheduler: Addr<Scheduler>,
    signals: Signals,
    pending: Vec<(Delivery, String)>,
    busy: bool,
    failures: u32,
    link: Option<(Arc<Connection>, Channel)>,
}

impl DeadLetterActor {
    /// A dead-letter actor writing through `store`.
    pub fn new(
        config: Arc<Config>,
        store: Addr<StoreActor>,
        scheduler: Addr<Scheduler>,
        signals: Signals,
    ) -> Self {
        DeadLetterActor {
            config,
            store,
            scheduler,
            signals,
            pending: Vec::new(),
            busy: false,
            failures: 0,
            link: None,
        }
    }

    fn drain(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.pending.is_empty() {
            return;
        }
        self.busy = true;
        let batch = std::mem::take(&mut self.pending);
        let updates = batch
            .iter()
            .map(|(d, why)| DeadLetterUpdate {
                id: d.message.id,
                error: why.clone(),
            })
            .collect();
        self.store
            .send(MoveToDeadLetters(updates))
            .into_actor(self)
            .map(|result, act, ctx| match result {
                Ok(Ok(moved)) => {
                    act.failures = 0;
                    act.buried(ctx, batch, moved);
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
        let delay = super::store::retry_delay(self.failures);
        tracing::warn!(error = %why, rows = batch.len(), retry_in = ?delay, "could not move rows to dead_letters; retrying");
        self.pending.splice(0..0, batch);
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
    ) {
        let moved: std::collections::HashSet<Uuid> = moved.into_iter().collect();
        let settled: Vec<Uuid> = batch.iter().map(|(d, _)| d.message.id).collect();
        let keys_freed = batch.iter().any(|(d, _)| d.message.ordering_key.is_some());
        let mut announced = Vec::with_capacity(moved.len());
        let mut to_exchange = Vec::new();
        for (delivery, why) in batch {
            if moved.contains(&delivery.message.id) {
                tracing::warn!(message_id = %delivery.message.id, reason = %why, "dead-lettered");
                announced.push((delivery.message.id, why.clone()));
                self.signals
                    .metrics
                    .dead_lettered
                    .with_label_values(&[delivery.message.exchange.as_str()])
                    .inc();
                to_exchange.push((delivery, why));
            } else {
                tracing::warn!(message_id = %delivery.message.id, "not dead-lettered: the row is no longer held by this engine");
            }
        }
        Counters::add(&self.signals.counters.dead_lettered, announced.len());
        if !announced.is_empty() {
            self.signals
                .emit(EngineEvent::DeadLettered(Arc::new(announced)));
        }
        self.scheduler.do_send(Settled {
            ids: settled,
            earliest_retry: None,
            keys_freed,
        });
        match self.config.dead_letter.exchange.clone() {
            Some(exchange) if !to_exchange.is_empty() => {
                let link = self.link.take();
                let cfg = self.config.broker.clone();
                async move { publish_to_exchange(link, &cfg, &exchange, to_exchange).await }
                    .into_actor(self)
                    .map(|link, act, ctx| {
                        act.link = link;
                        act.busy = false;
                        act.drain(ctx);
                    })
                    .spawn(ctx);
            }
            _ => {
                self.busy = false;
                self.drain(ctx);
            }
        }
    }
}

/// Publishes dead letters to the exchange with confirms; returns the link for reuse.
async fn publish_to_exchange(
    link: Option<(Arc<Connection>, Channel)>,
    cfg: &crate::config::BrokerConfig,
    exchange: &str,
    items: Vec<(Delivery, String)>,
) -> Option<(Arc<Connection>, Channel)> {
    let (conn, channel) = match link.filter(|(_, ch)| ch.status().connected()) {
        Some(l) => l,
        None => match open(cfg).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, count = items.len(), "cannot publish to the dead-letter exchange (rows are in dead_letters)");
                return None;
            }
        },
    };
    let Ok(exchange_name) = ShortString::try_new(exchange) else {
        return None;
    };
    let mut confirms = Vec::with_capacity(items.len());
    for (d, why) in &items {
        let m = &d.message;
        // A row whose headers or content type AMQP cannot carry still reaches the
        // exchange, without them.
        let props = m.amqp_properties().or_else(|_| {
            let mut bare = m.clone();
            bare.headers = serde_json::json!({ "x-courier-invalid-headers": true });
            bare.content_type = None;
            bare.amqp_properties()
        });
        let Ok(mut props) = props else { continue };
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
        props = props.with_headers(headers);
        let routing_key = ShortString::try_new(m.routing_key.as_str()).unwrap_or_default();
        match channel
            .basic_publish(
                exchange_name.clone(),
                routing_key,
                BasicPublishOptions::default(),
                &m.payload,
                props,
            )
            .await
        {
            Ok(confirm) => confirms.push((m.id, confirm)),
            Err(e) => {
                tracing::error!(message_id = %m.id, error = %e, "dead-letter exchange publish failed (row is in dead_letters)");
            }
        }
    }
    for (id, confirm) in confirms {
        match confirm.await {
            Ok(Confirmation::Ack(_)) => {}
            other => {
                tracing::error!(message_id = %id, outcome = ?other.map(|c| c.is_ack()), "dead-letter exchange did not confirm (row is in dead_letters)")
            }
        }
    }
    channel.status().connected().then_some((conn, channel))
}

async fn open(
    cfg: &crate::config::BrokerConfig,
) -> Result<(Arc<Connection>, Channel), broker::BrokerError> {
    let conn = Arc::new(broker::connect(cfg, "-dead-letters").await?);
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, channel))
}

impl Actor for DeadLetterActor {
    type Context = Context<Self>;
}

impl Handler<Bury> for DeadLetterActor {
    type Result = ();

    fn handle(&mut self, msg: Bury, ctx: &mut Context<Self>) {
        self.pending.extend(msg.0);
        self.drain(ctx);
    }
}
