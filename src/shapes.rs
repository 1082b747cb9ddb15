//! Shapes of PII in text: the one definition of what looks like an IP address or a device id,
//! used to scrub quarantined bodies ([`crate::masker::scrub`]) and to keep such text out of the
//! clear columns ([`crate::decode`]).
//!
//! Shapes (on ASCII; other scripts' digits are not addresses to anyone's parser):
//! - IPv4: four or more runs of digits joined by single dots (`1.2.3.4`, `1.2.3.4:80`,
//!   `ip=1.2.3.4,`); the octets are not range-checked, so `999.1.1.1` and `1.2.3.4.5` go too.
//! - IPv6: a run of hex digits, `:` and `.` holding a hex digit and at least two colons, that
//!   parses as an [`Ipv6Addr`] (after dropping sentence dots and a stray edge colon), or that
//!   may hide one: it holds `::` or six or more colons (`12:30:45` does not).
//! - Device ids: two or more runs of digits joined by single dashes, six digits or more in all
//!   (`123-45-6789`; dates such as `2024-01-31` go too).

use std::borrow::Cow;
use std::net::{IpAddr, Ipv6Addr};

/// The longest written IPv6 address without zone: `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`.
const MAX_IPV6_LEN: usize = 45;

/// The text an address is masked as, wherever it was found: its canonical form, an IPv4-mapped
/// IPv6 address (`::ffff:a.b.c.d`) as the IPv4 address it maps, so both mask alike.
pub fn canonical_ip(ip: IpAddr) -> String {
    ip.to_canonical().to_string()
}

/// Spans of `bytes` shaped like an IPv4 or IPv6 address or a device id.
pub fn pii_shaped_spans(bytes: &[u8], spans: &mut Vec<(usize, usize)>) {
    digit_chains(bytes, b'.', 4, 0, spans);
    digit_chains(bytes, b'-', 2, 6, spans);
    ipv6_runs(bytes, spans);
}

/// Whether a clear field's value holds a token shaped like an address or a device id. UUIDs
/// (`8-4-4-4-12` hex digits, the shape of user ids and message ids) are not such tokens, even
/// when their groups happen to be all digits.
pub fn holds_pii_shape(text: &str) -> bool {
    // Every shape needs a digit, or (IPv6 of hex letters) two colons; most values have neither.
    if !text.bytes().any(|b| b.is_ascii_digit() || b == b':' || b == b'\\') {
        return false;
    }
    let text = decode_escapes(text);
    // Most values hold no dash, so no UUID: scanned in place, without a copy.
    let mut bytes = Cow::Borrowed(text.as_bytes());
    if text.contains('-') {
        blank_uuids(bytes.to_mut());
    }
    let mut spans = Vec::new();
    pii_shaped_spans(&bytes, &mut spans);
    !spans.is_empty()
}

/// Most user ids taken from one body.
const MAX_NAMED_USER_IDS: usize = 32;
/// Longest user id taken (the `user_id` column's limit).
const MAX_USER_ID_CHARS: usize = 128;
/// Most `user` / `uid` words looked at in one body, ids or not: the scan stays linear and bounded.
const MAX_CANDIDATES: usize = 10_000;

/// The user ids a body names, as a reader would find them, whatever surrounds them: the value
/// after a `user`, `user_id`, `userId`, `user-id`, `username` or `uid` key or word (any case),
/// followed by `:`, `=`, spaces or quotes (JSON members, double-encoded or plain, `key=value`
/// text, "login by user bob"). A quoted value runs to its closing quote; a bare one to the next
/// space or punctuation. At most 32, each at most 128 characters. `referred_by: <id>` names
/// no user.
pub fn named_user_ids(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut found = Vec::new();
    let (mut i, mut candidates) = (0, 0);
    // One pass: each `u` is looked at once, and each candidate reads a bounded window.
    while found.len() < MAX_NAMED_USER_IDS && candidates < MAX_CANDIDATES {
        let Some(offset) = bytes.get(i..).and_then(|rest| rest.iter().position(|&b| b | 0x20 == b'u')) else { break };
        let at = i + offset;
        i = at + 1;
        let mut j = match () {
            () if starts_with_ignoring_case(bytes, at, b"user") => at + 4,
            () if starts_with_ignoring_case(bytes, at, b"uid") => at + 3,
            () => continue,
        };
        candidates += 1;
        if j == at + 4 {
            if let Some(suffix) = [&b"_id"[..], b"-id", b"id", b"_name", b"name"]
                .into_iter()
                .find(|suffix| starts_with_ignoring_case(bytes, j, suffix))
            {
                j += suffix.len();
            }
        }
        let separators = j;
        let mut quote = None;
        while let Some(&b) = bytes.get(j) {
            match b {
                b':' | b'=' | b' ' | b'\t' | b'\\' => j += 1,
                b'"' | b'\'' => {
                    quote = Some(b);
                    j += 1;
                }
                _ => break,
            }
        }
        if j == separators {
            continue;
        }
        let window = &bytes[j..(j + 4 * MAX_USER_ID_CHARS).min(bytes.len())];
        let end = match quote {
            // A quoted value runs to its quote, written plainly or escaped (`\"`).
            Some(q) => window
                .iter()
                .enumerate()
                .position(|(k, &b)| b == q || (q == b'"' && b == b'\\' && window.get(k + 1) == Some(&b'"'))),
            None => window.iter().position(|&b| b.is_ascii_whitespace() || b",;)}]&\"'\\<>".contains(&b)),
        };
        let end = j + end.unwrap_or(window.len());
        if let Some(id) = text.get(j..end).map(str::trim) {
            if !id.is_empty() && id.chars().count() <= MAX_USER_ID_CHARS {
                found.push(id);
            }
        }
        i = end.max(i);
    }
    found
}

/// Whether `bytes` holds `word` (ASCII, lower case) at `at`, in any case.
fn starts_with_ignoring_case(bytes: &[u8], at: usize, word: &[u8]) -> bool {
    bytes.get(at..at + word.len()).is_some_and(|b| b.eq_ignore_ascii_case(word))
}

/// Overwrites every UUID-shaped run with `x`, so its digit groups are not read as a device id.
fn blank_uuids(bytes: &mut [u8]) {
    const GROUPS: [usize; 5] = [8, 4, 4, 4, 12];
    let is_uuid_at = |bytes: &[u8], start: usize| {
        let mut i = start;
        for (n, len) in GROUPS.iter().enumerate() {
            if n > 0 {
                if bytes.get(i) != Some(&b'-') {
                    return false;
                }
                i += 1;
            }
            if !bytes.get(i..i + len).is_some_and(|g| g.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += len;
        }
        true
    };
    // Only a UUID standing alone: `593-47-59281234-…` is a device id run into a UUID, not a UUID.
    let bounded = |bytes: &[u8], start: usize| {
        let apart = |b: &u8| !(b.is_ascii_hexdigit() || *b == b'-');
        start.checked_sub(1).and_then(|before| bytes.get(before)).is_none_or(apart)
            && bytes.get(start + 36).is_none_or(apart)
    };
    let mut start = 0;
    while start + 36 <= bytes.len() {
        if is_uuid_at(bytes, start) && bounded(bytes, start) {
            bytes[start..start + 36].fill(b'x');
            start += 36;
        } else {
            start += 1;
        }
    }
}

/// The characters the shapes and PII-ish keys are made of; only their escapes are decoded (never
/// a quote or a backslash, which would change the text's structure).
fn is_shape_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b':' | b'-' | b'_' | b' ')
}

/// Decodes `\uXXXX` escapes (after any number of backslashes, so escapes of escapes too) that
/// stand for a shape character. Works on the output, so an escape that only forms once an
/// inner one is decoded (`\u\u0030030`) is decoded as well. Linear: each step shrinks the output.
pub fn decode_escapes(text: &str) -> Cow<'_, str> {
    if !text.contains('\\') {
        return Cow::Borrowed(text);
    }
    let mut out: Vec<u8> = Vec::with_capacity(text.len());
    for &byte in text.as_bytes() {
        out.push(byte);
        while let Some((escape_start, decoded)) = escape_at_end(&out) {
            out.truncate(escape_start);
            out.push(decoded);
        }
    }
    // Only ASCII sequences were replaced by ASCII bytes, so the text stays UTF-8.
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

/// If `out` ends with `\+uXXXX` escaping a shape character: where the backslashes start, and the character.
fn escape_at_end(out: &[u8]) -> Option<(usize, u8)> {
    let len = out.len();
    if len < 6 || !matches!(out[len - 5], b'u' | b'U') || out[len - 6] != b'\\' {
        return None;
    }
    let hex = std::str::from_utf8(&out[len - 4..]).ok()?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let code = u8::try_from(u32::from_str_radix(hex, 16).ok()?).ok()?;
    if !is_shape_char(code) {
        return None;
    }
    let backslashes = out[..len - 5].iter().rev().take_while(|&&b| b == b'\\').count();
    Some((len - 5 - backslashes, code))
}

/// Maximal runs of digits joined by single `sep`s, with at least `min_groups` runs and `min_digits` digits.
fn digit_chains(bytes: &[u8], sep: u8, min_groups: usize, min_digits: usize, spans: &mut Vec<(usize, usize)>) {
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        let (mut groups, mut digits) = (0, 0);
        loop {
            let group_start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            groups += 1;
            digits += i - group_start;
            if i + 1 < bytes.len() && bytes[i] == sep && bytes[i + 1].is_ascii_digit() {
                i += 1;
            } else {
                break;
            }
        }
        if groups >= min_groups && digits >= min_digits {
            spans.push((start, i));
        }
    }
}

/// Runs of hex digits, `:` and `.` holding an IPv6 address, or possibly holding one.
fn ipv6_runs(bytes: &[u8], spans: &mut Vec<(usize, usize)>) {
    let in_run = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
    let mut i = 0;
    while i < bytes.len() {
        if !in_run(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && in_run(bytes[i]) {
            i += 1;
        }
        let run = &bytes[start..i];
        let colons = run.iter().filter(|&&b| b == b':').count();
        if colons < 2 || !run.iter().any(u8::is_ascii_hexdigit) {
            continue;
        }
        if let Some((from, to)) = ipv6_within(run) {
            spans.push((start + from, start + to));
        } else if colons >= 6 || run.windows(2).any(|w| w == b"::") {
            // Every IPv6 address holds `::` or seven colons (six before an embedded IPv4).
            spans.push((start, i));
        }
    }
}

/// The part of `run` that parses as an IPv6 address once sentence dots and a single stray
/// colon at either edge are dropped, if any.
fn ipv6_within(run: &[u8]) -> Option<(usize, usize)> {
    let (mut from, mut to) = (0, run.len());
    while from < to && run[from] == b'.' {
        from += 1;
    }
    while to > from && run[to - 1] == b'.' {
        to -= 1;
    }
    let parses = |from: usize, to: usize| {
        to - from <= MAX_IPV6_LEN
            && std::str::from_utf8(&run[from..to]).is_ok_and(|text| text.parse::<Ipv6Addr>().is_ok())
    };
    if parses(from, to) {
        return Some((from, to));
    }
    let stray_front = to - from > 1 && run[from] == b':' && run[from + 1] != b':';
    let stray_back = to - from > 1 && run[to - 1] == b':' && run[to - 2] != b':';
    let from = from + usize::from(stray_front);
    let to = to - usize::from(stray_back);
    (from < to && parses(from, to)).then_some((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_values_with_an_address_or_device_id_hold_pii() {
        for text in [
            "10.0.0.77",
            "333-44-5557",
            "login from 198.51.100.10 on 333-44-5555",
            "2001:db8::1",
            "user::ffff:10.1.2.3",
            "abc593-47-5928",
            "593-47-59281234-1234-1234-1234-123456789012",
            "\\u0031\\u0030.0.0.1",
        ] {
            assert!(holds_pii_shape(text), "{text}");
        }
    }

    #[test]
    fn ordinary_clear_values_hold_none() {
        for text in [
            "424cdd21-063a-43a7-b91b-7ca1a833afae",
            "12345678-1234-1234-1234-123456789012",
            "android",
            "iPhone 15 Pro",
            "RU",
            "en_US.UTF-8",
            "2.3.0",
            "0.96",
            "user-42",
            "ユーザー'; DROP TABLE user_logins;--",
            "12:30:45",
        ] {
            assert!(!holds_pii_shape(text), "{text}");
        }
    }

    #[test]
    fn the_user_ids_a_body_names_are_found_whatever_surrounds_them() {
        let cases: [(&str, &[&str]); 9] = [
            (r#"{"user_id":"u-1","ip":"1.2.3.4"}"#, &["u-1"]),
            (r#"{ "userId" : "u 2", "x": 1}"#, &["u 2"]),
            (r#""{\"user_id\":\"u-3\"}""#, &["u-3"]),
            ("login by user u-4 from somewhere", &["u-4"]),
            ("uid=u-5&ip=1.2.3.4", &["u-5"]),
            (r#"{"user_id":"other","referred_by":"u-6"}"#, &["other"]),
            (r#"{"user_agent":"Mozilla","UserName":"ユーザー"}"#, &["ユーザー"]),
            (r#"{"user_id":"o'brien@x.com"}"#, &["o'brien@x.com"]),
            ("no one here", &[]),
        ];
        for (text, expected) in cases {
            assert_eq!(named_user_ids(text), expected, "{text}");
        }
    }

    #[test]
    fn naming_scans_stay_linear() {
        let users = "users ".repeat(200_000);
        // 200 000 `user` words and no id: a scan that restarted its search at each would read
        // ~10^11 bytes here (minutes); one pass reads the text once.
        assert!(named_user_ids(&users).is_empty());
    }

    #[test]
    fn mapped_addresses_fold_to_ipv4() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(canonical_ip(mapped), "10.1.2.3");
        assert_eq!(canonical_ip("2001:DB8::1".parse().unwrap()), "2001:db8::1");
    }
}
