//! The quarantine scrubber: finds PII by its shape, wherever it stands in a rejected body.
//!
//! A rejected body may carry an address or a device id under any key (`client_ip`,
//! `deviceId`), as a key, in free text, in an array, inside JSON encoded in a string (a
//! double-encoded record, an SNS envelope's `Message`), or in a body that is not JSON at all.
//! Every token shaped like an IPv4 or IPv6 address or a device id is replaced by its mask, and
//! every value under a PII-named key is masked whole. Quarantine may lose an innocent token
//! that looks like PII (a date such as `2026-11-24` has a device id's shape); it may never keep
//! a raw one.

use std::net::Ipv6Addr;

use serde_json::{Map, Value};

/// How deep JSON held in strings is unpacked; deeper text is scrubbed as text (still safe).
const MAX_NESTED_JSON: usize = 8;
/// Fewest digits in a device-id-like token (the sample's `NNN-NN-NNNN` has 9).
const DEVICE_ID_MIN_DIGITS: usize = 6;

/// Keys whose values are PII whatever their shape, compared lower-case without `_`, `-`, `.`.
const PII_KEYS: [&str; 12] = [
    "ip",
    "ipaddress",
    "ipaddr",
    "clientip",
    "sourceip",
    "remoteip",
    "remoteaddr",
    "remoteaddress",
    "deviceid",
    "device",
    "clientaddress",
    "xforwardedfor",
];

/// Whether a key names PII.
pub fn is_pii_key(key: &str) -> bool {
    let normal: String =
        key.chars().filter(|c| !matches!(c, '_' | '-' | '.' | ' ')).flat_map(char::to_lowercase).collect();
    PII_KEYS.contains(&normal.as_str())
}

/// A quarantine-safe copy of `body`: JSON is walked (keys, values, nested JSON strings),
/// anything else is scrubbed as text. `mask` turns a PII value into its mask.
pub fn scrub_body(body: &str, mask: &dyn Fn(&str) -> String) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(mut value) => {
            scrub_value(&mut value, mask, 0);
            value.to_string()
        }
        Err(_) => scrub_text(&unescape_ascii(body), mask),
    }
}

fn scrub_value(value: &mut Value, mask: &dyn Fn(&str) -> String, depth: usize) {
    match value {
        Value::Object(map) => {
            let fields = std::mem::take(map);
            let mut scrubbed = Map::with_capacity(fields.len());
            for (key, mut field) in fields {
                if is_pii_key(&key) {
                    field = match field {
                        Value::Null => Value::Null,
                        Value::String(text) => Value::String(mask(&text)),
                        other => Value::String(mask(&other.to_string())),
                    };
                } else {
                    scrub_value(&mut field, mask, depth);
                }
                scrubbed.insert(scrub_text(&key, mask), field);
            }
            *map = scrubbed;
        }
        Value::Array(items) => items.iter_mut().for_each(|item| scrub_value(item, mask, depth)),
        Value::String(text) => *text = scrub_string(text, mask, depth),
        _ => {}
    }
}

/// A JSON string value: unpacked and walked if it holds a JSON object or array, else scrubbed as text.
fn scrub_string(text: &str, mask: &dyn Fn(&str) -> String, depth: usize) -> String {
    let trimmed = text.trim_start();
    if depth < MAX_NESTED_JSON && (trimmed.starts_with('{') || trimmed.starts_with('[') || trimmed.starts_with('"')) {
        if let Ok(mut inner) = serde_json::from_str::<Value>(text) {
            scrub_value(&mut inner, mask, depth + 1);
            return inner.to_string();
        }
    }
    scrub_text(&unescape_ascii(text), mask)
}

/// Characters that can make up an address or a device id.
fn is_token_char(c: char) -> bool {
    c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '-')
}

/// Replaces every address-like or device-id-like token of free text by its mask.
pub fn scrub_text(text: &str, mask: &dyn Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(text.len());
    let mut start = None;
    for (i, c) in text.char_indices().chain(std::iter::once((text.len(), ' '))) {
        match (is_token_char(c) && i < text.len(), start) {
            (true, None) => start = Some(i),
            (true, Some(_)) => {}
            (false, Some(from)) => {
                let token = &text[from..i];
                if looks_like_pii(token) {
                    out.push_str(&mask(token));
                } else {
                    out.push_str(token);
                }
                start = None;
                if i < text.len() {
                    out.push(c);
                }
            }
            (false, None) => {
                if i < text.len() {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Whether a run of address characters holds an IPv4 or IPv6 address or a device id.
fn looks_like_pii(token: &str) -> bool {
    has_dotted_quad(token) || has_ipv6(token) || is_device_id_like(token)
}

/// Four groups of 1–3 digits joined by dots, anywhere in the token.
fn has_dotted_quad(token: &str) -> bool {
    let groups: Vec<&str> = token.split(|c: char| !(c.is_ascii_digit() || c == '.')).collect();
    groups.iter().any(|run| {
        let parts: Vec<&str> = run.split('.').collect();
        parts.windows(4).any(|w| w.iter().all(|p| (1..=3).contains(&p.len())))
    })
}

/// An IPv6 address: the token, or the token without leading/trailing punctuation, parses as one.
fn has_ipv6(token: &str) -> bool {
    if token.matches(':').count() < 2 {
        return false;
    }
    let trimmed = token.trim_matches(|c| matches!(c, '.' | '-'));
    trimmed.parse::<Ipv6Addr>().is_ok()
        || trimmed.trim_end_matches(':').parse::<Ipv6Addr>().is_ok()
        || trimmed.split('-').any(|part| part.parse::<Ipv6Addr>().is_ok())
        // An address followed by a port without brackets, or other trailing groups.
        || (2..=8).any(|n| trimmed.rsplitn(n, ':').last().is_some_and(|head| head.parse::<Ipv6Addr>().is_ok()))
}

/// Two or more groups of digits joined by dashes, with enough digits to identify a device.
fn is_device_id_like(token: &str) -> bool {
    token.split(['.', ':']).any(|run| {
        let groups: Vec<&str> = run.split('-').filter(|g| !g.is_empty()).collect();
        let digit_groups: Vec<&&str> = groups.iter().filter(|g| g.bytes().all(|b| b.is_ascii_digit())).collect();
        digit_groups.len() >= 2 && digit_groups.iter().map(|g| g.len()).sum::<usize>() >= DEVICE_ID_MIN_DIGITS
    })
}

/// Decodes JSON `\uXXXX` escapes of ASCII characters, so an escaped digit cannot carry an
/// address past the text scrub of a body that is not valid JSON.
fn unescape_ascii(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("\\u") {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("\\u") {
        out.push_str(&rest[..at]);
        let escaped =
            rest.get(at + 2..at + 6).and_then(|hex| u32::from_str_radix(hex, 16).ok()).and_then(char::from_u32);
        match escaped {
            Some(c) if c.is_ascii() => {
                out.push(c);
                rest = &rest[at + 6..];
            }
            _ => {
                out.push_str("\\u");
                rest = &rest[at + 2..];
            }
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_mask(value: &str) -> String {
        format!("<m:{}>", value.len())
    }

    fn scrub(body: &str) -> String {
        scrub_body(body, &fake_mask)
    }

    #[track_caller]
    fn assert_gone(body: &str, raws: &[&str]) {
        let out = scrub(body);
        for raw in raws {
            assert!(!out.contains(raw), "{raw} survived in {out} (from {body})");
        }
    }

    #[test]
    fn the_leaks_seen_last_round_are_closed() {
        assert_gone(r#""{\"ip\":\"203.0.113.77\",\"device_id\":\"123-45-6789\"}""#, &["203.0.113.77", "123-45-6789"]);
        assert_gone(
            r#"{"Type":"Notification","MessageId":"x","Message":"{\"ip\":\"203.0.113.78\",\"device_id\":\"123-45-6780\"}"}"#,
            &["203.0.113.78", "123-45-6780"],
        );
        assert_gone(r#"{"client_ip": "198.51.100.7", "deviceId": "555-66-7777"}"#, &["198.51.100.7", "555-66-7777"]);
        assert_gone(r#"{"note": "login from 192.0.2.99 device 777-88-9999"}"#, &["192.0.2.99", "777-88-9999"]);
        assert_gone(r#"["203.0.113.5", "999-00-1111"]"#, &["203.0.113.5", "999-00-1111"]);
        assert_gone(r#"{"10.0.0.1": 1, "2001:db8::7": 2}"#, &["10.0.0.1", "2001:db8::7"]);
        assert_gone(
            "ip=192.0.2.1, device 111-22-3333; v6 [2001:DB8::1]:443 fe80::1%eth0",
            &["192.0.2.1", "111-22-3333", "2001:DB8::1", "fe80::1"],
        );
        assert_gone(r#"{"s": "\u0032\u0030\u0033.0.113.5"}"#, &["203.0.113.5"]);
        assert_gone(
            r#"{"s": "\u0032\u0030\u0033.0.113.6" truncated"#,
            &["203.0.113.6", "\\u0032\\u0030\\u0033.0.113.6"],
        );
        assert_gone(
            "::ffff:192.0.2.44 and 2001:0db8:0000:0000:0000:ff00:0042:8329",
            &["192.0.2.44", "2001:0db8:0000:0000:0000:ff00:0042:8329"],
        );
    }

    #[test]
    fn innocent_content_survives() {
        let body =
            r#"{"user_id":"424cdd21-063a-43a7-b91b-7ca1a833afae","app_version":"2.3.0","locale":"RU","v":"0.96"}"#;
        let parsed = |text: &str| serde_json::from_str::<Value>(text).unwrap();
        assert_eq!(parsed(&scrub(body)), parsed(body));
        assert_eq!(scrub("plain words: deadbeef, 12:30"), "plain words: deadbeef, 12:30");
    }

    #[test]
    fn pii_keys_mask_values_whole_whatever_their_shape() {
        let out = scrub(r#"{"IP":"not-an-address","Device-Id":12345,"x":{"remote_addr":null}}"#);
        assert_eq!(out, r#"{"Device-Id":"<m:5>","IP":"<m:14>","x":{"remote_addr":null}}"#);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn ipv4() -> impl Strategy<Value = String> {
        any::<[u8; 4]>().prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3]))
    }

    fn ipv6() -> impl Strategy<Value = String> {
        (any::<[u16; 8]>(), 0usize..4).prop_map(|(groups, form)| {
            let address = std::net::Ipv6Addr::from(groups);
            match form {
                0 => address.to_string(),
                1 => groups.iter().map(|g| format!("{g:04x}")).collect::<Vec<_>>().join(":"),
                2 => address.to_string().to_uppercase(),
                _ => format!("::ffff:{}.{}.{}.{}", groups[0] >> 8, groups[0] & 0xff, groups[1] >> 8, groups[1] & 0xff),
            }
        })
    }

    fn device_id() -> impl Strategy<Value = String> {
        (0u32..1000, 0u32..100, 0u32..10000).prop_map(|(a, b, c)| format!("{a:03}-{b:02}-{c:04}"))
    }

    fn pii() -> impl Strategy<Value = String> {
        prop_oneof![ipv4(), ipv6(), device_id()]
    }

    /// Hides `raw` in one of many places of a body.
    fn hide(raw: &str, place: usize, key: &str, words: &str) -> String {
        let record = serde_json::json!({"user_id": "u", "note": format!("{words} {raw} {words}")}).to_string();
        match place {
            0 => serde_json::json!({ key: raw }).to_string(),
            1 => serde_json::json!({ raw: words }).to_string(),
            2 => serde_json::json!([words, raw]).to_string(),
            3 => serde_json::json!({"a": {"b": [{ key: format!("{words}({raw})") }]}}).to_string(),
            4 => serde_json::Value::String(record).to_string(),
            5 => serde_json::json!({"Type": "Notification", "TopicArn": "t", "Message": record}).to_string(),
            6 => format!("{words} {raw}, {words}"),
            7 => record[..record.len() - 3].to_owned(),
            _ => serde_json::json!({"deep": serde_json::Value::String(serde_json::json!({"x": serde_json::Value::String(record)}).to_string())}).to_string(),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn no_hidden_address_or_device_id_survives(
            raw in pii(),
            place in 0usize..9,
            key in "[a-zA-Z_]{1,12}",
            words in "[a-z ,;=()]{0,20}",
        ) {
            let body = hide(&raw, place, &key, &words);
            let out = scrub_body(&body, &|v| format!("<{}>", v.len()));
            prop_assert!(!out.contains(&raw), "{} survived in {} (from {})", raw, out, body);
            prop_assert!(!out.to_lowercase().contains(&raw.to_lowercase()), "{} survived in {}", raw, out);
        }

        #[test]
        fn never_panics(body in ".{0,300}") {
            let _ = scrub_body(&body, &|v| v.len().to_string());
        }
    }
}
