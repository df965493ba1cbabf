//! `courier doctor` against a good setup and against each kind of broken one: every check
//! says ok on the first; on the others the failing check names the fault and its fix, and
//! the exit code is 1.

mod common;

use std::process::Output;

use common::{broker::TestBroker, user::TestUser, TestDb};
use lapin::ExchangeKind;

/// `courier doctor` with `env` (the repository's config.yaml under it).
async fn doctor(args: &[&str], env: Vec<(&'static str, String)>) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        common::courier_command()
            .arg("doctor")
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("run courier doctor")
    })
    .await
    .expect("doctor thread")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The report line of `check` (its verdict and detail), and its fix line if any.
fn line(report: &str, check: &str) -> String {
    let mut lines = report.lines();
    let mut found = String::new();
    while let Some(l) = lines.next() {
        if l.split_whitespace().nth(1) == Some(check) {
            found = l.to_string();
            if let Some(next) = lines.clone().next() {
                if next.trim_start().starts_with("fix:") {
                    found = format!("{found}\n{next}");
                }
            }
            break;
        }
    }
    assert!(!found.is_empty(), "no `{check}` line in:\n{report}");
    found
}

/// A free local address for the admin API.
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").to_string()
}

fn env_for(db: &TestDb, broker: &TestBroker) -> Vec<(&'static str, String)> {
    let mut env = db.process_env();
    env.push(("COURIER_DEAD_LETTER_EXCHANGE", broker.exchange.clone()));
    env.push(("COURIER_ADMIN_BIND", free_address()));
    env
}

#[actix_rt::test]
async fn a_good_setup_passes_every_check() {
    let db = TestDb::new("doctorok").await;
    let broker = TestBroker::new("doctorok").await;
    db.insert_sql(&broker.exchange, 3, "routed.{i}").await;
    let o = doctor(&[], env_for(&db, &broker)).await;
    let report = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{report}");
    for check in [
        "config",
        "database",
        "schema",
        "notify",
        "broker",
        "exchanges",
    ] {
        assert!(line(&report, check).starts_with("ok "), "{report}");
    }
    assert!(
        line(&report, "database").contains(", the server at "),
        "which host answered: {report}"
    );
    assert!(
        line(&report, "exchanges").contains("(3 open rows)"),
        "{report}"
    );
    assert!(
        line(&report, "exchanges").contains("(dead_letter.exchange)"),
        "{report}"
    );
    assert!(line(&report, "permissions").starts_with("ok "), "{report}");
    assert!(line(&report, "admin").starts_with("ok "), "{report}");
    // The probe publishes inside a rolled-back transaction: nothing reached the queue.
    assert_eq!(broker.depth(&broker.queue).await, 0);

    let o = doctor(&["--json"], env_for(&db, &broker)).await;
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("doctor --json");
    assert_eq!(json["ok"], true, "{json}");
    assert_eq!(json["checks"].as_array().map(Vec::len), Some(8), "{json}");

    // Run beside an engine serving the admin API (an alert fired): its address is taken by
    // that engine, which is no fault.
    let env = env_for(&db, &broker);
    let mut config = db.engine_config();
    config.admin.bind = env
        .iter()
        .find(|(k, _)| *k == "COURIER_ADMIN_BIND")
        .map(|(_, v)| v.clone());
    let engine = courier::Engine::start(config).await.expect("engine starts");
    let o = doctor(&[], env).await;
    let report = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{report}");
    assert!(
        line(&report, "admin").contains("served by a running Courier engine"),
        "{report}"
    );
    engine.shutdown().await;
}

#[actix_rt::test]
async fn missing_exchanges_refused_publishes_and_a_taken_admin_port_each_fail_with_their_fix() {
    let db = TestDb::new("doctorbad").await;
    let mut broker = TestBroker::new("doctorbad").await;
    let denied = broker.extra_exchange("denied", ExchangeKind::Topic).await;
    let missing = format!("{}.missing", broker.exchange);
    db.insert_sql(&missing, 2, "k").await;
    db.insert_sql(&denied, 1, "k").await;
    // An internal exchange: no permission lets a client publish to it.
    let internal = broker.internal_exchange().await;
    db.insert_sql(&internal, 1, "k").await;
    let user = TestUser::without_write_on_denied();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut env = db.process_env();
    env.retain(|(k, _)| *k != "COURIER_BROKER_URL");
    env.push(("COURIER_BROKER_URL", user.amqp_url()));
    env.push((
        "COURIER_ADMIN_BIND",
        taken.local_addr().expect("addr").to_string(),
    ));

    let o = doctor(&[], env.clone()).await;
    let report = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{report}");
    let exchanges = line(&report, "exchanges");
    assert!(exchanges.starts_with("FAIL"), "{report}");
    assert!(
        exchanges.contains(&format!("`{missing}` (2 open rows)")),
        "{report}"
    );
    assert!(exchanges.contains("fix: declare them"), "{report}");
    let permissions = line(&report, "permissions");
    assert!(permissions.starts_with("FAIL"), "{report}");
    assert!(permissions.contains(&denied), "{report}");
    assert!(
        permissions.contains(&format!("grant {}", user.name)),
        "{report}"
    );
    assert!(
        permissions.contains("an internal exchange takes no publishes from clients"),
        "{report}"
    );
    let admin = line(&report, "admin");
    assert!(
        admin.starts_with("FAIL") && admin.contains("fix:"),
        "{report}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("3 check(s) failed"));

    // Before a service starts, producers' rows naming a bad exchange only warn: the engine
    // dead-letters them, and they must not keep it from delivering the others.
    drop(taken);
    let o = doctor(&["--pre-start"], env).await;
    let report = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{report}");
    assert!(line(&report, "exchanges").starts_with("warn"), "{report}");
    assert!(line(&report, "permissions").starts_with("warn"), "{report}");
}

#[actix_rt::test]
async fn producers_exchange_names_neither_crash_nor_forge_the_report() {
    let db = TestDb::new("doctorhostile").await;
    let broker = TestBroker::new("doctorhostile").await;
    // A name AMQP cannot carry (lapin panics on one), and one that would forge a report
    // line and retitle the terminal if printed raw.
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, payload) VALUES
            (repeat('x', 256), 'k', 'x'),
            (E'forger\\x1b[31m\\nok    forged       all good\\x1b]0;pwned\\x07', 'k', 'x')",
    )
    .await;
    let o = doctor(&[], env_for(&db, &broker)).await;
    let report = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{report}");
    let exchanges = line(&report, "exchanges");
    assert!(exchanges.starts_with("FAIL"), "{report}");
    assert!(
        exchanges.contains("not AMQP exchange names") && exchanges.contains("256 bytes"),
        "{report}"
    );
    // The name that does fit AMQP is missing, and is named too: a row with a name no
    // exchange can have hid every missing exchange beside it.
    assert!(
        exchanges.contains("missing: `forger") && exchanges.contains("fix: correct the producer"),
        "{report}"
    );
    assert!(
        !report.contains('\x1b'),
        "no raw escape reaches the terminal: {report:?}"
    );
    assert!(
        !report.lines().any(|l| l.starts_with("ok    forged")),
        "no forged line: {report}"
    );
    // Before a start, they only warn: the engine dead-letters such rows.
    let o = doctor(&["--pre-start"], env_for(&db, &broker)).await;
    let report = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{report}");
    assert!(line(&report, "exchanges").starts_with("warn"), "{report}");

    // More exchanges than are probed: the report says how many there are.
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, payload)
         SELECT 'doctorhostile.missing.' || g, 'k', 'x' FROM generate_series(1, 60) g",
    )
    .await;
    let o = doctor(&["--pre-start"], env_for(&db, &broker)).await;
    let report = stdout(&o);
    assert!(
        line(&report, "exchanges").contains("of 62 named"),
        "{report}"
    );
}

#[actix_rt::test]
async fn wrong_credentials_an_unmigrated_schema_and_a_bad_config_fail_with_their_fix() {
    let schema = common::unique_name("doctornew");
    let env = vec![
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", schema.clone()),
        ("COURIER_DATABASE_AUTO_MIGRATE", "false".to_string()),
        (
            "COURIER_BROKER_URL",
            "amqp://guest:wrong@127.0.0.1:5672/%2f".to_string(),
        ),
    ];
    let o = doctor(&[], env).await;
    let report = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{report}");
    let schema_line = line(&report, "schema");
    assert!(schema_line.starts_with("FAIL"), "{report}");
    assert!(schema_line.contains("run `courier migrate`"), "{report}");
    let broker = line(&report, "broker");
    assert!(
        broker.starts_with("FAIL") && broker.contains("ACCESS_REFUSED"),
        "{report}"
    );
    assert!(broker.contains("retrying will not help"), "{report}");
    assert!(!report.contains("wrong"), "the password leaked: {report}");
    assert!(line(&report, "exchanges").starts_with("skip"), "{report}");

    // A list of nodes: each is tried, not only the first that answers. One refusing the
    // login fails the check; one not reachable is a warning (the engine uses the others).
    let good = common::broker_url();
    let closed = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        free_address().rsplit(':').next().unwrap_or_default()
    );
    for (second, verdict, says) in [
        (
            "amqp://guest:wrong@127.0.0.1:5672/%2f",
            "FAIL",
            "ACCESS_REFUSED",
        ),
        (closed.as_str(), "warn", "the engine uses the others"),
    ] {
        let env = vec![
            ("COURIER_DATABASE_URL", common::database_url()),
            ("COURIER_BROKER_URL", format!("{good},{second}")),
        ];
        let report = stdout(&doctor(&[], env).await);
        let broker = line(&report, "broker");
        assert!(
            broker.starts_with(verdict) && broker.contains("1 of 2 nodes") && broker.contains(says),
            "{report}"
        );
        assert!(!report.contains("wrong"), "the password leaked: {report}");
    }

    let url = format!("{}_no_such_db", common::database_url());
    let o = doctor(&[], vec![("COURIER_DATABASE_URL", url)]).await;
    let database = line(&stdout(&o), "database");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        database.starts_with("FAIL") && database.contains("does not exist"),
        "{database}"
    );
    assert!(
        database.contains("fix: correct the user, password, database"),
        "{database}"
    );

    // A migrate URL that cannot log in fails its own check, beside a good database.url:
    // the engine migrates through it at start.
    let bad = format!("{}_no_such_db", common::database_url());
    let o = doctor(&[], vec![("COURIER_DATABASE_MIGRATE_URL", bad)]).await;
    let migrate = line(&stdout(&o), "migrate_url");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        migrate.starts_with("FAIL") && migrate.contains("database.migrate_url"),
        "{migrate}"
    );
    assert!(
        line(&stdout(&o), "database").starts_with("ok"),
        "{}",
        stdout(&o)
    );

    // Traces asked for over gRPC, which `run` refuses: the pre-start check fails too.
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4317".to_string(),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".to_string()),
    ];
    let o = doctor(&["--pre-start"], env).await;
    let traces = line(&stdout(&o), "traces");
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        traces.starts_with("FAIL") && traces.contains("grpc"),
        "{traces}"
    );

    // A sampler the SDK would ignore (sampling every trace) is a warning naming it.
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4318".to_string(),
        ),
        ("OTEL_TRACES_SAMPLER", "bogus".to_string()),
    ];
    let o = doctor(&["--pre-start"], env).await;
    let traces = line(&stdout(&o), "traces");
    assert!(
        traces.starts_with("warn") && traces.contains("OTEL_TRACES_SAMPLER=\"bogus\""),
        "{traces}"
    );

    // A bad config is a failed check, and exits 2 as `courier run` does for it.
    let o = doctor(&[], vec![("COURIER_RETRY_MAX_ATTEMPTS", "0".to_string())]).await;
    let config = line(&stdout(&o), "config");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        config.starts_with("FAIL") && config.contains("retry.max_attempts"),
        "{config}"
    );
}

/// What doctor fails on, `courier run` refuses too: a schema a newer courier migrated (this
/// one would misread it), and one not migrated while `database.auto_migrate` is off.
#[tokio::test]
async fn run_refuses_a_schema_it_does_not_fit_like_doctor() {
    let db = TestDb::new("runfit").await;
    db.exec("INSERT INTO {s}.__diesel_schema_migrations (version) VALUES ('20991231000099')")
        .await;
    let courier = |command: &'static str, env: Vec<(&'static str, String)>| async move {
        tokio::task::spawn_blocking(move || {
            common::courier_command()
                .arg(command)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
                .output()
                .expect("run courier run")
        })
        .await
        .expect("run thread")
    };
    // `migrate` says so too, so a deploy learns it before the engines restart.
    for command in ["run", "migrate"] {
        let o = courier(command, db.process_env()).await;
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(1), "{command}: {err}");
        assert!(
            err.contains("20991231000099") && err.contains("newer"),
            "{command}: {err}"
        );
    }

    let mut env = db.process_env();
    env.retain(|(k, _)| *k != "COURIER_DATABASE_SCHEMA");
    env.push((
        "COURIER_DATABASE_SCHEMA",
        common::unique_name("runfit_none"),
    ));
    env.push(("COURIER_DATABASE_AUTO_MIGRATE", "false".into()));
    let o = courier("run", env).await;
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not migrated yet") && err.contains("courier migrate"),
        "{err}"
    );
}

/// A `statement_timeout` short enough to cancel claims over a backlog (here set on the URL,
/// as libpq's `options`, standing for a role's `ALTER ROLE … SET`) is named with its fix,
/// as a warning: the engine still runs.
#[actix_rt::test]
async fn a_short_statement_timeout_is_named_with_its_fix() {
    let db = TestDb::new("doctortimeout").await;
    let broker = TestBroker::new("doctortimeout").await;
    let mut env = env_for(&db, &broker);
    let url = common::database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    env.push((
        "COURIER_DATABASE_URL",
        format!("{url}{sep}options=-c%20statement_timeout%3D15"),
    ));
    let o = doctor(&[], env).await;
    let report = stdout(&o);
    let found = line(&report, "statement_timeout");
    assert!(found.starts_with("warn "), "{report}");
    assert!(found.contains("15 ms"), "{report}");
    assert!(found.contains("ALTER ROLE"), "{report}");
    assert!(line(&report, "database").starts_with("ok "), "{report}");
}
