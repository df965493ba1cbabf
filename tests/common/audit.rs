//! The audit every fault test ends with: every committed row is `confirmed` and was
//! received by a consumer at least once, or sits in `dead_letters` with a reason.
//! Duplicates are counted and reported.

use courier::testing::StoreInternals as _;
use std::collections::HashMap;

use courier::Outcome;
use uuid::Uuid;

use super::{
    broker::{Received, TestBroker},
    TestDb,
};

/// What the audit found.
#[derive(Debug, Clone, Copy)]
pub struct Audit {
    pub committed: usize,
    pub confirmed: usize,
    pub dead_lettered: usize,
    pub received: usize,
    pub duplicates: usize,
}

/// Runs the audit over `committed` ids against `queue`; panics on any loss.
pub async fn audit(db: &TestDb, broker: &TestBroker, queue: &str, committed: &[Uuid]) -> Audit {
    audit_received(db, broker, queue, committed).await.0
}

/// [`audit`], also returning what the consumer received, in the order it arrived.
pub async fn audit_received(
    db: &TestDb,
    broker: &TestBroker,
    queue: &str,
    committed: &[Uuid],
) -> (Audit, Vec<Received>) {
    let store = db.store().await;
    let outcomes = store.outcomes(committed).await.expect("read outcomes");
    let mut confirmed = 0;
    let mut dead = 0;
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for id in committed {
        match outcomes.get(id) {
            Some(Outcome::Confirmed) => confirmed += 1,
            Some(Outcome::DeadLettered(why)) => {
                assert!(!why.is_empty(), "dead letter {id} has no reason");
                *reasons.entry(why.clone()).or_default() += 1;
                dead += 1;
            }
            None => panic!(
                "LOST: committed message {id} is neither confirmed nor dead-lettered ({:?})",
                store.message_state(*id).await
            ),
        }
    }
    let depth = broker.depth(queue).await as usize;
    let received = broker.take(queue, depth, 120).await;
    let mut counts: HashMap<Uuid, usize> = HashMap::new();
    for r in &received {
        *counts.entry(r.id).or_default() += 1;
    }
    for id in committed {
        if outcomes.get(id) == Some(&Outcome::Confirmed) {
            assert!(
                counts.contains_key(id),
                "LOST: {id} is confirmed but no consumer received it"
            );
        }
    }
    let duplicates = received.len() - counts.len();
    let a = Audit {
        committed: committed.len(),
        confirmed,
        dead_lettered: dead,
        received: received.len(),
        duplicates,
    };
    eprintln!("audit: {a:?}");
    for (why, n) in reasons.iter().take(5) {
        eprintln!("audit: {n} dead-lettered: {why}");
    }
    (a, received)
}
