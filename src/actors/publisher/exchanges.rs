//! Which exchanges the publishing channel may see: passive declares on the side channel,
//! probes on channels of their own (see the Publisher's module documentation and `probe`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use lapin::{
    options::ExchangeDeclareOptions,
    types::{FieldTable, ShortString},
    Channel, Connection, ExchangeKind,
};

use super::{probe, Prepared};
use crate::{
    actors::confirms::Published,
    broker::{ChannelClose, REFUSAL_REMEMBERED},
    state::{Delivery, FailureReason},
};

/// How long a positive passive-declare result, or the broker's `max_message_size` from a
/// refusal, is trusted (an exchange refusal: [`REFUSAL_REMEMBERED`]).
const TRUSTED_FOR: Duration = Duration::from_secs(30);

/// How long a 404 from a passive declare is trusted. Each 404 closes a channel, and the
/// client library does not give a channel the broker closed back to the connection's
/// `channel_max` (lapin 4.12): without this, rows to a missing exchange spent one channel
/// each until none was left for any exchange (see `Round::channels_exhausted`).
const MISSING_FOR: Duration = Duration::from_secs(5);

/// What an engine's publishers know of exchanges, shared by all of its connections: whether
/// an exchange exists, and whether the broker refused it, are facts of the broker's vhost,
/// not of one connection. So a connection's first row to an exchange another connection has
/// checked goes straight out (a check of its own, on a stalled connection, would fail the
/// rows), and a refused exchange closes a channel a bounded number of times per engine.
#[derive(Clone, Default)]
pub struct ExchangeBook(Arc<Mutex<Entries>>);

#[derive(Default)]
pub(super) struct Entries {
    known: HashMap<String, Instant>,
    /// Exchanges a passive declare found missing, and when.
    missing: HashMap<String, Instant>,
    /// Exchanges the broker refused by closing the channel, with when and why.
    refused: HashMap<String, (Instant, ChannelClose)>,
    /// The broker's `max_message_size`, from its refusal of a larger body, and when.
    max_body: Option<(Instant, usize)>,
}

impl ExchangeBook {
    /// The entries (a panic elsewhere while holding them leaves nothing half-written that
    /// matters: each is a cache entry).
    pub(super) fn entries(&self) -> MutexGuard<'_, Entries> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Entries {
    /// Whether `name` was seen to exist lately (the default exchange always does).
    pub(super) fn known(&self, name: &str) -> bool {
        name.is_empty()
            || self
                .known
                .get(name)
                .is_some_and(|at| at.elapsed() < TRUSTED_FOR)
    }

    /// Whether a passive declare found `name` missing moments ago.
    pub(super) fn missing(&self, name: &str) -> bool {
        self.missing
            .get(name)
            .is_some_and(|at| at.elapsed() < MISSING_FOR)
    }

    /// Why the broker refused `name` lately, if it did.
    pub(super) fn refusal(&self, name: &str) -> Option<ChannelClose> {
        self.refused
            .get(name)
            .filter(|(at, _)| at.elapsed() < REFUSAL_REMEMBERED)
            .map(|(_, close)| close.clone())
    }

    /// The broker's `max_message_size`, if a refusal named it lately: a body over it would
    /// close the channel again, under the messages beside it.
    pub(super) fn max_body(&self) -> Option<usize> {
        self.max_body
            .filter(|(at, _)| at.elapsed() < TRUSTED_FOR)
            .map(|(_, size)| size)
    }

    /// The broker refused a body over `size` bytes (its `max_message_size`).
    pub(super) fn limit_body(&mut self, size: usize) {
        self.max_body = Some((Instant::now(), size));
    }

    /// Drops refusals no longer trusted.
    pub(super) fn prune(&mut self) {
        self.refused
            .retain(|_, (at, _)| at.elapsed() < REFUSAL_REMEMBERED);
        self.missing.retain(|_, at| at.elapsed() < MISSING_FOR);
    }

    /// After a reconnect or a new publishing channel every exchange is checked again (the
    /// broker may have restarted without it). A connection's first connect keeps the book:
    /// it holds what the engine's other connections learned moments ago.
    pub(super) fn forget_known(&mut self) {
        self.known.clear();
    }

    /// What a publish round's checks and probes found.
    pub(super) fn learn(
        &mut self,
        exists: HashMap<String, bool>,
        refused: Vec<(String, ChannelClose)>,
        now: Instant,
    ) {
        for (name, exists) in exists {
            if exists {
                self.missing.remove(&name);
                self.known.insert(name, now);
            } else {
                self.known.remove(&name);
                self.missing.insert(name, now);
            }
        }
        for (name, close) in refused {
            self.refuse_at(name, close, now);
        }
    }

    /// The broker refused `name` by closing a channel.
    pub(super) fn refuse(&mut self, name: &str, close: ChannelClose) {
        self.refuse_at(name.to_string(), close, Instant::now());
    }

    /// Remembers a refusal, and forgets that `name` was seen to exist: once the refusal
    /// lapses, the next row to it must be probed on a channel of its own again, not sent
    /// on the publishing channel (which the refusal would close under its neighbours).
    fn refuse_at(&mut self, name: String, close: ChannelClose, now: Instant) {
        self.known.remove(&name);
        self.refused.insert(name, (now, close));
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if a.get_id() == 404)
}

/// Whether `e` says the connection has no channel number left to open.
pub(super) fn channels_exhausted(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ChannelsLimitReached)
}

/// Why a passive declare gave no answer.
pub(super) struct CheckFailed {
    pub(super) why: String,
    /// No channel could be opened: the connection has none left (see [`MISSING_FOR`]).
    pub(super) exhausted: bool,
}

impl From<String> for CheckFailed {
    fn from(why: String) -> Self {
        CheckFailed {
            why,
            exhausted: false,
        }
    }
}

/// Passive declare on the side channel (reopened as needed: a 404 closes it).
pub(super) async fn exchange_exists(
    conn: &Connection,
    side: &mut Option<Channel>,
    name: &str,
) -> Result<bool, CheckFailed> {
    let channel = side_channel(conn, side).await?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let name = ShortString::try_new(name).map_err(|e| e.to_string())?;
    match channel
        .exchange_declare(name, ExchangeKind::Direct, options, FieldTable::default())
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => {
            *side = None;
            Ok(false)
        }
        Err(e) => {
            *side = None;
            Err(e.to_string().into())
        }
    }
}

/// The side channel, opened when missing. It only declares (probes publish on channels of
/// their own), so it needs no confirm mode.
async fn side_channel(
    conn: &Connection,
    side: &mut Option<Channel>,
) -> Result<Channel, CheckFailed> {
    if let Some(c) = side.as_ref().filter(|c| c.status().connected()) {
        return Ok(c.clone());
    }
    let c = conn.create_channel().await.map_err(|e| CheckFailed {
        why: e.to_string(),
        exhausted: channels_exhausted(&e),
    })?;
    *side = Some(c.clone());
    Ok(c)
}

/// What probing new exchanges produced.
#[derive(Default)]
pub(super) struct Probed {
    pub(super) published: Vec<Published>,
    pub(super) unsent: Vec<(Delivery, FailureReason)>,
    pub(super) refused: Vec<(String, ChannelClose)>,
    /// No channel could be opened for a probe: the connection has none left.
    pub(super) exhausted: bool,
}

/// Probes each exchange the passive declares just found (see `probe`) with its first row in
/// `to_send`, each on a channel opened for it. Not on the side channel: RabbitMQ caches a
/// channel's write permission per exchange, so a channel that published to an exchange
/// before a revoke goes on accepting it, and only a fresh channel tells whether this user may
/// still write there. Rows to an exchange the probe found refused leave `to_send`, charged.
pub(super) async fn probe_new_exchanges(
    conn: &Connection,
    exchanges: &HashMap<String, bool>,
    to_send: &mut Vec<(Delivery, Prepared, u64)>,
    bound: Duration,
) -> Probed {
    let mut out = Probed::default();
    for name in exchanges
        .iter()
        .filter(|(_, exists)| **exists)
        .map(|(n, _)| n)
    {
        let Some(first) = to_send
            .iter()
            .position(|(d, _, _)| &d.message.exchange == name)
        else {
            continue;
        };
        let channel = match tokio::time::timeout(bound, crate::broker::confirm_channel(conn)).await
        {
            Ok(Ok(c)) => c,
            // No channel to probe on: the rows go to the publishing channel unprobed.
            Ok(Err(crate::broker::BrokerError::Amqp(e))) if channels_exhausted(&e) => {
                out.exhausted = true;
                break;
            }
            _ => break,
        };
        let (d, p, token) = to_send.remove(first);
        match probe::probe(channel, name, p, &d.message.payload, bound).await {
            probe::Probe::Published(confirm) => out.published.push(Published {
                delivery: d,
                token,
                // Not the publishing channel: never blamed for its closes, nor counted in its
                // streak of nacks (the tracker counts it in the engine's run, see
                // `confirms::outage`).
                channel: 0,
                confirm: Box::pin(confirm),
            }),
            probe::Probe::Refused(close) => {
                tracing::warn!(exchange = %name, code = close.code, reason = %close.text,
                    "the broker refused an exchange on a probe; rows to it are failed unpublished for a while");
                let behind = format!("{} (not published: refused moments ago)", close.text);
                let (refused, keep): (Vec<_>, Vec<_>) = std::mem::take(to_send)
                    .into_iter()
                    .partition(|(d, _, _)| &d.message.exchange == name);
                *to_send = keep;
                out.unsent.extend(refused.into_iter().map(|(d, _, _)| {
                    let why = FailureReason::Refused {
                        code: close.code,
                        text: behind.clone(),
                    };
                    (d, why)
                }));
                let why = FailureReason::Refused {
                    code: close.code,
                    text: close.text.clone(),
                };
                out.unsent.push((d, why));
                out.refused.push((name.clone(), close));
            }
            probe::Probe::Failed(why) => {
                let why = FailureReason::ChannelLost(format!("exchange probe failed: {why}"));
                out.unsent.push((d, why));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_exchange_is_probed_again_once_the_refusal_lapses() {
        let mut book = Entries::default();
        let close = ChannelClose {
            code: 403,
            text: "ACCESS_REFUSED - write access to exchange 'x' in vhost '/' refused".into(),
        };
        let long_ago = Instant::now() - REFUSAL_REMEMBERED;
        book.learn(
            HashMap::from([("x".to_string(), true)]),
            vec![("x".to_string(), close)],
            long_ago,
        );
        // The refusal has lapsed, and the passive declare of the same round is not taken
        // for leave to send on the publishing channel.
        assert!(book.refusal("x").is_none());
        assert!(!book.known("x"));
        book.learn(
            HashMap::from([("x".to_string(), true)]),
            vec![],
            Instant::now(),
        );
        assert!(book.known("x"));
    }
}
