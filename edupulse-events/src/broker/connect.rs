//! The first connection to NATS: credentials kept out of every log line, and failures that
//! name the server, the cause and the next step.
//!
//! async-nats logs the server it connects to at DEBUG with the `Debug` of its URL (user and
//! password included), so the NATS URL is split here into servers without credentials and
//! credentials handed over as options.

use std::time::Duration;
use std::{fmt, io};

use async_nats::{ConnectErrorKind, ServerAddr};

use crate::EventError;
use crate::connect::{connect_error, percent_decode, timeout_hint};
use crate::error::ConnectCause;

/// Credentials taken out of a NATS URL.
#[derive(Clone)]
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
}
