//! Writing messages to the outbox: one statement for one message or many, its column list
//! and its binds side by side, so they cannot drift apart (an INSERT that named seven
//! columns while eight values were bound once dropped every `ordering_key` silently).

use diesel::sql_types::{Array, Bytea, Integer, Jsonb, Nullable, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::message::OutboxMessage;

/// Inserts `messages` into `<schema>.outbox` in one statement on `conn` (which may be inside
/// the application's transaction). `schema` must have passed `check_schema_name`.
///
/// Every settable field of [`OutboxMessage`] is written; `attempts` and `created_at` are
/// the database's (0, and the transaction's `now()`), like for any producer.
pub(crate) async fn insert_messages(
    conn: &mut AsyncPgConnection,
    schema: &str,
    messages: &[OutboxMessage],
) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    let texts = |f: fn(&OutboxMessage) -> &str| messages.iter().map(f).collect::<Vec<_>>();
    let optional =
        |f: fn(&OutboxMessage) -> Option<&str>| messages.iter().map(f).collect::<Vec<_>>();
    let sql = format!(
        "INSERT INTO \"{schema}\".outbox
            (id, exchange, routing_key, payload, headers, content_type, max_attempts,
             ordering_key)
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::bytea[],
                              $5::jsonb[], $6::text[], $7::int[], $8::text[])"
    );
    diesel::sql_query(sql)
        .bind::<Array<diesel::sql_types::Uuid>, _>(
            messages.iter().map(|m| m.id).collect::<Vec<Uuid>>(),
        )
        .bind::<Array<Text>, _>(texts(|m| &m.exchange))
        .bind::<Array<Text>, _>(texts(|m| &m.routing_key))
        .bind::<Array<Bytea>, _>(messages.iter().map(|m| &m.payload[..]).collect::<Vec<_>>())
        .bind::<Array<Jsonb>, _>(messages.iter().map(|m| &m.headers).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(optional(|m| m.content_type.as_deref()))
        .bind::<Array<Nullable<Integer>>, _>(
            messages
                .iter()
                .map(|m| m.max_attempts.map(|v| i32::try_from(v).unwrap_or(i32::MAX)))
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Text>>, _>(optional(|m| m.ordering_key.as_deref()))
        .execute(conn)
        .await?;
    Ok(())
}

impl Store {
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
}
