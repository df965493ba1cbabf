//! One function per command.

use std::path::Path;

use anyhow::Context;

use super::escape::{cell, one_line};
use crate::{
    config::Config,
    state::{Status, ALL_STATUSES},
    store::{EngineRecord, SchemaFit, Store},
};

/// `courier migrate`: fails (exit 1) on a schema a newer courier migrated, which `run`
/// refuses too, so a deploy learns it at the migrate step.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let applied = apply_migrations(config).await?;
    let schema = &config.database.schema;
    let store = Store::connect(&config.database).await?;
    let fit = store.schema_fit().await?;
    if let SchemaFit::Ahead(_) = fit {
        anyhow::bail!("schema `{schema}` {}", fit.explain());
    }
    if applied.is_empty() {
        println!("schema `{}` is up to date", config.database.schema);
    } else {
        for name in &applied {
            println!("applied {name}");
        }
        println!(
            "schema `{}`: {} migration(s) applied",
            config.database.schema,
            applied.len()
        );
    }
    Ok(())
}

async fn apply_migrations(config: &Config) -> anyhow::Result<Vec<String>> {
    crate::store::migrate_config(&config.database)
        .await
        .with_context(|| format!("migrating schema `{}`", config.database.schema))
}

/// The store, once its schema is known to be migrated: a command run before `courier
/// migrate` says so in one line instead of failing on a missing table.
pub(super) async fn migrated_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::connect(&config.database).await?;
    let schema = &config.database.schema;
    let migrated = store
        .is_migrated()
        .await
        .with_context(|| format!("reading schema `{schema}`"))?;
    if !migrated {
        anyhow::bail!("schema `{schema}` is not migrated yet: run `courier migrate`");
    }
    Ok(store)
}

/// `courier status [--watch] [--json]`
pub async fn status(config: &Config, watch: bool, json: bool) -> anyhow::Result<()> {
    let store = migrated_store(config).await?;
    loop {
        let stats = store
            .stats()
            .await
            .with_context(|| format!("reading schema `{}`", config.database.schema))?;
        let blocked = blocked_keys(config, &store).await?;
        if json {
            let mut out = stats.to_json();
            if let Some(blocked) = &blocked {
                out["blocked_keys"] = serde_json::to_value(blocked).unwrap_or_default();
            }
            println!("{out}");
        } else {
            if watch {
                if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                    print!("\x1b[2J\x1b[H"); // clear the screen, cursor home
                }
                println!(
                    "courier status — schema `{}` — {}   (Ctrl-C to quit)\n",
                    config.database.schema,
                    chrono::Local::now().format("%H:%M:%S")
                );
            }
            print_stats(&stats);
            if let Some(blocked) = &blocked {
                print_blocked(blocked);
            }
        }
        if !watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Most blocked keys `courier status` names.
const BLOCKED_SHOWN: u32 = 10;

/// The keys waiting behind a dead letter, when dead letters block their key
/// (`ordering.on_dead_letter: block`); `None` when they do not.
async fn blocked_keys(
    config: &Config,
    store: &Store,
) -> anyhow::Result<Option<Vec<crate::store::BlockedKey>>> {
    if config.ordering.on_dead_letter != crate::config::OnDeadLetter::Block {
        return Ok(None);
    }
    let keys = store
        .blocked_keys(BLOCKED_SHOWN + 1)
        .await
        .with_context(|| format!("reading schema `{}`", config.database.schema))?;
    Ok(Some(keys))
}

/// Each blocked key, its waiting rows and the dead letter that holds it (keys are producer
/// text: escaped).
fn print_blocked(blocked: &[crate::store::BlockedKey]) {
    if blocked.is_empty() {
        return;
    }
    println!("\nkeys blocked behind a dead letter (requeue or discard it to let the key go on):");
    for b in blocked.iter().take(BLOCKED_SHOWN as usize) {
        let waiting = match b.waiting {
            n if n > 10_000 => "over 10000".to_string(),
            n => n.to_string(),
        };
        println!(
            "  {}  {waiting} waiting  behind {}  (courier dead-letters show {})",
            cell(&b.key, 64),
            b.dead_letter,
            b.dead_letter
        );
    }
    if blocked.len() > BLOCKED_SHOWN as usize {
        println!("  … and more");
    }
}

/// One line per status and the dead letters, past the exact bound marked: `≥` for rows
/// still to deliver (counted up to the bound: at least that many), `≈` for confirmed rows
/// and dead letters (the planner's estimate; `≥` while there is none beyond the count).
fn print_stats(stats: &crate::store::Stats) {
    let line = |name: &str, n: i64| {
        let mark = match (stats.approximate.contains(&name), name) {
            (false, _) => "",
            (true, "pending" | "retrying" | "in_flight") => "≥",
            // No estimate past the count yet (the table was never analysed): what was
            // counted is all that is known.
            (true, _) if n == crate::store::EXACT_UP_TO + 1 => "≥",
            (true, _) => "≈",
        };
        println!("{name:<13} {:>10}", format!("{mark}{n}"));
    };
    for status in ALL_STATUSES.into_iter().filter(|s| *s != Status::Failed) {
        line(status.as_str(), stats.count(status));
    }
    line("dead_letters", stats.dead_letters);
    let among = if stats.approximate.contains(&"oldest_pending_age") {
        " (among the earliest due: past the bound, an older row due later is not seen)"
    } else {
        ""
    };
    match stats.oldest_pending_age {
        Some(age) => println!(
            "oldest undelivered: {}{among}",
            humantime::format_duration(std::time::Duration::from_millis(age.as_millis() as u64))
        ),
        None => println!("oldest undelivered: none"),
    }
}

/// `courier engines [--json]`: who is running and what each holds, from the registry. A
/// schema that is not migrated (or predates the registry) fails like `courier status` does.
pub async fn engines(config: &Config, json: bool) -> anyhow::Result<()> {
    let store = migrated_store(config).await?;
    let engines = store
        .engines(config.scheduler.engine_timeout)
        .await
        .with_context(|| format!("reading schema `{}`", config.database.schema))?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&engines).context("writing the engines as JSON")?
        );
    } else {
        print!("{}", engines_table(&engines));
    }
    Ok(())
}

/// The registry as a table. Id, host and version are escaped and cut to [`CELL`]
/// characters: any database user can write the registry, and a control sequence there must
/// not reach the operator's terminal, nor a 5,000-character version widen every line.
fn engines_table(engines: &[EngineRecord]) -> String {
    use std::fmt::Write as _;
    const CELL: usize = 64;
    let ids: Vec<_> = engines.iter().map(|e| cell(&e.id, CELL)).collect();
    let hosts: Vec<_> = engines.iter().map(|e| cell(&e.host, CELL)).collect();
    let versions: Vec<_> = engines.iter().map(|e| cell(&e.version, CELL)).collect();
    let width = |col: &[String], title: &str| {
        col.iter()
            .map(|s| s.chars().count())
            .chain([title.len()])
            .max()
            .unwrap_or(0)
    };
    let (wi, wh, wv) = (
        width(&ids, "id"),
        width(&hosts, "host"),
        width(&versions, "version"),
    );
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<wi$}  {:<wh$}  {:>7}  {:<wv$}  {:<7}  {:>12}  {:>6}  started",
        "id", "host", "pid", "version", "state", "last beat", "holds"
    );
    for (i, e) in engines.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:<wi$}  {:<wh$}  {:>7}  {:<wv$}  {:<7}  {:>12}  {:>6}  {}",
            ids[i],
            hosts[i],
            e.pid,
            versions[i],
            one_line(&e.state),
            ago(e.since_beat_ms),
            e.holds,
            e.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
        );
    }
    let _ = writeln!(out, "({} engine(s))", engines.len());
    out
}

/// How long ago a beat was: tenths of a second under a minute ("1.2s ago"), whole seconds
/// beyond ("3m 5s ago"), since a beat every second or so is the normal case.
fn ago(ms: i64) -> String {
    // A beat a moment ahead is a beat written after this statement's `now()`; one dated
    // further ahead is a registry row written by hand (declared dead at the next beat of a
    // running engine) or a clock far ahead.
    if ms < -1_000 {
        return "in the future".to_string();
    }
    let ms = u64::try_from(ms).unwrap_or(0);
    if ms < 60_000 {
        format!("{:.1}s ago", ms as f64 / 1000.0)
    } else {
        format!(
            "{} ago",
            humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
        )
    }
}

/// `courier run`
pub async fn run(config_path: &Path, config: Config) -> anyhow::Result<()> {
    tracing::info!(
        config = %config_path.display(),
        database = %config.database.url,
        broker = %config.broker.url,
        schema = %config.database.schema,
        auto_migrate = config.database.auto_migrate,
        "courier starting"
    );
    let engine = crate::Engine::start(config)
        .await
        .context("starting the engine")?;
    wait_for_signal().await?;
    tracing::info!("signal received");
    engine.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    #[test]
    fn last_beats_read_as_ages() {
        assert_eq!(ago(1234), "1.2s ago");
        assert_eq!(ago(-5), "0.0s ago");
        assert_eq!(ago(-86_400_000), "in the future");
        assert_eq!(ago(185_400), "3m 5s ago");
    }

    #[test]
    fn the_table_lines_up_and_escapes_registry_text() {
        let at = Utc.with_ymd_and_hms(2026, 11, 25, 10, 0, 0).unwrap();
        let engine = |id: &str, host: &str, state: &str| EngineRecord {
            id: id.into(),
            host: host.into(),
            pid: 4242,
            version: "0.1.0".into(),
            started_at: at,
            heartbeat_at: at,
            since_beat_ms: 1234,
            state: state.into(),
            holds: 7,
        };
        let table = engines_table(&[
            engine("courier-4242-abcd1234", "web-1", "running"),
            engine("x", "evil\x1b[2J", "dead"),
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(
            lines[1].starts_with("courier-4242-abcd1234  web-1"),
            "{table}"
        );
        assert!(lines[1].contains("running"), "{table}");
        assert!(lines[1].contains("1.2s ago"), "{table}");
        assert!(lines[1].ends_with("7  2026-11-25 10:00:00 UTC"), "{table}");
        assert!(!table.contains('\x1b'), "{table}");
        assert!(lines[2].contains("evil\\x1b[2J"), "{table}");
        let pid_at = |l: &str| l.find("4242  ").unwrap();
        assert_eq!(pid_at(lines[1]), pid_at(lines[2]), "{table}");
        assert_eq!(lines[3], "(2 engine(s))");
        // A forged version of any length keeps every line short.
        let mut long = engine("y", "h", "dead");
        long.version = "v".repeat(5_000);
        let table = engines_table(&[long]);
        assert!(table.lines().all(|l| l.chars().count() < 250), "{table}");
        assert!(table.contains('…'), "{table}");
    }
}
