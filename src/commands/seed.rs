//! `loginflow seed` and `loginflow generate`: queues and sample data for demos and load tests.

use std::time::Duration;

use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use futures::{stream, StreamExt, TryStreamExt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::retry::Retry;
use crate::sqs::SQS_BATCH_LIMIT;

/// SendMessageBatch calls in flight at once while seeding.
const SEND_CONCURRENCY: usize = 8;
/// Attempts per entry before seeding fails.
const SEND_ATTEMPTS: u32 = 5;

/// Errors of `seed`.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("SQS: {0}")]
    Sqs(#[from] Box<aws_sdk_sqs::Error>),
    #[error("{0} messages could not be sent after {SEND_ATTEMPTS} attempts")]
    Unsent(usize),
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
}

/// Creates the queue `name` and its dead-letter queue `<name>-dlq` (redrive after
/// `max_receive_count` receives) unless they exist. Returns the queue's URL.
/// SQS's largest message (1 MiB since 2025), set on the queues `seed` creates.
const MAX_MESSAGE_BYTES: &str = "1048576";

pub async fn ensure_queue(client: &Client, name: &str, max_receive_count: u16) -> Result<String, SeedError> {
    if let Ok(found) = client.get_queue_url().queue_name(name).send().await {
        if let Some(url) = found.queue_url {
            return Ok(url);
        }
    }
    // A FIFO queue (`.fifo`) needs a FIFO dead-letter queue: `<name>-dlq.fifo`.
    let fifo = name.ends_with(FIFO_SUFFIX);
    let dlq_name = format!("{}-dlq{}", name.trim_end_matches(FIFO_SUFFIX), if fifo { FIFO_SUFFIX } else { "" });
    let fifo_attribute = |request: aws_sdk_sqs::operation::create_queue::builders::CreateQueueFluentBuilder| {
        if fifo {
            request.attributes(QueueAttributeName::FifoQueue, "true")
        } else {
            request
        }
    };
    let dlq_url = fifo_attribute(client.create_queue())
        .queue_name(dlq_name)
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .attributes(QueueAttributeName::MaximumMessageSize, MAX_MESSAGE_BYTES)
        .send()
        .await
        .map_err(|e| Box::new(aws_sdk_sqs::Error::from(e)))?
        .queue_url
        .unwrap_or_default();
    let dlq_arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| Box::new(aws_sdk_sqs::Error::from(e)))?
        .attributes
        .and_then(|mut attrs| attrs.remove(&QueueAttributeName::QueueArn))
        .unwrap_or_default();
    let redrive = json!({ "deadLetterTargetArn": dlq_arn, "maxReceiveCount": max_receive_count.to_string() });
    let created = fifo_attribute(client.create_queue())
        .queue_name(name)
        .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
        .attributes(QueueAttributeName::MaximumMessageSize, MAX_MESSAGE_BYTES)
        .send()
        .await
        .map_err(|e| Box::new(aws_sdk_sqs::Error::from(e)))?;
    Ok(created.queue_url.unwrap_or_default())
}

/// Publishes `bodies` at about `per_second` messages a second, 10 per call. Returns how many were sent.
pub async fn publish_paced(
    client: &Client,
    queue_url: &str,
    bodies: Vec<String>,
    per_second: u32,
) -> Result<usize, SeedError> {
    let period = Duration::from_secs_f64(SQS_BATCH_LIMIT as f64 / f64::from(per_second));
    let mut tick = tokio::time::interval(period);
    let mut sent = 0;
    for chunk in bodies.chunks(SQS_BATCH_LIMIT) {
        tick.tick().await;
        sent += send_chunk(client, queue_url, chunk.to_vec()).await?;
    }
    Ok(sent)
}

/// Publishes `bodies` to `queue_url`, 10 per call, several calls at once. Returns how many were sent.
pub async fn publish(client: &Client, queue_url: &str, bodies: Vec<String>) -> Result<usize, SeedError> {
    let chunks: Vec<Vec<String>> = bodies.chunks(SQS_BATCH_LIMIT).map(<[String]>::to_vec).collect();
    stream::iter(chunks)
        .map(|chunk| send_chunk(client, queue_url, chunk))
        .buffer_unordered(SEND_CONCURRENCY)
        .try_fold(0, |sent, n| async move { Ok(sent + n) })
        .await
}

async fn send_chunk(client: &Client, queue_url: &str, chunk: Vec<String>) -> Result<usize, SeedError> {
    let mut pending: Vec<(usize, String)> = chunk.into_iter().enumerate().collect();
    let total = pending.len();
    let mut retry = Retry::new("seed", Duration::from_secs(2)).attempts(SEND_ATTEMPTS);
    let fifo = queue_url.ends_with(FIFO_SUFFIX);
    // Fixed before the first attempt, so a retried send is deduplicated by SQS.
    let dedup_ids: Vec<String> = (0..total).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    loop {
        let entries = pending.iter().filter_map(|(i, body)| {
            let entry = SendMessageBatchRequestEntry::builder().id(i.to_string()).message_body(body);
            let entry = if fifo { fifo_entry(entry, body, &dedup_ids[*i]) } else { entry };
            entry.build().ok()
        });
        let sent = client.send_message_batch().queue_url(queue_url).set_entries(Some(entries.collect())).send().await;
        let failure: Box<dyn std::error::Error + Send + Sync> = match sent {
            Ok(out) => {
                let failed: Vec<&str> = out.failed.iter().map(|f| f.id.as_str()).collect();
                pending.retain(|(i, _)| failed.contains(&i.to_string().as_str()));
                if pending.is_empty() {
                    return Ok(total);
                }
                format!("{} of a batch's sends failed", pending.len()).into()
            }
            Err(err) => Box::new(err),
        };
        if retry.after_failure(&*failure, "send", None).await.is_err() {
            return Err(SeedError::Unsent(pending.len()));
        }
    }
}

/// The name suffix of FIFO queues.
const FIFO_SUFFIX: &str = ".fifo";

/// A FIFO entry: grouped by the record's `user_id` (one user's logins stay in order),
/// deduplicated by `dedup_id` (equal bodies are distinct events).
fn fifo_entry(
    entry: aws_sdk_sqs::types::builders::SendMessageBatchRequestEntryBuilder,
    body: &str,
    dedup_id: &str,
) -> aws_sdk_sqs::types::builders::SendMessageBatchRequestEntryBuilder {
    let group = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|record| record.get("user_id").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "ungrouped".to_owned());
    entry.message_group_id(group).message_deduplication_id(dedup_id)
}

/// Reads a JSON array file; each element becomes one message body.
pub fn bodies_from_file(path: &std::path::Path) -> Result<Vec<String>, SeedError> {
    let file_error = |reason: String| SeedError::File { path: path.display().to_string(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let items: Vec<Value> =
        serde_json::from_str(&text).map_err(|_| file_error("expected a JSON array of records".into()))?;
    Ok(items.iter().map(Value::to_string).collect())
}

/// The malformed record of the task's sample, reproduced once per hundred records.
pub const WRONG_MESSAGE_TYPE: &str = r#"{"foo":"oops_wrong_msg_type","bar":"123"}"#;
/// Index, within each hundred, of the malformed record.
const MALFORMED_INDEX: u64 = 57;
/// Valid records per hundred.
const BLOCK: usize = 99;
/// Per block of 99 valid records, as in the task's sample: null locales and version forms.
const NULL_LOCALES: usize = 29;
const THREE_PART_VERSIONS: usize = 45;
const TWO_DIGIT_MINOR_VERSIONS: usize = 36;

const LOCALES: [&str; 16] =
    ["RU", "PH", "PE", "BG", "GR", "KR", "TH", "CN", "BR", "PT", "MX", "US", "DE", "FR", "ID", "NG"];

/// Synthetic records with the task sample's shape and edge cases: per hundred, 99 valid
/// records (29 with a null locale; versions `X.Y.Z` ×45, `X.YY` ×36, `X.Y` ×18) and one
/// record of the wrong type. Deterministic for a given seed.
pub fn synthetic(count: u64, seed: u64) -> impl Iterator<Item = Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut slots: Vec<(bool, u8)> = Vec::new();
    (0..count).map(move |i| {
        if i % 100 == MALFORMED_INDEX {
            return serde_json::from_str(WRONG_MESSAGE_TYPE).expect("constant is valid JSON");
        }
        if slots.is_empty() {
            slots = (0..BLOCK)
                .map(|k| {
                    let form = match k {
                        k if k < THREE_PART_VERSIONS => 2,
                        k if k < THREE_PART_VERSIONS + TWO_DIGIT_MINOR_VERSIONS => 1,
                        _ => 0,
                    };
                    (false, form)
                })
                .collect();
            slots.shuffle(&mut rng);
            let mut nulls: Vec<usize> = (0..BLOCK).collect();
            nulls.shuffle(&mut rng);
            for &k in &nulls[..NULL_LOCALES] {
                slots[k].0 = true;
            }
        }
        let (null_locale, form) = slots.pop().expect("refilled above");
        synthetic_record(&mut rng, null_locale, form)
    })
}

fn synthetic_record(rng: &mut StdRng, null_locale: bool, form: u8) -> Value {
    let app_version = match form {
        2 => format!("{}.{}.{}", rng.random_range(0..5), rng.random_range(0..10), rng.random_range(0..10)),
        1 => format!("{}.{:02}", rng.random_range(0..5), rng.random_range(0..100)),
        _ => format!("{}.{}", rng.random_range(0..5), rng.random_range(0..10)),
    };
    let user_id = uuid::Builder::from_random_bytes(rng.random()).into_uuid().to_string();
    let ip = format!(
        "{}.{}.{}.{}",
        rng.random_range(1..=254),
        rng.random_range(0..=255),
        rng.random_range(0..=255),
        rng.random_range(1..=254)
    );
    let device_id =
        format!("{:03}-{:02}-{:04}", rng.random_range(0..1000), rng.random_range(0..100), rng.random_range(0..10000));
    let locale = if null_locale { Value::Null } else { json!(LOCALES[rng.random_range(0..LOCALES.len())]) };
    let device_type = if rng.random_bool(0.5) { "android" } else { "ios" };
    json!({
        "user_id": user_id,
        "app_version": app_version,
        "device_type": device_type,
        "ip": ip,
        "locale": locale,
        "device_id": device_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{decode, AppVersion};

    #[test]
    fn a_hundred_has_the_task_samples_edge_cases() {
        let records: Vec<Value> = synthetic(100, 7).collect();
        assert_eq!(records.len(), 100);
        let bodies: Vec<String> = records.iter().map(Value::to_string).collect();
        let valid: Vec<_> = bodies.iter().filter_map(|b| decode(b).ok()).collect();
        assert_eq!(valid.len(), 99);
        assert_eq!(valid.iter().filter(|l| l.locale.is_none()).count(), 29);
        let forms = |f: i32| valid.iter().filter(|l| l.app_version.code % 10 == f).count();
        assert_eq!((forms(2), forms(1) + forms(0)), (45, 54));
        // Two-part versions split into X.YY (two digits after the dot) and X.Y.
        let two_digit = valid.iter().filter(|l| l.app_version.text.split('.').nth(1).map(str::len) == Some(2)).count();
        assert_eq!(two_digit, 36);
        for login in &valid {
            assert_eq!(AppVersion::text_of(login.app_version.code).as_deref(), Some(login.app_version.text.as_str()));
        }
    }

    #[test]
    fn deterministic_per_seed() {
        let a: Vec<Value> = synthetic(50, 1).collect();
        let b: Vec<Value> = synthetic(50, 1).collect();
        let c: Vec<Value> = synthetic(50, 2).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
