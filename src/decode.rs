//! Decode + validate: a message body becomes a [`ValidLogin`] or a [`Rejection`] with a reason code.
//!
//! Nothing here logs or formats a raw value: serde's error messages can quote
//! the input, so they are mapped to fixed reason codes and never shown.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::shapes;

/// Column limits of `user_logins` (characters, as `varchar(n)` counts them).
pub const USER_ID_MAX_CHARS: usize = 128;
pub const DEVICE_TYPE_MAX_CHARS: usize = 32;
pub const LOCALE_MAX_CHARS: usize = 32;
pub const APP_VERSION_MAX_CHARS: usize = 32;
/// Shortest `device_id` looked for in the clear fields (a shorter one is too likely to turn up by chance).
const MIN_OWN_DEVICE_ID_CHARS: usize = 6;
/// Longest accepted raw `device_id`; it is stored only as a 64-character mask.
pub const DEVICE_ID_MAX_CHARS: usize = 256;

/// Why a message could not become a row. `as_str` values are stable: they are
/// stored in `user_logins_quarantine.reason` and used as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    EmptyBody,
    InvalidJson,
    NotAnObject,
    MissingField,
    NullField,
    WrongType,
    EmptyField,
    TooLong,
    InvalidCharacter,
    InvalidIp,
    InvalidAppVersion,
    /// An SNS envelope that cannot be unwrapped.
    InvalidEnvelope,
    /// A clear field (`user_id`, `device_type`, `locale`, `app_version`) holds text shaped like
    /// an IP address or a device id; the detail names the field.
    PiiInField,
    /// Passed validation, but PostgreSQL refused the row.
    DbRejected,
}

impl Reason {
    /// Every reason, so metrics can register each label at startup.
    pub const ALL: [Reason; 14] = [
        Reason::EmptyBody,
        Reason::InvalidJson,
        Reason::NotAnObject,
        Reason::MissingField,
        Reason::NullField,
        Reason::WrongType,
        Reason::EmptyField,
        Reason::TooLong,
        Reason::InvalidCharacter,
        Reason::InvalidIp,
        Reason::InvalidAppVersion,
        Reason::InvalidEnvelope,
        Reason::PiiInField,
        Reason::DbRejected,
    ];

    /// The machine-readable code.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::EmptyBody => "empty_body",
            Reason::InvalidJson => "invalid_json",
            Reason::NotAnObject => "not_an_object",
            Reason::MissingField => "missing_field",
            Reason::NullField => "null_field",
            Reason::WrongType => "wrong_type",
            Reason::EmptyField => "empty_field",
            Reason::TooLong => "too_long",
            Reason::InvalidCharacter => "invalid_character",
            Reason::InvalidIp => "invalid_ip",
            Reason::InvalidAppVersion => "invalid_app_version",
            Reason::InvalidEnvelope => "invalid_envelope",
            Reason::PiiInField => "pii_in_field",
            Reason::DbRejected => "db_rejected",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected body: the reason, and the field it concerns when there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    /// A field name from the fixed schema (never a value), or a SQLSTATE for `db_rejected`.
    pub detail: Option<String>,
}

impl Rejection {
    fn new(reason: Reason, field: &str) -> Self {
        Rejection { reason, detail: Some(field.to_owned()) }
    }
    fn bare(reason: Reason) -> Self {
        Rejection { reason, detail: None }
    }
}

/// A PII value (`ip`, `device_id`) before masking. It has no `Display`, and
/// its `Debug` prints nothing of the value, so it cannot leak through a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Pii(String);

impl Pii {
    /// The raw value, for the masking stage only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pii {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pii(<redacted>)")
    }
}

/// `app_version` as stored: an order-preserving integer and the original text.
///
/// `code = 10 × (major·1 000 000 + minor·1 000 + patch) + form`, where `form`
/// records how the text was written so the exact string can be rebuilt:
/// 0 = `X.Y`, 1 = `X.0Y` (two-digit minor below 10, e.g. `2.00`, `1.05`), 2 = `X.Y.Z`.
/// Numbers are written without leading zeros otherwise; major <= 213, minor and patch <= 999
/// (the largest code, 2 139 999 992, fits PostgreSQL's `integer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppVersion {
    pub code: i32,
    pub text: String,
}

/// Largest major version that fits the `integer` column.
pub const APP_VERSION_MAX_MAJOR: u32 = 213;

impl AppVersion {
    /// Encodes a version string, or `None` when it is not one of the three forms.
    pub fn parse(text: &str) -> Option<AppVersion> {
        let parts: Vec<&str> = text.split('.').collect();
        let (major, minor, patch, form) = match parts.as_slice() {
            [major, minor] if minor.len() == 2 && minor.starts_with('0') => (number(major)?, digits(minor)?, 0, 1),
            [major, minor] => (number(major)?, number(minor)?, 0, 0),
            [major, minor, patch] => (number(major)?, number(minor)?, number(patch)?, 2),
            _ => return None,
        };
        if major > APP_VERSION_MAX_MAJOR || minor > 999 || patch > 999 {
            return None;
        }
        let code = 10 * (major * 1_000_000 + minor * 1_000 + patch) + form;
        Some(AppVersion { code: i32::try_from(code).ok()?, text: text.to_owned() })
    }

    /// Rebuilds the original string from a code (the SQL function `loginflow_app_version_text` does the same).
    pub fn text_of(code: i32) -> Option<String> {
        let code = u32::try_from(code).ok()?;
        let (value, form) = (code / 10, code % 10);
        let (major, minor, patch) = (value / 1_000_000, value / 1_000 % 1_000, value % 1_000);
        match form {
            0 if patch == 0 => Some(format!("{major}.{minor}")),
            1 if patch == 0 && minor < 10 => Some(format!("{major}.{minor:02}")),
            2 => Some(format!("{major}.{minor}.{patch}")),
            _ => None,
        }
    }
}

/// A decimal number without leading zeros ("0" itself is fine).
fn number(s: &str) -> Option<u32> {
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    digits(s)
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// A login event that passed validation; PII not yet masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidLogin {
    pub user_id: String,
    pub device_type: String,
    pub ip: Pii,
    pub device_id: Pii,
    pub locale: Option<String>,
    pub app_version: AppVersion,
}

/// The wire shape: every field kept as raw JSON so that each problem gets its own reason.
#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    user_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    device_type: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    ip: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    device_id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    locale: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    app_version: Option<&'a RawValue>,
}

/// Keeps a present field, `null` included, as `Some`: `Option`'s own impl would turn `null` into `None`,
/// and a null field has a reason of its own.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Decodes and validates one message body.
pub fn decode(body: &str) -> Result<ValidLogin, Rejection> {
    let trimmed = body.trim_start();
    if trimmed.is_empty() {
        return Err(Rejection::bare(Reason::EmptyBody));
    }
    if !trimmed.starts_with('{') {
        // serde would read a JSON array into a struct positionally, so only objects go further.
        let reason = match serde_json::from_str::<serde::de::IgnoredAny>(body) {
            Ok(_) => Reason::NotAnObject,
            Err(_) => Reason::InvalidJson,
        };
        return Err(Rejection::bare(reason));
    }
    // Syntax errors and duplicate keys (ambiguous records) both end here.
    let wire: Wire<'_> = serde_json::from_str(body).map_err(|_| Rejection::bare(Reason::InvalidJson))?;

    let user_id = clear("user_id", required_text("user_id", wire.user_id, USER_ID_MAX_CHARS)?)?;
    let device_type = clear("device_type", required_text("device_type", wire.device_type, DEVICE_TYPE_MAX_CHARS)?)?;
    if !device_type.chars().all(|c| c.is_alphanumeric() || " _-.()/+,".contains(c)) {
        return Err(Rejection::new(Reason::InvalidCharacter, "device_type"));
    }
    let ip_text = required_text("ip", wire.ip, 64)?;
    let ip = ip_text.parse::<IpAddr>().map_err(|_| Rejection::new(Reason::InvalidIp, "ip"))?;
    let device_id = required_text("device_id", wire.device_id, DEVICE_ID_MAX_CHARS)?;
    let locale = match wire.locale {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => Some(clear("locale", text("locale", raw, LOCALE_MAX_CHARS)?)?.into_owned()),
    };
    if let Some(locale) = &locale {
        let mut chars = locale.chars();
        let well_formed =
            chars.next().is_some_and(char::is_alphabetic) && chars.all(|c| c.is_alphanumeric() || "-_.@".contains(c));
        if !well_formed {
            return Err(Rejection::new(Reason::InvalidCharacter, "locale"));
        }
    }
    let version_text = clear("app_version", required_text("app_version", wire.app_version, APP_VERSION_MAX_CHARS)?)?;
    // The record's own device id copied into a clear field, whatever its shape (an address is
    // already refused by the shape check above; a device id may hide in a UUID the check skips).
    if device_id.len() >= MIN_OWN_DEVICE_ID_CHARS {
        let clear_fields = [
            ("user_id", Some(&*user_id)),
            ("device_type", Some(&*device_type)),
            ("locale", locale.as_deref()),
            ("app_version", Some(&*version_text)),
        ];
        for (field, value) in clear_fields {
            if value.is_some_and(|value| value.contains(&*device_id)) {
                return Err(Rejection::new(Reason::PiiInField, field));
            }
        }
    }

    let app_version =
        AppVersion::parse(&version_text).ok_or_else(|| Rejection::new(Reason::InvalidAppVersion, "app_version"))?;

    Ok(ValidLogin {
        user_id: user_id.into_owned(),
        device_type: device_type.into_owned(),
        // The canonical text form: equal addresses written differently mask alike.
        ip: Pii(shapes::canonical_ip(ip)),
        device_id: Pii(device_id.into_owned()),
        locale,
        app_version,
    })
}

/// A value for a clear column: refused when it holds text shaped like an address or a device id.
fn clear<'a>(field: &str, value: Cow<'a, str>) -> Result<Cow<'a, str>, Rejection> {
    match shapes::holds_pii_shape(&value) {
        true => Err(Rejection::new(Reason::PiiInField, field)),
        false => Ok(value),
    }
}

fn required_text<'a>(field: &str, raw: Option<&'a RawValue>, max_chars: usize) -> Result<Cow<'a, str>, Rejection> {
    let raw = raw.ok_or_else(|| Rejection::new(Reason::MissingField, field))?;
    if raw.get() == "null" {
        return Err(Rejection::new(Reason::NullField, field));
    }
    let value = text(field, raw, max_chars)?;
    if value.trim().is_empty() {
        return Err(Rejection::new(Reason::EmptyField, field));
    }
    Ok(value)
}

fn text<'a>(field: &str, raw: &'a RawValue, max_chars: usize) -> Result<Cow<'a, str>, Rejection> {
    if !raw.get().starts_with('"') {
        return Err(Rejection::new(Reason::WrongType, field));
    }
    let value: Cow<'a, str> =
        serde_json::from_str(raw.get()).map_err(|_| Rejection::new(Reason::InvalidJson, field))?;
    // Fast path: a string of at most `max_chars` bytes has at most that many characters.
    if value.len() > max_chars && value.chars().count() > max_chars {
        return Err(Rejection::new(Reason::TooLong, field));
    }
    // PostgreSQL text cannot hold NUL; other control characters have no place in these fields.
    if value.chars().any(|c| c.is_control()) {
        return Err(Rejection::new(Reason::InvalidCharacter, field));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"user_id":"424cdd21-063a-43a7-b91b-7ca1a833afae","app_version":"2.3.0","device_type":"android","ip":"199.172.111.135","locale":"RU","device_id":"593-47-5928"}"#;

    fn reason(body: &str) -> (Reason, Option<String>) {
        let r = decode(body).unwrap_err();
        (r.reason, r.detail)
    }

    fn with(field: &str, value: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v[field] = serde_json::from_str(value).unwrap();
        v.to_string()
    }

    #[test]
    fn decodes_the_reference_record() {
        let login = decode(GOOD).unwrap();
        assert_eq!(login.user_id, "424cdd21-063a-43a7-b91b-7ca1a833afae");
        assert_eq!(login.device_type, "android");
        assert_eq!(login.ip.expose(), "199.172.111.135");
        assert_eq!(login.device_id.expose(), "593-47-5928");
        assert_eq!(login.locale.as_deref(), Some("RU"));
        assert_eq!(login.app_version, AppVersion { code: 20_030_002, text: "2.3.0".into() });
    }

    #[test]
    fn null_or_missing_locale_is_valid() {
        assert_eq!(decode(&with("locale", "null")).unwrap().locale, None);
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v.as_object_mut().unwrap().remove("locale");
        assert_eq!(decode(&v.to_string()).unwrap().locale, None);
    }

    #[test]
    fn the_wrong_message_type_is_missing_user_id() {
        assert_eq!(
            reason(r#"{"foo":"oops_wrong_msg_type","bar":"123"}"#),
            (Reason::MissingField, Some("user_id".into()))
        );
    }

    #[test]
    fn each_problem_has_its_reason() {
        assert_eq!(reason("").0, Reason::EmptyBody);
        assert_eq!(reason("   \n").0, Reason::EmptyBody);
        assert_eq!(reason("not json").0, Reason::InvalidJson);
        assert_eq!(reason("{\"user_id\":").0, Reason::InvalidJson);
        assert_eq!(reason("[1,2]").0, Reason::NotAnObject);
        assert_eq!(reason("\"text\"").0, Reason::NotAnObject);
        assert_eq!(reason("42").0, Reason::NotAnObject);
        assert_eq!(reason(&with("ip", "null")), (Reason::NullField, Some("ip".into())));
        assert_eq!(reason(&with("ip", "12345")), (Reason::WrongType, Some("ip".into())));
        assert_eq!(reason(&with("locale", "7")), (Reason::WrongType, Some("locale".into())));
        assert_eq!(reason(&with("app_version", "2.3")), (Reason::WrongType, Some("app_version".into())));
        assert_eq!(reason(&with("user_id", "\"\"")), (Reason::EmptyField, Some("user_id".into())));
        assert_eq!(reason(&with("ip", "\"999.1.1.1\"")), (Reason::InvalidIp, Some("ip".into())));
        assert_eq!(reason(&with("app_version", "\"2.x\"")).0, Reason::InvalidAppVersion);
        assert_eq!(reason(&with("device_type", "\"a\\u0000b\"")).0, Reason::InvalidCharacter);
        let long = format!("\"{}\"", "x".repeat(33));
        assert_eq!(reason(&with("device_type", &long)), (Reason::TooLong, Some("device_type".into())));
        let dup = GOOD.replacen('{', r#"{"ip":"1.1.1.1","#, 1);
        assert_eq!(reason(&dup).0, Reason::InvalidJson);
    }

    #[test]
    fn clear_fields_holding_an_address_or_a_device_id_are_refused_naming_the_field() {
        for (field, value) in [
            ("device_type", "\"10.0.0.77\""),
            ("locale", "\"333-44-5557\""),
            ("user_id", "\"login from 198.51.100.10 on 333-44-5555\""),
            ("user_id", "\"fe80::1\""),
            ("app_version", "\"10.0.0.77\""),
            ("device_type", "\"pixel 123-45-6789\""),
            ("locale", "\"en-2001:db8::7\""),
        ] {
            assert_eq!(reason(&with(field, value)), (Reason::PiiInField, Some(field.into())), "{field} {value}");
        }
    }

    #[test]
    fn a_clear_field_holding_the_records_own_device_id_is_refused() {
        let mut v: serde_json::Value = serde_json::from_str(GOOD).unwrap();
        v["device_id"] = "abcdef123".into();
        v["user_id"] = "user abcdef123".into();
        assert_eq!(reason(&v.to_string()), (Reason::PiiInField, Some("user_id".into())));
    }

    #[test]
    fn device_type_and_locale_have_their_shapes() {
        for (field, value) in [("device_type", "\"ios<script>\""), ("locale", "\"7x\""), ("locale", "\"en US\"")] {
            assert_eq!(reason(&with(field, value)), (Reason::InvalidCharacter, Some(field.into())), "{value}");
        }
        for (field, value) in
            [("device_type", "\"iPhone 15 (Pro)\""), ("locale", "\"en_US.UTF-8\""), ("locale", "\"pt-BR\"")]
        {
            assert!(decode(&with(field, value)).is_ok(), "{value}");
        }
    }

    #[test]
    fn an_ipv4_mapped_address_is_its_ipv4_address() {
        assert_eq!(decode(&with("ip", "\"::ffff:199.172.111.135\"")).unwrap().ip.expose(), "199.172.111.135");
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        let exactly_32 = format!("\"{}\"", "é".repeat(32));
        assert!(decode(&with("device_type", &exactly_32)).is_ok());
    }

    #[test]
    fn ipv6_extra_fields_and_unicode_are_valid() {
        let login = decode(&with("ip", "\"2001:DB8::1\"")).unwrap();
        assert_eq!(login.ip.expose(), "2001:db8::1");
        assert!(decode(&with("extra", "{\"nested\":[1,2]}")).is_ok());
        assert!(decode(&with("user_id", "\"ユーザー'; DROP TABLE user_logins;--\"")).is_ok());
    }

    #[test]
    fn app_version_forms_round_trip_and_keep_order() {
        let samples = ["0.96", "2.00", "1.05", "2.0", "2.3", "2.3.0", "0.2.6", "10.12.999", "213.999.999"];
        for text in samples {
            let v = AppVersion::parse(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(AppVersion::text_of(v.code).as_deref(), Some(text));
        }
        let codes: Vec<i32> = ["0.2.6", "0.96", "1.05", "2.0", "2.00", "2.0.0", "2.3", "2.3.0", "2.3.1", "10.0"]
            .iter()
            .map(|t| AppVersion::parse(t).unwrap().code)
            .collect();
        assert!(codes.windows(2).all(|w| w[0] < w[1]), "{codes:?}");
    }

    #[test]
    fn unencodable_versions_are_refused() {
        for text in ["", "2", "2.", ".1", "1.2.3.4", "01.2", "1.2.03", "1.001", "214.0.0", "1.1000", "v1.2", "1.-2"] {
            assert!(AppVersion::parse(text).is_none(), "{text}");
        }
        assert_eq!(AppVersion::text_of(-5), None);
        assert_eq!(AppVersion::text_of(20_030_009), None);
    }

    #[test]
    fn debug_output_hides_pii() {
        let printed = format!("{:?}", decode(GOOD).unwrap());
        assert!(!printed.contains("199.172.111.135") && !printed.contains("593-47-5928"), "{printed}");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("user_id".to_owned()),
                        Just("ip".to_owned()),
                        Just("device_id".to_owned()),
                        Just("app_version".to_owned()),
                        Just("locale".to_owned()),
                        "[a-z_]{1,10}"
                    ],
                    inner,
                    0..7
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_text_never_panics(body in ".{0,300}") {
            let _ = decode(&body);
        }

        #[test]
        fn arbitrary_json_never_panics_and_valid_means_well_formed(value in json_value()) {
            if let Ok(login) = decode(&value.to_string()) {
                prop_assert!(login.user_id.chars().count() <= USER_ID_MAX_CHARS);
                prop_assert!(login.ip.expose().parse::<IpAddr>().is_ok());
                prop_assert_eq!(AppVersion::text_of(login.app_version.code), Some(login.app_version.text));
            }
        }

        #[test]
        fn an_address_or_device_id_in_a_clear_field_never_passes(
            field in prop::sample::select(vec!["user_id", "device_type", "locale", "app_version"]),
            octets in any::<[u8; 4]>(),
            digits in (0u32..1000, 0u32..100, 0u32..10000),
            kind in 0u8..3,
            prefix in "[a-zA-Z ]{0,8}",
            suffix in "[a-zA-Z ]{0,8}",
        ) {
            let token = match kind {
                0 => format!("{}.{}.{}.{}", octets[0], octets[1], octets[2], octets[3]),
                1 => format!("{:03}-{:02}-{:04}", digits.0, digits.1, digits.2),
                _ => format!("2001:db8::{:x}", u16::from_be_bytes([octets[0], octets[1]])),
            };
            let good = r#"{"user_id":"u","app_version":"2.3.0","device_type":"ios","ip":"1.2.3.4","locale":"RU","device_id":"1"}"#;
            let mut body: serde_json::Value = serde_json::from_str(good).unwrap();
            body[field] = serde_json::Value::String(format!("{prefix}{token}{suffix}"));
            prop_assert!(decode(&body.to_string()).is_err(), "{} stored in {}", token, field);
        }

        #[test]
        fn version_codes_round_trip(major in 0u32..=213, minor in 0u32..1000, patch in 0u32..1000, form in 0u8..3) {
            let text = match form {
                0 => format!("{major}.{minor}"),
                1 => format!("{major}.{:02}", minor % 10),
                _ => format!("{major}.{minor}.{patch}"),
            };
            let version = AppVersion::parse(&text).expect("encodable");
            prop_assert_eq!(AppVersion::text_of(version.code), Some(text));
        }
    }
}
