//! Leases: an engine keeps the rows it holds by extending their `locked_until` well before
//! it passes. A slow but alive engine thus keeps its rows; only one that stopped renewing
//! (crashed, partitioned) loses them, to the next claim of any engine.

use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Text};
use uuid::Uuid;

use super::{millis, Schema, Store, StoreError};

/// The lease statement, formatted once per schema: it runs every lease period.
pub(super) struct Statements {
    renew: String,
}

impl Statements {
    pub(super) fn new(s: &Schema) -> Statements {
        Statements { renew: renew(s) }
    }
}

/// -- name: renew_leases
///
/// Fenced by `locked_by`: a row another engine took over (after a rescue, or an expired
/// lease) is not extended. A row locked by someone else (a producer's `SELECT … FOR
/// UPDATE`, or this engine's own outcome write) is skipped, not waited for: one such row
/// must not hold the renewal of every other row past their leases.
///
/// `$1` row ids, `$2` engine id, `$3` lease (ms).
fn renew(s: &Schema) -> String {
    format!(
        "UPDATE {s}.outbox
                 SET locked_until = now() + $3 * interval '1 millisecond'
                 WHERE id IN (SELECT id FROM {s}.outbox
                              WHERE id = ANY($1) AND status = 'in_flight' AND locked_by = $2
                              FOR UPDATE SKIP LOCKED)"
    )
}

impl Store {
    /// Extends the lease of rows `engine` still holds. Returns how many it still held.
    pub(crate) async fn renew_leases(
        &self,
        engine: &str,
        ids: &[Uuid],
        lease: Duration,
    ) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.op().await?;
        Ok(conn
            .run_prepared(
                diesel::sql_query(&self.statements.leases.renew)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
                    .bind::<Text, _>(engine)
                    .bind::<BigInt, _>(millis(lease)),
            )
            .await?)
    }
}
