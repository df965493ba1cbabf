//! The ConfirmTracker: every message published on one connection, until the broker settles
//! it (one tracker per Publisher: a lost connection fails only its own messages, and returns
//! ride only on confirms of their own channel).
//!
//! It owns the in-flight table (`message id → Delivery`, publish token, confirm deadline)
//! and decides each outcome through the state machine: an ack that was not returned →
//! `Confirmed`; a nack, a return, a missed deadline or a lost channel → a failed attempt
//! (`Retrying` with backoff, or `Failed` when attempts are exhausted).
//!
//! **Returns are matched by `message_id`, never by which confirm carried them.** lapin hands
//! a `basic.return` to whichever pending confirm resolves next, in hash-map order, so an
//! unroutable message often resolves as a plain `Ack(None)` while its return rides on a
//! neighbour's confirm (lapin 4.12). Two facts make exact correlation possible: the
//! broker sends a message's return before its ack, and lapin resolves every confirm of one
//! ack frame synchronously, the carrier no later than the message itself. So all confirm
//! futures live in one `FuturesUnordered` (the *pump*), which yields them in wake order;
//! the pump drains everything already resolved into one batch, and the tracker reads every
//! return of a batch before it settles any ack in it. A return that names a message still
//! in flight is remembered until that message's own confirm arrives.
//!
//! **An ack waits for the confirms that may carry its return.** The carrier can be a
//! message of a publish round still being written: the Publisher hands a round's confirms
//! over only once all its writes are done, and the broker may ack earlier messages in the
//! same frame meanwhile. So the Publisher says when a round starts (`Writing`) and ends
//! (`Written`, after its `Track`), the pump stamps each batch with how many confirm
//! futures it had received, and an ack is settled only when no round is being written and
//! its batch's stamp covers every future sent to the pump; otherwise it is held, and a
//! fence (an always-ready future) is sent so that a later batch releases it once the
//! returns before it are read. With no round writing (an idle engine) nothing is held.
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

mod outage;

use outage::NackVerdict;
pub use outage::Outage;

use super::{
    dead_letter::{Bury, DeadLetterActor},
    ledger::{Ledger, Record},
    publisher::Suspects,
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

/// The broker blocked (`true`) or unblocked (`false`) the connection's publishers
/// (`connection.blocked`: a memory or disk alarm). While blocked the broker reads nothing
/// more from the connection, so no confirm can come: confirm deadlines stand still, and an
/// alarm longer than `retry.confirm_timeout` costs no row an attempt (an audit: a 35 s
/// memory alarm charged 434 rows "no confirm within 30s" and sent each twice; a longer one
/// would have dead-lettered rows the broker was only holding).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Blocked(pub bool);

/// The connection is gone: every tracked message failed with it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionLost {
    /// What happened, for the rows' `last_error`.
    pub why: String,
    /// The broker closed it for something sent on it: every message in flight becomes a
    /// suspect, to be published alone (see `publisher::isolation`).
    pub for_input: bool,
}

/// A publish round starts writing: until its `Written`, an ack may have its return on one
/// of the round's confirms, not tracked yet.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Writing;

/// The round announced by `Writing` is over (its `Track` and `Unsent` came first).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Written;

/// One resolved confirm.
struct Resolved {
    id: Uuid,
    token: u64,
    result: lapin::Result<Confirmation>,
}

/// What the pump yields: a resolved confirm, or a fence (see the module documentation).
enum Pumped {
    Confirm(Box<Resolved>),
    Fence,
}

/// Confirms resolved together, and how many futures the pump had received when it
/// yielded them (see the module documentation).
#[derive(Message)]
#[rtype(result = "()")]
struct ResolvedBatch {
    items: Vec<Pumped>,
    received: u64,
}

type ConfirmFuture = Pin<Box<dyn Future<Output = Pumped>>>;

/// See the module documentation.
pub struct ConfirmTracker {
    config: Arc<Config>,
    ledger: Addr<Ledger>,
    dead_letter: Addr<DeadLetterActor>,
    /// Told keyed rows' answers at once (see `KeyTurn`).
    scheduler: Addr<Scheduler>,
    signals: Signals,
    /// Shared with the engine's publishers (see `publisher::isolation`).
    suspects: Suspects,
    /// The engine's run of failed publishes: a nack or a missed confirm during one is
    /// refunded (see [`outage`]).
    outage: Outage,
    in_flight: InFlightTable,
    pump: Option<mpsc::UnboundedSender<ConfirmFuture>>,
    /// Futures sent to the pump so far.
    sent: u64,
    /// Publish rounds being written (see `Writing`).
    writing: u32,
    /// Acks held until the batch stamp reaches `Some(n)` (`None`: until the rounds being
    /// written end).
    held: Vec<(Resolved, Option<u64>)>,
    /// The stamp the newest fence sent will bring.
    fence_at: u64,
    /// The in-flight count last added to the engine's gauge (one tracker per connection).
    reported: usize,
    /// Since when the broker blocks the connection's publishers (see [`Blocked`]).
    blocked_since: Option<Instant>,
    /// Nacked rows (with when they were published) not judged yet: a nack alone may be the
    /// row's, a run a second long is the queue's. Charging them at once cost every row
    /// nacked at the start of a majority loss an attempt (see [`outage`]); they are judged
    /// at the end of every batch of answers and, while any waits, every [`REJUDGE_EVERY`].
    undecided: Vec<(Delivery, Instant)>,
    /// A re-judgement is scheduled.
    rejudge_armed: bool,
}

/// How often undecided nacks are judged again.
const REJUDGE_EVERY: Duration = Duration::from_millis(100);

impl ConfirmTracker {
    /// A tracker sending outcomes to `ledger` and `dead_letter`.
    pub fn new(
        config: Arc<Config>,
        ledger: Addr<Ledger>,
        dead_letter: Addr<DeadLetterActor>,
        scheduler: Addr<Scheduler>,
        signals: Signals,
        suspects: Suspects,
        outage: Outage,
    ) -> Self {
        ConfirmTracker {
            config,
            ledger,
            dead_letter,
            scheduler,
            signals,
            suspects,
            outage,
            in_flight: InFlightTable::new(),
            pump: None,
            sent: 0,
            writing: 0,
            held: Vec::new(),
            fence_at: 0,
            reported: 0,
            blocked_since: None,
            undecided: Vec::new(),
            rejudge_armed: false,
        }
    }

    fn push(&mut self, fut: ConfirmFuture) {
        if let Some(pump) = &self.pump {
            if pump.send(fut).is_ok() {
                self.sent += 1;
            }
        }
    }

    /// Sends a fence unless one already sent will bring a stamp of at least `need`.
    fn fence(&mut self, need: u64) {
        if self.fence_at < need {
            self.push(Box::pin(std::future::ready(Pumped::Fence)));
            self.fence_at = self.sent;
        }
    }

    /// Holds `r` if its return may still be on a confirm not read yet; else settles it.
    fn settle_or_hold(&mut self, r: Resolved, received: u64, out: &mut Outcomes) {
        let ack = matches!(r.result, Ok(Confirmation::Ack(_)));
        if ack && self.writing > 0 {
            self.held.push((r, None));
        } else if ack && received < self.sent {
            let need = self.sent;
            self.held.push((r, Some(need)));
            self.fence(need);
        } else {
            self.settle(r, out);
        }
    }

    /// Rows this tracker holds: in flight, or nacked and undecided.
    fn held_rows(&self) -> usize {
        self.in_flight.len() + self.undecided.len()
    }

    fn update_gauge(&mut self) {
        let now = self.held_rows();
        self.signals.in_flight(self.reported, now);
        self.reported = now;
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
                None => {
                    if ChannelClose::connection_for_input(&e).is_some() {
                        self.suspects.add([r.id]);
                    }
                    Answer::Lost(e.to_string())
                }
            },
        };
        let Some((settled, deadline)) = self.in_flight.settle(r.id, r.token, answer) else {
            return; // an earlier publish of a message already settled (e.g. timed out)
        };
        let published = self.published(deadline);
        match settled {
            Settled::Ack(mut delivery) => match delivery.ack() {
                Ok(()) => {
                    out.acked = out.acked.max(Some(published));
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
            // Judged once the batch's acks are counted (see `ResolvedBatch`).
            Settled::Failed(delivery, FailureReason::Nacked) => {
                self.undecided.push((delivery, published))
            }
            Settled::Failed(delivery, reason) => self.fail(delivery, reason, out),
        }
    }

    /// When a publish due by `deadline` went out (or later, by the time the broker blocked
    /// the connection: see [`Blocked`]).
    fn published(&self, deadline: Instant) -> Instant {
        deadline
            .checked_sub(self.config.retry.confirm_timeout)
            .unwrap_or(deadline)
    }

    /// Charges or refunds the nack of a publish made at `published`, or keeps it undecided
    /// while the engine's run of failures is younger than a second (see [`outage`]).
    fn judge_nack(&mut self, delivery: Delivery, published: Instant, out: &mut Outcomes) {
        let id = delivery.message.id;
        match self.outage.judge(id, published, Instant::now()) {
            NackVerdict::Charged => self.fail(delivery, FailureReason::Nacked, out),
            NackVerdict::Refunded => self.fail(delivery, FailureReason::NackedUnavailable, out),
            NackVerdict::Undecided => self.undecided.push((delivery, published)),
        }
    }

    /// Whether the broker leaving row `id`'s publish (or a request for it) made at `asked`
    /// unanswered until now is its silence rather than the row's fault (see
    /// [`Outage::silent`]).
    fn broker_silent(&self, id: Uuid, asked: Instant) -> bool {
        self.outage.silent(id, asked, Instant::now())
    }

    /// A request the broker left unanswered for `broker.connect_timeout` (see
    /// `FailureReason::Unanswered`): refunded like a lost channel within the bounds of the
    /// engine's run and of the row's refunds (see [`Outage::unanswered`]).
    fn judge_unanswered(&self, id: Uuid, why: String) -> FailureReason {
        let now = Instant::now();
        let asked = now
            .checked_sub(self.config.broker.connect_timeout)
            .unwrap_or(now);
        match self.outage.unanswered(id, asked, now) {
            true => FailureReason::ChannelLost(why),
            false => FailureReason::Unanswered(why),
        }
    }

    /// Counts the batch's acks in the engine's run, then judges the undecided nacks again.
    fn rejudge(&mut self, out: &mut Outcomes) {
        if let Some(latest) = out.acked.take() {
            self.outage
                .acked(latest, &out.record.confirmed, Instant::now());
        }
        for (delivery, published) in std::mem::take(&mut self.undecided) {
            self.judge_nack(delivery, published, out);
        }
    }

    /// Judges the undecided nacks again in [`REJUDGE_EVERY`], unless already scheduled or
    /// none waits.
    fn arm_rejudge(&mut self, ctx: &mut Context<Self>) {
        if self.undecided.is_empty() || self.rejudge_armed {
            return;
        }
        self.rejudge_armed = true;
        ctx.run_later(REJUDGE_EVERY, |act, ctx| {
            act.rejudge_armed = false;
            let mut out = Outcomes::default();
            act.rejudge(&mut out);
            act.send(out);
            act.arm_rejudge(ctx);
        });
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

    fn send(&mut self, out: Outcomes) {
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
        if self.blocked_since.is_some() {
            return; // deadlines stand still while the broker blocks (see `Blocked`)
        }
        let overdue = self.in_flight.expire(Instant::now());
        if overdue.is_empty() {
            return;
        }
        let mut out = Outcomes::default();
        let timeout = self.config.retry.confirm_timeout;
        for (delivery, deadline) in overdue {
            let id = delivery.message.id;
            let reason = if self.broker_silent(id, self.published(deadline)) {
                FailureReason::ConfirmTimeoutUnavailable(timeout)
            } else {
                FailureReason::ConfirmTimeout(timeout)
            };
            self.fail(delivery, reason, &mut out);
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
    /// The latest publish acked, for the engine's run (see [`outage`]).
    acked: Option<Instant>,
}

/// Runs every confirm future; batches what resolved together.
async fn pump(mut rx: mpsc::UnboundedReceiver<ConfirmFuture>, tracker: Addr<ConfirmTracker>) {
    let mut pending: FuturesUnordered<ConfirmFuture> = FuturesUnordered::new();
    let mut received: u64 = 0;
    loop {
        tokio::select! {
            biased;
            incoming = rx.recv() => match incoming {
                Some(fut) => {
                    pending.push(fut);
                    received += 1;
                    while let Ok(fut) = rx.try_recv() {
                        pending.push(fut);
                        received += 1;
                    }
                }
                None if pending.is_empty() => return,
                None => {
                    // The tracker is gone; nothing can use the results.
                    return;
                }
            },
            Some(first) = pending.next(), if !pending.is_empty() => {
                let mut items = vec![first];
                while let Some(Some(more)) = pending.next().now_or_never() {
                    items.push(more);
                }
                tracker.do_send(ResolvedBatch { items, received });
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
            let fut: ConfirmFuture = Box::pin(
                p.confirm
                    .map(move |result| Pumped::Confirm(Box::new(Resolved { id, token, result }))),
            );
            self.push(fut);
        }
        self.update_gauge();
    }
}

impl Handler<ResolvedBatch> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, msg: ResolvedBatch, ctx: &mut Context<Self>) {
        let confirms: Vec<Resolved> = msg
            .items
            .into_iter()
            .filter_map(|p| match p {
                Pumped::Confirm(r) => Some(*r),
                Pumped::Fence => None,
            })
            .collect();
        for r in &confirms {
            self.note_return(r);
        }
        let mut out = Outcomes::default();
        // Held acks whose possible carriers have all been read by now.
        let (due, still): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(_, need)| need.is_some_and(|n| n <= msg.received));
        self.held = still;
        for (r, _) in due {
            self.settle(r, &mut out);
        }
        for r in confirms {
            self.settle_or_hold(r, msg.received, &mut out);
        }
        self.rejudge(&mut out); // an ack of a later publish among these charges them at once
        self.send(out);
        self.arm_rejudge(ctx);
    }
}

impl Handler<Writing> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, _: Writing, _: &mut Context<Self>) {
        self.writing += 1;
    }
}

impl Handler<Written> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, _: Written, _: &mut Context<Self>) {
        self.writing = self.writing.saturating_sub(1);
        if self.writing == 0 && self.held.iter().any(|(_, need)| need.is_none()) {
            // The rounds' confirms are in the pump now: release what waited on them once a
            // fence sent after them comes back.
            let need = self.sent + 1;
            for (_, n) in &mut self.held {
                n.get_or_insert(need);
            }
            self.fence(need);
        }
    }
}

impl Handler<Unsent> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, msg: Unsent, _: &mut Context<Self>) {
        let mut out = Outcomes::default();
        for (delivery, reason) in msg.0 {
            let reason = match reason {
                FailureReason::Unanswered(why) => self.judge_unanswered(delivery.message.id, why),
                other => other,
            };
            self.fail(delivery, reason, &mut out);
        }
        self.send(out);
    }
}

impl Handler<Blocked> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, msg: Blocked, _: &mut Context<Self>) {
        match (msg.0, self.blocked_since) {
            (true, None) => self.blocked_since = Some(Instant::now()),
            (false, Some(since)) => {
                self.blocked_since = None;
                self.in_flight.postpone(since.elapsed());
            }
            _ => {}
        }
    }
}

impl Handler<ConnectionLost> for ConfirmTracker {
    type Result = ();

    fn handle(&mut self, msg: ConnectionLost, _: &mut Context<Self>) {
        // A new connection starts unblocked; this one's messages fail below.
        self.blocked_since = None;
        // A round cut off with its connection never says `Written`; held acks fail below
        // with every other message of the connection.
        self.writing = 0;
        self.held.clear();
        let mut out = Outcomes::default();
        let lost = self.in_flight.drain();
        if msg.for_input && !lost.is_empty() {
            tracing::warn!(
                suspects = lost.len(),
                "the broker closed the connection over something sent on it; each message \
                 that was in flight is published alone next, to find the one"
            );
            self.suspects.add(lost.iter().map(|d| d.message.id));
        }
        for delivery in lost {
            self.fail(
                delivery,
                FailureReason::ChannelLost(msg.why.clone()),
                &mut out,
            );
        }
        self.send(out);
    }
}
