//! `courier run` as a process: migrates a fresh schema, publishes, logs without secrets,
//! answers `courier status`, and exits 0 on SIGTERM.

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::{broker::TestBroker, eventually, TestDbGuard};
use courier::{Status, Store};

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
    let mut child = common::courier_command()
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

    let status = common::courier_command()
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

/// `courier run` against the main broker with `url`; its exit status (bounded) and log.
async fn run_with_broker(
    name: &str,
    url: &str,
) -> (Option<std::process::ExitStatus>, common::EngineProcess) {
    let schema = common::unique_name(name);
    let _guard = TestDbGuard(schema.clone());
    let env = [
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", schema),
        ("COURIER_BROKER_URL", url.to_string()),
        ("COURIER_BROKER_CONNECT_TIMEOUT", "2s".into()),
    ];
    let mut process = common::EngineProcess::spawn(name, &env);
    let status = eventually(30, "courier run to exit or say it keeps trying", || {
        let exited = process.child.try_wait().expect("try_wait");
        let log = process.log();
        async move {
            match exited {
                Some(status) => Some(Some(status)),
                None if log.contains("not reachable yet") => Some(None),
                None => None,
            }
        }
    })
    .await;
    (status, process)
}

#[tokio::test]
async fn a_broker_that_refuses_login_or_vhost_fails_the_start_with_the_cause() {
    // Wrong password: exit 1 naming the authentication failure, never the password.
    let (status, process) =
        run_with_broker("badlogin", "amqp://guest:not-the-pw@127.0.0.1:5672/%2f").await;
    let log = process.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("ACCESS_REFUSED") && log.contains("Login was refused"),
        "{log}"
    );
    assert!(!log.contains("not-the-pw"), "{log}");

    // A vhost that does not exist: exit 1 naming it.
    let (status, process) = run_with_broker(
        "badvhost",
        "amqp://guest:guest@127.0.0.1:5672/no-such-vhost",
    )
    .await;
    let log = process.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("no-such-vhost") && log.contains("NOT_ALLOWED"),
        "{log}"
    );

    // A list: every node's failure is named, every password redacted (the second one too).
    let list =
        "amqp://guest:first-secret@127.0.0.1:1/%2f,amqp://guest:second-secret@127.0.0.1:5672/%2f";
    let (status, process) = run_with_broker("badlist", list).await;
    let log = process.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("127.0.0.1:1") && log.contains("ACCESS_REFUSED"),
        "{log}"
    );
    assert!(
        !log.contains("first-secret") && !log.contains("second-secret"),
        "{log}"
    );

    // amqps:// to the plain AMQP port: exit 1 saying TLS got no TLS answer, and where TLS is.
    let (status, process) =
        run_with_broker("tlsplain", "amqps://guest:guest@127.0.0.1:5672/%2f").await;
    let log = process.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("did not answer TLS") && log.contains("5671"),
        "{log}"
    );
}

#[tokio::test]
async fn a_broker_that_is_down_at_start_is_retried_not_fatal() {
    let (status, mut process) =
        run_with_broker("brokerdown", "amqp://guest:guest@127.0.0.1:1/%2f").await;
    assert!(status.is_none(), "courier run exited: {}", process.log());
    let _ = process.child.kill();
}
