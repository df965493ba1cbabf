//! Fuzzes the admin API from its own OpenAPI document with schemathesis (from PyPI;
//! `scripts/test` installs it): no input may make it answer 500, and no row may be lost.

mod common;

use courier::testing::StoreInternals as _;
use std::{process::Command, time::Duration};

use common::TestDb;
use courier::{testing::DeadLetterUpdate, Engine, OutboxMessage};

#[actix_rt::test]
async fn schemathesis_finds_no_server_error_and_no_row_is_lost() {
    let db = TestDb::new("fuzz").await;
    let store = db.store().await;
    // Some dead letters and pending rows for the fuzzer to poke at.
    let msgs: Vec<OutboxMessage> = (0..5)
        .map(|i| OutboxMessage::new("ex.fuzz", format!("k{i}"), b"x".to_vec()))
        .collect();
    store.enqueue_many(&msgs).await.unwrap();
    let claimed = store.claim("op", 5, Duration::from_secs(60)).await.unwrap();
    let updates: Vec<DeadLetterUpdate> = claimed
        .iter()
        .map(|m| DeadLetterUpdate {
            id: m.id,
            error: "fuzz fixture".into(),
        })
        .collect();
    store.move_to_dead_letters("op", &updates).await.unwrap();

    let addr = format!("127.0.0.1:{}", common::proxy::Proxy::free_port());
    let mut config = db.engine_config();
    config.admin.bind = Some(addr.clone());
    config.admin.token = Some("fuzz-token".into());
    let engine = Engine::start(config).await.unwrap();
    // Fuzz a ready engine: /ready answers 503 (by design) while the broker is not connected.
    // The publisher may have connected while Engine::start was opening the admin pools,
    // before anyone could subscribe: the state says so where the event was missed.
    let mut events = engine.subscribe();
    let connected = || engine.broker_state() == courier::BrokerState::Connected;
    common::within(10, "broker connected", async {
        while !connected() {
            let _ = tokio::time::timeout(Duration::from_millis(100), events.recv()).await;
        }
    })
    .await;

    // Pass 1, with the token: random inputs (random ids never name a real row, so every
    // mutation must be refused with a 4xx). Pass 2, every phase including the stateful one
    // (which lists real ids and replays them), without the token: nothing may change.
    let url = format!("http://{addr}/api/openapi.json");
    let report_dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(common::unique_name("har"));
    for (phases, auth) in [
        (
            "examples,coverage,fuzzing",
            "Authorization: Bearer fuzz-token",
        ),
        (
            "examples,coverage,fuzzing,stateful",
            "Authorization: Bearer wrong",
        ),
    ] {
        let url = url.clone();
        let report_dir = report_dir.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new("schemathesis")
                .args([
                    "run",
                    &url,
                    "--checks",
                    "not_a_server_error",
                    "--max-examples",
                    "25",
                ])
                .args([
                    "--phases",
                    phases,
                    "-H",
                    auth,
                    "--report",
                    "har",
                    "--report-dir",
                ])
                .arg(&report_dir)
                .env("NO_COLOR", "1")
                .output()
        })
        .await
        .unwrap()
        .expect("schemathesis on PATH (pip install schemathesis; scripts/test does)");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "schemathesis ({phases}) found problems:\n{report}"
        );
    }

    // No loss: every row is still in the outbox or dead_letters, unless the fuzzer
    // discarded it on purpose (an authorized DELETE answered 200, read from its HAR log).
    let discarded = discarded_ids(&report_dir);
    eprintln!(
        "fuzzer discarded {} dead letter(s) with the token",
        discarded.len()
    );
    for m in &msgs {
        let present = store.message_state(m.id).await.unwrap().is_some();
        assert!(
            present || discarded.contains(&m.id.to_string()),
            "row {} lost while fuzzing",
            m.id
        );
    }
    engine.shutdown().await;
}

/// Ids of dead letters the fuzzer discarded with a 200, from its HAR reports.
fn discarded_ids(dir: &std::path::Path) -> std::collections::HashSet<String> {
    let mut ids = std::collections::HashSet::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(har) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        for e in har["log"]["entries"].as_array().into_iter().flatten() {
            let ok = e["response"]["status"] == 200;
            let url = e["request"]["url"].as_str().unwrap_or("");
            if ok && e["request"]["method"] == "DELETE" {
                if let Some(id) = url.rsplit('/').next() {
                    ids.insert(id.to_string());
                }
            }
        }
    }
    ids
}
