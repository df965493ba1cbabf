//! Telling a row's own failure from the broker's: publishes nacked or left unanswered while
//! the queue cannot take them are not charged an attempt.
//!
//! **Nacks that say the queue is unavailable are refunded.** Seen on RabbitMQ 3.10.8 by an
//! outside audit: a quorum queue that lost its majority nacked every publish at once (not, as
//! on an earlier machine, answering none), so with the default three attempts 1 s and 2 s
//! apart, 1,848 rows were dead-lettered within seconds of a 20 s majority loss — and with
//! `ordering.on_dead_letter: block` every key behind them stopped. Once the engine's publishes
//! have failed for [`RUN_BEFORE_REFUND`] with no later publish acked (on every publishing
//! connection, across channel replacements: a retry may go out on another connection than the
//! attempt before), the failures are the queue's state, not the rows': the attempt is
//! refunded, as a lost connection's is, for at most `retry.nacks_refunded_for` (5 min) from the
//! run's start, after which failures are charged again, so a queue that stays unavailable (a
//! `reject-publish` queue nobody drains) still brings its rows to `max_attempts`. A nack in
//! the run's first second is held undecided until the run is that old, or a later publish is
//! acked (the ConfirmTracker asks again every 100 ms while one waits): charging those at once
//! cost the rows nacked first an attempt each. Nacks among acks (one full queue beside
//! working ones) are charged.
//!
//! **Nor is a silence that says so** ([`Outage::silent`]). The same majority loss, with the
//! queue's leader among the lost nodes, nacks for a few seconds and then answers nothing; with
//! the leader alive it answers nothing from the start. A publish whose deadline passes with
//! no later publish acked is refunded the same way, within the same bound.
//!
//! **The run is kept by publish instants, not by when answers arrive.** An ack says the
//! broker took *that* publish; acks of publishes made just before a loss keep arriving for a
//! moment after it began, and counting them as "an ack since this row was published" charged
//! the rows published in that moment (an outside audit: with `max_attempts: 1`, two rows of
//! ~99,000 dead-lettered "no confirm" at a loss's start, one keyed and blocking 4,832 rows
//! behind it). So a failure is charged only when a publish made *after* it was acked, and
//! only such an ack ends the run. A publish's instant is when its round was handed to the
//! tracker; publishes of one round share it, so an ack of a round's first message does not
//! charge its last.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// How long the engine's publishes must have failed, with no later one acked, before their
/// failures are the queue's rather than the rows'.
pub const RUN_BEFORE_REFUND: Duration = Duration::from_secs(1);

/// The engine's run of failed publishes, shared by its ConfirmTrackers (see the module
/// documentation).
#[derive(Clone, Debug, Default)]
pub struct Outage(Arc<Mutex<Run>>);

impl Outage {
    /// The broker acked publishes made up to `latest`.
    pub fn acked(&self, latest: Instant) {
        if let Ok(mut run) = self.0.lock() {
            run.ack(latest);
        }
    }

    /// Whether the nack of a publish made at `published` is the queue's state rather than
    /// the row's: refunded once the run it joins is [`RUN_BEFORE_REFUND`] old, charged when a
    /// later publish was acked or the run outlasted `refunded_for`, undecided before either.
    pub fn judge(&self, published: Instant, now: Instant, refunded_for: Duration) -> NackVerdict {
        self.0.lock().map_or(NackVerdict::Charged, |mut run| {
            run.judge(published, now, refunded_for)
        })
    }

    /// Whether a publish made at `published`, unanswered at its deadline `now`, is the
    /// broker's silence rather than the row's fault: no later publish was acked, and the run
    /// it joins is younger than `refunded_for`.
    pub fn silent(&self, published: Instant, now: Instant, refunded_for: Duration) -> bool {
        self.0
            .lock()
            .is_ok_and(|mut run| run.silent(published, now, refunded_for))
    }
}

/// See [`Outage::judge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NackVerdict {
    /// The row's own nack: an attempt used.
    Charged,
    /// The queue's state: refunded.
    Refunded,
    /// The run is younger than [`RUN_BEFORE_REFUND`]: ask again shortly.
    Undecided,
}

#[derive(Debug, Default)]
struct Run {
    /// The earliest publish that failed with no later publish acked: the run's start.
    since: Option<Instant>,
    /// The latest publish acked.
    acked: Option<Instant>,
}

impl Run {
    fn ack(&mut self, published: Instant) {
        self.acked = self.acked.max(Some(published));
        if self.since.is_some_and(|since| published > since) {
            self.since = None;
        }
    }

    fn acked_after(&self, published: Instant) -> bool {
        self.acked.is_some_and(|acked| acked > published)
    }

    /// The run's start, once the failure of a publish made at `published` joined it.
    fn join(&mut self, published: Instant) -> Instant {
        let since = self.since.map_or(published, |s| s.min(published));
        self.since = Some(since);
        since
    }

    fn judge(&mut self, published: Instant, now: Instant, refunded_for: Duration) -> NackVerdict {
        if self.acked_after(published) {
            return NackVerdict::Charged; // nacks among acks
        }
        let run = now.saturating_duration_since(self.join(published));
        if run >= refunded_for {
            NackVerdict::Charged
        } else if run >= RUN_BEFORE_REFUND {
            NackVerdict::Refunded
        } else {
            NackVerdict::Undecided
        }
    }

    fn silent(&mut self, published: Instant, now: Instant, refunded_for: Duration) -> bool {
        !self.acked_after(published)
            && now.saturating_duration_since(self.join(published)) < refunded_for
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use NackVerdict::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);
    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn unbroken_nacks_are_refunded_from_the_first_second_for_a_while() {
        let t0 = Instant::now();
        let run = Outage::default();
        assert_eq!(
            run.judge(t0, t0 + 999 * MS, FIVE_MIN),
            Undecided,
            "a nack alone may be the row's"
        );
        assert_eq!(
            run.judge(t0, t0 + RUN_BEFORE_REFUND, FIVE_MIN),
            Refunded,
            "once the run is a second long"
        );
        assert_eq!(
            run.judge(t0 + 200 * S, t0 + 200 * S, FIVE_MIN),
            Refunded,
            "a later nack joins the run"
        );
        assert_eq!(
            run.judge(t0, t0 + FIVE_MIN, FIVE_MIN),
            Charged,
            "then charged again"
        );
        assert_eq!(
            Outage::default().judge(t0, t0 + S, Duration::ZERO),
            Charged,
            "0s: charged"
        );
    }

    #[test]
    fn an_ack_of_a_later_publish_charges_and_ends_the_run() {
        let t0 = Instant::now();
        let run = Outage::default();
        assert_eq!(run.judge(t0, t0 + 10 * MS, FIVE_MIN), Undecided);
        run.acked(t0 + 5 * MS);
        assert_eq!(run.judge(t0, t0 + S, FIVE_MIN), Charged, "nacks among acks");
        // The run ended: a new one starts at its first failure.
        let later = t0 + 2 * S;
        assert_eq!(run.judge(later, later + 500 * MS, FIVE_MIN), Undecided);
        assert_eq!(run.judge(later, later + S, FIVE_MIN), Refunded);
    }

    #[test]
    fn acks_of_earlier_publishes_arriving_late_charge_nothing() {
        // The outage-start case: publishes made before the loss are acked after rows
        // published in its first moment were nacked or timed out.
        let t0 = Instant::now();
        let run = Outage::default();
        let first_failed = t0 + 10 * MS;
        assert_eq!(run.judge(first_failed, t0 + 20 * MS, FIVE_MIN), Undecided);
        run.acked(t0); // a publish before it, acked after its nack
        run.acked(first_failed); // one of the same round
        assert_eq!(
            run.judge(first_failed, first_failed + S, FIVE_MIN),
            Refunded,
            "the run goes on"
        );
        assert!(
            run.silent(first_failed, first_failed + 30 * S, FIVE_MIN),
            "nor is its missed confirm charged"
        );
    }

    #[test]
    fn a_missed_confirm_with_no_later_publish_acked_is_refunded_for_a_while() {
        let t0 = Instant::now();
        let run = Outage::default();
        assert!(
            run.silent(t0, t0 + 30 * S, FIVE_MIN),
            "nothing ever acked: the broker is silent"
        );
        run.acked(t0 + 40 * S);
        assert!(
            !run.silent(t0 + 39 * S, t0 + 69 * S, FIVE_MIN),
            "a later publish acked: the row's own timeout"
        );
        let published = t0 + 41 * S;
        assert!(run.silent(published, published + 30 * S, FIVE_MIN));
        // The run counts from that publish: later silences are refunded up to the bound.
        assert!(run.silent(published + 60 * S, published + 90 * S, FIVE_MIN));
        assert_eq!(
            run.judge(published + 95 * S, published + 96 * S, FIVE_MIN),
            Refunded,
            "a nack after a silence is the same outage"
        );
        assert!(
            !run.silent(published + 280 * S, published + FIVE_MIN, FIVE_MIN),
            "then charged again"
        );
        assert!(!run.silent(published, published + 30 * S, Duration::ZERO));
    }

    #[test]
    fn a_silence_after_nacks_is_bounded_from_the_first_failed_publish() {
        let t0 = Instant::now();
        let run = Outage::default();
        run.acked(t0);
        assert_eq!(run.judge(t0 + S, t0 + S, FIVE_MIN), Undecided);
        assert!(run.silent(t0 + 2 * S, t0 + 32 * S, FIVE_MIN));
        assert!(!run.silent(t0 + 280 * S, t0 + 301 * S, FIVE_MIN));
    }
}
