//! `courier doctor`: checks the whole setup a new operator (or `ExecStartPre`) depends on and
//! prints one line per check, with a verdict and, when it is not `ok`, the fix.
//!
//! Each check only reads, except two harmless probes: a NOTIFY on the outbox channel (an
//! engine that hears it claims once, finding nothing new) and a publish per exchange inside
//! an AMQP transaction that is rolled back, so nothing is ever routed. RabbitMQ checks
//! that a publish is allowed (the user's `write` permission) and that its exchange exists
//! when the publish arrives, not at commit: the probe sees exactly what the engine would.

use std::{path::Path, time::Duration};

use diesel::{sql_query, sql_types::Text, QueryableByName};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures::StreamExt;
use lapin::{options::BasicPublishOptions, types::ShortString, BasicProperties, Connection};

use super::escape::{cell, one_line};
use crate::{
    broker::{self, ChannelClose},
    config::{Config, Pooler, SecretUrl},
    store::{
        applied_versions, begin, end, establish, SchemaFit, Store, StoreError, MIGRATION_NAMES,
    },
};

/// How long the NOTIFY round trip may take.
const NOTIFY_WAIT: Duration = Duration::from_secs(2);
/// How long one exchange probe may take.
const PROBE_WAIT: Duration = Duration::from_secs(5);
/// Most distinct exchanges probed (named by open rows, then the dead-letter exchange).
const MOST_EXCHANGES: i64 = 50;
/// Most characters of an exchange name printed (AMQP allows 255 bytes; a row may hold more).
const NAME_SHOWN: usize = 300;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    /// Works, but worth knowing.
    Warn,
    Fail,
    /// Not applicable, or impossible after an earlier failure.
    Skip,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "skip",
        }
    }
}

/// One line of the report.
struct Check {
    name: &'static str,
    verdict: Verdict,
    detail: String,
    fix: Option<String>,
}

impl Check {
    fn new(name: &'static str, verdict: Verdict, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "check": self.name,
            "verdict": self.verdict.word().to_lowercase(),
            "detail": self.detail,
            "fix": self.fix,
        })
    }
}

/// `courier doctor [--json] [--pre-start]`: prints the report; fails when any check failed.
///
/// With `pre_start` (a service manager's `ExecStartPre`) an open row naming a missing or
/// refused exchange is a warning: that is one producer's row, which the engine retries and
/// dead-letters, and it must never keep the engine from delivering every other row.
pub async fn run(config_path: &Path, json: bool, pre_start: bool) -> Result<(), super::Failure> {
    let checks = checks(config_path, pre_start).await;
    if json {
        let all: Vec<serde_json::Value> = checks.iter().map(Check::json).collect();
        let ok = !checks.iter().any(|c| c.verdict == Verdict::Fail);
        println!("{}", serde_json::json!({ "ok": ok, "checks": all }));
    } else {
        for c in &checks {
            println!("{:<4}  {:<12} {}", c.verdict.word(), c.name, c.detail);
            if let Some(fix) = &c.fix {
                println!("{:<4}  {:<12} fix: {fix}", "", "");
            }
        }
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    let bad_config = checks
        .iter()
        .any(|c| c.name == "config" && c.verdict == Verdict::Fail);
    match failed {
        0 => Ok(()),
        // Exit 2, as `courier run` gives for the same configuration.
        _ if bad_config => Err(super::Failure::Config(anyhow::anyhow!(
            "the configuration is invalid"
        ))),
        n => Err(super::Failure::Runtime(anyhow::anyhow!(
            "{n} check(s) failed"
        ))),
    }
}

/// Every check, in the order a setup is built.
async fn checks(config_path: &Path, pre_start: bool) -> Vec<Check> {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            return vec![Check::new("config", Verdict::Fail, e.to_string()).fix(
                "correct the file or the COURIER_* variable named above \
                 (README: Configuration reference)",
            )]
        }
    };
    let mut out = vec![Check::new(
        "config",
        Verdict::Ok,
        format!("{} is valid", config_path.display()),
    )];
    // The database connection, kept once its schema is known to be migrated: the exchange
    // check reads the open rows through it.
    let mut migrated = match database(&config, &mut out).await {
        Some(mut conn) => schema(&config, &mut conn, &mut out).await.then_some(conn),
        None => {
            out.push(skipped("schema", "the database"));
            None
        }
    };
    migrate_url(&config, &mut out).await;
    notify(&config, migrated.is_some(), &mut out).await;
    let amqp = broker(&config, &mut out).await;
    exchanges(
        &config,
        migrated.as_mut(),
        amqp.as_ref(),
        pre_start,
        &mut out,
    )
    .await;
    if let Some(conn) = amqp {
        let _ = conn.close(200, "doctor done".into()).await;
    }
    if let Some(check) = traces(&config) {
        out.push(check);
    }
    out.push(admin_bind(&config).await);
    out
}

fn skipped(name: &'static str, what: &str) -> Check {
    Check::new(
        name,
        Verdict::Skip,
        format!("needs {what}, not ready above"),
    )
}

/// The database is reachable, and over TLS when the URL asks for it (libpq's `sslmode`).
async fn database(config: &Config, out: &mut Vec<Check>) -> Option<AsyncPgConnection> {
    let url = &config.database.url;
    let mut conn = match establish(url, config.database.connect_timeout).await {
        Ok(conn) => conn,
        Err(e) => {
            let fix = connect_fix("database.url", &e);
            out.push(Check::new("database", Verdict::Fail, e.to_string()).fix(fix));
            return None;
        }
    };
    let server = server(&mut conn).await;
    let check = match server {
        Ok(s) => Check::new(
            "database",
            Verdict::Ok,
            format!(
                "{} reachable: PostgreSQL {}, TLS {}{}",
                url.redacted(),
                s.version,
                s.tls,
                s.answered
                    .map(|at| format!(", the server at {at}"))
                    .unwrap_or_default()
            ),
        ),
        Err(e) => Check::new("database", Verdict::Warn, format!("connected, but {e}")),
    };
    out.push(check);
    match crate::store::server_role(&mut conn).await {
        Ok(role) => out.extend(role_checks(&role)),
        Err(e) => out.push(Check::new(
            "database",
            Verdict::Warn,
            format!("connected, but reading whether it is a standby failed: {e}"),
        )),
    }
    Some(conn)
}

/// A standby fails the start (`courier run` refuses it); a short `statement_timeout` is
/// a warning, since claims over a large backlog would be cancelled.
fn role_checks(role: &crate::store::ServerRole) -> Vec<Check> {
    let mut out = Vec::new();
    if role.standby {
        out.push(
            Check::new(
                "database",
                Verdict::Fail,
                "the server is a standby (in recovery) and takes no writes",
            )
            .fix(format!(
                "{} (README: PostgreSQL: TLS, failover, poolers)",
                crate::store::STANDBY_FIX
            )),
        );
    }
    if let Some(ms) = role.short_statement_timeout() {
        out.push(
            Check::new(
                "statement_timeout",
                Verdict::Warn,
                format!(
                    "statement_timeout is {ms} ms on Courier's connections: claims and \
                     outcome writes over a large backlog are cancelled and retried, and it \
                     drains slowly"
                ),
            )
            .fix(crate::store::STATEMENT_TIMEOUT_FIX),
        );
    }
    out
}

#[derive(QueryableByName)]
struct Server {
    #[diesel(sql_type = Text)]
    version: String,
    #[diesel(sql_type = Text)]
    tls: String,
    /// The address and port the server took this connection on (`None` over a Unix
    /// socket): which host of a multi-host URL answered.
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    answered: Option<String>,
}

/// The server's version, this connection's TLS and where the server took it, in a
/// transaction of its own (see `store::begin`: behind PgBouncer no statement is left on a
/// server connection).
async fn server(conn: &mut AsyncPgConnection) -> Result<Server, StoreError> {
    begin(conn, None).await?;
    let read = sql_query(
        "SELECT current_setting('server_version') AS version,
                coalesce((SELECT CASE WHEN ssl THEN version ELSE 'off' END
                          FROM pg_stat_ssl WHERE pid = pg_backend_pid()), 'off') AS tls,
                host(inet_server_addr()) || ':' || inet_server_port() AS answered",
    )
    .get_result::<Server>(conn)
    .await;
    end(conn, read).await
}

/// When traces are on (`telemetry.traces` or an `OTEL_EXPORTER_OTLP_*ENDPOINT`), the
/// exporter `courier run` would build from `telemetry.*` and the `OTEL_*` variables builds:
/// a bad endpoint or `grpc` fails the start, so it must fail the pre-start check too.
fn traces(config: &Config) -> Option<Check> {
    let env = |name: &str| std::env::var(name).ok();
    if !crate::telemetry::traces_wanted(&config.telemetry, env) {
        return None;
    }
    Some(match crate::telemetry::Traces::check(&config.telemetry) {
        Ok(()) => match crate::telemetry::sampler_problem(env) {
            None => Check::new("traces", Verdict::Ok, "the OTLP/HTTP exporter builds"),
            Some(problem) => Check::new("traces", Verdict::Warn, problem)
                .fix("set OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG as README's Traces says"),
        },
        Err(e) => Check::new("traces", Verdict::Fail, e.to_string()).fix(
            "correct telemetry.endpoint / telemetry.protocol or the OTEL_EXPORTER_OTLP_* \
             variables (README: Traces)",
        ),
    })
}

/// `database.migrate_url`, when set, is reachable and logs in: `courier run` migrates
/// through it at start (and `courier migrate` always does), so a wrong one fails the start
/// however good `database.url` is.
async fn migrate_url(config: &Config, out: &mut Vec<Check>) {
    let Some(url) = &config.database.migrate_url else {
        return;
    };
    let check = match establish(url, config.database.connect_timeout).await {
        Ok(_) => Check::new(
            "migrate_url",
            Verdict::Ok,
            format!("{} reachable", url.redacted()),
        ),
        Err(e) => Check::new("migrate_url", Verdict::Fail, e.to_string())
            .fix(connect_fix("database.migrate_url", &e)),
    };
    out.push(check);
}

/// What to do about a PostgreSQL connection through `key` that failed with `e`: a
/// transient failure is the server's whereabouts; anything else is the URL's settings.
fn connect_fix(key: &str, e: &StoreError) -> String {
    if e.is_transient() {
        format!("is PostgreSQL running and reachable at that host and port? ({key})")
    } else {
        format!("correct the user, password, database or TLS settings in {key}")
    }
}

/// Whether the schema holds exactly the migrations this binary knows.
async fn schema(config: &Config, conn: &mut AsyncPgConnection, out: &mut Vec<Check>) -> bool {
    let name = &config.database.schema;
    // An error here is a schema without the migrations table.
    let applied = applied_versions(conn, name).await.ok();
    let migrate_fix = if config.database.auto_migrate {
        "`courier run` migrates it at start (database.auto_migrate: true); or run `courier migrate`"
    } else {
        "run `courier migrate` (database.auto_migrate is false)"
    };
    let not_yet = if config.database.auto_migrate {
        Verdict::Warn
    } else {
        Verdict::Fail
    };
    let fit = SchemaFit::of(applied.as_deref());
    let check = match &fit {
        SchemaFit::Unmigrated => Check::new(
            "schema",
            not_yet,
            format!("schema `{name}` holds no Courier tables yet"),
        )
        .fix(migrate_fix),
        SchemaFit::Ahead(unknown) => Check::new(
            "schema",
            Verdict::Fail,
            format!(
                "schema `{name}` has migrations this courier does not know ({}): it is newer",
                unknown.join(", ")
            ),
        )
        .fix("run the courier version that migrated it, or a newer one"),
        SchemaFit::Behind { missing, of } => Check::new(
            "schema",
            not_yet,
            format!("schema `{name}` lacks {missing} of {of} migrations"),
        )
        .fix(migrate_fix),
        SchemaFit::Current => Check::new(
            "schema",
            Verdict::Ok,
            format!(
                "schema `{name}` is migrated ({} migrations)",
                MIGRATION_NAMES().len()
            ),
        ),
    };
    out.push(check);
    fit == SchemaFit::Current
}

/// A NOTIFY on the outbox channel reaches a LISTEN connection (a transaction-mode pooler
/// drops them).
async fn notify(config: &Config, migrated: bool, out: &mut Vec<Check>) {
    if !config.database.listen {
        out.push(Check::new(
            "notify",
            Verdict::Skip,
            "database.listen is false: engines poll (scheduler.sweep_interval)",
        ));
        return;
    }
    if !migrated {
        out.push(skipped("notify", "the migrated schema"));
        return;
    }
    let check = match notify_round_trip(config).await {
        Ok(true) => Check::new(
            "notify",
            Verdict::Ok,
            "a NOTIFY on the outbox channel arrived: new rows wake engines at once",
        ),
        Ok(false) => Check::new(
            "notify",
            Verdict::Fail,
            format!(
                "a NOTIFY sent on the outbox channel never arrived within {}",
                humantime::format_duration(NOTIFY_WAIT)
            ),
        )
        .fix(match config.database.pooler {
            Pooler::Transaction => {
                "database.pooler is transaction: set database.listen: false too (a \
                 transaction-mode pooler drops LISTEN)"
            }
            Pooler::None => {
                "behind a transaction-mode pooler (PgBouncer pool_mode = transaction) set \
                 database.listen: false and database.pooler: transaction"
            }
        }),
        Err(e) => Check::new("notify", Verdict::Fail, e.to_string())
            .fix("check database.url; LISTEN needs its own connection"),
    };
    out.push(check);
}

async fn notify_round_trip(config: &Config) -> anyhow::Result<bool> {
    let store = Store::connect(&config.database).await?;
    let channel = store.notify_channel();
    let mut conn = establish(&config.database.url, config.database.connect_timeout).await?;
    conn.batch_execute(&format!("LISTEN \"{channel}\"")).await?;
    let token = format!("doctor:{}", uuid::Uuid::new_v4());
    store.notify(&token).await?;
    let mut stream = Box::pin(conn.notifications_stream());
    let heard = tokio::time::timeout(NOTIFY_WAIT, async {
        while let Some(Ok(note)) = stream.next().await {
            if note.payload == token {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    Ok(heard)
}

/// The broker accepts a connection with these credentials, on some node of the list.
async fn broker(config: &Config, out: &mut Vec<Check>) -> Option<Connection> {
    match broker::connect_from(&config.broker, " (doctor)", 0).await {
        Ok((conn, node)) => {
            out.push(every_node(config, node).await);
            Some(conn)
        }
        Err(e) => {
            out.push(Check::new("broker", Verdict::Fail, e.to_string()).fix(broker_fix(&e)));
            None
        }
    }
}

fn broker_fix(e: &broker::BrokerError) -> &'static str {
    if e.is_permanent() {
        "correct the user, password, vhost, port or TLS settings in broker.url / broker.tls \
         (retrying will not help)"
    } else {
        "is RabbitMQ running and reachable at that host and port? (broker.url)"
    }
}

/// With a list of nodes, each one in turn (node `answered` took the first connection): the
/// engine moves to the next node when one fails, so a node that refuses the login or is
/// down only shows once another fails too — `doctor` says so now. A node that refuses
/// (permanent: the nodes share users, vhosts and certificates) fails the check; one that is
/// not reachable is worth a warning.
async fn every_node(config: &Config, answered: usize) -> Check {
    let urls = &config.broker.url;
    if urls.len() == 1 {
        let url = urls
            .get(answered)
            .map(SecretUrl::redacted)
            .unwrap_or_default();
        return Check::new(
            "broker",
            Verdict::Ok,
            format!("{url} accepted the connection"),
        );
    }
    let (mut refused, mut away) = (Vec::new(), Vec::new());
    let others = urls.iter().enumerate().filter(|(i, _)| *i != answered);
    for url in others.map(|(_, url)| url) {
        let mut one = config.broker.clone();
        one.url = url.clone().into();
        match broker::connect(&one, " (doctor)").await {
            Ok(conn) => {
                let _ = conn.close(200, "doctor done".into()).await;
            }
            Err(e) if e.is_permanent() => refused.push(e),
            Err(e) => away.push(e),
        }
    }
    let accepted = urls.len() - refused.len() - away.len();
    let summary = format!("{accepted} of {} nodes accepted the connection", urls.len());
    if let Some(e) = <[_]>::first(&refused) {
        return Check::new("broker", Verdict::Fail, format!("{summary}; {e}")).fix(broker_fix(e));
    }
    if away.is_empty() {
        return Check::new("broker", Verdict::Ok, summary);
    }
    let why: Vec<String> = away.iter().map(ToString::to_string).collect();
    Check::new(
        "broker",
        Verdict::Warn,
        format!(
            "{summary}; the engine uses the others meanwhile: {}",
            why.join("; ")
        ),
    )
}

/// What one probe publish found.
enum Probe {
    Accepted,
    Missing,
    Refused(String),
    Failed(String),
    /// Not an AMQP exchange name at all (over 255 bytes): never published, the engine
    /// dead-letters such rows at once.
    Unpublishable(String),
}

/// The probes of every exchange, sorted by what they found (each named with why it was
/// probed: its open rows, or `dead_letter.exchange`).
#[derive(Default)]
struct Probed {
    accepted: Vec<String>,
    missing: Vec<String>,
    refused: Vec<String>,
    failed: Vec<String>,
    unpublishable: Vec<String>,
    /// Open rows name more distinct exchanges than were probed.
    more: Option<i64>,
    /// A failure concerns `dead_letter.exchange` (always a failure), not only rows.
    dead_letter_exchange_bad: bool,
}

/// The exchanges open rows name, and the dead-letter exchange: each exists and this user
/// may publish to it.
async fn exchanges(
    config: &Config,
    db: Option<&mut AsyncPgConnection>,
    amqp: Option<&Connection>,
    pre_start: bool,
    out: &mut Vec<Check>,
) {
    let what = if db.is_some() {
        "the broker"
    } else {
        "the migrated schema"
    };
    let (Some(amqp), Some(db)) = (amqp, db) else {
        out.push(skipped("exchanges", what));
        out.push(skipped("permissions", what));
        return;
    };
    let named = match named_exchanges(config, db).await {
        Ok(named) => named,
        Err(e) => {
            out.push(Check::new("exchanges", Verdict::Fail, e.to_string()));
            out.push(skipped("permissions", "the list of exchanges"));
            return;
        }
    };
    let mut probed = Probed {
        more: (named.distinct > named.top.len() as i64).then_some(named.distinct),
        ..Probed::default()
    };
    let rows = named.top.into_iter().map(|(e, n)| (e, Some(n)));
    let dlx = config
        .dead_letter
        .exchange
        .iter()
        .map(|e| (e.clone(), None));
    for (exchange, rows) in rows.chain(dlx) {
        // Producers write these names: printed escaped, never raw (see `cli::escape`), and
        // cut, so one 100,000-byte name does not make a 100,000-character line.
        let name = cell(&exchange, NAME_SHOWN);
        let shown = match rows {
            Some(n) => format!("`{name}` ({n} open rows)"),
            None => format!("`{name}` (dead_letter.exchange)"),
        };
        let found = probe(amqp, &exchange).await;
        if matches!(found, Probe::Missing | Probe::Refused(_)) && rows.is_none() {
            probed.dead_letter_exchange_bad = true;
        }
        match found {
            Probe::Accepted => probed.accepted.push(shown),
            Probe::Missing => probed.missing.push(shown),
            Probe::Refused(why) => probed.refused.push(format!("{shown}: {}", one_line(&why))),
            Probe::Failed(why) => probed.failed.push(format!("{shown}: {}", one_line(&why))),
            Probe::Unpublishable(why) => probed.unpublishable.push(format!("{shown}: {why}")),
        }
    }
    // Before a start, a producer's bad row only warns: the engine dead-letters it.
    let bad = if pre_start && !probed.dead_letter_exchange_bad {
        Verdict::Warn
    } else {
        Verdict::Fail
    };
    out.push(exchanges_check(&probed, bad));
    out.push(permissions_check(&probed, bad, &broker_user(config)));
}

fn exchanges_check(probed: &Probed, bad: Verdict) -> Check {
    let mut check = exchanges_found(probed, bad);
    if let Some(distinct) = probed.more {
        check.detail.push_str(&format!(
            " (the {MOST_EXCHANGES} exchanges with the most open rows, of {distinct} named)"
        ));
    }
    check
}

fn exchanges_found(probed: &Probed, bad: Verdict) -> Check {
    // Every kind of fault is named: one row with a name no exchange can have must not hide
    // the missing exchanges beside it (an outside audit saw 55 of them hidden so).
    let mut faults = Vec::new();
    let mut fixes = Vec::new();
    if !probed.unpublishable.is_empty() {
        faults.push(format!(
            "not AMQP exchange names: {}",
            probed.unpublishable.join("; ")
        ));
        fixes.push("correct the producer of the rows not named for an AMQP exchange (the engine dead-letters them at once, unpublished)");
    }
    if !probed.missing.is_empty() {
        faults.push(format!("missing: {}", probed.missing.join(", ")));
        fixes.push(
            "declare them (the engine never declares exchanges), or correct the \
             rows / dead_letter.exchange; rows to a missing exchange are retried, then \
             dead-lettered",
        );
    }
    if !probed.failed.is_empty() {
        faults.push(format!("could not probe: {}", probed.failed.join("; ")));
    }
    if !faults.is_empty() {
        let detail = faults.join("; ");
        // Only probes that failed: FAIL, before a start too, with no fix to name.
        return match fixes.is_empty() {
            true => Check::new("exchanges", Verdict::Fail, detail),
            false => Check::new("exchanges", bad, detail).fix(fixes.join("; ")),
        };
    }
    if probed.accepted.is_empty() {
        let detail = "no open rows name an exchange, and dead_letter.exchange is not set";
        return Check::new("exchanges", Verdict::Ok, detail);
    }
    let detail = format!("exist: {}", probed.accepted.join(", "));
    Check::new("exchanges", Verdict::Ok, detail)
}

fn permissions_check(probed: &Probed, bad: Verdict, user: &str) -> Check {
    if !probed.refused.is_empty() {
        let detail = format!("publishing refused to {}", probed.refused.join("; "));
        // No permission lets a client publish to an internal exchange, and the refusal's
        // text does not always reach the probe: unless every refusal says it was one, the
        // fix names both.
        let internal = "an internal exchange takes no publishes from clients, whatever the \
                        permissions: name another one (in the rows or dead_letter.exchange)";
        let all_internal = probed
            .refused
            .iter()
            .all(|r| r.contains("internal exchange"));
        let fix = match all_internal {
            true => internal.to_string(),
            false => format!(
                "grant {user} write permission on those exchanges in the vhost \
                 (rabbitmqctl set_permissions -p VHOST {user} CONF WRITE READ); if one is \
                 internal: {internal}"
            ),
        };
        return Check::new("permissions", bad, detail).fix(fix);
    }
    if probed.accepted.is_empty() {
        let detail = "no existing exchange to probe (none named, or none found)";
        return Check::new("permissions", Verdict::Skip, detail);
    }
    let detail = format!("{user} may publish to every exchange probed");
    Check::new("permissions", Verdict::Ok, detail)
}

/// The user of the first broker URL, for the fix text.
fn broker_user(config: &Config) -> String {
    config
        .broker
        .url
        .get(0)
        .and_then(|u| url::Url::parse(u.expose()).ok())
        .map(|u| match u.username() {
            "" => "guest".to_string(),
            name => name.to_string(),
        })
        .unwrap_or_else(|| "the user".into())
}

/// The exchanges open rows name: the [`MOST_EXCHANGES`] with the most rows, with their
/// counts, and how many distinct ones there are (of a bounded read).
struct Named {
    top: Vec<(String, i64)>,
    distinct: i64,
}

/// See [`Named`].
async fn named_exchanges(config: &Config, conn: &mut AsyncPgConnection) -> anyhow::Result<Named> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        exchange: String,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        rows: i64,
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        named: i64,
    }
    let schema = &config.database.schema;
    let sql = format!(
        "SELECT exchange, count(*) AS rows, count(*) OVER () AS named FROM (
             SELECT exchange FROM \"{schema}\".outbox
             WHERE status IN ('pending', 'in_flight', 'retrying') LIMIT 100000) open
         GROUP BY exchange ORDER BY count(*) DESC LIMIT {MOST_EXCHANGES}"
    );
    begin(conn, None).await?;
    let rows = sql_query(sql).load::<Row>(conn).await;
    let rows = end(conn, rows).await?;
    Ok(Named {
        distinct: rows.iter().map(|r| r.named).next().unwrap_or(0),
        top: rows.into_iter().map(|r| (r.exchange, r.rows)).collect(),
    })
}

/// Whether `exchange` exists (a passive declare: the broker answers the declare itself, so
/// a 404 is told apart from any other close), then whether this user may publish to it.
async fn probe(conn: &Connection, exchange: &str) -> Probe {
    let bounded = |what: &'static str| {
        move |_| {
            Probe::Failed(format!(
                "no answer to {what} within {}",
                humantime::format_duration(PROBE_WAIT)
            ))
        }
    };
    // lapin panics on a name AMQP cannot carry: such a row is the engine's to dead-letter.
    if let Err(why) = ShortString::try_new(exchange) {
        return Probe::Unpublishable(format!(
            "{} bytes, AMQP allows at most 255 ({why})",
            exchange.len()
        ));
    }
    // The default exchange always exists and refuses a declare, even a passive one.
    if !exchange.is_empty() {
        match tokio::time::timeout(PROBE_WAIT, declare_passive(conn, exchange)).await {
            Err(e) => return bounded("a passive declare")(e),
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return match ChannelClose::from_error(&e) {
                    Some(close) if close.code == 404 => Probe::Missing,
                    _ => Probe::Failed(e.to_string()),
                }
            }
        }
    }
    match tokio::time::timeout(PROBE_WAIT, publish_rolled_back(conn, exchange)).await {
        Err(e) => bounded("a publish")(e),
        Ok(Ok(())) => Probe::Accepted,
        Ok(Err(e)) => match ChannelClose::from_error(&e) {
            Some(close) if close.code == 404 => Probe::Missing,
            Some(close) => Probe::Refused(close.text),
            // The broker closed the channel on the publish, and lapin learnt it before it
            // could send the rollback: the exchange exists, so that close was a refusal.
            None if matches!(e.kind(), lapin::ErrorKind::InvalidChannelState(..)) => {
                Probe::Refused("the broker closed the channel on a publish to it".into())
            }
            None => Probe::Failed(e.to_string()),
        },
    }
}

async fn declare_passive(conn: &Connection, exchange: &str) -> Result<(), lapin::Error> {
    let channel = conn.create_channel().await?;
    let passive = lapin::options::ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            passive,
            lapin::types::FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "probe done".into()).await;
    Ok(())
}

/// Publishes an empty message to `exchange` inside a transaction and rolls it back: the
/// broker checks the permission on the publish, and routes nothing.
async fn publish_rolled_back(conn: &Connection, exchange: &str) -> Result<(), lapin::Error> {
    let channel = conn.create_channel().await?;
    channel.tx_select().await?;
    channel
        .basic_publish(
            exchange.into(),
            "courier.doctor.probe".into(),
            BasicPublishOptions::default(),
            &[],
            BasicProperties::default(),
        )
        .await?;
    channel.tx_rollback().await?;
    let _ = channel.close(200, "probe done".into()).await;
    Ok(())
}

/// The admin API's address can be bound (nothing else listens there), or a Courier engine
/// already serves it: `doctor` is run beside a running engine when an alert fires, and its
/// own admin API is no fault.
async fn admin_bind(config: &Config) -> Check {
    let Some(bind) = &config.admin.bind else {
        return Check::new("admin", Verdict::Skip, "admin.bind is null: no admin API");
    };
    match std::net::TcpListener::bind(bind.as_str()) {
        Ok(_) => Check::new(
            "admin",
            Verdict::Ok,
            format!("{bind} is free for the admin API"),
        ),
        Err(_) if serves_courier_metrics(config, bind).await => Check::new(
            "admin",
            Verdict::Ok,
            format!("{bind} is served by a running Courier engine (its /metrics answers)"),
        ),
        Err(e) => Check::new("admin", Verdict::Fail, format!("cannot bind {bind}: {e}"))
            .fix("another process listens there: stop it or change admin.bind"),
    }
}

/// Whether `bind` answers `GET /metrics` with Courier's metrics, within two seconds.
async fn serves_courier_metrics(config: &Config, bind: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The Host header must pass `admin.allowed_hosts` when it is set.
    let host = <[_]>::first(&config.admin.allowed_hosts).map_or(bind, String::as_str);
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(bind).await?;
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.take(1 << 20).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(2), ask).await {
        Ok(Ok(answer)) => {
            let text = String::from_utf8_lossy(&answer);
            text.starts_with("HTTP/1.1 200") && text.contains("courier_")
        }
        _ => false,
    }
}
