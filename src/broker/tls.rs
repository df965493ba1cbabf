//! TLS for `amqps://` URLs: RabbitMQ's URI query parameters (`cacertfile`, `certfile`,
//! `keyfile`, `verify`, `server_name_indication`) over the `broker.tls` keys, turned into a
//! rustls client configuration.
//!
//! Without any of them, lapin's own TLS is used (the system's trust store, no client
//! certificate), exactly as before. With a `cacertfile` only that CA is trusted — a broker
//! with a certificate from elsewhere is refused. `verify_none` is the only way to skip the
//! check of the broker's certificate, and only when asked for.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use lapin::tcp::{RustlsConnector, RustlsConnectorConfig};
use rustls::{
    client::ResolvesClientCert,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    sign::CertifiedKey,
    SignatureScheme,
};

use crate::config::{BrokerTls, TlsVerify};

/// The TLS settings of one URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsOptions {
    cacertfile: Option<PathBuf>,
    certfile: Option<PathBuf>,
    keyfile: Option<PathBuf>,
    verify: TlsVerify,
    server_name: Option<String>,
    sni: bool,
}

impl TlsOptions {
    /// `cfg` with the URL's own query parameters laid over it.
    pub(crate) fn for_url(url: &url::Url, cfg: &BrokerTls) -> Result<TlsOptions, String> {
        let mut opts = TlsOptions {
            cacertfile: cfg.cacertfile.clone(),
            certfile: cfg.certfile.clone(),
            keyfile: cfg.keyfile.clone(),
            verify: cfg.verify,
            server_name: None,
            sni: true,
        };
        let mut sni = cfg.server_name_indication.clone();
        for (key, value) in url.query_pairs() {
            match &*key {
                "cacertfile" => opts.cacertfile = Some(PathBuf::from(&*value)),
                "certfile" => opts.certfile = Some(PathBuf::from(&*value)),
                "keyfile" => opts.keyfile = Some(PathBuf::from(&*value)),
                "verify" => {
                    opts.verify = match &*value {
                        "verify_peer" => TlsVerify::VerifyPeer,
                        "verify_none" => TlsVerify::VerifyNone,
                        other => {
                            return Err(format!(
                                "verify={other}: expected verify_peer or verify_none"
                            ))
                        }
                    }
                }
                "server_name_indication" => sni = Some(value.into_owned()),
                _ => {}
            }
        }
        match sni.as_deref() {
            Some("disable") => opts.sni = false,
            Some(name) => opts.server_name = Some(name.to_string()),
            None => {}
        }
        if opts.certfile.is_some() != opts.keyfile.is_some() {
            return Err("certfile and keyfile go together: give both or neither".into());
        }
        Ok(opts)
    }

    /// Whether nothing differs from lapin's own TLS (system roots, no client certificate).
    pub(crate) fn is_default(&self) -> bool {
        *self
            == TlsOptions {
                cacertfile: None,
                certfile: None,
                keyfile: None,
                verify: TlsVerify::VerifyPeer,
                server_name: None,
                sni: true,
            }
    }

    /// The name checked in the broker's certificate (and sent as SNI).
    pub(crate) fn server_name(&self, host: &str) -> String {
        self.server_name.clone().unwrap_or_else(|| host.to_string())
    }

    /// The connector these options describe, and — when it has no client certificate — a
    /// flag raised if the broker asks for one. Reads the PEM files now, so a rotated
    /// certificate is picked up by the next connection.
    ///
    /// Why the flag: with TLS 1.3 the broker checks the client certificate only after the
    /// client finished its handshake, so its `certificate_required` alert races with the
    /// first AMQP bytes and the client often sees a bare "connection reset". The flag lets
    /// the error say what happened either way.
    pub(crate) fn connector(&self) -> Result<(RustlsConnector, Option<CertAsked>), String> {
        let identity = match (&self.certfile, &self.keyfile) {
            (Some(cert), Some(key)) => Some((read_certs(cert)?, read_key(key)?)),
            _ => None,
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS set-up: {e}"))?;
        let builder = match (self.verify, &self.cacertfile) {
            (TlsVerify::VerifyNone, _) => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(crate::tls::AcceptAnyCertificate(
                        provider,
                    )))
            }
            (TlsVerify::VerifyPeer, Some(ca)) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs(ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("cacertfile {}: {e}", ca.display()))?;
                }
                builder.with_root_certificates(roots)
            }
            (TlsVerify::VerifyPeer, None) => {
                // The system's trust store, as lapin does it; SNI cannot be turned off here.
                let config = RustlsConnectorConfig::new_with_platform_verifier();
                let connector = match identity {
                    Some((certs, key)) => config.connector_with_single_cert(certs, key),
                    None => config.connector_with_no_client_auth(),
                };
                return connector
                    .map(|c| (c, None))
                    .map_err(|e| format!("TLS set-up: {e}"));
            }
        };
        let (mut config, asked) = match identity {
            Some((certs, key)) => (
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("certfile/keyfile: {e}"))?,
                None,
            ),
            None => {
                let asked = CertAsked::default();
                let resolver = Arc::new(NoClientCert(asked.clone()));
                (builder.with_client_cert_resolver(resolver), Some(asked))
            }
        };
        config.enable_sni = self.sni;
        Ok((RustlsConnector::from(config), asked))
    }
}

fn read_certs(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &PathBuf) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

/// Raised when the broker asked for a client certificate and none was configured.
#[derive(Debug, Clone, Default)]
pub(crate) struct CertAsked(Arc<AtomicBool>);

impl CertAsked {
    pub(crate) fn raised(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// No client certificate; notes that the broker asked for one (rustls then sends none).
#[derive(Debug)]
struct NoClientCert(CertAsked);

impl ResolvesClientCert for NoClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0 .0.store(true, Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// Whether the server at `host:port` answers a TLS ClientHello as a TLS server does: with a
/// handshake record or an alert (content type 22 or 21, protocol version 3.x).
///
/// Why: aimed with `amqp://` at a TLS port, the node answers AMQP's protocol header with a
/// TLS alert and closes at once, and that close often reaches the client as a reset before
/// the alert is read — the attempt then looks like a node going away, which retrying might
/// mend. A ClientHello gets a TLS answer that then waits for the client, so this probe's
/// verdict does not depend on that race. False on any failure to connect, send or read.
pub(crate) async fn speaks_tls(host: &str, port: u16, within: std::time::Duration) -> bool {
    let Some(hello) = client_hello(host) else {
        return false;
    };
    let probe = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream.write_all(&hello).await?;
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await?;
        Ok::<_, std::io::Error>(matches!(head, [21 | 22, 3]))
    };
    matches!(tokio::time::timeout(within, probe).await, Ok(Ok(true)))
}

/// The first bytes a rustls client sends to `host`: its ClientHello record.
fn client_hello(host: &str) -> Option<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::tls::AcceptAnyCertificate(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .or_else(|_| rustls::pki_types::ServerName::try_from("localhost"))
        .ok()?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).ok()?;
    Some(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(url: &str, cfg: &BrokerTls) -> Result<TlsOptions, String> {
        TlsOptions::for_url(&url::Url::parse(url).unwrap(), cfg)
    }

    #[test]
    fn url_parameters_win_over_config_keys() {
        let cfg = BrokerTls {
            cacertfile: Some("/etc/ca.pem".into()),
            ..BrokerTls::default()
        };
        let o = opts(
            "amqps://h/%2f?cacertfile=/x/ca.pem&certfile=/x/c.pem&keyfile=/x/k.pem&server_name_indication=rabbit.local",
            &cfg,
        )
        .unwrap();
        assert_eq!(o.cacertfile.as_deref(), Some("/x/ca.pem".as_ref()));
        assert_eq!(o.certfile.as_deref(), Some("/x/c.pem".as_ref()));
        assert_eq!(o.server_name("h"), "rabbit.local");
        assert!(!o.is_default());
        assert!(opts("amqps://h/%2f?heartbeat=5", &BrokerTls::default())
            .unwrap()
            .is_default());
    }

    #[test]
    fn verification_is_off_only_when_asked() {
        let o = opts("amqps://h/%2f", &BrokerTls::default()).unwrap();
        assert_eq!(o.verify, TlsVerify::VerifyPeer);
        let o = opts("amqps://h/%2f?verify=verify_none", &BrokerTls::default()).unwrap();
        assert_eq!(o.verify, TlsVerify::VerifyNone);
        assert!(opts("amqps://h/%2f?verify=none", &BrokerTls::default()).is_err());
        assert!(opts("amqps://h/%2f?certfile=/c.pem", &BrokerTls::default()).is_err());
        let o = opts(
            "amqps://h/%2f?server_name_indication=disable",
            &BrokerTls::default(),
        )
        .unwrap();
        assert!(!o.sni);
        assert_eq!(o.server_name("h"), "h");
    }
}
