//! Opening AMQP connections: to the first node of `broker.url` that answers (round robin
//! from a given node, so a caller that lost one moves to the next at once), with heartbeat,
//! connection name and TLS settings from the config, a bound on each attempt, and errors
//! that never carry a password and say whether trying again can help. Also what the publishing side paths
//! share: reading a channel close the broker sent ([`ChannelClose`]) and awaiting a batch of
//! writes bounded by progress rather than by a fixed time ([`until_stalled`]).

use std::{future::Future, time::Duration};

use futures::{stream::FuturesOrdered, StreamExt};

use lapin::{
    tcp::{AMQPUriTcpExt, TLSConfig},
    types::LongString,
    uri::{AMQPScheme, AMQPUri},
    Connection, ConnectionProperties,
};

use crate::config::{BrokerConfig, BrokerTls, SecretUrl};

mod tls;

use tls::TlsOptions;

/// A broker failure, with every URL redacted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The URL does not parse as AMQP.
    #[error("invalid broker url {0}")]
    BadUrl(String),
    /// Connecting to one node failed or timed out.
    #[error("cannot connect to RabbitMQ at {target}: {reason}")]
    Connect {
        /// The redacted URL.
        target: String,
        /// Why (the driver's message, the underlying cause included, scrubbed of secrets).
        reason: String,
        /// Whether trying again cannot help: the broker refused the login or the vhost,
        /// or TLS failed (a certificate rejected on either side, unreadable files).
        permanent: bool,
    },
    /// No node of the list could be reached: each one's failure, in the order tried.
    #[error("no RabbitMQ node could be reached: {}", list(.0))]
    NoNode(Vec<BrokerError>),
    /// An AMQP operation failed.
    #[error("AMQP error: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker ended a session or gave no answer in time: there is no driver error to
    /// keep, only what happened.
    #[error("AMQP error: {0}")]
    Lost(String),
}

fn list(failures: &[BrokerError]) -> String {
    let each: Vec<String> = failures.iter().map(ToString::to_string).collect();
    each.join("; ")
}

impl BrokerError {
    /// Whether retrying cannot help without a change of configuration or on the broker
    /// (login or vhost refused, TLS failure), as opposed to a node down or unreachable.
    /// For a list of nodes: when any node refused that way — they share their users,
    /// vhosts and certificates.
    pub fn is_permanent(&self) -> bool {
        match self {
            BrokerError::BadUrl(_) => true,
            BrokerError::Connect { permanent, .. } => *permanent,
            BrokerError::NoNode(failures) => failures.iter().any(BrokerError::is_permanent),
            BrokerError::Amqp(_) | BrokerError::Lost(_) => false,
        }
    }
}

/// Connects to the first node of `broker.url` that answers, naming the connection
/// `<name>` plus `suffix`.
pub async fn connect(cfg: &BrokerConfig, suffix: &str) -> Result<Connection, BrokerError> {
    connect_from(cfg, suffix, 0).await.map(|(conn, _)| conn)
}

/// Tries the nodes of `broker.url` once each, in order from node `start` (wrapping round),
/// each attempt bounded by `broker.connect_timeout`; returns the first connection made and
/// its node's index. A caller that lost node `i` passes `i + 1`: it moves to the next node
/// at once, and should back off only when a whole pass failed.
pub async fn connect_from(
    cfg: &BrokerConfig,
    suffix: &str,
    start: usize,
) -> Result<(Connection, usize), BrokerError> {
    let name = format!("{}{suffix}", cfg.connection_name);
    let nodes = cfg.url.len();
    let mut failures = Vec::new();
    for step in 0..nodes {
        let index = (start + step) % nodes;
        let Some(url) = cfg.url.get(index) else { break };
        match connect_node(url, &cfg.tls, cfg.heartbeat, &name, cfg.connect_timeout).await {
            Ok(conn) => {
                for failure in &failures {
                    tracing::warn!(error = %failure, "skipped a RabbitMQ node");
                }
                return Ok((conn, index));
            }
            Err(e) => failures.push(e),
        }
    }
    match failures.len() {
        1 => Err(failures.remove(0)),
        _ => Err(BrokerError::NoNode(failures)),
    }
}

/// Connects to `url` (tests and tools use this directly), with the default TLS settings
/// overridden only by the URL's own query parameters.
pub async fn connect_url(
    url: &SecretUrl,
    heartbeat: Duration,
    name: &str,
    timeout: Duration,
) -> Result<Connection, BrokerError> {
    connect_node(url, &BrokerTls::default(), heartbeat, name, timeout).await
}

async fn connect_node(
    url: &SecretUrl,
    tls: &BrokerTls,
    heartbeat: Duration,
    name: &str,
    timeout: Duration,
) -> Result<Connection, BrokerError> {
    let bad_url = || BrokerError::BadUrl(url.redacted());
    let mut uri: AMQPUri = url.expose().parse().map_err(|_| bad_url())?;
    let parsed = url::Url::parse(url.expose()).map_err(|_| bad_url())?;
    // The URL's own `heartbeat` (RabbitMQ's URI query parameter) wins, as its other
    // parameters do; `broker.heartbeat` is the default.
    if uri.query.heartbeat.is_none() {
        uri.query.heartbeat = Some(heartbeat.as_secs().clamp(0, u64::from(u16::MAX)) as u16);
    }
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.as_bytes()));
    let failed = |reason: String, permanent: bool| BrokerError::Connect {
        target: url.redacted(),
        reason: url.scrub(&reason),
        permanent,
    };
    let options = match uri.scheme {
        AMQPScheme::AMQPS => TlsOptions::for_url(&parsed, tls).map_err(|e| failed(e, true))?,
        AMQPScheme::AMQP => {
            TlsOptions::for_url(&parsed, &BrokerTls::default()).map_err(|e| failed(e, true))?
        }
    };
    let mut cert_asked = None;
    let plain = uri.scheme == AMQPScheme::AMQP;
    let (host, port) = (uri.authority.host.clone(), uri.authority.port);
    let attempt = async {
        if uri.scheme == AMQPScheme::AMQP || options.is_default() {
            return Connection::connect_uri(uri, props).await;
        }
        // lapin's own TLS takes no CA-only trust store, no `verify_none` and no other name
        // than the host: open the TCP stream, then the TLS session with our connector.
        let (connector, asked) = options.connector().map_err(|e| {
            lapin::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?;
        cert_asked = asked;
        let host = parsed
            .host_str()
            .unwrap_or("localhost")
            .trim_matches(['[', ']']);
        let server_name = options.server_name(host);
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connector(
            uri,
            runtime,
            async move |uri: AMQPUri, runtime| {
                let mut plain = uri;
                plain.scheme = AMQPScheme::AMQP;
                let stream = plain
                    .connect_with_config_async(TLSConfig::default(), &runtime)
                    .await?;
                Ok(stream.into_rustls(&connector, &server_name).await?)
            },
            props,
        )
        .await
    };
    let result = tokio::time::timeout(timeout, attempt).await;
    let tls_port = match &result {
        Ok(Err(e)) if plain && cut_off(e) => {
            let host = host.trim_matches(['[', ']']);
            tls::speaks_tls(host, port, timeout.min(PROBE_TIMEOUT)).await
        }
        _ => false,
    };
    match result {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) if cert_asked.as_ref().is_some_and(|a| a.raised()) => Err(failed(
            format!(
                "the broker requires a client certificate (CertificateRequired) and none is \
                 configured (certfile, keyfile): {e}"
            ),
            true,
        )),
        Ok(Err(e)) if uri_is_tls_to_plain(&e) => Err(failed(
            format!(
                "the server did not answer TLS (amqps:// to a plain AMQP port? RabbitMQ's TLS \
                 listener is 5671 by default): {e}"
            ),
            true,
        )),
        Ok(Err(e)) if tls_port => Err(failed(
            format!(
                "the server speaks TLS (amqp:// to a TLS port? use amqps:// there; RabbitMQ's \
                 plain listener is 5672 by default): it cut the AMQP attempt off ({e}) and \
                 answered a TLS ClientHello"
            ),
            true,
        )),
        Ok(Err(e)) if plain && not_amqp(&e) => {
            // lapin's parser error is its internal state (`ParserErrors { error: Nom(..) }`),
            // which tells an operator nothing more: kept for debugging only.
            tracing::debug!(error = %e, "the server's answer could not be parsed as AMQP");
            Err(failed(
                "the server's answer is not AMQP (amqp:// to a TLS port? use amqps:// there; \
                 RabbitMQ's plain listener is 5672 by default)"
                    .to_string(),
                true,
            ))
        }
        Ok(Err(e)) => Err(failed(e.to_string(), is_permanent(&e))),
        Err(_) => Err(failed(
            format!("no answer within {}", humantime::format_duration(timeout)),
            false,
        )),
    }
}

/// How long the TLS probe of a port that cut a plain attempt off may take: a TLS server
/// answers a ClientHello at once.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the server cut the connection off (a reset, or the stream ended) rather than
/// answering: what a plain attempt sees when a TLS listener's close overtakes its alert.
fn cut_off(e: &lapin::Error) -> bool {
    let lapin::ErrorKind::IOError(io) = e.kind() else {
        return false;
    };
    matches!(
        io.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Whether the server's first answer could not be read as AMQP: on a plain `amqp://`
/// connection, a TLS listener answers the protocol header with a TLS alert.
fn not_amqp(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ParsingError(_))
}

/// Whether TLS failed on the server's first answer not being TLS at all: rustls's
/// `InvalidContentType` (an AMQP server answers a ClientHello with its protocol header).
fn uri_is_tls_to_plain(e: &lapin::Error) -> bool {
    let lapin::ErrorKind::IOError(io) = e.kind() else {
        return false;
    };
    std::iter::successors(
        io.get_ref()
            .map(|inner| inner as &(dyn std::error::Error + 'static)),
        |e| e.source(),
    )
    .any(|cause| {
        matches!(
            cause.downcast_ref::<rustls::Error>(),
            Some(rustls::Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))
        )
    })
}

/// Whether a failed connection attempt cannot succeed by trying again: the broker refused
/// the login (403 ACCESS_REFUSED) or the vhost (530 NOT_ALLOWED, 402 INVALID_PATH), or TLS
/// failed (rustls reports a rejected certificate, on either side, as invalid data).
fn is_permanent(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(amqp.get_id(), 402 | 403 | 530),
        lapin::ErrorKind::IOError(io) => {
            let tls = std::iter::successors(
                io.get_ref()
                    .map(|inner| inner as &(dyn std::error::Error + 'static)),
                |e| e.source(),
            )
            .any(|cause| cause.is::<rustls::Error>());
            tls || matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            )
        }
        lapin::ErrorKind::InvalidProtocolVersion(_) | lapin::ErrorKind::AuthProviderError(_) => {
            true
        }
        _ => false,
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

/// AMQP's reply code for a connection closed by an operator or a node shutting down.
const CONNECTION_FORCED: u16 = 320;

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

    /// The close carried by `e` when the broker closed the whole connection for something
    /// a client sent on it: a connection-level (hard) protocol error other than 320
    /// CONNECTION_FORCED, which an operator or a node shutting down sends (see
    /// `actors::publisher::isolation`).
    pub fn connection_for_input(e: &lapin::Error) -> Option<ChannelClose> {
        match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Hard(_))
                    && amqp.get_id() != CONNECTION_FORCED =>
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
        exchange_named(&self.text)
    }

    /// The body size the close text names (`PRECONDITION_FAILED - message size 9 is larger
    /// than configured max size 1`): the broker's own `max_message_size`, below ours.
    pub fn message_size(&self) -> Option<usize> {
        self.number_after("message size ")
    }

    /// The broker's own `max_message_size` the close text names (`… is larger than
    /// configured max size 1`): every body over it is refused the same way.
    pub fn max_size(&self) -> Option<usize> {
        self.number_after("configured max size ")
    }

    /// The whole number right after `mark` in the close text.
    fn number_after(&self, mark: &str) -> Option<usize> {
        let start = self.text.find(mark)? + mark.len();
        let digits: String = self.text[start..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    }

    /// Whether the broker refused the exchange itself (access refused: internal, or no
    /// write permission), so every publish to it would close the channel again.
    pub fn refuses_exchange(&self) -> bool {
        refuses_exchange(self.code, &self.text)
    }
}

/// [`ChannelClose::refuses_exchange`] for a close's code and text as a failed row keeps
/// them.
pub fn refuses_exchange(code: u16, text: &str) -> bool {
    code == 403 && exchange_named(text).is_some()
}

/// The exchange a close text names, if any.
fn exchange_named(text: &str) -> Option<&str> {
    const MARK: &str = "exchange '";
    let start = text.find(MARK)? + MARK.len();
    let rest = &text[start..];
    // Names may contain `'`: the name ends at the quote before " in vhost".
    let end = rest.find("' in vhost").or_else(|| rest.find('\''))?;
    Some(&rest[..end])
}

/// How long an engine remembers that the broker refused an exchange
/// ([`ChannelClose::refuses_exchange`]): rows to it are failed unpublished meanwhile, so a
/// refused exchange closes a channel once per this time, not once per row. Short, because
/// it is also how long a refusal outlives the permission coming back: a row on its last
/// attempt is dead-lettered on evidence at most this old. Not shorter: each refused probe
/// costs a channel number the client library does not give back (see `MISSING_FOR`, the
/// same bound for missing exchanges).
pub const REFUSAL_REMEMBERED: Duration = Duration::from_secs(5);

/// A new channel of `conn` in confirm mode: every publish on it gets an ack or a nack.
pub async fn confirm_channel(conn: &Connection) -> Result<lapin::Channel, BrokerError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
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
        assert_eq!(
            close(
                406,
                "PRECONDITION_FAILED - message size 9 is larger than configured max size 1",
            )
            .max_size(),
            Some(1)
        );
        assert_eq!(close(406, "PRECONDITION_FAILED - other").max_size(), None);
    }

    #[test]
    fn a_driver_error_is_kept_as_the_source_and_is_not_permanent() {
        use std::error::Error as _;
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let driver = lapin::Error::from(lapin::ErrorKind::IOError(std::sync::Arc::new(io)));
        let e = BrokerError::from(driver.clone());
        assert_eq!(e.to_string(), format!("AMQP error: {driver}"));
        let source = e.source().expect("the driver's error");
        assert!(source.downcast_ref::<lapin::Error>().is_some());
        assert!(!e.is_permanent());
        assert!(!BrokerError::Lost("no answer".into()).is_permanent());
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
