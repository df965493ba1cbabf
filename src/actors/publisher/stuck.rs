//! Telling a publishing channel that only gets nacks, so it can be replaced.
//!
//! Seen on RabbitMQ 3.10 with a quorum queue: a channel opened on a surviving node while the
//! queue was still electing its new leader (the engine reconnects within milliseconds of
//! losing its node) had every publish nacked for as long as it lived — over 30 s, tens of
//! thousands of nacks — while a fresh channel on the same node, to the same queue, got acks.
//! The broker keeps the channel's view of the queue's leader; a new channel looks it up
//! again. So a channel whose confirms are all nacks for `STUCK_AFTER` is closed and a new
//! one opened on the same connection. A queue that nacks for a real reason (no quorum, a
//! full `reject-publish` queue) gets a new channel every `STUCK_AFTER` too, which costs one
//! `channel.open` and changes nothing else.
//!
//! Refunding the nacks and silences of an unavailable queue is the ConfirmTracker's (see
//! `confirms::outage`).

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::FutureExt;
use lapin::Confirmation;

/// How long a channel may answer nothing but nacks before it is replaced.
pub(super) const STUCK_AFTER: Duration = Duration::from_secs(1);

/// One channel's answers since its last ack, shared with the confirm futures of its
/// publishes.
#[derive(Clone, Debug, Default)]
pub(super) struct ChannelAnswers(Arc<Mutex<NackStreak>>);

impl ChannelAnswers {
    /// `confirm`, noting on the way whether the broker acked or nacked it. Errors (a lost
    /// channel) are neither: the connection's own handling covers them.
    pub(super) fn watch<F>(&self, confirm: F) -> impl Future<Output = F::Output> + Send
    where
        F: Future<Output = lapin::Result<Confirmation>> + Send,
    {
        let streak = self.0.clone();
        confirm.inspect(move |result| {
            let acked = match result {
                Ok(Confirmation::Ack(_)) => true,
                Ok(Confirmation::Nack(_)) => false,
                _ => return,
            };
            if let Ok(mut s) = streak.lock() {
                s.answer(acked, Instant::now());
            }
        })
    }

    /// The channel's [`NackStreak::stuck`], after [`STUCK_AFTER`].
    pub(super) fn stuck(&self, now: Instant) -> Option<u64> {
        self.0.lock().ok().and_then(|s| s.stuck(now, STUCK_AFTER))
    }
}

/// Nacks since the last ack on one channel.
#[derive(Debug, Default)]
pub(super) struct NackStreak {
    /// The first nack since the last ack.
    since: Option<Instant>,
    nacks: u64,
}

impl NackStreak {
    fn answer(&mut self, acked: bool, now: Instant) {
        if acked {
            *self = NackStreak::default();
        } else {
            self.since.get_or_insert(now);
            self.nacks += 1;
        }
    }

    /// Nacks only, for at least `after`: how many, or `None` when the channel is not stuck.
    fn stuck(&self, now: Instant, after: Duration) -> Option<u64> {
        let since = self.since?;
        (now.saturating_duration_since(since) >= after).then_some(self.nacks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_channel_is_stuck_only_after_nacks_alone_for_the_whole_span() {
        let t0 = Instant::now();
        let mut s = NackStreak::default();
        assert_eq!(s.stuck(t0, STUCK_AFTER), None, "no answer yet");
        s.answer(false, t0);
        s.answer(false, t0 + 500 * MS);
        assert_eq!(s.stuck(t0 + 999 * MS, STUCK_AFTER), None);
        s.answer(false, t0 + 1000 * MS);
        assert_eq!(s.stuck(t0 + 1000 * MS, STUCK_AFTER), Some(3));
    }

    #[test]
    fn one_ack_ends_the_streak() {
        let t0 = Instant::now();
        let mut s = NackStreak::default();
        s.answer(false, t0);
        s.answer(true, t0 + 1500 * MS);
        s.answer(false, t0 + 1600 * MS);
        assert_eq!(s.stuck(t0 + 2500 * MS, STUCK_AFTER), None, "0.9 s of nacks");
        assert_eq!(s.stuck(t0 + 2600 * MS, STUCK_AFTER), Some(1));
    }

    #[test]
    fn lost_confirms_are_neither_ack_nor_nack() {
        let answers = ChannelAnswers::default();
        let lost = answers.watch(futures::future::ready(Err(lapin::Error::from(
            lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
        ))));
        let _ = futures::executor::block_on(lost);
        let nacked = answers.watch(futures::future::ready(Ok(Confirmation::Nack(None))));
        let _ = futures::executor::block_on(nacked);
        let nacks = answers.0.lock().map(|s| s.nacks).unwrap_or_default();
        assert_eq!(nacks, 1);
    }
}
