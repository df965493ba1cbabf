//! What a crash costs (issue #13): real `courier run` processes on the real services, at the
//! default heartbeat (1 s), engine timeout (5 s) and lease (60 s). An engine killed with
//! `kill -9` is declared dead by a live engine within about the engine timeout and its rows
//! are taken over at once, well before its leases would lapse; an engine frozen with
//! `SIGSTOP` past the engine timeout is taken over the same way, and once resumed it stops,
//! rejoins and undoes nothing. Every test ends with the audit and reports duplicates and
//! the time to recover.

mod common;

use courier::testing::StoreInternals as _;
use std::time::{Duration, Instant};

use common::{audit::audit, broker::TestBroker, eventually, EngineProcess, TestDb};
use courier::{testing::EngineRecord, Status};
use uuid::Uuid;

const ROWS: usize = 5_000;

/// Every row confirmed within this of the kill (the target is 10 s; the lease alone
/// would take 60 s).
const RECOVER_WITHIN: Duration = Duration::from_secs(15);

/// A sanity bound on the duplicates a crash may cost: half the rows. Measured runs here
/// range from 0 % to 16 % (README, "What a crash costs"), against 20–67 % when every
/// claimed row went to the broker at once; the 5 % target is not met yet, so the test
/// reports the figure and fails only far above it.
const MOST_DUPLICATES: usize = ROWS / 2;

async fn engines(db: &TestDb) -> Vec<EngineRecord> {
    db.store()
        .await
        .engines(Duration::from_secs(5))
        .await
        .expect("read the registry")
}

/// Waits until `n` engines are registered as running.
async fn running(db: &TestDb, n: usize) {
    eventually(30, "engines registered", || async {
        let live = engines(db).await;
        (live.iter().filter(|e| e.state == "running").count() == n).then_some(())
    })
    .await;
}

/// Waits for every row confirmed; returns how long it took from `since`.
async fn all_confirmed(db: &TestDb, ids: &[Uuid], since: Instant) -> Duration {
    eventually(120, "every row confirmed", || async {
        (db.count(Status::Confirmed).await == ids.len() as i64).then_some(())
    })
    .await;
    since.elapsed()
}

async fn kill_at_a_fifth(db: &TestDb, victim: &mut EngineProcess) -> (Instant, i64) {
    eventually(60, "a fifth of the rows confirmed", || async {
        (db.count(Status::Confirmed).await >= (ROWS / 5) as i64).then_some(())
    })
    .await;
    victim.child.kill().expect("kill -9");
    let killed = Instant::now();
    victim.wait(10).await;
    (killed, db.count(Status::InFlight).await)
}

/// The audit, the figures, and the bounds on time to recover and duplicates.
async fn audit_crash(
    db: &TestDb,
    broker: &TestBroker,
    ids: &[Uuid],
    recovered: Duration,
    what: &str,
) {
    let audit = audit(db, broker, &broker.queue, ids).await;
    assert_eq!(audit.confirmed, ids.len());
    eprintln!(
        "{what}, every row confirmed {recovered:?} after it, {} duplicates of {}",
        audit.duplicates,
        ids.len()
    );
    assert!(recovered < RECOVER_WITHIN, "recovered after {recovered:?}");
    assert!(audit.duplicates <= MOST_DUPLICATES, "{audit:?}");
}

#[tokio::test]
async fn kill_9_with_a_second_engine_running_recovers_in_seconds() {
    let db = TestDb::new("crash2").await;
    let broker = TestBroker::new("crash2").await;
    let env = db.process_env();
    let mut a = EngineProcess::spawn("crash2-a", &env);
    let mut b = EngineProcess::spawn("crash2-b", &env);
    running(&db, 2).await;
    let ids = db.insert_sql(&broker.exchange, ROWS, "routed.{i}").await;
    let (killed, stranded) = kill_at_a_fifth(&db, &mut a).await;
    let recovered = all_confirmed(&db, &ids, killed).await;
    let registry = engines(&db).await;
    assert_eq!(
        registry.iter().filter(|e| e.state == "dead").count(),
        1,
        "the killed engine is declared dead: {registry:?}"
    );
    assert!(b.terminate(30).await.success(), "{}", b.log());
    let what = format!("kill -9 beside a live engine: {stranded} rows in flight at the kill");
    audit_crash(&db, &broker, &ids, recovered, &what).await;
    assert!(
        b.log().contains("declared it dead and freed the rows"),
        "{}",
        b.log()
    );
}

#[tokio::test]
async fn kill_9_then_a_fresh_engine_recovers_in_seconds() {
    let db = TestDb::new("crash1").await;
    let broker = TestBroker::new("crash1").await;
    let env = db.process_env();
    let mut a = EngineProcess::spawn("crash1-a", &env);
    running(&db, 1).await;
    let ids = db.insert_sql(&broker.exchange, ROWS, "routed.{i}").await;
    let (killed, stranded) = kill_at_a_fifth(&db, &mut a).await;
    let mut b = EngineProcess::spawn("crash1-b", &env);
    let recovered = all_confirmed(&db, &ids, killed).await;
    // The fresh engine may have confirmed every row before `scheduler.engine_timeout` passed
    // (a kill that strands few rows): the killed engine is declared dead only after it.
    let killed_pid = a.child.id() as i32;
    eventually(30, "the killed engine declared dead", || async {
        let registry = engines(&db).await;
        registry
            .iter()
            .any(|e| e.state == "dead" && e.pid == killed_pid)
            .then_some(())
    })
    .await;
    assert!(b.terminate(30).await.success(), "{}", b.log());
    let what = format!("kill -9, fresh engine: {stranded} rows in flight at the kill");
    audit_crash(&db, &broker, &ids, recovered, &what).await;
    let registry = engines(&db).await;
    assert!(
        registry.iter().all(|e| e.state == "dead"),
        "the fresh engine left the registry on its clean stop; the killed one is dead: {registry:?}"
    );
}

#[tokio::test]
async fn a_frozen_engine_is_taken_over_and_once_resumed_undoes_nothing() {
    let db = TestDb::new("frozen").await;
    let broker = TestBroker::new("frozen").await;
    let env = db.process_env();
    let mut a = EngineProcess::spawn("frozen-a", &env);
    let mut b = EngineProcess::spawn("frozen-b", &env);
    running(&db, 2).await;
    let mut ids = db.insert_sql(&broker.exchange, ROWS, "routed.{i}").await;
    eventually(60, "a fifth of the rows confirmed", || async {
        (db.count(Status::Confirmed).await >= (ROWS / 5) as i64).then_some(())
    })
    .await;
    assert!(a.signal("-STOP"), "SIGSTOP");
    let frozen = Instant::now();
    // More rows while it is frozen: the live engine must take them and the frozen one's.
    ids.extend(
        db.insert_sql(&broker.exchange, 1_000, "routed.more.{i}")
            .await,
    );
    eventually(30, "the frozen engine declared dead", || async {
        let registry = engines(&db).await;
        registry
            .iter()
            .any(|e| e.state == "dead" && e.pid == a.child.id() as i32)
            .then_some(())
    })
    .await;
    let taken_over = frozen.elapsed();
    let recovered = all_confirmed(&db, &ids, frozen).await;
    let confirmed_before = db.count(Status::Confirmed).await;
    assert!(a.signal("-CONT"), "SIGCONT");
    // It finds itself declared dead, and rejoins.
    eventually(30, "the resumed engine rejoins", || async {
        let registry = engines(&db).await;
        registry
            .iter()
            .any(|e| e.state == "running" && e.pid == a.child.id() as i32)
            .then_some(())
    })
    .await;
    // Undoes nothing: every row stays confirmed, none goes back to retrying or in flight.
    let after: Vec<Uuid> = db
        .insert_sql(&broker.exchange, 100, "routed.after.{i}")
        .await;
    ids.extend(after);
    all_confirmed(&db, &ids, frozen).await;
    assert_eq!(db.count(Status::Retrying).await, 0);
    assert_eq!(db.count(Status::InFlight).await, 0);
    assert!(db.count(Status::Confirmed).await >= confirmed_before);
    assert!(a.terminate(30).await.success(), "{}", a.log());
    assert!(b.terminate(30).await.success(), "{}", b.log());
    assert!(
        a.log().contains("had been declared dead"),
        "the resumed engine says what happened: {}",
        a.log()
    );
    let audit = audit(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(audit.confirmed, ids.len());
    assert_eq!(audit.dead_lettered, 0);
    eprintln!(
        "SIGSTOP: declared dead {taken_over:?} after the freeze, every row confirmed {recovered:?} after it, {} duplicates of {}",
        audit.duplicates,
        ids.len()
    );
    assert!(recovered < RECOVER_WITHIN, "recovered after {recovered:?}");
}

/// Rows of `engine` in flight now (its `locked_by`).
async fn held_by(db: &TestDb, pid: u32) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    use diesel_async::RunQueryDsl;
    let sql = format!(
        "SELECT count(*) AS n FROM \"{s}\".outbox o JOIN \"{s}\".engines e ON e.id = o.locked_by
         WHERE o.status = 'in_flight' AND e.pid = {pid}",
        s = db.schema
    );
    diesel::sql_query(sql)
        .get_result::<N>(&mut db.raw().await)
        .await
        .expect("held rows")
        .n
}

/// A lease shorter than the engine timeout (allowed): an engine frozen past its lease is not
/// declared dead, but another takes its rows as the leases lapse. Once resumed it must not
/// publish the rows it held from memory. An audit saw it publish them all: 1,279 duplicates
/// of 6,000 and a key's older message after a newer one, 1,099 times.
#[actix_rt::test]
async fn a_frozen_engine_whose_leases_lapsed_publishes_nothing_it_held_once_resumed() {
    use common::{
        audit::audit_received,
        ordering::{assert_first_seen_in_order, insert_keyed},
    };
    const KEYS: usize = 40;
    let db = TestDb::new("lapsed").await;
    let broker = TestBroker::new("lapsed").await;
    let mut env = db.process_env();
    env.push(("COURIER_SCHEDULER_LEASE_DURATION", "3s".into()));
    env.push(("COURIER_SCHEDULER_ENGINE_TIMEOUT", "60s".into()));
    let keyed = insert_keyed(&db, &broker.exchange, KEYS, 150).await;
    let ids: Vec<Uuid> = keyed.by_key.values().flatten().copied().collect();
    let mut a = EngineProcess::spawn("lapsed-a", &env);
    eventually(60, "the first engine publishing", || async {
        (db.count(Status::Confirmed).await >= 200).then_some(())
    })
    .await;
    let mut b = EngineProcess::spawn("lapsed-b", &env);
    running(&db, 2).await;
    eventually(60, "the first engine holding runs", || async {
        (held_by(&db, a.child.id()).await >= 2 * KEYS as i64).then_some(())
    })
    .await;
    assert!(a.signal("-STOP"), "SIGSTOP");
    let frozen = Instant::now();
    let held = held_by(&db, a.child.id()).await;
    // Past the lease: the other engine takes the frozen one's rows as their leases lapse.
    eventually(30, "the frozen engine's rows taken over", || async {
        (held_by(&db, a.child.id()).await < held).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // frozen a little longer: more taken
    assert!(a.signal("-CONT"), "SIGCONT");
    let recovered = all_confirmed(&db, &ids, frozen).await;
    assert!(a.terminate(30).await.success(), "{}", a.log());
    assert!(b.terminate(30).await.success(), "{}", b.log());
    let (audit, received) = audit_received(&db, &broker, &broker.queue, &ids).await;
    assert_eq!(audit.confirmed, ids.len());
    assert_first_seen_in_order(&received, &keyed);
    // A key's older message after a newer one: only a row of each key that was in flight
    // at the freeze may come again (published once more by the engine that took it over).
    let key_of = keyed.key_of();
    let position: std::collections::HashMap<Uuid, usize> = keyed
        .by_key
        .values()
        .flat_map(|ids| ids.iter().enumerate().map(|(i, id)| (*id, i)))
        .collect();
    let mut newest: std::collections::HashMap<&str, usize> = Default::default();
    let mut stale = 0;
    for r in &received {
        let (Some(key), Some(&at)) = (key_of.get(&r.id), position.get(&r.id)) else {
            continue;
        };
        let top = newest.entry(key).or_insert(at);
        if at < *top {
            stale += 1;
        }
        *top = (*top).max(at);
    }
    eprintln!(
        "lapsed leases: {held} rows held at the freeze, {} duplicates, {stale} stale repeats, every row confirmed {recovered:?} after the freeze",
        audit.duplicates
    );
    assert!(
        stale <= 2 * KEYS && audit.duplicates <= 4 * KEYS,
        "the resumed engine published rows it held from memory: {stale} stale repeats, {} duplicates",
        audit.duplicates
    );
}
