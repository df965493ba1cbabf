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
//! no later publish acked is refunded the same way, within the same bound; so is a row failed
//! unpublished because the exchange's passive declare went unanswered, whatever was acked
//! meanwhile ([`Outage::unanswered`]).
//!
//! **No row is refunded for longer than `retry.nacks_refunded_for`** either, counted from its
//! own first refund, whatever the run: an ack of a later publish ends the run, so beside a
//! queue that took a message only every few seconds (nacks among rare acks), a full queue's
//! rows were refunded whenever no such ack came within their second, the run never grew old
//! enough to be charged, and they reached `max_attempts` only through the nacks an ack
//! happened to follow — hours, with acks a few minutes apart. Each engine remembers when it
//! first refunded each row (up to [`ROWS_REMEMBERED`]; forgotten on its ack, or once it has
//! not come back for `retry.backoff.max` and a minute) and charges every failure of it after
//! that bound.
//!
//! **The run is kept by publish instants, not by when answers arrive.** An ack says the
//! broker took *that* publish; acks of publishes made just before a loss keep arriving for a
//! moment after it began, and counting them as "an ack since this row was published" charged
//! the rows published in that moment (an outside audit: with `max_attempts: 1`, two rows of
//! ~99,000 dead-lettered "no confirm" at a loss's start, one keyed and blocking 4,832 rows
//! behind it). So a failure is charged only when a publish made *after* it was acked, and
//! only such an ack ends the run. A publish's instant is when its round was handed to the
//! tracker; publishes of one round share it, so an ack of a round's first message does not
//! charge its last. The same holds at a loss's end, the other way round: the broker reads
//! what waited and acks later publishes in a burst, so a missed confirm is charged only when
//! a later publish's ack came at least [`ANSWERING_FOR`] before its deadline (an outside
//! audit saw the same race charge six unanswered exchange checks 0.8 s after a majority came
//! back; those are refunded within the bounds whatever was acked, see
//! [`Outage::unanswered`]).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use uuid::Uuid;

use crate::config::Config;

/// How long the engine's publishes must have failed, with no later one acked, before their
/// failures are the queue's rather than the rows'.
pub const RUN_BEFORE_REFUND: Duration = Duration::from_secs(1);

/// Rows whose first refund an engine remembers at most (a long loss refunds every row it
/// tries; past this many, only the run's bound applies to the others).
pub const ROWS_REMEMBERED: usize = 100_000;

/// How often rows not seen again are forgotten (a pass over them all).
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// How long before a missed confirm's deadline a later publish must have been acked for the
/// miss to be the row's (half the wait, if that is shorter): acks that come only in the last
/// moment are a loss's end.
pub const ANSWERING_FOR: Duration = Duration::from_secs(2);

/// The engine's run of failed publishes, shared by its ConfirmTrackers (see the module
/// documentation).
#[derive(Clone, Debug)]
pub struct Outage(Arc<Mutex<Run>>);

impl Outage {
    /// The run of an engine with `config`'s bounds: refunds for at most
    /// `retry.nacks_refunded_for`; a row refunded and not seen again for `retry.backoff.max`
    /// and a minute is forgotten; acks are remembered as long as the longest wait judged.
    pub fn new(config: &Config) -> Outage {
        let longest_wait = config
            .retry
            .confirm_timeout
            .max(config.broker.connect_timeout);
        Outage::with(
            config.retry.nacks_refunded_for,
            config.retry.backoff.max + Duration::from_secs(60),
            longest_wait + Duration::from_secs(60),
        )
    }

    fn with(refunded_for: Duration, forget_after: Duration, acks_kept_for: Duration) -> Outage {
        Outage(Arc::new(Mutex::new(Run {
            refunded_for,
            forget_after,
            acks_kept_for,
            since: None,
            acks: VecDeque::new(),
            rows: HashMap::new(),
            pruned: Instant::now(),
        })))
    }

    /// The broker acked publishes made up to `latest`, among them rows `ids`; the acks came
    /// at `at`.
    pub fn acked(&self, latest: Instant, ids: &[Uuid], at: Instant) {
        if let Ok(mut run) = self.0.lock() {
            run.ack(latest, ids, at);
        }
    }

    /// Whether the nack of row `id`'s publish made at `published` is the queue's state rather
    /// than the row's: refunded once the run it joins is [`RUN_BEFORE_REFUND`] old, charged
    /// when a later publish was acked or the run (or the row's refunds) outlasted the bound,
    /// undecided before either.
    pub fn judge(&self, id: Uuid, published: Instant, now: Instant) -> NackVerdict {
        self.0.lock().map_or(NackVerdict::Charged, |mut run| {
            run.judge(id, published, now)
        })
    }

    /// Whether row `id`'s publish made at `published`, unanswered at `now`, is the broker's
    /// silence rather than the row's fault: no later publish was acked until
    /// [`ANSWERING_FOR`] before now (acks only in the last moment are a loss ending: the
    /// broker reads what waited, and the row's own ack may be among the next), and neither
    /// the run it joins nor the row's refunds outlasted the bound.
    pub fn silent(&self, id: Uuid, published: Instant, now: Instant) -> bool {
        self.0
            .lock()
            .is_ok_and(|mut run| run.silent(id, published, now))
    }

    /// Whether row `id`, failed unpublished because a request asked for it at `asked` went
    /// unanswered, is refunded: within the bounds of the run it joins and of the row's
    /// refunds, whatever was acked meanwhile. Only a stalled connection leaves a passive
    /// declare unanswered, never the row; and acks of later publishes do come when a loss
    /// ends, in the moment before such a request's wait ends (an outside audit: six rows
    /// dead-lettered "no answer to a passive declare within 5s" 0.8 s after a majority came
    /// back, with `max_attempts: 1`, when acks charged them).
    pub fn unanswered(&self, id: Uuid, asked: Instant, now: Instant) -> bool {
        self.0
            .lock()
            .is_ok_and(|mut run| run.within_bounds(id, asked, now))
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

#[derive(Debug)]
struct Run {
    refunded_for: Duration,
    forget_after: Duration,
    /// The earliest publish that failed with no later publish acked: the run's start.
    since: Option<Instant>,
    /// How long `acks` are kept.
    acks_kept_for: Duration,
    /// Acks of ever later publishes: the publish, and when its ack came (both increasing).
    acks: VecDeque<(Instant, Instant)>,
    /// Rows refunded: when first, and when last seen.
    rows: HashMap<Uuid, (Instant, Instant)>,
    /// When rows not seen for `forget_after` were last pruned.
    pruned: Instant,
}

impl Run {
    fn ack(&mut self, published: Instant, ids: &[Uuid], at: Instant) {
        if self
            .acks
            .back()
            .is_none_or(|(latest, _)| published > *latest)
        {
            self.acks.push_back((published, at));
        }
        while self
            .acks
            .front()
            .is_some_and(|(_, came)| at.saturating_duration_since(*came) > self.acks_kept_for)
            && self.acks.len() > 1
        {
            self.acks.pop_front();
        }
        if self.since.is_some_and(|since| published > since) {
            self.since = None;
        }
        if !self.rows.is_empty() {
            for id in ids {
                self.rows.remove(id);
            }
        }
    }

    fn acked_after(&self, published: Instant) -> bool {
        self.acks
            .back()
            .is_some_and(|(latest, _)| *latest > published)
    }

    /// When the first ack of a publish made after `published` came.
    fn first_ack_after(&self, published: Instant) -> Option<Instant> {
        let first = self.acks.partition_point(|(p, _)| *p <= published);
        self.acks.get(first).map(|(_, came)| *came)
    }

    /// The run's start, once the failure of a publish made at `published` joined it.
    fn join(&mut self, published: Instant) -> Instant {
        let since = self.since.map_or(published, |s| s.min(published));
        self.since = Some(since);
        since
    }

    fn judge(&mut self, id: Uuid, published: Instant, now: Instant) -> NackVerdict {
        if self.acked_after(published) {
            return NackVerdict::Charged; // nacks among acks
        }
        let run = now.saturating_duration_since(self.join(published));
        if run >= self.refunded_for {
            NackVerdict::Charged
        } else if run < RUN_BEFORE_REFUND {
            NackVerdict::Undecided
        } else if self.refund(id, now) {
            NackVerdict::Refunded
        } else {
            NackVerdict::Charged
        }
    }

    fn silent(&mut self, id: Uuid, published: Instant, now: Instant) -> bool {
        // Half the wait, for a `retry.confirm_timeout` under twice ANSWERING_FOR.
        let needed = ANSWERING_FOR.min(now.saturating_duration_since(published) / 2);
        let answering = self
            .first_ack_after(published)
            .is_some_and(|came| now.saturating_duration_since(came) >= needed);
        !answering && self.within_bounds(id, published, now)
    }

    /// The run a failure at `published` joins, and the row's refunds, are younger than the
    /// bound.
    fn within_bounds(&mut self, id: Uuid, published: Instant, now: Instant) -> bool {
        now.saturating_duration_since(self.join(published)) < self.refunded_for
            && self.refund(id, now)
    }

    /// Whether row `id` may be refunded once more: its first refund was less than the bound
    /// ago (or is this one).
    fn refund(&mut self, id: Uuid, now: Instant) -> bool {
        if now.saturating_duration_since(self.pruned) >= PRUNE_EVERY {
            let forget_after = self.forget_after;
            self.rows
                .retain(|_, (_, last)| now.saturating_duration_since(*last) < forget_after);
            self.pruned = now;
        }
        let room = self.rows.len() < ROWS_REMEMBERED;
        let first = match self.rows.get_mut(&id) {
            Some((first, last)) => {
                *last = now;
                *first
            }
            None => {
                if room {
                    self.rows.insert(id, (now, now));
                }
                now
            }
        };
        now.saturating_duration_since(first) < self.refunded_for
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use NackVerdict::*;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);
    const FIVE_MIN: Duration = Duration::from_secs(300);
    const HOUR: Duration = Duration::from_secs(3600);

    fn outage() -> Outage {
        Outage::with(FIVE_MIN, Duration::from_secs(60), HOUR)
    }

    fn row() -> Uuid {
        Uuid::new_v4()
    }

    #[test]
    fn unbroken_nacks_are_refunded_from_the_first_second_for_a_while() {
        let t0 = Instant::now();
        let run = outage();
        assert_eq!(
            run.judge(row(), t0, t0 + 999 * MS),
            Undecided,
            "a nack alone may be the row's"
        );
        assert_eq!(
            run.judge(row(), t0, t0 + RUN_BEFORE_REFUND),
            Refunded,
            "once the run is a second long"
        );
        assert_eq!(
            run.judge(row(), t0 + 200 * S, t0 + 200 * S),
            Refunded,
            "a later nack joins the run"
        );
        assert_eq!(
            run.judge(row(), t0, t0 + FIVE_MIN),
            Charged,
            "then charged again"
        );
        assert_eq!(
            Outage::with(Duration::ZERO, S, S).judge(row(), t0, t0 + S),
            Charged,
            "0s: charged"
        );
    }

    #[test]
    fn an_ack_of_a_later_publish_charges_and_ends_the_run() {
        let t0 = Instant::now();
        let run = outage();
        assert_eq!(run.judge(row(), t0, t0 + 10 * MS), Undecided);
        run.acked(t0 + 5 * MS, &[], t0 + 10 * MS);
        assert_eq!(run.judge(row(), t0, t0 + S), Charged, "nacks among acks");
        // The run ended: a new one starts at its first failure.
        let later = t0 + 2 * S;
        assert_eq!(run.judge(row(), later, later + 500 * MS), Undecided);
        assert_eq!(run.judge(row(), later, later + S), Refunded);
    }

    #[test]
    fn acks_of_earlier_publishes_arriving_late_charge_nothing() {
        // The outage-start case: publishes made before the loss are acked after rows
        // published in its first moment were nacked or timed out.
        let t0 = Instant::now();
        let run = outage();
        let first_failed = t0 + 10 * MS;
        assert_eq!(run.judge(row(), first_failed, t0 + 20 * MS), Undecided);
        run.acked(t0, &[], t0 + 30 * MS); // a publish before it, acked after its nack
        run.acked(first_failed, &[], t0 + 30 * MS); // one of the same round
        assert_eq!(
            run.judge(row(), first_failed, first_failed + S),
            Refunded,
            "the run goes on"
        );
        assert!(
            run.silent(row(), first_failed, first_failed + 30 * S),
            "nor is its missed confirm charged"
        );
    }

    #[test]
    fn a_missed_confirm_with_no_later_publish_acked_is_refunded_for_a_while() {
        let t0 = Instant::now();
        let run = outage();
        assert!(
            run.silent(row(), t0, t0 + 30 * S),
            "nothing ever acked: the broker is silent"
        );
        run.acked(t0 + 40 * S, &[], t0 + 41 * S);
        assert!(
            !run.silent(row(), t0 + 39 * S, t0 + 69 * S),
            "a later publish acked: the row's own timeout"
        );
        let published = t0 + 41 * S;
        assert!(run.silent(row(), published, published + 30 * S));
        // The run counts from that publish: later silences are refunded up to the bound.
        assert!(run.silent(row(), published + 60 * S, published + 90 * S));
        assert_eq!(
            run.judge(row(), published + 95 * S, published + 96 * S),
            Refunded,
            "a nack after a silence is the same outage"
        );
        assert!(
            !run.silent(row(), published + 280 * S, published + FIVE_MIN),
            "then charged again"
        );
        assert!(!Outage::with(Duration::ZERO, S, S).silent(row(), published, published + 30 * S));
    }

    #[test]
    fn a_silence_after_nacks_is_bounded_from_the_first_failed_publish() {
        let t0 = Instant::now();
        let run = outage();
        run.acked(t0, &[], t0);
        assert_eq!(run.judge(row(), t0 + S, t0 + S), Undecided);
        assert!(run.silent(row(), t0 + 2 * S, t0 + 32 * S));
        assert!(!run.silent(row(), t0 + 280 * S, t0 + 301 * S));
    }

    #[test]
    fn a_row_is_refunded_for_at_most_the_bound_from_its_first_refund_whatever_the_run() {
        // A full queue beside one that takes a message every few seconds: each ack of a
        // later publish ends the run, so the run never outlasts the bound.
        let t0 = Instant::now();
        let run = outage();
        let id = row();
        let mut published = t0;
        let mut verdicts = Vec::new();
        while published < t0 + FIVE_MIN + 30 * S {
            verdicts.push(run.judge(id, published, published + S));
            run.acked(published + 2 * S, &[], published + 2 * S); // another row, published later, acked
            published += 4 * S;
        }
        let charged = verdicts.iter().filter(|v| **v == Charged).count();
        assert_eq!(verdicts[0], Refunded);
        assert_eq!(charged, 8, "charged from the bound on: {verdicts:?}");
        assert_eq!(verdicts.last(), Some(&Charged));
        // Its ack forgets it: refunded again in a later outage.
        run.acked(published, &[id], published);
        assert!(run.silent(id, published + S, published + 31 * S));
    }

    #[test]
    fn rows_not_seen_again_are_forgotten() {
        let t0 = Instant::now();
        let run = Outage::with(FIVE_MIN, 60 * S, HOUR);
        for _ in 0..100 {
            assert!(run.silent(row(), t0, t0 + 30 * S));
        }
        let kept = row();
        assert!(run.silent(kept, t0 + 39 * S, t0 + 39 * S));
        let remembered = || run.0.lock().map(|r| r.rows.len()).unwrap_or_default();
        assert_eq!(remembered(), 101);
        assert!(run.silent(kept, t0 + 95 * S, t0 + 95 * S), "prunes");
        assert_eq!(remembered(), 1, "only the row seen within the last minute");
        assert!(run.silent(row(), t0 + 120 * S, t0 + 120 * S));
        assert_eq!(remembered(), 2);
    }

    #[test]
    fn acks_only_in_the_moment_before_a_deadline_are_a_loss_ending() {
        let t0 = Instant::now();
        let run = outage();
        let id = row();
        // The majority comes back 4 s into a 5 s wait: later publishes are acked at once.
        run.acked(t0 + 4 * S, &[], t0 + 4 * S);
        assert!(
            run.silent(row(), t0, t0 + 5 * S),
            "acked for a second before the deadline: refunded"
        );
        assert!(
            !run.silent(row(), t0, t0 + 4 * S + ANSWERING_FOR),
            "acked for two seconds: the row's own"
        );
        assert!(
            run.unanswered(id, t0, t0 + 6 * S),
            "an unanswered request is refunded whatever was acked"
        );
        assert!(run.unanswered(id, t0 + 200 * S, t0 + 205 * S));
        assert!(
            !run.unanswered(id, t0 + 300 * S, t0 + 305 * S),
            "within the bounds"
        );
    }

    #[test]
    fn old_acks_are_dropped_but_the_latest_is_kept() {
        let t0 = Instant::now();
        let run = Outage::with(FIVE_MIN, S, 10 * S);
        run.acked(t0, &[], t0);
        run.acked(t0 + S, &[], t0 + S);
        run.acked(t0 + 30 * S, &[], t0 + 30 * S);
        let kept = || run.0.lock().map(|r| r.acks.len()).unwrap_or_default();
        assert_eq!(kept(), 1);
        run.acked(t0 + 60 * S, &[], t0 + 60 * S);
        assert_eq!(kept(), 1, "the latest stays");
        assert_eq!(
            run.judge(row(), t0 + 59 * S, t0 + 60 * S),
            NackVerdict::Charged
        );
    }
}
