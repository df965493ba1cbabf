//! Taking due rows: unkeyed rows (and expired leases) in one statement, the heads of keyed
//! rows in another, and how long until the next row falls due.
//!
//! A claim sets `in_flight`, names this engine in `locked_by`, leases the row until
//! `locked_until` and counts the attempt. SKIP LOCKED lets several engines claim at once
//! without waiting on each other or sharing a row. Rows that can never be published are
//! dead-lettered in the same call (see [`row`]).

mod row;

use std::time::Duration;

use diesel::sql_types::{Array, BigInt, Bool, Text};

use super::{
    clamp_i64, dead_letters::DeadLetterUpdate, millis, stats::AgeRow, Schema, Store, StoreError,
};
use crate::message::OutboxMessage;
use row::{message_columns, ClaimedRow};

/// How much one claim may take: rows, and bytes of payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimits {
    /// Most rows.
    pub rows: u32,
    /// Most payload bytes (the first row is always taken, whatever its size).
    pub bytes: u64,
    /// `publisher.max_payload_bytes`: a larger payload is never fetched; its row is
    /// dead-lettered.
    pub max_payload: u64,
}

impl ClaimLimits {
    /// `rows` rows, no byte budget, no payload limit (tests and tools).
    pub fn rows(rows: u32) -> ClaimLimits {
        ClaimLimits {
            rows,
            bytes: i64::MAX as u64,
            max_payload: i64::MAX as u64,
        }
    }
}

/// How a claim walks the keys of keyed rows (see `Store::claim_keyed`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyScan {
    /// Resume the round-robin walk over keys at this key (the last one served); `None`
    /// starts at the first key.
    pub after: Option<String>,
    /// A key whose head sits in `dead_letters` waits (`ordering.on_dead_letter: block`).
    pub block_on_dead_letter: bool,
    /// Rows after each head to take with it (its run; 0: heads only).
    pub run: u32,
    /// Most heads (`None`: as many as the claim's rows). The Scheduler asks for fewer heads
    /// than rows, so that runs get room.
    pub heads: Option<u32>,
}

/// What one claim returned.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    /// The claimed messages (keyed claims: at most one per key), ready to publish.
    pub messages: Vec<OutboxMessage>,
    /// Rows claimed that can never be published (a column Courier cannot read, a payload
    /// over the limit), already moved to `dead_letters`, with the reason.
    pub dead_lettered: Vec<(uuid::Uuid, String)>,
    /// The batch came back full: more rows may be ready right now.
    pub full: bool,
    /// Keyed claims: where the next claim should resume the walk over keys.
    pub next_key: Option<String>,
    /// Keyed claims: the heads found ready before locking, at most the claim's heads limit
    /// (fewer: the walk visited every key). Some may have been locked by another engine
    /// first and skipped. 0 when nothing came back.
    pub candidates: usize,
}

/// The claim statements, formatted once per schema: they run for every batch.
pub(super) struct Statements {
    due: String,
    keyed: String,
    keys: String,
    walk_end: String,
    next_due: String,
}

impl Statements {
    pub(super) fn new(s: &Schema) -> Statements {
        Statements {
            due: claim_due(s),
            keyed: claim_keyed(s),
            keys: claim_keys(s),
            walk_end: walk_end(s),
            next_due: next_due(s),
        }
    }
}

/// Taking a row: in flight, leased to engine $2 for $3 ms, the attempt counted. The count is
/// clamped into `outbox_attempts_range` (0 to 1,000,000): a row written at the top of that
/// range, or an older row outside it (the constraint is NOT VALID), must not make the
/// update break the constraint and fail the claim of every row beside it. Such a row comes
/// back past its budget and is dead-lettered. A budget over `outbox_max_attempts_range`'s
/// 1,000 (in a row older than that constraint) is clamped to it for the same reason. A row
/// taken back from an expired lease says so in `last_error`.
const CLAIM_SET: &str = "SET status = 'in_flight',
         locked_by = $2,
         locked_until = now() + $3 * interval '1 millisecond',
         attempts = least(greatest(o.attempts, 0), 999999) + 1,
         max_attempts = CASE WHEN o.max_attempts > 1000 THEN 1000 ELSE o.max_attempts END,
         last_error = CASE WHEN o.status = 'in_flight'
                           THEN 'lease expired before a confirm was recorded'
                           ELSE o.last_error END,
         updated_at = now()";

/// A claim commits without waiting for its WAL to reach the disk (`synchronous_commit =
/// off` for its own transaction only: `set_config(…, true)` is `SET LOCAL`, evaluated once as
/// an init plan). A claim is a lease, not an outcome: if the server crashes before the flush
/// (at most three `wal_writer_delay`s, 0.6 s by default), the rows it took are `pending`
/// again and are published again, duplicates that at-least-once delivery allows; no row is
/// lost. An outcome write that follows is synchronous and flushes the claim's WAL with its
/// own. On an idle engine the claim is on the path of every message: commit→confirmed p50
/// 1.76 / 1.81 / 1.75 ms against 2.30 / 2.00 / 1.82 ms with the claim synchronous.
const ASYNC_COMMIT: &str = "(SELECT set_config('synchronous_commit', 'off', true)) = 'off'";

/// A row still to be delivered (the partial index of keys' open rows uses the same list).
const OPEN: &str = "status IN ('pending', 'in_flight', 'retrying')";

/// The rows of a locked candidate set (`picked`: id, payload size, and its order as two
/// plain columns `rank`, `at`; a row value such as `(rank, at)` would sort through the
/// generic record comparison, slower on a claim's thousands of rows) that fit the byte
/// budget `budget` (bytes claimed in order, over-size payloads counting nothing since they
/// are never fetched). The first row always fits: one message larger than the whole budget
/// still goes, alone.
///
/// With `limit`, also at most that many rows: the keyed claim reads heads and their runs
/// together (its `rank` is a run position and its `at` the `seq`: every head before any
/// key's second row), so any prefix it keeps holds each key's rows without a gap.
fn fit(max_payload: &str, budget: &str, limit: Option<&str>) -> String {
    let within = limit.map_or(String::new(), |l| format!(" AND rn <= {l}"));
    format!(
        "fit AS (
            SELECT id FROM (
                SELECT id,
                       sum(CASE WHEN size <= {max_payload} THEN size ELSE 0 END)
                           OVER (ORDER BY rank, at, id) AS running,
                       row_number() OVER (ORDER BY rank, at, id) AS rn
                FROM picked) t
            WHERE rn = 1 OR (running <= {budget}{within})
         )"
    )
}

/// -- name: claim_due
///
/// Two locked sets: rows whose lease expired (a crashed or partitioned engine, keyed or
/// not; of a key, only its first open row: a dead engine's run is taken back one row at a
/// time, in order) go first, and unkeyed due rows (their own partial index) fill the rest, oldest
/// first, so the batch never exceeds $1 rows; of those, the ones that fit the byte budget
/// are taken (the rest are unlocked again at commit). Keyed rows are claimed by
/// [`claim_keyed`], a separate statement, so the hot path of unkeyed rows is planned and
/// run on its own.
///
/// `$1` most rows, `$2` engine id, `$3` lease (ms), `$4` `max_payload_bytes`, `$5` byte
/// budget.
fn claim_due(s: &Schema) -> String {
    format!(
        "WITH expired AS (
                    SELECT id, octet_length(payload) AS size, locked_until AS at FROM {s}.outbox e
                    WHERE status = 'in_flight' AND locked_until < now()
                      AND (ordering_key IS NULL OR NOT EXISTS (
                              SELECT 1 FROM {s}.outbox p
                              WHERE p.ordering_key = e.ordering_key AND p.seq < e.seq
                                AND p.status IN ('pending', 'in_flight', 'retrying')))
                    ORDER BY locked_until
                    LIMIT $1
                    FOR UPDATE SKIP LOCKED
                 ), due AS (
                    SELECT id, octet_length(payload) AS size, next_attempt_at AS at
                    FROM {s}.outbox
                    WHERE status IN ('pending', 'retrying') AND next_attempt_at <= now()
                      AND ordering_key IS NULL
                    ORDER BY next_attempt_at
                    LIMIT greatest($1 - (SELECT count(*) FROM expired), 0)
                    FOR UPDATE SKIP LOCKED
                 ), picked AS (
                    SELECT id, size, 0 AS rank, at FROM expired
                    UNION ALL SELECT id, size, 1, at FROM due
                 ), {fit}
                 UPDATE {s}.outbox o {CLAIM_SET}
                 WHERE o.id = ANY(ARRAY(SELECT id FROM fit)) AND {ASYNC_COMMIT}
                 RETURNING {columns}",
        fit = fit("$4", "$5", None),
        columns = message_columns("$4", "0"),
    )
}

/// -- name: claim_keyed
///
/// Keyed rows: the head of each key (its lowest open `seq`), only when it is due and
/// nothing of its key is in flight (and, with `$5`, nothing of its key sits in
/// dead_letters), **and the key's run**: up to `$8` rows that follow the head in `seq`
/// order, as long as each is due and publishable (a delayed, over-size or absent row ends
/// the run; nothing is skipped). Rows a producer gave the head's own `seq` follow it first:
/// they have no order among themselves, but none may be passed by a later `seq`. The engine publishes a run's rows one at a time, each as
/// soon as the broker acked the one before (not after its write and a new claim), so a key
/// costs one broker round trip per message. Keys are walked one index probe each (a loose
/// index scan), round-robin: after the cursor `$4` (the last key served, '' at first), then
/// from the start up to and including it; the walk stops as soon as `$9` heads are found,
/// so the cost follows the rows claimed, not the number of keys. A head locked by another
/// engine is skipped (SKIP LOCKED), and a key with a row in flight is skipped, so a key is
/// served by one engine at a time. A run's rows are locked by the update itself, after
/// their head: it waits on a lock rather than skip the row (a skipped row would be a gap in
/// the key's order) and re-checks the status, so a row that left `pending`/`retrying`
/// meanwhile is not taken; a separate `FOR UPDATE` first would write a lock record per row
/// for nothing. Of heads and runs, rows are taken in run position order while they fit the
/// byte budget and `$1` rows (each key's run is read only as far as its share of the rows
/// left after the heads). The rows come back ordered by key and `seq`, so the first row of
/// each key is its head.
///
/// `$1` most rows, `$2` engine id, `$3` lease (ms), `$4[1]` key cursor (a one-element array,
/// as `claim_keys` takes its keys), `$5` block on a dead letter, `$6` `max_payload_bytes`,
/// `$7` byte budget, `$8` most rows after each head, `$9` most heads.
fn claim_keyed(s: &Schema) -> String {
    claim_heads(
        s,
        &format!(
            "ahead AS (
                    (SELECT ordering_key AS k, id, status, next_attempt_at, 1 AS depth
                     FROM {s}.outbox
                     WHERE ordering_key > $4[1] AND {OPEN}
                     ORDER BY ordering_key, seq LIMIT 1)
                    UNION ALL
                    SELECT n.*, h.depth + 1 FROM ahead h, LATERAL (
                        SELECT ordering_key AS k, id, status, next_attempt_at FROM {s}.outbox
                        WHERE ordering_key > h.k AND {OPEN}
                        ORDER BY ordering_key, seq LIMIT 1) n
                    WHERE h.depth < {WALK_KEYS}
                 ), behind AS (
                    (SELECT ordering_key AS k, id, status, next_attempt_at, 1 AS depth
                     FROM {s}.outbox
                     WHERE ordering_key <= $4[1] AND {OPEN}
                     ORDER BY ordering_key, seq LIMIT 1)
                    UNION ALL
                    SELECT n.*, h.depth + 1 FROM behind h, LATERAL (
                        SELECT ordering_key AS k, id, status, next_attempt_at FROM {s}.outbox
                        WHERE ordering_key > h.k AND ordering_key <= $4[1] AND {OPEN}
                        ORDER BY ordering_key, seq LIMIT 1) n
                    WHERE h.depth < {WALK_KEYS}
                 )"
        ),
        "SELECT k, id, status, next_attempt_at FROM ahead
         UNION ALL SELECT k, id, status, next_attempt_at FROM behind",
    )
}

/// The most keys a walk visits on each side of its cursor. Keys whose head is not ready
/// (delayed, blocked behind a dead letter, in flight) are visited too: with 200,000 keys
/// whose only row is delayed, an unbounded walk took over a second of the database's time,
/// and the claim round it belonged to held up unkeyed rows as long. A walk that finds
/// nothing moves the cursor on by as many keys ([`walk_end`]) and comes back full, so the
/// next walk goes on from there at once: a pass over the keys costs what it did, in pieces
/// between which unkeyed claims go on.
pub(crate) const WALK_KEYS: u32 = 1_000;

/// -- name: walk_end
///
/// Where a walk from `$1[1]` that found no ready head stopped: its `WALK_KEYS`th key ahead,
/// or '' (the start again) when fewer keys lie ahead. Index probes only.
fn walk_end(s: &Schema) -> String {
    format!(
        "WITH RECURSIVE ahead AS (
            (SELECT ordering_key AS k, 1 AS depth FROM {s}.outbox
             WHERE ordering_key > $1[1] AND {OPEN}
             ORDER BY ordering_key, seq LIMIT 1)
            UNION ALL
            SELECT n.k, h.depth + 1 FROM ahead h, LATERAL (
                SELECT ordering_key AS k FROM {s}.outbox
                WHERE ordering_key > h.k AND {OPEN}
                ORDER BY ordering_key, seq LIMIT 1) n
            WHERE h.depth < {WALK_KEYS}
         )
         SELECT CASE WHEN max(depth) >= {WALK_KEYS} THEN (SELECT k FROM ahead ORDER BY depth DESC LIMIT 1)
                     ELSE '' END AS k
         FROM ahead"
    )
}

/// -- name: claim_keys
///
/// [`claim_keyed`] for the keys in `$4` (a text array) only, each probed once instead of
/// walking every key: the keys this engine has just finished with (their last row
/// settled). The Scheduler uses it only while its last walk found every ready key, so no
/// key waits behind these (see the Scheduler's `keys` module). Same parameters otherwise.
fn claim_keys(s: &Schema) -> String {
    claim_heads(
        s,
        &format!(
            "listed AS (
                    SELECT n.* FROM (SELECT DISTINCT k FROM unnest($4::text[]) AS u(k)) q,
                    LATERAL (
                        SELECT ordering_key AS k, id, status, next_attempt_at FROM {s}.outbox
                        WHERE ordering_key = q.k AND {OPEN}
                        ORDER BY seq LIMIT 1) n
                 )"
        ),
        "SELECT * FROM listed",
    )
}

/// The keyed claim after its candidate heads: `ctes` define them, `candidates` selects
/// them (key `k`, `id`, `status`, `next_attempt_at`), each key's first open row.
fn claim_heads(s: &Schema, ctes: &str, candidates: &str) -> String {
    format!(
        "WITH RECURSIVE {ctes}, ready AS (
                    SELECT h.id FROM ({candidates}) h
                    WHERE h.status IN ('pending', 'retrying') AND h.next_attempt_at <= now()
                      AND NOT EXISTS (SELECT 1 FROM {s}.outbox f
                                      WHERE f.ordering_key = h.k AND f.status = 'in_flight'
                                      OFFSET 0)
                      AND NOT ($5 AND EXISTS (SELECT 1 FROM {s}.dead_letters d
                                              WHERE d.ordering_key = h.k OFFSET 0))
                    LIMIT $9
                 ), heads AS (
                    SELECT o.id, octet_length(o.payload) AS size, o.seq, o.ordering_key AS k
                    FROM ready r JOIN {s}.outbox o ON o.id = r.id
                    WHERE o.status IN ('pending', 'retrying') AND o.next_attempt_at <= now()
                    FOR UPDATE OF o SKIP LOCKED
                 ), share AS (
                    SELECT least($8, ($1 - count(*) + greatest(count(*), 1) - 1) / greatest(count(*), 1)) AS room
                    FROM heads
                 ), following AS (
                    SELECT f.* FROM heads h, LATERAL (
                        SELECT n.id, octet_length(n.payload) AS size, n.seq, n.ordering_key AS k,
                               row_number() OVER (ORDER BY n.seq) AS pos,
                               n.status IN ('pending', 'retrying') AND n.next_attempt_at <= now()
                                   AND octet_length(n.payload) <= $6 AS ok
                        FROM {s}.outbox n
                        WHERE n.ordering_key = h.k AND n.seq >= h.seq AND n.id <> h.id AND {OPEN}
                        ORDER BY n.seq LIMIT (SELECT room FROM share)) f
                 ), run AS (
                    SELECT id, size, seq, pos FROM (
                        SELECT *, bool_and(ok) OVER (PARTITION BY k ORDER BY pos) AS clear
                        FROM following) t
                    WHERE clear
                 ), picked AS (
                    SELECT id, size, 0::bigint AS rank, seq AS at FROM heads
                    UNION ALL SELECT id, size, pos, seq FROM run
                 ), {fit}, taken AS (
                    UPDATE {s}.outbox o {CLAIM_SET}
                    WHERE o.id = ANY(ARRAY(SELECT id FROM fit)) AND {ASYNC_COMMIT}
                      AND o.status IN ('pending', 'retrying')
                    RETURNING {columns}, o.seq AS run_seq
                 )
                 SELECT * FROM taken ORDER BY ordering_key, run_seq",
        fit = fit("$6", "$7", Some("$1")),
        columns = message_columns("$6", "(SELECT count(*) FROM ready)"),
    )
}

impl Store {
    /// Claims up to `limit` rows for `engine` with a lease of `lease` (no byte budget):
    /// see [`claim_due`](Self::claim_due). Returns the messages ready to publish.
    pub(crate) async fn claim(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        Ok(self
            .claim_due(engine, ClaimLimits::rows(limit), lease)
            .await?
            .messages)
    }

    /// Claims rows for `engine` with a lease of `lease`, within `limits`: rows whose lease
    /// expired (keyed or not), then unkeyed due rows, oldest first. Sets `in_flight`,
    /// `locked_by`, `locked_until` and counts the attempt. Rows that can never be published
    /// are dead-lettered at once (see [`Claimed::dead_lettered`]). Keyed rows:
    /// [`claim_keyed`](Self::claim_keyed).
    pub(crate) async fn claim_due(
        &self,
        engine: &str,
        limits: ClaimLimits,
        lease: Duration,
    ) -> Result<Claimed, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<ClaimedRow> = conn
            .fetch_all_prepared(
                diesel::sql_query(&self.statements.claim.due)
                    .bind::<BigInt, _>(i64::from(limits.rows))
                    .bind::<Text, _>(engine)
                    .bind::<BigInt, _>(millis(lease))
                    .bind::<BigInt, _>(clamp_i64(limits.max_payload))
                    .bind::<BigInt, _>(clamp_i64(limits.bytes)),
            )
            .await?;
        drop(conn);
        let mut claimed = self.sort_out(engine, rows, limits).await;
        claimed.messages.sort_by_key(|m| m.created_at);
        Ok(claimed)
    }

    /// Claims up to `limit` keyed rows for `engine` (no byte budget): see
    /// [`claim_keyed_within`](Self::claim_keyed_within).
    pub(crate) async fn claim_keyed(
        &self,
        engine: &str,
        limit: u32,
        lease: Duration,
        keys: &KeyScan,
    ) -> Result<Claimed, StoreError> {
        self.claim_keyed_within(engine, ClaimLimits::rows(limit), lease, keys)
            .await
    }

    /// Claims keyed rows for `engine` within `limits`: the due head of each key that has
    /// nothing in flight (nor, with `keys.block_on_dead_letter`, a dead letter), walking the
    /// keys round-robin from `keys.after`.
    pub(crate) async fn claim_keyed_within(
        &self,
        engine: &str,
        limits: ClaimLimits,
        lease: Duration,
        keys: &KeyScan,
    ) -> Result<Claimed, StoreError> {
        let cursor = [keys.after.clone().unwrap_or_default()];
        let sql = &self.statements.claim.keyed;
        let rows = self
            .keyed_rows(sql, engine, limits, lease, keys, &cursor)
            .await?;
        let served: Vec<&str> = rows
            .iter()
            .filter_map(|r| r.ordering_key.as_deref())
            .collect();
        let (next_key, cut) = match next_key(keys.after.as_deref(), &served) {
            Some(key) => (Some(key), false),
            // Nothing ready within the walk's bound: go on past the keys it visited.
            None => {
                let end = self.walk_end(&cursor).await?;
                let cut = !end.is_empty();
                (Some(end), cut)
            }
        };
        let mut claimed = self.sort_out(engine, rows, limits).await;
        claimed.next_key = next_key;
        // Keys lie beyond the bound: the next walk goes on at once, not at the next wake-up,
        // so a pass over every key is a chain of bounded walks.
        claimed.full |= cut;
        Ok(claimed)
    }

    /// See [`walk_end`].
    async fn walk_end(&self, cursor: &[String; 1]) -> Result<String, StoreError> {
        #[derive(diesel::QueryableByName)]
        struct End {
            #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
            k: Option<String>,
        }
        let mut conn = self.op().await?;
        let end: Vec<End> = conn
            .fetch_all_prepared(
                diesel::sql_query(&self.statements.claim.walk_end)
                    .bind::<Array<Text>, _>(cursor.as_slice()),
            )
            .await?;
        Ok(end.into_iter().next().and_then(|e| e.k).unwrap_or_default())
    }

    /// [`claim_keyed_within`](Self::claim_keyed_within) for the keys in `only`, each probed
    /// once, instead of a walk over every key (`keys.after` is not used and stays the
    /// cursor).
    pub(crate) async fn claim_keys_within(
        &self,
        engine: &str,
        limits: ClaimLimits,
        lease: Duration,
        keys: &KeyScan,
        only: &[String],
    ) -> Result<Claimed, StoreError> {
        let sql = &self.statements.claim.keys;
        let rows = self
            .keyed_rows(sql, engine, limits, lease, keys, only)
            .await?;
        let mut claimed = self.sort_out(engine, rows, limits).await;
        claimed.next_key = keys.after.clone();
        Ok(claimed)
    }

    /// Runs `claim_keyed` or `claim_keys` (`sql`): `keys_param` is the cursor alone, or the
    /// keys to probe.
    async fn keyed_rows(
        &self,
        sql: &str,
        engine: &str,
        limits: ClaimLimits,
        lease: Duration,
        keys: &KeyScan,
        keys_param: &[String],
    ) -> Result<Vec<ClaimedRow>, StoreError> {
        let mut conn = self.op().await?;
        let rows = conn
            .fetch_all_prepared(
                diesel::sql_query(sql)
                    .bind::<BigInt, _>(i64::from(limits.rows))
                    .bind::<Text, _>(engine)
                    .bind::<BigInt, _>(millis(lease))
                    .bind::<Array<Text>, _>(keys_param)
                    .bind::<Bool, _>(keys.block_on_dead_letter)
                    .bind::<BigInt, _>(clamp_i64(limits.max_payload))
                    .bind::<BigInt, _>(clamp_i64(limits.bytes))
                    .bind::<BigInt, _>(i64::from(keys.run))
                    .bind::<BigInt, _>(i64::from(
                        keys.heads.unwrap_or(limits.rows).min(limits.rows),
                    )),
            )
            .await?;
        Ok(rows)
    }

    /// Decodes the rows a claim within `limits` returned, one by one, and dead-letters those
    /// that can never be published; the claim is full when it filled its rows or the byte
    /// budget left rows out. If the move fails (the database went away), those rows are
    /// simply not handed on: this engine never renews their lease, so they come back once
    /// it expires and are moved then.
    ///
    /// Keyed rows come ordered by key and `seq`: the rows after an unreadable one of its key
    /// (its run) are not handed on but given back once it is dead-lettered, so they wait
    /// behind the dead letter (`ordering.on_dead_letter: block`) or are claimed again at
    /// once as the key's next head (`continue`: the claim counts as full).
    async fn sort_out(&self, engine: &str, rows: Vec<ClaimedRow>, limits: ClaimLimits) -> Claimed {
        let mut claimed = Claimed {
            full: rows.len() == limits.rows as usize || rows.iter().any(|r| r.cut),
            candidates: rows.first().map_or(0, |r| r.candidates.max(0) as usize),
            ..Claimed::default()
        };
        let mut bad = Vec::new();
        let mut behind_bad = Vec::new();
        let mut broken_key: Option<String> = None;
        for row in rows {
            if row.ordering_key.is_some() && row.ordering_key == broken_key {
                behind_bad.push(row.id);
                continue;
            }
            match row.decode(limits.max_payload) {
                Ok(m) => claimed.messages.push(m),
                Err(u) => {
                    broken_key = u.ordering_key;
                    bad.push(DeadLetterUpdate {
                        id: u.id,
                        error: u.reason,
                    });
                }
            }
        }
        if bad.is_empty() {
            return claimed;
        }
        match self.move_to_dead_letters(engine, &bad).await {
            Ok(moved) => {
                if !behind_bad.is_empty() {
                    claimed.full = true;
                    if let Err(e) = self.release(engine, &behind_bad).await {
                        tracing::warn!(error = %e, rows = behind_bad.len(), "could not give back the rows behind an unreadable row; they return when their lease expires");
                    }
                }
                let moved: std::collections::HashSet<uuid::Uuid> = moved.into_iter().collect();
                claimed.dead_lettered = bad
                    .into_iter()
                    .filter(|u| moved.contains(&u.id))
                    .map(|u| (u.id, u.error))
                    .collect();
            }
            Err(e) => tracing::warn!(
                error = %e,
                rows = bad.len(),
                "could not dead-letter unreadable rows; they return when their lease expires"
            ),
        }
        claimed
    }
}

/// -- name: next_due
///
/// The earliest future row (delayed message or backoff): one step down each partial due
/// index (unkeyed, keyed). A keyed row that is not its key's head may wake the engine
/// early; the claim then finds nothing, which is harmless. No parameters.
fn next_due(s: &Schema) -> String {
    format!(
        "SELECT EXTRACT(EPOCH FROM (least(
                    (SELECT min(next_attempt_at) FROM {s}.outbox
                     WHERE status IN ('pending', 'retrying') AND next_attempt_at > now()
                       AND ordering_key IS NULL),
                    (SELECT min(next_attempt_at) FROM {s}.outbox
                     WHERE status IN ('pending', 'retrying') AND next_attempt_at > now()
                       AND ordering_key IS NOT NULL)) - now()))::float8 AS age"
    )
}

impl Store {
    /// How long until the earliest row that is not due yet becomes due (`None`: none).
    pub(crate) async fn next_due(&self) -> Result<Option<Duration>, StoreError> {
        let mut conn = self.op().await?;
        let rows: Vec<AgeRow> = conn
            .fetch_all_prepared(diesel::sql_query(&self.statements.claim.next_due))
            .await?;
        Ok(rows.into_iter().next().and_then(AgeRow::duration))
    }
}

/// The last key a claim served, in the order the claim walks keys: those after `after` up
/// to the end, then from the start up to `after` itself (byte order, as the `"C"` collation
/// compares).
fn next_key(after: Option<&str>, served: &[&str]) -> Option<String> {
    let after = after.unwrap_or("");
    let (wrapped, ahead): (Vec<&str>, Vec<&str>) = served.iter().partition(|k| **k <= after);
    wrapped
        .into_iter()
        .max()
        .or_else(|| ahead.into_iter().max())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::next_key;

    #[test]
    fn the_key_cursor_follows_the_walk_and_wraps() {
        // Walk after "b": c, d, then a, b.
        assert_eq!(next_key(Some("b"), &["c", "d"]), Some("d".into()));
        assert_eq!(next_key(Some("b"), &["d", "a", "c"]), Some("a".into()));
        assert_eq!(next_key(Some("b"), &["b", "d"]), Some("b".into()));
        assert_eq!(next_key(None, &["k2", "k10"]), Some("k2".into()));
        assert_eq!(next_key(Some("b"), &[]), None);
    }
}
