//! Redaction of connection strings: what of a database or broker URL may appear in a log
//! line, an error or the output of a command.
//!
//! A URL's userinfo password is the obvious secret, but not the only one: libpq and
//! tokio-postgres read `?password=` (and libpq `sslpassword=`, `passfile=`, `sslkey=`) from
//! the query string, and a key=value connection string (`host=h password=p`) carries the
//! same keys. Every parameter whose name looks like a credential ([`is_secret_param`]) has
//! its value replaced by `***`; a string that is neither a URL nor a connection string is
//! not echoed at all.

/// Replaces the password of a URL, and the value of every credential-like query parameter
/// (see `is_secret_param`), with `***`. A key=value connection string (`host=h
/// password=p`) is redacted the same way. Anything else that does not parse is not echoed
/// at all, since it may still contain a password in a shape the parser did not understand.
/// A secret that appears again elsewhere in the string (a second URL pasted into the same
/// value, a parameter holding the password) is replaced wherever it is.
pub fn redact_url(raw: &str) -> String {
    let out = redact_parts(raw);
    // After the userinfo only: a user name equal to the password (`guest:guest`) stays.
    let userinfo_end = out.split_once("://").map_or(0, |(scheme, rest)| {
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        authority
            .rfind('@')
            .map_or(0, |at| scheme.len() + "://".len() + at + 1)
    });
    let (userinfo, mut rest) = (
        out[..userinfo_end].to_string(),
        out[userinfo_end..].to_string(),
    );
    for secret in secrets(raw) {
        if secret.chars().count() >= MIN_SCRUBBED_SECRET {
            rest = rest.replace(&secret, "***");
        }
    }
    userinfo + &rest
}

/// [`redact_url`]'s work on the URL's own parts: its password and credential parameters.
fn redact_parts(raw: &str) -> String {
    if let Some((single, hosts)) = one_host(raw) {
        return redact_parts(&single).replacen(HOSTS_PLACEHOLDER, &hosts, 1);
    }
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                // set_password only fails for URLs that cannot have one (then there is none).
                let _ = url.set_password(Some("***"));
            }
            if let Some(query) = url.query() {
                let redacted = query
                    .split('&')
                    .map(|pair| match query_pair(pair) {
                        Some((name, value)) if is_secret_param(&name) && !value.is_empty() => {
                            let raw_name = pair.split_once('=').map_or(pair, |(n, _)| n);
                            format!("{raw_name}=***")
                        }
                        _ => pair.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join("&");
                url.set_query(Some(&redacted));
            }
            url.to_string()
        }
        Err(_) => match dsn_pairs(raw) {
            Some(pairs) => pairs
                .iter()
                .map(|(k, v)| match is_secret_param(k) {
                    true => format!("{k}=***"),
                    false => format!("{k}={}", quote_dsn_value(v)),
                })
                .collect::<Vec<_>>()
                .join(" "),
            None => "<unparsable url>".to_string(),
        },
    }
}

/// Stands for the host list of a multi-host URL while the `url` crate reads the rest.
const HOSTS_PLACEHOLDER: &str = "courier-hosts.invalid";

/// A libpq multi-host URL (`postgres://u:p@h1:5432,h2:5432/db?…`) is no valid WHATWG
/// URL: returns it with the host list replaced by one placeholder host, and the host list
/// (which holds no secret). `None` for any other string.
fn one_host(raw: &str) -> Option<(String, String)> {
    let (scheme, rest) = raw.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let hosts_at = authority.rfind('@').map_or(0, |at| at + 1);
    let hosts = &authority[hosts_at..];
    if !hosts.contains(',') {
        return None;
    }
    let single = format!(
        "{scheme}://{}{HOSTS_PLACEHOLDER}{}",
        &authority[..hosts_at],
        &rest[authority.len()..]
    );
    Some((single, hosts.to_string()))
}

/// Secrets this short are not scrubbed out of free text (see
/// [`SecretUrl::scrub`](crate::config::SecretUrl::scrub)).
pub const MIN_SCRUBBED_SECRET: usize = 4;

/// Fragments of a parameter name that make its value a credential, compared in lower case
/// with `_` and `-` ignored: libpq's `password`, `sslpassword`, `passfile`, `sslkey`, AMQP
/// `password`, and the usual `secret`, `token`, `apikey`, `credentials`.
const SECRET_PARAM_MARKERS: &[&str] = &["pass", "pwd", "secret", "token", "key", "credential"];

/// Whether a URL query or DSN parameter named `name` holds a credential.
pub fn is_secret_param(name: &str) -> bool {
    let name: String = name
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    SECRET_PARAM_MARKERS.iter().any(|m| name.contains(m))
}

/// One `name=value` of a query string, percent-decoded.
fn query_pair(pair: &str) -> Option<(String, String)> {
    url::form_urlencoded::parse(pair.as_bytes())
        .next()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
}

/// Every secret in `raw` as it may appear in a message: the userinfo password and the
/// values of credential-like parameters, both as written and percent-decoded, longest
/// first (so a secret that contains another is replaced whole).
fn secrets(raw: &str) -> Vec<String> {
    let mut out = Vec::new();
    let single = one_host(raw).map(|(single, _)| single);
    match url::Url::parse(single.as_deref().unwrap_or(raw)) {
        Ok(url) => {
            out.extend(url.password().map(str::to_string));
            for pair in url.query().unwrap_or("").split('&') {
                match (query_pair(pair), pair.split_once('=')) {
                    (Some((name, _)), Some((_, value))) if is_secret_param(&name) => {
                        out.push(value.to_string());
                    }
                    _ => {}
                }
            }
        }
        Err(_) => out.extend(
            dsn_pairs(raw)
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, _)| is_secret_param(k))
                .map(|(_, v)| v),
        ),
    }
    let decoded: Vec<String> = out
        .iter()
        .filter_map(|s| query_pair(&format!("v={s}")).map(|(_, v)| v))
        .collect();
    out.extend(decoded);
    out.retain(|s| !s.is_empty());
    out.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    out.dedup();
    out
}

/// A libpq key=value connection string (`host=h user=u password='p w'`) as pairs, or
/// `None` when `raw` is not one.
fn dsn_pairs(raw: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = raw.trim().chars().peekable();
    while chars.peek().is_some() {
        let key: String =
            std::iter::from_fn(|| chars.next_if(|c| *c != '=' && !c.is_whitespace())).collect();
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if key.is_empty() || chars.next() != Some('=') {
            return None;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\\' => value.push(chars.next()?),
                    '\'' => break,
                    c => value.push(c),
                }
            }
        } else {
            value.extend(std::iter::from_fn(|| chars.next_if(|c| !c.is_whitespace())));
        }
        pairs.push((key, value));
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
    }
    (!pairs.is_empty()).then_some(pairs)
}

/// A DSN value as it must be written back (quoted when it holds spaces or quotes).
fn quote_dsn_value(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// `message` with `raw` (a URL or connection string) replaced by its redacted form, and
/// each of its secrets, should the message quote one on its own, by `***`. Secrets shorter
/// than [`MIN_SCRUBBED_SECRET`] are left alone: replacing them would maul the text.
pub fn scrub(raw: &str, message: &str) -> String {
    let mut out = message.replace(raw, &redact_url(raw));
    for secret in secrets(raw) {
        if secret.chars().count() >= MIN_SCRUBBED_SECRET {
            out = out.replace(&secret, "***");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_repeated_elsewhere_in_the_string_is_redacted_there_too() {
        for raw in [
            "amqp://guest:Pw0rd9@h:5821/%2f?heartbeat=5 amqp://guest:Pw0rd9@h:5822/%2f",
            "amqp://guest:Pw0rd9@h:5821/%2f?connection_timeout=Pw0rd9",
        ] {
            let shown = redact_url(raw);
            assert!(!shown.contains("Pw0rd9"), "{shown}");
            assert!(shown.starts_with("amqp://guest:***@h:5821/"), "{shown}");
        }
    }

    #[test]
    fn userinfo_and_credential_query_parameters_are_redacted() {
        let cases = [
            (
                "postgres://u:pw1234@h:5432/db?password=SECRET1&sslmode=require",
                "postgres://u:***@h:5432/db?password=***&sslmode=require",
            ),
            (
                "postgresql://u@h/db?sslpassword=SECRET2&application_name=courier",
                "postgresql://u@h/db?sslpassword=***&application_name=courier",
            ),
            (
                "postgres://h/db?passfile=%2Fhome%2Fu%2F.pgpass&sslkey=%2Fk.pem&PassWord=SECRET3",
                "postgres://h/db?passfile=***&sslkey=***&PassWord=***",
            ),
            (
                "amqp://guest:guest@rabbit:5672/%2f?heartbeat=10&password=SECRET4&auth_token=SECRET5",
                "amqp://guest:***@rabbit:5672/%2f?heartbeat=10&password=***&auth_token=***",
            ),
            // libpq's multi-host form.
            (
                "postgres://u:pw1234@h1:5432,h2:5433/db?target_session_attrs=read-write&password=SECRET9",
                "postgres://u:***@h1:5432,h2:5433/db?target_session_attrs=read-write&password=***",
            ),
            ("postgres://h1,h2/db", "postgres://h1,h2/db"),
            // A percent-encoded name is still recognised.
            ("postgres://h/db?pass%77ord=SECRET6", "postgres://h/db?pass%77ord=***"),
            // Nothing secret: unchanged.
            (
                "postgres://postgres@127.0.0.1/x?sslmode=disable",
                "postgres://postgres@127.0.0.1/x?sslmode=disable",
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(redact_url(raw), want, "{raw}");
        }
    }

    #[test]
    fn key_value_connection_strings_are_redacted() {
        assert_eq!(
            redact_url("host=db user=app password=SECRET7 sslpassword='two words'"),
            "host=db user=app password=*** sslpassword=***"
        );
        assert_eq!(
            redact_url("host = db  dbname='my db' password = 'it\\'s'"),
            "host=db dbname='my db' password=***"
        );
        // Neither a URL nor a connection string: not echoed.
        assert_eq!(redact_url("not a url :: pass"), "<unparsable url>");
        assert_eq!(
            redact_url("host=db password='unterminated"),
            "<unparsable url>"
        );
    }

    #[test]
    fn credential_names() {
        for name in [
            "password",
            "sslpassword",
            "passfile",
            "sslkey",
            "PASSWORD",
            "ssl_password",
            "pwd",
            "api-key",
            "secret",
            "token",
        ] {
            assert!(is_secret_param(name), "{name}");
        }
        for name in ["host", "sslmode", "dbname", "heartbeat", "application_name"] {
            assert!(!is_secret_param(name), "{name}");
        }
    }

    #[test]
    fn scrub_removes_the_url_and_secrets_quoted_alone() {
        let raw = "postgres://u:p%40ss-word@h/db?sslpassword=SECRET8";
        let msg = format!(
            "cannot use {raw}: option sslpassword=SECRET8 rejected, password p@ss-word, p%40ss-word"
        );
        let out = scrub(raw, &msg);
        for secret in ["SECRET8", "p@ss-word", "p%40ss-word"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(
            out.contains("postgres://u:***@h/db?sslpassword=***"),
            "{out}"
        );
        let multi = "postgres://u:s3cr3t-pw@h1:5432,h2:5432/db";
        let out = scrub(multi, &format!("{multi} failed; s3cr3t-pw"));
        assert_eq!(
            out, "postgres://u:***@h1:5432,h2:5432/db failed; ***",
            "{out}"
        );
        // Too short to scrub from free text without mauling it (the URL is still redacted).
        assert_eq!(
            scrub("amqp://u:ab@h", "ab cab amqp://u:ab@h"),
            "ab cab amqp://u:***@h"
        );
    }
}
