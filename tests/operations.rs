//! Operating Courier: the dead-letter CLI, the admin HTTP API, metrics, retention,
//! `status --json`, and trace context propagation — against the real services.

mod common;

use courier::testing::StoreInternals as _;
use std::{process::Command, time::Duration};

use common::{broker::TestBroker, http, TestDb};
use courier::{
    config::RetentionMode,
    testing::{DeadLetterUpdate, MessageState},
    Engine, OutboxMessage, Outcome, Status,
};
use lapin::types::AMQPValue;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

/// Puts `n` messages straight into `dead_letters` (claim, then move).
async fn dead_letters(db: &TestDb, n: usize) -> Vec<Uuid> {
    let store = db.store().await;
    let msgs: Vec<OutboxMessage> = (0..n)
        .map(|i| {
            OutboxMessage::new(
                "ex.dead",
                format!("rk.{i}"),
                format!("body {i}").into_bytes(),
            )
        })
        .collect();
    store.enqueue_many(&msgs).await.unwrap();
    let claimed = store.claim("op", n as u32, WAIT).await.unwrap();
    let updates: Vec<DeadLetterUpdate> = claimed
        .iter()
        .map(|m| DeadLetterUpdate {
            id: m.id,
            error: "returned by broker (unroutable): 312 NO_ROUTE".into(),
        })
        .collect();
    store.move_to_dead_letters("op", &updates).await.unwrap()
}

/// Dead letters made by a running engine: rows for a missing exchange, one attempt each.
async fn dead_letters_via(engine: &courier::EngineHandle, n: usize) -> Vec<Uuid> {
    let msgs: Vec<OutboxMessage> = (0..n)
        .map(|i| {
            OutboxMessage::new("ex.dead", format!("rk.{i}"), b"x".to_vec()).with_max_attempts(1)
        })
        .collect();
    engine.store().enqueue_many(&msgs).await.unwrap();
    let ids: Vec<Uuid> = msgs.iter().map(|m| m.id).collect();
    let outcomes = engine.wait_for_all(&ids, WAIT).await.unwrap();
    assert!(outcomes
        .values()
        .all(|o| matches!(o, Outcome::DeadLettered(_))));
    ids
}

fn courier(db: &TestDb, args: &[&str]) -> (i32, String) {
    let out = common::courier_command()
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("COURIER_DATABASE_URL", common::database_url())
        .env("COURIER_DATABASE_SCHEMA", &db.schema)
        .output()
        .expect("run courier");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn dead_letter_cli_lists_shows_requeues_and_discards() {
    let db = TestDb::new("dlcli").await;
    let ids = dead_letters(&db, 3).await;
    let (code, out) = courier(
        &db,
        &["dead-letters", "list", "--limit", "10", "--since", "1h"],
    );
    assert_eq!(code, 0, "{out}");
    assert!(ids.iter().all(|id| out.contains(&id.to_string())), "{out}");
    assert!(
        out.contains("312 NO_ROUTE") && out.contains("(3 dead letter(s))"),
        "{out}"
    );

    let (code, out) = courier(&db, &["dead-letters", "show", &ids[0].to_string()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("payload (text") && out.contains("body "),
        "{out}"
    );

    let (code, out) = courier(&db, &["dead-letters", "requeue", &ids[0].to_string()]);
    assert_eq!(code, 0, "{out}");
    let store = db.store().await;
    assert_eq!(
        store.message_state(ids[0]).await.unwrap(),
        Some(MessageState::Outbox(
            Status::Pending,
            Some("returned by broker (unroutable): 312 NO_ROUTE".into())
        ))
    );

    let unknown = Uuid::new_v4();
    let (code, out) = courier(&db, &["dead-letters", "requeue", &unknown.to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("no dead letter with id {unknown}")),
        "{out}"
    );
    let (code, out) = courier(&db, &["dead-letters", "show", "not-a-uuid"]);
    assert_eq!(code, 2, "bad usage: {out}");
    // --exchange filters --all; beside ids it would read as a redirect, and is refused.
    let (code, out) = courier(
        &db,
        &[
            "dead-letters",
            "requeue",
            &ids[1].to_string(),
            "--exchange",
            "x",
        ],
    );
    assert_eq!(code, 2, "bad usage: {out}");
    assert!(out.contains("--exchange only filters --all"), "{out}");
    let (code, out) = courier(&db, &["dead-letters", "discard", &ids[1].to_string()]);
    assert_eq!(code, 0, "{out}");
    assert!(store.message_state(ids[1]).await.unwrap().is_none());
    // A dead letter whose id a producer reused is kept, and the command says why.
    db.exec(&format!(
        "INSERT INTO {{s}}.outbox (id, exchange, routing_key) VALUES ('{}', 'ex.dead', 'again')",
        ids[2]
    ))
    .await;
    let (code, out) = courier(&db, &["dead-letters", "requeue", &ids[2].to_string()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("a producer reused the id"), "{out}");
    // Beside an unknown id, both are named.
    let (code, out) = courier(
        &db,
        &[
            "dead-letters",
            "requeue",
            &ids[2].to_string(),
            &unknown.to_string(),
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("a producer reused the id")
            && out.contains(&format!("no dead letter with id {unknown}")),
        "{out}"
    );
    let (code, out) = courier(&db, &["dead-letters", "requeue", "--all"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("left 1") && out.contains(&ids[2].to_string()),
        "{out}"
    );

    let (code, out) = courier(&db, &["dead-letters", "discard", "--older-than", "0s"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("discarded 1"), "{out}"); // ids[2], still a dead letter
    assert_eq!(store.stats().await.unwrap().dead_letters, 0);
}

#[tokio::test]
async fn two_operators_requeueing_at_once_move_each_row_once() {
    let db = TestDb::new("dlrace").await;
    let ids = dead_letters(&db, 50).await;
    let env = |c: &mut Command| {
        c.env("COURIER_DATABASE_URL", common::database_url())
            .env("COURIER_DATABASE_SCHEMA", &db.schema)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
    };
    let mut a = common::courier_command();
    env(a.args(["dead-letters", "requeue", "--all"]));
    let mut b = common::courier_command();
    env(b.args(["dead-letters", "requeue", "--all"]));
    let (a, b) = (a.spawn().unwrap(), b.spawn().unwrap());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success() && b.status.success());
    let stats = db.store().await.stats().await.unwrap();
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(
        stats.count(Status::Pending),
        ids.len() as i64,
        "each row exactly once in the outbox"
    );
}

#[tokio::test]
async fn status_json_is_machine_readable() {
    let db = TestDb::new("statusjson").await;
    dead_letters(&db, 2).await;
    let (code, out) = courier(&db, &["status", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["dead_letters"], 2);
    assert_eq!(v["outbox"]["pending"], 0);
}

#[actix_rt::test]
async fn retention_deletes_or_archives_old_confirmed_rows_only() {
    for mode in [RetentionMode::Delete, RetentionMode::Archive] {
        let db = TestDb::new("retention").await;
        let broker = TestBroker::new("retention").await;
        let mut config = db.engine_config();
        config.retention.confirmed = Duration::from_millis(1);
        config.retention.batch_size = 7;
        config.retention.mode = mode;
        let engine = Engine::start(config).await.unwrap();
        let ids = db.insert_sql(&broker.exchange, 50, "routed.{i}").await;
        engine.wait_for_all(&ids, WAIT).await.unwrap();
        let dead = dead_letters_via(&engine, 2).await;
        // Two rows another table references by foreign key: they stay, the rest go.
        db.exec("CREATE TABLE {s}.orders (event uuid REFERENCES {s}.outbox (id))")
            .await;
        db.exec(&format!(
            "INSERT INTO {{s}}.orders VALUES ('{}'), ('{}')",
            ids[3], ids[20]
        ))
        .await;
        let removed = engine.run_retention().await.unwrap();
        assert_eq!(removed, 48, "{mode:?}");
        let stats = db.store().await.stats().await.unwrap();
        assert_eq!(stats.count(Status::Confirmed), 2);
        let again = engine.run_retention().await;
        assert_eq!(
            again.ok(),
            Some(0),
            "the referenced rows are left out, not retried"
        );
        db.exec("DROP TABLE {s}.orders").await;
        assert_eq!(
            stats.dead_letters,
            dead.len() as i64,
            "dead letters are kept until discarded"
        );
        if mode == RetentionMode::Archive {
            let mut conn = db.raw().await;
            #[derive(diesel::QueryableByName)]
            struct N {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            use diesel_async::RunQueryDsl;
            let n: N = diesel::sql_query(format!(
                "SELECT count(*) AS n FROM \"{}\".outbox_archive",
                db.schema
            ))
            .get_result(&mut conn)
            .await
            .unwrap();
            assert_eq!(n.n, 48);
        }
        engine.shutdown().await;
    }
}

#[actix_rt::test]
async fn traceparent_on_the_row_reaches_the_consumer() {
    let db = TestDb::new("trace").await;
    let broker = TestBroker::new("trace").await;
    let engine = Engine::start(db.engine_config()).await.unwrap();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let m = OutboxMessage::new(&broker.exchange, "routed.t", b"x".to_vec())
        .with_header("traceparent", tp);
    engine.store().enqueue(&m).await.unwrap();
    assert_eq!(
        engine.wait_for(m.id, WAIT).await.unwrap(),
        Outcome::Confirmed
    );
    let got = broker.take(&broker.queue, 1, 10).await;
    let h = got[0]
        .properties
        .headers()
        .as_ref()
        .expect("headers")
        .inner();
    assert_eq!(
        h.get("traceparent"),
        Some(&AMQPValue::LongString(tp.into()))
    );
    engine.shutdown().await;
}

/// A minimal HTTP/1.1 client for the admin API (one request per connection).
fn free_addr() -> String {
    format!("127.0.0.1:{}", common::proxy::Proxy::free_port())
}

#[actix_rt::test]
async fn admin_api_serves_health_metrics_and_guarded_dead_letter_actions() {
    let db = TestDb::new("admin").await;
    let broker = TestBroker::new("admin").await;
    let addr = free_addr();
    let mut config = db.engine_config();
    config.admin.bind = Some(addr.clone());
    config.admin.token = Some("t0ken".into());
    let engine = Engine::start(config).await.unwrap();
    let ids = db.insert_sql(&broker.exchange, 5, "routed.{i}").await;
    engine.wait_for_all(&ids, WAIT).await.unwrap();
    let dead = dead_letters_via(&engine, 2).await;

    assert_eq!(http(&addr, "GET", "/health", None).await.0, 200);
    let (code, body) = http(&addr, "GET", "/ready", None).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = http(&addr, "GET", "/metrics", None).await;
    assert_eq!(code, 200);
    // An exchange earns its own label with its first confirm (publishes before it count
    // under `_other`), so producers cannot grow the label set with made-up names.
    assert!(
        body.contains(&format!(
            "courier_confirmed_total{{exchange=\"{}\"}} 5",
            broker.exchange
        )),
        "{body}"
    );
    assert!(
        body.contains("courier_published_total{exchange=\"_other\"}"),
        "{body}"
    );
    assert!(
        body.contains("courier_outbox_rows{status=\"confirmed\"} 5"),
        "{body}"
    );
    assert!(
        body.contains("courier_commit_to_confirm_seconds_bucket"),
        "{body}"
    );
    let (code, body) = http(&addr, "GET", "/api/stats", None).await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["outbox"]["confirmed"], 5);
    let (code, body) = http(&addr, "GET", "/api/dead-letters?limit=10", None).await;
    assert_eq!(code, 200);
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(list.len(), 2);
    let (code, body) = http(&addr, "GET", "/api/openapi.json", None).await;
    assert_eq!(code, 200);
    assert!(serde_json::from_str::<serde_json::Value>(&body).is_ok());

    let path = format!("/api/dead-letters/{}/requeue", dead[0]);
    assert_eq!(http(&addr, "POST", &path, None).await.0, 401);
    assert_eq!(http(&addr, "POST", &path, Some("wrong")).await.0, 401);
    let (code, body) = http(&addr, "POST", &path, Some("t0ken")).await;
    assert_eq!(code, 200, "{body}");
    // Requeued, published again, dead-lettered again (the exchange still does not exist).
    match engine.wait_for(dead[0], WAIT).await.unwrap() {
        Outcome::DeadLettered(why) => assert!(why.contains("does not exist"), "{why}"),
        other => panic!("{other:?}"),
    }
    let (code, body) = http(
        &addr,
        "POST",
        &format!("/api/dead-letters/{}/requeue", Uuid::new_v4()),
        Some("t0ken"),
    )
    .await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("\"error\""));
    let (code, body) = http(
        &addr,
        "DELETE",
        "/api/dead-letters/not-a-uuid",
        Some("t0ken"),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("not a message id"));
    let (code, _) = http(&addr, "GET", "/api/dead-letters?limit=abc", None).await;
    assert_eq!(code, 400);
    let (code, _) = http(
        &addr,
        "DELETE",
        &format!("/api/dead-letters/{}", dead[1]),
        Some("t0ken"),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(http(&addr, "GET", "/nope", None).await.0, 404);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn without_a_token_mutations_are_disabled_not_open() {
    let db = TestDb::new("admin_off").await;
    let addr = free_addr();
    let mut config = db.engine_config();
    config.admin.bind = Some(addr.clone());
    let engine = Engine::start(config).await.unwrap();
    let dead = dead_letters_via(&engine, 1).await;
    let (code, body) = http(
        &addr,
        "POST",
        &format!("/api/dead-letters/{}/requeue", dead[0]),
        Some("anything"),
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("disabled"));
    assert_eq!(db.store().await.stats().await.unwrap().dead_letters, 1);
    engine.shutdown().await;
}
