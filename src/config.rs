//! Configuration: `config.yaml`, `COURIER_*` environment overrides and validation.
//!
//! The file is read into a YAML tree, the environment is laid over it, and only then is it
//! deserialized with `deny_unknown_fields`, so a typo in a key is an error that names it
//! rather than a default silently used. Every section has named defaults (the `Default`
//! impls below mirror the shipped `config.yaml`). `validate` rejects impossible values with
//! the dotted key in the message. URLs are kept as [`SecretUrl`], whose `Display` and
//! `Debug` redact every credential (the userinfo password, credential-like query parameters
//! such as `?password=` or `sslpassword=`, and their key=value DSN forms), so no log line or
//! error can leak it.

use std::{fmt, path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

/// A problem with the configuration. Every variant names the key (or the file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: String,
        /// Why it could not be read.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed, has an unknown key or a value of the wrong type.
    #[error("invalid config {origin}: {message}")]
    Parse {
        /// The file (or "environment") the bad value came from.
        origin: String,
        /// The parser's message, which names the key and the problem.
        message: String,
    },
    /// A value parsed but is not allowed.
    #[error("invalid config: `{key}` {problem}")]
    Invalid {
        /// The dotted key, e.g. `publisher.max_in_flight`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl ConfigError {
    fn invalid(key: &str, problem: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            problem: problem.into(),
        }
    }
}

/// A URL that may hold a password. `Display`/`Debug` never show the password (nor any
/// credential-like query parameter: see [`redact_url`]).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL string.
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The full URL, password included: only for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***` (or a placeholder when it is unparsable).
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// `message` (a driver's error text) with this URL, and each of its secrets should the
    /// message quote one on its own, replaced by their redacted forms.
    pub fn scrub(&self, message: &str) -> String {
        crate::redact::scrub(&self.0, message)
    }

    /// The URL's scheme (what precedes `://`), if it has one. Not `url::Url`: a libpq
    /// multi-host URL (`postgres://h1:5432,h2:5432/db`) is no valid WHATWG URL.
    fn scheme(&self) -> Option<String> {
        let (scheme, _) = self.0.split_once("://")?;
        let valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        valid.then(|| scheme.to_ascii_lowercase())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({})", self.redacted())
    }
}

pub(crate) use crate::redact::redact_url;

mod broker;

pub use broker::{BrokerConfig, BrokerTls, BrokerUrls, TlsVerify};

/// The whole engine configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PostgreSQL: where the outbox lives.
    pub database: DatabaseConfig,
    /// RabbitMQ: where messages go.
    pub broker: BrokerConfig,
    /// Publishing: pipelining bounds.
    pub publisher: PublisherConfig,
    /// Retries: confirm timeout, attempts, backoff.
    pub retry: RetryConfig,
    /// Claiming: sweep, leases, batch size.
    pub scheduler: SchedulerConfig,
    /// Dead letters: the optional exchange.
    pub dead_letter: DeadLetterConfig,
    /// Per-key ordering: what a dead-lettered head does to its key.
    pub ordering: OrderingConfig,
    /// Logging: level and format.
    pub logging: LoggingConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Removal of old confirmed rows.
    pub retention: RetentionConfig,
    /// The admin HTTP API and dashboard.
    pub admin: AdminConfig,
    /// OpenTelemetry traces.
    pub telemetry: TelemetryConfig,
}

/// `telemetry.*`: OpenTelemetry traces of each message (see `telemetry.rs`). Every key left
/// null falls back to the standard `OTEL_*` variable, then to the OpenTelemetry default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Make spans for each message. Also on when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
    /// `..._TRACES_ENDPOINT`) is set; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
    /// turn them off whatever this says.
    pub traces: bool,
    /// The collector's OTLP/HTTP base URL (`/v1/traces` is appended); null:
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`, else
    /// `http://localhost:4318`.
    pub endpoint: Option<String>,
    /// `http/protobuf` or `http/json`; null: `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`, else
    /// `http/protobuf`.
    pub protocol: Option<OtlpProtocol>,
    /// The `service.name` resource attribute; null: `OTEL_SERVICE_NAME`, else `courier`.
    pub service_name: Option<String>,
}

/// `telemetry.protocol`: OTLP's HTTP encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtlpProtocol {
    /// `http/protobuf`
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// `http/json`
    #[serde(rename = "http/json")]
    HttpJson,
}

/// `retention.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Confirmed rows older than this are removed.
    #[serde(with = "humantime_serde")]
    pub confirmed: Duration,
    /// `delete` them, or `archive` them to `outbox_archive`.
    pub mode: RetentionMode,
    /// How often retention runs.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Rows per statement (small batches never hold the hot path up).
    pub batch_size: u32,
    /// Run a plain `VACUUM` on the outbox after a pass that removed rows, so the space is
    /// reused at once instead of when autovacuum gets to it.
    pub vacuum: bool,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            confirmed: Duration::from_secs(7 * 24 * 3600),
            mode: RetentionMode::Delete,
            interval: Duration::from_secs(60),
            batch_size: 1000,
            vacuum: true,
        }
    }
}

/// What retention does with old confirmed rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionMode {
    /// Delete them.
    Delete,
    /// Move them to `outbox_archive`.
    Archive,
}

impl RetentionMode {
    /// The value as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionMode::Delete => "delete",
            RetentionMode::Archive => "archive",
        }
    }
}

/// `admin.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address to serve the admin API and dashboard on (`127.0.0.1:8081`); null: off.
    pub bind: Option<String>,
    /// Bearer token for the mutating endpoints (and payload reads); null: they are disabled.
    /// `COURIER_ADMIN_TOKEN` sets it without writing it to a file.
    pub token: Option<String>,
    /// Bearer token that may read dead-letter payloads and headers but change nothing;
    /// null: only `token` reads them. `COURIER_ADMIN_READ_TOKEN`.
    pub read_token: Option<String>,
    /// `Host` header values the admin server answers (`host` or `host:port`); any other
    /// gets 421, which defeats DNS rebinding. Empty: any host.
    pub allowed_hosts: Vec<String>,
    /// Connections in the admin API's own pool, apart from the engine's, so admin load can
    /// never starve claims, confirms or lease renewals.
    pub pool_size: u32,
    /// `statement_timeout` of the admin pool's connections: no admin query runs longer.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            bind: None,
            token: None,
            read_token: None,
            allowed_hosts: Vec::new(),
            pool_size: 2,
            statement_timeout: Duration::from_secs(5),
        }
    }
}

/// `shutdown.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long SIGTERM waits for outstanding confirms before giving up on them.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            timeout: Duration::from_secs(15),
        }
    }
}

/// `database.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://` or `postgresql://` URL.
    pub url: SecretUrl,
    /// Connections in the pool.
    pub pool_size: u32,
    /// Schema holding Courier's tables.
    pub schema: String,
    /// Run migrations when the engine starts.
    pub auto_migrate: bool,
    /// Bound on one connection attempt.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// LISTEN for the insert trigger's NOTIFY.
    pub listen: bool,
    /// At start, keep retrying (with backoff) while PostgreSQL is unreachable; `false`
    /// fails at once.
    pub wait_at_start: bool,
    /// What sits between Courier and PostgreSQL (see [`Pooler`]).
    pub pooler: Pooler,
    /// Migrations go through this URL instead of `url` (e.g. straight to PostgreSQL,
    /// around a pooler); none: `url`.
    pub migrate_url: Option<SecretUrl>,
}

/// `database.pooler`: what sits between Courier and PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooler {
    /// PostgreSQL itself, or a session-mode pooler: a connection is one session.
    #[default]
    None,
    /// A transaction-mode pooler (PgBouncer `pool_mode = transaction`): consecutive
    /// transactions may run on different server connections. Every statement then runs
    /// in its own transaction, so a statement's prepare and execute (tokio-postgres
    /// prepares every statement) land on one server connection, and migrations take a
    /// transaction-scoped advisory lock.
    Transaction,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: SecretUrl::new("postgres://postgres@127.0.0.1:5432/postgres"),
            pool_size: 8,
            schema: "courier".into(),
            auto_migrate: true,
            connect_timeout: Duration::from_secs(5),
            listen: true,
            wait_at_start: true,
            pooler: Pooler::None,
            migrate_url: None,
        }
    }
}

/// Most publishing connections one engine opens (`publisher.connections`).
pub const MAX_PUBLISHER_CONNECTIONS: u32 = 16;

/// `publisher.*` (mandatory and persistent are always on and not configurable).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublisherConfig {
    /// Most rows claimed and not yet settled at once: the cap of the measured window.
    pub max_in_flight: u32,
    /// Size the window from measurements (settle rate × base latency) under the cap, so a
    /// crash costs few duplicates; off, the window is always `max_in_flight`.
    pub adaptive_window: bool,
    /// Most rows handed to the publisher in one message.
    pub publish_batch: u32,
    /// AMQP connections the engine publishes over, each with its own confirm channel and
    /// confirm tracking. RabbitMQ paces each connection on its own (credit flow), so one
    /// connection is often held back while the broker has room; batches go to the
    /// connections in turn. A key's next message waits for its predecessor's confirm, so
    /// per-key order does not depend on which connection carries it.
    pub connections: u32,
    /// Larger payloads fail without being sent (and without being fetched).
    pub max_payload_bytes: u64,
    /// Most payload bytes claimed and not yet settled, per engine: with large messages this,
    /// not `max_in_flight`, bounds the engine's memory (one message larger than the whole
    /// budget still goes, alone).
    pub max_in_flight_bytes: u64,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            max_in_flight: 4096,
            adaptive_window: true,
            publish_batch: 512,
            connections: 2,
            max_payload_bytes: 128 * 1024 * 1024,
            max_in_flight_bytes: 64 * 1024 * 1024,
        }
    }
}

/// `retry.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// A publish not confirmed within this is a failed attempt.
    #[serde(with = "humantime_serde")]
    pub confirm_timeout: Duration,
    /// Attempts before dead-lettering, unless the row says otherwise.
    pub max_attempts: u32,
    /// Delay between attempts.
    pub backoff: BackoffConfig,
    /// How long, from the first of its failed publishes, an engine whose publishes are
    /// nacked or unanswered with no later one acked (a quorum queue without its majority)
    /// has those nacks and confirm timeouts refunded instead of charged; `0s`: every one is
    /// charged.
    #[serde(with = "humantime_serde")]
    pub nacks_refunded_for: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            confirm_timeout: Duration::from_secs(30),
            max_attempts: 3,
            backoff: BackoffConfig::default(),
            nacks_refunded_for: Duration::from_secs(300),
        }
    }
}

/// `retry.backoff.*`: exponential, capped, with jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// Delay after the first failed attempt.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Cap on every delay, jitter included.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Growth factor per attempt (>= 1.0).
    pub multiplier: f64,
    /// Random spread as a fraction of the delay (0.0..=1.0).
    pub jitter: f64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

/// `scheduler.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Safety-net sweep period.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Lease given to claimed rows (renewed while they are in flight).
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    /// Most rows per claim statement.
    pub claim_batch: u32,
    /// How often the engine beats in the engine registry (on its own connection).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// An engine whose last beat is older than this is declared dead by any other, and the
    /// rows it held are taken over at once. The engine itself stops publishing when it has
    /// not beaten for half of this (or a third of the lease, if shorter), so it never
    /// publishes rows another may have taken.
    #[serde(with = "humantime_serde")]
    pub engine_timeout: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            sweep_interval: Duration::from_secs(1),
            lease_duration: Duration::from_secs(60),
            claim_batch: 1000,
            heartbeat: Duration::from_secs(1),
            engine_timeout: Duration::from_secs(5),
        }
    }
}

/// `dead_letter.*`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Exchange that also receives dead-lettered messages.
    pub exchange: Option<String>,
}

/// `ordering.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrderingConfig {
    /// What happens to a key whose head message is dead-lettered.
    pub on_dead_letter: OnDeadLetter,
    /// Rows of a key claimed with its head and published one after another, each as soon
    /// as the broker acked the one before: a key then costs one broker round trip per
    /// message instead of a confirm write and a claim as well. 0: heads only.
    pub run: u32,
}

impl Default for OrderingConfig {
    fn default() -> Self {
        OrderingConfig {
            on_dead_letter: OnDeadLetter::default(),
            run: 32,
        }
    }
}

/// What a dead-lettered message does to the rest of its key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDeadLetter {
    /// The key waits while its dead letter is in `dead_letters`: an operator requeues it
    /// (it goes back to its place) or discards it, then the key flows again. Order is never
    /// broken silently.
    #[default]
    Block,
    /// The key's next message is published at once: order holds among the messages that
    /// are delivered, with a gap where the dead letter was.
    Continue,
}

/// `logging.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A `tracing_subscriber::EnvFilter` directive.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
    /// Period of the engine's info-level summary line.
    #[serde(with = "humantime_serde")]
    pub summary_interval: Duration,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            format: LogFormat::Pretty,
            summary_interval: Duration::from_secs(30),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, for development.
    Pretty,
    /// One JSON object per line, for production log collectors.
    Json,
}

/// The prefix of every environment override.
pub(crate) const ENV_PREFIX: &str = "COURIER_";

impl Config {
    /// Reads `path`, applies `COURIER_*` overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml_with_env(&text, &path.display().to_string(), std::env::vars())
    }

    /// Parses YAML text, lays the given `COURIER_*` variables over it, validates.
    /// `origin` names the source in error messages.
    pub fn from_yaml_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut tree: Value = if text.trim().is_empty() {
            Value::Mapping(Default::default())
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| parse_error(origin, e))?
        };
        if tree.is_null() {
            tree = Value::Mapping(Default::default());
        }
        let from_env = apply_env(&mut tree, env)?;
        let config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let path = e.path().to_string();
            // A bad value set by a variable is the variable's fault, not the file's.
            let origin = match set_by(&from_env, &path) {
                Some(name) => format!("environment (`{name}`)"),
                None => origin.to_string(),
            };
            ConfigError::Parse {
                origin,
                message: if path == "." {
                    e.inner().to_string()
                } else {
                    format!("`{path}`: {}", e.inner())
                },
            }
        })?;
        config.validate().map_err(|e| match e {
            // A value set by a variable is named by the variable, as a parse error is.
            ConfigError::Invalid { key, problem } => match set_by(&from_env, &key) {
                Some(name) => ConfigError::Invalid {
                    problem: format!("{problem} (set by `{name}`)"),
                    key,
                },
                None => ConfigError::Invalid { key, problem },
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Rejects values that parse but cannot work, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url_scheme(
            "database.url",
            &self.database.url,
            &["postgres", "postgresql"],
        )?;
        if let Some(url) = &self.database.migrate_url {
            check_url_scheme("database.migrate_url", url, &["postgres", "postgresql"])?;
        }
        // What the driver would refuse at the first connection (an unknown parameter or
        // `sslmode`, an unreadable certificate file) is a configuration error, named now.
        let database_urls = [
            ("database.url", Some(&self.database.url)),
            ("database.migrate_url", self.database.migrate_url.as_ref()),
        ];
        for (key, url) in database_urls {
            if let Some(url) = url {
                crate::store::check_url(url).map_err(|why| {
                    ConfigError::invalid(key, format!("is unusable: {why} (url: {url})"))
                })?;
            }
        }
        self.broker.url.validate()?;
        if self.broker.tls.certfile.is_some() != self.broker.tls.keyfile.is_some() {
            return Err(ConfigError::invalid(
                "broker.tls.certfile",
                "and broker.tls.keyfile go together: set both or neither",
            ));
        }
        crate::store::check_schema_name(&self.database.schema)
            .map_err(|problem| ConfigError::invalid("database.schema", problem))?;
        positive("database.pool_size", self.database.pool_size as u64)?;
        positive_duration("database.connect_timeout", self.database.connect_timeout)?;
        positive_duration("broker.connect_timeout", self.broker.connect_timeout)?;
        if self.broker.heartbeat.as_secs() > u64::from(u16::MAX) {
            return Err(ConfigError::invalid(
                "broker.heartbeat",
                "must be at most 65535s",
            ));
        }
        positive(
            "publisher.max_in_flight",
            self.publisher.max_in_flight as u64,
        )?;
        positive(
            "publisher.publish_batch",
            self.publisher.publish_batch as u64,
        )?;
        if !(1..=MAX_PUBLISHER_CONNECTIONS).contains(&self.publisher.connections) {
            return Err(ConfigError::invalid(
                "publisher.connections",
                format!("must be between 1 and {MAX_PUBLISHER_CONNECTIONS}"),
            ));
        }
        positive(
            "publisher.max_payload_bytes",
            self.publisher.max_payload_bytes,
        )?;
        positive_duration("retry.confirm_timeout", self.retry.confirm_timeout)?;
        positive(
            "publisher.max_in_flight_bytes",
            self.publisher.max_in_flight_bytes,
        )?;
        positive("retry.max_attempts", self.retry.max_attempts as u64)?;
        if self.retry.max_attempts > crate::state::MAX_ATTEMPTS_LIMIT {
            return Err(ConfigError::invalid(
                "retry.max_attempts",
                format!("must be at most {}", crate::state::MAX_ATTEMPTS_LIMIT),
            ));
        }
        self.retry.backoff.validate()?;
        positive_duration("scheduler.sweep_interval", self.scheduler.sweep_interval)?;
        positive_duration("scheduler.lease_duration", self.scheduler.lease_duration)?;
        if self.scheduler.lease_duration < MIN_LEASE {
            // Renewed every third of it: shorter, the renewals of a busy engine overlap one
            // another and its claims, and its rows lapse under it.
            return Err(ConfigError::invalid(
                "scheduler.lease_duration",
                format!(
                    "must be at least {} (it is renewed every third of it)",
                    humantime::format_duration(MIN_LEASE)
                ),
            ));
        }
        positive("scheduler.claim_batch", self.scheduler.claim_batch as u64)?;
        positive_duration("scheduler.heartbeat", self.scheduler.heartbeat)?;
        if self.scheduler.engine_timeout < self.scheduler.heartbeat * 3 {
            return Err(ConfigError::invalid(
                "scheduler.engine_timeout",
                format!(
                    "must be at least three heartbeats (scheduler.heartbeat is {})",
                    humantime::format_duration(self.scheduler.heartbeat)
                ),
            ));
        }
        positive_duration("logging.summary_interval", self.logging.summary_interval)?;
        positive_duration("shutdown.timeout", self.shutdown.timeout)?;
        positive_duration("retention.interval", self.retention.interval)?;
        positive("retention.batch_size", self.retention.batch_size as u64)?;
        if let Some(endpoint) = &self.telemetry.endpoint {
            // The exporter appends `/v1/traces`; what it cannot parse would fail the start
            // later, naming no key.
            let ok = url::Url::parse(endpoint)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            if !ok {
                return Err(ConfigError::invalid(
                    "telemetry.endpoint",
                    format!("`{endpoint}` is not an http:// or https:// URL"),
                ));
            }
        }
        if let Some(bind) = &self.admin.bind {
            bind.parse::<std::net::SocketAddr>().map_err(|_| {
                ConfigError::invalid(
                    "admin.bind",
                    format!(
                        "`{bind}` is not an IP:port address (a host name is not resolved: \
                         127.0.0.1:8081, [::1]:8081 or 0.0.0.0:8081)"
                    ),
                )
            })?;
        }
        for (key, token) in [
            ("admin.token", &self.admin.token),
            ("admin.read_token", &self.admin.read_token),
        ] {
            if token.as_deref() == Some("") {
                return Err(ConfigError::invalid(
                    key,
                    "must not be empty (use null to disable)",
                ));
            }
            // HTTP trims a header value and refuses control characters in it: no
            // Authorization header could carry such a token.
            if token
                .as_deref()
                .is_some_and(|t| t.trim() != t || t.chars().any(char::is_control))
            {
                return Err(ConfigError::invalid(
                    key,
                    "must not start or end with whitespace nor hold a control character (no \
                     Authorization header can carry it; a stray space or newline from an env \
                     file?)",
                ));
            }
        }
        positive("admin.pool_size", self.admin.pool_size as u64)?;
        positive_duration("admin.statement_timeout", self.admin.statement_timeout)?;
        at_most(
            "admin.statement_timeout",
            self.admin.statement_timeout,
            MAX_STATEMENT_TIMEOUT,
        )?;
        for (key, value) in self.durations() {
            at_most(key, value, MAX_DURATION)?;
        }
        if let Some(host) =
            self.admin.allowed_hosts.iter().find(|h| {
                h.is_empty() || h.chars().any(|c| c.is_whitespace() || c == '/' || c == '@')
            })
        {
            return Err(ConfigError::invalid(
                "admin.allowed_hosts",
                format!("`{host}` is not a host or host:port"),
            ));
        }
        if let Some(exchange) = &self.dead_letter.exchange {
            if exchange.is_empty() || exchange.len() > 255 {
                return Err(ConfigError::invalid(
                    "dead_letter.exchange",
                    "must be a non-empty exchange name of at most 255 bytes, or null",
                ));
            }
        }
        if self.broker.connection_name.trim().is_empty() {
            return Err(ConfigError::invalid(
                "broker.connection_name",
                "is empty: it names the engine's connections and begins its engine id",
            ));
        }
        if self.broker.connection_name.len() > 255 {
            return Err(ConfigError::invalid(
                "broker.connection_name",
                "must be at most 255 bytes",
            ));
        }
        if self.ordering.run > 10_000 {
            return Err(ConfigError::invalid(
                "ordering.run",
                format!("is {}; at most 10000 rows follow a head", self.ordering.run),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.logging.level).map_err(|e| {
            ConfigError::invalid("logging.level", format!("is not a valid filter: {e}"))
        })?;
        if let Some(word) = not_a_level(&self.logging.level) {
            return Err(ConfigError::invalid(
                "logging.level",
                format!(
                    "`{word}` is no level (off, error, warn, info, debug, trace): a bare word \
                     names a target, so this filter would show that target's lines only and \
                     silence every other; name a target as `target=level`"
                ),
            ));
        }
        Ok(())
    }
}

/// The first bare word of a tracing filter that is not a level name: `EnvFilter` reads
/// `warning` or `debg` as a target, which matches nothing, and every line goes unlogged.
fn not_a_level(filter: &str) -> Option<&str> {
    filter.split(',').map(str::trim).find(|d| {
        !d.is_empty()
            && !d.contains(['=', '[', '{', ':'])
            && d.parse::<tracing_subscriber::filter::LevelFilter>()
                .is_err()
    })
}

impl BackoffConfig {
    /// Checks the backoff section on its own (also used by property tests).
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive_duration("retry.backoff.initial", self.initial)?;
        if self.max < self.initial {
            return Err(ConfigError::invalid(
                "retry.backoff.max",
                "must be at least retry.backoff.initial",
            ));
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(ConfigError::invalid(
                "retry.backoff.multiplier",
                "must be a number >= 1.0",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(ConfigError::invalid(
                "retry.backoff.jitter",
                "must be between 0.0 and 1.0",
            ));
        }
        Ok(())
    }
}

fn parse_error(origin: &str, e: serde_yaml_ng::Error) -> ConfigError {
    ConfigError::Parse {
        origin: origin.to_string(),
        message: yaml_message(&e),
    }
}

/// The YAML parser's message, but for an integer past 64 bits, which it reports as a type
/// its value tree does not hold ("invalid type: integer `…` as u128, expected any YAML
/// value"): that reads as a bug, and the problem is only the size.
fn yaml_message(e: &serde_yaml_ng::Error) -> String {
    let message = e.to_string();
    for wide in ["u128", "i128"] {
        let tail = format!(" as {wide}, expected any YAML value");
        if message.contains(&tail) {
            return message
                .replacen("invalid type: integer", "the integer", 1)
                .replacen(
                    &tail,
                    " is too large for any key (they hold at most 64 bits)",
                    1,
                );
        }
    }
    message
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be greater than 0"));
    }
    Ok(())
}

/// The longest duration any key takes (100 years): PostgreSQL adds some of them to `now()`,
/// whose range ends in the year 294276, and a longer one would fail there, later, naming
/// no key.
pub const MAX_DURATION: Duration = Duration::from_secs(36_525 * 24 * 3600);

/// `statement_timeout` is an int of milliseconds in PostgreSQL (about 24.8 days).
const MAX_STATEMENT_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

fn at_most(key: &str, value: Duration, max: Duration) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::invalid(
            key,
            format!("must be at most {}", humantime::format_duration(max)),
        ));
    }
    Ok(())
}

fn positive_duration(key: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::invalid(
            key,
            "must be a duration greater than 0",
        ));
    }
    Ok(())
}

impl Config {
    /// Every duration key with its value.
    fn durations(&self) -> [(&'static str, Duration); 14] {
        [
            ("database.connect_timeout", self.database.connect_timeout),
            ("retry.confirm_timeout", self.retry.confirm_timeout),
            ("retry.nacks_refunded_for", self.retry.nacks_refunded_for),
            ("retry.backoff.initial", self.retry.backoff.initial),
            ("retry.backoff.max", self.retry.backoff.max),
            ("scheduler.sweep_interval", self.scheduler.sweep_interval),
            ("scheduler.lease_duration", self.scheduler.lease_duration),
            ("scheduler.heartbeat", self.scheduler.heartbeat),
            ("scheduler.engine_timeout", self.scheduler.engine_timeout),
            ("logging.summary_interval", self.logging.summary_interval),
            ("shutdown.timeout", self.shutdown.timeout),
            ("retention.confirmed", self.retention.confirmed),
            ("retention.interval", self.retention.interval),
            ("broker.connect_timeout", self.broker.connect_timeout),
        ]
    }
}

fn check_url_scheme(key: &str, url: &SecretUrl, allowed: &[&str]) -> Result<(), ConfigError> {
    check_userinfo(key, url)?;
    match url.scheme() {
        Some(scheme) if allowed.contains(&scheme.as_str()) => Ok(()),
        Some(scheme) => Err(ConfigError::invalid(
            key,
            format!(
                "has scheme `{scheme}`, expected {} (url: {url})",
                allowed.join(" or ")
            ),
        )),
        None => Err(ConfigError::invalid(key, "is not a valid URL")),
    }
}

/// Refuses a URL whose host part holds two `@`: a password with an `@` left unencoded.
/// Parsers disagree on which `@` ends the password (the PostgreSQL driver takes the first,
/// so it would look up a host named after the rest of the password, a transient DNS error
/// retried for ever), and the redacted URL in logs would not show the mistake.
fn check_userinfo(key: &str, url: &SecretUrl) -> Result<(), ConfigError> {
    let raw = url.expose();
    let Some((_, rest)) = raw.split_once("://") else {
        return Ok(()); // no scheme: the scheme check names that
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    if authority.matches('@').count() > 1 {
        return Err(ConfigError::invalid(
            key,
            "holds an unencoded `@` in its user name or password: percent-encode it as %40",
        ));
    }
    Ok(())
}

/// Every leaf key of the configuration as a dotted path, from the defaults' shape.
pub(crate) fn leaf_keys() -> Vec<Vec<String>> {
    let defaults = serde_yaml_ng::to_value(Config::default()).unwrap_or(Value::Null);
    let mut out = Vec::new();
    collect_leaves(&defaults, &mut Vec::new(), &mut out);
    out
}

fn collect_leaves(value: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                if let Some(k) = k.as_str() {
                    path.push(k.to_string());
                    collect_leaves(v, path, out);
                    path.pop();
                }
            }
        }
        _ => out.push(path.clone()),
    }
}

/// The environment variable that overrides a dotted key: `retry.backoff.initial` →
/// `COURIER_RETRY_BACKOFF_INITIAL`.
pub(crate) fn env_name(path: &[String]) -> String {
    format!("{ENV_PREFIX}{}", path.join("_").to_uppercase())
}

/// Lays `COURIER_*` variables over the YAML tree. A `COURIER_` variable that names no key
/// is an error, so a misspelt override is not silently ignored. Returns the dotted key and
/// the variable of each override, so an error about a value can name where it came from.
fn apply_env(
    tree: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut applied = Vec::new();
    let leaves = leaf_keys();
    let defaults = serde_yaml_ng::to_value(Config::default()).unwrap_or(Value::Null);
    for (name, raw) in env {
        let Some(_) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if ENV_NOT_CONFIG.contains(&name.as_str()) {
            continue;
        }
        let Some(path) = leaves.iter().find(|p| env_name(p) == name) else {
            if not_config(&name) {
                continue;
            }
            return Err(ConfigError::Parse {
                origin: "environment".into(),
                message: format!("`{name}` names no configuration key"),
            });
        };
        let default_leaf = lookup(&defaults, path);
        // Strings (and optional strings) are taken verbatim, so a URL or a password with
        // YAML-special characters stays intact; other values are parsed as YAML scalars.
        let value = if matches!(default_leaf, Some(Value::Null)) && is_null(&raw) {
            // A key that may be null (its default) is set back to null as YAML writes it:
            // `COURIER_ADMIN_BIND=` turns off an admin API the file turned on.
            Value::Null
        } else if matches!(default_leaf, Some(Value::String(_)) | Some(Value::Null)) {
            Value::String(raw)
        } else {
            serde_yaml_ng::from_str::<Value>(&raw).map_err(|e| ConfigError::Parse {
                origin: "environment".into(),
                message: format!("`{name}`: {}", yaml_message(&e)),
            })?
        };
        insert(tree, path, value)
            .map_err(|problem| ConfigError::invalid(&path.join("."), problem))?;
        applied.push((path.join("."), name));
    }
    Ok(applied)
}

/// The variable that set the key at `path` (or a key under it), among `applied`
/// (`(dotted key, variable)` pairs from [`apply_env`]).
fn set_by<'a>(applied: &'a [(String, String)], path: &str) -> Option<&'a str> {
    applied
        .iter()
        .find(|(key, _)| {
            path == key
                || path
                    .strip_prefix(key.as_str())
                    .is_some_and(|r| r.starts_with('.'))
        })
        .map(|(_, name)| name.as_str())
}

/// What a variable writes for null: empty, or YAML's own `null` and `~`.
fn is_null(raw: &str) -> bool {
    matches!(raw.trim(), "" | "~" | "null" | "Null" | "NULL")
}

/// The shortest `scheduler.lease_duration`.
const MIN_LEASE: Duration = Duration::from_secs(1);

/// `COURIER_*` variables that are read elsewhere, not configuration keys.
pub(crate) const ENV_NOT_CONFIG: &[&str] = &["COURIER_CONFIG"];

/// A `COURIER_*` variable that names no key but is not a misspelt override either:
///
/// - the project's own test and bench settings (`COURIER_TEST_*`, `COURIER_SOAK*`,
///   `COURIER_HOSTILE_*`, `COURIER_BENCH_*`), which a developer keeps exported;
/// - Kubernetes service links: a Service named `courier` (or `courier-admin`, …) puts
///   `COURIER_SERVICE_HOST`, `COURIER_SERVICE_PORT[_<name>]`, `COURIER_PORT` and
///   `COURIER_PORT_<n>_<proto>[_ADDR|_PORT|_PROTO]` into every pod of its namespace, and
///   the engine must still start there.
fn not_config(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return false;
    };
    let tool = ["TEST_", "SOAK", "HOSTILE_", "BENCH_"];
    if tool.iter().any(|t| rest.starts_with(t)) {
        return true;
    }
    let parts: Vec<&str> = rest.split('_').collect();
    let link = |i: usize| match &parts[i..] {
        ["SERVICE", "HOST"] | ["PORT"] => true,
        ["SERVICE", "PORT", ..] => true,
        ["PORT", port, proto, tail @ ..] => {
            port.chars().all(|c| c.is_ascii_digit())
                && matches!(*proto, "TCP" | "UDP" | "SCTP")
                && matches!(tail, [] | ["ADDR"] | ["PORT"] | ["PROTO"])
        }
        _ => false,
    };
    (0..parts.len()).any(link)
}

fn lookup<'a>(tree: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(tree, |node, key| node.get(key.as_str()))
}

fn insert(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let mut node = tree;
    for key in &path[..path.len() - 1] {
        let map = node
            .as_mapping_mut()
            .ok_or_else(|| "is not a mapping in the file".to_string())?;
        node = map
            .entry(Value::String(key.clone()))
            .or_insert_with(|| Value::Mapping(Default::default()));
    }
    let map = node
        .as_mapping_mut()
        .ok_or_else(|| "is not a mapping in the file".to_string())?;
    map.insert(Value::String(path[path.len() - 1].clone()), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_with_env(yaml, "test.yaml", Vec::new())
    }

    fn parse_env(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::from_yaml_with_env(yaml, "test.yaml", env.collect::<Vec<_>>())
    }

    fn err(yaml: &str) -> String {
        parse(yaml)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn a_variable_sets_a_nullable_key_back_to_null_and_names_itself_in_errors() {
        let file = "admin:\n  bind: 127.0.0.1:9000\ndatabase:\n  migrate_url: postgres://h/db\n";
        let c = parse_env(
            file,
            &[
                ("COURIER_ADMIN_BIND", ""),
                ("COURIER_DATABASE_MIGRATE_URL", "null"),
                ("COURIER_TELEMETRY_ENDPOINT", "~"),
            ],
        )
        .unwrap();
        assert_eq!(c.admin.bind, None);
        assert!(c.database.migrate_url.is_none());
        assert_eq!(c.telemetry.endpoint, None);
        let e = parse_env("", &[("COURIER_ADMIN_BIND", "nowhere")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("admin.bind") && e.contains("COURIER_ADMIN_BIND"),
            "{e}"
        );
    }

    #[test]
    fn a_misspelt_level_is_refused_not_read_as_a_target() {
        for level in ["warning", "debg", "info,verbose"] {
            let e = err(&format!("logging:\n  level: \"{level}\"\n"));
            assert!(e.contains("logging.level") && e.contains("no level"), "{e}");
        }
        for level in [
            "warn",
            "INFO",
            "courier=debug,lapin=warn",
            "info,courier[claim]=trace",
        ] {
            assert!(
                parse(&format!("logging:\n  level: \"{level}\"\n")).is_ok(),
                "{level}"
            );
        }
        let e = err("broker:\n  connection_name: ''\n");
        assert!(e.contains("broker.connection_name"), "{e}");
    }

    #[test]
    fn a_bad_value_from_the_environment_names_the_variable_not_the_file() {
        let e = parse_env("", &[("COURIER_PUBLISHER_MAX_IN_FLIGHT", "lots")])
            .expect_err("not a number")
            .to_string();
        assert!(
            e.contains("COURIER_PUBLISHER_MAX_IN_FLIGHT") && !e.contains("test.yaml"),
            "{e}"
        );
        let e = err("publisher:\n  max_in_flight: lots\n");
        assert!(e.contains("test.yaml"), "{e}");
    }

    #[test]
    fn an_unencoded_at_in_a_password_is_named_without_the_password() {
        for (key, url) in [
            ("database.url", "postgres://u:hun@ter2@127.0.0.1:5432/db"),
            ("broker.url", "amqp://u:hun@ter2@127.0.0.1:5672/%2f"),
        ] {
            let (section, field) = key.split_once('.').expect("dotted");
            let e = err(&format!("{section}:\n  {field}: \"{url}\"\n"));
            assert!(e.contains(key) && e.contains("%40"), "{e}");
            assert!(!e.contains("ter2"), "the password in an error: {e}");
        }
        assert!(parse("database:\n  url: \"postgres://u:hun%40ter2@127.0.0.1/db\"\n").is_ok());
    }

    #[test]
    fn a_database_url_the_driver_would_refuse_is_a_config_error() {
        for query in ["sslmode=bogus", "frobnicate=1"] {
            let yaml = format!("database:\n  url: \"postgres://u:secret@127.0.0.1/db?{query}\"\n");
            let e = err(&yaml);
            assert!(e.contains("database.url") && e.contains("unusable"), "{e}");
            assert!(!e.contains("secret"), "the password in an error: {e}");
        }
    }

    #[test]
    fn a_telemetry_endpoint_must_be_an_http_url() {
        let e = err("telemetry:\n  endpoint: not-a-url\n");
        assert!(e.contains("telemetry.endpoint"), "{e}");
        assert!(parse("telemetry:\n  endpoint: http://collector:4318\n").is_ok());
    }

    #[test]
    fn an_admin_token_no_header_can_carry_is_rejected() {
        for yaml in [
            "admin:\n  token: \" \"\n",
            "admin:\n  read_token: \"tok\\n\"\n",
            "admin:\n  token: \"ab\\ncd\"\n",
        ] {
            let e = err(yaml);
            assert!(e.contains("whitespace"), "{yaml}: {e}");
        }
        assert!(parse("admin:\n  token: \"tok en\"\n").is_ok());
    }

    #[test]
    fn a_lease_shorter_than_a_second_is_rejected() {
        let e = err("scheduler:\n  lease_duration: 1ms\n");
        assert!(
            e.contains("scheduler.lease_duration") && e.contains("at least 1s"),
            "{e}"
        );
        assert!(parse("scheduler:\n  lease_duration: 1s\n").is_ok());
    }

    #[test]
    fn durations_past_what_postgresql_can_add_are_rejected_naming_the_key() {
        for (yaml, key) in [
            (
                "scheduler:\n  lease_duration: 100000000years\n",
                "scheduler.lease_duration",
            ),
            (
                "retention:\n  confirmed: 100000years\n",
                "retention.confirmed",
            ),
            (
                "admin:\n  statement_timeout: 25days\n",
                "admin.statement_timeout",
            ),
        ] {
            let e = err(yaml);
            assert!(e.contains(key) && e.contains("at most"), "{e}");
        }
        assert!(parse("retention:\n  confirmed: 100years\n").is_ok());
        assert!(parse("admin:\n  statement_timeout: 24days\n").is_ok());
    }

    #[test]
    fn kubernetes_service_links_and_test_settings_are_not_overrides() {
        let env = [
            ("COURIER_SERVICE_HOST", "10.0.0.1"),
            ("COURIER_SERVICE_PORT", "8081"),
            ("COURIER_SERVICE_PORT_ADMIN", "8081"),
            ("COURIER_PORT", "tcp://10.0.0.1:8081"),
            ("COURIER_PORT_8081_TCP", "tcp://10.0.0.1:8081"),
            ("COURIER_PORT_8081_TCP_ADDR", "10.0.0.1"),
            ("COURIER_ADMIN_SERVICE_HOST", "10.0.0.2"),
            ("COURIER_ADMIN_PORT_8081_TCP_PROTO", "tcp"),
            ("COURIER_TEST_DATABASE_URL", "postgres://x"),
            ("COURIER_SOAK", "1"),
            ("COURIER_HOSTILE_ROWS", "5"),
        ];
        assert!(parse_env("", &env).is_ok());
        // A misspelt override is still an error, also when it ends like a link.
        for typo in [
            "COURIER_DATABSE_URL",
            "COURIER_ADMIN_PORT_X_TCP",
            "COURIER_SERVICE",
        ] {
            let e = parse_env("", &[(typo, "x")]).expect_err(typo).to_string();
            assert!(e.contains(typo), "{e}");
        }
    }

    #[test]
    fn shipped_config_yaml_parses_and_equals_defaults() {
        let text = include_str!("../config.yaml");
        let from_file = parse(text).expect("config.yaml is valid");
        let defaults = serde_yaml_ng::to_value(Config::default()).unwrap();
        assert_eq!(serde_yaml_ng::to_value(from_file).unwrap(), defaults);
    }

    #[test]
    fn an_unreadable_file_names_it_and_keeps_the_io_error() {
        use std::error::Error as _;
        let e = Config::load(Path::new("/nonexistent/courier.yaml")).unwrap_err();
        let source = e.source().and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(source.map(|s| s.kind()), Some(std::io::ErrorKind::NotFound));
        let text = e.to_string();
        assert!(
            text.starts_with("cannot read config file /nonexistent/courier.yaml: "),
            "{text}"
        );
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.retry.max_attempts, 3);
        assert_eq!(c.database.schema, "courier");
    }

    #[test]
    fn unknown_key_is_named() {
        let msg = err("database:\n  poolsize: 3\n");
        assert!(msg.contains("poolsize"), "{msg}");
        let msg = err("bogus: 1\n");
        assert!(msg.contains("bogus"), "{msg}");
    }

    #[test]
    fn bad_duration_is_named() {
        let msg = err("retry:\n  confirm_timeout: soon\n");
        assert!(msg.contains("confirm_timeout"), "{msg}");
    }

    #[test]
    fn zero_and_negative_sizes_are_rejected() {
        assert!(err("publisher:\n  max_in_flight: 0\n").contains("publisher.max_in_flight"));
        let msg = err("database:\n  pool_size: -2\n");
        assert!(msg.contains("pool_size"), "{msg}");
        assert!(err("scheduler:\n  claim_batch: 0\n").contains("scheduler.claim_batch"));
    }

    #[test]
    fn publishing_connections_are_bounded() {
        for n in [0, 17] {
            let msg = err(&format!("publisher:\n  connections: {n}\n"));
            assert!(
                msg.contains("publisher.connections") && msg.contains("between 1 and 16"),
                "{msg}"
            );
        }
        let one = parse_env("", &[("COURIER_PUBLISHER_CONNECTIONS", "1")]).expect("valid");
        assert_eq!(one.publisher.connections, 1);
    }

    #[test]
    fn zero_max_attempts_is_rejected() {
        assert!(err("retry:\n  max_attempts: 0\n").contains("retry.max_attempts"));
    }

    #[test]
    fn wrong_url_scheme_is_rejected_without_the_password() {
        let msg = err("database:\n  url: mysql://bob:hunter2@db/x\n");
        assert!(msg.contains("database.url"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        let msg = err("broker:\n  url: http://guest:s3cret@localhost\n");
        assert!(
            msg.contains("broker.url") && !msg.contains("s3cret"),
            "{msg}"
        );
    }

    #[test]
    fn multi_host_database_urls_are_accepted_and_redacted() {
        let c = parse(
            "database:\n  url: postgres://u:hunter2@h1:5432,h2:5432/db?target_session_attrs=read-write\n",
        )
        .unwrap();
        let shown = c.database.url.to_string();
        assert_eq!(
            shown,
            "postgres://u:***@h1:5432,h2:5432/db?target_session_attrs=read-write"
        );
    }

    #[test]
    fn backoff_must_be_sane() {
        assert!(err("retry:\n  backoff:\n    multiplier: 0.5\n").contains("multiplier"));
        assert!(err("retry:\n  backoff:\n    jitter: 1.5\n").contains("jitter"));
        assert!(err("retry:\n  backoff:\n    initial: 10s\n    max: 1s\n").contains("backoff.max"));
    }

    #[test]
    fn schema_name_is_checked() {
        assert!(err("database:\n  schema: \"a;drop\"\n").contains("database.schema"));
    }

    #[test]
    fn env_overrides_file() {
        let c = parse_env(
            "database:\n  url: postgres://a@h/db\n",
            &[
                ("COURIER_DATABASE_URL", "postgres://u:p@other/db"),
                ("COURIER_BROKER_URL", "amqp://x:y@rabbit/%2f"),
                ("COURIER_PUBLISHER_MAX_IN_FLIGHT", "17"),
                ("COURIER_RETRY_BACKOFF_INITIAL", "250ms"),
                ("COURIER_DEAD_LETTER_EXCHANGE", "dlx"),
                ("PATH", "/bin"),
            ],
        )
        .unwrap();
        assert_eq!(c.database.url.expose(), "postgres://u:p@other/db");
        assert_eq!(
            c.broker.url,
            BrokerUrls::from(SecretUrl::new("amqp://x:y@rabbit/%2f"))
        );
        assert_eq!(c.publisher.max_in_flight, 17);
        assert_eq!(c.retry.backoff.initial, Duration::from_millis(250));
        assert_eq!(c.dead_letter.exchange.as_deref(), Some("dlx"));
    }

    #[test]
    fn broker_url_takes_a_list_in_yaml_and_a_comma_separated_string() {
        let one = parse("broker:\n  url: amqp://a:pw1@h1/%2f\n").unwrap();
        assert_eq!(one.broker.url.len(), 1);
        let yaml = "broker:\n  url:\n    - amqp://a:pw1@h1/%2f\n    - amqp://b:pw2@h2:5673/%2f\n";
        let list = parse(yaml).unwrap();
        let env = parse_env(
            "",
            &[(
                "COURIER_BROKER_URL",
                "amqp://a:pw1@h1/%2f, amqp://b:pw2@h2:5673/%2f",
            )],
        )
        .unwrap();
        assert_eq!(list.broker.url, env.broker.url);
        let urls: Vec<&str> = env.broker.url.iter().map(SecretUrl::expose).collect();
        assert_eq!(urls, ["amqp://a:pw1@h1/%2f", "amqp://b:pw2@h2:5673/%2f"]);
        assert_eq!(env.broker.url.get(2), env.broker.url.get(0));
        let shown = format!("{} {:?}", env.broker.url, env.broker.url);
        assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
    }

    #[test]
    fn every_url_of_the_list_is_checked_and_redacted_in_errors() {
        let msg = err("broker:\n  url:\n    - amqp://a:pw1@h1/%2f\n    - http://b:secret2@h2/\n");
        assert!(msg.contains("broker.url"), "{msg}");
        assert!(!msg.contains("secret2") && !msg.contains("pw1"), "{msg}");
        let msg = parse_env("", &[("COURIER_BROKER_URL", "amqp://a:pw1@h1/%2f,")])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("broker.url") && !msg.contains("pw1"), "{msg}");
        assert!(err("broker:\n  url: []\n").contains("broker.url"));
    }

    #[test]
    fn broker_url_query_values_are_checked_at_start() {
        for query in [
            "heartbeat=abc",
            "frame_max=-1",
            "channel_max=x",
            "connection_timeout=1s",
        ] {
            let url = format!("amqp://a:secretpw@h1/%2f?{query}");
            let msg = parse_env("", &[("COURIER_BROKER_URL", url.as_str())])
                .unwrap_err()
                .to_string();
            let key = query.split('=').next().unwrap_or_default();
            assert!(
                msg.contains("broker.url")
                    && msg.contains(&format!("`{query}`"))
                    && msg.contains(key),
                "{query}: {msg}"
            );
            assert!(!msg.contains("secretpw"), "{msg}");
        }
        let msg = parse_env(
            "",
            &[("COURIER_BROKER_URL", "amqp://h1/%2f?auth_mechanism=x")],
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("not a valid AMQP URI"), "{msg}");
        let good = "amqp://a:b@h1/%2f?heartbeat=5&frame_max=8192&channel_max=10";
        assert!(parse_env("", &[("COURIER_BROKER_URL", good)]).is_ok());
        let good = "amqps://a:b@h1/%2f?heartbeat=5&verify=verify_none";
        assert!(parse_env("", &[("COURIER_BROKER_URL", good)]).is_ok());
        let good = "amqps://a:b@h1/%2f?frame_max=0&server_name_indication=disable&cacertfile=/c";
        assert!(parse_env("", &[("COURIER_BROKER_URL", good)]).is_ok());
        // Values the broker or the TLS set-up would refuse, and keys nothing reads.
        for (query, says) in [
            ("frame_max=1", "4096"),
            ("verify=sometimes", "verify_peer or verify_none"),
            ("hearbeat=5", "does not read"),
            ("foo=bar", "does not read"),
            ("heartbeat=5&heartbeat=6", "`heartbeat` twice"),
            ("heartbeat=5#heartbeat=6", "has a fragment"),
        ] {
            let url = format!("amqps://a:secretpw@h1/%2f?{query}");
            let msg = parse_env("", &[("COURIER_BROKER_URL", url.as_str())])
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("broker.url") && msg.contains(says),
                "{query}: {msg}"
            );
            assert!(!msg.contains("secretpw"), "{msg}");
        }
        // TLS parameters on a plain URL would do nothing: said, not ignored.
        let url = "amqp://a:b@h1/%2f?cacertfile=/etc/ca.pem";
        let msg = parse_env("", &[("COURIER_BROKER_URL", url)])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`cacertfile` on a plain amqp://"), "{msg}");
    }

    #[test]
    fn an_integer_past_64_bits_is_called_too_large() {
        let msg = parse_env(
            "publisher:\n  max_payload_bytes: 99999999999999999999\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("publisher.max_payload_bytes")
                && msg.contains("`99999999999999999999` is too large"),
            "{msg}"
        );
        assert!(!msg.contains("u128"), "{msg}");
        let msg = parse_env(
            "",
            &[("COURIER_RETRY_MAX_ATTEMPTS", "-99999999999999999999")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("COURIER_RETRY_MAX_ATTEMPTS") && msg.contains("is too large"),
            "{msg}"
        );
    }

    #[test]
    fn broker_tls_keys() {
        let c = parse_env(
            "broker:\n  tls:\n    cacertfile: /etc/ca.pem\n",
            &[("COURIER_BROKER_TLS_VERIFY", "verify_none")],
        )
        .unwrap();
        assert_eq!(
            c.broker.tls.cacertfile.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );
        assert_eq!(c.broker.tls.verify, TlsVerify::VerifyNone);
        assert!(err("broker:\n  tls:\n    certfile: /c.pem\n").contains("broker.tls"));
        assert!(err("broker:\n  tls:\n    verify: maybe\n").contains("verify"));
    }

    #[test]
    fn unknown_env_override_is_an_error() {
        let e = parse_env("", &[("COURIER_PUBLISHER_MAX_INFLIGHT", "3")]).unwrap_err();
        assert!(e.to_string().contains("COURIER_PUBLISHER_MAX_INFLIGHT"));
    }

    #[test]
    fn bad_env_value_is_named() {
        let e = parse_env("", &[("COURIER_RETRY_MAX_ATTEMPTS", "0")]).unwrap_err();
        assert!(e.to_string().contains("retry.max_attempts"), "{e}");
    }

    #[test]
    fn redaction_hides_passwords() {
        let u = SecretUrl::new("amqp://guest:topsecret@host:5672/%2f");
        assert!(!format!("{u} {u:?}").contains("topsecret"));
        assert!(u.to_string().contains("***"));
        assert_eq!(redact_url("not a url :: pass"), "<unparsable url>");
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
    }

    #[test]
    fn bad_log_format_is_named() {
        let msg = err("logging:\n  format: xml\n");
        assert!(msg.contains("format") || msg.contains("xml"), "{msg}");
    }
}
