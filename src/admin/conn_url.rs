//! The admin pool's connection URL: the engine's `database.url` with the admin pool's
//! `application_name` (visible in `pg_stat_activity`). Its statement timeout is set per
//! transaction instead ([`crate::store::Store::with_statement_timeout`]): a start-up
//! `options` parameter is refused by PgBouncer unless listed in its
//! `ignore_startup_parameters`, and then silently not applied.

use crate::config::SecretUrl;

/// `application_name` of every admin connection (visible in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "courier-admin";

/// `url` with `application_name=courier-admin` (any `application_name` already there is
/// replaced; every other parameter is kept as written).
pub fn admin_url(url: &SecretUrl) -> Result<SecretUrl, url::ParseError> {
    // The query string is edited as text: a libpq multi-host URL (`h1:5432,h2:5432`) is no
    // valid WHATWG URL, and everything before `?` stays as written.
    let raw = url.expose();
    if !raw.contains("://") {
        return Err(url::ParseError::RelativeUrlWithoutBase);
    }
    let (head, kept, _) = crate::store::take_query_keys(raw, &["application_name"]);
    let mut kept: Vec<String> = kept.into_iter().map(str::to_string).collect();
    kept.push(format!("application_name={APPLICATION_NAME}"));
    Ok(SecretUrl::new(format!("{head}?{}", kept.join("&"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_url_carries_the_name_and_keeps_other_parameters() {
        let url = SecretUrl::new(
            "postgres://u:pw@db:5432/app?sslmode=disable&options=-c%20search_path%3Dx&application_name=mine",
        );
        let admin = admin_url(&url).unwrap();
        let parsed = url::Url::parse(admin.expose()).unwrap();
        let pairs: Vec<(String, String)> = parsed.query_pairs().into_owned().collect();
        assert!(pairs.contains(&("sslmode".into(), "disable".into())));
        assert!(pairs.contains(&("application_name".into(), APPLICATION_NAME.into())));
        assert!(!pairs.contains(&("application_name".into(), "mine".into())));
        assert!(pairs.contains(&("options".into(), "-c search_path=x".into())));
        assert_eq!(parsed.password(), Some("pw"));
    }

    #[test]
    fn a_multi_host_url_keeps_its_hosts() {
        let url =
            SecretUrl::new("postgres://u:pw@h1:5432,h2:5433/app?target_session_attrs=read-write");
        let admin = admin_url(&url).unwrap();
        assert_eq!(
            admin.expose(),
            "postgres://u:pw@h1:5432,h2:5433/app?target_session_attrs=read-write\
             &application_name=courier-admin"
        );
    }
}
