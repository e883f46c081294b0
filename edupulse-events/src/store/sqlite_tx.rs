//! A transaction of the embedded store: sqlx's transaction manager keeps count of it, as a
//! `sqlx::Transaction` would, and the store checks at commit that it is still the
//! transaction it began, and brings back to a known state, or never pools again, a
//! connection that a caller put out of step.
//!
//! sqlx counts each connection's transaction depth itself. A caller that runs `ROLLBACK`
//! (or `COMMIT`) on the raw connection of a store transaction puts that count out of step
//! with SQLite: sqlx's COMMIT then fails, its ROLLBACK too, and the connection went back to
//! the pool that way (later transactions on it failed: "attempted to call begin_with at
//! non-zero transaction depth"). Worse, after `ROLLBACK` and `BEGIN IMMEDIATE` by the
//! caller, sqlx's COMMIT committed the caller's new transaction and reported success for
//! events that were gone. Here:
//!
//! - `BEGIN IMMEDIATE` is followed by a savepoint of the store's own. SQLite drops every
//!   savepoint when a transaction ends, so at commit the savepoint is there only if the
//!   transaction is still the one begun: commit releases it first, and "no such savepoint"
//!   is [`EventError::TransactionAborted`].
//! - A connection whose transaction was not the one begun, or whose COMMIT or ROLLBACK
//!   failed, is repaired: whatever is open on it is rolled back and sqlx's count is brought
//!   back to zero (a `BEGIN` for sqlx's own `ROLLBACK` to end). Only when that fails too is
//!   it closed instead of pooled. Closing is the last resort, not the first: it rolls back
//!   what is open, but it also ends an in-memory database (`sqlite::memory:`) whose only
//!   connection it is.
//! - A transaction dropped open is rolled back as sqlx's own are: the rollback is queued
//!   on the connection's worker before anything else can use it.
//! - A pooled connection that is still out of step (its rollback failed) is found at the
//!   next begin, closed, and another one is taken.

use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteTransactionManager};
use sqlx::{Executor, SqlSafeStr, Sqlite};
use sqlx_core::transaction::TransactionManager;

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
    /// Until it is committed or rolled back: dropped open, it is rolled back.
    open: bool,
}

impl SqliteTransaction {
    /// `BEGIN IMMEDIATE` (the write lock at once, so a transaction that reads before it
    /// writes cannot fail to upgrade its lock later), then the marking savepoint.
    pub(crate) async fn begin(pool: &SqlitePool) -> Result<Self, EventError> {
        let mut conn = pool.acquire().await?;
        if SqliteTransactionManager::get_transaction_depth(&conn) != 0 {
            // Left out of step by a rollback that failed: never used again.
            conn.close_on_drop();
            drop(conn);
            conn = pool.acquire().await?;
        }
        match SqliteTransactionManager::begin(&mut conn, Some(BEGIN.into_sql_str())).await {
            Ok(()) => Ok(Self { conn, open: true }),
            Err(e) => {
                // BEGIN may have worked and the savepoint not: end whatever is open.
                let _ = conn.execute(sqlx::raw_sql("ROLLBACK")).await;
                if SqliteTransactionManager::get_transaction_depth(&conn) != 0 {
                    conn.close_on_drop();
                }
                Err(e.into())
            }
        }
    }

    /// Commits, if the transaction is still the one begun.
    ///
    /// # Errors
    /// [`EventError::TransactionAborted`] when it is not (the caller ended it on the raw
    /// connection; what is open now is rolled back); [`EventError::Database`] when COMMIT
    /// fails.
    pub(crate) async fn commit(mut self) -> Result<(), EventError> {
        if self.conn.execute(sqlx::raw_sql(RELEASE)).await.is_err() {
            self.repair().await;
            return Err(EventError::TransactionAborted);
        }
        let committed = SqliteTransactionManager::commit(&mut self.conn).await;
        self.ended(committed).await
    }

    /// Rolls back.
    ///
    /// # Errors
    /// [`EventError::Database`] when ROLLBACK fails (the connection is repaired or closed).
    pub(crate) async fn rollback(mut self) -> Result<(), EventError> {
        let rolled_back = SqliteTransactionManager::rollback(&mut self.conn).await;
        self.ended(rolled_back).await
    }

    /// After sqlx's COMMIT or ROLLBACK: the transaction ended, or the connection is
    /// repaired and the error returned.
    async fn ended(&mut self, result: Result<(), sqlx::Error>) -> Result<(), EventError> {
        match result {
            Ok(()) => {
                self.open = false;
                Ok(())
            }
            Err(e) => {
                self.repair().await;
                Err(e.into())
            }
        }
    }

    /// Brings the connection back to no transaction with sqlx's count at zero, or closes it
    /// instead of pooling it.
    async fn repair(&mut self) {
        self.open = false;
        // Whatever is open is rolled back; an error means nothing was.
        let _ = self.conn.execute(sqlx::raw_sql("ROLLBACK")).await;
        // sqlx still counts one transaction: give its ROLLBACK one to end.
        let mut repaired = self.conn.execute(sqlx::raw_sql("BEGIN")).await.is_ok()
            && SqliteTransactionManager::rollback(&mut self.conn).await.is_ok();
        repaired &= SqliteTransactionManager::get_transaction_depth(&self.conn) == 0;
        if !repaired {
            tracing::warn!(
                "store: a SQLite connection in an unknown transaction state is closed, not pooled"
            );
            self.conn.close_on_drop();
        }
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
    /// Dropped open (an early return, a cancelled future): rolled back, as sqlx's own
    /// transactions are, by a ROLLBACK queued on the connection before it goes back to the
    /// pool. If that ROLLBACK fails, the next `begin` finds the connection out of step.
    fn drop(&mut self) {
        if self.open {
            SqliteTransactionManager::start_rollback(&mut self.conn);
        }
    }
}
