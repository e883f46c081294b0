//! The store and the broker a command works on, from its arguments or the environment.

use clap::ArgMatches;
use edupulse_events::{DatabasePool, EventStore, NatsConfig, NatsPublisher, StoreConfig};

use crate::failure::Failure;

/// The store named by `--database-url` / `DATABASE_URL`, in `--schema`, which must hold a
/// store (a migration applied): a mistyped schema or database is a usage error, not an
/// empty store (nor, for `tail`, a database error for every page).
pub(crate) async fn store(matches: &ArgMatches) -> Result<EventStore, Failure> {
    let store = store_to_migrate(matches).await?;
    if store.migrations().await?.applied.is_empty() {
        let what = match store.pool() {
            DatabasePool::Postgres(_) => format!("schema `{}`", store.config().schema.as_str()),
            DatabasePool::Sqlite(_) => "the database".to_owned(),
        };
        return Err(Failure::Usage(format!(
            "{what} holds no store (no migration applied): check --database-url and --schema, or run \
             `edupulse migrate` first"
        )));
    }
    Ok(store)
}

/// The store named by `--database-url` / `DATABASE_URL`, in `--schema`, migrated or not.
pub(crate) async fn store_to_migrate(matches: &ArgMatches) -> Result<EventStore, Failure> {
    let url = matches
        .get_one::<String>("database-url")
        .ok_or_else(|| Failure::Usage("no store: set DATABASE_URL or pass --database-url".into()))?;
    let schema = matches.get_one::<String>("schema").map_or("edupulse", String::as_str);
    let config = StoreConfig::with_schema(schema)?.with_max_connections(4);
    Ok(EventStore::connect(url, config).await?)
}

/// The broker named by `--nats-url` / `NATS_URL`.
pub(crate) async fn nats(matches: &ArgMatches) -> Result<NatsPublisher, Failure> {
    let url = matches
        .get_one::<String>("nats-url")
        .ok_or_else(|| Failure::Usage("no broker: set NATS_URL or pass --nats-url".into()))?;
    Ok(NatsPublisher::connect(url, NatsConfig::default()).await?)
}
