//! The pipeline, wired as the spec draws it:
//!
//! ```text
//! SQS pollers ─► decode+validate ─► dedup ─► mask ─► window (grows with load) ─► Postgres sink ─► SQS delete
//!                     └─ invalid ─► quarantine (same transaction as its batch) ─────────────► SQS delete
//! ```
//!
//! Every hand-off is bounded, in messages and (by the byte budget) in bytes: a slow sink fills
//! the window, which stalls the mask stage, which fills the poller channel, which stops the
//! pollers receiving. Shutdown stops the pollers; the rest drains, and whatever is still being
//! written when the grace period ends is cancelled (rolled back) and left for redelivery.

mod acks;
mod drain;
mod summary;
mod windows;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::{stream, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ConfigError, RunArgs};
use crate::decode::{decode, Reason, Rejection};
use crate::dedup::{Dedup, Fingerprint};
use crate::mask::{MaskedLogin, Masker, MessageMeta, QuarantineRecord};
use crate::retry::Backoff;
use crate::sink::{self, Committed, ErrorClass, Part, Sink, SinkError};
use crate::source::envelope::{self, InputFormat, Unwrapped};
use crate::source::{Ack, Budget, Envelope, InFlight, ReceiveSettings, Share};
use crate::vault::{DataKey, Sealed, Vault};
use crate::{http, metrics, source, sqs};
use acks::Stored;
pub use summary::RunSummary;
use summary::Stats;

/// A receive batch with more bytes of bodies than this is processed on a blocking thread.
const LARGE_BATCH_BYTES: usize = 256 << 10;
/// After the grace period, how long cancelled work may take to unwind before `run` returns anyway.
const ABORT_WAIT: Duration = Duration::from_secs(3);
/// Committed windows waiting for the acknowledgement stage (then the sink waits).
const COMMITTED_WINDOWS: usize = 8;
/// How long `run` waits for its background tasks (pollers, probes, extender) at the end.
const TASKS_WAIT: Duration = Duration::from_secs(2);
/// Failed attempts at a window's write after which, if the database takes writes meanwhile, the
/// window is written one record per transaction to find the records that cannot be stored.
const WINDOW_ATTEMPTS: u32 = 8;
/// How long the database has to show it takes writes ([`Sink::takes_writes`]).
const WRITE_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest record-by-record pass; the records left then wait with the rest of their window.
const RECORD_PASS_DEADLINE: Duration = Duration::from_secs(60);

/// Errors that stop `run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot serve metrics on METRICS_ADDR {addr}: {source}")]
    MetricsAddr { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("--drain did not finish within DRAIN_TIMEOUT_SECS ({timeout_secs} s): {held} messages were still held, and the queue reported {queue}")]
    DrainTimeout { timeout_secs: u64, held: usize, queue: String, summary: Box<RunSummary> },
    #[error("cannot use the database in DATABASE_URL: {0}")]
    Database(crate::sink::SinkError),
    #[error("cannot open the PII vault (PII_KMS_KEY_ID): {0}")]
    Vault(crate::vault::VaultError),
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
    /// The body's share of the byte budget, held until the message leaves the pipeline.
    pub share: Option<Share>,
}

/// The CPU stages, without I/O: unwrap (SNS), decode + validate, dedup, mask, seal.
pub struct Transform {
    pub masker: Masker,
    pub dedup: Dedup,
    pub input_format: InputFormat,
    /// The PII vault, when `PII_KMS_KEY_ID` is set.
    pub vault: Option<Arc<Vault>>,
}

impl Transform {
    /// Turns one receive batch into items, in order.
    pub fn process(&self, batch: Vec<Envelope>) -> Vec<Item> {
        let key = self.vault.as_ref().map(|vault| vault.current());
        batch.into_iter().map(|envelope| self.process_one(envelope, key.as_deref())).collect()
    }

    fn process_one(&self, mut envelope: Envelope, key: Option<&DataKey>) -> Item {
        let unwrapped = match envelope.forged_copy_id {
            true => Err(Rejection {
                reason: Reason::InvalidEnvelope,
                detail: Some(crate::redrive::ORIGINAL_ID_ATTRIBUTE.to_owned()),
            }),
            false => envelope::unwrap(&envelope.body, self.input_format),
        };
        if let Ok(Unwrapped::Sns { key, .. }) = &unwrapped {
            // The SNS id is the idempotency key: the same notification delivered twice is one row.
            envelope.ack.message_id = key.clone();
        }
        let fingerprint = self.dedup.fingerprint(&envelope.ack.message_id);
        let record = if self.dedup.is_committed(fingerprint) {
            Record::Duplicate
        } else {
            let meta = MessageMeta { message_id: envelope.ack.message_id.clone(), sent_at: envelope.sent_at };
            to_record(&self.masker, key, meta, &envelope.body, &unwrapped)
        };
        Item { ack: envelope.ack, fingerprint, record, share: envelope.share }
    }
}

/// Decode + validate, mask and seal one message: the rule every path that stores a message
/// follows (the pipeline, and `quarantine replay`). `received` is the body as it arrived,
/// `unwrapped` what [`envelope::unwrap`] made of it; a rejected message's sealed copy is the
/// whole body as received (envelope included), so nothing is lost.
pub fn to_record(
    masker: &Masker,
    key: Option<&DataKey>,
    meta: MessageMeta,
    received: &str,
    unwrapped: &Result<Unwrapped<'_>, Rejection>,
) -> Record {
    let event = envelope::event(received, unwrapped);
    let decoded = match unwrapped {
        Ok(_) => decode(event),
        Err(rejection) => Err(rejection.clone()),
    };
    match decoded {
        Ok(login) => {
            let sealed = key.map(|key| key.seal_login(&meta.message_id, &login));
            Record::Login(MaskedLogin { sealed, ..masker.mask_login(login, meta) })
        }
        Err(rejection) => {
            let sealed = key.map(|key| Sealed {
                user_fingerprints: masker.user_fingerprints(received),
                ..key.seal_body(&meta.message_id, received)
            });
            Record::Quarantine(QuarantineRecord { sealed, ..masker.quarantine(rejection, event, meta) })
        }
    }
}

/// A window split by destination.
#[derive(Default)]
struct Window {
    acks: Vec<Ack>,
    logins: Vec<MaskedLogin>,
    quarantine: Vec<QuarantineRecord>,
    /// Per ack, its fingerprint to remember once deleted (`None` for a cache duplicate: already known).
    fingerprints: Vec<Option<Fingerprint>>,
    /// The bodies' shares of the byte budget, returned when the window is done.
    _shares: Vec<Share>,
}

impl Window {
    fn split(items: Vec<Item>) -> Window {
        let mut window = Window { acks: Vec::with_capacity(items.len()), ..Window::default() };
        for item in items {
            window.acks.push(item.ack);
            window._shares.extend(item.share);
            let fingerprint = match item.record {
                Record::Login(login) => {
                    window.logins.push(login);
                    Some(item.fingerprint)
                }
                Record::Quarantine(record) => {
                    window.quarantine.push(record);
                    Some(item.fingerprint)
                }
                Record::Duplicate => None,
            };
            window.fingerprints.push(fingerprint);
        }
        window
    }

    fn receipts(&self) -> Vec<Arc<str>> {
        self.acks.iter().map(|ack| ack.receipt_handle.clone()).collect()
    }
}

/// Everything the stages share.
struct Stages {
    transform: Transform,
    /// `MAX_INFLIGHT_BYTES`: what messages hold, bodies and what processing makes of them.
    budget: Budget,
    /// How long a committed message's delete may wait ([`acks::max_ack_lag`]).
    max_ack_lag: Duration,
    /// `MASK_CONCURRENCY` permits: receive batches processed at once.
    processing: Arc<tokio::sync::Semaphore>,
    sink: Sink,
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    in_flight: Arc<InFlight>,
    stats: Stats,
    max_backoff: Duration,
    /// Cancelled when shutdown's grace period is over: writes in progress are cancelled
    /// (rolled back), retries stop, and what is left is abandoned for redelivery.
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

    /// [`Stages::process`] in the poller that received the batch; a batch with large bodies
    /// (milliseconds each to scrub and seal) on a blocking thread instead, so the pollers,
    /// visibility extension and database connections keep running meanwhile. `None` when
    /// processing panicked: a bug, not bad data, so the messages are left for redelivery
    /// (and, at last, the DLQ).
    async fn process_received(self: Arc<Self>, batch: Vec<Envelope>) -> Option<Vec<Item>> {
        // Never closed, so acquiring only waits.
        let permit = self.processing.clone().acquire_owned().await.ok()?;
        let budget = self.budget.clone();
        let large = batch.iter().map(|e| e.body.len()).sum::<usize>() > LARGE_BATCH_BYTES;
        let processed = match large {
            true => tokio::task::spawn_blocking(move || self.process(batch)).await.map_err(|_| ()),
            false => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.process(batch))).map_err(|_| ()),
        };
        if processed.is_err() {
            metrics::error("decode", "gave_up");
            // A panic's message may quote body text: say only that it panicked.
            tracing::error!("processing a receive batch panicked; messages left for redelivery");
        }
        // The permit goes before the budget is waited for: pollers holding budget wait for permits.
        drop(permit);
        let mut items = processed.ok()?;
        count_what_was_made(&budget, &mut items).await;
        Some(items)
    }

    /// Writes one window (retrying while the database is unavailable, until it commits or
    /// shutdown gives up), releases the messages it could not store for the dead-letter
    /// queue, and hands the stored ones to the acknowledgement stage ([`acks`]).
    ///
    /// `connection` is the window's sink slot, given back once the stored messages are handed
    /// over, so the next window is written while this one's deletes run.
    async fn flush(&self, items: Vec<Item>, connection: OwnedSemaphorePermit, committed: &mpsc::Sender<Vec<Stored>>) {
        let started = Instant::now();
        let window = Window::split(items);
        let Some(written) = self.write_with_retry(&window).await else {
            drop(connection);
            self.abandon(window.receipts()).await;
            return;
        };
        self.record_commit(&window, &written, started);

        let committed_at = tokio::time::Instant::now();
        let unstorable: HashSet<&str> = written.unstorable.iter().map(String::as_str).collect();
        let mut stored = Vec::with_capacity(window.acks.len());
        let mut released = Vec::new();
        for (ack, fingerprint) in window.acks.into_iter().zip(window.fingerprints) {
            if unstorable.contains(ack.message_id.as_str()) {
                released.push(ack.receipt_handle);
            } else {
                stored.push(Stored { ack, fingerprint, committed_at });
            }
        }
        // The channel closes only after every flush has ended, so this send cannot fail.
        let _ = committed.send(stored).await;
        drop(connection);
        if !released.is_empty() {
            metrics::error("sink", "gave_up");
            metrics::counter!(metrics::MESSAGES_RELEASED, "reason" => "unstorable").increment(released.len() as u64);
            Stats::add(&self.stats.released, released.len() as u64);
            self.in_flight.release(&released);
            tokio::select! {
                () = source::release_for_redelivery(&self.sqs, &self.queue_url, &released) => {}
                () = self.abort.cancelled() => {}
            }
        }
    }

    /// Leaves messages for redelivery after shutdown's grace period: counted as abandoned and
    /// made visible again at once (best effort, bounded), so the next run need not wait out
    /// their visibility timeout.
    async fn abandon(&self, receipts: Vec<Arc<str>>) {
        Stats::add(&self.stats.abandoned, receipts.len() as u64);
        metrics::counter!(metrics::MESSAGES_RELEASED, "reason" => "shutdown").increment(receipts.len() as u64);
        self.in_flight.release(&receipts);
        let release = source::release_for_redelivery(&self.sqs, &self.queue_url, &receipts);
        let _ = tokio::time::timeout(TASKS_WAIT, release).await;
    }

    /// Metrics and counters of a committed window.
    fn record_commit(&self, window: &Window, committed: &Committed, started: Instant) {
        let now = Utc::now();
        metrics::histogram!(metrics::BATCH_SIZE).record(window.acks.len() as f64);
        metrics::histogram!(metrics::FLUSH_DURATION).record(started.elapsed().as_secs_f64());
        let latency = metrics::histogram!(metrics::END_TO_END_LATENCY);
        for login in &window.logins {
            latency.record((now - login.sent_at).as_seconds_f64().max(0.0));
        }
        metrics::counter!(metrics::RECORDS_WRITTEN).increment(committed.written);
        metrics::counter!(metrics::DUPLICATES_DROPPED, "stage" => "database").increment(committed.already_stored);
        let unstorable: HashSet<&str> = committed.unstorable.iter().map(String::as_str).collect();
        let mut by_reason: HashMap<Reason, u64> = HashMap::new();
        let quarantined = window.quarantine.iter().filter(|r| !unstorable.contains(r.message_id.as_str()));
        for record in quarantined.chain(&committed.rejected) {
            *by_reason.entry(record.reason).or_default() += 1;
        }
        for (reason, n) in &by_reason {
            metrics::counter!(metrics::QUARANTINED, "reason" => reason.as_str()).increment(*n);
        }
        if !committed.rejected.is_empty() {
            metrics::counter!(metrics::ERRORS, "stage" => "sink", "kind" => "rejected_record")
                .increment(committed.rejected.len() as u64);
        }
        Stats::add(&self.stats.written, committed.written);
        Stats::add(&self.stats.duplicates, committed.already_stored);
        Stats::add(&self.stats.quarantined, by_reason.values().sum());
        self.stats.add_reasons(by_reason);
    }

    /// The window's write, retried with backoff while the database is unavailable or busy;
    /// `None` once shutdown's grace period is over (the write in progress is rolled back).
    ///
    /// While the window is retried it is held ([`Sink::hold`]): `loginflow_database_writable` is 0
    /// and `/readyz` says not ready; each failure is logged with its SQLSTATE. While the database
    /// cannot take writes (down, read-only, a privilege or table gone: the write probe fails) the
    /// window waits, however long; nothing is released. A window that keeps failing while the
    /// probe passes holds something the database will not take (a record whose trigger outlasts
    /// the statement timeout, or raises a "busy" SQLSTATE every time): after [`WINDOW_ATTEMPTS`]
    /// (and, for a refusal a trigger can raise, such as `42P01`, a second passing probe, so a
    /// window is not split just as an outage ends) it is written one record per transaction, and
    /// the records that still fail are reported unstorable, to be released for the queue's
    /// redrive policy instead of held forever.
    async fn write_with_retry(&self, window: &Window) -> Option<Committed> {
        let mut backoff = Backoff::new(self.max_backoff);
        let mut failures = 0;
        // Failures saying "unavailable" after which the probe passed anyway: a record's doing
        // (a trigger raising such a code on some rows) once it happens twice.
        let mut unexplained = 0;
        // The records not yet stored: always a suffix of the window's logins, then of its quarantine records.
        let mut pending = Part { logins: &window.logins, quarantine: &window.quarantine };
        let mut committed = Committed::default();
        let mut held: Option<sink::Held> = None;
        loop {
            match self.sink.write(pending.logins, pending.quarantine, &self.abort).await {
                Ok(done) => {
                    committed.add(done);
                    return Some(committed);
                }
                Err(SinkError::Cancelled) => return None,
                Err(err) => {
                    let class = err.class();
                    held.get_or_insert_with(|| self.sink.hold());
                    metrics::error("sink", "transient");
                    metrics::retry("sink");
                    failures += 1;
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %crate::error_chain(&err), sqlstate = err.sqlstate(), ?class, ?delay,
                                   messages = pending.len(), "batch not committed; the database cannot take it now, retrying");
                    if failures >= WINDOW_ATTEMPTS {
                        let takes_writes = tokio::select! {
                            takes_writes = self.sink.takes_writes(WRITE_PROBE_TIMEOUT) => takes_writes,
                            _ = self.abort.cancelled() => return None,
                        };
                        if takes_writes && class != ErrorClass::Busy && sink::errors::may_be_a_records(err.sqlstate()) {
                            unexplained += 1;
                        }
                        if !takes_writes {
                            unexplained = 0;
                            tracing::warn!(
                                failures,
                                sqlstate = err.sqlstate(),
                                "the database takes no writes now; the batch waits for it"
                            );
                        } else if class == ErrorClass::Busy || unexplained >= 2 {
                            match self.write_record_by_record(&mut pending, &mut committed).await {
                                PassEnd::Done => return Some(committed),
                                PassEnd::Cancelled => return None,
                                // Out of time: one whole-window attempt, then the pass goes on.
                                PassEnd::OutOfTime => failures = WINDOW_ATTEMPTS - 1,
                                // The database stopped taking writes: the rest waits, with fresh attempts.
                                PassEnd::Held => (failures, unexplained) = (0, 0),
                            }
                        }
                    }
                    tokio::select! {
                        _ = self.abort.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Writes each pending record in its own transaction, once, advancing `pending` past it; a
    /// record whose write fails while the write probe passes is reported unstorable. Stops when
    /// the database stops taking writes, or no connection is to be had ([`PassEnd::Held`]), or
    /// after [`RECORD_PASS_DEADLINE`] ([`PassEnd::OutOfTime`]).
    async fn write_record_by_record(&self, pending: &mut Part<'_>, committed: &mut Committed) -> PassEnd {
        tracing::warn!(
            messages = pending.len(),
            attempts = WINDOW_ATTEMPTS,
            "the database takes writes but this batch keeps failing; writing its records one by one"
        );
        let deadline = tokio::time::Instant::now() + RECORD_PASS_DEADLINE;
        while let Some((record, message_id, rest)) = pending.split_first() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    left = pending.len(),
                    "record-by-record pass out of time; it goes on after one more try of the rest"
                );
                return PassEnd::OutOfTime;
            }
            match self.sink.write(record.logins, record.quarantine, &self.abort).await {
                Ok(done) => committed.add(done),
                Err(SinkError::Cancelled) => return PassEnd::Cancelled,
                Err(err) => {
                    // A record's failure is the record's only while the database takes writes; no
                    // connection from the pool says nothing of the record.
                    let takes_writes = !matches!(err, SinkError::Pool(_))
                        && tokio::select! {
                            takes_writes = self.sink.takes_writes(WRITE_PROBE_TIMEOUT) => takes_writes,
                            _ = self.abort.cancelled() => return PassEnd::Cancelled,
                        };
                    if !takes_writes {
                        tracing::warn!(
                            sqlstate = err.sqlstate(),
                            left = pending.len(),
                            "the database stopped taking writes; the rest of the batch waits for it"
                        );
                        return PassEnd::Held;
                    }
                    tracing::warn!(error = %crate::error_chain(&err), sqlstate = err.sqlstate(), %message_id,
                                   "record not stored after every attempt");
                    committed.unstorable.push(message_id.to_owned());
                }
            }
            *pending = rest;
        }
        PassEnd::Done
    }
}

/// Refits the budget shares of a batch with quarantined messages to what those became: the
/// clear copy and the sealed original, held until the window is done, where the body was.
/// (A login becomes a few hundred bytes, less than its body: its share stays as it is.)
async fn count_what_was_made(budget: &Budget, items: &mut [Item]) {
    if !items.iter().any(|item| matches!(item.record, Record::Quarantine(_))) {
        return;
    }
    let mut shares = Vec::new();
    let mut needs = Vec::new();
    let mut holders = Vec::new();
    for item in items.iter_mut() {
        let Some(share) = item.share.take() else { continue };
        needs.push(match &item.record {
            Record::Quarantine(record) => record.footprint(),
            _ => share.bytes(),
        });
        shares.push(share);
        holders.push(item);
    }
    let refitted = budget.refit(shares, &needs).await;
    for (item, share) in holders.into_iter().zip(refitted) {
        item.share = Some(share);
    }
}

/// How a record-by-record pass ended.
enum PassEnd {
    /// Every record was stored or found unstorable.
    Done,
    /// Shutdown's grace period is over.
    Cancelled,
    /// The database stopped taking writes: the rest waits for it.
    Held,
    /// The pass ran for [`RECORD_PASS_DEADLINE`]: the rest is tried whole once, then the pass goes on.
    OutOfTime,
}

/// Runs the pipeline until `shutdown` resolves, or, with `--drain`, until the queue is empty
/// and everything received is committed and deleted (at most `DRAIN_TIMEOUT_SECS`).
/// Returns within the grace period plus a few seconds of `shutdown`, whatever state the
/// database or the queue is in.
pub async fn run(args: RunArgs, shutdown: impl Future<Output = ()>) -> Result<RunSummary, RunError> {
    args.validate()?;
    let masker = Masker::new(&args.load_mask_key()?).with_copy_max_bytes(args.copy.quarantine_copy_max_bytes);
    let prometheus = metrics::install();
    let sqs_client = sqs::client(&args.sqs).await;
    let sink =
        Sink::with_flush_timeout(args.database.database_url.clone(), args.sink_connections, args.flush_timeout())
            .with_vault_tables(args.pii_kms_key_id.is_some());
    let background = CancellationToken::new();
    let tracker = TaskTracker::new();

    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| RunError::MetricsAddr { addr: args.metrics_addr, source })?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(args.metrics_addr), "serving /metrics, /healthz, /readyz");
    let probes = http::Probes { sink: sink.clone(), sqs: sqs_client.clone(), queue_url: args.sqs.queue_url.clone() };
    tracker.spawn(http::serve(listener, prometheus, probes, background.clone()));

    tokio::pin!(shutdown);
    // Shutdown before the first receive: nothing is held, so only the background tasks stop.
    let stopped_before_start = async |step: &str| {
        tracing::info!(step, "shut down before the pipeline started; nothing was received");
        background.cancel();
        tracker.close();
        let _ = tokio::time::timeout(TASKS_WAIT, tracker.wait()).await;
        Ok(RunSummary::default())
    };
    tokio::select! {
        migrated = migrate_with_retry(&sink, args.retry_max_backoff()) => migrated.map_err(RunError::Database)?,
        () = &mut shutdown => return stopped_before_start("schema").await,
    }

    let vault = match &args.pii_kms_key_id {
        Some(kms_key_id) => {
            let kms = aws_sdk_kms::Client::new(&sqs::sdk_config(&args.sqs).await);
            // KMS may stall (each SDK attempt waits up to its own timeout): shutdown does not wait for it.
            let opened = tokio::select! {
                opened = Vault::open(kms, kms_key_id.clone(), &sink) => opened.map_err(RunError::Vault)?,
                () = &mut shutdown => return stopped_before_start("PII vault").await,
            };
            let vault = Arc::new(opened);
            tracing::info!(kms_key_id = %kms_key_id, rotation = ?args.pii_key_rotation(),
                           "PII vault on: raw ip, device_id and quarantined bodies are sealed into user_logins_pii");
            tracker.spawn(vault.clone().rotate_every(args.pii_key_rotation(), sink.clone(), background.clone()));
            Some(vault)
        }
        None => {
            tracing::info!("PII vault off (PII_KMS_KEY_ID unset): raw values are not kept anywhere");
            None
        }
    };
    let dedup = Dedup::new(args.dedup_capacity, Duration::from_secs(args.dedup_ttl_secs));
    let budget = Budget::new(args.max_inflight_bytes);
    let stages = Arc::new(Stages {
        transform: Transform { masker, dedup, input_format: args.input_format, vault },
        budget: budget.clone(),
        processing: Arc::new(tokio::sync::Semaphore::new(args.mask_concurrency)),
        max_ack_lag: acks::max_ack_lag(args.visibility_timeout()),
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
    let (to_window, processed) = mpsc::channel::<Vec<Item>>(args.pollers * 2);
    let settings = ReceiveSettings {
        queue_url: args.sqs.queue_url.clone(),
        wait_secs: args.receive_wait_secs,
        visibility_timeout_secs: args.visibility_timeout_secs,
        max_backoff: args.retry_max_backoff(),
    };
    let poller_tasks = TaskTracker::new();
    for _ in 0..args.pollers {
        let stages = stages.clone();
        poller_tasks.spawn(source::receive_loop(
            sqs_client.clone(),
            settings.clone(),
            stages.in_flight.clone(),
            budget.clone(),
            move |batch| stages.clone().process_received(batch),
            to_window.clone(),
            stop_source.clone(),
        ));
    }
    poller_tasks.close();
    drop(to_window);
    tracker.spawn(source::extend_visibility(
        sqs_client.clone(),
        args.sqs.queue_url.clone(),
        stages.in_flight.clone(),
        args.visibility_timeout(),
        background.clone(),
    ));
    let drain = args.drain.then(|| stop_source.clone());
    tracker.spawn(drain::watch_queue(
        sqs_client.clone(),
        args.sqs.queue_url.clone(),
        stages.in_flight.clone(),
        drain,
        background.clone(),
    ));

    let flush_stage = stages.clone();
    let masked = ReceiverStream::new(processed).flat_map(stream::iter);
    let (to_acknowledge, committed) = mpsc::channel::<Vec<Stored>>(COMMITTED_WINDOWS);
    let writes = windows::write_in_windows(
        masked,
        args.batch_max_rows,
        args.batch_max_wait(),
        args.sink_connections,
        move |window, connection| {
            let stages = flush_stage.clone();
            let to_acknowledge = to_acknowledge.clone();
            async move { stages.flush(window, connection, &to_acknowledge).await }
        },
    );
    let pipeline = async {
        tokio::join!(writes, stages.clone().acknowledge(committed, stop_source.clone()));
    };
    tokio::pin!(pipeline);

    let drain_deadline = async {
        match args.drain {
            true => tokio::time::sleep(args.drain_timeout()).await,
            false => std::future::pending().await,
        }
    };
    let mut drain_timed_out = None;
    let mut finished = false;
    tokio::select! {
        () = &mut pipeline => finished = true,
        () = &mut shutdown => {
            tracing::info!(grace = ?args.shutdown_grace(), "shutdown requested: stopping pollers, flushing in-flight work");
        }
        () = drain_deadline => {
            let held = stages.in_flight.len();
            let queue = match tokio::time::timeout(TASKS_WAIT, sqs::queue_depth(&stages.sqs, &stages.queue_url)).await {
                Ok(Ok(depth)) => format!("{} visible, {} in flight, {} delayed", depth.visible, depth.in_flight, depth.delayed),
                _ => "nothing (unreachable)".to_owned(),
            };
            tracing::error!(held, %queue, "DRAIN_TIMEOUT_SECS passed; stopping");
            drain_timed_out = Some((held, queue));
        }
    }
    stop_source.cancel();
    if !finished && tokio::time::timeout(args.shutdown_grace(), &mut pipeline).await.is_err() {
        stages.abort.cancel();
        if tokio::time::timeout(ABORT_WAIT, &mut pipeline).await.is_err() {
            tracing::warn!("in-flight work did not unwind after cancellation; exiting anyway");
        }
        let left = stages.in_flight.receipts();
        tracing::warn!(left = left.len(), "grace period over; uncommitted messages left for redelivery");
        stages.abandon(left).await;
    }
    let _ = tokio::time::timeout(TASKS_WAIT, poller_tasks.wait()).await;
    background.cancel();
    tracker.close();
    let _ = tokio::time::timeout(TASKS_WAIT, tracker.wait()).await;
    let summary = stages.stats.summary();
    match drain_timed_out {
        None => Ok(summary),
        Some((held, queue)) => Err(RunError::DrainTimeout {
            timeout_secs: args.drain_timeout_secs,
            held,
            queue,
            summary: Box::new(summary),
        }),
    }
}

/// Creates the schema, retrying while the database is unavailable. A certificate the
/// settings do not trust, or credentials the server refuses, end startup instead: waiting
/// will not change them.
async fn migrate_with_retry(sink: &Sink, max_backoff: Duration) -> Result<(), crate::sink::SinkError> {
    let mut backoff = Backoff::new(max_backoff);
    loop {
        match sink.migrate().await {
            Ok(()) => return Ok(()),
            Err(err) if err.needs_operator() => return Err(err),
            Err(err) => {
                metrics::error("sink", "transient");
                metrics::retry("sink");
                let delay = backoff.next_delay();
                tracing::warn!(error = %crate::error_chain(&err), ?delay, "schema migration failed; retrying");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::tests::{capture, value_of};
    use metrics_util::debugging::DebugValue;

    async fn stages() -> Stages {
        let sqs_args = crate::config::SqsArgs {
            queue_url: "http://127.0.0.1:9/0/q".into(),
            aws_endpoint_url: Some("http://127.0.0.1:9".into()),
            aws_region: Some("us-east-1".into()),
            aws_access_key_id: None,
            aws_secret_access_key: None,
        };
        Stages {
            transform: Transform {
                masker: Masker::new(&secrecy::SecretString::from("k".repeat(32))),
                dedup: Dedup::new(100, Duration::from_secs(60)),
                input_format: InputFormat::Auto,
                vault: None,
            },
            budget: Budget::new(64 << 20),
            processing: Arc::new(tokio::sync::Semaphore::new(1)),
            max_ack_lag: Duration::from_secs(1),
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
            ack: Ack { message_id: id.into(), receipt_handle: format!("r-{id}").into() },
            body: body.into(),
            sent_at: Utc::now(),
            share: None,
            forged_copy_id: false,
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
        dedup.mark_committed([dedup.fingerprint("m-3")]);
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
