//! The database layer: the connection pool and every named operation on the outbox.
//!
//! The Store actor (in `actors/store.rs`) owns one [`Store`]; the CLI and tests use it
//! directly. All SQL text lives in [`sql`]; this file binds parameters and maps rows.
//! Every operation works on a bounded batch: the engine never loads the whole table.

mod connect;
mod engines;
mod enqueue;
mod migrate;
mod op_conn;
pub mod sql;
mod tls;

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use chrono::{DateTime, Utc};
use diesel::{
    sql_types::{Array, BigInt, Bool, Bytea, Double, Integer, Nullable, Text, Timestamptz},
    QueryableByName,
};
use diesel_async::{
    pooled_connection::{deadpool::Pool, AsyncDieselConnectionManager, ManagerConfig},
    AsyncConnection, AsyncPgConnection, RunQueryDsl,
};
use uuid::Uuid;

pub(crate) use connect::take_query_keys;
use connect::PgTarget;
pub use engines::{beat, rescue, Beat, EngineRecord, Identity, Rescued};
pub(crate) use enqueue::insert_messages;
pub use migrate::{migrate, migrate_config, MIGRATION_NAMES};
pub use sql::Sql;

use crate::{
    config::{DatabaseConfig, Pooler, SecretUrl},
    message::OutboxMessage,
    state::{Status, ALL_STATUSES},
};

/// A database failure. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be made.
    #[error("cannot connect to PostgreSQL at {target}: {reason}")]
    Connect {
        /// The redacted URL that was tried.
        target: String,
        /// Why (refused, timed out, authentication…).
        reason: String,
    },
    /// PostgreSQL (or the TLS layer, or the URL itself) refused Courier for a reason no
    /// retry mends: a certificate problem, refused authentication, a missing database.
    #[error("PostgreSQL at {target} refused the connection: {reason}")]
    Rejected {
        /// The redacted URL that was tried.
        target: String,
        /// The whole cause chain.
        reason: String,
    },
    /// The pool could not hand out a connection.
    #[error("database pool: {0}")]
    Pool(String),
    /// A statement failed.
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The blocking task that runs the migrations panicked or was cancelled.
    #[error("migration failed: migration task failed: {0}")]
    MigrationTask(#[source] tokio::task::JoinError),
    /// The schema name is unusable.
    #[error("invalid schema name: {0}")]
    Schema(String),
}

impl StoreError {
    /// Errors that may pass (connection lost, pool exhausted): worth retrying.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect { .. } | StoreError::Pool(_) => true,
            StoreError::Query(diesel::result::Error::DatabaseError(kind, _)) => matches!(
                kind,
                diesel::result::DatabaseErrorKind::ClosedConnection
                    | diesel::result::DatabaseErrorKind::SerializationFailure
            ),
            _ => false,
        }
    }
}

/// Checks a schema name: a plain lower-case SQL identifier that leaves room for the NOTIFY
/// channel name (`<schema>.outbox`, 63 bytes at most).
pub fn check_schema_name(schema: &str) -> Result<(), String> {
    let mut chars = schema.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok {
        return Err(format!(
            "`{schema}` must start with a-z or _ and contain only a-z, 0-9 and _"
        ));
    }
    if schema.len() > 50 {
        return Err(format!("`{schema}` is longer than 50 bytes"));
    }
    Ok(())
}

/// A retry decision for one message, written in a batch by [`Store::mark_retrying`].
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

/// A dead-letter decision for one message, written by [`Store::move_to_dead_letters`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterUpdate {
    /// The row.
    pub id: Uuid,
    /// The final reason, stored in `dead_letters.last_error`.
    pub error: String,
}

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

/// A claimed row as read (see `sql::message_columns`): every column in a form that
/// cannot fail to decode, so one hostile row is set aside alone ([`ClaimedRow::decode`])
/// instead of failing its whole batch.
#[derive(QueryableByName)]
struct ClaimedRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    exchange: String,
    #[diesel(sql_type = Text)]
    routing_key: String,
    /// NULL when over `publisher.max_payload_bytes` (never fetched).
    #[diesel(sql_type = Nullable<Bytea>)]
    payload: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    payload_size: i64,
    /// The jsonb as text, parsed here row by row.
    #[diesel(sql_type = Text)]
    headers: String,
    #[diesel(sql_type = Nullable<Text>)]
    content_type: Option<String>,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Integer>)]
    max_attempts: Option<i32>,
    /// NULL when chrono cannot hold it (`infinity`, a year past 99999).
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
    /// The value as PostgreSQL prints it, only when `created_at` is NULL.
    #[diesel(sql_type = Nullable<Text>)]
    created_at_text: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    ordering_key: Option<String>,
    /// The byte budget left rows of this claim out (the same on every row).
    #[diesel(sql_type = Bool)]
    cut: bool,
}

/// A claimed row that can never be published, with the reason naming the column.
#[derive(Debug, Clone, PartialEq)]
struct Undecodable {
    id: Uuid,
    reason: String,
}

impl ClaimedRow {
    /// The message, or why this row can never be published (it is dead-lettered at once:
    /// no retry can change what the row holds).
    fn decode(self, max_payload: u64) -> Result<OutboxMessage, Undecodable> {
        let fail = |reason: String| Undecodable {
            id: self.id,
            reason,
        };
        let Some(payload) = self.payload else {
            return Err(fail(format!(
                "payload of {} bytes is over publisher.max_payload_bytes ({max_payload})",
                self.payload_size
            )));
        };
        let headers = serde_json::from_str(&self.headers)
            .map_err(|e| fail(format!("column headers cannot be read as JSON: {e}")))?;
        let Some(created_at) = self.created_at else {
            return Err(fail(format!(
                "column created_at is {}, outside the range Courier can read",
                self.created_at_text.as_deref().unwrap_or("unreadable")
            )));
        };
        Ok(OutboxMessage {
            id: self.id,
            exchange: self.exchange,
            routing_key: self.routing_key,
            payload,
            headers,
            content_type: self.content_type,
            // CHECK constraints keep these in range for new rows; a value read anyway
            // (an older row) is clamped rather than trusted.
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            max_attempts: self.max_attempts.and_then(|m| u32::try_from(m).ok()),
            created_at,
            ordering_key: self.ordering_key,
        })
    }
}

/// How much one claim may take: rows, and bytes of payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimits {
    /// Most rows.
    pub rows: u32,
    /// Most payload bytes (the first row is always taken, whatever its size).
    pub bytes: u64,
    /// `publisher.max_payload_bytes`: a larger payload is never fetched; its row is
    /// dead-lettered.
    pub max_payload: u64,
}

impl ClaimLimits {
    /// `rows` rows, no byte budget, no payload limit (tests and tools).
    pub fn rows(rows: u32) -> ClaimLimits {
        ClaimLimits {
            rows,
            bytes: i64::MAX as u64,
            max_payload: i64::MAX as u64,
        }
    }
}

/// How a claim walks the keys of keyed rows (see [`Store::claim_keyed`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyScan {
    /// Resume the round-robin walk over keys at this key (the last one served); `None`
    /// starts at the first key.
    pub after: Option<String>,
    /// A key whose head sits in `dead_letters` waits (`ordering.on_dead_letter: block`).
    pub block_on_dead_letter: bool,
}

/// What one claim returned.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    /// The claimed messages (keyed claims: at most one per key), ready to publish.
    pub messages: Vec<OutboxMessage>,
    /// Rows claimed that can never be published (a column Courier cannot read, a payload
    /// over the limit), already moved to `dead_letters`, with the reason.
    pub dead_lettered: Vec<(Uuid, String)>,
    /// The batch came back full: more rows may be ready right now.
    pub full: bool,
    /// Keyed claims: where the next claim should resume the walk over keys.
    pub next_key: Option<String>,
}

/// A row of `dead_letters`, for operators.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The message id (the AMQP `message_id` it was published with).
    pub id: Uuid,
    /// Target exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body.
    pub payload: Vec<u8>,
    /// Headers (JSON as the producer wrote them; the raw JSON text, as a string, when
    /// they cannot be read as JSON here, e.g. a number beyond `f64`).
    pub headers: serde_json::Value,
    /// Content type.
    pub content_type: Option<String>,
    /// Per-row attempt budget.
    pub max_attempts: Option<i32>,
    /// Attempts made.
    pub attempts: i32,
    /// Why it failed.
    pub last_error: Option<String>,
    /// When the producer committed it (`None`: a value Courier cannot read, such as
    /// `infinity`).
    pub created_at: Option<DateTime<Utc>>,
    /// When it was dead-lettered.
    pub failed_at: DateTime<Utc>,
    /// Its ordering key, if any (with `ordering.on_dead_letter: block` the key waits for
    /// an operator while this row is here).
    pub ordering_key: Option<String>,
    /// Its place in its key's order (kept by a requeue).
    pub seq: Option<i64>,
}

/// Headers read as text: the JSON, or the raw text as a JSON string when serde_json cannot
/// hold it (numbers beyond `f64` such as `1e400`, nesting deeper than 128), so what a
/// producer wrote is always shown, never an error.
pub(crate) fn headers_from_text(text: String) -> serde_json::Value {
    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
}

/// A dead letter as read (see `sql::DEAD_LETTER_COLUMNS`): nothing in it can fail to decode.
#[derive(QueryableByName)]
struct DeadLetterRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    exchange: String,
    #[diesel(sql_type = Text)]
    routing_key: String,
    #[diesel(sql_type = Bytea)]
    payload: Vec<u8>,
    #[diesel(sql_type = Text)]
    headers: String,
    #[diesel(sql_type = Nullable<Text>)]
    content_type: Option<String>,
    #[diesel(sql_type = Nullable<Integer>)]
    max_attempts: Option<i32>,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    created_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Timestamptz)]
    failed_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Text>)]
    ordering_key: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    seq: Option<i64>,
}

impl From<DeadLetterRow> for DeadLetter {
    fn from(r: DeadLetterRow) -> Self {
        let headers = headers_from_text(r.headers);
        DeadLetter {
            id: r.id,
            exchange: r.exchange,
            routing_key: r.routing_key,
            payload: r.payload,
            headers,
            content_type: r.content_type,
            max_attempts: r.max_attempts,
            attempts: r.attempts,
            last_error: r.last_error,
            created_at: r.created_at,
            failed_at: r.failed_at,
            ordering_key: r.ordering_key,
            seq: r.seq,
        }
    }
}

impl DeadLetter {
    /// The payload as text when it is UTF-8.
    pub fn payload_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// A JSON view for APIs: payload as text when UTF-8, always also base64.
    pub fn to_json(&self) -> serde_json::Value {
        use base64::Engine as _;
        serde_json::json!({
            "id": self.id,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "payload_text": self.payload_text(),
            "payload_base64": base64::engine::general_purpose::STANDARD.encode(&self.payload),
            "headers": self.headers,
            "content_type": self.content_type,
            "max_attempts": self.max_attempts,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "failed_at": self.failed_at,
            "ordering_key": self.ordering_key,
            "seq": self.seq,
        })
    }
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
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

/// A final outcome: delivered, or parked for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The broker confirmed it (recorded `confirmed`).
    Confirmed,
    /// It is in `dead_letters`, with the reason.
    DeadLettered(String),
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
struct AgeRow {
    #[diesel(sql_type = Nullable<Double>)]
    age: Option<f64>,
}

impl AgeRow {
    /// Seconds as a duration; none for NULL or a non-finite value (a producer's
    /// `-infinity` `created_at` makes an infinite age).
    fn duration(self) -> Option<Duration> {
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

/// The connection pool plus the schema's statements. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool<AsyncPgConnection>,
    sql: std::sync::Arc<Sql>,
    url: SecretUrl,
    connect_timeout: Duration,
    /// Every statement in its own transaction (`database.pooler: transaction`).
    per_statement_tx: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("schema", &self.sql.schema)
            .finish()
    }
}

/// Opens one connection outside any pool (LISTEN, migrations), bounded by `timeout`.
pub async fn establish(
    url: &SecretUrl,
    timeout: Duration,
) -> Result<AsyncPgConnection, StoreError> {
    connect::open(&PgTarget::parse(url)?, timeout).await
}

/// Removes the URL and its secrets from a driver message, should it quote them.
fn scrub(message: &str, url: &SecretUrl) -> String {
    url.scrub(message)
}

impl Store {
    /// Builds the pool and checks that one connection can be made.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        check_schema_name(&cfg.schema).map_err(StoreError::Schema)?;
        let target = PgTarget::parse(&cfg.url)?;
        // The first connection is made outside the pool, so that a permanent refusal
        // (TLS, authentication, missing database) comes back as such.
        drop(connect::open(&target, cfg.connect_timeout).await?);
        let timeout = cfg.connect_timeout;
        let mut manager_config = ManagerConfig::default();
        manager_config.custom_setup = Box::new(move |_url| {
            let target = target.clone();
            Box::pin(async move {
                connect::open(&target, timeout)
                    .await
                    .map_err(|e| diesel::ConnectionError::BadConnection(e.to_string()))
            })
        });
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
            cfg.url.expose(),
            manager_config,
        );
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size as usize)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let store = Store {
            pool,
            sql: std::sync::Arc::new(Sql::new(&cfg.schema)),
            url: cfg.url.clone(),
            connect_timeout: cfg.connect_timeout,
            per_statement_tx: cfg.pooler == Pooler::Transaction,
        };
        Ok(store)
    }

    /// The schema's statements.
    pub fn sql(&self) -> &Sql {
        &self.sql
    }

    /// The schema name.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// The (secret) database URL, for opening dedicated connections.
    pub fn url(&self) -> &SecretUrl {
        &self.url
    }

    /// A pooled connection, bounded by the connect timeout.
    pub async fn conn(
        &self,
    ) -> Result<diesel_async::pooled_connection::deadpool::Object<AsyncPgConnection>, StoreError>
    {
        match tokio::time::timeout(self.connect_timeout, self.pool.get()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(StoreError::Connect {
                target: self.url.redacted(),
                reason: scrub(&e.to_string(), &self.url),
            }),
            Err(_) => Err(StoreError::Connect {
                target: self.url.redacted(),
                reason: format!(
                    "no connection within {}",
                    humantime::format_duration(self.connect_timeout)
                ),
            }),
        }
    }

    /// A pooled connection for one operation (see [`op_conn`]).
    pub(crate) async fn op(&self) -> Result<op_conn::OpConn, StoreError> {
        Ok(op_conn::OpConn::new(
            self.conn().await?,
            self.per_statement_tx,
        ))
    }

    /// Claims up to `limit` rows for `engine` with a lease of `lease` (no byte budget):
    /// see [`claim_due`](Self::claim_due). Returns the messages ready to publish.
    pub async fn claim(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        Ok(self
            .claim_due(engine, ClaimLimits::rows(limit), lease)
            .await?
            .messages)
    }

    /// Claims rows for `engine` with a lease of `lease`, within `limits`: rows whose lease
    /// expired (keyed or not), then unkeyed due rows, oldest first. Sets `in_flight`,
    /// `locked_by`, `locked_until` and counts the attempt. Rows that can never be published
    /// are dead-lettered at once (see [`Claimed::dead_lettered`]). Keyed rows:
    /// [`claim_keyed`](Self::claim_keyed).
    pub async fn claim_due(
        &self,
        engine: &str,
        limits: ClaimLimits,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<ClaimedRow> = conn
            .fetch_all(
                diesel::sql_query(&self.sql.claim)
                    .bind::<BigInt, _>(i64::from(limits.rows))
                    .bind::<Text, _>(engine)
                    .bind::<BigInt, _>(millis(lease))
                    .bind::<BigInt, _>(clamp_i64(limits.max_payload))
                    .bind::<BigInt, _>(clamp_i64(limits.bytes)),
            )
            .await?;
        drop(conn);
        let mut claimed = self.sort_out(engine, rows, limits).await;
        claimed.messages.sort_by_key(|m| m.created_at);
        Ok(claimed)
    }

    /// Claims up to `limit` keyed rows for `engine` (no byte budget): see
    /// [`claim_keyed_within`](Self::claim_keyed_within).
    pub async fn claim_keyed(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
        keys: &KeyScan,
    ) -> Result<Claimed, StoreError> {
        self.claim_keyed_within(engine, ClaimLimits::rows(limit), lease, keys)
            .await
    }

    /// Claims keyed rows for `engine` within `limits`: the due head of each key that has
    /// nothing in flight (nor, with `keys.block_on_dead_letter`, a dead letter), walking the
    /// keys round-robin from `keys.after`.
    pub async fn claim_keyed_within(
        &self,
        engine: &str,
        limits: ClaimLimits,
        lease: Duration,
        keys: &KeyScan,
    ) -> Result<Claimed, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<ClaimedRow> = conn
            .fetch_all(
                diesel::sql_query(&self.sql.claim_keyed)
                    .bind::<BigInt, _>(i64::from(limits.rows))
                    .bind::<Text, _>(engine)
                    .bind::<BigInt, _>(millis(lease))
                    .bind::<Text, _>(keys.after.as_deref().unwrap_or(""))
                    .bind::<Bool, _>(keys.block_on_dead_letter)
                    .bind::<BigInt, _>(clamp_i64(limits.max_payload))
                    .bind::<BigInt, _>(clamp_i64(limits.bytes)),
            )
            .await?;
        drop(conn);
        let served: Vec<&str> = rows
            .iter()
            .filter_map(|r| r.ordering_key.as_deref())
            .collect();
        let next_key = next_key(keys.after.as_deref(), &served).or(keys.after.clone());
        let mut claimed = self.sort_out(engine, rows, limits).await;
        claimed.next_key = next_key;
        Ok(claimed)
    }

    /// Decodes the rows a claim within `limits` returned, one by one, and dead-letters those
    /// that can never be published; the claim is full when it filled its rows or the byte
    /// budget left rows out. If the move fails (the database went away), those rows are
    /// simply not handed on: this engine never renews their lease, so they come back once
    /// it expires and are moved then.
    async fn sort_out(&self, engine: &str, rows: Vec<ClaimedRow>, limits: ClaimLimits) -> Claimed {
        let mut claimed = Claimed {
            full: rows.len() == limits.rows as usize || rows.iter().any(|r| r.cut),
            ..Claimed::default()
        };
        let mut bad = Vec::new();
        for row in rows {
            match row.decode(limits.max_payload) {
                Ok(m) => claimed.messages.push(m),
                Err(u) => bad.push(DeadLetterUpdate {
                    id: u.id,
                    error: u.reason,
                }),
            }
        }
        if bad.is_empty() {
            return claimed;
        }
        match self.move_to_dead_letters(engine, &bad).await {
            Ok(moved) => {
                let moved: std::collections::HashSet<Uuid> = moved.into_iter().collect();
                claimed.dead_lettered = bad
                    .into_iter()
                    .filter(|u| moved.contains(&u.id))
                    .map(|u| (u.id, u.error))
                    .collect();
            }
            Err(e) => tracing::warn!(
                error = %e,
                rows = bad.len(),
                "could not dead-letter unreadable rows; they return when their lease expires"
            ),
        }
        claimed
    }

    /// Extends the lease of rows `engine` still holds. Returns how many it still held.
    pub async fn renew_leases(
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
            .run(
                diesel::sql_query(&self.sql.renew)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
                    .bind::<Text, _>(engine)
                    .bind::<BigInt, _>(millis(lease)),
            )
            .await?)
    }

    /// Gives back every row `engine` still holds (shutdown): due again at once, attempt
    /// refunded. Returns how many.
    pub async fn release_all(&self, engine: &str) -> Result<usize, StoreError> {
        let mut conn = self.op().await?;
        Ok(conn
            .run(diesel::sql_query(&self.sql.release_all).bind::<Text, _>(engine))
            .await?)
    }

    /// Marks a batch `confirmed` (one statement). Returns the rows changed.
    pub async fn mark_confirmed(&self, ids: &[Uuid]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.op().await?;
        Ok(conn
            .run(
                diesel::sql_query(&self.sql.confirm).bind::<Array<diesel::sql_types::Uuid>, _>(ids),
            )
            .await?)
    }

    /// Marks a batch `retrying` with `next_attempt_at` and `last_error` (one statement),
    /// for rows `engine` still holds.
    pub async fn mark_retrying(
        &self,
        engine: &str,
        updates: &[RetryUpdate],
    ) -> Result<usize, StoreError> {
        if updates.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = updates.iter().map(|u| u.id).collect();
        let delays: Vec<i64> = updates.iter().map(|u| millis(u.delay)).collect();
        let errors: Vec<String> = updates.iter().map(|u| u.error.clone()).collect();
        let refunds: Vec<bool> = updates.iter().map(|u| u.refund).collect();
        let mut conn = self.op().await?;
        Ok(conn
            .run(
                diesel::sql_query(&self.sql.retry)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
                    .bind::<Array<BigInt>, _>(delays)
                    .bind::<Array<Text>, _>(errors)
                    .bind::<Array<Bool>, _>(refunds)
                    .bind::<Text, _>(engine),
            )
            .await?)
    }

    /// Gives back rows `engine` claimed but never published: they are due again at once and
    /// the attempt is not counted.
    pub async fn release(&self, engine: &str, ids: &[Uuid]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.op().await?;
        Ok(conn
            .run(
                diesel::sql_query(&self.sql.release)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
                    .bind::<Text, _>(engine),
            )
            .await?)
    }

    /// Moves failed rows `engine` holds to `dead_letters`, in one transaction, with their
    /// final error. Returns the ids moved.
    pub async fn move_to_dead_letters(
        &self,
        engine: &str,
        updates: &[DeadLetterUpdate],
    ) -> Result<Vec<Uuid>, StoreError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = updates.iter().map(|u| u.id).collect();
        let errors: Vec<String> = updates.iter().map(|u| u.error.clone()).collect();
        let sql = &self.sql;
        let mut conn = self.op().await?;
        let rows: Vec<IdRow> = conn
            .transaction::<_, diesel::result::Error, _>(async |tx| {
                diesel::sql_query(&sql.supersede_dead_letters)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(&ids)
                    .bind::<Text, _>(engine)
                    .execute(tx)
                    .await?;
                diesel::sql_query(&sql.dead_letter)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(&ids)
                    .bind::<Array<Text>, _>(&errors)
                    .bind::<Text, _>(engine)
                    .load(tx)
                    .await
            })
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Moves dead letters back to the outbox as `pending` with `attempts = 0`, in one
    /// transaction. Returns the ids moved (unknown ids are simply absent).
    pub async fn requeue_dead_letters(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.op().await?;
        let rows: Vec<IdRow> = conn
            .fetch_all(
                diesel::sql_query(&self.sql.requeue).bind::<Array<diesel::sql_types::Uuid>, _>(ids),
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Enqueues one message on a pooled connection (outside any application transaction).
    /// Applications use [`enqueue`](crate::enqueue) inside their own transaction instead.
    pub async fn enqueue(&self, message: &OutboxMessage) -> Result<(), StoreError> {
        self.enqueue_many(std::slice::from_ref(message)).await
    }

    /// Enqueues many messages in one statement.
    pub async fn enqueue_many(&self, messages: &[OutboxMessage]) -> Result<(), StoreError> {
        let mut conn = self.op().await?;
        conn.begin().await?;
        let inserted = insert_messages(&mut conn, self.schema(), messages).await;
        conn.end(inserted).await
    }

    /// Counts by status, dead letters, and the oldest undelivered row's age.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let mut conn = self.op().await?;
        let counts: Vec<CountRow> = conn.fetch_all(diesel::sql_query(&self.sql.counts)).await?;
        let mut outbox: BTreeMap<String, i64> = ALL_STATUSES
            .iter()
            .map(|s| (s.as_str().to_string(), 0))
            .collect();
        for row in counts {
            outbox.insert(row.status, row.n);
        }
        let dead: TotalRow = conn
            .fetch_one(diesel::sql_query(&self.sql.dead_letter_count))
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
            .fetch_one(diesel::sql_query(&self.sql.oldest_pending))
            .await?;
        Ok(age.duration())
    }

    /// The final outcomes reached so far by any of `ids` (ids still on their way are absent).
    pub async fn outcomes(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Outcome>, StoreError> {
        let mut out = HashMap::new();
        let mut conn = self.op().await?;
        for chunk in ids.chunks(10_000) {
            let rows: Vec<OutcomeRow> = conn
                .fetch_all(
                    diesel::sql_query(&self.sql.outcomes)
                        .bind::<Array<diesel::sql_types::Uuid>, _>(chunk),
                )
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

    /// Deletes (or, with `archive`, moves to `outbox_archive`) up to `limit` rows confirmed
    /// more than `older_than` ago. Returns how many.
    pub async fn purge_confirmed(
        &self,
        older_than: Duration,
        limit: u32,
        archive: bool,
    ) -> Result<usize, StoreError> {
        let mut conn = self.op().await?;
        let sql = if archive {
            &self.sql.archive_confirmed
        } else {
            &self.sql.purge_confirmed
        };
        Ok(conn
            .run(
                diesel::sql_query(sql)
                    .bind::<BigInt, _>(millis(older_than))
                    .bind::<BigInt, _>(i64::from(limit)),
            )
            .await?)
    }

    /// How long until the earliest row that is not due yet becomes due (`None`: none).
    pub async fn next_due(&self) -> Result<Option<Duration>, StoreError> {
        let mut conn = self.op().await?;
        let row: AgeRow = conn
            .fetch_one(diesel::sql_query(&self.sql.next_due))
            .await?;
        Ok(row.duration())
    }

    /// Runs a plain `VACUUM` on the outbox (after retention removed rows).
    pub async fn vacuum_outbox(&self) -> Result<(), StoreError> {
        use diesel_async::SimpleAsyncConnection;
        let mut conn = self.op().await?;
        conn.batch_execute(&self.sql.vacuum).await?;
        Ok(())
    }

    /// Dead letters, newest first, failed within `since` (all when `None`).
    pub async fn dead_letters(
        &self,
        since: Option<Duration>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<DeadLetterRow> = conn
            .fetch_all(
                diesel::sql_query(&self.sql.dead_letter_list)
                    .bind::<Nullable<BigInt>, _>(since.map(millis))
                    .bind::<BigInt, _>(i64::from(limit)),
            )
            .await?;
        Ok(rows.into_iter().map(DeadLetter::from).collect())
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: Uuid) -> Result<Option<DeadLetter>, StoreError> {
        let mut conn = self.op().await?;
        let row: Option<DeadLetterRow> = conn
            .fetch_one(
                diesel::sql_query(&self.sql.dead_letter_show)
                    .bind::<diesel::sql_types::Uuid, _>(id),
            )
            .await
            .map(Some)
            .or_else(not_found_is_none)?;
        Ok(row.map(DeadLetter::from))
    }

    /// Ids of dead letters, all or those of one exchange (for "requeue --all").
    pub async fn dead_letter_ids(&self, exchange: Option<&str>) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<IdRow> = conn
            .fetch_all(
                diesel::sql_query(&self.sql.dead_letter_ids).bind::<Nullable<Text>, _>(exchange),
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Deletes dead letters for good. Returns the ids deleted (unknown ids are absent).
    pub async fn discard_dead_letters(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<IdRow> = conn
            .fetch_all(
                diesel::sql_query(&self.sql.dead_letter_discard)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids),
            )
            .await?;
        drop(conn);
        self.wake_after_discard(rows.len()).await;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Deletes dead letters that failed more than `older_than` ago.
    pub async fn discard_dead_letters_older_than(
        &self,
        older_than: Duration,
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<IdRow> = conn
            .fetch_all(
                diesel::sql_query(&self.sql.dead_letter_discard_older)
                    .bind::<BigInt, _>(millis(older_than)),
            )
            .await?;
        drop(conn);
        self.wake_after_discard(rows.len()).await;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Commit→confirmed latency percentiles (p50, p99) in milliseconds over `ids`, from
    /// the database's own timestamps (`created_at` → `confirmed_at`).
    pub async fn latency_of(&self, ids: &[Uuid]) -> Result<Option<(f64, f64)>, StoreError> {
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
                diesel::sql_query(&self.sql.latency_of)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids),
            )
            .await?;
        Ok(r.p50.zip(r.p99))
    }

    /// Confirmed rows by the engine that published them (`locked_by` is kept on confirm).
    pub async fn publishers_of_confirmed(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<CountRow> = conn
            .fetch_all(diesel::sql_query(&self.sql.publishers))
            .await?;
        Ok(rows.into_iter().map(|r| (r.status, r.n)).collect())
    }

    /// Sends a NOTIFY on the outbox channel with `payload` (the listener's self-check).
    pub async fn notify(&self, payload: &str) -> Result<(), StoreError> {
        let mut conn = self.op().await?;
        conn.run(diesel::sql_query(&self.sql.notify).bind::<Text, _>(payload))
            .await?;
        Ok(())
    }

    /// A discarded dead letter may unblock its key (`ordering.on_dead_letter: block`):
    /// wake the engines now rather than at their next sweep. The rows are gone already, so
    /// a failure here is only logged.
    async fn wake_after_discard(&self, discarded: usize) {
        if discarded > 0 {
            if let Err(e) = self.notify("keyed").await {
                tracing::debug!(error = %e, "could not notify the engines after a discard");
            }
        }
    }

    /// Where one message is now, or `None` if it is in neither table.
    pub async fn message_state(&self, id: Uuid) -> Result<Option<MessageState>, StoreError> {
        let mut conn = self.op().await?;
        let row: Option<StatusRow> = conn
            .fetch_one(
                diesel::sql_query(&self.sql.outbox_status_of)
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
                diesel::sql_query(&self.sql.dead_letter_of).bind::<diesel::sql_types::Uuid, _>(id),
            )
            .await
            .map(Some)
            .or_else(not_found_is_none)?;
        Ok(dead.map(|r| MessageState::DeadLettered(r.last_error)))
    }
}

fn not_found_is_none<T>(e: diesel::result::Error) -> Result<Option<T>, diesel::result::Error> {
    match e {
        diesel::result::Error::NotFound => Ok(None),
        other => Err(other),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The last key a claim served, in the order the claim walks keys: those after `after` up
/// to the end, then from the start up to `after` itself (byte order, as the `"C"` collation
/// compares).
fn next_key(after: Option<&str>, served: &[&str]) -> Option<String> {
    let after = after.unwrap_or("");
    let (wrapped, ahead): (Vec<&str>, Vec<&str>) = served.iter().partition(|k| **k <= after);
    wrapped
        .into_iter()
        .max()
        .or_else(|| ahead.into_iter().max())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::{next_key, ClaimedRow};

    fn row(headers: &str) -> ClaimedRow {
        ClaimedRow {
            id: uuid::Uuid::nil(),
            exchange: "x".into(),
            routing_key: "k".into(),
            payload: Some(b"p".to_vec()),
            payload_size: 1,
            headers: headers.into(),
            content_type: None,
            attempts: 1,
            max_attempts: None,
            created_at: Some(chrono::Utc::now()),
            created_at_text: None,
            ordering_key: None,
            cut: false,
        }
    }

    #[test]
    fn a_row_that_cannot_be_read_names_the_column() {
        assert!(row(r#"{"a": 1}"#).decode(10).is_ok());
        let why = |r: ClaimedRow| r.decode(10).unwrap_err().reason;
        assert!(why(row(r#"{"n": 1e400}"#)).contains("column headers"));
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(why(row(&deep)).contains("column headers"));
        let mut r = row("{}");
        r.created_at = None;
        r.created_at_text = Some("infinity".into());
        assert!(why(r).contains("column created_at is infinity"));
        let mut r = row("{}");
        r.payload = None;
        r.payload_size = 4096;
        assert!(why(r).contains("payload of 4096 bytes is over publisher.max_payload_bytes (10)"));
    }

    #[test]
    fn the_key_cursor_follows_the_walk_and_wraps() {
        // Walk after "b": c, d, then a, b.
        assert_eq!(next_key(Some("b"), &["c", "d"]), Some("d".into()));
        assert_eq!(next_key(Some("b"), &["d", "a", "c"]), Some("a".into()));
        assert_eq!(next_key(Some("b"), &["b", "d"]), Some("b".into()));
        assert_eq!(next_key(None, &["k2", "k10"]), Some("k2".into()));
        assert_eq!(next_key(Some("b"), &[]), None);
    }
}
