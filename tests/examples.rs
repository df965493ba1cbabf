//! The examples, run as README says: the embedded service commits an order with its event,
//! the event is confirmed into the queue the example declared (not dead-lettered), and the
//! consumer example applies it to its table, saying so.

mod common;

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use common::{eventually, TestDb};
use diesel::{sql_types::Text, QueryableByName};
use diesel_async::RunQueryDsl;

/// An example's binary, built by `cargo test` beside this test's own (target/debug/examples).
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let debug = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/debug");
    debug.join("examples").join(name)
}

/// A running example, its output in a file, killed on drop.
struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    fn start(name: &str, env: &[(&str, String)]) -> Running {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("example-logs");
        std::fs::create_dir_all(&dir).expect("log dir");
        let log = dir.join(common::unique_name(name));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(example(name))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("COURIER_TEST_DATABASE_URL")
            .env_remove("COURIER_TEST_BROKER_URL")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start example {name} ({e}): a whole `cargo test` builds the examples; \
                     alone, run `cargo build --examples` first"
                )
            });
        Running { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection; the response's body.
fn http(port: u16, request: &str) -> Option<String> {
    let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    sock.write_all(request.as_bytes()).ok()?;
    let mut reply = String::new();
    sock.read_to_string(&mut reply).ok()?;
    reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

#[actix_rt::test]
async fn the_embedded_example_delivers_its_event_and_the_consumer_example_applies_it() {
    let db = TestDb::new("examples").await;
    let port = common::proxy::Proxy::free_port();
    let env = vec![
        ("COURIER_DATABASE_URL", common::database_url()),
        ("COURIER_DATABASE_SCHEMA", db.schema.clone()),
        ("COURIER_BROKER_URL", common::broker_url()),
        ("PORT", port.to_string()),
    ];
    let service = Running::start("embedded", &env);
    let order = r#"{"item":"book"}"#;
    let post = format!(
        "POST /orders HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{order}",
        order.len()
    );
    let created = eventually(60, "the embedded example to take an order", || {
        let body = http(port, &post);
        async move { body.filter(|b| b.contains("event_id")) }
    })
    .await;
    let created: serde_json::Value = serde_json::from_str(&created).expect("json");
    let event_id = created["event_id"].as_str().expect("event_id").to_string();
    let get =
        format!("GET /events/{event_id} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let outcome = tokio::task::spawn_blocking(move || http(port, &get))
        .await
        .expect("request thread")
        .unwrap_or_default();
    assert_eq!(outcome.trim(), "Confirmed", "{}", service.output());
    assert!(
        service
            .output()
            .contains(&format!("committed with its event {event_id}")),
        "{}",
        service.output()
    );

    let consumer = Running::start("consumer", &env);
    #[derive(QueryableByName)]
    struct Applied {
        #[diesel(sql_type = Text)]
        routing_key: String,
    }
    let sql = format!(
        "SELECT routing_key FROM \"{}\".orders_applied WHERE event_id = $1",
        db.schema
    );
    let applied = eventually(60, "the consumer example to apply the event", || {
        let (db, sql, id) = (&db, sql.clone(), event_id.clone());
        async move {
            let mut conn = db.raw().await;
            diesel::sql_query(sql)
                .bind::<Text, _>(id)
                .get_result::<Applied>(&mut conn)
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(applied.routing_key, "order.created");
    eventually(10, "the consumer to say what it applied", || {
        let said = consumer
            .output()
            .contains(&format!("applied order.created {event_id}"));
        async move { said.then_some(()) }
    })
    .await;
}
