-- loginflow's schema as of version 0.2 (what `loginflow schema 3` was): every statement idempotent, so it
-- upgrades a table made from the task's reference DDL and a database made by any earlier loginflow
-- (tests/fixtures/schema_*.sql) as well as it creates a fresh one. Later changes are new files, V2__...
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
