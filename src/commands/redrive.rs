//! `loginflow redrive`: moves dead-lettered messages back to the source queue once the
//! cause is fixed.
//!
//! SQS's own message-move task is used where the endpoint supports it (it moves messages
//! server-side and keeps their ids). Otherwise each message is copied: received from the
//! dead-letter queue, sent to the source queue carrying its original id in the
//! [`ORIGINAL_ID_ATTRIBUTE`] message attribute, and deleted from the dead-letter queue only
//! once the send succeeded. The source keys a message by that attribute, so a copy sent
//! twice (a crash between send and delete) is still stored once; a message is never lost.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;
use serde::Serialize;

use crate::sqs::{ORIGINAL_ID_ATTRIBUTE, SQS_BATCH_LIMIT};

/// How long a copied message stays invisible in the dead-letter queue while it is sent.
const COPY_VISIBILITY_SECS: i32 = 60;
/// How often a move task's progress is read.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How to move the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// The move task, or the copy when the endpoint does not support move tasks.
    Auto,
    /// SQS's `StartMessageMoveTask` only.
    MoveTask,
    /// Receive, send, delete.
    Copy,
}

/// What a redrive did (printed as JSON).
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RedriveReport {
    pub method: &'static str,
    pub dead_letter_queue: String,
    pub moved: u64,
    /// Messages the copy could not send; they stay in the dead-letter queue.
    pub failed: u64,
}

/// Errors of `redrive`.
#[derive(Debug, thiserror::Error)]
pub enum RedriveError {
    #[error("SQS: {0}")]
    Sqs(String),
    #[error("the queue has no redrive policy naming a dead-letter queue; pass --dlq-url")]
    NoDeadLetterQueue,
    #[error("the move task ended as {status}: {reason}")]
    MoveTask { status: String, reason: String },
}

fn sqs_error(err: impl Into<aws_sdk_sqs::Error>) -> RedriveError {
    RedriveError::Sqs(crate::errors::error_chain(&err.into()))
}

/// Moves every message of the dead-letter queue (`dlq_url`, or the one the queue's redrive
/// policy names) back to `queue_url`. `progress` receives a line now and then.
pub async fn redrive(
    client: &Client,
    queue_url: &str,
    dlq_url: Option<&str>,
    method: Method,
    progress: impl Fn(&str),
) -> Result<RedriveReport, RedriveError> {
    let queue_arn = queue_attribute(client, queue_url, QueueAttributeName::QueueArn).await?.unwrap_or_default();
    let dlq_url = match dlq_url {
        Some(url) => url.to_owned(),
        None => dead_letter_queue_of(client, queue_url).await?,
    };
    if method != Method::Copy {
        let dlq_arn = queue_attribute(client, &dlq_url, QueueAttributeName::QueueArn).await?.unwrap_or_default();
        match move_task(client, &dlq_arn, &queue_arn, &progress).await {
            Ok(moved) => {
                return Ok(RedriveReport { method: "move_task", dead_letter_queue: dlq_url, moved, failed: 0 })
            }
            Err(MoveTaskError::Unsupported(reason)) if method == Method::Auto => {
                progress(&format!("move tasks unavailable here ({reason}); copying instead"));
            }
            Err(MoveTaskError::Unsupported(reason)) => return Err(RedriveError::Sqs(reason)),
            Err(MoveTaskError::Failed(err)) => return Err(err),
        }
    }
    let (moved, failed) = copy(client, &dlq_url, queue_url, &progress).await?;
    Ok(RedriveReport { method: "copy", dead_letter_queue: dlq_url, moved, failed })
}

async fn queue_attribute(
    client: &Client,
    queue_url: &str,
    name: QueueAttributeName,
) -> Result<Option<String>, RedriveError> {
    let out = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(name.clone())
        .send()
        .await
        .map_err(sqs_error)?;
    Ok(out.attributes.and_then(|mut attributes| attributes.remove(&name)))
}

/// The dead-letter queue named by the queue's redrive policy.
async fn dead_letter_queue_of(client: &Client, queue_url: &str) -> Result<String, RedriveError> {
    let policy = queue_attribute(client, queue_url, QueueAttributeName::RedrivePolicy)
        .await?
        .ok_or(RedriveError::NoDeadLetterQueue)?;
    let arn = serde_json::from_str::<serde_json::Value>(&policy)
        .ok()
        .and_then(|policy| policy["deadLetterTargetArn"].as_str().map(str::to_owned))
        .ok_or(RedriveError::NoDeadLetterQueue)?;
    // arn:aws:sqs:<region>:<account>:<name>
    let parts: Vec<&str> = arn.split(':').collect();
    let (account, name) = match parts.as_slice() {
        [.., account, name] => (*account, *name),
        _ => return Err(RedriveError::NoDeadLetterQueue),
    };
    let out =
        client.get_queue_url().queue_name(name).queue_owner_aws_account_id(account).send().await.map_err(sqs_error)?;
    out.queue_url.ok_or(RedriveError::NoDeadLetterQueue)
}

enum MoveTaskError {
    Unsupported(String),
    Failed(RedriveError),
}

/// Starts a message-move task and follows it to its end. Returns how many messages it moved.
async fn move_task(
    client: &Client,
    dlq_arn: &str,
    queue_arn: &str,
    progress: &impl Fn(&str),
) -> Result<u64, MoveTaskError> {
    let started = client.start_message_move_task().source_arn(dlq_arn).destination_arn(queue_arn).send().await;
    if let Err(err) = started {
        let err = aws_sdk_sqs::Error::from(err);
        let text = crate::errors::error_chain(&err);
        let unsupported = matches!(err, aws_sdk_sqs::Error::UnsupportedOperation(_))
            || text.contains("not implemented")
            || text.contains("InvalidAction")
            || text.contains("UnknownOperation");
        return Err(if unsupported {
            MoveTaskError::Unsupported(text)
        } else {
            MoveTaskError::Failed(RedriveError::Sqs(text))
        });
    }
    loop {
        tokio::time::sleep(PROGRESS_INTERVAL).await;
        let listed = client
            .list_message_move_tasks()
            .source_arn(dlq_arn)
            .max_results(1)
            .send()
            .await
            .map_err(|err| MoveTaskError::Failed(sqs_error(err)))?;
        let Some(task) = listed.results.unwrap_or_default().into_iter().next() else { continue };
        let moved = u64::try_from(task.approximate_number_of_messages_moved).unwrap_or(0);
        let status = task.status.unwrap_or_default();
        progress(&format!(
            "move task {status}: {moved} of ~{} moved",
            task.approximate_number_of_messages_to_move.unwrap_or(0)
        ));
        match status.as_str() {
            "COMPLETED" => return Ok(moved),
            "RUNNING" | "CANCELLING" => {}
            _ => {
                let reason = task.failure_reason.unwrap_or_else(|| "no reason given".into());
                return Err(MoveTaskError::Failed(RedriveError::MoveTask { status, reason }));
            }
        }
    }
}

/// Receive, send, delete until the dead-letter queue answers empty twice. Returns (moved, failed).
async fn copy(
    client: &Client,
    dlq_url: &str,
    queue_url: &str,
    progress: &impl Fn(&str),
) -> Result<(u64, u64), RedriveError> {
    let fifo = queue_url.ends_with(".fifo");
    let (mut moved, mut failed, mut empty_receives) = (0u64, 0u64, 0);
    while empty_receives < 2 {
        let received = client
            .receive_message()
            .queue_url(dlq_url)
            .max_number_of_messages(SQS_BATCH_LIMIT as i32)
            .wait_time_seconds(1)
            .visibility_timeout(COPY_VISIBILITY_SECS)
            .message_attribute_names("All")
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .send()
            .await
            .map_err(sqs_error)?;
        let messages = received.messages.unwrap_or_default();
        if messages.is_empty() {
            empty_receives += 1;
            continue;
        }
        empty_receives = 0;
        let mut entries = Vec::with_capacity(messages.len());
        let mut receipts = HashMap::with_capacity(messages.len());
        for (index, message) in messages.into_iter().enumerate() {
            let id = index.to_string();
            let mut attributes = message.message_attributes.unwrap_or_default();
            let original = match attributes.get(ORIGINAL_ID_ATTRIBUTE).and_then(|value| value.string_value()) {
                Some(original) => original.to_owned(),
                None => message.message_id.unwrap_or_default(),
            };
            let marker = MessageAttributeValue::builder().data_type("String").string_value(&original).build();
            attributes
                .insert(ORIGINAL_ID_ATTRIBUTE.to_owned(), marker.map_err(|err| RedriveError::Sqs(err.to_string()))?);
            let mut entry = SendMessageBatchRequestEntry::builder()
                .id(&id)
                .message_body(message.body.unwrap_or_default())
                .set_message_attributes(Some(attributes));
            if fifo {
                let group =
                    message.attributes.as_ref().and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId));
                entry = entry
                    .message_group_id(group.cloned().unwrap_or_else(|| "redrive".into()))
                    .message_deduplication_id(&original);
            }
            entries.push(entry.build().map_err(|err| RedriveError::Sqs(err.to_string()))?);
            receipts.insert(id, message.receipt_handle.unwrap_or_default());
        }
        let sent = client
            .send_message_batch()
            .queue_url(queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(sqs_error)?;
        failed += sent.failed.len() as u64;
        // Delete only what the source queue accepted; the rest reappears in the DLQ.
        let deletes: Vec<_> = sent
            .successful
            .iter()
            .filter_map(|ok| receipts.get(&ok.id))
            .enumerate()
            .filter_map(|(i, receipt)| {
                DeleteMessageBatchRequestEntry::builder().id(i.to_string()).receipt_handle(receipt).build().ok()
            })
            .collect();
        if deletes.is_empty() {
            continue;
        }
        let deleted = client
            .delete_message_batch()
            .queue_url(dlq_url)
            .set_entries(Some(deletes))
            .send()
            .await
            .map_err(sqs_error)?;
        // A copy sent but not deleted is also in the source queue: it is stored once
        // (same original id), and its DLQ copy is moved again by the next redrive.
        moved += deleted.successful.len() as u64;
        failed += deleted.failed.len() as u64;
        progress(&format!("copied {moved} messages back ({failed} failed)"));
    }
    Ok((moved, failed))
}
