//! The ConfirmTracker: every published message until the broker settles it.
//!
//! It owns the in-flight table (`message id → Delivery`, publish token, confirm deadline)
//! and decides each outcome through the state machine: an ack that was not returned →
//! `Confirmed`; a nack, a return, a missed deadline or a lost channel → a failed attempt
//! (`Retrying` with backoff, or `Failed` when attempts are exhausted).
//!
//! **Returns are matched by `message_id`, never by which confirm carried them.** lapin hands
//! a `basic.return` to whichever pending confirm resolves next, in hash-map order, so an
//! unroutable message often resolves as a plain `Ack(None)` while its return rides on a
//! neighbour's confirm (LAPIN-NOTES.md). Two facts make exact correlation possible: the
//! broker sends a message's return before its ack, and lapin resolves every confirm of one
//! ack frame synchronously, the carrier no later than the message itself. So all confirm
//! futures live in one `FuturesUnordered` (the *pump*), which yields them in wake order;
//! the pump drains everything already resolved into one batch, and the tracker reads every
//! return of a batch before it settles any ack in it. A return that names a message still
//! in flight is remembered until that message's own confirm arrives.
//!
//! A confirm failed by a channel close is charged only to the message the close blames
//! (see `inflight`): the others are refunded, so a row the broker refuses uses up its own
//! attempts and no neighbour's.
//!
//! Outcomes go to the Ledger (batched writes) and the DeadLetter actor.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use actix::prelude::*;
use futures::{stream::FuturesUnordered, FutureExt, StreamExt};
use lapin::Confirmation;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{
    dead_letter::{Bury, DeadLetterActor},
    ledger::{Ledger, Record},
    scheduler::{KeyTurn, Scheduler},
};
use crate::{
    broker::ChannelClose,
    config::Config,
    events::Signals,
    inflight::{Answer, InFlightTable, ReturnNote, Settled},
    state::{AfterFailure, Delivery, FailureReason},
    store::RetryUpdate,
};

/// A message written to the channel, with its confirm.
pub struct Published {
    /// The message, in state `InFlight`.
    pub delivery: Delivery,
    /// Distinguishes this publish from an earlier one of the same row; increases with
    /// every publish.
    pub token: u64,
    /// Which publishing channel carried it (the publisher numbers the channels it opens).
    pub channel: u64,
    /// lapin's confirm future (or its result, when the publisher already awaited it).
    pub confirm: Confirm,
}

/// A publish's confirm: lapin's `PublisherConfirm`, or a result already in hand.
pub type Confirm = Pin<Box<dyn Future<Output = lapin::Result<Confirmation>> + Send>>;

/// Track these publishes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Track(pub Vec<Published>);

/// These could not be published; each is a failed attempt with its reason.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsent(pub Vec<(Delivery, FailureReason)>);

/// The connection is gone: every tracked message failed with it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionLost(pub String);

/// How many messages are tracked.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct TrackedCount;

/// One resolved confirm.
struct Resolved {
    id: Uuid,
    token: u64,
    result: lapin::Result<Confirmation>,
}

/// Confirms resolved together (see the module documentation).
#[derive(Message)]
#[rtype(result = "()")]
struct ResolvedBatch(Vec<Resolved>);

type ConfirmFuture = Pin<Box<dyn Future<Output = Resolved>>>;

/// See the module documentation.
pub struct ConfirmTracker {
    config: Arc<Config>,
    ledger: Addr<Ledger>,
    dead_letter: Addr<DeadLetterActor>,
    /// Told keyed rows' answers at once (see `KeyTurn`).
    scheduler: Addr<Scheduler>,
    signals: Signals,
    in_flight: InFlightTable,
    pump: Option<mpsc::UnboundedSender<ConfirmFuture>>,
}

impl ConfirmTracker {
    /// A tracker sending outcomes to `ledger` and `dead_letter`.
    pub fn new(
        config: Arc<Config>,
        ledger: Addr<Ledger>,
        dead_letter: Addr<DeadLetterActor>,
        scheduler: Addr<Scheduler>,
        signals: Signals,
    ) -> Self {
        ConfirmTracker {
            config,
            ledger,
            dead_letter,
            scheduler,
            signals,
            in_flight: InFlightTable::new(),
            pump: None,
        }
    }

    fn update_gauge(&self) {
        self.signals.in_flight(self.in_flight.len());
    }

    /// Applies one failed attempt to `delivery`, adding the write to `out`.
    fn fail(&self, mut delivery: Delivery, reason: FailureReason, out: &mut Outcomes) {
        let id = delivery.message.id;
        let exchange = delivery.message.exchange.clone();
        if delivery.message.ordering_key.is_some() {
            out.turns.push((id, false));
        }
        self.signals.failed(&exchange, &reason);
        let _span =
            tracing::debug_span!("message", message_id = %id, exchange = %exchange, attempt = delivery.attempts())
                .entered();
        match delivery.fail(&reason, &self.config.retry.backoff) {
            Ok(AfterFailure::Retry { delay, refund }) => {
                tracing::debug!(reason = %reason, retry_in = ?delay, refund, "retrying");
                self.signals.retry_decided(&exchange);
                out.record.retry.push(RetryUpdate {
                    id,
                    delay,
                    error: reason.to_string(),
                    refund,
                });
                if let Some(trace) = delivery.trace.take() {
                    trace.retrying(&reason.to_string());
                }
                out.record.credits.retrying(delivery.into_credit(), delay);
            }
            Ok(AfterFailure::DeadLetter) => {
                tracing::debug!(reason = %reason, "failed: attempts exhausted");
                let why = format!(
                    "{reason} (attempt {} of {})",
                    delivery.attempts(),
                    delivery.max_attempts()
                );
                delivery.trace = delivery.trace.take().map(|t| t.exhausted(&why));
                out.dead.push((delivery, why));
            }
            Err(e) => tracing::error!(error = %e, "state machine refused a failure"),
        }
    }

    fn settle(&mut self, r: Resolved, out: &mut Outcomes) {
        let answer = match r.result {
            Ok(Confirmation::Ack(_)) => Answer::Ack,
            Ok(Confirmation::Nack(_)) => Answer::Nack,
            Ok(Confirmation::NotRequested) => Answer::Lost("channel not in confirm mode".into()),
            Err(e) => match ChannelClose::from_error(&e) {
                Some(close) => Answer::Closed(close),
                None => Answer::Lost(e.to_string()),
            },
        };
        match self.in_flight.settle(r.id, r.token, answer) {
            None => {} // an earlier publish of a message already settled (e.g. timed out)
            Some(Settled::Ack(mut delivery)) => match delivery.ack() {
                Ok(()) => {
                    self.signals.acked(&delivery.message);
                    tracing::debug!(message_id = %r.id, exchange = %delivery.message.exchange, attempt = delivery.attempts(), "confirmed");
                    out.record.confirmed.push(r.id);
                    if let Some(trace) = delivery.trace.take() {
                        trace.confirmed();
                    }
                    if delivery.message.ordering_key.is_some() {
                        out.turns.push((r.id, true));
                    }
                    out.record.credits.settled(delivery.into_credit());
                }
                Err(e) => {
                    tracing::error!(message_id = %r.id, error = %e, "state machine refused an ack")
                }
            },
            Some(Settled::Failed(delivery, reason)) => self.fail(delivery, reason, out),
        }
    }

    /// Notes the return carried by a confirm, under the returned message's own id.
    fn note_return(&mut self, r: &Resolved) {
        let returned = match &r.result {
            Ok(Confirmation::Ack(Some(m))) | Ok(Confirmation::Nack(Some(m))) => m,
            _ => return,
        };
        let id = returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|s| Uuid::parse_str(s.as_str()).ok());
        let Some(id) = id else {
            tracing::warn!("a returned message carried no Courier message_id");
            return;
        };
        if id != r.id {
            self.signals.return_on_other_confirm();
        }
        let reason = FailureReason::Returned {
            code: returned.reply_code,
            text: returned.reply_text.to_string(),
        };
        if self.in_flight.note_return(id, reason) == ReturnNote::Late {
            self.signals.late_return();
            tracing::warn!(message_id = %id, "a return arrived for a message no longer in flight");
        }
    }

    fn send(&self, out: Outcomes) {
        if !out.turns.is_empty() {
            // First: a key's next row is published on its predecessor's ack, not its write.
            self.scheduler.do_send(KeyTurn(out.turns));
        }
        if !out.record.confirmed.is_empty() || !out.record.retry.is_empty() {
            self.ledger.do_send(out.record);
        }
        if !out.dead.is_empty() {
            self.dead_letter.do_send(Bury(out.dead));
        }
        self.update_gauge();
    }

    fn expire(&mut self) {
        let overdue = self.in_flight.expire(Instant::now());
        if overdue.is_empty() {
            return;
        }
        let mut out = Outcomes::default();
        let timeout = self.config.retry.confirm_timeout;
        for delivery in overdue {
            self.fail(delivery, FailureReason::ConfirmTimeout(timeout), &mut out);
        }
        self.send(out);
    }
}

#[derive(Default)]
struct Outcomes {
    record: Record,
    dead: Vec<(Delivery, String)>,
    /// Keyed rows' answers, for the runs waiting on them.
    turns: Vec<(Uuid, bool)>,
}

/// Runs every confirm future; batches what resolved together.
async fn pump(mut rx: mpsc::UnboundedReceiver<ConfirmFuture>, tracker: Addr<ConfirmTracker>) {
    let mut pending: FuturesUnordered<ConfirmFuture> = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            incoming = rx.recv() => match incoming {
                Some(fut) => {
                    pending.push(fut);
                    while let Ok(fut) = rx.try_recv() {
                        pending.push(fut);
                    }
                }
                None if pending.is_empty() => return,
                None => {
                    // The tracker is gone; nothing can use the results.
                    return;
                }
            },
            Some(first) = pending.next(), if !pending.is_empty() => {
                let mut batch = vec![first];
                while let Some(Some(more)) = pending.next().now_or_never() {
                    batch.push(more);
                }
                tracker.do_send(ResolvedBatch(batch));
            }
        }
    }
}

impl Actor for ConfirmTracker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.pump = Some(tx);
        actix::spawn(pump(rx, ctx.address()));
        let tick = (self.config.retry.confirm_timeout / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        ctx.run_interval(tick, |act, _| act.expire());
    }
}

impl Handler<Track> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, msg: Track, _: &mut Context<Self>) {
        let deadline = Instant::now() + self.config.retry.confirm_timeout;
        for p in msg.0 {
            let id = p.delivery.message.id;
            let token = p.token;
            self.in_flight
                .insert_on(p.delivery, token, p.channel, deadline);
            let fut: ConfirmFuture =
                Box::pin(p.confirm.map(move |result| Resolved { id, token, result }));
            if let Some(pump) = &self.pump {
                let _ = pump.send(fut);
            }
        }
        self.update_gauge();
    }
}

impl Handler<ResolvedBatch> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, msg: ResolvedBatch, _: &mut Context<Self>) {
        for r in &msg.0 {
            self.note_return(r);
        }
        let mut out = Outcomes::default();
        for r in msg.0 {
            self.settle(r, &mut out);
        }
        self.send(out);
    }
}

impl Handler<Unsent> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, msg: Unsent, _: &mut Context<Self>) {
        let mut out = Outcomes::default();
        for (delivery, reason) in msg.0 {
            self.fail(delivery, reason, &mut out);
        }
        self.send(out);
    }
}

impl Handler<ConnectionLost> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, msg: ConnectionLost, _: &mut Context<Self>) {
        let mut out = Outcomes::default();
        for delivery in self.in_flight.drain() {
            self.fail(
                delivery,
                FailureReason::ChannelLost(msg.0.clone()),
                &mut out,
            );
        }
        self.send(out);
    }
}

impl Handler<TrackedCount> for ConfirmTracker {
    type Result = usize;

    fn handle(&mut self, _: TrackedCount, _: &mut Context<Self>) -> usize {
        self.in_flight.len()
    }
}
