//! Opening AMQP connections: heartbeat and connection name from the config, a bound on the
//! attempt, and errors that never carry the password.

use std::time::Duration;

use lapin::{types::LongString, uri::AMQPUri, Connection, ConnectionProperties};

use crate::config::{BrokerConfig, SecretUrl};

/// A broker failure, with the URL redacted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The URL does not parse as AMQP.
    #[error("invalid broker url {0}")]
    BadUrl(String),
    /// Connecting failed or timed out.
    #[error("cannot connect to RabbitMQ at {target}: {reason}")]
    Connect {
        /// The redacted URL.
        target: String,
        /// Why.
        reason: String,
    },
    /// An AMQP operation failed.
    #[error("AMQP error: {0}")]
    Amqp(String),
}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        BrokerError::Amqp(e.to_string())
    }
}

/// Connects with the configured heartbeat, naming the connection `<name>` plus `suffix`.
pub async fn connect(cfg: &BrokerConfig, suffix: &str) -> Result<Connection, BrokerError> {
    connect_url(
        &cfg.url,
        cfg.heartbeat,
        &format!("{}{suffix}", cfg.connection_name),
        cfg.connect_timeout,
    )
    .await
}

/// Connects to `url` (tests and tools use this directly).
pub async fn connect_url(
    url: &SecretUrl,
    heartbeat: Duration,
    name: &str,
    timeout: Duration,
) -> Result<Connection, BrokerError> {
    let mut uri: AMQPUri = url
        .expose()
        .parse()
        .map_err(|_| BrokerError::BadUrl(url.redacted()))?;
    uri.query.heartbeat = Some(heartbeat.as_secs().clamp(0, u64::from(u16::MAX)) as u16);
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.as_bytes()));
    match tokio::time::timeout(timeout, Connection::connect_uri(uri, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(BrokerError::Connect {
            target: url.redacted(),
            reason: url.scrub(&e.to_string()),
        }),
        Err(_) => Err(BrokerError::Connect {
            target: url.redacted(),
            reason: format!("no answer within {}", humantime::format_duration(timeout)),
        }),
    }
}
