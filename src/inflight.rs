//! The in-flight table: the ConfirmTracker's state, as a plain data structure.
//!
//! Kept apart from the actor so the rules are unit-tested and benchmarked without a
//! broker: a confirm settles a message only if it belongs to the message's current publish
//! (`token`); a return is recorded under the returned message's own id and turns that
//! message's ack into a failure whenever the two arrive; deadlines expire messages whose
//! confirm never came.
//!
//! **A channel the broker closed** fails every pending confirm of that channel with the same
//! close. Only the message that caused it is charged ([`FailureReason::Refused`]); the others
//! are refunded ([`FailureReason::ChannelLost`]). The culprit is every message to the
//! exchange the close text names, or of the body size it names (the broker's own
//! `max_message_size`); when the text names neither, it is the channel's first unconfirmed
//! publish (lowest token) — the broker stops at the publish it refuses, so that is the
//! earliest message that can be to blame. That last rule is a guess: a message before the
//! culprit whose confirm was still on its way is charged instead.

use std::{
    collections::{HashMap, VecDeque},
    time::Instant,
};

use uuid::Uuid;

use crate::{
    broker::ChannelClose,
    state::{Delivery, FailureReason},
};

/// How the broker answered one publish (the returned message, if any, is reported
/// separately through [`InFlightTable::note_return`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `basic.ack`.
    Ack,
    /// `basic.nack`.
    Nack,
    /// The channel or connection failed before an answer.
    Lost(String),
    /// The broker closed the channel (a soft error) before an answer.
    Closed(ChannelClose),
}

/// The decision for one settled message (still to be applied through the state machine).
#[derive(Debug)]
pub enum Settled {
    /// Acked and not returned.
    Ack(Delivery),
    /// A failed attempt, with its reason.
    Failed(Delivery, FailureReason),
}

/// What a return told the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnNote {
    /// Recorded against a message still in flight.
    Recorded,
    /// The message is no longer in flight (already settled or timed out).
    Late,
}

struct Entry {
    delivery: Delivery,
    token: u64,
    channel: u64,
    deadline: Instant,
}

/// Closed channels remembered with their first unconfirmed token (a close is answered on
/// every pending confirm at once, so only the last few channels matter).
const CLOSED_CHANNELS_KEPT: usize = 16;

/// See the module documentation.
#[derive(Default)]
pub struct InFlightTable {
    entries: HashMap<Uuid, Entry>,
    returned: HashMap<Uuid, FailureReason>,
    /// `(channel, lowest token unconfirmed when its close was first seen)`.
    closed: VecDeque<(u64, u64)>,
}

impl InFlightTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages tracked and not yet settled.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No message in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tracks a publish of `delivery` identified by `token`, due by `deadline`.
    pub fn insert(&mut self, delivery: Delivery, token: u64, deadline: Instant) {
        self.insert_on(delivery, token, 0, deadline);
    }

    /// [`InFlightTable::insert`] for a publish on publishing channel number `channel` (the
    /// publisher numbers each channel it opens).
    pub fn insert_on(&mut self, delivery: Delivery, token: u64, channel: u64, deadline: Instant) {
        let id = delivery.message.id;
        let entry = Entry {
            delivery,
            token,
            channel,
            deadline,
        };
        if let Some(replaced) = self.entries.insert(id, entry) {
            // The same row published again: the new publish holds it now, and its one
            // credit comes back with the new publish's outcome.
            replaced.delivery.into_credit().forfeit();
        }
    }

    /// The first unconfirmed publish of `channel` when its close was first seen.
    fn first_unconfirmed(&mut self, channel: u64) -> Option<u64> {
        if let Some((_, token)) = self.closed.iter().find(|(c, _)| *c == channel) {
            return Some(*token);
        }
        let first = self
            .entries
            .values()
            .filter(|e| e.channel == channel)
            .map(|e| e.token)
            .min()?;
        if self.closed.len() == CLOSED_CHANNELS_KEPT {
            self.closed.pop_front();
        }
        self.closed.push_back((channel, first));
        Some(first)
    }

    /// Charged or refunded: see the module documentation.
    fn blame(&mut self, id: Uuid, close: ChannelClose) -> FailureReason {
        let Some(entry) = self.entries.get(&id) else {
            return FailureReason::ChannelLost(close.text);
        };
        let (token, channel) = (entry.token, entry.channel);
        let culprit = match (close.exchange(), close.message_size()) {
            (Some(named), _) => entry.delivery.message.exchange == named,
            (None, Some(size)) => entry.delivery.message.payload.len() == size,
            (None, None) => self.first_unconfirmed(channel) == Some(token),
        };
        if culprit && close.max_size().is_some() {
            // Over the broker's own max_message_size: every attempt would be refused the
            // same way (and close the channel under its neighbours again).
            FailureReason::Unpublishable(format!(
                "{} {} (the broker's max_message_size: raise it there, or set \
                 publisher.max_payload_bytes below it)",
                close.code, close.text
            ))
        } else if culprit {
            FailureReason::Refused {
                code: close.code,
                text: close.text,
            }
        } else {
            FailureReason::ChannelLost(format!(
                "channel closed for another message: {} {}",
                close.code, close.text
            ))
        }
    }

    /// Records that message `id` was returned, whichever confirm carried the return.
    pub fn note_return(&mut self, id: Uuid, reason: FailureReason) -> ReturnNote {
        if self.entries.contains_key(&id) {
            self.returned.insert(id, reason);
            ReturnNote::Recorded
        } else {
            ReturnNote::Late
        }
    }

    /// Settles publish `token` of message `id`, with its deadline. `None` when that publish
    /// is no longer the current one (the message timed out, or was re-published since).
    pub fn settle(&mut self, id: Uuid, token: u64, answer: Answer) -> Option<(Settled, Instant)> {
        if self.entries.get(&id)?.token != token {
            return None;
        }
        let blamed = match &answer {
            Answer::Closed(close) => Some(self.blame(id, close.clone())),
            _ => None,
        };
        let entry = self.entries.remove(&id)?;
        let returned = self.returned.remove(&id);
        let settled = match (answer, returned) {
            (Answer::Ack, None) => Settled::Ack(entry.delivery),
            (Answer::Ack | Answer::Nack, Some(reason)) => Settled::Failed(entry.delivery, reason),
            (Answer::Nack, None) => Settled::Failed(entry.delivery, FailureReason::Nacked),
            (Answer::Lost(why), _) => {
                Settled::Failed(entry.delivery, FailureReason::ChannelLost(why))
            }
            (Answer::Closed(close), _) => Settled::Failed(
                entry.delivery,
                blamed.unwrap_or(FailureReason::ChannelLost(close.text)),
            ),
        };
        Some((settled, entry.deadline))
    }

    /// Removes every message whose deadline has passed; each with its deadline.
    pub fn expire(&mut self, now: Instant) -> Vec<(Delivery, Instant)> {
        let overdue: Vec<Uuid> = self
            .entries
            .iter()
            .filter(|(_, e)| e.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        overdue
            .into_iter()
            .filter_map(|id| {
                self.returned.remove(&id);
                self.entries.remove(&id).map(|e| (e.delivery, e.deadline))
            })
            .collect()
    }

    /// Moves every deadline `by` later: the time the broker blocked the connection, during
    /// which no confirm could come.
    pub fn postpone(&mut self, by: std::time::Duration) {
        for e in self.entries.values_mut() {
            e.deadline += by;
        }
    }

    /// Removes everything (the connection is gone).
    pub fn drain(&mut self) -> Vec<Delivery> {
        self.returned.clear();
        self.entries.drain().map(|(_, e)| e.delivery).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::OutboxMessage;

    fn delivery() -> Delivery {
        let mut m = OutboxMessage::new("x", "k", b"p".to_vec());
        m.attempts = 1;
        Delivery::claimed(m, 3)
    }

    fn returned() -> FailureReason {
        FailureReason::Returned {
            code: 312,
            text: "NO_ROUTE".into(),
        }
    }

    #[test]
    fn ack_settles_once() {
        let mut t = InFlightTable::new();
        let d = delivery();
        let id = d.message.id;
        t.insert(d, 1, Instant::now() + Duration::from_secs(5));
        assert!(matches!(
            t.settle(id, 1, Answer::Ack),
            Some((Settled::Ack(_), _))
        ));
        assert!(t.settle(id, 1, Answer::Ack).is_none());
        assert!(t.is_empty());
    }

    #[test]
    fn a_return_before_the_ack_makes_the_ack_a_failure() {
        let mut t = InFlightTable::new();
        let d = delivery();
        let id = d.message.id;
        t.insert(d, 1, Instant::now() + Duration::from_secs(5));
        assert_eq!(t.note_return(id, returned()), ReturnNote::Recorded);
        match t.settle(id, 1, Answer::Ack) {
            Some((Settled::Failed(_, FailureReason::Returned { code: 312, .. }), _)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_return_after_settlement_is_late() {
        let mut t = InFlightTable::new();
        let d = delivery();
        let id = d.message.id;
        t.insert(d, 1, Instant::now() + Duration::from_secs(5));
        t.settle(id, 1, Answer::Ack);
        assert_eq!(t.note_return(id, returned()), ReturnNote::Late);
    }

    #[test]
    fn stale_tokens_are_ignored() {
        let mut t = InFlightTable::new();
        let d = delivery();
        let id = d.message.id;
        t.insert(
            Delivery::claimed((*d.message).clone(), 3),
            1,
            Instant::now(),
        );
        t.insert(d, 2, Instant::now() + Duration::from_secs(5));
        assert!(t.settle(id, 1, Answer::Ack).is_none());
        assert!(t.settle(id, 2, Answer::Nack).is_some());
    }

    fn to(exchange: &str) -> Delivery {
        let mut m = OutboxMessage::new(exchange, "k", b"p".to_vec());
        m.attempts = 1;
        Delivery::claimed(m, 3)
    }

    fn charged(s: Option<(Settled, Instant)>) -> bool {
        match s {
            Some((Settled::Failed(_, reason), _)) => !reason.is_collateral(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_close_naming_an_exchange_charges_only_its_messages() {
        let mut t = InFlightTable::new();
        let later = Instant::now() + Duration::from_secs(5);
        let close = ChannelClose {
            code: 403,
            text: "ACCESS_REFUSED - cannot publish to internal exchange 'bad' in vhost '/'".into(),
        };
        let (good, bad, good2) = (to("good"), to("bad"), to("good"));
        let ids = [good.message.id, bad.message.id, good2.message.id];
        t.insert_on(good, 1, 7, later);
        t.insert_on(bad, 2, 7, later);
        t.insert_on(good2, 3, 7, later);
        assert!(!charged(t.settle(ids[0], 1, Answer::Closed(close.clone()))));
        match t.settle(ids[1], 2, Answer::Closed(close.clone())) {
            Some((Settled::Failed(_, FailureReason::Refused { code: 403, text }), _)) => {
                assert!(text.contains("'bad'"))
            }
            other => panic!("{other:?}"),
        }
        assert!(!charged(t.settle(ids[2], 3, Answer::Closed(close))));
    }

    #[test]
    fn a_close_naming_a_message_size_charges_messages_of_that_size() {
        let mut t = InFlightTable::new();
        let later = Instant::now() + Duration::from_secs(5);
        let close = ChannelClose {
            code: 406,
            text: "PRECONDITION_FAILED - message size 5 is larger than configured max size 4"
                .into(),
        };
        let small = to("x");
        let mut big = to("x");
        big.message.payload = b"12345".to_vec();
        let (s_id, b_id) = (small.message.id, big.message.id);
        t.insert_on(small, 1, 1, later);
        t.insert_on(big, 2, 1, later);
        assert!(!charged(t.settle(s_id, 1, Answer::Closed(close.clone()))));
        // Over the broker's own limit, no attempt can succeed: dead-lettered at once.
        match t.settle(b_id, 2, Answer::Closed(close)) {
            Some((Settled::Failed(_, FailureReason::Unpublishable(why)), _)) => {
                assert!(why.contains("max_message_size"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn postponed_deadlines_expire_that_much_later() {
        let mut t = InFlightTable::new();
        let now = Instant::now();
        let d = to("x");
        let id = d.message.id;
        t.insert_on(d, 1, 1, now + Duration::from_secs(1));
        t.postpone(Duration::from_secs(10));
        assert!(t.expire(now + Duration::from_secs(5)).is_empty());
        let expired = t.expire(now + Duration::from_secs(12));
        assert_eq!(
            expired
                .iter()
                .map(|(d, _)| d.message.id)
                .collect::<Vec<_>>(),
            [id]
        );
    }

    #[test]
    fn a_close_naming_no_exchange_charges_the_first_unconfirmed_publish() {
        let mut t = InFlightTable::new();
        let later = Instant::now() + Duration::from_secs(5);
        let close = ChannelClose {
            code: 406,
            text: "PRECONDITION_FAILED - something".into(),
        };
        let ds: Vec<Delivery> = (0..4).map(|_| to("x")).collect();
        let ids: Vec<Uuid> = ds.iter().map(|d| d.message.id).collect();
        for (i, d) in ds.into_iter().enumerate() {
            // Two channels: tokens 10, 11 on channel 1 (already closed and replaced), 12, 13 on 2.
            t.insert_on(d, 10 + i as u64, 1 + (i as u64) / 2, later);
        }
        assert!(matches!(
            t.settle(ids[0], 10, Answer::Ack),
            Some((Settled::Ack(_), _))
        ));
        // Settled out of order: the lowest unconfirmed token of the channel is charged,
        // whichever confirm is read first.
        assert!(!charged(t.settle(
            ids[3],
            13,
            Answer::Closed(close.clone())
        )));
        assert!(charged(t.settle(ids[2], 12, Answer::Closed(close.clone()))));
        assert!(charged(t.settle(ids[1], 11, Answer::Closed(close))));
    }

    #[test]
    fn deadlines_expire_and_lost_channels_fail() {
        let mut t = InFlightTable::new();
        let now = Instant::now();
        let (a, b) = (delivery(), delivery());
        let b_id = b.message.id;
        t.insert(a, 1, now);
        t.insert(b, 2, now + Duration::from_secs(60));
        assert_eq!(t.expire(now).len(), 1);
        assert!(matches!(
            t.settle(b_id, 2, Answer::Lost("reset".into())),
            Some((Settled::Failed(_, FailureReason::ChannelLost(_)), _))
        ));
    }
}
