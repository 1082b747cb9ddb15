//! Ack: deletes messages from the queue once their rows are committed.
//!
//! DeleteMessageBatch, 10 entries per call, [`DELETE_CONCURRENCY`] calls at a time.
//! Failed entries are retried with backoff a bounded number of times; a message
//! whose delete is given up is redelivered later and dropped as a duplicate.

use std::time::Duration;

use aws_sdk_sqs::types::DeleteMessageBatchRequestEntry;
use aws_sdk_sqs::Client;
use futures::{stream, StreamExt};

use crate::metrics;
use crate::retry::Retry;
use crate::source::Ack;
use crate::sqs::SQS_BATCH_LIMIT;

/// Attempts per entry before a delete is given up.
pub const DELETE_ATTEMPTS: u32 = 8;
/// DeleteMessageBatch calls in flight per window. A window of 1 000 messages is 100 calls;
/// sending them all at once opens as many connections and, measured against LocalStack,
/// slows the receivers more than it speeds the deletes.
pub const DELETE_CONCURRENCY: usize = 4;

/// How many deletes succeeded and how many were given up.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub succeeded: u64,
    pub gave_up: u64,
}

/// Deletes every message of `acks` (committed rows only).
pub async fn delete_all(client: &Client, queue_url: &str, acks: &[Ack], max_backoff: Duration) -> Deleted {
    // Built up front: a lazily mapped stream would hold a closure over borrowed chunks, which
    // keeps the pipeline's future from being `Send`.
    let calls: Vec<_> =
        acks.chunks(SQS_BATCH_LIMIT).map(|chunk| delete_chunk(client, queue_url, chunk, max_backoff)).collect();
    let deleted = stream::iter(calls)
        .buffer_unordered(DELETE_CONCURRENCY)
        .fold(Deleted::default(), |sum, d| async move {
            Deleted { succeeded: sum.succeeded + d.succeeded, gave_up: sum.gave_up + d.gave_up }
        })
        .await;
    metrics::counter!(metrics::SQS_DELETES, "outcome" => "success").increment(deleted.succeeded);
    metrics::counter!(metrics::SQS_DELETES, "outcome" => "failure").increment(deleted.gave_up);
    deleted
}

async fn delete_chunk(client: &Client, queue_url: &str, chunk: &[Ack], max_backoff: Duration) -> Deleted {
    let mut pending: Vec<&Ack> = chunk.iter().collect();
    let mut retry = Retry::new("ack", max_backoff).attempts(DELETE_ATTEMPTS);
    let mut succeeded = 0;
    let mut gave_up = 0;
    loop {
        let entries = pending.iter().enumerate().filter_map(|(i, ack)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(&*ack.receipt_handle)
                .build()
                .ok()
        });
        let result =
            client.delete_message_batch().queue_url(queue_url).set_entries(Some(entries.collect())).send().await;
        let failure: Box<dyn std::error::Error + Send + Sync> = match result {
            Ok(out) => {
                let mut retried = Vec::new();
                for failure in &out.failed {
                    let ack = failure.id.parse::<usize>().ok().and_then(|i| pending.get(i).copied());
                    // ReceiptHandleIsInvalid and other sender faults will not improve with retries.
                    match ack {
                        Some(ack) if !failure.sender_fault => retried.push(ack),
                        _ => tracing::warn!(code = %failure.code, "delete refused; message will be redelivered"),
                    }
                }
                succeeded += out.successful.len() as u64;
                gave_up += pending.len().saturating_sub(out.successful.len() + retried.len()) as u64;
                if retried.is_empty() {
                    return Deleted { succeeded, gave_up };
                }
                pending = retried;
                format!("{} of a batch's deletes failed on the server's side", pending.len()).into()
            }
            Err(err) => Box::new(err),
        };
        if retry.after_failure(&*failure, "delete", None).await.is_err() {
            break;
        }
    }
    tracing::warn!(messages = pending.len(), "gave up deleting; they will be redelivered and dropped as duplicates");
    Deleted { succeeded, gave_up: gave_up + pending.len() as u64 }
}
