//! Source: concurrent long-polling receivers, the registry of messages held, and
//! the visibility extender that keeps held messages from being redelivered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{ChangeMessageVisibilityBatchRequestEntry, Message, MessageSystemAttributeName};
use aws_sdk_sqs::Client;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::retry::Backoff;

/// Most messages one ReceiveMessage / batch call handles (an SQS limit).
pub const SQS_BATCH_LIMIT: usize = 10;

/// What is needed to delete a message once it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub message_id: String,
    pub receipt_handle: String,
}

impl Ack {
    /// The receipt handle, as the in-flight registry keys it.
    pub fn receipt(&self) -> &str {
        &self.receipt_handle
    }
}

/// One received message. `body` may hold raw PII: it is never logged.
pub struct Envelope {
    pub ack: Ack,
    pub body: String,
    /// The `SentTimestamp` attribute, the event time (the body carries none).
    pub sent_at: DateTime<Utc>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("ack", &self.ack)
            .field("body_len", &self.body.len())
            .field("sent_at", &self.sent_at)
            .finish()
    }
}

impl Envelope {
    /// Builds an envelope from an SQS message, or `None` when it has no receipt handle
    /// (it could never be deleted; SQS redrives it to the dead-letter queue).
    pub fn from_message(message: Message, now: DateTime<Utc>) -> Option<Envelope> {
        let receipt_handle = message.receipt_handle?;
        let sent_at = message
            .attributes
            .as_ref()
            .and_then(|attrs| attrs.get(&MessageSystemAttributeName::SentTimestamp))
            .and_then(|millis| millis.parse::<i64>().ok())
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or(now);
        let message_id = message.message_id.unwrap_or_else(|| format!("receipt:{receipt_handle}"));
        Some(Envelope { ack: Ack { message_id, receipt_handle }, body: message.body.unwrap_or_default(), sent_at })
    }
}

/// Messages received and not yet deleted, keyed by receipt handle.
#[derive(Debug, Default)]
pub struct InFlight {
    held: Mutex<HashMap<String, Instant>>,
}

impl InFlight {
    /// Records newly received messages (their visibility clock starts now).
    pub fn hold<'a>(&self, receipts: impl IntoIterator<Item = &'a str>) {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.extend(receipts.into_iter().map(|r| (r.to_owned(), now)));
        metrics::gauge!(metrics::INFLIGHT_MESSAGES).set(held.len() as f64);
    }

    /// Forgets messages that were deleted, or that will be redelivered.
    pub fn release<'a>(&self, receipts: impl IntoIterator<Item = &'a str>) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for receipt in receipts {
            held.remove(receipt);
        }
        metrics::gauge!(metrics::INFLIGHT_MESSAGES).set(held.len() as f64);
    }

    /// Number of messages held.
    pub fn len(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Receipts whose visibility was last set more than `older_than` ago; their clock restarts now.
    fn take_due(&self, older_than: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.iter_mut()
            .filter(|(_, since)| now.duration_since(**since) >= older_than)
            .map(|(receipt, since)| {
                *since = now;
                receipt.clone()
            })
            .collect()
    }
}

/// Settings of one receiver.
#[derive(Debug, Clone)]
pub struct ReceiveSettings {
    pub queue_url: String,
    pub wait_secs: u8,
    pub visibility_timeout_secs: u32,
    pub max_backoff: Duration,
}

/// One long-polling receiver: receives up to 10 messages at a time and hands each
/// batch to `out`. Waiting on a full `out` is the back-pressure that keeps memory bounded.
/// Returns when `stop` is cancelled or `out` is closed.
pub async fn receive_loop(
    client: Client,
    settings: ReceiveSettings,
    in_flight: Arc<InFlight>,
    out: mpsc::Sender<Vec<Envelope>>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(settings.max_backoff);
    loop {
        let request = client
            .receive_message()
            .queue_url(&settings.queue_url)
            .max_number_of_messages(SQS_BATCH_LIMIT as i32)
            .wait_time_seconds(settings.wait_secs.into())
            .visibility_timeout(settings.visibility_timeout_secs as i32)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = request => result,
        };
        let messages = match result {
            Ok(output) => {
                backoff.reset();
                output.messages.unwrap_or_default()
            }
            Err(err) => {
                metrics::error("source", "transient");
                metrics::retry("source");
                let delay = backoff.next_delay();
                tracing::warn!(error = %aws_sdk_sqs::Error::from(err), ?delay, "receive failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        if messages.is_empty() {
            continue;
        }
        let now = Utc::now();
        let batch: Vec<Envelope> = messages.into_iter().filter_map(|m| Envelope::from_message(m, now)).collect();
        metrics::counter!(metrics::MESSAGES_RECEIVED).increment(batch.len() as u64);
        in_flight.hold(batch.iter().map(|e| e.ack.receipt_handle.as_str()));
        if out.send(batch).await.is_err() {
            return;
        }
    }
}

/// Keeps held messages invisible: every quarter of the visibility timeout, messages
/// held for more than half of it get a fresh full timeout (ChangeMessageVisibilityBatch).
pub async fn extend_visibility(
    client: Client,
    queue_url: String,
    in_flight: Arc<InFlight>,
    visibility_timeout: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval((visibility_timeout / 4).max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let due = in_flight.take_due(visibility_timeout / 2);
        for chunk in due.chunks(SQS_BATCH_LIMIT) {
            let entries = chunk.iter().enumerate().filter_map(|(i, receipt)| {
                ChangeMessageVisibilityBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .visibility_timeout(visibility_timeout.as_secs() as i32)
                    .build()
                    .ok()
            });
            let result = client
                .change_message_visibility_batch()
                .queue_url(&queue_url)
                .set_entries(Some(entries.collect()))
                .send()
                .await;
            match result {
                Ok(out) => {
                    // A failure here is usually a message deleted meanwhile; the next tick retries the rest.
                    let failed = out.failed.len() as u64;
                    metrics::counter!(metrics::VISIBILITY_EXTENSIONS, "outcome" => "success")
                        .increment(chunk.len() as u64 - failed.min(chunk.len() as u64));
                    metrics::counter!(metrics::VISIBILITY_EXTENSIONS, "outcome" => "failure").increment(failed);
                }
                Err(err) => {
                    metrics::error("visibility", "transient");
                    metrics::counter!(metrics::VISIBILITY_EXTENSIONS, "outcome" => "failure")
                        .increment(chunk.len() as u64);
                    tracing::warn!(error = %aws_sdk_sqs::Error::from(err), "visibility extension failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn envelope_uses_sent_timestamp_and_tolerates_missing_parts() {
        let now = Utc::now();
        let message = Message::builder()
            .message_id("m-1")
            .receipt_handle("r-1")
            .body("{}")
            .set_attributes(Some(HashMap::from([(
                MessageSystemAttributeName::SentTimestamp,
                "1700000000123".to_string(),
            )])))
            .build();
        let envelope = Envelope::from_message(message, now).unwrap();
        assert_eq!(envelope.sent_at.timestamp_millis(), 1_700_000_000_123);
        assert_eq!(envelope.ack.message_id, "m-1");

        let bare = Message::builder().receipt_handle("r-2").build();
        let envelope = Envelope::from_message(bare, now).unwrap();
        assert_eq!(envelope.sent_at, now);
        assert_eq!(envelope.body, "");
        assert!(Envelope::from_message(Message::builder().message_id("x").build(), now).is_none());
    }

    #[test]
    fn in_flight_tracks_and_schedules_extensions() {
        let in_flight = InFlight::default();
        let series = crate::metrics::tests::capture(|| in_flight.hold(["a", "b"]));
        assert_eq!(
            crate::metrics::tests::value_of(&series, metrics::INFLIGHT_MESSAGES, &[]),
            Some(&metrics_util::debugging::DebugValue::Gauge(2.0.into()))
        );
        assert_eq!(in_flight.len(), 2);
        assert_eq!(in_flight.take_due(Duration::from_secs(60)), Vec::<String>::new());
        let mut due = in_flight.take_due(Duration::ZERO);
        due.sort();
        assert_eq!(due, ["a", "b"]);
        in_flight.release(["a", "b"]);
        assert!(in_flight.is_empty());
    }
}
