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
    crate::store::migrate(
        &config.database.url,
        &config.database.schema,
        config.database.connect_timeout,
    )
    .await
    .with_context(|| format!("migrating schema `{}`", config.database.schema))
}

/// `courier status`
pub async fn status(config: &Config) -> anyhow::Result<()> {
    let store = Store::connect(&config.database).await?;
    let stats = store
        .stats()
        .await
        .with_context(|| format!("reading schema `{}`", config.database.schema))?;
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
    Ok(())
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
