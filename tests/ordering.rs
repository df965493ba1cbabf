//! Per-key ordering against the real PostgreSQL and RabbitMQ: a claim takes only the head
//! of each key, one message of a key at a time, in insertion order; a retrying or
//! dead-lettered head holds its key (per `ordering.on_dead_letter`) while other keys flow;
//! several claimers never hold two rows of one key.

mod common;

use courier::testing::StoreInternals as _;
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    audit::audit_received,
    broker::TestBroker,
    ordering::{assert_first_seen_in_order, insert_keyed},
    TestDb,
};
use courier::{
    config::OnDeadLetter,
    testing::{DeadLetterUpdate, KeyScan, RetryUpdate},
    Engine, OutboxMessage, Outcome, Status, Store,
};
use lapin::ExchangeKind;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(600);
const WAIT: Duration = Duration::from_secs(120);
/// A sweep longer than every wait in a test: nothing there may wait for it.
const NO_SWEEP: Duration = Duration::from_secs(600);

fn block() -> KeyScan {
    KeyScan {
        after: None,
        block_on_dead_letter: true,
        run: 0,
        heads: None,
    }
}

fn carry_on() -> KeyScan {
    KeyScan {
        after: None,
        block_on_dead_letter: false,
        run: 0,
        heads: None,
    }
}

/// One claim round as the engine does it: expired leases and unkeyed rows, then keyed
/// heads with the room left. Returns (key or "", id) pairs.
async fn claim(store: &Store, engine: &str, limit: u32, scan: &KeyScan) -> Vec<(String, Uuid)> {
    let mut rows = store.claim(engine, limit, LONG).await.expect("claim");
    let room = limit - rows.len() as u32;
    rows.extend(
        store
            .claim_keyed(engine, room, LONG, scan)
            .await
            .expect("keyed claim")
            .messages,
    );
    rows.into_iter()
        .map(|m| (m.ordering_key.unwrap_or_default(), m.id))
        .collect()
}

fn ids(claimed: &[(String, Uuid)]) -> Vec<Uuid> {
    claimed.iter().map(|(_, id)| *id).collect()
}

/// Enqueues `n` rows for `key` through the Rust API; returns their ids in order.
async fn enqueue_key(store: &Store, key: &str, n: usize) -> Vec<Uuid> {
    let rows: Vec<OutboxMessage> = (0..n)
        .map(|i| {
            OutboxMessage::new("ex", format!("routed.{key}.{i}"), vec![b'x']).with_ordering_key(key)
        })
        .collect();
    store.enqueue_many(&rows).await.expect("enqueue");
    rows.iter().map(|m| m.id).collect()
}

#[tokio::test]
async fn a_claim_takes_each_keys_head_only_and_keys_advance_one_at_a_time_in_order() {
    let db = TestDb::new("ord_heads").await;
    let store = db.store().await;
    let keyed = insert_keyed(&db, "ex", 4, 5).await;
    let unkeyed = db.insert_sql("ex", 6, "plain.{i}").await;
    let first = claim(&store, "e", 100, &block()).await;
    let first_keys: Vec<&str> = first
        .iter()
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(first_keys.len(), 4, "one head per key: {first_keys:?}");
    assert_eq!(
        first_keys.iter().collect::<HashSet<_>>().len(),
        4,
        "{first_keys:?}"
    );
    for (key, ids) in &keyed.by_key {
        assert!(
            first.contains(&(key.clone(), ids[0])),
            "the head of {key} is its first row"
        );
    }
    assert_eq!(first.len(), 10, "unkeyed rows flow beside them");
    assert!(
        claim(&store, "e", 100, &block()).await.is_empty(),
        "nothing more while every head is in flight"
    );
    // Confirm and claim again until done: each key's rows come out in insertion order.
    let mut order: HashMap<String, Vec<Uuid>> = HashMap::new();
    let mut batch = first;
    while !batch.is_empty() {
        for (k, id) in &batch {
            if !k.is_empty() {
                order.entry(k.clone()).or_default().push(*id);
            }
        }
        store.mark_confirmed(&ids(&batch)).await.unwrap();
        batch = claim(&store, "e", 100, &block()).await;
    }
    for (key, expected) in &keyed.by_key {
        assert_eq!(order.get(key), Some(expected), "order of {key}");
    }
    assert_eq!(
        db.count(Status::Confirmed).await as usize,
        20 + unkeyed.len()
    );
}

#[tokio::test]
async fn a_retrying_head_holds_its_key_and_a_rescued_head_stays_first() {
    let db = TestDb::new("ord_retry").await;
    let store = db.store().await;
    let a = enqueue_key(&store, "a", 3).await;
    let b = enqueue_key(&store, "b", 3).await;
    // An engine claims both heads and dies (its lease is already over).
    let crashed = store
        .claim_keyed("crashed", 10, Duration::ZERO, &block())
        .await
        .unwrap();
    assert_eq!(crashed.messages.len(), 2);
    // The rescuer gets the same heads back, not their successors.
    let rescued = claim(&store, "rescuer", 10, &block()).await;
    let mut got = ids(&rescued);
    got.sort();
    let mut heads = vec![a[0], b[0]];
    heads.sort();
    assert_eq!(
        got, heads,
        "rescue takes the heads, never a second row of a key"
    );
    // a's head fails and waits an hour; b's head is confirmed: only b moves on.
    store
        .mark_retrying(
            "rescuer",
            &[RetryUpdate {
                id: a[0],
                delay: Duration::from_secs(3600),
                error: "nacked".into(),
                refund: false,
            }],
        )
        .await
        .unwrap();
    store.mark_confirmed(&[b[0]]).await.unwrap();
    assert_eq!(
        ids(&claim(&store, "rescuer", 10, &block()).await),
        vec![b[1]]
    );
    // Due again: a's head, not a[1].
    db.exec("UPDATE {s}.outbox SET next_attempt_at = now() WHERE status = 'retrying'")
        .await;
    assert_eq!(
        ids(&claim(&store, "rescuer", 10, &block()).await),
        vec![a[0]]
    );
}

#[tokio::test]
async fn a_dead_lettered_head_blocks_its_key_until_an_operator_acts_or_continues() {
    let db = TestDb::new("ord_dead").await;
    let store = db.store().await;
    let a = enqueue_key(&store, "a", 3).await;
    let b = enqueue_key(&store, "b", 2).await;
    assert_eq!(claim(&store, "e", 10, &block()).await.len(), 2);
    let dead = DeadLetterUpdate {
        id: a[0],
        error: "attempts exhausted".into(),
    };
    assert_eq!(
        store.move_to_dead_letters("e", &[dead]).await.unwrap(),
        vec![a[0]]
    );
    let letter = store.dead_letter(a[0]).await.unwrap().expect("dead letter");
    assert_eq!(letter.ordering_key.as_deref(), Some("a"));
    assert!(letter.seq.is_some());
    store.mark_confirmed(&[b[0]]).await.unwrap();
    // block: only b flows.
    assert_eq!(ids(&claim(&store, "e", 10, &block()).await), vec![b[1]]);
    store.mark_confirmed(&[b[1]]).await.unwrap();
    assert!(claim(&store, "e", 10, &block()).await.is_empty(), "a waits");
    // An operator requeues a's head: it goes back to its place, before a[1].
    assert_eq!(
        store.requeue_dead_letters(&[a[0]]).await.unwrap(),
        vec![a[0]]
    );
    assert_eq!(ids(&claim(&store, "e", 10, &block()).await), vec![a[0]]);
    store.mark_confirmed(&[a[0]]).await.unwrap();
    assert_eq!(ids(&claim(&store, "e", 10, &block()).await), vec![a[1]]);
    // continue: the next message goes on at once.
    let dead = DeadLetterUpdate {
        id: a[1],
        error: "attempts exhausted".into(),
    };
    store.move_to_dead_letters("e", &[dead]).await.unwrap();
    assert!(claim(&store, "e", 10, &block()).await.is_empty());
    assert_eq!(ids(&claim(&store, "e", 10, &carry_on()).await), vec![a[2]]);
    // Discarding the dead letter unblocks a blocked key.
    let c = enqueue_key(&store, "c", 2).await;
    assert_eq!(ids(&claim(&store, "e", 10, &block()).await), vec![c[0]]);
    let dead = DeadLetterUpdate {
        id: c[0],
        error: "unroutable".into(),
    };
    store.move_to_dead_letters("e", &[dead]).await.unwrap();
    assert!(claim(&store, "e", 10, &block()).await.is_empty());
    store.discard_dead_letters(&[c[0]]).await.unwrap();
    assert_eq!(ids(&claim(&store, "e", 10, &block()).await), vec![c[1]]);
}

#[tokio::test]
async fn unkeyed_claims_leave_keyed_rows_alone_and_keys_are_served_round_robin() {
    let db = TestDb::new("ord_share").await;
    let store = db.store().await;
    let keyed = insert_keyed(&db, "ex", 10, 3).await;
    let unkeyed = db.insert_sql("ex", 10, "plain.{i}").await;
    // The unkeyed claim (the engine's hot path) never takes a keyed row.
    let mut plain: Vec<Uuid> = store
        .claim("e", 100, LONG)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect();
    plain.sort();
    let mut expected = unkeyed.clone();
    expected.sort();
    assert_eq!(plain, expected);
    let c = store.claim_keyed("e", 4, LONG, &block()).await.unwrap();
    assert_eq!(c.messages.len(), 4);
    assert!(c.full, "a full keyed claim asks for another");
    let first: Vec<Uuid> = c.messages.iter().map(|m| m.id).collect();
    store.mark_confirmed(&first).await.unwrap();
    // One head per claim: the walk resumes after the last key served, so ten claims serve
    // ten different keys (none starves).
    let mut scan = block();
    let mut served = Vec::new();
    for _ in 0..10 {
        let c = store.claim_keyed("e", 1, LONG, &scan).await.unwrap();
        assert_eq!(c.messages.len(), 1);
        let m = &c.messages[0];
        served.push(m.ordering_key.clone().unwrap_or_default());
        store.mark_confirmed(&[m.id]).await.unwrap();
        scan.after = c.next_key;
    }
    let distinct: HashSet<&String> = served.iter().collect();
    assert_eq!(distinct.len(), 10, "round robin over keys: {served:?}");
    assert_eq!(keyed.by_key.len(), 10);
}

#[tokio::test]
async fn three_claimers_never_hold_two_rows_of_one_key() {
    let db = TestDb::new("ord_three").await;
    let store = db.store().await;
    let keyed = insert_keyed(&db, "ex", 20, 30).await;
    let key_of: HashMap<Uuid, String> = keyed
        .key_of()
        .into_iter()
        .map(|(id, k)| (id, k.to_string()))
        .collect();
    let holding: Arc<Mutex<HashSet<String>>> = Default::default();
    let order: Arc<Mutex<HashMap<String, Vec<Uuid>>>> = Default::default();
    let mut tasks = Vec::new();
    for name in ["one", "two", "three"] {
        let (store, holding, order, key_of) = (
            store.clone(),
            holding.clone(),
            order.clone(),
            key_of.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut scan = block();
            let mut idle = 0;
            while idle < 20 {
                let c = store.claim_keyed(name, 8, LONG, &scan).await.unwrap();
                scan.after = c.next_key;
                if c.messages.is_empty() {
                    idle += 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                idle = 0;
                for m in &c.messages {
                    let key = key_of[&m.id].clone();
                    assert!(
                        holding.lock().unwrap().insert(key.clone()),
                        "{name} claimed a second row of {key}"
                    );
                    order.lock().unwrap().entry(key).or_default().push(m.id);
                }
                let got: Vec<Uuid> = c.messages.iter().map(|m| m.id).collect();
                // Let go of the keys just before the confirm commits: a claimer that sees
                // the next head after the commit never finds the key still held.
                for id in &got {
                    holding.lock().unwrap().remove(&key_of[id]);
                }
                store.mark_confirmed(&got).await.unwrap();
            }
        }));
    }
    for t in tasks {
        common::within(120, "claimers finish", t)
            .await
            .expect("claimer");
    }
    let order = order.lock().unwrap().clone();
    for (key, expected) in &keyed.by_key {
        assert_eq!(order.get(key), Some(expected), "order of {key}");
    }
    assert_eq!(db.count(Status::Confirmed).await, 600);
}

/// How a test makes one of a key's rows fail.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Published to an exchange whose queue nacks: retried, then dead-lettered.
    Nacked,
    /// A column the engine cannot read: dead-lettered when claimed, with the rows after it
    /// in the same claim (its run) still to come.
    Unreadable,
}

/// 6 keys through the engine; row `at` of key k000 fails by `fault` until it is
/// dead-lettered (`at` 0: the head; else a row inside the head's run, published on the ack
/// of the one before).
async fn failing_row_run(mode: OnDeadLetter, at: usize, fault: Fault) {
    let db = TestDb::new("ord_block").await;
    let mut broker = TestBroker::new("ord_block").await;
    let nacks = broker.extra_exchange("nacks", ExchangeKind::Topic).await;
    broker.nacking_queue(&nacks).await;
    let keyed = insert_keyed(&db, &broker.exchange, 6, 20).await;
    let plain = db
        .insert_sql(&broker.exchange, 300, "routed.plain.{i}")
        .await;
    let stuck = keyed.by_key["k000"].clone();
    let set = match fault {
        Fault::Nacked => format!("exchange = '{nacks}'"),
        Fault::Unreadable => r#"headers = '{"n": 1e400}'"#.to_string(),
    };
    db.exec(&format!(
        "UPDATE {{s}}.outbox SET {set} WHERE id = '{}'",
        stuck[at]
    ))
    .await;
    let mut config = db.engine_config();
    config.retry.max_attempts = 2;
    // Every nack charged: a queue nacking alone for a while would be refunded.
    config.retry.nacks_refunded_for = Duration::ZERO;
    config.ordering.on_dead_letter = mode;
    let engine = Engine::start(config).await.expect("engine starts");
    // Other keys and unkeyed rows flow while k000 is stuck.
    let others: Vec<Uuid> = keyed
        .by_key
        .iter()
        .filter(|(k, _)| k.as_str() != "k000")
        .flat_map(|(_, ids)| ids.clone())
        .chain(plain.iter().copied())
        .collect();
    let head = engine.wait_for(stuck[at], WAIT).await.unwrap();
    assert!(matches!(head, Outcome::DeadLettered(_)), "{head:?}");
    let done = engine.wait_for_all(&others, WAIT).await.unwrap();
    assert!(done.values().all(|o| *o == Outcome::Confirmed));
    let store = db.store().await;
    if mode == OnDeadLetter::Block {
        // Every other key finished while k000 waited behind its dead letter.
        for id in &stuck[at + 1..] {
            assert_eq!(
                store.message_state(*id).await.unwrap(),
                Some(courier::testing::MessageState::Outbox(
                    Status::Pending,
                    None
                )),
                "k000's later messages wait for an operator"
            );
        }
        store.discard_dead_letters(&[stuck[at]]).await.unwrap();
    }
    let rest = engine.wait_for_all(&stuck[at + 1..], WAIT).await.unwrap();
    assert!(rest.values().all(|o| *o == Outcome::Confirmed));
    // A discarded dead letter is gone by an operator's decision; everything else is audited.
    let mut expected = keyed.clone();
    expected.by_key.get_mut("k000").unwrap().remove(at);
    let committed: Vec<Uuid> = keyed
        .all
        .iter()
        .chain(&plain)
        .filter(|id| mode == OnDeadLetter::Continue || **id != stuck[at])
        .copied()
        .collect();
    let (a, received) = audit_received(&db, &broker, &broker.queue, &committed).await;
    assert_eq!(a.dead_lettered, usize::from(mode == OnDeadLetter::Continue));
    assert_first_seen_in_order(&received, &expected);
    engine.shutdown().await;
}

#[actix_rt::test]
async fn a_failing_head_blocks_only_its_key_until_an_operator_discards_it() {
    failing_row_run(OnDeadLetter::Block, 0, Fault::Nacked).await;
}

#[actix_rt::test]
async fn a_failing_row_inside_a_run_stops_its_key_there_until_an_operator_discards_it() {
    failing_row_run(OnDeadLetter::Block, 7, Fault::Nacked).await;
}

#[actix_rt::test]
async fn an_unreadable_head_blocks_its_key_and_its_run_is_not_published() {
    failing_row_run(OnDeadLetter::Block, 0, Fault::Unreadable).await;
}

#[actix_rt::test]
async fn an_unreadable_row_inside_a_run_stops_its_key_there() {
    failing_row_run(OnDeadLetter::Block, 7, Fault::Unreadable).await;
}

#[actix_rt::test]
async fn with_continue_a_key_goes_on_past_its_unreadable_row() {
    failing_row_run(OnDeadLetter::Continue, 7, Fault::Unreadable).await;
}

#[actix_rt::test]
async fn with_continue_a_key_goes_on_past_its_dead_letter() {
    failing_row_run(OnDeadLetter::Continue, 0, Fault::Nacked).await;
}

#[actix_rt::test]
async fn keyed_rows_keep_their_order_without_notify_too() {
    let db = TestDb::new("ord_poll").await;
    let broker = TestBroker::new("ord_poll").await;
    let mut config = db.engine_config();
    config.database.listen = false;
    config.scheduler.sweep_interval = Duration::from_secs(2);
    let engine = Engine::start(config).await.expect("engine starts");
    let keyed = insert_keyed(&db, &broker.exchange, 10, 50).await;
    let done = engine.wait_for_all(&keyed.all, WAIT).await.unwrap();
    assert!(done.values().all(|o| *o == Outcome::Confirmed));
    let (_, received) = audit_received(&db, &broker, &broker.queue, &keyed.all).await;
    assert_first_seen_in_order(&received, &keyed);
    engine.shutdown().await;
}

/// Inserts `n` rows of key `key`, due `delay_ms` from now; returns their ids.
async fn insert_key(db: &TestDb, exchange: &str, key: &str, n: i32, delay_ms: i64) -> Vec<Uuid> {
    #[derive(diesel::QueryableByName)]
    struct Id {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        id: Uuid,
    }
    use diesel_async::RunQueryDsl;
    let mut conn = db.raw().await;
    let rows: Vec<Id> = diesel::sql_query(format!(
        "INSERT INTO \"{}\".outbox
             (exchange, routing_key, payload, ordering_key, next_attempt_at)
         SELECT $1, 'routed.' || $2 || '.' || n, 'x', $2,
                now() + $4 * interval '1 millisecond'
         FROM generate_series(1, $3) n
         RETURNING id",
        db.schema
    ))
    .bind::<diesel::sql_types::Text, _>(exchange)
    .bind::<diesel::sql_types::Text, _>(key)
    .bind::<diesel::sql_types::Integer, _>(n)
    .bind::<diesel::sql_types::BigInt, _>(delay_ms)
    .load(&mut conn)
    .await
    .expect("insert a key's rows");
    rows.into_iter().map(|r| r.id).collect()
}

/// Rows not confirmed yet, by key, for every key but `except`.
async fn open_by_key(db: &TestDb, except: &str) -> Vec<i64> {
    #[derive(diesel::QueryableByName)]
    struct Open {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    use diesel_async::RunQueryDsl;
    let mut conn = db.raw().await;
    let open: Vec<Open> = diesel::sql_query(format!(
        "SELECT count(*) FILTER (WHERE status <> 'confirmed') AS n FROM \"{}\".outbox
         WHERE ordering_key <> $1 GROUP BY ordering_key",
        db.schema
    ))
    .bind::<diesel::sql_types::Text, _>(except)
    .load(&mut conn)
    .await
    .expect("open rows by key");
    open.into_iter().map(|o| o.n).collect()
}

/// After a claim that saw every key, the engine probes only the keys it frees; a key that
/// becomes ready otherwise (here: a new key's insert) must still be served at once, not
/// after the busy keys drain.
#[actix_rt::test]
async fn a_new_key_is_served_while_busy_keys_keep_running() {
    let db = TestDb::new("ord_late_key").await;
    let broker = TestBroker::new("ord_late_key").await;
    let engine = Engine::start(db.engine_config())
        .await
        .expect("engine starts");
    // Four keys of 400: each key moves at one broker round trip per message.
    let busy = insert_keyed(&db, &broker.exchange, 4, 400).await;
    let started = engine.wait_for_all(&busy.all[..40], WAIT).await.unwrap();
    assert!(started.values().all(|o| *o == Outcome::Confirmed));
    let late = insert_key(&db, &broker.exchange, "late", 5, 0).await;
    let done = engine.wait_for_all(&late, WAIT).await.unwrap();
    assert!(done.values().all(|o| *o == Outcome::Confirmed));
    let open = open_by_key(&db, "late").await;
    assert_eq!(open.len(), 4);
    assert!(
        open.iter().all(|n| *n > 0),
        "the late key waited for a busy key to drain: {open:?}"
    );
    let all: Vec<Uuid> = busy.all.iter().chain(&late).copied().collect();
    let done = engine.wait_for_all(&all, WAIT).await.unwrap();
    assert!(done.values().all(|o| *o == Outcome::Confirmed));
    let (_, received) = audit_received(&db, &broker, &broker.queue, &busy.all).await;
    assert_first_seen_in_order(&received, &busy);
    engine.shutdown().await;
}

/// A key's next claim follows the settlement of the last row this engine held of it, in
/// whatever order the Ledger's flushes commit (two run at once, so a run's last row may
/// settle before the one ahead of it). With runs of two rows every few messages end a run,
/// and with the sweep out of the picture a key that missed its claim would wait ten
/// minutes: the drain must not.
#[actix_rt::test]
async fn every_run_of_a_key_is_followed_by_its_next_claim_without_the_sweep() {
    let db = TestDb::new("ord_run_ends").await;
    let broker = TestBroker::new("ord_run_ends").await;
    let mut config = db.engine_config();
    config.scheduler.sweep_interval = NO_SWEEP;
    config.ordering.run = 2;
    let engine = Engine::start(config).await.expect("engine starts");
    let keyed = insert_keyed(&db, &broker.exchange, 3, 1500).await;
    let done = engine
        .wait_for_all(&keyed.all, Duration::from_secs(90))
        .await
        .expect("every key drained without waiting for the sweep");
    assert!(done.values().all(|o| *o == Outcome::Confirmed));
    let (_, received) = audit_received(&db, &broker, &broker.queue, &keyed.all).await;
    assert_first_seen_in_order(&received, &keyed);
    engine.shutdown().await;
}

/// Once a walk has seen every key, settlements no longer walk: a keyed row delayed by its
/// producer must still go when it falls due, not at the next sweep or after the busy keys.
#[actix_rt::test]
async fn a_delayed_key_goes_when_due_while_busy_keys_keep_running() {
    let db = TestDb::new("ord_delayed_key").await;
    let broker = TestBroker::new("ord_delayed_key").await;
    let mut config = db.engine_config();
    config.scheduler.sweep_interval = NO_SWEEP;
    let engine = Engine::start(config).await.expect("engine starts");
    let later = insert_key(&db, &broker.exchange, "later", 1, 300).await;
    let busy = insert_keyed(&db, &broker.exchange, 4, 1000).await;
    let done = engine.wait_for_all(&later, WAIT).await.unwrap();
    assert!(done.values().all(|o| *o == Outcome::Confirmed));
    let open = open_by_key(&db, "later").await;
    assert!(
        open.iter().sum::<i64>() > 0,
        "the delayed key waited for the busy keys to drain"
    );
    let done = engine.wait_for_all(&busy.all, WAIT).await.unwrap();
    assert!(done.values().all(|o| *o == Outcome::Confirmed));
    engine.shutdown().await;
}

/// Keys whose only rows are delayed are visited by a walk too: a walk visits at most 1,000
/// keys on each side of its cursor, and one that finds nothing moves the cursor past them,
/// so a ready key far beyond them is reached by a later walk, not by one that visits them
/// all.
#[tokio::test]
async fn a_walk_is_bounded_and_goes_on_past_keys_whose_rows_are_delayed() {
    let db = TestDb::new("ord_bounded").await;
    let store = db.store().await;
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, payload, ordering_key, next_attempt_at)
         SELECT 'ex', 'r', 'x', 'a' || lpad(i::text, 5, '0'), now() + interval '1 hour'
         FROM generate_series(1, 2500) i",
    )
    .await;
    db.exec(
        "INSERT INTO {s}.outbox (exchange, routing_key, payload, ordering_key)
         SELECT 'ex', 'r', 'x', 'z' || i FROM generate_series(1, 3) i",
    )
    .await;
    let mut scan = runs_of(0);
    let mut walks = 0;
    let found = loop {
        walks += 1;
        assert!(walks <= 4, "the ready keys were never reached");
        let claimed = store
            .claim_keyed("e", 100, LONG, &scan)
            .await
            .expect("claim");
        if !claimed.messages.is_empty() {
            break claimed.messages;
        }
        assert!(
            claimed.next_key > scan.after,
            "the cursor moves on: {:?}",
            claimed.next_key
        );
        scan.after = claimed.next_key;
    };
    assert_eq!(
        walks, 3,
        "1,000 delayed keys per walk before the ready ones"
    );
    let keys: Vec<_> = found
        .iter()
        .filter_map(|m| m.ordering_key.clone())
        .collect();
    assert_eq!(keys, ["z1", "z2", "z3"]);
}

/// The bound on a walk costs no latency: a walk cut by it is followed by the next at once,
/// so one wake-up (here an insert's NOTIFY; the sweep is ten minutes away) reaches a new key
/// behind thousands of keys whose only row is delayed.
#[actix_rt::test]
async fn a_new_key_behind_thousands_of_delayed_keys_goes_at_the_first_wake_up() {
    let db = TestDb::new("ord_chain").await;
    let broker = TestBroker::new("ord_chain").await;
    db.exec(&format!(
        "INSERT INTO {{s}}.outbox (exchange, routing_key, payload, ordering_key, next_attempt_at)
         SELECT '{}', 'routed.d', 'x', 'a' || lpad(i::text, 5, '0'), now() + interval '1 hour'
         FROM generate_series(1, 3500) i",
        broker.exchange
    ))
    .await;
    let mut config = db.engine_config();
    config.scheduler.sweep_interval = NO_SWEEP;
    let engine = Engine::start(config).await.expect("engine starts");
    let new = insert_key(&db, &broker.exchange, "zz", 1, 0).await;
    let outcome = engine
        .wait_for(new[0], Duration::from_secs(30))
        .await
        .expect("the new key's row, at its insert's NOTIFY");
    assert_eq!(outcome, Outcome::Confirmed);
    engine.shutdown().await;
}

/// Claimed rows' ids by key, in the order the claim returned them.
fn by_key(claimed: &[OutboxMessage]) -> HashMap<String, Vec<Uuid>> {
    let mut by_key: HashMap<String, Vec<Uuid>> = HashMap::new();
    for m in claimed {
        by_key
            .entry(m.ordering_key.clone().unwrap_or_default())
            .or_default()
            .push(m.id);
    }
    by_key
}

fn runs_of(n: u32) -> KeyScan {
    KeyScan {
        after: None,
        block_on_dead_letter: true,
        run: n,
        heads: None,
    }
}

#[tokio::test]
async fn a_keyed_claim_takes_each_heads_run_in_order_and_stops_at_a_row_not_due() {
    let db = TestDb::new("ord_runs").await;
    let store = db.store().await;
    let keyed = insert_keyed(&db, "ex", 3, 6).await;
    // k001's fourth row is delayed: its run must end before it, never skip it.
    let delayed = keyed.by_key["k001"][3];
    db.exec(&format!(
        "UPDATE \"{}\".outbox SET next_attempt_at = now() + interval '1 hour' WHERE id = '{delayed}'",
        db.schema
    ))
    .await;
    let claimed = store
        .claim_keyed("e", 100, LONG, &runs_of(4))
        .await
        .expect("claim")
        .messages;
    let got: Vec<(String, Uuid)> = claimed
        .iter()
        .map(|m| (m.ordering_key.clone().unwrap_or_default(), m.id))
        .collect();
    let mut expected = Vec::new();
    for (key, ids) in &keyed.by_key {
        let take = if key == "k001" { 3 } else { 5 };
        expected.extend(ids[..take].iter().map(|id| (key.clone(), *id)));
    }
    assert_eq!(
        got, expected,
        "heads and runs, by key then seq, nothing skipped"
    );
    // Within the row limit, runs fill after every head: no key's row without its head.
    let db2 = TestDb::new("ord_runs_limit").await;
    let store2 = db2.store().await;
    let keyed2 = insert_keyed(&db2, "ex", 4, 5).await;
    let claimed = store2
        .claim_keyed("e", 6, LONG, &runs_of(4))
        .await
        .expect("claim")
        .messages;
    assert_eq!(claimed.len(), 6, "the row limit holds");
    let by_key = by_key(&claimed);
    assert_eq!(by_key.len(), 4, "every head first: {by_key:?}");
    for (key, ids) in &by_key {
        assert_eq!(
            ids[..],
            keyed2.by_key[key][..ids.len()],
            "a prefix of {key}'s rows"
        );
    }
}

#[tokio::test]
async fn a_claim_of_listed_keys_takes_their_heads_and_runs_and_nothing_else() {
    let db = TestDb::new("ord_listed").await;
    let store = db.store().await;
    let keyed = insert_keyed(&db, "ex", 4, 4).await;
    // k002 has its head in flight (another engine's): listed, it is still skipped.
    let busy = store
        .claim_keys("other", 100, LONG, &runs_of(0), &["k002".into()])
        .await
        .expect("claim")
        .messages;
    assert_eq!(busy.len(), 1, "k002's head alone");
    assert_eq!(busy[0].id, keyed.by_key["k002"][0]);
    // k000 twice: a key freed, taken back and freed again before the claim.
    let only: Vec<String> = ["k000", "k002", "k003", "nobody", "k000"]
        .map(String::from)
        .into();
    let claimed = store
        .claim_keys("e", 100, LONG, &runs_of(2), &only)
        .await
        .expect("claim");
    assert_eq!(claimed.candidates, 2, "k000 and k003 were ready");
    let by_key = by_key(&claimed.messages);
    assert_eq!(
        by_key.keys().cloned().collect::<HashSet<_>>(),
        HashSet::from(["k000".to_string(), "k003".to_string()]),
        "listed keys with nothing in flight only: k001 is not listed, k002 is busy"
    );
    for (key, ids) in &by_key {
        assert_eq!(
            ids[..],
            keyed.by_key[key][..3],
            "{key}: head and run, in order"
        );
    }
}

#[tokio::test]
async fn a_dead_engines_run_is_taken_back_one_row_at_a_time_in_order() {
    let db = TestDb::new("ord_run_rescue").await;
    let store = db.store().await;
    let keyed = insert_keyed(&db, "ex", 1, 5).await;
    let ids = &keyed.by_key["k000"];
    let held = store
        .claim_keyed("dead", 100, LONG, &runs_of(10))
        .await
        .expect("claim")
        .messages;
    assert_eq!(held.len(), 5, "the head and its run");
    // The engine dies: its leases end (as the registry's rescue or the lease itself does).
    db.exec(&format!(
        "UPDATE \"{}\".outbox SET locked_until = now() - interval '1 second'",
        db.schema
    ))
    .await;
    for (n, id) in ids.iter().enumerate() {
        let taken = store.claim("live", 100, LONG).await.expect("claim");
        assert_eq!(
            taken.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![*id],
            "round {n}: only the key's first open row"
        );
        assert!(
            store
                .claim("live", 100, LONG)
                .await
                .expect("claim")
                .is_empty(),
            "round {n}: the next waits for it"
        );
        store.mark_confirmed(&[*id]).await.unwrap();
    }
}

#[tokio::test]
async fn a_keyed_claim_takes_at_most_its_heads_and_gives_the_rest_of_its_rows_to_their_runs() {
    let db = TestDb::new("ord_run_heads").await;
    let store = db.store().await;
    let keyed = insert_keyed(&db, "ex", 4, 5).await;
    let scan = KeyScan {
        heads: Some(2),
        ..runs_of(3)
    };
    let claimed = store
        .claim_keyed("e", 100, LONG, &scan)
        .await
        .expect("claim");
    assert_eq!(claimed.candidates, 2, "the walk stopped at its limit");
    let by_key = by_key(&claimed.messages);
    assert_eq!(by_key.len(), 2, "two heads: {by_key:?}");
    for (key, ids) in &by_key {
        assert_eq!(
            ids[..],
            keyed.by_key[key][..4],
            "{key}: its head and a run of three"
        );
    }
}

/// A producer that sets `seq` itself can give several rows of a key the same value. Those
/// rows have no order among themselves, but a later `seq` may never pass one of them: an
/// audit saw a1, a4, a2, a3 for a1–a3 at 100 and a4 at 101 (a run took the rows after the
/// head's `seq`, skipping the head's equals).
#[tokio::test]
async fn rows_sharing_a_seq_are_never_passed_by_a_later_seq() {
    let seqs: [i64; 9] = [100, 100, 100, 101, 102, 102, 103, 104, 104];
    for run in [0, 1, 2, 8] {
        let db = TestDb::new(&format!("ord_dup_seq_{run}")).await;
        let store = db.store().await;
        for (i, seq) in seqs.iter().enumerate() {
            db.exec(&format!(
                "INSERT INTO \"{}\".outbox (exchange, routing_key, payload, ordering_key, seq)
                 VALUES ('ex', 'r.{i}', '\\x00', 'dup', {seq})",
                db.schema
            ))
            .await;
        }
        let mut order: Vec<i64> = Vec::new();
        for _ in 0..seqs.len() {
            let claimed = store
                .claim_keyed("e", 100, LONG, &runs_of(run))
                .await
                .expect("claim")
                .messages;
            if claimed.is_empty() {
                break;
            }
            let got: Vec<Uuid> = claimed.iter().map(|m| m.id).collect();
            for m in &claimed {
                let i: usize = m.routing_key[2..].parse().expect("r.<i>");
                order.push(seqs[i]);
            }
            store.mark_confirmed(&got).await.expect("confirm");
        }
        assert_eq!(
            order.len(),
            seqs.len(),
            "runs of {run}: every row: {order:?}"
        );
        assert!(
            order.windows(2).all(|w| w[0] <= w[1]),
            "runs of {run}: a later seq passed an earlier one: {order:?}"
        );
    }
}
