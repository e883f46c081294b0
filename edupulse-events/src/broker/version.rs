//! What a nats-server's version says it has.

/// Whether a server of `version` (`2.12.1`, `2.14.0-beta`, …) is `since` or later.
pub(crate) fn server_since(version: &str, since: (u64, u64, u64)) -> bool {
    let mut parts = version.split(['.', '-', '+']).map(|p| p.parse::<u64>().ok());
    let mut next = || parts.next().flatten().unwrap_or(0);
    (next(), next(), next()) >= since
}
