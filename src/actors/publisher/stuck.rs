//! Telling a publishing channel that only gets nacks, so it can be replaced, and an engine
//! whose every publish is nacked or unanswered, so those attempts are not charged.
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
//! loss — and with `ordering.on_dead_letter: block` every key behind them stopped. Once every
//! publish of the engine has been nacked for [`STUCK_AFTER`] (on every publishing connection,
//! across channel replacements, no ack in between; a retry may go out on another connection
//! than the attempt before), its nacks are the queue's state, not the rows': the attempt is
//! refunded, as a lost connection's is, for at most `retry.nacks_refunded_for` (5 min) from the
//! first nack, after which nacks are charged again, so a queue that stays unavailable (a
//! `reject-publish` queue nobody drains) still brings its rows to `max_attempts`. A nack of the
//! run's first second is held undecided until the run is that old, or an ack comes (the
//! ConfirmTracker asks again every 100 ms): charging those at once cost the rows nacked first
//! an attempt each. Nacks among acks (one full queue beside working ones) are charged.
//!
//! **Nor is a silence that says so** ([`NackRun::silent`]). The same majority loss, with the
//! queue's leader among the lost nodes, nacks for a few seconds and then answers nothing; with
//! the leader alive it answers nothing from the start. A re-check of the nack refund saw two
//! rows of 16,100 dead-lettered "no confirm within 30s" after a 25 s loss: their first attempt
//! charged in the first second of nacks, the next ones in the silence. A publish whose
//! deadline passes with no ack for anything the engine published since it went out is refunded
//! the same way, within the same bound: the run then counts from that publish (or its first
//! nack, if earlier). A row that times out while other publishes are acked is charged.

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

    /// Whether a nack that came at `nacked` is the queue's state rather than the row's (see
    /// the module documentation): refunded once nacks alone have lasted [`STUCK_AFTER`],
    /// charged once an ack came after it or the run outlasted `refunded_for`, and undecided
    /// before either.
    pub fn judge(&self, nacked: Instant, now: Instant, refunded_for: Duration) -> NackVerdict {
        self.0
            .lock()
            .map_or(NackVerdict::Charged, |s| s.judge(nacked, now, refunded_for))
    }

    /// Whether a publish made at `published` and still unconfirmed at its deadline is the
    /// broker's silence rather than the row's fault: nothing the engine published was acked
    /// since it went out, and the run (counted from its first nack or from this publish,
    /// whichever came first) is younger than `refunded_for` (see the module documentation).
    pub fn silent(&self, published: Instant, now: Instant, refunded_for: Duration) -> bool {
        self.0
            .lock()
            .is_ok_and(|mut s| s.unanswered(published, now, refunded_for))
    }
}

/// See [`NackRun::judge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackVerdict {
    /// The row's own nack: an attempt used.
    Charged,
    /// The queue's state: refunded.
    Refunded,
    /// The run of nacks is younger than [`STUCK_AFTER`]: ask again shortly.
    Undecided,
}

/// Nacks since the last ack on one channel (or, shared, on every channel of the engine).
#[derive(Debug, Default)]
pub(super) struct NackStreak {
    /// The first nack (or unanswered publish, see [`NackRun::silent`]) since the last ack.
    since: Option<Instant>,
    nacks: u64,
    last_ack: Option<Instant>,
}

impl NackStreak {
    fn answer(&mut self, acked: bool, now: Instant) {
        if acked {
            *self = NackStreak {
                last_ack: Some(now),
                ..NackStreak::default()
            };
        } else {
            self.since.get_or_insert(now);
            self.nacks += 1;
        }
    }

    fn judge(&self, nacked: Instant, now: Instant, refunded_for: Duration) -> NackVerdict {
        let Some(since) = self.since.filter(|_| !self.acked_since(nacked)) else {
            return NackVerdict::Charged; // nacks among acks
        };
        let run = now.saturating_duration_since(since);
        if run >= refunded_for {
            NackVerdict::Charged
        } else if run >= STUCK_AFTER {
            NackVerdict::Refunded
        } else {
            NackVerdict::Undecided
        }
    }

    fn acked_since(&self, t: Instant) -> bool {
        self.last_ack.is_some_and(|ack| ack >= t)
    }

    /// See [`NackRun::silent`]; a refunded silence joins the run, so it is bounded with it.
    fn unanswered(&mut self, published: Instant, now: Instant, refunded_for: Duration) -> bool {
        if self.acked_since(published) {
            return false;
        }
        let since = self.since.map_or(published, |s| s.min(published));
        self.since = Some(since);
        now.saturating_duration_since(since) < refunded_for
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

    /// `confirm`, a probe's (on a channel of its own: see `probe`), noting only for the
    /// engine's streak whether the broker acked or nacked it.
    pub(super) fn watch_probe<F>(&self, confirm: F) -> impl Future<Output = F::Output> + Send
    where
        F: Future<Output = lapin::Result<Confirmation>> + Send,
    {
        ChannelAnswers::on(&self.engine).watch(confirm)
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
        use NackVerdict::*;
        let t0 = Instant::now();
        let run = NackRun::default();
        assert_eq!(run.judge(t0, t0, FIVE_MIN), Charged, "no run");
        run.answer(false, t0);
        assert_eq!(
            run.judge(t0, t0 + 999 * MS, FIVE_MIN),
            Undecided,
            "a nack alone may be the row's"
        );
        assert_eq!(
            run.judge(t0, t0 + STUCK_AFTER, FIVE_MIN),
            Refunded,
            "the first nack too, once the run is a second long"
        );
        assert_eq!(
            run.judge(t0, t0 + FIVE_MIN, FIVE_MIN),
            Charged,
            "then charged again"
        );
        assert_eq!(run.judge(t0, t0, Duration::ZERO), Charged, "0s: charged");
        // An ack ends the run: the nacks before it, and those among acks, are charged.
        run.answer(true, t0 + 2000 * MS);
        assert_eq!(run.judge(t0 + 1900 * MS, t0 + 2000 * MS, FIVE_MIN), Charged);
        run.answer(false, t0 + 2100 * MS);
        assert_eq!(
            run.judge(t0 + 2100 * MS, t0 + 2500 * MS, FIVE_MIN),
            Undecided
        );
        assert_eq!(
            run.judge(t0 + 2100 * MS, t0 + 3100 * MS, FIVE_MIN),
            Refunded
        );
    }

    #[test]
    fn a_missed_confirm_with_no_ack_since_its_publish_is_refunded_for_a_while() {
        const S: Duration = Duration::from_secs(1);
        let t0 = Instant::now();
        let run = NackRun::default();
        assert!(
            run.silent(t0, t0 + 30 * S, FIVE_MIN),
            "nothing ever acked: the broker is silent"
        );
        run.answer(true, t0 + 40 * S);
        assert!(
            !run.silent(t0 + 39 * S, t0 + 69 * S, FIVE_MIN),
            "acked after the publish: the row's own timeout"
        );
        let published = t0 + 41 * S;
        assert!(run.silent(published, published + 30 * S, FIVE_MIN));
        // The run counts from that publish: later silences are refunded up to the bound.
        assert!(run.silent(published + 60 * S, published + 90 * S, FIVE_MIN));
        assert_eq!(
            run.judge(published + 95 * S, published + 95 * S, FIVE_MIN),
            NackVerdict::Refunded,
            "a nack after a silence is the same outage"
        );
        assert!(
            !run.silent(published + 280 * S, published + FIVE_MIN, FIVE_MIN),
            "then charged again"
        );
        assert!(!run.silent(published, published + 30 * S, Duration::ZERO));
    }

    #[test]
    fn a_silence_after_nacks_is_bounded_from_the_first_nack() {
        const S: Duration = Duration::from_secs(1);
        let t0 = Instant::now();
        let run = NackRun::default();
        run.answer(true, t0);
        run.answer(false, t0 + S);
        assert!(run.silent(t0 + 2 * S, t0 + 32 * S, FIVE_MIN));
        assert!(!run.silent(t0 + 280 * S, t0 + 310 * S, FIVE_MIN));
    }

    #[test]
    fn a_new_channel_keeps_the_engines_run() {
        let run = NackRun::default();
        let first = ChannelAnswers::on(&run);
        let nacked = first.watch(futures::future::ready(Ok(Confirmation::Nack(None))));
        let _ = futures::executor::block_on(nacked);
        let second = ChannelAnswers::on(&run);
        let later = Instant::now() + STUCK_AFTER;
        assert_eq!(
            second.engine.judge(later, later, FIVE_MIN),
            NackVerdict::Refunded
        );
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
