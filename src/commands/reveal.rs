//! `loginflow reveal` and `loginflow forget`: the recovery side of the vault. Both write
//! their `pii_access_log` row in the same transaction as what they read or erase, before
//! anything is shown; `reveal` needs `kms:Decrypt`, which ingest never has.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::audit;
use crate::masker::Masker;
use crate::vault::{db_error, Column, KeyRing, VaultError};

/// Which rows `reveal` opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    MessageIds(Vec<String>),
    UserId(String),
    /// "Who is behind this masked IP?"
    MaskedIp(String),
    MaskedDeviceId(String),
}

impl Lookup {
    fn condition(&self) -> &'static str {
        match self {
            Lookup::MessageIds(_) => "p.message_id = ANY($1)",
            Lookup::UserId(_) => "l.user_id = $1",
            Lookup::MaskedIp(_) => "l.masked_ip = $1",
            Lookup::MaskedDeviceId(_) => "l.masked_device_id = $1",
        }
    }
}

/// One opened row, printed as a JSON line.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Revealed {
    pub message_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The original body of a quarantined message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
    /// Set when `forget` erased the sealed values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erased_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Opens the sealed values of the rows `lookup` finds. The access is logged (committed)
/// before any value is decrypted.
pub async fn reveal(
    client: &mut tokio_postgres::Client,
    keys: &mut KeyRing,
    lookup: &Lookup,
    reason: &str,
) -> Result<Vec<Revealed>, VaultError> {
    let query = format!(
        "SELECT p.message_id, l.user_id, p.sealed_ip, p.sealed_device_id, p.sealed_body, p.erased_at,
                p.data_key_id, k.wrapped_key, COALESCE(l.sent_at, q.sent_at)
         FROM user_logins_pii p
         JOIN pii_data_keys k ON k.id = p.data_key_id
         LEFT JOIN user_logins l ON l.message_id = p.message_id
         LEFT JOIN user_logins_quarantine q ON q.message_id = p.message_id
         WHERE {} ORDER BY p.message_id",
        lookup.condition()
    );
    let tx = client.transaction().await.map_err(db_error)?;
    let rows = match lookup {
        Lookup::MessageIds(ids) => tx.query(&query, &[ids]).await,
        Lookup::UserId(value) | Lookup::MaskedIp(value) | Lookup::MaskedDeviceId(value) => {
            tx.query(&query, &[value]).await
        }
    }
    .map_err(db_error)?;
    let ids: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    audit(&tx, "reveal", reason, &ids).await.map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;

    let mut revealed = Vec::with_capacity(rows.len());
    for row in rows {
        let message_id: String = row.get(0);
        let data_key_id: Uuid = row.get(6);
        let mut entry = Revealed {
            user_id: row.get(1),
            erased_at: row.get(5),
            sent_at: row.get(8),
            ip: None,
            device_id: None,
            body: None,
            error: None,
            message_id,
        };
        if entry.erased_at.is_none() {
            let wrapped: Vec<u8> = row.get(7);
            let Some(key) = keys.key(data_key_id, &wrapped).await? else {
                entry.error = Some(VaultError::DoesNotOpen.to_string());
                revealed.push(entry);
                continue;
            };
            let open = |column: Column, sealed: Option<Vec<u8>>| {
                sealed
                    .map(|sealed| key.open(&entry.message_id, column, &sealed))
                    .transpose()
                    .map(|value| value.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()))
            };
            match (open(Column::Ip, row.get(2)), open(Column::DeviceId, row.get(3)), open(Column::Body, row.get(4))) {
                (Ok(ip), Ok(device_id), Ok(body)) => (entry.ip, entry.device_id, entry.body) = (ip, device_id, body),
                _ => entry.error = Some(VaultError::DoesNotOpen.to_string()),
            }
        }
        revealed.push(entry);
    }
    Ok(revealed)
}

/// A PostgreSQL regular expression matching the member `"user_id": "<user_id>"` in a body's
/// clear copy, with any spacing, written plainly or JSON-escaped inside a string (a double-encoded
/// record, an SNS envelope read raw) — and no other occurrence of the id.
fn user_id_pattern(user_id: &str) -> String {
    // `\` before an ASCII non-alphanumeric character makes it literal in PostgreSQL's regex
    // syntax; no other character is special.
    let literal = |text: &str| {
        text.chars().fold(String::new(), |mut out, c| {
            if c.is_ascii() && !c.is_ascii_alphanumeric() {
                out.push('\\');
            }
            out.push(c);
            out
        })
    };
    let member = |key: &str, value: &str| format!("{}\\s*:\\s*{}", literal(key), literal(value));
    let quoted = serde_json::to_string(user_id).unwrap_or_default();
    let escaped = serde_json::to_string(&quoted).unwrap_or_default();
    let escaped = escaped.get(1..escaped.len().saturating_sub(1)).unwrap_or_default();
    format!("({})|({})", member("\"user_id\"", &quoted), member("\\\"user_id\\\"", escaped))
}

/// Erases a user's sealed values (their masks stay): those of their rows, and the sealed bodies
/// of quarantined messages that name them, found by the keyed fingerprint of the user id (see
/// [`Masker::user_fingerprints`]); bodies sealed before fingerprints existed, and refused rows
/// (whose clear copy holds their `user_id` as a field), by a text match on the clear copy.
/// Returns the message ids erased.
pub async fn forget(
    client: &mut tokio_postgres::Client,
    masker: &Masker,
    user_id: &str,
    reason: &str,
) -> Result<Vec<String>, VaultError> {
    let pattern = user_id_pattern(user_id);
    let fingerprint = masker.user_fingerprint(user_id);
    let tx = client.transaction().await.map_err(db_error)?;
    crate::sink::take_erasure_lock(&tx).await.map_err(db_error)?;
    let rows = tx
        .query(
            "UPDATE user_logins_pii p
             SET sealed_ip = NULL, sealed_device_id = NULL, sealed_body = NULL, erased_at = now()
             WHERE p.erased_at IS NULL AND (
                 p.message_id IN (SELECT message_id FROM user_logins WHERE user_id = $1)
                 OR p.user_fingerprints @> ARRAY[$3::text]
                 OR (p.user_fingerprints IS NULL AND p.message_id IN (
                     SELECT message_id FROM user_logins_quarantine WHERE masked_body ~ $2)))
             RETURNING p.message_id",
            &[&user_id, &pattern, &fingerprint],
        )
        .await
        .map_err(db_error)?;
    let ids: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    audit(&tx, "forget", reason, &ids).await.map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(ids)
}
