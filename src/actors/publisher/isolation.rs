//! The Isolation actor: owns one AMQP connection of its own, on which it publishes the
//! messages suspected of closing a connection, one at a time.
//!
//! RabbitMQ answers some input with a connection-level error (a hard close, such as 541
//! INTERNAL_ERROR for a direct reply-to key it cannot decode) that names no message. Every
//! unconfirmed message of that connection fails with it and, since none of them can be
//! blamed, each is refunded and published again: with the culprit among them, the
//! connection closes again, for ever, and the good messages beside it go nowhere. The
//! causes known are refused before publishing (`prepare`); this is the net for the others.
//!
//! Every message unconfirmed on a connection the broker closed for something a client sent
//! becomes a *suspect* ([`Suspects`], shared by the engine's publishers and trackers), and a
//! publisher hands a suspect here instead of to its channel. Alone on this connection, a
//! suspect is judged: if the broker closes the connection (or its channel) while it is the
//! only message in flight, it is the culprit and is charged an attempt
//! ([`FailureReason::ClosedConnection`]), so its attempts run out like any refused row's;
//! any answer of the broker clears it, and the answer settles it as usual. 320
//! CONNECTION_FORCED (an operator, or a node shutting down) makes no suspects. A suspect
//! that cannot be published here (no broker) is refunded and stays a suspect.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use actix::prelude::*;
use futures::FutureExt;
use lapin::{options::BasicPublishOptions, Channel, Confirmation, Connection};
use uuid::Uuid;

use super::Prepared;
use crate::{
    actors::{
        confirms::{ConfirmTracker, Published, Track, Unsent},
        ledger::{Ledger, Release},
        scheduler::Credits,
    },
    broker::{self, ChannelClose},
    config::Config,
    lifecycle::Lifecycle,
    state::{Delivery, FailureReason},
};

/// How long a message stays a suspect without being judged (its row may have gone to
/// another engine).
const SUSPECT_FOR: Duration = Duration::from_secs(3600);

/// Suspects kept at most; past it the oldest are forgotten (they are then published with
/// the others again, and become suspects again if the connection closes again).
const MAX_SUSPECTS: usize = 100_000;

/// The publisher's channel number for a publish made here (see `Published::channel`).
const ISOLATED: u64 = u64::MAX;

/// Messages suspected of closing a connection (see the module documentation).
#[derive(Clone, Default)]
pub struct Suspects(Arc<Mutex<HashMap<Uuid, Instant>>>);

impl Suspects {
    fn map(&self) -> MutexGuard<'_, HashMap<Uuid, Instant>> {
        // Each entry stands alone: a panic elsewhere leaves nothing half-written.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `ids` were in flight on a connection the broker closed for something sent on it.
    pub fn add(&self, ids: impl IntoIterator<Item = Uuid>) {
        let now = Instant::now();
        let mut map = self.map();
        map.extend(ids.into_iter().map(|id| (id, now)));
        if map.len() > MAX_SUSPECTS {
            map.retain(|_, at| at.elapsed() < SUSPECT_FOR);
        }
        let excess = map.len().saturating_sub(MAX_SUSPECTS);
        if excess > 0 {
            let mut by_age: Vec<(Instant, Uuid)> = map.iter().map(|(id, at)| (*at, *id)).collect();
            by_age.sort_unstable();
            for (_, id) in by_age.into_iter().take(excess) {
                map.remove(&id);
            }
        }
    }

    /// Whether `id` is to be published alone.
    pub fn contains(&self, id: &Uuid) -> bool {
        self.map()
            .get(id)
            .is_some_and(|at| at.elapsed() < SUSPECT_FOR)
    }

    /// Whether there is no suspect at all (the publisher's hot path asks once per batch).
    pub fn is_empty(&self) -> bool {
        self.map().is_empty()
    }

    /// `id` was published alone and the broker answered it: not the culprit.
    fn clear(&self, id: &Uuid) {
        self.map().remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map().len()
    }
}

/// One suspect, ready to publish, and the tracker its outcome goes to.
pub struct Suspect {
    pub(super) delivery: Delivery,
    pub(super) prepared: Prepared,
    pub(super) token: u64,
    pub(super) tracker: Addr<ConfirmTracker>,
}

/// Publish these suspects, each alone.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Isolate(pub Vec<Suspect>);

/// See the module documentation.
pub struct Isolation {
    config: Arc<Config>,
    suspects: Suspects,
    ledger: Addr<Ledger>,
    lifecycle: Lifecycle,
    queue: VecDeque<Suspect>,
    /// A suspect is being judged.
    busy: bool,
    /// Kept between suspects; closed once the queue is empty.
    link: Option<(Connection, Channel)>,
}

impl Isolation {
    /// The actor; it connects when it has a suspect to publish.
    pub fn new(
        config: Arc<Config>,
        suspects: Suspects,
        ledger: Addr<Ledger>,
        lifecycle: Lifecycle,
    ) -> Self {
        Isolation {
            config,
            suspects,
            ledger,
            lifecycle,
            queue: VecDeque::new(),
            busy: false,
            link: None,
        }
    }

    /// Judges the next suspect, unless one is being judged.
    fn next(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let paused = self.lifecycle.shutdown.begun() || !self.lifecycle.liveness.fresh();
        if paused && !self.queue.is_empty() {
            // As the publishers do: nothing is published once a shutdown began or while
            // this engine's beat is overdue.
            let rows = self.queue.drain(..).map(|s| s.delivery);
            self.ledger.do_send(Release(Credits::released(rows)));
        }
        let Some(suspect) = self.queue.pop_front() else {
            self.link = None; // nothing left to judge: close the connection
            return;
        };
        self.busy = true;
        let link = self.link.take();
        let config = self.config.clone();
        let Suspect {
            delivery,
            prepared,
            token,
            tracker,
        } = suspect;
        tracing::debug!(message_id = %delivery.message.id, exchange = %delivery.message.exchange, attempt = delivery.attempts(), "publishing alone (a suspect)");
        let judged = async move {
            let (verdict, link) = judge(&config, link, prepared, &delivery.message.payload).await;
            (delivery, verdict, link)
        };
        ctx.spawn(
            judged
                .into_actor(self)
                .map(move |(delivery, verdict, link), act, ctx| {
                    act.link = link;
                    act.busy = false;
                    act.settle(delivery, token, tracker, verdict);
                    act.next(ctx);
                }),
        );
    }

    /// Hands the verdict to the tracker, which settles the message as any other.
    fn settle(
        &self,
        delivery: Delivery,
        token: u64,
        tracker: Addr<ConfirmTracker>,
        verdict: Verdict,
    ) {
        let id = delivery.message.id;
        match verdict {
            Verdict::Answered(answer) => {
                self.suspects.clear(&id);
                tracing::info!(message_id = %id, "a suspect published alone was answered by the broker: not the one that closed the connection");
                tracker.do_send(Track(vec![Published {
                    delivery,
                    token,
                    channel: ISOLATED,
                    confirm: futures::future::ready(Ok(*answer)).boxed(),
                }]));
            }
            Verdict::Failed(reason) => {
                if matches!(reason, FailureReason::ClosedConnection { .. }) {
                    tracing::warn!(message_id = %id, reason = %reason, "the broker closed the connection over this message alone; charged an attempt");
                }
                tracker.do_send(Unsent(vec![(delivery, reason)]));
            }
        }
    }
}

/// How a suspect published alone came out.
enum Verdict {
    /// The broker answered (ack or nack; a return rides on it).
    Answered(Box<Confirmation>),
    /// It failed: charged when the close can only be its own, refunded otherwise.
    Failed(FailureReason),
}

/// Publishes one message on the isolation connection (opened if needed) and awaits its
/// confirm. Returns the connection when it is still good for the next suspect.
async fn judge(
    config: &Config,
    link: Option<(Connection, Channel)>,
    p: Prepared,
    payload: &[u8],
) -> (Verdict, Option<(Connection, Channel)>) {
    let (conn, channel) = match link.filter(|(_, ch)| ch.status().connected()) {
        Some(link) => link,
        None => match open(config).await {
            Ok(link) => link,
            Err(why) => {
                let why = format!("cannot open the isolation connection: {why}");
                return (Verdict::Failed(FailureReason::ChannelLost(why)), None);
            }
        },
    };
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let bound = config.broker.connect_timeout;
    let publish = channel.basic_publish(p.exchange, p.routing_key, options, payload, p.properties);
    let confirm = match tokio::time::timeout(bound, publish).await {
        Ok(Ok(confirm)) => confirm,
        Ok(Err(e)) => return (Verdict::Failed(alone(&e)), None),
        Err(_) => {
            let why = format!("isolated publish not written within {bound:?}");
            return (Verdict::Failed(FailureReason::ChannelLost(why)), None);
        }
    };
    let wait = config.retry.confirm_timeout;
    match tokio::time::timeout(wait, confirm).await {
        Ok(Ok(answer)) => (Verdict::Answered(Box::new(answer)), Some((conn, channel))),
        Ok(Err(e)) => (Verdict::Failed(alone(&e)), None),
        Err(_) => (Verdict::Failed(FailureReason::ConfirmTimeout(wait)), None),
    }
}

/// Why a message published alone failed: a close the broker sent can only be over it.
fn alone(e: &lapin::Error) -> FailureReason {
    if let Some(close) = ChannelClose::connection_for_input(e) {
        return FailureReason::ClosedConnection {
            code: close.code,
            text: close.text,
        };
    }
    match ChannelClose::from_error(e) {
        Some(close) => FailureReason::Refused {
            code: close.code,
            text: close.text,
        },
        None => FailureReason::ChannelLost(e.to_string()),
    }
}

async fn open(config: &Config) -> Result<(Connection, Channel), broker::BrokerError> {
    let (conn, _node) = broker::connect_from(&config.broker, "-isolation", 0).await?;
    let channel = broker::confirm_channel(&conn).await?;
    Ok((conn, channel))
}

impl Actor for Isolation {
    type Context = Context<Self>;
}

impl Handler<Isolate> for Isolation {
    type Result = ();

    fn handle(&mut self, msg: Isolate, ctx: &mut Context<Self>) {
        tracing::debug!(suspects = msg.0.len(), "publishing suspects alone");
        self.queue.extend(msg.0);
        self.next(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suspects_are_kept_until_cleared_and_bounded() {
        let s = Suspects::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        s.add([a, b]);
        assert!(s.contains(&a) && s.contains(&b));
        s.clear(&a);
        assert!(!s.contains(&a) && s.contains(&b));
        s.add((0..MAX_SUSPECTS + 10).map(|_| Uuid::now_v7()));
        assert!(s.len() <= MAX_SUSPECTS, "{} kept", s.len());
    }
}
