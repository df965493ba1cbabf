//! Credits: the in-flight bound as tokens, so a row's share of it cannot be lost.
//!
//! The Scheduler lends one [`Credit`] per row it claims and keeps the row in its bound
//! (`publisher.max_in_flight` rows, `publisher.max_in_flight_bytes` bytes, the measured
//! window) until the credit comes back. The credit travels inside the row's
//! [`Delivery`](crate::state::Delivery) — Publisher, ConfirmTracker, DeadLetter actor —
//! to whichever write makes the row's outcome durable: the Ledger's outcome flush, the
//! move to `dead_letters`, or a release. That writer gathers the credits of one write into
//! a [`Credits`] batch and repays the batch once the write is done: one message to the
//! Scheduler per write, never one per row.
//!
//! Nothing else can hand credits back ([`Settled`] can only be built here), and nothing can
//! lose one: a credit or a batch dropped on any other path (a state-machine refusal, an
//! actor torn down) repays itself on drop. A credit lost for good would shrink the bound
//! for ever; one returned early at worst stops the row's lease renewal, so the lease lapses
//! and the row is claimed again (at least once, as always). The Scheduler forgets ids it no
//! longer holds, so a credit repaid twice gives nothing.

use std::{collections::HashSet, sync::Arc, time::Duration};

use actix::WeakRecipient;
use uuid::Uuid;

use super::Settled;
use crate::state::Delivery;

/// Where credits go back: the Scheduler. Weak: a credit still in flight when the engine
/// stops must not keep the Scheduler's mailbox open.
type Lender = Arc<WeakRecipient<Settled>>;

/// The Scheduler's side: lends credits that come back to it. Cloning it is one reference
/// count, so every credit can carry its own way home.
#[derive(Clone)]
pub struct CreditLine(Lender);

impl CreditLine {
    /// Credits repaid to `scheduler`.
    pub(super) fn new(scheduler: WeakRecipient<Settled>) -> CreditLine {
        CreditLine(Arc::new(scheduler))
    }

    /// The credit for claimed row `id`; `keyed` when it carries an ordering key (its key's
    /// next message waits for its outcome).
    pub(super) fn lend(&self, id: Uuid, keyed: bool) -> Credit {
        Credit {
            id,
            keyed,
            lender: Some(self.0.clone()),
        }
    }
}

/// One claimed row's share of the in-flight bound; see the module documentation. Not
/// `Clone`: each row holds exactly one.
pub struct Credit {
    id: Uuid,
    keyed: bool,
    /// `None` once repaid, or for a delivery built outside the engine (tests, benches).
    lender: Option<Lender>,
}

impl Credit {
    /// A credit owed to nobody: the one a [`Delivery`] built outside the engine carries.
    pub(crate) fn unbacked(id: Uuid, keyed: bool) -> Credit {
        Credit {
            id,
            keyed,
            lender: None,
        }
    }

    /// Gives up this credit without repaying it: the same row is held through another
    /// credit (a row claimed again while still held), and one repayment frees it.
    pub fn forfeit(mut self) {
        self.lender = None;
    }
}

impl std::fmt::Debug for Credit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credit")
            .field("id", &self.id)
            .field("keyed", &self.keyed)
            .field("backed", &self.lender.is_some())
            .finish()
    }
}

impl Drop for Credit {
    /// A credit dropped without a durable outcome still comes back (see the module doc).
    fn drop(&mut self) {
        let Some(lender) = self.lender.take() else {
            return;
        };
        tracing::debug!(message_id = %self.id, "a credit came back without a durable outcome");
        repay(
            &lender,
            Settled {
                ids: vec![self.id],
                earliest_retry: None,
                keys_freed: false,
            },
        );
    }
}

/// The credits of one durable write, repaid together in one message to the Scheduler.
#[derive(Default)]
pub struct Credits {
    ids: Vec<Uuid>,
    lender: Option<Lender>,
    keys_freed: bool,
    earliest_retry: Option<Duration>,
}

impl Credits {
    /// The credits of rows given back unpublished (shutdown, an overdue heartbeat): due
    /// again at once, so the Scheduler claims again, ordering keys included.
    pub fn released(rows: impl IntoIterator<Item = Delivery>) -> Credits {
        let mut credits = Credits::default();
        for row in rows {
            credits.take(row.into_credit());
        }
        credits.keys_freed = true;
        credits
    }

    /// A row whose outcome ends its turn (confirmed or dead-lettered): a keyed one lets
    /// its key's next message go.
    pub fn settled(&mut self, credit: Credit) {
        self.keys_freed |= credit.keyed;
        self.take(credit);
    }

    /// A row sent back to `retrying`, due after `delay`: its key stays blocked by it, and
    /// the Scheduler wakes when the earliest of them is due instead of at the next sweep.
    pub fn retrying(&mut self, credit: Credit, delay: Duration) {
        self.earliest_retry = Some(self.earliest_retry.map_or(delay, |e| e.min(delay)));
        self.take(credit);
    }

    /// Moves `other`'s credits into this batch (writes merged, or a failed write kept).
    pub fn absorb(&mut self, mut other: Credits) {
        self.ids.append(&mut other.ids);
        self.keys_freed |= std::mem::take(&mut other.keys_freed);
        if let Some(e) = other.earliest_retry.take() {
            self.earliest_retry = Some(self.earliest_retry.map_or(e, |mine| mine.min(e)));
        }
        let lender = other.lender.take();
        if self.lender.is_none() {
            self.lender = lender;
        }
    }

    /// Takes the credits of `ids` out of this batch into a batch of their own (rows whose
    /// write is left for later). Both keep this batch's wake-ups: a spare one costs a claim.
    pub fn split_off(&mut self, ids: &HashSet<Uuid>) -> Credits {
        let (out, keep) = std::mem::take(&mut self.ids)
            .into_iter()
            .partition(|id| ids.contains(id));
        self.ids = keep;
        Credits {
            ids: out,
            lender: self.lender.clone(),
            keys_freed: self.keys_freed,
            earliest_retry: self.earliest_retry,
        }
    }

    /// The rows of this batch.
    pub fn ids(&self) -> &[Uuid] {
        &self.ids
    }

    /// Hands every credit of the batch back to the Scheduler, in one message. Call it once
    /// the batch's write is durable (or given up).
    pub fn repay(mut self) {
        self.repay_now();
    }

    fn take(&mut self, mut credit: Credit) {
        let Some(lender) = credit.lender.take() else {
            return;
        };
        self.ids.push(credit.id);
        self.lender.get_or_insert(lender);
    }

    fn repay_now(&mut self) {
        let Some(lender) = self.lender.take() else {
            return;
        };
        if self.ids.is_empty() {
            return;
        }
        let settled = Settled {
            ids: std::mem::take(&mut self.ids),
            earliest_retry: self.earliest_retry.take(),
            keys_freed: std::mem::take(&mut self.keys_freed),
        };
        repay(&lender, settled);
    }
}

impl std::fmt::Debug for Credits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credits")
            .field("rows", &self.ids.len())
            .field("keys_freed", &self.keys_freed)
            .field("earliest_retry", &self.earliest_retry)
            .finish()
    }
}

impl Drop for Credits {
    /// A batch dropped unrepaid still comes back (see the module doc).
    fn drop(&mut self) {
        self.repay_now();
    }
}

/// Sends `settled` to the Scheduler, unless the engine is gone.
fn repay(lender: &Lender, settled: Settled) {
    if let Some(scheduler) = lender.upgrade() {
        scheduler.do_send(settled);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use actix::prelude::*;

    use super::*;
    use crate::OutboxMessage;

    /// Stands in for the Scheduler: keeps every repayment.
    #[derive(Default)]
    struct Ledger(Arc<Mutex<Vec<Settled>>>);

    impl Actor for Ledger {
        type Context = Context<Self>;
    }

    impl Handler<Settled> for Ledger {
        type Result = ();

        fn handle(&mut self, msg: Settled, _: &mut Context<Self>) {
            self.0.lock().unwrap().push(msg);
        }
    }

    /// Answered after every repayment sent before it.
    #[derive(Message)]
    #[rtype(result = "()")]
    struct Sync;

    impl Handler<Sync> for Ledger {
        type Result = ();

        fn handle(&mut self, _: Sync, _: &mut Context<Self>) {}
    }

    struct Bank {
        line: CreditLine,
        ledger: Addr<Ledger>,
        repaid: Arc<Mutex<Vec<Settled>>>,
    }

    impl Bank {
        fn open() -> Bank {
            let ledger = Ledger::default();
            let repaid = ledger.0.clone();
            let ledger = ledger.start();
            let line = CreditLine::new(ledger.downgrade().recipient());
            Bank {
                line,
                ledger,
                repaid,
            }
        }

        fn row(&self, keyed: bool) -> Delivery {
            let mut m = OutboxMessage::new("ex", "rk", b"p".to_vec());
            if keyed {
                m.ordering_key = Some("k".into());
            }
            let credit = self.line.lend(m.id, keyed);
            Delivery::claimed(m, 3).holding(credit)
        }

        async fn repaid(&self) -> Vec<Settled> {
            self.ledger.send(Sync).await.unwrap();
            std::mem::take(&mut *self.repaid.lock().unwrap())
        }
    }

    #[actix_rt::test]
    async fn one_write_repays_its_rows_in_one_message() {
        let bank = Bank::open();
        let (confirmed, keyed, retried) = (bank.row(false), bank.row(true), bank.row(true));
        let ids = [confirmed.message.id, keyed.message.id, retried.message.id];
        let mut credits = Credits::default();
        credits.settled(confirmed.into_credit());
        credits.settled(keyed.into_credit());
        credits.retrying(retried.into_credit(), Duration::from_secs(3));
        let mut more = Credits::default();
        let later = bank.row(false);
        let later_id = later.message.id;
        more.retrying(later.into_credit(), Duration::from_secs(1));
        credits.absorb(more);
        credits.repay();
        let repaid = bank.repaid().await;
        assert_eq!(repaid.len(), 1, "one message per write");
        assert_eq!(repaid[0].ids, [ids[0], ids[1], ids[2], later_id]);
        assert!(repaid[0].keys_freed, "a confirmed keyed row frees its key");
        assert_eq!(repaid[0].earliest_retry, Some(Duration::from_secs(1)));
    }

    #[actix_rt::test]
    async fn credits_split_off_are_repaid_on_their_own_write() {
        let bank = Bank::open();
        let (written, held) = (bank.row(true), bank.row(false));
        let (written_id, held_id) = (written.message.id, held.message.id);
        let mut credits = Credits::default();
        credits.settled(written.into_credit());
        credits.settled(held.into_credit());
        let later = credits.split_off(&HashSet::from([held_id]));
        assert_eq!(credits.ids(), [written_id]);
        assert_eq!(later.ids(), [held_id]);
        credits.repay();
        assert_eq!(
            bank.repaid().await[0].ids,
            [written_id],
            "only the written row"
        );
        later.repay();
        assert_eq!(
            bank.repaid().await[0].ids,
            [held_id],
            "the held row, on its write"
        );
    }

    #[actix_rt::test]
    async fn a_retried_keyed_row_does_not_free_its_key() {
        let bank = Bank::open();
        let mut credits = Credits::default();
        credits.retrying(bank.row(true).into_credit(), Duration::from_secs(1));
        credits.settled(bank.row(false).into_credit());
        credits.repay();
        assert!(!bank.repaid().await[0].keys_freed);
    }

    #[actix_rt::test]
    async fn released_rows_free_keys_and_come_back_together() {
        let bank = Bank::open();
        let rows = vec![bank.row(false), bank.row(false)];
        let ids: Vec<Uuid> = rows.iter().map(|d| d.message.id).collect();
        let credits = Credits::released(rows);
        assert_eq!(credits.ids(), ids);
        credits.repay();
        let repaid = bank.repaid().await;
        assert_eq!(repaid.len(), 1);
        assert_eq!(repaid[0].ids, ids);
        assert!(repaid[0].keys_freed);
        assert_eq!(repaid[0].earliest_retry, None);
    }

    #[actix_rt::test]
    async fn a_dropped_credit_or_batch_still_comes_back() {
        let bank = Bank::open();
        let lost = bank.row(true);
        let id = lost.message.id;
        drop(lost);
        let repaid = bank.repaid().await;
        assert_eq!(repaid.len(), 1);
        assert_eq!(repaid[0].ids, [id]);
        assert!(
            !repaid[0].keys_freed,
            "the row is still in flight: its key is not free"
        );

        let mut credits = Credits::default();
        let row = bank.row(false);
        let id = row.message.id;
        credits.settled(row.into_credit());
        drop(credits);
        let repaid = bank.repaid().await;
        assert_eq!(repaid.len(), 1);
        assert_eq!(repaid[0].ids, [id]);
    }

    #[actix_rt::test]
    async fn a_credit_comes_back_once() {
        let bank = Bank::open();
        let mut kept = bank.row(false);
        let mut credits = Credits::default();
        credits.settled(kept.take_credit());
        credits.repay();
        drop(kept);
        bank.row(false).into_credit().forfeit();
        drop(Delivery::claimed(OutboxMessage::new("ex", "rk", vec![]), 3));
        Credits::default().repay();
        let repaid = bank.repaid().await;
        assert_eq!(
            repaid.len(),
            1,
            "taken, forfeited, unbacked and empty give nothing"
        );
    }
}
