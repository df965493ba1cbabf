//! The typed state machine every outbox message goes through.
//!
//! ```text
//! Pending ──claim──► InFlight ──ack──► Confirmed ──retention──► deleted or archived
//!    ▲                 │ │ │
//!    │                 │ │ └─release (shutdown)──► Pending, or Retrying after failed attempts
//!    │                 │ └─fail──► Retrying ──claim──► InFlight …
//!    │                 │              └─claimed past its budget──► Failed
//!    │                 └─fail, attempts exhausted──► Failed (moved to dead_letters)
//!    └──requeue (operator), from Failed
//! ```
//!
//! The `status` column holds the same names ([`Status::as_str`]), except `failed`: it is in
//! the column's type, but no statement writes it. What the SQL does, transition by transition:
//! - **claim**: a due `pending` or `retrying` row, or an `in_flight` row whose lease expired
//!   (its engine crashed or stopped beating; `last_error` says so), becomes `in_flight`,
//!   leased to the claiming engine, with the attempt counted.
//! - **ack**: the row becomes `confirmed` whatever its status by then: an ack is a fact about
//!   delivery, recorded even when the lease has passed to another engine.
//! - **fail**: `in_flight` → `retrying`, due after the backoff, only while this engine holds
//!   the lease.
//! - **release** (shutdown: rows never published, and at the end of a shutdown that ran out
//!   of time every row the engine still holds): `in_flight` → `pending` on a first attempt,
//!   `retrying` when it had failed before; the attempt is given back and it is due at once.
//! - **attempts exhausted**: the row leaves the outbox in the same statement that inserts it
//!   into `dead_letters`. [`Status::Failed`] is the state of a message in `dead_letters`.
//! - **requeue**: from `dead_letters` back into the outbox as `pending`, attempts at 0.
//! - **retention**: old `confirmed` rows are deleted, or moved to `outbox_archive`.
//!
//! Transitions are methods that return the next state or a [`TransitionError`]: an illegal
//! move such as `Confirmed → Retrying` is an error the caller must handle, never silently
//! applied. [`Delivery`] is the in-flight form the engine holds for each claimed message.

use std::{fmt, str::FromStr, time::Duration};

use crate::{
    actors::scheduler::Credit,
    backoff,
    broker::{refuses_exchange, REFUSAL_REMEMBERED},
    config::BackoffConfig,
    message::OutboxMessage,
};

/// A message's lifecycle state; the `status` column of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Committed by a producer, waiting for its first publish.
    Pending,
    /// Claimed by an engine (leased) and published or about to be; awaiting the confirm.
    InFlight,
    /// The broker acknowledged it and it was routed: done.
    Confirmed,
    /// An attempt failed; it waits for `next_attempt_at`.
    Retrying,
    /// Attempts exhausted: the message is in `dead_letters` (never written to the outbox's
    /// `status`).
    Failed,
}

/// Every status, in lifecycle order.
pub const ALL_STATUSES: [Status; 5] = [
    Status::Pending,
    Status::InFlight,
    Status::Confirmed,
    Status::Retrying,
    Status::Failed,
];

/// An event that the current state does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal transition: {event} from {from}")]
pub struct TransitionError {
    /// The state the message was in.
    pub from: Status,
    /// What was attempted.
    pub event: &'static str,
}

impl Status {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::InFlight => "in_flight",
            Status::Confirmed => "confirmed",
            Status::Retrying => "retrying",
            Status::Failed => "failed",
        }
    }

    /// The engine does nothing more with it (an operator may still requeue a `Failed` one).
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Confirmed | Status::Failed)
    }

    fn illegal(self, event: &'static str) -> TransitionError {
        TransitionError { from: self, event }
    }

    /// Pending/Retrying → InFlight: the message is claimed and handed to the publisher.
    pub fn publish(self) -> Result<Status, TransitionError> {
        match self {
            Status::Pending | Status::Retrying => Ok(Status::InFlight),
            other => Err(other.illegal("publish")),
        }
    }

    /// InFlight → Confirmed: the broker acked and did not return it.
    pub fn ack(self) -> Result<Status, TransitionError> {
        match self {
            Status::InFlight => Ok(Status::Confirmed),
            other => Err(other.illegal("ack")),
        }
    }

    /// InFlight → Retrying, or → Failed when `attempts` has reached `max_attempts`.
    pub fn fail(self, attempts: u32, max_attempts: u32) -> Result<Status, TransitionError> {
        match self {
            Status::InFlight if attempts >= max_attempts => Ok(Status::Failed),
            Status::InFlight => Ok(Status::Retrying),
            other => Err(other.illegal("fail")),
        }
    }

    /// Retrying → Failed: attempts were already used up (e.g. by leases that expired).
    pub fn exhaust(self) -> Result<Status, TransitionError> {
        match self {
            Status::Retrying => Ok(Status::Failed),
            other => Err(other.illegal("exhaust")),
        }
    }

    /// InFlight → Pending: the lease is given back before the message was published
    /// (shutdown), so the attempt does not count. The row itself goes back as `retrying`
    /// when earlier attempts had failed.
    pub fn release(self) -> Result<Status, TransitionError> {
        match self {
            Status::InFlight => Ok(Status::Pending),
            other => Err(other.illegal("release")),
        }
    }

    /// Failed → Pending: an operator requeues a dead letter.
    pub fn requeue(self) -> Result<Status, TransitionError> {
        match self {
            Status::Failed => Ok(Status::Pending),
            other => Err(other.illegal("requeue")),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A status name that is not one of the five.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status `{0}`")]
pub struct UnknownStatus(pub String);

impl FromStr for Status {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ALL_STATUSES
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_string()))
    }
}

/// Why an attempt did not succeed. Stored (as text) in `last_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureReason {
    /// The broker answered `basic.nack`.
    Nacked,
    /// The broker answered `basic.nack` while it had acked nothing the engine published
    /// after this row for a while: the queue is unavailable (a quorum queue without its
    /// majority), not the row at fault. Refunded like [`FailureReason::ChannelLost`], for a
    /// bounded time (see `actors::confirms::outage`).
    NackedUnavailable,
    /// The broker returned it (`basic.return`, e.g. 312 NO_ROUTE): no queue got it.
    Returned {
        /// AMQP reply code.
        code: u16,
        /// AMQP reply text.
        text: String,
    },
    /// No confirm arrived within `retry.confirm_timeout`.
    ConfirmTimeout(Duration),
    /// No confirm arrived within `retry.confirm_timeout`, nor an ack for anything else the
    /// engine published after it: the broker or queue is silent (a quorum queue without its
    /// majority), not the row at fault. Refunded like [`FailureReason::NackedUnavailable`].
    ConfirmTimeoutUnavailable(Duration),
    /// The channel or connection failed before the confirm arrived.
    ChannelLost(String),
    /// The broker left a request the publish depends on unanswered (the exchange's passive
    /// declare: a quorum queue without its majority stops a connection's reads), past
    /// `retry.nacks_refunded_for`; charged. Within it the same failure is refunded as
    /// [`FailureReason::ChannelLost`] (see `actors::confirms::outage`): unbounded refunds kept
    /// every row of such an outage `in_flight`, unpublished, for as long as it lasted.
    Unanswered(String),
    /// The message was not sent because its exchange does not exist (yet: it may be
    /// declared later, so the row keeps its backoff).
    Rejected(String),
    /// The message can never be published as written: headers that are not a JSON object
    /// (or not representable in AMQP), an exchange or routing key over 255 bytes, a payload
    /// over `publisher.max_payload_bytes`, headers over the connection's frame size. No
    /// further attempt can succeed, so the row is dead-lettered at once.
    Unpublishable(String),
    /// The broker closed the channel because of this message (its exchange is named in the
    /// close, e.g. 403 ACCESS_REFUSED on an internal exchange or one the user may not write
    /// to), or it was held back because the broker refused its exchange moments ago. Unlike
    /// [`FailureReason::ChannelLost`] it is charged: a row the broker refuses must reach its
    /// `max_attempts` instead of closing the channel under its neighbours forever.
    Refused {
        /// AMQP reply code of the channel close.
        code: u16,
        /// AMQP reply text of the channel close.
        text: String,
    },
    /// The broker closed the whole connection (a hard error other than 320
    /// CONNECTION_FORCED) while this message, published alone because it was in flight when
    /// that happened before, was the only one on it (see `actors::publisher::isolation`).
    /// Charged, like [`FailureReason::Refused`].
    ClosedConnection {
        /// AMQP reply code of the connection close (e.g. 541).
        code: u16,
        /// AMQP reply text of the connection close.
        text: String,
    },
    /// Its lease expired while another engine (or a crashed one) held it.
    LeaseExpired,
}

impl FailureReason {
    /// Failures caused by another message or by the connection, not by this message: the
    /// attempt is refunded so a neighbour's fault never dead-letters a good message.
    pub fn is_collateral(&self) -> bool {
        matches!(
            self,
            FailureReason::ChannelLost(_)
                | FailureReason::NackedUnavailable
                | FailureReason::ConfirmTimeoutUnavailable(_)
        )
    }

    /// Failures no retry can mend: the row goes to `dead_letters` at once, whatever attempts
    /// it has left.
    pub fn is_permanent(&self) -> bool {
        matches!(self, FailureReason::Unpublishable(_))
    }

    /// The shortest wait before another attempt. A refused exchange is most often a
    /// permission an operator is changing, and the engine fails rows to it unpublished, charged,
    /// for [`REFUSAL_REMEMBERED`] after each refusal: at the backoff's pace (1 s, 2 s) a row
    /// would use up its attempts in seconds. Spacing them [`RETRY_AFTER_REFUSAL`] apart gives
    /// the operator `(max_attempts - 1)` such spans to put it right before anything is
    /// dead-lettered, and a refusal that lasts still reaches the row's budget.
    pub fn retry_floor(&self) -> Duration {
        match self {
            FailureReason::Refused { code, text } if refuses_exchange(*code, text) => {
                RETRY_AFTER_REFUSAL
            }
            _ => Duration::ZERO,
        }
    }
}

/// The least time between two attempts of a row whose exchange the broker refused (see
/// [`FailureReason::retry_floor`]). Longer than [`REFUSAL_REMEMBERED`], so each attempt asks
/// the broker again, or meets a refusal seen moments before it.
pub const RETRY_AFTER_REFUSAL: Duration = Duration::from_secs(30);

const _: () = assert!(RETRY_AFTER_REFUSAL.as_secs() > REFUSAL_REMEMBERED.as_secs());

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::Nacked => f.write_str("nacked by broker"),
            FailureReason::NackedUnavailable => {
                f.write_str("nacked by broker, as every publish for a while (queue unavailable?)")
            }
            FailureReason::Returned { code, text } => {
                write!(f, "returned by broker (unroutable): {code} {text}")
            }
            FailureReason::ConfirmTimeout(d) => {
                write!(f, "no confirm within {}", humantime::format_duration(*d))
            }
            FailureReason::ConfirmTimeoutUnavailable(d) => write!(
                f,
                "no confirm within {}, nor for any other publish meanwhile (queue unavailable?)",
                humantime::format_duration(*d)
            ),
            FailureReason::ChannelLost(why) => write!(f, "channel lost before confirm: {why}"),
            FailureReason::Unanswered(why) => write!(f, "not published: {why}"),
            FailureReason::Rejected(why) => write!(f, "not published: {why}"),
            FailureReason::Unpublishable(why) => {
                write!(f, "can never be published, so not retried: {why}")
            }
            FailureReason::Refused { code, text } => {
                write!(f, "refused by broker (channel closed): {code} {text}")
            }
            FailureReason::ClosedConnection { code, text } => write!(
                f,
                "the broker closed the connection when it was published alone: {code} {text}"
            ),
            FailureReason::LeaseExpired => {
                f.write_str("lease expired before a confirm was recorded")
            }
        }
    }
}

/// What the engine does with a message after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterFailure {
    /// Back to `retrying`, due after `delay`; `refund` when the attempt should not count.
    Retry {
        /// Backoff delay until `next_attempt_at`.
        delay: Duration,
        /// The attempt is given back (collateral failure).
        refund: bool,
    },
    /// Attempts exhausted: to `dead_letters`.
    DeadLetter,
}

/// The largest attempt budget, for a row (`max_attempts`, a CHECK constraint) or for the
/// engine (`retry.max_attempts`): no message retries for ever.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;

/// A claimed message as the engine holds it while it is in flight: the row plus its state,
/// and its share of the engine's in-flight bound (a [`Credit`], which goes back to the
/// Scheduler with the row's durable outcome). Every change of state goes through the
/// [`Status`] transitions. Not `Clone`: a row in flight is held once.
#[derive(Debug)]
pub struct Delivery {
    /// The claimed row. Boxed: a delivery moves through several actors' mailboxes and
    /// batches, and moving a pointer is cheaper than moving the row's 200-odd bytes each time.
    pub message: Box<OutboxMessage>,
    state: Status,
    max_attempts: u32,
    credit: Credit,
    /// This attempt's spans, when `telemetry.traces` is on.
    pub(crate) trace: Option<crate::telemetry::MessageTrace>,
}

impl Delivery {
    /// A freshly claimed row: it was `pending` or `retrying` and the claim made it
    /// `in_flight` (the claim already counted the attempt).
    pub fn claimed(message: OutboxMessage, default_max_attempts: u32) -> Delivery {
        let max_attempts = message
            .max_attempts
            .unwrap_or(default_max_attempts)
            .clamp(1, MAX_ATTEMPTS_LIMIT);
        let credit = Credit::unbacked(message.id, message.ordering_key.is_some());
        Delivery {
            message: Box::new(message),
            state: Status::InFlight,
            max_attempts,
            credit,
            trace: None,
        }
    }

    /// This delivery holding `credit` (the Scheduler's, for the row it claimed).
    pub(crate) fn holding(mut self, credit: Credit) -> Delivery {
        self.credit = credit;
        self
    }

    /// The row's credit, the delivery done with (its outcome is about to be written).
    pub fn into_credit(self) -> Credit {
        self.credit
    }

    /// The row's credit, while the delivery is kept for something else (the dead-letter
    /// exchange, after the move): it holds an unbacked one from now on.
    pub fn take_credit(&mut self) -> Credit {
        let spent = Credit::unbacked(self.message.id, self.message.ordering_key.is_some());
        std::mem::replace(&mut self.credit, spent)
    }

    /// `InFlight` from the claim until a transition moves it on.
    pub fn state(&self) -> Status {
        self.state
    }

    /// Attempts so far, this one included.
    pub fn attempts(&self) -> u32 {
        self.message.attempts
    }

    /// The effective maximum (row value, else config).
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The claim went past `max_attempts` (earlier attempts ended by expired leases):
    /// it must be dead-lettered without another publish.
    pub fn over_budget(&self) -> bool {
        self.message.attempts > self.max_attempts
    }

    /// The broker acked it: InFlight → Confirmed.
    pub fn ack(&mut self) -> Result<(), TransitionError> {
        self.state = self.state.ack()?;
        Ok(())
    }

    /// The attempt failed: InFlight → Retrying (with a backoff delay) or → Failed.
    pub fn fail(
        &mut self,
        reason: &FailureReason,
        backoff: &BackoffConfig,
    ) -> Result<AfterFailure, TransitionError> {
        let refund = reason.is_collateral();
        let counted = if reason.is_permanent() {
            self.max_attempts // no attempt left can succeed
        } else if refund {
            self.attempts().saturating_sub(1)
        } else {
            self.attempts()
        };
        self.state = self.state.fail(counted, self.max_attempts)?;
        Ok(match self.state {
            Status::Failed => AfterFailure::DeadLetter,
            _ => AfterFailure::Retry {
                delay: backoff::delay(backoff, counted.max(1)).max(reason.retry_floor()),
                refund,
            },
        })
    }

    /// Claimed while already past its budget: InFlight → Retrying → Failed.
    pub fn exhaust(&mut self) -> Result<(), TransitionError> {
        self.state = self.state.fail(0, 1)?; // to Retrying: the lease-expired attempt failed
        self.state = self.state.exhaust()?;
        Ok(())
    }

    /// Given back unpublished: InFlight → Pending.
    pub fn release(&mut self) -> Result<(), TransitionError> {
        self.state = self.state.release()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status::*;

    #[test]
    fn legal_transitions() {
        assert_eq!(Pending.publish(), Ok(InFlight));
        assert_eq!(Retrying.publish(), Ok(InFlight));
        assert_eq!(InFlight.ack(), Ok(Confirmed));
        assert_eq!(InFlight.fail(1, 3), Ok(Retrying));
        assert_eq!(InFlight.fail(3, 3), Ok(Failed));
        assert_eq!(Retrying.exhaust(), Ok(Failed));
        assert_eq!(InFlight.release(), Ok(Pending));
        assert_eq!(Failed.requeue(), Ok(Pending));
    }

    #[test]
    fn illegal_transitions_are_errors() {
        for s in [InFlight, Confirmed, Failed] {
            assert_eq!(
                s.publish(),
                Err(TransitionError {
                    from: s,
                    event: "publish"
                })
            );
        }
        for s in [Pending, Confirmed, Retrying, Failed] {
            assert!(s.ack().is_err(), "{s} ack");
            assert!(s.fail(1, 3).is_err(), "{s} fail");
            assert!(s.release().is_err(), "{s} release");
        }
        for s in [Pending, InFlight, Confirmed, Failed] {
            assert!(s.exhaust().is_err(), "{s} exhaust");
        }
        for s in [Pending, InFlight, Confirmed, Retrying] {
            assert!(s.requeue().is_err(), "{s} requeue");
        }
        // The example from the issue: a confirmed message can never go back to retrying.
        assert!(Confirmed.fail(1, 3).is_err());
        assert!(Confirmed.exhaust().is_err());
    }

    #[test]
    fn terminal_states_have_no_way_out_but_requeue() {
        for s in ALL_STATUSES {
            let moves = [
                s.publish().is_ok(),
                s.ack().is_ok(),
                s.fail(1, 2).is_ok(),
                s.exhaust().is_ok(),
                s.release().is_ok(),
            ];
            if s.is_terminal() {
                assert!(moves.iter().all(|m| !m), "{s} must be terminal");
            } else {
                assert!(moves.iter().any(|m| *m), "{s} must have a way forward");
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for s in ALL_STATUSES {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        }
        assert!("done".parse::<Status>().is_err());
    }

    fn delivery(attempts: u32, max: Option<u32>) -> Delivery {
        let mut m = OutboxMessage::new("ex", "rk", b"x".to_vec());
        m.attempts = attempts;
        m.max_attempts = max;
        Delivery::claimed(m, 3)
    }

    #[test]
    fn delivery_retries_then_dead_letters() {
        let b = BackoffConfig::default();
        let mut d = delivery(1, None);
        assert!(matches!(
            d.fail(&FailureReason::Nacked, &b),
            Ok(AfterFailure::Retry { refund: false, .. })
        ));
        assert_eq!(d.state(), Retrying);
        assert!(d.ack().is_err(), "no ack from Retrying");

        let mut d = delivery(3, None);
        assert_eq!(
            d.fail(&FailureReason::Nacked, &b),
            Ok(AfterFailure::DeadLetter)
        );
        assert_eq!(d.state(), Failed);
    }

    #[test]
    fn row_max_attempts_wins() {
        let b = BackoffConfig::default();
        let mut d = delivery(1, Some(1));
        assert_eq!(
            d.fail(&FailureReason::Nacked, &b),
            Ok(AfterFailure::DeadLetter)
        );
        let mut d = delivery(3, Some(5));
        assert!(matches!(
            d.fail(&FailureReason::Nacked, &b),
            Ok(AfterFailure::Retry { .. })
        ));
    }

    #[test]
    fn collateral_failures_are_refunded() {
        let b = BackoffConfig::default();
        let mut d = delivery(3, None);
        let r = d.fail(&FailureReason::ChannelLost("404".into()), &b);
        assert!(
            matches!(r, Ok(AfterFailure::Retry { refund: true, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn a_refusal_is_charged() {
        let b = BackoffConfig::default();
        let refused = FailureReason::Refused {
            code: 403,
            text: "ACCESS_REFUSED - cannot publish to internal exchange 'x' in vhost '/'".into(),
        };
        assert!(!refused.is_collateral());
        assert!(refused.to_string().contains("internal exchange 'x'"));
        let mut d = delivery(3, None);
        assert_eq!(d.fail(&refused, &b), Ok(AfterFailure::DeadLetter));
    }

    #[test]
    fn a_refused_exchange_is_retried_after_the_refusal_is_forgotten() {
        let b = BackoffConfig::default();
        let refused = FailureReason::Refused {
            code: 403,
            text: "ACCESS_REFUSED - write access to exchange 'x' in vhost '/' refused for user 'u'"
                .into(),
        };
        let mut d = delivery(1, None);
        match d.fail(&refused, &b) {
            Ok(AfterFailure::Retry { delay, refund }) => {
                assert!(!refund);
                assert!(delay >= RETRY_AFTER_REFUSAL, "{delay:?}");
            }
            other => panic!("{other:?}"),
        }
        // A 403 that names no exchange is not remembered: the backoff alone.
        let other = FailureReason::Refused {
            code: 403,
            text: "ACCESS_REFUSED - user_id property set to 'a' but authenticated user was 'b'"
                .into(),
        };
        assert_eq!(other.retry_floor(), Duration::ZERO);
        let mut d = delivery(1, None);
        match d.fail(&other, &b) {
            Ok(AfterFailure::Retry { delay, .. }) => assert!(delay <= b.initial * 2, "{delay:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn over_budget_claims_are_exhausted() {
        let mut d = delivery(4, None);
        assert!(d.over_budget());
        d.exhaust().unwrap();
        assert_eq!(d.state(), Failed);
        assert!(d.exhaust().is_err());
    }

    #[test]
    fn ack_is_once() {
        let mut d = delivery(1, None);
        d.ack().unwrap();
        assert_eq!(d.state(), Confirmed);
        assert!(d.ack().is_err());
        assert!(d
            .fail(&FailureReason::Nacked, &BackoffConfig::default())
            .is_err());
    }
}
