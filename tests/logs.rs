//! What `courier` writes where nobody should read secrets or personal data: the log of a
//! `courier run` process (stderr to a file, not a terminal), its errors and `courier status`.
//! No payload bytes, no ERROR for an expected outcome, no colour codes, no credentials.

mod common;

use std::process::Output;

use courier::testing::StoreInternals as _;

use common::{broker::TestBroker, eventually, unique_name, EngineProcess, TestDb};

/// `marker` as the log would show it when a payload is dumped as bytes (`[80, 73, ...]`).
fn as_byte_list(marker: &str) -> String {
    marker
        .bytes()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test]
async fn returned_rows_and_missing_exchanges_log_no_payload_no_error_and_no_colour() {
    let db = TestDb::new("logsret").await;
    let broker = TestBroker::new("logsret").await;
    let marker = format!("PII-{}", unique_name("marker"));
    let missing = unique_name("missing");
    // Unroutable (the exchange exists, nothing is bound for `unrouted.*`) and returned,
    // and addressed to an exchange that does not exist: both end as dead letters.
    db.exec(&format!(
        "INSERT INTO {{s}}.outbox (exchange, routing_key, payload)
         SELECT '{ex}', 'unrouted.' || i, convert_to('{marker}-' || i, 'UTF8')
         FROM generate_series(1, 3) AS i;
         INSERT INTO {{s}}.outbox (exchange, routing_key, payload)
         SELECT '{missing}', 'k', convert_to('{marker}-m' || i, 'UTF8')
         FROM generate_series(1, 2) AS i;
         INSERT INTO {{s}}.outbox (exchange, routing_key, payload)
         VALUES (E'{missing}\\n2030-01-01T00:00:00Z ERROR forged line \\x1b[31mred', 'k', 'x')",
        ex = broker.exchange,
    ))
    .await;
    // That last exchange name tries to start a log line of its own and to colour the
    // terminal: the checks below (no ERROR line, no colour code) catch either.
    let mut env = db.process_env();
    // Debug is the most a configured level shows: what holds there holds at info.
    env.retain(|(k, _)| *k != "COURIER_LOGGING_LEVEL");
    env.push(("COURIER_LOGGING_LEVEL", "debug".into()));
    env.push(("COURIER_RETRY_MAX_ATTEMPTS", "2".into()));
    let mut engine = EngineProcess::spawn("logsret", &env);
    let store = db.store().await;
    eventually(60, "the six rows dead-lettered", || async {
        let stats = store.stats().await.ok()?;
        (stats.dead_letters == 6).then_some(())
    })
    .await;
    assert!(engine.terminate(30).await.success());
    let log = engine.log();
    assert!(log.contains("courier starting"), "no log captured:\n{log}");
    assert!(
        !log.contains(&marker) && !log.contains(&as_byte_list(&marker)),
        "payload bytes in the log:\n{log}"
    );
    // A line's level is its second word (after the timestamp); producer text quoted later
    // in a line may say anything.
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("ERROR"))
        .collect();
    assert!(errors.is_empty(), "ERROR lines: {errors:#?}");
    assert!(!log.contains("\x1b["), "colour codes in a log file:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("2030-01-01")),
        "a producer's exchange name started a log line:\n{log}"
    );
    assert!(
        log.contains("forged line"),
        "the escaped name is not in the log:\n{log}"
    );
}

fn courier(args: &[&str], env: &[(&str, String)]) -> Output {
    common::courier_command()
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run courier")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `url` with `params` added to its query string.
fn with_query(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

#[tokio::test]
async fn credentials_in_query_parameters_reach_no_log_error_or_status_output() {
    let db = TestDb::new("logssecret").await;
    let pg_secret = format!("PGSECRET{}", unique_name("pw"));
    let amqp_secret = format!("AMQPSECRET{}", unique_name("pw"));
    let secrets = [pg_secret.as_str(), amqp_secret.as_str()];
    let leaks = |t: &str| secrets.iter().any(|s| t.contains(s));
    // PostgreSQL trusts local connections here, so a password given as a parameter is
    // accepted and unused.
    let database = with_query(&common::database_url(), &format!("password={pg_secret}"));
    let mut env = db.process_env();
    env.retain(|(k, _)| *k != "COURIER_DATABASE_URL");
    env.push(("COURIER_DATABASE_URL", database.clone()));

    // RabbitMQ's URI spec has a `password` parameter (a key file's passphrase) that Courier
    // does not read: refused at start (exit 2), naming it, the secret redacted.
    let broker = with_query(&common::broker_url(), &format!("password={amqp_secret}"));
    let mut with_broker_secret = env.clone();
    with_broker_secret.retain(|(k, _)| *k != "COURIER_BROKER_URL");
    with_broker_secret.push(("COURIER_BROKER_URL", broker));
    let o = courier(&["status"], &with_broker_secret);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("broker.url") && text(&o).contains("`password`"),
        "{}",
        text(&o)
    );
    assert!(!leaks(&text(&o)), "{}", text(&o));

    // `run`: the URLs are logged at start and on connecting.
    let mut engine = EngineProcess::spawn("logssecret", &env);
    let log = eventually(60, "the engine connected to RabbitMQ", || {
        let log = engine.log();
        async move { log.contains("connected to RabbitMQ").then_some(log) }
    })
    .await;
    assert!(engine.terminate(30).await.success());
    let log = format!("{log}{}", engine.log());
    assert!(log.contains("password=***"), "the URL is logged:\n{log}");
    assert!(!leaks(&log), "a credential in the log:\n{log}");

    // `status`, working.
    let o = courier(&["status"], &env);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!leaks(&text(&o)), "{}", text(&o));

    // `status` against an unreachable database: the error names the host, not the secrets.
    let unreachable =
        format!("postgres://bob:{pg_secret}@127.0.0.1:1/nowhere?password={pg_secret}");
    let mut bad = env.clone();
    bad.push(("COURIER_DATABASE_URL", unreachable));
    bad.push(("COURIER_DATABASE_CONNECT_TIMEOUT", "2s".into()));
    bad.push(("COURIER_DATABASE_WAIT_AT_START", "false".into()));
    let o = courier(&["status"], &bad);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("127.0.0.1:1"), "{}", text(&o));
    assert!(!leaks(&text(&o)), "{}", text(&o));

    // A parameter the driver rejects (`sslpassword`, libpq-only), from a config file: a
    // configuration error (exit 2) naming the key, the secret redacted.
    let dir = std::env::temp_dir().join(unique_name("logscfg"));
    std::fs::create_dir_all(&dir).expect("config dir");
    let file = dir.join("courier.yaml");
    let rejected = with_query(&database, &format!("sslpassword={amqp_secret}"));
    std::fs::write(&file, format!("database:\n  url: \"{rejected}\"\n")).expect("config");
    let mut from_file: Vec<(&str, String)> = env
        .iter()
        .filter(|(k, _)| *k != "COURIER_DATABASE_URL")
        .cloned()
        .collect();
    from_file.push(("COURIER_DATABASE_CONNECT_TIMEOUT", "2s".into()));
    let path = file.to_str().expect("path");
    let o = courier(&["--config", path, "status"], &from_file);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("database.url") && text(&o).contains("sslpassword"),
        "{}",
        text(&o)
    );
    assert!(!leaks(&text(&o)), "{}", text(&o));

    // A bad scheme is a configuration error (exit 2) that quotes the URL, redacted.
    std::fs::write(
        &file,
        format!("database:\n  url: \"mysql://h/db?password={pg_secret}\"\n"),
    )
    .expect("config");
    let o = courier(&["--config", path, "status"], &from_file);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("database.url"), "{}", text(&o));
    assert!(!leaks(&text(&o)), "{}", text(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn status_watch_into_a_pipe_writes_no_escape_codes() {
    let db = TestDb::new("logswatch").await;
    let mut child = common::courier_command()
        .args(["status", "--watch"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(db.process_env().iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn courier status --watch");
    let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let out = out.clone();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let mut o = out.lock().expect("output lock");
                o.push_str(&line);
                o.push('\n');
            }
        })
    };
    let text = eventually(30, "a refresh of `status --watch`", || {
        let o = out.lock().expect("output lock").clone();
        async move { o.contains("oldest undelivered").then_some(o) }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    assert!(text.contains("pending"), "{text}");
    assert!(!text.contains('\x1b'), "escape codes into a pipe: {text:?}");
}

/// The reader of the engine's stderr goes away (`courier run 2>&1 | head -1`, a log shipper
/// that died): the engine goes on without its log and still stops cleanly, leaving the
/// registry. Reporting the failed write used to panic on the same broken pipe (exit 101).
#[actix_rt::test]
async fn a_closed_stderr_pipe_does_not_kill_the_engine() {
    let db = TestDb::new("logspipe").await;
    let broker = TestBroker::new("logspipe").await;
    let mut child = common::courier_command()
        .arg("run")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(db.process_env().iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn courier run");
    drop(child.stderr.take()); // the reader is gone before the first line
    let store = db.store().await;
    eventually(60, "the engine registered", || async {
        let engines = store
            .engines(std::time::Duration::from_secs(5))
            .await
            .ok()?;
        (!engines.is_empty()).then_some(())
    })
    .await;
    // Its heartbeat and summaries keep logging into the closed pipe meanwhile.
    let ids = db.insert_sql(&broker.exchange, 50, "routed.{i}").await;
    eventually(60, "the rows settled", || async {
        let stats = store.stats().await.ok()?;
        (stats.count(courier::Status::Confirmed) == ids.len() as i64).then_some(())
    })
    .await;
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success()),
        "kill"
    );
    let status = common::within(30, "engine exit", async {
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        store
            .engines(std::time::Duration::from_secs(5))
            .await
            .expect("engines")
            .is_empty(),
        "the registry row stayed"
    );
}
