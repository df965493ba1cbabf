//! An idempotent consumer on Courier's inbox, inside an actix System: it applies
//! `order.*` events to an `orders_applied` table exactly once, however often RabbitMQ
//! delivers them (at-least-once in, effectively-once out).
//!
//! ```sh
//! cargo run --example consumer            # uses ./config.yaml; consumes queue `courier.demo`
//! cargo run -- demo --messages 1000       # in another terminal: something to consume
//! ```

use std::sync::Arc;

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
            Ok(())
        })
    }
}

#[actix_rt::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::var("COURIER_CONFIG").unwrap_or_else(|_| "config.yaml".into());
    let config = courier::Config::load(path.as_ref())?;
    courier::cli::init_logging(&config);
    courier::migrate(
        &config.database.url,
        &config.database.schema,
        config.database.connect_timeout,
    )
    .await?;
    let store = courier::Store::connect(&config.database).await?;
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
    let queue = std::env::var("QUEUE").unwrap_or_else(|_| "courier.demo".into());
    let inbox = Inbox::new(
        store,
        config.broker.clone(),
        InboxConfig::new("orders-example", queue),
    );
    let report = inbox
        .run(Arc::new(ApplyOrder { schema }), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    println!("stopped: {report:?}");
    Ok(())
}
