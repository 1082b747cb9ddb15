//! `loginflow remask`: mask-key rotation. Every row whose `mask_key_id` is not the current
//! key's is re-masked from its sealed raw values, a batch per transaction, so the job runs
//! beside the pipeline, can be stopped at any point, and resumes where it stopped (rows done
//! carry the new key id, and a batch is all or nothing). Equal raw values get equal masks
//! under the new key, as under the old, so analysts' joins and counts hold once the job is
//! done. Quarantine copies are re-scrubbed under the new key the same way.
//!
//! Rows with nothing sealed (stored with the vault off, or erased by `forget`) cannot be
//! re-masked: they keep their masks and their old `mask_key_id`, and are counted.

use serde::Serialize;
use uuid::Uuid;

use super::audit;
use crate::decode::decode;
use crate::masker::Masker;
use crate::records::{MessageMeta, QuarantineRecord, TRANSFORM_VERSION};
use crate::sink::Sink;
use crate::source::envelope::{self, InputFormat};
use crate::vault::quarantined::{self, Original};
use crate::vault::{db_error, Column, KeyRing, VaultError};

/// What a remask did.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct RemaskReport {
    /// The new key's id (`mask_key_id` of every row re-masked).
    pub mask_key_id: String,
    /// Rows of `user_logins` re-masked.
    pub rows: u64,
    /// Quarantine copies re-scrubbed.
    pub quarantined: u64,
    /// Rows and quarantine records left under an older key: nothing sealed to re-mask from.
    pub left_under_an_older_key: u64,
    /// Sealed values that did not open (moved or tampered with); left as they are.
    pub does_not_open: u64,
}

/// Re-masks every row and quarantine copy not masked under `masker`'s key.
pub async fn remask(
    sink: &Sink,
    keys: &mut KeyRing,
    masker: &Masker,
    batch_rows: usize,
    why: &str,
) -> Result<RemaskReport, VaultError> {
    let new_key: &str = masker.key_id();
    let report = RemaskReport { mask_key_id: new_key.to_owned(), ..RemaskReport::default() };
    let mut job = Job { sink, keys, masker, batch_rows, why, report };
    job.remask_rows().await?;
    job.remask_quarantine().await?;
    let client = job.database().await?;
    let left = client
        .query_one(
            "SELECT (SELECT count(*) FROM user_logins WHERE mask_key_id IS DISTINCT FROM $1)
                  + (SELECT count(*) FROM user_logins_quarantine WHERE mask_key_id IS DISTINCT FROM $1)",
            &[&new_key],
        )
        .await
        .map_err(db_error)?;
    let mut report = job.report;
    report.left_under_an_older_key = (left.get::<_, i64>(0) as u64).saturating_sub(report.does_not_open);
    Ok(report)
}

/// One run of `remask`: what it works with and what it did so far.
struct Job<'a> {
    sink: &'a Sink,
    keys: &'a mut KeyRing,
    masker: &'a Masker,
    batch_rows: usize,
    why: &'a str,
    report: RemaskReport,
}

impl Job<'_> {
    async fn database(&self) -> Result<deadpool_postgres::Object, VaultError> {
        self.sink.client().await.map_err(db_error)
    }

    async fn remask_rows(&mut self) -> Result<(), VaultError> {
        let (masker, batch_rows, why) = (self.masker, self.batch_rows, self.why);
        let new_key: &str = masker.key_id();
        let mut after = String::new();
        loop {
            let mut client = self.database().await?;
            let page = client
                .query(
                    "SELECT l.message_id, p.data_key_id, k.wrapped_key, p.sealed_ip, p.sealed_device_id
                 FROM user_logins l
                 JOIN user_logins_pii p ON p.message_id = l.message_id
                 JOIN pii_data_keys k ON k.id = p.data_key_id
                 WHERE l.message_id > $1 AND l.mask_key_id IS DISTINCT FROM $2
                   AND p.sealed_ip IS NOT NULL AND p.sealed_device_id IS NOT NULL
                 ORDER BY l.message_id
                 LIMIT $3",
                    &[&after, &new_key, &(batch_rows as i64)],
                )
                .await
                .map_err(db_error)?;
            let Some(last) = page.last() else { return Ok(()) };
            after = last.get(0);
            let ids: Vec<String> = page.iter().map(|row| row.get(0)).collect();
            audit(&**client, "remask", why, &ids).await.map_err(db_error)?;

            let (mut done_ids, mut ips, mut device_ids) = (Vec::new(), Vec::new(), Vec::new());
            for row in &page {
                let message_id: String = row.get(0);
                let key_id: Uuid = row.get(1);
                let wrapped: Vec<u8> = row.get(2);
                let Some(key) = self.keys.key(key_id, &wrapped).await? else {
                    self.report.does_not_open += 1;
                    continue;
                };
                let open = |column, sealed: Vec<u8>| key.open(&message_id, column, &sealed);
                match (open(Column::Ip, row.get(3)), open(Column::DeviceId, row.get(4))) {
                    (Ok(ip), Ok(device_id)) => {
                        ips.push(masker.mask(&String::from_utf8_lossy(&ip)));
                        device_ids.push(masker.mask(&String::from_utf8_lossy(&device_id)));
                        done_ids.push(message_id);
                    }
                    _ => self.report.does_not_open += 1,
                }
            }
            let tx = client.transaction().await.map_err(db_error)?;
            self.report.rows += tx
                .execute(
                    "UPDATE user_logins l SET masked_ip = v.ip, masked_device_id = v.device_id, mask_key_id = $4,
                                              transform_version = $5
                 FROM UNNEST($1::text[], $2::text[], $3::text[]) AS v(message_id, ip, device_id)
                 WHERE l.message_id = v.message_id AND l.mask_key_id IS DISTINCT FROM $4",
                    &[&done_ids, &ips, &device_ids, &new_key, &TRANSFORM_VERSION],
                )
                .await
                .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
        }
    }

    async fn remask_quarantine(&mut self) -> Result<(), VaultError> {
        let (masker, batch_rows, why) = (self.masker, self.batch_rows, self.why);
        let new_key: &str = masker.key_id();
        let mut after = String::new();
        loop {
            let mut client = self.database().await?;
            let page = quarantined::page(&**client, &after, batch_rows, None, Some(new_key)).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = last.message_id.clone();
            let ids: Vec<String> = page.iter().filter(|q| q.key.is_some()).map(|q| q.message_id.clone()).collect();
            audit(&**client, "remask", why, &ids).await.map_err(db_error)?;

            let (mut done_ids, mut bodies, mut fingerprints) = (Vec::new(), Vec::new(), Vec::new());
            for row in &page {
                let Some((key_id, wrapped)) = &row.key else { continue };
                let Some(key) = self.keys.key(*key_id, wrapped).await? else {
                    self.report.does_not_open += 1;
                    continue;
                };
                let masked_body = match row.original(key) {
                    Ok(Some(original)) => {
                        let sent_at = row.sent_at.unwrap_or_else(chrono::Utc::now);
                        let meta = MessageMeta { message_id: row.message_id.clone(), sent_at };
                        // A received body's user fingerprints follow the key, so `forget` keeps finding it.
                        fingerprints.push(match &original {
                            Original::Received(body) => masker.user_fingerprints(body).map(|found| found.join(" ")),
                            Original::Rebuilt(_) => None,
                        });
                        quarantine_copy(masker, meta, &original, &row.masked_body)
                    }
                    Ok(None) => continue,
                    Err(_) => {
                        self.report.does_not_open += 1;
                        continue;
                    }
                };
                done_ids.push(row.message_id.clone());
                bodies.push(masked_body);
            }
            let tx = client.transaction().await.map_err(db_error)?;
            self.report.quarantined += tx
                .execute(
                    "UPDATE user_logins_quarantine q SET masked_body = v.body, mask_key_id = $3, transform_version = $4
                 FROM UNNEST($1::text[], $2::text[]) AS v(message_id, body)
                 WHERE q.message_id = v.message_id AND q.mask_key_id IS DISTINCT FROM $3",
                    &[&done_ids, &bodies, &new_key, &TRANSFORM_VERSION],
                )
                .await
                .map_err(db_error)?;
            tx.execute(
                "UPDATE user_logins_pii p SET user_fingerprints = string_to_array(v.fingerprints, ' ')
                 FROM UNNEST($1::text[], $2::text[]) AS v(message_id, fingerprints)
                 WHERE p.message_id = v.message_id AND v.fingerprints IS NOT NULL",
                &[&done_ids, &fingerprints],
            )
            .await
            .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
        }
    }
}

/// The clear copy of a quarantined message under `masker`, made as the pipeline makes it: the
/// scrubbed event (an SNS envelope's `Message`), or a refused row's masked fields. `previous`
/// is the copy it replaces.
fn quarantine_copy(masker: &Masker, meta: MessageMeta, original: &Original, previous: &str) -> String {
    match original {
        Original::Rebuilt(event) => match decode(event) {
            Ok(login) => QuarantineRecord::db_rejected(&masker.mask_login(login, meta), "").masked_body,
            // Today's validator refuses the rebuilt event: the copy keeps the refused row's shape,
            // which `quarantine replay` rebuilds the event from, with new masks.
            Err(_) => remask_refused_row(masker, previous, event).unwrap_or_else(|| masker.mask_body(event)),
        },
        Original::Received(body) => masker.mask_body(envelope::event(body, &envelope::unwrap(body, InputFormat::Auto))),
    }
}

/// A refused row's copy (a serialized `MaskedLogin`) with its masks renewed from the rebuilt
/// `event`'s raw `ip` and `device_id`; `None` when either is not what the vault made it.
fn remask_refused_row(masker: &Masker, previous: &str, event: &str) -> Option<String> {
    let mut row: serde_json::Map<String, serde_json::Value> = serde_json::from_str(previous).ok()?;
    let event: serde_json::Value = serde_json::from_str(event).ok()?;
    for (masked, raw) in [("masked_ip", "ip"), ("masked_device_id", "device_id")] {
        row.insert(masked.into(), masker.mask(event.get(raw)?.as_str()?).into());
    }
    serde_json::to_string(&row).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_row_refused_again_by_the_validator_keeps_its_shape_with_new_masks() {
        let masker = Masker::new(&secrecy::SecretString::from("n".repeat(32)));
        let previous = r#"{"message_id":"m","user_id":"u","device_type":"ios","masked_ip":"old","masked_device_id":"old","locale":null,"app_version":1,"app_version_text":"1","sent_at":"2026-12-01T00:00:00Z"}"#;
        // Not a valid login today (no app version), as if the validator had become stricter.
        let event = r#"{"user_id":"u","app_version":"","device_type":"ios","ip":"198.51.100.7","locale":null,"device_id":"123-45-6789"}"#;
        assert!(decode(event).is_err());
        let meta = MessageMeta { message_id: "m".into(), sent_at: chrono::Utc::now() };
        let copy = quarantine_copy(&masker, meta, &Original::Rebuilt(event.into()), previous);
        let copy: serde_json::Value = serde_json::from_str(&copy).unwrap();
        assert_eq!(copy["masked_ip"], masker.mask("198.51.100.7"));
        assert_eq!(copy["masked_device_id"], masker.mask("123-45-6789"));
        assert_eq!((copy["user_id"].as_str(), copy["app_version_text"].as_str()), (Some("u"), Some("1")));
        assert!(!copy.to_string().contains("198.51.100.7"));
    }
}
