//! Embedded migrations, applied per schema.
//!
//! The SQL in `migrations/` is unqualified; it runs with `search_path` set to the configured
//! schema, so one database can hold several independent Courier schemas (tests rely on it),
//! each with its own `__diesel_schema_migrations` table. A session advisory lock keeps two
//! engines starting at once from migrating the same schema twice.
//!
//! diesel-async's own migration harness calls `block_in_place`, which panics on actix's
//! current-thread runtime; running diesel's sync harness through `AsyncConnectionWrapper`
//! inside `spawn_blocking` works on any tokio runtime (LAPIN-NOTES.md).

use std::time::Duration;

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel_async::{
    async_connection_wrapper::AsyncConnectionWrapper, AsyncPgConnection, SimpleAsyncConnection,
};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{check_schema_name, establish, StoreError};
use crate::config::SecretUrl;

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The names of the embedded migrations, oldest first.
pub fn migration_names() -> Vec<String> {
    MigrationSource::<Pg>::migrations(&MIGRATIONS)
        .map(|ms| ms.iter().map(|m| m.name().to_string()).collect())
        .unwrap_or_default()
}

/// Shorthand kept for the CLI's help text.
pub const MIGRATION_NAMES: fn() -> Vec<String> = migration_names;

/// Creates `schema` if needed and applies every pending migration to it. Idempotent.
/// Returns the names of the migrations applied by this call (empty when up to date).
pub async fn migrate(
    url: &SecretUrl,
    schema: &str,
    connect_timeout: Duration,
) -> Result<Vec<String>, StoreError> {
    check_schema_name(schema).map_err(StoreError::Schema)?;
    let mut conn = establish(url, connect_timeout).await?;
    conn.batch_execute(&format!(
        "SELECT pg_advisory_lock(hashtext('courier.migrate.{schema}'));
         CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         SET search_path TO \"{schema}\";"
    ))
    .await?;
    let joined = tokio::task::spawn_blocking(move || {
        let mut wrapper: AsyncConnectionWrapper<AsyncPgConnection> =
            AsyncConnectionWrapper::from(conn);
        wrapper
            .run_pending_migrations(MIGRATIONS)
            .map(|done| done.iter().map(|v| v.to_string()).collect::<Vec<_>>())
            .map_err(|e| StoreError::Migration(e.to_string()))
        // Dropping the connection ends the session and with it the advisory lock.
    })
    .await;
    joined.map_err(|e| StoreError::Migration(format!("migration task failed: {e}")))?
}
