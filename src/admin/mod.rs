//! The admin HTTP API and dashboard (actix-web), off unless `admin.bind` is set.
//!
//! Read endpoints are open: `/health`, `/ready`, `/metrics`, `/api/stats`,
//! `/api/dead-letters`, `/api/openapi.json` and the dashboard at `/`. Mutating endpoints
//! (requeue, discard) need `Authorization: Bearer <admin.token>`; with no token configured
//! they are disabled (403), never open. Every error is a JSON body `{"error": "..."}` with a
//! 4xx status naming the problem; nothing a client sends makes it answer 500 or lose a row
//! (requeue and discard are single statements on the Store).

use std::time::Duration;

use actix_web::{
    dev::ServerHandle,
    error::{InternalError, JsonPayloadError, PathError, QueryPayloadError},
    http::{header, StatusCode},
    web, App, HttpRequest, HttpResponse, HttpServer,
};
use serde::Deserialize;
use uuid::Uuid;

use crate::{events::broker_state, EngineHandle};

const OPENAPI: &str = include_str!("openapi.json");
const DASHBOARD: &str = include_str!("dashboard.html");

/// Starts the server on `bind`; returns its handle (stopped by `EngineHandle::shutdown`).
pub fn start(engine: EngineHandle, bind: &str) -> std::io::Result<ServerHandle> {
    let data = web::Data::new(engine);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(
                web::QueryConfig::default().error_handler(|e: QueryPayloadError, _| {
                    InternalError::from_response(
                        e.to_string(),
                        error(StatusCode::BAD_REQUEST, format!("bad query: {e}")),
                    )
                    .into()
                }),
            )
            .app_data(web::PathConfig::default().error_handler(|e: PathError, _| {
                InternalError::from_response(
                    e.to_string(),
                    error(StatusCode::BAD_REQUEST, format!("bad path: {e}")),
                )
                .into()
            }))
            .app_data(
                web::JsonConfig::default().error_handler(|e: JsonPayloadError, _| {
                    InternalError::from_response(
                        e.to_string(),
                        error(StatusCode::BAD_REQUEST, format!("bad body: {e}")),
                    )
                    .into()
                }),
            )
            .route("/", web::get().to(dashboard))
            .route("/health", web::get().to(health))
            .route("/ready", web::get().to(ready))
            .route("/metrics", web::get().to(metrics))
            .route("/api/stats", web::get().to(stats))
            .route("/api/openapi.json", web::get().to(openapi))
            .route("/api/dead-letters", web::get().to(list_dead_letters))
            .route("/api/dead-letters/{id}", web::get().to(show_dead_letter))
            .route(
                "/api/dead-letters/{id}",
                web::delete().to(discard_dead_letter),
            )
            .route(
                "/api/dead-letters/{id}/requeue",
                web::post().to(requeue_dead_letter),
            )
            .default_service(web::to(|| async {
                error(StatusCode::NOT_FOUND, "no such endpoint".into())
            }))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(bind)?
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(handle)
}

fn error(status: StatusCode, message: String) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message }))
}

fn store_error(e: crate::StoreError) -> HttpResponse {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("database unavailable: {e}"),
    )
}

fn parse_id(raw: &str) -> Result<Uuid, Box<HttpResponse>> {
    Uuid::parse_str(raw).map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("`{raw}` is not a message id (a UUID)"),
        ))
    })
}

/// Checks the bearer token in constant time; mutating endpoints are off without one.
fn authorize(engine: &EngineHandle, req: &HttpRequest) -> Result<(), Box<HttpResponse>> {
    let Some(expected) = engine.config().admin.token.as_deref() else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "mutating endpoints are disabled: set admin.token (or COURIER_ADMIN_TOKEN)".into(),
        )));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )))
    }
}

async fn dashboard() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(DASHBOARD)
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

async fn ready(engine: web::Data<EngineHandle>) -> HttpResponse {
    let database = tokio::time::timeout(Duration::from_secs(2), engine.store().stats())
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
    let broker = match engine.broker_state() {
        broker_state::CONNECTED => "connected",
        broker_state::BLOCKED => "blocked",
        _ => "disconnected",
    };
    let ok = database && broker == "connected";
    let body = serde_json::json!({
        "ready": ok,
        "database": if database { "connected" } else { "unreachable" },
        "broker": broker,
    });
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

async fn metrics(engine: web::Data<EngineHandle>) -> HttpResponse {
    let m = engine.metrics();
    if let Ok(Ok(stats)) =
        tokio::time::timeout(Duration::from_secs(2), engine.store().stats()).await
    {
        m.observe_stats(&stats);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(m.render())
}

async fn stats(engine: web::Data<EngineHandle>) -> HttpResponse {
    match engine.store().stats().await {
        Ok(stats) => {
            let mut body = crate::cli::stats_json(&stats);
            body["counters"] = serde_json::to_value(engine.counters()).unwrap_or_default();
            body["broker"] = serde_json::json!(match engine.broker_state() {
                broker_state::CONNECTED => "connected",
                broker_state::BLOCKED => "blocked",
                _ => "disconnected",
            });
            HttpResponse::Ok().json(body)
        }
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
    since: Option<String>,
}

async fn list_dead_letters(
    engine: web::Data<EngineHandle>,
    query: web::Query<ListQuery>,
) -> HttpResponse {
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > 10_000 {
        return error(
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and 10000".into(),
        );
    }
    let since = match query.since.as_deref().map(humantime::parse_duration) {
        None => None,
        Some(Ok(d)) if d.as_millis() < i64::MAX as u128 / 2 => Some(d),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "since must be a duration such as 30m or 2days".into(),
            )
        }
    };
    match engine.store().dead_letters(since, limit).await {
        Ok(rows) => HttpResponse::Ok().json(rows.iter().map(|r| r.to_json()).collect::<Vec<_>>()),
        Err(e) => store_error(e),
    }
}

async fn show_dead_letter(engine: web::Data<EngineHandle>, id: web::Path<String>) -> HttpResponse {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(resp) => return *resp,
    };
    match engine.store().dead_letter(id).await {
        Ok(Some(r)) => HttpResponse::Ok().json(r.to_json()),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("no dead letter with id {id}"),
        ),
        Err(e) => store_error(e),
    }
}

/// A mutating dead-letter action: what it does to the rows, and the word for it.
#[derive(Clone, Copy)]
enum Action {
    Requeue,
    Discard,
}

async fn requeue_dead_letter(
    engine: web::Data<EngineHandle>,
    req: HttpRequest,
    id: web::Path<String>,
) -> HttpResponse {
    act_on_dead_letter(&engine, &req, &id, Action::Requeue).await
}

async fn discard_dead_letter(
    engine: web::Data<EngineHandle>,
    req: HttpRequest,
    id: web::Path<String>,
) -> HttpResponse {
    act_on_dead_letter(&engine, &req, &id, Action::Discard).await
}

/// Authorizes, parses the id, runs the single-statement action: 200, 404 or an error.
async fn act_on_dead_letter(
    engine: &EngineHandle,
    req: &HttpRequest,
    raw_id: &str,
    action: Action,
) -> HttpResponse {
    if let Err(resp) = authorize(engine, req) {
        return *resp;
    }
    let id = match parse_id(raw_id) {
        Ok(id) => id,
        Err(resp) => return *resp,
    };
    let (result, verb) = match action {
        Action::Requeue => (engine.store().requeue_dead_letters(&[id]).await, "requeued"),
        Action::Discard => (
            engine.store().discard_dead_letters(&[id]).await,
            "discarded",
        ),
    };
    match result {
        Ok(done) if done.contains(&id) => {
            if matches!(action, Action::Requeue) {
                engine.nudge();
            }
            HttpResponse::Ok().json(serde_json::json!({ verb: id }))
        }
        Ok(_) => error(
            StatusCode::NOT_FOUND,
            format!("no dead letter with id {id}"),
        ),
        Err(e) => store_error(e),
    }
}
