//! The admin pool's connection URL: the engine's `database.url` with the admin pool's
//! `application_name` and statement timeout added.
//!
//! tokio-postgres (under diesel-async) reads libpq's `options` and `application_name` URL
//! parameters and sends them in the startup packet, so every admin connection starts with
//! `statement_timeout` set; no `SET` after connecting can be forgotten.

use std::time::Duration;

use crate::{config::SecretUrl, store::millis};

/// `application_name` of every admin connection (visible in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "courier-admin";

/// `url` with `application_name=courier-admin` and `-c statement_timeout=…` added to its
/// `options` (any options already there are kept).
pub fn admin_url(
    url: &SecretUrl,
    statement_timeout: Duration,
) -> Result<SecretUrl, url::ParseError> {
    // The query string is edited as text: a libpq multi-host URL (`h1:5432,h2:5432`) is no
    // valid WHATWG URL, and everything before `?` stays as written.
    let raw = url.expose();
    if !raw.contains("://") {
        return Err(url::ParseError::RelativeUrlWithoutBase);
    }
    let (head, kept, taken) = crate::store::take_query_keys(raw, &["options", "application_name"]);
    let mut kept: Vec<String> = kept.into_iter().map(str::to_string).collect();
    let options = taken
        .into_iter()
        .rev()
        .find(|(k, _)| k == "options")
        .map(|(_, v)| v);
    let timeout = format!("-c statement_timeout={}", millis(statement_timeout).max(1));
    let options = match options {
        Some(existing) if !existing.trim().is_empty() => format!("{existing} {timeout}"),
        _ => timeout,
    };
    // tokio-postgres percent-decodes but does not read `+` as a space: write `%20`.
    let encode = |s: &str| {
        url::form_urlencoded::byte_serialize(s.as_bytes())
            .collect::<String>()
            .replace('+', "%20")
    };
    kept.push(format!("application_name={}", encode(APPLICATION_NAME)));
    kept.push(format!("options={}", encode(&options)));
    Ok(SecretUrl::new(format!("{head}?{}", kept.join("&"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_url_carries_the_timeout_and_name_and_keeps_other_options() {
        let url = SecretUrl::new(
            "postgres://u:pw@db:5432/app?sslmode=disable&options=-c%20search_path%3Dx",
        );
        let admin = admin_url(&url, Duration::from_secs(3)).unwrap();
        let parsed = url::Url::parse(admin.expose()).unwrap();
        let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
        assert!(pairs.contains(&("sslmode".into(), "disable".into())));
        assert!(pairs.contains(&("application_name".into(), APPLICATION_NAME.into())));
        assert!(pairs.contains(&(
            "options".into(),
            "-c search_path=x -c statement_timeout=3000".into()
        )));
        assert_eq!(parsed.password(), Some("pw"));
        assert!(admin
            .expose()
            .contains("options=-c%20search_path%3Dx%20-c%20statement_timeout%3D3000"));
    }

    #[test]
    fn a_multi_host_url_keeps_its_hosts() {
        let url =
            SecretUrl::new("postgres://u:pw@h1:5432,h2:5433/app?target_session_attrs=read-write");
        let admin = admin_url(&url, Duration::from_secs(1)).unwrap();
        assert_eq!(
            admin.expose(),
            "postgres://u:pw@h1:5432,h2:5433/app?target_session_attrs=read-write\
             &application_name=courier-admin&options=-c%20statement_timeout%3D1000"
        );
    }
}
