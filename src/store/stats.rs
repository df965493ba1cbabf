//! What the outbox holds, as the CLI, the engine's summary and tests read it: counts by
//! status, the age of the oldest undelivered row, final outcomes, where one message is,
//! commit→confirm latency, and which engine published what. None of these run on the hot
//! path; each statement is formatted when it runs.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use diesel::{
    sql_types::{Array, BigInt, Double, Nullable, Text},
    QueryableByName,
};
use uuid::Uuid;

use super::{not_found_is_none, Schema, Store, StoreError};
use crate::state::{Status, ALL_STATUSES};

/// Counts by status and the age of the oldest undelivered row.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Rows in the outbox by status (every status present, zero included).
    pub outbox: BTreeMap<String, i64>,
    /// Rows in `dead_letters`.
    pub dead_letters: i64,
    /// Age of the oldest row not yet confirmed (pending, retrying or in flight).
    pub oldest_pending_age: Option<Duration>,
}

impl Stats {
    /// The count for one status.
    pub fn count(&self, status: Status) -> i64 {
        self.outbox.get(status.as_str()).copied().unwrap_or(0)
    }
}

/// Where a message is now, as the database says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageState {
    /// In the outbox with this status (`last_error` if any).
    Outbox(Status, Option<String>),
    /// In `dead_letters`, with the reason.
    DeadLettered(Option<String>),
}

/// A final outcome: delivered, or parked for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker confirmed it (recorded `confirmed`).
    Confirmed,
    /// It is in `dead_letters`, with the reason.
    DeadLettered(String),
}

#[derive(QueryableByName)]
struct OutcomeRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct TotalRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
pub(super) struct AgeRow {
    #[diesel(sql_type = Nullable<Double>)]
    age: Option<f64>,
}

impl AgeRow {
    /// Seconds as a duration; none for NULL or a non-finite value (a producer's
    /// `-infinity` `created_at` makes an infinite age).
    pub(super) fn duration(self) -> Option<Duration> {
        self.age
            .filter(|a| a.is_finite())
            .map(|a| Duration::from_secs_f64(a.max(0.0)))
    }
}

#[derive(QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
}

/// -- name: counts
///
/// No parameters.
fn counts(s: &Schema) -> String {
    format!("SELECT status::text AS status, count(*) AS n FROM {s}.outbox GROUP BY status")
}

/// -- name: dead_letter_count
///
/// No parameters.
fn dead_letter_count(s: &Schema) -> String {
    format!("SELECT count(*) AS n FROM {s}.dead_letters")
}

/// -- name: oldest_pending_age
///
/// No parameters.
fn oldest_pending(s: &Schema) -> String {
    format!(
        "SELECT EXTRACT(EPOCH FROM (now() - min(created_at)))::float8 AS age
                 FROM {s}.outbox WHERE status IN ('pending', 'retrying', 'in_flight')"
    )
}

impl Store {
    /// Counts by status, dead letters, and the oldest undelivered row's age.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let mut conn = self.op().await?;
        let counts: Vec<CountRow> = conn
            .fetch_all(diesel::sql_query(counts(&self.schema)))
            .await?;
        let mut outbox: BTreeMap<String, i64> = ALL_STATUSES
            .iter()
            .map(|s| (s.as_str().to_string(), 0))
            .collect();
        for row in counts {
            outbox.insert(row.status, row.n);
        }
        let dead: TotalRow = conn
            .fetch_one(diesel::sql_query(dead_letter_count(&self.schema)))
            .await?;
        drop(conn);
        Ok(Stats {
            outbox,
            dead_letters: dead.n,
            oldest_pending_age: self.oldest_pending_age().await?,
        })
    }

    /// Age of the oldest row not yet confirmed (pending, retrying or in flight), without
    /// counting anything (the engine's periodic summary).
    pub async fn oldest_pending_age(&self) -> Result<Option<Duration>, StoreError> {
        let mut conn = self.op().await?;
        let age: AgeRow = conn
            .fetch_one(diesel::sql_query(oldest_pending(&self.schema)))
            .await?;
        Ok(age.duration())
    }
}

/// -- name: outcomes
///
/// `$1` message ids.
fn outcomes(s: &Schema) -> String {
    format!(
        "SELECT id, 'confirmed'::text AS status, NULL::text AS last_error
                 FROM {s}.outbox WHERE id = ANY($1) AND status = 'confirmed'
                 UNION ALL
                 SELECT id, 'dead_lettered'::text, last_error
                 FROM {s}.dead_letters WHERE id = ANY($1)"
    )
}

impl Store {
    /// The final outcomes reached so far by any of `ids` (ids still on their way are absent).
    pub async fn outcomes(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Outcome>, StoreError> {
        let sql = outcomes(&self.schema);
        let mut out = HashMap::new();
        let mut conn = self.op().await?;
        for chunk in ids.chunks(10_000) {
            let rows: Vec<OutcomeRow> = conn
                .fetch_all(diesel::sql_query(&sql).bind::<Array<diesel::sql_types::Uuid>, _>(chunk))
                .await?;
            for r in rows {
                let outcome = if r.status == "confirmed" {
                    Outcome::Confirmed
                } else {
                    Outcome::DeadLettered(r.last_error.unwrap_or_default())
                };
                out.insert(r.id, outcome);
            }
        }
        Ok(out)
    }
}

/// -- name: outbox_status_of
///
/// `$1` message id.
fn outbox_status_of(s: &Schema) -> String {
    format!("SELECT status::text AS status, last_error FROM {s}.outbox WHERE id = $1")
}

/// -- name: dead_letter_of
///
/// `$1` message id.
fn dead_letter_of(s: &Schema) -> String {
    format!("SELECT 'failed'::text AS status, last_error FROM {s}.dead_letters WHERE id = $1")
}

impl Store {
    /// Where one message is now, or `None` if it is in neither table.
    pub(crate) async fn message_state(&self, id: Uuid) -> Result<Option<MessageState>, StoreError> {
        let mut conn = self.op().await?;
        let row: Option<StatusRow> = conn
            .fetch_one(
                diesel::sql_query(outbox_status_of(&self.schema))
                    .bind::<diesel::sql_types::Uuid, _>(id),
            )
            .await
            .map(Some)
            .or_else(not_found_is_none)?;
        if let Some(row) = row {
            let status = row.status.parse::<Status>().map_err(|e| {
                StoreError::Query(diesel::result::Error::DeserializationError(Box::new(e)))
            })?;
            return Ok(Some(MessageState::Outbox(status, row.last_error)));
        }
        let dead: Option<StatusRow> = conn
            .fetch_one(
                diesel::sql_query(dead_letter_of(&self.schema))
                    .bind::<diesel::sql_types::Uuid, _>(id),
            )
            .await
            .map(Some)
            .or_else(not_found_is_none)?;
        Ok(dead.map(|r| MessageState::DeadLettered(r.last_error)))
    }
}

/// -- name: latency_of
///
/// `$1` message ids.
fn latency_of(s: &Schema) -> String {
    format!(
        "SELECT (percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::float8 AS p50,
                        (percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::float8 AS p99
                 FROM (SELECT EXTRACT(EPOCH FROM (confirmed_at - created_at)) * 1000 AS ms
                       FROM {s}.outbox WHERE id = ANY($1) AND status = 'confirmed') t"
    )
}

/// -- name: publishers_of_confirmed
///
/// No parameters.
fn publishers(s: &Schema) -> String {
    format!(
        "SELECT coalesce(locked_by, '') AS status, count(*) AS n
                 FROM {s}.outbox WHERE status = 'confirmed' GROUP BY locked_by"
    )
}

impl Store {
    /// Commit→confirmed latency percentiles (p50, p99) in milliseconds over `ids`, from
    /// the database's own timestamps (`created_at` → `confirmed_at`).
    pub(crate) async fn latency_of(&self, ids: &[Uuid]) -> Result<Option<(f64, f64)>, StoreError> {
        #[derive(QueryableByName)]
        struct Pct {
            #[diesel(sql_type = Nullable<Double>)]
            p50: Option<f64>,
            #[diesel(sql_type = Nullable<Double>)]
            p99: Option<f64>,
        }
        let mut conn = self.op().await?;
        let r: Pct = conn
            .fetch_one(
                diesel::sql_query(latency_of(&self.schema))
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids),
            )
            .await?;
        Ok(r.p50.zip(r.p99))
    }

    /// Confirmed rows by the engine that published them (`locked_by` is kept on confirm).
    pub(crate) async fn publishers_of_confirmed(
        &self,
    ) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<CountRow> = conn
            .fetch_all(diesel::sql_query(publishers(&self.schema)))
            .await?;
        Ok(rows.into_iter().map(|r| (r.status, r.n)).collect())
    }
}
