//! The admin API's database access: its own small pools, never the engine's, and the
//! statements only the admin API runs, each beside the function that binds it.
//!
//! Every admin connection is opened with `application_name=courier-admin` ([`super::conn_url`]) and
//! `options=-c statement_timeout=<admin.statement_timeout>` (tokio-postgres passes libpq's
//! `options` in the startup packet), so no admin query can run longer than that, and the
//! engine's claims, confirms and lease renewals never wait behind an operator's browser.
//! Counts are bounded: open rows (pending, retrying, in flight) are counted through their
//! partial indexes up to [`EXACT_UP_TO`] each; `confirmed` and `dead_letters` likewise, and
//! past the bound they come from the planner's estimate (`pg_class.reltuples`).

use std::{collections::BTreeMap, time::Duration};

use chrono::{DateTime, Utc};
use diesel::{
    sql_types::{BigInt, Bytea, Double, Integer, Nullable, Text, Timestamptz},
    QueryableByName,
};
use uuid::Uuid;

use crate::{
    config::{AdminConfig, DatabaseConfig},
    store::{Stats, Store, StoreError},
};

/// Counts are exact up to this many rows per status (and index); beyond, estimated.
pub const EXACT_UP_TO: i64 = 10_000;
/// Most dead letters one list returns.
pub const LIST_MAX: u32 = 500;
/// Producer text in lists (exchange, keys, content type) is cut to this many characters.
const TEXT_MAX: i32 = 1024;
/// `last_error` is cut to this many characters.
const ERROR_MAX: i32 = 4096;
/// Most payload bytes one payload read returns.
pub const PAYLOAD_MAX: i32 = 1024 * 1024;
/// Headers larger than this (as JSON text) are withheld from a payload read.
pub const HEADERS_MAX: i32 = 64 * 1024;

/// Why the admin pools could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminDbError {
    /// `database.url` could not be turned into an admin URL.
    #[error("cannot derive the admin connection URL from database.url: {0}")]
    Url(#[from] url::ParseError),
    /// The pool could not connect.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The admin API's pools: `api` (`admin.pool_size` connections) for every endpoint, and
/// `probe` (one connection) for `/ready`, so readiness never waits behind a slow query.
#[derive(Clone, Debug)]
pub struct AdminDb {
    api: Store,
    probe: Store,
}

/// The outbox and dead-letter counts the admin API shows, and which of them are estimates.
#[derive(Debug, Clone, Default)]
pub struct AdminStats {
    /// Counts (`failed` is not counted: the engine never leaves a row in it).
    pub stats: Stats,
    /// Keys of `stats.outbox` (and `dead_letters`) whose number is an estimate.
    pub approximate: Vec<&'static str>,
}

/// One dead letter without its payload and headers (which only a token may read).
#[derive(Debug, Clone, QueryableByName, serde::Serialize)]
pub struct DeadLetterSummary {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    exchange: String,
    #[diesel(sql_type = Text)]
    routing_key: String,
    #[diesel(sql_type = Nullable<Text>)]
    content_type: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    max_attempts: Option<i32>,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    /// `None`: a value chrono cannot hold (`infinity`, beyond year 99999), written by the
    /// producer; one such row must not make the whole list fail.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    failed_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Text>)]
    ordering_key: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
    /// Size of the payload (the payload itself is not here).
    #[diesel(sql_type = BigInt)]
    payload_bytes: i64,
}

/// A dead letter's payload and headers, bounded by [`PAYLOAD_MAX`] and [`HEADERS_MAX`].
#[derive(Debug, Clone)]
pub struct DeadLetterPayload {
    /// The dead letter (the outbox row's id, the AMQP `message_id`).
    pub id: Uuid,
    /// The first [`PAYLOAD_MAX`] bytes.
    pub payload: Vec<u8>,
    /// The whole payload's size.
    pub payload_bytes: i64,
    /// The headers, unless larger than [`HEADERS_MAX`]: a JSON object, or the raw JSON
    /// text as a string when serde cannot read it (e.g. `1e400`, very deep nesting).
    pub headers: Option<serde_json::Value>,
    /// The AMQP `content_type` it was written with, if any.
    pub content_type: Option<String>,
}

/// The payload row as read: headers as text, so nothing in it can fail to decode.
#[derive(QueryableByName)]
struct PayloadRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Bytea)]
    payload: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    payload_bytes: i64,
    #[diesel(sql_type = Nullable<Text>)]
    headers: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    content_type: Option<String>,
}

impl From<PayloadRow> for DeadLetterPayload {
    fn from(r: PayloadRow) -> Self {
        DeadLetterPayload {
            id: r.id,
            payload: r.payload,
            payload_bytes: r.payload_bytes,
            headers: r.headers.map(crate::store::headers_from_text),
            content_type: r.content_type,
        }
    }
}

impl AdminDb {
    /// Opens the admin pools on `db.url` with the admin settings (one connection is made
    /// at once, so a bad URL fails here).
    pub async fn connect(
        db: &DatabaseConfig,
        admin: &AdminConfig,
    ) -> Result<AdminDb, AdminDbError> {
        let url = super::conn_url::admin_url(&db.url, admin.statement_timeout)?;
        let api = DatabaseConfig {
            url: url.clone(),
            pool_size: admin.pool_size,
            ..db.clone()
        };
        let probe = DatabaseConfig {
            url,
            pool_size: 1,
            ..db.clone()
        };
        Ok(AdminDb {
            api: Store::connect(&api).await?,
            probe: Store::connect(&probe).await?,
        })
    }

    /// The named store operations (requeue, discard) on the admin pool.
    pub fn store(&self) -> &Store {
        &self.api
    }

    /// `SELECT 1` on the probe connection: the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        #[derive(QueryableByName)]
        struct One {
            #[diesel(sql_type = Integer)]
            #[allow(dead_code)]
            one: i32,
        }
        let mut conn = self.probe.op().await?;
        let _: One = conn.fetch_one(diesel::sql_query("SELECT 1 AS one")).await?;
        Ok(())
    }

    /// Bounded counts and the oldest open row's age (see the module doc).
    pub async fn stats(&self) -> Result<AdminStats, StoreError> {
        #[derive(QueryableByName)]
        struct Row {
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
        let s = format!("\"{}\"", self.api.schema());
        let schema = self.api.schema();
        // Each count reads at most $1 entries of one partial index (or of the table);
        // the oldest age reads the $1 earliest-due entries of each open-row index, so it is
        // exact while fewer than $1 rows are open per index (a producer's `-infinity`
        // created_at is skipped: it would overflow the interval).
        let bounded = |filter: &str, table: &str| {
            format!("(SELECT count(*) FROM (SELECT 1 FROM {s}.{table} WHERE {filter} LIMIT $1) t)")
        };
        let sql = format!(
            "SELECT {} AS pending, {} AS pending_keyed, {} AS retrying, {} AS retrying_keyed,
                    {} AS in_flight, {} AS confirmed, {} AS dead_letters,
                    (SELECT reltuples FROM pg_class
                     WHERE oid = to_regclass('\"{schema}\".outbox_confirmed_idx'))::float8
                        AS confirmed_estimate,
                    (SELECT reltuples FROM pg_class
                     WHERE oid = to_regclass('\"{schema}\".dead_letters'))::float8
                        AS dead_letters_estimate,
                    EXTRACT(EPOCH FROM now() - least(
                      (SELECT min(created_at) FILTER (WHERE isfinite(created_at))
                         FROM (SELECT created_at FROM {s}.outbox
                         WHERE status IN ('pending', 'retrying') AND ordering_key IS NULL
                         ORDER BY next_attempt_at LIMIT $1) a),
                      (SELECT min(created_at) FILTER (WHERE isfinite(created_at))
                         FROM (SELECT created_at FROM {s}.outbox
                         WHERE status IN ('pending', 'retrying') AND ordering_key IS NOT NULL
                         ORDER BY next_attempt_at LIMIT $1) b),
                      (SELECT min(created_at) FILTER (WHERE isfinite(created_at))
                         FROM (SELECT created_at FROM {s}.outbox
                         WHERE status = 'in_flight' ORDER BY locked_until LIMIT $1) c)
                    ))::float8 AS oldest_age",
            bounded("status = 'pending' AND ordering_key IS NULL", "outbox"),
            bounded("status = 'pending' AND ordering_key IS NOT NULL", "outbox"),
            bounded("status = 'retrying' AND ordering_key IS NULL", "outbox"),
            bounded("status = 'retrying' AND ordering_key IS NOT NULL", "outbox"),
            bounded("status = 'in_flight'", "outbox"),
            bounded("status = 'confirmed'", "outbox"),
            bounded("true", "dead_letters"),
        );
        let mut conn = self.api.op().await?;
        let r: Row = conn
            .fetch_one(diesel::sql_query(sql).bind::<BigInt, _>(EXACT_UP_TO))
            .await?;
        let mut approximate = Vec::new();
        let mut exact_or_lower_bound = |name: &'static str, parts: &[i64]| {
            if parts.iter().any(|n| *n >= EXACT_UP_TO) {
                approximate.push(name);
            }
            parts.iter().sum::<i64>()
        };
        let pending = exact_or_lower_bound("pending", &[r.pending, r.pending_keyed]);
        let retrying = exact_or_lower_bound("retrying", &[r.retrying, r.retrying_keyed]);
        let in_flight = exact_or_lower_bound("in_flight", &[r.in_flight]);
        let confirmed = exact_or_estimate(r.confirmed, r.confirmed_estimate);
        let dead_letters = exact_or_estimate(r.dead_letters, r.dead_letters_estimate);
        if r.confirmed >= EXACT_UP_TO {
            approximate.push("confirmed");
        }
        if r.dead_letters >= EXACT_UP_TO {
            approximate.push("dead_letters");
        }
        let outbox: BTreeMap<String, i64> = [
            ("pending", pending),
            ("in_flight", in_flight),
            ("confirmed", confirmed),
            ("retrying", retrying),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(AdminStats {
            stats: Stats {
                outbox,
                dead_letters,
                oldest_pending_age: r
                    .oldest_age
                    .filter(|a| a.is_finite())
                    .map(|a| Duration::from_secs_f64(a.max(0.0))),
            },
            approximate,
        })
    }

    /// Dead letters without payloads, newest first, failed within `since` (all when
    /// `None`), at most `limit` (callers keep it within [`LIST_MAX`]).
    pub async fn dead_letters(
        &self,
        since: Option<Duration>,
        limit: u32,
    ) -> Result<Vec<DeadLetterSummary>, StoreError> {
        let sql = format!(
            "SELECT {} FROM \"{}\".dead_letters
             WHERE ($1::bigint IS NULL OR failed_at >= now() - $1 * interval '1 millisecond')
             ORDER BY failed_at DESC, id LIMIT $2",
            summary_columns(),
            self.api.schema()
        );
        let mut conn = self.api.op().await?;
        Ok(conn
            .fetch_all(
                diesel::sql_query(sql)
                    .bind::<Nullable<BigInt>, _>(since.map(millis))
                    .bind::<BigInt, _>(i64::from(limit.min(LIST_MAX))),
            )
            .await?)
    }

    /// One dead letter without its payload.
    pub async fn dead_letter(&self, id: Uuid) -> Result<Option<DeadLetterSummary>, StoreError> {
        let sql = format!(
            "SELECT {} FROM \"{}\".dead_letters WHERE id = $1",
            summary_columns(),
            self.api.schema()
        );
        let mut conn = self.api.op().await?;
        let rows: Vec<DeadLetterSummary> = conn
            .fetch_all(diesel::sql_query(sql).bind::<diesel::sql_types::Uuid, _>(id))
            .await?;
        Ok(rows.into_iter().next())
    }

    /// One dead letter's payload (its first [`PAYLOAD_MAX`] bytes) and headers.
    pub async fn payload(&self, id: Uuid) -> Result<Option<DeadLetterPayload>, StoreError> {
        let sql = format!(
            "SELECT id, substring(payload FROM 1 FOR $2) AS payload,
                    octet_length(payload)::bigint AS payload_bytes,
                    CASE WHEN octet_length(headers::text) <= $3 THEN headers::text END
                        AS headers,
                    content_type
             FROM \"{}\".dead_letters WHERE id = $1",
            self.api.schema()
        );
        let mut conn = self.api.op().await?;
        let rows: Vec<PayloadRow> = conn
            .fetch_all(
                diesel::sql_query(sql)
                    .bind::<diesel::sql_types::Uuid, _>(id)
                    .bind::<Integer, _>(PAYLOAD_MAX)
                    .bind::<Integer, _>(HEADERS_MAX),
            )
            .await?;
        Ok(rows.into_iter().next().map(DeadLetterPayload::from))
    }
}

/// The list columns: producer text cut to a bounded length, the payload as its size.
fn summary_columns() -> String {
    format!(
        "id, left(exchange, {TEXT_MAX}) AS exchange, left(routing_key, {TEXT_MAX}) AS routing_key,
         left(content_type, {TEXT_MAX}) AS content_type, max_attempts, attempts,
         left(last_error, {ERROR_MAX}) AS last_error,
         CASE WHEN isfinite(created_at) AND created_at < '100000-01-01' THEN created_at END
             AS created_at,
         failed_at,
         left(ordering_key, {TEXT_MAX}) AS ordering_key, seq,
         octet_length(payload)::bigint AS payload_bytes"
    )
}

/// An exact count below the bound; at or above it, the larger of the bound and the
/// planner's estimate (`reltuples` is -1 or 0 before the first ANALYZE).
fn exact_or_estimate(counted: i64, estimate: Option<f64>) -> i64 {
    if counted < EXACT_UP_TO {
        return counted;
    }
    let estimate = estimate.filter(|e| e.is_finite()).unwrap_or(0.0);
    counted.max(estimate as i64)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_the_bound_use_the_estimate() {
        assert_eq!(exact_or_estimate(12, Some(50_000.0)), 12);
        assert_eq!(exact_or_estimate(EXACT_UP_TO, Some(50_000.0)), 50_000);
        assert_eq!(exact_or_estimate(EXACT_UP_TO, Some(-1.0)), EXACT_UP_TO);
    }
}
