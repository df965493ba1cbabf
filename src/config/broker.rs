//! `broker.*`: the RabbitMQ nodes to connect to and how to reach them over TLS.
//!
//! `broker.url` is one URL or a list of them (the nodes of a cluster): a YAML list, or a
//! comma-separated string (which is how `COURIER_BROKER_URL` gives a list). Every URL is a
//! [`SecretUrl`], so each of them is redacted wherever the list is shown.

use std::{fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{ConfigError, SecretUrl};

/// `broker.*`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// `amqp://` or `amqps://` URL, or several (the nodes of a cluster, tried in order).
    pub url: BrokerUrls,
    /// Heartbeat interval negotiated with the broker.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Name shown in the management UI.
    pub connection_name: String,
    /// Bound on one connection attempt, and on how long a batch of publishes may go without
    /// one write completing before the connection is presumed dead.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS for `amqps://` URLs (a URL's own query parameters win).
    pub tls: BrokerTls,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            url: BrokerUrls::from(SecretUrl::new("amqp://guest:guest@127.0.0.1:5672/%2f")),
            heartbeat: Duration::from_secs(10),
            connection_name: "courier".into(),
            connect_timeout: Duration::from_secs(5),
            tls: BrokerTls::default(),
        }
    }
}

/// `broker.tls.*`: the keys of RabbitMQ's URI query parameters of the same names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerTls {
    /// PEM file of the CA certificates trusted for the broker's certificate; null: the
    /// system's trust store.
    pub cacertfile: Option<PathBuf>,
    /// PEM file of the client certificate (chain) presented to the broker; null: none.
    pub certfile: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub keyfile: Option<PathBuf>,
    /// `verify_peer` checks the broker's certificate; `verify_none` turns that off.
    pub verify: TlsVerify,
    /// Name sent as SNI and checked against the broker's certificate; null: the URL's host;
    /// `disable`: no SNI (the URL's host is still checked).
    pub server_name_indication: Option<String>,
}

/// Whether the broker's certificate is checked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsVerify {
    /// Check the certificate chain and the name (the default).
    #[default]
    VerifyPeer,
    /// Accept any certificate: encryption without authentication of the broker.
    VerifyNone,
}

/// One broker URL or several: the nodes tried in order, round robin after a loss.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrls(Vec<SecretUrl>);

impl BrokerUrls {
    /// The URLs, in order.
    pub fn iter(&self) -> impl Iterator<Item = &SecretUrl> {
        self.0.iter()
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none (rejected by validation).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The URL of node `index` (modulo the number of nodes).
    pub fn get(&self, index: usize) -> Option<&SecretUrl> {
        match self.0.len() {
            0 => None,
            n => self.0.get(index % n),
        }
    }

    /// Parses a comma-separated list (what `COURIER_BROKER_URL` holds).
    pub fn parse_list(raw: &str) -> BrokerUrls {
        BrokerUrls(raw.split(',').map(str::trim).map(SecretUrl::new).collect())
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            return Err(ConfigError::invalid(
                "broker.url",
                "must name at least one URL",
            ));
        }
        for url in &self.0 {
            if url.expose().is_empty() {
                return Err(ConfigError::invalid(
                    "broker.url",
                    "has an empty entry in its list",
                ));
            }
            super::check_url_scheme("broker.url", url, &["amqp", "amqps"])?;
            check_query(url)?;
        }
        Ok(())
    }
}

/// The query parameters of RabbitMQ's URI spec that Courier reads: lapin's, and the TLS ones
/// (`broker/tls.rs`). Any other is refused, as `database.url` refuses libpq options it does
/// not know: a misspelt `hearbeat=5` would otherwise be dropped without a word.
const QUERY_KEYS: [&str; 10] = [
    "heartbeat",
    "connection_timeout",
    "channel_max",
    "frame_max",
    "auth_mechanism",
    "cacertfile",
    "certfile",
    "keyfile",
    "verify",
    "server_name_indication",
];

/// The query parameters that only mean something for `amqps://`.
const TLS_QUERY_KEYS: [&str; 5] = [
    "cacertfile",
    "certfile",
    "keyfile",
    "verify",
    "server_name_indication",
];

/// AMQP 0-9-1's smallest `frame_max` a peer may propose (below it the broker refuses the
/// connection with a frame error, which looked like a broker that is not reachable).
const MIN_FRAME_MAX: u32 = 4096;

/// What the connection will parse, query parameters included: `heartbeat=abc` would
/// otherwise fail every connection attempt, retried as if the broker were away.
fn check_query(url: &SecretUrl) -> Result<(), ConfigError> {
    let invalid =
        |problem: String| ConfigError::invalid("broker.url", format!("{problem} (url: {url})"));
    if let Ok(parsed) = url::Url::parse(url.expose()) {
        if parsed.fragment().is_some() {
            return Err(invalid(
                "has a fragment (`#…`), which an AMQP URI does not have: nothing after `#` is \
                 read (a query parameter goes after `?`, joined by `&`)"
                    .to_string(),
            ));
        }
        let mut seen = Vec::new();
        for (key, value) in parsed.query_pairs() {
            if seen.contains(&key) {
                return Err(invalid(format!(
                    "has query parameter `{}` twice; give it once",
                    url.scrub(&key)
                )));
            }
            seen.push(key.clone());
            if parsed.scheme() == "amqp" && TLS_QUERY_KEYS.contains(&&*key) {
                return Err(invalid(format!(
                    "has the TLS query parameter `{key}` on a plain amqp:// URL, where it does \
                     nothing; use amqps:// (port 5671) for TLS, or drop it"
                )));
            }
            let (fits, range) = match &*key {
                "heartbeat" => (value.parse::<u16>().is_ok(), "0–65535 seconds"),
                "channel_max" => (value.parse::<u16>().is_ok(), "0–65535"),
                "frame_max" => (
                    value
                        .parse::<u32>()
                        .is_ok_and(|v| v == 0 || v >= MIN_FRAME_MAX),
                    "0 for the broker's, else at least AMQP's minimum of 4096 bytes",
                ),
                "connection_timeout" => (value.parse::<u64>().is_ok(), "milliseconds"),
                "verify" => {
                    if !matches!(&*value, "verify_peer" | "verify_none") {
                        return Err(invalid(format!(
                            "has query parameter `verify={}`: expected verify_peer or \
                             verify_none",
                            url.scrub(&value)
                        )));
                    }
                    (true, "")
                }
                known if QUERY_KEYS.contains(&known) => (true, ""),
                other => {
                    return Err(invalid(format!(
                        "has query parameter `{}`, which Courier does not read (a typo?); \
                         it reads {}",
                        url.scrub(other),
                        QUERY_KEYS.join(", ")
                    )))
                }
            };
            if !fits {
                return Err(invalid(format!(
                    "has query parameter `{key}={}`, which is not a whole number ({range})",
                    url.scrub(&value)
                )));
            }
        }
    }
    match url.expose().parse::<lapin::uri::AMQPUri>() {
        Ok(_) => Ok(()),
        Err(why) => Err(invalid(format!(
            "is not a valid AMQP URI: {}",
            url.scrub(&why)
        ))),
    }
}

impl From<SecretUrl> for BrokerUrls {
    fn from(url: SecretUrl) -> Self {
        BrokerUrls(vec![url])
    }
}

impl From<Vec<SecretUrl>> for BrokerUrls {
    fn from(urls: Vec<SecretUrl>) -> Self {
        BrokerUrls(urls)
    }
}

/// Every URL redacted, comma-separated.
impl fmt::Display for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.0.iter().map(SecretUrl::redacted).collect();
        f.write_str(&shown.join(","))
    }
}

impl fmt::Debug for BrokerUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BrokerUrls({self})")
    }
}

impl Serialize for BrokerUrls {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for BrokerUrls {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d)? {
            OneOrMany::One(raw) => Ok(BrokerUrls::parse_list(&raw)),
            OneOrMany::Many(list) => Ok(BrokerUrls(
                list.into_iter().map(|u| SecretUrl::new(u.trim())).collect(),
            )),
        }
    }
}
