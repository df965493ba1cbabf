//! Settling rows: what happened to a claimed row is written back. Acks become `confirmed`,
//! failures with attempts left become `retrying` with a delay, and rows claimed but never
//! published are given back (due again at once, the attempt refunded). Each is one
//! statement over a whole batch; the Ledger actor writes them behind the publisher.

use std::{future::Future, time::Duration};

use diesel::{
    pg::Pg,
    query_builder::{BoxedSqlQuery, SqlQuery},
    sql_types::{Array, BigInt, Bool, Text},
};
use uuid::Uuid;

use super::{lock_wait_guard, millis, IdRow, Schema, Store, StoreError, ROW_LOCK_WAIT};

/// A retry decision for one message, written in a batch by `Store::mark_retrying`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryUpdate {
    /// The row.
    pub id: Uuid,
    /// Delay from now until `next_attempt_at`.
    pub delay: Duration,
    /// Stored in `last_error`.
    pub error: String,
    /// Give the attempt back (the failure was not this message's fault).
    pub refund: bool,
}

/// The settle statements, formatted once per schema: they run for every batch.
pub(super) struct Statements {
    confirm: String,
    confirm_unlocked: String,
    retry: String,
    retry_unlocked: String,
    release: String,
    release_all: String,
}

impl Statements {
    pub(super) fn new(s: &Schema) -> Statements {
        Statements {
            confirm: confirm(s),
            confirm_unlocked: confirm_unlocked(s),
            retry: retry(s),
            retry_unlocked: retry_unlocked(s),
            release: release(s),
            release_all: release_all(s),
        }
    }
}

/// How an outcome write treats a row that another transaction holds locked: a producer's
/// `SELECT … FOR UPDATE`, or an operator's `UPDATE` in a transaction left open. Waiting for
/// it held the whole batch, then every later flush behind it, so one locked row stopped the
/// engine for as long as the lock lasted (30 s of a 30,000-row drain in a test by hand).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Locked {
    /// Wait for it at most [`ROW_LOCK_WAIT`], then write the rest without it (the usual write:
    /// the engine's own statements hold a row for milliseconds).
    WaitBriefly,
    /// Write the rest at once, without it (rows found locked before).
    Skip,
}

/// An outcome write waits at most [`ROW_LOCK_WAIT`] for a row lock before it is made again
/// without the locked rows (`lock_timeout`, for this statement's transaction only).
fn lock_wait() -> String {
    lock_wait_guard(ROW_LOCK_WAIT)
}

/// What a confirm writes. A confirmed row was published at least once: `attempts` says so
/// even when the claim that counted it was lost in a database crash (claims commit without
/// waiting for the WAL flush) while its publish and this synchronous write were not.
const CONFIRM_SET: &str = "SET status = 'confirmed', confirmed_at = now(), updated_at = now(), \
     locked_until = NULL, attempts = GREATEST(attempts, 1)";

/// -- name: mark_confirmed
///
/// An ack is a fact about delivery: it is recorded whoever holds the row now. `locked_by`
/// is kept: on a confirmed row it names the engine that claimed it last (NULL when that
/// claim was lost in a database crash).
///
/// `$1` row ids.
fn confirm(s: &Schema) -> String {
    format!(
        "UPDATE {s}.outbox {CONFIRM_SET}
                 WHERE id = ANY($1) AND status <> 'confirmed' AND {wait}",
        wait = lock_wait(),
    )
}

/// -- name: confirm_unlocked
///
/// [`confirm`] of the rows no other transaction holds locked; returns the ids of the others
/// (still to be confirmed), for a later write.
///
/// `$1` row ids.
fn confirm_unlocked(s: &Schema) -> String {
    format!(
        "WITH free AS (
                    SELECT id FROM {s}.outbox
                    WHERE id = ANY($1) AND status <> 'confirmed'
                    FOR UPDATE SKIP LOCKED
                 ), done AS (
                    UPDATE {s}.outbox {CONFIRM_SET} WHERE id IN (SELECT id FROM free) RETURNING 1
                 )
                 SELECT id FROM {s}.outbox
                 WHERE id = ANY($1) AND status <> 'confirmed' AND id NOT IN (SELECT id FROM free)"
    )
}

impl Store {
    /// Marks a batch `confirmed` (one statement). Returns the rows changed.
    pub(crate) async fn mark_confirmed(&self, ids: &[Uuid]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.op().await?;
        Ok(conn
            .run_prepared(
                diesel::sql_query(&self.statements.settle.confirm)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids),
            )
            .await?)
    }

    /// Marks a batch `confirmed`, treating rows another transaction holds locked as
    /// `locked` says. Returns the rows left for a later write.
    pub(crate) async fn record_confirmed(
        &self,
        ids: &[Uuid],
        locked: Locked,
    ) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let unlocked = diesel::sql_query(&self.statements.settle.confirm_unlocked)
            .into_boxed()
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids);
        around_locks(locked, self.mark_confirmed(ids), self.held_back(unlocked)).await
    }

    /// Runs one of the `*_unlocked` statements: the ids it returns are the rows it left.
    async fn held_back(
        &self,
        query: BoxedSqlQuery<'_, Pg, SqlQuery>,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.op().await?;
        let held: Vec<IdRow> = conn.fetch_all_prepared(query).await?;
        Ok(held.into_iter().map(|r| r.id).collect())
    }
}

/// The write `fast`, which waits a moment for a row lock; when it gave up on one (or at
/// once, with [`Locked::Skip`]) the write `unlocked`, which leaves the locked rows out and
/// returns them. Any other failure of `fast` may be a lock wait too (PostgreSQL's code does
/// not reach the error): `unlocked` then fails the same way if it was not.
async fn around_locks(
    locked: Locked,
    fast: impl Future<Output = Result<usize, StoreError>>,
    unlocked: impl Future<Output = Result<Vec<Uuid>, StoreError>>,
) -> Result<Vec<Uuid>, StoreError> {
    if locked == Locked::WaitBriefly {
        match fast.await {
            Err(e) if e.may_be_a_lock_wait() => {}
            done => return done.map(|_| Vec::new()),
        }
    }
    unlocked.await
}

/// -- name: mark_retrying
///
/// Failures are fenced by the lease: an engine that lost a row must not undo the work of
/// the engine that holds it now.
///
/// `$1` row ids, `$2` delays (ms), `$3` errors, `$4` refunds (one of each per row, in the
/// same order), `$5` engine id.
fn retry(s: &Schema) -> String {
    format!(
        "UPDATE {s}.outbox o {RETRY_SET}
                 FROM {RETRY_ROWS}
                 WHERE o.id = u.id AND o.status = 'in_flight' AND o.locked_by = $5 AND {wait}",
        wait = lock_wait(),
    )
}

/// What a retry writes, from `u` ([`RETRY_ROWS`]).
const RETRY_SET: &str = "SET status = 'retrying',
                     next_attempt_at = now() + u.delay_ms * interval '1 millisecond',
                     last_error = u.err,
                     attempts = greatest(o.attempts - CASE WHEN u.refund THEN 1 ELSE 0 END, 0),
                     locked_by = NULL, locked_until = NULL, updated_at = now()";

/// A retry's rows, one per id.
const RETRY_ROWS: &str =
    "unnest($1::uuid[], $2::bigint[], $3::text[], $4::bool[]) AS u(id, delay_ms, err, refund)";

/// -- name: retry_unlocked
///
/// [`retry`] of the rows no other transaction holds locked; returns the ids of the others
/// this engine still holds, for a later write. Same parameters.
fn retry_unlocked(s: &Schema) -> String {
    format!(
        "WITH free AS (
                    SELECT id FROM {s}.outbox
                    WHERE id = ANY($1) AND status = 'in_flight' AND locked_by = $5
                    FOR UPDATE SKIP LOCKED
                 ), done AS (
                    UPDATE {s}.outbox o {RETRY_SET}
                    FROM {RETRY_ROWS}
                    WHERE o.id = u.id AND o.id IN (SELECT id FROM free)
                    RETURNING 1
                 )
                 SELECT id FROM {s}.outbox
                 WHERE id = ANY($1) AND status = 'in_flight' AND locked_by = $5
                   AND id NOT IN (SELECT id FROM free)"
    )
}

/// `sql` ([`retry`] or [`retry_unlocked`]) with `updates`' parameters bound.
fn retry_rows<'a>(
    sql: &str,
    engine: &'a str,
    updates: &[RetryUpdate],
) -> BoxedSqlQuery<'a, Pg, SqlQuery> {
    let ids: Vec<Uuid> = updates.iter().map(|u| u.id).collect();
    let delays: Vec<i64> = updates.iter().map(|u| millis(u.delay)).collect();
    let errors: Vec<String> = updates.iter().map(|u| u.error.clone()).collect();
    let refunds: Vec<bool> = updates.iter().map(|u| u.refund).collect();
    diesel::sql_query(sql)
        .into_boxed()
        .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
        .bind::<Array<BigInt>, _>(delays)
        .bind::<Array<Text>, _>(errors)
        .bind::<Array<Bool>, _>(refunds)
        .bind::<Text, _>(engine)
}

impl Store {
    /// Marks a batch `retrying` with `next_attempt_at` and `last_error` (one statement),
    /// for rows `engine` still holds.
    pub(crate) async fn mark_retrying(
        &self,
        engine: &str,
        updates: &[RetryUpdate],
    ) -> Result<usize, StoreError> {
        if updates.is_empty() {
            return Ok(0);
        }
        let mut conn = self.op().await?;
        Ok(conn
            .run_prepared(retry_rows(&self.statements.settle.retry, engine, updates))
            .await?)
    }

    /// [`mark_retrying`](Self::mark_retrying), treating rows another transaction holds
    /// locked as `locked` says. Returns the rows left for a later write.
    pub(crate) async fn record_retrying(
        &self,
        engine: &str,
        updates: &[RetryUpdate],
        locked: Locked,
    ) -> Result<Vec<Uuid>, StoreError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let unlocked = retry_rows(&self.statements.settle.retry_unlocked, engine, updates);
        around_locks(
            locked,
            self.mark_retrying(engine, updates),
            self.held_back(unlocked),
        )
        .await
    }
}

/// Giving a row back unpublished: due again at once, the attempt refunded.
fn release_set(s: &Schema) -> String {
    format!(
        "SET status = CASE WHEN attempts > 1 THEN 'retrying'::{s}.outbox_status
                               ELSE 'pending'::{s}.outbox_status END,
                 attempts = greatest(attempts - 1, 0), next_attempt_at = now(),
                 locked_by = NULL, locked_until = NULL, updated_at = now()"
    )
}

/// -- name: release
///
/// `$1` row ids, `$2` engine id (only rows it still holds).
fn release(s: &Schema) -> String {
    let release_set = release_set(s);
    format!(
        "UPDATE {s}.outbox {release_set}
                 WHERE id = ANY($1) AND status = 'in_flight' AND locked_by = $2"
    )
}

/// -- name: release_all
///
/// `$1` engine id: every row it still holds, but for rows another transaction holds locked
/// (skipped, not waited for: the last step of a shutdown must not wait for a producer's
/// lock; those rows come back when their lease ends).
fn release_all(s: &Schema) -> String {
    let release_set = release_set(s);
    format!(
        "UPDATE {s}.outbox {release_set}
                 WHERE id IN (SELECT id FROM {s}.outbox
                              WHERE status = 'in_flight' AND locked_by = $1
                              FOR UPDATE SKIP LOCKED)"
    )
}

impl Store {
    /// Gives back rows `engine` claimed but never published: they are due again at once and
    /// the attempt is not counted.
    pub(crate) async fn release(&self, engine: &str, ids: &[Uuid]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.op().await?;
        Ok(conn
            .run_prepared(
                diesel::sql_query(&self.statements.settle.release)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
                    .bind::<Text, _>(engine),
            )
            .await?)
    }

    /// Gives back every row `engine` still holds (shutdown): due again at once, attempt
    /// refunded. Returns how many.
    pub(crate) async fn release_all(&self, engine: &str) -> Result<usize, StoreError> {
        let mut conn = self.op().await?;
        Ok(conn
            .run(diesel::sql_query(&self.statements.settle.release_all).bind::<Text, _>(engine))
            .await?)
    }
}
