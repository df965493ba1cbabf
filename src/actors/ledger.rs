//! The Ledger: the engine's account of the rows it holds, kept in the database. It takes
//! rows out (claims), keeps them (lease renewals), and writes down what became of them
//! (confirmed, retrying, dead-lettered, given back). It is named for that bookkeeping, not
//! for the pool it uses: the database layer itself is [`crate::store`], which the CLI, the
//! admin API and the other actors use too.
//!
//! Claims are answered as they come (each on its own pooled connection). Outcomes —
//! `confirmed` ids and `retrying` updates — are write-behind: they accumulate while the
//! flushes in flight (at most two) run and go out together in the next, so under load one
//! statement carries hundreds of rows and an idle engine still writes at once (group commit).
//! Flushes also start at least `WRITE_GAP` apart: a stream of outcomes that each arrive just
//! after the last write ended (one ordering key: one confirm per broker round trip) would
//! otherwise cost a transaction each, a third of a core of PostgreSQL at a thousand a second.
//! A write a key waits on goes without the gap (`WriteNow`: the Scheduler sends it when the
//! last row it holds of a key is acked, since the key's next claim needs that write).
//! A failed flush keeps its rows and is retried with backoff: a database outage delays the
//! bookkeeping, it never drops an ack. A row another transaction holds locked (a
//! producer's `SELECT … FOR UPDATE`, an operator's open `UPDATE`) is waited for a second at
//! most; then the flush writes the rest and the Ledger holds that row's outcome, trying it
//! again every `HELD_RETRY` until the lock is gone, so one locked row never stops the
//! others. Only after a flush commits are events announced and the rows' credits repaid to
//! the Scheduler (see `scheduler::credit`).

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use actix::prelude::*;
use uuid::Uuid;

use super::scheduler::Credits;
use crate::{
    events::Signals,
    store::{
        ClaimLimits, Claimed, DeadLetterUpdate, KeyScan, Locked, RetryUpdate, Store, StoreError,
    },
};

/// Claim rows for this engine within `limits`: expired leases, then unkeyed due rows.
#[derive(Message)]
#[rtype(result = "Result<Claimed, StoreError>")]
pub struct Claim {
    /// Most rows and bytes to claim.
    pub limits: ClaimLimits,
}

/// Claim keyed rows within `limits`: the due heads of keys with nothing in flight.
#[derive(Message)]
#[rtype(result = "Result<Claimed, StoreError>")]
pub struct ClaimKeyed {
    /// Most heads and bytes to claim.
    pub limits: ClaimLimits,
    /// Where the walk over ordering keys resumes, and the dead-letter rule.
    pub keys: KeyScan,
    /// Probe only these keys (`claim_keys`) instead of walking every key.
    pub listed: Option<Vec<String>>,
}

/// Extend the leases of these rows: the ones the engine really holds (the Scheduler's
/// list). A row claimed but never handed on is not among them, so its lease lapses and any
/// engine takes it again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RenewLeases(pub Vec<Uuid>);

/// Settled outcomes to write (batched with others).
#[derive(Message, Default, Debug)]
#[rtype(result = "()")]
pub struct Record {
    /// Acked and not returned.
    pub confirmed: Vec<Uuid>,
    /// Failed attempts with attempts left.
    pub retry: Vec<RetryUpdate>,
    /// The credits of all of them, repaid once they are written.
    pub credits: Credits,
}

impl Record {
    fn is_empty(&self) -> bool {
        self.confirmed.is_empty() && self.retry.is_empty()
    }

    /// The first row's id, to name in a log line.
    fn first(&self) -> Option<Uuid> {
        let retried = self.retry.first().map(|u| u.id);
        self.confirmed.first().copied().or(retried)
    }

    fn rows(&self) -> usize {
        self.confirmed.len() + self.retry.len()
    }

    /// Moves `other`'s outcomes into this record, ahead of its own (`other` is older).
    fn absorb(&mut self, other: Record) {
        self.confirmed.splice(0..0, other.confirmed);
        self.retry.splice(0..0, other.retry);
        self.credits.absorb(other.credits);
    }

    /// Takes the outcomes of rows `held` (left unwritten) out of this record.
    fn split_off(&mut self, held: &[Uuid]) -> Record {
        if held.is_empty() {
            return Record::default();
        }
        let held: HashSet<Uuid> = held.iter().copied().collect();
        let (confirmed, keep) = std::mem::take(&mut self.confirmed)
            .into_iter()
            .partition(|id| held.contains(id));
        self.confirmed = keep;
        let (retry, keep) = std::mem::take(&mut self.retry)
            .into_iter()
            .partition(|u| held.contains(&u.id));
        self.retry = keep;
        Record {
            confirmed,
            retry,
            credits: self.credits.split_off(&held),
        }
    }
}

/// A key waits on the outcomes recorded so far (its last held row was acked): write them
/// without waiting for the rest of the gap between flushes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WriteNow;

/// Move failed rows to `dead_letters` (answered with the ids moved).
#[derive(Message)]
#[rtype(result = "Result<Vec<Uuid>, StoreError>")]
pub struct MoveToDeadLetters(pub Vec<DeadLetterUpdate>);

/// How long until the earliest future row is due.
#[derive(Message)]
#[rtype(result = "Result<Option<Duration>, StoreError>")]
pub struct NextDue;

/// Give back rows claimed but never published (shutdown): due again at once, and their
/// credits return to the Scheduler.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release(pub Credits);

/// Give back every row this engine still holds (end of a shutdown that timed out), so the
/// next engine starts on them at once instead of waiting for the lease to expire.
#[derive(Message)]
#[rtype(result = "Result<usize, StoreError>")]
pub struct ReleaseAll;

/// Resolves once every recorded outcome is written. While the database is down this waits;
/// callers bound the wait.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flushed;

/// See the module documentation.
pub struct Ledger {
    store: Store,
    engine_id: String,
    lease: Duration,
    signals: Signals,
    pending: Record,
    /// Flushes running now (at most `FLUSHES`).
    flushing: usize,
    failures: u32,
    flush_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// When the last flush started, and whether one is set to start when the gap is over.
    last_flush: Option<Instant>,
    flush_set: bool,
    /// The next flush starts without waiting for the gap (see `WriteNow`).
    urgent: bool,
    /// Outcomes of rows another transaction held locked, whether their next try is set, and
    /// whether that was said (once, until they are all written).
    held: Record,
    held_set: bool,
    held_told: bool,
}

impl Ledger {
    /// A Ledger for `engine_id`.
    pub fn new(store: Store, engine_id: String, lease: Duration, signals: Signals) -> Self {
        Ledger {
            store,
            engine_id,
            lease,
            signals,
            pending: Record::default(),
            flushing: 0,
            failures: 0,
            flush_waiters: Vec::new(),
            last_flush: None,
            flush_set: false,
            urgent: false,
            held: Record::default(),
            held_set: false,
            held_told: false,
        }
    }

    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing >= FLUSHES {
            return;
        }
        if self.pending.is_empty() {
            if self.flushing == 0 {
                for waiter in self.flush_waiters.drain(..) {
                    let _ = waiter.send(());
                }
            }
            return;
        }
        let now = Instant::now();
        let gap = gap_left(self.last_flush, now).filter(|_| !self.urgent);
        if let Some(wait) = gap {
            if !self.flush_set {
                self.flush_set = true;
                ctx.run_later(wait, |act, ctx| {
                    act.flush_set = false;
                    act.flush(ctx);
                });
            }
            return;
        }
        self.last_flush = Some(now);
        self.urgent = false;
        self.flushing += 1;
        let batch = std::mem::take(&mut self.pending);
        ctx.spawn(
            self.write(batch, Locked::WaitBriefly).map(
                |(mut batch, result), act, ctx| match result {
                    Ok(held) => {
                        act.failures = 0;
                        act.flushing -= 1;
                        act.hold(batch.split_off(&held), ctx);
                        act.announce(batch);
                        act.flush(ctx);
                    }
                    Err(e) => {
                        act.failures += 1;
                        let delay = crate::backoff::STORE_WRITE.delay(act.failures);
                        tracing::warn!(
                            error = %e,
                            rows = batch.confirmed.len() + batch.retry.len(),
                            retry_in = ?delay,
                            "could not record outcomes; keeping them and retrying"
                        );
                        act.pending.absorb(batch);
                        ctx.run_later(delay, |act, ctx| {
                            act.flushing -= 1;
                            act.flush(ctx);
                        });
                    }
                },
            ),
        );
    }

    /// Writes `batch`'s outcomes (see [`write_outcomes`]); the future hands the batch back
    /// with the result.
    fn write(
        &self,
        batch: Record,
        locked: Locked,
    ) -> impl ActorFuture<Self, Output = (Record, Result<Vec<Uuid>, StoreError>)> {
        let store = self.store.clone();
        let engine = self.engine_id.clone();
        async move {
            let result = write_outcomes(&store, &engine, &batch, locked).await;
            (batch, result)
        }
        .into_actor(self)
    }

    /// Keeps `held`, outcomes of rows another transaction holds locked, and sets their
    /// next try.
    fn hold(&mut self, held: Record, ctx: &mut Context<Self>) {
        if held.is_empty() {
            return;
        }
        if !self.held_told {
            self.held_told = true;
            tracing::warn!(
                rows = held.rows(),
                message_id = %held.first().unwrap_or_default(),
                "rows locked by another transaction (a producer's or an operator's, left open?); \
                 their outcomes wait for the lock, the other rows go on"
            );
        }
        self.held.absorb(held);
        if !self.held_set {
            self.held_set = true;
            ctx.run_later(HELD_RETRY, |act, ctx| {
                act.held_set = false;
                act.write_held(ctx);
            });
        }
    }

    /// Tries the held outcomes again, without waiting for any lock.
    fn write_held(&mut self, ctx: &mut Context<Self>) {
        let batch = std::mem::take(&mut self.held);
        if batch.is_empty() {
            return;
        }
        ctx.spawn(
            self.write(batch, Locked::Skip)
                .map(|(mut batch, result), act, ctx| match result {
                    Ok(held) => {
                        let still = batch.split_off(&held);
                        if still.is_empty() && act.held.is_empty() {
                            act.held_told = false;
                            tracing::info!(
                                rows = batch.rows(),
                                "outcomes of rows that were locked by another transaction written"
                            );
                        }
                        act.announce(batch);
                        act.hold(still, ctx);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, rows = batch.rows(), "could not record outcomes of rows locked by another transaction; retrying");
                        act.hold(batch, ctx);
                    }
                }),
        );
    }

    fn announce(&self, batch: Record) {
        let retried = batch.retry.into_iter().map(|u| (u.id, u.error)).collect();
        self.signals.recorded(batch.confirmed, retried);
        batch.credits.repay();
    }
}

/// Writes `batch`'s outcomes; returns the rows left unwritten because another transaction
/// holds them locked (see [`Locked`]).
async fn write_outcomes(
    store: &Store,
    engine: &str,
    batch: &Record,
    locked: Locked,
) -> Result<Vec<Uuid>, StoreError> {
    // Two idempotent statements: replaying both after a partial failure is harmless.
    let mut held = store.record_confirmed(&batch.confirmed, locked).await?;
    held.extend(store.record_retrying(engine, &batch.retry, locked).await?);
    Ok(held)
}

/// How often the outcomes of rows another transaction held locked are tried again.
const HELD_RETRY: Duration = Duration::from_secs(1);

/// Outcome flushes in flight at once: a second one takes the acks that arrive while the
/// first is being written, so an ack waits for at most one write before its own (each row
/// acked and not yet written is a duplicate if the engine dies). The two never touch the
/// same row: a row's next outcome needs a new claim, which needs this one written.
const FLUSHES: usize = 2;

/// The least time between the starts of two flushes (see the module documentation). An
/// outcome after a pause this long, as on an idle engine, is written at once; rows acked and
/// not yet written (duplicates if the engine dies) grow by at most this much of the stream.
/// Measured on one key: 1 ms gave +6 %, 2 ms +11–14 % msg/s, idle latency unchanged.
const WRITE_GAP: Duration = Duration::from_millis(2);

/// How long after `now` the next flush may start, the last having started at `last`
/// (`None`: at once).
fn gap_left(last: Option<Instant>, now: Instant) -> Option<Duration> {
    let since = now.saturating_duration_since(last?);
    WRITE_GAP.checked_sub(since).filter(|left| !left.is_zero())
}

impl Actor for Ledger {
    type Context = Context<Self>;
}

impl Handler<Claim> for Ledger {
    type Result = ResponseFuture<Result<Claimed, StoreError>>;

    fn handle(&mut self, msg: Claim, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let engine = self.engine_id.clone();
        let lease = self.lease;
        let signals = self.signals.clone();
        Box::pin(async move {
            let claimed = store.claim_due(&engine, msg.limits, lease).await?;
            announce_dead_lettered(&signals, &claimed);
            Ok(claimed)
        })
    }
}

impl Handler<ClaimKeyed> for Ledger {
    type Result = ResponseFuture<Result<Claimed, StoreError>>;

    fn handle(&mut self, msg: ClaimKeyed, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let engine = self.engine_id.clone();
        let lease = self.lease;
        let signals = self.signals.clone();
        Box::pin(async move {
            let started = std::time::Instant::now();
            let claimed = match &msg.listed {
                None => {
                    store
                        .claim_keyed_within(&engine, msg.limits, lease, &msg.keys)
                        .await?
                }
                Some(keys) => {
                    store
                        .claim_keys_within(&engine, msg.limits, lease, &msg.keys, keys)
                        .await?
                }
            };
            // How keyed claims find their heads, and what each costs (debug: one line per
            // claim, so walks and listed probes can be told apart and timed).
            tracing::debug!(
                walk = msg.listed.is_none(),
                heads = msg.keys.heads,
                rows = claimed.messages.len(),
                candidates = claimed.candidates,
                micros = started.elapsed().as_micros() as u64,
                "keyed claim"
            );
            announce_dead_lettered(&signals, &claimed);
            Ok(claimed)
        })
    }
}

/// Rows a claim found unpublishable are in `dead_letters` already: say so.
fn announce_dead_lettered(signals: &Signals, claimed: &Claimed) {
    if claimed.dead_lettered.is_empty() {
        return;
    }
    for (id, reason) in &claimed.dead_lettered {
        tracing::warn!(message_id = %id, %reason, "dead-lettered at claim: the row can never be published");
    }
    signals.dead_lettered_at_claim(&claimed.dead_lettered);
}

impl Handler<RenewLeases> for Ledger {
    type Result = ();

    fn handle(&mut self, msg: RenewLeases, ctx: &mut Context<Self>) {
        // A slow but alive engine keeps its rows: every row it holds, wherever it is in the
        // pipeline, gets its lease extended well before it could expire. Rescue is for
        // engines that stopped renewing (crashed, partitioned), never for slow ones.
        let store = self.store.clone();
        let engine = self.engine_id.clone();
        let lease = self.lease;
        ctx.spawn(
            async move {
                if let Err(e) = store.renew_leases(&engine, &msg.0, lease).await {
                    tracing::warn!(error = %e, "lease renewal failed; retrying next period");
                }
            }
            .into_actor(self),
        );
    }
}

impl Handler<Record> for Ledger {
    type Result = ();

    fn handle(&mut self, msg: Record, ctx: &mut Context<Self>) {
        self.pending.confirmed.extend(msg.confirmed);
        self.pending.retry.extend(msg.retry);
        self.pending.credits.absorb(msg.credits);
        self.flush(ctx);
    }
}

impl Handler<WriteNow> for Ledger {
    type Result = ();

    fn handle(&mut self, _: WriteNow, ctx: &mut Context<Self>) {
        // Nothing pending: the ack is in a flush already running.
        if !self.pending.confirmed.is_empty() {
            self.urgent = true;
            self.flush(ctx);
        }
    }
}

impl Handler<MoveToDeadLetters> for Ledger {
    type Result = ResponseFuture<Result<Vec<Uuid>, StoreError>>;

    fn handle(&mut self, msg: MoveToDeadLetters, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let engine = self.engine_id.clone();
        Box::pin(async move { store.move_to_dead_letters(&engine, &msg.0).await })
    }
}

impl Handler<Release> for Ledger {
    type Result = ();

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let engine = self.engine_id.clone();
        let lease = self.lease;
        let credits = msg.0;
        let ids = credits.ids().to_vec();
        let n = ids.len();
        // Tried again on a failure (`backoff::STORE_WRITE`) for as long as the rows' lease
        // would keep them: it is fenced and idempotent. One failure is a deadlock with this
        // engine's own writes about the same rows (after a pause, when everything happens at
        // once), which PostgreSQL resolves by failing one of them. The other is the
        // database being gone: an engine whose beat is overdue gives its queue back, and
        // a release given up while the database was still down left those rows to wait a
        // whole lease once it was back (an outside audit: 152 rows, 60 s after an 8 s
        // crash, charged an attempt more).
        let release = async move {
            let began = Instant::now();
            let mut failures = 0;
            loop {
                match store.release(&engine, &ids).await {
                    Err(e) if began.elapsed() < lease => {
                        failures += 1;
                        tracing::debug!(error = %e, failures, "giving back unpublished rows failed; trying again");
                        tokio::time::sleep(crate::backoff::STORE_WRITE.delay(failures)).await;
                    }
                    done => break done,
                }
            }
        };
        ctx.spawn(release.into_actor(self).map(move |result, _, _| {
            match result {
                // DEBUG: each key's run and each publish batch given back is a release of
                // its own, and a paused engine or a lost broker gives back dozens within
                // milliseconds (an audit: 50 INFO lines in 60 ms); the event that caused
                // them is logged where it happens.
                Ok(released) => tracing::debug!(released, rows = n, "gave back unpublished rows"),
                Err(e) => tracing::warn!(error = %e, rows = n, "could not give back unpublished rows; their leases will expire"),
            }
            credits.repay();
        }));
    }
}

impl Handler<NextDue> for Ledger {
    type Result = ResponseFuture<Result<Option<Duration>, StoreError>>;

    fn handle(&mut self, _: NextDue, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        Box::pin(async move { store.next_due().await })
    }
}

impl Handler<ReleaseAll> for Ledger {
    type Result = ResponseFuture<Result<usize, StoreError>>;

    fn handle(&mut self, _: ReleaseAll, _: &mut Context<Self>) -> Self::Result {
        let store = self.store.clone();
        let engine = self.engine_id.clone();
        Box::pin(async move { store.release_all(&engine).await })
    }
}

impl Handler<Flushed> for Ledger {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Flushed, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.flush_waiters.push(tx);
        self.flush(ctx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_waits_only_for_the_rest_of_the_gap() {
        let t0 = Instant::now();
        assert_eq!(gap_left(None, t0), None, "the first flush goes at once");
        let soon = t0 + Duration::from_micros(500);
        assert_eq!(
            gap_left(Some(t0), soon),
            Some(WRITE_GAP - Duration::from_micros(500))
        );
        assert_eq!(gap_left(Some(t0), t0 + WRITE_GAP), None);
        let after_a_pause = t0 + Duration::from_secs(1);
        assert_eq!(
            gap_left(Some(t0), after_a_pause),
            None,
            "an idle engine writes at once"
        );
    }
}
