//! RabbitMQ topologies beyond one local node: a three-node cluster with a quorum queue whose
//! nodes are stopped and killed under the engine, and a TLS node that requires client
//! certificates. Every node is an extra one (own names, ports, data and cookie, through
//! `scripts/topology/`), torn down by a guard even when a test fails. Heavy: every test is
//! `#[ignore]` and runs in its own serial step:
//! `cargo test --test topology_rabbit -- --ignored --test-threads=1`.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{
    audit::audit, broker::TestBroker, events::confirmed_at_least, topology::Topology, unique_name,
    within, TestDb,
};
use courier::{
    config::{BrokerUrls, SecretUrl},
    events::EngineEvent,
    Engine, OutboxMessage,
};
use lapin::types::{AMQPValue, FieldTable};
use uuid::Uuid;

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Inserts rows in small batches until told to stop: the engine is always mid-stream.
async fn producer(
    db: &TestDb,
    exchange: &str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Uuid>> {
    let store = db.store().await;
    let exchange = exchange.to_string();
    tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let batch: Vec<OutboxMessage> = (0..100)
                .map(|_| {
                    i += 1;
                    OutboxMessage::new(&exchange, format!("routed.{i}"), vec![b'm'; 64])
                })
                .collect();
            store.enqueue_many(&batch).await.expect("enqueue");
            ids.extend(batch.iter().map(|m| m.id));
            tokio::time::sleep(Duration::from_millis(25)).await; // pacing the load, not a wait
        }
        ids
    })
}

/// After a fault on the engine's node: how long from the engine seeing the loss to the
/// first confirm on another node.
async fn time_to_resume(events: &mut tokio::sync::broadcast::Receiver<EngineEvent>) -> Duration {
    within(30, "the engine to lose its node", async {
        loop {
            if let Ok(EngineEvent::BrokerDisconnected(why)) = events.recv().await {
                eprintln!("engine lost its node: {why}");
                return;
            }
        }
    })
    .await;
    let lost = Instant::now();
    within(30, "a confirm on another node", async {
        let mut reconnected = false;
        loop {
            match events.recv().await {
                Ok(EngineEvent::BrokerConnected) => reconnected = true,
                Ok(EngineEvent::Confirmed(_)) if reconnected => return,
                _ => {}
            }
        }
    })
    .await;
    lost.elapsed()
}

#[actix_rt::test]
#[ignore = "topology: starts a 3-node RabbitMQ cluster (serial CI step)"]
async fn cluster_node_stopped_then_killed_mid_stream_loses_nothing() {
    let cluster = Topology::cluster("c", 5681, 3).await;
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let db = TestDb::new("cluster").await;
    let broker = TestBroker::at(&urls[0], "cluster", quorum()).await;
    let mut config = db.engine_config();
    config.broker.url = BrokerUrls::from(urls.iter().map(SecretUrl::new).collect::<Vec<_>>());
    config.broker.connect_timeout = Duration::from_secs(2);
    config.broker.connection_name = unique_name("engine");
    config.retry.max_attempts = 20;
    let name = config.broker.connection_name.clone();
    let engine = Engine::start(config).await.expect("engine");
    let mut events = engine.subscribe();
    let stop = Arc::new(AtomicBool::new(false));
    let rows = producer(&db, &broker.exchange, stop.clone()).await;
    confirmed_at_least(&mut events, 500).await;

    // 1. Graceful stop of the engine's node.
    let first = cluster.node_of(&name).await.expect("the engine's node");
    let t = Instant::now();
    cluster.stop(first).await;
    let resumed = time_to_resume(&mut events).await;
    eprintln!("stop of node {first}: publishing resumed {resumed:?} after the loss ({:?} after the stop command)", t.elapsed());
    assert!(
        resumed < Duration::from_secs(5),
        "resumed after {resumed:?}"
    );
    confirmed_at_least(&mut events, 500).await;

    // The stopped node comes back (a quorum queue needs two of three), then kill -9 of
    // whichever node the engine is on now.
    cluster.start(first, None).await;
    confirmed_at_least(&mut events, 500).await;
    let second = cluster.node_of(&name).await.expect("the engine's node");
    assert_ne!(second, first, "the engine moved off the stopped node");
    let t = Instant::now();
    cluster.kill(second).await;
    let resumed_kill = time_to_resume(&mut events).await;
    eprintln!("kill -9 of node {second}: publishing resumed {resumed_kill:?} after the loss ({:?} after the kill)", t.elapsed());
    assert!(
        resumed_kill < Duration::from_secs(5),
        "resumed after {resumed_kill:?}"
    );
    confirmed_at_least(&mut events, 500).await;

    stop.store(true, Ordering::Relaxed);
    let ids = within(60, "the producer to stop", rows)
        .await
        .expect("producer");
    engine
        .wait_for_all(&ids, Duration::from_secs(120))
        .await
        .expect("every row settles");
    let survivor = (0..3).find(|i| *i != second).unwrap_or(0);
    let audit_broker =
        TestBroker::at(&urls[survivor], "cluster-audit", FieldTable::default()).await;
    let a = audit(&db, &audit_broker, &broker.queue, &ids).await;
    assert_eq!(a.confirmed, ids.len());
    eprintln!(
        "cluster: {} rows, stop → resumed in {resumed:?}, kill -9 → resumed in {resumed_kill:?}, {} duplicates, {} reconnects",
        ids.len(),
        a.duplicates,
        engine.counters().reconnects
    );
    engine.shutdown().await;
    drop(broker);
    cluster.start(second, None).await; // so the guards' clean-up finds a quorum
}
