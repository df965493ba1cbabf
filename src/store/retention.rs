//! Retention's statements: confirmed rows older than `retention.confirmed_max_age` are
//! deleted (or moved to `outbox_archive`) in bounded batches, then the outbox is vacuumed
//! so the table stops growing. The Retention service (in the actors) decides when.

use std::time::Duration;

use diesel::sql_types::BigInt;

use super::{millis, Schema, Store, StoreError};

/// Retention's batch: the oldest confirmed rows past the age `$1` (ms), at most `$2`, SKIP
/// LOCKED so it never waits on (or blocks) the hot path.
fn old_confirmed(s: &Schema) -> String {
    format!(
        "old AS (
                SELECT id FROM {s}.outbox
                WHERE status = 'confirmed' AND confirmed_at < now() - $1 * interval '1 millisecond'
                ORDER BY confirmed_at LIMIT $2
                FOR UPDATE SKIP LOCKED
             )"
    )
}

/// -- name: purge_confirmed
///
/// `$1` age (ms), `$2` most rows (see [`old_confirmed`]).
fn purge_confirmed(s: &Schema) -> String {
    let old_confirmed = old_confirmed(s);
    format!(
        "WITH {old_confirmed}
                 DELETE FROM {s}.outbox o USING old WHERE o.id = old.id"
    )
}

/// -- name: archive_confirmed
///
/// `$1` age (ms), `$2` most rows (see [`old_confirmed`]).
fn archive_confirmed(s: &Schema) -> String {
    let old_confirmed = old_confirmed(s);
    format!(
        "WITH {old_confirmed}, moved AS (
                    DELETE FROM {s}.outbox o USING old WHERE o.id = old.id RETURNING o.*
                 )
                 INSERT INTO {s}.outbox_archive SELECT * FROM moved ON CONFLICT (id) DO NOTHING"
    )
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
    pub(crate) async fn purge_confirmed(
        &self,
        older_than: Duration,
        limit: u32,
        archive: bool,
    ) -> Result<usize, StoreError> {
        let sql = if archive {
            archive_confirmed(&self.schema)
        } else {
            purge_confirmed(&self.schema)
        };
        let mut conn = self.op().await?;
        Ok(conn
            .run(
                diesel::sql_query(sql)
                    .bind::<BigInt, _>(millis(older_than))
                    .bind::<BigInt, _>(i64::from(limit)),
            )
            .await?)
    }

    /// Runs a plain `VACUUM` on the outbox (after retention removed rows).
    pub(crate) async fn vacuum_outbox(&self) -> Result<(), StoreError> {
        use diesel_async::SimpleAsyncConnection;
        let mut conn = self.op().await?;
        conn.batch_execute(&vacuum(&self.schema)).await?;
        Ok(())
    }
}
