//! The consumer inbox against the real services: a message delivered three times (re-publish,
//! redelivery after the connection drops mid-handler, a crash between commit and ack) is
//! applied once; two consumer instances on one queue apply each message once; a database
//! outage (PostgreSQL behind an in-test proxy that cuts and refuses connections) holds the
//! deliveries instead of counting them as failures or rejecting them; a handler fault of a
//! second and a producer's `x-delivery-count` cost no message; a stop during a database
//! freeze ends within its timeout; retention keeps other consumers' rows.

mod common;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{broker::TestBroker, eventually, proxy::Proxy, within, TestDb};
use courier::{
    config::{BrokerConfig, SecretUrl},
    inbox::{Disposition, Handler, HandlerError, Inbox, InboxConfig, InboxMessage},
};
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures::future::BoxFuture;
use lapin::{
    options::BasicPublishOptions,
    types::{AMQPValue, FieldTable},
    BasicProperties, ExchangeKind,
};

/// Applies an event by inserting it into `<schema>.applied` (no unique key there: a
/// double application would show as two rows).
struct Apply {
    schema: String,
    calls: AtomicUsize,
    /// Called (once) before committing the first message: lets a test cut the link.
    on_first: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Handler for Apply {
    fn handle<'a>(
        &'a self,
        tx: &'a mut AsyncPgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            record_applied(tx, &self.schema, &msg.message_id).await?;
            let hook = self.on_first.lock().expect("hook").take();
            if let Some(hook) = hook {
                hook();
                // Let the cut land while this transaction is still open.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(())
        })
    }
}

/// Inserts `message_id` into `<schema>.applied`, as every test handler applies a message.
async fn record_applied(
    tx: &mut AsyncPgConnection,
    schema: &str,
    message_id: &str,
) -> Result<(), HandlerError> {
    diesel::sql_query(format!(
        "INSERT INTO \"{schema}\".applied (message_id) VALUES ($1)"
    ))
    .bind::<Text, _>(message_id)
    .execute(tx)
    .await?;
    Ok(())
}

async fn applied(db: &TestDb) -> HashMap<String, i64> {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        message_id: String,
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = db.raw().await;
    let rows: Vec<Row> = diesel::sql_query(format!(
        "SELECT message_id, count(*) AS n FROM \"{}\".applied GROUP BY message_id",
        db.schema
    ))
    .load(&mut conn)
    .await
    .unwrap();
    rows.into_iter().map(|r| (r.message_id, r.n)).collect()
}

async fn setup(prefix: &str) -> (TestDb, TestBroker) {
    let db = TestDb::new(prefix).await;
    db.exec("CREATE TABLE {s}.applied (message_id text NOT NULL)")
        .await;
    (db, TestBroker::new(prefix).await)
}

async fn publish(broker: &TestBroker, id: &str, key: &str) {
    publish_body(broker, id, key, b"event").await
}

async fn publish_body(broker: &TestBroker, id: &str, key: &str, body: &[u8]) {
    broker
        .channel
        .basic_publish(
            broker.exchange.as_str().into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default()
                .with_message_id(id.into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A work queue bound to the test exchange with `key`, whose rejects dead-letter into a
/// queue of their own: returns (work queue, dead-letter queue).
async fn work_queue_with_dlq(broker: &mut TestBroker, key: &str) -> (String, String) {
    let dlx = broker.extra_exchange("dlx", ExchangeKind::Fanout).await;
    let dlq = broker.extra_queue("dlq", FieldTable::default()).await;
    broker.bind(&dlq, &dlx, "").await;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(dlx.as_str().into()),
    );
    let work = broker.extra_queue("work", args).await;
    broker.bind(&work, &broker.exchange.clone(), key).await;
    (work, dlq)
}

fn broker_config(url: String) -> BrokerConfig {
    BrokerConfig {
        url: SecretUrl::new(url).into(),
        ..BrokerConfig::default()
    }
}

fn handler(db: &TestDb) -> Arc<Apply> {
    Arc::new(Apply {
        schema: db.schema.clone(),
        calls: AtomicUsize::new(0),
        on_first: Default::default(),
    })
}

#[tokio::test]
async fn a_message_delivered_three_times_is_applied_once() {
    let (db, broker) = setup("inbox3").await;
    let proxy = Arc::new(Proxy::start("127.0.0.1:5672".parse().unwrap()));
    let store = db.store().await;
    let inbox = Inbox::new(
        store,
        broker_config(proxy.amqp_url()),
        InboxConfig::new("billing", &broker.queue),
    );
    let apply = handler(&db);

    // 3. A crash between commit and ack: the transaction committed, no ack was sent.
    let crashed = InboxMessage {
        message_id: "m-crash".into(),
        exchange: broker.exchange.clone(),
        routing_key: "routed.c".into(),
        payload: b"event".to_vec(),
        properties: BasicProperties::default(),
        redelivered: false,
    };
    assert_eq!(
        inbox.process(&*apply, &crashed).await.unwrap(),
        Disposition::Applied
    );

    // 2. The connection drops while the handler of "m-cut" runs.
    let p = proxy.clone();
    *apply.on_first.lock().unwrap() = Some(Box::new(move || p.cut()));

    publish(&broker, "m-cut", "routed.a").await; // first delivery: the cut hits it
    publish(&broker, "m-crash", "routed.c").await; // the redelivery after the "crash"
    publish(&broker, "m-twice", "routed.b").await;
    publish(&broker, "m-twice", "routed.b").await; // 1. re-published
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let (inbox, apply) = (inbox.clone(), apply.clone());
        tokio::spawn(async move { inbox.run(apply, stop_rx).await })
    };
    eventually(
        60,
        "every message applied and the queue drained",
        || async {
            let a = applied(&db).await;
            let done = ["m-cut", "m-crash", "m-twice"]
                .iter()
                .all(|id| a.contains_key(*id));
            (done && broker.depth(&broker.queue).await == 0).then_some(())
        },
    )
    .await;
    let _ = stop_tx.send(());
    let report = within(30, "inbox stop", runner).await.unwrap().unwrap();
    let a = applied(&db).await;
    for id in ["m-cut", "m-crash", "m-twice"] {
        assert_eq!(a[id], 1, "{id} applied {} times", a[id]);
    }
    eprintln!("inbox report: {report:?}");
    assert!(
        report.duplicates >= 2,
        "re-publish and crash redelivery are duplicates: {report:?}"
    );
}

#[tokio::test]
async fn two_consumer_instances_apply_each_message_once() {
    let (db, broker) = setup("inbox2").await;
    let n = 500;
    for i in 0..n {
        // Each message published twice: four deliveries' worth of chances to double-apply.
        publish(&broker, &format!("m{i}"), "routed.x").await;
        publish(&broker, &format!("m{i}"), "routed.x").await;
    }
    let store = db.store().await;
    let mk = || {
        Inbox::new(
            store.clone(),
            broker_config(common::broker_url()),
            InboxConfig::new("shipping", &broker.queue),
        )
    };
    let (a, b) = (mk(), mk());
    let apply = handler(&db);
    let (stop_a, rx_a) = tokio::sync::oneshot::channel::<()>();
    let (stop_b, rx_b) = tokio::sync::oneshot::channel::<()>();
    let ra = {
        let h = apply.clone();
        tokio::spawn(async move { a.run(h, rx_a).await })
    };
    let rb = {
        let h = apply.clone();
        tokio::spawn(async move { b.run(h, rx_b).await })
    };
    eventually(120, "queue drained by two consumers", || async {
        (applied(&db).await.len() == n && broker.depth(&broker.queue).await == 0).then_some(())
    })
    .await;
    let _ = (stop_a.send(()), stop_b.send(()));
    let ra = within(30, "consumer a stops", ra).await.unwrap().unwrap();
    let rb = within(30, "consumer b stops", rb).await.unwrap().unwrap();
    eprintln!("consumer a: {ra:?}, consumer b: {rb:?}");
    assert!(ra.applied > 0 && rb.applied > 0, "both instances worked");
    assert_eq!(ra.applied + rb.applied, n as u64);
    assert!(
        applied(&db).await.values().all(|c| *c == 1),
        "a message was applied twice"
    );
}

#[tokio::test]
async fn failing_handlers_roll_back_and_end_rejected_and_missing_ids_are_rejected() {
    let (db, broker) = setup("inboxfail").await;
    struct Fail;
    impl Handler for Fail {
        fn handle<'a>(
            &'a self,
            _: &'a mut AsyncPgConnection,
            _: &'a InboxMessage,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            Box::pin(async { Err(HandlerError::Failed("boom".into())) })
        }
    }
    // A work queue of its own whose rejects dead-letter into `dlq`: the test waits for both
    // messages to arrive there (ready depth 0 alone would also be true while the last
    // redelivery sits unacked in the consumer's prefetch).
    let mut broker = broker;
    let (work, dlq) = work_queue_with_dlq(&mut broker, "fail.#").await;
    publish(&broker, "m-fail", "fail.f").await;
    // Ids the inbox cannot record: an empty one (every such message would share one inbox
    // row, all but the first dropped as duplicates) and one PostgreSQL's text refuses.
    publish(&broker, "", "fail.empty").await;
    publish(&broker, "a\0b", "fail.nul").await;
    broker
        .channel
        .basic_publish(
            broker.exchange.as_str().into(),
            "fail.noid".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut config = InboxConfig::new("audit", &work);
    config.max_redeliveries = 2;
    config.failure_backoff = quick_backoff();
    let inbox = Inbox::new(
        db.store().await,
        broker_config(common::broker_url()),
        config,
    );
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let run = {
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.run(Arc::new(Fail), rx).await })
    };
    eventually(
        60,
        "every message reaches the dead-letter queue",
        || async {
            (broker.depth(&dlq).await == 4 && broker.depth(&work).await == 0).then_some(())
        },
    )
    .await;
    let _ = stop.send(());
    let report = within(30, "inbox stop", run).await.unwrap().unwrap();
    assert_eq!(report.applied, 0);
    assert_eq!(report.requeued, 2, "only m-fail is requeued: {report:?}");
    assert_eq!(
        report.rejected, 4,
        "redeliveries exhausted + no, empty and NUL message_id: {report:?}"
    );
    // The failed handler's transaction was rolled back: no inbox row, so a fixed handler
    // would still process it if it were requeued by an operator.
    let mut conn = db.raw().await;
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let n: N = diesel::sql_query(format!("SELECT count(*) AS n FROM \"{}\".inbox", db.schema))
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(n.n, 0);
}

/// A failure backoff of 100 ms, for tests that want a failing message rejected soon.
fn quick_backoff() -> courier::config::BackoffConfig {
    courier::config::BackoffConfig {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(100),
        multiplier: 1.0,
        jitter: 0.0,
    }
}

/// Fails every message until `fault` after its first call (a lock timeout, a table being
/// migrated), then applies as [`Apply`] does.
struct FailAtFirst {
    schema: String,
    fault: Duration,
    until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Handler for FailAtFirst {
    fn handle<'a>(
        &'a self,
        tx: &'a mut AsyncPgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let until = *self
                .until
                .lock()
                .expect("until")
                .get_or_insert_with(|| std::time::Instant::now() + self.fault);
            if std::time::Instant::now() < until {
                return Err(HandlerError::Failed("relation is being migrated".into()));
            }
            record_applied(tx, &self.schema, &msg.message_id).await?;
            Ok(())
        })
    }
}

#[tokio::test]
async fn a_short_handler_fault_is_waited_out_not_rejected_and_a_forged_delivery_count_is_ignored() {
    let (db, broker) = setup("inboxshort").await;
    let mut broker = broker;
    let (work, dlq) = work_queue_with_dlq(&mut broker, "short.#").await;
    publish(&broker, "m-short", "short.a").await;
    // A producer's own `x-delivery-count` on a first delivery: before, the first failure
    // rejected it ("attempts=100").
    let mut headers = FieldTable::default();
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(100));
    broker
        .channel
        .basic_publish(
            broker.exchange.as_str().into(),
            "short.b".into(),
            BasicPublishOptions::default(),
            b"event",
            BasicProperties::default()
                .with_message_id("m-forged".into())
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // Two redeliveries, waited 1 s then 2 s: the 1.5 s fault is over by the third try.
    // Without the waits, all three tries fell within milliseconds of each other.
    let mut config = InboxConfig::new("short", &work);
    config.max_redeliveries = 2;
    config.failure_backoff = courier::config::BackoffConfig {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(2),
        multiplier: 2.0,
        jitter: 0.0,
    };
    let inbox = Inbox::new(
        db.store().await,
        broker_config(common::broker_url()),
        config,
    );
    let handler = Arc::new(FailAtFirst {
        schema: db.schema.clone(),
        fault: Duration::from_millis(1500),
        until: Default::default(),
    });
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let run = {
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.run(handler, rx).await })
    };
    eventually(30, "both messages applied", || async {
        (applied(&db).await.len() == 2).then_some(())
    })
    .await;
    let _ = stop.send(());
    let report = within(30, "inbox stop", run).await.unwrap().unwrap();
    assert_eq!(report.rejected, 0, "{report:?}");
    assert_eq!(report.applied, 2, "{report:?}");
    assert!(
        report.requeued >= 2,
        "each failed at least once: {report:?}"
    );
    assert_eq!(broker.depth(&dlq).await, 0, "nothing dead-lettered");
    assert!(applied(&db).await.values().all(|n| *n == 1));
}

/// Fails the messages whose id starts with `bad`, applies the others as [`Apply`] does.
struct FailBad {
    schema: String,
}

impl Handler for FailBad {
    fn handle<'a>(
        &'a self,
        tx: &'a mut AsyncPgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if msg.message_id.starts_with("bad") {
                return Err(HandlerError::Failed("unknown customer".into()));
            }
            record_applied(tx, &self.schema, &msg.message_id).await?;
            Ok(())
        })
    }
}

/// A failed delivery waiting to be requeued gives up its handler slot: with one slot, the
/// messages behind it are applied during its wait, not after (an outside re-check saw 8
/// failing messages stop a consumer for a minute).
#[tokio::test]
async fn messages_behind_a_failed_one_are_applied_while_it_waits() {
    let (db, broker) = setup("inboxbehind").await;
    let mut broker = broker;
    let (work, dlq) = work_queue_with_dlq(&mut broker, "behind.#").await;
    publish(&broker, "bad-0", "behind.a").await;
    let good: Vec<String> = (0..5).map(|i| format!("good-{i}")).collect();
    for id in &good {
        publish(&broker, id, "behind.a").await;
    }
    let mut config = InboxConfig::new("behind", &work);
    config.concurrency = 1;
    config.max_redeliveries = 1;
    config.failure_backoff = courier::config::BackoffConfig {
        initial: Duration::from_secs(20),
        max: Duration::from_secs(20),
        multiplier: 1.0,
        jitter: 0.0,
    };
    let inbox = Inbox::new(
        db.store().await,
        broker_config(common::broker_url()),
        config,
    );
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let run = {
        let handler = Arc::new(FailBad {
            schema: db.schema.clone(),
        });
        let inbox = inbox.clone();
        tokio::spawn(async move { inbox.run(handler, rx).await })
    };
    // Well within the failed one's 20 s wait.
    eventually(10, "the messages behind the failed one applied", || async {
        (applied(&db).await.len() == good.len()).then_some(())
    })
    .await;
    assert_eq!(broker.depth(&dlq).await, 0, "the failed one still waits");
    let _ = stop.send(());
    let report = within(30, "inbox stop", run).await.unwrap().unwrap();
    assert_eq!((report.applied, report.rejected), (5, 0), "{report:?}");
    // The stop put the waiting one back at once.
    eventually(10, "the failed one back in its queue", || async {
        (broker.depth(&work).await == 1).then_some(())
    })
    .await;
}

/// A producer that reuses an id for another message: the second body is not a duplicate.
/// Before, it was acked as one (a DEBUG line) and lost; now it is rejected to the queue's
/// dead-letter exchange with a WARN, while a true duplicate is still acked.
#[tokio::test]
async fn a_reused_id_with_another_body_is_rejected_not_acked_as_a_duplicate() {
    let (db, broker) = setup("inboxreuse").await;
    let mut broker = broker;
    let (work, dlq) = work_queue_with_dlq(&mut broker, "reuse.#").await;
    let inbox = Inbox::new(
        db.store().await,
        broker_config(common::broker_url()),
        InboxConfig::new("reuse", &work),
    );
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let run = {
        let (inbox, apply) = (inbox.clone(), handler(&db));
        tokio::spawn(async move { inbox.run(apply, rx).await })
    };
    publish_body(&broker, "order-7", "reuse.a", b"{\"total\": 10}").await;
    eventually(30, "the first body applied", || async {
        (applied(&db).await.len() == 1).then_some(())
    })
    .await;
    publish_body(&broker, "order-7", "reuse.a", b"{\"total\": 10}").await;
    publish_body(&broker, "order-7", "reuse.a", b"{\"total\": 99}").await;
    eventually(30, "the other body in the dead-letter queue", || async {
        (broker.depth(&dlq).await == 1).then_some(())
    })
    .await;
    let _ = stop.send(());
    let report = within(30, "inbox stop", run).await.unwrap().unwrap();
    assert_eq!(
        (report.applied, report.duplicates, report.rejected),
        (1, 1, 1),
        "{report:?}"
    );
    assert_eq!(applied(&db).await.get("order-7"), Some(&1));
}

#[tokio::test]
async fn retention_deletes_only_its_own_consumers_rows() {
    let (db, broker) = setup("inboxkeep").await;
    db.exec(
        "INSERT INTO {s}.inbox (consumer, message_id, received_at) VALUES
           ('mine', 'old', now() - interval '8 days'),
           ('mine', 'new', now() - interval '6 days'),
           ('theirs', 'old', now() - interval '8 days')",
    )
    .await;
    let inbox = Inbox::new(
        db.store().await,
        broker_config(common::broker_url()),
        InboxConfig::new("mine", &broker.queue),
    );
    let gone = inbox
        .purge(Duration::from_secs(7 * 24 * 3600))
        .await
        .expect("purge");
    assert_eq!(gone, 1, "only this consumer's old row");
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        consumer: String,
        #[diesel(sql_type = Text)]
        message_id: String,
    }
    let mut conn = db.raw().await;
    let mut rows: Vec<(String, String)> = diesel::sql_query(format!(
        "SELECT consumer, message_id FROM \"{}\".inbox",
        db.schema
    ))
    .load::<Row>(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.consumer, r.message_id))
    .collect();
    rows.sort();
    let want = [("mine", "new"), ("theirs", "old")].map(|(c, m)| (c.to_string(), m.to_string()));
    assert_eq!(
        rows, want,
        "another consumer keeps its rows as long as it likes"
    );
}

/// A proxy to the test database, and this schema's database config pointing through it.
fn database_through_proxy(db: &TestDb) -> (Proxy, courier::config::DatabaseConfig) {
    let mut url = url::Url::parse(&common::database_url()).expect("database url");
    let upstream = url
        .socket_addrs(|| Some(5432))
        .expect("database address")
        .into_iter()
        .next()
        .expect("database address");
    let proxy = Proxy::start(upstream);
    url.set_host(Some("127.0.0.1")).expect("host");
    url.set_port(Some(proxy.addr.port())).expect("port");
    let mut cfg = db.config.database.clone();
    cfg.url = SecretUrl::new(url.to_string());
    cfg.connect_timeout = Duration::from_secs(2);
    (proxy, cfg)
}

#[tokio::test]
async fn a_database_outage_holds_deliveries_instead_of_counting_or_rejecting_them() {
    let (db, broker) = setup("inboxdown").await;
    let mut broker = broker;
    // A work queue whose rejects dead-letter into `dlq`: a message rejected during the
    // outage would show there (without a DLX it would simply be gone).
    let (work, dlq) = work_queue_with_dlq(&mut broker, "down.#").await;

    let (pg, database) = database_through_proxy(&db);
    let pg = Arc::new(pg);
    let store = courier::Store::connect(&database)
        .await
        .expect("store through the proxy");
    let n = 20;
    let mut config = InboxConfig::new("ledger", &work);
    config.max_redeliveries = 1;
    config.concurrency = n + 1; // every message is tried during the outage
    config.database_retry.initial = Duration::from_millis(20);
    config.database_retry.max = Duration::from_millis(200);
    let inbox = Inbox::new(store, broker_config(common::broker_url()), config);
    let apply = handler(&db);
    // The database goes away while the first message's transaction is open: its commit
    // fails on a closed connection, and every later connection attempt is refused.
    let p = pg.clone();
    *apply.on_first.lock().unwrap() = Some(Box::new(move || {
        p.refuse(true);
        p.cut();
    }));
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let run = {
        let (inbox, apply) = (inbox.clone(), apply.clone());
        tokio::spawn(async move { inbox.run(apply, rx).await })
    };

    publish(&broker, "m0", "down.first").await;
    eventually(30, "the first message to meet the outage", || async {
        (pg.refused() > 0).then_some(())
    })
    .await;
    for i in 1..=n {
        publish(&broker, &format!("m{i}"), "down.next").await;
    }
    // Long enough down for every message to have failed more than `max_redeliveries`
    // times had the outage counted: (max_redeliveries + 2) refused connections each.
    let tries = (n as u64 + 1) * 3;
    eventually(60, "the inbox retrying through the outage", || async {
        let rejected = broker.depth(&dlq).await;
        assert_eq!(rejected, 0, "a message was rejected during the outage");
        (pg.refused() >= tries && broker.depth(&work).await == 0).then_some(())
    })
    .await;
    pg.refuse(false);

    eventually(
        60,
        "every message applied once the database is back",
        || async {
            let a = applied(&db).await;
            ((0..=n).all(|i| a.contains_key(&format!("m{i}"))) && broker.depth(&work).await == 0)
                .then_some(())
        },
    )
    .await;
    let _ = stop.send(());
    let report = within(30, "inbox stop", run).await.unwrap().unwrap();
    eprintln!(
        "inbox report: {report:?}, refused connections: {}",
        pg.refused()
    );
    let a = applied(&db).await;
    assert!(a.values().all(|c| *c == 1), "applied twice: {a:?}");
    assert_eq!(broker.depth(&dlq).await, 0, "nothing dead-lettered");
    assert_eq!(report.rejected, 0, "{report:?}");
    assert_eq!(
        report.requeued, 0,
        "the outage counted as a failure: {report:?}"
    );
    assert_eq!(report.applied, n as u64 + 1, "{report:?}");
    assert_eq!(
        report.held,
        n as u64 + 1,
        "every delivery waited: {report:?}"
    );
}

#[tokio::test]
async fn stopping_during_a_database_outage_puts_held_deliveries_back_in_the_queue() {
    let (db, broker) = setup("inboxstop").await;
    let (pg, database) = database_through_proxy(&db);
    let store = courier::Store::connect(&database)
        .await
        .expect("store through the proxy");
    pg.refuse(true);
    pg.cut();
    let n = 5;
    for i in 0..n {
        publish(&broker, &format!("s{i}"), "routed.s").await;
    }
    let mut config = InboxConfig::new("stopper", &broker.queue);
    config.max_redeliveries = 0;
    config.database_retry.initial = Duration::from_millis(20);
    config.database_retry.max = Duration::from_millis(100);
    let inbox = Inbox::new(store, broker_config(common::broker_url()), config);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let apply = handler(&db);
    let run = tokio::spawn(async move { inbox.run(apply, rx).await });
    eventually(30, "every delivery held for the database", || async {
        (pg.refused() >= 3 * n as u64 && broker.depth(&broker.queue).await == 0).then_some(())
    })
    .await;
    let _ = stop.send(());
    // The stop does not wait for the database.
    let report = within(10, "inbox stop during the outage", run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.rejected, 0, "{report:?}");
    assert_eq!(report.held, n as u64, "{report:?}");
    eventually(10, "the held deliveries back in the queue", || async {
        (broker.depth(&broker.queue).await == n).then_some(())
    })
    .await;
    assert!(applied(&db).await.is_empty());
}

/// A frozen database (it accepts bytes and never answers; TCP sees nothing wrong) holds a
/// handler's statement for as long as the freeze lasts. A stop waits `stop_timeout` for it,
/// then abandons it: its transaction is rolled back and the broker requeues its delivery.
/// An outside audit saw a SIGTERM ignored for the whole of a 20 s freeze.
#[tokio::test]
async fn a_stop_during_a_database_freeze_abandons_the_handlers_after_its_timeout() {
    let (db, broker) = setup("inboxfreeze").await;
    let (pg, mut database) = database_through_proxy(&db);
    database.pool_size = 2;
    let store = courier::Store::connect(&database)
        .await
        .expect("store through the proxy");
    // Both of the pool's connections made now: under the freeze, each handler's statement
    // then waits on an open connection (a new one would give up at its connect timeout).
    let (one, two) = tokio::join!(store.conn(), store.conn());
    drop((one.expect("connection"), two.expect("connection")));
    let mut config = InboxConfig::new("freezer", &broker.queue);
    config.stop_timeout = Duration::from_secs(2);
    // Fewer handler slots than deliveries: the rest wait for a slot the freeze never frees,
    // and the stop must not wait with them (an outside re-check saw it wait 10 min).
    config.concurrency = 2;
    let inbox = Inbox::new(store, broker_config(common::broker_url()), config);
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let apply = handler(&db);
    let run = tokio::spawn(async move { inbox.run(apply, rx).await });
    publish(&broker, "warm", "routed.w").await;
    eventually(30, "the first message applied", || async {
        (applied(&db).await.len() == 1).then_some(())
    })
    .await;
    // Frozen: its connections stay open and nothing comes back.
    pg.stall(true);
    let n = 5u32;
    for i in 0..n {
        publish(&broker, &format!("f{i}"), "routed.f").await;
    }
    eventually(30, "every delivery taken by the consumer", || async {
        (broker.depth(&broker.queue).await == 0).then_some(())
    })
    .await;
    let _ = stop.send(());
    let report = within(10, "inbox stop during the freeze", run)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    assert_eq!(report.rejected, 0, "{report:?}");
    eventually(10, "the abandoned deliveries back in the queue", || async {
        (broker.depth(&broker.queue).await == n).then_some(())
    })
    .await;
    pg.stall(false);
    assert_eq!(applied(&db).await.len(), 1, "only the first was applied");
}

/// A delivery the AMQP client cannot parse (a `message_id` that is not UTF-8, which a
/// producer in another language can send) ends the inbox's connection before the inbox
/// sees it, and the broker puts it back first in the queue. The inbox reconnects with
/// backoff, not at once (an outside audit saw 529 reconnects in 6 s, and the messages
/// behind it never applied); a quorum queue's `delivery-limit` then sets it aside and the
/// messages behind it are applied.
#[tokio::test]
async fn an_unparsable_delivery_is_waited_out_and_set_aside_by_the_queue() {
    let (db, mut broker) = setup("inboxparse").await;
    let dlq = broker.extra_queue("dlq", FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(2));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.as_str().into()),
    );
    let work = broker.extra_queue("work", args).await;
    broker
        .bind(&work, &broker.exchange.clone(), "parse.#")
        .await;
    broker.publish_unparsable(&work);
    let good: Vec<String> = (0..5).map(|i| format!("m-good-{i}")).collect();
    for id in &good {
        publish(&broker, id, "parse.good").await;
    }
    let inbox = Inbox::new(
        db.store().await,
        broker_config(common::broker_url()),
        InboxConfig::new("parser", &work),
    );
    let started = std::time::Instant::now();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let run = {
        let (inbox, apply) = (inbox.clone(), handler(&db));
        tokio::spawn(async move { inbox.run(apply, rx).await })
    };
    eventually(
        60,
        "the messages behind the unparsable one applied",
        || async {
            let a = applied(&db).await;
            good.iter().all(|id| a.contains_key(id)).then_some(())
        },
    )
    .await;
    let waited = started.elapsed();
    // One delivery at a time only until a session went 5 s without an unparsable one: the
    // queue's consumer takes the usual prefetch again.
    let prefetch = || {
        common::user::rabbitmqctl(&["list_consumers", "-q", "queue_name", "prefetch_count"])
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(q, _)| *q == work)
            .map(|(_, n)| n.trim().to_string())
    };
    let usual = InboxConfig::new("parser", &work).prefetch.to_string();
    eventually(10, "the consumer back at the usual prefetch", || async {
        (prefetch().as_deref() == Some(usual.as_str())).then_some(())
    })
    .await;
    assert_eq!(
        broker.depth(&dlq).await,
        1,
        "the queue set the unparsable one aside"
    );
    // A second one, after sessions that went well: the backoff starts again at 200 ms, so
    // the queue sets it aside after waits of 200 and 400 ms (carried on from the first,
    // they were 1.6 s and 3.2 s).
    broker.publish_unparsable(&work);
    let more: Vec<String> = (0..5).map(|i| format!("m-more-{i}")).collect();
    for id in &more {
        publish(&broker, id, "parse.good").await;
    }
    eventually(3, "the second unparsable message set aside", || async {
        (broker.depth(&dlq).await == 2).then_some(())
    })
    .await;
    eventually(60, "the messages behind the second one applied", || async {
        let a = applied(&db).await;
        more.iter().all(|id| a.contains_key(id)).then_some(())
    })
    .await;
    let _ = stop.send(());
    within(30, "inbox stop", run).await.unwrap().unwrap();
    assert_eq!(
        broker.depth(&dlq).await,
        2,
        "only the unparsable ones set aside"
    );
    // Three deliveries of it end three sessions; the reconnections between them wait 200 ms
    // and 400 ms at least. Reconnecting at once, the queue dropped it within milliseconds.
    assert!(
        waited >= Duration::from_millis(600),
        "the inbox reconnected without backoff: done in {waited:?}"
    );
    assert!(applied(&db).await.values().all(|n| *n == 1));
}
