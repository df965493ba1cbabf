//! An idempotent consumer on Courier's inbox, inside an actix System: it applies
//! `order.*` events to an `orders_applied` table exactly once, however often RabbitMQ
//! delivers them (at-least-once in, effectively-once out).
//!
//! It consumes `courier.example.orders` (declared here too, so either example may start
//! first), the queue `cargo run --example embedded` publishes its events to; `QUEUE=…`
//! consumes another (e.g. `QUEUE=courier.demo` after `courier demo`). Each event applied is
//! printed; a redelivered one is skipped silently and counted in the report printed at
//! Ctrl-C (or SIGTERM).
//!
//! ```sh
//! cargo run --example consumer            # ./config.yaml
//! psql -h 127.0.0.1 -U postgres -c 'SELECT * FROM courier.orders_applied'
//! ```

use std::sync::Arc;

use anyhow::Context as _;

use courier::inbox::{HandlerError, Inbox, InboxConfig, InboxMessage};
use diesel::sql_types::{Bytea, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures::future::BoxFuture;

/// Applies one order event inside the inbox transaction: the insert and the inbox record
/// commit together, so a redelivered event finds its inbox row and is skipped.
struct ApplyOrder {
    schema: String,
}

impl courier::inbox::Handler for ApplyOrder {
    fn handle<'a>(
        &'a self,
        tx: &'a mut AsyncPgConnection,
        msg: &'a InboxMessage,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            diesel::sql_query(format!(
                "INSERT INTO \"{}\".orders_applied (event_id, routing_key, body) VALUES ($1, $2, $3)",
                self.schema
            ))
            .bind::<Text, _>(&msg.message_id)
            .bind::<Text, _>(&msg.routing_key)
            .bind::<Bytea, _>(&msg.payload)
            .execute(tx)
            .await?;
            // Escaped: a producer's id or key may hold a newline or a terminal escape.
            println!(
                "applied {} {} ({} bytes)",
                msg.routing_key.escape_debug(),
                msg.message_id.escape_debug(),
                msg.payload.len()
            );
            Ok(())
        })
    }
}

/// [`declare_queue`], waiting while RabbitMQ cannot be reached (the inbox itself reconnects
/// by itself once it runs); a refusal (a wrong password, a missing vhost) ends the example.
async fn declare_queue_when_ready(config: &courier::Config, queue: &str) -> anyhow::Result<()> {
    let mut delay = std::time::Duration::from_millis(500);
    loop {
        match declare_queue(config, queue).await {
            Err(e) if unreachable(&e) => {
                tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "RabbitMQ not available yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(10));
            }
            done => return done,
        }
    }
}

/// Whether `e` is RabbitMQ out of reach (nothing listening, a network fault), not a refusal.
fn unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<lapin::Error>()
            .is_some_and(|e| matches!(e.kind(), lapin::ErrorKind::IOError(_)))
    })
}

/// The queue, durable, so the consumer can start before anything published to it. One that
/// exists already is left as it is (declared again with other arguments, a quorum queue
/// say, the broker would refuse: `inequivalent arg 'x-queue-type'`).
async fn declare_queue(config: &courier::Config, queue: &str) -> anyhow::Result<()> {
    use lapin::{options::QueueDeclareOptions, types::FieldTable};
    let url = config
        .broker
        .url
        .get(0)
        .ok_or_else(|| anyhow::anyhow!("broker.url is empty"))?;
    let conn = lapin::Connection::connect(url.expose(), Default::default())
        .await
        .with_context(|| format!("RabbitMQ at {}", url.redacted()))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let exists = conn
        .create_channel()
        .await?
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok();
    if !exists {
        // The passive declare's 404 closed its channel: a new one.
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        conn.create_channel()
            .await?
            .queue_declare(queue.into(), options, FieldTable::default())
            .await?;
    }
    let _ = conn.close(200, "declared".into()).await;
    Ok(())
}

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::var("COURIER_CONFIG").unwrap_or_else(|_| "config.yaml".into());
    let config = courier::Config::load(path.as_ref())?;
    courier::cli::init_logging(&config);
    // Waits for PostgreSQL while it cannot be reached (`database.wait_at_start`), as the
    // engine does: a consumer may start before its database.
    let store = courier::Store::open(&config.database).await?;
    let schema = store.schema().to_string();
    store
        .conn()
        .await?
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS \"{schema}\".orders_applied (
                 event_id text PRIMARY KEY, routing_key text NOT NULL, body bytea NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    let queue = std::env::var("QUEUE").unwrap_or_else(|_| "courier.example.orders".into());
    declare_queue_when_ready(&config, &queue).await?;
    println!("consuming queue `{queue}`; applied events go to table `{schema}.orders_applied` (Ctrl-C or SIGTERM stops)");
    let inbox = Inbox::new(
        store,
        config.broker.clone(),
        InboxConfig::new("orders-example", queue),
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let report = inbox
        .run(Arc::new(ApplyOrder { schema }), async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        })
        .await?;
    println!(
        "stopped: {} applied, {} duplicates skipped, {} requeued after a handler error, {} rejected, {} held during a database outage",
        report.applied, report.duplicates, report.requeued, report.rejected, report.held
    );
    Ok(())
}
