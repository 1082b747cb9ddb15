//! Metric names, their help text, and the Prometheus recorder.
//!
//! All names live here so dashboards, alerts and code agree. Labels come from
//! fixed sets (stage, reason, outcome, kind): never ids, values or error text.

use std::sync::OnceLock;

pub use ::metrics::{counter, gauge, histogram};
use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::decode::Reason;

pub const MESSAGES_RECEIVED: &str = "loginflow_messages_received_total";
pub const RECORDS_WRITTEN: &str = "loginflow_records_written_total";
pub const DUPLICATES_DROPPED: &str = "loginflow_duplicates_dropped_total";
pub const QUARANTINED: &str = "loginflow_quarantined_total";
pub const SQS_DELETES: &str = "loginflow_sqs_deletes_total";
pub const MESSAGES_RELEASED: &str = "loginflow_messages_released_total";
pub const VISIBILITY_EXTENSIONS: &str = "loginflow_visibility_extensions_total";
pub const ERRORS: &str = "loginflow_errors_total";
pub const RETRIES: &str = "loginflow_retries_total";
pub const BATCH_SIZE: &str = "loginflow_batch_size_messages";
pub const FLUSH_DURATION: &str = "loginflow_flush_duration_seconds";
pub const END_TO_END_LATENCY: &str = "loginflow_end_to_end_latency_seconds";
pub const INFLIGHT_MESSAGES: &str = "loginflow_inflight_messages";
pub const DEDUP_CACHE_ENTRIES: &str = "loginflow_dedup_cache_entries";
pub const QUEUE_MESSAGES: &str = "loginflow_queue_messages";
pub const BUILD_INFO: &str = "loginflow_build_info";
pub const DATABASE_WRITABLE: &str = "loginflow_database_writable";
pub const POLLERS: &str = "loginflow_pollers";
pub const DELETERS: &str = "loginflow_deleters";
pub const SQS_REQUESTS: &str = "loginflow_sqs_requests_total";

/// Pipeline stages, the `stage` label.
pub const STAGES: [&str; 5] = ["source", "decode", "sink", "ack", "visibility"];
/// Where a duplicate was caught, the `stage` label of [`DUPLICATES_DROPPED`].
pub const DUPLICATE_STAGES: [&str; 2] = ["cache", "database"];
/// Outcomes of a delete, the `outcome` label of [`SQS_DELETES`] and [`VISIBILITY_EXTENSIONS`].
pub const OUTCOMES: [&str; 2] = ["success", "failure"];
/// Queue message states, the `state` label of [`QUEUE_MESSAGES`].
pub const QUEUE_STATES: [&str; 3] = ["visible", "in_flight", "delayed"];
/// Why messages were released undeleted, the `reason` label of [`MESSAGES_RELEASED`].
pub const RELEASE_REASONS: [&str; 2] = ["unstorable", "shutdown"];
/// SQS actions loginflow calls, the `action` label of [`SQS_REQUESTS`] (`other` for any else).
pub const SQS_ACTIONS: [&str; 6] = [
    "ReceiveMessage",
    "DeleteMessageBatch",
    "ChangeMessageVisibilityBatch",
    "GetQueueAttributes",
    "SendMessageBatch",
    "other",
];
/// Error kinds, the `kind` label of [`ERRORS`].
pub const ERROR_KINDS: [&str; 3] = ["transient", "rejected_record", "gave_up"];

const SIZE_BUCKETS: [f64; 12] = [1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];
const SECONDS_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const LATENCY_BUCKETS: [f64; 14] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The exporter's builder with loginflow's histogram buckets (histograms, not summaries).
pub fn prometheus_builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &SIZE_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(FLUSH_DURATION.into()), &SECONDS_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(END_TO_END_LATENCY.into()), &LATENCY_BUCKETS))
        .expect("bucket lists are non-empty constants")
}

/// Installs the global Prometheus recorder once per process, describes and
/// registers every series, and returns the handle that renders `/metrics`.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle =
                prometheus_builder().install_recorder().expect("the metrics recorder is installed only here, once");
            describe_all();
            register_all();
            handle
        })
        .clone()
}

/// Help text for every metric; must run after the recorder is installed.
pub fn describe_all() {
    describe_counter!(MESSAGES_RECEIVED, Unit::Count, "SQS messages received.");
    describe_counter!(RECORDS_WRITTEN, Unit::Count, "Rows committed to user_logins.");
    describe_counter!(
        DUPLICATES_DROPPED,
        Unit::Count,
        "Duplicate messages dropped, by where they were caught (cache, database)."
    );
    describe_counter!(QUARANTINED, Unit::Count, "Messages committed to user_logins_quarantine, by reason.");
    describe_counter!(SQS_DELETES, Unit::Count, "SQS messages deleted after commit, by outcome.");
    describe_counter!(
        MESSAGES_RELEASED,
        Unit::Count,
        "Messages released undeleted for redelivery: unstorable (not even quarantine accepts them; the redrive policy moves them to the DLQ) or shutdown (still being written when the grace period ended)."
    );
    describe_counter!(VISIBILITY_EXTENSIONS, Unit::Count, "Visibility timeout extensions, by outcome.");
    describe_counter!(ERRORS, Unit::Count, "Errors, by stage and kind (transient, rejected_record, gave_up).");
    describe_counter!(RETRIES, Unit::Count, "Retried calls, by stage.");
    describe_histogram!(BATCH_SIZE, Unit::Count, "Messages per flushed batch.");
    describe_histogram!(FLUSH_DURATION, Unit::Seconds, "Time to write and commit one batch.");
    describe_histogram!(END_TO_END_LATENCY, Unit::Seconds, "SentTimestamp to commit, per record.");
    describe_gauge!(INFLIGHT_MESSAGES, Unit::Count, "Messages received and not yet deleted.");
    describe_gauge!(DEDUP_CACHE_ENTRIES, Unit::Count, "Entries in the dedup cache.");
    describe_gauge!(
        QUEUE_MESSAGES,
        Unit::Count,
        "Approximate messages in the queue, by state (visible, in_flight, delayed)."
    );
    describe_gauge!(BUILD_INFO, "Build information; always 1.");
    describe_gauge!(POLLERS, Unit::Count, "Long-polling receivers running (MIN_POLLERS..=MAX_POLLERS).");
    describe_gauge!(DELETERS, Unit::Count, "DeleteMessageBatch calls allowed at once, growing with the acks waiting.");
    describe_counter!(SQS_REQUESTS, Unit::Count, "SQS requests sent (each attempt; what SQS bills), by action.");
    describe_gauge!(
        DATABASE_WRITABLE,
        "1 while every batch's write commits; 0 while any batch is held and retried because the database cannot take it (down, read-only, a privilege or table gone, busy). Alert on 0 lasting."
    );
}

/// Creates every labelled series at zero, so dashboards and alerts have data before the first event.
pub fn register_all() {
    counter!(MESSAGES_RECEIVED).absolute(0);
    counter!(RECORDS_WRITTEN).absolute(0);
    for stage in DUPLICATE_STAGES {
        counter!(DUPLICATES_DROPPED, "stage" => stage).absolute(0);
    }
    for reason in Reason::ALL {
        counter!(QUARANTINED, "reason" => reason.as_str()).absolute(0);
    }
    for outcome in OUTCOMES {
        counter!(SQS_DELETES, "outcome" => outcome).absolute(0);
        counter!(VISIBILITY_EXTENSIONS, "outcome" => outcome).absolute(0);
    }
    for reason in RELEASE_REASONS {
        counter!(MESSAGES_RELEASED, "reason" => reason).absolute(0);
    }
    for stage in STAGES {
        counter!(RETRIES, "stage" => stage).absolute(0);
        for kind in ERROR_KINDS {
            counter!(ERRORS, "stage" => stage, "kind" => kind).absolute(0);
        }
    }
    for name in [BATCH_SIZE, FLUSH_DURATION, END_TO_END_LATENCY] {
        let _registered = histogram!(name);
    }
    for state in QUEUE_STATES {
        gauge!(QUEUE_MESSAGES, "state" => state).set(0.0);
    }
    gauge!(INFLIGHT_MESSAGES).set(0.0);
    gauge!(POLLERS).set(0.0);
    gauge!(DELETERS).set(0.0);
    for action in SQS_ACTIONS {
        counter!(SQS_REQUESTS, "action" => action).absolute(0);
    }
    gauge!(DEDUP_CACHE_ENTRIES).set(0.0);
    gauge!(DATABASE_WRITABLE).set(1.0);
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Counts one error of a stage.
pub fn error(stage: &'static str, kind: &'static str) {
    counter!(ERRORS, "stage" => stage, "kind" => kind).increment(1);
}

/// Counts one retry of a stage.
pub fn retry(stage: &'static str) {
    counter!(RETRIES, "stage" => stage).increment(1);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    /// One emitted series: name, sorted labels, value.
    pub(crate) type Series = (String, Vec<(String, String)>, DebugValue);

    /// Runs `f` under a private recorder; returns every series it emitted.
    pub(crate) fn capture(f: impl FnOnce()) -> Vec<Series> {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        ::metrics::with_local_recorder(&recorder, f);
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let key = key.key();
                let mut labels: Vec<(String, String)> =
                    key.labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
                labels.sort();
                (key.name().to_owned(), labels, value)
            })
            .collect()
    }

    /// The value of one series, if it was emitted.
    pub(crate) fn value_of<'a>(series: &'a [Series], name: &str, labels: &[(&str, &str)]) -> Option<&'a DebugValue> {
        let mut wanted: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        wanted.sort();
        series.iter().find(|(n, l, _)| n == name && *l == wanted).map(|(_, _, v)| v)
    }

    #[test]
    fn every_series_exists_before_the_first_event() {
        let series = capture(register_all);
        for reason in Reason::ALL {
            assert_eq!(
                value_of(&series, QUARANTINED, &[("reason", reason.as_str())]),
                Some(&DebugValue::Counter(0)),
                "{reason}"
            );
        }
        for stage in STAGES {
            for kind in ERROR_KINDS {
                assert!(value_of(&series, ERRORS, &[("stage", stage), ("kind", kind)]).is_some());
            }
            assert!(value_of(&series, RETRIES, &[("stage", stage)]).is_some());
        }
        for name in [BATCH_SIZE, FLUSH_DURATION, END_TO_END_LATENCY] {
            assert!(value_of(&series, name, &[]).is_some(), "{name}");
        }
        for state in QUEUE_STATES {
            assert!(value_of(&series, QUEUE_MESSAGES, &[("state", state)]).is_some());
        }
        assert!(value_of(&series, BUILD_INFO, &[("version", env!("CARGO_PKG_VERSION"))]).is_some());
        for name in [MESSAGES_RECEIVED, RECORDS_WRITTEN, INFLIGHT_MESSAGES, DEDUP_CACHE_ENTRIES, DATABASE_WRITABLE] {
            assert!(value_of(&series, name, &[]).is_some(), "{name}");
        }
    }

    #[test]
    fn the_exporter_renders_histograms_with_buckets_before_any_sample() {
        let recorder = prometheus_builder().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, register_all);
        let page = handle.render();
        assert!(page.contains("loginflow_flush_duration_seconds_bucket{le=\"0.005\"} 0"), "{page}");
        assert!(page.contains("loginflow_quarantined_total{reason=\"db_rejected\"} 0"));
    }
}
