//! A message over which RabbitMQ closes the whole connection, naming no message, is found by
//! publishing the suspects alone, and charged, while the good messages that were in flight
//! beside it are delivered.
//!
//! Release builds refuse the one such input known (a direct reply-to key RabbitMQ cannot
//! decode: 541 INTERNAL_ERROR) before it is published. Debug builds let it through when
//! `COURIER_TESTING_PUBLISH_REPLY_TO` is set, so here it stands for an input nobody has
//! found yet. This file is a process of its own, so the variable reaches no other test.

mod common;

use std::time::Duration;

use common::{audit::audit, broker::TestBroker, TestDb};
use courier::{Engine, Outcome};
use diesel_async::RunQueryDsl;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(120);

#[derive(diesel::QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

#[actix_rt::test]
async fn a_message_that_closes_the_connection_is_found_alone_and_charged() {
    std::env::set_var("COURIER_TESTING_PUBLISH_REPLY_TO", "1");
    common::init_logs();
    let db = TestDb::new("isolate").await;
    let broker = TestBroker::new("isolate").await;
    let ex = &broker.exchange;
    let mut good = db.insert_sql(ex, 1_000, "routed.a{i}").await;
    let mut conn = db.raw().await;
    let bad = diesel::sql_query(format!(
        "INSERT INTO \"{}\".outbox (exchange, routing_key, payload, max_attempts)
         VALUES ('', 'amq.rabbitmq.reply-to.g2dkABNyYWJiaXRAbG9jYWxob3N0AAAAAAAAAAAAAAAAAA==.x',
                 'x', 3)
         RETURNING id",
        db.schema
    ))
    .get_result::<IdRow>(&mut conn)
    .await
    .expect("the row is valid SQL")
    .id;
    good.extend(db.insert_sql(ex, 1_000, "routed.b{i}").await);

    let engine = Engine::start(db.engine_config())
        .await
        .expect("engine starts");
    let mut all = good.clone();
    all.push(bad);
    let outcomes = engine
        .wait_for_all(&all, WAIT)
        .await
        .expect("every row settles: the culprit does not close the connection for ever");
    for id in &good {
        assert_eq!(outcomes[id], Outcome::Confirmed, "good row {id}");
    }
    let Outcome::DeadLettered(why) = &outcomes[&bad] else {
        panic!("the culprit was confirmed: {:?}", outcomes[&bad]);
    };
    assert!(
        why.contains("closed the connection when it was published alone: 541")
            && why.contains("attempt 3 of 3"),
        "reason: {why}"
    );
    let counters = engine.counters();
    assert!(
        counters.reconnects >= 1,
        "the broker never closed the publishing connection: {counters:?}"
    );

    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, good.len());
    // Nothing left in flight or retrying, and still delivering on its ordinary connections.
    common::assert_live(&db, &engine, ex).await;
    engine.shutdown().await;
}
