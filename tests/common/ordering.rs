//! Keyed rows for the per-key ordering tests, and the check every such test ends with:
//! each key's messages were first seen by the consumer in insertion order, none missing.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

use super::{broker::Received, TestDb};

/// Rows inserted with ordering keys: each key's ids in insertion (`seq`) order.
#[derive(Debug, Default, Clone)]
pub struct Keyed {
    pub by_key: BTreeMap<String, Vec<Uuid>>,
    pub all: Vec<Uuid>,
}

impl Keyed {
    /// The key of each id.
    pub fn key_of(&self) -> HashMap<Uuid, &str> {
        self.by_key
            .iter()
            .flat_map(|(k, ids)| ids.iter().map(move |id| (*id, k.as_str())))
            .collect()
    }
}

/// Inserts `per_key` rows for each of `keys` keys (`k000`, `k001`, …) with the contract's
/// SQL, interleaved (`n` = 1 for every key, then `n` = 2, …), routing key
/// `routed.<key>.<n>`. Checks that `seq` follows the insertion order of each key.
pub async fn insert_keyed(db: &TestDb, exchange: &str, keys: usize, per_key: usize) -> Keyed {
    #[derive(diesel::QueryableByName)]
    struct Row {
        #[diesel(sql_type = diesel::sql_types::Uuid)]
        id: Uuid,
        #[diesel(sql_type = diesel::sql_types::Text)]
        ordering_key: String,
        #[diesel(sql_type = diesel::sql_types::Integer)]
        n: i32,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        seq: i64,
    }
    use diesel_async::RunQueryDsl;
    let mut conn = db.raw().await;
    let sql = format!(
        "WITH ins AS (
            INSERT INTO \"{}\".outbox (exchange, routing_key, payload, ordering_key)
            SELECT $1, 'routed.k' || lpad(k::text, 3, '0') || '.' || n,
                   convert_to(n::text, 'UTF8'), 'k' || lpad(k::text, 3, '0')
            FROM generate_series(1, $3) AS n, generate_series(0, $2 - 1) AS k
            ORDER BY n, k
            RETURNING id, ordering_key, routing_key, seq)
         SELECT id, ordering_key, split_part(routing_key, '.', 3)::int AS n, seq FROM ins",
        db.schema
    );
    let mut rows: Vec<Row> = diesel::sql_query(sql)
        .bind::<diesel::sql_types::Text, _>(exchange)
        .bind::<diesel::sql_types::Integer, _>(keys as i32)
        .bind::<diesel::sql_types::Integer, _>(per_key as i32)
        .load(&mut conn)
        .await
        .expect("insert keyed rows");
    rows.sort_by_key(|r| r.seq);
    let mut keyed = Keyed::default();
    let mut last_n: HashMap<String, i32> = HashMap::new();
    for r in rows {
        let prev = last_n.insert(r.ordering_key.clone(), r.n).unwrap_or(0);
        assert_eq!(r.n, prev + 1, "seq must follow insertion order");
        keyed.all.push(r.id);
        keyed.by_key.entry(r.ordering_key).or_default().push(r.id);
    }
    keyed
}

/// Every key's messages were first seen in insertion order, and none is missing (ids of
/// `expected` only; repeats of a message already seen are duplicates, allowed).
pub fn assert_first_seen_in_order(received: &[Received], expected: &Keyed) {
    let key_of = expected.key_of();
    let mut seen: HashMap<&str, Vec<Uuid>> = HashMap::new();
    for r in received {
        if let Some(key) = key_of.get(&r.id) {
            let list = seen.entry(key).or_default();
            if !list.contains(&r.id) {
                list.push(r.id);
            }
        }
    }
    for (key, ids) in &expected.by_key {
        let got = seen.get(key.as_str()).cloned().unwrap_or_default();
        let first_wrong = ids.iter().zip(&got).position(|(a, b)| a != b);
        assert!(
            first_wrong.is_none() && got.len() == ids.len(),
            "key {key}: {} of {} messages seen, first out of order at position {first_wrong:?}",
            got.len(),
            ids.len()
        );
    }
}
