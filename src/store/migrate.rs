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
    let mut conn = establish(url, connect_timeout).await?;
    if super::server_role(&mut conn).await?.standby {
        return Err(StoreError::Standby);
    }
    // Up to date: nothing to lock or create. A role that may only read and write the
    // tables (no CREATE on the database or the schema) then starts with `auto_migrate` on,
    // as `doctor` said it would; `CREATE … IF NOT EXISTS` checks that privilege even when
    // the object exists.
    let applied = applied_versions(&mut conn, schema).await.ok();
    if applied.is_some_and(|a| SchemaFit::of(Some(&a)) == SchemaFit::Current) {
        return Ok(Vec::new());
    }
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
            // Named as the migration's failure (a role without CREATE on the database
            // reads "permission denied for database …" otherwise, with no word of why).
            SimpleConnection::batch_execute(c, &prelude)
                .map_err(|e| StoreError::Migration(Box::new(e)))?;
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

/// How a schema's applied migrations compare with the ones this binary embeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchemaFit {
    /// Exactly the migrations this binary knows.
    Current,
    /// No Courier tables yet.
    Unmigrated,
    /// Some of this binary's migrations are not applied.
    Behind {
        /// How many are missing.
        missing: usize,
        /// How many this binary has.
        of: usize,
    },
    /// Migrations this binary does not know (their versions): a newer Courier migrated the
    /// schema, and this one would misread it (an engine from before key ordering publishes
    /// keyed rows unordered).
    Ahead(Vec<String>),
}

/// The version part of a migration's name (`2026-11-25-000001_create_outbox` →
/// `20261125000001`), as `__diesel_schema_migrations` stores it.
fn migration_version(name: &str) -> String {
    let prefix = name.split('_').next().unwrap_or(name);
    prefix.chars().filter(char::is_ascii_digit).collect()
}

/// -- name: applied_migrations
///
/// The versions applied to schema `s` (its migrations table exists).
fn applied_migrations(s: &super::Schema) -> String {
    format!("SELECT version::text AS version FROM {s}.__diesel_schema_migrations")
}

impl SchemaFit {
    /// What this fit means for starting an engine, after the schema's name.
    pub fn explain(&self) -> String {
        match self {
            SchemaFit::Current => "holds exactly this courier's migrations".into(),
            SchemaFit::Unmigrated => {
                "is not migrated yet: run `courier migrate` (database.auto_migrate is false)".into()
            }
            SchemaFit::Behind { missing, of } => format!(
                "lacks {missing} of {of} migrations: run `courier migrate` \
                 (database.auto_migrate is false)"
            ),
            SchemaFit::Ahead(versions) => format!(
                "has migrations this courier ({}) does not know ({}): a newer courier \
                 migrated it; run that version or a newer one",
                env!("CARGO_PKG_VERSION"),
                versions.join(", ")
            ),
        }
    }

    /// The fit of a schema whose applied migration versions are `applied` (`None`: it has
    /// no migrations table).
    pub fn of(applied: Option<&[String]>) -> SchemaFit {
        let applied = match applied {
            None | Some([]) => return SchemaFit::Unmigrated,
            Some(a) => a,
        };
        let known: Vec<String> = migration_names()
            .iter()
            .map(|n| migration_version(n))
            .collect();
        let ahead: Vec<String> = applied
            .iter()
            .filter(|v| !known.contains(v))
            .cloned()
            .collect();
        let missing = known.iter().filter(|v| !applied.contains(v)).count();
        if !ahead.is_empty() {
            SchemaFit::Ahead(ahead)
        } else if missing > 0 {
            SchemaFit::Behind {
                missing,
                of: known.len(),
            }
        } else {
            SchemaFit::Current
        }
    }
}

#[derive(diesel::QueryableByName)]
struct Applied {
    #[diesel(sql_type = diesel::sql_types::Text)]
    version: String,
}

fn versions(applied: Vec<Applied>) -> Vec<String> {
    applied.into_iter().map(|a| a.version).collect()
}

/// The versions applied to `schema`, on a connection of its own (`courier doctor`, which
/// checks the database before any pool exists, and the up-to-date check before migrating);
/// an error when it has no migrations table. In a transaction of its own ([`super::begin`]),
/// so a pooler in front keeps no statement of it.
pub async fn applied_versions(
    conn: &mut AsyncPgConnection,
    schema: &str,
) -> Result<Vec<String>, StoreError> {
    use diesel_async::RunQueryDsl;
    let sql = applied_migrations(&super::Schema::new(schema)?);
    super::begin(conn, None).await?;
    let applied = diesel::sql_query(sql).load(conn).await;
    let applied: Vec<Applied> = super::end(conn, applied).await?;
    Ok(versions(applied))
}

#[derive(diesel::QueryableByName)]
struct Flag {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    v: bool,
}

impl super::Store {
    /// How this schema's migrations compare with this binary's (see [`SchemaFit`]): the
    /// engine refuses to start on a schema that does not fit.
    pub async fn schema_fit(&self) -> Result<SchemaFit, StoreError> {
        let table = format!("{}.__diesel_schema_migrations", self.schema);
        if !self
            .flag(&format!("SELECT to_regclass('{table}') IS NOT NULL AS v"))
            .await?
        {
            return Ok(SchemaFit::Unmigrated);
        }
        let mut conn = self.op().await?;
        let applied: Vec<Applied> = conn
            .fetch_all(diesel::sql_query(applied_migrations(&self.schema)))
            .await?;
        Ok(SchemaFit::of(Some(&versions(applied))))
    }

    /// Whether `courier migrate` (or an engine) has created this schema's tables, so a
    /// command can say so instead of failing on a missing relation.
    pub async fn is_migrated(&self) -> Result<bool, StoreError> {
        self.flag(&is_migrated(&self.schema)).await
    }

    /// The boolean `v` of the one row `sql` returns (false when none).
    async fn flag(&self, sql: &str) -> Result<bool, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<Flag> = conn.fetch_all(diesel::sql_query(sql)).await?;
        Ok(rows.first().is_some_and(|f| f.v))
    }
}

#[cfg(test)]
mod tests {
    use super::{migration_names, migration_version, SchemaFit};

    #[test]
    fn a_migration_name_gives_diesel_its_version() {
        assert_eq!(
            migration_version("2026-12-04-000008_time_ordered_ids"),
            "20261204000008"
        );
    }

    #[test]
    fn a_schema_fits_only_with_exactly_the_known_migrations() {
        let known: Vec<String> = migration_names()
            .iter()
            .map(|n| migration_version(n))
            .collect();
        assert_eq!(SchemaFit::of(None), SchemaFit::Unmigrated);
        assert_eq!(SchemaFit::of(Some(&[])), SchemaFit::Unmigrated);
        assert_eq!(SchemaFit::of(Some(&known)), SchemaFit::Current);
        assert_eq!(
            SchemaFit::of(Some(&known[..1])),
            SchemaFit::Behind {
                missing: known.len() - 1,
                of: known.len()
            }
        );
        let mut newer = known.clone();
        newer.push("20991231000099".into());
        assert_eq!(
            SchemaFit::of(Some(&newer)),
            SchemaFit::Ahead(vec!["20991231000099".into()])
        );
    }
}
