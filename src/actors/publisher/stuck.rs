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
//! **Nacks that say the queue is unavailable are not charged** ([`NackRun`]). Seen on
//! RabbitMQ 3.10.8 by an outside audit: a quorum queue that lost its majority nacked every
//! publish at once (not, as on an earlier machine, answering none), so with the default three
//! attempts 1 s and 2 s apart, 1,848 rows were dead-lettered within seconds of a 20 s majority
//! loss — and with `ordering.on_dead_letter: block` every key behind them stopped. A nack that
//! comes while every publish of the engine has been nacked for at least [`STUCK_AFTER`] (on
//! every publishing connection, across channel replacements, no ack in between; a retry may
//! go out on another connection than the attempt before) is the queue's state, not the row's: the attempt
//! is refunded, as a lost connection's is, for at most `retry.nacks_refunded_for` (5 min) from
//! the first nack, after which nacks are charged again, so a queue that stays unavailable (a
//! `reject-publish` queue nobody drains) still brings its rows to `max_attempts`. Nacks among
//! acks (one full queue beside working ones) are charged as before.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::FutureExt;
use lapin::Confirmation;

/// How long a channel may answer nothing but nacks before it is replaced.
pub(super) const STUCK_AFTER: Duration = Duration::from_secs(1);

/// A streak of nacks shared with the confirm futures that answer it: one channel's (to
/// replace a stuck channel), or the engine's across all its connections and channels, with
/// no ack in between (to refund the nacks of an unavailable queue).
#[derive(Clone, Debug, Default)]
pub struct NackRun(Arc<Mutex<NackStreak>>);

impl NackRun {
    fn answer(&self, acked: bool, now: Instant) {
        if let Ok(mut s) = self.0.lock() {
            s.answer(acked, now);
        }
    }

    /// See [`NackStreak::stuck`], after [`STUCK_AFTER`].
    fn stuck(&self, now: Instant) -> Option<u64> {
        self.0.lock().ok().and_then(|s| s.stuck(now, STUCK_AFTER))
    }

    /// Whether a nack now is the queue's state rather than the row's (see the module
    /// documentation): nacks alone for at least [`STUCK_AFTER`], and for less than `refunded_for`.
    pub fn outage(&self, now: Instant, refunded_for: Duration) -> bool {
        let since = self.0.lock().ok().and_then(|s| s.since);
        since.is_some_and(|since| {
            let run = now.saturating_duration_since(since);
            run >= STUCK_AFTER && run < refunded_for
        })
    }
}

/// Nacks since the last ack on one channel (or, shared, on every channel of the engine).
#[derive(Debug, Default)]
pub(super) struct NackStreak {
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
    pub(super) fn stuck(&self, now: Instant, after: Duration) -> Option<u64> {
        let since = self.since?;
        (now.saturating_duration_since(since) >= after).then_some(self.nacks)
    }
}

/// The streak of one channel, shared with the confirm futures of its publishes, and the
/// engine's, which outlives the channel.
#[derive(Clone, Debug, Default)]
pub(super) struct ChannelAnswers {
    channel: NackRun,
    engine: NackRun,
}

impl ChannelAnswers {
    /// `confirm`, noting on the way whether the broker acked or nacked it. Errors (a lost
    /// channel) are neither: the connection's own handling covers them.
    pub(super) fn watch<F>(&self, confirm: F) -> impl Future<Output = F::Output> + Send
    where
        F: Future<Output = lapin::Result<Confirmation>> + Send,
    {
        let (channel, engine) = (self.channel.clone(), self.engine.clone());
        confirm.inspect(move |result| {
            let acked = match result {
                Ok(Confirmation::Ack(_)) => true,
                Ok(Confirmation::Nack(_)) => false,
                _ => return,
            };
            let now = Instant::now();
            channel.answer(acked, now);
            engine.answer(acked, now);
        })
    }

    /// The answers of a new channel of an engine whose streak is `engine`.
    pub(super) fn on(engine: &NackRun) -> ChannelAnswers {
        ChannelAnswers {
            channel: NackRun::default(),
            engine: engine.clone(),
        }
    }

    /// The channel's [`NackStreak::stuck`].
    pub(super) fn stuck(&self, now: Instant) -> Option<u64> {
        self.channel.stuck(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const FIVE_MIN: Duration = Duration::from_secs(300);

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
    fn unbroken_nacks_are_refunded_from_the_first_second_for_a_while() {
        let t0 = Instant::now();
        let run = NackRun::default();
        assert!(!run.outage(t0, FIVE_MIN), "no answer yet");
        run.answer(false, t0);
        assert!(
            !run.outage(t0 + 999 * MS, FIVE_MIN),
            "a nack alone is the row's"
        );
        assert!(run.outage(t0 + STUCK_AFTER, FIVE_MIN));
        assert!(!run.outage(t0 + FIVE_MIN, FIVE_MIN), "then charged again");
        // An ack ends the run: nacks among acks are charged.
        run.answer(true, t0 + 2000 * MS);
        run.answer(false, t0 + 2100 * MS);
        assert!(!run.outage(t0 + 2500 * MS, FIVE_MIN));
        assert!(run.outage(t0 + 3100 * MS, FIVE_MIN));
    }

    #[test]
    fn a_new_channel_keeps_the_engines_run() {
        let run = NackRun::default();
        let first = ChannelAnswers::on(&run);
        let nacked = first.watch(futures::future::ready(Ok(Confirmation::Nack(None))));
        let _ = futures::executor::block_on(nacked);
        let second = ChannelAnswers::on(&run);
        assert!(second.engine.outage(Instant::now() + STUCK_AFTER, FIVE_MIN));
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
        let s = answers
            .channel
            .0
            .lock()
            .map(|s| s.nacks)
            .unwrap_or_default();
        assert_eq!(s, 1);
    }
}
