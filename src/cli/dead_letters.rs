//! `courier dead-letters …`: inspect, requeue and discard what the engine gave up on.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use uuid::Uuid;

use super::escape::{cell, multi_line, one_line};
use crate::{config::Config, store::Store};

/// The dead-letter subcommands.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters, newest first: id, exchange, routing key, attempts, failed at, error.
    List {
        /// Most rows to show (at least 1).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        /// Only those that failed within this long (e.g. 1h, 2days).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
    },
    /// Show every column of one dead letter (payload as text when UTF-8, else base64).
    Show {
        /// The message id.
        id: Uuid,
    },
    /// Move dead letters back to the outbox as pending, attempts reset, in one transaction.
    Requeue {
        /// Message ids.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<Uuid>,
        /// Requeue every dead letter (optionally only those of --exchange).
        #[arg(long)]
        all: bool,
        /// With --all: only dead letters for this exchange.
        #[arg(long, requires = "all")]
        exchange: Option<String>,
    },
    /// Delete dead letters for good.
    Discard {
        /// Message ids.
        #[arg(required_unless_present = "older_than", conflicts_with = "older_than")]
        ids: Vec<Uuid>,
        /// Every dead letter that failed more than this long ago (e.g. 30days).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
    },
}

impl DeadLetterCommand {
    /// A combination of arguments clap lets through (its `requires` does not catch
    /// `--exchange` beside positional ids): a usage error, exit 2.
    pub fn misuse(&self) -> Option<&'static str> {
        match self {
            DeadLetterCommand::Requeue {
                all: false,
                exchange: Some(_),
                ..
            } => Some("--exchange only filters --all (it does not send a requeued row elsewhere)"),
            _ => None,
        }
    }
}

/// Runs one dead-letter subcommand.
pub async fn run(config: &Config, cmd: DeadLetterCommand) -> anyhow::Result<()> {
    let store = super::commands::migrated_store(config).await?;
    match cmd {
        DeadLetterCommand::List { limit, since } => list(&store, limit, since).await,
        DeadLetterCommand::Show { id } => show(&store, id).await,
        DeadLetterCommand::Requeue { ids, all, exchange } => {
            let ids = if all {
                store.dead_letter_ids(exchange.as_deref()).await?
            } else {
                ids
            };
            let moved = store.requeue_dead_letters(&ids).await.context("requeue")?;
            if all {
                // With --all, a row that vanished between listing and moving was requeued
                // or discarded by someone else at the same moment: not an error.
                println!("requeued {} dead letter(s)", moved.len());
                let kept = still_dead(&store, &ids, &moved).await?;
                if !kept.is_empty() {
                    println!(
                        "left {}: a producer reused their ids and those rows are still in the \
                         outbox: {}",
                        kept.len(),
                        kept.join(", ")
                    );
                }
                return Ok(());
            }
            let kept = still_dead(&store, &ids, &moved).await?;
            if !kept.is_empty() {
                println!("requeued {} dead letter(s)", moved.len());
                let unknown: Vec<String> = ids
                    .iter()
                    .map(Uuid::to_string)
                    .filter(|id| !kept.contains(id) && !moved.iter().any(|m| m.to_string() == *id))
                    .collect();
                let unknown = if unknown.is_empty() {
                    String::new()
                } else {
                    format!("; no dead letter with id {}", unknown.join(", "))
                };
                bail!(
                    "not requeued: {}: a producer reused the id and that row is still waiting \
                     or in flight in the outbox; requeue again once it is confirmed{unknown}",
                    kept.join(", ")
                );
            }
            report("requeued", &ids, &moved)
        }
        DeadLetterCommand::Discard { ids, older_than } => match older_than {
            Some(age) => {
                let gone = store.discard_dead_letters_older_than(age).await?;
                println!("discarded {} dead letter(s)", gone.len());
                Ok(())
            }
            None => {
                let gone = store.discard_dead_letters(&ids).await.context("discard")?;
                report("discarded", &ids, &gone)
            }
        },
    }
}

/// Of the ids asked for and not moved, those still in `dead_letters`: a requeue leaves a
/// dead letter whose id is in the outbox again.
async fn still_dead(store: &Store, asked: &[Uuid], moved: &[Uuid]) -> anyhow::Result<Vec<String>> {
    let mut kept = Vec::new();
    for id in asked.iter().filter(|id| !moved.contains(id)) {
        if store.dead_letter(*id).await?.is_some() {
            kept.push(id.to_string());
        }
    }
    Ok(kept)
}

/// Prints what was done and fails (exit 1) naming the ids that were not found.
/// What one requeue or discard of ids did: the known ones are done (each in the one
/// statement), and any unknown id is named, exit 1 — the others stay done.
fn report(verb: &str, asked: &[Uuid], done: &[Uuid]) -> anyhow::Result<()> {
    println!("{verb} {} dead letter(s)", done.len());
    let mut missing: Vec<String> = Vec::new();
    for id in asked.iter().filter(|id| !done.contains(id)) {
        let id = id.to_string();
        if !missing.contains(&id) {
            missing.push(id);
        }
    }
    match (missing.is_empty(), done.is_empty()) {
        (true, _) => Ok(()),
        (false, true) => bail!("no dead letter with id {}", missing.join(", ")),
        (false, false) => bail!(
            "no dead letter with id {} (the others were {verb})",
            missing.join(", ")
        ),
    }
}

async fn list(store: &Store, limit: u32, since: Option<Duration>) -> anyhow::Result<()> {
    // One more than asked for, to tell whether there are more.
    let mut rows = store.dead_letters(since, limit.saturating_add(1)).await?;
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    println!(
        "{:<36}  {:<20}  {:<20}  {:>8}  {:<23}  last error",
        "id", "exchange", "routing key", "attempts", "failed at"
    );
    for r in &rows {
        println!(
            "{:<36}  {:<20}  {:<20}  {:>8}  {:<23}  {}",
            r.id,
            cell(&r.exchange, 20),
            cell(&r.routing_key, 20),
            r.attempts,
            r.failed_at.format("%Y-%m-%d %H:%M:%S UTC"),
            cell(r.last_error.as_deref().unwrap_or(""), 80)
        );
    }
    if more {
        println!(
            "({} dead letter(s) shown, the --limit; there are more: `courier status` counts them all)",
            rows.len()
        );
    } else {
        println!("({} dead letter(s))", rows.len());
    }
    Ok(())
}

async fn show(store: &Store, id: Uuid) -> anyhow::Result<()> {
    let Some(r) = store.dead_letter(id).await? else {
        bail!("no dead letter with id {id}");
    };
    println!("id:            {}", r.id);
    // Everything below but the id, numbers and dates is producer text: escaped.
    println!("exchange:      {}", one_line(&r.exchange));
    println!("routing key:   {}", one_line(&r.routing_key));
    println!(
        "content type:  {}",
        one_line(r.content_type.as_deref().unwrap_or("-"))
    );
    match &r.headers {
        // What the store gives back when serde_json cannot hold the producer's JSON.
        serde_json::Value::String(raw) => println!(
            "headers:       {} (as stored: JSON Courier cannot read)",
            one_line(raw)
        ),
        headers => println!("headers:       {}", one_line(&headers.to_string())),
    }
    println!(
        "attempts:      {} (max {})",
        r.attempts,
        r.max_attempts
            .map(|m| m.to_string())
            .unwrap_or_else(|| "config default".into())
    );
    match r.created_at {
        Some(at) => println!("created at:    {at}"),
        None => println!("created at:    (a value Courier cannot read)"),
    }
    println!("failed at:     {}", r.failed_at);
    println!(
        "last error:    {}",
        one_line(r.last_error.as_deref().unwrap_or("-"))
    );
    if let Some(key) = &r.ordering_key {
        println!(
            "ordering key:  {} (seq {}; with ordering.on_dead_letter: block the key waits for this row)",
            one_line(key),
            r.seq.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    match r.payload_text() {
        Some(text) => println!(
            "payload (text, {} bytes):\n{}",
            r.payload.len(),
            multi_line(text)
        ),
        None => {
            use base64::Engine as _;
            println!(
                "payload (binary, {} bytes, base64):\n{}",
                r.payload.len(),
                base64::engine::general_purpose::STANDARD.encode(&r.payload)
            )
        }
    }
    Ok(())
}
