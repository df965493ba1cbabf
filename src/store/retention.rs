//! Retention's statements: confirmed rows older than `retention.confirmed_max_age` are
//! deleted (or moved to `outbox_archive`) in bounded batches, then the outbox is vacuumed
//! so the table stops growing. The Retention service (in the actors) decides when.

use std::time::Duration;

use diesel::{
    pg::Pg,
    query_builder::{BoxedSqlQuery, SqlQuery},
    sql_types::{Array, BigInt},
};
use uuid::Uuid;

use super::{millis, Schema, Store, StoreError};

/// Retention's batch: the oldest confirmed rows past the age `$1` (ms), at most `$2`, but
/// none of `$3` (rows another table references), SKIP LOCKED so it never waits on (or
/// blocks) the hot path.
fn old_confirmed(s: &Schema) -> String {
    format!(
        "old AS (
                SELECT id FROM {s}.outbox
                WHERE status = 'confirmed' AND confirmed_at < now() - $1 * interval '1 millisecond'
                  AND id <> ALL($3)
                ORDER BY confirmed_at LIMIT $2
                FOR UPDATE SKIP LOCKED
             )"
    )
}

/// `sql`, one of retention's batch statements, with [`old_confirmed`]'s parameters bound.
fn batch(
    sql: String,
    older_than: Duration,
    limit: u32,
    kept: &[Uuid],
) -> BoxedSqlQuery<'_, Pg, SqlQuery> {
    diesel::sql_query(sql)
        .into_boxed()
        .bind::<BigInt, _>(millis(older_than))
        .bind::<BigInt, _>(i64::from(limit))
        .bind::<Array<diesel::sql_types::Uuid>, _>(kept)
}

/// -- name: old_confirmed_ids
///
/// The ids of [`old_confirmed`]'s batch, when it has to be removed one row at a time.
fn old_confirmed_ids(s: &Schema) -> String {
    let old_confirmed = old_confirmed(s);
    format!("WITH {old_confirmed} SELECT id FROM old")
}

/// What [`archive_confirmed`] did: rows that left the outbox, and rows archived (fewer when
/// the archive already held some of the ids).
#[derive(diesel::QueryableByName)]
struct Archived {
    #[diesel(sql_type = BigInt)]
    moved: i64,
    #[diesel(sql_type = BigInt)]
    archived: i64,
}

#[derive(diesel::QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

/// -- name: purge_confirmed
///
/// `$1` age (ms), `$2` most rows, `$3` ids left alone (see [`old_confirmed`]).
fn purge_confirmed(s: &Schema) -> String {
    let old_confirmed = old_confirmed(s);
    format!(
        "WITH {old_confirmed}
                 DELETE FROM {s}.outbox o USING old WHERE o.id = old.id"
    )
}

/// -- name: archive_confirmed
///
/// `$1` age (ms), `$2` most rows, `$3` ids left alone (see [`old_confirmed`]).
fn archive_confirmed(s: &Schema) -> String {
    let old_confirmed = old_confirmed(s);
    format!(
        "WITH {old_confirmed}, moved AS (
                    DELETE FROM {s}.outbox o USING old WHERE o.id = old.id RETURNING o.*
                 ), archived AS (
                    INSERT INTO {s}.outbox_archive SELECT * FROM moved ON CONFLICT (id) DO NOTHING
                    RETURNING id
                 )
                 SELECT (SELECT count(*) FROM moved) AS moved,
                        (SELECT count(*) FROM archived) AS archived"
    )
}

/// -- name: remove_one
///
/// Deletes (or moves to `outbox_archive`) the confirmed row `$1`: retention's way past a
/// batch that a foreign key refused.
fn remove_one(s: &Schema, archive: bool) -> String {
    let delete = format!("DELETE FROM {s}.outbox WHERE id = $1 AND status = 'confirmed'");
    match archive {
        false => delete,
        true => format!(
            "WITH moved AS ({delete} RETURNING *)
             INSERT INTO {s}.outbox_archive SELECT * FROM moved ON CONFLICT (id) DO NOTHING"
        ),
    }
}

/// -- name: vacuum_outbox
///
/// Plain VACUUM takes no lock that claims or confirms wait on; it makes the space of
/// deleted rows reusable, so the table stops growing.
fn vacuum(s: &Schema) -> String {
    format!("VACUUM {s}.outbox")
}

impl Store {
    /// Deletes (or, with `archive`, moves to `outbox_archive`) up to `limit` rows confirmed
    /// more than `older_than` ago. Returns how many.
    /// `kept` are left alone (rows another table references, see `actors::retention`).
    pub(crate) async fn purge_confirmed(
        &self,
        older_than: Duration,
        limit: u32,
        archive: bool,
        kept: &[Uuid],
    ) -> Result<usize, StoreError> {
        let mut conn = self.op().await?;
        if !archive {
            let sql = purge_confirmed(&self.schema);
            return Ok(conn.run(batch(sql, older_than, limit, kept)).await?);
        }
        let counts: Vec<Archived> = conn
            .fetch_all(batch(
                archive_confirmed(&self.schema),
                older_than,
                limit,
                kept,
            ))
            .await?;
        let Some(Archived { moved, archived }) = counts.into_iter().next() else {
            return Ok(0);
        };
        if archived < moved {
            tracing::warn!(
                without_record = moved - archived,
                "retention: outbox_archive already held some of these ids (a producer reused \
                 them); the later copies left the outbox without an archive record"
            );
        }
        Ok(usize::try_from(moved).unwrap_or_default())
    }

    /// Removes the confirmed row `id` as [`purge_confirmed`](Self::purge_confirmed) would.
    /// Returns whether it was there to remove.
    pub(crate) async fn purge_one(&self, id: Uuid, archive: bool) -> Result<bool, StoreError> {
        let mut conn = self.op().await?;
        let sql = remove_one(&self.schema, archive);
        let n = conn
            .run(diesel::sql_query(sql).bind::<diesel::sql_types::Uuid, _>(id))
            .await?;
        Ok(n > 0)
    }

    /// The ids [`purge_confirmed`](Self::purge_confirmed) would remove.
    pub(crate) async fn old_confirmed_ids(
        &self,
        older_than: Duration,
        limit: u32,
        kept: &[Uuid],
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<IdRow> = conn
            .fetch_all(batch(
                old_confirmed_ids(&self.schema),
                older_than,
                limit,
                kept,
            ))
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Runs a plain `VACUUM` on the outbox (after retention removed rows).
    pub(crate) async fn vacuum_outbox(&self) -> Result<(), StoreError> {
        use diesel_async::SimpleAsyncConnection;
        let mut conn = self.op().await?;
        conn.batch_execute(&vacuum(&self.schema)).await?;
        Ok(())
    }
}
