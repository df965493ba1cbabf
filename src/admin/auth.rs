//! Bearer tokens and allowed hosts: the admin API's two gates.
//!
//! `admin.token` may do everything; `admin.read_token` may read dead-letter payloads and
//! headers but change nothing. A missing token and a wrong one get the same answer, and a
//! token is compared in time that does not depend on where it differs.

use actix_web::{http::header, HttpRequest};

use super::ApiError;
use crate::config::AdminConfig;

/// What a request wants to do with a dead letter beyond reading its metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read payloads and headers: `admin.token` or `admin.read_token`.
    ReadPayload,
    /// Requeue or discard: `admin.token` only.
    Mutate,
}

/// Lets the request through, or says why not: 403 when no token that could allow it is
/// configured (disabled, never open), else 401 for a missing or wrong token alike.
pub(crate) fn authorize(
    cfg: &AdminConfig,
    req: &HttpRequest,
    access: Access,
) -> Result<(), ApiError> {
    let accepted: Vec<&str> = match access {
        Access::Mutate => cfg.token.iter().map(String::as_str).collect(),
        Access::ReadPayload => cfg
            .token
            .iter()
            .chain(cfg.read_token.iter())
            .map(String::as_str)
            .collect(),
    };
    if accepted.is_empty() {
        return Err(ApiError::Disabled(match access {
            Access::Mutate => "mutating endpoints are disabled: set admin.token",
            Access::ReadPayload => {
                "payload reads are disabled: set admin.read_token or admin.token"
            }
        }));
    }
    let given = bearer(req).unwrap_or("");
    // Every configured token is compared, whichever matches.
    let matched = accepted.iter().fold(false, |any, expected| {
        same(given.as_bytes(), expected.as_bytes()) | any
    });
    if matched {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Equal in time that depends only on the lengths, never on where the bytes differ.
fn same(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ e);
    }
    std::hint::black_box(diff) == 0
}

/// Whether a `Host` header value is one of `allowed` (`host` allows any port, `host:port`
/// that port only; case-insensitive). An empty list allows every host.
pub(crate) fn host_allowed(allowed: &[String], host: Option<&str>) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(host) = host else {
        return false;
    };
    let name = host_name(host);
    allowed.iter().any(|a| {
        a.eq_ignore_ascii_case(host) || (host_name(a) == a && a.eq_ignore_ascii_case(name))
    })
}

/// The host part of `host[:port]` (IPv6 literals in brackets keep them).
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_by_value_only() {
        assert!(same(b"s3cret", b"s3cret"));
        assert!(!same(b"s3creT", b"s3cret"));
        assert!(!same(b"s3cret-and-more", b"s3cret"));
        assert!(!same(b"", b"s3cret"));
    }

    #[test]
    fn hosts_match_with_or_without_a_port() {
        let allowed = vec![
            "localhost".to_string(),
            "courier.internal:8081".into(),
            "[::1]".into(),
        ];
        assert!(host_allowed(&allowed, Some("localhost:9000")));
        assert!(host_allowed(&allowed, Some("LOCALHOST")));
        assert!(host_allowed(&allowed, Some("courier.internal:8081")));
        assert!(!host_allowed(&allowed, Some("courier.internal:9999")));
        assert!(host_allowed(&allowed, Some("[::1]:8081")));
        assert!(!host_allowed(&allowed, Some("evil.example")));
        assert!(!host_allowed(&allowed, Some("localhost.evil.example")));
        assert!(!host_allowed(&allowed, None));
        assert!(host_allowed(&[], Some("anything")));
    }
}
