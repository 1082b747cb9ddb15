//! Database schema: numbered migrations in `migrations/` (refinery), applied at startup and by
//! `loginflow migrate`, recorded in `refinery_schema_history`. `V1` is idempotent, so it upgrades a
//! `user_logins` table made from the task's reference DDL, and a database made by any loginflow
//! before migrations were numbered (its schema version in a table comment), as well as it creates a
//! fresh one. Columns are only ever added; nothing is dropped or rewritten.

/// Serialises concurrent migrations of several replicas starting at once.
const MIGRATION_LOCK_ID: i64 = 0x6c6f_6769_6e66_6c6f; // "loginflo"

/// What the last loginflow before numbered migrations wrote on `user_logins` (the schema V1 holds).
const UNNUMBERED_SCHEMA: &str = "loginflow schema 3";
mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Why the schema could not be brought up to date.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
    #[error("schema migration failed: {0}")]
    Migration(#[from] refinery::Error),
}

impl MigrationError {
    /// The database's error, when it gave one (for its SQLSTATE).
    pub fn database_error(&self) -> Option<&tokio_postgres::Error> {
        match self {
            MigrationError::Database(err) => Some(err),
            MigrationError::Migration(err) => {
                std::error::Error::source(err).and_then(|source| source.downcast_ref::<tokio_postgres::Error>())
            }
        }
    }
}

/// Applies the migrations not yet applied, all in one transaction, under a session advisory lock
/// so replicas starting together apply them once. Safe to run concurrently and repeatedly; when
/// every migration is applied it only reads the history (no table lock, so a replica starting up
/// never stalls the others' writes). On an error the caller drops the connection (it may still
/// hold the lock).
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), MigrationError> {
    // Read first, without DDL: a role that may write rows but not create tables starts on a current schema.
    if is_current(client).await? {
        return Ok(());
    }
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_ID]).await?;
    let applied = embedded::migrations::runner().set_grouped(true).run_async(client).await;
    client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_ID]).await?;
    applied?;
    Ok(())
}

/// Whether every migration is applied (read from the history, no lock taken).
async fn is_current(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    let history = client
        .query_one(
            "SELECT to_regclass('refinery_schema_history') IS NOT NULL,
                    obj_description(to_regclass('user_logins'), 'pg_class'),
                    has_schema_privilege(current_schema(), 'CREATE')",
            &[],
        )
        .await?;
    let latest = embedded::migrations::runner().get_migrations().iter().map(|m| m.version()).max();
    if !history.get::<_, bool>(0) {
        // Made by the last loginflow before numbered migrations: the same schema as V1. A role that may
        // not create the history table takes it as current (the owner's next `loginflow migrate` records it).
        let unnumbered_current = history.get::<_, Option<&str>>(1) == Some(UNNUMBERED_SCHEMA) && latest == Some(1);
        return Ok(unnumbered_current && !history.get::<_, bool>(2));
    }
    let applied: Option<i32> = client.query_one("SELECT max(version) FROM refinery_schema_history", &[]).await?.get(0);
    Ok(applied.is_some() && applied >= latest)
}

/// Indexes that only speed up the vault's commands, built without blocking writers (`CREATE
/// INDEX CONCURRENTLY`, outside any transaction) by `loginflow migrate`: on a large vault they
/// take long, which must not happen under `run`'s migration locks and statement deadline.
pub async fn create_lookup_indexes(client: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(
            "CREATE INDEX CONCURRENTLY IF NOT EXISTS user_logins_pii_user_fingerprints
             ON user_logins_pii USING gin (user_fingerprints)",
        )
        .await
}
