//! The SQS client shared by the source, the ack stage and `seed`, and queue-level helpers.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region, StalledStreamProtectionConfig};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use secrecy::ExposeSecret;

use crate::config::SqsArgs;

/// Builds an SQS client. With an endpoint (an emulator) and no credentials, the
/// emulator's `test` key is used so the SDK never probes instance metadata.
pub async fn client(args: &SqsArgs) -> Client {
    // A long poll lasts up to 20 s; anything much longer than that is a dead connection.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(Duration::from_secs(30))
        .build();
    let explicit = match (&args.aws_access_key_id, &args.aws_secret_access_key) {
        (Some(id), Some(secret)) => Some(Credentials::new(id, secret.expose_secret(), None, None, "loginflow-env")),
        _ if args.aws_endpoint_url.is_some() => {
            Some(Credentials::new("test", "test", None, None, "loginflow-emulator"))
        }
        _ => None,
    };
    let mut builder = match explicit {
        Some(credentials) => {
            aws_sdk_sqs::Config::builder().behavior_version(BehaviorVersion::latest()).credentials_provider(credentials)
        }
        None => {
            let shared = aws_config::defaults(BehaviorVersion::latest())
                .region(Region::new(args.aws_region.clone()))
                .load()
                .await;
            aws_sdk_sqs::config::Builder::from(&shared)
        }
    };
    builder = builder
        .region(Region::new(args.aws_region.clone()))
        .timeout_config(timeouts)
        // Long polls legitimately send nothing for up to 20 s.
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
    if let Some(endpoint) = &args.aws_endpoint_url {
        builder = builder.endpoint_url(endpoint);
    }
    Client::from_conf(builder.build())
}

/// Approximate message counts of a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub visible: u64,
    pub in_flight: u64,
    pub delayed: u64,
}

impl QueueDepth {
    /// No message visible, in flight or delayed.
    pub fn is_empty(&self) -> bool {
        self.visible == 0 && self.in_flight == 0 && self.delayed == 0
    }

    /// Publishes the counts as the `loginflow_queue_messages` gauge.
    pub fn record(&self) {
        use crate::metrics::{gauge, QUEUE_MESSAGES};
        gauge!(QUEUE_MESSAGES, "state" => "visible").set(self.visible as f64);
        gauge!(QUEUE_MESSAGES, "state" => "in_flight").set(self.in_flight as f64);
        gauge!(QUEUE_MESSAGES, "state" => "delayed").set(self.delayed as f64);
    }
}

/// Reads the queue's approximate counts.
pub async fn queue_depth(client: &Client, queue_url: &str) -> Result<QueueDepth, aws_sdk_sqs::Error> {
    let out = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await?;
    let empty = HashMap::new();
    let attrs = out.attributes().unwrap_or(&empty);
    let count = |name: QueueAttributeName| attrs.get(&name).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(QueueDepth {
        visible: count(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    })
}
