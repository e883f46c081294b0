//! The first connection to PostgreSQL and to NATS: credentials kept out of every log line,
//! and failures that name the server, the cause and the next step.
//!
//! Both clients log the server they connect to: async-nats at DEBUG with the `Debug` of its
//! URL (user and password included), sqlx at WARN with the value of a URL parameter it does
//! not know (a mistyped `pasword=`). So the NATS URL is split here into servers without
//! credentials and credentials handed over as options, and unknown PostgreSQL parameters are
//! dropped, named by key only, before sqlx sees them.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::time::Duration;

use async_nats::{ConnectErrorKind, ServerAddr};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use crate::EventError;

/// Why the first connection to a server failed, for callers that branch on it (retry a
/// timeout, alert on bad credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectCause {
    /// Nothing listens at the address: the server is down or the port is wrong.
    Refused,
    /// The host name cannot be resolved.
    Dns,
    /// The server refused the credentials.
    Authentication,
    /// PostgreSQL has no database of that name.
    UnknownDatabase,
    /// The TLS handshake or the TLS setup failed.
    Tls,
    /// No answer in time: a firewall, a wrong address, an overloaded server.
    Timeout,
    /// Anything else; the error's source says what.
    Other,
}

impl fmt::Display for ConnectCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Refused => "connection refused",
            Self::Dns => "the host name cannot be resolved",
            Self::Authentication => "authentication failed",
            Self::UnknownDatabase => "the database does not exist",
            Self::Tls => "TLS failed",
            Self::Timeout => "no answer in time",
            Self::Other => "the connection failed",
        })
    }
}

fn connect_error(
    system: &'static str,
    server: &str,
    cause: ConnectCause,
    hint: String,
    source: impl Into<crate::error::BoxError>,
) -> EventError {
    EventError::Connect { system, server: server.to_owned(), cause, hint, source: source.into() }
}

// ---------------------------------------------------------------------------------------
// NATS

/// Credentials taken out of a NATS URL.
pub(crate) enum NatsCredentials {
    UserPassword(String, String),
    Token(String),
}

/// A NATS URL taken apart: the servers as async-nats gets them (no user info), the
/// credentials, and the servers' `host:port` list for messages.
pub(crate) struct NatsTarget {
    pub(crate) servers: Vec<ServerAddr>,
    pub(crate) credentials: Option<NatsCredentials>,
    pub(crate) names: String,
}

/// Splits `url`, one server or several separated by commas (`nats://a:4222,nats://b:4222`),
/// into servers without credentials and the credentials: `user:password@` becomes a user
/// and password, a lone `token@` a token (as the NATS clients of other languages read them).
///
/// # Errors
/// [`EventError::Config`] for an unparsable server, a scheme other than `nats://`, `tls://`,
/// `ws://` and `wss://`, or servers carrying different credentials. The URL is never part
/// of the message.
pub(crate) fn nats_target(url: &str) -> Result<NatsTarget, EventError> {
    let mut servers = Vec::new();
    let mut names = Vec::new();
    let mut credentials: Option<(String, Option<String>)> = None;
    for (i, part) in url.split(',').map(str::trim).enumerate() {
        let which = i + 1;
        let invalid = |why: &dyn fmt::Display| {
            EventError::Config(format!(
                "NATS server #{which} of the URL is invalid: {why} (the URL is not shown: it may hold \
                 credentials)"
            ))
        };
        if part.is_empty() {
            return Err(invalid(&"it is empty"));
        }
        // async-nats' parser: `nats://` when no scheme is given, only NATS schemes accepted.
        // Its messages never quote the input.
        let mut parsed = part.parse::<ServerAddr>().map_err(|e| invalid(&e))?.into_inner();
        let user = percent_decode(parsed.username()).map_err(|e| invalid(&e))?;
        let password = parsed.password().map(percent_decode).transpose().map_err(|e| invalid(&e))?;
        if !user.is_empty() || password.is_some() {
            let found = (user, password.filter(|p| !p.is_empty()));
            match &credentials {
                Some(known) if *known != found => {
                    return Err(EventError::Config(
                        "the NATS servers of the URL carry different credentials: give the same \
                         on each, or only on the first"
                            .into(),
                    ));
                }
                _ => credentials = Some(found),
            }
        }
        if parsed.set_username("").is_err() || parsed.set_password(None).is_err() {
            return Err(invalid(&"its credentials cannot be taken out"));
        }
        let host = parsed.host_str().unwrap_or_default().to_owned();
        let port = parsed.port_or_known_default().unwrap_or(4222);
        names.push(format!("{host}:{port}"));
        servers.push(ServerAddr::from_url(parsed).map_err(|e| invalid(&e))?);
    }
    let credentials = credentials.map(|(user, password)| match password {
        Some(password) => NatsCredentials::UserPassword(user, password),
        None => NatsCredentials::Token(user),
    });
    Ok(NatsTarget { servers, credentials, names: names.join(", ") })
}

/// The failure of the first connection to `servers`, with its cause and next step.
pub(crate) fn nats_connect_error(error: async_nats::ConnectError, servers: &str) -> EventError {
    let io_kind =
        std::error::Error::source(&error).and_then(|s| s.downcast_ref::<io::Error>()).map(io::Error::kind);
    let (cause, hint) = match error.kind() {
        ConnectErrorKind::Dns => {
            (ConnectCause::Dns, format!("check the host name of {servers} in the NATS URL (NATS_URL)"))
        }
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => (
            ConnectCause::Authentication,
            "check the user and password, or the token, in the NATS URL (NATS_URL) against the \
             server's authorization settings"
                .to_owned(),
        ),
        ConnectErrorKind::Tls => (
            ConnectCause::Tls,
            "use `tls://` for a server that requires TLS and `nats://` otherwise, and check that the \
             server's certificate is trusted"
                .to_owned(),
        ),
        ConnectErrorKind::TimedOut => (ConnectCause::Timeout, timeout_hint(servers, "NATS_URL")),
        ConnectErrorKind::Io if io_kind == Some(io::ErrorKind::ConnectionRefused) => (
            ConnectCause::Refused,
            format!("is nats-server running on {servers}? start it, or set NATS_URL to its address"),
        ),
        ConnectErrorKind::Io if io_kind == Some(io::ErrorKind::TimedOut) => {
            (ConnectCause::Timeout, timeout_hint(servers, "NATS_URL"))
        }
        _ => (ConnectCause::Other, format!("is {servers} a NATS server? check NATS_URL")),
    };
    connect_error("NATS", servers, cause, hint, error)
}

/// The first connection took longer than `limit`.
pub(crate) fn nats_timeout(servers: &str, limit: Duration) -> EventError {
    connect_error(
        "NATS",
        servers,
        ConnectCause::Timeout,
        timeout_hint(servers, "NATS_URL"),
        format!("no connection after {limit:?}"),
    )
}

fn timeout_hint(servers: &str, variable: &str) -> String {
    format!(
        "is {servers} reachable from here (no firewall dropping packets, the right host and port)? \
         check {variable}"
    )
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

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

/// Decodes `%XX` escapes (URL user info and query keys arrive percent-encoded).
fn percent_decode(s: &str) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(high), Some(low)) => {
                // Two hex digits: at most 255.
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "its user info is not UTF-8 once percent-decoded")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_credentials_are_taken_out() {
        let target = nats_target("nats://al%40ice:p%3Ass@127.0.0.1:4333").unwrap();
        assert_eq!(target.names, "127.0.0.1:4333");
        assert!(matches!(&target.credentials,
            Some(NatsCredentials::UserPassword(u, p)) if u == "al@ice" && p == "p:ss"));
        assert_eq!(target.servers[0].as_url_str(), "nats://127.0.0.1:4333");
        assert!(format!("{:?}", target.servers[0]).find("p:ss").is_none());

        let target = nats_target("tls://s3cr3t@nats.example:4443, nats://s3cr3t@[::1]").unwrap();
        assert_eq!(target.names, "nats.example:4443, [::1]:4222");
        assert!(matches!(&target.credentials, Some(NatsCredentials::Token(t)) if t == "s3cr3t"));
        assert_eq!(target.servers[0].as_url_str(), "tls://nats.example:4443");
        assert!(target.servers[0].tls_required());
        assert_eq!(target.servers.len(), 2);

        let target = nats_target("127.0.0.1").unwrap();
        assert!(target.credentials.is_none());
        assert_eq!(target.names, "127.0.0.1:4222");

        for bad in ["", "nats://a,", "http://u:secret@h", "nats://u:a@h,nats://u:b@h", "nats://h:99999"] {
            let err = nats_target(bad).err().unwrap().to_string();
            assert!(!err.contains("secret"), "{err}");
        }
    }

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

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%zz%4").unwrap(), "a/b%zz%4");
        assert!(percent_decode("%ff").is_err());
    }
}
