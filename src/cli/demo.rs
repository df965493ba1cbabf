//! `courier demo`: a first run that shows something.
//!
//! Declares `<database.schema>.demo` (a topic exchange) and a queue of the same name, enqueues
//! N messages through the outbox, runs the engine in this process with a progress bar of
//! confirmed messages, and ends with a summary: confirmed, retried, dead-lettered,
//! throughput and commit→confirm latency percentiles.

use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    ExchangeKind,
};

use crate::{broker, config::Config, Engine, OutboxMessage};

/// Declares the demo's exchange and queue, both named `name`, and returns how many messages
/// the queue already holds.
///
/// The queue is not purged: it is named after the configured schema, so it is this user's,
/// but another demo on the same schema may be filling it at this moment.
async fn declare(config: &Config, name: &str) -> anyhow::Result<u32> {
    let conn = broker::connect(&config.broker, "-demo-setup").await?;
    let ch = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    let q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let queue = ch
        .queue_declare(name.into(), q, FieldTable::default())
        .await?;
    ch.queue_bind(
        name.into(),
        name.into(),
        "demo.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let _ = conn.close(200, "demo ready".into()).await;
    Ok(queue.message_count())
}

/// The demo's schema, `<database.schema>_demo`, must be a schema name Courier takes: with a
/// `database.schema` of 46 bytes or more it is longer than 50. A configuration error, said
/// before anything is declared.
pub fn check_schema(config: &Config) -> anyhow::Result<()> {
    let schema = demo_schema(config);
    crate::store::check_schema_name(&schema).map_err(|why| {
        anyhow::anyhow!(
            "database.schema `{}`: the demo's schema {why} (the demo adds `_demo`); run the \
             demo with a shorter COURIER_DATABASE_SCHEMA",
            config.database.schema
        )
    })
}

fn demo_schema(config: &Config) -> String {
    format!("{}_demo", config.database.schema)
}

/// How long the demo waits without one more of its rows settled before it gives up.
const STALL: std::time::Duration = std::time::Duration::from_secs(60);

/// Declares the demo topology, enqueues `n` messages, drives them through an engine in this
/// process with a progress bar, and prints the summary.
///
/// The demo runs in a schema of its own (`<schema>_demo`), so an engine already serving the
/// configured schema (`courier run` in another terminal) does not take its rows, and it
/// counts outcomes in the database, so it finishes whoever publishes them (two demos at
/// once share the schema and each still sees its own rows through). Its exchange and queue
/// are named after the configured schema (`<schema>.demo`), so demos of other schemas on the
/// same broker stay apart.
pub async fn run(mut config: Config, n: usize) -> anyhow::Result<()> {
    let name = format!("{}.demo", config.database.schema);
    config.database.schema = demo_schema(&config);
    config.database.auto_migrate = true;
    // The demo's engine serves no admin API: `courier run` beside it may hold that address.
    config.admin.bind = None;
    let schema = config.database.schema.clone();
    let held = declare(&config, &name)
        .await
        .context("declaring the demo exchange and queue")?;
    println!(
        "declared exchange and queue `{name}` (messages already in it: {held}); outbox schema `{schema}`"
    );
    let engine = Engine::start(config).await.context("starting the engine")?;
    let messages: Vec<OutboxMessage> = (0..n)
        .map(|i| {
            OutboxMessage::new(
                &name,
                format!("demo.order.{i}"),
                format!(r#"{{"order":{i}}}"#),
            )
            .with_content_type("application/json")
        })
        .collect();
    let ids: Vec<uuid::Uuid> = messages.iter().map(|m| m.id).collect();
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} confirmed {pos}/{len} [{bar:40}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let start = Instant::now();
    let store = engine.store().clone();
    let enqueue = actix_rt::spawn(async move {
        for chunk in messages.chunks(1_000) {
            store.enqueue_many(chunk).await?;
        }
        Ok::<_, crate::StoreError>(())
    });
    let (confirmed, dead) = settle(&engine, &ids, &bar).await?;
    let elapsed = start.elapsed();
    bar.finish_with_message("done");
    enqueue.await.context("enqueue task")??;
    let latency = engine.store().latency_of(&ids).await?;
    let counters = engine.counters();
    engine.shutdown().await;
    println!();
    println!("| result | value |");
    println!("|---|---:|");
    println!("| confirmed | {confirmed} |");
    println!("| retried | {} |", counters.retried);
    println!("| dead-lettered | {dead} |");
    println!("| elapsed | {:.1} s |", elapsed.as_secs_f64());
    println!(
        "| throughput | ≈ {} msg/s |",
        rounded(n as f64 / elapsed.as_secs_f64())
    );
    if let Some((p50, p99)) = latency {
        // Every row was enqueued at once: most of this is waiting behind the backlog.
        println!("| commit→confirm p50, {n} queued at once | {p50:.0} ms |");
        println!("| commit→confirm p99, {n} queued at once | {p99:.0} ms |");
    }
    println!(
        "\nThe latencies are of a {n}-message backlog, queueing included; one message on an idle \
         engine takes about 2 ms (README, Speed).\nThe messages are in queue `{name}`, which \
         nothing consumes (`rabbitmqctl purge_queue {name}` empties it); \
         `COURIER_DATABASE_SCHEMA={schema} courier status` (from a checkout: \
         `COURIER_DATABASE_SCHEMA={schema} cargo run --release -- status`; add the same \
         `--config` if you gave the demo one) shows the demo's outbox."
    );
    Ok(())
}

/// Follows the demo's rows in the database until each is confirmed or dead-lettered, by
/// whichever engine; fails when none settles for [`STALL`].
async fn settle(
    engine: &crate::EngineHandle,
    ids: &[uuid::Uuid],
    bar: &ProgressBar,
) -> anyhow::Result<(usize, usize)> {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    let (mut settled, mut progress_at) = (0, Instant::now());
    loop {
        tick.tick().await;
        let outcomes = engine.store().outcomes(ids).await?;
        let confirmed = outcomes
            .values()
            .filter(|o| **o == crate::Outcome::Confirmed)
            .count();
        let dead = outcomes.len() - confirmed;
        bar.set_position(confirmed as u64);
        if confirmed + dead >= ids.len() {
            return Ok((confirmed, dead));
        }
        if confirmed + dead > settled {
            (settled, progress_at) = (confirmed + dead, Instant::now());
        } else if progress_at.elapsed() > STALL {
            anyhow::bail!(
                "no demo message settled for {}: {settled} of {} done; `courier status` on \
                 the demo schema and the engine's log say why",
                humantime::format_duration(STALL),
                ids.len()
            );
        }
    }
}

/// A rate rounded to two significant digits (9,347 → 9,300): the demo is a rough figure.
fn rounded(rate: f64) -> String {
    if !rate.is_finite() || rate < 1.0 {
        return format!("{rate:.1}");
    }
    let magnitude = 10f64.powi(rate.log10().floor() as i32 - 1).max(1.0);
    let r = ((rate / magnitude).round() * magnitude) as u64;
    let digits = r.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates_are_rounded_to_two_significant_digits() {
        assert_eq!(super::rounded(9_347.2), "9,300");
        assert_eq!(super::rounded(12_851.0), "13,000");
        assert_eq!(super::rounded(87.4), "87");
        assert_eq!(super::rounded(0.5), "0.5");
    }
}
