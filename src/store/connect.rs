//! Every PostgreSQL connection Courier makes (pool, LISTEN, migrations, inbox, CLI, admin)
//! is opened here, by [`open`], from a [`PgTarget`]: the URL's libpq TLS keys read by
//! Courier, everything else (hosts, `target_session_attrs`, `options`…) by tokio-postgres.
//!
//! TLS follows libpq: `sslmode` is `disable`, `prefer` (the default), `require`,
//! `verify-ca` or `verify-full`; `sslrootcert` names the CA file (an explicit one makes
//! `prefer`/`require` check the chain, as libpq does), `sslcert`/`sslkey` a client
//! certificate. Each key falls back to libpq's environment variable (`PGSSLMODE`,
//! `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`). tokio-postgres itself knows neither the
//! `verify-*` modes nor the certificate keys, so they are taken out of the URL before it
//! parses the rest; the handshake runs over rustls.
//!
//! A failed connection is classified: TLS failures, refused authentication and a missing
//! database are permanent ([`StoreError::Rejected`]); anything else (refused, reset, timed
//! out, server starting up) is transient ([`StoreError::Connect`]). The message walks the
//! whole cause chain, so "error performing TLS handshake" comes with its reason.

use std::{error::Error as StdError, sync::Arc, time::Duration};

use diesel_async::{AsyncPgConnection, SimpleAsyncConnection};
use rustls::ClientConfig;
use tokio_postgres::{
    config::{Host, SslMode},
    error::SqlState,
};

use super::{
    tls::{client_config, Rustls, TlsHandshakeError, TlsMode},
    StoreError,
};
use crate::config::SecretUrl;

/// Where and how to connect: the parsed URL plus its TLS settings.
#[derive(Clone)]
pub(crate) struct PgTarget {
    url: SecretUrl,
    config: tokio_postgres::Config,
    tls: Option<Arc<ClientConfig>>,
    /// The TLS settings libpq's variables gave (the URL did not): a TLS failure names
    /// them, since the URL it shows does not.
    tls_from_env: Option<String>,
}

/// The TLS keys as read from the URL (or the environment).
#[derive(Debug, Default)]
struct TlsKeys {
    mode: Option<String>,
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl PgTarget {
    /// How long a connection may take at most: `timeout` for each host, tried in turn.
    pub(crate) fn connect_wait(&self, timeout: Duration) -> Duration {
        let hosts = host_count(&self.config).max(1);
        timeout.saturating_mul(u32::try_from(hosts).unwrap_or(u32::MAX))
    }

    /// Parses `url` (single- or multi-host) and loads the certificates it names. Every
    /// failure is permanent: no retry mends a bad URL or a missing file.
    pub(crate) fn parse(url: &SecretUrl) -> Result<PgTarget, StoreError> {
        let rejected = |reason: String| StoreError::Rejected {
            target: url.redacted(),
            reason: url.scrub(&reason),
        };
        let (rest, keys) = split_tls_keys(url.expose());
        let (rest, tcp) = split_tcp_keys(&rest).map_err(rejected)?;
        let rest = split_host_lists(&query_hosts_win(&rest));
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e: tokio_postgres::Error| rejected(cause_chain(&e)))?;
        if let Some(t) = tcp.user_timeout {
            config.tcp_user_timeout(t);
        }
        if let Some(n) = tcp.keepalives_count {
            config.keepalives_retries(n);
        }
        // What the driver checks only when it connects, named now: one port for every host
        // or one each (libpq's `?host=a,b&port=5432,5433` form counts them apart).
        let (hosts, ports) = (config.get_hosts().len(), config.get_ports().len());
        if ports > 1 && ports != hosts {
            return Err(rejected(format!(
                "{ports} ports for {hosts} host(s): give one port for all hosts, or one port per host"
            )));
        }
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let tls_from_env = from_env(&keys, env);
        let mode = match keys.mode.or_else(|| env("PGSSLMODE")) {
            Some(m) => TlsMode::parse(&m).map_err(rejected)?,
            None => TlsMode::Prefer,
        };
        let rootcert = keys.rootcert.or_else(|| env("PGSSLROOTCERT"));
        let cert = keys.cert.or_else(|| env("PGSSLCERT"));
        let key = keys.key.or_else(|| env("PGSSLKEY"));
        config.ssl_mode(match mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        let tls = match mode {
            TlsMode::Disable => None,
            _ => Some(Arc::new(
                client_config(mode, rootcert.as_deref(), cert.as_deref(), key.as_deref())
                    .map_err(rejected)?,
            )),
        };
        Ok(PgTarget {
            url: url.clone(),
            config,
            tls,
            tls_from_env,
        })
    }
}

/// Which of libpq's TLS variables `env` supplies that the URL's `keys` leave out, named
/// for an error: `PGSSLMODE` with its value, the file variables by name only.
fn from_env(keys: &TlsKeys, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let from_url = [
        keys.mode.is_some(),
        keys.rootcert.is_some(),
        keys.cert.is_some(),
        keys.key.is_some(),
    ];
    let used: Vec<String> = TLS_VARIABLES
        .into_iter()
        .zip(from_url)
        .filter(|(_, in_url)| !in_url)
        .filter_map(|(name, _)| {
            let value = env(name)?;
            Some(match name {
                "PGSSLMODE" => format!("{name}={value}"),
                _ => name.to_string(),
            })
        })
        .collect();
    (!used.is_empty()).then(|| used.join(", "))
}

/// libpq's TLS variables, which [`PgTarget::parse`] reads for what the URL leaves out.
const TLS_VARIABLES: [&str; 4] = ["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"];

/// Why `url` cannot be used, before anything connects: it does not parse, names an
/// unknown parameter or `sslmode`, or a certificate file it names cannot be read. The
/// reason names the TLS variables that were set, since their values count as the URL's.
pub(crate) fn check_url(url: &SecretUrl) -> Result<(), String> {
    let reason = match PgTarget::parse(url) {
        Ok(_) => return Ok(()),
        Err(StoreError::Rejected { reason, .. }) => reason,
        Err(e) => e.to_string(),
    };
    let set: Vec<&str> = TLS_VARIABLES
        .into_iter()
        .filter(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
        .collect();
    Err(match set.as_slice() {
        [] => reason,
        set => format!("{reason}; with {} set in the environment", set.join(", ")),
    })
}

/// libpq lets a URL's query name `host` and `port`, and a value there replaces the
/// authority's (`postgres://h1,h2/db?port=5433`: both hosts on 5433). The driver adds them
/// to the authority's instead, with a 5432 for every host written without a port, and
/// counted three ports for two hosts there. So when the query names either, the
/// authority's hosts and ports move into the query, where the query's own win; the result
/// has an empty authority host, which the driver reads as "hosts from the query".
fn query_hosts_win(raw: &str) -> String {
    let Some((scheme, after)) = raw.split_once("://") else {
        return raw.to_string();
    };
    let end = after.find(['/', '?']).unwrap_or(after.len());
    let (authority, tail) = after.split_at(end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((user, hosts)) => (Some(user), hosts),
        None => (None, authority),
    };
    let (_, kept, query) = take_query_keys(raw, &["host", "port"]);
    let last = |key: &str| {
        query
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let (query_host, query_port) = (last("host"), last("port"));
    if hosts.is_empty() || (query_host.is_none() && query_port.is_none()) {
        return raw.to_string();
    }
    let (names, ports): (Vec<&str>, Vec<&str>) = hosts.split(',').map(host_and_port).unzip();
    let host = query_host.unwrap_or_else(|| names.join(","));
    let port = query_port.unwrap_or_else(|| ports.join(","));
    let (path, _) = tail.split_once('?').unwrap_or((tail, ""));
    let encode = |v: &str| url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    let mut pairs: Vec<String> = kept.iter().map(|p| p.to_string()).collect();
    pairs.push(format!("host={}", encode(&host)));
    pairs.push(format!("port={}", encode(&port)));
    let user = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    format!("{scheme}://{user}{path}?{}", pairs.join("&"))
}

/// One host of a URL's authority and its port (empty when not written): `h`, `h:5433`,
/// `[::1]:5433`.
fn host_and_port(chunk: &str) -> (&str, &str) {
    if let Some(rest) = chunk.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host, after.strip_prefix(':').unwrap_or(""));
        }
    }
    chunk.split_once(':').unwrap_or((chunk, ""))
}

/// libpq's `?host=a,b` (and `hostaddr=`) lists, as the repeated keys the driver reads
/// (it takes `a,b` for one host name).
fn split_host_lists(raw: &str) -> String {
    let (head, mut kept, taken) = take_query_keys(raw, &["host", "hostaddr"]);
    if taken.is_empty() {
        return raw.to_string();
    }
    let split: Vec<String> = taken
        .iter()
        .flat_map(|(k, v)| {
            v.split(',').map(move |one| {
                let one: String = url::form_urlencoded::byte_serialize(one.as_bytes()).collect();
                format!("{k}={one}")
            })
        })
        .collect();
    kept.extend(split.iter().map(String::as_str));
    format!("{head}?{}", kept.join("&"))
}

/// Takes libpq's TLS keys out of a URL's query string (tokio-postgres rejects
/// `verify-*` and does not know the certificate keys); returns the rest and the keys.
fn split_tls_keys(raw: &str) -> (String, TlsKeys) {
    let mut keys = TlsKeys::default();
    let (head, kept, taken) =
        take_query_keys(raw, &["sslmode", "sslrootcert", "sslcert", "sslkey"]);
    for (name, value) in taken {
        let slot = match name.as_str() {
            "sslmode" => &mut keys.mode,
            "sslrootcert" => &mut keys.rootcert,
            "sslcert" => &mut keys.cert,
            _ => &mut keys.key,
        };
        *slot = Some(value);
    }
    (with_query(head, &kept), keys)
}

/// libpq's TCP keys that the driver reads otherwise (see [`split_tcp_keys`]).
#[derive(Debug, Default, PartialEq)]
struct TcpKeys {
    user_timeout: Option<Duration>,
    keepalives_count: Option<u32>,
}

/// Takes out the TCP keys whose meaning the driver does not share with libpq:
/// `tcp_user_timeout` is milliseconds in libpq and seconds in the driver (a libpq URL's
/// `30000`, 30 s, would have been over 8 hours; `0` is the system's default), and libpq's
/// `keepalives_count` is the driver's `keepalives_retries` (which refused the URL).
fn split_tcp_keys(raw: &str) -> Result<(String, TcpKeys), String> {
    let (head, kept, taken) = take_query_keys(raw, &["tcp_user_timeout", "keepalives_count"]);
    let mut keys = TcpKeys::default();
    for (name, value) in taken {
        let n: u32 = value
            .trim()
            .parse()
            .map_err(|_| format!("`{name}` must be a whole number, not `{value}`"))?;
        match name.as_str() {
            "tcp_user_timeout" => {
                keys.user_timeout = (n > 0).then(|| Duration::from_millis(n.into()))
            }
            _ => keys.keepalives_count = Some(n),
        }
    }
    Ok((with_query(head, &kept), keys))
}

/// `head` with the query pairs `kept`, if any.
fn with_query(head: &str, kept: &[&str]) -> String {
    match kept.is_empty() {
        true => head.to_string(),
        false => format!("{head}?{}", kept.join("&")),
    }
}

/// Splits a database URL as text (a libpq multi-host URL is no valid WHATWG URL, and
/// everything before `?` must stay as written): what stands before `?`, the query pairs
/// kept as written, and the decoded values of the keys named in `take`, in order (a key
/// given twice appears twice; the last one wins where that matters).
pub(crate) fn take_query_keys<'a>(
    raw: &'a str,
    take: &[&str],
) -> (&'a str, Vec<&'a str>, Vec<(String, String)>) {
    let (head, query) = raw.split_once('?').unwrap_or((raw, ""));
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match url::form_urlencoded::parse(pair.as_bytes()).next() {
            Some((k, v)) if take.contains(&k.as_ref()) => {
                taken.push((k.into_owned(), v.into_owned()))
            }
            _ => kept.push(pair),
        }
    }
    (head, kept, taken)
}

/// SQLSTATEs at connection time that no retry mends.
fn permanent_state(code: &SqlState) -> bool {
    [
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        SqlState::INVALID_CATALOG_NAME,
        SqlState::INSUFFICIENT_PRIVILEGE,
    ]
    .contains(code)
}

/// Whether a failed connection attempt is permanent (see the module docs).
fn is_permanent(e: &tokio_postgres::Error) -> bool {
    if let Some(db) = e.as_db_error() {
        return permanent_state(db.code());
    }
    let mut cause = e.source();
    while let Some(c) = cause {
        if let Some(h) = c.downcast_ref::<TlsHandshakeError>() {
            return h.is_tls_failure();
        }
        if refused_certificate(c) {
            return true;
        }
        cause = c.source();
    }
    // "server does not support TLS" (sslmode=require against a plain server), a bad
    // connection string or configuration.
    let top = e.to_string();
    [
        "error performing TLS handshake",
        "invalid connection string",
        "invalid configuration",
    ]
    .iter()
    .any(|p| top.starts_with(p))
}

/// A fatal alert from the server about this client's certificate. With TLS 1.3 the server
/// checks the client's certificate after the client considers the handshake done, so its
/// refusal arrives on the first read, as an I/O error, not as a handshake error.
fn refused_certificate(cause: &(dyn StdError + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let tls = cause
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .or_else(|| cause.downcast_ref::<rustls::Error>());
    matches!(
        tls,
        Some(rustls::Error::AlertReceived(
            A::BadCertificate
                | A::UnsupportedCertificate
                | A::CertificateRevoked
                | A::CertificateExpired
                | A::CertificateUnknown
                | A::UnknownCA
                | A::AccessDenied
                | A::CertificateRequired
        ))
    )
}

/// An error and its causes, `a: b: c`, each cause left out when the text already has it.
pub(crate) fn cause_chain(e: &dyn StdError) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        cause = c.source();
    }
    out
}

/// The hosts `config` names, by name or by address.
fn host_count(config: &tokio_postgres::Config) -> usize {
    config.get_hosts().len().max(config.get_hostaddrs().len())
}

/// One config per host of `config`, in order, each with everything else `config` says.
/// The driver bounds only a host's TCP connect by `connect_timeout`; a host that accepts
/// the connection and then never answers (a frozen primary) would hold the whole attempt
/// and the next host would never be tried. libpq applies the timeout to each host.
fn per_host(config: &tokio_postgres::Config) -> Vec<tokio_postgres::Config> {
    let (hosts, addrs, ports) = (
        config.get_hosts(),
        config.get_hostaddrs(),
        config.get_ports(),
    );
    let n = host_count(config);
    if n <= 1 {
        return vec![config.clone()];
    }
    (0..n)
        .map(|i| {
            let mut one = tokio_postgres::Config::new();
            if let Some(user) = config.get_user() {
                one.user(user);
            }
            if let Some(password) = config.get_password() {
                one.password(password);
            }
            if let Some(dbname) = config.get_dbname() {
                one.dbname(dbname);
            }
            if let Some(options) = config.get_options() {
                one.options(options);
            }
            if let Some(name) = config.get_application_name() {
                one.application_name(name);
            }
            one.ssl_mode(config.get_ssl_mode())
                .ssl_negotiation(config.get_ssl_negotiation())
                .keepalives(config.get_keepalives())
                .keepalives_idle(config.get_keepalives_idle())
                .target_session_attrs(config.get_target_session_attrs())
                .channel_binding(config.get_channel_binding())
                .load_balance_hosts(config.get_load_balance_hosts());
            if let Some(t) = config.get_connect_timeout() {
                one.connect_timeout(*t);
            }
            if let Some(t) = config.get_tcp_user_timeout() {
                one.tcp_user_timeout(*t);
            }
            if let Some(t) = config.get_keepalives_interval() {
                one.keepalives_interval(t);
            }
            if let Some(n) = config.get_keepalives_retries() {
                one.keepalives_retries(n);
            }
            match hosts.get(i) {
                Some(Host::Tcp(h)) => {
                    one.host(h);
                }
                Some(Host::Unix(path)) => {
                    one.host_path(path);
                }
                None => {}
            }
            if let Some(addr) = addrs.get(i) {
                one.hostaddr(*addr);
            }
            // One port for every host, or one each (the driver checked the counts).
            if let Some(port) = ports.get(i).or(ports.first().filter(|_| ports.len() == 1)) {
                one.port(*port);
            }
            one
        })
        .collect()
}

/// Opens one connection to `target`, trying its hosts in order, each bounded by
/// `timeout`, as libpq does: a host that cannot be reached, does not answer in time or is
/// not what `target_session_attrs` asks for gives way to the next; a refusal (TLS,
/// authentication, missing database) ends the attempt, as in libpq.
pub(crate) async fn open(
    target: &PgTarget,
    timeout: Duration,
) -> Result<AsyncPgConnection, StoreError> {
    let configs = per_host(&target.config);
    let mut failures = Vec::new();
    for config in &configs {
        match open_one(target, config, timeout).await {
            Ok(conn) => return Ok(conn),
            Err(e @ StoreError::Rejected { .. }) => return Err(e),
            Err(e) => failures.push((host_label(config), e)),
        }
    }
    // Every host's failure, as libpq lists them: the last alone ("database does not allow
    // writes" from a standby) hid that the primary before it did not answer at all.
    match failures.len() {
        0 => Err(StoreError::Connect {
            target: target.url.redacted(),
            reason: "the URL names no host".into(),
        }),
        1 => Err(failures.remove(0).1),
        _ => Err(StoreError::Connect {
            target: target.url.redacted(),
            reason: failures
                .iter()
                .map(|(host, e)| match e {
                    StoreError::Connect { reason, .. } => format!("{host}: {reason}"),
                    other => format!("{host}: {other}"),
                })
                .collect::<Vec<_>>()
                .join("; "),
        }),
    }
}

/// Whether TLS settings may be why a connection was refused for good (`permanent`, from
/// [`is_permanent`]): a permanent failure that is not the server's answer is TLS's own, and of the server's answers
/// `pg_hba.conf`'s may be too (no entry, or a `reject` line, for the connection's TLS or
/// lack of it: a `hostssl`-only server and `sslmode=disable`), while a wrong password or a
/// missing database is not.
fn tls_may_explain(e: &tokio_postgres::Error, permanent: bool) -> bool {
    match e.as_db_error() {
        None => permanent,
        Some(db) => {
            *db.code() == tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                && ["no pg_hba.conf entry", "pg_hba.conf rejects connection"]
                    .iter()
                    .any(|p| db.message().starts_with(p))
        }
    }
}

/// `host:port` of a one-host config, for naming it in an error.
fn host_label(config: &tokio_postgres::Config) -> String {
    let host = match (config.get_hosts().first(), config.get_hostaddrs().first()) {
        (Some(tokio_postgres::config::Host::Tcp(name)), _) => name.clone(),
        (Some(tokio_postgres::config::Host::Unix(path)), _) => path.display().to_string(),
        (None, Some(addr)) => addr.to_string(),
        (None, None) => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}")
}

/// [`open`] for one host's config.
async fn open_one(
    target: &PgTarget,
    config: &tokio_postgres::Config,
    timeout: Duration,
) -> Result<AsyncPgConnection, StoreError> {
    let url = &target.url;
    let attempt = async {
        let (client, mut connection) =
            config
                .connect(Rustls(target.tls.clone()))
                .await
                .map_err(|e| {
                    let mut reason = url.scrub(&cause_chain(&e));
                    let permanent = is_permanent(&e);
                    if let (true, Some(vars)) =
                        (tls_may_explain(&e, permanent), &target.tls_from_env)
                    {
                        reason.push_str(&format!(
                            " (TLS set by the environment, not the URL: {vars})"
                        ));
                    }
                    match permanent {
                        true => StoreError::Rejected {
                            target: url.redacted(),
                            reason,
                        },
                        false => StoreError::Connect {
                            target: url.redacted(),
                            reason,
                        },
                    }
                })?;
        let lost = |e: &dyn StdError| StoreError::Connect {
            target: url.redacted(),
            reason: format!(
                "connected, but its set-up failed: {}",
                url.scrub(&cause_chain(e))
            ),
        };
        // diesel-async's set-up (`SET TIME ZONE`, `SET CLIENT_ENCODING`) uses prepared
        // statements: inside one transaction, a transaction-mode pooler keeps their
        // prepare and execute on one server connection. Harmless without a pooler.
        // The connection is not driven yet (diesel-async spawns its driver): poll it here
        // until `BEGIN` is answered.
        {
            let begin = client.batch_execute("BEGIN");
            tokio::pin!(begin);
            loop {
                tokio::select! {
                    done = &mut begin => break done.map_err(|e| lost(&e))?,
                    message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                        Some(Ok(_notice)) => {}
                        Some(Err(e)) => return Err(lost(&e)),
                        None => return Err(StoreError::Connect {
                            target: url.redacted(),
                            reason: "connection closed during set-up".into(),
                        }),
                    },
                }
            }
        }
        let mut conn = AsyncPgConnection::try_from_client_and_connection(client, connection)
            .await
            .map_err(|e| lost(&e))?;
        conn.batch_execute("COMMIT").await.map_err(|e| lost(&e))?;
        Ok(conn)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(StoreError::Connect {
            target: url.redacted(),
            reason: format!("no answer within {}", humantime::format_duration(timeout)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_failure_names_the_variables_the_url_left_to_the_environment() {
        let env = |name: &str| match name {
            "PGSSLMODE" => Some("verify-full".to_string()),
            "PGSSLROOTCERT" => Some("/etc/ca.pem".to_string()),
            _ => None,
        };
        assert_eq!(
            from_env(&TlsKeys::default(), env).as_deref(),
            Some("PGSSLMODE=verify-full, PGSSLROOTCERT")
        );
        let url_mode = TlsKeys {
            mode: Some("require".into()),
            ..TlsKeys::default()
        };
        assert_eq!(from_env(&url_mode, env).as_deref(), Some("PGSSLROOTCERT"));
        assert_eq!(from_env(&TlsKeys::default(), |_| None), None);
    }

    #[test]
    fn libpqs_tcp_keys_keep_libpqs_units_and_names() {
        let url = SecretUrl::new(
            "postgres://u@h1,h2/db?tcp_user_timeout=30000&keepalives_idle=30&keepalives_count=3",
        );
        let target = PgTarget::parse(&url).expect("parses");
        assert_eq!(
            target.config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(30)),
            "milliseconds, as in libpq"
        );
        assert_eq!(target.config.get_keepalives_retries(), Some(3));
        assert_eq!(target.config.get_keepalives_idle(), Duration::from_secs(30));
        for config in per_host(&target.config) {
            assert_eq!(
                config.get_tcp_user_timeout(),
                Some(&Duration::from_secs(30))
            );
            assert_eq!(config.get_keepalives_retries(), Some(3));
        }
        let zero = PgTarget::parse(&SecretUrl::new("postgres://u@h/db?tcp_user_timeout=0"));
        assert_eq!(zero.expect("parses").config.get_tcp_user_timeout(), None);
        let bad = PgTarget::parse(&SecretUrl::new("postgres://u@h/db?keepalives_count=lots"));
        let reason = match bad {
            Err(StoreError::Rejected { reason, .. }) => reason,
            Err(other) => panic!("rejected otherwise: {other}"),
            Ok(_) => panic!("a count that is no number was taken"),
        };
        assert!(
            reason.contains("`keepalives_count` must be a whole number, not `lots`"),
            "{reason}"
        );
    }

    #[test]
    fn tls_keys_are_taken_out_and_the_rest_kept() {
        let (rest, keys) = split_tls_keys(
            "postgres://u:p@h1:5432,h2:5433/db?sslmode=verify-full&target_session_attrs=read-write&sslrootcert=%2Ftmp%2Fca.pem",
        );
        assert_eq!(
            rest,
            "postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write"
        );
        assert_eq!(keys.mode.as_deref(), Some("verify-full"));
        assert_eq!(keys.rootcert.as_deref(), Some("/tmp/ca.pem"));
        let (rest, _) = split_tls_keys("postgres://h/db?sslmode=disable");
        assert_eq!(rest, "postgres://h/db");
    }

    #[test]
    fn as_many_ports_as_hosts_or_one_for_all() {
        let parse = |u: &str| PgTarget::parse(&SecretUrl::new(u)).map(drop);
        let e = parse(
            "postgresql:///postgres?host=127.0.0.1,127.0.0.1&port=5443,5444,5445&sslmode=disable",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("3 ports for 2 host(s)"), "{e}");
        assert!(parse("postgresql:///postgres?host=a,b&port=5443&sslmode=disable").is_ok());
        // As libpq: the query's port replaces the authority's, for every host (an outside
        // audit: "3 ports for 2 host(s)" for one port given).
        let hosts_and_ports = |u: &str| {
            let t = PgTarget::parse(&SecretUrl::new(u)).expect(u);
            per_host(&t.config)
                .iter()
                .map(|c| (c.get_hosts().to_vec(), c.get_ports().to_vec()))
                .collect::<Vec<_>>()
        };
        let on = |h: &str, p: u16| (vec![Host::Tcp(h.into())], vec![p]);
        assert_eq!(
            hosts_and_ports("postgres://u:p@127.0.0.1,127.0.0.2/db?port=5943&sslmode=disable"),
            [on("127.0.0.1", 5943), on("127.0.0.2", 5943)]
        );
        assert_eq!(
            hosts_and_ports("postgres://u@h1:5441,[::1]/db?port=5441,5442&sslmode=disable"),
            [on("h1", 5441), on("::1", 5442)]
        );
        // The query's host replaces the authority's; the authority's ports stay.
        assert_eq!(
            hosts_and_ports("postgres://old1:5441,old2:5442/db?host=a,b&sslmode=disable"),
            [on("a", 5441), on("b", 5442)]
        );
        // Hosts without ports and no query key: each its default, as before.
        assert_eq!(
            hosts_and_ports("postgres://h1,h2/db?sslmode=disable"),
            [on("h1", 5432), on("h2", 5432)]
        );
        let e = parse("postgres://h1,h2/db?port=1,2,3&sslmode=disable")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("3 ports for 2 host(s)"), "{e}");
        // libpq's comma list in the query, as the driver's repeated keys.
        let t = PgTarget::parse(&SecretUrl::new(
            "postgresql:///postgres?host=h1,h2&port=5443,5444&sslmode=disable",
        ))
        .unwrap();
        let each: Vec<_> = per_host(&t.config)
            .iter()
            .map(|c| (c.get_hosts().to_vec(), c.get_ports().to_vec()))
            .collect();
        assert_eq!(
            each,
            [
                (vec![Host::Tcp("h1".into())], vec![5443]),
                (vec![Host::Tcp("h2".into())], vec![5444])
            ]
        );
    }

    #[test]
    fn a_certificate_alert_from_the_server_is_a_refusal() {
        let alert = |a| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(a),
            )
        };
        assert!(refused_certificate(&alert(
            rustls::AlertDescription::UnknownCA
        )));
        assert!(refused_certificate(&alert(
            rustls::AlertDescription::CertificateExpired
        )));
        assert!(!refused_certificate(&alert(
            rustls::AlertDescription::CloseNotify
        )));
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(!refused_certificate(&reset));
    }

    #[test]
    fn each_host_gets_a_config_of_its_own_with_everything_else_kept() {
        let t = PgTarget::parse(&SecretUrl::new(
            "postgres://u:pw@h1:5441,h2:5442/db?target_session_attrs=read-write&sslmode=disable&application_name=a&connect_timeout=2",
        ))
        .unwrap();
        let each = per_host(&t.config);
        assert_eq!(each.len(), 2);
        for (one, (host, port)) in each.iter().zip([("h1", 5441), ("h2", 5442)]) {
            assert_eq!(one.get_hosts(), &[Host::Tcp(host.into())]);
            assert_eq!(one.get_ports(), &[port]);
            assert_eq!(one.get_user(), Some("u"));
            assert_eq!(one.get_password(), Some(&b"pw"[..]));
            assert_eq!(one.get_dbname(), Some("db"));
            assert_eq!(one.get_application_name(), Some("a"));
            assert_eq!(one.get_connect_timeout(), Some(&Duration::from_secs(2)));
            assert_eq!(
                one.get_target_session_attrs(),
                tokio_postgres::config::TargetSessionAttrs::ReadWrite
            );
        }
    }

    #[test]
    fn multi_host_urls_parse_and_bad_modes_are_permanent() {
        let t = PgTarget::parse(&SecretUrl::new(
            "postgres://postgres@127.0.0.1:5432,127.0.0.1:5433/db?target_session_attrs=read-write&sslmode=disable",
        ))
        .unwrap();
        assert_eq!(t.config.get_hosts().len(), 2);
        let e = PgTarget::parse(&SecretUrl::new("postgres://u:secret@h/db?sslmode=maybe"))
            .err()
            .unwrap();
        assert!(!e.is_transient());
        assert!(e.to_string().contains("sslmode `maybe`"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = PgTarget::parse(&SecretUrl::new(
            "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ))
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
