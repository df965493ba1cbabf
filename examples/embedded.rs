//! Courier embedded in an actix-web service.
//!
//! `POST /orders` with a JSON body `{"item": "book"}` writes the order **and** its
//! `order.created` event in one database transaction; the engine, running in the same
//! actix System, publishes the event with confirms to the topic exchange
//! `courier.example.orders`, which this example declares with a queue of the same name
//! bound to `order.#` (so the event lands somewhere: `cargo run --example consumer` applies
//! it). If the transaction rolls back, nothing is published. `GET /events/{id}` waits (up to
//! 10 s) for the event's outcome. Each order and outcome is printed.
//!
//! ```sh
//! cargo run --example embedded            # ./config.yaml; 127.0.0.1:8080 (PORT=… to change)
//! curl -s -XPOST localhost:8080/orders -H 'content-type: application/json' -d '{"item":"book"}'
//! curl -s localhost:8080/events/EVENT_ID  # the event_id the POST returned: Confirmed
//! ```

use std::time::Duration;

use actix_web::{web, App, HttpResponse, HttpServer};
use diesel::sql_types::{Text, Uuid as SqlUuid};
use diesel_async::{AsyncConnection, RunQueryDsl, SimpleAsyncConnection};
use serde::Deserialize;
use uuid::Uuid;

#[derive(Deserialize)]
struct NewOrder {
    item: String,
}

struct AppState {
    engine: courier::EngineHandle,
}

async fn create_order(state: web::Data<AppState>, body: web::Json<NewOrder>) -> HttpResponse {
    let store = state.engine.store();
    let schema = store.schema().to_string();
    let order_id = Uuid::new_v4();
    let event = courier::OutboxMessage::new(
        EXCHANGE,
        "order.created",
        serde_json::json!({ "order_id": order_id, "item": body.item }).to_string(),
    )
    .with_content_type("application/json");
    let event_id = event.id;
    let mut conn = match store.conn().await {
        Ok(c) => c,
        Err(e) => return HttpResponse::ServiceUnavailable().body(e.to_string()),
    };
    let item = body.into_inner().item;
    let result = conn
        .transaction::<(), courier::StoreError, _>(async |tx| {
            diesel::sql_query(format!(
                "INSERT INTO \"{schema}\".example_orders (id, item) VALUES ($1, $2)"
            ))
            .bind::<SqlUuid, _>(order_id)
            .bind::<Text, _>(&item)
            .execute(tx)
            .await?;
            courier::enqueue_in(tx, &schema, &event).await
        })
        .await;
    match result {
        Ok(()) => {
            println!("order {order_id}: committed with its event {event_id} (order.created)");
            HttpResponse::Created()
                .json(serde_json::json!({ "order_id": order_id, "event_id": event_id }))
        }
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

async fn event_outcome(state: web::Data<AppState>, id: web::Path<Uuid>) -> HttpResponse {
    match state.engine.wait_for(*id, Duration::from_secs(10)).await {
        Ok(outcome) => {
            println!("event {id}: {outcome:?}");
            HttpResponse::Ok().body(format!("{outcome:?}\n"))
        }
        Err(e) => HttpResponse::Accepted().body(e.to_string()),
    }
}

/// Where the events go: declared at start, with a queue bound to every `order.*` key.
const EXCHANGE: &str = "courier.example.orders";
const QUEUE: &str = "courier.example.orders";

async fn declare_topology(config: &courier::Config) -> anyhow::Result<()> {
    use lapin::{options::*, types::FieldTable, ExchangeKind};
    let url = config
        .broker
        .url
        .get(0)
        .ok_or_else(|| anyhow::anyhow!("broker.url is empty"))?;
    let conn = lapin::Connection::connect(url.expose(), Default::default()).await?;
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
    let queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare(QUEUE.into(), queue, FieldTable::default())
        .await?;
    let bind = QueueBindOptions::default();
    ch.queue_bind(
        QUEUE.into(),
        EXCHANGE.into(),
        "order.#".into(),
        bind,
        FieldTable::default(),
    )
    .await?;
    let _ = conn.close(200, "declared".into()).await;
    Ok(())
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::var("COURIER_CONFIG").unwrap_or_else(|_| "config.yaml".into());
    let config = courier::Config::load(path.as_ref())?;
    courier::cli::init_logging(&config);
    declare_topology(&config).await?;
    let engine = courier::Engine::start(config).await?;
    {
        let mut conn = engine.store().conn().await?;
        conn.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS \"{}\".example_orders (
                 id uuid PRIMARY KEY, item text NOT NULL, created_at timestamptz DEFAULT now())",
            engine.store().schema()
        ))
        .await?;
    }
    let port: u16 = match std::env::var("PORT") {
        Ok(p) => p
            .parse()
            .map_err(|_| anyhow::anyhow!("PORT={p} is not a port number"))?,
        Err(_) => 8080,
    };
    let state = web::Data::new(AppState {
        engine: engine.clone(),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/orders", web::post().to(create_order))
            .route("/events/{id}", web::get().to(event_outcome))
    })
    .bind(("127.0.0.1", port))?;
    println!(
        "listening on http://127.0.0.1:{port}: POST /orders publishes order.created to exchange \
         `{EXCHANGE}` (queue `{QUEUE}`), GET /events/ID tells its outcome; table `{}.example_orders`",
        engine.store().schema()
    );
    server.run().await?;
    engine.shutdown().await;
    Ok(())
}
