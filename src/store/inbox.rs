//! The consumer inbox's table, `<schema>.inbox`: which messages each consumer has applied.
//! A row is written in the same transaction as the handler's own writes, so "recorded"
//! and "applied" commit together; old rows are purged in batches.

use std::time::Duration;

use diesel::sql_types::{BigInt, Bytea, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::{millis, Schema, Store, StoreError};

/// The inbox statement run for every delivery, formatted once per schema.
pub(super) struct Statements {
    record: String,
}

impl Statements {
    pub(super) fn new(s: &Schema) -> Statements {
        Statements { record: record(s) }
    }
}

/// -- name: record_received
///
/// `$1` consumer, `$2` message id, `$3` the body's SHA-256. Inserts nothing when the pair
/// is known (the delivery is a duplicate) and then returns the digest recorded with it:
/// the subquery reads the table as it was before the statement, so a fresh row's own
/// digest is not seen there.
fn record(s: &Schema) -> String {
    format!(
        "WITH fresh AS (INSERT INTO {s}.inbox (consumer, message_id, digest) VALUES ($1, $2, $3)
                        ON CONFLICT DO NOTHING RETURNING 1)
         SELECT EXISTS (SELECT 1 FROM fresh) AS fresh,
                (SELECT digest FROM {s}.inbox WHERE consumer = $1 AND message_id = $2) AS digest"
    )
}

/// What recording a delivery found.
#[derive(diesel::QueryableByName)]
pub(crate) struct Recorded {
    /// The pair was new: the handler runs.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub fresh: bool,
    /// For a known pair, the body digest recorded with it (null when recorded before
    /// digests were, or by a delivery recorded concurrently).
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Bytea>)]
    pub digest: Option<Vec<u8>>,
}

/// Rows one purge statement deletes at most, so a purge never holds many row locks long.
const PURGE_BATCH: usize = 5000;

/// -- name: purge_inbox
///
/// `$1` age (ms), `$2` consumer: that consumer's rows received longer ago go, at most
/// [`PURGE_BATCH`]. Only its own: consumers sharing a schema may keep their rows for
/// different times (or for ever).
fn purge(s: &Schema) -> String {
    format!(
        "DELETE FROM {s}.inbox WHERE ctid IN (SELECT ctid FROM {s}.inbox
                 WHERE received_at < now() - $1 * interval '1 millisecond' AND consumer = $2
                 LIMIT {PURGE_BATCH})"
    )
}

impl Store {
    /// Records that `consumer` received `message_id` with a body of this `digest`, on `tx`
    /// (the transaction the handler then runs in).
    pub(crate) async fn record_received(
        &self,
        tx: &mut AsyncPgConnection,
        consumer: &str,
        message_id: &str,
        digest: &[u8],
    ) -> Result<Recorded, diesel::result::Error> {
        diesel::sql_query(&self.statements.inbox.record)
            .bind::<Text, _>(consumer)
            .bind::<Text, _>(message_id)
            .bind::<Bytea, _>(digest)
            .get_result(tx)
            .await
    }

    /// Deletes `consumer`'s inbox rows older than `age`, batch after batch until a short
    /// one. Returns how many.
    pub(crate) async fn purge_inbox(
        &self,
        consumer: &str,
        age: Duration,
    ) -> Result<usize, StoreError> {
        let sql = purge(&self.schema);
        let mut total = 0;
        loop {
            let mut conn = self.op().await?;
            let n = conn
                .run(
                    diesel::sql_query(&sql)
                        .bind::<BigInt, _>(millis(age))
                        .bind::<Text, _>(consumer),
                )
                .await?;
            total += n;
            if n < PURGE_BATCH {
                return Ok(total);
            }
        }
    }
}
