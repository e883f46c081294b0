//! What the first connections to PostgreSQL and to NATS share: the error they return, and
//! the percent-decoding of URL parts. Each server's own rules are in `store/connect.rs` and
//! `broker/connect.rs`.

use crate::EventError;
use crate::error::{BoxError, ConnectCause};

/// A failed first connection to `system` at `server`.
pub(crate) fn connect_error(
    system: &'static str,
    server: &str,
    cause: ConnectCause,
    hint: String,
    source: impl Into<BoxError>,
) -> EventError {
    EventError::Connect { system, server: server.to_owned(), cause, hint, source: source.into() }
}

#[cfg_attr(not(any(feature = "postgres", feature = "nats")), allow(dead_code))] // URLs with hosts
/// Decodes `%XX` escapes (URL user info and query keys arrive percent-encoded).
pub(crate) fn percent_decode(s: &str) -> Result<String, &'static str> {
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

#[cfg_attr(not(any(feature = "postgres", feature = "nats")), allow(dead_code))] // URLs with hosts
/// What to check when a server did not answer in time.
pub(crate) fn timeout_hint(servers: &str, variable: &str) -> String {
    format!(
        "is {servers} reachable from here (no firewall dropping packets, the right host and port)? \
         check {variable}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%zz%4").unwrap(), "a/b%zz%4");
        assert!(percent_decode("%ff").is_err());
    }
}
