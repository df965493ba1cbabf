//! The consumer inbox's table, `<schema>.inbox`: which messages each consumer has applied.
//! A row is written in the same transaction as the handler's own writes, so "recorded"
//! and "applied" commit together; old rows are purged in batches.

use std::time::Duration;

use diesel::sql_types::{BigInt, Text};
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
/// `$1` consumer, `$2` message id. Inserts nothing when the pair is known: the delivery
/// is a duplicate.
fn record(s: &Schema) -> String {
    format!("INSERT INTO {s}.inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
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
    /// Records that `consumer` received `message_id`, on `tx` (the transaction the
    /// handler then runs in). Returns whether it is new: `false` means a duplicate.
    pub(crate) async fn record_received(
        &self,
        tx: &mut AsyncPgConnection,
        consumer: &str,
        message_id: &str,
    ) -> Result<bool, diesel::result::Error> {
        let fresh = diesel::sql_query(&self.statements.inbox.record)
            .bind::<Text, _>(consumer)
            .bind::<Text, _>(message_id)
            .execute(tx)
            .await?;
        Ok(fresh > 0)
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
