//! Faults that do not touch the shared services (they run beside the other tests): a TCP
//! proxy that cuts, stalls and delays the broker connection; `kill -9` of a real engine
//! process; graceful shutdown; several engines on one database; a slow engine. Every
//! scenario ends with the audit: nothing committed is lost.

mod common;

use courier::testing::StoreInternals as _;
use std::{collections::HashSet, time::Duration};

use common::{
    audit::audit,
    broker::TestBroker,
    events::{confirmed_at_least, wait_event},
    eventually,
    proxy::Proxy,
    within, EngineProcess, TestDb,
};
use courier::{
    config::{BrokerUrls, SecretUrl},
    BrokerState, Engine, EngineEvent, EngineHandle, Outcome, Status,
};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(180);

async fn engine_via(db: &TestDb, proxy: &Proxy, heartbeat: Duration) -> EngineHandle {
    let mut config = db.engine_config();
    config.broker.url = SecretUrl::new(proxy.amqp_url()).into();
    config.broker.heartbeat = heartbeat;
    config.retry.max_attempts = 20;
    Engine::start(config).await.expect("engine")
}

#[actix_rt::test]
async fn tcp_cuts_mid_stream_lose_nothing() {
    let db = TestDb::new("cut").await;
    let broker = TestBroker::new("cut").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let engine = engine_via(&db, &proxy, Duration::from_secs(10)).await;
    let mut events = engine.subscribe();
    let mut ids = Vec::new();
    // One wave of rows per cut, so every cut lands while the engine is streaming however
    // fast this machine is today.
    for round in 1..=3 {
        ids.extend(db.insert_sql(&broker.exchange, 3_000, "routed.{i}").await);
        confirmed_at_least(&mut events, 500).await;
        proxy.cut();
        wait_event(&mut events, 30, "reconnect after cut", |e| {
            matches!(e, EngineEvent::BrokerConnected)
        })
        .await;
        eprintln!("cut {round} survived");
    }
    engine
        .wait_for_all(&ids, WAIT)
        .await
        .expect("all settle after cuts");
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    assert!(engine.counters().reconnects >= 3);
    engine.shutdown().await;
}

/// One engine publishes over `publisher.connections` (2 by default), started on different
/// nodes of `broker.url`: losing one connection costs only its own unconfirmed messages, and
/// the other goes on publishing. Two proxies to the one broker stand for two nodes. The
/// second node's connection is cut mid-stream while both refuse new connections, so the
/// lost one stays down until they accept again.
#[actix_rt::test]
async fn losing_one_publishing_connection_leaves_the_other_publishing() {
    let db = TestDb::new("lanes").await;
    let broker = TestBroker::new("lanes").await;
    let upstream = "127.0.0.1:5672".parse().unwrap();
    let (first, second) = (Proxy::start(upstream), Proxy::start(upstream));
    let mut config = db.engine_config();
    assert_eq!(config.publisher.connections, 2, "the default");
    config.broker.url = BrokerUrls::from(vec![
        SecretUrl::new(first.amqp_url()),
        SecretUrl::new(second.amqp_url()),
    ]);
    config.retry.max_attempts = 20;
    let engine = Engine::start(config).await.expect("engine");
    let mut events = engine.subscribe();
    let ids = db.insert_sql(&broker.exchange, 20_000, "routed.{i}").await;
    confirmed_at_least(&mut events, 500).await;
    assert_eq!(
        second.connections(),
        1,
        "the second publishing connection starts on the second node"
    );

    first.refuse(true);
    second.refuse(true);
    second.cut();
    wait_event(&mut events, 30, "the second node's connection lost", |e| {
        matches!(e, EngineEvent::BrokerDisconnected(_))
    })
    .await;
    // Down, and trying: it backs off between passes over the two nodes.
    eventually(30, "the lost connection trying both nodes", || {
        let tried = first.refused() >= 1 && second.refused() >= 1;
        async move { tried.then_some(()) }
    })
    .await;
    confirmed_at_least(&mut events, 500).await;
    assert_eq!(
        engine.broker_state(),
        BrokerState::Connected,
        "one connection is up"
    );

    first.refuse(false);
    second.refuse(false);
    wait_event(&mut events, 30, "the lost connection back", |e| {
        matches!(e, EngineEvent::BrokerConnected)
    })
    .await;
    engine
        .wait_for_all(&ids, WAIT)
        .await
        .expect("all settle after the loss");
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    assert_eq!(engine.counters().reconnects, 1);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_stalled_connection_is_detected_by_heartbeat_and_replaced() {
    let db = TestDb::new("stall").await;
    let broker = TestBroker::new("stall").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let ids = db.insert_sql(&broker.exchange, 3_000, "routed.{i}").await;
    let engine = engine_via(&db, &proxy, Duration::from_secs(1)).await;
    let mut events = engine.subscribe();
    confirmed_at_least(&mut events, 300).await;
    proxy.stall(true);
    wait_event(&mut events, 30, "disconnect on missed heartbeats", |e| {
        matches!(e, EngineEvent::BrokerDisconnected(_))
    })
    .await;
    proxy.cut(); // drop the stalled socket; new connections flow again
    proxy.stall(false);
    engine
        .wait_for_all(&ids, WAIT)
        .await
        .expect("all settle after the stall");
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_slow_link_only_slows_things_down() {
    let db = TestDb::new("delay").await;
    let broker = TestBroker::new("delay").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let engine = engine_via(&db, &proxy, Duration::from_secs(10)).await;
    proxy.delay(30);
    let ids = db.insert_sql(&broker.exchange, 1_000, "routed.{i}").await;
    engine
        .wait_for_all(&ids, WAIT)
        .await
        .expect("all settle on a slow link");
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!((a.confirmed, a.duplicates), (ids.len(), 0));
    engine.shutdown().await;
}

#[tokio::test]
async fn kill_9_mid_stream_then_restart_delivers_everything() {
    let db = TestDb::new("crash").await;
    let broker = TestBroker::new("crash").await;
    let ids = db.insert_sql(&broker.exchange, 20_000, "routed.{i}").await;
    let mut env = db.process_env();
    env.push(("COURIER_SCHEDULER_LEASE_DURATION", "3s".into()));
    env.push(("COURIER_RETRY_CONFIRM_TIMEOUT", "2s".into()));
    env.push(("COURIER_PUBLISHER_MAX_IN_FLIGHT", "2000".into()));
    let mut first = EngineProcess::spawn("crash-a", &env);
    eventually(60, "the first engine confirms some rows", || async {
        (db.count(Status::Confirmed).await >= 500).then_some(())
    })
    .await;
    first.child.kill().expect("kill -9");
    first.wait(10).await;
    let stranded = db.count(Status::InFlight).await;
    eprintln!("rows left in_flight by the killed engine: {stranded}");
    assert!(stranded > 0, "the crash should strand leased rows");

    let mut second = EngineProcess::spawn("crash-b", &env);
    eventually(120, "every row confirmed after restart", || async {
        (db.count(Status::Confirmed).await == ids.len() as i64).then_some(())
    })
    .await;
    let exit = second.terminate(30).await;
    assert!(exit.success(), "{}", second.log());
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
}

/// An engine publishing through `proxy`, with leases and confirm timeouts long enough that
/// once the proxy stalls only its shutdown (after one second) gives its rows back, and the
/// id of a warm message it has confirmed (its broker link is up).
async fn engine_that_will_hold_its_rows(
    db: &TestDb,
    broker: &TestBroker,
    proxy: &Proxy,
) -> (EngineHandle, Vec<Uuid>) {
    let mut config = db.engine_config();
    config.broker.url = SecretUrl::new(proxy.amqp_url()).into();
    config.broker.heartbeat = Duration::from_secs(60);
    config.retry.confirm_timeout = Duration::from_secs(30);
    config.scheduler.lease_duration = Duration::from_secs(120);
    config.shutdown.timeout = Duration::from_secs(1);
    let engine = Engine::start(config).await.unwrap();
    let warm = db.insert_sql(&broker.exchange, 1, "routed.warm").await;
    assert_eq!(
        engine.wait_for(warm[0], WAIT).await.unwrap(),
        Outcome::Confirmed
    );
    (engine, warm)
}

#[actix_rt::test]
async fn graceful_shutdown_releases_what_it_could_not_settle() {
    let db = TestDb::new("shutdown").await;
    let broker = TestBroker::new("shutdown").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let (engine, warm) = engine_that_will_hold_its_rows(&db, &broker, &proxy).await;
    proxy.stall(true); // confirms cannot arrive
    let mut events = engine.subscribe();
    let ids = db.insert_sql(&broker.exchange, 200, "routed.{i}").await;
    wait_event(&mut events, 30, "publishes", |e| {
        matches!(e, EngineEvent::Published(_))
    })
    .await;
    let released = within(30, "shutdown", engine.shutdown()).await;
    assert!(
        released > 0,
        "unconfirmed rows are released at the shutdown timeout"
    );
    assert_eq!(db.count(Status::InFlight).await, 0, "no lease left behind");

    // The next engine starts on them at once: a 120 s lease never has to expire.
    proxy.stall(false);
    let next = Engine::start(db.engine_config()).await.unwrap();
    next.wait_for_all(&ids, Duration::from_secs(30))
        .await
        .expect("picked up at once");
    let mut all = ids.clone();
    all.extend(warm);
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
    next.shutdown().await;
}

/// Runs of keyed rows a stopping engine gives back unpublished settle its count without an
/// event: the shutdown must see that, not wait out `shutdown.timeout`.
#[actix_rt::test]
async fn a_shutdown_with_key_runs_in_hand_ends_once_they_are_given_back() {
    let db = TestDb::new("stopruns").await;
    let broker = TestBroker::new("stopruns").await;
    let mut config = db.engine_config();
    config.shutdown.timeout = Duration::from_secs(60);
    let engine = Engine::start(config).await.expect("engine");
    let mut events = engine.subscribe();
    let ids = common::ordering::insert_keyed(&db, &broker.exchange, 5, 600)
        .await
        .all;
    confirmed_at_least(&mut events, 50).await;
    within(
        20,
        "a shutdown well inside its 60 s timeout",
        engine.shutdown(),
    )
    .await;
    assert_eq!(db.count(Status::InFlight).await, 0, "no lease left behind");

    let next = Engine::start(db.engine_config())
        .await
        .expect("next engine");
    next.wait_for_all(&ids, Duration::from_secs(60))
        .await
        .expect("the next engine delivers the rest");
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    next.shutdown().await;
}

/// The rows a stopping engine gives back are due at once, but no insert announces them: the
/// engine wakes the others itself. The engine already running here sweeps every ten
/// minutes, so only that NOTIFY can bring it to them within the test's bound.
#[actix_rt::test]
async fn an_engine_that_stops_wakes_the_others_for_the_rows_it_gave_back() {
    let db = TestDb::new("stopwake").await;
    let broker = TestBroker::new("stopwake").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let (stopping, warm) = engine_that_will_hold_its_rows(&db, &broker, &proxy).await;
    proxy.stall(true); // its confirms cannot arrive: it holds every row until it stops
    let ids = db.insert_sql(&broker.exchange, 200, "routed.{i}").await;
    eventually(30, "the first engine holds every row", || async {
        (db.count(Status::InFlight).await == ids.len() as i64).then_some(())
    })
    .await;

    let mut env = db.process_env();
    env.push(("COURIER_SCHEDULER_SWEEP_INTERVAL", "10m".into()));
    // Its listener says at debug level when notifications reach it.
    env.retain(|(k, _)| *k != "COURIER_LOGGING_LEVEL");
    env.push((
        "COURIER_LOGGING_LEVEL",
        "info,courier::actors::scheduler::listen=debug".into(),
    ));
    let mut running = EngineProcess::spawn("stopwake-running", &env);
    eventually(30, "the second engine listens", || async {
        running
            .log()
            .contains("LISTEN self-check received")
            .then_some(())
    })
    .await;
    // The shutdown waits its full second for confirms that cannot come: the running
    // engine's own first claims, which found every row leased, are long over.
    let released = within(30, "shutdown", stopping.shutdown()).await;
    assert_eq!(released, ids.len(), "every held row is given back");

    let mut all = ids.clone();
    all.extend(warm);
    eventually(
        30,
        "the running engine takes them without its sweep",
        || async { (db.count(Status::Confirmed).await == all.len() as i64).then_some(()) },
    )
    .await;
    let exit = running.terminate(30).await;
    assert!(exit.success(), "{}", running.log());
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
}

#[tokio::test]
async fn three_engine_processes_share_the_load_without_duplicates() {
    let db = TestDb::new("three").await;
    let broker = TestBroker::new("three").await;
    let ids = db.insert_sql(&broker.exchange, 10_000, "routed.{i}").await;
    let mut env = db.process_env();
    env.push(("COURIER_SCHEDULER_CLAIM_BATCH", "200".into()));
    env.push(("COURIER_PUBLISHER_MAX_IN_FLIGHT", "1000".into()));
    let mut engines: Vec<EngineProcess> = (0..3)
        .map(|i| EngineProcess::spawn(&format!("three-{i}"), &env))
        .collect();
    eventually(180, "every row confirmed by three engines", || async {
        (db.count(Status::Confirmed).await == ids.len() as i64).then_some(())
    })
    .await;
    for e in &mut engines {
        let status = e.terminate(30).await;
        assert!(status.success(), "{}", e.log());
    }
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    assert_eq!(
        a.duplicates, 0,
        "no fault was injected: a duplicate is a bug"
    );
    let publishers = db
        .store()
        .await
        .publishers_of_confirmed()
        .await
        .expect("publishers");
    eprintln!("rows published per engine: {publishers:?}");
    assert!(
        publishers.len() >= 2,
        "the load was not shared: {publishers:?}"
    );
}

#[actix_rt::test]
async fn a_slow_but_alive_engine_keeps_its_rows() {
    let db = TestDb::new("slow").await;
    let broker = TestBroker::new("slow").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let lease = Duration::from_secs(2);
    let mut slow_cfg = db.engine_config();
    slow_cfg.broker.url = SecretUrl::new(proxy.amqp_url()).into();
    slow_cfg.broker.heartbeat = Duration::from_secs(60);
    slow_cfg.retry.confirm_timeout = Duration::from_secs(60);
    slow_cfg.scheduler.lease_duration = lease;
    let slow = Engine::start(slow_cfg).await.unwrap();
    let warm = db.insert_sql(&broker.exchange, 1, "routed.warm").await;
    assert_eq!(
        slow.wait_for(warm[0], WAIT).await.unwrap(),
        Outcome::Confirmed
    );
    proxy.stall(true); // its confirms now take as long as the stall lasts
    let mut events = slow.subscribe();
    // Fewer rows than the smallest in-flight window (256): the slow engine holds them all,
    // so anything the fast one claims was taken from it.
    let ids = db.insert_sql(&broker.exchange, 200, "routed.{i}").await;
    wait_event(&mut events, 30, "the slow engine publishes", |e| {
        matches!(e, EngineEvent::Published(_))
    })
    .await;

    let mut fast_cfg = db.engine_config();
    fast_cfg.scheduler.lease_duration = lease;
    fast_cfg.scheduler.sweep_interval = Duration::from_millis(50);
    let fast = Engine::start(fast_cfg).await.unwrap();
    // Three lease periods pass while the slow engine waits for its confirms: had it not
    // renewed, the fast engine would have rescued and re-published its rows.
    let start = std::time::Instant::now();
    eventually(
        30,
        "three lease periods with the rows still held",
        || async {
            let held = db.count(Status::InFlight).await;
            assert!(
                held > 0 || start.elapsed() < lease,
                "rows left the slow engine"
            );
            (start.elapsed() > lease * 3).then_some(())
        },
    )
    .await;
    assert_eq!(
        fast.counters().claimed,
        0,
        "the fast engine took rows from the slow one"
    );
    // Longer than the engine timeout (5 s): the slow engine's heartbeat went on, so the
    // fast one declared nobody dead.
    assert_eq!(fast.counters().engines_rescued, 0);
    proxy.stall(false);
    slow.wait_for_all(&ids, WAIT)
        .await
        .expect("the slow engine finishes");
    let mut all = ids.clone();
    all.extend(warm);
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
    assert_eq!(
        a.duplicates, 0,
        "a rescue from a live engine doubled messages"
    );
    let seen: HashSet<Uuid> = all.iter().copied().collect();
    assert_eq!(seen.len(), all.len());
    fast.shutdown().await;
    slow.shutdown().await;
}

#[tokio::test]
async fn database_unreachable_at_start_is_retried_until_it_appears() {
    let port = Proxy::free_port();
    let schema = common::unique_name("pgstart");
    let _drop_schema = common::TestDbGuard(schema.clone());
    let broker = TestBroker::new("pgstart").await;
    let env = vec![
        (
            "COURIER_DATABASE_URL",
            format!("postgres://postgres:s3cret@127.0.0.1:{port}/postgres"),
        ),
        ("COURIER_DATABASE_SCHEMA", schema.clone()),
        ("COURIER_DATABASE_CONNECT_TIMEOUT", "1s".into()),
        ("COURIER_BROKER_URL", common::broker_url()),
        ("COURIER_SCHEDULER_SWEEP_INTERVAL", "100ms".into()),
    ];
    let mut engine = EngineProcess::spawn("pgstart", &env);
    eventually(30, "a retry line while PostgreSQL is unreachable", || {
        let log = engine.log();
        async move { log.contains("PostgreSQL not available yet").then_some(()) }
    })
    .await;
    let log = engine.log();
    assert!(log.contains(&format!("127.0.0.1:{port}")), "{log}");
    assert!(!log.contains("s3cret"), "password leaked: {log}");
    assert!(
        engine.child.try_wait().unwrap().is_none(),
        "the engine gave up instead of retrying"
    );

    // The database "comes back" on that port.
    let _proxy = Proxy::start_on(port, "127.0.0.1:5432".parse().unwrap());
    let store = common::migrated_by_process(&schema, 60).await;
    let m = courier::OutboxMessage::new(&broker.exchange, "routed.late", b"x".to_vec());
    store.enqueue(&m).await.unwrap();
    eventually(60, "the row is confirmed", || {
        let store = store.clone();
        async move {
            let s = store.stats().await.ok()?;
            (s.count(Status::Confirmed) == 1).then_some(())
        }
    })
    .await;
    let exit = engine.terminate(30).await;
    assert!(exit.success(), "{}", engine.log());
}

#[tokio::test]
async fn database_unreachable_with_wait_at_start_off_exits_1() {
    let port = Proxy::free_port();
    let env = vec![
        (
            "COURIER_DATABASE_URL",
            format!("postgres://postgres:s3cret@127.0.0.1:{port}/postgres"),
        ),
        ("COURIER_DATABASE_WAIT_AT_START", "false".into()),
        ("COURIER_DATABASE_CONNECT_TIMEOUT", "1s".into()),
    ];
    let mut engine = EngineProcess::spawn("pgfail", &env);
    let status = engine.wait(30).await;
    assert_eq!(status.code(), Some(1), "{}", engine.log());
    let log = engine.log();
    assert!(
        log.contains(&format!("127.0.0.1:{port}")) && !log.contains("s3cret"),
        "{log}"
    );
}

/// A longer run behind a flag: `COURIER_SOAK=200000 cargo test --test faults soak -- --ignored`
/// streams that many messages while the proxy cuts the connection after every few
/// thousand confirmations, then audits.
#[actix_rt::test]
#[ignore = "soak mode: set COURIER_SOAK=<messages> and run with --ignored"]
async fn soak_with_periodic_cuts() {
    let n: usize = std::env::var("COURIER_SOAK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let db = TestDb::new("soak").await;
    let broker = TestBroker::new("soak").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let engine = engine_via(&db, &proxy, Duration::from_secs(10)).await;
    let mut events = engine.subscribe();
    let mut ids = Vec::with_capacity(n);
    for start in (0..n).step_by(10_000) {
        let batch = (n - start).min(10_000);
        ids.extend(db.insert_sql(&broker.exchange, batch, "routed.{i}").await);
        confirmed_at_least(&mut events, batch / 5).await;
        proxy.cut();
    }
    engine
        .wait_for_all(&ids, Duration::from_secs(1800))
        .await
        .expect("soak settles");
    let report = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(report.confirmed, ids.len());
    engine.shutdown().await;
}

/// Rows the publisher dead-letters without touching the broker (a routing key over AMQP's
/// 255 bytes), one attempt each.
fn unpublishable(exchange: &str, n: usize) -> Vec<courier::OutboxMessage> {
    (0..n)
        .map(|i| {
            let key = format!("routed.{i}.{}", "k".repeat(300));
            courier::OutboxMessage::new(exchange, key, format!("m{i}")).with_max_attempts(1)
        })
        .collect()
}

/// Waits until every id of `ids` is announced dead-lettered.
async fn dead_lettered(
    events: &mut tokio::sync::broadcast::Receiver<EngineEvent>,
    ids: &[Uuid],
    secs: u64,
    what: &str,
) {
    let mut waiting: HashSet<Uuid> = ids.iter().copied().collect();
    while !waiting.is_empty() {
        let moved = common::events::next_event(events, secs, what, |e| match e {
            EngineEvent::DeadLettered(rows) => Some(rows.clone()),
            _ => None,
        })
        .await;
        for (id, _) in moved.iter() {
            waiting.remove(id);
        }
    }
}

/// Consumes `queue` until every id of `ids` was received (bounded).
async fn receive_all(queue: &str, ids: &[Uuid], secs: u64) {
    use futures::StreamExt;
    let conn = lapin::Connection::connect(
        &common::broker_url(),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut waiting: HashSet<Uuid> = ids.iter().copied().collect();
    within(secs, "dead letters on the dead-letter exchange", async {
        while !waiting.is_empty() {
            let d = consumer
                .next()
                .await
                .expect("consumer open")
                .expect("delivery");
            if let Some(id) = d
                .properties
                .message_id()
                .as_ref()
                .and_then(|s| Uuid::parse_str(s.as_str()).ok())
            {
                waiting.remove(&id);
            }
        }
    })
    .await;
    let _ = conn.close(200, "done".into()).await;
}

#[actix_rt::test]
async fn a_stalled_dead_letter_exchange_does_not_hold_up_dead_letters() {
    let db = TestDb::new("dlxstall").await;
    let mut broker = TestBroker::new("dlxstall").await;
    let dlx = broker
        .extra_exchange("dlx", lapin::ExchangeKind::Fanout)
        .await;
    let dlq = broker
        .extra_queue("dlq", lapin::types::FieldTable::default())
        .await;
    broker.bind(&dlq, &dlx, "").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let mut config = db.engine_config();
    let publishers = config.publisher.connections;
    config.broker.url = SecretUrl::new(proxy.amqp_url()).into();
    config.broker.heartbeat = Duration::from_secs(60); // the stall is not a dead link
    config.broker.connect_timeout = Duration::from_secs(2);
    config.retry.confirm_timeout = Duration::from_secs(8);
    config.dead_letter.exchange = Some(dlx.clone());
    let engine = Engine::start(config).await.expect("engine");
    let store = db.store().await;
    let mut events = engine.subscribe();

    // The dead-letter link is up and delivering.
    let warm = unpublishable(&broker.exchange, 1);
    let warm_ids: Vec<Uuid> = warm.iter().map(|m| m.id).collect();
    store.enqueue_many(&warm).await.expect("enqueue");
    receive_all(&dlq, &warm_ids, 30).await;

    // Its confirms stop arriving: the first batch's publish to the exchange hangs…
    proxy.stall(true);
    let first = unpublishable(&broker.exchange, 50);
    let first_ids: Vec<Uuid> = first.iter().map(|m| m.id).collect();
    store.enqueue_many(&first).await.expect("enqueue");
    dead_lettered(&mut events, &first_ids, 30, "the first batch moved").await;
    // …and the next batch is still moved to dead_letters, well before that publish's
    // confirm bound (8 s) could have released anything.
    let second = unpublishable(&broker.exchange, 50);
    let second_ids: Vec<Uuid> = second.iter().map(|m| m.id).collect();
    store.enqueue_many(&second).await.expect("enqueue");
    dead_lettered(
        &mut events,
        &second_ids,
        4,
        "the second batch moved while the exchange is stalled",
    )
    .await;

    // The stalled publish times out (retry.confirm_timeout) and its link is dropped: a
    // new dead-letter connection is tried (the engine's start check, the publisher's and the
    // first are the others).
    let before = proxy.connections();
    assert_eq!(
        before,
        2 + u64::from(publishers),
        "start check, publishing ({publishers}) and dead-letter connections"
    );
    eventually(20, "a new dead-letter connection after the timeout", || {
        let n = proxy.connections();
        async move { (n > before).then_some(()) }
    })
    .await;
    // Once the link flows again, later dead letters reach the exchange.
    proxy.stall(false);
    let third = unpublishable(&broker.exchange, 20);
    let third_ids: Vec<Uuid> = third.iter().map(|m| m.id).collect();
    store.enqueue_many(&third).await.expect("enqueue");
    receive_all(&dlq, &third_ids, 60).await;

    let mut all = warm_ids;
    all.extend(first_ids);
    all.extend(second_ids);
    all.extend(third_ids);
    engine
        .wait_for_all(&all, WAIT)
        .await
        .expect("all dead-lettered");
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.dead_lettered, all.len());
    assert_eq!(db.count(Status::InFlight).await, 0);
    assert_eq!(db.count(Status::Retrying).await, 0);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_batch_slower_than_connect_timeout_on_a_slow_link_is_not_a_dead_connection() {
    let db = TestDb::new("slowup").await;
    let broker = TestBroker::new("slowup").await;
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let mut config = db.engine_config();
    config.broker.url = SecretUrl::new(proxy.amqp_url()).into();
    config.broker.connect_timeout = Duration::from_secs(2);
    config.retry.confirm_timeout = Duration::from_secs(60);
    let engine = Engine::start(config).await.expect("engine");
    let mut events = engine.subscribe();
    wait_event(&mut events, 30, "connected", |e| {
        matches!(e, EngineEvent::BrokerConnected)
    })
    .await;
    // 32 × 512 KiB = 16 MiB at 2 MiB/s: about 8 s of writing, four times connect_timeout.
    proxy.throttle_up(2 * 1024 * 1024);
    let messages: Vec<courier::OutboxMessage> = (0..32)
        .map(|i| {
            courier::OutboxMessage::new(
                &broker.exchange,
                format!("routed.{i}"),
                vec![b'x'; 512 * 1024],
            )
        })
        .collect();
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
    db.store()
        .await
        .enqueue_many(&messages)
        .await
        .expect("enqueue");
    let started = std::time::Instant::now();
    tokio::select! {
        settled = engine.wait_for_all(&ids, WAIT) => { settled.expect("all confirmed"); }
        why = common::events::next_event(&mut events, 180, "a disconnect", |e| match e {
            EngineEvent::BrokerDisconnected(why) => Some(why.clone()),
            _ => None,
        }) => panic!("the slow link was taken for a dead connection: {why}"),
    }
    let took = started.elapsed();
    eprintln!("16 MiB through a 2 MiB/s link in {took:?}");
    assert!(
        took > Duration::from_secs(4),
        "the link was not slow ({took:?}): the test proves nothing"
    );
    assert_eq!(engine.counters().reconnects, 0);
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(
        (a.confirmed, a.received, a.duplicates),
        (ids.len(), ids.len(), 0)
    );
    engine.shutdown().await;
}

/// A database outage silences every engine at once (a restart, a failover, a cut in front
/// of the database): none of them died. Once the database is back, none may declare another
/// dead and free its rows — the first engine back used to, milliseconds before the other's
/// own beat came back (an outside audit: two engines, an 8 s restart).
#[actix_rt::test]
async fn engines_silenced_together_by_a_database_outage_declare_none_dead() {
    let db = TestDb::new("pgtogether").await;
    let broker = TestBroker::new("pgtogether").await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap());
    let config = || {
        let mut c = db.engine_config();
        c.database.url = SecretUrl::new(format!("postgres://postgres@{}/postgres", proxy.addr));
        c
    };
    let a = Engine::start(config()).await.expect("engine a");
    let b = Engine::start(config()).await.expect("engine b");
    let warm = db.insert_sql(&broker.exchange, 50, "routed.{i}").await;
    eventually(60, "the first rows confirmed", || async {
        (db.count(Status::Confirmed).await == 50).then_some(())
    })
    .await;
    let store = db.store().await;
    let registry = || async { store.engines(Duration::from_secs(5)).await.ok() };

    // Gone for longer than the engine timeout (5 s), for both engines alike.
    proxy.refuse(true);
    proxy.cut();
    eventually(
        60,
        "both engines silent past the engine timeout",
        || async {
            let r = registry().await?;
            (r.len() == 2 && r.iter().all(|e| e.since_beat_ms > 7_000)).then_some(())
        },
    )
    .await;
    proxy.refuse(false);
    let back = std::time::Instant::now();
    // Watched for longer than an engine timeout after the return, by which time an engine
    // back first would have judged the other: both beat again and stay running.
    eventually(
        60,
        "both engines running 8 s after the database's return",
        || async {
            let r = registry().await?;
            if let Some(dead) = r.iter().find(|e| e.state == "dead") {
                panic!("engine {} declared dead after an outage both saw", dead.id);
            }
            let beating = r.iter().all(|e| e.since_beat_ms < 2_000);
            (beating && back.elapsed() > Duration::from_secs(8)).then_some(())
        },
    )
    .await;
    let (ca, cb) = (a.counters(), b.counters());
    assert_eq!((ca.engines_rescued, cb.engines_rescued), (0, 0));
    assert_eq!((ca.rejoins, cb.rejoins), (0, 0));

    let more = db.insert_sql(&broker.exchange, 100, "routed.{i}").await;
    eventually(60, "every row confirmed after the outage", || async {
        (db.count(Status::Confirmed).await == 150).then_some(())
    })
    .await;
    let all: Vec<Uuid> = warm.iter().chain(&more).copied().collect();
    let checked = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!((checked.confirmed, checked.duplicates), (all.len(), 0));
    a.shutdown().await;
    b.shutdown().await;
}

#[actix_rt::test]
async fn a_failing_claim_loop_backs_off_while_the_database_is_gone() {
    let db = TestDb::new("claimoff").await;
    let broker = TestBroker::new("claimoff").await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap());
    let mut config = db.engine_config();
    config.database.url = SecretUrl::new(format!("postgres://postgres@{}/postgres", proxy.addr));
    // The sweep alone would claim twenty times a second.
    config.scheduler.sweep_interval = Duration::from_millis(50);
    let engine = Engine::start(config).await.expect("engine");
    let ids = db.insert_sql(&broker.exchange, 100, "routed.{i}").await;
    engine.wait_for_all(&ids, WAIT).await.expect("delivered");

    // The database goes away.
    proxy.refuse(true);
    proxy.cut();
    let first = eventually(30, "a failed claim round", || {
        let n = engine.counters().claim_failures;
        async move { (n >= 1).then(std::time::Instant::now) }
    })
    .await;
    // Three rounds, not more: once the engine's registry beat is overdue (half the engine
    // timeout after the database went) it stops claiming altogether.
    eventually(30, "three failed claim rounds", || {
        let n = engine.counters().claim_failures;
        async move { (n >= 3).then_some(()) }
    })
    .await;
    // Backoff 200 ms doubling, ±20 %: rounds 2-3 come at least 0.48 s after the first
    // (without it, five rounds took 212 ms).
    let took = first.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "two more failed claim rounds within {took:?}: no backoff"
    );

    // It comes back: the engine claims again (within the 5 s cap) and delivers.
    proxy.refuse(false);
    let more = db.insert_sql(&broker.exchange, 100, "routed.{i}").await;
    engine
        .wait_for_all(&more, WAIT)
        .await
        .expect("delivered after");
    let all: Vec<Uuid> = ids.iter().chain(&more).copied().collect();
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
    engine.shutdown().await;
}

/// A multi-host URL whose first host goes silent mid-run (a frozen primary: it accepts bytes
/// and never answers, so TCP sees nothing wrong). Statements already sent are given up
/// after the lease, and new connections try the next host after `connect_timeout`, as
/// libpq does: the rows keep flowing through the second host.
#[actix_rt::test]
async fn a_silent_first_database_host_gives_way_to_the_next() {
    let db = TestDb::new("pgsilent").await;
    let broker = TestBroker::new("pgsilent").await;
    let first = Proxy::start("127.0.0.1:5432".parse().unwrap());
    let mut config = db.engine_config();
    config.database.url = SecretUrl::new(format!(
        "postgres://postgres@{},127.0.0.1:5432/postgres?sslmode=disable",
        first.addr
    ));
    // Longer than /ready's own 2 s: a probe connection opening towards the silent host
    // never reaches the second one within it.
    config.database.connect_timeout = Duration::from_secs(3);
    config.scheduler.lease_duration = Duration::from_secs(5);
    let admin = format!("127.0.0.1:{}", Proxy::free_port());
    config.admin.bind = Some(admin.clone());
    let engine = Engine::start(config).await.expect("engine starts");
    let before = db.insert_sql(&broker.exchange, 200, "routed.a{i}").await;
    engine.nudge();
    let outcomes = engine
        .wait_for_all(&before, WAIT)
        .await
        .expect("first rows");
    assert!(before.iter().all(|id| outcomes[id] == Outcome::Confirmed));
    assert!(first.connections() > 0, "the first host was not used");
    // /ready's own connection is open now, to the first host.
    assert_eq!(common::http(&admin, "GET", "/ready", None).await.0, 200);
    let mut events = engine.subscribe();

    first.stall(true);
    let after = db.insert_sql(&broker.exchange, 200, "routed.b{i}").await;
    engine.nudge();
    let outcomes = engine
        .wait_for_all(&after, Duration::from_secs(60))
        .await
        .expect("rows committed after the first host went silent");
    assert!(after.iter().all(|id| outcomes[id] == Outcome::Confirmed));
    // The engine works through the second host, and says so: /ready does not keep asking
    // a connection to the silent one.
    eventually(30, "/ready while the first host is silent", || async {
        let (code, body) = common::http(&admin, "GET", "/ready", None).await;
        (code == 200).then_some(()).or_else(|| {
            eprintln!("/ready: {code} {body}");
            None
        })
    })
    .await;
    // Its LISTEN connection, on the silent host, gets no notification any more: its own
    // repeated self-check does not come back, and it listens on the second host.
    wait_event(&mut events, 90, "LISTEN again, on the second host", |e| {
        matches!(e, EngineEvent::ListenerReady { receiving: true })
    })
    .await;
    let all: Vec<Uuid> = before.into_iter().chain(after).collect();
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
    engine.shutdown().await;
}

/// An engine connected through a proxy (one row delivered, so its connection is up) whose
/// confirms the proxy then holds back: rows stay in flight in the engine's hands.
async fn confirms_held_back(db: &TestDb, broker: &TestBroker) -> (Proxy, EngineHandle, Vec<Uuid>) {
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap());
    let engine = engine_via(db, &proxy, Duration::from_secs(60)).await;
    let first = db.insert_sql(&broker.exchange, 1, "routed.first").await;
    engine.wait_for_all(&first, WAIT).await.expect("connected");
    proxy.stall(true);
    (proxy, engine, first)
}

/// An engine that claims rows it already holds (its claim was lost in a database crash:
/// claims commit without waiting for the WAL flush; or its lease lapsed while it was
/// paused) goes on with the copies in hand: nothing is published twice and its window
/// does not fill with rows that will never settle.
#[actix_rt::test]
async fn rows_claimed_again_by_their_own_engine_are_not_published_twice() {
    let db = TestDb::new("reclaim").await;
    let broker = TestBroker::new("reclaim").await;
    let (proxy, engine, mut ids) = confirms_held_back(&db, &broker).await;
    ids.extend(db.insert_sql(&broker.exchange, 30, "routed.r{i}").await);
    engine.nudge();
    eventually(10, "the rows in flight", || async {
        (db.count(Status::InFlight).await == 30).then_some(())
    })
    .await;
    // The claim as a crash would lose it: the rows are waiting again in the database.
    db.exec(
        "UPDATE {s}.outbox SET status = 'pending', locked_by = NULL, locked_until = NULL
         WHERE status = 'in_flight'",
    )
    .await;
    engine.nudge();
    eventually(10, "the rows claimed again", || async {
        (db.count(Status::InFlight).await == 30).then_some(())
    })
    .await;
    proxy.stall(false);
    let outcomes = engine.wait_for_all(&ids, WAIT).await.expect("every row");
    assert!(ids.iter().all(|id| outcomes[id] == Outcome::Confirmed));
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.duplicates, 0, "rows claimed again were published twice");
    engine.shutdown().await;
}

/// The same with ordered keys: a claim that returns a key's head this engine already holds
/// gives the key's other new rows back (they cannot be a run behind the copy in hand), and
/// every key is still delivered in order, once.
#[actix_rt::test]
async fn keyed_rows_claimed_again_by_their_own_engine_keep_their_order() {
    use common::ordering::{assert_first_seen_in_order, insert_keyed};
    let db = TestDb::new("rekeyed").await;
    let broker = TestBroker::new("rekeyed").await;
    let (proxy, engine, _) = confirms_held_back(&db, &broker).await;
    let mut keyed = insert_keyed(&db, &broker.exchange, 5, 3).await;
    engine.nudge();
    eventually(10, "heads and runs in flight", || async {
        (db.count(Status::InFlight).await == 15).then_some(())
    })
    .await;
    // Two more rows per key, behind the runs in hand.
    let later = insert_keyed(&db, &broker.exchange, 5, 2).await;
    db.exec(
        "UPDATE {s}.outbox SET status = 'pending', locked_by = NULL, locked_until = NULL
         WHERE status = 'in_flight'",
    )
    .await;
    engine.nudge();
    eventually(
        10,
        "the held rows claimed again, the new ones given back",
        || async {
            let (in_flight, pending) = (
                db.count(Status::InFlight).await,
                db.count(Status::Pending).await,
            );
            (in_flight == 15 && pending == 10).then_some(())
        },
    )
    .await;
    proxy.stall(false);
    for (key, ids) in later.by_key {
        keyed.by_key.entry(key).or_default().extend(ids);
    }
    keyed.all.extend(later.all);
    let outcomes = engine
        .wait_for_all(&keyed.all, WAIT)
        .await
        .expect("every row");
    assert!(keyed
        .all
        .iter()
        .all(|id| outcomes[id] == Outcome::Confirmed));
    let (a, received) =
        common::audit::audit_received(&db, &broker, &broker.queue, &keyed.all).await;
    assert_first_seen_in_order(&received, &keyed);
    assert_eq!(a.duplicates, 0, "rows claimed again were published twice");
    engine.shutdown().await;
}
