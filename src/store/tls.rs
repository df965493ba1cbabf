//! TLS for PostgreSQL connections, libpq's way, over rustls: [`TlsMode`] (`sslmode`), the
//! rustls configuration each mode needs ([`client_config`]: which server certificates are
//! accepted, which client certificate is shown) and tokio-postgres's TLS hook ([`Rustls`]).

use std::{future::Future, io, pin::Pin, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::WebPkiServerVerifier,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::{
    tls::{ChannelBinding, MakeTlsConnect, TlsConnect},
    Socket,
};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not checked
    /// unless `sslrootcert` is given.
    Prefer,
    /// TLS or nothing; the certificate is not checked unless `sslrootcert` is given.
    Require,
    /// TLS, certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS, chain and host name checked.
    VerifyFull,
}

impl TlsMode {
    pub(crate) fn parse(value: &str) -> Result<TlsMode, String> {
        Ok(match value {
            "disable" => TlsMode::Disable,
            // libpq's `allow` tries plain first; plain-or-TLS is the closest we offer.
            "allow" | "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(format!(
                "sslmode `{other}` is not one of disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }
}

/// The rustls configuration for `mode`.
pub(crate) fn client_config(
    mode: TlsMode,
    rootcert: Option<&str>,
    cert: Option<&str>,
    key: Option<&str>,
) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let rootcert = match (mode, rootcert) {
        (_, Some(path)) => Some(path.to_string()),
        (TlsMode::VerifyCa | TlsMode::VerifyFull, None) => Some(default_root_cert()?),
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match rootcert {
        None => Arc::new(crate::tls::AcceptAnyCertificate(provider.clone())),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&path)
                .map_err(|e| format!("sslrootcert `{path}`: {e}"))?
            {
                let c = c.map_err(|e| format!("sslrootcert `{path}`: {e}"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("sslrootcert `{path}`: {e}"))?;
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("sslrootcert `{path}`: {e}"))?;
            Arc::new(ChainCheck {
                webpki,
                check_name: mode == TlsMode::VerifyFull,
            })
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (cert, key) {
        (None, _) => Ok(builder.with_no_client_auth()),
        (Some(cert), key) => {
            let key = key.ok_or_else(|| format!("sslcert `{cert}` is given but no sslkey"))?;
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslcert `{cert}`: {e}"))?;
            let key_der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("sslkey `{key}`: {e}"))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("sslcert `{cert}` / sslkey `{key}`: {e}"))
        }
    }
}

/// libpq's default CA file, `~/.postgresql/root.crt`.
fn default_root_cert() -> Result<String, String> {
    std::env::var("HOME")
        .map(|home| format!("{home}/.postgresql/root.crt"))
        .map_err(|_| "verify-ca/verify-full need sslrootcert (and HOME is not set)".to_string())
}

/// `sslrootcert` given: the chain must lead to it; the host name is checked for
/// `verify-full` only.
#[derive(Debug)]
struct ChainCheck {
    webpki: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            // webpki checks the chain before the name: a name error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// tokio-postgres's TLS hook over tokio-rustls. Without a configuration (sslmode
/// `disable`) tokio-postgres never calls it.
#[derive(Clone)]
pub(crate) struct Rustls(pub(crate) Option<Arc<ClientConfig>>);

/// One handshake with one host.
pub(crate) struct RustlsConnect {
    config: Option<Arc<ClientConfig>>,
    host: String,
}

/// A TLS handshake that failed, with the host and the reason (rustls's error, e.g.
/// `invalid peer certificate: UnknownIssuer`).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with {host} failed: {source}")]
pub(crate) struct TlsHandshakeError {
    host: String,
    #[source]
    source: io::Error,
}

impl TlsHandshakeError {
    /// A TLS protocol or certificate failure (permanent), not a broken socket (transient).
    pub(crate) fn is_tls_failure(&self) -> bool {
        self.source
            .get_ref()
            .is_some_and(|inner| inner.is::<rustls::Error>())
            || self.source.kind() == io::ErrorKind::InvalidInput
    }
}

impl MakeTlsConnect<Socket> for Rustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        Ok(RustlsConnect {
            config: self.0.clone(),
            host: domain.to_string(),
        })
    }
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = TlsHandshakeError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream, TlsHandshakeError>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let host = self.host;
            let fail = |source| TlsHandshakeError {
                host: host.clone(),
                source,
            };
            let config = self.config.ok_or_else(|| {
                fail(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "TLS asked for with sslmode=disable",
                ))
            })?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| fail(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
                .map_err(fail)
        })
    }
}

/// An established TLS stream.
pub(crate) struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
