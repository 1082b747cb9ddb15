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
pub enum Unwrapped {
    /// Not an envelope: the body is the event.
    Raw,
    /// An SNS notification: its idempotency key (`sns:` + its `MessageId`) and the event.
    Sns { key: String, message: String },
}

/// The envelope's own fields, each kept as whatever JSON it holds.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Notification {
    #[serde(rename = "Type")]
    kind: Option<serde_json::Value>,
    message_id: Option<serde_json::Value>,
    topic_arn: Option<serde_json::Value>,
    message: Option<serde_json::Value>,
}

/// The event's text in a message as received: an SNS envelope's `Message`, else the body
/// itself (a broken envelope included, which is quarantined whole).
pub fn event<'a>(received: &'a str, unwrapped: &'a Result<Unwrapped, Rejection>) -> &'a str {
    match unwrapped {
        Ok(Unwrapped::Raw) => received,
        Ok(Unwrapped::Sns { message, .. }) => message,
        Err(_) => received,
    }
}

/// An id in the shape its issuer gives (SQS and SNS both issue UUIDs), in canonical
/// lower-case form; `None` for anything else, which is then not used as an id anywhere.
pub fn issued_id(text: &str) -> Option<String> {
    if text.len() != 36 {
        return None;
    }
    uuid::Uuid::try_parse(text).ok().map(|id| id.hyphenated().to_string())
}

/// Unwraps an SNS envelope per `format`. With [`InputFormat::Auto`] a body is an envelope only
/// when it has the envelope's own fields together (`Type` = `Notification`, `MessageId`,
/// `TopicArn`, `Message`); anything else is an event (a raw event with an extra `TopicArn`
/// included). An envelope whose `MessageId` is not a UUID (SNS's shape) or whose `Message` is not a
/// string is rejected as `invalid_envelope`, and quarantined whole like any other body.
pub fn unwrap(body: &str, format: InputFormat) -> Result<Unwrapped, Rejection> {
    let broken = |field: &str| Rejection { reason: Reason::InvalidEnvelope, detail: Some(field.to_owned()) };
    let notification = match format {
        InputFormat::Raw => return Ok(Unwrapped::Raw),
        // Cheap first: nearly every raw event lacks the field altogether.
        InputFormat::Auto if !body.contains("\"TopicArn\"") => return Ok(Unwrapped::Raw),
        InputFormat::Auto => match serde_json::from_str::<Notification>(body) {
            Ok(n) if n.is_complete() => n,
            _ => return Ok(Unwrapped::Raw),
        },
        InputFormat::Sns => {
            let n: Notification = serde_json::from_str(body).map_err(|_| broken("envelope"))?;
            if let Some(field) = n.missing_field() {
                return Err(broken(field));
            }
            n
        }
    };
    let key = match notification.message_id.as_ref().and_then(serde_json::Value::as_str).and_then(issued_id) {
        Some(id) => format!("{SNS_ID_PREFIX}{id}"),
        None => return Err(broken("MessageId")),
    };
    match notification.message {
        Some(serde_json::Value::String(message)) => Ok(Unwrapped::Sns { key, message }),
        _ => Err(broken("Message")),
    }
}

impl Notification {
    /// The first of the envelope's own fields that is absent (or, for `Type`, not `Notification`).
    fn missing_field(&self) -> Option<&'static str> {
        if self.kind.as_ref().and_then(serde_json::Value::as_str) != Some("Notification") {
            Some("Type")
        } else if self.message_id.is_none() {
            Some("MessageId")
        } else if self.topic_arn.is_none() {
            Some("TopicArn")
        } else if self.message.is_none() {
            Some("Message")
        } else {
            None
        }
    }

    fn is_complete(&self) -> bool {
        self.missing_field().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str =
        r#"{"user_id":"u","app_version":"1.0","device_type":"ios","ip":"1.2.3.4","locale":null,"device_id":"1"}"#;
    const SNS_ID: &str = "5f1c2b3a-0d4e-4f60-8a7b-9c0d1e2f3a4b";

    fn envelope_with_id(id: &serde_json::Value, message: &serde_json::Value) -> String {
        serde_json::json!({
            "Type": "Notification",
            "MessageId": id,
            "TopicArn": "arn:aws:sns:us-east-1:000000000000:logins",
            "Message": message,
            "Timestamp": "2026-11-24T10:00:00.000Z",
        })
        .to_string()
    }

    fn envelope(message: &serde_json::Value) -> String {
        envelope_with_id(&SNS_ID.into(), message)
    }

    #[test]
    fn an_envelope_is_unwrapped_and_keyed_by_its_sns_id() {
        let body = envelope(&serde_json::Value::String(EVENT.into()));
        for format in [InputFormat::Auto, InputFormat::Sns] {
            assert_eq!(
                unwrap(&body, format).unwrap(),
                Unwrapped::Sns { key: format!("sns:{SNS_ID}"), message: EVENT.into() }
            );
        }
        assert_eq!(unwrap(&body, InputFormat::Raw).unwrap(), Unwrapped::Raw);
        let upper = envelope_with_id(&SNS_ID.to_uppercase().into(), &EVENT.into());
        assert_eq!(
            unwrap(&upper, InputFormat::Auto).unwrap(),
            Unwrapped::Sns { key: format!("sns:{SNS_ID}"), message: EVENT.into() }
        );
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
        assert_eq!(unwrap(EVENT, InputFormat::Auto).unwrap(), Unwrapped::Raw);
        assert_eq!(unwrap(EVENT, InputFormat::Sns).unwrap_err().reason, Reason::InvalidEnvelope);
    }

    #[test]
    fn a_raw_event_with_some_envelope_fields_is_a_raw_event() {
        let with_topic = EVENT.replacen('{', r#"{"TopicArn":"arn:aws:sns:us-east-1:0:t","#, 1);
        let with_more = EVENT.replacen('{', r#"{"TopicArn":"t","MessageId":"203.0.113.7","Type":"Notification","#, 1);
        let other_type = envelope(&EVENT.into()).replace("\"Notification\"", "\"SubscriptionConfirmation\"");
        for body in [with_topic, with_more, other_type] {
            assert_eq!(unwrap(&body, InputFormat::Auto).unwrap(), Unwrapped::Raw, "{body}");
        }
    }

    #[test]
    fn an_sns_id_not_shaped_as_sns_issues_it_is_no_id() {
        let long = "7".repeat(3_000);
        for id in [
            serde_json::json!("203.0.113.7"),
            serde_json::json!("sns-valid"),
            serde_json::json!(long),
            serde_json::json!(""),
            serde_json::json!(42),
            serde_json::json!({"id": SNS_ID}),
            serde_json::json!(format!("{{{SNS_ID}}}")),
            serde_json::json!(SNS_ID.replace('-', "")),
        ] {
            let body = envelope_with_id(&id, &EVENT.into());
            let rejection = unwrap(&body, InputFormat::Auto).unwrap_err();
            assert_eq!(
                (rejection.reason, rejection.detail.as_deref()),
                (Reason::InvalidEnvelope, Some("MessageId")),
                "{id}"
            );
        }
    }

    #[test]
    fn broken_envelopes_are_rejected_with_the_field_at_fault() {
        let not_a_string = envelope(&serde_json::json!({"ip": "1.2.3.4"}));
        for format in [InputFormat::Auto, InputFormat::Sns] {
            let rejection = unwrap(&not_a_string, format).unwrap_err();
            assert_eq!((rejection.reason, rejection.detail.as_deref()), (Reason::InvalidEnvelope, Some("Message")));
        }
        // A null `Message` is no `Message`: an event unless envelopes are required.
        let null_message = envelope(&serde_json::Value::Null);
        assert_eq!(unwrap(&null_message, InputFormat::Auto).unwrap(), Unwrapped::Raw);
        let rejection = unwrap(&null_message, InputFormat::Sns).unwrap_err();
        assert_eq!((rejection.reason, rejection.detail.as_deref()), (Reason::InvalidEnvelope, Some("Message")));
        // Required to be envelopes: the missing field is named.
        let whole = envelope(&serde_json::Value::String(EVENT.into()));
        let no_message = whole.replace("\"Message\"", "\"Mess\"");
        let no_id = whole.replace("\"MessageId\"", "\"Id\"");
        let truncated = whole[..whole.len() - 20].to_owned();
        for (body, field) in [(no_message, "Message"), (no_id, "MessageId"), (truncated, "envelope")] {
            let rejection = unwrap(&body, InputFormat::Sns).unwrap_err();
            assert_eq!(
                (rejection.reason, rejection.detail.as_deref()),
                (Reason::InvalidEnvelope, Some(field)),
                "{body}"
            );
        }
    }
}
