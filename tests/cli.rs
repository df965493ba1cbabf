//! The `courier` binary: help, exit codes, config errors, migrate, status and engines.

mod common;

use std::process::Output;

fn courier(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = common::courier_command();
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run courier")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_explains_every_command() {
    let o = courier(&["--help"], &[]);
    assert!(o.status.success());
    let t = text(&o);
    for cmd in ["run", "migrate", "status", "engines"] {
        assert!(t.contains(cmd), "{t}");
    }
    let o = courier(&["migrate", "--help"], &[]);
    assert!(o.status.success());
    assert!(text(&o).contains("--config"));
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(courier(&["frobnicate"], &[]).status.code(), Some(2));
}

#[test]
fn bad_config_exits_2_and_names_the_key() {
    let dir = std::env::temp_dir().join(common::unique_name("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(&path, "retry:\n  max_attempts: 0\n").unwrap();
    let o = courier(&["status", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("retry.max_attempts"), "{}", text(&o));
    let o = courier(&["--config", "/nonexistent/courier.yaml", "status"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("/nonexistent/courier.yaml"));
}

#[test]
fn a_missing_config_file_says_why_once() {
    let o = courier(&["--config", "/nonexistent/courier.yaml", "status"], &[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let why = std::fs::read_to_string("/nonexistent/courier.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        stderr.starts_with("error: cannot read config file /nonexistent/courier.yaml: "),
        "{stderr}"
    );
    assert_eq!(stderr.matches(why.as_str()).count(), 1, "{stderr}");
}

#[test]
fn unreachable_database_names_host_without_password_and_exits_1() {
    let o = courier(
        &["migrate"],
        &[
            (
                "COURIER_DATABASE_URL",
                "postgres://bob:hunter2@127.0.0.1:1/nowhere",
            ),
            ("COURIER_DATABASE_CONNECT_TIMEOUT", "2s"),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("127.0.0.1:1"), "{t}");
    assert!(!t.contains("hunter2"), "{t}");
}

#[test]
fn migrate_twice_then_status() {
    let schema = common::unique_name("climigrate");
    let env = [
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", schema.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let first = courier(&["migrate"], &env);
    assert!(first.status.success(), "{}", text(&first));
    assert!(text(&first).contains("applied"));
    let second = courier(&["migrate"], &env);
    assert!(second.status.success(), "{}", text(&second));
    assert!(text(&second).contains("up to date"), "{}", text(&second));
    let status = courier(&["status"], &env);
    assert!(status.status.success(), "{}", text(&status));
    assert!(text(&status).contains("pending"));
    // Clean up through the test schema guard.
    drop(common::TestDbGuard(schema));
}

/// A report read by a pipe that closes early (`courier status --watch | head -1`) ends as
/// Unix tools do, by SIGPIPE, without a panic (it printed "failed printing to stdout: Broken
/// pipe" with a backtrace).
#[test]
fn a_report_into_a_closed_pipe_ends_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let schema = common::unique_name("clipipe");
    let _guard = common::TestDbGuard(schema.clone());
    let mut cmd = common::courier_command();
    cmd.args(["status", "--watch"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("COURIER_DATABASE_URL", common::database_url())
        .env("COURIER_DATABASE_SCHEMA", &schema)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let migrated = courier(
        &["migrate"],
        &[
            ("COURIER_DATABASE_URL", common::database_url().as_str()),
            ("COURIER_DATABASE_SCHEMA", schema.as_str()),
        ],
    );
    assert!(migrated.status.success(), "{}", text(&migrated));
    let mut child = cmd.spawn().expect("run courier status --watch");
    let stdout = child.stdout.take().expect("stdout");
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .expect("the first report line");
    // The reader is gone (dropped above): the next refresh, a second later, writes into a
    // closed pipe. Bounded: a process that goes on is killed and fails the test.
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let status = child.wait().expect("wait");
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let _ = tx.send((status, stderr));
    });
    let Ok((status, stderr)) = rx.recv_timeout(std::time::Duration::from_secs(15)) else {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        panic!("courier status --watch went on writing into a closed pipe");
    };
    assert!(!stderr.contains("panicked"), "{stderr}");
    const SIGPIPE: i32 = 13;
    assert_eq!(status.signal(), Some(SIGPIPE), "{status:?} {stderr}");
}

/// [`courier`] off the test's runtime thread, so an engine running on that thread keeps
/// beating meanwhile.
async fn courier_beside(args: &[&str], env: &[(&str, String)]) -> Output {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        courier(&args, &env)
    })
    .await
    .expect("courier thread")
}

#[actix_rt::test]
async fn engines_lists_a_running_engine_with_its_pid_and_what_others_hold() {
    let db = common::TestDb::new("cliengines").await;
    db.engines_beside().await;
    let mut config = db.engine_config();
    config.scheduler.engine_timeout = std::time::Duration::from_secs(120);
    let engine = courier::Engine::start(config).await.expect("engine starts");
    let env = [
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", db.schema.clone()),
    ];

    let o = courier_beside(&["engines", "--json"], &env).await;
    assert!(o.status.success(), "{}", text(&o));
    let listed: Vec<serde_json::Value> =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(listed.len(), 3, "{listed:?}");
    let me = &listed[0];
    assert_eq!(
        me["id"],
        engine.engine_id(),
        "running engines first: {listed:?}"
    );
    assert_eq!(me["state"], "running", "{me}");
    assert_eq!(me["pid"], std::process::id(), "{me}");
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"), "{me}");
    assert_eq!(me["holds"], 0, "{me}");
    let since = me["since_beat_ms"].as_i64().expect("since_beat_ms");
    assert!((0..10_000).contains(&since), "{me}");
    let other = &listed[1];
    assert_eq!(other["id"], "other", "{listed:?}");
    assert_eq!(other["state"], "running", "{other}");
    assert_eq!(other["holds"], 1, "{other}");
    let ghost = &listed[2];
    assert_eq!(ghost["state"], "dead", "{ghost}");
    assert_eq!(ghost["holds"], 0, "{ghost}");

    let o = courier_beside(&["engines"], &env).await;
    assert!(o.status.success(), "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    let line = table
        .lines()
        .find(|l| l.starts_with(engine.engine_id()))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("running") && line.contains("s ago"),
        "{table}"
    );
    assert!(
        line.contains(&format!(" {} ", std::process::id())),
        "{table}"
    );
    assert!(table.contains("(3 engine(s))"), "{table}");

    // A clean stop leaves the registry.
    engine.shutdown().await;
    let o = courier_beside(&["engines", "--json"], &env).await;
    assert!(o.status.success(), "{}", text(&o));
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["id"], "other");
    assert_eq!(listed[1]["id"], "ghost");
}

#[test]
fn engines_on_an_unmigrated_schema_fails_like_status() {
    let schema = common::unique_name("clinoschema");
    let env = [
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", schema.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for args in [
        &["status"][..],
        &["status", "--watch"],
        &["engines"],
        &["engines", "--json"],
        &["dead-letters", "list"],
    ] {
        let o = courier(args, &env);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        let said = format!("schema `{schema}` is not migrated yet: run `courier migrate`");
        assert_eq!(text(&o).matches(&said).count(), 1, "{args:?}: {}", text(&o));
        assert!(
            !text(&o).contains("does not exist"),
            "{args:?}: {}",
            text(&o)
        );
        assert!(
            o.stdout.is_empty(),
            "{args:?}: nothing on stdout: {}",
            text(&o)
        );
    }
    drop(common::TestDbGuard(schema));
}

#[test]
fn completions_and_man_pages_come_from_the_command_definitions_without_a_config() {
    let missing = ["--config", "/nonexistent/courier.yaml"];
    for (shell, mark) in [
        ("bash", "_courier()"),
        ("zsh", "#compdef courier"),
        ("fish", "complete -c courier"),
    ] {
        let o = courier(&[&missing[..], &["completions", shell]].concat(), &[]);
        assert!(o.status.success(), "{shell}: {}", text(&o));
        let script = String::from_utf8_lossy(&o.stdout);
        assert!(
            script.contains(mark) && script.contains("doctor") && script.contains("dead-letters"),
            "{shell}: {script}"
        );
    }
    let o = courier(&[&missing[..], &["man"]].concat(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let page = String::from_utf8_lossy(&o.stdout);
    assert!(
        page.contains(".TH courier") && page.contains("doctor"),
        "{page}"
    );

    let dir = std::env::temp_dir().join(common::unique_name("man"));
    let o = courier(&["man", "--dir", dir.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", text(&o));
    for page in [
        "courier.1",
        "courier-run.1",
        "courier-doctor.1",
        "courier-dead-letters.1",
    ] {
        assert!(
            dir.join(page).is_file(),
            "{page} missing in {}",
            dir.display()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `courier demo` counts its rows' outcomes in the database: it finishes, and reports every
/// row, even when another engine (here `courier run` on the demo's own schema) publishes
/// most of them; it labels its latencies as those of a backlog and rounds its rate. Its
/// queue is its schema's (`<schema>.demo`) and keeps what it already held: a demo never
/// empties a queue another demo may be filling.
#[actix_rt::test]
async fn the_demo_finishes_whoever_publishes_its_rows() {
    let schema = common::unique_name("clidemo");
    let demo_schema = format!("{schema}_demo");
    let _guards = (
        common::TestDbGuard(schema.clone()),
        common::TestDbGuard(demo_schema.clone()),
    );
    let demo_queue = format!("{schema}.demo");
    let mut broker = common::broker::TestBroker::new("clidemo").await;
    broker.declare_queue(&demo_queue, Default::default()).await;
    broker.adopt_queue(&demo_queue);
    broker.adopt_exchange(&demo_queue);
    broker
        .channel
        .basic_publish(
            "".into(),
            demo_queue.as_str().into(),
            Default::default(),
            b"left by an earlier demo",
            Default::default(),
        )
        .await
        .expect("publish the earlier message");
    common::eventually(10, "the earlier message in the demo queue", || async {
        (broker.depth(&demo_queue).await == 1).then_some(())
    })
    .await;
    let env = vec![
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", demo_schema.clone()),
        ("COURIER_BROKER_URL", common::broker_url()),
    ];
    let mut other = common::EngineProcess::spawn("clidemo", &env);
    common::migrated_by_process(&demo_schema, 30).await;
    let env = [
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", schema.clone()),
        ("COURIER_BROKER_URL", common::broker_url()),
    ];
    let o = common::within(
        120,
        "courier demo beside another engine",
        courier_beside(&["demo", "--messages", "3000"], &env),
    )
    .await;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("| confirmed | 3000 |"), "{out}");
    assert!(
        out.contains(&format!("outbox schema `{demo_schema}`")),
        "{out}"
    );
    assert!(out.contains("3000 queued at once"), "{out}");
    assert!(out.contains("msg/s |") && out.contains("≈ "), "{out}");
    assert!(
        out.contains(&format!("`{demo_queue}` (messages already in it: 1)")),
        "{out}"
    );
    assert_eq!(
        broker.depth(&demo_queue).await,
        3001,
        "the demo's 3000 and the one it found"
    );
    assert!(other.terminate(20).await.success(), "{}", other.log());
}

/// `courier status` names the keys held back by a dead letter (escaped, with what holds
/// them), and `dead-letters list` prints its times with their zone.
#[actix_rt::test]
async fn status_names_blocked_keys_and_dead_letters_list_says_the_zone() {
    let db = common::TestDb::new("cliblocked").await;
    db.exec(
        "INSERT INTO {s}.dead_letters (id, attempts, created_at, exchange, routing_key, payload,
                                        headers, last_error, ordering_key)
         VALUES ('00000000-0000-4000-8000-0000000000b1', 3, now(), 'orders', 'order.paid', 'x',
                 '{}', 'returned by broker', 'order-42'),
                ('00000000-0000-4000-8000-0000000000b2', 3, now(), 'orders', 'order.paid', 'x',
                 '{}', 'returned by broker', E'evil\\x1b[31m')",
    )
    .await;
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, payload, ordering_key)
         SELECT 'orders', 'order.shipped', 'y', k FROM (VALUES ('order-42'), ('order-42'),
                ('order-42'), (E'evil\\x1b[31m'), ('order-7')) AS v(k)",
    )
    .await;
    let env = [
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", db.schema.clone()),
    ];
    let o = courier_beside(&["status"], &env).await;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("keys blocked behind a dead letter"), "{out}");
    assert!(
        out.contains("order-42  3 waiting  behind 00000000-0000-4000-8000-0000000000b1"),
        "{out}"
    );
    assert!(
        !out.contains('\u{1b}'),
        "a control sequence reached the terminal: {out:?}"
    );
    assert!(
        !out.contains("order-7"),
        "order-7 has no dead letter: {out}"
    );
    let o = courier_beside(&["status", "--json"], &env).await;
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status --json");
    let keys = json["blocked_keys"].as_array().expect("blocked_keys");
    let order = keys
        .iter()
        .find(|k| k["key"] == "order-42")
        .expect("order-42");
    assert_eq!(order["waiting"], 3, "{json}");
    assert_eq!(keys.len(), 2, "{json}");

    let o = courier_beside(&["dead-letters", "list"], &env).await;
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("0000000000b1"))
        .expect("the dead letter is listed");
    assert!(line.contains(" UTC"), "{line}");
}
