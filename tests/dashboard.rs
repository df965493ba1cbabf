//! The dashboard in a real headless Chromium (Debian's `chromium`, driven by
//! playwright-core from npm; `scripts/test` installs both): it shows the engine (in the
//! Engines panel too, as running), says why the oldest row waits (its key behind a dead
//! letter), keeps the rate chart's history across a reload, shows a payload as text and hex,
//! serves its favicon, and a click on "requeue" moves the dead letter back to the outbox,
//! where the engine delivers it (tests/dashboard/click.mjs). Screenshots land in target/tmp,
//! or in `DASHBOARD_SHOTS` (README's are made with `DASHBOARD_SHOTS=docs`).

mod common;

use courier::testing::StoreInternals as _;
use std::{process::Command, time::Duration};

use common::{broker::TestBroker, TestDb};
use courier::{testing::DeadLetterUpdate, Engine, OutboxMessage, Outcome};

#[actix_rt::test]
async fn clicking_requeue_in_chromium_moves_the_row_and_it_is_delivered() {
    let db = TestDb::new("dashboard").await;
    let broker = TestBroker::new("dashboard").await;
    let store = db.store().await;
    // A dead letter that will route once requeued, and a few others to fill the table.
    let msgs: Vec<OutboxMessage> = (0..4)
        .map(|i| OutboxMessage::new(&broker.exchange, format!("routed.{i}"), b"x".to_vec()))
        .collect();
    store.enqueue_many(&msgs).await.unwrap();
    let claimed = store.claim("op", 4, Duration::from_secs(60)).await.unwrap();
    let updates: Vec<DeadLetterUpdate> = claimed
        .iter()
        .map(|m| DeadLetterUpdate {
            id: m.id,
            error: "nacked by broker (attempt 3 of 3)".into(),
        })
        .collect();
    store.move_to_dead_letters("op", &updates).await.unwrap();
    let target = msgs[0].id;
    let viewed = msgs[1].id;
    // A key held behind a dead letter, with the oldest open row: the card must say why.
    db.exec(
        "INSERT INTO {s}.dead_letters (id, attempts, created_at, exchange, routing_key, payload,
                                        headers, last_error, ordering_key)
         VALUES (gen_random_uuid(), 3, now(), 'orders', 'order.paid', 'x', '{}',
                 'returned by broker', 'order-42')",
    )
    .await;
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, payload, ordering_key, created_at)
         VALUES ('orders', 'order.shipped', 'y', 'order-42', now() - interval '1 hour')",
    )
    .await;

    let addr = format!("127.0.0.1:{}", common::proxy::Proxy::free_port());
    let mut config = db.engine_config();
    config.admin.bind = Some(addr.clone());
    config.admin.token = Some("dash-token".into());
    let engine = Engine::start(config).await.unwrap();

    let dir = match std::env::var("DASHBOARD_SHOTS") {
        Ok(d) => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(d),
        Err(_) => std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")),
    };
    let shot = dir.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard/click.mjs");
    let url = format!("http://{addr}/");
    let shots_arg = dir.to_string_lossy().to_string();
    let engine_id = engine.engine_id().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .args([
                url.as_str(),
                "dash-token",
                &target.to_string(),
                &shots_arg,
                &engine_id,
                &viewed.to_string(),
            ])
            .output()
    })
    .await
    .unwrap()
    .expect("node on PATH");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "dashboard click failed (npm install in tests/dashboard; apt-get install chromium):\n{log}"
    );
    assert!(shot.exists(), "no screenshot taken");

    // The click moved the row; the engine delivers it.
    assert_eq!(
        engine
            .wait_for(target, Duration::from_secs(30))
            .await
            .unwrap(),
        Outcome::Confirmed
    );
    let got = broker.take(&broker.queue, 1, 10).await;
    assert_eq!(got[0].id, target);
    assert_eq!(store.stats().await.unwrap().dead_letters, 4);
    engine.shutdown().await;
}
