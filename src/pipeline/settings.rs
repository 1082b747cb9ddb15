//! What `run` needs, in plain types with their units: made by the configuration layer
//! (`config::RunArgs::settings`), which has checked every rule across fields.

use std::net::SocketAddr;
use std::num::{NonZeroU64, NonZeroUsize};
use std::time::Duration;

use secrecy::SecretString;

use crate::masker::Masker;
use crate::sink::stage::WindowSettings;
use crate::sink::Database;
use crate::source::envelope::InputFormat;
use crate::source::{PollerRange, ReceiveSettings};
use crate::sqs;

/// Everything `run` is tuned by.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The queue and how to reach it; the queue URL is the one in [`Settings::receive`].
    pub sqs: sqs::Access,
    pub database: Database,
    /// Stop once the queue is empty and everything received is stored and deleted.
    pub drain: bool,
    pub drain_timeout: Duration,
    pub input_format: InputFormat,
    pub metrics_addr: SocketAddr,
    pub receive: ReceiveSettings,
    pub pollers: PollerRange,
    pub dedup_ttl: Duration,
    pub dedup_capacity: NonZeroU64,
    pub mask_key: SecretString,
    pub quarantine_copy_max_bytes: usize,
    pub mask_concurrency: NonZeroUsize,
    pub windows: WindowSettings,
    pub max_inflight_bytes: usize,
    /// Deadline of one window's write (and each statement's `statement_timeout`).
    pub flush_timeout: Duration,
    /// The PII vault, when `PII_KMS_KEY_ID` is set.
    pub pii: Option<PiiSettings>,
    pub shutdown_grace: Duration,
    pub retry_max_backoff: Duration,
}

/// The PII vault's settings.
#[derive(Debug, Clone)]
pub struct PiiSettings {
    pub kms_key_id: String,
    pub key_rotation: Duration,
}

impl Settings {
    /// The masker these settings describe.
    pub fn masker(&self) -> Masker {
        Masker::new(&self.mask_key).with_copy_max_bytes(self.quarantine_copy_max_bytes)
    }
}
