//! The first connection to PostgreSQL: credentials kept out of every log line, and failures
//! that name the server, the cause and the next step.
//!
//! sqlx logs at WARN the value of a URL parameter it does not know (a mistyped `pasword=`),
//! so unknown parameters are dropped, named by key only, before sqlx sees them.

use std::borrow::Cow;
use std::io;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use crate::EventError;
use crate::connect::{connect_error, percent_decode, timeout_hint};
use crate::error::ConnectCause;

/// How long the first PostgreSQL connection may take, DNS included. A refused port or an
/// unknown host fails at once; this bounds a host that drops packets.
const POSTGRES_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The query parameters sqlx 0.9 understands in a PostgreSQL URL (`PgConnectOptions`'
/// `parse_from_url`); `options[…]` keys are handled apart.
const POSTGRES_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Parses a PostgreSQL URL. Parameters sqlx does not know are dropped first, with a warning
/// naming the key only: sqlx would log them with their value, which may be a mistyped
/// password.
///
/// # Errors
/// [`EventError::Config`] when sqlx cannot parse the URL; the URL is not shown.
pub(crate) fn postgres_options(url: &str) -> Result<PgConnectOptions, EventError> {
    let (url, dropped) = without_unknown_parameters(url);
    for key in dropped {
        tracing::warn!(
            parameter = %key,
            "ignoring a PostgreSQL URL parameter sqlx does not know (its value is not shown)"
        );
    }
    url.parse().map_err(|_| {
        EventError::Config(
            "the PostgreSQL URL cannot be parsed (it is not shown: it may hold a password)".into(),
        )
    })
}

/// `url` without the query parameters sqlx does not know, and their (decoded) keys. Splits
/// the way the `url` crate does: the query runs from the first `?` to the first `#` after
/// it, pairs are separated by `&`, a key ends at the first `=`.
fn without_unknown_parameters(url: &str) -> (Cow<'_, str>, Vec<String>) {
    let Some((base, rest)) = url.split_once('?') else { return (Cow::Borrowed(url), Vec::new()) };
    let (query, fragment) = match rest.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (rest, None),
    };
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let raw_key = pair.split_once('=').map_or(pair, |(key, _)| key);
        let key = percent_decode(&raw_key.replace('+', " ")).unwrap_or_else(|_| raw_key.to_owned());
        let known = POSTGRES_URL_PARAMETERS.contains(&key.as_str())
            || (key.starts_with("options[") && key.ends_with(']'));
        if known {
            kept.push(pair);
        } else {
            dropped.push(key);
        }
    }
    if dropped.is_empty() {
        return (Cow::Borrowed(url), dropped);
    }
    let mut cleaned = base.to_owned();
    if !kept.is_empty() {
        cleaned.push('?');
        cleaned.push_str(&kept.join("&"));
    }
    if let Some(fragment) = fragment {
        cleaned.push('#');
        cleaned.push_str(fragment);
    }
    (Cow::Owned(cleaned), dropped)
}

/// The server of `options` as messages name it: `host:port`, or the socket path.
fn postgres_server(options: &PgConnectOptions) -> String {
    if let Some(socket) = options.get_socket() {
        return socket.display().to_string();
    }
    let host = options.get_host();
    if host.contains(':') {
        format!("[{host}]:{}", options.get_port())
    } else {
        format!("{host}:{}", options.get_port())
    }
}

/// Opens and closes one connection, so that an unreachable server, a wrong password or a
/// missing database is reported at once, by cause, instead of as the pool's timeout.
///
/// # Errors
/// [`EventError::Connect`] naming the server (never the password), the cause and what to do.
pub(crate) async fn check_postgres(options: &PgConnectOptions) -> Result<(), EventError> {
    let server = postgres_server(options);
    let attempt = async {
        if options.get_socket().is_none() {
            // Resolved apart: a failed lookup reaches sqlx's caller as an uncategorised
            // `io::Error`, indistinguishable from other I/O failures.
            let host = options.get_host().trim_matches(['[', ']']);
            if let Err(e) = tokio::net::lookup_host((host, options.get_port())).await {
                return Err(connect_error(
                    "PostgreSQL",
                    &server,
                    ConnectCause::Dns,
                    format!("check the host name of {server} in the PostgreSQL URL (DATABASE_URL)"),
                    e,
                ));
            }
        }
        match PgConnection::connect_with(options).await {
            Ok(connection) => {
                // Only a probe: the pool opens its own connections.
                let _ = connection.close().await;
                Ok(())
            }
            Err(e) => Err(postgres_connect_error(e, &server, options)),
        }
    };
    match tokio::time::timeout(POSTGRES_CONNECT_TIMEOUT, attempt).await {
        Ok(outcome) => outcome,
        Err(_) => Err(connect_error(
            "PostgreSQL",
            &server,
            ConnectCause::Timeout,
            timeout_hint(&server, "DATABASE_URL"),
            format!("no connection after {POSTGRES_CONNECT_TIMEOUT:?}"),
        )),
    }
}

fn postgres_connect_error(error: sqlx::Error, server: &str, options: &PgConnectOptions) -> EventError {
    let (cause, hint) = match &error {
        sqlx::Error::Io(e) => match e.kind() {
            // `NotFound`: no socket file, the server is not running.
            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => (
                ConnectCause::Refused,
                format!("is PostgreSQL running on {server}? start it, or set DATABASE_URL to its address"),
            ),
            io::ErrorKind::TimedOut => (ConnectCause::Timeout, timeout_hint(server, "DATABASE_URL")),
            _ => (ConnectCause::Other, format!("is {server} a PostgreSQL server? check DATABASE_URL")),
        },
        sqlx::Error::Tls(_) => (
            ConnectCause::Tls,
            "check `sslmode` (and the certificates) in the PostgreSQL URL against the server's TLS \
             settings"
                .to_owned(),
        ),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // invalid_password, invalid_authorization_specification (no pg_hba.conf entry).
            Some("28P01" | "28000") => (
                ConnectCause::Authentication,
                format!(
                    "check the user `{}` and its password in the PostgreSQL URL (DATABASE_URL), and \
                     the server's pg_hba.conf",
                    options.get_username()
                ),
            ),
            // invalid_catalog_name
            Some("3D000") => (
                ConnectCause::UnknownDatabase,
                format!(
                    "create the database `{}` on {server}, or name an existing one in DATABASE_URL",
                    options.get_database().unwrap_or_else(|| options.get_username())
                ),
            ),
            _ => (ConnectCause::Other, format!("see the server's log on {server}")),
        },
        _ => (ConnectCause::Other, format!("is {server} a PostgreSQL server? check DATABASE_URL")),
    };
    connect_error("PostgreSQL", server, cause, hint, error)
}

// ---------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_postgres_parameters_are_dropped_by_key() {
        let (url, dropped) =
            without_unknown_parameters("postgres://u@h/db?sslmode=disable&pasword=x&options[a]=b#f");
        assert_eq!(url, "postgres://u@h/db?sslmode=disable&options[a]=b#f");
        assert_eq!(dropped, ["pasword"]);
        let (url, dropped) = without_unknown_parameters("postgres://u@h/db?pass%77d=x");
        assert_eq!(url, "postgres://u@h/db");
        assert_eq!(dropped, ["passwd"]);
        let (url, dropped) = without_unknown_parameters("postgres://u:p@h/db?password=x&user=y");
        assert!(matches!(url, Cow::Borrowed(_)));
        assert!(dropped.is_empty());
        assert!(postgres_options("postgres://u:p@h/db?pasword=x").is_ok());
    }
}
