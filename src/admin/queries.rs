//! The admin API's database access: its own small pools, never the engine's, and the
//! statements only the admin API runs, each beside the function that binds it.
//!
//! Every admin connection is opened with `application_name=courier-admin` ([`super::conn_url`]),
//! and every admin statement runs in a transaction that first sets `statement_timeout` to
//! `admin.statement_timeout` ([`Store::with_statement_timeout`]), so no admin query can run
//! longer than that, and the engine's claims, confirms and lease renewals never wait behind
//! an operator's browser. Set per transaction, it holds behind PgBouncer in either mode.
//! Counts are the store's bounded ones ([`crate::store::Store::stats`]): they cost the same
//! whatever history the outbox holds.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::{
    sql_types::{BigInt, Bytea, Integer, Nullable, Text, Timestamptz},
    QueryableByName,
};
use uuid::Uuid;

use crate::{
    config::{AdminConfig, DatabaseConfig},
    store::{millis, Stats, Store, StoreError},
};

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
/// How long the readiness probe's `SELECT 1` may go unanswered before its connection is
/// given up: under `/ready`'s own bound of two seconds, so the connection goes first.
const PROBE_BOUND: Duration = Duration::from_millis(1500);

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
///
/// The probe's statement is bounded below `/ready`'s own two seconds (see `AdminDb::new`).
#[derive(Clone, Debug)]
pub struct AdminDb {
    api: Store,
    probe: Store,
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
        let url = super::conn_url::admin_url(&db.url)?;
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
            api: Store::connect(&api)
                .await?
                .with_statement_timeout(admin.statement_timeout),
            // A statement left unanswered gives its connection up (a frozen server): the
            // next probe connects again, to the next host of a multi-host URL, instead of
            // asking the same dead connection for ever.
            probe: Store::connect(&probe)
                .await?
                .with_statement_timeout(admin.statement_timeout)
                .bounded(PROBE_BOUND),
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

    /// Bounded counts and the oldest open row's age (see the module doc), on the admin
    /// pool.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.api.stats().await
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
