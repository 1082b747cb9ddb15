//! Quarantined messages as the vault's batch jobs read them: a page of
//! `user_logins_quarantine` with the sealed values each one has, and the way back to the
//! message as it arrived.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::{db_error, Column, DataKey, VaultError};
use crate::decode::Reason;

/// One quarantined message and what the vault holds of it.
pub(crate) struct Quarantined {
    pub message_id: String,
    pub reason: String,
    pub masked_body: String,
    pub sent_at: Option<DateTime<Utc>>,
    /// The data key and its KMS-wrapped copy; `None` when nothing is sealed (the vault was off,
    /// or `forget` erased it).
    pub key: Option<(Uuid, Vec<u8>)>,
    sealed_body: Option<Vec<u8>>,
    sealed_ip: Option<Vec<u8>>,
    sealed_device_id: Option<Vec<u8>>,
}

/// What a quarantined message was.
pub(crate) enum Original {
    /// The body as received (an SNS envelope included).
    Received(String),
    /// A row the database refused (`db_rejected`): its event, rebuilt from the clear fields
    /// of the quarantine copy and the sealed `ip` and `device_id`.
    Rebuilt(String),
}

impl Original {
    pub fn body(&self) -> &str {
        match self {
            Original::Received(body) | Original::Rebuilt(body) => body,
        }
    }
}

/// The clear fields of a refused row's quarantine copy (a serialized `MaskedLogin`).
#[derive(serde::Deserialize)]
struct RefusedRow {
    user_id: String,
    device_type: String,
    locale: Option<String>,
    app_version_text: String,
}

/// Most bytes of bodies (clear copies and sealed originals) read in one page, so a job's
/// memory stays bounded whatever the size of the bodies (up to 1 MiB each).
const PAGE_BYTES: i64 = 16 << 20;

/// The quarantined messages after `after` (by message id), at most `limit` and [`PAGE_BYTES`]
/// (at least one), optionally only those of one reason and those whose mask key is not
/// `not_mask_key_id`.
pub(crate) async fn page(
    client: &impl GenericClient,
    after: &str,
    limit: usize,
    reason: Option<&str>,
    not_mask_key_id: Option<&str>,
) -> Result<Vec<Quarantined>, VaultError> {
    let rows = client
        .query(
            "WITH page AS (
                 SELECT q.message_id FROM user_logins_quarantine q
                 WHERE q.message_id > $1
                   AND ($2::text IS NULL OR q.reason = $2)
                   AND ($3::text IS NULL OR q.mask_key_id IS DISTINCT FROM $3)
                 ORDER BY q.message_id
                 LIMIT $4
             ), sized AS (
                 SELECT page.message_id,
                        sum(octet_length(q.masked_body) + coalesce(octet_length(p.sealed_body), 0))
                            OVER (ORDER BY page.message_id) AS bytes,
                        row_number() OVER (ORDER BY page.message_id) AS n
                 FROM page
                 JOIN user_logins_quarantine q ON q.message_id = page.message_id
                 LEFT JOIN user_logins_pii p ON p.message_id = page.message_id AND p.erased_at IS NULL
             )
             SELECT q.message_id, q.reason, q.masked_body, q.sent_at,
                    p.data_key_id, k.wrapped_key, p.sealed_body, p.sealed_ip, p.sealed_device_id
             FROM sized
             JOIN user_logins_quarantine q ON q.message_id = sized.message_id
             LEFT JOIN user_logins_pii p ON p.message_id = q.message_id AND p.erased_at IS NULL
             LEFT JOIN pii_data_keys k ON k.id = p.data_key_id
             WHERE sized.bytes <= $5 OR sized.n = 1
             ORDER BY q.message_id",
            &[&after, &reason, &not_mask_key_id, &(limit as i64), &PAGE_BYTES],
        )
        .await
        .map_err(db_error)?;
    Ok(rows
        .iter()
        .map(|row| {
            let key = match (row.get::<_, Option<Uuid>>(4), row.get::<_, Option<Vec<u8>>>(5)) {
                (Some(id), Some(wrapped)) => Some((id, wrapped)),
                _ => None,
            };
            Quarantined {
                message_id: row.get(0),
                reason: row.get(1),
                masked_body: row.get(2),
                sent_at: row.get(3),
                key,
                sealed_body: row.get(6),
                sealed_ip: row.get(7),
                sealed_device_id: row.get(8),
            }
        })
        .collect())
}

impl Quarantined {
    /// Opens what is sealed of this message with `key` (its data key). `None` when nothing
    /// that recovers the message is sealed.
    pub fn original(&self, key: &DataKey) -> Result<Option<Original>, VaultError> {
        let open = |column, sealed: &[u8]| {
            key.open(&self.message_id, column, sealed)
                .and_then(|bytes| String::from_utf8(bytes).map_err(|_| VaultError::DoesNotOpen))
        };
        if let Some(sealed) = &self.sealed_body {
            return Ok(Some(Original::Received(open(Column::Body, sealed)?)));
        }
        let (Some(ip), Some(device_id)) = (&self.sealed_ip, &self.sealed_device_id) else { return Ok(None) };
        if self.reason != Reason::DbRejected.as_str() {
            return Ok(None);
        }
        let Ok(row) = serde_json::from_str::<RefusedRow>(&self.masked_body) else { return Ok(None) };
        let event = serde_json::json!({
            "user_id": row.user_id,
            "app_version": row.app_version_text,
            "device_type": row.device_type,
            "ip": open(Column::Ip, ip)?,
            "locale": row.locale,
            "device_id": open(Column::DeviceId, device_id)?,
        });
        Ok(Some(Original::Rebuilt(event.to_string())))
    }
}
