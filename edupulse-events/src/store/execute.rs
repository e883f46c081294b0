//! [`execute!`](crate::execute): one SQL statement, written once, run on whichever backend a
//! [`Connection`](crate::Connection) is of; for a read model's statements in a
//! [`Projection`](crate::Projection), or the caller's own writes in a transaction.
//!
//! Write the statement in the SQL both databases speak, with `$1`, `$2`, … placeholders
//! (SQLite reads `$1` as a parameter too), numbered in the order they first appear; bind
//! values both drivers encode (text, integers, floats, booleans, `Uuid`, `chrono` times,
//! `Option`s of them). Where the dialects differ (a schema-qualified table name, `jsonb`),
//! match on the connection instead.
//!
//! A `macro_rules!` macro expands in the caller's crate, where this crate's features are not
//! known: so there is one definition per set of backends built, each naming only the
//! [`Connection`](crate::Connection) variants that exist.

/// Runs one SQL statement on a [`Connection`](crate::Connection) of either backend, with
/// its values bound in order: `execute!(connection, sql, value, …)`, inside an `async`
/// block or function. Evaluates to `Result<u64, sqlx::Error>`, the rows affected. `sql` is
/// what `sqlx::query` takes: a `&'static str`, or a statement built at run time wrapped in
/// `sqlx::AssertSqlSafe` once you checked that no input reaches it unbound.
///
/// ```
/// use edupulse_events::{EventStore, StoreConfig};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = EventStore::connect("sqlite::memory:", StoreConfig::default()).await?;
/// store.migrate().await?;
/// let mut tx = store.begin().await?;
/// edupulse_events::execute!(tx.connection(), "CREATE TABLE lessons (author TEXT PRIMARY KEY, n BIGINT NOT NULL)")?;
/// let sql = "INSERT INTO lessons (author, n) VALUES ($1, $2) \
///            ON CONFLICT (author) DO UPDATE SET n = lessons.n + $2";
/// edupulse_events::execute!(tx.connection(), sql, "ada", 1_i64)?;
/// let updated = edupulse_events::execute!(tx.connection(), sql, "ada", 2_i64)?;
/// assert_eq!(updated, 1);
/// tx.commit().await?;
/// # Ok(())
/// # }
/// ```
#[cfg(all(feature = "postgres", feature = "sqlite"))]
#[macro_export]
macro_rules! execute {
    ($connection:expr, $sql:expr $(, $value:expr)* $(,)?) => {
        match $connection {
            $crate::Connection::Postgres(connection) => {
                $crate::__execute_on!(connection, $sql $(, $value)*)
            }
            $crate::Connection::Sqlite(connection) => {
                $crate::__execute_on!(connection, $sql $(, $value)*)
            }
        }
    };
}

/// Runs one SQL statement on a [`Connection`](crate::Connection); see the docs of the
/// build with both backends.
#[cfg(all(feature = "postgres", not(feature = "sqlite")))]
#[macro_export]
macro_rules! execute {
    ($connection:expr, $sql:expr $(, $value:expr)* $(,)?) => {
        match $connection {
            $crate::Connection::Postgres(connection) => {
                $crate::__execute_on!(connection, $sql $(, $value)*)
            }
        }
    };
}

/// Runs one SQL statement on a [`Connection`](crate::Connection); see the docs of the
/// build with both backends.
#[cfg(all(feature = "sqlite", not(feature = "postgres")))]
#[macro_export]
macro_rules! execute {
    ($connection:expr, $sql:expr $(, $value:expr)* $(,)?) => {
        match $connection {
            $crate::Connection::Sqlite(connection) => {
                $crate::__execute_on!(connection, $sql $(, $value)*)
            }
        }
    };
}

/// The statement of [`execute!`](crate::execute) on one driver's connection.
#[doc(hidden)]
#[macro_export]
macro_rules! __execute_on {
    ($connection:ident, $sql:expr $(, $value:expr)*) => {
        $crate::sqlx::query($sql)$(.bind($value))*.execute(&mut *$connection).await.map(|r| r.rows_affected())
    };
}
