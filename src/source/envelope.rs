//! SNS envelopes: a producer that publishes to an SNS topic delivering into the queue (without
//! raw message delivery) wraps each event as `{"Type":"Notification","MessageId":...,
//! "TopicArn":...,"Message":"<the event as a JSON string>",...}`. The event is `Message`; the
//! envelope's `MessageId`, stable across SNS's own redeliveries, is the idempotency key.

use serde::Deserialize;

use crate::decode::{Reason, Rejection};

/// Prefix of idempotency keys taken from SNS, so they can never equal an SQS message id.
pub const SNS_ID_PREFIX: &str = "sns:";

/// How message bodies are read (`INPUT_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum InputFormat {
    /// SNS envelopes are recognised and unwrapped; other bodies are events.
    #[default]
    Auto,
    /// Every body is an event (SNS raw message delivery, or a producer writing to SQS).
    Raw,
    /// Every body must be an SNS envelope; anything else is quarantined as `invalid_envelope`.
    Sns,
}

/// A body made ready for decoding.
#[derive(Debug, PartialEq, Eq)]
pub enum Unwrapped<'a> {
    /// Not an envelope: the body is the event.
    Raw(&'a str),
    /// An SNS notification: its idempotency key (`sns:` + its `MessageId`) and the event.
    Sns { key: String, message: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Notification {
    #[serde(rename = "Type")]
    kind: String,
    message_id: Option<String>,
    message: Option<serde_json::Value>,
}

/// The event's text in a message as received: an SNS envelope's `Message`, else the body
/// itself (a broken envelope included, which is quarantined whole).
pub fn event<'a>(received: &'a str, unwrapped: &'a Result<Unwrapped<'_>, Rejection>) -> &'a str {
    match unwrapped {
        Ok(Unwrapped::Raw(body)) => body,
        Ok(Unwrapped::Sns { message, .. }) => message,
        Err(_) => received,
    }
}

/// Unwraps an SNS envelope per `format`. A body that claims to be an envelope but is broken
/// (not a notification, no `MessageId`, `Message` missing or not a string) is rejected as
/// `invalid_envelope`, and quarantined whole like any other body.
pub fn unwrap(body: &str, format: InputFormat) -> Result<Unwrapped<'_>, Rejection> {
    let looks_like_envelope = body.contains("\"TopicArn\"");
    match format {
        InputFormat::Raw => return Ok(Unwrapped::Raw(body)),
        InputFormat::Auto if !looks_like_envelope => return Ok(Unwrapped::Raw(body)),
        _ => {}
    }
    let broken = |field: &str| Rejection { reason: Reason::InvalidEnvelope, detail: Some(field.to_owned()) };
    let notification: Notification = serde_json::from_str(body).map_err(|_| broken("envelope"))?;
    if notification.kind != "Notification" {
        return Err(broken("Type"));
    }
    let key = match notification.message_id {
        Some(id) if !id.is_empty() => format!("{SNS_ID_PREFIX}{id}"),
        _ => return Err(broken("MessageId")),
    };
    match notification.message {
        Some(serde_json::Value::String(message)) => Ok(Unwrapped::Sns { key, message }),
        _ => Err(broken("Message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str =
        r#"{"user_id":"u","app_version":"1.0","device_type":"ios","ip":"1.2.3.4","locale":null,"device_id":"1"}"#;

    fn envelope(message: &serde_json::Value) -> String {
        serde_json::json!({
            "Type": "Notification",
            "MessageId": "5f1c-sns",
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:logins",
            "Message": message,
            "Timestamp": "2026-11-24T10:00:00.000Z",
        })
        .to_string()
    }

    #[test]
    fn an_envelope_is_unwrapped_and_keyed_by_its_sns_id() {
        let body = envelope(&serde_json::Value::String(EVENT.into()));
        for format in [InputFormat::Auto, InputFormat::Sns] {
            assert_eq!(
                unwrap(&body, format).unwrap(),
                Unwrapped::Sns { key: "sns:5f1c-sns".into(), message: EVENT.into() }
            );
        }
        assert_eq!(unwrap(&body, InputFormat::Raw).unwrap(), Unwrapped::Raw(&body));
    }

    #[test]
    fn the_event_is_the_message_of_an_envelope_else_the_whole_body() {
        let body = envelope(&serde_json::Value::String(EVENT.into()));
        assert_eq!(event(&body, &unwrap(&body, InputFormat::Auto)), EVENT);
        assert_eq!(event(&body, &unwrap(&body, InputFormat::Raw)), body);
        let broken = envelope(&serde_json::Value::Null);
        assert_eq!(event(&broken, &unwrap(&broken, InputFormat::Auto)), broken);
    }

    #[test]
    fn plain_events_pass_through_unless_envelopes_are_required() {
        assert_eq!(unwrap(EVENT, InputFormat::Auto).unwrap(), Unwrapped::Raw(EVENT));
        assert_eq!(unwrap(EVENT, InputFormat::Sns).unwrap_err().reason, Reason::InvalidEnvelope);
    }

    #[test]
    fn broken_envelopes_are_rejected_with_the_field_at_fault() {
        let no_message = envelope(&serde_json::Value::Null).replace("\"Message\":null,", "");
        let not_a_string = envelope(&serde_json::json!({"ip": "1.2.3.4"}));
        let no_id = envelope(&serde_json::Value::String(EVENT.into())).replace("\"MessageId\":\"5f1c-sns\",", "");
        let whole = envelope(&serde_json::Value::String(EVENT.into()));
        let truncated = whole[..whole.len() - 20].to_owned();
        for (body, field) in
            [(no_message, "Message"), (not_a_string, "Message"), (no_id, "MessageId"), (truncated, "envelope")]
        {
            let rejection = unwrap(&body, InputFormat::Auto).unwrap_err();
            assert_eq!(
                (rejection.reason, rejection.detail.as_deref()),
                (Reason::InvalidEnvelope, Some(field)),
                "{body}"
            );
        }
    }
}
