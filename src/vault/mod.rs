//! The PII vault (SPEC §4b): the raw `ip`, `device_id` and quarantined bodies, sealed with
//! envelope encryption under AWS KMS, so the people allowed to can recover them.
//!
//! Ingest asks KMS for an AES-256 data key (`GenerateDataKey`) once per rotation interval,
//! stores the KMS-wrapped copy in `pii_data_keys`, and seals every value with AES-256-GCM
//! under the plaintext copy, which lives only in memory (zeroed when dropped). Each value
//! gets a fresh random nonce, and the associated data binds it to its message id and column,
//! so a sealed value copied to another row or column does not open. Ingest needs
//! `kms:GenerateDataKey` only; opening needs `kms:Decrypt` ([`commands`]).
//!
//! Sealed format: `[1][nonce: 12 bytes][ciphertext + 16-byte tag]`.

pub(crate) mod quarantined;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use aws_sdk_kms::types::DataKeySpec;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use zeroize::Zeroize;

use crate::records::Sealed;
use deadpool_postgres::Pool;

/// The first byte of every sealed value: the format's version.
const FORMAT_VERSION: u8 = 1;
const NONCE_BYTES: usize = 12;

/// Which value a sealed blob holds (part of its associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Ip,
    DeviceId,
    Body,
}

impl Column {
    fn as_str(self) -> &'static str {
        match self {
            Column::Ip => "ip",
            Column::DeviceId => "device_id",
            Column::Body => "body",
        }
    }
}

/// Errors of the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("KMS: {0}")]
    Kms(String),
    #[error("database: {0}")]
    Database(String),
    #[error("the sealed value does not open (wrong row, column or key, or tampered with)")]
    DoesNotOpen,
}

/// A database error (of tokio-postgres or of the sink's pool) as the vault reports it: the
/// error and its causes, which never carry a value.
pub(crate) fn db_error(err: impl std::error::Error + 'static) -> VaultError {
    VaultError::Database(crate::errors::error_chain(&err))
}

/// An AES-256-GCM key. The cipher holds the expanded key and zeroes it when dropped.
pub struct DataKey {
    pub id: Uuid,
    cipher: Aes256Gcm,
}

impl DataKey {
    /// A key from its plaintext bytes (zeroed here once the cipher holds them).
    pub fn from_plaintext(id: Uuid, mut plaintext: Vec<u8>) -> Result<DataKey, VaultError> {
        let cipher = Aes256Gcm::new_from_slice(&plaintext);
        plaintext.zeroize();
        let cipher = cipher.map_err(|_| VaultError::Kms("the data key is not 32 bytes".into()))?;
        Ok(DataKey { id, cipher })
    }

    /// Seals `plaintext` as `column` of `message_id`.
    pub fn seal(&self, message_id: &str, column: Column, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill(&mut nonce);
        let aad = associated_data(message_id, column);
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: aad.as_bytes() })
            .expect("AES-GCM encrypts any input shorter than 64 GiB");
        let mut out = Vec::with_capacity(1 + NONCE_BYTES + sealed.len());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Seals a valid login's raw `ip` and `device_id`.
    pub fn seal_login(&self, message_id: &str, login: &crate::decode::ValidLogin) -> Sealed {
        Sealed {
            data_key_id: self.id,
            ip: Some(self.seal(message_id, Column::Ip, login.ip.expose().as_bytes())),
            device_id: Some(self.seal(message_id, Column::DeviceId, login.device_id.expose().as_bytes())),
            body: None,
            user_fingerprints: None,
        }
    }

    /// Seals a quarantined message's raw body.
    pub fn seal_body(&self, message_id: &str, body: &str) -> Sealed {
        Sealed {
            data_key_id: self.id,
            ip: None,
            device_id: None,
            body: Some(self.seal(message_id, Column::Body, body.as_bytes())),
            user_fingerprints: None,
        }
    }

    /// Opens a value sealed as `column` of `message_id`.
    pub fn open(&self, message_id: &str, column: Column, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        let (version, rest) = sealed.split_first().ok_or(VaultError::DoesNotOpen)?;
        if *version != FORMAT_VERSION || rest.len() < NONCE_BYTES {
            return Err(VaultError::DoesNotOpen);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_BYTES);
        let aad = associated_data(message_id, column);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: aad.as_bytes() })
            .map_err(|_| VaultError::DoesNotOpen)
    }
}

fn associated_data(message_id: &str, column: Column) -> String {
    format!("loginflow/v{FORMAT_VERSION}|{}|{message_id}", column.as_str())
}

/// The ingest side: seals with the current data key, replaced every rotation interval.
pub struct Vault {
    kms: aws_sdk_kms::Client,
    kms_key_id: String,
    current: RwLock<Arc<DataKey>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("kms_key_id", &self.kms_key_id).finish_non_exhaustive()
    }
}

impl Vault {
    /// Asks KMS for a first data key and stores its wrapped copy.
    pub async fn open(kms: aws_sdk_kms::Client, kms_key_id: String, database: &Pool) -> Result<Vault, VaultError> {
        let key = new_data_key(&kms, &kms_key_id, database).await?;
        Ok(Vault { kms, kms_key_id, current: RwLock::new(Arc::new(key)) })
    }

    /// A vault sealing with `key` until the first rotation (benches and tests).
    pub fn with_data_key(kms: aws_sdk_kms::Client, kms_key_id: String, key: DataKey) -> Vault {
        Vault { kms, kms_key_id, current: RwLock::new(Arc::new(key)) }
    }

    /// The key new values are sealed with.
    pub fn current(&self) -> Arc<DataKey> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Replaces the data key every `interval` until `stop`; a failed rotation keeps the old key
    /// and is retried at the next tick.
    pub async fn rotate_every(self: Arc<Self>, interval: Duration, database: Pool, stop: CancellationToken) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match new_data_key(&self.kms, &self.kms_key_id, &database).await {
                Ok(key) => {
                    tracing::info!(data_key_id = %key.id, "PII vault: data key rotated");
                    *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(key);
                }
                Err(err) => {
                    crate::metrics::error("vault", "transient");
                    tracing::warn!(error = %err, "PII vault: data key rotation failed; keeping the current key");
                }
            }
        }
    }
}

/// Data keys unwrapped by KMS (`kms:Decrypt`) for the recovery commands, each asked for once
/// per command however many values it opens.
pub struct KeyRing {
    kms: aws_sdk_kms::Client,
    keys: HashMap<Uuid, DataKey>,
    /// Data keys KMS refused for good (a damaged wrapped copy, a deleted KMS key).
    refused: std::collections::HashSet<Uuid>,
}

impl KeyRing {
    pub fn new(kms: aws_sdk_kms::Client) -> KeyRing {
        KeyRing { kms, keys: HashMap::new(), refused: Default::default() }
    }

    /// The data key `id`, unwrapped from `wrapped` by KMS the first time it is asked for;
    /// `None` when KMS refuses that key for good, so the values sealed with it do not open
    /// (the caller counts them and goes on). A KMS that cannot be reached is an error.
    pub async fn key(&mut self, id: Uuid, wrapped: &[u8]) -> Result<Option<&DataKey>, VaultError> {
        if self.refused.contains(&id) {
            return Ok(None);
        }
        if !self.keys.contains_key(&id) {
            let out = match self.kms.decrypt().ciphertext_blob(aws_sdk_kms::primitives::Blob::new(wrapped)).send().await
            {
                Ok(out) => out,
                Err(err) => {
                    let err = aws_sdk_kms::Error::from(err);
                    if !refused_for_good(&err) {
                        return Err(VaultError::Kms(crate::errors::error_chain(&err)));
                    }
                    tracing::warn!(data_key_id = %id, error = %crate::errors::error_chain(&err), "KMS refuses a data key");
                    self.refused.insert(id);
                    return Ok(None);
                }
            };
            let plaintext = out.plaintext.ok_or_else(|| VaultError::Kms("no plaintext in the answer".into()))?;
            self.keys.insert(id, DataKey::from_plaintext(id, plaintext.into_inner())?);
        }
        Ok(self.keys.get(&id))
    }
}

/// KMS answers that nothing changes for this wrapped key: it is damaged or not this KMS key's,
/// or the KMS key is gone. A disabled key, or one pending deletion, can come back: an error.
fn refused_for_good(err: &aws_sdk_kms::Error) -> bool {
    use aws_sdk_kms::Error as E;
    matches!(err, E::InvalidCiphertextException(_) | E::IncorrectKeyException(_) | E::NotFoundException(_))
}

/// `GenerateDataKey` (AES-256), then the wrapped copy into `pii_data_keys` before first use.
async fn new_data_key(kms: &aws_sdk_kms::Client, kms_key_id: &str, database: &Pool) -> Result<DataKey, VaultError> {
    let out = kms
        .generate_data_key()
        .key_id(kms_key_id)
        .key_spec(DataKeySpec::Aes256)
        .send()
        .await
        .map_err(|err| VaultError::Kms(crate::errors::error_chain(&aws_sdk_kms::Error::from(err))))?;
    let wrapped = out.ciphertext_blob.ok_or_else(|| VaultError::Kms("no wrapped key in the answer".into()))?;
    let plaintext = out.plaintext.ok_or_else(|| VaultError::Kms("no plaintext key in the answer".into()))?;
    let id = Uuid::new_v4();
    let key = DataKey::from_plaintext(id, plaintext.into_inner())?;
    let key_arn = out.key_id.unwrap_or_else(|| kms_key_id.to_owned());
    let client = database.get().await.map_err(db_error)?;
    client
        .execute(
            "INSERT INTO pii_data_keys (id, kms_key_id, wrapped_key) VALUES ($1, $2, $3)",
            &[&id, &key_arn, &wrapped.as_ref()],
        )
        .await
        .map_err(db_error)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_keys_cipher_state_is_zeroed_when_dropped() {
        // Compiles only with `aes`'s `zeroize` feature on (Cargo.toml; `ghash`'s zeroes its key in its Drop).
        fn zeroed_on_drop<T: zeroize::ZeroizeOnDrop>() {}
        zeroed_on_drop::<aes::Aes256>();
    }

    fn key() -> DataKey {
        DataKey::from_plaintext(Uuid::new_v4(), vec![7u8; 32]).unwrap()
    }

    #[test]
    fn a_sealed_value_opens_only_in_its_own_row_and_column() {
        let key = key();
        let sealed = key.seal("m-1", Column::Ip, b"203.0.113.7");
        assert_eq!(key.open("m-1", Column::Ip, &sealed).unwrap(), b"203.0.113.7");
        assert!(matches!(key.open("m-2", Column::Ip, &sealed), Err(VaultError::DoesNotOpen)));
        assert!(matches!(key.open("m-1", Column::DeviceId, &sealed), Err(VaultError::DoesNotOpen)));
        let other = DataKey::from_plaintext(Uuid::new_v4(), vec![8u8; 32]).unwrap();
        assert!(matches!(other.open("m-1", Column::Ip, &sealed), Err(VaultError::DoesNotOpen)));
    }

    #[test]
    fn equal_values_seal_differently_and_tampering_is_caught() {
        let key = key();
        let a = key.seal("m-1", Column::Ip, b"10.0.0.1");
        let b = key.seal("m-1", Column::Ip, b"10.0.0.1");
        assert_ne!(a, b, "a fresh nonce per value");
        assert!(!a.windows(8).any(|w| w == b"10.0.0.1"));
        let mut tampered = a.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(key.open("m-1", Column::Ip, &tampered).is_err());
        assert!(key.open("m-1", Column::Ip, &[]).is_err());
    }

    #[test]
    fn a_data_key_must_be_32_bytes() {
        assert!(DataKey::from_plaintext(Uuid::new_v4(), vec![1u8; 16]).is_err());
    }
}
