//! `courier run` as a process: migrates a fresh schema, publishes, logs without secrets,
//! answers `courier status`, and exits 0 on SIGTERM.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::{broker::TestBroker, eventually, TestDbGuard};
use courier::{state::Status, store::Store};

#[tokio::test]
async fn run_publishes_until_sigterm_then_exits_zero() {
    let schema = common::unique_name("standalone");
    let _guard = TestDbGuard(schema.clone());
    let broker = TestBroker::new("standalone").await;
    let env = [
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", schema.clone()),
        ("COURIER_BROKER_URL", common::broker_url()),
        ("COURIER_LOGGING_LEVEL", "courier=debug".into()),
        ("COURIER_LOGGING_SUMMARY_INTERVAL", "200ms".into()),
        ("COURIER_SCHEDULER_SWEEP_INTERVAL", "100ms".into()),
    ];
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("run")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn courier run");
    // Collect the log as it is written, so the test can wait for a line.
    let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let logs = logs.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut l = logs.lock().expect("log lock");
                l.push_str(&line);
                l.push('\n');
            }
        })
    };
    let logged = |needle: &'static str| {
        let logs = logs.clone();
        move || {
            let found = logs.lock().expect("log lock").contains(needle);
            async move { found.then_some(()) }
        }
    };

    // `run` migrates the fresh schema; wait until every migration is in, then enqueue.
    let store: Store = common::migrated_by_process(&schema, 30).await;
    let messages: Vec<courier::OutboxMessage> = (0..100)
        .map(|i| {
            courier::OutboxMessage::new(&broker.exchange, format!("routed.{i}"), b"x".to_vec())
        })
        .collect();
    store.enqueue_many(&messages).await.unwrap();
    eventually(60, "100 rows confirmed by the process", || {
        let store = store.clone();
        async move {
            let s = store.stats().await.ok()?;
            (s.count(Status::Confirmed) == 100).then_some(())
        }
    })
    .await;

    let status = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("status")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let status_text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status.status.success());
    assert!(
        status_text
            .lines()
            .any(|l| l.starts_with("confirmed") && l.trim_end().ends_with(" 100")),
        "{status_text}"
    );

    eventually(10, "a summary line", logged("summary")).await;
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let exit = common::within(30, "exit after SIGTERM", async {
        loop {
            if let Some(code) = child.try_wait().unwrap() {
                return code;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    reader.join().expect("log reader");
    let logs = logs.lock().expect("log lock").clone();
    assert!(exit.success(), "exit {exit:?}\n{logs}");
    assert!(
        logs.contains("guest:***@"),
        "redacted broker url logged:\n{logs}"
    );
    assert!(!logs.contains("guest:guest"), "password leaked:\n{logs}");
    assert!(logs.contains("summary"), "periodic summary:\n{logs}");
    assert!(
        logs.contains("confirmed") && logs.contains("message_id"),
        "per-message debug lines:\n{logs}"
    );
}
