//! Scrub: finds PII in a quarantined body by its shape, not only by its key.
//!
//! A rejected body may carry an address or a device id under any key, in free text, in an
//! array, as a key, inside JSON encoded in a string (a double-encoded record, an SNS envelope)
//! or in a body that is not JSON at all. [`scrub_body`] masks every token shaped like an IPv4
//! or IPv6 address or a device id wherever it stands, and every value under a PII-ish key
//! whatever its shape. Only quarantine uses this, so it errs towards masking too much.
//!
//! Shapes (on ASCII; other scripts' digits are not addresses to anyone's parser):
//! - IPv4: four or more runs of digits joined by single dots (`1.2.3.4`, `1.2.3.4:80`,
//!   `ip=1.2.3.4,`); the octets are not range-checked, so `999.1.1.1` and `1.2.3.4.5` go too.
//! - IPv6: a run of hex digits, `:` and `.` holding a hex digit and at least two colons,
//!   masked as the address it parses to with [`Ipv6Addr`] (after dropping sentence dots and a
//!   stray edge colon), or whole if it does not parse but may hide one: it holds `::` or six
//!   or more colons (`12:30:45` does not). Brackets, ports and zone ids (`[2001:db8::1]:443`,
//!   `fe80::1%eth0`) stay outside the run and are kept; a bare `::` is left alone.
//! - Device ids: two or more runs of digits joined by single dashes, six digits or more in all
//!   (`123-45-6789`; dates such as `2024-01-31` go too).
//!
//! Before scanning, `\uXXXX` escapes of the characters these shapes are made of are decoded,
//! so `\u0032\u0030\u0033.0.113.5` cannot slip by as text.

use std::net::IpAddr;

use serde_json::Value;

use crate::shapes;

/// How many levels of JSON-in-a-string are unwrapped; deeper strings are scrubbed as text.
const MAX_NESTED_JSON: usize = 8;

/// Longer keys are never PII-ish (and are not normalised).
const MAX_KEY_LEN: usize = 64;

/// Keys whose values are masked whole, after [`normalise_key`].
const PII_KEY_NAMES: &[&str] = &[
    "ip",
    "ips",
    "ipaddr",
    "ipaddress",
    "ipv4",
    "ipv6",
    "clientip",
    "clientaddr",
    "clientaddress",
    "clientipaddress",
    "sourceip",
    "sourceaddr",
    "sourceaddress",
    "sourceipaddress",
    "srcip",
    "srcaddr",
    "remoteip",
    "remoteaddr",
    "remoteaddress",
    "peerip",
    "peeraddr",
    "userip",
    "realip",
    "xrealip",
    "forwardedfor",
    "xforwardedfor",
    "deviceid",
    "deviceids",
    "deviceuuid",
    "devid",
    "udid",
    "androidid",
    "advertisingid",
    "idfa",
    "idfv",
    "imei",
];

/// A copy of `body` with every address- or device-id-like token, and every value under a
/// PII-ish key, replaced by `mask` of it.
///
/// A JSON body is walked at any depth, keys and values; a string holding a JSON object or
/// array is unwrapped (up to 8 levels), scrubbed and re-encoded. A value under a PII-ish key
/// (`ip`, `client_ip`, `deviceId`, ...: compared case-insensitively, ignoring `_`, `-`, `.`
/// and spaces) is masked whole: a string as it is, another non-null value from its JSON
/// text; `null` stays `null`. A body that is not JSON goes through [`scrub_text`].
///
/// Addresses are masked in their canonical form (`2001:DB8::1` as `2001:db8::1`), as
/// `user_logins.masked_ip` is, so a quarantined address can be matched with stored rows.
pub fn scrub_body(body: &str, mask: &dyn Fn(&str) -> String) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(value) => scrub_value(value, mask, 0).to_string(),
        Err(_) => scrub_text(body, mask),
    }
}

/// [`scrub_body`] kept within `max_bytes`: a body longer than that is scrubbed from its first
/// `max_bytes` only (cut back to before any token it might split, then scanned as text), and a
/// copy that comes out longer is cut, each ending with a marker naming the body's whole length.
/// Memory and time stay bounded whatever the body holds: a 1 MiB body of addresses would
/// otherwise become some 8 MiB of masks.
pub fn scrub_bounded(body: &str, max_bytes: usize, mask: &dyn Fn(&str) -> String) -> String {
    let copy = match body.len() <= max_bytes {
        true => scrub_body(body, mask),
        false => scrub_text(token_safe_prefix(body, max_bytes), mask),
    };
    if copy.len() <= max_bytes && body.len() <= max_bytes {
        return copy;
    }
    let marker = format!("…[truncated by loginflow: {} bytes received]", body.len());
    // Cutting scrubbed text cannot make a token: it holds none, and a cut only shortens runs.
    let mut out = floor_prefix(&copy, max_bytes.saturating_sub(marker.len())).to_owned();
    out.push_str(&marker);
    out
}

/// The longest prefix of `text` of at most `max_bytes` on a character boundary.
fn floor_prefix(text: &str, max_bytes: usize) -> &str {
    let mut end = max_bytes.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A prefix of at most `max_bytes` that ends before any run of characters a token or an escape
/// is made of, so no address, device id or `\uXXXX` escape is cut in two (a cut one would no
/// longer look like what it is, and slip past the scan).
fn token_safe_prefix(text: &str, max_bytes: usize) -> &str {
    let prefix = floor_prefix(text, max_bytes);
    let keep = prefix
        .bytes()
        .rposition(|b| !(b.is_ascii_hexdigit() || matches!(b, b'.' | b':' | b'-' | b'\\' | b'u' | b'U')))
        .map_or(0, |last| last + 1);
    &prefix[..keep]
}

/// A copy of free `text` with every address- or device-id-like token replaced by `mask`
/// of it (see the module documentation for the shapes). In text that looks like JSON, the
/// value after a quoted PII-ish key (`"ip": "..."`, also with escaped quotes) is masked
/// whole too when it is a string or a scalar other than `null`, so a truncated record keeps
/// no raw value of any shape there; an object or array there gets the shape scan only.
pub fn scrub_text(text: &str, mask: &dyn Fn(&str) -> String) -> String {
    let text = shapes::decode_escapes(text);
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    pii_key_values(bytes, &mut spans);
    shapes::pii_shaped_spans(bytes, &mut spans);
    if spans.is_empty() {
        return text.into_owned();
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(text.len() + spans.len() * 64);
    let mut copied = 0;
    let mut spans = spans.into_iter().peekable();
    while let Some((start, mut end)) = spans.next() {
        while let Some(&(next_start, next_end)) = spans.peek() {
            if next_start >= end {
                break;
            }
            end = end.max(next_end);
            spans.next();
        }
        // Every span starts and ends next to an ASCII byte or at an end, so these are char
        // boundaries; `get` keeps a mistake from panicking (the rest is then masked whole).
        match (text.get(copied..start), text.get(start..end)) {
            (Some(before), Some(token)) => {
                out.push_str(before);
                out.push_str(&mask_token(token, mask));
                copied = end;
            }
            _ => {
                out.push_str(&mask(text.get(copied..).unwrap_or_default()));
                return out;
            }
        }
    }
    out.push_str(text.get(copied..).unwrap_or_default());
    out
}

fn scrub_value(value: Value, mask: &dyn Fn(&str) -> String, depth: usize) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, field)| {
                    let field =
                        if is_pii_key(&key) { mask_whole(field, mask) } else { scrub_value(field, mask, depth) };
                    (scrub_string(&key, mask, depth), field)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(|item| scrub_value(item, mask, depth)).collect()),
        Value::String(text) => Value::String(scrub_string(&text, mask, depth)),
        other => other,
    }
}

/// A string holding a JSON object or array is scrubbed as JSON and re-encoded; any other as text.
fn scrub_string(text: &str, mask: &dyn Fn(&str) -> String, depth: usize) -> String {
    if depth < MAX_NESTED_JSON && matches!(text.trim_start().as_bytes().first(), Some(b'{' | b'[')) {
        if let Ok(inner @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str::<Value>(text) {
            return scrub_value(inner, mask, depth + 1).to_string();
        }
    }
    scrub_text(text, mask)
}

fn mask_whole(value: Value, mask: &dyn Fn(&str) -> String) -> Value {
    match value {
        Value::Null => Value::Null,
        Value::String(text) => Value::String(mask_token(&text, mask)),
        other => Value::String(mask(&other.to_string())),
    }
}

/// Masks an address by its canonical form (as `decode` stores it), anything else as written.
fn mask_token(token: &str, mask: &dyn Fn(&str) -> String) -> String {
    match token.parse::<IpAddr>() {
        Ok(ip) => mask(&shapes::canonical_ip(ip)),
        Err(_) => mask(token),
    }
}

fn is_pii_key(key: &str) -> bool {
    key.len() <= MAX_KEY_LEN && PII_KEY_NAMES.contains(&normalise_key(key).as_str())
}

/// Lower case without `_`, `-`, `.` and spaces: `client_ip`, `clientIp`, `Client-IP` are alike.
fn normalise_key(key: &str) -> String {
    key.chars().filter(|c| !matches!(c, '_' | '-' | '.' | ' ')).flat_map(char::to_lowercase).collect()
}

/// In JSON-like text, the values after quoted PII-ish keys: `"ip": "..."` (also with escaped
/// quotes, `\"ip\":\"...\"`) up to the closing quote, or a bare scalar other than `null`.
fn pii_key_values(bytes: &[u8], spans: &mut Vec<(usize, usize)>) {
    let is_key_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b' ');
    let is_space = |b: u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let skip = |mut i: usize, pred: &dyn Fn(u8) -> bool| {
        while i < bytes.len() && pred(bytes[i]) {
            i += 1;
        }
        i
    };
    let mut i = 0;
    while let Some(quote) = bytes[i..].iter().position(|&b| b == b'"').map(|p| p + i) {
        i = quote + 1;
        let key_start = quote + 1;
        let key_end = skip(key_start, &is_key_char);
        let close = skip(key_end, &|b| b == b'\\');
        if key_end == key_start || bytes.get(close) != Some(&b'"') {
            continue;
        }
        // The key is ASCII, so this cannot fail.
        let Ok(key) = std::str::from_utf8(&bytes[key_start..key_end]) else { continue };
        if !is_pii_key(key) {
            continue;
        }
        let colon = skip(close + 1, &is_space);
        if bytes.get(colon) != Some(&b':') {
            continue;
        }
        let value = skip(colon + 1, &is_space);
        let open = skip(value, &|b| b == b'\\');
        if bytes.get(open) == Some(&b'"') {
            let escaped = open > value;
            let start = open + 1;
            let mut end = start;
            while end < bytes.len() && bytes[end] != b'"' {
                // In a plain string `\"` is part of the value; in an escaped one it closes it.
                end += if bytes[end] == b'\\' && !escaped { 2 } else { 1 };
            }
            let end = end.min(bytes.len());
            let trimmed = start + bytes[start..end].iter().rposition(|&b| b != b'\\').map_or(0, |p| p + 1);
            if trimmed > start {
                spans.push((start, trimmed));
            }
            i = end;
        } else if matches!(bytes.get(value), Some(b'{' | b'[')) {
            // An object or array under a PII-ish key goes whole, to its closing bracket (or the
            // end of a cut text), as the JSON scrub masks it.
            let end = bracketed_end(bytes, value);
            spans.push((value, end));
            i = end;
        } else {
            let end = skip(value, &|b| !matches!(b, b',' | b'}' | b']' | b'"' | b'\\') && !is_space(b));
            if end > value && &bytes[value..end] != b"null" {
                spans.push((value, end));
            }
            i = end;
        }
        if i >= bytes.len() {
            break;
        }
    }
}

/// Where the object or array opening at `start` ends: just past the bracket that closes it,
/// counting brackets at any depth (brackets inside strings count too: masking more is the safe
/// side), or the end of the text.
fn bracketed_end(bytes: &[u8], start: usize) -> usize {
    let mut depth = 0usize;
    for (i, &b) in bytes.iter().enumerate().skip(start) {
        match b {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the HMAC: deterministic, and holding nothing of the token.
    fn tag(token: &str) -> String {
        format!("M{:016x}", fnv(token))
    }

    fn fnv(text: &str) -> u64 {
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    }

    fn scrub(body: &str) -> String {
        scrub_body(body, &tag)
    }

    fn assert_gone(out: &str, raws: &[&str]) {
        for raw in raws {
            assert!(!out.contains(raw), "{raw} leaked: {out}");
        }
    }

    #[test]
    fn double_encoded_record() {
        let body = r#""{\"ip\":\"203.0.113.77\",\"device_id\":\"123-45-6789\"}""#;
        let out = scrub(body);
        assert_gone(&out, &["203.0.113.77", "123-45-6789"]);
        assert!(out.contains(&tag("203.0.113.77")) && out.contains(&tag("123-45-6789")), "{out}");
        let inner: String = serde_json::from_str(&out).expect("still a JSON string");
        assert!(serde_json::from_str::<Value>(&inner).is_ok_and(|v| v.is_object()), "re-encoded: {inner}");
    }

    #[test]
    fn sns_envelope() {
        let body = r#"{"Type":"Notification","MessageId":"x","Message":"{\"ip\":\"203.0.113.77\",\"device_id\":\"123-45-6789\",\"user_id\":\"u1\",\"udid\":{\"kind\":\"opaque\"}}"}"#;
        let out = scrub(body);
        assert_gone(&out, &["203.0.113.77", "123-45-6789", "opaque"]);
        let envelope: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(envelope["Type"], "Notification");
        let message: Value = serde_json::from_str(envelope["Message"].as_str().unwrap()).unwrap();
        assert_eq!(message["ip"], tag("203.0.113.77").as_str());
        assert_eq!(message["user_id"], "u1");
        // Unwrapped as JSON, not only scrubbed as text: an object under a PII key goes whole.
        assert_eq!(message["udid"], tag(r#"{"kind":"opaque"}"#).as_str());
    }

    #[test]
    fn other_pii_keys_are_masked_whole() {
        let out = scrub(
            r#"{"client_ip": "198.51.100.7", "deviceId": "555-66-7777", "Source-IP": "not-an-ip", "remote_addr": 42, "ip": null}"#,
        );
        assert_gone(&out, &["198.51.100.7", "555-66-7777", "not-an-ip", "42"]);
        let value: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["client_ip"], tag("198.51.100.7").as_str());
        assert_eq!(value["deviceId"], tag("555-66-7777").as_str());
        assert_eq!(value["Source-IP"], tag("not-an-ip").as_str());
        assert_eq!(value["remote_addr"], tag("42").as_str());
        assert_eq!(value["ip"], Value::Null);
    }

    #[test]
    fn the_login_pii_keys_are_pii_keys() {
        for key in ["ip", "device_id"].iter().chain(&["IP", "client_ip", "deviceId", "Device-ID", "ipAddress"]) {
            assert!(is_pii_key(key), "{key}");
        }
        for key in ["user_id", "zip", "tip", "device_type", "app_version", "locale", "description"] {
            assert!(!is_pii_key(key), "{key}");
        }
    }

    #[test]
    fn free_text_in_a_value() {
        let out = scrub(r#"{"note": "login from 192.0.2.99 device 777-88-9999"}"#);
        assert_gone(&out, &["192.0.2.99", "777-88-9999"]);
        let expected = format!("login from {} device {}", tag("192.0.2.99"), tag("777-88-9999"));
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["note"], expected.as_str());
    }

    #[test]
    fn array_items() {
        let out = scrub(r#"["203.0.113.5", "999-00-1111", "keep"]"#);
        assert_eq!(out, serde_json::json!([tag("203.0.113.5"), tag("999-00-1111"), "keep"]).to_string());
    }

    #[test]
    fn an_address_as_a_key() {
        let out = scrub(r#"{"10.0.0.1": 1, "2001:db8::7": {"111-22-3333": true}}"#);
        assert_gone(&out, &["10.0.0.1", "2001:db8::7", "111-22-3333"]);
        assert!(out.contains(&tag("10.0.0.1")), "{out}");
    }

    #[test]
    fn non_json_text() {
        let out =
            scrub("ERROR login failed ip=203.0.113.5:8080, v6 [2001:DB8::1]:443 dev=123-45-6789; zone fe80::1%eth0.");
        assert_gone(&out, &["203.0.113.5", "2001:DB8::1", "123-45-6789", "fe80::1"]);
        assert!(out.starts_with("ERROR login failed ip="), "{out}");
        assert!(out.contains(&format!("ip={}:8080,", tag("203.0.113.5"))), "port kept: {out}");
        // Canonical form, as `decode` stores addresses.
        assert!(out.contains(&format!("[{}]:443", tag("2001:db8::1"))), "{out}");
        assert!(out.contains(&format!("{}%eth0.", tag("fe80::1"))), "{out}");
    }

    #[test]
    fn json_escapes_cannot_smuggle_an_address() {
        let escaped = r"\u0032\u0030\u0033.0.113.5";
        // Valid JSON: serde decodes the escapes.
        let out = scrub(&format!(r#"{{"note":"{escaped}"}}"#));
        assert_gone(&out, &["203.0.113.5", escaped]);
        assert!(out.contains(&tag("203.0.113.5")), "{out}");
        // Truncated JSON, and escapes of the dots and of escapes.
        for body in [
            format!(r#"{{"note":"{escaped}"#),
            r"note \u0032\u0030\u0033\u002e0\u002E113\u002e5 end".to_owned(),
            r#"{"Message":"{\"note\":\"\\u0032\\u0030\\u0033\\u002e0.113.5\"  "#.to_owned(),
            // `\u0030` decodes to `0`, which completes `\u0032`.
            r"\u\u0030032\u0030\u0033.0.113.5".to_owned(),
        ] {
            let out = scrub(&body);
            assert_gone(&out, &["203.0.113.5", escaped, r"\u0030", r"\u002e"]);
        }
    }

    #[test]
    fn truncated_json_keeps_no_value_under_a_pii_key() {
        let out = scrub(
            r#"{"user_id":"u1","device_id":"opaque token","ip":"x\"y","clientIp":7, "locale": null, "deviceId": {"a"#,
        );
        assert_gone(&out, &["opaque token", "x\\\"y", "\"y", ":7"]);
        assert!(out.contains(&tag("opaque token")) && out.contains(&tag("7")), "{out}");
        assert!(out.contains(r#""user_id":"u1""#) && out.contains(r#""locale": null"#), "{out}");
        let escaped = scrub(r#""{\"ip\":\"opaque\",\"device_id\":\"also opaque\"}"#);
        assert_gone(&escaped, &["opaque"]);
    }

    #[test]
    fn ipv6_written_forms() {
        for raw in [
            "2001:0db8:0000:0000:0000:ff00:0042:8329",
            "2001:db8::ff00:42:8329",
            "::1",
            "1::",
            "::ffff:192.0.2.1",
            "64:ff9b::198.51.100.7",
            "FE80::ABCD:1",
            "fe80::1",
        ] {
            for written in [
                raw.to_owned(),
                format!("[{raw}]:443"),
                format!("{raw}%eth0"),
                format!("addr:{raw}."),
                format!("cafe{raw}"),
                format!("x={raw}:"),
            ] {
                let out = scrub_text(&written, &tag);
                assert_gone(&out, &[raw]);
            }
            let canonical = shapes::canonical_ip(raw.parse::<IpAddr>().unwrap());
            assert_eq!(scrub_text(&format!("[{raw}]:443"), &tag), format!("[{}]:443", tag(&canonical)));
        }
    }

    #[test]
    fn a_swelling_body_gives_a_bounded_copy_with_a_marker_and_no_raw_token() {
        let dense: String = (0..150_000).map(|i| format!("10.{}.{}.{} ", i % 200, i / 200 % 200, i % 7)).collect();
        let json = format!(r#"{{"note":"{dense}","v6":"2001:db8::1"}}"#);
        for body in [dense.as_str(), json.as_str()] {
            for cut in [1_000, 4_096, 65_536] {
                let out = scrub_bounded(body, cut, &tag);
                assert!(out.len() <= cut, "{} > {cut}", out.len());
                assert!(
                    out.ends_with(&format!("…[truncated by loginflow: {} bytes received]", body.len())),
                    "{}",
                    &out[out.len() - 80..]
                );
                let mut tokens = Vec::new();
                crate::shapes::pii_shaped_spans(out.as_bytes(), &mut tokens);
                assert!(tokens.is_empty(), "a token survived: {:?}", tokens.first().map(|(a, b)| &out[*a..*b]));
            }
        }
        let small = r#"{"ip":"1.2.3.4"}"#;
        assert_eq!(scrub_bounded(small, 65_536, &tag), scrub(small));
    }

    #[test]
    fn a_cut_body_masks_whole_what_stands_under_a_pii_key() {
        let pad = "x".repeat(70_000);
        let body = format!(
            r#"{{"idfa":["6D92078A-8246-4BA4-AE5B-76104861E7DC"],"device_id":{{"v":"9774d56d682e549c"}},"de\u0076ice_id":"abcdef123","pad":"{pad}"}}"#
        );
        let out = scrub_bounded(&body, 65_536, &tag);
        assert_gone(&out, &["6D92078A", "9774d56d682e549c", "abcdef123"]);
    }

    #[test]
    fn a_cut_never_splits_a_token() {
        let body = format!("{}203.0.113.77 tail \\u0031.2", "x".repeat(95));
        for cut in 95..body.len() {
            let prefix = token_safe_prefix(&body, cut);
            assert!(prefix.len() <= cut);
            let whole_or_none = !prefix.contains("203") || prefix.contains("203.0.113.77 ");
            assert!(whole_or_none && !prefix.contains("\\u"), "{cut}: {prefix}");
        }
    }

    #[test]
    fn innocent_content_survives() {
        let body = r#"{"user_id":"424cdd21-063a-43a7-b91b-7ca1a833afae","app_version":"2.3.0","locale":"RU"}"#;
        let out: Value = serde_json::from_str(&scrub(body)).unwrap();
        assert_eq!(out, serde_json::from_str::<Value>(body).unwrap());
        for text in ["version 2.3.0 at 12:30:45 (HH:MM:SS)", "ids a-1 b-22 c-333 12345-x", "locale RU, type ios"] {
            assert_eq!(scrub_text(text, &tag), text);
        }
    }

    #[test]
    fn deep_string_encoded_json_is_scrubbed_as_text_past_the_limit() {
        let mut body = serde_json::json!({"ip": "203.0.113.9", "note": "device 123-45-6789"}).to_string();
        for _ in 0..20 {
            body = serde_json::json!({ "Message": body }).to_string();
        }
        let out = scrub(&body);
        assert_gone(&out, &["203.0.113.9", "123-45-6789"]);
    }

    #[test]
    fn large_hostile_bodies_finish() {
        let mib = 1 << 20;
        let bodies = [
            "1:".repeat(mib / 2),
            "1.".repeat(mib / 2),
            "1-".repeat(mib / 2),
            r"\\\\\\u0031".repeat(mib / 12),
            "\"ip\":\"".repeat(mib / 6),
            "[".repeat(mib),
            "\"{\\\"".repeat(mib / 4),
            "é1.2.3.4💥".repeat(mib / 16),
            serde_json::json!(vec!["[1,2,3]"; mib / 10]).to_string(),
        ];
        for body in &bodies {
            let started = std::time::Instant::now();
            let out = scrub(body);
            assert!(!out.contains("1.2.3.4"));
            assert!(started.elapsed() < std::time::Duration::from_secs(20), "{:?}", started.elapsed());
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv6Addr;

    fn tag(token: &str) -> String {
        // Hex, like the real mask, so masks can sit next to hex digits in the output.
        format!("{:016x}", token.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))))
    }

    /// A token as hidden in a body, and the raw value that must not survive.
    #[derive(Debug, Clone)]
    struct Token {
        written: String,
        raw: String,
    }

    fn plain(raw: String) -> Token {
        Token { written: raw.clone(), raw }
    }

    fn ipv4() -> impl Strategy<Value = String> {
        any::<[u8; 4]>().prop_map(|o| format!("{}.{}.{}.{}", o[0], o[1], o[2], o[3]))
    }

    fn ipv6() -> impl Strategy<Value = String> {
        let group = prop_oneof![Just(0u16), any::<u16>()];
        (prop::collection::vec(group, 8), 0usize..8, 0usize..8, 0u8..4, ipv4(), any::<bool>(), any::<bool>())
            .prop_map(|(groups, cut, gap, form, v4, padded, upper)| {
                let hex = |g: &u16| if padded { format!("{g:04x}") } else { format!("{g:x}") };
                let join = |gs: &[u16]| gs.iter().map(hex).collect::<Vec<_>>().join(":");
                let text = match form {
                    0 => join(&groups),
                    1 => {
                        // `::` standing for 1..=8 groups.
                        let tail = (cut + 1 + gap).min(8);
                        format!("{}::{}", join(&groups[..cut]), join(&groups[tail..]))
                    }
                    2 => format!("{}:{v4}", join(&groups[..6])),
                    _ => {
                        let tail = (cut.min(5) + 1 + gap).min(6);
                        format!(
                            "{}::{}{}{v4}",
                            join(&groups[..cut.min(5)]),
                            join(&groups[tail..6]),
                            if tail < 6 { ":" } else { "" }
                        )
                    }
                };
                if upper {
                    text.to_uppercase()
                } else {
                    text
                }
            })
            // The unspecified address carries nothing, and a bare `::` is left alone.
            .prop_filter("not `::`", |ip| ip != "::")
    }

    fn device_id() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u32..1000, 0u32..100, 0u32..10000).prop_map(|(a, b, c)| format!("{a:03}-{b:02}-{c:04}")),
            prop::collection::vec("[0-9]{1,5}", 2..5)
                .prop_filter("six digits or more", |groups| groups.iter().map(String::len).sum::<usize>() >= 6)
                .prop_map(|groups| groups.join("-")),
        ]
    }

    fn token() -> impl Strategy<Value = Token> {
        prop_oneof![
            ipv4().prop_map(plain),
            (ipv4(), 1u16..=u16::MAX).prop_map(|(ip, port)| Token { written: format!("{ip}:{port}"), raw: ip }),
            ipv6().prop_map(plain),
            (ipv6(), 1u16..=u16::MAX).prop_map(|(ip, port)| Token { written: format!("[{ip}]:{port}"), raw: ip }),
            (ipv6(), "[a-z0-9]{1,6}").prop_map(|(ip, zone)| Token { written: format!("{ip}%{zone}"), raw: ip }),
            device_id().prop_map(plain),
        ]
    }

    /// Free text around a token: words and punctuation, no digits of its own.
    fn filler() -> impl Strategy<Value = String> {
        "[a-zA-Z ]{0,6}[ .:,;=()<>\\[\\]{}'/|!?#&*+_-]{0,3}"
    }

    /// `text` with the characters picked by `bits` written as `\u00XX` escapes (JSON string content).
    fn escape_some(text: &str, bits: u64) -> String {
        text.chars()
            .enumerate()
            .map(|(i, c)| if bits >> (i % 64) & 1 == 1 { format!("\\u{:04x}", u32::from(c)) } else { c.to_string() })
            .collect()
    }

    /// A body hiding `tokens` in one of the shapes seen in quarantine.
    fn hide(tokens: &[Token], shape: u8, key: &str, before: &str, after: &str, bits: u64) -> String {
        let written: Vec<String> = tokens.iter().map(|t| format!("{before}{}{after}", t.written)).collect();
        let record = |key: &str| {
            let mut map = serde_json::Map::new();
            for (i, text) in written.iter().enumerate() {
                map.insert(format!("{key}{i}"), Value::from(text.as_str()));
            }
            map.insert("user_id".into(), "u1".into());
            Value::Object(map)
        };
        match shape {
            0 => record(key).to_string(),
            1 => Value::Object(written.iter().map(|w| (w.clone(), Value::from(1))).collect()).to_string(),
            2 => serde_json::json!(["x", written, 3, {"k": written}]).to_string(),
            3 => serde_json::json!({"a": {"b": [{"c": record(key)}]}}).to_string(),
            4 => serde_json::json!(written.join(" ")).to_string(),
            5 => serde_json::json!(record(key).to_string()).to_string(),
            6 => serde_json::json!({"Type": "Notification", "MessageId": "x", "Message": record(key).to_string()})
                .to_string(),
            7 => format!("login failed: {} (retry)", written.join(" / ")),
            // JSON whose strings carry `\u00XX` escapes of some of the token's characters.
            _ => {
                let fields: Vec<String> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| format!(r#""{key}{i}":"{before}{}{after}""#, escape_some(&t.written, bits)))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }
        }
    }

    /// `text` with its `\uXXXX` escapes decoded (as written by [`escape_some`]), to tell
    /// which tokens a cut body still holds whole.
    fn unescape(text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(at) = rest.find("\\u") {
            out.push_str(&rest[..at]);
            let code = rest.get(at + 2..at + 6).and_then(|hex| u32::from_str_radix(hex, 16).ok());
            match code.and_then(char::from_u32) {
                Some(c) => {
                    out.push(c);
                    rest = &rest[at + 6..];
                }
                None => {
                    out.push_str("\\u");
                    rest = &rest[at + 2..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// The forms of `raw` that must not appear in a scrubbed body.
    fn forbidden(raw: &str) -> Vec<String> {
        let json = serde_json::to_string(raw).unwrap();
        vec![raw.to_owned(), json[1..json.len() - 1].to_owned(), escape_some(raw, u64::MAX)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn no_generated_token_survives(
            tokens in prop::collection::vec(token(), 1..4),
            shape in 0u8..9,
            key in "[a-zA-Z_]{1,10}",
            before in filler(),
            after in filler(),
            bits in any::<u64>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let body = hide(&tokens, shape, &key, &before, &after, bits);
            // Whole, and cut short (no longer JSON): only tokens still whole in the cut body count.
            let cut_at = body.char_indices().map(|(i, _)| i).nth(cut.index(body.chars().count().max(1))).unwrap_or(body.len());
            for candidate in [body.as_str(), &body[..cut_at]] {
                let out = scrub_body(candidate, &tag);
                let decoded = unescape(candidate);
                for token in &tokens {
                    if !decoded.contains(token.raw.as_str()) {
                        continue;
                    }
                    let mut forms = forbidden(&token.raw);
                    if decoded.contains(token.written.as_str()) {
                        forms.push(escape_some(&token.written, bits));
                    }
                    for form in forms {
                        prop_assert!(!out.contains(&form), "{} survived in {} from {}", form, out, candidate);
                    }
                }
            }
        }

        #[test]
        fn generated_ipv6_are_valid(ip in ipv6()) {
            prop_assert!(ip.parse::<Ipv6Addr>().is_ok(), "{}", ip);
        }

        #[test]
        fn arbitrary_text_never_panics(body in ".{0,300}") {
            let _ = scrub_body(&body, &tag);
            let _ = scrub_text(&body, &tag);
        }

        #[test]
        fn escape_and_json_soup_never_panics(body in r#"[\\u0-9a-fA-F.:"{}\[\],é💥 -]{0,120}"#) {
            let _ = scrub_body(&body, &tag);
            let _ = scrub_text(&body, &tag);
        }

        #[test]
        fn arbitrary_json_never_panics(value in json_value()) {
            let body = value.to_string();
            let _ = scrub_body(&body, &tag);
            let _ = scrub_body(&serde_json::json!(body).to_string(), &tag);
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".{0,40}".prop_map(Value::from),
            ipv6().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(prop_oneof![Just("ip".to_owned()), ".{0,10}"], inner.clone(), 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                inner.prop_map(|v| Value::from(v.to_string())),
            ]
        })
    }
}
