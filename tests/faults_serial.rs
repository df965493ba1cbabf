//! Faults that stop or block the shared services: a real broker restart, a memory alarm
//! that blocks publishers, PostgreSQL going away mid-run. They must not run beside other
//! tests, so they are `#[ignore]`d here and run alone, one at a time, by `scripts/test`:
//!
//! ```sh
//! cargo test --test faults_serial -- --ignored --test-threads=1
//! ```
//!
//! Each one restores the service in a guard's `Drop`, so a failing test still leaves
//! RabbitMQ running and unblocked and PostgreSQL up.

mod common;

use courier::testing::StoreInternals as _;
use std::{process::Command, time::Duration};

use common::{
    audit::{audit, audit_received},
    broker::TestBroker,
    events::{confirmed_at_least, wait_event},
    eventually,
    ordering::{assert_first_seen_in_order, insert_keyed},
    within, EngineProcess, TestDb,
};
use courier::{Engine, EngineEvent, Status};

const WAIT: Duration = Duration::from_secs(240);

fn sh(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Starts the RabbitMQ app again on drop.
struct BrokerAppGuard;

impl Drop for BrokerAppGuard {
    fn drop(&mut self) {
        sh("rabbitmqctl", &["-q", "start_app"]);
        sh("rabbitmqctl", &["-q", "await_startup"]);
    }
}

/// Lowers the broker's memory watermark so that it raises a memory alarm, and puts the
/// watermark it found back on drop (a broker configured with another one keeps it).
struct AlarmGuard(String);

impl AlarmGuard {
    fn raise() -> AlarmGuard {
        let found = Command::new("rabbitmqctl")
            .args([
                "-q",
                "eval",
                "vm_memory_monitor:get_vm_memory_high_watermark().",
            ])
            .output()
            .expect("rabbitmqctl eval");
        assert!(found.status.success(), "reading the memory watermark");
        let found = String::from_utf8_lossy(&found.stdout).trim().to_string();
        let guard = AlarmGuard(found);
        assert!(sh(
            "rabbitmqctl",
            &["-q", "set_vm_memory_high_watermark", "0.0000001"]
        ));
        guard
    }
}

impl Drop for AlarmGuard {
    fn drop(&mut self) {
        let restore = format!(
            "vm_memory_monitor:set_vm_memory_high_watermark({}).",
            self.0
        );
        sh("rabbitmqctl", &["-q", "eval", &restore]);
    }
}

fn pg_cluster(action: &str) -> bool {
    let version = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .unwrap_or_else(|| "15".into());
    let mut args = vec![
        "--skip-systemctl-redirect",
        version.as_str(),
        "main",
        action,
    ];
    if action == "stop" {
        args.extend(["-m", "fast"]);
    }
    sh("pg_ctlcluster", &args)
}

/// Starts PostgreSQL again on drop.
struct PgGuard;

impl Drop for PgGuard {
    fn drop(&mut self) {
        pg_cluster("start");
        for _ in 0..60 {
            if sh("pg_isready", &["-q", "-h", "127.0.0.1"]) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[actix_rt::test]
#[ignore = "restarts the shared broker: run alone (scripts/test does)"]
async fn broker_restart_mid_stream_loses_nothing() {
    let db = TestDb::new("restart").await;
    let broker = TestBroker::new("restart").await;
    let ids = db.insert_sql(&broker.exchange, 5_000, "routed.{i}").await;
    let mut config = db.engine_config();
    config.retry.max_attempts = 50;
    let engine = Engine::start(config).await.unwrap();
    let mut events = engine.subscribe();
    confirmed_at_least(&mut events, 500).await;
    {
        let _guard = BrokerAppGuard;
        assert!(sh("rabbitmqctl", &["-q", "stop_app"]), "stop_app");
        wait_event(&mut events, 30, "disconnect", |e| {
            matches!(e, EngineEvent::BrokerDisconnected(_))
        })
        .await;
    } // start_app
    wait_event(&mut events, 120, "reconnect", |e| {
        matches!(e, EngineEvent::BrokerConnected)
    })
    .await;
    engine
        .wait_for_all(&ids, WAIT)
        .await
        .expect("all settle after the restart");
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    assert!(engine.counters().reconnects >= 1);
    engine.shutdown().await;
}

#[actix_rt::test]
#[ignore = "sets a memory alarm on the shared broker: run alone (scripts/test does)"]
async fn memory_alarm_pauses_publishing_and_keeps_leases() {
    let db = TestDb::new("alarm").await;
    let broker = TestBroker::new("alarm").await;
    let lease = Duration::from_secs(2);
    let mut config = db.engine_config();
    config.publisher.max_in_flight = 100;
    config.scheduler.lease_duration = lease;
    config.retry.confirm_timeout = Duration::from_secs(120);
    let engine = Engine::start(config).await.unwrap();
    let warm = db.insert_sql(&broker.exchange, 1, "routed.warm").await;
    engine.wait_for(warm[0], WAIT).await.unwrap();
    let mut events = engine.subscribe();
    let ids = {
        let _guard = AlarmGuard::raise();
        let ids = db.insert_sql(&broker.exchange, 1_000, "routed.{i}").await;
        wait_event(&mut events, 60, "connection.blocked", |e| {
            matches!(e, EngineEvent::BrokerBlocked(_))
        })
        .await;
        // Blocked: the bound holds, and what the engine holds keeps its lease for three
        // lease periods, longer than the engine timeout (a second engine would not rescue
        // it).
        let start = std::time::Instant::now();
        eventually(30, "three lease periods while blocked", || async {
            assert!(
                engine.outstanding().await <= 100,
                "in-flight bound broken while blocked"
            );
            // The rescuer registers as a running engine, as an engine does before it claims:
            // rows held by an id no running engine has are freed by the engine's heartbeat.
            db.exec(
                "INSERT INTO {s}.engines (id, host, pid, version) VALUES ('rescuer', 'test', 1, 't')
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), state = 'running'",
            )
            .await;
            let expired = db
                .store()
                .await
                .claim("rescuer", 1_000, Duration::from_secs(60))
                .await
                .expect("claim");
            // Only rows never claimed may be taken; a held row must not be.
            let stolen = expired.iter().filter(|m| m.attempts > 1).count();
            assert_eq!(
                stolen, 0,
                "a held row was rescued while the engine was blocked"
            );
            // Its heartbeat goes on (its own connection, not the blocked claim path): a
            // live engine's rescue finds nobody dead.
            let mut conn = db.raw().await;
            let (timeout, bound) = (Duration::from_secs(5), Duration::from_secs(5));
            let rescued =
                courier::testing::rescue(&mut conn, &db.schema, "rescuer", timeout, bound)
                    .await
                    .expect("rescue");
            assert!(
                rescued.is_empty(),
                "a blocked engine was declared dead: {rescued:?}"
            );
            // Put back what the rescuer took (pending rows), untouched.
            let taken: Vec<uuid::Uuid> = expired.iter().map(|m| m.id).collect();
            db.store()
                .await
                .release("rescuer", &taken)
                .await
                .expect("release");
            (start.elapsed() > lease * 3).then_some(())
        })
        .await;
        ids
    }; // alarm cleared
    wait_event(&mut events, 60, "connection.unblocked", |e| {
        matches!(e, EngineEvent::BrokerUnblocked)
    })
    .await;
    engine
        .wait_for_all(&ids, WAIT)
        .await
        .expect("all settle after the alarm");
    let mut all = ids.clone();
    all.extend(warm);
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
    engine.shutdown().await;
}

#[actix_rt::test]
#[ignore = "stops the shared PostgreSQL: run alone (scripts/test does)"]
async fn database_loss_mid_run_crashes_nothing_and_loses_nothing() {
    let db = TestDb::new("pgloss").await;
    let broker = TestBroker::new("pgloss").await;
    // Enough rows that the engine is still streaming when the database goes away.
    let ids = db.insert_sql(&broker.exchange, 20_000, "routed.{i}").await;
    // Through a proxy, so acks can be held back and then delivered while the database is
    // down: the engine must keep them and write them once it returns.
    let proxy = common::proxy::Proxy::start("127.0.0.1:5672".parse().unwrap());
    let mut config = db.engine_config();
    config.broker.url = courier::config::SecretUrl::new(proxy.amqp_url()).into();
    config.broker.heartbeat = Duration::from_secs(60);
    config.publisher.max_in_flight = 1_000;
    let engine = Engine::start(config).await.unwrap();
    let mut events = engine.subscribe();
    confirmed_at_least(&mut events, 500).await;
    {
        let _guard = PgGuard;
        proxy.stall(true);
        let acked_before = engine.counters().acked;
        // The fault must land with acks held back: wait for a publish behind the stalled
        // link (the engine may have been between claims when the link stalled).
        let published = engine.counters().published;
        eventually(60, "a publish behind the stalled link", || async {
            (engine.counters().published > published).then_some(())
        })
        .await;
        assert!(pg_cluster("stop"), "stop PostgreSQL");
        proxy.stall(false);
        eventually(60, "acks received while PostgreSQL is down", || async {
            (engine.counters().acked > acked_before).then_some(())
        })
        .await;
    } // PostgreSQL starts again
    engine
        .wait_for_all(&ids, WAIT)
        .await
        .expect("all settle after the database returns");
    let a = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    assert_eq!(db.count(Status::InFlight).await, 0);
    engine.shutdown().await;
}

/// Applies a message by inserting its id into `<schema>.applied` (no unique key: a double
/// application would show as two rows).
struct ApplyOnce {
    schema: String,
}

impl courier::inbox::Handler for ApplyOnce {
    fn handle<'a>(
        &'a self,
        tx: &'a mut diesel_async::AsyncPgConnection,
        msg: &'a courier::inbox::InboxMessage,
    ) -> futures::future::BoxFuture<'a, Result<(), courier::inbox::HandlerError>> {
        use diesel_async::RunQueryDsl;
        Box::pin(async move {
            diesel::sql_query(format!(
                "INSERT INTO \"{}\".applied (message_id) VALUES ($1)",
                self.schema
            ))
            .bind::<diesel::sql_types::Text, _>(&msg.message_id)
            .execute(tx)
            .await?;
            Ok(())
        })
    }
}

async fn applied_counts(db: &TestDb) -> (usize, i64) {
    use diesel_async::RunQueryDsl;
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        distinct: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        most: i64,
    }
    let mut conn = db.raw().await;
    let r: Row = diesel::sql_query(format!(
        "SELECT count(DISTINCT message_id) AS distinct,
                coalesce(max(n), 0) AS most
         FROM (SELECT message_id, count(*) AS n FROM \"{}\".applied GROUP BY message_id) t",
        db.schema
    ))
    .get_result(&mut conn)
    .await
    .expect("count applied");
    (r.distinct as usize, r.most)
}

#[actix_rt::test]
#[ignore = "restarts the shared broker: run alone (scripts/test does)"]
async fn outbox_to_inbox_end_to_end_with_a_broker_restart_applies_each_message_once() {
    let db = TestDb::new("e2e").await;
    db.exec("CREATE TABLE {s}.applied (message_id text NOT NULL)")
        .await;
    let broker = TestBroker::new("e2e").await;
    let mut config = db.engine_config();
    config.retry.max_attempts = 50;
    let engine = Engine::start(config).await.unwrap();
    let inbox = courier::inbox::Inbox::new(
        db.store().await,
        db.engine_config().broker,
        courier::inbox::InboxConfig::new("e2e", &broker.queue),
    );
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let handler = std::sync::Arc::new(ApplyOnce {
        schema: db.schema.clone(),
    });
    let consumer = tokio::spawn(async move { inbox.run(handler, stop_rx).await });
    let ids = db.insert_sql(&broker.exchange, 3_000, "routed.{i}").await;
    eventually(60, "the consumer applies some messages", || async {
        (applied_counts(&db).await.0 >= 300).then_some(())
    })
    .await;
    {
        let _guard = BrokerAppGuard;
        assert!(sh("rabbitmqctl", &["-q", "stop_app"]), "stop_app");
    } // start_app
    engine
        .wait_for_all(&ids, WAIT)
        .await
        .expect("every row settles after the restart");
    eventually(180, "every message applied after the restart", || async {
        (applied_counts(&db).await.0 == ids.len()).then_some(())
    })
    .await;
    let (distinct, most) = applied_counts(&db).await;
    assert_eq!(distinct, ids.len());
    assert_eq!(most, 1, "a message was applied more than once");
    let _ = stop.send(());
    let report = within(30, "consumer stops", consumer)
        .await
        .unwrap()
        .unwrap();
    eprintln!("inbox across the restart: {report:?}");
    engine.shutdown().await;
}

#[tokio::test]
#[ignore = "restarts the shared broker: run alone (scripts/test does)"]
async fn per_key_order_holds_through_three_engines_a_broker_restart_and_a_crash() {
    let db = TestDb::new("ordfault").await;
    let broker = TestBroker::new("ordfault").await;
    let keyed = insert_keyed(&db, &broker.exchange, 20, 1_000).await;
    let total = keyed.all.len() as i64;
    let mut env = db.process_env();
    env.push(("COURIER_RETRY_MAX_ATTEMPTS", "50".into()));
    env.push(("COURIER_SCHEDULER_LEASE_DURATION", "3s".into()));
    let mut engines: Vec<EngineProcess> = (0..3)
        .map(|i| EngineProcess::spawn(&format!("ordfault-{i}"), &env))
        .collect();
    eventually(120, "a first part confirmed", || async {
        (db.count(Status::Confirmed).await >= 500).then_some(())
    })
    .await;
    {
        let _guard = BrokerAppGuard;
        assert!(sh("rabbitmqctl", &["-q", "stop_app"]), "stop_app");
        let confirmed = db.count(Status::Confirmed).await;
        assert!(
            confirmed < total,
            "the restart must land mid-stream ({confirmed} of {total} confirmed already)"
        );
    } // start_app
    let before_crash = db.count(Status::Confirmed).await;
    // Half of what is left, at most 500, so the crash below still lands mid-stream: a warm
    // machine drained all but a few hundred rows before the broker came back, and waiting
    // for 500 more timed out with every row confirmed.
    let step = ((total - before_crash) / 2).clamp(1, 500);
    eventually(120, "progress after the restart", || async {
        (db.count(Status::Confirmed).await >= before_crash + step).then_some(())
    })
    .await;
    // One engine dies with keys' heads in flight: the others take them over when the
    // leases expire, heads first.
    let _ = engines[0].child.kill();
    let crashed_at = db.count(Status::Confirmed).await;
    assert!(crashed_at < total, "the crash must land mid-stream");
    eventually(240, "every row confirmed", || async {
        (db.count(Status::Confirmed).await == total).then_some(())
    })
    .await;
    for e in &mut engines[1..] {
        let status = e.terminate(30).await;
        assert!(status.success(), "{}", e.log());
    }
    let (a, received) = audit_received(&db, &broker, &broker.queue, &keyed.all).await;
    assert_eq!(a.confirmed, keyed.all.len());
    assert_first_seen_in_order(&received, &keyed);
    let publishers = db.store().await.publishers_of_confirmed().await.unwrap();
    eprintln!("rows published per engine: {publishers:?}");
    assert!(publishers.len() >= 2, "keys were served by several engines");
}
