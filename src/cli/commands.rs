//! One function per command.

use std::path::Path;

use anyhow::Context;

use crate::{config::Config, state::ALL_STATUSES, store::Store};

/// `courier migrate`
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let applied = apply_migrations(config).await?;
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

/// `courier status [--watch] [--json]`
pub async fn status(config: &Config, watch: bool, json: bool) -> anyhow::Result<()> {
    let store = Store::connect(&config.database).await?;
    loop {
        let stats = store
            .stats()
            .await
            .with_context(|| format!("reading schema `{}`", config.database.schema))?;
        if json {
            println!("{}", stats_json(&stats));
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

/// The stats as a JSON object (also served by the admin API).
pub fn stats_json(stats: &crate::store::Stats) -> serde_json::Value {
    serde_json::json!({
        "outbox": stats.outbox,
        "dead_letters": stats.dead_letters,
        "oldest_pending_age_seconds": stats.oldest_pending_age.map(|a| a.as_secs_f64()),
    })
}

fn print_stats(stats: &crate::store::Stats) {
    for status in ALL_STATUSES {
        println!("{:<13} {:>10}", status.as_str(), stats.count(status));
    }
    println!("{:<13} {:>10}", "dead_letters", stats.dead_letters);
    match stats.oldest_pending_age {
        Some(age) => println!(
            "oldest undelivered: {}",
            humantime::format_duration(std::time::Duration::from_millis(age.as_millis() as u64))
        ),
        None => println!("oldest undelivered: none"),
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
