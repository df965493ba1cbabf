//! Every SQL statement Courier runs, in one place, qualified with the configured schema.
//!
//! Statements are built once per schema when the [`Store`](super::Store) is created. The
//! schema name was checked by [`check_schema_name`](super::check_schema_name) and is also
//! double-quoted, so it cannot inject SQL.

/// The schema-qualified statements.
#[derive(Debug, Clone)]
pub struct Sql {
    pub(crate) schema: String,
    pub(crate) claim: String,
    pub(crate) claim_keyed: String,
    pub(crate) renew: String,
    pub(crate) release_all: String,
    pub(crate) confirm: String,
    pub(crate) retry: String,
    pub(crate) release: String,
    pub(crate) dead_letter: String,
    pub(crate) supersede_dead_letters: String,
    pub(crate) requeue: String,
    pub(crate) counts: String,
    pub(crate) oldest_pending: String,
    pub(crate) dead_letter_count: String,
    pub(crate) outbox_status_of: String,
    pub(crate) dead_letter_of: String,
    pub(crate) notify: String,
    pub(crate) outcomes: String,
    pub(crate) publishers: String,
    pub(crate) latency_of: String,
    pub(crate) purge_confirmed: String,
    pub(crate) vacuum: String,
    pub(crate) next_due: String,
    pub(crate) archive_confirmed: String,
    pub(crate) dead_letter_list: String,
    pub(crate) dead_letter_show: String,
    pub(crate) dead_letter_discard: String,
    pub(crate) dead_letter_discard_older: String,
    pub(crate) dead_letter_ids: String,
}

/// The columns a claimed message is read with (see `ClaimedRow`), `max_payload` being the
/// parameter that holds `publisher.max_payload_bytes`. `cut` says the byte budget left
/// rows out (see [`fit`]): the claim counts as full, so the engine claims again as soon as
/// bytes come back instead of waiting for the next sweep.
///
/// Every column comes in a form that cannot fail to decode, so one hostile row can never
/// fail the whole batch: headers as text (parsed row by row: valid jsonb is not always valid
/// for serde_json, e.g. `1e400` or deep nesting), `created_at` only when chrono can hold it
/// (not `infinity`, not year 200000), and the payload only when it is not over the limit
/// (its size is read from the varlena header, so an over-size payload is never fetched).
fn message_columns(max_payload: &str) -> String {
    format!(
        "o.id, o.exchange, o.routing_key,
         CASE WHEN octet_length(o.payload) <= {max_payload} THEN o.payload END AS payload,
         octet_length(o.payload)::bigint AS payload_size,
         o.headers::text AS headers,
         o.content_type, o.attempts, o.max_attempts,
         CASE WHEN isfinite(o.created_at) AND o.created_at < '100000-01-01'
              THEN o.created_at END AS created_at,
         CASE WHEN isfinite(o.created_at) AND o.created_at < '100000-01-01'
              THEN NULL ELSE o.created_at::text END AS created_at_text,
         o.ordering_key,
         (SELECT count(*) FROM picked) > (SELECT count(*) FROM fit) AS cut"
    )
}

/// The rows of a locked candidate set (`picked`: id, payload size, order) that fit the
/// byte budget `budget` (bytes claimed in order, over-size payloads counting nothing since
/// they are never fetched). The first row always fits: one message larger than the whole
/// budget still goes, alone.
fn fit(max_payload: &str, budget: &str) -> String {
    format!(
        "fit AS (
            SELECT id FROM (
                SELECT id,
                       sum(CASE WHEN size <= {max_payload} THEN size ELSE 0 END)
                           OVER (ORDER BY ord, id) AS running,
                       row_number() OVER (ORDER BY ord, id) AS rn
                FROM picked) t
            WHERE rn = 1 OR running <= {budget}
         )"
    )
}

/// The columns a dead letter is read with (see `DeadLetterRow`): like a claimed message's,
/// in forms that cannot fail to decode, since whatever a producer wrote ends up here.
const DEAD_LETTER_COLUMNS: &str = "id, exchange, routing_key, payload, headers::text AS headers, \
     content_type, max_attempts, attempts, last_error, \
     CASE WHEN isfinite(created_at) AND created_at < '100000-01-01' THEN created_at END \
         AS created_at, \
     failed_at, ordering_key, seq";

/// Taking a row: in flight, leased to engine $2 for $3 ms, the attempt counted (clamped: a
/// row written with a huge count must not overflow the claim of every row beside it). A row
/// taken back from an expired lease says so in `last_error`.
const CLAIM_SET: &str = "SET status = 'in_flight',
         locked_by = $2,
         locked_until = now() + $3 * interval '1 millisecond',
         attempts = least(o.attempts, 2147483646) + 1,
         last_error = CASE WHEN o.status = 'in_flight'
                           THEN 'lease expired before a confirm was recorded'
                           ELSE o.last_error END,
         updated_at = now()";

/// A row still to be delivered (the partial index of keys' open rows uses the same list).
const OPEN: &str = "status IN ('pending', 'in_flight', 'retrying')";

impl Sql {
    /// Builds the statements for `schema` (already validated).
    pub fn new(schema: &str) -> Sql {
        let s = format!("\"{schema}\"");
        // Giving a row back unpublished: due again at once, the attempt refunded.
        let release_set = format!(
            "SET status = CASE WHEN attempts > 1 THEN 'retrying'::{s}.outbox_status
                               ELSE 'pending'::{s}.outbox_status END,
                 attempts = greatest(attempts - 1, 0), next_attempt_at = now(),
                 locked_by = NULL, locked_until = NULL, updated_at = now()"
        );
        // Retention's batch: the oldest confirmed rows past the age $1, at most $2, SKIP
        // LOCKED so it never waits on (or blocks) the hot path.
        let old_confirmed = format!(
            "old AS (
                SELECT id FROM {s}.outbox
                WHERE status = 'confirmed' AND confirmed_at < now() - $1 * interval '1 millisecond'
                ORDER BY confirmed_at LIMIT $2
                FOR UPDATE SKIP LOCKED
             )"
        );
        Sql {
            schema: schema.to_string(),
            // Two locked sets: rows whose lease expired (a crashed or partitioned engine,
            // keyed or not) go first, and unkeyed due rows (their own partial index) fill the
            // rest, oldest first, so the batch never exceeds $1 rows; of those, the ones that
            // fit the byte budget $5 are taken (the rest are unlocked again at commit).
            // SKIP LOCKED lets several engines claim at once without waiting on each other or
            // sharing a row. Keyed rows are claimed by `claim_keyed`, a separate statement,
            // so the hot path of unkeyed rows is planned and run on its own.
            claim: format!(
                "WITH expired AS (
                    SELECT id, octet_length(payload) AS size, locked_until AS at FROM {s}.outbox
                    WHERE status = 'in_flight' AND locked_until < now()
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
                    SELECT id, size, (0, at) AS ord FROM expired
                    UNION ALL SELECT id, size, (1, at) FROM due
                 ), {fit}
                 UPDATE {s}.outbox o {CLAIM_SET}
                 FROM fit c
                 WHERE o.id = c.id
                 RETURNING {columns}",
                fit = fit("$4", "$5"),
                columns = message_columns("$4"),
            ),
            // Keyed rows: only the head of each key (its lowest open `seq`), only when it is
            // due and nothing of its key is in flight (and, with $5 = block, nothing of its
            // key sits in dead_letters). Keys are walked one index probe each (a loose index
            // scan), round-robin: after the cursor $4 (the last key served, '' at first),
            // then from the start up to and including it; the walk stops as soon as $1 heads
            // are found, so the cost follows the rows claimed, not the number of keys. A
            // head locked by another engine is skipped (SKIP LOCKED), and a key with a row in
            // flight is skipped, so a key is served by one engine at a time. The heads that
            // fit the byte budget $7 are taken.
            claim_keyed: format!(
                "WITH RECURSIVE ahead AS (
                    (SELECT ordering_key AS k, id, status, next_attempt_at FROM {s}.outbox
                     WHERE ordering_key > $4 AND {OPEN}
                     ORDER BY ordering_key, seq LIMIT 1)
                    UNION ALL
                    SELECT n.* FROM ahead h, LATERAL (
                        SELECT ordering_key AS k, id, status, next_attempt_at FROM {s}.outbox
                        WHERE ordering_key > h.k AND {OPEN}
                        ORDER BY ordering_key, seq LIMIT 1) n
                 ), behind AS (
                    (SELECT ordering_key AS k, id, status, next_attempt_at FROM {s}.outbox
                     WHERE ordering_key <= $4 AND {OPEN}
                     ORDER BY ordering_key, seq LIMIT 1)
                    UNION ALL
                    SELECT n.* FROM behind h, LATERAL (
                        SELECT ordering_key AS k, id, status, next_attempt_at FROM {s}.outbox
                        WHERE ordering_key > h.k AND ordering_key <= $4 AND {OPEN}
                        ORDER BY ordering_key, seq LIMIT 1) n
                 ), ready AS (
                    SELECT h.id FROM (SELECT * FROM ahead UNION ALL SELECT * FROM behind) h
                    WHERE h.status IN ('pending', 'retrying') AND h.next_attempt_at <= now()
                      AND NOT EXISTS (SELECT 1 FROM {s}.outbox f
                                      WHERE f.ordering_key = h.k AND f.status = 'in_flight'
                                      OFFSET 0)
                      AND NOT ($5 AND EXISTS (SELECT 1 FROM {s}.dead_letters d
                                              WHERE d.ordering_key = h.k OFFSET 0))
                    LIMIT $1
                 ), picked AS (
                    SELECT o.id, octet_length(o.payload) AS size, o.seq AS ord
                    FROM ready r JOIN {s}.outbox o ON o.id = r.id
                    WHERE o.status IN ('pending', 'retrying') AND o.next_attempt_at <= now()
                    FOR UPDATE OF o SKIP LOCKED
                 ), {fit}
                 UPDATE {s}.outbox o {CLAIM_SET}
                 WHERE o.id = ANY(ARRAY(SELECT id FROM fit))
                 RETURNING {columns}",
                fit = fit("$6", "$7"),
                columns = message_columns("$6"),
            ),
            renew: format!(
                "UPDATE {s}.outbox
                 SET locked_until = now() + $3 * interval '1 millisecond'
                 WHERE id = ANY($1) AND status = 'in_flight' AND locked_by = $2"
            ),
            release_all: format!(
                "UPDATE {s}.outbox {release_set}
                 WHERE status = 'in_flight' AND locked_by = $1"
            ),
            // An ack is a fact about delivery: it is recorded whoever holds the row now.
            // `locked_by` is kept: on a confirmed row it names the engine that published it.
            confirm: format!(
                "UPDATE {s}.outbox
                 SET status = 'confirmed', confirmed_at = now(), updated_at = now(),
                     locked_until = NULL
                 WHERE id = ANY($1) AND status <> 'confirmed'"
            ),
            // Failures are fenced by the lease: an engine that lost a row must not undo the
            // work of the engine that holds it now.
            retry: format!(
                "UPDATE {s}.outbox o
                 SET status = 'retrying',
                     next_attempt_at = now() + u.delay_ms * interval '1 millisecond',
                     last_error = u.err,
                     attempts = greatest(o.attempts - CASE WHEN u.refund THEN 1 ELSE 0 END, 0),
                     locked_by = NULL, locked_until = NULL, updated_at = now()
                 FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::bool[])
                      AS u(id, delay_ms, err, refund)
                 WHERE o.id = u.id AND o.status = 'in_flight' AND o.locked_by = $5"
            ),
            release: format!(
                "UPDATE {s}.outbox {release_set}
                 WHERE id = ANY($1) AND status = 'in_flight' AND locked_by = $2"
            ),
            // A message id reused after its first copy was dead-lettered: the earlier dead
            // letter moves to `dead_letters_superseded` first (same transaction as the move
            // below), so the new failure neither fails the move nor overwrites the old one.
            supersede_dead_letters: format!(
                "WITH old AS (
                    DELETE FROM {s}.dead_letters d
                    WHERE d.id = ANY($1)
                      AND EXISTS (SELECT 1 FROM {s}.outbox o
                                  WHERE o.id = d.id AND o.status = 'in_flight'
                                    AND o.locked_by = $2)
                    RETURNING d.*
                 )
                 INSERT INTO {s}.dead_letters_superseded
                    (id, exchange, routing_key, payload, headers, content_type, max_attempts,
                     attempts, last_error, created_at, failed_at, ordering_key, seq)
                 SELECT id, exchange, routing_key, payload, headers, content_type, max_attempts,
                        attempts, last_error, created_at, failed_at, ordering_key, seq
                 FROM old"
            ),
            // One statement, so one transaction: the row leaves the outbox only as it
            // enters dead_letters.
            dead_letter: format!(
                "WITH moved AS (
                    DELETE FROM {s}.outbox o
                    USING unnest($1::uuid[], $2::text[]) AS u(id, err)
                    WHERE o.id = u.id AND o.status = 'in_flight' AND o.locked_by = $3
                    RETURNING o.*, u.err AS final_error
                 )
                 INSERT INTO {s}.dead_letters
                    (id, exchange, routing_key, payload, headers, content_type, max_attempts,
                     attempts, last_error, created_at, failed_at, ordering_key, seq)
                 SELECT id, exchange, routing_key, payload, headers, content_type, max_attempts,
                        attempts, final_error, created_at, now(), ordering_key, seq
                 FROM moved
                 RETURNING id"
            ),
            // DELETE takes the row lock, so two operators requeueing the same id at once
            // move it once: the second finds nothing to delete and inserts nothing. A keyed
            // row keeps its `seq`: it goes back to its place in its key's order. An id that
            // is in the outbox again (a producer reused it) stays here until that copy is
            // done: two rows cannot share an id.
            requeue: format!(
                "WITH moved AS (
                    DELETE FROM {s}.dead_letters d WHERE d.id = ANY($1)
                      AND NOT EXISTS (SELECT 1 FROM {s}.outbox o WHERE o.id = d.id)
                    RETURNING *
                 )
                 INSERT INTO {s}.outbox
                    (id, exchange, routing_key, payload, headers, content_type, max_attempts,
                     status, attempts, next_attempt_at, last_error, created_at, ordering_key, seq)
                 SELECT id, exchange, routing_key, payload, headers, content_type, max_attempts,
                        'pending', 0, now(), last_error, created_at, ordering_key, seq
                 FROM moved
                 RETURNING id"
            ),
            counts: format!(
                "SELECT status::text AS status, count(*) AS n FROM {s}.outbox GROUP BY status"
            ),
            oldest_pending: format!(
                "SELECT EXTRACT(EPOCH FROM (now() - min(created_at)))::float8 AS age
                 FROM {s}.outbox WHERE status IN ('pending', 'retrying', 'in_flight')"
            ),
            dead_letter_count: format!("SELECT count(*) AS n FROM {s}.dead_letters"),
            outbox_status_of: format!(
                "SELECT status::text AS status, last_error FROM {s}.outbox WHERE id = $1"
            ),
            dead_letter_of: format!(
                "SELECT 'failed'::text AS status, last_error FROM {s}.dead_letters WHERE id = $1"
            ),
            outcomes: format!(
                "SELECT id, 'confirmed'::text AS status, NULL::text AS last_error
                 FROM {s}.outbox WHERE id = ANY($1) AND status = 'confirmed'
                 UNION ALL
                 SELECT id, 'dead_lettered'::text, last_error
                 FROM {s}.dead_letters WHERE id = ANY($1)"
            ),
            publishers: format!(
                "SELECT coalesce(locked_by, '') AS status, count(*) AS n
                 FROM {s}.outbox WHERE status = 'confirmed' GROUP BY locked_by"
            ),
            purge_confirmed: format!(
                "WITH {old_confirmed}
                 DELETE FROM {s}.outbox o USING old WHERE o.id = old.id"
            ),
            // Plain VACUUM takes no lock that claims or confirms wait on; it makes the
            // space of deleted rows reusable, so the table stops growing.
            vacuum: format!("VACUUM {s}.outbox"),
            // The earliest future row (delayed message or backoff): one step down each
            // partial due index (unkeyed, keyed). A keyed row that is not its key's head
            // may wake the engine early; the claim then finds nothing, which is harmless.
            next_due: format!(
                "SELECT EXTRACT(EPOCH FROM (least(
                    (SELECT min(next_attempt_at) FROM {s}.outbox
                     WHERE status IN ('pending', 'retrying') AND next_attempt_at > now()
                       AND ordering_key IS NULL),
                    (SELECT min(next_attempt_at) FROM {s}.outbox
                     WHERE status IN ('pending', 'retrying') AND next_attempt_at > now()
                       AND ordering_key IS NOT NULL)) - now()))::float8 AS age"
            ),
            archive_confirmed: format!(
                "WITH {old_confirmed}, moved AS (
                    DELETE FROM {s}.outbox o USING old WHERE o.id = old.id RETURNING o.*
                 )
                 INSERT INTO {s}.outbox_archive SELECT * FROM moved ON CONFLICT (id) DO NOTHING"
            ),
            dead_letter_list: format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM {s}.dead_letters
                 WHERE ($1::bigint IS NULL OR failed_at >= now() - $1 * interval '1 millisecond')
                 ORDER BY failed_at DESC, id LIMIT $2"
            ),
            dead_letter_show: format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM {s}.dead_letters WHERE id = $1"
            ),
            dead_letter_discard: format!(
                "DELETE FROM {s}.dead_letters WHERE id = ANY($1) RETURNING id"
            ),
            dead_letter_discard_older: format!(
                "DELETE FROM {s}.dead_letters
                 WHERE failed_at < now() - $1 * interval '1 millisecond' RETURNING id"
            ),
            dead_letter_ids: format!(
                "SELECT id FROM {s}.dead_letters WHERE ($1::text IS NULL OR exchange = $1)"
            ),
            latency_of: format!(
                "SELECT (percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::float8 AS p50,
                        (percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::float8 AS p99
                 FROM (SELECT EXTRACT(EPOCH FROM (confirmed_at - created_at)) * 1000 AS ms
                       FROM {s}.outbox WHERE id = ANY($1) AND status = 'confirmed') t"
            ),
            notify: format!("SELECT pg_notify('{schema}.outbox', $1)::text AS v"),
        }
    }

    /// The NOTIFY channel of the insert trigger: `<schema>.outbox`.
    pub fn notify_channel(&self) -> String {
        format!("{}.outbox", self.schema)
    }
}
