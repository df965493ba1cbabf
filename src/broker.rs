//! Opening AMQP connections: heartbeat and connection name from the config, a bound on the
//! attempt, and errors that never carry the password. Also what the publishing side paths
//! share: reading a channel close the broker sent ([`ChannelClose`]) and awaiting a batch of
//! writes bounded by progress rather than by a fixed time ([`until_stalled`]).

use std::{future::Future, time::Duration};

use futures::{stream::FuturesOrdered, StreamExt};

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

/// A channel close sent by the broker (an AMQP soft error): why one publish was refused.
///
/// lapin fails every pending confirm of the channel with the same close, so the close alone
/// does not say which message caused it; its text usually does, by naming the exchange
/// (`ACCESS_REFUSED - cannot publish to internal exchange 'x' in vhost '/'`,
/// `ACCESS_REFUSED - access to exchange 'x' in vhost '/' refused for user 'u'`,
/// `NOT_FOUND - no exchange 'x' in vhost '/'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelClose {
    /// AMQP reply code (403, 404, 406…).
    pub code: u16,
    /// AMQP reply text.
    pub text: String,
}

impl ChannelClose {
    /// The close carried by `e`, when `e` is a channel-level (soft) protocol error.
    pub fn from_error(e: &lapin::Error) -> Option<ChannelClose> {
        match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_)) =>
            {
                Some(ChannelClose {
                    code: amqp.get_id(),
                    text: amqp.get_message().to_string(),
                })
            }
            _ => None,
        }
    }

    /// The exchange the close text names, if any.
    pub fn exchange(&self) -> Option<&str> {
        const MARK: &str = "exchange '";
        let start = self.text.find(MARK)? + MARK.len();
        let rest = &self.text[start..];
        // Names may contain `'`: the name ends at the quote before " in vhost".
        let end = rest.find("' in vhost").or_else(|| rest.find('\''))?;
        Some(&rest[..end])
    }

    /// The body size the close text names (`PRECONDITION_FAILED - message size 9 is larger
    /// than configured max size 1`): the broker's own `max_message_size`, below ours.
    pub fn message_size(&self) -> Option<usize> {
        const MARK: &str = "message size ";
        let start = self.text.find(MARK)? + MARK.len();
        let digits: String = self.text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    }

    /// Whether the broker refused the exchange itself (access refused: internal, or no
    /// write permission), so every publish to it would close the channel again.
    pub fn refuses_exchange(&self) -> bool {
        self.code == 403 && self.exchange().is_some()
    }
}

/// Awaits every future of `writes` (polled together, first polls in order, so a batch of
/// publishes is pipelined) and returns their outputs in order; `None` when none of them
/// completed for `idle` while `patient()` said not to wait longer.
///
/// The bound is on progress, not on the whole batch: a batch of large messages on a slow
/// link may take far longer than `idle` and still be healthy, as long as its writes keep
/// completing. Only a link on which nothing moves for `idle` is presumed dead.
pub async fn until_stalled<F: Future>(
    writes: impl IntoIterator<Item = F>,
    idle: Duration,
    patient: impl Fn() -> bool,
) -> Option<Vec<F::Output>> {
    let mut pending: FuturesOrdered<F> = writes.into_iter().collect();
    let mut done = Vec::with_capacity(pending.len());
    loop {
        match tokio::time::timeout(idle, pending.next()).await {
            Ok(Some(out)) => done.push(out),
            Ok(None) => return Some(done),
            Err(_) if patient() => {}
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(code: u16, text: &str) -> ChannelClose {
        ChannelClose {
            code,
            text: text.into(),
        }
    }

    #[test]
    fn closes_name_their_exchange() {
        let internal = close(
            403,
            "ACCESS_REFUSED - cannot publish to internal exchange 'a.b' in vhost '/'",
        );
        assert_eq!(internal.exchange(), Some("a.b"));
        assert!(internal.refuses_exchange());
        let write = close(
            403,
            "ACCESS_REFUSED - access to exchange 'it's' in vhost '/' refused for user 'u'",
        );
        assert_eq!(write.exchange(), Some("it's"));
        let missing = close(404, "NOT_FOUND - no exchange 'gone' in vhost '/'");
        assert_eq!(missing.exchange(), Some("gone"));
        assert!(!missing.refuses_exchange());
        let size = close(
            406,
            "PRECONDITION_FAILED - message size 9 is larger than configured max size 1",
        );
        assert_eq!(size.exchange(), None);
        assert_eq!(size.message_size(), Some(9));
        assert!(!size.refuses_exchange());
        assert_eq!(
            close(406, "PRECONDITION_FAILED - other").message_size(),
            None
        );
    }

    #[tokio::test]
    async fn a_slow_batch_that_keeps_moving_is_not_stalled() {
        // Each write takes 60 % of the bound; the batch takes about five bounds in all.
        let idle = Duration::from_millis(100);
        let writes = (0..8u64).map(|i| async move {
            tokio::time::sleep(Duration::from_millis(60) * (i as u32 + 1)).await;
            i
        });
        let out = until_stalled(writes, idle, || false).await;
        assert_eq!(out, Some((0..8).collect()));
    }

    #[tokio::test]
    async fn a_batch_where_nothing_moves_is_stalled() {
        let idle = Duration::from_millis(50);
        let writes = (0..3u64).map(|i| async move {
            if i == 1 {
                futures::future::pending::<()>().await;
            }
            i
        });
        assert_eq!(until_stalled(writes, idle, || false).await, None);
    }
}
