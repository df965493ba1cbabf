//! The database layer: the connection pool and every named operation on the outbox.
//!
//! The engine's Ledger actor (`actors/ledger.rs`) owns one [`Store`]; the CLI, the admin
//! API, the inbox and tests use it directly. Operations are grouped by concern, one file
//! each, every statement beside the code that binds it:
//!
//! - `claim`: taking due rows (unkeyed, then keyed heads) and when the next row is due;
//! - `leases`: extending the leases of rows this engine holds;
//! - `settle`: writing outcomes: confirmed, retrying, or given back unpublished;
//! - `dead_letters`: the move to `dead_letters`, and what operators do there;
//! - `stats`: counts, ages, outcomes and latency, for the CLI, the admin API and tests;
//! - `retention`: removing (or archiving) old confirmed rows;
//! - `notify`: the NOTIFY channel the insert trigger wakes engines on;
//! - `inbox`: the consumer inbox's record of messages already applied;
//! - `enqueue`: writing messages; `engines`: the engine registry and rescue;
//! - `migrate`: the schema itself; `connect`, `tls`, `op_conn`: connections.
//!
//! A statement is a function returning its text for one schema (see `Schema`: checked and
//! quoted, so it cannot inject SQL), marked `-- name:` after the operation, directly above
//! the method that binds it, with what each `$n` is. The statements run for every batch or
//! delivery (claims, leases, settling, dead letters, the inbox record) are formatted once
//! per schema when the [`Store`] connects, into their module's `Statements`; the others
//! are formatted when they run. Every operation works on a bounded batch: the engine never
//! loads the whole table.

mod claim;
mod connect;
mod dead_letters;
mod engines;
mod enqueue;
mod inbox;
mod leases;
mod migrate;
mod notify;
mod op_conn;
mod retention;
mod settle;
mod stats;
mod tls;

use std::{fmt, sync::Arc, time::Duration};

use diesel::QueryableByName;
use diesel_async::{
    pooled_connection::{
        deadpool::{Hook, HookError, Pool},
        AsyncDieselConnectionManager, ManagerConfig, PoolError, RecyclingMethod,
    },
    AsyncPgConnection,
};
use uuid::Uuid;

pub use claim::{ClaimLimits, Claimed, KeyScan};
use connect::PgTarget;
pub(crate) use connect::{check_url, take_query_keys};
pub(crate) use dead_letters::headers_from_text;
pub use dead_letters::{BlockedKey, DeadLetter, DeadLetterUpdate};
pub use engines::{
    beat, free_strays, rescue, Beat, Beaten, EngineRecord, Identity, Rescued, Strays,
};
pub(crate) use enqueue::insert_messages;
pub use migrate::{applied_versions, migrate, migrate_config, SchemaFit, MIGRATION_NAMES};
pub(crate) use notify::{NOTIFY_KEYED, NOTIFY_RELEASED};
pub(crate) use settle::Locked;
pub use settle::RetryUpdate;
pub use stats::{MessageState, OldestOpen, Outcome, Stats, EXACT_UP_TO};

use crate::config::{DatabaseConfig, Pooler, SecretUrl};

/// A database failure. Messages never contain a password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be made.
    #[error(
        "cannot connect to PostgreSQL at {target}: {reason}{hint}",
        hint = pooler_hint(reason)
    )]
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
    #[error("database query failed: {0}{hint}", hint = pooler_hint(&.0.to_string()))]
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
    /// An operator's change gave up on rows another transaction holds locked (a producer's
    /// or another operator's, left open): nothing was changed.
    #[error(
        "rows are locked by another transaction (waited {OPERATOR_LOCK_WAIT} for it); nothing \
         was changed: try again once that transaction ends ({0})"
    )]
    RowLocked(#[source] diesel::result::Error),
    /// The server is a hot standby: it takes no writes, and every claim would fail on it.
    #[error("the database server is a standby (in recovery) and takes no writes: {STANDBY_FIX}")]
    Standby,
}

/// What an error that names a prepared statement most likely means: a transaction-mode
/// pooler (PgBouncer) hands each transaction whichever server connection is free, so a
/// statement prepared on one is missing on the next ("does not exist"), or one another
/// client prepared is found there ("already exists"). Courier avoids both when told of the
/// pooler; without it the engine warns and retries, and drains slowly, for ever.
fn pooler_hint(text: &str) -> &'static str {
    if text.contains("prepared statement \"")
        && (text.contains("does not exist") || text.contains("already exists"))
        && !text.contains("database.pooler: transaction")
    {
        " (is a transaction-mode pooler such as PgBouncer between Courier and PostgreSQL? \
         then set database.pooler: transaction)"
    } else {
        ""
    }
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

    /// An error a statement gives when it waited too long for a row lock (`lock_timeout`),
    /// among others: PostgreSQL's code for it (55P03) does not reach this error, so callers
    /// that bound their lock waits try again without waiting, and see any other error again.
    pub(crate) fn may_be_a_lock_wait(&self) -> bool {
        matches!(
            self,
            StoreError::Query(e @ diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::Unknown,
                _
            )) if !e.to_string().contains("statement timeout")
        )
    }

    /// An operator's statement that gave up waiting for a row lock becomes
    /// [`StoreError::RowLocked`]. PostgreSQL's code for it (55P03) does not reach this
    /// error, so its text is read; a server whose messages are in another language leaves
    /// the error as it is.
    fn lock_wait_named(self) -> StoreError {
        match self {
            StoreError::Query(e @ diesel::result::Error::DatabaseError(_, _))
                if e.to_string().contains("lock timeout") =>
            {
                StoreError::RowLocked(e)
            }
            other => other,
        }
    }

    /// A foreign key refused the statement: another table still references a row it would
    /// remove.
    pub fn is_foreign_key_violation(&self) -> bool {
        matches!(
            self,
            StoreError::Query(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::ForeignKeyViolation,
                _
            ))
        )
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

/// A schema name that passed [`check_schema_name`]. It displays double-quoted, the only
/// form in which a schema reaches SQL text, so statements can splice it in with `{s}` and
/// never inject SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Schema(String);

impl Schema {
    /// `name`, once checked.
    pub(crate) fn new(name: &str) -> Result<Schema, StoreError> {
        check_schema_name(name).map_err(StoreError::Schema)?;
        Ok(Schema(name.to_string()))
    }

    /// The name as configured, unquoted.
    pub(crate) fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

/// The statements run for every batch, formatted once for the schema (see the module
/// documentation); each part is owned by the module whose methods bind it.
struct Statements {
    claim: claim::Statements,
    leases: leases::Statements,
    settle: settle::Statements,
    dead_letters: dead_letters::Statements,
    inbox: inbox::Statements,
}

impl Statements {
    fn new(s: &Schema) -> Statements {
        Statements {
            claim: claim::Statements::new(s),
            leases: leases::Statements::new(s),
            settle: settle::Statements::new(s),
            dead_letters: dead_letters::Statements::new(s),
            inbox: inbox::Statements::new(s),
        }
    }
}

/// The connection pool plus the schema's statements. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool<AsyncPgConnection>,
    schema: Schema,
    statements: Arc<Statements>,
    url: SecretUrl,
    /// `database.connect_timeout` for each host of the URL, tried in turn.
    connect_timeout: Duration,
    /// Every statement in its own transaction (`database.pooler: transaction`).
    per_statement_tx: bool,
    /// How long one operation's statement may go unanswered before its connection is
    /// given up (see [`Store::bounded`]); none for the CLI's one-off statements.
    statement_bound: Option<Duration>,
    /// `statement_timeout` of each statement (see [`Store::with_statement_timeout`]).
    statement_timeout: Option<Duration>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("schema", &self.schema.name())
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

/// Opens the transaction one statement on a connection of its own (`establish`, the
/// registry's) runs in, its time bounded on the server when `bound` is given (`SET LOCAL
/// statement_timeout`: a statement the engine gives up on — a producer's lock, a frozen
/// server — must not keep running there, holding a backend and its locks). In a transaction,
/// the statement's prepare and execute stay on one server connection and nothing is left
/// there: behind a transaction-mode pooler (PgBouncer) a statement prepared outside one stays
/// on whichever server connection ran it, and another client that prepares the same name
/// there fails ("prepared statement \"s2\" already exists").
pub(crate) async fn begin(
    conn: &mut AsyncPgConnection,
    bound: Option<Duration>,
) -> Result<(), StoreError> {
    use diesel_async::SimpleAsyncConnection;
    conn.batch_execute(&begin_sql(bound)).await?;
    Ok(())
}

/// What the engine needs to know of the server it connected to before it starts.
#[derive(diesel::QueryableByName)]
pub(crate) struct ServerRole {
    /// `pg_is_in_recovery()`: a standby, which takes no writes.
    #[diesel(sql_type = diesel::sql_types::Bool)]
    pub(crate) standby: bool,
    /// This session's `statement_timeout` in milliseconds (0: none), as the role or the
    /// database set it: a short one cancels claims over a large backlog.
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    pub(crate) statement_timeout_ms: i64,
}

impl ServerRole {
    /// The `statement_timeout` in milliseconds when it is set and under
    /// [`SHORTEST_STATEMENT_TIMEOUT`] (the engine warns at start, `courier doctor` too).
    pub(crate) fn short_statement_timeout(&self) -> Option<i64> {
        let ms = self.statement_timeout_ms;
        (ms > 0 && ms < millis(SHORTEST_STATEMENT_TIMEOUT)).then_some(ms)
    }
}

/// -- name: server_role
pub(crate) const SERVER_ROLE: &str = "SELECT pg_is_in_recovery() AS standby, \
     (SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout') \
     AS statement_timeout_ms";

/// What to do about a standby given as the database (the error and `courier doctor`).
pub(crate) const STANDBY_FIX: &str =
    "give database.url the primary, or every host with target_session_attrs=read-write";

/// What to do about a short `statement_timeout` (the engine's warning and `courier doctor`):
/// a URL's `options` may set it as well as the role or the database.
pub(crate) const STATEMENT_TIMEOUT_FIX: &str = "raise it where it is set: database.url's \
     options (-c statement_timeout=10s), or Courier's role or database (ALTER ROLE … SET \
     statement_timeout = '10s')";

/// A `statement_timeout` below this can cancel the engine's claims and outcome writes over
/// a large backlog (measured: 15 ms cancelled most claims over 50,000 rows; 100 ms none).
pub(crate) const SHORTEST_STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);

/// [`ServerRole`] of `conn`'s server, in a transaction of its own (see [`begin`]).
pub(crate) async fn server_role(conn: &mut AsyncPgConnection) -> Result<ServerRole, StoreError> {
    use diesel_async::RunQueryDsl;
    begin(conn, None).await?;
    let read = diesel::sql_query(SERVER_ROLE).get_result(conn).await;
    end(conn, read).await
}

/// `BEGIN`, with `SET LOCAL statement_timeout` in the same round trip when `bound` is set.
pub(crate) fn begin_sql(bound: Option<Duration>) -> String {
    match bound {
        // PostgreSQL takes at most i32::MAX ms (about 24 days).
        Some(bound) => format!(
            "BEGIN; SET LOCAL statement_timeout = {}",
            millis(bound).clamp(1, i64::from(i32::MAX))
        ),
        None => "BEGIN".to_string(),
    }
}

/// Ends [`begin`]'s transaction: `COMMIT` after success, else `ROLLBACK`.
pub(crate) async fn end<T>(
    conn: &mut AsyncPgConnection,
    result: diesel::QueryResult<T>,
) -> Result<T, StoreError> {
    use diesel_async::SimpleAsyncConnection;
    conn.batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" })
        .await?;
    Ok(result?)
}

/// A pooled connection checked out again within this long of its last checkout is handed
/// out without a `SELECT 1`: it was working a moment ago, and a connection the server has
/// closed since is already marked closed (the pool then drops it). Under load every
/// checkout is recent, so the engine's claims and confirms skip a round trip each, and so
/// does a message on an idle engine; a connection idle longer (across a database restart,
/// say) is still verified before use.
const RECENT_CHECKOUT: Duration = Duration::from_secs(1);

/// The ping is a simple-protocol query, one message and no statement name: a prepared one
/// is parsed and executed in two round trips, between which a transaction-mode pooler may
/// hand the server connection to another client, leaving the name behind on it (another
/// process's statement of the same name then fails "prepared statement \"sN\" already
/// exists").
async fn verify_if_idle(conn: &mut AsyncPgConnection, idle: Duration) -> Result<(), HookError> {
    use diesel_async::SimpleAsyncConnection;
    if idle < RECENT_CHECKOUT {
        return Ok(());
    }
    conn.batch_execute("SELECT 1")
        .await
        .map_err(|e| HookError::Backend(PoolError::QueryError(e)))
}

/// Removes the URL and its secrets from a driver message, should it quote them.
fn scrub(message: &str, url: &SecretUrl) -> String {
    url.scrub(message)
}

impl Store {
    /// What a process starts with: migrates when `database.auto_migrate` is on (through
    /// `migrate_url` or the pooler's lock scope, as configured), then connects. While
    /// PostgreSQL cannot be reached, and `database.wait_at_start` is on, tries again with
    /// capped backoff (500 ms doubling to 10 s), saying so at each attempt: a consumer
    /// started before its database (a container's start order, a failover) waits for it,
    /// as the engine does. A permanent fault (TLS, authentication, a missing database)
    /// returns at once.
    pub async fn open(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = async {
                if cfg.auto_migrate {
                    migrate::migrate_config(cfg).await?;
                }
                Store::connect(cfg).await
            }
            .await;
            match result {
                Err(e) if e.is_transient() && cfg.wait_at_start => {
                    let delay = crate::backoff::ENGINE_START.delay(attempt);
                    tracing::warn!(error = %e, attempt, retry_in = ?delay, "PostgreSQL not available yet; retrying");
                    tokio::time::sleep(delay).await;
                }
                done => return done,
            }
        }
    }

    /// Builds the pool and checks that one connection can be made.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        let schema = Schema::new(&cfg.schema)?;
        let target = PgTarget::parse(&cfg.url)?;
        // The first connection is made outside the pool, so that a permanent refusal
        // (TLS, authentication, missing database) comes back as such.
        drop(connect::open(&target, cfg.connect_timeout).await?);
        let timeout = cfg.connect_timeout;
        let connect_wait = target.connect_wait(timeout);
        let mut manager_config = ManagerConfig::default();
        // Checked in `verify_if_idle` instead: only a connection that sat idle is pinged.
        manager_config.recycling_method = RecyclingMethod::Fast;
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
            .pre_recycle(Hook::async_fn(|conn, metrics| {
                Box::pin(verify_if_idle(conn, metrics.last_used()))
            }))
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        let store = Store {
            pool,
            statements: Arc::new(Statements::new(&schema)),
            schema,
            url: cfg.url.clone(),
            connect_timeout: connect_wait,
            per_statement_tx: cfg.pooler == Pooler::Transaction,
            statement_bound: None,
            statement_timeout: None,
        };
        Ok(store)
    }

    /// This store with every operation's statement bounded by `bound`: one left unanswered
    /// that long (a frozen server accepts bytes and never answers; TCP sees nothing wrong)
    /// fails with a connection error and its connection leaves the pool, so the next
    /// operation connects again, to the next host of a multi-host URL if this one stays
    /// silent. The engine bounds by its lease: past it the rows have lapsed anyway.
    pub(crate) fn bounded(mut self, bound: Duration) -> Store {
        self.statement_bound = Some(bound);
        self
    }

    /// Every statement of this store runs in a transaction of its own that first sets
    /// `statement_timeout` (`SET LOCAL`), so the server ends any statement that runs longer.
    /// Set per transaction, not at connect (libpq's `options`): PgBouncer refuses unknown
    /// start-up parameters, and a session `SET` behind a transaction-mode pooler would
    /// reach other clients' statements.
    pub(crate) fn with_statement_timeout(mut self, timeout: Duration) -> Store {
        self.statement_timeout = Some(timeout);
        self
    }

    /// The schema name.
    pub fn schema(&self) -> &str {
        self.schema.name()
    }

    /// The (secret) database URL, for opening dedicated connections.
    pub(crate) fn url(&self) -> &SecretUrl {
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
                reason: scrub(&self.pool_failure(&e), &self.url),
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

    /// Why the pool handed out no connection, in the cause's words: deadpool wraps the
    /// connect error in "Error occurred while creating a new object", and that connect
    /// error already names the target this error names again.
    fn pool_failure(&self, e: &diesel_async::pooled_connection::deadpool::PoolError) -> String {
        use diesel_async::pooled_connection::deadpool::PoolError as Failure;
        match e {
            Failure::Backend(cause) => {
                let text = cause.to_string();
                let prefix = format!("cannot connect to PostgreSQL at {}: ", self.url.redacted());
                text.strip_prefix(&prefix)
                    .map_or(text.clone(), str::to_string)
            }
            Failure::Timeout(_) => "no pooled connection came free or could be made in time".into(),
            Failure::Closed => "the connection pool is closed (the engine is stopping)".into(),
            other => other.to_string(),
        }
    }

    /// A pooled connection for one operation (see [`op_conn`]).
    pub(crate) async fn op(&self) -> Result<op_conn::OpConn, StoreError> {
        Ok(op_conn::OpConn::new(
            self.conn().await?,
            self.per_statement_tx,
            self.statement_bound,
            self.statement_timeout,
        ))
    }

    /// [`ServerRole`] of the server behind the pool.
    pub(crate) async fn server_role(&self) -> Result<ServerRole, StoreError> {
        let mut conn = self.op().await?;
        let mut rows: Vec<ServerRole> = conn.fetch_all(diesel::sql_query(SERVER_ROLE)).await?;
        rows.pop()
            .ok_or(StoreError::Query(diesel::result::Error::NotFound))
    }
}

/// How long an engine write waits for a row lock another transaction holds (a producer's or
/// an operator's, left open) before it goes on without that row: the engine's own
/// statements hold a row for milliseconds. An outcome write is then made again without it,
/// a move to `dead_letters` one row at a time.
const ROW_LOCK_WAIT: &str = "1s";

/// How long an operator's change (a requeue, a discard) waits for a row lock another
/// transaction holds before it gives up with [`StoreError::RowLocked`]. Without a bound it
/// waited silently, and a command killed meanwhile still happened when the lock went (the
/// server keeps the statement). Set inside the statement, so it holds behind a pooler.
const OPERATOR_LOCK_WAIT: &str = "3s";

/// A `WHERE` guard that sets `lock_timeout` to `wait` for the statement's own transaction
/// only (an initplan, run before any row is locked): the bound travels with the statement,
/// so it holds behind a transaction-mode pooler and reaches no other statement.
fn lock_wait_guard(wait: &str) -> String {
    format!("(SELECT set_config('lock_timeout', '{wait}', true)) IS NOT NULL")
}

/// The id a statement returns (`RETURNING id`).
#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

/// A single-row read that found no row is an answer (`None`), not a failure.
fn not_found_is_none<T>(e: diesel::result::Error) -> Result<Option<T>, diesel::result::Error> {
    match e {
        diesel::result::Error::NotFound => Ok(None),
        other => Err(other),
    }
}

/// A duration as the `bigint` milliseconds statements take, at most
/// [`crate::config::MAX_DURATION`]: statements add these to `now()`, and a longer interval
/// (a `--since` or `?since=` of a million years) would overflow the timestamp.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.min(crate::config::MAX_DURATION).as_millis()).unwrap_or(i64::MAX)
}

/// A byte count as `bigint` (saturating).
fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::pooler_hint;

    #[test]
    fn a_prepared_statement_error_names_the_pooler() {
        for text in [
            "prepared statement \"s3\" already exists",
            "prepared statement \"s12\" does not exist",
        ] {
            assert!(
                pooler_hint(text).contains("database.pooler: transaction"),
                "{text}"
            );
        }
        assert_eq!(pooler_hint("relation \"outbox\" does not exist"), "");
        // An error quoting another that already says so is not told twice.
        let told = format!(
            "prepared statement \"s9\" already exists{}",
            pooler_hint("prepared statement \"s9\" already exists")
        );
        assert_eq!(pooler_hint(&told), "");
    }
}
