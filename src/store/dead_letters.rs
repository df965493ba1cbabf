//! Dead letters: rows that will never be delivered move from the outbox to `dead_letters`
//! (in one statement, so a row is always in exactly one table), and wait there for an
//! operator to list, show, requeue or discard them.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::{
    sql_types::{Array, BigInt, Bytea, Integer, Nullable, Text, Timestamptz},
    QueryableByName,
};
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use uuid::Uuid;

use super::{
    lock_wait_guard, millis, not_found_is_none, IdRow, Schema, Store, StoreError,
    OPERATOR_LOCK_WAIT, ROW_LOCK_WAIT,
};

/// A dead-letter decision for one message, written by `Store::move_to_dead_letters`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterUpdate {
    /// The row.
    pub id: Uuid,
    /// The final reason, stored in `dead_letters.last_error`.
    pub error: String,
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

/// The columns a dead letter is read with (see `DeadLetterRow`): like a claimed message's,
/// in forms that cannot fail to decode, since whatever a producer wrote ends up here.
const DEAD_LETTER_COLUMNS: &str = "id, exchange, routing_key, payload, headers::text AS headers, \
     content_type, max_attempts, attempts, last_error, \
     CASE WHEN isfinite(created_at) AND created_at < '100000-01-01' THEN created_at END \
         AS created_at, \
     failed_at, ordering_key, seq";

/// A dead letter as read (see [`DEAD_LETTER_COLUMNS`]): nothing in it can fail to decode.
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

/// The dead-letter statements the engine runs, formatted once per schema: an engine
/// moves rows that failed for good with every batch that holds some.
pub(super) struct Statements {
    supersede: String,
    move_in: String,
}

impl Statements {
    pub(super) fn new(s: &Schema) -> Statements {
        Statements {
            supersede: supersede_dead_letters(s),
            move_in: move_to_dead_letters(s),
        }
    }
}

/// -- name: supersede_dead_letters
///
/// A message id reused after its first copy was dead-lettered: the earlier dead letter
/// moves to `dead_letters_superseded` first (same transaction as the move below), so the
/// new failure neither fails the move nor overwrites the old one.
///
/// `$1` row ids, `$2` engine id (only rows it still holds).
fn supersede_dead_letters(s: &Schema) -> String {
    format!(
        "WITH old AS (
                    DELETE FROM {s}.dead_letters d
                    WHERE d.id = ANY($1)
                      AND EXISTS (SELECT 1 FROM {s}.outbox o
                                  WHERE o.id = d.id AND o.status = 'in_flight'
                                    AND o.locked_by = $2)
                    RETURNING d.*
                 )
                 INSERT INTO {s}.dead_letters_superseded
                    (id, exchange, routing_key, payload, headers, content_type, max_attempts,
                     attempts, last_error, created_at, failed_at, ordering_key, seq)
                 SELECT id, exchange, routing_key, payload, headers, content_type, max_attempts,
                        attempts, last_error, created_at, failed_at, ordering_key, seq
                 FROM old"
    )
}

/// -- name: move_to_dead_letters
///
/// One statement, so one transaction: the row leaves the outbox only as it enters
/// dead_letters.
///
/// `$1` row ids, `$2` final errors (one per row, in the same order), `$3` engine id (only
/// rows it still holds).
fn move_to_dead_letters(s: &Schema) -> String {
    format!(
        "WITH moved AS (
                    DELETE FROM {s}.outbox o
                    USING unnest($1::uuid[], $2::text[]) AS u(id, err)
                    WHERE o.id = u.id AND o.status = 'in_flight' AND o.locked_by = $3
                    RETURNING o.*, u.err AS final_error
                 )
                 INSERT INTO {s}.dead_letters
                    (id, exchange, routing_key, payload, headers, content_type, max_attempts,
                     attempts, last_error, created_at, failed_at, ordering_key, seq)
                 SELECT id, exchange, routing_key, payload, headers, content_type, max_attempts,
                        attempts, final_error, created_at, now(), ordering_key, seq
                 FROM moved
                 RETURNING id"
    )
}

impl Store {
    /// Moves failed rows `engine` holds to `dead_letters`, in one transaction, with their
    /// final error. Returns the ids moved.
    pub(crate) async fn move_to_dead_letters(
        &self,
        engine: &str,
        updates: &[DeadLetterUpdate],
    ) -> Result<Vec<Uuid>, StoreError> {
        if updates.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = updates.iter().map(|u| u.id).collect();
        let errors: Vec<String> = updates.iter().map(|u| u.error.clone()).collect();
        let sql = &self.statements.dead_letters;
        let mut conn = self.op().await?;
        let rows: Vec<IdRow> = conn
            .transaction::<_, diesel::result::Error, _>(async |tx| {
                // A row another transaction holds locked fails the move in a second instead
                // of holding it (and every move behind it): the Dead-letter actor then moves
                // the batch's rows one at a time, that one last.
                tx.batch_execute(&format!("SET LOCAL lock_timeout = '{ROW_LOCK_WAIT}'"))
                    .await?;
                diesel::sql_query(&sql.supersede)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(&ids)
                    .bind::<Text, _>(engine)
                    .execute(tx)
                    .await?;
                diesel::sql_query(&sql.move_in)
                    .bind::<Array<diesel::sql_types::Uuid>, _>(&ids)
                    .bind::<Array<Text>, _>(&errors)
                    .bind::<Text, _>(engine)
                    .load(tx)
                    .await
            })
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }
}

/// -- name: requeue_clear_confirmed
///
/// A producer reused the id of dead letter `$1[i]` and that copy is `confirmed`: delivered,
/// so it only waits for retention, and would hold the requeue back that long (a key blocked
/// behind the dead letter with it). It goes now, before the requeue moves the dead letter in.
fn requeue_clear_confirmed(s: &Schema) -> String {
    format!(
        "DELETE FROM {s}.outbox o WHERE {wait} AND o.id = ANY($1) AND o.status = 'confirmed'
           AND EXISTS (SELECT 1 FROM {s}.dead_letters d WHERE d.id = o.id)",
        wait = lock_wait_guard(OPERATOR_LOCK_WAIT),
    )
}

/// -- name: requeue_dead_letters
///
/// DELETE takes the row lock, so two operators requeueing the same id at once move it
/// once: the second finds nothing to delete and inserts nothing. A keyed row keeps its
/// `seq`: it goes back to its place in its key's order. An id that is in the outbox again
/// (a producer reused it) stays here until that copy is done: two rows cannot share an id.
///
/// `$1` dead letter ids.
fn requeue(s: &Schema) -> String {
    format!(
        "WITH moved AS (
                    DELETE FROM {s}.dead_letters d WHERE {wait} AND d.id = ANY($1)
                      AND NOT EXISTS (SELECT 1 FROM {s}.outbox o WHERE o.id = d.id)
                    RETURNING *
                 )
                 INSERT INTO {s}.outbox
                    (id, exchange, routing_key, payload, headers, content_type, max_attempts,
                     status, attempts, next_attempt_at, last_error, created_at, ordering_key, seq)
                 SELECT id, exchange, routing_key, payload, headers, content_type, max_attempts,
                        'pending', 0, now(), last_error, created_at, ordering_key, seq
                 FROM moved
                 RETURNING id",
        wait = lock_wait_guard(OPERATOR_LOCK_WAIT),
    )
}

impl Store {
    /// Moves dead letters back to the outbox as `pending` with `attempts = 0`, in one
    /// transaction. Returns the ids moved (unknown ids are simply absent).
    pub async fn requeue_dead_letters(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.op().await?;
        // Two statements, not one: a deleted row and a row inserted with its id in one
        // statement may meet in the unique index in either order. Between them nothing is
        // lost: the copy removed was delivered, and the dead letter is still there.
        conn.run(
            diesel::sql_query(requeue_clear_confirmed(&self.schema))
                .bind::<Array<diesel::sql_types::Uuid>, _>(ids),
        )
        .await
        .map_err(operator_error)?;
        let rows: Vec<IdRow> = conn
            .fetch_all(
                diesel::sql_query(requeue(&self.schema))
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids),
            )
            .await
            .map_err(operator_error)?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }
}

/// An operator's statement failed: a lock it gave up waiting for is named as such.
fn operator_error(e: diesel::result::Error) -> StoreError {
    StoreError::from(e).lock_wait_named()
}

/// -- name: dead_letter_list
///
/// `$1` how recently failed (ms; NULL: all), `$2` most rows.
fn dead_letter_list(s: &Schema) -> String {
    format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM {s}.dead_letters
                 WHERE ($1::bigint IS NULL OR failed_at >= now() - $1 * interval '1 millisecond')
                 ORDER BY failed_at DESC, id LIMIT $2"
    )
}

/// -- name: dead_letter_show
///
/// `$1` dead letter id.
fn dead_letter_show(s: &Schema) -> String {
    format!("SELECT {DEAD_LETTER_COLUMNS} FROM {s}.dead_letters WHERE id = $1")
}

/// -- name: dead_letter_ids
///
/// `$1` exchange (NULL: all).
fn dead_letter_ids(s: &Schema) -> String {
    format!("SELECT id FROM {s}.dead_letters WHERE ($1::text IS NULL OR exchange = $1)")
}

impl Store {
    /// Dead letters, newest first, failed within `since` (all when `None`).
    pub async fn dead_letters(
        &self,
        since: Option<Duration>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<DeadLetterRow> = conn
            .fetch_all(
                diesel::sql_query(dead_letter_list(&self.schema))
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
                diesel::sql_query(dead_letter_show(&self.schema))
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
                diesel::sql_query(dead_letter_ids(&self.schema))
                    .bind::<Nullable<Text>, _>(exchange),
            )
            .await?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }
}

/// A key held back by a dead letter (`ordering.on_dead_letter: block`).
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName, serde::Serialize)]
pub struct BlockedKey {
    /// The ordering key (producer text: escape it before printing).
    #[diesel(sql_type = Text)]
    pub key: String,
    /// Its earliest dead letter: requeue or discard it to let the key go on.
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub dead_letter: Uuid,
    /// Open rows of the key waiting behind it (counted up to 10,001).
    #[diesel(sql_type = BigInt)]
    pub waiting: i64,
}

/// -- name: blocked_keys
///
/// Keys with a dead letter and open rows behind it, longest blocked first. Each key is one
/// probe of the open-key index; the dead letters are the operators' table, small by design.
///
/// `$1` most keys.
fn blocked_keys(s: &Schema) -> String {
    format!(
        "SELECT d.ordering_key AS key, d.id AS dead_letter,
                (SELECT count(*) FROM (SELECT 1 FROM {s}.outbox o
                                       WHERE o.ordering_key = d.ordering_key
                                         AND o.status IN ('pending', 'in_flight', 'retrying')
                                       LIMIT 10001) w) AS waiting
         FROM (SELECT DISTINCT ON (ordering_key) ordering_key, id, failed_at
               FROM {s}.dead_letters WHERE ordering_key IS NOT NULL
               ORDER BY ordering_key, failed_at) d
         WHERE EXISTS (SELECT 1 FROM {s}.outbox o
                       WHERE o.ordering_key = d.ordering_key
                         AND o.status IN ('pending', 'in_flight', 'retrying'))
         ORDER BY d.failed_at, d.ordering_key LIMIT $1"
    )
}

impl Store {
    /// Keys whose rows wait behind a dead letter, at most `limit` of them.
    pub async fn blocked_keys(&self, limit: u32) -> Result<Vec<BlockedKey>, StoreError> {
        let mut conn = self.op().await?;
        Ok(conn
            .fetch_all(
                diesel::sql_query(blocked_keys(&self.schema)).bind::<BigInt, _>(i64::from(limit)),
            )
            .await?)
    }
}

/// -- name: discard_dead_letters
///
/// `$1` dead letter ids.
fn discard(s: &Schema) -> String {
    format!(
        "DELETE FROM {s}.dead_letters WHERE {wait} AND id = ANY($1) RETURNING id",
        wait = lock_wait_guard(OPERATOR_LOCK_WAIT),
    )
}

/// -- name: discard_dead_letters_older_than
///
/// `$1` age (ms): those that failed longer ago go.
fn discard_older(s: &Schema) -> String {
    format!(
        "DELETE FROM {s}.dead_letters
                 WHERE {wait} AND failed_at < now() - $1 * interval '1 millisecond'
                 RETURNING id",
        wait = lock_wait_guard(OPERATOR_LOCK_WAIT),
    )
}

impl Store {
    /// Deletes dead letters for good. Returns the ids deleted (unknown ids are absent).
    pub async fn discard_dead_letters(&self, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<IdRow> = conn
            .fetch_all(
                diesel::sql_query(discard(&self.schema))
                    .bind::<Array<diesel::sql_types::Uuid>, _>(ids),
            )
            .await
            .map_err(operator_error)?;
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
                diesel::sql_query(discard_older(&self.schema))
                    .bind::<BigInt, _>(millis(older_than)),
            )
            .await
            .map_err(operator_error)?;
        drop(conn);
        self.wake_after_discard(rows.len()).await;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// A discarded dead letter may unblock its key (`ordering.on_dead_letter: block`):
    /// wake the engines now rather than at their next sweep. The rows are gone already, so
    /// a failure here is only logged.
    async fn wake_after_discard(&self, discarded: usize) {
        if discarded > 0 {
            if let Err(e) = self.notify(super::NOTIFY_KEYED).await {
                tracing::debug!(error = %e, "could not notify the engines after a discard");
            }
        }
    }
}
