//! The database layer: the connection pool and every named operation on the outbox.
//!
//! The Store actor (in `actors/store.rs`) owns one [`Store`]; the CLI and tests use it
//! directly. All SQL text lives in [`sql`]; this file binds parameters and maps rows.
//! Every operation works on a bounded batch: the engine never loads the whole table.

mod migrate;
pub mod sql;

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use chrono::{DateTime, Utc};
use diesel::{
    sql_types::{Array, BigInt, Bool, Bytea, Double, Integer, Jsonb, Nullable, Text, Timestamptz},
    QueryableByName,
};
use diesel_async::{
    pooled_connection::{deadpool::Pool, AsyncDieselConnectionManager},
    AsyncConnection, AsyncPgConnection, RunQueryDsl,
};
use uuid::Uuid;

pub use migrate::{migrate, MIGRATION_NAMES};
pub use sql::Sql;

use crate::{
    config::{DatabaseConfig, SecretUrl},
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
    /// The pool could not hand out a connection.
    #[error("database pool: {0}")]
    Pool(String),
    /// A statement failed.
    #[error("database query failed: {0}")]
    Query(#[from] diesel::result::Error),
    /// Migrations failed.
    #[error("migration failed: {0}")]
    Migration(String),
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

#[derive(QueryableByName)]
struct ClaimedRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    exchange: String,
    #[diesel(sql_type = Text)]
    routing_key: String,
    #[diesel(sql_type = Bytea)]
    payload: Vec<u8>,
    #[diesel(sql_type = Jsonb)]
    headers: serde_json::Value,
    #[diesel(sql_type = Nullable<Text>)]
    content_type: Option<String>,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Integer>)]
    max_attempts: Option<i32>,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Text>)]
    ordering_key: Option<String>,
}

impl From<ClaimedRow> for OutboxMessage {
    fn from(r: ClaimedRow) -> Self {
        OutboxMessage {
            id: r.id,
            exchange: r.exchange,
            routing_key: r.routing_key,
            payload: r.payload,
            headers: r.headers,
            content_type: r.content_type,
            // CHECK constraints keep these positive; a negative value read anyway is
            // clamped rather than trusted.
            attempts: u32::try_from(r.attempts).unwrap_or(0),
            max_attempts: r.max_attempts.and_then(|m| u32::try_from(m).ok()),
            created_at: r.created_at,
            ordering_key: r.ordering_key,
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

/// What one keyed claim returned.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    /// The claimed heads (at most one per key).
    pub messages: Vec<OutboxMessage>,
    /// The batch came back full: more heads may be ready right now.
    pub full: bool,
    /// Where the next claim should resume the walk over keys.
    pub next_key: Option<String>,
}

/// A row of `dead_letters`, for operators.
#[derive(Debug, Clone, PartialEq, QueryableByName)]
pub struct DeadLetter {
    /// The message id (the AMQP `message_id` it was published with).
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub id: Uuid,
    /// Target exchange.
    #[diesel(sql_type = Text)]
    pub exchange: String,
    /// Routing key.
    #[diesel(sql_type = Text)]
    pub routing_key: String,
    /// Body.
    #[diesel(sql_type = Bytea)]
    pub payload: Vec<u8>,
    /// Headers (JSON as the producer wrote them).
    #[diesel(sql_type = Jsonb)]
    pub headers: serde_json::Value,
    /// Content type.
    #[diesel(sql_type = Nullable<Text>)]
    pub content_type: Option<String>,
    /// Per-row attempt budget.
    #[diesel(sql_type = Nullable<Integer>)]
    pub max_attempts: Option<i32>,
    /// Attempts made.
    #[diesel(sql_type = Integer)]
    pub attempts: i32,
    /// Why it failed.
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
    /// When the producer committed it.
    #[diesel(sql_type = Timestamptz)]
    pub created_at: DateTime<Utc>,
    /// When it was dead-lettered.
    #[diesel(sql_type = Timestamptz)]
    pub failed_at: DateTime<Utc>,
    /// Its ordering key, if any (with `ordering.on_dead_letter: block` the key waits for
    /// an operator while this row is here).
    #[diesel(sql_type = Nullable<Text>)]
    pub ordering_key: Option<String>,
    /// Its place in its key's order (kept by a requeue).
    #[diesel(sql_type = Nullable<BigInt>)]
    pub seq: Option<i64>,
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
    let connect = AsyncPgConnection::establish(url.expose());
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(StoreError::Connect {
            target: url.redacted(),
            reason: scrub(&e.to_string(), url),
        }),
        Err(_) => Err(StoreError::Connect {
            target: url.redacted(),
            reason: format!("no answer within {}", humantime::format_duration(timeout)),
        }),
    }
}

/// Removes the URL and its secrets from a driver message, should it quote them.
fn scrub(message: &str, url: &SecretUrl) -> String {
    url.scrub(message)
}

impl Store {
    /// Builds the pool and checks that one connection can be made.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        check_schema_name(&cfg.schema).map_err(StoreError::Schema)?;
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(cfg.url.expose());
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size as usize)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let store = Store {
            pool,
            sql: std::sync::Arc::new(Sql::new(&cfg.schema)),
            url: cfg.url.clone(),
            connect_timeout: cfg.connect_timeout,
        };
        drop(store.conn().await?);
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

    /// Claims up to `limit` rows for `engine` with a lease of `lease`: rows whose lease
    /// expired (keyed or not), then unkeyed due rows, oldest first. Sets `in_flight`,
    /// `locked_by`, `locked_until` and counts the attempt. Keyed rows: [`claim_keyed`].
    ///
    /// [`claim_keyed`]: Self::claim_keyed
    pub async fn claim(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<ClaimedRow> = diesel::sql_query(&self.sql.claim)
            .bind::<BigInt, _>(i64::from(limit))
            .bind::<Text, _>(engine)
            .bind::<BigInt, _>(millis(lease))
            .load(&mut conn)
            .await?;
        let mut messages: Vec<OutboxMessage> = rows.into_iter().map(OutboxMessage::from).collect();
        messages.sort_by_key(|m| m.created_at);
        Ok(messages)
    }

    /// Claims up to `limit` keyed rows for `engine`: the due head of each key that has
    /// nothing in flight (nor, with `keys.block_on_dead_letter`, a dead letter), walking the
    /// keys round-robin from `keys.after`.
    pub async fn claim_keyed(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
        keys: &KeyScan,
    ) -> Result<Claimed, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<ClaimedRow> = diesel::sql_query(&self.sql.claim_keyed)
            .bind::<BigInt, _>(i64::from(limit))
            .bind::<Text, _>(engine)
            .bind::<BigInt, _>(millis(lease))
            .bind::<Text, _>(keys.after.as_deref().unwrap_or(""))
            .bind::<Bool, _>(keys.block_on_dead_letter)
            .load(&mut conn)
            .await?;
        let messages: Vec<OutboxMessage> = rows.into_iter().map(OutboxMessage::from).collect();
        let served: Vec<&str> = messages
            .iter()
            .filter_map(|m| m.ordering_key.as_deref())
            .collect();
        let next_key = next_key(keys.after.as_deref(), &served).or(keys.after.clone());
        Ok(Claimed {
            full: messages.len() == limit as usize,
            messages,
            next_key,
        })
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
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(&self.sql.renew)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .bind::<Text, _>(engine)
            .bind::<BigInt, _>(millis(lease))
            .execute(&mut conn)
            .await?)
    }

    /// Extends the lease of every row `engine` holds. Returns how many.
    pub async fn renew_all(&self, engine: &str, lease: Duration) -> Result<usize, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(&self.sql.renew_all)
            .bind::<Text, _>(engine)
            .bind::<BigInt, _>(millis(lease))
            .execute(&mut conn)
            .await?)
    }

    /// Gives back every row `engine` still holds (shutdown): due again at once, attempt
    /// refunded. Returns how many.
    pub async fn release_all(&self, engine: &str) -> Result<usize, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(&self.sql.release_all)
            .bind::<Text, _>(engine)
            .execute(&mut conn)
            .await?)
    }

    /// Marks a batch `confirmed` (one statement). Returns the rows changed.
    pub async fn mark_confirmed(&self, ids: &[Uuid]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(&self.sql.confirm)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .execute(&mut conn)
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
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(&self.sql.retry)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .bind::<Array<BigInt>, _>(delays)
            .bind::<Array<Text>, _>(errors)
            .bind::<Array<Bool>, _>(refunds)
            .bind::<Text, _>(engine)
            .execute(&mut conn)
            .await?)
    }

    /// Gives back rows `engine` claimed but never published: they are due again at once and
    /// the attempt is not counted.
    pub async fn release(&self, engine: &str, ids: &[Uuid]) -> Result<usize, StoreError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(&self.sql.release)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .bind::<Text, _>(engine)
            .execute(&mut conn)
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
        let mut conn = self.conn().await?;
        let rows: Vec<IdRow> = diesel::sql_query(&self.sql.dead_letter)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .bind::<Array<Text>, _>(errors)
            .bind::<Text, _>(engine)
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Moves dead letters back to the outbox as `pending` with `attempts = 0`, in one
    /// transaction. Returns the ids moved (unknown ids are simply absent).
    pub async fn requeue_dead_letters(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let rows: Vec<IdRow> = diesel::sql_query(&self.sql.requeue)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Enqueues one message on a pooled connection (outside any application transaction).
    /// Applications use [`enqueue`](crate::enqueue) inside their own transaction instead.
    pub async fn enqueue(&self, message: &OutboxMessage) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        enqueue_with(&mut conn, &self.sql, message).await
    }

    /// Enqueues many messages in one statement.
    pub async fn enqueue_many(&self, messages: &[OutboxMessage]) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        enqueue_many_with(&mut conn, &self.sql, messages).await
    }

    /// Counts by status, dead letters, and the oldest undelivered row's age.
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        let mut conn = self.conn().await?;
        let counts: Vec<CountRow> = diesel::sql_query(&self.sql.counts).load(&mut conn).await?;
        let mut outbox: BTreeMap<String, i64> = ALL_STATUSES
            .iter()
            .map(|s| (s.as_str().to_string(), 0))
            .collect();
        for row in counts {
            outbox.insert(row.status, row.n);
        }
        let dead: TotalRow = diesel::sql_query(&self.sql.dead_letter_count)
            .get_result(&mut conn)
            .await?;
        let age: AgeRow = diesel::sql_query(&self.sql.oldest_pending)
            .get_result(&mut conn)
            .await?;
        Ok(Stats {
            outbox,
            dead_letters: dead.n,
            oldest_pending_age: age
                .age
                .filter(|a| a.is_finite())
                .map(|a| Duration::from_secs_f64(a.max(0.0))),
        })
    }

    /// The final outcomes reached so far by any of `ids` (ids still on their way are absent).
    pub async fn outcomes(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Outcome>, StoreError> {
        let mut out = HashMap::new();
        let mut conn = self.conn().await?;
        for chunk in ids.chunks(10_000) {
            let rows: Vec<OutcomeRow> = diesel::sql_query(&self.sql.outcomes)
                .bind::<Array<diesel::sql_types::Uuid>, _>(chunk)
                .load(&mut conn)
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
        let mut conn = self.conn().await?;
        let sql = if archive {
            &self.sql.archive_confirmed
        } else {
            &self.sql.purge_confirmed
        };
        Ok(diesel::sql_query(sql)
            .bind::<BigInt, _>(millis(older_than))
            .bind::<BigInt, _>(i64::from(limit))
            .execute(&mut conn)
            .await?)
    }

    /// How long until the earliest row that is not due yet becomes due (`None`: none).
    pub async fn next_due(&self) -> Result<Option<Duration>, StoreError> {
        let mut conn = self.conn().await?;
        let row: AgeRow = diesel::sql_query(&self.sql.next_due)
            .get_result(&mut conn)
            .await?;
        Ok(row
            .age
            .filter(|a| a.is_finite())
            .map(|a| Duration::from_secs_f64(a.max(0.0))))
    }

    /// Runs a plain `VACUUM` on the outbox (after retention removed rows).
    pub async fn vacuum_outbox(&self) -> Result<(), StoreError> {
        use diesel_async::SimpleAsyncConnection;
        let mut conn = self.conn().await?;
        conn.batch_execute(&self.sql.vacuum).await?;
        Ok(())
    }

    /// Dead letters, newest first, failed within `since` (all when `None`).
    pub async fn dead_letters(
        &self,
        since: Option<Duration>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(diesel::sql_query(&self.sql.dead_letter_list)
            .bind::<Nullable<BigInt>, _>(since.map(millis))
            .bind::<BigInt, _>(i64::from(limit))
            .load(&mut conn)
            .await?)
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: Uuid) -> Result<Option<DeadLetter>, StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(&self.sql.dead_letter_show)
            .bind::<diesel::sql_types::Uuid, _>(id)
            .get_result(&mut conn)
            .await
            .map(Some)
            .or_else(not_found_is_none)
            .map_err(StoreError::from)
    }

    /// Ids of dead letters, all or those of one exchange (for "requeue --all").
    pub async fn dead_letter_ids(&self, exchange: Option<&str>) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<IdRow> = diesel::sql_query(&self.sql.dead_letter_ids)
            .bind::<Nullable<Text>, _>(exchange)
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Deletes dead letters for good. Returns the ids deleted (unknown ids are absent).
    pub async fn discard_dead_letters(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<IdRow> = diesel::sql_query(&self.sql.dead_letter_discard)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .load(&mut conn)
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
        let mut conn = self.conn().await?;
        let rows: Vec<IdRow> = diesel::sql_query(&self.sql.dead_letter_discard_older)
            .bind::<BigInt, _>(millis(older_than))
            .load(&mut conn)
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
        let mut conn = self.conn().await?;
        let r: Pct = diesel::sql_query(&self.sql.latency_of)
            .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
            .get_result(&mut conn)
            .await?;
        Ok(r.p50.zip(r.p99))
    }

    /// Confirmed rows by the engine that published them (`locked_by` is kept on confirm).
    pub async fn publishers_of_confirmed(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut conn = self.conn().await?;
        let rows: Vec<CountRow> = diesel::sql_query(&self.sql.publishers)
            .load(&mut conn)
            .await?;
        Ok(rows.into_iter().map(|r| (r.status, r.n)).collect())
    }

    /// Sends a NOTIFY on the outbox channel with `payload` (the listener's self-check).
    pub async fn notify(&self, payload: &str) -> Result<(), StoreError> {
        let mut conn = self.conn().await?;
        diesel::sql_query(&self.sql.notify)
            .bind::<Text, _>(payload)
            .execute(&mut conn)
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
        let mut conn = self.conn().await?;
        let row: Option<StatusRow> = diesel::sql_query(&self.sql.outbox_status_of)
            .bind::<diesel::sql_types::Uuid, _>(id)
            .get_result(&mut conn)
            .await
            .map(Some)
            .or_else(not_found_is_none)?;
        if let Some(row) = row {
            let status = row.status.parse::<Status>().map_err(|e| {
                StoreError::Query(diesel::result::Error::DeserializationError(Box::new(e)))
            })?;
            return Ok(Some(MessageState::Outbox(status, row.last_error)));
        }
        let dead: Option<StatusRow> = diesel::sql_query(&self.sql.dead_letter_of)
            .bind::<diesel::sql_types::Uuid, _>(id)
            .get_result(&mut conn)
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

/// Inserts one message on the given connection (which may be inside a transaction).
pub(crate) async fn enqueue_with(
    conn: &mut AsyncPgConnection,
    sql: &Sql,
    m: &OutboxMessage,
) -> Result<(), StoreError> {
    diesel::sql_query(&sql.enqueue)
        .bind::<diesel::sql_types::Uuid, _>(m.id)
        .bind::<Text, _>(&m.exchange)
        .bind::<Text, _>(&m.routing_key)
        .bind::<Bytea, _>(&m.payload)
        .bind::<Jsonb, _>(&m.headers)
        .bind::<Nullable<Text>, _>(m.content_type.as_deref())
        .bind::<Nullable<Integer>, _>(max_attempts_sql(m.max_attempts))
        .bind::<Nullable<Text>, _>(m.ordering_key.as_deref())
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts many messages in one statement on the given connection.
pub(crate) async fn enqueue_many_with(
    conn: &mut AsyncPgConnection,
    sql: &Sql,
    messages: &[OutboxMessage],
) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
    let exchanges: Vec<&str> = messages.iter().map(|m| m.exchange.as_str()).collect();
    let keys: Vec<&str> = messages.iter().map(|m| m.routing_key.as_str()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    let headers: Vec<&serde_json::Value> = messages.iter().map(|m| &m.headers).collect();
    let types: Vec<Option<&str>> = messages.iter().map(|m| m.content_type.as_deref()).collect();
    let maxes: Vec<Option<i32>> = messages
        .iter()
        .map(|m| max_attempts_sql(m.max_attempts))
        .collect();
    let ordering: Vec<Option<&str>> = messages.iter().map(|m| m.ordering_key.as_deref()).collect();
    diesel::sql_query(&sql.enqueue_many)
        .bind::<Array<diesel::sql_types::Uuid>, _>(ids)
        .bind::<Array<Text>, _>(exchanges)
        .bind::<Array<Text>, _>(keys)
        .bind::<Array<Bytea>, _>(payloads)
        .bind::<Array<Jsonb>, _>(headers)
        .bind::<Array<Nullable<Text>>, _>(types)
        .bind::<Array<Nullable<Integer>>, _>(maxes)
        .bind::<Array<Nullable<Text>>, _>(ordering)
        .execute(conn)
        .await?;
    Ok(())
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

fn max_attempts_sql(m: Option<u32>) -> Option<i32> {
    m.map(|v| i32::try_from(v).unwrap_or(i32::MAX))
}

#[cfg(test)]
mod tests {
    use super::next_key;

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
