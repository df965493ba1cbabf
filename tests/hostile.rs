//! Hostile rows, written the way any producer in any language can: through the SQL contract,
//! next to a thousand good ones. Each test ends with the liveness property: every good row
//! is confirmed and received, every bad row is in `dead_letters` with a reason naming the
//! problem (or was refused at INSERT by a named constraint), nothing stays `in_flight` or
//! `retrying`, and the engine still delivers new rows.

mod common;

use courier::testing::StoreInternals as _;
use std::{collections::HashMap, time::Duration};

use common::{assert_live, audit::audit, broker::TestBroker, eventually, TestDb};
use courier::{
    config::OnDeadLetter, testing::KeyScan, Engine, EngineHandle, OutboxMessage, Outcome, Status,
};
use diesel::sql_types::{Bytea, Integer, Nullable, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};
use rand::{rngs::StdRng, Rng, SeedableRng};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(180);

#[derive(diesel::QueryableByName)]
struct IdRow {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    id: Uuid,
}

/// Runs one INSERT … RETURNING id (`{s}` is the schema); the database's error if refused.
async fn insert(db: &TestDb, sql: &str) -> Result<Uuid, String> {
    let mut conn = db.raw().await;
    let sql = sql.replace("{s}", &format!("\"{}\"", db.schema));
    diesel::sql_query(sql)
        .get_result::<IdRow>(&mut conn)
        .await
        .map(|r| r.id)
        .map_err(|e| e.to_string())
}

fn reason(o: &Outcome) -> &str {
    match o {
        Outcome::DeadLettered(why) => why,
        Outcome::Confirmed => "confirmed",
    }
}

/// Waits for `good` and `bad` to settle: every good row confirmed, every bad one
/// dead-lettered with a reason holding each of `why`. Returns them all.
async fn good_confirmed_bad_dead_lettered(
    engine: &EngineHandle,
    good: &[Uuid],
    bad: &[Uuid],
    why: &[&str],
) -> Vec<Uuid> {
    let mut all = good.to_vec();
    all.extend(bad);
    let outcomes = engine
        .wait_for_all(&all, WAIT)
        .await
        .expect("every row settles");
    for id in good {
        assert_eq!(outcomes[id], Outcome::Confirmed, "{id}");
    }
    for id in bad {
        let reason = reason(&outcomes[id]);
        assert!(
            why.iter().all(|w| reason.contains(w)),
            "{id}: `{reason}` lacks {why:?}"
        );
    }
    all
}

#[actix_rt::test]
async fn unreadable_rows_are_dead_lettered_naming_the_column_and_pin_nothing() {
    let db = TestDb::new("unreadable").await;
    let broker = TestBroker::new("unreadable").await;
    let ex = &broker.exchange;
    // A row written before the attempts constraint existed (the engine must cope with what
    // an older schema let in): drop it in this test's schema only.
    db.exec("ALTER TABLE {s}.outbox DROP CONSTRAINT outbox_attempts_range")
        .await;
    db.exec("ALTER TABLE {s}.outbox DROP CONSTRAINT outbox_max_attempts_range")
        .await;
    let mut good = db.insert_sql(ex, 500, "routed.a{i}").await;
    // A budget over today's limit of 1,000: clamped, delivered, and no claim beside it fails.
    good.push(
        insert(
            &db,
            &format!("INSERT INTO {{s}}.outbox (exchange, routing_key, payload, max_attempts) VALUES ('{ex}', 'routed.m', 'm', 5000) RETURNING id"),
        )
        .await
        .expect("an old row's budget"),
    );
    let deep = format!("{}1{}", "[".repeat(300), "]".repeat(300));
    let cols = "INSERT INTO {s}.outbox (exchange, routing_key, payload";
    let bad = [
        (
            "headers",
            format!("{cols}, headers) VALUES ('{ex}', 'routed.x', 'x', '{{\"n\": 1e400}}') RETURNING id"),
        ),
        (
            "headers",
            format!("{cols}, headers) VALUES ('{ex}', 'routed.x', 'x', '{{\"d\": {deep}}}') RETURNING id"),
        ),
        (
            "created_at",
            format!("{cols}, created_at) VALUES ('{ex}', 'routed.x', 'x', 'infinity') RETURNING id"),
        ),
        (
            "created_at",
            format!("{cols}, created_at) VALUES ('{ex}', 'routed.x', 'x', '200000-01-01') RETURNING id"),
        ),
        (
            "max_payload_bytes",
            format!("{cols}) VALUES ('{ex}', 'routed.x', decode(repeat('ab', 4096), 'hex')) RETURNING id"),
        ),
        (
            "attempts exhausted",
            format!("{cols}, attempts) VALUES ('{ex}', 'routed.x', 'x', 2147483647) RETURNING id"),
        ),
    ];
    let mut bad_ids = Vec::new();
    for (problem, sql) in &bad {
        let id = insert(&db, sql).await.expect("a hostile row is valid SQL");
        bad_ids.push((*problem, id));
    }
    good.extend(db.insert_sql(ex, 500, "routed.b{i}").await);

    let mut config = db.engine_config();
    config.publisher.max_payload_bytes = 1024;
    let engine = Engine::start(config).await.expect("engine starts");
    let mut all = good.clone();
    all.extend(bad_ids.iter().map(|(_, id)| *id));
    let outcomes = engine
        .wait_for_all(&all, WAIT)
        .await
        .expect("every row settles");
    for id in &good {
        assert_eq!(outcomes[id], Outcome::Confirmed);
    }
    for (problem, id) in &bad_ids {
        let why = reason(&outcomes[id]);
        assert!(
            why.contains(problem),
            "{id}: `{why}` does not name {problem}"
        );
    }
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, good.len());
    assert_eq!(a.dead_lettered, bad_ids.len());
    assert_live(&db, &engine, ex).await;

    // What landed in dead_letters stays readable for the operator.
    let store = engine.store();
    let listed = store
        .dead_letters(None, 100)
        .await
        .expect("list dead letters");
    assert_eq!(listed.len(), bad_ids.len());
    // A window longer than any timestamp can reach back (`--since 1000000years`) lists all.
    let forever = Duration::from_secs(1_000_000 * 366 * 24 * 3600);
    let listed = store
        .dead_letters(Some(forever), 100)
        .await
        .expect("list dead letters since forever");
    assert_eq!(listed.len(), bad_ids.len());
    let huge = store
        .dead_letter(bad_ids[0].1)
        .await
        .expect("show")
        .expect("present");
    // Kept as the raw JSON text (serde_json cannot hold 10^400 as a number).
    assert!(
        matches!(&huge.headers, serde_json::Value::String(raw) if raw.contains("10000000000")),
        "{:?}",
        huge.headers
    );
    // `dead-letters show` prints that text as it is, saying why, not as an escaped string.
    let shown = common::courier_command()
        .args(["dead-letters", "show", &bad_ids[0].1.to_string()])
        .envs(db.process_env())
        .output()
        .expect("run courier");
    let shown = String::from_utf8_lossy(&shown.stdout);
    let line = shown
        .lines()
        .find(|l| l.starts_with("headers:"))
        .unwrap_or_else(|| panic!("no headers line: {shown}"));
    assert!(
        line.contains(r#"{"n": 10000000000"#)
            && line.ends_with("(as stored: JSON Courier cannot read)"),
        "{line}"
    );
    let infinite = store.dead_letter(bad_ids[2].1).await.unwrap().unwrap();
    assert_eq!(infinite.created_at, None);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn what_the_engine_cannot_honour_is_refused_at_insert_by_a_named_constraint() {
    let db = TestDb::new("constraints").await;
    for (column, constraint) in [
        // `_check` (older, ≥ 0 / > 0) or `_range` (the upper bounds).
        ("attempts", "outbox_attempts_"),
        ("max_attempts", "outbox_max_attempts_"),
    ] {
        for value in ["2147483647", "-1", "5000"] {
            if column == "attempts" && value == "5000" {
                continue; // a legitimate count (a long retry history)
            }
            let sql = format!(
                "INSERT INTO {{s}}.outbox (exchange, {column}) VALUES ('x', {value}) RETURNING id"
            );
            let err = insert(&db, &sql).await.expect_err("refused");
            assert!(err.contains(constraint), "{column} = {value}: {err}");
        }
    }
    // `failed` is the state of a dead letter, never of an outbox row.
    let err = insert(
        &db,
        "INSERT INTO {s}.outbox (exchange, status) VALUES ('x', 'failed') RETURNING id",
    )
    .await
    .expect_err("refused");
    assert!(err.contains("outbox_status_not_failed"), "{err}");
}

#[actix_rt::test]
async fn in_flight_rows_no_engine_holds_are_freed_and_pin_nothing() {
    let db = TestDb::new("strays").await;
    let broker = TestBroker::new("strays").await;
    let ex = &broker.exchange;
    let mut config = db.engine_config();
    config.scheduler.lease_duration = Duration::from_secs(30);
    let engine = Engine::start(config).await.expect("engine starts");
    let me = engine.engine_id().to_string();
    let mut good = db.insert_sql(ex, 300, "routed.a{i}").await;
    let cols =
        "INSERT INTO {s}.outbox (exchange, routing_key, payload, status, locked_by, locked_until";
    // What a producer (or a hand edit) can leave in flight with no lease that would ever
    // bring it back. None of them may wait for its written lease.
    let leases = [
        "NULL, NULL".to_string(),
        "NULL, 'infinity'".to_string(),
        "'bogus', '2999-01-01'".to_string(),
        "'bogus', now() + interval '10 minutes'".to_string(),
        format!("'{me}', now() + interval '1 day'"),
    ];
    let mut strays = Vec::new();
    for (i, lease) in leases.iter().enumerate() {
        let sql = format!(
            "{cols}) VALUES ('{ex}', 'routed.s{i}', 'x', 'in_flight', {lease}) RETURNING id"
        );
        strays.push(insert(&db, &sql).await.expect("a stray is valid SQL"));
        // The same at the head of a key, with rows behind it.
        let sql = format!(
            "{cols}, ordering_key) VALUES ('{ex}', 'routed.k{i}', 'x', 'in_flight', {lease}, 'stray-{i}') RETURNING id"
        );
        strays.push(insert(&db, &sql).await.expect("keyed stray"));
        for j in 0..3 {
            let sql = format!(
                "INSERT INTO {{s}}.outbox (exchange, routing_key, payload, ordering_key)
                 VALUES ('{ex}', 'routed.k{i}.{j}', 'x', 'stray-{i}') RETURNING id"
            );
            good.push(insert(&db, &sql).await.expect("keyed row"));
        }
    }
    // A key's rows committed out of `seq` order, then a crash: its expired row sits behind
    // an earlier waiting row, and a key with a row in flight gives no head.
    let first = insert(
        &db,
        &format!(
            "INSERT INTO {{s}}.outbox (exchange, routing_key, payload, ordering_key)
             VALUES ('{ex}', 'routed.late', 'x', 'behind') RETURNING id"
        ),
    )
    .await
    .expect("first of its key");
    let behind = insert(
        &db,
        &format!(
            "{cols}, attempts, ordering_key) VALUES ('{ex}', 'routed.behind', 'x', 'in_flight',
             'gone', now() - interval '1 minute', 1, 'behind') RETURNING id"
        ),
    )
    .await
    .expect("expired row behind it");
    good.extend([first, behind]);
    good.extend(db.insert_sql(ex, 300, "routed.b{i}").await);
    engine.nudge();
    let mut all = good.clone();
    all.extend(&strays);
    // Well under every lease written above but the expired one.
    let outcomes = engine
        .wait_for_all(&all, Duration::from_secs(60))
        .await
        .expect("every row settles long before its written lease");
    for id in &all {
        assert_eq!(outcomes[id], Outcome::Confirmed, "{id}");
    }
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
    assert_live(&db, &engine, ex).await;
    engine.shutdown().await;
}

/// `retrying` rows a producer (or a hand) set due further out than any backoff: no engine
/// writes them, and they would wait for ever. They are made due; a `pending` row due as far
/// out is a delayed message and stays.
#[actix_rt::test]
async fn retrying_rows_due_past_any_backoff_are_made_due() {
    let db = TestDb::new("late").await;
    let broker = TestBroker::new("late").await;
    let ex = &broker.exchange;
    let engine = Engine::start(db.engine_config())
        .await
        .expect("engine starts");
    let mut good = db.insert_sql(ex, 200, "routed.a{i}").await;
    let cols = "INSERT INTO {s}.outbox (exchange, routing_key, payload, status, next_attempt_at";
    let mut late = Vec::new();
    for (i, due) in ["'infinity'", "'294276-01-01'", "now() + interval '1 year'"]
        .iter()
        .enumerate()
    {
        let sql =
            format!("{cols}) VALUES ('{ex}', 'routed.r{i}', 'x', 'retrying', {due}) RETURNING id");
        late.push(insert(&db, &sql).await.expect("a late row is valid SQL"));
        // The same at the head of a key, with rows behind it.
        let sql = format!(
            "{cols}, ordering_key) VALUES ('{ex}', 'routed.k{i}', 'x', 'retrying', {due}, 'late-{i}') RETURNING id"
        );
        late.push(insert(&db, &sql).await.expect("keyed late row"));
        for j in 0..3 {
            let sql = format!(
                "INSERT INTO {{s}}.outbox (exchange, routing_key, payload, ordering_key)
                 VALUES ('{ex}', 'routed.k{i}.{j}', 'x', 'late-{i}') RETURNING id"
            );
            good.push(insert(&db, &sql).await.expect("keyed row"));
        }
    }
    let delayed = insert(
        &db,
        &format!("{cols}) VALUES ('{ex}', 'routed.d', 'x', 'pending', 'infinity') RETURNING id"),
    )
    .await
    .expect("a delayed row");
    good.extend(db.insert_sql(ex, 200, "routed.b{i}").await);
    engine.nudge();
    let mut all = good.clone();
    all.extend(&late);
    let outcomes = engine
        .wait_for_all(&all, Duration::from_secs(60))
        .await
        .expect("every late row is made due within a minute, and its key goes on");
    for id in &all {
        assert_eq!(outcomes[id], Outcome::Confirmed, "{id}");
    }
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
    assert_eq!(
        db.count(Status::Pending).await,
        1,
        "the delayed row {delayed} stays pending where its producer put it"
    );
    engine.shutdown().await;
}

/// A producer's table that references outbox rows (the README says not to): the one row it
/// references cannot leave the outbox, and must not hold back the dead letters beside it.
#[actix_rt::test]
async fn a_row_a_foreign_key_holds_in_the_outbox_holds_up_no_other_dead_letter() {
    let db = TestDb::new("fkey").await;
    let broker = TestBroker::new("fkey").await;
    let ex = &broker.exchange;
    db.exec(
        "CREATE TABLE {s}.orders (id serial PRIMARY KEY, event uuid REFERENCES {s}.outbox (id))",
    )
    .await;
    let mut bad = Vec::new();
    for i in 0..6 {
        let sql = format!(
            "INSERT INTO {{s}}.outbox (exchange, routing_key, payload, max_attempts)
             VALUES ('{ex}.missing', 'routed.m{i}', 'x', 1) RETURNING id"
        );
        bad.push(
            insert(&db, &sql)
                .await
                .expect("a row to a missing exchange"),
        );
    }
    let held = bad.remove(0);
    db.exec(&format!(
        "INSERT INTO {{s}}.orders (event) VALUES ('{held}')"
    ))
    .await;
    let good = db.insert_sql(ex, 200, "routed.a{i}").await;
    let engine = Engine::start(db.engine_config())
        .await
        .expect("engine starts");
    let why = ["does not exist"];
    let all = good_confirmed_bad_dead_lettered(&engine, &good, &bad, &why).await;
    // Once nothing references it any more, it follows.
    db.exec("DELETE FROM {s}.orders").await;
    let outcomes = engine
        .wait_for_all(&[held], WAIT)
        .await
        .expect("the row once referenced");
    assert!(reason(&outcomes[&held]).contains("does not exist"));
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, good.len());
    assert_live(&db, &engine, ex).await;
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_forged_registry_beat_from_the_future_holds_no_row_and_breaks_no_listing() {
    let db = TestDb::new("forged").await;
    let broker = TestBroker::new("forged").await;
    let ex = &broker.exchange;
    // A registry row no engine wrote (each beat is the database's now()), holding a row
    // whose lease never ends: only declaring it dead brings the row back.
    db.exec(
        "INSERT INTO {s}.engines (id, host, pid, version, state, heartbeat_at, started_at)
         VALUES ('forged', 'nowhere', 1, '0.0.1', 'running', 'infinity', '-infinity')",
    )
    .await;
    let held = insert(
        &db,
        &format!(
            "INSERT INTO {{s}}.outbox (exchange, routing_key, payload, status, locked_by, locked_until)
             VALUES ('{ex}', 'routed.f', 'x', 'in_flight', 'forged', 'infinity') RETURNING id"
        ),
    )
    .await
    .expect("a row the forged engine holds");
    let engine = Engine::start(db.engine_config())
        .await
        .expect("engine starts");
    let outcome = engine
        .wait_for(held, WAIT)
        .await
        .expect("the forged engine's row is taken over");
    assert_eq!(outcome, Outcome::Confirmed);
    let listed = engine
        .store()
        .engines(Duration::from_secs(5))
        .await
        .expect("the registry lists");
    assert!(
        listed
            .iter()
            .any(|e| e.id == "forged" && e.state == "dead" && e.since_beat_ms < -1_000),
        "dead, its beat read as dated in the future: {listed:?}"
    );
    let out = common::courier_command()
        .args(["engines"])
        .envs(db.process_env())
        .output()
        .expect("courier engines");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("forged") && l.contains("in the future")),
        "{table}"
    );
    let out = common::courier_command()
        .args(["engines", "--json"])
        .envs(db.process_env())
        .output()
        .expect("courier engines");
    assert!(
        out.status.success(),
        "courier engines: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_live(&db, &engine, ex).await;
    engine.shutdown().await;
}

#[derive(diesel::QueryableByName)]
struct Waiting {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Backends of this schema waiting on a lock: statements the engine gave up on that the
/// server kept running would show here, one more per heartbeat.
async fn waiting_on_locks(db: &TestDb) -> i64 {
    let sql = format!(
        "SELECT count(*) AS n FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND query LIKE '%\"{}\"%'",
        db.schema
    );
    diesel::sql_query(sql)
        .get_result::<Waiting>(&mut db.raw().await)
        .await
        .expect("pg_stat_activity")
        .n
}

#[actix_rt::test]
async fn a_producer_lock_on_a_row_to_rescue_holds_neither_the_heartbeat_nor_other_rows() {
    use diesel_async::SimpleAsyncConnection;
    let db = TestDb::new("prodlock").await;
    let broker = TestBroker::new("prodlock").await;
    let ex = &broker.exchange;
    // An engine that died holding rows (its beat a minute old), and a stray row no lease
    // brings back: both kinds are freed by the heartbeat's looks, which must not wait for
    // a producer that holds one of them locked.
    db.exec(
        "INSERT INTO {s}.engines (id, host, pid, version, state, heartbeat_at, started_at)
         VALUES ('gone', 'elsewhere', 9, '0.0.1', 'running', now() - interval '1 minute',
                 now() - interval '2 minutes')",
    )
    .await;
    let cols =
        "INSERT INTO {s}.outbox (exchange, routing_key, payload, status, locked_by, locked_until)";
    let mut held = Vec::new();
    for i in 0..3 {
        let sql = format!(
            "{cols} VALUES ('{ex}', 'routed.h{i}', 'x', 'in_flight', 'gone', now() + interval '10 minutes') RETURNING id"
        );
        held.push(insert(&db, &sql).await.expect("a dead engine's row"));
    }
    let stray = insert(
        &db,
        &format!("{cols} VALUES ('{ex}', 'routed.s', 'x', 'in_flight', NULL, NULL) RETURNING id"),
    )
    .await
    .expect("a stray row");
    let mut producer = db.raw().await;
    producer
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM \"{s}\".outbox WHERE id IN ('{}', '{stray}') FOR UPDATE",
            held[0],
            s = db.schema
        ))
        .await
        .expect("the producer's lock");

    let engine = Engine::start(db.engine_config())
        .await
        .expect("engine starts");
    let mut all = held[1..].to_vec();
    // Beats go on (one a second) while the lock is held, through two looks for strays
    // (every tenth beat): rows keep flowing and no statement is left waiting.
    for round in 0..12 {
        let batch = db
            .insert_sql(ex, 25, &format!("routed.r{round}.{{i}}"))
            .await;
        engine.nudge();
        let outcomes = engine
            .wait_for_all(&batch, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("round {round}: rows stopped beside the lock: {e}"));
        assert!(batch.iter().all(|id| outcomes[id] == Outcome::Confirmed));
        assert_eq!(waiting_on_locks(&db).await, 0, "round {round}");
        all.extend(batch);
        tokio::time::sleep(Duration::from_secs(1)).await; // pacing: one round per beat
    }
    let outcomes = engine
        .wait_for_all(&held[1..], WAIT)
        .await
        .expect("the dead engine's other rows");
    assert!(held[1..]
        .iter()
        .all(|id| outcomes[id] == Outcome::Confirmed));

    // Once the producer lets go, the rows it held are freed by a later look.
    producer.batch_execute("COMMIT").await.expect("commit");
    let freed = [held[0], stray];
    let outcomes = engine
        .wait_for_all(&freed, Duration::from_secs(30))
        .await
        .expect("the rows the producer had locked");
    assert!(freed.iter().all(|id| outcomes[id] == Outcome::Confirmed));
    all.extend(freed);
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
    assert_live(&db, &engine, ex).await;
    engine.shutdown().await;
}

/// Locks one row the engine has in flight, from a transaction left open (a producer's
/// `SELECT … FOR UPDATE`, an operator's `UPDATE` not yet committed): polls until it catches
/// one. Returns the connection holding the lock and the row, or `None` if none was caught.
async fn lock_a_row_in_flight(
    db: &TestDb,
    within: Duration,
) -> Option<(diesel_async::AsyncPgConnection, Uuid)> {
    use diesel_async::SimpleAsyncConnection;
    let mut conn = db.raw().await;
    let sql = format!(
        "SELECT id FROM \"{}\".outbox WHERE status = 'in_flight' LIMIT 1 FOR UPDATE SKIP LOCKED",
        db.schema
    );
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        conn.batch_execute("BEGIN").await.expect("begin");
        let row = diesel::sql_query(&sql)
            .get_result::<IdRow>(&mut conn)
            .await
            .ok();
        if let Some(row) = row {
            return Some((conn, row.id));
        }
        conn.batch_execute("ROLLBACK").await.expect("rollback");
    }
    None
}

#[actix_rt::test]
async fn a_lock_on_a_row_in_flight_holds_only_that_rows_outcome() {
    use diesel_async::SimpleAsyncConnection;
    let db = TestDb::new("inflightlock").await;
    let broker = TestBroker::new("inflightlock").await;
    let ex = &broker.exchange;
    let engine = Engine::start(db.engine_config())
        .await
        .expect("engine starts");
    let mut all = Vec::new();
    let mut caught = None;
    for round in 0..10 {
        all.extend(
            db.insert_sql(ex, 3_000, &format!("routed.a{round}.{{i}}"))
                .await,
        );
        engine.nudge();
        caught = lock_a_row_in_flight(&db, Duration::from_secs(10)).await;
        if caught.is_some() {
            break;
        }
    }
    let (mut producer, locked) = caught.expect("caught a row in flight to lock");
    // Rows go on beside it, those in flight with it and new ones, while it stays locked.
    all.extend(db.insert_sql(ex, 3_000, "routed.b.{i}").await);
    engine.nudge();
    let others: Vec<Uuid> = all.iter().copied().filter(|id| *id != locked).collect();
    let outcomes = engine
        .wait_for_all(&others, Duration::from_secs(60))
        .await
        .expect("every other row settles while one is locked");
    assert!(others.iter().all(|id| outcomes[id] == Outcome::Confirmed));
    // A write waits for a lock a second at most, then goes on without the row.
    eventually(5, "no statement left waiting on the lock", || async {
        (waiting_on_locks(&db).await == 0).then_some(())
    })
    .await;
    let outcome = db.store().await.outcomes(&[locked]).await.expect("outcome");
    assert!(
        !outcome.contains_key(&locked),
        "the locked row's outcome waits for the lock: {outcome:?}"
    );

    // Once the lock is let go, the row's outcome is written.
    producer.batch_execute("COMMIT").await.expect("commit");
    let outcomes = engine
        .wait_for_all(&[locked], Duration::from_secs(30))
        .await
        .expect("the row that was locked");
    assert_eq!(outcomes[&locked], Outcome::Confirmed);
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, all.len());
    assert_live(&db, &engine, ex).await;
    engine.shutdown().await;
}

#[actix_rt::test]
async fn attempts_written_at_or_past_the_budget_are_dead_lettered_unpublished() {
    let db = TestDb::new("preset").await;
    let broker = TestBroker::new("preset").await;
    let ex = &broker.exchange;
    let mut good = db.insert_sql(ex, 300, "routed.a{i}").await;
    let cols = "INSERT INTO {s}.outbox (exchange, routing_key, payload, attempts";
    let mut bad = Vec::new();
    // The top of `outbox_attempts_range`: the claim's count must stay inside it, or every
    // claim of its kind fails on the constraint.
    for (attempts, key) in [(1_000_000, "NULL"), (3, "NULL"), (1_000_000, "'preset'")] {
        let sql = format!(
            "{cols}, ordering_key) VALUES ('{ex}', 'routed.x', 'x', {attempts}, {key}) RETURNING id"
        );
        bad.push(insert(&db, &sql).await.expect("allowed by the constraint"));
    }
    good.extend(db.insert_sql(ex, 300, "routed.b{i}").await);
    let mut config = db.engine_config();
    config.retry.max_attempts = 3;
    config.ordering.on_dead_letter = OnDeadLetter::Continue;
    let engine = Engine::start(config).await.expect("engine starts");
    let why = ["attempts exhausted", "before this claim"];
    let all = good_confirmed_bad_dead_lettered(&engine, &good, &bad, &why).await;
    assert_eq!(engine.counters().claim_failures, 0, "a claim failed");
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, good.len());
    assert_eq!(a.received, good.len(), "an exhausted row was published");
    assert_live(&db, &engine, ex).await;
    engine.shutdown().await;
}

#[actix_rt::test]
async fn routing_headers_of_the_wrong_type_never_reach_the_channel() {
    let db = TestDb::new("ccheader").await;
    let broker = TestBroker::new("ccheader").await;
    let ex = &broker.exchange;
    let mut good = db.insert_sql(ex, 300, "routed.a{i}").await;
    let mut bad = Vec::new();
    for headers in [
        r#"{"CC": 5}"#,
        r#"{"CC": "x"}"#,
        r#"{"BCC": {"a": 1}}"#,
        r#"{"CC": null}"#,
    ] {
        let sql = format!(
            "INSERT INTO {{s}}.outbox (exchange, routing_key, payload, headers)
             VALUES ('{ex}', 'routed.cc', 'x', '{headers}') RETURNING id"
        );
        bad.push(insert(&db, &sql).await.expect("valid jsonb"));
        good.extend(db.insert_sql(ex, 100, "routed.g{i}").await);
    }
    let engine = Engine::start(db.engine_config())
        .await
        .expect("engine starts");
    let why = ["can never be published", "array of routing keys"];
    let all = good_confirmed_bad_dead_lettered(&engine, &good, &bad, &why).await;
    let counters = engine.counters();
    assert_eq!(
        counters.channel_lost, 0,
        "a publishing channel was closed: {counters:?}"
    );
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.confirmed, good.len());
    assert_eq!(a.duplicates, 0, "good rows published twice");
    assert_live(&db, &engine, ex).await;
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_direct_reply_to_key_never_reaches_the_connection() {
    let db = TestDb::new("replyto").await;
    let broker = TestBroker::new("replyto").await;
    let ex = &broker.exchange;
    let mut good = db.insert_sql(ex, 300, "routed.a{i}").await;
    let mut bad = Vec::new();
    // RabbitMQ decodes the suffix as the requester's channel; one it cannot decode closes
    // the whole connection (541 INTERNAL_ERROR) without naming the message.
    for key in [
        "amq.rabbitmq.reply-to.g2dkABNyYWJiaXRAbG9jYWxob3N0AAAAAAAAAAAAAAAAAA==.garbage",
        "amq.rabbitmq.reply-to",
    ] {
        let sql = format!(
            "INSERT INTO {{s}}.outbox (exchange, routing_key, payload)
             VALUES ('', '{key}', 'x') RETURNING id"
        );
        bad.push(insert(&db, &sql).await.expect("valid row"));
        good.extend(db.insert_sql(ex, 300, "routed.g{i}").await);
    }
    // RabbitMQ routes on CC and BCC as on extra routing keys: the same key there does the same.
    for header in ["CC", "BCC"] {
        let sql = format!(
            "INSERT INTO {{s}}.outbox (exchange, routing_key, payload, headers)
             VALUES ('', 'plain', 'x', '{{\"{header}\": [\"q\", \"amq.rabbitmq.reply-to.a.b\"]}}')
             RETURNING id"
        );
        bad.push(insert(&db, &sql).await.expect("valid row"));
        good.extend(db.insert_sql(ex, 300, "routed.c{i}").await);
    }
    let engine = Engine::start(db.engine_config())
        .await
        .expect("engine starts");
    let why = ["can never be published", "direct reply-to"];
    let all = good_confirmed_bad_dead_lettered(&engine, &good, &bad, &why).await;
    let counters = engine.counters();
    assert_eq!(
        counters.reconnects, 0,
        "a connection was lost: {counters:?}"
    );
    let a = audit(&db, &broker, &broker.queue, &all).await;
    assert_eq!(a.duplicates, 0, "good rows published twice");
    assert_live(&db, &engine, ex).await;
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_row_claimed_but_never_handed_on_is_not_renewed_and_comes_back() {
    let db = TestDb::new("unheld").await;
    let broker = TestBroker::new("unheld").await;
    let mut config = db.engine_config();
    config.scheduler.lease_duration = Duration::from_secs(3);
    let engine = Engine::start(config).await.expect("engine starts");
    // A row this engine's id holds in the database but not in the engine: what a claim
    // whose answer was lost leaves behind. Its lease must lapse, not be renewed for ever.
    let id = insert(
        &db,
        &format!(
            "INSERT INTO {{s}}.outbox (exchange, routing_key, payload, status, attempts,
                                       locked_by, locked_until)
             VALUES ('{}', 'routed.lost', 'x', 'in_flight', 1, '{}', now() + interval '2 s')
             RETURNING id",
            broker.exchange,
            engine.engine_id()
        ),
    )
    .await
    .expect("insert");
    let outcome = engine.wait_for(id, Duration::from_secs(30)).await;
    assert_eq!(outcome.expect("settles"), Outcome::Confirmed);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_reused_id_dead_lettered_twice_keeps_both_failures_and_blocks_nothing() {
    let db = TestDb::new("reused").await;
    let broker = TestBroker::new("reused").await;
    let engine = Engine::start(db.engine_config()).await.expect("engine");
    let missing = format!("{}.missing", broker.exchange);
    let id = Uuid::new_v4();
    let first = OutboxMessage::new(&missing, "k", b"first".to_vec())
        .with_id(id)
        .with_max_attempts(1);
    engine.store().enqueue(&first).await.unwrap();
    engine.nudge();
    let outcome = engine.wait_for(id, WAIT).await.unwrap();
    assert!(matches!(outcome, Outcome::DeadLettered(_)), "{outcome:?}");

    let second = OutboxMessage::new(&missing, "k", b"second".to_vec())
        .with_id(id)
        .with_max_attempts(1);
    engine.store().enqueue(&second).await.unwrap();
    engine.nudge();
    let store = db.store().await;
    let superseded = eventually(60, "the first failure superseded", || async {
        superseded_payloads(&db, id).await.filter(|p| !p.is_empty())
    })
    .await;
    assert_eq!(superseded, vec![b"first".to_vec()]);
    let now = store
        .dead_letter(id)
        .await
        .unwrap()
        .expect("second failure");
    assert_eq!(now.payload, b"second");

    // Dead-lettering goes on for every other row.
    let other = OutboxMessage::new(&missing, "k", b"other".to_vec()).with_max_attempts(1);
    engine.store().enqueue(&other).await.unwrap();
    engine.nudge();
    let outcome = engine.wait_for(other.id, WAIT).await.unwrap();
    assert!(matches!(outcome, Outcome::DeadLettered(_)), "{outcome:?}");

    // A requeue of an id that is in the outbox again leaves the dead letter where it is.
    let third = OutboxMessage::new(&missing, "k", b"third".to_vec())
        .with_id(id)
        .with_max_attempts(1);
    engine.shutdown().await;
    store.enqueue(&third).await.unwrap();
    assert!(store.requeue_dead_letters(&[id]).await.unwrap().is_empty());
    assert_eq!(
        store.dead_letter(id).await.unwrap().unwrap().payload,
        b"second"
    );
    // Once that copy is delivered it only waits for retention: it no longer holds the
    // requeue back (a key blocked behind the dead letter would wait as long).
    db.exec(&format!(
        "UPDATE {{s}}.outbox SET status = 'confirmed', confirmed_at = now() WHERE id = '{id}'"
    ))
    .await;
    assert_eq!(store.requeue_dead_letters(&[id]).await.unwrap(), vec![id]);
    assert!(store.dead_letter(id).await.unwrap().is_none());
}

async fn superseded_payloads(db: &TestDb, id: Uuid) -> Option<Vec<Vec<u8>>> {
    #[derive(diesel::QueryableByName)]
    struct P {
        #[diesel(sql_type = Bytea)]
        payload: Vec<u8>,
    }
    let mut conn = db.raw().await;
    let rows: Vec<P> = diesel::sql_query(format!(
        "SELECT payload FROM \"{}\".dead_letters_superseded WHERE id = $1",
        db.schema
    ))
    .bind::<diesel::sql_types::Uuid, _>(id)
    .load(&mut conn)
    .await
    .ok()?;
    Some(rows.into_iter().map(|r| r.payload).collect())
}

/// Every field of `OutboxMessage`, through every way in: `enqueue_in` inside the
/// application's transaction, `Store::enqueue`, `Store::enqueue_many`, and the SQL contract.
#[actix_rt::test]
async fn every_field_round_trips_through_every_enqueue_path() {
    let db = TestDb::new("roundtrip").await;
    let store = db.store().await;
    let full = |key: &str| {
        OutboxMessage::new("orders", "order.created", vec![0u8, 1, 255, b'x'])
            .with_content_type("application/octet-stream")
            .with_header("tenant", "a")
            .with_header("nested", serde_json::json!({"n": [1, 2.5, null, true]}))
            .with_max_attempts(7)
            .with_ordering_key(key)
    };
    let in_tx = full("path-tx");
    let mut conn = db.raw().await;
    let schema = db.schema.clone();
    conn.transaction::<_, courier::StoreError, _>(async |tx| {
        courier::enqueue_in(tx, &schema, &in_tx).await
    })
    .await
    .expect("enqueue in a transaction");
    let single = full("path-one");
    store.enqueue(&single).await.unwrap();
    let many = [full("path-many-1"), full("path-many-2")];
    store.enqueue_many(&many).await.unwrap();
    let contract = full("path-sql");
    let mut conn = db.raw().await;
    diesel::sql_query(format!(
        "INSERT INTO \"{}\".outbox (id, exchange, routing_key, payload, headers, content_type,
                                    max_attempts, ordering_key)
         VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)",
        db.schema
    ))
    .bind::<diesel::sql_types::Uuid, _>(contract.id)
    .bind::<Text, _>(&contract.exchange)
    .bind::<Text, _>(&contract.routing_key)
    .bind::<Bytea, _>(&contract.payload)
    .bind::<Text, _>(contract.headers.to_string())
    .bind::<Nullable<Text>, _>(contract.content_type.as_deref())
    .bind::<Nullable<Integer>, _>(contract.max_attempts.map(|m| m as i32))
    .bind::<Nullable<Text>, _>(contract.ordering_key.as_deref())
    .execute(&mut conn)
    .await
    .expect("SQL contract insert");

    let sent = [in_tx, single, many[0].clone(), many[1].clone(), contract];
    let claimed = store
        .claim_keyed("rt", 10, WAIT, &KeyScan::default())
        .await
        .expect("claim");
    let got: HashMap<Uuid, OutboxMessage> =
        claimed.messages.into_iter().map(|m| (m.id, m)).collect();
    assert_eq!(
        got.len(),
        sent.len(),
        "every keyed row is a head of its own key"
    );
    for m in &sent {
        let back = got.get(&m.id).expect("claimed back");
        let mut expected = m.clone();
        expected.attempts = 1; // counted by the claim
        expected.created_at = back.created_at; // the database's clock
        assert_eq!(back, &expected, "{:?}", m.ordering_key);
    }
}

#[actix_rt::test]
async fn claimed_payload_bytes_stay_within_the_byte_budget() {
    let db = TestDb::new("bytes").await;
    let broker = TestBroker::new("bytes").await;
    let size = 256 * 1024;
    let rows: Vec<OutboxMessage> = (0..40)
        .map(|i| OutboxMessage::new(&broker.exchange, format!("routed.{i}"), vec![b'p'; size]))
        .collect();
    db.store().await.enqueue_many(&rows).await.unwrap();
    let mut config = db.engine_config();
    config.publisher.max_in_flight_bytes = 1024 * 1024;
    let engine = Engine::start(config).await.expect("engine");
    let ids: Vec<Uuid> = rows.iter().map(|m| m.id).collect();
    let outcomes = engine.wait_for_all(&ids, WAIT).await.expect("all settle");
    assert!(outcomes.values().all(|o| *o == Outcome::Confirmed));
    let peak = engine.counters().peak_held_bytes;
    assert!(peak >= size as u64, "nothing measured: {peak}");
    // The budget, plus at most the one message a claim always takes.
    assert!(
        peak <= (1024 * 1024 + size) as u64,
        "held {peak} bytes at once with a 1 MiB budget"
    );
    audit(&db, &broker, &broker.queue, &ids).await;
    engine.shutdown().await;
}

/// A seeded generator of rows any producer could write; `COURIER_HOSTILE_ROWS` sets how many
/// (200 by default; a longer run: `COURIER_HOSTILE_ROWS=5000`), `COURIER_HOSTILE_SEED` replays
/// a run (each run prints its seed).
#[actix_rt::test]
async fn random_hostile_rows_never_break_liveness() {
    let n: usize = std::env::var("COURIER_HOSTILE_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("COURIER_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("random hostile rows: COURIER_HOSTILE_SEED={seed} COURIER_HOSTILE_ROWS={n}");
    let mut rng = StdRng::seed_from_u64(seed);
    let db = TestDb::new("random").await;
    let mut broker = TestBroker::new("random").await;
    // Publishing to an internal exchange is refused with a channel close (403).
    let internal = broker.internal_exchange().await;
    let mut good = db.insert_sql(&broker.exchange, 500, "routed.g{i}").await;
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut conn = db.raw().await;
    for _ in 0..n {
        let row = RandomRow::new(&mut rng, &broker.exchange, &internal);
        match row.insert(&mut conn, &db.schema).await {
            Ok(id) => accepted.push(id),
            Err(e) => {
                assert!(
                    e.contains("constraint")
                        || e.contains("invalid")
                        || e.contains("out of range")
                        || e.contains("unsupported"),
                    "refused without a clear message: {e}"
                );
                refused += 1;
            }
        }
    }
    good.extend(db.insert_sql(&broker.exchange, 500, "routed.h{i}").await);
    eprintln!(
        "random hostile rows: {} accepted, {refused} refused at INSERT",
        accepted.len()
    );

    let mut config = db.engine_config();
    config.publisher.max_payload_bytes = 4096;
    config.ordering.on_dead_letter = OnDeadLetter::Continue;
    let engine = Engine::start(config).await.expect("engine");
    let mut all = good.clone();
    all.extend(&accepted);
    let outcomes = engine
        .wait_for_all(&all, WAIT)
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: rows did not settle: {e}"));
    for id in &good {
        assert_eq!(
            outcomes[id],
            Outcome::Confirmed,
            "seed {seed}: good row {id}"
        );
    }
    let mut dead = 0;
    for id in &accepted {
        if let Outcome::DeadLettered(why) = &outcomes[id] {
            assert!(
                !why.is_empty(),
                "seed {seed}: {id} dead-lettered without a reason"
            );
            dead += 1;
        }
    }
    eprintln!(
        "random hostile rows: {} confirmed, {dead} dead-lettered, counters {:?}",
        accepted.len() - dead,
        engine.counters()
    );
    let a = audit(&db, &broker, &broker.queue, &good).await;
    assert_eq!(a.confirmed, good.len());
    assert_live(&db, &engine, &broker.exchange).await;
    assert_eq!(
        db.count(Status::Pending).await,
        0,
        "seed {seed}: rows left pending"
    );
    let listed = engine.store().dead_letters(None, 10_000).await;
    assert!(
        listed.is_ok(),
        "seed {seed}: dead letters unreadable: {listed:?}"
    );
    engine.shutdown().await;
}

/// One row as a careless or hostile producer might write it.
struct RandomRow {
    exchange: String,
    routing_key: String,
    payload: Vec<u8>,
    headers: String,
    content_type: Option<String>,
    created_at: Option<&'static str>,
    attempts: i32,
    max_attempts: Option<i32>,
    ordering_key: Option<String>,
    /// A status the engine writes (or never does), with the lease columns beside it.
    status: Option<(&'static str, Option<&'static str>, Option<&'static str>)>,
}

impl RandomRow {
    fn new(rng: &mut StdRng, exchange: &str, internal: &str) -> RandomRow {
        let exchange = match rng.gen_range(0..12) {
            0 => format!("{exchange}.missing"),
            1 => "e".repeat(300),
            2 => String::new(),
            3 => "amq.direct".into(),
            4 => internal.to_string(),
            _ => exchange.to_string(),
        };
        let routing_key = match rng.gen_range(0..9) {
            0 => "k".repeat(300),
            1 => "routed.ünïcødé.\u{202e}".into(),
            2 => String::new(),
            // With the default exchange (''): direct reply-to, a suffix RabbitMQ cannot read.
            3 => "amq.rabbitmq.reply-to.g2dkABNyYWJiaXRAbG9jYWxob3N0AAAAAAAAAAAAAAAAAA==.x".into(),
            _ => format!("routed.r{}", rng.gen::<u16>()),
        };
        let payload = (0..rng.gen_range(0..6000)).map(|_| rng.gen()).collect();
        let headers = match rng.gen_range(0..8) {
            0 => random_json(rng, 0).to_string(),
            1 => "[1,2]".into(),
            2 => "\"text\"".into(),
            3 => "null".into(),
            // A header frame over RabbitMQ's frame_max (128 KiB) would close the connection.
            4 => format!(
                "{{\"big\": \"{}\"}}",
                "b".repeat(rng.gen_range(1..300) * 1024)
            ),
            // RabbitMQ routes on CC and BCC and closes the channel unless they are arrays.
            5 => [
                "{\"CC\": 5}",
                "{\"BCC\": \"k\"}",
                "{\"CC\": [\"routed.cc\"]}",
                "{\"CC\": null}",
            ][rng.gen_range(0..4)]
            .to_string(),
            // With the default exchange, a direct reply-to key routed on through CC.
            7 => r#"{"CC": ["amq.rabbitmq.reply-to.a.b"]}"#.into(),
            _ => format!("{{{}}}", random_members(rng, 0)),
        };
        let content_type = match rng.gen_range(0..5) {
            0 => Some("t".repeat(300)),
            1 => Some("text/plain".into()),
            _ => None,
        };
        let created_at = match rng.gen_range(0..12) {
            0 => Some("infinity"),
            1 => Some("-infinity"),
            2 => Some("200000-01-01"),
            3 => Some("4000-01-01 BC"),
            4 => Some("1900-01-01"),
            _ => None,
        };
        let attempts = match rng.gen_range(0..12) {
            0 => i32::MAX,
            1 => -1,
            2 => rng.gen_range(1..5),
            3 => 1_000_000,
            _ => 0,
        };
        let max_attempts = match rng.gen_range(0..8) {
            0 => Some(0),
            1 => Some(i32::MAX),
            2 => Some(rng.gen_range(1..4)),
            _ => None,
        };
        let ordering_key = match rng.gen_range(0..6) {
            0 => Some(format!("key-{}", rng.gen_range(0..3))),
            _ => None,
        };
        let status = match rng.gen_range(0..24) {
            0 => Some(("in_flight", None, None)),
            1 => Some(("in_flight", None, Some("infinity"))),
            2 => Some(("in_flight", Some("bogus"), Some("2999-01-01"))),
            3 => Some(("in_flight", Some("gone"), Some("2000-01-01"))),
            4 => Some(("confirmed", None, None)),
            5 => Some(("failed", None, None)),
            6 => Some(("retrying", None, None)),
            _ => None,
        };
        RandomRow {
            exchange,
            routing_key,
            payload,
            headers,
            content_type,
            created_at,
            attempts,
            max_attempts,
            ordering_key,
            status,
        }
    }

    async fn insert(
        &self,
        conn: &mut diesel_async::AsyncPgConnection,
        schema: &str,
    ) -> Result<Uuid, String> {
        diesel::sql_query(format!(
            "INSERT INTO \"{schema}\".outbox (exchange, routing_key, payload, headers,
                 content_type, created_at, attempts, max_attempts, ordering_key, status,
                 locked_by, locked_until)
             VALUES ($1, $2, $3, $4::jsonb, $5, coalesce($6::timestamptz, now()), $7, $8, $9,
                     coalesce($10, 'pending')::\"{schema}\".outbox_status, $11, $12::timestamptz)
             RETURNING id"
        ))
        .bind::<Text, _>(&self.exchange)
        .bind::<Text, _>(&self.routing_key)
        .bind::<Bytea, _>(&self.payload)
        .bind::<Text, _>(&self.headers)
        .bind::<Nullable<Text>, _>(self.content_type.as_deref())
        .bind::<Nullable<Text>, _>(self.created_at)
        .bind::<Integer, _>(self.attempts)
        .bind::<Nullable<Integer>, _>(self.max_attempts)
        .bind::<Nullable<Text>, _>(self.ordering_key.as_deref())
        .bind::<Nullable<Text>, _>(self.status.map(|s| s.0))
        .bind::<Nullable<Text>, _>(self.status.and_then(|s| s.1))
        .bind::<Nullable<Text>, _>(self.status.and_then(|s| s.2))
        .get_result::<IdRow>(conn)
        .await
        .map(|r| r.id)
        .map_err(|e| e.to_string())
    }
}

/// JSON text no serde_json value would print: numbers of every size, deep nesting, odd keys.
fn random_json(rng: &mut StdRng, depth: usize) -> String {
    let pick = if depth > 3 {
        rng.gen_range(0..6)
    } else {
        rng.gen_range(0..9)
    };
    match pick {
        0 => [
            "1e400",
            "-1e400",
            "1e-400",
            "123456789012345678901234567890",
            "18446744073709551615",
            "-9223372036854775808",
            "0.1",
            "-0",
        ][rng.gen_range(0..8)]
        .to_string(),
        1 => "true".into(),
        2 => "null".into(),
        3 => format!(
            "\"{}\"",
            ["", "ü", "\\u001b[31m", "\\\"q\\\"", "x"][rng.gen_range(0..5)]
        ),
        4 => rng.gen::<i64>().to_string(),
        5 => {
            let d = [1, 10, 127, 200, 400][rng.gen_range(0..5)];
            format!("{}0{}", "[".repeat(d), "]".repeat(d))
        }
        6 => format!(
            "[{}]",
            (0..rng.gen_range(0..4))
                .map(|_| random_json(rng, depth + 1))
                .collect::<Vec<_>>()
                .join(",")
        ),
        _ => format!("{{{}}}", random_members(rng, depth + 1)),
    }
}

fn random_members(rng: &mut StdRng, depth: usize) -> String {
    (0..rng.gen_range(0..4))
        .map(|i| {
            let key = match rng.gen_range(0..6) {
                0 => String::new(),
                1 => "k".repeat(300),
                2 => "ключ".into(),
                3 => "x-death".into(),
                _ => format!("h{i}"),
            };
            format!("\"{key}\": {}", random_json(rng, depth))
        })
        .collect::<Vec<_>>()
        .join(",")
}
