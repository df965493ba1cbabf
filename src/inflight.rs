//! The in-flight table: the ConfirmTracker's state, as a plain data structure.
//!
//! Kept apart from the actor so the rules are unit-tested and benchmarked without a
//! broker: a confirm settles a message only if it belongs to the message's current publish
//! (`token`); a return is recorded under the returned message's own id and turns that
//! message's ack into a failure whenever the two arrive; deadlines expire messages whose
//! confirm never came.

use std::{collections::HashMap, time::Instant};

use uuid::Uuid;

use crate::state::{Delivery, FailureReason};

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
    deadline: Instant,
}

/// See the module documentation.
#[derive(Default)]
pub struct InFlightTable {
    entries: HashMap<Uuid, Entry>,
    returned: HashMap<Uuid, FailureReason>,
}

impl InFlightTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No message in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tracks a publish of `delivery` identified by `token`, due by `deadline`.
    pub fn insert(&mut self, delivery: Delivery, token: u64, deadline: Instant) {
        let id = delivery.message.id;
        self.entries.insert(
            id,
            Entry {
                delivery,
                token,
                deadline,
            },
        );
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

    /// Settles publish `token` of message `id`. `None` when that publish is no longer the
    /// current one (the message timed out, or was re-published since).
    pub fn settle(&mut self, id: Uuid, token: u64, answer: Answer) -> Option<Settled> {
        if self.entries.get(&id)?.token != token {
            return None;
        }
        let entry = self.entries.remove(&id)?;
        let returned = self.returned.remove(&id);
        Some(match (answer, returned) {
            (Answer::Ack, None) => Settled::Ack(entry.delivery),
            (Answer::Ack | Answer::Nack, Some(reason)) => Settled::Failed(entry.delivery, reason),
            (Answer::Nack, None) => Settled::Failed(entry.delivery, FailureReason::Nacked),
            (Answer::Lost(why), _) => {
                Settled::Failed(entry.delivery, FailureReason::ChannelLost(why))
            }
        })
    }

    /// Removes every message whose deadline has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<Delivery> {
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
                self.entries.remove(&id).map(|e| e.delivery)
            })
            .collect()
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
            Some(Settled::Ack(_))
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
            Some(Settled::Failed(_, FailureReason::Returned { code: 312, .. })) => {}
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
        t.insert(d.clone(), 1, Instant::now());
        t.insert(d, 2, Instant::now() + Duration::from_secs(5));
        assert!(t.settle(id, 1, Answer::Ack).is_none());
        assert!(t.settle(id, 2, Answer::Nack).is_some());
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
            Some(Settled::Failed(_, FailureReason::ChannelLost(_)))
        ));
    }
}
