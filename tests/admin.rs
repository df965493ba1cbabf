//! The admin API's security model and its isolation from the engine, against the real
//! services: who may read payloads, bounded responses, security headers, allowed hosts,
//! error bodies that leak nothing, the admin API's own pool and statement timeout,
//! readiness without counts, bounded metric labels, the engine registry (as documented, and
//! in the metrics), and producer text escaped in the CLI.

mod common;

use std::{collections::BTreeMap, time::Duration};

use common::{broker::TestBroker, within, TestDb};
use courier::testing::StoreInternals as _;
use courier::{
    config::{Config, SecretUrl},
    Engine, EngineHandle, OutboxMessage, Outcome,
};
use diesel::QueryableByName;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
const SECRET_PAYLOAD: &str = "SECRET-PAYLOAD-7f3a";
const SECRET_HEADER: &str = "SECRET-HEADER-91b2";

/// One HTTP/1.1 exchange: status, headers (lower-case names), body.
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

/// A minimal HTTP/1.1 client: one request per connection, `Host` settable.
async fn request(addr: &str, method: &str, path: &str, host: &str, token: Option<&str>) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

async fn get(addr: &str, path: &str, token: Option<&str>) -> Reply {
    request(addr, "GET", path, addr, token).await
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", common::proxy::Proxy::free_port())
}

/// An engine with the admin API on a free port; `tune` adjusts the config first.
async fn admin_engine(db: &TestDb, tune: impl FnOnce(&mut Config)) -> (EngineHandle, String) {
    let addr = free_addr();
    let mut config = db.engine_config();
    config.admin.bind = Some(addr.clone());
    tune(&mut config);
    (Engine::start(config).await.expect("engine starts"), addr)
}

/// Whether dead letter `id` is still there.
async fn is_dead_letter(db: &TestDb, id: Uuid) -> bool {
    db.store().await.dead_letter(id).await.unwrap().is_some()
}

/// Inserts one dead letter with SQL (`{s}` is the schema); returns its id.
async fn dead_letter(db: &TestDb, columns: &str, values: &str) -> Uuid {
    #[derive(QueryableByName)]
    struct IdRow {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        id: Uuid,
    }
    let sql = format!(
        "INSERT INTO \"{}\".dead_letters (id, attempts, {columns})
         VALUES (gen_random_uuid(), 3, {values}) RETURNING id",
        db.schema
    );
    let mut conn = db.raw().await;
    let row: IdRow = diesel::sql_query(sql)
        .get_result(&mut conn)
        .await
        .expect("insert dead letter");
    row.id
}

/// A dead letter carrying a secret payload and a secret header.
async fn secret_dead_letter(db: &TestDb) -> Uuid {
    dead_letter(
        db,
        "created_at, exchange, routing_key, payload, headers, last_error",
        &format!(
            "now(), 'orders', 'order.created', convert_to('{SECRET_PAYLOAD}', 'UTF8'),
             '{{\"authorization\": \"{SECRET_HEADER}\"}}', 'nacked by broker'"
        ),
    )
    .await
}

async fn wait_broker_connected(engine: &EngineHandle) {
    let mut events = engine.subscribe();
    if engine.broker_state() == courier::BrokerState::Connected {
        return;
    }
    within(20, "broker connected", async {
        while !matches!(
            events.recv().await,
            Ok(courier::EngineEvent::BrokerConnected)
        ) {
            if engine.broker_state() == courier::BrokerState::Connected {
                return;
            }
        }
    })
    .await;
}

#[actix_rt::test]
async fn payloads_need_a_token_lists_carry_none_and_responses_are_bounded() {
    let db = TestDb::new("adm_payload").await;
    let secret = secret_dead_letter(&db).await;
    // 3 MiB of UTF-8 with a two-byte character across the 1 MiB cut.
    let big = dead_letter(
        &db,
        "created_at, exchange, routing_key, payload, headers",
        "now(), 'orders', 'big', convert_to(repeat('a', 1048575) || 'é' || repeat('b', 2097151), 'UTF8'), '{}'",
    )
    .await;
    // A producer's values serde and chrono cannot hold must not break the list.
    let odd = dead_letter(
        &db,
        "created_at, exchange, routing_key, payload, headers",
        "'infinity', 'orders', 'odd', '', '{\"n\": 1e400}'",
    )
    .await;
    let (engine, addr) = admin_engine(&db, |c| {
        c.admin.token = Some("admin-tok".into());
        c.admin.read_token = Some("read-tok".into());
    })
    .await;

    // Nothing a caller without a token can fetch carries a payload or a header value.
    let open = [
        "/api/dead-letters".to_string(),
        "/api/dead-letters?limit=500".into(),
        format!("/api/dead-letters/{secret}"),
        format!("/api/dead-letters/{big}"),
        "/api/stats".into(),
        "/metrics".into(),
    ];
    for path in &open {
        let r = get(&addr, path, None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert!(
            !r.body.contains(SECRET_PAYLOAD) && !r.body.contains(SECRET_HEADER),
            "{path} leaks: {}",
            r.body
        );
    }
    let list = get(&addr, "/api/dead-letters", None).await.json();
    let list = list.as_array().expect("a list");
    assert_eq!(list.len(), 3);
    for row in list {
        for field in ["payload_text", "payload_base64", "headers"] {
            assert!(row.get(field).is_none(), "list carries {field}: {row}");
        }
    }
    let by_id = |id: Uuid| {
        list.iter()
            .find(|r| r["id"] == id.to_string())
            .expect("listed")
    };
    assert_eq!(by_id(secret)["payload_bytes"], SECRET_PAYLOAD.len());
    assert_eq!(by_id(big)["payload_bytes"], 3 * 1024 * 1024);
    assert!(by_id(odd)["created_at"].is_null());
    let r = get(
        &addr,
        &format!("/api/dead-letters/{odd}/payload"),
        Some("read-tok"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let headers = r.json()["headers"].clone();
    assert!(
        headers
            .as_str()
            .is_some_and(|t| t.starts_with("{\"n\": 1000")),
        "unreadable JSON comes back as its text: {headers}"
    );

    // The payload itself: 401 without or with a wrong token, the same answer for both.
    let path = format!("/api/dead-letters/{secret}/payload");
    let missing = get(&addr, &path, None).await;
    let wrong = get(&addr, &path, Some("read-tol")).await;
    assert_eq!((missing.status, wrong.status), (401, 401));
    assert_eq!(missing.body, wrong.body);
    assert!(!missing.body.contains(SECRET_PAYLOAD));
    for token in ["read-tok", "admin-tok"] {
        let r = get(&addr, &path, Some(token)).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["payload_text"], SECRET_PAYLOAD);
        assert_eq!(v["headers"]["authorization"], SECRET_HEADER);
        assert_eq!(v["payload_truncated"], false);
    }

    // A big payload comes back cut to 1 MiB (the cut character trimmed from the text).
    let r = get(
        &addr,
        &format!("/api/dead-letters/{big}/payload"),
        Some("read-tok"),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body.len() < 3 * 1024 * 1024, "{} bytes", r.body.len());
    let v = r.json();
    assert_eq!(v["payload_truncated"], true);
    assert_eq!(v["payload_bytes"], 3 * 1024 * 1024);
    assert_eq!(
        v["payload_text"].as_str().map(str::len),
        Some(1024 * 1024 - 1)
    );

    // The read token changes nothing; limits are capped with a clear 400.
    let r = request(
        &addr,
        "POST",
        &format!("/api/dead-letters/{secret}/requeue"),
        &addr,
        Some("read-tok"),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(is_dead_letter(&db, secret).await);
    let r = get(&addr, "/api/dead-letters?limit=501", None).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("between 1 and 500"), "{}", r.body);

    // A dead letter whose id a producer reused, still open in the outbox, stays where it
    // is, and the answer says why (409), not that it does not exist.
    db.exec(&format!(
        "INSERT INTO {{s}}.outbox (id, exchange, routing_key, next_attempt_at)
         VALUES ('{big}', 'orders', 'again', now() + interval '1 hour')"
    ))
    .await;
    let path = format!("/api/dead-letters/{big}/requeue");
    let r = request(&addr, "POST", &path, &addr, Some("admin-tok")).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(r.body.contains("a producer reused the id"), "{}", r.body);
    let unknown = Uuid::new_v4();
    let path = format!("/api/dead-letters/{unknown}/requeue");
    let r = request(&addr, "POST", &path, &addr, Some("admin-tok")).await;
    assert_eq!(r.status, 404, "{}", r.body);

    // A dead letter another transaction holds locked: both changes give up, say why (409,
    // not "database unavailable") and change nothing.
    let mut other = db.hold_locked("dead_letters", &[secret]).await;
    for (method, path) in [
        ("POST", format!("/api/dead-letters/{secret}/requeue")),
        ("DELETE", format!("/api/dead-letters/{secret}")),
    ] {
        let r = request(&addr, method, &path, &addr, Some("admin-tok")).await;
        assert_eq!(r.status, 409, "{method} {path}: {}", r.body);
        assert!(
            r.body.contains("locked by another transaction"),
            "{}",
            r.body
        );
    }
    other.batch_execute("ROLLBACK").await.unwrap();
    assert!(is_dead_letter(&db, secret).await);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn without_tokens_payload_reads_are_disabled_not_open() {
    let db = TestDb::new("adm_notoken").await;
    let secret = secret_dead_letter(&db).await;
    let (engine, addr) = admin_engine(&db, |_| {}).await;
    let r = get(
        &addr,
        &format!("/api/dead-letters/{secret}/payload"),
        Some("anything"),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("disabled") && !r.body.contains(SECRET_PAYLOAD));
    engine.shutdown().await;
}

#[actix_rt::test]
async fn every_response_carries_security_headers_and_foreign_hosts_get_421() {
    let db = TestDb::new("adm_headers").await;
    let (engine, addr) = admin_engine(&db, |c| {
        c.admin.allowed_hosts = vec!["127.0.0.1".into(), "courier.internal".into()];
        c.admin.token = Some("t".into());
    })
    .await;
    let id = Uuid::new_v4();
    let cases = [
        ("/", "127.0.0.1", 200),
        ("/dashboard.js", "127.0.0.1", 200),
        ("/api/stats", "courier.internal:8081", 200),
        ("/nope", "127.0.0.1", 404),
        (
            &*format!("/api/dead-letters/{id}/payload"),
            "127.0.0.1",
            401,
        ),
        ("/api/stats", "evil.example", 421),
        ("/", "127.0.0.1.evil.example:80", 421),
    ];
    for (path, host, status) in cases {
        let host = if host == "127.0.0.1" {
            addr.as_str()
        } else {
            host
        };
        let r = request(&addr, "GET", path, host, None).await;
        assert_eq!(r.status, status, "{path} for {host}: {}", r.body);
        let csp = r.header("content-security-policy");
        assert!(
            csp.contains("frame-ancestors 'none'")
                && csp.contains("script-src 'self'")
                && csp.contains("default-src 'none'")
                && !csp.contains("unsafe-inline"),
            "{path}: csp {csp}"
        );
        assert_eq!(r.header("x-frame-options"), "DENY", "{path}");
        assert_eq!(r.header("x-content-type-options"), "nosniff", "{path}");
        assert_eq!(r.header("referrer-policy"), "no-referrer", "{path}");
        assert_eq!(r.header("cache-control"), "no-store", "{path}");
        if status == 421 {
            assert!(r.json()["error"].is_string());
        }
    }
    // HEAD reads what GET reads, without the body; a known path asked with a method it
    // does not take gets 405 and the methods it takes.
    for path in ["/", "/health", "/api/stats"] {
        let r = request(&addr, "HEAD", path, &addr, None).await;
        assert_eq!(r.status, 200, "HEAD {path}: {}", r.body);
        assert!(r.body.is_empty(), "HEAD {path}: {}", r.body);
    }
    for (method, path, allow) in [
        ("POST", "/api/stats".to_string(), "GET, HEAD"),
        (
            "PUT",
            format!("/api/dead-letters/{id}"),
            "GET, HEAD, DELETE",
        ),
        ("GET", format!("/api/dead-letters/{id}/requeue"), "POST"),
    ] {
        let r = request(&addr, method, &path, &addr, Some("t")).await;
        assert_eq!(r.status, 405, "{method} {path}: {}", r.body);
        assert_eq!(r.header("allow"), allow, "{method} {path}");
        assert!(r.json()["error"].is_string(), "{}", r.body);
        assert_eq!(r.header("x-frame-options"), "DENY", "{path}");
    }
    let r = request(&addr, "POST", "/nope", &addr, None).await;
    assert_eq!(r.status, 404, "{}", r.body);

    // The dashboard runs under that CSP: no inline script or style left in it.
    let page = get(&addr, "/", None).await.body;
    assert!(
        page.contains("<script src=\"/dashboard.js\"></script>"),
        "{page}"
    );
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "{page}"
    );
    engine.shutdown().await;
}

#[derive(QueryableByName)]
struct AppName {
    #[diesel(sql_type = diesel::sql_types::Text)]
    application_name: String,
}

/// Strings an unauthenticated error body must never contain.
fn assert_leaks_nothing(body: &str, schema: &str) {
    for word in [
        schema,
        "dead_letters",
        "outbox",
        "SELECT",
        "DELETE",
        "relation",
        "statement",
        "canceling",
        "postgres",
        "127.0.0.1",
        "5432",
    ] {
        assert!(!body.contains(word), "error body mentions `{word}`: {body}");
    }
}

#[actix_rt::test]
async fn admin_queries_run_on_their_own_pool_with_a_statement_timeout_and_errors_leak_nothing() {
    let db = TestDb::new("adm_pool").await;
    let broker = TestBroker::new("adm_pool").await;
    let victim = secret_dead_letter(&db).await;
    let (engine, addr) = admin_engine(&db, |c| {
        c.database.pool_size = 2;
        c.admin.pool_size = 1;
        c.admin.statement_timeout = Duration::from_secs(2);
        c.admin.token = Some("t".into());
    })
    .await;

    // Hold the dead letter's row lock: an admin discard waits on it until its statement
    // timeout cancels it (2 s, before the 3 s an operator's change waits for a lock).
    let mut holder = db.hold_locked("dead_letters", &[victim]).await;
    let discard = {
        let addr = addr.clone();
        tokio::spawn(async move {
            request(
                &addr,
                "DELETE",
                &format!("/api/dead-letters/{victim}"),
                &addr,
                Some("t"),
            )
            .await
        })
    };
    // The waiting statement belongs to the admin pool, not the engine's.
    let waiting = common::eventually(20, "the admin discard waiting on the lock", || async {
        let mut conn = db.raw().await;
        let rows: Vec<AppName> = diesel::sql_query(
            "SELECT application_name FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'",
        )
        .bind::<diesel::sql_types::Text, _>(&db.schema)
        .load(&mut conn)
        .await
        .ok()?;
        rows.into_iter().next()
    })
    .await;
    assert_eq!(waiting.application_name, "courier-admin");
    // Meanwhile the engine claims and confirms with its own pool.
    let ids = db.insert_sql(&broker.exchange, 20, "routed.{i}").await;
    let outcomes = engine.wait_for_all(&ids, WAIT).await.unwrap();
    assert!(outcomes.values().all(|o| *o == Outcome::Confirmed));

    // The statement timeout ends the wait (the lock is still held): a generic 503.
    let r = within(30, "the statement timeout to cancel the discard", discard)
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    let v = r.json();
    assert_eq!(v["error"], "database unavailable");
    assert!(v["error_id"].is_string());
    assert_leaks_nothing(&r.body, &db.schema);
    holder.batch_execute("ROLLBACK").await.unwrap();
    assert!(is_dead_letter(&db, victim).await);

    // Any other database failure reads the same from outside.
    db.exec("ALTER TABLE {s}.dead_letters RENAME TO dead_letters_gone")
        .await;
    for path in ["/api/dead-letters", "/api/stats"] {
        let r = get(&addr, path, None).await;
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        assert_leaks_nothing(&r.body, &db.schema);
    }
    db.exec("ALTER TABLE {s}.dead_letters_gone RENAME TO dead_letters")
        .await;
    engine.shutdown().await;
}

#[actix_rt::test]
async fn ready_checks_connectivity_and_stats_count_cheaply() {
    let db = TestDb::new("adm_ready").await;
    // More confirmed rows than are ever counted one by one.
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, status, confirmed_at)
         SELECT 'orders', 'k', 'confirmed', now() FROM generate_series(1, 12000);
         INSERT INTO {s}.outbox (exchange, routing_key, created_at, next_attempt_at)
         VALUES ('orders', 'k', '-infinity', 'infinity');
         ANALYZE {s}.outbox",
    )
    .await;
    let (engine, addr) = admin_engine(&db, |c| {
        c.admin.statement_timeout = Duration::from_secs(1);
    })
    .await;
    wait_broker_connected(&engine).await;
    let v = get(&addr, "/api/stats", None).await.json();
    assert_eq!(v["approximate"], serde_json::json!(["confirmed"]), "{v}");
    let confirmed = v["outbox"]["confirmed"].as_i64().unwrap();
    assert!((10_000..=20_000).contains(&confirmed), "{v}");
    assert_eq!(
        v["outbox"]["pending"], 1,
        "a row due never, created at -infinity: {v}"
    );
    assert_eq!(v["dead_letters"], 0);

    // With the outbox locked, readiness still answers from `SELECT 1` and the broker;
    // stats give up at the statement timeout with a generic 503.
    let mut holder = db.raw().await;
    holder
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE \"{}\".outbox IN ACCESS EXCLUSIVE MODE",
            db.schema
        ))
        .await
        .unwrap();
    let r = within(10, "/ready", get(&addr, "/ready", None)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["database"], "connected");
    let r = within(20, "/api/stats", get(&addr, "/api/stats", None)).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_leaks_nothing(&r.body, &db.schema);
    holder.batch_execute("ROLLBACK").await.unwrap();
    engine.shutdown().await;
}

#[actix_rt::test]
async fn metric_labels_stay_bounded_for_exchanges_that_do_not_exist() {
    let db = TestDb::new("adm_labels").await;
    let broker = TestBroker::new("adm_labels").await;
    let (engine, addr) = admin_engine(&db, |c| c.publisher.max_payload_bytes = 16).await;
    let mut bogus: Vec<OutboxMessage> = (0..100)
        .map(|i| OutboxMessage::new(format!("nope.{i}"), "k", b"x".to_vec()).with_max_attempts(1))
        .collect();
    // Dead-lettered at claim, never read: counted all the same.
    bogus.extend((0..4).map(|_| OutboxMessage::new(&broker.exchange, "k", vec![b'x'; 64])));
    let real: Vec<OutboxMessage> = (0..3)
        .map(|i| OutboxMessage::new(&broker.exchange, format!("routed.{i}"), b"x".to_vec()))
        .collect();
    engine.store().enqueue_many(&bogus).await.unwrap();
    engine.store().enqueue_many(&real).await.unwrap();
    let ids: Vec<Uuid> = bogus.iter().chain(&real).map(|m| m.id).collect();
    let outcomes = engine.wait_for_all(&ids, WAIT).await.unwrap();
    assert!(real.iter().all(|m| outcomes[&m.id] == Outcome::Confirmed));
    assert!(bogus
        .iter()
        .all(|m| matches!(outcomes[&m.id], Outcome::DeadLettered(_))));

    let text = get(&addr, "/metrics", None).await.body;
    let labels: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("courier_"))
        .filter_map(|l| l.split_once("exchange=\"").map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once('"').map(|(label, _)| label))
        .collect();
    assert!(!labels.iter().any(|l| l.starts_with("nope.")), "{labels:?}");
    assert!(
        labels.len() <= courier::testing::MAX_EXCHANGE_LABELS + 1,
        "{labels:?}"
    );
    assert!(
        text.contains(&format!(
            "courier_confirmed_total{{exchange=\"{}\"}} 3",
            broker.exchange
        )),
        "{text}"
    );
    assert!(
        text.contains("courier_dead_lettered_total{exchange=\"_other\"} 104"),
        "{text}"
    );
    // An exchange that earned its label is in every counter from then on, at 0 until
    // counted, so that the first dead letter to it shows in `increase()`.
    assert!(
        text.contains(&format!(
            "courier_dead_lettered_total{{exchange=\"{}\"}} 0",
            broker.exchange
        )),
        "{text}"
    );
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_start_that_cannot_serve_the_admin_api_leaves_no_engine_behind() {
    let db = TestDb::new("adm_taken").await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let mut config = db.engine_config();
    config.admin.bind = Some(addr.clone());
    let err = match Engine::start(config).await {
        Ok(_) => panic!("started on a taken address"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&addr), "{err}");
    let listed = registry(&db).await;
    assert!(listed.is_empty(), "a failed start left {listed:?}");

    // The port is bound before anything else: with the database out of reach (and
    // `wait_at_start` on, so the engine would wait for it) the start still fails at once,
    // so it could not have claimed a row.
    let mut config = db.engine_config();
    config.admin.bind = Some(addr.clone());
    config.database.url = SecretUrl::new(format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        common::proxy::Proxy::free_port()
    ));
    config.database.wait_at_start = true;
    let err = match within(10, "a start on a taken port", Engine::start(config)).await {
        Ok(_) => panic!("started on a taken address"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains(&addr), "{err}");
}

/// The engine registry as a 5 s engine timeout reads it.
async fn registry(db: &TestDb) -> Vec<courier::testing::EngineRecord> {
    db.store()
        .await
        .engines(Duration::from_secs(5))
        .await
        .expect("engines")
}

#[tokio::test]
async fn a_lone_engine_that_stopped_beating_is_listed_silent_not_running() {
    let db = TestDb::new("adm_silent").await;
    // No other engine runs to declare it dead: the registry still says running.
    db.exec(
        "INSERT INTO {s}.engines (id, host, pid, version, state, heartbeat_at, started_at)
         VALUES ('lone', 'h', 1, '0.0.1', 'running', now() - interval '1 minute',
                 now() - interval '1 hour'),
                ('fresh', 'h', 2, '0.0.1', 'running', now(), now())",
    )
    .await;
    let listed = registry(&db).await;
    let state = |id: &str| {
        listed
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.state.clone())
            .unwrap_or_default()
    };
    assert_eq!(state("lone"), "silent", "{listed:?}");
    assert_eq!(state("fresh"), "running", "{listed:?}");
}

#[actix_rt::test]
async fn engines_lists_the_registry_as_documented_and_metrics_count_it() {
    let db = TestDb::new("adm_engines").await;
    db.engines_beside().await;
    let (engine, addr) = admin_engine(&db, |c| {
        c.admin.token = Some("adm-token".into());
        c.scheduler.engine_timeout = Duration::from_secs(120);
    })
    .await;

    // Open like the stats: no token needed.
    let r = get(&addr, "/api/engines", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("content-type").starts_with("application/json"));
    let listed = r.json();
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 3, "{listed:?}");
    let me = &listed[0];
    assert_eq!(me["id"], engine.engine_id(), "running first: {listed:?}");
    assert_eq!(me["state"], "running");
    assert_eq!(me["pid"], std::process::id());
    assert_eq!(me["holds"], 0);
    assert!(
        me["since_beat_ms"].as_i64().is_some_and(|ms| ms >= 0),
        "{me}"
    );
    assert_eq!(listed[1]["id"], "other");
    assert_eq!(listed[1]["state"], "running");
    assert_eq!(listed[1]["holds"], 1);
    assert_eq!(listed[2]["id"], "ghost");
    assert_eq!(listed[2]["state"], "dead");
    assert_eq!(listed[2]["holds"], 0);

    // Each object has exactly the properties the served OpenAPI document names, all of
    // them required, with the documented JSON types.
    let spec = get(&addr, "/api/openapi.json", None).await.json();
    let schema = &spec["components"]["schemas"]["Engine"];
    assert_eq!(
        spec["paths"]["/api/engines"]["get"]["responses"]["200"]["content"]["application/json"]
            ["schema"]["items"]["$ref"],
        "#/components/schemas/Engine"
    );
    let properties = schema["properties"].as_object().expect("properties");
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .expect("required")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    required.sort_unstable();
    for e in listed {
        let object = e.as_object().expect("an object");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, required, "{e}");
        for (key, value) in object {
            let ok = match properties[key]["type"].as_str() {
                Some("string") => value.is_string(),
                Some("integer") => value.is_i64(),
                other => panic!("{key}: undocumented type {other:?}"),
            };
            assert!(ok, "{key} is not a {}: {e}", properties[key]["type"]);
        }
    }

    let metrics = get(&addr, "/metrics", None).await.body;
    for line in [
        "courier_engines{state=\"running\"} 2",
        "courier_engines{state=\"dead\"} 1",
        "courier_engines_rescued_total 0",
        "courier_rows_rescued_total 0",
        "courier_rejoins_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    engine.shutdown().await;
}

#[tokio::test]
async fn hostile_producer_text_is_escaped_in_the_cli() {
    let db = TestDb::new("adm_escape").await;
    let id = dead_letter(
        &db,
        "created_at, exchange, routing_key, payload, headers, last_error, ordering_key, seq",
        "now(), E'ex\\x1b[31mred', 'rk' || chr(155) || '2J', convert_to(E'body\\x1b[2Jgone', 'UTF8'),
         jsonb_build_object('h', 'v' || chr(155) || 'x'), E'boom\\x1b]0;pwned\\x07',
         'key' || chr(8238) || 'txt', 1",
    )
    .await;
    let run = |args: &[&str]| {
        let out = common::courier_command()
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("COURIER_DATABASE_URL", common::database_url())
            .env("COURIER_DATABASE_SCHEMA", &db.schema)
            .output()
            .expect("run courier");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    };
    let list = run(&["dead-letters", "list"]);
    let show = run(&["dead-letters", "show", &id.to_string()]);
    for out in [&list, &show] {
        assert!(
            !out.contains(['\x1b', '\u{9b}', '\u{202e}', '\x07']),
            "raw control characters reach the terminal: {out:?}"
        );
        assert!(out.contains("ex\\x1b[31mred"), "{out}");
    }
    assert!(show.contains("boom\\x1b]0;pwned\\x07"), "{show}");
    assert!(
        show.contains("rk\\u{9b}2J") && show.contains("key\\u{202e}txt"),
        "{show}"
    );
    assert!(show.contains("body\\x1b[2Jgone"), "{show}");
}

/// The `courier_*` metric names `text` (an alert rule file, a dashboard) uses.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("courier_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[actix_rt::test]
async fn every_metric_the_shipped_dashboard_and_alerts_use_is_exported_from_the_start() {
    let db = TestDb::new("shipped").await;
    let (engine, addr) = admin_engine(&db, |_| {}).await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let metrics = get(&addr, "/metrics", None).await.body;
    for file in ["prometheus/alerts.yaml", "grafana/courier.json"] {
        let text = std::fs::read_to_string(root.join(file)).expect("shipped file");
        let used = metric_names(&text);
        assert!(used.len() >= 5, "{file}: {used:?}");
        for name in used {
            // A histogram is exported as its _bucket, _sum and _count series.
            let exported = metrics
                .lines()
                .filter(|l| !l.starts_with('#'))
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")));
            assert!(
                exported,
                "{file} uses {name}, which /metrics does not export:\n{metrics}"
            );
        }
    }
    engine.shutdown().await;
}

#[actix_rt::test]
async fn metrics_say_when_the_database_did_not_answer_the_scrape() {
    let db = TestDb::new("adm_dbup").await;
    let (engine, addr) = admin_engine(&db, |_| {}).await;
    let text = get(&addr, "/metrics", None).await.body;
    assert!(text.contains("courier_database_up 1"), "{text}");
    // The scrape's reads fail (as they do when the database is gone): the gauges read from
    // it keep their last values, and this one says they are stale.
    db.exec("ALTER TABLE {s}.outbox RENAME TO outbox_gone")
        .await;
    let text = get(&addr, "/metrics", None).await.body;
    assert!(text.contains("courier_database_up 0"), "{text}");
    db.exec("ALTER TABLE {s}.outbox_gone RENAME TO outbox")
        .await;
    let text = get(&addr, "/metrics", None).await.body;
    assert!(text.contains("courier_database_up 1"), "{text}");
    engine.shutdown().await;
}

/// `promtool` (Debian's `prometheus` package, installed by scripts/test-tools) checks the
/// shipped rules and runs their unit tests: each alert fires on what should fire it, only
/// after its `for:`.
#[test]
fn the_shipped_alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yaml"][..],
        &["test", "rules", "alerts.test.yaml"][..],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (scripts/test-tools installs Debian's prometheus package)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A refusal while running (the engine's broker user deleted: its connection is closed and
/// every login refused) is a fault no retry mends: `/ready` says so with the broker's own
/// reason, and forgets it once the user is back and the engine reconnected.
#[actix_rt::test]
async fn ready_names_a_broker_refusal_that_appears_while_running() {
    let db = TestDb::new("readyrefused").await;
    let user = common::user::TestUser::without_write_on_denied();
    let url = user.amqp_url();
    let (engine, addr) = admin_engine(&db, |c| {
        c.broker.url = SecretUrl::new(url).into();
    })
    .await;
    common::eventually(20, "the engine connected", || {
        let connected = engine.broker_state() == courier::BrokerState::Connected;
        async move { connected.then_some(()) }
    })
    .await;
    user.delete();
    let reply = common::eventually(30, "/ready to name the refusal", || {
        let addr = addr.clone();
        async move {
            let reply = get(&addr, "/ready", None).await;
            reply.body.contains("broker_error").then_some(reply)
        }
    })
    .await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("json");
    let why = body["broker_error"].as_str().unwrap_or_default();
    assert!(why.contains("ACCESS_REFUSED"), "{body}");
    assert!(!why.contains(&user.password), "the password leaked: {body}");
    user.restore();
    // Polled, not awaited as an event: with two publishing connections, the first
    // BrokerConnected after `delete` can be the second connection's first one, opened just
    // before the user went away.
    let reply = common::eventually(60, "/ready to recover once the user is back", || {
        let addr = addr.clone();
        async move {
            let reply = get(&addr, "/ready", None).await;
            (reply.status == 200).then_some(reply)
        }
    })
    .await;
    assert!(!reply.body.contains("broker_error"), "{}", reply.body);
    engine.shutdown().await;
}
