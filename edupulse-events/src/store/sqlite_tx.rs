//! A transaction of the embedded store, begun, checked and ended here rather than by sqlx's
//! transaction manager, so that a connection in a state nobody can vouch for never goes
//! back to the pool.
//!
//! sqlx counts each connection's transaction depth itself. A caller that runs `ROLLBACK`
//! (or `COMMIT`) on the raw connection of a store transaction puts that count out of step
//! with SQLite, and sqlx then returns the connection to the pool that way: later
//! transactions on it fail ("attempted to call begin_with at non-zero transaction depth").
//! Worse, after `ROLLBACK` and `BEGIN IMMEDIATE` by the caller, sqlx's COMMIT commits the
//! caller's new transaction and reports success for events that are gone. Here:
//!
//! - `BEGIN IMMEDIATE` is followed by a savepoint of the store's own. SQLite drops every savepoint
//!   when a transaction ends, so at commit the savepoint is there only if the transaction
//!   is still the one begun: commit releases it first, and "no such savepoint" is
//!   [`EventError::TransactionAborted`] (the transaction open now, if any, is rolled back).
//! - A connection whose COMMIT or ROLLBACK failed, whose transaction was not the one begun,
//!   or that is dropped with its transaction open is closed, never pooled: closing a SQLite
//!   connection rolls back what is open on it.

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnection, SqlitePool};
use sqlx::{Executor, Sqlite};

use crate::EventError;

/// The savepoint that marks a transaction as the one the store began.
macro_rules! mark {
    () => {
        "edupulse_transaction"
    };
}

const BEGIN: &str = concat!("BEGIN IMMEDIATE; SAVEPOINT ", mark!());
const RELEASE: &str = concat!("RELEASE ", mark!());

/// An open transaction of the embedded store on a pooled connection.
pub(crate) struct SqliteTransaction {
    conn: PoolConnection<Sqlite>,
    /// Until COMMIT or ROLLBACK succeeded: a connection dropped while this is set is closed.
    open: bool,
}

impl SqliteTransaction {
    /// `BEGIN IMMEDIATE` (the write lock at once, so a transaction that reads before it
    /// writes cannot fail to upgrade its lock later), then the marking savepoint.
    pub(crate) async fn begin(pool: &SqlitePool) -> Result<Self, EventError> {
        // Open from the start: a BEGIN that failed half-way closes the connection.
        let mut tx = Self { conn: pool.acquire().await?, open: true };
        tx.conn.execute(sqlx::raw_sql(BEGIN)).await?;
        Ok(tx)
    }

    /// Commits, if the transaction is still the one begun.
    ///
    /// # Errors
    /// [`EventError::TransactionAborted`] when it is not (the caller ended it on the raw
    /// connection); [`EventError::Database`] when COMMIT fails. The connection is closed in
    /// both cases, which rolls back what is open on it.
    pub(crate) async fn commit(mut self) -> Result<(), EventError> {
        if self.conn.execute(sqlx::raw_sql(RELEASE)).await.is_err() {
            return Err(EventError::TransactionAborted);
        }
        self.conn.execute(sqlx::raw_sql("COMMIT")).await?;
        self.open = false;
        Ok(())
    }

    /// Rolls back.
    ///
    /// # Errors
    /// [`EventError::Database`] when ROLLBACK fails; the connection is closed then.
    pub(crate) async fn rollback(mut self) -> Result<(), EventError> {
        self.conn.execute(sqlx::raw_sql("ROLLBACK")).await?;
        self.open = false;
        Ok(())
    }
}

/// The connection, for statements in the transaction.
impl std::ops::Deref for SqliteTransaction {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for SqliteTransaction {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }
}

impl Drop for SqliteTransaction {
    /// A transaction dropped open (an early return, a cancelled future, a failed COMMIT or
    /// ROLLBACK): its connection is closed, which rolls back what is open on it, rather
    /// than pooled in a state nobody can vouch for.
    fn drop(&mut self) {
        if self.open {
            self.conn.close_on_drop();
        }
    }
}
