//! The pipeline, wired as the spec draws it:
//!
//! ```text
//! SQS pollers ─► decode+validate ─► dedup ─► mask ─► window (rows|time) ─► Postgres sink ─► SQS delete
//!                     └─ invalid ─► quarantine (same transaction as its batch) ─────────────► SQS delete
//! ```
//!
//! Every hand-off is bounded: a slow sink fills the window, which stalls the mask
//! stage, which fills the poller channel, which stops the pollers receiving.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::{stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigError, RunArgs};
use crate::decode::{decode, Reason};
use crate::dedup::{Dedup, Fingerprint};
use crate::mask::{MaskedLogin, Masker, MessageMeta, QuarantineRecord};
use crate::retry::Backoff;
use crate::sink::Sink;
use crate::source::{Ack, Envelope, InFlight, ReceiveSettings};
use crate::{ack, http, metrics, source, sqs};

/// How often the queue's depth is read (for the gauge), and how often `--drain` checks it.
const QUEUE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const DRAIN_CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How many empty checks in a row `--drain` needs before it stops.
const DRAIN_CONFIRMATIONS: u32 = 2;

/// Errors that stop `run` before the pipeline starts.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot serve metrics on METRICS_ADDR {addr}: {source}")]
    MetricsAddr { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("shut down while waiting for the database to create the schema")]
    ShutdownBeforeStart,
}

/// What one `run` did, for the summary printed at exit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub received: u64,
    pub written: u64,
    /// Duplicates dropped: cache hits plus redeliveries the unique index caught.
    pub duplicates: u64,
    pub quarantined: u64,
    pub quarantined_by_reason: Vec<(String, u64)>,
    pub deleted: u64,
    /// Deletes that failed for good; those messages come back and are dropped as duplicates.
    pub delete_failures: u64,
    /// Messages left for redelivery because shutdown's grace period ran out.
    pub abandoned: u64,
}

#[derive(Default)]
struct Stats {
    received: AtomicU64,
    written: AtomicU64,
    duplicates: AtomicU64,
    quarantined: AtomicU64,
    deleted: AtomicU64,
    delete_failures: AtomicU64,
    abandoned: AtomicU64,
    by_reason: std::sync::Mutex<HashMap<Reason, u64>>,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn summary(&self) -> RunSummary {
        let mut by_reason: Vec<(String, u64)> = self
            .by_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(reason, n)| (reason.as_str().to_owned(), *n))
            .collect();
        by_reason.sort();
        RunSummary {
            received: self.received.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            quarantined: self.quarantined.load(Ordering::Relaxed),
            quarantined_by_reason: by_reason,
            deleted: self.deleted.load(Ordering::Relaxed),
            delete_failures: self.delete_failures.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
        }
    }
}

/// What became of one message.
#[derive(Debug)]
pub enum Record {
    Login(MaskedLogin),
    Quarantine(QuarantineRecord),
    /// Committed before (dedup cache hit): delete only.
    Duplicate,
}

/// One message on its way to the sink.
#[derive(Debug)]
pub struct Item {
    pub ack: Ack,
    pub fingerprint: Fingerprint,
    pub record: Record,
}

/// The CPU stages, without I/O: decode + validate, dedup, mask.
pub struct Transform {
    pub masker: Masker,
    pub dedup: Dedup,
}

impl Transform {
    /// Turns one receive batch into items, in order.
    pub fn process(&self, batch: Vec<Envelope>) -> Vec<Item> {
        batch.into_iter().map(|envelope| self.process_one(envelope)).collect()
    }

    fn process_one(&self, envelope: Envelope) -> Item {
        let fingerprint = self.dedup.fingerprint(&envelope.ack.message_id, &envelope.body);
        let record = if self.dedup.is_committed(fingerprint) {
            Record::Duplicate
        } else {
            let meta = MessageMeta { message_id: envelope.ack.message_id.clone(), sent_at: envelope.sent_at };
            match decode(&envelope.body) {
                Ok(login) => Record::Login(self.masker.mask_login(login, meta)),
                Err(rejection) => Record::Quarantine(self.masker.quarantine(rejection, &envelope.body, meta)),
            }
        };
        Item { ack: envelope.ack, fingerprint, record }
    }
}

/// A window split by destination.
#[derive(Default)]
struct Window {
    acks: Vec<Ack>,
    logins: Vec<MaskedLogin>,
    quarantine: Vec<QuarantineRecord>,
    /// Of the messages that are not cache duplicates, to remember once committed.
    fingerprints: Vec<Fingerprint>,
}

impl Window {
    fn split(items: Vec<Item>) -> Window {
        let mut window = Window { acks: Vec::with_capacity(items.len()), ..Window::default() };
        for item in items {
            window.acks.push(item.ack);
            match item.record {
                Record::Login(login) => window.logins.push(login),
                Record::Quarantine(record) => window.quarantine.push(record),
                Record::Duplicate => continue,
            }
            window.fingerprints.push(item.fingerprint);
        }
        window
    }

    fn receipts(&self) -> impl Iterator<Item = &str> {
        self.acks.iter().map(Ack::receipt)
    }
}

/// Everything the stages share.
struct Stages {
    transform: Transform,
    sink: Sink,
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    in_flight: Arc<InFlight>,
    stats: Stats,
    max_backoff: Duration,
    /// Cancelled when shutdown's grace period is over: stop retrying, leave the rest for redelivery.
    abort: CancellationToken,
}

impl Stages {
    /// Decode + validate, dedup, mask: one receive batch, counted once.
    fn process(&self, batch: Vec<Envelope>) -> Vec<Item> {
        let items = self.transform.process(batch);
        let duplicates = items.iter().filter(|item| matches!(item.record, Record::Duplicate)).count() as u64;
        metrics::counter!(metrics::DUPLICATES_DROPPED, "stage" => "cache").increment(duplicates);
        Stats::add(&self.stats.duplicates, duplicates);
        Stats::add(&self.stats.received, items.len() as u64);
        items
    }

    /// Writes one window in one transaction (retrying until it commits or shutdown gives up),
    /// then deletes its messages and remembers them as committed.
    async fn flush(&self, items: Vec<Item>) {
        let started = Instant::now();
        let window = Window::split(items);
        let Some(committed) = self.write_with_retry(&window.logins, &window.quarantine).await else {
            Stats::add(&self.stats.abandoned, window.acks.len() as u64);
            self.in_flight.release(window.receipts());
            return;
        };
        let now = Utc::now();
        metrics::histogram!(metrics::BATCH_SIZE).record(window.acks.len() as f64);
        metrics::histogram!(metrics::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
        let latency = metrics::histogram!(metrics::END_TO_END_LATENCY);
        for login in &window.logins {
            latency.record((now - login.sent_at).as_seconds_f64().max(0.0));
        }
        metrics::counter!(metrics::RECORDS_WRITTEN).increment(committed.written);
        metrics::counter!(metrics::DUPLICATES_DROPPED, "stage" => "database").increment(committed.already_stored);
        let mut by_reason: HashMap<Reason, u64> = HashMap::new();
        for record in window.quarantine.iter().chain(&committed.rejected) {
            *by_reason.entry(record.reason).or_default() += 1;
        }
        for (reason, n) in &by_reason {
            metrics::counter!(metrics::QUARANTINED, "reason" => reason.as_str()).increment(*n);
        }
        if !committed.rejected.is_empty() {
            metrics::error("sink", "rejected_record");
        }

        let deleted = ack::delete_all(&self.sqs, &self.queue_url, &window.acks, self.max_backoff).await;
        self.transform.dedup.mark_committed(window.fingerprints.iter().copied()).await;
        self.in_flight.release(window.receipts());

        let stats = &self.stats;
        Stats::add(&stats.written, committed.written);
        Stats::add(&stats.duplicates, committed.already_stored);
        Stats::add(&stats.quarantined, (window.quarantine.len() + committed.rejected.len()) as u64);
        Stats::add(&stats.deleted, deleted.succeeded);
        Stats::add(&stats.delete_failures, deleted.gave_up);
        let mut totals = stats.by_reason.lock().unwrap_or_else(|e| e.into_inner());
        for (reason, n) in by_reason {
            *totals.entry(reason).or_default() += n;
        }
    }

    async fn write_with_retry(
        &self,
        logins: &[MaskedLogin],
        quarantine: &[QuarantineRecord],
    ) -> Option<crate::sink::Committed> {
        let mut backoff = Backoff::new(self.max_backoff);
        loop {
            match self.sink.write(logins, quarantine).await {
                Ok(committed) => return Some(committed),
                Err(err) => {
                    metrics::error("sink", "transient");
                    metrics::retry("sink");
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, ?delay, rows = logins.len() + quarantine.len(),
                                   "batch not committed; retrying");
                    tokio::select! {
                        _ = self.abort.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// Runs the pipeline until `shutdown` resolves, or, with `--drain`, until the queue is empty
/// and everything received is committed and deleted.
pub async fn run(args: RunArgs, shutdown: impl Future<Output = ()>) -> Result<RunSummary, RunError> {
    args.validate()?;
    let masker = Masker::new(&args.load_mask_key()?);
    let prometheus = metrics::install();
    let sqs_client = sqs::client(&args.sqs).await;
    let sink = Sink::new(args.database.database_url.clone(), args.sink_connections.get());
    let background = CancellationToken::new();
    let tracker = TaskTracker::new();

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| RunError::MetricsAddr { addr: args.metrics_addr, source })?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(args.metrics_addr), "serving /metrics, /healthz, /readyz");
    let probes = http::Probes { sink: sink.clone(), sqs: sqs_client.clone(), queue_url: args.sqs.queue_url.clone() };
    tracker.spawn(http::serve(listener, prometheus, probes, background.clone()));

    tokio::pin!(shutdown);
    tokio::select! {
        () = migrate_with_retry(&sink, args.retry_max_backoff()) => {}
        () = &mut shutdown => {
            background.cancel();
            tracker.close();
            tracker.wait().await;
            return Err(RunError::ShutdownBeforeStart);
        }
    }

    let dedup = Dedup::new(args.dedup_key, args.dedup_capacity.get(), Duration::from_secs(args.dedup_ttl_secs));
    let stages = Arc::new(Stages {
        transform: Transform { masker, dedup },
        sink,
        sqs: sqs_client.clone(),
        queue_url: args.sqs.queue_url.clone(),
        in_flight: Arc::new(InFlight::default()),
        stats: Stats::default(),
        max_backoff: args.retry_max_backoff(),
        abort: CancellationToken::new(),
    });

    // Source: pollers stop on this token; everything downstream then drains and ends.
    let stop_source = CancellationToken::new();
    let pollers = args.pollers.get() as usize;
    let (to_process, received) = mpsc::channel::<Vec<Envelope>>(pollers * 2);
    let settings = ReceiveSettings {
        queue_url: args.sqs.queue_url.clone(),
        wait_secs: args.receive_wait_secs,
        visibility_timeout_secs: args.visibility_timeout_secs,
        max_backoff: args.retry_max_backoff(),
    };
    let poller_tasks = TaskTracker::new();
    for _ in 0..pollers {
        poller_tasks.spawn(source::receive_loop(
            sqs_client.clone(),
            settings.clone(),
            stages.in_flight.clone(),
            to_process.clone(),
            stop_source.clone(),
        ));
    }
    poller_tasks.close();
    drop(to_process);
    tracker.spawn(source::extend_visibility(
        sqs_client.clone(),
        args.sqs.queue_url.clone(),
        stages.in_flight.clone(),
        args.visibility_timeout(),
        background.clone(),
    ));
    let drain = args.drain.then(|| stop_source.clone());
    tracker.spawn(watch_queue(stages.clone(), drain, background.clone()));

    let process_stage = stages.clone();
    let flush_stage = stages.clone();
    let masked = ReceiverStream::new(received)
        .map(move |batch: Vec<Envelope>| {
            let stages = process_stage.clone();
            let receipts: Vec<String> = batch.iter().map(|e| e.ack.receipt_handle.clone()).collect();
            async move {
                match tokio::spawn({
                    let stages = stages.clone();
                    async move { stages.process(batch) }
                })
                .await
                {
                    Ok(items) => items,
                    Err(err) => {
                        // A bug, not bad data: leave the messages for redelivery (and, at last, the DLQ).
                        metrics::error("decode", "gave_up");
                        tracing::error!(error = %err, "processing task failed; messages left for redelivery");
                        stages.in_flight.release(receipts.iter().map(String::as_str));
                        Vec::new()
                    }
                }
            }
        })
        .buffered(args.mask_concurrency.get())
        .flat_map(stream::iter);
    let windows = tokio_stream::StreamExt::chunks_timeout(masked, args.batch_max_rows.get(), args.batch_max_wait());
    let pipeline = windows
        .map(move |batch| {
            let stages = flush_stage.clone();
            async move { stages.flush(batch).await }
        })
        .buffer_unordered(args.sink_connections.get())
        .for_each(|()| async {});
    tokio::pin!(pipeline);

    tokio::select! {
        () = &mut pipeline => {}
        () = &mut shutdown => {
            tracing::info!(grace = ?args.shutdown_grace(), "shutdown requested: stopping pollers, flushing in-flight work");
            stop_source.cancel();
            if tokio::time::timeout(args.shutdown_grace(), &mut pipeline).await.is_err() {
                stages.abort.cancel();
                // Retries now give up at once; give the last deletes a moment, then stop.
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut pipeline).await;
                let left = stages.in_flight.len();
                Stats::add(&stages.stats.abandoned, left as u64);
                tracing::warn!(left, "grace period over; uncommitted messages left for redelivery");
            }
        }
    }
    stop_source.cancel();
    poller_tasks.wait().await;
    background.cancel();
    tracker.close();
    tracker.wait().await;
    Ok(stages.stats.summary())
}

async fn migrate_with_retry(sink: &Sink, max_backoff: Duration) {
    let mut backoff = Backoff::new(max_backoff);
    loop {
        match sink.migrate().await {
            Ok(()) => return,
            Err(err) => {
                metrics::error("sink", "transient");
                metrics::retry("sink");
                let delay = backoff.next_delay();
                tracing::warn!(error = %err, ?delay, "schema migration failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Publishes the queue's depth every [`QUEUE_CHECK_INTERVAL`]; with `drain`, also stops the source
/// once the queue reports nothing visible, in flight or delayed and nothing received is still held,
/// on several checks in a row. While messages are held the queue cannot be drained, so the drain
/// check skips the call then: counting a large queue is expensive for the SQS emulator.
async fn watch_queue(stages: Arc<Stages>, drain: Option<CancellationToken>, done: CancellationToken) {
    let interval = if drain.is_some() { DRAIN_CHECK_INTERVAL } else { QUEUE_CHECK_INTERVAL };
    let mut confirmations = 0;
    let mut last_read: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let gauge_due = last_read.is_none_or(|at| at.elapsed() >= QUEUE_CHECK_INTERVAL);
        let drain_check = drain.is_some() && stages.in_flight.is_empty();
        if !gauge_due && !drain_check {
            confirmations = 0;
            continue;
        }
        let empty = match sqs::queue_depth(&stages.sqs, &stages.queue_url).await {
            Ok(depth) => {
                last_read = Some(Instant::now());
                depth.record();
                depth.is_empty() && stages.in_flight.is_empty()
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot read queue depth");
                false
            }
        };
        let Some(stop_source) = &drain else { continue };
        confirmations = if empty { confirmations + 1 } else { 0 };
        if confirmations >= DRAIN_CONFIRMATIONS {
            tracing::info!("queue drained");
            stop_source.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DedupKey;
    use crate::metrics::tests::{capture, value_of};
    use metrics_util::debugging::DebugValue;

    async fn stages() -> Stages {
        let sqs_args = crate::config::SqsArgs {
            queue_url: "http://127.0.0.1:9/0/q".into(),
            aws_endpoint_url: Some("http://127.0.0.1:9".into()),
            aws_region: "us-east-1".into(),
            aws_access_key_id: None,
            aws_secret_access_key: None,
        };
        Stages {
            transform: Transform {
                masker: Masker::new(&secrecy::SecretString::from("k".repeat(32))),
                dedup: Dedup::new(DedupKey::MessageId, 100, Duration::from_secs(60)),
            },
            sink: Sink::new("postgres://nobody@127.0.0.1:9/none".parse().unwrap(), 1),
            sqs: sqs::client(&sqs_args).await,
            queue_url: sqs_args.queue_url,
            in_flight: Arc::new(InFlight::default()),
            stats: Stats::default(),
            max_backoff: Duration::from_secs(1),
            abort: CancellationToken::new(),
        }
    }

    fn envelope(id: &str, body: &str) -> Envelope {
        Envelope {
            ack: Ack { message_id: id.into(), receipt_handle: format!("r-{id}") },
            body: body.into(),
            sent_at: Utc::now(),
        }
    }

    const VALID: &str =
        r#"{"user_id":"u","app_version":"1.0","device_type":"ios","ip":"1.2.3.4","locale":null,"device_id":"1"}"#;

    #[test]
    fn the_pipeline_future_can_be_spawned() {
        fn assert_send<T: Send>(_: &T) {}
        let cli = <crate::config::Cli as clap::Parser>::try_parse_from(["loginflow", "run"]).unwrap();
        let crate::config::Command::Run(args) = cli.command else { unreachable!() };
        assert_send(&run(*args, std::future::pending()));
    }

    #[tokio::test]
    async fn process_sorts_messages_into_rows_quarantine_and_duplicates_in_order() {
        let stages = stages().await;
        let dedup = &stages.transform.dedup;
        dedup.mark_committed([dedup.fingerprint("m-3", "")]).await;
        let batch = vec![envelope("m-1", VALID), envelope("m-2", "{oops"), envelope("m-3", VALID)];
        let mut items = Vec::new();
        let series = capture(|| items = stages.process(batch));

        let kinds: Vec<(&str, &str)> = items
            .iter()
            .map(|item| {
                let kind = match &item.record {
                    Record::Login(_) => "login",
                    Record::Quarantine(q) => q.reason.as_str(),
                    Record::Duplicate => "duplicate",
                };
                (item.ack.message_id.as_str(), kind)
            })
            .collect();
        assert_eq!(kinds, [("m-1", "login"), ("m-2", "invalid_json"), ("m-3", "duplicate")]);
        assert_eq!(
            value_of(&series, metrics::DUPLICATES_DROPPED, &[("stage", "cache")]),
            Some(&DebugValue::Counter(1))
        );
        let summary = stages.stats.summary();
        assert_eq!((summary.received, summary.duplicates), (3, 1));
    }
}
