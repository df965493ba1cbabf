//! `courier demo`: a first run that shows something.
//!
//! Declares `courier.demo` (a topic exchange) and a queue of the same name, enqueues N
//! messages through the outbox, runs the engine in this process with a progress bar of
//! confirmed messages, and ends with a summary: confirmed, retried, dead-lettered,
//! throughput and commit→confirm latency percentiles.

use std::{collections::HashSet, time::Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use lapin::{
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions},
    types::FieldTable,
    ExchangeKind,
};

use crate::{broker, config::Config, events::EngineEvent, Engine, OutboxMessage};

const EXCHANGE: &str = "courier.demo";
const QUEUE: &str = "courier.demo";

async fn declare(config: &Config) -> anyhow::Result<()> {
    let conn = broker::connect(&config.broker, "-demo-setup").await?;
    let ch = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        EXCHANGE.into(),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    let q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(QUEUE.into(), q, FieldTable::default())
        .await?;
    ch.queue_bind(
        QUEUE.into(),
        EXCHANGE.into(),
        "demo.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.queue_purge(QUEUE.into(), QueuePurgeOptions::default())
        .await?;
    let _ = conn.close(200, "demo ready".into()).await;
    Ok(())
}

/// Declares the demo topology, enqueues `n` messages, drives them through an engine in this
/// process with a progress bar, and prints the summary.
pub async fn run(config: Config, n: usize) -> anyhow::Result<()> {
    declare(&config)
        .await
        .context("declaring the demo exchange and queue")?;
    println!("declared exchange `{EXCHANGE}` and queue `{QUEUE}` (purged)");
    let engine = Engine::start(config).await.context("starting the engine")?;
    let mut events = engine.subscribe();
    let messages: Vec<OutboxMessage> = (0..n)
        .map(|i| {
            OutboxMessage::new(
                EXCHANGE,
                format!("demo.order.{i}"),
                format!(r#"{{"order":{i}}}"#),
            )
            .with_content_type("application/json")
        })
        .collect();
    let ids: HashSet<uuid::Uuid> = messages.iter().map(|m| m.id).collect();
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} confirmed {pos}/{len} [{bar:40}] {per_sec} {msg}")
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
    let (mut confirmed, mut dead) = (0usize, 0usize);
    while confirmed + dead < n {
        match events.recv().await {
            Ok(EngineEvent::Confirmed(done)) => {
                let k = done.iter().filter(|id| ids.contains(id)).count();
                confirmed += k;
                bar.inc(k as u64);
            }
            Ok(EngineEvent::DeadLettered(done)) => {
                dead += done.iter().filter(|(id, _)| ids.contains(id)).count();
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                let all: Vec<uuid::Uuid> = ids.iter().copied().collect();
                let outcomes = engine.store().outcomes(&all).await?;
                confirmed = outcomes
                    .values()
                    .filter(|o| **o == crate::Outcome::Confirmed)
                    .count();
                dead = outcomes.len() - confirmed;
                bar.set_position(confirmed as u64);
            }
            Err(e) => anyhow::bail!("engine events ended: {e}"),
        }
    }
    let elapsed = start.elapsed();
    bar.finish_with_message("done");
    enqueue.await.context("enqueue task")??;
    let all: Vec<uuid::Uuid> = ids.iter().copied().collect();
    let latency = engine.store().latency_of(&all).await?;
    let counters = engine.counters();
    engine.shutdown().await;
    println!();
    println!("| result | value |");
    println!("|---|---:|");
    println!("| confirmed | {confirmed} |");
    println!("| retried | {} |", counters.retried);
    println!("| dead-lettered | {dead} |");
    println!("| elapsed | {:.2} s |", elapsed.as_secs_f64());
    println!(
        "| throughput | {:.0} msg/s |",
        n as f64 / elapsed.as_secs_f64()
    );
    if let Some((p50, p99)) = latency {
        println!("| commit→confirm p50 | {p50:.1} ms |");
        println!("| commit→confirm p99 | {p99:.1} ms |");
    }
    println!("\nthe messages are in queue `{QUEUE}`; `courier status` shows the outbox.");
    Ok(())
}
