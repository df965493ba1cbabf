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
use crate::state::Status;

/// Counts by status and the age of the oldest undelivered row. `failed` is not counted:
/// no statement writes it (a row that failed for good is in `dead_letters`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    /// Rows in the outbox by status: `pending`, `in_flight`, `confirmed`, `retrying`.
    pub outbox: BTreeMap<String, i64>,
    /// Rows in `dead_letters`.
    pub dead_letters: i64,
    /// Age of the oldest row not yet confirmed (pending, retrying or in flight).
    pub oldest_pending_age: Option<Duration>,
    /// Keys of `outbox` (and `dead_letters`, `oldest_pending_age`) that are not exact: past
    /// [`EXACT_UP_TO`], counts are not read row by row. `pending`, `retrying`, `in_flight`
    /// are then lower bounds (at least that many), `confirmed` and `dead_letters` the
    /// planner's estimate, and the age the oldest among each kind's earliest-due rows.
    pub approximate: Vec<&'static str>,
}

impl Stats {
    /// The stats as JSON, as `courier status --json` prints them and the admin API serves
    /// them (ages in seconds).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "outbox": self.outbox,
            "dead_letters": self.dead_letters,
            "oldest_pending_age_seconds": self.oldest_pending_age.map(|a| a.as_secs_f64()),
            "approximate": self.approximate,
        })
    }

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

/// A count per name (a status, an engine).
#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = Text)]
    status: String,
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

/// Counts are exact up to this many rows per status (and per index); beyond, estimated.
pub const EXACT_UP_TO: i64 = 10_000;

/// At most `$1` rows of `table` matching `filter`: each filter below is the predicate of a
/// partial index, so a count reads at most `$1` index entries, however many confirmed rows
/// the week's history holds (a `count(*) GROUP BY status` read all of them).
fn bounded_count(s: &Schema, table: &str, filter: &str) -> String {
    format!("(SELECT count(*) FROM (SELECT 1 FROM {s}.{table} WHERE {filter} LIMIT $1) t)")
}

/// The `$1` earliest-due entries of each open-row index (id and `created_at`): where the
/// oldest open row is, exactly while fewer than `$1` rows are open per index. Both the age
/// in the stats and the dashboard's oldest row read these, and nothing else.
fn open_heads(s: &Schema) -> String {
    format!(
        "(SELECT id, created_at FROM {s}.outbox
          WHERE status IN ('pending', 'retrying') AND ordering_key IS NULL
          ORDER BY next_attempt_at LIMIT $1)
         UNION ALL
         (SELECT id, created_at FROM {s}.outbox
          WHERE status IN ('pending', 'retrying') AND ordering_key IS NOT NULL
          ORDER BY next_attempt_at LIMIT $1)
         UNION ALL
         (SELECT id, created_at FROM {s}.outbox
          WHERE status = 'in_flight' ORDER BY locked_until LIMIT $1)"
    )
}

/// The age of the oldest open row, from [`open_heads`]. A producer's `-infinity`
/// `created_at` is skipped (it would overflow the interval).
fn oldest_open_age(s: &Schema) -> String {
    format!(
        "EXTRACT(EPOCH FROM now() - (
           SELECT min(created_at) FILTER (WHERE isfinite(created_at)) FROM ({heads}) h
         ))::float8",
        heads = open_heads(s)
    )
}

/// -- name: stats
///
/// `$1` the bound ([`EXACT_UP_TO`]) plus one, so that exactly the bound still counts as
/// exact. Past it, `confirmed` and `dead_letters` come from the planner's estimate
/// (`pg_class.reltuples`).
fn stats(s: &Schema) -> String {
    let schema = s.name();
    let oldest = oldest_open_age(s);
    format!(
        "SELECT {} AS pending, {} AS pending_keyed, {} AS retrying, {} AS retrying_keyed,
                {} AS in_flight, {} AS confirmed, {} AS dead_letters,
                (SELECT reltuples FROM pg_class
                 WHERE oid = to_regclass('\"{schema}\".outbox_confirmed_idx'))::float8
                    AS confirmed_estimate,
                (SELECT reltuples FROM pg_class
                 WHERE oid = to_regclass('\"{schema}\".dead_letters'))::float8
                    AS dead_letters_estimate,
                {oldest} AS oldest_age",
        bounded_count(s, "outbox", "status = 'pending' AND ordering_key IS NULL"),
        bounded_count(
            s,
            "outbox",
            "status = 'pending' AND ordering_key IS NOT NULL"
        ),
        bounded_count(s, "outbox", "status = 'retrying' AND ordering_key IS NULL"),
        bounded_count(
            s,
            "outbox",
            "status = 'retrying' AND ordering_key IS NOT NULL"
        ),
        bounded_count(s, "outbox", "status = 'in_flight'"),
        bounded_count(s, "outbox", "status = 'confirmed'"),
        bounded_count(s, "dead_letters", "true"),
    )
}

#[derive(QueryableByName)]
struct StatsRow {
    #[diesel(sql_type = BigInt)]
    pending: i64,
    #[diesel(sql_type = BigInt)]
    pending_keyed: i64,
    #[diesel(sql_type = BigInt)]
    retrying: i64,
    #[diesel(sql_type = BigInt)]
    retrying_keyed: i64,
    #[diesel(sql_type = BigInt)]
    in_flight: i64,
    #[diesel(sql_type = BigInt)]
    confirmed: i64,
    #[diesel(sql_type = BigInt)]
    dead_letters: i64,
    #[diesel(sql_type = Nullable<Double>)]
    confirmed_estimate: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    dead_letters_estimate: Option<f64>,
    #[diesel(sql_type = Nullable<Double>)]
    oldest_age: Option<f64>,
}

impl StatsRow {
    fn into_stats(self) -> Stats {
        let mut approximate = Vec::new();
        let mut exact_or_lower_bound = |name: &'static str, parts: &[i64]| {
            if parts.iter().any(|n| *n > EXACT_UP_TO) {
                approximate.push(name);
            }
            parts.iter().sum::<i64>()
        };
        let pending = exact_or_lower_bound("pending", &[self.pending, self.pending_keyed]);
        let retrying = exact_or_lower_bound("retrying", &[self.retrying, self.retrying_keyed]);
        let in_flight = exact_or_lower_bound("in_flight", &[self.in_flight]);
        if self.confirmed > EXACT_UP_TO {
            approximate.push("confirmed");
        }
        if self.dead_letters > EXACT_UP_TO {
            approximate.push("dead_letters");
        }
        // The age is read off each kind's earliest-due rows (`open_heads`): past the bound,
        // an older row due later is not among them.
        if ["pending", "retrying", "in_flight"]
            .iter()
            .any(|k| approximate.contains(k))
        {
            approximate.push("oldest_pending_age");
        }
        let outbox = [
            ("pending", pending),
            ("in_flight", in_flight),
            (
                "confirmed",
                exact_or_estimate(self.confirmed, self.confirmed_estimate),
            ),
            ("retrying", retrying),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Stats {
            outbox,
            dead_letters: exact_or_estimate(self.dead_letters, self.dead_letters_estimate),
            oldest_pending_age: AgeRow {
                age: self.oldest_age,
            }
            .duration(),
            approximate,
        }
    }
}

/// An exact count up to the bound; past it, the larger of what was counted and the
/// planner's estimate (`reltuples` is -1 or 0 before the first ANALYZE).
fn exact_or_estimate(counted: i64, estimate: Option<f64>) -> i64 {
    if counted <= EXACT_UP_TO {
        return counted;
    }
    let estimate = estimate.filter(|e| e.is_finite()).unwrap_or(0.0);
    counted.max(estimate as i64)
}

/// The oldest open row and what it waits for (the dashboard says why a row is old).
#[derive(Debug, Clone, QueryableByName)]
pub struct OldestOpen {
    /// The row.
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    /// `pending`, `in_flight` or `retrying`.
    #[diesel(sql_type = Text)]
    pub status: String,
    /// Its ordering key, if any (producer text).
    #[diesel(sql_type = Nullable<Text>)]
    pub ordering_key: Option<String>,
    /// Attempts so far.
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pub attempts: i32,
    /// Why its last attempt failed, if one did.
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    /// Seconds until it is due (positive: delayed by its producer or its backoff).
    #[diesel(sql_type = Nullable<Double>)]
    pub due_in_seconds: Option<f64>,
    /// The earliest dead letter of its key, if the key has one.
    #[diesel(sql_type = Nullable<diesel::sql_types::Uuid>)]
    pub key_dead_letter: Option<Uuid>,
}

/// -- name: oldest_open
///
/// The oldest open row among [`open_heads`] (the row whose age the stats give), with what
/// it waits for. A producer's `infinity` as `next_attempt_at` is due in `Infinity` seconds
/// (the subtraction would fail: the interval is out of range).
fn oldest_open(s: &Schema) -> String {
    format!(
        "WITH candidates AS ({heads}), oldest AS (
            SELECT id FROM candidates WHERE isfinite(created_at) ORDER BY created_at LIMIT 1
         )
         SELECT o.id, o.status::text AS status, o.ordering_key, o.attempts, o.last_error,
                CASE WHEN isfinite(o.next_attempt_at)
                     THEN EXTRACT(EPOCH FROM o.next_attempt_at - now())::float8
                     ELSE 'Infinity'::float8 END AS due_in_seconds,
                (SELECT d.id FROM {s}.dead_letters d WHERE d.ordering_key = o.ordering_key
                 ORDER BY d.failed_at LIMIT 1) AS key_dead_letter
         FROM {s}.outbox o JOIN oldest USING (id)",
        heads = open_heads(s)
    )
}

impl Store {
    /// The oldest open row and what it waits for; `None` when nothing is open.
    pub async fn oldest_open(&self) -> Result<Option<OldestOpen>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<OldestOpen> = conn
            .fetch_all(diesel::sql_query(oldest_open(&self.schema)).bind::<BigInt, _>(EXACT_UP_TO))
            .await?;
        Ok(rows.into_iter().next())
    }
}

/// -- name: oldest_pending_age
///
/// `$1` the bound ([`EXACT_UP_TO`]).
fn oldest_pending(s: &Schema) -> String {
    format!("SELECT {} AS age", oldest_open_age(s))
}

impl Store {
    /// Counts by status, dead letters, and the oldest undelivered row's age, bounded (see
    /// [`EXACT_UP_TO`]): the CLI, the admin API and `/metrics` read them while the engine
    /// runs, on an outbox that may hold a week of confirmed rows.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let mut conn = self.op().await?;
        let row: StatsRow = conn
            .fetch_one(diesel::sql_query(stats(&self.schema)).bind::<BigInt, _>(EXACT_UP_TO + 1))
            .await?;
        Ok(row.into_stats())
    }

    /// Age of the oldest row not yet confirmed (pending, retrying or in flight), without
    /// counting anything (the engine's periodic summary). It reads the open-row indexes
    /// only: a `min(created_at)` over the open statuses matched no partial index and read
    /// the whole table, history included, every summary.
    pub async fn oldest_pending_age(&self) -> Result<Option<Duration>, StoreError> {
        let mut conn = self.op().await?;
        let age: AgeRow = conn
            .fetch_one(
                diesel::sql_query(oldest_pending(&self.schema)).bind::<BigInt, _>(EXACT_UP_TO),
            )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_the_bound_use_the_estimate() {
        assert_eq!(exact_or_estimate(12, Some(50_000.0)), 12);
        assert_eq!(exact_or_estimate(EXACT_UP_TO, Some(50_000.0)), EXACT_UP_TO);
        assert_eq!(exact_or_estimate(EXACT_UP_TO + 1, Some(50_000.0)), 50_000);
        assert_eq!(
            exact_or_estimate(EXACT_UP_TO + 1, Some(-1.0)),
            EXACT_UP_TO + 1
        );
    }
}
