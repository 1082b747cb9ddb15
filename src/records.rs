//! The records a message becomes on its way to the tables: plain data, no behaviour beyond
//! what describes it. Every stage and command speaks in these types; none of them is imported
//! from a stage, so the stages depend on this module and never on each other for their data.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use uuid::Uuid;

use crate::decode::Reason;

/// The version of the transform recorded on every row (`transform_version`).
pub const TRANSFORM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What became of one message.
#[derive(Debug)]
pub enum Record {
    Login(MaskedLogin),
    Quarantine(QuarantineRecord),
    /// Committed before (dedup cache hit): delete only.
    Duplicate,
}

/// What the pipeline knows of a message besides its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    pub message_id: String,
    pub sent_at: DateTime<Utc>,
}

/// A login ready for `user_logins`: PII already masked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MaskedLogin {
    pub message_id: String,
    pub user_id: String,
    pub device_type: String,
    pub masked_ip: String,
    pub masked_device_id: String,
    pub locale: Option<String>,
    pub app_version: i32,
    pub app_version_text: String,
    pub sent_at: DateTime<Utc>,
    /// `Masker::key_id` of the key that made the masks.
    #[serde(skip)]
    pub mask_key_id: Arc<str>,
    /// The raw `ip` and `device_id`, sealed for the vault (when it is on).
    #[serde(skip)]
    pub sealed: Option<Sealed>,
}

impl MaskedLogin {
    /// The UTC date of the event, the `create_date` column.
    pub fn create_date(&self) -> NaiveDate {
        self.sent_at.date_naive()
    }
}

/// A message that cannot become a row, ready for `user_logins_quarantine`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineRecord {
    pub message_id: String,
    pub reason: Reason,
    pub detail: Option<String>,
    /// The body with every PII value masked.
    pub masked_body: String,
    pub sent_at: DateTime<Utc>,
    pub mask_key_id: Arc<str>,
    /// The raw body (or a refused login's raw values), sealed for the vault (when it is on).
    pub sealed: Option<Sealed>,
}

impl QuarantineRecord {
    /// Bytes it holds: the clear copy and the sealed original.
    pub fn footprint(&self) -> usize {
        self.masked_body.len() + self.sealed.as_ref().map_or(0, Sealed::bytes)
    }

    /// Quarantines a masked row that PostgreSQL refused, keeping the SQLSTATE.
    pub fn db_rejected(login: &MaskedLogin, sqlstate: &str) -> QuarantineRecord {
        QuarantineRecord {
            message_id: login.message_id.clone(),
            reason: Reason::DbRejected,
            detail: Some(sqlstate.to_owned()),
            masked_body: serde_json::to_string(login).unwrap_or_default(),
            sent_at: login.sent_at,
            mask_key_id: login.mask_key_id.clone(),
            sealed: login.sealed.clone(),
        }
    }
}

/// Sealed values of one message, ready for `user_logins_pii`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sealed {
    pub data_key_id: Uuid,
    pub ip: Option<Vec<u8>>,
    pub device_id: Option<Vec<u8>>,
    pub body: Option<Vec<u8>>,
    /// Keyed fingerprints of the user ids a sealed body names (`Masker::user_fingerprints`),
    /// so `forget` finds it by lookup; `None` for a login's values (found by its row's `user_id`).
    pub user_fingerprints: Option<Vec<String>>,
}

impl Sealed {
    /// Bytes of sealed values it holds.
    pub fn bytes(&self) -> usize {
        [&self.ip, &self.device_id, &self.body].iter().map(|v| v.as_ref().map_or(0, Vec::len)).sum()
    }
}
