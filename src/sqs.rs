//! The SQS client shared by the source, the ack stage and `seed`, and queue-level helpers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_sqs::config::timeout::TimeoutConfig;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region, StalledStreamProtectionConfig};
use aws_sdk_sqs::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use secrecy::ExposeSecret;

use crate::metrics::SQS_ACTIONS;

/// Most messages one ReceiveMessage / batch call handles (an SQS limit).
pub const SQS_BATCH_LIMIT: usize = 10;

/// Message attribute naming the id of the message a copy was made from (`redrive --method copy`),
/// so the copy is stored under the original's id and a redelivered original stays a duplicate.
pub const ORIGINAL_ID_ATTRIBUTE: &str = "loginflow.original_message_id";

/// Where the queue is and how to reach it (`QUEUE_URL`, `AWS_*`), as configuration gives it.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub queue_url: String,
    /// An emulator's endpoint; `None` is AWS itself.
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<secrecy::SecretString>,
}

/// The AWS configuration every client (SQS, KMS) is built from. With an endpoint (an
/// emulator) and no credentials, the emulator's `test` key is used so the SDK never probes
/// instance metadata; otherwise the standard chain (environment, profile, web identity /
/// IRSA, container and instance roles).
pub async fn sdk_config(args: &Access) -> aws_config::SdkConfig {
    // A long poll lasts up to 20 s; anything much longer than that is a dead connection.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(Duration::from_secs(30))
        .build();
    let explicit = match (&args.access_key_id, &args.secret_access_key) {
        (Some(id), Some(secret)) => Some(Credentials::new(id, secret.expose_secret(), None, None, "loginflow-env")),
        _ if args.endpoint_url.is_some() => Some(Credentials::new("test", "test", None, None, "loginflow-emulator")),
        _ => None,
    };
    // The queue's own region first: a client signs for one region, and QUEUE_URL may be in any.
    // An emulator with no region named gets the default without asking instance metadata.
    let named = region_of_queue_url(&args.queue_url)
        .or_else(|| args.region.clone())
        .or_else(|| args.endpoint_url.as_ref().map(|_| DEFAULT_REGION.to_owned()));
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(timeouts)
        // Long polls legitimately send nothing for up to 20 s.
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
    if let Some(credentials) = explicit {
        loader = loader.credentials_provider(credentials);
    }
    if let Some(region) = named {
        loader = loader.region(Region::new(region));
    }
    if let Some(endpoint) = &args.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    let config = loader.load().await;
    match config.region() {
        Some(_) => config,
        None => config.into_builder().region(Region::new(DEFAULT_REGION)).build(),
    }
}

/// Builds an SQS client from [`sdk_config`].
pub async fn client(args: &Access) -> Client {
    counting_client(args, Arc::default()).await
}

/// [`client`], its requests counted into `requests` (and `loginflow_sqs_requests_total`).
pub async fn counting_client(args: &Access, requests: Arc<Requests>) -> Client {
    let config =
        aws_sdk_sqs::config::Builder::from(&sdk_config(args).await).interceptor(CountRequests(requests)).build();
    Client::from_conf(config)
}

/// SQS requests sent by one client, by action: what SQS bills (each attempt of a call is one).
#[derive(Debug, Default)]
pub struct Requests([AtomicU64; SQS_ACTIONS.len()]);

impl Requests {
    /// Requests sent so far, by action (every action, in [`SQS_ACTIONS`] order).
    pub fn by_action(&self) -> Vec<(&'static str, u64)> {
        SQS_ACTIONS.iter().zip(&self.0).map(|(action, n)| (*action, n.load(Ordering::Relaxed))).collect()
    }

    /// Requests sent so far.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

/// Counts each request as it is sent, by the action its `X-Amz-Target` header names.
#[derive(Debug)]
struct CountRequests(Arc<Requests>);

impl Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "loginflow_count_requests"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let target = context.request().headers().get("x-amz-target").unwrap_or_default();
        let action = target.strip_prefix("AmazonSQS.").unwrap_or(target);
        let index = SQS_ACTIONS.iter().position(|known| *known == action).unwrap_or(SQS_ACTIONS.len() - 1);
        self.0 .0[index].fetch_add(1, Ordering::Relaxed);
        crate::metrics::counter!(crate::metrics::SQS_REQUESTS, "action" => SQS_ACTIONS[index]).increment(1);
        Ok(())
    }
}

/// The region used when neither QUEUE_URL, AWS_REGION nor the chain names one (emulators).
const DEFAULT_REGION: &str = "us-east-1";

/// The region in an AWS queue URL's host (`sqs.<region>.amazonaws.com`, or the legacy
/// `<region>.queue.amazonaws.com`); `None` for other hosts (emulators).
pub fn region_of_queue_url(queue_url: &str) -> Option<String> {
    let host = queue_url.split("://").nth(1)?.split('/').next()?;
    let host = host.split(':').next()?;
    let labels: Vec<&str> = host.split('.').collect();
    let region = match labels.as_slice() {
        ["sqs", region, "amazonaws", ..] => region,
        [region, "queue", "amazonaws", ..] => region,
        _ => return None,
    };
    let plausible =
        region.contains('-') && region.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    plausible.then(|| (*region).to_owned())
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

#[cfg(test)]
mod tests {
    use super::region_of_queue_url;

    #[test]
    fn the_region_comes_from_an_aws_queue_url() {
        let cases = [
            ("https://sqs.eu-west-1.amazonaws.com/123456789012/logins", Some("eu-west-1")),
            ("https://sqs.cn-north-1.amazonaws.com.cn/123456789012/logins", Some("cn-north-1")),
            ("https://ap-southeast-2.queue.amazonaws.com/123456789012/logins", Some("ap-southeast-2")),
            ("https://sqs.us-gov-west-1.amazonaws.com/123456789012/logins.fifo", Some("us-gov-west-1")),
            ("http://localhost:4566/000000000000/login-queue", None),
            ("http://127.0.0.1:4566/000000000000/login-queue", None),
            ("https://sqs.amazonaws.com/123456789012/logins", None),
        ];
        for (url, expected) in cases {
            assert_eq!(region_of_queue_url(url).as_deref(), expected, "{url}");
        }
    }
}
