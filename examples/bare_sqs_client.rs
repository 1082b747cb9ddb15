//! The load test's baseline: a bare aws-sdk-sqs client that only receives and deletes,
//! with as many concurrent pollers as loginflow uses. Prints messages per second.
//!
//! `bare_sqs_client <queue-url> <expected-messages> [pollers] [receive-only]` (AWS_ENDPOINT_URL as
//! for loginflow). With `receive-only` it does not delete (messages stay invisible for 10 minutes),
//! then deletes the queue: the fastest any consumer can take the messages off this queue service,
//! a ceiling on how soon rows can be visible.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use loginflow::config::SqsArgs;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (queue_url, expected, pollers, receive_only) = match args.as_slice() {
        [_, url, n] => (url.clone(), n.parse::<u64>().expect("count"), 4, false),
        [_, url, n, p] => (url.clone(), n.parse::<u64>().expect("count"), p.parse().expect("pollers"), false),
        [_, url, n, p, mode] if mode == "receive-only" => {
            (url.clone(), n.parse::<u64>().expect("count"), p.parse().expect("pollers"), true)
        }
        _ => panic!("usage: bare_sqs_client <queue-url> <expected-messages> [pollers] [receive-only]"),
    };
    let sqs_args = SqsArgs {
        queue_url: queue_url.clone(),
        aws_endpoint_url: std::env::var("AWS_ENDPOINT_URL").ok(),
        aws_region: Some("us-east-1".into()),
        aws_access_key_id: None,
        aws_secret_access_key: None,
    };
    let client = loginflow::sqs::client(&sqs_args.access()).await;
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..pollers)
        .map(|_| {
            let (client, queue_url, done) = (client.clone(), queue_url.clone(), done.clone());
            tokio::spawn(async move {
                while done.load(Ordering::Relaxed) < expected {
                    let mut receive = client
                        .receive_message()
                        .queue_url(&queue_url)
                        .max_number_of_messages(10)
                        .wait_time_seconds(1)
                        // What any consumer of these events needs: the event time lives only here.
                        .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp);
                    if receive_only {
                        // The ceiling asks for what loginflow's receives ask for.
                        receive = receive
                            .visibility_timeout(600)
                            .message_attribute_names(loginflow::sqs::ORIGINAL_ID_ATTRIBUTE);
                    }
                    let Ok(out) = receive.send().await else {
                        continue;
                    };
                    let messages = out.messages.unwrap_or_default();
                    if messages.is_empty() {
                        continue;
                    }
                    if receive_only {
                        done.fetch_add(messages.len() as u64, Ordering::Relaxed);
                        continue;
                    }
                    let entries = messages.iter().enumerate().filter_map(|(i, m)| {
                        DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .receipt_handle(m.receipt_handle()?)
                            .build()
                            .ok()
                    });
                    if let Ok(out) = client
                        .delete_message_batch()
                        .queue_url(&queue_url)
                        .set_entries(Some(entries.collect()))
                        .send()
                        .await
                    {
                        done.fetch_add(out.successful.len() as u64, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    if receive_only {
        // Its messages are held for 10 minutes: the emulator would keep tracking them while the
        // next phase runs.
        client.delete_queue().queue_url(&queue_url).send().await.expect("delete the receive-only queue");
    }
    println!("{n} {secs:.3} {:.0}", n as f64 / secs);
}
