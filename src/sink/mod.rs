//! Sink: writes one window to PostgreSQL, isolating the records the database refuses.
//!
//! Logins go in with a binary `COPY` (the fastest path, 1.1–1.7× the UNNEST insert; see
//! BENCHMARKS.md). COPY cannot skip rows that already exist, so when a window holds a
//! message already stored (a redelivery) the unique index refuses it and the window is
//! written again with `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO NOTHING`.
//!
//! Errors are sorted by the one classification in [`errors`]: when the database is
//! unavailable or busy the whole window fails with [`SinkError`] and the caller retries
//! it; when it refuses a record (any other SQLSTATE, at any statement or at `COMMIT`),
//! the window is split in halves, each its own transaction, until the failing records
//! stand alone. A refused login is quarantined as `db_rejected` with its SQLSTATE; a
//! record that not even the quarantine table accepts is reported as unstorable, so its
//! message can be released to the queue's redrive policy. Every write has a deadline.

mod columns;
pub mod connect;
pub mod errors;
pub mod stage;

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use crate::records::{MaskedLogin, QuarantineRecord, Sealed, TRANSFORM_VERSION};
use columns::{LoginRow, COPY_LOGINS, COPY_TYPES, INSERT_LOGINS};
pub use connect::Database;
pub use errors::ErrorClass;
use errors::{classify, sqlstate};

/// Default deadline of one window's write, all its transactions included.
pub const DEFAULT_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a write waits for a pooled connection.
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default deadline of a connection attempt (`connect_timeout` in DATABASE_URL overrides it).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes of quarantine bodies sent in one statement: PostgreSQL refuses messages over 1 GB,
/// and each statement is copied twice on its way out (parameters, then the connection's write
/// buffer), so small statements keep big bodies from doubling the memory they take.
const QUARANTINE_STATEMENT_BYTES: usize = 2 << 20;
/// A message with a row already (stored by a version that validated differently, and redelivered
/// before its delete) is not quarantined too: each message id is stored once.
const INSERT_QUARANTINE: &str = "\
INSERT INTO user_logins_quarantine (message_id, reason, detail, masked_body, sent_at, mask_key_id, transform_version)
SELECT v.*, $7::text FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
    AS v(message_id, reason, detail, masked_body, sent_at, mask_key_id)
WHERE NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.message_id = v.message_id)
ON CONFLICT (message_id) DO NOTHING";

/// [`INSERT_QUARANTINE`] for `quarantine replay`: a message still quarantined keeps its row
/// (and `received_at`), with its new reason and copy; one that has a row meanwhile gets none.
const UPSERT_QUARANTINE: &str = "\
INSERT INTO user_logins_quarantine (message_id, reason, detail, masked_body, sent_at, mask_key_id, transform_version)
SELECT v.*, $7::text FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[])
    AS v(message_id, reason, detail, masked_body, sent_at, mask_key_id)
WHERE NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.message_id = v.message_id)
ON CONFLICT (message_id) DO UPDATE SET reason = EXCLUDED.reason, detail = EXCLUDED.detail,
    masked_body = EXCLUDED.masked_body, mask_key_id = EXCLUDED.mask_key_id, transform_version = EXCLUDED.transform_version";

/// Before replayed logins are written: their quarantine rows go, and so do their vault rows,
/// unless erased (`forget` wins) or belonging to a row already stored under the id.
const CLEAR_REPLAYED: &str = "\
WITH gone AS (DELETE FROM user_logins_quarantine WHERE message_id = ANY($1))
DELETE FROM user_logins_pii p
WHERE p.message_id = ANY($1) AND p.erased_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.message_id = p.message_id)";

/// Replayed records still quarantined whose id has a row meanwhile: stored, so out of quarantine.
const CLEAR_STORED: &str = "\
DELETE FROM user_logins_quarantine q
WHERE q.message_id = ANY($1) AND EXISTS (SELECT 1 FROM user_logins l WHERE l.message_id = q.message_id)";

const INSERT_SEALED: &str = "\
INSERT INTO user_logins_pii (message_id, data_key_id, sealed_ip, sealed_device_id, sealed_body, user_fingerprints)
SELECT m, k, ip, dev, body, string_to_array(fp, ' ')
FROM UNNEST($1::text[], $2::uuid[], $3::bytea[], $4::bytea[], $5::bytea[], $6::text[]) AS v(m, k, ip, dev, body, fp)
ON CONFLICT (message_id) DO NOTHING";

/// [`INSERT_SEALED`] for `quarantine replay`: a refused row's record replayed and still
/// quarantined gets the event rebuilt from it as its sealed body, so its next replay has it whatever
/// its new clear copy (unless erased, sealed with another key, or stored as a row meanwhile).
const UPSERT_SEALED: &str = "\
INSERT INTO user_logins_pii (message_id, data_key_id, sealed_ip, sealed_device_id, sealed_body, user_fingerprints)
SELECT m, k, ip, dev, body, string_to_array(fp, ' ')
FROM UNNEST($1::text[], $2::uuid[], $3::bytea[], $4::bytea[], $5::bytea[], $6::text[]) AS v(m, k, ip, dev, body, fp)
ON CONFLICT (message_id) DO UPDATE SET sealed_body = EXCLUDED.sealed_body,
    user_fingerprints = COALESCE(EXCLUDED.user_fingerprints, user_logins_pii.user_fingerprints)
WHERE user_logins_pii.sealed_body IS NULL AND user_logins_pii.erased_at IS NULL
  AND EXCLUDED.sealed_body IS NOT NULL AND user_logins_pii.data_key_id = EXCLUDED.data_key_id
  AND NOT EXISTS (SELECT 1 FROM user_logins l WHERE l.message_id = EXCLUDED.message_id)";

/// The advisory lock taken (shared) by every transaction of `quarantine replay` that moves sealed
/// values to a new vault row ([`share_erasure_lock`]), and (exclusive) by `forget`
/// ([`take_erasure_lock`]): a replayed message's new vault row is either committed before
/// `forget` looks for the user's rows, or written after it and sees its erasure.
const ERASURE_LOCK_ID: i64 = 7_421_350_061;

/// Takes the erasure lock shared, until the end of `tx` (see [`ERASURE_LOCK_ID`]).
pub async fn share_erasure_lock(tx: &tokio_postgres::Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock_shared($1)", &[&ERASURE_LOCK_ID]).await.map(drop)
}

/// Takes the erasure lock exclusively, until the end of `tx` (see [`ERASURE_LOCK_ID`]).
pub async fn take_erasure_lock(tx: &tokio_postgres::Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&ERASURE_LOCK_ID]).await.map(drop)
}

/// The write probe's rows, one step per table (the vault's two together, for the key they share):
/// each inserted under a savepoint and rolled back to it. `{id}` is a fresh UUID per probe, so
/// probes of several replicas never wait on each other's rows. Values a real record could have.
const PROBE_INSERTS: [&str; 3] = [
    "INSERT INTO user_logins ({login_columns})
     VALUES ('write-probe:{id}', '{id}', 'probe', repeat('0', 64), repeat('0', 64), NULL, 10000000, '1.0',
         current_date, now(), 'probe', 'probe')",
    "INSERT INTO user_logins_quarantine (message_id, reason, detail, masked_body, sent_at, mask_key_id, transform_version)
     VALUES ('write-probe:{id}', 'write_probe', NULL, '{}', now(), 'probe', 'probe')",
    "INSERT INTO pii_data_keys (id, kms_key_id, wrapped_key) VALUES ('{id}', 'write-probe', '\\x00');
     INSERT INTO user_logins_pii (message_id, data_key_id) VALUES ('write-probe:{id}', '{id}')",
];

/// Errors that fail a whole window: the database is unavailable or busy. The window is retried.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("no database connection: {}", describe_pool_error(.0))]
    Pool(deadpool_postgres::PoolError),
    #[error("database unavailable: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("write did not finish within {0:?}; cancelled and rolled back")]
    Timeout(Duration),
    #[error("write cancelled by shutdown; rolled back")]
    Cancelled,
    #[error(transparent)]
    Migration(crate::schema::MigrationError),
}

impl SinkError {
    /// What the error says of the database ([`errors::classify`]): a write that outlasts its
    /// deadline is contention; no connection at all, the database unavailable.
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Database(err) => classify(err),
            SinkError::Migration(err) => err.database_error().map_or(ErrorClass::Unavailable, classify),
            SinkError::Pool(_) => ErrorClass::Unavailable,
            SinkError::Timeout(_) | SinkError::Cancelled => ErrorClass::Busy,
        }
    }

    /// The SQLSTATE, for logs (`none` when the error did not come from the server).
    pub fn sqlstate(&self) -> &str {
        match self {
            SinkError::Database(err) => sqlstate(err),
            SinkError::Migration(err) => err.database_error().map_or("none", sqlstate),
            SinkError::Pool(deadpool_postgres::PoolError::Backend(err)) => sqlstate(err),
            _ => "none",
        }
    }

    /// A connection refused for a reason retrying cannot fix: the server's certificate is not
    /// trusted by the TLS settings, or authentication failed.
    pub fn needs_operator(&self) -> bool {
        let SinkError::Pool(deadpool_postgres::PoolError::Backend(err)) = self else { return false };
        matches!(connect::connect_failure(err), Some(connect::CERTIFICATE_FAILED | connect::AUTHENTICATION_FAILED))
    }
}

impl From<deadpool_postgres::PoolError> for SinkError {
    fn from(err: deadpool_postgres::PoolError) -> SinkError {
        SinkError::Pool(err)
    }
}

/// A window held by a failed write ([`Sink::hold`]).
pub struct Held(std::sync::Arc<std::sync::Mutex<usize>>);

impl Held {
    /// Changes the count of held windows, and the gauge with it, under one lock (so a window
    /// released and another held at once cannot leave the gauge saying the opposite).
    fn count(held: &std::sync::Mutex<usize>, change: impl FnOnce(&mut usize)) {
        let mut count = held.lock().unwrap_or_else(|e| e.into_inner());
        change(&mut count);
        crate::metrics::gauge!(crate::metrics::DATABASE_WRITABLE).set(if *count == 0 { 1.0 } else { 0.0 });
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        Held::count(&self.0, |count| *count = count.saturating_sub(1));
    }
}

/// What one window's write stored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Committed {
    /// New rows in `user_logins`.
    pub written: u64,
    /// Logins whose message id already had a row (redeliveries caught by the unique index).
    pub already_stored: u64,
    /// New rows in `user_logins_quarantine`, including rows the database rejected.
    pub quarantined: u64,
    /// Logins the database refused, now quarantined as `db_rejected`.
    pub rejected: Vec<QuarantineRecord>,
    /// Message ids of records that could not be stored at all, not even in quarantine.
    pub unstorable: Vec<String>,
}

impl Committed {
    /// Adds what another write stored.
    pub fn add(&mut self, other: Committed) {
        self.written += other.written;
        self.already_stored += other.already_stored;
        self.quarantined += other.quarantined;
        self.rejected.extend(other.rejected);
        self.unstorable.extend(other.unstorable);
    }
}

/// How logins are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    /// Binary COPY; a window with an already-stored message is redone with the insert.
    Copy,
    /// `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO NOTHING`.
    UnnestInsert,
}

/// How one write goes about it.
#[derive(Debug, Clone, Copy)]
struct Mode {
    method: WriteMethod,
    /// `quarantine replay` stores messages stored before ([`Sink::replace`]).
    replace: bool,
}

/// A pool of connections to the target database.
#[derive(Clone)]
pub struct Sink {
    pool: Pool,
    database: Database,
    flush_timeout: Duration,
    /// Whether the write probe covers the vault's tables ([`Sink::with_vault_tables`]).
    vault_tables: bool,
    /// Row-level security applies to `user_logins` for this role ([`Sink::migrate`]): no COPY.
    copy_refused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Windows whose write failed and is being retried ([`Sink::hold`]); shared by every clone.
    held: std::sync::Arc<std::sync::Mutex<usize>>,
}

impl Sink {
    /// A pool of up to `connections` connections (created lazily), with the default flush deadline.
    pub fn new(database: Database, connections: usize) -> Sink {
        Sink::with_flush_timeout(database, connections, DEFAULT_FLUSH_TIMEOUT)
    }

    /// A pool whose writes end within `flush_timeout`: each statement is also bounded by the
    /// server's `statement_timeout`, and connections use TCP keepalive, so a stalled or
    /// half-open connection becomes an error instead of a hang.
    pub fn with_flush_timeout(mut database: Database, connections: usize, flush_timeout: Duration) -> Sink {
        with_deadlines(&mut database.config, flush_timeout);
        let manager = Manager::from_config(
            database.config.clone(),
            database.tls.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Verified },
        );
        let connect_timeout = database.config.get_connect_timeout().copied().unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let pool = Pool::builder(manager)
            .max_size(connections)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(connect_timeout))
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .build()
            .expect("runtime is set, so timeouts are valid");
        let (copy_refused, held) = Default::default();
        Sink { pool, database, flush_timeout, vault_tables: false, copy_refused, held }
    }

    /// [`Sink::migrate`], retried while the database is unavailable. A certificate the
    /// settings do not trust, or credentials the server refuses, end startup instead: waiting
    /// will not change them.
    pub async fn migrate_with_retry(&self, max_backoff: Duration) -> Result<(), SinkError> {
        let retry = crate::retry::Retry::new("sink", max_backoff);
        retry.run("schema migration", || self.migrate(), |err: &SinkError| !err.needs_operator()).await
    }

    /// Creates or upgrades the schema, and learns whether row-level security applies to this role's writes to `user_logins`:
    /// COPY cannot write such a table (and tokio-postgres then loses the connection, which would
    /// read as an outage), so logins go in with the insert instead.
    pub async fn migrate(&self) -> Result<(), SinkError> {
        let mut client = self.pool.get().await?;
        if let Err(err) = crate::schema::migrate(&mut client).await {
            // It may still hold the migration lock: never back into the pool.
            drop(Object::take(client));
            return Err(SinkError::Migration(err));
        }
        let row = client.query_one("SELECT row_security_active('user_logins')", &[]).await?;
        self.copy_refused.store(row.get::<_, bool>(0), std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether the database answers `SELECT 1` within `timeout`, on a connection of its own
    /// (never one of the writers', so a busy sink does not look like an unreachable database).
    pub async fn ping(&self, timeout: Duration) -> bool {
        let answers = self.on_fresh_connection(timeout, async |client| client.batch_execute("SELECT 1").await.is_ok());
        answers.await == Some(true)
    }

    /// Whether the database takes writes now ([`probe_writes`]) within `timeout`, on a
    /// connection of its own. A probe row refused for its values (a trigger's `RAISE`, a
    /// constraint) still shows a database that takes writes; any other failure (read-only, a
    /// privilege or table gone, a lock held, no connection, no answer in time) shows one that
    /// does not.
    pub async fn takes_writes(&self, timeout: Duration) -> bool {
        let vault_tables = self.vault_tables;
        self.on_fresh_connection(timeout, async |client| probe_writes(client, vault_tables).await).await == Some(true)
    }

    /// The same sink, its write probe covering the vault's tables too (the vault is on).
    pub fn with_vault_tables(mut self, on: bool) -> Sink {
        self.vault_tables = on;
        self
    }

    /// Whether every window's last write committed: false while one is retried because the
    /// database cannot take it (unavailable, refusing writes, or busy). `/readyz` reports it.
    pub fn is_writable(&self) -> bool {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) == 0
    }

    /// Marks a window held until the returned guard is dropped (its write committed, or it was
    /// given up): `loginflow_database_writable` is 0 while any window is held.
    pub fn hold(&self) -> Held {
        Held::count(&self.held, |count| *count += 1);
        Held(self.held.clone())
    }

    /// Runs `check` on a fresh connection (never one of the writers'), closed after: its answer,
    /// or `None` when no connection was made or no answer came within `timeout`.
    async fn on_fresh_connection<T>(
        &self,
        timeout: Duration,
        check: impl AsyncFnOnce(&tokio_postgres::Client) -> T,
    ) -> Option<T> {
        let run = async {
            let (client, connection) = self.database.config.connect(self.database.tls.clone()).await.ok()?;
            let connection = tokio::spawn(connection);
            let answer = check(&client).await;
            drop(client);
            let _ = connection.await;
            Some(answer)
        };
        tokio::time::timeout(timeout, run).await.ok().flatten()
    }

    /// The connection pool (for the vault's data keys).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A pooled connection, for tests and tools.
    pub async fn client(&self) -> Result<Object, SinkError> {
        Ok(self.pool.get().await?)
    }

    /// Writes logins and quarantine records, isolating refused records (see the module
    /// doc). Fails only when the database is unavailable, the deadline passes, or `cancel`
    /// fires; the open transaction is then rolled back and nothing of it is committed.
    pub async fn write(
        &self,
        logins: &[MaskedLogin],
        quarantine: &[QuarantineRecord],
        cancel: &CancellationToken,
    ) -> Result<Committed, SinkError> {
        let method = match self.copy_refused.load(std::sync::atomic::Ordering::Relaxed) {
            true => WriteMethod::UnnestInsert,
            false => WriteMethod::Copy,
        };
        self.write_using(method, logins, quarantine, cancel).await
    }

    /// [`Sink::write`] for quarantined messages run again (`quarantine replay`). A login leaves
    /// quarantine in the transaction that writes its row, and its vault row is replaced by the
    /// login's sealed values (unless `forget` erased it, or the id has a row already, whose
    /// values stay). A record still quarantined keeps its quarantine row, `received_at` and
    /// sealed original, with its new reason and copy. An id with a row in `user_logins` is never
    /// also left in quarantine, so each message is stored once.
    pub async fn replace(
        &self,
        logins: &[MaskedLogin],
        quarantine: &[QuarantineRecord],
        cancel: &CancellationToken,
    ) -> Result<Committed, SinkError> {
        self.write_with(Mode { method: WriteMethod::UnnestInsert, replace: true }, logins, quarantine, cancel).await
    }

    /// [`Sink::write`] with a chosen method (benches compare them).
    pub async fn write_using(
        &self,
        method: WriteMethod,
        logins: &[MaskedLogin],
        quarantine: &[QuarantineRecord],
        cancel: &CancellationToken,
    ) -> Result<Committed, SinkError> {
        self.write_with(Mode { method, replace: false }, logins, quarantine, cancel).await
    }

    async fn write_with(
        &self,
        mode: Mode,
        logins: &[MaskedLogin],
        quarantine: &[QuarantineRecord],
        cancel: &CancellationToken,
    ) -> Result<Committed, SinkError> {
        let mut client = tokio::select! {
            client = self.pool.get() => client?,
            () = cancel.cancelled() => return Err(SinkError::Cancelled),
        };
        let outcome = tokio::select! {
            result = tokio::time::timeout(self.flush_timeout, store(&mut client, mode, logins, quarantine)) => {
                match result {
                    Ok(result) => result.map_err(SinkError::from),
                    Err(_) => Err(SinkError::Timeout(self.flush_timeout)),
                }
            }
            () = cancel.cancelled() => Err(SinkError::Cancelled),
        };
        match &outcome {
            Err(SinkError::Timeout(_) | SinkError::Cancelled) => discard(client, self.database.tls.clone()),
            // A session of a database that took no writes may never take them (a demoted primary,
            // `default_transaction_read_only` read at connect): the next attempt connects afresh.
            Err(err) if err.class() == ErrorClass::Unavailable => drop(Object::take(client)),
            _ => {}
        }
        outcome
    }
}

/// Drops a connection whose statement may still run: asks the server to cancel it (so a
/// lock wait ends now), then closes the connection, which rolls the transaction back.
fn discard(client: Object, tls: tokio_postgres_rustls::MakeRustlsConnect) {
    let client = Object::take(client);
    let cancel = client.cancel_token();
    drop(client);
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(2), cancel.cancel_query(tls)).await;
    });
}

/// The write probe, on `client`: one transaction that takes the writers' lock on the tables the
/// sink writes without waiting for it, inserts a row into each under a savepoint and rolls back
/// to it, then commits (with a transaction id, so the commit is a real one: a synchronous
/// standby gone makes it wait). A row refused for its values (a trigger's `RAISE`, a constraint)
/// is the row's: the database still takes writes, and the next table is tried. Anything else
/// (read-only, a privilege or table gone, a lock held) is a database that takes none.
async fn probe_writes(client: &tokio_postgres::Client, vault_tables: bool) -> bool {
    let (tables, steps) = match vault_tables {
        true => ("user_logins, user_logins_quarantine, user_logins_pii, pii_data_keys", &PROBE_INSERTS[..]),
        false => ("user_logins, user_logins_quarantine", &PROBE_INSERTS[..2]),
    };
    let begin = format!("BEGIN; LOCK TABLE {tables} IN ROW EXCLUSIVE MODE NOWAIT");
    if client.batch_execute(&begin).await.is_err() {
        return false;
    }
    let id = uuid::Uuid::new_v4().to_string();
    for step in steps {
        let step = step.replace("{id}", &id).replace("{login_columns}", &columns::names());
        let sql = format!("SAVEPOINT probe; {step}; ROLLBACK TO SAVEPOINT probe");
        match client.batch_execute(&sql).await {
            Ok(()) => {}
            Err(err) if classify(&err) == ErrorClass::Record => {
                if client.batch_execute("ROLLBACK TO SAVEPOINT probe").await.is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    client.batch_execute("SELECT txid_current(); COMMIT").await.is_ok()
}

/// A pool error with, for a failed connection, the step that failed (TCP, TLS, certificate, authentication).
fn describe_pool_error(err: &deadpool_postgres::PoolError) -> String {
    match err {
        deadpool_postgres::PoolError::Backend(err) => match connect::connect_failure(err) {
            Some(step) => format!("{step}: {}", crate::errors::error_chain(err)),
            None => crate::errors::error_chain(err),
        },
        other => other.to_string(),
    }
}

/// Deadlines on the connection itself: statement timeout, TCP keepalive and user timeout.
fn with_deadlines(config: &mut tokio_postgres::Config, flush_timeout: Duration) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    let statement_timeout = format!("-c statement_timeout={}", flush_timeout.as_millis());
    let options = match config.get_options() {
        Some(existing) if !existing.is_empty() => format!("{existing} {statement_timeout}"),
        _ => statement_timeout,
    };
    config.options(options);
    config.keepalives(true).keepalives_idle(Duration::from_secs(15)).keepalives_interval(Duration::from_secs(5));
    config.keepalives_retries(3).tcp_user_timeout(Duration::from_secs(30));
}

/// A slice of a window: logins first, then quarantine records.
#[derive(Clone, Copy)]
pub struct Part<'a> {
    pub logins: &'a [MaskedLogin],
    pub quarantine: &'a [QuarantineRecord],
}

impl<'a> Part<'a> {
    /// Records in it.
    pub fn len(&self) -> usize {
        self.logins.len() + self.quarantine.len()
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its first record alone, that record's message id, and the part after it.
    pub fn split_first(&self) -> Option<(Part<'a>, &'a str, Part<'a>)> {
        if let Some((login, logins)) = self.logins.split_first() {
            let first = Part { logins: std::slice::from_ref(login), quarantine: &[] };
            return Some((first, &login.message_id, Part { logins, quarantine: self.quarantine }));
        }
        let (record, quarantine) = self.quarantine.split_first()?;
        let first = Part { logins: &[], quarantine: std::slice::from_ref(record) };
        Some((first, &record.message_id, Part { logins: &[], quarantine }))
    }

    fn halves(self) -> (Part<'a>, Part<'a>) {
        let mid = self.len() / 2;
        let (l1, l2) = self.logins.split_at(mid.min(self.logins.len()));
        let (q1, q2) = self.quarantine.split_at(mid.saturating_sub(self.logins.len()));
        (Part { logins: l1, quarantine: q1 }, Part { logins: l2, quarantine: q2 })
    }
}

/// A record the database refused, with its SQLSTATE.
enum Refused<'a> {
    Login(&'a MaskedLogin, String),
    Quarantine(&'a QuarantineRecord),
}

/// Stores a window: splits on record errors, quarantines refused logins, reports what
/// could not be stored. Returns an error only when the database is unavailable.
async fn store(
    client: &mut Object,
    mode: Mode,
    logins: &[MaskedLogin],
    quarantine: &[QuarantineRecord],
) -> Result<Committed, tokio_postgres::Error> {
    let mut committed = Committed::default();
    let refused = store_isolating(client, mode, Part { logins, quarantine }, &mut committed).await?;
    let mut db_rejected = Vec::new();
    for record in refused {
        match record {
            Refused::Login(login, code) => {
                tracing::warn!(message_id = %login.message_id, sqlstate = %code,
                               "row refused by the database; quarantined as db_rejected");
                db_rejected.push(QuarantineRecord::db_rejected(login, &code));
            }
            Refused::Quarantine(record) => committed.unstorable.push(record.message_id.clone()),
        }
    }
    if !db_rejected.is_empty() {
        let part = Part { logins: &[], quarantine: &db_rejected };
        for record in store_isolating(client, mode, part, &mut committed).await? {
            if let Refused::Quarantine(record) = record {
                committed.unstorable.push(record.message_id.clone());
            }
        }
        let unstorable = &committed.unstorable;
        committed.rejected = db_rejected.into_iter().filter(|r| !unstorable.contains(&r.message_id)).collect();
    }
    for message_id in &committed.unstorable {
        tracing::warn!(%message_id, "not even the quarantine accepts this message; released undeleted for the dead-letter queue");
    }
    Ok(committed)
}

/// Writes `part` in one transaction; when the database refuses a record, writes each half
/// in its own transaction, down to single records, and returns those it refused.
async fn store_isolating<'a>(
    client: &mut Object,
    mode: Mode,
    part: Part<'a>,
    committed: &mut Committed,
) -> Result<Vec<Refused<'a>>, tokio_postgres::Error> {
    let mut refused = Vec::new();
    let mut pending = vec![part];
    while let Some(part) = pending.pop() {
        if part.is_empty() {
            continue;
        }
        match write_transaction(client, mode, part).await {
            Ok(done) => committed.add(done),
            Err(err) if classify(&err).retries_window() => return Err(err),
            Err(err) => match (part.logins, part.quarantine) {
                ([login], []) => refused.push(Refused::Login(login, sqlstate(&err).to_owned())),
                ([], [record]) => refused.push(Refused::Quarantine(record)),
                _ => {
                    let (first, second) = part.halves();
                    pending.push(second);
                    pending.push(first);
                }
            },
        }
    }
    Ok(refused)
}

/// One transaction: COPY (or insert) the logins, insert the quarantine records, commit.
/// A COPY refused for an already-stored message id is redone with the skipping insert.
async fn write_transaction(
    client: &mut Object,
    mode: Mode,
    part: Part<'_>,
) -> Result<Committed, tokio_postgres::Error> {
    let result = write_once(client, mode, part).await;
    match result {
        Err(err) if mode.method == WriteMethod::Copy && err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            write_once(client, Mode { method: WriteMethod::UnnestInsert, ..mode }, part).await
        }
        other => other,
    }
}

async fn write_once(client: &mut Object, mode: Mode, part: Part<'_>) -> Result<Committed, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    if mode.replace {
        share_erasure_lock(&tx).await?;
        let login_ids: Vec<&str> = part.logins.iter().map(|l| l.message_id.as_str()).collect();
        tx.execute(CLEAR_REPLAYED, &[&login_ids]).await?;
    }
    let written = match mode.method {
        WriteMethod::Copy => copy_logins(&tx, part.logins).await?,
        WriteMethod::UnnestInsert => insert_logins(&tx, part.logins).await?,
    };
    let quarantined = insert_quarantine(&tx, part.quarantine, mode.replace).await?;
    if mode.replace {
        let ids: Vec<&str> = part.quarantine.iter().map(|q| q.message_id.as_str()).collect();
        tx.execute(CLEAR_STORED, &[&ids]).await?;
    }
    insert_sealed(
        &tx,
        mode.replace,
        part.logins.iter().map(|l| (&l.message_id, &l.sealed)),
        part.quarantine.iter().map(|q| (&q.message_id, &q.sealed)),
    )
    .await?;
    tx.commit().await?;
    let already_stored = part.logins.len() as u64 - written;
    Ok(Committed { written, already_stored, quarantined, ..Committed::default() })
}

async fn copy_logins(
    tx: &deadpool_postgres::Transaction<'_>,
    logins: &[MaskedLogin],
) -> Result<u64, tokio_postgres::Error> {
    if logins.is_empty() {
        return Ok(0);
    }
    let writer = BinaryCopyInWriter::new(tx.copy_in(COPY_LOGINS.as_str()).await?, &COPY_TYPES);
    pin_mut!(writer);
    for login in logins {
        writer.as_mut().write(&LoginRow::of(login).values()).await?;
    }
    writer.finish().await
}

async fn insert_logins(
    tx: &deadpool_postgres::Transaction<'_>,
    logins: &[MaskedLogin],
) -> Result<u64, tokio_postgres::Error> {
    if logins.is_empty() {
        return Ok(0);
    }
    let rows: Vec<LoginRow> = logins.iter().map(LoginRow::of).collect();
    let arrays = columns::arrays(&rows);
    let parameters: Vec<&(dyn ToSql + Sync)> = arrays.iter().map(|array| &**array as &(dyn ToSql + Sync)).collect();
    let statement = tx.prepare_cached(INSERT_LOGINS.as_str()).await?;
    let rows = tx.execute(&statement, &parameters).await?;
    Ok(rows)
}

/// Inserts quarantine records in statements of at most [`QUARANTINE_STATEMENT_BYTES`] of bodies.
async fn insert_quarantine(
    tx: &deadpool_postgres::Transaction<'_>,
    records: &[QuarantineRecord],
    replace: bool,
) -> Result<u64, tokio_postgres::Error> {
    let mut inserted = 0;
    let mut rest = records;
    while !rest.is_empty() {
        let mut bytes = 0;
        let take = rest
            .iter()
            .take_while(|r| {
                bytes += r.masked_body.len();
                bytes <= QUARANTINE_STATEMENT_BYTES
            })
            .count()
            .max(1);
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        let ids: Vec<&str> = chunk.iter().map(|r| r.message_id.as_str()).collect();
        let reasons: Vec<&str> = chunk.iter().map(|r| r.reason.as_str()).collect();
        let details: Vec<Option<&str>> = chunk.iter().map(|r| r.detail.as_deref()).collect();
        let bodies: Vec<&str> = chunk.iter().map(|r| r.masked_body.as_str()).collect();
        let sent: Vec<DateTime<Utc>> = chunk.iter().map(|r| r.sent_at).collect();
        let mask_key_ids: Vec<&str> = chunk.iter().map(|r| &*r.mask_key_id).collect();
        let statement = tx.prepare_cached(if replace { UPSERT_QUARANTINE } else { INSERT_QUARANTINE }).await?;
        inserted += tx
            .execute(&statement, &[&ids, &reasons, &details, &bodies, &sent, &mask_key_ids, &TRANSFORM_VERSION])
            .await?;
    }
    Ok(inserted)
}

/// Inserts the sealed values of the records that carry some (the vault is on), in the
/// transaction of their rows, in statements of at most [`QUARANTINE_STATEMENT_BYTES`].
async fn insert_sealed<'a>(
    tx: &deadpool_postgres::Transaction<'_>,
    replace: bool,
    logins: impl Iterator<Item = (&'a String, &'a Option<Sealed>)>,
    quarantine: impl Iterator<Item = (&'a String, &'a Option<Sealed>)>,
) -> Result<(), tokio_postgres::Error> {
    let sealed: Vec<(&String, &Sealed)> =
        logins.chain(quarantine).filter_map(|(id, sealed)| sealed.as_ref().map(|s| (id, s))).collect();
    let mut rest = sealed.as_slice();
    while !rest.is_empty() {
        let mut bytes = 0;
        let take = rest
            .iter()
            .take_while(|(_, s)| {
                bytes += s.bytes();
                bytes <= QUARANTINE_STATEMENT_BYTES
            })
            .count()
            .max(1);
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| id.as_str()).collect();
        let keys: Vec<uuid::Uuid> = chunk.iter().map(|(_, s)| s.data_key_id).collect();
        let ips: Vec<Option<&[u8]>> = chunk.iter().map(|(_, s)| s.ip.as_deref()).collect();
        let devices: Vec<Option<&[u8]>> = chunk.iter().map(|(_, s)| s.device_id.as_deref()).collect();
        let bodies: Vec<Option<&[u8]>> = chunk.iter().map(|(_, s)| s.body.as_deref()).collect();
        let fingerprints: Vec<Option<String>> =
            chunk.iter().map(|(_, s)| s.user_fingerprints.as_ref().map(|f| f.join(" "))).collect();
        let statement = tx.prepare_cached(if replace { UPSERT_SEALED } else { INSERT_SEALED }).await?;
        tx.execute(&statement, &[&ids, &keys, &ips, &devices, &bodies, &fingerprints]).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login(id: &str) -> MaskedLogin {
        MaskedLogin {
            message_id: id.into(),
            user_id: "u".into(),
            device_type: "ios".into(),
            masked_ip: "m".into(),
            masked_device_id: "m".into(),
            locale: None,
            app_version: 1,
            app_version_text: "1".into(),
            sent_at: Utc::now(),
            mask_key_id: "k".into(),
            sealed: None,
        }
    }

    #[test]
    fn halves_split_every_part_down_to_single_records() {
        let logins: Vec<MaskedLogin> = (0..3).map(|i| login(&i.to_string())).collect();
        let quarantine: Vec<QuarantineRecord> =
            (3..5).map(|i| QuarantineRecord::db_rejected(&login(&i.to_string()), "x")).collect();
        let mut pending = vec![Part { logins: &logins, quarantine: &quarantine }];
        let mut singles = Vec::new();
        while let Some(part) = pending.pop() {
            assert!(!part.is_empty(), "no empty halves");
            if part.len() == 1 {
                let id = part.logins.first().map(|l| &l.message_id).or(part.quarantine.first().map(|q| &q.message_id));
                singles.push(id.unwrap().clone());
                continue;
            }
            let (a, b) = part.halves();
            assert_eq!(a.len() + b.len(), part.len());
            pending.extend([b, a]);
        }
        assert_eq!(singles, ["0", "1", "2", "3", "4"]);
    }
}
