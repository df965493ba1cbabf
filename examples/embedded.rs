//! Courier embedded in an actix-web service.
//!
//! `POST /orders` with a JSON body `{"item": "book"}` writes the order **and** its
//! `order.created` event in one database transaction; the engine, running in the same
//! actix System, publishes the event with confirms. If the transaction rolls back, nothing
//! is published. `GET /orders/{id}/event` waits (up to 10 s) for the event's outcome.
//!
//! ```sh
//! cargo run --example embedded            # uses ./config.yaml, listens on 127.0.0.1:8080
//! curl -XPOST localhost:8080/orders -H 'content-type: application/json' -d '{"item":"book"}'
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
        "amq.topic",
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
        Ok(()) => HttpResponse::Created()
            .json(serde_json::json!({ "order_id": order_id, "event_id": event_id })),
        Err(e) => HttpResponse::InternalServerError().body(e.to_string()),
    }
}

async fn event_outcome(state: web::Data<AppState>, id: web::Path<Uuid>) -> HttpResponse {
    match state.engine.wait_for(*id, Duration::from_secs(10)).await {
        Ok(outcome) => HttpResponse::Ok().body(format!("{outcome:?}")),
        Err(e) => HttpResponse::Accepted().body(e.to_string()),
    }
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let path = std::env::var("COURIER_CONFIG").unwrap_or_else(|_| "config.yaml".into());
    let config = courier::Config::load(path.as_ref())?;
    courier::cli::init_logging(&config);
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
    let state = web::Data::new(AppState {
        engine: engine.clone(),
    });
    HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/orders", web::post().to(create_order))
            .route("/orders/{id}/event", web::get().to(event_outcome))
    })
    .bind(("127.0.0.1", 8080))?
    .run()
    .await?;
    engine.shutdown().await;
    Ok(())
}
