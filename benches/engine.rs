//! Criterion benches of the whole engine against the real PostgreSQL and RabbitMQ:
//! (a) drain of N pre-inserted rows, (b) steady state with producers inserting while the
//! engine runs, (c) commit→confirmed latency of single messages on an idle engine.
//! The pure-CPU parts are in `benches/micro.rs`; the side-by-side table against raw lapin
//! and the naive design is `benches/side_by_side.rs`.
//!
//! ```sh
//! cargo bench --bench engine
//! ```

use std::time::{Duration, Instant};

use courier::{config::SecretUrl, Config, Engine, EngineEvent, OutboxMessage, Store};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions},
    types::FieldTable,
    Connection, ConnectionProperties, ExchangeKind,
};

const DB: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const EXCHANGE: &str = "courier.criterion";
const QUEUE: &str = "courier.criterion.q";
const SCHEMA: &str = "courier_criterion";

fn config() -> Config {
    let mut c = Config::default();
    c.database.url = SecretUrl::new(DB);
    c.broker.url = SecretUrl::new(AMQP).into();
    c.database.schema = SCHEMA.into();
    c.database.auto_migrate = false;
    c.logging.summary_interval = Duration::from_secs(3600);
    c
}

/// A fresh schema and an empty bound queue.
async fn setup() -> Store {
    let mut db = AsyncPgConnection::establish(DB).await.expect("PostgreSQL");
    db.batch_execute(&format!("DROP SCHEMA IF EXISTS {SCHEMA} CASCADE"))
        .await
        .expect("drop schema");
    courier::migrate(&SecretUrl::new(DB), SCHEMA, Duration::from_secs(10))
        .await
        .expect("migrate");
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .expect("RabbitMQ");
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
    let q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(QUEUE.into(), q, FieldTable::default())
        .await
        .expect("queue");
    ch.queue_bind(
        QUEUE.into(),
        EXCHANGE.into(),
        "#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    let _ = conn.close(200, "ok".into()).await;
    Store::connect(&config().database).await.expect("store")
}

fn messages(n: usize) -> Vec<OutboxMessage> {
    (0..n)
        .map(|i| OutboxMessage::new(EXCHANGE, format!("bench.{i}"), vec![b'x'; 256]))
        .collect()
}

async fn enqueue(store: &Store, batch: &[OutboxMessage]) {
    for chunk in batch.chunks(5_000) {
        store.enqueue_many(chunk).await.expect("enqueue");
    }
}

fn drain(c: &mut Criterion) {
    const N: usize = 20_000;
    let mut group = c.benchmark_group("end-to-end");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(N as u64));
    group.bench_function("drain 20k pre-inserted rows", |b| {
        b.iter_custom(|iters| {
            actix_rt::System::new().block_on(async move {
                let store = setup().await;
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch = messages(N);
                    enqueue(&store, &batch).await;
                    let ids: Vec<_> = batch.iter().map(|m| m.id).collect();
                    let start = Instant::now();
                    let engine = Engine::start(config()).await.expect("engine");
                    engine
                        .wait_for_all(&ids, Duration::from_secs(300))
                        .await
                        .expect("drained");
                    total += start.elapsed();
                    engine.shutdown().await;
                }
                total
            })
        })
    });
    group.finish();
}

fn steady_state(c: &mut Criterion) {
    const N: usize = 20_000;
    const PRODUCERS: usize = 4;
    let mut group = c.benchmark_group("end-to-end");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(N as u64));
    group.bench_function("steady state, 4 producers inserting batches of 100", |b| {
        b.iter_custom(|iters| {
            actix_rt::System::new().block_on(async move {
                let store = setup().await;
                let engine = Engine::start(config()).await.expect("engine");
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch = messages(N);
                    let ids: Vec<_> = batch.iter().map(|m| m.id).collect();
                    let start = Instant::now();
                    let producers: Vec<_> = batch
                        .chunks(N / PRODUCERS)
                        .map(|part| {
                            let store = store.clone();
                            let part = part.to_vec();
                            actix_rt::spawn(async move {
                                for chunk in part.chunks(100) {
                                    store.enqueue_many(chunk).await.expect("enqueue");
                                }
                            })
                        })
                        .collect();
                    for p in producers {
                        p.await.expect("producer");
                    }
                    engine
                        .wait_for_all(&ids, Duration::from_secs(300))
                        .await
                        .expect("settled");
                    total += start.elapsed();
                }
                engine.shutdown().await;
                total
            })
        })
    });
    group.finish();
}

fn latency(c: &mut Criterion) {
    let mut group = c.benchmark_group("latency");
    group.sample_size(50);
    group.bench_function("commit to confirmed, idle engine", |b| {
        b.iter_custom(|iters| {
            actix_rt::System::new().block_on(async move {
                let store = setup().await;
                let engine = Engine::start(config()).await.expect("engine");
                let warm = messages(1);
                enqueue(&store, &warm).await;
                engine
                    .wait_for(warm[0].id, Duration::from_secs(30))
                    .await
                    .expect("warm");
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let m = messages(1).remove(0);
                    let mut events = engine.subscribe();
                    let start = Instant::now();
                    store.enqueue(&m).await.expect("enqueue");
                    loop {
                        match events.recv().await {
                            Ok(EngineEvent::Confirmed(ids)) if ids.contains(&m.id) => break,
                            Ok(_) => {}
                            Err(e) => panic!("events: {e}"),
                        }
                    }
                    total += start.elapsed();
                }
                engine.shutdown().await;
                total
            })
        })
    });
    group.finish();
}

criterion_group!(benches, latency, drain, steady_state);
criterion_main!(benches);
