//! The store's migrations, embedded at compile time with `include_str!` (no proc macro:
//! sqlx's `migrate!` would build sqlx and both drivers a second time, for the compiler, in
//! every build). Each driver lists its own files; a test compares each list with its folder.

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

/// One migration file: version, description (the file name's, as sqlx reads it) and SQL.
pub(crate) type MigrationFile = (i64, &'static str, &'static str);

/// The migrator of `files`, equal to what `sqlx::migrate!` builds from their folder: the
/// same versions, descriptions and checksums (SHA-384 of the SQL), so that a store migrated
/// by either is up to date for the other.
pub(crate) fn migrator(files: &[MigrationFile]) -> Migrator {
    Migrator::with_migrations(
        files
            .iter()
            .map(|&(version, description, sql)| {
                let no_tx = sql.starts_with("-- no-transaction");
                let sql = AssertSqlSafe(sql).into_sql_str();
                Migration::new(version, Cow::Borrowed(description), MigrationType::Simple, sql, no_tx)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Each driver's list is its folder, file by file: a new migration file not listed (or a
    /// listed one renamed) fails here, not in production.
    #[tokio::test]
    async fn each_list_is_its_folder() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        for (folder, listed) in [
            ("postgres", crate::store::postgres::MIGRATION_FILES),
            ("sqlite", crate::store::sqlite::MIGRATION_FILES),
        ] {
            let from_folder = Migrator::new(root.join(folder)).await.unwrap();
            let listed = migrator(listed);
            let key = |m: &Migration| (m.version, m.description.to_string(), m.checksum.to_vec(), m.no_tx);
            let folder_keys: Vec<_> = from_folder.iter().map(key).collect();
            let listed_keys: Vec<_> = listed.iter().map(key).collect();
            assert_eq!(listed_keys, folder_keys, "migrations/{folder}");
        }
    }
}
