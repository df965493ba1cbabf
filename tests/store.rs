//! The Store against the real PostgreSQL: the SQL contract, claims and leases, batched
//! state writes, dead letters and requeue, stats, and the NOTIFY trigger.

mod common;

use courier::testing::StoreInternals as _;
use std::{collections::HashSet, time::Duration};

use common::{within, TestDb};
use courier::{
    testing::{DeadLetterUpdate, MessageState, RetryUpdate},
    OutboxMessage, Status, StoreError,
};
use diesel::{sql_types::Text, QueryableByName};
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use futures::StreamExt;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(60);

#[derive(QueryableByName, Debug)]
struct Row {
    #[diesel(sql_type = Text)]
    v: String,
}

async fn query_text(db: &TestDb, sql: &str) -> Vec<String> {
    let mut conn = db.raw().await;
    let rows: Vec<Row> = diesel::sql_query(sql.replace("{s}", &format!("\"{}\"", db.schema)))
        .load(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter().map(|r| r.v).collect()
}

fn messages(n: usize) -> Vec<OutboxMessage> {
    (0..n)
        .map(|i| OutboxMessage::new("ex", format!("rk.{i}"), format!("m{i}").into_bytes()))
        .collect()
}

#[tokio::test]
async fn contract_minimal_insert_reads_back_pending() {
    let db = TestDb::new("contract").await;
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, payload)
         VALUES ('orders', 'order.created', convert_to('{\"id\":42}', 'UTF8'));
         INSERT INTO {s}.outbox (id, exchange, routing_key, payload, headers, content_type, max_attempts)
         VALUES (gen_random_uuid(), 'orders', 'order.created', 'x', '{\"tenant\":\"a\"}', 'application/json', 5);",
    )
    .await;
    let statuses = query_text(&db, "SELECT status::text AS v FROM {s}.outbox").await;
    assert_eq!(statuses, vec!["pending", "pending"]);
    let columns = query_text(
        &db,
        "SELECT column_name::text AS v FROM information_schema.columns
         WHERE table_schema = replace('{s}', '\"', '') AND table_name = 'outbox' ORDER BY ordinal_position",
    )
    .await;
    let expected = [
        "id",
        "exchange",
        "routing_key",
        "payload",
        "headers",
        "content_type",
        "status",
        "attempts",
        "max_attempts",
        "next_attempt_at",
        "locked_by",
        "locked_until",
        "last_error",
        "created_at",
        "updated_at",
        "confirmed_at",
        "ordering_key",
        "seq",
    ];
    assert_eq!(columns, expected);
    // Retention's archive mode copies rows with SELECT *: same columns, same order.
    let archive = query_text(
        &db,
        "SELECT column_name::text AS v FROM information_schema.columns
         WHERE table_schema = replace('{s}', '\"', '') AND table_name = 'outbox_archive' ORDER BY ordinal_position",
    )
    .await;
    assert_eq!(archive, expected);
    let enum_values = query_text(
        &db,
        "SELECT unnest(enum_range(NULL::{s}.outbox_status))::text AS v",
    )
    .await;
    assert_eq!(
        enum_values,
        ["pending", "in_flight", "confirmed", "retrying", "failed"]
    );
}

#[tokio::test]
async fn contract_rejects_zero_max_attempts_at_insert() {
    let db = TestDb::new("contract_check").await;
    let mut conn = db.raw().await;
    let err = conn
        .batch_execute(&format!(
            "INSERT INTO \"{}\".outbox (exchange, routing_key, payload, max_attempts) VALUES ('x', '', 'p', 0)",
            db.schema
        ))
        .await
        .expect_err("max_attempts 0 must be rejected");
    assert!(err.to_string().contains("max_attempts"), "{err}");
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let db = TestDb::new("migrate").await;
    let again = courier::migrate(&db.config.database.url, &db.schema, LONG)
        .await
        .unwrap();
    assert!(again.is_empty(), "second run applied {again:?}");
}

#[tokio::test]
async fn an_up_to_date_schema_migrates_for_a_role_that_may_only_use_its_tables() {
    let db = TestDb::new("migrole").await;
    let role = common::unique_name("courier_user");
    let s = &db.schema;
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN;
         GRANT USAGE ON SCHEMA {{s}} TO {role};
         GRANT ALL ON ALL TABLES IN SCHEMA {{s}} TO {role};
         GRANT ALL ON ALL SEQUENCES IN SCHEMA {{s}} TO {role};
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {{s}} TO {role}"
    ))
    .await;
    let url = courier::config::SecretUrl::new(common::database_url().replacen(
        "postgres@",
        &format!("{role}@"),
        1,
    ));
    // Nothing to apply: no DDL, so no CREATE privilege is needed (an engine with
    // `auto_migrate` on starts as `doctor` said it would).
    let applied = courier::migrate(&url, s, LONG).await;
    // A schema it would have to create fails as a migration, naming the privilege.
    let other = common::unique_name("migrole_new");
    let refused = courier::migrate(&url, &other, LONG).await;
    db.exec(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await;
    assert!(applied.unwrap().is_empty());
    let e = refused.unwrap_err().to_string();
    assert!(
        e.contains("migration failed") && e.contains("permission denied"),
        "{e}"
    );
}

#[tokio::test]
async fn a_connection_failure_on_every_host_names_each_host_and_its_failure() {
    let closed = |_| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (a, b) = (closed(0), closed(1));
    let mut cfg = courier::Config::default().database;
    cfg.url = courier::config::SecretUrl::new(format!(
        "postgres://postgres@127.0.0.1:{a},127.0.0.1:{b}/postgres"
    ));
    cfg.connect_timeout = Duration::from_secs(2);
    let e = within(20, "two closed hosts", courier::Store::connect(&cfg))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("127.0.0.1:{a}: ")) && e.contains(&format!("127.0.0.1:{b}: ")),
        "{e}"
    );
}

#[tokio::test]
async fn claim_leases_rows_and_counts_the_attempt() {
    let db = TestDb::new("claim").await;
    let store = db.store().await;
    store.enqueue_many(&messages(5)).await.unwrap();
    let claimed = store.claim("engine-a", 3, LONG).await.unwrap();
    assert_eq!(claimed.len(), 3, "the batch limit holds");
    assert!(claimed.iter().all(|m| m.attempts == 1));
    let rows = query_text(
        &db,
        "SELECT status::text || ' ' || locked_by || ' ' || (locked_until > now() + interval '50 seconds')::text AS v
         FROM {s}.outbox WHERE locked_by IS NOT NULL",
    )
    .await;
    assert_eq!(rows, vec!["in_flight engine-a true"; 3]);
    let rest = store.claim("engine-b", 100, LONG).await.unwrap();
    assert_eq!(rest.len(), 2, "claimed rows are not claimable again");
    assert!(store.claim("engine-b", 100, LONG).await.unwrap().is_empty());
}

#[tokio::test]
async fn concurrent_claimers_never_share_a_row() {
    let db = TestDb::new("skiplocked").await;
    let store = db.store().await;
    for chunk in messages(3000).chunks(1000) {
        store.enqueue_many(chunk).await.unwrap();
    }
    let claimer = |name: &'static str| {
        let store = store.clone();
        async move {
            let mut got = Vec::new();
            loop {
                let batch = store.claim(name, 50, LONG).await.unwrap();
                if batch.is_empty() {
                    return got;
                }
                got.extend(batch.into_iter().map(|m| m.id));
            }
        }
    };
    let (a, b, c) = within(60, "claimers", async {
        tokio::join!(
            tokio::spawn(claimer("a")),
            tokio::spawn(claimer("b")),
            tokio::spawn(claimer("c"))
        )
    })
    .await;
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let mut all: HashSet<Uuid> = HashSet::new();
    for id in a.iter().chain(&b).chain(&c) {
        assert!(all.insert(*id), "row {id} claimed twice");
    }
    assert_eq!(all.len(), 3000);
}

#[tokio::test]
async fn expired_leases_are_claimable_and_renewal_keeps_them() {
    let db = TestDb::new("lease").await;
    let store = db.store().await;
    store.enqueue_many(&messages(4)).await.unwrap();
    // A live engine holds two rows and renews them.
    let alive = store.claim("alive", 2, LONG).await.unwrap();
    let alive_ids: Vec<Uuid> = alive.iter().map(|m| m.id).collect();
    // A zero lease expires at once: this engine "crashed" holding the other two.
    let crashed = store.claim("crashed", 2, Duration::ZERO).await.unwrap();
    assert_eq!(crashed.len(), 2);
    assert_eq!(
        store.renew_leases("alive", &alive_ids, LONG).await.unwrap(),
        2
    );
    // Renewing rows one does not hold changes nothing.
    let crashed_ids: Vec<Uuid> = crashed.iter().map(|m| m.id).collect();
    assert_eq!(
        store
            .renew_leases("alive", &crashed_ids, LONG)
            .await
            .unwrap(),
        0
    );

    let rescued = store.claim("rescuer", 10, LONG).await.unwrap();
    let rescued_ids: HashSet<Uuid> = rescued.iter().map(|m| m.id).collect();
    assert_eq!(
        rescued_ids,
        crashed_ids.iter().copied().collect(),
        "only expired leases move"
    );
    assert!(
        rescued.iter().all(|m| m.attempts == 2),
        "the lost attempt counts"
    );
    let errors = query_text(
        &db,
        "SELECT last_error AS v FROM {s}.outbox WHERE locked_by = 'rescuer'",
    )
    .await;
    assert!(
        errors.iter().all(|e| e.contains("lease expired")),
        "{errors:?}"
    );
}

#[tokio::test]
async fn batched_confirm_retry_and_release() {
    let db = TestDb::new("writes").await;
    let store = db.store().await;
    store.enqueue_many(&messages(6)).await.unwrap();
    let claimed = store.claim("e", 6, LONG).await.unwrap();
    let ids: Vec<Uuid> = claimed.iter().map(|m| m.id).collect();

    assert_eq!(store.mark_confirmed(&ids[0..2]).await.unwrap(), 2);
    let retry = vec![
        RetryUpdate {
            id: ids[2],
            delay: Duration::from_secs(3600),
            error: "nacked by broker".into(),
            refund: false,
        },
        RetryUpdate {
            id: ids[3],
            delay: Duration::ZERO,
            error: "channel lost".into(),
            refund: true,
        },
    ];
    // Another engine cannot write failures for rows it does not hold.
    assert_eq!(store.mark_retrying("intruder", &retry).await.unwrap(), 0);
    assert_eq!(store.mark_retrying("e", &retry).await.unwrap(), 2);
    assert_eq!(store.release("e", &ids[4..5]).await.unwrap(), 1);

    let stats = store.stats().await.unwrap();
    assert_eq!(stats.count(Status::Confirmed), 2);
    assert_eq!(stats.count(Status::Retrying), 2);
    assert_eq!(stats.count(Status::Pending), 1);
    assert_eq!(stats.count(Status::InFlight), 1);
    assert!(stats.oldest_pending_age.is_some());

    let confirmed_at = query_text(
        &db,
        "SELECT (confirmed_at IS NOT NULL)::text AS v FROM {s}.outbox WHERE status = 'confirmed'",
    )
    .await;
    assert_eq!(confirmed_at, vec!["true", "true"]);
    // The refunded retry and the released row are due now, with attempts given back;
    // the nacked one waits an hour.
    let again = store.claim("e", 10, LONG).await.unwrap();
    let again_ids: HashSet<Uuid> = again.iter().map(|m| m.id).collect();
    assert_eq!(again_ids, [ids[3], ids[4]].into_iter().collect());
    assert!(again.iter().all(|m| m.attempts == 1), "{again:?}");
    match store.message_state(ids[2]).await.unwrap() {
        Some(MessageState::Outbox(Status::Retrying, Some(e))) => assert_eq!(e, "nacked by broker"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn outcome_writes_leave_out_rows_another_transaction_holds_locked() {
    let db = TestDb::new("lockedwrites").await;
    let store = db.store().await;
    store.enqueue_many(&messages(6)).await.unwrap();
    let claimed = store.claim("e", 6, LONG).await.unwrap();
    let ids: Vec<Uuid> = claimed.iter().map(|m| m.id).collect();
    // A producer's transaction holds one acked row and one failed row locked.
    let mut producer = db.hold_locked("outbox", &[ids[1], ids[4]]).await;
    let retry: Vec<RetryUpdate> = ids[3..6]
        .iter()
        .map(|id| RetryUpdate {
            id: *id,
            delay: Duration::ZERO,
            error: "nacked by broker".into(),
            refund: false,
        })
        .collect();
    let held = within(10, "acks beside a lock", store.record_confirmed(&ids[0..3])).await;
    assert_eq!(held.unwrap(), [ids[1]], "only the locked ack is left");
    let held = within(
        10,
        "retries beside a lock",
        store.record_retrying("e", &retry),
    )
    .await;
    assert_eq!(held.unwrap(), [ids[4]], "only the locked retry is left");
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.count(Status::Confirmed), 2);
    assert_eq!(stats.count(Status::Retrying), 2);
    assert_eq!(stats.count(Status::InFlight), 2, "the two locked rows");
    // A shutdown's last give-back does not wait for them either.
    let released = within(10, "a give-back beside a lock", store.release_all("e")).await;
    assert_eq!(released.unwrap(), 0);
    // Once the lock is gone, the same writes take them; rows written before are no-ops.
    producer.batch_execute("COMMIT").await.unwrap();
    assert!(store.record_confirmed(&ids[0..3]).await.unwrap().is_empty());
    assert!(store.record_retrying("e", &retry).await.unwrap().is_empty());
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.count(Status::Confirmed), 3);
    assert_eq!(stats.count(Status::Retrying), 3);
}

/// Three rows enqueued and claimed by engine `e`; their ids.
async fn three_claimed(store: &courier::Store) -> Vec<Uuid> {
    store.enqueue_many(&messages(3)).await.unwrap();
    let claimed = store.claim("e", 3, LONG).await.unwrap();
    claimed.iter().map(|m| m.id).collect()
}

/// Rows `ids` failed for good: what the Dead-letter actor moves.
fn failed(ids: &[Uuid]) -> Vec<DeadLetterUpdate> {
    ids.iter()
        .map(|id| DeadLetterUpdate {
            id: *id,
            error: "nacked".into(),
        })
        .collect()
}

#[tokio::test]
async fn a_dead_letter_move_gives_up_on_a_locked_row_in_a_second() {
    let db = TestDb::new("lockedmove").await;
    let store = db.store().await;
    let ids = three_claimed(&store).await;
    let mut producer = db.hold_locked("outbox", &[ids[0]]).await;
    let all = failed(&ids);
    let moved = within(
        10,
        "a move beside a lock",
        store.move_to_dead_letters("e", &all),
    )
    .await;
    assert!(
        moved.is_err(),
        "the batch fails instead of waiting: {moved:?}"
    );
    // The Dead-letter actor then moves the rows one at a time: the others are not held.
    for id in &ids[1..] {
        let moved = store.move_to_dead_letters("e", &failed(&[*id])).await;
        assert_eq!(moved.unwrap(), [*id]);
    }
    producer.batch_execute("COMMIT").await.unwrap();
    let moved = store.move_to_dead_letters("e", &failed(&ids[..1])).await;
    assert_eq!(moved.unwrap(), ids[..1]);
}

#[tokio::test]
async fn operator_changes_give_up_on_a_locked_dead_letter_and_change_nothing() {
    let db = TestDb::new("lockedop").await;
    let store = db.store().await;
    let ids = three_claimed(&store).await;
    store
        .move_to_dead_letters("e", &failed(&ids))
        .await
        .unwrap();
    // Another operator's transaction, left open, holds one dead letter.
    let mut other = db.hold_locked("dead_letters", &[ids[0]]).await;
    let requeued = within(
        10,
        "a requeue beside a lock",
        store.requeue_dead_letters(&ids),
    )
    .await;
    assert!(
        matches!(requeued, Err(StoreError::RowLocked(_))),
        "{requeued:?}"
    );
    let discarded = within(
        10,
        "a discard beside a lock",
        store.discard_dead_letters(&ids),
    )
    .await;
    let e = discarded.unwrap_err();
    assert!(
        e.to_string().contains("locked by another transaction"),
        "{e}"
    );
    let discarded = within(
        10,
        "a discard by age beside a lock",
        store.discard_dead_letters_older_than(Duration::ZERO),
    )
    .await;
    assert!(
        matches!(discarded, Err(StoreError::RowLocked(_))),
        "{discarded:?}"
    );
    assert_eq!(
        store.dead_letter_ids(None).await.unwrap().len(),
        3,
        "nothing changed"
    );
    // The wait is the statement's own: the pool's next statement does not inherit it.
    other.batch_execute("COMMIT").await.unwrap();
    let mut again = db.hold_locked("dead_letters", &[ids[2]]).await;
    let requeued = store.requeue_dead_letters(&ids[..2]).await.unwrap();
    assert_eq!(requeued.len(), 2);
    again.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        store.discard_dead_letters(&ids[2..]).await.unwrap(),
        ids[2..]
    );
}

#[tokio::test]
async fn a_row_never_due_is_still_the_oldest_open_row() {
    let db = TestDb::new("neverdue").await;
    let store = db.store().await;
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, payload, created_at, next_attempt_at)
         VALUES ('ex', 'k', 'x', now() - interval '3 days', 'infinity')",
    )
    .await;
    let oldest = store
        .oldest_open()
        .await
        .unwrap()
        .expect("the oldest open row");
    assert_eq!(oldest.due_in_seconds, Some(f64::INFINITY));
    let age = store
        .stats()
        .await
        .unwrap()
        .oldest_pending_age
        .expect("an age");
    assert!(age >= Duration::from_secs(3 * 86_400), "{age:?}");
}

#[tokio::test]
async fn dead_letter_move_and_requeue() {
    let db = TestDb::new("dead").await;
    let store = db.store().await;
    let msg = OutboxMessage::new("ex", "rk", b"body".to_vec())
        .with_header("tenant", "a")
        .with_content_type("text/plain")
        .with_max_attempts(2);
    store.enqueue(&msg).await.unwrap();
    store.claim("e", 1, LONG).await.unwrap();
    let moved = store
        .move_to_dead_letters(
            "e",
            &[DeadLetterUpdate {
                id: msg.id,
                error: "returned by broker".into(),
            }],
        )
        .await
        .unwrap();
    assert_eq!(moved, vec![msg.id]);
    assert_eq!(
        store.message_state(msg.id).await.unwrap(),
        Some(MessageState::DeadLettered(Some(
            "returned by broker".into()
        )))
    );
    let copied = query_text(
        &db,
        "SELECT exchange || '|' || routing_key || '|' || convert_from(payload, 'UTF8') || '|' ||
                (headers->>'tenant') || '|' || content_type || '|' || max_attempts || '|' || attempts AS v
         FROM {s}.dead_letters",
    )
    .await;
    assert_eq!(copied, vec!["ex|rk|body|a|text/plain|2|1"]);
    assert_eq!(store.stats().await.unwrap().outbox.values().sum::<i64>(), 0);

    // Two operators requeue the same id at once: it moves exactly once.
    let ids = [msg.id];
    let (a, b) = tokio::join!(
        store.requeue_dead_letters(&ids),
        store.requeue_dead_letters(&ids)
    );
    let total = a.unwrap().len() + b.unwrap().len();
    assert_eq!(total, 1);
    let back = query_text(
        &db,
        "SELECT status::text || ' ' || attempts AS v FROM {s}.outbox",
    )
    .await;
    assert_eq!(back, vec!["pending 0"]);
    assert_eq!(store.stats().await.unwrap().dead_letters, 0);
    assert!(store
        .requeue_dead_letters(&[Uuid::new_v4()])
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn dead_letter_move_is_fenced_by_the_lease() {
    let db = TestDb::new("deadfence").await;
    let store = db.store().await;
    let msg = OutboxMessage::new("ex", "rk", b"x".to_vec());
    store.enqueue(&msg).await.unwrap();
    store.claim("owner", 1, LONG).await.unwrap();
    let moved = store
        .move_to_dead_letters(
            "other",
            &[DeadLetterUpdate {
                id: msg.id,
                error: "x".into(),
            }],
        )
        .await
        .unwrap();
    assert!(moved.is_empty());
    assert_eq!(store.stats().await.unwrap().count(Status::InFlight), 1);
}

#[tokio::test]
async fn insert_trigger_notifies_once_per_statement() {
    let db = TestDb::new("notify").await;
    let store = db.store().await;
    let mut listener = db.raw().await;
    let channel = store.notify_channel();
    listener
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .unwrap();
    store.enqueue_many(&messages(100)).await.unwrap();
    let mut stream = Box::pin(listener.notifications_stream());
    let first = within(10, "NOTIFY after insert", stream.next()).await;
    let note = first.expect("stream open").expect("notification");
    assert_eq!(note.channel, channel);
}

#[tokio::test]
async fn enqueue_in_a_rolled_back_transaction_leaves_nothing() {
    let db = TestDb::new("rollback").await;
    let mut conn = db.raw().await;
    let schema = db.schema.clone();
    let kept = OutboxMessage::new("ex", "rk", b"kept".to_vec());
    let result = conn
        .transaction::<(), courier::StoreError, _>(async |tx| {
            courier::enqueue_in(
                tx,
                &schema,
                &OutboxMessage::new("ex", "rk", b"lost".to_vec()),
            )
            .await?;
            Err(courier::StoreError::Migration(
                "business write failed".into(),
            ))
        })
        .await;
    assert!(result.is_err());
    conn.transaction::<(), courier::StoreError, _>(async |tx| {
        courier::enqueue_in(tx, &schema, &kept).await
    })
    .await
    .unwrap();
    let payloads = query_text(
        &db,
        "SELECT convert_from(payload, 'UTF8') AS v FROM {s}.outbox",
    )
    .await;
    assert_eq!(payloads, vec!["kept"]);
}

#[tokio::test]
async fn claims_oldest_first_in_bounded_batches() {
    let db = TestDb::new("order").await;
    let store = db.store().await;
    for m in messages(10) {
        store.enqueue(&m).await.unwrap();
    }
    let mut seen = Vec::new();
    loop {
        let batch = store.claim("e", 4, LONG).await.unwrap();
        assert!(batch.len() <= 4);
        if batch.is_empty() {
            break;
        }
        seen.extend(batch);
    }
    assert_eq!(seen.len(), 10);
    assert!(seen.windows(2).all(|w| w[0].created_at <= w[1].created_at));
}

/// What the CLI, `/metrics` and the engine's periodic summary read stays bounded however
/// much history the outbox holds: with 50,000 confirmed rows (the default retention keeps a
/// week of them), the stats and the oldest-open-row age read at most the bounded count's
/// rows. The engine's summary once ran `min(created_at)` over the open statuses, which
/// matched no partial index and read the whole table every 30 s.
#[tokio::test]
async fn stats_and_the_summary_read_a_bounded_part_of_a_table_with_history() {
    #[derive(QueryableByName)]
    struct Reads {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq_tup_read: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        idx_scan: i64,
    }
    let db = TestDb::new("history_reads").await;
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, status, confirmed_at)
         SELECT 'ex', 'rk', 'confirmed', now() - i * interval '1 second'
         FROM generate_series(1, 50000) i;
         INSERT INTO {s}.outbox (exchange, routing_key, created_at)
         VALUES ('ex', 'open', now() - interval '1 hour');
         ANALYZE {s}.outbox",
    )
    .await;
    async fn reads(db: &TestDb) -> Reads {
        let sql = format!(
            "SELECT coalesce(seq_tup_read, 0) AS seq_tup_read, coalesce(idx_scan, 0) AS idx_scan
             FROM pg_stat_user_tables WHERE relid = '\"{}\".outbox'::regclass",
            db.schema
        );
        let mut conn = db.raw().await;
        diesel::sql_query(sql)
            .get_result::<Reads>(&mut conn)
            .await
            .expect("pg_stat_user_tables")
    }
    let before = reads(&db).await;
    let store = db.store().await;
    let stats = store.stats().await.expect("stats");
    let age = store.oldest_pending_age().await.expect("oldest");
    // Closing the pool's connections makes their backends report their reads at once.
    drop(store);
    assert!(stats.approximate.contains(&"confirmed"), "{stats:?}");
    assert_eq!(stats.count(Status::Pending), 1);
    let age = age.expect("one open row");
    assert!(age >= Duration::from_secs(3590), "{age:?}");
    let after = common::eventually(30, "the pool's reads reported", || async {
        let r = reads(&db).await;
        (r.idx_scan > before.idx_scan).then_some(r)
    })
    .await;
    let read = after.seq_tup_read - before.seq_tup_read;
    assert!(
        read <= 2 * courier::testing::EXACT_UP_TO,
        "stats and the summary read {read} rows of a table of 50,001"
    );
}

/// Contract v4: ids default to UUID version 7, so new rows sort after old ones in the
/// primary key (its new entries stay on the right edge however much history it holds), and
/// `OutboxMessage::new` makes the same kind.
#[tokio::test]
async fn default_ids_are_time_ordered() {
    let db = TestDb::new("v7_ids").await;
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key) VALUES ('ex', 'first');
         SELECT pg_sleep(0.005);
         INSERT INTO {s}.outbox (exchange, routing_key) VALUES ('ex', 'second');",
    )
    .await;
    let ids = query_text(
        &db,
        "SELECT id::text AS v FROM {s}.outbox ORDER BY created_at, routing_key",
    )
    .await;
    let ids: Vec<Uuid> = ids.iter().map(|i| i.parse().expect("uuid")).collect();
    assert!(ids.iter().all(|i| i.get_version_num() == 7), "{ids:?}");
    assert!(ids[0] < ids[1], "{ids:?}");
    let made = OutboxMessage::new("ex", "rk", b"x".to_vec());
    assert_eq!(made.id.get_version_num(), 7);
}

/// A pool that cannot make a connection says why in the cause's words: the refusal, once,
/// not deadpool's "Error occurred while creating a new object" around it.
#[tokio::test]
async fn a_pool_that_cannot_connect_names_the_cause_not_the_pool() {
    let db = TestDb::new("poolwords").await;
    let proxy = common::proxy::Proxy::start("127.0.0.1:5432".parse().unwrap());
    let mut config = db.engine_config();
    let url = common::database_url().replace("127.0.0.1:5432", &proxy.addr.to_string());
    config.database.url = courier::config::SecretUrl::new(url);
    config.database.connect_timeout = Duration::from_secs(2);
    let store = courier::Store::connect(&config.database)
        .await
        .expect("connect");
    proxy.refuse(true);
    proxy.cut();
    // The open connection was closed under the pool; a new one is refused.
    let e = within(20, "the pool to give up", async {
        loop {
            match store.conn().await {
                Err(e) => return e.to_string(),
                Ok(mut conn) => {
                    let _ = conn.batch_execute("SELECT 1").await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
    .await;
    assert!(!e.contains("Error occurred while creating"), "{e}");
    assert_eq!(e.matches("cannot connect to PostgreSQL").count(), 1, "{e}");
    assert!(
        e.len() > "cannot connect to PostgreSQL at ".len() + 40,
        "no cause: {e}"
    );
}

#[tokio::test]
async fn exactly_the_bound_is_still_an_exact_count() {
    let db = TestDb::new("stats_bound").await;
    let bound = courier::testing::EXACT_UP_TO;
    db.exec(&format!(
        "INSERT INTO {{s}}.outbox (exchange, routing_key, status, confirmed_at)
         SELECT 'ex', 'rk', 'confirmed', now() FROM generate_series(1, {bound})"
    ))
    .await;
    let stats = db.store().await.stats().await.expect("stats");
    assert_eq!(stats.count(Status::Confirmed), bound);
    assert!(!stats.approximate.contains(&"confirmed"), "{stats:?}");
    db.exec("INSERT INTO {s}.outbox (exchange, routing_key, status, confirmed_at) VALUES ('ex', 'rk', 'confirmed', now())")
        .await;
    let stats = db.store().await.stats().await.expect("stats");
    assert!(stats.approximate.contains(&"confirmed"), "{stats:?}");
    assert!(stats.count(Status::Confirmed) > bound, "{stats:?}");
    assert!(
        !stats.approximate.contains(&"oldest_pending_age"),
        "{stats:?}"
    );
    // Past the bound, rows to deliver are a lower bound, and the age is read among the
    // earliest due: both say so.
    db.exec(&format!(
        "INSERT INTO {{s}}.outbox (exchange, routing_key, next_attempt_at)
         SELECT 'ex', 'rk', now() + interval '1 hour' FROM generate_series(1, {bound} + 1)"
    ))
    .await;
    let stats = db.store().await.stats().await.expect("stats");
    assert!(stats.count(Status::Pending) > bound, "{stats:?}");
    for key in ["pending", "oldest_pending_age"] {
        assert!(stats.approximate.contains(&key), "{key}: {stats:?}");
    }
}
