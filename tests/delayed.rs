//! Delayed messages and life without NOTIFY: a row inserted with `next_attempt_at` in the
//! future is published then — not earlier, and not a sweep interval later — and with
//! `database.listen: false` the engine polls fast while rows keep coming.

mod common;

use std::time::Duration;

use common::{broker::TestBroker, TestDb};
use courier::{Engine, Outcome};
use diesel::sql_types::{Double, Text};
use diesel_async::RunQueryDsl;
use uuid::Uuid;

/// For each id: (confirmed_at - next_attempt_at) and (confirmed_at - created_at), in ms,
/// from the database's own clock.
async fn timings(db: &TestDb, ids: &[Uuid]) -> Vec<(f64, f64)> {
    #[derive(diesel::QueryableByName)]
    struct T {
        #[diesel(sql_type = Double)]
        after_due: f64,
        #[diesel(sql_type = Double)]
        after_commit: f64,
    }
    let mut conn = db.raw().await;
    let rows: Vec<T> = diesel::sql_query(format!(
        "SELECT (EXTRACT(EPOCH FROM (confirmed_at - next_attempt_at)) * 1000)::float8 AS after_due,
                (EXTRACT(EPOCH FROM (confirmed_at - created_at)) * 1000)::float8 AS after_commit
         FROM \"{}\".outbox WHERE id = ANY($1::uuid[]) AND status = 'confirmed'",
        db.schema
    ))
    .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(ids)
    .load(&mut conn)
    .await
    .unwrap();
    rows.into_iter()
        .map(|t| (t.after_due, t.after_commit))
        .collect()
}

/// Inserts one row due `delay_ms` from now (the producer's plain SQL).
async fn insert_delayed(db: &TestDb, exchange: &str, delay_ms: i64) -> Uuid {
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        id: Uuid,
    }
    let mut conn = db.raw().await;
    let row: Id = diesel::sql_query(format!(
        "INSERT INTO \"{}\".outbox (exchange, routing_key, payload, next_attempt_at)
         VALUES ($1, 'routed.later', 'x', now() + $2 * interval '1 millisecond') RETURNING id",
        db.schema
    ))
    .bind::<Text, _>(exchange)
    .bind::<diesel::sql_types::BigInt, _>(delay_ms)
    .get_result(&mut conn)
    .await
    .unwrap();
    row.id
}

#[actix_rt::test]
async fn delayed_rows_are_published_when_due_not_earlier_not_a_sweep_later() {
    let db = TestDb::new("delayed").await;
    let broker = TestBroker::new("delayed").await;
    let mut config = db.engine_config();
    config.scheduler.sweep_interval = Duration::from_secs(3600);
    let engine = Engine::start(config).await.unwrap();
    // A far-future row arms a timer an hour away; a nearer row's NOTIFY must re-arm it.
    let _far = insert_delayed(&db, &broker.exchange, 3_600_000).await;
    let ids = vec![
        insert_delayed(&db, &broker.exchange, 1_500).await,
        insert_delayed(&db, &broker.exchange, 800).await,
    ];
    let outcomes = engine
        .wait_for_all(&ids, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(outcomes.values().all(|o| *o == Outcome::Confirmed));
    for (after_due, _) in timings(&db, &ids).await {
        assert!(
            after_due >= 0.0,
            "published {after_due:.0} ms before it was due"
        );
        assert!(
            after_due < 400.0,
            "published {after_due:.0} ms after it was due"
        );
    }
    engine.shutdown().await;
}

#[actix_rt::test]
async fn retries_come_back_after_their_backoff_not_at_the_next_sweep() {
    let db = TestDb::new("backoff").await;
    let mut broker = TestBroker::new("backoff").await;
    let nacks = broker
        .extra_exchange("nacks", lapin::ExchangeKind::Topic)
        .await;
    broker.nacking_queue(&nacks).await;
    let mut config = db.engine_config();
    config.scheduler.sweep_interval = Duration::from_secs(3600);
    config.retry.backoff.initial = Duration::from_millis(200);
    config.retry.backoff.jitter = 0.0;
    // Every nack charged: a queue nacking alone for a while would be refunded.
    config.retry.nacks_refunded_for = Duration::ZERO;
    let engine = Engine::start(config).await.unwrap();
    let m = courier::OutboxMessage::new(&nacks, "k", b"x".to_vec()).with_max_attempts(3);
    engine.store().enqueue(&m).await.unwrap();
    // Three attempts with 200 ms and 400 ms backoff: seconds, not an hour of sweeps.
    match engine
        .wait_for(m.id, Duration::from_secs(20))
        .await
        .unwrap()
    {
        Outcome::DeadLettered(why) => assert!(why.contains("attempt 3 of 3"), "{why}"),
        other => panic!("{other:?}"),
    }
    engine.shutdown().await;
}

#[actix_rt::test]
async fn without_notify_polling_keeps_up_while_rows_flow_and_delivers_everything() {
    let db = TestDb::new("nolisten").await;
    let broker = TestBroker::new("nolisten").await;
    let mut config = db.engine_config();
    config.database.listen = false;
    config.scheduler.sweep_interval = Duration::from_secs(2);
    let engine = Engine::start(config).await.unwrap();
    // A bulk load first (the same delivery test as with NOTIFY)...
    let mut ids = db.insert_sql(&broker.exchange, 2_000, "routed.{i}").await;
    engine
        .wait_for_all(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    // ...then a steady trickle: polling stays fast while rows keep coming.
    let mut trickle = Vec::new();
    for _ in 0..100 {
        trickle.extend(db.insert_sql(&broker.exchange, 1, "routed.t").await);
        tokio::time::sleep(Duration::from_millis(10)).await; // the producer's pace
    }
    engine
        .wait_for_all(&trickle, Duration::from_secs(60))
        .await
        .unwrap();
    let mut lat: Vec<f64> = timings(&db, &trickle)
        .await
        .into_iter()
        .map(|t| t.1)
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let p50 = lat[lat.len() / 2];
    eprintln!(
        "no-NOTIFY trickle: p50 commit→confirmed {p50:.1} ms, max {:.1} ms",
        lat[lat.len() - 1]
    );
    assert!(
        p50 < 200.0,
        "polling did not keep up: p50 {p50:.0} ms with a 2 s sweep"
    );
    ids.extend(trickle);
    let a = common::audit::audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!((a.confirmed, a.duplicates), (ids.len(), 0));
    engine.shutdown().await;
}
