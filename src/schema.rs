//! Database schema: created at startup (and by `loginflow migrate`), idempotent,
//! and able to upgrade a `user_logins` table made from the task's reference DDL.
//! Columns are only ever added; nothing is dropped or rewritten.

use tokio_postgres::GenericClient;

/// Serialises concurrent migrations of several replicas starting at once.
const MIGRATION_LOCK_ID: i64 = 0x6c6f_6769_6e66_6c6f; // "loginflo"

/// The whole schema, applied in one transaction under an advisory lock.
pub const SCHEMA_SQL: &str = r#"
-- The task's reference table, kept as it was so existing queries keep working.
CREATE TABLE IF NOT EXISTS user_logins (
    user_id          varchar(128),
    device_type      varchar(32),
    masked_ip        varchar(256),
    masked_device_id varchar(256),
    locale           varchar(32),
    app_version      integer,
    create_date      date
);

-- What a real pipeline adds: idempotency key, full event time, the original version string.
ALTER TABLE user_logins
    ADD COLUMN IF NOT EXISTS message_id       text,
    ADD COLUMN IF NOT EXISTS sent_at          timestamptz,
    ADD COLUMN IF NOT EXISTS app_version_text varchar(32),
    ADD COLUMN IF NOT EXISTS ingested_at      timestamptz DEFAULT now();

-- One message id, at most one row: across redeliveries, restarts and replicas.
-- Rows from before the upgrade have no message id; NULLs do not collide.
CREATE UNIQUE INDEX IF NOT EXISTS user_logins_message_id_key ON user_logins (message_id);

CREATE TABLE IF NOT EXISTS user_logins_quarantine (
    message_id  text PRIMARY KEY,
    reason      varchar(32) NOT NULL,
    detail      text,
    masked_body text NOT NULL,
    sent_at     timestamptz,
    received_at timestamptz NOT NULL DEFAULT now()
);

-- app_version code -> original string (see AppVersion in src/decode.rs):
-- code = 10 * (major*1000000 + minor*1000 + patch) + form; form 0 = X.Y, 1 = X.0Y, 2 = X.Y.Z.
CREATE OR REPLACE FUNCTION loginflow_app_version_text(code integer) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
    SELECT CASE code % 10
        WHEN 0 THEN (code / 10000000)::text || '.' || (code / 10000 % 1000)::text
        WHEN 1 THEN (code / 10000000)::text || '.' || lpad((code / 10000 % 1000)::text, 2, '0')
        WHEN 2 THEN (code / 10000000)::text || '.' || (code / 10000 % 1000)::text || '.' || (code / 10 % 1000)::text
    END
$fn$;

-- How each row was made (SPEC §4b): which mask key, which loginflow version.
ALTER TABLE user_logins
    ADD COLUMN IF NOT EXISTS mask_key_id       text,
    ADD COLUMN IF NOT EXISTS transform_version text;
ALTER TABLE user_logins_quarantine
    ADD COLUMN IF NOT EXISTS mask_key_id       text,
    ADD COLUMN IF NOT EXISTS transform_version text;
-- The PII vault (src/vault): KMS-wrapped data keys, sealed values apart from user_logins so
-- that privileges can differ, and an audit row for every access.
CREATE TABLE IF NOT EXISTS pii_data_keys (
    id          uuid PRIMARY KEY,
    kms_key_id  text NOT NULL,
    wrapped_key bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS user_logins_pii (
    message_id       text PRIMARY KEY,
    data_key_id      uuid NOT NULL REFERENCES pii_data_keys (id),
    sealed_ip        bytea,
    sealed_device_id bytea,
    sealed_body      bytea,
    erased_at        timestamptz
);
CREATE TABLE IF NOT EXISTS pii_access_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    who         text NOT NULL,
    why         text NOT NULL,
    action      text NOT NULL,
    message_ids text[] NOT NULL
);
-- Keyed fingerprints of the user ids a sealed quarantined body names: `forget` looks them up.
-- Its index is built by `loginflow migrate` (`create_lookup_indexes`), concurrently: never under `run`'s locks.
ALTER TABLE user_logins_pii ADD COLUMN IF NOT EXISTS user_fingerprints text[];
-- For analysts: every column, with app_version readable.
CREATE OR REPLACE VIEW user_logins_readable AS
SELECT user_id, device_type, masked_ip, masked_device_id, locale,
       app_version,
       COALESCE(app_version_text, loginflow_app_version_text(app_version)) AS app_version_string,
       create_date, sent_at, message_id, ingested_at
FROM user_logins;
"#;

/// Marks a schema this version of loginflow created (a comment on `user_logins`).
pub const SCHEMA_VERSION: &str = "loginflow schema 3";

/// Creates or upgrades the schema. Safe to run concurrently and repeatedly. When the schema
/// is already current it takes no table lock, so a replica starting up never stalls the
/// writes of the others (ALTER TABLE would wait for, and then block, every insert).
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    if schema_is_current(client).await? {
        return Ok(());
    }
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_ID]).await?;
    tx.batch_execute(SCHEMA_SQL).await?;
    tx.batch_execute(&format!("COMMENT ON TABLE user_logins IS '{SCHEMA_VERSION}'")).await?;
    tx.commit().await
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

async fn schema_is_current(client: &impl GenericClient) -> Result<bool, tokio_postgres::Error> {
    let row = client.query_one("SELECT obj_description(to_regclass('user_logins'), 'pg_class')", &[]).await?;
    Ok(row.get::<_, Option<&str>>(0) == Some(SCHEMA_VERSION))
}
