//! Enqueueing from Rust, inside the application's own transaction.
//!
//! The row is written with the caller's connection, so it commits or rolls back with the
//! business data: a rolled-back transaction publishes nothing.

use diesel_async::AsyncPgConnection;

use crate::{
    message::OutboxMessage,
    store::{check_schema_name, insert_messages, StoreError},
};

/// Writes `message` to `courier.outbox` (the default schema) on `conn`.
///
/// ```no_run
/// # async fn demo(conn: &mut diesel_async::AsyncPgConnection) -> Result<(), courier::StoreError> {
/// use diesel_async::AsyncConnection;
/// conn.transaction::<_, courier::StoreError, _>(async |tx| {
///     // ... insert the order itself with `tx` ...
///     let event = courier::OutboxMessage::new("orders", "order.created", br#"{"id":42}"#.to_vec());
///     courier::enqueue(tx, &event).await
/// }).await
/// # }
/// ```
pub async fn enqueue(
    conn: &mut AsyncPgConnection,
    message: &OutboxMessage,
) -> Result<(), StoreError> {
    enqueue_in(conn, "courier", message).await
}

/// Writes `message` to `<schema>.outbox` on `conn`.
pub async fn enqueue_in(
    conn: &mut AsyncPgConnection,
    schema: &str,
    message: &OutboxMessage,
) -> Result<(), StoreError> {
    check_schema_name(schema).map_err(StoreError::Schema)?;
    insert_messages(conn, schema, std::slice::from_ref(message)).await
}
