//! Shared test helpers: every test gets its own PostgreSQL schema (and, for broker tests,
//! its own exchange and queue names), dropped afterwards, so tests run in parallel and never
//! see each other's rows.
#![allow(dead_code)]

pub mod audit;
pub mod broker;
pub mod events;
pub mod ordering;
pub mod proxy;
pub mod topology;
pub mod user;

use courier::testing::StoreInternals as _;
use std::{future::Future, time::Duration};

use courier::{
    config::{Config, SecretUrl},
    Store,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};

/// The database the tests use (`COURIER_TEST_DATABASE_URL`, default local trust auth).
pub fn database_url() -> String {
    std::env::var("COURIER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The broker the tests use (`COURIER_TEST_BROKER_URL`, default guest on localhost).
pub fn broker_url() -> String {
    std::env::var("COURIER_TEST_BROKER_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The variables that configure the tests themselves, not Courier.
const TEST_VARIABLES: &[&str] = &["COURIER_TEST_", "COURIER_SOAK", "COURIER_HOSTILE_"];

/// The `courier` binary as a command, without the test variables ([`TEST_VARIABLES`]): the
/// binary reads every other `COURIER_*` variable as a configuration key and refuses one that
/// names none.
pub fn courier_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_courier"));
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if TEST_VARIABLES.iter().any(|t| name.starts_with(t)) {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

/// A unique, valid schema / resource name for one test.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t_{prefix}_{}", &id[..12])
}

/// Logs to the test output, filtered by `RUST_LOG` (silent by default).
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A test's own schema, migrated, and dropped (with everything in it) on drop.
pub struct TestDb {
    pub schema: String,
    pub config: Config,
}

impl TestDb {
    /// Creates and migrates a fresh schema named after `prefix`.
    pub async fn new(prefix: &str) -> TestDb {
        init_logs();
        let schema = unique_name(prefix);
        let mut config = Config::default();
        config.database.url = SecretUrl::new(database_url());
        config.broker.url = SecretUrl::new(broker_url()).into();
        config.database.schema = schema.clone();
        courier::migrate(&config.database.url, &schema, Duration::from_secs(10))
            .await
            .expect("migrate test schema");
        TestDb { schema, config }
    }

    /// A pool-backed store on this schema.
    pub async fn store(&self) -> Store {
        Store::connect(&self.config.database)
            .await
            .expect("connect store")
    }

    /// A plain connection (not pooled), for raw SQL in tests.
    pub async fn raw(&self) -> AsyncPgConnection {
        AsyncPgConnection::establish(&database_url())
            .await
            .expect("connect")
    }

    /// A transaction left open holding rows `ids` of `table` locked (`SELECT … FOR
    /// UPDATE`), as a producer's or an operator's may be: `COMMIT` or `ROLLBACK` on the
    /// connection returned ends it.
    pub async fn hold_locked(&self, table: &str, ids: &[uuid::Uuid]) -> AsyncPgConnection {
        use diesel_async::SimpleAsyncConnection;
        let list: Vec<String> = ids.iter().map(|id| format!("'{id}'")).collect();
        let mut conn = self.raw().await;
        conn.batch_execute(&format!(
            "BEGIN; SELECT 1 FROM \"{}\".{table} WHERE id IN ({}) FOR UPDATE",
            self.schema,
            list.join(", ")
        ))
        .await
        .expect("lock rows");
        conn
    }

    /// Runs SQL with `{s}` replaced by the quoted schema.
    pub async fn exec(&self, sql: &str) {
        let mut conn = self.raw().await;
        conn.batch_execute(&sql.replace("{s}", &format!("\"{}\"", self.schema)))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        drop_schema(self.schema.clone());
    }
}

/// Awaits `fut` or fails the test after `secs` seconds, naming `what`.
pub async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s waiting for {what}"),
    }
}

/// Polls `check` until it returns `Some`, failing after `secs` seconds. For conditions that
/// only the database can tell (no event exists for them); polls every 20 ms.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    within(secs, what, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A store on `schema` once a `courier run` process has applied every migration to it (not
/// just the first: enqueueing writes columns later ones add). Fails after `secs` seconds.
pub async fn migrated_by_process(schema: &str, secs: u64) -> Store {
    #[derive(diesel::QueryableByName)]
    struct Applied {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    use diesel_async::RunQueryDsl;
    let mut config = Config::default();
    config.database.url = SecretUrl::new(database_url());
    config.database.schema = schema.to_string();
    let all = courier::testing::MIGRATION_NAMES().len() as i64;
    eventually(secs, "every migration applied by `courier run`", || {
        let config = config.clone();
        let schema = schema.to_string();
        async move {
            let store = Store::connect(&config.database).await.ok()?;
            let mut conn = store.conn().await.ok()?;
            let applied: Applied = diesel::sql_query(format!(
                "SELECT count(*) AS n FROM \"{schema}\".__diesel_schema_migrations"
            ))
            .get_result(&mut conn)
            .await
            .ok()?;
            drop(conn);
            (applied.n == all).then_some(store)
        }
    })
    .await
}

/// Drops a schema created outside [`TestDb`] (e.g. by the binary) when it goes out of scope.
pub struct TestDbGuard(pub String);

impl Drop for TestDbGuard {
    fn drop(&mut self) {
        drop_schema(self.0.clone());
    }
}

/// Drops a test's schema from `Drop`, which blocks the test's thread, so the drop must not
/// wait on that thread. A statement of the test's own engine cut off at shutdown (between
/// `BEGIN` and `COMMIT` behind PgBouncer, say) leaves a server connection in a transaction
/// holding locks on the schema until the test's runtime closes its socket, and that runtime
/// is the one blocked here. So the drop waits a few seconds for its locks, then ends the
/// sessions that hold locks in the schema (the schema is this test's alone) and tries again.
fn drop_schema(schema: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let Ok(mut conn) = AsyncPgConnection::establish(&database_url()).await else {
                return;
            };
            let drop =
                format!("SET lock_timeout = '5s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
            if conn.batch_execute(&drop).await.is_ok() {
                return;
            }
            let _ = conn
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(l.pid)
                     FROM pg_locks l
                     JOIN pg_class c ON c.oid = l.relation
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = '{schema}' AND l.pid <> pg_backend_pid()"
                ))
                .await;
            let _ = conn.batch_execute(&drop).await;
        });
    })
    .join();
}

impl TestDb {
    /// This schema's config, tuned for tests: short backoff, quick sweep, quick summary.
    pub fn engine_config(&self) -> Config {
        let mut c = self.config.clone();
        c.database.auto_migrate = false;
        c.database.pool_size = 4;
        c.retry.backoff.initial = Duration::from_millis(20);
        c.retry.backoff.max = Duration::from_millis(200);
        c.retry.confirm_timeout = Duration::from_secs(10);
        c.scheduler.sweep_interval = Duration::from_millis(250);
        c.scheduler.lease_duration = Duration::from_secs(30);
        c.shutdown.timeout = Duration::from_secs(10);
        c
    }

    /// Inserts `n` rows with the contract's minimal SQL, routing keys from `key(i)`.
    pub async fn insert_sql(&self, exchange: &str, n: usize, key: &str) -> Vec<uuid::Uuid> {
        #[derive(diesel::QueryableByName)]
        struct IdRow {
            #[diesel(sql_type = diesel::sql_types::Uuid)]
            id: uuid::Uuid,
        }
        use diesel_async::RunQueryDsl;
        let mut conn = self.raw().await;
        let sql = format!(
            "INSERT INTO \"{}\".outbox (exchange, routing_key, payload)
             SELECT $1, replace($2, '{{i}}', i::text), convert_to('m' || i, 'UTF8')
             FROM generate_series(1, $3) AS i RETURNING id",
            self.schema
        );
        let rows: Vec<IdRow> = diesel::sql_query(sql)
            .bind::<diesel::sql_types::Text, _>(exchange)
            .bind::<diesel::sql_types::Text, _>(key)
            .bind::<diesel::sql_types::Integer, _>(n as i32)
            .load(&mut conn)
            .await
            .expect("insert rows");
        rows.into_iter().map(|r| r.id).collect()
    }
}

/// A `courier run` process on a test schema; killed (SIGKILL) if still running on drop.
pub struct EngineProcess {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl EngineProcess {
    /// Starts `courier run` with `COURIER_*` overrides; its log goes to a file.
    pub fn spawn(name: &str, env: &[(&str, String)]) -> EngineProcess {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("engine-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        let log = dir.join(format!("{}.log", unique_name(name)));
        let file = std::fs::File::create(&log).expect("log file");
        let child = courier_command()
            .arg("run")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn courier run");
        EngineProcess { child, log }
    }

    /// Sends signal `sig` (`-TERM`, `-STOP`, `-CONT`…) with `kill`; whether it was sent.
    pub fn signal(&self, sig: &str) -> bool {
        std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// SIGTERM, then waits (bounded) for the exit status.
    pub async fn terminate(&mut self, secs: u64) -> std::process::ExitStatus {
        let _ = self.signal("-TERM");
        self.wait(secs).await
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        within(secs, "engine process exit", async {
            loop {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestDb {
    /// Registry rows written by hand: engine `other` on another host, running (it beat
    /// just now) and holding one row, and engine `ghost`, dead for an hour (a dead engine's
    /// rows were freed when it was declared dead, so it holds none). A test that starts an
    /// engine beside them sets a long `scheduler.engine_timeout`, so `other` stays running.
    pub async fn engines_beside(&self) {
        let store = self.store().await;
        store
            .enqueue_many(&[courier::OutboxMessage::new("ex.other", "k", b"x".to_vec())])
            .await
            .expect("enqueue");
        store
            .claim("other", 1, Duration::from_secs(600))
            .await
            .expect("claim");
        self.exec(
            "INSERT INTO {s}.engines (id, host, pid, version, state, heartbeat_at, started_at)
             VALUES ('other', 'elsewhere', 7, '0.0.1', 'running', now(), now() - interval '1 minute'),
                    ('ghost', 'elsewhere', 8, '0.0.1', 'dead', now() - interval '1 hour',
                     now() - interval '2 hours')",
        )
        .await;
    }

    /// `COURIER_*` variables that point a `courier run` process at this schema.
    pub fn process_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("COURIER_DATABASE_URL", database_url()),
            ("COURIER_DATABASE_SCHEMA", self.schema.clone()),
            ("COURIER_DATABASE_POOL_SIZE", "4".into()),
            ("COURIER_BROKER_URL", broker_url()),
            ("COURIER_SCHEDULER_SWEEP_INTERVAL", "100ms".into()),
            ("COURIER_RETRY_BACKOFF_INITIAL", "20ms".into()),
            ("COURIER_RETRY_BACKOFF_MAX", "200ms".into()),
            ("COURIER_LOGGING_LEVEL", "info".into()),
        ]
    }

    /// Rows by status right now, counted exactly (`Store::stats` stops counting at its
    /// bound, and fault tests wait for exact totals of tens of thousands).
    pub async fn count(&self, status: courier::Status) -> i64 {
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut conn = self.raw().await;
        let sql = format!(
            "SELECT count(*) AS n FROM \"{}\".outbox WHERE status::text = $1",
            self.schema
        );
        let row: N = diesel_async::RunQueryDsl::get_result(
            diesel::sql_query(sql).bind::<diesel::sql_types::Text, _>(status.as_str()),
            &mut conn,
        )
        .await
        .expect("count");
        row.n
    }
}

/// One HTTP/1.1 request to the admin API; the status and the body.
pub async fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
        .await
        .expect("send request");
    let mut buf = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
        .await
        .expect("read answer");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Nothing left in flight or retrying, and the engine still delivers a new row.
pub async fn assert_live(db: &TestDb, engine: &courier::EngineHandle, exchange: &str) {
    assert_eq!(
        db.count(courier::Status::InFlight).await,
        0,
        "rows left in flight"
    );
    assert_eq!(
        db.count(courier::Status::Retrying).await,
        0,
        "rows left retrying"
    );
    let probe = courier::OutboxMessage::new(exchange, "routed.probe", b"probe".to_vec());
    engine.store().enqueue(&probe).await.expect("enqueue probe");
    engine.nudge();
    let outcome = engine
        .wait_for(probe.id, std::time::Duration::from_secs(120))
        .await
        .expect("probe settles");
    assert_eq!(
        outcome,
        courier::Outcome::Confirmed,
        "the engine no longer delivers"
    );
}
