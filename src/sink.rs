//! Sink: writes one batch to PostgreSQL in one transaction.
//!
//! Logins go in with a binary `COPY` (the fastest path, 1.1–1.7× the UNNEST insert; see
//! BENCHMARKS.md). COPY cannot skip rows that already exist, so when a batch holds a
//! message already stored (a redelivery) the unique index refuses it and the batch is
//! written again with `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO NOTHING`, which
//! skips those rows. Quarantine records always use the INSERT (they are few).
//! If PostgreSQL rejects a row the validator let through, the batch is replayed row by
//! row under savepoints, and each rejected row is quarantined instead, so it fails
//! neither its batch nor the pipeline.

use chrono::{DateTime, NaiveDate, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::NoTls;

use crate::mask::{MaskedLogin, QuarantineRecord};

const COPY_LOGINS: &str = "\
COPY user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, locale,
                  app_version, app_version_text, create_date, sent_at) FROM STDIN (FORMAT binary)";
const COPY_TYPES: [Type; 10] = [
    Type::TEXT,
    Type::VARCHAR,
    Type::VARCHAR,
    Type::VARCHAR,
    Type::VARCHAR,
    Type::VARCHAR,
    Type::INT4,
    Type::VARCHAR,
    Type::DATE,
    Type::TIMESTAMPTZ,
];

const INSERT_LOGINS: &str = "\
INSERT INTO user_logins (message_id, user_id, device_type, masked_ip, masked_device_id, locale,
                         app_version, app_version_text, create_date, sent_at)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::int4[], $8::text[], $9::date[], $10::timestamptz[])
ON CONFLICT (message_id) DO NOTHING";

const INSERT_QUARANTINE: &str = "\
INSERT INTO user_logins_quarantine (message_id, reason, detail, masked_body, sent_at)
SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])
ON CONFLICT (message_id) DO NOTHING";

/// Errors of the sink. Per-record problems never surface here: they become quarantine rows.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The database could not be reached or the transaction failed as a whole; retry the batch.
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {0}")]
    Database(#[from] tokio_postgres::Error),
}

/// What one committed batch did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Committed {
    /// New rows in `user_logins`.
    pub written: u64,
    /// Logins whose message id already had a row (redeliveries caught by the unique index).
    pub already_stored: u64,
    /// New rows in `user_logins_quarantine`, including rows the database rejected.
    pub quarantined: u64,
    /// Logins the database refused, now quarantined.
    pub rejected: Vec<QuarantineRecord>,
}

/// How logins are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMethod {
    /// Binary COPY; a batch with an already-stored message is redone with the insert.
    Copy,
    /// `INSERT ... SELECT FROM UNNEST(...) ON CONFLICT DO NOTHING`.
    UnnestInsert,
}

/// A pool of connections to the target database.
#[derive(Clone)]
pub struct Sink {
    pool: Pool,
}

impl Sink {
    /// A pool of up to `connections` connections (created lazily).
    pub fn new(config: tokio_postgres::Config, connections: usize) -> Sink {
        let manager =
            Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Verified });
        let pool = Pool::builder(manager)
            .max_size(connections)
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(std::time::Duration::from_secs(5)))
            .wait_timeout(Some(std::time::Duration::from_secs(30)))
            .build()
            .expect("runtime is set, so timeouts are valid");
        Sink { pool }
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, SinkError> {
        Ok(self.pool.get().await?)
    }

    /// Creates or upgrades the schema.
    pub async fn migrate(&self) -> Result<(), SinkError> {
        let mut client = self.pool.get().await?;
        Ok(crate::schema::migrate(&mut client).await?)
    }

    /// Writes logins and quarantine records in one transaction and commits.
    pub async fn write(&self, logins: &[MaskedLogin], quarantine: &[QuarantineRecord]) -> Result<Committed, SinkError> {
        self.write_using(WriteMethod::Copy, logins, quarantine).await
    }

    /// [`Sink::write`] with a chosen method (benches compare them).
    pub async fn write_using(
        &self,
        method: WriteMethod,
        logins: &[MaskedLogin],
        quarantine: &[QuarantineRecord],
    ) -> Result<Committed, SinkError> {
        let mut client = self.pool.get().await?;
        let mut result = write_batch(&mut client, method, logins, quarantine).await;
        if method == WriteMethod::Copy && is_unique_violation(&result) {
            result = write_batch(&mut client, WriteMethod::UnnestInsert, logins, quarantine).await;
        }
        match result {
            Err(SinkError::Database(err)) if is_record_error(&err) => {
                tracing::warn!(sqlstate = ?err.code().map(SqlState::code), rows = logins.len(),
                               "database rejected a row; replaying the batch row by row");
                Ok(write_row_by_row(&mut client, logins, quarantine).await?)
            }
            other => other,
        }
    }
}

/// Whether an error is about the data of a row (SQLSTATE classes 22 and 23), not the
/// database being unavailable. Such rows are quarantined; everything else is retried.
pub fn is_record_error(err: &tokio_postgres::Error) -> bool {
    err.code().is_some_and(|code| code.code().starts_with("22") || code.code().starts_with("23"))
}

fn is_unique_violation(result: &Result<Committed, SinkError>) -> bool {
    matches!(result, Err(SinkError::Database(err)) if err.code() == Some(&SqlState::UNIQUE_VIOLATION))
}

async fn write_batch(
    client: &mut deadpool_postgres::Object,
    method: WriteMethod,
    logins: &[MaskedLogin],
    quarantine: &[QuarantineRecord],
) -> Result<Committed, SinkError> {
    let tx = client.transaction().await?;
    let written = match method {
        WriteMethod::Copy => copy_logins(&tx, logins).await?,
        WriteMethod::UnnestInsert => insert_logins(&tx, logins).await?,
    };
    let quarantined = insert_quarantine(&tx, quarantine).await?;
    tx.commit().await?;
    Ok(Committed { written, already_stored: logins.len() as u64 - written, quarantined, rejected: Vec::new() })
}

async fn write_row_by_row(
    client: &mut deadpool_postgres::Object,
    logins: &[MaskedLogin],
    quarantine: &[QuarantineRecord],
) -> Result<Committed, SinkError> {
    let mut tx = client.transaction().await?;
    let mut written = 0;
    let mut rejected = Vec::new();
    for login in logins {
        let savepoint = tx.savepoint("row").await?;
        match insert_logins(&savepoint, std::slice::from_ref(login)).await {
            Ok(n) => {
                savepoint.commit().await?;
                written += n;
            }
            Err(SinkError::Database(err)) if is_record_error(&err) => {
                savepoint.rollback().await?;
                let sqlstate = err.code().map(SqlState::code).unwrap_or("unknown");
                tracing::warn!(message_id = %login.message_id, sqlstate, "row rejected by the database; quarantined");
                rejected.push(QuarantineRecord::db_rejected(login, sqlstate));
            }
            Err(err) => return Err(err),
        }
    }
    let all_quarantine: Vec<QuarantineRecord> = quarantine.iter().chain(&rejected).cloned().collect();
    let quarantined = insert_quarantine(&tx, &all_quarantine).await?;
    tx.commit().await?;
    let already_stored = (logins.len() - rejected.len()) as u64 - written;
    Ok(Committed { written, already_stored, quarantined, rejected })
}

async fn copy_logins(tx: &deadpool_postgres::Transaction<'_>, logins: &[MaskedLogin]) -> Result<u64, SinkError> {
    if logins.is_empty() {
        return Ok(0);
    }
    let writer = BinaryCopyInWriter::new(tx.copy_in(COPY_LOGINS).await?, &COPY_TYPES);
    pin_mut!(writer);
    for login in logins {
        let create_date = login.create_date();
        let row: [&(dyn ToSql + Sync); 10] = [
            &login.message_id,
            &login.user_id,
            &login.device_type,
            &login.masked_ip,
            &login.masked_device_id,
            &login.locale,
            &login.app_version,
            &login.app_version_text,
            &create_date,
            &login.sent_at,
        ];
        writer.as_mut().write(&row).await?;
    }
    Ok(writer.finish().await?)
}

async fn insert_logins(tx: &deadpool_postgres::Transaction<'_>, logins: &[MaskedLogin]) -> Result<u64, SinkError> {
    if logins.is_empty() {
        return Ok(0);
    }
    let column = |f: fn(&MaskedLogin) -> &str| logins.iter().map(f).collect::<Vec<&str>>();
    let message_ids = column(|l| &l.message_id);
    let user_ids = column(|l| &l.user_id);
    let device_types = column(|l| &l.device_type);
    let masked_ips = column(|l| &l.masked_ip);
    let masked_device_ids = column(|l| &l.masked_device_id);
    let locales: Vec<Option<&str>> = logins.iter().map(|l| l.locale.as_deref()).collect();
    let versions: Vec<i32> = logins.iter().map(|l| l.app_version).collect();
    let version_texts = column(|l| &l.app_version_text);
    let dates: Vec<NaiveDate> = logins.iter().map(MaskedLogin::create_date).collect();
    let sent: Vec<DateTime<Utc>> = logins.iter().map(|l| l.sent_at).collect();
    let statement = tx.prepare_cached(INSERT_LOGINS).await?;
    let rows = tx
        .execute(
            &statement,
            &[
                &message_ids,
                &user_ids,
                &device_types,
                &masked_ips,
                &masked_device_ids,
                &locales,
                &versions,
                &version_texts,
                &dates,
                &sent,
            ],
        )
        .await?;
    Ok(rows)
}

async fn insert_quarantine(
    tx: &deadpool_postgres::Transaction<'_>,
    records: &[QuarantineRecord],
) -> Result<u64, SinkError> {
    if records.is_empty() {
        return Ok(0);
    }
    let ids: Vec<&str> = records.iter().map(|r| r.message_id.as_str()).collect();
    let reasons: Vec<&str> = records.iter().map(|r| r.reason.as_str()).collect();
    let details: Vec<Option<&str>> = records.iter().map(|r| r.detail.as_deref()).collect();
    let bodies: Vec<&str> = records.iter().map(|r| r.masked_body.as_str()).collect();
    let sent: Vec<DateTime<Utc>> = records.iter().map(|r| r.sent_at).collect();
    let statement = tx.prepare_cached(INSERT_QUARANTINE).await?;
    Ok(tx.execute(&statement, &[&ids, &reasons, &details, &bodies, &sent]).await?)
}
