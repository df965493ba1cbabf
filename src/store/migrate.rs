//! Embedded migrations, applied per schema.
//!
//! The SQL in `migrations/` is unqualified; it runs with `search_path` set to the configured
//! schema, so one database can hold several independent Courier schemas (tests rely on it),
//! each with its own `__diesel_schema_migrations` table. A session advisory lock keeps two
//! engines starting at once from migrating the same schema twice. Behind a
//! transaction-mode pooler ([`migrate_config`] with `database.pooler: transaction` and no
//! `database.migrate_url`) a session lock would stay with whichever server connection took
//! it: there the whole run is one transaction holding `pg_advisory_xact_lock`, with
//! `SET LOCAL search_path` and no statement left prepared.
//!
//! diesel-async's own migration harness calls `block_in_place`, which panics on actix's
//! current-thread runtime; running diesel's sync harness through `AsyncConnectionWrapper`
//! inside `spawn_blocking` works on any tokio runtime.

use std::time::Duration;

use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel_async::{async_connection_wrapper::AsyncConnectionWrapper, AsyncPgConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{check_schema_name, establish, StoreError};
use crate::config::{DatabaseConfig, Pooler, SecretUrl};

const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// The names of the embedded migrations, oldest first.
pub fn migration_names() -> Vec<String> {
    MigrationSource::<Pg>::migrations(&MIGRATIONS)
        .map(|ms| ms.iter().map(|m| m.name().to_string()).collect())
        .unwrap_or_default()
}

/// Shorthand kept for the CLI's help text.
pub const MIGRATION_NAMES: fn() -> Vec<String> = migration_names;

/// Migrates `cfg.schema` as the engine and `courier migrate` do: through
/// `database.migrate_url` when set, else through `database.url` (in one transaction behind
/// a transaction-mode pooler). Returns the names of the migrations applied.
pub async fn migrate_config(cfg: &DatabaseConfig) -> Result<Vec<String>, StoreError> {
    let (url, scope) = match (&cfg.migrate_url, cfg.pooler) {
        (Some(direct), _) => (direct, LockScope::Session),
        (None, Pooler::None) => (&cfg.url, LockScope::Session),
        (None, Pooler::Transaction) => (&cfg.url, LockScope::Transaction),
    };
    run(url, &cfg.schema, cfg.connect_timeout, scope).await
}

/// Creates `schema` if needed and applies every pending migration to it. Idempotent.
/// Returns the names of the migrations applied by this call (empty when up to date).
pub async fn migrate(
    url: &SecretUrl,
    schema: &str,
    connect_timeout: Duration,
) -> Result<Vec<String>, StoreError> {
    run(url, schema, connect_timeout, LockScope::Session).await
}

/// How long the migration lock (and `search_path`) is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LockScope {
    /// The session: until the connection closes.
    Session,
    /// One transaction around the whole run, no statement left prepared (see the module
    /// documentation).
    Transaction,
}

async fn run(
    url: &SecretUrl,
    schema: &str,
    connect_timeout: Duration,
    scope: LockScope,
) -> Result<Vec<String>, StoreError> {
    use diesel::connection::{CacheSize, Connection, SimpleConnection};

    check_schema_name(schema).map_err(StoreError::Schema)?;
    let conn = establish(url, connect_timeout).await?;
    let (lock, set) = match scope {
        LockScope::Session => ("pg_advisory_lock", "SET"),
        LockScope::Transaction => ("pg_advisory_xact_lock", "SET LOCAL"),
    };
    let prelude = format!(
        "SELECT {lock}(hashtext('courier.migrate.{schema}'));
         CREATE SCHEMA IF NOT EXISTS \"{schema}\";
         {set} search_path TO \"{schema}\";"
    );
    let joined = tokio::task::spawn_blocking(move || {
        let mut wrapper: AsyncConnectionWrapper<AsyncPgConnection> =
            AsyncConnectionWrapper::from(conn);
        let apply = |c: &mut AsyncConnectionWrapper<AsyncPgConnection>| {
            SimpleConnection::batch_execute(c, &prelude)?;
            c.run_pending_migrations(MIGRATIONS)
                .map(|done| done.iter().map(|v| v.to_string()).collect::<Vec<_>>())
                .map_err(StoreError::Migration)
        };
        match scope {
            // Dropping the connection ends the session and with it the advisory lock.
            LockScope::Session => apply(&mut wrapper),
            LockScope::Transaction => {
                Connection::set_prepared_statement_cache_size(&mut wrapper, CacheSize::Disabled);
                Connection::transaction::<_, StoreError, _>(&mut wrapper, apply)
            }
        }
    })
    .await;
    joined.map_err(StoreError::MigrationTask)?
}

/// -- name: is_migrated
///
/// Whether the schema holds the outbox at all (a schema never migrated has none).
fn is_migrated(s: &super::Schema) -> String {
    format!("SELECT to_regclass('{s}.outbox') IS NOT NULL AS v")
}

impl super::Store {
    /// Whether `courier migrate` (or an engine) has created this schema's tables, so a
    /// command can say so instead of failing on a missing relation.
    pub async fn is_migrated(&self) -> Result<bool, StoreError> {
        #[derive(diesel::QueryableByName)]
        struct Flag {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            v: bool,
        }
        let mut conn = self.op().await?;
        let rows: Vec<Flag> = conn
            .fetch_all(diesel::sql_query(is_migrated(&self.schema)))
            .await?;
        Ok(rows.first().is_some_and(|f| f.v))
    }
}
