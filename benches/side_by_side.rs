//! The side-by-side bench: in one run on one machine, against the real PostgreSQL and
//! RabbitMQ, it measures and prints a table with ratios:
//!
//! - **raw lapin** (the limit): the same messages published with pipelined confirms, no
//!   database;
//! - **naive**: the design of older articles — select one row, publish, wait for its
//!   confirm, update the row, one at a time;
//! - **Courier** end to end (rows committed to the outbox → all confirmed and marked) with
//!   1, 2 and 3 `courier run` processes, classic and quorum queues; and with the rows
//!   spread over 1, 100, 1,000 and 10,000 ordering keys (classic);
//! - commit→confirmed latency of single messages on an idle engine (p50, p99), beside its
//!   floor paced the same: the broker's own publish→confirm and one database write;
//!
//! with peak RSS and CPU seconds per 10k messages for each (every variant runs as its own
//! process, measured from `/proc`). Each Courier variant runs right after raw lapin at window
//! 1,024, and its row gives both ratios: to the limit measured at the start of the run, and to
//! the one measured just before it (the broker's own speed drifts over a run).
//!
//! ```sh
//! cargo bench --bench side_by_side                 # BENCH_N=50000 messages per variant
//!     (BENCH_NAIVE_N=2000 for the naive design, BENCH_ONE_KEY_N=2000 for one key)
//! BENCH_BACKLOG=1000000 (default): at the end, the engine's peak RSS while it works through
//!     that many waiting rows (0 leaves it out; the inserts take minutes)
//! BENCH_LATENCY_N=500 (default): the idle latency line's messages (0 leaves it out)
//! BENCH_SUSTAIN=1000000: a sustained run with retention, the outbox's size read as it goes
//! BENCH_N=200000 cargo bench --bench side_by_side
//! BENCH_QUEUES=classic BENCH_BACKLOG=0 cargo bench --bench side_by_side   # classic only
//! BENCH_WINDOWS=500,1000,2000 cargo bench --bench side_by_side   # + fixed in-flight windows,
//!     raw lapin at the same windows, and a crash line per window (max_in_flight)
//! BENCH_RUN0=1: each keyed variant also with `ordering.run: 0` (heads only, the old way)
//! BENCH_HISTORY=0,1000000,5000000: drain BENCH_HISTORY_N (50,000) new rows into a table
//!     already holding that many confirmed rows (a week of history), one line each, each
//!     right after raw lapin on the same queue;
//!     BENCH_HISTORY_FILL=sparse leaves the history's pages two-thirds free (see fill_history)
//! BENCH_FILLFACTOR=100: the outbox's fillfactor for every drain (default: the migrations',
//!     50), to measure a page full at insert against one with room for a row's updates
//! BENCH_SSLMODE=disable: the engines reach PostgreSQL without TLS (default: libpq's
//!     `prefer`, TLS when the server offers it)
//! BENCH_CRASH_N=5000 (default): the classic table's crash line (kill -9 at a fifth confirmed);
//!     0 leaves it out
//! BENCH_ENGINES=1,2,3 and BENCH_KEYS=1,100,1000,10000 (defaults): which engine counts and
//!     key counts run (an empty list runs none), to repeat one comparison quickly
//! Any COURIER_* variable set for the bench reaches every engine it starts (e.g.
//!     COURIER_ORDERING_RUN=0)
//! BENCH_ENGINE_LOG=debug: the engines' log filter (default warn), on the bench's stderr
//! BENCH_QUEUES=none BENCH_BACKLOG=0 BENCH_LARGE=40 cargo bench --bench side_by_side
//!                                   # peak RSS with 40 × 20 MiB payloads, byte budget or not
//! ```

use std::{
    collections::HashMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use diesel::{sql_types::BigInt, QueryableByName};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures::{stream::FuturesUnordered, StreamExt};
use lapin::{
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
        QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

const DB: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const EXCHANGE: &str = "courier.bench";
const PAYLOAD: usize = 256;
/// The idle latency line's pace: it polls for each row's confirm this often before it
/// commits the next, and its floor waits as long between samples, so the two are paced
/// alike.
const IDLE_PACE: Duration = Duration::from_millis(5);

/// A comma-separated list of numbers (`BENCH_ENGINES`, `BENCH_KEYS`); unset: `default`.
fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(name) {
        Ok(v) => v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
        Err(_) => default.to_vec(),
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one variant measured.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    messages: usize,
    seconds: f64,
    rss_mb: f64,
    cpu_per_10k: f64,
    /// Courier rows: the raw limit (window 1,024) measured just before this variant.
    raw_before: Option<f64>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

/// Peak RSS (MB) and CPU seconds of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after ") ".
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the state field.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    (hwm_kb / 1024.0, cpu)
}

/// CPU seconds used so far by every process whose name is `comm` (e.g. `beam.smp`,
/// `postgres`): the system-level profile of where a run's CPU goes.
fn cpu_of(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == comm)
                .unwrap_or(false)
        })
        .map(|pid| proc_usage(pid).1)
        .sum()
}

fn self_usage() -> (f64, f64) {
    proc_usage(std::process::id())
}

// ---------------------------------------------------------------- broker and database setup

async fn amqp() -> Connection {
    Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672")
}

/// (Re)creates the bench queue of `kind` bound to the bench exchange, empty.
async fn fresh_queue(kind: &str) -> String {
    let conn = amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let queue = format!("courier.bench.{kind}");
    // Only one bench queue is bound at a time, so each variant pays for one queue.
    for old in ["courier.bench.classic", "courier.bench.quorum"] {
        let _ = ch
            .queue_delete(old.into(), QueueDeleteOptions::default())
            .await;
    }
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(kind.into()));
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(queue.as_str().into(), opts, args)
        .await
        .expect("queue");
    ch.queue_bind(
        queue.as_str().into(),
        EXCHANGE.into(),
        "bench.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let _ = conn.close(200, "ok".into()).await;
    queue
}

async fn purge(queue: &str) {
    let conn = amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch
        .queue_purge(queue.into(), QueuePurgeOptions::default())
        .await;
    let _ = conn.close(200, "ok".into()).await;
}

async fn db() -> AsyncPgConnection {
    AsyncPgConnection::establish(DB)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432")
}

async fn fresh_schema(schema: &str) {
    let mut c = db().await;
    c.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .await
        .expect("drop");
    courier::migrate(
        &courier::config::SecretUrl::new(DB),
        schema,
        Duration::from_secs(10),
    )
    .await
    .expect("migrate");
    // BENCH_FILLFACTOR=100 measures the outbox as it was before its migration 9 (the
    // fillfactor that leaves room on a page for a row's later versions).
    if let Ok(ff) = std::env::var("BENCH_FILLFACTOR") {
        let ff: u8 = ff
            .parse()
            .expect("BENCH_FILLFACTOR: a number from 10 to 100");
        c.batch_execute(&format!(
            "ALTER TABLE \"{schema}\".outbox SET (fillfactor = {ff})"
        ))
        .await
        .expect("set fillfactor");
    }
}

async fn insert_rows(schema: &str, n: usize) {
    insert_keyed_rows(schema, n, None).await
}

/// Rows spread round-robin over `keys` ordering keys (`None`: unkeyed rows), committed in
/// one transaction: a drain is timed from that commit, and rows committed earlier (a first
/// chunk) would be published before the clock starts.
///
/// The insert's own WAL counts are published to `pg_stat_wal` before the commit's reply
/// (`pg_stat_force_next_flush`, PostgreSQL 15): a backend otherwise publishes them up to a
/// second later, and a drain read just after the insert then counted the insert's WAL as its
/// own (about 560 bytes per message more, in a few drains of one run).
async fn insert_keyed_rows(schema: &str, n: usize, keys: Option<usize>) {
    let mut c = db().await;
    let payload = "x".repeat(PAYLOAD);
    let key = keys.map_or("NULL".to_string(), |k| format!("'k' || (i % {k})"));
    c.batch_execute(&format!(
        "INSERT INTO \"{schema}\".outbox (exchange, routing_key, payload, ordering_key)
         SELECT '{EXCHANGE}', 'bench.' || i, convert_to('{payload}', 'UTF8'), {key}
         FROM generate_series(1, {n}) i ORDER BY i;
         SELECT pg_stat_force_next_flush();"
    ))
    .await
    .expect("insert");
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn confirmed(c: &mut AsyncPgConnection, schema: &str) -> i64 {
    confirmed_since(c, schema, "-infinity").await
}

/// Rows confirmed since `since` (a database timestamp): counted through the partial index
/// on `confirmed_at`, so a table with history costs the bench's polling nothing.
async fn confirmed_since(c: &mut AsyncPgConnection, schema: &str, since: &str) -> i64 {
    let r: Count = diesel::sql_query(format!(
        "SELECT count(*) AS n FROM \"{schema}\".outbox
         WHERE status = 'confirmed' AND confirmed_at >= '{since}'::timestamptz"
    ))
    .get_result(c)
    .await
    .expect("count");
    r.n
}

/// Whether any row is still to be delivered: one probe of the open rows' partial indexes
/// (a count of the rows confirmed so far reads every one of them). It still steps over the
/// dead entries a drain leaves at the start of those indexes, so the drain asks it only
/// once every row has reached the queue (see [`QueueWatch`]). Once none is open, the drain
/// counts once.
async fn any_open(c: &mut AsyncPgConnection, schema: &str) -> bool {
    #[derive(QueryableByName)]
    struct Open {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        open: bool,
    }
    let r: Open = diesel::sql_query(format!(
        "SELECT EXISTS (SELECT 1 FROM {t} WHERE status IN ('pending', 'retrying')
                                               AND ordering_key IS NULL)
             OR EXISTS (SELECT 1 FROM {t} WHERE status IN ('pending', 'retrying')
                                          AND ordering_key IS NOT NULL)
             OR EXISTS (SELECT 1 FROM {t} WHERE status = 'in_flight') AS open",
        t = format!("\"{schema}\".outbox")
    ))
    .get_result(c)
    .await
    .expect("open rows");
    r.open
}

// ---------------------------------------------------------------- child modes

fn props() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Publishes as Courier does: `mandatory`, so an unroutable message comes back.
fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        immediate: false,
    }
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch
}

/// Raw lapin: pipelined confirms, `window` outstanding, no database.
async fn mode_raw(n: usize, window: usize) -> f64 {
    let conn = amqp().await;
    let ch = confirm_channel(&conn).await;
    let payload = vec![b'x'; PAYLOAD];
    let opts = mandatory();
    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    for i in 0..n {
        if pending.len() >= window {
            let r: Result<Confirmation, lapin::Error> = pending.next().await.expect("confirm");
            assert!(r.expect("confirm").is_ack());
        }
        let confirm = ch
            .basic_publish(
                EXCHANGE.into(),
                format!("bench.{i}").into(),
                opts,
                &payload,
                props(),
            )
            .await
            .expect("publish");
        pending.push(confirm);
    }
    while let Some(r) = pending.next().await {
        assert!(r.expect("confirm").is_ack());
    }
    start.elapsed().as_secs_f64()
}

/// The naive design: one row at a time, select, publish, wait, update.
async fn mode_naive(schema: &str, n: usize) -> f64 {
    let conn = amqp().await;
    let ch = confirm_channel(&conn).await;
    let mut c = db().await;
    #[derive(QueryableByName)]
    struct One {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        id: uuid::Uuid,
        #[diesel(sql_type = diesel::sql_types::Text)]
        routing_key: String,
        #[diesel(sql_type = diesel::sql_types::Bytea)]
        payload: Vec<u8>,
    }
    let opts = mandatory();
    let start = Instant::now();
    for _ in 0..n {
        let row: One = diesel::sql_query(format!(
            "SELECT id, routing_key, payload FROM \"{schema}\".outbox
             WHERE status = 'pending' ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED"
        ))
        .get_result(&mut c)
        .await
        .expect("select");
        let confirm = ch
            .basic_publish(
                EXCHANGE.into(),
                row.routing_key.into(),
                opts,
                &row.payload,
                props(),
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack());
        diesel::sql_query(format!(
            "UPDATE \"{schema}\".outbox SET status = 'confirmed', confirmed_at = now() WHERE id = $1"
        ))
        .bind::<diesel::sql_types::Uuid, _>(row.id)
        .execute(&mut c)
        .await
        .expect("update");
    }
    start.elapsed().as_secs_f64()
}

/// Runs this bench binary in a child mode and reads back "seconds rss cpu".
fn child(mode: &[&str]) -> (f64, f64, f64) {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .arg("--child")
        .args(mode)
        .stderr(Stdio::inherit())
        .output()
        .expect("run child");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("child {mode:?} printed no result: {text}"));
    let v: Vec<f64> = line[7..]
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (v[0], v[1], v[2])
}

/// Raw lapin (no database) publishing `n` messages with at most `window` unconfirmed.
fn raw_lapin(kind: &str, n: usize, window: &str) -> Row {
    let broker0 = cpu_of("beam.smp");
    let (secs, rss, cpu) = child(&["raw", &n.to_string(), window]);
    // The broker's share with nothing else running: what it can take when it is the bound.
    eprintln!(
        "  cpu during raw lapin, window {window}: broker {:.0}%, publisher {:.0}% of one core over {secs:.1} s",
        (cpu_of("beam.smp") - broker0) / secs * 100.0,
        cpu / secs * 100.0,
    );
    Row {
        name: format!("raw lapin, window {window} ({kind})"),
        messages: n,
        seconds: secs,
        rss_mb: rss,
        cpu_per_10k: cpu / (n as f64 / 1e4),
        raw_before: None,
    }
}

/// Runs a Courier variant right after raw lapin at window 1,024 on the same queue, and
/// keeps that raw rate with it. The broker's own limit drifts over a run and between runs
/// (quorum queues most: 18–37k msg/s here), so a ratio to the limit measured at the start,
/// minutes earlier, says as much about the drift as about Courier; the table shows both.
fn paired(
    rt: &tokio::runtime::Runtime,
    kind: &str,
    queue: &str,
    n: usize,
    variant: impl std::future::Future<Output = Row>,
) -> Row {
    let raw = raw_lapin(kind, n, "1024");
    rt.block_on(purge(queue));
    let mut row = rt.block_on(variant);
    row.raw_before = Some(raw.rate());
    row
}

fn run_child(args: &[String]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let seconds = rt.block_on(async {
        match args[0].as_str() {
            "raw" => {
                mode_raw(
                    args[1].parse().expect("n"),
                    args[2].parse().expect("window"),
                )
                .await
            }
            "naive" => mode_naive(&args[1], args[2].parse().expect("n")).await,
            other => panic!("unknown mode {other}"),
        }
    });
    let (rss, cpu) = self_usage();
    println!("RESULT {seconds} {rss} {cpu}");
}

// ---------------------------------------------------------------- Courier processes

/// The engines' database URL: libpq's default `sslmode=prefer` takes TLS when the server
/// offers it (Debian's does, with its snakeoil certificate), as a user's engine would;
/// BENCH_SSLMODE=disable measures plain loopback, like the bench's own connections.
fn engine_db_url() -> String {
    match std::env::var("BENCH_SSLMODE") {
        Ok(mode) => format!("{DB}?sslmode={mode}"),
        Err(_) => DB.to_string(),
    }
}

fn courier_env(schema: &str) -> Vec<(&'static str, String)> {
    vec![
        ("COURIER_DATABASE_URL", engine_db_url()),
        ("COURIER_DATABASE_SCHEMA", schema.into()),
        ("COURIER_DATABASE_AUTO_MIGRATE", "false".into()),
        ("COURIER_BROKER_URL", AMQP.into()),
        // BENCH_ENGINE_LOG: the engines' log filter (their stderr is the bench's).
        (
            "COURIER_LOGGING_LEVEL",
            std::env::var("BENCH_ENGINE_LOG").unwrap_or_else(|_| "warn".into()),
        ),
    ]
}

fn spawn_engine(schema: &str, extra: &[(&str, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("run")
        // The tests' own variables are no configuration keys: the engine would refuse them.
        .env_remove("COURIER_TEST_DATABASE_URL")
        .env_remove("COURIER_TEST_BROKER_URL")
        .envs(courier_env(schema).into_iter().chain(extra.iter().cloned()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn courier run")
}

/// Engine processes, killed if the bench panics before `stop`.
struct Engines(Vec<Child>);

impl Drop for Engines {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn stop(mut engines: Engines) -> (f64, f64) {
    let mut rss: f64 = 0.0;
    let mut cpu = 0.0;
    for c in &mut engines.0 {
        let (r, u) = proc_usage(c.id());
        rss = rss.max(r);
        cpu += u;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let _ = c.wait();
    }
    (rss, cpu)
}

/// Starts `engines` idle engines, commits `n` rows, times until all are confirmed.
async fn courier_drain(schema: &str, queue: &str, n: usize, engines: usize) -> Row {
    courier_drain_keyed(schema, queue, n, engines, None, &[]).await
}

/// [`courier_drain`] with the rows spread over `keys` ordering keys.
async fn courier_drain_keyed(
    schema: &str,
    queue: &str,
    n: usize,
    engines: usize,
    keys: Option<usize>,
    extra: &[(&str, String)],
) -> Row {
    fresh_schema(schema).await;
    drain(schema, queue, n, engines, keys, extra).await
}

/// Starts the engines on `schema` as it is, commits `n` rows and times until all are
/// confirmed (on top of any rows confirmed before).
async fn drain(
    schema: &str,
    queue: &str,
    n: usize,
    engines: usize,
    keys: Option<usize>,
    extra: &[(&str, String)],
) -> Row {
    purge(queue).await;
    let children = Engines((0..engines).map(|_| spawn_engine(schema, extra)).collect());
    let mut c = db().await;
    #[derive(QueryableByName)]
    struct Now {
        #[diesel(sql_type = diesel::sql_types::Text)]
        now: String,
    }
    let since: Now = diesel::sql_query("SELECT now()::text AS now")
        .get_result(&mut c)
        .await
        .expect("now");
    // Engines are idle and listening once their first sweep has run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Timed from the commit: rows in the outbox → all confirmed and marked.
    let before_insert = db_work(&mut c).await;
    let inserting = Instant::now();
    insert_keyed_rows(schema, n, keys).await;
    let insert_seconds = inserting.elapsed().as_secs_f64();
    let (broker0, pg0) = (cpu_of("beam.smp"), cpu_of("postgres"));
    let work0 = db_work(&mut c).await;
    eprintln!(
        "  the producer's insert of {n} rows: {insert_seconds:.2} s, {:.0} WAL bytes ({:.3} full-page images) per row",
        (work0.wal_bytes - before_insert.wal_bytes) / n as f64,
        (work0.fpi - before_insert.fpi) as f64 / n as f64,
    );
    let start = Instant::now();
    let watch = QueueWatch::open(queue).await;
    // Once a second the outbox is asked as well: a row that never reaches the queue (dead-
    // lettered) must end the wait, and the assertion below says what went wrong.
    let mut asked_at = Instant::now();
    // The drain's two ends, apart from its middle: the first message in the queue (the
    // engine's wake-up and first claim) and the last row settled after every message is in
    // the queue (the last confirms and outcome write).
    let mut first_in_queue = None;
    let mut all_in_queue = None;
    loop {
        let d = watch.depth().await;
        if d > 0 && first_in_queue.is_none() {
            first_in_queue = Some(start.elapsed());
        }
        if d >= n as u32 {
            all_in_queue = Some(start.elapsed());
            break;
        }
        if asked_at.elapsed() >= Duration::from_secs(1) {
            asked_at = Instant::now();
            if !any_open(&mut c, schema).await {
                break;
            }
        }
        // Every millisecond until the first message arrives (its time is a figure of the
        // drain), for a second at most: a drain whose rows never reach the queue must not
        // keep the broker answering a thousand declares a second.
        let first_second = first_in_queue.is_none() && start.elapsed() < Duration::from_secs(1);
        let pause = if first_second { 1 } else { 20 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    while any_open(&mut c, schema).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    eprintln!(
        "  drain of {n}: first message in the queue after {:.0} ms, every message in it after {:.0} ms (±20), every row settled after {:.0} ms",
        ms(first_in_queue),
        ms(all_in_queue),
        seconds * 1e3,
    );
    watch.close().await;
    let done = confirmed_since(&mut c, schema, &since.now).await;
    assert_eq!(
        done, n as i64,
        "every row settled, but not every row confirmed"
    );
    let (broker_cpu, pg_cpu) = (cpu_of("beam.smp") - broker0, cpu_of("postgres") - pg0);
    let (rss, cpu) = stop(children);
    // The statistics collector publishes a backend's counts within a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let work = db_work(&mut c).await;
    eprintln!(
        "  cpu during {engines} engine(s): broker {:.0}%, PostgreSQL {:.0}%, engines {:.0}% of one core over {seconds:.1} s (2 cores = 200%); database per message: {:.0} WAL bytes ({:.3} full-page images), {:.3} transactions",
        broker_cpu / seconds * 100.0,
        pg_cpu / seconds * 100.0,
        cpu / seconds * 100.0,
        (work.wal_bytes - work0.wal_bytes) / n as f64,
        (work.fpi - work0.fpi) as f64 / n as f64,
        (work.commits - work0.commits) as f64 / n as f64,
    );
    eprintln!(
        "  cpu per message: PostgreSQL {:.1} µs, engines {:.1} µs",
        pg_cpu / n as f64 * 1e6,
        cpu / n as f64 * 1e6,
    );
    Row {
        name: format!(
            "Courier, {engines} engine{}{}",
            if engines > 1 { "s" } else { "" },
            keys.map_or(String::new(), |k| format!(
                ", {k} ordering key{}",
                if k > 1 { "s" } else { "" }
            ))
        ),
        messages: n,
        seconds,
        rss_mb: rss,
        cpu_per_10k: cpu / (n as f64 / 10_000.0),
        raw_before: None,
    }
}

/// The database's cumulative work: WAL bytes written and transactions committed (every
/// engine statement outside an explicit transaction is one). The bench's own polling adds
/// about fifty read-only commits a second.
#[derive(QueryableByName)]
struct DbWork {
    #[diesel(sql_type = diesel::sql_types::Double)]
    wal_bytes: f64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    commits: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    fpi: i64,
}

async fn db_work(c: &mut AsyncPgConnection) -> DbWork {
    diesel::sql_query(
        "SELECT (SELECT wal_bytes FROM pg_stat_wal)::float8 AS wal_bytes,
                (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database())::bigint AS commits,
                (SELECT wal_fpi FROM pg_stat_wal)::bigint AS fpi",
    )
    .get_result(c)
    .await
    .expect("pg_stat_wal")
}

/// The depth of one queue (a passive declare), read on one channel kept open: while every
/// row is not yet in the queue the drain cannot be over, and asking the broker costs nothing
/// measurable, while probing the outbox's partial indexes 50 times a second steps over every
/// dead entry the drain leaves at their start (the active statement in a fifth of
/// `pg_stat_activity`'s samples during a 300,000-row 1,000-key drain).
struct QueueWatch {
    conn: Connection,
    channel: Channel,
    queue: String,
}

impl QueueWatch {
    async fn open(queue: &str) -> QueueWatch {
        let conn = amqp().await;
        let channel = conn.create_channel().await.expect("channel");
        QueueWatch {
            conn,
            channel,
            queue: queue.to_string(),
        }
    }

    async fn depth(&self) -> u32 {
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(self.queue.as_str().into(), opts, FieldTable::default())
            .await
            .expect("passive declare")
            .message_count()
    }

    async fn close(self) {
        let _ = self.conn.close(200, "ok".into()).await;
    }
}

/// Messages in `queue` now, asked once (see [`QueueWatch`]).
async fn depth(queue: &str) -> u32 {
    let watch = QueueWatch::open(queue).await;
    let n = watch.depth().await;
    watch.close().await;
    n
}

/// What a `kill -9` mid-drain costs at defaults: one engine drains `n` rows, is killed at
/// a fifth confirmed, and a fresh engine is started at once. Returns the rate before the
/// kill, the rows in flight at the kill, the duplicates (queue depth over `n`: nothing
/// consumes the bench queue) and the seconds from the kill to every row confirmed.
async fn courier_crash(
    schema: &str,
    queue: &str,
    n: usize,
    env: &[(&str, String)],
) -> (f64, i64, i64, f64) {
    fresh_schema(schema).await;
    purge(queue).await;
    let mut first = Engines(vec![spawn_engine(schema, env)]);
    let mut c = db().await;
    tokio::time::sleep(Duration::from_secs(2)).await; // idle and listening, as above
    insert_rows(schema, n).await;
    let start = Instant::now();
    let mut done = 0;
    while done < (n / 5) as i64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        done = confirmed(&mut c, schema).await;
    }
    for child in &mut first.0 {
        let _ = child.kill();
        let _ = child.wait();
    }
    let killed = Instant::now();
    let rate = done as f64 / killed.duration_since(start).as_secs_f64();
    let in_flight: Count = diesel::sql_query(format!(
        "SELECT count(*) AS n FROM \"{schema}\".outbox WHERE status = 'in_flight'"
    ))
    .get_result(&mut c)
    .await
    .expect("count");
    let second = Engines(vec![spawn_engine(schema, env)]);
    while confirmed(&mut c, schema).await < n as i64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let recover = killed.elapsed().as_secs_f64();
    stop(second);
    let duplicates = i64::from(depth(queue).await) - n as i64;
    purge(queue).await;
    (rate, in_flight.n, duplicates, recover)
}

/// Commit→confirmed latency of single rows on an idle engine: p50, p99 in ms.
/// Idle latency, two ways, as (p50, p99) each: from the INSERT's start (`created_at`, the
/// database clock; it includes the producer's own statement and commit) and from the
/// moment the producer's commit returned (the bench's clock, the same system clock the
/// database reads) to the recorded confirm (`confirmed_at`).
struct Latency {
    from_insert: (f64, f64),
    from_commit: (f64, f64),
    rss: f64,
}

async fn courier_latency(schema: &str, samples: usize) -> Latency {
    fresh_schema(schema).await;
    let child = Engines(vec![spawn_engine(schema, &[])]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut c = db().await;
    #[derive(QueryableByName)]
    struct Lat {
        #[diesel(sql_type = diesel::sql_types::Double)]
        ms: f64,
        #[diesel(sql_type = diesel::sql_types::Double)]
        confirmed_epoch_ms: f64,
    }
    let mut from_insert = Vec::with_capacity(samples);
    let mut from_commit = Vec::with_capacity(samples);
    for i in 0..samples {
        c.batch_execute(&format!(
            "INSERT INTO \"{schema}\".outbox (exchange, routing_key, payload) VALUES ('{EXCHANGE}', 'bench.lat.{i}', 'x')"
        ))
        .await
        .expect("insert");
        let committed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64()
            * 1000.0;
        // Poll the row; the latencies come from the recorded timestamps, not the poll.
        loop {
            let done: Vec<Lat> = diesel::sql_query(format!(
                "SELECT (EXTRACT(EPOCH FROM (confirmed_at - created_at)) * 1000)::float8 AS ms,
                        (EXTRACT(EPOCH FROM confirmed_at) * 1000)::float8 AS confirmed_epoch_ms
                 FROM \"{schema}\".outbox WHERE routing_key = 'bench.lat.{i}' AND status = 'confirmed'"
            ))
            .load(&mut c)
            .await
            .expect("poll");
            if let Some(d) = done.as_slice().first() {
                from_insert.push(d.ms);
                from_commit.push(d.confirmed_epoch_ms - committed);
                break;
            }
            // Polling faster only takes CPU from the engine and PostgreSQL on 2 cores.
            tokio::time::sleep(IDLE_PACE).await;
        }
    }
    let (rss, _) = stop(child);
    Latency {
        from_insert: p50_p99(from_insert),
        from_commit: p50_p99(from_commit),
        rss,
    }
}

/// The floor under idle latency, paced as `courier_latency` paces its rows (one at a time,
/// [`IDLE_PACE`] apart): the broker's own publish→confirm of one persistent message (raw lapin,
/// window 1), and one database round trip that updates a row and commits, waiting for the
/// WAL flush as an outcome write does. Both as (p50, p99) in ms. An idle message costs a
/// broker round trip and a claim, itself a database round trip that writes (committed
/// without waiting for the flush, so a little cheaper than this one): the two show what
/// the machine of the run gives before Courier's own steps.
async fn latency_floor(schema: &str, samples: usize) -> ((f64, f64), (f64, f64)) {
    let conn = amqp().await;
    let ch = confirm_channel(&conn).await;
    let opts = mandatory();
    let mut broker = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        let confirm = ch
            .basic_publish(
                EXCHANGE.into(),
                format!("bench.floor.{i}").into(),
                opts,
                b"x",
                props(),
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack());
        broker.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(IDLE_PACE).await;
    }
    let _ = conn.close(200, "done".into()).await;
    fresh_schema(schema).await;
    let mut c = db().await;
    c.batch_execute(&format!(
        "INSERT INTO \"{schema}\".outbox (exchange, routing_key, payload) VALUES ('{EXCHANGE}', 'bench.floor', 'x')"
    ))
    .await
    .expect("insert");
    let mut database = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        c.batch_execute(&format!(
            "UPDATE \"{schema}\".outbox SET updated_at = now() WHERE routing_key = 'bench.floor'"
        ))
        .await
        .expect("update");
        database.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(IDLE_PACE).await;
    }
    (p50_p99(broker), p50_p99(database))
}

/// The median and the 99th percentile of `v`.
fn p50_p99(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.5), pct(0.99))
}

/// Engine peak RSS while it works through a backlog of `n` rows.
async fn courier_rss_with_backlog(schema: &str, n: usize) -> f64 {
    fresh_schema(schema).await;
    insert_rows(schema, n).await;
    // The engine works through the backlog for a while: its memory is bounded by
    // max_in_flight and the claim batch, not by the size of the outbox.
    let child = Engines(vec![spawn_engine(schema, &[])]);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (rss, _) = stop(child);
    rss
}

/// Engine peak RSS (MB) and seconds while it drains `n` rows of `mib` MiB each, with
/// `COURIER_*` overrides `extra` (e.g. the byte budget).
async fn courier_rss_large(
    schema: &str,
    queue: &str,
    n: usize,
    mib: usize,
    extra: &[(&str, String)],
) -> (f64, f64) {
    fresh_schema(schema).await;
    purge(queue).await;
    let mut c = db().await;
    c.batch_execute(&format!(
        "INSERT INTO \"{schema}\".outbox (exchange, routing_key, payload)
         SELECT '{EXCHANGE}', 'bench.big.' || i, convert_to(repeat('x', {mib} * 1048576), 'UTF8')
         FROM generate_series(1, {n}) i"
    ))
    .await
    .expect("insert large rows");
    let start = Instant::now();
    let child = Engines(vec![spawn_engine(schema, extra)]);
    while confirmed(&mut c, schema).await < n as i64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let (rss, _) = stop(child);
    purge(queue).await;
    (rss, seconds)
}

#[derive(QueryableByName)]
struct Size {
    #[diesel(sql_type = BigInt)]
    bytes: i64,
    #[diesel(sql_type = BigInt)]
    waiting: i64,
}

async fn outbox_size(c: &mut AsyncPgConnection, schema: &str) -> Size {
    diesel::sql_query(format!(
        "SELECT pg_total_relation_size('\"{schema}\".outbox') AS bytes,
                (SELECT count(*) FROM \"{schema}\".outbox WHERE status <> 'confirmed') AS waiting"
    ))
    .get_result(c)
    .await
    .expect("size")
}

/// A sustained run of `n` messages with retention on: prints the outbox's total size (heap,
/// indexes, TOAST) as it goes. Producers keep a backlog of at most 100k rows.
async fn sustained_with_retention(schema: &str, queue: &str, n: usize) {
    fresh_schema(schema).await;
    purge(queue).await;
    let engine = Engines(vec![spawn_engine(
        schema,
        &[
            ("COURIER_RETENTION_CONFIRMED", "5s".into()),
            ("COURIER_RETENTION_INTERVAL", "2s".into()),
            ("COURIER_RETENTION_BATCH_SIZE", "5000".into()),
        ],
    )]);
    let mut c = db().await;
    let start = Instant::now();
    let mut inserted = 0;
    let mut last_report = 0;
    println!("\nsustained run with retention (confirmed rows removed after 5 s):");
    println!("| messages inserted | elapsed s | outbox total size MB | rows not yet confirmed |");
    println!("|---:|---:|---:|---:|");
    while inserted < n {
        insert_rows(schema, 50_000.min(n - inserted)).await;
        inserted += 50_000.min(n - inserted);
        loop {
            let s = outbox_size(&mut c, schema).await;
            if s.waiting < 50_000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        purge(queue).await;
        if inserted - last_report >= 100_000 || inserted == n {
            last_report = inserted;
            let s = outbox_size(&mut c, schema).await;
            println!(
                "| {inserted} | {:.0} | {:.1} | {} |",
                start.elapsed().as_secs_f64(),
                s.bytes as f64 / 1e6,
                s.waiting
            );
        }
    }
    stop(engine);
}

/// Fills a fresh outbox with `rows` confirmed rows spread over the last week (what the
/// default 7-day retention keeps), vacuumed and checkpointed as a week-old table would be.
async fn fill_history(schema: &str, rows: usize) {
    fresh_schema(schema).await;
    let mut c = db().await;
    let payload = "x".repeat(PAYLOAD);
    // Packed (default): each row written once, confirmed, as the old part of a table looks
    // once vacuum has reclaimed its dead versions and new rows have filled the space: pages
    // filled to the table's fillfactor (50 since migration 9, where a row's updates leave
    // the rest of its page to dead versions that vacuum reclaims but inserts do not reuse).
    // BENCH_HISTORY_FILL=sparse: every row goes through the claim and confirm updates in
    // bulk, so after vacuum each heap page is two-thirds free space that new rows are then
    // scattered into (the worst case for locality).
    let sparse = std::env::var("BENCH_HISTORY_FILL").is_ok_and(|f| f == "sparse");
    let lifecycle = if sparse {
        format!(
            "UPDATE \"{schema}\".outbox SET status = 'in_flight', attempts = 1,
                 locked_by = 'bench-history', locked_until = created_at + interval '30 s'
             WHERE status = 'pending';
             UPDATE \"{schema}\".outbox SET status = 'confirmed', confirmed_at = created_at,
                 updated_at = created_at, locked_until = NULL
             WHERE status = 'in_flight';"
        )
    } else {
        String::new()
    };
    let (status, confirmed_at) = if sparse {
        ("pending", "NULL")
    } else {
        ("confirmed", "t")
    };
    for start in (0..rows).step_by(500_000) {
        let count = (rows - start).min(500_000);
        c.batch_execute(&format!(
            "INSERT INTO \"{schema}\".outbox (exchange, routing_key, payload, created_at,
                 updated_at, status, attempts, confirmed_at)
             SELECT '{EXCHANGE}', 'bench.' || i, convert_to('{payload}', 'UTF8'), t, t,
                    '{status}', 1, {confirmed_at}
             FROM generate_series(1, {count}) i,
                  LATERAL (SELECT now() - interval '7 days' * (1 - (i + {start})::float8 / {rows})) AS a(t);
             {lifecycle}"
        ))
        .await
        .expect("history insert");
    }
    for statement in [
        format!("VACUUM ANALYZE \"{schema}\".outbox"),
        "CHECKPOINT".into(),
    ] {
        c.batch_execute(&statement).await.expect("vacuum");
    }
}

/// The drain rate of `n` new rows with 0 and each of `histories` confirmed rows already in
/// the table (BENCH_HISTORY), each right after raw lapin on the same queue: writing gigabytes
/// of history left the broker slower for a while here (raw lapin 14.8k–15.2k msg/s right
/// after a 5,000,000-row fill, 18.0k–18.5k after smaller ones; the disk, most likely), and
/// only the raw rate beside each drain tells that apart from a cost of the table.
fn history_curve(
    rt: &tokio::runtime::Runtime,
    schema: &str,
    queue: &str,
    n: usize,
    histories: &[usize],
) -> Vec<Row> {
    let mut rows = Vec::new();
    for &h in histories {
        rt.block_on(fill_history(schema, h));
        let size = rt.block_on(async {
            let mut c = db().await;
            outbox_size(&mut c, schema).await
        });
        let drain = drain(schema, queue, n, 1, None, &[]);
        let mut r = paired(rt, "classic", queue, n, drain);
        r.name = format!(
            "Courier, 1 engine, {h} confirmed rows of history ({:.0} MB)",
            size.bytes as f64 / 1e6
        );
        rows.push(r);
    }
    rows
}

fn print_table(rows: &[Row], limit: f64, naive: f64) {
    println!();
    println!("| variant | messages | msg/s | × raw lapin | × raw just before | × naive | peak RSS MB | CPU s / 10k |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let before = r.raw_before.map_or(String::new(), |raw| {
            format!("{:.2} (of {raw:.0})", r.rate() / raw)
        });
        println!(
            "| {} | {} | {:.0} | {:.2} | {before} | {:.1} | {:.1} | {:.2} |",
            r.name,
            r.messages,
            r.rate(),
            r.rate() / limit,
            r.rate() / naive,
            r.rss_mb,
            r.cpu_per_10k
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        return run_child(&args[i + 1..]);
    }
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing we need.
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let n = env_usize("BENCH_N", 50_000);
    let naive_n = env_usize("BENCH_NAIVE_N", 2_000);
    let keyed_one_n = env_usize("BENCH_ONE_KEY_N", 2_000);
    let backlog = env_usize("BENCH_BACKLOG", 1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let schema = "courier_bench";
    let mut results: HashMap<&str, Vec<Row>> = HashMap::new();
    let kinds = std::env::var("BENCH_QUEUES").unwrap_or_else(|_| "classic,quorum".into());
    for kind in ["classic", "quorum"] {
        if !kinds.split(',').any(|k| k.trim() == kind) {
            continue;
        }
        let queue = rt.block_on(fresh_queue(kind));
        let mut rows = Vec::new();
        rows.push(raw_lapin(kind, n, "1024"));
        rt.block_on(purge(&queue));
        rt.block_on(async {
            fresh_schema(schema).await;
            insert_rows(schema, naive_n).await;
        });
        let (secs, rss, cpu) = child(&["naive", schema, &naive_n.to_string()]);
        rows.push(Row {
            name: format!("naive one-at-a-time ({kind})"),
            messages: naive_n,
            seconds: secs,
            rss_mb: rss,
            cpu_per_10k: cpu / (naive_n as f64 / 1e4),
            raw_before: None,
        });
        for engines in env_list("BENCH_ENGINES", &[1, 2, 3]) {
            let drain = courier_drain(schema, &queue, n, engines);
            let mut r = paired(&rt, kind, &queue, n, drain);
            r.name = format!("{} ({kind})", r.name);
            rows.push(r);
        }
        // The measured in-flight window against fixed ones (always publisher.max_in_flight):
        // 4,096, the default cap and the old behaviour, and any in BENCH_WINDOWS.
        let windows = std::env::var("BENCH_WINDOWS").unwrap_or_default();
        let sizes = std::iter::once("4096").chain(windows.split(',').filter(|w| !w.is_empty()));
        for size in sizes.clone() {
            // Raw lapin at the same window: what the broker itself gives with that many
            // unconfirmed, no database and no engine.
            if size != "4096" {
                rows.push(raw_lapin(kind, n, size.trim()));
                rt.block_on(purge(&queue));
            }
            let fixed = [
                ("COURIER_PUBLISHER_ADAPTIVE_WINDOW", "false".to_string()),
                ("COURIER_PUBLISHER_MAX_IN_FLIGHT", size.trim().to_string()),
            ];
            let drain = courier_drain_keyed(schema, &queue, n, 1, None, &fixed);
            let mut r = paired(&rt, kind, &queue, n, drain);
            r.name = format!("{}, fixed window {} ({kind})", r.name, size.trim());
            rows.push(r);
        }
        if kind == "classic" {
            // Per-key order: one message of a key in flight at a time, so one key runs at
            // one broker round trip per message; many keys pipeline like unkeyed rows.
            // BENCH_RUN0=1 adds each with `ordering.run: 0` (a claim per message of a key).
            let run0 = env_usize("BENCH_RUN0", 0) > 0;
            for keys in env_list("BENCH_KEYS", &[1, 100, 1_000, 10_000]) {
                let m = if keys == 1 { keyed_one_n } else { n };
                // Per-key order allows one unconfirmed message per key: raw lapin held to
                // that many is the limit for `keys` keys (past 1,024, the limit above).
                if keys < 1024 {
                    rows.push(raw_lapin(kind, m, &keys.to_string()));
                    rt.block_on(purge(&queue));
                }
                let drain = courier_drain_keyed(schema, &queue, m, 1, Some(keys), &[]);
                let mut r = paired(&rt, kind, &queue, n, drain);
                r.name = format!("{} ({kind})", r.name);
                rows.push(r);
                if run0 {
                    let heads_only = [("COURIER_ORDERING_RUN", "0".to_string())];
                    let drain = courier_drain_keyed(schema, &queue, m, 1, Some(keys), &heads_only);
                    let mut r = paired(&rt, kind, &queue, n, drain);
                    r.name = format!("{}, ordering.run 0 ({kind})", r.name);
                    rows.push(r);
                }
            }
        }
        if kind == "classic" {
            // The crash line at defaults, then with `publisher.max_in_flight` at each of
            // BENCH_WINDOWS: the knob that trades speed for fewer duplicates.
            let crash_n = env_usize("BENCH_CRASH_N", 5_000);
            let caps =
                std::iter::once("default").chain(windows.split(',').filter(|w| !w.is_empty()));
            for cap in caps.filter(|_| crash_n > 0) {
                let env: Vec<(&str, String)> = match cap {
                    "default" => vec![],
                    w => vec![("COURIER_PUBLISHER_MAX_IN_FLIGHT", w.trim().to_string())],
                };
                let label = match cap {
                    "default" => "defaults".to_string(),
                    w => format!("max_in_flight {}", w.trim()),
                };
                let (rate, in_flight, duplicates, recover) =
                    rt.block_on(courier_crash(schema, &queue, crash_n, &env));
                println!(
                    "\ncrash ({kind}, {label}, {crash_n} rows, kill -9 at a fifth confirmed, a fresh engine at once): {rate:.0} msg/s before the kill, {in_flight} rows in flight at the kill, {duplicates} duplicates after it, every row confirmed {recover:.1} s after it"
                );
            }
        }
        rt.block_on(purge(&queue));
        let limit = rows[0].rate();
        let naive = rows[1].rate();
        println!("\n{kind} queue: raw limit {limit:.0} msg/s, naive {naive:.0} msg/s");
        print_table(&rows, limit, naive);
        results.insert(kind, rows);
    }
    let queue = rt.block_on(fresh_queue("classic"));
    let histories: Vec<usize> = std::env::var("BENCH_HISTORY")
        .unwrap_or_default()
        .split(',')
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    if !histories.is_empty() {
        let hn = env_usize("BENCH_HISTORY_N", 50_000);
        let rows = history_curve(&rt, schema, &queue, hn, &histories);
        let fresh = rows[0].rate();
        let fresh_of_raw = rows[0].raw_before.map_or(f64::NAN, |raw| fresh / raw);
        println!("\na table with history (classic, {hn} new rows each):\n");
        println!("| variant | msg/s | × no history | × raw just before | that ÷ no history's | CPU s / 10k |");
        println!("|---|---:|---:|---:|---:|---:|");
        for r in &rows {
            let of_raw = r.raw_before.map_or(f64::NAN, |raw| r.rate() / raw);
            println!(
                "| {} | {:.0} | {:.2} | {of_raw:.2} (of {:.0}) | {:.2} | {:.2} |",
                r.name,
                r.rate(),
                r.rate() / fresh,
                r.raw_before.unwrap_or(f64::NAN),
                of_raw / fresh_of_raw,
                r.cpu_per_10k
            );
        }
    }
    let latency_n = env_usize("BENCH_LATENCY_N", 500);
    if latency_n > 0 {
        let l = rt.block_on(courier_latency(schema, latency_n));
        println!(
            "\ncommit→confirmed on an idle engine, {latency_n} single messages: p50 {:.2} ms, p99 {:.2} ms from the commit's return; p50 {:.2} ms, p99 {:.2} ms from the INSERT's start (created_at) (engine RSS {:.1} MB)",
            l.from_commit.0, l.from_commit.1, l.from_insert.0, l.from_insert.1, l.rss
        );
        let (broker, database) = rt.block_on(latency_floor(schema, latency_n));
        println!(
            "the floor, paced the same: the broker's publish→confirm p50 {:.2} ms, p99 {:.2} ms (raw lapin, window 1); a database write and commit p50 {:.2} ms, p99 {:.2} ms",
            broker.0, broker.1, database.0, database.1
        );
    }
    rt.block_on(purge(&queue));
    let sustain = env_usize("BENCH_SUSTAIN", 0);
    if sustain > 0 {
        rt.block_on(sustained_with_retention(schema, &queue, sustain));
        rt.block_on(purge(&queue));
    }
    let large = env_usize("BENCH_LARGE", 0);
    if large > 0 {
        // Memory is bounded in bytes, not only in messages: the default byte budget
        // (publisher.max_in_flight_bytes, 64 MiB) against no budget at all.
        let unbounded = [(
            "COURIER_PUBLISHER_MAX_IN_FLIGHT_BYTES",
            (1u64 << 40).to_string(),
        )];
        for (label, extra) in [
            ("default byte budget (64 MiB)", &[][..]),
            ("no byte budget", &unbounded[..]),
        ] {
            let (rss, secs) = rt.block_on(courier_rss_large(schema, &queue, large, 20, extra));
            println!("engine peak RSS draining {large} × 20 MiB messages, {label}: {rss:.1} MB ({secs:.1} s)");
        }
    }
    if backlog > 0 {
        let rss = rt.block_on(courier_rss_with_backlog(schema, backlog));
        rt.block_on(purge(&queue));
        println!("engine peak RSS with {backlog} rows waiting in the outbox: {rss:.1} MB");
    }
    rt.block_on(async {
        let mut c = db().await;
        let _ = c
            .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .await;
    });
}
