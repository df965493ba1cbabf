//! Shared test helpers: every test gets its own PostgreSQL schema (and, for broker tests,
//! its own exchange and queue names), dropped afterwards, so tests run in parallel and never
//! see each other's rows.
#![allow(dead_code)]

pub mod broker;
pub mod proxy;

use std::{future::Future, time::Duration};

use courier::{
    config::{Config, SecretUrl},
    store::Store,
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

/// A unique, valid schema / resource name for one test.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t_{prefix}_{}", &id[..12])
}

/// A test's own schema, migrated, and dropped (with everything in it) on drop.
pub struct TestDb {
    pub schema: String,
    pub config: Config,
}

impl TestDb {
    /// Creates and migrates a fresh schema named after `prefix`.
    pub async fn new(prefix: &str) -> TestDb {
        let schema = unique_name(prefix);
        let mut config = Config::default();
        config.database.url = SecretUrl::new(database_url());
        config.broker.url = SecretUrl::new(broker_url());
        config.database.schema = schema.clone();
        courier::store::migrate(&config.database.url, &schema, Duration::from_secs(10))
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

/// Drops a schema created outside [`TestDb`] (e.g. by the binary) when it goes out of scope.
pub struct TestDbGuard(pub String);

impl Drop for TestDbGuard {
    fn drop(&mut self) {
        drop_schema(self.0.clone());
    }
}

fn drop_schema(schema: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            if let Ok(mut conn) = AsyncPgConnection::establish(&database_url()).await {
                let _ = conn
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .await;
            }
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
