//! The admin HTTP API and dashboard (actix-web), off unless `admin.bind` is set.
//!
//! Who may read what: health, readiness, metrics, stats, the engine registry and
//! dead-letter *metadata* are open; dead-letter payloads and headers need `admin.token` or
//! `admin.read_token`; requeue and discard need `admin.token`. With no such token configured
//! those endpoints answer 403 (disabled, never open). Lists never carry payloads, and every
//! response is bounded (at most [`queries::LIST_MAX`] dead letters, producer text cut,
//! payloads cut to [`queries::PAYLOAD_MAX`] bytes; the engine registry holds one row per
//! engine process and forgets dead ones after a day).
//!
//! Every admin query runs on the admin API's own small pool with a statement timeout
//! ([`queries`]), never on the engine's. Every response carries security headers (a CSP
//! that allows only this server's own script and style, frame denial, `nosniff`, no
//! referrer, `no-store`); `admin.allowed_hosts` answers 421 to any other `Host` (DNS
//! rebinding). Errors are JSON `{"error": "..."}`; a database failure is logged with an
//! `error_id` and answered with that id only — no SQL, host or user name leaves the server.

mod api;
mod auth;
mod conn_url;
mod history;
mod queries;

use actix_web::{
    body::MessageBody,
    dev::{ServerHandle, ServiceRequest, ServiceResponse},
    error::{InternalError, JsonPayloadError, PathError, QueryPayloadError},
    http::{header, StatusCode},
    middleware::{self, DefaultHeaders, Next},
    web, App, HttpResponse, HttpServer, ResponseError,
};
use uuid::Uuid;

use crate::{store::StoreError, EngineHandle};

pub(crate) use queries::AdminDb;
pub use queries::AdminDbError;

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Its database pools could not be set up.
    #[error(transparent)]
    Database(#[from] AdminDbError),
    /// The address could not be bound.
    #[error(transparent)]
    Bind(#[from] std::io::Error),
}

/// The Content-Security-Policy of every response: nothing but this server's own script,
/// style and API; no framing, no forms, no base URL.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// What every handler shares.
pub(crate) struct AdminState {
    pub(crate) engine: EngineHandle,
    pub(crate) db: AdminDb,
    /// The rate chart's samples (see `history.rs`).
    rates: std::sync::Arc<std::sync::Mutex<history::RateHistory>>,
}

impl AdminState {
    /// The engine registry, read on the admin pool with this engine's timeout (an engine
    /// whose beat is older is `silent`).
    pub(crate) async fn registry(&self) -> Result<Vec<crate::store::EngineRecord>, StoreError> {
        let timeout = self.engine.config().scheduler.engine_timeout;
        self.db.store().engines(timeout).await
    }
}

/// The admin server's sockets, bound and not served yet.
///
/// The engine binds them before it claims anything: a taken port is then an error at
/// start, not after the actors have connected and claimed rows they must give back.
#[derive(Debug)]
pub struct Listeners(Vec<std::net::TcpListener>);

impl Listeners {
    /// Binds every address `bind` resolves to (`host:port`), as `HttpServer::bind` does.
    pub fn bind(bind: &str) -> Result<Listeners, AdminError> {
        use std::net::ToSocketAddrs;
        let listeners = bind
            .to_socket_addrs()?
            .map(std::net::TcpListener::bind)
            .collect::<Result<Vec<_>, _>>()?;
        if listeners.is_empty() {
            return Err(AdminError::Bind(std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                "the address resolves to nothing",
            )));
        }
        Ok(Listeners(listeners))
    }
}

/// Opens the admin pools and starts the server on `bind`; returns its handle (stopped by
/// `EngineHandle::shutdown`).
pub async fn start(engine: EngineHandle, bind: &str) -> Result<ServerHandle, AdminError> {
    serve(engine, Listeners::bind(bind)?).await
}

/// Opens the admin pools and serves on sockets bound earlier.
pub async fn serve(engine: EngineHandle, listeners: Listeners) -> Result<ServerHandle, AdminError> {
    let config = engine.config().clone();
    let db = AdminDb::connect(&config.database, &config.admin).await?;
    let rates = std::sync::Arc::default();
    history::start(engine.clone(), &rates);
    let state = web::Data::new(AdminState { engine, db, rates });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(
                web::QueryConfig::default().error_handler(|e: QueryPayloadError, _| {
                    bad_request(
                        e,
                        "bad query: expected limit (1-500) and since (a duration)",
                    )
                }),
            )
            .app_data(
                web::PathConfig::default()
                    .error_handler(|e: PathError, _| bad_request(e, "bad path")),
            )
            .app_data(
                web::JsonConfig::default()
                    .error_handler(|e: JsonPayloadError, _| bad_request(e, "bad body")),
            )
            .configure(api::routes)
            .default_service(web::to(|| async {
                error(StatusCode::NOT_FOUND, "no such endpoint")
            }))
            .wrap(middleware::from_fn(check_host))
            .wrap(security_headers())
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1);
    let server = listeners
        .0
        .into_iter()
        .try_fold(server, |server, listener| server.listen(listener))?
        .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(handle)
}

/// Headers on every response, the dashboard's included.
fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::REFERRER_POLICY, "no-referrer"))
        .add((header::CACHE_CONTROL, "no-store"))
        .add(("Cross-Origin-Resource-Policy", "same-origin"))
        .add(("Cross-Origin-Opener-Policy", "same-origin"))
}

/// Answers 421 to a `Host` that `admin.allowed_hosts` does not list. The raw `Host`
/// header is what a browser sends (forwarding headers are the caller's to forge).
async fn check_host(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let allowed = req
        .app_data::<web::Data<AdminState>>()
        .map(|s| s.engine.config().admin.allowed_hosts.clone())
        .unwrap_or_default();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    if auth::host_allowed(&allowed, host) {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body);
    }
    tracing::debug!(host = ?host, "admin request for a host not in admin.allowed_hosts");
    let response = error(StatusCode::MISDIRECTED_REQUEST, "host not allowed");
    Ok(req.into_response(response).map_into_right_body())
}

fn error(status: StatusCode, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message }))
}

/// A malformed request: a fixed message (the parser's own text stays in the logs).
fn bad_request(e: impl std::fmt::Display, message: &'static str) -> actix_web::Error {
    tracing::debug!(error = %e, "bad admin request");
    InternalError::from_response(message, error(StatusCode::BAD_REQUEST, message)).into()
}

/// What an admin request can fail with; each is one status and a message fit for anyone.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// Malformed input.
    #[error("{0}")]
    BadRequest(&'static str),
    /// Missing or wrong bearer token (the same answer for both).
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// No token that could allow this is configured.
    #[error("{0}")]
    Disabled(&'static str),
    /// No such dead letter.
    #[error("no dead letter with id {0}")]
    NotFound(Uuid),
    /// A requeue that must wait: a producer reused the id, and that copy is still open.
    #[error(
        "dead letter {0} not requeued: a producer reused the id and that row is still waiting \
         or in flight in the outbox; requeue again once it is confirmed"
    )]
    Reused(Uuid),
    /// A change gave up on a row another transaction holds locked; nothing changed.
    #[error(
        "dead letter {0} is locked by another transaction (a producer's or an operator's, left \
         open): nothing was changed; try again once it ends"
    )]
    Locked(Uuid),
    /// The database failed or timed out; the cause is logged, never sent.
    #[error("database unavailable")]
    Database(#[source] StoreError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Database(e)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Disabled(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Reused(_) | ApiError::Locked(_) => StatusCode::CONFLICT,
            ApiError::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, ApiError::Unauthorized) {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        match self {
            ApiError::Database(cause) => {
                let error_id = Uuid::new_v4();
                tracing::warn!(%error_id, error = %cause, "admin API: database error");
                response
                    .json(serde_json::json!({ "error": self.to_string(), "error_id": error_id }))
            }
            _ => response.json(serde_json::json!({ "error": self.to_string() })),
        }
    }
}
