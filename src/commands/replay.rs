//! `loginflow quarantine replay`: quarantined messages re-run from the vault through today's
//! validator. Each one goes the pipeline's way ([`crate::transform::to_record`]): a message that
//! now passes becomes a row under its own message id and leaves quarantine in the same
//! transaction ([`Sink::replace`]); one that still fails stays, with its new reason. A row
//! the database refuses again is quarantined as `db_rejected` with its new SQLSTATE, as in
//! the pipeline. Batches commit one by one, so the command can be stopped and run again; a
//! second run finds only what still fails.

use std::collections::BTreeMap;

use chrono::Utc;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::audit;
use crate::masker::Masker;
use crate::records::{MessageMeta, Record};
use crate::sink::Sink;
use crate::source::envelope::{self, InputFormat};
use crate::transform::{storage_key, to_record};
use crate::vault::quarantined::{self, Original};
use crate::vault::{db_error, Column, DataKey, KeyRing, VaultError};

/// What a replay did.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct ReplayReport {
    /// Quarantined messages looked at.
    pub examined: u64,
    /// Now rows in `user_logins` (and out of quarantine).
    pub written: u64,
    /// Already had a row under their message id; taken out of quarantine.
    pub already_stored: u64,
    /// Still quarantined, by their new reason.
    pub still_quarantined: BTreeMap<String, u64>,
    /// Nothing sealed to replay from (stored with the vault off, or erased by `forget`).
    pub not_sealed: u64,
    /// Sealed values that did not open (moved or tampered with); left as they are.
    pub does_not_open: u64,
    /// Refused by the database even as a quarantine record; left as they were.
    pub unstorable: u64,
}

/// Replays the quarantined messages (only those quarantined for `reason`, when given).
pub async fn replay(
    sink: &Sink,
    keys: &mut KeyRing,
    masker: &Masker,
    reason: Option<&str>,
    input_format: InputFormat,
    batch_rows: usize,
    why: &str,
) -> Result<ReplayReport, VaultError> {
    let mut report = ReplayReport::default();
    let never = CancellationToken::new();
    let mut after = String::new();
    loop {
        let client = sink.client().await.map_err(db_error)?;
        let page = quarantined::page(&**client, &after, batch_rows, reason, None).await?;
        let Some(last) = page.last() else { break };
        after = last.message_id.clone();
        let ids: Vec<String> = page.iter().filter(|q| q.key.is_some()).map(|q| q.message_id.clone()).collect();
        audit(&**client, "replay", why, &ids).await.map_err(db_error)?;
        drop(client);

        let (mut logins, mut still) = (Vec::new(), Vec::new());
        for row in &page {
            report.examined += 1;
            let Some((key_id, wrapped)) = &row.key else {
                report.not_sealed += 1;
                continue;
            };
            let Some(key) = keys.key(*key_id, wrapped).await? else {
                report.does_not_open += 1;
                continue;
            };
            let original = match row.original(key) {
                Ok(Some(original)) => original,
                Ok(None) => {
                    report.not_sealed += 1;
                    continue;
                }
                Err(_) => {
                    report.does_not_open += 1;
                    continue;
                }
            };
            let format = match original {
                Original::Received(_) => input_format,
                Original::Rebuilt(_) => InputFormat::Raw,
            };
            let body = original.body();
            let unwrapped = envelope::unwrap(body, format);
            let mut message_id = row.message_id.clone();
            if let Some(sns_id) = storage_key(&unwrapped) {
                if sns_id != message_id {
                    if !move_to_sns_id(sink, key, &message_id, sns_id, body).await? {
                        report.already_stored += 1;
                        continue;
                    }
                    message_id = sns_id.to_owned();
                }
            }
            let meta = MessageMeta { message_id, sent_at: row.sent_at.unwrap_or_else(Utc::now) };
            match to_record(masker, Some(key), meta, body, &unwrapped) {
                Record::Login(login) => logins.push(login),
                Record::Quarantine(record) => still.push(record),
                Record::Duplicate => {}
            }
        }
        let committed = sink.replace(&logins, &still, &never).await.map_err(db_error)?;
        report.written += committed.written;
        report.already_stored += committed.already_stored;
        report.unstorable += committed.unstorable.len() as u64;
        // A login the database refused again comes back in `rejected`, quarantined anew.
        let kept = still.iter().filter(|r| !committed.unstorable.contains(&r.message_id));
        for record in kept.chain(committed.rejected.iter()) {
            *report.still_quarantined.entry(record.reason.as_str().to_owned()).or_default() += 1;
        }
    }
    Ok(report)
}

/// An SNS notification quarantined under its SQS id (the pipeline read bodies raw) moves to its
/// SNS id, the key the pipeline gives every delivery of one notification, with its sealed body
/// sealed anew for that id. Returns false when that id is stored already: this copy is then a
/// duplicate delivery and is removed.
async fn move_to_sns_id(sink: &Sink, key: &DataKey, from: &str, to: &str, received: &str) -> Result<bool, VaultError> {
    let mut client = sink.client().await.map_err(db_error)?;
    let tx = client.transaction().await.map_err(db_error)?;
    crate::sink::share_erasure_lock(&tx).await.map_err(db_error)?;
    let stored: bool = tx
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM user_logins WHERE message_id = $1)
                 OR EXISTS (SELECT 1 FROM user_logins_quarantine WHERE message_id = $1)",
            &[&to],
        )
        .await
        .map_err(db_error)?
        .get(0);
    if stored {
        tx.execute("DELETE FROM user_logins_quarantine WHERE message_id = $1", &[&from]).await.map_err(db_error)?;
        tx.execute("DELETE FROM user_logins_pii WHERE message_id = $1", &[&from]).await.map_err(db_error)?;
    } else {
        let sealed = key.seal(to, Column::Body, received.as_bytes());
        // A vault row under the new id that no row or quarantine record refers to is an orphan;
        // an erased one stays (that id was forgotten), and this copy's vault row then goes.
        tx.execute(
            "DELETE FROM user_logins_pii p WHERE p.message_id = $1 AND p.erased_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM user_logins WHERE message_id = $1)
               AND NOT EXISTS (SELECT 1 FROM user_logins_quarantine WHERE message_id = $1)",
            &[&to],
        )
        .await
        .map_err(db_error)?;
        tx.execute(
            "DELETE FROM user_logins_pii WHERE message_id = $1
               AND EXISTS (SELECT 1 FROM user_logins_pii WHERE message_id = $2)",
            &[&from, &to],
        )
        .await
        .map_err(db_error)?;
        tx.execute("UPDATE user_logins_quarantine SET message_id = $2 WHERE message_id = $1", &[&from, &to])
            .await
            .map_err(db_error)?;
        // The vault row moves with its message, erased or not: an erasure `forget` committed
        // since this copy was opened stays, and keeps the replay from sealing it again.
        tx.execute(
            "UPDATE user_logins_pii SET message_id = $2,
                 sealed_body = CASE WHEN erased_at IS NULL THEN $3::bytea END
             WHERE message_id = $1",
            &[&from, &to, &sealed],
        )
        .await
        .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(!stored)
}
