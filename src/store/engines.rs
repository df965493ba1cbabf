//! The engine registry (`engines`): who is alive, and the rescue of rows held by engines
//! that are not.
//!
//! Each engine beats on its own connection (see the Heartbeat actor), so a beat never waits
//! behind the claim path's pool. A beat is an upsert that also says what the row was before
//! it: `running` (all is well), `dead` (another engine declared this one dead and freed its
//! rows: it was frozen or cut off) or nothing (the row was removed). After a beat the engine
//! runs the rescue: engines whose beat is older than `scheduler.engine_timeout` are marked
//! dead and their in-flight rows freed in the same statement — `locked_by` cleared, lease
//! ended — so the next claim of any engine takes them, as it takes an expired lease. Clearing
//! `locked_by` is the fence: every write a late engine could still make about those rows
//! (retry, release, dead letter, lease renewal) names its own id as the holder and matches
//! nothing. Its acks are still recorded: an ack is a fact about delivery.

use std::time::Duration;

use chrono::{DateTime, Utc};
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::{begin, end, millis, Store, StoreError};

/// What the registry said to a beat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The engine was registered as running: nothing happened meanwhile.
    Alive,
    /// The engine had been declared dead (or its row was gone) and has just rejoined: the
    /// rows it held were freed and may be in other engines' hands now.
    Rejoined,
}

/// A beat's answer: the registry's state for this engine, and how long it had been silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beaten {
    /// What the registry said.
    pub beat: Beat,
    /// Time since this engine's previous beat, by the database's clock (`None`: its first,
    /// or its row was gone). A long one says this engine was cut off from the database (or
    /// paused), and whatever cut it off may have cut the others off too.
    pub silence: Option<Duration>,
}

/// One engine of the registry, with the rows it holds now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, diesel::QueryableByName)]
pub struct EngineRecord {
    /// The engine's id (`outbox.locked_by` of its rows).
    #[diesel(sql_type = Text)]
    pub id: String,
    /// Host name it runs on.
    #[diesel(sql_type = Text)]
    pub host: String,
    /// Its process id on that host.
    #[diesel(sql_type = Integer)]
    pub pid: i32,
    /// Courier version.
    #[diesel(sql_type = Text)]
    pub version: String,
    /// When it registered.
    #[diesel(sql_type = Timestamptz)]
    pub started_at: DateTime<Utc>,
    /// Its last beat.
    #[diesel(sql_type = Timestamptz)]
    pub heartbeat_at: DateTime<Utc>,
    /// Milliseconds since its last beat, by the database's clock; below -1,000 when the beat
    /// is dated in the future (a row written by hand, or a clock ahead).
    #[diesel(sql_type = BigInt)]
    pub since_beat_ms: i64,
    /// `running`, `silent` (registered as running, but its last beat is older than the
    /// engine timeout) or `dead`.
    #[diesel(sql_type = Text)]
    pub state: String,
    /// Rows in flight under its id.
    #[diesel(sql_type = BigInt)]
    pub holds: i64,
}

/// An engine found dead by a rescue, and how many rows were freed from it.
#[derive(Debug, Clone, PartialEq, Eq, diesel::QueryableByName)]
pub struct Rescued {
    /// The dead engine's id.
    #[diesel(sql_type = Text)]
    pub engine: String,
    /// Its in-flight rows, now free.
    #[diesel(sql_type = BigInt)]
    pub rows: i64,
}

/// Who this engine is, as the registry records it.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The engine id.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: i32,
}

impl Identity {
    /// This process, under engine id `id`.
    pub fn of_this_process(id: &str) -> Identity {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown".into());
        Identity {
            id: id.to_string(),
            host,
            pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        }
    }
}

#[derive(diesel::QueryableByName)]
struct Previous {
    #[diesel(sql_type = Nullable<Text>)]
    previous: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    silent_ms: Option<i64>,
}

/// Registers `me` (or refreshes it) and returns the state it had before, and how long ago
/// its previous beat was. The CTE reads the row as it was before this statement (one read
/// for both).
pub async fn beat(
    conn: &mut AsyncPgConnection,
    schema: &str,
    me: &Identity,
    bound: Duration,
) -> Result<Beaten, StoreError> {
    let sql = format!(
        "WITH p AS (SELECT state, heartbeat_at FROM \"{schema}\".engines WHERE id = $1)
         INSERT INTO \"{schema}\".engines AS e (id, host, pid, version)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), state = 'running'
         RETURNING (SELECT state FROM p) AS previous,
                   (SELECT (extract(epoch FROM now() - heartbeat_at) * 1000)::bigint
                    FROM p) AS silent_ms"
    );
    begin(conn, Some(bound)).await?;
    let rows = diesel::sql_query(sql)
        .bind::<Text, _>(&me.id)
        .bind::<Text, _>(&me.host)
        .bind::<Integer, _>(me.pid)
        .bind::<Text, _>(env!("CARGO_PKG_VERSION"))
        .load::<Previous>(conn)
        .await;
    let rows = end(conn, rows).await?;
    let previous = rows.as_slice().first();
    Ok(Beaten {
        beat: match previous.and_then(|r| r.previous.as_deref()) {
            Some("running") => Beat::Alive,
            _ => Beat::Rejoined,
        },
        silence: previous
            .and_then(|r| r.silent_ms)
            .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
    })
}

/// Marks dead every other engine whose last beat is older than `timeout` and frees the rows
/// they held; dead engines' rows older than a day leave the registry. A row someone else
/// has locked (a producer's `SELECT … FOR UPDATE`) is skipped, not waited for: it is freed
/// later by [`free_strays`], as a row held by an engine that is not running.
pub async fn rescue(
    conn: &mut AsyncPgConnection,
    schema: &str,
    me: &str,
    timeout: Duration,
    bound: Duration,
) -> Result<Vec<Rescued>, StoreError> {
    let s = format!("\"{schema}\"");
    let sql = format!(
        "WITH dead AS (
            UPDATE {s}.engines SET state = 'dead'
            WHERE state = 'running' AND id <> $1
              AND (heartbeat_at < now() - $2 * interval '1 millisecond'
                   OR heartbeat_at > now() + $2 * interval '1 millisecond')
            RETURNING id
         ), freed AS (
            UPDATE {s}.outbox o SET locked_by = NULL, locked_until = now()
            FROM dead
            WHERE o.locked_by = dead.id
              AND o.id IN (SELECT h.id FROM {s}.outbox h JOIN dead ON h.locked_by = dead.id
                           WHERE h.status = 'in_flight'
                           FOR UPDATE OF h SKIP LOCKED)
            RETURNING dead.id AS engine
         ), forgotten AS (
            DELETE FROM {s}.engines
            WHERE state = 'dead' AND heartbeat_at < now() - interval '1 day'
         )
         SELECT d.id AS engine, (SELECT count(*) FROM freed f WHERE f.engine = d.id) AS rows
         FROM dead d"
    );
    begin(conn, Some(bound)).await?;
    let rows = diesel::sql_query(sql)
        .bind::<Text, _>(me)
        .bind::<BigInt, _>(millis(timeout))
        .load(conn)
        .await;
    end(conn, rows).await
}

/// What [`free_strays`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, diesel::QueryableByName)]
pub struct Strays {
    /// In-flight rows no engine can be holding, freed like an expired lease.
    #[diesel(sql_type = BigInt)]
    pub freed: i64,
    /// Keyed rows whose lease expired behind an open row of their key, due again.
    #[diesel(sql_type = BigInt)]
    pub behind: i64,
    /// `retrying` rows due later than any backoff would put them, due now.
    #[diesel(sql_type = BigInt)]
    pub late: i64,
}

/// How many of the furthest-due waiting rows, keyed and unkeyed each, [`free_strays`]
/// reads for `retrying` rows due later than any backoff puts them.
const LATE_SCAN: i64 = 1_000;

/// -- name: free_strays
///
/// In-flight rows that no lease will ever bring back, put where a claim finds them. Only a
/// producer writing `status = 'in_flight'` itself (or a row edited by hand) makes the first
/// kind; producers committing a key's rows out of `seq` order and an engine crash make the
/// second.
///
/// - **freed** (`locked_by` cleared, lease ended now, as the rescue of a dead engine does):
///   no lease at all; a live lease held by nobody; a lease held by an id that is not a
///   running engine of the registry (engines register before their first claim); or a lease
///   under this engine's id further out than any it gives (`$2`: its lease plus a minute),
///   which it does not hold. The next claim takes them as expired leases.
/// - **behind**: a keyed row whose lease expired while an earlier row of its key is still
///   waiting (`pending`/`retrying`). The claim takes an expired keyed row back only when it
///   is its key's first open row, and a key with a row in flight gives no head: the key
///   would wait for ever. The row goes back to `retrying`, due now, its attempt counted, so
///   the key's rows go out again in `seq` order.
///
/// - **late**: a `retrying` row due later than this engine's longest backoff plus a minute
///   (`$3`), which no engine writes: only a producer or a hand (`next_attempt_at =
///   'infinity'`) makes one, and it would wait for ever. It is made due now. A `pending` row
///   due far ahead is a delayed message and stays. The look reads the [`LATE_SCAN`]
///   furthest-due waiting rows of each due index (`outbox_due_idx`, `outbox_keyed_due_idx`)
///   from the far end, where such values sort, so its cost does not grow with the number of
///   delayed messages; a `retrying` row placed behind more delayed rows than that is found
///   once enough of them have gone.
///
/// The first two scan only the in-flight partial index (`outbox_lease_idx`). All skip rows
/// someone else has locked (a producer's `SELECT … FOR UPDATE`) instead of waiting for
/// them: the next look takes them.
///
/// `$1` this engine's id, `$2` the furthest lease it gives (ms), `$3` the furthest backoff
/// it gives (ms).
pub async fn free_strays(
    conn: &mut AsyncPgConnection,
    schema: &str,
    me: &str,
    lease: Duration,
    backoff: Duration,
    bound: Duration,
) -> Result<Strays, StoreError> {
    let s = format!("\"{schema}\"");
    let sql = format!(
        "WITH freed AS (
            UPDATE {s}.outbox u SET locked_by = NULL, locked_until = now()
            WHERE u.id IN (
              SELECT o.id FROM {s}.outbox o
              WHERE o.status = 'in_flight'
              AND (o.locked_until IS NULL
                   OR (o.locked_until > now()
                       AND (o.locked_by IS NULL
                            OR (o.locked_by = $1
                                AND o.locked_until > now() + $2 * interval '1 millisecond')
                            OR NOT EXISTS (SELECT 1 FROM {s}.engines e
                                           WHERE e.id = o.locked_by AND e.state = 'running'))))
              FOR UPDATE OF o SKIP LOCKED)
            RETURNING 1
         ), behind AS (
            UPDATE {s}.outbox u
            SET status = 'retrying', next_attempt_at = now(), locked_by = NULL,
                locked_until = NULL, updated_at = now(),
                last_error = 'lease expired before a confirm was recorded'
            WHERE u.id IN (
              SELECT o.id FROM {s}.outbox o
              WHERE o.status = 'in_flight' AND o.locked_until < now()
              AND o.ordering_key IS NOT NULL
              AND EXISTS (SELECT 1 FROM {s}.outbox p
                          WHERE p.ordering_key = o.ordering_key AND p.seq < o.seq
                            AND p.status IN ('pending', 'retrying'))
              FOR UPDATE OF o SKIP LOCKED)
            RETURNING 1
         ), far AS (
            (SELECT o.id, o.status FROM {s}.outbox o
             WHERE o.status IN ('pending', 'retrying') AND o.ordering_key IS NULL
               AND o.next_attempt_at > now() + $3 * interval '1 millisecond'
             ORDER BY o.next_attempt_at DESC LIMIT {LATE_SCAN})
            UNION ALL
            (SELECT o.id, o.status FROM {s}.outbox o
             WHERE o.status IN ('pending', 'retrying') AND o.ordering_key IS NOT NULL
               AND o.next_attempt_at > now() + $3 * interval '1 millisecond'
             ORDER BY o.next_attempt_at DESC LIMIT {LATE_SCAN})
         ), late AS (
            UPDATE {s}.outbox u SET next_attempt_at = now(), updated_at = now()
            WHERE u.id IN (
              SELECT o.id FROM {s}.outbox o
              WHERE o.id IN (SELECT far.id FROM far WHERE far.status = 'retrying')
                AND o.status = 'retrying'
                AND o.next_attempt_at > now() + $3 * interval '1 millisecond'
              FOR UPDATE OF o SKIP LOCKED)
            RETURNING 1
         )
         SELECT (SELECT count(*) FROM freed) AS freed, (SELECT count(*) FROM behind) AS behind,
                (SELECT count(*) FROM late) AS late"
    );
    let slack = Duration::from_secs(60);
    begin(conn, Some(bound)).await?;
    let rows = diesel::sql_query(sql)
        .bind::<Text, _>(me)
        .bind::<BigInt, _>(millis(lease.saturating_add(slack)))
        .bind::<BigInt, _>(millis(backoff.saturating_add(slack)))
        .load::<Strays>(conn)
        .await;
    Ok(end(conn, rows)
        .await?
        .into_iter()
        .next()
        .unwrap_or_default())
}

/// `column` clamped to years 1–9999: PostgreSQL's `infinity` and years past chrono's range
/// cannot be read.
fn readable(column: &str) -> String {
    format!(
        "least(greatest({column}, '0001-01-01 00:00:00+00'::timestamptz), \
         '9999-12-31 00:00:00+00'::timestamptz)"
    )
}

impl Store {
    /// Every engine of the registry, the rows each holds, newest first. An engine the
    /// registry says is running but whose last beat is older than `timeout` is `silent`: it
    /// stopped (crashed, frozen, cut off) and no running engine has declared it dead yet,
    /// as none does when it was the only one.
    pub(crate) async fn engines(&self, timeout: Duration) -> Result<Vec<EngineRecord>, StoreError> {
        let s = format!("\"{}\"", self.schema());
        // Each time is clamped into what the client can read (a forged `infinity` would
        // fail the whole listing).
        let sql = format!(
            "SELECT e.id, e.host, e.pid, e.version, {started} AS started_at,
                    {beat} AS heartbeat_at,
                    (SELECT CASE WHEN ms < -1000 THEN ms ELSE greatest(ms, 0) END
                     FROM (SELECT (extract(epoch FROM now() - {beat}) * 1000)::bigint) b(ms))
                        AS since_beat_ms,
                    CASE WHEN e.state = 'running'
                              AND (e.heartbeat_at < now() - {ms} * interval '1 millisecond'
                                   OR e.heartbeat_at > now() + {ms} * interval '1 millisecond')
                         THEN 'silent' ELSE e.state END AS state,
                    (SELECT count(*) FROM {s}.outbox o
                     WHERE o.status = 'in_flight' AND o.locked_by = e.id) AS holds
             FROM {s}.engines e
             ORDER BY e.state DESC, e.started_at DESC",
            ms = millis(timeout),
            started = readable("e.started_at"),
            beat = readable("e.heartbeat_at"),
        );
        let mut conn = self.op().await?;
        Ok(conn.fetch_all(diesel::sql_query(sql)).await?)
    }

    /// Removes `engine` from the registry (a clean stop).
    pub async fn deregister(&self, engine: &str) -> Result<(), StoreError> {
        let sql = format!("DELETE FROM \"{}\".engines WHERE id = $1", self.schema());
        let mut conn = self.op().await?;
        conn.run(diesel::sql_query(sql).bind::<Text, _>(engine))
            .await?;
        Ok(())
    }
}
