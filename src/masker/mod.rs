//! The masker: keyed, deterministic HMAC-SHA256 of the PII fields, as lower-case hex.
//!
//! Equal inputs give equal masks (analysts can group and count), but without the
//! key nobody can enumerate the 2^32 IPv4 space or the 10^9 device ids. [`scrub`] finds PII by its
//! shape in quarantined bodies.

pub mod scrub;

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

use std::sync::Arc;

use crate::decode::{Rejection, ValidLogin};
use crate::records::{MaskedLogin, MessageMeta, QuarantineRecord};

/// What [`Masker::key_id`] masks.
const KEY_ID_INPUT: &str = "loginflow mask key id";

/// Computes masks under one secret key.
#[derive(Clone)]
pub struct Masker {
    // The keyed state after absorbing the key; cloning it skips re-keying per value.
    keyed: Hmac<Sha256>,
    key_id: Arc<str>,
    /// Largest quarantine copy ([`Masker::mask_body`]).
    copy_max_bytes: usize,
}

/// Default of `QUARANTINE_COPY_MAX_BYTES`: the largest clear quarantine copy kept.
pub const DEFAULT_COPY_MAX_BYTES: usize = 64 << 10;

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Masker(<key redacted>)")
    }
}

impl Masker {
    /// A masker keyed by `key` (any length is accepted by HMAC; config enforces the minimum).
    pub fn new(key: &SecretString) -> Masker {
        let keyed =
            Hmac::<Sha256>::new_from_slice(key.expose_secret().as_bytes()).expect("HMAC accepts keys of any length");
        let mut masker = Masker { keyed, key_id: Arc::from(""), copy_max_bytes: DEFAULT_COPY_MAX_BYTES };
        masker.key_id = Arc::from(&masker.mask(KEY_ID_INPUT)[..16]);
        masker
    }

    /// The same masker, its quarantine copies kept within `max_bytes` (`QUARANTINE_COPY_MAX_BYTES`).
    pub fn with_copy_max_bytes(mut self, max_bytes: usize) -> Masker {
        self.copy_max_bytes = max_bytes;
        self
    }

    /// Names the key without revealing it: the start of the mask of a fixed string. Recorded
    /// on every row (`mask_key_id`), so rows masked under different keys can be told apart.
    pub fn key_id(&self) -> &Arc<str> {
        &self.key_id
    }

    /// Lower-case hex HMAC-SHA256 of `value`.
    pub fn mask(&self, value: &str) -> String {
        let digest = self.keyed.clone().chain_update(value.as_bytes()).finalize().into_bytes();
        let mut text = [0u8; 64];
        hex::encode_to_slice(digest, &mut text).expect("32 bytes are 64 hex digits");
        std::str::from_utf8(&text).expect("hex digits are ASCII").to_owned()
    }

    /// The keyed fingerprint of a user id, by which `forget` finds the sealed bodies naming the
    /// user: apart from the masks (a prefix), so it cannot be matched against a masked column.
    pub fn user_fingerprint(&self, user_id: &str) -> String {
        self.mask(&format!("loginflow user_id:{user_id}"))
    }

    /// The fingerprints of the user ids `body` names ([`crate::shapes::named_user_ids`]); `None`
    /// when it names none (`forget` then matches its clear copy's text instead).
    pub fn user_fingerprints(&self, body: &str) -> Option<Vec<String>> {
        let mut fingerprints: Vec<String> =
            crate::shapes::named_user_ids(body).into_iter().map(|id| self.user_fingerprint(id)).collect();
        fingerprints.sort_unstable();
        fingerprints.dedup();
        (!fingerprints.is_empty()).then_some(fingerprints)
    }

    /// Turns a valid login into the only record type the sink accepts.
    pub fn mask_login(&self, login: ValidLogin, meta: MessageMeta) -> MaskedLogin {
        MaskedLogin {
            masked_ip: self.mask(login.ip.expose()),
            masked_device_id: self.mask(login.device_id.expose()),
            message_id: meta.message_id,
            sent_at: meta.sent_at,
            user_id: login.user_id,
            device_type: login.device_type,
            locale: login.locale,
            app_version: login.app_version.code,
            app_version_text: login.app_version.text,
            mask_key_id: self.key_id.clone(),
            sealed: None,
        }
    }

    /// The quarantine record of a rejected body, PII masked.
    pub fn quarantine(&self, rejection: Rejection, body: &str, meta: MessageMeta) -> QuarantineRecord {
        QuarantineRecord {
            message_id: meta.message_id,
            reason: rejection.reason,
            detail: rejection.detail,
            masked_body: self.mask_body(body),
            sent_at: meta.sent_at,
            mask_key_id: self.key_id.clone(),
            sealed: None,
        }
    }

    /// A quarantine-safe copy of a body: every address-like or device-id-like token, wherever
    /// it stands, and every value under a PII-named key, replaced by its mask ([`scrub`]); at
    /// most `QUARANTINE_COPY_MAX_BYTES`, truncated with a marker beyond it.
    pub fn mask_body(&self, body: &str) -> String {
        scrub::scrub_bounded(body, self.copy_max_bytes, &|value| self.mask(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode;

    fn masker(key: &str) -> Masker {
        Masker::new(&SecretString::from(key.to_owned()))
    }

    #[test]
    fn matches_the_rfc4231_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            masker("Jefe").mask("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn deterministic_per_key_and_different_across_keys() {
        let a = masker(&"a".repeat(32));
        let b = masker(&"b".repeat(32));
        assert_eq!(a.mask("10.0.0.1"), a.mask("10.0.0.1"));
        assert_ne!(a.mask("10.0.0.1"), a.mask("10.0.0.2"));
        assert_ne!(a.mask("10.0.0.1"), b.mask("10.0.0.1"));
        assert_eq!(a.mask("x").len(), 64);
    }

    #[test]
    fn masked_login_has_no_raw_pii() {
        let m = masker(&"k".repeat(32));
        let body = r#"{"user_id":"u1","app_version":"0.96","device_type":"ios","ip":"199.172.111.135","locale":null,"device_id":"593-47-5928"}"#;
        let meta = MessageMeta {
            message_id: "m1".into(),
            sent_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap(),
        };
        let row = m.mask_login(decode(body).unwrap(), meta);
        assert_eq!(row.masked_ip, m.mask("199.172.111.135"));
        assert_eq!(row.masked_device_id, m.mask("593-47-5928"));
        assert_eq!(row.create_date().to_string(), "2023-11-14");
        let printed = format!("{row:?} {}", serde_json::to_string(&row).unwrap());
        assert!(!printed.contains("199.172.111.135") && !printed.contains("593-47-5928"));
    }

    #[test]
    fn body_masking_reaches_nested_and_odd_typed_fields() {
        let m = masker(&"k".repeat(32));
        let body = r#"{"ip":"1.2.3.4","nested":{"device_id":"111-22-3333","list":[{"IP":"5.6.7.8"}]},"device_id":12345,"user_id":"keep"}"#;
        let masked = m.mask_body(body);
        for raw in ["1.2.3.4", "111-22-3333", "5.6.7.8", "12345"] {
            assert!(!masked.contains(raw), "{raw} leaked: {masked}");
        }
        assert!(masked.contains(&m.mask("1.2.3.4")));
        assert!(masked.contains("keep"));
    }

    #[test]
    fn non_json_bodies_are_scrubbed() {
        let m = masker(&"k".repeat(32));
        let masked = m.mask_body(r#"{"ip":"10.1.2.3","device_id":"593-47-5928", "v6":"fe80::1" trunc"#);
        for raw in ["10.1.2.3", "593-47-5928", "fe80::1"] {
            assert!(!masked.contains(raw), "{raw} leaked: {masked}");
        }
        assert!(masked.contains("trunc"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn masker(key: &str) -> Masker {
        Masker::new(&SecretString::from(key.to_owned()))
    }

    fn ipv4() -> impl Strategy<Value = String> {
        any::<[u8; 4]>().prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3]))
    }

    fn device_id() -> impl Strategy<Value = String> {
        (0u32..1000, 0u32..100, 0u32..10000).prop_map(|(a, b, c)| format!("{a:03}-{b:02}-{c:04}"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn a_mask_never_contains_its_value_and_is_deterministic(value in ".{1,64}", key in "[ -~]{32,48}") {
            let m = masker(&key);
            let masked = m.mask(&value);
            prop_assert_eq!(masked.len(), 64);
            prop_assert!(masked.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            prop_assert_eq!(&masked, &m.mask(&value));
            // A short run of hex digits can turn up in any hex string by chance.
            let short_hex = value.len() <= 8 && value.bytes().all(|b| b.is_ascii_hexdigit());
            if !short_hex {
                prop_assert!(!masked.contains(&value));
            }
        }

        #[test]
        fn different_keys_give_different_masks(value in ".{1,32}", a in "[a-z]{32}", b in "[a-z]{32}") {
            prop_assume!(a != b);
            prop_assert_ne!(masker(&a).mask(&value), masker(&b).mask(&value));
        }

        #[test]
        fn quarantined_bodies_never_hold_the_raw_pii(
            ip in ipv4(),
            device in device_id(),
            nest in 0usize..3,
            truncate in 0usize..40,
            extra in "[a-z ]{0,20}",
        ) {
            let mut value = serde_json::json!({"ip": ip, "device_id": device, "note": extra});
            for _ in 0..nest {
                value = serde_json::json!({"wrapper": [value]});
            }
            let body = value.to_string();
            let m = masker(&"k".repeat(32));
            // Whole JSON, and JSON cut short (no longer parseable).
            for candidate in [body.clone(), body[..body.len().saturating_sub(truncate)].to_owned()] {
                let masked = m.mask_body(&candidate);
                for raw in [&ip, &device] {
                    if candidate.contains(raw.as_str()) {
                        prop_assert!(!masked.contains(raw.as_str()), "{} leaked from {}", raw, candidate);
                    }
                }
            }
        }
    }
}
