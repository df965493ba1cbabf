//! The admin endpoints: the dashboard's files, health, readiness, metrics, stats, the
//! engine registry and dead letters. Handlers answer `Result<HttpResponse, ApiError>`; see
//! the module doc of [`crate::admin`] for who may call what.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use uuid::Uuid;

use super::{
    auth::{authorize, Access},
    queries::{self, DeadLetterPayload},
    AdminState, ApiError,
};
use crate::store::StoreError;

const OPENAPI: &str = include_str!("openapi.json");
const DASHBOARD: &str = include_str!("dashboard.html");
const DASHBOARD_JS: &str = include_str!("dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard.css");
const FAVICON: &str = include_str!("favicon.svg");

/// Bound on the readiness probe's `SELECT 1`.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

type State = web::Data<AdminState>;

/// Every route of the admin API. A known path asked with another method answers 405 with
/// the methods it takes (`Allow`); every GET route answers HEAD too (headers, no body), as
/// `curl -I` and uptime checkers ask.
pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(read("/", || file("text/html; charset=utf-8", DASHBOARD)))
        .service(read("/dashboard.js", || {
            file("text/javascript; charset=utf-8", DASHBOARD_JS)
        }))
        .service(read("/dashboard.css", || {
            file("text/css; charset=utf-8", DASHBOARD_CSS)
        }))
        .service(read("/favicon.svg", || file("image/svg+xml", FAVICON)))
        .service(read("/api/openapi.json", || {
            file("application/json", OPENAPI)
        }))
        .service(read("/health", health))
        .service(read("/ready", ready))
        .service(read("/metrics", metrics))
        .service(read("/api/stats", stats))
        .service(read("/api/rates", rates))
        .service(read("/api/engines", engines))
        .service(read("/api/dead-letters", list_dead_letters))
        .service(
            read("/api/dead-letters/{id}", show_dead_letter)
                .route(web::delete().to(discard_dead_letter))
                .default_service(web::to(|| not_allowed("GET, HEAD, DELETE"))),
        )
        .service(read("/api/dead-letters/{id}/payload", payload))
        .service(
            web::resource("/api/dead-letters/{id}/requeue")
                .route(web::post().to(requeue_dead_letter))
                .default_service(web::to(|| not_allowed("POST"))),
        );
}

/// A resource read with GET (and HEAD); any other method gets 405.
fn read<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args> + Clone,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path)
        .route(web::get().to(handler.clone()))
        .route(web::head().to(handler))
        .default_service(web::to(|| not_allowed("GET, HEAD")))
}

async fn not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = super::error(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    );
    response.headers_mut().insert(
        actix_web::http::header::ALLOW,
        actix_web::http::header::HeaderValue::from_static(allow),
    );
    response
}

async fn file(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok().content_type(content_type).body(body)
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

fn broker(state: &AdminState) -> &'static str {
    state.engine.broker_state().as_str()
}

/// Connectivity only: the database answers (the engine's own beat succeeded lately, else
/// `SELECT 1` on the probe connection) and the broker's state; no counts. The beat comes
/// first: after a failover it has found the new primary while a probe connection may still
/// be opening towards a frozen first host of the URL.
async fn ready(state: State) -> HttpResponse {
    let ping = async {
        match state.engine.beating() {
            true => Ok(()),
            false => state.db.ping().await,
        }
    };
    let database_error = match tokio::time::timeout(READY_TIMEOUT, ping).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "readiness: database check failed");
            Some(e.to_string())
        }
        Err(_) => Some(format!(
            "no answer within {}",
            humantime::format_duration(READY_TIMEOUT)
        )),
    };
    let database = database_error.is_none();
    let broker = broker(&state);
    let ok = database && broker == "connected";
    let mut body = serde_json::json!({
        "ready": ok,
        "database": if database { "connected" } else { "unreachable" },
        "broker": broker,
    });
    // Why, when it is not: the cause (secrets redacted), not only the verdict.
    if let Some(e) = database_error {
        body["database_error"] = e.into();
    }
    if let Some(refusal) = state.engine.broker_refusal() {
        body["broker_error"] = refusal.into();
    }
    if ok {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// Prometheus text; the outbox gauges come from the admin pool's bounded counts and the
/// engine gauge from the registry (each left as it was when the database does not answer in
/// time, and `courier_database_up` is then 0).
async fn metrics(state: State) -> HttpResponse {
    let m = state.engine.metrics();
    let mut up = true;
    match state.db.stats().await {
        Ok(s) => m.observe_stats(&s),
        Err(e) => {
            up = false;
            tracing::debug!(error = %e, "metrics: outbox counts unavailable");
        }
    }
    match state.registry().await {
        Ok(engines) => m.observe_engines(&engines),
        Err(e) => {
            up = false;
            tracing::debug!(error = %e, "metrics: engine registry unavailable");
        }
    }
    m.database_up.set(i64::from(up));
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(m.render())
}

async fn stats(state: State) -> Result<HttpResponse, ApiError> {
    let s = state.db.stats().await?;
    let mut body = s.to_json();
    body["counters"] = serde_json::to_value(state.engine.counters()).unwrap_or_default();
    body["broker"] = serde_json::json!(broker(&state));
    // Why the oldest row is old; left out when the read fails (the counts still answer).
    match state.db.store().oldest_open().await {
        Ok(Some(oldest)) => {
            body["oldest"] = serde_json::json!({
                "id": oldest.id,
                "status": oldest.status,
                "ordering_key": oldest.ordering_key,
                "reason": oldest_reason(&state, &oldest),
            });
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "stats: oldest open row unavailable"),
    }
    Ok(HttpResponse::Ok().json(body))
}

/// What the oldest open row waits for, in an operator's words: what holds everything
/// first (the broker), then what holds this row.
fn oldest_reason(state: &AdminState, o: &crate::store::OldestOpen) -> String {
    let blocks =
        state.engine.config().ordering.on_dead_letter == crate::config::OnDeadLetter::Block;
    let due_in = o.due_in_seconds.unwrap_or(0.0);
    let wait = |s: f64| humantime::format_duration(Duration::from_secs(s.max(0.0).ceil() as u64));
    match (state.engine.broker_state(), o.key_dead_letter) {
        (crate::BrokerState::Blocked, _) => {
            "the broker blocks publishers (a memory or disk alarm on RabbitMQ)".into()
        }
        (crate::BrokerState::Disconnected, _) => {
            "this engine has no broker connection (see /ready)".into()
        }
        (_, Some(dead)) if blocks && o.status != "in_flight" => {
            format!("its ordering key waits behind dead letter {dead}: requeue or discard it")
        }
        _ if o.status == "in_flight" => {
            "published or being published; waiting for the broker's confirm".into()
        }
        _ if due_in.is_infinite() => {
            "delayed by its producer: never due (next_attempt_at is infinity)".into()
        }
        _ if due_in > 0.0 && o.attempts == 0 => {
            format!("delayed by its producer: due in {}", wait(due_in))
        }
        _ if due_in > 0.0 => format!(
            "retrying in {} after: {}",
            wait(due_in),
            o.last_error.as_deref().unwrap_or("a failed attempt")
        ),
        _ if o.ordering_key.is_some() => {
            "due; waiting for the message before it in its ordering key".into()
        }
        _ => "due; waiting its turn behind the backlog".into(),
    }
}

/// The rate chart's history (sampled by the server, so a reload keeps it).
async fn rates(state: State) -> HttpResponse {
    let body = state
        .rates
        .lock()
        .map(|h| h.to_json())
        .unwrap_or_else(|_| serde_json::json!({ "interval_seconds": 2, "samples": [] }));
    HttpResponse::Ok().json(body)
}

/// The engine registry, running engines first: open like the stats, since an engine's id,
/// host, pid and beat are operational facts, not message content. Bounded by the registry
/// itself: one row per engine process, dead ones removed a day after their last beat.
async fn engines(state: State) -> Result<HttpResponse, ApiError> {
    let engines = state.registry().await?;
    Ok(HttpResponse::Ok().json(engines))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
    since: Option<String>,
}

async fn list_dead_letters(
    state: State,
    query: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > queries::LIST_MAX {
        return Err(ApiError::BadRequest("limit must be between 1 and 500"));
    }
    let since = match query.since.as_deref().map(humantime::parse_duration) {
        None => None,
        Some(Ok(d)) if d.as_millis() < i64::MAX as u128 / 2 => Some(d),
        Some(_) => {
            return Err(ApiError::BadRequest(
                "since must be a duration such as 30m or 2days",
            ))
        }
    };
    let rows = state.db.dead_letters(since, limit).await?;
    Ok(HttpResponse::Ok().json(rows))
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::BadRequest("not a message id (a UUID)"))
}

/// One dead letter's metadata (no payload, no headers): open like the list.
async fn show_dead_letter(state: State, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&id)?;
    match state.db.dead_letter(id).await? {
        Some(row) => Ok(HttpResponse::Ok().json(row)),
        None => Err(ApiError::NotFound(id)),
    }
}

/// One dead letter's payload and headers: `admin.token` or `admin.read_token` only.
async fn payload(
    state: State,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    authorize(&state.engine.config().admin, &req, Access::ReadPayload)?;
    let id = parse_id(&id)?;
    match state.db.payload(id).await? {
        Some(p) => {
            tracing::info!(message_id = %id, peer = %peer(&req), "dead letter payload read through the admin API");
            Ok(HttpResponse::Ok().json(payload_json(&p)))
        }
        None => Err(ApiError::NotFound(id)),
    }
}

/// The payload as text when it is UTF-8 (a cut in the middle of a character is
/// trimmed), always also base64; `payload_truncated` / `headers_withheld` say what was cut.
fn payload_json(p: &DeadLetterPayload) -> serde_json::Value {
    use base64::Engine as _;
    let truncated = i64::try_from(p.payload.len()).unwrap_or(i64::MAX) < p.payload_bytes;
    let text = match std::str::from_utf8(&p.payload) {
        Ok(t) => Some(t),
        Err(e) if truncated && e.error_len().is_none() => {
            std::str::from_utf8(&p.payload[..e.valid_up_to()]).ok()
        }
        Err(_) => None,
    };
    serde_json::json!({
        "id": p.id,
        "content_type": p.content_type,
        "payload_bytes": p.payload_bytes,
        "payload_truncated": truncated,
        "payload_text": text,
        "payload_base64": base64::engine::general_purpose::STANDARD.encode(&p.payload),
        "headers": p.headers,
        "headers_withheld": p.headers.is_none(),
    })
}

/// Who sent `req`, for the audit lines of what an operator read or changed (the token is
/// never logged).
fn peer(req: &HttpRequest) -> String {
    req.peer_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// A mutating dead-letter action.
#[derive(Clone, Copy)]
enum Action {
    Requeue,
    Discard,
}

async fn requeue_dead_letter(
    state: State,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    act_on_dead_letter(&state, &req, &id, Action::Requeue).await
}

async fn discard_dead_letter(
    state: State,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    act_on_dead_letter(&state, &req, &id, Action::Discard).await
}

/// Authorizes, parses the id, runs the single-statement action on the admin pool.
async fn act_on_dead_letter(
    state: &AdminState,
    req: &HttpRequest,
    raw_id: &str,
    action: Action,
) -> Result<HttpResponse, ApiError> {
    authorize(&state.engine.config().admin, req, Access::Mutate)?;
    let id = parse_id(raw_id)?;
    let store = state.db.store();
    let (done, verb) = match action {
        Action::Requeue => (store.requeue_dead_letters(&[id]).await, "requeued"),
        Action::Discard => (store.discard_dead_letters(&[id]).await, "discarded"),
    };
    let done = done.map_err(|e| match e {
        StoreError::RowLocked(_) => {
            tracing::warn!(message_id = %id, error = %e, "admin API: dead letter not {verb}");
            ApiError::Locked(id)
        }
        e => ApiError::Database(e),
    })?;
    if !done.contains(&id) {
        // A requeue leaves a dead letter whose id is open in the outbox again where it is.
        let kept = matches!(action, Action::Requeue) && store.dead_letter(id).await?.is_some();
        return Err(if kept {
            ApiError::Reused(id)
        } else {
            ApiError::NotFound(id)
        });
    }
    tracing::info!(message_id = %id, peer = %peer(req), "dead letter {verb} through the admin API");
    if matches!(action, Action::Requeue) {
        state.engine.nudge();
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ verb: id })))
}
